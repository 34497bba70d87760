"""Correctness before timing: every back-end the report times is first checked against its
reference at the benchmark's own shape (`check_case`), and the kernels' GPU check modules add their
rows (`kernel_checks`, the one entry point of those modules). Every check becomes one row of one
format (`check_row`)."""
import importlib
import math

import torch

from maskdit_fast.bench.backends import Unavailable
from maskdit_fast.bench.cases import PASSES

# The kernel workers' GPU check modules; each module's run_checks(device) returns rows
# (name, max_err, tolerance, passed), e.g. maskdit_fast.ops.gpu_checks.Check.
CHECK_MODULES = ("maskdit_fast.ops.gpu_checks", "maskdit_fast.ops.attention_gpu_checks",
                 "maskdit_fast.ops.cuda_gpu_checks")


def check_row(source, name, max_err=None, tol=None, passed=None, status=None, reason=None):
    """The report's row for one check: status "ok" / "FAILED" from `passed` unless given ("error",
    "not available", "skipped")."""
    row = dict(source=source, name=name, max_err=None if max_err is None else float(max_err),
               tol=None if tol is None else float(tol), passed=passed,
               status=status or ("ok" if passed else "FAILED"))
    if reason is not None:
        row["reason"] = str(reason)[:300]
    return row


def _eps(dtype):
    return torch.finfo(dtype).eps


def grads(out, args, argnums, grad_out):
    """Gradients of `out` for output gradient grad_out, w.r.t. args[i] for i in argnums."""
    leaves = [args[i] for i in argnums]
    return torch.autograd.grad(out, leaves, grad_out)


def _upcast(args):
    return tuple(a.detach().double().requires_grad_(a.requires_grad)
                 if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def _compare(got, exact, ref):
    """(max error of got, tolerance): tolerance = 2 x the error of the reference run in the same
    dtype + 2 eps x max|exact| (a kernel may round or sum in another order, but must not be worse
    than twice the spec)."""
    exact = exact.double()
    scale = exact.abs().max().item() if exact.numel() else 0.0
    err_ref = (ref.double() - exact).abs().max().item() if exact.numel() else 0.0
    err = (got.double() - exact).abs().max().item() if exact.numel() else 0.0
    if not math.isfinite(err):
        err = float("inf")
    return err, 2 * err_ref + 2 * _eps(got.dtype) * scale + 1e-12


def check_case(case, fn, device, dtype, seed=0):
    """Checks `fn` against case.ref: forward output, then gradients of the grad_argnums args.

    The exact answer is the reference in fp64; the reference in `dtype` sets the tolerance
    (see _compare). Returns {"fwd": (max_err, tol, passed), "fwd+bwd": (...)}, "fwd+bwd" covering the
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
    fwd = _compare(out, exact, ref_out)
    try:
        got_grads = grads(out, args, case.grad_argnums, grad_out)
    except NotImplementedError:
        return {"fwd": (*fwd, fwd[0] <= fwd[1]), "fwd+bwd": (float("nan"), 0.0, False)}
    worst = fwd
    for g, e, r in zip(got_grads, exact_grads, ref_grads):
        if g is None or g.shape != e.shape:
            worst = (float("inf"), 0.0)
            break
        cmp = _compare(g, e, r)
        if cmp[0] / cmp[1] > worst[0] / worst[1]:
            worst = cmp
    return {"fwd": (*fwd, fwd[0] <= fwd[1]), "fwd+bwd": (*worst, worst[0] <= worst[1])}


def module_check_rows(name, device):
    """Rows of one check module's run_checks(device). A missing module or entry point, a crash or a
    row that is not (name, max_err, tolerance, passed) becomes one clear row instead of ending the
    report."""
    source = f"{name}.run_checks"
    try:
        module = importlib.import_module(name)
    except ImportError as err:
        return [check_row(source, name, status="not available", reason=err)]
    runner = getattr(module, "run_checks", None)
    if runner is None:
        return [check_row(source, name, status="not available", reason="module has no run_checks(device)")]
    rows = []
    try:
        for row in runner(device):
            if not (isinstance(row, tuple) and len(row) == 4):
                rows.append(check_row(source, name, status="error",
                                      reason=f"row {row!r} is not (name, max_err, tolerance, passed)"))
                continue
            check, err, tol, passed = row
            rows.append(check_row(source, check, err, tol, bool(passed)))
    except Exception as err:  # noqa: BLE001 - one broken module must not end the report
        rows.append(check_row(source, name, status="error", reason=f"{type(err).__name__}: {err}"))
    return rows


def kernel_checks(device, modules=CHECK_MODULES):
    """Rows of the kernels' GPU check modules (CHECK_MODULES); skipped off CUDA."""
    if torch.device(device).type != "cuda":
        return [check_row(f"{name}.run_checks", name, status="skipped", reason="needs a CUDA GPU")
                for name in modules]
    return [row for name in modules for row in module_check_rows(name, device)]
