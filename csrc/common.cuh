// Shared helpers for the memory-bound kernels: 16-byte packed loads/stores, dtype and vector-width
// dispatch, warp/row reductions and launch geometry. All arithmetic is in fp32; tensors are bf16,
// fp16 or fp32 and contiguous (the host wrappers check).
#pragma once

// Per-op ATen headers instead of ATen/ATen.h keep the build (and the CI compile check) short.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>
#include <type_traits>

namespace maskdit {

// N consecutive elements moved as one access (16 bytes when N * sizeof(T) == 16).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ Pack<T, N> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, N>*>(p);
}

template <typename T, int N>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, N>& v) {
  *reinterpret_cast<Pack<T, N>*>(p) = v;
}

template <typename T, int N>
__device__ __forceinline__ void load_float(const T* p, float (&f)[N]) {
  const Pack<T, N> v = load_pack<T, N>(p);
#pragma unroll
  for (int i = 0; i < N; ++i) f[i] = static_cast<float>(v.v[i]);
}

template <typename T, int N>
__device__ __forceinline__ void store_float(T* p, const float (&f)[N]) {
  Pack<T, N> v;
#pragma unroll
  for (int i = 0; i < N; ++i) v.v[i] = static_cast<T>(f[i]);
  store_pack<T, N>(p, v);
}

// Compensated (Kahan) fp32 sums for the long reductions over tokens and samples: the error stays
// at a few ulps of the result however many terms, on par with torch's tree reductions.
// (--use_fast_math does not reassociate additions, so the compensation survives.)
template <int N>
struct KahanSum {
  float sum[N], comp[N];

  __device__ __forceinline__ KahanSum() {
#pragma unroll
    for (int i = 0; i < N; ++i) sum[i] = comp[i] = 0.f;
  }

  __device__ __forceinline__ void add(int i, float v) {
    const float y = v - comp[i];
    const float t = sum[i] + y;
    comp[i] = (t - sum[i]) - y;
    sum[i] = t;
  }
};

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over the threads of one row of a (blockDim.x, blockDim.y) block, blockDim.x a multiple of
// 32 (so no warp spans two rows). Every thread of the block must call it (it may synchronise);
// the summation order is fixed, so results are run-to-run deterministic.
__device__ __forceinline__ float2 row_sum2(float2 v) {
  __shared__ float2 partial[32];
  v.x = warp_sum(v.x);
  v.y = warp_sum(v.y);
  const int warps_per_row = blockDim.x / 32;
  if (warps_per_row == 1) return v;  // uniform over the block
  const int first = threadIdx.y * warps_per_row;
  if (threadIdx.x % 32 == 0) partial[first + threadIdx.x / 32] = v;
  __syncthreads();
  float2 s = partial[first];
  for (int w = 1; w < warps_per_row; ++w) {
    s.x += partial[first + w].x;
    s.y += partial[first + w].y;
  }
  __syncthreads();  // partial[] is reused by the next call
  return s;
}

// ---- host side ----

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int sm_count() {
  int device = 0, count = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}

// Calls f(T{}) with T the C++ element type of `dtype` (float32, float16, bfloat16 only).
template <typename F>
void dispatch_dtype(at::ScalarType dtype, const char* op, F&& f) {
  switch (dtype) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(at::Half{}); break;
    case at::kBFloat16: f(at::BFloat16{}); break;
    default: TORCH_CHECK(false, op, ": unsupported dtype ", dtype, " (expected float32, float16 or bfloat16)");
  }
}

// Calls f(std::integral_constant<int, VEC>{}) with VEC = 16 / sizeof(T) when every row of D
// elements starting at each pointer is 16-byte aligned, else VEC = 1 (scalar fallback).
template <typename T, typename F>
void dispatch_vec(int64_t D, std::initializer_list<const void*> ptrs, F&& f) {
  constexpr int kVec = 16 / sizeof(T);
  bool aligned = D % kVec == 0;
  for (const void* p : ptrs) aligned = aligned && (p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0);
  if (aligned) {
    f(std::integral_constant<int, kVec>{});
  } else {
    f(std::integral_constant<int, 1>{});
  }
}

// Block shape for kernels where threadIdx.x walks the packs of a row and threadIdx.y picks the
// row: x covers ceil(nvec / per_thread) packs rounded up to whole warps (at most `max_x`),
// y stacks rows so that blocks hold about `target` threads.
inline dim3 row_block(int64_t nvec, int per_thread = 1, int max_x = 256, int target = 256) {
  int64_t x = ceil_div(ceil_div(nvec, per_thread), 32) * 32;
  if (x > max_x) x = max_x;
  const int64_t y = x >= target ? 1 : target / x;
  return dim3(static_cast<unsigned>(x), static_cast<unsigned>(y));
}

// Number of chunks to split a length-n reduction axis into so that `work_per_chunk` threads per
// chunk fill the GPU about once; more chunks = more parallelism but more fp32 partials.
inline int64_t num_chunks(int64_t n, int64_t work_per_chunk) {
  const int64_t target = static_cast<int64_t>(sm_count()) * 2048;
  int64_t c = ceil_div(target, work_per_chunk > 0 ? work_per_chunk : 1);
  return c < 1 ? 1 : (c > n ? n : c);
}

// ---- deterministic second pass of the reductions (header-only: one translation unit less) ----

constexpr int kSumCols = 32;  // columns per block: one warp-wide, 128-byte coalesced row segment
constexpr int kSumRows = 8;   // row stripes per block, combined in a fixed order in shared memory

template <typename T>
__global__ void column_sum_kernel(const float* __restrict__ partial,  // [G, R, C]
                                  T* __restrict__ out,                // [G, C]
                                  int64_t R, int64_t C) {
  __shared__ float stripe[kSumRows][kSumCols];
  const int64_t c = blockIdx.x * static_cast<int64_t>(kSumCols) + threadIdx.x;
  const int64_t g = blockIdx.y;
  KahanSum<1> acc;
  if (c < C) {
    const float* p = partial + g * R * C + c;
    for (int64_t r = threadIdx.y; r < R; r += kSumRows) acc.add(0, p[r * C]);
  }
  stripe[threadIdx.y][threadIdx.x] = acc.sum[0];
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    float s = stripe[0][threadIdx.x];
#pragma unroll
    for (int i = 1; i < kSumRows; ++i) s += stripe[i][threadIdx.x];
    out[g * C + c] = static_cast<T>(s);
  }
}

// out[g, c] = sum_r partial[g, r, c] in a fixed order: the second pass of every reduction here
// (per-block fp32 partials first, no atomics), so results are run-to-run deterministic.
// partial: fp32 [G, R, C] contiguous; out: [G, C] contiguous, float32/float16/bfloat16.
inline void column_sum(const at::Tensor& partial, at::Tensor& out) {
  TORCH_CHECK(partial.dim() == 3 && partial.scalar_type() == at::kFloat && partial.is_contiguous(),
              "column_sum: partial must be a contiguous fp32 [G, R, C] tensor");
  const int64_t G = partial.size(0), R = partial.size(1), C = partial.size(2);
  TORCH_CHECK(out.is_contiguous() && out.numel() == G * C, "column_sum: out must be contiguous with G*C elements");
  TORCH_CHECK(G <= 65535, "column_sum: at most 65535 groups (got ", G, ")");
  if (G == 0 || C == 0) return;
  const dim3 grid(static_cast<unsigned>(ceil_div(C, kSumCols)), static_cast<unsigned>(G));
  const dim3 block(kSumCols, kSumRows);
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_dtype(out.scalar_type(), "column_sum", [&](auto tag) {
    using T = decltype(tag);
    column_sum_kernel<T><<<grid, block, 0, stream>>>(partial.data_ptr<float>(), out.data_ptr<T>(), R, C);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace maskdit
