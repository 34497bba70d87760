"""Minimum work of each benchmarked op (the "floor" a kernel is compared with) and the figures a
timing gives against the measured peaks.

Bytes are the minimum HBM traffic an ideal fused kernel needs, reads + writes, each tensor touched
once; FLOPs count a multiply-add as 2. `Cost.bytes` of a memory-bound op over the measured copy
bandwidth, or `Cost.flops` of a compute-bound op over the measured bf16 matmul peak, is the floor
time; "% of floor" is floor time / measured time (100% = at the measured peak).
"""
import dataclasses

INDEX_BYTES = 8  # ids_keep is int64

@dataclasses.dataclass(frozen=True)
class Cost:
    """Minimum work of one call: HBM bytes (read + written) and FLOPs."""
    bytes: int = 0
    flops: int = 0

    def __add__(self, other):
        return Cost(self.bytes + other.bytes, self.flops + other.flops)


def gather_tokens_cost(B, L, K, D, elem, pos_embed=True):
    """gather_tokens [B, L, D] -> [B, K, D] (pos_embed [L, D] is a fixed buffer, no grad).

    fwd: reads the B*K kept rows of x (B*K*D), the index (B*K int64), pos_embed once (L*D);
         writes B*K*D.
    bwd (grad of x): reads grad_out B*K*D and the index; writes grad_x B*L*D (zeros at masked rows).
    Returns (fwd, bwd) Costs.
    """
    fwd = Cost(elem * (2 * B * K * D + (L * D if pos_embed else 0)) + INDEX_BYTES * B * K,
               B * K * D if pos_embed else 0)
    bwd = Cost(elem * (B * K * D + B * L * D) + INDEX_BYTES * B * K)
    return fwd, bwd


def scatter_tokens_cost(B, L, K, D, elem, pos_embed=True):
    """scatter_tokens [B, K, D] (+ mask_token [D]) -> [B, L, D].

    fwd: reads x_kept B*K*D, the index B*K, mask_token D, pos_embed L*D; writes B*L*D.
    bwd: reads grad_out B*L*D (kept rows for grad_x_kept, masked rows for grad_mask_token) and the
         index; writes grad_x_kept B*K*D and grad_mask_token D.
    Returns (fwd, bwd) Costs.
    """
    fwd = Cost(elem * (B * K * D + D + B * L * D + (L * D if pos_embed else 0)) + INDEX_BYTES * B * K,
               B * L * D if pos_embed else 0)
    bwd = Cost(elem * (B * L * D + B * K * D + D) + INDEX_BYTES * B * K, B * (L - K) * D)
    return fwd, bwd


def layernorm_modulate_cost(B, N, D, elem):
    """layernorm_modulate x [B, N, D], shift/scale [B, D] -> [B, N, D].

    fwd: reads x, shift, scale; writes out (fp32 statistics stay on chip): 2*B*N*D + 2*B*D.
    bwd: reads x and grad_out, scale; writes grad_x, grad_shift, grad_scale (statistics recomputed):
         3*B*N*D + 3*B*D.
    FLOPs ~ 8 per element fwd, 16 bwd (not the limit; recorded for completeness).
    Returns (fwd, bwd) Costs.
    """
    n = B * N * D
    return Cost(elem * (2 * n + 2 * B * D), 8 * n), Cost(elem * (3 * n + 3 * B * D), 16 * n)


def gated_residual_cost(B, N, D, elem):
    """gated_residual x + gate[:, None] * y, x/y [B, N, D], gate [B, D].

    fwd: reads x, y, gate; writes out: 3*B*N*D + B*D.
    bwd: grad_x is grad_out itself (no traffic); reads grad_out, y, gate; writes grad_y and
         grad_gate: 3*B*N*D + 2*B*D.
    Returns (fwd, bwd) Costs.
    """
    n = B * N * D
    return Cost(elem * (3 * n + B * D), 2 * n), Cost(elem * (3 * n + 2 * B * D), 4 * n)


def attention_cost(B, H, Lq, Lk, Dh, elem):
    """Attention q [B, Lq, H, Dh], k/v [B, Lk, H, Dh].

    fwd FLOPs: QK^T and PV, 4*B*H*Lq*Lk*Dh. bwd: 2.5x fwd (recompute QK^T, then dV, dP, dQ, dK:
    five matmuls), FlashAttention's convention. Bytes: q, k, v, out read/written once (fwd), plus
    grad_out, grads of q, k, v and out re-read (bwd).
    Returns (fwd, bwd) Costs.
    """
    io = elem * H * Dh * B
    f = 4 * B * H * Lq * Lk * Dh
    return Cost(io * (2 * Lq + 2 * Lk), f), Cost(io * (4 * Lq + 4 * Lk), int(2.5 * f))


def varlen_attention_cost(seqlens_q, seqlens_k, H, Dh, elem):
    """Variable-length attention over packed sequences: the sum of attention_cost per sequence."""
    if len(seqlens_q) != len(seqlens_k):
        raise ValueError("seqlens_q and seqlens_k must have the same length")
    fwd, bwd = Cost(), Cost()
    for lq, lk in zip(seqlens_q, seqlens_k):
        f, b = attention_cost(1, H, int(lq), int(lk), Dh, elem)
        fwd, bwd = fwd + f, bwd + b
    return fwd, bwd


def achieved(cost, ms, peaks, bound):
    """Figures for one timing: achieved GB/s and TFLOP/s, and % of floor.

    cost: Cost of the timed call. ms: median time. peaks: {"copy_GBps", "matmul_TFLOPs"} measured
    in this process (missing -> no % figure). bound: "memory" or "compute" (which floor applies).
    """
    if bound not in ("memory", "compute"):
        raise ValueError(f"bound must be 'memory' or 'compute', got {bound!r}")
    out = {"ms": ms, "GBps": cost.bytes / ms / 1e6, "TFLOPs": cost.flops / ms / 1e9,
           "bytes": cost.bytes, "flops": cost.flops, "bound": bound}
    peak_key, fig = ("copy_GBps", "GBps") if bound == "memory" else ("matmul_TFLOPs", "TFLOPs")
    if peaks and peaks.get(peak_key):
        out["pct_of_floor"] = 100.0 * out[fig] / peaks[peak_key]
    return out
