// Mask gather/scatter around MaskDiT's encoder, forward and backward.
//
// gather:  out[b, k]   = x[b, ids[b, k]] + pos[ids[b, k]]
// scatter: out[b, l]   = (l kept at k ? x_kept[b, k] : mask_token) + pos[l]
// Backward passes use an inverse map inv[b, l] = k (or -1 when l is masked), so each output row
// is written exactly once and batch reductions (pos_embed, mask_token grads) run as fp32
// per-chunk partials plus a fixed-order second pass: no float atomics, deterministic.
#include "common.cuh"

namespace maskdit {
namespace {

// inv[b, l] = k for l = ids[b, k]; inv must be pre-filled with -1. Traps on an index outside
// [0, L) or a position kept twice (both make the backward ill-defined).
__global__ void inverse_ids_kernel(const int64_t* __restrict__ ids,  // [B, K]
                                   int* __restrict__ inv,            // [B, L]
                                   int64_t n, int64_t K, int64_t L) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  const int64_t b = i / K;
  const int64_t l = ids[i];
  CUDA_KERNEL_ASSERT(0 <= l && l < L && "ids_keep: position out of range [0, length)");
  if (l < 0 || l >= L) return;  // when device asserts are compiled out
  const int prev = atomicCAS(inv + b * L + l, -1, static_cast<int>(i - b * K));
  CUDA_KERNEL_ASSERT(prev == -1 && "ids_keep: positions must be distinct within a sample");
}

template <typename T, int VEC, bool POS>
__global__ void gather_fwd_kernel(const T* __restrict__ x,        // [B, L, D]
                                  const int64_t* __restrict__ ids,  // [B, K]
                                  const T* __restrict__ pos,        // [L, D] (POS only)
                                  T* __restrict__ out,              // [B, K, D]
                                  int64_t rows, int64_t K, int64_t L, int64_t D) {
  const int64_t row = blockIdx.x * static_cast<int64_t>(blockDim.y) + threadIdx.y;  // b * K + k
  if (row >= rows) return;
  const int64_t l = ids[row];
  CUDA_KERNEL_ASSERT(0 <= l && l < L && "ids_keep: position out of range [0, L)");
  if (l < 0 || l >= L) return;
  const T* src = x + ((row / K) * L + l) * D;
  T* dst = out + row * D;
  for (int64_t c = threadIdx.x * VEC; c < D; c += blockDim.x * VEC) {
    if constexpr (POS) {
      float a[VEC], p[VEC];
      load_float<T, VEC>(src + c, a);
      load_float<T, VEC>(pos + l * D + c, p);
#pragma unroll
      for (int i = 0; i < VEC; ++i) a[i] += p[i];
      store_float<T, VEC>(dst + c, a);
    } else {
      store_pack<T, VEC>(dst + c, load_pack<T, VEC>(src + c));
    }
  }
}

template <typename T, int VEC, bool POS>
__global__ void scatter_fwd_kernel(const T* __restrict__ x_kept,  // [B, K, D]
                                   const int* __restrict__ inv,   // [B, L]
                                   const T* __restrict__ mask,    // [D]
                                   const T* __restrict__ pos,     // [L, D] (POS only)
                                   T* __restrict__ out,           // [B, L, D]
                                   int64_t rows, int64_t L, int64_t K, int64_t D) {
  const int64_t row = blockIdx.x * static_cast<int64_t>(blockDim.y) + threadIdx.y;  // b * L + l
  if (row >= rows) return;
  const int64_t b = row / L, l = row - b * L;
  const int k = inv[row];
  const T* src = k >= 0 ? x_kept + (b * K + k) * D : mask;
  T* dst = out + row * D;
  for (int64_t c = threadIdx.x * VEC; c < D; c += blockDim.x * VEC) {
    if constexpr (POS) {
      float a[VEC], p[VEC];
      load_float<T, VEC>(src + c, a);
      load_float<T, VEC>(pos + l * D + c, p);
#pragma unroll
      for (int i = 0; i < VEC; ++i) a[i] += p[i];
      store_float<T, VEC>(dst + c, a);
    } else {
      store_pack<T, VEC>(dst + c, load_pack<T, VEC>(src + c));
    }
  }
}

// grad_x[b, l] = grad_out[b, inv[b, l]] (zeros where masked); thread (l, columns) walks batch chunk
// blockIdx.y and, when `partial` is given, writes the chunk's sum over b to partial[chunk, l].
template <typename T, int VEC>
__global__ void gather_bwd_kernel(const T* __restrict__ grad_out,  // [B, K, D]
                                  const int* __restrict__ inv,     // [B, L]
                                  T* __restrict__ grad_x,          // [B, L, D]
                                  float* __restrict__ partial,     // [chunks, L, D] or nullptr
                                  int64_t B, int64_t L, int64_t K, int64_t D, int64_t chunk) {
  const int64_t l = blockIdx.x * static_cast<int64_t>(blockDim.y) + threadIdx.y;
  if (l >= L) return;
  const int64_t b0 = blockIdx.y * chunk;
  const int64_t b1 = b0 + chunk < B ? b0 + chunk : B;
  for (int64_t c = threadIdx.x * VEC; c < D; c += blockDim.x * VEC) {
    KahanSum<VEC> acc;
#pragma unroll 4
    for (int64_t b = b0; b < b1; ++b) {
      const int k = inv[b * L + l];
      Pack<T, VEC> v;
      if (k >= 0) {
        v = load_pack<T, VEC>(grad_out + (b * K + k) * D + c);
      } else {
#pragma unroll
        for (int i = 0; i < VEC; ++i) v.v[i] = T(0.f);
      }
      store_pack<T, VEC>(grad_x + (b * L + l) * D + c, v);
      if (partial != nullptr) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) acc.add(i, static_cast<float>(v.v[i]));
      }
    }
    if (partial != nullptr) store_float<float, VEC>(partial + (blockIdx.y * L + l) * D + c, acc.sum);
  }
}

// grad_x_kept[b, k] = grad_out[b, ids[b, k]]; per batch chunk, partial sums over b of grad_out at
// masked positions (mask_token grad, before the sum over l) and at all positions (pos_embed grad).
template <typename T, int VEC>
__global__ void scatter_bwd_kernel(const T* __restrict__ grad_out,  // [B, L, D]
                                   const int* __restrict__ inv,     // [B, L]
                                   T* __restrict__ grad_x_kept,     // [B, K, D]
                                   float* __restrict__ part_mask,   // [chunks, L, D] or nullptr
                                   float* __restrict__ part_pos,    // [chunks, L, D] or nullptr
                                   int64_t B, int64_t L, int64_t K, int64_t D, int64_t chunk) {
  const int64_t l = blockIdx.x * static_cast<int64_t>(blockDim.y) + threadIdx.y;
  if (l >= L) return;
  const int64_t b0 = blockIdx.y * chunk;
  const int64_t b1 = b0 + chunk < B ? b0 + chunk : B;
  for (int64_t c = threadIdx.x * VEC; c < D; c += blockDim.x * VEC) {
    KahanSum<VEC> acc_mask, acc_pos;
#pragma unroll 4
    for (int64_t b = b0; b < b1; ++b) {
      const int k = inv[b * L + l];
      const Pack<T, VEC> v = load_pack<T, VEC>(grad_out + (b * L + l) * D + c);
      if (k >= 0) store_pack<T, VEC>(grad_x_kept + (b * K + k) * D + c, v);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const float f = static_cast<float>(v.v[i]);
        if (k < 0 && part_mask != nullptr) acc_mask.add(i, f);
        if (part_pos != nullptr) acc_pos.add(i, f);
      }
    }
    const int64_t off = (blockIdx.y * L + l) * D + c;
    if (part_mask != nullptr) store_float<float, VEC>(part_mask + off, acc_mask.sum);
    if (part_pos != nullptr) store_float<float, VEC>(part_pos + off, acc_pos.sum);
  }
}

void check_ids(const at::Tensor& ids, const at::Tensor& like, int64_t B, const char* op) {
  TORCH_CHECK(ids.device() == like.device(), op, ": ids_keep must be on ", like.device(), " (got ", ids.device(), ")");
  TORCH_CHECK(ids.scalar_type() == at::kLong, op, ": ids_keep must be int64 (got ", ids.scalar_type(), ")");
  TORCH_CHECK(ids.dim() == 2 && ids.size(0) == B, op, ": ids_keep must be [B=", B, ", K] (got ", ids.sizes(), ")");
  TORCH_CHECK(ids.is_contiguous(), op, ": ids_keep must be contiguous");
  TORCH_CHECK(ids.size(1) < (int64_t{1} << 31), op, ": K must fit in int32");
}

void check_float(const at::Tensor& t, const at::Tensor& like, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.device() == like.device(), op, ": ", name, " must be on ", like.device(), " (got ", t.device(), ")");
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": ", name, " must have dtype ", like.scalar_type(), " (got ", t.scalar_type(), ")");
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

// inv[b, l] = k with ids[b, k] = l, else -1 (int32 [B, L]).
at::Tensor inverse_ids(const at::Tensor& ids, int64_t L) {
  auto inv = at::full({ids.size(0), L}, -1, ids.options().dtype(at::kInt));
  const int64_t n = ids.numel();
  if (n == 0) return inv;
  constexpr int threads = 256;
  inverse_ids_kernel<<<static_cast<unsigned>(ceil_div(n, threads)), threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      ids.data_ptr<int64_t>(), inv.data_ptr<int>(), n, ids.size(1), L);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return inv;
}

// Batch chunking for the backward kernels: grid (ceil(L / block.y), chunks), `chunk` samples per
// block. Without a reduction each block takes one sample (no partials to keep small).
struct BatchChunks {
  int64_t chunk, count;
};

BatchChunks batch_chunks(int64_t B, int64_t L, dim3 block, bool reduce) {
  int64_t count = reduce ? num_chunks(B, ceil_div(L, block.y) * block.x * block.y) : B;
  if (count > 65535) count = 65535;
  if (count < 1) count = 1;
  const int64_t chunk = ceil_div(B, count);
  return {chunk, B == 0 ? 0 : ceil_div(B, chunk)};
}

}  // namespace

at::Tensor gather_tokens_fwd(const at::Tensor& x, const at::Tensor& ids, const std::optional<at::Tensor>& pos) {
  constexpr const char* op = "gather_tokens";
  TORCH_CHECK(x.is_cuda() && x.dim() == 3 && x.is_contiguous(), op, ": x must be a contiguous CUDA [B, L, D] tensor");
  const int64_t B = x.size(0), L = x.size(1), D = x.size(2);
  check_ids(ids, x, B, op);
  const int64_t K = ids.size(1);
  if (pos) {
    check_float(*pos, x, op, "pos_embed");
    TORCH_CHECK(pos->dim() == 2 && pos->size(0) == L && pos->size(1) == D, op, ": pos_embed must be [L, D] (got ", pos->sizes(), ")");
  }
  c10::cuda::CUDAGuard guard(x.device());
  auto out = at::empty({B, K, D}, x.options());
  const int64_t rows = B * K;
  if (rows == 0 || D == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_dtype(x.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    const T* pos_ptr = pos ? pos->data_ptr<T>() : nullptr;
    dispatch_vec<T>(D, {x.data_ptr(), pos_ptr, out.data_ptr()}, [&](auto vec) {
      constexpr int VEC = decltype(vec)::value;
      const dim3 block = row_block(D / VEC);
      const dim3 grid(static_cast<unsigned>(ceil_div(rows, block.y)));
      if (pos) {
        gather_fwd_kernel<T, VEC, true><<<grid, block, 0, stream>>>(
            x.data_ptr<T>(), ids.data_ptr<int64_t>(), pos_ptr, out.data_ptr<T>(), rows, K, L, D);
      } else {
        gather_fwd_kernel<T, VEC, false><<<grid, block, 0, stream>>>(
            x.data_ptr<T>(), ids.data_ptr<int64_t>(), nullptr, out.data_ptr<T>(), rows, K, L, D);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> gather_tokens_bwd(const at::Tensor& grad_out, const at::Tensor& ids,
                                                     int64_t length, bool pos_grad) {
  constexpr const char* op = "gather_tokens_backward";
  TORCH_CHECK(grad_out.is_cuda() && grad_out.dim() == 3 && grad_out.is_contiguous(), op,
              ": grad_out must be a contiguous CUDA [B, K, D] tensor");
  const int64_t B = grad_out.size(0), K = grad_out.size(1), D = grad_out.size(2), L = length;
  check_ids(ids, grad_out, B, op);
  TORCH_CHECK(ids.size(1) == K, op, ": ids_keep is [B, ", ids.size(1), "] but grad_out has K=", K);
  TORCH_CHECK(L >= 0 && L < (int64_t{1} << 31), op, ": invalid length ", L);
  c10::cuda::CUDAGuard guard(grad_out.device());
  auto grad_x = at::empty({B, L, D}, grad_out.options());
  auto grad_pos = pos_grad ? at::empty({L, D}, grad_out.options()) : at::empty({0}, grad_out.options());
  if (B * L * D == 0) {
    grad_x.zero_();
    grad_pos.zero_();
    return {grad_x, grad_pos};
  }
  auto inv = inverse_ids(ids, L);
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_dtype(grad_out.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    dispatch_vec<T>(D, {grad_out.data_ptr(), grad_x.data_ptr()}, [&](auto vec) {
      constexpr int VEC = decltype(vec)::value;
      const dim3 block = row_block(D / VEC);
      const BatchChunks ch = batch_chunks(B, L, block, pos_grad);
      at::Tensor partial;
      if (pos_grad) partial = at::empty({ch.count, L, D}, grad_out.options().dtype(at::kFloat));
      const dim3 grid(static_cast<unsigned>(ceil_div(L, block.y)), static_cast<unsigned>(ch.count));
      gather_bwd_kernel<T, VEC><<<grid, block, 0, stream>>>(
          grad_out.data_ptr<T>(), inv.data_ptr<int>(), grad_x.data_ptr<T>(),
          pos_grad ? partial.data_ptr<float>() : nullptr, B, L, K, D, ch.chunk);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (pos_grad) column_sum(partial.view({1, ch.count, L * D}), grad_pos);
    });
  });
  return {grad_x, grad_pos};
}

at::Tensor scatter_tokens_fwd(const at::Tensor& x_kept, const at::Tensor& ids, const at::Tensor& mask_token,
                              int64_t length, const std::optional<at::Tensor>& pos) {
  constexpr const char* op = "scatter_tokens";
  TORCH_CHECK(x_kept.is_cuda() && x_kept.dim() == 3 && x_kept.is_contiguous(), op,
              ": x_kept must be a contiguous CUDA [B, K, D] tensor");
  const int64_t B = x_kept.size(0), K = x_kept.size(1), D = x_kept.size(2), L = length;
  check_ids(ids, x_kept, B, op);
  TORCH_CHECK(ids.size(1) == K, op, ": ids_keep is [B, ", ids.size(1), "] but x_kept has K=", K);
  TORCH_CHECK(K <= L && L < (int64_t{1} << 31), op, ": length must be in [K, 2^31) (got ", L, ", K=", K, ")");
  check_float(mask_token, x_kept, op, "mask_token");
  TORCH_CHECK(mask_token.dim() == 1 && mask_token.size(0) == D, op, ": mask_token must be [D=", D, "] (got ", mask_token.sizes(), ")");
  if (pos) {
    check_float(*pos, x_kept, op, "pos_embed");
    TORCH_CHECK(pos->dim() == 2 && pos->size(0) == L && pos->size(1) == D, op, ": pos_embed must be [L, D] (got ", pos->sizes(), ")");
  }
  c10::cuda::CUDAGuard guard(x_kept.device());
  auto out = at::empty({B, L, D}, x_kept.options());
  const int64_t rows = B * L;
  if (rows == 0 || D == 0) return out;
  auto inv = inverse_ids(ids, L);
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_dtype(x_kept.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    const T* pos_ptr = pos ? pos->data_ptr<T>() : nullptr;
    dispatch_vec<T>(D, {x_kept.data_ptr(), mask_token.data_ptr(), pos_ptr, out.data_ptr()}, [&](auto vec) {
      constexpr int VEC = decltype(vec)::value;
      const dim3 block = row_block(D / VEC);
      const dim3 grid(static_cast<unsigned>(ceil_div(rows, block.y)));
      if (pos) {
        scatter_fwd_kernel<T, VEC, true><<<grid, block, 0, stream>>>(
            x_kept.data_ptr<T>(), inv.data_ptr<int>(), mask_token.data_ptr<T>(), pos_ptr, out.data_ptr<T>(), rows, L, K, D);
      } else {
        scatter_fwd_kernel<T, VEC, false><<<grid, block, 0, stream>>>(
            x_kept.data_ptr<T>(), inv.data_ptr<int>(), mask_token.data_ptr<T>(), nullptr, out.data_ptr<T>(), rows, L, K, D);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> scatter_tokens_bwd(const at::Tensor& grad_out, const at::Tensor& ids,
                                                                  bool mask_grad, bool pos_grad) {
  constexpr const char* op = "scatter_tokens_backward";
  TORCH_CHECK(grad_out.is_cuda() && grad_out.dim() == 3 && grad_out.is_contiguous(), op,
              ": grad_out must be a contiguous CUDA [B, L, D] tensor");
  const int64_t B = grad_out.size(0), L = grad_out.size(1), D = grad_out.size(2);
  check_ids(ids, grad_out, B, op);
  const int64_t K = ids.size(1);
  TORCH_CHECK(K <= L, op, ": ids_keep has K=", K, " > L=", L);
  c10::cuda::CUDAGuard guard(grad_out.device());
  auto grad_x_kept = at::empty({B, K, D}, grad_out.options());
  auto grad_mask = mask_grad ? at::empty({D}, grad_out.options()) : at::empty({0}, grad_out.options());
  auto grad_pos = pos_grad ? at::empty({L, D}, grad_out.options()) : at::empty({0}, grad_out.options());
  if (B * L * D == 0) {
    grad_mask.zero_();
    grad_pos.zero_();
    return {grad_x_kept, grad_mask, grad_pos};
  }
  auto inv = inverse_ids(ids, L);
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_dtype(grad_out.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    dispatch_vec<T>(D, {grad_out.data_ptr(), grad_x_kept.data_ptr()}, [&](auto vec) {
      constexpr int VEC = decltype(vec)::value;
      const dim3 block = row_block(D / VEC);
      const BatchChunks ch = batch_chunks(B, L, block, mask_grad || pos_grad);
      auto fopts = grad_out.options().dtype(at::kFloat);
      at::Tensor part_mask, part_pos;
      if (mask_grad) part_mask = at::empty({ch.count, L, D}, fopts);
      if (pos_grad) part_pos = at::empty({ch.count, L, D}, fopts);
      const dim3 grid(static_cast<unsigned>(ceil_div(L, block.y)), static_cast<unsigned>(ch.count));
      scatter_bwd_kernel<T, VEC><<<grid, block, 0, stream>>>(
          grad_out.data_ptr<T>(), inv.data_ptr<int>(), grad_x_kept.data_ptr<T>(),
          mask_grad ? part_mask.data_ptr<float>() : nullptr, pos_grad ? part_pos.data_ptr<float>() : nullptr,
          B, L, K, D, ch.chunk);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (mask_grad) column_sum(part_mask.view({1, ch.count * L, D}), grad_mask);
      if (pos_grad) column_sum(part_pos.view({1, ch.count, L * D}), grad_pos);
    });
  });
  return {grad_x_kept, grad_mask, grad_pos};
}

}  // namespace maskdit
