"""Datasets, the resumable stream, and clear errors for bad latent data."""
import json
import os

import numpy as np
import pytest
import torch

from maskdit_fast.data import DataStream, build_dataset, load_mnist5k, mnist_to_tensor


def write_latents(root, n=6, shape=(4, 2, 2), num_classes=3, shards=2, labels=None):
    """A valid latent directory written with numpy only (the format prepare_latents produces)."""
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(0)
    labels = np.arange(n) % num_classes if labels is None else np.asarray(labels)
    entries = []
    for s, idx in enumerate(np.array_split(np.arange(n), shards)):
        moments = rng.standard_normal((len(idx), 2 * shape[0]) + shape[1:]).astype(np.float16)
        np.save(os.path.join(root, f"s{s}.moments.npy"), moments)
        np.save(os.path.join(root, f"s{s}.labels.npy"), labels[idx].astype(np.int64))
        entries.append({"moments": f"s{s}.moments.npy", "labels": f"s{s}.labels.npy", "count": len(idx)})
    manifest = {"format": "maskdit_fast.latents", "version": 1, "latent_shape": list(shape),
                "scale_factor": 0.5, "num_classes": num_classes, "shards": entries}
    with open(os.path.join(root, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    return str(root)


def test_mnist5k():
    images, labels = load_mnist5k()
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8 and images.max() == 255
    assert np.bincount(labels).tolist() == [500] * 10 and (np.diff(labels) >= 0).all()
    x = mnist_to_tensor(images[:4])
    assert x.shape == (4, 1, 32, 32) and x.min() == -1 and x.max() == 1
    assert (x[:, :, :2] == -1).all() and (x[:, :, :, -2:] == -1).all()  # padding is background
    torch.testing.assert_close(x[:, 0, 2:30, 2:30], torch.from_numpy(images[:4]).float() / 127.5 - 1)
    ds = build_dataset("mnist5k", 10)
    assert len(ds) == 5000 and ds.sample_shape == (1, 32, 32)


def test_mnist5k_24_is_the_centre_crop():
    full, crop = build_dataset("mnist5k"), build_dataset("mnist5k-24", 10)
    assert crop.sample_shape == (1, 24, 24) and torch.equal(crop.labels, full.labels)
    assert torch.equal(crop.images, full.images[..., 4:28, 4:28])
    images = load_mnist5k()[0][:3]
    assert torch.equal(mnist_to_tensor(images, 28)[:, 0], torch.from_numpy(images).float() / 127.5 - 1)
    for bad in (25, 0):
        with pytest.raises(ValueError, match="even number"):
            mnist_to_tensor(images, bad)


def test_digits():
    ds = build_dataset("digits")
    assert len(ds) == 1797 and ds.sample_shape == (1, 8, 8)
    x, y = ds.get_batch(torch.arange(5))
    assert x.min() >= -1 and x.max() <= 1 and y.tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="10 classes, config says 7"):
        build_dataset("digits", 7)


def test_stream_epochs_and_resume():
    ds = build_dataset("digits")
    stream = DataStream(ds, 100, seed=3)
    epoch0 = torch.cat([stream.next_indices() for _ in range(17)])  # 1797 // 100 full batches
    assert len(set(epoch0.tolist())) == 1700
    first_of_epoch1 = stream.next_indices()
    assert stream.epoch == 1 and not torch.equal(first_of_epoch1, epoch0[:100])
    state = stream.state_dict()
    expected = [stream.next_indices() for _ in range(20)]  # crosses into epoch 2
    resumed = DataStream(ds, 100, seed=3)
    resumed.load_state_dict(state)
    for want in expected:
        assert torch.equal(resumed.next_indices(), want)
    with pytest.raises(ValueError, match="seed"):
        DataStream(ds, 100, seed=4).load_state_dict(state)
    with pytest.raises(ValueError, match="exceeds"):
        DataStream(ds, 5000, seed=0)


def test_latents_ok(tmp_path):
    ds = build_dataset(write_latents(tmp_path / "ok"), 3)
    assert len(ds) == 6 and ds.sample_shape == (4, 2, 2)
    z, y = ds.get_batch(torch.tensor([5, 0, 3]), torch.Generator().manual_seed(0))
    assert z.shape == (3, 4, 2, 2) and y.tolist() == [2, 0, 0]


def test_bad_latents(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_dataset(str(tmp_path / "missing"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        build_dataset(str(tmp_path / "empty"))

    corrupt = write_latents(tmp_path / "corrupt")
    with open(os.path.join(corrupt, "s1.moments.npy"), "wb") as f:
        f.write(b"\x93NUMPY garbage")
    with pytest.raises(ValueError, match="corrupt shard file .*s1.moments.npy"):
        build_dataset(corrupt)

    wrong = write_latents(tmp_path / "wrong")
    np.save(os.path.join(wrong, "s0.moments.npy"), np.zeros((3, 4, 2, 2), np.float16))  # 4 != 2 * 4 channels
    with pytest.raises(ValueError, match="shape"):
        build_dataset(wrong)

    with pytest.raises(ValueError, match=r"labels span \[0, 5\], outside \[0, 3\)"):
        build_dataset(write_latents(tmp_path / "labels", labels=[0, 1, 2, 5, 1, 0]))
    with pytest.raises(ValueError, match="num_classes=3, config says 10"):
        build_dataset(write_latents(tmp_path / "classes"), 10)

    missing = write_latents(tmp_path / "missing_shard")
    os.unlink(os.path.join(missing, "s0.labels.npy"))
    with pytest.raises(FileNotFoundError, match="s0.labels.npy"):
        build_dataset(missing)


def test_non_finite_values_are_named():
    """NaN in the data used to surface as a non-finite loss ("lower --lr")."""
    from maskdit_fast.data import TensorImages
    images = torch.zeros(4, 1, 2, 2)
    images[2, 0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="image 2 holds NaN or infinite values"):
        TensorImages(images, torch.zeros(4, dtype=torch.long), 1)


def test_non_finite_latents_name_the_shard_and_row(tmp_path):
    root = write_latents(tmp_path / "lat", n=6, shards=2)
    moments = np.load(os.path.join(root, "s1.moments.npy"))
    moments[1, 0, 1, 0] = np.inf
    np.save(os.path.join(root, "s1.moments.npy"), moments)
    ds = build_dataset(root)
    ds.get_batch(torch.tensor([0, 1, 2, 3]))  # rows without the bad value read fine
    with pytest.raises(ValueError, match=r"s1\.moments\.npy row 1 holds NaN or infinite values"):
        ds.get_batch(torch.tensor([5, 4, 0]))
