"""Triton layernorm_modulate and gated_residual against the float64 references; registration
(opcheck, torch.compile); bad input. On CPU the kernels run under the Triton interpreter
(tests/conftest.py): every width and dtype at short sequences, the long sequences at width 72. Tests take
the `device` fixture (tests/conftest.py): with a GPU the same grids check the compiled kernels on CUDA.
Values are drawn with CPU generators and then moved, so the CPU runs draw exactly what they drew before."""
import functools

import pytest
import torch

from maskdit_fast.ops import modulate as md
from maskdit_fast.accuracy import check_op
from conftest import (CHUNKED_ROWS, assert_checks, assert_deterministic_backward, chunked_rows, grad_generator,
                      layernorm_modulate_backward_ref, row_statistics_ref)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SMALL = [(3, 7, 72), (1, 7, 384), (3, 7, 1000), (1, 7, 1152), (3, 1, 72), (1, 1, 1000)]
CASES = ([(shape, dtype) for shape in SMALL for dtype in DTYPES]
         + [((1, 128, 72), torch.float16), ((1, 256, 72), torch.bfloat16), ((3, 256, 72), torch.float32)])
TRITON = dict(backend="triton")
LN = functools.partial(md.layernorm_modulate, **TRITON)
GATE = functools.partial(md.gated_residual, **TRITON)


def _randn(*shape, dtype, gen, device, scale=1.0, grad=True):
    """A leaf on device: drawn with the CPU generator gen (times scale), then moved and cast."""
    return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype).requires_grad_(grad)


@pytest.mark.parametrize("per_token", [False, True], ids=["per_sample", "per_token"])
@pytest.mark.parametrize("shape,dtype", CASES, ids=str)
def test_match_reference(shape, dtype, per_token, device):
    B, L, D = shape
    gen = torch.Generator().manual_seed(hash((shape, per_token)) % 2**31)
    dgen = grad_generator(gen, device)
    randn = functools.partial(_randn, dtype=dtype, gen=gen, device=device)
    cond = (B, L, D) if per_token else (B, D)
    # a non-zero mean and unequal scales exercise the fp32 statistics
    x = (_randn(B, L, D, dtype=torch.float32, gen=gen, device=device, grad=False) * 3 + 1).to(dtype).requires_grad_()
    assert_checks(check_op("layernorm_modulate", LN, md.layernorm_modulate_ref,
                            (x, randn(*cond), randn(*cond, scale=0.5)), dgen))
    assert_checks(check_op("gated_residual", GATE, md.gated_residual_ref, (x, randn(B, L, D), randn(*cond)), dgen))


@pytest.mark.parametrize("per_token", [False, True], ids=["per_sample", "per_token"])
@pytest.mark.parametrize("shape", [(3, 7, 1000), (2, 5, 100), (1, 1, 72), (1, 1, 1000)], ids=str)
def test_backward_reads_the_saved_statistics(shape, per_token, device):
    """The forward saves x's row statistics (into NaN-poisoned buffers), and the backward computes from the
    statistics it is given: perturbed ones give the float64 backward of the perturbed ones."""
    from maskdit_fast.kernels import _common
    B, L, D = shape
    gen = torch.Generator().manual_seed(10)
    randn = functools.partial(_randn, dtype=torch.float32, gen=gen, device=device, grad=False)
    cond = (B, L, D) if per_token else (B, D)
    x, shift, scale, dy = randn(B, L, D, scale=3) + 1, randn(*cond), randn(*cond, scale=0.5), randn(B, L, D)
    ops = torch.ops.maskdit_fast
    with _common.poisoned():
        _, mean, rstd = ops.layernorm_modulate(x, shift, scale, 1e-6)
    want_mean, want_rstd = row_statistics_ref(x, 1e-6)
    torch.testing.assert_close(mean, want_mean.float())
    torch.testing.assert_close(rstd, want_rstd.float())
    mean, rstd = mean + randn(B, L, scale=0.3), rstd * (torch.rand(B, L, generator=gen).to(device) + 0.5)
    with _common.poisoned():
        got = ops.layernorm_modulate_backward(dy, x, scale, mean, rstd, shift.dtype)
    want = layernorm_modulate_backward_ref(dy, x, scale, mean, rstd)
    unperturbed = layernorm_modulate_backward_ref(dy, x, scale, want_mean, want_rstd)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w.float(), rtol=1e-4, atol=1e-4)
    for i in (0, 2):  # dx and dscale depend on the statistics
        assert (want[i] - unperturbed[i]).abs().max() > 1e-2


def test_cond_with_singleton_token_dim_and_eps(device):
    gen = torch.Generator().manual_seed(1)
    dgen = grad_generator(gen, device)
    randn = functools.partial(_randn, dtype=torch.float32, gen=gen, device=device)
    B, L, D = 3, 7, 72
    x = randn(B, L, D, scale=1e-3)  # eps matters at this scale
    assert_checks(check_op("layernorm_modulate", functools.partial(LN, eps=1e-5),
                            functools.partial(md.layernorm_modulate_ref, eps=1e-5),
                            (x, randn(B, 1, D), randn(B, 1, D)), dgen))
    assert_checks(check_op("gated_residual", GATE, md.gated_residual_ref, (x, randn(B, L, D), randn(B, 1, D)), dgen))


def test_mixed_dtypes_promote_like_reference(device):
    """fp32 residual stream with bf16 branch output and conditioning (the model under autocast)."""
    gen = torch.Generator().manual_seed(2)
    dgen = grad_generator(gen, device)
    B, L, D = 3, 7, 72
    x = _randn(B, L, D, dtype=torch.float32, gen=gen, device=device)
    bf = functools.partial(_randn, dtype=torch.bfloat16, gen=gen, device=device)
    assert_checks(check_op("layernorm_modulate", LN, md.layernorm_modulate_ref, (x, bf(B, D), bf(B, D)), dgen))
    assert_checks(check_op("gated_residual", GATE, md.gated_residual_ref, (x, bf(B, L, D), bf(B, D)), dgen))
    # shift and scale of different dtypes: each grad comes back in (and is computed for) its own dtype
    f32 = functools.partial(_randn, dtype=torch.float32, gen=gen, device=device)
    for shift, scale in ((f32(B, D), bf(B, D)), (bf(B, D), f32(B, D)), (f32(B, L, D), bf(B, L, D))):
        assert_checks(check_op("layernorm_modulate", LN, md.layernorm_modulate_ref, (x, shift, scale), dgen))


def test_packed_layout_matches_per_sample_conditioning(device):
    """The documented packed call: x [1, T, D] with per-token conditioning gathered by sample index."""
    from maskdit_fast.indexing import sample_index
    gen = torch.Generator().manual_seed(3)
    D = 72
    bounds = [0, 2, 2, 7]
    cu = torch.tensor(bounds, dtype=torch.int32, device=device)
    x, shift, scale = (torch.randn(*s, generator=gen).to(device) for s in ((7, D), (3, D), (3, D)))
    seg = sample_index(torch.zeros(7, dtype=torch.int64, device=device), cu)
    packed = md.layernorm_modulate(x[None], shift[seg][None], scale[seg][None], **TRITON)[0]
    for b in range(3):
        rows = slice(bounds[b], bounds[b + 1])
        want = md.layernorm_modulate_ref(x[None, rows], shift[b:b + 1], scale[b:b + 1])[0]
        torch.testing.assert_close(packed[rows], want)


@pytest.mark.parametrize("shape", [(0, 7, 72), (3, 0, 72), (2, 3, 0)], ids=str)
@pytest.mark.parametrize("per_token", [False, True], ids=["per_sample", "per_token"])
def test_empty(shape, per_token, device):
    gen = torch.Generator().manual_seed(4)
    dgen = grad_generator(gen, device)
    randn = functools.partial(_randn, dtype=torch.float32, gen=gen, device=device)
    B, L, D = shape
    cond = (B, L, D) if per_token else (B, D)
    args = [randn(B, L, D)] + [randn(*cond)] * 2
    assert_checks(check_op("layernorm_modulate", LN, md.layernorm_modulate_ref, tuple(args), dgen))
    args[1] = randn(B, L, D)
    assert_checks(check_op("gated_residual", GATE, md.gated_residual_ref, tuple(args), dgen))


def test_non_contiguous_inputs(device):
    """adaLN chunks are strided [B, D] views; x may be a transposed view."""
    gen = torch.Generator().manual_seed(5)
    B, L, D = 2, 5, 72
    x = torch.randn(B, D, L, generator=gen).to(device).transpose(1, 2)  # moved first: .to would compact
    mod = torch.randn(B, 3 * D, generator=gen).to(device)
    shift, scale, gate = mod.chunk(3, dim=1)
    assert not x.is_contiguous() and not shift.is_contiguous()
    torch.testing.assert_close(md.layernorm_modulate(x, shift, scale, **TRITON),
                               md.layernorm_modulate_ref(x, shift, scale))
    torch.testing.assert_close(md.gated_residual(x, x * 2, gate, **TRITON), md.gated_residual_ref(x, x * 2, gate))


def test_backward_is_deterministic(device):
    gen = torch.Generator().manual_seed(6)
    B, L, D = 2, 64, 72
    x, shift, scale = (torch.randn(*s, generator=gen).to(device).requires_grad_() for s in ((B, L, D), (B, D), (B, D)))
    dy = torch.randn(B, L, D, generator=gen).to(device)
    first, second = [torch.autograd.grad(md.layernorm_modulate(x, shift, scale, **TRITON), [x, shift, scale], dy)
                     for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(first, second))


# ---------------------------------------------------------------------------------------------------
# Chunked rows: a configuration whose BLOCK_D is narrower than the row walks it in chunks
# ---------------------------------------------------------------------------------------------------

LN_FAMILIES = ("ln_modulate_fwd", "ln_modulate_bwd")


def _chunked(block_d, block_r):
    return chunked_rows(LN_FAMILIES, block_d, block_r)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("per_token", [False, True], ids=["per_sample", "per_token"])
@pytest.mark.parametrize("shape,block_d,block_r", CHUNKED_ROWS, ids=str)
def test_chunked_rows_match_reference(shape, block_d, block_r, per_token, dtype, device):
    """Forward and every grad against the float64 reference, outputs NaN-poisoned (check_op)."""
    B, L, D = shape
    gen = torch.Generator().manual_seed(hash((shape, block_d, per_token)) % 2**31)
    randn = functools.partial(_randn, dtype=dtype, gen=gen, device=device)
    cond = (B, L, D) if per_token else (B, D)
    x = (_randn(B, L, D, dtype=torch.float32, gen=gen, device=device, grad=False) * 3 + 1).to(dtype).requires_grad_()
    with _chunked(block_d, block_r):
        assert_checks(check_op("layernorm_modulate", LN, md.layernorm_modulate_ref,
                                (x, randn(*cond), randn(*cond, scale=0.5)), grad_generator(gen, device)))


@pytest.mark.parametrize("per_token", [False, True], ids=["per_sample", "per_token"])
def test_chunked_rows_float64(per_token, device):
    """fp64 inputs run in fp64: outputs and grads within fp64 rounding of the reference."""
    gen = torch.Generator().manual_seed(11)
    B, L, D = 2, 9, 100
    cond = (B, L, D) if per_token else (B, D)
    args = [_randn(*s, dtype=torch.float64, gen=gen, device=device) for s in ((B, L, D), cond, cond)]
    dy = torch.randn(B, L, D, generator=gen, dtype=torch.float64).to(device)
    with _chunked(32, 2):
        out = LN(*args)
        got = (out,) + torch.autograd.grad(out, args, dy)
    want = md.layernorm_modulate_ref(*args)
    for g, w in zip(got, (want,) + torch.autograd.grad(want, args, dy)):
        assert g.dtype == torch.float64
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_chunked_statistics_stay_accurate_when_the_mean_dominates(device):
    """|mean| = 1e4 over std 1 in fp32: a one-pass sum of squares would lose every digit of the variance to
    cancellation; the chunk-merged statistics match float64 ones of the same values."""
    from maskdit_fast.kernels import _common
    gen = torch.Generator().manual_seed(12)
    B, L, D = 2, 3, 200
    x = (torch.randn(B, L, D, generator=gen) + 1e4).to(device)
    cond = torch.randn(B, D, generator=gen).to(device)
    with _chunked(64, 2), _common.poisoned():
        _, mean, rstd = torch.ops.maskdit_fast.layernorm_modulate(x, cond, cond, 1e-6)
    want_mean, want_rstd = row_statistics_ref(x, 1e-6)
    torch.testing.assert_close(mean, want_mean.float(), rtol=1e-6, atol=0)
    torch.testing.assert_close(rstd, want_rstd.float(), rtol=1e-4, atol=0)


@pytest.mark.parametrize("shape", [(0, 7, 72), (3, 0, 72)], ids=str)
@pytest.mark.parametrize("per_token", [False, True], ids=["per_sample", "per_token"])
def test_chunked_rows_empty(shape, per_token, device):
    gen = torch.Generator().manual_seed(13)
    B, L, D = shape
    cond = (B, L, D) if per_token else (B, D)
    randn = functools.partial(_randn, dtype=torch.float32, gen=gen, device=device)
    with _chunked(16, 2):
        assert_checks(check_op("layernorm_modulate", LN, md.layernorm_modulate_ref,
                                (randn(B, L, D), randn(*cond), randn(*cond)), grad_generator(gen, device)))


def test_chunked_backward_is_deterministic(device):
    """Per-sample grads summed over 20 programs of 2 token tiles each: the same bits every run."""
    gen = torch.Generator().manual_seed(14)
    B, L, D = 2, 40, 72
    args = [_randn(*s, dtype=torch.float32, gen=gen, device=device) for s in ((B, L, D), (B, D), (B, D))]
    with _chunked(32, 1):
        assert_deterministic_backward(LN, args, grad_generator(gen, device))


def test_block_d_selects_chunked_or_whole_rows():
    """A configuration's BLOCK_D narrower than the row chunks it (past the whole-row cap too); one as wide or no
    BLOCK_D keeps whole rows, D rounded up to a power of two; the default has none."""
    from maskdit_fast.kernels import modulate as kmd
    assert kmd.ln_block(1152, 128, "op") == 128
    assert kmd.ln_block(100, 16, "op") == 16
    assert kmd.ln_block(1152, None, "op") == kmd.ln_block(1152, 2048, "op") == 2048
    assert kmd.ln_block(72, 128, "op") == 128
    assert kmd.ln_block(kmd.LN_BLOCK_CAP + 8, 256, "op") == 256
    with pytest.raises(ValueError, match="over the 65536 columns"):
        kmd.ln_block(kmd.LN_BLOCK_CAP + 8, None, "op")
    assert all("BLOCK_D" not in kmd._default(f, 1152) for f in LN_FAMILIES)


def test_torch_backend_is_the_reference():
    gen = torch.Generator().manual_seed(7)
    x, shift, scale = torch.randn(2, 5, 16, generator=gen), torch.randn(2, 16, generator=gen), torch.randn(2, 16)
    assert torch.equal(md.layernorm_modulate(x, shift, scale, backend="torch"), md.layernorm_modulate_ref(x, shift, scale))
    assert torch.equal(md.gated_residual(x, x, scale, backend="torch"), md.gated_residual_ref(x, x, scale))


# ---------------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------------

def _opcheck_samples(device):
    gen = torch.Generator().manual_seed(8)
    B, L, D = 2, 5, 16

    def r(*s, grad=False, dtype=torch.float32):
        return torch.randn(*s, generator=gen).to(device=device, dtype=dtype).requires_grad_(grad)

    ops = torch.ops.maskdit_fast
    return [
        (ops.layernorm_modulate.default, (r(B, L, D, grad=True), r(B, D, grad=True), r(B, D, grad=True), 1e-6)),
        (ops.layernorm_modulate.default, (r(B, L, D, grad=True), r(B, L, D, grad=True), r(B, L, D, grad=True), 1e-5)),
        (ops.layernorm_modulate_backward.default, (r(B, L, D), r(B, L, D), r(B, D, dtype=torch.bfloat16), r(B, L),
                                                   r(B, L).abs() + 0.5, torch.float32)),
        (ops.gated_residual.default, (r(B, L, D, grad=True), r(B, L, D, grad=True), r(B, D, grad=True))),
        (ops.gated_residual.default, (r(B, L, D, grad=True), r(B, L, D, dtype=torch.bfloat16, grad=True),
                                      r(B, L, D, grad=True))),
        (ops.gated_residual_backward.default, (r(B, L, D), r(B, L, D), r(B, D))),
    ]


@pytest.mark.parametrize("sample", range(6))
def test_opcheck(sample, device):
    op, args = _opcheck_samples(device)[sample]
    torch.library.opcheck(op, args)


def test_torch_compile_fullgraph_matches_eager(device):
    gen = torch.Generator().manual_seed(9)
    B, L, D = 2, 5, 16
    x, mod, w = (torch.randn(*s, generator=gen).to(device).requires_grad_() for s in ((B, L, D), (B, 3 * D), (D, D)))

    def block(x, mod):
        shift, scale, gate = mod.chunk(3, dim=1)
        return md.gated_residual(x, md.layernorm_modulate(x, shift, scale, **TRITON) @ w, gate, **TRITON).sum()

    eager = torch.autograd.grad(block(x, mod), [x, mod, w])
    got = torch.autograd.grad(torch.compile(block, backend="aot_eager", fullgraph=True)(x, mod), [x, mod, w])
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------------
# Bad input (on the test device: a CPU tensor on a GPU machine would fail the device check first)
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case,error,match", [
    (lambda x, s, c: (x.long(), s, c), TypeError, "floating-point"),
    (lambda x, s, c: (x[0], s, c), ValueError, r"\[B, L, D\]"),
    (lambda x, s, c: (x, s.long(), c), TypeError, "shift"),
    (lambda x, s, c: (x, s[:, :4], c), ValueError, "shift must have shape"),
    (lambda x, s, c: (x, s[:1], c), ValueError, "shift must have shape"),
    (lambda x, s, c: (x, s, c.to("meta")), ValueError, "is on meta"),
    (lambda x, s, c: (x, s, c[:, None].expand(2, 5, 8)), ValueError, "same shape"),
])
def test_layernorm_modulate_bad_input(case, error, match, backend, device):
    args = (torch.randn(2, 5, 8).to(device), torch.randn(2, 8).to(device), torch.randn(2, 8).to(device))
    with pytest.raises(error, match=match):
        md.layernorm_modulate(*case(*args), backend=backend)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("eps", [-1.0, float("nan"), float("inf"), "1e-6", True])
def test_layernorm_modulate_bad_eps(eps, backend, device):
    """A negative eps gave NaN silently: every back-end refuses what is not a finite number >= 0."""
    args = (torch.randn(2, 5, 8).to(device), torch.randn(2, 8).to(device), torch.randn(2, 8).to(device))
    with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
        md.layernorm_modulate(*args, eps=eps, backend=backend)


@pytest.mark.parametrize("case,error,match", [
    (lambda x, y, g: (x, y[:, :4], g), ValueError, "must match"),
    (lambda x, y, g: (x, y.int(), g), TypeError, "y must be a floating-point"),
    (lambda x, y, g: (x, y, g[:, :3]), ValueError, "gate must have shape"),
    (lambda x, y, g: (x, y.to("meta"), g), ValueError, "must match"),
])
def test_gated_residual_bad_input(case, error, match, device):
    args = (torch.randn(2, 5, 8).to(device), torch.randn(2, 5, 8).to(device), torch.randn(2, 8).to(device))
    with pytest.raises(error, match=match):
        md.gated_residual(*case(*args), **TRITON)


def test_launchers_reject_non_contiguous(device):
    from maskdit_fast.kernels import modulate as kmd
    x = torch.randn(2, 8, 5).to(device).transpose(1, 2)
    with pytest.raises(ValueError, match="x must be contiguous"):
        kmd.layernorm_modulate_fwd(x, torch.randn(2, 8).to(device), torch.randn(2, 8).to(device), 1e-6)


def test_triton_layernorm_rejects_rows_wider_than_a_tile(device):
    x, cond = torch.randn(1, 1, 65544, device=device), torch.randn(1, 65544, device=device)
    with pytest.raises(ValueError, match="over the 65536 columns"):
        LN(x, cond, cond)
