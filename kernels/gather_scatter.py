"""Triton kernels for MaskDiT's token gather/scatter, dense ([B, K] ids) and packed ([T] ids + cu_seqlens).

A call works on N kept rows: the dense layout has N = B*K rows with row r in sample r // K; the packed layout
has N = T rows, sample b owning rows cu_seqlens[b]:cu_seqlens[b+1] (found in-kernel by a binary search over
cu_seqlens). ids[r] is the position of row r within its sample's grid of L tokens.

The gather forward walks [BLOCK_R rows, BLOCK_D columns] tiles of the N rows. Everything that writes the full
[B, L, D] grid (scatter forward, gather backward, scatter backward) walks [BLOCK_R positions, BLOCK_D columns]
tiles and loops over a chunk of samples, reading the inverse map inv[b, l] (the row kept at (b, l), or -1),
which `inverse_map` builds in one launch: the scatter builds it in its forward and its backward reuses it; the
gather builds it in its backward. The position-embedding tile is loaded once per program, and the reductions
(pos_embed and mask_token grads) are deterministic and finish in-kernel: each program sums its chunk in
registers and stores one partial tile, and the last program of each output tile to arrive
(_common.last_to_arrive) adds the partials in chunk order.

Token counts (L, K, T, B) and the per-program loop bounds are runtime arguments, so a new mask ratio does not
recompile; only the tile sizes and the feature flags are compile-time constants. Launchers expect validated
inputs (maskdit_fast.ops.gather_scatter checks them). Launch configurations come from kernels/_config.py
(`tuned("gather" | "scatter", "D=<width>", default)`); `TUNING` lists the candidates a GPU sweep may time.
"""
import functools

import torch
import triton
import triton.language as tl

from maskdit_fast.backend import result_dtype
from maskdit_fast.indexing import batch_size
from maskdit_fast.kernels import _common
from maskdit_fast.kernels._config import tuned

BLOCK_CAP = 1024  # widest column block; the default for D = 1152 is 9 blocks of 128 (no idle lanes)
INVERSE_BLOCK = 1024  # positions (and rows) per step of the inverse-map kernel

# One configuration per op (its forward and backward kernels): [BLOCK_R rows or positions, BLOCK_D columns].
# The gather backward spills with 8 warps on tiles of up to 4096 elements (offline sm_90 compile): 4 warps there.
TUNING = {
    "gather": [{"BLOCK_R": r, "BLOCK_D": d, "num_warps": w}
               for r, d, w in ((2, 1024, 4), (2, 1024, 8), (4, 512, 4), (8, 256, 4), (16, 128, 4), (4, 1024, 4))],
    "scatter": [{"BLOCK_R": r, "BLOCK_D": d, "num_warps": w}
                for r, d in ((2, 1024), (4, 512), (8, 256), (16, 128), (4, 1024)) for w in (4, 8)],
}


@triton.jit(do_not_specialize=["B", "L", "K"])
def _inverse_map_kernel(
    inv_ptr,      # [B, L] int32 output: the row kept at (b, l), -1 where masked
    ids_ptr,      # [N] int64 positions of the kept rows
    cu_ptr,       # [B+1] int32 cu_seqlens (read only when PACKED)
    B, L, K,      # samples, grid length, rows per sample (dense)
    PACKED: tl.constexpr,  # rows of sample b are cu[b]:cu[b+1] (else b*K:(b+1)*K)
    BLOCK: tl.constexpr,   # positions / rows per step
):
    # grid (B,): one program fills its sample's row of inv with -1, then writes the kept rows' indices
    b = tl.program_id(0).to(tl.int64)
    if PACKED:
        start = tl.load(cu_ptr + b).to(tl.int64)
        count = tl.load(cu_ptr + b + 1).to(tl.int64) - start
    else:
        start = b * K
        count = K + 0 * b
    offs = tl.arange(0, BLOCK)
    for l0 in range(0, L, BLOCK):
        tl.store(inv_ptr + b * L + l0 + offs, tl.full([BLOCK], -1, tl.int32), mask=l0 + offs < L)
    tl.debug_barrier()  # every -1 lands before any thread writes a kept row over it
    for r0 in range(0, count, BLOCK):
        rows = start + r0 + offs
        keep = r0 + offs < count
        pos = tl.load(ids_ptr + rows, mask=keep, other=0)
        tl.store(inv_ptr + b * L + pos, rows.to(tl.int32), mask=keep)


@triton.jit
def _sample_of(
    rows,        # [BLOCK_R] int64 row indices
    cu_ptr,      # [B+1] int32 cu_seqlens (PACKED)
    B, K,        # samples; rows per sample (dense)
    n_steps,     # binary-search steps: B.bit_length()
    PACKED: tl.constexpr,
):
    """Sample b of each row: r // K (dense), or the number of cu[1:] entries <= r (packed, binary search)."""
    if PACKED:
        b = tl.zeros_like(rows)
        hi = b + B
        for _ in range(n_steps):
            active = b < hi
            mid = (b + hi) // 2
            bound = tl.load(cu_ptr + 1 + mid, mask=active, other=0)
            right = active & (bound <= rows)
            b = tl.where(right, mid + 1, b)
            hi = tl.where(active & (bound > rows), mid, hi)
    else:
        b = rows // K
    return b


@triton.jit(do_not_specialize=["N", "B", "K", "n_steps"])
def _gather_fwd_kernel(
    out_ptr,      # [N, D] output rows, contiguous, dtype = promote(x, pos_embed)
    x_ptr,        # [B, L, D] source tokens, any strides (the patch embedding is often transposed)
    ids_ptr,      # [N] int64: position l within its sample of each output row
    cu_ptr,       # [B+1] int32 cu_seqlens (PACKED)
    pos_ptr,      # [L, D] contiguous position embedding (read only when HAS_POS)
    N, D,         # output rows, feature width
    B, K,         # samples, rows per sample (dense)
    n_steps,      # binary-search steps over cu_seqlens (PACKED)
    stride_xb, stride_xl, stride_xd,  # element strides of x
    PACKED: tl.constexpr,    # packed layout (else dense)
    HAS_POS: tl.constexpr,   # add pos_embed[l] to the gathered row
    ACC: tl.constexpr,       # arithmetic dtype (fp32, or fp64 for fp64 inputs)
    BLOCK_R: tl.constexpr,   # output rows per program
    BLOCK_D: tl.constexpr,   # columns per program
):
    # out[r] = x[b(r), ids[r]] + pos_embed[ids[r]]; grid (cdiv(N, BLOCK_R), cdiv(D, BLOCK_D))
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    rmask = rows < N
    mask = rmask[:, None] & (cols < D)[None, :]
    pos = tl.load(ids_ptr + rows, mask=rmask, other=0)
    b = _sample_of(rows, cu_ptr, B, K, n_steps, PACKED)
    src = x_ptr + (b * stride_xb + pos * stride_xl)[:, None] + (cols * stride_xd)[None, :]
    v = tl.load(src, mask=mask).to(ACC)
    if HAS_POS:
        v += tl.load(pos_ptr + pos[:, None] * D + cols[None, :], mask=mask).to(ACC)
    tl.store(out_ptr + rows[:, None] * D + cols[None, :], v.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["B", "L"])
def _scatter_fwd_kernel(
    out_ptr,      # [B, L, D] output grid, contiguous, dtype = promote(src, pos_embed)
    src_ptr,      # [N, D] kept rows (x_kept / x_packed), contiguous
    inv_ptr,      # [B, L] int32: row kept at (b, l), -1 where masked
    fill_ptr,     # [D] mask token (rounded to src's dtype before use, as the reference does)
    pos_ptr,      # [L, D] contiguous position embedding (read only when HAS_POS)
    B, L, D,      # samples, grid length, feature width
    HAS_POS: tl.constexpr,   # add pos_embed[l]
    ACC: tl.constexpr,       # arithmetic dtype
    BLOCK_R: tl.constexpr,   # grid positions per program
    BLOCK_D: tl.constexpr,   # columns per program
):
    # out[b, l] = (src[inv[b, l]] if kept else mask_token) + pos_embed[l]; grid (cdiv(L, BLOCK_R) * B, column blocks)
    n_lblocks = tl.cdiv(L, BLOCK_R)
    pid = tl.program_id(0)
    pos = (pid % n_lblocks).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    b = (pid // n_lblocks).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    lmask = pos < L
    cmask = cols < D
    mask = lmask[:, None] & cmask[None, :]
    grid_rows = pos + b * L
    r = tl.load(inv_ptr + grid_rows, mask=lmask, other=-1).to(tl.int64)
    kept = (r >= 0)[:, None]
    v = tl.load(src_ptr + r[:, None] * D + cols[None, :], mask=mask & kept, other=0.0).to(ACC)
    fill = tl.load(fill_ptr + cols, mask=cmask).to(src_ptr.dtype.element_ty).to(ACC)
    v = tl.where(kept, v, fill[None, :])
    if HAS_POS:
        v += tl.load(pos_ptr + pos[:, None] * D + cols[None, :], mask=mask).to(ACC)
    tl.store(out_ptr + grid_rows[:, None] * D + cols[None, :], v.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["B", "L", "B_PER_PROG", "n_chunks"])
def _gather_bwd_kernel(
    dx_ptr,       # [B, L, D] grad of x, contiguous (zeros at masked positions)
    dpos_ptr,     # [L, D] grad of pos_embed (POS_GRAD)
    part_ptr,     # [n_chunks, L, D] ACC partial sums of dpos (POS_GRAD)
    count_ptr,    # [position blocks, column blocks] int32 arrival counters, zeroed (POS_GRAD)
    dy_ptr,       # [N, D] grad of the gathered rows, contiguous
    inv_ptr,      # [B, L] int32: row kept at (b, l), -1 where masked
    B, L, D,      # samples, grid length, feature width
    B_PER_PROG,   # samples summed by one program
    n_chunks,     # sample chunks = programs per output tile of dpos
    POS_GRAD: tl.constexpr,  # also reduce grad pos_embed over the samples
    ACC: tl.constexpr,       # accumulation dtype
    BLOCK_R: tl.constexpr,   # grid positions per program
    BLOCK_D: tl.constexpr,   # columns per program
):
    # dx[b, l] = dy[inv[b, l]] or 0; dpos[l] = sum over b of dx[b, l]
    # grid (cdiv(L, BLOCK_R) * n_chunks, column blocks)
    n_lblocks = tl.cdiv(L, BLOCK_R)
    pid = tl.program_id(0)
    lblock = pid % n_lblocks
    pos = lblock.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    chunk = pid // n_lblocks
    b0 = chunk * B_PER_PROG
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    lmask = pos < L
    mask = lmask[:, None] & (cols < D)[None, :]
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=ACC)
    for b in range(b0, tl.minimum(b0 + B_PER_PROG, B)):
        grid_rows = pos + b * L
        r = tl.load(inv_ptr + grid_rows, mask=lmask, other=-1).to(tl.int64)
        g = tl.load(dy_ptr + r[:, None] * D + cols[None, :], mask=mask & (r >= 0)[:, None], other=0.0)
        tl.store(dx_ptr + grid_rows[:, None] * D + cols[None, :], g.to(dx_ptr.dtype.element_ty), mask=mask)
        if POS_GRAD:
            acc += g.to(ACC)
    if POS_GRAD:
        tile = pos[:, None] * D + cols[None, :]
        tl.store(part_ptr + chunk.to(tl.int64) * L * D + tile, acc, mask=mask)
        if _common.last_to_arrive(count_ptr + lblock * tl.num_programs(1) + tl.program_id(1), n_chunks):
            dpos = _common.sum_parts(part_ptr, L * D, n_chunks, tile, mask)
            tl.store(dpos_ptr + tile, dpos.to(dpos_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["B", "L", "B_PER_PROG", "n_chunks"])
def _scatter_bwd_kernel(
    dsrc_ptr,     # [N, D] grad of the kept rows, contiguous
    dfill_ptr,    # [D] grad of mask_token (FILL_GRAD)
    dpos_ptr,     # [L, D] grad of pos_embed (POS_GRAD)
    fill_part_ptr,  # [position blocks * n_chunks, D] ACC partial sums of dfill (FILL_GRAD)
    pos_part_ptr,   # [n_chunks, L, D] ACC partial sums of dpos (POS_GRAD)
    count_ptr,    # int32 arrival counters, zeroed: [position blocks, column blocks] (dpos), then [column blocks]
    dy_ptr,       # [B, L, D] grad of the scattered grid, contiguous
    inv_ptr,      # [B, L] int32: row kept at (b, l), -1 where masked
    B, L, D,      # samples, grid length, feature width
    B_PER_PROG,   # samples handled by one program
    n_chunks,     # sample chunks
    FILL_GRAD: tl.constexpr,  # reduce dy over the masked positions
    POS_GRAD: tl.constexpr,   # reduce dy over the samples
    ACC: tl.constexpr,        # accumulation dtype
    BLOCK_R: tl.constexpr,    # grid positions per program
    BLOCK_D: tl.constexpr,    # columns per program
):
    # dsrc[inv[b, l]] = dy[b, l] where kept; dfill = sum of dy over masked (b, l); dpos[l] = sum over b of dy[b, l]
    # grid (cdiv(L, BLOCK_R) * n_chunks, column blocks)
    n_lblocks = tl.cdiv(L, BLOCK_R)
    pid = tl.program_id(0)
    lblock = pid % n_lblocks
    pos = lblock.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    chunk = pid // n_lblocks
    b0 = chunk * B_PER_PROG
    dblock = tl.program_id(1)
    n_dblocks = tl.num_programs(1)
    cols = dblock * BLOCK_D + tl.arange(0, BLOCK_D)
    lmask = pos < L
    cmask = cols < D
    mask = lmask[:, None] & cmask[None, :]
    acc_fill = tl.zeros([BLOCK_R, BLOCK_D], dtype=ACC)
    acc_pos = tl.zeros([BLOCK_R, BLOCK_D], dtype=ACC)
    for b in range(b0, tl.minimum(b0 + B_PER_PROG, B)):
        grid_rows = pos + b * L
        r = tl.load(inv_ptr + grid_rows, mask=lmask, other=-1).to(tl.int64)
        kept = (r >= 0)[:, None]
        g = tl.load(dy_ptr + grid_rows[:, None] * D + cols[None, :], mask=mask, other=0.0)
        tl.store(dsrc_ptr + r[:, None] * D + cols[None, :], g.to(dsrc_ptr.dtype.element_ty), mask=mask & kept)
        if FILL_GRAD:
            acc_fill += tl.where(kept, 0.0, g.to(ACC))
        if POS_GRAD:
            acc_pos += g.to(ACC)
    if POS_GRAD:
        tile = pos[:, None] * D + cols[None, :]
        tl.store(pos_part_ptr + chunk.to(tl.int64) * L * D + tile, acc_pos, mask=mask)
        if _common.last_to_arrive(count_ptr + lblock * n_dblocks + dblock, n_chunks):
            dpos = _common.sum_parts(pos_part_ptr, L * D, n_chunks, tile, mask)
            tl.store(dpos_ptr + tile, dpos.to(dpos_ptr.dtype.element_ty), mask=mask)
    if FILL_GRAD:
        tl.store(fill_part_ptr + pid.to(tl.int64) * D + cols, tl.sum(acc_fill, axis=0), mask=cmask)
        if _common.last_to_arrive(count_ptr + n_lblocks * n_dblocks + dblock, n_lblocks * n_chunks):
            dfill = _common.sum_parts(fill_part_ptr, D, n_lblocks * n_chunks, cols, cmask)
            tl.store(dfill_ptr + cols, dfill.to(dfill_ptr.dtype.element_ty), mask=cmask)


# ---------------------------------------------------------------------------------------------------- launchers
@functools.lru_cache(maxsize=None)
def _default(D):
    """Default configuration at width D (returned shared: not to be modified)."""
    block = _common.least_waste_block(D, BLOCK_CAP)
    rows = _common.rows_per_tile(block)
    return {"BLOCK_R": rows, "BLOCK_D": block, "num_warps": _common.num_warps(rows * block)}


def _config(family, D, n_rows, device):
    """(BLOCK_R, BLOCK_D, num_warps) of `family` ("gather" / "scatter") at width D for n_rows rows (or grid
    positions): the tuned configuration, no wider than D needs and with no more rows than there are."""
    config = tuned(family, _common.width_key(D), _default(D), device)
    block_r = config["BLOCK_R"]
    return _fit(D, min(n_rows, block_r), block_r, config["BLOCK_D"], config["num_warps"])


@functools.lru_cache(maxsize=1024)
def _fit(D, n_rows, block_r, block_d, warps):
    """_config's arithmetic, once per configuration and shape (n_rows capped at block_r: all it can change)."""
    return _common.rows(block_r, n_rows), min(block_d, _common.block_d(D, BLOCK_CAP)), warps


def inverse_map(ids, cu_seqlens, length):
    """[B, length] int32: the row kept at grid position (b, l), -1 where masked (one launch, no host sync)."""
    batch = batch_size(ids, cu_seqlens)
    inv = _common.empty((batch, length), torch.int32, ids.device)
    if inv.numel() > 0:
        _common.launch(_inverse_map_kernel, (batch,), inv, ids, ids if cu_seqlens is None else cu_seqlens, batch,
                       length, ids.shape[-1] if cu_seqlens is None else 0, PACKED=cu_seqlens is not None,
                       BLOCK=INVERSE_BLOCK, num_warps=4)
    return inv


def gather_fwd(x, ids, cu_seqlens=None, pos_embed=None):
    """out[r] = x[b(r), ids[r]] + pos_embed[ids[r]].

    x [B, L, D] (any strides); ids [B, K] (dense) or [T] with cu_seqlens [B+1] (packed), int64, contiguous;
    pos_embed None or L*D elements, contiguous. Returns ids.shape + (D,), dtype promote(x, pos_embed).
    """
    _common.require_contiguous(ids, "ids")
    if pos_embed is not None:
        _common.require_contiguous(pos_embed, "pos_embed")
    device, D, N = x.device, x.shape[2], ids.numel()
    dtype = result_dtype(x, pos_embed)
    out = _common.empty((*ids.shape, D), dtype, device)
    if N * D == 0:
        return out
    B = batch_size(ids, cu_seqlens)
    block_r, block, warps = _config("gather", D, N, device)
    _common.launch(_gather_fwd_kernel, (_common.cdiv(N, block_r), _common.cdiv(D, block)), out, x, ids,
                   ids if cu_seqlens is None else cu_seqlens, x if pos_embed is None else pos_embed, N, D, B,
                   ids.shape[-1], B.bit_length(), *x.stride(), PACKED=cu_seqlens is not None,
                   HAS_POS=pos_embed is not None, ACC=_common.acc_dtype(x.dtype, dtype), BLOCK_R=block_r,
                   BLOCK_D=block, num_warps=warps)
    return out


def scatter_fwd(src, ids, cu_seqlens, mask_token, length, pos_embed=None):
    """out[b, l] = (src[row kept at (b, l)] or mask_token rounded to src.dtype) + pos_embed[l].

    src: ids.shape + (D,) kept rows, contiguous; ids/cu_seqlens as in gather_fwd; mask_token D elements,
    contiguous; pos_embed None or length*D elements, contiguous.
    Returns (out [B, length, D] dtype promote(src, pos_embed), the inverse map for scatter_bwd).
    """
    _common.require_contiguous(src, "x_kept")
    _common.require_contiguous(mask_token, "mask_token")
    if pos_embed is not None:
        _common.require_contiguous(pos_embed, "pos_embed")
    D = src.shape[-1]
    B = batch_size(ids, cu_seqlens)
    inv = inverse_map(ids, cu_seqlens, length)
    out = _common.empty((B, length, D), result_dtype(src, pos_embed), src.device)
    if out.numel() == 0:
        return out, inv
    block_r, block, warps = _config("scatter", D, length, src.device)
    _common.launch(_scatter_fwd_kernel, (_common.cdiv(length, block_r) * B, _common.cdiv(D, block)), out, src, inv,
                   mask_token, mask_token if pos_embed is None else pos_embed, B, length, D,
                   HAS_POS=pos_embed is not None, ACC=_common.acc_dtype(src.dtype, out.dtype), BLOCK_R=block_r,
                   BLOCK_D=block, num_warps=warps)
    return out, inv


@functools.lru_cache(maxsize=1024)
def _grid(D, length, batch, config, reduce):
    """Programs of the full-grid backward kernels: (samples per program, sample chunks, grid). Without a
    reduction over samples each program takes one sample; with one, the chunking (and so the summation order)
    depends on the shapes only."""
    block_r, block = config[:2]
    n_lblocks, n_dblocks = _common.cdiv(length, block_r), _common.cdiv(D, block)
    per, chunks = _common.split(batch, n_lblocks * n_dblocks) if reduce else (1, max(batch, 1))
    return per, chunks, (n_lblocks * chunks, n_dblocks)


def gather_bwd(grad, ids, cu_seqlens, length, x_dtype, pos_grad, pos_dtype):
    """Backward of gather_fwd. grad: ids.shape + (D,), contiguous.

    Returns (dx [B, length, D] x_dtype, zeros at masked positions; dpos [length, D] pos_dtype = grad summed over
    samples, or an empty [0] tensor when not pos_grad)."""
    _common.require_contiguous(grad, "grad")
    device, D = grad.device, grad.shape[-1]
    B = batch_size(ids, cu_seqlens)
    dx = _common.empty((B, length, D), x_dtype, device)
    dpos = _common.empty((length, D) if pos_grad else (0,), pos_dtype, device)
    if length * D == 0:
        return dx, dpos
    if B == 0:  # no sample: an empty sum
        return dx, dpos.zero_()
    config = _config("gather", D, length, device)
    per, chunks, grid = _grid(D, length, B, config, pos_grad)
    part_dtype = _common.torch_acc_dtype(grad.dtype, pos_dtype)
    part = _common.empty((chunks, length, D) if pos_grad else (0,), part_dtype, device)
    count = _common.counters(grid[0] // chunks * grid[1] if pos_grad else 0, device)
    _common.launch(_gather_bwd_kernel, grid, dx, dpos, part, count, grad, inverse_map(ids, cu_seqlens, length), B,
                   length, D, per, chunks, POS_GRAD=pos_grad, ACC=_common.acc_dtype(part_dtype),
                   BLOCK_R=config[0], BLOCK_D=config[1], num_warps=config[2])
    return dx, dpos


def scatter_bwd(grad, ids, inv, src_dtype, fill_grad, fill_dtype, pos_grad, pos_dtype):
    """Backward of scatter_fwd. grad [B, L, D] contiguous; inv: the inverse map scatter_fwd returned.

    Returns (dsrc: ids.shape + (D,) src_dtype, grad at the kept positions;
    dfill [D] fill_dtype = grad summed over masked positions, or empty [0] when not fill_grad;
    dpos [L, D] pos_dtype = grad summed over samples, or empty [0] when not pos_grad)."""
    _common.require_contiguous(grad, "grad")
    B, L, D = grad.shape
    device = grad.device
    dsrc = _common.empty((*ids.shape, D), src_dtype, device)
    dfill = _common.empty((D,) if fill_grad else (0,), fill_dtype, device)
    dpos = _common.empty((L, D) if pos_grad else (0,), pos_dtype, device)
    if L * D == 0:
        return dsrc, dfill.zero_(), dpos
    if B == 0:  # no sample: empty sums
        return dsrc, dfill.zero_(), dpos.zero_()
    config = _config("scatter", D, L, device)
    per, chunks, grid = _grid(D, L, B, config, fill_grad or pos_grad)
    n_lblocks = grid[0] // chunks
    part_dtype = _common.torch_acc_dtype(grad.dtype, fill_dtype, pos_dtype)
    fill_part = _common.empty((n_lblocks * chunks, D) if fill_grad else (0,), part_dtype, device)
    pos_part = _common.empty((chunks, L, D) if pos_grad else (0,), part_dtype, device)
    count = _common.counters((n_lblocks + 1) * grid[1] if fill_grad or pos_grad else 0, device)
    _common.launch(_scatter_bwd_kernel, grid, dsrc, dfill, dpos, fill_part, pos_part, count, grad, inv, B, L, D, per,
                   chunks, FILL_GRAD=fill_grad, POS_GRAD=pos_grad, ACC=_common.acc_dtype(part_dtype),
                   BLOCK_R=config[0], BLOCK_D=config[1], num_warps=config[2])
    return dsrc, dfill, dpos
