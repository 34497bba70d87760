"""Triton kernels for DiT's adaLN glue: LayerNorm + modulation, and the gated residual.

Rows are tokens of x [B, L, D] (contiguous). The conditioning tensors (shift, scale, gate) are either
per sample [B, D] (row b*L + l reads conditioning row b) or per token [B, L, D] (row r reads row r):
the PER_TOKEN flag. Arithmetic is fp32 (fp64 for fp64 inputs) with one rounding on store.

Programs work on [BLOCK_R rows, BLOCK_D columns] tiles (LayerNorm: whole rows). Backward reductions
over tokens (grads of per-sample shift/scale/gate) are deterministic: a program owns a chunk of one
sample's tokens, sums them in registers and writes one partial row of a [B, chunks, D] buffer that
the launcher sums with torch (no float atomics); per-token conditioning grads are stored directly.
L (tokens per sample) and the chunk length are runtime arguments (no recompiles per mask ratio).
"""
import triton
import triton.language as tl

from maskdit_fast.backend import result_dtype
from maskdit_fast.kernels import _common

LN_BLOCK_CAP = 65536   # LayerNorm keeps whole rows in registers: D up to this width
GATE_BLOCK_CAP = 1024  # gated residual is elementwise over columns


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
    dshift_ptr,   # PER_TOKEN: [B*L, D] grad of shift; else [B, chunks, D] ACC-dtype partial sums
    dscale_ptr,   # like dshift_ptr, for scale
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
        part = (b * n_chunks + c) * D + cols
        tl.store(dshift_ptr + part, tl.sum(acc_shift, axis=0), mask=cmask)
        tl.store(dscale_ptr + part, tl.sum(acc_scale, axis=0), mask=cmask)


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
    dgate_ptr,    # PER_TOKEN: [B*L, D] grad of gate; else [B, chunks, D] ACC-dtype partial sums
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
        tl.store(dgate_ptr + (b * n_chunks + c) * D + cols, tl.sum(acc, axis=0), mask=cmask)


def _is_per_token(cond, x):
    """True when conditioning `cond` is per token ([B, L, D] with L > 1 tokens of x); a per-sample
    [B, D] or [B, 1, D] tensor is read as [B, D]."""
    return cond.dim() == 3 and cond.shape[1] == x.shape[1] and x.shape[1] != 1


def _blocks(D, cap, rows):
    """(BLOCK_D, BLOCK_R): column block and rows per tile, no more rows than there are."""
    if cap == LN_BLOCK_CAP and D > cap:  # the LayerNorm kernels hold whole rows: wider ones would be cut
        raise ValueError(f"layernorm_modulate (triton): feature width {D} is over the {cap} columns a row tile holds")
    block = _common.block_d(D, cap)
    return block, min(_common.rows_per_tile(block), triton.next_power_of_2(max(rows, 1)))


def _token_chunks(length, block_r, other_programs):
    """(tokens per program, programs per sample) of a backward pass over each sample's tokens: whole
    row tiles, split so the reduction order depends on the shapes only."""
    per_tiles, chunks = _common.split(triton.cdiv(length, block_r), other_programs)
    return per_tiles * block_r, chunks


def _cond_grad(grad, per_token, cond):
    """Gradient of a conditioning tensor: the per-token grad, or the sum of the [B, chunks, D] partials."""
    return (grad if per_token else grad.sum(1)).to(cond.dtype).reshape(cond.shape)


def _check(x, *conds):
    _common.require_contiguous(x, "x")
    for t in conds:
        _common.require_contiguous(t, "conditioning")


def layernorm_modulate_fwd(x, shift, scale, eps):
    """LayerNorm(x) * (1 + scale) + shift. x [B, L, D] contiguous; shift, scale contiguous [B, D]
    (or [B, 1, D]) or [B, L, D], same shape. Returns [B, L, D], dtype promote(x, shift, scale)."""
    _check(x, shift, scale)
    B, L, D = x.shape
    dtype = result_dtype(x, shift, scale)
    out = _common.empty((B, L, D), dtype, x.device)
    if out.numel() == 0:
        return out
    block, block_r = _blocks(D, LN_BLOCK_CAP, B * L)
    _ln_modulate_fwd_kernel[(triton.cdiv(B * L, block_r),)](
        out, x, shift, scale, B * L, L, D, eps, PER_TOKEN=_is_per_token(shift, x),
        ACC=_common.acc_dtype(dtype), BLOCK_R=block_r, BLOCK_D=block,
        num_warps=_common.num_warps(block_r * block))
    return out


def layernorm_modulate_bwd(grad, x, shift, scale, eps):
    """Backward of layernorm_modulate_fwd (statistics recomputed from x).
    Returns (dx like x, dshift like shift, dscale like scale)."""
    _check(grad, x, shift, scale)
    B, L, D = x.shape
    per_token = _is_per_token(shift, x)
    block, block_r = _blocks(D, LN_BLOCK_CAP, L)
    rows_per_prog, chunks = _token_chunks(L, block_r, B)
    part_dtype = _common.torch_acc_dtype(grad.dtype, x.dtype, shift.dtype, scale.dtype)
    dx = _common.empty((B, L, D), x.dtype, x.device)
    dshift = _common.empty((B, L, D) if per_token else (B, chunks, D), shift.dtype if per_token else part_dtype,
                           x.device)
    dscale = _common.empty((B, L, D) if per_token else (B, chunks, D), scale.dtype if per_token else part_dtype,
                           x.device)
    if dx.numel() > 0:
        _ln_modulate_bwd_kernel[(B * chunks,)](
            dx, dshift, dscale, grad, x, scale, L, D, eps, rows_per_prog, chunks, PER_TOKEN=per_token,
            ACC=_common.acc_dtype(part_dtype), BLOCK_R=block_r, BLOCK_D=block,
            num_warps=_common.num_warps(block_r * block))
    return dx, _cond_grad(dshift, per_token, shift), _cond_grad(dscale, per_token, scale)


def gated_residual_fwd(x, y, gate):
    """x + gate * y. x, y [B, L, D] contiguous; gate contiguous [B, D] (or [B, 1, D]) or [B, L, D].
    Returns [B, L, D], dtype promote(x, y, gate)."""
    _check(x, y, gate)
    B, L, D = x.shape
    dtype = result_dtype(x, y, gate)
    out = _common.empty((B, L, D), dtype, x.device)
    if out.numel() == 0:
        return out
    block, block_r = _blocks(D, GATE_BLOCK_CAP, B * L)
    _gated_residual_fwd_kernel[(triton.cdiv(B * L, block_r), triton.cdiv(D, block))](
        out, x, y, gate, B * L, L, D, PER_TOKEN=_is_per_token(gate, x), ACC=_common.acc_dtype(dtype),
        BLOCK_R=block_r, BLOCK_D=block, num_warps=_common.num_warps(block_r * block))
    return out


def gated_residual_bwd(grad, y, gate):
    """Backward of gated_residual_fwd for y and gate (grad x is grad itself).
    Returns (dy like y, dgate like gate)."""
    _check(grad, y, gate)
    B, L, D = y.shape
    per_token = _is_per_token(gate, y)
    block, block_r = _blocks(D, GATE_BLOCK_CAP, L)
    n_blocks = triton.cdiv(D, block)
    rows_per_prog, chunks = _token_chunks(L, block_r, B * n_blocks)
    part_dtype = _common.torch_acc_dtype(grad.dtype, y.dtype, gate.dtype)
    dy = _common.empty((B, L, D), y.dtype, y.device)
    dgate = _common.empty((B, L, D) if per_token else (B, chunks, D), gate.dtype if per_token else part_dtype,
                          y.device)
    if dy.numel() > 0:
        _gated_residual_bwd_kernel[(B * chunks, n_blocks)](
            dy, dgate, grad, y, gate, L, D, rows_per_prog, chunks, PER_TOKEN=per_token,
            ACC=_common.acc_dtype(part_dtype), BLOCK_R=block_r, BLOCK_D=block,
            num_warps=_common.num_warps(block_r * block))
    return dy, _cond_grad(dgate, per_token, gate)
