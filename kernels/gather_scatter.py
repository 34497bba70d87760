"""Triton kernels for MaskDiT's token gather/scatter (dense [B, K] and packed/varlen layouts).

Both layouts reduce to "packed rows": N kept rows (N = B*K dense, T varlen), row r holding position
ids[r] of sample seg[r]. The forward gather walks the N rows. Everything that writes the full
[B, L, D] grid (scatter forward, gather backward, scatter backward) walks grid positions (l, column
block) and loops over a chunk of samples b, reading inv[b, l] (the packed row kept at (b, l), or -1):
the position-embedding row is loaded once per program, and the reductions over samples (pos_embed and
mask_token grads) are deterministic: each program sums its chunk in registers and writes one partial
row, and the launcher sums the partials with torch (no float atomics).

Token counts (L, K, T) and the per-program loop bounds are runtime arguments, so a new mask ratio does
not recompile; only the column block width BLOCK_D and the feature flags are compile-time constants.
Launchers expect validated inputs (maskdit_fast.ops.gather_scatter checks them).
"""
import torch
import triton
import triton.language as tl

from maskdit_fast.kernels import _common
from maskdit_fast.ops.gather_scatter import batch_size, sample_index

BLOCK_CAP = 1024  # widest column block; D = 1152 runs as two blocks per row


@triton.jit
def _gather_fwd_kernel(
    out_ptr,      # [N, D] output rows, contiguous, dtype = promote(x, pos_embed)
    x_ptr,        # [B, L, D] source tokens, any strides (the patch embedding is often transposed)
    ids_ptr,      # [N] int64: position l within its sample of each output row
    seg_ptr,      # [N] int64: sample b of each output row
    pos_ptr,      # [L, D] contiguous position embedding (read only when HAS_POS)
    D,            # feature width
    stride_xb, stride_xl, stride_xd,  # element strides of x
    HAS_POS: tl.constexpr,   # add pos_embed[l] to the gathered row
    ACC: tl.constexpr,       # arithmetic dtype (fp32, or fp64 for fp64 inputs)
    BLOCK_D: tl.constexpr,   # columns per program
):
    # out[r] = x[seg[r], ids[r]] + pos_embed[ids[r]]; grid (N, cdiv(D, BLOCK_D))
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    pos = tl.load(ids_ptr + row)
    b = tl.load(seg_ptr + row)
    v = tl.load(x_ptr + b * stride_xb + pos * stride_xl + cols * stride_xd, mask=cmask).to(ACC)
    if HAS_POS:
        v += tl.load(pos_ptr + pos * D + cols, mask=cmask).to(ACC)
    tl.store(out_ptr + row * D + cols, v.to(out_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _scatter_fwd_kernel(
    out_ptr,      # [B, L, D] output grid, contiguous, dtype = promote(src, pos_embed)
    src_ptr,      # [N, D] kept rows (x_kept / x_packed), contiguous
    inv_ptr,      # [B, L] int64: packed row kept at (b, l), -1 where masked
    fill_ptr,     # [D] mask token (rounded to src's dtype before use, as the reference does)
    pos_ptr,      # [L, D] contiguous position embedding (read only when HAS_POS)
    B, L, D,      # samples, grid length, feature width
    B_PER_PROG,   # samples handled by one program (loop bound)
    HAS_POS: tl.constexpr,   # add pos_embed[l]
    ACC: tl.constexpr,       # arithmetic dtype
    BLOCK_D: tl.constexpr,   # columns per program
):
    # out[b, l] = (src[inv[b, l]] if kept else mask_token) + pos_embed[l]; grid (L * chunks, col blocks)
    pid = tl.program_id(0)
    l = (pid % L).to(tl.int64)
    b0 = (pid // L) * B_PER_PROG
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    fill = tl.load(fill_ptr + cols, mask=cmask).to(src_ptr.dtype.element_ty).to(ACC)
    if HAS_POS:
        pos = tl.load(pos_ptr + l * D + cols, mask=cmask).to(ACC)
    for b in range(b0, tl.minimum(b0 + B_PER_PROG, B)):
        grid_row = l + b * L
        r = tl.load(inv_ptr + grid_row)
        v = tl.load(src_ptr + r * D + cols, mask=cmask & (r >= 0), other=0.0).to(ACC)
        v = tl.where(r >= 0, v, fill)
        if HAS_POS:
            v += pos
        tl.store(out_ptr + grid_row * D + cols, v.to(out_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _gather_bwd_kernel(
    dx_ptr,       # [B, L, D] grad of x, contiguous (zeros at masked positions)
    dpos_ptr,     # [chunks, L, D] ACC-dtype partial sums of grad pos_embed (written when POS_GRAD)
    dy_ptr,       # [N, D] grad of the gathered rows, contiguous
    inv_ptr,      # [B, L] int64: packed row kept at (b, l), -1 where masked
    B, L, D,      # samples, grid length, feature width
    B_PER_PROG,   # samples summed by one program
    POS_GRAD: tl.constexpr,  # also reduce grad pos_embed over the program's samples
    ACC: tl.constexpr,       # accumulation dtype
    BLOCK_D: tl.constexpr,   # columns per program
):
    # dx[b, l] = dy[inv[b, l]] or 0; dpos_partial[chunk, l] = sum over the chunk's b of dx[b, l]
    pid = tl.program_id(0)
    l = (pid % L).to(tl.int64)
    chunk = pid // L
    b0 = chunk * B_PER_PROG
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    acc = tl.zeros([BLOCK_D], dtype=ACC)
    for b in range(b0, tl.minimum(b0 + B_PER_PROG, B)):
        grid_row = l + b * L
        r = tl.load(inv_ptr + grid_row)
        g = tl.load(dy_ptr + r * D + cols, mask=cmask & (r >= 0), other=0.0)
        tl.store(dx_ptr + grid_row * D + cols, g.to(dx_ptr.dtype.element_ty), mask=cmask)
        if POS_GRAD:
            acc += g.to(ACC)
    if POS_GRAD:
        tl.store(dpos_ptr + (chunk.to(tl.int64) * L + l) * D + cols, acc, mask=cmask)


@triton.jit
def _scatter_bwd_kernel(
    dsrc_ptr,     # [N, D] grad of the kept rows, contiguous
    dfill_ptr,    # [chunks, L, D] ACC-dtype partial sums of grad mask_token (written when FILL_GRAD)
    dpos_ptr,     # [chunks, L, D] ACC-dtype partial sums of grad pos_embed (written when POS_GRAD)
    dy_ptr,       # [B, L, D] grad of the scattered grid, contiguous
    inv_ptr,      # [B, L] int64: packed row kept at (b, l), -1 where masked
    B, L, D,      # samples, grid length, feature width
    B_PER_PROG,   # samples handled by one program
    FILL_GRAD: tl.constexpr,  # reduce dy over the masked positions of the program's samples
    POS_GRAD: tl.constexpr,   # reduce dy over the program's samples
    ACC: tl.constexpr,        # accumulation dtype
    BLOCK_D: tl.constexpr,    # columns per program
):
    # dsrc[inv[b, l]] = dy[b, l] where kept; partial sums of dy for mask_token (masked only) and pos_embed
    pid = tl.program_id(0)
    l = (pid % L).to(tl.int64)
    chunk = pid // L
    b0 = chunk * B_PER_PROG
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    acc_fill = tl.zeros([BLOCK_D], dtype=ACC)
    acc_pos = tl.zeros([BLOCK_D], dtype=ACC)
    for b in range(b0, tl.minimum(b0 + B_PER_PROG, B)):
        grid_row = l + b * L
        r = tl.load(inv_ptr + grid_row)
        g = tl.load(dy_ptr + grid_row * D + cols, mask=cmask)
        tl.store(dsrc_ptr + r * D + cols, g.to(dsrc_ptr.dtype.element_ty), mask=cmask & (r >= 0))
        if FILL_GRAD:
            acc_fill += tl.where(r < 0, g.to(ACC), 0.0)
        if POS_GRAD:
            acc_pos += g.to(ACC)
    part = (chunk.to(tl.int64) * L + l) * D + cols
    if FILL_GRAD:
        tl.store(dfill_ptr + part, acc_fill, mask=cmask)
    if POS_GRAD:
        tl.store(dpos_ptr + part, acc_pos, mask=cmask)


def inverse_map(ids, cu_seqlens, length):
    """[B, L] int64: the packed row kept at grid position (b, l), -1 where masked; no host sync."""
    batch = batch_size(ids, cu_seqlens)
    inv = torch.full((batch * length,), -1, dtype=torch.int64, device=ids.device)
    flat_ids = ids.reshape(-1)
    rows = torch.arange(flat_ids.numel(), device=ids.device)
    inv.scatter_(0, sample_index(ids, cu_seqlens) * length + flat_ids, rows)
    return inv.view(batch, length)


def _grid_config(n_cols, length, batch, reduce):
    """Launch geometry of the full-grid kernels: programs over (l, sample chunk) x column blocks.

    Returns (samples per program, sample chunks, grid, BLOCK_D). Without a reduction every program
    handles one sample; with one, the chunking (and so the summation order) depends on shapes only."""
    block = _common.block_d(n_cols, BLOCK_CAP)
    n_blocks = triton.cdiv(n_cols, block)
    per, chunks = _common.split(batch, length * n_blocks) if reduce else (1, batch)
    return per, chunks, (length * chunks, n_blocks), block


def gather_fwd(x, ids, cu_seqlens=None, pos_embed=None):
    """out[r] = x[seg[r], ids[r]] + pos_embed[ids[r]].

    x [B, L, D] (any strides); ids [B, K] (dense) or [T] with cu_seqlens [B+1] (packed), int64;
    pos_embed None or L*D elements, contiguous. Returns ids.shape + (D,), dtype promote(x, pos_embed).
    """
    _common.require_contiguous(ids, "ids")
    if pos_embed is not None:
        _common.require_contiguous(pos_embed, "pos_embed")
    D = x.shape[-1]
    dtype = x.dtype if pos_embed is None else torch.promote_types(x.dtype, pos_embed.dtype)
    out = _common.empty((*ids.shape, D), dtype, x.device)
    if out.numel() == 0:
        return out
    block = _common.block_d(D, BLOCK_CAP)
    grid = (ids.numel(), triton.cdiv(D, block))
    _gather_fwd_kernel[grid](
        out, x, ids, sample_index(ids, cu_seqlens), x if pos_embed is None else pos_embed, D,
        x.stride(0), x.stride(1), x.stride(2),
        HAS_POS=pos_embed is not None, ACC=_common.acc_dtype(x.dtype, dtype), BLOCK_D=block,
        num_warps=_common.num_warps(block))
    return out


def scatter_fwd(src, ids, cu_seqlens, mask_token, length, pos_embed=None):
    """out[b, l] = (src[row kept at (b, l)] or mask_token rounded to src.dtype) + pos_embed[l].

    src: ids.shape + (D,) kept rows, contiguous; ids/cu_seqlens as in gather_fwd; mask_token D
    elements, contiguous; pos_embed None or length*D elements, contiguous.
    Returns [B, length, D], dtype promote(src, pos_embed).
    """
    _common.require_contiguous(src, "x_kept")
    _common.require_contiguous(mask_token, "mask_token")
    if pos_embed is not None:
        _common.require_contiguous(pos_embed, "pos_embed")
    D = src.shape[-1]
    B = batch_size(ids, cu_seqlens)
    dtype = src.dtype if pos_embed is None else torch.promote_types(src.dtype, pos_embed.dtype)
    out = _common.empty((B, length, D), dtype, src.device)
    if out.numel() == 0:
        return out
    per, _, grid, block = _grid_config(D, length, B, reduce=False)
    _scatter_fwd_kernel[grid](
        out, src, inverse_map(ids, cu_seqlens, length), mask_token,
        mask_token if pos_embed is None else pos_embed, B, length, D, per,
        HAS_POS=pos_embed is not None, ACC=_common.acc_dtype(src.dtype, dtype), BLOCK_D=block,
        num_warps=_common.num_warps(block))
    return out


def _reduced(part, dims, wanted, dtype):
    """Final deterministic reduction of a partial-sum buffer, or an empty [0] placeholder."""
    return part.sum(dims).to(dtype) if wanted else _common.empty((0,), dtype, part.device)


def gather_bwd(grad, ids, cu_seqlens, length, x_dtype, pos_grad, pos_dtype):
    """Backward of gather_fwd. grad: ids.shape + (D,), contiguous.

    Returns (dx [B, length, D] x_dtype, zeros at masked positions; dpos [length, D] pos_dtype = grad
    summed over samples, or an empty [0] tensor when not pos_grad)."""
    _common.require_contiguous(grad, "grad")
    D = grad.shape[-1]
    B = batch_size(ids, cu_seqlens)
    dx = _common.empty((B, length, D), x_dtype, grad.device)
    per, chunks, grid, block = _grid_config(D, length, B, pos_grad)
    part_dtype = _common.torch_acc_dtype(grad.dtype, pos_dtype)
    part = _common.empty((chunks, length, D) if pos_grad else (0,), part_dtype, grad.device)
    if dx.numel() > 0:
        _gather_bwd_kernel[grid](
            dx, part, grad, inverse_map(ids, cu_seqlens, length), B, length, D, per,
            POS_GRAD=pos_grad, ACC=_common.acc_dtype(part_dtype), BLOCK_D=block,
            num_warps=_common.num_warps(block))
    return dx, _reduced(part, 0, pos_grad, pos_dtype)


def scatter_bwd(grad, ids, cu_seqlens, src_dtype, fill_grad, fill_dtype, pos_grad, pos_dtype):
    """Backward of scatter_fwd. grad [B, L, D] contiguous.

    Returns (dsrc: ids.shape + (D,) src_dtype, grad at the kept positions;
    dfill [D] fill_dtype = grad summed over masked positions, or empty [0] when not fill_grad;
    dpos [L, D] pos_dtype = grad summed over samples, or empty [0] when not pos_grad)."""
    _common.require_contiguous(grad, "grad")
    B, L, D = grad.shape
    dsrc = _common.empty((*ids.shape, D), src_dtype, grad.device)
    per, chunks, grid, block = _grid_config(D, L, B, fill_grad or pos_grad)
    part_dtype = _common.torch_acc_dtype(grad.dtype, fill_dtype, pos_dtype)
    fill_part = _common.empty((chunks, L, D) if fill_grad else (0,), part_dtype, grad.device)
    pos_part = _common.empty((chunks, L, D) if pos_grad else (0,), part_dtype, grad.device)
    if grad.numel() > 0:
        _scatter_bwd_kernel[grid](
            dsrc, fill_part, pos_part, grad, inverse_map(ids, cu_seqlens, L), B, L, D, per,
            FILL_GRAD=fill_grad, POS_GRAD=pos_grad, ACC=_common.acc_dtype(part_dtype), BLOCK_D=block,
            num_warps=_common.num_warps(block))
    return dsrc, _reduced(fill_part, (0, 1), fill_grad, fill_dtype), _reduced(pos_part, 0, pos_grad, pos_dtype)
