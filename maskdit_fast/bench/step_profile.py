"""Where a train step's time goes: torch.profiler over a few steps of the fused variant, each event
named into a group by PROFILE_GROUPS, idle time = step time minus the union of busy intervals, and
the GEMMs' achieved TFLOP/s.

Events: on a GPU the device kernels (and memcpy / memset); on a CPU, where ops nest, the outermost
ops of each step (what Python and the autograd engine called: `aten::linear`, `AddmmBackward0`,
`Optimizer.step#AdamW.step`, ...), so that each time interval is counted once. The window is from
the first step's start to the end of the last step or of its last kernel, whichever is later.

The grouping rule is a regex table, searched case-insensitively in the event name; the first group
whose regex matches names the event, "other" when none does (the report lists the largest of
those, so the table can be extended). What it cannot see: on the torch path (and in inductor's
fused kernels) modulate and the gated residual are generic elementwise kernels, so "glue" counts
the package's named glue kernels and indexing (gather / scatter) only.
"""
import re

import torch

from maskdit_fast.bench.cases import train_variants
from maskdit_fast.bench.train_step import build_train_step, train_unavailable
from maskdit_fast.flops import model_flops

# (group, regex), first match wins: optimizer before the elementwise names its kernels contain, the
# glue kernels ("gather_fwd_kernel", "ln_mod_bwd_kernel", ...) before the attention kernels'
# "_fwd_kernel", attention before GEMM (cutlass / cuDNN attention kernel names contain GEMM words).
PROFILE_GROUPS = (
    ("optimizer", r"adam|multi_tensor_apply|_foreach_|optimizer\."),
    ("glue", r"gather|scatter|index|ln_mod|modulate|gated|inverse_ids|column_sum"),
    ("attention", r"flash|fmha|attention|attn|sdpa|^_(fwd|bwd_dq|bwd_dkdv|bwd_delta)_kernel"),
    ("gemm", r"gemm|nvjet|cutlass|cublas|xmma|wgmma|conv|linear|matmul|einsum|addmm|bmm|\bmm\b|mmbackward|_scaled_mm|"
             r"triton_tem_"),
    ("elementwise/norm", r"elementwise|norm|reduce|softmax|gelu|silu|tanh|exp|copy|fill|cat|memcpy|memset|where|"
                         r"triton_(poi|red|per)_|accumulategrad|backward|aten::"),
)
OTHER, IDLE = "other", "idle"
GROUPS = tuple(g for g, _ in PROFILE_GROUPS) + (OTHER, IDLE)
STEP_MARK = "maskdit_fast.bench.step"
_COMPILED_GROUPS = tuple((g, re.compile(rx, re.IGNORECASE)) for g, rx in PROFILE_GROUPS)


def group_of(name):
    """The PROFILE_GROUPS group of an event name ("other" when no regex matches)."""
    return next((g for g, rx in _COMPILED_GROUPS if rx.search(name)), OTHER)


def union_us(intervals):
    """Total length of the union of (start, end) intervals."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end <= reach:
            continue
        total += end - max(start, reach)
        reach = end
    return total


def breakdown(events, window):
    """Time per group of `events` [(name, start_us, end_us)] within `window` (start_us, end_us).

    Returns {group: busy us} over GROUPS, where idle = window length - union of all busy
    intervals (clipped to the window). Overlapping events (several streams) each count in their
    group, so the groups may sum to more than the window; they never do on one stream.
    """
    lo, hi = window
    clipped = [(n, max(s, lo), min(e, hi)) for n, s, e in events if min(e, hi) > max(s, lo)]
    out = dict.fromkeys(GROUPS, 0.0)
    for name, start, end in clipped:
        out[group_of(name)] += end - start
    out[IDLE] = (hi - lo) - union_us([(s, e) for _, s, e in clipped])
    return out


def gemm_train_flops(model, batch, mask_ratio):
    """FLOPs of a train step's GEMMs (linears, patch embedding; forward and the two backward
    products): 2 x 3 x the model's multiply-accumulates without attention's q.k^T / attn.v and
    the LayerNorm counts (maskdit_fast.flops.model_flops)."""
    m = model_flops(model, mask_ratio=mask_ratio, batch=batch)
    return 6 * (m["total"] - m["attention"] - m["norm"])


def step_events(prof, device):
    """[(name, start_us, end_us)] of the profiled steps and the window (start_us, end_us): device
    kernels on a GPU, the outermost ops of each step on a CPU (see the module docstring)."""
    events = prof.events()
    marks = [e for e in events if e.name == STEP_MARK and e.device_type == torch.autograd.DeviceType.CPU]
    if not marks:
        raise RuntimeError(f"the profile holds no {STEP_MARK!r} range")
    if torch.device(device).type == "cuda":
        picked = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA
                  and not getattr(e, "is_user_annotation", False)]
    else:
        picked = [e for e in events if e.cpu_parent is not None and e.cpu_parent.name == STEP_MARK]
    out = [(e.name, e.time_range.start, e.time_range.end) for e in picked]
    start = min(m.time_range.start for m in marks)
    end = max([m.time_range.end for m in marks] + [e for _, _, e in out])
    return out, (start, end)


def profile_variant(cfg):
    """The variant the profile runs: the fused eager step where it can run, else (CPU) the
    reference, which is what "auto" runs there."""
    variants = {v.label: v for v in train_variants(cfg)}
    fused = variants[f"MaskDiT-{cfg.train_size} fused"]
    return fused if train_unavailable(fused, cfg) is None else variants[f"MaskDiT-{cfg.train_size} reference"]


def run_profile(cfg, peaks=None):
    """Profiles cfg.profile["steps"] steps (after its warm-up steps) of profile_variant(cfg) at
    cfg.profile's batch and latent size. Returns the section's dict: groups [{group, ms, share}] per
    step, the GEMMs' TFLOP/s, the largest "other" names, the rule."""
    from torch.profiler import ProfilerActivity, profile, record_function
    p, device = cfg.profile, torch.device(cfg.device)
    variant = profile_variant(cfg)
    step, model, warmup = build_train_step(variant, p["batch"], p["input_size"], device, cfg.dtype,
                                           cfg.compile_backend)
    for _ in range(max(p["warmup"], warmup)):
        step()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(p["steps"]):
            with record_function(STEP_MARK):
                step()
        if cuda:
            torch.cuda.synchronize(device)
    events, window = step_events(prof, device)
    steps = p["steps"]
    times = breakdown(events, window)
    step_ms = (window[1] - window[0]) / 1e3 / steps
    groups = [dict(group=g, ms=times[g] / 1e3 / steps, share=times[g] / (window[1] - window[0])) for g in GROUPS]
    gemm_flops = gemm_train_flops(model, p["batch"], variant.mask_ratio)
    gemm_ms = times["gemm"] / 1e3 / steps
    others = {}
    for name, start, end in events:
        if group_of(name) == OTHER:
            others[name] = others.get(name, 0.0) + (end - start) / 1e3 / steps
    out = dict(variant=variant.label, backend=variant.backend, batch=p["batch"], input_size=p["input_size"],
               steps=steps, events="device kernels" if cuda else "outermost CPU ops", step_ms=step_ms,
               images_per_s=p["batch"] / step_ms * 1e3, groups=groups, gemm_flops_per_step=gemm_flops,
               gemm_TFLOPs=gemm_flops / gemm_ms / 1e9 if gemm_ms > 0 else None,
               top_other=[dict(name=n[:120], ms=ms) for n, ms in sorted(others.items(), key=lambda kv: -kv[1])[:8]],
               rule=[dict(group=g, regex=rx) for g, rx in PROFILE_GROUPS])
    if peaks and peaks.get("matmul_TFLOPs") and out["gemm_TFLOPs"]:
        out["gemm_pct_of_peak"] = 100 * out["gemm_TFLOPs"] / peaks["matmul_TFLOPs"]
    return out
