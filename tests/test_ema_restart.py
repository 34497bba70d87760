"""EMA restart at the unmasked phase (`ema_restart`): the schedule and the trainer."""
import pytest
import torch

from maskdit_fast import train as T
from maskdit_fast.checkpoint import list_checkpoints, load_checkpoint
from maskdit_fast.ema import ema_decay
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
