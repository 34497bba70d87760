"""The "cuda" back-end (csrc/ kernels) on a GPU against the float64 references, by maskdit_fast.accuracy's rule:
every op and dtype at small odd shapes, and at MaskDiT-XL/2 sizes (128 of 256 tokens kept, encoder width 1152,
decoder width 512) in bf16; bitwise-deterministic reducing backwards; a gather -> modulate -> scatter step that
never waits for the device. Skipped without a GPU.

The kernels allocate their outputs and fp32 partial buffers with at::empty, so the checks run with torch's
deterministic mode and `fill_uninitialized_memory`, which NaN-fills every such allocation: an element a kernel
fails to write fails the check."""
import contextlib
import functools
import warnings

import pytest
import torch

from maskdit_fast.accuracy import check_op
from maskdit_fast.indexing import random_keep_ids
from maskdit_fast.ops import gather_scatter as gs
from maskdit_fast.ops import modulate as md
from conftest import assert_checks, assert_deterministic_backward, assert_no_host_sync

pytestmark = pytest.mark.gpu
OPS = ("gather_tokens", "scatter_tokens", "layernorm_modulate", "gated_residual")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CUDA = dict(backend="cuda")
B, L, K, D, DECODER_D = 256, 256, 128, 1152, 512


@contextlib.contextmanager
def poisoned_allocations():
    """NaN-fills every tensor allocated inside (torch.empty / at::empty): deterministic mode with
    fill_uninitialized_memory, warn-only so the references' ops still run."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*deterministic.*")
            yield
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = fill
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def op_checks(op, B, L, K, D, dtype, seed=0):
    """All variants of one op at [B, L (K kept), D] in `dtype`, each forward and backward.

    Variants: gather_tokens with a [1, L, D] pos_embed (with grad), without one, and (low precision) with an fp32
    pos_embed (dtype promotion); scatter_tokens with a [1, 1, D] mask token and [L, D] pos_embed, and with a [D]
    mask token and none; layernorm_modulate / gated_residual with per-sample [B, D] and per-token [B, L, D]
    conditioning.
    """
    g = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape, dt=dtype):
        return torch.randn(*shape, device="cuda", dtype=dt, generator=g).requires_grad_()

    ids = random_keep_ids(B, L, K, g)
    tag = f"[{str(dtype).replace('torch.', '')} B{B} L{L} K{K} D{D}]"
    check = functools.partial(check_op, generator=g, poison=contextlib.nullcontext)
    checks = []
    with poisoned_allocations():
        if op == "gather_tokens":
            fn = functools.partial(gs.gather_tokens, **CUDA)
            checks += check(f"gather_tokens{tag}", fn, gs.gather_tokens_ref, (randn(B, L, D), ids, randn(1, L, D)))
            checks += check(f"gather_tokens no pos{tag}", fn, gs.gather_tokens_ref, (randn(B, L, D), ids))
            if dtype != torch.float32:
                checks += check(f"gather_tokens fp32 pos{tag}", fn, gs.gather_tokens_ref,
                                (randn(B, L, D), ids, randn(L, D, dt=torch.float32)))
        elif op == "scatter_tokens":
            fn = functools.partial(gs.scatter_tokens, **CUDA)
            checks += check(f"scatter_tokens{tag}", fn, gs.scatter_tokens_ref,
                            (randn(B, K, D), ids, randn(1, 1, D), L, randn(L, D)))
            checks += check(f"scatter_tokens no pos{tag}", fn, gs.scatter_tokens_ref, (randn(B, K, D), ids, randn(D), L))
        elif op == "layernorm_modulate":
            fn = functools.partial(md.layernorm_modulate, **CUDA)
            checks += check(f"layernorm_modulate{tag}", fn, md.layernorm_modulate_ref,
                            (randn(B, L, D), randn(B, D), randn(B, D)))
            checks += check(f"layernorm_modulate per-token{tag}", fn, md.layernorm_modulate_ref,
                            (randn(B, L, D), randn(B, L, D), randn(B, L, D)))
        else:
            fn = functools.partial(md.gated_residual, **CUDA)
            checks += check(f"gated_residual{tag}", fn, md.gated_residual_ref, (randn(B, L, D), randn(B, L, D), randn(B, D)))
            checks += check(f"gated_residual per-token{tag}", fn, md.gated_residual_ref,
                            (randn(B, L, D), randn(B, L, D), randn(B, L, D)))
    return checks


@pytest.mark.parametrize("D", [72, 1000, 75])  # 75 is no multiple of any pack width: the scalar kernels
@pytest.mark.parametrize("L", [1, 7, 256])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", OPS)
def test_small_odd_shapes_match_float64_reference(op, dtype, L, D):
    assert_checks(op_checks(op, 3, L, (L + 1) // 2, D, dtype, seed=L * 1000 + D))


@pytest.mark.parametrize("op", OPS)
def test_dit_xl_sizes(op):
    checks = op_checks(op, B, L, K, D, torch.bfloat16)
    if op != "gather_tokens":  # the decoder width
        checks += op_checks(op, B, L, K, DECODER_D, torch.bfloat16)
    assert_checks(checks)


def test_reducing_backwards_bitwise_deterministic_xl():
    g = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()

    ids = random_keep_ids(B, L, K, g)
    assert_deterministic_backward(functools.partial(gs.scatter_tokens, **CUDA),
                                  (randn(B, K, DECODER_D), ids, randn(DECODER_D), L, randn(L, DECODER_D)), g)
    assert_deterministic_backward(functools.partial(gs.gather_tokens, **CUDA), (randn(B, L, D), ids, randn(L, D)), g)
    assert_deterministic_backward(functools.partial(md.layernorm_modulate, **CUDA),
                                  (randn(B, K, D), randn(B, D), randn(B, D)), g)
    assert_deterministic_backward(functools.partial(md.gated_residual, **CUDA),
                                  (randn(B, K, D), randn(B, K, D), randn(B, D)), g)


def test_step_never_waits_for_the_device():
    g = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()

    ids = random_keep_ids(B, L, K, g)
    x, pos, shift, scale, fill = randn(B, L, D), randn(1, L, D), randn(B, D), randn(B, D), randn(D)

    def step():
        h = gs.gather_tokens(x, ids, pos, validate=False, **CUDA)
        h = md.gated_residual(h, md.layernorm_modulate(h, shift, scale, **CUDA), scale, **CUDA)
        out = gs.scatter_tokens(h, ids, fill, L, pos, validate=False, **CUDA)
        torch.autograd.grad(out.float().square().sum(), [x, pos, shift, scale, fill])
    step()  # loads the extension first
    assert_no_host_sync(step)
