"""adaLN glue: LayerNorm + modulation, and the gated residual of DiT blocks."""
import torch
import torch.nn.functional as F

from maskdit_fast.backend import resolve_backend


def _per_token(t, x):
    """[B, D] conditioning broadcasts over tokens; [B, L, D] is already per token."""
    return t.unsqueeze(1) if t.dim() == 2 else t


def layernorm_modulate_ref(x, shift, scale, eps=1e-6):
    """Reference (the spec): LayerNorm(x) without affine, then * (1 + scale) + shift.
    x [B, L, D]; shift, scale [B, D] or [B, L, D]."""
    return F.layer_norm(x, (x.shape[-1],), eps=eps) * (1 + _per_token(scale, x)) + _per_token(shift, x)


def gated_residual_ref(x, y, gate):
    """Reference (the spec): x + gate[:, None] * y. x, y [B, L, D]; gate [B, D] or [B, L, D]."""
    return x + _per_token(gate, x) * y


def layernorm_modulate(x, shift, scale, eps=1e-6, *, backend=None):
    """LayerNorm (no affine, fp32 statistics) followed by adaLN modulation.

    Args:
        x: [B, L, D].
        shift, scale: [B, D] (per sample) or [B, L, D] (per token).
        eps: LayerNorm epsilon (DiT uses 1e-6).
        backend: "torch" | "triton" | "cuda" | "auto" | None (global default).
    Returns:
        [B, L, D], dtype of x.
    """
    name = resolve_backend(backend, x.device)
    if name == "torch":
        return layernorm_modulate_ref(x, shift, scale, eps)
    raise NotImplementedError(f"layernorm_modulate: backend {name!r} not implemented yet")


def gated_residual(x, y, gate, *, backend=None):
    """x + gate[:, None] * y (adaLN-Zero gated residual).

    Args:
        x: [B, L, D] residual stream.
        y: [B, L, D] branch output.
        gate: [B, D] or [B, L, D].
        backend: "torch" | "triton" | "cuda" | "auto" | None (global default).
    Returns:
        [B, L, D].
    """
    name = resolve_backend(backend, x.device)
    if name == "torch":
        return gated_residual_ref(x, y, gate)
    raise NotImplementedError(f"gated_residual: backend {name!r} not implemented yet")
