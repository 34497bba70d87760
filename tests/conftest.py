"""Test setup. Without a usable GPU, Triton kernels run under the interpreter: TRITON_INTERPRET must be
set before triton is first imported (importing torch and asking it for CUDA does not import triton)."""
import contextlib
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


@contextlib.contextmanager
def configured(families, config):
    """Every kernel family in `families` launched with `config` (kernels._config.override of each)."""
    from maskdit_fast.kernels import _config
    with contextlib.ExitStack() as stack:
        for family in families:
            stack.enter_context(_config.override(family, config))
        yield


# Chunked-row LayerNorm cases (shape, BLOCK_D, BLOCK_R): several chunks with a ragged last one; one token; ragged
# row tiles (7 tokens in tiles of 4); 40 tokens in tiles of 1 give 20 programs per sample of 2 tiles each (the
# backward's read-modify-write of its partial rows)
CHUNKED_ROWS = [((3, 7, 72), 16, 4), ((2, 5, 100), 32, 2), ((1, 3, 200), 64, 2), ((2, 1, 100), 16, 2),
                ((2, 40, 72), 32, 1)]


def chunked_rows(families, block_d, block_r):
    """`families` launched with rows walked in block_d-column chunks, block_r rows per tile."""
    return configured(families, {"BLOCK_R": block_r, "BLOCK_D": block_d, "num_warps": 4})


def row_statistics_ref(x, eps):
    """float64 (mean, rstd) over the last dim of x, the statistics a LayerNorm forward saves."""
    x = x.double()
    return x.mean(-1), (x.var(-1, unbiased=False) + eps).rsqrt()


def layernorm_modulate_backward_ref(dy, x, scale, mean, rstd):
    """float64 backward of LayerNorm(x) * (1 + scale) + shift computed from the given row statistics (mean, rstd
    [B, L]), not x's: (dx, dshift, dscale), the conditioning grads shaped like scale ([B, D]: summed over
    tokens)."""
    dy, x, scale, mean, rstd = (t.double() for t in (dy, x, scale, mean, rstd))
    xhat = (x - mean[..., None]) * rstd[..., None]
    dxhat = dy * (1 + (scale if scale.dim() == 3 else scale[:, None]))
    dx = (dxhat - dxhat.mean(-1, keepdim=True) - xhat * (dxhat * xhat).mean(-1, keepdim=True)) * rstd[..., None]
    return dx, reduce_to(dy, scale), reduce_to(dy * xhat, scale)


def reduce_to(t, cond):
    """Grad t [B, L, D] of conditioning broadcast from cond's shape: summed over tokens unless cond is per token."""
    return t if t.shape == cond.shape else t.sum(1).reshape(cond.shape)


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
