"""Mask gather/scatter: the token shuffling around MaskDiT's encoder.

gather_tokens:  [B, L, D] (+ pos_embed [L, D])                    -> [B, K, D]   (encoder input)
scatter_tokens: [B, K, D] + mask_token [D] (+ pos_embed [L, D])   -> [B, L, D]   (decoder input)
"""
import torch

from maskdit_fast.backend import resolve_backend


def gather_tokens_ref(x, ids_keep, pos_embed=None):
    """Reference (the spec). x [B, L, D], ids_keep [B, K] int64, pos_embed [L, D] or [1, L, D]
    -> [B, K, D] with out[b, k] = x[b, ids_keep[b, k]] + pos_embed[ids_keep[b, k]]."""
    if pos_embed is not None:
        x = x + pos_embed.reshape(1, x.shape[1], x.shape[2])
    return torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def scatter_tokens_ref(x_kept, ids_keep, mask_token, length, pos_embed=None):
    """Reference (the spec). x_kept [B, K, D], ids_keep [B, K] int64 (distinct positions in
    [0, length)), mask_token [D] (any shape with D elements), pos_embed [L, D] or [1, L, D]
    -> [B, L, D]: x_kept at the kept positions, mask_token elsewhere, plus pos_embed."""
    B, K, D = x_kept.shape
    out = mask_token.reshape(1, 1, D).to(x_kept.dtype).expand(B, length, D).clone()
    out.scatter_(1, ids_keep.unsqueeze(-1).expand(-1, -1, D), x_kept)
    if pos_embed is not None:
        out = out + pos_embed.reshape(1, length, D)
    return out


def gather_tokens(x, ids_keep, pos_embed=None, *, backend=None):
    """Gathers the kept tokens, optionally adding the position embedding in the same pass.

    Args:
        x: [B, L, D] tokens.
        ids_keep: [B, K] int64 kept positions per sample.
        pos_embed: optional [L, D] (or [1, L, D]) added before gathering.
        backend: "torch" | "triton" | "cuda" | "auto" | None (global default).
    Returns:
        [B, K, D], dtype of x.
    """
    name = resolve_backend(backend, x.device)
    if name == "torch":
        return gather_tokens_ref(x, ids_keep, pos_embed)
    raise NotImplementedError(f"gather_tokens: backend {name!r} not implemented yet")


def scatter_tokens(x_kept, ids_keep, mask_token, length, pos_embed=None, *, backend=None):
    """Scatters kept tokens back onto the full grid, filling masked positions with mask_token
    and adding the (decoder) position embedding in the same pass.

    Args:
        x_kept: [B, K, D] encoder tokens (after the decoder-input projection).
        ids_keep: [B, K] int64 distinct positions in [0, length).
        mask_token: [D] (or [1, 1, D]) learned token for masked positions.
        length: L, tokens per sample on the full grid.
        pos_embed: optional [L, D] (or [1, L, D]).
        backend: "torch" | "triton" | "cuda" | "auto" | None (global default).
    Returns:
        [B, L, D], dtype of x_kept.
    """
    name = resolve_backend(backend, x_kept.device)
    if name == "torch":
        return scatter_tokens_ref(x_kept, ids_keep, mask_token, length, pos_embed)
    raise NotImplementedError(f"scatter_tokens: backend {name!r} not implemented yet")
