"""The trainer's guarantees (issue #13): non-finite steps are never applied or saved and the stop
message names a finite checkpoint; any number of stop signals gives one clean save; one trainer
per run dir; `--resume never` does not mix runs; corrupt checkpoints are skipped on auto-resume;
errors come before the run dir is created and name the file or value at fault."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from maskdit_fast import train as T
from maskdit_fast.checkpoint import list_checkpoints, load_checkpoint
from maskdit_fast.config import parse_config
from test_data import write_latents
from test_train import metrics, tiny


def _finite(ckpt):
    """Whether every tensor a .pt checkpoint holds for model, EMA and optimizer is finite."""
    tensors = [*ckpt["model"].values(), *ckpt["ema"].values(),
               *(t for s in ckpt["optimizer"]["state"].values() for t in s.values() if torch.is_tensor(t))]
    return all(torch.isfinite(t).all() for t in tensors)


def _named_checkpoint(error):
    return re.search(r"last good checkpoint is (\S+?)\.? ", str(error)).group(1)


# ---------------------------------------------------------------------------------------- non-finite
def test_divergence_stops_naming_a_finite_checkpoint(tmp_path):
    """--lr 1e6: step 3 has a finite loss (~1e25) and an infinite gradient norm; applying it made
    every weight NaN, saved it, and named it as the last good checkpoint."""
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match=r"non-finite gradient norm \(inf, loss .*\) at step 3") as error:
        T.train(tiny(run, lr=1e6, steps=12, ckpt_every=1, keep_last=20, sample_per_class=0), progress=False)
    named = _named_checkpoint(error.value)
    assert named.endswith("step_00000002.pt") and _finite(load_checkpoint(named))
    for path in list_checkpoints(str(run / "checkpoints")).values():
        assert _finite(load_checkpoint(path)), path
    records = metrics(run)
    assert [r["step"] for r in records] == [1, 2] and all(r["finite"] == 1.0 for r in records)


def test_clipping_an_infinite_norm_is_a_non_finite_step(tmp_path):
    """With --grad-clip the same run scaled the infinite-norm gradients to 0 and finished (exit 0,
    loss 1e28, no warning); now the step counts as non-finite: skipped, and the run stops."""
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match=r"non-finite gradient norm \(inf.* at step 4 \(after 1 skipped\)"):
        T.train(tiny(run, lr=1e6, grad_clip=1.0, max_nan_skips=1, steps=12, ckpt_every=1, keep_last=20,
                     sample_per_class=0), progress=False)
    records = metrics(run)
    assert [(r["step"], r["finite"]) for r in records] == [(1, 1.0), (2, 1.0), (3, 0.0)]
    assert records[2]["grad_norm"] == float("inf")
    assert load_checkpoint(str(run / "checkpoints" / "step_00000003.pt"))["nan_skips"] == 1
    for path in list_checkpoints(str(run / "checkpoints")).values():
        assert _finite(load_checkpoint(path)), path


@pytest.fixture
def poisoned_update(monkeypatch):
    """The optimizer's third step writes a NaN into one weight (an update that overflows)."""
    real = T.build_optimizer

    def build(cfg, net):
        opt, calls = real(cfg, net), []
        step = opt.step

        def poisoned(*args, **kwargs):
            out = step(*args, **kwargs)
            calls.append(1)
            if len(calls) == 3:
                with torch.no_grad():
                    next(iter(net.parameters())).view(-1)[0] = float("nan")
            return out
        opt.step = poisoned
        return opt
    monkeypatch.setattr(T, "build_optimizer", build)


@pytest.mark.parametrize("ckpt_every", [1, 2])
def test_update_that_makes_weights_non_finite_is_never_saved(tmp_path, poisoned_update, ckpt_every):
    """ckpt_every 1: the save right after the poisoned update refuses; 2: the next step's check
    (through the EMA, in the step's one host sync) stops the run. Either way no checkpoint holds a
    NaN and the message names the step-2 checkpoint."""
    run = tmp_path / "run"
    match = "refusing to save step 3: the model weights and EMA hold NaN" if ckpt_every == 1 else \
        "the update of step 3 made weights NaN or infinite"
    with pytest.raises(RuntimeError, match=match) as error:
        T.train(tiny(run, steps=6, ckpt_every=ckpt_every, keep_last=20, max_nan_skips=5, sample_per_class=0),
                progress=False)
    assert _named_checkpoint(error.value).endswith("step_00000002.pt")
    ckpts = list_checkpoints(str(run / "checkpoints"))
    assert sorted(ckpts) == [1, 2][ckpt_every - 1:]
    assert all(_finite(load_checkpoint(path)) for path in ckpts.values())


def test_nonfinite_flag():
    from maskdit_fast.parallel import nonfinite
    good = [torch.randn(3), torch.empty(0), torch.randn(2, 2)]
    assert nonfinite(good).item() == 0.0 and nonfinite([]).item() == 0.0
    for bad in (float("nan"), float("inf"), -float("inf")):
        tensors = [t.clone() for t in good]
        tensors[2][1, 0] = bad
        assert nonfinite(tensors).item() == 1.0, bad


# -------------------------------------------------------------------------------------------- signals
def test_any_number_of_stop_signals_save_once(tmp_path):
    """SIGTERM, SIGTERM, SIGINT 2 ms apart: the second one used to raise KeyboardInterrupt before
    the stop save started (no checkpoint, exit by KeyboardInterrupt)."""
    run_dir = tmp_path / "sig"
    proc = subprocess.Popen([sys.executable, "-m", "maskdit_fast.train", "--preset", "digits-tiny", "--steps",
                             "1000000", "--ckpt-every", "1000000", "--run-dir", str(run_dir), "--threads", "1",
                             "--log-every", "1", "--sample-per-class", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (os.path.exists(run_dir / "metrics.jsonl") and len(metrics(run_dir)) >= 3):
        time.sleep(0.05)
    for sig in (signal.SIGTERM, signal.SIGTERM, signal.SIGINT):
        proc.send_signal(sig)
        time.sleep(0.002)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert out.count("stopped at step") == 1 and "KeyboardInterrupt" not in out
    steps = sorted(list_checkpoints(str(run_dir / "checkpoints")))
    assert len(steps) == 1 and steps[0] == metrics(run_dir)[-1]["step"] >= 3


# ------------------------------------------------------------------------------------- the run dir
def test_one_trainer_per_run_dir_and_a_dead_holder_frees_it(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-m", "maskdit_fast.train", "--preset", "digits-tiny", "--steps",
                               "1000000", "--ckpt-every", "2", "--run-dir", str(run), "--threads", "1",
                               "--log-every", "1", "--sample-per-class", "0"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not list_checkpoints(str(run / "checkpoints")):
            time.sleep(0.1)
        with pytest.raises(RuntimeError, match=f"in use by another trainer \\(pid {holder.pid} on "):
            T.train(tiny(run, steps=3, sample_per_class=0), progress=False)
    finally:
        holder.kill()  # SIGKILL: the holder cannot release anything itself
        holder.wait()
    saved = sorted(list_checkpoints(str(run / "checkpoints")))[-1]
    T.train(tiny(run, steps=saved + 1, sample_per_class=0), progress=False)  # resumes the killed holder's run
    assert metrics(run)[-1]["step"] == saved + 1


def test_resume_never_refuses_a_used_run_dir_and_restart_moves_it_aside(tmp_path, capsys):
    run = tmp_path / "run"
    T.train(tiny(run, steps=2, ckpt_every=1, keep_last=5, sample_per_class=0), progress=False)
    before = sorted(os.listdir(run)), sorted(os.listdir(run / "checkpoints"))
    with pytest.raises(ValueError, match="--resume never: run dir .* holds a previous run's checkpoints, "
                                         "config.json, ema.safetensors, metrics.jsonl.* --restart"):
        T.train(tiny(run, steps=3, resume="never", sample_per_class=0), progress=False)
    assert (sorted(os.listdir(run)), sorted(os.listdir(run / "checkpoints"))) == before  # untouched
    T.train(tiny(run, steps=3, ckpt_every=1, keep_last=2, resume="never", restart=True, sample_per_class=0),
            progress=False)
    aside = [n for n in os.listdir(run) if n.startswith("previous-")]
    assert len(aside) == 1 and f"moved the previous run's checkpoints" in capsys.readouterr().out
    assert sorted(os.listdir(run / aside[0] / "checkpoints")) == ["step_00000001.pt", "step_00000002.pt"]
    assert sorted(list_checkpoints(str(run / "checkpoints"))) == [2, 3]  # its own only, pruned among themselves
    assert [r["step"] for r in metrics(run)] == [1, 2, 3]
    # a later auto-resume continues this run, not the one moved aside
    T.train(tiny(run, steps=4, sample_per_class=0), progress=False)
    assert [r["step"] for r in metrics(run)] == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="restart starts over"):
        parse_config(["--restart", "--resume", "x.pt"])


def test_auto_resume_skips_a_corrupt_checkpoint(tmp_path, capsys):
    """A flipped bit in the newest .pt loaded silently (EMA values changed); now the zip CRC-32s
    are checked, the checkpoint is set aside and the run resumes from the one before, exactly."""
    overrides = dict(steps=6, ckpt_every=2, keep_last=5, sample_per_class=0)
    T.train(tiny(tmp_path / "ref", **overrides), progress=False)
    run = tmp_path / "run"
    T.train(tiny(run, **overrides), stop_at=4, progress=False)
    newest = run / "checkpoints" / "step_00000004.pt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0x10
    newest.write_bytes(bytes(data))
    capsys.readouterr()
    T.train(tiny(run, **overrides), progress=False)
    err = capsys.readouterr().err
    assert f"skipped checkpoint {newest}" in err and "CRC-32" in err
    assert os.path.exists(str(newest) + ".corrupt")
    assert [r["loss"] for r in metrics(run)] == [r["loss"] for r in metrics(tmp_path / "ref")]


# ----------------------------------------------------------------------------- clear, early errors
def test_errors_come_before_the_run_dir_exists(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="torchrun"):
        T.train(tiny(run, parallel="fsdp"), progress=False)
    with pytest.raises(FileNotFoundError, match=r"--resume .*missing\.pt"):
        T.train(tiny(run, resume=str(tmp_path / "missing.pt")), progress=False)
    with pytest.raises(FileNotFoundError, match=r"--init-from .*missing"):
        T.train(tiny(run, init_from=str(tmp_path / "missing")), progress=False)
    assert not run.exists()


def test_resuming_into_another_architecture_blames_the_architecture(tmp_path):
    """A deeper model used to fail in the optimizer state ("covers parameters ...")."""
    T.train(tiny(tmp_path / "a", steps=1, sample_per_class=0), progress=False)
    ckpt = str(tmp_path / "a" / "checkpoints" / "step_00000001.pt")
    deeper = dict(tiny("x").model_kwargs, depth=2)
    for key in ("resume", "init_from"):
        with pytest.raises(ValueError, match=r"different architecture.*model config .*depth 1 vs 2.*blocks\.1\.") \
                as error:
            T.train(tiny(tmp_path / key, steps=2, model_kwargs=deeper, **{key: ckpt}), progress=False)
        assert "optimizer" not in str(error.value)
        assert not (tmp_path / key).exists()


def test_checkpoint_missing_entries_is_named(tmp_path):
    T.train(tiny(tmp_path / "a", steps=1, sample_per_class=0), progress=False)
    ckpt = load_checkpoint(str(tmp_path / "a" / "checkpoints" / "step_00000001.pt"))
    del ckpt["rng"]
    torch.save(ckpt, tmp_path / "norng.pt")
    with pytest.raises(RuntimeError, match=r"norng\.pt' lacks \['rng'\]"):
        T.train(tiny(tmp_path / "b", steps=2, resume=str(tmp_path / "norng.pt")), progress=False)


def test_nan_in_latent_data_names_the_shard(tmp_path):
    data = write_latents(tmp_path / "lat", n=12, shape=(4, 4, 4), num_classes=3, shards=2)
    moments = np.load(os.path.join(data, "s1.moments.npy"))
    moments[2, 1, 0, 3] = np.nan
    np.save(os.path.join(data, "s1.moments.npy"), moments)
    with pytest.raises(ValueError, match=r"s1\.moments\.npy row 2 holds NaN or infinite values"):
        T.train(tiny(tmp_path / "run", data=data, num_classes=3, batch_size=12, steps=2, sample_per_class=0),
                progress=False)


def test_config_errors_name_the_value_or_file(tmp_path):
    for flag, value in (("--grad-clip", "nan"), ("--lr", "inf"), ("--ema-decay", "nan")):
        with pytest.raises(ValueError, match=f"{flag[2:].replace('-', '_')} must be a finite number, got {value}"):
            parse_config(["--preset", "digits-tiny", flag, value])
    listed = tmp_path / "list.json"
    listed.write_text('[{"lr": 1e-3}]')
    with pytest.raises(ValueError, match=r"list\.json' must hold a table / object of config keys, got a list"):
        parse_config(["--config", str(listed)])
    for name, text in (("bad.json", '{"lr": 1e-3,}'), ("bad.toml", "lr = = 1\n")):
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=re.escape(f"{tmp_path / name}' is not valid")):
            parse_config(["--config", str(tmp_path / name)])
    json.loads((tmp_path / "list.json").read_text())  # the file itself is valid JSON, just not a table
