"""The "cuda" back-end: csrc/ kernels behind the CUDA op sections of maskdit_fast.ops.gather_scatter and
maskdit_fast.ops.modulate.

GPU (marked gpu; skipped without one): torch.compile(fullgraph=True) and the device-side index errors
(the accuracy, determinism and no-sync checks are in test_ops_cuda_gpu.py).

CPU: the package imports and the back-end fails with a clear reason when the extension is missing.
When the extension can be loaded (built in place, or MASKDIT_FAST_EXTENSION=/path/_C.so as
.ci/compile_csrc.sh sets) the C++ schemas are checked against what the Python ops call, and the public
ops with backend="cuda" (validation, dtype promotion, autograd wiring, fake impls) run on meta tensors.
"""
import functools
import subprocess
import sys
import textwrap
import types
import warnings

import pytest
import torch

from maskdit_fast import backend
from maskdit_fast import ops as mops
from maskdit_fast.ops import gather_scatter as gs
from maskdit_fast.ops import modulate as md
from conftest import assert_checks

needs_extension = pytest.mark.skipif(
    not backend.extension_available(),
    reason=f"CUDA extension not loadable here ({backend.extension_unavailable_reason()}); "
           "build it or set MASKDIT_FAST_EXTENSION (.ci/compile_csrc.sh does)")


# ------------------------------------------------------------------ without the extension (CPU)

@pytest.fixture
def broken_extension(monkeypatch, tmp_path):
    """The loader pointed at a library that does not exist; state restored afterwards."""
    missing = tmp_path / "missing_C.so"
    monkeypatch.setenv(backend.EXTENSION_ENV_VAR, str(missing))
    backend._load_extension.cache_clear()
    backend._warn_once.cache_clear()
    yield missing
    backend._load_extension.cache_clear()  # the env var is restored before the next load


def test_missing_extension_reason_and_single_warning(broken_extension):
    assert not backend.extension_available()
    reason = backend.extension_unavailable_reason()
    assert str(broken_extension) in reason and "could not be loaded" in reason
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert backend.load_extension() is None
        assert backend.load_extension() is None
    assert len(caught) == 1 and "CUDA back-end disabled" in str(caught[0].message)


def test_reason_without_a_build_says_how_to_build(monkeypatch):
    import maskdit_fast
    import pathlib
    if list(pathlib.Path(maskdit_fast.__file__).parent.glob("_C*.so")) or backend.extension_loaded():
        pytest.skip("the extension is built or already loaded in this process")
    monkeypatch.delenv(backend.EXTENSION_ENV_VAR, raising=False)
    backend._load_extension.cache_clear()
    try:
        assert not backend.extension_available()
        assert "pip install --no-build-isolation" in backend.extension_unavailable_reason()
    finally:
        backend._load_extension.cache_clear()


def test_package_works_without_extension(tmp_path):
    """Fresh interpreter, extension unloadable: imports succeed, the other back-ends run, and
    backend 'cuda' raises a RuntimeError that carries the reason."""
    code = textwrap.dedent("""
        import torch
        import maskdit_fast
        from maskdit_fast import ops
        x, ids = torch.randn(2, 5, 8), torch.tensor([[0, 3], [4, 1]])
        assert ops.gather_tokens(x, ids).shape == (2, 2, 8)
        try:  # meta tensors: past the device check, to where the extension is needed
            ops.gather_tokens(x.to("meta"), ids.to("meta"), backend="cuda", validate=False)
        except RuntimeError as err:
            assert "backend 'cuda' unavailable" in str(err) and "could not be loaded" in str(err), err
        else:
            raise AssertionError("no error")
        print("OK")
    """)
    env = {**__import__("os").environ, backend.EXTENSION_ENV_VAR: str(tmp_path / "nope.so")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "OK" in done.stdout, done.stderr[-2000:]


@pytest.mark.parametrize("call", [
    lambda: mops.gather_tokens(torch.randn(2, 5, 8), torch.tensor([[0, 1], [2, 3]]), backend="cuda"),
    lambda: mops.scatter_tokens(torch.randn(2, 2, 8), torch.tensor([[0, 1], [2, 3]]), torch.randn(8), 5,
                                backend="cuda"),
    lambda: mops.layernorm_modulate(torch.randn(2, 5, 8), torch.randn(2, 8), torch.randn(2, 8), backend="cuda"),
    lambda: mops.gated_residual(torch.randn(2, 5, 8), torch.randn(2, 5, 8), torch.randn(2, 8), backend="cuda"),
], ids=["gather", "scatter", "layernorm_modulate", "gated_residual"])
def test_cuda_backend_on_cpu_tensors_is_a_clear_error(call):
    with pytest.raises(RuntimeError, match="backend 'cuda'"):
        call()


# ------------------------------------------------------------------ with the extension (CPU: meta)

# What the ops' CUDA sections call: schema of every op in csrc/ext.cpp.
SCHEMAS = {
    "gather_tokens": "(Tensor x, Tensor ids_keep, Tensor? pos_embed) -> Tensor",
    "gather_tokens_backward": "(Tensor grad_out, Tensor ids_keep, int length, bool pos_grad) -> (Tensor, Tensor)",
    "scatter_tokens": "(Tensor x_kept, Tensor ids_keep, Tensor mask_token, int length, Tensor? pos_embed) -> Tensor",
    "scatter_tokens_backward":
        "(Tensor grad_out, Tensor ids_keep, bool mask_grad, bool pos_grad) -> (Tensor, Tensor, Tensor)",
    "layernorm_modulate": "(Tensor x, Tensor shift, Tensor scale, float eps) -> (Tensor, Tensor, Tensor)",
    "layernorm_modulate_backward": "(Tensor grad_out, Tensor x, Tensor scale, Tensor mean, Tensor rstd, "
                                   "bool cond_grad) -> (Tensor, Tensor, Tensor)",
    "gated_residual": "(Tensor x, Tensor y, Tensor gate) -> Tensor",
    "gated_residual_backward": "(Tensor grad_out, Tensor y, Tensor gate, bool y_grad, bool gate_grad) "
                               "-> (Tensor, Tensor)",
}


@needs_extension
def test_registered_schemas_match_the_wrappers():
    lib = torch.ops.maskdit_fast_C
    for name, schema in SCHEMAS.items():
        assert str(getattr(lib, name).default._schema) == f"maskdit_fast_C::{name}{schema}"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"maskdit_fast_C::{name}", "CUDA"), name
        # fake impls live where the C++ library says (torch imports that op file to find them)
        home = gs if "tokens" in name else md
        assert torch._C._dispatch_pystub(f"maskdit_fast_C::{name}", "")[0] == home.__name__, name
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"maskdit_fast_C::{name}", "Meta"), name


def _meta(*shape, dtype=torch.float32, grad=True):
    return torch.empty(*shape, device="meta", dtype=dtype).requires_grad_(grad)


def _ids(B, K):
    return torch.empty(B, K, device="meta", dtype=torch.int64)


bf16, f16, f32 = torch.bfloat16, torch.float16, torch.float32


# The public ops on the "cuda" back-end, index values unchecked (meta tensors hold none).
cb = types.SimpleNamespace(gather_tokens=functools.partial(gs.gather_tokens, backend="cuda", validate=False),
                           scatter_tokens=functools.partial(gs.scatter_tokens, backend="cuda", validate=False),
                           layernorm_modulate=functools.partial(md.layernorm_modulate, backend="cuda"),
                           gated_residual=functools.partial(md.gated_residual, backend="cuda"))

# (name, public op with backend="cuda", reference, args): meta tensors; outputs and grads must match the
# reference's shapes and dtypes (dtype promotion, grads cast back to each input's dtype/shape).
META_CASES = [
    ("gather+pos", cb.gather_tokens, gs.gather_tokens_ref, (_meta(2, 5, 8, dtype=bf16), _ids(2, 3), _meta(1, 5, 8))),
    ("gather", cb.gather_tokens, gs.gather_tokens_ref, (_meta(2, 5, 8, dtype=f16), _ids(2, 3))),
    ("gather+fixed pos", cb.gather_tokens, gs.gather_tokens_ref,
     (_meta(2, 5, 8, dtype=f16), _ids(2, 3), _meta(5, 8, dtype=f16, grad=False))),
    ("scatter+pos", cb.scatter_tokens, gs.scatter_tokens_ref,
     (_meta(2, 3, 8, dtype=f16), _ids(2, 3), _meta(1, 1, 8), 5, _meta(5, 8, dtype=f16))),
    ("scatter", cb.scatter_tokens, gs.scatter_tokens_ref, (_meta(2, 3, 8, dtype=bf16), _ids(2, 3), _meta(8), 5)),
    ("scatter fp32 pos", cb.scatter_tokens, gs.scatter_tokens_ref,
     (_meta(2, 3, 8, dtype=bf16), _ids(2, 3), _meta(8, dtype=bf16), 5, _meta(1, 5, 8))),
    ("layernorm_modulate", cb.layernorm_modulate, md.layernorm_modulate_ref,
     (_meta(2, 5, 8, dtype=bf16), _meta(2, 8, dtype=bf16), _meta(2, 8, dtype=bf16))),
    ("layernorm_modulate per-token", cb.layernorm_modulate, md.layernorm_modulate_ref,
     (_meta(2, 5, 8, dtype=f16), _meta(2, 5, 8, dtype=f16), _meta(2, 5, 8, dtype=f16))),
    ("layernorm_modulate fixed x", cb.layernorm_modulate, md.layernorm_modulate_ref,
     (_meta(2, 5, 8, grad=False), _meta(2, 8), _meta(2, 8))),
    ("gated_residual", cb.gated_residual, md.gated_residual_ref,
     (_meta(2, 5, 8), _meta(2, 5, 8, dtype=bf16), _meta(2, 8, dtype=bf16))),
    ("gated_residual per-token", cb.gated_residual, md.gated_residual_ref,
     (_meta(2, 5, 8, dtype=f16), _meta(2, 5, 8, dtype=f16), _meta(2, 5, 8, dtype=f16))),
    ("gated_residual fixed gate", cb.gated_residual, md.gated_residual_ref,
     (_meta(2, 5, 8), _meta(2, 5, 8), _meta(2, 8, grad=False))),
    ("layernorm_modulate [B, 1, D]", cb.layernorm_modulate, md.layernorm_modulate_ref,
     (_meta(2, 5, 8, dtype=bf16), _meta(2, 1, 8, dtype=bf16), _meta(2, 1, 8, dtype=bf16))),
    ("gated_residual [B, 1, D]", cb.gated_residual, md.gated_residual_ref,
     (_meta(2, 5, 8), _meta(2, 5, 8), _meta(2, 1, 8))),
]


@needs_extension
@pytest.mark.parametrize("name,fn,ref,args", META_CASES, ids=[c[0] for c in META_CASES])
def test_wrappers_follow_the_reference_on_meta(name, fn, ref, args):
    out, want = fn(*args), ref(*args)
    assert (out.shape, out.dtype) == (want.shape, want.dtype)
    wrt = [a for a in args if torch.is_tensor(a) and a.requires_grad]
    grads = torch.autograd.grad(out, wrt, torch.empty_like(out))
    for a, g in zip(wrt, grads):
        assert (g.shape, g.dtype) == (a.shape, a.dtype)


@needs_extension
def test_fakes_trace_under_fake_tensor_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        x = torch.empty(2, 5, 8, device="cuda", dtype=bf16)
        out, mean, rstd = torch.ops.maskdit_fast_C.layernorm_modulate(x, torch.empty(2, 8, device="cuda", dtype=bf16),
                                                        torch.empty(2, 8, device="cuda", dtype=bf16), 1e-6)
        assert (out.shape, out.dtype, out.device.type) == ((2, 5, 8), bf16, "cuda")
        assert (mean.shape, rstd.dtype) == ((2, 5), f32)


def _bad(fn, *args):
    return lambda: fn(*args)


BAD_INPUT = [  # checked once, by the public ops (the CUDA section adds its dtype rule)
    (_bad(cb.gather_tokens, _meta(2, 5, 8), _ids(2, 3).int()), TypeError, "int64"),
    (_bad(cb.gather_tokens, _meta(2, 5, 8), _ids(3, 3)), ValueError, r"ids_keep \(3, 3\) does not fit"),
    (_bad(cb.gather_tokens, _meta(2, 5, 8), _ids(2, 6)), ValueError, r"need \[B, K <= L\]"),
    (_bad(cb.gather_tokens, _meta(10, 8), _ids(2, 3)), ValueError, "x must have 3 dims"),
    (_bad(cb.gather_tokens, _meta(2, 5, 8, dtype=torch.float64), _ids(2, 3)), TypeError, "float32, float16 and bf"),
    (_bad(cb.gather_tokens, _meta(2, 5, 8), _ids(2, 3), _meta(4, 8)), ValueError, "pos_embed must have shape"),
    (_bad(cb.gather_tokens, torch.randn(2, 5, 8), torch.zeros(2, 3, dtype=torch.int64)), RuntimeError,
     "needs CUDA tensors"),
    (_bad(cb.gather_tokens, _meta(2, 5, 8), [[0, 1, 2]] * 2), TypeError, "ids must be an int64 tensor"),
    (_bad(cb.scatter_tokens, _meta(2, 3, 8), _ids(2, 3), _meta(8), 2), ValueError, "length must be an int >="),
    (_bad(cb.scatter_tokens, _meta(2, 3, 8), _ids(2, 3), _meta(7), 5), ValueError, "D = 8 elements"),
    (_bad(cb.layernorm_modulate, _meta(2, 5, 8), _meta(2, 5), _meta(2, 8)), ValueError, r"shift must have shape \[B, D\]"),
    (_bad(cb.layernorm_modulate, _meta(2, 5, 8), _meta(1, 8), _meta(2, 8)), ValueError, "shift must have shape"),
    (_bad(cb.layernorm_modulate, _meta(2, 5, 8, dtype=bf16), _meta(2, 8), _meta(2, 5, 8, dtype=bf16)), ValueError,
     "same shape"),
    (_bad(cb.gated_residual, _meta(2, 5, 8), _meta(2, 4, 8), _meta(2, 8)), ValueError, "must match x"),
    (_bad(cb.gated_residual, _meta(2, 5, 8), _meta(2, 5, 8), _meta(2, 8, dtype=torch.int32, grad=False)),
     TypeError, "gate must be a floating-point"),
]


@needs_extension
@pytest.mark.parametrize("call,error,match", BAD_INPUT, ids=[f"{c[1].__name__}:{c[2]}" for c in BAD_INPUT])
def test_bad_input_is_a_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call()


# ------------------------------------------------------------------ GPU

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.gpu
def test_gpu_torch_compile_fullgraph_matches_eager():
    B, L, K, D = 4, 16, 8, 72
    g = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()

    ids = torch.rand(B, L, device="cuda", generator=g).argsort(1)[:, :K].contiguous()
    args = (randn(B, L, D), randn(1, L, D), randn(B, D), randn(B, D), randn(D))

    def step(x, pos, shift, scale, fill):
        h = cb.gather_tokens(x, ids, pos)
        h = cb.gated_residual(h, cb.layernorm_modulate(h, shift, scale), scale)
        return cb.scatter_tokens(h, ids, fill, L, pos)

    results = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        out = fn(*args)
        results.append([out] + list(torch.autograd.grad(out.float().square().sum(), args)))
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager)


@pytest.mark.gpu
@pytest.mark.parametrize("ids,message", [("[[0, 9]]", "out of range"), ("[[2, 2]]", "distinct")])
def test_gpu_bad_indices_stop_the_kernel_with_a_named_error(ids, message):
    """A device-side assert poisons the CUDA context, so it runs in a fresh interpreter (the
    assert's text comes through the device printf buffer on stdout)."""
    code = textwrap.dedent(f"""
        import torch
        from maskdit_fast.ops import scatter_tokens
        out = scatter_tokens(torch.randn(1, 2, 8, device="cuda"), torch.tensor({ids}, device="cuda"),
                             torch.randn(8, device="cuda"), 4, backend="cuda", validate=False)
        torch.cuda.synchronize()
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and message in done.stdout + done.stderr, (done.stdout + done.stderr)[-2000:]
