"""Official DiT / MaskDiT checkpoints -> our models: `from_official(state_dict, kind="maskdit" | "dit")`.

Our parameter names are the official ones (facebookresearch/DiT models.py, Anima-Lab/MaskDiT
models/maskdit.py with `use_decoder=True`), so conversion is unwrapping the state dict (training
checkpoint entries, DDP / EDMPrecond / torch.compile prefixes) and reading the architecture off the
tensor shapes; the weights load unchanged (`load_state_dict(strict=True)`).
"""
import math
import re

import torch
import torch.nn as nn

from maskdit_fast.models import SIZES, DiT, MaskDiT

_WRAPPER_PREFIXES = ("module.", "model.", "_orig_mod.")
# Parts of the official MaskDiT code that its released configuration leaves off (pad_cls_token,
# external / encoder features): not implemented here.
_UNSUPPORTED_KEYS = ("cls_token", "feat_embedder.", "cls_token_embedder.", "enc_feat_embedder.")


def _unwrap_state_dict(state_dict, which):
    """Picks the weights out of a training checkpoint and strips wrapper prefixes."""
    entries = [k for k in ("ema", "model", "net") if isinstance(state_dict.get(k), (dict, nn.Module))]
    if entries:
        if which is None:
            which = entries[0]  # "ema" first: the weights the official code samples with
        if which not in entries:
            raise KeyError(f"checkpoint has no {which!r} entry (has {entries})")
        state_dict = state_dict[which]
        if isinstance(state_dict, nn.Module):
            state_dict = state_dict.state_dict()
    elif which is not None:
        raise KeyError(f"which={which!r} given but the dict has no 'ema'/'model'/'net' entry")
    state_dict = {k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if state_dict and all(k.startswith(prefix) for k in state_dict):
                state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
                stripped = True
    return state_dict


def _heads_for_width(width, role):
    for _, w, heads, _, dec_w, dec_heads in SIZES.values():
        if role == "encoder" and w == width:
            return heads
        if role == "decoder" and dec_w == width:
            return dec_heads
    raise ValueError(f"no preset has {role} width {width}: pass "
                     f"{'num_heads' if role == 'encoder' else 'decoder_num_heads'}= explicitly")


def _count_blocks(state_dict, prefix):
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    return len({m.group(1) for m in map(pattern.match, state_dict) if m})


def from_official(state_dict, kind="maskdit", which=None, **overrides):
    """Builds our model from an official DiT or MaskDiT checkpoint, inferring the architecture.

    Args:
        state_dict: an official state dict, possibly wrapped: keys prefixed by "model." (MaskDiT's
            EDMPrecond), "module." (DDP) or "_orig_mod." (torch.compile), or a training checkpoint
            dict with "ema" / "model" / "net" entries.
        kind: "maskdit" (Anima-Lab/MaskDiT, use_decoder=True) or "dit" (facebookresearch/DiT,
            label table with the extra null row).
        which: the checkpoint entry to load when there are several ("ema" by default).
        overrides: constructor kwargs that cannot be inferred: num_heads / decoder_num_heads (default:
            the preset of that width), input_size for non-square grids, backend, check_inputs.
    Returns:
        DiT or MaskDiT (fp32, CPU) holding those weights; depth, widths, patch size, channels,
        classes, input size (from the pos-embed length) and learn_sigma come from the tensors.
        A MaskDiT checkpoint trained without the MAE loss has no mask token: it is set to zeros,
        which is what the official code uses then.
    """
    if kind not in ("maskdit", "dit"):
        raise ValueError(f"kind must be 'maskdit' or 'dit', got {kind!r}")
    sd = _unwrap_state_dict(state_dict, which)
    unsupported = sorted(k for k in sd if k.startswith(_UNSUPPORTED_KEYS))
    if unsupported:
        raise ValueError(f"unsupported official options in checkpoint (keys {unsupported[:4]})")
    try:
        proj = sd["x_embedder.proj.weight"]  # [D, C, p, p]
        hidden, in_channels, patch = proj.shape[0], proj.shape[1], proj.shape[2]
        num_patches = sd["pos_embed"].shape[-2]
        out_dim = sd["final_layer.linear.weight"].shape[0]
        mlp_hidden = sd["blocks.0.mlp.fc1.weight"].shape[0]
    except KeyError as err:
        raise ValueError(f"not an official {kind} state dict: missing {err}") from None
    grid = math.isqrt(num_patches)
    config = dict(patch_size=patch, in_channels=in_channels, hidden_size=hidden,
                  depth=_count_blocks(sd, "blocks"), mlp_ratio=mlp_hidden / hidden,
                  learn_sigma=out_dim == 2 * patch * patch * in_channels)
    if grid * grid == num_patches:
        config["input_size"] = grid * patch
    if kind == "dit":
        cls = DiT
        config["num_classes"] = sd["y_embedder.embedding_table.weight"].shape[0] - 1
    else:
        cls = MaskDiT
        if "decoder_layer.linear.weight" not in sd:
            raise ValueError("MaskDiT checkpoint without a decoder (use_decoder=False) is not supported")
        table = sd.get("y_embedder.embedding_table.weight")
        config["num_classes"] = 0 if table is None else table.shape[1]
        config["decoder_hidden_size"] = sd["decoder_layer.linear.weight"].shape[0]
        config["decoder_depth"] = _count_blocks(sd, "decoder_blocks")
        if "mask_token" not in sd:
            sd = dict(sd, mask_token=torch.zeros(1, 1, config["decoder_hidden_size"]))
    config.update(overrides)
    if "num_heads" not in config:
        config["num_heads"] = _heads_for_width(hidden, "encoder")
    if cls is MaskDiT and "decoder_num_heads" not in config:
        config["decoder_num_heads"] = _heads_for_width(config["decoder_hidden_size"], "decoder")
    model = cls(**config)
    model.load_state_dict(sd, strict=True)
    return model
