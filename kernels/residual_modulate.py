"""Triton kernels of the fused gated residual + LayerNorm-modulate of DiT blocks:

    x_new = x + gate * y;  h = LayerNorm(x_new) * (1 + scale) + shift

Rows are tokens of x [B, L, D] (contiguous); gate, shift and scale are all per sample [B, D] (row b*L + l reads
conditioning row b) or all per token [B, L, D] (the PER_TOKEN flag). Arithmetic is fp32 (fp64 for fp64
inputs). x_new is rounded to its dtype once, and h is the LayerNorm-modulate of x_new as stored, so the pair
is exactly what the two separate ops would return up to their internal rounding.

The forward reads x and y once and writes x_new, h and the per-row statistics (mean, rstd in the arithmetic
dtype) that the backward reads instead of recomputing them. The backward reads the two incoming gradients,
x_new and y once and writes dx and dy; the grads of per-sample gate/shift/scale are reduced over tokens inside
the kernel, deterministically (the scheme of kernels/modulate.py: one partial row per program and sample, added
in chunk order by the last program to arrive). Both kernels keep whole rows in registers unless the configuration
gives a narrower BLOCK_D; then they walk rows in chunks as kernels/modulate.py's LayerNorm kernels do, reading
their inputs a second time (mostly from L1/L2): the forward stores x_new in its first pass and reads it back as
stored in the second, so the guarantee above holds. L (tokens per sample), D and the chunk length are runtime
arguments (no recompiles per mask ratio).

Launch configurations come from kernels/_config.py (`tuned(family, "D=<width>", default)`); `TUNING` lists the
candidates a GPU sweep may time for each family.
"""
import functools

import triton
import triton.language as tl

from maskdit_fast.backend import result_dtype
from maskdit_fast.kernels import _common
from maskdit_fast.kernels._config import tuned
from maskdit_fast.kernels.modulate import LN_BLOCK_CAP, LN_CHUNKED, is_per_token, ln_block

# Every candidate and default compiles for sm_90 without spills at D = 1152 and 512, per-sample and per-token
# conditioning (benchmarks/compile_sm90.py's compile of the launchers' calls); the backward's 4 whole rows on 4
# warps spilled at D = 1152 and is left out. The candidates with BLOCK_D walk rows in chunks (kernels/modulate.py's
# LN_CHUNKED).
TUNING = {
    "residual_ln_modulate_fwd": [{"BLOCK_R": r, "num_warps": w} for r in (1, 2, 4) for w in (4, 8)] + LN_CHUNKED,
    "residual_ln_modulate_bwd": [{"BLOCK_R": r, "num_warps": w} for r, w in ((1, 4), (1, 8), (2, 4), (2, 8), (4, 8))]
                                + LN_CHUNKED,
}


@triton.jit(do_not_specialize=["n_rows", "L"])
def _residual_ln_modulate_fwd_kernel(
    xn_ptr,       # [B*L, D] x_new output, contiguous, dtype promote(x, y, gate)
    h_ptr,        # [B*L, D] h output, contiguous, dtype promote(x_new, shift, scale)
    mean_ptr,     # [B*L] ACC row means of x_new
    rstd_ptr,     # [B*L] ACC row 1 / sqrt(var + eps) of x_new
    x_ptr,        # [B*L, D] residual stream, contiguous
    y_ptr,        # [B*L, D] branch output, contiguous
    gate_ptr,     # [B, D] or [B*L, D] contiguous
    shift_ptr,    # same layout as gate
    scale_ptr,    # same layout as gate
    n_rows, L, D,  # B*L, tokens per sample, row width
    eps,          # LayerNorm epsilon
    PER_TOKEN: tl.constexpr,  # conditioning indexed by row (True) or by sample (False)
    ACC: tl.constexpr,        # arithmetic dtype
    BLOCK_R: tl.constexpr,    # rows per program
    BLOCK_D: tl.constexpr,    # columns per chunk: >= D (whole rows) when ONE_CHUNK
    ONE_CHUNK: tl.constexpr,  # the row is one chunk held in registers (else: two passes over BLOCK_D chunks)
):
    # grid (cdiv(B*L, BLOCK_R),)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    crows = rows if PER_TOKEN else rows // L
    rmask = rows < n_rows
    if ONE_CHUNK:
        cols = tl.arange(0, BLOCK_D)
        mask = rmask[:, None] & (cols < D)[None, :]
        offs = rows[:, None] * D + cols[None, :]
        coffs = crows[:, None] * D + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(ACC)
        gate = tl.load(gate_ptr + coffs, mask=mask, other=0.0).to(ACC)
        xn = (x + gate * y).to(xn_ptr.dtype.element_ty)
        tl.store(xn_ptr + offs, xn, mask=mask)
        xn = xn.to(ACC)  # h normalises x_new as stored
        mean = tl.sum(xn, axis=1) / D
        xc = tl.where(mask, xn - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / D + eps)
        tl.store(mean_ptr + rows, mean, mask=rmask)
        tl.store(rstd_ptr + rows, rstd, mask=rmask)
        shift = tl.load(shift_ptr + coffs, mask=mask).to(ACC)
        scale = tl.load(scale_ptr + coffs, mask=mask).to(ACC)
        h = xc * rstd[:, None] * (1.0 + scale) + shift
        tl.store(h_ptr + offs, h.to(h_ptr.dtype.element_ty), mask=mask)
    else:
        # the first pass stores x_new and takes its statistics; the second reads x_new back as stored (one read,
        # mostly from L2, instead of x, y and gate again) and normalises it
        mean = tl.zeros([BLOCK_R], dtype=ACC)
        m2 = tl.zeros([BLOCK_R], dtype=ACC)
        for d0 in range(0, D, BLOCK_D):
            _, mask, offs, coffs = _common.chunk(rows, crows, rmask, d0, D, BLOCK_D)
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
            y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(ACC)
            gate = tl.load(gate_ptr + coffs, mask=mask, other=0.0).to(ACC)
            xn = (x + gate * y).to(xn_ptr.dtype.element_ty)
            tl.store(xn_ptr + offs, xn, mask=mask)
            mean, m2 = _common.merge_moments(mean, m2, xn.to(ACC), mask, d0, D, BLOCK_D)
        rstd = 1.0 / tl.sqrt(m2 / D + eps)
        tl.store(mean_ptr + rows, mean, mask=rmask)
        tl.store(rstd_ptr + rows, rstd, mask=rmask)
        tl.debug_barrier()  # x_new is read back by threads that may not be the ones that stored it
        for d0 in range(0, D, BLOCK_D):
            _, mask, offs, coffs = _common.chunk(rows, crows, rmask, d0, D, BLOCK_D)
            xn = tl.load(xn_ptr + offs, mask=mask, other=0.0).to(ACC)
            shift = tl.load(shift_ptr + coffs, mask=mask).to(ACC)
            scale = tl.load(scale_ptr + coffs, mask=mask).to(ACC)
            h = (xn - mean[:, None]) * rstd[:, None] * (1.0 + scale) + shift
            tl.store(h_ptr + offs, h.to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _residual_ln_modulate_bwd_chunked(
    dx_ptr, dy_ptr, dgate_ptr, dshift_ptr, dscale_ptr,  # as in _residual_ln_modulate_bwd_kernel
    parts,        # per sample: this sample's [n_chunks, 3, D] partial sums
    count_ptr,    # per sample: this sample's arrival counter
    gxn_ptr, gh_ptr, xn_ptr, y_ptr, gate_ptr, scale_ptr, mean_ptr, rstd_ptr,  # as in the kernel
    b, c,         # this program's sample and its chunk of the sample's tokens
    l_start, l_end,  # the chunk's tokens
    L, D, n_chunks,
    PER_TOKEN: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,    # rows per loop step
    BLOCK_D: tl.constexpr,    # columns per chunk (< D)
):
    """_residual_ln_modulate_bwd_kernel on rows walked in BLOCK_D-column chunks, the scheme of
    kernels/modulate.py's _ln_modulate_bwd_chunked: per token tile, one pass over the chunks for the row means of
    the LayerNorm backward, a second that writes dx and dy and adds the per-sample column sums into the program's
    own partial rows (read-modify-write, L1/L2 traffic), summed in chunk order by the last program to arrive."""
    own = parts + c * 3 * D
    for l0 in range(l_start, l_end, BLOCK_R):
        tokens = l0 + tl.arange(0, BLOCK_R)
        rmask = tokens < l_end
        rows = b * L + tokens
        mean_dxhat, mean_dxhat_xhat = _common.dxhat_row_means(xn_ptr, mean_ptr, rstd_ptr, gh_ptr, scale_ptr, b, rows,
                                                               rmask, D, PER_TOKEN, ACC, BLOCK_R, BLOCK_D)
        for d0 in range(0, D, BLOCK_D):
            cols, mask, offs, coffs, xhat, rstd, dh, dxhat = _common.ln_bwd_chunk(
                xn_ptr, mean_ptr, rstd_ptr, gh_ptr, scale_ptr, b, rows, rmask, d0, D, PER_TOKEN, ACC, BLOCK_D)
            g = tl.load(gxn_ptr + offs, mask=mask, other=0.0).to(ACC)
            g += (dxhat - mean_dxhat[:, None] - xhat * mean_dxhat_xhat[:, None]) * rstd[:, None]
            tl.store(dx_ptr + offs, g.to(dx_ptr.dtype.element_ty), mask=mask)
            gate = tl.load(gate_ptr + coffs, mask=mask, other=0.0).to(ACC)
            tl.store(dy_ptr + offs, (gate * g).to(dy_ptr.dtype.element_ty), mask=mask)
            dgate = g * tl.load(y_ptr + offs, mask=mask, other=0.0).to(ACC)
            if PER_TOKEN:
                tl.store(dgate_ptr + offs, dgate.to(dgate_ptr.dtype.element_ty), mask=mask)
                tl.store(dshift_ptr + offs, dh.to(dshift_ptr.dtype.element_ty), mask=mask)
                tl.store(dscale_ptr + offs, (dh * xhat).to(dscale_ptr.dtype.element_ty), mask=mask)
            else:
                _common.add_to_part(own + cols, tl.sum(dgate, axis=0), cols < D, l0 > l_start)
                _common.add_to_part(own + D + cols, tl.sum(dh, axis=0), cols < D, l0 > l_start)
                _common.add_to_part(own + 2 * D + cols, tl.sum(dh * xhat, axis=0), cols < D, l0 > l_start)
        if not PER_TOKEN:
            tl.debug_barrier()
    if not PER_TOKEN:
        if _common.last_to_arrive(count_ptr, n_chunks):
            _common.store_sum_of_parts(dgate_ptr + b * D, parts, 3 * D, n_chunks, D, BLOCK_D)
            _common.store_sum_of_parts(dshift_ptr + b * D, parts + D, 3 * D, n_chunks, D, BLOCK_D)
            _common.store_sum_of_parts(dscale_ptr + b * D, parts + 2 * D, 3 * D, n_chunks, D, BLOCK_D)


@triton.jit(do_not_specialize=["L", "ROWS_PER_PROG", "n_chunks"])
def _residual_ln_modulate_bwd_kernel(
    dx_ptr,       # [B*L, D] grad of x (dtype of x_new), contiguous
    dy_ptr,       # [B*L, D] grad of y, contiguous
    dgate_ptr,    # grad of gate: [B*L, D] (PER_TOKEN) or [B, D]
    dshift_ptr,   # grad of shift (in shift's dtype), like dgate_ptr
    dscale_ptr,   # grad of scale, like dgate_ptr
    part_ptr,     # per sample: [B, n_chunks, 3, D] ACC partial sums of (dgate, dshift, dscale)
    count_ptr,    # per sample: [B] int32 arrival counters, zeroed
    gxn_ptr,      # [B*L, D] incoming grad of x_new, contiguous
    gh_ptr,       # [B*L, D] incoming grad of h, contiguous
    xn_ptr,       # [B*L, D] forward x_new
    y_ptr,        # [B*L, D] forward branch output
    gate_ptr,     # [B, D] or [B*L, D] forward gate
    scale_ptr,    # same layout as gate: forward scale
    mean_ptr,     # [B*L] forward row statistics
    rstd_ptr,     # [B*L]
    L, D,         # tokens per sample, row width
    ROWS_PER_PROG,  # tokens of one sample handled by one program (a multiple of BLOCK_R)
    n_chunks,     # programs per sample = cdiv(L, ROWS_PER_PROG)
    PER_TOKEN: tl.constexpr,  # conditioning indexed by row (True) or by sample (False)
    ACC: tl.constexpr,        # arithmetic dtype
    BLOCK_R: tl.constexpr,    # rows per loop step
    BLOCK_D: tl.constexpr,    # columns per chunk: >= D (whole rows) when ONE_CHUNK
    ONE_CHUNK: tl.constexpr,  # the row is one chunk held in registers (else: _residual_ln_modulate_bwd_chunked)
):
    # grid (B * n_chunks,): program p owns tokens [c*R, min((c+1)*R, L)) of sample b = p // n_chunks.
    # g, the whole grad of x_new, is the incoming one plus LayerNorm's backward of dh * (1 + scale); then
    # dx = g, dy = gate * g, dgate = g * y, dshift = dh, dscale = dh * xhat.
    pid = tl.program_id(0)
    b = (pid // n_chunks).to(tl.int64)
    c = pid % n_chunks
    l_start = c * ROWS_PER_PROG
    l_end = tl.minimum(l_start + ROWS_PER_PROG, L)
    if ONE_CHUNK:
        cols = tl.arange(0, BLOCK_D)
        cmask = cols < D
        if not PER_TOKEN:
            gate_b = tl.load(gate_ptr + b * D + cols, mask=cmask, other=0.0).to(ACC)
            scale_b = tl.load(scale_ptr + b * D + cols, mask=cmask, other=0.0).to(ACC)
            acc_gate = tl.zeros([BLOCK_R, BLOCK_D], dtype=ACC)
            acc_shift = tl.zeros([BLOCK_R, BLOCK_D], dtype=ACC)
            acc_scale = tl.zeros([BLOCK_R, BLOCK_D], dtype=ACC)
        for l0 in range(l_start, l_end, BLOCK_R):
            tokens = l0 + tl.arange(0, BLOCK_R)
            rmask = tokens < l_end
            mask = rmask[:, None] & cmask[None, :]
            rows = b * L + tokens
            offs = rows[:, None] * D + cols[None, :]
            xhat, rstd = _common.normalized_tile(xn_ptr, mean_ptr, rstd_ptr, rows, offs, rmask, mask, ACC)
            dh = tl.load(gh_ptr + offs, mask=mask, other=0.0).to(ACC)
            if PER_TOKEN:
                gate = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(ACC)
                scale = tl.load(scale_ptr + offs, mask=mask, other=0.0).to(ACC)
                tl.store(dshift_ptr + offs, dh.to(dshift_ptr.dtype.element_ty), mask=mask)
                tl.store(dscale_ptr + offs, (dh * xhat).to(dscale_ptr.dtype.element_ty), mask=mask)
            else:
                gate = gate_b[None, :]
                scale = scale_b[None, :]
                acc_shift += dh
                acc_scale += dh * xhat
            # padded rows and columns are 0 in dh and xhat, and their rstd is 0: g is 0 there
            dxhat = dh * (1.0 + scale)
            mean_dxhat = tl.sum(dxhat, axis=1) / D
            mean_dxhat_xhat = tl.sum(dxhat * xhat, axis=1) / D
            g = tl.load(gxn_ptr + offs, mask=mask, other=0.0).to(ACC)
            g += (dxhat - mean_dxhat[:, None] - xhat * mean_dxhat_xhat[:, None]) * rstd[:, None]
            tl.store(dx_ptr + offs, g.to(dx_ptr.dtype.element_ty), mask=mask)
            tl.store(dy_ptr + offs, (gate * g).to(dy_ptr.dtype.element_ty), mask=mask)
            y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(ACC)
            if PER_TOKEN:
                tl.store(dgate_ptr + offs, (g * y).to(dgate_ptr.dtype.element_ty), mask=mask)
            else:
                acc_gate += g * y
        if not PER_TOKEN:
            parts = part_ptr + b * n_chunks * 3 * D
            tl.store(parts + c * 3 * D + cols, tl.sum(acc_gate, axis=0), mask=cmask)
            tl.store(parts + c * 3 * D + D + cols, tl.sum(acc_shift, axis=0), mask=cmask)
            tl.store(parts + c * 3 * D + 2 * D + cols, tl.sum(acc_scale, axis=0), mask=cmask)
            if _common.last_to_arrive(count_ptr + b, n_chunks):
                dgate = _common.sum_parts(parts, 3 * D, n_chunks, cols, cmask)
                dshift = _common.sum_parts(parts + D, 3 * D, n_chunks, cols, cmask)
                dscale = _common.sum_parts(parts + 2 * D, 3 * D, n_chunks, cols, cmask)
                tl.store(dgate_ptr + b * D + cols, dgate.to(dgate_ptr.dtype.element_ty), mask=cmask)
                tl.store(dshift_ptr + b * D + cols, dshift.to(dshift_ptr.dtype.element_ty), mask=cmask)
                tl.store(dscale_ptr + b * D + cols, dscale.to(dscale_ptr.dtype.element_ty), mask=cmask)
    else:
        _residual_ln_modulate_bwd_chunked(dx_ptr, dy_ptr, dgate_ptr, dshift_ptr, dscale_ptr,
                                          part_ptr + b * n_chunks * 3 * D, count_ptr + b, gxn_ptr, gh_ptr, xn_ptr,
                                          y_ptr, gate_ptr, scale_ptr, mean_ptr, rstd_ptr, b, c, l_start, l_end, L, D,
                                          n_chunks, PER_TOKEN, ACC, BLOCK_R, BLOCK_D)


# ---------------------------------------------------------------------------------------------------- launchers
@functools.lru_cache(maxsize=None)
def _default(D):
    """Default configuration at width D, both directions (returned shared: not to be modified): whole rows."""
    block = _common.block_d(D, LN_BLOCK_CAP)
    rows = _common.rows_per_tile(block)
    return {"BLOCK_R": rows, "num_warps": _common.num_warps(rows * block)}


def _config(family, D, n_rows, device):
    """(BLOCK_R, BLOCK_D, num_warps) of `family` at width D for n_rows rows: the tuned configuration, whole rows
    or its chunks (`ln_block`), no more rows than there are."""
    config = tuned(family, _common.width_key(D), _default(D), device)
    block = ln_block(D, config.get("BLOCK_D"), "residual_layernorm_modulate")
    return _common.rows(config["BLOCK_R"], n_rows), block, config["num_warps"]


def _check(*tensors):
    for t in tensors:
        _common.require_contiguous(t, "every input")


def residual_layernorm_modulate_fwd(x, y, gate, shift, scale, eps):
    """x_new = x + gate * y and h = LayerNorm(x_new) * (1 + scale) + shift. x, y [B, L, D] contiguous; gate, shift,
    scale contiguous, one shape: [B, D] (or [B, 1, D]) or [B, L, D].
    Returns (x_new [B, L, D] dtype promote(x, y, gate), h [B, L, D] dtype promote(x_new, shift, scale),
    mean [B, L], rstd [B, L]) with the statistics in the arithmetic dtype (float32, float64 for fp64 inputs)."""
    _check(x, y, gate, shift, scale)
    B, L, D = x.shape
    xn_dtype = result_dtype(x, y, gate)
    h_dtype = result_dtype(x, y, gate, shift, scale)
    stat_dtype = _common.torch_acc_dtype(h_dtype)
    xn = _common.empty((B, L, D), xn_dtype, x.device)
    h = _common.empty((B, L, D), h_dtype, x.device)
    mean = _common.empty((B, L), stat_dtype, x.device)
    rstd = _common.empty((B, L), stat_dtype, x.device)
    if xn.numel() == 0:  # the statistics are read only by a backward with tokens to differentiate
        return xn, h, mean, rstd
    block_r, block, warps = _config("residual_ln_modulate_fwd", D, B * L, x.device)
    _common.launch(_residual_ln_modulate_fwd_kernel, (_common.cdiv(B * L, block_r),), xn, h, mean, rstd, x, y,
                   gate, shift, scale, B * L, L, D, eps, PER_TOKEN=is_per_token(gate, x),
                   ACC=_common.acc_dtype(stat_dtype), BLOCK_R=block_r, BLOCK_D=block, ONE_CHUNK=block >= D,
                   num_warps=warps)
    return xn, h, mean, rstd


def residual_layernorm_modulate_bwd(grad_xn, grad_h, xn, y, gate, scale, mean, rstd, shift_dtype):
    """Backward of residual_layernorm_modulate_fwd from the grads of x_new and h, with the forward's x_new, y,
    gate, scale and statistics. All inputs contiguous.
    Returns (dx like x_new, dy like y, dgate like gate, dshift like scale in shift_dtype, dscale like scale)."""
    _check(grad_xn, grad_h, xn, y, gate, scale, mean, rstd)
    B, L, D = xn.shape
    per_token = is_per_token(gate, xn)
    dx = _common.empty((B, L, D), xn.dtype, xn.device)
    dy = _common.empty((B, L, D), y.dtype, xn.device)
    dgate = _common.empty(gate.shape, gate.dtype, xn.device)
    dshift = _common.empty(scale.shape, shift_dtype, xn.device)
    dscale = _common.empty(scale.shape, scale.dtype, xn.device)
    if dx.numel() == 0:  # no tokens: per-sample grads are empty sums
        return dx, dy, dgate.zero_(), dshift.zero_(), dscale.zero_()
    block_r, block, warps = _config("residual_ln_modulate_bwd", D, L, xn.device)
    tiles_per_prog, chunks = _common.split(_common.cdiv(L, block_r), B)
    part_dtype = _common.torch_acc_dtype(grad_xn.dtype, grad_h.dtype, xn.dtype, y.dtype, gate.dtype, scale.dtype,
                                         shift_dtype)
    part = _common.empty((0,) if per_token else (B, chunks, 3, D), part_dtype, xn.device)
    count = _common.counters(0 if per_token else B, xn.device)
    _common.launch(_residual_ln_modulate_bwd_kernel, (B * chunks,), dx, dy, dgate, dshift, dscale, part, count,
                   grad_xn, grad_h, xn, y, gate, scale, mean, rstd, L, D, tiles_per_prog * block_r, chunks,
                   PER_TOKEN=per_token, ACC=_common.acc_dtype(part_dtype), BLOCK_R=block_r, BLOCK_D=block,
                   ONE_CHUNK=block >= D, num_warps=warps)
    return dx, dy, dgate, dshift, dscale
