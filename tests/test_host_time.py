"""benchmarks/host_time.py in its quick mode (a few calls per row): the code path of the host-time report runs
and writes every row, and the Triton paths launch one kernel per direction plus what the op needs (the inverse
map of the gather/scatter; the attention backward at K=128 keys is the fused one-launch kernel). No timing is asserted."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHES = {"gather_tokens": (1, 2), "gather_tokens_varlen": (1, 2), "scatter_tokens": (2, 1),
            "scatter_tokens_varlen": (2, 1), "layernorm_modulate": (1, 1), "gated_residual": (1, 1),
            "residual_layernorm_modulate": (1, 1), "attention": (1, 1), "attention_qkvpacked": (1, 1)}
CUDA_OPS = {"gather_tokens", "scatter_tokens", "layernorm_modulate", "gated_residual", "residual_layernorm_modulate"}


def test_quick_report(tmp_path):
    out = tmp_path / "host"
    env = {**os.environ, "PYTHONPATH": ROOT, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "host_time.py"), "--quick", "--out",
                           str(out)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "host.json").read_text())
    rows = {(r["op"], r["path"]): r for r in report["ops"]}
    assert set(rows) == ({(op, "torch") for op in LAUNCHES} | {(op, "triton") for op in LAUNCHES}
                         | {(op, "cuda") for op in CUDA_OPS})
    for op, launches in LAUNCHES.items():
        assert (rows[op, "triton"]["launches_fwd"], rows[op, "triton"]["launches_bwd"]) == launches, op
    assert all(r["us"] > 0 and r["vs_torch"] > 0 for r in report["ops"])
    assert len(report["idioms"]) == 4 and all(r["us"] > 0 for r in report["idioms"])
    text = (tmp_path / "host.md").read_text()
    assert "| gated_residual | cuda |" in text and "Registration idioms" in text
