"""maskdit_fast.indexing: the index helpers of the dense and packed token layouts."""
import pytest
import torch

from maskdit_fast import indexing


def test_sample_index_dense_and_packed():
    ids = torch.zeros(3, 4, dtype=torch.int64)
    assert indexing.sample_index(ids, None).tolist() == [0] * 4 + [1] * 4 + [2] * 4
    cu = torch.tensor([0, 2, 2, 5, 6], dtype=torch.int32)  # an empty sample in the middle
    assert indexing.sample_index(torch.zeros(6, dtype=torch.int64), cu).tolist() == [0, 0, 2, 2, 2, 3]
    assert indexing.sample_index(torch.zeros(2, 0, dtype=torch.int64), None).numel() == 0
    assert indexing.batch_size(ids, None) == 3 and indexing.batch_size(ids.reshape(-1), cu) == 4


@pytest.mark.parametrize("counts", [[3, 0, 2], torch.tensor([3, 0, 2]), []])
def test_cu_seqlens_from_counts(counts):
    cu = indexing.cu_seqlens_from_counts(counts)
    assert cu.dtype == torch.int32
    want = [0] + torch.tensor(list(counts), dtype=torch.int64).cumsum(0).tolist()
    assert cu.tolist() == want


def test_random_order_is_a_permutation_per_row_and_reproducible():
    order = indexing.random_order(5, 9, torch.Generator().manual_seed(0))
    assert order.shape == (5, 9) and order.dtype == torch.int64
    assert torch.equal(order.sort(1).values, torch.arange(9).expand(5, 9))
    assert torch.equal(order, indexing.random_order(5, 9, torch.Generator().manual_seed(0)))
    # the MAE draw: argsort of U(0, 1) noise drawn with the same generator state
    noise = torch.rand(5, 9, generator=torch.Generator().manual_seed(0))
    assert torch.equal(order, noise.argsort(1))


def test_random_keep_ids_and_packed_ids_agree_with_the_order():
    keep = indexing.random_keep_ids(4, 10, 3, torch.Generator().manual_seed(1))
    assert keep.is_contiguous() and keep.shape == (4, 3)
    assert torch.equal(keep, indexing.random_order(4, 10, torch.Generator().manual_seed(1))[:, :3])
    counts = torch.tensor([3, 0, 10, 1])
    packed = indexing.random_packed_ids(counts, 10, torch.Generator().manual_seed(1))
    order = indexing.random_order(4, 10, torch.Generator().manual_seed(1))
    assert torch.equal(packed, torch.cat([order[b, :int(c)] for b, c in enumerate(counts)]))
