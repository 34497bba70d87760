"""Kernel configurations measured on a GPU, looked up by the launchers.

Each launcher has a default configuration per shape (tile sizes, warps, stages, rows per program...) that
is compiled offline for sm_90 without spills (benchmarks/compile_sm90.py). The tuning sweep
(benchmarks/tune_gpu.py) times every candidate of a kernel family on a GPU after checking it, and its
winners are committed per architecture as kernels/tuned/sm_<major><minor>.json:

    {"<family>": {"<key>": {"BLOCK_M": 64, "num_warps": 4, ...}, ...}, ...}

`<key>` is the shape the choice depends on, written by `shape_key` (e.g. "D=1152" or "Dh=72,L=128").
A launcher asks `tuned(family, key, default)` and gets the committed winner for the current device's
architecture, else its default; the interpreter (CPU) always gets the default. `override` makes every
lookup of one family return a given configuration, which is how the sweep times candidates through the
production launch path.
"""
import contextlib
import functools
import json
import os

import torch

TUNED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tuned")

_overrides = {}  # family -> configuration forced by `override`


def shape_key(**dims):
    """Canonical key of a shape: "name=value" pairs sorted by name, comma-joined."""
    return ",".join(f"{k}={dims[k]}" for k in sorted(dims))


def arch_name(device=None):
    """"sm_90" for a compute-capability 9.0 CUDA device (the current one by default)."""
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


@functools.lru_cache(maxsize=None)
def table(arch):
    """The committed {family: {key: config}} of `arch` ({} when none is committed)."""
    path = os.path.join(TUNED_DIR, f"{arch}.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ValueError(f"{path}: expected {{family: {{key: config}}}}")
    return data


@functools.lru_cache(maxsize=None)
def _device_arch(index):
    return arch_name(index)


def tuned(family, key, default, device=None):
    """The configuration of kernel `family` for shape `key` (a `shape_key` string) on `device` (a
    torch.device; None or CPU: the interpreter, which takes `default`): an override, else the committed
    measured winner for the device's architecture, else `default`. Returns a dict the caller must not
    modify (launchers cache what they build from it)."""
    forced = _overrides.get(family)
    if forced is not None:
        return forced
    if device is None or device.type != "cuda":
        return default
    index = device.index if device.index is not None else torch.cuda.current_device()
    return table(_device_arch(index)).get(family, {}).get(key, default)


@contextlib.contextmanager
def override(family, config):
    """Within the block every `tuned(family, ...)` returns `config` (a dict). Launchers that cache their
    launch metadata per configuration must key that cache on the returned dict's contents."""
    previous = _overrides.get(family)
    _overrides[family] = dict(config)
    try:
        yield
    finally:
        if previous is None:
            _overrides.pop(family)
        else:
            _overrides[family] = previous
