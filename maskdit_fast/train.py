"""Train MaskDiT / DiT with the EDM loss: `python -m maskdit_fast.train [--preset P] [--config F] [--flags]`.

With no arguments it trains a small MaskDiT on the embedded MNIST-5k digits on the CPU (about ten
minutes) and ends with a sample grid and the class accuracy of those samples. Everything is in
the run dir (default runs/<name>): checkpoints/ (atomic, last N kept), metrics.jsonl, tb/
(TensorBoard), grid_*.png, ema.safetensors. Re-running the same command resumes from the newest
checkpoint that verifies (corrupt ones are set aside, named); the resumed run reproduces the
uninterrupted one exactly (same seeds, data position and RNG states). Any number of SIGTERM /
SIGINT write one checkpoint and exit cleanly. One trainer per run dir (a lock); `--resume never`
refuses a run dir holding a previous run's outputs unless `--restart` moves them aside.

Non-finite steps: a step whose loss or gradient norm is NaN/inf (also when clipping) is never
applied (skipped up to --max-nan-skips times, else the run stops); an update that made the
weights non-finite stops the run (checked from the EMA in the next step's one host sync, and
before every save), so every checkpoint holds finite weights, EMA and optimizer state, and the
stop message names the newest one.

Scale-out (torchrun; see maskdit_fast.parallel and maskdit_fast.dist_checkpoint):

    torchrun --standalone --nproc_per_node 8 -m maskdit_fast.train --preset imagenet-xl2 \
        --data latents/ --parallel fsdp --activation-checkpointing selective --compile

Every rank draws the random numbers of the whole global batch (masks, noise levels, noise, label
dropout, latent posterior samples) from identically seeded generators and uses its own rows, and
reads only its own rows of the data, so a run follows the same trajectory at any world size (up
to float reduction order) and resumes at any world size: single-process runs write single-file
checkpoints, distributed or FSDP runs sharded DCP checkpoints, and either resumes the other.
Only rank 0 logs, samples and writes single-writer files.

Packed options (MaskDiT only; its packed encoder runs: the kept tokens of all samples in one
varlen stream, no padding):
  --mask-ratio-range LOW HIGH   per-sample mask ratios ~ U[LOW, HIGH) each step during the masked
                                phase (replacing --mask-ratio; 0 in the final --unmasked-steps).
                                LOW == HIGH trains exactly like --mask-ratio LOW (same draws).
  --mixed-resolutions S1 S2 ..  each global micro-batch split round-robin into groups whose images
                                are average-pooled to sizes S1, S2, ... (integer factors of the
                                data size, multiples of the patch size; pixel data only), all
                                groups through one encoder pass; each sample weighs the same in
                                the loss. Sampling stays at the data's size. Throughput / MFU
                                logs count each group's images at the group's size.

The loop is small composable functions (build_* / parallelize / train_step / save / load).
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

from maskdit_fast.checkpoint import CheckpointError, CheckpointManager, RunDirLock, set_aside
from maskdit_fast.config import parse_config
from maskdit_fast.data import DataStream, LatentShards, build_dataset
from maskdit_fast.diffusion import EDMPrecond, MaskDiTLoss, mask_ratio_schedule
from maskdit_fast.dist_checkpoint import (DistCheckpointManager, check_architecture, export_ema_safetensors,
                                          load_training_state, load_weights, verify_everywhere)
from maskdit_fast.ema import ema_decay
from maskdit_fast.masking import PackedMask, num_kept, random_masking_ids, random_masking_packed, sample_mask_ratios
from maskdit_fast.models import MaskDiT, create_model
from maskdit_fast.parallel import (ShardedEMA, ThroughputMeter, all_gather_floats, all_reduce_mean, any_rank,
                                   apply_activation_checkpointing, apply_compile, apply_ddp, apply_fsdp, barrier,
                                   broadcast_object, clip_grad_norm_, default_peak_flops, destroy_distributed,
                                   gradient_sync, init_distributed, nonfinite, rank0_call, unwrap)
from maskdit_fast.sample import build_from_metadata, generate, model_metadata, save_grid

GRID_SEED = 1_000_000  # sample seeds of the fixed-label grids (distinct from training seeds)


@dataclasses.dataclass
class TrainState:
    """Everything that changes during training and is checkpointed."""
    net: torch.nn.Module           # as trained: plain, DDP or FSDP2 (`unwrap` gives the model)
    ema: ShardedEMA
    optimizer: torch.optim.Optimizer
    stream: DataStream
    loss_gen: torch.Generator      # noise levels, noise and masks (on the training device)
    data_gen: torch.Generator      # label dropout and latent posterior samples (CPU)
    ratio_gen: torch.Generator     # per-sample mask ratios of --mask-ratio-range (CPU: no device sync)
    step: int = 0                  # optimizer steps done
    nan_skips: int = 0


def build_data(cfg, info):
    """Validated dataset and its resumable stream of global micro-batches (batch_size / grad_accum),
    of which this rank (`info`, a parallel.DistInfo) reads its own rows."""
    if not cfg.data:
        raise ValueError("config: `data` is empty; pass --data <latent dir> (see maskdit_fast.prepare_latents)")
    micro = cfg.batch_size // cfg.grad_accum
    if micro % info.world_size:
        raise ValueError(f"config: the micro-batch batch_size / grad_accum = {micro} must be divisible by the "
                         f"world size {info.world_size}")
    dataset = build_dataset(cfg.data, cfg.num_classes)
    return dataset, DataStream(dataset, micro, cfg.seed, rank=info.rank, world_size=info.world_size)


def build_model(cfg, sample_shape):
    """The network for data of shape (C, H, W), from cfg.model / cfg.model_kwargs (fp32), running its ops
    on cfg.ops_backend ("auto": the process-wide switch, i.e. MASKDIT_FAST_BACKEND or the fastest)."""
    c, h, w = sample_shape
    # check_inputs=False: the datasets validate every label when built and the trainer draws the masks
    # itself, so the model's per-step value checks (device syncs) would only repeat them
    kwargs = dict(input_size=(h, w), in_channels=c, num_classes=cfg.num_classes,
                  backend=None if cfg.ops_backend == "auto" else cfg.ops_backend, check_inputs=False)
    kwargs.update(cfg.model_kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)  # init depends on the seed only, not on earlier RNG use
        return create_model(cfg.model, **kwargs)


def group_shapes(cfg, sample_shape, patch_size):
    """The (H_g, W_g) of each --mixed-resolutions group for data of shape (C, H, W), validated.

    Group g's images are the data average-pooled by the integer factor f_g = H / size_g (so
    size_g must divide H, and f_g divide W); both sides must stay multiples of the patch size.
    Returns [] without mixed resolutions.
    """
    _, H, W = sample_shape
    shapes = []
    for size in cfg.mixed_resolutions:
        factor = H // size
        if H % size or W % factor:
            raise ValueError(f"config: mixed resolution {size} does not divide the data size {H}x{W} by an "
                             f"integer factor (average pooling)")
        shape = (H // factor, W // factor)
        if shape[0] % patch_size or shape[1] % patch_size:
            raise ValueError(f"config: mixed resolution {shape[0]}x{shape[1]} is not a multiple of the patch "
                             f"size {patch_size}")
        shapes.append(shape)
    return shapes


def check_packed_options(cfg, net, dataset, info):
    """--mask-ratio-range and --mixed-resolutions need MaskDiT's packed encoder; mixed resolutions
    need pixel data and micro-batches that split evenly into groups on every rank (each rank then
    holds the same number of samples of every group: the same collectives under FSDP)."""
    if not (cfg.mask_ratio_range or cfg.mixed_resolutions):
        return
    net = unwrap(net)
    if not isinstance(net, MaskDiT):
        raise ValueError(f"config: mask_ratio_range and mixed_resolutions need a MaskDiT model (the packed "
                         f"encoder), got {cfg.model}")
    if cfg.mixed_resolutions and isinstance(dataset, LatentShards):
        raise ValueError("config: mixed_resolutions needs pixel data: a latent directory holds one latent "
                         "size (manifest latent_shape)")
    highest = max(cfg.mask_ratio_range or [cfg.mask_ratio, cfg.mask_ratio_end])
    for h, w in group_shapes(cfg, dataset.sample_shape, net.patch_size) or [net.input_size]:
        length = (h // net.patch_size) * (w // net.patch_size)
        if int(length * (1 - highest)) < 1:  # num_kept's count
            raise ValueError(f"config: mask ratio {highest} keeps no token of the {length} of a {h}x{w} image")
    if not cfg.mixed_resolutions:
        return
    groups, micro = len(cfg.mixed_resolutions), cfg.batch_size // cfg.grad_accum
    if micro % (groups * info.world_size):
        raise ValueError(f"config: the micro-batch batch_size / grad_accum = {micro} must be divisible by "
                         f"len(mixed_resolutions) x world size = {groups} x {info.world_size}")


def parallelize(cfg, net, info):
    """Activation checkpointing, per-block compile, then DDP or FSDP2 (torchtitan's order), as
    cfg says. Returns the module to train (the same one except under DDP)."""
    if cfg.parallel == "none" and info.world_size > 1:
        raise ValueError(f"config: {info.world_size} processes need --parallel ddp or fsdp")
    apply_activation_checkpointing(net, cfg.activation_checkpointing)
    if cfg.compile:
        apply_compile(net, backend=cfg.compile_backend)
    if cfg.parallel == "fsdp":
        # bf16 compute copies of the weights (gathered in bf16: half the traffic); fp32 shards,
        # gradients reduced in fp32. Autocast still runs on top (train_step) for fp32-sensitive ops.
        return apply_fsdp(net, param_dtype=torch.bfloat16 if cfg.precision == "bf16" else None,
                          reshard_after_forward=cfg.reshard_after_forward)
    if cfg.parallel == "ddp":
        return apply_ddp(net, info, find_unused_parameters=mask_token_may_idle(cfg, net))
    return net


def mask_token_may_idle(cfg, net):
    """Whether some step may mask no token (MaskDiT's mask token then gets no gradient, which DDP
    must be told): an unmasked phase, or a ratio that keeps every token of the smallest grid."""
    if not isinstance(net, MaskDiT):
        return False
    ratio_at = mask_ratio_fn(cfg)
    lowest = [ratio_at(0), ratio_at(cfg.steps - 1)]  # schedules are monotone
    if cfg.mask_ratio_range:
        lowest.append(cfg.mask_ratio_range[0])
    H, W = net.input_size
    shapes = group_shapes(cfg, (net.in_channels, H, W), net.patch_size) or [(H, W)]
    length = min(h * w for h, w in shapes) // net.patch_size ** 2
    return any(num_kept(length, r) == length for r in lowest)


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
    cfg.unmasked_steps steps. With cfg.mask_ratio_range (low, high) the masked phase's value is
    the mean ratio (low + high) / 2 (logged, and used for FLOP counts); train_step then draws
    per-sample ratios."""
    masked_steps = cfg.steps - cfg.unmasked_steps
    if cfg.mask_ratio_range:
        schedule = mask_ratio_schedule("constant", sum(cfg.mask_ratio_range) / 2)
    elif cfg.mask_schedule == "constant":
        schedule = mask_ratio_schedule("constant", cfg.mask_ratio)
    else:
        schedule = mask_ratio_schedule(cfg.mask_schedule, cfg.mask_ratio, cfg.mask_ratio_end, max(1, masked_steps))
    return lambda step: 0.0 if step >= masked_steps else schedule(step)


def packed_rows(packed, rows):
    """The samples `rows` (a slice of a step) of a PackedMask, as a PackedMask (host arithmetic on
    the counts: no device sync)."""
    start, stop, _ = rows.indices(packed.batch_size)
    counts = packed.counts[start:stop]
    first = sum(packed.counts[:start])
    cu = packed.cu_seqlens[start:stop + 1] - packed.cu_seqlens[start]
    return PackedMask(packed.ids[first:first + sum(counts)], cu, counts)


def draw_mask(cfg, state, mask_ratio, batch, length, rows):
    """Masks of `batch` samples on grids of `length` tokens at this step's `mask_ratio`, drawn
    for all of them (every rank alike) and returned for the samples `rows`.

    Returns (mask_ratio argument, ids_keep) for the loss: (0.0, None) when nothing is masked;
    with cfg.mask_ratio_range, (per-sample ratios: a list of len(rows) floats, PackedMask), the
    ratios from state.ratio_gen, the positions from state.loss_gen; else (mask_ratio, ids_keep
    [len(rows), K]). With low == high the kept positions equal the plain ratio's: both layouts
    use the same draw from state.loss_gen.
    """
    if mask_ratio == 0:
        return 0.0, None
    if cfg.mask_ratio_range:
        ratios = sample_mask_ratios(batch, *cfg.mask_ratio_range, generator=state.ratio_gen)
        packed = random_masking_packed(ratios, length, generator=state.loss_gen)[0]
        # a list, not a float tensor: FSDP's mixed precision casts floating tensor inputs (bf16
        # ratios would change the keep counts); a CPU tensor's tolist() does not sync the device
        return ratios[rows].tolist(), packed_rows(packed, rows)
    return mask_ratio, random_masking_ids(batch, length, mask_ratio, generator=state.loss_gen)[0][rows]


def micro_step_loss(cfg, state, loss_fn, precond, x, y, mask_ratio, shapes):
    """The loss of this rank's rows x [B/W, C, H, W], y of one global micro-batch, drawing the
    micro-batch's masks, noise levels and noise (in that order) whole.

    With mixed resolutions (`shapes`: G (H_g, W_g)), global row i belongs to group i % G, whose
    images are average-pooled to (H_g, W_g), and all groups go through `loss_fn.grouped` (one
    packed encoder pass). Each rank's rows are a contiguous slice starting at a multiple of G, so
    it holds B/(W G) samples of every group; draws are per group over the group's global rows.
    """
    micro, rows = state.stream.batch_size, state.stream.rows()
    sigma_dist = MaskDiTLoss(cfg.P_mean, cfg.P_std)  # the config's noise levels (loss_fn may be any callable)
    if not shapes:
        ratio, ids_keep = draw_mask(cfg, state, mask_ratio, micro, unwrap(state.net).num_patches, rows)
        sigma = sigma_dist.sample_sigma(micro, x.device, state.loss_gen)[rows]
        noise = torch.randn((micro,) + tuple(x.shape[1:]), device=x.device, generator=state.loss_gen)[rows]
        return loss_fn(precond, x, y, mask_ratio=ratio, ids_keep=ids_keep, sigma=sigma, noise=noise)
    G, p = len(shapes), unwrap(state.net).patch_size
    per_group = micro // G
    own = slice(rows.start // G, rows.stop // G)  # this rank's rows within each group's global rows
    xs = [torch.nn.functional.avg_pool2d(x[g::G], x.shape[2] // h) for g, (h, w) in enumerate(shapes)]
    masks = [draw_mask(cfg, state, mask_ratio, per_group, (h // p) * (w // p), own) for h, w in shapes]
    sigma = sigma_dist.sample_sigma(micro, x.device, state.loss_gen)[rows]
    noise = [torch.randn((per_group,) + tuple(xg.shape[1:]), device=x.device, generator=state.loss_gen)[own]
             for xg in xs]
    return loss_fn.grouped(precond, xs, [y[g::G] for g in range(G)], mask_ratio=[r for r, _ in masks],
                           ids_keep=[ids for _, ids in masks], sigma=torch.cat([sigma[g::G] for g in range(G)]),
                           noise=noise)


def train_step(cfg, state, loss_fn, mask_ratio, device, shapes=()):
    """One optimizer step over cfg.grad_accum micro-batches (gradients synchronised across ranks
    on the last one only).

    The random numbers of each global micro-batch (label dropout, mask ratios, masks, noise
    levels, noise) are drawn whole on every rank, which keeps its own rows
    (`state.stream.rows()`): any world size computes the same step. `mask_ratio` is the step's
    ratio from `mask_ratio_fn` (0: nothing masked; with cfg.mask_ratio_range any value > 0 means
    per-sample ratios are drawn); `shapes` the mixed-resolution groups (`group_shapes`).

    The step's one host sync reads the loss terms (all-reduced), the gradient norm and whether the
    EMA, hence the previous update's weights, is finite. A step whose loss or gradient norm is
    not finite (clipping included: an infinite norm would scale the gradients to 0 or NaN) is
    not applied.

    Returns:
        dict of python floats: loss, dsm, mae (means over micro-batches and ranks), grad_norm, lr,
        finite (1.0 / 0.0: loss and gradient norm finite, so the step was applied; else weights,
        optimizer and EMA are unchanged) and weights_finite (1.0 / 0.0: the weights the previous
        update left, checked through the EMA; 0.0 means the run cannot go on).
    """
    net, opt = state.net, state.optimizer
    precond = EDMPrecond(net, cfg.sigma_data)
    lr = lr_at(cfg, state.step)
    for group in opt.param_groups:
        group["lr"] = lr
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    micro, rows = state.stream.batch_size, state.stream.rows()
    totals = torch.zeros(3, device=device)
    for i in range(cfg.grad_accum):
        x, y = state.stream.next_batch(state.data_gen)
        drop = (torch.rand(micro, generator=state.data_gen) < cfg.label_dropout)[rows]
        y = torch.where(drop, torch.full_like(y, cfg.num_classes), y)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with gradient_sync(net, i == cfg.grad_accum - 1):
            with autocast:
                out = micro_step_loss(cfg, state, loss_fn, precond, x, y, mask_ratio, shapes)
            (out.loss / cfg.grad_accum).backward()
        totals += torch.stack([out.loss.detach(), out.dsm.detach(), out.mae.detach()])
    ema_bad = state.ema.nonfinite().to(device)  # the EMA takes any NaN / inf of the weights it averages
    stats = all_reduce_mean(torch.cat([totals / cfg.grad_accum, ema_bad.reshape(1)]))
    norm = clip_grad_norm_(net, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
    loss, dsm, mae, ema_bad, grad_norm = torch.cat([stats, norm.reshape(1).float()]).tolist()  # the one sync
    finite = math.isfinite(loss) and math.isfinite(grad_norm) and not ema_bad  # the same on every rank
    if finite:
        opt.step()
        restart = cfg.steps - cfg.unmasked_steps if cfg.ema_restart and cfg.unmasked_steps else None
        state.ema.update(net, ema_decay(state.step, cfg.ema_decay, cfg.ema_warmup, restart))
    opt.zero_grad(set_to_none=True)
    return {"loss": loss, "dsm": dsm, "mae": mae, "grad_norm": grad_norm, "lr": lr, "finite": float(finite),
            "weights_finite": float(not ema_bad)}


def data_info(cfg, dataset):
    """JSON-able facts about the data a model was trained on (for sampling)."""
    info = {"data": cfg.data, "latent": isinstance(dataset, LatentShards), "sample_shape": list(dataset.sample_shape)}
    if info["latent"]:
        info["scale_factor"] = dataset.scale_factor
    return info


def train_state(cfg, state, meta):
    """The non-tensor-heavy part of a checkpoint: step, data position, RNG states (identical on
    every rank), config and model metadata (plain containers: loads with weights_only=True)."""
    rng = {"torch": torch.get_rng_state(), "loss_gen": state.loss_gen.get_state(),
           "data_gen": state.data_gen.get_state(), "ratio_gen": state.ratio_gen.get_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()  # the current device's: valid at any world size
    return {"step": state.step, "nan_skips": state.nan_skips, "data": state.stream.state_dict(), "rng": rng,
            "config": cfg.to_dict(), "meta": meta}


def nonfinite_parts(state):
    """Which of the model weights, the EMA and the optimizer state hold a NaN or infinity on some
    rank: a list of those names, [] when all are finite. Collective; one host sync."""
    optim = [t for s in state.optimizer.state.values() for t in s.values()
             if torch.is_tensor(t) and t.is_floating_point()]
    parts = {"model weights": nonfinite(list(state.net.parameters())), "EMA": state.ema.nonfinite(),
             "optimizer state": nonfinite(optim)}
    device = next(state.net.parameters()).device
    flags = all_reduce_mean(torch.stack([f.to(device) for f in parts.values()])).tolist()
    return [name for name, flag in zip(parts, flags) if flag > 0]


def save_checkpoint(ckpts, cfg, state, meta):
    """A checkpoint of step state.step: sharded (DCP, every rank writes its part) with a
    DistCheckpointManager, else one file holding model, EMA, optimizer and `train_state`.
    Refuses (RuntimeError naming the newest checkpoint) a state holding NaN or infinite values."""
    bad = nonfinite_parts(state)
    if bad:
        raise RuntimeError(f"refusing to save step {state.step}: the {' and '.join(bad)} hold NaN or infinite "
                           f"values; the last good checkpoint is {ckpts.latest()}. Lower --lr or set --grad-clip.")
    extra = train_state(cfg, state, meta)
    if isinstance(ckpts, DistCheckpointManager):
        return ckpts.save(state.step, state.net, state.optimizer, state.ema, extra)
    return ckpts.save(state.step, dict(extra, model=unwrap(state.net).state_dict(), ema=state.ema.state_dict(),
                                       optimizer=state.optimizer.state_dict()))


def load_state(state, path, device, verify=True):
    """Restores the full training state (resume) from a checkpoint of either format, written at
    any world size (verified first unless verify=False: see load_training_state)."""
    ckpt = load_training_state(path, state.net, state.optimizer, state.ema, map_location=device,
                               required=("step", "nan_skips", "data", "rng"), verify=verify)
    state.stream.load_state_dict(ckpt["data"])
    state.step, state.nan_skips = int(ckpt["step"]), int(ckpt["nan_skips"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    state.loss_gen.set_state(ckpt["rng"]["loss_gen"])
    state.data_gen.set_state(ckpt["rng"]["data_gen"])
    if "ratio_gen" in ckpt["rng"]:  # absent from checkpoints written before --mask-ratio-range
        state.ratio_gen.set_state(ckpt["rng"]["ratio_gen"])
    cuda = ckpt["rng"].get("cuda")
    if cuda is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda[0] if isinstance(cuda, (list, tuple)) else cuda)


def _logged_step(line):
    """Step of a metrics.jsonl line; a line cut short by a crash counts as after any resume point."""
    try:
        return json.loads(line).get("step", 0)
    except json.JSONDecodeError:
        return float("inf")


class MetricsLog:
    """metrics.jsonl (one JSON object per record) plus TensorBoard scalars under tb/."""

    def __init__(self, run_dir, resume_step=None):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        if resume_step is not None and os.path.exists(self.path):
            # Drop records written after the checkpoint we resume from: they will be redone.
            with open(self.path) as f:
                kept = [line for line in f if _logged_step(line) <= resume_step]
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
def stop_signals(exiting=False):
    """Turns SIGTERM/SIGINT into a flag (`flag["signal"]`, the first signal's name) checked between
    steps. Further signals change nothing (the stop save is already coming; raising would abort
    it): however many arrive, the run saves once and exits. SIGKILL still ends a process that must
    not save. On exit the previous handlers come back, except with `exiting` (the process ends
    next: the CLI) after a stop signal: further ones then stay ignored, as a default SIGTERM
    handler would turn the clean exit into a kill."""
    flag = {"signal": None}

    def handler(signum, frame):
        if flag["signal"] is None:
            flag["signal"] = signal.Signals(signum).name
        else:  # os.write: print is not safe inside a signal handler (reentrant buffered I/O)
            os.write(2, f"{signal.Signals(signum).name}: already stopping after this step (SIGKILL to abort "
                        f"without a checkpoint)\n".encode())

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
            signal.signal(sig, signal.SIG_IGN if exiting and flag["signal"] else h)


def grid_labels(cfg, per_class):
    """Fixed labels for grids: each of the first min(num_classes, 10) classes `per_class` times."""
    return torch.arange(min(cfg.num_classes, 10)).repeat_interleave(per_class)


def ema_network(state, meta, device):
    """The EMA weights as a plain network on `device` for sampling, on rank 0 (None elsewhere).
    Collective: every rank must call it (the shards are gathered)."""
    full = state.ema.full_state_dict(rank0_only=True)
    return build_from_metadata(meta, full).to(device) if full else None


def sample_images(cfg, net, labels, device):
    """Samples of the network `net` (the EMA) for `labels` with fixed per-sample seeds ->
    [N, C, H, W] float32 CPU."""
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


RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "config.json", "tb", "ema.safetensors")  # plus grid_*


def previous_outputs(run_dir):
    """Names of a previous run's outputs in `run_dir` (what the trainer writes there), sorted."""
    if not os.path.isdir(run_dir):
        return []
    names = [n for n in os.listdir(run_dir)
             if n in RUN_OUTPUTS or (n.startswith("grid_") and n.endswith((".png", ".npz")))]
    return sorted(n for n in names if not (n == "checkpoints" and not os.listdir(os.path.join(run_dir, n))))


def open_run_dir(cfg, run_dir):
    """Creates and locks the run dir (one trainer per run dir; call on rank 0 only). A previous
    run's outputs there are moved aside with cfg.restart (to previous-<time>/, nothing deleted),
    and refused with cfg.resume "never" (they would be mixed with this run's: pruned by its
    --keep-last, resumed by a later run). Returns the held RunDirLock."""
    lock = RunDirLock(run_dir).acquire()
    try:
        previous = previous_outputs(run_dir)
        if previous and cfg.restart:
            base = aside = os.path.join(run_dir, time.strftime("previous-%Y%m%d-%H%M%S"))
            n = 1
            while os.path.exists(aside):
                aside, n = f"{base}-{n}", n + 1
            os.makedirs(aside)
            for name in previous:
                os.replace(os.path.join(run_dir, name), os.path.join(aside, name))
            print(f"--restart: moved the previous run's {', '.join(previous)} to {aside}")
        elif previous and cfg.resume == "never":
            raise ValueError(f"--resume never: run dir {run_dir!r} holds a previous run's {', '.join(previous)}; "
                             f"they would mix with this run's (checkpoints pruned and resumed as its own). Pass "
                             f"--restart to move them aside and start over, --resume auto to continue that run, "
                             f"or another --run-dir")
    except BaseException:
        lock.release()
        raise
    return lock


def check_sources(cfg, net):
    """An explicit --resume path and --init-from must be intact checkpoints (verified: rank 0 reads
    them whole) of this architecture: checked before anything is written. Collective."""
    for flag, path in (("--resume", cfg.resume if cfg.resume not in ("auto", "never") else ""),
                       ("--init-from", cfg.init_from)):
        if path and not os.path.exists(path):
            raise FileNotFoundError(f"{flag} {path!r} does not exist")
        if path:
            verify_everywhere(path)
            check_architecture(path, net)


def restore(cfg, state, ckpts, device, info, say):
    """Loads the state training starts from: an explicit --resume path; with --resume auto the
    newest checkpoint in the run dir that verifies (corrupt, incomplete or unsafe ones are moved
    aside as <name>.corrupt, saying so); else --init-from's weights. Returns the resumed path or None."""
    if cfg.resume not in ("auto", "never"):
        load_state(state, cfg.resume, device, verify=False)  # check_sources verified it
        say(f"resumed from {cfg.resume} at step {state.step}")
        return cfg.resume
    if cfg.resume == "auto" and not cfg.restart:
        for path in broadcast_object(ckpts.newest_first()):
            try:
                load_state(state, path, device)
            except CheckpointError as e:  # raised before anything was loaded, on every rank
                barrier()  # no rank still reads it
                aside = set_aside(path) if info.is_main else None
                say(f"warning: skipped checkpoint {path}: {e}; moved it to {aside}", file=sys.stderr, flush=True)
                continue
            say(f"resumed from {path} at step {state.step}")
            return path
    if cfg.init_from:  # a new stage (e.g. unmasked fine-tuning): weights only, fresh optimizer
        step = load_weights(cfg.init_from, state.net, state.ema, map_location=device, verify=False)
        say(f"initialised weights from {cfg.init_from} (step {step})")
    return None


def check_step(cfg, state, m, ckpts, say):
    """After a step: stop (RuntimeError naming the newest checkpoint, which holds finite values)
    when the previous update made the weights non-finite (nothing can undo it) or when a
    non-finite step exceeds cfg.max_nan_skips; else count a skipped step."""
    if not m["weights_finite"]:
        raise RuntimeError(f"the update of step {state.step} made weights NaN or infinite; stopping. The last "
                           f"good checkpoint is {ckpts.latest()}. Lower --lr or set --grad-clip.")
    if m["finite"]:
        return
    what = (f"non-finite loss ({m['loss']})" if not math.isfinite(m["loss"])
            else f"non-finite gradient norm ({m['grad_norm']}, loss {m['loss']:.4g})")
    if state.nan_skips >= cfg.max_nan_skips:
        raise RuntimeError(f"{what} at step {state.step + 1} (after {state.nan_skips} skipped); stopping. The last "
                           f"good checkpoint is {ckpts.latest()}. Lower --lr, set --grad-clip, or allow skips with "
                           f"--max-nan-skips N.")
    state.nan_skips += 1
    say(f"warning: {what} at step {state.step + 1}, update skipped ({state.nan_skips}/{cfg.max_nan_skips})",
        file=sys.stderr)


def train(cfg, stop_at=None, progress=True, exiting=False):
    """Runs (or resumes) training for `cfg` (a TrainConfig).

    Everything is validated (config, data, model, parallelism, explicit checkpoints) before the
    run dir is created or anything written.

    Args:
        stop_at: stop after this step as if interrupted (checkpoint, then return); for tests and
            time-sliced jobs.
        progress: show a tqdm bar.
        exiting: the process exits when this returns (the CLI): after a stop signal, further
            SIGTERM / SIGINT stay ignored (see stop_signals).
    Returns:
        dict: run_dir, step, last metrics, and (at the end of an MNIST-5k run) sample_accuracy,
        grid path; interrupted=True when stopped early.
    """
    cfg.validate()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    info = init_distributed(cfg.device)  # torchrun: joins the process group; else world size 1
    device = info.device
    say = print if info.is_main else (lambda *args, **kwargs: None)
    dataset, stream = build_data(cfg, info)
    model = build_model(cfg, dataset.sample_shape).to(device)
    check_packed_options(cfg, model, dataset, info)
    shapes = group_shapes(cfg, dataset.sample_shape, model.patch_size)
    meta = model_metadata(model, cfg.sigma_data, data_info(cfg, dataset))
    n_params = sum(p.numel() for p in model.parameters())
    net = parallelize(cfg, model, info)
    state = TrainState(net=net, ema=ShardedEMA(net), optimizer=build_optimizer(cfg, net), stream=stream,
                       loss_gen=torch.Generator(device).manual_seed(cfg.seed),
                       data_gen=torch.Generator().manual_seed(cfg.seed + 1),
                       ratio_gen=torch.Generator().manual_seed(cfg.seed + 2))
    check_sources(cfg, net)
    run_dir = cfg.run_dir or os.path.join("runs", cfg.name)
    lock = rank0_call(lambda: open_run_dir(cfg, run_dir))  # the first write; the other ranks act under it
    try:
        return run(cfg, state, info, run_dir, meta, dataset, shapes, n_params, stop_at, progress, exiting)
    finally:
        if lock is not None:
            lock.release()


def run(cfg, state, info, run_dir, meta, dataset, shapes, n_params, stop_at, progress, exiting):
    """The training loop of `train`, in the locked run dir."""
    device, net = info.device, state.net
    say = print if info.is_main else (lambda *args, **kwargs: None)
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    if info.world_size > 1 or cfg.parallel == "fsdp":
        ckpts = DistCheckpointManager(ckpt_dir, cfg.keep_last, async_save=cfg.async_checkpoint)
    else:
        ckpts = CheckpointManager(ckpt_dir, cfg.keep_last)
    log, bar = None, None
    with contextlib.ExitStack() as signals:
        stop = signals.enter_context(stop_signals(exiting))  # from here on, a stop signal ends the current step
        try:
            resume_path = restore(cfg, state, ckpts, device, info, say)
            if info.is_main:
                with open(os.path.join(run_dir, "config.json"), "w") as f:
                    json.dump(cfg.to_dict(), f, indent=1)
                log = MetricsLog(run_dir, resume_step=state.step if resume_path else None)
            say(f"run dir: {os.path.abspath(run_dir)}  ({n_params / 1e6:.2f}M parameters, {len(dataset)} training "
                f"samples of shape {dataset.sample_shape}, device {device}, {info.world_size} process(es), "
                f"parallel {cfg.parallel})", flush=True)

            loss_fn, ratio_at = build_loss(cfg), mask_ratio_fn(cfg)
            latent = isinstance(dataset, LatentShards)
            result = {"run_dir": run_dir, "interrupted": False}
            peak = cfg.peak_tflops * 1e12 or default_peak_flops(
                device, torch.bfloat16 if cfg.precision == "bf16" else torch.float32)
            meter = ThroughputMeter(net, info.world_size, peak, device)
            from tqdm import tqdm
            bar = tqdm(total=cfg.steps, initial=state.step, disable=not (progress and info.is_main),
                       dynamic_ncols=True)
            state.net.train()
            while state.step < cfg.steps:
                ratio = ratio_at(state.step)
                m = train_step(cfg, state, loss_fn, ratio, device, shapes)
                check_step(cfg, state, m, ckpts, say)
                state.step += 1
                for shape in shapes or [None]:  # mixed resolutions: each group at its own size
                    meter.update(cfg.batch_size // max(1, len(shapes)), ratio, shape)
                bar.update(1)
                if state.step % cfg.log_every == 0 or state.step == cfg.steps:
                    m.update(mask_ratio=ratio, **meter.summary())
                    per_rank = all_gather_floats(m["peak_mem_gib"])
                    m["peak_mem_gib"] = max(per_rank)
                    if len(per_rank) > 1:
                        m["peak_mem_gib_per_rank"] = per_rank
                    if log is not None:
                        log.write(state.step, **m)
                    bar.set_postfix(loss=f"{m['loss']:.4f}", img_s=f"{m['images_per_s']:.0f}", mask=ratio)
                result["metrics"] = m
                if cfg.sample_every and state.step % cfg.sample_every == 0 and state.step < cfg.steps:
                    per_class = cfg.sample_per_class or 4
                    ema_net = ema_network(state, meta, device)
                    if ema_net is not None:
                        x = sample_images(cfg, ema_net, grid_labels(cfg, per_class), device)
                        write_grid(run_dir, state.step, x, per_class, latent)
                    barrier()
                if cfg.debug_crash_at_step == state.step and info.rank == info.world_size - 1:
                    os.kill(os.getpid(), signal.SIGKILL)  # tests: a rank dies (before this step's checkpoint)
                reason = stop["signal"] or ("stop_at" if stop_at is not None and state.step >= stop_at else None)
                if info.distributed and any_rank(reason is not None):  # all ranks stop at the same step
                    reason = reason or "another rank's signal"
                if state.step % cfg.ckpt_every == 0 or state.step == cfg.steps or reason:
                    save_checkpoint(ckpts, cfg, state, meta)
                if reason:  # returns with the stop handlers still in place, the closing included
                    if isinstance(ckpts, DistCheckpointManager):
                        ckpts.wait()
                    say(f"\nstopped at step {state.step} ({reason}); checkpoint {ckpts.latest()}; run the same "
                        f"command again to resume", flush=True)
                    result.update(interrupted=True, step=state.step)
                    return result
            signals.close()  # training is over: signals act as usual during the export and sampling
            bar.close()
            result["step"] = state.step
            if isinstance(ckpts, DistCheckpointManager):
                ckpts.wait()
            finish(cfg, state, meta, run_dir, device, latent, log, result, info.is_main)
        finally:
            if bar is not None:
                bar.close()
            if isinstance(ckpts, DistCheckpointManager):
                ckpts.close()
            if log is not None:
                log.close()
    return result


def finish(cfg, state, meta, run_dir, device, latent, log, result, is_main=True):
    """End of training: export EMA weights, final sample grid and, on MNIST-5k, the class accuracy
    of eval_per_class samples per class judged by the digit classifier (the grid shows the first
    sample_per_class of them, so nothing is sampled twice). Every rank calls it (the EMA shards are
    gathered); rank 0 writes and samples."""
    full = export_ema_safetensors(state.ema, os.path.join(run_dir, "ema.safetensors"),
                                  metadata={"maskdit_fast": json.dumps(meta)})
    if not is_main:
        return
    evaluate = cfg.data == "mnist5k" and cfg.eval_per_class > 0
    per_class = max(cfg.sample_per_class, cfg.eval_per_class if evaluate else 0)
    if per_class and cfg.num_classes:
        t0 = time.perf_counter()
        labels = grid_labels(cfg, per_class)
        x = sample_images(cfg, build_from_metadata(meta, full).to(device), labels, device)
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
    try:
        result = train(cfg, exiting=True)
    finally:
        destroy_distributed()
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"done in {(time.perf_counter() - t0) / 60:.1f} min: {result['run_dir']}")


if __name__ == "__main__":
    main()
