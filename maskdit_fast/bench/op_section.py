"""The op and attention sections: every case x back-end x pass, checked against its reference,
then timed on rotating inputs (eager, and replayed as a CUDA graph on a GPU)."""
import torch

from maskdit_fast.bench.backends import Unavailable, backend_fn
from maskdit_fast.bench.cases import BASELINE_BACKEND, PASSES
from maskdit_fast.bench.checks import check_case, check_row, grads
from maskdit_fast.bench.costs import achieved
from maskdit_fast.bench.timing import Rotation, Timer, cache_bytes, rotation_count, time_calls, time_graph_replays


def input_sets(case, cfg, seed=1):
    """Rotating input sets for timing `case`: [(args, grad_out), ...], enough sets that together they
    exceed twice the device's L2 (one set on CPU)."""
    gen = torch.Generator(cfg.device).manual_seed(seed)
    sets, n = [], 1
    while len(sets) < n:
        args = case.make_args(cfg.device, cfg.dtype, gen)
        with torch.no_grad():
            shape = case.ref(*args).shape
        grad_out = torch.randn(shape, device=cfg.device, generator=gen).to(cfg.dtype)
        sets.append((args, grad_out))
        if len(sets) == 1:
            nbytes = sum(t.numel() * t.element_size() for t in (*args, grad_out) if torch.is_tensor(t))
            n = rotation_count(nbytes, cache_bytes(cfg.device))
    return sets


def pass_call(fn, pass_, grad_argnums):
    """Callable(args, grad_out) for one timed pass: "fwd" (no autograd graph) or "fwd+bwd"
    (forward, then the gradients of the grad_argnums args for grad_out; no .grad accumulation)."""
    if pass_ not in PASSES:
        raise ValueError(f"pass must be one of {PASSES}, got {pass_!r}")
    if pass_ == "fwd":
        def run(args, grad_out):
            with torch.no_grad():
                return fn(*args)
    else:
        def run(args, grad_out):
            return grads(fn(*args), args, grad_argnums, grad_out)
    return run


def pass_cost(case, pass_):
    """Cost of one call of `pass_` ("fwd+bwd" = forward + backward)."""
    return case.cost[0] if pass_ == "fwd" else case.cost[0] + case.cost[1]


def _graph_timing(run, sets, cfg, timer_factory):
    """{"graph_ms": device time per call from CUDA-graph replays} (see time_graph_replays), or
    {"graph_reason": why the calls could not be captured}."""
    try:
        stats = time_graph_replays(Rotation(run, sets), len(sets), cfg.device, reps=cfg.reps,
                                   timer=timer_factory(cfg.device))
    except Exception as err:  # noqa: BLE001 - e.g. an op that synchronizes: the eager figure stands
        return dict(graph_reason=f"{type(err).__name__}: {err}"[:200])
    return dict(graph_ms=stats.median_ms)


def run_op_section(cases, cfg, budget, peaks, timer_factory=Timer, check_rows=None):
    """Checks, then times, every case x back-end x pass. Returns result rows (dicts), in case order.

    Back-ends go in priority order across all cases (torch eager first: it is the baseline of
    `vs_baseline`, the speed-up; torch.compile last: its compile time is the first thing a spent
    budget drops). A back-end is timed only after its check passed at the same shape; the check
    rows are appended to `check_rows`.
    """
    rows, sets, baseline = [], {}, {}
    order = list(dict.fromkeys(b for case in cases for b in case.backends))
    for backend in order:
        for case in (c for c in cases if backend in c.backends):
            base = dict(op=case.name, shape=case.shape, backend=backend, dtype=str(cfg.dtype).replace("torch.", ""))
            skip = None
            if backend == "compile" and not cfg.compile:
                skip = ("skipped", f"torch.compile off in mode {cfg.mode}")
            elif budget.spent():
                skip = ("skipped", f"section budget {budget.seconds}s spent")
            else:
                try:
                    fn = backend_fn(case, backend, cfg.device)
                    verdict = check_case(case, fn, cfg.device, cfg.dtype)
                except Unavailable as err:
                    skip = ("unavailable", str(err))
                except Exception as err:  # noqa: BLE001 - a crashing kernel is a failed check, not a crash
                    verdict = {p: (float("nan"), 0.0, False) for p in PASSES}
                    base["reason"] = f"{type(err).__name__}: {err}"[:300]
            if skip:
                rows += [dict(base, **{"pass": p}, status=skip[0], reason=skip[1]) for p in PASSES]
                continue
            for p in PASSES:
                err, tol, passed = verdict[p]
                if check_rows is not None:
                    check_rows.append(check_row("bench", f"{case.name}/{backend}/{p}", err, tol, passed))
                row = dict(base, **{"pass": p}, max_err=err, tol=tol)
                if not passed:
                    rows.append(dict(row, status="failed check"))
                    continue
                if case.name not in sets:
                    sets[case.name] = input_sets(case, cfg)
                try:
                    stats = time_calls(Rotation(pass_call(fn, p, case.grad_argnums), sets[case.name]), cfg.device,
                                       cfg.warmup, cfg.reps, timer_factory(cfg.device))
                except Exception as err:  # noqa: BLE001 - e.g. out of memory: reported, the report goes on
                    rows.append(dict(row, status="error", reason=f"{type(err).__name__}: {err}"[:300]))
                    continue
                row.update(status="ok", p10_ms=stats.p10_ms, p90_ms=stats.p90_ms, n=stats.n,
                           **achieved(pass_cost(case, p), stats.median_ms, peaks, case.bound))
                if torch.device(cfg.device).type == "cuda":
                    row.update(_graph_timing(pass_call(fn, p, case.grad_argnums), sets[case.name], cfg,
                                             timer_factory))
                if backend == BASELINE_BACKEND:
                    baseline[case.name, p] = stats.median_ms
                if (case.name, p) in baseline:
                    row["vs_baseline"] = baseline[case.name, p] / stats.median_ms
                rows.append(row)
    names = [c.name for c in cases]
    rows.sort(key=lambda r: (names.index(r["op"]), order.index(r["backend"]), PASSES.index(r["pass"])))
    return rows


# ------------------------------------------------------------------------------------ train step
