"""adaLN glue: LayerNorm + modulation, and the gated residual of DiT blocks.

Each op has a plain PyTorch reference (`*_ref`, the spec) and a Triton back-end registered as
torch.library custom ops (namespace `maskdit_fast`, with fake implementations and autograd). The
Triton kernels compute in fp32 (fp64 for fp64 inputs) and round once; gradients of per-sample
conditioning (shift, scale, gate) are reduced over tokens deterministically.

Conditioning is per sample ([B, D], or [B, 1, D]) or per token ([B, L, D]). Packed (varlen) token
layouts call the ops with a batch of one: x [1, T, D] and per-token conditioning [1, T, D], e.g.
`c_tok = c[sample_index(ids_packed, cu_seqlens)]` from maskdit_fast.ops.gather_scatter, then
`layernorm_modulate(x[None], shift_tok[None], scale_tok[None])`.
"""
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from maskdit_fast.backend import resolve_backend, result_dtype


def _per_token(t):
    """[B, D] conditioning broadcasts over tokens; [B, L, D] is already per token."""
    return t.unsqueeze(1) if t.dim() == 2 else t


def layernorm_modulate_ref(x, shift, scale, eps=1e-6):
    """Reference (the spec): LayerNorm(x) without affine, then * (1 + scale) + shift.
    x [B, L, D]; shift, scale [B, D] or [B, L, D]."""
    return F.layer_norm(x, (x.shape[-1],), eps=eps) * (1 + _per_token(scale)) + _per_token(shift)


def gated_residual_ref(x, y, gate):
    """Reference (the spec): x + gate[:, None] * y. x, y [B, L, D]; gate [B, D] or [B, L, D]."""
    return x + _per_token(gate) * y


# ---------------------------------------------------------------------------------------------------
# Input checks (shapes, dtypes, devices; always on, no device sync)
# ---------------------------------------------------------------------------------------------------

def _check_tokens(x, name):
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.dim() != 3:
        raise ValueError(f"{name} must be [B, L, D], got shape {tuple(x.shape)}")


def _check_conditioning(x, **conds):
    B, L, D = x.shape
    shapes = ((B, D), (B, 1, D), (B, L, D))
    for name, t in conds.items():
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {getattr(t, 'dtype', type(t).__name__)}")
        if tuple(t.shape) not in shapes:
            raise ValueError(f"{name} must have shape [B, D], [B, 1, D] or [B, L, D] = "
                             f"{' or '.join(map(str, shapes))}, got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


# ---------------------------------------------------------------------------------------------------
# Triton back-end: custom ops with fake implementations and autograd
# ---------------------------------------------------------------------------------------------------

def _kernels():
    # imported on first use: importing triton is slow and must follow TRITON_INTERPRET being set
    from maskdit_fast.kernels import modulate
    return modulate


@torch.library.custom_op("maskdit_fast::layernorm_modulate", mutates_args=())
def _ln_op(x: Tensor, shift: Tensor, scale: Tensor, eps: float) -> Tensor:
    return _kernels().layernorm_modulate_fwd(x.contiguous(), shift.contiguous(), scale.contiguous(), eps)


@_ln_op.register_fake
def _(x, shift, scale, eps):
    return x.new_empty(x.shape, dtype=result_dtype(x, shift, scale))


@torch.library.custom_op("maskdit_fast::layernorm_modulate_backward", mutates_args=())
def _ln_bwd_op(grad: Tensor, x: Tensor, shift: Tensor, scale: Tensor, eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    return _kernels().layernorm_modulate_bwd(grad.contiguous(), x.contiguous(), shift.contiguous(),
                                             scale.contiguous(), eps)


@_ln_bwd_op.register_fake
def _(grad, x, shift, scale, eps):
    return x.new_empty(x.shape), shift.new_empty(shift.shape), scale.new_empty(scale.shape)


def _ln_setup(ctx, inputs, output):
    x, shift, scale, eps = inputs
    ctx.save_for_backward(x, shift, scale)
    ctx.eps = eps


def _ln_backward(ctx, grad):
    x, shift, scale = ctx.saved_tensors
    return (*_ln_bwd_op(grad, x, shift, scale, ctx.eps), None)


_ln_op.register_autograd(_ln_backward, setup_context=_ln_setup)


@torch.library.custom_op("maskdit_fast::gated_residual", mutates_args=())
def _gate_op(x: Tensor, y: Tensor, gate: Tensor) -> Tensor:
    return _kernels().gated_residual_fwd(x.contiguous(), y.contiguous(), gate.contiguous())


@_gate_op.register_fake
def _(x, y, gate):
    return x.new_empty(x.shape, dtype=result_dtype(x, y, gate))


@torch.library.custom_op("maskdit_fast::gated_residual_backward", mutates_args=())
def _gate_bwd_op(grad: Tensor, y: Tensor, gate: Tensor) -> Tuple[Tensor, Tensor]:
    return _kernels().gated_residual_bwd(grad.contiguous(), y.contiguous(), gate.contiguous())


@_gate_bwd_op.register_fake
def _(grad, y, gate):
    return y.new_empty(y.shape), gate.new_empty(gate.shape)


def _gate_setup(ctx, inputs, output):
    x, y, gate = inputs
    ctx.save_for_backward(y, gate)
    ctx.x_dtype = x.dtype


def _gate_backward(ctx, grad):
    y, gate = ctx.saved_tensors
    dy, dgate = _gate_bwd_op(grad, y, gate)
    # grad x is grad itself: no kernel, and no copy unless the dtype differs
    return grad.to(ctx.x_dtype), dy, dgate


_gate_op.register_autograd(_gate_backward, setup_context=_gate_setup)


# ---------------------------------------------------------------------------------------------------
# Public ops
# ---------------------------------------------------------------------------------------------------

def layernorm_modulate(x, shift, scale, eps=1e-6, *, backend=None):
    """LayerNorm (no affine, fp32 statistics) followed by adaLN modulation:
    out = (x - mean) / sqrt(var + eps) * (1 + scale) + shift, statistics over the last dim.

    Backward gives grads for x, shift and scale; per-sample shift/scale grads are summed over tokens
    deterministically. For packed tokens use x [1, T, D] with per-token shift/scale [1, T, D] (see the
    module docstring).

    Args:
        x: [B, L, D] float.
        shift, scale: float, same shape: [B, D] (or [B, 1, D]) per sample, or [B, L, D] per token.
        eps: LayerNorm epsilon (DiT uses 1e-6).
        backend: "torch" | "triton" | "cuda" | "auto" | None (global default).
    Returns:
        [B, L, D], dtype of x promoted with shift's and scale's (as the reference expression).
    """
    _check_tokens(x, "x")
    _check_conditioning(x, shift=shift, scale=scale)
    if shift.shape != scale.shape:
        raise ValueError(f"shift {tuple(shift.shape)} and scale {tuple(scale.shape)} must have the same shape")
    name = resolve_backend(backend, x.device)
    if name == "torch":
        return layernorm_modulate_ref(x, shift, scale, eps)
    if name == "cuda":
        from maskdit_fast.ops import cuda_backend
        return cuda_backend.layernorm_modulate(x, shift, scale, eps)
    return _ln_op(x, shift, scale, float(eps))


def gated_residual(x, y, gate, *, backend=None):
    """x + gate[:, None] * y (adaLN-Zero gated residual), fused.

    Backward: grad x = grad; grad y = gate * grad; grad gate = sum over tokens of grad * y (per-sample
    gate, deterministic) or grad * y (per-token gate).

    Args:
        x: [B, L, D] float residual stream.
        y: [B, L, D] float branch output.
        gate: float [B, D] (or [B, 1, D]) per sample, or [B, L, D] per token.
        backend: "torch" | "triton" | "cuda" | "auto" | None (global default).
    Returns:
        [B, L, D], dtype promote(x, y, gate).
    """
    _check_tokens(x, "x")
    _check_tokens(y, "y")
    if y.shape != x.shape or y.device != x.device:
        raise ValueError(f"y {tuple(y.shape)} on {y.device} must match x {tuple(x.shape)} on {x.device}")
    _check_conditioning(x, gate=gate)
    name = resolve_backend(backend, x.device)
    if name == "torch":
        return gated_residual_ref(x, y, gate)
    if name == "cuda":
        from maskdit_fast.ops import cuda_backend
        return cuda_backend.gated_residual(x, y, gate)
    return _gate_op(x, y, gate)
