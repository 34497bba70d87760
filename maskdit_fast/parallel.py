"""Process groups and model wrappers on PyTorch's own distributed stack (torchrun, DDP, FSDP2, DTensor).

Small composable functions in the torchtitan style; the trainer applies them in this order:

    info = init_distributed("auto")                       # torchrun env -> process group, device
    model = build_model(...).to(info.device)
    apply_activation_checkpointing(model, "selective")     # per block (encoder and decoder)
    apply_compile(model)                                   # torch.compile per block (or scope="model")
    model = apply_fsdp(model, param_dtype=torch.bfloat16)  # fully_shard per block, then the root
      (or model = apply_ddp(model, info))

plus the collectives the trainer needs (barrier, any_rank, all_reduce_mean, ...) and the helpers
that see through the wrappers (unwrap, parameter_names, clip_grad_norm_ and nonfinite over DTensor
shards). The EMA of a sharded model is `maskdit_fast.ema.ShardedEMA`, throughput / MFU
`maskdit_fast.metrics`, sharded checkpoints `maskdit_fast.checkpoint`.

Everything also runs in one process without torchrun (world size 1, no process group), and on CPU
with the gloo back-end (how the tests run it). The model's fused ops are torch.library custom ops,
so they compose with torch.compile, activation checkpointing and FSDP2 without special cases.
"""
import contextlib
import dataclasses
import datetime
import gc
import inspect
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

AC_MODES = ("none", "full", "selective")
COMPILE_SCOPES = ("blocks", "model")
PARALLEL_MODES = ("none", "ddp", "fsdp")


# ----------------------------------------------------------------------------------------- process group
@dataclasses.dataclass(frozen=True)
class DistInfo:
    """Where this process sits: rank / world_size / local_rank (all 0 / 1 / 0 without torchrun),
    its torch.device, and the process-group back-end ("gloo", "cpu:gloo,cuda:nccl" or None when no
    process group was created)."""
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: object = None

    @property
    def is_main(self):
        """True on rank 0 (the rank that logs and writes single-writer files)."""
        return self.rank == 0

    @property
    def distributed(self):
        """True when a process group is initialised (launched by torchrun, any world size)."""
        return self.backend is not None


def _env_int(name, default):
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise RuntimeError(f"environment variable {name}={value!r} is not an integer") from None


def init_distributed(device="auto", timeout_s=1800):
    """Initialises torch.distributed from the torchrun environment, once per process.

    Launched by torchrun (WORLD_SIZE, RANK, LOCAL_RANK and MASTER_ADDR set), every process joins the
    default process group: nccl for CUDA tensors (with gloo beside it for CPU-side collectives such as
    asynchronous checkpointing), gloo on CPU. Without torchrun nothing is initialised (world size 1).

    Args:
        device: "auto" (cuda:LOCAL_RANK when CUDA is available, else cpu), "cpu", "cuda" (=
            cuda:LOCAL_RANK) or an explicit "cuda:N".
        timeout_s: collective timeout in seconds (a dead rank makes the others fail after it).
    Returns:
        DistInfo. Raises RuntimeError for CUDA requested without CUDA, fewer GPUs than local ranks,
        or an inconsistent environment.
    """
    world_size, rank, local_rank = _env_int("WORLD_SIZE", 1), _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    launched = "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ
    if not 0 <= rank < world_size:
        raise RuntimeError(f"RANK={rank} is outside [0, WORLD_SIZE={world_size})")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {device} requested but CUDA is not available")
        if device.index is None:
            if local_rank >= torch.cuda.device_count():
                raise RuntimeError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPUs are visible")
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise RuntimeError(f"distributed training supports cpu and cuda devices, got {device}")
    if not launched:
        if world_size != 1:
            raise RuntimeError(f"WORLD_SIZE={world_size} but MASTER_ADDR is unset: launch with torchrun")
        return DistInfo(0, 1, 0, device, None)
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, backend)


def is_distributed():
    """True when a process group is initialised (launched by torchrun, any world size)."""
    return dist.is_available() and dist.is_initialized()


def global_rank():
    """This process's rank in the default process group (0 without one)."""
    return dist.get_rank() if is_distributed() else 0


def _world_size():
    return dist.get_world_size() if is_distributed() else 1


def destroy_distributed():
    """Tears every process group down (no-op without one).

    A barrier first, so no rank still has collectives in flight, and a garbage collection before
    and after, so no gloo work object (and the tensors it holds) outlives its group: one that is
    only freed during interpreter shutdown aborts the process ("terminate called without an active
    exception")."""
    if is_distributed():
        dist.barrier()
        gc.collect()
        dist.destroy_process_group()
        gc.collect()


def barrier():
    """dist.barrier() when a process group exists, else nothing."""
    if is_distributed():
        dist.barrier()


def all_reduce_mean(values):
    """Mean over ranks of a float tensor (any shape, any device the group supports); the tensor
    itself without a process group. Returns a new tensor."""
    out = values.detach().clone()
    if _world_size() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        out /= dist.get_world_size()
    return out


def any_rank(flag):
    """True on every rank when `flag` is true on at least one (a CPU all-reduce; gloo serves it
    beside nccl); the flag itself without a process group."""
    if _world_size() == 1:
        return bool(flag)
    t = torch.tensor([int(bool(flag))])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def broadcast_object(obj):
    """Rank 0's `obj` (picklable) on every rank; `obj` itself without a process group."""
    if _world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def rank0_call(fn):
    """fn() on rank 0 only; its exception re-raised there and, as a RuntimeError with its message,
    on every other rank (which would otherwise wait for rank 0 in the next collective).
    Collective. Returns fn's result on rank 0, None elsewhere."""
    result, error = None, None
    if global_rank() == 0:
        try:
            result = fn()
        except Exception as e:
            error = e
    message = broadcast_object(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    if message is not None:
        raise RuntimeError(f"rank 0: {message}")
    return result


def all_gather_floats(value):
    """[value of rank 0, value of rank 1, ...] for a python float (a list of one without a group)."""
    if _world_size() == 1:
        return [float(value)]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, float(value))
    return out


# ------------------------------------------------------------------------------------------- wrappers
def unwrap(model):
    """The user module inside DDP (`.module`); FSDP2, per-block compile and checkpoint wrappers
    keep the module itself, so anything else is returned unchanged."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def parameter_names(model):
    """State-dict names of `model.parameters()` (of the module inside DDP), in that order: the
    checkpoint keys, free of wrapper prefixes such as activation checkpointing's."""
    module = unwrap(model)
    name_of = {id(t): k for k, t in module.state_dict(keep_vars=True).items()}
    return [name_of[id(p)] for p in module.parameters()]


def local_tensor(t):
    """This rank's shard of a DTensor (FSDP2 parameters, EMA, optimizer state); any other tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def transformer_blocks(model):
    """The repeated blocks of a DiT / MaskDiT (`blocks`, then MaskDiT's `decoder_blocks`) as
    (ModuleList, index) pairs, so wrappers can replace them in place."""
    model = unwrap(model)
    found = [(blocks, i) for attr in ("blocks", "decoder_blocks")
             for blocks in [getattr(model, attr, None)] if isinstance(blocks, nn.ModuleList)
             for i in range(len(blocks))]
    if not found:
        raise TypeError(f"{type(model).__name__} has no `blocks` ModuleList (expected a DiT / MaskDiT)")
    return found


class _DDP(nn.parallel.DistributedDataParallel):
    """DDP that reads missing attributes from the wrapped model (patch_size, num_patches, config,
    ...), so code written for the bare model (EDMPrecond, the loss) takes the DDP module as is.

    Methods of the wrapped model are not handed out: running one would skip DDP's forward, whose
    hooks synchronise the gradients (the replicas would silently diverge). Every computation goes
    through the wrapper's call; `unwrap(model).method` reaches them deliberately."""

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            module = super().__getattr__("module")
            value = getattr(module, name)
            if inspect.ismethod(value):
                raise AttributeError(
                    f"DDP does not hand out {type(module).__name__}.{name}: calling it would bypass DDP's "
                    f"forward and its gradient sync; call the DDP module itself, or unwrap(model).{name} "
                    f"outside training") from None
            return value


def apply_ddp(model, info, find_unused_parameters=False):
    """Wraps `model` (already on info.device) in DistributedDataParallel.

    Args:
        find_unused_parameters: needed when some parameter gets no gradient in a step (MaskDiT's
            mask token in unmasked steps); costs a graph traversal per step.
    Returns:
        the DDP module (a DistributedDataParallel; the model's own attributes read through).
    """
    if not is_distributed():
        raise RuntimeError("apply_ddp needs an initialised process group: launch with torchrun")
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return _DDP(model, device_ids=device_ids, find_unused_parameters=find_unused_parameters)


def apply_fsdp(model, param_dtype=None, reduce_dtype=torch.float32, reshard_after_forward=True):
    """Shards `model` with FSDP2: `fully_shard` on every transformer block (encoder and decoder),
    then on the root (embedders, decoder layer, mask token, final layer). In place.

    Parameters stay fp32 shards (the optimizer and EMA work on them); `param_dtype` is what the
    all-gathered compute copies use (torch.bfloat16 for bf16 training, None = keep fp32) and
    `reduce_dtype` the gradient reduce-scatter dtype.

    Args:
        model: a DiT / MaskDiT on its training device, after activation checkpointing / compile.
        reshard_after_forward: free the gathered block parameters after forward (ZeRO-3, less
            memory, one more all-gather in backward); False keeps them until backward (ZeRO-2).
            The root is never resharded after forward (its parameters are needed first in backward).
    Returns:
        the same module, now an FSDPModule.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    if not is_distributed():
        raise RuntimeError("apply_fsdp needs an initialised process group: launch with torchrun")
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise TypeError("apply_fsdp: got a DDP module; use either DDP or FSDP")
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for blocks, i in transformer_blocks(model):
        fully_shard(blocks[i], mp_policy=mp, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mp_policy=mp, reshard_after_forward=False)
    return model


def clip_grad_norm_(model, max_norm):
    """torch.nn.utils.clip_grad_norm_ over the model's parameters (plain, DDP or FSDP2-sharded
    gradients alike; max_norm=inf only measures). Returns the total norm before clipping as a 0-d
    tensor on the gradients' device, the same on every rank (no host sync: read it together with
    the step's other numbers). A non-finite norm leaves non-finite or zero gradients: skip the step."""
    norm = nn.utils.clip_grad_norm_(unwrap(model).parameters(), max_norm)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def nonfinite(tensors):
    """0-d float32 tensor on the tensors' device: 1.0 when any local element (this rank's shard of a
    DTensor) is NaN or infinite, else 0.0; no host sync (one max-abs reduction per tensor, fused by
    torch._foreach_norm)."""
    local = [local_tensor(t).detach() for t in tensors]
    local = [t for t in local if t.numel()]
    if not local:
        return torch.zeros(())
    peak = torch.stack([n.float() for n in torch._foreach_norm(local, float("inf"))]).max()
    return (~torch.isfinite(peak)).float()  # max propagates NaN


@contextlib.contextmanager
def gradient_sync(model, enabled):
    """Context for one micro-batch's backward: with enabled=False gradients accumulate locally
    (DDP no_sync; FSDP2 keeps unsharded gradients and skips the reduce-scatter), so only the last
    micro-batch of a step communicates. A plain module is unaffected."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        with (contextlib.nullcontext() if enabled else model.no_sync()):
            yield
        return
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2 root
        model.set_requires_gradient_sync(enabled)
    yield


def apply_compile(model, backend="inductor", fullgraph=False, dynamic=None, scope="blocks", mode="default"):
    """torch.compile in place (`nn.Module.compile`: the parameter names and state_dict keys do not
    change), per transformer block or the whole model. Call before apply_fsdp / apply_ddp.

    scope "blocks" compiles each block: compile time stays at one block's (the blocks share one
    graph), FSDP2's hooks stay between blocks, and token counts that change with the mask ratio
    become dynamic after the first recompilation (dynamic=None). scope "model" compiles the whole
    forward (embedders, encoder, decoder, head) as one graph: fusion across block boundaries and
    fewer launches, but one specialisation per input shape (dynamic=False unless given: each
    kept-token count compiles once; the trainer allows only static-shape schedules with it).

    Args:
        backend: torch.compile backend ("inductor"; "aot_eager" needs no C++ compiler).
        fullgraph, dynamic: passed to torch.compile.
        scope: "blocks" | "model" (COMPILE_SCOPES).
        mode: torch.compile mode ("default", "max-autotune-no-cudagraphs", "reduce-overhead" =
            inductor's CUDA graphs, "max-autotune" = both); inductor only.
    Returns:
        the model.
    """
    if scope not in COMPILE_SCOPES:
        raise ValueError(f"compile scope must be one of {COMPILE_SCOPES}, got {scope!r}")
    kwargs = dict(backend=backend, fullgraph=fullgraph, mode=None if mode == "default" else mode)
    if scope == "model":
        unwrap(model).compile(dynamic=False if dynamic is None else dynamic, **kwargs)
        return model
    for blocks, i in transformer_blocks(model):
        blocks[i].compile(dynamic=dynamic, **kwargs)
    return model


def _matmul_ops():
    """Ops whose outputs selective checkpointing saves: matmuls and attention (aten and the
    package's Triton attention custom ops); everything else is recomputed in backward."""
    names = ["mm", "addmm", "bmm", "baddbmm", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
             "_scaled_dot_product_flash_attention_for_cpu", "_scaled_mm"]
    found = [getattr(torch.ops.aten, n).default for n in names if hasattr(torch.ops.aten, n)]
    import maskdit_fast.ops.attention  # noqa: F401  (registers the maskdit_fast attention ops)
    for n in ("varlen_attn_fwd", "varlen_attn_qkvpacked_fwd"):
        found.append(getattr(torch.ops.maskdit_fast, n).default)
    return frozenset(found)


def _selective_context():
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts
    saved = _matmul_ops()

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in saved else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def apply_activation_checkpointing(model, mode):
    """Activation checkpointing of every transformer block, in place (before compile / FSDP).

    Args:
        mode: "none"; "full" (keep only each block's input, recompute the whole block in
            backward); "selective" (per-op: keep the outputs of matmuls and attention, recompute
            the cheap LayerNorm / modulation / GELU / residual ops).
    Returns:
        the model. State-dict keys are unchanged (the wrapper's hooks strip its prefix).
    """
    if mode not in AC_MODES:
        raise ValueError(f"activation checkpointing mode must be one of {AC_MODES}, got {mode!r}")
    if mode == "none":
        return model
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    kwargs = dict(preserve_rng_state=False)  # the blocks draw no random numbers
    if mode == "selective":
        kwargs["context_fn"] = _selective_context
    for blocks, i in transformer_blocks(model):
        blocks[i] = checkpoint_wrapper(blocks[i], **kwargs)
    return model
