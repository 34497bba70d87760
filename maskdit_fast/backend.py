"""Kernel back-end selection shared by every op in `maskdit_fast.ops`, the loading of the compiled CUDA
extension, and the one way the ops register their compiled implementations with torch.library.

Precedence: the per-call `backend=` keyword, then `set_backend(...)`, then the environment variable
MASKDIT_FAST_BACKEND, then "auto". "auto" picks, per op, the back-end that was fastest (forward + backward) in
a committed GPU measurement of the device's architecture: kernels/tuned/<arch>-backends.json, written from a
benchmark report by `backend_table` (`python benchmarks/backend_table.py REPORT.json`). Where the architecture
or the op is not listed, or the measured winner cannot run here, it falls back to: the compiled "cuda"
extension for the ops it implements if it loads, else the "torch" reference.

The CUDA extension (maskdit_fast._C, csrc/) is loaded on first use of the "cuda" back-end, never at import: a
missing build, or one made for another torch, costs nothing elsewhere, and its reason is kept for the error
messages and warned about once. MASKDIT_FAST_EXTENSION=/path/to/_C.so loads a library built elsewhere (an AOT
build shipped separately, or a CI build directory) instead of the in-package maskdit_fast._C.
"""
import contextlib
import functools
import importlib.util
import json
import os
import warnings

import torch

BACKENDS = ("torch", "triton", "cuda")
ENV_VAR = "MASKDIT_FAST_BACKEND"
EXTENSION_ENV_VAR = "MASKDIT_FAST_EXTENSION"
_BUILD_HINT = ("build it with `pip install --no-build-isolation -e .` on a machine with a CUDA build of torch and "
               "nvcc (CUDA_HOME set)")
_configured = None  # set by set_backend(); None defers to the environment variable
_pending_fakes = []  # fake registrations of csrc/ ops waiting for the extension (on_extension_load)


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
        if t is not None and t.dtype != dtype:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


# ------------------------------------------------------------------------------------------- CUDA extension
@functools.lru_cache(maxsize=None)
def _load_extension():
    """(handle, None) once loaded, else (None, reason). The handle is the module or the library path."""
    path = os.environ.get(EXTENSION_ENV_VAR)
    if path:
        try:
            torch.ops.load_library(path)
        except (OSError, RuntimeError) as err:  # missing file, undefined symbols (other torch)
            return None, f"{EXTENSION_ENV_VAR}={path!r} could not be loaded ({err})"
        handle = path
    else:
        try:
            from maskdit_fast import _C as handle
        except ImportError as err:  # not built, or built against another torch (undefined symbols)
            return None, f"extension maskdit_fast._C not loadable ({err}); {_BUILD_HINT}"
    while _pending_fakes:
        _register_fakes(*_pending_fakes.pop(0))
    return handle, None


def _register_fakes(fakes, register):
    for name, fake in fakes.items():
        register(f"maskdit_fast_C::{name}", fake)


def on_extension_load(fakes, register):
    """Registers the fake implementations {op name: fake} of an op file's csrc/ ops once the extension's ops exist:
    now if the library is already loaded, else as soon as the "cuda" back-end loads it. `register` is
    torch.library.register_fake called from the op file (torch checks that the module registering a C++ op's fake
    is the one the library names with set_python_module)."""
    if hasattr(torch.ops.maskdit_fast_C, next(iter(fakes))):
        _register_fakes(fakes, register)
    else:
        _pending_fakes.append((fakes, register))


def extension_loaded():
    """True if a load was attempted and succeeded (never triggers one)."""
    return _load_extension.cache_info().currsize > 0 and _load_extension()[0] is not None


def extension_available():
    """Loads the extension if needed; True if its ops (torch.ops.maskdit_fast_C) are registered."""
    return _load_extension()[0] is not None


def extension_unavailable_reason():
    """Why the extension cannot be used (None when it can)."""
    return _load_extension()[1]


def load_extension(warn=True):
    """Returns the extension handle (module or library path) or None, warning once with the reason."""
    handle, reason = _load_extension()
    if handle is None and warn:
        _warn_once(reason)
    return handle


@functools.lru_cache(maxsize=None)
def _warn_once(reason):
    warnings.warn(f"maskdit_fast: CUDA back-end disabled: {reason}", stacklevel=3)


# ------------------------------------------------------------------------------------------- registration
def define_op(lib, schema, impl, fake):
    """Defines `schema` in torch.library `lib` with `impl` as its CUDA (and CPU: the Triton interpreter)
    kernel and `fake` as its fake/meta implementation (torch.compile, meta tensors); returns the OpOverload.
    The op itself is not differentiable (its outputs never require grad): the autograd.Function calling it is.

    Every compiled back-end uses the same idiom: an op per direction defined this way (or in csrc/ for the
    "cuda" back-end), called from a torch.autograd.Function. Against custom_op + register_autograd and
    triton_op it costs the least host time per forward + backward (benchmarks/host_time.py, "registration
    idioms") and still traces under torch.compile(fullgraph=True), activation checkpointing and FSDP2."""
    name = schema.split("(", 1)[0]
    lib.define(schema)
    for key in ("CPU", "CUDA"):
        lib.impl(name, impl, key)
    lib.impl(name, torch.library.fallthrough_kernel, "Autograd")
    torch.library.register_fake(f"{lib.ns}::{name}", fake, lib=lib)
    return getattr(getattr(torch.ops, lib.ns), name).default


# ------------------------------------------------------------------------------------------- measured winners
def backend_table(report, source=None, note=None):
    """The per-op back-end table of one benchmark report (the JSON `python -m maskdit_fast.bench` writes): for every op
    with forward + backward rows, the back-end among BACKENDS with the least total ms over the op's shapes (an op
    measured at several shapes, "attention[encoder]", "attention[dit]"..., counts as the op "attention"; a
    back-end missing a shape, or whose row failed its check, is out). Returns {"arch", "card", "date", "source",
    "note", "ms": {op: {backend: ms}}, "backends": {op: fastest}}."""
    totals, shapes = {}, {}
    for row in report.get("ops", []) + report.get("attention", []):
        if row.get("pass") != "fwd+bwd":
            continue
        op = row["op"].split("[", 1)[0]
        shapes.setdefault(op, set()).add(row["shape"])
        if row.get("backend") in BACKENDS and row.get("status") == "ok" and row.get("ms") is not None:
            total, seen = totals.setdefault(op, {}).get(row["backend"], (0.0, set()))
            totals[op][row["backend"]] = (total + row["ms"], seen | {row["shape"]})
    ms = {op: {b: round(t, 4) for b, (t, seen) in sorted(per.items()) if seen == shapes[op]}
          for op, per in sorted(totals.items())}
    env = report.get("env", {})
    return dict(arch="sm_" + env["sm"].replace(".", ""), card=env.get("card"), date=report.get("date"),
                source=source, note=note, ms=ms, backends={op: min(per, key=per.get) for op, per in ms.items() if per})


@functools.lru_cache(maxsize=None)
def measured_backends(arch):
    """{op: fastest measured back-end} committed for `arch` ("sm_90"), {} when none is."""
    from maskdit_fast.kernels._config import TUNED_DIR  # the kernels' tuned tables' folder, installed or not
    path = os.path.join(TUNED_DIR, f"{arch}-backends.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        table = json.load(f).get("backends")
    if not isinstance(table, dict) or not all(b in BACKENDS for b in table.values()):
        raise ValueError(f"{path}: expected \"backends\": {{op: one of {BACKENDS}}}")
    return table


@functools.lru_cache(maxsize=None)
def _device_table(index):
    major, minor = torch.cuda.get_device_capability(index)
    return measured_backends(f"sm_{major}{minor}")


@torch.compiler.assume_constant_result
def _measured_winner(op, device):
    """The measured winner of `op` on CUDA `device`, or None. A constant under torch.compile: traced, the file
    reads and device queries behind it would break the graph."""
    return _device_table(device.index if device.index is not None else torch.cuda.current_device()).get(op)


def _auto(op, device, cuda_impl):
    """"auto" on `device`: the measured winner of `op` where it is listed and can run here, else the compiled
    "cuda" extension if the op has a csrc/ implementation and the extension loads, else "torch"."""
    if device.type != "cuda":
        return "torch"
    winner = None if op is None else _measured_winner(op, device)
    if winner == "torch" or (winner == "triton" and _TRITON):
        return winner
    if cuda_impl and load_extension(warn=True) is not None:
        return "cuda"  # a missing build is said once, then torch runs
    return "torch"


# ------------------------------------------------------------------------------------------- resolution
def resolve_backend(backend, device, cuda_impl=True, op=None):
    """Returns the concrete back-end ("torch", "triton" or "cuda") for a call of `op` (its public name, the key
    of the measured table that "auto" reads) on `device`.

    cuda_impl: whether the op has a "cuda" (csrc/) implementation; ops without one run "torch" for "auto" and
    "cuda" alike (the extension holds the dense glue ops only). Raises a clear error when the requested back-end
    cannot run there. Meta tensors run the compiled back-ends' fake implementations (shapes and dtypes only).
    """
    name = backend or get_backend()
    if not isinstance(device, torch.device):
        device = torch.device(device)
    if name == "auto":
        return _auto(op, device, cuda_impl)
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {('auto',) + BACKENDS}")
    if name == "cuda" and not cuda_impl:
        return "torch"
    if name == "triton":
        if not _TRITON:
            raise RuntimeError("backend 'triton' requested but triton is not installed")
        if device.type not in ("cuda", "meta") and not triton_interpreted():
            raise RuntimeError(
                f"backend 'triton' needs CUDA tensors (got {device}); on CPU set TRITON_INTERPRET=1 "
                "before importing triton to run the kernels under the Triton interpreter")
    if name == "cuda":
        if device.type not in ("cuda", "meta"):
            raise RuntimeError(f"backend 'cuda' needs CUDA tensors (got {device})")
        if not extension_available():
            raise RuntimeError(f"backend 'cuda' unavailable: {extension_unavailable_reason()}")
    return name
