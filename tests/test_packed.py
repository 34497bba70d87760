"""MaskDiT packed (varlen) mode: per-sample masking, packed == dense for equal keep counts (loss and
gradients, torch and Triton back-ends; bitwise, as equal counts run the dense layout), which attention
each layout runs, per-sample ratios == one-sample-at-a-time dense, mixed resolutions == each group
through the dense path of a model built for that size, the mask a request returns, errors."""
import pytest
import torch

from maskdit_fast import ops
from maskdit_fast.diffusion import EDMPrecond, MaskDiTLoss
from maskdit_fast.masking import (PackedMask, check_packed_mask, keep_counts, mask_from_ids_keep, mask_from_packed,
                                  pack_ids_keep, per_sample_ratios, random_masking_ids, random_masking_packed,
                                  sample_mask_ratios)
from maskdit_fast.models import DiT, MaskDiT, get_2d_sincos_pos_embed, varlen_layout

TINY = dict(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=2, num_classes=5)
TINY_DEC = dict(decoder_depth=1, decoder_hidden_size=32, decoder_num_heads=2)  # head dims 16: Triton-ready


def _model(seed=0, **overrides):
    """A tiny MaskDiT with random weights everywhere (fresh models output zeros: adaLN-Zero)."""
    model = MaskDiT(**{**TINY, **TINY_DEC, "backend": "torch", **overrides})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)  # 0.3 blows activations up to fp32 noise
    return model


def _batch(batch, size, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, TINY["in_channels"], size, size, generator=g)
    y = torch.randint(0, TINY["num_classes"] + 1, (batch,), generator=g)
    sigma = torch.exp(torch.randn(batch, generator=g) * 1.2 - 1.2)
    noise = torch.randn(x.shape, generator=g)
    return x, y, sigma, noise


def _loss_and_grads(precond, fn):
    precond.zero_grad()
    out = fn()
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in precond.net.named_parameters()}


def _assert_close_to_scale(a, b, rtol=1e-4, name=""):
    """max |a - b| <= rtol * max |b|: fp32 rounding of random-weight nets with large activations."""
    assert (a - b).abs().max().item() <= rtol * (b.abs().max().item() + 1e-12), name


def _assert_grads_close(grads, ref, rtol=1e-4):
    for name, g in ref.items():
        _assert_close_to_scale(grads[name], g, rtol, name)


# ----------------------------------------------------------------------------------------------
# Masking

def test_random_masking_packed_counts_mask_and_same_draw_as_dense():
    L, ratios = 20, [0.5, 0.0, 0.75, 0.3, 0.95]
    packed, mask = random_masking_packed(torch.tensor(ratios, dtype=torch.float64), L,
                                         generator=torch.Generator().manual_seed(0))
    counts = [int(L * (1 - r)) for r in ratios]
    assert packed.counts == tuple(counts) == keep_counts(L, ratios) and packed.max_seqlen == 20
    assert packed.ids.dtype == torch.int64 and packed.cu_seqlens.dtype == torch.int32
    assert packed.cu_seqlens.tolist() == [0, 10, 30, 35, 49, 50] and packed.batch_size == 5
    assert mask.shape == (5, L) and mask.dtype == torch.float32
    assert mask.sum(1).tolist() == [L - n for n in counts]
    for b, (start, end) in enumerate(zip(packed.cu_seqlens[:-1].tolist(), packed.cu_seqlens[1:].tolist())):
        kept = packed.ids[start:end].tolist()
        assert len(set(kept)) == counts[b] and all(mask[b, i] == 0 for i in kept)
    assert torch.equal(mask_from_packed(packed, L), mask)
    check_packed_mask(packed, 5, L)
    # Equal ratios: exactly random_masking_ids' positions, row after row (same noise draw).
    dense = random_masking_ids(4, L, 0.4, generator=torch.Generator().manual_seed(3))
    same, same_mask = random_masking_packed([0.4] * 4, L, generator=torch.Generator().manual_seed(3))
    assert torch.equal(same.ids, dense[0].reshape(-1)) and torch.equal(same_mask, dense[2])
    # pack_ids_keep: dense [B, K] and per-sample lists
    assert pack_ids_keep(dense[0]).counts == (12,) * 4 and torch.equal(pack_ids_keep(dense[0]).ids, same.ids)
    lists = pack_ids_keep([torch.tensor([3, 1]), torch.tensor([0, 2, 4])])
    assert lists.cu_seqlens.tolist() == [0, 2, 5] and lists.ids.tolist() == [3, 1, 0, 2, 4]
    assert mask_from_packed(lists, 5).tolist() == [[1, 0, 1, 0, 1], [0, 1, 0, 1, 0]]
    assert torch.equal(mask_from_packed(pack_ids_keep(dense[0]), L), mask_from_ids_keep(dense[0], L))


def test_sample_mask_ratios_and_keep_count_rounding():
    r = sample_mask_ratios(1000, 0.25, 0.75, generator=torch.Generator().manual_seed(0))
    assert r.shape == (1000,) and r.dtype == torch.float64 and r.device.type == "cpu"
    assert 0.25 <= r.min() and r.max() < 0.75 and abs(r.mean().item() - 0.5) < 0.02
    assert torch.equal(r, sample_mask_ratios(1000, 0.25, 0.75, generator=torch.Generator().manual_seed(0)))
    assert torch.equal(sample_mask_ratios(3, 0.5, 0.5), torch.full((3,), 0.5, dtype=torch.float64))
    # int(L * (1 - r)) in float64, as the dense num_kept
    assert keep_counts(256, [0.5, 0.3, 0.0]) == (128, int(256 * (1 - 0.3)), 256)
    assert keep_counts(10, 0.25, 3) == (7, 7, 7)
    assert per_sample_ratios(0.5, 2) == [0.5, 0.5]
    # ratios are used at their tensor's precision (float32 0.3 > 0.3)
    assert keep_counts(20, torch.tensor([0.3])) == (13,)
    assert keep_counts(20, torch.tensor([0.3], dtype=torch.float64)) == (14,)


# ----------------------------------------------------------------------------------------------
# Packed == dense for equal keep counts

def test_packed_loss_equals_dense_loss_for_equal_counts():
    precond = EDMPrecond(_model())
    x, y, sigma, noise = _batch(3, 8, seed=1)
    ids = random_masking_ids(3, 16, 0.5, generator=torch.Generator().manual_seed(2))[0]
    kw = dict(sigma=sigma, noise=noise)
    dense, dense_grads = _loss_and_grads(precond, lambda: MaskDiTLoss()(precond, x, y, ids_keep=ids, **kw))
    for ids_packed in (pack_ids_keep(ids), list(ids)):
        packed, grads = _loss_and_grads(precond, lambda: MaskDiTLoss()(precond, x, y, ids_keep=ids_packed, **kw))
        torch.testing.assert_close(packed.per_sample, dense.per_sample, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(packed.loss, dense.loss, rtol=1e-5, atol=1e-6)
        assert packed.mae.item() > 0
        _assert_grads_close(grads, dense_grads)
        # equal counts run the dense layout: the very same computation
        assert torch.equal(packed.per_sample, dense.per_sample)
        assert all(torch.equal(grads[n], g) for n, g in dense_grads.items())
    # Random masks from the global RNG: per-sample ratios draw the same masks as the dense ratio.
    runs = []
    for ratio in (0.5, [0.5] * 3, torch.full((3,), 0.5)):
        torch.manual_seed(5)
        runs.append(MaskDiTLoss()(precond, x, y, mask_ratio=ratio, **kw))
    for run in runs[1:]:
        torch.testing.assert_close(run.per_sample, runs[0].per_sample, rtol=1e-5, atol=1e-6)
    # Ratio 0 for every sample: packed keeps all tokens (mask of zeros) = the plain unmasked loss.
    torch.testing.assert_close(MaskDiTLoss()(precond, x, y, mask_ratio=[0.0] * 3, **kw).per_sample,
                               MaskDiTLoss()(precond, x, y, **kw).per_sample, rtol=1e-5, atol=1e-6)


def test_packed_triton_backend_matches_dense_torch(device):
    """Packed path through the Triton kernels (varlen gather/scatter, per-token modulation, varlen
    attention; interpreted on CPU, compiled on a GPU) against the dense torch reference: loss and gradients."""
    precond = EDMPrecond(_model()).to(device)
    x, y, sigma, noise = (a.to(device) for a in _batch(2, 8, seed=3))
    ids = random_masking_ids(2, 16, 0.5, generator=torch.Generator().manual_seed(4))[0].to(device)
    kw = dict(sigma=sigma, noise=noise)
    dense, dense_grads = _loss_and_grads(precond, lambda: MaskDiTLoss()(precond, x, y, ids_keep=ids, **kw))
    precond.net.backend = "triton"
    packed, grads = _loss_and_grads(precond, lambda: MaskDiTLoss()(precond, x, y, ids_keep=pack_ids_keep(ids), **kw))
    torch.testing.assert_close(packed.per_sample, dense.per_sample, rtol=1e-4, atol=1e-5)
    _assert_grads_close(grads, dense_grads, rtol=1e-3)


@pytest.fixture
def attention_calls(monkeypatch):
    """Names of the attention ops the model calls, in order."""
    calls = []
    for name in ("attention_qkvpacked", "varlen_attention_qkvpacked"):
        def spy(*args, _op=getattr(ops, name), _name=name, **kwargs):
            calls.append(_name)
            return _op(*args, **kwargs)
        monkeypatch.setattr(ops, name, spy)
    return calls


def test_equal_counts_run_dense_and_unequal_counts_varlen(attention_calls):
    """Dense is the packed stream's special case: whatever the request (a [B, K] tensor, a PackedMask,
    per-sample lists, per-sample ratios, groups of several resolutions), samples that all keep K tokens
    run the encoder as the dense batch [B, K, D] (dense attention, per-sample conditioning); only unequal
    counts run varlen attention. The decoder is dense on each group's grid either way."""
    model = _model(seed=3)
    depth, dec_depth = TINY["depth"], TINY_DEC["decoder_depth"]
    dense_only = ["attention_qkvpacked"] * (depth + dec_depth)
    x, y, t, _ = _batch(3, 8, seed=14)
    ids = random_masking_ids(3, 16, 0.5, generator=torch.Generator().manual_seed(15))[0]
    ref = model(x, t, y, ids_keep=ids)
    assert attention_calls == dense_only
    for ids_keep in (pack_ids_keep(ids), list(ids)):
        attention_calls.clear()
        out = model(x, t, y, ids_keep=ids_keep)
        assert attention_calls == dense_only
        assert torch.equal(out.sample, ref.sample) and torch.equal(out.mask, ref.mask)
    torch.manual_seed(16)
    plain = model(x, t, y, mask_ratio=0.5)
    for ratios in ([0.5] * 3, torch.full((3,), 0.5, dtype=torch.float64)):
        torch.manual_seed(16)  # per-sample ratios draw the plain ratio's masks
        attention_calls.clear()
        out = model(x, t, y, mask_ratio=ratios)
        assert attention_calls == dense_only
        assert torch.equal(out.sample, plain.sample) and torch.equal(out.mask, plain.mask)
    # 8 of 16 tokens and 8 of 64: one dense encoder batch across both resolutions
    xb, yb, tb, _ = _batch(2, 16, seed=17)
    ids_b = random_masking_ids(2, 64, 0.875, generator=torch.Generator().manual_seed(18))[0]
    attention_calls.clear()
    outs = model([x, xb], [t, tb], [y, yb], ids_keep=[ids, ids_b])
    assert attention_calls == ["attention_qkvpacked"] * depth + ["attention_qkvpacked"] * 2 * dec_depth
    _assert_close_to_scale(outs[0].sample, ref.sample)
    # unequal counts: varlen attention in the encoder, dense in the decoder
    for request in (dict(mask_ratio=[0.25, 0.5, 0.5]), dict(ids_keep=[ids[0], ids[1], ids[2, :5]])):
        attention_calls.clear()
        model(x, t, y, **request)
        assert attention_calls == ["varlen_attention_qkvpacked"] * depth + ["attention_qkvpacked"] * dec_depth


def test_varlen_layout():
    assert varlen_layout((5, 5, 5), "cpu") is None  # equal counts: the dense batch
    layout = varlen_layout((2, 1, 3), "cpu")
    assert layout.cu_seqlens.dtype == torch.int32 and layout.cu_seqlens.tolist() == [0, 2, 3, 6]
    assert layout.max_seqlen == 3 and layout.sample.tolist() == [0, 0, 1, 2, 2, 2]


def test_mask_follows_the_request():
    """A single keep count that keeps every token returns no mask (and leaves the mask token out of the
    graph); per-sample requests and groups always return their masks and scatter through the mask
    token, whatever the values drawn."""
    model = _model(seed=4)
    x, y, t, _ = _batch(2, 8, seed=19)
    out = model(x, t, y, mask_ratio=0.0)
    assert out.mask is None
    out.sample.sum().backward()
    assert model.mask_token.grad is None
    for request in (dict(mask_ratio=[0.0, 0.0]), dict(ids_keep=[torch.arange(16), torch.arange(16)])):
        model.zero_grad(set_to_none=True)
        out = model(x, t, y, **request)
        assert torch.equal(out.mask, torch.zeros(2, 16))
        out.sample.sum().backward()
        assert torch.equal(model.mask_token.grad, torch.zeros_like(model.mask_token))
    outs = model([x, x], [t, t], [y, y], mask_ratio=[0.0, 0.5])
    assert torch.equal(outs[0].mask, torch.zeros(2, 16)) and outs[1].mask.sum(1).tolist() == [8, 8]


# ----------------------------------------------------------------------------------------------
# Per-sample ratios

def test_per_sample_ratios_equal_one_sample_at_a_time_dense():
    precond = EDMPrecond(_model(seed=1))
    B, L = 4, 16
    x, y, sigma, noise = _batch(B, 8, seed=6)
    ratios = torch.tensor([0.0, 0.25, 0.5, 0.9])
    packed, mask = random_masking_packed(ratios, L, generator=torch.Generator().manual_seed(7))
    assert packed.counts == (16, 12, 8, 1)
    out, grads = _loss_and_grads(precond, lambda: MaskDiTLoss()(precond, x, y, mask_ratio=ratios, ids_keep=packed,
                                                                  sigma=sigma, noise=noise))
    ref_grads, refs = None, []
    for b, (start, end) in enumerate(zip(packed.cu_seqlens[:-1].tolist(), packed.cu_seqlens[1:].tolist())):
        one = slice(b, b + 1)
        ref, g = _loss_and_grads(precond, lambda: MaskDiTLoss()(precond, x[one], y[one],
                                                                ids_keep=packed.ids[start:end][None],
                                                                sigma=sigma[one], noise=noise[one]))
        refs.append(ref.per_sample)
        ref_grads = {n: v / B + (0 if ref_grads is None else ref_grads[n]) for n, v in g.items()}
    torch.testing.assert_close(out.per_sample, torch.cat(refs), rtol=1e-4, atol=1e-6)
    _assert_grads_close(grads, ref_grads)
    # The model's own random draw honours the per-sample counts.
    net_out = precond(x, sigma, y, mask_ratio=ratios)
    assert net_out.mask.sum(1).tolist() == [0, 4, 8, 15]


# ----------------------------------------------------------------------------------------------
# Mixed resolution

def test_mixed_resolution_equals_each_group_through_the_dense_path():
    model = _model(seed=2)
    big = MaskDiT(**{**TINY, **TINY_DEC, "backend": "torch", "input_size": 16})
    weights = {k: v for k, v in model.state_dict().items() if "pos_embed" not in k}
    big.load_state_dict(weights, strict=False)  # same weights, its own 8x8-grid pos-embeds
    small_pre, big_pre = EDMPrecond(model), EDMPrecond(big)
    (xs, ys, ss, ns), (xb, yb, sb, nb) = _batch(3, 8, seed=8), _batch(2, 16, seed=9)
    ids_s = random_masking_ids(3, 16, 0.5, generator=torch.Generator().manual_seed(10))[0]
    ids_b = random_masking_ids(2, 64, 0.75, generator=torch.Generator().manual_seed(11))[0]

    # grouped (list) forward outputs == dense outputs of the model built for each size
    outs = model([xs, xb], [ss, sb], [ys, yb], ids_keep=[ids_s, ids_b])
    for out, net, x, t, y, ids in ((outs[0], model, xs, ss, ys, ids_s), (outs[1], big, xb, sb, yb, ids_b)):
        ref = net(x, t, y, ids_keep=ids)
        _assert_close_to_scale(out.sample, ref.sample)
        assert torch.equal(out.mask, ref.mask)
    # pos-embeds for the other grid are the sin-cos ones of that grid (cached)
    enc, dec = model.pos_embeds((8, 8))
    assert torch.equal(enc, big.pos_embed[0]) and torch.equal(dec, big.decoder_pos_embed[0])
    assert model.pos_embeds((8, 8))[0] is enc  # cached
    assert model.pos_embeds((4, 4))[0].data_ptr() == model.pos_embed.data_ptr()  # own grid: the buffer
    assert torch.equal(model.double().pos_embeds((4, 8))[0], get_2d_sincos_pos_embed(32, (4, 8)).double())
    model.float()

    # grouped loss == per-group dense losses; gradients == the sample-weighted sum of both models'
    out, grads = _loss_and_grads(small_pre, lambda: MaskDiTLoss()(
        small_pre, [xs, xb], [ys, yb], ids_keep=[ids_s, ids_b], sigma=torch.cat([ss, sb]), noise=[ns, nb]))
    ref_s, grads_s = _loss_and_grads(small_pre, lambda: MaskDiTLoss()(small_pre, xs, ys, ids_keep=ids_s,
                                                                      sigma=ss, noise=ns))
    ref_b, grads_b = _loss_and_grads(big_pre, lambda: MaskDiTLoss()(big_pre, xb, yb, ids_keep=ids_b,
                                                                    sigma=sb, noise=nb))
    torch.testing.assert_close(out.per_sample, torch.cat([ref_s.per_sample, ref_b.per_sample]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, (3 * ref_s.loss + 2 * ref_b.loss) / 5, rtol=1e-5, atol=1e-6)
    _assert_grads_close(grads, {n: (3 * g + 2 * grads_b[n]) / 5 for n, g in grads_s.items()})

    # random per-sample masks in every group, drawn by the model
    torch.manual_seed(0)
    out = MaskDiTLoss()(small_pre, [xs, xb], [ys, None], mask_ratio=[torch.tensor([0.0, 0.5, 0.75]), 0.5],
                                generator=torch.Generator().manual_seed(1))
    assert out.per_sample.shape == (5,) and torch.isfinite(out.loss)
    masks = [o.mask for o in model([xs, xb], [ss, sb], None, mask_ratio=[[0.0, 0.5, 0.75], 0.5])]
    assert masks[0].sum(1).tolist() == [0, 8, 12] and masks[1].sum(1).tolist() == [32, 32]


# ----------------------------------------------------------------------------------------------
# Errors

def test_packed_errors_for_bad_inputs():
    model = _model()
    x, y, t, _ = _batch(2, 8, seed=12)
    good = pack_ids_keep([torch.tensor([0, 1]), torch.tensor([2, 3, 4])])
    for bad, err, match in [
        ([0.5, 1.0], ValueError, "mask_ratio"), ([0.5], ValueError, "for a batch of 2"),
        ([0.5, "a"], TypeError, "mask_ratio"), (torch.tensor([[0.5, 0.5]]), ValueError, "1-D"),
        ([0.5, 0.99], ValueError, "keeps no token"),
    ]:
        with pytest.raises(err, match=match):
            model(x, t, y, mask_ratio=bad)
    for bad, err, match in [
        (good._replace(counts=(2, 2)), ValueError, "sum to"),
        (good._replace(counts=(5,)), ValueError, "1 samples"),
        (good._replace(counts=(2, 17)), ValueError, "counts"),
        (good._replace(cu_seqlens=good.cu_seqlens.long()), TypeError, "int32"),
        (good._replace(cu_seqlens=torch.tensor([0, 3, 5], dtype=torch.int32)), ValueError, "match its counts"),
        (good._replace(ids=torch.tensor([0, 1, 2, 3, 16])), ValueError, "outside"),
        (good._replace(ids=torch.tensor([0, 0, 2, 3, 4])), ValueError, "duplicate"),
        (good._replace(ids=good.ids.int()), TypeError, "int64"),
        ([torch.tensor([0, 1]), torch.tensor([], dtype=torch.long)], ValueError, "keeps no token"),
        ([torch.tensor([0, 1]), torch.tensor([1.0])], TypeError, "int64"),
    ]:
        with pytest.raises(err, match=match):
            model(x, t, y, ids_keep=bad)
    with pytest.raises(ValueError, match="keeps"):
        model(x, t, y, mask_ratio=[0.5, 0.5], ids_keep=good)
    model(x, t, y, mask_ratio=[0.875, 0.8125], ids_keep=good)  # consistent ratios are accepted
    with pytest.raises(ValueError, match="is on meta"):
        model(x, t, y, ids_keep=PackedMask(good.ids.to("meta"), good.cu_seqlens.to("meta"), good.counts))
    with pytest.raises(ValueError, match="input_size"):  # one batch keeps the model's size; groups not
        model(torch.randn(2, 3, 16, 16), t, y, mask_ratio=[0.5, 0.5])
    with pytest.raises(TypeError, match="list"):
        model(x, [t], [y])
    with pytest.raises(ValueError, match="entries for 2 groups"):
        model([x, x], [t], [y, y])
    with pytest.raises(ValueError, match="multiple of patch_size"):
        model([torch.randn(2, 3, 8, 7)], [t], [y])
    with pytest.raises(ValueError, match="DiT"):
        DiT(**TINY)(x, t, y, mask_ratio=[0.5, 0.5])
    with pytest.raises(ValueError, match="noise"):
        MaskDiTLoss()(EDMPrecond(model), [x], [y], noise=torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="list"):
        MaskDiTLoss()(EDMPrecond(model), [], [y])
    for low, high in [(-0.1, 0.5), (0.5, 1.0), (0.6, 0.4)]:
        with pytest.raises(ValueError, match="range"):
            sample_mask_ratios(4, low, high)
    with pytest.raises(TypeError, match="per-sample"):
        random_masking_packed(0.5, 16)
