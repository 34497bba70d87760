"""Variable-length FlashAttention (maskdit_fast.ops.varlen_attention & co.) against a float64 reference.

On CPU the Triton kernels run under the interpreter (tests/conftest.py), with tiny shapes; on a GPU machine
the same shapes run the compiled kernels (the `device` fixture). Inputs are drawn on the CPU, then moved."""
import contextlib
import importlib
import importlib.util

import numpy as np
import pytest
import torch

from maskdit_fast import accuracy, ops
from maskdit_fast.kernels import _common, _config, flash_attn
from maskdit_fast.kernels._common import poisoned
attn_mod = importlib.import_module("maskdit_fast.ops.attention")
ref = ops.varlen_attention_ref  # explicit math per sequence; float64 by default


def cu(lengths, device="cpu"):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def run(fn, inputs, dout):
    """Calls fn on fresh leaves (NaN-poisoned kernel buffers), returns (out, lse, grads)."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    with poisoned():
        out, lse = fn(*leaves)
        out.backward(dout.to(out.dtype))
    return out.detach(), lse, [x.grad for x in leaves]


def check_close(name, got, want, lowp):
    """maskdit_fast.accuracy's rule: got within 2x the error of lowp (torch's math in got's dtype) of want."""
    err, tol = accuracy.compare(got, want, lowp)
    assert err <= tol, f"{name}: error {err:.3g} over the tolerance {tol:.3g} (2x torch's own error + 1 ulp)"


F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
# every head dim in fp32 and in a low precision; both low precisions at 72 (DiT-XL); causal alternating
CASES = [(64, F32, False), (72, F32, True), (80, F32, False), (96, F32, True), (128, F32, False),
         (64, BF16, True), (72, F16, True), (72, BF16, False), (80, F16, False), (96, F16, False),
         (128, BF16, True)]
TORCH_TOL = {F32: 1e-4, F16: 1e-2, BF16: 6e-2}  # loose: the "torch" back-end is torch's own kernels


@pytest.mark.parametrize("head_dim,dtype,causal", CASES)
def test_varlen_forward_backward_match_float64(head_dim, dtype, causal, device):
    gen = torch.Generator().manual_seed(head_dim)
    # lengths include 0 and 1, Lq != Lk (bottom-right causal, rows without keys when Lq > Lk), > 1 block
    lq = [1, 0, 3] + torch.randint(2, 40, (2,), generator=gen).tolist()
    lk = [1, 4, 0] + torch.randint(2, 40, (2,), generator=gen).tolist()
    cu_q, cu_k = cu(lq, device), cu(lk, device)
    heads, scale = 1 + causal, 0.37  # the packed and dense tests cover H = 2 too
    q = torch.randn(sum(lq), heads, head_dim, generator=gen).to(device, dtype)
    k = torch.randn(sum(lk), heads, head_dim, generator=gen).to(device, dtype)
    v = torch.randn(sum(lk), heads, head_dim, generator=gen).to(device, dtype)
    dout = torch.randn(sum(lq), heads, head_dim, generator=gen).to(device, dtype)

    def call(backend):
        return lambda q, k, v: ops.varlen_attention(q, k, v, cu_q, cu_k, max(lq), max(lk), scale, causal,
                                                    return_lse=True, backend=backend)

    want_out, want_lse, want_grads = run(lambda q, k, v: ref(q, k, v, cu_q, cu_k, scale, causal),
                                         [q.double(), k.double(), v.double()], dout)
    out, lse, grads = run(call("triton"), [q, k, v], dout)
    m_out, _, m_grads = run(lambda q, k, v: ref(q, k, v, cu_q, cu_k, scale, causal, dtype), [q, k, v],
                            dout)
    t_out, t_lse, t_grads = run(call("torch"), [q, k, v], dout)

    assert out.dtype == dtype and lse.dtype == torch.float32 and lse.shape == (heads, sum(lq))
    assert torch.equal(lse.isinf(), want_lse.isinf()) and torch.equal(t_lse.isinf(), want_lse.isinf())
    finite = want_lse.isfinite()
    assert max_err(lse[finite], want_lse[finite]) <= 1e-4
    check_close("out", out, want_out, m_out)
    for name, g, m, w in zip("qkv", grads, m_grads, want_grads):
        check_close(f"d{name}", g, w, m)
    for t, w in zip([t_out, *t_grads], [want_out, *want_grads]):  # the "torch" back-end's masks and layout
        torch.testing.assert_close(t.double(), w, atol=TORCH_TOL[dtype], rtol=TORCH_TOL[dtype])


SPLIT_BWD = {"BLOCK_M": 16, "BLOCK_N": 32, "DQ_BLOCK_M": 32, "DQ_BLOCK_N": 16, "num_warps": 4, "num_stages": 1}
FUSED_BWD = [c for c in flash_attn.TUNING["attn_bwd"] if c.get("FUSED")]
# (head dim, dtype, causal, query lengths, key lengths): one token, an odd length over a 64-query step, varlen with
# empty sequences on either side and Lq != Lk, the longest sequence the fused kernel takes (128)
BWD_CASES = [(72, F32, False, [1], [1]), (64, F32, True, [77], [77]), (72, F32, True, [5, 0, 1, 40], [9, 3, 0, 40]),
             (64, BF16, False, [0, 33, 2], [17, 0, 6]), (72, BF16, True, [128, 3], [128, 3])]


def _backward_kernels(fn):
    """Names of the kernels launched while fn() runs (still launched)."""
    names, real = [], _common.launch

    def spy(kernel, *args, **meta):
        names.append(kernel.__name__)
        return real(kernel, *args, **meta)
    _common.launch = spy
    try:
        fn()
    finally:
        _common.launch = real
    return names


@pytest.mark.parametrize("config", [None, SPLIT_BWD, *FUSED_BWD],
                         ids=["default", "split", *[f"fused{i}" for i in range(len(FUSED_BWD))]])
@pytest.mark.parametrize("head_dim,dtype,causal,lq,lk", BWD_CASES)
def test_backward_fused_and_split_match_float64(head_dim, dtype, causal, lq, lk, config, device):
    """The fused backward (the default up to 128 tokens, every fused TUNING candidate) and the split one on the
    same inputs, against the float64 reference, into NaN-poisoned gradients; the fused kernel is deterministic."""
    gen = torch.Generator().manual_seed(head_dim + sum(lq))
    cu_q, cu_k = cu(lq, device), cu(lk, device)
    heads, scale = 2, 0.29
    q = torch.randn(sum(lq), heads, head_dim, generator=gen).to(device, dtype)
    k, v = (torch.randn(sum(lk), heads, head_dim, generator=gen).to(device, dtype) for _ in range(2))
    dout = torch.randn(sum(lq), heads, head_dim, generator=gen).to(device, dtype)

    def triton_call(q, k, v):
        return ops.varlen_attention(q, k, v, cu_q, cu_k, max(lq), max(lk), scale, causal, return_lse=True,
                                    backend="triton")
    want_out, _, want_grads = run(lambda q, k, v: ref(q, k, v, cu_q, cu_k, scale, causal),
                                  [q.double(), k.double(), v.double()], dout)
    _, _, m_grads = run(lambda q, k, v: ref(q, k, v, cu_q, cu_k, scale, causal, dtype), [q, k, v], dout)
    with _config.override("attn_bwd", config) if config else contextlib.nullcontext():
        launched = _backward_kernels(lambda: run(triton_call, [q, k, v], dout))
        _, _, grads = run(triton_call, [q, k, v], dout)
        _, _, again = run(triton_call, [q, k, v], dout)
    # the default is what the launcher picks: its own default (fused up to 128 tokens, test below) or, on a GPU,
    # a committed sweep winner, which may be split
    fused = (config is not SPLIT_BWD if config else
             bool(flash_attn._config("attn_bwd", head_dim, max(max(lq), max(lk)), dtype, q.device).get("FUSED")))
    assert ("_bwd_fused_kernel" in launched) == fused and ("_bwd_dq_kernel" in launched) != fused, launched
    for name, g, m, w, g2 in zip("qkv", grads, m_grads, want_grads, again):
        if max(lk) == 1 and name != "v":
            # one key per row: P = 1, so dS = dP - rowsum(dO * O) and dQ, dK are 0 exactly (torch's autograd of
            # softmax gets exact zeros); the kernels' two D-term sums round differently, by at most 2 D eps |dO||V|
            bound = 2 * head_dim * torch.finfo(dtype).eps * dout.abs().max() * v.abs().max()
            assert max_err(g, w) <= bound * scale * (k if name == "q" else q).abs().max().item(), name
        else:
            check_close(f"d{name}", g, w, m)
        assert torch.equal(g, g2), f"d{name} differs between two identical calls"


def test_fused_backward_gives_way_past_128_tokens(device):
    """A fused configuration asked for at a longer shape (the sweep times every candidate at every shape) runs the
    split backward; the default switches at 128 tokens."""
    q = torch.randn(129, 1, 64).to(device).requires_grad_()
    c = cu([129], device)
    with _config.override("attn_bwd", FUSED_BWD[0]):
        launched = _backward_kernels(
            lambda: ops.varlen_attention(q, q, q, c, c, 129, 129, backend="triton").sum().backward())
    assert "_bwd_fused_kernel" not in launched and "_bwd_dq_kernel" in launched
    assert flash_attn._default("attn_bwd", 72, 128, False).get("FUSED")
    assert not flash_attn._default("attn_bwd", 72, 256, False).get("FUSED")


@pytest.mark.parametrize("causal", [False, True])
def test_qkvpacked_matches_unpacked(causal, device):
    gen = torch.Generator().manual_seed(1)
    lengths = [17, 0, 1, 33]
    cu_s, heads, head_dim = cu(lengths, device), 2, 72
    # the qkv Linear output [total, 3 * H * D] viewed as [total, 3, H, D]
    qkv = torch.randn(sum(lengths), 3 * heads * head_dim, generator=gen).to(device).view(-1, 3, heads, head_dim)
    dout = torch.randn(sum(lengths), heads, head_dim, generator=gen).to(device)
    out, lse, (dqkv,) = run(lambda x: ops.varlen_attention_qkvpacked(x, cu_s, max(lengths), causal=causal,
                                                                     return_lse=True, backend="triton"),
                            [qkv], dout)
    want_out, want_lse, (want_dqkv,) = run(
        lambda x: ref(x[:, 0], x[:, 1], x[:, 2], cu_s, cu_s, head_dim ** -0.5, causal), [qkv], dout)
    assert max_err(out, want_out) <= 1e-5 and max_err(dqkv, want_dqkv) <= 1e-4
    assert dqkv.shape == qkv.shape and torch.equal(lse.isinf(), want_lse.isinf())


def test_dense_attention_from_qkv_views(device):
    gen = torch.Generator().manual_seed(2)
    batch, length, heads, head_dim = 2, 19, 2, 80
    qkv = torch.randn(batch, length, 3 * heads * head_dim, generator=gen).to(device).view(batch, length, 3, heads,
                                                                                         head_dim)

    def grads(fn):
        x = qkv.clone().requires_grad_()
        with poisoned():
            out = fn(x)
            out.float().pow(2).sum().backward()
        return out.detach(), x.grad

    want = grads(lambda x: ops.attention_ref(*x.double().unbind(2)))
    for fn in (lambda x: ops.attention(*x.unbind(2), backend="triton"),  # strided views, read in place
               lambda x: ops.attention_qkvpacked(x, backend="triton"),
               lambda x: ops.attention(*x.unbind(2), backend="torch")):
        got = grads(fn)
        assert max_err(got[0], want[0]) <= 1e-5 and max_err(got[1], want[1]) <= 1e-4


def test_dense_attention_without_queries_has_zero_key_grads(device):
    """Lq = 0 with keys present: out is empty and dK, dV are zeros (written, not left as allocated)."""
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(2, 0, 2, 64, generator=gen).to(device).requires_grad_()
    k, v = (torch.randn(2, 7, 2, 64, generator=gen).to(device).requires_grad_() for _ in range(2))
    with poisoned():
        out = ops.attention(q, k, v, backend="triton")
        out.sum().backward()
    assert out.shape == (2, 0, 2, 64) and q.grad.shape == q.shape
    assert torch.equal(k.grad, torch.zeros_like(k)) and torch.equal(v.grad, torch.zeros_like(v))


def test_dense_cross_attention_and_scale(device):
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 9, 1, 64, generator=gen, dtype=torch.float16).to(device)
    k, v = (torch.randn(2, 21, 1, 64, generator=gen, dtype=torch.float16).to(device) for _ in range(2))
    want = ops.attention_ref(q.double(), k.double(), v.double(), 0.2)
    got = ops.attention(q, k, v, 0.2, backend="triton")
    assert got.shape == q.shape and max_err(got, want) <= 2e-3


def test_expanded_grad_and_empty_batch(device):
    q = torch.randn(5, 1, 64).to(device).requires_grad_()
    c5 = cu([5], device)
    out = ops.varlen_attention(q, q, q, c5, c5, 5, 5, backend="triton")
    out.sum().backward()  # dout is an expanded (stride 0) tensor
    q2 = q.detach().double().requires_grad_()
    ref(q2, q2, q2, c5, c5, 64 ** -0.5, False)[0].sum().backward()
    assert max_err(q.grad, q2.grad) <= 1e-4
    empty, c0 = torch.zeros(0, 2, 64, device=device), cu([0, 0], device)
    assert ops.varlen_attention(empty, empty, empty, c0, c0, 0, 0, backend="triton").shape == (0, 2, 64)


def test_opcheck(device):
    gen = torch.Generator().manual_seed(4)
    cu_q, cu_k = cu([3, 0, 5], device), cu([5, 2, 4], device)
    q = torch.randn(8, 2, 72, generator=gen).to(device).requires_grad_()
    k, v = (torch.randn(11, 2, 72, generator=gen).to(device).requires_grad_() for _ in range(2))
    out, lse = attn_mod._varlen_fwd_op(q, k, v, cu_q, cu_k, 5, 5, 0.3, True)
    torch.library.opcheck(attn_mod._varlen_fwd_op, (q, k, v, cu_q, cu_k, 5, 5, 0.3, True))
    torch.library.opcheck(attn_mod._varlen_bwd_op, (torch.randn_like(out), q.detach(), k.detach(), v.detach(),
                                                    out.detach(), lse, cu_q, cu_k, 5, 5, 0.3, True))
    qkv = torch.randn(8, 3, 2, 64, generator=gen).to(device).requires_grad_()
    torch.library.opcheck(attn_mod._packed_fwd_op, (qkv, cu_q, 5, 0.125, False))


def test_torch_compile_fullgraph_and_checkpointing_match_torch_backend(device):
    """The dense, packed and varlen Triton attention under torch.compile(fullgraph=True) and under activation
    checkpointing give the gradients of the "torch" back-end in eager mode (fp32, the dense Functions' flattening
    and views included)."""
    gen = torch.Generator().manual_seed(12)
    B, L, H, D = 2, 5, 2, 72
    qkv = torch.randn(B, L, 3, H, D, generator=gen).to(device).requires_grad_()
    cu_l = cu([3, 0, 7], device)
    packed = torch.randn(10, 3, H, D, generator=gen).to(device).requires_grad_()
    w = torch.randn(B, L, H, D, generator=gen).to(device)

    def block(qkv, packed, backend="triton"):
        q, k, v = qkv.unbind(2)
        dense = ops.attention(q, k, v, backend=backend) + 2 * ops.attention_qkvpacked(qkv, backend=backend)
        varlen = ops.varlen_attention_qkvpacked(packed, cu_l, 7, backend=backend, validate=False)
        return (dense * w).sum() + varlen.square().sum()

    def checkpointed(qkv, packed):
        return torch.utils.checkpoint.checkpoint(block, qkv, packed, use_reentrant=False)

    want = torch.autograd.grad(block(qkv, packed, "torch"), [qkv, packed])
    for fn in (torch.compile(block, backend="aot_eager", fullgraph=True), checkpointed):
        got = torch.autograd.grad(fn(qkv, packed), [qkv, packed])
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_flop_counter_sees_attention(device):
    from torch.utils.flop_counter import FlopCounterMode
    lq, lk, heads, head_dim = [3, 0, 7], [2, 5, 9], 2, 64
    q = torch.randn(sum(lq), heads, head_dim).to(device).requires_grad_()
    k, v = (torch.randn(sum(lk), heads, head_dim).to(device) for _ in range(2))
    cu_q, cu_k = cu(lq, device), cu(lk, device)
    with FlopCounterMode(display=False) as counter:
        ops.varlen_attention(q, k, v, cu_q, cu_k, 7, 9, backend="triton").sum().backward()
    pairs = sum(a * b for a, b in zip(lq, lk))
    assert counter.get_total_flops() == 4 * pairs * heads * head_dim * 3.5  # forward + 2.5x backward


def test_bad_inputs_raise_clear_errors(device):
    """Inputs on `device`: on a GPU, a CPU tensor would fail the device check before the one under test."""
    q = torch.randn(6, 2, 64).to(device)
    good = cu([2, 4], device)

    def int32(values):
        return torch.tensor(values, dtype=torch.int32, device=device)

    def randn(*shape):
        return torch.randn(*shape).to(device)

    def call(q=q, k=q, v=q, cu_q=good, cu_k=good, max_q=4, backend="triton"):
        return ops.varlen_attention(q, k, v, cu_q, cu_k, max_q, 4, backend=backend)

    with pytest.raises(TypeError, match="int32"):
        call(cu_q=good.long())
    with pytest.raises(ValueError, match="non-decreasing"):
        call(cu_q=int32([0, 5, 4, 6]), max_q=8)
    with pytest.raises(ValueError, match="must equal the number of tokens"):
        call(cu_q=int32([0, 2, 5]))
    with pytest.raises(ValueError, match=r"\[0\] must be 0"):
        call(cu_q=int32([1, 2, 6]))
    with pytest.raises(ValueError, match="below the longest"):
        call(max_q=3)
    with pytest.raises(ValueError, match="shape mismatch"):
        call(k=randn(6, 2, 72), v=randn(6, 2, 72))
    with pytest.raises(TypeError, match="dtypes differ"):
        call(k=q.half(), v=q.half())
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        call(q=q.double(), k=q.double(), v=q.double())
    with pytest.raises(ValueError, match="devices differ"):
        call(k=q.to("meta"), v=q.to("meta"))
    with pytest.raises(ValueError, match="head_dim"):
        call(q=randn(6, 2, 36), k=randn(6, 2, 36), v=randn(6, 2, 36))
    with pytest.raises(ValueError, match="head_dim"):
        ops.attention(*randn(3, 1, 4, 1, 160).unbind(0), backend="triton")
    with pytest.raises(ValueError, match="unknown attention backend"):
        call(backend="nope")
    for name in ("flash_attn", "xformers"):
        if importlib.util.find_spec(name) is None:
            with pytest.raises(RuntimeError, match="not installed"):
                call(backend=name)
    assert attn_mod.resolve_attention_backend("cuda", "cpu") == "torch"  # no CUDA-extension attention


def test_cu_seqlens_check_reruns_after_in_place_change():
    q = torch.randn(6, 1, 64)
    c = cu([2, 4])
    ops.varlen_attention(q, q, q, c, c, 4, 4, backend="torch")
    c[1] = 7  # same tensor object, now invalid
    with pytest.raises(ValueError, match="non-decreasing"):
        ops.varlen_attention(q, q, q, c, c, 7, 7, backend="torch")


def test_validate_false_skips_the_cu_seqlens_value_check(monkeypatch):
    """validate=False (the model's own cu_seqlens) skips the value check, its one device sync; the
    structural checks still run."""
    q, c = torch.randn(6, 1, 64), cu([2, 4])
    value_checks = []
    monkeypatch.setattr(attn_mod, "_check_cu_seqlens_values", lambda *args: value_checks.append(args[1]))
    ops.varlen_attention_qkvpacked(torch.stack([q, q, q], 1), c, 4, backend="torch", validate=False)
    assert value_checks == []
    ops.varlen_attention_qkvpacked(torch.stack([q, q, q], 1), c, 4, backend="torch")
    assert value_checks and all(name.startswith("cu_seqlens") for name in value_checks)
    with pytest.raises(TypeError, match="int32"):
        ops.varlen_attention(q, q, q, c.long(), c.long(), 4, 4, backend="torch", validate=False)


def test_cu_seqlens_changed_without_a_version_bump_is_checked_again():
    """Writes through .data or a numpy view do not bump a tensor's version: a verdict cached by (id, version)
    would pass stale values; every validated call checks the values it gets."""
    q = torch.randn(6, 1, 64)
    qkv = torch.stack([q, q, q], 1)
    array = np.array([0, 2, 6], dtype=np.int32)
    c = torch.from_numpy(array)
    ops.varlen_attention_qkvpacked(qkv, c, 4, backend="torch")
    array[1] = 7  # lengths 7 and -1
    with pytest.raises(ValueError, match="non-decreasing"):
        ops.varlen_attention_qkvpacked(qkv, c, 7, backend="torch")
    c.data[1] = 1  # lengths 1 and 5: max_seqlen 4 too small
    with pytest.raises(ValueError, match="max_seqlen 4"):
        ops.varlen_attention_qkvpacked(qkv, c, 4, backend="torch")


@pytest.mark.gpu
@pytest.mark.parametrize("tf32", [False, True])
def test_gpu_fp32_head_dim_128_long_sequences(tf32, monkeypatch):
    """fp32 at D=128 over > 64 tokens takes the largest forward tiles (3 pipeline stages would need more
    shared memory than an H100 has). The kernels keep full fp32 precision whether or not torch allows
    TF32 (TF32 dots missed the 2x rule in dK on an H200): the error scale is torch's plain fp32."""
    gen = torch.Generator().manual_seed(0)
    lengths = [300, 1, 257]
    cu_s = cu(lengths, "cuda")
    q, k, v, dout = (torch.randn(sum(lengths), 2, 128, generator=gen).cuda() for _ in range(4))
    want_out, _, want_grads = run(lambda q, k, v: ref(q, k, v, cu_s, cu_s, 0.1, True), [q.double(), k.double(),
                                                                                          v.double()], dout)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", tf32)
    out, _, grads = run(lambda q, k, v: ops.varlen_attention(q, k, v, cu_s, cu_s, 300, 300, 0.1, True,
                                                             return_lse=True, backend="triton"), [q, k, v], dout)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    m_out, _, m_grads = run(lambda q, k, v: ref(q, k, v, cu_s, cu_s, 0.1, True, torch.float32), [q, k, v], dout)
    for name, g, m, w in zip(["out", "dq", "dk", "dv"], [out, *grads], [m_out, *m_grads], [want_out, *want_grads]):
        check_close(name, g, w, m)
