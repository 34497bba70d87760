"""DiT and MaskDiT in pure PyTorch.

DiT follows facebookresearch/DiT (models.py) and MaskDiT follows Anima-Lab/MaskDiT
(models/maskdit.py, the `use_decoder=True` configuration trained with the MAE loss), module for
module and parameter name for parameter name, so official checkpoints load with `from_official`.
The glue between the matmuls goes through `maskdit_fast.ops` (gather/scatter of kept tokens,
LayerNorm + adaLN modulation, gated residual, attention) so fused kernels can replace it; with the
"torch" back-end the forward is the official math op for op.

Call convention, shared by both models:

    out = model(x, t, y, mask_ratio=0.0, ids_keep=None)   # -> ModelOutput(sample, mask)

x [B, C, H, W]; t [B] (or a scalar) noise-level input (MaskDiT: the EDM c_noise = ln(sigma) / 4;
DiT: the timestep); y int64 [B] class ids in [0, num_classes], where `num_classes` is the null
class for classifier-free guidance (MaskDiT: an all-zero one-hot; DiT: the extra embedding row).
Label dropout is the trainer's job (replace labels by `model.null_class`). MaskDiT masks
int(L * (1 - mask_ratio)) random tokens per sample, or exactly the complement of `ids_keep`
[B, K]; `mask` [B, L] float is 1 for masked tokens, None when nothing was masked. Unlike the
official code, masking does not depend on train/eval mode: it happens whenever it is asked for.
Per-sample ratios (mask_ratio a [B] float tensor or list) or per-sample kept positions (ids_keep a
`maskdit_fast.masking.PackedMask` or a list of B 1-D tensors) run MaskDiT's packed (varlen) encoder,
and MaskDiT also takes mixed-resolution batches as lists with one entry per group (see MaskDiT.forward).

Presets, by name `"{DiT|MaskDiT}-{S|B|L|XL}/{2|4|8}"` (`create_model`):

    size  depth  width  heads | MaskDiT decoder: depth  width  heads  cost / encoder cost
    S     12     384    6     |                  4      160    5      5.8 %
    B     12     768    12    |                  4      320    10     5.8 %
    L     24     1024   16    |                  7      448    14     5.6 %
    XL    28     1152   16    |                  8      512    16     5.6 %   (official)

The official XL decoder (8 x 512) costs 8 * 512^2 / (28 * 1152^2) = 5.6 % of the encoder per
token (both scale as depth * width^2); the smaller decoders keep that fraction and the official
head width of 32, with depth about encoder depth / 3.5 (4 for 12-block encoders).
DiT presets default to learn_sigma=True (as the official DiT), MaskDiT to learn_sigma=False.
At 256 px (latent 4 x 32 x 32, 1000 classes): DiT-S/2 33M, B/2 130M, L/2 458M, XL/2 675M
parameters; MaskDiT-XL/2 730M (see `maskdit_fast.flops` for the forward cost).
"""
import inspect
import math
import numbers
import re
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from maskdit_fast import ops
from maskdit_fast.masking import (PackedMask, check_ids_keep, check_packed_mask, is_per_sample, keep_counts,
                                  mask_from_ids_keep, mask_from_packed, num_kept, pack_ids_keep, per_sample_ratios,
                                  random_masking_ids, random_masking_packed)


# Patch layout (DiT / MAE order: a patch's elements are ordered (row p, column q, channel c)).

def patchify(x, p):
    """[B, C, H, W] -> [B, L, p*p*C], L = (H/p)*(W/p) patches in row-major order; the inverse of
    DiT's unpatchify (einsum 'nchpwq->nhwpqc'). Keeps dtype."""
    if x.dim() != 4:
        raise ValueError(f"patchify expects [B, C, H, W], got shape {tuple(x.shape)}")
    B, C, H, W = x.shape
    if H % p or W % p:
        raise ValueError(f"image size {H}x{W} is not divisible by the patch size {p}")
    h, w = H // p, W // p
    x = x.reshape(B, C, h, p, w, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(B, h * w, p * p * C)


def unpatchify(x, p, height=None, width=None):
    """[B, L, p*p*C] -> [B, C, height, width] (the inverse of `patchify`). height/width default to a
    square image (L must then be a perfect square)."""
    if x.dim() != 3 or x.shape[-1] % (p * p):
        raise ValueError(f"unpatchify expects [B, L, p*p*C] with p={p}, got shape {tuple(x.shape)}")
    B, L, D = x.shape
    C = D // (p * p)
    if height is None and width is None:
        h = w = math.isqrt(L)
    else:
        if height is None or width is None or height % p or width % p:
            raise ValueError(f"height and width must both be given and divisible by p={p}")
        h, w = height // p, width // p
    if h * w != L:
        raise ValueError(f"{L} patches do not tile a {h * p}x{w * p} image with patch size {p}")
    x = x.reshape(B, h, w, p, p, C)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(B, C, h * p, w * p)


class ModelOutput(NamedTuple):
    """sample: [B, C_out, H, W] network output; mask: [B, L] float (1 = masked) or None."""
    sample: torch.Tensor
    mask: Optional[torch.Tensor]


class VarlenLayout(NamedTuple):
    """Where the rows of a packed token stream [1, T, D] belong (the varlen attention layout).

    cu_seqlens: [B+1] int32, sample b owning rows cu_seqlens[b]:cu_seqlens[b+1];
    max_seqlen: Python int, the longest sample; sample: [T] int64, the sample of each row.
    """
    cu_seqlens: torch.Tensor
    max_seqlen: int
    sample: torch.Tensor


def _modulation(adaLN_modulation, c, chunks, varlen=None):
    """adaLN_modulation(c) [B, chunks * D] split into `chunks` per-sample [B, D] vectors, or with a
    VarlenLayout per-token [1, T, D] ones (row t = its sample's vector; the Linear runs on B rows)."""
    mod = adaLN_modulation(c)
    if varlen is not None:
        mod = mod[varlen.sample].unsqueeze(0)
    return mod.chunk(chunks, dim=-1)


#################################################################################
#                   Sine/Cosine Positional Embedding (fixed)                    #
#################################################################################

def _sincos_1d(dim, pos):
    """[M] float64 positions -> [M, dim] embedding: sin of dim/2 frequencies, then cos (MAE)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    out = pos.reshape(-1, 1) * omega.reshape(1, -1)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def get_2d_sincos_pos_embed(embed_dim, grid_size):
    """Fixed 2-D sin-cos position embedding of MAE / DiT / MaskDiT.

    Args:
        embed_dim: D, divisible by 4.
        grid_size: int (square grid) or (grid_h, grid_w).
    Returns:
        [grid_h * grid_w, D] float32, tokens in row-major (h, w) order; the first D/2 channels
        encode the column (w) coordinate and the last D/2 the row, as the official code does.
    """
    if embed_dim % 4:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {embed_dim}")
    gh, gw = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    rows, cols = torch.meshgrid(torch.arange(gh, dtype=torch.float64),
                                torch.arange(gw, dtype=torch.float64), indexing="ij")
    emb = torch.cat([_sincos_1d(embed_dim // 2, cols), _sincos_1d(embed_dim // 2, rows)], dim=1)
    return emb.float()


#################################################################################
#               Embedding Layers for Patches, Timesteps and Class Labels        #
#################################################################################

class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> tokens: [B, C, H, W] -> [B, (H/p)(W/p), D] (row-major)."""

    def __init__(self, patch_size, in_channels, hidden_size):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """Scalar noise levels [B] -> [B, D]: 256-frequency sinusoidal embedding (fp32), then an MLP."""

    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t, dim, max_period=10000):
        """t [B] (fractional ok) -> [B, dim] float32: cos of dim/2 frequencies, then sin (GLIDE)."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t):
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)
        # The cast is a no-op in fp32 and lets a model cast to bf16/fp16 run without autocast.
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """DiT's class embedding: a table with num_classes + 1 rows, the last being the CFG null class.
    y int64 [B] in [0, num_classes] -> [B, D]."""

    def __init__(self, num_classes, hidden_size):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, y):
        return self.embedding_table(y)


class OneHotLabelEmbedder(nn.Module):
    """MaskDiT's class embedding: one-hot labels through Linear(num_classes -> D, bias=False), so
    the null class is the all-zero vector. y int64 [B] in [0, num_classes] -> [B, D]."""

    def __init__(self, num_classes, hidden_size):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Linear(num_classes, hidden_size, bias=False)

    def forward(self, y):
        # One extra column for the null class, then dropped: y == num_classes gives all zeros.
        one_hot = F.one_hot(y, self.num_classes + 1)[:, :self.num_classes]
        return self.embedding_table(one_hot.to(self.embedding_table.weight.dtype))


#################################################################################
#                                 Core DiT Blocks                               #
#################################################################################

class Attention(nn.Module):
    """Multi-head self-attention (timm layout): qkv Linear -> [B, L, 3, H, Dh] -> attention -> proj."""

    def __init__(self, dim, num_heads):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x, backend=None, varlen=None):
        """x [B, L, D] -> [B, L, D]; with a VarlenLayout, x is the packed stream [1, T, D] and each
        sample attends only within its own rows."""
        B, L, D = x.shape
        if varlen is not None:
            qkv = self.qkv(x).reshape(L, 3, self.num_heads, D // self.num_heads)
            # the model built cu_seqlens from packs it drew or checked itself: no value check (a device sync)
            out = ops.varlen_attention_qkvpacked(qkv, varlen.cu_seqlens, varlen.max_seqlen, backend=backend,
                                                 validate=False)
            return self.proj(out.reshape(B, L, D))
        # qkv-packed: the backward writes one [B, L, 3, H, Dh] gradient instead of three slices
        qkv = self.qkv(x).reshape(B, L, 3, self.num_heads, D // self.num_heads)
        out = ops.attention_qkvpacked(qkv, backend=backend)  # [B, L, H, Dh], scale Dh ** -0.5
        return self.proj(out.reshape(B, L, D))


class Mlp(nn.Module):
    """fc1 -> GELU (tanh approximation) -> fc2, as DiT's timm Mlp."""

    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim, bias=True)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, dim, bias=True)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """A DiT block with adaLN-Zero conditioning. x [B, L, D], c [B, D_c] -> [B, L, D]; with a
    VarlenLayout, x is a packed stream [1, T, D] (per-token conditioning, varlen attention).

    D_c (the conditioning width) differs from D in MaskDiT's decoder blocks, which are still
    conditioned on the encoder-width vector c.
    """

    def __init__(self, hidden_size, cond_size, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.attn = Attention(hidden_size, num_heads)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_size, 6 * hidden_size, bias=True))

    def forward(self, x, c, backend=None, varlen=None):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = _modulation(self.adaLN_modulation, c, 6,
                                                                                      varlen)
        h = ops.layernorm_modulate(x, shift_msa, scale_msa, backend=backend)
        x = ops.gated_residual(x, self.attn(h, backend=backend, varlen=varlen), gate_msa, backend=backend)
        h = ops.layernorm_modulate(x, shift_mlp, scale_mlp, backend=backend)
        return ops.gated_residual(x, self.mlp(h), gate_mlp, backend=backend)


class DecoderLayer(nn.Module):
    """MaskDiT's bridge from encoder to decoder width: LayerNorm + adaLN shift/scale (encoder
    width) + Linear. x [B, K, D] -> [B, K, D_dec] (or packed [1, T, D] with a VarlenLayout)."""

    def __init__(self, hidden_size, decoder_hidden_size):
        super().__init__()
        self.linear = nn.Linear(hidden_size, decoder_hidden_size, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x, c, backend=None, varlen=None):
        shift, scale = _modulation(self.adaLN_modulation, c, 2, varlen)
        return self.linear(ops.layernorm_modulate(x, shift, scale, backend=backend))


class FinalLayer(nn.Module):
    """LayerNorm + adaLN shift/scale + Linear to patch values. x [B, L, D] -> [B, L, p*p*C_out]."""

    def __init__(self, hidden_size, cond_size, patch_size, out_channels):
        super().__init__()
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_size, 2 * hidden_size, bias=True))

    def forward(self, x, c, backend=None):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(ops.layernorm_modulate(x, shift, scale, backend=backend))


#################################################################################
#                                 Core Models                                   #
#################################################################################

def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class _DiffusionTransformer(nn.Module):
    """What DiT and MaskDiT share: patch/time embedders, the fixed pos-embed, the encoder blocks,
    input checks, conditioning and unpatchify. Subclasses add the label embedder and the head."""

    def __init__(self, input_size, patch_size, in_channels, hidden_size, depth, num_heads, mlp_ratio,
                 num_classes, learn_sigma, backend, check_inputs):
        super().__init__()
        size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        if len(size) != 2:
            raise ValueError(f"input_size must be an int or (H, W), got {input_size!r}")
        for name, value in [("input_size", size[0]), ("input_size", size[1]), ("patch_size", patch_size),
                            ("in_channels", in_channels), ("hidden_size", hidden_size), ("depth", depth),
                            ("num_heads", num_heads)]:
            _positive_int(name, value)
        if size[0] % patch_size or size[1] % patch_size:
            raise ValueError(f"input_size {size} is not divisible by patch_size {patch_size}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0, got {num_classes!r}")
        self.input_size = size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.learn_sigma = learn_sigma
        self.hidden_size = hidden_size
        self.depth = depth
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.num_classes = num_classes
        self.grid_size = (size[0] // patch_size, size[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.backend = backend
        self.check_inputs = check_inputs

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        # Fixed, so a buffer; the official code's frozen nn.Parameter has the same state_dict key.
        self.register_buffer("pos_embed", get_2d_sincos_pos_embed(hidden_size, self.grid_size)[None])
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, hidden_size, num_heads, mlp_ratio) for _ in range(depth)])

    @property
    def null_class(self):
        """The label meaning "no class" (classifier-free guidance): num_classes."""
        return self.num_classes

    def _init_weights(self):
        """The official initialisation: xavier-uniform Linear layers (and the patch projection,
        seen as a Linear), zero biases, N(0, 0.02) label table and time MLP, and zeros for every
        adaLN modulation layer and the final linear (adaLN-Zero: each block starts as identity)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for module in self.modules():
            if isinstance(module, (DiTBlock, DecoderLayer, FinalLayer)):
                nn.init.zeros_(module.adaLN_modulation[-1].weight)
                nn.init.zeros_(module.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def _checked_inputs(self, x, t, y, any_size=False):
        """Validates x [B, C, H, W], t [B] or scalar, y int [B] (None = null class) and returns
        (t [B], y [B]). H, W must be the model's input_size, or with any_size multiples of the patch
        size. Value checks on y need a host sync and are skipped under torch.compile or with
        check_inputs=False."""
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"x must be a [B, C, H, W] tensor, got {getattr(x, 'shape', type(x).__name__)}")
        B, C, H, W = x.shape
        if C != self.in_channels:
            raise ValueError(f"x has {C} channels, the model expects in_channels={self.in_channels}")
        if any_size:
            if H % self.patch_size or W % self.patch_size or not H or not W:
                raise ValueError(f"x is {H}x{W}, not a positive multiple of patch_size={self.patch_size}")
        elif (H, W) != self.input_size:
            raise ValueError(f"x is {H}x{W}, the model expects input_size={self.input_size} (H, W)")
        t = torch.as_tensor(t, device=x.device)
        if t.dim() == 0:
            t = t.expand(B)
        if t.shape != (B,) or t.dtype == torch.bool or t.is_complex():
            raise ValueError(f"t must be a real tensor of shape [B={B}] or a scalar, got {t.dtype} {list(t.shape)}")
        if y is None:
            return t, torch.full((B,), self.null_class, dtype=torch.int64, device=x.device)
        if not isinstance(y, torch.Tensor) or y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError(f"y must be an integer tensor of class ids, got {getattr(y, 'dtype', type(y).__name__)}")
        if y.shape != (B,):
            raise ValueError(f"y must have shape [B={B}], got {list(y.shape)}")
        if self.check_inputs and not torch.compiler.is_compiling():
            if bool(((y < 0) | (y > self.num_classes)).any()):
                raise ValueError(f"class labels must be in [0, num_classes={self.num_classes}] "
                                 f"({self.num_classes} = null class)")
        return t, y.long()

    def _condition(self, t, y):
        """c = t_emb + y_emb, [B, D]."""
        c = self.t_embedder(t)
        return c if self.y_embedder is None else c + self.y_embedder(y)

    def unpatchify(self, x, grid_size=None):
        """[B, L, p*p*C_out] -> [B, C_out, H, W] (inverse of the patch embedding's layout), on the
        (h, w) token grid `grid_size` (default: the model's own)."""
        h, w = grid_size or self.grid_size
        return unpatchify(x, self.patch_size, h * self.patch_size, w * self.patch_size)

    def _encode(self, tokens, c, varlen=None):
        for block in self.blocks:
            tokens = block(tokens, c, backend=self.backend, varlen=varlen)
        return tokens


class DiT(_DiffusionTransformer):
    """Diffusion transformer of Peebles & Xie (facebookresearch/DiT), all tokens, no masking.

    Args:
        input_size: latent H = W (int) or (H, W); divisible by patch_size.
        patch_size, in_channels, hidden_size, depth, num_heads, mlp_ratio: architecture.
        num_classes: classes; the label table has one extra (null) row. 0 = unconditional.
        learn_sigma: output 2 * in_channels channels (epsilon and variance), as the official DiT.
        backend: op back-end for every `maskdit_fast.ops` call (None = global switch).
        check_inputs: check label values (a host sync) in forward.
    """

    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                 mlp_ratio=4.0, num_classes=1000, learn_sigma=True, backend=None, check_inputs=True):
        super().__init__(input_size, patch_size, in_channels, hidden_size, depth, num_heads, mlp_ratio,
                         num_classes, learn_sigma, backend, check_inputs)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size)
        self.final_layer = FinalLayer(hidden_size, hidden_size, patch_size, self.out_channels)
        self._init_weights()

    @property
    def config(self):
        """Constructor kwargs (without backend/check_inputs) that rebuild this architecture."""
        return dict(input_size=self.input_size, patch_size=self.patch_size, in_channels=self.in_channels,
                    hidden_size=self.hidden_size, depth=self.depth, num_heads=self.num_heads,
                    mlp_ratio=self.mlp_ratio, num_classes=self.num_classes, learn_sigma=self.learn_sigma)

    def forward(self, x, t, y, mask_ratio=0.0, ids_keep=None):
        """x [B, C, H, W], t [B] timesteps, y int64 [B] in [0, num_classes] (None = null) ->
        ModelOutput(sample [B, C_out, H, W], mask None). DiT does not mask: mask_ratio must be 0
        and ids_keep None."""
        if ids_keep is not None or not isinstance(mask_ratio, numbers.Real) or mask_ratio != 0:
            raise ValueError("DiT processes all tokens: use MaskDiT for mask_ratio > 0 / ids_keep")
        t, y = self._checked_inputs(x, t, y)
        c = self._condition(t, y)
        tokens = self._encode(self.x_embedder(x) + self.pos_embed, c)
        return ModelOutput(self.unpatchify(self.final_layer(tokens, c, backend=self.backend)), None)


class MaskDiT(_DiffusionTransformer):
    """MaskDiT (Zheng et al., Anima-Lab/MaskDiT): a DiT encoder on the kept tokens only, then a
    light DiT decoder on all tokens, masked ones filled with a learned mask token.

    Two encoder layouts:
      dense   (the official one) every sample keeps the same count K: the encoder runs on [B, K, D];
      packed  (varlen) per-sample keep counts: the kept tokens of all samples form one stream
              [1, T, D] with cu_seqlens, the adaLN vectors are indexed by each token's sample and
              attention is varlen (no padding). Used by `forward` when mask_ratio holds per-sample
              ratios or ids_keep is a PackedMask / list of per-sample positions, or when x is a
              list of groups (batches of several resolutions at once). The decoder always runs
              dense on each sample's full grid. With equal keep counts both layouts
              compute the same function (up to float rounding).

    Args (beyond DiT's):
        decoder_depth, decoder_hidden_size, decoder_num_heads: the decoder (official XL: 8, 512, 16).
        zero_init_decoder_input: the official zero init of the decoder's input linear, so the decoder
            starts blind to the encoder; False gives it xavier-uniform like the other linears. Short
            runs need False: on the MNIST default run the zero init stalled learning for hundreds of
            steps (benchmarks/results/recipe_search/).
        learn_sigma: default False (EDM needs a single output).
        check_inputs: as DiT's, and also the ids_keep values (range, duplicates).
    """

    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                 mlp_ratio=4.0, num_classes=1000, learn_sigma=False, decoder_depth=8, decoder_hidden_size=512,
                 decoder_num_heads=16, zero_init_decoder_input=True, backend=None, check_inputs=True):
        super().__init__(input_size, patch_size, in_channels, hidden_size, depth, num_heads, mlp_ratio,
                         num_classes, learn_sigma, backend, check_inputs)
        for name, value in [("decoder_depth", decoder_depth), ("decoder_hidden_size", decoder_hidden_size),
                            ("decoder_num_heads", decoder_num_heads)]:
            _positive_int(name, value)
        self.decoder_depth = decoder_depth
        self.decoder_hidden_size = decoder_hidden_size
        self.decoder_num_heads = decoder_num_heads
        self.zero_init_decoder_input = bool(zero_init_decoder_input)
        self.y_embedder = OneHotLabelEmbedder(num_classes, hidden_size) if num_classes else None
        self.decoder_layer = DecoderLayer(hidden_size, decoder_hidden_size)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_hidden_size))
        self.register_buffer("decoder_pos_embed",
                             get_2d_sincos_pos_embed(decoder_hidden_size, self.grid_size)[None])
        self.decoder_blocks = nn.ModuleList([
            DiTBlock(decoder_hidden_size, hidden_size, decoder_num_heads, mlp_ratio) for _ in range(decoder_depth)
        ])
        self.final_layer = FinalLayer(decoder_hidden_size, hidden_size, patch_size, self.out_channels)
        self._pos_embed_cache = {}  # (h, w) token grid -> (pos_embed, decoder_pos_embed) for other grids
        self._init_weights()

    def _apply(self, fn, *args, **kwargs):
        self._pos_embed_cache.clear()  # .to() / .half() etc.: rebuild on the new device and dtype
        return super()._apply(fn, *args, **kwargs)

    def pos_embeds(self, grid_size):
        """Fixed sin-cos position embeddings (encoder [L, D], decoder [L, D_dec]) for an (h, w) token
        grid, in the buffers' device and dtype: the buffers themselves for the model's own grid,
        otherwise computed once per grid and cached."""
        grid_size = tuple(grid_size)
        if grid_size == self.grid_size:
            return self.pos_embed[0], self.decoder_pos_embed[0]
        if grid_size not in self._pos_embed_cache:
            self._pos_embed_cache[grid_size] = tuple(
                get_2d_sincos_pos_embed(width, grid_size).to(buffer)
                for width, buffer in ((self.hidden_size, self.pos_embed), (self.decoder_hidden_size,
                                                                           self.decoder_pos_embed)))
        return self._pos_embed_cache[grid_size]

    def _init_weights(self):
        """Official init plus the decoder's: N(0, 0.02) mask token, zero decoder input linear (or
        xavier-uniform without zero_init_decoder_input)."""
        super()._init_weights()
        nn.init.normal_(self.mask_token, std=0.02)
        if self.zero_init_decoder_input:
            nn.init.zeros_(self.decoder_layer.linear.weight)
        nn.init.zeros_(self.decoder_layer.linear.bias)

    @property
    def config(self):
        """Constructor kwargs (without backend/check_inputs) that rebuild this architecture."""
        return dict(input_size=self.input_size, patch_size=self.patch_size, in_channels=self.in_channels,
                    hidden_size=self.hidden_size, depth=self.depth, num_heads=self.num_heads,
                    mlp_ratio=self.mlp_ratio, num_classes=self.num_classes, learn_sigma=self.learn_sigma,
                    decoder_depth=self.decoder_depth, decoder_hidden_size=self.decoder_hidden_size,
                    decoder_num_heads=self.decoder_num_heads, zero_init_decoder_input=self.zero_init_decoder_input)

    def forward(self, x, t, y, mask_ratio=0.0, ids_keep=None):
        """MaskDiT forward, on one batch or on G groups of samples of their own resolutions.

        One batch (x a tensor):
            x: [B, C, H, W] (EDM: c_in * noisy latent), H, W = input_size.
            t: [B] or scalar, the EDM c_noise.
            y: int64 [B] class ids in [0, num_classes] (num_classes = null), or None (all null).
            mask_ratio: fraction of tokens masked at random, in [0, 1); or B per-sample ratios
                (1-D float tensor, list or tuple: the packed path, sample b keeping
                int(L * (1 - mask_ratio[b])) tokens). Ignored when ids_keep is given (it must then
                be 0 or give the same keep counts).
            ids_keep: optional kept positions (fixes the mask): [B, K] int64 (dense path), or a
                PackedMask / list of B 1-D int64 tensors (per-sample counts; the packed path).
            Returns ModelOutput(sample [B, C_out, H, W] for all tokens, mask [B, L] float 1 = masked,
            or None when the dense path masked nothing; the packed path always returns the mask).

        G groups (x a list; the packed path): the encoder runs once on the kept tokens of all groups
        packed into one stream [1, T, D] (per-sample keep counts, per-resolution position
        embeddings, attention within each sample); the decoder then runs dense on each group's full
        grid. Samples of any resolution (multiples of patch_size; see `pos_embeds`) can share one
        encoder pass. Going through forward (not a side method) keeps DDP's gradient sync and
        FSDP's parameter gathering, which hook the module's call.
            x: list of G tensors [B_g, C, H_g, W_g].
            t: list of G noise-level inputs, [B_g] or scalars.
            y: list of G int64 label tensors [B_g] (or None entries: null class), or None.
            mask_ratio: a number for every sample, or a list of G entries, each a number or B_g
                per-sample ratios (1-D float tensor, list or tuple), in [0, 1). Sample b of a group
                with L_g tokens keeps int(L_g * (1 - ratio_b)) of them, drawn at random (global RNG,
                the same draw as the dense path); all-kept groups draw nothing.
            ids_keep: None, or a list of G entries, each None (random, from mask_ratio), a
                PackedMask, a [B_g, K] int64 tensor or a list of B_g 1-D int64 tensors of kept
                positions. With ids_keep given, the group's mask_ratio must be 0 or give the same
                keep counts.
            Returns a list of G ModelOutput(sample [B_g, C_out, H_g, W_g], mask [B_g, L_g] float,
            1 = masked).
        """
        if isinstance(x, (list, tuple)) or isinstance(t, (list, tuple)):  # groups (checked there)
            return self._forward_packed(x, t, y, mask_ratio, ids_keep, any_size=True)
        if is_per_sample(mask_ratio) or isinstance(ids_keep, (PackedMask, list, tuple)):
            return self._forward_packed([x], [t], [y], [mask_ratio], [ids_keep], any_size=False)[0]
        t, y = self._checked_inputs(x, t, y)
        B, L = x.shape[0], self.num_patches
        len_keep = num_kept(L, mask_ratio)
        mask = None
        if ids_keep is not None:
            check_ids_keep(ids_keep, B, L, check_values=self.check_inputs and not torch.compiler.is_compiling())
            if ids_keep.device != x.device:
                raise ValueError(f"ids_keep is on {ids_keep.device} but x is on {x.device}")
            if mask_ratio != 0 and ids_keep.shape[1] != len_keep:
                raise ValueError(f"ids_keep keeps {ids_keep.shape[1]} tokens but mask_ratio={mask_ratio} "
                                 f"keeps {len_keep} of {L}")
            if ids_keep.shape[1] < L:
                mask = mask_from_ids_keep(ids_keep, L)
        elif len_keep < L:
            ids_keep, _, mask = random_masking_ids(B, L, mask_ratio, device=x.device)

        c = self._condition(t, y)
        tokens = self.x_embedder(x)
        if ids_keep is None:
            tokens = tokens + self.pos_embed
        else:  # pos-embed added before masking, then only the kept tokens enter the encoder
            # ids were drawn here or checked by check_ids_keep: skip the op's own (syncing) check
            tokens = ops.gather_tokens(tokens, ids_keep, self.pos_embed, backend=self.backend, validate=False)
        tokens = self._encode(tokens, c)

        tokens = self.decoder_layer(tokens, c, backend=self.backend)
        if ids_keep is None:
            tokens = tokens + self.decoder_pos_embed
        else:  # mask token at masked positions, unshuffle, decoder pos-embed
            tokens = ops.scatter_tokens(tokens, ids_keep, self.mask_token, L, self.decoder_pos_embed,
                                        backend=self.backend, validate=False)
        for block in self.decoder_blocks:
            tokens = block(tokens, c, backend=self.backend)
        sample = self.unpatchify(self.final_layer(tokens, c, backend=self.backend))
        return ModelOutput(sample, mask)

    def _forward_packed(self, x, t, y, mask_ratio, ids_keep, any_size):
        x = self._group_list("x", x, None)
        G = len(x)
        t = self._group_list("t", t, G)
        y = [None] * G if y is None else self._group_list("y", y, G)
        ratios = self._group_list("mask_ratio", mask_ratio, G) if isinstance(mask_ratio, (list, tuple)) \
            else [mask_ratio] * G
        ids_keep = [None] * G if ids_keep is None else self._group_list("ids_keep", ids_keep, G)
        check_values = self.check_inputs and not torch.compiler.is_compiling()

        groups, streams, cond_t, cond_y = [], [], [], []
        for g in range(G):
            if x[g].device != x[0].device:
                raise ValueError(f"x[{g}] is on {x[g].device} but x[0] on {x[0].device}")
            tg, yg = self._checked_inputs(x[g], t[g], y[g], any_size)
            B, (H, W) = x[g].shape[0], x[g].shape[2:]
            grid = (H // self.patch_size, W // self.patch_size)
            L = grid[0] * grid[1]
            packed = self._group_mask(ids_keep[g], ratios[g], B, L, x[g].device, check_values, g)
            pos, dec_pos = self.pos_embeds(grid)
            streams.append(ops.gather_tokens_varlen(self.x_embedder(x[g]), packed.ids, packed.cu_seqlens, pos,
                                                    backend=self.backend, validate=False))
            groups.append((packed, grid, dec_pos))
            cond_t.append(tg)
            cond_y.append(yg)

        c = self._condition(torch.cat(cond_t), torch.cat(cond_y))
        varlen = self._varlen_layout([packed for packed, _, _ in groups])
        tokens = streams[0] if G == 1 else torch.cat(streams)
        tokens = self._encode(tokens.unsqueeze(0), c, varlen)
        tokens = self.decoder_layer(tokens, c, backend=self.backend, varlen=varlen)[0]

        outputs, row, first = [], 0, 0
        for packed, grid, dec_pos in groups:
            B, T = packed.batch_size, packed.ids.numel()
            h = ops.scatter_tokens_varlen(tokens[row:row + T], packed.ids, packed.cu_seqlens, self.mask_token,
                                          grid[0] * grid[1], dec_pos, backend=self.backend, validate=False)
            cg = c[first:first + B]
            for block in self.decoder_blocks:
                h = block(h, cg, backend=self.backend)
            sample = self.unpatchify(self.final_layer(h, cg, backend=self.backend), grid)
            outputs.append(ModelOutput(sample, mask_from_packed(packed, grid[0] * grid[1])))
            row, first = row + T, first + B
        return outputs

    @staticmethod
    def _group_list(name, value, groups):
        if not isinstance(value, (list, tuple)) or not value:
            raise TypeError(f"MaskDiT groups: {name} must be a non-empty list (one entry per group), "
                            f"got {type(value).__name__}")
        if groups is not None and len(value) != groups:
            raise ValueError(f"MaskDiT groups: {name} has {len(value)} entries for {groups} groups")
        return list(value)

    def _group_mask(self, ids_keep, mask_ratio, batch, length, device, check_values, g):
        """The PackedMask of group g: explicit (checked against mask_ratio), or drawn from mask_ratio."""
        ratios = per_sample_ratios(mask_ratio, batch)
        counts = keep_counts(length, ratios)
        if ids_keep is None:
            if min(counts) == length:  # nothing masked: keep every token in order, no random draw
                return pack_ids_keep(torch.arange(length, device=device).expand(batch, length))
            return random_masking_packed(ratios, length, device=device)[0]
        packed = ids_keep if isinstance(ids_keep, PackedMask) else pack_ids_keep(ids_keep)
        if isinstance(packed.ids, torch.Tensor) and packed.ids.device != device:
            raise ValueError(f"ids_keep[{g}] is on {packed.ids.device} but x[{g}] is on {device}")
        check_packed_mask(packed, batch, length, check_values)
        if any(ratios) and packed.counts != counts:
            raise ValueError(f"ids_keep[{g}] keeps {list(packed.counts)} tokens per sample but mask_ratio "
                             f"keeps {list(counts)} of {length}")
        return packed

    @staticmethod
    def _varlen_layout(packs):
        """VarlenLayout of the groups' PackedMasks concatenated (cu_seqlens offset on the device)."""
        if len(packs) == 1:
            cu = packs[0].cu_seqlens
        else:
            parts, offset = [packs[0].cu_seqlens], packs[0].ids.numel()
            for packed in packs[1:]:
                parts.append(packed.cu_seqlens[1:] + offset)
                offset += packed.ids.numel()
            cu = torch.cat(parts)
        ids = packs[0].ids if len(packs) == 1 else torch.cat([packed.ids for packed in packs])
        return VarlenLayout(cu, max(packed.max_seqlen for packed in packs), ops.sample_index(ids, cu))


#################################################################################
#                                   Presets                                     #
#################################################################################

# size: (depth, hidden_size, num_heads, decoder_depth, decoder_hidden_size, decoder_num_heads)
SIZES = {
    "S": (12, 384, 6, 4, 160, 5),
    "B": (12, 768, 12, 4, 320, 10),
    "L": (24, 1024, 16, 7, 448, 14),
    "XL": (28, 1152, 16, 8, 512, 16),
}
PATCH_SIZES = (2, 4, 8)
MODEL_CLASSES = {"DiT": DiT, "MaskDiT": MaskDiT}
_NAME_RE = re.compile(r"^(DiT|MaskDiT)-(S|B|L|XL)/(\d+)$")


def preset_names():
    """All preset names, e.g. "DiT-XL/2", "MaskDiT-S/8"."""
    return [f"{kind}-{size}/{p}" for kind in MODEL_CLASSES for size in SIZES for p in PATCH_SIZES]


def model_config(name, **overrides):
    """Resolves a preset name to (model class, constructor kwargs) without building anything.

    Args:
        name: "{DiT|MaskDiT}-{S|B|L|XL}/{2|4|8}".
        overrides: constructor kwargs replacing the preset's (input_size, in_channels, depth, ...).
    Returns:
        (cls, kwargs).
    """
    match = _NAME_RE.match(name) if isinstance(name, str) else None
    if match is None or int(match.group(3)) not in PATCH_SIZES:
        raise ValueError(f"unknown model {name!r}; expected one of {preset_names()}")
    kind, size, patch = match.group(1), match.group(2), int(match.group(3))
    depth, width, heads, dec_depth, dec_width, dec_heads = SIZES[size]
    kwargs = dict(patch_size=patch, depth=depth, hidden_size=width, num_heads=heads)
    if kind == "MaskDiT":
        kwargs.update(decoder_depth=dec_depth, decoder_hidden_size=dec_width, decoder_num_heads=dec_heads)
    cls = MODEL_CLASSES[kind]
    unknown = set(overrides) - set(inspect.signature(cls.__init__).parameters)
    if unknown:
        raise TypeError(f"{kind} has no argument(s) {sorted(unknown)}")
    kwargs.update(overrides)
    return cls, kwargs


def create_model(name, **overrides):
    """Builds a preset, e.g. create_model("MaskDiT-XL/2", input_size=64). See the module docstring
    for the table; overrides are constructor kwargs. Returns a DiT or MaskDiT."""
    cls, kwargs = model_config(name, **overrides)
    return cls(**kwargs)


#################################################################################
#                        Official checkpoint compatibility                      #
#################################################################################

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
