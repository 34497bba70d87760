"""Crash-safe checkpoints.

A checkpoint is written to a temporary file in the same directory, flushed and fsynced, then
renamed over its final name (atomic on POSIX), so a crash mid-write leaves at most a stray
`*.tmp` file and never a truncated `step_*.pt`. Loading uses `torch.load(weights_only=True)`:
checkpoints hold only tensors and plain Python containers/numbers/strings.

A checkpoint directory may also hold the sharded checkpoints of distributed runs
(`step_XXXXXXXX/`, see `maskdit_fast.dist_checkpoint`): listing, "latest" and pruning here cover
both formats, so a run can resume from either whatever its world size.
"""
import os
import re
import shutil
import tempfile

import torch

CKPT_RE = re.compile(r"^step_(\d+)\.pt$")
DCP_RE = re.compile(r"^step_(\d+)$")
TRAIN_STATE = "train_state.pt"  # a DCP checkpoint's non-tensor state, written last (by rank 0)


def atomic_write(path, write):
    """Calls write(f) on a binary temp file next to `path`, fsyncs it, then renames it over `path`
    (atomic on POSIX): readers see the old file or the complete new one, never a partial one.
    `path`'s directory must exist."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def atomic_save(obj, path):
    """torch.save(obj, path) through `atomic_write`."""
    atomic_write(path, lambda f: torch.save(obj, f))


def _fsync_dir(directory):
    # Makes the rename itself durable; not supported on every platform/filesystem.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path, map_location="cpu"):
    """Loads a checkpoint dict with weights_only=True; clear error if missing or unreadable."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types (RuntimeError, UnpicklingError, EOFError)
        raise RuntimeError(f"checkpoint {path!r} is unreadable: {type(e).__name__}: {e}") from e


def is_dcp_checkpoint(path):
    """True for a complete DCP checkpoint directory (DCP metadata and train_state.pt present)."""
    return (os.path.isdir(path) and os.path.isfile(os.path.join(path, ".metadata"))
            and os.path.isfile(os.path.join(path, TRAIN_STATE)))


def list_checkpoints(directory):
    """{step: path} of the complete checkpoints in `directory`, both formats (single-file `.pt`
    and DCP directories; the directory wins if a step has both). Temp files/dirs are ignored."""
    found = {}
    if not os.path.isdir(directory):
        return found
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        m = CKPT_RE.match(name)
        if m and os.path.isfile(path):
            found.setdefault(int(m.group(1)), path)
        m = DCP_RE.match(name)
        if m and is_dcp_checkpoint(path):
            found[int(m.group(1))] = path
    return found


def _remove(path):
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.unlink(path)


def prune_checkpoints(directory, keep_last):
    """Deletes all but the newest `keep_last` checkpoints (both formats) and every temp file or
    directory (`*.tmp`, left by a crashed writer). Call only when no save is in flight."""
    found = list_checkpoints(directory)
    for step in sorted(found)[:-keep_last]:
        _remove(found[step])
    for name in os.listdir(directory):
        if name.endswith(".tmp"):
            _remove(os.path.join(directory, name))


class CheckpointDirectory:
    """Lookup shared by the single-file and the sharded (DCP) checkpoint managers: both formats
    live side by side in `self.directory`."""

    def steps(self):
        """Sorted steps of the complete checkpoints present, both formats (temp files ignored)."""
        return sorted(list_checkpoints(self.directory))

    def latest(self):
        """Path of the newest complete checkpoint (a .pt file or a DCP directory), or None."""
        found = list_checkpoints(self.directory)
        return found[max(found)] if found else None


class CheckpointManager(CheckpointDirectory):
    """`step_XXXXXXXX.pt` files in one directory, keeping the newest `keep_last` (counting the
    sharded checkpoints of distributed runs in the same directory too).

    Args:
        directory: created if needed.
        keep_last: how many checkpoints to keep (>= 1).
    """

    def __init__(self, directory, keep_last=3):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.directory, self.keep_last = directory, keep_last
        os.makedirs(directory, exist_ok=True)

    def path(self, step):
        return os.path.join(self.directory, f"step_{step:08d}.pt")

    def save(self, step, state):
        """Atomically writes `state` as step `step`, then prunes older checkpoints and stale
        temp files left by a crashed writer. Returns the path."""
        path = self.path(step)
        atomic_save(state, path)
        prune_checkpoints(self.directory, self.keep_last)
        return path


def export_safetensors(state_dict, path, metadata=None):
    """Writes a module state_dict (e.g. the EMA weights) as safetensors, atomically.

    Args:
        state_dict: name -> tensor (made contiguous, moved to CPU).
        path: output file.
        metadata: optional str -> str header entries (e.g. the model config as JSON).
    """
    from safetensors.torch import save
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    atomic_write(path, lambda f: f.write(save(tensors, metadata=metadata)))
