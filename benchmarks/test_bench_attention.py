"""Attention at MaskDiT's encoder (kept tokens), decoder and DiT shapes: torch (SDPA, auto kernel),
SDPA pinned to flash / cuDNN / memory-efficient, torch's varlen_attn, and the package's triton /
cuda / flash_attn / xformers back-ends, forward and forward+backward. extra_info: TFLOP/s and % of
the bf16 matmul peak (FLOPs: 4*B*H*L^2*Dh forward, 2.5x that backward)."""
import pytest

from maskdit_fast import bench

_CASES = [c.name for c in bench.attention_cases(bench.make_config("cpu", "cpu"))]


@pytest.mark.parametrize("pass_", bench.PASSES)
@pytest.mark.parametrize("backend", bench.ATTENTION_BACKENDS)
@pytest.mark.parametrize("case_name", _CASES)
def test_attention(case_name, backend, pass_, cfg, op_benchmark):
    case = next(c for c in bench.attention_cases(cfg) if c.name == case_name)
    op_benchmark(case, backend, pass_)
