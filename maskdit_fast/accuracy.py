"""The accuracy rule of the compiled ops, in one place: used by the tests (CPU under the Triton interpreter,
and the GPU tests at MaskDiT-XL/2 sizes) and by the benchmark report's correctness section.

A result (an op's output or one of its input gradients) passes when

    max |got - exact| <= 2 * max |lowp - exact| + k * eps(dtype of got) * max |exact|,  k = 2 (16-bit), 16 (fp32/64)

where `exact` is the reference (the spec, maskdit_fast.ops.*_ref) run in float64 on the same inputs upcast, and
`lowp` the same reference run in the inputs' own precision: at most twice PyTorch's own error at that precision,
plus two units in the last place at the output's scale, for results where PyTorch's own error happens to be about
zero: ops exact in their precision (a gather), and sums a kernel rounds in another order (the fp32 attention
backward of the report's encoder case: 9.7e-7 against torch's 3.8e-7, 1.01x the tolerance with one ulp). The
2x part is flash-attention's rule for low precision; fp32 and fp64 are not, and there the ulp term is 16: a
flash-style attention backward recomputes the probabilities from the saved log-sum-exp, which costs a few ulps that
torch's stored softmax does not (fp32 dV of the varlen head-dim-72 test: 6.2e-6 = 9.8 ulps of max |dV| = 5.3,
against torch's 1.5e-6; how many ulps varies with the CPU's summation order under the interpreter). 16 ulps of the
largest value is 1.9e-6 relative in fp32. A result of the wrong shape or dtype, or with a NaN or inf, fails.

Under the CPU Triton interpreter fp32 -> bf16 stores round toward zero instead of to nearest (an interpreter
limitation): bf16 results there may be one ulp off, which the ulp term covers; compiled kernels round to nearest.
"""
import collections
import contextlib
import inspect

import torch

LOW_PRECISION = (torch.float16, torch.bfloat16)  # the dtypes of flash-attention's 2x rule proper
Check = collections.namedtuple("Check", "name max_err tolerance passed")


def max_abs(t):
    """max |t| as a float (0 for an empty tensor)."""
    return t.abs().max().item() if t.numel() else 0.0


def compare(got, exact, lowp):
    """(max error of got against exact, tolerance of the rule); a non-finite error is inf."""
    exact = exact.double()
    err = max_abs(got.double() - exact)
    if err != err or err == float("inf"):
        err = float("inf")
    ulps = 2 if got.dtype in LOW_PRECISION else 16
    return err, 2 * max_abs(lowp.double() - exact) + ulps * torch.finfo(got.dtype).eps * max_abs(exact)


def check(name, got, exact, lowp):
    """Check(name, max_err, tolerance, passed) of `got` by the rule; `lowp` sets the expected shape and dtype."""
    if got.shape != lowp.shape or got.dtype != lowp.dtype:
        return Check(name, float("inf"), 0.0, False)
    err, tol = compare(got, exact, lowp)
    return Check(name, err, tol, err <= tol)


def _leaf(t, dtype=None):
    """A fresh leaf copy of a float tensor argument (cast to dtype if given); other values unchanged."""
    if not (torch.is_tensor(t) and t.is_floating_point()):
        return t
    return t.detach().to(dtype or t.dtype).requires_grad_(t.requires_grad)


def _forward_backward(fn, args, output_grad, poison):
    """Output and input grads (zeros for unused inputs) of fn(*args) for output grad output_grad(out)."""
    diff = [a for a in args if torch.is_tensor(a) and a.requires_grad]
    with poison(), torch.enable_grad():
        out = fn(*args)
        grads = torch.autograd.grad(out, diff, output_grad(out), allow_unused=True) if diff else ()
    grads = [torch.zeros_like(a) if g is None else g for a, g in zip(diff, grads)]
    return [out.detach()] + [g.detach() for g in grads]


def triton_poisoned():
    """NaN-fills the buffers the Triton launchers allocate (kernels._common.poisoned), so an element a kernel
    fails to write fails the check."""
    from maskdit_fast.kernels import _common
    return _common.poisoned()


def check_op(name, op, ref, args, generator=None, poison=triton_poisoned):
    """Checks op(*args) against ref(*args) by the rule, forward and backward (every floating-point tensor argument
    with requires_grad), with one random output gradient.

    Args:
        name: label prefix of the checks.
        op: callable under test (e.g. functools.partial(gather_tokens, backend="triton")).
        ref: the reference callable, same positional arguments.
        args: positional arguments; float tensors run in their own dtype (and in float64 for `exact`), other values
            pass through.
        generator: torch.Generator of the random output gradient (on the args' device).
        poison: context manager factory around the op's run (default: NaN-filled Triton launcher buffers).
    Returns:
        list of Check: "<name> out" and "<name> d<arg>" per differentiable argument.
    """
    names = list(inspect.signature(ref).parameters)
    labels = ["out"] + [f"d{names[i]}" for i, a in enumerate(args) if torch.is_tensor(a) and a.requires_grad]
    dy = []

    def output_grad(out):  # one random float64 output grad, rounded to each run's output dtype
        if not dy:
            dy.append(torch.randn(out.shape, dtype=torch.float64, device=out.device, generator=generator))
        return dy[0].to(out.dtype)

    exact = _forward_backward(ref, [_leaf(a, torch.float64) for a in args], output_grad, contextlib.nullcontext)
    lowp = _forward_backward(ref, [_leaf(a) for a in args], output_grad, contextlib.nullcontext)
    got = _forward_backward(op, [_leaf(a) for a in args], output_grad, poison)
    return [check(f"{name} {label}", g, e, t) for label, g, e, t in zip(labels, got, exact, lowp)]
