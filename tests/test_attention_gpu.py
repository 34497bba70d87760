"""The Triton attention at DiT sizes against the float64 reference by maskdit_fast.accuracy's rule (error <= 2x the
error of PyTorch's plain math in the same dtype + one ulp at the output's scale; kernel buffers NaN-poisoned).

`attention_checks` builds the cases: dense self-attention from qkv views and qkv-packed at the MaskDiT encoder
(128 tokens) and DiT (256) lengths with 16 heads of 72, in bf16 and fp16; varlen (random lengths up to 1024
including 0 and 1, Lq != Lk, causal and not, 2 heads; plus qkv-packed causal) for every head dim, cycling through
the dtypes and fp32. On a GPU at those sizes; on the CPU (Triton interpreter) at toy sizes, so the case code runs
everywhere."""
import pytest
import torch

from conftest import DEVICE, assert_checks
from maskdit_fast.accuracy import check_op
from maskdit_fast.indexing import cu_seqlens_from_counts
from maskdit_fast.ops.attention import (attention, attention_qkvpacked, varlen_attention, varlen_attention_qkvpacked,
                                        varlen_attention_ref)


def attention_checks(device, dtypes=(torch.bfloat16, torch.float16), seed=0, batch=8, heads=16,
                     head_dims=(64, 72, 80, 96, 128), max_len=1024, dense_lengths=(128, 256)):
    """Checks of the Triton attention on `device` (see the module docstring); returns a list of Check."""
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape, dtype):
        return torch.randn(*shape, device=device, dtype=dtype, generator=g).requires_grad_()

    checks = []
    for dtype in dtypes:
        for length in dense_lengths:
            b = max(1, batch * 128 // max(length, 128))
            cu = cu_seqlens_from_counts([length] * b, device)

            def dense_ref(qkv, cu=cu, length=length):
                flat = qkv.flatten(0, 1)
                out = varlen_attention_ref(flat[:, 0], flat[:, 1], flat[:, 2], cu, cu, compute_dtype=qkv.dtype)[0]
                return out.view(qkv.shape[0], length, *out.shape[1:])

            def dense_views(qkv):
                return attention(*qkv.unbind(2), backend="triton")

            def dense_packed(qkv):
                return attention_qkvpacked(qkv, backend="triton")
            shape = f"B={b} L={length} H={heads} D=72 {str(dtype)[6:]}"
            for label, op in (("attention(q,k,v views)", dense_views), ("attention_qkvpacked", dense_packed)):
                checks += check_op(f"{label} {shape}", op, dense_ref, (randn(b, length, 3, heads, 72, dtype=dtype),), g)

    all_dtypes = tuple(dtypes) + (torch.float32,)
    for i, head_dim in enumerate(head_dims):
        dtype = all_dtypes[i % len(all_dtypes)]
        lengths = torch.randint(0, max_len + 1, (2, batch), device=device, generator=g)
        lengths[:, :2] = torch.tensor([[0, 1], [1, 0]], device=device)
        lq, lk = lengths.tolist()
        cu_q, cu_k = cu_seqlens_from_counts(lq, device), cu_seqlens_from_counts(lk, device)
        for causal in (False, True):
            def varlen_op(q, k, v, causal=causal, cu_q=cu_q, cu_k=cu_k, lq=lq, lk=lk):
                return varlen_attention(q, k, v, cu_q, cu_k, max(lq), max(lk), 0.1, causal, backend="triton")

            def varlen_ref(q, k, v, causal=causal, cu_q=cu_q, cu_k=cu_k):
                return varlen_attention_ref(q, k, v, cu_q, cu_k, 0.1, causal, compute_dtype=q.dtype)[0]
            name = f"varlen_attention D={head_dim} {str(dtype)[6:]} causal={causal} lengths q={lq} k={lk}"
            args = (randn(sum(lq), 2, head_dim, dtype=dtype), randn(sum(lk), 2, head_dim, dtype=dtype),
                    randn(sum(lk), 2, head_dim, dtype=dtype))
            checks += check_op(name, varlen_op, varlen_ref, args, g)
        cu_s = cu_seqlens_from_counts(lq, device)

        def packed_op(qkv, cu_s=cu_s, lq=lq):
            return varlen_attention_qkvpacked(qkv, cu_s, max(lq), causal=True, backend="triton")

        def packed_ref(qkv, cu_s=cu_s):
            return varlen_attention_ref(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu_s, cu_s, causal=True,
                                        compute_dtype=qkv.dtype)[0]
        checks += check_op(f"varlen_attention_qkvpacked D={head_dim} {str(dtype)[6:]} causal", packed_op, packed_ref,
                           (randn(sum(lq), 3, 2, head_dim, dtype=dtype),), g)
    return checks


@pytest.mark.skipif(DEVICE.type == "cuda", reason="the interpreter run of the GPU cases at toy sizes; on a GPU "
                    "test_gpu_kernels_match_float64 runs them for real")
def test_gpu_cases_at_toy_sizes_on_cpu():
    checks = attention_checks("cpu", dtypes=(torch.bfloat16,), batch=2, heads=1, head_dims=(72,), max_len=9,
                              dense_lengths=(9,))
    assert len(checks) == 2 * 2 + 2 * 4 + 2
    assert_checks(checks)


@pytest.mark.gpu
def test_gpu_kernels_match_float64():
    assert_checks(attention_checks("cuda"))
