"""Triton kernels for MaskDiT's token gather/scatter (dense [B, K] and packed/varlen layouts).

Both layouts reduce to "packed rows": N kept rows (N = B*K dense, T varlen), row r holding position
ids[r] of sample seg[r]. The forward gather walks [BLOCK_R, BLOCK_D] tiles of the N rows. Everything
that writes the full [B, L, D] grid (scatter forward, gather backward, scatter backward) walks
[BLOCK_L positions, BLOCK_D columns] tiles and loops over a chunk of samples b, reading inv[b, l] (the
packed row kept at (b, l), or -1): the position-embedding tile is loaded once per program, and the
reductions over samples (pos_embed and mask_token grads) are deterministic: each program sums its
chunk in registers and writes one tile of a [chunks, L, D] partial-sum buffer, which the launcher
sums with torch (no float atomics).

Token counts (L, K, T) and the per-program loop bounds are runtime arguments, so a new mask ratio does
not recompile; only the tile sizes (derived from D) and the feature flags are compile-time constants.
Launchers expect validated inputs (maskdit_fast.ops.gather_scatter checks them).
"""
import torch
import triton
import triton.language as tl

from maskdit_fast.backend import result_dtype
from maskdit_fast.kernels import _common
from maskdit_fast.indexing import batch_size, sample_index

BLOCK_CAP = 1024  # widest column block; D = 1152 runs as two blocks per row


@triton.jit(do_not_specialize=["N"])
def _gather_fwd_kernel(
    out_ptr,      # [N, D] output rows, contiguous, dtype = promote(x, pos_embed)
    x_ptr,        # [B, L, D] source tokens, any strides (the patch embedding is often transposed)
    ids_ptr,      # [N] int64: position l within its sample of each output row
    seg_ptr,      # [N] int64: sample b of each output row
    pos_ptr,      # [L, D] contiguous position embedding (read only when HAS_POS)
    N, D,         # output rows, feature width
    stride_xb, stride_xl, stride_xd,  # element strides of x
    HAS_POS: tl.constexpr,   # add pos_embed[l] to the gathered row
    ACC: tl.constexpr,       # arithmetic dtype (fp32, or fp64 for fp64 inputs)
    BLOCK_R: tl.constexpr,   # output rows per program
    BLOCK_D: tl.constexpr,   # columns per program
):
    # out[r] = x[seg[r], ids[r]] + pos_embed[ids[r]]; grid (cdiv(N, BLOCK_R), cdiv(D, BLOCK_D))
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    rmask = rows < N
    mask = rmask[:, None] & (cols < D)[None, :]
    pos = tl.load(ids_ptr + rows, mask=rmask, other=0)
    b = tl.load(seg_ptr + rows, mask=rmask, other=0)
    src = x_ptr + (b * stride_xb + pos * stride_xl)[:, None] + (cols * stride_xd)[None, :]
    v = tl.load(src, mask=mask).to(ACC)
    if HAS_POS:
        v += tl.load(pos_ptr + pos[:, None] * D + cols[None, :], mask=mask).to(ACC)
    tl.store(out_ptr + rows[:, None] * D + cols[None, :], v.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["B", "L", "B_PER_PROG"])
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
    BLOCK_L: tl.constexpr,   # grid positions per program
    BLOCK_D: tl.constexpr,   # columns per program
):
    # out[b, l] = (src[inv[b, l]] if kept else mask_token) + pos_embed[l]
    # grid (cdiv(L, BLOCK_L) * sample chunks, cdiv(D, BLOCK_D))
    n_lblocks = tl.cdiv(L, BLOCK_L)
    pid = tl.program_id(0)
    pos = (pid % n_lblocks).to(tl.int64) * BLOCK_L + tl.arange(0, BLOCK_L)
    b0 = (pid // n_lblocks) * B_PER_PROG
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    lmask = pos < L
    cmask = cols < D
    mask = lmask[:, None] & cmask[None, :]
    fill = tl.load(fill_ptr + cols, mask=cmask).to(src_ptr.dtype.element_ty).to(ACC)
    if HAS_POS:
        pe = tl.load(pos_ptr + pos[:, None] * D + cols[None, :], mask=mask).to(ACC)
    for b in range(b0, tl.minimum(b0 + B_PER_PROG, B)):
        grid_rows = pos + b * L
        r = tl.load(inv_ptr + grid_rows, mask=lmask, other=-1)
        kept = (r >= 0)[:, None]
        v = tl.load(src_ptr + r[:, None] * D + cols[None, :], mask=mask & kept, other=0.0).to(ACC)
        v = tl.where(kept, v, fill[None, :])
        if HAS_POS:
            v += pe
        tl.store(out_ptr + grid_rows[:, None] * D + cols[None, :], v.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["B", "L", "B_PER_PROG"])
def _gather_bwd_kernel(
    dx_ptr,       # [B, L, D] grad of x, contiguous (zeros at masked positions)
    dpos_ptr,     # [chunks, L, D] ACC-dtype partial sums of grad pos_embed (written when POS_GRAD)
    dy_ptr,       # [N, D] grad of the gathered rows, contiguous
    inv_ptr,      # [B, L] int64: packed row kept at (b, l), -1 where masked
    B, L, D,      # samples, grid length, feature width
    B_PER_PROG,   # samples summed by one program
    POS_GRAD: tl.constexpr,  # also reduce grad pos_embed over the program's samples
    ACC: tl.constexpr,       # accumulation dtype
    BLOCK_L: tl.constexpr,   # grid positions per program
    BLOCK_D: tl.constexpr,   # columns per program
):
    # dx[b, l] = dy[inv[b, l]] or 0; dpos_partial[chunk, l] = sum over the chunk's samples of dx[b, l]
    n_lblocks = tl.cdiv(L, BLOCK_L)
    pid = tl.program_id(0)
    pos = (pid % n_lblocks).to(tl.int64) * BLOCK_L + tl.arange(0, BLOCK_L)
    chunk = pid // n_lblocks
    b0 = chunk * B_PER_PROG
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    lmask = pos < L
    mask = lmask[:, None] & (cols < D)[None, :]
    acc = tl.zeros([BLOCK_L, BLOCK_D], dtype=ACC)
    for b in range(b0, tl.minimum(b0 + B_PER_PROG, B)):
        grid_rows = pos + b * L
        r = tl.load(inv_ptr + grid_rows, mask=lmask, other=-1)
        g = tl.load(dy_ptr + r[:, None] * D + cols[None, :], mask=mask & (r >= 0)[:, None], other=0.0)
        tl.store(dx_ptr + grid_rows[:, None] * D + cols[None, :], g.to(dx_ptr.dtype.element_ty), mask=mask)
        if POS_GRAD:
            acc += g.to(ACC)
    if POS_GRAD:
        tl.store(dpos_ptr + (pos + chunk.to(tl.int64) * L)[:, None] * D + cols[None, :], acc, mask=mask)


@triton.jit(do_not_specialize=["B", "L", "B_PER_PROG"])
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
    BLOCK_L: tl.constexpr,    # grid positions per program
    BLOCK_D: tl.constexpr,    # columns per program
):
    # dsrc[inv[b, l]] = dy[b, l] where kept; partial sums of dy for mask_token (masked only) and pos_embed
    n_lblocks = tl.cdiv(L, BLOCK_L)
    pid = tl.program_id(0)
    pos = (pid % n_lblocks).to(tl.int64) * BLOCK_L + tl.arange(0, BLOCK_L)
    chunk = pid // n_lblocks
    b0 = chunk * B_PER_PROG
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    lmask = pos < L
    mask = lmask[:, None] & (cols < D)[None, :]
    acc_fill = tl.zeros([BLOCK_L, BLOCK_D], dtype=ACC)
    acc_pos = tl.zeros([BLOCK_L, BLOCK_D], dtype=ACC)
    for b in range(b0, tl.minimum(b0 + B_PER_PROG, B)):
        grid_rows = pos + b * L
        r = tl.load(inv_ptr + grid_rows, mask=lmask, other=-1)
        kept = (r >= 0)[:, None]
        g = tl.load(dy_ptr + grid_rows[:, None] * D + cols[None, :], mask=mask, other=0.0)
        tl.store(dsrc_ptr + r[:, None] * D + cols[None, :], g.to(dsrc_ptr.dtype.element_ty), mask=mask & kept)
        if FILL_GRAD:
            acc_fill += tl.where(kept, 0.0, g.to(ACC))
        if POS_GRAD:
            acc_pos += g.to(ACC)
    part = (pos + chunk.to(tl.int64) * L)[:, None] * D + cols[None, :]
    if FILL_GRAD:
        tl.store(dfill_ptr + part, acc_fill, mask=mask)
    if POS_GRAD:
        tl.store(dpos_ptr + part, acc_pos, mask=mask)


def inverse_map(ids, cu_seqlens, length):
    """[B, L] int64: the packed row kept at grid position (b, l), -1 where masked; no host sync."""
    batch = batch_size(ids, cu_seqlens)
    inv = torch.full((batch * length,), -1, dtype=torch.int64, device=ids.device)
    flat_ids = ids.reshape(-1)
    rows = torch.arange(flat_ids.numel(), device=ids.device)
    inv.scatter_(0, sample_index(ids, cu_seqlens) * length + flat_ids, rows)
    return inv.view(batch, length)


def _grid_config(n_cols, length, batch, reduce):
    """Launch geometry of the full-grid kernels: programs over (position block, sample chunk) x
    column blocks. Returns (samples per program, sample chunks, grid, BLOCK_L, BLOCK_D). Without a
    reduction over samples each program takes one sample; with one, the chunking (and so the
    summation order) depends on the shapes only."""
    block = _common.block_d(n_cols, BLOCK_CAP)
    block_l = min(_common.rows_per_tile(block), triton.next_power_of_2(max(length, 1)))
    n_lblocks, n_dblocks = triton.cdiv(length, block_l), triton.cdiv(n_cols, block)
    per, chunks = _common.split(batch, n_lblocks * n_dblocks) if reduce else (1, batch)
    return per, chunks, (n_lblocks * chunks, n_dblocks), block_l, block


def _launch_meta(block_rows, block):
    return dict(BLOCK_D=block, num_warps=_common.num_warps(block_rows * block))


def gather_fwd(x, ids, cu_seqlens=None, pos_embed=None):
    """out[r] = x[seg[r], ids[r]] + pos_embed[ids[r]].

    x [B, L, D] (any strides); ids [B, K] (dense) or [T] with cu_seqlens [B+1] (packed), int64,
    contiguous; pos_embed None or L*D elements, contiguous.
    Returns ids.shape + (D,), dtype promote(x, pos_embed).
    """
    _common.require_contiguous(ids, "ids")
    if pos_embed is not None:
        _common.require_contiguous(pos_embed, "pos_embed")
    D = x.shape[-1]
    dtype = result_dtype(x, pos_embed)
    out = _common.empty((*ids.shape, D), dtype, x.device)
    if out.numel() == 0:
        return out
    N = ids.numel()
    block = _common.block_d(D, BLOCK_CAP)
    block_r = min(_common.rows_per_tile(block), triton.next_power_of_2(N))
    _gather_fwd_kernel[(triton.cdiv(N, block_r), triton.cdiv(D, block))](
        out, x, ids, sample_index(ids, cu_seqlens), x if pos_embed is None else pos_embed, N, D,
        x.stride(0), x.stride(1), x.stride(2),
        HAS_POS=pos_embed is not None, ACC=_common.acc_dtype(x.dtype, dtype), BLOCK_R=block_r,
        **_launch_meta(block_r, block))
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
    dtype = result_dtype(src, pos_embed)
    out = _common.empty((B, length, D), dtype, src.device)
    if out.numel() == 0:
        return out
    per, _, grid, block_l, block = _grid_config(D, length, B, reduce=False)
    _scatter_fwd_kernel[grid](
        out, src, inverse_map(ids, cu_seqlens, length), mask_token,
        mask_token if pos_embed is None else pos_embed, B, length, D, per,
        HAS_POS=pos_embed is not None, ACC=_common.acc_dtype(src.dtype, dtype), BLOCK_L=block_l,
        **_launch_meta(block_l, block))
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
    per, chunks, grid, block_l, block = _grid_config(D, length, B, reduce=pos_grad)
    part_dtype = _common.torch_acc_dtype(grad.dtype, pos_dtype)
    part = _common.empty((chunks, length, D) if pos_grad else (0,), part_dtype, grad.device)
    if dx.numel() > 0:
        _gather_bwd_kernel[grid](
            dx, part, grad, inverse_map(ids, cu_seqlens, length), B, length, D, per,
            POS_GRAD=pos_grad, ACC=_common.acc_dtype(part_dtype), BLOCK_L=block_l,
            **_launch_meta(block_l, block))
    return dx, _reduced(part, 0, pos_grad, pos_dtype)


def scatter_bwd(grad, ids, cu_seqlens, src_dtype, fill_grad, fill_dtype, pos_grad, pos_dtype):
    """Backward of scatter_fwd. grad [B, L, D] contiguous.

    Returns (dsrc: ids.shape + (D,) src_dtype, grad at the kept positions;
    dfill [D] fill_dtype = grad summed over masked positions, or empty [0] when not fill_grad;
    dpos [L, D] pos_dtype = grad summed over samples, or empty [0] when not pos_grad)."""
    _common.require_contiguous(grad, "grad")
    B, L, D = grad.shape
    dsrc = _common.empty((*ids.shape, D), src_dtype, grad.device)
    per, chunks, grid, block_l, block = _grid_config(D, L, B, reduce=fill_grad or pos_grad)
    part_dtype = _common.torch_acc_dtype(grad.dtype, fill_dtype, pos_dtype)
    fill_part = _common.empty((chunks, L, D) if fill_grad else (0,), part_dtype, grad.device)
    pos_part = _common.empty((chunks, L, D) if pos_grad else (0,), part_dtype, grad.device)
    if grad.numel() > 0:
        _scatter_bwd_kernel[grid](
            dsrc, fill_part, pos_part, grad, inverse_map(ids, cu_seqlens, L), B, L, D, per,
            FILL_GRAD=fill_grad, POS_GRAD=pos_grad, ACC=_common.acc_dtype(part_dtype), BLOCK_L=block_l,
            **_launch_meta(block_l, block))
    return dsrc, _reduced(fill_part, (0, 1), fill_grad, fill_dtype), _reduced(pos_part, 0, pos_grad, pos_dtype)
