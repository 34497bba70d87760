"""The back-end switch (maskdit_fast.backend): precedence, the context manager, clear errors."""
import pytest
import torch

from maskdit_fast import backend
from maskdit_fast.backend import ENV_VAR, get_backend, resolve_backend, set_backend, use_backend


@pytest.fixture(autouse=True)
def _clean_switch(monkeypatch):
    """Every test starts with no set_backend() and no env var, and leaves the switch as it found it."""
    monkeypatch.delenv(ENV_VAR, raising=False)
    previous = backend._configured
    set_backend(None)
    yield
    set_backend(previous)


def test_precedence_call_then_set_backend_then_env_then_auto(monkeypatch):
    assert get_backend() == "auto"
    assert resolve_backend(None, "cpu") == "torch"  # auto on the CPU: the reference
    monkeypatch.setenv(ENV_VAR, "triton")
    assert get_backend() == "triton"
    set_backend("torch")
    assert get_backend() == "torch"
    assert resolve_backend(None, "cpu") == "torch"
    set_backend(None)  # back to the env var
    assert get_backend() == "triton"
    set_backend("auto")  # explicit auto overrides the env var
    assert get_backend() == "auto"
    set_backend("cuda")
    assert resolve_backend("torch", "cpu") == "torch"  # the per-call keyword wins


@pytest.mark.parametrize("built", [True, False])
def test_auto_on_cuda_is_the_extension_when_built_else_torch(built, monkeypatch):
    """auto follows the H200 measurements: the CUDA extension's ops, else torch (never Triton); ops the
    extension lacks (varlen gather/scatter, attention) get torch. Resolution needs no GPU."""
    from maskdit_fast.ops.attention import resolve_attention_backend
    monkeypatch.setattr(backend, "load_extension", lambda warn=True: object() if built else None)
    assert resolve_backend(None, "cuda") == ("cuda" if built else "torch")
    assert resolve_backend("auto", "cuda", cuda_impl=False) == "torch"
    assert resolve_attention_backend("auto", "cuda") == resolve_attention_backend("cuda", "cuda") == "torch"
    assert resolve_backend("auto", "cpu") == "torch"
    # an explicit "cuda" for an op the extension lacks runs the reference, as attention always did
    assert resolve_backend("cuda", "cuda", cuda_impl=False) == "torch"


def test_use_backend_restores_on_exit_and_on_error():
    set_backend("torch")
    with use_backend("triton"):
        assert get_backend() == "triton"
    assert get_backend() == "torch"
    with pytest.raises(KeyError):
        with use_backend("cuda"):
            raise KeyError("boom")
    assert get_backend() == "torch"
    with pytest.raises(ValueError, match="unknown backend"):
        with use_backend("tpu"):
            pass
    assert get_backend() == "torch"


def test_bad_names_raise_clear_errors(monkeypatch):
    with pytest.raises(ValueError, match="unknown backend 'cuda2'"):
        set_backend("cuda2")
    with pytest.raises(ValueError, match="unknown backend 'xla'"):
        resolve_backend("xla", "cpu")
    monkeypatch.setenv(ENV_VAR, "fast")
    with pytest.raises(ValueError, match=f"{ENV_VAR}='fast'"):
        get_backend()


def test_backends_that_cannot_run_on_the_cpu(monkeypatch):
    with pytest.raises(RuntimeError, match="'cuda' needs CUDA tensors"):
        resolve_backend("cuda", torch.device("cpu"))
    if not backend.triton_available():
        pytest.skip("triton not installed")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        resolve_backend("triton", "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend.triton_interpreted() and resolve_backend("triton", "cpu") == "triton"
