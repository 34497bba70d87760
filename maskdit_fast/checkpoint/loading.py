"""Loading checkpoints of either format (a `step_*.pt` file or a sharded `step_*` folder) into a
model, optimizer and EMA of any world size and parallelism, verified and architecture-checked
before anything changes; and the EMA weights as one safetensors file.
"""
import os

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, set_model_state_dict,
                                                     set_state_dict)

from maskdit_fast.checkpoint.files import CheckpointError, export_safetensors, load_checkpoint, verify_zip
from maskdit_fast.checkpoint.sharded import (TRAIN_STATE, dcp_load, dcp_model_shapes, read_dcp_ema, sharded_state,
                                             verify_dcp_checkpoint)
from maskdit_fast.parallel import barrier, global_rank, is_distributed, parameter_names, unwrap


def verify_checkpoint(path):
    """Raises CheckpointError (FileNotFoundError when absent) unless `path` is an intact
    checkpoint: a `.pt` file whose zip CRC-32s match, or a sharded folder that passes
    `verify_dcp_checkpoint` (checksums of every file, safe metadata and non-tensor entries)."""
    if os.path.isdir(path):
        verify_dcp_checkpoint(path)
    elif os.path.isfile(path):
        verify_zip(path)
    else:
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")


def verify_everywhere(path):
    """verify_checkpoint(path) on rank 0 with its verdict raised on every rank (a CheckpointError,
    or FileNotFoundError when absent): rank 0 alone reads the files. Collective."""
    error = None
    if global_rank() == 0:
        try:
            verify_checkpoint(path)
        except (CheckpointError, FileNotFoundError) as e:
            error = e
    if is_distributed():
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
        return dcp_model_shapes(path), load_checkpoint(os.path.join(path, TRAIN_STATE)).get("meta")
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


def _apply_state(model, optimizer, ema, state, full):
    options = StateDictOptions(full_state_dict=full)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=options)
    ema.load_state_dict(state["ema"])


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
        dcp_load(state, path)
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
        dcp_load(state, path)
        set_model_state_dict(model, state["model"])
        ema.load_state_dict(state["ema"])
        return int(extra["step"])
    ckpt = load_checkpoint(path, map_location=map_location, required=("model", "ema", "step"))
    check_architecture(path, model, {k: tuple(v.shape) for k, v in ckpt["model"].items()}, ckpt.get("meta"))
    set_model_state_dict(model, ckpt["model"], options=StateDictOptions(full_state_dict=True))
    ema.load_state_dict(ckpt["ema"])
    return int(ckpt["step"])


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
    verify_dcp_checkpoint(path)
    return read_dcp_ema(path), load_checkpoint(os.path.join(path, TRAIN_STATE)).get("meta")


def export_ema_safetensors(ema, path, metadata=None):
    """Gathers the (possibly sharded) EMA weights and writes them, unsharded fp32, as one
    safetensors file from rank 0 (atomic). Collective: every rank must call it.

    Returns:
        the gathered {name: fp32 CPU tensor} on rank 0 (e.g. to sample from), {} on other ranks.
    """
    full = ema.full_state_dict(rank0_only=True)
    if global_rank() == 0:
        export_safetensors(full, path, metadata=metadata)
    barrier()
    return full
