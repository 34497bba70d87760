"""Sharded, crash-safe, world-size independent checkpoints with torch.distributed.checkpoint (DCP).

A checkpoint is a directory `step_XXXXXXXX/` beside the single-process `step_XXXXXXXX.pt` files of
`maskdit_fast.checkpoint`:

    step_00001000/.metadata, __0_0.distcp, ...   model, optimizer and EMA tensors (DCP, every rank
                                                 writes its own shards)
    step_00001000/train_state.pt                 rank 0: step, data position, RNG states, config,
                                                 size and CRC-32 of every other file (plain
                                                 containers, loads with weights_only=True)

Atomic: every rank writes into `step_XXXXXXXX.tmp/`; once DCP has committed its metadata (which
happens only after all ranks' writes finished) rank 0 checksums the files, adds train_state.pt and
renames the directory to its final name. A crash or a killed rank mid-save leaves a stray `.tmp`
directory, never a half-written checkpoint; it is removed by the next save.

Safe and verified loading: every load first verifies the checkpoint (rank 0 reads every file
against its checksums; all ranks get the verdict), checks that its model matches the architecture
being loaded into, and reads through DCP with `.metadata` parsed by a restricted unpickler
(`maskdit_fast.checkpoint.read_dcp_metadata`) and non-tensor entries by torch.load(weights_only=
True): no code from the files runs (DCP's defaults unpickle both freely).

Resharding: tensors are stored with their global shapes and FQN keys (torch.distributed.checkpoint.
state_dict.get_state_dict), so a checkpoint saved by N ranks under FSDP2 loads on M ranks under
FSDP2, DDP or in one process, and a single-file checkpoint loads into a sharded run
(`load_training_state`). The consolidated EMA weights export to one safetensors file, from a
running job (`export_ema_safetensors`) or from any checkpoint on one machine, without a GPU:

    python -m maskdit_fast.dist_checkpoint runs/x/checkpoints/step_00010000 ema.safetensors
"""
import argparse
import json
import os
import shutil
import threading

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)

from maskdit_fast.checkpoint import (FILES_KEY, TRAIN_STATE, CheckpointDirectory, CheckpointError, _fsync_dir,
                                     atomic_save, dcp_file_checksums, export_safetensors, load_checkpoint,
                                     prune_checkpoints, read_dcp_metadata, verify_checkpoint)
from maskdit_fast.parallel import barrier, parameter_names, unwrap


def _distributed():
    return dist.is_available() and dist.is_initialized()


def _rank():
    return dist.get_rank() if _distributed() else 0


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


def _dcp_load(state, path):
    """dcp.load of `state` (in place) from the DCP folder `path`, reading nothing unsafely."""
    dcp.load(state, storage_reader=_SafeReader(path), planner=_WeightsOnlyPlanner(), no_dist=not _distributed())


def verify_everywhere(path):
    """verify_checkpoint(path) on rank 0 with its verdict raised on every rank (a CheckpointError,
    or FileNotFoundError when absent): rank 0 alone reads the files. Collective."""
    error = None
    if _rank() == 0:
        try:
            verify_checkpoint(path)
        except (CheckpointError, FileNotFoundError) as e:
            error = e
    if _distributed():
        verdict = [None if error is None else (isinstance(error, FileNotFoundError), str(error))]
        dist.broadcast_object_list(verdict, src=0)
        if verdict[0] is not None and error is None:
            error = (FileNotFoundError if verdict[0][0] else CheckpointError)(verdict[0][1])
    if error is not None:
        raise error


def saved_model(path):
    """({name: shape} of the model weights, model metadata dict or None) of a checkpoint of either
    format, without reading its tensors (DCP: its metadata and train_state.pt; .pt: memory-mapped)."""
    if os.path.isdir(path):
        entries = read_dcp_metadata(path).state_dict_metadata
        shapes = {k[len("model."):]: tuple(md.size) for k, md in entries.items()
                  if k.startswith("model.") and isinstance(md, TensorStorageMetadata)}
        return shapes, load_checkpoint(os.path.join(path, TRAIN_STATE)).get("meta")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise CheckpointError(f"checkpoint {path!r} is unreadable: {type(e).__name__}: {e}") from e
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise CheckpointError(f"checkpoint {path!r} has no 'model' weights")
    return {k: tuple(v.shape) for k, v in ckpt["model"].items()}, ckpt.get("meta")


def check_architecture(path, model, saved=None, meta=None):
    """Raises ValueError naming what differs when the checkpoint `path` (its model weights' names
    and shapes `saved` and model metadata `meta`; both read from it when `saved` is None) was not
    written by the architecture of `model` (plain, DDP or FSDP2: global shapes compared)."""
    if saved is None:
        saved, meta = saved_model(path)
    live = {k: tuple(v.shape) for k, v in unwrap(model).state_dict().items()}
    missing, unexpected = sorted(live.keys() - saved.keys()), sorted(saved.keys() - live.keys())
    shapes = [f"{k} {saved[k]} vs {live[k]}" for k in sorted(live.keys() & saved.keys()) if saved[k] != live[k]]
    if not (missing or unexpected or shapes):
        return
    parts = []
    config = getattr(unwrap(model), "config", None)
    if isinstance(meta, dict) and isinstance(meta.get("model_config"), dict) and isinstance(config, dict):
        ours = {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}
        differ = [f"{k} {meta['model_config'].get(k)!r} vs {v!r}" for k, v in ours.items()
                  if meta["model_config"].get(k) != v]
        if differ:
            parts.append("model config (checkpoint vs this run): " + ", ".join(differ))
    if missing:
        parts.append(f"{len(missing)} weights of this model are not in the checkpoint, e.g. {missing[:3]}")
    if unexpected:
        parts.append(f"{len(unexpected)} checkpoint weights are not in this model, e.g. {unexpected[:3]}")
    if shapes:
        parts.append(f"{len(shapes)} shapes differ (checkpoint vs this model), e.g. {shapes[:3]}")
    raise ValueError(f"checkpoint {path!r} was written by a different architecture than this run's model: "
                     + "; ".join(parts) + ". Build the model the checkpoint was trained with (--model, "
                     "--model-kwargs) or start without it.")


def sharded_state(model, optimizer, ema):
    """The tensors of a training state as DCP wants them: {"model": {fqn: tensor}, "optimizer":
    {"state": {fqn: {...}}, "param_groups": [...]}, "ema": {name: tensor}}, sharded (DTensor) under
    FSDP2, plain otherwise; views of the live storage (loading into it restores in place)."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optimizer": optim_sd, "ema": ema.state_dict()}


def _apply_state(model, optimizer, ema, state, full):
    options = StateDictOptions(full_state_dict=full)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=options)
    ema.load_state_dict(state["ema"])


def optimizer_state_by_name(optimizer_state, model):
    """A torch-native optimizer state dict (parameters numbered in `model.parameters()` order, as
    the single-process checkpoints store it) keyed by parameter name instead, the form
    set_state_dict takes. Raises ValueError when the counts do not match."""
    names = parameter_names(model)
    groups = optimizer_state["param_groups"]
    ids = [i for g in groups for i in g["params"]]
    if sorted(ids) != list(range(len(names))):
        raise ValueError(f"optimizer state covers parameters {ids[:3]}... but the model has {len(names)}")
    return {"state": {names[i]: s for i, s in optimizer_state["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in groups]}


def load_training_state(path, model, optimizer, ema, map_location="cpu", required=("step",), verify=True):
    """Restores model, optimizer and EMA from either checkpoint format, whatever the world size and
    parallelism of the run that wrote it; returns the rest of the state (step, data position, RNG,
    config, ...: the train_state.pt dict, or the single-file dict minus its tensors' entries).

    Every rank must call it. The checkpoint is verified first (CheckpointError when corrupt,
    incomplete or unsafe, before anything is changed) and its architecture checked against the
    model (ValueError). A single-file checkpoint is read by every rank (full tensors) and copied
    into the local shards.

    Args:
        path: a `step_*.pt` file or a DCP `step_*` directory.
        model: plain, DDP or FSDP2 module; optimizer: built over its parameters; ema: ShardedEMA.
        required: entries the non-tensor state must have (CheckpointError otherwise).
        verify: False skips the verification of a sharded checkpoint that `verify_everywhere`
            has just passed (a .pt file's CRC-32s are checked as it loads, always).
    """
    if os.path.isdir(path):
        if verify:
            verify_everywhere(path)
        extra = load_checkpoint(os.path.join(path, TRAIN_STATE), required=required)
        check_architecture(path, model)
        state = sharded_state(model, optimizer, ema)
        _dcp_load(state, path)
        _apply_state(model, optimizer, ema, state, full=False)
        return extra
    ckpt = load_checkpoint(path, map_location=map_location, required=("model", "optimizer", "ema") + tuple(required))
    check_architecture(path, model, {k: tuple(v.shape) for k, v in ckpt["model"].items()}, ckpt.get("meta"))
    state = {"model": ckpt.pop("model"), "optimizer": optimizer_state_by_name(ckpt.pop("optimizer"), model),
             "ema": ckpt.pop("ema")}
    _apply_state(model, optimizer, ema, state, full=True)
    return ckpt


def load_weights(path, model, ema, map_location="cpu", verify=True):
    """Model and EMA weights only (a new training stage, e.g. unmasked fine-tuning: fresh optimizer
    and step counter) from either checkpoint format, at any world size, verified (unless verify=
    False, as `load_training_state`) and architecture-checked first. Every rank must call it.
    Returns the step the checkpoint was taken at."""
    if os.path.isdir(path):
        if verify:
            verify_everywhere(path)
        extra = load_checkpoint(os.path.join(path, TRAIN_STATE), required=("step",))
        check_architecture(path, model)
        state = {"model": get_model_state_dict(model), "ema": ema.state_dict()}
        _dcp_load(state, path)
        set_model_state_dict(model, state["model"])
        ema.load_state_dict(state["ema"])
        return int(extra["step"])
    ckpt = load_checkpoint(path, map_location=map_location, required=("model", "ema", "step"))
    check_architecture(path, model, {k: tuple(v.shape) for k, v in ckpt["model"].items()}, ckpt.get("meta"))
    set_model_state_dict(model, ckpt["model"], options=StateDictOptions(full_state_dict=True))
    ema.load_state_dict(ckpt["ema"])
    return int(ckpt["step"])


class DistCheckpointManager(CheckpointDirectory):
    """DCP checkpoints `step_XXXXXXXX/` in one directory (shared by all ranks), keeping the newest
    `keep_last` of both formats; see the module docstring for the layout and the commit protocol.

    Args:
        directory: created by rank 0 if needed (must be on a file system every rank sees).
        keep_last: checkpoints kept (>= 1).
        async_save: write in a background thread (dcp.async_save): `save` returns after the state
            is staged to CPU memory; the checkpoint appears when the write completes. Call
            `wait()` before exit (`close()` does). Needs a process group (torchrun); a single
            process without one saves synchronously.
    Every method except `steps` / `latest` must be called by all ranks.
    """

    def __init__(self, directory, keep_last=3, async_save=False):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.directory, self.keep_last, self.async_save = directory, keep_last, async_save and _distributed()
        self.rank = _rank()
        if self.rank == 0:
            os.makedirs(directory, exist_ok=True)
        barrier()
        self._pending, self._committer, self._error = None, None, None
        self._group = None
        if self.async_save:
            # the background thread's collectives get their own gloo group: sharing the training
            # group would interleave them with the training collectives (and NCCL needs the main
            # thread's CUDA streams)
            self._group = dist.new_group(backend="gloo")

    def path(self, step):
        return os.path.join(self.directory, f"step_{step:08d}")

    def save(self, step, model, optimizer, ema, train_state):
        """Writes model, optimizer and EMA (sharded) plus `train_state` (a dict of plain
        containers and small tensors, e.g. step, data position and RNG states; rank 0's is kept)
        as step `step`. Waits for a previous asynchronous save first. Returns the final path."""
        self.wait()
        final, tmp = self.path(step), self.path(step) + ".tmp"
        if self.rank == 0:
            prune_checkpoints(self.directory, self.keep_last)  # also clears a crashed save's temp dirs
        barrier()
        state = sharded_state(model, optimizer, ema)
        if not self.async_save:
            dcp.save(state, checkpoint_id=tmp, no_dist=not _distributed())
            if self.rank == 0:
                self._commit(tmp, final, train_state)
            barrier()
            return final
        result = dcp.async_save(state, checkpoint_id=tmp, process_group=self._group)
        future = result if hasattr(result, "add_done_callback") else result.upload_completion
        if self.rank == 0:  # commits once the write is done, without blocking training
            self._committer = threading.Thread(target=self._commit_async, args=(future, tmp, final, train_state))
            self._committer.start()
        self._pending = future
        return final

    def _commit_async(self, future, tmp, final, train_state):
        try:
            future.result()
            self._commit(tmp, final, train_state)
        except BaseException as e:  # re-raised on the main thread by wait()
            self._error = e

    def _commit(self, tmp, final, train_state):
        train_state = dict(train_state, **{FILES_KEY: dcp_file_checksums(tmp)})  # checked on every load
        atomic_save(train_state, os.path.join(tmp, TRAIN_STATE))
        if os.path.exists(final):  # a previous run's checkpoint of the same step (e.g. after a rollback)
            shutil.rmtree(final) if os.path.isdir(final) else os.unlink(final)
        os.replace(tmp, final)
        _fsync_dir(self.directory)
        prune_checkpoints(self.directory, self.keep_last)

    def wait(self):
        """Blocks until a pending asynchronous save is written and committed; re-raises its error."""
        if self._pending is not None:
            try:
                self._pending.result()
                if self._committer is not None:
                    self._committer.join()
            finally:
                self._pending = self._committer = None
            barrier()  # every rank sees the committed directory afterwards
        error, self._error = self._error, None
        if error is not None:
            raise RuntimeError(f"asynchronous checkpoint save failed: {error}") from error

    def close(self):
        """wait(), then frees the background process group."""
        self.wait()
        if self._group is not None:
            dist.destroy_process_group(self._group)
            self._group = None


def export_ema_safetensors(ema, path, metadata=None):
    """Gathers the (possibly sharded) EMA weights and writes them, unsharded fp32, as one
    safetensors file from rank 0 (atomic). Collective: every rank must call it.

    Returns:
        the gathered {name: fp32 CPU tensor} on rank 0 (e.g. to sample from), {} on other ranks.
    """
    full = ema.full_state_dict(rank0_only=True)
    if _rank() == 0:
        export_safetensors(full, path, metadata=metadata)
    barrier()
    return full


def load_ema_state(path):
    """The EMA weights of a checkpoint of either format, verified, full and in this one process (no
    process group needed; a DCP checkpoint is read whatever world size wrote it, nothing in it
    unpickled unsafely).

    Returns:
        ({name: full fp32 CPU tensor}, the checkpoint's model metadata dict or None).
    """
    if not os.path.isdir(path):
        ckpt = load_checkpoint(path, required=("ema",))
        return ckpt["ema"], ckpt.get("meta")
    verify_checkpoint(path)
    reader = _SafeReader(path)
    entries = reader.read_metadata().state_dict_metadata
    ema = {key[len("ema."):]: torch.empty(md.size, dtype=md.properties.dtype)
           for key, md in entries.items() if key.startswith("ema.") and isinstance(md, TensorStorageMetadata)}
    if not ema:
        raise CheckpointError(f"sharded checkpoint {path!r} holds no EMA weights")
    dcp.load({"ema": ema}, storage_reader=reader, planner=_WeightsOnlyPlanner(), no_dist=True)
    return ema, load_checkpoint(os.path.join(path, TRAIN_STATE)).get("meta")


def main(argv=None):
    """CLI: the EMA weights of a checkpoint (DCP directory or .pt) -> one safetensors file, with the
    model metadata that `maskdit_fast.sample` needs to rebuild the network."""
    parser = argparse.ArgumentParser(prog="python -m maskdit_fast.dist_checkpoint",
                                     description="Export a checkpoint's EMA weights as one safetensors file.")
    parser.add_argument("checkpoint", help="a step_XXXXXXXX directory (DCP) or step_XXXXXXXX.pt file")
    parser.add_argument("output", help="the .safetensors file to write")
    args = parser.parse_args(argv)
    ema, meta = load_ema_state(args.checkpoint)
    export_safetensors(ema, args.output, metadata={"maskdit_fast": json.dumps(meta)} if meta else None)
    print(f"{len(ema)} EMA tensors ({sum(t.numel() for t in ema.values()) / 1e6:.2f}M values) -> {args.output}")


if __name__ == "__main__":
    main()
