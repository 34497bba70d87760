"""DiT and MaskDiT in pure PyTorch.

DiT follows facebookresearch/DiT (models.py) and MaskDiT follows Anima-Lab/MaskDiT
(models/maskdit.py, the `use_decoder=True` configuration trained with the MAE loss), module for
module and parameter name for parameter name, so official checkpoints load unchanged
(`maskdit_fast.official.from_official`). The glue between the matmuls goes through `maskdit_fast.ops`
(gather/scatter of kept tokens, LayerNorm + adaLN modulation, gated residual, attention) so fused
kernels can replace it; with the "torch" back-end the forward is the official math op for op. The
checks of the forward's inputs and the resolution of MaskDiT's masking request are in
`maskdit_fast.model_inputs`.

Call convention, shared by both models:

    out = model(x, t, y, mask_ratio=0.0, ids_keep=None)   # -> ModelOutput(sample, mask)

x [B, C, H, W]; t [B] (or a scalar) noise-level input (MaskDiT: the EDM c_noise = ln(sigma) / 4;
DiT: the timestep); y int64 [B] class ids in [0, num_classes], where `num_classes` is the null
class for classifier-free guidance (MaskDiT: an all-zero one-hot; DiT: the extra embedding row).
Label dropout is the trainer's job (replace labels by `model.null_class`). MaskDiT masks
int(L * (1 - mask_ratio)) random tokens per sample, or exactly the complement of `ids_keep`
[B, K]; `mask` [B, L] float is 1 for masked tokens, None when nothing was masked (by a single
keep count: per-sample requests always return it, see MaskDiT.forward). Unlike the
official code, masking does not depend on train/eval mode: it happens whenever it is asked for.
MaskDiT also takes per-sample ratios (mask_ratio a [B] float tensor or list), per-sample kept
positions (ids_keep a `maskdit_fast.masking.PackedMask` or a list of B 1-D tensors) and
mixed-resolution batches as lists with one entry per group (see MaskDiT.forward).

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
from maskdit_fast.masking import cu_seqlens_from_counts
from maskdit_fast.model_inputs import checked_groups, checked_inputs


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


#################################################################################
#                        Token layout of MaskDiT's encoder                      #
#################################################################################

# MaskDiT's encoder runs on one stream of kept tokens [T, D], the samples one after the other
# (sample b holding counts[b] rows, of any group / resolution). When every sample keeps the same
# count K the stream viewed as [B, K, D] (no copy) IS the dense batch, and the blocks run it dense;
# otherwise it runs as one ragged sequence [1, T, D] with a VarlenLayout. Everything else is one
# path. The layouts split in three places, each because dense is cheaper:
#   attention (Attention.forward): measured on an NVIDIA H200, bf16 fwd+bwd, B=128 L=128 H=16 Dh=72,
#     cuDNN SDPA 0.298 ms vs torch's varlen_attn on the same tokens 0.458 ms (dense 1.54x faster;
#     benchmarks/results/2026-11-26-nvidia-h200-quick.md, attention section);
#   conditioning (_modulation): dense broadcasts the per-sample adaLN vectors [B, 6D] inside the
#     modulation ops, ragged materialises each token's, [T, 6D] per block (K times the bytes);
#   gather / scatter of the kept tokens (MaskDiT._encoder_input / _decoder_input, per group): same
#     file, ops section, fwd+bwd at T = 16384: gather [128,256,1152] -> [128,128,1152] dense torch
#     0.268 ms / CUDA extension 0.194 ms vs varlen torch 0.576 ms (128+-64 tokens per sample; the
#     extension has no varlen kernel). So a group whose samples keep equal counts uses the dense
#     ops even when the whole stream is ragged (mixed resolutions).
# With the torch back-end both layouts give the same numbers up to float rounding (tests/test_packed.py).

class VarlenLayout(NamedTuple):
    """Where the rows of a ragged token stream [1, T, D] belong (the varlen attention layout).

    cu_seqlens: [B+1] int32, sample b owning rows cu_seqlens[b]:cu_seqlens[b+1];
    max_seqlen: Python int, the longest sample; sample: [T] int64, the sample of each row.
    """
    cu_seqlens: torch.Tensor
    max_seqlen: int
    sample: torch.Tensor


def varlen_layout(counts, device):
    """The layout of a stream whose sample b holds counts[b] rows: None when all counts are equal
    (the stream is the dense batch [B, K, D]), else a VarlenLayout on `device`."""
    if len(set(counts)) == 1:
        return None
    cu_seqlens = cu_seqlens_from_counts(counts).to(device)
    sample = torch.repeat_interleave(torch.arange(len(counts), device=device), cu_seqlens.diff(),
                                     output_size=sum(counts))
    return VarlenLayout(cu_seqlens, max(counts), sample)


def _modulation(adaLN_modulation, c, chunks, varlen=None):
    """adaLN_modulation(c) [B, chunks * D] split into `chunks` per-sample [B, D] vectors, or with a
    VarlenLayout per-token [1, T, D] ones (row t = its sample's vector; the Linear runs on B rows)."""
    mod = adaLN_modulation(c)                       # [B, chunks * D]
    if varlen is not None:
        mod = mod[varlen.sample].unsqueeze(0)       # [1, T, chunks * D]
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
        x = self.proj(x)                        # [B, D, H/p, W/p]
        return x.flatten(2).transpose(1, 2)     # [B, L, D]


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
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)   # [B, 256] fp32
        # The cast is a no-op in fp32 and lets a model cast to bf16/fp16 run without autocast.
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))                 # [B, D]


class LabelEmbedder(nn.Module):
    """DiT's class embedding: a table with num_classes + 1 rows, the last being the CFG null class.
    y int64 [B] in [0, num_classes] -> [B, D]."""

    def __init__(self, num_classes, hidden_size):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, y):
        return self.embedding_table(y)  # [B, D]


class OneHotLabelEmbedder(nn.Module):
    """MaskDiT's class embedding: one-hot labels through Linear(num_classes -> D, bias=False), so
    the null class is the all-zero vector. y int64 [B] in [0, num_classes] -> [B, D]."""

    def __init__(self, num_classes, hidden_size):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Linear(num_classes, hidden_size, bias=False)

    def forward(self, y):
        # One extra column for the null class, then dropped: y == num_classes gives all zeros.
        one_hot = F.one_hot(y, self.num_classes + 1)[:, :self.num_classes]        # [B, num_classes]
        return self.embedding_table(one_hot.to(self.embedding_table.weight.dtype))  # [B, D]


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
        """x [B, L, D] -> [B, L, D]; with a VarlenLayout, x is a ragged stream [1, T, D] and each
        sample attends only within its own rows (see "Token layout" above for why dense stays)."""
        B, L, D = x.shape
        H, Dh = self.num_heads, D // self.num_heads
        # qkv-packed: the backward writes one [.., 3, H, Dh] gradient instead of three slices
        if varlen is None:
            qkv = self.qkv(x).reshape(B, L, 3, H, Dh)                            # [B, L, 3, H, Dh]
            out = ops.attention_qkvpacked(qkv, backend=backend)                  # [B, L, H, Dh], scale Dh ** -0.5
        else:
            qkv = self.qkv(x).reshape(L, 3, H, Dh)                               # [T, 3, H, Dh] (B = 1)
            # cu_seqlens come from host counts the model checked: no value check (a device sync)
            out = ops.varlen_attention_qkvpacked(qkv, varlen.cu_seqlens, varlen.max_seqlen, backend=backend,
                                                 validate=False)                 # [T, H, Dh]
        return self.proj(out.reshape(B, L, D))                                   # [B, L, D]


class Mlp(nn.Module):
    """fc1 -> GELU (tanh approximation) -> fc2, as DiT's timm Mlp."""

    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim, bias=True)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, dim, bias=True)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))  # [.., D] -> [.., hidden_dim] -> [.., D]


class DiTBlock(nn.Module):
    """A DiT block with adaLN-Zero conditioning. x [B, L, D], c [B, D_c] -> [B, L, D]; with a
    VarlenLayout, x is a ragged stream [1, T, D] (per-token conditioning, varlen attention).

    D_c (the conditioning width) differs from D in MaskDiT's decoder blocks, which are still
    conditioned on the encoder-width vector c.
    """

    def __init__(self, hidden_size, cond_size, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.attn = Attention(hidden_size, num_heads)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_size, 6 * hidden_size, bias=True))

    def forward(self, x, c, backend=None, varlen=None):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = _modulation(
            self.adaLN_modulation, c, 6, varlen)                                  # 6 x [B, D] (ragged: [1, T, D])
        h = ops.layernorm_modulate(x, shift_msa, scale_msa, backend=backend)     # [B, L, D]
        x, h = ops.residual_layernorm_modulate(x, self.attn(h, backend=backend, varlen=varlen), gate_msa,
                                               shift_mlp, scale_mlp, backend=backend)  # 2 x [B, L, D]
        return ops.gated_residual(x, self.mlp(h), gate_mlp, backend=backend)     # [B, L, D]


class DecoderLayer(nn.Module):
    """MaskDiT's bridge from encoder to decoder width: LayerNorm + adaLN shift/scale (encoder
    width) + Linear. x [B, K, D] -> [B, K, D_dec] (or ragged [1, T, D] with a VarlenLayout)."""

    def __init__(self, hidden_size, decoder_hidden_size):
        super().__init__()
        self.linear = nn.Linear(hidden_size, decoder_hidden_size, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x, c, backend=None, varlen=None):
        shift, scale = _modulation(self.adaLN_modulation, c, 2, varlen)          # 2 x [B, D] (ragged: [1, T, D])
        x = ops.layernorm_modulate(x, shift, scale, backend=backend)             # [B, K, D]
        return self.linear(x)                                                    # [B, K, D_dec]


class FinalLayer(nn.Module):
    """LayerNorm + adaLN shift/scale + Linear to patch values. x [B, L, D] -> [B, L, p*p*C_out]."""

    def __init__(self, hidden_size, cond_size, patch_size, out_channels):
        super().__init__()
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_size, 2 * hidden_size, bias=True))

    def forward(self, x, c, backend=None):
        shift, scale = _modulation(self.adaLN_modulation, c, 2)                  # 2 x [B, D]
        x = ops.layernorm_modulate(x, shift, scale, backend=backend)             # [B, L, D]
        return self.linear(x)                                                    # [B, L, p*p*C_out]


#################################################################################
#                                 Core Models                                   #
#################################################################################

def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class _DiffusionTransformer(nn.Module):
    """What DiT and MaskDiT share: patch/time embedders, the fixed pos-embed, the encoder blocks,
    conditioning and unpatchify. Subclasses add the label embedder and the head."""

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

    def _condition(self, t, y):
        """c = t_emb + y_emb, [B, D]."""
        c = self.t_embedder(t)
        return c if self.y_embedder is None else c + self.y_embedder(y)

    def unpatchify(self, x, grid_size=None):
        """[B, L, p*p*C_out] -> [B, C_out, H, W] (inverse of the patch embedding's layout), on the
        (h, w) token grid `grid_size` (default: the model's own)."""
        h, w = grid_size or self.grid_size
        return unpatchify(x, self.patch_size, h * self.patch_size, w * self.patch_size)


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
        t, y = checked_inputs(self, x, t, y)                                 # [B], [B]
        c = self._condition(t, y)                                           # [B, D]
        tokens = self.x_embedder(x) + self.pos_embed                        # [B, L, D]
        for block in self.blocks:
            tokens = block(tokens, c, backend=self.backend)                 # [B, L, D]
        tokens = self.final_layer(tokens, c, backend=self.backend)          # [B, L, p*p*C_out]
        return ModelOutput(self.unpatchify(tokens), None)                   # [B, C_out, H, W]


class MaskDiT(_DiffusionTransformer):
    """MaskDiT (Zheng et al., Anima-Lab/MaskDiT): a DiT encoder on the kept tokens only, then a
    light DiT decoder on all tokens, masked ones filled with a learned mask token.

    The encoder runs on the kept tokens of all samples as one stream, sample after sample (see
    "Token layout" above): the dense batch [B, K, D] when every sample keeps the same count K (the
    official configuration, also per-sample ratios or groups that happen to keep equal counts),
    else one ragged sequence [1, T, D] with varlen attention and per-token conditioning, no padding
    (per-sample mask ratios, per-sample kept positions, mixed resolutions). The decoder runs dense
    on each group's full grid.

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
                (1-D float tensor, list or tuple: sample b keeps int(L * (1 - mask_ratio[b])) tokens).
                With ids_keep given it must be 0 or give the same keep counts.
            ids_keep: optional kept positions (fixes the mask): [B, K] int64, or per sample a
                PackedMask / list of B 1-D int64 tensors.
            Returns ModelOutput(sample [B, C_out, H, W] for all tokens, mask [B, L] float, 1 =
            masked). mask is None when a single keep count (a number mask_ratio or [B, K] ids_keep)
            masks nothing; per-sample requests always return it (zeros where a sample keeps every
            token), so the output's structure follows the request, not the values drawn.

        G groups (x a list): the encoder runs once on the kept tokens of all groups (per-sample
        keep counts, per-resolution position embeddings, attention within each sample); the
        decoder then runs on each group's full grid. Samples of any resolution (multiples of
        patch_size; see `pos_embeds`) can share one encoder pass. Going through forward (not a side
        method) keeps DDP's gradient sync and FSDP's parameter gathering, which hook the module's call.
            x: list of G tensors [B_g, C, H_g, W_g].
            t: list of G noise-level inputs, [B_g] or scalars.
            y: list of G int64 label tensors [B_g] (or None entries: null class), or None.
            mask_ratio: a number for every sample, or a list of G entries, each a number or B_g
                per-sample ratios, in [0, 1). Random masks are drawn group after group from the
                global RNG (the same draw as a single batch); all-kept groups draw nothing.
            ids_keep: None, or a list of G entries, each None (random, from mask_ratio) or kept
                positions as for one batch.
            Returns a list of G ModelOutput(sample [B_g, C_out, H_g, W_g], mask [B_g, L_g] float,
            1 = masked; never None).
        """
        groups, grouped = checked_groups(self, x, t, y, mask_ratio, ids_keep)  # random masks drawn here
        counts = [n for g in groups for n in g.kept.counts]                   # B host ints, T = sum(counts)
        c = self._condition(_cat([g.t for g in groups]), _cat([g.y for g in groups]))  # [B, D]
        tokens = _cat([self._encoder_input(g) for g in groups])               # [T, D]
        varlen = varlen_layout(counts, tokens.device)                         # None: every sample keeps K
        tokens = tokens.view(len(counts), -1, tokens.shape[-1]) if varlen is None else tokens[None]
        # tokens: [B, K, D] (dense) | [1, T, D] (ragged)
        for block in self.blocks:
            tokens = block(tokens, c, backend=self.backend, varlen=varlen)      # [B, K, D] | [1, T, D]
        tokens = self.decoder_layer(tokens, c, backend=self.backend, varlen=varlen).flatten(0, 1)  # [T, D_dec]

        outputs, row, first = [], 0, 0
        for g in groups:
            B, T = len(g.kept.counts), sum(g.kept.counts)
            h = self._decoder_input(tokens[row:row + T], g)                      # [B_g, L_g, D_dec]
            cg = c[first:first + B]                                             # [B_g, D]
            for block in self.decoder_blocks:
                h = block(h, cg, backend=self.backend)                          # [B_g, L_g, D_dec]
            h = self.final_layer(h, cg, backend=self.backend)                   # [B_g, L_g, p*p*C_out]
            outputs.append(ModelOutput(self.unpatchify(h, g.grid), g.kept.mask))  # [B_g, C_out, H_g, W_g]
            row, first = row + T, first + B
        return outputs if grouped else outputs[0]

    def _encoder_input(self, group):
        """Group's kept tokens plus the position embedding, sample after sample: [T_g, D]."""
        ids, cu_seqlens = group.kept.ids, group.kept.cu_seqlens
        pos = self.pos_embeds(group.grid)[0]                                      # [L_g, D]
        tokens = self.x_embedder(group.x)                                       # [B_g, L_g, D]
        if ids is None:  # every token, in grid order
            return (tokens + pos).flatten(0, 1)
        # positions drawn here or checked by model_inputs: skip the ops' own (syncing) value checks
        if cu_seqlens is None:  # every sample keeps K: the dense op (see "Token layout")
            return ops.gather_tokens(tokens, ids, pos, backend=self.backend, validate=False).flatten(0, 1)
        return ops.gather_tokens_varlen(tokens, ids, cu_seqlens, pos, backend=self.backend, validate=False)

    def _decoder_input(self, tokens, group):
        """Group's decoder input from its kept tokens [T_g, D_dec]: the mask token at masked
        positions, grid order, plus the decoder position embedding -> [B_g, L_g, D_dec]."""
        ids, cu_seqlens = group.kept.ids, group.kept.cu_seqlens
        B, L = len(group.kept.counts), group.grid[0] * group.grid[1]
        pos = self.pos_embeds(group.grid)[1]                                      # [L_g, D_dec]
        if ids is None:
            return tokens.view(B, L, -1) + pos
        if cu_seqlens is None:
            return ops.scatter_tokens(tokens.view(B, ids.shape[1], -1), ids, self.mask_token, L, pos,
                                      backend=self.backend, validate=False)
        return ops.scatter_tokens_varlen(tokens, ids, cu_seqlens, self.mask_token, L, pos, backend=self.backend,
                                         validate=False)


def _cat(parts):
    """torch.cat along dim 0, without a copy for a single part."""
    return parts[0] if len(parts) == 1 else torch.cat(parts)


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
