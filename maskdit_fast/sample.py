"""Sample from a trained model: PNG grid and/or .npz, batched and seeded.

    python -m maskdit_fast.sample --ckpt runs/mnist/ema.safetensors --cfg-scale 1.5 --steps 40 \
        --classes 0,1,2 --per-class 8 --out grid.png [--npz samples.npz] [--vae <dir or hub id>]

`--ckpt` is a trainer checkpoint (`runs/<name>/checkpoints/step_*.pt`, or a sharded `step_*`
folder of a distributed run; EMA weights are used) or the exported `ema.safetensors`. Sample i uses seed `--seed + i`, so a sample does not depend on
the batch size. Latent-space models need `--vae` (a diffusers AutoencoderKL) for a PNG grid;
without it only the .npz of latents is written.
"""
import argparse
import json
import math
import os

import numpy as np
import torch

from maskdit_fast.checkpoint import load_checkpoint, load_ema_state
from maskdit_fast.diffusion import EDMPrecond, sample
from maskdit_fast.models import MODEL_CLASSES


def model_metadata(net, sigma_data, data_info):
    """What rebuilds `net` for sampling: {"model_class", "model_config", "sigma_data", "data"}
    (plain JSON-able values)."""
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in net.config.items()}
    return {"model_class": type(net).__name__, "model_config": config, "sigma_data": sigma_data,
            "data": data_info}


def build_from_metadata(meta, state_dict):
    """Rebuilds the network from `model_metadata` output and loads `state_dict` (strict)."""
    cls = MODEL_CLASSES.get(meta["model_class"])
    if cls is None:
        raise ValueError(f"unknown model class {meta['model_class']!r}")
    net = cls(**meta["model_config"])
    net.load_state_dict(state_dict, strict=True)
    return net.eval().requires_grad_(False)


def load_for_sampling(path, device="cpu"):
    """Loads EMA weights from a trainer checkpoint (.pt file or sharded DCP folder, written at any
    world size) or an exported .safetensors.

    Returns:
        (precond: EDMPrecond in eval mode on `device`, meta: dict from `model_metadata`).
    """
    if path.endswith(".safetensors"):
        from safetensors import safe_open
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint {path!r} does not exist")
        with safe_open(path, framework="pt") as f:
            header = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
        if "maskdit_fast" not in header:
            raise ValueError(f"{path}: no 'maskdit_fast' metadata (not exported by maskdit_fast.train)")
        meta = json.loads(header["maskdit_fast"])
    elif os.path.isdir(path):
        state, meta = load_ema_state(path)
        if meta is None:
            raise ValueError(f"{path}: sharded checkpoint without model metadata (not written by maskdit_fast.train)")
    else:
        ckpt = load_checkpoint(path)
        if "ema" not in ckpt or "meta" not in ckpt:
            raise ValueError(f"{path}: not a maskdit_fast training checkpoint (no 'ema'/'meta' entries)")
        state, meta = ckpt["ema"], ckpt["meta"]
    net = build_from_metadata(meta, state).to(device)
    return EDMPrecond(net, meta["sigma_data"]).eval(), meta


@torch.no_grad()
def generate(precond, labels, seeds, batch_size=64, **sampler_kwargs):
    """Samples in batches with per-sample seeds (sample i depends only on seeds[i], labels[i]).

    Args:
        precond: EDMPrecond in eval mode.
        labels: [N] int64 class labels (on any device; moved to the model's).
        seeds: N ints.
        batch_size: samples per sampler call.
        **sampler_kwargs: num_steps, cfg_scale, solver, ... (see diffusion.edm_sampler).
    Returns:
        [N, C, H, W] float32 CPU tensor.
    """
    if len(seeds) != labels.shape[0]:
        raise ValueError(f"{len(seeds)} seeds for {labels.shape[0]} labels")
    net = precond.net
    device = next(net.parameters()).device
    out = []
    for i in range(0, len(seeds), batch_size):  # sample() draws at the network's own (H, W)
        y = labels[i:i + batch_size].to(device)
        out.append(sample(precond, y, seed=list(seeds[i:i + batch_size]), **sampler_kwargs).cpu())
    return torch.cat(out)


@torch.no_grad()
def decode_latents(z, vae, scale_factor, batch_size=16):
    """Scaled latents [N, C, h, w] -> images [N, 3, H, W] float32 in [-1, 1] with a diffusers VAE."""
    param = next(vae.parameters())
    out = [vae.decode(z[i:i + batch_size].to(param.device, param.dtype) / scale_factor).sample.float().cpu()
           for i in range(0, z.shape[0], batch_size)]
    return torch.cat(out).clamp(-1, 1)


def save_grid(images, path, nrow, pad=2):
    """Writes images [N, C, H, W] in [-1, 1] (C = 1 or 3) as one PNG grid, `nrow` images per row."""
    from PIL import Image
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"save_grid needs [N, 1 or 3, H, W] images, got {tuple(images.shape)}")
    n, c, h, w = images.shape
    rows = math.ceil(n / nrow)
    grid = np.zeros((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), dtype=np.uint8)
    pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + col * (w + pad):pad + col * (w + pad) + w] = pixels[i]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(grid[..., 0] if c == 1 else grid).save(path)


def parse_classes(text, num_classes):
    """"all" or "0,3,7" or "0-4" -> list of ints in [0, num_classes)."""
    if text == "all":
        return list(range(num_classes))
    classes = []
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        try:
            classes += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
        except ValueError:
            raise ValueError(f"--classes: cannot parse {part!r} (use e.g. 'all', '0,3,7' or '0-4')") from None
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad or not classes:
        raise ValueError(f"--classes: {bad or text!r} not in [0, {num_classes})")
    return classes


def main(argv=None):
    """CLI entry point (see the module docstring)."""
    p = argparse.ArgumentParser(prog="python -m maskdit_fast.sample", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="trainer checkpoint (.pt or sharded folder) or ema.safetensors")
    p.add_argument("--cfg-scale", type=float, default=1.5)
    p.add_argument("--cfg-interval", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="guide only at LO < sigma <= HI (default: every noise level)")
    p.add_argument("--steps", type=int, default=40, help="EDM noise levels (Heun: 2 * steps - 1 evaluations)")
    p.add_argument("--solver", default="heun", choices=["heun", "euler"])
    p.add_argument("--classes", default="all", help="'all', '0,3,7' or '0-4'")
    p.add_argument("--per-class", type=int, default=8, help="samples per class (one grid row each)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", default=None, help="PNG grid path (default: samples.png unless --npz only)")
    p.add_argument("--npz", default=None, help="also write samples and labels to this .npz")
    p.add_argument("--vae", default=None, help="AutoencoderKL (dir or hub id) to decode latent models")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.per_class < 1 or args.steps < 1 or args.batch_size < 1:
        p.error("--per-class, --steps and --batch-size must be >= 1")

    precond, meta = load_for_sampling(args.ckpt, args.device)
    classes = parse_classes(args.classes, precond.num_classes)
    labels = torch.tensor(classes, dtype=torch.int64).repeat_interleave(args.per_class)
    seeds = [args.seed + i for i in range(len(labels))]
    x = generate(precond, labels, seeds, args.batch_size, num_steps=args.steps, cfg_scale=args.cfg_scale,
                 cfg_interval=args.cfg_interval, solver=args.solver)
    if args.npz:
        os.makedirs(os.path.dirname(os.path.abspath(args.npz)), exist_ok=True)
        np.savez(args.npz, samples=x.numpy(), labels=labels.numpy(), seeds=np.array(seeds))
        print(f"wrote {len(labels)} samples to {args.npz}")
    out = args.out or (None if args.npz else "samples.png")
    if out:
        if meta["data"].get("latent"):
            if not args.vae:
                raise SystemExit("this model generates VAE latents: pass --vae to write a PNG grid (or only --npz)")
            from maskdit_fast.prepare_latents import load_vae
            x = decode_latents(x, load_vae(args.vae, device=args.device), meta["data"]["scale_factor"])
        save_grid(x, out, nrow=args.per_class)
        print(f"wrote a {len(classes)} x {args.per_class} grid to {out}")


if __name__ == "__main__":
    main()
