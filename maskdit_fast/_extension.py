"""Loads the compiled CUDA extension (maskdit_fast._C) if present; never fails the import."""
import functools
import warnings


@functools.lru_cache(maxsize=None)
def _load():
    try:
        from maskdit_fast import _C  # noqa: F401  (registers the TORCH_LIBRARY ops on import)
    except ImportError as err:  # not built, or built against another torch
        return None, f"extension maskdit_fast._C not loadable ({err}); build it with " \
                     "`pip install --no-build-isolation -e .` on a machine with CUDA torch and nvcc"
    return _C, None


def available():
    return _load()[0] is not None


def unavailable_reason():
    return _load()[1]


def load(warn=True):
    """Returns the extension module or None (warning once with the reason)."""
    module, reason = _load()
    if module is None and warn:
        _warn_once(reason)
    return module


@functools.lru_cache(maxsize=None)
def _warn_once(reason):
    warnings.warn(f"maskdit_fast: CUDA back-end disabled: {reason}", stacklevel=3)
