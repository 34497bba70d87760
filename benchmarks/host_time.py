"""Host time of each op's forward + backward: the Python side with the device work stubbed out, on the CPU.

    python benchmarks/host_time.py [--out PREFIX] [--calls N]   # -> benchmarks/results/<date>-cpu-host-time.{md,json}

Paths, each at the MaskDiT-XL/2 shapes (bf16; B=256, L=256 tokens of which K=128 kept, width 1152 / decoder 512,
16 heads of 72):
  triton  the public op with backend="triton": the checks, the autograd.Function, the op dispatch, the launcher
          (configuration lookup, allocations) up to the kernel launch, which is replaced by a no-op counter
          (kernels._common.launch; the launch itself, triton's binder plus its C launcher, is not counted);
  cuda    backend="cuda": the same up to the csrc/ ops, stood in for by Python ops of the same schemas
          (csrc/ext.cpp) whose CPU kernels only allocate the outputs (the ops' own fake implementations);
  torch   backend="torch", the reference in eager mode. Its device work cannot be stubbed, so it runs where that
          work costs nothing next to its dispatch: the same calls at a compute-free size (B=2, L=4, K=2, D=8, one
          head of 8), i.e. a lower bound of its host time at any size.
Large CPU allocations come from the heap (glibc's mmap threshold raised; the script re-executes itself with
MALLOC_MMAP_THRESHOLD_ set), as the CUDA caching allocator serves them on a GPU. Median of many calls, one
process, one thread, the paths of an op timed in turn (round robin). The "registration idioms" section times one forward + backward of a trivial op registered
each way this package could (the choice behind maskdit_fast.backend.define_op).
"""
import argparse
import datetime
import functools
import json
import os
import platform
import re
import statistics
import sys
import time

os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton ops accept CPU tensors; every launch is stubbed
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
HEAP_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 34), "MALLOC_TRIM_THRESHOLD_": str(1 << 36), "MALLOC_TOP_PAD_": "0"}

import torch  # noqa: E402

from maskdit_fast import backend, ops  # noqa: E402
from maskdit_fast.indexing import cu_seqlens_from_counts, random_keep_ids, random_packed_ids  # noqa: E402
from maskdit_fast.kernels import _common  # noqa: E402

gs = sys.modules["maskdit_fast.ops.gather_scatter"]
md = sys.modules["maskdit_fast.ops.modulate"]
rm = sys.modules["maskdit_fast.ops.residual_modulate"]
attn = sys.modules["maskdit_fast.ops.attention"]
XL = dict(B=256, L=256, K=128, D=1152, DD=512, H=16, Dh=72)
TINY = dict(B=2, L=4, K=2, D=8, DD=8, H=1, Dh=8)
PATHS = ("torch", "triton", "cuda")
CUDA_OPS = ("gather_tokens", "scatter_tokens", "layernorm_modulate", "gated_residual", "residual_layernorm_modulate")


def _cases(s, dtype=torch.bfloat16):
    """name -> (shape label, fn(backend) -> output, leaves needing grads); inputs built once."""
    g = torch.Generator().manual_seed(0)

    def leaf(*shape):
        return torch.empty(*shape, dtype=dtype).requires_grad_()

    B, L, K, D, DD, H, Dh = (s[k] for k in ("B", "L", "K", "D", "DD", "H", "Dh"))
    ids = random_keep_ids(B, L, K, g)
    counts = torch.full((B,), K) + torch.arange(B) % 3 - 1  # per-sample keep counts around K
    packed, cu = random_packed_ids(counts, L, g), cu_seqlens_from_counts(counts)
    x, pos, xk, fill, dpos = leaf(B, L, D), leaf(1, L, D), leaf(B, K, DD), leaf(1, 1, DD), leaf(1, L, DD)
    xp, h, y = leaf(packed.numel(), DD), leaf(B, K, D), leaf(B, K, D)
    c1, c2, c3 = leaf(B, D), leaf(B, D), leaf(B, D)
    qkv, q, k, v = leaf(B, K, 3, H, Dh), leaf(B, K, H, Dh), leaf(B, K, H, Dh), leaf(B, K, H, Dh)
    nv = dict(validate=False)
    return {
        "gather_tokens": (f"[{B},{L},{D}] -> [{B},{K},{D}] +pos", lambda b: ops.gather_tokens(x, ids, pos, backend=b, **nv),
                          (x, pos)),
        "scatter_tokens": (f"[{B},{K},{DD}] -> [{B},{L},{DD}] +mask +pos",
                           lambda b: ops.scatter_tokens(xk, ids, fill, L, dpos, backend=b, **nv), (xk, fill, dpos)),
        "gather_tokens_varlen": (f"[{B},{L},{D}] -> [{packed.numel()},{D}] +pos",
                                 lambda b: ops.gather_tokens_varlen(x, packed, cu, pos, backend=b, **nv), (x, pos)),
        "scatter_tokens_varlen": (f"[{packed.numel()},{DD}] -> [{B},{L},{DD}] +mask +pos",
                                  lambda b: ops.scatter_tokens_varlen(xp, packed, cu, fill, L, dpos, backend=b, **nv),
                                  (xp, fill, dpos)),
        "layernorm_modulate": (f"[{B},{K},{D}], per-sample [{B},{D}]",
                               lambda b: ops.layernorm_modulate(h, c1, c2, backend=b), (h, c1, c2)),
        "gated_residual": (f"[{B},{K},{D}], per-sample gate", lambda b: ops.gated_residual(h, y, c1, backend=b),
                           (h, y, c1)),
        "residual_layernorm_modulate": (f"[{B},{K},{D}], per-sample [{B},{D}]",
                                        lambda b: ops.residual_layernorm_modulate(h, y, c1, c2, c3, backend=b),
                                        (h, y, c1, c2, c3)),
        "attention": (f"q, k, v [{B},{K},{H},{Dh}]", lambda b: ops.attention(q, k, v, backend=b), (q, k, v)),
        "attention_qkvpacked": (f"qkv [{B},{K},3,{H},{Dh}]", lambda b: ops.attention_qkvpacked(qkv, backend=b), (qkv,)),
    }


class _Stubs:
    """Device work stubbed out for the benchmark's lifetime: Triton launches counted instead of run, csrc/ ops
    stood in for by Python ops that only allocate, the "cuda" back-end resolved on CPU tensors."""

    def __init__(self):
        self.launches = 0
        _common.launch = self._launch
        self.cuda = self._stand_in_extension()
        for module in (gs, md, rm):
            module.resolve_backend = self._resolve(module.resolve_backend)

    def _launch(self, *args, **kwargs):
        self.launches += 1

    @staticmethod
    def _resolve(real):
        def resolve(backend, device, cuda_impl=True, op=None):
            return "cuda" if backend == "cuda" and cuda_impl else real(backend, device, cuda_impl, op)
        return resolve

    @staticmethod
    def _stand_in_extension():
        """Defines torch.ops.maskdit_fast_C from csrc/ext.cpp's schemas with allocate-only CPU kernels (unless the
        real extension is loaded here); returns whether the cuda path can be timed."""
        if hasattr(torch.ops.maskdit_fast_C, "gather_tokens"):
            return False  # a real build is loaded: its CUDA kernels cannot run on CPU tensors
        with open(os.path.join(ROOT, "csrc", "ext.cpp")) as f:
            source = re.sub(r'"\s*\n\s*"', "", f.read())  # join the split string literals
        lib = torch.library.Library("maskdit_fast_C", "DEF")
        fakes = {**gs.CUDA_FAKES, **md.CUDA_FAKES, **rm.CUDA_FAKES}
        for schema in re.findall(r'm\.def\("([^"]+)"\)', source):
            name = schema.split("(", 1)[0]
            lib.define(schema)
            lib.impl(name, fakes[name], "CPU")
        for fakes, register in backend._pending_fakes:  # what loading the extension does: the op files' fakes
            backend._register_fakes(fakes, register)
        _Stubs.library = lib  # kept alive: the ops live as long as their Library object
        return True


def _zero_grads(out):
    """Output grads of zeros for an op's output (a tensor, or a tuple of them)."""
    return tuple(map(torch.zeros_like, out)) if isinstance(out, tuple) else torch.zeros_like(out)


def _time(cases, calls, warmup):
    """Median seconds of one forward + backward of each (fn, leaves) case over `calls` calls, the cases called in
    turn (round robin) so that a load change on the machine affects all of them alike: torch.autograd.grad of the
    leaves for a preallocated output grad (no accumulation into .grad, which would copy a grad the caller still
    holds)."""
    grads = [_zero_grads(fn()) for fn, _ in cases]
    times = [[] for _ in cases]
    for _ in range(warmup + calls):
        for (fn, leaves), grad, samples in zip(cases, grads, times):
            start = time.perf_counter()
            torch.autograd.grad(fn(), leaves, grad)
            samples.append(time.perf_counter() - start)
    return [statistics.median(samples[warmup:]) for samples in times]


def _launch_counts(stubs, fn, leaves):
    """(launches in the forward, launches in the backward)."""
    stubs.launches = 0
    out = fn()
    forward = stubs.launches
    torch.autograd.grad(out, leaves, _zero_grads(out))
    return forward, stubs.launches - forward


def measure_ops(calls, warmup):
    stubs = _Stubs()
    xl, tiny = _cases(XL), _cases(TINY)
    rows = []
    for name, (shape, fn, leaves) in xl.items():
        tiny_shape, tiny_fn, tiny_leaves = tiny[name]
        paths = [p for p in ("triton", "cuda") if p == "triton" or (name in CUDA_OPS and stubs.cuda)]
        torch_s, *seconds = _time([(functools.partial(tiny_fn, "torch"), tiny_leaves)]
                                  + [(functools.partial(fn, p), leaves) for p in paths], calls, warmup)
        rows.append(dict(op=name, path="torch", shape=tiny_shape, us=torch_s * 1e6, vs_torch=1.0))
        for path, s in zip(paths, seconds):
            fwd, bwd = _launch_counts(stubs, functools.partial(fn, path), leaves) if path == "triton" else (None, None)
            rows.append(dict(op=name, path=path, shape=shape, us=s * 1e6, vs_torch=s / torch_s,
                             launches_fwd=fwd, launches_bwd=bwd))
    return rows


def measure_idioms(calls, warmup):
    """One forward + backward of a trivial op (outputs from empty_like) registered each way."""
    from torch import Tensor
    lib = torch.library.Library("host_time_idioms", "FRAGMENT")

    def fwd(x: Tensor, y: Tensor) -> Tensor:
        return torch.empty_like(x)

    def bwd(g: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        return torch.empty_like(g), torch.empty_like(y)

    def setup(ctx, inputs, output):
        ctx.save_for_backward(inputs[1])

    custom_fwd = torch.library.custom_op("host_time_idioms::custom_fwd", fwd, mutates_args=())
    custom_bwd = torch.library.custom_op("host_time_idioms::custom_bwd", bwd, mutates_args=())
    custom_fwd.register_autograd(lambda ctx, g: custom_bwd(g, ctx.saved_tensors[0]), setup_context=setup)
    triton_fwd = torch.library.triton_op("host_time_idioms::triton_fwd", fwd, mutates_args=())
    triton_bwd = torch.library.triton_op("host_time_idioms::triton_bwd", bwd, mutates_args=())
    triton_fwd.register_autograd(lambda ctx, g: triton_bwd(g, ctx.saved_tensors[0]), setup_context=setup)
    from maskdit_fast.backend import define_op
    defined_fwd = define_op(lib, "defined_fwd(Tensor x, Tensor y) -> Tensor", fwd, fwd)
    defined_bwd = define_op(lib, "defined_bwd(Tensor g, Tensor y) -> (Tensor, Tensor)", bwd, bwd)

    class Defined(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, y):
            ctx.save_for_backward(y)
            return defined_fwd(x, y)

        @staticmethod
        def backward(ctx, g):
            return defined_bwd(g, ctx.saved_tensors[0])

    x, y = torch.empty(4, 8).requires_grad_(), torch.empty(4, 8).requires_grad_()
    idioms = {"torch.library.custom_op + register_autograd": custom_fwd,
              "torch.library.triton_op + register_autograd": triton_fwd,
              "Library define/impl + autograd.Function (maskdit_fast)": Defined.apply,
              "torch eager x * y (for scale)": torch.mul}
    seconds = _time([(functools.partial(fn, x, y), (x, y)) for fn in idioms.values()], calls, warmup)
    rows = [dict(idiom=name, us=s * 1e6) for name, s in zip(idioms, seconds)]
    del lib
    return rows


def environment():
    import triton
    return dict(date=str(datetime.date.today()), machine=f"{platform.machine()} CPU, {os.cpu_count()} cores "
                f"({platform.processor() or platform.platform()})", python=platform.python_version(),
                torch=torch.__version__, triton=triton.__version__, threads=torch.get_num_threads(),
                heap_allocations=all(os.environ.get(k) == v for k, v in HEAP_ENV.items()))


def to_markdown(report):
    env = report["environment"]
    lines = [f"# Host time of the ops, forward + backward, device work stubbed out ({env['date']})", "",
             f"{env['machine']}; python {env['python']}, torch {env['torch']}, triton {env['triton']}, "
             f"{env['threads']} thread; {report['calls']} calls per row (median), large allocations from the heap: "
             f"{env['heap_allocations']}. `python benchmarks/host_time.py` (the module docstring says what each path "
             "times). triton/cuda at the MaskDiT-XL/2 shapes (bf16); torch eager at a compute-free size, its "
             "dispatch alone.", "",
             "| op | path | shape | µs per fwd+bwd | vs torch eager | Triton launches fwd / bwd |", "|---|---|---|---|---|---|"]
    for r in report["ops"]:
        launches = "" if r.get("launches_fwd") is None else f"{r['launches_fwd']} / {r['launches_bwd']}"
        lines.append(f"| {r['op']} | {r['path']} | {r['shape']} | {r['us']:.0f} | {r['vs_torch']:.2f}x | {launches} |")
    worst = max((r for r in report["ops"] if r["path"] != "torch"), key=lambda r: r["vs_torch"])
    lines += ["", f"Worst compiled-path ratio: {worst['vs_torch']:.2f}x ({worst['op']}, {worst['path']}).", "",
              "## Registration idioms", "", "One forward + backward of a trivial op (its kernels only allocate):", "",
              "| idiom | µs per fwd+bwd |", "|---|---|"]
    lines += [f"| {r['idiom']} | {r['us']:.1f} |" for r in report["idioms"]]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results",
                                                      f"{datetime.date.today()}-cpu-host-time"))
    parser.add_argument("--calls", type=int, default=400, help="timed calls per row (median)")
    parser.add_argument("--quick", action="store_true", help="a few calls per row (tests: the code path only)")
    args = parser.parse_args(argv)
    calls, warmup = (3, 1) if args.quick else (args.calls, max(20, args.calls // 10))
    torch.set_num_threads(1)
    report = dict(calls=calls, environment=environment(), ops=measure_ops(calls, warmup),
                  idioms=measure_idioms(calls, warmup))
    with open(args.out + ".json", "w") as f:
        json.dump(report, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(to_markdown(report))
    print(to_markdown(report))
    return report


if __name__ == "__main__":
    if not all(os.environ.get(k) == v for k, v in HEAP_ENV.items()):  # glibc reads these at start-up
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **HEAP_ENV})
    main()
