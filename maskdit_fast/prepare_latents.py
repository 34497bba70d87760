"""Encode an image folder to VAE latent shards for training (the official MaskDiT recipe: the
posterior mean and log-variance are stored once; the trainer draws a fresh sample every step).

    python -m maskdit_fast.prepare_latents --images train/ --vae stabilityai/sd-vae-ft-ema \
        --out latents/ --resolution 256 [--flip]

`--images` holds one subfolder per class (sorted names -> labels 0..K-1). `--vae` is a local
directory or a hub id loadable by diffusers' `AutoencoderKL.from_pretrained` (no download happens
if it is a local directory). Images are centre-cropped as in ADM/DiT. `--flip` also stores each
image's horizontal mirror. The output layout is described in `maskdit_fast.data`.
"""
import argparse
import json
import os

import numpy as np
import torch

from maskdit_fast.checkpoint import atomic_write
from maskdit_fast.data import IMAGE_EXTENSIONS, LATENT_FORMAT, LATENT_FORMAT_VERSION, MANIFEST, read_manifest



def list_image_folder(root):
    """Finds (path, label) pairs in a class-subfolder tree.

    Returns:
        (items: list of (path, int label) sorted by class then file name, class_names: list of str).
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder {root!r} does not exist")
    class_names = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if not class_names:
        raise ValueError(f"image folder {root!r} has no class subfolders")
    items = []
    for label, name in enumerate(class_names):
        class_dir = os.path.join(root, name)
        for dirpath, _, files in sorted(os.walk(class_dir)):
            items += [(os.path.join(dirpath, f), label) for f in sorted(files)
                      if f.lower().endswith(IMAGE_EXTENSIONS)]
    if not items:
        raise ValueError(f"image folder {root!r} has no images with extensions {IMAGE_EXTENSIONS}")
    return items, class_names


def center_crop(image, resolution):
    """ADM's centre crop: PIL image -> RGB PIL image of resolution x resolution (box-downsample while
    the short side is >= 2x the target, bicubic resize to it, then crop the centre)."""
    from PIL import Image
    image = image.convert("RGB")
    while min(image.size) >= 2 * resolution:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = resolution / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    left, top = (image.size[0] - resolution) // 2, (image.size[1] - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def load_images(paths, resolution):
    """Image files -> [N, 3, resolution, resolution] float32 in [-1, 1]."""
    from PIL import Image
    arrays = []
    for path in paths:
        try:
            with Image.open(path) as image:
                arrays.append(np.asarray(center_crop(image, resolution), dtype=np.float32))
        except OSError as e:
            raise ValueError(f"cannot read image {path}: {e}") from e
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0


def load_vae(name_or_path, subfolder=None, device="cpu", dtype=torch.float32):
    """diffusers AutoencoderKL from a local directory or hub id, in eval mode on `device`."""
    try:
        from diffusers import AutoencoderKL
    except ImportError as e:
        raise RuntimeError("prepare_latents needs diffusers: `pip install diffusers`") from e
    kwargs = {"subfolder": subfolder} if subfolder else {}
    vae = AutoencoderKL.from_pretrained(name_or_path, torch_dtype=dtype, **kwargs)
    return vae.to(device).eval().requires_grad_(False)


@torch.no_grad()
def encode_moments(vae, images):
    """images [N, 3, H, W] in [-1, 1] -> [N, 2C, h, w] float32: posterior mean ++ logvar."""
    param = next(vae.parameters())
    posterior = vae.encode(images.to(param.device, param.dtype)).latent_dist
    return torch.cat([posterior.mean, posterior.logvar], dim=1).float().cpu()


def prepare_latents(images, vae, out, resolution=256, batch_size=32, shard_size=10_000, flip=False,
                    dtype="float16", subfolder=None, scale_factor=None, device="cpu", progress=True):
    """Encodes an image folder into latent shards plus manifest.json.

    Args:
        images: class-subfolder image directory.
        vae: AutoencoderKL instance, or a local directory / hub id to load one from.
        out: output directory (created; an existing manifest is overwritten).
        resolution: square crop size (the latent is resolution / VAE downsampling factor).
        batch_size: images per VAE call.
        shard_size: entries per shard file (a flipped copy counts as an entry).
        flip: also store each image's horizontal mirror.
        dtype: storage dtype of the moments, "float16" or "float32".
        subfolder: subfolder of `vae` holding the AutoencoderKL (e.g. "vae" in a full SD repo).
        scale_factor: latent scale; default the VAE config's scaling_factor (0.18215 for SD).
        device: where the VAE runs.
    Returns:
        the manifest dict.
    """
    if dtype not in ("float16", "float32"):
        raise ValueError(f"dtype must be float16 or float32, got {dtype!r}")
    if batch_size < 1 or shard_size < 1:
        raise ValueError("batch_size and shard_size must be >= 1")
    items, class_names = list_image_folder(images)
    source = vae if isinstance(vae, str) else type(vae).__name__
    if isinstance(vae, str):
        vae = load_vae(vae, subfolder, device)
    if scale_factor is None:
        scale_factor = float(getattr(vae.config, "scaling_factor", 0.18215))
    os.makedirs(out, exist_ok=True)

    shards, latent_shape = [], None
    pending_m, pending_y = [], []  # encoded batches not yet written (joined once a shard is full)

    def write_shard(moments, labels):
        name = f"shard_{len(shards):05d}"
        with np.errstate(over="ignore"):  # checked next
            moments = moments.astype(dtype)
        if not np.isfinite(moments).all():  # the VAE's outputs were checked: float16 overflowed
            raise ValueError(f"{name}: the latent moments overflow {dtype}; use dtype float32 (--dtype)")
        for suffix, array in ((".moments.npy", moments), (".labels.npy", labels)):
            atomic_write(os.path.join(out, name + suffix), lambda f: np.save(f, array, allow_pickle=False))
        shards.append({"moments": name + ".moments.npy", "labels": name + ".labels.npy", "count": len(labels)})

    from tqdm import tqdm
    for start in tqdm(range(0, len(items), batch_size), desc="encoding", disable=not progress):
        chunk = items[start:start + batch_size]
        x = load_images([p for p, _ in chunk], resolution)
        y = np.array([label for _, label in chunk], dtype=np.int64)
        if flip:
            x, y = torch.cat([x, x.flip(-1)]), np.concatenate([y, y])
        moments = encode_moments(vae, x).numpy()
        finite = np.isfinite(moments.reshape(len(moments), -1)).all(1)
        if not finite.all():
            path = chunk[int(np.argmin(finite)) % len(chunk)][0]  # a flipped copy maps to its image
            raise ValueError(f"the VAE encoded {path} to NaN or infinite latents; check the image and the VAE")
        latent_shape = [moments.shape[1] // 2, moments.shape[2], moments.shape[3]]
        pending_m.append(moments)
        pending_y.append(y)
        if sum(map(len, pending_y)) >= shard_size:
            m, labels = np.concatenate(pending_m), np.concatenate(pending_y)
            while len(labels) >= shard_size:
                write_shard(m[:shard_size], labels[:shard_size])
                m, labels = m[shard_size:], labels[shard_size:]
            pending_m, pending_y = [m], [labels]
    if sum(map(len, pending_y)):
        write_shard(np.concatenate(pending_m), np.concatenate(pending_y))

    manifest = {
        "format": LATENT_FORMAT, "version": LATENT_FORMAT_VERSION,
        "latent_shape": latent_shape, "scale_factor": scale_factor, "dtype": dtype,
        "num_classes": len(class_names), "class_names": class_names,
        "count": sum(s["count"] for s in shards), "resolution": resolution, "flip": flip,
        "vae": source, "shards": shards,
    }
    atomic_write(os.path.join(out, MANIFEST), lambda f: f.write(json.dumps(manifest, indent=1).encode()))
    return read_manifest(out)


def main(argv=None):
    """CLI entry point (see the module docstring)."""
    p = argparse.ArgumentParser(prog="python -m maskdit_fast.prepare_latents", description=__doc__.split("\n\n")[0])
    p.add_argument("--images", required=True, help="image folder with one subfolder per class")
    p.add_argument("--vae", required=True, help="AutoencoderKL: local directory or hub id")
    p.add_argument("--vae-subfolder", default=None, help="e.g. 'vae' for a full Stable Diffusion repo")
    p.add_argument("--out", required=True, help="output directory for shards + manifest.json")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--shard-size", type=int, default=10_000)
    p.add_argument("--flip", action="store_true", help="also store horizontally flipped copies")
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"], help="storage dtype")
    p.add_argument("--scale-factor", type=float, default=None, help="default: the VAE's scaling_factor")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    manifest = prepare_latents(args.images, args.vae, args.out, resolution=args.resolution,
                               batch_size=args.batch_size, shard_size=args.shard_size, flip=args.flip,
                               dtype=args.dtype, subfolder=args.vae_subfolder, scale_factor=args.scale_factor,
                               device=args.device)
    print(f"wrote {manifest['count']} latents {manifest['latent_shape']} in {len(manifest['shards'])} "
          f"shard(s), {manifest['num_classes']} classes, to {args.out}")


if __name__ == "__main__":
    main()
