"""Timers, CUDA-graph replay timing, section budgets and the measured peaks.

Timing rules (why each one):
- CUDA events around every call on GPU (GPU time, not Python/launch time of the caller), and
  time.perf_counter on CPU; the same `Timer` API on both so the report logic runs on CPU too.
- Warm-up calls first (autotuning, allocator, clocks), then the median of many calls (robust to
  stragglers); p10/p90 are recorded to show the spread.
- Rotating input sets whose total size exceeds twice the L2 cache (50 MB on H100): a call never
  finds its inputs in L2 left there by the previous call, so bandwidth figures are HBM figures.
"""
import dataclasses
import math
import statistics
import time

import torch


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
