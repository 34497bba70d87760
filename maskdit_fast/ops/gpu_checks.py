"""Accuracy checks of the Triton ops against their float64 references.

`check_op` is the comparison rule used by the tests (CPU, under the Triton interpreter) and by
`run_checks` (CUDA, DiT-XL/2 sizes): the op's output and every input gradient must satisfy

    max |op_lowp - ref_fp64| <= 2 * max |ref_lowp - ref_fp64| + eps(dtype) * max |ref_fp64|

i.e. at most twice PyTorch's own error at that precision plus one unit in the last place at the
output's scale, where ref_fp64 runs the reference on the same (rounded) inputs upcast to float64.
Buffers the Triton launchers allocate are NaN-poisoned during the check, so an element a kernel
fails to write shows up as a failure. (Under the CPU Triton interpreter, fp32 -> bf16 stores round
toward zero instead of to nearest, an interpreter limitation: bf16 results there may be one ulp off,
which the ulp term covers; compiled kernels round to nearest even.)

`run_checks()` returns a list of Check(name, max_err, tolerance, passed) for the GPU report script.
"""
import collections
import contextlib
import inspect
from functools import partial

import torch

from maskdit_fast.masking import cu_seqlens_from_counts, random_packed_ids
from maskdit_fast.ops import gather_scatter as gs
from maskdit_fast.ops import modulate as md

Check = collections.namedtuple("Check", "name max_err tolerance passed")


def _leaf(t, dtype=None):
    """A fresh leaf copy of a float tensor argument (cast to dtype if given); other values unchanged."""
    if not (torch.is_tensor(t) and t.is_floating_point()):
        return t
    return t.detach().to(dtype or t.dtype).requires_grad_(t.requires_grad)


def _forward_backward(fn, args, output_grad, poison):
    """Output and input grads (zeros for unused inputs) of fn(*args) for output grad output_grad(out)."""
    from maskdit_fast.kernels import _common
    diff = [a for a in args if torch.is_tensor(a) and a.requires_grad]
    with _common.poisoned() if poison else contextlib.nullcontext(), torch.enable_grad():
        out = fn(*args)
        grads = torch.autograd.grad(out, diff, output_grad(out), allow_unused=True) if diff else ()
    grads = [torch.zeros_like(a) if g is None else g for a, g in zip(diff, grads)]
    return [out.detach()] + [g.detach() for g in grads]


def _max_abs(t):
    return t.abs().max().item() if t.numel() else 0.0


def check_op(name, op, ref, args, generator=None):
    """Compares op(*args) with ref(*args) in float64 and in the inputs' precision, forward and
    backward (for every floating-point tensor argument with requires_grad).

    Args:
        name: label prefix of the checks.
        op: callable under test (e.g. functools.partial(gather_tokens, backend="triton")).
        ref: the reference callable, same positional arguments.
        args: positional arguments; float tensors run in their own dtype (and in float64 for the
            reference), other values pass through.
        generator: torch.Generator for the random output gradient (on the args' device).
    Returns:
        list of Check(name, max_err, tolerance, passed): "<name> out" and "<name> d<arg>".
    """
    names = list(inspect.signature(ref).parameters)
    labels = ["out"] + [f"d{names[i]}" for i, a in enumerate(args) if torch.is_tensor(a) and a.requires_grad]
    dy = []

    def output_grad(out):  # one random float64 output grad, rounded to each run's output dtype
        if not dy:
            dy.append(torch.randn(out.shape, dtype=torch.float64, device=out.device, generator=generator))
        return dy[0].to(out.dtype)

    want = _forward_backward(ref, [_leaf(a, torch.float64) for a in args], output_grad, poison=False)
    lowp = _forward_backward(ref, [_leaf(a) for a in args], output_grad, poison=False)
    got = _forward_backward(op, [_leaf(a) for a in args], output_grad, poison=True)
    checks = []
    for label, g, t, w in zip(labels, got, lowp, want):
        same_form = g.shape == t.shape and g.dtype == t.dtype
        err = _max_abs(g.double() - w) if same_form else float("inf")
        tol = 2 * _max_abs(t.double() - w) + torch.finfo(g.dtype).eps * _max_abs(w)
        finite = bool(torch.isfinite(g).all()) if g.numel() else True
        checks.append(Check(f"{name} {label}", err, tol, same_form and finite and err <= tol))
    return checks


def _determinism_check(name, op, args, generator):
    """The same backward twice must give the same bits (reductions without float atomics)."""
    wrt = [a for a in args if torch.is_tensor(a) and a.requires_grad]
    out = op(*args)
    dy = torch.randn(out.shape, dtype=out.dtype, device=out.device, generator=generator)
    first, second = [torch.autograd.grad(op(*args), wrt, dy) for _ in range(2)]
    diff = max(_max_abs(a.double() - b.double()) for a, b in zip(first, second))
    return Check(f"{name} backward bitwise deterministic", diff, 0.0, diff == 0.0)


def _no_sync_check(name, fn):
    """Runs fn with CUDA sync debugging set to error: passes when nothing waits for the device."""
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        passed = True
    except RuntimeError:
        passed = False
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    return Check(f"{name} no host sync (validate=False)", 0.0, 0.0, passed)


FAMILIES = ("gather_scatter", "modulate")


def run_checks(device="cuda", dtype=torch.bfloat16, B=256, L=256, K=128, D=1152, decoder_D=512, seed=0,
               families=FAMILIES):
    """Checks the Triton ops on `device` at DiT-XL/2 sizes (MaskDiT: 128 of 256 tokens kept, encoder
    width 1152, decoder width 512) in `dtype` against the float64 reference.

    Args:
        families: subset of FAMILIES to check ("gather_scatter": dense and varlen gather/scatter;
            "modulate": layernorm_modulate and gated_residual).
    Returns:
        list of Check(name, max_err, tolerance, passed); with both families it also checks that the
        scatter and layernorm_modulate backwards are bitwise deterministic and, on CUDA, that a
        gather -> modulate -> scatter step with validate=False never waits for the device.
    """
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape, grad=True, dt=dtype):
        return torch.randn(*shape, device=device, dtype=dt, generator=g).requires_grad_(grad)

    ids = torch.rand(B, L, device=device, generator=g).argsort(1)[:, :K].contiguous()
    counts = torch.randint(0, L + 1, (B,), device=device, generator=g)
    cu = cu_seqlens_from_counts(counts)
    ids_packed = random_packed_ids(counts, L, g)
    T = ids_packed.numel()
    tri = dict(backend="triton", validate=False)

    gather_scatter = "gather_scatter" in families
    modulate = "modulate" in families
    checks = []
    if gather_scatter:
        checks += check_op("gather_tokens", partial(gs.gather_tokens, **tri), gs.gather_tokens_ref,
                           (randn(B, L, D), ids, randn(1, L, D)), g)
        checks += check_op("scatter_tokens", partial(gs.scatter_tokens, **tri), gs.scatter_tokens_ref,
                           (randn(B, K, decoder_D), ids, randn(1, 1, decoder_D), L, randn(1, L, decoder_D)), g)
        checks += check_op("gather_tokens_varlen", partial(gs.gather_tokens_varlen, **tri),
                           gs.gather_tokens_varlen_ref, (randn(B, L, D), ids_packed, cu, randn(L, D)), g)
        checks += check_op("scatter_tokens_varlen", partial(gs.scatter_tokens_varlen, **tri),
                           gs.scatter_tokens_varlen_ref,
                           (randn(T, decoder_D), ids_packed, cu, randn(decoder_D), L, randn(L, decoder_D)), g)
        checks.append(_determinism_check(
            "scatter_tokens", partial(gs.scatter_tokens, **tri),
            (randn(B, K, decoder_D), ids, randn(decoder_D), L, randn(L, decoder_D)), g))
    if modulate:
        ln = partial(md.layernorm_modulate, backend="triton")
        gate = partial(md.gated_residual, backend="triton")
        for width, tokens in ((D, K), (decoder_D, L)):  # encoder (kept tokens) and decoder (all tokens)
            x = randn(B, tokens, width)
            checks += check_op(f"layernorm_modulate[{tokens}x{width}]", ln, md.layernorm_modulate_ref,
                               (x, randn(B, width), randn(B, width)), g)
            checks += check_op(f"gated_residual[{tokens}x{width}]", gate, md.gated_residual_ref,
                               (x, randn(B, tokens, width), randn(B, width)), g)
        checks += check_op("layernorm_modulate per-token", ln, md.layernorm_modulate_ref,
                           (randn(B, K, D), randn(B, K, D), randn(B, K, D)), g)
        checks += check_op("gated_residual per-token", gate, md.gated_residual_ref,
                           (randn(B, K, D), randn(B, K, D), randn(B, K, D)), g)
        checks.append(_determinism_check("layernorm_modulate", ln, (randn(B, K, D), randn(B, D), randn(B, D)), g))
    if gather_scatter and modulate and torch.device(device).type == "cuda":
        x, pos, shift, scale, fill = randn(B, L, D), randn(1, L, D), randn(B, D), randn(B, D), randn(D)

        def step():
            h = gs.gather_tokens(x, ids, pos, **tri)
            h = md.gated_residual(h, md.layernorm_modulate(h, shift, scale, backend="triton"), scale,
                                  backend="triton")
            out = gs.scatter_tokens(h, ids, fill, L, pos, **tri)
            torch.autograd.grad(out.float().square().sum(), [x, pos, shift, scale, fill])
        checks.append(_no_sync_check("gather/modulate/scatter step", step))
    return checks
