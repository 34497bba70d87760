"""Triton kernels for DiT's adaLN glue: LayerNorm + modulation, and the gated residual.

Rows are tokens of x [B, L, D] (contiguous). The conditioning tensors (shift, scale, gate) are either
per sample [B, D] (row b*L + l reads conditioning row b) or per token [B, L, D] (row r reads row r):
the PER_TOKEN flag. Arithmetic is fp32 (fp64 for fp64 inputs) with one rounding on store.

Backward reductions over tokens (grads of per-sample shift/scale/gate) are deterministic: a program
owns a chunk of one sample's tokens, sums them in registers and writes one partial row of a
[B, chunks, D] buffer that the launcher sums with torch (no float atomics). For per-token
conditioning the chunk is one token and the "partial" buffer is the gradient itself.
L (tokens per sample) and the chunk length are runtime arguments (no recompiles per mask ratio).
"""
import torch
import triton
import triton.language as tl

from maskdit_fast.kernels import _common

LN_BLOCK_CAP = 65536   # LayerNorm keeps a whole row in registers: D up to this width
GATE_BLOCK_CAP = 1024  # gated residual is elementwise over columns


@triton.jit
def _ln_modulate_fwd_kernel(
    out_ptr,      # [B*L, D] output, contiguous, dtype promote(x, shift, scale)
    x_ptr,        # [B*L, D] input rows, contiguous
    shift_ptr,    # [B, D] or [B*L, D] contiguous
    scale_ptr,    # same layout as shift
    L, D,         # tokens per sample, row width
    eps,          # LayerNorm epsilon
    PER_TOKEN: tl.constexpr,  # conditioning indexed by row (True) or by sample (False)
    ACC: tl.constexpr,        # arithmetic dtype
    BLOCK_D: tl.constexpr,    # >= D: the whole row
):
    # out = (x - mean) * rstd * (1 + scale) + shift, statistics in ACC; grid (B*L,)
    row = tl.program_id(0).to(tl.int64)
    crow = row if PER_TOKEN else row // L
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    x = tl.load(x_ptr + row * D + cols, mask=cmask, other=0.0).to(ACC)
    mean = tl.sum(x, axis=0) / D
    xc = tl.where(cmask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / D + eps)
    shift = tl.load(shift_ptr + crow * D + cols, mask=cmask).to(ACC)
    scale = tl.load(scale_ptr + crow * D + cols, mask=cmask).to(ACC)
    y = xc * rstd * (1.0 + scale) + shift
    tl.store(out_ptr + row * D + cols, y.to(out_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _ln_modulate_bwd_kernel(
    dx_ptr,       # [B*L, D] grad of x, contiguous
    dshift_ptr,   # [B, chunks, D] partial sums of grad shift (ACC dtype; shift's dtype if PER_TOKEN)
    dscale_ptr,   # [B, chunks, D] partial sums of grad scale, like dshift_ptr
    dy_ptr,       # [B*L, D] grad of the output, contiguous
    x_ptr,        # [B*L, D] forward input (statistics are recomputed, not stored)
    scale_ptr,    # [B, D] or [B*L, D] forward scale
    L, D,         # tokens per sample, row width
    eps,          # LayerNorm epsilon
    ROWS_PER_PROG,  # tokens of one sample handled by one program (1 when PER_TOKEN)
    n_chunks,     # programs per sample = cdiv(L, ROWS_PER_PROG)
    PER_TOKEN: tl.constexpr,  # conditioning indexed by row (True) or by sample (False)
    ACC: tl.constexpr,        # arithmetic dtype
    BLOCK_D: tl.constexpr,    # >= D: the whole row
):
    # grid (B * n_chunks,): program p owns tokens [c*R, min((c+1)*R, L)) of sample b = p // n_chunks
    pid = tl.program_id(0)
    b = (pid // n_chunks).to(tl.int64)
    c = pid % n_chunks
    l0 = c * ROWS_PER_PROG
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    if not PER_TOKEN:
        scale_b = tl.load(scale_ptr + b * D + cols, mask=cmask, other=0.0).to(ACC)
    acc_shift = tl.zeros([BLOCK_D], dtype=ACC)
    acc_scale = tl.zeros([BLOCK_D], dtype=ACC)
    for l in range(l0, tl.minimum(l0 + ROWS_PER_PROG, L)):
        row = b * L + l
        x = tl.load(x_ptr + row * D + cols, mask=cmask, other=0.0).to(ACC)
        mean = tl.sum(x, axis=0) / D
        xc = tl.where(cmask, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / D + eps)
        xhat = xc * rstd
        dy = tl.load(dy_ptr + row * D + cols, mask=cmask, other=0.0).to(ACC)
        if PER_TOKEN:
            scale = tl.load(scale_ptr + row * D + cols, mask=cmask, other=0.0).to(ACC)
        else:
            scale = scale_b
        acc_shift += dy
        acc_scale += dy * xhat
        # LayerNorm backward on dxhat = dy * (1 + scale); padded columns are 0 in every term
        dxhat = dy * (1.0 + scale)
        mean_dxhat = tl.sum(dxhat, axis=0) / D
        mean_dxhat_xhat = tl.sum(dxhat * xhat, axis=0) / D
        dx = (dxhat - mean_dxhat - xhat * mean_dxhat_xhat) * rstd
        tl.store(dx_ptr + row * D + cols, dx.to(dx_ptr.dtype.element_ty), mask=cmask)
    part = (b * n_chunks + c) * D + cols
    tl.store(dshift_ptr + part, acc_shift.to(dshift_ptr.dtype.element_ty), mask=cmask)
    tl.store(dscale_ptr + part, acc_scale.to(dscale_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _gated_residual_fwd_kernel(
    out_ptr,      # [B*L, D] output, contiguous, dtype promote(x, y, gate)
    x_ptr,        # [B*L, D] residual stream, contiguous
    y_ptr,        # [B*L, D] branch output, contiguous
    gate_ptr,     # [B, D] or [B*L, D] contiguous
    L, D,         # tokens per sample, row width
    PER_TOKEN: tl.constexpr,  # gate indexed by row (True) or by sample (False)
    ACC: tl.constexpr,        # arithmetic dtype
    BLOCK_D: tl.constexpr,    # columns per program
):
    # out = x + gate * y; grid (B*L, cdiv(D, BLOCK_D))
    row = tl.program_id(0).to(tl.int64)
    grow = row if PER_TOKEN else row // L
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    x = tl.load(x_ptr + row * D + cols, mask=cmask).to(ACC)
    y = tl.load(y_ptr + row * D + cols, mask=cmask).to(ACC)
    gate = tl.load(gate_ptr + grow * D + cols, mask=cmask).to(ACC)
    tl.store(out_ptr + row * D + cols, (x + gate * y).to(out_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _gated_residual_bwd_kernel(
    dy_ptr,       # [B*L, D] grad of the branch output y (= gate * grad), contiguous
    dgate_ptr,    # [B, chunks, D] partial sums of grad gate (ACC dtype; gate's dtype if PER_TOKEN)
    grad_ptr,     # [B*L, D] grad of the output, contiguous
    y_ptr,        # [B*L, D] forward branch output
    gate_ptr,     # [B, D] or [B*L, D] forward gate
    L, D,         # tokens per sample, row width
    ROWS_PER_PROG,  # tokens of one sample handled by one program (1 when PER_TOKEN)
    n_chunks,     # programs per sample along tokens = cdiv(L, ROWS_PER_PROG)
    PER_TOKEN: tl.constexpr,  # gate indexed by row (True) or by sample (False)
    ACC: tl.constexpr,        # arithmetic dtype
    BLOCK_D: tl.constexpr,    # columns per program
):
    # grid (B * n_chunks, cdiv(D, BLOCK_D)); grad x is grad itself (handled by the caller)
    pid = tl.program_id(0)
    b = (pid // n_chunks).to(tl.int64)
    c = pid % n_chunks
    l0 = c * ROWS_PER_PROG
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    if not PER_TOKEN:
        gate_b = tl.load(gate_ptr + b * D + cols, mask=cmask).to(ACC)
    acc = tl.zeros([BLOCK_D], dtype=ACC)
    for l in range(l0, tl.minimum(l0 + ROWS_PER_PROG, L)):
        row = b * L + l
        g = tl.load(grad_ptr + row * D + cols, mask=cmask).to(ACC)
        y = tl.load(y_ptr + row * D + cols, mask=cmask).to(ACC)
        if PER_TOKEN:
            gate = tl.load(gate_ptr + row * D + cols, mask=cmask).to(ACC)
        else:
            gate = gate_b
        tl.store(dy_ptr + row * D + cols, (gate * g).to(dy_ptr.dtype.element_ty), mask=cmask)
        acc += g * y
    tl.store(dgate_ptr + (b * n_chunks + c) * D + cols, acc.to(dgate_ptr.dtype.element_ty), mask=cmask)


def _is_per_token(cond, x):
    """True when conditioning `cond` is per token ([B, L, D] with L > 1 tokens of x); a per-sample
    [B, D] or [B, 1, D] tensor is read as [B, D]."""
    return cond.dim() == 3 and cond.shape[1] == x.shape[1] and x.shape[1] != 1


def _token_chunks(per_token, batch, length, n_col_blocks):
    """(tokens per program, programs per sample) of a backward reduction over tokens."""
    if per_token:
        return 1, length
    return _common.split(length, batch * n_col_blocks)


def _cond_grad(part, per_token, cond):
    """Gradient of a conditioning tensor from its [B, chunks, D] partial-sum buffer."""
    grad = part if per_token else part.sum(1)
    return grad.to(cond.dtype).reshape(cond.shape)


def _check(x, *conds):
    _common.require_contiguous(x, "x")
    for t in conds:
        _common.require_contiguous(t, "conditioning")


def layernorm_modulate_fwd(x, shift, scale, eps):
    """LayerNorm(x) * (1 + scale) + shift. x [B, L, D] contiguous; shift, scale contiguous [B, D]
    (or [B, 1, D]) or [B, L, D], same shape. Returns [B, L, D], dtype promote(x, shift, scale)."""
    _check(x, shift, scale)
    B, L, D = x.shape
    dtype = torch.promote_types(x.dtype, torch.promote_types(shift.dtype, scale.dtype))
    out = _common.empty((B, L, D), dtype, x.device)
    if out.numel() == 0:
        return out
    block = _common.block_d(D, LN_BLOCK_CAP)
    _ln_modulate_fwd_kernel[(B * L,)](
        out, x, shift, scale, L, D, eps, PER_TOKEN=_is_per_token(shift, x),
        ACC=_common.acc_dtype(dtype), BLOCK_D=block, num_warps=_common.num_warps(block))
    return out


def layernorm_modulate_bwd(grad, x, shift, scale, eps):
    """Backward of layernorm_modulate_fwd (statistics recomputed from x).
    Returns (dx like x, dshift like shift, dscale like scale)."""
    _check(grad, x, shift, scale)
    B, L, D = x.shape
    per_token = _is_per_token(shift, x)
    per, chunks = _token_chunks(per_token, B, L, 1)
    dx = _common.empty((B, L, D), x.dtype, x.device)
    part_dtype = _common.torch_acc_dtype(grad.dtype, x.dtype, shift.dtype, scale.dtype)
    dshift = _common.empty((B, chunks, D), shift.dtype if per_token else part_dtype, x.device)
    dscale = _common.empty((B, chunks, D), scale.dtype if per_token else part_dtype, x.device)
    if dx.numel() > 0:
        block = _common.block_d(D, LN_BLOCK_CAP)
        _ln_modulate_bwd_kernel[(B * chunks,)](
            dx, dshift, dscale, grad, x, scale, L, D, eps, per, chunks, PER_TOKEN=per_token,
            ACC=_common.acc_dtype(part_dtype), BLOCK_D=block, num_warps=_common.num_warps(block))
    return dx, _cond_grad(dshift, per_token, shift), _cond_grad(dscale, per_token, scale)


def gated_residual_fwd(x, y, gate):
    """x + gate * y. x, y [B, L, D] contiguous; gate contiguous [B, D] (or [B, 1, D]) or [B, L, D].
    Returns [B, L, D], dtype promote(x, y, gate)."""
    _check(x, y, gate)
    B, L, D = x.shape
    dtype = torch.promote_types(x.dtype, torch.promote_types(y.dtype, gate.dtype))
    out = _common.empty((B, L, D), dtype, x.device)
    if out.numel() == 0:
        return out
    block = _common.block_d(D, GATE_BLOCK_CAP)
    _gated_residual_fwd_kernel[(B * L, triton.cdiv(D, block))](
        out, x, y, gate, L, D, PER_TOKEN=_is_per_token(gate, x), ACC=_common.acc_dtype(dtype),
        BLOCK_D=block, num_warps=_common.num_warps(block))
    return out


def gated_residual_bwd(grad, y, gate):
    """Backward of gated_residual_fwd for y and gate (grad x is grad itself).
    Returns (dy like y, dgate like gate)."""
    _check(grad, y, gate)
    B, L, D = y.shape
    per_token = _is_per_token(gate, y)
    block = _common.block_d(D, GATE_BLOCK_CAP)
    n_blocks = triton.cdiv(D, block)
    per, chunks = _token_chunks(per_token, B, L, n_blocks)
    dy = _common.empty((B, L, D), y.dtype, y.device)
    part_dtype = _common.torch_acc_dtype(grad.dtype, y.dtype, gate.dtype)
    dgate = _common.empty((B, chunks, D), gate.dtype if per_token else part_dtype, y.device)
    if dy.numel() > 0:
        _gated_residual_bwd_kernel[(B * chunks, n_blocks)](
            dy, dgate, grad, y, gate, L, D, per, chunks, PER_TOKEN=per_token,
            ACC=_common.acc_dtype(part_dtype), BLOCK_D=block, num_warps=_common.num_warps(block))
    return dy, _cond_grad(dgate, per_token, gate)
