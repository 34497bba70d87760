"""Correctness before timing: every back-end the report times is first checked against its
reference at the benchmark's own shape (`check_case`, by maskdit_fast.accuracy's rule). Every check
becomes one row of one format (`check_row`). The kernels' XL-size GPU checks are tests
(tests/test_*_gpu.py), which benchmarks/gpu_session.sh runs before the report."""
import torch

from maskdit_fast import accuracy
from maskdit_fast.bench.backends import Unavailable
from maskdit_fast.bench.cases import PASSES


def check_row(source, name, max_err=None, tol=None, passed=None, status=None, reason=None):
    """The report's row for one check: status "ok" / "FAILED" from `passed` unless given ("error",
    "not available", "skipped")."""
    row = dict(source=source, name=name, max_err=None if max_err is None else float(max_err),
               tol=None if tol is None else float(tol), passed=passed,
               status=status or ("ok" if passed else "FAILED"))
    if reason is not None:
        row["reason"] = str(reason)[:300]
    return row


def grads(out, args, argnums, grad_out):
    """Gradients of `out` for output gradient grad_out, w.r.t. args[i] for i in argnums."""
    leaves = [args[i] for i in argnums]
    return torch.autograd.grad(out, leaves, grad_out)


def _upcast(args):
    return tuple(a.detach().double().requires_grad_(a.requires_grad)
                 if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def _ratio(err, tol):
    """err / tol, for picking the worst result (a zero tolerance: an exact result is 0, any error inf)."""
    return err / tol if tol else (0.0 if err == 0 else float("inf"))


def check_case(case, fn, device, dtype, seed=0):
    """Checks `fn` against case.ref: forward output, then gradients of the grad_argnums args.

    The exact answer is the reference in fp64; the reference in `dtype` sets the tolerance
    (see maskdit_fast.accuracy). Returns {"fwd": (max_err, tol, passed), "fwd+bwd": (...)}, "fwd+bwd" covering the
    output and every gradient (the worst err/tol ratio). Raises Unavailable if fn cannot run here
    (it raises Unavailable itself, or NotImplementedError: no kernel for this case).
    """
    gen = torch.Generator(device).manual_seed(seed)
    args = case.make_args(device, dtype, gen)
    exact_args = _upcast(args)
    exact = case.ref(*exact_args)
    grad_out = torch.randn(exact.shape, device=device, generator=gen).to(dtype)
    exact_grads = grads(exact, exact_args, case.grad_argnums, grad_out.double())
    ref_out = case.ref(*args)
    ref_grads = grads(ref_out, args, case.grad_argnums, grad_out)
    try:
        out = fn(*args)
    except NotImplementedError as err:
        raise Unavailable(f"not implemented: {err}") from err
    if out.shape != exact.shape or out.dtype != ref_out.dtype:
        return {p: (float("inf"), 0.0, False) for p in PASSES}
    fwd = accuracy.compare(out, exact, ref_out)
    try:
        got_grads = grads(out, args, case.grad_argnums, grad_out)
    except NotImplementedError:
        return {"fwd": (*fwd, fwd[0] <= fwd[1]), "fwd+bwd": (float("nan"), 0.0, False)}
    worst = fwd
    for g, e, r in zip(got_grads, exact_grads, ref_grads):
        if g is None or g.shape != e.shape:
            worst = (float("inf"), 0.0)
            break
        cmp = accuracy.compare(g, e, r)
        if _ratio(*cmp) > _ratio(*worst):
            worst = cmp
    return {"fwd": (*fwd, fwd[0] <= fwd[1]), "fwd+bwd": (*worst, worst[0] <= worst[1])}
