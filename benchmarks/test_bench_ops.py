"""Fused glue ops (gather/scatter of kept tokens, LayerNorm + adaLN modulation, gated residual):
every op x back-end (torch eager, torch.compile'd reference, triton, cuda) x pass (fwd, fwd+bwd).
extra_info: achieved GB/s and % of the copy-bandwidth floor (bytes counted in
maskdit_fast.bench.costs)."""
import pytest

from maskdit_fast import bench

_CASES = {c.name: c for c in bench.op_cases(bench.make_config("cpu", "cpu"))}


@pytest.mark.parametrize("pass_", bench.PASSES)
@pytest.mark.parametrize("backend", bench.OP_BACKENDS)
@pytest.mark.parametrize("op", list(_CASES))
def test_op(op, backend, pass_, cfg, op_benchmark):
    case = next(c for c in bench.op_cases(cfg) if c.name == op)
    op_benchmark(case, backend, pass_)
