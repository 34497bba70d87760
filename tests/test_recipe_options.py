"""The small-scale recipe (the `mnist` preset) and the options it relies on: the EMA restart at the
unmasked phase (`ema_restart`) and MaskDiT's decoder input init (`zero_init_decoder_input`)."""
import pytest
import torch

from maskdit_fast import train as T
from maskdit_fast.checkpoint import list_checkpoints, load_checkpoint
from maskdit_fast.config import PRESETS, config_from_dict
from maskdit_fast.data import MNIST5K_SIZES
from maskdit_fast.ema import ema_decay
from maskdit_fast.flops import model_flops
from maskdit_fast.models import MaskDiT
from maskdit_fast.sample import build_from_metadata, model_metadata
from test_train import tiny


def test_ema_decay_restart():
    assert ema_decay(5, 0.999, restart=8) == ema_decay(5, 0.999)  # before the restart: unchanged
    assert ema_decay(8, 0.999, restart=8) == 0.0                  # the EMA becomes the weights
    assert ema_decay(9, 0.999, restart=8) == pytest.approx(2 / 11)  # warm-up counted from the restart
    assert ema_decay(9, 0.999, warmup=False, restart=8) == 0.999
    assert ema_decay(10**6, 0.999, restart=8) == 0.999


def _checkpoints(run_dir):
    return {step: load_checkpoint(path) for step, path in list_checkpoints(str(run_dir / "checkpoints")).items()}


@pytest.mark.parametrize("restart", [False, True])
def test_trainer_restarts_the_ema_at_the_first_unmasked_step(tmp_path, restart):
    overrides = dict(steps=4, unmasked_steps=2, ema_restart=restart, ema_decay=0.9, ckpt_every=1, keep_last=10,
                     sample_per_class=0)
    T.train(tiny(tmp_path / "a", **overrides), progress=False)
    ckpts = _checkpoints(tmp_path / "a")
    # step 3 = after the first unmasked step (0-based step 2)
    same = [torch.equal(ckpts[3]["ema"][k], v) for k, v in ckpts[3]["model"].items()]
    assert all(same) if restart else not all(same)
    if restart:  # the next step warms up again: ema = 2/11 of step 3's weights + 9/11 of step 4's
        for k, v in ckpts[4]["model"].items():
            torch.testing.assert_close(ckpts[4]["ema"][k], ckpts[3]["model"][k] * (2 / 11) + v * (9 / 11))
    # a run resumed before the restart ends with the same EMA
    T.train(tiny(tmp_path / "b", **overrides), stop_at=2, progress=False)
    T.train(tiny(tmp_path / "b", **overrides), progress=False)
    resumed = _checkpoints(tmp_path / "b")[4]["ema"]
    assert all(torch.equal(resumed[k], v) for k, v in ckpts[4]["ema"].items())


def test_decoder_input_init():
    kw = dict(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=1, num_heads=2, num_classes=10,
              decoder_depth=1, decoder_hidden_size=16, decoder_num_heads=2)
    torch.manual_seed(0)
    official, light = MaskDiT(**kw), MaskDiT(**kw, zero_init_decoder_input=False)
    assert official.zero_init_decoder_input and official.decoder_layer.linear.weight.abs().sum() == 0
    w = light.decoder_layer.linear.weight
    bound = (6 / (w.shape[0] + w.shape[1])) ** 0.5  # xavier-uniform, like the other linears
    assert w.abs().max() <= bound and w.std() > bound / 3 and light.decoder_layer.linear.bias.abs().sum() == 0
    # The decoder now sees the encoder's tokens from the start; the model still outputs zeros (zero final layer).
    x, t, y = torch.randn(2, 3, 8, 8), torch.randn(2), torch.tensor([1, 10])
    tokens, c = torch.randn(2, 16, 32), light._condition(t, y)
    assert light.decoder_layer(tokens, c).abs().sum() > 0 and official.decoder_layer(tokens, c).abs().sum() == 0
    assert torch.equal(light(x, t, y).sample, torch.zeros(2, 3, 8, 8))
    # The option travels with the architecture (sampling rebuilds the net from its metadata).
    rebuilt = build_from_metadata(model_metadata(light, 0.5, {}), light.state_dict())
    assert rebuilt.config == light.config and not rebuilt.zero_init_decoder_input
    assert MaskDiT(**official.config).zero_init_decoder_input


def test_mnist_preset_recipe():
    """The default run stays a MaskDiT with a light decoder (<= 10% of a masked step's FLOPs, the
    figure its comment states), masked pre-training then an unmasked phase with the EMA restarted, and
    a fixed thread count (the results depend on it; 2 = both cores of the machine the run is sized for)."""
    cfg = config_from_dict(PRESETS["mnist"]).validate()
    size = MNIST5K_SIZES[cfg.data]
    net = T.build_model(cfg, (1, size, size))
    assert isinstance(net, MaskDiT) and cfg.mask_ratio > 0 and cfg.mae_coef >= 0
    masked = model_flops(net, mask_ratio=cfg.mask_ratio)
    assert masked["decoder"] / masked["total"] <= 0.10
    assert 0 < cfg.unmasked_steps < cfg.steps and cfg.ema_restart and cfg.threads == 2
