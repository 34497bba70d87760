"""The reproductions of the paper's headline: benchmarks/reproduce_gpu.py (the smoke run of every arm
on the CPU: files, budget and fork accounting; the augmentation, the evaluation plan, the report's
verdict on synthetic arms) and benchmarks/reproduce_small.py (equal-FLOPs points, the quick run,
the comparison)."""
import importlib.util
import json
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from maskdit_fast.checkpoint import atomic_save
from maskdit_fast.classifier import WEIGHTS_NAME, DigitClassifier
from maskdit_fast.config import PRESETS
from maskdit_fast.data import MNIST5K_SIZES
from maskdit_fast.models import create_model

BENCH = os.path.join(os.path.dirname(__file__), "..", "benchmarks")


def _script(name):
    """benchmarks/<name>.py imported as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(BENCH, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def rg():
    return _script("reproduce_gpu")


@pytest.fixture
def classifier_cache(tmp_path, monkeypatch):
    """An untrained digit classifier in the cache layout (skips its ~30 s training)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        atomic_save({"model": DigitClassifier().state_dict(), "test_accuracy": 0.5}, str(tmp_path / WEIGHTS_NAME))
    monkeypatch.setenv("MASKDIT_FAST_CACHE", str(tmp_path))


def test_smoke_runs_every_arm(rg, classifier_cache, tmp_path, monkeypatch):
    out = tmp_path / "out"
    sampled = []  # the sampler settings of every evaluation: the mnist preset's

    def generate(*args, **kwargs):
        sampled.append((kwargs["solver"], tuple(kwargs["cfg_interval"] or ()), kwargs["cfg_scale"]))
        return real_generate(*args, **kwargs)
    real_generate = rg.generate
    monkeypatch.setattr(rg, "generate", generate)
    v = rg.main(["--smoke", "--out", str(out)])
    s = dict(rg.SETTING, **rg.SMOKE)
    preset = PRESETS["mnist"]
    assert len(sampled) == len(rg.ARMS) * len(s["fractions"]) and set(sampled) == {
        (preset["sample_solver"], tuple(preset["sample_cfg_interval"]), preset["sample_cfg"])}
    assert sorted(os.listdir(out)) == sorted([f"{a}_seed0.json" for a in rg.ARMS] +
                                             ["quality_vs_compute.png", "results.md"])
    budget = None
    for arm in rg.ARMS:
        with open(out / f"{arm}_seed0.json") as f:
            r = json.load(f)
        assert r["complete"] and r["arm"] == arm and [p["fraction"] for p in r["points"]] == s["fractions"]
        flops = rg.step_flops(arm, s)
        assert r["step_flops"] == flops
        budget = s["dit_steps"] * flops["dit"]
        masked = rg.arm_mask_ratio(arm, s) > 0
        for p, (fraction, m, k) in zip(r["points"], rg.plan(arm, s, flops)):
            assert (p["main_steps"], p["fork_steps"]) == (m, k) and (k > 0) == masked
            # the fork is counted in the point: its steps, images, FLOPs and seconds
            assert p["images"] == (m + k) * s["batch_size"]
            assert p["train_flops"] == m * flops["main"] + k * flops["fork"] <= fraction * budget * (1 + 1e-12)
            assert p["train_seconds"] == pytest.approx(p["main_seconds"] + p["fork_seconds"], abs=2e-3)
            assert (p["fork_seconds"] > 0) == masked and p["main_seconds"] > 0
            assert torch.isfinite(torch.tensor([p["fid_classifier"], p["loss"]])).all()
            assert 0 <= p["class_accuracy"] <= 1
        assert [p["main_steps"] for p in r["points"]] == sorted(p["main_steps"] for p in r["points"])
        assert r["real_floor"]["fid_classifier"] >= 0
    # masked steps are cheaper than DiT's, the MaskDiT network's unmasked ones dearer
    f = rg.step_flops("maskdit_mae", s)
    assert f["main"] < f["dit"] < f["fork"]
    text = (out / "results.md").read_text()
    assert v["missing"] == [] and "Pending arms" not in text and "## Verdict" in text
    assert text.count("## Verdict") == 1 and text.count("| DiT | 0 |") == len(s["fractions"])


def test_augment(rg):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 1, 32, 32) * 2 - 1
    still = rg.augment(x, 64, dict(degrees=0.0, scale=0.0, shift=0.0), g)
    # no transform = a bilinear upsampling (the outermost pixels blend with the -1 background instead
    # of repeating the edge)
    upsampled = F.interpolate(x, size=64, mode="bilinear", align_corners=False)
    torch.testing.assert_close(still[..., 1:-1, 1:-1], upsampled[..., 1:-1, 1:-1])
    moved = rg.augment(torch.full((4, 1, 32, 32), -1.0).index_fill_(2, torch.tensor([15, 16]), 1.0), 64,
                       dict(degrees=10.0, scale=0.1, shift=0.1), g)
    assert moved.shape == (4, 1, 64, 64) and moved.min() >= -1 - 1e-6 and moved.max() <= 1 + 1e-6
    assert moved[:, :, 0, 0].eq(-1).all()  # the background stays -1 where the digit moved away
    assert not torch.equal(moved[0], moved[1])  # per-sample transforms


def test_plan_fits_the_budget(rg):
    s = dict(rg.SETTING, dit_steps=1000, fractions=[0.1, 0.5, 1.0], fork_fraction=0.1)
    flops = {"dit": 100.0, "main": 55.0, "fork": 110.0}
    points = rg.plan("maskdit_mae", s, flops)
    for (fraction, m, k) in points:
        assert k == max(1, round(0.1 * m)) and m * 55 + k * 110 <= fraction * 1000 * 100
        assert (m + 1) * 55 + round(0.1 * (m + 1)) * 110 > fraction * 1000 * 100 - 110  # the largest that fits
    assert rg.plan("dit", s, dict(flops, main=100.0)) == [(0.1, 100, 0), (0.5, 500, 0), (1.0, 1000, 0)]
    assert rg.plan("maskdit_unmasked", s, dict(flops, main=125.0)) == [(0.1, 80, 0), (0.5, 400, 0), (1.0, 800, 0)]


def _arm_file(out, arm, points, setting, seed=0):
    """A synthetic arm result: points of (train_seconds, train_flops, images, fid, accuracy)."""
    pts = [dict(fraction=(i + 1) / len(points), main_steps=10 * (i + 1), fork_steps=1 if arm != "dit" else 0,
                images=im, train_flops=fl, train_seconds=sec, main_seconds=sec * 0.9, fork_seconds=sec * 0.1,
                fid_classifier=fd, class_accuracy=acc, loss=0.3, eval_seconds=1.0)
           for i, (sec, fl, im, fd, acc) in enumerate(points)]
    r = {"arm": arm, "seed": seed, "complete": True, "points": pts, "device": {"card": "H100"}, "setting": setting,
         "step_flops": {"main": 50.0 if arm != "dit" else 100.0, "fork": 110.0, "dit": 100.0},
         "real_floor": {"fid_classifier": 0.5, "class_accuracy": 0.99}}
    with open(os.path.join(out, f"{arm}_seed{seed}.json"), "w") as f:
        json.dump(r, f)


def test_report_verdict_on_synthetic_arms(rg, tmp_path):
    s = rg.SETTING
    _arm_file(tmp_path, "dit", [(100.0, 1e15, 1e5, 8.0, 0.8), (200.0, 2e15, 2e5, 4.0, 0.9)], s)
    # MaskDiT + MAE crosses FD 4 halfway between its points: 75 s, 0.9e15 FLOPs, 1.5e5 images
    _arm_file(tmp_path, "maskdit_mae", [(50.0, 0.6e15, 1e5, 6.0, 0.85), (100.0, 1.2e15, 2e5, 2.0, 0.95)], s)
    # no MAE never gets there
    _arm_file(tmp_path, "maskdit_nomae", [(60.0, 1e15, 1e5, 9.0, 0.5), (120.0, 2e15, 2e5, 5.0, 0.7)], s)
    v = rg.report(str(tmp_path))
    assert v["dit_final_fid"] == 4.0 and v["missing"] == ["maskdit_unmasked"]
    mae = v["arms"]["maskdit_mae"]
    assert mae["reach_train_flops"] == pytest.approx(0.45) and mae["reach_train_seconds"] == pytest.approx(0.375)
    assert mae["reach_images"] == pytest.approx(0.75)
    assert mae["dit_fid_at_final_flops"] == pytest.approx(8.0 - 0.2 * 4.0)
    nomae = v["arms"]["maskdit_nomae"]
    assert nomae["reach_train_flops"] is None and nomae["final_train_flops"] == 1.0
    assert nomae["final_train_seconds"] == pytest.approx(0.6)
    text = (tmp_path / "results.md").read_text()
    assert "MaskDiT 0.5 + MAE reaches DiT's final FD at 0.45x DiT's FLOPs and 0.38x its wall time" in text
    assert "MaskDiT 0.5, no MAE does not reach DiT's final FD" in text
    assert "MAE term: final FD 2.00 with it, 5.00 without" in text
    assert "`python benchmarks/reproduce_gpu.py --arm maskdit_unmasked`" in text
    assert (tmp_path / "quality_vs_compute.png").stat().st_size > 0
    # two seeds of an arm: the curve is their mean, over the points both reached
    _arm_file(tmp_path, "dit", [(100.0, 1e15, 1e5, 6.0, 0.7)], s, seed=1)
    curves = {a: rg.curve(rs) for a, rs in rg.load_results(str(tmp_path)).items()}
    assert len(curves["dit"]) == 1 and curves["dit"][0]["fid_classifier"] == 7.0


def test_report_without_arms_names_every_arm(rg, tmp_path):
    v = rg.report(str(tmp_path))
    assert v["missing"] == list(rg.ARMS) and v["arms"] == {}
    text = (tmp_path / "results.md").read_text()
    assert "No verdict yet" in text and all(f"--arm {a}`" in text for a in rg.ARMS)


def test_cli_refusals(rg, tmp_path):
    with pytest.raises(SystemExit):
        rg.main(["--out", str(tmp_path)])  # no mode
    with pytest.raises(SystemExit):
        rg.main(["--report", "--smoke", "--out", str(tmp_path)])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="no CUDA device"):
            rg.main(["--arm", "dit", "--out", str(tmp_path)])


# ----------------------------------------------------------------------- benchmarks/reproduce_small.py
@pytest.fixture(scope="module")
def rs():
    return _script("reproduce_small")


def test_reproduce_small_first_reach_and_compare(rs):
    assert rs.first_reach([0, 10, 20], [float("inf"), 8.0, 4.0], 6.0) == pytest.approx(15.0)
    assert rs.first_reach([0, 10, 20], [float("inf"), 5.0, 4.0], 6.0) == 10.0  # reached at the first point
    assert rs.first_reach([0, 10, 20], [float("inf"), 8.0, 7.0], 6.0) is None
    pt = lambda step, s, f, fd: dict(step=step, train_seconds=s, train_flops=f, fid_classifier=fd, class_accuracy=0.5)
    points = {"dit": [pt(10, 100.0, 1e12, 9.0), pt(20, 200.0, 2e12, 5.0)],
              "maskdit": [pt(10, 50.0, 6e11, 7.0), pt(20, 100.0, 1.2e12, 3.0)]}
    c = rs.compare(points)
    # MaskDiT's FD crosses 5.0 halfway between its two points: 75 s, 9e11 FLOPs, step 15.
    assert c["maskdit_reaches_at_train_seconds"] == pytest.approx(75.0)
    assert c["factor_train_seconds"] == pytest.approx(200 / 75)
    assert c["factor_train_flops"] == pytest.approx(2e12 / 9e11)
    assert c["factor_step"] == pytest.approx(20 / 15)
    # DiT at MaskDiT's final budget: 100 s and step 20 are DiT points; 1.2e12 FLOPs is 1/5 of the way.
    assert c["dit_fid_at_maskdit_final_train_seconds"] == 9.0 and c["dit_fid_at_maskdit_final_step"] == 5.0
    assert c["dit_fid_at_maskdit_final_train_flops"] == pytest.approx(9.0 - 0.2 * 4.0)
    points["maskdit"][-1]["fid_classifier"] = 6.0
    assert rs.compare(points)["factor_train_seconds"] is None


def test_reproduce_small_equal_flops_steps(rs):
    flops = np.array([0.0, 2.0, 4.0, 6.0, 8.0, 10.0])
    assert rs.equal_flops_steps(flops, [0.5, 3.1, 7.0, 9.0]) == [1, 2, 3, 5]  # ties go to the earlier step
    assert rs.equal_flops_steps(flops, [1.9, 2.1, 20.0]) == [1, 5]  # duplicates merged; the last is the end


def test_reproduce_small_quick(rs, classifier_cache, tmp_path):
    """benchmarks/reproduce_small.py --quick: both variants train in chunks for equal FLOPs and are
    scored at equal-FLOPs points; FLOPs, metrics and the sanity check land in results.json / .md
    and the PNG."""
    rs.main(["--out", str(tmp_path), "--quick", "--num-samples", "20", "--sample-steps", "2"])
    with open(tmp_path / "results.json") as f:
        results = json.load(f)
    points = results["points"]
    assert set(points) == {"maskdit", "dit"}
    assert [p["step"] for p in points["maskdit"]] == [2, 4]
    # The quick MaskDiT trains steps 0-2 masked and step 3 unmasked; DiT never masks.
    assert [p["mask_ratio"] for p in points["maskdit"]] == [0.5, 0.0]
    assert all(p["mask_ratio"] == 0.0 for p in points["dit"])
    cfg = results["config"]
    assert cfg["dit"]["model"] == "DiT-S/4" and cfg["maskdit"]["model"] == "MaskDiT-S/4"
    enc = {k: cfg["maskdit"]["model_kwargs"][k] for k in ("hidden_size", "depth", "num_heads", "mlp_ratio")}
    assert cfg["dit"]["model_kwargs"] == dict(enc, learn_sigma=False)
    # Training FLOPs recomputed from the analytic per-step counts; DiT's steps buy MaskDiT's FLOPs.
    from maskdit_fast.flops import train_step_flops
    kw = dict(input_size=MNIST5K_SIZES[cfg["maskdit"]["data"]], in_channels=1, num_classes=10)
    mask = create_model("MaskDiT-S/4", **kw, **cfg["maskdit"]["model_kwargs"])
    dit = create_model("DiT-S/4", **kw, **cfg["dit"]["model_kwargs"])
    b = cfg["maskdit"]["batch_size"]
    f_masked, f_full, f_dit = (train_step_flops(mask, mask_ratio=0.5, batch=b), train_step_flops(mask, batch=b),
                               train_step_flops(dit, batch=b))
    assert [p["train_flops"] for p in points["maskdit"]] == [2 * f_masked, 3 * f_masked + f_full]
    total = 3 * f_masked + f_full
    assert cfg["dit"]["steps"] == round(total / f_dit) != cfg["maskdit"]["steps"]
    assert [p["train_flops"] for p in points["dit"]] == [p["step"] * f_dit for p in points["dit"]]
    assert points["dit"][-1]["step"] == cfg["dit"]["steps"]
    assert abs(points["dit"][0]["train_flops"] - 2 * f_masked) <= f_dit / 2  # the equal-FLOPs point
    for name, pts in points.items():
        assert pts[0]["train_seconds"] <= pts[-1]["train_seconds"]
        for p in pts:
            with open(tmp_path / "runs" / name / f"eval_{p['step']:06d}" / "metrics.json") as f:
                metrics = json.load(f)
            assert p["fid_classifier"] == metrics["fid_classifier"] > 0
            assert p["class_accuracy"] == metrics["class_accuracy"]
            assert metrics["num_samples"] == 20 and metrics["steps"] == 2
            assert (metrics["solver"], metrics["cfg_interval"]) == (cfg[name]["sample_solver"],
                                                                   cfg[name]["sample_cfg_interval"])
    # Every evaluation after the first reused the real-digit statistics computed once.
    assert metrics["ref_stats"] == str(tmp_path / "runs" / "maskdit" / "eval_000002" / "ref_stats.npz")
    assert results["comparison"]["dit_final_fid"] == points["dit"][-1]["fid_classifier"]
    s = results["sanity_check"]
    assert s["early_fid"] == {k: v[0]["fid_classifier"] for k, v in points.items()}
    assert s["early_step"] == {k: v[0]["step"] for k, v in points.items()}
    assert s["separation"] == pytest.approx(min(s["early_fid"].values()) / s["real_fid"]) and s["real_fid"] > 0
    assert results["machine"]["nproc"] >= 1 and len(results["load_start"]) == 3
    md = (tmp_path / "results.md").read_text()
    assert md.count("| maskdit |") == 2 and md.count("| dit |") == len(points["dit"]) and "sanity check" in md
    assert md.count("## ") == len(set(line for line in md.splitlines() if line.startswith("## ")))  # no repeats
    # --replot redoes the reports from results.json alone (the run dirs are not needed).
    shutil.rmtree(tmp_path / "runs")
    (tmp_path / "results.md").unlink()
    rs.main(["--out", str(tmp_path), "--replot"])
    assert (tmp_path / "results.md").read_text() == md
    with open(tmp_path / "results.json") as f:
        assert json.load(f) == results
    from PIL import Image
    with Image.open(tmp_path / "quality_vs_compute.png") as img:
        assert img.format == "PNG" and img.size[0] > 500


def test_reproduce_small_bad_arguments(rs, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(ValueError, match="end at"):
            rs.run(str(tmp_path), str(tmp_path / "runs"), quick=True, eval_steps=[2, 3])
        assert torch.get_num_threads() == 2  # run() pins 1 thread only while it runs, even when it raises
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(SystemExit):
        rs.main(["--out", str(tmp_path), "--quick", "--num-samples", "1"])
    with pytest.raises(SystemExit):
        rs.main(["--out", str(tmp_path), "--quick", "--eval-steps", "2,x"])


def test_report_warns_of_mixed_settings(rg, tmp_path):
    _arm_file(tmp_path, "dit", [(100.0, 1e15, 1e5, 8.0, 0.8)], rg.SETTING)
    _arm_file(tmp_path, "maskdit_mae", [(50.0, 1e15, 1e5, 6.0, 0.85)], dict(rg.SETTING, dit_steps=10))
    rg.report(str(tmp_path))
    assert "maskdit_mae seed 0 (dit_steps)" in (tmp_path / "results.md").read_text()
