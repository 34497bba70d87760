"""kernels._common.launch on the compiled path, with a stand-in JIT function and driver (no GPU here): triton's
binder decides the specialization, JITFunction.run compiles each new one once (warmup, no launch), and every
launch calls the compiled kernel's launcher with the arguments JITFunction.run would pass."""
import collections

import pytest
import triton

from maskdit_fast.kernels import _common


class Compiled:
    """A compiled kernel: records the launcher calls."""
    function, packed_metadata = "function-handle", "packed-metadata"

    def __init__(self):
        self.calls = []
        self.run = lambda *args: self.calls.append(args)

    def launch_metadata(self, grid, stream, *args):
        return ("metadata", grid, stream, args)


class Future:
    """What JITFunction.run returns in asynchronous-compile mode."""

    def __init__(self, compiled):
        self.compiled = compiled

    def result(self):
        return self.compiled


class Kernel:
    """A JIT function: a binder keyed on the first argument's parity (its 'specialization'), and run(warmup=True)."""

    def __init__(self, future=False):
        self.compiles = []
        self.future = future
        self.device_caches = {3: ("kernel cache", "target", "backend", self.binder)}

    @staticmethod
    def binder(*args, **meta):
        options = {k: meta.pop(k) for k in ("num_warps", "num_stages") if k in meta}
        bound = collections.OrderedDict((f"a{i}", a) for i, a in enumerate(args))
        bound.update(meta)
        return bound, [("i32", "D" if args[0] % 2 == 0 else "")], options

    def run(self, *args, grid, warmup, **meta):
        assert warmup, "launch compiles through JITFunction.run without launching"
        self.compiles.append((args, meta))
        compiled = Compiled()
        return Future(compiled) if self.future else compiled


class Driver:
    def get_current_device(self):
        return 3

    def get_current_stream(self, device):
        return f"stream-of-{device}"


@pytest.fixture(autouse=True)
def stand_in_driver(monkeypatch):
    monkeypatch.setattr(triton.runtime.driver, "_active", Driver())
    monkeypatch.setattr(_common, "_compiled", {})


@pytest.mark.parametrize("future", [False, True])
def test_compiles_once_per_specialization_and_launches_like_jitfunction_run(future):
    kernel = Kernel(future)
    _common.launch(kernel, (5, 2), 10, 7, BLOCK=64, num_warps=4)
    _common.launch(kernel, (6,), 12, 8, BLOCK=64, num_warps=4)  # same specialization: no compile
    assert len(kernel.compiles) == 1
    compiled = next(iter(_common._compiled.values()))
    first, second = compiled.calls
    assert first[:7] == (5, 2, 1, "stream-of-3", "function-handle", "packed-metadata",
                         ("metadata", (5, 2), "stream-of-3", (10, 7, 64)))
    assert first[9:] == (10, 7, 64)  # every bound argument, constexprs included, in signature order
    assert second[:3] == (6, 1, 1) and second[9:] == (12, 8, 64)
    _common.launch(kernel, (1,), 11, 8, BLOCK=64, num_warps=4)  # another specialization
    _common.launch(kernel, (1,), 10, 8, BLOCK=64, num_warps=8)  # other options
    assert len(kernel.compiles) == 3 and len(_common._compiled) == 3
