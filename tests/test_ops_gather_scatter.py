"""Triton gather/scatter (dense and varlen) against the float64 references; registration
(opcheck, torch.compile, checkpointing); bad input. On CPU the kernels run under the Triton
interpreter (tests/conftest.py), so shapes are small: the full width list at small token counts,
the full token-count list at width 72. Tests take the `device` fixture (tests/conftest.py): with a GPU
the same grids check the compiled kernels on CUDA. Values are drawn with CPU generators and then moved,
so the CPU runs draw exactly what they drew before."""
import functools

import pytest
import torch

from maskdit_fast.ops import gather_scatter as gs
from maskdit_fast.accuracy import check_op
from conftest import assert_checks, grad_generator

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (B, L, K, D) x dtype: every width and dtype at 1 and 7 tokens, batch 1 and 3; the long sequences
# (128, 256 tokens, where the interpreter is slow) at width 72, one dtype each
SMALL = [(3, 7, 4, 72), (1, 7, 3, 384), (3, 7, 5, 1000), (1, 7, 4, 1152), (3, 1, 1, 72)]
CASES = ([(shape, dtype) for shape in SMALL for dtype in DTYPES]
         + [((1, 128, 64, 72), torch.float16), ((1, 256, 128, 72), torch.bfloat16),
            ((3, 256, 128, 72), torch.float32)])
TRITON = dict(backend="triton")


def _ids(B, L, K, gen, device):
    """ids_keep [B, K] int64 on device: a (non-contiguous) slice of per-sample random permutations."""
    return torch.rand(B, L, generator=gen).argsort(1).to(device)[:, :K]


def _packed(counts, L, gen, device):
    """ids_packed [T], cu_seqlens [B+1] int32 on device for per-sample keep counts."""
    cu = torch.zeros(len(counts) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(counts, dtype=torch.int64).cumsum(0)
    ids = [torch.randperm(L, generator=gen)[:c] for c in counts]
    return (torch.cat(ids) if ids else torch.zeros(0, dtype=torch.int64)).to(device), cu.to(device)


def _randn(*shape, dtype, gen, device, grad=True):
    """A leaf on device: drawn with the CPU generator gen, then moved and cast."""
    return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype).requires_grad_(grad)


@pytest.mark.parametrize("shape,dtype", CASES, ids=str)
def test_gather_scatter_match_reference(shape, dtype, device):
    B, L, K, D = shape
    gen = torch.Generator().manual_seed(hash(shape) % 2**31)
    dgen = grad_generator(gen, device)
    randn = functools.partial(_randn, dtype=dtype, gen=gen, device=device)
    ids = _ids(B, L, K, gen, device)
    assert_checks(check_op("gather", functools.partial(gs.gather_tokens, **TRITON), gs.gather_tokens_ref,
                            (randn(B, L, D), ids, randn(1, L, D)), dgen))
    assert_checks(check_op("scatter", functools.partial(gs.scatter_tokens, **TRITON), gs.scatter_tokens_ref,
                            (randn(B, K, D), ids, randn(1, 1, D), L, randn(L, D)), dgen))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("counts,L,D", [([2, 0, 5], 7, 72), ([4], 7, 1000), ([0, 0], 5, 72), ([], 4, 72)], ids=str)
def test_varlen_match_reference(counts, L, D, dtype, device):
    gen = torch.Generator().manual_seed(len(counts) * 100 + D)
    dgen = grad_generator(gen, device)
    randn = functools.partial(_randn, dtype=dtype, gen=gen, device=device)
    ids, cu = _packed(counts, L, gen, device)
    B, T = len(counts), sum(counts)
    assert_checks(check_op("gather_varlen", functools.partial(gs.gather_tokens_varlen, **TRITON),
                            gs.gather_tokens_varlen_ref, (randn(B, L, D), ids, cu, randn(L, D)), dgen))
    assert_checks(check_op("scatter_varlen", functools.partial(gs.scatter_tokens_varlen, **TRITON),
                            gs.scatter_tokens_varlen_ref, (randn(T, D), ids, cu, randn(D), L, randn(1, L, D)), dgen))


def test_varlen_equals_dense_for_equal_counts(device):
    # bitwise on any device: both layouts compute each element as one copy or one fp32 add
    gen = torch.Generator().manual_seed(0)
    B, L, K, D = 3, 7, 4, 72
    ids = _ids(B, L, K, gen, device)
    x, pos = torch.randn(B, L, D, generator=gen).to(device), torch.randn(L, D, generator=gen).to(device)
    cu = torch.arange(0, B * K + 1, K, dtype=torch.int32, device=device)
    dense = gs.gather_tokens(x, ids, pos, **TRITON)
    packed = gs.gather_tokens_varlen(x, ids.reshape(-1), cu, pos, **TRITON)
    assert torch.equal(packed, dense.reshape(B * K, D))
    fill = torch.randn(D, generator=gen).to(device)
    assert torch.equal(gs.scatter_tokens_varlen(packed, ids.reshape(-1), cu, fill, L, pos, **TRITON),
                       gs.scatter_tokens(dense, ids, fill, L, pos, **TRITON))


@pytest.mark.parametrize("with_pos", [False, True])
def test_without_pos_embed_and_frozen_params(with_pos, device):
    """No pos_embed / no grads wanted for pos_embed and mask_token: the kernels skip those paths."""
    gen = torch.Generator().manual_seed(1)
    dgen = grad_generator(gen, device)
    randn = functools.partial(_randn, dtype=torch.float32, gen=gen, device=device)
    B, L, K, D = 3, 7, 4, 72
    ids = _ids(B, L, K, gen, device)
    pos = randn(L, D, grad=False) if with_pos else None
    assert_checks(check_op("gather", functools.partial(gs.gather_tokens, **TRITON), gs.gather_tokens_ref,
                            (randn(B, L, D), ids, pos), dgen))
    assert_checks(check_op("scatter", functools.partial(gs.scatter_tokens, **TRITON), gs.scatter_tokens_ref,
                            (randn(B, K, D), ids, randn(D, grad=False), L, pos), dgen))


def test_mixed_dtypes_promote_like_reference(device):
    """bf16 tokens with an fp32 pos_embed / mask token (the model under autocast): fp32 output, the mask
    token rounded to bf16 first, grads in each input's dtype."""
    gen = torch.Generator().manual_seed(2)
    dgen = grad_generator(gen, device)
    bf16 = functools.partial(_randn, dtype=torch.bfloat16, gen=gen, device=device)
    fp32 = functools.partial(_randn, dtype=torch.float32, gen=gen, device=device)
    B, L, K, D = 3, 7, 4, 72
    ids = _ids(B, L, K, gen, device)
    assert_checks(check_op("gather", functools.partial(gs.gather_tokens, **TRITON), gs.gather_tokens_ref,
                            (bf16(B, L, D), ids, fp32(1, L, D)), dgen))
    assert_checks(check_op("scatter", functools.partial(gs.scatter_tokens, **TRITON), gs.scatter_tokens_ref,
                            (bf16(B, K, D), ids, fp32(D), L, fp32(L, D)), dgen))
    # 1 + 2**-10 is 1.0 in bf16: rounding the mask token before adding the fp32 pos_embed matters
    # (bitwise on any device: one rounding to bf16, then one fp32 add)
    args = (torch.zeros(B, K, D, dtype=torch.bfloat16, device=device), ids,
            torch.full((D,), 1 + 2**-10, device=device), L, torch.full((L, D), 2**-10, device=device))
    out = gs.scatter_tokens(*args, **TRITON)
    assert out.dtype == torch.float32
    assert torch.equal(out, gs.scatter_tokens_ref(*args))


@pytest.mark.parametrize("B,L,K", [(3, 7, 0), (0, 7, 0), (2, 0, 0), (2, 5, 5)])
def test_empty_and_full_edge_cases(B, L, K, device):
    """K = 0 (all masked), B = 0, L = 0 and K = L (nothing masked: zero mask_token grad)."""
    gen = torch.Generator().manual_seed(3)
    dgen = grad_generator(gen, device)
    randn = functools.partial(_randn, dtype=torch.float32, gen=gen, device=device)
    D = 72
    ids = _ids(B, L, K, gen, device)
    assert_checks(check_op("gather", functools.partial(gs.gather_tokens, **TRITON), gs.gather_tokens_ref,
                            (randn(B, L, D), ids, randn(L, D)), dgen))
    assert_checks(check_op("scatter", functools.partial(gs.scatter_tokens, **TRITON), gs.scatter_tokens_ref,
                            (randn(B, K, D), ids, randn(D), L, randn(L, D)), dgen))


def test_strided_tokens_read_in_place(device):
    """The patch embedding's [B, D, L] -> [B, L, D] transpose is gathered without a copy."""
    gen = torch.Generator().manual_seed(4)
    B, L, K, D = 3, 7, 4, 72
    x = torch.randn(B, D, L, generator=gen).to(device).transpose(1, 2)  # moved first: .to would compact
    ids = _ids(B, L, K, gen, device)  # a non-contiguous slice of the argsort, too
    assert not x.is_contiguous() and not ids.is_contiguous()
    assert torch.equal(gs.gather_tokens(x, ids, **TRITON), gs.gather_tokens_ref(x, ids))  # pure copy


def test_backward_is_deterministic(device):
    gen = torch.Generator().manual_seed(5)
    randn = functools.partial(_randn, dtype=torch.float32, gen=gen, device=device)
    B, L, K, D = 3, 16, 8, 72
    ids = _ids(B, L, K, gen, device)
    args = (randn(B, K, D), ids, randn(D), L, randn(L, D))
    dy = torch.randn(B, L, D, generator=gen).to(device)
    first, second = [torch.autograd.grad(gs.scatter_tokens(*args, **TRITON), [args[0], args[2], args[4]], dy)
                     for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_torch_backend_is_the_reference():
    gen = torch.Generator().manual_seed(6)
    x, ids, pos = torch.randn(2, 7, 16, generator=gen), _ids(2, 7, 3, gen, "cpu"), torch.randn(7, 16, generator=gen)
    assert torch.equal(gs.gather_tokens(x, ids, pos, backend="torch"), gs.gather_tokens_ref(x, ids, pos))


# ---------------------------------------------------------------------------------------------------
# Registration: opcheck, torch.compile, activation checkpointing
# ---------------------------------------------------------------------------------------------------

def _opcheck_samples(device):
    gen = torch.Generator().manual_seed(7)
    B, L, K, D = 2, 5, 3, 16
    ids = _ids(B, L, K, gen, device).contiguous()
    ids_p, cu = _packed([2, 3], L, gen, device)
    x, xk, xp = (torch.randn(*s, generator=gen).to(device).requires_grad_() for s in ((B, L, D), (B, K, D), (5, D)))
    pos, fill = torch.randn(L, D).to(device).requires_grad_(), torch.randn(D).to(device).requires_grad_()

    def r(*s):
        return torch.randn(*s).to(device)

    ops = torch.ops.maskdit_fast
    inv = ops.scatter_tokens.default(xk.detach(), ids, None, fill.detach(), L, None)[1]  # the map the backward reuses
    inv_p = ops.scatter_tokens.default(xp.detach(), ids_p, cu, fill.detach(), L, None)[1]
    return [
        (ops.gather_tokens.default, (x, ids, None, pos)),
        (ops.gather_tokens.default, (x, ids_p, cu, None)),
        (ops.scatter_tokens.default, (xk, ids, None, fill, L, pos)),
        (ops.scatter_tokens.default, (xp, ids_p, cu, fill, L, None)),
        (ops.gather_tokens_backward.default, (r(B, K, D), ids, None, L, torch.float32, True, torch.float32)),
        (ops.gather_tokens_backward.default, (r(5, D), ids_p, cu, L, torch.float16, False, torch.float32)),
        (ops.scatter_tokens_backward.default,
         (r(B, L, D), ids, inv, torch.float32, True, torch.float32, True, torch.float32)),
        (ops.scatter_tokens_backward.default,
         (r(B, L, D), ids_p, inv_p, torch.bfloat16, False, torch.float32, True, torch.float64)),
    ]


@pytest.mark.parametrize("sample", range(8))
def test_opcheck(sample, device):
    op, args = _opcheck_samples(device)[sample]
    torch.library.opcheck(op, args)


def test_torch_compile_fullgraph_matches_eager(device):
    gen = torch.Generator().manual_seed(8)
    B, L, K, D = 2, 7, 3, 16
    ids = _ids(B, L, K, gen, device)
    x, pos, fill = (torch.randn(*s, generator=gen).to(device).requires_grad_() for s in ((B, L, D), (L, D), (D,)))

    def f(x, pos, fill):
        h = gs.gather_tokens(x, ids, pos, **TRITON)
        return gs.scatter_tokens(h * 2, ids, fill, L, pos, **TRITON).square().sum()

    eager = torch.autograd.grad(f(x, pos, fill), [x, pos, fill])
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(x, pos, fill), [x, pos, fill])
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b)


def test_activation_checkpointing(device):
    gen = torch.Generator().manual_seed(9)
    B, L, K, D = 2, 7, 3, 16
    ids = _ids(B, L, K, gen, device)
    x = torch.randn(B, L, D, generator=gen).to(device).requires_grad_()
    pos = torch.randn(L, D).to(device).requires_grad_()

    def f(x, pos):
        return gs.gather_tokens(x, ids, pos, **TRITON).sin()

    # bitwise on any device: the recomputation runs the same deterministic kernels on the same inputs
    plain = torch.autograd.grad(f(x, pos).sum(), [x, pos])
    ckpt = torch.utils.checkpoint.checkpoint(f, x, pos, use_reentrant=False)
    for a, b in zip(torch.autograd.grad(ckpt.sum(), [x, pos]), plain):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------
# Bad input (on the test device: a CPU tensor on a GPU machine would fail the device check first)
# ---------------------------------------------------------------------------------------------------

def _good(device):
    return torch.randn(2, 5, 8).to(device), torch.tensor([[0, 3], [4, 1]], device=device), torch.randn(5, 8).to(device)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case,error,match", [
    (lambda x, ids, pos: (x.long(), ids, pos), TypeError, "floating-point"),
    (lambda x, ids, pos: (x, ids.int(), pos), TypeError, "int64"),
    (lambda x, ids, pos: (x[0], ids, pos), ValueError, "dims"),
    (lambda x, ids, pos: (x, ids[0], pos), ValueError, r"\[B, K\]"),
    (lambda x, ids, pos: (x, ids[:1], pos), ValueError, "does not fit"),
    (lambda x, ids, pos: (x, ids.new_zeros(2, 6), pos), ValueError, "does not fit"),
    (lambda x, ids, pos: (x, ids, pos[:4]), ValueError, "pos_embed must have shape"),
    (lambda x, ids, pos: (x, ids.to("meta"), pos), ValueError, "is on meta"),
    (lambda x, ids, pos: (x, ids, pos.to("meta")), ValueError, "is on meta"),
    (lambda x, ids, pos: (x, ids + 2, pos), ValueError, "out of range"),
    (lambda x, ids, pos: (x, -ids, pos), ValueError, "out of range"),
    (lambda x, ids, pos: (x, ids.new_tensor([[0, 3], [1, 1]]), pos), ValueError, "duplicate"),
])
def test_gather_bad_input(case, error, match, backend, device):
    with pytest.raises(error, match=match):
        gs.gather_tokens(*case(*_good(device)), backend=backend)


@pytest.mark.parametrize("case,error,match", [
    (lambda xk, ids, m, L: (xk, ids, m, 1), ValueError, "length"),
    (lambda xk, ids, m, L: (xk, ids, m, 5.0), ValueError, "length"),
    (lambda xk, ids, m, L: (xk, ids, m[:-1], L), ValueError, "mask_token must have"),
    (lambda xk, ids, m, L: (xk, ids, m.long(), L), TypeError, "mask_token"),
    (lambda xk, ids, m, L: (xk[:, :1], ids, m, L), ValueError, "disagree"),
    (lambda xk, ids, m, L: (xk, ids.new_tensor([[0, 3], [2, 2]]), m, L), ValueError, "duplicate"),
    (lambda xk, ids, m, L: (xk, ids, m, 4), ValueError, "out of range"),
])
def test_scatter_bad_input(case, error, match, device):
    args = (torch.randn(2, 2, 8).to(device), torch.tensor([[0, 3], [4, 1]], device=device),
            torch.randn(8).to(device), 5)
    with pytest.raises(error, match=match):
        gs.scatter_tokens(*case(*args), **TRITON)


@pytest.mark.parametrize("cu,match", [
    (torch.tensor([1, 2, 4], dtype=torch.int32), "cu_seqlens must start at 0"),
    (torch.tensor([0, 3, 2], dtype=torch.int32), "cu_seqlens must start at 0"),
    (torch.tensor([0, 1, 3], dtype=torch.int32), "cu_seqlens must start at 0"),
    (torch.tensor([0, 4], dtype=torch.int32), "B\\+1"),
    (torch.tensor([0, 2, 4], dtype=torch.float32), "int32"),
])
def test_varlen_bad_cu_seqlens(cu, match, device):
    x, ids = torch.randn(2, 5, 8).to(device), torch.tensor([0, 3, 4, 1], device=device)
    with pytest.raises((ValueError, TypeError), match=match):
        gs.gather_tokens_varlen(x, ids, cu.to(device), **TRITON)


def test_varlen_duplicates_are_per_sample(device):
    x, cu = torch.randn(2, 5, 8).to(device), torch.tensor([0, 2, 4], dtype=torch.int32, device=device)
    ids = functools.partial(torch.tensor, device=device)
    gs.gather_tokens_varlen(x, ids([0, 3, 0, 3]), cu, **TRITON)  # same ids, different samples
    with pytest.raises(ValueError, match="duplicate"):
        gs.gather_tokens_varlen(x, ids([3, 3, 0, 1]), cu, **TRITON)
    with pytest.raises(ValueError, match="disagree"):
        gs.scatter_tokens_varlen(torch.randn(3, 8).to(device), ids([0, 3, 4, 1]), cu, torch.randn(8).to(device), 5,
                                 **TRITON)


def test_validation_can_be_switched_off(monkeypatch, device):
    x, pos = torch.randn(2, 5, 8).to(device), torch.randn(5, 8).to(device)
    dup = torch.tensor([[0, 3], [1, 1]], device=device)
    gs.gather_tokens(x, dup, pos, validate=False, **TRITON)
    monkeypatch.setenv(gs.VALIDATE_ENV_VAR, "0")
    gs.gather_tokens(x, dup, pos, **TRITON)
    with pytest.raises(ValueError, match="duplicate"):
        gs.gather_tokens(x, dup, pos, validate=True, **TRITON)
    with pytest.raises(ValueError, match="dims"):  # shape checks stay on
        gs.gather_tokens(x[0], dup, pos, **TRITON)


def test_launchers_reject_non_contiguous(device):
    from maskdit_fast.kernels import gather_scatter as kgs
    ids = torch.tensor([[0, 3], [4, 1]], device=device)
    with pytest.raises(ValueError, match="x_kept must be contiguous"):
        kgs.scatter_fwd(torch.randn(2, 8, 2).to(device).transpose(1, 2), ids, None, torch.randn(8).to(device), 5)
    with pytest.raises(ValueError, match="ids must be contiguous"):
        kgs.gather_fwd(torch.randn(2, 5, 8).to(device), torch.tensor([[0, 3, 1], [4, 1, 2]], device=device)[:, :2],
                       None)


def test_cuda_backend_without_a_varlen_kernel_runs_the_reference():
    """The CUDA extension has no varlen gather/scatter: backend="cuda" (e.g. --ops-backend cuda with
    per-sample mask ratios) runs the torch reference instead of failing."""
    gen = torch.Generator().manual_seed(11)
    ids, cu = _packed([2, 0, 3], 6, gen, "cpu")
    x, pos = torch.randn(3, 6, 8, generator=gen), torch.randn(6, 8, generator=gen)
    assert torch.equal(gs.gather_tokens_varlen(x, ids, cu, pos, backend="cuda"),
                       gs.gather_tokens_varlen_ref(x, ids, cu, pos))
    src, fill = torch.randn(5, 8, generator=gen), torch.randn(8, generator=gen)
    assert torch.equal(gs.scatter_tokens_varlen(src, ids, cu, fill, 6, pos, backend="cuda"),
                       gs.scatter_tokens_varlen_ref(src, ids, cu, fill, 6, pos))
