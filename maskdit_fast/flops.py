"""Analytic forward/training cost of DiT and MaskDiT, in the DiT paper's convention.

DiT reports "GFLOPs" that are really multiply-accumulates (fvcore style): every matmul, linear
and convolution counts M*N*K, attention's q.k^T and attn.v products included, biases and
element-wise ops (activations, softmax, modulation, residuals) not. Each LayerNorm adds one op per
normalised element: with that term this counter reproduces every entry of the DiT paper's table
at 256 px (S/2 6.06, B/2 23.01, L/2 80.71, XL/2 118.64, XL/4 29.05, ...) to the printed digit,
without it L/2 and XL/2 come out 0.01-0.02 low. (fvcore 0.1.5 itself counts 4 per element,
which gives 118.69 for XL/2.) Divide `total` by 1e9 for the paper's "GFLOPs".

MaskDiT-XL/2 at 256 px: 125.8 G unmasked; 65.5 G at mask ratio 0.5 (58.4 encoder + 7.1 decoder).
"""
import inspect

import torch

from maskdit_fast.masking import num_kept
from maskdit_fast.models import MODEL_CLASSES, MaskDiT, model_config

_FREQ_DIM = 256  # sinusoidal time-embedding width (TimestepEmbedder)


def _resolve(name_or_model, input_size, in_channels):
    """(class, architecture kwargs) for a preset name or a built model."""
    if isinstance(name_or_model, str):
        overrides = {k: v for k, v in (("input_size", input_size), ("in_channels", in_channels)) if v is not None}
        cls, cfg = model_config(name_or_model, **overrides)
        defaults = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()
                    if p.default is not inspect.Parameter.empty}
        return cls, {**defaults, **cfg}
    # torch.compile and DDP wrappers hold the model as `_orig_mod` / `module`
    while isinstance(getattr(name_or_model, "_orig_mod", getattr(name_or_model, "module", None)), torch.nn.Module):
        name_or_model = getattr(name_or_model, "_orig_mod", None) or name_or_model.module
    if isinstance(name_or_model, tuple(MODEL_CLASSES.values())):
        cfg = dict(name_or_model.config)
        if in_channels is not None and in_channels != cfg["in_channels"]:
            raise ValueError(f"in_channels={in_channels} differs from the model's {cfg['in_channels']}")
        if input_size is not None:  # the same weights at another size (MaskDiT's mixed resolutions)
            if any(s % cfg["patch_size"] for s in _as_hw(input_size)):
                raise ValueError(f"input_size={input_size} is not a multiple of the patch size {cfg['patch_size']}")
            cfg["input_size"] = input_size
        return type(name_or_model), cfg
    raise TypeError(f"expected a preset name or a DiT/MaskDiT model, got {type(name_or_model).__name__}")


def _as_hw(size):
    return (size, size) if isinstance(size, int) else tuple(size)


def _block_macs(tokens, width, cond_width, mlp_ratio):
    """(total, attention part) MACs of one DiT block on `tokens` tokens, per sample."""
    hidden = int(width * mlp_ratio)
    linear = tokens * width * (3 * width + width + 2 * hidden)  # qkv, proj, fc1, fc2
    attention = 2 * tokens * tokens * width                     # q.k^T and attn.v over all heads
    adaln = cond_width * 6 * width                              # once per sample
    norms = 2 * tokens * width
    return linear + attention + adaln + norms, attention, norms


def model_flops(name_or_model, input_size=None, in_channels=None, mask_ratio=0.0, batch=1):
    """Forward multiply-accumulates (DiT's "FLOPs") of DiT / MaskDiT, analytically.

    Args:
        name_or_model: a preset name ("DiT-XL/2", "MaskDiT-B/4", ...) or a built DiT/MaskDiT
            (also inside torch.compile / DDP wrappers).
        input_size: latent size (int or (H, W)); None = the preset's 32 or the model's own (a built
            model at another size: its weights applied there, e.g. MaskDiT's mixed resolutions).
        in_channels: latent channels; None = the preset's 4 or the model's own.
        mask_ratio: MaskDiT's fraction of masked tokens in [0, 1) (encoder runs on the rest);
            must be 0 for DiT.
        batch: samples per forward (everything scales linearly).
    Returns:
        dict of ints (MACs for `batch` samples):
            total = encoder + decoder + other;
            encoder: the encoder blocks (their attention products included);
            decoder: MaskDiT's decoder layer and blocks (0 for DiT);
            other: patch embedding, time/label embedders, final layer;
            attention: the q.k^T and attn.v products of all blocks (part of encoder/decoder);
            norm: the LayerNorm element counts (part of the above; 2 x (total - norm) is what
                torch's FlopCounterMode reports for the same forward);
            encoder_tokens, decoder_tokens: tokens per sample seen by encoder / decoder.
    """
    cls, cfg = _resolve(name_or_model, input_size, in_channels)
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    h, w = _as_hw(cfg["input_size"])
    p, c_in, width = cfg["patch_size"], cfg["in_channels"], cfg["hidden_size"]
    c_out = 2 * c_in if cfg["learn_sigma"] else c_in
    length = (h // p) * (w // p)
    is_maskdit = issubclass(cls, MaskDiT)
    kept = num_kept(length, mask_ratio)
    if not is_maskdit and kept != length:
        raise ValueError("DiT does not mask tokens: mask_ratio must be 0")

    block, attn, norm = _block_macs(kept, width, width, cfg["mlp_ratio"])
    encoder, attention, norms = cfg["depth"] * block, cfg["depth"] * attn, cfg["depth"] * norm

    other = length * c_in * p * p * width                    # patch embedding (conv)
    other += _FREQ_DIM * width + width * width               # time-embedding MLP
    final_width = width
    decoder = 0
    if is_maskdit:
        other += cfg["num_classes"] * width                  # one-hot label Linear
        dec_width = cfg["decoder_hidden_size"]
        decoder = kept * width * dec_width + width * 2 * width + kept * width  # decoder layer
        norms += kept * width
        block, attn, norm = _block_macs(length, dec_width, width, cfg["mlp_ratio"])
        decoder += cfg["decoder_depth"] * block
        attention += cfg["decoder_depth"] * attn
        norms += cfg["decoder_depth"] * norm
        final_width = dec_width
    other += width * 2 * final_width + length * final_width * p * p * c_out + length * final_width  # final layer
    norms += length * final_width

    out = dict(encoder=encoder, decoder=decoder, other=other, attention=attention, norm=norms)
    out = {k: v * batch for k, v in out.items()}
    out["total"] = out["encoder"] + out["decoder"] + out["other"]
    out.update(encoder_tokens=kept, decoder_tokens=length if is_maskdit else 0)
    return out


def train_step_flops(name_or_model, input_size=None, in_channels=None, mask_ratio=0.0, batch=1):
    """Real floating-point operations of one training step (forward + backward), estimated.

    = 3 x forward (the backward of a matmul costs two matmuls: input and weight gradients)
    x 2 FLOPs per multiply-accumulate, from `model_flops(...)["total"]`; optimizer, loss and
    element-wise work are not counted. Use it for MFU: train_step_flops / step time / peak FLOP/s.
    Arguments as `model_flops`. Returns an int.
    """
    return 6 * model_flops(name_or_model, input_size, in_channels, mask_ratio, batch)["total"]
