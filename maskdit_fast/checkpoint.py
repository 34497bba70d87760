"""Crash-safe, verified checkpoints.

A checkpoint is written to a temporary file in the same directory, flushed and fsynced, then
renamed over its final name (atomic on POSIX), so a crash mid-write leaves at most a stray
`*.tmp` file and never a truncated `step_*.pt`.

Loading never runs code from a file: `.pt` files load with `torch.load(weights_only=True)`
(checkpoints hold only tensors and plain Python containers/numbers/strings), and the metadata of
a sharded checkpoint (DCP's `.metadata`, a pickle that DCP itself reads with plain `pickle`) is
read by an unpickler allowed nothing but DCP's metadata types (`read_dcp_metadata`).

Integrity: a `.pt` file is a zip whose entries carry CRC-32s, checked on every load (torch.load
does not check them); a sharded checkpoint records the size and CRC-32 of each of its files in its
train_state.pt (`dcp_file_checksums`), checked by `verify_checkpoint`. A checkpoint that fails
raises `CheckpointError`.

A checkpoint directory may also hold the sharded checkpoints of distributed runs
(`step_XXXXXXXX/`, see `maskdit_fast.dist_checkpoint`): listing, "latest" and pruning here cover
both formats, so a run can resume from either whatever its world size. A sharded folder counts
only when complete: its metadata, its train_state.pt and every file they list are present.
"""
import fcntl
import io
import os
import pickle
import re
import shutil
import socket
import tempfile
import zipfile
import zlib

import torch

CKPT_RE = re.compile(r"^step_(\d+)\.pt$")
DCP_RE = re.compile(r"^step_(\d+)$")
TRAIN_STATE = "train_state.pt"  # a DCP checkpoint's non-tensor state, written last (by rank 0)
DCP_METADATA = ".metadata"      # DCP's index of the tensors and the files holding them
FILES_KEY = "files"             # train_state.pt entry of a DCP checkpoint: {file name: [size, crc32]}


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


def file_crc32(path, chunk=1 << 22):
    """CRC-32 of a file's bytes (zlib's, the one zip uses)."""
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return crc


def _verify_zip(path):
    # torch.load does not check the zip's CRC-32s: a flipped bit would load silently
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
    _verify_zip(path)
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


def _dcp_metadata_globals():
    """{(module, name): object} of everything a DCP .metadata pickle refers to (checked on torch
    2.11 and 2.14: FSDP2, DDP and single-process saves, sync and async): DCP's metadata classes,
    torch.Size, dtypes, layouts and pathlib paths (StorageMeta.checkpoint_id, the writer's path)."""
    import pathlib
    from torch.distributed.checkpoint import filesystem, metadata
    classes = [metadata.Metadata, metadata.MetadataIndex, metadata.StorageMeta, metadata.TensorProperties,
               metadata.TensorStorageMetadata, metadata.BytesStorageMetadata, metadata.ChunkStorageMetadata,
               metadata._MEM_FORMAT_ENCODING, filesystem._StorageInfo]
    allowed = {(c.__module__, c.__qualname__): c for c in classes}
    allowed[("torch", "Size")] = torch.Size
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout  # a name -> layout lookup
    allowed.update({("torch", str(d).removeprefix("torch.")): d for d in vars(torch).values()
                    if isinstance(d, torch.dtype)})
    for module in ("pathlib", "pathlib._local"):  # Python 3.13 pickles pathlib classes from pathlib._local
        allowed.update({(module, name): getattr(pathlib, name) for name in ("PosixPath", "WindowsPath")})
    return allowed, frozenset(classes + [pathlib.PosixPath, pathlib.WindowsPath])


class _MetadataUnpickler(pickle._Unpickler):
    """Unpickles DCP metadata only: globals from `_dcp_metadata_globals`, BUILD (setting an
    object's state) only on instances of those classes, no persistent ids. Python's reference
    unpickler, so that BUILD can be checked: a crafted pickle can neither call anything else nor
    reach into a class or function (e.g. patch a class attribute)."""

    def __init__(self, file):
        super().__init__(file)
        self._globals, self._classes = _dcp_metadata_globals()

    def find_class(self, module, name):
        try:
            return self._globals[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"{module}.{name} is not a DCP metadata type") from None

    def load_build(self):
        target = self.stack[-2]  # the stack ends with (object, state)
        if type(target) not in self._classes:
            raise pickle.UnpicklingError(f"setting the state of a {type(target).__name__} (DCP metadata sets only "
                                         f"its own objects' state)")
        super().load_build()

    dispatch = dict(pickle._Unpickler.dispatch)
    dispatch[pickle.BUILD[0]] = load_build


def read_dcp_metadata(path):
    """The torch.distributed.checkpoint Metadata of the sharded checkpoint folder `path`, read by
    an unpickler restricted to the metadata types (`_MetadataUnpickler`; DCP's own reader uses
    plain pickle): a crafted .metadata raises CheckpointError instead of running code."""
    from torch.distributed.checkpoint.metadata import Metadata
    file = os.path.join(path, DCP_METADATA)
    try:
        with open(file, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise CheckpointError(f"sharded checkpoint {path!r} has no {DCP_METADATA}") from None
    except Exception as e:
        raise CheckpointError(f"{file}: not DCP metadata, or it holds objects that DCP metadata never holds "
                              f"(read with a restricted unpickler: nothing ran): {type(e).__name__}: {e}") from e
    if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
        raise CheckpointError(f"{file}: holds a {type(metadata).__name__}, not DCP Metadata")
    return metadata


def _dcp_listed_files(metadata, path):
    """{file name: bytes the metadata's entries need from it} of the DCP checkpoint `path`."""
    need = {}
    for info in metadata.storage_data.values():
        name = getattr(info, "relative_path", None)
        if not isinstance(name, str) or os.path.basename(name) != name or name in ("", ".", ".."):
            raise CheckpointError(f"{os.path.join(path, DCP_METADATA)}: a storage entry names {name!r}, "
                                  f"not a file of the checkpoint folder")
        need[name] = max(need.get(name, 0), int(info.offset) + int(info.length))
    return need


def dcp_file_checksums(path):
    """{name: [size, crc32]} of the files of a DCP checkpoint folder being committed (all but
    train_state.pt), after checking that every file its metadata lists is there. Stored in
    train_state.pt under FILES_KEY and checked by `verify_checkpoint`."""
    present = {name for name in os.listdir(path) if name != TRAIN_STATE}
    missing = sorted(set(_dcp_listed_files(read_dcp_metadata(path), path)) - present)
    if missing:
        raise CheckpointError(f"sharded checkpoint {path!r} lacks the files {missing[:5]} its metadata lists")
    return {name: [os.path.getsize(os.path.join(path, name)), file_crc32(os.path.join(path, name))]
            for name in sorted(present)}


def _has_bytes(path, name, size, exact):
    file = os.path.join(path, name)
    return os.path.isfile(file) and (os.path.getsize(file) == size if exact else os.path.getsize(file) >= size)


def is_dcp_checkpoint(path):
    """True for a complete DCP checkpoint directory: its metadata, its train_state.pt and every
    file they list present (with the recorded sizes). Whether the bytes are intact is
    `verify_checkpoint`'s question: a folder whose train_state.pt or metadata cannot be read
    counts as complete here and fails there."""
    if not (os.path.isdir(path) and os.path.isfile(os.path.join(path, DCP_METADATA))
            and os.path.isfile(os.path.join(path, TRAIN_STATE))):
        return False
    try:
        files = torch.load(os.path.join(path, TRAIN_STATE), weights_only=True).get(FILES_KEY)
        if files is None:  # written before checksums were recorded: the files the metadata lists
            return all(_has_bytes(path, name, size, exact=False)
                       for name, size in _dcp_listed_files(read_dcp_metadata(path), path).items())
        return all(_has_bytes(path, name, size, exact=True) for name, (size, _) in files.items())
    except Exception:  # unreadable: listed, and rejected by verify_checkpoint
        return True


def verify_checkpoint(path):
    """Raises CheckpointError (FileNotFoundError when absent) unless `path` is an intact
    checkpoint: a `.pt` file whose zip CRC-32s match, or a sharded folder whose train_state.pt
    verifies, whose metadata reads safely, whose files are all present with the sizes and CRC-32s
    recorded at commit (folders written before checksums were recorded: present and long enough)
    and whose non-tensor entries load with weights_only=True. Reads every byte once."""
    if not os.path.isdir(path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint {path!r} does not exist")
        _verify_zip(path)
        return
    if not is_dcp_checkpoint(path):
        raise CheckpointError(f"{path!r} is not a complete DCP checkpoint (no {DCP_METADATA} or {TRAIN_STATE}, or "
                              f"a file they list is missing)")
    state = load_checkpoint(os.path.join(path, TRAIN_STATE), required=("step",))
    metadata = read_dcp_metadata(path)
    need = _dcp_listed_files(metadata, path)
    files = state.get(FILES_KEY)
    if files is None:
        files = {name: [size, None] for name, size in need.items()}
    elif not set(need) <= set(files):
        raise CheckpointError(f"sharded checkpoint {path!r}: its metadata lists files its checksums do not "
                              f"cover: {sorted(set(need) - set(files))[:5]}")
    for name, (size, crc) in files.items():
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise CheckpointError(f"sharded checkpoint {path!r} is incomplete: {name} is missing")
        if not _has_bytes(path, name, size, exact=crc is not None):
            raise CheckpointError(f"sharded checkpoint {path!r} is corrupt: {name} has {os.path.getsize(file)} "
                                  f"bytes, {'at least ' if crc is None else ''}{size} expected")
        if crc is not None and file_crc32(file) != crc:
            raise CheckpointError(f"sharded checkpoint {path!r} is corrupt: the CRC-32 of {name} does not match")
    _check_dcp_objects(metadata, path)


def _check_dcp_objects(metadata, path):
    """The non-tensor entries of a DCP checkpoint (e.g. optimizer hyper-parameters, torch.save'd
    bytes) load with weights_only=True: checked before any loading starts, so a rejected entry
    never leaves a half-loaded model behind."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata
    for index, info in metadata.storage_data.items():
        if not isinstance(metadata.state_dict_metadata.get(getattr(index, "fqn", None)), BytesStorageMetadata):
            continue
        if getattr(info, "transform_descriptors", None):
            raise CheckpointError(f"sharded checkpoint {path!r}: entry {index.fqn!r} is stored transformed "
                                  f"({info.transform_descriptors}), which maskdit_fast never writes")
        with open(os.path.join(path, info.relative_path), "rb") as f:
            f.seek(int(info.offset))
            data = f.read(int(info.length))
        try:
            torch.load(io.BytesIO(data), weights_only=True)
        except Exception as e:
            raise CheckpointError(f"sharded checkpoint {path!r}: entry {index.fqn!r} holds objects a checkpoint "
                                  f"never holds (rejected, nothing ran): {type(e).__name__}: {e}") from e


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


def set_aside(path):
    """Renames a checkpoint that failed verification to `<path>.corrupt` (kept for inspection; no
    longer listed, resumed or counted by keep_last). Returns the new path."""
    target, n = path + ".corrupt", 1
    while os.path.exists(target):
        target, n = f"{path}.corrupt{n}", n + 1
    os.replace(path, target)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))
    return target


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

    def newest_first(self):
        """Paths of the complete checkpoints present, newest first."""
        found = list_checkpoints(self.directory)
        return [found[step] for step in sorted(found, reverse=True)]


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


class RunDirLock:
    """An exclusive lock on a run dir (`<run_dir>/.lock`, fcntl.flock): one trainer per run dir.

    The operating system releases it when the holder exits or dies, so a crash or kill -9 leaves
    nothing stuck. Under torchrun only rank 0 takes it and the other ranks of the run act under
    it (maskdit_fast.train shares rank 0's verdict with them): a second job on the same run dir
    fails on all its ranks. The lock file names the holder (pid and host) for that error.
    """

    NAME = ".lock"

    def __init__(self, run_dir):
        self.run_dir, self.path, self._fd = run_dir, os.path.join(run_dir, self.NAME), None

    def acquire(self):
        """Creates the run dir if needed and takes the lock (RuntimeError naming the holder when
        another process has it). Returns self."""
        os.makedirs(self.run_dir, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "a process"
            os.close(fd)
            raise RuntimeError(f"run dir {self.run_dir!r} is in use by another trainer ({holder}): two trainers "
                               f"would overwrite each other's checkpoints and logs. Stop it, or pass another "
                               f"--run-dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self):
        """Drops the lock (closing the descriptor releases the flock)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
