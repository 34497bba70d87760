"""The trainer: default run end to end (tiny), exact resume, signals, NaN handling, bad data,
latent data, fine-tuning init, config precedence."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from maskdit_fast import train as T
from maskdit_fast.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from maskdit_fast.config import PRESETS, config_from_dict, parse_config
from maskdit_fast.data import MNIST5K_SIZES
from maskdit_fast.metrics import MetricsLog
from test_data import write_latents


def tiny(run_dir, **overrides):
    """digits-tiny config (8x8 digits, 50k-parameter MaskDiT) in run_dir."""
    values = dict(PRESETS["digits-tiny"], run_dir=str(run_dir), threads=1, log_every=1)
    values.update(overrides)
    return config_from_dict(values)


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_default_run_end_to_end(tmp_path, capsys):
    run_dir = tmp_path / "default"
    T.main(["--run-dir", str(run_dir), "--steps", "3", "--batch-size", "16", "--unmasked-steps", "1",
            "--sample-steps", "2", "--sample-per-class", "1", "--eval-per-class", "1", "--threads", "1",
            "--log-every", "1"])
    out = capsys.readouterr().out
    assert "run dir:" in out and "class accuracy of 10 samples" in out and "stray bright regions per sample" in out
    cfg = json.load(open(run_dir / "config.json"))
    assert cfg["data"] == PRESETS["mnist"]["data"] and cfg["model"] == PRESETS["mnist"]["model"]
    records = metrics(run_dir)
    assert [r["mask_ratio"] for r in records[:3]] == [0.5, 0.5, 0.0]  # the final unmasked phase
    assert 0.0 <= records[-1]["sample_accuracy"] <= 1.0 and records[-1]["classifier_test_accuracy"] > 0.9
    assert records[-1]["stray_components"] >= 0.0
    from PIL import Image
    size = MNIST5K_SIZES[cfg["data"]]  # a row per class, each digit + 2 px of padding
    assert Image.open(run_dir / "grid_00000003.png").size == (size + 4, 10 * (size + 2) + 2)
    assert os.path.isfile(run_dir / "ema.safetensors") and os.path.isdir(run_dir / "tb")
    assert sorted(list_checkpoints(str(run_dir / "checkpoints"))) == [3]


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_resume_is_exact(tmp_path, grad_accum):
    overrides = dict(steps=7, unmasked_steps=2, grad_accum=grad_accum, lr_warmup_steps=2, ckpt_every=100,
                     sample_per_class=0)
    T.train(tiny(tmp_path / "a", **overrides), progress=False)
    first = T.train(tiny(tmp_path / "b", **overrides), stop_at=3, progress=False)
    assert first["interrupted"] and first["step"] == 3
    T.train(tiny(tmp_path / "b", **overrides), progress=False)  # auto-resume from the run dir
    a, b = metrics(tmp_path / "a"), metrics(tmp_path / "b")
    assert [r["step"] for r in b] == list(range(1, 8))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    ckpt_a = load_checkpoint(latest_checkpoint(str(tmp_path / "a" / "checkpoints")))
    ckpt_b = load_checkpoint(latest_checkpoint(str(tmp_path / "b" / "checkpoints")))
    for key in ("model", "ema"):
        for name, value in ckpt_a[key].items():
            assert torch.equal(value, ckpt_b[key][name]), (key, name)


def test_sigterm_saves_and_exits(tmp_path):
    run_dir = tmp_path / "sig"
    proc = subprocess.Popen([sys.executable, "-m", "maskdit_fast.train", "--preset", "digits-tiny", "--steps",
                             "1000000", "--run-dir", str(run_dir), "--threads", "1", "--log-every", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (os.path.exists(run_dir / "metrics.jsonl")
                                          and len(metrics(run_dir)) >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "stopped at step" in out and "SIGTERM" in out
    step = load_checkpoint(latest_checkpoint(str(run_dir / "checkpoints")))["step"]
    assert step >= 2 and step == metrics(run_dir)[-1]["step"]


def test_nan_loss_stops_or_skips(tmp_path, monkeypatch):
    real = T.build_loss

    def poisoned(cfg):
        loss_fn, calls = real(cfg), []

        def call(*args, **kwargs):
            out = loss_fn(*args, **kwargs)
            calls.append(1)
            return out._replace(loss=out.loss * float("nan")) if len(calls) == 3 else out
        return call

    monkeypatch.setattr(T, "build_loss", poisoned)
    with pytest.raises(RuntimeError, match="non-finite loss .* at step 3"):
        T.train(tiny(tmp_path / "stop", steps=5, ckpt_every=2), progress=False)
    assert sorted(list_checkpoints(str(tmp_path / "stop" / "checkpoints"))) == [2]

    result = T.train(tiny(tmp_path / "skip", steps=5, max_nan_skips=1, sample_per_class=0), progress=False)
    records = metrics(tmp_path / "skip")
    assert result["step"] == 5 and [r["finite"] for r in records] == [1, 1, 0, 1, 1]
    assert load_checkpoint(latest_checkpoint(str(tmp_path / "skip" / "checkpoints")))["nan_skips"] == 1


def test_bad_data_fails_before_training(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        T.train(tiny(tmp_path / "run", data=str(tmp_path / "missing")), progress=False)
    bad = write_latents(tmp_path / "bad", labels=[0, 1, 2, 3, 0, 1])
    with pytest.raises(ValueError, match="outside"):
        T.train(tiny(tmp_path / "run", data=bad, num_classes=3), progress=False)
    with pytest.raises(ValueError, match="data.*empty"):
        T.train(tiny(tmp_path / "run", data=""), progress=False)
    assert not os.path.exists(tmp_path / "run")


def test_latent_training_and_finetune(tmp_path):
    data = write_latents(tmp_path / "lat", n=12, shape=(4, 4, 4), num_classes=3)
    pre = tiny(tmp_path / "pre", data=data, num_classes=3, batch_size=4, steps=3, sample_per_class=1,
               sample_every=2)
    result = T.train(pre, progress=False)
    assert os.path.isfile(result["grid"]) and result["grid"].endswith(".npz")  # latents: no VAE to decode
    periodic = np.load(tmp_path / "pre" / "grid_00000002.npz")["samples"]
    assert periodic.shape == (3, 4, 4, 4) and np.isfinite(periodic).all()
    assert load_checkpoint(os.path.join(result["run_dir"], "checkpoints", "step_00000003.pt"))["meta"]["data"][
        "latent"]
    # Unmasked fine-tuning stage: weights from the checkpoint, fresh optimizer and step counter.
    ckpt = load_checkpoint(latest_checkpoint(str(tmp_path / "pre" / "checkpoints")))
    ft = tiny(tmp_path / "ft", data=data, num_classes=3, batch_size=4, steps=2, mask_ratio=0.0, lr=1e-12,
              init_from=latest_checkpoint(str(tmp_path / "pre" / "checkpoints")), sample_per_class=0)
    T.train(ft, progress=False)
    assert [r["mask_ratio"] for r in metrics(tmp_path / "ft")] == [0.0, 0.0]
    tuned = load_checkpoint(latest_checkpoint(str(tmp_path / "ft" / "checkpoints")))
    assert tuned["step"] == 2
    for name, value in ckpt["model"].items():
        torch.testing.assert_close(tuned["model"][name], value, atol=1e-6, rtol=0)


def test_bf16_autocast(tmp_path):
    T.train(tiny(tmp_path / "bf16", steps=2, precision="bf16", sample_per_class=0), progress=False)
    assert all(r["finite"] == 1.0 for r in metrics(tmp_path / "bf16"))


def test_config_precedence(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('lr = 3e-3\nsteps = 7\n[model_kwargs]\ndepth = 2\n')
    cfg = parse_config(["--preset", "digits-tiny", "--config", str(toml), "--steps", "9", "--no-ema-warmup",
                        "--model-kwargs", '{"num_heads": 4}'])
    assert (cfg.lr, cfg.steps, cfg.ema_warmup, cfg.run_dir) == (3e-3, 9, False, os.path.join("runs", "digits-tiny"))
    assert cfg.model_kwargs == dict(PRESETS["digits-tiny"]["model_kwargs"], depth=2, num_heads=4)
    assert parse_config([]).name == "mnist"
    bad = tmp_path / "bad.json"
    bad.write_text('{"learning_rate": 1}')
    with pytest.raises(ValueError, match="unknown config key 'learning_rate'"):
        parse_config(["--config", str(bad)])
    bad.write_text('{"steps": "ten"}')
    with pytest.raises(TypeError, match="steps must be int"):
        parse_config(["--config", str(bad)])
    with pytest.raises(ValueError, match="not divisible by grad_accum"):
        parse_config(["--batch-size", "10", "--grad-accum", "3"])
    with pytest.raises(ValueError, match="ops_backend must be one of"):
        parse_config(["--ops-backend", "fast"])
    with pytest.raises(ValueError, match="sample_steps must be >= 1"):  # before training, not after it
        parse_config(["--sample-steps", "0"])
    with pytest.raises(ValueError, match="grad_clip must be >= 0"):
        parse_config(["--grad-clip", "-1"])


def test_metrics_log_resume_drops_a_line_cut_short_by_a_crash(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"ste')
    MetricsLog(str(tmp_path), resume_step=2).close()
    assert [m["step"] for m in metrics(tmp_path)] == [1, 2]


def test_every_flag_has_help():
    """--help text comes from the comments in TrainConfig: a new field without one fails here."""
    from maskdit_fast.config import build_parser
    missing = [a.dest for a in build_parser()._actions if a.option_strings and not a.help]
    assert not missing, missing


@pytest.mark.parametrize("name,expected", [("auto", None), ("torch", "torch"), ("triton", "triton")])
def test_ops_backend_reaches_the_model(name, expected, tmp_path):
    """--ops-backend sets the model's op back-end; auto leaves it to the process-wide switch."""
    cfg = tiny(tmp_path, ops_backend=name)
    model = T.build_model(cfg, (1, 8, 8))
    assert model.backend == expected
    assert not model.check_inputs  # labels are checked when the dataset is built, masks drawn by the trainer
