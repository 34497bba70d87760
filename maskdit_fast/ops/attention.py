"""Multi-head attention: dense [B, L, H, D] and variable-length (packed) [total, H, D].

varlen_attention follows flash-attn's `flash_attn_varlen_func` (same tensors, cu_seqlens, max_seqlen,
softmax_scale and causal semantics; no dropout, so pass softmax_scale/causal by keyword when porting
a call that passes dropout_p positionally). Causal masking is bottom-right aligned (flash-attn >= 2.1):
query i of a sequence sees key j iff j <= i + Lk - Lq. A query row that sees no key (empty key
sequence, or causal with Lq > Lk) outputs 0 and has lse +inf.

Back-ends (the `backend=` keyword; the global default of maskdit_fast.backend applies otherwise):
  "triton"     ours (kernels/flash_attn.py): FA2-style fwd/bwd Triton kernels (opt-in: 0.2-0.4x SDPA's
               speed on an H200 at MaskDiT-XL/2 shapes, benchmarks/results/2026-11-26-nvidia-h200*).
  "torch"      dense: SDPA exactly. varlen: torch.nn.attention.varlen.varlen_attn (torch >= 2.10) for
               CUDA fp16/bf16 inputs, else SDPA per sequence (the reference and the CPU default).
  "flash_attn" flash-attn's flash_attn_func / flash_attn_varlen_func (when installed; CUDA).
  "xformers"   xformers.ops.memory_efficient_attention with a BlockDiagonal mask (when installed; CUDA).
  "cuda"       the package's CUDA extension has no attention kernel: runs "torch".
  "auto"       "torch" (SDPA picks flash / cuDNN on CUDA).

This file holds, top to bottom: the references (the spec), the input checks (run once, by the public ops), the
Triton op, the other back-ends, and the public ops that dispatch between them. The Triton op is registered with
torch.library (maskdit_fast::varlen_attn_fwd/_bwd and the qkv-packed pair; cu_seqlens None for the dense layout)
and called from autograd.Functions, with fake kernels (torch.compile) and FLOP formulas for FlopCounterMode:
4 * sum_b(Lq_b * Lk_b) * H * D forward and 2.5x that backward (causal masks are not discounted, as in torch's
own attention formulas).
"""
import functools
import importlib.util
import inspect

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula

from maskdit_fast.backend import define_op, get_backend, resolve_backend
from maskdit_fast.ops.gather_scatter import validation_enabled

ATTENTION_BACKENDS = ("torch", "triton", "flash_attn", "xformers", "cuda")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_OPTIONAL = {"flash_attn": "flash-attn (pip install flash-attn)", "xformers": "xformers (pip install xformers)"}


# -------------------------------------------------------------------------------------------------- reference
def _softmax_scale(softmax_scale, head_dim):
    return float(head_dim ** -0.5 if softmax_scale is None else softmax_scale)


def varlen_attention_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale=None, causal=False,
                         compute_dtype=torch.float64):
    """Reference (the spec): softmax(q k^T * scale) v per sequence, computed in `compute_dtype`.

    Shapes and semantics as varlen_attention (bottom-right causal; rows that see no key give 0 and
    lse +inf). float64 is the accuracy reference; the inputs' own low-precision dtype gives PyTorch's
    plain math in that dtype (what SDPA's math back-end does on a GPU), the baseline for the
    low-precision error of the kernels. Differentiable. Returns (out [total_q, H, D] in compute_dtype,
    lse [H, total_q] in compute_dtype).
    """
    scale = _softmax_scale(softmax_scale, q.shape[-1])
    q, k, v = q.to(compute_dtype), k.to(compute_dtype), v.to(compute_dtype)
    outs, lses = [], []
    for qs, qe, ks, ke in zip(cu_seqlens_q[:-1].tolist(), cu_seqlens_q[1:].tolist(), cu_seqlens_k[:-1].tolist(),
                              cu_seqlens_k[1:].tolist()):
        s = torch.einsum("ihd,jhd->hij", q[qs:qe], k[ks:ke]) * scale
        if causal:
            i = torch.arange(qe - qs, device=q.device)[:, None]
            j = torch.arange(ke - ks, device=q.device)[None, :]
            s = s.masked_fill(j > i + (ke - ks) - (qe - qs), float("-inf"))
        lse = torch.logsumexp(s, -1) if ke > ks else s.new_full(s.shape[:2], float("-inf"))
        p = torch.exp(s - lse[..., None]).nan_to_num(0.0)  # rows with no key: exp(-inf - -inf) -> 0
        outs.append(torch.einsum("hij,jhd->ihd", p, v[ks:ke]))
        lses.append(torch.where(lse == float("-inf"), float("inf"), lse))
    if not outs:
        return q.new_zeros(q.shape), q.new_zeros((q.shape[1], q.shape[0]))
    return torch.cat(outs), torch.cat(lses, 1)


def attention_ref(q, k, v, softmax_scale=None):
    """Reference: softmax(q k^T * scale) v through torch SDPA. q, k, v [B, L, H, D] -> [B, L, H, D]."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         scale=softmax_scale)
    return out.transpose(1, 2)


# ----------------------------------------------------------------------------------------------------- checks
def _check_cu_seqlens(cu, name, total, max_seqlen, device, validate):
    if not isinstance(cu, torch.Tensor) or cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 1:
        got = f"{cu.dtype} tensor of shape {tuple(cu.shape)}" if isinstance(cu, torch.Tensor) else type(cu).__name__
        raise TypeError(f"{name} must be a 1-D int32 tensor [batch + 1], got {got}")
    if cu.device != device:
        raise ValueError(f"{name} is on {cu.device} but q is on {device}")
    if max_seqlen < 0:
        raise ValueError(f"max_seqlen for {name} must be >= 0, got {max_seqlen}")
    if not torch.compiler.is_compiling() and validation_enabled(validate):
        _check_cu_seqlens_values(cu, name, total, max_seqlen)


def _check_cu_seqlens_values(cu, name, total, max_seqlen):
    """The value checks: one device sync, on every call. No verdict is cached: a tensor's contents can change
    without a version bump (writes through .data or a numpy view), so a cached verdict could be stale. Callers
    that built cu_seqlens themselves from checked counts (the models) pass validate=False instead."""
    lengths = cu[1:] - cu[:-1]
    first, last = cu[0], cu[-1]
    shortest, longest = (lengths.min(), lengths.max()) if cu.numel() > 1 else (first * 0, first * 0)
    first, last, shortest, longest = torch.stack([first, last, shortest, longest]).tolist()
    if first != 0:
        raise ValueError(f"{name}[0] must be 0, got {first}")
    if last != total:
        raise ValueError(f"{name}[-1] = {last} must equal the number of tokens {total}")
    if shortest < 0:
        raise ValueError(f"{name} must be non-decreasing (a sequence has length {shortest})")
    if longest > max_seqlen:
        raise ValueError(f"max_seqlen {max_seqlen} for {name} is below the longest sequence ({longest})")


def _check_qkv(q, k, v):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            raise ValueError(f"{name} must be a [total_tokens, heads, head_dim] tensor, got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if x.dtype not in _DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16 or float32, got {x.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v devices differ: {q.device}, {k.device}, {v.device}")
    (_, heads, dim), (n_k, heads_k, dim_k) = q.shape, k.shape  # ints: torch.Size comparisons cost microseconds
    if heads != heads_k or dim != dim_k or (n_k, heads_k, dim_k) != tuple(v.shape):
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} (need "
                         "equal heads and head_dim, and k, v of the same length)")


def _check_triton_head_dim(head_dim):
    if not _triton().head_dim_supported(head_dim):
        raise ValueError(f"triton attention supports head_dim % 8 == 0 in [16, 128], got {head_dim}")


# -------------------------------------------------------------------------------------------------- Triton op
def _unit_last(x):
    """The kernels index the head dim with unit stride and take token and head strides that are multiples of 8
    (contiguous tensors and slices of a packed qkv are, D being a multiple of 8); anything else is copied."""
    strides = x.stride()  # 3-D [T, H, D] or 4-D [T, 3, H, D]: the outer strides are 0, 1 and -2
    return x if strides[-1] == 1 and not (strides[0] | strides[1] | strides[-2]) & 7 else x.contiguous()


_kernels = _empty = None


def _triton():
    """kernels/flash_attn.py, imported on first use: importing triton is slow and must follow TRITON_INTERPRET."""
    global _kernels, _empty
    if _kernels is None:
        from maskdit_fast.kernels import flash_attn
        from maskdit_fast.kernels._common import empty
        _kernels, _empty = flash_attn, empty
    return _kernels


def _varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal):
    return _triton().varlen_fwd(_unit_last(q), _unit_last(k), _unit_last(v), cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                max_seqlen_k, softmax_scale, causal)


def _varlen_bwd(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                causal):
    kernels = _triton()
    dq, dk, dv = (_empty(x.shape, x.dtype, x.device) for x in (q, k, v))
    kernels.varlen_bwd(_unit_last(dout), _unit_last(q), _unit_last(k), _unit_last(v), out, lse, cu_seqlens_q,
                         cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, dq, dk, dv)
    return dq, dk, dv


def _packed_fwd(qkv, cu_seqlens, max_seqlen, softmax_scale, causal):
    qkv = _unit_last(qkv)
    return _triton().varlen_fwd(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                softmax_scale, causal)


def _packed_bwd(dout, qkv, out, lse, cu_seqlens, max_seqlen, softmax_scale, causal):
    qkv = _unit_last(qkv)
    kernels = _triton()
    dqkv = _empty(qkv.shape, qkv.dtype, qkv.device)  # dq, dk, dv written into its three slices
    kernels.varlen_bwd(_unit_last(dout), qkv[:, 0], qkv[:, 1], qkv[:, 2], out, lse, cu_seqlens, cu_seqlens,
                         max_seqlen, max_seqlen, softmax_scale, causal, dqkv[:, 0], dqkv[:, 1], dqkv[:, 2])
    return dqkv


_lib = torch.library.Library("maskdit_fast", "FRAGMENT")
# cu_seqlens None: the dense layout, B = total / max_seqlen sequences of max_seqlen tokens.
_varlen_fwd_op = define_op(
    _lib, "varlen_attn_fwd(Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, SymInt max_seqlen_q, "
          "SymInt max_seqlen_k, float softmax_scale, bool causal) -> (Tensor, Tensor)", _varlen_fwd,
    lambda q, *_: (q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)))
_varlen_bwd_op = define_op(
    _lib, "varlen_attn_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? cu_seqlens_q, "
          "Tensor? cu_seqlens_k, SymInt max_seqlen_q, SymInt max_seqlen_k, float softmax_scale, bool causal) "
          "-> (Tensor, Tensor, Tensor)", _varlen_bwd,
    lambda dout, q, k, v, *_: (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)))
_packed_fwd_op = define_op(
    _lib, "varlen_attn_qkvpacked_fwd(Tensor qkv, Tensor? cu_seqlens, SymInt max_seqlen, float softmax_scale, "
          "bool causal) -> (Tensor, Tensor)", _packed_fwd,
    lambda qkv, *_: (qkv.new_empty((qkv.shape[0], *qkv.shape[2:])),
                     qkv.new_empty((qkv.shape[2], qkv.shape[0]), dtype=torch.float32)))
_packed_bwd_op = define_op(
    _lib, "varlen_attn_qkvpacked_bwd(Tensor dout, Tensor qkv, Tensor out, Tensor lse, Tensor? cu_seqlens, "
          "SymInt max_seqlen, float softmax_scale, bool causal) -> Tensor", _packed_bwd,
    lambda dout, qkv, *_: qkv.new_empty(qkv.shape))


def _outputs(ctx, out, lse, return_lse):
    """The Functions' outputs: out, or (out, lse) with lse not differentiable. Without lse the call skips marking
    it (host time of the dense ops, which never return it)."""
    if not return_lse:
        return out
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)  # no zero-filled grad for lse
    return out, lse


class _TritonVarlen(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
                return_lse):
        out, lse = _varlen_fwd_op(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                                  causal)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k)
        ctx.args = (max_seqlen_q, max_seqlen_k, softmax_scale, causal)
        return _outputs(ctx, out, lse, return_lse)

    @staticmethod
    def backward(ctx, dout, *_dlse):
        q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
        dq, dk, dv = _varlen_bwd_op(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, *ctx.args)
        return dq, dk, dv, None, None, None, None, None, None, None


class _TritonPacked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, cu_seqlens, max_seqlen, softmax_scale, causal, return_lse):
        out, lse = _packed_fwd_op(qkv, cu_seqlens, max_seqlen, softmax_scale, causal)
        ctx.save_for_backward(qkv, out, lse, cu_seqlens)
        ctx.args = (max_seqlen, softmax_scale, causal)
        return _outputs(ctx, out, lse, return_lse)

    @staticmethod
    def backward(ctx, dout, *_dlse):
        qkv, out, lse, cu_seqlens = ctx.saved_tensors
        return _packed_bwd_op(dout, qkv, out, lse, cu_seqlens, *ctx.args), None, None, None, None, None


def _attention_pairs(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, total_q):
    """sum_b Lq_b * Lk_b; the dense layout (no cu_seqlens) has total_q / max_q sequences of max_q x max_k pairs;
    without real values (fake/meta tensors) the bound B * max_q * max_k."""
    from torch._subclasses.fake_tensor import is_fake
    if cu_seqlens_q is None:
        return total_q // max(max_seqlen_q, 1) * max_seqlen_q * max_seqlen_k
    if cu_seqlens_q.is_meta or is_fake(cu_seqlens_q) or cu_seqlens_k.is_meta or is_fake(cu_seqlens_k):
        return (cu_seqlens_q.numel() - 1) * max_seqlen_q * max_seqlen_k
    lq = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).long()
    lk = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).long()
    return int((lq * lk).sum())


@register_flop_formula(torch.ops.maskdit_fast.varlen_attn_fwd, get_raw=True)
def _varlen_fwd_flops(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *args, out_val=None,
                      **kwargs):
    return 4 * _attention_pairs(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, q.shape[0]) * q.shape[1] * q.shape[2]


@register_flop_formula(torch.ops.maskdit_fast.varlen_attn_bwd, get_raw=True)
def _varlen_bwd_flops(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *args,
                      out_val=None, **kwargs):
    return 10 * _attention_pairs(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, q.shape[0]) * q.shape[1] * q.shape[2]


@register_flop_formula(torch.ops.maskdit_fast.varlen_attn_qkvpacked_fwd, get_raw=True)
def _packed_fwd_flops(qkv, cu_seqlens, max_seqlen, *args, out_val=None, **kwargs):
    return 4 * _attention_pairs(cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, qkv.shape[0]) * qkv.shape[2] * qkv.shape[3]


@register_flop_formula(torch.ops.maskdit_fast.varlen_attn_qkvpacked_bwd, get_raw=True)
def _packed_bwd_flops(dout, qkv, out, lse, cu_seqlens, max_seqlen, *args, out_val=None, **kwargs):
    return 10 * _attention_pairs(cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, qkv.shape[0]) * qkv.shape[2] * qkv.shape[3]


# ---------------------------------------------------------------------------------------------------- CUDA op
# The CUDA extension (csrc/) has no attention kernel: backend "cuda" runs "torch".


# -------------------------------------------------------------------------------------------- other back-ends
@functools.lru_cache(maxsize=None)
def _torch_varlen_attn():
    """torch.nn.attention.varlen.varlen_attn (torch >= 2.10) and whether it takes scale/window_size."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    return varlen_attn, "scale" in params, "window_size" in params


def _varlen_torch_native(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal,
                         return_lse):
    from torch.nn.attention.varlen import AuxRequest
    varlen_attn, takes_scale, takes_window = _torch_varlen_attn()
    kwargs = {"return_aux": AuxRequest(lse=True) if return_lse else None}
    if takes_scale:
        kwargs["scale"] = scale
    else:  # torch 2.10: fixed D**-0.5; fold the requested scale into q
        q = q * (scale * q.shape[-1] ** 0.5)
    if takes_window:
        kwargs["window_size"] = (-1, 0) if causal else (-1, -1)
    else:
        kwargs["is_causal"] = causal
    return varlen_attn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, **kwargs)


def _varlen_sdpa(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, causal, return_lse):
    """The reference: SDPA per sequence (host loop over cu_seqlens)."""
    outs, lses = [], []
    for qs, qe, ks, ke in zip(cu_seqlens_q[:-1].tolist(), cu_seqlens_q[1:].tolist(), cu_seqlens_k[:-1].tolist(),
                              cu_seqlens_k[1:].tolist()):
        qi, ki, vi = (x.transpose(0, 1).unsqueeze(0) for x in (q[qs:qe], k[ks:ke], v[ks:ke]))  # [1, H, L, D]
        lq, lk = qe - qs, ke - ks
        mask = None
        if causal:  # bottom-right aligned
            mask = (torch.arange(lk, device=q.device)[None, :]
                    <= torch.arange(lq, device=q.device)[:, None] + (lk - lq))
        if lk == 0:
            out = qi.new_zeros(qi.shape)
        else:
            out = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=scale)
            if mask is not None and lq > lk:  # rows that see no key: 0 (SDPA may give NaN there)
                out = torch.where(mask.any(-1)[:, None], out, 0.0)
        outs.append(out[0].transpose(0, 1))
        if return_lse:
            with torch.no_grad():
                s = (qi[0].float() @ ki[0].float().transpose(-1, -2)) * scale
                if mask is not None:
                    s = s.masked_fill(~mask, float("-inf"))
                lse = torch.logsumexp(s, -1) if lk > 0 else s.new_full((q.shape[1], lq), float("-inf"))
                lses.append(torch.where(lse == float("-inf"), float("inf"), lse))
    out = torch.cat(outs) if outs else q.new_zeros(q.shape)
    if not return_lse:
        return out
    return out, (torch.cat(lses, 1) if lses else q.new_zeros((q.shape[1], q.shape[0]), dtype=torch.float32))


def _varlen_flash_attn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal,
                       return_lse):
    from flash_attn import flash_attn_varlen_func
    res = flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, 0.0,
                                 softmax_scale=scale, causal=causal, return_attn_probs=return_lse)
    return (res[0], res[1]) if return_lse else res


def _varlen_xformers(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, causal):
    from xformers.ops import fmha
    lq = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).tolist()
    lk = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).tolist()
    bias_cls = fmha.attn_bias.BlockDiagonalCausalFromBottomRightMask if causal else fmha.attn_bias.BlockDiagonalMask
    bias = bias_cls.from_seqlens(q_seqlen=lq, kv_seqlen=lk)
    return fmha.memory_efficient_attention(q[None], k[None], v[None], attn_bias=bias, scale=scale)[0]


# --------------------------------------------------------------------------------------------------- dispatch
def resolve_attention_backend(backend, device):
    """Concrete attention back-end ("torch", "triton", "flash_attn" or "xformers") for `device`.

    Extends maskdit_fast.backend.resolve_backend with the optional libraries; raises RuntimeError when
    the requested one is not installed or cannot run on `device`.
    """
    name = backend or get_backend()
    if name in _OPTIONAL:
        if importlib.util.find_spec(name) is None:
            raise RuntimeError(f"attention backend {name!r} requested but {_OPTIONAL[name]} is not installed")
        if torch.device(device).type != "cuda":
            raise RuntimeError(f"attention backend {name!r} needs CUDA tensors (got {device})")
        return name
    if name not in ("auto",) + ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; expected one of {('auto',) + ATTENTION_BACKENDS}")
    return resolve_backend(name, device, cuda_impl=False)  # no CUDA-extension attention: "cuda" runs torch


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale=None,
                     causal=False, *, return_lse=False, backend=None, validate=None):
    """Attention over packed variable-length sequences (drop-in for flash-attn's flash_attn_varlen_func).

    Args:
        q: [total_q, H, D] float16/bfloat16/float32 (unit stride on D; other strides are free, e.g. a
            slice of a packed qkv).
        k, v: [total_k, H, D], same dtype and device.
        cu_seqlens_q, cu_seqlens_k: int32 [B+1], 0 = c[0] <= c[1] <= ... <= c[B] = total; sequence b is
            tokens c[b]:c[b+1] (zero-length sequences allowed). Values checked once per tensor (one device
            sync; re-checked when modified in place) unless validation is off.
        max_seqlen_q, max_seqlen_k: Python ints >= the longest sequence (size the launch grid only).
        softmax_scale: defaults to D ** -0.5.
        causal: bottom-right aligned causal mask (query i sees key j iff j <= i + Lk - Lq).
        return_lse: also return the log-sum-exp (natural log, float32) in flash-attn's varlen layout
            [H, total_q]; +inf for rows that see no key. Not differentiable. Not available with "xformers".
        backend: see the module docstring; None uses the global default.
        validate: check the cu_seqlens values (a device sync); None = MASKDIT_FAST_VALIDATE (default on).
            Off for cu_seqlens the caller built itself (as the model does).
    Returns:
        out [total_q, H, D] in q's dtype (rows that see no key are 0), or (out, lse).
    """
    _check_qkv(q, k, v)
    _check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", q.shape[0], max_seqlen_q, q.device, validate)
    _check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", k.shape[0], max_seqlen_k, q.device, validate)
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k hold different batch sizes "
                         f"({cu_seqlens_q.numel() - 1} vs {cu_seqlens_k.numel() - 1})")
    scale = _softmax_scale(softmax_scale, q.shape[-1])
    name = resolve_attention_backend(backend, q.device)
    if name == "triton":
        _check_triton_head_dim(q.shape[-1])
        return _TritonVarlen.apply(q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k), scale,
                                   bool(causal), bool(return_lse))
    if name == "flash_attn":
        return _varlen_flash_attn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal,
                                  return_lse)
    if name == "xformers":
        if return_lse:
            raise ValueError("return_lse is not supported with the 'xformers' attention backend")
        return _varlen_xformers(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, causal)
    if q.is_cuda and q.dtype != torch.float32 and _torch_varlen_attn() is not None:
        return _varlen_torch_native(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal,
                                    return_lse)
    return _varlen_sdpa(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, causal, return_lse)


def varlen_attention_qkvpacked(qkv, cu_seqlens, max_seqlen, softmax_scale=None, causal=False, *,
                               return_lse=False, backend=None, validate=None):
    """Self-attention over packed sequences with q, k, v in one tensor (flash_attn_varlen_qkvpacked_func).

    Args:
        qkv: [total, 3, H, D] (e.g. the qkv Linear output viewed as [total, 3, H, D]); with "triton" the
            gradient is written straight into one [total, 3, H, D] tensor (no split/concat copies).
        cu_seqlens: int32 [B+1]; max_seqlen: int. Others as for varlen_attention.
    Returns:
        out [total, H, D], or (out, lse [H, total]) with return_lse.
    """
    if not isinstance(qkv, torch.Tensor) or qkv.dim() != 4 or qkv.shape[1] != 3:
        raise ValueError(f"qkv must be [total, 3, heads, head_dim], got "
                         f"{tuple(qkv.shape) if isinstance(qkv, torch.Tensor) else type(qkv).__name__}")
    name = resolve_attention_backend(backend, qkv.device)
    if name != "triton":
        return varlen_attention(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                softmax_scale, causal, return_lse=return_lse, backend=name, validate=validate)
    _check_qkv(qkv[:, 0], qkv[:, 1], qkv[:, 2])
    _check_cu_seqlens(cu_seqlens, "cu_seqlens", qkv.shape[0], max_seqlen, qkv.device, validate)
    _check_triton_head_dim(qkv.shape[-1])
    return _TritonPacked.apply(qkv, cu_seqlens, int(max_seqlen), _softmax_scale(softmax_scale, qkv.shape[-1]),
                               bool(causal), bool(return_lse))


def attention(q, k, v, softmax_scale=None, *, backend=None):
    """Dense multi-head attention (no mask).

    Args:
        q: [B, L, H, D]; k, v: [B, Lk, H, D]. May be non-contiguous views (e.g. slices of a qkv Linear
            output reshaped [B, L, 3, H, D]): "triton" reads them in place when the batch and token dims
            merge into one stride (true for such slices), else copies.
        softmax_scale: defaults to D ** -0.5.
        backend: see the module docstring ("torch" is SDPA exactly).
    Returns:
        [B, L, H, D].
    """
    name = resolve_attention_backend(backend, q.device)
    if name == "torch":
        return attention_ref(q, k, v, softmax_scale)
    if name == "flash_attn":
        from flash_attn import flash_attn_func
        return flash_attn_func(q, k, v, softmax_scale=softmax_scale)
    if name == "xformers":
        from xformers.ops import memory_efficient_attention
        return memory_efficient_attention(q, k, v, scale=softmax_scale)
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or k.shape[0] != q.shape[0]:
        raise ValueError(f"attention expects q [B, L, H, D], k, v [B, Lk, H, D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    (batch, length, n_heads, head_dim), length_k = q.shape, k.shape[1]
    qf, kf, vf = q.reshape(batch * length, n_heads, head_dim), k.flatten(0, 1), v.flatten(0, 1)
    _check_qkv(qf, kf, vf)
    _check_triton_head_dim(head_dim)
    out = _TritonVarlen.apply(qf, kf, vf, None, None, length, length_k, _softmax_scale(softmax_scale, head_dim), False,
                              False)
    return out.view(batch, length, n_heads, head_dim)


def attention_qkvpacked(qkv, softmax_scale=None, *, backend=None):
    """Dense self-attention from a packed qkv [B, L, 3, H, D] (the qkv Linear output, reshaped).

    With "triton" the backward writes one [B, L, 3, H, D] gradient directly (no per-slice copies).
    Returns [B, L, H, D].
    """
    if not isinstance(qkv, torch.Tensor) or qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"qkv must be [B, L, 3, heads, head_dim], got "
                         f"{tuple(qkv.shape) if isinstance(qkv, torch.Tensor) else type(qkv).__name__}")
    name = resolve_attention_backend(backend, qkv.device)
    if name != "triton":
        q, k, v = qkv.unbind(2)
        return attention(q, k, v, softmax_scale, backend=name)
    batch, length, _, n_heads, head_dim = qkv.shape
    flat = qkv.reshape(batch * length, 3, n_heads, head_dim)
    _check_qkv(flat[:, 0], flat[:, 1], flat[:, 2])
    _check_triton_head_dim(head_dim)
    out = _TritonPacked.apply(flat, None, length, _softmax_scale(softmax_scale, head_dim), False, False)
    return out.view(batch, length, n_heads, head_dim)
