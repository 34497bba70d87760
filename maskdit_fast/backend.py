"""Kernel back-end selection shared by every op in `maskdit_fast.ops`.

Precedence: the per-call `backend=` keyword, then `set_backend(...)`, then the environment
variable MASKDIT_FAST_BACKEND, then "auto". "auto" picks the fastest back-end that runs on the
tensor's device, as measured on an H200 at MaskDiT-XL/2 shapes (benchmarks/results/2026-11-26-nvidia-h200*):
the compiled "cuda" extension for the ops it implements (1.15-2.5x torch eager, forward + backward),
else the "torch" reference (torch eager beat the Triton kernels' forward + backward there: 0.24-0.57x).
"triton" is used only when asked for.
"""
import contextlib
import importlib.util
import os

import torch

BACKENDS = ("torch", "triton", "cuda")
ENV_VAR = "MASKDIT_FAST_BACKEND"
_configured = None  # set by set_backend(); None defers to the environment variable


def set_backend(name):
    """Sets the process-wide default back-end: one of BACKENDS, "auto", or None (use the env var)."""
    global _configured
    if name is not None and name != "auto" and name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {('auto',) + BACKENDS}")
    _configured = name


def get_backend():
    """The configured default back-end name ("auto" unless set)."""
    name = _configured or os.environ.get(ENV_VAR) or "auto"
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={name!r} is not one of {('auto',) + BACKENDS}")
    return name


@contextlib.contextmanager
def use_backend(name):
    """Context manager form of set_backend()."""
    previous = _configured
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def triton_interpreted():
    """True when Triton kernels run under the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_TRITON = importlib.util.find_spec("triton") is not None  # fixed per process; a plain bool traces under dynamo


def triton_available():
    """True when the triton package is installed (checked once, at import)."""
    return _TRITON


def result_dtype(*tensors):
    """dtype of an op's output: torch's promotion over its float tensor arguments (None skipped)."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def resolve_backend(backend, device, cuda_impl=True):
    """Returns the concrete back-end ("torch", "triton" or "cuda") for a call on `device`.

    cuda_impl: whether the op has a "cuda" (csrc/) implementation; ops without one run "torch" for "auto"
    and "cuda" alike (the extension holds the dense glue ops only). Raises a clear error when the
    requested back-end cannot run there.
    """
    name = backend or get_backend()
    device = torch.device(device)
    if name == "auto":
        if device.type == "cuda" and cuda_impl:
            from maskdit_fast import _extension
            if _extension.load(warn=True) is not None:  # a missing build is said once, then torch runs
                return "cuda"
        return "torch"
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {('auto',) + BACKENDS}")
    if name == "cuda" and not cuda_impl:
        return "torch"
    if name == "triton":
        if not triton_available():
            raise RuntimeError("backend 'triton' requested but triton is not installed")
        if device.type != "cuda" and not triton_interpreted():
            raise RuntimeError(
                f"backend 'triton' needs CUDA tensors (got {device}); on CPU set TRITON_INTERPRET=1 "
                "before importing triton to run the kernels under the Triton interpreter")
    if name == "cuda":
        if device.type != "cuda":
            raise RuntimeError(f"backend 'cuda' needs CUDA tensors (got {device})")
        from maskdit_fast import _extension
        if not _extension.available():
            raise RuntimeError(f"backend 'cuda' unavailable: {_extension.unavailable_reason()}")
    return name
