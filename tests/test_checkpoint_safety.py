"""No code runs from a checkpoint, whatever the entry point: planted payloads in a sharded (DCP)
folder's .metadata, in a non-tensor entry of its .distcp data, in its train_state.pt, and in a
single-file .pt, loaded by `sample --ckpt`, `evaluate --ckpt`, `train --resume`, `train
--init-from`, the EMA export (`python -m maskdit_fast.checkpoint`) and auto-resume of a run dir.

Each payload, unpickled freely (as DCP's own reader and planner do), creates a marker directory and
leaves the checkpoint working; the tests assert that the marker never appears, that the explicit
entry points reject the file, and that auto-resume skips it and falls back to the older checkpoint.
"""
import os
import pickle
import shutil
import struct
import zlib

import pytest
import torch

from maskdit_fast import evaluate, sample
from maskdit_fast import train as T
from maskdit_fast.checkpoint import ShardedCheckpointer, load_training_state
from maskdit_fast.checkpoint.__main__ import main as export_main
from maskdit_fast.ema import ShardedEMA
from test_train import metrics, tiny


class _Payload:
    """Unpickled with plain pickle (torch.load(weights_only=False)), creates the marker dir."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def _prefix(marker):
    """Pickle opcodes calling os.mkdir(marker) and dropping the result: prepended to a real pickle,
    plain pickle runs them and then returns the real object (the trojaned file keeps working)."""
    path = str(marker).encode()
    return b"cos\nmkdir\n(X" + struct.pack("<I", len(path)) + path + b"tR0"


def _rechecksum(folder):
    """What an attacker who edits a sharded checkpoint's files also does: record their new checksums."""
    state = torch.load(os.path.join(folder, "train_state.pt"), weights_only=True)
    state["files"] = {}
    for name in sorted(os.listdir(folder)):
        if name != "train_state.pt":
            with open(os.path.join(folder, name), "rb") as f:
                data = f.read()
            state["files"][name] = [len(data), zlib.crc32(data)]
    torch.save(state, os.path.join(folder, "train_state.pt"))


def _plant_metadata(folder, marker):
    with open(os.path.join(folder, ".metadata"), "rb") as f:
        real = f.read()
    with open(os.path.join(folder, ".metadata"), "wb") as f:
        f.write(_prefix(marker) + real)
    assert type(pickle.load(open(os.path.join(folder, ".metadata"), "rb"))).__name__ == "Metadata"  # still works
    os.rmdir(marker)  # ... and the payload did run under plain pickle
    _rechecksum(folder)


def _plant_distcp(folder, marker):
    """Points a non-tensor entry (an optimizer hyper-parameter, torch.save'd bytes) at a payload
    appended to a data file; the metadata itself stays made of metadata types only."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata
    with open(os.path.join(folder, ".metadata"), "rb") as f:
        metadata = pickle.load(f)
    fqn = next(k for k, v in metadata.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata))
    index = next(k for k in metadata.storage_data if k.fqn == fqn)
    info = metadata.storage_data[index]
    data = os.path.join(folder, info.relative_path)
    offset = os.path.getsize(data)
    with open(data, "ab") as f:
        torch.save(_Payload(marker), f)
    metadata.storage_data[index] = _StorageInfo(info.relative_path, offset, os.path.getsize(data) - offset)
    with open(os.path.join(folder, ".metadata"), "wb") as f:
        pickle.dump(metadata, f)
    _rechecksum(folder)


def _plant_train_state(folder, marker):
    state = torch.load(os.path.join(folder, "train_state.pt"), weights_only=True)
    torch.save(dict(state, meta=_Payload(marker)), os.path.join(folder, "train_state.pt"))


PLANTS = {"metadata": _plant_metadata, "distcp": _plant_distcp, "train_state": _plant_train_state, "pt": None}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A digits-tiny run's .pt checkpoints (steps 2 and 4) and step 4 as a sharded folder."""
    root = tmp_path_factory.mktemp("sources")
    cfg = tiny(root / "run", steps=4, ckpt_every=2, keep_last=5, sample_per_class=0)
    T.train(cfg, progress=False)
    ckpts = root / "run" / "checkpoints"
    model = T.build_model(cfg, (1, 8, 8))
    opt, ema = T.build_optimizer(cfg, model), ShardedEMA(model)
    extra = load_training_state(str(ckpts / "step_00000004.pt"), model, opt, ema)
    folder = ShardedCheckpointer(str(root / "dcp"), model, opt, ema).save(4, extra)
    return {"pt2": str(ckpts / "step_00000002.pt"), "pt": str(ckpts / "step_00000004.pt"), "dcp": folder}


def plant(kind, sources, where, marker):
    """A trojaned copy of the step-4 checkpoint at `where` (a path without extension)."""
    if kind == "pt":
        ckpt = torch.load(sources["pt"], weights_only=True)
        torch.save(dict(ckpt, meta=_Payload(marker)), str(where) + ".pt")
        return str(where) + ".pt"
    shutil.copytree(sources["dcp"], where)
    PLANTS[kind](str(where), marker)
    return str(where)


ENTRY_POINTS = {
    "sample": lambda path, tmp: sample.main(["--ckpt", path, "--steps", "1", "--classes", "0", "--per-class", "1",
                                             "--out", str(tmp / "grid.png")]),
    "evaluate": lambda path, tmp: evaluate.main(["--ckpt", path, "--metric", "classifier", "--num-samples", "2",
                                                 "--steps", "1", "--out", str(tmp / "eval")]),
    "export": lambda path, tmp: export_main([path, str(tmp / "ema.safetensors")]),
    "train --resume": lambda path, tmp: T.train(tiny(tmp / "run", resume=path, steps=5, sample_per_class=0),
                                                progress=False),
    "train --init-from": lambda path, tmp: T.train(tiny(tmp / "run", init_from=path, steps=1, sample_per_class=0),
                                                   progress=False),
}


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("kind", PLANTS)
def test_planted_checkpoint_is_rejected_without_running(kind, entry, sources, tmp_path):
    marker = tmp_path / "payload_ran"
    path = plant(kind, sources, tmp_path / "step_00000004", marker)
    error = None
    try:
        ENTRY_POINTS[entry](path, tmp_path)
    except Exception as e:
        error = e
    assert not marker.exists(), f"{entry} ran the code planted in the {kind} of {path}"
    from maskdit_fast.checkpoint import CheckpointError
    assert isinstance(error, CheckpointError), error
    assert not (tmp_path / "run").exists()  # the trainer rejected it before creating its run dir


@pytest.mark.parametrize("kind", PLANTS)
def test_auto_resume_skips_a_planted_checkpoint(kind, sources, tmp_path, capsys):
    run = tmp_path / "run"
    os.makedirs(run / "checkpoints")
    shutil.copy(sources["pt2"], run / "checkpoints")
    marker = tmp_path / "payload_ran"
    planted = plant(kind, sources, run / "checkpoints" / "step_00000004", marker)
    T.train(tiny(run, steps=5, sample_per_class=0), progress=False)
    assert not marker.exists(), f"auto-resume ran the code planted in the {kind} of {planted}"
    out = capsys.readouterr()
    assert f"skipped checkpoint {planted}" in out.err and "resumed from" in out.out
    assert [r["step"] for r in metrics(run)] == [3, 4, 5]  # from the good step-2 checkpoint
    assert os.path.exists(planted + ".corrupt") and not os.path.exists(planted)  # kept, out of the way


def test_real_checkpoints_still_load_everywhere(sources, tmp_path):
    """The restricted readers accept what the trainer writes, at every entry point."""
    for name, path in (("pt", sources["pt"]), ("dcp", sources["dcp"])):
        for entry in ("sample", "export", "train --resume", "train --init-from"):
            os.makedirs(tmp_path / name / entry.replace(" ", "_"))
            ENTRY_POINTS[entry](path, tmp_path / name / entry.replace(" ", "_"))
    assert [r["step"] for r in metrics(tmp_path / "dcp" / "train_--resume" / "run")] == [5]
