"""bf16 vs fp8 training parity: loss curves of the same run in both precisions (issue #16).

Three arms of `maskdit_fast.train`, identical except for what the label says: the same model
init, data order, masks, noise levels and noise (one seed), so the fp8 / bf16 gap is numerics only:
  bf16          --precision bf16 --compile
  fp8           --precision fp8 --compile (torchao float8 block linears; maskdit_fast.fp8)
  bf16 seed 1   --precision bf16 --compile --seed 1: the yardstick, how far two bf16 runs that
                differ only in their random draws lie apart at this step count
Model: MaskDiT at XL width (hidden 1152, 16 heads: every encoder-block linear passes the float8
size rule, as in MaskDiT-XL/2) with 8 encoder / 2 decoder blocks, on the embedded MNIST-5k
digits (1 x 32 x 32 pixels, patch 2: 256 tokens, half kept), batch 128, AdamW lr 2e-4 (50 warm-up
steps), no gradient clipping (a divergence must show), 300 steps.

Parity holds when the fp8 run stays finite and its mean loss over the last 20 % of the steps is
within max(2 x the seed yardstick's gap, 2 %) of bf16's. Written to --out: fp8_parity.json (every
step's loss per arm, images/s after compile warm-up, compile seconds, environment),
fp8_parity.png (raw and smoothed curves) and fp8_parity.md (the table and the verdict).

GPU (one H200 or H100, < 3 min; the image has no torchao: carry the wheel, see README):
    pip install --no-deps wheels/torchao-0.17.0-cp310-abi3-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl
    PYTHONPATH=. python benchmarks/fp8_parity.py --out $OUT/fp8_parity

CPU smoke (seconds; tests/test_fp8_parity.py runs it): a tiny model on the 8x8 digits, and since
float8 cannot run on a CPU the second arm is fp32, labelled "fp32 (stand-in: no fp8 here)":
    python benchmarks/fp8_parity.py --dry --out /tmp/fp8_parity
"""
import argparse
import datetime
import importlib.metadata
import json
import os
import re
import statistics
import sys
import tempfile
import textwrap

import numpy as np
import torch

from maskdit_fast.bench import env_info
from maskdit_fast.config import config_from_dict
from maskdit_fast.fp8 import check_fp8_device
from maskdit_fast.train import train

TAIL = 0.2           # the verdict compares the mean loss over this last fraction of the steps
MIN_TOLERANCE = 0.02  # relative gap always allowed (two bf16 runs of one seed can differ this much at small sizes)
WINDOW = 25          # steps per smoothing window (table rows, smoothed curves); fewer in short runs

GPU_RUN = dict(
    data="mnist5k", model="MaskDiT-XL/2",
    model_kwargs=dict(depth=8, decoder_depth=2),
    steps=300, batch_size=128, lr=2e-4, lr_warmup_steps=50, grad_clip=0.0, mask_ratio=0.5, unmasked_steps=0,
    P_mean=-1.2, P_std=1.2, mae_coef=0.1, label_dropout=0.1, compile=True)
DRY_RUN = dict(
    data="digits", model="MaskDiT-S/2",
    model_kwargs=dict(hidden_size=32, depth=1, num_heads=2, decoder_hidden_size=32, decoder_depth=1,
                      decoder_num_heads=2),
    steps=12, batch_size=16, lr=1e-3, lr_warmup_steps=2, grad_clip=0.0, mask_ratio=0.5, unmasked_steps=0,
    mae_coef=0.1, label_dropout=0.1, compile=False, device="cpu", threads=1)


def arms(dry):
    """(label, config overrides) of the three arms."""
    second = ("fp32 (stand-in: no fp8 here)", dict(precision="fp32")) if dry else ("fp8", dict(precision="fp8"))
    return [("bf16", dict(precision="bf16")), second, ("bf16 seed 1", dict(precision="bf16", seed=1))]


def run_arm(base, overrides, steps, batch_size):
    """Trains one arm in a scratch run dir. Returns its per-step losses, images/s of the steps after
    the compile warm-up (median of the per-step figures), warm-up seconds, and the error that
    stopped it (a non-finite step: the trainer refuses it) or None."""
    with tempfile.TemporaryDirectory(prefix="fp8_parity_") as run_dir:
        values = {**base, **overrides}  # on TrainConfig's defaults
        values.update(run_dir=run_dir, name="fp8_parity", steps=steps, batch_size=batch_size, log_every=1,
                      ckpt_every=10 ** 9, sample_every=0, sample_per_class=0, eval_per_class=0, resume="never",
                      max_nan_skips=0)
        error = None
        try:
            train(config_from_dict(values, source="fp8_parity"), progress=False)
        except RuntimeError as e:  # the trainer stops on a non-finite loss / gradient / weights
            if not re.search(r"non-finite|NaN", str(e)):
                raise
            error = str(e)
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            records = [json.loads(line) for line in f]
    torch._dynamo.reset()  # the next arm compiles its own graphs
    losses = {r["step"]: r["loss"] for r in records if "loss" in r}
    warmup = [r for r in records if "warmup_s" in r]
    after = [r["images_per_s"] for r in records if "images_per_s" in r and r["step"] > max(
        [w["step"] for w in warmup], default=0)]
    return {"losses": [losses[s] for s in sorted(losses)], "warmup_s": sum(w["warmup_s"] for w in warmup),
            "images_per_s": statistics.median(after) if after else None, "error": error}


def window(steps):
    """Steps per smoothing window for a run of `steps`: WINDOW, or a quarter of a shorter run."""
    return max(1, min(WINDOW, steps // 4))


def window_means(losses, width):
    """Mean loss over consecutive windows of `width` steps: [(last step of the window, mean)]."""
    return [(end, float(np.mean(losses[end - width:end]))) for end in range(width, len(losses) + 1, width)]


def tail_mean(losses, steps):
    """Mean loss over the last TAIL of `steps` (None if the run stopped before that window ended)."""
    n = max(1, int(round(steps * TAIL)))
    return float(np.mean(losses[-n:])) if len(losses) == steps else None


def verdict(results, steps):
    """The parity rule (module docstring) over {label: arm result}; returns a dict of its numbers."""
    labels = list(results)
    out = {"rule": f"finite and |tail(second arm) - tail(bf16)| / tail(bf16) <= max(2 x the 'bf16 seed 1' gap, "
                   f"{MIN_TOLERANCE:.0%}), tail = mean loss of the last {TAIL:.0%} of the steps"}
    if len(labels) < 3:
        out.update(parity=False, reason=f"incomplete: only {labels} ran")
        return out
    base, test, seed = (results[k] for k in labels)
    tails = [tail_mean(r["losses"], steps) for r in (base, test, seed)]
    out["tail_loss"] = dict(zip(labels, tails))
    if None in tails[:2] or test["error"] or base["error"]:
        out.update(parity=False, reason=test["error"] or base["error"] or "a run stopped early")
        return out
    gap = abs(tails[1] - tails[0]) / tails[0]
    seed_gap = abs(tails[2] - tails[0]) / tails[0] if tails[2] is not None else None
    tolerance = max(2 * (seed_gap or 0.0), MIN_TOLERANCE)
    out.update(gap=gap, seed_gap=seed_gap, tolerance=tolerance, parity=gap <= tolerance)
    return out


def write_plot(results, path, title, width):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for (label, r), color, style in zip(results.items(), ("C0", "C3", "C7"), ("-", "--", "-")):
        losses = np.asarray(r["losses"], dtype=float)
        steps = np.arange(1, len(losses) + 1)
        ax.plot(steps, losses, color=color, alpha=0.2, linewidth=0.8)
        if len(losses) >= width:
            smooth = np.convolve(losses, np.ones(width) / width, mode="valid")  # mean of the last `width` steps
            ax.plot(steps[width - 1:], smooth, color=color, linestyle=style, linewidth=2, label=label)
    ax.set(xlabel="optimizer step", ylabel=f"training loss (faint: per step; bold: {width}-step mean)")
    ax.set_title("\n".join(textwrap.wrap(title, 100)), fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(report):
    results, v, env = report["arms"], report["verdict"], report["env"]
    labels = list(results)
    lines = [f"# fp8 parity ({'dry CPU run: fp32 stands in for fp8' if report['dry'] else 'GPU run'})", "",
             f"{report['date']}, {env['card']}, torch {env['torch']}, torchao {report['torchao']}, "
             f"{report['model']}, {report['steps']} steps, batch {report['batch_size']}.", "",
             "| step | " + " | ".join(labels) + "".join(f" | {k} vs {labels[0]}" for k in labels[1:]) + " |",
             "|---|" + "---|" * (2 * len(labels) - 1)]
    width = window(report["steps"])
    means = {k: dict(window_means(r["losses"], width)) for k, r in results.items()}
    for end in sorted(means[labels[0]]):
        row = [means[k].get(end) for k in labels]
        rel = [f"{(x - row[0]) / row[0]:+.2%}" if x is not None and row[0] else "-" for x in row[1:]]
        cells = [f"{x:.4f}" if x is not None else "-" for x in row]
        lines.append(f"| {end - width + 1}-{end} | " + " | ".join(cells) + " | " + " | ".join(rel) + " |")
    lines += ["", f"Rows: mean training loss over each {width}-step window.", "",
              "| arm | images/s after warm-up | compile warm-up s | stopped by |", "|---|---|---|---|"]
    for k, r in results.items():
        ips = f"{r['images_per_s']:.0f}" if r["images_per_s"] else "-"
        lines.append(f"| {k} | {ips} | {r['warmup_s']:.1f} | {r['error'] or '-'} |")
    gap = f"{v['gap']:.2%}" if "gap" in v else "-"
    seed_gap = f"{v['seed_gap']:.2%}" if v.get("seed_gap") is not None else "-"
    lines += ["", f"Verdict: **{'parity' if v['parity'] else 'NO parity'}** (gap {gap}, seed yardstick "
                  f"{seed_gap}, tolerance {v.get('tolerance', float('nan')):.2%}). Rule: {v['rule']}."]
    if not v["parity"] and "reason" in v:
        lines.append(f"Reason: {v['reason']}")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="benchmarks/results/fp8_parity", help="output directory")
    p.add_argument("--dry", action="store_true", help="seconds on CPU: tiny model, fp32 stands in for fp8")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per arm (default 300; dry 12)")
    p.add_argument("--batch-size", type=int, default=None, help="global batch (default 128; dry 16)")
    args = p.parse_args(argv)
    base = DRY_RUN if args.dry else GPU_RUN
    steps, batch = args.steps or base["steps"], args.batch_size or base["batch_size"]
    if steps < 4:
        p.error("--steps must be >= 4")
    device = torch.device(base.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"))
    if not args.dry:
        check_fp8_device(device)  # before anything runs or is written: torchao and a float8 GPU
    os.makedirs(args.out, exist_ok=True)
    try:
        torchao_version = importlib.metadata.version("torchao")
    except importlib.metadata.PackageNotFoundError:
        torchao_version = None
    model = f"{base['model']} ({', '.join(f'{k}={v}' for k, v in base['model_kwargs'].items())})"
    report = {"date": datetime.date.today().isoformat(), "dry": args.dry, "env": env_info(device),
              "torchao": torchao_version, "model": model, "data": base["data"], "steps": steps, "batch_size": batch,
              "lr": base["lr"], "arms": {}}
    for label, overrides in arms(args.dry):
        print(f"[fp8_parity] {label}: {steps} steps", flush=True)
        r = report["arms"][label] = run_arm(base, overrides, steps, batch)
        print(f"[fp8_parity] {label}: final loss {r['losses'][-1] if r['losses'] else float('nan'):.4f}, "
              f"{r['images_per_s'] or float('nan'):.0f} images/s, warm-up {r['warmup_s']:.1f} s"
              + (f", stopped: {r['error']}" if r["error"] else ""), flush=True)
        write_outputs(report, args.out, window(steps))  # after every arm: a run cut short keeps what it measured
    print(markdown(report))
    return report


def write_outputs(report, out, width):
    """fp8_parity.json / .png / .md in `out` from `report` (the arms run so far, their verdict)."""
    report["verdict"] = verdict(report["arms"], report["steps"])
    with open(os.path.join(out, "fp8_parity.json"), "w") as f:
        json.dump(report, f, indent=1)
    write_plot(report["arms"], os.path.join(out, "fp8_parity.png"),
               f"{'DRY (CPU, fp32 stands in for fp8)' if report['dry'] else report['env']['card']}: {report['model']}",
               width)
    with open(os.path.join(out, "fp8_parity.md"), "w") as f:
        f.write(markdown(report))


if __name__ == "__main__":
    report = main()
    sys.exit(0 if report["verdict"]["parity"] or report["dry"] else 1)
