"""residual_layernorm_modulate (gated residual + LayerNorm-modulate, both outputs) against its float64
reference: Triton on the `device` fixture (tests/conftest.py: interpreted on CPU, compiled on a GPU), the CUDA
extension on a GPU; registration (opcheck, torch.compile, meta/fake tensors, the csrc schemas); bad input.
Values are drawn with CPU generators and then moved, so CPU and GPU runs draw the same values."""
import functools

import pytest
import torch

from maskdit_fast import backend as mbackend
from maskdit_fast import ops
from maskdit_fast.ops import modulate as md
from maskdit_fast.ops import residual_modulate as rm
from maskdit_fast.accuracy import check_op
from conftest import (CHUNKED_ROWS, assert_checks, assert_deterministic_backward, assert_no_host_sync, chunked_rows,
                      grad_generator, layernorm_modulate_backward_ref, reduce_to, row_statistics_ref)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SMALL = [(3, 7, 72), (2, 5, 100), (1, 7, 384), (3, 7, 1000), (1, 7, 1152), (3, 1, 72), (1, 1, 1000)]
# long sequences split each sample's tokens over several programs: the in-kernel reduction across them
LONG = [((1, 128, 72), torch.float16), ((1, 256, 100), torch.bfloat16), ((3, 256, 72), torch.float32)]
CASES = [(shape, dtype) for shape in SMALL for dtype in DTYPES] + LONG
BACKENDS = ["triton", pytest.param("cuda", marks=pytest.mark.gpu)]
ARGS = ("x", "y", "gate", "shift", "scale")


def _randn(*shape, dtype, gen, device, scale=1.0, grad=True):
    """A leaf on device: drawn with the CPU generator gen (times scale), then moved and cast."""
    return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype).requires_grad_(grad)


def _stacked(fn, **kwargs):
    """fn's two outputs as one tensor [2, B, L, D] (promoted dtype), so that check_op sends a random grad into
    both and checks every input grad against the reference's; named like the reference for check_op's labels."""
    def stacked(x, y, gate, shift, scale):
        return torch.stack(fn(x, y, gate, shift, scale, **kwargs))
    return stacked


def _output(fn, index, **kwargs):
    def output(x, y, gate, shift, scale):
        return fn(x, y, gate, shift, scale, **kwargs)[index]
    return output


def _checks(name, backend, args, dgen, **kwargs):
    """Both outputs, each checked alone in the forward, and all five input grads with random grads flowing into
    both outputs; the op's allocations poisoned (check_op does it for Triton, torch's deterministic fill for the
    csrc/ kernels)."""
    op = functools.partial(rm.residual_layernorm_modulate, backend=backend, **kwargs)
    ref = functools.partial(rm.residual_layernorm_modulate_ref, **kwargs)
    fixed = tuple(a.detach() for a in args)  # no grads: forward only
    check = functools.partial(check_op, generator=dgen)
    if backend == "cuda":
        from test_ops_cuda_gpu import poisoned_allocations
        check = functools.partial(check, poison=poisoned_allocations)
    return (check(f"{name} x_new", _output(op, 0), _output(ref, 0), fixed)
            + check(f"{name} h", _output(op, 1), _output(ref, 1), fixed)
            + check(f"{name} (x_new, h)", _stacked(op), _stacked(ref), args))


def _inputs(B, L, D, dtype, gen, device, per_token):
    randn = functools.partial(_randn, dtype=dtype, gen=gen, device=device)
    cond = (B, L, D) if per_token else (B, D)
    # a non-zero mean and unequal scales exercise the fp32 statistics
    x = (_randn(B, L, D, dtype=torch.float32, gen=gen, device=device, grad=False) * 3 + 1).to(dtype).requires_grad_()
    return x, randn(B, L, D), randn(*cond), randn(*cond), randn(*cond, scale=0.5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_token", [False, True], ids=["per_sample", "per_token"])
@pytest.mark.parametrize("shape,dtype", CASES, ids=str)
def test_match_reference(shape, dtype, per_token, backend, device):
    gen = torch.Generator().manual_seed(hash((shape, per_token)) % 2**31)
    args = _inputs(*shape, dtype, gen, device, per_token)
    assert_checks(_checks("residual_layernorm_modulate", backend, args, grad_generator(gen, device)))


@pytest.mark.parametrize("per_token", [False, True], ids=["per_sample", "per_token"])
@pytest.mark.parametrize("shape", [(3, 7, 1000), (2, 5, 100), (1, 1, 72), (1, 1, 1000)], ids=str)
def test_backward_reads_the_saved_statistics(shape, per_token, device):
    """The Triton forward saves x_new's row statistics (into NaN-poisoned buffers), and the backward computes
    from the statistics it is given: perturbed ones give the float64 backward of the perturbed ones."""
    from maskdit_fast.kernels import _common
    B, L, D = shape
    gen = torch.Generator().manual_seed(15)
    randn = functools.partial(_randn, dtype=torch.float32, gen=gen, device=device, grad=False)
    cond = (B, L, D) if per_token else (B, D)
    x, y, gate, shift, scale = randn(B, L, D, scale=3) + 1, randn(B, L, D), randn(*cond), randn(*cond), randn(*cond)
    grad_x, grad_h = randn(B, L, D), randn(B, L, D)
    ops_ = torch.ops.maskdit_fast
    with _common.poisoned():
        x_new, _, mean, rstd = ops_.residual_layernorm_modulate(x, y, gate, shift, scale, 1e-6)
    want_mean, want_rstd = row_statistics_ref(x_new, 1e-6)
    torch.testing.assert_close(mean, want_mean.float())
    torch.testing.assert_close(rstd, want_rstd.float())
    mean, rstd = mean + randn(B, L, scale=0.3), rstd * (torch.rand(B, L, generator=gen).to(device) + 0.5)
    with _common.poisoned():
        got = ops_.residual_layernorm_modulate_backward(grad_x, grad_h, x_new, y, gate, scale, mean, rstd,
                                                        shift.dtype)

    def backward_ref(mean, rstd):
        dx_ln, dshift, dscale = layernorm_modulate_backward_ref(grad_h, x_new, scale, mean, rstd)
        g = grad_x.double() + dx_ln
        gate_ = gate.double() if per_token else gate.double()[:, None]
        return g, gate_ * g, reduce_to(g * y.double(), gate), dshift, dscale

    want = backward_ref(mean, rstd)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w.float(), rtol=1e-4, atol=1e-4)
    unperturbed = backward_ref(want_mean, want_rstd)
    for i in (0, 4):  # dx and dscale depend on the statistics
        assert (want[i] - unperturbed[i]).abs().max() > 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
def test_cond_with_singleton_token_dim_and_eps(backend, device):
    gen = torch.Generator().manual_seed(1)
    randn = functools.partial(_randn, dtype=torch.float32, gen=gen, device=device)
    B, L, D = 3, 7, 72
    args = (randn(B, L, D, scale=1e-3), randn(B, L, D, scale=1e-3), randn(B, 1, D), randn(B, 1, D), randn(B, 1, D))
    assert_checks(_checks("residual_layernorm_modulate eps=1e-5", backend, args, grad_generator(gen, device),
                          eps=1e-5))  # eps matters at this scale


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes_promote_like_reference(backend, device):
    """fp32 residual stream with bf16 branch output and conditioning (the model under autocast)."""
    gen = torch.Generator().manual_seed(2)
    B, L, D = 3, 7, 72
    bf = functools.partial(_randn, dtype=torch.bfloat16, gen=gen, device=device)
    args = (_randn(B, L, D, dtype=torch.float32, gen=gen, device=device), bf(B, L, D), bf(B, D), bf(B, D), bf(B, D))
    assert_checks(_checks("residual_layernorm_modulate mixed", backend, args, grad_generator(gen, device)))
    x_new, h = rm.residual_layernorm_modulate(*args, backend=backend)
    assert (x_new.dtype, h.dtype) == (torch.float32, torch.float32)
    # shift and scale of different dtypes: each grad comes back in (and is computed for) its own dtype
    f32 = functools.partial(_randn, dtype=torch.float32, gen=gen, device=device)
    for shift, scale in ((f32(B, D), bf(B, D)), (bf(B, D), f32(B, D)), (f32(B, L, D), bf(B, L, D))):
        gate = bf(*shift.shape)
        args = (f32(B, L, D), bf(B, L, D), gate, shift, scale)
        assert_checks(_checks("residual_layernorm_modulate shift/scale", backend, args, grad_generator(gen, device)))


def test_output_dtypes_follow_the_reference(device):
    """x_new promotes (x, y, gate) only; h also shift and scale."""
    gen = torch.Generator().manual_seed(3)
    B, L, D = 2, 3, 16
    r = functools.partial(_randn, gen=gen, device=device)
    args = (r(B, L, D, dtype=torch.bfloat16), r(B, L, D, dtype=torch.bfloat16), r(B, D, dtype=torch.bfloat16),
            r(B, D, dtype=torch.float32), r(B, D, dtype=torch.float32))
    got = rm.residual_layernorm_modulate(*args, backend="triton")
    want = rm.residual_layernorm_modulate_ref(*args)
    assert [t.dtype for t in got] == [t.dtype for t in want] == [torch.bfloat16, torch.float32]
    grads = torch.autograd.grad(got, args, [torch.ones_like(t) for t in got])
    assert [g.dtype for g in grads] == [a.dtype for a in args]


@pytest.mark.parametrize("shape", [(0, 7, 72), (3, 0, 72), (2, 3, 0)], ids=str)
@pytest.mark.parametrize("per_token", [False, True], ids=["per_sample", "per_token"])
def test_empty(shape, per_token, device):
    gen = torch.Generator().manual_seed(4)
    args = _inputs(*shape, torch.float32, gen, device, per_token)
    assert_checks(_checks("residual_layernorm_modulate", "triton", args, grad_generator(gen, device)))


def test_packed_layout_matches_per_sample_conditioning(device):
    """Packed tokens: x [1, T, D] with per-token conditioning gathered by sample index, as the separate ops."""
    from maskdit_fast.indexing import sample_index
    gen = torch.Generator().manual_seed(5)
    D, bounds = 72, [0, 2, 2, 7]
    cu = torch.tensor(bounds, dtype=torch.int32, device=device)
    x, y, gate, shift, scale = (torch.randn(*s, generator=gen).to(device) for s in ((7, D), (7, D), (3, D), (3, D),
                                                                                     (3, D)))
    seg = sample_index(torch.zeros(7, dtype=torch.int64, device=device), cu)
    packed = rm.residual_layernorm_modulate(x[None], y[None], gate[seg][None], shift[seg][None], scale[seg][None],
                                            backend="triton")
    for b in range(3):
        rows = slice(bounds[b], bounds[b + 1])
        want = rm.residual_layernorm_modulate_ref(x[None, rows], y[None, rows], gate[b:b + 1], shift[b:b + 1],
                                                  scale[b:b + 1])
        for got, w in zip(packed, want):
            torch.testing.assert_close(got[0, rows], w[0])


def test_non_contiguous_inputs(device):
    """adaLN chunks are strided [B, D] views; x may be a transposed view."""
    gen = torch.Generator().manual_seed(6)
    B, L, D = 2, 5, 72
    x = torch.randn(B, D, L, generator=gen).to(device).transpose(1, 2)  # moved first: .to would compact
    mod = torch.randn(B, 3 * D, generator=gen).to(device)
    gate, shift, scale = mod.chunk(3, dim=1)
    assert not x.is_contiguous() and not gate.is_contiguous()
    leaves = [t.detach().requires_grad_() for t in (x, x * 2, gate, shift, scale)]
    got = rm.residual_layernorm_modulate(*leaves, backend="triton")
    want = rm.residual_layernorm_modulate_ref(*leaves)
    grads = [torch.randn(t.shape, generator=gen).to(device) for t in want]
    for a, b in zip(got + torch.autograd.grad(got, leaves, grads), want + torch.autograd.grad(want, leaves, grads)):
        torch.testing.assert_close(a, b)


def test_backward_is_deterministic(device):
    gen = torch.Generator().manual_seed(7)
    args = _inputs(2, 64, 72, torch.float32, gen, device, per_token=False)
    grads = [torch.randn(2, 64, 72, generator=gen).to(device) for _ in range(2)]
    first, second = [torch.autograd.grad(rm.residual_layernorm_modulate(*args, backend="triton"), args, grads)
                     for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(first, second))


# ---------------------------------------------------------------------------------------------------
# Chunked rows: a configuration whose BLOCK_D is narrower than the row walks it in chunks
# ---------------------------------------------------------------------------------------------------

FAMILIES = ("residual_ln_modulate_fwd", "residual_ln_modulate_bwd")


def _chunked(block_d, block_r):
    return chunked_rows(FAMILIES, block_d, block_r)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("per_token", [False, True], ids=["per_sample", "per_token"])
@pytest.mark.parametrize("shape,block_d,block_r", CHUNKED_ROWS, ids=str)
def test_chunked_rows_match_reference(shape, block_d, block_r, per_token, dtype, device):
    """Both outputs and all five grads against the float64 reference, outputs NaN-poisoned (check_op)."""
    gen = torch.Generator().manual_seed(hash((shape, block_d, per_token)) % 2**31)
    args = _inputs(*shape, dtype, gen, device, per_token)
    with _chunked(block_d, block_r):
        assert_checks(_checks("residual_layernorm_modulate chunked", "triton", args, grad_generator(gen, device)))


@pytest.mark.parametrize("per_token", [False, True], ids=["per_sample", "per_token"])
def test_chunked_rows_float64(per_token, device):
    """fp64 inputs run in fp64: outputs and grads within fp64 rounding of the reference."""
    gen = torch.Generator().manual_seed(16)
    args = _inputs(2, 9, 100, torch.float64, gen, device, per_token)
    grads = [torch.randn(2, 9, 100, generator=gen, dtype=torch.float64).to(device) for _ in range(2)]
    with _chunked(32, 2):
        out = rm.residual_layernorm_modulate(*args, backend="triton")
        got = out + torch.autograd.grad(out, args, grads)
    want = rm.residual_layernorm_modulate_ref(*args)
    for g, w in zip(got, want + torch.autograd.grad(want, args, grads)):
        assert g.dtype == torch.float64
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_chunked_h_normalises_x_new_as_stored(device):
    """bf16 x_new, fp32 h: h is the fp32 LayerNorm-modulate of the rounded x_new the first pass stored (the
    unrounded sum would be a bf16 rounding, ~4e-3, away)."""
    gen = torch.Generator().manual_seed(17)
    B, L, D = 2, 3, 100
    bf = functools.partial(_randn, dtype=torch.bfloat16, gen=gen, device=device, grad=False)
    f32 = functools.partial(_randn, dtype=torch.float32, gen=gen, device=device, grad=False)
    x, y, gate, shift, scale = bf(B, L, D), bf(B, L, D), bf(B, D), f32(B, D), f32(B, D)
    with _chunked(32, 2):
        x_new, h = rm.residual_layernorm_modulate(x, y, gate, shift, scale, backend="triton")
    assert (x_new.dtype, h.dtype) == (torch.bfloat16, torch.float32)
    want = md.layernorm_modulate_ref(x_new.double(), shift.double(), scale.double())
    torch.testing.assert_close(h.double(), want, rtol=0, atol=1e-5)


def test_chunked_statistics_stay_accurate_when_the_mean_dominates(device):
    """x_new with |mean| = 1e4 over std 1 in fp32: the chunk-merged statistics match float64 ones of the stored
    x_new (a one-pass sum of squares would lose the variance to cancellation)."""
    from maskdit_fast.kernels import _common
    gen = torch.Generator().manual_seed(18)
    B, L, D = 2, 3, 200
    randn = functools.partial(_randn, dtype=torch.float32, gen=gen, device=device, grad=False)
    x, y, cond = randn(B, L, D) + 1e4, randn(B, L, D), randn(B, D)
    with _chunked(64, 2), _common.poisoned():
        x_new, _, mean, rstd = torch.ops.maskdit_fast.residual_layernorm_modulate(x, y, cond, cond, cond, 1e-6)
    want_mean, want_rstd = row_statistics_ref(x_new, 1e-6)
    torch.testing.assert_close(mean, want_mean.float(), rtol=1e-6, atol=0)
    torch.testing.assert_close(rstd, want_rstd.float(), rtol=1e-4, atol=0)


@pytest.mark.parametrize("shape", [(0, 7, 72), (3, 0, 72)], ids=str)
@pytest.mark.parametrize("per_token", [False, True], ids=["per_sample", "per_token"])
def test_chunked_rows_empty(shape, per_token, device):
    gen = torch.Generator().manual_seed(19)
    args = _inputs(*shape, torch.float32, gen, device, per_token)
    with _chunked(16, 2):
        assert_checks(_checks("residual_layernorm_modulate chunked", "triton", args, grad_generator(gen, device)))


def test_chunked_backward_is_deterministic(device):
    """Per-sample grads summed over 20 programs of 2 token tiles each: the same bits every run."""
    gen = torch.Generator().manual_seed(20)
    args = _inputs(2, 40, 72, torch.float32, gen, device, per_token=False)
    op = _stacked(functools.partial(rm.residual_layernorm_modulate, backend="triton"))
    with _chunked(32, 1):
        assert_deterministic_backward(op, args, grad_generator(gen, device))


def test_torch_backend_is_the_two_separate_references():
    gen = torch.Generator().manual_seed(8)
    x, y, gate, shift, scale = (torch.randn(*s, generator=gen) for s in ((2, 5, 16), (2, 5, 16), (2, 16), (2, 16),
                                                                         (2, 16)))
    x_new, h = ops.residual_layernorm_modulate(x, y, gate, shift, scale, backend="torch")
    assert torch.equal(x_new, md.gated_residual_ref(x, y, gate))
    assert torch.equal(h, md.layernorm_modulate_ref(md.gated_residual_ref(x, y, gate), shift, scale))


@pytest.mark.parametrize("per_token", [False, True], ids=["per_sample", "per_token"])
def test_meta_tensors_follow_the_reference(per_token):
    """The Triton op's fake implementations on meta tensors: shapes and dtypes of outputs and grads."""
    bf, f32 = torch.bfloat16, torch.float32
    cond = (2, 5, 8) if per_token else (2, 1, 8)

    def meta(*shape, dtype=bf):
        return torch.empty(*shape, device="meta", dtype=dtype).requires_grad_()
    args = (meta(2, 5, 8), meta(2, 5, 8, dtype=f32), meta(*cond), meta(*cond, dtype=f32), meta(*cond))
    got, want = rm.residual_layernorm_modulate(*args, backend="triton"), rm.residual_layernorm_modulate_ref(*args)
    assert [(t.shape, t.dtype) for t in got] == [(t.shape, t.dtype) for t in want]
    grads = torch.autograd.grad(got, args, [torch.empty_like(t) for t in got])
    assert [(g.shape, g.dtype) for g in grads] == [(a.shape, a.dtype) for a in args]


# ---------------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------------

def _opcheck_samples(device):
    gen = torch.Generator().manual_seed(9)
    B, L, D = 2, 5, 16

    def r(*s, grad=False, dtype=torch.float32):
        return torch.randn(*s, generator=gen).to(device=device, dtype=dtype).requires_grad_(grad)

    def stats():
        return r(B, L), r(B, L).abs() + 0.5

    ops_ = torch.ops.maskdit_fast
    return [
        (ops_.residual_layernorm_modulate.default,
         (r(B, L, D, grad=True), r(B, L, D, grad=True), r(B, D, grad=True), r(B, D, grad=True), r(B, D, grad=True),
          1e-6)),
        (ops_.residual_layernorm_modulate.default,
         (r(B, L, D, grad=True), r(B, L, D, dtype=torch.bfloat16, grad=True), r(B, L, D, grad=True),
          r(B, L, D, grad=True), r(B, L, D, grad=True), 1e-5)),
        (ops_.residual_layernorm_modulate_backward.default,
         (r(B, L, D), r(B, L, D), r(B, L, D), r(B, L, D, dtype=torch.bfloat16), r(B, D), r(B, D), *stats(),
          torch.float32)),
        (ops_.residual_layernorm_modulate_backward.default,
         (r(B, L, D), r(B, L, D), r(B, L, D), r(B, L, D), r(B, L, D), r(B, L, D, dtype=torch.bfloat16), *stats(),
          torch.float32)),
    ]


@pytest.mark.parametrize("sample", range(4))
def test_opcheck(sample, device):
    op, args = _opcheck_samples(device)[sample]
    torch.library.opcheck(op, args)


def test_torch_compile_fullgraph_matches_eager(device):
    gen = torch.Generator().manual_seed(10)
    B, L, D = 2, 5, 16
    x, mod, w = (torch.randn(*s, generator=gen).to(device).requires_grad_() for s in ((B, L, D), (B, 6 * D), (D, D)))

    def block(x, mod):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=1)
        h = md.layernorm_modulate(x, shift_msa, scale_msa, backend="triton")
        x, h = rm.residual_layernorm_modulate(x, h @ w, gate_msa, shift_mlp, scale_mlp, backend="triton")
        return md.gated_residual(x, h @ w, gate_mlp, backend="triton").sum()

    eager = torch.autograd.grad(block(x, mod), [x, mod, w])
    got = torch.autograd.grad(torch.compile(block, backend="aot_eager", fullgraph=True)(x, mod), [x, mod, w])
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------------
# Launch configurations: the contract with the tuning sweep (kernels/_config.py)
# ---------------------------------------------------------------------------------------------------

def _candidates():
    from maskdit_fast.kernels import residual_modulate as krm
    return [(family, config) for family, configs in krm.TUNING.items() for config in configs]


@pytest.mark.parametrize("family,config", _candidates(), ids=str)
def test_every_tuning_candidate_is_correct(family, config, device):
    """More tokens than any candidate's rows per tile, a width over 1024 columns."""
    from maskdit_fast.kernels import _config
    gen = torch.Generator().manual_seed(14)
    args = _inputs(2, 17, 1152, torch.bfloat16, gen, device, per_token=False)
    with _config.override(family, config):
        assert_checks(_checks(f"residual_layernorm_modulate {family} {config}", "triton", args,
                              grad_generator(gen, device)))


def test_launchers_look_up_their_family_and_shape_key(monkeypatch, device):
    from maskdit_fast.kernels import _config
    from maskdit_fast.kernels import residual_modulate as krm
    seen = []

    def spy(family, key, default, device=None):
        seen.append((family, key, device.type))
        return _config.tuned(family, key, default, device)
    monkeypatch.setattr(krm, "tuned", spy)
    args = _inputs(2, 3, 100, torch.float32, torch.Generator().manual_seed(15), device, per_token=False)
    torch.autograd.grad(rm.residual_layernorm_modulate(*args, backend="triton"), args,
                        [torch.ones(2, 3, 100, device=device)] * 2)
    assert seen == [("residual_ln_modulate_fwd", "D=100", torch.device(device).type),
                    ("residual_ln_modulate_bwd", "D=100", torch.device(device).type)]


# ---------------------------------------------------------------------------------------------------
# Bad input (on the test device: a CPU tensor on a GPU machine would fail the device check first)
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case,error,match", [
    (lambda x, y, g, s, c: (x.long(), y, g, s, c), TypeError, "x must be a floating-point"),
    (lambda x, y, g, s, c: (x[0], y, g, s, c), ValueError, r"\[B, L, D\]"),
    (lambda x, y, g, s, c: (x, y[:, :4], g, s, c), ValueError, "must match"),
    (lambda x, y, g, s, c: (x, y.int(), g, s, c), TypeError, "y must be a floating-point"),
    (lambda x, y, g, s, c: (x, y, g[:, :3], s, c), ValueError, "gate must have shape"),
    (lambda x, y, g, s, c: (x, y, g, s.long(), c), TypeError, "shift"),
    (lambda x, y, g, s, c: (x, y, g, s[:1], c), ValueError, "shift must have shape"),
    (lambda x, y, g, s, c: (x, y, g, s, c.to("meta")), ValueError, "is on meta"),
    (lambda x, y, g, s, c: (x, y, g, s, c[:, None].expand(2, 5, 8)), ValueError, "same shape"),
    (lambda x, y, g, s, c: (x, y, g[:, None], s, c), ValueError, "same shape"),
])
def test_bad_input(case, error, match, backend, device):
    args = (torch.randn(2, 5, 8).to(device), torch.randn(2, 5, 8).to(device), torch.randn(2, 8).to(device),
            torch.randn(2, 8).to(device), torch.randn(2, 8).to(device))
    with pytest.raises(error, match=match):
        rm.residual_layernorm_modulate(*case(*args), backend=backend)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("eps", [-1.0, float("nan"), "1e-6"])
def test_bad_eps(eps, backend, device):
    args = [torch.randn(2, 5, 8).to(device) for _ in range(2)] + [torch.randn(2, 8).to(device) for _ in range(3)]
    with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
        rm.residual_layernorm_modulate(*args, eps=eps, backend=backend)


def test_launchers_reject_non_contiguous(device):
    from maskdit_fast.kernels import residual_modulate as krm
    x = torch.randn(2, 8, 5).to(device).transpose(1, 2)
    cond = torch.randn(2, 8).to(device)
    with pytest.raises(ValueError, match="must be contiguous"):
        krm.residual_layernorm_modulate_fwd(x, x.contiguous(), cond, cond, cond, 1e-6)


def test_triton_rejects_rows_wider_than_a_tile(device):
    x, cond = torch.randn(1, 1, 65544, device=device), torch.randn(1, 65544, device=device)
    with pytest.raises(ValueError, match="over the 65536 columns"):
        rm.residual_layernorm_modulate(x, x, cond, cond, cond, backend="triton")


def test_cuda_backend_on_cpu_tensors_is_a_clear_error():
    x, cond = torch.randn(2, 5, 8), torch.randn(2, 8)
    with pytest.raises(RuntimeError, match="backend 'cuda'"):
        rm.residual_layernorm_modulate(x, x, cond, cond, cond, backend="cuda")


# ---------------------------------------------------------------------------------------------------
# The csrc/ op without a GPU: schemas, fakes and the wrapper on meta tensors (needs the built extension:
# .ci/compile_csrc.sh points MASKDIT_FAST_EXTENSION at it)
# ---------------------------------------------------------------------------------------------------

needs_extension = pytest.mark.skipif(
    not mbackend.extension_available(),
    reason=f"CUDA extension not loadable here ({mbackend.extension_unavailable_reason()}); "
           "build it or set MASKDIT_FAST_EXTENSION (.ci/compile_csrc.sh does)")

SCHEMAS = {
    "residual_layernorm_modulate": "(Tensor x, Tensor y, Tensor gate, Tensor shift, Tensor scale, float eps) "
                                   "-> (Tensor, Tensor, Tensor, Tensor)",
    "residual_layernorm_modulate_backward": "(Tensor grad_x, Tensor grad_h, Tensor x_new, Tensor y, Tensor gate, "
                                            "Tensor scale, Tensor mean, Tensor rstd, bool cond_grad) "
                                            "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
}


@needs_extension
def test_cuda_schemas_and_fake_home():
    for name, schema in SCHEMAS.items():
        qualified = f"maskdit_fast_C::{name}"
        assert str(getattr(torch.ops.maskdit_fast_C, name).default._schema) == qualified + schema
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qualified, "CUDA"), name
        assert torch._C._dispatch_pystub(qualified, "")[0] == rm.__name__, name
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qualified, "Meta"), name


@needs_extension
@pytest.mark.parametrize("cond,dtypes", [
    ((2, 8), (torch.bfloat16,) * 5),
    ((2, 1, 8), (torch.float32, torch.bfloat16, torch.bfloat16, torch.bfloat16, torch.bfloat16)),
    ((2, 5, 8), (torch.float16,) * 5),
    ((2, 8), (torch.bfloat16, torch.bfloat16, torch.bfloat16, torch.float32, torch.float32)),
], ids=["per_sample", "[B, 1, D] mixed", "per_token", "fp32 shift/scale"])
def test_cuda_wrapper_follows_the_reference_on_meta(cond, dtypes):
    shapes = [(2, 5, 8), (2, 5, 8), cond, cond, cond]
    args = [torch.empty(s, device="meta", dtype=d).requires_grad_() for s, d in zip(shapes, dtypes)]
    got, want = rm.residual_layernorm_modulate(*args, backend="cuda"), rm.residual_layernorm_modulate_ref(*args)
    assert [(t.shape, t.dtype) for t in got] == [(t.shape, t.dtype) for t in want]
    grads = torch.autograd.grad(got, args, [torch.empty_like(t) for t in got])
    assert [(g.shape, g.dtype) for g in grads] == [(a.shape, a.dtype) for a in args]


@needs_extension
def test_cuda_rejects_float64():
    args = [torch.empty(s, device="meta", dtype=torch.float64) for s in ((2, 5, 8), (2, 5, 8), (2, 8), (2, 8), (2, 8))]
    with pytest.raises(TypeError, match="float32, float16 and bfloat16"):
        rm.residual_layernorm_modulate(*args, backend="cuda")


# ---------------------------------------------------------------------------------------------------
# GPU: MaskDiT-XL/2 sizes, bf16, both compiled back-ends
# ---------------------------------------------------------------------------------------------------

XL = [(256, 128, 1152), (256, 256, 512)]  # encoder (128 of 256 tokens kept), decoder


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("per_token", [False, True], ids=["per_sample", "per_token"])
@pytest.mark.parametrize("shape", XL, ids=["encoder", "decoder"])
def test_gpu_xl_sizes(shape, per_token, backend):
    gen = torch.Generator().manual_seed(12)
    args = _inputs(*shape, torch.bfloat16, gen, "cuda", per_token)
    assert_checks(_checks(f"residual_layernorm_modulate {shape}", backend, args, grad_generator(gen, "cuda")))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_xl_backward_is_deterministic_and_never_waits(backend):
    gen = torch.Generator().manual_seed(13)
    args = _inputs(*XL[0], torch.bfloat16, gen, "cuda", per_token=False)
    op = _stacked(functools.partial(rm.residual_layernorm_modulate, backend=backend))
    dgen = grad_generator(gen, "cuda")
    assert_deterministic_backward(op, args, dgen)
    assert_no_host_sync(lambda: torch.autograd.grad(op(*args).float().square().sum(), args))
