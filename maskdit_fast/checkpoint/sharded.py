"""The sharded checkpoint format of distributed runs: torch.distributed.checkpoint (DCP) folders,
read without running code from them and verified against checksums.

    step_00001000/.metadata, __0_0.distcp, ...   model, optimizer and EMA tensors (DCP, every rank
                                                 writes its own shards)
    step_00001000/train_state.pt                 rank 0: step, data position, RNG states, config,
                                                 size and CRC-32 of every other file (plain
                                                 containers, loads with weights_only=True)

Atomic: every rank writes into `step_XXXXXXXX.tmp/`; once DCP has committed its metadata (which
happens only after all ranks' writes finished) rank 0 checksums the files, adds train_state.pt and
renames the folder to its final name (`commit`). A crash or a killed rank mid-save leaves a stray
`.tmp` folder, never a half-written checkpoint. A folder counts as a checkpoint only when complete:
its metadata, its train_state.pt and every file they list are present.

Safe loading: DCP's own reader unpickles `.metadata` with plain `pickle` and its default planner
non-tensor entries with torch.load(weights_only=False). Here `.metadata` goes through an unpickler
allowed nothing but DCP's metadata types (`read_dcp_metadata`) and non-tensor entries through
torch.load(weights_only=True) (`dcp_load`).

Resharding: tensors are stored with their global shapes and FQN keys (torch.distributed.checkpoint.
state_dict.get_state_dict), so a checkpoint saved by N ranks under FSDP2 loads on M ranks under
FSDP2, DDP or in one process.
"""
import io
import os
import pickle
import shutil

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import get_state_dict

from maskdit_fast.checkpoint.files import CheckpointError, atomic_save, file_crc32, fsync_dir, load_checkpoint
from maskdit_fast.parallel import is_distributed

TRAIN_STATE = "train_state.pt"  # a DCP checkpoint's non-tensor state, written last (by rank 0)
DCP_METADATA = ".metadata"      # DCP's index of the tensors and the files holding them
FILES_KEY = "files"             # train_state.pt entry of a DCP checkpoint: {file name: [size, crc32]}


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
    train_state.pt under FILES_KEY and checked by `verify_dcp_checkpoint`."""
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
    `verify_dcp_checkpoint`'s question: a folder whose train_state.pt or metadata cannot be read
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
    except Exception:  # unreadable: listed, and rejected by verify_dcp_checkpoint
        return True


def verify_dcp_checkpoint(path):
    """Raises CheckpointError unless the folder `path` is an intact sharded checkpoint: its
    train_state.pt verifies, its metadata reads safely, its files are all present with the sizes
    and CRC-32s recorded at commit (folders written before checksums were recorded: present and
    long enough) and its non-tensor entries load with weights_only=True. Reads every byte once."""
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


class _SafeReader(dcp.FileSystemReader):
    """FileSystemReader whose .metadata goes through the restricted unpickler. read_metadata takes
    no **kwargs on purpose: DCP then never falls back to (unchecked) per-rank metadata files."""

    def read_metadata(self):
        metadata = read_dcp_metadata(os.fspath(self.path))
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _WeightsOnlyPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner whose non-tensor entries (optimizer hyper-parameters) load with
    torch.load(weights_only=True); DCP's default unpickles them with weights_only=False."""

    def load_bytes(self, read_item, value):
        try:
            obj = torch.load(value, weights_only=True)
        except Exception as e:
            raise CheckpointError(f"sharded checkpoint entry {read_item.dest_index.fqn!r} holds objects a "
                                  f"checkpoint never holds (rejected, nothing ran): {e}") from e
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def dcp_load(state, path, no_dist=None):
    """dcp.load of `state` (in place) from the DCP folder `path`, reading nothing unsafely.
    Collective unless no_dist (default: no process group)."""
    no_dist = not is_distributed() if no_dist is None else no_dist
    dcp.load(state, storage_reader=_SafeReader(path), planner=_WeightsOnlyPlanner(), no_dist=no_dist)


def read_dcp_ema(path):
    """{name: full fp32 CPU tensor} of the EMA weights in the DCP folder `path`, read in this one
    process whatever world size wrote it (call `verify_dcp_checkpoint` first)."""
    entries = read_dcp_metadata(path).state_dict_metadata
    ema = {key[len("ema."):]: torch.empty(md.size, dtype=md.properties.dtype)
           for key, md in entries.items() if key.startswith("ema.") and isinstance(md, TensorStorageMetadata)}
    if not ema:
        raise CheckpointError(f"sharded checkpoint {path!r} holds no EMA weights")
    dcp_load({"ema": ema}, path, no_dist=True)
    return ema


def dcp_model_shapes(path):
    """{name: shape} of the model weights in the DCP folder `path`, from its metadata."""
    entries = read_dcp_metadata(path).state_dict_metadata
    return {k[len("model."):]: tuple(md.size) for k, md in entries.items()
            if k.startswith("model.") and isinstance(md, TensorStorageMetadata)}


def sharded_state(model, optimizer, ema):
    """The tensors of a training state as DCP wants them: {"model": {fqn: tensor}, "optimizer":
    {"state": {fqn: {...}}, "param_groups": [...]}, "ema": {name: tensor}}, sharded (DTensor) under
    FSDP2, plain otherwise; views of the live storage (loading into it restores in place)."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optimizer": optim_sd, "ema": ema.state_dict()}


def commit(tmp, final, train_state):
    """Turns the folder `tmp`, which DCP has finished writing, into the checkpoint `final` (rank 0):
    the checksums of its files go into its train_state.pt (written last), then it is renamed.
    A previous run's checkpoint of the same step (e.g. after a rollback) is replaced."""
    train_state = dict(train_state, **{FILES_KEY: dcp_file_checksums(tmp)})  # checked on every load
    atomic_save(train_state, os.path.join(tmp, TRAIN_STATE))
    if os.path.exists(final):
        shutil.rmtree(final) if os.path.isdir(final) else os.unlink(final)
    os.replace(tmp, final)
    fsync_dir(os.path.dirname(os.path.abspath(final)))
