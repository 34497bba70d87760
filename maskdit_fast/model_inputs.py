"""What DiT and MaskDiT accept: the checks of their forward's inputs, and MaskDiT's masking request
(mask_ratio / ids_keep) resolved into each group's kept tokens.

Types, shapes and devices are always checked. Values (labels in [0, num_classes], kept positions in
range and distinct, cu_seqlens consistent) need a host sync: they are checked unless the model was
built with check_inputs=False or torch.compile is tracing. Positions drawn here are not re-checked.
"""
from typing import NamedTuple, Optional, Tuple

import torch

from maskdit_fast.masking import (PackedMask, check_ids_keep, check_packed_mask, is_per_sample, keep_counts,
                                  mask_from_ids_keep, mask_from_packed, pack_ids_keep, per_sample_ratios,
                                  random_masking_ids, random_masking_packed)


class KeptTokens(NamedTuple):
    """One group's kept tokens, in the order they enter the encoder (sample after sample).

    ids: None (every token, in grid order: nothing to gather), [B, K] int64 (every sample keeps K
        positions) or [T] int64 packed (per-sample counts, with cu_seqlens);
    cu_seqlens: [B+1] int32 for packed ids, else None;
    counts: B host ints, the tokens each sample keeps;
    mask: [B, L] float, 1 = masked, or None (see `kept_tokens`).
    """
    ids: Optional[torch.Tensor]
    cu_seqlens: Optional[torch.Tensor]
    counts: Tuple[int, ...]
    mask: Optional[torch.Tensor]


class Group(NamedTuple):
    """One group of a forward call: x [B, C, H, W], t [B], y int64 [B], its (h, w) token grid, its kept tokens."""
    x: torch.Tensor
    t: torch.Tensor
    y: torch.Tensor
    grid: Tuple[int, int]
    kept: KeptTokens


def checked_inputs(model, x, t, y, any_size=False):
    """Validates x [B, C, H, W], t [B] or scalar, y int [B] (None = null class) for `model` and returns
    (t [B], y int64 [B]). H, W must be the model's input_size, or with any_size positive multiples of
    its patch size."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a [B, C, H, W] tensor, got {getattr(x, 'shape', type(x).__name__)}")
    B, C, H, W = x.shape
    if C != model.in_channels:
        raise ValueError(f"x has {C} channels, the model expects in_channels={model.in_channels}")
    if any_size:
        if H % model.patch_size or W % model.patch_size or not H or not W:
            raise ValueError(f"x is {H}x{W}, not a positive multiple of patch_size={model.patch_size}")
    elif (H, W) != model.input_size:
        raise ValueError(f"x is {H}x{W}, the model expects input_size={model.input_size} (H, W)")
    t = torch.as_tensor(t, device=x.device)
    if t.dim() == 0:
        t = t.expand(B)
    if t.shape != (B,) or t.dtype == torch.bool or t.is_complex():
        raise ValueError(f"t must be a real tensor of shape [B={B}] or a scalar, got {t.dtype} {list(t.shape)}")
    if y is None:
        return t, torch.full((B,), model.null_class, dtype=torch.int64, device=x.device)
    if not isinstance(y, torch.Tensor) or y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"y must be an integer tensor of class ids, got {getattr(y, 'dtype', type(y).__name__)}")
    if y.shape != (B,):
        raise ValueError(f"y must have shape [B={B}], got {list(y.shape)}")
    if model.check_inputs and not torch.compiler.is_compiling():
        if bool(((y < 0) | (y > model.num_classes)).any()):
            raise ValueError(f"class labels must be in [0, num_classes={model.num_classes}] "
                             f"({model.num_classes} = null class)")
    return t, y.long()


def group_list(name, value, groups):
    """`value` as a list of one entry per group (groups=None: any non-empty length)."""
    if not isinstance(value, (list, tuple)) or not value:
        raise TypeError(f"MaskDiT groups: {name} must be a non-empty list (one entry per group), "
                        f"got {type(value).__name__}")
    if groups is not None and len(value) != groups:
        raise ValueError(f"MaskDiT groups: {name} has {len(value)} entries for {groups} groups")
    return list(value)


def checked_groups(model, x, t, y, mask_ratio, ids_keep):
    """MaskDiT's forward arguments as groups: (list of Group, grouped).

    One batch (x a tensor) is one group at the model's input_size; lists (x or t a list: grouped)
    are G groups of any size (multiples of the patch size), with mask_ratio a number for all or a
    list of G entries, y and ids_keep None or lists of G entries. Each group is checked, then its
    mask resolved (random ones drawn now, group after group, from the global RNG of x's device).
    """
    grouped = isinstance(x, (list, tuple)) or isinstance(t, (list, tuple))
    if grouped:
        x = group_list("x", x, None)
        G = len(x)
        t = group_list("t", t, G)
        y = [None] * G if y is None else group_list("y", y, G)
        ratios = group_list("mask_ratio", mask_ratio, G) if isinstance(mask_ratio, (list, tuple)) \
            else [mask_ratio] * G
        ids_keep = [None] * G if ids_keep is None else group_list("ids_keep", ids_keep, G)
    else:
        x, t, y, ratios, ids_keep = [x], [t], [y], [mask_ratio], [ids_keep]
    check_values = model.check_inputs and not torch.compiler.is_compiling()
    groups = []
    for g, (xg, tg, yg) in enumerate(zip(x, t, y)):
        where = f"[{g}]" if grouped else ""
        tg, yg = checked_inputs(model, xg, tg, yg, any_size=grouped)
        if xg.device != x[0].device:
            raise ValueError(f"x[{g}] is on {xg.device} but x[0] on {x[0].device}")
        grid = (xg.shape[2] // model.patch_size, xg.shape[3] // model.patch_size)
        # per-sample requests and groups always return their masks: the output's structure then
        # follows the request's type, not the values drawn
        always_mask = grouped or is_per_sample(ratios[g]) or not (ids_keep[g] is None
                                                                 or isinstance(ids_keep[g], torch.Tensor))
        kept = kept_tokens(ids_keep[g], ratios[g], xg.shape[0], grid[0] * grid[1], xg.device, check_values,
                           always_mask, where)
        groups.append(Group(xg, tg, yg, grid, kept))
    return groups, grouped


def kept_tokens(ids_keep, mask_ratio, batch, length, device, check_values, always_mask=False, where=""):
    """The kept tokens of `batch` samples on grids of `length` tokens (KeptTokens).

    Args:
        ids_keep: None (random positions from mask_ratio, drawn here) or explicit kept positions: a
            [B, K] int64 tensor, a PackedMask or a list of B 1-D int64 tensors, on `device`.
        mask_ratio: a number or B per-sample ratios in [0, 1); with ids_keep given it must be 0 or
            give ids_keep's counts.
        check_values: check explicit positions' values (a host sync).
        always_mask: return the mask also when nothing is masked (zeros); else mask is None then.
        where: the group's index for error messages ("[g]", or "" for a single batch).
    Returns:
        KeptTokens: ids None when a single keep count keeps every token (nothing drawn, nothing to
        gather); [B, K] when all counts are equal (also for a PackedMask or drawn per-sample ratios: the same
        positions, viewed dense); else packed.
    """
    ratios = per_sample_ratios(mask_ratio, batch)
    counts = keep_counts(length, ratios)
    if ids_keep is None:
        if min(counts) == length:  # nothing masked: every token in order, no random draw
            if not always_mask:
                return KeptTokens(None, None, counts, None)
            # a per-sample request still gathers and scatters (in order): the mask token stays in the
            # graph (a zero gradient), so which parameters get gradients follows the request too
            ids = torch.arange(length, device=device).repeat(batch, 1)
            return KeptTokens(ids, None, counts, torch.zeros(batch, length, device=device))
        if len(set(counts)) == 1:  # the same draw as random_masking_packed's, kept dense
            ids, _, mask = random_masking_ids(batch, length, ratios[0], device=device)
            return KeptTokens(ids, None, counts, mask)
        return _packed_kept(*random_masking_packed(ratios, length, device=device))
    if isinstance(ids_keep, torch.Tensor):
        if ids_keep.device != device:
            raise ValueError(f"ids_keep{where} is on {ids_keep.device} but x{where} is on {device}")
        check_ids_keep(ids_keep, batch, length, check_values)
        K = ids_keep.shape[1]
        mask = mask_from_ids_keep(ids_keep, length) if K < length or always_mask else None
        kept = KeptTokens(ids_keep, None, (K,) * batch, mask)
    else:
        packed = ids_keep if isinstance(ids_keep, PackedMask) else pack_ids_keep(ids_keep)
        if isinstance(packed.ids, torch.Tensor) and packed.ids.device != device:
            raise ValueError(f"ids_keep{where} is on {packed.ids.device} but x{where} is on {device}")
        check_packed_mask(packed, batch, length, check_values)
        kept = _packed_kept(packed, mask_from_packed(packed, length))
    if any(ratios) and kept.counts != counts:
        raise ValueError(f"ids_keep{where} keeps {_count_list(kept.counts)} tokens per sample but mask_ratio="
                         f"{mask_ratio} keeps {_count_list(counts)} of {length}")
    return kept


def _packed_kept(packed, mask):
    """KeptTokens of a PackedMask: dense [B, K] (a view) when every sample keeps K, else packed."""
    if len(set(packed.counts)) == 1:
        return KeptTokens(packed.ids.view(packed.batch_size, -1), None, packed.counts, mask)
    return KeptTokens(packed.ids, packed.cu_seqlens, packed.counts, mask)


def _count_list(counts):
    """Keep counts for messages: K when all equal, else the list."""
    return counts[0] if len(set(counts)) == 1 else list(counts)
