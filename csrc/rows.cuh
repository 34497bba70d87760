// Launch geometry of the kernels that hold whole rows in registers (LayerNorm and what is fused with it):
// threadIdx.x walks the 16-byte packs of a row, each thread caching NV of them, threadIdx.y picks the row.
#pragma once

#include "common.cuh"

namespace maskdit {

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
