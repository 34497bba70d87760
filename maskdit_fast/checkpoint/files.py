"""Crash-safe writes and verified reads of single files: the `.pt` checkpoints of single-process
runs, a sharded checkpoint's train_state.pt, exported safetensors.

A file is written to a temporary file in the same directory, flushed and fsynced, then renamed
over its final name (atomic on POSIX), so a crash mid-write leaves at most a stray `*.tmp` file and
never a truncated one. A `.pt` file loads with `torch.load(weights_only=True)` (checkpoints hold
only tensors and plain Python containers/numbers/strings) after its zip CRC-32s are checked
(torch.load does not check them).
"""
import os
import tempfile
import zipfile
import zlib

import torch


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used as it is: unreadable, corrupt (a checksum differs),
    incomplete (a file it lists is missing), lacking entries, or holding objects that a
    checkpoint never holds (rejected without running anything)."""


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
    fsync_dir(directory)


def atomic_save(obj, path):
    """torch.save(obj, path) through `atomic_write`."""
    atomic_write(path, lambda f: torch.save(obj, f))


def fsync_dir(directory):
    """Makes a rename in `directory` durable (where the platform / file system supports it)."""
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


def file_crc32(path, chunk=1 << 22):
    """CRC-32 of a file's bytes (zlib's, the one zip uses)."""
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return crc


def verify_zip(path):
    """Raises CheckpointError unless `path` is a complete torch.save zip whose entries' CRC-32s match."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path!r} is unreadable (not a complete torch.save zip): {e}") from e
    if bad is not None:
        raise CheckpointError(f"checkpoint {path!r} is corrupt: the CRC-32 of its entry {bad!r} does not match")


def load_checkpoint(path, map_location="cpu", required=()):
    """Loads a checkpoint dict with weights_only=True after checking its zip CRC-32s.

    Args:
        required: keys the dict must have.
    Raises FileNotFoundError when missing; CheckpointError when unreadable, corrupt, holding
    anything but tensors and plain containers, or lacking a required key.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    verify_zip(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types (RuntimeError, UnpicklingError, EOFError)
        raise CheckpointError(f"checkpoint {path!r} is unreadable: {type(e).__name__}: {e}") from e
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"checkpoint {path!r} holds a {type(ckpt).__name__}, not a checkpoint dict")
    missing = [k for k in required if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {path!r} lacks {missing} (it has {sorted(ckpt)}): not a maskdit_fast "
                              f"training checkpoint, or one written by an incompatible version")
    return ckpt


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
