"""The sampling CLI: grid and .npz, seeded and batch-size independent, from .pt, sharded (DCP)
folders or .safetensors."""

import numpy as np
import pytest
import torch
from PIL import Image

from maskdit_fast import train as T
from maskdit_fast.checkpoint import ShardedCheckpointer, load_checkpoint
from maskdit_fast.config import PRESETS, config_from_dict
from maskdit_fast.ema import ShardedEMA
from maskdit_fast.sample import build_from_metadata, generate, load_for_sampling, main, parse_classes, save_grid


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    cfg = config_from_dict(dict(PRESETS["digits-tiny"], run_dir=str(run), steps=4, threads=1, sample_per_class=0))
    T.train(cfg, progress=False)
    return run


def test_cli_writes_grid_and_npz(run_dir, tmp_path):
    ckpt = str(run_dir / "checkpoints" / "step_00000004.pt")
    grid, npz = str(tmp_path / "g.png"), str(tmp_path / "s.npz")
    main(["--ckpt", ckpt, "--classes", "0,2", "--per-class", "3", "--steps", "3", "--cfg-scale", "1.5",
          "--batch-size", "4", "--out", grid, "--npz", npz, "--seed", "7"])
    assert Image.open(grid).size == (3 * 10 + 2, 2 * 10 + 2)  # 3 columns x 2 class rows of 8 px + 2 px pad
    data = np.load(npz)
    assert data["samples"].shape == (6, 1, 8, 8) and data["labels"].tolist() == [0, 0, 0, 2, 2, 2]
    assert data["seeds"].tolist() == list(range(7, 13))

    # Same samples from the exported EMA safetensors, in another batching.
    precond, meta = load_for_sampling(str(run_dir / "ema.safetensors"))
    assert meta["model_class"] == "MaskDiT" and meta["data"]["sample_shape"] == [1, 8, 8]
    again = generate(precond, torch.tensor([0, 0, 0, 2, 2, 2]), list(range(7, 13)), batch_size=5,
                     num_steps=3, cfg_scale=1.5)
    torch.testing.assert_close(again, torch.from_numpy(data["samples"]), atol=1e-5, rtol=1e-5)


def test_cli_cfg_interval(run_dir, tmp_path):
    """--cfg-interval LO HI reaches the sampler: the samples are those of generate(cfg_interval=...), and
    differ from guidance at every noise level."""
    npz = str(tmp_path / "s.npz")
    main(["--ckpt", str(run_dir / "ema.safetensors"), "--classes", "1", "--per-class", "2", "--steps", "4",
          "--cfg-scale", "3", "--cfg-interval", "0.5", "10", "--npz", npz])
    precond, _ = load_for_sampling(str(run_dir / "ema.safetensors"))
    labels, seeds = torch.tensor([1, 1]), [0, 1]
    want = generate(precond, labels, seeds, num_steps=4, cfg_scale=3.0, cfg_interval=(0.5, 10.0))
    got = torch.from_numpy(np.load(npz)["samples"])
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, generate(precond, labels, seeds, num_steps=4, cfg_scale=3.0))


def test_sharded_checkpoint_folder(run_dir, tmp_path):
    """A DCP folder (as distributed runs write) samples like the .pt holding the same EMA."""
    ckpt = load_checkpoint(str(run_dir / "checkpoints" / "step_00000004.pt"))
    net = build_from_metadata(ckpt["meta"], ckpt["model"]).requires_grad_(True)
    ema = ShardedEMA(net)
    ema.load_state_dict(ckpt["ema"])
    folder = ShardedCheckpointer(str(tmp_path / "dcp"), net, torch.optim.AdamW(net.parameters()), ema).save(
        4, {"step": 4, "meta": ckpt["meta"]})
    labels, seeds = torch.tensor([1, 3]), [5, 6]
    samples = {}
    for path in (folder, str(run_dir / "checkpoints" / "step_00000004.pt")):
        precond, meta = load_for_sampling(path)
        assert meta == ckpt["meta"]
        samples[path] = generate(precond, labels, seeds, num_steps=2, cfg_scale=1.0)
    assert not torch.equal(ckpt["ema"]["final_layer.linear.weight"], ckpt["model"]["final_layer.linear.weight"])
    torch.testing.assert_close(*samples.values(), rtol=0, atol=0)
    ShardedCheckpointer(str(tmp_path / "nometa"), net, torch.optim.AdamW(net.parameters()), ema).save(4, {"step": 4})
    with pytest.raises(ValueError, match="without model metadata"):
        load_for_sampling(str(tmp_path / "nometa" / "step_00000004"))


def test_errors(run_dir, tmp_path):
    assert parse_classes("all", 3) == [0, 1, 2] and parse_classes("1-3,0", 10) == [1, 2, 3, 0]
    with pytest.raises(ValueError, match="not in"):
        parse_classes("4,12", 10)
    with pytest.raises(ValueError, match="cannot parse"):
        parse_classes("x", 10)
    with pytest.raises(FileNotFoundError):
        load_for_sampling(str(tmp_path / "missing.pt"))
    with pytest.raises(ValueError, match="save_grid needs"):
        save_grid(torch.zeros(2, 2, 4, 4), str(tmp_path / "x.png"), nrow=2)


def test_generate_non_square_model():
    """A model for H != W data samples at its own (H, W)."""
    from maskdit_fast.diffusion import EDMPrecond
    from maskdit_fast.models import MaskDiT
    net = MaskDiT(input_size=(8, 16), patch_size=4, in_channels=1, hidden_size=32, depth=1, num_heads=2,
                  num_classes=3, decoder_depth=1, decoder_hidden_size=32, decoder_num_heads=2).eval()
    out = generate(EDMPrecond(net), torch.tensor([0, 2]), [0, 1], num_steps=2)
    assert out.shape == (2, 1, 8, 16) and torch.isfinite(out).all()
