"""The benchmark cases: each op and attention kernel at MaskDiT / DiT shapes (inputs, reference,
cost, back-ends to time) and the train-step variants (model, ops back-end, compile options)."""
import dataclasses

import torch

from maskdit_fast import ops
from maskdit_fast.bench.costs import (attention_cost, gated_residual_cost, gather_tokens_cost, layernorm_modulate_cost,
                                      scatter_tokens_cost, varlen_attention_cost)
from maskdit_fast.indexing import cu_seqlens_from_counts, random_packed_ids

PASSES = ("fwd", "fwd+bwd")
BASELINE_BACKEND = "torch"
# In priority order: a spent section budget drops the last ones first.
OP_BACKENDS = ("torch", "triton", "cuda", "compile")
VARLEN_OP_BACKENDS = ("torch", "triton", "compile")  # the CUDA extension has no varlen gather/scatter
# ("cuda" has no attention kernel of its own: it runs "triton".)
ATTENTION_BACKENDS = ("torch", "triton", "sdpa_flash", "sdpa_cudnn", "torch_varlen", "flash_attn", "xformers",
                      "sdpa_efficient")
# "torch" is torch's varlen_attn on CUDA (bf16/fp16), SDPA per sequence elsewhere.
VARLEN_ATTENTION_BACKENDS = ("torch", "triton", "flash_attn", "xformers")


# ------------------------------------------------------------------------------------ op cases

@dataclasses.dataclass(frozen=True)
class OpCase:
    """One op at one shape: its inputs, the public op and its reference, and its cost.

    make_args(device, dtype, generator) -> tuple of positional args; grad_argnums index the args
    that get gradients; op(*args, backend=name) and ref(*args) take the same args.
    """
    name: str
    shape: str
    op: object
    ref: object
    make_args: object
    grad_argnums: tuple
    cost: tuple           # (fwd Cost, bwd Cost)
    bound: str            # "memory" or "compute"
    backends: tuple
    head_dim: int = 0     # attention cases: the head dim (the Triton kernels' capability depends on it)


def _randn(shape, device, dtype, gen, requires_grad=False, scale=1.0):
    t = torch.randn(shape, device=device, dtype=torch.float32, generator=gen) * scale
    return t.to(dtype).requires_grad_(requires_grad)


def _ids_keep(B, L, K, device, gen):
    """[B, K] int64 random kept positions (distinct per row), like MaskDiT's masking."""
    return torch.rand(B, L, device=device, generator=gen).argsort(dim=1)[:, :K].contiguous()


def _varlen_layout(B, L, K, seed=0):
    """Per-sample keep counts around K (in [K/2, 3K/2], paired so that they sum to B*K: the cost
    equals the dense layout's), on the CPU and fixed for a config."""
    gen = torch.Generator().manual_seed(seed)
    half = torch.randint(-(K // 2), K // 2 + 1, (B // 2,), generator=gen)
    delta = torch.cat([half, -half, torch.zeros(B % 2, dtype=half.dtype)])
    return (K + delta).clamp(0, L)


def _packed_ids(counts, L, device, gen):
    """ids_packed [T] int64 (random kept positions, sample by sample) and cu_seqlens [B+1] int32."""
    counts = counts.to(device)
    return random_packed_ids(counts, L, gen), cu_seqlens_from_counts(counts)


def op_cases(cfg):
    """The op benchmark cases at the config's shapes: MaskDiT's glue between the matmuls (encoder
    width D on K kept tokens, decoder width Dd on all L tokens), dense and varlen (packed) layouts."""
    B, L, K, D, Dd = cfg.B, cfg.L, cfg.K, cfg.D, cfg.Dd
    elem = torch.empty((), dtype=cfg.dtype).element_size()
    counts = _varlen_layout(B, L, K)
    T = int(counts.sum())

    def gather_args(dev, dt, g):
        return (_randn((B, L, D), dev, dt, g, True), _ids_keep(B, L, K, dev, g), _randn((L, D), dev, dt, g))

    def scatter_args(dev, dt, g):
        return (_randn((B, K, Dd), dev, dt, g, True), _ids_keep(B, L, K, dev, g),
                _randn((Dd,), dev, dt, g, True, 0.02), L, _randn((L, Dd), dev, dt, g))

    def gather_varlen_args(dev, dt, g):
        return (_randn((B, L, D), dev, dt, g, True), *_packed_ids(counts, L, dev, g), _randn((L, D), dev, dt, g))

    def scatter_varlen_args(dev, dt, g):
        return (_randn((T, Dd), dev, dt, g, True), *_packed_ids(counts, L, dev, g),
                _randn((Dd,), dev, dt, g, True, 0.02), L, _randn((L, Dd), dev, dt, g))

    def modulate_args(dev, dt, g):
        return (_randn((B, K, D), dev, dt, g, True), _randn((B, D), dev, dt, g, True, 0.1),
                _randn((B, D), dev, dt, g, True, 0.1))

    def residual_args(dev, dt, g):
        return (_randn((B, K, D), dev, dt, g, True), _randn((B, K, D), dev, dt, g, True),
                _randn((B, D), dev, dt, g, True, 0.1))

    varlen = f"T={T} ({K}+-{K // 2} per sample)"
    return [
        OpCase("gather_tokens", f"[{B},{L},{D}] -> [{B},{K},{D}] +pos", ops.gather_tokens, ops.gather_tokens_ref,
               gather_args, (0,), gather_tokens_cost(B, L, K, D, elem), "memory", OP_BACKENDS),
        OpCase("scatter_tokens", f"[{B},{K},{Dd}] -> [{B},{L},{Dd}] +mask +pos", ops.scatter_tokens,
               ops.scatter_tokens_ref, scatter_args, (0, 2), scatter_tokens_cost(B, L, K, Dd, elem), "memory",
               OP_BACKENDS),
        OpCase("gather_tokens_varlen", f"[{B},{L},{D}] -> [{T},{D}] +pos, {varlen}", ops.gather_tokens_varlen,
               ops.gather_tokens_varlen_ref, gather_varlen_args, (0,), gather_tokens_cost(B, L, K, D, elem),
               "memory", VARLEN_OP_BACKENDS),
        OpCase("scatter_tokens_varlen", f"[{T},{Dd}] -> [{B},{L},{Dd}] +mask +pos, {varlen}",
               ops.scatter_tokens_varlen, ops.scatter_tokens_varlen_ref, scatter_varlen_args, (0, 3),
               scatter_tokens_cost(B, L, K, Dd, elem), "memory", VARLEN_OP_BACKENDS),
        OpCase("layernorm_modulate", f"[{B},{K},{D}]", ops.layernorm_modulate, ops.layernorm_modulate_ref,
               modulate_args, (0, 1, 2), layernorm_modulate_cost(B, K, D, elem), "memory", OP_BACKENDS),
        OpCase("gated_residual", f"[{B},{K},{D}]", ops.gated_residual, ops.gated_residual_ref, residual_args,
               (0, 1, 2), gated_residual_cost(B, K, D, elem), "memory", OP_BACKENDS),
    ]


def _varlen_attention_ref(q, k, v, cu_q, cu_k, max_q, max_k):
    """varlen_attention's reference in the inputs' dtype (the op's positional signature)."""
    return ops.varlen_attention_ref(q, k, v, cu_q, cu_k, compute_dtype=q.dtype)[0]


def attention_cases(cfg):
    """Attention at MaskDiT/DiT shapes: the encoder on the kept tokens, the decoder and DiT on all
    tokens (q, k, v are views of one [B, L, 3, H, Dh] tensor, as the qkv Linear gives them), and
    varlen attention over per-sample keep counts around K."""
    elem = torch.empty((), dtype=cfg.dtype).element_size()
    cases = []
    for label, n, heads, width in (("encoder", cfg.K, cfg.H, cfg.D), ("decoder", cfg.L, cfg.Hd, cfg.Dd),
                                   ("dit", cfg.L, cfg.H, cfg.D)):
        dh = width // heads

        def args(dev, dt, g, n=n, heads=heads, dh=dh):
            return _randn((cfg.B, n, 3, heads, dh), dev, dt, g, True).unbind(2)

        cases.append(OpCase(f"attention[{label}]", f"B={cfg.B} L={n} H={heads} Dh={dh}", ops.attention,
                            ops.attention_ref, args, (0, 1, 2), attention_cost(cfg.B, heads, n, n, dh, elem),
                            "compute", ATTENTION_BACKENDS, dh))
    counts = _varlen_layout(cfg.B, cfg.L, cfg.K)
    T, max_len, dh = int(counts.sum()), int(counts.max()), cfg.D // cfg.H

    def varlen_args(dev, dt, g):
        _, cu = _packed_ids(counts, cfg.L, dev, g)
        q, k, v = _randn((T, 3, cfg.H, dh), dev, dt, g, True).unbind(1)
        return q, k, v, cu, cu, max_len, max_len

    cases.append(OpCase("varlen_attention[encoder]", f"T={T} ({cfg.K}+-{cfg.K // 2} per sample) H={cfg.H} Dh={dh}",
                        ops.varlen_attention, _varlen_attention_ref, varlen_args, (0, 1, 2),
                        varlen_attention_cost(counts.tolist(), counts.tolist(), cfg.H, dh, elem), "compute",
                        VARLEN_ATTENTION_BACKENDS, dh))
    return cases



# ------------------------------------------------------------------------------------ train steps

@dataclasses.dataclass(frozen=True)
class TrainVariant:
    """One train-step row: a model preset on an ops back-end at a mask ratio, eager or compiled the
    way the trainer's options compile it (maskdit_fast.train.parallelize, same TrainConfig fields).

    backend: "auto" (fused: the CUDA extension's glue ops + SDPA on a GPU), "triton" or "torch" (the
    reference: the official code's math in plain PyTorch, see maskdit_fast.bench.train_step).
    compile: "" (eager), "model" (the whole forward, as `torch.compile(model)`) or "blocks" (each
    transformer block, the trainer's default scope). headline: the rows of the issue's comparison,
    run first at every size; the others decide the trainer's compile default (GPU_COMPILE).
    """
    label: str
    preset: str
    overrides: dict
    backend: str
    mask_ratio: float
    compile: str = ""
    cuda_graphs: bool = False
    fp8: bool = False
    headline: bool = True


# (label suffix, model kind, back-end, mask ratio, compile scope, CUDA graphs, fp8, headline)
TRAIN_VARIANTS = (
    ("fused", "MaskDiT", "auto", 0.5, "", False, False, True),
    ("triton", "MaskDiT", "triton", 0.5, "", False, False, False),
    ("reference", "MaskDiT", "torch", 0.5, "", False, False, True),
    ("", "DiT", "torch", 0.0, "", False, False, True),
    ("reference + compile", "MaskDiT", "torch", 0.5, "model", False, False, True),
    ("fused + compile", "MaskDiT", "auto", 0.5, "model", False, False, True),
    ("fused + compile + CUDA graphs", "MaskDiT", "auto", 0.5, "model", True, False, True),
    ("+ compile", "DiT", "torch", 0.0, "model", False, False, True),
    ("fused + compile (blocks)", "MaskDiT", "auto", 0.5, "blocks", False, False, False),
    ("fused + compile + fp8", "MaskDiT", "auto", 0.5, "model", False, True, False),
)


def train_variants(cfg):
    """The train-step variants at cfg's model size (TRAIN_VARIANTS); DiT presets drop decoder_*
    overrides (same encoder, no decoder)."""
    variants = []
    for suffix, kind, backend, ratio, scope, graphs, fp8, headline in TRAIN_VARIANTS:
        overrides = {k: v for k, v in cfg.train_overrides.items() if not (kind == "DiT" and k.startswith("decoder_"))}
        variants.append(TrainVariant(f"{kind}-{cfg.train_size} {suffix}".strip(), f"{kind}-{cfg.train_size}",
                                     overrides, backend, ratio, scope, graphs, fp8, headline))
    return variants


def train_baseline(cfg):
    """Label of the train-step row the others are compared with (the pure-PyTorch MaskDiT)."""
    return f"MaskDiT-{cfg.train_size} reference"


@dataclasses.dataclass(frozen=True)
class TrainRow:
    """Where one variant runs: latent size (32: 256 px) and batch rule ("fit": the largest batch
    that fits, "common": cfg.common_batch[input_size] for every row)."""
    variant: TrainVariant
    input_size: int
    batch_rule: str


def train_rows(cfg):
    """Every variant at every size and batch rule, headline variants first (a spent budget drops the
    rest): for each tier, size and rule, the variants in TRAIN_VARIANTS order."""
    variants = train_variants(cfg)
    return [TrainRow(v, size, rule) for tier in (True, False) for size in cfg.train_input_sizes
            for rule in cfg.train_batches for v in variants if v.headline is tier]
