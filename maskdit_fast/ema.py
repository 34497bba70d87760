"""Exponential moving average of model weights."""
import copy

import torch


def ema_decay(step, decay, warmup=True):
    """Decay used at optimizer step `step` (0-based): `decay`, or with warm-up
    min(decay, (1 + step) / (10 + step)) so early averages are not dominated by the random init."""
    return min(decay, (1 + step) / (10 + step)) if warmup else decay


def create_ema(model):
    """A frozen deep copy of `model` in eval mode, holding the averaged weights."""
    ema = copy.deepcopy(model).eval()
    ema.requires_grad_(False)
    return ema


@torch.no_grad()
def update_ema(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model, for parameters and floating buffers alike
    (the two modules must have the same structure)."""
    ema_t = [t for t in list(ema.parameters()) + list(ema.buffers()) if t.is_floating_point()]
    model_t = [t for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point()]
    if len(ema_t) != len(model_t):
        raise RuntimeError(f"EMA and model differ in structure ({len(ema_t)} vs {len(model_t)} float tensors)")
    torch._foreach_lerp_(ema_t, [t.detach() for t in model_t], 1.0 - decay)
