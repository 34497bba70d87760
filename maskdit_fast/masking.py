"""MAE-style random token masking for MaskDiT.

Per sample, draw noise ~ U(0, 1)^L, shuffle the positions by argsort(noise) and keep the first
len_keep = int(L * (1 - mask_ratio)) of them. Conventions follow the official MaskDiT code: `mask` is
float with 1 = masked (removed) and 0 = kept, `ids_restore` = argsort(ids_shuffle) inverts the shuffle.

Two layouts of the kept positions:
  dense   ids_keep [B, K]: every sample keeps the same count (the official MaskDiT), so the encoder
          batch is a dense [B, K, D];
  packed  `PackedMask`: per-sample keep counts (per-sample mask ratios, mixed resolutions), the kept
          positions of all samples concatenated into ids [T] with cu_seqlens [B+1], the varlen
          attention layout. The same noise draw gives the same kept positions in both layouts, so
          `random_masking_packed([r] * B, ...)` equals `random_masking_ids(B, L, r, ...)` packed.
"""
import numbers
from typing import NamedTuple, Tuple

import torch

# cu_seqlens_from_counts and random_packed_ids are part of this module's API (the packed layout).
from maskdit_fast.indexing import cu_seqlens_from_counts, random_order, random_packed_ids, sample_index  # noqa: F401


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
    ids_shuffle = random_order(batch, length, generator, device)
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


# ----------------------------------------------------------------------------------------------
# Packed layout: per-sample keep counts

class PackedMask(NamedTuple):
    """Kept positions of a batch with per-sample keep counts, sample after sample.

    ids: [T] int64 kept positions (each within its sample's grid of L tokens), sample b owning
        ids[cu_seqlens[b]:cu_seqlens[b+1]], in shuffle order (T = sum(counts)).
    cu_seqlens: [B+1] int32 cumulative keep counts (0, counts[0], counts[0] + counts[1], ...), on
        ids' device.
    counts: tuple of B Python ints, tokens kept per sample; known on the host, so the model needs no
        device sync for output shapes or the attention launch size.
    """
    ids: torch.Tensor
    cu_seqlens: torch.Tensor
    counts: Tuple[int, ...]

    @property
    def batch_size(self):
        """B, the number of samples."""
        return len(self.counts)

    @property
    def max_seqlen(self):
        """The largest keep count (sizes the varlen attention launch grid)."""
        return max(self.counts)


def is_per_sample(mask_ratio):
    """Whether mask_ratio gives one ratio per sample (a tensor, list or tuple) rather than a number."""
    return isinstance(mask_ratio, (torch.Tensor, list, tuple))


def per_sample_ratios(mask_ratio, batch=None):
    """Validates mask ratios and returns them as B Python floats.

    Args:
        mask_ratio: a number (the same for every sample) or B per-sample ratios (1-D float tensor on
            any device, list or tuple), each in [0, 1). A CUDA tensor costs one device sync. Values
            are taken at their tensor's precision: float32 0.3 is 0.30000001, which keeps
            int(20 * 0.69999999) = 13 of 20 tokens where the Python float 0.3 keeps 14, so prefer
            float64 tensors (as `sample_mask_ratios` returns).
        batch: B; None takes it from the per-sample ratios.
    Returns:
        list of B floats.
    """
    if isinstance(mask_ratio, torch.Tensor):
        if mask_ratio.dim() != 1 or not mask_ratio.is_floating_point():
            raise ValueError(f"per-sample mask ratios must be a 1-D float tensor [B], got {mask_ratio.dtype} "
                             f"{list(mask_ratio.shape)}")
        ratios = mask_ratio.tolist()
    elif isinstance(mask_ratio, (list, tuple)):
        ratios = list(mask_ratio)
    elif batch is None:
        raise ValueError("a single mask ratio needs the batch size")
    else:
        ratios = [mask_ratio] * batch
    if batch is not None and len(ratios) != batch:
        raise ValueError(f"{len(ratios)} per-sample mask ratios for a batch of {batch}")
    for r in ratios:
        if isinstance(r, bool) or not isinstance(r, numbers.Real):
            raise TypeError(f"mask_ratio must be a float in [0, 1), got {type(r).__name__}")
        if not 0.0 <= r < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {r}")
    return [float(r) for r in ratios]


def keep_counts(length, mask_ratio, batch=None):
    """Per-sample keep counts int(length * (1 - r_b)) (float64 arithmetic, as `num_kept`).

    Args:
        length: L, tokens per sample.
        mask_ratio, batch: as for `per_sample_ratios`.
    Returns:
        tuple of B ints, each >= 1 (a ratio that keeps no token raises ValueError).
    """
    return tuple(num_kept(length, r) for r in per_sample_ratios(mask_ratio, batch))


def sample_mask_ratios(batch, low, high, generator=None):
    """Per-sample mask ratios drawn uniformly from [low, high) (the trainer's --mask-ratio-range).

    Args:
        batch: B.
        low, high: 0 <= low <= high < 1; low == high gives the constant ratio.
        generator: optional torch.Generator; the draw happens on its device (a CPU generator avoids
            a device sync when the ratios are turned into keep counts).
    Returns:
        [B] float64 CPU tensor.
    """
    for name, v in (("low", low), ("high", high)):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0.0 <= v < 1.0:
            raise ValueError(f"mask ratio range {name} must be a number in [0, 1), got {v!r}")
    if low > high:
        raise ValueError(f"mask ratio range needs low <= high, got ({low}, {high})")
    device = generator.device if generator is not None else None
    u = torch.rand(batch, generator=generator, device=device, dtype=torch.float64).cpu()
    return low + (high - low) * u


def _packed(ids, counts):
    """PackedMask from packed positions and host keep counts (cu_seqlens built on the host)."""
    return PackedMask(ids, cu_seqlens_from_counts(counts).to(ids.device), tuple(counts))


def random_masking_packed(mask_ratio, length, generator=None, device=None):
    """Draws an independent random mask per sample with per-sample ratios (packed layout).

    Uses the same noise draw and shuffle as `random_masking_ids`: with equal ratios and the same
    generator state, the kept positions are those of random_masking_ids, row after row.

    Args:
        mask_ratio: B per-sample ratios in [0, 1) (1-D float tensor, list or tuple).
        length: L, tokens per sample.
        generator: optional torch.Generator (on `device`).
        device: device of the returned tensors (defaults to the generator's, else CPU).
    Returns:
        packed: PackedMask, sample b keeping int(L * (1 - mask_ratio[b])) tokens.
        mask: [B, L] float32, 1 = masked, 0 = kept.
    """
    if not is_per_sample(mask_ratio):
        raise TypeError("random_masking_packed takes per-sample ratios; use random_masking_ids for one ratio")
    counts = keep_counts(length, mask_ratio)
    ids_shuffle = random_order(len(counts), length, generator, device)
    packed = _packed(ids_shuffle.new_empty(0), counts)
    # Packed row t is entry t - cu[b] of its sample b's shuffle (indices only: no host sync).
    rows = torch.arange(sum(counts), device=ids_shuffle.device)
    sample = sample_index(rows, packed.cu_seqlens)
    packed = packed._replace(ids=ids_shuffle[sample, rows - packed.cu_seqlens[sample]])
    return packed, mask_from_packed(packed, length)


def pack_ids_keep(ids_keep):
    """Packs explicit kept positions into a PackedMask.

    Args:
        ids_keep: a dense [B, K] int64 tensor (same count per sample), or a list/tuple of B 1-D int64
            tensors (sample b's kept positions, any counts >= 1), all on one device.
    Returns:
        PackedMask (positions in the given order; values are checked where they are used).
    """
    if isinstance(ids_keep, torch.Tensor):
        if ids_keep.dim() != 2:
            raise ValueError(f"dense ids_keep must be [B, K], got shape {list(ids_keep.shape)}")
        rows = list(ids_keep)
    elif isinstance(ids_keep, (list, tuple)) and ids_keep:
        rows = list(ids_keep)
    else:
        raise TypeError(f"ids_keep must be a [B, K] tensor or a non-empty list of 1-D tensors, "
                        f"got {type(ids_keep).__name__}")
    for b, row in enumerate(rows):
        if not isinstance(row, torch.Tensor) or row.dtype != torch.int64 or row.dim() != 1:
            raise TypeError(f"ids_keep[{b}] must be a 1-D int64 tensor, got "
                            f"{getattr(row, 'dtype', type(row).__name__)} {list(getattr(row, 'shape', []))}")
        if row.numel() == 0:
            raise ValueError(f"ids_keep[{b}] keeps no token: every sample must keep at least one")
        if row.device != rows[0].device:
            raise ValueError(f"ids_keep[{b}] is on {row.device} but ids_keep[0] on {rows[0].device}")
    return _packed(torch.cat(rows), [row.numel() for row in rows])


def mask_from_packed(packed, length, dtype=torch.float32):
    """Binary mask [B, L] (1 = masked, 0 = kept) from a PackedMask over grids of `length` tokens."""
    mask = torch.ones(packed.batch_size, length, dtype=dtype, device=packed.ids.device)
    mask[sample_index(packed.ids, packed.cu_seqlens), packed.ids] = 0.0
    return mask


def check_packed_mask(packed, batch, length, check_values=True):
    """Raises a clear error unless `packed` is a consistent PackedMask for `batch` samples of
    `length` tokens. Types, shapes and counts (host ints) are always checked; with check_values
    also that cu_seqlens matches counts and that the positions are in [0, length) and distinct per
    sample (one host sync on GPU)."""
    if not isinstance(packed, PackedMask):
        raise TypeError(f"expected a PackedMask, got {type(packed).__name__}")
    ids, cu, counts = packed
    if len(counts) != batch:
        raise ValueError(f"PackedMask holds {len(counts)} samples for a batch of {batch}")
    if not isinstance(ids, torch.Tensor) or ids.dtype != torch.int64 or ids.dim() != 1:
        raise TypeError(f"PackedMask.ids must be a 1-D int64 tensor, got {getattr(ids, 'dtype', type(ids).__name__)}")
    if not isinstance(cu, torch.Tensor) or cu.dtype != torch.int32:
        raise TypeError(f"PackedMask.cu_seqlens must be an int32 tensor, got {getattr(cu, 'dtype', type(cu).__name__)}")
    if cu.shape != (batch + 1,):
        raise ValueError(f"PackedMask.cu_seqlens must have shape [B+1] = [{batch + 1}], got {list(cu.shape)}")
    if cu.device != ids.device:
        raise ValueError(f"PackedMask.cu_seqlens is on {cu.device} but ids on {ids.device}")
    if any(isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= length for n in counts):
        raise ValueError(f"PackedMask.counts must be ints in [1, L={length}], got {list(counts)}")
    if sum(counts) != ids.numel():
        raise ValueError(f"PackedMask.counts sum to {sum(counts)} but ids has {ids.numel()} positions")
    if not check_values:
        return
    expected = cu_seqlens_from_counts(counts, cu.device)
    rows = sample_index(ids, cu)
    key = (rows * length + ids).sort().values
    bad = torch.stack([(cu.long() != expected).any(), ((ids < 0) | (ids >= length)).any(),
                       (key[1:] == key[:-1]).any()]).tolist()
    if bad[0]:
        raise ValueError("PackedMask.cu_seqlens does not match its counts")
    if bad[1]:
        raise ValueError(f"PackedMask.ids has positions outside [0, {length})")
    if bad[2]:
        raise ValueError("PackedMask.ids has duplicate positions within a sample")
