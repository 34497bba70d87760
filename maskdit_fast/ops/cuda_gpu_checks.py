"""Accuracy checks of the "cuda" back-end (the csrc/ kernels) against the float64 references, for
the GPU tests (tests/test_ops_cuda.py) and the GPU report (`maskdit_fast.bench` calls run_checks).

The rule is `gpu_checks.check_op`'s: output and every input gradient within twice PyTorch's own
error at that precision (plus one ulp at the output's scale) of the float64 reference. The kernels
allocate their outputs and fp32 partial buffers with at::empty, so they are poisoned by running the
checks with torch's deterministic mode and `fill_uninitialized_memory`, which NaN-fills every
such allocation: an element a kernel fails to write shows up as a failure.

Timings of the "cuda" back-end beside "torch" and "triton" come from the report's ops section
(`maskdit_fast.bench`), which calls the same public ops with backend="cuda".
"""
import contextlib
import functools
import re
import warnings

import torch

from maskdit_fast.ops import gather_scatter as gs
from maskdit_fast.ops import modulate as md
from maskdit_fast.ops.gpu_checks import Check, _determinism_check, _no_sync_check, check_op

OPS = ("gather_tokens", "scatter_tokens", "layernorm_modulate", "gated_residual")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Small odd shapes: token counts (kept = ceil(L / 2)) x widths. 75 is not a multiple of any pack
# width, so it runs the scalar kernels; 72 and 1000 the 16-byte packed ones.
SMALL_L = (1, 7, 256)
SMALL_D = (72, 1000, 75)
CUDA = dict(backend="cuda")


@contextlib.contextmanager
def poisoned_allocations():
    """NaN-fills every tensor allocated inside (torch.empty / at::empty): deterministic mode with
    fill_uninitialized_memory, warn-only so the references' ops still run."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*deterministic.*")
            yield
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = fill
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def _inputs(device, dtype, generator):
    def randn(*shape, grad=True, dt=dtype):
        return torch.randn(*shape, device=device, dtype=dt, generator=generator).requires_grad_(grad)
    return randn


def op_checks(op, B, L, K, D, dtype, device="cuda", seed=0):
    """All variants of one op at [B, L (K kept), D] in `dtype`, each forward and backward.

    Variants: gather_tokens with a [1, L, D] pos_embed (with grad), without one, and (low precision)
    with an fp32 pos_embed (dtype promotion); scatter_tokens with a [1, 1, D] mask token and [L, D]
    pos_embed, and with a [D] mask token and none; layernorm_modulate / gated_residual with
    per-sample [B, D] and per-token [B, L, D] conditioning.
    Returns:
        list of Check(name, max_err, tolerance, passed).
    """
    g = torch.Generator(device=device).manual_seed(seed)
    randn = _inputs(device, dtype, g)
    ids = torch.rand(B, L, device=device, generator=g).argsort(1)[:, :K].contiguous()
    tag = f"[{str(dtype).replace('torch.', '')} B{B} L{L} K{K} D{D}]"
    checks = []
    with poisoned_allocations():
        if op == "gather_tokens":
            fn = functools.partial(gs.gather_tokens, **CUDA)
            checks += check_op(f"gather_tokens{tag}", fn, gs.gather_tokens_ref, (randn(B, L, D), ids, randn(1, L, D)), g)
            checks += check_op(f"gather_tokens no pos{tag}", fn, gs.gather_tokens_ref, (randn(B, L, D), ids), g)
            if dtype != torch.float32:
                checks += check_op(f"gather_tokens fp32 pos{tag}", fn, gs.gather_tokens_ref,
                                   (randn(B, L, D), ids, randn(L, D, dt=torch.float32)), g)
        elif op == "scatter_tokens":
            fn = functools.partial(gs.scatter_tokens, **CUDA)
            checks += check_op(f"scatter_tokens{tag}", fn, gs.scatter_tokens_ref,
                               (randn(B, K, D), ids, randn(1, 1, D), L, randn(L, D)), g)
            checks += check_op(f"scatter_tokens no pos{tag}", fn, gs.scatter_tokens_ref,
                               (randn(B, K, D), ids, randn(D), L), g)
        elif op == "layernorm_modulate":
            fn = functools.partial(md.layernorm_modulate, **CUDA)
            checks += check_op(f"layernorm_modulate{tag}", fn, md.layernorm_modulate_ref,
                               (randn(B, L, D), randn(B, D), randn(B, D)), g)
            checks += check_op(f"layernorm_modulate per-token{tag}", fn, md.layernorm_modulate_ref,
                               (randn(B, L, D), randn(B, L, D), randn(B, L, D)), g)
        elif op == "gated_residual":
            fn = functools.partial(md.gated_residual, **CUDA)
            checks += check_op(f"gated_residual{tag}", fn, md.gated_residual_ref,
                               (randn(B, L, D), randn(B, L, D), randn(B, D)), g)
            checks += check_op(f"gated_residual per-token{tag}", fn, md.gated_residual_ref,
                               (randn(B, L, D), randn(B, L, D), randn(B, L, D)), g)
        else:
            raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
    return checks


def _badness(check):
    """Sort key: failures first, then the largest error relative to the tolerance."""
    ratio = check.max_err / check.tolerance if check.tolerance > 0 else float(check.max_err > 0)
    return (not check.passed, ratio)


def small_shape_checks(device="cuda", B=3, seed=0):
    """Every op and dtype at the small odd shapes (SMALL_L x SMALL_D), summarised as one row per
    variant, tensor and dtype: the worst shape's error and tolerance, passed only if every shape passed."""
    rows = []
    for op in OPS:
        for dtype in DTYPES:
            per_shape = [op_checks(op, B, L, (L + 1) // 2, D, dtype, device, seed) for L in SMALL_L for D in SMALL_D]
            for same in zip(*per_shape):  # one variant and tensor across the shapes
                worst = max(same, key=_badness)
                shape = re.search(r"\[([^\]]*)\]", worst.name).group(1)
                name = re.sub(r"\[[^\]]*\]", "", worst.name)
                rows.append(Check(f"{name} (worst of {len(same)} small shapes: {shape})", worst.max_err,
                                  worst.tolerance, all(c.passed for c in same)))
    return rows


def run_checks(device="cuda", dtype=torch.bfloat16, B=256, L=256, K=128, D=1152, decoder_D=512, seed=0,
               small=True):
    """Checks the "cuda" back-end on `device` at DiT-XL/2 sizes (MaskDiT: 128 of 256 tokens kept,
    encoder width 1152, decoder width 512) in `dtype`, plus (small=True) every op and dtype at small
    odd shapes.

    Returns:
        list of Check(name, max_err, tolerance, passed), including bitwise determinism of the
        reducing backwards and a gather -> modulate -> scatter step that must not wait for the device.
    Raises:
        RuntimeError: the extension is not available (the reason says why).
    """
    from maskdit_fast.ops import cuda_backend
    cuda_backend._ops()  # fails early, with the reason, when the extension is missing
    checks = []
    for op in OPS:
        checks += op_checks(op, B, L, K, D, dtype, device, seed)
    for op in ("scatter_tokens", "layernorm_modulate", "gated_residual"):  # decoder width
        checks += op_checks(op, B, L, K, decoder_D, dtype, device, seed)
    g = torch.Generator(device=device).manual_seed(seed)
    randn = _inputs(device, dtype, g)
    ids = torch.rand(B, L, device=device, generator=g).argsort(1)[:, :K].contiguous()
    checks.append(_determinism_check("cuda scatter_tokens", functools.partial(gs.scatter_tokens, **CUDA),
                                     (randn(B, K, decoder_D), ids, randn(decoder_D), L, randn(L, decoder_D)), g))
    checks.append(_determinism_check("cuda gather_tokens", functools.partial(gs.gather_tokens, **CUDA),
                                     (randn(B, L, D), ids, randn(L, D)), g))
    checks.append(_determinism_check("cuda layernorm_modulate", functools.partial(md.layernorm_modulate, **CUDA),
                                     (randn(B, K, D), randn(B, D), randn(B, D)), g))
    checks.append(_determinism_check("cuda gated_residual", functools.partial(md.gated_residual, **CUDA),
                                     (randn(B, K, D), randn(B, K, D), randn(B, D)), g))
    if torch.device(device).type == "cuda":
        x, pos, shift, scale, fill = randn(B, L, D), randn(1, L, D), randn(B, D), randn(B, D), randn(D)

        def step():
            h = gs.gather_tokens(x, ids, pos, validate=False, **CUDA)
            h = md.gated_residual(h, md.layernorm_modulate(h, shift, scale, **CUDA), scale, **CUDA)
            out = gs.scatter_tokens(h, ids, fill, L, pos, validate=False, **CUDA)
            torch.autograd.grad(out.float().square().sum(), [x, pos, shift, scale, fill])
        checks.append(_no_sync_check("cuda gather/modulate/scatter step", step))
    if small:
        checks += small_shape_checks(device, seed=seed)
    return checks


if __name__ == "__main__":
    rows = run_checks()
    for row in rows:
        print(f"{'ok    ' if row.passed else 'FAILED'} {row.name}: max_err={row.max_err:.3g} tol={row.tolerance:.3g}")
    raise SystemExit(0 if all(r.passed for r in rows) else 1)
