"""Train MaskDiT / DiT with the EDM loss: `python -m maskdit_fast.train [--preset P] [--config F] [--flags]`.

With no arguments it trains a small MaskDiT on the embedded MNIST-5k digits on the CPU (about ten
minutes) and ends with a sample grid and the class accuracy of those samples. Everything is in
the run dir (default runs/<name>): checkpoints/ (atomic, last N kept), metrics.jsonl, tb/
(TensorBoard), grid_*.png, ema.safetensors. Re-running the same command resumes from the latest
checkpoint; the resumed run reproduces the uninterrupted one exactly (same seeds, data position
and RNG states). SIGTERM / SIGINT write a checkpoint and exit cleanly.

The loop is small composable functions (build_* / train_step / save / load) so distributed
wrappers and compilation can be slotted in around them.
"""
import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import time

import numpy as np
import torch

from maskdit_fast.checkpoint import CheckpointManager, export_safetensors, load_checkpoint
from maskdit_fast.config import TrainConfig, parse_config
from maskdit_fast.data import DataStream, LatentShards, build_dataset
from maskdit_fast.diffusion import EDMPrecond, MaskDiTLoss, mask_ratio_schedule
from maskdit_fast.ema import create_ema, ema_decay, update_ema
from maskdit_fast.masking import random_masking_ids
from maskdit_fast.models import create_model
from maskdit_fast.sample import generate, model_metadata, save_grid

GRID_SEED = 1_000_000  # sample seeds of the fixed-label grids (distinct from training seeds)


@dataclasses.dataclass
class TrainState:
    """Everything that changes during training and is checkpointed."""
    net: torch.nn.Module
    ema: torch.nn.Module
    optimizer: torch.optim.Optimizer
    stream: DataStream
    loss_gen: torch.Generator      # noise levels, noise and masks (on the training device)
    data_gen: torch.Generator      # label dropout and latent posterior samples (CPU)
    step: int = 0                  # optimizer steps done
    nan_skips: int = 0


def resolve_device(name):
    """"auto" -> cuda if available else cpu; otherwise torch.device(name), checked."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available")
    return device


def build_data(cfg):
    """Validated dataset and its resumable stream of micro-batches (batch_size / grad_accum)."""
    if not cfg.data:
        raise ValueError("config: `data` is empty; pass --data <latent dir> (see maskdit_fast.prepare_latents)")
    dataset = build_dataset(cfg.data, cfg.num_classes)
    return dataset, DataStream(dataset, cfg.batch_size // cfg.grad_accum, cfg.seed)


def build_model(cfg, sample_shape):
    """The network for data of shape (C, H, W), from cfg.model / cfg.model_kwargs (fp32)."""
    c, h, w = sample_shape
    kwargs = dict(input_size=(h, w), in_channels=c, num_classes=cfg.num_classes)
    kwargs.update(cfg.model_kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)  # init depends on the seed only, not on earlier RNG use
        return create_model(cfg.model, **kwargs)


def build_optimizer(cfg, net):
    """AdamW (fused kernels where the device supports them), lr set per step by `lr_at`."""
    kwargs = dict(lr=cfg.lr, betas=(0.9, cfg.adam_beta2), weight_decay=cfg.weight_decay)
    try:
        return torch.optim.AdamW(net.parameters(), fused=True, **kwargs)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(net.parameters(), **kwargs)


def build_loss(cfg):
    """MaskDiTLoss from the config's EDM settings."""
    return MaskDiTLoss(cfg.P_mean, cfg.P_std, cfg.sigma_data, cfg.mae_coef)


def lr_at(cfg, step):
    """Learning rate at optimizer step `step`: linear warm-up, constant, optional linear decay."""
    lr = cfg.lr * min(1.0, (step + 1) / cfg.lr_warmup_steps) if cfg.lr_warmup_steps else cfg.lr
    if cfg.lr_decay_steps:
        lr *= min(1.0, (cfg.steps - step) / cfg.lr_decay_steps)
    return lr


def mask_ratio_fn(cfg):
    """step -> mask ratio: cfg.mask_schedule over the masked phase, then 0 for the final
    cfg.unmasked_steps steps."""
    masked_steps = cfg.steps - cfg.unmasked_steps
    if cfg.mask_schedule == "constant":
        schedule = mask_ratio_schedule("constant", cfg.mask_ratio)
    else:
        schedule = mask_ratio_schedule(cfg.mask_schedule, cfg.mask_ratio, cfg.mask_ratio_end, max(1, masked_steps))
    return lambda step: 0.0 if step >= masked_steps else schedule(step)


def train_step(cfg, state, loss_fn, mask_ratio, device):
    """One optimizer step over cfg.grad_accum micro-batches.

    Returns:
        dict of python floats: loss, dsm, mae (means over micro-batches), grad_norm, lr, and
        finite (1.0 / 0.0). A non-finite loss leaves weights, optimizer and EMA unchanged.
    """
    net, opt = state.net, state.optimizer
    precond = EDMPrecond(net, cfg.sigma_data)
    lr = lr_at(cfg, state.step)
    for group in opt.param_groups:
        group["lr"] = lr
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    totals = torch.zeros(3, device=device)
    for _ in range(cfg.grad_accum):
        x, y = state.stream.next_batch(state.data_gen)
        drop = torch.rand(y.shape, generator=state.data_gen) < cfg.label_dropout
        y = torch.where(drop, torch.full_like(y, cfg.num_classes), y)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        ids_keep = None
        if mask_ratio > 0:
            ids_keep = random_masking_ids(x.shape[0], net.num_patches, mask_ratio, generator=state.loss_gen)[0]
        with autocast:
            out = loss_fn(precond, x, y, mask_ratio=mask_ratio, ids_keep=ids_keep, generator=state.loss_gen)
        (out.loss / cfg.grad_accum).backward()
        totals += torch.stack([out.loss.detach(), out.dsm.detach(), out.mae.detach()])
    loss, dsm, mae = (totals / cfg.grad_accum).tolist()
    finite = math.isfinite(loss)
    grad_norm = float("nan")
    if finite:
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(net.parameters(), max_norm))
        opt.step()
        update_ema(state.ema, net, ema_decay(state.step, cfg.ema_decay, cfg.ema_warmup))
    opt.zero_grad(set_to_none=True)
    return {"loss": loss, "dsm": dsm, "mae": mae, "grad_norm": grad_norm, "lr": lr, "finite": float(finite)}


def data_info(cfg, dataset):
    """JSON-able facts about the data a model was trained on (for sampling)."""
    info = {"data": cfg.data, "latent": isinstance(dataset, LatentShards), "sample_shape": list(dataset.sample_shape)}
    if info["latent"]:
        info["scale_factor"] = dataset.scale_factor
    return info


def state_dict(cfg, state, meta):
    """The checkpoint dict (tensors and plain containers only: loads with weights_only=True)."""
    rng = {"torch": torch.get_rng_state(), "loss_gen": state.loss_gen.get_state(),
           "data_gen": state.data_gen.get_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return {"step": state.step, "nan_skips": state.nan_skips, "model": state.net.state_dict(),
            "ema": state.ema.state_dict(), "optimizer": state.optimizer.state_dict(),
            "data": state.stream.state_dict(), "rng": rng, "config": cfg.to_dict(), "meta": meta}


def load_state(state, ckpt):
    """Restores a full training state from `state_dict` output (resume)."""
    state.net.load_state_dict(ckpt["model"])
    state.ema.load_state_dict(ckpt["ema"])
    state.optimizer.load_state_dict(ckpt["optimizer"])
    state.stream.load_state_dict(ckpt["data"])
    state.step, state.nan_skips = int(ckpt["step"]), int(ckpt["nan_skips"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    state.loss_gen.set_state(ckpt["rng"]["loss_gen"])
    state.data_gen.set_state(ckpt["rng"]["data_gen"])
    if "cuda" in ckpt["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])


class MetricsLog:
    """metrics.jsonl (one JSON object per record) plus TensorBoard scalars under tb/."""

    def __init__(self, run_dir, resume_step=None):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        if resume_step is not None and os.path.exists(self.path):
            # Drop records written after the checkpoint we resume from: they will be redone.
            with open(self.path) as f:
                kept = [line for line in f if json.loads(line).get("step", 0) <= resume_step]
            with open(self.path, "w") as f:
                f.writelines(kept)
        elif resume_step is None and os.path.exists(self.path):
            os.unlink(self.path)
        self.file = open(self.path, "a")
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(run_dir, "tb"), purge_step=resume_step)
        except ImportError:  # tensorboard is optional at run time
            self.tb = None

    def write(self, step, **values):
        self.file.write(json.dumps({"step": step, **values}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)

    def close(self):
        self.file.close()
        if self.tb is not None:
            self.tb.close()


@contextlib.contextmanager
def stop_signals():
    """Turns SIGTERM/SIGINT into a flag (`flag["signal"]`) checked between steps; restores the
    previous handlers on exit. A second signal while stopping raises KeyboardInterrupt."""
    flag = {"signal": None}

    def handler(signum, frame):
        if flag["signal"] is not None:
            raise KeyboardInterrupt
        flag["signal"] = signal.Signals(signum).name

    previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread: no handlers, the run just cannot be signalled
            pass
    try:
        yield flag
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)


def grid_labels(cfg, per_class):
    """Fixed labels for grids: each of the first min(num_classes, 10) classes `per_class` times."""
    return torch.arange(min(cfg.num_classes, 10)).repeat_interleave(per_class)


def sample_images(cfg, ema, labels, device):
    """EMA samples for `labels` with fixed per-sample seeds -> [N, C, H, W] float32 CPU."""
    net = ema.to(device)
    seeds = [GRID_SEED + i for i in range(labels.shape[0])]
    return generate(EDMPrecond(net, cfg.sigma_data).eval(), labels, seeds, batch_size=250,
                    num_steps=cfg.sample_steps, cfg_scale=cfg.sample_cfg, solver=cfg.sample_solver)


def write_grid(run_dir, step, x, per_class, latent):
    """Saves samples x [N, C, H, W] (class-major, `per_class` each) as grid_<step>.png, or as an
    .npz for latents (decoding needs the VAE: `python -m maskdit_fast.sample --vae`). Returns the path."""
    if latent:
        path = os.path.join(run_dir, f"grid_{step:08d}.npz")
        np.savez(path, samples=x.numpy())
        return path
    path = os.path.join(run_dir, f"grid_{step:08d}.png")
    save_grid(x, path, nrow=per_class)
    return path


def train(cfg, stop_at=None, progress=True):
    """Runs (or resumes) training for `cfg` (a TrainConfig).

    Args:
        stop_at: stop after this step as if interrupted (checkpoint, then return); for tests and
            time-sliced jobs.
        progress: show a tqdm bar.
    Returns:
        dict: run_dir, step, last metrics, and (at the end of an MNIST-5k run) sample_accuracy,
        grid path; interrupted=True when stopped early.
    """
    cfg.validate()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    dataset, stream = build_data(cfg)  # validates the data before anything is written
    run_dir = cfg.run_dir or os.path.join("runs", cfg.name)
    os.makedirs(run_dir, exist_ok=True)
    net = build_model(cfg, dataset.sample_shape).to(device)
    state = TrainState(net=net, ema=create_ema(net), optimizer=build_optimizer(cfg, net), stream=stream,
                       loss_gen=torch.Generator(device).manual_seed(cfg.seed),
                       data_gen=torch.Generator().manual_seed(cfg.seed + 1))
    meta = model_metadata(net, cfg.sigma_data, data_info(cfg, dataset))
    ckpts = CheckpointManager(os.path.join(run_dir, "checkpoints"), cfg.keep_last)

    resume_path = ckpts.latest() if cfg.resume == "auto" else (None if cfg.resume == "never" else cfg.resume)
    if resume_path:
        load_state(state, load_checkpoint(resume_path, map_location=device))
        print(f"resumed from {resume_path} at step {state.step}")
    elif cfg.init_from:  # a new stage (e.g. unmasked fine-tuning): weights only, fresh optimizer
        ckpt = load_checkpoint(cfg.init_from, map_location=device)
        state.net.load_state_dict(ckpt["model"])
        state.ema.load_state_dict(ckpt["ema"])
        print(f"initialised weights from {cfg.init_from} (step {ckpt['step']})")
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump(cfg.to_dict(), f, indent=1)
    print(f"run dir: {os.path.abspath(run_dir)}  ({sum(p.numel() for p in net.parameters()) / 1e6:.2f}M "
          f"parameters, {len(dataset)} training samples of shape {dataset.sample_shape}, device {device})",
          flush=True)

    log = MetricsLog(run_dir, resume_step=state.step if resume_path else None)
    loss_fn, ratio_at = build_loss(cfg), mask_ratio_fn(cfg)
    latent = isinstance(dataset, LatentShards)
    result = {"run_dir": run_dir, "interrupted": False}
    from tqdm import tqdm
    bar = tqdm(total=cfg.steps, initial=state.step, disable=not progress, dynamic_ncols=True)
    window_start, window_images = time.perf_counter(), 0
    try:
        with stop_signals() as stop:
            state.net.train()
            while state.step < cfg.steps:
                ratio = ratio_at(state.step)
                m = train_step(cfg, state, loss_fn, ratio, device)
                if not m["finite"]:
                    if state.nan_skips >= cfg.max_nan_skips:
                        raise RuntimeError(
                            f"non-finite loss ({m['loss']}) at step {state.step + 1} (after {state.nan_skips} "
                            f"skipped); stopping. The last good checkpoint is {ckpts.latest()}. Lower --lr, "
                            f"set --grad-clip, or allow skips with --max-nan-skips N.")
                    state.nan_skips += 1
                    print(f"warning: non-finite loss at step {state.step + 1}, update skipped "
                          f"({state.nan_skips}/{cfg.max_nan_skips})", file=sys.stderr)
                state.step += 1
                window_images += cfg.batch_size
                bar.update(1)
                if state.step % cfg.log_every == 0 or state.step == cfg.steps:
                    elapsed = time.perf_counter() - window_start
                    m.update(mask_ratio=ratio, images_per_s=window_images / max(elapsed, 1e-9))
                    log.write(state.step, **m)
                    bar.set_postfix(loss=f"{m['loss']:.4f}", img_s=f"{m['images_per_s']:.0f}", mask=ratio)
                    window_start, window_images = time.perf_counter(), 0
                result["metrics"] = m
                if cfg.sample_every and state.step % cfg.sample_every == 0 and state.step < cfg.steps:
                    per_class = cfg.sample_per_class or 4
                    x = sample_images(cfg, state.ema, grid_labels(cfg, per_class), device)
                    write_grid(run_dir, state.step, x, per_class, latent)
                stopping = stop["signal"] or (stop_at is not None and state.step >= stop_at)
                if state.step % cfg.ckpt_every == 0 or state.step == cfg.steps or stopping:
                    ckpts.save(state.step, state_dict(cfg, state, meta))
                if stopping:
                    print(f"\nstopped at step {state.step} ({stop['signal'] or 'stop_at'}); checkpoint "
                          f"{ckpts.latest()}; run the same command again to resume", flush=True)
                    result.update(interrupted=True, step=state.step)
                    return result
        bar.close()
        result["step"] = state.step
        finish(cfg, state, meta, run_dir, device, latent, log, result)
    finally:
        bar.close()
        log.close()
    return result


def finish(cfg, state, meta, run_dir, device, latent, log, result):
    """End of training: export EMA weights, final sample grid and, on MNIST-5k, the class accuracy
    of eval_per_class samples per class judged by the digit classifier (the grid shows the first
    sample_per_class of them, so nothing is sampled twice)."""
    export_safetensors(state.ema.state_dict(), os.path.join(run_dir, "ema.safetensors"),
                       metadata={"maskdit_fast": json.dumps(meta)})
    evaluate = cfg.data == "mnist5k" and cfg.eval_per_class > 0
    per_class = max(cfg.sample_per_class, cfg.eval_per_class if evaluate else 0)
    if per_class and cfg.num_classes:
        t0 = time.perf_counter()
        labels = grid_labels(cfg, per_class)
        x = sample_images(cfg, state.ema, labels, device)
        if cfg.sample_per_class:
            shown = x.reshape(-1, per_class, *x.shape[1:])[:, :cfg.sample_per_class].flatten(0, 1)
            result["grid"] = write_grid(run_dir, state.step, shown, cfg.sample_per_class, latent)
            print(f"sample grid: {result['grid']}")
        if evaluate:
            from maskdit_fast.classifier import class_accuracy, load_classifier
            classifier, real_acc = load_classifier()
            acc = result["sample_accuracy"] = class_accuracy(x, labels, classifier)
            log.write(state.step, sample_accuracy=acc, classifier_test_accuracy=real_acc)
            print(f"class accuracy of {len(labels)} samples: {acc:.1%} (the classifier scores {real_acc:.1%} "
                  f"on held-out real digits; chance 10%) [sampling {time.perf_counter() - t0:.0f} s]")
    print(f"EMA weights: {os.path.join(run_dir, 'ema.safetensors')}")


def main(argv=None):
    """CLI entry point: parse the config, train, report."""
    cfg = parse_config(argv)
    t0 = time.perf_counter()
    result = train(cfg)
    print(f"done in {(time.perf_counter() - t0) / 60:.1f} min: {result['run_dir']}")


if __name__ == "__main__":
    main()
