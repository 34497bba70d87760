"""Atomic checkpoints (a writer killed mid-save leaves the last one loadable), pruning, safetensors
export, and the EMA decay schedule."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from maskdit_fast.checkpoint import CheckpointManager, atomic_save, export_safetensors, load_checkpoint
from maskdit_fast.ema import ema_decay


def test_round_trip_and_pruning(tmp_path):
    mgr = CheckpointManager(str(tmp_path / "ckpt"), keep_last=2)
    assert mgr.latest() is None
    for step in (10, 20, 30):
        mgr.save(step, {"step": step, "w": torch.full((3,), float(step)), "rng": torch.get_rng_state(),
                        "cfg": {"lr": 1e-3, "name": "x", "shape": [1, 2]}})
    assert mgr.steps() == [20, 30]
    ckpt = load_checkpoint(mgr.latest())
    assert ckpt["step"] == 30 and torch.equal(ckpt["w"], torch.full((3,), 30.0)) and ckpt["cfg"]["shape"] == [1, 2]
    with pytest.raises(FileNotFoundError):
        load_checkpoint(str(tmp_path / "none.pt"))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="unreadable"):
        load_checkpoint(str(bad))


def test_weights_only_rejects_arbitrary_objects(tmp_path):
    path = str(tmp_path / "obj.pt")
    atomic_save({"fn": test_weights_only_rejects_arbitrary_objects}, path)
    with pytest.raises(RuntimeError, match="unreadable"):
        load_checkpoint(path)


KILLER = textwrap.dedent("""
    import os, signal, sys, torch
    from maskdit_fast.checkpoint import CheckpointManager
    mgr = CheckpointManager(sys.argv[1], keep_last=3)
    mgr.save(1, {"step": 1, "w": torch.ones(1000)})
    real_save = torch.save
    def dying_save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.flush()
        f.truncate(f.tell() // 2)  # half written ...
        os.kill(os.getpid(), signal.SIGKILL)  # ... when the process dies
    torch.save = dying_save
    mgr.save(2, {"step": 2, "w": torch.zeros(1000)})
""")


def test_kill_mid_save_leaves_last_checkpoint(tmp_path):
    directory = str(tmp_path / "ckpt")
    proc = subprocess.run([sys.executable, "-c", KILLER, directory], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    leftovers = os.listdir(directory)
    assert any(name.endswith(".tmp") for name in leftovers), leftovers  # the write really was cut off
    mgr = CheckpointManager(directory)
    assert mgr.steps() == [1]
    ckpt = load_checkpoint(mgr.latest())
    assert ckpt["step"] == 1 and torch.equal(ckpt["w"], torch.ones(1000))
    mgr.save(2, {"step": 2})  # the next save cleans the stale temp file
    assert sorted(os.listdir(directory)) == ["step_00000001.pt", "step_00000002.pt"]


def test_export_safetensors(tmp_path):
    from safetensors.torch import load_file
    net = torch.nn.Linear(3, 2)
    path = str(tmp_path / "ema.safetensors")
    export_safetensors(net.state_dict(), path, metadata={"k": "v"})
    loaded = load_file(path)
    assert set(loaded) == {"weight", "bias"} and torch.equal(loaded["weight"], net.weight.detach())


def test_ema_decay():
    assert ema_decay(0, 0.999) == pytest.approx(0.1) and ema_decay(10**6, 0.999) == 0.999
    assert ema_decay(0, 0.999, warmup=False) == 0.999
