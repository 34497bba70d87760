"""Tests of the benchmark report (`python -m maskdit_fast.bench`) and its timing / counting helpers,
on the CPU: the report's structure end to end (--cpu-quick), the correctness gate (a wrong kernel is
reported, never timed), byte counts against the tensors actually touched, rotation, batch fitting
and the check-module plumbing that the GPU run uses."""
import dataclasses
import json

import pytest
import torch

from maskdit_fast import bench, ops
from maskdit_fast.backend import triton_interpreted
from maskdit_fast.bench import backends, cli, op_section
from maskdit_fast.bench import report as report_module
from maskdit_fast.bench.costs import (Cost, achieved, attention_cost, gated_residual_cost, gather_tokens_cost,
                                      layernorm_modulate_cost, scatter_tokens_cost)
from maskdit_fast.bench.timing import Rotation, Stats, Timer, rotation_count, time_calls


def _nbytes(*tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


# ------------------------------------------------------------------------------ end to end

@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    code = bench.main(["--cpu-quick", "--out", str(out)])
    return code, out


def test_cpu_quick_writes_json_and_markdown(quick_report):
    code, out = quick_report
    assert code == 0
    files = sorted(p.name for p in out.iterdir())
    assert len(files) == 2 and files[0].endswith("-cpu-quick.json") and files[1].endswith("-cpu-quick.md")
    report = json.loads((out / files[0]).read_text())
    assert report["schema"] == bench.SCHEMA and report["mode"] == "cpu-quick"
    assert report["env"]["device"] == "cpu" and report["env"]["torch"] == torch.__version__
    assert "CPU subset" in report["note"]
    assert set(report["sections"]) == set(bench.SECTIONS)
    assert report["peaks"]["copy_GBps"] > 0 and report["peaks"]["matmul_TFLOPs"] > 0

    # Every op x back-end x pass has a row; torch rows are checked, timed and are their own baseline.
    cases = bench.op_cases(bench.make_config("cpu-quick", "cpu"))
    names = [c.name for c in cases]
    assert {(r["op"], r["backend"], r["pass"]) for r in report["ops"]} == \
        {(c.name, b, p) for c in cases for b in c.backends for p in bench.PASSES}
    assert {"gather_tokens_varlen", "scatter_tokens_varlen"} <= set(names)
    assert "varlen_attention[encoder]" in {r["op"] for r in report["attention"]}
    for row in report["ops"] + report["attention"]:
        if row["backend"] == "torch":
            assert row["status"] == "ok" and row["ms"] > 0 and row["GBps"] > 0
            assert row["vs_baseline"] == pytest.approx(1.0) and row["max_err"] <= row["tol"]
        elif row["backend"] in bench.GPU_ONLY_BACKENDS:
            assert row["status"] == "unavailable" and "CUDA" in row["reason"] and "ms" not in row
    assert all("pct_of_floor" in r for r in report["attention"] if r["status"] == "ok")
    checks = [c for c in report["checks"] if c["source"] == "bench"]
    assert checks and all(c["passed"] for c in checks)

    train = {r["variant"]: r for r in report["train_step"]}
    assert train["MaskDiT-S/2 fused"]["status"] == train["MaskDiT-S/2 triton"]["status"] == "skipped"
    ref, dit = train["MaskDiT-S/2 reference"], train["DiT-S/2"]
    assert ref["status"] == dit["status"] == "ok" and ref["vs_baseline"] == pytest.approx(1.0)
    assert dit["vs_baseline"] == pytest.approx(dit["images_per_s"] / ref["images_per_s"])
    assert ref["TFLOPs"] > 0 and ref["batch"] == 4 and ref["mask_ratio"] == 0.5
    fig = report["cpu_figure"]
    assert fig["speedup"] == pytest.approx(fig["dit_ms"] / fig["maskdit_ms"]) and fig["config"]["threads"] == 1
    assert fig["flops_ratio"] > 1  # the masked encoder does less work

    md = (out / files[1]).read_text()
    for heading in ("# maskdit_fast benchmark", "## Checks", "## Ops", "## Attention", "## Train step",
                    "## Profile", "## CPU figure", "## Sections"):
        assert heading in md
    assert f"torch {torch.__version__}" in md


def test_config_and_section_errors():
    with pytest.raises(ValueError, match="unknown mode"):
        bench.make_config("tpu", "cpu")
    with pytest.raises(ValueError, match="unknown sections"):
        bench.run_report(bench.make_config("cpu-quick", "cpu"), ["peaks", "nope"])
    with pytest.raises(SystemExit):
        bench.main(["--cpu-quick", "--device", "cuda"])
    for bad in ("nope=3", "train_step", "train_step=soon"):
        with pytest.raises(SystemExit):
            bench.main(["--cpu-quick", "--budget", bad])
    report = bench.run_report(bench.make_config("cpu-quick", "cpu"), ["peaks"], log=lambda *a: None,
                              budgets={"peaks": 7.0})
    assert report["sections"]["peaks"]["budget_s"] == 7.0


def test_gpu_mode_logic_runs_on_a_cpu_stand_in(tmp_path):
    """The GPU mode's configuration and report path, at tiny sizes on the CPU."""
    tiny = bench.make_config("cpu-quick", "cpu")
    size = tiny.train_input_sizes[0]
    cfg = dataclasses.replace(bench.make_config("gpu-quick", "cpu"), **bench.CPU_TINY, dtype=torch.float32,
                              copy_bytes=tiny.copy_bytes, matmul_n=tiny.matmul_n, train_size=tiny.train_size,
                              train_overrides=tiny.train_overrides, train_input_sizes=(size,),
                              common_batch={size: 2}, fixed_batch=tiny.fixed_batch, profile=tiny.profile,
                              cpu_figure=tiny.cpu_figure)
    report = bench.run_report(cfg, log=lambda *a: None)
    assert report["mode"] == "gpu-quick" and set(report["sections"]) == set(bench.SECTIONS)
    assert {r["backend"] for r in report["ops"] if r["status"] == "skipped"} == {"compile"}  # off in quick mode
    json_path, md_path = bench.write_report(report, tmp_path)
    assert json_path.endswith("-cpu-quick.json") and json.loads(open(json_path).read())["mode"] == "gpu-quick"


def test_train_rows_at_tiny_sizes_compute_the_reference_loss():
    """The train-step section at two tiny sizes (64 and 256 tokens: 256 and 512 px scaled down) with
    its compile rows (aot_eager: the same dynamo / AOTAutograd graphs, no C++ compiler), then the
    fused variants that the section keeps for a GPU, built directly (on the CPU "auto" runs the torch
    ops). Same seed, so the same weights, data, masks and noise: every MaskDiT row's first loss is the
    reference's, DiT + compile's is DiT's; CUDA-graph, fp8 and Triton rows say they need a GPU."""
    from maskdit_fast.bench.train_step import build_train_step
    cfg = dataclasses.replace(bench.make_config("cpu-quick", "cpu"), compile=True, train_input_sizes=(16, 32),
                              train_reps=1)
    rows = bench.run_train_section(cfg, bench.Budget(600), None)
    assert [(r["variant"], r["input_size"]) for r in rows] == [(row.variant.label, row.input_size)
                                                             for row in bench.train_rows(cfg)]
    ok = {(r["variant"], r["input_size"]): r for r in rows if r["status"] == "ok"}
    assert set(ok) == {(f"{m}-S/2{s}", size) for m, s in (("MaskDiT", " reference"), ("MaskDiT", " reference + compile"),
                                                         ("DiT", ""), ("DiT", " + compile")) for size in (16, 32)}
    for size in (16, 32):
        ref, dit = ok["MaskDiT-S/2 reference", size], ok["DiT-S/2", size]
        assert ref["px"] == 8 * size and ref["batch"] == cfg.fixed_batch and ref["vs_baseline"] == pytest.approx(1.0)
        assert dit["vs_baseline"] == pytest.approx(dit["images_per_s"] / ref["images_per_s"])
        for twin, compiled in ((ref, ok["MaskDiT-S/2 reference + compile", size]), (dit, ok["DiT-S/2 + compile", size])):
            assert compiled["loss"] == pytest.approx(twin["loss"], rel=1e-5) and compiled["compile_s"] >= 0
            assert compiled["compile"] == "model" and "compile_s" not in twin
        assert ref["loss"] != pytest.approx(dit["loss"], rel=1e-3)  # a different model: the check can fail
    reasons = {r["variant"]: r["reason"] for r in rows if r["status"] != "ok"}
    assert "needs a CUDA GPU" in reasons["MaskDiT-S/2 fused + compile + CUDA graphs"]
    assert "needs a CUDA GPU" in reasons["MaskDiT-S/2 triton"]
    for variant in bench.train_variants(cfg):
        if variant.backend != "auto" or variant.cuda_graphs or variant.fp8:
            continue
        step, _, _ = build_train_step(variant, cfg.fixed_batch, 16, "cpu", torch.float32, cfg.compile_backend)
        assert float(step()) == pytest.approx(ok["MaskDiT-S/2 reference", 16]["loss"], rel=1e-5), variant.label


def test_every_mode_budget_covers_its_sections():
    for mode in ("gpu", "gpu-quick", "cpu", "cpu-quick"):
        cfg = bench.make_config(mode, "cpu")
        assert set(cfg.sections) <= set(cfg.budgets)
    gpu = bench.make_config("gpu", "cpu")
    assert sum(gpu.budgets.values()) < 8 * 60  # the GPU report must end within 8 minutes
    assert [v.label for v in bench.train_variants(gpu)] == [
        "MaskDiT-XL/2 fused", "MaskDiT-XL/2 triton", "MaskDiT-XL/2 reference", "DiT-XL/2",
        "MaskDiT-XL/2 reference + compile", "MaskDiT-XL/2 fused + compile", "MaskDiT-XL/2 fused + compile + CUDA graphs",
        "DiT-XL/2 + compile", "MaskDiT-XL/2 fused + compile (blocks)", "MaskDiT-XL/2 fused + compile + fp8"]
    assert bench.train_baseline(gpu) == "MaskDiT-XL/2 reference"


# ------------------------------------------------------------------------------ correctness gate

def _residual_case(op):
    cfg = bench.make_config("cpu-quick", "cpu")
    case = next(c for c in bench.op_cases(cfg) if c.name == "gated_residual")
    return bench.OpCase("fake_residual", case.shape, op, ops.gated_residual_ref, case.make_args, case.grad_argnums,
                        case.cost, "memory", ("torch", "wrong_fwd", "wrong_bwd", "crash", "missing")), cfg


class _WrongBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, gate):
        ctx.save_for_backward(y, gate)
        return ops.gated_residual_ref(x, y, gate)

    @staticmethod
    def backward(ctx, g):
        y, gate = ctx.saved_tensors
        return g, g * gate[:, None], (g * y).sum(1) * 1.5  # grad of gate off by 50 %


def _fake_op(x, y, gate, *, backend):
    if backend == "torch":
        return ops.gated_residual(x, y, gate, backend="torch")
    if backend == "wrong_fwd":
        return ops.gated_residual_ref(x, y, gate) + 1e-3
    if backend == "wrong_bwd":
        return _WrongBackward.apply(x, y, gate)
    if backend == "crash":
        raise RuntimeError("illegal memory access")
    raise NotImplementedError("no kernel yet")


class CountingTimer(Timer):
    """CPU stand-in for the CUDA-event timer that counts the timed calls."""
    calls = 0

    def __call__(self, fn, *args, **kwargs):
        CountingTimer.calls += 1
        return super().__call__(fn, *args, **kwargs)


def test_failing_kernel_is_reported_not_timed():
    case, cfg = _residual_case(_fake_op)
    checks = []
    CountingTimer.calls = 0
    rows = bench.run_op_section([case], cfg, bench.Budget(60), None, CountingTimer, checks)
    status = {(r["backend"], r["pass"]): r for r in rows}
    assert status[("torch", "fwd")]["status"] == status[("torch", "fwd+bwd")]["status"] == "ok"
    assert status[("wrong_fwd", "fwd")]["status"] == "failed check" and "ms" not in status[("wrong_fwd", "fwd")]
    assert status[("wrong_fwd", "fwd")]["max_err"] > status[("wrong_fwd", "fwd")]["tol"]
    # A wrong backward leaves the forward timed and stops the fwd+bwd timing.
    assert status[("wrong_bwd", "fwd")]["status"] == "ok"
    assert status[("wrong_bwd", "fwd+bwd")]["status"] == "failed check"
    assert status[("crash", "fwd")]["status"] == "failed check"
    assert "illegal memory access" in status[("crash", "fwd")]["reason"]
    assert status[("missing", "fwd")]["status"] == "unavailable"
    assert CountingTimer.calls == 3 * cfg.reps  # torch fwd, torch fwd+bwd, wrong_bwd fwd
    failed = {c["name"] for c in checks if not c["passed"]}
    assert failed == {"fake_residual/wrong_fwd/fwd", "fake_residual/wrong_fwd/fwd+bwd",
                      "fake_residual/wrong_bwd/fwd+bwd", "fake_residual/crash/fwd", "fake_residual/crash/fwd+bwd"}


@pytest.mark.skipif(not triton_interpreted(), reason="needs TRITON_INTERPRET=1 (set by tests/conftest.py without a GPU)")
def test_triton_backends_pass_the_report_checks_under_the_interpreter(monkeypatch):
    """The report's cases and argument layouts drive the Triton kernels correctly (the GPU path, run
    by the interpreter at tiny sizes; the report itself never times the interpreter)."""
    monkeypatch.setattr(backends, "GPU_ONLY_BACKENDS", tuple(b for b in backends.GPU_ONLY_BACKENDS if b != "triton"))
    cfg = bench.make_config("cpu-quick", "cpu")
    for case in bench.op_cases(cfg) + bench.attention_cases(cfg):
        verdict = bench.check_case(case, bench.backend_fn(case, "triton", "cpu"), "cpu", cfg.dtype)
        assert all(passed for _, _, passed in verdict.values()), (case.name, verdict)


def test_a_section_that_raises_keeps_the_report_and_stops_the_rest(tmp_path, monkeypatch):
    """A crash (e.g. a device error, which poisons the CUDA context) is recorded in its section, later
    sections are marked not run, the report is still written and main() exits 1."""
    def crash(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    monkeypatch.setattr(report_module, "run_op_section", crash)
    report = bench.run_report(bench.make_config("cpu-quick", "cpu"), ["peaks", "ops", "attention"],
                              log=lambda *a: None)
    assert report["peaks"]["copy_GBps"] > 0 and "error" not in report["sections"]["peaks"]
    assert "illegal memory access" in report["sections"]["ops"]["error"]
    assert report["sections"]["attention"]["error"] == "not run: ops raised RuntimeError"
    assert "illegal memory access" in bench.to_markdown(report)
    monkeypatch.setattr(cli, "run_report", lambda cfg, sections=None, budgets=None: report)
    assert bench.main(["--cpu-quick", "--out", str(tmp_path)]) == 1
    assert len(list(tmp_path.glob("*.json"))) == 1


def test_graph_timing_needs_cuda_and_reports_why_not():
    """CUDA-graph replay timing (the device-only figure beside the eager one) is CUDA-only; a failure
    becomes a reason on the row, never an exception."""
    from maskdit_fast.bench.timing import time_graph_replays
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        time_graph_replays(lambda: None, 2, "cpu")
    cfg = bench.make_config("cpu-quick", "cpu")
    extra = op_section._graph_timing(lambda *a: None, [((), None)], cfg, Timer)
    assert set(extra) == {"graph_reason"} and "needs a CUDA device" in extra["graph_reason"]


def test_spent_budget_skips_instead_of_timing():
    case, cfg = _residual_case(_fake_op)
    budget = bench.Budget(0)
    rows = bench.run_op_section([case], cfg, budget, None)
    assert rows and all(r["status"] == "skipped" and "budget" in r["reason"] for r in rows)


def test_markdown_lists_failed_checks_and_main_exit_code(tmp_path, monkeypatch):
    report = bench.run_report(bench.make_config("cpu-quick", "cpu"), ["peaks"], log=lambda *a: None)
    report["checks"].append(dict(source="bench", name="op/triton/fwd", max_err=1.0, tol=0.1, passed=False,
                                 status="FAILED"))
    md = bench.to_markdown(report)
    assert "0 passed, 1 failed" in md and "op/triton/fwd" in md
    monkeypatch.setattr(cli, "run_report", lambda cfg, sections=None, budgets=None: report)
    assert bench.main(["--cpu-quick", "--out", str(tmp_path)]) == 1
    assert len(list(tmp_path.glob("*.json"))) == 1


# ------------------------------------------------------------------------------ timing helpers

def test_stats_and_time_calls_with_a_stand_in_timer():
    stats = Stats.from_times([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (stats.median_ms, stats.p10_ms, stats.p90_ms, stats.n) == (3.0, 1.0, 5.0, 5)
    with pytest.raises(ValueError):
        Stats.from_times([])

    class FixedTimer:
        def __init__(self):
            self.n = 0

        def reset(self):
            self.n = 0

        def __call__(self, fn):
            self.n += 1
            return fn()

        def times_ms(self):
            return [float(i) for i in range(1, self.n + 1)]

    calls = []
    stats = time_calls(lambda: calls.append(1), "cpu", warmup=3, reps=5, timer=FixedTimer())
    assert len(calls) == 8 and stats.median_ms == 3.0 and stats.n == 5
    with pytest.raises(ValueError):
        time_calls(lambda: None, "cpu", reps=0)


def test_rotation_sets_exceed_twice_the_cache(monkeypatch):
    assert rotation_count(10, 0) == 1
    assert rotation_count(30 * 2**20, 50 * 2**20) == 4
    assert rotation_count(1, 50 * 2**20, max_sets=64) == 64
    with pytest.raises(ValueError):
        rotation_count(0, 1)
    cfg = bench.make_config("cpu-quick", "cpu")
    case = next(c for c in bench.op_cases(cfg) if c.name == "layernorm_modulate")
    set_bytes = _nbytes(*case.make_args("cpu", cfg.dtype, torch.Generator().manual_seed(0)))
    monkeypatch.setattr(op_section, "cache_bytes", lambda device: 3 * set_bytes)
    sets = bench.input_sets(case, cfg)
    assert len(sets) == rotation_count(set_bytes + _nbytes(sets[0][1]), 3 * set_bytes) > 1
    assert not torch.equal(sets[0][0][0], sets[1][0][0])  # distinct inputs, not copies
    seen = []
    rotation = Rotation(lambda args, grad_out: seen.append(args[0].data_ptr()), sets)
    for _ in range(2 * len(sets)):
        rotation()
    assert seen[:len(sets)] == seen[len(sets):] and len(set(seen)) == len(sets)


def test_fit_batch_solves_the_linear_memory_model():
    peak = lambda b: 10e9 + 0.5e9 * b  # noqa: E731
    assert bench.fit_batch(peak, 80e9, max_batch=512) == 120  # (0.88 * 80 - 10) / 0.5 = 120.8
    assert bench.fit_batch(peak, 80e9, max_batch=64) == 64
    assert bench.fit_batch(peak, 12e9, max_batch=512) == 8  # never below one multiple


# ------------------------------------------------------------------------------ byte / FLOP counts

def test_glue_op_byte_counts_match_the_tensors_touched():
    B, L, K, D = 3, 10, 4, 8
    x, pos, ids = torch.randn(B, L, D), torch.randn(L, D), torch.zeros(B, K, dtype=torch.int64)
    kept, out_k, out_l = torch.randn(B, K, D), torch.randn(B, K, D), torch.randn(B, L, D)
    fwd, bwd = gather_tokens_cost(B, L, K, D, 4)
    assert fwd.bytes == _nbytes(kept, pos, ids, out_k)                 # kept rows of x + pos + ids -> out
    assert bwd.bytes == _nbytes(out_k, ids, x)                         # grad_out + ids -> grad_x
    fwd, bwd = scatter_tokens_cost(B, L, K, D, 4)
    mask_token = torch.randn(D)
    assert fwd.bytes == _nbytes(kept, ids, mask_token, pos, out_l)
    assert bwd.bytes == _nbytes(out_l, ids, kept, mask_token)          # grad_out -> grad_kept, grad_mask_token
    shift = torch.randn(B, D)
    fwd, bwd = layernorm_modulate_cost(B, K, D, 4)
    assert fwd.bytes == _nbytes(kept, shift, shift, out_k)
    assert bwd.bytes == _nbytes(kept, out_k, shift, out_k, shift, shift)  # x, grad_out, scale -> 3 grads
    fwd, bwd = gated_residual_cost(B, K, D, 4)
    assert fwd.bytes == _nbytes(kept, kept, shift, out_k)
    assert bwd.bytes == _nbytes(out_k, kept, shift, kept, shift)       # grad_out, y, gate -> grad_y, grad_gate


def test_attention_flops_match_torch_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode
    B, H, L, Dh = 2, 3, 16, 8
    q, k, v = (torch.randn(B, H, L, Dh, requires_grad=True) for _ in range(3))
    fwd, bwd = attention_cost(B, H, L, L, Dh, 4)
    with FlopCounterMode(display=False) as counter:  # the math form: two batched matmuls
        out = torch.softmax(q @ k.transpose(-1, -2) * Dh ** -0.5, dim=-1) @ v
    assert counter.get_total_flops() == fwd.flops
    with FlopCounterMode(display=False) as counter:
        out.backward(torch.randn_like(out))
    # Four matmul gradients, plus FlashAttention's recomputation of q k^T (half the forward).
    assert counter.get_total_flops() + fwd.flops // 2 == bwd.flops
    assert fwd.bytes == 4 * _nbytes(q) and bwd.bytes == 8 * _nbytes(q)


def test_achieved_figures():
    cost = Cost(bytes=3_000_000, flops=2_000_000_000)
    fig = achieved(cost, 1.0, {"copy_GBps": 6.0, "matmul_TFLOPs": 4.0}, "memory")
    assert fig["GBps"] == pytest.approx(3.0) and fig["TFLOPs"] == pytest.approx(2.0)
    assert fig["pct_of_floor"] == pytest.approx(50.0)
    fig = achieved(cost, 1.0, {"copy_GBps": 6.0, "matmul_TFLOPs": 4.0}, "compute")
    assert fig["pct_of_floor"] == pytest.approx(50.0)
    assert "pct_of_floor" not in achieved(cost, 1.0, None, "memory")
    with pytest.raises(ValueError):
        achieved(cost, 1.0, None, "latency")


# ------------------------------------------------------------------------------ profile

def test_profile_grouping_rule_on_made_up_names():
    from maskdit_fast.bench.step_profile import group_of
    expected = {
        "optimizer": ["void at::native::multi_tensor_apply_kernel<FusedOptimizerTensorListMetadata<4>, "
                      "FusedAdamMathFunctor<float, 4>>", "Optimizer.step#AdamW.step", "aten::_foreach_add_"],
        "glue": ["gather_fwd_kernel", "_gather_bwd_kernel", "scatter_fwd_kernel", "ln_mod_bwd_kernel", "gated_fwd_kernel",
                 "_ln_modulate_fwd_kernel", "void at::native::index_elementwise_kernel<128, 4>", "aten::index"],
        "attention": ["pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 64>>", "_fwd_kernel",
                      "_bwd_dkdv_kernel", "fmha_cutlassF_bf16_aligned_64x64_rf_sm80",
                      "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3",
                      "autograd::engine::evaluate_function: ScaledDotProductFlashAttentionForCpuBackward0"],
        "gemm": ["sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64", "nvjet_tst_192x192_64x4_2x1_v_bz_TNT",
                 "cutlass3x_sm90_tensorop_gemm_bf16", "triton_tem_fused_mm_0", "aten::mm", "aten::linear",
                 "autograd::engine::evaluate_function: AddmmBackward0", "autograd::engine::evaluate_function: MmBackward0"],
        "elementwise/norm": ["void at::native::vectorized_elementwise_kernel<4, GeluCUDAKernelImpl>",
                             "void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<float>",
                             "triton_poi_fused_add_mul_0", "triton_red_fused_native_layer_norm_1",
                             "Memcpy DtoD (Device -> Device)", "aten::layer_norm"],
        "other": ["some_kernel_nobody_named"],
    }
    for group, names in expected.items():
        for name in names:
            assert group_of(name) == group, name


def test_profile_breakdown_counts_overlaps_and_idle_gaps():
    from maskdit_fast.bench.step_profile import GROUPS, breakdown, union_us
    assert union_us([(0, 30), (20, 40), (50, 60), (55, 58)]) == 50
    events = [("aten::mm", 0, 30), ("sm90_xmma_gemm", 20, 40), ("flash_fwd_kernel", 50, 60),
              ("mystery", 90, 120), ("aten::mm", 200, 300)]
    out = breakdown(events, (0, 100))
    assert set(out) == set(GROUPS)
    assert out["gemm"] == 50 and out["attention"] == 10 and out["other"] == 10  # "mystery" clipped to the window
    assert out["idle"] == 100 - 60 and out["optimizer"] == out["glue"] == 0


def test_gemm_flops_of_a_train_step_match_torch_flop_counter():
    """gemm_train_flops (flops.py's convention) against the matmul / convolution FLOPs torch counts
    in one tiny train step: within 1 %, the formula above (it also counts the input gradients of the
    patch embedding and time MLP, which autograd skips)."""
    from torch.utils.flop_counter import FlopCounterMode

    from maskdit_fast.bench.step_profile import gemm_train_flops
    from maskdit_fast.bench.train_step import build_train_step
    cfg = bench.make_config("cpu-quick", "cpu")
    for variant in bench.train_variants(cfg)[2:4]:  # MaskDiT reference, DiT
        step, model, _ = build_train_step(variant, 4, 16, "cpu", torch.float32)
        with FlopCounterMode(display=False) as counter:
            step()
        counted = sum(v for op, v in counter.get_flop_counts()["Global"].items()
                      if str(op).split(".")[-1] in ("mm", "addmm", "bmm", "convolution", "convolution_backward"))
        expected = gemm_train_flops(model, 4, variant.mask_ratio)
        assert 0.99 * expected <= counted <= expected, (variant.label, counted, expected)


def test_profile_section_on_the_cpu():
    cfg = bench.make_config("cpu-quick", "cpu")
    prof = bench.run_profile(cfg, {"matmul_TFLOPs": 1.0})
    assert prof["variant"] == "MaskDiT-S/2 reference" and prof["events"] == "outermost CPU ops"  # no fused ops here
    shares = {g["group"]: g["share"] for g in prof["groups"]}
    assert set(shares) == {"optimizer", "glue", "attention", "gemm", "elementwise/norm", "other", "idle"}
    for group in ("gemm", "attention", "optimizer", "elementwise/norm", "glue"):
        assert shares[group] > 0, group
    assert sum(shares.values()) == pytest.approx(1.0, abs=1e-6)  # one thread: the groups and gaps tile the step
    assert prof["step_ms"] > 0 and prof["gemm_TFLOPs"] > 0 and prof["gemm_pct_of_peak"] > 0
    assert [r["group"] for r in prof["rule"]] == ["optimizer", "glue", "attention", "gemm", "elementwise/norm"]
