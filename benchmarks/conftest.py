"""pytest-benchmark set-up: `pytest benchmarks/ --benchmark-only`.

On a GPU the cases run at DiT-XL/2 shapes in bf16 (`maskdit_fast.bench` mode "gpu"); on the CPU at
small fp32 shapes (mode "cpu"). TRITON_INTERPRET is deliberately NOT set: interpreter timings are
meaningless, so Triton / CUDA / SDPA-kernel back-ends skip on the CPU with the reason. Every timed
op is first checked against its reference; a failing back-end fails its test and is not timed.
"""
import os

import pytest
import torch

from maskdit_fast import bench
from maskdit_fast.bench.costs import achieved
from maskdit_fast.bench.timing import Stats, Timer

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cpu":
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def device():
    return DEVICE


@pytest.fixture(scope="session")
def cfg():
    """The report's configuration for this device (shapes, repetitions, train-step variants)."""
    return bench.make_config("gpu" if DEVICE.type == "cuda" else "cpu", DEVICE)


@pytest.fixture(scope="session")
def peaks(cfg):
    """Copy bandwidth and matmul peak, measured once per session (the floors of "% of floor")."""
    return bench.run_peaks(cfg)


@pytest.fixture
def timed(benchmark, device):
    """timed(call, warmup, reps, figures=None, **info) -> Stats.

    Runs call() under benchmark.pedantic, timing each call with device events (GPU) or
    perf_counter (CPU) and synchronizing after it, so pytest-benchmark's own (wall-clock) stats
    stay meaningful. benchmark.extra_info gets the device-timed median/p10/p90 (ms), `info`, and
    figures(median_ms) (e.g. GB/s and % of floor).
    """

    def run(call, warmup, reps, figures=None, **info):
        timer = Timer(device)

        def target():
            timer(call)
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        benchmark.pedantic(target, rounds=reps, warmup_rounds=warmup, iterations=1)
        stats = Stats.from_times(timer.times_ms()[warmup:])
        benchmark.extra_info.update(device=str(device), median_ms=stats.median_ms, p10_ms=stats.p10_ms,
                                    p90_ms=stats.p90_ms, **info, **(figures(stats.median_ms) if figures else {}))
        return stats

    return run


@pytest.fixture
def op_benchmark(cfg, peaks, timed):
    """op_benchmark(case, backend, pass_): skip if the back-end cannot run here, check it against the
    reference (the test fails if it is wrong; it is then not timed), time it on rotating inputs and
    record GB/s or TFLOP/s and % of floor in extra_info."""

    def run(case, backend, pass_):
        if backend not in case.backends:
            pytest.skip(f"{case.name} has no {backend} back-end")
        if backend == "compile" and not cfg.compile:
            pytest.skip(f"torch.compile off in mode {cfg.mode}")
        try:
            fn = bench.backend_fn(case, backend, cfg.device)
            verdict = bench.check_case(case, fn, cfg.device, cfg.dtype)
        except bench.Unavailable as err:
            pytest.skip(str(err))
        err, tol, passed = verdict[pass_]
        assert passed, f"{case.name}/{backend}/{pass_}: max error {err:.3g} > tolerance {tol:.3g}; not timed"
        rotation = bench.Rotation(bench.pass_call(fn, pass_, case.grad_argnums), bench.input_sets(case, cfg))
        return timed(rotation, cfg.warmup, cfg.reps,
                     figures=lambda ms: achieved(bench.pass_cost(case, pass_), ms, peaks, case.bound),
                     op=case.name, shape=case.shape, backend=backend, max_err=err, tol=tol)

    return run
