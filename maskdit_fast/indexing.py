"""Index helpers of the two token layouts, below both `maskdit_fast.ops` and the Triton kernels (this
module imports torch only).

  dense   ids [B, K] int64: every sample keeps K positions of its L-token grid;
  packed  ids [T] int64 with cu_seqlens [B+1] int32: sample b owns ids[cu[b]:cu[b+1]] (the varlen layout).

None of these helpers waits for the device.
"""
import torch


def batch_size(ids, cu_seqlens):
    """Samples B: ids.shape[0] for the dense [B, K] layout, len(cu_seqlens) - 1 for the packed one."""
    return ids.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1


def sample_index(ids, cu_seqlens):
    """Sample of each packed row, int64 [N] (N = ids.numel()).

    Dense layout (cu_seqlens None, ids [B, K]): row r belongs to sample r // K. Packed layout
    (ids [T], cu_seqlens [B+1]): sample b owns rows cu_seqlens[b]:cu_seqlens[b+1], i.e. row t belongs
    to the number of cu_seqlens[1:] entries <= t."""
    rows = torch.arange(ids.numel(), device=ids.device)
    if cu_seqlens is None:
        return rows // max(ids.shape[1], 1)
    return torch.searchsorted(cu_seqlens[1:].to(torch.int64), rows, right=True)


def cu_seqlens_from_counts(counts, device=None):
    """int32 [B+1] offsets 0, c0, c0 + c1, ... of per-sample token counts (a list, or a tensor kept on its
    device unless `device` is given): the cu_seqlens of the varlen ops."""
    counts = torch.as_tensor(counts, dtype=torch.int64, device=device)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32)


def random_order(batch, length, generator=None, device=None):
    """[batch, length] int64: an independent uniformly random permutation of 0..length-1 per row, as MAE
    draws it (argsort of U(0, 1) noise, ascending), on `device` (default: the generator's, else CPU)."""
    if device is None and generator is not None:
        device = generator.device
    return torch.rand(batch, length, generator=generator, device=device).argsort(dim=1)


def random_keep_ids(batch, length, keep, generator=None, device=None):
    """Dense kept positions [batch, keep] int64, contiguous: the first `keep` entries of `random_order`."""
    return random_order(batch, length, generator, device)[:, :keep].contiguous()


def random_packed_ids(counts, length, generator=None):
    """Packed positions [T] int64: the first counts[b] of a random permutation of sample b's `length`
    positions, sample after sample (counts: int64 tensor [B] on the generator's device; 0 allowed)."""
    order = random_order(counts.numel(), length, generator, counts.device)
    return order[torch.arange(length, device=counts.device)[None] < counts[:, None]]
