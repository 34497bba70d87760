"""Accuracy checks and timings of the Triton attention kernels at DiT sizes, for the GPU report script
and the @pytest.mark.gpu tests (both functions also run on CPU under the Triton interpreter, at toy
sizes, so their code is exercised without a GPU).

run_checks(device): the quick subset the report script runs (maskdit_fast.bench's check-module entry point).
check_correctness(): output and dQ/dK/dV (or dqkv) against the float64 reference varlen_attention_ref,
with maskdit_fast.ops.gpu_checks.check_op's rule: error <= 2x the error of PyTorch's plain math in the
same dtype + one ulp at the output's scale, kernel buffers NaN-poisoned.

benchmark(): median ms and TFLOP/s (4*B*L^2*H*D forward, 2.5x that backward) of ours beside SDPA's
flash back-end and torch's varlen_attn, forward and forward+backward, q, k, v being views of one
[B, L, 3, H, D] qkv tensor as in the model (maskdit_fast.bench.timing.time_calls: CUDA events,
warm-up, median).
"""
import importlib.util

import torch
import torch.nn.functional as F

from maskdit_fast.masking import cu_seqlens_from_counts
from maskdit_fast.ops.attention import (attention, attention_qkvpacked, varlen_attention, varlen_attention_qkvpacked,
                                        varlen_attention_ref)


def check_correctness(device="cuda", dtypes=(torch.bfloat16, torch.float16), seed=0, batch=8, heads=16,
                      head_dims=(64, 72, 80, 96, 128), max_len=1024, dense_lengths=(128, 256)):
    """Checks the Triton attention on `device` against float64.

    Cases: dense self-attention from qkv views and qkv-packed at `dense_lengths` (MaskDiT encoder 128,
    DiT 256; B = `batch` * 128 / L) with H=`heads`, D=72, in every dtype; varlen (`batch` random lengths in
    [0, max_len] including 0 and 1, Lq != Lk, causal and not, 2 heads; plus qkv-packed causal) for every
    head dim, cycling through `dtypes` and then fp32.
    Returns:
        list of dicts {"name", "max_err", "tolerance", "ok"}.
    """
    from maskdit_fast.ops.gpu_checks import check_op
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
    return [{"name": c.name, "max_err": c.max_err, "tolerance": c.tolerance, "ok": c.passed} for c in checks]


def run_checks(device="cuda"):
    """Entry point of the GPU report (maskdit_fast.bench): a quick subset of check_correctness (D=72,
    bf16, dense L=128/256 and varlen up to 1024 tokens) as (name, max_err, tolerance, passed) rows."""
    return [(c["name"], c["max_err"], c["tolerance"], c["ok"])
            for c in check_correctness(device, dtypes=(torch.bfloat16,), head_dims=(72,))]


def _implementations(device):
    """name -> fn(qkv [B, L, 3, H, D]) -> [B, L, H, D] (or an error string when it cannot run here)."""
    def triton_views(qkv):
        return attention(*qkv.unbind(2), backend="triton")

    def triton_packed(qkv):
        return attention_qkvpacked(qkv, backend="triton")

    def sdpa_flash(qkv):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        q, k, v = (x.transpose(1, 2) for x in qkv.unbind(2))
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)

    def torch_varlen(qkv):
        from torch.nn.attention.varlen import varlen_attn
        b, length = qkv.shape[:2]
        cu = torch.arange(0, (b + 1) * length, length, dtype=torch.int32, device=qkv.device)
        q, k, v = qkv.flatten(0, 1).unbind(1)
        return varlen_attn(q, k, v, cu, cu, length, length).view(b, length, *q.shape[1:])

    impls = {"triton attention(q,k,v views)": triton_views, "triton attention_qkvpacked": triton_packed}
    cuda = torch.device(device).type == "cuda"
    impls["sdpa flash"] = sdpa_flash if cuda else "needs CUDA"
    if importlib.util.find_spec("torch.nn.attention.varlen") is None:
        impls["torch varlen_attn"] = f"not in torch {torch.__version__}"
    else:
        impls["torch varlen_attn"] = torch_varlen if cuda else "needs CUDA"
    return impls


def benchmark(device="cuda", dtype=torch.bfloat16, shapes=((256, 128), (256, 256), (64, 512), (32, 1024)),
              heads=16, head_dim=72, warmup=5, reps=20, seed=0):
    """Times the attention implementations at each (B, L) in `shapes` (H=`heads`, D=`head_dim`).

    Returns:
        list of dicts {"name", "pass" ("fwd" | "fwd+bwd"), "shape", "ms" (median), "tflops"}; an
        implementation that cannot run gets "error" instead of ms/tflops.
    """
    from maskdit_fast.bench.timing import time_calls
    g = torch.Generator(device=device).manual_seed(seed)
    results = []
    for batch, length in shapes:
        qkv = torch.randn(batch, length, 3, heads, head_dim, device=device, dtype=dtype, generator=g)
        dout = torch.randn(batch, length, heads, head_dim, device=device, dtype=dtype, generator=g)
        qkv_grad = qkv.clone().requires_grad_()
        fwd_flops = 4 * batch * length * length * heads * head_dim
        shape = f"B={batch} L={length} H={heads} D={head_dim} {str(dtype)[6:]}"
        for name, fn in _implementations(device).items():
            def forward(fn=fn):
                with torch.no_grad():
                    fn(qkv)

            def forward_backward(fn=fn):
                fn(qkv_grad).backward(dout)
                qkv_grad.grad = None
            for label, call, flops in (("fwd", forward, fwd_flops), ("fwd+bwd", forward_backward, 3.5 * fwd_flops)):
                row = {"name": name, "pass": label, "shape": shape}
                if isinstance(fn, str):
                    row["error"] = fn
                else:
                    try:
                        ms = time_calls(call, device, warmup=warmup, reps=reps).median_ms
                        row.update(ms=ms, tflops=flops / ms / 1e9)
                    except (RuntimeError, ValueError) as exc:  # e.g. a back-end rejecting the shape
                        row["error"] = f"{type(exc).__name__}: {exc}"[:300]
                results.append(row)
    return results
