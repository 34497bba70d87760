"""Triton kernels for DiT's adaLN glue: LayerNorm + modulation, and the gated residual.

Rows are tokens of x [B, L, D] (contiguous). The conditioning tensors (shift, scale, gate) are either per sample
[B, D] (row b*L + l reads conditioning row b) or per token [B, L, D] (row r reads row r): the PER_TOKEN flag.
Arithmetic is fp32 (fp64 for fp64 inputs) with one rounding on store.

Programs work on [BLOCK_R rows, BLOCK_D columns] tiles. The LayerNorm kernels hold whole rows in registers (D
rounded up to a power of two: 1152 in 2048 lanes) unless the configuration gives a BLOCK_D narrower than the row:
then they walk each row in BLOCK_D-column chunks (1152 = 9 x 128, no idle lanes), the forward in two passes
(statistics merged chunk by chunk, then normalise), the backward in two passes per token tile (the row means it
needs, then dx). The LayerNorm forward also writes the per-row statistics (mean, rstd in the arithmetic dtype)
that its backward reads instead of recomputing them from x: one reduction pass less per row for 8 bytes a row
more traffic each way. Backward reductions over tokens (grads of per-sample shift/scale/gate) are deterministic
and finish inside the kernel: a program owns a chunk of one sample's tokens, sums it into one partial row (in
registers; chunked LayerNorm rows: in the part buffer, tile by tile); the last program of the sample to arrive
(_common.last_to_arrive) adds the partial rows in chunk order and stores the gradient. Per-token conditioning
grads are stored directly. L (tokens per sample), D and the chunk length are runtime arguments (no recompiles per
mask ratio).

Launch configurations come from kernels/_config.py (`tuned(family, "D=<width>", default)`); `TUNING` lists the
candidates a GPU sweep may time for each family.
"""
import functools

import triton
import triton.language as tl

from maskdit_fast.backend import result_dtype
from maskdit_fast.kernels import _common
from maskdit_fast.kernels._config import tuned

LN_BLOCK_CAP = 65536   # widest whole-row LayerNorm tile (chunked rows have no such limit)
GATE_BLOCK_CAP = 1024  # gated residual is elementwise over columns

# LayerNorm candidates without BLOCK_D hold whole rows (D = 1152 in 2048 lanes); those with BLOCK_D walk the row in
# chunks of that many columns (1152 = 9 x 128, 4.5 x 256). Candidates that spill in the offline sm_90 compile at
# D = 1152 are left out (whole rows, 4 rows: 8 warps forward, 4 backward).
LN_CHUNKED = [{"BLOCK_R": r, "BLOCK_D": d, "num_warps": w}
              for r, d, w in ((4, 128, 4), (8, 128, 4), (16, 128, 8), (4, 256, 4), (8, 256, 8))]
TUNING = {
    "ln_modulate_fwd": [{"BLOCK_R": r, "num_warps": w} for r, w in ((1, 4), (1, 8), (2, 4), (2, 8), (4, 4))]
                       + LN_CHUNKED,
    "ln_modulate_bwd": [{"BLOCK_R": r, "num_warps": w} for r, w in ((1, 4), (1, 8), (2, 4), (2, 8), (4, 8))]
                       + LN_CHUNKED,
    "gated_residual_fwd": [{"BLOCK_R": r, "BLOCK_D": d, "num_warps": w}
                           for r, d in ((2, 1024), (4, 512), (8, 256), (16, 128)) for w in (4, 8)],
    "gated_residual_bwd": [{"BLOCK_R": r, "BLOCK_D": d, "num_warps": w}
                           for r, d in ((2, 1024), (4, 512), (8, 256), (16, 128)) for w in (4, 8)],
}


@triton.jit(do_not_specialize=["n_rows", "L"])
def _ln_modulate_fwd_kernel(
    out_ptr,      # [B*L, D] output, contiguous, dtype promote(x, shift, scale)
    mean_ptr,     # [B*L] ACC row means of x
    rstd_ptr,     # [B*L] ACC row 1 / sqrt(var + eps) of x
    x_ptr,        # [B*L, D] input rows, contiguous
    shift_ptr,    # [B, D] or [B*L, D] contiguous
    scale_ptr,    # same layout as shift
    n_rows, L, D,  # B*L, tokens per sample, row width
    eps,          # LayerNorm epsilon
    PER_TOKEN: tl.constexpr,  # conditioning indexed by row (True) or by sample (False)
    ACC: tl.constexpr,        # arithmetic dtype
    BLOCK_R: tl.constexpr,    # rows per program
    BLOCK_D: tl.constexpr,    # columns per chunk: >= D (whole rows) when ONE_CHUNK
    ONE_CHUNK: tl.constexpr,  # the row is one chunk held in registers (else: two passes over BLOCK_D chunks)
):
    # out = (x - mean) * rstd * (1 + scale) + shift, statistics in ACC; grid (cdiv(B*L, BLOCK_R),)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    crows = rows if PER_TOKEN else rows // L
    rmask = rows < n_rows
    if ONE_CHUNK:
        cols = tl.arange(0, BLOCK_D)
        mask = rmask[:, None] & (cols < D)[None, :]
        x = tl.load(x_ptr + rows[:, None] * D + cols[None, :], mask=mask, other=0.0).to(ACC)
        mean = tl.sum(x, axis=1) / D
        xc = tl.where(mask, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / D + eps)
        tl.store(mean_ptr + rows, mean, mask=rmask)
        tl.store(rstd_ptr + rows, rstd, mask=rmask)
        coffs = crows[:, None] * D + cols[None, :]
        shift = tl.load(shift_ptr + coffs, mask=mask).to(ACC)
        scale = tl.load(scale_ptr + coffs, mask=mask).to(ACC)
        y = xc * rstd[:, None] * (1.0 + scale) + shift
        tl.store(out_ptr + rows[:, None] * D + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        # x is read twice (the second time mostly from L2): statistics, then normalise
        mean = tl.zeros([BLOCK_R], dtype=ACC)
        m2 = tl.zeros([BLOCK_R], dtype=ACC)
        for d0 in range(0, D, BLOCK_D):
            _, mask, offs, _ = _common.chunk(rows, crows, rmask, d0, D, BLOCK_D)
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
            mean, m2 = _common.merge_moments(mean, m2, x, mask, d0, D, BLOCK_D)
        rstd = 1.0 / tl.sqrt(m2 / D + eps)
        tl.store(mean_ptr + rows, mean, mask=rmask)
        tl.store(rstd_ptr + rows, rstd, mask=rmask)
        for d0 in range(0, D, BLOCK_D):
            _, mask, offs, coffs = _common.chunk(rows, crows, rmask, d0, D, BLOCK_D)
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
            shift = tl.load(shift_ptr + coffs, mask=mask).to(ACC)
            scale = tl.load(scale_ptr + coffs, mask=mask).to(ACC)
            y = (x - mean[:, None]) * rstd[:, None] * (1.0 + scale) + shift
            tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _ln_modulate_bwd_chunked(
    dx_ptr, dshift_ptr, dscale_ptr,  # as in _ln_modulate_bwd_kernel
    parts,        # per sample: this sample's [n_chunks, 2, D] partial sums
    count_ptr,    # per sample: this sample's arrival counter
    dy_ptr, x_ptr, scale_ptr, mean_ptr, rstd_ptr,  # as in _ln_modulate_bwd_kernel
    b, c,         # this program's sample and its chunk of the sample's tokens
    l_start, l_end,  # the chunk's tokens
    L, D, n_chunks,
    PER_TOKEN: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,    # rows per loop step
    BLOCK_D: tl.constexpr,    # columns per chunk (< D)
):
    """_ln_modulate_bwd_kernel on rows walked in BLOCK_D-column chunks. dx needs the row means of dxhat and of
    dxhat * xhat, so each token tile takes two passes over the chunks: those means, then dx (the tile's inputs
    read again, mostly from L1/L2). The per-sample sums of dshift and dscale cannot stay in registers across
    chunks: each tile adds its column sums into the program's own partial rows in the part buffer (a
    read-modify-write per tile: L1/L2 traffic, not HBM), which the last program to arrive adds up in chunk order
    as the whole-row path does: deterministic, and no atomics beyond the arrival counter."""
    own = parts + c * 2 * D
    for l0 in range(l_start, l_end, BLOCK_R):
        tokens = l0 + tl.arange(0, BLOCK_R)
        rmask = tokens < l_end
        rows = b * L + tokens
        mean_dxhat, mean_dxhat_xhat = _common.dxhat_row_means(x_ptr, mean_ptr, rstd_ptr, dy_ptr, scale_ptr, b, rows,
                                                               rmask, D, PER_TOKEN, ACC, BLOCK_R, BLOCK_D)
        for d0 in range(0, D, BLOCK_D):
            cols, mask, offs, _, xhat, rstd, dy, dxhat = _common.ln_bwd_chunk(
                x_ptr, mean_ptr, rstd_ptr, dy_ptr, scale_ptr, b, rows, rmask, d0, D, PER_TOKEN, ACC, BLOCK_D)
            dx = (dxhat - mean_dxhat[:, None] - xhat * mean_dxhat_xhat[:, None]) * rstd[:, None]
            tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
            if PER_TOKEN:
                tl.store(dshift_ptr + offs, dy.to(dshift_ptr.dtype.element_ty), mask=mask)
                tl.store(dscale_ptr + offs, (dy * xhat).to(dscale_ptr.dtype.element_ty), mask=mask)
            else:
                _common.add_to_part(own + cols, tl.sum(dy, axis=0), cols < D, l0 > l_start)
                _common.add_to_part(own + D + cols, tl.sum(dy * xhat, axis=0), cols < D, l0 > l_start)
        if not PER_TOKEN:
            tl.debug_barrier()
    if not PER_TOKEN:
        if _common.last_to_arrive(count_ptr, n_chunks):
            _common.store_sum_of_parts(dshift_ptr + b * D, parts, 2 * D, n_chunks, D, BLOCK_D)
            _common.store_sum_of_parts(dscale_ptr + b * D, parts + D, 2 * D, n_chunks, D, BLOCK_D)


@triton.jit(do_not_specialize=["L", "ROWS_PER_PROG", "n_chunks"])
def _ln_modulate_bwd_kernel(
    dx_ptr,       # [B*L, D] grad of x, contiguous
    dshift_ptr,   # grad of shift (in shift's dtype): [B*L, D] (PER_TOKEN) or [B, D]
    dscale_ptr,   # grad of scale, like dshift_ptr
    part_ptr,     # per sample: [B, n_chunks, 2, D] ACC partial sums of (dshift, dscale)
    count_ptr,    # per sample: [B] int32 arrival counters, zeroed
    dy_ptr,       # [B*L, D] grad of the output, contiguous
    x_ptr,        # [B*L, D] forward input
    scale_ptr,    # [B, D] or [B*L, D] forward scale
    mean_ptr,     # [B*L] forward row statistics
    rstd_ptr,     # [B*L]
    L, D,         # tokens per sample, row width
    ROWS_PER_PROG,  # tokens of one sample handled by one program (a multiple of BLOCK_R)
    n_chunks,     # programs per sample = cdiv(L, ROWS_PER_PROG)
    PER_TOKEN: tl.constexpr,  # conditioning indexed by row (True) or by sample (False)
    ACC: tl.constexpr,        # arithmetic dtype
    BLOCK_R: tl.constexpr,    # rows per loop step
    BLOCK_D: tl.constexpr,    # columns per chunk: >= D (whole rows) when ONE_CHUNK
    ONE_CHUNK: tl.constexpr,  # the row is one chunk held in registers (else: _ln_modulate_bwd_chunked)
):
    # grid (B * n_chunks,): program p owns tokens [c*R, min((c+1)*R, L)) of sample b = p // n_chunks
    pid = tl.program_id(0)
    b = (pid // n_chunks).to(tl.int64)
    c = pid % n_chunks
    l_start = c * ROWS_PER_PROG
    l_end = tl.minimum(l_start + ROWS_PER_PROG, L)
    if ONE_CHUNK:
        cols = tl.arange(0, BLOCK_D)
        cmask = cols < D
        if not PER_TOKEN:
            scale_b = tl.load(scale_ptr + b * D + cols, mask=cmask, other=0.0).to(ACC)
            acc_shift = tl.zeros([BLOCK_R, BLOCK_D], dtype=ACC)
            acc_scale = tl.zeros([BLOCK_R, BLOCK_D], dtype=ACC)
        for l0 in range(l_start, l_end, BLOCK_R):
            tokens = l0 + tl.arange(0, BLOCK_R)
            rmask = tokens < l_end
            mask = rmask[:, None] & cmask[None, :]
            rows = b * L + tokens
            offs = rows[:, None] * D + cols[None, :]
            xhat, rstd = _common.normalized_tile(x_ptr, mean_ptr, rstd_ptr, rows, offs, rmask, mask, ACC)
            dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC)
            if PER_TOKEN:
                scale = tl.load(scale_ptr + offs, mask=mask, other=0.0).to(ACC)
                tl.store(dshift_ptr + offs, dy.to(dshift_ptr.dtype.element_ty), mask=mask)
                tl.store(dscale_ptr + offs, (dy * xhat).to(dscale_ptr.dtype.element_ty), mask=mask)
            else:
                scale = scale_b[None, :]
                acc_shift += dy
                acc_scale += dy * xhat
            # LayerNorm backward on dxhat = dy * (1 + scale); padded rows and columns are 0 in every term
            dxhat = dy * (1.0 + scale)
            mean_dxhat = tl.sum(dxhat, axis=1) / D
            mean_dxhat_xhat = tl.sum(dxhat * xhat, axis=1) / D
            dx = (dxhat - mean_dxhat[:, None] - xhat * mean_dxhat_xhat[:, None]) * rstd[:, None]
            tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if not PER_TOKEN:
            parts = part_ptr + b * n_chunks * 2 * D
            tl.store(parts + c * 2 * D + cols, tl.sum(acc_shift, axis=0), mask=cmask)
            tl.store(parts + c * 2 * D + D + cols, tl.sum(acc_scale, axis=0), mask=cmask)
            if _common.last_to_arrive(count_ptr + b, n_chunks):
                dshift = _common.sum_parts(parts, 2 * D, n_chunks, cols, cmask)
                dscale = _common.sum_parts(parts + D, 2 * D, n_chunks, cols, cmask)
                tl.store(dshift_ptr + b * D + cols, dshift.to(dshift_ptr.dtype.element_ty), mask=cmask)
                tl.store(dscale_ptr + b * D + cols, dscale.to(dscale_ptr.dtype.element_ty), mask=cmask)
    else:
        _ln_modulate_bwd_chunked(dx_ptr, dshift_ptr, dscale_ptr, part_ptr + b * n_chunks * 2 * D, count_ptr + b,
                                 dy_ptr, x_ptr, scale_ptr, mean_ptr, rstd_ptr, b, c, l_start, l_end, L, D, n_chunks,
                                 PER_TOKEN, ACC, BLOCK_R, BLOCK_D)


@triton.jit(do_not_specialize=["n_rows", "L"])
def _gated_residual_fwd_kernel(
    out_ptr,      # [B*L, D] output, contiguous, dtype promote(x, y, gate)
    x_ptr,        # [B*L, D] residual stream, contiguous
    y_ptr,        # [B*L, D] branch output, contiguous
    gate_ptr,     # [B, D] or [B*L, D] contiguous
    n_rows, L, D,  # B*L, tokens per sample, row width
    PER_TOKEN: tl.constexpr,  # gate indexed by row (True) or by sample (False)
    ACC: tl.constexpr,        # arithmetic dtype
    BLOCK_R: tl.constexpr,    # rows per program
    BLOCK_D: tl.constexpr,    # columns per program
):
    # out = x + gate * y; grid (cdiv(B*L, BLOCK_R), cdiv(D, BLOCK_D))
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    grows = rows if PER_TOKEN else rows // L
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = (rows < n_rows)[:, None] & (cols < D)[None, :]
    offs = rows[:, None] * D + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask).to(ACC)
    y = tl.load(y_ptr + offs, mask=mask).to(ACC)
    gate = tl.load(gate_ptr + grows[:, None] * D + cols[None, :], mask=mask).to(ACC)
    tl.store(out_ptr + offs, (x + gate * y).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["L", "ROWS_PER_PROG", "n_chunks"])
def _gated_residual_bwd_kernel(
    dy_ptr,       # [B*L, D] grad of the branch output y (= gate * grad), contiguous
    dgate_ptr,    # grad of gate: [B*L, D] (PER_TOKEN) or [B, D]
    part_ptr,     # per sample: [B, n_chunks, D] ACC partial sums of dgate
    count_ptr,    # per sample: [B, column blocks] int32 arrival counters, zeroed
    grad_ptr,     # [B*L, D] grad of the output, contiguous
    y_ptr,        # [B*L, D] forward branch output
    gate_ptr,     # [B, D] or [B*L, D] forward gate
    L, D,         # tokens per sample, row width
    ROWS_PER_PROG,  # tokens of one sample handled by one program (a multiple of BLOCK_R)
    n_chunks,     # programs per sample along tokens = cdiv(L, ROWS_PER_PROG)
    PER_TOKEN: tl.constexpr,  # gate indexed by row (True) or by sample (False)
    ACC: tl.constexpr,        # arithmetic dtype
    BLOCK_R: tl.constexpr,    # rows per loop step
    BLOCK_D: tl.constexpr,    # columns per program
):
    # grid (B * n_chunks, cdiv(D, BLOCK_D)); grad x is grad itself (handled by the caller)
    pid = tl.program_id(0)
    b = (pid // n_chunks).to(tl.int64)
    c = pid % n_chunks
    l_start = c * ROWS_PER_PROG
    l_end = tl.minimum(l_start + ROWS_PER_PROG, L)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    if not PER_TOKEN:
        gate_b = tl.load(gate_ptr + b * D + cols, mask=cmask).to(ACC)
        acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=ACC)
    for l0 in range(l_start, l_end, BLOCK_R):
        tokens = l0 + tl.arange(0, BLOCK_R)
        mask = (tokens < l_end)[:, None] & cmask[None, :]
        offs = (b * L + tokens)[:, None] * D + cols[None, :]
        g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(ACC)
        y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(ACC)
        if PER_TOKEN:
            gate = tl.load(gate_ptr + offs, mask=mask).to(ACC)
            tl.store(dgate_ptr + offs, (g * y).to(dgate_ptr.dtype.element_ty), mask=mask)
        else:
            gate = gate_b[None, :]
            acc += g * y
        tl.store(dy_ptr + offs, (gate * g).to(dy_ptr.dtype.element_ty), mask=mask)
    if not PER_TOKEN:
        parts = part_ptr + b * n_chunks * D
        tl.store(parts + c * D + cols, tl.sum(acc, axis=0), mask=cmask)
        if _common.last_to_arrive(count_ptr + b * tl.num_programs(1) + tl.program_id(1), n_chunks):
            dgate = _common.sum_parts(parts, D, n_chunks, cols, cmask)
            tl.store(dgate_ptr + b * D + cols, dgate.to(dgate_ptr.dtype.element_ty), mask=cmask)


# ---------------------------------------------------------------------------------------------------- launchers
@functools.lru_cache(maxsize=None)
def _default(family, D):
    """Default configuration of `family` at width D (returned shared: not to be modified)."""
    if family.startswith("ln_"):  # whole rows per tile
        block = _common.block_d(D, LN_BLOCK_CAP)
        rows = _common.rows_per_tile(block)
        return {"BLOCK_R": rows, "num_warps": _common.num_warps(rows * block)}
    block = _common.least_waste_block(D, GATE_BLOCK_CAP)
    rows = _common.rows_per_tile(block)
    return {"BLOCK_R": rows, "BLOCK_D": block, "num_warps": _common.num_warps(rows * block)}


def _config(family, D, n_rows, device):
    """(BLOCK_R, BLOCK_D, num_warps) of `family` at width D for n_rows rows: the tuned configuration, with the
    column block no wider than D needs (LayerNorm: `ln_block`) and no more rows than there are."""
    config = tuned(family, _common.width_key(D), _default(family, D), device)
    block_r = config["BLOCK_R"]
    return _fit(family, D, min(n_rows, block_r), block_r, config.get("BLOCK_D"), config["num_warps"])


@functools.lru_cache(maxsize=1024)
def _fit(family, D, n_rows, block_r, block_d, warps):
    """_config's arithmetic, once per configuration and shape (n_rows capped at block_r: all it can change)."""
    if family.startswith("ln_"):
        block = ln_block(D, block_d, "layernorm_modulate")
    else:
        block = min(block_d, _common.block_d(D, GATE_BLOCK_CAP))
    return _common.rows(block_r, n_rows), block, warps


def ln_block(D, block_d, op):
    """Columns per chunk of a LayerNorm kernel at width D for a configuration's BLOCK_D (None: not given): that
    block when narrower than the row (the kernel walks the row in chunks: ONE_CHUNK is block >= D), else the whole
    row rounded up to a power of two, held in registers (at most LN_BLOCK_CAP columns)."""
    if block_d is not None and block_d < D:
        return block_d
    if D > LN_BLOCK_CAP:  # a whole-row tile this wide would not fit
        raise ValueError(f"{op} (triton): feature width {D} is over the {LN_BLOCK_CAP} columns a row tile holds")
    return _common.block_d(D, LN_BLOCK_CAP)


def is_per_token(cond, x):
    """True when conditioning `cond` is per token ([B, L, D] with L > 1 tokens of x); a per-sample [B, D] or
    [B, 1, D] tensor is read as [B, D]."""
    return cond.dim() == 3 and cond.shape[1] == x.shape[1] and x.shape[1] != 1


@functools.lru_cache(maxsize=1024)
def _token_chunks(length, block_r, other_programs):
    """(tokens per program, programs per sample) of a backward pass over each sample's tokens: whole row tiles,
    split so the reduction order depends on the shapes only."""
    per_tiles, chunks = _common.split(_common.cdiv(length, block_r), other_programs)
    return per_tiles * block_r, chunks


def _check(x, *conds):
    _common.require_contiguous(x, "x")
    for t in conds:
        _common.require_contiguous(t, "conditioning")


def layernorm_modulate_fwd(x, shift, scale, eps):
    """LayerNorm(x) * (1 + scale) + shift. x [B, L, D] contiguous; shift, scale contiguous [B, D] (or [B, 1, D])
    or [B, L, D], same shape. Returns (out [B, L, D] dtype promote(x, shift, scale), mean [B, L], rstd [B, L])
    with the statistics of x in the arithmetic dtype (float32, float64 for fp64 inputs)."""
    _check(x, shift, scale)
    B, L, D = x.shape
    dtype = result_dtype(x, shift, scale)
    stat_dtype = _common.torch_acc_dtype(dtype)
    out = _common.empty_like(x, dtype)
    mean = _common.empty((B, L), stat_dtype, x.device)
    rstd = _common.empty((B, L), stat_dtype, x.device)
    if out.numel() == 0:  # the statistics are read only by a backward with tokens to differentiate
        return out, mean, rstd
    block_r, block, warps = _config("ln_modulate_fwd", D, B * L, x.device)
    _common.launch(_ln_modulate_fwd_kernel, (_common.cdiv(B * L, block_r),), out, mean, rstd, x, shift, scale, B * L,
                   L, D, eps, PER_TOKEN=is_per_token(shift, x), ACC=_common.acc_dtype(stat_dtype), BLOCK_R=block_r,
                   BLOCK_D=block, ONE_CHUNK=block >= D, num_warps=warps)
    return out, mean, rstd


def layernorm_modulate_bwd(grad, x, scale, mean, rstd, shift_dtype):
    """Backward of layernorm_modulate_fwd from the forward's x, scale and statistics (shift itself is not needed,
    its dtype is: its grad is written in it). All inputs contiguous.
    Returns (dx like x, dshift like scale in shift_dtype, dscale like scale)."""
    _check(grad, x, scale, mean, rstd)
    B, L, D = x.shape
    per_token = is_per_token(scale, x)
    dx, dshift, dscale = _common.empty_like(x), _common.empty_like(scale, shift_dtype), _common.empty_like(scale)
    if dx.numel() == 0:  # no tokens: per-sample grads are empty sums
        return dx, dshift.zero_(), dscale.zero_()
    block_r, block, warps = _config("ln_modulate_bwd", D, L, x.device)
    rows_per_prog, chunks = _token_chunks(L, block_r, B)
    part_dtype = _common.torch_acc_dtype(grad.dtype, x.dtype, scale.dtype, mean.dtype, shift_dtype)
    part = _common.empty((0,) if per_token else (B, chunks, 2, D), part_dtype, x.device)
    count = _common.counters(0 if per_token else B, x.device)
    _common.launch(_ln_modulate_bwd_kernel, (B * chunks,), dx, dshift, dscale, part, count, grad, x, scale, mean,
                   rstd, L, D, rows_per_prog, chunks, PER_TOKEN=per_token, ACC=_common.acc_dtype(part_dtype),
                   BLOCK_R=block_r, BLOCK_D=block, ONE_CHUNK=block >= D, num_warps=warps)
    return dx, dshift, dscale


def gated_residual_fwd(x, y, gate):
    """x + gate * y. x, y [B, L, D] contiguous; gate contiguous [B, D] (or [B, 1, D]) or [B, L, D].
    Returns [B, L, D], dtype promote(x, y, gate)."""
    _check(x, y, gate)
    B, L, D = x.shape
    dtype = result_dtype(x, y, gate)
    out = _common.empty_like(x, dtype)
    if out.numel() == 0:
        return out
    block_r, block, warps = _config("gated_residual_fwd", D, B * L, x.device)
    _common.launch(_gated_residual_fwd_kernel, (_common.cdiv(B * L, block_r), _common.cdiv(D, block)), out, x, y, gate,
                   B * L, L, D, PER_TOKEN=is_per_token(gate, x), ACC=_common.acc_dtype(dtype), BLOCK_R=block_r,
                   BLOCK_D=block, num_warps=warps)
    return out


def gated_residual_bwd(grad, y, gate):
    """Backward of gated_residual_fwd for y and gate (grad x is grad itself). All inputs contiguous.
    Returns (dy like y, dgate like gate)."""
    _check(grad, y, gate)
    B, L, D = y.shape
    per_token = is_per_token(gate, y)
    dy, dgate = _common.empty_like(y), _common.empty_like(gate)
    if dy.numel() == 0:  # no tokens: a per-sample grad is an empty sum
        return dy, dgate.zero_()
    block_r, block, warps = _config("gated_residual_bwd", D, L, y.device)
    n_blocks = _common.cdiv(D, block)
    rows_per_prog, chunks = _token_chunks(L, block_r, B * n_blocks)
    part_dtype = _common.torch_acc_dtype(grad.dtype, y.dtype, gate.dtype)
    part = _common.empty((0,) if per_token else (B, chunks, D), part_dtype, y.device)
    count = _common.counters(0 if per_token else B * n_blocks, y.device)
    _common.launch(_gated_residual_bwd_kernel, (B * chunks, n_blocks), dy, dgate, part, count, grad, y, gate, L, D,
                   rows_per_prog, chunks, PER_TOKEN=per_token, ACC=_common.acc_dtype(part_dtype), BLOCK_R=block_r,
                   BLOCK_D=block, num_warps=warps)
    return dy, dgate
