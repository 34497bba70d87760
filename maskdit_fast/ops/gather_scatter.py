"""Mask gather/scatter: the token shuffling around MaskDiT's encoder.

gather_tokens:         [B, L, D] (+ pos_embed [L, D])                  -> [B, K, D]  (encoder input)
scatter_tokens:        [B, K, D] + mask_token [D] (+ pos_embed [L, D]) -> [B, L, D]  (decoder input)
gather_tokens_varlen:  [B, L, D] (+ pos_embed) -> [T, D] packed, sample b owning rows cu[b]:cu[b+1]
scatter_tokens_varlen: [T, D] packed + mask_token (+ pos_embed)          -> [B, L, D]

This file holds, top to bottom: the references (`*_ref`, the spec), the input checks (run once, by the public
ops), the Triton op (kernels/gather_scatter.py), the CUDA op (csrc/gather_scatter.cu: dense layout only) and the
public ops that dispatch between them and the reference. Gradients of pos_embed and mask_token are reduced
deterministically (no float atomics).

Input checking: shapes, dtypes and devices are always checked. Index values (range, duplicates, cu_seqlens
consistency) are checked too unless `validate=False` or MASKDIT_FAST_VALIDATE=0; that check waits for the
device, so turn it off in hot loops whose indices are known to be good (the check is also skipped while
torch.compile traces). With invalid indices and validation off, results are undefined.
"""
import os

import torch
from torch import Tensor

from maskdit_fast.backend import define_op, on_extension_load, resolve_backend, result_dtype
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


def _check_device(t, name, device):
    if t.device != device:
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
        _check_device(cu_seqlens, "cu_seqlens", device)
    _check_device(ids, "ids", device)


def _check_embedding(t, name, shapes, device):
    if t is None:
        return
    _check_float(t, name, (1, 2, 3))
    if tuple(t.shape) not in shapes:
        raise ValueError(f"{name} must have shape {' or '.join(map(str, shapes))}, got {tuple(t.shape)}")
    _check_device(t, name, device)


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
    _check_device(mask_token, "mask_token", src.device)
    _check_embedding(pos_embed, "pos_embed", ((length, D), (1, length, D)), src.device)
    _check_id_values(ids, cu_seqlens, length, validate)



# ---------------------------------------------------------------------------------------------------- Triton op
_kernels = None


def _triton():
    """kernels/gather_scatter.py, imported on first use: importing triton is slow and must follow TRITON_INTERPRET."""
    global _kernels
    if _kernels is None:
        from maskdit_fast.kernels import gather_scatter
        _kernels = gather_scatter
    return _kernels


def _contiguous(t):
    return None if t is None else t.contiguous()


def _gather_fwd(x, ids, cu_seqlens, pos_embed):
    return _triton().gather_fwd(x, ids.contiguous(), cu_seqlens, _contiguous(pos_embed))


def _gather_bwd(grad, ids, cu_seqlens, length, x_dtype, pos_grad, pos_dtype):
    return _triton().gather_bwd(grad.contiguous(), ids.contiguous(), cu_seqlens, length, x_dtype, pos_grad, pos_dtype)


def _scatter_fwd(src, ids, cu_seqlens, mask_token, length, pos_embed):
    return _triton().scatter_fwd(src.contiguous(), ids.contiguous(), cu_seqlens, mask_token.contiguous(), length,
                                 _contiguous(pos_embed))


def _scatter_bwd(grad, ids, inv, src_dtype, fill_grad, fill_dtype, pos_grad, pos_dtype):
    return _triton().scatter_bwd(grad.contiguous(), ids, inv, src_dtype, fill_grad, fill_dtype, pos_grad, pos_dtype)


def _gather_fake(x, ids, cu_seqlens, pos_embed):
    return x.new_empty((*ids.shape, x.shape[-1]), dtype=result_dtype(x, pos_embed))


def _gather_bwd_fake(grad, ids, cu_seqlens, length, x_dtype, pos_grad, pos_dtype):
    D = grad.shape[-1]
    return (grad.new_empty((batch_size(ids, cu_seqlens), length, D), dtype=x_dtype),
            grad.new_empty((length, D) if pos_grad else (0,), dtype=pos_dtype))


def _scatter_fake(src, ids, cu_seqlens, mask_token, length, pos_embed):
    batch = batch_size(ids, cu_seqlens)
    return (src.new_empty((batch, length, src.shape[-1]), dtype=result_dtype(src, pos_embed)),
            ids.new_empty((batch, length), dtype=torch.int32))


def _scatter_bwd_fake(grad, ids, inv, src_dtype, fill_grad, fill_dtype, pos_grad, pos_dtype):
    _, L, D = grad.shape
    return (grad.new_empty((*ids.shape, D), dtype=src_dtype), grad.new_empty((D,) if fill_grad else (0,), dtype=fill_dtype),
            grad.new_empty((L, D) if pos_grad else (0,), dtype=pos_dtype))


_lib = torch.library.Library("maskdit_fast", "FRAGMENT")
_gather_op = define_op(_lib, "gather_tokens(Tensor x, Tensor ids, Tensor? cu_seqlens, Tensor? pos_embed) -> Tensor",
                       _gather_fwd, _gather_fake)
_gather_bwd_op = define_op(_lib, "gather_tokens_backward(Tensor grad, Tensor ids, Tensor? cu_seqlens, SymInt length, "
                                 "ScalarType x_dtype, bool pos_grad, ScalarType pos_dtype) -> (Tensor, Tensor)",
                           _gather_bwd, _gather_bwd_fake)
# The forward also returns the inverse map (the row kept at each grid position, int32 [B, L]) its backward reuses.
_scatter_op = define_op(_lib, "scatter_tokens(Tensor src, Tensor ids, Tensor? cu_seqlens, Tensor mask_token, "
                              "SymInt length, Tensor? pos_embed) -> (Tensor, Tensor)", _scatter_fwd, _scatter_fake)
_scatter_bwd_op = define_op(_lib, "scatter_tokens_backward(Tensor grad, Tensor ids, Tensor inv, ScalarType src_dtype, "
                                  "bool fill_grad, ScalarType fill_dtype, bool pos_grad, ScalarType pos_dtype) "
                                  "-> (Tensor, Tensor, Tensor)", _scatter_bwd, _scatter_bwd_fake)


class _TritonGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ids, cu_seqlens, pos_embed):
        ctx.save_for_backward(ids, cu_seqlens)
        ctx.length, ctx.x_dtype = x.shape[1], x.dtype
        ctx.pos_shape = None if pos_embed is None else pos_embed.shape
        ctx.pos_dtype = x.dtype if pos_embed is None else pos_embed.dtype
        return _gather_op(x, ids, cu_seqlens, pos_embed)

    @staticmethod
    def backward(ctx, grad):
        ids, cu_seqlens = ctx.saved_tensors
        pos_grad = ctx.pos_shape is not None and ctx.needs_input_grad[3]
        dx, dpos = _gather_bwd_op(grad, ids, cu_seqlens, ctx.length, ctx.x_dtype, pos_grad, ctx.pos_dtype)
        return dx, None, None, dpos.view(ctx.pos_shape) if pos_grad else None


class _TritonScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, src, ids, cu_seqlens, mask_token, length, pos_embed):
        out, inv = _scatter_op(src, ids, cu_seqlens, mask_token, length, pos_embed)
        ctx.mark_non_differentiable(inv)
        ctx.set_materialize_grads(False)  # no zero-filled grad for inv
        ctx.save_for_backward(ids, inv)
        ctx.src_dtype = src.dtype
        ctx.fill_shape, ctx.fill_dtype = mask_token.shape, mask_token.dtype
        ctx.pos_shape = None if pos_embed is None else pos_embed.shape
        ctx.pos_dtype = src.dtype if pos_embed is None else pos_embed.dtype
        return out, inv

    @staticmethod
    def backward(ctx, grad, _grad_inv):
        ids, inv = ctx.saved_tensors
        fill_grad = ctx.needs_input_grad[3]
        pos_grad = ctx.pos_shape is not None and ctx.needs_input_grad[5]
        dsrc, dfill, dpos = _scatter_bwd_op(grad, ids, inv, ctx.src_dtype, fill_grad, ctx.fill_dtype, pos_grad,
                                            ctx.pos_dtype)
        return (dsrc, None, None, dfill.view(ctx.fill_shape) if fill_grad else None, None,
                dpos.view(ctx.pos_shape) if pos_grad else None)


# ---------------------------------------------------------------------------------------------------- CUDA op
# csrc/gather_scatter.cu defines torch.ops.maskdit_fast_C.{gather_tokens, scatter_tokens}[_backward] (dense layout)
# and names this module as the home of their fake implementations (torch imports it to find them). Its kernels take
# one dtype (float32, float16 or bfloat16), contiguous tensors, pos_embed [L, D] and mask_token [D]; index errors
# stop the kernel with a device-side assert. Backward ops return an empty [0] tensor for a gradient that was not
# asked for.
_CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _cuda_gather_fake(x, ids_keep, pos_embed):
    return x.new_empty((x.shape[0], ids_keep.shape[1], x.shape[2]))


def _cuda_gather_bwd_fake(grad_out, ids_keep, length, pos_grad):
    B, _K, D = grad_out.shape
    return grad_out.new_empty((B, length, D)), grad_out.new_empty((length, D) if pos_grad else (0,))


def _cuda_scatter_fake(x_kept, ids_keep, mask_token, length, pos_embed):
    return x_kept.new_empty((x_kept.shape[0], length, x_kept.shape[2]))


def _cuda_scatter_bwd_fake(grad_out, ids_keep, mask_grad, pos_grad):
    B, L, D = grad_out.shape
    return (grad_out.new_empty((B, ids_keep.shape[1], D)), grad_out.new_empty((D,) if mask_grad else (0,)),
            grad_out.new_empty((L, D) if pos_grad else (0,)))


CUDA_FAKES = {"gather_tokens": _cuda_gather_fake, "gather_tokens_backward": _cuda_gather_bwd_fake,
              "scatter_tokens": _cuda_scatter_fake, "scatter_tokens_backward": _cuda_scatter_bwd_fake}

on_extension_load(CUDA_FAKES, lambda name, fake: torch.library.register_fake(name, fake))


class _CudaGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ids_keep, pos_embed):
        ctx.save_for_backward(ids_keep)
        ctx.length = x.shape[1]
        return torch.ops.maskdit_fast_C.gather_tokens(x, ids_keep, pos_embed)

    @staticmethod
    def backward(ctx, grad):
        (ids_keep,) = ctx.saved_tensors
        pos_grad = ctx.needs_input_grad[2]
        dx, dpos = torch.ops.maskdit_fast_C.gather_tokens_backward(grad.contiguous(), ids_keep, ctx.length, pos_grad)
        return dx if ctx.needs_input_grad[0] else None, None, dpos if pos_grad else None


class _CudaScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_kept, ids_keep, mask_token, length, pos_embed):
        ctx.save_for_backward(ids_keep)
        return torch.ops.maskdit_fast_C.scatter_tokens(x_kept, ids_keep, mask_token, length, pos_embed)

    @staticmethod
    def backward(ctx, grad):
        (ids_keep,) = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, dfill, dpos = torch.ops.maskdit_fast_C.scatter_tokens_backward(grad.contiguous(), ids_keep, need[2], need[4])
        return dx if need[0] else None, None, dfill if need[2] else None, None, dpos if need[4] else None


def _cuda_cast(t, dtype):
    """A differentiable cast + contiguous copy only when needed (autograd routes the grads back)."""
    if dtype not in _CUDA_DTYPES:
        raise TypeError(f"backend 'cuda' supports float32, float16 and bfloat16 tensors, got {dtype}")
    return None if t is None else t.to(dtype).contiguous()


def _cuda_gather(x, ids_keep, pos_embed):
    dtype = result_dtype(x, pos_embed)
    pos = None if pos_embed is None else _cuda_cast(pos_embed, dtype).view(x.shape[1], x.shape[2])
    return _CudaGather.apply(_cuda_cast(x, dtype), ids_keep.contiguous(), pos)


def _cuda_scatter(x_kept, ids_keep, mask_token, length, pos_embed):
    dtype = result_dtype(x_kept, pos_embed)
    D = x_kept.shape[-1]
    fill = _cuda_cast(mask_token.reshape(D).to(x_kept.dtype), dtype)  # rounded to x_kept's dtype, as the reference
    pos = None if pos_embed is None else _cuda_cast(pos_embed, dtype).view(length, D)
    return _CudaScatter.apply(_cuda_cast(x_kept, dtype), ids_keep.contiguous(), fill, length, pos)


# ---------------------------------------------------------------------------------------------------- public ops
def gather_tokens(x, ids_keep, pos_embed=None, *, backend=None, validate=None):
    """Gathers the kept tokens, optionally adding the position embedding in the same pass.

    out[b, k] = x[b, ids_keep[b, k]] + pos_embed[ids_keep[b, k]]. Backward: grad x is the output grad scattered
    into zeros; grad pos_embed is its sum over samples (deterministic).

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
    name = resolve_backend(backend, x.device, op="gather_tokens")
    if name == "torch":
        return gather_tokens_ref(x, ids_keep, pos_embed)
    if name == "cuda":
        return _cuda_gather(x, ids_keep, pos_embed)
    return _TritonGather.apply(x, ids_keep, None, pos_embed)


def scatter_tokens(x_kept, ids_keep, mask_token, length, pos_embed=None, *, backend=None, validate=None):
    """Scatters kept tokens back onto the full grid, filling masked positions with mask_token and adding the
    (decoder) position embedding in the same pass.

    out[b, l] = (x_kept[b, k] if ids_keep[b, k] == l else mask_token) + pos_embed[l], the mask token rounded to
    x_kept's dtype first. Backward: grad x_kept gathers the output grad; grad mask_token sums it over the masked
    positions and grad pos_embed over samples (deterministic, no atomics).

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
    name = resolve_backend(backend, x_kept.device, op="scatter_tokens")
    if name == "torch":
        return scatter_tokens_ref(x_kept, ids_keep, mask_token, length, pos_embed)
    if name == "cuda":
        return _cuda_scatter(x_kept, ids_keep, mask_token, length, pos_embed)
    return _TritonScatter.apply(x_kept, ids_keep, None, mask_token, length, pos_embed)[0]


def gather_tokens_varlen(x, ids_packed, cu_seqlens, pos_embed=None, *, backend=None, validate=None):
    """Packed gather for per-sample keep counts (the varlen attention layout).

    Sample b keeps len_b = cu_seqlens[b+1] - cu_seqlens[b] tokens, stored at rows cu_seqlens[b]:cu_seqlens[b+1]
    of the output: out[t] = x[b, ids_packed[t]] + pos_embed[ids_packed[t]].

    Args:
        x: [B, L, D] float tokens (any strides).
        ids_packed: [T] int64 position within its sample of each packed token, distinct per sample.
        cu_seqlens: [B+1] int32 (or int64) cumulative keep counts, cu_seqlens[0] = 0, cu_seqlens[B] = T.
        pos_embed: optional [L, D] (or [1, L, D]) float.
        backend, validate: as for gather_tokens ("cuda" has no packed kernel: it runs the reference).
    Returns:
        [T, D], dtype of x promoted with pos_embed's.
    """
    _check_gather(x, ids_packed, cu_seqlens, pos_embed, validate)
    name = resolve_backend(backend, x.device, cuda_impl=False, op="gather_tokens_varlen")
    if name == "torch":
        return gather_tokens_varlen_ref(x, ids_packed, cu_seqlens, pos_embed)
    return _TritonGather.apply(x, ids_packed, cu_seqlens, pos_embed)


def scatter_tokens_varlen(x_packed, ids_packed, cu_seqlens, mask_token, length, pos_embed=None, *,
                          backend=None, validate=None):
    """Packed scatter: the inverse layout of gather_tokens_varlen, with mask_token at the positions a sample did
    not keep and pos_embed added; B = len(cu_seqlens) - 1.

    Args:
        x_packed: [T, D] float packed tokens, sample b owning rows cu_seqlens[b]:cu_seqlens[b+1].
        ids_packed: [T] int64 position of each row within its sample, distinct per sample, < length.
        cu_seqlens: [B+1] int32 (or int64).
        mask_token: D elements, float.
        length: L, tokens per sample on the full grid.
        pos_embed: optional [L, D] (or [1, L, D]) float.
        backend, validate: as for scatter_tokens ("cuda" has no packed kernel: it runs the reference).
    Returns:
        [B, L, D], dtype of x_packed promoted with pos_embed's.
    """
    _check_scatter(x_packed, ids_packed, cu_seqlens, mask_token, length, pos_embed, validate)
    name = resolve_backend(backend, x_packed.device, cuda_impl=False, op="scatter_tokens_varlen")
    if name == "torch":
        return scatter_tokens_varlen_ref(x_packed, ids_packed, cu_seqlens, mask_token, length, pos_embed)
    return _TritonScatter.apply(x_packed, ids_packed, cu_seqlens, mask_token, length, pos_embed)[0]

