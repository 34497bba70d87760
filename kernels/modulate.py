"""Triton kernels for DiT's adaLN glue: LayerNorm + modulation, and the gated residual.

Rows are tokens of x [B, L, D] (contiguous). The conditioning tensors (shift, scale, gate) are either per sample
[B, D] (row b*L + l reads conditioning row b) or per token [B, L, D] (row r reads row r): the PER_TOKEN flag.
Arithmetic is fp32 (fp64 for fp64 inputs) with one rounding on store.

Programs work on [BLOCK_R rows, BLOCK_D columns] tiles (LayerNorm: whole rows). Backward reductions over tokens
(grads of per-sample shift/scale/gate) are deterministic and finish inside the kernel: a program owns a chunk of
one sample's tokens, sums it in registers and stores one partial row; the last program of the sample to arrive
(_common.last_to_arrive) adds the partial rows in chunk order and stores the gradient. Per-token conditioning
grads are stored directly. L (tokens per sample) and the chunk length are runtime arguments (no recompiles per
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

LN_BLOCK_CAP = 65536   # LayerNorm keeps whole rows in registers: D up to this width
GATE_BLOCK_CAP = 1024  # gated residual is elementwise over columns

# Candidates that spill in the offline sm_90 compile at D = 1152 are left out (4 rows: 8 warps forward, 4 backward).
TUNING = {
    "ln_modulate_fwd": [{"BLOCK_R": r, "num_warps": w} for r, w in ((1, 4), (1, 8), (2, 4), (2, 8), (4, 4))],
    "ln_modulate_bwd": [{"BLOCK_R": r, "num_warps": w} for r, w in ((1, 4), (1, 8), (2, 4), (2, 8), (4, 8))],
    "gated_residual_fwd": [{"BLOCK_R": r, "BLOCK_D": d, "num_warps": w}
                           for r, d in ((2, 1024), (4, 512), (8, 256), (16, 128)) for w in (4, 8)],
    "gated_residual_bwd": [{"BLOCK_R": r, "BLOCK_D": d, "num_warps": w}
                           for r, d in ((2, 1024), (4, 512), (8, 256), (16, 128)) for w in (4, 8)],
}


@triton.jit(do_not_specialize=["n_rows", "L"])
def _ln_modulate_fwd_kernel(
    out_ptr,      # [B*L, D] output, contiguous, dtype promote(x, shift, scale)
    x_ptr,        # [B*L, D] input rows, contiguous
    shift_ptr,    # [B, D] or [B*L, D] contiguous
    scale_ptr,    # same layout as shift
    n_rows, L, D,  # B*L, tokens per sample, row width
    eps,          # LayerNorm epsilon
    PER_TOKEN: tl.constexpr,  # conditioning indexed by row (True) or by sample (False)
    ACC: tl.constexpr,        # arithmetic dtype
    BLOCK_R: tl.constexpr,    # rows per program
    BLOCK_D: tl.constexpr,    # >= D: whole rows
):
    # out = (x - mean) * rstd * (1 + scale) + shift, statistics in ACC; grid (cdiv(B*L, BLOCK_R),)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    crows = rows if PER_TOKEN else rows // L
    cols = tl.arange(0, BLOCK_D)
    mask = (rows < n_rows)[:, None] & (cols < D)[None, :]
    x = tl.load(x_ptr + rows[:, None] * D + cols[None, :], mask=mask, other=0.0).to(ACC)
    mean = tl.sum(x, axis=1) / D
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / D + eps)
    coffs = crows[:, None] * D + cols[None, :]
    shift = tl.load(shift_ptr + coffs, mask=mask).to(ACC)
    scale = tl.load(scale_ptr + coffs, mask=mask).to(ACC)
    y = xc * rstd[:, None] * (1.0 + scale) + shift
    tl.store(out_ptr + rows[:, None] * D + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["L", "ROWS_PER_PROG", "n_chunks"])
def _ln_modulate_bwd_kernel(
    dx_ptr,       # [B*L, D] grad of x, contiguous
    dshift_ptr,   # grad of shift: [B*L, D] (PER_TOKEN) or [B, D]
    dscale_ptr,   # grad of scale, like dshift_ptr
    part_ptr,     # per sample: [B, n_chunks, 2, D] ACC partial sums of (dshift, dscale)
    count_ptr,    # per sample: [B] int32 arrival counters, zeroed
    dy_ptr,       # [B*L, D] grad of the output, contiguous
    x_ptr,        # [B*L, D] forward input (statistics are recomputed, not stored)
    scale_ptr,    # [B, D] or [B*L, D] forward scale
    L, D,         # tokens per sample, row width
    eps,          # LayerNorm epsilon
    ROWS_PER_PROG,  # tokens of one sample handled by one program (a multiple of BLOCK_R)
    n_chunks,     # programs per sample = cdiv(L, ROWS_PER_PROG)
    PER_TOKEN: tl.constexpr,  # conditioning indexed by row (True) or by sample (False)
    ACC: tl.constexpr,        # arithmetic dtype
    BLOCK_R: tl.constexpr,    # rows per loop step
    BLOCK_D: tl.constexpr,    # >= D: whole rows
):
    # grid (B * n_chunks,): program p owns tokens [c*R, min((c+1)*R, L)) of sample b = p // n_chunks
    pid = tl.program_id(0)
    b = (pid // n_chunks).to(tl.int64)
    c = pid % n_chunks
    l_start = c * ROWS_PER_PROG
    l_end = tl.minimum(l_start + ROWS_PER_PROG, L)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    if not PER_TOKEN:
        scale_b = tl.load(scale_ptr + b * D + cols, mask=cmask, other=0.0).to(ACC)
        acc_shift = tl.zeros([BLOCK_R, BLOCK_D], dtype=ACC)
        acc_scale = tl.zeros([BLOCK_R, BLOCK_D], dtype=ACC)
    for l0 in range(l_start, l_end, BLOCK_R):
        tokens = l0 + tl.arange(0, BLOCK_R)
        mask = (tokens < l_end)[:, None] & cmask[None, :]
        offs = (b * L + tokens)[:, None] * D + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        mean = tl.sum(x, axis=1) / D
        xc = tl.where(mask, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / D + eps)
        xhat = xc * rstd[:, None]
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
    block = _common.block_d(D, GATE_BLOCK_CAP)
    rows = _common.rows_per_tile(block)
    return {"BLOCK_R": rows, "BLOCK_D": block, "num_warps": _common.num_warps(rows * block)}


def _config(family, D, n_rows, device):
    """(BLOCK_R, BLOCK_D, num_warps) of `family` at width D for n_rows rows: the tuned configuration, with the
    column block no wider than D needs (LayerNorm: whole rows) and no more rows than there are."""
    config = tuned(family, _common.width_key(D), _default(family, D), device)
    block_r = config["BLOCK_R"]
    return _fit(family, D, min(n_rows, block_r), block_r, config.get("BLOCK_D"), config["num_warps"])


@functools.lru_cache(maxsize=1024)
def _fit(family, D, n_rows, block_r, block_d, warps):
    """_config's arithmetic, once per configuration and shape (n_rows capped at block_r: all it can change)."""
    if family.startswith("ln_") and D > LN_BLOCK_CAP:  # the kernels hold whole rows: wider ones would be cut
        raise ValueError(f"layernorm_modulate (triton): feature width {D} is over the {LN_BLOCK_CAP} columns a row "
                         "tile holds")
    if family.startswith("ln_"):
        block = _common.block_d(D, LN_BLOCK_CAP)
    else:
        block = min(block_d, _common.block_d(D, GATE_BLOCK_CAP))
    return _common.rows(block_r, n_rows), block, warps


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
    or [B, L, D], same shape. Returns [B, L, D], dtype promote(x, shift, scale)."""
    _check(x, shift, scale)
    B, L, D = x.shape
    dtype = result_dtype(x, shift, scale)
    out = _common.empty_like(x, dtype)
    if out.numel() == 0:
        return out
    block_r, block, warps = _config("ln_modulate_fwd", D, B * L, x.device)
    _common.launch(_ln_modulate_fwd_kernel, (_common.cdiv(B * L, block_r),), out, x, shift, scale, B * L, L, D, eps,
                   PER_TOKEN=is_per_token(shift, x), ACC=_common.acc_dtype(dtype), BLOCK_R=block_r, BLOCK_D=block,
                   num_warps=warps)
    return out


def layernorm_modulate_bwd(grad, x, shift, scale, eps):
    """Backward of layernorm_modulate_fwd (statistics recomputed from x). All inputs contiguous.
    Returns (dx like x, dshift like shift, dscale like scale)."""
    _check(grad, x, shift, scale)
    B, L, D = x.shape
    per_token = is_per_token(shift, x)
    dx, dshift, dscale = _common.empty_like(x), _common.empty_like(shift), _common.empty_like(scale)
    if dx.numel() == 0:  # no tokens: per-sample grads are empty sums
        return dx, dshift.zero_(), dscale.zero_()
    block_r, block, warps = _config("ln_modulate_bwd", D, L, x.device)
    rows_per_prog, chunks = _token_chunks(L, block_r, B)
    part_dtype = _common.torch_acc_dtype(grad.dtype, x.dtype, shift.dtype, scale.dtype)
    part = _common.empty((0,) if per_token else (B, chunks, 2, D), part_dtype, x.device)
    count = _common.counters(0 if per_token else B, x.device)
    _common.launch(_ln_modulate_bwd_kernel, (B * chunks,), dx, dshift, dscale, part, count, grad, x, scale, L, D,
                   eps, rows_per_prog, chunks, PER_TOKEN=per_token, ACC=_common.acc_dtype(part_dtype),
                   BLOCK_R=block_r, BLOCK_D=block, num_warps=warps)
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
