"""adaLN glue: LayerNorm + modulation, and the gated residual of DiT blocks.

This file holds, top to bottom: the references (the spec), the input checks (run once, by the public ops), the
Triton op (kernels/modulate.py), the CUDA op (csrc/modulate.cu) and the public ops that dispatch between them
and the reference. Both compiled back-ends compute in fp32 (fp64 for fp64 inputs on Triton) and round once;
gradients of per-sample conditioning (shift, scale, gate) are reduced over tokens deterministically.

Conditioning is per sample ([B, D], or [B, 1, D]) or per token ([B, L, D]). Packed (varlen) token layouts call
the ops with a batch of one: x [1, T, D] and per-token conditioning [1, T, D], e.g.
`c_tok = c[sample_index(ids_packed, cu_seqlens)]` (maskdit_fast.indexing), then
`layernorm_modulate(x[None], shift_tok[None], scale_tok[None])`.
"""
import torch
import torch.nn.functional as F
from torch import Tensor

from maskdit_fast.backend import define_op, on_extension_load, resolve_backend, result_dtype


# ---------------------------------------------------------------------------------------------------- reference
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


# ---------------------------------------------------------------------------------------------------- checks
def _check_tokens(x, name):
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.dim() != 3:
        raise ValueError(f"{name} must be [B, L, D], got shape {tuple(x.shape)}")


def _check_conditioning(x, **conds):
    B, L, D = x.shape
    for name, t in conds.items():
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {getattr(t, 'dtype', type(t).__name__)}")
        shape = t.shape
        if not (shape == x.shape or shape == (B, D) or shape == (B, 1, D)):
            shapes = ((B, D), (B, 1, D), (B, L, D))
            raise ValueError(f"{name} must have shape [B, D], [B, 1, D] or [B, L, D] = "
                             f"{' or '.join(map(str, shapes))}, got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


def _check_eps(eps):
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < float("inf"):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")


def _check_layernorm_modulate(x, shift, scale, eps):
    _check_tokens(x, "x")
    _check_eps(eps)
    _check_conditioning(x, shift=shift, scale=scale)
    if shift.shape != scale.shape:
        raise ValueError(f"shift {tuple(shift.shape)} and scale {tuple(scale.shape)} must have the same shape")


def _check_gated_residual(x, y, gate):
    _check_tokens(x, "x")
    _check_tokens(y, "y")
    if y.shape != x.shape or y.device != x.device:
        raise ValueError(f"y {tuple(y.shape)} on {y.device} must match x {tuple(x.shape)} on {x.device}")
    _check_conditioning(x, gate=gate)


# ---------------------------------------------------------------------------------------------------- Triton op
_kernels = None


def _triton():
    """kernels/modulate.py, imported on first use: importing triton is slow and must follow TRITON_INTERPRET."""
    global _kernels
    if _kernels is None:
        from maskdit_fast.kernels import modulate
        _kernels = modulate
    return _kernels


def _ln_fwd(x, shift, scale, eps):
    return _triton().layernorm_modulate_fwd(x.contiguous(), shift.contiguous(), scale.contiguous(), eps)


def _ln_bwd(grad, x, shift, scale, eps):
    return _triton().layernorm_modulate_bwd(grad.contiguous(), x.contiguous(), shift.contiguous(),
                                            scale.contiguous(), eps)


def _gate_fwd(x, y, gate):
    return _triton().gated_residual_fwd(x.contiguous(), y.contiguous(), gate.contiguous())


def _gate_bwd(grad, y, gate):
    return _triton().gated_residual_bwd(grad.contiguous(), y.contiguous(), gate.contiguous())


_lib = torch.library.Library("maskdit_fast", "FRAGMENT")
_ln_fwd_op = define_op(_lib, "layernorm_modulate(Tensor x, Tensor shift, Tensor scale, float eps) -> Tensor", _ln_fwd,
                       lambda x, shift, scale, eps: x.new_empty(x.shape, dtype=result_dtype(x, shift, scale)))
_ln_bwd_op = define_op(_lib, "layernorm_modulate_backward(Tensor grad, Tensor x, Tensor shift, Tensor scale, "
                             "float eps) -> (Tensor, Tensor, Tensor)", _ln_bwd,
                       lambda grad, x, shift, scale, eps: (torch.empty_like(x), torch.empty_like(shift),
                                                           torch.empty_like(scale)))
_gate_fwd_op = define_op(_lib, "gated_residual(Tensor x, Tensor y, Tensor gate) -> Tensor", _gate_fwd,
                         lambda x, y, gate: x.new_empty(x.shape, dtype=result_dtype(x, y, gate)))
_gate_bwd_op = define_op(_lib, "gated_residual_backward(Tensor grad, Tensor y, Tensor gate) -> (Tensor, Tensor)",
                         _gate_bwd, lambda grad, y, gate: (torch.empty_like(y), torch.empty_like(gate)))


class _TritonLayerNormModulate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shift, scale, eps):
        ctx.save_for_backward(x, shift, scale)
        ctx.eps = eps
        return _ln_fwd_op(x, shift, scale, eps)

    @staticmethod
    def backward(ctx, grad):
        x, shift, scale = ctx.saved_tensors
        return (*_ln_bwd_op(grad, x, shift, scale, ctx.eps), None)


class _TritonGatedResidual(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, gate):
        ctx.save_for_backward(y, gate)
        ctx.x_dtype = x.dtype
        return _gate_fwd_op(x, y, gate)

    @staticmethod
    def backward(ctx, grad):
        y, gate = ctx.saved_tensors
        dx = grad if grad.dtype == ctx.x_dtype else grad.to(ctx.x_dtype)  # grad x is grad itself: no kernel
        _, need_y, need_gate = ctx.needs_input_grad
        if not (need_y or need_gate):
            return dx, None, None
        return (dx, *_gate_bwd_op(grad, y, gate))


# ---------------------------------------------------------------------------------------------------- CUDA op
# csrc/modulate.cu defines torch.ops.maskdit_fast_C.{layernorm_modulate, gated_residual}[_backward] and names this
# module as the home of their fake implementations (torch imports it to find them). Its kernels take one dtype
# (float32, float16 or bfloat16), contiguous tensors and [B, D] or [B, L, D] conditioning; the LayerNorm forward
# also returns the fp32 row statistics its backward reads. Backward ops return an empty [0] tensor for a
# gradient that was not asked for.
_CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _cuda_ln_fake(x, shift, scale, eps):
    stats = x.shape[:2]
    return x.new_empty(x.shape), x.new_empty(stats, dtype=torch.float32), x.new_empty(stats, dtype=torch.float32)


def _cuda_ln_bwd_fake(grad_out, x, scale, mean, rstd, cond_grad):
    cond = scale.shape if cond_grad else (0,)
    return x.new_empty(x.shape), x.new_empty(cond), x.new_empty(cond)


def _cuda_gate_fake(x, y, gate):
    return x.new_empty(x.shape)


def _cuda_gate_bwd_fake(grad_out, y, gate, y_grad, gate_grad):
    return y.new_empty(y.shape if y_grad else (0,)), y.new_empty(gate.shape if gate_grad else (0,))


CUDA_FAKES = {"layernorm_modulate": _cuda_ln_fake, "layernorm_modulate_backward": _cuda_ln_bwd_fake,
              "gated_residual": _cuda_gate_fake, "gated_residual_backward": _cuda_gate_bwd_fake}

on_extension_load(CUDA_FAKES, lambda name, fake: torch.library.register_fake(name, fake))


class _CudaLayerNormModulate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shift, scale, eps):
        out, mean, rstd = torch.ops.maskdit_fast_C.layernorm_modulate(x, shift, scale, eps)
        ctx.save_for_backward(x, scale, mean, rstd)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, scale, mean, rstd = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, dshift, dscale = torch.ops.maskdit_fast_C.layernorm_modulate_backward(grad.contiguous(), x, scale, mean, rstd,
                                                                     need[1] or need[2])
        return dx if need[0] else None, dshift if need[1] else None, dscale if need[2] else None, None


class _CudaGatedResidual(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, gate):
        ctx.save_for_backward(y, gate)
        return torch.ops.maskdit_fast_C.gated_residual(x, y, gate)

    @staticmethod
    def backward(ctx, grad):
        y, gate = ctx.saved_tensors
        need = ctx.needs_input_grad
        grad = grad.contiguous()
        dy, dgate = torch.ops.maskdit_fast_C.gated_residual_backward(grad, y, gate, need[1], need[2])
        return grad if need[0] else None, dy if need[1] else None, dgate if need[2] else None


def _cuda_inputs(x, *conds, dtype):
    """x and the conditioning tensors in the kernels' form: one dtype, contiguous (a differentiable cast or copy,
    only when needed), [B, 1, D] read as [B, D] (per sample) unless L = 1."""
    if dtype not in _CUDA_DTYPES:
        raise TypeError(f"backend 'cuda' supports float32, float16 and bfloat16 tensors, got {dtype}")
    B, L, D = x.shape
    return [x.to(dtype).contiguous()] + [
        (t.reshape(B, D) if t.dim() == 3 and t.shape[1] == 1 and L != 1 else t).to(dtype).contiguous() for t in conds]


def _cuda_layernorm_modulate(x, shift, scale, eps):
    x, shift, scale = _cuda_inputs(x, shift, scale, dtype=result_dtype(x, shift, scale))
    return _CudaLayerNormModulate.apply(x, shift, scale, eps)


def _cuda_gated_residual(x, y, gate):
    x, y, gate = _cuda_inputs(x, y, gate, dtype=result_dtype(x, y, gate))
    return _CudaGatedResidual.apply(x, y, gate)


# ---------------------------------------------------------------------------------------------------- public ops
def layernorm_modulate(x, shift, scale, eps=1e-6, *, backend=None):
    """LayerNorm (no affine, fp32 statistics) followed by adaLN modulation:
    out = (x - mean) / sqrt(var + eps) * (1 + scale) + shift, statistics over the last dim.

    Backward gives grads for x, shift and scale; per-sample shift/scale grads are summed over tokens
    deterministically. For packed tokens use x [1, T, D] with per-token shift/scale [1, T, D] (see the module
    docstring).

    Args:
        x: [B, L, D] float.
        shift, scale: float, same shape: [B, D] (or [B, 1, D]) per sample, or [B, L, D] per token.
        eps: LayerNorm epsilon (DiT uses 1e-6).
        backend: "torch" | "triton" | "cuda" | "auto" | None (global default).
    Returns:
        [B, L, D], dtype of x promoted with shift's and scale's (as the reference expression).
    """
    _check_layernorm_modulate(x, shift, scale, eps)
    name = resolve_backend(backend, x.device, op="layernorm_modulate")
    if name == "torch":
        return layernorm_modulate_ref(x, shift, scale, eps)
    if name == "cuda":
        return _cuda_layernorm_modulate(x, shift, scale, float(eps))
    return _TritonLayerNormModulate.apply(x, shift, scale, float(eps))


def gated_residual(x, y, gate, *, backend=None):
    """x + gate[:, None] * y (adaLN-Zero gated residual), fused.

    Backward: grad x = grad; grad y = gate * grad; grad gate = sum over tokens of grad * y (per-sample gate,
    deterministic) or grad * y (per-token gate).

    Args:
        x: [B, L, D] float residual stream.
        y: [B, L, D] float branch output.
        gate: float [B, D] (or [B, 1, D]) per sample, or [B, L, D] per token.
        backend: "torch" | "triton" | "cuda" | "auto" | None (global default).
    Returns:
        [B, L, D], dtype promote(x, y, gate).
    """
    _check_gated_residual(x, y, gate)
    name = resolve_backend(backend, x.device, op="gated_residual")
    if name == "torch":
        return gated_residual_ref(x, y, gate)
    if name == "cuda":
        return _cuda_gated_residual(x, y, gate)
    return _TritonGatedResidual.apply(x, y, gate)

