"""Shared by tests/test_parallel.py: a tiny MaskDiT training loop built from maskdit_fast.parallel,
imported by the test (single-process reference) and launched by torchrun (2 ranks, gloo, CPU):

    torchrun --nproc_per_node 2 --standalone tests/dist_worker.py WORKDIR

The worker trains FSDP2 and DDP runs from scratch, resumes FSDP2 runs from the reference's
world-size-1 checkpoints (DCP and single-file), and writes what it saw to WORKDIR/result.json.
"""
import json
import os
import sys

import torch

from maskdit_fast.checkpoint import ShardedCheckpointer, export_ema_safetensors, load_training_state
from maskdit_fast.ema import ShardedEMA
from maskdit_fast.masking import random_masking_ids
from maskdit_fast.models import create_model
from maskdit_fast.parallel import (all_gather_floats, all_reduce_mean, any_rank, apply_activation_checkpointing,
                                   apply_ddp, apply_fsdp, clip_grad_norm_, destroy_distributed, gradient_sync,
                                   init_distributed)

MODEL_KW = dict(input_size=8, in_channels=1, num_classes=10, hidden_size=32, depth=2, num_heads=2,
                decoder_hidden_size=32, decoder_depth=1, decoder_num_heads=2)
GLOBAL_BATCH, STEPS, RESUME_AT = 8, 5, 3


def build(parallel="none", info=None, ac="none"):
    """(model, AdamW, ShardedEMA); the initial weights depend on nothing but the fixed seed."""
    torch.manual_seed(0)
    net = create_model("MaskDiT-S/2", **MODEL_KW)
    apply_activation_checkpointing(net, ac)
    if parallel == "fsdp":
        net = apply_fsdp(net)
    elif parallel == "ddp":
        net = apply_ddp(net, info)
    return net, torch.optim.AdamW(net.parameters(), lr=1e-2), ShardedEMA(net)


def global_batch(step):
    """The step's global batch: x [B, 1, 8, 8], t [B], y [B], ids_keep [B, 8] (same on every rank)."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(GLOBAL_BATCH, 1, 8, 8, generator=g)
    t = torch.randn(GLOBAL_BATCH, generator=g)
    y = torch.randint(0, 11, (GLOBAL_BATCH,), generator=g)
    ids = random_masking_ids(GLOBAL_BATCH, 16, 0.5, generator=g)[0]
    return x, t, y, ids


def train(net, opt, ema, start, stop, rank=0, world=1, accum=1):
    """Optimizer steps start..stop-1; each rank takes its contiguous slice of the global batch,
    split into `accum` micro-batches. Returns [(global mean loss, grad norm)] per step."""
    out = []
    local = GLOBAL_BATCH // world
    for step in range(start, stop):
        batch = [v[rank * local:(rank + 1) * local] for v in global_batch(step)]
        total = torch.zeros(())
        for i, micro in enumerate(zip(*[v.chunk(accum) for v in batch])):
            x, t, y, ids = micro
            with gradient_sync(net, i == accum - 1):
                loss = (net(x, t, y, ids_keep=ids).sample - x).square().mean()
                (loss / accum).backward()
            total += loss.detach() / accum
        norm = float(clip_grad_norm_(net, 0.5))
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(net, 0.8)
        out.append((float(all_reduce_mean(total)), norm))
    return out


def main(workdir):
    torch.set_num_threads(1)
    info = init_distributed("cpu")
    rank, world = info.rank, info.world_size
    result = {"world_size": world, "any_rank": [any_rank(rank == world - 1), any_rank(False)],
              "gathered": all_gather_floats(rank + 0.5)}

    net, opt, ema = build("fsdp", info)
    result["fsdp"] = train(net, opt, ema, 0, RESUME_AT, rank, world)
    ckpts = ShardedCheckpointer(os.path.join(workdir, "fsdp_ckpts"), net, opt, ema, keep_last=1, async_save=True)
    ckpts.save(RESUME_AT, {"step": RESUME_AT})
    ckpts.close()
    export_ema_safetensors(ema, os.path.join(workdir, "fsdp_ema.safetensors"))

    net, opt, ema = build("ddp", info, ac="selective")
    result["ddp_accum2"] = train(net, opt, ema, 0, RESUME_AT, rank, world, accum=2)
    result["ddp_reads_model_attributes"] = net.num_patches == 16

    for name in ("ref_dcp", "ref_single_file"):
        net, opt, ema = build("fsdp", info, ac="full")
        path = json.load(open(os.path.join(workdir, "ref_paths.json")))[name]
        extra = load_training_state(path, net, opt, ema)
        result[f"resume_{name}"] = train(net, opt, ema, int(extra["step"]), STEPS, rank, world)
    if rank == 0:
        with open(os.path.join(workdir, "result.json"), "w") as f:
            json.dump(result, f)
    destroy_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
