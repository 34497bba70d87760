"""Mask gather/scatter: the token shuffling around MaskDiT's encoder.

gather_tokens:         [B, L, D] (+ pos_embed [L, D])                  -> [B, K, D]  (encoder input)
scatter_tokens:        [B, K, D] + mask_token [D] (+ pos_embed [L, D]) -> [B, L, D]  (decoder input)
gather_tokens_varlen:  [B, L, D] (+ pos_embed) -> [T, D] packed, sample b owning rows cu[b]:cu[b+1]
scatter_tokens_varlen: [T, D] packed + mask_token (+ pos_embed)          -> [B, L, D]

Every op has a plain PyTorch reference (`*_ref`, the spec) and a Triton back-end registered as
torch.library custom ops (namespace `maskdit_fast`, with fake implementations and autograd), so the
ops work under torch.compile, FSDP2 and activation checkpointing. Gradients of pos_embed and
mask_token are reduced deterministically (no float atomics).

Input checking: shapes, dtypes and devices are always checked. Index values (range, duplicates,
cu_seqlens consistency) are checked too unless `validate=False` or MASKDIT_FAST_VALIDATE=0; that check
waits for the device, so turn it off in hot loops whose indices are known to be good (the check is
also skipped while torch.compile traces). With invalid indices and validation off, results are
undefined.
"""
import os
from typing import Optional, Tuple

import torch
from torch import Tensor

from maskdit_fast.backend import resolve_backend, result_dtype
from maskdit_fast.indexing import batch_size, sample_index

VALIDATE_ENV_VAR = "MASKDIT_FAST_VALIDATE"


# ---------------------------------------------------------------------------------------------------
# References (the spec)
# ---------------------------------------------------------------------------------------------------

def gather_tokens_ref(x, ids_keep, pos_embed=None):
    """Reference (the spec). x [B, L, D], ids_keep [B, K] int64, pos_embed [L, D] or [1, L, D]
    -> [B, K, D] with out[b, k] = x[b, ids_keep[b, k]] + pos_embed[ids_keep[b, k]]."""
    if pos_embed is not None:
        x = x + pos_embed.reshape(1, x.shape[1], x.shape[2])
    return torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def scatter_tokens_ref(x_kept, ids_keep, mask_token, length, pos_embed=None):
    """Reference (the spec). x_kept [B, K, D], ids_keep [B, K] int64 (distinct positions in
    [0, length)), mask_token [D] (any shape with D elements), pos_embed [L, D] or [1, L, D]
    -> [B, L, D]: x_kept at the kept positions, mask_token elsewhere, plus pos_embed."""
    B, K, D = x_kept.shape
    out = mask_token.reshape(1, 1, D).to(x_kept.dtype).expand(B, length, D).clone()
    out.scatter_(1, ids_keep.unsqueeze(-1).expand(-1, -1, D), x_kept)
    if pos_embed is not None:
        out = out + pos_embed.reshape(1, length, D)
    return out


def gather_tokens_varlen_ref(x, ids_packed, cu_seqlens, pos_embed=None):
    """Reference (the spec). x [B, L, D], ids_packed [T] int64 (position within its sample),
    cu_seqlens [B+1] int32, pos_embed [L, D] or [1, L, D]
    -> [T, D] with out[t] = x[b, ids_packed[t]] + pos_embed[ids_packed[t]], b the sample owning t."""
    if pos_embed is not None:
        x = x + pos_embed.reshape(1, x.shape[1], x.shape[2])
    return x[sample_index(ids_packed, cu_seqlens), ids_packed]


def scatter_tokens_varlen_ref(x_packed, ids_packed, cu_seqlens, mask_token, length, pos_embed=None):
    """Reference (the spec). x_packed [T, D], ids_packed [T] int64 (distinct positions in
    [0, length) within each sample), cu_seqlens [B+1] int32, mask_token D elements, pos_embed [L, D]
    or [1, L, D] -> [B, L, D]: packed rows at their positions, mask_token elsewhere, plus pos_embed."""
    D = x_packed.shape[-1]
    B = batch_size(ids_packed, cu_seqlens)
    out = mask_token.reshape(1, 1, D).to(x_packed.dtype).expand(B, length, D).clone()
    out[sample_index(ids_packed, cu_seqlens), ids_packed] = x_packed
    if pos_embed is not None:
        out = out + pos_embed.reshape(1, length, D)
    return out


# ---------------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------------

def validation_enabled(validate=None):
    """Whether index values are checked: `validate` if given, else MASKDIT_FAST_VALIDATE (default on)."""
    if validate is not None:
        return bool(validate)
    return os.environ.get(VALIDATE_ENV_VAR, "1") not in ("0", "false", "False", "")


def _check_float(t, name, dims):
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if t.dim() not in dims:
        raise ValueError(f"{name} must have {' or '.join(map(str, dims))} dims, got shape {tuple(t.shape)}")


def _check_device(device, **tensors):
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device} but the tokens are on {device}")


def _check_layout(ids, cu_seqlens, device):
    """ids int64 [B, K] (cu_seqlens None) or [T] with cu_seqlens int32/int64 [B+1]."""
    if not isinstance(ids, Tensor) or ids.dtype != torch.int64:
        raise TypeError(f"ids must be an int64 tensor, got {getattr(ids, 'dtype', type(ids).__name__)}")
    if cu_seqlens is None:
        if ids.dim() != 2:
            raise ValueError(f"ids_keep must be [B, K], got shape {tuple(ids.shape)}")
    else:
        if ids.dim() != 1:
            raise ValueError(f"ids_packed must be [T], got shape {tuple(ids.shape)}")
        if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise TypeError("cu_seqlens must be an int32 (or int64) tensor")
        if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 1:
            raise ValueError(f"cu_seqlens must be [B+1], got shape {tuple(cu_seqlens.shape)}")
    _check_device(device, ids=ids, cu_seqlens=cu_seqlens)


def _check_embedding(t, name, shapes, device):
    if t is None:
        return
    _check_float(t, name, (1, 2, 3))
    if tuple(t.shape) not in shapes:
        raise ValueError(f"{name} must have shape {' or '.join(map(str, shapes))}, got {tuple(t.shape)}")
    _check_device(device, **{name: t})


def _check_id_values(ids, cu_seqlens, length, validate):
    """Index values, one host sync: positions in [0, length), distinct within each sample, and
    cu_seqlens starting at 0, non-decreasing, ending at T."""
    if not validation_enabled(validate) or torch.compiler.is_compiling():
        return
    flat = ids.reshape(-1)
    checks = {}
    if cu_seqlens is not None:
        cu = cu_seqlens.to(torch.int64)
        checks["cu_seqlens must start at 0, be non-decreasing and end at len(ids_packed)"] = (
            (cu[0] != 0) | (cu[-1] != flat.numel()) | (cu.diff() < 0).any())
    if flat.numel():
        checks[f"ids out of range [0, {length})"] = (flat < 0).any() | (flat >= length).any()
        key = (sample_index(ids, cu_seqlens) * length + flat).sort().values
        checks["duplicate ids within a sample"] = (key[1:] == key[:-1]).any()
    if not checks:
        return
    for message, bad in zip(checks, torch.stack(list(checks.values())).tolist()):
        if bad:
            raise ValueError(message)


def _check_gather(x, ids, cu_seqlens, pos_embed, validate):
    _check_float(x, "x", (3,))
    _check_layout(ids, cu_seqlens, x.device)
    B, L, D = x.shape
    if cu_seqlens is None and (ids.shape[0] != B or ids.shape[1] > L):
        raise ValueError(f"ids_keep {tuple(ids.shape)} does not fit x {tuple(x.shape)}: need [B, K <= L]")
    if cu_seqlens is not None and cu_seqlens.shape[0] != B + 1:
        raise ValueError(f"cu_seqlens has {cu_seqlens.shape[0]} entries, expected B+1 = {B + 1}")
    _check_embedding(pos_embed, "pos_embed", ((L, D), (1, L, D)), x.device)
    _check_id_values(ids, cu_seqlens, L, validate)


def _check_scatter(src, ids, cu_seqlens, mask_token, length, pos_embed, validate):
    _check_float(src, "x_kept" if cu_seqlens is None else "x_packed", (3,) if cu_seqlens is None else (2,))
    _check_layout(ids, cu_seqlens, src.device)
    if tuple(src.shape[:-1]) != tuple(ids.shape):
        raise ValueError(f"tokens {tuple(src.shape)} and ids {tuple(ids.shape)} disagree")
    if not isinstance(length, (int, torch.SymInt)) or length < (ids.shape[1] if cu_seqlens is None else 0):
        raise ValueError(f"length must be an int >= tokens kept per sample, got {length!r}")
    D = src.shape[-1]
    _check_float(mask_token, "mask_token", (1, 2, 3))
    if mask_token.numel() != D:
        raise ValueError(f"mask_token must have D = {D} elements, got shape {tuple(mask_token.shape)}")
    _check_device(src.device, mask_token=mask_token)
    _check_embedding(pos_embed, "pos_embed", ((length, D), (1, length, D)), src.device)
    _check_id_values(ids, cu_seqlens, length, validate)


# ---------------------------------------------------------------------------------------------------
# Triton back-end: custom ops with fake implementations and autograd
# ---------------------------------------------------------------------------------------------------

def _kernels():
    # imported on first use: importing triton is slow and must follow TRITON_INTERPRET being set
    from maskdit_fast.kernels import gather_scatter
    return gather_scatter


def _contiguous(t):
    return None if t is None else t.contiguous()


@torch.library.custom_op("maskdit_fast::gather_tokens", mutates_args=())
def _gather_op(x: Tensor, ids: Tensor, cu_seqlens: Optional[Tensor], pos_embed: Optional[Tensor]) -> Tensor:
    return _kernels().gather_fwd(x, ids.contiguous(), cu_seqlens, _contiguous(pos_embed))


@_gather_op.register_fake
def _(x, ids, cu_seqlens, pos_embed):
    return x.new_empty((*ids.shape, x.shape[-1]), dtype=result_dtype(x, pos_embed))


@torch.library.custom_op("maskdit_fast::gather_tokens_backward", mutates_args=())
def _gather_bwd_op(grad: Tensor, ids: Tensor, cu_seqlens: Optional[Tensor], length: int,
                   x_dtype: torch.dtype, pos_grad: bool, pos_dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    return _kernels().gather_bwd(grad.contiguous(), ids.contiguous(), cu_seqlens, length, x_dtype,
                                 pos_grad, pos_dtype)


@_gather_bwd_op.register_fake
def _(grad, ids, cu_seqlens, length, x_dtype, pos_grad, pos_dtype):
    D = grad.shape[-1]
    return (grad.new_empty((batch_size(ids, cu_seqlens), length, D), dtype=x_dtype),
            grad.new_empty((length, D) if pos_grad else (0,), dtype=pos_dtype))


def _gather_setup(ctx, inputs, output):
    x, ids, cu_seqlens, pos_embed = inputs
    ctx.save_for_backward(ids, cu_seqlens)
    ctx.length, ctx.x_dtype = x.shape[1], x.dtype
    ctx.pos_shape = None if pos_embed is None else pos_embed.shape
    ctx.pos_dtype = x.dtype if pos_embed is None else pos_embed.dtype


def _gather_backward(ctx, grad):
    ids, cu_seqlens = ctx.saved_tensors
    pos_grad = ctx.pos_shape is not None and ctx.needs_input_grad[3]
    dx, dpos = _gather_bwd_op(grad, ids, cu_seqlens, ctx.length, ctx.x_dtype, pos_grad, ctx.pos_dtype)
    return dx, None, None, dpos.reshape(ctx.pos_shape) if pos_grad else None


_gather_op.register_autograd(_gather_backward, setup_context=_gather_setup)


@torch.library.custom_op("maskdit_fast::scatter_tokens", mutates_args=())
def _scatter_op(src: Tensor, ids: Tensor, cu_seqlens: Optional[Tensor], mask_token: Tensor, length: int,
                pos_embed: Optional[Tensor]) -> Tensor:
    return _kernels().scatter_fwd(src.contiguous(), ids.contiguous(), cu_seqlens, mask_token.contiguous(),
                                  length, _contiguous(pos_embed))


@_scatter_op.register_fake
def _(src, ids, cu_seqlens, mask_token, length, pos_embed):
    return src.new_empty((batch_size(ids, cu_seqlens), length, src.shape[-1]),
                         dtype=result_dtype(src, pos_embed))


@torch.library.custom_op("maskdit_fast::scatter_tokens_backward", mutates_args=())
def _scatter_bwd_op(grad: Tensor, ids: Tensor, cu_seqlens: Optional[Tensor], src_dtype: torch.dtype,
                    fill_grad: bool, fill_dtype: torch.dtype, pos_grad: bool,
                    pos_dtype: torch.dtype) -> Tuple[Tensor, Tensor, Tensor]:
    return _kernels().scatter_bwd(grad.contiguous(), ids.contiguous(), cu_seqlens, src_dtype, fill_grad,
                                  fill_dtype, pos_grad, pos_dtype)


@_scatter_bwd_op.register_fake
def _(grad, ids, cu_seqlens, src_dtype, fill_grad, fill_dtype, pos_grad, pos_dtype):
    _, L, D = grad.shape
    return (grad.new_empty((*ids.shape, D), dtype=src_dtype),
            grad.new_empty((D,) if fill_grad else (0,), dtype=fill_dtype),
            grad.new_empty((L, D) if pos_grad else (0,), dtype=pos_dtype))


def _scatter_setup(ctx, inputs, output):
    src, ids, cu_seqlens, mask_token, length, pos_embed = inputs
    ctx.save_for_backward(ids, cu_seqlens)
    ctx.src_dtype = src.dtype
    ctx.fill_shape, ctx.fill_dtype = mask_token.shape, mask_token.dtype
    ctx.pos_shape = None if pos_embed is None else pos_embed.shape
    ctx.pos_dtype = src.dtype if pos_embed is None else pos_embed.dtype


def _scatter_backward(ctx, grad):
    ids, cu_seqlens = ctx.saved_tensors
    fill_grad = ctx.needs_input_grad[3]
    pos_grad = ctx.pos_shape is not None and ctx.needs_input_grad[5]
    dsrc, dfill, dpos = _scatter_bwd_op(grad, ids, cu_seqlens, ctx.src_dtype, fill_grad, ctx.fill_dtype,
                                        pos_grad, ctx.pos_dtype)
    return (dsrc, None, None, dfill.reshape(ctx.fill_shape) if fill_grad else None, None,
            dpos.reshape(ctx.pos_shape) if pos_grad else None)


_scatter_op.register_autograd(_scatter_backward, setup_context=_scatter_setup)


def _cuda_op(name):
    from maskdit_fast.ops import cuda_backend  # imported on first use, like the Triton kernels
    return getattr(cuda_backend, name)


# ---------------------------------------------------------------------------------------------------
# Public ops
# ---------------------------------------------------------------------------------------------------

def gather_tokens(x, ids_keep, pos_embed=None, *, backend=None, validate=None):
    """Gathers the kept tokens, optionally adding the position embedding in the same pass.

    out[b, k] = x[b, ids_keep[b, k]] + pos_embed[ids_keep[b, k]]. Backward: grad x is the output grad
    scattered into zeros; grad pos_embed is its sum over samples (deterministic).

    Args:
        x: [B, L, D] float tokens (any strides; the transposed patch-embedding output is read in place).
        ids_keep: [B, K] int64 distinct kept positions in [0, L) per sample (K may be 0).
        pos_embed: optional [L, D] (or [1, L, D]) float, added before gathering.
        backend: "torch" | "triton" | "cuda" | "auto" | None (global default).
        validate: check index values (range, duplicates); None reads MASKDIT_FAST_VALIDATE (default on).
    Returns:
        [B, K, D], dtype of x promoted with pos_embed's (as `x + pos_embed` would be).
    """
    _check_gather(x, ids_keep, None, pos_embed, validate)
    name = resolve_backend(backend, x.device)
    if name == "torch":
        return gather_tokens_ref(x, ids_keep, pos_embed)
    if name == "cuda":
        return _cuda_op("gather_tokens")(x, ids_keep, pos_embed)
    return _gather_op(x, ids_keep, None, pos_embed)


def scatter_tokens(x_kept, ids_keep, mask_token, length, pos_embed=None, *, backend=None, validate=None):
    """Scatters kept tokens back onto the full grid, filling masked positions with mask_token
    and adding the (decoder) position embedding in the same pass.

    out[b, l] = (x_kept[b, k] if ids_keep[b, k] == l else mask_token) + pos_embed[l], the mask token
    rounded to x_kept's dtype first. Backward: grad x_kept gathers the output grad; grad mask_token
    sums it over the masked positions and grad pos_embed over samples (deterministic, no atomics).

    Args:
        x_kept: [B, K, D] float encoder tokens (after the decoder-input projection).
        ids_keep: [B, K] int64 distinct positions in [0, length).
        mask_token: D elements ([D] or [1, 1, D]), float, learned token for masked positions.
        length: L, tokens per sample on the full grid.
        pos_embed: optional [L, D] (or [1, L, D]) float.
        backend: "torch" | "triton" | "cuda" | "auto" | None (global default).
        validate: check index values (range, duplicates); None reads MASKDIT_FAST_VALIDATE (default on).
    Returns:
        [B, L, D], dtype of x_kept promoted with pos_embed's.
    """
    _check_scatter(x_kept, ids_keep, None, mask_token, length, pos_embed, validate)
    name = resolve_backend(backend, x_kept.device)
    if name == "torch":
        return scatter_tokens_ref(x_kept, ids_keep, mask_token, length, pos_embed)
    if name == "cuda":
        return _cuda_op("scatter_tokens")(x_kept, ids_keep, mask_token, length, pos_embed)
    return _scatter_op(x_kept, ids_keep, None, mask_token, length, pos_embed)


def gather_tokens_varlen(x, ids_packed, cu_seqlens, pos_embed=None, *, backend=None, validate=None):
    """Packed gather for per-sample keep counts (the varlen attention layout).

    Sample b keeps len_b = cu_seqlens[b+1] - cu_seqlens[b] tokens, stored at rows
    cu_seqlens[b]:cu_seqlens[b+1] of the output: out[t] = x[b, ids_packed[t]] + pos_embed[ids_packed[t]].

    Args:
        x: [B, L, D] float tokens (any strides).
        ids_packed: [T] int64 position within its sample of each packed token, distinct per sample.
        cu_seqlens: [B+1] int32 (or int64) cumulative keep counts, cu_seqlens[0] = 0, cu_seqlens[B] = T.
        pos_embed: optional [L, D] (or [1, L, D]) float.
        backend, validate: as for gather_tokens.
    Returns:
        [T, D], dtype of x promoted with pos_embed's.
    """
    _check_gather(x, ids_packed, cu_seqlens, pos_embed, validate)
    name = resolve_backend(backend, x.device, cuda_impl=False)
    if name == "torch":
        return gather_tokens_varlen_ref(x, ids_packed, cu_seqlens, pos_embed)
    return _gather_op(x, ids_packed, cu_seqlens, pos_embed)


def scatter_tokens_varlen(x_packed, ids_packed, cu_seqlens, mask_token, length, pos_embed=None, *,
                          backend=None, validate=None):
    """Packed scatter: the inverse layout of gather_tokens_varlen, with mask_token at the positions a
    sample did not keep and pos_embed added; B = len(cu_seqlens) - 1.

    Args:
        x_packed: [T, D] float packed tokens, sample b owning rows cu_seqlens[b]:cu_seqlens[b+1].
        ids_packed: [T] int64 position of each row within its sample, distinct per sample, < length.
        cu_seqlens: [B+1] int32 (or int64).
        mask_token: D elements, float.
        length: L, tokens per sample on the full grid.
        pos_embed: optional [L, D] (or [1, L, D]) float.
        backend, validate: as for scatter_tokens.
    Returns:
        [B, L, D], dtype of x_packed promoted with pos_embed's.
    """
    _check_scatter(x_packed, ids_packed, cu_seqlens, mask_token, length, pos_embed, validate)
    name = resolve_backend(backend, x_packed.device, cuda_impl=False)
    if name == "torch":
        return scatter_tokens_varlen_ref(x_packed, ids_packed, cu_seqlens, mask_token, length, pos_embed)
    return _scatter_op(x_packed, ids_packed, cu_seqlens, mask_token, length, pos_embed)
