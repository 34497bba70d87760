"""The back-end switch (maskdit_fast.backend): precedence, the context manager, clear errors, the measured
back-end table that "auto" reads."""
import glob
import json
import os

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


def _row(op, backend_name, ms, shape="s", status="ok", passes="fwd+bwd"):
    return {"op": op, "shape": shape, "backend": backend_name, "pass": passes, "status": status, "ms": ms}


def test_backend_table_picks_the_least_total_measured_time():
    """Per op, the fastest back-end over all its shapes, forward + backward only; a back-end missing a shape or
    failing its check is out; baselines that are no back-end (sdpa_*) never win."""
    report = {"env": {"sm": "9.0", "card": "stand-in"}, "date": "d", "ops": [
        _row("gated_residual", "torch", 0.3), _row("gated_residual", "triton", 0.2),
        _row("gated_residual", "cuda", 0.25), _row("gated_residual", "cuda", 0.01, passes="fwd"),
        _row("gather_tokens", "torch", 0.3), _row("gather_tokens", "triton", 0.1, status="failed"),
        _row("gather_tokens", "cuda", None, status="unavailable"),
    ], "attention": [
        _row("attention[encoder]", "torch", 1.0, "a"), _row("attention[encoder]", "triton", 0.5, "a"),
        _row("attention[encoder]", "sdpa_flash", 0.1, "a"),
        _row("attention[dit]", "torch", 1.0, "b"), _row("attention[dit]", "triton", 1.6, "b"),
        _row("varlen_attention[encoder]", "torch", 2.0, "a"), _row("varlen_attention[encoder]", "triton", 1.0, "a"),
        _row("varlen_attention[dit]", "torch", 2.0, "b"),  # triton has no dit row: only torch covers both
    ]}
    table = backend.backend_table(report, source="r.json", note="n")
    assert table["arch"] == "sm_90" and table["source"] == "r.json" and table["note"] == "n"
    assert table["backends"] == {"gated_residual": "triton", "gather_tokens": "torch", "attention": "torch",
                                 "varlen_attention": "torch"}
    assert table["ms"]["attention"] == {"torch": 2.0, "triton": 2.1}
    assert table["ms"]["gather_tokens"] == {"torch": 0.3}


@pytest.fixture
def stand_in_table(tmp_path, monkeypatch):
    """A committed-table folder of our own, read as the table of a stand-in sm_90 device (no GPU needed)."""
    from maskdit_fast.kernels import _config
    monkeypatch.setattr(_config, "TUNED_DIR", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (9, 0))
    for cache in (backend.measured_backends, backend._device_table):
        cache.cache_clear()
    yield tmp_path
    for cache in (backend.measured_backends, backend._device_table):
        cache.cache_clear()


@pytest.mark.parametrize("built", [True, False])
def test_auto_picks_the_measured_winner_else_the_fallback(stand_in_table, built, monkeypatch):
    winners = {"gated_residual": "triton", "layernorm_modulate": "torch", "gather_tokens": "cuda",
               "gather_tokens_varlen": "cuda"}
    (stand_in_table / "sm_90-backends.json").write_text(json.dumps({"backends": winners}))
    monkeypatch.setattr(backend, "load_extension", lambda warn=True: object() if built else None)
    gpu = torch.device("cuda", 0)
    fallback = "cuda" if built else "torch"
    assert resolve_backend("auto", gpu, op="gated_residual") == "triton"
    assert resolve_backend(None, gpu, op="layernorm_modulate") == "torch"  # measured torch beats a built extension
    assert resolve_backend("auto", gpu, op="gather_tokens") == fallback  # the winner, or torch without a build
    assert resolve_backend("auto", gpu, cuda_impl=False, op="gather_tokens_varlen") == "torch"  # no csrc/ kernel
    assert resolve_backend("auto", gpu, op="scatter_tokens") == fallback  # unlisted op
    assert resolve_backend("auto", gpu) == fallback  # no op name
    assert resolve_backend("auto", "cpu", op="gated_residual") == "torch"  # the table is for the GPU
    monkeypatch.setattr(backend, "_TRITON", False)  # the measured winner cannot run here
    assert resolve_backend("auto", gpu, op="gated_residual") == fallback
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (8, 0))
    backend._device_table.cache_clear()
    monkeypatch.setattr(backend, "_TRITON", True)
    assert resolve_backend("auto", gpu, op="gated_residual") == fallback  # no table for sm_80


def test_auto_traces_without_a_graph_break(stand_in_table, monkeypatch):
    """Inside torch.compile(fullgraph=True) the table lookup is a constant: no file read or device query traced."""
    (stand_in_table / "sm_90-backends.json").write_text(json.dumps({"backends": {"gated_residual": "triton"}}))
    monkeypatch.setattr(backend, "load_extension", lambda warn=True: None)
    gpu = torch.device("cuda", 0)

    def pick(x):
        triton = resolve_backend("auto", gpu, op="gated_residual") == "triton"
        unlisted = resolve_backend("auto", gpu, op="scatter_tokens") == "torch"
        return x + 1 if triton and unlisted else x - 1

    torch._dynamo.reset()
    assert torch.equal(torch.compile(pick, fullgraph=True, backend="eager")(torch.zeros(2)), torch.ones(2))


def test_a_malformed_table_is_a_clear_error(stand_in_table):
    (stand_in_table / "sm_90-backends.json").write_text(json.dumps({"backends": {"gated_residual": "fast"}}))
    with pytest.raises(ValueError, match="sm_90-backends.json"):
        resolve_backend("auto", torch.device("cuda", 0), op="gated_residual")


def test_committed_tables_come_from_their_reports():
    """Each committed kernels/tuned/<arch>-backends.json is what backend_table makes of the report it names,
    and names public ops only."""
    from maskdit_fast import ops
    from maskdit_fast.kernels._config import TUNED_DIR
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    paths = glob.glob(os.path.join(TUNED_DIR, "*-backends.json"))
    assert paths, "no committed back-end table"
    for path in paths:
        with open(path) as f:
            committed = json.load(f)
        with open(os.path.join(root, committed["source"])) as f:
            remade = backend.backend_table(json.load(f), source=committed["source"], note=committed["note"])
        assert remade == committed and os.path.basename(path) == f"{committed['arch']}-backends.json"
        assert all(callable(getattr(ops, op, None)) for op in committed["backends"])


def test_backend_table_script_writes_the_table(tmp_path):
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    try:
        import backend_table as script
    finally:
        sys.path.pop(0)
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"env": {"sm": "10.0"}, "ops": [_row("gated_residual", "torch", 1.0),
                                                                  _row("gated_residual", "cuda", 0.5)]}))
    path = script.main([str(report), "--out", str(tmp_path / "tuned"), "--note", "stand-in"])
    with open(path) as f:
        written = json.load(f)
    assert os.path.basename(path) == "sm_100-backends.json"
    assert written["backends"] == {"gated_residual": "cuda"} and written["note"] == "stand-in"
