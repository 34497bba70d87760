"""MAE-style random token masking for MaskDiT.

Per sample, draw noise ~ U(0, 1)^L, shuffle the positions by argsort(noise) and keep the first
len_keep = int(L * (1 - mask_ratio)) of them; every sample keeps the same count, so the kept tokens
form a dense [B, K, D] batch. Conventions follow the official MaskDiT code: `mask` is float with
1 = masked (removed) and 0 = kept, `ids_restore` = argsort(ids_shuffle) inverts the shuffle.
"""
import torch


def num_kept(length, mask_ratio):
    """Tokens kept per sample, int(length * (1 - mask_ratio)), after validating mask_ratio in [0, 1)."""
    if isinstance(mask_ratio, bool) or not isinstance(mask_ratio, (int, float)):
        raise TypeError(f"mask_ratio must be a float in [0, 1), got {type(mask_ratio).__name__}")
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    len_keep = int(length * (1 - mask_ratio))
    if len_keep < 1:
        raise ValueError(f"mask_ratio {mask_ratio} keeps no token of {length}")
    return len_keep


def random_masking_ids(batch, length, mask_ratio, generator=None, device=None):
    """Draws an independent random mask per sample (MAE style).

    Args:
        batch: B, number of samples.
        length: L, tokens per sample.
        mask_ratio: fraction of tokens to mask, in [0, 1).
        generator: optional torch.Generator (on `device`) for reproducible masks.
        device: device of the returned tensors (defaults to the generator's, else CPU).
    Returns:
        ids_keep: [B, K] int64 kept positions, K = int(L * (1 - mask_ratio)), in shuffle order.
        ids_restore: [B, L] int64, argsort of the shuffle: position l of the sequence
            [kept tokens, masked tokens] that token l lands on.
        mask: [B, L] float32, 1 = masked, 0 = kept.
    """
    len_keep = num_kept(length, mask_ratio)
    if device is None and generator is not None:
        device = generator.device
    noise = torch.rand(batch, length, generator=generator, device=device)
    ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small noise is kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    mask = mask_from_ids_keep(ids_keep, length)
    return ids_keep, ids_restore, mask


def mask_from_ids_keep(ids_keep, length, dtype=torch.float32):
    """Binary mask from kept positions.

    Args:
        ids_keep: [B, K] int64 distinct positions in [0, length).
        length: L.
        dtype: dtype of the mask (float32 like the official code).
    Returns:
        [B, L] mask, 1 = masked, 0 = kept.
    """
    mask = torch.ones(ids_keep.shape[0], length, dtype=dtype, device=ids_keep.device)
    return mask.scatter_(1, ids_keep, 0.0)


def check_ids_keep(ids_keep, batch, length, check_values=True):
    """Raises a clear error unless ids_keep is a valid [batch, K] int64 set of kept positions.

    Shape and dtype are always checked; with check_values, also that the positions are in
    [0, length) and distinct within each row (this reads values back to the host: a sync on GPU).
    """
    if not isinstance(ids_keep, torch.Tensor):
        raise TypeError(f"ids_keep must be a torch.Tensor, got {type(ids_keep).__name__}")
    if ids_keep.dtype != torch.int64:
        raise TypeError(f"ids_keep must be int64, got {ids_keep.dtype}")
    if ids_keep.dim() != 2 or ids_keep.shape[0] != batch or not 1 <= ids_keep.shape[1] <= length:
        raise ValueError(f"ids_keep must have shape [B={batch}, K] with 1 <= K <= L={length}, "
                         f"got {list(ids_keep.shape)}")
    if not check_values:
        return
    if bool(((ids_keep < 0) | (ids_keep >= length)).any()):
        raise ValueError(f"ids_keep has positions outside [0, {length})")
    counts = torch.zeros(batch, length, dtype=torch.int32, device=ids_keep.device)
    counts.scatter_add_(1, ids_keep, torch.ones_like(ids_keep, dtype=torch.int32))
    if bool((counts > 1).any()):
        raise ValueError("ids_keep has duplicate positions within a sample")
