"""Opt-in float8 training (`--precision fp8`): torchao's float8 linears, bf16 autocast everywhere else.

    check_fp8_device(device)          # before anything is built or written: torchao, an sm_89+ GPU
    names = convert_to_fp8(model)     # before activation checkpointing, compile and FSDP / DDP

A converted linear (torchao `Float8Linear`, a subclass of nn.Linear with the same parameters and
state_dict keys) casts its input, weight and output gradient to float8 with dynamic tensorwise
scales (one amax per tensor per step: e4m3 forward, e5m2 gradients) and runs the three GEMMs of
forward and backward as `torch._scaled_mm`; bias, accumulation and outputs stay bf16 / fp32.

Which linears: the attention (qkv, proj) and MLP (fc1, fc2) linears of the transformer blocks that
pass torchao's size rule for tensorwise scaling (dims multiples of 16, and not K <= 4096 with
N <= 1024, N x K the weight: below that the casts cost more than the float8 GEMM saves, measured
by torchao on H100). They run on one row per token: 95 % of MaskDiT-XL/2's linear FLOPs at mask
ratio 0.5 (attention's two matmuls are not linears and stay bf16). Left in bf16:
  - the adaLN projections: they run on one row per sample (c [B, D]), ~1/L of a block's FLOPs, so
    float8 cannot pay for its casts; and their outputs (shift, scale and the adaLN-Zero gates) scale
    every token of the block, where e4m3's 3 mantissa bits would be a relative error of up to 2^-4
    on each modulation value;
  - the timestep / label embedders (one row per sample, tiny) and the patch embedding (a conv);
  - MaskDiT's decoder-input linear and the final layer (N = p*p*C_out, 16-32 outputs: far below the
    size rule, and the last projection sets the output's precision), both also outside the compiled
    blocks.
Models too small for the rule convert nothing, and fp8 then refuses (ValueError) rather than run
as bf16 under another name.

torch.compile is required (the config refuses fp8 without it): eager, each cast is its own
amax + scale + convert kernels and float8 is slower than bf16; compiled, the casts fuse into the
neighbouring ops (torchao's own guidance). The blocks are what `--compile` compiles at either scope.

FSDP2: weights are gathered in bf16 (the MixedPrecisionPolicy) and cast to float8 inside the
compiled block. torchao's float8 all-gather (`enable_fsdp_float8_all_gather`, half the gather
traffic) turns the parameters into a tensor subclass that the EMA copy, the non-finite checks and
the DCP checkpoints would then hold; it is left off until a multi-GPU measurement shows the gather
matters.

Requirements: torchao >= 0.17 (`pip install maskdit_fast[fp8]`; 0.17 is built against torch 2.11
and its Python API runs on 2.9+; the tests pass with torchao 0.17 and 0.18 on torch 2.14 CPU) and a
CUDA GPU with float8 tensor cores (compute capability >= 8.9: Ada, Hopper, Blackwell);
`check_fp8_device` raises a clear error otherwise. The conversion itself also runs on CPU (torch's
CPU `_scaled_mm`, a slow reference), which is how the tests check it. The float8 GEMMs need the
token count in multiples of 16 on CUDA (`convert_to_fp8(pad_inner_dim=...)`).
"""
import re

import torch
from torch import nn

from maskdit_fast.parallel import unwrap

INSTALL_HINT = "pip install 'maskdit_fast[fp8]' (torchao >= 0.17)"
MIN_CAPABILITY = (8, 9)  # float8 tensor cores: Ada (8.9), Hopper (9.0), Blackwell (10.x, 12.x)
# blocks.<i> / decoder_blocks.<i> followed by a token-wise linear of attention or MLP
_BLOCK_LINEAR = re.compile(r"^(blocks|decoder_blocks)\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))$")


def require_torchao():
    """torchao.float8, or RuntimeError saying how to install it."""
    try:
        import torchao.float8
    except ImportError as e:
        raise RuntimeError(f"--precision fp8 needs torchao, which is not installed: {INSTALL_HINT}") from e
    return torchao.float8


def check_fp8_device(device):
    """Raises RuntimeError unless float8 training can run on `device`: torchao importable and a CUDA
    device of compute capability >= 8.9. Cheap; the trainer calls it before building anything."""
    require_torchao()
    device = torch.device(device)
    if device.type != "cuda":
        raise RuntimeError(f"--precision fp8 needs a CUDA GPU with float8 tensor cores (compute capability >= "
                           f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}: Ada, Hopper, Blackwell); the device is {device}. "
                           f"Use --precision bf16")
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        raise RuntimeError(f"--precision fp8 needs compute capability >= {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} "
                           f"(float8 tensor cores); {torch.cuda.get_device_name(device)} has "
                           f"{capability[0]}.{capability[1]}. Use --precision bf16")


def worth_float8(linear):
    """torchao's size rule for tensorwise float8 (its `_auto_filter_for_tensorwise`): weight
    N x K with N and K multiples of 16 (the float8 GEMM's requirement) and not both K <= 4096 and
    N <= 1024 (smaller GEMMs lose more to the casts than float8 saves)."""
    N, K = linear.weight.shape
    return N % 16 == 0 and K % 16 == 0 and not (K <= 4096 and N <= 1024)


def fp8_linear_names(model):
    """Names (state_dict prefixes) of the linears `convert_to_fp8` converts in a DiT / MaskDiT (any
    wrapper): the blocks' attention and MLP linears that pass `worth_float8`, in module order."""
    return [name for name, module in unwrap(model).named_modules()
            if isinstance(module, nn.Linear) and _BLOCK_LINEAR.match(name) and worth_float8(module)]


def convert_to_fp8(model, pad_inner_dim=False):
    """Swaps the linears named by `fp8_linear_names` for torchao Float8Linear (dynamic tensorwise
    scaling), in place; call before activation checkpointing, compile and FSDP / DDP. Parameters
    and state_dict keys do not change, so checkpoints load into bf16 / fp32 models and back.

    Args:
        pad_inner_dim: zero-pad each float8 GEMM's inner dimension to a multiple of 16 (a copy per
            GEMM). torch._scaled_mm needs it there; K and N are by the size rule, but the weight
            gradient's inner dimension is the token count, which must then be one too (the trainer
            decides: maskdit_fast.train.fp8_needs_padding).
    Returns:
        the converted names. Raises ValueError when the model has none (too small for float8).
    """
    float8 = require_torchao()
    names = fp8_linear_names(model)
    if not names:
        raise ValueError("precision fp8: no linear of this model is large enough for float8 (block attention / MLP "
                         "weights need N, K multiples of 16 and N > 1024 or K > 4096); use precision bf16")
    chosen = set(names)
    float8.convert_to_float8_training(unwrap(model), config=float8.Float8LinearConfig(pad_inner_dim=pad_inner_dim),
                                      module_filter_fn=lambda module, fqn: fqn in chosen)
    return names
