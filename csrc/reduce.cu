// Deterministic second pass of the reductions: sums fp32 per-block partials over their row axis.
#include "common.cuh"

namespace maskdit {
namespace {

constexpr int kCols = 32;  // columns per block (one warp-wide, 128-byte coalesced row segment)
constexpr int kRows = 8;   // row stripes per block, combined in a fixed order through shared memory

template <typename T>
__global__ void column_sum_kernel(const float* __restrict__ partial,  // [G, R, C]
                                  T* __restrict__ out,                // [G, C]
                                  int64_t R, int64_t C) {
  __shared__ float stripe[kRows][kCols];
  const int64_t c = blockIdx.x * static_cast<int64_t>(kCols) + threadIdx.x;
  const int64_t g = blockIdx.y;
  float acc = 0.f;
  if (c < C) {
    const float* p = partial + g * R * C + c;
    for (int64_t r = threadIdx.y; r < R; r += kRows) acc += p[r * C];
  }
  stripe[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    float s = stripe[0][threadIdx.x];
#pragma unroll
    for (int i = 1; i < kRows; ++i) s += stripe[i][threadIdx.x];
    out[g * C + c] = static_cast<T>(s);
  }
}

}  // namespace

void column_sum(const at::Tensor& partial, at::Tensor& out) {
  TORCH_CHECK(partial.dim() == 3 && partial.scalar_type() == at::kFloat && partial.is_contiguous(),
              "column_sum: partial must be a contiguous fp32 [G, R, C] tensor");
  const int64_t G = partial.size(0), R = partial.size(1), C = partial.size(2);
  TORCH_CHECK(out.is_contiguous() && out.numel() == G * C, "column_sum: out must be contiguous with G*C elements");
  TORCH_CHECK(G <= 65535, "column_sum: at most 65535 groups (got ", G, ")");
  if (G == 0 || C == 0) return;
  const dim3 grid(static_cast<unsigned>(ceil_div(C, kCols)), static_cast<unsigned>(G));
  const dim3 block(kCols, kRows);
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_dtype(out.scalar_type(), "column_sum", [&](auto tag) {
    using T = decltype(tag);
    column_sum_kernel<T><<<grid, block, 0, stream>>>(partial.data_ptr<float>(), out.data_ptr<T>(), R, C);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace maskdit
