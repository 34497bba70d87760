"""Crash-safe checkpoints.

A checkpoint is written to a temporary file in the same directory, flushed and fsynced, then
renamed over its final name (atomic on POSIX), so a crash mid-write leaves at most a stray
`*.tmp` file and never a truncated `step_*.pt`. Loading uses `torch.load(weights_only=True)`:
checkpoints hold only tensors and plain Python containers/numbers/strings.
"""
import os
import re
import tempfile

import torch

CKPT_RE = re.compile(r"^step_(\d+)\.pt$")


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


class CheckpointManager:
    """`step_XXXXXXXX.pt` files in one directory, keeping the newest `keep_last`.

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

    def steps(self):
        """Sorted steps of the complete checkpoints present (temp files are ignored)."""
        found = (CKPT_RE.match(name) for name in os.listdir(self.directory))
        return sorted(int(m.group(1)) for m in found if m)

    def latest(self):
        """Path of the newest checkpoint, or None."""
        steps = self.steps()
        return self.path(steps[-1]) if steps else None

    def save(self, step, state):
        """Atomically writes `state` as step `step`, then prunes older checkpoints and stale
        temp files left by a crashed writer. Returns the path."""
        path = self.path(step)
        atomic_save(state, path)
        for old in self.steps()[:-self.keep_last]:
            os.unlink(self.path(old))
        for name in os.listdir(self.directory):
            if name.endswith(".tmp"):
                os.unlink(os.path.join(self.directory, name))
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
