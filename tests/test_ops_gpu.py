"""The Triton glue ops on a GPU at MaskDiT-XL/2 sizes (128 of 256 tokens kept, encoder width 1152, decoder width
512), bf16, against the float64 references by maskdit_fast.accuracy's rule (buffers NaN-poisoned); bitwise
deterministic backwards; a gather -> modulate -> scatter step that never waits for the device. Skipped without
a GPU (the same kernels run at small odd shapes under the interpreter in test_ops_gather_scatter.py and
test_ops_modulate.py)."""
from functools import partial

import pytest
import torch

from maskdit_fast.accuracy import check_op
from maskdit_fast.indexing import cu_seqlens_from_counts, random_keep_ids, random_packed_ids
from maskdit_fast.ops import gather_scatter as gs
from maskdit_fast.ops import modulate as md
from conftest import assert_checks, assert_deterministic_backward, assert_no_host_sync

pytestmark = pytest.mark.gpu
B, L, K, D, DECODER_D = 256, 256, 128, 1152, 512
TRITON = dict(backend="triton", validate=False)


@pytest.fixture
def gen():
    return torch.Generator(device="cuda").manual_seed(0)


def _randn(gen, *shape, dtype=torch.bfloat16):
    return torch.randn(*shape, device="cuda", dtype=dtype, generator=gen).requires_grad_()


def test_gather_scatter_dense_and_packed_xl(gen):
    randn = partial(_randn, gen)
    ids = random_keep_ids(B, L, K, gen)
    counts = torch.randint(0, L + 1, (B,), device="cuda", generator=gen)
    cu = cu_seqlens_from_counts(counts)
    ids_packed = random_packed_ids(counts, L, gen)
    T = ids_packed.numel()
    assert_checks(check_op("gather_tokens", partial(gs.gather_tokens, **TRITON), gs.gather_tokens_ref,
                           (randn(B, L, D), ids, randn(1, L, D)), gen))
    assert_checks(check_op("scatter_tokens", partial(gs.scatter_tokens, **TRITON), gs.scatter_tokens_ref,
                           (randn(B, K, DECODER_D), ids, randn(1, 1, DECODER_D), L, randn(1, L, DECODER_D)), gen))
    assert_checks(check_op("gather_tokens_varlen", partial(gs.gather_tokens_varlen, **TRITON),
                           gs.gather_tokens_varlen_ref, (randn(B, L, D), ids_packed, cu, randn(L, D)), gen))
    assert_checks(check_op("scatter_tokens_varlen", partial(gs.scatter_tokens_varlen, **TRITON),
                           gs.scatter_tokens_varlen_ref,
                           (randn(T, DECODER_D), ids_packed, cu, randn(DECODER_D), L, randn(L, DECODER_D)), gen))


def test_scatter_backward_bitwise_deterministic_xl(gen):
    randn = partial(_randn, gen)
    ids = random_keep_ids(B, L, K, gen)
    assert_deterministic_backward(partial(gs.scatter_tokens, **TRITON),
                                  (randn(B, K, DECODER_D), ids, randn(DECODER_D), L, randn(L, DECODER_D)), gen)


@pytest.mark.parametrize("width,tokens", [(D, K), (DECODER_D, L)], ids=["encoder", "decoder"])
def test_modulate_per_sample_xl(width, tokens, gen):
    randn = partial(_randn, gen)
    x = randn(B, tokens, width)
    assert_checks(check_op(f"layernorm_modulate[{tokens}x{width}]", partial(md.layernorm_modulate, backend="triton"),
                           md.layernorm_modulate_ref, (x, randn(B, width), randn(B, width)), gen))
    assert_checks(check_op(f"gated_residual[{tokens}x{width}]", partial(md.gated_residual, backend="triton"),
                           md.gated_residual_ref, (x, randn(B, tokens, width), randn(B, width)), gen))


def test_modulate_per_token_xl(gen):
    randn = partial(_randn, gen)
    assert_checks(check_op("layernorm_modulate per-token", partial(md.layernorm_modulate, backend="triton"),
                           md.layernorm_modulate_ref, (randn(B, K, D), randn(B, K, D), randn(B, K, D)), gen))
    assert_checks(check_op("gated_residual per-token", partial(md.gated_residual, backend="triton"),
                           md.gated_residual_ref, (randn(B, K, D), randn(B, K, D), randn(B, K, D)), gen))


def test_layernorm_modulate_backward_bitwise_deterministic_xl(gen):
    randn = partial(_randn, gen)
    assert_deterministic_backward(partial(md.layernorm_modulate, backend="triton"),
                                  (randn(B, K, D), randn(B, D), randn(B, D)), gen)


def test_step_never_waits_for_the_device(gen):
    """gather -> modulate -> scatter, forward and backward, validate=False: no host sync."""
    randn = partial(_randn, gen)
    ids = random_keep_ids(B, L, K, gen)
    x, pos, shift, scale, fill = randn(B, L, D), randn(1, L, D), randn(B, D), randn(B, D), randn(D)

    def step():
        h = gs.gather_tokens(x, ids, pos, **TRITON)
        h = md.gated_residual(h, md.layernorm_modulate(h, shift, scale, backend="triton"), scale, backend="triton")
        out = gs.scatter_tokens(h, ids, fill, L, pos, **TRITON)
        torch.autograd.grad(out.float().square().sum(), [x, pos, shift, scale, fill])
    step()  # compiles first: the compile may synchronise
    assert_no_host_sync(step)
