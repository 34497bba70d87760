"""Small-scale reproduction of the MaskDiT claim on MNIST-5k: quality vs training wall-clock and FLOPs.

Trains MaskDiT (the "mnist" preset, the default run's recipe) and the DiT baseline of the same
encoder (same width/depth/patch, no decoder, no masking, learn_sigma False) for the same training
FLOPs: DiT gets as many steps as MaskDiT's masked and unmasked steps cost (`flops.train_step_flops`),
with the preset's batch, lr, warm-up and EMA, and its lr decay over the same fraction of its run;
one torch thread each. Both are evaluated at equal FLOPs: DiT at the steps whose cumulative FLOPs
are nearest to MaskDiT's evaluation points. Training runs in chunks (`train(cfg, stop_at=step)`,
then resume); only the chunks are timed. After each chunk the EMA weights of the checkpoint are
scored by `maskdit_fast.evaluate --metric classifier` (Fréchet distance in the MNIST-5k digit
classifier's features against the 5,000 real digits, lower is better, and the fraction of samples
classified as their intended class) with the preset's sampler steps and guidance.

Outputs in --out: quality_vs_compute.png (FD and class accuracy vs training seconds and vs training
FLOPs), results.json, results.md. The .md says whether MaskDiT reaches DiT's final FD sooner and by
what factor on the FLOPs and wall-time axes (first crossing of the linearly interpolated MaskDiT
curve), DiT's FD at MaskDiT's final budgets, and the metric sanity check: FD of held-out real digits
vs FD of the earliest samples, at the same sample count.

    python benchmarks/reproduce_small.py                      # default: ~12-14 min on 2 CPU cores
    python benchmarks/reproduce_small.py --quick --out /tmp/rs   # pipeline smoke test (< 1 min)
    python benchmarks/reproduce_small.py --replot                # redo PNG / .md from results.json

Run dirs (checkpoints) go to --runs (default runs/reproduce_small, git-ignored) and are deleted
and retrained from scratch on every invocation, since the timings must cover whole runs.
"""
import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time

import numpy as np
import torch

from maskdit_fast import evaluate, fid
from maskdit_fast.config import PRESETS, config_from_dict
from maskdit_fast.flops import train_step_flops
from maskdit_fast.data import build_dataset
from maskdit_fast.train import build_model, mask_ratio_fn, train

# DiT = the preset's MaskDiT encoder (same width, depth, heads, MLP ratio, patch) without decoder and masking.
_ENCODER = {k: PRESETS["mnist"]["model_kwargs"][k] for k in ("hidden_size", "depth", "num_heads", "mlp_ratio")}
VARIANTS = {
    "maskdit": dict(model="MaskDiT-S/4"),
    "dit": dict(model="DiT-S/4", model_kwargs=dict(_ENCODER, learn_sigma=False), mask_ratio=0.0,
                mae_coef=0.0, unmasked_steps=0),
}
# Both variants: no end-of-training sampling inside the timed part (the script evaluates instead),
# one thread, checkpoints only where the script stops.
COMMON = dict(sample_per_class=0, eval_per_class=0, threads=1)
# MaskDiT's evaluation points (optimizer steps; the last is the end of training; DiT's are the steps
# of equal FLOPs), at fixed fractions of the preset's run. The first doubles as the "early-training
# samples" of the metric sanity check.
DEFAULT_EVAL_STEPS = tuple(round(f * PRESETS["mnist"]["steps"]) for f in (1 / 12, 1 / 3, 2 / 3, 1))
DEFAULT_SAMPLES, DEFAULT_SAMPLE_STEPS = 200, PRESETS["mnist"]["sample_steps"]
# --quick: a tiny model, 4 steps, to exercise the whole pipeline.
QUICK = dict(steps=4, batch_size=16, log_every=2, ckpt_every=4, unmasked_steps=1, lr_warmup_steps=0,
             lr_decay_steps=2)
QUICK_WIDTH = dict(hidden_size=32, depth=1, num_heads=2)
QUICK_DECODER = dict(decoder_hidden_size=32, decoder_depth=1, decoder_num_heads=2)
QUICK_EVAL_STEPS, QUICK_SAMPLES, QUICK_SAMPLE_STEPS = (2, 4), 20, 2


def variant_configs(runs, quick=False):
    """{name: validated TrainConfig} of the VARIANTS with run dirs <runs>/<name>: MaskDiT as the
    preset, DiT for the same training FLOPs (see the module docstring)."""
    cfgs = {}
    for name in VARIANTS:
        values = dict(PRESETS["mnist"], **COMMON, name=name, run_dir=os.path.join(runs, name))
        if quick:
            values.update(QUICK)
        values.update(VARIANTS[name])  # replaces model_kwargs whole: DiT takes no decoder_* arguments
        if quick:
            kwargs = dict(values["model_kwargs"], **QUICK_WIDTH)
            if values["model"].startswith("MaskDiT"):
                kwargs.update(QUICK_DECODER)
            values["model_kwargs"] = kwargs
        if name == "dit":
            mask = cfgs["maskdit"]
            dit_step = cumulative_train_flops(config_from_dict(dict(values, steps=1, lr_decay_steps=0)))[1]
            values["steps"] = max(1, round(cumulative_train_flops(mask)[-1] / dit_step))
            values["lr_decay_steps"] = round(mask.lr_decay_steps * values["steps"] / mask.steps)
        cfgs[name] = config_from_dict(values, source=f"variant {name}").validate()
    return cfgs


def equal_flops_steps(flops, target_flops):
    """For each of `target_flops` (cumulative FLOPs, ascending), the step >= 1 whose cumulative
    training FLOPs (`flops`, from cumulative_train_flops) are nearest to it; the last target maps to
    the run's last step. Returns a sorted list of distinct steps."""
    steps = [max(1, int(np.argmin(np.abs(flops - f)))) for f in target_flops[:-1]] + [len(flops) - 1]
    return sorted(set(steps))


def cumulative_train_flops(cfg):
    """Training FLOPs (forward + backward, `flops.train_step_flops`) done after each step.

    Returns a float64 array [cfg.steps + 1]; entry s = FLOPs of steps 0..s-1, each at the mask
    ratio the trainer uses for it (MaskDiT: masked, then unmasked for the last unmasked_steps).
    """
    net = build_model(cfg, build_dataset(cfg.data, cfg.num_classes).sample_shape)
    ratio_at, per_ratio = mask_ratio_fn(cfg), {}
    per_step = []
    for step in range(cfg.steps):
        r = ratio_at(step)
        if r not in per_ratio:
            per_ratio[r] = train_step_flops(net, mask_ratio=r, batch=cfg.batch_size)
        per_step.append(per_ratio[r])
    return np.concatenate([[0.0], np.cumsum(per_step, dtype=np.float64)])


def score(ckpt, out, num_samples, sample_steps, cfg, ref_stats):
    """`maskdit_fast.evaluate --metric classifier` of a checkpoint's EMA weights -> metrics dict."""
    args = ["--ckpt", ckpt, "--metric", "classifier", "--num-samples", str(num_samples),
            "--batch-size", str(min(num_samples, 250)), "--steps", str(sample_steps),
            "--cfg-scale", str(cfg.sample_cfg), "--solver", cfg.sample_solver, "--out", out,
            "--device", "cpu"]
    if cfg.sample_cfg_interval:
        args += ["--cfg-interval", *map(str, cfg.sample_cfg_interval)]
    if ref_stats:
        args += ["--ref-stats", ref_stats]
    return evaluate.main(args)


def real_digit_fd(ref_stats, num_samples):
    """Metric floor: classifier-feature FD of `num_samples` held-out real digits (the classifier's
    test split, balanced over classes) against the same reference statistics as the samples.

    Returns (fd, class accuracy of those digits). They are part of the 5,000-digit reference set
    (not of the classifier's training set), so this is a floor at this sample count, not an
    independent-set FD."""
    from maskdit_fast.classifier import load_classifier, train_test_split
    _, _, x, y = train_test_split()
    rank = torch.empty_like(y)  # position of each digit within its class: interleave the classes
    for c in y.unique():
        rank[y == c] = torch.arange(int((y == c).sum()))
    order = torch.argsort(rank * 10 + y, stable=True)
    x, y = x[order][:num_samples], y[order][:num_samples]
    clf, _ = load_classifier()
    with torch.no_grad():
        feats = clf.features(x).double()
        acc = float((clf.head(feats.float()).argmax(1) == y).double().mean())
    with np.load(ref_stats) as data:
        fd = fid.frechet_distance_to_features(feats.numpy(), data["mu"], data["sigma"])
    return float(fd), acc


def train_and_evaluate(name, cfg, eval_steps, num_samples, sample_steps, ref_stats, log):
    """Trains `cfg` from scratch in chunks ending at `eval_steps`, scoring after each.

    Returns a list of dicts per eval point: step, mask_ratio (of the last step trained),
    train_seconds and train_flops (cumulative, training only), fid_classifier, class_accuracy,
    eval_seconds, load_1min (the 1-minute load average after the evaluation)."""
    shutil.rmtree(cfg.run_dir, ignore_errors=True)
    flops, ratio_at = cumulative_train_flops(cfg), mask_ratio_fn(cfg)
    points, train_s = [], 0.0
    for step in eval_steps:
        t0 = time.perf_counter()
        result = train(cfg, stop_at=step if step < cfg.steps else None, progress=False)
        train_s += time.perf_counter() - t0
        if result.get("step") != step:
            raise RuntimeError(f"{name}: training stopped at step {result.get('step')}, expected {step}")
        ckpt = os.path.join(cfg.run_dir, "checkpoints", f"step_{step:08d}.pt")
        t0 = time.perf_counter()
        metrics = score(ckpt, os.path.join(cfg.run_dir, f"eval_{step:06d}"), num_samples, sample_steps, cfg,
                        ref_stats)
        points.append(dict(step=step, mask_ratio=ratio_at(step - 1), train_seconds=round(train_s, 2),
                           train_flops=float(flops[step]), fid_classifier=metrics["fid_classifier"],
                           class_accuracy=metrics["class_accuracy"],
                           eval_seconds=round(time.perf_counter() - t0, 1), load_1min=os.getloadavg()[0]))
        ref_stats = ref_stats or os.path.join(cfg.run_dir, f"eval_{step:06d}", "ref_stats.npz")
        p = points[-1]
        log(f"{name} step {step}: {p['train_seconds']:.0f} s training, FD {p['fid_classifier']:.2f}, "
            f"accuracy {p['class_accuracy']:.1%} (eval {p['eval_seconds']:.0f} s, load {p['load_1min']:.2f})")
    return points, ref_stats


def first_reach(xs, fds, target):
    """First x where the piecewise-linear curve (xs, fds) gets to fds <= target, or None.

    xs, fds: equal-length sequences of floats (fds may start with inf: "not yet measured")."""
    for i, (x, f) in enumerate(zip(xs, fds)):
        if f <= target:
            if i == 0 or not np.isfinite(fds[i - 1]):  # nothing to interpolate from
                return float(x)
            x0, f0 = xs[i - 1], fds[i - 1]
            return float(x0 + (x - x0) * (f0 - target) / (f0 - f))
    return None


def compare(points):
    """When MaskDiT reaches DiT's final FD, on the time, FLOPs and step (images seen: both use the
    preset's batch) axes, and the speed-up factors (DiT's total / MaskDiT's crossing point; None where
    it never does); and DiT's FD interpolated at MaskDiT's final budget on each axis (None beyond
    DiT's last point)."""
    dit, mask = points["dit"], points["maskdit"]
    target = dit[-1]["fid_classifier"]
    out = {"dit_final_fid": target, "maskdit_final_fid": mask[-1]["fid_classifier"],
           "dit_final_accuracy": dit[-1]["class_accuracy"], "maskdit_final_accuracy": mask[-1]["class_accuracy"]}
    for axis in ("train_seconds", "train_flops", "step"):
        reach = first_reach([0.0] + [p[axis] for p in mask], [float("inf")] + [p["fid_classifier"] for p in mask],
                            target)
        out[f"maskdit_reaches_at_{axis}"] = reach
        out[f"dit_final_{axis}"], out[f"maskdit_final_{axis}"] = dit[-1][axis], mask[-1][axis]
        out[f"factor_{axis}"] = dit[-1][axis] / reach if reach else None
        xs = [0.0] + [p[axis] for p in dit]
        budget = mask[-1][axis]
        out[f"dit_fid_at_maskdit_final_{axis}"] = (
            float(np.interp(budget, xs[1:], [p["fid_classifier"] for p in dit])) if xs[1] <= budget <= xs[-1]
            else None)
    out["seconds_per_step"] = {k: v[-1]["train_seconds"] / v[-1]["step"] for k, v in points.items()}
    return out


def plot(curves, path, axes, title, floor=None, floor_label="held-out real digits", labels=None):
    """PNG of classifier FD and class accuracy (rows) against each of `axes` ((point key, axis label, scale)
    columns) for each curve ({name: [point]}), with DiT's final FD and the real-data `floor` FD as reference
    lines. Also draws benchmarks/reproduce_gpu.py's figure."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, grid = plt.subplots(2, len(axes), figsize=(5 * len(axes) + 1, 8))
    for col, (axis, label, scale) in enumerate(axes):
        for row, (key, ylabel) in enumerate((("fid_classifier", "classifier FD (lower is better)"),
                                             ("class_accuracy", "sample class accuracy"))):
            ax = grid[row, col]
            for name, pts in curves.items():
                ax.plot([p[axis] * scale for p in pts], [p[key] for p in pts], "s-" if name == "dit" else "o-",
                        label=(labels or {}).get(name, name))
            if key == "fid_classifier":
                if "dit" in curves:
                    ax.axhline(curves["dit"][-1][key], color="gray", ls="--", lw=0.8, label="DiT final FD")
                if floor is not None:
                    ax.axhline(floor, color="green", ls=":", lw=1, label=floor_label)
                ax.set_yscale("log")
            ax.set_xlabel(label)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def machine_info():
    """CPU model, core counts, load, versions (for results.json)."""
    model = platform.processor()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return {"cpu": model or "unknown", "nproc": len(os.sched_getaffinity(0)), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "platform": platform.platform()}


def markdown(results):
    """results dict -> results.md text."""
    m, c, s = results["machine"], results["comparison"], results["sanity_check"]
    lines = [f"# MaskDiT vs DiT on MNIST-5k, CPU reproduction ({results['started'][:10]})", "",
             f"CPU: {m['cpu']}, nproc {m['nproc']}, {m['torch_threads']} torch thread; torch {m['torch']}, "
             f"Python {m['python']}. Load average (1 min) {results['load_start'][0]:.2f} at start, "
             f"{results['load_end'][0]:.2f} at end (the machine was shared with other jobs, so "
             f"absolute seconds are noisy; FLOPs are exact). Started {results['started']}, finished "
             f"{results['finished']} ({results['total_minutes']:.1f} min in all).", "",
             f"Setting: {results['setting']}", "",
             "| variant | step | mask ratio | train s | train PFLOP | classifier FD | class accuracy | load (1 min) |",
             "|---|---|---|---|---|---|---|---|"]
    for name, pts in results["points"].items():
        for p in pts:
            lines.append(f"| {name} | {p['step']} | {p['mask_ratio']} | {p['train_seconds']:.0f} | "
                         f"{p['train_flops'] / 1e15:.3f} | {p['fid_classifier']:.2f} | {p['class_accuracy']:.1%} | "
                         f"{p['load_1min']:.2f} |")
    lines += ["", "## Does MaskDiT reach DiT's final quality sooner?", ""]
    lines.append(f"DiT's final FD is {c['dit_final_fid']:.2f} (accuracy {c['dit_final_accuracy']:.1%}) after "
                 f"{c['dit_final_train_seconds']:.0f} s / {c['dit_final_train_flops'] / 1e15:.3f} PFLOP; MaskDiT "
                 f"ends at FD {c['maskdit_final_fid']:.2f} (accuracy {c['maskdit_final_accuracy']:.1%}). "
                 f"Seconds per step: MaskDiT {c['seconds_per_step']['maskdit']:.3f} (masked + unmasked "
                 f"steps), DiT {c['seconds_per_step']['dit']:.3f}.")
    budget = [f"{name} {c[f'maskdit_final_{axis}'] * scale:{fmt}}{unit}: DiT's FD there is "
              + (f"{c[f'dit_fid_at_maskdit_final_{axis}']:.2f}" if c[f"dit_fid_at_maskdit_final_{axis}"] is not None
                 else "not measured")
              for name, axis, scale, fmt, unit in (("time", "train_seconds", 1.0, ".0f", " s"),
                                                   ("FLOPs", "train_flops", 1e-15, ".3f", " PFLOP"))]
    lines += ["", f"At MaskDiT's final budget (FD {c['maskdit_final_fid']:.2f}), DiT interpolated between its "
                 f"evaluation points: " + "; ".join(budget) + "."]
    if c["maskdit_reaches_at_train_seconds"] is None:
        lines.append("")
        lines.append("**MaskDiT does not reach DiT's final FD within its run** (same training FLOPs), so no "
                     "speed-up factor can be claimed from this run.")
    else:
        lines += ["", "| axis | MaskDiT reaches it at | DiT's total | factor |", "|---|---|---|---|"]
        for axis, fmt in (("train_seconds", "{:.0f} s"), ("train_flops", "{:.3f} PFLOP"),
                          ("step", "step {:.0f}")):
            scale = 1e-15 if axis == "train_flops" else 1.0
            lines.append(f"| {axis} | {fmt.format(c[f'maskdit_reaches_at_{axis}'] * scale)} | "
                         f"{fmt.format(c[f'dit_final_{axis}'] * scale)} | {c[f'factor_{axis}']:.2f}x |")
        lines += ["", "Crossing points are linear interpolations between evaluation points (first crossing); "
                  f"with {len(results['points']['maskdit'])} points per curve and a noisy small-sample FD, "
                  "treat the factors as rough."]
    lines += ["", "## Metric sanity check", "",
              f"At the same sample count ({s['num_samples']}), FD of held-out real digits: "
              f"{s['real_fid']:.2f} (their class accuracy {s['real_accuracy']:.1%}); FD of the earliest samples: "
              + ", ".join(f"{k} {v:.2f} (step {s['early_step'][k]})" for k, v in s["early_fid"].items())
              + f". Separation (smallest early FD / real FD): {s['separation']:.1f}x.", "",
              "![quality vs compute](quality_vs_compute.png)", ""]
    if results.get("notes"):  # free-text additions to results.json (checks run by hand), kept by --replot
        lines += ["## Notes", ""] + [f"- {note}" for note in results["notes"]] + [""]
    return "\n".join(lines)


def run(out, runs, quick=False, num_samples=None, sample_steps=None, eval_steps=None, log=print):
    """The whole experiment; writes <out>/results.json, results.md, quality_vs_compute.png and
    returns the results dict."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        os.makedirs(out, exist_ok=True)
        num_samples = num_samples or (QUICK_SAMPLES if quick else DEFAULT_SAMPLES)
        sample_steps = sample_steps or (QUICK_SAMPLE_STEPS if quick else DEFAULT_SAMPLE_STEPS)
        cfgs = variant_configs(runs, quick)
        steps = cfgs["maskdit"].steps
        eval_steps = sorted(set(eval_steps or (QUICK_EVAL_STEPS if quick else DEFAULT_EVAL_STEPS)))
        if eval_steps[-1] != steps or eval_steps[0] < 1:
            raise ValueError(f"eval steps {eval_steps} must be >= 1 and end at the run's {steps} steps")
        mask_flops = cumulative_train_flops(cfgs["maskdit"])
        eval_at = {"maskdit": eval_steps,
                   "dit": equal_flops_steps(cumulative_train_flops(cfgs["dit"]), mask_flops[eval_steps])}
        results = {"started": datetime.datetime.now().isoformat(timespec="seconds"), "load_start": os.getloadavg(),
                   "machine": machine_info(), "quick": quick}
        t_start = time.perf_counter()
        cfg = cfgs["maskdit"]
        dit = cfgs["dit"]
        results["setting"] = (
            f"equal training FLOPs (not equal steps): MaskDiT {steps} steps (the mnist preset: decoder "
            f"{cfg.model_kwargs['decoder_depth']} x {cfg.model_kwargs['decoder_hidden_size']}, mask ratio "
            f"{cfg.mask_ratio} + MAE {cfg.mae_coef}, unmasked for the last {cfg.unmasked_steps} steps"
            + (", EMA restarted there" if cfg.ema_restart else "") + f"), DiT (the same encoder, unmasked) "
            f"{dit.steps} steps; batch {cfg.batch_size}, lr {cfg.lr} (warm-up {cfg.lr_warmup_steps}, linear "
            f"decay over the last {cfg.lr_decay_steps} / {dit.lr_decay_steps} steps), EMA {cfg.ema_decay}, EDM "
            f"P_mean {cfg.P_mean} / P_std {cfg.P_std}. Evaluation at equal FLOPs: EMA weights, {num_samples} "
            f"samples (balanced classes), {cfg.sample_solver} {sample_steps} steps, CFG {cfg.sample_cfg}"
            + (f" at {cfg.sample_cfg_interval[0]} < sigma <= {cfg.sample_cfg_interval[1]}" if cfg.sample_cfg_interval
               else "") + ", at "
            f"MaskDiT steps {eval_at['maskdit']} and DiT steps {eval_at['dit']}. Training seconds exclude "
            f"evaluation (they include the chunks' checkpoint save/resume, ~1 s each).")
        results["config"] = {name: c.to_dict() for name, c in cfgs.items()}
        points, ref_stats = {}, None
        for name, c in cfgs.items():
            points[name], ref_stats = train_and_evaluate(name, c, eval_at[name], num_samples, sample_steps, ref_stats,
                                                         log)
        results["points"] = points
        real_fd, real_acc = real_digit_fd(ref_stats, num_samples)
        early = {name: pts[0]["fid_classifier"] for name, pts in points.items()}
        results["sanity_check"] = {"num_samples": num_samples, "real_fid": real_fd, "real_accuracy": real_acc,
                                   "early_step": {name: pts[0]["step"] for name, pts in points.items()},
                                   "early_fid": early,
                                   "separation": min(early.values()) / real_fd}
        results["load_end"] = os.getloadavg()
        results["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
        results["total_minutes"] = (time.perf_counter() - t_start) / 60
        write_reports(results, out)
        return results
    finally:  # the pin is for this run only: restore the caller's thread count
        torch.set_num_threads(threads)


def write_reports(results, out):
    """(Re)writes <out>/results.json, results.md and quality_vs_compute.png from a results dict,
    recomputing the comparison from its evaluation points."""
    results["comparison"] = compare(results["points"])
    plot(results["points"], os.path.join(out, "quality_vs_compute.png"),
         (("train_seconds", "training wall-clock (s)", 1.0), ("train_flops", "training FLOPs (PFLOP)", 1e-15)),
         "MaskDiT vs DiT on MNIST-5k (CPU, 1 thread): quality vs training compute",
         floor=results["sanity_check"]["real_fid"])
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(markdown(results))


def main(argv=None):
    """CLI entry point (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="PNG / JSON / Markdown folder (default benchmarks/results/"
                   "reproduce_small; runs/reproduce_small_quick with --quick, so the committed results stay)")
    p.add_argument("--runs", default=None, help="run dirs (default runs/reproduce_small; <out>/runs with --quick)")
    p.add_argument("--num-samples", type=int, default=None, help=f"samples per evaluation ({DEFAULT_SAMPLES})")
    p.add_argument("--sample-steps", type=int, default=None, help=f"EDM sampler steps ({DEFAULT_SAMPLE_STEPS})")
    p.add_argument("--eval-steps", default=None,
                   help=f"comma-separated steps to evaluate at, ending at the last step ({DEFAULT_EVAL_STEPS})")
    p.add_argument("--quick", action="store_true", help="tiny models, 4 steps: a pipeline smoke test")
    p.add_argument("--replot", action="store_true",
                   help="no training: redo the comparison, PNG and .md from <out>/results.json")
    args = p.parse_args(argv)
    if args.out is None:
        args.out = "runs/reproduce_small_quick" if args.quick else "benchmarks/results/reproduce_small"
    if args.replot:
        with open(os.path.join(args.out, "results.json")) as f:
            results = json.load(f)
        write_reports(results, args.out)
        sys.stdout.write(markdown(results))
        return
    if args.num_samples is not None and args.num_samples < 2:
        p.error("--num-samples must be >= 2")
    if args.sample_steps is not None and args.sample_steps < 1:
        p.error("--sample-steps must be >= 1")
    try:
        eval_steps = [int(s) for s in args.eval_steps.split(",")] if args.eval_steps else None
    except ValueError:
        p.error(f"--eval-steps: expected comma-separated integers, got {args.eval_steps!r}")
    runs = args.runs or (os.path.join(args.out, "runs") if args.quick else "runs/reproduce_small")
    results = run(args.out, runs, args.quick, args.num_samples, args.sample_steps, eval_steps,
                  log=lambda msg: print(msg, flush=True))
    sys.stdout.write(markdown(results))


if __name__ == "__main__":
    main()
