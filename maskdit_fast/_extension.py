"""Loads the compiled CUDA extension (maskdit_fast._C) on first use; never fails the import.

Loading it registers the `torch.ops.maskdit_fast_C.*` ops (backend "cuda"). It is only attempted
when that back-end is asked for, so a missing build, or one made for another torch, costs nothing
elsewhere; the reason is kept for error messages and warned about once.

Set MASKDIT_FAST_EXTENSION=/path/to/_C.so to load a library built elsewhere (an AOT build shipped
separately, or a CI build directory) instead of the in-package `maskdit_fast._C`.
"""
import functools
import os
import warnings

ENV_VAR = "MASKDIT_FAST_EXTENSION"
_BUILD_HINT = ("build it with `pip install --no-build-isolation -e .` on a machine with a CUDA build of "
               "torch and nvcc (CUDA_HOME set)")


@functools.lru_cache(maxsize=None)
def _load():
    """(handle, None) once loaded, else (None, reason). The handle is the module or the library path."""
    path = os.environ.get(ENV_VAR)
    if path:
        import torch
        try:
            torch.ops.load_library(path)
        except (OSError, RuntimeError) as err:  # missing file, undefined symbols (other torch)
            return None, f"{ENV_VAR}={path!r} could not be loaded ({err})"
        return path, None
    try:
        from maskdit_fast import _C
    except ImportError as err:  # not built, or built against another torch (undefined symbols)
        return None, f"extension maskdit_fast._C not loadable ({err}); {_BUILD_HINT}"
    return _C, None


def loaded():
    """True if a load was attempted and succeeded (never triggers one)."""
    return _load.cache_info().currsize > 0 and _load()[0] is not None


def available():
    """Loads the extension if needed; True if its ops are registered."""
    return _load()[0] is not None


def unavailable_reason():
    """Why the extension cannot be used (None when it can)."""
    return _load()[1]


def load(warn=True):
    """Returns the extension handle (module or library path) or None, warning once with the reason."""
    handle, reason = _load()
    if handle is None and warn:
        _warn_once(reason)
    return handle


@functools.lru_cache(maxsize=None)
def _warn_once(reason):
    warnings.warn(f"maskdit_fast: CUDA back-end disabled: {reason}", stacklevel=3)
