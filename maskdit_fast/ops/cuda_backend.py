"""The "cuda" back-end: hand-written CUDA C++ kernels (csrc/, `torch.ops.maskdit_fast_C`) for the
memory-bound ops, with the same signatures and semantics as the references in
`maskdit_fast.ops.gather_scatter` and `maskdit_fast.ops.modulate`.

Each public function validates its inputs (CUDA device, float32/float16/bfloat16, shapes), applies
the reference's dtype promotion, makes inputs contiguous, and runs an autograd.Function around
the forward/backward ops. Statistics and reductions are fp32 and deterministic (no atomics).
Fake (meta) impls are registered here so the ops trace under torch.compile; the C++ library names
this module as their home (`set_python_module`), so torch imports it when it needs them.

Meta tensors are accepted too: they run the fake impls, i.e. shape and dtype propagation through
the same autograd wiring (how the CPU tests check it).

Index checks (0 <= ids_keep < L, distinct per sample) run on the device without a host sync: a
bad index stops the kernel with a device-side assert naming the problem, as torch.gather does.
"""
import torch

from maskdit_fast import backend
from maskdit_fast.backend import result_dtype

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_NS = "maskdit_fast_C"
_ready = False  # library loaded and fakes registered (a plain flag: torch.compile traces through it)


def _ops():
    """torch.ops.maskdit_fast_C, loading the extension (and registering fakes) on first use."""
    if not _ready:
        if backend.load_extension(warn=False) is None:
            raise RuntimeError(f"backend 'cuda' unavailable: {backend.extension_unavailable_reason()}")
        _register_fakes()
    return getattr(torch.ops, _NS)


def _ops_defined():
    return hasattr(getattr(torch.ops, _NS), "gather_tokens")


def _register_fakes():
    """Fake (meta) impls: output shapes and dtypes of each op, for torch.compile and meta tensors."""
    global _ready

    @torch.library.register_fake(f"{_NS}::gather_tokens")
    def _(x, ids_keep, pos_embed):
        return x.new_empty((x.shape[0], ids_keep.shape[1], x.shape[2]))

    @torch.library.register_fake(f"{_NS}::gather_tokens_backward")
    def _(grad_out, ids_keep, length, pos_grad):
        B, _K, D = grad_out.shape
        return grad_out.new_empty((B, length, D)), grad_out.new_empty((length, D) if pos_grad else (0,))

    @torch.library.register_fake(f"{_NS}::scatter_tokens")
    def _(x_kept, ids_keep, mask_token, length, pos_embed):
        return x_kept.new_empty((x_kept.shape[0], length, x_kept.shape[2]))

    @torch.library.register_fake(f"{_NS}::scatter_tokens_backward")
    def _(grad_out, ids_keep, mask_grad, pos_grad):
        B, L, D = grad_out.shape
        return (grad_out.new_empty((B, ids_keep.shape[1], D)), grad_out.new_empty((D,) if mask_grad else (0,)),
                grad_out.new_empty((L, D) if pos_grad else (0,)))

    _ready = True


# ---- input validation ----

def _check_tensor(name, t, device=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"backend 'cuda': {name} must be a torch.Tensor (got {type(t).__name__})")
    if t.device.type not in ("cuda", "meta"):  # meta: shapes/dtypes only, through the fake impls
        raise RuntimeError(f"backend 'cuda': {name} must be a CUDA tensor (got {t.device})")
    if device is not None and t.device != device:
        raise RuntimeError(f"backend 'cuda': {name} is on {t.device} but the other inputs are on {device}")


def _check_float(name, t, device=None):
    _check_tensor(name, t, device)
    if t.dtype not in _DTYPES:
        raise TypeError(f"backend 'cuda': {name} must be float32, float16 or bfloat16 (got {t.dtype})")


def _check_x(name, x):
    _check_float(name, x)
    if x.dim() != 3:
        raise ValueError(f"backend 'cuda': {name} must be [B, L, D] (got shape {tuple(x.shape)})")
    return x.shape


def _check_ids(ids_keep, B, L, device):
    _check_tensor("ids_keep", ids_keep, device)
    if ids_keep.dtype != torch.int64:
        raise TypeError(f"backend 'cuda': ids_keep must be int64 (got {ids_keep.dtype})")
    if ids_keep.dim() != 2 or ids_keep.shape[0] != B or ids_keep.shape[1] > L:
        raise ValueError(f"backend 'cuda': ids_keep must be [B={B}, K] with K <= L={L} "
                         f"(got shape {tuple(ids_keep.shape)})")
    return ids_keep.contiguous()


def _check_pos(pos_embed, L, D, device):
    if pos_embed is None:
        return None
    _check_float("pos_embed", pos_embed, device)
    if pos_embed.numel() != L * D:
        raise ValueError(f"backend 'cuda': pos_embed must be [L, D] or [1, L, D] with L={L}, D={D} "
                         f"(got shape {tuple(pos_embed.shape)})")
    return pos_embed.reshape(L, D)


def _check_cond(name, t, B, L, D, device):
    """t as [B, D] (per sample; [B, 1, D] too, as the public op takes it) or [B, L, D] (per token)."""
    _check_float(name, t, device)
    if tuple(t.shape) == (B, 1, D) and L != 1:
        return t.reshape(B, D)
    if tuple(t.shape) not in ((B, D), (B, L, D)):
        raise ValueError(f"backend 'cuda': {name} must be [B, D] = [{B}, {D}], [B, 1, D] or [B, L, D] = "
                         f"[{B}, {L}, {D}] (got shape {tuple(t.shape)})")
    return t


def _prep(t, dtype):
    """Differentiable cast + contiguous copy only when needed (autograd routes grads back)."""
    return None if t is None else t.to(dtype).contiguous()


# ---- autograd wiring ----

class _GatherTokens(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ids_keep, pos_embed):
        ctx.save_for_backward(ids_keep)
        ctx.length = x.shape[1]
        return torch.ops.maskdit_fast_C.gather_tokens(x, ids_keep, pos_embed)

    @staticmethod
    def backward(ctx, grad_out):
        (ids_keep,) = ctx.saved_tensors
        pos_grad = ctx.needs_input_grad[2]
        grad_x, grad_pos = torch.ops.maskdit_fast_C.gather_tokens_backward(
            grad_out.contiguous(), ids_keep, ctx.length, pos_grad)
        return grad_x if ctx.needs_input_grad[0] else None, None, grad_pos if pos_grad else None


class _ScatterTokens(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_kept, ids_keep, mask_token, length, pos_embed):
        ctx.save_for_backward(ids_keep)
        return torch.ops.maskdit_fast_C.scatter_tokens(x_kept, ids_keep, mask_token, length, pos_embed)

    @staticmethod
    def backward(ctx, grad_out):
        (ids_keep,) = ctx.saved_tensors
        mask_grad, pos_grad = ctx.needs_input_grad[2], ctx.needs_input_grad[4]
        grad_x, grad_mask, grad_pos = torch.ops.maskdit_fast_C.scatter_tokens_backward(
            grad_out.contiguous(), ids_keep, mask_grad, pos_grad)
        return (grad_x if ctx.needs_input_grad[0] else None, None, grad_mask if mask_grad else None, None,
                grad_pos if pos_grad else None)


# ---- public API (reference signatures) ----

def gather_tokens(x, ids_keep, pos_embed=None):
    """Gathers the kept tokens (+ position embedding) with the CUDA kernels.

    Args:
        x: [B, L, D] CUDA float32/float16/bfloat16.
        ids_keep: [B, K] int64 positions in [0, L), distinct per sample (the backward scatters).
        pos_embed: optional [L, D] or [1, L, D], added before gathering.
    Returns:
        [B, K, D] with out[b, k] = x[b, ids_keep[b, k]] + pos_embed[ids_keep[b, k]], in the promoted
        dtype of x and pos_embed. Backward: grad_x scattered into zeros, grad_pos_embed summed over b.
    """
    _ops()
    B, L, D = _check_x("x", x)
    ids_keep = _check_ids(ids_keep, B, L, x.device)
    pos_embed = _check_pos(pos_embed, L, D, x.device)
    dtype = result_dtype(x, pos_embed)
    return _GatherTokens.apply(_prep(x, dtype), ids_keep, _prep(pos_embed, dtype))


def scatter_tokens(x_kept, ids_keep, mask_token, length, pos_embed=None):
    """Scatters kept tokens onto the full grid, mask_token elsewhere (+ position embedding).

    Args:
        x_kept: [B, K, D] CUDA float32/float16/bfloat16.
        ids_keep: [B, K] int64 distinct positions in [0, length).
        mask_token: D elements (any shape, e.g. [1, 1, D]); cast to x_kept's dtype first, as in
            the reference.
        length: L >= K.
        pos_embed: optional [L, D] or [1, L, D].
    Returns:
        [B, L, D] in the promoted dtype of x_kept and pos_embed. Backward: grad_x_kept gathered at
        the kept positions; grad_mask_token summed over all masked (b, l); grad_pos_embed over b.
    """
    _ops()
    B, K, D = _check_x("x_kept", x_kept)
    length = int(length)
    if length < K:
        raise ValueError(f"backend 'cuda': length={length} is smaller than K={K}")
    ids_keep = _check_ids(ids_keep, B, length, x_kept.device)
    _check_float("mask_token", mask_token, x_kept.device)
    if mask_token.numel() != D:
        raise ValueError(f"backend 'cuda': mask_token must have D={D} elements (got shape {tuple(mask_token.shape)})")
    pos_embed = _check_pos(pos_embed, length, D, x_kept.device)
    dtype = result_dtype(x_kept, pos_embed)
    mask_token = mask_token.reshape(D).to(x_kept.dtype)
    return _ScatterTokens.apply(_prep(x_kept, dtype), ids_keep, _prep(mask_token, dtype), length,
                                _prep(pos_embed, dtype))


# torch imports this module to find the fake impls of ops loaded by other means (set_python_module).
if _ops_defined():
    _register_fakes()
