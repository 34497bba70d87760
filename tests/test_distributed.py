"""The trainer under torchrun (2 CPU ranks, gloo) against single-process runs of the same global
batch: FSDP2 and DDP follow the same loss trajectory (also with the packed options
--mixed-resolutions / --mask-ratio-range, whose grouped forward must go through the wrappers: DDP
replicas stay identical), checkpoints move between world sizes 1 and 2 in both directions, a rank
killed mid-run leaves the last checkpoint intact, a locked run dir stops every rank, and --compile
runs. Losses agree to rel 1e-5 and EMA weights to 1e-5 (float reduction order differs)."""
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from maskdit_fast import train as T
from maskdit_fast.checkpoint import is_dcp_checkpoint, latest_checkpoint, list_checkpoints, load_checkpoint
from maskdit_fast.config import parse_config
from maskdit_fast.parallel import DistInfo

# digits-tiny (8x8 digits, 50k-parameter MaskDiT), fp32, global batch 16, a checkpoint every 2 steps
ARGS = ["--preset", "digits-tiny", "--steps", "6", "--ckpt-every", "2", "--keep-last", "5", "--log-every", "1",
        "--threads", "1", "--sample-per-class", "0", "--device", "cpu", "--precision", "fp32"]


def run_single(run_dir, *extra):
    return T.train(parse_config(ARGS + ["--run-dir", str(run_dir), *extra]), progress=False)


TRAIN_WORKER = os.path.join(os.path.dirname(__file__), "train_worker.py")  # the trainer CLI, watched / broken


def torchrun(run_dir, *extra, worker=("-m", "maskdit_fast.train")):
    import maskdit_fast  # the workers import the package under test, wherever this process found it
    package_root = os.path.dirname(os.path.dirname(maskdit_fast.__file__))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=package_root)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           *worker, *ARGS, "--run-dir", str(run_dir), *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def assert_same_losses(got, want, steps):
    assert sorted(got) == list(steps), got
    for step in steps:
        assert math.isclose(got[step], want[step], rel_tol=1e-5), (step, got, want)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Single process, no parallelism: .pt checkpoints at steps 2, 4, 6; the loss of every step."""
    run_dir = tmp_path_factory.mktemp("reference")
    run_single(run_dir)
    return run_dir, losses(run_dir)


def test_fsdp_matches_single_process_survives_a_killed_rank_and_resumes_at_world_1(reference, tmp_path):
    ref_dir, ref = reference
    # FSDP2 composed with per-block compile and selective activation checkpointing
    proc = torchrun(tmp_path, "--parallel", "fsdp", "--compile", "--compile-backend", "aot_eager",
                    "--activation-checkpointing", "selective", worker=(TRAIN_WORKER, "--kill-last-rank-at", "4"))
    assert proc.returncode != 0  # rank 1 was killed after step 4, before that step's checkpoint
    assert_same_losses(losses(tmp_path), ref, range(1, 5))
    latest = latest_checkpoint(str(tmp_path / "checkpoints"))
    assert sorted(list_checkpoints(str(tmp_path / "checkpoints"))) == [2]
    assert is_dcp_checkpoint(latest)  # the last one, intact
    assert load_checkpoint(os.path.join(latest, "train_state.pt"))["step"] == 2
    # the same command at world size 1 (no parallelism) resumes the sharded checkpoint
    run_single(tmp_path)
    assert_same_losses(losses(tmp_path), ref, range(1, 7))
    from safetensors.torch import load_file
    got, want = load_file(str(tmp_path / "ema.safetensors")), load_file(str(ref_dir / "ema.safetensors"))
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-5)


def test_ddp_resumes_a_single_process_checkpoint(reference, tmp_path):
    ref_dir, ref = reference
    os.makedirs(tmp_path / "checkpoints")
    shutil.copy(ref_dir / "checkpoints" / "step_00000002.pt", tmp_path / "checkpoints")
    proc = torchrun(tmp_path, "--parallel", "ddp", "--async-checkpoint", "--peak-tflops", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and "2 process(es), parallel ddp" in proc.stdout
    assert_same_losses(losses(tmp_path), ref, range(3, 7))
    with open(tmp_path / "metrics.jsonl") as f:
        last = json.loads(f.readlines()[-1])
    assert last["tokens_per_s"] == pytest.approx(last["images_per_s"] * 16)  # 16 patches per 8x8 digit
    assert 0 < last["mfu"] == pytest.approx(last["tflops_per_device"])  # peak 1 TFLOP/s
    assert len(last["peak_mem_gib_per_rank"]) == 2 and last["peak_mem_gib"] == max(last["peak_mem_gib_per_rank"])
    ckpts = str(tmp_path / "checkpoints")
    assert sorted(list_checkpoints(ckpts)) == [2, 4, 6]
    assert is_dcp_checkpoint(latest_checkpoint(ckpts))  # world size 2 writes DCP


def test_compile_and_activation_checkpointing_single_process(reference, tmp_path):
    _, ref = reference
    run_single(tmp_path, "--steps", "2", "--compile", "--compile-backend", "aot_eager",
               "--activation-checkpointing", "full")
    assert_same_losses(losses(tmp_path), ref, range(1, 3))


def test_distributed_config_errors(tmp_path):
    with pytest.raises(ValueError, match="parallel must be"):
        parse_config(ARGS + ["--parallel", "zero"])
    with pytest.raises(ValueError, match="activation_checkpointing must be"):
        parse_config(ARGS + ["--activation-checkpointing", "some"])
    cfg = parse_config(ARGS + ["--run-dir", str(tmp_path)])
    with pytest.raises(ValueError, match="divisible by the world size 3"):
        T.build_data(cfg, DistInfo(0, 3, 0, torch.device("cpu")))
    with pytest.raises(ValueError, match="need --parallel ddp or fsdp"):
        T.parallelize(cfg, torch.nn.Linear(1, 1), DistInfo(0, 2, 0, torch.device("cpu")))
    with pytest.raises(RuntimeError, match="torchrun"):
        run_single(tmp_path, "--parallel", "fsdp")


PACKED = ["--mixed-resolutions", "8", "4", "--mask-ratio-range", "0.2", "0.6", "--steps", "4"]


def assert_same_ema(run_dir, ref_dir):
    from safetensors.torch import load_file
    got, want = load_file(str(run_dir / "ema.safetensors")), load_file(str(ref_dir / "ema.safetensors"))
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-5)


def test_packed_options_through_ddp_and_fsdp(tmp_path):
    """The grouped loss called forward_packed on the wrapped model: DDP handed back the inner
    method (no gradient sync: replicas diverged, one checkpointed), FSDP skipped its parameter
    gathering (crash). Now both match one process, and DDP's replicas stay bitwise equal. A run dir
    locked by another trainer stops every rank before anything is written."""
    run_single(tmp_path / "single", *PACKED)
    want = losses(tmp_path / "single")
    worker = (TRAIN_WORKER,)
    from maskdit_fast.run_dir import RunDirLock
    lock = RunDirLock(str(tmp_path / "ddp")).acquire()
    try:
        proc = torchrun(tmp_path / "ddp", "--parallel", "ddp", *PACKED, worker=worker)
    finally:
        lock.release()
    assert proc.returncode != 0 and "in use by another trainer" in proc.stderr, proc.stderr[-3000:]
    assert sorted(os.listdir(tmp_path / "ddp")) == [".lock"]
    for parallel in ("ddp", "fsdp"):
        proc = torchrun(tmp_path / parallel, "--parallel", parallel, *PACKED, worker=worker)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert_same_losses(losses(tmp_path / parallel), want, range(1, 5))
        assert_same_ema(tmp_path / parallel, tmp_path / "single")
    for step in (2, 4):  # --ckpt-every 2
        replicas = [torch.load(tmp_path / "ddp" / f"replica_{rank}_{step}.pt") for rank in (0, 1)]
        for name, value in replicas[0].items():
            assert torch.equal(value, replicas[1][name]), (step, name)


@pytest.fixture
def one_rank_group(monkeypatch):
    """The torchrun environment of a world of one: the trainer joins a real (gloo) process group."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in dict(WORLD_SIZE="1", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(port)).items():
        monkeypatch.setenv(key, value)
    yield
    from maskdit_fast.parallel import destroy_distributed
    destroy_distributed()


def test_packed_options_under_fsdp_bf16(tmp_path, one_rank_group):
    """FSDP's mixed precision casts floating tensor inputs to bf16: per-sample mask ratios passed
    as a tensor would change their keep counts (0.3126 -> 0.3125 keeps 11 of 16 tokens, not 10, and
    the model rejects the mismatch with the drawn masks). The trainer passes them as a list."""
    flags = ["--parallel", "fsdp", "--precision", "bf16", "--mixed-resolutions", "8", "4", "--mask-ratio-range",
             "0.3126", "0.3126", "--steps", "2", "--ckpt-every", "2"]
    result = T.train(T.parse_config(ARGS + ["--run-dir", str(tmp_path), *flags]), progress=False)
    assert result["step"] == 2 and all(r["finite"] == 1.0 for r in losses_records(tmp_path))
    assert is_dcp_checkpoint(str(tmp_path / "checkpoints" / "step_00000002"))


def losses_records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if "loss" in r]
