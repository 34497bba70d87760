"""Gated residual fused with the LayerNorm-modulate that follows it in DiT blocks (the residual after attention
feeding the MLP's adaLN input):

    x_new = x + gate * y;  h = LayerNorm(x_new) * (1 + scale) + shift;  returns (x_new, h)

This file holds, top to bottom: the reference (the spec: maskdit_fast.ops.modulate's two references in a row),
the input checks (run once, by the public op), the Triton op (kernels/residual_modulate.py), the CUDA op
(csrc/residual_modulate.cu) and the public op dispatching between them and the reference. Conditioning (gate,
shift, scale: one shape) is per sample [B, D] (or [B, 1, D]) or per token [B, L, D]; packed (varlen) tokens use
a batch of one with per-token conditioning, as for the separate ops (see maskdit_fast.ops.modulate). Both
compiled back-ends compute in fp32 (fp64 for fp64 inputs on Triton), round x_new once and normalise it as
stored; gradients of per-sample conditioning are reduced over tokens deterministically, inside the kernels.

Memory traffic, the floor of these memory-bound ops, in units of one [B, L, D] tensor (N elements of one dtype;
per-sample conditioning and the per-row fp32 statistics, 8 bytes a row, left out):

    direction  separate ops (gated_residual, layernorm_modulate)            fused
    forward    gated_residual: read x, y, write x_new               3     read x, y,
               layernorm_modulate: read x_new, write h              2     write x_new, h            4
    backward   layernorm_modulate: read dh, x_new, write dx_ln      3     read dx_new, dh, x_new, y,
               autograd's sum dx_new + dx_ln: read 2, write 1       3     write dx, dy              6
               gated_residual: read the sum, y, write dy            3
    total                                                          14                              10

so a forward + backward moves 10/14 = 0.71x the bytes of the two separate ops, and launches 2 kernels instead of
5 (the sum included).
"""
import torch

from maskdit_fast.backend import define_op, on_extension_load, resolve_backend, result_dtype
from maskdit_fast.ops.modulate import (_check_conditioning, _check_eps, _check_gated_residual, _cuda_inputs,
                                       gated_residual_ref, layernorm_modulate_ref)


# ---------------------------------------------------------------------------------------------------- reference
def residual_layernorm_modulate_ref(x, y, gate, shift, scale, eps=1e-6):
    """Reference (the spec): x_new = gated_residual_ref(x, y, gate), h = layernorm_modulate_ref(x_new, shift,
    scale, eps); returns (x_new, h)."""
    x_new = gated_residual_ref(x, y, gate)
    return x_new, layernorm_modulate_ref(x_new, shift, scale, eps)


# ---------------------------------------------------------------------------------------------------- checks
def _check(x, y, gate, shift, scale, eps):
    _check_gated_residual(x, y, gate)
    _check_eps(eps)
    _check_conditioning(x, shift=shift, scale=scale)
    if not gate.shape == shift.shape == scale.shape:
        raise ValueError(f"gate {tuple(gate.shape)}, shift {tuple(shift.shape)} and scale {tuple(scale.shape)} must "
                         "have the same shape")


# ---------------------------------------------------------------------------------------------------- Triton op
_kernels = None


def _triton():
    """kernels/residual_modulate.py, imported on first use: importing triton is slow and must follow
    TRITON_INTERPRET."""
    global _kernels
    if _kernels is None:
        from maskdit_fast.kernels import residual_modulate
        _kernels = residual_modulate
    return _kernels


def _fwd(x, y, gate, shift, scale, eps):
    return _triton().residual_layernorm_modulate_fwd(x.contiguous(), y.contiguous(), gate.contiguous(),
                                                     shift.contiguous(), scale.contiguous(), eps)


def _bwd(grad_x, grad_h, x_new, y, gate, scale, mean, rstd):
    return _triton().residual_layernorm_modulate_bwd(grad_x.contiguous(), grad_h.contiguous(), x_new, y, gate, scale,
                                                     mean, rstd)


def _fwd_fake(x, y, gate, shift, scale, eps):
    h_dtype = result_dtype(x, y, gate, shift, scale)
    stats = torch.promote_types(h_dtype, torch.float32)  # the kernels' arithmetic dtype
    return (x.new_empty(x.shape, dtype=result_dtype(x, y, gate)), x.new_empty(x.shape, dtype=h_dtype),
            x.new_empty(x.shape[:2], dtype=stats), x.new_empty(x.shape[:2], dtype=stats))


def _bwd_fake(grad_x, grad_h, x_new, y, gate, scale, mean, rstd):
    return (torch.empty_like(x_new), torch.empty_like(y), torch.empty_like(gate), torch.empty_like(scale),
            torch.empty_like(scale))


_lib = torch.library.Library("maskdit_fast", "FRAGMENT")
_fwd_op = define_op(_lib, "residual_layernorm_modulate(Tensor x, Tensor y, Tensor gate, Tensor shift, Tensor scale, "
                          "float eps) -> (Tensor, Tensor, Tensor, Tensor)", _fwd, _fwd_fake)
_bwd_op = define_op(_lib, "residual_layernorm_modulate_backward(Tensor grad_x, Tensor grad_h, Tensor x_new, "
                          "Tensor y, Tensor gate, Tensor scale, Tensor mean, Tensor rstd) "
                          "-> (Tensor, Tensor, Tensor, Tensor, Tensor)", _bwd, _bwd_fake)


class _TritonResidualLayerNormModulate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, gate, shift, scale, eps):
        y, gate, scale = y.contiguous(), gate.contiguous(), scale.contiguous()  # read again by the backward
        x_new, h, mean, rstd = _fwd_op(x, y, gate, shift, scale, eps)
        ctx.save_for_backward(x_new, y, gate, scale, mean, rstd)
        ctx.dtypes = x.dtype, shift.dtype
        return x_new, h

    @staticmethod
    def backward(ctx, grad_x, grad_h):
        x_dtype, shift_dtype = ctx.dtypes
        dx, dy, dgate, dshift, dscale = _bwd_op(grad_x, grad_h, *ctx.saved_tensors)
        return (dx if dx.dtype == x_dtype else dx.to(x_dtype), dy, dgate,
                dshift if dshift.dtype == shift_dtype else dshift.to(shift_dtype), dscale, None)


# ---------------------------------------------------------------------------------------------------- CUDA op
# csrc/residual_modulate.cu defines torch.ops.maskdit_fast_C.residual_layernorm_modulate[_backward] and names this
# module as the home of their fake implementations. Its kernels take one dtype (float32, float16 or bfloat16),
# contiguous tensors and [B, D] or [B, L, D] conditioning; the forward also returns the fp32 row statistics its
# backward reads. The backward returns empty [0] tensors for the conditioning grads when they are not asked for.
def _cuda_fwd_fake(x, y, gate, shift, scale, eps):
    stats = x.shape[:2]
    return (x.new_empty(x.shape), x.new_empty(x.shape), x.new_empty(stats, dtype=torch.float32),
            x.new_empty(stats, dtype=torch.float32))


def _cuda_bwd_fake(grad_x, grad_h, x_new, y, gate, scale, mean, rstd, cond_grad):
    cond = gate.shape if cond_grad else (0,)
    return (x_new.new_empty(x_new.shape), x_new.new_empty(x_new.shape), x_new.new_empty(cond), x_new.new_empty(cond),
            x_new.new_empty(cond))


CUDA_FAKES = {"residual_layernorm_modulate": _cuda_fwd_fake, "residual_layernorm_modulate_backward": _cuda_bwd_fake}

on_extension_load(CUDA_FAKES, lambda name, fake: torch.library.register_fake(name, fake))


class _CudaResidualLayerNormModulate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, gate, shift, scale, eps):
        x_new, h, mean, rstd = torch.ops.maskdit_fast_C.residual_layernorm_modulate(x, y, gate, shift, scale, eps)
        ctx.save_for_backward(x_new, y, gate, scale, mean, rstd)
        return x_new, h

    @staticmethod
    def backward(ctx, grad_x, grad_h):
        need = ctx.needs_input_grad
        dx, dy, dgate, dshift, dscale = torch.ops.maskdit_fast_C.residual_layernorm_modulate_backward(
            grad_x.contiguous(), grad_h.contiguous(), *ctx.saved_tensors, any(need[2:5]))
        return (dx if need[0] else None, dy if need[1] else None, dgate if need[2] else None,
                dshift if need[3] else None, dscale if need[4] else None, None)


def _cuda_residual_layernorm_modulate(x, y, gate, shift, scale, eps):
    dtype = result_dtype(x, y, gate, shift, scale)
    x_new, h = _CudaResidualLayerNormModulate.apply(*_cuda_inputs(x, y, gate, shift, scale, dtype=dtype), eps)
    x_dtype = result_dtype(x, y, gate)
    return x_new if x_new.dtype == x_dtype else x_new.to(x_dtype), h


# ---------------------------------------------------------------------------------------------------- public op
def residual_layernorm_modulate(x, y, gate, shift, scale, eps=1e-6, *, backend=None):
    """Gated residual, then LayerNorm (no affine, fp32 statistics) and adaLN modulation of its result, fused:
    x_new = x + gate * y; h = (x_new - mean) / sqrt(var + eps) * (1 + scale) + shift, statistics over the last
    dim. The same as `gated_residual` followed by `layernorm_modulate`, in one pass over memory each way.

    Backward takes grads of both outputs and gives grads for x, y, gate, shift and scale; per-sample conditioning
    grads are summed over tokens deterministically.

    Args:
        x: [B, L, D] float residual stream.
        y: [B, L, D] float branch output.
        gate, shift, scale: float, one shape: [B, D] (or [B, 1, D]) per sample, or [B, L, D] per token.
        eps: LayerNorm epsilon (DiT uses 1e-6).
        backend: "torch" | "triton" | "cuda" | "auto" | None (global default).
    Returns:
        (x_new, h), both [B, L, D]: x_new of dtype promote(x, y, gate), h of dtype promote(x_new, shift, scale)
        (as the reference expressions).
    """
    _check(x, y, gate, shift, scale, eps)
    name = resolve_backend(backend, x.device, op="residual_layernorm_modulate")
    if name == "torch":
        return residual_layernorm_modulate_ref(x, y, gate, shift, scale, eps)
    if name == "cuda":
        return _cuda_residual_layernorm_modulate(x, y, gate, shift, scale, float(eps))
    return _TritonResidualLayerNormModulate.apply(x, y, gate, shift, scale, float(eps))
