"""Test setup. Without a usable GPU, Triton kernels run under the interpreter: TRITON_INTERPRET must be
set before triton is first imported (importing torch and asking it for CUDA does not import triton)."""
import inspect
import os

import pytest
import torch

# Where the kernel tests run: the GPU when torch can use one (compiled kernels), else the CPU (Triton
# interpreted). The same small odd-shape grids then check the real kernels on a GPU machine.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def device():
    """The device of the kernel tests (see DEVICE)."""
    return DEVICE


def grad_generator(gen, device):
    """Generator for check_op's random output grad, drawn on the output's device: gen itself on the
    CPU (the draws the CPU runs always made), else a generator on device seeded like gen."""
    if gen.device == torch.device(device):
        return gen
    return torch.Generator(device=device).manual_seed(gen.initial_seed())


def assert_checks(checks):
    """Fails with every failed maskdit_fast.accuracy.Check listed; an empty list fails too."""
    failed = [c for c in checks if not c.passed]
    assert checks and not failed, "\n".join(map(str, failed))


def assert_deterministic_backward(op, args, generator):
    """The same backward twice gives the same bits (reductions without float atomics)."""
    wrt = [a for a in args if torch.is_tensor(a) and a.requires_grad]
    out = op(*args)
    dy = torch.randn(out.shape, dtype=out.dtype, device=out.device, generator=generator)
    first, second = [torch.autograd.grad(op(*args), wrt, dy) for _ in range(2)]
    for a, b in zip(first, second):
        assert torch.equal(a, b), f"backward differs between two runs by {(a.double() - b.double()).abs().max()}"


def assert_no_host_sync(fn):
    """Runs fn with CUDA sync debugging set to error: nothing in it may wait for the device."""
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def _fix_old_interpreter_scalars():
    """triton < 3.8's interpreter turns a scalar tensor used as a Python index (a runtime loop bound in
    range()) into an int with int() of a shape-(1,) array, which numpy >= 2.4 rejects; use .item()."""
    import triton
    from triton.runtime import interpreter

    if tuple(int(p) for p in triton.__version__.split(".")[:2]) >= (3, 8):
        return
    patch_tensor = interpreter._patch_lang_tensor
    if "scope" not in inspect.signature(patch_tensor).parameters:  # triton < 3.4 patches another way
        return

    def patched(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))
    interpreter._patch_lang_tensor = patched


if os.environ.get("TRITON_INTERPRET") == "1":
    _fix_old_interpreter_scalars()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none present)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
