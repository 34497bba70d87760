"""kernels/_config.py: the lookup of measured kernel configurations."""
import json

import pytest
import torch

from maskdit_fast.kernels import _config


@pytest.fixture
def tuned_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(_config, "TUNED_DIR", str(tmp_path))
    _config.table.cache_clear()
    yield tmp_path
    _config.table.cache_clear()


def test_shape_key_is_canonical():
    assert _config.shape_key(L=128, Dh=72) == _config.shape_key(Dh=72, L=128) == "Dh=72,L=128"


def test_table_reads_committed_winners_and_rejects_bad_files(tuned_dir):
    assert _config.table("sm_90") == {}
    winners = {"attention_fwd": {"Dh=72,L=128": {"BLOCK_M": 64, "num_warps": 4}}}
    (tuned_dir / "sm_90.json").write_text(json.dumps(winners))
    _config.table.cache_clear()  # tables are read once per process: committed files do not change
    assert _config.table("sm_90") == winners
    (tuned_dir / "sm_80.json").write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="sm_80.json"):
        _config.table("sm_80")


def test_cpu_lookup_takes_the_default_and_override_wins_then_restores():
    default = {"BLOCK_M": 128}
    cpu = torch.device("cpu")
    assert _config.tuned("attention_fwd", "Dh=72,L=128", default, cpu) is default
    assert _config.tuned("attention_fwd", "Dh=72,L=128", default) is default
    with _config.override("attention_fwd", {"BLOCK_M": 32}):
        assert _config.tuned("attention_fwd", "Dh=72,L=128", default, cpu) == {"BLOCK_M": 32}
        assert _config.tuned("layernorm_fwd", "D=1152", default, cpu) is default
        with _config.override("attention_fwd", {"BLOCK_M": 16}):
            assert _config.tuned("attention_fwd", "x", default, cpu) == {"BLOCK_M": 16}
        assert _config.tuned("attention_fwd", "x", default, cpu) == {"BLOCK_M": 32}
    assert _config.tuned("attention_fwd", "Dh=72,L=128", default, cpu) is default
