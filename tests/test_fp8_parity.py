"""benchmarks/fp8_parity.py: the --dry CPU run end to end (three arms through the trainer, JSON, PNG,
markdown), the parity rule, and the refusal of the GPU run where float8 cannot run."""
import importlib.util
import json
import os

import pytest
import torch

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "fp8_parity.py")


@pytest.fixture(scope="module")
def parity():
    spec = importlib.util.spec_from_file_location("fp8_parity", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dry_run_writes_curves_table_and_plot(parity, tmp_path):
    out = tmp_path / "parity"
    report = parity.main(["--dry", "--out", str(out), "--steps", "8"])
    saved = json.load(open(out / "fp8_parity.json"))
    assert saved["dry"] and saved["steps"] == 8 and saved["verdict"] == report["verdict"]
    assert list(saved["arms"]) == ["bf16", "fp32 (stand-in: no fp8 here)", "bf16 seed 1"]
    for label, arm in saved["arms"].items():
        assert len(arm["losses"]) == 8 and all(0 < x < 10 for x in arm["losses"]), label
        assert arm["error"] is None and arm["images_per_s"] > 0
    bf16, fp32, seed1 = (saved["arms"][k]["losses"] for k in saved["arms"])
    assert bf16 != seed1 and max(abs(a - b) / a for a, b in zip(bf16, fp32)) < 1e-2  # same draws, other numerics
    assert saved["verdict"]["parity"] and saved["verdict"]["gap"] < saved["verdict"]["tolerance"]
    from PIL import Image
    assert Image.open(out / "fp8_parity.png").size[0] > 400
    text = open(out / "fp8_parity.md").read()
    assert "dry CPU run: fp32 stands in for fp8" in text and "| 1-2 |" in text and "Verdict: **parity**" in text


def _arm(losses, error=None):
    return {"losses": losses, "error": error, "images_per_s": 1.0, "warmup_s": 0.0}


def test_parity_rule(parity):
    steps = 10
    base = [1.0] * steps
    same = parity.verdict({"a": _arm(base), "b": _arm([1.01] * steps), "c": _arm([1.02] * steps)}, steps)
    assert same["parity"] and same["gap"] == pytest.approx(0.01) and same["tolerance"] == pytest.approx(0.04)
    worse = parity.verdict({"a": _arm(base), "b": _arm([1.1] * steps), "c": _arm([1.02] * steps)}, steps)
    assert not worse["parity"] and worse["tolerance"] == pytest.approx(0.04)
    floor = parity.verdict({"a": _arm(base), "b": _arm([1.019] * steps), "c": _arm(base)}, steps)
    assert floor["parity"] and floor["tolerance"] == parity.MIN_TOLERANCE  # identical yardstick: the floor
    stopped = parity.verdict({"a": _arm(base), "b": _arm([1.0] * 4, error="non-finite loss (nan) at step 5"),
                              "c": _arm(base)}, steps)
    assert not stopped["parity"] and "non-finite" in stopped["reason"]
    incomplete = parity.verdict({"a": _arm(base)}, steps)  # written after the first arm of a cut-short run
    assert not incomplete["parity"] and "incomplete" in incomplete["reason"]
    report = {"arms": {"bf16": _arm(base)}, "verdict": incomplete, "dry": False, "date": "d", "torchao": "0.17.0",
              "env": {"card": "H200", "torch": "2.11"}, "model": "m", "steps": steps, "batch_size": 8}
    text = parity.markdown(report)
    assert "| 1-2 | 1.0000 |" in text and "NO parity" in text and "incomplete" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where float8 cannot run")
def test_gpu_run_refused_without_a_float8_gpu(parity, tmp_path):
    with pytest.raises(RuntimeError, match="fp8 needs"):
        parity.main(["--out", str(tmp_path / "gpu")])
    assert not (tmp_path / "gpu").exists()


def test_gpu_run_config_is_valid_and_converts_every_encoder_linear(parity, tmp_path):
    """The GPU run's arms validate as trainer configs, and its XL-width model has all four linears of
    every encoder block converted (as MaskDiT-XL/2)."""
    from maskdit_fast.config import config_from_dict
    from maskdit_fast.fp8 import fp8_linear_names
    from maskdit_fast.models import create_model
    for _, overrides in parity.arms(dry=False):
        cfg = config_from_dict({**parity.GPU_RUN, **overrides, "run_dir": str(tmp_path)}).validate()
    with torch.device("meta"):
        model = create_model(cfg.model, input_size=32, in_channels=1, num_classes=10, **cfg.model_kwargs)
    names = fp8_linear_names(model)
    assert len(model.blocks) == 8 and sum(n.startswith("blocks.") for n in names) == 8 * 4
