"""Offline sm_90 compile of every Triton kernel configuration: registers, spills, shared memory. No GPU needed.

Each case runs a production launcher (kernels/*.py) on meta tensors at a MaskDiT-XL/2 shape, under
`_config.override(family, candidate)` for every TUNING candidate (and once with the launcher's default), with the
kernel launch replaced by a recorder; every recorded launch (kernel, arguments, constexprs, num_warps,
num_stages) is then compiled by triton.compile for GPUTarget("cuda", 90, 32) with the specialization a run on
aligned tensors gets (16-byte aligned pointers, integers divisible by 16 marked so unless do_not_specialize), and
ptxas's own report (triton runs it with -v) gives registers and spill bytes; triton's metadata gives shared memory.

    python benchmarks/compile_sm90.py                 # every case -> benchmarks/results/<date>-sm90-compile.{md,json}
    python benchmarks/compile_sm90.py --families gather --out /tmp/x

tests/test_kernel_tuning.py checks that the committed table covers every TUNING candidate without spills.
"""
import argparse
import contextlib
import datetime
import io
import json
import os
import re
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)  # JITFunction kernels: compiled, never run
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from maskdit_fast.kernels import _common, _config, flash_attn, gather_scatter, modulate  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
META = torch.device("meta")
TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64",
         torch.int64: "i64", torch.int32: "i32"}
# MaskDiT-XL/2: 256 tokens of which 128 kept, encoder width 1152 (16 heads of 72), decoder width 512 (16 of 32).
B, L, K, WIDTHS = 256, 256, 128, (1152, 512)
ATTENTION = ((72, 128), (32, 256))  # (head dim, tokens): encoder, decoder
HEADS = 16


def _meta(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, dtype=dtype, device=META)


def _ids(*shape):
    return torch.empty(*shape, dtype=torch.int64, device=META)


def _glue_calls(family, D):
    """The launcher calls of one glue family at width D (bf16, per-sample conditioning, every gradient)."""
    x = _meta(B, K, D)
    cond = _meta(B, D)
    if family == "ln_modulate_fwd":
        return [lambda: modulate.layernorm_modulate_fwd(x, cond, cond, 1e-6)]
    if family == "ln_modulate_bwd":
        return [lambda: modulate.layernorm_modulate_bwd(x, x, cond, cond, 1e-6)]
    if family == "gated_residual_fwd":
        return [lambda: modulate.gated_residual_fwd(x, x, cond)]
    if family == "gated_residual_bwd":
        return [lambda: modulate.gated_residual_bwd(x, x, cond)]
    ids, grid, pos = _ids(B, K), _meta(B, L, D), _meta(L, D)
    packed, cu, rows = _ids(B * K), torch.empty(B + 1, dtype=torch.int32, device=META), _meta(B * K, D)
    if family == "gather":  # dense and packed layouts
        return [lambda: gather_scatter.gather_fwd(grid, ids, None, pos),
                lambda: gather_scatter.gather_bwd(x, ids, None, L, torch.bfloat16, True, torch.bfloat16),
                lambda: gather_scatter.gather_fwd(grid, packed, cu, pos),
                lambda: gather_scatter.gather_bwd(rows, packed, cu, L, torch.bfloat16, True, torch.bfloat16)]
    inv = torch.empty(B, L, dtype=torch.int32, device=META)
    return [lambda: gather_scatter.scatter_fwd(x, ids, None, _meta(D), L, pos),
            lambda: gather_scatter.scatter_bwd(grid, ids, inv, torch.bfloat16, True, torch.bfloat16, True,
                                               torch.bfloat16),
            lambda: gather_scatter.scatter_fwd(rows, packed, cu, _meta(D), L, pos)]


def _attention_calls(family, head_dim, length):
    """The launcher calls of one attention family, bf16: dense self-attention on a packed qkv (the model), and
    varlen causal attention (cu_seqlens; the general API)."""
    n = (B * K) // length * length
    qkv = _meta(n, 3, HEADS, head_dim)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    cu = torch.empty(n // length + 1, dtype=torch.int32, device=META)
    scale = head_dim ** -0.5
    if family == "attn_fwd":
        return [lambda: flash_attn.varlen_fwd(q, k, v, None, None, length, length, scale, False),
                lambda: flash_attn.varlen_fwd(q, k, v, cu, cu, length, length, scale, True)]
    out, lse = _meta(n, HEADS, head_dim), torch.empty(HEADS, n, device=META)
    return [lambda: flash_attn.varlen_bwd(out, q, k, v, out, lse, None, None, length, length, scale, False, q, k, v),
            lambda: flash_attn.varlen_bwd(out, q, k, v, out, lse, cu, cu, length, length, scale, True, q, k, v)]


def cases(families):
    """(family, shape label, config label, config or None for the default, calls)."""
    out = []
    for module in (modulate, gather_scatter, flash_attn):
        for family, candidates in module.TUNING.items():
            if families and family not in families:
                continue
            shapes = ([(f"Dh={d},L={n}", lambda f=family, d=d, n=n: _attention_calls(f, d, n)) for d, n in ATTENTION]
                      if family.startswith("attn") else
                      [(f"D={w}", lambda f=family, w=w: _glue_calls(f, w)) for w in WIDTHS])
            for shape, calls in shapes:
                out.append((family, shape, "default", None, calls))
                for i, cfg in enumerate(candidates):
                    out.append((family, shape, f"candidate {i}", cfg, calls))
    return out


def _recorded(calls, family, config):
    """The launches the calls make (kernel, args, meta), with `config` forced for `family` when given."""
    launches = []
    real = _common.launch
    _common.launch = lambda kernel, grid, *args, **meta: launches.append((kernel, args, meta))
    try:
        with _config.override(family, config) if config else contextlib.nullcontext():
            for call in calls():
                call()
    finally:
        _common.launch = real
    return launches


def _source(kernel, args, meta):
    """ASTSource with the specialization of a run on aligned tensors; (source, num_warps, num_stages)."""
    values = dict(zip(kernel.arg_names, args))
    values.update({k: v for k, v in meta.items() if k in kernel.arg_names})
    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(kernel.params):
        name, value = kernel.arg_names[i], values[kernel.arg_names[i]]
        if param.is_constexpr or value is None:
            signature[name], constexprs[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + TYPES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if not param.do_not_specialize and value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "fp32"
    return ASTSource(kernel, signature, constexprs, attrs), meta.get("num_warps", 4), meta.get("num_stages", 3)


def compile_one(kernel, args, meta):
    """{"kernel", "num_warps", "num_stages", "registers", "spill_stores", "spill_loads", "shared_bytes", ...}."""
    src, warps, stages = _source(kernel, args, meta)
    log = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(src, target=TARGET, options={"num_warps": warps, "num_stages": stages})
    text = log.getvalue()
    regs = re.findall(r"Used (\d+) registers", text)
    stores = re.findall(r"(\d+) bytes spill stores", text)
    loads = re.findall(r"(\d+) bytes spill loads", text)
    return {"kernel": kernel.__name__, "num_warps": warps, "num_stages": stages,
            "constexprs": {k: str(v) for k, v in meta.items() if k not in ("num_warps", "num_stages")},
            "registers": max(map(int, regs)) if regs else None,
            "spill_stores": sum(map(int, stores)) if stores else None,
            "spill_loads": sum(map(int, loads)) if loads else None,
            "shared_bytes": compiled.metadata.shared, "compile_s": round(time.perf_counter() - start, 2)}


def run(families=None):
    knobs.nvidia.dump_ptxas_log = True  # ptxas -v output, printed by triton: registers and spills
    knobs.compilation.always_compile = True  # a cache hit would skip ptxas and its report
    rows, seen = [], {}
    for family, shape, label, config, calls in cases(families):
        for kernel, args, meta in _recorded(calls, family, config):
            key = (kernel.__name__, repr(sorted((k, str(v)) for k, v in meta.items())),
                   tuple(str(a.dtype) if isinstance(a, torch.Tensor) else a for a in args))
            if key not in seen:  # the same launch under two labels (e.g. a candidate equal to the default)
                seen[key] = compile_one(kernel, args, meta)
            row = {"family": family, "shape": shape, "config": label, "candidate": config, **seen[key]}
            rows.append(row)
            print(f"{family:20s} {shape:12s} {label:13s} {row['kernel']:28s} regs={row['registers']} "
                  f"spills={row['spill_stores']}/{row['spill_loads']} shared={row['shared_bytes']}", flush=True)
    return rows


def write(rows, out):
    header = (f"# Offline sm_90 compile of the Triton kernels ({datetime.date.today()})\n\n"
              f"triton {triton.__version__}, torch {torch.__version__}, target {TARGET}; `python "
              "benchmarks/compile_sm90.py` (no GPU). MaskDiT-XL/2 shapes in bf16: glue at B=256, L=256, K=128, "
              "D=1152 / 512 (gather/scatter: dense and packed layouts); attention, 16 heads, Dh=72 at 128 tokens and "
              "Dh=32 at 256: dense self-attention and varlen causal. "
              "Registers per thread (the max over the launches of a row), spill bytes (stores/loads) from ptxas -v, "
              "shared memory from triton's metadata. `candidate i` is TUNING[family][i] of the kernel module.\n\n"
              "| family | shape | config | kernel | warps | stages | registers | spills (st/ld) | shared B | tiles |\n"
              "|---|---|---|---|---|---|---|---|---|---|\n")
    lines = [f"| {r['family']} | {r['shape']} | {r['config']} | {r['kernel']} | {r['num_warps']} | {r['num_stages']} | "
             f"{r['registers']} | {r['spill_stores']}/{r['spill_loads']} | {r['shared_bytes']} | "
             f"{', '.join(f'{k}={v}' for k, v in r['constexprs'].items() if k.startswith(('BLOCK', 'DQ_')))} |"
             for r in rows]
    with open(out + ".md", "w") as f:
        f.write(header + "\n".join(lines) + "\n")
    with open(out + ".json", "w") as f:
        json.dump({"triton": triton.__version__, "torch": torch.__version__, "target": "cuda sm_90", "rows": rows}, f,
                  indent=1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="*", help="kernel families (default: all)")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results",
                                                      f"{datetime.date.today()}-sm90-compile"))
    args = parser.parse_args(argv)
    rows = run(args.families)
    write(rows, args.out)
    spilled = [r for r in rows if r["spill_stores"]]
    print(f"{len(rows)} launches compiled, {len(spilled)} with spills -> {args.out}.md")
    return 1 if spilled else 0


if __name__ == "__main__":
    raise SystemExit(main())
