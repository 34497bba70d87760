"""Small-scale reproduction of the MaskDiT claim on MNIST-5k (runs on a laptop CPU).

Trains MaskDiT (50% masking, MAE term, final unmasked steps: the "mnist" preset) and the unmasked
DiT baseline (same width/depth, no decoder, no masking) for the same number of optimizer steps,
then scores the EMA weights of each with `maskdit_fast.evaluate --metric classifier`: the Fréchet
distance in the MNIST-5k digit classifier's feature space against the 5,000 real digits (lower is
better) and the fraction of samples classified as their intended class. Reports training time too,
so "quality at equal steps" and "time per step" can both be read off.

    python benchmarks/reproduce_small.py --out runs/reproduce_small   # two "mnist"-preset trainings
    python benchmarks/reproduce_small.py --out /tmp/rs --quick        # pipeline smoke test (< 1 min)

Writes <out>/results.json and <out>/results.md; each variant's run directory is <out>/<variant>.
Re-running resumes unfinished runs and reuses finished ones (as the trainer does); the reported
training time is that of the current invocation only, so time a run from scratch.
"""
import argparse
import json
import os
import sys
import time

from maskdit_fast import evaluate
from maskdit_fast.config import PRESETS, config_from_dict
from maskdit_fast.train import train

# Overrides of the "mnist" preset per variant.
VARIANTS = {
    "maskdit": dict(model="MaskDiT-S/2"),
    "dit": dict(model="DiT-S/2", model_kwargs=dict(learn_sigma=False), mask_ratio=0.0, mae_coef=0.0,
                unmasked_steps=0),
}
# --quick: a few steps of a tiny model, only to exercise the whole pipeline.
QUICK = dict(steps=4, batch_size=16, log_every=2, ckpt_every=4, unmasked_steps=1, sample_per_class=0,
             eval_per_class=0)
QUICK_WIDTH = dict(hidden_size=32, depth=1, num_heads=2)
QUICK_DECODER = dict(decoder_hidden_size=32, decoder_depth=1, decoder_num_heads=2)


def variant_config(name, out, steps=None, quick=False):
    """TrainConfig of variant `name` (see VARIANTS), run dir <out>/<name>."""
    values = dict(PRESETS["mnist"], name=name, run_dir=os.path.join(out, name))
    if quick:
        values.update(QUICK)
    values.update(VARIANTS[name])
    if quick:
        kwargs = dict(values.get("model_kwargs") or {}, **QUICK_WIDTH)
        if values["model"].startswith("MaskDiT"):
            kwargs.update(QUICK_DECODER)
        values["model_kwargs"] = kwargs
    if steps is not None:
        values["steps"] = steps
        values["unmasked_steps"] = min(values["unmasked_steps"], steps)
    return config_from_dict(values, source=f"variant {name}").validate()


def run(out, variants, steps=None, num_samples=1000, sample_steps=None, quick=False):
    """Trains and evaluates each variant; returns {variant: results dict} and writes results.json/md."""
    os.makedirs(out, exist_ok=True)
    results, ref_stats = {}, None
    for name in variants:
        cfg = variant_config(name, out, steps, quick)
        t0 = time.perf_counter()
        trained = train(cfg, progress=not quick)
        train_s = time.perf_counter() - t0
        eval_dir = os.path.join(cfg.run_dir, "eval")
        args = ["--ckpt", os.path.join(cfg.run_dir, "ema.safetensors"), "--metric", "classifier",
                "--num-samples", str(num_samples), "--batch-size", "250",
                "--steps", str(sample_steps or cfg.sample_steps), "--cfg-scale", str(cfg.sample_cfg),
                "--solver", cfg.sample_solver, "--out", eval_dir, "--device", cfg.device]
        if ref_stats:  # the real-digit statistics are the same for every variant: compute them once
            args += ["--ref-stats", ref_stats]
        metrics = evaluate.main(args)
        ref_stats = ref_stats or os.path.join(eval_dir, "ref_stats.npz")
        results[name] = {
            "model": cfg.model, "mask_ratio": cfg.mask_ratio, "unmasked_steps": cfg.unmasked_steps,
            "steps": trained.get("step"), "train_seconds": round(train_s, 1),
            "seconds_per_step": round(train_s / max(1, cfg.steps), 4),
            "fid_classifier": metrics["fid_classifier"], "class_accuracy": metrics["class_accuracy"],
            "num_samples": num_samples, "sample_steps": sample_steps or cfg.sample_steps,
            "cfg_scale": cfg.sample_cfg}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(markdown_table(results))
    return results


def markdown_table(results):
    """Results dict -> a Markdown table (one row per variant)."""
    lines = ["| variant | model | mask ratio | steps | train s (s/step) | classifier FD | class accuracy |",
             "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['model']} | {r['mask_ratio']} | {r['steps']} | {r['train_seconds']} "
                     f"({r['seconds_per_step']}) | {r['fid_classifier']:.3f} | {r['class_accuracy']:.1%} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/reproduce_small")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {list(VARIANTS)}")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per variant (default: the preset's)")
    p.add_argument("--num-samples", type=int, default=1000, help="samples scored per variant")
    p.add_argument("--sample-steps", type=int, default=None, help="EDM sampler steps (default: the preset's)")
    p.add_argument("--quick", action="store_true", help="tiny models, 4 steps: a pipeline smoke test")
    args = p.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        p.error(f"--variants: unknown {unknown or args.variants!r}; choose from {list(VARIANTS)}")
    results = run(args.out, variants, args.steps, args.num_samples, args.sample_steps, args.quick)
    sys.stdout.write(markdown_table(results))


if __name__ == "__main__":
    main()
