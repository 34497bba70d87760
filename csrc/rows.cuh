// Kernels that hold whole rows in registers (LayerNorm and what is fused with it): threadIdx.x walks the 16-byte
// packs of a row, each thread caching NV of them, threadIdx.y picks the row. The row-wise LayerNorm pieces
// (statistics, modulation, the first half of the backward) and the launch geometry.
#pragma once

#include "common.cuh"

namespace maskdit {

// ---- device side: thread x of a row holds its packs j = 0..NV-1 at columns row_col<VEC>(j) ----

template <int VEC>
__device__ __forceinline__ int64_t row_col(int j) {
  return (threadIdx.x + j * static_cast<int64_t>(blockDim.x)) * VEC;
}

// (mean, 1 / sqrt(var + eps)) of the row whose packs this thread holds in v (threads of an invalid row, or packs
// past D, contribute nothing). Two-pass variance: no cancellation when |mean| >> std; correctly rounded division
// and rsqrt (--use_fast_math would approximate them). Every thread of the block must call it (row_sum2).
template <int VEC, int NV>
__device__ __forceinline__ float2 row_stats(const float (&v)[NV][VEC], bool valid, int64_t D, float eps) {
  float s = 0.f, ss = 0.f;
#pragma unroll
  for (int j = 0; j < NV; ++j) {
    if (valid && row_col<VEC>(j) < D) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) s += v[j][i];
    }
  }
  const float mean = __fdiv_rn(row_sum2(make_float2(s, 0.f)).x, static_cast<float>(D));
#pragma unroll
  for (int j = 0; j < NV; ++j) {
    if (valid && row_col<VEC>(j) < D) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) ss += (v[j][i] - mean) * (v[j][i] - mean);
    }
  }
  return make_float2(mean, __frsqrt_rn(__fdiv_rn(row_sum2(make_float2(ss, 0.f)).x, static_cast<float>(D)) + eps));
}

// out = (v - mean) * rstd * (1 + scale) + shift over this thread's packs of one row (pointers at the row).
template <typename T, int VEC, int NV>
__device__ __forceinline__ void store_modulated(const float (&v)[NV][VEC], float2 stats, const T* shift,
                                                const T* scale, T* out, int64_t D) {
#pragma unroll
  for (int j = 0; j < NV; ++j) {
    const int64_t c = row_col<VEC>(j);
    if (c < D) {
      float sh[VEC], sc[VEC], o[VEC];
      load_float<T, VEC>(shift + c, sh);
      load_float<T, VEC>(scale + c, sc);
#pragma unroll
      for (int i = 0; i < VEC; ++i) o[i] = (v[j][i] - stats.x) * stats.y * (1.f + sc[i]) + sh[i];
      store_float<T, VEC>(out + c, o);
    }
  }
}

// First half of the backward of out = LayerNorm(x) * (1 + scale) + shift for one row (pointers at the row; x's
// statistics m, r): loads xhat = (x - m) * r and the output grad g, forms gs = g * (1 + scale) with (1 + scale)
// from `scale` per token, else from the registers scale1, and returns the row means (mean(gs), mean(gs * xhat))
// that dx = r * (gs - mean(gs) - xhat * mean(gs * xhat)) needs. Every thread of the block must call it.
template <typename T, int VEC, int NV>
__device__ __forceinline__ float2 ln_grad_row(const T* x, const T* g, const T* scale, const float (&scale1)[NV][VEC],
                                              float m, float r, bool valid, bool per_token, int64_t D,
                                              float (&xh)[NV][VEC], float (&gv)[NV][VEC], float (&gs)[NV][VEC]) {
  float2 s = make_float2(0.f, 0.f);
#pragma unroll
  for (int j = 0; j < NV; ++j) {
    const int64_t c = row_col<VEC>(j);
    if (valid && c < D) {
      float sc[VEC];
      load_float<T, VEC>(x + c, xh[j]);
      load_float<T, VEC>(g + c, gv[j]);
      if (per_token) load_float<T, VEC>(scale + c, sc);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        xh[j][i] = (xh[j][i] - m) * r;
        gs[j][i] = gv[j][i] * (per_token ? 1.f + sc[i] : scale1[j][i]);
        s.x += gs[j][i];
        s.y += gs[j][i] * xh[j][i];
      }
    }
  }
  s = row_sum2(s);
  return make_float2(__fdiv_rn(s.x, static_cast<float>(D)), __fdiv_rn(s.y, static_cast<float>(D)));
}

// ---- host side ----

// Threads along a row; with at most 8 cached packs each, rows of more than 8 * kRowThreads packs are rejected.
constexpr int kRowThreads = 512;

// Calls f(std::integral_constant<int, NV>{}) with NV in {1, 2, 4, 8} the fewest packs per thread that cover a
// row of `nvec` packs with at most kRowThreads threads; a wider row is an error naming `op`.
template <typename F>
void dispatch_row_packs(int64_t nvec, const char* op, F&& f) {
  if (nvec <= kRowThreads) {
    f(std::integral_constant<int, 1>{});
  } else if (nvec <= 2 * kRowThreads) {
    f(std::integral_constant<int, 2>{});
  } else if (nvec <= 4 * kRowThreads) {
    f(std::integral_constant<int, 4>{});
  } else {
    TORCH_CHECK(nvec <= 8 * kRowThreads, op, ": feature dim too large (", nvec, " packs per row; at most ",
                8 * kRowThreads, ")");
    f(std::integral_constant<int, 8>{});
  }
}

// Token chunking of a backward over [B, L] rows that reduces over each sample's tokens: grid (count, B) with
// `rows` tokens per block, a multiple of block.y, and enough chunks to fill the GPU about once.
struct TokenChunks {
  int64_t rows, count;
};

inline TokenChunks token_chunks(int64_t B, int64_t L, dim3 block) {
  const int64_t want = num_chunks(ceil_div(L, block.y), B * block.x * block.y);
  const int64_t rows = ceil_div(ceil_div(L, want), block.y) * block.y;
  return {rows, ceil_div(L, rows)};
}

}  // namespace maskdit
