"""Runs the report's sections within their time budgets and writes the result as JSON and Markdown."""
import datetime
import importlib.metadata
import json
import math
import os
import platform
import re
import subprocess
import time

import torch

from maskdit_fast.bench.cases import attention_cases, op_cases
from maskdit_fast.bench.config import SECTIONS
from maskdit_fast.bench.op_section import run_op_section
from maskdit_fast.bench.step_profile import run_profile
from maskdit_fast.bench.timing import Budget, Timer, cache_bytes, measure_copy_bandwidth, measure_matmul_peak
from maskdit_fast.bench.train_step import run_cpu_figure, run_train_section

SCHEMA = 2


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
            "torchao": _version("torchao"), "python": platform.python_version(), "cuda": torch.version.cuda}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(card=props.name, driver=_driver_version(), sm=f"{props.major}.{props.minor}",
                    memory_GiB=round(props.total_memory / 2**30, 1), sms=props.multi_processor_count,
                    l2_MiB=round(cache_bytes(device) / 2**20, 1))
    else:
        info.update(card=f"cpu ({platform.processor() or platform.machine()})", driver=None,
                    threads=torch.get_num_threads())
    return info


def run_peaks(cfg, timer_factory=Timer):
    """Copy bandwidth (GB/s, read + written) and matmul peak (TFLOP/s) on cfg.device."""
    copy = measure_copy_bandwidth(cfg.device, cfg.copy_bytes, timer=timer_factory(cfg.device))
    matmul = measure_matmul_peak(cfg.device, cfg.matmul_n, cfg.dtype, timer=timer_factory(cfg.device))
    return {"copy_GBps": copy["GBps"], "matmul_TFLOPs": matmul["TFLOPs"], "copy": copy, "matmul": matmul}


# ------------------------------------------------------------------------------------ run

def run_report(cfg, sections=None, timer_factory=Timer, log=print, budgets=None):
    """Runs the selected sections (default: cfg.sections) and returns the report dict. budgets:
    seconds per section replacing cfg.budgets' (e.g. a long train_step run on its own)."""
    sections = tuple(sections or cfg.sections)
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown sections {sorted(unknown)}; expected some of {SECTIONS}")
    budgets = {**cfg.budgets, **(budgets or {})}
    t0 = time.monotonic()
    device = torch.device(cfg.device)
    # Index-value checks wait for the device: every timed op call passes validate=False (backend_fn) and
    # the train-step models skip their input checks, as in a training loop.
    report = dict(schema=SCHEMA, date=datetime.datetime.now().isoformat(timespec="seconds"), mode=cfg.mode,
                  env=env_info(device), config=dict(B=cfg.B, L=cfg.L, K=cfg.K, D=cfg.D, H=cfg.H, Dd=cfg.Dd,
                                                    Hd=cfg.Hd, dtype=str(cfg.dtype), warmup=cfg.warmup,
                                                    reps=cfg.reps, validate=False),
                  peaks=None, checks=[], ops=[], attention=[], train_step=[], profile=None, cpu_figure=None,
                  sections={})
    if device.type != "cuda":
        report["note"] = ("CPU subset: no CUDA device. Torch back-ends at small shapes and the CPU train-step "
                          "figure only; Triton/CUDA/SDPA-kernel rows are skipped (interpreter timings are "
                          "meaningless), and the figures are CPU figures, not GPU ones.")

    def section(name, fn):
        if name not in sections:
            return
        budget = Budget(budgets[name])
        if report.get("aborted"):  # a device error poisons the CUDA context: nothing after it can run
            report["sections"][name] = dict(seconds=0.0, budget_s=budget.seconds,
                                            error=f"not run: {report['aborted']}")
            return
        log(f"[bench] {name} (budget {budget.seconds}s) ...")
        entry = dict(budget_s=budget.seconds)
        try:
            fn(budget)
        except Exception as err:  # noqa: BLE001 - recorded; the report keeps what ran (the first GPU run
            # lost everything to one illegal memory access in a check module)
            entry["error"] = f"{type(err).__name__}: {err}"[:300]
            report["aborted"] = f"{name} raised {type(err).__name__}"
            log(f"[bench] {name} FAILED: {entry['error']}")
        report["sections"][name] = dict(seconds=round(budget.elapsed(), 2), **entry)
        log(f"[bench] {name} done in {budget.elapsed():.1f}s")

    def peaks(budget):
        report["peaks"] = run_peaks(cfg, timer_factory)

    def op_rows(budget):
        report["ops"] = run_op_section(op_cases(cfg), cfg, budget, report["peaks"], timer_factory,
                                       report["checks"])

    def attention_rows(budget):
        report["attention"] = run_op_section(attention_cases(cfg), cfg, budget, report["peaks"], timer_factory,
                                             report["checks"])

    def train(budget):
        report["train_step"] = run_train_section(cfg, budget, report["peaks"], timer_factory)

    def profile(budget):
        report["profile"] = run_profile(cfg, report["peaks"])

    def cpu_figure(budget):
        try:
            report["cpu_figure"] = run_cpu_figure(cfg, timer_factory)
        except Exception as err:  # noqa: BLE001 - reported, the report goes on
            report["cpu_figure"] = dict(status="error", reason=f"{type(err).__name__}: {err}"[:300])
        fig = report["cpu_figure"]
        if "speedup" in fig:
            log(f"[bench] CPU figure: MaskDiT {fig['maskdit_ms']:.1f} ms vs DiT {fig['dit_ms']:.1f} ms per step "
                f"-> {fig['speedup']:.2f}x")

    for name, fn in (("peaks", peaks), ("ops", op_rows), ("attention", attention_rows),
                     ("train_step", train), ("profile", profile), ("cpu_figure", cpu_figure)):
        section(name, fn)
    report["total_s"] = round(time.monotonic() - t0, 1)
    return report


# ------------------------------------------------------------------------------------ writing

def _slug(text):
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def result_stem(env, date=None):
    """File stem "<date>-<card>" of a result, e.g. "2025-01-31-nvidia-h100-80gb-hbm3"."""
    date = date or datetime.date.today().isoformat()
    card = env["card"] if env["device"] == "cuda" else "cpu"
    return f"{date}-{_slug(card)}"


def _fmt(v, digits=3):
    if v is None:
        return ""
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.{digits}g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


def _status(row):
    return row["status"] if row["status"] == "ok" else f"{row['status']}: {row.get('reason', '')}"[:80]


def _table(columns, rows):
    """Markdown table of `rows` (dicts); columns: [(header, key)], key a row key or a function of the row."""
    lines = ["| " + " | ".join(h for h, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [key(row) if callable(key) else row.get(key) for _, key in columns]
        lines.append("| " + " | ".join(_fmt(c) for c in cells) + " |")
    return "\n".join(lines)


CHECK_COLUMNS = [("source", "source"), ("check", "name"), ("max err", "max_err"), ("tol", "tol"),
                 ("status", "status"), ("note", lambda r: r.get("reason", ""))]
OP_COLUMNS = [("op", "op"), ("shape", "shape"), ("pass", "pass"), ("backend", "backend"), ("status", _status),
              ("ms", "ms"), ("graph ms", "graph_ms"), ("GB/s", "GBps"), ("TFLOP/s", "TFLOPs"),
              ("% floor", "pct_of_floor"), ("vs torch", "vs_baseline")]
TRAIN_COLUMNS = [("variant", "variant"), ("px", "px"), ("batch rule", "batch_rule"), ("batch", "batch"),
                 ("mask ratio", "mask_ratio"), ("ms/step", "ms"), ("images/s", "images_per_s"),
                 ("TFLOP/s", "TFLOPs"), ("MFU", "mfu"), ("peak GiB", "peak_mem_GiB"), ("compile s", "compile_s"),
                 ("first loss", "loss"), ("vs baseline", "vs_baseline"), ("status", _status)]
PROFILE_COLUMNS = [("group", "group"), ("ms/step", "ms"), ("% of step", lambda r: 100 * r["share"])]


def _train_summary(rows):
    """Per size and batch rule: the package's best row against reference + compile and DiT + compile."""
    lines = []
    for key in dict.fromkeys((r["px"], r["batch_rule"]) for r in rows):
        group = [r for r in rows if (r["px"], r["batch_rule"]) == key and r["status"] == "ok"]
        ours = [r for r in group if r.get("backend") in ("auto", "triton")]
        if not ours:
            continue
        best = max(ours, key=lambda r: r["images_per_s"])
        parts = [f"{key[0]} px, {key[1]} batch: best package row **{best['variant']}** "
                 f"{best['images_per_s']:.0f} images/s"]
        for rival in (r for r in group if r["variant"].endswith("+ compile") and r.get("backend") == "torch"):
            parts.append(f"{best['images_per_s'] / rival['images_per_s']:.2f}x {rival['variant']}")
        lines.append("- " + ", ".join(parts))
    return "\n".join(lines)


def to_markdown(report):
    """The report as Markdown: environment, peaks, checks, op / attention / train-step / profile tables."""
    env, out = report["env"], []
    out.append(f"# maskdit_fast benchmark: {env['card']} ({report['mode']})\n")
    out.append(f"{report['date']} · driver {env.get('driver') or 'n/a'} · torch {env['torch']} · "
               f"triton {env.get('triton') or 'n/a'} · torchao {env.get('torchao') or 'n/a'} · "
               f"CUDA {env.get('cuda') or 'n/a'} · python {env['python']} · total {report['total_s']:.0f} s\n")
    if report.get("note"):
        out.append(f"> {report['note']}\n")
    p = report.get("peaks") or {}
    if p:
        out.append(f"Measured peaks: copy {_fmt(p.get('copy_GBps'))} GB/s (read + written), "
                   f"{p.get('matmul', {}).get('dtype', '')} matmul {_fmt(p.get('matmul_TFLOPs'))} TFLOP/s "
                   f"(n = {p.get('matmul', {}).get('n')}).\n")
    checks = report.get("checks", [])
    failed = [c for c in checks if c.get("status") in ("FAILED", "error")]
    out.append(f"## Checks\n{sum(c.get('status') == 'ok' for c in checks)} passed, {len(failed)} failed, "
               f"{sum(c.get('status') in ('skipped', 'not available') for c in checks)} skipped / not available.\n")
    shown = failed + [c for c in checks if c.get("source") != "bench" and c not in failed]
    if shown:
        out.append(_table(CHECK_COLUMNS, shown) + "\n")
    for key, title in (("ops", "Ops"), ("attention", "Attention")):
        rows = report.get(key) or []
        if not rows:
            continue
        shown = [r for r in rows if r["status"] in ("ok", "failed check", "error")]
        out.append(f"## {title} ({rows[0]['dtype']}; vs torch = speed-up over torch eager)\n")
        out.append(_table(OP_COLUMNS, shown) + "\n")
        skipped = {}
        for r in rows:
            if r not in shown:
                skipped.setdefault((r["backend"], r["status"], r.get("reason", "")), set()).add(r["op"])
        for (backend, status, reason), names in skipped.items():
            out.append(f"- {backend}: {status} ({reason}) for {len(names)} case(s)")
        out.append("")
    rows = report.get("train_step") or []
    if rows:
        base = next((r.get("baseline") for r in rows if r.get("baseline")), "the baseline")
        out.append(f"## Train step (images/s relative to {base} at the same size and batch rule; compile s "
                   f"apart from the timed steps)\n")
        out.append(_table(TRAIN_COLUMNS, rows) + "\n")
        summary = _train_summary(rows)
        if summary:
            out.append(summary + "\n")
    prof = report.get("profile")
    if prof:
        out.append(f"## Profile ({prof['variant']}, backend {prof['backend']}, batch {prof['batch']}, "
                   f"{8 * prof['input_size']} px, {prof['steps']} steps; {prof['events']} grouped by the regex "
                   f"table in maskdit_fast/bench/step_profile.py)\n")
        out.append(f"Step {prof['step_ms']:.4g} ms ({prof['images_per_s']:.4g} images/s under the profiler). "
                   f"GEMMs alone: {_fmt(prof.get('gemm_TFLOPs'))} TFLOP/s"
                   + (f" ({prof['gemm_pct_of_peak']:.0f}% of the measured matmul peak)" if prof.get("gemm_pct_of_peak")
                      else "") + ".\n")
        out.append(_table(PROFILE_COLUMNS, prof["groups"]) + "\n")
        if prof["top_other"]:
            out.append("Largest unmatched (\"other\") names: "
                       + "; ".join(f"`{o['name']}` {o['ms']:.3g} ms" for o in prof["top_other"]) + "\n")
    fig = report.get("cpu_figure")
    if fig and "speedup" in fig:
        c = fig["config"]
        out.append(f"## CPU figure (pure PyTorch, fp32, {c['threads']} thread{'s' if c['threads'] != 1 else ''})\n"
                   f"MaskDiT-{c['preset']} (ratio 0.5) {fig['maskdit_ms']:.1f} ms vs DiT {fig['dit_ms']:.1f} ms "
                   f"per train step at batch {c['batch']}: **{fig['speedup']:.2f}x** "
                   f"(config {json.dumps({k: v for k, v in c.items() if k not in ('threads',)})}).\n")
    elif fig:
        out.append(f"## CPU figure\n{fig.get('status')}: {fig.get('reason')}\n")
    sec = [dict(section=k, **v) for k, v in report.get("sections", {}).items()]
    out.append("## Sections\n" + _table([("section", "section"), ("seconds", "seconds"), ("budget s", "budget_s"),
                                         ("error", lambda r: r.get("error", ""))], sec) + "\n")
    return "\n".join(out)


def write_report(report, out_dir):
    """Writes <out_dir>/<date>-<card>.json and .md; returns the two paths."""
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, result_stem(report["env"], report["date"][:10]))
    if report["mode"].endswith("quick"):
        stem += "-quick"
    with open(stem + ".json", "w") as f:
        json.dump(report, f, indent=1, default=str)
    with open(stem + ".md", "w") as f:
        f.write(to_markdown(report))
    return stem + ".json", stem + ".md"
