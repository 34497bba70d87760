"""EDM diffusion for MaskDiT and DiT (Karras et al. 2022, "Elucidating the Design Space of
Diffusion-Based Generative Models"; MaskDiT's loss from Zheng et al. 2023).

- `EDMPrecond`: wraps a network `net(x, t, y, mask_ratio=, ids_keep=) -> ModelOutput(sample, mask)`
  into the EDM denoiser D(x; sigma) with the standard c_skip / c_out / c_in / c_noise scalings; x
  may also be a list of groups of resolutions (MaskDiT's forward on groups).
- `MaskDiTLoss` (alias `EDMLoss`): EDM denoising score matching on the kept patches plus an
  MAE-style reconstruction of the masked patches; at mask ratio 0 the plain EDM loss. Mask ratios
  may be per sample, and x a mixed-resolution batch (a list of groups) through one network call.
- `mask_ratio_schedule`: constant / linear / cosine mask ratio over training steps.
- `edm_sampler` / `sample`: EDM's Algorithm 2 (Heun or Euler) with classifier-free guidance on all
  channels, seeded (per-sample seeds via `StackedRandomGenerator`).

Class labels are int64 in [0, num_classes]; the label `num_classes` is the null class used for
classifier-free guidance.
"""
import math
import numbers
from typing import NamedTuple

import torch
import torch.nn as nn

from maskdit_fast.masking import per_sample_ratios
from maskdit_fast.models import ModelOutput, patchify, unpatchify  # noqa: F401 (unpatchify: API)


class LossOutput(NamedTuple):
    """MaskDiT loss terms. loss, dsm, mae: fp32 scalars (batch means; mae is 0 when unused);
    per_sample: [B] fp32, dsm_i + mae_coef * mae_i (loss == per_sample.mean())."""
    loss: torch.Tensor
    dsm: torch.Tensor
    mae: torch.Tensor
    per_sample: torch.Tensor


# ----------------------------------------------------------------------------------------------
# Preconditioning.

def _sigma_per_sample(sigma, batch, device):
    """Scalar, [1] or [B] (or [B, 1, 1, 1]) noise levels -> [B] fp32 on `device`."""
    if isinstance(sigma, numbers.Real):
        if not sigma > 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        return torch.full((batch,), float(sigma), dtype=torch.float32, device=device)
    if not torch.is_tensor(sigma):
        raise TypeError(f"sigma must be a number or a tensor, got {type(sigma).__name__}")
    sigma = sigma.to(device=device, dtype=torch.float32).reshape(-1)
    if sigma.numel() == 1:
        return sigma.expand(batch)
    if sigma.numel() != batch:
        raise ValueError(f"sigma has {sigma.numel()} values for a batch of {batch}")
    return sigma


def edm_coefficients(sigma, sigma_data=0.5):
    """EDM preconditioning (Karras et al. 2022, Table 1) for noise levels `sigma` (tensor, any shape).

    Returns (c_skip, c_out, c_in, c_noise), each shaped like sigma, in sigma's dtype:
    c_skip = sd^2/(s^2+sd^2), c_out = s*sd/sqrt(s^2+sd^2), c_in = 1/sqrt(s^2+sd^2), c_noise = ln(s)/4.
    """
    total = sigma ** 2 + sigma_data ** 2
    return sigma_data ** 2 / total, sigma * sigma_data / total.sqrt(), total.rsqrt(), sigma.log() / 4


class EDMPrecond(nn.Module):
    """The EDM denoiser D(x; sigma, y) = c_skip * x + c_out * F(c_in * x, c_noise, y).

    Args:
        net: module called as net(x, t, y, mask_ratio=..., ids_keep=...) -> ModelOutput(sample, mask),
            with attributes in_channels, patch_size, num_classes. When net returns 2*C channels
            (DiT with learn_sigma) only the first C are used.
        sigma_data: standard deviation of the training data.
        sigma_min, sigma_max: noise range the network supports (samplers clamp to it).
    """

    def __init__(self, net, sigma_data=0.5, sigma_min=0.0, sigma_max=float("inf")):
        super().__init__()
        if not sigma_data > 0:
            raise ValueError(f"sigma_data must be > 0, got {sigma_data}")
        if not 0 <= sigma_min < sigma_max:
            raise ValueError(f"need 0 <= sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.net = net
        self.sigma_data = float(sigma_data)
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)

    @property
    def in_channels(self):
        """C, the wrapped network's input channels."""
        return self.net.in_channels

    @property
    def patch_size(self):
        """p, the wrapped network's patch size (the loss patchifies with it)."""
        return self.net.patch_size

    @property
    def num_classes(self):
        """The wrapped network's class count; label num_classes is the null class."""
        return self.net.num_classes

    def forward(self, x, sigma, y, mask_ratio=0.0, ids_keep=None):
        """Denoises x at noise level sigma.

        Args:
            x: [B, C, H, W] noisy input (any float dtype; computed in fp32). Or a list of G groups
                [B_g, C, H_g, W_g] (one resolution per group), denoised in one network call
                (MaskDiT's forward on lists); sigma is then a list of G entries, and y, mask_ratio
                and ids_keep are as MaskDiT's forward takes them for groups.
            sigma: python number, 0-d / [1] / [B] tensor of noise levels (> 0).
            y: [B] int64 class labels in [0, num_classes] (num_classes = null class).
            mask_ratio: fraction of patches the network drops (0 at inference), or B per-sample
                ratios (MaskDiT).
            ids_keep: optional kept patch positions (overrides random masking): [B, K] int64, or
                per-sample (a PackedMask / list of B 1-D int64 tensors, MaskDiT).
        Returns:
            ModelOutput(sample=D_x [B, C, H, W] fp32, mask=[B, L] or None, as the network returned);
            for groups, a list of G of them.
        """
        grouped = isinstance(x, (list, tuple))
        if grouped and (not isinstance(sigma, (list, tuple)) or len(sigma) != len(x)):
            raise ValueError("EDMPrecond: groups need lists x and sigma with one entry per group")
        scaled = [self._scalings(xg, sg) for xg, sg in zip(*_groups(grouped, x, sigma))]
        net_x = [c_in * xg for xg, _, _, c_in, _ in scaled]
        net_t = [c_noise for *_, c_noise in scaled]
        # the network itself is called (not a method of it): DDP / FSDP wrappers hook its call
        outs = self.net(*_batch_or_groups(grouped, net_x, net_t), y, mask_ratio=mask_ratio, ids_keep=ids_keep)
        (outs,) = _groups(grouped, outs)
        denoised = [self._denoised(xg, out, c_skip, c_out) for (xg, c_skip, c_out, _, _), out in zip(scaled, outs)]
        return _batch_or_groups(grouped, denoised)[0]

    def _scalings(self, x, sigma):
        """Checks x and returns (x fp32, c_skip, c_out, c_in [B, 1, 1, 1], c_noise [B])."""
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must be [B, {self.in_channels}, H, W], got shape {tuple(getattr(x, 'shape', ()))}")
        x = x.float()
        sigma = _sigma_per_sample(sigma, x.shape[0], x.device)
        c_skip, c_out, c_in, c_noise = edm_coefficients(sigma, self.sigma_data)
        c_skip, c_out, c_in = (c.reshape(-1, 1, 1, 1) for c in (c_skip, c_out, c_in))
        return x, c_skip, c_out, c_in, c_noise

    @staticmethod
    def _denoised(x, out, c_skip, c_out):
        """D_x = c_skip * x + c_out * F_x (first C channels of the network output)."""
        F_x = out.sample
        B, C = x.shape[:2]
        if F_x.shape[0] != B or F_x.shape[1] not in (C, 2 * C) or F_x.shape[2:] != x.shape[2:]:
            raise RuntimeError(f"network returned shape {tuple(F_x.shape)} for input {tuple(x.shape)}")
        return ModelOutput(c_skip * x + c_out * F_x[:, :C].float(), out.mask)


def _groups(grouped, *args):
    """Each argument as a list of groups: itself when grouped, else [it] (one batch is one group)."""
    return [list(a) if grouped else [a] for a in args]


def _batch_or_groups(grouped, *lists):
    """The inverse of `_groups`: each list itself when grouped, else its one entry (a plain batch)."""
    return [a if grouped else a[0] for a in lists]


# ----------------------------------------------------------------------------------------------
# Loss.

def _check_mask_ratio(mask_ratio):
    if not isinstance(mask_ratio, numbers.Real) or not 0 <= mask_ratio < 1:
        raise ValueError(f"mask_ratio must be a number in [0, 1), got {mask_ratio!r}")


class MaskDiTLoss:
    """MaskDiT's training loss in the EDM formulation (official `EDMLoss` with `mae_loss`).

    sigma = exp(P_mean + P_std * N(0, 1)); noisy input x + sigma * n; the network masks patches of
    the noisy input. Per sample:
      dsm_i = mean over sample i's KEPT patches of [mean over the patch's values of w(sigma) * (D - x)^2],
              w(sigma) = (sigma^2 + sd^2) / (sigma * sd)^2 (all patches when nothing is masked);
      mae_i = mean over sample i's MASKED patches of [mean over the patch of (D - norm(x + sigma*n))^2],
              norm = per-patch (v - mean) / sqrt(var + 1e-6) with the unbiased variance (as the
              official code's torch.var); 0 when mae_coef == 0 or the sample has no masked patch.
    loss = mean_i(dsm_i + mae_coef * mae_i), computed in fp32 (also under autocast).

    Each sample is averaged over its own kept and masked counts, so per-sample mask ratios and
    mixed-resolution batches (groups) need no other change: with equal counts the per-sample terms
    are the official ones, and a batch's loss is the plain mean over its samples.
    """

    def __init__(self, P_mean=-1.2, P_std=1.2, sigma_data=0.5, mae_coef=0.1):
        if not P_std > 0 or not sigma_data > 0 or not mae_coef >= 0:
            raise ValueError(f"need P_std > 0, sigma_data > 0, mae_coef >= 0; got {P_std}, {sigma_data}, {mae_coef}")
        self.P_mean = float(P_mean)
        self.P_std = float(P_std)
        self.sigma_data = float(sigma_data)
        self.mae_coef = float(mae_coef)

    def sample_sigma(self, batch, device=None, generator=None):
        """Draws [batch] fp32 noise levels exp(P_mean + P_std * N(0, 1))."""
        rnd = torch.randn(batch, device=device, generator=generator)
        return (rnd * self.P_std + self.P_mean).exp()

    def __call__(self, precond, x, y, mask_ratio=0.0, ids_keep=None, generator=None, sigma=None, noise=None):
        """Computes the loss of one batch, or of G groups of samples, one resolution per group (a
        mixed-resolution batch: `precond` is called once on the lists, MaskDiT's forward on groups).

        Args:
            precond: EDMPrecond (or a module with the same call and sigma_data / patch_size).
            x: [B, C, H, W] clean data (latents), or a list of G groups [B_g, C, H_g, W_g].
            y: [B] int64 labels in [0, num_classes] (label dropout is the caller's business); for
                groups a list of G (None entries: null class) or None.
            mask_ratio: in [0, 1); the network masks that fraction of patches. Or B per-sample
                ratios (1-D float tensor, list or tuple, e.g. `masking.sample_mask_ratios`). For
                groups a number for every sample or a list of G such entries.
            ids_keep: optional kept patches (fixed mask instead of a random one): [B, K] int64, or a
                PackedMask / list of B 1-D int64 tensors (per-sample counts); for groups None or a
                list of G such entries.
            generator: torch.Generator for sigma (all B samples) and then the noise (group after group).
            sigma: optional override: number or [B] tensor of noise levels (groups in order).
            noise: optional override: [B, C, H, W] standard-normal noise (scaled by sigma here); for
                groups a list of G [B_g, C, H_g, W_g] tensors.
        Returns:
            LossOutput(loss, dsm, mae, per_sample [B], groups in order); the means are over all B
            samples (each sample weighs the same whatever its resolution).
        """
        self._check_precond(precond)
        grouped = isinstance(x, (list, tuple))
        (xs,) = _groups(grouped, x)
        if not xs or not all(isinstance(xg, torch.Tensor) and xg.dim() == 4 for xg in xs):
            raise ValueError(f"x must be [B, C, H, W] or a non-empty list of such tensors (one per group), got "
                             f"{type(x).__name__ if grouped else tuple(getattr(x, 'shape', ()))}")
        if grouped and noise is not None and (not isinstance(noise, (list, tuple)) or len(noise) != len(xs)):
            raise ValueError("noise must be a list with one tensor per group")
        noises = [None] * len(xs) if noise is None else _groups(grouped, noise)[0]
        ratios = mask_ratio if grouped and isinstance(mask_ratio, (list, tuple)) else [mask_ratio] * len(xs)
        ids = ids_keep if grouped and ids_keep is not None else [ids_keep] * len(xs)
        masked = [self._asks_mask(r, ids_g, xg, precond.patch_size) for r, ids_g, xg in zip(ratios, ids, xs)]
        sizes = [xg.shape[0] for xg in xs]
        sigma = self._sigma(sigma, sum(sizes), xs[0].device, generator).split(sizes)
        noised = [self._noised(xg, sg, ng, generator) for xg, sg, ng in zip(xs, sigma, noises)]
        outs = precond(*_batch_or_groups(grouped, [xn for _, xn in noised], list(sigma)), y,
                       mask_ratio=mask_ratio, ids_keep=ids_keep)
        (outs,) = _groups(grouped, outs)
        if any(out.mask is None and asked for out, asked in zip(outs, masked)):
            raise RuntimeError("the network was asked to mask patches but returned no mask")
        terms = [self._terms(out.sample, xc, xn, sg, out.mask, precond.patch_size)
                 for out, (xc, xn), sg in zip(outs, noised, sigma)]
        return self._output(torch.cat([dsm for dsm, _ in terms]), torch.cat([mae for _, mae in terms]))

    @staticmethod
    def _asks_mask(mask_ratio, ids_keep, x, p):
        """Whether a request (one group's mask_ratio and ids_keep, the ratios validated) masks some
        patch of x: a ratio > 0, or kept positions other than a [B, L] tensor keeping all L patches."""
        full = isinstance(ids_keep, torch.Tensor) and ids_keep.shape[-1] == (x.shape[2] // p) * (x.shape[3] // p)
        return any(per_sample_ratios(mask_ratio, x.shape[0])) or (ids_keep is not None and not full)

    def _check_precond(self, precond):
        precond_sd = getattr(precond, "sigma_data", self.sigma_data)
        if precond_sd != self.sigma_data:
            raise ValueError(f"loss sigma_data {self.sigma_data} != preconditioner sigma_data {precond_sd}")

    def _sigma(self, sigma, batch, device, generator):
        """[batch] fp32 noise levels: drawn, or the override checked."""
        if sigma is None:
            sigma = self.sample_sigma(batch, device, generator)
        return _sigma_per_sample(sigma, batch, device)

    @staticmethod
    def _noised(x, sigma, noise, generator):
        """(x fp32, x + sigma * noise) for [B] sigma; noise drawn when None."""
        x = x.float()
        if noise is None:
            noise = torch.randn(x.shape, device=x.device, generator=generator)
        elif noise.shape != x.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != x shape {tuple(x.shape)}")
        return x, x + noise.float() * sigma.reshape(-1, 1, 1, 1)

    def _terms(self, D, x, x_noisy, sigma, mask, p):
        """Per-sample (dsm [B], mae [B]) in fp32 for the denoiser output D (mask [B, L] or None)."""
        # Reductions in fp32 even when the caller runs the network under autocast.
        with torch.autocast(device_type=x.device.type, enabled=False):
            D = D.float()
            sigma = sigma.reshape(-1, 1, 1, 1)
            weight = (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2
            dsm_pixel = weight * (D - x) ** 2
            if mask is None:
                dsm = dsm_pixel.mean(dim=(1, 2, 3))
                return dsm, torch.zeros_like(dsm)
            dsm_patch = patchify(dsm_pixel, p).mean(dim=-1)  # [B, L]
            mask = mask.float()
            if mask.shape != dsm_patch.shape:
                raise RuntimeError(f"mask shape {tuple(mask.shape)} != patch grid {tuple(dsm_patch.shape)}")
            keep = 1.0 - mask
            dsm = (dsm_patch * keep).sum(1) / keep.sum(1)
            mae = self._mae(x_noisy, D, mask, p) if self.mae_coef > 0 else torch.zeros_like(dsm)
            return dsm, mae

    def _output(self, dsm, mae):
        per_sample = dsm + self.mae_coef * mae
        return LossOutput(per_sample.mean(), dsm.mean(), mae.mean(), per_sample)

    @staticmethod
    def _mae(x_noisy, D, mask, p):
        """[B] mean over masked patches of the MSE between D and the per-patch normalised noisy input."""
        target = patchify(x_noisy, p)
        if target.shape[-1] < 2:
            raise ValueError("the MAE term needs patches of at least 2 values (p*p*C >= 2)")
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
        per_patch = ((patchify(D, p) - target) ** 2).mean(-1)
        # Guard the 0/0 of a grid with no masked patch (mask given but empty): mae is then 0.
        return (per_patch * mask).sum(1) / mask.sum(1).clamp_min(1.0)


EDMLoss = MaskDiTLoss  # the official code's name for the same loss


# ----------------------------------------------------------------------------------------------
# Mask-ratio schedules.

def mask_ratio_schedule(kind="constant", start=0.5, end=None, total_steps=None):
    """Mask ratio as a function of the training step.

    Args:
        kind: "constant" (always `start`), "linear" (start -> end), or "cosine" (half cosine,
            end + (start - end) * (1 + cos(pi * step / total_steps)) / 2; the official
            "cosine2" schedule (start - end) * cos^2(pi t / 2) + end).
        start, end: ratios in [0, 1); `end` is required for linear/cosine.
        total_steps: steps over which linear/cosine go from start to end (held at end after).
    Returns:
        callable step (int >= 0) -> ratio (float).
    """
    _check_mask_ratio(start)
    if kind == "constant":
        if end is not None and end != start:
            raise ValueError("a constant schedule takes only `start` (end must be None or equal)")

        def constant(step):
            _check_step(step)
            return float(start)

        return constant
    if kind not in ("linear", "cosine"):
        raise ValueError(f"unknown mask ratio schedule {kind!r}; expected constant, linear or cosine")
    if end is None:
        raise ValueError(f"a {kind} schedule needs `end`")
    _check_mask_ratio(end)
    if not isinstance(total_steps, numbers.Integral) or total_steps < 1:
        raise ValueError(f"total_steps must be an int >= 1, got {total_steps!r}")

    def ratio(step):
        _check_step(step)
        t = min(step / total_steps, 1.0)
        if kind == "linear":
            return float(start + (end - start) * t)
        return float(end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * t)))

    return ratio


def _check_step(step):
    if not isinstance(step, numbers.Real) or step < 0:
        raise ValueError(f"step must be a number >= 0, got {step!r}")


# ----------------------------------------------------------------------------------------------
# Sampling.

class StackedRandomGenerator:
    """One torch.Generator per sample, so sample i's noise depends only on seeds[i] (not on the batch
    it is drawn in). Draws along dim 0, one row per seed."""

    def __init__(self, device, seeds):
        self.generators = [torch.Generator(device).manual_seed(int(s) % (1 << 32)) for s in seeds]

    def randn(self, size, dtype=torch.float32, device=None):
        """Stacked [len(seeds), *size[1:]] standard normal; size[0] must equal len(seeds)."""
        if size[0] != len(self.generators):
            raise ValueError(f"asked for {size[0]} rows from {len(self.generators)} seeds")
        return torch.stack([torch.randn(size[1:], generator=g, dtype=dtype, device=device or g.device)
                            for g in self.generators])

    def randn_like(self, x):
        """Stacked standard normal shaped like x [len(seeds), ...], in x's dtype and device."""
        return self.randn(x.shape, dtype=x.dtype, device=x.device)


def edm_sigma_steps(num_steps=40, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """EDM's noise levels: [num_steps + 1] float64, sigma_i = (smax^(1/rho) + i/(N-1) *
    (smin^(1/rho) - smax^(1/rho)))^rho for i < N, then 0. With N = 1: [sigma_max, 0]."""
    if not isinstance(num_steps, numbers.Integral) or num_steps < 1:
        raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
    if not 0 < sigma_min < sigma_max or not rho > 0:
        raise ValueError(f"need 0 < sigma_min < sigma_max and rho > 0; got {sigma_min}, {sigma_max}, {rho}")
    frac = torch.arange(num_steps, dtype=torch.float64) / max(num_steps - 1, 1)
    steps = (sigma_max ** (1 / rho) + frac * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([steps, steps.new_zeros(1)])


def guided_denoise(precond, x, sigma, y, cfg_scale=1.0):
    """D(x; sigma, y) with classifier-free guidance on all channels: D_u + s * (D_c - D_u), with the
    conditional and null-class (label num_classes) passes in one batched call. cfg_scale == 1 is a
    single conditional pass (exactly the conditional model). x [B, C, H, W]; returns fp32."""
    if cfg_scale == 1:
        return precond(x, sigma, y).sample
    null = torch.full_like(y, precond.num_classes)
    both = precond(torch.cat([x, x]), sigma, torch.cat([y, null])).sample
    cond, uncond = both.chunk(2)
    return uncond + cfg_scale * (cond - uncond)


def _guidance_interval(cfg_interval):
    """(lo, hi) of a sampler's cfg_interval (None: every noise level), checked."""
    if cfg_interval is None:
        return -math.inf, math.inf
    try:
        lo, hi = (float(v) for v in cfg_interval)
    except (TypeError, ValueError):
        raise ValueError(f"cfg_interval must be None or two numbers (lo, hi), got {cfg_interval!r}") from None
    if not 0 <= lo < hi:
        raise ValueError(f"cfg_interval needs 0 <= lo < hi, got ({lo}, {hi})")
    return lo, hi


@torch.no_grad()
def edm_sampler(precond, latents, y, num_steps=40, sigma_min=0.002, sigma_max=80.0, rho=7.0, cfg_scale=1.0,
                cfg_interval=None, S_churn=0.0, S_min=0.0, S_max=float("inf"), S_noise=1.0, solver="heun",
                randn_like=torch.randn_like):
    """EDM's Algorithm 2: integrates the probability-flow ODE from sigma_max to 0 (float64 state).

    Args:
        precond: the denoiser (EDMPrecond); put it in eval mode first. Its sigma_min / sigma_max, if
            any, narrow the range.
        latents: [B, C, H, W] standard-normal initial noise (scaled by sigma_max here).
        y: [B] int64 labels in [0, num_classes) (checked by the model).
        num_steps: N >= 1 noise levels; Heun uses 2N - 1 network evaluations, Euler N.
        cfg_scale: >= 0 classifier-free guidance scale (1 = none; > 1 needs a class-conditional net).
        cfg_interval: None (guide at every noise level) or (lo, hi): guide only the evaluations at
            lo < sigma <= hi, the others are conditional-only (Kynkaenniemi et al. 2024, "Applying
            guidance in a limited interval": guidance at low noise levels adds little to the class
            and amplifies the denoiser's errors into speckles; at high ones it collapses variety).
        S_churn, S_min, S_max, S_noise: EDM's stochastic churn (0 = deterministic).
        solver: "heun" (second order; the last step is Euler) or "euler".
        randn_like: noise source for churn (e.g. StackedRandomGenerator.randn_like).
    Returns:
        [B, C, H, W] fp32 samples.
    """
    if solver not in ("heun", "euler"):
        raise ValueError(f"solver must be 'heun' or 'euler', got {solver!r}")
    if not isinstance(cfg_scale, numbers.Real) or not 0 <= cfg_scale < float("inf"):
        raise ValueError(f"cfg_scale must be a finite number >= 0, got {cfg_scale!r}")
    if cfg_scale != 1 and not getattr(precond, "num_classes", 0):
        raise ValueError("classifier-free guidance (cfg_scale != 1) needs a class-conditional network")
    if latents.dim() != 4 or y.shape != latents.shape[:1]:
        raise ValueError(f"latents must be [B, C, H, W] and y [B]; got {tuple(latents.shape)} and {tuple(y.shape)}")
    lo, hi = _guidance_interval(cfg_interval)

    def denoise(x, sigma):
        scale = cfg_scale if lo < sigma <= hi else 1.0
        return guided_denoise(precond, x.float(), sigma, y, scale).to(torch.float64)

    sigma_min = max(sigma_min, getattr(precond, "sigma_min", 0.0))
    sigma_max = min(sigma_max, getattr(precond, "sigma_max", float("inf")))
    t_steps = edm_sigma_steps(num_steps, sigma_min, sigma_max, rho).tolist()  # python floats: no syncs

    x_next = latents.to(torch.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0.0
        t_hat = t_cur + gamma * t_cur
        x_hat = x_cur
        if gamma > 0:
            x_hat = x_cur + math.sqrt(t_hat ** 2 - t_cur ** 2) * S_noise * randn_like(x_cur)

        denoised = denoise(x_hat, t_hat)
        d_cur = (x_hat - denoised) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        if solver == "heun" and i < num_steps - 1:  # second-order correction (not at sigma = 0)
            denoised = denoise(x_next, t_next)
            d_prime = (x_next - denoised) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next.float()


def sample(precond, class_labels, seed=0, *, resolution=None, **sampler_kwargs):
    """Seeded sampling: draws the initial noise, then runs `edm_sampler`.

    Args:
        precond: EDMPrecond (in eval mode).
        class_labels: [B] int64 labels.
        seed: an int (one torch.Generator for the batch), a torch.Generator, or a sequence of B ints
            (per-sample seeds: sample i then depends only on seeds[i] and class_labels[i]). The same
            source also feeds churn noise when S_churn > 0.
        resolution: latent size, int (square) or (H, W); defaults to precond.net.input_size.
        **sampler_kwargs: passed to edm_sampler (num_steps, cfg_scale, solver, ...).
    Returns:
        [B, C, H, W] fp32.
    """
    B, device = class_labels.shape[0], class_labels.device
    if resolution is None:
        resolution = getattr(getattr(precond, "net", precond), "input_size", None)
        if resolution is None:
            raise ValueError("pass resolution= (the network has no input_size attribute)")
    h, w = (resolution, resolution) if isinstance(resolution, numbers.Integral) else tuple(resolution)
    shape = (B, precond.in_channels, h, w)
    if isinstance(seed, torch.Generator):
        gen = seed
    elif isinstance(seed, numbers.Integral):
        gen = torch.Generator(device).manual_seed(int(seed))
    else:
        seeds = list(seed)
        if len(seeds) != B:
            raise ValueError(f"{len(seeds)} seeds for {B} labels")
        rnd = StackedRandomGenerator(device, seeds)
        return edm_sampler(precond, rnd.randn(shape, device=device), class_labels,
                           randn_like=rnd.randn_like, **sampler_kwargs)
    latents = torch.randn(shape, generator=gen, device=device)

    def randn_like(x):
        return torch.randn(x.shape, generator=gen, dtype=x.dtype, device=x.device)

    return edm_sampler(precond, latents, class_labels, randn_like=randn_like, **sampler_kwargs)
