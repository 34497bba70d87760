"""benchmarks/tune_gpu.py: the --dry sweep end to end on the CPU (files written, missing TUNING reported,
winners only among checked configs, a crashing config isolated, the deadline honoured), the winner rule,
and on a GPU the compile phase's register / spill record."""
import importlib
import json
import os
import sys
import time

import pytest

BENCH_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks")

# A kernel family of its own: a module on sys.path (so the sweep's spawned children import it too) with
# TUNING and an op that reads its configuration through kernels._config like the real launchers. MODE
# "exact" is right, "wrong" off by far more than the 2x rule allows, "crash" kills its process, "sleep"
# sleeps until the time in FAKE_SLEEP_UNTIL.
FAKE_MODULE = '''
import dataclasses
import os
import time

import torch

import tune_gpu
from maskdit_fast import bench
from maskdit_fast.bench.costs import Cost
from maskdit_fast.kernels import _config

KEY = _config.shape_key(D=8)
TUNING = {"fake_fwd": [{"MODE": "exact", "BLOCK": 1}, {"MODE": "crash"}, {"MODE": "wrong"},
                       {"MODE": "exact", "BLOCK": 2}],
          "fake_slow": [{"MODE": "exact"}, {"MODE": "sleep"}, {"MODE": "exact", "BLOCK": 2}]}


def _op(family):
    def op(x, *, backend=None):
        mode = _config.tuned(family, KEY, {"MODE": "exact"})["MODE"]
        if mode == "crash":
            os._exit(7)
        if mode == "raise":
            raise RuntimeError("out of resource: shared memory")
        if mode == "sleep":
            time.sleep(max(0.0, float(os.environ["FAKE_SLEEP_UNTIL"]) - time.time()))
        return x * 2 + (0.01 if mode == "wrong" else 0.0)
    return op


def ref(x):
    return x * 2


def make_args(device, dtype, gen):
    return (torch.randn(4, 8, device=device, generator=gen).to(dtype).requires_grad_(),)


def _shapes(family):
    case = bench.OpCase(f"{family}[a]", "[4, 8]", _op(family), ref, make_args, (0,), (Cost(), Cost()), "memory",
                        ("triton",))
    return [tune_gpu.Shape(KEY, case, ("torch",)),
            tune_gpu.Shape(KEY, dataclasses.replace(case, name=f"{family}[b]"), ("torch",))]


def fwd_shapes(cfg):
    return _shapes("fake_fwd")


def slow_shapes(cfg):
    return _shapes("fake_slow")
'''


@pytest.fixture(scope="module")
def tune():
    sys.path.insert(0, BENCH_DIR)
    try:
        yield importlib.import_module("tune_gpu")
    finally:
        sys.path.remove(BENCH_DIR)


@pytest.fixture
def fake(tmp_path, monkeypatch):
    (tmp_path / "fake_tune_kernels.py").write_text(FAKE_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("fake_tune_kernels")
    yield module
    sys.modules.pop("fake_tune_kernels", None)


def _read(out):
    rows = [json.loads(line) for line in open(out / "sweep.jsonl")]
    return rows, json.load(open(out / "best.json")), open(out / "sweep.md").read()


def test_dry_sweep_isolates_a_crash_and_picks_only_checked_configs(tune, fake, tmp_path, monkeypatch):
    from maskdit_fast.kernels import modulate
    family = tune.Family("fake_fwd", "fake_tune_kernels", "fwd", fake.fwd_shapes)
    residual = next(f for f in tune.FAMILIES if f.name == "gated_residual_fwd")
    monkeypatch.setattr(modulate, "TUNING", {}, raising=False)  # read in this process: reported missing
    out = tmp_path / "sweep"
    tune.run_sweep(str(out), deadline_s=300, max_configs=4, dry=True, families=(family, residual), log=lambda _: None)
    rows, best, text = _read(out)

    assert rows[0]["kind"] == "env" and rows[0]["dry"] and rows[-1]["kind"] == "end" and not rows[-1]["cut_off"]
    missing = [r for r in rows if r["kind"] == "missing"]
    assert [r["family"] for r in missing] == ["gated_residual_fwd"] and "TUNING" in missing[0]["reason"]
    assert "Not swept: maskdit_fast.kernels.modulate.TUNING lists no candidates" in text

    compiled = [r for r in rows if r["kind"] == "compile"]
    assert len(compiled) == 8 and {r["status"] for r in compiled} == {"n/a"}
    configs = {(r["config_id"], r["case"]): r for r in rows if r["kind"] == "config"}
    assert set(configs) == {(i, c) for i in range(4) for c in ("fake_fwd[a]", "fake_fwd[b]")}
    # config 1 killed its child at the first shape; the sweep went on in new children
    assert configs[1, "fake_fwd[a]"]["status"] == "crashed" and "exit code 7" in configs[1, "fake_fwd[a]"]["reason"]
    assert configs[1, "fake_fwd[b]"]["status"] == "crashed"
    for case in ("fake_fwd[a]", "fake_fwd[b]"):
        wrong = configs[2, case]
        assert wrong["status"] == "failed check" and not wrong["check"]["fwd+bwd"]["passed"]
        assert wrong["check"]["fwd"]["max_err"] > wrong["check"]["fwd"]["tol"] and "ms" not in wrong
        for i in (0, 3):
            ok = configs[i, case]
            assert ok["status"] == "ok" and ok["check"]["fwd+bwd"]["passed"] and ok["check"]["fwd"]["passed"]
            assert set(ok["ms"]) == {"fwd", "fwd+bwd"} and all(v > 0 for v in ok["ms"].values())

    # the winner: least total forward time over the key's shapes, among the configs that passed
    totals = {i: sum(configs[i, c]["ms"]["fwd"] for c in ("fake_fwd[a]", "fake_fwd[b]")) for i in (0, 3)}
    winner = min(totals, key=totals.get)
    assert best == {"fake_fwd": {fake.KEY: fake.TUNING["fake_fwd"][winner]}}
    baselines = {r["case"]: r for r in rows if r["kind"] == "baseline"}
    assert set(baselines) == {"fake_fwd[a]", "fake_fwd[b]"}
    assert all(b["baseline"] == "torch" and b["status"] == "ok" and set(b["ms"]) == {"fwd", "bwd", "fwd+bwd"}
               for b in baselines.values())
    assert "## fake_fwd (fwd; chosen by fwd time)" in text and "torch ms (ratio)" in text
    assert "MODE=crash" in text and "crashed" in text and "failed check" in text


def test_dry_sweep_honours_the_deadline(tune, fake, tmp_path, monkeypatch):
    family = tune.Family("fake_slow", "fake_tune_kernels", "fwd", fake.slow_shapes)
    out = tmp_path / "cut"
    deadline_s = 8.0
    monkeypatch.setenv("FAKE_SLEEP_UNTIL", str(time.time() + deadline_s + 0.5))
    tune.run_sweep(str(out), deadline_s=deadline_s, max_configs=3, dry=True, families=(family,), log=lambda _: None)
    rows, best, text = _read(out)
    assert rows[-1]["kind"] == "end" and rows[-1]["cut_off"] and "cut off by the deadline" in text
    items = [r for r in rows if r["kind"] in ("config", "baseline")]
    sleeper = next((n for n, r in enumerate(items) if r.get("config_id") == 1), None)
    assert sleeper is not None  # the sleeping config was started or skipped, never lost
    # nothing after the config that ran past the deadline was run: each is recorded as skipped
    later = items[sleeper + 1:]
    assert later and all(r["status"] == "skipped" and r["reason"] == "deadline" for r in later)
    assert {(r["config_id"], r["case"]) for r in later if r["kind"] == "config"} >= {(2, "fake_slow[a]"),
                                                                                      (2, "fake_slow[b]")}
    assert all(r["kind"] == "baseline" for r in later[3:])  # config-major order, baselines last
    # config 1 was cut before its second shape: only config 0 can have been timed at every shape
    assert best in ({}, {"fake_slow": {fake.KEY: fake.TUNING["fake_slow"][0]}})


def test_dry_run_of_the_real_families(tune, tmp_path):
    """Every real family is swept (2 configs under the interpreter at tiny shapes) or reported missing;
    skipped while no kernel module has TUNING (the kernel redesign adds it)."""
    out = tmp_path / "real"
    assert tune.main(["--dry", "--out", str(out)]) == 0
    rows, best, text = _read(out)
    missing = {r["family"]: r["reason"] for r in rows if r["kind"] == "missing"}
    swept = {r["family"] for r in rows if r["kind"] == "config"}
    assert set(missing) | swept == {f.name for f in tune.FAMILIES} and not set(missing) & swept
    for name, reason in missing.items():
        assert f"TUNING lists no candidates for {name!r}" in reason and f"Not swept: {reason}" in text
    for family in (f for f in tune.FAMILIES if f.name in swept):
        configs = [r for r in rows if r["kind"] == "config" and r["family"] == family.name]
        assert {r["config_id"] for r in configs} == {0, 1}
        assert all(r["status"] == "ok" for r in configs), [(r["case"], r["status"], r.get("reason")) for r in configs]
        assert set(best[family.name]) == {r["key"] for r in configs}
    if not swept:
        pytest.skip("no real family swept: " + "; ".join(missing.values()))


def test_compile_phase_rejects_what_fails_and_survives_a_dead_worker(tune, fake):
    """The pool plumbing of phase 1 on the CPU (no Triton kernels here, so no register record)."""
    family = tune.Family("fake_fwd", "fake_tune_kernels", "fwd", fake.fwd_shapes)
    settings = tune.Settings(False, "cpu", "cpu-quick")
    rows = []
    tasks = [(family, "fake_fwd[a]", 0, {"MODE": "exact"}), (family, "fake_fwd[a]", 1, {"MODE": "raise"})]
    warm = [(family, "fake_fwd[b]", "compile")]  # torch.compile of the reference, built for phase 2's cache
    rejected = tune.run_compile_phase(tasks, warm, settings, time.time() + 300, rows.append, lambda _: None)
    assert rejected == {("fake_fwd", "fake_fwd[a]", 1)}
    warmed = [r for r in rows if r["kind"] == "warm"]
    assert len(warmed) == 1 and warmed[0]["status"] == "ok" and warmed[0]["baseline"] == "compile", warmed
    status = {r["config_id"]: r for r in rows if r["kind"] == "compile"}
    assert status[0]["status"] == "ok" and status[0]["kernels"] == []
    assert status[1]["status"] == "rejected" and "out of resource" in status[1]["reason"]
    rows.clear()
    assert tune.run_compile_phase([(family, "fake_fwd[b]", 2, {"MODE": "crash"})], [], settings, time.time() + 120,
                                  rows.append, lambda _: None) == set()
    assert len(rows) == 1 and rows[0]["status"] == "n/a" and "worker pool" in rows[0]["reason"]


def test_winner_needs_every_shape_of_its_key(tune):
    fam = tune.Family("f", "m", "bwd", None)

    def row(cid, case, key, status="ok", bwd=1.0):
        return dict(kind="config", family="f", case=case, key=key, config_id=cid, config={"C": cid}, status=status,
                    ms={"bwd": bwd, "fwd+bwd": 100.0 - bwd} if status == "ok" else None)
    rows = [row(0, "a", "k1", bwd=2.0), row(0, "b", "k1", bwd=2.0),    # total 4 at both shapes
            row(1, "a", "k1", bwd=1.0), row(1, "b", "k1", "skipped"),  # faster at a, not timed at b: out
            row(2, "a", "k1", bwd=1.5), row(2, "b", "k1", bwd=2.0),    # total 3.5: the winner of k1
            row(3, "a", "k1", "failed check"),
            row(0, "c", "k2", "crashed"), row(1, "c", "k2", bwd=9.0)]  # by bwd time, not fwd+bwd
    assert tune.best_configs(rows, [fam]) == {"f": {"k1": (2, {"C": 2}), "k2": (1, {"C": 1})}}
    assert tune.best_configs([row(0, "a", "k1", "failed check")], [fam]) == {}


@pytest.mark.gpu
def test_compile_phase_records_registers_and_spills(tune):
    settings = tune.Settings(False, "cuda", "gpu")
    family = next(f for f in tune.FAMILIES if f.name == "ln_modulate_fwd")
    configs, why = tune.candidates(family)
    if configs is None:
        pytest.skip(why)
    shape = next(iter(tune._shapes(family, settings).values()))
    row = tune.compile_task(family, shape.case.name, 0, configs[0], settings)
    assert row["status"] in ("ok", "rejected"), row
    assert row["kernels"] and all(isinstance(k["registers"], int) and k["registers"] > 0 and k["spills"] >= 0
                                  and k["shared"] >= 0 for k in row["kernels"])
