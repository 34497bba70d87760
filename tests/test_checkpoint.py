"""Atomic checkpoints (a writer killed mid-save leaves the last one loadable), pruning, safetensors
export, integrity checks of both formats, and the EMA decay schedule."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from maskdit_fast.checkpoint import (CheckpointError, FileCheckpointer, ShardedCheckpointer, atomic_save,
                                     export_safetensors, list_checkpoints, load_checkpoint, make_checkpointer)
from maskdit_fast.ema import ShardedEMA, ema_decay


def _file_checkpointer(directory, keep_last):
    """A FileCheckpointer of a small model, its optimizer and EMA."""
    net = torch.nn.Linear(3, 2)
    return FileCheckpointer(directory, net, torch.optim.AdamW(net.parameters()), ShardedEMA(net), keep_last=keep_last)


def test_round_trip_and_pruning(tmp_path):
    mgr = _file_checkpointer(str(tmp_path / "ckpt"), keep_last=2)
    assert mgr.latest() is None
    for step in (10, 20, 30):
        mgr.save(step, {"step": step, "w": torch.full((3,), float(step)), "rng": torch.get_rng_state(),
                        "cfg": {"lr": 1e-3, "name": "x", "shape": [1, 2]}})
    assert mgr.steps() == [20, 30]
    ckpt = load_checkpoint(mgr.latest())
    assert ckpt["step"] == 30 and torch.equal(ckpt["w"], torch.full((3,), 30.0)) and ckpt["cfg"]["shape"] == [1, 2]
    assert torch.equal(ckpt["model"]["weight"], mgr.model.weight.detach()) and set(ckpt["ema"]) == {"weight", "bias"}
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
    from maskdit_fast.checkpoint import FileCheckpointer
    from maskdit_fast.ema import ShardedEMA
    net = torch.nn.Linear(3, 2)
    mgr = FileCheckpointer(sys.argv[1], net, torch.optim.AdamW(net.parameters()), ShardedEMA(net), keep_last=3)
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
    mgr = _file_checkpointer(directory, keep_last=3)
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


def _flip_byte(path, offset=None):
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2 if offset is None else offset] ^= 0x01
    open(path, "wb").write(bytes(data))


def test_a_flipped_bit_is_caught(tmp_path):
    """torch.load does not check the zip CRC-32s: a flipped bit loaded silently."""
    path = str(tmp_path / "x.pt")
    atomic_save({"w": torch.randn(4096)}, path)
    _flip_byte(path)
    with pytest.raises(RuntimeError, match=r"x.pt' is corrupt: the CRC-32 of its entry '.*/data/0' does not match"):
        load_checkpoint(path)


def _trained(seed):
    """(model, optimizer, EMA) of a small network after one step from `seed`'s init."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    opt, ema = torch.optim.AdamW(net.parameters()), ShardedEMA(net)
    net(torch.randn(2, 8)).sum().backward()
    opt.step()
    ema.update(net, 0.5)
    return net, opt, ema


@pytest.mark.parametrize("sharded", [False, True])
def test_checkpointer_interface_is_the_same_for_both_formats(tmp_path, sharded):
    """The calls the trainer makes (save, steps, latest, load_latest, load, load_weights, wait,
    close) on either format; reading does not depend on the format written. The newest checkpoint
    corrupted: load_latest restores the one before and sets it aside."""
    net, opt, ema = _trained(0)
    ckpt = make_checkpointer(str(tmp_path), net, opt, ema, sharded=sharded, keep_last=2)
    paths = [ckpt.save(step, {"step": step, "x": [step]}) for step in (1, 2, 3)]
    ckpt.close()
    assert ckpt.steps() == [2, 3] and ckpt.latest() == paths[-1] == ckpt.path(3)
    assert ckpt.path(3).endswith("step_00000003" if sharded else "step_00000003.pt")
    bad = paths[-1] if not sharded else next(
        os.path.join(paths[-1], n) for n in os.listdir(paths[-1]) if n.endswith(".distcp"))
    _flip_byte(bad)

    fresh = _trained(1)
    other = make_checkpointer(str(tmp_path), *fresh, sharded=not sharded)
    path, extra = other.load_latest(required=("step", "x"))
    assert path == paths[1] and extra["step"] == 2 and extra["x"] == [2]
    assert other.steps() == [2] and os.path.exists(paths[-1] + ".corrupt")
    assert all(torch.equal(v, fresh[0].state_dict()[k]) for k, v in net.state_dict().items())
    assert all(torch.equal(s[key], fresh[1].state_dict()["state"][i][key])
               for i, s in opt.state_dict()["state"].items() for key in ("exp_avg", "exp_avg_sq", "step"))
    assert all(torch.equal(v, fresh[2].state_dict()[k]) for k, v in ema.state_dict().items())
    with pytest.raises(CheckpointError, match="lacks"):
        other.load(path, required=("step", "missing"))
    weights_only = _trained(2)
    assert make_checkpointer(str(tmp_path), *weights_only, sharded=sharded).load_weights(path) == 2
    assert all(torch.equal(v, weights_only[0].state_dict()[k]) for k, v in net.state_dict().items())
    assert not all(torch.equal(opt.state_dict()["state"][i]["exp_avg"], s["exp_avg"])
                   for i, s in weights_only[1].state_dict()["state"].items())  # the optimizer stays as it was
    assert make_checkpointer(str(tmp_path / "empty"), *_trained(3), sharded=sharded).load_latest() == (None, None)


def _dcp_folder(tmp_path):
    """A sharded checkpoint as ShardedCheckpointer commits it (one process, no process group)."""
    net, opt, _ = _trained(0)
    return ShardedCheckpointer(str(tmp_path / "ckpts"), net, opt, ShardedEMA(net)).save(1, {"step": 1})


def test_sharded_checkpoint_integrity(tmp_path):
    from maskdit_fast.checkpoint import CheckpointError, is_dcp_checkpoint, verify_checkpoint
    from maskdit_fast.checkpoint import load_ema_state
    folder = _dcp_folder(tmp_path)
    verify_checkpoint(folder)
    assert set(torch.load(os.path.join(folder, "train_state.pt"))["files"]) == set(os.listdir(folder)) - {
        "train_state.pt"}
    data = next(os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".distcp"))
    _flip_byte(data)
    with pytest.raises(CheckpointError, match=r"corrupt: the CRC-32 of .*\.distcp does not match"):
        verify_checkpoint(folder)
    with pytest.raises(CheckpointError, match="CRC-32"):
        load_ema_state(folder)  # sampling and the EMA export verify too
    # a folder missing a file its metadata lists is not complete (it used to count as a checkpoint)
    os.unlink(data)
    assert not is_dcp_checkpoint(folder)
    assert list_checkpoints(os.path.dirname(folder)) == {}


def test_sharded_checkpoint_without_checksums_needs_its_listed_files(tmp_path):
    """Folders committed before checksums were recorded: complete when every file the metadata lists is there."""
    from maskdit_fast.checkpoint import is_dcp_checkpoint, verify_checkpoint
    folder = _dcp_folder(tmp_path)
    state = torch.load(os.path.join(folder, "train_state.pt"))
    del state["files"]
    torch.save(state, os.path.join(folder, "train_state.pt"))
    verify_checkpoint(folder)
    assert is_dcp_checkpoint(folder)
    os.unlink(next(os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".distcp")))
    assert not is_dcp_checkpoint(folder)


def test_metadata_unpickler_allows_only_metadata(tmp_path):
    """The restricted reader accepts DCP's metadata and refuses any other global, and setting the
    state of anything but a metadata object (e.g. patching a class attribute through BUILD)."""
    import pickle
    from maskdit_fast.checkpoint import CheckpointError, read_dcp_metadata
    folder = _dcp_folder(tmp_path)
    metadata = read_dcp_metadata(folder)
    assert any(k.startswith("ema.") for k in metadata.state_dict_metadata)
    for name, payload in [
        ("global", pickle.dumps(print)),
        ("reduce", b"cbuiltins\ngetattr\n(cbuiltins\nobject\nX\x08\x00\x00\x00__subclasses__tR."),
        # BUILD with a slot state on the Metadata class itself: setattr(Metadata, "evil", 1)
        ("build", b"ctorch.distributed.checkpoint.metadata\nMetadata\n(N}X\x04\x00\x00\x00evilK\x01stb."),
    ]:
        with open(os.path.join(folder, ".metadata"), "wb") as f:
            f.write(payload)
        with pytest.raises(CheckpointError, match="nothing ran"):
            read_dcp_metadata(folder)
    from torch.distributed.checkpoint.metadata import Metadata
    assert not hasattr(Metadata, "evil")
