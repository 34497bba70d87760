"""Trainer speed options (issue #16): compile scope / mode / CUDA graphs and `--precision fp8`.

On CPU: config validation; the device checks that refuse fp8 / CUDA graphs before anything is
written; which linears float8 converts (MaskDiT-XL/2 and DiT-XL/2 on the meta device); a float8
forward / backward on CPU tensors against float64 (torchao, skipped without it); whole-model
compile against eager (unit and through the trainer, with resume); the gradient handling of CUDA
graphs; compile warm-up accounting. The `gpu` tests at the end run in the GPU session.
"""
import copy
import json
import math
import os
import sys

import pytest
import torch
from torch import nn

import dist_worker as W
from maskdit_fast import train as T
from maskdit_fast.config import GPU_COMPILE, PRESETS, config_from_dict, parse_config
from maskdit_fast.ema import ShardedEMA
from maskdit_fast.fp8 import check_fp8_device, convert_to_fp8, fp8_linear_names, worth_float8
from maskdit_fast.models import MaskDiT, create_model
from maskdit_fast.parallel import apply_compile, apply_fsdp, init_distributed, local_tensor, parameter_names
from test_distributed import one_rank_group  # noqa: F401 (fixture)


def tiny(run_dir, **overrides):
    """digits-tiny (8x8 digits, a 50k-parameter MaskDiT) in run_dir, a metrics record every step."""
    values = dict(PRESETS["digits-tiny"], run_dir=str(run_dir), threads=1, log_every=1, sample_per_class=0)
    values.update(overrides)
    return config_from_dict(values)


def records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(run_dir):
    return {r["step"]: r["loss"] for r in records(run_dir) if "loss" in r}


# ---------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("overrides, message", [
    (dict(precision="fp16"), "precision must be one of"),
    (dict(compile=True, compile_scope="layers"), "compile_scope must be one of"),
    (dict(compile=True, compile_mode="reduce-overhead"), "compile_mode must be one of"),
    (dict(precision="fp8"), "fp8 needs compile"),
    (dict(compile=True, cuda_graphs=True, mask_schedule="linear"), "static shapes"),
    (dict(compile=True, compile_scope="model", mask_ratio_range=[0.3, 0.6]), "static shapes"),
    (dict(compile=True, cuda_graphs=True, mixed_resolutions=[32, 16]), "static shapes"),
    (dict(compile=True, compile_scope="model", parallel="fsdp"), "compile per block"),
    (dict(compile=True, cuda_graphs=True, parallel="ddp"), "needs parallel none"),
    (dict(sample_cfg_interval=[2.0, 1.0]), "sample_cfg_interval"),
    (dict(sample_cfg_interval=[-1.0, 1.0]), "sample_cfg_interval"),
])
def test_config_refuses_unsupported_combinations(overrides, message):
    with pytest.raises(ValueError, match=message):
        config_from_dict(overrides).validate()


def test_config_accepts_what_it_supports():
    # per-block compile keeps dynamic token counts (schedules, per-sample ratios) and FSDP
    config_from_dict(dict(compile=True, mask_schedule="linear", parallel="fsdp", precision="fp8")).validate()
    # static shapes: a constant ratio (plus the unmasked phase, a second shape) with the whole model
    config_from_dict(dict(compile=True, compile_scope="model", cuda_graphs=True, unmasked_steps=10)).validate()
    # the compile settings are inert until compile is on (the GPU presets carry them that way)
    config_from_dict(dict(cuda_graphs=True, compile_scope="model", parallel="fsdp", mask_schedule="linear")).validate()


def test_torch_compile_mode_of_mode_and_cuda_graphs():
    got = {(m, g): config_from_dict(dict(compile=True, compile_mode=m, cuda_graphs=g)).torch_compile_mode()
           for m in ("default", "max-autotune") for g in (False, True)}
    assert got == {("default", False): "default", ("default", True): "reduce-overhead",
                   ("max-autotune", False): "max-autotune-no-cudagraphs", ("max-autotune", True): "max-autotune"}


@pytest.mark.parametrize("preset", ["imagenet-xl2", "imagenet-xl2-finetune"])
def test_gpu_presets_switch_on_with_one_flag(preset):
    off = parse_config(["--preset", preset, "--data", "latents"])
    on = parse_config(["--preset", preset, "--data", "latents", "--compile"])
    assert not off.compile and on.compile
    for key, value in GPU_COMPILE.items():
        if key != "compile":
            assert getattr(on, key) == value, key
    for parallel in ("none", "ddp", "fsdp"):  # the shipped choice runs at every parallelism
        parse_config(["--preset", preset, "--data", "latents", "--compile", "--parallel", parallel])


# ------------------------------------------------------------------------------- device checks
def test_fp8_and_cuda_graphs_refused_before_anything_is_written(tmp_path):
    run_dir = tmp_path / "fp8"
    with pytest.raises(RuntimeError, match="needs (torchao|a CUDA GPU with float8 tensor cores)"):
        T.train(tiny(run_dir, precision="fp8", compile=True, compile_backend="aot_eager", device="cpu"),
                progress=False)
    assert not run_dir.exists()
    run_dir = tmp_path / "graphs"
    with pytest.raises(ValueError, match="cuda_graphs needs a CUDA device"):
        T.train(tiny(run_dir, compile=True, cuda_graphs=True, device="cpu"), progress=False)
    assert not run_dir.exists()


def test_check_fp8_device_errors(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    cuda = torch.device("cuda", 0)
    if _has_torchao():
        with pytest.raises(RuntimeError, match=r"compute capability >= 8\.9.*A100.* has 8\.0"):
            check_fp8_device(cuda)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
        check_fp8_device(cuda)  # an H100 / H200 passes
    monkeypatch.setitem(sys.modules, "torchao", None)  # import torchao now raises ImportError
    monkeypatch.setitem(sys.modules, "torchao.float8", None)
    with pytest.raises(RuntimeError, match=r"needs torchao.*pip install 'maskdit_fast\[fp8\]'"):
        check_fp8_device(cuda)


def _has_torchao():
    try:
        import torchao.float8  # noqa: F401
        return True
    except ImportError:
        return False


needs_torchao = pytest.mark.skipif(not _has_torchao(), reason="torchao not installed (pip install maskdit_fast[fp8])")


# ---------------------------------------------------------------------------- which linears
def _meta_model(name):
    with torch.device("meta"):
        return create_model(name, input_size=32, in_channels=4, num_classes=1000)


def test_fp8_converts_the_block_attention_and_mlp_linears():
    xl = fp8_linear_names(_meta_model("MaskDiT-XL/2"))
    # encoder (width 1152): all four; decoder (width 512): qkv (1536 x 512) and fc1 (2048 x 512) pass the
    # size rule, proj (512 x 512) and fc2 (512 x 2048) do not
    want = [f"blocks.{i}.{n}" for i in range(28) for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
    want += [f"decoder_blocks.{i}.{n}" for i in range(8) for n in ("attn.qkv", "mlp.fc1")]
    assert xl == want
    dit = fp8_linear_names(_meta_model("DiT-XL/2"))
    assert len(dit) == 28 * 4 and all(n.startswith("blocks.") for n in dit)
    # never: adaLN projections, embedders, the decoder-input linear, the final layer
    model = _meta_model("MaskDiT-XL/2")
    others = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in xl]
    assert any("adaLN_modulation" in n for n in others) and "final_layer.linear" in others
    assert "decoder_layer.linear" in others and "t_embedder.mlp.0" in others
    assert all(not worth_float8(model.get_submodule(n)) or "adaLN" in n or "embedder" in n for n in others)


@pytest.mark.parametrize("shape, expected", [((1152, 1152), True), ((1024, 1024), False), ((1024, 4112), True),
                                             ((1040, 512), True), ((1032, 512), False), ((16, 1152), False)])
def test_worth_float8_size_rule(shape, expected):
    assert worth_float8(nn.Linear(shape[1], shape[0], device="meta")) is expected


@needs_torchao
def test_fp8_refuses_a_model_too_small():
    with pytest.raises(ValueError, match="no linear of this model is large enough"):
        convert_to_fp8(W.build()[0])


# ------------------------------------------------------------------ float8 numerics on CPU tensors
def _fp8_sized_maskdit():
    """A MaskDiT whose encoder block's qkv (1056 x 352) and fc1 (1408 x 352) pass the size rule (the
    decoder is 32 wide: torch's CPU float8 matmul is a slow reference, ~20M MAC/s); every weight
    random (the zero-initialised adaLN gates and head would hide the blocks from the output). Its ops
    run the torch reference back-end: what is checked is the linears (the interpreter would be slow)."""
    torch.manual_seed(0)
    net = MaskDiT(input_size=8, patch_size=2, in_channels=2, hidden_size=352, depth=1, num_heads=4, num_classes=5,
                  decoder_hidden_size=32, decoder_depth=1, decoder_num_heads=2, learn_sigma=False, backend="torch")
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.Linear):
                module.weight.normal_(0, module.in_features ** -0.5)
                if module.bias is not None:
                    module.bias.normal_(0, 0.1)
    return net


def _loss_and_grads(net, dtype=torch.float32, autocast=False, keep=8):
    """A squared-error loss of the network's output (the network directly: EDMPrecond computes in
    fp32, the reference here runs in float64) and the gradients, both as float64; 2 samples of 16
    tokens, `keep` of them kept."""
    g = torch.Generator().manual_seed(1)
    x, target = torch.randn(2, 2, 2, 8, 8, generator=g).to(dtype)  # drawn in fp32 for every dtype: same values
    t = torch.randn(2, generator=g).to(dtype)
    y = torch.randint(0, 6, (2,), generator=g)
    ids = torch.rand(2, 16, generator=g).argsort(1)[:, :keep]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = (net(x, t, y, ids_keep=ids).sample.to(dtype) - target).square().mean()
    loss.backward()
    return loss.detach().double(), {n: p.grad.double() for n, p in zip(parameter_names(net), net.parameters())}


@needs_torchao
def test_fp8_conversion_keeps_parameters_and_keys():
    from torchao.float8.float8_linear import Float8Linear
    net = _fp8_sized_maskdit()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    names = convert_to_fp8(net)
    assert names == ["blocks.0.attn.qkv", "blocks.0.mlp.fc1"]
    for name, module in net.named_modules():
        if isinstance(module, nn.Linear):
            assert isinstance(module, Float8Linear) == (name in names), name
    after = net.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)


@needs_torchao
def test_fp8_forward_backward_on_cpu_against_float64():
    """float8 really runs (its error is above bf16's) and stays close to float64 in the loss and in the
    gradients of a converted weight; compiled (aot_eager: the same graph through dynamo / AOTAutograd)
    it gives the eager float8 numbers."""
    net = _fp8_sized_maskdit()
    ref_loss, ref = _loss_and_grads(copy.deepcopy(net).double(), torch.float64)
    bf16_loss, bf16 = _loss_and_grads(copy.deepcopy(net), autocast=True)
    fp8_net = copy.deepcopy(net)
    convert_to_fp8(fp8_net)
    fp8_loss, fp8 = _loss_and_grads(fp8_net, autocast=True)

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    name = "blocks.0.mlp.fc1.weight"
    loss_err = {"bf16": rel(bf16_loss, ref_loss), "fp8": rel(fp8_loss, ref_loss)}
    grad_err = {"bf16": rel(bf16[name], ref[name]), "fp8": rel(fp8[name], ref[name])}
    # measured: loss 0.76 % (fp8) / 0.01 % (bf16) off float64, fc1's gradient 4.6 % / 0.89 %
    assert loss_err["fp8"] < 0.03 and grad_err["fp8"] < 0.15, (loss_err, grad_err)
    assert grad_err["fp8"] > 2 * grad_err["bf16"], grad_err  # the float8 casts happened
    assert all(torch.isfinite(g).all() for g in fp8.values())

    compiled = copy.deepcopy(net)
    convert_to_fp8(compiled)
    apply_compile(compiled, backend="aot_eager")
    c_loss, c_grads = _loss_and_grads(compiled, autocast=True)
    torch.testing.assert_close(c_loss, fp8_loss)
    for key in fp8:
        torch.testing.assert_close(c_grads[key], fp8[key], msg=key)


def test_fp8_pads_only_token_counts_off_the_grid_of_16():
    """8x8 digits, patch 2: 16 tokens, 8 kept at ratio 0.5. Rows per rank x tokens must be a multiple
    of 16 (the weight gradient's inner dimension) for every count the run can see."""
    net = W.build()[0]

    def pads(world_size=1, **kw):
        return T.fp8_needs_padding(config_from_dict({"batch_size": 16, **kw}), net, world_size)

    assert not pads() and not pads(batch_size=6) and not pads(world_size=2)  # 16 x 8, 6 x 8, 8 x 8
    assert pads(batch_size=5)  # 5 x 8 kept tokens = 40
    assert pads(batch_size=12, grad_accum=4)  # 3 rows per micro-batch: 3 x 8
    assert not pads(mask_ratio=0.25) and pads(batch_size=2, mask_ratio=0.25)  # 16 x 12 kept = 192; 2 x 12 = 24
    assert not pads(batch_size=4, mask_ratio=0.0)  # 4 x 16
    assert pads(mask_ratio_range=[0.3, 0.6]) and pads(mask_schedule="linear") and pads(mixed_resolutions=[8, 4])


@needs_torchao
def test_fp8_padded_gemms_give_the_unpadded_numbers():
    """pad_inner_dim zero-pads the GEMMs' inner dimensions to multiples of 16 (here the encoder's
    2 x 5 = 10 tokens, the weight gradient's inner dimension): the same loss and gradients as the
    unpadded GEMMs (torch's CPU float8 matmul takes any size; CUDA's needs the padding)."""
    net = _fp8_sized_maskdit()
    plain, padded = copy.deepcopy(net), copy.deepcopy(net)
    convert_to_fp8(plain)
    convert_to_fp8(padded, pad_inner_dim=True)
    assert padded.blocks[0].mlp.fc1.config.pad_inner_dim and not plain.blocks[0].mlp.fc1.config.pad_inner_dim
    want_loss, want = _loss_and_grads(plain, autocast=True, keep=5)
    got_loss, got = _loss_and_grads(padded, autocast=True, keep=5)
    torch.testing.assert_close(got_loss, want_loss)
    for name in want:
        torch.testing.assert_close(got[name], want[name], msg=name)


@needs_torchao
def test_fp8_under_fsdp2_matches_unsharded_and_keeps_plain_shards(one_rank_group):
    """Float8 linears under FSDP2 (a real gloo group of one): weights gathered in bf16, then cast to
    float8 in the linear; loss and gradients as the unsharded float8 model's under bf16 autocast
    (within float8's error), and the shards, gradients and EMA stay plain tensors (checkpoints, EMA
    and the non-finite checks see nothing new)."""
    init_distributed("cpu")
    net = _fp8_sized_maskdit()
    convert_to_fp8(net)
    ref_loss, ref = _loss_and_grads(copy.deepcopy(net), autocast=True)
    sharded = apply_fsdp(net, param_dtype=torch.bfloat16)
    ema = ShardedEMA(sharded)
    loss, grads = _loss_and_grads(sharded, autocast=True)
    # FSDP computes every op with the bf16-gathered weights (autocast alone keeps LayerNorm, conv and
    # biases fp32), so the two round differently; measured 0.15 % (loss) and <= 4 % (gradients), the
    # size of float8's own error (4.6 % on fc1's gradient against float64, test above)
    assert abs(loss - ref_loss) / ref_loss < 0.01
    for name, grad in grads.items():
        full = grad.full_tensor()
        assert torch.isfinite(full).all() and (full - ref[name]).norm() / ref[name].norm() < 0.1, name
    tensors = [p for p in sharded.parameters()] + [p.grad for p in sharded.parameters()] + list(ema.shadow)
    assert all(type(local_tensor(t)) is torch.Tensor for t in tensors)


# --------------------------------------------------------------------------- whole-model compile
def test_compile_whole_model_matches_eager():
    net = W.build()[0]
    x, t, y, ids = (v[:4] for v in W.global_batch(0))
    loss = (net(x, t, y, ids_keep=ids).sample - x).square().mean()
    ref = torch.autograd.grad(loss, list(net.parameters()))
    keys = list(net.state_dict())
    apply_compile(net, backend="aot_eager", scope="model")
    assert net._compiled_call_impl is not None and list(net.state_dict()) == keys
    assert all(block._compiled_call_impl is None for block in net.blocks)
    got_loss = (net(x, t, y, ids_keep=ids).sample - x).square().mean()
    got = torch.autograd.grad(got_loss, list(net.parameters()))
    torch.testing.assert_close(got_loss, loss)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="compile scope"):
        apply_compile(net, scope="layers")


def test_trainer_whole_model_compile_matches_eager_resumes_and_times_warmup_apart(tmp_path):
    """Losses of a whole-model-compiled run (grad accumulation, masked then unmasked phase) equal
    eager's; an interrupted compiled run resumes to the same losses; the compile steps (the first
    of the process and the first of the unmasked phase: a new shape) are logged as warmup_s."""
    common = dict(steps=5, unmasked_steps=2, grad_accum=2, ckpt_every=100)
    compiled = dict(common, compile=True, compile_scope="model", compile_backend="aot_eager")
    T.train(tiny(tmp_path / "eager", **common), progress=False)
    T.train(tiny(tmp_path / "compiled", **compiled), progress=False)
    assert T.train(tiny(tmp_path / "resumed", **compiled), stop_at=2, progress=False)["interrupted"]
    T.train(tiny(tmp_path / "resumed", **compiled), progress=False)
    want = losses(tmp_path / "eager")
    assert sorted(want) == [1, 2, 3, 4, 5]
    for run in ("compiled", "resumed"):
        got = losses(tmp_path / run)
        assert sorted(got) == sorted(want)
        for step in want:
            assert math.isclose(got[step], want[step], rel_tol=1e-5), (run, step, got, want)
    warm = [r["step"] for r in records(tmp_path / "compiled") if "warmup_s" in r]
    assert warm == [1, 4]  # the process's first step, the first unmasked step
    # the resumed process compiles again: its steps 3 (first) and 4 (first unmasked) are one warm-up run
    assert [r["step"] for r in records(tmp_path / "resumed") if "warmup_s" in r] == [1, 4]
    assert not [r for r in records(tmp_path / "eager") if "warmup_s" in r]


def test_whole_model_compile_under_ddp_matches_eager(tmp_path, one_rank_group):
    """DDP (a real gloo group of one) around the whole-model-compiled network, masked then unmasked
    phase (the mask token idles: find_unused_parameters), gives the eager losses."""
    common = dict(steps=3, unmasked_steps=1, ckpt_every=100, device="cpu")
    T.train(tiny(tmp_path / "eager", **common), progress=False)
    T.train(tiny(tmp_path / "ddp", parallel="ddp", compile=True, compile_scope="model", compile_backend="aot_eager",
                 **common), progress=False)
    want, got = losses(tmp_path / "eager"), losses(tmp_path / "ddp")
    assert sorted(got) == sorted(want) == [1, 2, 3]
    for step in want:
        assert math.isclose(got[step], want[step], rel_tol=1e-5), (step, got, want)


def test_compile_warmup_steps():
    def steps(start=0, **kw):
        return T.compile_warmup_steps(config_from_dict(dict(steps=10, unmasked_steps=2, **kw)), start)
    assert steps() == set()
    assert steps(compile=True) == {1, 9}  # per block: the unmasked phase's count recompiles (then dynamic)
    assert steps(compile=True, compile_scope="model") == {1, 9}
    assert steps(compile=True, cuda_graphs=True) == {1, 2, 9, 10}
    assert steps(5, compile=True, compile_scope="model") == {6, 9}  # resumed: compiles again
    assert steps(8, compile=True, compile_scope="model") == {9}  # resumed inside the unmasked phase
    assert steps(compile=True, compile_scope="model", mask_ratio=0.0) == {1}  # one shape throughout


# --------------------------------------------------------------- CUDA graphs' gradient handling
def _state(cfg):
    """A TrainState as `train` builds it, without compile (on CPU inductor would skip the graphs: what
    is checked here is the trainer's gradient handling around them)."""
    info = init_distributed("cpu")
    dataset, stream = T.build_data(cfg, info)
    net = T.build_model(cfg, dataset.sample_shape)
    return T.TrainState(net=net, ema=ShardedEMA(net), optimizer=T.build_optimizer(cfg, net), stream=stream,
                        loss_gen=torch.Generator().manual_seed(cfg.seed),
                        data_gen=torch.Generator().manual_seed(cfg.seed + 1),
                        ratio_gen=torch.Generator().manual_seed(cfg.seed + 2))


def test_cuda_graphs_keep_gradient_buffers_and_train_identically(tmp_path):
    """With cuda_graphs the gradients are allocated once and zeroed in place (never set to None), so
    backward accumulates into them instead of installing a graph-owned buffer; under gradient
    accumulation the steps equal the default handling bit for bit."""
    results = {}
    for graphs in (False, True):
        cfg = tiny(tmp_path, grad_accum=2, steps=3, compile=graphs, cuda_graphs=graphs, device="cpu")
        state = _state(cfg)
        assert all((p.grad is not None) == graphs for p in state.net.parameters())
        buffers = [p.grad for p in state.net.parameters()]
        out = []
        for step in range(3):
            out.append(T.train_step(cfg, state, T.build_loss(cfg), 0.5, torch.device("cpu"))["loss"])
            state.step += 1
        if graphs:
            assert all(p.grad is b for p, b in zip(state.net.parameters(), buffers))  # the same tensors, zeroed
            assert all(not p.grad.any() for p in state.net.parameters())
        else:
            assert all(p.grad is None for p in state.net.parameters())
        results[graphs] = out, [p.detach().clone() for p in state.net.parameters()]
    assert results[True][0] == results[False][0]
    assert all(torch.equal(a, b) for a, b in zip(results[True][1], results[False][1]))


# ------------------------------------------------------------------------------------ GPU only
@pytest.mark.gpu
def test_gpu_cuda_graphs_train_like_compile_and_resume(tmp_path, monkeypatch):
    """inductor + CUDA graphs (whole model, grad accumulation, masked then unmasked phase) gives the
    losses of inductor without graphs, and an interrupted CUDA-graph run resumes to them."""
    common = dict(steps=6, unmasked_steps=2, grad_accum=2, ckpt_every=100, device="cuda", compile=True,
                  compile_scope="model")
    from torch._dynamo.utils import counters
    T.train(tiny(tmp_path / "plain", **common), progress=False)
    replays, replay = [], torch.cuda.CUDAGraph.replay

    def counted(graph):
        replays.append(1)
        return replay(graph)

    counters.clear()
    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", counted)
    T.train(tiny(tmp_path / "graphs", **common, cuda_graphs=True), progress=False)
    # the graphs really ran: nothing made inductor fall back to plain kernels, and graphs replayed
    # (forward + backward of 2 micro-batches per step: dozens of replays in 6 steps)
    assert counters["inductor"]["cudagraph_skips"] == 0 and len(replays) >= 12, (counters["inductor"], len(replays))
    assert T.train(tiny(tmp_path / "resumed", **common, cuda_graphs=True), stop_at=3, progress=False)["interrupted"]
    T.train(tiny(tmp_path / "resumed", **common, cuda_graphs=True), progress=False)
    want = losses(tmp_path / "plain")
    for run in ("graphs", "resumed"):
        got = losses(tmp_path / run)
        assert sorted(got) == sorted(want) == list(range(1, 7))
        for step in want:
            assert math.isclose(got[step], want[step], rel_tol=1e-4), (run, step, got, want)


@pytest.mark.gpu
@needs_torchao
def test_gpu_fp8_trainer_steps_close_to_bf16(tmp_path):
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("float8 needs compute capability >= 8.9")
    kw = dict(hidden_size=352, depth=1, num_heads=4, decoder_hidden_size=352, decoder_depth=1, decoder_num_heads=4)
    common = dict(steps=4, ckpt_every=100, device="cuda", compile=True, model_kwargs=kw)
    T.train(tiny(tmp_path / "bf16", precision="bf16", **common), progress=False)
    T.train(tiny(tmp_path / "fp8", precision="fp8", **common), progress=False)
    bf16, fp8 = losses(tmp_path / "bf16"), losses(tmp_path / "fp8")
    assert sorted(fp8) == [1, 2, 3, 4]
    for step in bf16:
        assert math.isfinite(fp8[step]) and math.isclose(fp8[step], bf16[step], rel_tol=0.05), (step, fp8, bf16)
