"""The callables the report times for each back-end name, and whether a back-end can run here,
decided by explicit capability checks (device type, installed packages, the built extension, SDPA's
own kernel-selection predicates), never by the text of an error. Anything that raises after these
checks passed is a failed check, not an unavailable back-end."""
import functools
import importlib.util
import inspect

import torch

from maskdit_fast import ops
from maskdit_fast.backend import triton_available

# Back-ends whose timings mean nothing (Triton interpreter) or that cannot run without a GPU.
GPU_ONLY_BACKENDS = ("triton", "cuda", "flash_attn", "xformers", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient",
                     "torch_varlen")
_OPTIONAL_PACKAGES = {"flash_attn": "flash-attn", "xformers": "xformers"}
# SDPA pinned to one kernel: (SDPBackend member, is it enabled, can it take these inputs).
_SDPA_KERNELS = {
    "sdpa_flash": ("FLASH_ATTENTION", "flash_sdp_enabled", "can_use_flash_attention"),
    "sdpa_cudnn": ("CUDNN_ATTENTION", "cudnn_sdp_enabled", "can_use_cudnn_attention"),
    "sdpa_efficient": ("EFFICIENT_ATTENTION", "mem_efficient_sdp_enabled", "can_use_efficient_attention"),
}
_VARLEN_DTYPES = (torch.float16, torch.bfloat16)  # torch.nn.attention.varlen.varlen_attn's dtypes


class Unavailable(Exception):
    """A back-end that cannot run here (reported as an unavailable row, not a failure)."""


def unavailable_reason(case, backend, device):
    """Why `backend` cannot run `case` on `device` (None when it can), from the capabilities the
    back-end needs; input-dependent ones (SDPA's kernel choice, varlen_attn's dtypes) are checked
    by the callable itself (Unavailable)."""
    device = torch.device(device)
    if backend in GPU_ONLY_BACKENDS and device.type != "cuda":
        return "needs a CUDA GPU (Triton-interpreter / CPU timings are meaningless)"
    if backend == "triton":
        if not triton_available():
            return "triton is not installed"
        if case.head_dim:
            from maskdit_fast.kernels import flash_attn
            if not flash_attn.head_dim_supported(case.head_dim):
                return f"the Triton attention kernels do not take head dim {case.head_dim}"
    if backend == "cuda":
        from maskdit_fast.backend import extension_available, extension_unavailable_reason
        if not extension_available():
            return f"the CUDA extension is not available: {extension_unavailable_reason()}"
    if backend in _OPTIONAL_PACKAGES and importlib.util.find_spec(backend) is None:
        return f"{_OPTIONAL_PACKAGES[backend]} is not installed"
    if backend == "torch_varlen" and importlib.util.find_spec("torch.nn.attention.varlen") is None:
        return f"torch.nn.attention.varlen is not in torch {torch.__version__}"
    return None


def _sdpa_with(backend):
    """SDPA pinned to one kernel; raises Unavailable when SDPA's own predicate says that kernel
    cannot take the inputs (dtype, head dim, architecture) or it is switched off."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    member, enabled, can_use = _SDPA_KERNELS[backend]
    kernel = getattr(SDPBackend, member)

    def run(q, k, v):
        if not getattr(torch.backends.cuda, enabled)():
            raise Unavailable(f"torch.backends.cuda.{enabled}() is False")
        params = torch.backends.cuda.SDPAParams(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None,
                                                0.0, False, False)
        if not getattr(torch.backends.cuda, can_use)(params):
            raise Unavailable(f"torch.backends.cuda.{can_use} is False for {q.dtype}, head dim {q.shape[-1]}")
        with sdpa_kernel([kernel]):
            return ops.attention_ref(q, k, v)
    return run


@functools.lru_cache(maxsize=None)
def _cu_seqlens(batch, length, device):
    return torch.arange(0, (batch + 1) * length, length, dtype=torch.int32, device=device)


def _torch_varlen(q, k, v):
    """Dense attention through torch.nn.attention.varlen.varlen_attn on equal-length sequences."""
    if q.dtype not in _VARLEN_DTYPES:
        raise Unavailable(f"varlen_attn takes {', '.join(map(str, _VARLEN_DTYPES))}, not {q.dtype}")
    from torch.nn.attention.varlen import varlen_attn
    B, L, H, Dh = q.shape
    cu = _cu_seqlens(B, L, str(q.device))
    out = varlen_attn(q.reshape(B * L, H, Dh), k.reshape(B * L, H, Dh), v.reshape(B * L, H, Dh), cu, cu, L, L)
    return out.reshape(B, L, H, Dh)


_COMPILED = {}


def backend_fn(case, backend, device):
    """Callable(*args) running `case` on `backend`; raises Unavailable when it cannot run on `device`."""
    reason = unavailable_reason(case, backend, device)
    if reason:
        raise Unavailable(reason)
    if backend == "compile":
        if case.ref not in _COMPILED:
            _COMPILED[case.ref] = torch.compile(case.ref, dynamic=False)
        return _COMPILED[case.ref]
    if backend in _SDPA_KERNELS:
        return _sdpa_with(backend)
    if backend == "torch_varlen":
        return _torch_varlen
    if "validate" in inspect.signature(case.op).parameters:  # index checks sync with the host: off
        return functools.partial(case.op, backend=backend, validate=False)
    return functools.partial(case.op, backend=backend)
