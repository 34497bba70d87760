"""Train MaskDiT / DiT with the EDM loss: `python -m maskdit_fast.train [--preset P] [--config F] [--flags]`.

With no arguments it trains a small MaskDiT on the embedded MNIST-5k digits on the CPU (about five
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

Scale-out (torchrun; see maskdit_fast.parallel and maskdit_fast.checkpoint):

    torchrun --standalone --nproc_per_node 8 -m maskdit_fast.train --preset imagenet-xl2 \
        --data latents/ --parallel fsdp --activation-checkpointing selective --compile

Every rank draws the random numbers of the whole global batch (masks, noise levels, noise, label
dropout, latent posterior samples) from identically seeded generators and uses its own rows, and
reads only its own rows of the data, so a run follows the same trajectory at any world size (up
to float reduction order) and resumes at any world size: single-process runs write single-file
checkpoints, distributed or FSDP runs sharded DCP checkpoints, and either resumes the other.
Only rank 0 logs, samples and writes single-writer files.

Speed options (see README "Trainer speed options"):
  --compile                     torch.compile; --compile-scope blocks (default: each transformer
                                block; dynamic token counts, FSDP) | model (the whole forward; static
                                shapes); --compile-mode default | max-autotune; --cuda-graphs (the
                                compiled forward / backward replayed as CUDA graphs; static shapes,
                                one process). The steps that compile or record graphs are logged
                                apart (metrics `warmup_s`) and left out of the throughput.
  --precision fp8               torchao float8 linears in the blocks, bf16 autocast elsewhere; needs
                                --compile, torchao (`pip install maskdit_fast[fp8]`) and an sm_89+
                                GPU (maskdit_fast.fp8).

Packed options (MaskDiT only: the kept tokens of all samples run as one stream, ragged when the
counts differ, no padding):
  --mask-ratio-range LOW HIGH   per-sample mask ratios ~ U[LOW, HIGH) each step during the masked
                                phase (replacing --mask-ratio; 0 in the final --unmasked-steps).
                                LOW == HIGH trains exactly like --mask-ratio LOW (same draws).
  --mixed-resolutions S1 S2 ..  each global micro-batch split round-robin into groups whose images
                                are average-pooled to sizes S1, S2, ... (integer factors of the
                                data size, multiples of the patch size; pixel data only), all
                                groups through one encoder pass; each sample weighs the same in
                                the loss. Sampling stays at the data's size. Throughput / MFU
                                logs count each group's images at the group's size.

Layout: `train` (at the end of this file) builds the run from the config (build_* / parallelize,
the run dir, the checkpointer, metrics) and runs the loop, one call per concern: `train_step`
(one optimizer step), `check_finite` (non-finite steps), `TrainMetrics.step` (metering and
logging, maskdit_fast.metrics), `sample_grid`, `stop_reason` (stop signals agreed across ranks),
`save_checkpoint` (through a maskdit_fast.checkpoint.Checkpointer, whichever format the run
writes), then `finish`. The EMA is maskdit_fast.ema, the run-dir lock maskdit_fast.run_dir.
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

from maskdit_fast.checkpoint import check_architecture, export_ema_safetensors, make_checkpointer, verify_everywhere
from maskdit_fast.config import parse_config
from maskdit_fast.data import MNIST5K_SIZES, DataStream, LatentShards, build_dataset
from maskdit_fast.diffusion import EDMPrecond, MaskDiTLoss, mask_ratio_schedule
from maskdit_fast.ema import ShardedEMA, ema_decay
from maskdit_fast.fp8 import check_fp8_device, convert_to_fp8
from maskdit_fast.masking import PackedMask, num_kept, random_masking_ids, random_masking_packed, sample_mask_ratios
from maskdit_fast.metrics import TrainMetrics, default_peak_flops
from maskdit_fast.models import MaskDiT, create_model
from maskdit_fast.parallel import (all_reduce_mean, any_rank, apply_activation_checkpointing, apply_compile, apply_ddp,
                                   apply_fsdp, barrier, clip_grad_norm_, destroy_distributed, gradient_sync,
                                   init_distributed, nonfinite, rank0_call, unwrap)
from maskdit_fast.run_dir import open_run_dir
from maskdit_fast.sample import build_from_metadata, generate, model_metadata, save_grid

GRID_SEED = 1_000_000  # sample seeds of the fixed-label grids (distinct from training seeds)
RESUME_KEYS = ("step", "nan_skips", "data", "rng")  # what a checkpoint must hold to resume from it


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

    def state_dict(self):
        """What a checkpoint holds besides model, optimizer and EMA: step, skipped steps, data
        position and RNG states (identical on every rank; plain containers and CPU tensors)."""
        rng = {"torch": torch.get_rng_state(), "loss_gen": self.loss_gen.get_state(),
               "data_gen": self.data_gen.get_state(), "ratio_gen": self.ratio_gen.get_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()  # the current device's: valid at any world size
        return {"step": self.step, "nan_skips": self.nan_skips, "data": self.stream.state_dict(), "rng": rng}

    def load_state_dict(self, state):
        """Restores what `state_dict` returned (a checkpoint's extra state, holding RESUME_KEYS)."""
        self.stream.load_state_dict(state["data"])
        self.step, self.nan_skips = int(state["step"]), int(state["nan_skips"])
        torch.set_rng_state(state["rng"]["torch"])
        self.loss_gen.set_state(state["rng"]["loss_gen"])
        self.data_gen.set_state(state["rng"]["data_gen"])
        if "ratio_gen" in state["rng"]:  # absent from checkpoints written before --mask-ratio-range
            self.ratio_gen.set_state(state["rng"]["ratio_gen"])
        cuda = state["rng"].get("cuda")
        if cuda is not None and self.loss_gen.device.type == "cuda":
            torch.cuda.set_rng_state(cuda[0] if isinstance(cuda, (list, tuple)) else cuda)


# --------------------------------------------------------------------------- the run, from the config
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


def data_info(cfg, dataset):
    """JSON-able facts about the data a model was trained on (for sampling)."""
    info = {"data": cfg.data, "latent": isinstance(dataset, LatentShards), "sample_shape": list(dataset.sample_shape)}
    if info["latent"]:
        info["scale_factor"] = dataset.scale_factor
    return info


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


def check_device(cfg, device):
    """What the device must offer for cfg, checked before anything is built or written: fp8 needs
    torchao and float8 tensor cores (maskdit_fast.fp8.check_fp8_device), cuda_graphs a CUDA device
    (on CPU inductor would skip the graphs without a word)."""
    if cfg.precision == "fp8":
        check_fp8_device(device)
    if cfg.compile and cfg.cuda_graphs and device.type != "cuda":
        raise ValueError(f"config: cuda_graphs needs a CUDA device, the run's device is {device}")


def parallelize(cfg, net, info):
    """float8 linears (--precision fp8), activation checkpointing, compile (per block or the whole
    model, with CUDA graphs or not), then DDP or FSDP2 (torchtitan's order), as cfg says. Returns
    the module to train (the same one except under DDP)."""
    if cfg.parallel == "none" and info.world_size > 1:
        raise ValueError(f"config: {info.world_size} processes need --parallel ddp or fsdp")
    if cfg.precision == "fp8":
        convert_to_fp8(net, pad_inner_dim=fp8_needs_padding(cfg, net, info.world_size))
    apply_activation_checkpointing(net, cfg.activation_checkpointing)
    if cfg.compile:
        apply_compile(net, backend=cfg.compile_backend, scope=cfg.compile_scope, mode=cfg.torch_compile_mode())
    if cfg.parallel == "fsdp":
        # bf16 compute copies of the weights (gathered in bf16: half the traffic); fp32 shards,
        # gradients reduced in fp32. Autocast still runs on top (train_step) for fp32-sensitive ops.
        return apply_fsdp(net, param_dtype=torch.bfloat16 if cfg.precision in ("bf16", "fp8") else None,
                          reshard_after_forward=cfg.reshard_after_forward)
    if cfg.parallel == "ddp":
        return apply_ddp(net, info, find_unused_parameters=mask_token_may_idle(cfg, net))
    return net


def fp8_needs_padding(cfg, net, world_size):
    """Whether some float8 GEMM of this run may see a token count (the rows of a block's input on
    one rank: the inner dimension of the weight-gradient GEMM, which torch._scaled_mm needs in
    multiples of 16) that is not a multiple of 16: always with per-sample ratios, mixed
    resolutions or a mask schedule (counts that vary), else when the per-rank micro-batch times the
    kept or the full token count is not one. torchao then pads every float8 GEMM (a copy each)."""
    if cfg.mask_ratio_range or cfg.mixed_resolutions or cfg.mask_schedule != "constant":
        return True
    rows, length = cfg.batch_size // cfg.grad_accum // world_size, unwrap(net).num_patches
    counts = {length, num_kept(length, cfg.mask_ratio)}  # MaskDiT's decoder and unmasked phase; the encoder
    return any(rows * n % 16 for n in counts)


def cuda_graphs(cfg):
    """Whether the compiled forward / backward run as CUDA graphs (inductor's cudagraph trees)."""
    return cfg.compile and cfg.cuda_graphs


def compile_warmup_steps(cfg, start):
    """The optimizer steps (1-based) whose time includes compilation or CUDA-graph recording; the
    loop logs their time as `warmup_s` and starts the throughput window after them. Compilation is
    per process (a resumed run compiles again): the first steps from `start`, and the first ones of
    the unmasked phase (a new token count: a new graph, or per block the recompile that makes the
    count dynamic). One step, two with CUDA graphs (cudagraph trees run a function once to warm up
    and record it at the next call). None without compile. (A mask schedule's first new count
    recompiles the blocks too, inside a throughput window.)"""
    if not cfg.compile:
        return set()
    starts = [start]
    switch = cfg.steps - cfg.unmasked_steps
    if cfg.mask_ratio > 0 and start < switch < cfg.steps:
        starts.append(switch)
    per_start = 2 if cfg.cuda_graphs else 1
    return {s + k + 1 for s in starts for k in range(per_start) if s + k < cfg.steps}


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
    """AdamW (fused kernels where the device supports them), lr set per step by `lr_at`.

    With CUDA graphs the gradients are allocated here once and kept (zeroed, never freed: see
    train_step): autograd then adds each backward's gradients into them in place. Left to
    autograd, the first backward would install the graph's own output buffer as .grad, which the
    next replay overwrites (torch 2.11's cudagraph trees: wrong sums under gradient accumulation).
    Side effect: a parameter that gets no gradient in a step (MaskDiT's mask token in the unmasked
    phase) has a zero one instead of None, so AdamW still moves it by its momentum."""
    if cuda_graphs(cfg):
        for p in net.parameters():
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)
    kwargs = dict(lr=cfg.lr, betas=(0.9, cfg.adam_beta2), weight_decay=cfg.weight_decay)
    try:
        return torch.optim.AdamW(net.parameters(), fused=True, **kwargs)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(net.parameters(), **kwargs)


def build_loss(cfg):
    """MaskDiTLoss from the config's EDM settings."""
    return MaskDiTLoss(cfg.P_mean, cfg.P_std, cfg.sigma_data, cfg.mae_coef)


# --------------------------------------------------------------------------------------- schedules
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


def ema_decay_at(cfg, step):
    """EMA decay at optimizer step `step`: cfg.ema_decay with optional warm-up, started over at the
    first unmasked step with cfg.ema_restart (see maskdit_fast.ema.ema_decay)."""
    restart = cfg.steps - cfg.unmasked_steps if cfg.ema_restart and cfg.unmasked_steps else None
    return ema_decay(step, cfg.ema_decay, cfg.ema_warmup, restart)


# ------------------------------------------------------------------------------------------ one step
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

    The batch is G groups: with mixed resolutions (`shapes`: G (H_g, W_g)) global row i belongs to
    group i % G, whose images are average-pooled to (H_g, W_g); else one group of every row at the
    data's size. Each rank's rows are a contiguous slice starting at a multiple of G, so it holds
    B/(W G) samples of every group; masks and noise are drawn per group over the group's global
    rows, the noise levels over the whole micro-batch. All groups go through one loss call (one
    network pass); a single resolution goes in as a plain batch (what DiT takes).
    """
    micro, rows = state.stream.batch_size, state.stream.rows()
    sigma_dist = MaskDiTLoss(cfg.P_mean, cfg.P_std)  # the config's noise levels (loss_fn may be any callable)
    G, p = max(len(shapes), 1), unwrap(state.net).patch_size
    per_group = micro // G
    own = slice(rows.start // G, rows.stop // G)  # this rank's rows within each group's global rows
    xs = [x[g::G] if x.shape[2] == h else torch.nn.functional.avg_pool2d(x[g::G], x.shape[2] // h)
          for g, (h, w) in enumerate(shapes or [x.shape[2:]])]
    masks = [draw_mask(cfg, state, mask_ratio, per_group, (xg.shape[2] // p) * (xg.shape[3] // p), own) for xg in xs]
    sigma = sigma_dist.sample_sigma(micro, x.device, state.loss_gen)[rows]
    noise = [torch.randn((per_group,) + tuple(xg.shape[1:]), device=x.device, generator=state.loss_gen)[own]
             for xg in xs]
    ys, ratios, ids_keep = [y[g::G] for g in range(G)], [r for r, _ in masks], [ids for _, ids in masks]
    sigma = torch.cat([sigma[g::G] for g in range(G)])  # in group order
    if not shapes:  # one resolution: a plain batch (what DiT takes), not a list of one group
        xs, ys, ratios, ids_keep, noise = xs[0], ys[0], ratios[0], ids_keep[0], noise[0]
    return loss_fn(precond, xs, ys, mask_ratio=ratios, ids_keep=ids_keep, sigma=sigma, noise=noise)


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
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision in ("bf16", "fp8"))
    graphs = cuda_graphs(cfg)
    micro, rows = state.stream.batch_size, state.stream.rows()
    totals = torch.zeros(3, device=device)
    for i in range(cfg.grad_accum):
        if graphs:  # each micro-batch's forward starts a new generation of graph replays
            torch.compiler.cudagraph_mark_step_begin()
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
        state.ema.update(net, ema_decay_at(cfg, state.step))
    opt.zero_grad(set_to_none=not graphs)  # CUDA graphs: keep the gradient buffers (build_optimizer)
    return {"loss": loss, "dsm": dsm, "mae": mae, "grad_norm": grad_norm, "lr": lr, "finite": float(finite),
            "weights_finite": float(not ema_bad)}


# --------------------------------------------------------------------------------- non-finite steps
def check_finite(cfg, state, m, ckpt, say):
    """After a step: stop (RuntimeError naming the newest checkpoint, which holds finite values)
    when the previous update made the weights non-finite (nothing can undo it) or when a
    non-finite step exceeds cfg.max_nan_skips; else count a skipped step."""
    if not m["weights_finite"]:
        raise RuntimeError(f"the update of step {state.step} made weights NaN or infinite; stopping. The last "
                           f"good checkpoint is {ckpt.latest()}. Lower --lr or set --grad-clip.")
    if m["finite"]:
        return
    what = (f"non-finite loss ({m['loss']})" if not math.isfinite(m["loss"])
            else f"non-finite gradient norm ({m['grad_norm']}, loss {m['loss']:.4g})")
    if state.nan_skips >= cfg.max_nan_skips:
        raise RuntimeError(f"{what} at step {state.step + 1} (after {state.nan_skips} skipped); stopping. The last "
                           f"good checkpoint is {ckpt.latest()}. Lower --lr, set --grad-clip, or allow skips with "
                           f"--max-nan-skips N.")
    state.nan_skips += 1
    say(f"warning: {what} at step {state.step + 1}, update skipped ({state.nan_skips}/{cfg.max_nan_skips})",
        file=sys.stderr)


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


# ------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(ckpt, cfg, state, meta):
    """A checkpoint of step state.step through the run's Checkpointer: model, optimizer, EMA and
    the TrainState's state_dict plus config and model metadata. Refuses (RuntimeError naming the
    newest checkpoint) a state holding NaN or infinite values. Collective."""
    bad = nonfinite_parts(state)
    if bad:
        raise RuntimeError(f"refusing to save step {state.step}: the {' and '.join(bad)} hold NaN or infinite "
                           f"values; the last good checkpoint is {ckpt.latest()}. Lower --lr or set --grad-clip.")
    return ckpt.save(state.step, dict(state.state_dict(), config=cfg.to_dict(), meta=meta))


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


def restore(cfg, state, ckpt, say):
    """Loads the state training starts from: an explicit --resume path; with --resume auto the
    newest checkpoint in the run dir that verifies (corrupt, incomplete or unsafe ones are moved
    aside as <name>.corrupt, saying so); else --init-from's weights. Returns the resumed path or None."""
    if cfg.resume not in ("auto", "never"):
        state.load_state_dict(ckpt.load(cfg.resume, required=RESUME_KEYS, verify=False))  # check_sources verified it
        say(f"resumed from {cfg.resume} at step {state.step}")
        return cfg.resume
    if cfg.resume == "auto" and not cfg.restart:
        path, extra = ckpt.load_latest(required=RESUME_KEYS)
        if path is not None:
            state.load_state_dict(extra)
            say(f"resumed from {path} at step {state.step}")
            return path
    if cfg.init_from:  # a new stage (e.g. unmasked fine-tuning): weights only, fresh optimizer
        step = ckpt.load_weights(cfg.init_from, verify=False)
        say(f"initialised weights from {cfg.init_from} (step {step})")
    return None


# ---------------------------------------------------------------------------------------- stopping
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


def stop_reason(stop, step, stop_at, info):
    """Why the run stops after `step`, the same on every rank (all ranks then save the same step):
    the first stop signal of any rank (`stop`: the flag of stop_signals), or `stop_at` reached;
    None to go on. Collective under torchrun."""
    reason = stop["signal"] or ("stop_at" if stop_at is not None and step >= stop_at else None)
    if info.distributed and any_rank(reason is not None):
        reason = reason or "another rank's signal"
    return reason


# ---------------------------------------------------------------------------------------- sampling
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
                    num_steps=cfg.sample_steps, cfg_scale=cfg.sample_cfg,
                    cfg_interval=cfg.sample_cfg_interval or None, solver=cfg.sample_solver)


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


def sample_grid(cfg, state, meta, run_dir, device, latent):
    """A grid of the EMA's samples at this step (sample_per_class, or 4, per class), written by
    rank 0. Collective (the EMA shards are gathered)."""
    per_class = cfg.sample_per_class or 4
    ema_net = ema_network(state, meta, device)
    if ema_net is not None:
        x = sample_images(cfg, ema_net, grid_labels(cfg, per_class), device)
        write_grid(run_dir, state.step, x, per_class, latent)
    barrier()


def finish(cfg, state, meta, run_dir, device, latent, metrics, result, is_main=True):
    """End of training: export EMA weights, final sample grid and, on MNIST-5k, the class accuracy
    of eval_per_class samples per class judged by the digit classifier (the grid shows the first
    sample_per_class of them, so nothing is sampled twice). Every rank calls it (the EMA shards are
    gathered); rank 0 writes and samples."""
    full = export_ema_safetensors(state.ema, os.path.join(run_dir, "ema.safetensors"),
                                  metadata={"maskdit_fast": json.dumps(meta)})
    if not is_main:
        return
    evaluate = cfg.data in MNIST5K_SIZES and cfg.eval_per_class > 0
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
            from maskdit_fast.classifier import REAL_STRAY_COMPONENTS, class_accuracy, load_classifier, stray_components
            classifier, real_acc = load_classifier()
            acc = result["sample_accuracy"] = class_accuracy(x, labels, classifier)
            stray = result["stray_components"] = stray_components(x)
            metrics.write(state.step, sample_accuracy=acc, classifier_test_accuracy=real_acc, stray_components=stray)
            print(f"class accuracy of {len(labels)} samples: {acc:.1%} (the classifier scores {real_acc:.1%} "
                  f"on held-out real digits; chance 10%) [sampling {time.perf_counter() - t0:.0f} s]")
            print(f"speckle: {stray:.2f} stray bright regions per sample (held-out real digits: "
                  f"{REAL_STRAY_COMPONENTS:.2f})")
    print(f"EMA weights: {os.path.join(run_dir, 'ema.safetensors')}")


# ---------------------------------------------------------------------------------------- the loop
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
        stray_components (classifier.stray_components), grid path; interrupted=True when stopped early.
    """
    cfg.validate()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    info = init_distributed(cfg.device)  # torchrun: joins the process group; else world size 1
    device = info.device
    check_device(cfg, device)
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

    # closed in reverse order on any exit: metrics log, checkpointer (pending saves), signal handlers, lock
    with contextlib.ExitStack() as cleanup:
        lock = rank0_call(lambda: open_run_dir(cfg, run_dir))  # the first write; the other ranks act under it
        if lock is not None:
            cleanup.callback(lock.release)
        signals = cleanup.enter_context(contextlib.ExitStack())
        stop = signals.enter_context(stop_signals(exiting))  # from here on, a stop signal ends the current step
        ckpt = cleanup.enter_context(contextlib.closing(make_checkpointer(
            os.path.join(run_dir, "checkpoints"), state.net, state.optimizer, state.ema,
            sharded=info.world_size > 1 or cfg.parallel == "fsdp", keep_last=cfg.keep_last,
            async_save=cfg.async_checkpoint)))
        resumed = restore(cfg, state, ckpt, say) is not None
        if info.is_main:
            with open(os.path.join(run_dir, "config.json"), "w") as f:
                json.dump(cfg.to_dict(), f, indent=1)
        say(f"run dir: {os.path.abspath(run_dir)}  ({n_params / 1e6:.2f}M parameters, {len(dataset)} training "
            f"samples of shape {dataset.sample_shape}, device {device}, {info.world_size} process(es), "
            f"parallel {cfg.parallel})", flush=True)
        peak_flops = cfg.peak_tflops * 1e12 or default_peak_flops(
            device, torch.float32 if cfg.precision == "fp32" else torch.bfloat16)  # fp8: MFU of the bf16 peak
        metrics = cleanup.enter_context(contextlib.closing(TrainMetrics(
            run_dir, state.net, info, peak_flops, cfg.log_every, cfg.steps, start_step=state.step, resumed=resumed,
            progress=progress)))
        loss_fn, ratio_at = build_loss(cfg), mask_ratio_fn(cfg)
        latent = isinstance(dataset, LatentShards)
        result = {"run_dir": run_dir, "interrupted": False}

        warmup, warmup_s = compile_warmup_steps(cfg, state.step), 0.0
        state.net.train()
        while state.step < cfg.steps:
            ratio = ratio_at(state.step)
            t0 = time.perf_counter()
            m = train_step(cfg, state, loss_fn, ratio, device, shapes)
            check_finite(cfg, state, m, ckpt, say)
            state.step += 1
            result["metrics"] = metrics.step(state.step, m, ratio, cfg.batch_size, shapes)
            if state.step in warmup:  # compile / CUDA-graph capture: timed apart, not in images/s
                warmup_s += time.perf_counter() - t0
                if state.step + 1 not in warmup:
                    metrics.meter.reset()
                    metrics.write(state.step, warmup_s=warmup_s)
                    warmup_s = 0.0
            if cfg.sample_every and state.step % cfg.sample_every == 0 and state.step < cfg.steps:
                sample_grid(cfg, state, meta, run_dir, device, latent)
            reason = stop_reason(stop, state.step, stop_at, info)
            if state.step % cfg.ckpt_every == 0 or state.step == cfg.steps or reason:
                save_checkpoint(ckpt, cfg, state, meta)
            if reason:  # the stop handlers stay in place until the checkpointer and log are closed
                ckpt.wait()
                say(f"\nstopped at step {state.step} ({reason}); checkpoint {ckpt.latest()}; run the same "
                    f"command again to resume", flush=True)
                result.update(interrupted=True, step=state.step)
                return result

        signals.close()  # training is over: signals act as usual during the export and sampling
        result["step"] = state.step
        ckpt.wait()
        finish(cfg, state, meta, run_dir, device, latent, metrics, result, info.is_main)
    return result


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
