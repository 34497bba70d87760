"""One-call tuning sweep of the Triton kernel families (issue #15 item 2).

    PYTHONPATH=. python benchmarks/tune_gpu.py --out DIR [--deadline-s 420] [--families a,b] [--max-configs N]
    PYTHONPATH=. python benchmarks/tune_gpu.py --out DIR --dry        # CPU, seconds, Triton interpreter

Every kernel family that a launcher looks up through `kernels._config.tuned(family, key, ...)` is swept
over the candidates its kernel module lists in `TUNING[family]`, at MaskDiT-XL/2's shapes in bf16 (the
benchmark report's XL cases, `maskdit_fast.bench.op_cases` / `attention_cases`: encoder attention L=128
Dh=72, decoder L=256 Dh=32, DiT L=256 Dh=72, varlen 64..192 tokens per sample; glue at the encoder
width 1152 and the decoder width 512). A candidate reaches the kernel through `kernels._config.override`,
i.e. through the production launch path of the public op (`maskdit_fast.ops`, backend "triton").

Phase 1 (compile): every (family, shape, config) runs once in a pool of spawned worker processes
(min(16, CPUs)); the compiled Triton kernels' registers, spills and shared memory are read from the JIT
functions' in-memory caches. A config whose kernels spill, or that does not fit the SM (shared memory,
threads), or fails to compile, is rejected and recorded. The same pool runs the torch.compile'd baselines
once, so that phase 2 loads them from inductor's on-disk caches instead of compiling on the clock.

Phase 2 (check, then time): one child process per family runs its configs one after the other: the
output and every gradient against the float64 reference by the 2x rule (`maskdit_fast.bench.check_case`:
error <= 2x PyTorch's own bf16 error), then device time by CUDA-graph replay over rotating input sets
larger than L2 (`maskdit_fast.bench.timing.time_graph_replays`), forward + backward and, for a one-direction family, its
direction alone. A config that kills its child (illegal address, miscompile, os._exit) or hangs is
recorded as crashed / timed out and the family goes on in a new child. Baselines run in the same call at
the same shapes: torch eager and torch.compile of the references, SDPA cuDNN / flash, torch `varlen_attn`
(with the device kernels it ran), FlexAttention (compiled; a document mask for varlen), the CUDA
extension (backend "cuda") when built, Liger-Kernel's LayerNorm for the LayerNorm rows when importable.

A deadline is checked before every item (each family gets an equal share of what is left); rows are
appended to DIR/sweep.jsonl as they come and DIR/best.json ({family: {key: config}}, the
kernels/tuned/sm_XY.json format) and DIR/sweep.md are rewritten after every family, so a run cut off
by the deadline or by a kill still leaves what it measured.

--dry: on the CPU, compile-free: the first two configs of each family under the Triton interpreter at the
report's tiny CPU shapes, phase 1 recorded as n/a, a wall-clock timer in place of graph replays.
"""
import argparse
import concurrent.futures
import contextlib
import dataclasses
import datetime
import functools
import importlib
import json
import math
import multiprocessing
import os
import signal
import sys
import time

if __name__ == "__main__" and "--dry" in sys.argv[1:]:
    # maskdit_fast.bench imports triton, which reads TRITON_INTERPRET once, at import; spawned children
    # inherit the environment
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from maskdit_fast import bench, ops  # noqa: E402
from maskdit_fast.bench.cases import _varlen_layout  # noqa: E402
from maskdit_fast.bench.checks import grads  # noqa: E402
from maskdit_fast.bench.timing import Rotation, time_calls, time_graph_replays  # noqa: E402
from maskdit_fast.kernels import _config  # noqa: E402

PASS_FWD, PASS_BWD, PASS_BOTH = "fwd", "bwd", "fwd+bwd"
GRAPH_REPS = 20           # graph replays per timing (each replays one call per rotating input set)
CHILD_GRACE_S = 30        # past its deadline, a child still busy with one item is killed
ITEM_TIMEOUT_S = {"gpu": 120, "dry": 300}  # one check + its timings; longer means a hung kernel
PHASE1_SHARE = 0.35       # at most this share of the deadline goes to the compile phase
# Plan estimates (s): a child's torch + CUDA start-up, one check + its graph timings at XL shapes, a Triton
# compile of one attention kernel set, a baseline (torch.compile'd ones apart). Guesses until a GPU run
# measures them: every sweep.jsonl row records its own seconds ("s").
EST = {"gpu": dict(child=12, item=1.0, compile=8, warm=30, baseline=1.5, compiled_baseline=6),
       "dry": dict(child=4, item=1.5, compile=0, warm=0, baseline=0.5, compiled_baseline=0)}
# Baselines that torch.compile (slow to build: they run last in the baselines chunk).
COMPILED_BASELINES = ("compile", "flex")
GPU_ONLY_BASELINES = bench.GPU_ONLY_BACKENDS + ("liger",)


# ------------------------------------------------------------------------------------ families

@dataclasses.dataclass(frozen=True)
class Family:
    """A kernel family of kernels/_config: `name` as the launchers look it up, the kernel module whose
    TUNING[name] lists the candidates, the direction its kernels run in ("fwd", "bwd" or "both"), and
    `shapes(cfg) -> [Shape]` (a module-level function: spawned processes rebuild the cases with it)."""
    name: str
    module: str
    direction: str
    shapes: object

    @property
    def passes(self):
        """Timed passes of a config: forward + backward, and the family's direction alone."""
        return (PASS_BOTH,) if self.direction == "both" else (self.direction, PASS_BOTH)

    @property
    def primary(self):
        """The pass a config is chosen by (the only one it changes)."""
        return self.passes[0]


@dataclasses.dataclass(frozen=True)
class Shape:
    """One benchmark case of a family: its kernels/_config key, the bench OpCase, its baselines."""
    key: str
    case: bench.OpCase
    baselines: tuple


def _pow2(n):
    return 1 << max(int(n) - 1, 0).bit_length()


def _attention_key(dh, max_len):
    return _config.shape_key(Dh=dh, L=_pow2(max_len))


ATTENTION_BASELINES = ("torch", "sdpa_cudnn", "sdpa_flash", "torch_varlen", "flex", "compile")
VARLEN_BASELINES = ("torch", "flex")  # "torch" is torch's varlen_attn on CUDA bf16 (ops.varlen_attention)
GLUE_BASELINES = ("torch", "cuda", "compile")


def attention_shapes(cfg):
    """attn_fwd / attn_bwd: encoder (kept tokens), decoder and DiT dense attention, varlen encoder."""
    dims = {"attention[encoder]": (cfg.D // cfg.H, cfg.K), "attention[decoder]": (cfg.Dd // cfg.Hd, cfg.L),
            "attention[dit]": (cfg.D // cfg.H, cfg.L),
            "varlen_attention[encoder]": (cfg.D // cfg.H, int(_varlen_layout(cfg.B, cfg.L, cfg.K).max()))}
    return [Shape(_attention_key(*dims[c.name]), c,
                  VARLEN_BASELINES if c.name.startswith("varlen") else ATTENTION_BASELINES)
            for c in bench.attention_cases(cfg)]


def _glue(cfg, names, width, baselines=GLUE_BASELINES, label=None):
    out = []
    for c in bench.op_cases(cfg):
        if c.name in names:
            case = dataclasses.replace(c, name=f"{c.name}[{label}]") if label else c
            # the CUDA extension has no varlen gather / scatter (backend "cuda" would run torch)
            own = tuple(b for b in baselines if b != "cuda" or "cuda" in c.backends)
            out.append(Shape(_config.shape_key(D=width), case, own))
    return out


def _decoder_cfg(cfg):
    """The decoder blocks' glue shapes: all L tokens at the decoder width."""
    return dataclasses.replace(cfg, D=cfg.Dd, K=cfg.L)


def gather_shapes(cfg):
    """gather: the encoder input (dense and packed) at the encoder width."""
    return _glue(cfg, ("gather_tokens", "gather_tokens_varlen"), cfg.D)


def scatter_shapes(cfg):
    """scatter: the decoder input (dense and packed) at the decoder width."""
    return _glue(cfg, ("scatter_tokens", "scatter_tokens_varlen"), cfg.Dd)


def layernorm_shapes(cfg):
    """ln_modulate_fwd / _bwd: encoder blocks (K tokens, width D) and decoder blocks (L tokens, width Dd)."""
    base = GLUE_BASELINES + ("liger",)
    return (_glue(cfg, ("layernorm_modulate",), cfg.D, base, "encoder")
            + _glue(_decoder_cfg(cfg), ("layernorm_modulate",), cfg.Dd, base, "decoder"))


def residual_shapes(cfg):
    """gated_residual_fwd / _bwd: encoder and decoder blocks, as layernorm_shapes."""
    return (_glue(cfg, ("gated_residual",), cfg.D, GLUE_BASELINES, "encoder")
            + _glue(_decoder_cfg(cfg), ("gated_residual",), cfg.Dd, GLUE_BASELINES, "decoder"))


_ATTN = "maskdit_fast.kernels.flash_attn"
_GS = "maskdit_fast.kernels.gather_scatter"
_MOD = "maskdit_fast.kernels.modulate"
FAMILIES = (
    Family("attn_fwd", _ATTN, "fwd", attention_shapes),
    Family("attn_bwd", _ATTN, "bwd", attention_shapes),
    Family("gather", _GS, "both", gather_shapes),
    Family("scatter", _GS, "both", scatter_shapes),
    Family("ln_modulate_fwd", _MOD, "fwd", layernorm_shapes),
    Family("ln_modulate_bwd", _MOD, "bwd", layernorm_shapes),
    Family("gated_residual_fwd", _MOD, "fwd", residual_shapes),
    Family("gated_residual_bwd", _MOD, "bwd", residual_shapes),
)


def candidates(family):
    """(configs, None) from the family's kernel module TUNING, or (None, why there are none)."""
    try:
        module = importlib.import_module(family.module)
    except Exception as err:  # noqa: BLE001 - reported per family
        return None, f"{family.module} does not import: {type(err).__name__}: {err}"[:300]
    configs = getattr(module, "TUNING", {}).get(family.name)
    if not configs:
        return None, f"{family.module}.TUNING lists no candidates for {family.name!r}"
    return [dict(c) for c in configs], None


# ------------------------------------------------------------------------------------ settings

@dataclasses.dataclass(frozen=True)
class Settings:
    """What every process of one sweep shares (pickled to the spawned ones)."""
    dry: bool
    device: str
    mode: str          # bench.make_config mode: "gpu" (XL shapes, bf16) or "cpu-quick" (tiny, fp32)

    @property
    def kind(self):
        return "dry" if self.dry else "gpu"

    def cfg(self):
        return bench.make_config(self.mode, self.device)


@functools.lru_cache(maxsize=None)
def _shapes(family, settings):
    return {s.case.name: s for s in family.shapes(settings.cfg())}


def _triton_fn(case):
    """The public op on the Triton back-end, index checks off (they synchronize with the host)."""
    import inspect
    if "validate" in inspect.signature(case.op).parameters:
        return functools.partial(case.op, backend="triton", validate=False)
    return functools.partial(case.op, backend="triton")


# ------------------------------------------------------------------------------------ phase 1

def _jit_functions(module):
    """The module's Triton JIT functions (unwrapping autotuner / heuristics wrappers)."""
    from triton.runtime.jit import JITFunction
    found = {}
    for value in vars(module).values():
        while not isinstance(value, JITFunction) and type(value).__module__.startswith("triton.runtime"):
            value = getattr(value, "fn", None)
        if isinstance(value, JITFunction):
            found[id(value)] = value
    return list(found.values())


def _kernel_caches(fn):
    """The {key: CompiledKernel} dicts of a JIT function's in-memory cache, one per device. The one place
    that knows triton's layout: 3.x keeps device_caches[device] = (kernel_cache, ...), releases before
    it cache[device] = kernel_cache."""
    caches = getattr(fn, "device_caches", None)
    if caches is not None:
        return [entry[0] for entry in caches.values()]
    return list(getattr(fn, "cache", {}).values())


def _launched(jit_fns):
    """The compiled kernels of these JIT functions (those launched since their caches were cleared)."""
    return [k for fn in jit_fns for cache in _kernel_caches(fn) for k in cache.values()]


def _kernel_stats(kernel):
    """name, registers per thread, spilled registers, shared memory bytes of a launched kernel."""
    return dict(name=kernel.name, registers=getattr(kernel, "n_regs", None), spills=getattr(kernel, "n_spills", None),
                shared=getattr(kernel.metadata, "shared", None), num_warps=getattr(kernel.metadata, "num_warps", None),
                num_stages=getattr(kernel.metadata, "num_stages", None))


_worker = {"args": {}, "poisoned": None}  # per pool worker: inputs per (family, case); a device error


def compile_task(family, case_name, config_id, config, settings):
    """Phase 1 in a pool worker: runs the case once under `override(family, config)` and records the
    family's compiled kernels (the forward's for a "fwd" family, those first launched by the backward
    for "bwd", all for "both"). Returns a sweep row with status "rejected" when a kernel spills, does
    not fit the SM (shared memory, threads) or does not compile, "crashed" on a device error (which
    poisons this worker's CUDA context: its later tasks are left to phase 2 as "n/a"), else "ok"."""
    shape = _shapes(family, settings)[case_name]
    case, device = shape.case, torch.device(settings.device)
    row = dict(kind="compile", family=family.name, case=case_name, key=shape.key, config_id=config_id, config=config)
    if _worker["poisoned"]:
        return dict(row, status="n/a", reason=f"worker's CUDA context lost to {_worker['poisoned']}")
    if (family.name, case_name) not in _worker["args"]:
        gen = torch.Generator(device).manual_seed(0)
        _worker["args"][family.name, case_name] = case.make_args(device, settings.cfg().dtype, gen)
    args = _worker["args"][family.name, case_name]
    jit_fns = _jit_functions(importlib.import_module(family.module))
    for cache in (c for fn in jit_fns for c in _kernel_caches(fn)):
        cache.clear()  # what is in the caches after the run is what this config launched
    fn = _triton_fn(case)
    try:
        with _config.override(family.name, config):
            out = fn(*args)
            forward = {id(k) for k in _launched(jit_fns)}
            grads(out, args, case.grad_argnums, torch.ones_like(out))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
    except Exception as err:  # noqa: BLE001 - triton's OutOfResources, compile errors: the config is out
        reason = f"{type(err).__name__}: {err}"[:300]
        if _fatal(err):
            _worker["poisoned"] = f"{family.name} config {config_id} at {case_name}"
            return dict(row, status="crashed", reason=reason)
        return dict(row, status="rejected", reason=reason)
    launched = _launched(jit_fns)
    if family.direction == "fwd":
        launched = [k for k in launched if id(k) in forward]
    elif family.direction == "bwd":
        launched = [k for k in launched if id(k) not in forward]
    kernels = [_kernel_stats(k) for k in launched]
    spilling = [k for k in kernels if k["spills"]]
    if spilling:
        return dict(row, status="rejected", kernels=kernels,
                    reason="spills: " + ", ".join(f"{k['name']} {k['spills']}" for k in spilling))
    return dict(row, status="ok", kernels=kernels)


def _pool_processes(pool):
    # concurrent.futures has no public way to kill workers stuck in a compile; _processes is stable
    # across CPython 3.8-3.14.
    return list(getattr(pool, "_processes", {}).values())


def warm_task(family, case_name, baseline, settings):
    """Phase 1 in a pool worker: runs a torch.compile'd baseline once without and once with autograd, so
    that phase 2 finds its graphs in inductor's on-disk caches instead of compiling on the clock."""
    shape = _shapes(family, settings)[case_name]
    device = torch.device(settings.device)
    row = dict(kind="warm", family=family.name, case=case_name, baseline=baseline)
    t0 = time.time()
    try:
        fn = baseline_fn(shape.case, baseline, device)
        args = shape.case.make_args(device, settings.cfg().dtype, torch.Generator(device).manual_seed(0))
        with torch.no_grad():
            fn(*args)
        out = fn(*args)
        grads(out, args, shape.case.grad_argnums, torch.ones_like(out))
    except Exception as err:  # noqa: BLE001 - phase 2 reports the baseline's own error
        return dict(row, status="error", reason=f"{type(err).__name__}: {err}"[:300], s=round(time.time() - t0, 1))
    return dict(row, status="ok", s=round(time.time() - t0, 1))


def run_compile_phase(tasks, warm, settings, deadline, sink, log):
    """Runs compile_task for every (family, case, config_id, config) of `tasks` and warm_task for every
    (family, case, baseline) of `warm` in a spawned pool. Returns the set of (family, case, config_id)
    rejected or crashed. Tasks unfinished at the deadline or lost to a broken pool are recorded as n/a
    (phase 2 isolates them anyway)."""
    rejected = set()
    if settings.dry:
        for family, case_name, config_id, config in tasks:
            sink(dict(kind="compile", family=family.name, case=case_name, key=_shapes(family, settings)[case_name].key,
                      config_id=config_id, config=config, status="n/a", reason="dry run: no compilation"))
        return rejected
    workers = max(1, min(16, os.cpu_count() or 1, len(tasks) + len(warm)))
    pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    # the long warm-ups first: the pool's makespan is shortest when its longest jobs start early
    futures = {pool.submit(warm_task, f, c, b, settings): dict(kind="warm", family=f.name, case=c, baseline=b)
               for f, c, b in warm}
    futures.update({pool.submit(compile_task, f, c, i, cfg, settings):
                    dict(kind="compile", family=f.name, case=c, config_id=i, config=cfg) for f, c, i, cfg in tasks})
    try:
        for fut in concurrent.futures.as_completed(futures, timeout=max(0.0, deadline - time.time())):
            try:
                row = fut.result()
            except Exception as err:  # noqa: BLE001 - a worker died: the pool is broken for the rest
                row = dict(futures[fut], status="n/a", reason=f"worker pool: {type(err).__name__}: {err}"[:300])
            sink(row)
            if row["kind"] == "compile" and row["status"] in ("rejected", "crashed"):
                rejected.add((row["family"], row["case"], row["config_id"]))
    except concurrent.futures.TimeoutError:
        log(f"[tune] compile phase cut at its deadline: {sum(not f.done() for f in futures)} task(s) unfinished")
        for fut, row in futures.items():
            if not fut.done():
                sink(dict(row, status="n/a", reason="compile phase deadline"))
        for proc in _pool_processes(pool):
            proc.kill()
        pool.shutdown(wait=False, cancel_futures=True)
        return rejected
    pool.shutdown(wait=True)  # the workers leave the GPU before phase 2 times anything
    return rejected


# ------------------------------------------------------------------------------------ baselines

@functools.lru_cache(maxsize=None)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention, dynamic=False)


def _flex_dense(q, k, v):
    out = _compiled_flex()(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


_document_masks = {}  # (cu data_ptr, total) -> BlockMask: built before any graph capture (warm-up calls)


def _flex_varlen(q, k, v, cu_q, cu_k, max_q, max_k):
    """FlexAttention over the packed sequences with a document mask (query and key in one sample)."""
    from torch.nn.attention.flex_attention import create_block_mask
    key = (cu_q.data_ptr(), q.shape[0])
    if key not in _document_masks:
        doc = ops.sample_index(torch.empty(q.shape[0], device=q.device), cu_q)

        def same_doc(b, h, qi, ki):
            return doc[qi] == doc[ki]
        _document_masks[key] = create_block_mask(same_doc, 1, 1, q.shape[0], k.shape[0], device=q.device)
    out = _compiled_flex()(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                           block_mask=_document_masks[key])
    return out[0].transpose(0, 1)


@functools.lru_cache(maxsize=None)
def _liger_affine(width, dtype, device):
    return torch.ones(width, dtype=dtype, device=device), torch.zeros(width, dtype=dtype, device=device)


def _liger_layernorm_modulate(x, shift, scale, eps=1e-6):
    """Liger-Kernel's LayerNorm (unit weight, zero bias), then the modulation in torch."""
    try:
        from liger_kernel.ops.layer_norm import LigerLayerNormFunction
    except ImportError as err:
        raise bench.Unavailable(f"liger_kernel not importable ({err})") from err
    weight, bias = _liger_affine(x.shape[-1], x.dtype, x.device)
    return LigerLayerNormFunction.apply(x, weight, bias, eps) * (1 + scale[:, None]) + shift[:, None]


def baseline_fn(case, name, device):
    """Callable(*args) of baseline `name` for `case`; raises bench.Unavailable where it cannot run."""
    if name in GPU_ONLY_BASELINES and torch.device(device).type != "cuda":
        raise bench.Unavailable("needs a CUDA GPU")
    if name == "flex":
        return _flex_varlen if case.name.startswith("varlen") else _flex_dense
    if name == "liger":
        return _liger_layernorm_modulate
    return bench.backend_fn(case, name, device)


def _device_kernels(call):
    """Names of the CUDA kernels one call launched (which kernel a torch attention picked)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    names = {e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA}
    return sorted(n for n in names if any(s in n.lower() for s in ("attn", "attention", "fmha", "flash", "cudnn",
                                                                    "sdpa", "softmax")))[:6]


# ------------------------------------------------------------------------------------ phase 2

class _Child:
    """Per-process state of a phase-2 child: input sets per case, built on first use."""

    def __init__(self, settings):
        self.settings = settings
        self.cfg = settings.cfg()
        self.device = torch.device(settings.device)
        self.sets = {}

    def input_sets(self, case):
        if case.name not in self.sets:
            self.sets[case.name] = bench.input_sets(case, self.cfg)
        return self.sets[case.name]

    def time(self, run, sets):
        """ms per call: CUDA-graph replay (device time) on a GPU, wall clock in the dry run."""
        call = Rotation(run, sets)
        if self.settings.dry:
            return time_calls(call, self.device, warmup=0, reps=1).median_ms
        return time_graph_replays(call, len(sets), self.device, reps=GRAPH_REPS).median_ms

    def time_passes(self, fn, case, passes):
        """{pass: ms} for fn on the case's rotating inputs; a pass that cannot be timed gets its reason."""
        sets, out = self.input_sets(case), {}
        for p in passes:
            try:
                if p == PASS_BWD:
                    prepared = [(fn(*args), tuple(args[i] for i in case.grad_argnums), g) for args, g in sets]
                    out[p] = self.time(_backward_only, prepared)
                else:
                    out[p] = self.time(bench.pass_call(fn, p, case.grad_argnums), sets)
            except Exception as err:  # noqa: BLE001 - e.g. a capture-unsafe baseline: the other passes stand
                if _fatal(err):
                    raise
                out[p] = f"{type(err).__name__}: {err}"[:200]
        return out


def _backward_only(out, leaves, grad_out):
    return torch.autograd.grad(out, leaves, grad_out, retain_graph=True)


def _fatal(err):
    """A device error that poisons the CUDA context: the child must end after reporting it."""
    accel = getattr(torch, "AcceleratorError", ())
    return isinstance(err, accel) or any(s in str(err) for s in ("CUDA error", "illegal memory access",
                                                                 "misaligned address", "unspecified launch failure"))


def _verdict(result):
    err, tol, passed = result
    return dict(max_err=err, tol=tol, passed=bool(passed))


def run_config_item(child, item):
    """Check one config at one shape against the float64 reference, then time it if it passed."""
    family, shape = item["family"], _shapes(item["family"], child.settings)[item["case"]]
    fn = _triton_fn(shape.case)
    with _config.override(family.name, item["config"]):
        verdict = bench.check_case(shape.case, fn, child.device, child.cfg.dtype)
        check = {p: _verdict(v) for p, v in verdict.items()}
        if not verdict[PASS_BOTH][2]:
            return dict(status="failed check", check=check)
        return dict(status="ok", check=check, ms=child.time_passes(fn, shape.case, family.passes))


def run_baseline_item(child, item):
    """Check one baseline at one shape like a config, then time fwd, bwd and fwd+bwd."""
    shape = _shapes(item["family"], child.settings)[item["case"]]
    case, name = shape.case, item["baseline"]
    if child.settings.dry and name in COMPILED_BASELINES:
        return dict(status="unavailable", reason="dry run: no torch.compile")
    try:
        fn = baseline_fn(case, name, child.device)
        verdict = bench.check_case(case, fn, child.device, child.cfg.dtype)
    except bench.Unavailable as err:
        return dict(status="unavailable", reason=str(err)[:200])
    check = {p: _verdict(v) for p, v in verdict.items()}
    if not verdict[PASS_BOTH][2]:
        return dict(status="failed check", check=check)
    row = dict(status="ok", check=check, ms=child.time_passes(fn, case, (PASS_FWD, PASS_BWD, PASS_BOTH)))
    if child.device.type == "cuda" and case.name.startswith(("attention", "varlen")):
        args = child.input_sets(case)[0][0]
        row["device_kernels"] = _device_kernels(lambda: fn(*args))
    return row


def _item_row(item):
    row = dict(kind=item["kind"], family=item["family"].name, case=item["case"], key=item["key"])
    if item["kind"] == "config":
        row.update(config_id=item["config_id"], config=item["config"])
    else:
        row.update(baseline=item["baseline"])
    return row


def child_main(conn, items, settings, deadline):
    """Phase-2 child: runs the items in order until the deadline, sending ("start", i) before and
    ("row", i, row) after each. Exits with code 3 after an item that poisoned the CUDA context, 0 when
    done or at the deadline."""
    if settings.device.startswith("cuda"):
        torch.cuda.set_device(torch.device(settings.device))
    child = _Child(settings)
    for item in items:
        if time.time() >= deadline:
            break
        conn.send(("start", item["id"]))
        row, fatal, t0 = _item_row(item), False, time.time()
        try:
            run = run_config_item if item["kind"] == "config" else run_baseline_item
            row.update(run(child, item))
        except Exception as err:  # noqa: BLE001 - the item failed; a device error also ends this child
            fatal = _fatal(err)
            row.update(status="crashed" if fatal else "error", reason=f"{type(err).__name__}: {err}"[:300])
        row["s"] = round(time.time() - t0, 2)
        conn.send(("row", item["id"], row))
        if fatal:
            conn.close()
            sys.exit(3)  # the context is poisoned: the parent goes on in a new child
    conn.close()


@contextlib.contextmanager
def _child_environment(settings):
    """A dry run's children interpret the Triton kernels: triton reads TRITON_INTERPRET when the child
    imports it, from the environment the child starts with. The caller's own environment is restored (a
    test process on a GPU machine must keep compiling its kernels)."""
    previous = os.environ.get("TRITON_INTERPRET")
    if settings.dry:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = previous


def run_chunk(items, settings, deadline, sink, log):
    """Runs items in spawned children, one after the other; a child that dies or hangs costs only its
    current item (recorded as crashed / timed out) and the rest go on in a new child. Items not started
    by the deadline are recorded as skipped."""
    ctx = multiprocessing.get_context("spawn")
    remaining = list(items)
    timeout = ITEM_TIMEOUT_S[settings.kind]
    while remaining:
        if time.time() >= deadline:
            break
        recv, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=child_main, args=(send, remaining, settings, deadline), daemon=True)
        with _child_environment(settings):
            proc.start()
        send.close()
        done, current, started, killed, any_started = set(), None, time.time(), None, False
        while True:
            if recv.poll(0.2):
                try:
                    msg = recv.recv()
                except (EOFError, OSError):
                    break
                if msg[0] == "start":
                    current, started, any_started = msg[1], time.time(), True
                else:
                    sink(msg[2])
                    done.add(msg[1])
                    current = None
                continue
            if not proc.is_alive():
                if not recv.poll(0):
                    break
                continue
            now = time.time()
            if current is not None and now - started > timeout:
                killed = ("timeout", f"timed out after {timeout} s")
            elif now > deadline + CHILD_GRACE_S:
                killed = ("cut off", "still running at the deadline")
            if killed:
                proc.kill()
                break
        proc.join()
        recv.close()
        if current is not None:
            item = next(it for it in remaining if it["id"] == current)
            status, reason = killed or ("crashed", f"child process died (exit code {proc.exitcode})")
            sink(dict(_item_row(item), status=status, reason=reason))
            log(f"[tune] {item['family'].name} {item['case']} {item.get('config', item.get('baseline'))}: {reason}")
            done.add(current)
        remaining = [it for it in remaining if it["id"] not in done]
        if killed and killed[0] == "cut off":
            break
        if not any_started and not killed and proc.exitcode != 0:  # a child that cannot start would fail again
            for item in remaining:
                sink(dict(_item_row(item), status="error",
                          reason=f"child process died before its first item (exit code {proc.exitcode})"))
            return
        if proc.exitcode == 0 and remaining:
            break  # the child stopped at the deadline
    for item in remaining:
        sink(dict(_item_row(item), status="skipped", reason="deadline"))


# ------------------------------------------------------------------------------------ results

def _ms(row, p):
    value = (row.get("ms") or {}).get(p)
    return value if isinstance(value, (int, float)) else None


def best_configs(rows, families):
    """{family: {key: (config_id, config)}}: per key, among the configs that passed the check and were
    timed at every shape of that key, the one with the least total time of the family's primary pass."""
    primary = {f.name: f.primary for f in families}
    shapes, timed, configs = {}, {}, {}
    for r in rows:
        if r.get("kind") != "config" or r["family"] not in primary:
            continue
        shapes.setdefault((r["family"], r["key"]), set()).add(r["case"])
        ms = _ms(r, primary[r["family"]]) if r["status"] == "ok" else None
        if ms is not None:
            slot = (r["family"], r["key"], r["config_id"])
            timed.setdefault(slot, {})[r["case"]] = ms
            configs[slot] = r["config"]
    best = {}
    for (fam, key, cid), per_case in timed.items():
        if set(per_case) != shapes[fam, key]:
            continue
        total = sum(per_case.values())
        current = best.get(fam, {}).get(key)
        if current is None or total < current[2]:
            best.setdefault(fam, {})[key] = (cid, configs[fam, key, cid], total)
    return {fam: {key: (cid, cfg) for key, (cid, cfg, _) in keys.items()} for fam, keys in best.items()}


def _fmt(v):
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    return str(v)


def _config_text(config):
    return " ".join(f"{k}={v}" for k, v in config.items())


def markdown(rows, families, env, started, cut_off):
    """DIR/sweep.md: per family its winners per shape with every baseline's time and the ratio
    (baseline ms / best ms, > 1: the tuned kernel is faster), then what was rejected, crashed or cut."""
    lines = [f"# Triton tuning sweep: {env.get('card')}", "",
             f"{started} · torch {env.get('torch')} · triton {env.get('triton') or 'n/a'} · "
             f"CUDA {env.get('cuda') or 'n/a'} · driver {env.get('driver') or 'n/a'} · python {env.get('python')}"
             + (" · **cut off by the deadline**" if cut_off else ""), ""]
    if env.get("device") != "cuda":
        lines += ["> Dry run (CPU, Triton interpreter, tiny shapes, wall-clock times): checks the machinery, "
                  "not the kernels' speed.", ""]
    lines += ["Per shape: the winner (least total time of the family's pass over the shapes of its key, among the "
              "configs that passed the float64 check), its time, and each baseline's time at the same pass with the "
              "ratio baseline / winner (> 1: the Triton kernel is faster). torch: the eager reference path (SDPA for "
              "dense attention, torch varlen_attn for varlen on CUDA); compile: torch.compile of the reference; "
              "flex: FlexAttention compiled (document mask for varlen); cuda: the CUDA extension; liger: "
              "Liger-Kernel's LayerNorm + torch modulation.", ""]
    best = best_configs(rows, families)
    baselines = {}
    for r in rows:
        if r.get("kind") == "baseline":
            baselines.setdefault(r["case"], {})[r["baseline"]] = r
    for fam in families:
        fam_rows = [r for r in rows if r.get("family") == fam.name and r.get("kind") in ("config", "missing")]
        lines.append(f"## {fam.name} ({fam.direction}; chosen by {fam.primary} time)")
        missing = [r for r in fam_rows if r["kind"] == "missing"]
        if missing:
            lines += [f"Not swept: {missing[0]['reason']}", ""]
            continue
        configs = [r for r in fam_rows if r["kind"] == "config"]
        counts = {}
        for r in configs:
            counts[r["status"]] = counts.get(r["status"], 0) + 1
        lines.append("(config, shape) results: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) + "\n")
        names = sorted({b for r in configs for b in baselines.get(r["case"], {})},
                       key=lambda b: (b not in ("torch",), b))
        header = ["shape", "key", "best config", f"{fam.primary} ms"] + (
            [f"{PASS_BOTH} ms"] if fam.primary != PASS_BOTH else []) + [f"{b} ms (ratio)" for b in names]
        table = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for case in dict.fromkeys(r["case"] for r in configs):
            key = next(r["key"] for r in configs if r["case"] == case)
            winner = best.get(fam.name, {}).get(key)
            row = next((r for r in configs if winner and r["case"] == case and r["config_id"] == winner[0]), None)
            ms = _ms(row, fam.primary) if row else None
            cells = [case, key, _config_text(winner[1]) if winner else "none passed", _fmt(ms)]
            if fam.primary != PASS_BOTH:
                cells.append(_fmt(_ms(row, PASS_BOTH) if row else None))
            for b in names:
                brow = baselines.get(case, {}).get(b)
                bms = _ms(brow, fam.primary) if brow else None
                if bms is None:  # not run here, failed its check, or could not be timed (sweep.jsonl says why)
                    cells.append(("not timed" if brow["status"] == "ok" else brow["status"]) if brow else "")
                else:
                    cells.append(f"{_fmt(bms)} ({_fmt(bms / ms)}x)" if ms else _fmt(bms))
            table.append("| " + " | ".join(cells) + " |")
        lines += table + [""]
        bad = [r for r in configs if r["status"] not in ("ok", "skipped")]
        for r in bad[:20]:
            lines.append(f"- config {r['config_id']} ({_config_text(r['config'])}) at {r['case']}: {r['status']}"
                         + (f": {r['reason']}" if r.get("reason") else ""))
        if len(bad) > 20:
            lines.append(f"- ... and {len(bad) - 20} more (sweep.jsonl)")
        lines.append("")
    kernels = [(r["case"], r["baseline"], r["device_kernels"]) for r in rows if r.get("device_kernels")]
    if kernels:
        lines.append("## Device kernels the attention baselines ran\n")
        lines += [f"- {case} / {b}: {', '.join(k)}" for case, b, k in kernels]
        lines.append("")
    rejected = [r for r in rows if r.get("kind") == "compile" and r.get("status") in ("rejected", "crashed")]
    if rejected:
        lines.append("## Rejected at compile (spills, SM limits, compile errors, device errors)\n")
        lines += [f"- {r['family']} config {r['config_id']} ({_config_text(r['config'])}) at {r['case']}: "
                  f"{r['status']}: {r.get('reason')}" for r in rejected[:40]]
        lines.append("")
    return "\n".join(lines)


def write_summary(out_dir, rows, families, env, started, cut_off):
    """Rewrites DIR/best.json and DIR/sweep.md from the rows so far."""
    best = {fam: {key: cfg for key, (_, cfg) in keys.items()} for fam, keys in best_configs(rows, families).items()}
    with open(os.path.join(out_dir, "best.json"), "w") as f:
        json.dump(best, f, indent=1, sort_keys=True)
    with open(os.path.join(out_dir, "sweep.md"), "w") as f:
        f.write(markdown(rows, families, env, started, cut_off))


# ------------------------------------------------------------------------------------ driver

def plan(work, settings, n_tasks, n_warm, workers, deadline_s, log):
    """Prints the plan: counts x estimated cost per phase and family, against the deadline."""
    est = EST[settings.kind]
    total = 0.0
    if n_tasks:
        t = math.ceil((n_tasks * est["compile"] + n_warm * est["warm"]) / max(workers, 1))
        total += t
        log(f"[tune] plan: compile {n_tasks} (family, shape, config) and warm {n_warm} torch.compile baselines "
            f"on {workers} workers ~ {t:.0f} s")
    for name, items in work:
        compiled = sum(it.get("baseline") in COMPILED_BASELINES for it in items)
        t = est["child"] + (len(items) - compiled) * (est["baseline"] if name == "baselines" else est["item"])
        t += compiled * est["compiled_baseline"]
        total += t
        log(f"[tune] plan: {name}: {len(items)} items ~ {t:.0f} s")
    log(f"[tune] plan: total ~ {total:.0f} s for a deadline of {deadline_s:.0f} s"
        + ("" if total <= deadline_s else " (over: the last items of each family's share will be cut)"))
    return total


def run_sweep(out_dir, deadline_s=420.0, family_names=None, max_configs=None, dry=False, families=FAMILIES,
              log=print):
    """The sweep (see the module docstring). Returns the rows it recorded (also in DIR/sweep.jsonl)."""
    t0 = time.time()
    deadline = t0 + deadline_s
    if dry:
        settings = Settings(True, "cpu", "cpu-quick")
        max_configs = 2 if max_configs is None else max_configs
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: the sweep needs a GPU (use --dry for the CPU run)")
        settings = Settings(False, "cuda", "gpu")
    if family_names:
        unknown = set(family_names) - {f.name for f in families}
        if unknown:
            raise SystemExit(f"unknown families {sorted(unknown)}; expected some of {[f.name for f in families]}")
        families = tuple(f for f in families if f.name in family_names)
    os.makedirs(out_dir, exist_ok=True)
    env = bench.env_info(settings.device)
    started = datetime.datetime.now().isoformat(timespec="seconds")
    rows = []
    jsonl = open(os.path.join(out_dir, "sweep.jsonl"), "w")

    def sink(row):
        rows.append(row)
        jsonl.write(json.dumps(row, default=str) + "\n")
        jsonl.flush()

    sink(dict(kind="env", date=started, dry=dry, deadline_s=deadline_s, **env))
    tasks, work, baselines, next_id = [], [], {}, 0
    for fam in families:
        configs, why = candidates(fam)
        if configs is None:
            sink(dict(kind="missing", family=fam.name, reason=why))
            log(f"[tune] {fam.name}: {why}")
            continue
        configs = configs[:max_configs] if max_configs else configs
        items = []
        shapes = list(_shapes(fam, settings).values())
        for cid, config in enumerate(configs):  # config-major: a cut family still has whole configs
            for s in shapes:
                tasks.append((fam, s.case.name, cid, config))
                items.append(dict(kind="config", family=fam, case=s.case.name, key=s.key, config_id=cid,
                                  config=config, id=next_id))
                next_id += 1
        for s in shapes:
            for b in s.baselines:
                baselines.setdefault((s.case.name, b), dict(kind="baseline", family=fam, case=s.case.name, key=s.key,
                                                             baseline=b))
        work.append((fam.name, items))
    base_items = sorted(baselines.values(), key=lambda it: it["baseline"] in COMPILED_BASELINES)
    for it in base_items:
        it["id"], next_id = next_id, next_id + 1
    if base_items:
        work.append(("baselines", base_items))
    warm = [(it["family"], it["case"], it["baseline"]) for it in base_items if it["baseline"] in COMPILED_BASELINES]
    workers = 0 if dry else min(16, os.cpu_count() or 1)
    plan(work, settings, 0 if dry else len(tasks), 0 if dry else len(warm), workers, deadline_s, log)
    finished = False
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a killed run still writes its summary
    try:
        if tasks:
            log(f"[tune] phase 1: {len(tasks)} compile tasks, {len(warm)} torch.compile warm-ups")
            rejected = run_compile_phase(tasks, warm, settings, t0 + PHASE1_SHARE * deadline_s, sink, log)
            for name, items in work:
                out = [it for it in items if (it["family"].name, it["case"], it.get("config_id")) in rejected]
                for it in out:
                    sink(dict(_item_row(it), status="rejected", reason="compile phase (see its compile row)"))
                items[:] = [it for it in items if it not in out]
        chunks = work if not dry else [("all", [it for _, items in work for it in items])]
        for n, (name, items) in enumerate(chunks):
            share = (deadline - time.time()) / (len(chunks) - n)
            log(f"[tune] phase 2: {name}: {len(items)} items, {max(share, 0):.0f} s")
            run_chunk(items, settings, time.time() + share, sink, log)
            write_summary(out_dir, rows, families, env, started, cut_off=False)
        finished = True
    finally:
        signal.signal(signal.SIGTERM, previous)
        cut_off = not finished or any(r.get("status") in ("skipped", "cut off") for r in rows)
        sink(dict(kind="end", seconds=round(time.time() - t0, 1), cut_off=cut_off))
        jsonl.close()
        write_summary(out_dir, rows, families, env, started, cut_off)
    log(f"[tune] done in {time.time() - t0:.0f} s: {out_dir}/sweep.jsonl, best.json, sweep.md")
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="directory for sweep.jsonl, best.json and sweep.md")
    parser.add_argument("--deadline-s", type=float, default=420.0, help="wall-clock budget of the whole sweep")
    parser.add_argument("--families", default=None, help="comma-separated subset of "
                        + ",".join(f.name for f in FAMILIES))
    parser.add_argument("--max-configs", type=int, default=None, help="first N candidates per family "
                        "(default: all; 2 with --dry)")
    parser.add_argument("--dry", action="store_true", help="CPU, Triton interpreter, tiny shapes, seconds")
    args = parser.parse_args(argv)
    run_sweep(args.out, args.deadline_s, args.families.split(",") if args.families else None, args.max_configs,
              args.dry)
    return 0


if __name__ == "__main__":
    sys.exit(main())
