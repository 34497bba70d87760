"""Multi-head attention entry points (dense now; varlen FlashAttention lands with its issue)."""
import torch.nn.functional as F

from maskdit_fast.backend import resolve_backend


def attention_ref(q, k, v, softmax_scale=None):
    """Reference: softmax(q k^T * scale) v through torch SDPA. q, k, v [B, L, H, D] -> [B, L, H, D]."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         scale=softmax_scale)
    return out.transpose(1, 2)


def attention(q, k, v, softmax_scale=None, *, backend=None):
    """Dense multi-head attention.

    Args:
        q, k, v: [B, L, H, D] (k, v may have another length Lk).
        softmax_scale: defaults to D ** -0.5.
        backend: "torch" | "triton" | "auto" | None (global default).
    Returns:
        [B, L, H, D].
    """
    name = resolve_backend(backend, q.device)
    if name == "torch":
        return attention_ref(q, k, v, softmax_scale)
    raise NotImplementedError(f"attention: backend {name!r} not implemented yet")
