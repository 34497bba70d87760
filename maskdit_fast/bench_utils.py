"""Timing, peak-measurement and cost-counting helpers shared by `maskdit_fast.bench` and benchmarks/.

Timing rules (why each one):
- CUDA events around every call on GPU (GPU time, not Python/launch time of the caller), and
  time.perf_counter on CPU; the same `Timer` API on both so the report logic runs on CPU too.
- Warm-up calls first (autotuning, allocator, clocks), then the median of many calls (robust to
  stragglers); p10/p90 are recorded to show the spread.
- Rotating input sets whose total size exceeds twice the L2 cache (50 MB on H100): a call never
  finds its inputs in L2 left there by the previous call, so bandwidth figures are HBM figures.

Cost conventions (the "floor" a kernel is compared with): bytes are the minimum HBM traffic an ideal
fused kernel needs, reads + writes, each tensor touched once; FLOPs count a multiply-add as 2.
`Cost.bytes` of a memory-bound op over the measured copy bandwidth, or `Cost.flops` of a
compute-bound op over the measured bf16 matmul peak, is the floor time; "% of floor" is
floor time / measured time (100% = at the measured peak).
"""
import dataclasses
import importlib.metadata
import math
import platform
import statistics
import subprocess
import time

import torch

INDEX_BYTES = 8  # ids_keep is int64


# --------------------------------------------------------------------------------------- timing

@dataclasses.dataclass
class Stats:
    """Summary of per-call times in milliseconds."""
    median_ms: float
    p10_ms: float
    p90_ms: float
    n: int

    @classmethod
    def from_times(cls, times_ms):
        """times_ms: non-empty sequence of per-call times (ms)."""
        if not times_ms:
            raise ValueError("Stats.from_times needs at least one time")
        ordered = sorted(times_ms)
        q = lambda p: ordered[min(len(ordered) - 1, int(round(p * (len(ordered) - 1))))]  # noqa: E731
        return cls(statistics.median(ordered), q(0.1), q(0.9), len(ordered))


class Timer:
    """Times individual calls on `device`: CUDA events on a CUDA device, perf_counter elsewhere.

    `timer(fn, *args)` runs fn(*args) between two markers and returns its result; `times_ms()`
    synchronizes once and returns every call's time. Events are only read at the end, so GPU calls
    are queued back to back as in training.
    """

    def __init__(self, device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self._marks = []

    def __call__(self, fn, *args, **kwargs):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn(*args, **kwargs)
            end.record()
        else:
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            end = time.perf_counter()
        self._marks.append((start, end))
        return out

    def reset(self):
        """Forgets the calls timed so far."""
        self._marks.clear()

    def times_ms(self):
        """Per-call times in ms, in call order (synchronizes the device once)."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return [s.elapsed_time(e) for s, e in self._marks]
        return [(e - s) * 1e3 for s, e in self._marks]


def cache_bytes(device):
    """Bytes of last-level cache that rotating inputs must defeat: the GPU's L2, 0 on CPU (CPU
    figures are not bandwidth figures here)."""
    device = torch.device(device)
    if device.type != "cuda":
        return 0
    return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20))


def rotation_count(bytes_per_set, cache, max_sets=64):
    """Number of input sets so that the sets together exceed twice `cache` bytes (at least 1)."""
    if bytes_per_set <= 0:
        raise ValueError(f"bytes_per_set must be positive, got {bytes_per_set}")
    return max(1, min(max_sets, math.ceil(2 * cache / bytes_per_set)))


class Rotation:
    """Calls fn(*sets[i]) on the next input set each time it is called (round robin)."""

    def __init__(self, fn, sets):
        if not sets:
            raise ValueError("Rotation needs at least one input set")
        self.fn, self.sets, self._i = fn, list(sets), 0

    def __call__(self):
        args = self.sets[self._i % len(self.sets)]
        self._i += 1
        return self.fn(*args)


def time_calls(call, device, warmup=5, reps=30, timer=None):
    """Times `call()` (no arguments; e.g. a Rotation) after `warmup` untimed calls.

    Returns Stats over `reps` calls. `timer` defaults to Timer(device); pass another object with the
    same interface to stand in for it.
    """
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    for _ in range(warmup):
        call()
    timer = timer or Timer(device)
    timer.reset()
    for _ in range(reps):
        timer(call)
    return Stats.from_times(timer.times_ms())


def time_graph_replays(call, calls_per_graph, device, warmup=2, reps=30, timer=None):
    """Device time of `call()` without the host's share: `calls_per_graph` consecutive calls (one per
    input set of a Rotation, so the inputs still come from HBM) captured into one CUDA graph, whose
    replays are timed. Eager timings of a host-bound op include its Python / launch time; these don't.

    Returns Stats per call (replay times / calls_per_graph). CUDA only; raises what capture raises
    (e.g. an op that synchronizes).
    """
    device = torch.device(device)
    if device.type != "cuda":
        raise RuntimeError("CUDA-graph timing needs a CUDA device")
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # lazy init, compilation and allocator growth stay out of the capture
        for _ in range(warmup * calls_per_graph):
            call()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls_per_graph):
            call()
    stats = time_calls(graph.replay, device, warmup=1, reps=reps, timer=timer)
    return Stats(stats.median_ms / calls_per_graph, stats.p10_ms / calls_per_graph,
                 stats.p90_ms / calls_per_graph, stats.n)


# ---------------------------------------------------------------------------------------- costs

@dataclasses.dataclass(frozen=True)
class Cost:
    """Minimum work of one call: HBM bytes (read + written) and FLOPs."""
    bytes: int = 0
    flops: int = 0

    def __add__(self, other):
        return Cost(self.bytes + other.bytes, self.flops + other.flops)


def gather_tokens_cost(B, L, K, D, elem, pos_embed=True):
    """gather_tokens [B, L, D] -> [B, K, D] (pos_embed [L, D] is a fixed buffer, no grad).

    fwd: reads the B*K kept rows of x (B*K*D), the index (B*K int64), pos_embed once (L*D);
         writes B*K*D.
    bwd (grad of x): reads grad_out B*K*D and the index; writes grad_x B*L*D (zeros at masked rows).
    Returns (fwd, bwd) Costs.
    """
    fwd = Cost(elem * (2 * B * K * D + (L * D if pos_embed else 0)) + INDEX_BYTES * B * K,
               B * K * D if pos_embed else 0)
    bwd = Cost(elem * (B * K * D + B * L * D) + INDEX_BYTES * B * K)
    return fwd, bwd


def scatter_tokens_cost(B, L, K, D, elem, pos_embed=True):
    """scatter_tokens [B, K, D] (+ mask_token [D]) -> [B, L, D].

    fwd: reads x_kept B*K*D, the index B*K, mask_token D, pos_embed L*D; writes B*L*D.
    bwd: reads grad_out B*L*D (kept rows for grad_x_kept, masked rows for grad_mask_token) and the
         index; writes grad_x_kept B*K*D and grad_mask_token D.
    Returns (fwd, bwd) Costs.
    """
    fwd = Cost(elem * (B * K * D + D + B * L * D + (L * D if pos_embed else 0)) + INDEX_BYTES * B * K,
               B * L * D if pos_embed else 0)
    bwd = Cost(elem * (B * L * D + B * K * D + D) + INDEX_BYTES * B * K, B * (L - K) * D)
    return fwd, bwd


def layernorm_modulate_cost(B, N, D, elem):
    """layernorm_modulate x [B, N, D], shift/scale [B, D] -> [B, N, D].

    fwd: reads x, shift, scale; writes out (fp32 statistics stay on chip): 2*B*N*D + 2*B*D.
    bwd: reads x and grad_out, scale; writes grad_x, grad_shift, grad_scale (statistics recomputed):
         3*B*N*D + 3*B*D.
    FLOPs ~ 8 per element fwd, 16 bwd (not the limit; recorded for completeness).
    Returns (fwd, bwd) Costs.
    """
    n = B * N * D
    return Cost(elem * (2 * n + 2 * B * D), 8 * n), Cost(elem * (3 * n + 3 * B * D), 16 * n)


def gated_residual_cost(B, N, D, elem):
    """gated_residual x + gate[:, None] * y, x/y [B, N, D], gate [B, D].

    fwd: reads x, y, gate; writes out: 3*B*N*D + B*D.
    bwd: grad_x is grad_out itself (no traffic); reads grad_out, y, gate; writes grad_y and
         grad_gate: 3*B*N*D + 2*B*D.
    Returns (fwd, bwd) Costs.
    """
    n = B * N * D
    return Cost(elem * (3 * n + B * D), 2 * n), Cost(elem * (3 * n + 2 * B * D), 4 * n)


def attention_cost(B, H, Lq, Lk, Dh, elem):
    """Attention q [B, Lq, H, Dh], k/v [B, Lk, H, Dh].

    fwd FLOPs: QK^T and PV, 4*B*H*Lq*Lk*Dh. bwd: 2.5x fwd (recompute QK^T, then dV, dP, dQ, dK:
    five matmuls), FlashAttention's convention. Bytes: q, k, v, out read/written once (fwd), plus
    grad_out, grads of q, k, v and out re-read (bwd).
    Returns (fwd, bwd) Costs.
    """
    io = elem * H * Dh * B
    f = 4 * B * H * Lq * Lk * Dh
    return Cost(io * (2 * Lq + 2 * Lk), f), Cost(io * (4 * Lq + 4 * Lk), int(2.5 * f))


def varlen_attention_cost(seqlens_q, seqlens_k, H, Dh, elem):
    """Variable-length attention over packed sequences: the sum of attention_cost per sequence."""
    if len(seqlens_q) != len(seqlens_k):
        raise ValueError("seqlens_q and seqlens_k must have the same length")
    fwd, bwd = Cost(), Cost()
    for lq, lk in zip(seqlens_q, seqlens_k):
        f, b = attention_cost(1, H, int(lq), int(lk), Dh, elem)
        fwd, bwd = fwd + f, bwd + b
    return fwd, bwd


def achieved(cost, ms, peaks, bound):
    """Figures for one timing: achieved GB/s and TFLOP/s, and % of floor.

    cost: Cost of the timed call. ms: median time. peaks: {"copy_GBps", "matmul_TFLOPs"} measured
    in this process (missing -> no % figure). bound: "memory" or "compute" (which floor applies).
    """
    if bound not in ("memory", "compute"):
        raise ValueError(f"bound must be 'memory' or 'compute', got {bound!r}")
    out = {"ms": ms, "GBps": cost.bytes / ms / 1e6, "TFLOPs": cost.flops / ms / 1e9,
           "bytes": cost.bytes, "flops": cost.flops, "bound": bound}
    peak_key, fig = ("copy_GBps", "GBps") if bound == "memory" else ("matmul_TFLOPs", "TFLOPs")
    if peaks and peaks.get(peak_key):
        out["pct_of_floor"] = 100.0 * out[fig] / peaks[peak_key]
    return out


# ---------------------------------------------------------------------------------------- peaks

def measure_copy_bandwidth(device, nbytes=1 << 30, warmup=3, reps=20, timer=None):
    """Device copy bandwidth in GB/s, counting bytes read + written (2 * nbytes per copy_)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    stats = time_calls(lambda: dst.copy_(src), device, warmup, reps, timer)
    return {"GBps": 2 * nbytes / stats.median_ms / 1e6, "bytes": 2 * nbytes, "ms": stats.median_ms}


def measure_matmul_peak(device, n=8192, dtype=torch.bfloat16, warmup=5, reps=20, timer=None):
    """Dense matmul throughput in TFLOP/s for an n x n x n product (2*n^3 FLOPs)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    stats = time_calls(lambda: torch.matmul(a, b, out=out), device, warmup, reps, timer)
    return {"TFLOPs": 2 * n**3 / stats.median_ms / 1e9, "n": n, "dtype": str(dtype).replace("torch.", ""),
            "ms": stats.median_ms}


# ---------------------------------------------------------------------------------- environment

def _version(dist):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _driver_version():
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
        return out.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def env_info(device):
    """Card, driver and library versions for the report (no triton import: it is slow and must
    follow TRITON_INTERPRET on CPU)."""
    device = torch.device(device)
    info = {"device": device.type, "torch": torch.__version__, "triton": _version("triton"),
            "python": platform.python_version(), "cuda": torch.version.cuda}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(card=props.name, driver=_driver_version(), sm=f"{props.major}.{props.minor}",
                    memory_GiB=round(props.total_memory / 2**30, 1), sms=props.multi_processor_count,
                    l2_MiB=round(cache_bytes(device) / 2**20, 1))
    else:
        info.update(card=f"cpu ({platform.processor() or platform.machine()})", driver=None,
                    threads=torch.get_num_threads())
    return info
