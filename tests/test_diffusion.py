"""Tests for maskdit_fast.diffusion: EDM preconditioning, the MaskDiT loss, mask-ratio schedules and
the EDM samplers, against hand-written references (a small fake network stands in for the model)."""
import math

import pytest
import torch
import torch.nn as nn

from maskdit_fast.diffusion import (
    EDMLoss, EDMPrecond, MaskDiTLoss, StackedRandomGenerator, edm_coefficients, edm_sampler, edm_sigma_steps,
    mask_ratio_schedule, patchify, sample, unpatchify,
)
from maskdit_fast.models import ModelOutput, create_model


class FakeNet(nn.Module):
    """Per-patch linear "denoiser" with the model call convention. Masked patches (random, or all but
    ids_keep) output a learned constant, like a decoder that only sees a mask token there. Records the
    inputs of every call."""

    def __init__(self, in_channels=2, patch_size=2, num_classes=3, input_size=4, learn_sigma=False):
        super().__init__()
        self.in_channels, self.patch_size, self.num_classes, self.input_size = (
            in_channels, patch_size, num_classes, input_size)
        d_in = patch_size ** 2 * in_channels
        d_out = d_in * (2 if learn_sigma else 1)
        self.proj = nn.Linear(d_in, d_out)
        self.t_proj = nn.Linear(1, d_out)
        self.y_emb = nn.Embedding(num_classes + 1, d_out)
        self.mask_out = nn.Parameter(torch.randn(d_out))
        self.calls = []

    def forward(self, x, t, y, mask_ratio=0.0, ids_keep=None):
        if y.min() < 0 or y.max() > self.num_classes:
            raise ValueError("label out of range")
        self.calls.append((x.detach().clone(), t.detach().clone(), y.detach().clone()))
        p = self.patch_size
        tokens = patchify(x, p)
        out = torch.tanh(self.proj(tokens)) + self.t_proj(t[:, None].to(x.dtype))[:, None] + self.y_emb(y)[:, None]
        mask = None
        if mask_ratio > 0 or ids_keep is not None:
            B, L = tokens.shape[:2]
            if ids_keep is None:
                ids_keep = torch.rand(B, L).argsort(1)[:, :int(L * (1 - mask_ratio))]
            mask = torch.ones(B, L).scatter_(1, ids_keep, 0.0)
            out = torch.where(mask[..., None] > 0, self.mask_out.to(out.dtype), out)
        return ModelOutput(unpatchify(out, p, x.shape[2], x.shape[3]), mask)


class ConstNet(nn.Module):
    """Returns a fixed tensor F (per batch row), to read the preconditioning off D."""

    def __init__(self, F, num_classes=3):
        super().__init__()
        self.F, self.in_channels, self.patch_size, self.num_classes = F, F.shape[1], 2, num_classes
        self.seen = None

    def forward(self, x, t, y, mask_ratio=0.0, ids_keep=None):
        self.seen = (x.clone(), t.clone())
        return ModelOutput(self.F[: x.shape[0]], None)


class GaussianDenoiser(nn.Module):
    """The exact denoiser for data ~ N(mu, s0^2 I): D(x; sigma) = mu + s0^2 / (s0^2 + sigma^2) * (x - mu)."""

    def __init__(self, mu, s0, in_channels=1):
        super().__init__()
        self.mu, self.s0, self.in_channels, self.num_classes = mu, s0, in_channels, 2
        self.nfe = 0

    def forward(self, x, sigma, y, mask_ratio=0.0, ids_keep=None):
        self.nfe += 1
        sigma = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1, 1, 1, 1)
        return ModelOutput(self.mu + self.s0 ** 2 / (self.s0 ** 2 + sigma ** 2) * (x - self.mu), None)


def _precond(**kw):
    torch.manual_seed(0)
    return EDMPrecond(FakeNet(**kw)).eval()


# ------------------------------------------------------------------------------------ patchify

def test_patchify_order_and_inverse():
    x = torch.randn(2, 3, 4, 6)
    p = 2
    t = patchify(x, p)
    assert t.shape == (2, 6, 12)
    for b, i, j, pp, qq, c in [(0, 0, 0, 0, 0, 0), (1, 1, 2, 1, 0, 2), (0, 1, 1, 0, 1, 1), (1, 0, 2, 1, 1, 0)]:
        assert t[b, i * 3 + j, (pp * p + qq) * 3 + c] == x[b, c, i * p + pp, j * p + qq]
    assert torch.equal(unpatchify(t, p, 4, 6), x)
    sq = torch.randn(1, 2, 4, 4)
    assert torch.equal(unpatchify(patchify(sq, 2), 2), sq)
    with pytest.raises(ValueError, match="divisible"):
        patchify(torch.randn(1, 1, 5, 4), 2)
    with pytest.raises(ValueError, match="tile"):
        unpatchify(torch.randn(1, 5, 8), 2)


# ------------------------------------------------------------------------------------ precond

def test_precond_coefficients_match_formulas():
    torch.manual_seed(0)
    B, C, sd = 3, 2, 0.5
    F = torch.randn(B, C, 4, 4)
    net = ConstNet(F)
    pre = EDMPrecond(net, sigma_data=sd)
    x = torch.randn(B, C, 4, 4)
    sigmas = [0.01, 0.7, 30.0]
    D = pre(x, torch.tensor(sigmas), torch.zeros(B, dtype=torch.long)).sample
    assert D.dtype == torch.float32
    for b, s in enumerate(sigmas):
        c_skip = sd ** 2 / (s ** 2 + sd ** 2)
        c_out = s * sd / math.sqrt(s ** 2 + sd ** 2)
        c_in = 1 / math.sqrt(sd ** 2 + s ** 2)
        torch.testing.assert_close(D[b], c_skip * x[b] + c_out * F[b], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(net.seen[0][b], c_in * x[b], rtol=1e-6, atol=1e-6)
        assert net.seen[1][b].item() == pytest.approx(math.log(s) / 4, rel=1e-6)
    # A scalar sigma (python or 0-d tensor) is broadcast to the batch.
    D1 = pre(x, 0.7, torch.zeros(B, dtype=torch.long)).sample
    D2 = pre(x, torch.tensor(0.7), torch.zeros(B, dtype=torch.long)).sample
    assert torch.equal(D1, D2) and net.seen[1].shape == (B,)
    c = edm_coefficients(torch.tensor([0.7]), sd)
    assert [v.item() for v in c] == pytest.approx([sd ** 2 / 0.74, 0.35 / math.sqrt(0.74), 1 / math.sqrt(0.74),
                                                   math.log(0.7) / 4], rel=1e-6)


def test_precond_learn_sigma_uses_first_channels_and_checks_shapes():
    torch.manual_seed(0)
    F = torch.randn(2, 4, 4, 4)
    pre = EDMPrecond(ConstNet(F[:, :2].contiguous()))
    pre_ls = EDMPrecond(ConstNet(F))
    pre_ls.net.in_channels = 2
    x, y = torch.randn(2, 2, 4, 4), torch.zeros(2, dtype=torch.long)
    assert torch.equal(pre(x, 1.0, y).sample, pre_ls(x, 1.0, y).sample)
    with pytest.raises(ValueError, match="x must be"):
        pre(torch.randn(2, 3, 4, 4), 1.0, y)
    with pytest.raises(ValueError, match="sigma has 3 values"):
        pre(x, torch.ones(3), y)
    with pytest.raises(ValueError, match="sigma must be > 0"):
        pre(x, 0.0, y)
    net = ConstNet(torch.randn(2, 3, 4, 4))  # 3 output channels for a 2-channel input
    net.in_channels = 2
    with pytest.raises(RuntimeError, match="network returned shape"):
        EDMPrecond(net)(x, 1.0, y)


# ------------------------------------------------------------------------------------ loss

def _hand_loss(pre, x, y, sigma, noise, ids_keep, sd=0.5, mae_coef=0.1):
    """The MaskDiT loss by explicit loops over samples and patches (float64)."""
    p = pre.patch_size
    x_noisy = x + noise * sigma.reshape(-1, 1, 1, 1)
    D = pre(x_noisy, sigma, y, ids_keep=ids_keep).sample.double()
    x, x_noisy = x.double(), x_noisy.double()
    B, C, H, W = x.shape
    per_sample, dsms, maes = [], [], []
    for b in range(B):
        s = sigma[b].item()
        w = (s ** 2 + sd ** 2) / (s * sd) ** 2
        kept_losses, masked_losses = [], []
        for i in range(H // p):
            for j in range(W // p):
                sl = (b, slice(None), slice(i * p, (i + 1) * p), slice(j * p, (j + 1) * p))
                if i * (W // p) + j in ids_keep[b].tolist():
                    kept_losses.append(w * ((D[sl] - x[sl]) ** 2).mean())
                else:
                    v = x_noisy[sl].flatten()
                    var = ((v - v.mean()) ** 2).sum() / (v.numel() - 1)
                    target = (v - v.mean()) / torch.sqrt(var + 1e-6)
                    masked_losses.append(((D[sl].flatten() - target) ** 2).mean())
        dsm = sum(kept_losses) / len(kept_losses)
        mae = sum(masked_losses) / len(masked_losses) if masked_losses else torch.tensor(0.0, dtype=torch.float64)
        dsms.append(dsm)
        maes.append(mae)
        per_sample.append(dsm + mae_coef * mae)
    return torch.stack(per_sample), torch.stack(dsms), torch.stack(maes)


def test_loss_matches_hand_computation_with_fixed_mask():
    pre = _precond(in_channels=2, patch_size=2, input_size=4)
    torch.manual_seed(1)
    B = 3
    x, noise = torch.randn(B, 2, 4, 4), torch.randn(B, 2, 4, 4)
    y = torch.tensor([0, 2, 3])  # 3 = null class
    sigma = torch.tensor([0.05, 0.8, 12.0])
    ids_keep = torch.tensor([[0, 3], [1, 2], [2, 0]])
    out = MaskDiTLoss()(pre, x, y, mask_ratio=0.5, ids_keep=ids_keep, sigma=sigma, noise=noise)
    per_sample, dsm, mae = _hand_loss(pre, x, y, sigma, noise, ids_keep)
    torch.testing.assert_close(out.per_sample.double(), per_sample, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss.double(), per_sample.mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.dsm.double(), dsm.mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.mae.double(), mae.mean(), rtol=1e-5, atol=1e-6)
    assert out.mae.item() > 0 and out.loss.shape == () and out.per_sample.shape == (B,)
    # The MAE coefficient scales only the MAE term.
    out3 = MaskDiTLoss(mae_coef=0.3)(pre, x, y, ids_keep=ids_keep, sigma=sigma, noise=noise)
    torch.testing.assert_close(out3.per_sample.double(), dsm + 0.3 * mae, rtol=1e-5, atol=1e-6)


def test_dsm_only_sees_kept_patches_and_mae_only_masked():
    """Gradients: masked patches output the net's mask_out parameter; with mae_coef = 0 the loss must
    not depend on it (DSM over kept patches only), with mae_coef > 0 it must."""
    pre = _precond()
    torch.manual_seed(2)
    x, noise, y = torch.randn(2, 2, 4, 4), torch.randn(2, 2, 4, 4), torch.tensor([1, 0])
    ids_keep = torch.tensor([[0, 1], [2, 3]])
    kw = dict(ids_keep=ids_keep, sigma=torch.tensor([0.5, 2.0]), noise=noise)
    MaskDiTLoss(mae_coef=0.0)(pre, x, y, **kw).loss.backward()
    assert pre.net.mask_out.grad is None or pre.net.mask_out.grad.abs().max() == 0
    assert pre.net.proj.weight.grad.abs().max() > 0
    pre.zero_grad()
    out = MaskDiTLoss(mae_coef=0.1)(pre, x, y, **kw)
    out.loss.backward()
    assert pre.net.mask_out.grad.abs().max() > 0
    assert MaskDiTLoss(mae_coef=0.0)(pre, x, y, **kw).mae.item() == 0.0


def test_mask_ratio_zero_is_plain_edm_loss():
    pre = _precond()
    torch.manual_seed(3)
    x, noise, y = torch.randn(4, 2, 4, 4), torch.randn(4, 2, 4, 4), torch.tensor([0, 1, 2, 3])
    sigma = torch.tensor([0.01, 0.3, 1.0, 50.0])
    out = MaskDiTLoss()(pre, x, y, sigma=sigma, noise=noise)
    x_noisy = x + noise * sigma.reshape(-1, 1, 1, 1)
    D = pre(x_noisy, sigma, y).sample
    w = (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2
    ref = (w.reshape(-1, 1, 1, 1) * (D - x) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(out.per_sample, ref, rtol=1e-6, atol=1e-6)
    assert out.mae.item() == 0.0 and EDMLoss is MaskDiTLoss
    assert all(len(c[0]) == 4 for c in pre.net.calls)  # no masking was requested


def test_loss_random_mask_and_generator_reproducible():
    pre = _precond()
    x, y = torch.randn(2, 2, 4, 4), torch.tensor([0, 1])
    runs = []
    for seed in (7, 7, 8):
        torch.manual_seed(0)  # FakeNet's mask uses the global RNG; sigma and noise come from the generator
        runs.append(MaskDiTLoss()(pre, x, y, mask_ratio=0.5, generator=torch.Generator().manual_seed(seed)))
    assert torch.equal(runs[0].per_sample, runs[1].per_sample)
    assert not torch.allclose(runs[0].per_sample, runs[2].per_sample)
    assert runs[0].mae.item() > 0


def test_sigma_distribution():
    s = MaskDiTLoss(P_mean=-1.2, P_std=1.2).sample_sigma(20000, generator=torch.Generator().manual_seed(0))
    assert s.log().mean().item() == pytest.approx(-1.2, abs=0.05)
    assert s.log().std().item() == pytest.approx(1.2, abs=0.05)


def test_loss_under_bf16_autocast_is_fp32_and_close():
    pre = _precond()
    torch.manual_seed(4)
    x, noise, y = torch.randn(2, 2, 4, 4), torch.randn(2, 2, 4, 4), torch.tensor([0, 1])
    kw = dict(ids_keep=torch.tensor([[0, 1], [1, 3]]), sigma=torch.tensor([0.4, 3.0]), noise=noise)
    ref = MaskDiTLoss()(pre, x, y, **kw)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = MaskDiTLoss()(pre, x, y, **kw)
    assert out.loss.dtype == torch.float32 and out.per_sample.dtype == torch.float32
    torch.testing.assert_close(out.per_sample, ref.per_sample, rtol=3e-2, atol=3e-2)


def test_loss_bad_inputs():
    pre = _precond()
    x, y = torch.randn(2, 2, 4, 4), torch.tensor([0, 1])
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="mask_ratio"):
            MaskDiTLoss()(pre, x, y, mask_ratio=bad)
    with pytest.raises(ValueError, match="sigma_data"):
        MaskDiTLoss(sigma_data=1.0)(pre, x, y)
    with pytest.raises(ValueError, match="noise shape"):
        MaskDiTLoss()(pre, x, y, noise=torch.randn(2, 2, 4, 2))
    with pytest.raises(ValueError, match="label"):
        MaskDiTLoss()(pre, x, torch.tensor([0, 4]))
    with pytest.raises(ValueError):
        MaskDiTLoss(P_std=0.0)

    class NoMaskNet(FakeNet):
        def forward(self, *a, **k):
            return ModelOutput(super().forward(*a, **k).sample, None)

    with pytest.raises(RuntimeError, match="no mask"):
        MaskDiTLoss()(EDMPrecond(NoMaskNet()), x, y, mask_ratio=0.5)


# ------------------------------------------------------------------------------------ schedules

def test_mask_ratio_schedules():
    const = mask_ratio_schedule("constant", 0.5)
    assert const(0) == const(10 ** 6) == 0.5
    lin = mask_ratio_schedule("linear", 0.5, 0.1, total_steps=100)
    assert (lin(0), lin(50), lin(100), lin(1000)) == pytest.approx((0.5, 0.3, 0.1, 0.1))
    assert lin(25) == pytest.approx(0.4)
    cos = mask_ratio_schedule("cosine", 0.5, 0.0, total_steps=100)
    assert (cos(0), cos(50), cos(100), cos(200)) == pytest.approx((0.5, 0.25, 0.0, 0.0))
    # Official "cosine2": (start - end) * cos(pi t / 2)^2 + end.
    assert cos(30) == pytest.approx(0.5 * math.cos(math.pi * 0.3 / 2) ** 2)
    assert cos(10) > cos(20) > cos(30)
    for args in [("constant", 1.0), ("linear", 0.5, 1.0, 10), ("cosine", -0.1, 0.0, 10), ("exp", 0.5, 0.1, 10),
                 ("linear", 0.5, None, 10), ("linear", 0.5, 0.1, 0), ("constant", 0.5, 0.2)]:
        with pytest.raises(ValueError):
            mask_ratio_schedule(*args)
    with pytest.raises(ValueError, match="step"):
        lin(-1)


# ------------------------------------------------------------------------------------ sampler

def _reference_heun(precond, latents, y, num_steps, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """EDM's Algorithm 2 (deterministic), written out independently, conditional model only."""
    i = torch.arange(num_steps, dtype=torch.float64)
    t = (sigma_max ** (1 / rho) + i / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    t = torch.cat([t, torch.zeros(1, dtype=torch.float64)]).tolist()
    x = latents.double() * t[0]
    for n in range(num_steps):
        d = (x - precond(x.float(), t[n], y).sample.double()) / t[n]
        x_new = x + (t[n + 1] - t[n]) * d
        if n < num_steps - 1:
            d2 = (x_new - precond(x_new.float(), t[n + 1], y).sample.double()) / t[n + 1]
            x_new = x + (t[n + 1] - t[n]) * (0.5 * d + 0.5 * d2)
        x = x_new
    return x.float()


def test_sigma_steps():
    s = edm_sigma_steps(5, 0.002, 80.0, 7.0)
    assert s.dtype == torch.float64 and s.shape == (6,)
    assert s[0].item() == pytest.approx(80.0) and s[4].item() == pytest.approx(0.002) and s[5] == 0
    assert torch.all(s[:-1] > s[1:])
    assert edm_sigma_steps(1, 0.002, 80.0).tolist() == [80.0, 0.0]


def test_cfg_scale_one_is_exactly_the_conditional_model():
    pre = _precond()
    torch.manual_seed(5)
    latents, y = torch.randn(3, 2, 4, 4), torch.tensor([0, 1, 2])
    ref = _reference_heun(pre, latents, y, num_steps=6)
    pre.net.calls.clear()
    out = edm_sampler(pre, latents, y, num_steps=6, cfg_scale=1.0)
    assert out.dtype == torch.float32 and torch.equal(out, ref)
    assert len(pre.net.calls) == 2 * 6 - 1  # Heun NFE
    assert all(c[2].shape == (3,) and (c[2] < 3).all() for c in pre.net.calls)  # no null-class pass


def test_cfg_guidance_combines_batched_cond_and_uncond():
    pre = _precond()
    torch.manual_seed(6)
    latents, y = torch.randn(2, 2, 4, 4), torch.tensor([0, 2])
    pre.net.calls.clear()
    out = edm_sampler(pre, latents, y, num_steps=1, cfg_scale=2.5)
    assert len(pre.net.calls) == 1  # one batched call of 2B rows: cond then null class
    assert torch.equal(pre.net.calls[0][2], torch.tensor([0, 2, 3, 3]))
    x0 = (latents.double() * 80.0).float()
    d_c = pre(x0, 80.0, y).sample.double()
    d_u = pre(x0, 80.0, torch.full_like(y, 3)).sample.double()
    # One Euler step from sigma_max to 0 lands on the guided denoiser output (all channels guided).
    torch.testing.assert_close(out.double(), d_u + 2.5 * (d_c - d_u), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, edm_sampler(pre, latents, y, num_steps=1, cfg_scale=1.0))


def test_cfg_interval_guides_only_inside_it():
    pre = _precond()
    torch.manual_seed(9)
    latents, y = torch.randn(2, 2, 4, 4), torch.tensor([0, 2])
    sigmas = edm_sigma_steps(6).tolist()
    everywhere = edm_sampler(pre, latents, y, num_steps=6, cfg_scale=3.0)
    assert torch.equal(edm_sampler(pre, latents, y, num_steps=6, cfg_scale=3.0, cfg_interval=(0.0, 100.0)),
                       everywhere)
    nowhere = edm_sampler(pre, latents, y, num_steps=6, cfg_scale=3.0, cfg_interval=(90.0, 100.0))
    assert torch.equal(nowhere, edm_sampler(pre, latents, y, num_steps=6, cfg_scale=1.0))
    pre.net.calls.clear()
    lo, hi = sigmas[3], sigmas[1]  # guided: the evaluations at sigmas[1] and sigmas[2] (lo itself is not)
    partly = edm_sampler(pre, latents, y, num_steps=6, cfg_scale=3.0, cfg_interval=(lo, hi))
    batch_sizes = [c[0].shape[0] for c in pre.net.calls]
    # Heun evaluates sigma_0, then (sigma_i at the corrector, sigma_i at the next step's predictor) pairs.
    evaluated = [sigmas[0]] + [s for s in sigmas[1:6] for _ in range(2)]
    assert batch_sizes == [4 if lo < s <= hi else 2 for s in evaluated] and 4 in batch_sizes and 2 in batch_sizes
    assert not torch.allclose(partly, everywhere) and not torch.allclose(partly, nowhere)
    for bad in ((1.0, 1.0), (-1.0, 2.0), (2.0,), "ab", 3.0):
        with pytest.raises(ValueError, match="cfg_interval"):
            edm_sampler(pre, latents, y, num_steps=2, cfg_scale=3.0, cfg_interval=bad)


def test_heun_vs_euler_and_single_step():
    pre = _precond()
    torch.manual_seed(7)
    latents, y = torch.randn(2, 2, 4, 4), torch.tensor([1, 1])
    heun = edm_sampler(pre, latents, y, num_steps=5, solver="heun")
    pre.net.calls.clear()
    euler = edm_sampler(pre, latents, y, num_steps=5, solver="euler")
    assert len(pre.net.calls) == 5
    assert not torch.allclose(heun, euler)
    h1 = edm_sampler(pre, latents, y, num_steps=1, solver="heun")
    e1 = edm_sampler(pre, latents, y, num_steps=1, solver="euler")
    assert torch.equal(h1, e1)
    torch.testing.assert_close(h1, pre((latents.double() * 80).float(), 80.0, y).sample)


def test_heun_solves_gaussian_pf_ode_at_second_order():
    """For data ~ N(mu, s0^2) the exact denoiser is known and the probability-flow ODE maps x_T to
    mu + s0 / sqrt(s0^2 + T^2) (x_T - mu): Heun's error must shrink 4x per step doubling, Euler's 2x."""
    torch.manual_seed(8)
    mu, s0, T = 0.3, 0.5, 80.0
    latents, y = torch.randn(64, 1, 2, 2), torch.zeros(64, dtype=torch.long)
    exact = mu + s0 / math.sqrt(s0 ** 2 + T ** 2) * (latents.double() * T - mu)
    errors = {}
    for solver in ("heun", "euler"):
        errors[solver] = []
        for num_steps in (32, 64, 128):
            den = GaussianDenoiser(mu, s0)
            out = edm_sampler(den, latents, y, num_steps=num_steps, sigma_max=T, solver=solver)
            assert den.nfe == (2 * num_steps - 1 if solver == "heun" else num_steps)
            errors[solver].append((out - exact).abs().max().item())
    h, e = errors["heun"], errors["euler"]
    assert 3.5 < h[0] / h[1] < 5 and 3.5 < h[1] / h[2] < 5, h
    assert 1.7 < e[0] / e[1] < 2.3 and 1.7 < e[1] / e[2] < 2.3, e
    assert h[2] < 2e-3 and e[2] > 10 * h[2]
    # The samples have the data distribution's moments.
    big = edm_sampler(GaussianDenoiser(mu, s0), torch.randn(4096, 1, 1, 1, generator=torch.Generator().manual_seed(0)),
                      torch.zeros(4096, dtype=torch.long), num_steps=40)
    assert big.mean().item() == pytest.approx(mu, abs=0.03) and big.std().item() == pytest.approx(s0, abs=0.03)


def test_sample_seeding():
    pre = _precond()
    y = torch.tensor([0, 1, 2])
    a = sample(pre, y, 11, num_steps=3)
    b = sample(pre, y, 11, num_steps=3)
    c = sample(pre, y, 12, num_steps=3)
    assert a.shape == (3, 2, 4, 4) and torch.equal(a, b) and not torch.allclose(a, c)
    g = sample(pre, y, torch.Generator().manual_seed(11), num_steps=3)
    assert torch.equal(a, g)
    # Per-sample seeds: a sample depends only on its own seed and label, not on the batch.
    s3 = sample(pre, y, [5, 6, 7], num_steps=3)
    s1 = sample(pre, y[1:2], [6], num_steps=3)
    torch.testing.assert_close(s3[1:2], s1, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(s3[0], s3[2])
    # Churn noise comes from the same seeded source.
    ch1 = sample(pre, y, [5, 6, 7], num_steps=4, S_churn=10.0)
    ch2 = sample(pre, y, [5, 6, 7], num_steps=4, S_churn=10.0)
    assert torch.equal(ch1, ch2) and not torch.allclose(ch1, sample(pre, y, [5, 6, 7], num_steps=4))
    rnd = StackedRandomGenerator("cpu", [3, 4])
    assert torch.equal(rnd.randn([2, 5])[1], StackedRandomGenerator("cpu", [4]).randn([1, 5])[0])


def test_sampler_bad_inputs():
    pre = _precond()
    latents, y = torch.randn(2, 2, 4, 4), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="num_steps"):
        edm_sampler(pre, latents, y, num_steps=0)
    with pytest.raises(ValueError, match="cfg_scale"):
        edm_sampler(pre, latents, y, cfg_scale=-1.0)
    with pytest.raises(ValueError, match="solver"):
        edm_sampler(pre, latents, y, solver="rk4")
    with pytest.raises(ValueError, match="latents"):
        edm_sampler(pre, latents, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="sigma_min"):
        edm_sampler(pre, latents, y, sigma_min=100.0)
    with pytest.raises(ValueError, match="label"):
        edm_sampler(pre, latents, torch.tensor([0, 7]), num_steps=1)
    with pytest.raises(ValueError, match="seeds"):
        sample(pre, y, [1, 2, 3])
    uncond = GaussianDenoiser(0.0, 0.5)
    uncond.num_classes = 0
    with pytest.raises(ValueError, match="class-conditional"):
        edm_sampler(uncond, latents[:, :1], y, cfg_scale=2.0)


# ------------------------------------------------------------------------------------ real models

def _real_precond(name="MaskDiT-S/2", **kw):
    """A 1-block model on 8x8x2 latents (16 tokens), weights randomised so the zero-initialised
    output layers do not hide anything."""
    torch.manual_seed(0)
    extra = dict(decoder_depth=1) if name.startswith("MaskDiT") else {}
    net = create_model(name, input_size=8, in_channels=2, depth=1, num_classes=3, **extra, **kw)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return EDMPrecond(net).eval()


def test_real_maskdit_loss_matches_hand_computation():
    pre = _real_precond()
    torch.manual_seed(9)
    x, noise = torch.randn(2, 2, 8, 8), torch.randn(2, 2, 8, 8)
    y, sigma = torch.tensor([1, 3]), torch.tensor([0.2, 4.0])
    ids_keep = torch.stack([torch.randperm(16)[:8] for _ in range(2)])
    out = MaskDiTLoss()(pre, x, y, mask_ratio=0.5, ids_keep=ids_keep, sigma=sigma, noise=noise)
    per_sample, dsm, mae = _hand_loss(pre, x, y, sigma, noise, ids_keep)
    torch.testing.assert_close(out.per_sample.double(), per_sample, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.mae.double(), mae.mean(), rtol=1e-5, atol=1e-6)
    out.loss.backward()
    assert pre.net.mask_token.grad.abs().max() > 0  # the MAE term reaches the mask token
    # Random masking at ratio 0.5 (the model's own mask) and the unmasked loss both run and are finite.
    for ratio in (0.5, 0.0):
        res = MaskDiTLoss()(pre, x, y, mask_ratio=ratio, generator=torch.Generator().manual_seed(1))
        assert torch.isfinite(res.loss) and (res.mae.item() > 0) == (ratio > 0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        res = MaskDiTLoss()(pre, x, y, ids_keep=ids_keep, sigma=sigma, noise=noise)
    assert res.loss.dtype == torch.float32
    torch.testing.assert_close(res.per_sample, out.per_sample, rtol=5e-2, atol=5e-2)
    with pytest.raises(ValueError, match="class labels"):
        MaskDiTLoss()(pre, x, torch.tensor([0, 4]))


def test_real_models_sampling():
    pre = _real_precond()
    y = torch.tensor([0, 2])
    latents = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(3))
    assert torch.equal(edm_sampler(pre, latents, y, num_steps=3), _reference_heun(pre, latents, y, num_steps=3))
    a = sample(pre, y, [4, 5], num_steps=3, cfg_scale=1.5)  # resolution from net.input_size (8, 8)
    b = sample(pre, y[1:], [5], num_steps=3, cfg_scale=1.5)
    assert a.shape == (2, 2, 8, 8) and torch.isfinite(a).all()
    torch.testing.assert_close(a[1:], b, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(a, sample(pre, y, [4, 5], num_steps=3))
    # DiT with learn_sigma: the preconditioner uses the first C of its 2C output channels.
    dit = _real_precond("DiT-S/2")
    assert dit.net.learn_sigma
    x = torch.randn(2, 2, 8, 8)
    F_x = dit.net(x / math.sqrt(1.25), torch.full((2,), math.log(1.0) / 4), y).sample
    torch.testing.assert_close(dit(x, 1.0, y).sample, 0.2 * x + 0.5 / math.sqrt(1.25) * F_x[:, :2])
    assert torch.isfinite(sample(dit, y, 0, num_steps=2, cfg_scale=2.0)).all()
