"""maskdit_fast.parallel, .ema, .metrics and .checkpoint's sharded format: activation checkpointing,
per-block compile, sharded EMA, throughput meter and DCP checkpoints in one process, then FSDP2 / DDP on 2
CPU ranks (torchrun + gloo) against the single-process reference, with checkpoints moved between
world sizes 1 and 2 in both directions."""
import contextlib
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import dist_worker as W
from test_distributed import one_rank_group  # noqa: F401 (fixture)
from maskdit_fast.checkpoint import (ShardedCheckpointer, atomic_save, export_ema_safetensors, list_checkpoints,
                                     load_training_state, load_weights)
from maskdit_fast.checkpoint.__main__ import main as export_main
from maskdit_fast.ema import ShardedEMA
from maskdit_fast.flops import train_step_flops
from maskdit_fast.metrics import ThroughputMeter
from maskdit_fast.parallel import (apply_activation_checkpointing, apply_compile, apply_ddp, apply_fsdp,
                                   init_distributed, parameter_names, transformer_blocks)


def _inputs(batch=4):
    x, t, y, ids = W.global_batch(0)
    return x[:batch], t[:batch], y[:batch], ids[:batch]


class _BackwardOps(TorchDispatchMode):
    """Counts the aten ops that run (all, and matmuls) while active."""

    def __init__(self):
        super().__init__()
        self.ops, self.matmuls = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        self.matmuls += func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)
        return func(*args, **(kwargs or {}))


def _grads(net, counter=None):
    x, t, y, ids = _inputs()
    loss = (net(x, t, y, ids_keep=ids).sample - x).square().mean()
    with counter or contextlib.nullcontext():
        loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in zip(parameter_names(net), net.parameters())}


def test_activation_checkpointing_same_grads_and_recompute_policy():
    ref_loss, ref = _grads(W.build()[0])
    counts = {}
    for mode in ("none", "selective", "full"):
        net = W.build(ac=mode)[0]
        counts[mode] = _BackwardOps()
        loss, grads = _grads(net, counts[mode])
        assert set(grads) == set(ref), mode
        assert torch.equal(loss, ref_loss), mode
        for name in ref:
            torch.testing.assert_close(grads[name], ref[name], rtol=1e-5, atol=1e-7, msg=f"{mode} {name}")
        assert list(net.state_dict()) == list(W.build()[0].state_dict()), mode  # keys unchanged
    # full recomputes every block's forward (matmuls included) in backward; selective keeps the
    # matmul outputs and recomputes only the cheap ops
    assert counts["none"].matmuls == counts["selective"].matmuls < counts["full"].matmuls
    assert counts["none"].ops < counts["selective"].ops < counts["full"].ops


def test_activation_checkpointing_bad_mode_and_model():
    with pytest.raises(ValueError, match="activation checkpointing"):
        apply_activation_checkpointing(W.build()[0], "some")
    with pytest.raises(TypeError, match="blocks"):
        transformer_blocks(torch.nn.Linear(2, 2))


def test_compile_per_block_matches_eager():
    net = W.build()[0]
    ref_loss, ref = _grads(net)
    net.zero_grad()
    apply_compile(net, backend="aot_eager")
    loss, grads = _grads(net)
    torch.testing.assert_close(loss, ref_loss)
    for name in ref:
        torch.testing.assert_close(grads[name], ref[name], rtol=1e-5, atol=1e-6)
    assert all(blocks[i]._compiled_call_impl is not None for blocks, i in transformer_blocks(net))


def test_compiled_packed_blocks_do_not_recompile_per_keep_count_pattern(device):
    """Per-sample mask ratios change the packed token count and max_seqlen every step. Dynamo recompiles
    while it learns that they vary (automatic dynamic shapes: the first steps), then new count patterns
    reuse the compiled graphs. Triton back-end (an opaque custom op; torch's CPU varlen reference loops
    over the sequences in Python, which specialises per pattern)."""
    from torch._dynamo.utils import counters

    from maskdit_fast.diffusion import EDMPrecond, MaskDiTLoss
    from maskdit_fast.masking import random_masking_packed
    from maskdit_fast.models import MaskDiT

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    net = MaskDiT(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=2, num_classes=5,
                  decoder_depth=1, decoder_hidden_size=32, decoder_num_heads=2, backend="triton").to(device)
    apply_compile(net, backend="aot_eager")
    precond, g, graphs, patterns = EDMPrecond(net), torch.Generator().manual_seed(0), [], set()
    for _ in range(8):
        x, y = torch.randn(4, 3, 8, 8, generator=g).to(device), torch.randint(0, 5, (4,), generator=g).to(device)
        packed, _ = random_masking_packed(torch.rand(4, generator=g, dtype=torch.float64) * 0.5 + 0.25,
                                          net.num_patches, generator=g)
        packed = packed._replace(ids=packed.ids.to(device), cu_seqlens=packed.cu_seqlens.to(device))
        MaskDiTLoss()(precond, x, y, ids_keep=packed).loss.backward()
        graphs.append(counters["stats"]["unique_graphs"])
        patterns.add(packed.counts)
    torch._dynamo.reset()
    assert len(patterns) == 8 and len(set(graphs[3:])) == 1, graphs


def test_sharded_ema_plain_update():
    net = W.build()[0]
    ema, before = ShardedEMA(net), {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p))
    ema.update(net, 0.9)
    full = ema.full_state_dict()
    assert list(full) == [k for k, v in net.state_dict().items() if v.is_floating_point()]
    for name, value in full.items():  # 0.9 * old + 0.1 * new, buffers (unchanged) alike
        torch.testing.assert_close(value, torch.lerp(before[name], net.state_dict()[name], 0.1), rtol=0, atol=1e-7)
    with pytest.raises(RuntimeError, match="mismatch"):
        ema.load_state_dict({"x": torch.zeros(1)})
    with pytest.raises(RuntimeError, match="differ"):
        ema.update(W.build(ac="none")[0].blocks, 0.9)


def test_throughput_meter():
    net = W.build()[0]
    meter = ThroughputMeter(net, world_size=2, peak_flops=1e9)
    meter.update(8, 0.5)
    meter.update(8, 0.0)
    flops = 8 * train_step_flops(net, mask_ratio=0.5) + 8 * train_step_flops(net, mask_ratio=0.0)
    assert meter.flops == flops
    out = meter.summary()
    elapsed = 16 / out["images_per_s"]
    assert out["tokens_per_s"] == pytest.approx(16 * 16 / elapsed)
    assert out["mfu"] == pytest.approx(flops / elapsed / 2 / 1e9)
    assert out["peak_mem_gib"] > 0
    assert meter.images == 0  # a new window
    with pytest.raises(ValueError, match="peak_flops"):
        ThroughputMeter(net, peak_flops=0)
    # mixed resolutions: each group's images count at the group's size (FLOPs and tokens)
    meter.update(8, 0.5, (8, 8))
    meter.update(8, 0.5, (4, 4))
    assert meter.flops == 8 * (train_step_flops(net, input_size=8, mask_ratio=0.5)
                               + train_step_flops(net, input_size=4, mask_ratio=0.5))
    assert meter.tokens == 8 * 16 + 8 * 4 and meter.flops < 16 * train_step_flops(net, mask_ratio=0.5)
    # a scheduled ratio changes every step; the FLOP cache grows only with the kept-token count
    for step in range(50):
        meter.update(1, 0.5 * step / 50)
    assert len(meter._flops_cache) <= 2 + 16


def test_wrappers_need_a_process_group(monkeypatch):
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = init_distributed("cpu")
    assert (info.rank, info.world_size, info.distributed) == (0, 1, False)
    with pytest.raises(RuntimeError, match="torchrun"):
        apply_fsdp(W.build()[0])
    with pytest.raises(RuntimeError, match="torchrun"):
        apply_ddp(W.build()[0], info)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):
        init_distributed("cpu")


def _state(net, opt, ema):
    """A snapshot (copies) of model, optimizer and full EMA state."""
    import copy
    return copy.deepcopy({"model": net.state_dict(), "optimizer": opt.state_dict(), "ema": ema.full_state_dict()})


def _assert_same_state(a, b, atol=2e-5):  # Adam amplifies reduction-order rounding on tiny grads
    for part in ("model", "ema"):
        for k in a[part]:
            torch.testing.assert_close(a[part][k], b[part][k], rtol=0, atol=atol, msg=lambda m: f"{part} {k}: {m}")
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    for i in sa:
        for k in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(sa[i][k], sb[i][k], rtol=0, atol=atol, msg=f"opt {i} {k}")


def test_dcp_checkpoints_single_process(tmp_path):
    net, opt, ema = W.build()
    W.train(net, opt, ema, 0, 2)
    manager = ShardedCheckpointer(str(tmp_path), net, opt, ema, keep_last=2)
    for step in (1, 2, 3):
        manager.save(step, {"step": step, "rng": torch.get_rng_state()})
    os.makedirs(tmp_path / "step_00000004.tmp")  # a crashed writer's leftovers
    atomic_save({"step": 0}, str(tmp_path / "step_00000000.pt"))
    assert manager.steps() == [0, 2, 3]  # both formats; the temp dir is not a checkpoint
    assert manager.latest() == str(tmp_path / "step_00000003")
    fresh = W.build()
    extra = load_training_state(manager.latest(), *fresh)
    assert extra["step"] == 3 and torch.equal(extra["rng"], torch.get_rng_state())
    _assert_same_state(_state(net, opt, ema), _state(*fresh), atol=0)
    # weights only (a new stage), from either format
    for path in (manager.latest(), str(tmp_path / "step_00000000.pt")):
        if path.endswith(".pt"):
            atomic_save(dict(_state(net, opt, ema), step=3), path)
        other = W.build()
        assert load_weights(path, other[0], other[2]) == 3
        for k, v in net.state_dict().items():
            assert torch.equal(other[0].state_dict()[k], v)
        assert all(torch.equal(other[2].full_state_dict()[k], v) for k, v in ema.full_state_dict().items())
        assert not other[1].state  # the optimizer is untouched
    # the next save prunes to keep_last over both formats and clears the temp dir
    manager.save(5, {"step": 5})
    assert sorted(os.listdir(tmp_path)) == ["step_00000003", "step_00000005"]
    with pytest.raises(RuntimeError, match="not a complete DCP checkpoint"):
        load_training_state(str(tmp_path), *fresh)
    full = export_ema_safetensors(ema, str(tmp_path / "ema.safetensors"))
    from safetensors.torch import load_file
    exported = load_file(str(tmp_path / "ema.safetensors"))
    assert exported.keys() == ema.full_state_dict().keys()
    assert all(torch.equal(exported[k], v) and torch.equal(full[k], v) for k, v in ema.full_state_dict().items())
    # offline export of a checkpoint's EMA, either format, with the model metadata
    meta = {"model_class": "MaskDiT"}
    manager.save(6, {"step": 6, "meta": meta})
    atomic_save(dict(_state(net, opt, ema), step=6, meta=meta), str(tmp_path / "single.pt"))
    for source in (manager.latest(), str(tmp_path / "single.pt")):
        export_main([source, str(tmp_path / "offline.safetensors")])
        from safetensors import safe_open
        with safe_open(str(tmp_path / "offline.safetensors"), "pt") as f:
            assert json.loads(f.metadata()["maskdit_fast"]) == meta
            assert sorted(f.keys()) == sorted(full)
            assert all(torch.equal(f.get_tensor(k), v) for k, v in full.items())


def test_fsdp_and_ddp_match_single_process_and_resume_across_world_sizes(tmp_path):
    """2 ranks (torchrun, gloo): FSDP2 and DDP (with grad accumulation and selective AC) follow the
    single-process loss trajectory; a world-2 FSDP checkpoint resumes at world 1 and world-1
    checkpoints (DCP and single file) resume at world 2 under FSDP2, all continuing the same run."""
    ref_net, ref_opt, ref_ema = W.build()
    ref = W.train(ref_net, ref_opt, ref_ema, 0, W.RESUME_AT)
    ref_state_at_resume = _state(ref_net, ref_opt, ref_ema)
    ShardedCheckpointer(str(tmp_path / "ref_dcp"), ref_net, ref_opt, ref_ema).save(W.RESUME_AT, {"step": W.RESUME_AT})
    single = dict(_state(ref_net, ref_opt, ref_ema), step=W.RESUME_AT)
    atomic_save(single, str(tmp_path / "ref.pt"))
    with open(tmp_path / "ref_paths.json", "w") as f:
        json.dump({"ref_dcp": str(tmp_path / "ref_dcp" / f"step_{W.RESUME_AT:08d}"),
                   "ref_single_file": str(tmp_path / "ref.pt")}, f)
    ref += W.train(ref_net, ref_opt, ref_ema, W.RESUME_AT, W.STEPS)

    import maskdit_fast  # the workers import the package under test, wherever this process found it
    package_root = os.path.dirname(os.path.dirname(maskdit_fast.__file__))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), package_root]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           W.__file__, str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.load(open(tmp_path / "result.json"))
    assert result["world_size"] == 2 and result["any_rank"] == [True, False] and result["gathered"] == [0.5, 1.5]
    assert result["ddp_reads_model_attributes"]

    def close(got, want):
        assert len(got) == len(want)
        for (loss, norm), (ref_loss, ref_norm) in zip(got, want):
            assert math.isclose(loss, ref_loss, rel_tol=1e-5), (got, want)
            assert math.isclose(norm, ref_norm, rel_tol=1e-4), (got, want)

    close(result["fsdp"], ref[:W.RESUME_AT])
    close(result["ddp_accum2"], ref[:W.RESUME_AT])
    close(result["resume_ref_dcp"], ref[W.RESUME_AT:])
    close(result["resume_ref_single_file"], ref[W.RESUME_AT:])

    # world 2 (FSDP2, async save) -> world 1: the same state as the reference at that step ...
    path = list_checkpoints(str(tmp_path / "fsdp_ckpts"))[W.RESUME_AT]
    net, opt, ema = W.build()
    assert load_training_state(path, net, opt, ema)["step"] == W.RESUME_AT
    _assert_same_state(_state(net, opt, ema), ref_state_at_resume)
    # ... which continues the same trajectory
    close(W.train(net, opt, ema, W.RESUME_AT, W.STEPS), ref[W.RESUME_AT:])
    # the consolidated EMA export of the sharded run
    from safetensors.torch import load_file
    exported = load_file(str(tmp_path / "fsdp_ema.safetensors"))
    for k, v in ref_state_at_resume["ema"].items():
        torch.testing.assert_close(exported[k], v, rtol=0, atol=2e-5)


def test_ddp_hands_out_attributes_but_not_methods(one_rank_group):
    """A method read through the DDP wrapper ran outside DDP's forward (no gradient sync: the
    grouped loss's forward_packed did that). Attributes still read through; the grouped (list)
    forward goes through the wrapper's call."""
    info = init_distributed("cpu")
    net = W.build("ddp", info)[0]
    assert net.num_patches == 16 and net.patch_size == 2
    with pytest.raises(AttributeError, match="bypass DDP's forward"):
        net.unpatchify
    x, t, y, _ = _inputs()
    outs = net([x, x[:, :, ::2, ::2]], [t, t], [y, y], mask_ratio=0.5)
    sum(o.sample.square().mean() for o in outs).backward()
    assert [o.sample.shape for o in outs] == [(4, 1, 8, 8), (4, 1, 4, 4)]
    assert all(p.grad is not None for p in net.parameters())
