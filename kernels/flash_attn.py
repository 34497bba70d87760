"""Variable-length FlashAttention-2 forward and backward in Triton.

Layout (flash-attn's varlen layout): q [total_q, H, D], k, v [total_k, H, D] with any token/head
strides and unit stride on D (so the slices of a packed qkv [total, 3, H, D] need no copy); sequence b
owns tokens cu_seqlens[b]:cu_seqlens[b+1] (int32, [B+1]). Output [total_q, H, D] in q's dtype and
lse [H, total_q] float32 (natural log). A query row that sees no key (empty key sequence, or causal with
Lq > Lk) gets output 0 and lse +inf, as in flash-attn.

Causal masking is aligned to the bottom-right corner (flash-attn >= 2.1): query i of a sequence attends
key j iff j <= i + Lk - Lq.

Kernels: forward with the online softmax (log2 domain, deferred normalisation); backward recomputes P
from the saved lse. Split backward: a delta = rowsum(dO * O) kernel, one kernel per key block for dK/dV
(iterating over query blocks) and one per query block for dQ (iterating over key blocks), so there are no
atomics; grids (blocks of max_seqlen, H, B), max_seqlen and the lengths runtime values (no recompiles for
new lengths). Loops first run the key/query blocks that need no mask, then the few boundary blocks.
Fused backward (sequences up to FUSED_MAX_LEN tokens, the config key FUSED): one program per (head,
sequence) holds all keys (a key tile of the power of two >= max_seqlen_k, the same bucket the configuration
key rounds to) and loops over query blocks, computing delta itself and writing each block's complete dQ:
5 GEMMs per block instead of the split kernels' 7, one launch, no atomics (deterministic).

Dense layout (`DENSE`): B sequences of equal lengths Lq, Lk back to back, no cu_seqlens (the model's dense
attention, with no index tensors to build per call).

Head dim: tl.arange needs powers of two, and tl.dot needs K, N >= 16, so D is split into two power-of-two chunks
D = DA + DB' with DA the largest power of two <= D and DB' >= 16 the next power of two >= D - DA. Every dot runs
once per chunk and costs (DA + DB') / D: 72 -> 64 + 16 = 80 (1.11x, against 128/72 = 1.78x for padding to the
next power of two); 64, 80 (64 + 16), 96 (64 + 32) and 128 are exact.

A D short of DA + DB' (72: columns 72..79 of the second chunk) runs on the tensors as they are, without copies and
without column masks: column-masked chunks (masked loads feeding tl.dot) compiled wrongly with triton 3.6 on an
H200 (wrong output columns 64..71, out-of-bounds shared-memory reads; 2026-11-26). Instead the second chunk's
column offsets wrap around its D - DA real columns (72: 64..71, 64..71), so every load is an unmasked in-bounds
read and each extra tile column repeats a real one. In each product one operand has its extra columns zeroed in
registers (tl.where on the loaded tile, once per program: Q in the forward and dQ kernels, K and V in the dK/dV
kernel), so QK^T, dO V^T and the other reductions over D see exact zeros there; the products that produce a
[rows, D] result (O, dQ, dK, dV) get, in each extra column, the value of the real column it repeats, computed
from the same operand columns, and storing the chunk at the wrapped offsets writes that same value to that
column again: no column past D is read or written, and the kernels keep the row-masked loads and stores of the
exact head dims, the only masks left. `benchmarks/compile_sm90.py`
compiles every configuration offline for sm_90 (registers, spills, shared memory: benchmarks/results/).
"""
import functools

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from maskdit_fast.kernels import _common
from maskdit_fast.kernels._config import shape_key, tuned

LOG2E = 1.4426950408889634
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 128


def split_head_dim(head_dim):
    """(DA, DB): the two power-of-two chunks the kernels use for `head_dim` (DB = 0: no second chunk)."""
    da = 1 << (head_dim.bit_length() - 1)
    rest = head_dim - da
    return da, (0 if rest == 0 else max(16, _common.next_power_of_2(rest)))


def head_dim_supported(head_dim):
    """The kernels take D % 8 == 0 with 16 <= D <= 128."""
    return head_dim % 8 == 0 and MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM


@triton.jit
def _load_rows(
    base,                     # pointer to row 0, column 0 of the tile's sequence/head (q, k, v or dO)
    offs_row,                 # [rows] int: row (token) offsets within the sequence
    stride_row,               # element stride between rows (tokens)
    offs_d,                   # [chunk] int: columns of this chunk (unit stride on D)
    row_mask,                 # [rows] bool: rows inside the sequence (used only when MASK_ROWS)
    MASK_ROWS: tl.constexpr,  # mask rows with row_mask (False: every row is in range)
    UPCAST: tl.constexpr,     # load as fp32 (bf16 under the interpreter)
):
    """Loads a [rows, chunk] tile; masked rows read as 0."""
    ptrs = base + offs_row[:, None] * stride_row + offs_d[None, :]
    if MASK_ROWS:
        x = tl.load(ptrs, mask=row_mask[:, None], other=0.0)
    else:
        x = tl.load(ptrs)
    if UPCAST:  # the interpreter's bf16 tl.dot is wrong: compute in fp32 there
        x = x.to(tl.float32)
    return x


@triton.jit
def _seq_bounds(
    CU,                    # [B+1] int32 cu_seqlens (not read when DENSE)
    b,                     # sequence index
    dense_len,             # every sequence's length (DENSE)
    DENSE: tl.constexpr,   # B sequences of dense_len tokens back to back
):
    if DENSE:
        start = b * dense_len
        length = dense_len + 0 * b
    else:
        start = tl.load(CU + b)
        length = tl.load(CU + b + 1) - start
    return start, length


@triton.jit
def _second_chunk(
    DA: tl.constexpr,        # first (power-of-two) D chunk
    DB: tl.constexpr,        # second D chunk (0: none)
    HEAD_DIM: tl.constexpr,  # real head dim D
):
    """Columns of the second D chunk: DA..DA+DB-1, or when DA + DB > D the D - DA real ones repeated
    (DA + j % (D - DA): runs of D - DA >= 8 consecutive columns, so the loads stay vectorized; see the module
    docstring)."""
    cols = DA + tl.arange(0, 16 if DB == 0 else DB)
    if DA + DB > HEAD_DIM:
        # D % 8 == 0: runs of 8 consecutive columns, each starting at a multiple of 8 (what the compiler cannot
        # see through the remainder, and needs to keep the loads and stores vectorized)
        cols = tl.max_contiguous(tl.multiple_of(DA + (cols - DA) % (HEAD_DIM - DA), 8), 8)
    return cols


@triton.jit
def _zero_past_head_dim(
    x,                       # [rows, DB] tile of the second D chunk
    DA: tl.constexpr,        # first (power-of-two) D chunk
    DB: tl.constexpr,        # second D chunk
    HEAD_DIM: tl.constexpr,  # real head dim D
):
    """x with its columns past D (repeats of real columns, see _second_chunk) set to 0."""
    if DA + DB > HEAD_DIM:
        x = tl.where((DA + tl.arange(0, DB) < HEAD_DIM)[None, :], x, 0.0)
    return x


# ------------------------------------------------------------------------------------------------ forward
@triton.jit
def _fwd_kv_block(
    acc_a, acc_b,             # [BLOCK_M, DA], [BLOCK_M, DB or 16] fp32 unnormalised output, per D chunk
    l_i, m_i,                 # [BLOCK_M] fp32 running softmax sum and max (log2 domain)
    qa, qb,                   # [BLOCK_M, DA], [BLOCK_M, DB] query tile, per D chunk (qb = qa when DB == 0)
    k_base, v_base,           # pointers to this sequence/head's first key / value row
    stride_kt, stride_vt,     # element strides between key / value tokens
    start_n,                  # first key of this block (within the sequence)
    k_len,                    # keys in the sequence
    offs_m,                   # [BLOCK_M] int: query rows of the tile (within the sequence)
    shift,                    # k_len - q_len: causal diagonal offset (bottom-right aligned)
    qk_scale,                 # softmax_scale * log2(e)
    offs_n,                   # [BLOCK_N] int: 0..BLOCK_N-1
    offs_da, offs_db,         # [DA], [DB or 16] int: columns of the two D chunks
    MASK: tl.constexpr,       # block needs masking (past k_len, or on the causal diagonal)
    CAUSAL: tl.constexpr,     # apply the causal mask
    DA: tl.constexpr,         # first (power-of-two) D chunk
    DB: tl.constexpr,         # second D chunk (0: none)
    UPCAST: tl.constexpr,     # compute the dots in fp32 (interpreter bf16)
    PRECISION: tl.constexpr,  # tl.dot input_precision ("tf32" or "ieee")
):
    offs_k = start_n + offs_n
    k_mask = offs_k < k_len
    ka = _load_rows(k_base, offs_k, stride_kt, offs_da, k_mask, MASK, UPCAST)
    s = tl.dot(qa, tl.trans(ka), input_precision=PRECISION)
    if DB > 0:
        kb = _load_rows(k_base, offs_k, stride_kt, offs_db, k_mask, MASK, UPCAST)
        s += tl.dot(qb, tl.trans(kb), input_precision=PRECISION)
    s = s * qk_scale
    if MASK:
        valid = k_mask[None, :]
        if CAUSAL:
            valid = valid & (offs_k[None, :] <= offs_m[:, None] + shift)
        s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_shift = m_new
    if MASK:  # a row with no valid key so far keeps m = -inf: shift it by 0 instead (no inf - inf NaN)
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_shift[:, None])
    alpha = tl.exp2(m_i - m_shift)
    l_i = l_i * alpha + tl.sum(p, 1)
    va = _load_rows(v_base, offs_k, stride_vt, offs_da, k_mask, MASK, UPCAST)
    acc_a = tl.dot(p.to(va.dtype), va, acc_a * alpha[:, None], input_precision=PRECISION)
    if DB > 0:
        vb = _load_rows(v_base, offs_k, stride_vt, offs_db, k_mask, MASK, UPCAST)
        acc_b = tl.dot(p.to(vb.dtype), vb, acc_b * alpha[:, None], input_precision=PRECISION)
    return acc_a, acc_b, l_i, m_new


@triton.jit
def _causal_ranges(
    m0,                     # first query row of the block
    k_len,                  # keys in the sequence
    shift,                  # k_len - q_len (causal diagonal offset)
    BLOCK_M: tl.constexpr,  # query rows per block
    BLOCK_N: tl.constexpr,  # keys per block
    CAUSAL: tl.constexpr,   # causal masking
):
    """For query rows [m0, m0 + BLOCK_M): key blocks [0, n_full) need no mask, [n_full, hi) do."""
    n_full = k_len // BLOCK_N * BLOCK_N
    hi = k_len
    if CAUSAL:
        # every row of the block sees keys j <= m0 + shift; the last row sees j <= m0 + BLOCK_M - 1 + shift
        n_full = tl.minimum(n_full, tl.maximum(m0 + shift + 1, 0) // BLOCK_N * BLOCK_N)
        hi = tl.minimum(hi, tl.maximum(m0 + BLOCK_M + shift, 0))
    return n_full, hi


@triton.jit
def _fwd_kernel(
    Q,                        # [total_q, H, D] queries (unit stride on D)
    K, V,                     # [total_k, H, D] keys / values (unit stride on D)
    O,                        # [total_q, H, D] output, q's dtype
    LSE,                      # [H, total_q] fp32 output: natural-log softmax normaliser (+inf: no key)
    CU_Q, CU_K,               # [B+1] int32 cu_seqlens of queries / keys
    stride_qt, stride_qh,     # strides (in 8-element units) of Q (token, head)
    stride_kt, stride_kh,     # strides (in 8-element units) of K
    stride_vt, stride_vh,     # strides (in 8-element units) of V
    stride_ot, stride_oh,     # strides (in 8-element units) of O
    stride_lse_h,             # element stride of LSE's head axis
    qk_scale,                 # softmax_scale * log2(e)
    dense_q, dense_k,         # sequence lengths (DENSE)
    CAUSAL: tl.constexpr,     # causal mask, bottom-right aligned
    DENSE: tl.constexpr,      # dense layout: no cu_seqlens
    HEAD_DIM: tl.constexpr,   # real head dim D
    DA: tl.constexpr,         # first (power-of-two) D chunk
    DB: tl.constexpr,         # second D chunk (0: none)
    BLOCK_M: tl.constexpr,    # query rows per program
    BLOCK_N: tl.constexpr,    # keys per loop iteration
    UPCAST: tl.constexpr,     # compute the dots in fp32 (interpreter bf16)
    PRECISION: tl.constexpr,  # tl.dot input_precision ("tf32" or "ieee")
):
    # strides come in units of 8 elements: every row starts 16-byte aligned as the compiler can see, so the tiles
    # load and store vectorized whatever D % 16 is (D = 72 included)
    stride_qt, stride_qh, stride_kt, stride_kh = stride_qt * 8, stride_qh * 8, stride_kt * 8, stride_kh * 8
    stride_vt, stride_vh, stride_ot, stride_oh = stride_vt * 8, stride_vh * 8, stride_ot * 8, stride_oh * 8
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_start, q_len = _seq_bounds(CU_Q, b, dense_q, DENSE)
    m0 = pid_m * BLOCK_M
    if m0 >= q_len:
        return
    k_start, k_len = _seq_bounds(CU_K, b, dense_k, DENSE)
    shift = k_len - q_len
    # int64 sequence offsets: total_tokens * token_stride may exceed 2**31
    q_base = Q + q_start.to(tl.int64) * stride_qt + h * stride_qh
    k_base = K + k_start.to(tl.int64) * stride_kt + h * stride_kh
    v_base = V + k_start.to(tl.int64) * stride_vt + h * stride_vh
    o_base = O + q_start.to(tl.int64) * stride_ot + h * stride_oh

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_da = tl.arange(0, DA)
    offs_db = _second_chunk(DA, DB, HEAD_DIM)
    m_mask = offs_m < q_len
    qa = _load_rows(q_base, offs_m, stride_qt, offs_da, m_mask, True, UPCAST)
    qb = qa
    if DB > 0:  # zeroed past D: S = Q K^T sees no repeated column
        qb = _zero_past_head_dim(_load_rows(q_base, offs_m, stride_qt, offs_db, m_mask, True, UPCAST), DA, DB, HEAD_DIM)
    acc_a = tl.zeros([BLOCK_M, DA], tl.float32)
    acc_b = tl.zeros([BLOCK_M, 16 if DB == 0 else DB], tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)

    n_full, hi = _causal_ranges(m0, k_len, shift, BLOCK_M, BLOCK_N, CAUSAL)
    for start_n in range(0, n_full, BLOCK_N):
        acc_a, acc_b, l_i, m_i = _fwd_kv_block(
            acc_a, acc_b, l_i, m_i, qa, qb, k_base, v_base, stride_kt, stride_vt, start_n, k_len, offs_m, shift,
            qk_scale, offs_n, offs_da, offs_db, False, CAUSAL, DA, DB, UPCAST, PRECISION)
    for start_n in range(n_full, hi, BLOCK_N):
        acc_a, acc_b, l_i, m_i = _fwd_kv_block(
            acc_a, acc_b, l_i, m_i, qa, qb, k_base, v_base, stride_kt, stride_vt, start_n, k_len, offs_m, shift,
            qk_scale, offs_n, offs_da, offs_db, True, CAUSAL, DA, DB, UPCAST, PRECISION)

    empty = l_i == 0.0  # row saw no key: output 0, lse +inf
    inv_l = 1.0 / tl.where(empty, 1.0, l_i)
    lse = tl.where(empty, float("inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) / 1.4426950408889634)
    tl.store(LSE + h.to(tl.int64) * stride_lse_h + q_start + offs_m, lse, mask=m_mask)
    o_ptrs = o_base + offs_m[:, None] * stride_ot
    tl.store(o_ptrs + offs_da[None, :], (acc_a * inv_l[:, None]).to(O.dtype.element_ty), mask=m_mask[:, None])
    if DB > 0:
        tl.store(o_ptrs + offs_db[None, :], (acc_b * inv_l[:, None]).to(O.dtype.element_ty),
                 mask=m_mask[:, None])


# ----------------------------------------------------------------------------------------------- backward
@triton.jit
def _bwd_delta_kernel(
    O,                          # [total_q, H, D] forward output
    DO,                         # [total_q, H, D] output gradient
    DELTA,                      # [H, total_q] fp32 output
    total_q,                    # query tokens
    stride_ot, stride_oh,       # element strides of O (token, head)
    stride_dot, stride_doh,     # element strides of DO
    stride_delta_h,             # element stride of DELTA's head axis
    HEAD_DIM: tl.constexpr,     # real head dim D
    BLOCK_T: tl.constexpr,      # tokens per program
    BLOCK_D: tl.constexpr,      # next power of two >= D
):
    """delta[h, t] = sum_d dO[t, h, d] * O[t, h, d] (fp32)."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_t[:, None] < total_q) & (offs_d[None, :] < HEAD_DIM)
    rows = offs_t.to(tl.int64)[:, None]
    o = tl.load(O + rows * stride_ot + h * stride_oh + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + rows * stride_dot + h * stride_doh + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + h.to(tl.int64) * stride_delta_h + offs_t, tl.sum(o * do, 1), mask=offs_t < total_q)


@triton.jit
def _dkdv_q_block(
    dk_a, dk_b, dv_a, dv_b,   # [BLOCK_N, DA] / [BLOCK_N, DB or 16] fp32 dK, dV accumulators, per D chunk
    ka, kb, va, vb,           # [BLOCK_N, DA] / [BLOCK_N, DB] key / value tile, per D chunk
    q_base, do_base,          # pointers to this sequence/head's first query / dO row
    lse_base, delta_base,     # pointers to this sequence/head's first lse / delta entry (fp32)
    stride_qt, stride_dot,    # element strides between query / dO tokens
    start_m,                  # first query of this block (within the sequence)
    q_len,                    # queries in the sequence
    offs_n,                   # [BLOCK_N] int: key rows of the tile (within the sequence)
    shift,                    # k_len - q_len (causal diagonal offset)
    qk_scale,                 # softmax_scale * log2(e)
    offs_da, offs_db,         # [DA], [DB or 16] int: columns of the two D chunks
    MASK: tl.constexpr,       # apply the causal mask (block on the diagonal)
    DA: tl.constexpr,         # first (power-of-two) D chunk
    DB: tl.constexpr,         # second D chunk (0: none)
    BLOCK_M: tl.constexpr,    # queries per loop iteration
    UPCAST: tl.constexpr,     # compute the dots in fp32 (interpreter bf16)
    PRECISION: tl.constexpr,  # tl.dot input_precision ("tf32" or "ieee")
):
    offs_m = start_m + tl.arange(0, BLOCK_M)
    m_mask = offs_m < q_len
    # rows past the sequence read lse = +inf, so their P (and dS) are exactly 0
    lse2 = tl.load(lse_base + offs_m, mask=m_mask, other=float("inf")) * 1.4426950408889634
    delta = tl.load(delta_base + offs_m, mask=m_mask, other=0.0)
    qa = _load_rows(q_base, offs_m, stride_qt, offs_da, m_mask, True, UPCAST)
    doa = _load_rows(do_base, offs_m, stride_dot, offs_da, m_mask, True, UPCAST)
    s_t = tl.dot(ka, tl.trans(qa), input_precision=PRECISION)
    if DB > 0:
        qb = _load_rows(q_base, offs_m, stride_qt, offs_db, m_mask, True, UPCAST)
        dob = _load_rows(do_base, offs_m, stride_dot, offs_db, m_mask, True, UPCAST)
        s_t += tl.dot(kb, tl.trans(qb), input_precision=PRECISION)
    p_t = tl.exp2(s_t * qk_scale - lse2[None, :])
    if MASK:  # causal (bottom-right): key j is seen by query i iff j <= i + shift
        p_t = tl.where(offs_n[:, None] <= offs_m[None, :] + shift, p_t, 0.0)
    dv_a = tl.dot(p_t.to(doa.dtype), doa, dv_a, input_precision=PRECISION)
    dp_t = tl.dot(va, tl.trans(doa), input_precision=PRECISION)
    if DB > 0:
        dv_b = tl.dot(p_t.to(dob.dtype), dob, dv_b, input_precision=PRECISION)
        dp_t += tl.dot(vb, tl.trans(dob), input_precision=PRECISION)
    ds_t = (p_t * (dp_t - delta[None, :])).to(qa.dtype)
    dk_a = tl.dot(ds_t, qa, dk_a, input_precision=PRECISION)
    if DB > 0:
        dk_b = tl.dot(ds_t, qb, dk_b, input_precision=PRECISION)
    return dk_a, dk_b, dv_a, dv_b


@triton.jit
def _bwd_dkdv_kernel(
    Q,                          # [total_q, H, D] queries (unit stride on D)
    K, V,                       # [total_k, H, D] keys / values
    DO,                         # [total_q, H, D] output gradient
    LSE,                        # [H, total_q] fp32 forward lse (natural log)
    DELTA,                      # [H, total_q] fp32 rowsum(dO * O); same strides as LSE
    DK, DV,                     # [total_k, H, D] outputs, any strides with unit stride on D
    CU_Q, CU_K,                 # [B+1] int32 cu_seqlens of queries / keys
    stride_qt, stride_qh,       # strides (in 8-element units) of Q (token, head)
    stride_kt, stride_kh,       # strides (in 8-element units) of K
    stride_vt, stride_vh,       # strides (in 8-element units) of V
    stride_dot, stride_doh,     # strides (in 8-element units) of DO
    stride_dkt, stride_dkh,     # strides (in 8-element units) of DK
    stride_dvt, stride_dvh,     # strides (in 8-element units) of DV
    stride_lse_h,               # element stride of LSE's (and DELTA's) head axis
    qk_scale,                   # softmax_scale * log2(e)
    sm_scale,                   # softmax_scale (applied to dK)
    dense_q, dense_k,           # sequence lengths (DENSE)
    CAUSAL: tl.constexpr,       # causal mask, bottom-right aligned
    DENSE: tl.constexpr,        # dense layout: no cu_seqlens
    HEAD_DIM: tl.constexpr,     # real head dim D
    DA: tl.constexpr,           # first (power-of-two) D chunk
    DB: tl.constexpr,           # second D chunk (0: none)
    BLOCK_M: tl.constexpr,      # queries per loop iteration
    BLOCK_N: tl.constexpr,      # keys per program
    UPCAST: tl.constexpr,       # compute the dots in fp32 (interpreter bf16)
    PRECISION: tl.constexpr,    # tl.dot input_precision ("tf32" or "ieee")
):
    stride_qt, stride_qh, stride_kt, stride_kh = stride_qt * 8, stride_qh * 8, stride_kt * 8, stride_kh * 8
    stride_vt, stride_vh, stride_dot, stride_doh = stride_vt * 8, stride_vh * 8, stride_dot * 8, stride_doh * 8
    stride_dkt, stride_dkh, stride_dvt, stride_dvh = stride_dkt * 8, stride_dkh * 8, stride_dvt * 8, stride_dvh * 8
    pid_n = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    k_start, k_len = _seq_bounds(CU_K, b, dense_k, DENSE)
    n0 = pid_n * BLOCK_N
    if n0 >= k_len:
        return
    q_start, q_len = _seq_bounds(CU_Q, b, dense_q, DENSE)
    shift = k_len - q_len
    q_base = Q + q_start.to(tl.int64) * stride_qt + h * stride_qh
    do_base = DO + q_start.to(tl.int64) * stride_dot + h * stride_doh
    lse_base = LSE + h.to(tl.int64) * stride_lse_h + q_start
    delta_base = DELTA + h.to(tl.int64) * stride_lse_h + q_start
    k_base = K + k_start.to(tl.int64) * stride_kt + h * stride_kh
    v_base = V + k_start.to(tl.int64) * stride_vt + h * stride_vh

    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_da = tl.arange(0, DA)
    offs_db = _second_chunk(DA, DB, HEAD_DIM)
    n_mask = offs_n < k_len
    # keys past the sequence load as 0; their dK/dV rows are garbage-free of other rows and not stored
    ka = _load_rows(k_base, offs_n, stride_kt, offs_da, n_mask, True, UPCAST)
    va = _load_rows(v_base, offs_n, stride_vt, offs_da, n_mask, True, UPCAST)
    kb = ka
    vb = va
    if DB > 0:  # zeroed past D: K Q^T and V dO^T see no repeated column
        kb = _zero_past_head_dim(_load_rows(k_base, offs_n, stride_kt, offs_db, n_mask, True, UPCAST), DA, DB, HEAD_DIM)
        vb = _zero_past_head_dim(_load_rows(v_base, offs_n, stride_vt, offs_db, n_mask, True, UPCAST), DA, DB, HEAD_DIM)
    dk_a = tl.zeros([BLOCK_N, DA], tl.float32)
    dv_a = tl.zeros([BLOCK_N, DA], tl.float32)
    dk_b = tl.zeros([BLOCK_N, 16 if DB == 0 else DB], tl.float32)
    dv_b = tl.zeros([BLOCK_N, 16 if DB == 0 else DB], tl.float32)

    m_full = 0
    if CAUSAL:
        # queries i >= n0 - shift see some key of the block; i >= n0 + BLOCK_N - 1 - shift see all of them
        lo = tl.maximum(n0 - shift, 0) // BLOCK_M * BLOCK_M
        m_full = tl.maximum((tl.maximum(n0 + BLOCK_N - 1 - shift, 0) + BLOCK_M - 1) // BLOCK_M * BLOCK_M, lo)
        for start_m in range(lo, tl.minimum(m_full, q_len), BLOCK_M):
            dk_a, dk_b, dv_a, dv_b = _dkdv_q_block(
                dk_a, dk_b, dv_a, dv_b, ka, kb, va, vb, q_base, do_base, lse_base, delta_base, stride_qt,
                stride_dot, start_m, q_len, offs_n, shift, qk_scale, offs_da, offs_db,
                True, DA, DB, BLOCK_M, UPCAST, PRECISION)
    for start_m in range(m_full, q_len, BLOCK_M):
        dk_a, dk_b, dv_a, dv_b = _dkdv_q_block(
            dk_a, dk_b, dv_a, dv_b, ka, kb, va, vb, q_base, do_base, lse_base, delta_base, stride_qt,
            stride_dot, start_m, q_len, offs_n, shift, qk_scale, offs_da, offs_db,
            False, DA, DB, BLOCK_M, UPCAST, PRECISION)

    dk_ptrs = DK + k_start.to(tl.int64) * stride_dkt + h * stride_dkh + offs_n[:, None] * stride_dkt
    dv_ptrs = DV + k_start.to(tl.int64) * stride_dvt + h * stride_dvh + offs_n[:, None] * stride_dvt
    tl.store(dk_ptrs + offs_da[None, :], (dk_a * sm_scale).to(DK.dtype.element_ty), mask=n_mask[:, None])
    tl.store(dv_ptrs + offs_da[None, :], dv_a.to(DV.dtype.element_ty), mask=n_mask[:, None])
    if DB > 0:
        tl.store(dk_ptrs + offs_db[None, :], (dk_b * sm_scale).to(DK.dtype.element_ty), mask=n_mask[:, None])
        tl.store(dv_ptrs + offs_db[None, :], dv_b.to(DV.dtype.element_ty), mask=n_mask[:, None])


@triton.jit
def _dq_kv_block(
    dq_a, dq_b,               # [BLOCK_M, DA] / [BLOCK_M, DB or 16] fp32 dQ accumulators, per D chunk
    qa, qb,                   # [BLOCK_M, DA] / [BLOCK_M, DB] query tile, per D chunk
    doa, dob,                 # [BLOCK_M, DA] / [BLOCK_M, DB] dO tile, per D chunk
    lse2,                     # [BLOCK_M] fp32 lse in the log2 domain (+inf past the sequence)
    delta,                    # [BLOCK_M] fp32 rowsum(dO * O)
    k_base, v_base,           # pointers to this sequence/head's first key / value row
    stride_kt, stride_vt,     # element strides between key / value tokens
    start_n,                  # first key of this block (within the sequence)
    k_len,                    # keys in the sequence
    offs_m,                   # [BLOCK_M] int: query rows of the tile (within the sequence)
    shift,                    # k_len - q_len (causal diagonal offset)
    qk_scale,                 # softmax_scale * log2(e)
    offs_n,                   # [BLOCK_N] int: 0..BLOCK_N-1
    offs_da, offs_db,         # [DA], [DB or 16] int: columns of the two D chunks
    MASK: tl.constexpr,       # block needs masking (past k_len, or on the causal diagonal)
    CAUSAL: tl.constexpr,     # apply the causal mask
    DA: tl.constexpr,         # first (power-of-two) D chunk
    DB: tl.constexpr,         # second D chunk (0: none)
    UPCAST: tl.constexpr,     # compute the dots in fp32 (interpreter bf16)
    PRECISION: tl.constexpr,  # tl.dot input_precision ("tf32" or "ieee")
):
    offs_k = start_n + offs_n
    k_mask = offs_k < k_len
    ka = _load_rows(k_base, offs_k, stride_kt, offs_da, k_mask, MASK, UPCAST)
    va = _load_rows(v_base, offs_k, stride_vt, offs_da, k_mask, MASK, UPCAST)
    s = tl.dot(qa, tl.trans(ka), input_precision=PRECISION)
    dp = tl.dot(doa, tl.trans(va), input_precision=PRECISION)
    if DB > 0:
        kb = _load_rows(k_base, offs_k, stride_kt, offs_db, k_mask, MASK, UPCAST)
        vb = _load_rows(v_base, offs_k, stride_vt, offs_db, k_mask, MASK, UPCAST)
        s += tl.dot(qb, tl.trans(kb), input_precision=PRECISION)
        dp += tl.dot(dob, tl.trans(vb), input_precision=PRECISION)
    p = tl.exp2(s * qk_scale - lse2[:, None])
    if MASK:
        valid = k_mask[None, :]
        if CAUSAL:
            valid = valid & (offs_k[None, :] <= offs_m[:, None] + shift)
        p = tl.where(valid, p, 0.0)
    ds = (p * (dp - delta[:, None])).to(ka.dtype)
    dq_a = tl.dot(ds, ka, dq_a, input_precision=PRECISION)
    if DB > 0:
        dq_b = tl.dot(ds, kb, dq_b, input_precision=PRECISION)
    return dq_a, dq_b


@triton.jit
def _bwd_dq_kernel(
    Q,                          # [total_q, H, D] queries (unit stride on D)
    K, V,                       # [total_k, H, D] keys / values
    DO,                         # [total_q, H, D] output gradient
    LSE,                        # [H, total_q] fp32 forward lse (natural log)
    DELTA,                      # [H, total_q] fp32 rowsum(dO * O); same strides as LSE
    DQ,                         # [total_q, H, D] output, any strides with unit stride on D
    CU_Q, CU_K,                 # [B+1] int32 cu_seqlens of queries / keys
    stride_qt, stride_qh,       # strides (in 8-element units) of Q (token, head)
    stride_kt, stride_kh,       # strides (in 8-element units) of K
    stride_vt, stride_vh,       # strides (in 8-element units) of V
    stride_dot, stride_doh,     # strides (in 8-element units) of DO
    stride_dqt, stride_dqh,     # strides (in 8-element units) of DQ
    stride_lse_h,               # element stride of LSE's (and DELTA's) head axis
    qk_scale,                   # softmax_scale * log2(e)
    sm_scale,                   # softmax_scale (applied to dQ)
    dense_q, dense_k,           # sequence lengths (DENSE)
    CAUSAL: tl.constexpr,       # causal mask, bottom-right aligned
    DENSE: tl.constexpr,        # dense layout: no cu_seqlens
    HEAD_DIM: tl.constexpr,     # real head dim D
    DA: tl.constexpr,           # first (power-of-two) D chunk
    DB: tl.constexpr,           # second D chunk (0: none)
    BLOCK_M: tl.constexpr,      # query rows per program
    BLOCK_N: tl.constexpr,      # keys per loop iteration
    UPCAST: tl.constexpr,       # compute the dots in fp32 (interpreter bf16)
    PRECISION: tl.constexpr,    # tl.dot input_precision ("tf32" or "ieee")
):
    stride_qt, stride_qh, stride_kt, stride_kh = stride_qt * 8, stride_qh * 8, stride_kt * 8, stride_kh * 8
    stride_vt, stride_vh, stride_dot, stride_doh = stride_vt * 8, stride_vh * 8, stride_dot * 8, stride_doh * 8
    stride_dqt, stride_dqh = stride_dqt * 8, stride_dqh * 8
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_start, q_len = _seq_bounds(CU_Q, b, dense_q, DENSE)
    m0 = pid_m * BLOCK_M
    if m0 >= q_len:
        return
    k_start, k_len = _seq_bounds(CU_K, b, dense_k, DENSE)
    shift = k_len - q_len
    q_base = Q + q_start.to(tl.int64) * stride_qt + h * stride_qh
    do_base = DO + q_start.to(tl.int64) * stride_dot + h * stride_doh
    k_base = K + k_start.to(tl.int64) * stride_kt + h * stride_kh
    v_base = V + k_start.to(tl.int64) * stride_vt + h * stride_vh

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_da = tl.arange(0, DA)
    offs_db = _second_chunk(DA, DB, HEAD_DIM)
    m_mask = offs_m < q_len
    lse2 = tl.load(LSE + h.to(tl.int64) * stride_lse_h + q_start + offs_m, mask=m_mask, other=float("inf"))
    lse2 = lse2 * 1.4426950408889634
    delta = tl.load(DELTA + h.to(tl.int64) * stride_lse_h + q_start + offs_m, mask=m_mask, other=0.0)
    qa = _load_rows(q_base, offs_m, stride_qt, offs_da, m_mask, True, UPCAST)
    doa = _load_rows(do_base, offs_m, stride_dot, offs_da, m_mask, True, UPCAST)
    qb = qa
    dob = doa
    if DB > 0:  # zeroed past D: Q K^T and dO V^T see no repeated column
        qb = _zero_past_head_dim(_load_rows(q_base, offs_m, stride_qt, offs_db, m_mask, True, UPCAST), DA, DB, HEAD_DIM)
        dob = _zero_past_head_dim(_load_rows(do_base, offs_m, stride_dot, offs_db, m_mask, True, UPCAST), DA, DB,
                                  HEAD_DIM)
    dq_a = tl.zeros([BLOCK_M, DA], tl.float32)
    dq_b = tl.zeros([BLOCK_M, 16 if DB == 0 else DB], tl.float32)

    n_full, hi = _causal_ranges(m0, k_len, shift, BLOCK_M, BLOCK_N, CAUSAL)
    for start_n in range(0, n_full, BLOCK_N):
        dq_a, dq_b = _dq_kv_block(dq_a, dq_b, qa, qb, doa, dob, lse2, delta, k_base, v_base, stride_kt, stride_vt,
                                  start_n, k_len, offs_m, shift, qk_scale, offs_n, offs_da, offs_db,
                                  False, CAUSAL, DA, DB, UPCAST, PRECISION)
    for start_n in range(n_full, hi, BLOCK_N):
        dq_a, dq_b = _dq_kv_block(dq_a, dq_b, qa, qb, doa, dob, lse2, delta, k_base, v_base, stride_kt, stride_vt,
                                  start_n, k_len, offs_m, shift, qk_scale, offs_n, offs_da, offs_db,
                                  True, CAUSAL, DA, DB, UPCAST, PRECISION)

    dq_ptrs = DQ + q_start.to(tl.int64) * stride_dqt + h * stride_dqh + offs_m[:, None] * stride_dqt
    tl.store(dq_ptrs + offs_da[None, :], (dq_a * sm_scale).to(DQ.dtype.element_ty), mask=m_mask[:, None])
    if DB > 0:
        tl.store(dq_ptrs + offs_db[None, :], (dq_b * sm_scale).to(DQ.dtype.element_ty),
                 mask=m_mask[:, None])


@triton.jit
def _bwd_fused_kernel(
    Q,                          # [total_q, H, D] queries (unit stride on D)
    K, V,                       # [total_k, H, D] keys / values
    O,                          # [total_q, H, D] forward output
    DO,                         # [total_q, H, D] output gradient
    LSE,                        # [H, total_q] fp32 forward lse (natural log)
    DQ,                         # [total_q, H, D] output, any strides with unit stride on D
    DK, DV,                     # [total_k, H, D] outputs, any strides with unit stride on D
    CU_Q, CU_K,                 # [B+1] int32 cu_seqlens of queries / keys
    stride_qt, stride_qh,       # strides (in 8-element units) of Q (token, head)
    stride_kt, stride_kh,       # strides (in 8-element units) of K
    stride_vt, stride_vh,       # strides (in 8-element units) of V
    stride_dot, stride_doh,     # strides (in 8-element units) of DO
    stride_ot, stride_oh,       # strides (in 8-element units) of O
    stride_dqt, stride_dqh,     # strides (in 8-element units) of DQ
    stride_dkt, stride_dkh,     # strides (in 8-element units) of DK
    stride_dvt, stride_dvh,     # strides (in 8-element units) of DV
    stride_lse_h,               # element stride of LSE's head axis
    qk_scale,                   # softmax_scale * log2(e)
    sm_scale,                   # softmax_scale (applied to dQ and dK)
    dense_q, dense_k,           # sequence lengths (DENSE)
    CAUSAL: tl.constexpr,       # causal mask, bottom-right aligned
    DENSE: tl.constexpr,        # dense layout: no cu_seqlens
    HEAD_DIM: tl.constexpr,     # real head dim D
    DA: tl.constexpr,           # first (power-of-two) D chunk
    DB: tl.constexpr,           # second D chunk (0: none)
    BLOCK_M: tl.constexpr,      # queries per loop iteration
    BLOCK_N: tl.constexpr,      # keys held by the program: a power of two >= every sequence's key count
    UPCAST: tl.constexpr,       # compute the dots in fp32 (interpreter bf16)
    PRECISION: tl.constexpr,    # tl.dot input_precision ("tf32" or "ieee")
):
    """Backward of one (head, sequence) whose keys fit one tile: the program holds K, V, dK and dV and loops over
    query blocks; each block computes its delta = rowsum(dO * O), S^T = K Q^T, dV += P^T dO, dP^T = V dO^T,
    dK += dS^T Q and its complete dQ = dS K (5 GEMMs, no atomics, one launch)."""
    stride_qt, stride_qh, stride_kt, stride_kh = stride_qt * 8, stride_qh * 8, stride_kt * 8, stride_kh * 8
    stride_vt, stride_vh, stride_dot, stride_doh = stride_vt * 8, stride_vh * 8, stride_dot * 8, stride_doh * 8
    stride_ot, stride_oh, stride_dqt, stride_dqh = stride_ot * 8, stride_oh * 8, stride_dqt * 8, stride_dqh * 8
    stride_dkt, stride_dkh, stride_dvt, stride_dvh = stride_dkt * 8, stride_dkh * 8, stride_dvt * 8, stride_dvh * 8
    h = tl.program_id(0)
    b = tl.program_id(1)
    q_start, q_len = _seq_bounds(CU_Q, b, dense_q, DENSE)
    k_start, k_len = _seq_bounds(CU_K, b, dense_k, DENSE)
    shift = k_len - q_len
    q_base = Q + q_start.to(tl.int64) * stride_qt + h * stride_qh
    o_base = O + q_start.to(tl.int64) * stride_ot + h * stride_oh
    do_base = DO + q_start.to(tl.int64) * stride_dot + h * stride_doh
    dq_base = DQ + q_start.to(tl.int64) * stride_dqt + h * stride_dqh
    lse_base = LSE + h.to(tl.int64) * stride_lse_h + q_start

    offs_n = tl.arange(0, BLOCK_N)
    offs_da = tl.arange(0, DA)
    offs_db = _second_chunk(DA, DB, HEAD_DIM)
    n_mask = offs_n < k_len
    k_base = K + k_start.to(tl.int64) * stride_kt + h * stride_kh
    v_base = V + k_start.to(tl.int64) * stride_vt + h * stride_vh
    # K stays as loaded (dQ = dS K repeats real columns into the extra ones); V is zeroed past D for V dO^T
    ka = _load_rows(k_base, offs_n, stride_kt, offs_da, n_mask, True, UPCAST)
    va = _load_rows(v_base, offs_n, stride_vt, offs_da, n_mask, True, UPCAST)
    kb = ka
    vb = va
    if DB > 0:
        kb = _load_rows(k_base, offs_n, stride_kt, offs_db, n_mask, True, UPCAST)
        vb = _zero_past_head_dim(_load_rows(v_base, offs_n, stride_vt, offs_db, n_mask, True, UPCAST), DA, DB, HEAD_DIM)
    dk_a = tl.zeros([BLOCK_N, DA], tl.float32)
    dv_a = tl.zeros([BLOCK_N, DA], tl.float32)
    dk_b = tl.zeros([BLOCK_N, 16 if DB == 0 else DB], tl.float32)
    dv_b = tl.zeros([BLOCK_N, 16 if DB == 0 else DB], tl.float32)

    for start_m in range(0, q_len, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_mask = offs_m < q_len
        # rows past the sequence read lse = +inf, so their P (and dS) are exactly 0
        lse2 = tl.load(lse_base + offs_m, mask=m_mask, other=float("inf")) * 1.4426950408889634
        qa = _load_rows(q_base, offs_m, stride_qt, offs_da, m_mask, True, UPCAST)
        doa = _load_rows(do_base, offs_m, stride_dot, offs_da, m_mask, True, UPCAST)
        oa = _load_rows(o_base, offs_m, stride_ot, offs_da, m_mask, True, UPCAST)
        delta = tl.sum(oa.to(tl.float32) * doa.to(tl.float32), 1)
        s_t = tl.dot(ka, tl.trans(qa), input_precision=PRECISION)
        qb = qa
        dob = doa
        if DB > 0:  # Q and dO as loaded for dK and dV, zeroed past D where the reduction runs over D
            qb = _load_rows(q_base, offs_m, stride_qt, offs_db, m_mask, True, UPCAST)
            dob = _load_rows(do_base, offs_m, stride_dot, offs_db, m_mask, True, UPCAST)
            ob = _zero_past_head_dim(_load_rows(o_base, offs_m, stride_ot, offs_db, m_mask, True, UPCAST), DA, DB,
                                     HEAD_DIM)
            delta += tl.sum(ob.to(tl.float32) * dob.to(tl.float32), 1)
            s_t += tl.dot(kb, tl.trans(_zero_past_head_dim(qb, DA, DB, HEAD_DIM)), input_precision=PRECISION)
        p_t = tl.exp2(s_t * qk_scale - lse2[None, :])
        valid = n_mask[:, None]
        if CAUSAL:  # key j is seen by query i iff j <= i + shift
            valid = valid & (offs_n[:, None] <= offs_m[None, :] + shift)
        p_t = tl.where(valid, p_t, 0.0)
        dv_a = tl.dot(p_t.to(doa.dtype), doa, dv_a, input_precision=PRECISION)
        dp_t = tl.dot(va, tl.trans(doa), input_precision=PRECISION)
        if DB > 0:
            dv_b = tl.dot(p_t.to(dob.dtype), dob, dv_b, input_precision=PRECISION)
            dp_t += tl.dot(vb, tl.trans(dob), input_precision=PRECISION)
        ds_t = (p_t * (dp_t - delta[None, :])).to(qa.dtype)
        dk_a = tl.dot(ds_t, qa, dk_a, input_precision=PRECISION)
        ds = tl.trans(ds_t)
        dq_ptrs = dq_base + offs_m[:, None] * stride_dqt
        dq_a = tl.dot(ds, ka, input_precision=PRECISION)
        tl.store(dq_ptrs + offs_da[None, :], (dq_a * sm_scale).to(DQ.dtype.element_ty), mask=m_mask[:, None])
        if DB > 0:
            dk_b = tl.dot(ds_t, qb, dk_b, input_precision=PRECISION)
            dq_b = tl.dot(ds, kb, input_precision=PRECISION)
            tl.store(dq_ptrs + offs_db[None, :], (dq_b * sm_scale).to(DQ.dtype.element_ty), mask=m_mask[:, None])

    dk_ptrs = DK + k_start.to(tl.int64) * stride_dkt + h * stride_dkh + offs_n[:, None] * stride_dkt
    dv_ptrs = DV + k_start.to(tl.int64) * stride_dvt + h * stride_dvh + offs_n[:, None] * stride_dvt
    tl.store(dk_ptrs + offs_da[None, :], (dk_a * sm_scale).to(DK.dtype.element_ty), mask=n_mask[:, None])
    tl.store(dv_ptrs + offs_da[None, :], dv_a.to(DV.dtype.element_ty), mask=n_mask[:, None])
    if DB > 0:
        tl.store(dk_ptrs + offs_db[None, :], (dk_b * sm_scale).to(DK.dtype.element_ty), mask=n_mask[:, None])
        tl.store(dv_ptrs + offs_db[None, :], dv_b.to(DV.dtype.element_ty), mask=n_mask[:, None])


# ------------------------------------------------------------------------------------------------ launch
# Whether the kernels above run under the interpreter: fixed when they were decorated (triton reads TRITON_INTERPRET
# once), so a module constant, not an environment lookup per call.
INTERPRETED = isinstance(_fwd_kernel, InterpretedFunction)


def _tiles(block_m, block_n, warps, stages):
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": warps, "num_stages": stages}


def _fused(block_m, warps, stages):
    """Configuration of the fused backward (_bwd_fused_kernel): BLOCK_M queries per step; its key tile is the
    sequences' longest key count rounded up to a power of two (at most FUSED_MAX_LEN)."""
    return {"FUSED": True, "BLOCK_M": block_m, "num_warps": warps, "num_stages": stages}


# Longest sequence (queries and keys, rounded up to a power of two) the fused backward runs for: past it the key
# tile, dK and dV no longer fit a program's registers. A fused configuration looked up for a longer shape (a sweep
# timing its candidates at every shape) gives way to the default split backward.
FUSED_MAX_LEN = 128

# Candidates of the GPU tuning sweep. attn_bwd holds the dK/dV kernel's tiles (a program owns BLOCK_N keys and
# loops over BLOCK_M queries) and the dQ kernel's (DQ_BLOCK_M queries, DQ_BLOCK_N keys per step). Tiles that spill
# at D = 72 in the offline sm_90 compile are left out: 128 rows with 4 warps (forward, and the 32x128 dK/dV tile),
# and the 64x64 dK/dV tile with 4 warps (causal); of the fused backward (holding 128 keys' K, V, dK, dV), every
# 4-warp tile, and 2 stages past 16 queries per step.
TUNING = {
    "attn_fwd": [_tiles(m, n, w, s) for m, n in ((64, 64), (128, 64), (128, 32), (64, 32)) for w in (4, 8)
                 for s in (2, 3) if m < 128 or w == 8],
    "attn_bwd": [{**_tiles(m, n, w, s), "DQ_BLOCK_M": qm, "DQ_BLOCK_N": qn}
                 for m, n, qm, qn in ((32, 128, 128, 32), (32, 64, 64, 32), (64, 64, 64, 32), (16, 64, 64, 16))
                 for w in (4, 8) for s in (2, 3) if w == 8 or (n < 128 and m < 64)]
    + [_fused(16, 8, 1), _fused(16, 8, 2), _fused(32, 8, 1), _fused(64, 8, 1)],
}


@functools.lru_cache(maxsize=None)
def _default(family, head_dim, max_len, interpreted):
    """Default configuration (returned shared: not to be modified).

    Under the interpreter: the smallest tiles tl.dot allows, M != N to catch mixed-up block roles. On a GPU: the
    Triton fused-attention tutorial's / FA2's H100 tiles (fwd 128x64, dK/dV 32x128, dQ 128x32), halved along the
    sequence for short sequences so the grid keeps enough programs. 8 warps: with 4, ptxas (sm_90, bf16) spills in
    the backward already at D=64; with 8 the D <= 80 kernels fit in 255 registers without spills; past 80 columns
    smaller backward tiles keep D=96 so. Fixed rather than autotuned in-process: no compile-time blow-up, no tuning
    runs inside the first step or a CUDA-graph capture (a measured table replaces them: kernels/_config.py).

    The backward of sequences up to FUSED_MAX_LEN tokens with D <= 80 (MaskDiT-XL/2's encoder: 128 kept tokens of
    D = 72) is the fused one-launch kernel (under the interpreter too, so the tests run what a GPU runs); wider
    heads would hold 128 x 128 tiles of K, V, dK and dV and take the split kernels."""
    da, db = split_head_dim(head_dim)
    long, wide = max_len > 64, da + db > 80
    fused = family == "attn_bwd" and max_len <= FUSED_MAX_LEN and not wide
    if interpreted:
        return (_tiles(32, 16, 4, 1) if family == "attn_fwd" else _fused(16, 4, 1) if fused
                else {**_tiles(16, 32, 4, 1), "DQ_BLOCK_M": 32, "DQ_BLOCK_N": 16})
    if fused:
        return _fused(32, 8, 1)
    if family == "attn_fwd":
        return _tiles(128 if long else 64, 64, 8, 3)
    dkdv = _tiles(64, 64, 8, 3) if wide else _tiles(32, 128 if long else 64, 8, 3)
    return {**dkdv, "DQ_BLOCK_M": 64 if wide or not long else 128, "DQ_BLOCK_N": 32}


@functools.lru_cache(maxsize=None)
def _shape_key(head_dim, length):
    return shape_key(Dh=head_dim, L=length)


def _config(family, head_dim, max_len, dtype, device):
    """The tuned configuration of `family` for this head dim and max sequence length (a power of two in the key).
    fp32 inputs with 128-column chunks (D > 96) run with at most 2 stages: 3 need up to 256 KiB of shared memory
    (triton 3.6-3.8), over the H100's 227."""
    length = _common.next_power_of_2(max(max_len, 1))
    default = _default(family, head_dim, length, INTERPRETED)
    config = tuned(family, _shape_key(head_dim, length), default, device)
    if config.get("FUSED") and length > FUSED_MAX_LEN:  # a fused candidate timed at a longer shape: split runs
        config = default
    if dtype == torch.float32 and sum(split_head_dim(head_dim)) > 96 and config["num_stages"] > 2:
        config = {**config, "num_stages": 2}
    return config


@functools.lru_cache(maxsize=None)
def _meta(head_dim, dtype, causal, dense, interpreted):
    da, db = split_head_dim(head_dim)
    # fp32 inputs: full-precision dots even where torch allows TF32 matmuls: with TF32 dots the D = 128 backward's
    # dK error was 2.25x torch's own TF32 error on an H200 (2026-11-26), over the 2x rule.
    precision = "tf32" if dtype != torch.float32 else "ieee"
    return dict(CAUSAL=causal, DENSE=dense, HEAD_DIM=head_dim, DA=da, DB=db,
                UPCAST=interpreted and dtype == torch.bfloat16, PRECISION=precision)


def _batch(cu_seqlens, total, dense_len):
    """Sequences in the launch grid: len(cu_seqlens) - 1, or total / length for the dense layout."""
    n_batch = cu_seqlens.numel() - 1 if cu_seqlens is not None else (total // dense_len if dense_len else 0)
    if n_batch > 65535:
        raise ValueError(f"varlen attention: at most 65535 sequences per call, got {n_batch}")
    return n_batch


def strides8(*tensors):
    """Token and head strides of [T, H, D] tensors in units of 8 elements, as the attention kernels take them."""
    out, bits = [], 0
    for t in tensors:  # a plain loop: this runs several times per call on the host path
        token, head = t.stride()[:2]
        bits |= token | head
        out += (token >> 3, head >> 3)
    if bits & 7:
        raise ValueError("attention kernels need token and head strides that are multiples of 8, got "
                         f"{[s for t in tensors for s in t.stride()[:2]]}")
    return out


def varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal):
    """Forward. q [Tq, H, D], k, v [Tk, H, D] (unit stride on D, token and head strides multiples of 8);
    cu_seqlens int32 [B+1] (validated by the caller),
    or both None for the dense layout (B sequences of max_seqlen_q / max_seqlen_k tokens)
    -> (out [Tq, H, D] contiguous in q's dtype, lse [H, Tq] fp32)."""
    total_q, n_heads, head_dim = q.shape
    out = _common.empty(q.shape, q.dtype, q.device)
    lse = _common.empty((n_heads, total_q), torch.float32, q.device)
    dense = cu_seqlens_q is None
    n_batch = _batch(cu_seqlens_q, total_q, max_seqlen_q)
    if total_q == 0 or n_batch == 0 or max_seqlen_q == 0:
        return out, lse
    cfg = _config("attn_fwd", head_dim, max_seqlen_q, q.dtype, q.device)
    meta = _meta(head_dim, q.dtype, bool(causal), dense, INTERPRETED)
    _common.launch(_fwd_kernel, (_common.cdiv(max_seqlen_q, cfg["BLOCK_M"]), n_heads, n_batch), q, k, v, out, lse,
                   q if dense else cu_seqlens_q, q if dense else cu_seqlens_k, *strides8(q, k, v, out), lse.stride(0),
                   softmax_scale * LOG2E, max_seqlen_q, max_seqlen_k, **meta, BLOCK_M=cfg["BLOCK_M"],
                   BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out, lse


def varlen_bwd(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
               causal, dq, dk, dv):
    """Backward into preallocated dq [Tq, H, D], dk, dv [Tk, H, D] (unit stride on D, other strides multiples of 8,
    e.g. slices of one dqkv buffer). Inputs as for varlen_fwd plus dout, out [Tq, H, D] and lse [H, Tq]."""
    total_q, n_heads, head_dim = q.shape
    dense = cu_seqlens_q is None
    n_batch = _batch(cu_seqlens_q, total_q, max_seqlen_q)
    if n_batch == 0 or (total_q == 0 and k.shape[0] == 0):
        return
    cfg = _config("attn_bwd", head_dim, max(max_seqlen_q, max_seqlen_k), q.dtype, q.device)
    meta = _meta(head_dim, q.dtype, bool(causal), dense, INTERPRETED)
    cu_q, cu_k = (q, q) if dense else (cu_seqlens_q, cu_seqlens_k)
    options = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if cfg.get("FUSED"):
        _common.launch(_bwd_fused_kernel, (n_heads, n_batch), q, k, v, out, dout, lse, dq, dk, dv, cu_q, cu_k,
                       *strides8(q, k, v, dout, out, dq, dk, dv), lse.stride(0), softmax_scale * LOG2E, softmax_scale,
                       max_seqlen_q, max_seqlen_k, **meta, BLOCK_M=cfg["BLOCK_M"],
                       BLOCK_N=max(16, _common.next_power_of_2(max_seqlen_k)), **options)
        return
    delta = _common.empty(lse.shape, torch.float32, lse.device)
    if total_q > 0:
        block_t = 64
        _common.launch(_bwd_delta_kernel, (_common.cdiv(total_q, block_t), n_heads), out, dout, delta, total_q,
                       out.stride(0), out.stride(1), dout.stride(0), dout.stride(1), delta.stride(0),
                       HEAD_DIM=head_dim, BLOCK_T=block_t, BLOCK_D=_common.next_power_of_2(head_dim))
    strides = strides8(q, k, v, dout)
    if max_seqlen_k > 0:
        _common.launch(_bwd_dkdv_kernel, (_common.cdiv(max_seqlen_k, cfg["BLOCK_N"]), n_heads, n_batch), q, k, v,
                       dout, lse, delta, dk, dv, cu_q, cu_k, *strides, *strides8(dk, dv), lse.stride(0), softmax_scale * LOG2E, softmax_scale, max_seqlen_q, max_seqlen_k,
                       **meta, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], **options)
    if max_seqlen_q > 0:
        _common.launch(_bwd_dq_kernel, (_common.cdiv(max_seqlen_q, cfg["DQ_BLOCK_M"]), n_heads, n_batch), q, k, v,
                       dout, lse, delta, dq, cu_q, cu_k, *strides, *strides8(dq), lse.stride(0),
                       softmax_scale * LOG2E, softmax_scale, max_seqlen_q, max_seqlen_k, **meta,
                       BLOCK_M=cfg["DQ_BLOCK_M"], BLOCK_N=cfg["DQ_BLOCK_N"], **options)
