"""prepare_latents round trip with a tiny randomly initialised AutoencoderKL saved to a temp dir."""
import json
import os

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from PIL import Image  # noqa: E402

from maskdit_fast.data import DataStream, build_dataset  # noqa: E402
from maskdit_fast.prepare_latents import encode_moments, load_images, main, prepare_latents  # noqa: E402

RES = 16


@pytest.fixture(scope="module")
def tiny_vae_dir(tmp_path_factory):
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=4, sample_size=RES, scaling_factor=0.25)
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for c, name in enumerate(["cat", "dog", "eel"]):
        os.makedirs(root / name)
        for i in range(3 + c):  # 3, 4, 5 images; non-square, larger than RES to exercise the crop
            Image.fromarray(rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return str(root)


def test_round_trip(tiny_vae_dir, image_folder, tmp_path):
    out = str(tmp_path / "latents")
    main(["--images", image_folder, "--vae", tiny_vae_dir, "--out", out, "--resolution", str(RES),
          "--batch-size", "5", "--shard-size", "7", "--flip", "--dtype", "float32", "--device", "cpu"])
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert manifest["count"] == 24 and manifest["num_classes"] == 3
    assert manifest["latent_shape"] == [4, RES // 2, RES // 2] and manifest["scale_factor"] == 0.25
    assert [s["count"] for s in manifest["shards"]] == [7, 7, 7, 3]

    # Stored moments equal a direct encode of the same crops (originals then mirrors per batch).
    vae = diffusers.AutoencoderKL.from_pretrained(tiny_vae_dir)
    files = sorted(os.path.join(image_folder, d, f) for d in sorted(os.listdir(image_folder))
                   for f in sorted(os.listdir(os.path.join(image_folder, d))))
    stored = np.concatenate([np.load(os.path.join(out, s["moments"])) for s in manifest["shards"]])
    labels = np.concatenate([np.load(os.path.join(out, s["labels"])) for s in manifest["shards"]])
    x = load_images(files[:5], RES)
    expected = encode_moments(vae, torch.cat([x, x.flip(-1)])).numpy()
    np.testing.assert_allclose(stored[:10], expected, rtol=1e-4, atol=1e-5)
    assert labels.tolist() == [0, 0, 0, 1, 1] * 2 + [1, 1, 2, 2, 2] * 2 + [2, 2] * 2

    # As training data: z = (mean + exp(logvar / 2) * eps) * scale, eps from the given generator.
    ds = build_dataset(out, num_classes=3)
    assert len(ds) == 24 and ds.sample_shape == (4, RES // 2, RES // 2)
    idx = torch.tensor([0, 9, 23])
    z, y = ds.get_batch(idx, torch.Generator().manual_seed(1))
    mean, logvar = torch.from_numpy(stored[idx.numpy()]).chunk(2, dim=1)
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(z, (mean + (0.5 * logvar).exp() * eps) * 0.25)
    assert y.tolist() == labels[idx.numpy()].tolist()
    stream = DataStream(ds, 8, seed=0)
    seen = torch.cat([stream.next_indices() for _ in range(3)])
    assert sorted(seen.tolist()) == list(range(24))


def test_float16_and_errors(tiny_vae_dir, image_folder, tmp_path):
    out = str(tmp_path / "half")
    manifest = prepare_latents(image_folder, tiny_vae_dir, out, resolution=RES, batch_size=12, progress=False)
    assert manifest["count"] == 12 and len(manifest["shards"]) == 1
    assert np.load(os.path.join(out, manifest["shards"][0]["moments"])).dtype == np.float16
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prepare_latents(str(tmp_path / "nope"), tiny_vae_dir, out, resolution=RES)
    os.makedirs(tmp_path / "empty" / "a")
    with pytest.raises(ValueError, match="no images"):
        prepare_latents(str(tmp_path / "empty"), tiny_vae_dir, out, resolution=RES)


def test_non_finite_latents_are_refused(tiny_vae_dir, image_folder, tmp_path, monkeypatch):
    """NaN from the VAE, or moments that overflow float16, would only show up in training."""
    import maskdit_fast.prepare_latents as P
    real = P.encode_moments

    def poisoned(vae, images):
        moments = real(vae, images)
        moments[1, 0, 0, 0] = float("nan")
        return moments
    monkeypatch.setattr(P, "encode_moments", poisoned)
    with pytest.raises(ValueError, match=r"the VAE encoded .*cat.1\.png to NaN or infinite latents"):
        prepare_latents(image_folder, tiny_vae_dir, str(tmp_path / "nan"), resolution=RES, batch_size=4,
                        progress=False)
    monkeypatch.setattr(P, "encode_moments", lambda vae, images: real(vae, images) * 1e6)
    with pytest.raises(ValueError, match="overflow float16; use dtype float32"):
        prepare_latents(image_folder, tiny_vae_dir, str(tmp_path / "big"), resolution=RES, batch_size=4,
                        progress=False)
