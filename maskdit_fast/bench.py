"""One-command benchmark report: `python -m maskdit_fast.bench [--out DIR] [--quick] [--cpu-quick]`.

On a GPU (must finish in < 8 minutes on one H100; every section has a time budget and reports what
it had to skip):
  1. peaks: device copy bandwidth and bf16 matmul peak, measured in this process;
  2. checks: every op x back-end against its reference (outputs and gradients, maskdit_fast.accuracy's
     rule). A back-end that fails its check is reported, never timed (the XL-size kernel checks are the
     GPU tests, tests/test_*_gpu.py, which benchmarks/gpu_session.sh runs before the report);
  3. ops / attention: each op on each back-end, forward and forward+backward, at DiT-XL/2 shapes
     (bf16), with achieved GB/s or TFLOP/s, % of the floor and the speed-up over torch eager;
  4. train_step: MaskDiT-XL/2 (fused back-end) vs MaskDiT-XL/2 (pure PyTorch reference) vs DiT-XL/2
     at 256 px (4x32x32 latents), bf16 autocast, AdamW, batch as large as fits: images/s, MFU,
     peak memory;
  5. cpu_figure: MaskDiT vs DiT train-step time at mask ratio 0.5 on the CPU (pure PyTorch, small
     config), measured on every run.
Then writes `<out>/<date>-<card>.json` and `.md`. Without a GPU it runs the CPU subset (torch
back-ends at small shapes, the CPU figure) and says so; `--cpu-quick` is a seconds-long CPU run
with tiny shapes (the tests use it).
"""
import argparse
import dataclasses
import datetime
import functools
import gc
import importlib
import inspect
import json
import math
import os
import re
import sys
import time

import torch

from maskdit_fast import accuracy, ops
from maskdit_fast.bench_utils import (Rotation, Stats, Timer, achieved, attention_cost, cache_bytes, env_info,
                                      gated_residual_cost, gather_tokens_cost, layernorm_modulate_cost,
                                      measure_copy_bandwidth, measure_matmul_peak, rotation_count,
                                      scatter_tokens_cost, time_calls, time_graph_replays, varlen_attention_cost)
from maskdit_fast.flops import train_step_flops
from maskdit_fast.masking import cu_seqlens_from_counts, random_packed_ids
from maskdit_fast.metrics import default_peak_flops, peak_memory_gib

SCHEMA = 1
PASSES = ("fwd", "fwd+bwd")
BASELINE_BACKEND = "torch"
# Back-ends whose timings mean nothing (Triton interpreter) or that cannot run without a GPU.
GPU_ONLY_BACKENDS = ("triton", "cuda", "flash_attn", "xformers", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient",
                     "torch_varlen")
# In priority order: a spent section budget drops the last ones first.
OP_BACKENDS = ("torch", "triton", "cuda", "compile")
VARLEN_OP_BACKENDS = ("torch", "triton", "compile")  # the CUDA extension has no varlen gather/scatter
# ("cuda" has no attention kernel of its own: it runs "triton".)
ATTENTION_BACKENDS = ("torch", "triton", "sdpa_flash", "sdpa_cudnn", "torch_varlen", "flash_attn", "xformers",
                      "sdpa_efficient")
# "torch" is torch's varlen_attn on CUDA (bf16/fp16), SDPA per sequence elsewhere.
VARLEN_ATTENTION_BACKENDS = ("torch", "triton", "flash_attn", "xformers")
# Check modules: (module, entry point); entry(device) returns check rows (name, max_err, tol, passed) / dicts
# with max_err and ok|passed, or timing dicts. None now: the kernel workers' XL-size checks became GPU tests.
EXTERNAL_CHECKS = ()
EXTERNAL_TIMINGS = ()


# ------------------------------------------------------------------------------------ configs

@dataclasses.dataclass
class Config:
    """Sizes, repetitions and per-section time budgets (seconds) of one report run."""
    mode: str
    device: str
    dtype: torch.dtype
    # op shapes: batch, tokens, kept tokens, encoder width / heads, decoder width / heads
    B: int
    L: int
    K: int
    D: int
    H: int
    Dd: int
    Hd: int
    warmup: int
    reps: int
    compile: bool                 # include the torch.compile'd reference
    copy_bytes: int
    matmul_n: int
    train_size: str               # preset size of the train-step variants, e.g. "XL/2"
    train_overrides: dict         # model overrides (input_size, depth, ...) for them
    train_warmup: int
    train_reps: int
    max_batch: int
    fixed_batch: int              # used where no CUDA memory probe exists (CPU)
    cpu_figure: dict              # preset, overrides, batch, warm-up and repetitions of the CPU figure
    budgets: dict
    sections: tuple               # sections run by default
    external_timings: bool = False  # also run the check modules' own timings (EXTERNAL_TIMINGS)


SECTIONS = ("peaks", "checks", "ops", "attention", "train_step", "cpu_figure")
XL = dict(B=128, L=256, K=128, D=1152, H=16, Dd=512, Hd=16)
CPU_SMALL = dict(B=8, L=64, K=32, D=128, H=4, Dd=64, Hd=4)
CPU_TINY = dict(B=2, L=16, K=8, D=32, H=2, Dd=32, Hd=2)  # head dims 16: the Triton minimum
# Item 3 of the benchmark issue: S width (384, 6 heads) at 32x32 latents, patch 2 (256 tokens),
# depth 4 with a 1-block decoder (160 wide: 4.3 % of the encoder's cost per token, the S/2 preset's
# 5.8 %), batch 4: ~45 GFLOP per DiT step, about a second on two cores.
CPU_FIGURE = dict(preset="S/2", overrides=dict(input_size=32, depth=4, decoder_depth=1, num_classes=10),
                  batch=4, warmup=1, reps=5)
CPU_FIGURE_TINY = dict(preset="S/2", overrides=dict(input_size=16, depth=2, decoder_depth=1, hidden_size=64,
                                                    num_heads=2, decoder_hidden_size=32, decoder_num_heads=2,
                                                    num_classes=10), batch=4, warmup=1, reps=3)
# (label suffix, model kind, back-end, mask ratio); "auto" is the fused back-end on a GPU (the CUDA
# extension's glue ops + SDPA), "triton" the package's Triton kernels throughout.
TRAIN_VARIANTS = (("fused", "MaskDiT", "auto", 0.5), ("triton", "MaskDiT", "triton", 0.5),
                  ("reference", "MaskDiT", "torch", 0.5), ("", "DiT", "torch", 0.0))


def train_variants(cfg):
    """[(label, preset, overrides, backend, mask_ratio)] of the train-step section; the baseline is
    the pure-PyTorch MaskDiT (the official implementation's math), `train_baseline(cfg)`."""
    return [(f"{kind}-{cfg.train_size} {suffix}".strip(), f"{kind}-{cfg.train_size}", cfg.train_overrides,
             backend, ratio) for suffix, kind, backend, ratio in TRAIN_VARIANTS]


def train_baseline(cfg):
    """Label of the train-step row the others are compared with (the pure-PyTorch MaskDiT)."""
    return f"MaskDiT-{cfg.train_size} reference"


def make_config(mode, device):
    """Config for mode "gpu" | "gpu-quick" | "cpu" | "cpu-quick" on `device`."""
    device = str(device)
    if mode in ("gpu", "gpu-quick"):
        quick = mode == "gpu-quick"
        return Config(mode, device, torch.bfloat16, **XL, warmup=5 if quick else 10, reps=20 if quick else 50,
                      compile=not quick, copy_bytes=1 << 30, matmul_n=8192, train_size="XL/2",
                      train_overrides=dict(input_size=32), train_warmup=2 if quick else 3,
                      train_reps=4 if quick else 10, max_batch=512, fixed_batch=0, cpu_figure=CPU_FIGURE,
                      budgets=dict(peaks=15, checks=45, ops=70 if quick else 100, attention=30 if quick else 45,
                                   train_step=120 if quick else 150, cpu_figure=30), sections=SECTIONS,
                      external_timings=not quick)
    if mode == "cpu":
        # The train-step section would repeat the CPU figure (same models): not run by default.
        return Config(mode, device, torch.float32, **CPU_SMALL, warmup=3, reps=30, compile=True,
                      copy_bytes=64 << 20, matmul_n=512, train_size=CPU_FIGURE["preset"],
                      train_overrides=CPU_FIGURE["overrides"], train_warmup=1, train_reps=3,
                      max_batch=CPU_FIGURE["batch"], fixed_batch=CPU_FIGURE["batch"], cpu_figure=CPU_FIGURE,
                      budgets=dict(peaks=20, checks=60, ops=120, attention=30, train_step=60, cpu_figure=90),
                      sections=tuple(s for s in SECTIONS if s != "train_step"))
    if mode == "cpu-quick":
        return Config(mode, device, torch.float32, **CPU_TINY, warmup=1, reps=3, compile=False,
                      copy_bytes=1 << 20, matmul_n=64, train_size=CPU_FIGURE_TINY["preset"],
                      train_overrides=CPU_FIGURE_TINY["overrides"], train_warmup=1, train_reps=2, max_batch=4,
                      fixed_batch=4, cpu_figure=CPU_FIGURE_TINY,
                      budgets=dict(peaks=10, checks=20, ops=20, attention=20, train_step=30, cpu_figure=30),
                      sections=SECTIONS)
    raise ValueError(f"unknown mode {mode!r}; expected gpu, gpu-quick, cpu or cpu-quick")


class Budget:
    """A section's deadline: `spent()` turns true once `seconds` have passed since creation."""

    def __init__(self, seconds):
        self.seconds = seconds
        self.start = time.monotonic()

    def spent(self):
        """True once the budget's seconds have passed."""
        return time.monotonic() - self.start > self.seconds

    def elapsed(self):
        """Seconds since the budget started."""
        return time.monotonic() - self.start


# ------------------------------------------------------------------------------------ op cases

@dataclasses.dataclass(frozen=True)
class OpCase:
    """One op at one shape: its inputs, the public op and its reference, and its cost.

    make_args(device, dtype, generator) -> tuple of positional args; grad_argnums index the args
    that get gradients; op(*args, backend=name) and ref(*args) take the same args.
    """
    name: str
    shape: str
    op: object
    ref: object
    make_args: object
    grad_argnums: tuple
    cost: tuple           # (fwd Cost, bwd Cost)
    bound: str            # "memory" or "compute"
    backends: tuple


def _randn(shape, device, dtype, gen, requires_grad=False, scale=1.0):
    t = torch.randn(shape, device=device, dtype=torch.float32, generator=gen) * scale
    return t.to(dtype).requires_grad_(requires_grad)


def _ids_keep(B, L, K, device, gen):
    """[B, K] int64 random kept positions (distinct per row), like MaskDiT's masking."""
    return torch.rand(B, L, device=device, generator=gen).argsort(dim=1)[:, :K].contiguous()


def _varlen_layout(B, L, K, seed=0):
    """Per-sample keep counts around K (in [K/2, 3K/2], paired so that they sum to B*K: the cost
    equals the dense layout's), on the CPU and fixed for a config."""
    gen = torch.Generator().manual_seed(seed)
    half = torch.randint(-(K // 2), K // 2 + 1, (B // 2,), generator=gen)
    delta = torch.cat([half, -half, torch.zeros(B % 2, dtype=half.dtype)])
    return (K + delta).clamp(0, L)


def _packed_ids(counts, L, device, gen):
    """ids_packed [T] int64 (random kept positions, sample by sample) and cu_seqlens [B+1] int32."""
    counts = counts.to(device)
    return random_packed_ids(counts, L, gen), cu_seqlens_from_counts(counts)


def op_cases(cfg):
    """The op benchmark cases at the config's shapes: MaskDiT's glue between the matmuls (encoder
    width D on K kept tokens, decoder width Dd on all L tokens), dense and varlen (packed) layouts."""
    B, L, K, D, Dd = cfg.B, cfg.L, cfg.K, cfg.D, cfg.Dd
    elem = torch.empty((), dtype=cfg.dtype).element_size()
    counts = _varlen_layout(B, L, K)
    T = int(counts.sum())

    def gather_args(dev, dt, g):
        return (_randn((B, L, D), dev, dt, g, True), _ids_keep(B, L, K, dev, g), _randn((L, D), dev, dt, g))

    def scatter_args(dev, dt, g):
        return (_randn((B, K, Dd), dev, dt, g, True), _ids_keep(B, L, K, dev, g),
                _randn((Dd,), dev, dt, g, True, 0.02), L, _randn((L, Dd), dev, dt, g))

    def gather_varlen_args(dev, dt, g):
        return (_randn((B, L, D), dev, dt, g, True), *_packed_ids(counts, L, dev, g), _randn((L, D), dev, dt, g))

    def scatter_varlen_args(dev, dt, g):
        return (_randn((T, Dd), dev, dt, g, True), *_packed_ids(counts, L, dev, g),
                _randn((Dd,), dev, dt, g, True, 0.02), L, _randn((L, Dd), dev, dt, g))

    def modulate_args(dev, dt, g):
        return (_randn((B, K, D), dev, dt, g, True), _randn((B, D), dev, dt, g, True, 0.1),
                _randn((B, D), dev, dt, g, True, 0.1))

    def residual_args(dev, dt, g):
        return (_randn((B, K, D), dev, dt, g, True), _randn((B, K, D), dev, dt, g, True),
                _randn((B, D), dev, dt, g, True, 0.1))

    varlen = f"T={T} ({K}+-{K // 2} per sample)"
    return [
        OpCase("gather_tokens", f"[{B},{L},{D}] -> [{B},{K},{D}] +pos", ops.gather_tokens, ops.gather_tokens_ref,
               gather_args, (0,), gather_tokens_cost(B, L, K, D, elem), "memory", OP_BACKENDS),
        OpCase("scatter_tokens", f"[{B},{K},{Dd}] -> [{B},{L},{Dd}] +mask +pos", ops.scatter_tokens,
               ops.scatter_tokens_ref, scatter_args, (0, 2), scatter_tokens_cost(B, L, K, Dd, elem), "memory",
               OP_BACKENDS),
        OpCase("gather_tokens_varlen", f"[{B},{L},{D}] -> [{T},{D}] +pos, {varlen}", ops.gather_tokens_varlen,
               ops.gather_tokens_varlen_ref, gather_varlen_args, (0,), gather_tokens_cost(B, L, K, D, elem),
               "memory", VARLEN_OP_BACKENDS),
        OpCase("scatter_tokens_varlen", f"[{T},{Dd}] -> [{B},{L},{Dd}] +mask +pos, {varlen}",
               ops.scatter_tokens_varlen, ops.scatter_tokens_varlen_ref, scatter_varlen_args, (0, 3),
               scatter_tokens_cost(B, L, K, Dd, elem), "memory", VARLEN_OP_BACKENDS),
        OpCase("layernorm_modulate", f"[{B},{K},{D}]", ops.layernorm_modulate, ops.layernorm_modulate_ref,
               modulate_args, (0, 1, 2), layernorm_modulate_cost(B, K, D, elem), "memory", OP_BACKENDS),
        OpCase("gated_residual", f"[{B},{K},{D}]", ops.gated_residual, ops.gated_residual_ref, residual_args,
               (0, 1, 2), gated_residual_cost(B, K, D, elem), "memory", OP_BACKENDS),
    ]


def _varlen_attention_ref(q, k, v, cu_q, cu_k, max_q, max_k):
    """varlen_attention's reference in the inputs' dtype (the op's positional signature)."""
    return ops.varlen_attention_ref(q, k, v, cu_q, cu_k, compute_dtype=q.dtype)[0]


def attention_cases(cfg):
    """Attention at MaskDiT/DiT shapes: the encoder on the kept tokens, the decoder and DiT on all
    tokens (q, k, v are views of one [B, L, 3, H, Dh] tensor, as the qkv Linear gives them), and
    varlen attention over per-sample keep counts around K."""
    elem = torch.empty((), dtype=cfg.dtype).element_size()
    cases = []
    for label, n, heads, width in (("encoder", cfg.K, cfg.H, cfg.D), ("decoder", cfg.L, cfg.Hd, cfg.Dd),
                                   ("dit", cfg.L, cfg.H, cfg.D)):
        dh = width // heads

        def args(dev, dt, g, n=n, heads=heads, dh=dh):
            return _randn((cfg.B, n, 3, heads, dh), dev, dt, g, True).unbind(2)

        cases.append(OpCase(f"attention[{label}]", f"B={cfg.B} L={n} H={heads} Dh={dh}", ops.attention,
                            ops.attention_ref, args, (0, 1, 2), attention_cost(cfg.B, heads, n, n, dh, elem),
                            "compute", ATTENTION_BACKENDS))
    counts = _varlen_layout(cfg.B, cfg.L, cfg.K)
    T, max_len, dh = int(counts.sum()), int(counts.max()), cfg.D // cfg.H

    def varlen_args(dev, dt, g):
        _, cu = _packed_ids(counts, cfg.L, dev, g)
        q, k, v = _randn((T, 3, cfg.H, dh), dev, dt, g, True).unbind(1)
        return q, k, v, cu, cu, max_len, max_len

    cases.append(OpCase("varlen_attention[encoder]", f"T={T} ({cfg.K}+-{cfg.K // 2} per sample) H={cfg.H} Dh={dh}",
                        ops.varlen_attention, _varlen_attention_ref, varlen_args, (0, 1, 2),
                        varlen_attention_cost(counts.tolist(), counts.tolist(), cfg.H, dh, elem), "compute",
                        VARLEN_ATTENTION_BACKENDS))
    return cases


# ------------------------------------------------------------------------------------ back-ends

class Unavailable(Exception):
    """A back-end that cannot run here (reported as a skipped row, not a failure)."""


def _sdpa_with(kernel_name):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    kernel = getattr(SDPBackend, kernel_name)

    def run(q, k, v):
        with sdpa_kernel([kernel]):
            return ops.attention_ref(q, k, v)
    return run


@functools.lru_cache(maxsize=None)
def _cu_seqlens(batch, length, device):
    return torch.arange(0, (batch + 1) * length, length, dtype=torch.int32, device=device)


def _torch_varlen(q, k, v):
    """Dense attention through torch.nn.attention.varlen.varlen_attn on equal-length sequences."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError as err:
        raise Unavailable(f"torch.nn.attention.varlen not in torch {torch.__version__}") from err
    B, L, H, Dh = q.shape
    cu = _cu_seqlens(B, L, str(q.device))
    out = varlen_attn(q.reshape(B * L, H, Dh), k.reshape(B * L, H, Dh), v.reshape(B * L, H, Dh), cu, cu, L, L)
    return out.reshape(B, L, H, Dh)


_COMPILED = {}


def backend_fn(case, backend, device):
    """Callable(*args) running `case` on `backend`; raises Unavailable when it cannot run on `device`."""
    device = torch.device(device)
    if backend in GPU_ONLY_BACKENDS and device.type != "cuda":
        raise Unavailable("needs a CUDA GPU (Triton-interpreter / CPU timings are meaningless)")
    if backend == "compile":
        if case.ref not in _COMPILED:
            _COMPILED[case.ref] = torch.compile(case.ref, dynamic=False)
        return _COMPILED[case.ref]
    if backend.startswith("sdpa_"):
        return _sdpa_with({"sdpa_flash": "FLASH_ATTENTION", "sdpa_cudnn": "CUDNN_ATTENTION",
                           "sdpa_efficient": "EFFICIENT_ATTENTION"}[backend])
    if backend == "torch_varlen":
        return _torch_varlen
    if "validate" in inspect.signature(case.op).parameters:  # index checks sync with the host: off
        return functools.partial(case.op, backend=backend, validate=False)
    return functools.partial(case.op, backend=backend)


def _call(fn, args):
    """Runs fn(*args), mapping "cannot run here" errors to Unavailable."""
    try:
        return fn(*args)
    except NotImplementedError as err:
        raise Unavailable(f"not implemented: {err}") from err
    except (RuntimeError, ValueError) as err:
        msg = str(err)
        # The back-end switch's and the kernels' "cannot run here" messages; anything else is a failure.
        if re.search(r"backend .{0,24}(requested|unavailable|needs|not implement)|No available kernel|"
                     r"not supported|supports head_dim|not installed|not loadable", msg, re.I):
            raise Unavailable(msg.splitlines()[0][:200]) from err
        raise


# ------------------------------------------------------------------------------------ checks

def _grads(out, args, argnums, grad_out):
    leaves = [args[i] for i in argnums]
    return torch.autograd.grad(out, leaves, grad_out)


def _upcast(args):
    return tuple(a.detach().double().requires_grad_(a.requires_grad)
                 if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def _compare(got, exact, ref):
    """(max error of got, tolerance): maskdit_fast.accuracy's rule, ref being the reference run in got's dtype."""
    return accuracy.compare(got, exact, ref)


def check_case(case, fn, device, dtype, seed=0):
    """Checks `fn` against case.ref: forward output, then gradients of the grad_argnums args.

    The exact answer is the reference in fp64; the reference in `dtype` sets the tolerance
    (see _compare). Returns {"fwd": (max_err, tol, passed), "fwd+bwd": (...)}, "fwd+bwd" covering the
    output and every gradient (the worst err/tol ratio). Raises Unavailable if fn cannot run here.
    """
    gen = torch.Generator(device).manual_seed(seed)
    args = case.make_args(device, dtype, gen)
    exact_args = _upcast(args)
    exact = case.ref(*exact_args)
    grad_out = torch.randn(exact.shape, device=device, generator=gen).to(dtype)
    exact_grads = _grads(exact, exact_args, case.grad_argnums, grad_out.double())
    ref_out = case.ref(*args)
    ref_grads = _grads(ref_out, args, case.grad_argnums, grad_out)
    out = _call(fn, args)
    if out.shape != exact.shape or out.dtype != ref_out.dtype:
        return {p: (float("inf"), 0.0, False) for p in PASSES}
    fwd = _compare(out, exact, ref_out)
    try:
        grads = _grads(out, args, case.grad_argnums, grad_out)
    except NotImplementedError:
        return {"fwd": (*fwd, fwd[0] <= fwd[1]), "fwd+bwd": (float("nan"), 0.0, False)}
    worst = fwd
    for g, e, r in zip(grads, exact_grads, ref_grads):
        if g is None or g.shape != e.shape:
            worst = (float("inf"), 0.0)
            break
        cmp = _compare(g, e, r)
        if cmp[0] / cmp[1] > worst[0] / worst[1]:
            worst = cmp
    return {"fwd": (*fwd, fwd[0] <= fwd[1]), "fwd+bwd": (*worst, worst[0] <= worst[1])}


def _normalise_row(source, row):
    """A check module's row as a report row: check rows get status ok / FAILED, others "info"."""
    if isinstance(row, dict):
        passed = row.get("ok", row.get("passed"))
        if passed is None or "max_err" not in row:
            return dict(source=source, status="info", **row)
        name, err, tol = row.get("name"), row["max_err"], row.get("tol", row.get("tolerance"))
    else:
        name, err, tol, passed = row
    return dict(source=source, name=name, max_err=float(err), tol=None if tol is None else float(tol),
                passed=bool(passed), status="ok" if passed else "FAILED")


def module_check_rows(name, device, entry="run_checks"):
    """Rows from one check module's `entry(device)` (see EXTERNAL_CHECKS). A missing module, a
    missing entry point or a crash becomes one clear row instead of ending the report."""
    source = f"{name}.{entry}"
    try:
        module = importlib.import_module(name)
    except ImportError as err:
        return [dict(source=source, name=name, status="not available", reason=str(err)[:200])]
    runner = getattr(module, entry, None)
    if runner is None:
        return [dict(source=source, name=name, status="not available", reason=f"module has no {entry}(device)")]
    rows = []
    try:
        for row in runner(device):
            rows.append(_normalise_row(source, row))
    except Exception as err:  # noqa: BLE001 - one broken module must not end the report
        rows.append(dict(source=source, name=name, status="error", reason=f"{type(err).__name__}: {err}"[:300]))
    return rows


def external_checks(device, entries=EXTERNAL_CHECKS):
    """Rows of the kernel workers' GPU check modules; skipped off CUDA."""
    if torch.device(device).type != "cuda":
        return [dict(source=f"{name}.{entry}", name=name, status="skipped", reason="needs a CUDA GPU")
                for name, entry in entries]
    return [row for name, entry in entries for row in module_check_rows(name, device, entry)]


# ------------------------------------------------------------------------------------ sections

def run_peaks(cfg, timer_factory=Timer):
    """Copy bandwidth (GB/s, read + written) and matmul peak (TFLOP/s) on cfg.device."""
    copy = measure_copy_bandwidth(cfg.device, cfg.copy_bytes, timer=timer_factory(cfg.device))
    matmul = measure_matmul_peak(cfg.device, cfg.matmul_n, cfg.dtype, timer=timer_factory(cfg.device))
    return {"copy_GBps": copy["GBps"], "matmul_TFLOPs": matmul["TFLOPs"], "copy": copy, "matmul": matmul}


def input_sets(case, cfg, seed=1):
    """Rotating input sets for timing `case`: [(args, grad_out), ...], enough sets that together they
    exceed twice the device's L2 (one set on CPU)."""
    gen = torch.Generator(cfg.device).manual_seed(seed)
    sets, n = [], 1
    while len(sets) < n:
        args = case.make_args(cfg.device, cfg.dtype, gen)
        with torch.no_grad():
            shape = case.ref(*args).shape
        grad_out = torch.randn(shape, device=cfg.device, generator=gen).to(cfg.dtype)
        sets.append((args, grad_out))
        if len(sets) == 1:
            nbytes = sum(t.numel() * t.element_size() for t in (*args, grad_out) if torch.is_tensor(t))
            n = rotation_count(nbytes, cache_bytes(cfg.device))
    return sets


def pass_call(fn, pass_, grad_argnums):
    """Callable(args, grad_out) for one timed pass: "fwd" (no autograd graph) or "fwd+bwd"
    (forward, then the gradients of the grad_argnums args for grad_out; no .grad accumulation)."""
    if pass_ not in PASSES:
        raise ValueError(f"pass must be one of {PASSES}, got {pass_!r}")
    if pass_ == "fwd":
        def run(args, grad_out):
            with torch.no_grad():
                return fn(*args)
    else:
        def run(args, grad_out):
            return _grads(fn(*args), args, grad_argnums, grad_out)
    return run


def pass_cost(case, pass_):
    """Cost of one call of `pass_` ("fwd+bwd" = forward + backward)."""
    return case.cost[0] if pass_ == "fwd" else case.cost[0] + case.cost[1]


def _graph_timing(run, sets, cfg, timer_factory):
    """{"graph_ms": device time per call from CUDA-graph replays} (see time_graph_replays), or
    {"graph_reason": why the calls could not be captured}."""
    try:
        stats = time_graph_replays(Rotation(run, sets), len(sets), cfg.device, reps=cfg.reps,
                                   timer=timer_factory(cfg.device))
    except Exception as err:  # noqa: BLE001 - e.g. an op that synchronizes: the eager figure stands
        return dict(graph_reason=f"{type(err).__name__}: {err}"[:200])
    return dict(graph_ms=stats.median_ms)


def run_op_section(cases, cfg, budget, peaks, timer_factory=Timer, check_rows=None):
    """Checks, then times, every case x back-end x pass. Returns result rows (dicts), in case order.

    Back-ends go in priority order across all cases (torch eager first: it is the baseline of
    `vs_baseline`, the speed-up; torch.compile last: its compile time is the first thing a spent
    budget drops). A back-end is timed only after its check passed at the same shape; the check
    rows are appended to `check_rows`.
    """
    rows, sets, baseline = [], {}, {}
    order = list(dict.fromkeys(b for case in cases for b in case.backends))
    for backend in order:
        for case in (c for c in cases if backend in c.backends):
            base = dict(op=case.name, shape=case.shape, backend=backend, dtype=str(cfg.dtype).replace("torch.", ""))
            skip = None
            if backend == "compile" and not cfg.compile:
                skip = ("skipped", f"torch.compile off in mode {cfg.mode}")
            elif budget.spent():
                skip = ("skipped", f"section budget {budget.seconds}s spent")
            else:
                try:
                    fn = backend_fn(case, backend, cfg.device)
                    verdict = check_case(case, fn, cfg.device, cfg.dtype)
                except Unavailable as err:
                    skip = ("unavailable", str(err))
                except Exception as err:  # noqa: BLE001 - a crashing kernel is a failed check, not a crash
                    verdict = {p: (float("nan"), 0.0, False) for p in PASSES}
                    base["reason"] = f"{type(err).__name__}: {err}"[:300]
            if skip:
                rows += [dict(base, **{"pass": p}, status=skip[0], reason=skip[1]) for p in PASSES]
                continue
            for p in PASSES:
                err, tol, passed = verdict[p]
                if check_rows is not None:
                    check_rows.append(dict(source="bench", name=f"{case.name}/{backend}/{p}", max_err=err, tol=tol,
                                           passed=passed, status="ok" if passed else "FAILED"))
                row = dict(base, **{"pass": p}, max_err=err, tol=tol)
                if not passed:
                    rows.append(dict(row, status="failed check"))
                    continue
                if case.name not in sets:
                    sets[case.name] = input_sets(case, cfg)
                try:
                    stats = time_calls(Rotation(pass_call(fn, p, case.grad_argnums), sets[case.name]), cfg.device,
                                       cfg.warmup, cfg.reps, timer_factory(cfg.device))
                except Exception as err:  # noqa: BLE001 - e.g. out of memory: reported, the report goes on
                    rows.append(dict(row, status="error", reason=f"{type(err).__name__}: {err}"[:300]))
                    continue
                row.update(status="ok", p10_ms=stats.p10_ms, p90_ms=stats.p90_ms, n=stats.n,
                           **achieved(pass_cost(case, p), stats.median_ms, peaks, case.bound))
                if torch.device(cfg.device).type == "cuda":
                    row.update(_graph_timing(pass_call(fn, p, case.grad_argnums), sets[case.name], cfg,
                                             timer_factory))
                if backend == BASELINE_BACKEND:
                    baseline[case.name, p] = stats.median_ms
                if (case.name, p) in baseline:
                    row["vs_baseline"] = baseline[case.name, p] / stats.median_ms
                rows.append(row)
    names = [c.name for c in cases]
    rows.sort(key=lambda r: (names.index(r["op"]), order.index(r["backend"]), PASSES.index(r["pass"])))
    return rows


# ------------------------------------------------------------------------------------ train step

def build_train_step(preset, overrides, backend, mask_ratio, batch, device, amp_dtype, seed=0):
    """A closure doing one MaskDiT training step (EDM loss, backward, AdamW) on random latents.

    Returns (step, model): step() runs forward + backward + optimizer step on a fixed [batch, C, H, W]
    latent batch and labels. amp_dtype: autocast dtype (None = fp32).
    """
    from maskdit_fast.diffusion import EDMPrecond, MaskDiTLoss
    from maskdit_fast.models import create_model

    device = torch.device(device)
    torch.manual_seed(seed)
    with device:  # initialise on the device: an XL model's init on the CPU takes many seconds
        model = create_model(preset, backend=backend, check_inputs=False, **overrides).to(device)
    precond = EDMPrecond(model).train()
    loss_fn = MaskDiTLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0,
                            fused=device.type == "cuda")
    gen = torch.Generator(device).manual_seed(seed)
    h, w = model.input_size
    x = torch.randn(batch, model.in_channels, h, w, device=device, generator=gen)
    y = torch.randint(0, model.num_classes + 1, (batch,), device=device, generator=gen)

    def step():
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            loss = loss_fn(precond, x, y, mask_ratio=mask_ratio).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step, model


def fit_batch(peak_bytes_at, capacity, max_batch, multiple=8, probes=(8, 16), safety=0.88):
    """Largest batch (a multiple of `multiple`, <= max_batch) predicted to fit in `capacity` bytes.

    peak_bytes_at(b) -> peak memory of a step at batch b; two probes give a linear model
    peak(b) = fixed + per_item * b, solved for safety * capacity.
    """
    b0, b1 = probes
    p0, p1 = peak_bytes_at(b0), peak_bytes_at(b1)
    per_item = max((p1 - p0) / (b1 - b0), 1.0)
    fixed = p0 - per_item * b0
    batch = int((safety * capacity - fixed) / per_item) // multiple * multiple
    return max(multiple, min(max_batch, batch))


def _is_oom(err):
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def _free_cuda():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def prepare_train_variant(preset, overrides, backend, mask_ratio, cfg):
    """Builds a training step for one variant and runs it once; on CUDA at the largest batch that
    fits (linear memory model from two probe batches, shrunk by 20 % on OOM), elsewhere at
    cfg.fixed_batch. DiT presets ignore decoder_* overrides (same encoder, no decoder).

    Returns (step, model, batch); step() does forward + backward + AdamW step.
    """
    device = torch.device(cfg.device)
    amp = cfg.dtype if cfg.dtype != torch.float32 else None
    overrides = {k: v for k, v in overrides.items() if not (preset.startswith("DiT") and k.startswith("decoder_"))}

    def probe(b):
        step, _ = build_train_step(preset, overrides, backend, mask_ratio, b, device, amp)
        step()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        del step
        _free_cuda()
        return peak

    if device.type == "cuda":
        batch = fit_batch(probe, torch.cuda.get_device_properties(device).total_memory, cfg.max_batch)
    else:
        batch = cfg.fixed_batch
    for _ in range(4):
        try:
            step, model = build_train_step(preset, overrides, backend, mask_ratio, batch, device, amp)
            step()
            return step, model, batch
        except Exception as err:  # noqa: BLE001
            if not _is_oom(err) or batch <= 8:
                raise
        # Outside the except block: its traceback keeps the failed attempt's tensors alive.
        step = model = None
        _free_cuda()
        batch = max(8, int(batch * 0.8) // 8 * 8)
    raise RuntimeError(f"{preset}: out of memory down to batch {batch}")


def train_figures(model, batch, mask_ratio, ms, device, peaks):
    """images/s, TFLOP/s, MFU (vs the measured matmul peak and, on known cards, the nominal bf16
    peak) and CUDA peak memory for a step of `ms` milliseconds."""
    out = dict(images_per_s=batch / ms * 1e3, params_M=sum(p.numel() for p in model.parameters()) / 1e6)
    if torch.device(device).type == "cuda":
        out["peak_mem_GiB"] = peak_memory_gib(device)
    out["TFLOPs"] = train_step_flops(model, batch=batch, mask_ratio=mask_ratio) / ms / 1e9
    if peaks and peaks.get("matmul_TFLOPs"):
        out["mfu"] = out["TFLOPs"] / peaks["matmul_TFLOPs"]
    nominal = default_peak_flops(device)  # the card's nominal dense bf16 peak (the trainer's MFU basis)
    if nominal:
        out["mfu_nominal"] = out["TFLOPs"] * 1e12 / nominal
    return out


def run_train_variant(label, preset, overrides, backend, mask_ratio, cfg, peaks, timer_factory=Timer):
    """Times one training-step variant (see prepare_train_variant). Returns a row dict."""
    device = torch.device(cfg.device)
    step, model, batch = prepare_train_variant(preset, overrides, backend, mask_ratio, cfg)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    stats = time_calls(step, device, cfg.train_warmup, cfg.train_reps, timer_factory(device))
    row = dict(variant=label, model=preset, backend=backend, mask_ratio=mask_ratio, batch=batch,
               precision=str(cfg.dtype).replace("torch.", ""), input_size=model.input_size[0],
               ms=stats.median_ms, p10_ms=stats.p10_ms, p90_ms=stats.p90_ms, n=stats.n,
               **train_figures(model, batch, mask_ratio, stats.median_ms, device, peaks))
    del step, model
    _free_cuda()
    return row


def train_variant_skip(backend, device):
    """Why a train-step variant on `backend` cannot run on `device` (None when it can)."""
    if backend in ("auto", "triton") and torch.device(device).type != "cuda":
        return f"the {backend} back-end variant needs a CUDA GPU"
    return None


def run_train_section(cfg, budget, peaks, timer_factory=Timer):
    """Rows for every train_variants(cfg) entry, with `vs_baseline` = images/s over the baseline's
    (the pure-PyTorch MaskDiT). The fused variant needs a GPU and is skipped elsewhere."""
    rows = []
    for label, preset, overrides, backend, ratio in train_variants(cfg):
        reason = train_variant_skip(backend, cfg.device)
        if reason:
            rows.append(dict(variant=label, model=preset, status="skipped", reason=reason))
            continue
        if budget.spent():
            rows.append(dict(variant=label, model=preset, status="skipped",
                             reason=f"section budget {budget.seconds}s spent"))
            continue
        try:
            rows.append(dict(status="ok", **run_train_variant(label, preset, overrides, backend, ratio, cfg, peaks,
                                                              timer_factory)))
        except ImportError as err:
            rows.append(dict(variant=label, model=preset, status="unavailable", reason=str(err)[:200]))
        except Exception as err:  # noqa: BLE001 - reported, the report goes on
            rows.append(dict(variant=label, model=preset, status="error", reason=f"{type(err).__name__}: {err}"[:300]))
        _free_cuda()
    base = next((r for r in rows if r["variant"] == train_baseline(cfg) and r["status"] == "ok"), None)
    for r in rows:
        if base and r["status"] == "ok":
            r["vs_baseline"] = r["images_per_s"] / base["images_per_s"]
            r["baseline"] = base["variant"]
    return rows


def run_cpu_figure(cfg, timer_factory=Timer):
    """Item 3: MaskDiT (mask ratio 0.5) vs DiT train-step time on the CPU: same width and depth, pure
    PyTorch, fp32, one thread. The two steps alternate call by call so that load changes on a
    shared CPU hit both alike; each figure is the median of its calls."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # comparable across machines, and immune to oversubscribed cores
    try:
        return _cpu_figure(cfg.cpu_figure, timer_factory)
    finally:
        torch.set_num_threads(threads)


def _cpu_figure(fig, timer_factory):
    size, batch = fig["preset"], fig["batch"]
    variants = (("maskdit", f"MaskDiT-{size}", 0.5), ("dit", f"DiT-{size}", 0.0))
    steps, timers, rows = {}, {}, {}
    for label, preset, ratio in variants:
        overrides = {k: v for k, v in fig["overrides"].items()
                     if not (label == "dit" and k.startswith("decoder_"))}  # DiT has no decoder
        steps[label], model = build_train_step(preset, overrides, "torch", ratio, batch, "cpu", None)
        flops = train_step_flops(model, batch=batch, mask_ratio=ratio)
        rows[label] = dict(variant=label, model=preset, mask_ratio=ratio, batch=batch, flops=flops,
                           params_M=sum(p.numel() for p in model.parameters()) / 1e6)
        timers[label] = timer_factory("cpu")
    for _ in range(fig["warmup"]):
        for label, _, _ in variants:
            steps[label]()
    for _ in range(fig["reps"]):
        for label, _, _ in variants:
            timers[label](steps[label])
    for label, _, _ in variants:
        stats = Stats.from_times(timers[label].times_ms())
        rows[label].update(ms=stats.median_ms, p10_ms=stats.p10_ms, p90_ms=stats.p90_ms, n=stats.n)
    m, d = rows["maskdit"], rows["dit"]
    return dict(config=dict(preset=size, batch=batch, threads=torch.get_num_threads(), **fig["overrides"]),
                maskdit_ms=m["ms"], dit_ms=d["ms"], speedup=d["ms"] / m["ms"],
                flops_ratio=d["flops"] / m["flops"],
                rows=[m, d])


# ------------------------------------------------------------------------------------ report

def _slug(text):
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def result_stem(env, date=None):
    """File stem "<date>-<card>" of a result, e.g. "2025-01-31-nvidia-h100-80gb-hbm3"."""
    date = date or datetime.date.today().isoformat()
    card = env["card"] if env["device"] == "cuda" else "cpu"
    return f"{date}-{_slug(card)}"


def _fmt(v, digits=3):
    if v is None:
        return ""
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.{digits}g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


def _table(headers, rows):
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def to_markdown(report):
    """The report as Markdown: environment, peaks, checks, op / attention / train-step tables."""
    env, out = report["env"], []
    out.append(f"# maskdit_fast benchmark: {env['card']} ({report['mode']})\n")
    out.append(f"{report['date']} · driver {env.get('driver') or 'n/a'} · torch {env['torch']} · "
               f"triton {env.get('triton') or 'n/a'} · CUDA {env.get('cuda') or 'n/a'} · "
               f"python {env['python']} · total {report['total_s']:.0f} s\n")
    if report.get("note"):
        out.append(f"> {report['note']}\n")
    p = report.get("peaks") or {}
    if p:
        out.append(f"Measured peaks: copy {_fmt(p.get('copy_GBps'))} GB/s (read + written), "
                   f"{p.get('matmul', {}).get('dtype', '')} matmul {_fmt(p.get('matmul_TFLOPs'))} TFLOP/s "
                   f"(n = {p.get('matmul', {}).get('n')}).\n")
    checks = report.get("checks", [])
    failed = [c for c in checks if c.get("status") in ("FAILED", "error")]
    out.append(f"## Checks\n{sum(c.get('status') == 'ok' for c in checks)} passed, {len(failed)} failed, "
               f"{sum(c.get('status') in ('skipped', 'not available') for c in checks)} skipped / not available.\n")
    shown = failed + [c for c in checks if c.get("source") != "bench" and c not in failed]
    if shown:
        out.append(_table(["source", "check", "max err", "tol", "status", "note"],
                          [[c.get("source"), c.get("name"), c.get("max_err"), c.get("tol"), c.get("status"),
                            c.get("reason", "")] for c in shown]) + "\n")
    for key, title in (("ops", "Ops"), ("attention", "Attention")):
        rows = report.get(key) or []
        if not rows:
            continue
        shown = [r for r in rows if r["status"] in ("ok", "failed check", "error")]
        out.append(f"## {title} ({rows[0]['dtype']}; vs torch = speed-up over torch eager)\n")
        out.append(_table(["op", "shape", "pass", "backend", "status", "ms", "graph ms", "GB/s", "TFLOP/s",
                           "% floor", "vs torch"],
                          [[r["op"], r["shape"], r["pass"], r["backend"],
                            r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('reason', '')}"[:80],
                            r.get("ms"), r.get("graph_ms"), r.get("GBps"), r.get("TFLOPs"), r.get("pct_of_floor"),
                            r.get("vs_baseline")] for r in shown]) + "\n")
        skipped = {}
        for r in rows:
            if r not in shown:
                skipped.setdefault((r["backend"], r["status"], r.get("reason", "")), set()).add(r["op"])
        for (backend, status, reason), names in skipped.items():
            out.append(f"- {backend}: {status} ({reason}) for {len(names)} case(s)")
        out.append("")
    timings = [r for r in report.get("external_timings") or [] if r.get("status") == "info"]
    if timings:
        out.append("## Check modules' own timings\n")
        out.append(_table(["source", "name", "pass", "shape", "ms", "TFLOP/s", "error"],
                          [[r["source"], r.get("name"), r.get("pass"), r.get("shape"), r.get("ms"), r.get("tflops"),
                            r.get("error", "")] for r in timings]) + "\n")
    rows = report.get("train_step") or []
    if rows:
        base = next((r.get("baseline") for r in rows if r.get("baseline")), "the baseline")
        out.append(f"## Train step (images/s relative to {base})\n")
        out.append(_table(["variant", "batch", "mask ratio", "ms/step", "images/s", "TFLOP/s", "MFU",
                           "peak GiB", "vs baseline", "status"],
                          [[r["variant"], r.get("batch"), r.get("mask_ratio"), r.get("ms"), r.get("images_per_s"),
                            r.get("TFLOPs"), r.get("mfu"), r.get("peak_mem_GiB"), r.get("vs_baseline"),
                            r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('reason', '')}"[:80]]
                           for r in rows]) + "\n")
    fig = report.get("cpu_figure")
    if fig and "speedup" in fig:
        c = fig["config"]
        out.append(f"## CPU figure (pure PyTorch, fp32, {c['threads']} thread{'s' if c['threads'] != 1 else ''})\n"
                   f"MaskDiT-{c['preset']} (ratio 0.5) {fig['maskdit_ms']:.1f} ms vs DiT {fig['dit_ms']:.1f} ms "
                   f"per train step at batch {c['batch']}: **{fig['speedup']:.2f}x** "
                   f"(config {json.dumps({k: v for k, v in c.items() if k not in ('threads',)})}).\n")
    elif fig:
        out.append(f"## CPU figure\n{fig.get('status')}: {fig.get('reason')}\n")
    sec = report.get("sections", {})
    out.append("## Sections\n" + _table(["section", "seconds", "budget s", "error"],
                                        [[k, v["seconds"], v.get("budget_s"), v.get("error", "")]
                                         for k, v in sec.items()]) + "\n")
    return "\n".join(out)


def run_report(cfg, sections=None, timer_factory=Timer, log=print):
    """Runs the selected sections (default: all) and returns the report dict."""
    sections = tuple(sections or cfg.sections)
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown sections {sorted(unknown)}; expected some of {SECTIONS}")
    t0 = time.monotonic()
    device = torch.device(cfg.device)
    # Index-value checks wait for the device: every timed op call passes validate=False (backend_fn) and
    # the train-step models skip their input checks, as in a training loop.
    report = dict(schema=SCHEMA, date=datetime.datetime.now().isoformat(timespec="seconds"), mode=cfg.mode,
                  env=env_info(device), config=dict(B=cfg.B, L=cfg.L, K=cfg.K, D=cfg.D, H=cfg.H, Dd=cfg.Dd,
                                                    Hd=cfg.Hd, dtype=str(cfg.dtype), warmup=cfg.warmup,
                                                    reps=cfg.reps, validate=False),
                  peaks=None, checks=[], external_timings=[], ops=[], attention=[], train_step=[], cpu_figure=None,
                  sections={})
    if device.type != "cuda":
        report["note"] = ("CPU subset: no CUDA device. Torch back-ends at small shapes and the CPU train-step "
                          "figure only; Triton/CUDA/SDPA-kernel rows are skipped (interpreter timings are "
                          "meaningless), and the figures are CPU figures, not GPU ones.")

    def section(name, fn):
        if name not in sections:
            return
        budget = Budget(cfg.budgets[name])
        if report.get("aborted"):  # a device error poisons the CUDA context: nothing after it can run
            report["sections"][name] = dict(seconds=0.0, budget_s=budget.seconds,
                                            error=f"not run: {report['aborted']}")
            return
        log(f"[bench] {name} (budget {budget.seconds}s) ...")
        entry = dict(budget_s=budget.seconds)
        try:
            fn(budget)
        except Exception as err:  # noqa: BLE001 - recorded; the report keeps what ran (the first GPU run
            # lost everything to one illegal memory access in a check module)
            entry["error"] = f"{type(err).__name__}: {err}"[:300]
            report["aborted"] = f"{name} raised {type(err).__name__}"
            log(f"[bench] {name} FAILED: {entry['error']}")
        report["sections"][name] = dict(seconds=round(budget.elapsed(), 2), **entry)
        log(f"[bench] {name} done in {budget.elapsed():.1f}s")

    def peaks(budget):
        report["peaks"] = run_peaks(cfg, timer_factory)

    def checks(budget):
        report["checks"] += external_checks(cfg.device)
        if cfg.external_timings:
            report["external_timings"] = external_checks(cfg.device, EXTERNAL_TIMINGS)

    def op_rows(budget):
        report["ops"] = run_op_section(op_cases(cfg), cfg, budget, report["peaks"], timer_factory,
                                       report["checks"])

    def attention_rows(budget):
        report["attention"] = run_op_section(attention_cases(cfg), cfg, budget, report["peaks"], timer_factory,
                                             report["checks"])

    def train(budget):
        report["train_step"] = run_train_section(cfg, budget, report["peaks"], timer_factory)

    def cpu_figure(budget):
        try:
            report["cpu_figure"] = run_cpu_figure(cfg, timer_factory)
        except Exception as err:  # noqa: BLE001 - reported, the report goes on
            report["cpu_figure"] = dict(status="error", reason=f"{type(err).__name__}: {err}"[:300])
        fig = report["cpu_figure"]
        if "speedup" in fig:
            log(f"[bench] CPU figure: MaskDiT {fig['maskdit_ms']:.1f} ms vs DiT {fig['dit_ms']:.1f} ms per step "
                f"-> {fig['speedup']:.2f}x")

    for name, fn in (("peaks", peaks), ("checks", checks), ("ops", op_rows), ("attention", attention_rows),
                     ("train_step", train), ("cpu_figure", cpu_figure)):
        section(name, fn)
    report["total_s"] = round(time.monotonic() - t0, 1)
    return report


def write_report(report, out_dir):
    """Writes <out_dir>/<date>-<card>.json and .md; returns the two paths."""
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, result_stem(report["env"], report["date"][:10]))
    if report["mode"].endswith("quick"):
        stem += "-quick"
    with open(stem + ".json", "w") as f:
        json.dump(report, f, indent=1, default=str)
    with open(stem + ".md", "w") as f:
        f.write(to_markdown(report))
    return stem + ".json", stem + ".md"


def main(argv=None):
    """CLI entry point; returns 0, or 1 when a check or a section failed (the report is written either way)."""
    parser = argparse.ArgumentParser(prog="python -m maskdit_fast.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join("benchmarks", "results"), help="directory for the results")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, no torch.compile")
    parser.add_argument("--cpu-quick", action="store_true", help="seconds-long CPU run with tiny shapes (tests)")
    parser.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if present)")
    parser.add_argument("--sections", default=None, help="comma-separated subset of "
                        "peaks,checks,ops,attention,train_step,cpu_figure")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.cpu_quick else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda given but no CUDA device is available")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # events, streams and graph capture follow the current device
    if args.cpu_quick and device.type != "cpu":
        parser.error("--cpu-quick runs on the CPU only")
    if device.type == "cuda":
        mode = "gpu-quick" if args.quick else "gpu"
    else:
        mode = "cpu-quick" if args.cpu_quick or args.quick else "cpu"
        print("[bench] no CUDA device: running the CPU subset (torch back-ends, small shapes, CPU figure)")
    cfg = make_config(mode, device)
    report = run_report(cfg, args.sections.split(",") if args.sections else None)
    paths = write_report(report, args.out)
    print(to_markdown(report))
    print(f"[bench] wrote {paths[0]} and {paths[1]}")
    failed = [c["name"] for c in report["checks"] if c.get("status") in ("FAILED", "error")]
    failed += [f"section {k}" for k, v in report["sections"].items() if "error" in v]
    if failed:
        print(f"[bench] FAILED: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
