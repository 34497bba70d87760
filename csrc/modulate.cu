// adaLN glue of DiT blocks, forward and backward:
//   layernorm_modulate: out = LayerNorm(x) * (1 + scale) + shift   (no affine, fp32 statistics)
//   gated_residual:     out = x + gate * y
// shift/scale/gate are per sample [B, D] (broadcast over the L tokens) or per token [B, L, D].
// Per-sample gradients (sums over tokens) are fp32 per-block partials reduced by column_sum in a
// fixed order: deterministic, no atomics.
#include "common.cuh"

namespace maskdit {
namespace {

// Threads along a row for the LayerNorm kernels; each caches up to 8 packs, so rows of more than
// 8 * kMaxThreadsX packs are rejected on the host.
constexpr int kMaxThreadsX = 512;

// One row per threadIdx.y; thread x holds packs x, x + blockDim.x, ... (NV of them) in registers,
// so the row is read from memory once.
template <typename T, int VEC, int NV>
__global__ void ln_mod_fwd_kernel(const T* __restrict__ x,      // [rows, D]
                                  const T* __restrict__ shift,  // [B or rows, D]
                                  const T* __restrict__ scale,  // [B or rows, D]
                                  T* __restrict__ out,          // [rows, D]
                                  float* __restrict__ mean_out, // [rows]
                                  float* __restrict__ rstd_out, // [rows]
                                  int64_t rows, int64_t L, int64_t D, bool per_token, float eps) {
  const int64_t row = blockIdx.x * static_cast<int64_t>(blockDim.y) + threadIdx.y;
  const bool valid = row < rows;  // no early return: row_sum2 synchronises the block
  float v[NV][VEC];
  float s = 0.f;
#pragma unroll
  for (int j = 0; j < NV; ++j) {
    const int64_t c = (threadIdx.x + j * static_cast<int64_t>(blockDim.x)) * VEC;
    if (valid && c < D) {
      load_float<T, VEC>(x + row * D + c, v[j]);
#pragma unroll
      for (int i = 0; i < VEC; ++i) s += v[j][i];
    }
  }
  // statistics with correctly rounded division and rsqrt (--use_fast_math would approximate them)
  const float mean = __fdiv_rn(row_sum2(make_float2(s, 0.f)).x, static_cast<float>(D));
  float ss = 0.f;  // two-pass variance: no cancellation when |mean| >> std
#pragma unroll
  for (int j = 0; j < NV; ++j) {
    const int64_t c = (threadIdx.x + j * static_cast<int64_t>(blockDim.x)) * VEC;
    if (valid && c < D) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) ss += (v[j][i] - mean) * (v[j][i] - mean);
    }
  }
  const float rstd = __frsqrt_rn(__fdiv_rn(row_sum2(make_float2(ss, 0.f)).x, static_cast<float>(D)) + eps);
  if (!valid) return;
  const int64_t crow = per_token ? row : row / L;
#pragma unroll
  for (int j = 0; j < NV; ++j) {
    const int64_t c = (threadIdx.x + j * static_cast<int64_t>(blockDim.x)) * VEC;
    if (c < D) {
      float sh[VEC], sc[VEC], o[VEC];
      load_float<T, VEC>(shift + crow * D + c, sh);
      load_float<T, VEC>(scale + crow * D + c, sc);
#pragma unroll
      for (int i = 0; i < VEC; ++i) o[i] = (v[j][i] - mean) * rstd * (1.f + sc[i]) + sh[i];
      store_float<T, VEC>(out + row * D + c, o);
    }
  }
  if (threadIdx.x == 0) {
    mean_out[row] = mean;
    rstd_out[row] = rstd;
  }
}

// Block (chunk of rows_per_chunk tokens, sample b). dx = rstd * (gs - mean(gs) - xhat * mean(gs * xhat))
// with gs = g * (1 + scale). Conditioning grads: per token, dshift = g and dscale = g * xhat are
// written directly; per sample, each thread accumulates its columns over its rows and writes one
// partial row of [B, chunks * blockDim.y, D].
template <typename T, int VEC, int NV>
__global__ void ln_mod_bwd_kernel(const T* __restrict__ g,          // [B, L, D]
                                  const T* __restrict__ x,          // [B, L, D]
                                  const T* __restrict__ scale,      // [B, D] or [B, L, D]
                                  const float* __restrict__ mean,   // [B, L]
                                  const float* __restrict__ rstd,   // [B, L]
                                  T* __restrict__ dx,               // [B, L, D]
                                  T* __restrict__ dshift_tok,       // [B, L, D] (per token) or nullptr
                                  T* __restrict__ dscale_tok,       // [B, L, D] (per token) or nullptr
                                  float* __restrict__ part_shift,   // [B, chunks * blockDim.y, D] or nullptr
                                  float* __restrict__ part_scale,   // same
                                  int64_t L, int64_t D, int64_t rows_per_chunk, bool per_token) {
  const int64_t b = blockIdx.y;
  const int64_t l0 = blockIdx.x * rows_per_chunk;
  const int64_t l1 = l0 + rows_per_chunk < L ? l0 + rows_per_chunk : L;
  const bool cond_grad = per_token ? dscale_tok != nullptr : part_shift != nullptr;
  float scale1[NV][VEC];
  KahanSum<VEC> acc_shift[NV], acc_scale[NV];
#pragma unroll
  for (int j = 0; j < NV; ++j) {
    const int64_t c = (threadIdx.x + j * static_cast<int64_t>(blockDim.x)) * VEC;
    if (!per_token && c < D) {
      load_float<T, VEC>(scale + b * D + c, scale1[j]);
#pragma unroll
      for (int i = 0; i < VEC; ++i) scale1[j][i] += 1.f;
    }
  }
  for (int64_t lb = l0; lb < l1; lb += blockDim.y) {  // same trip count for the whole block
    const int64_t l = lb + threadIdx.y;
    const bool valid = l < l1;
    const int64_t row = b * L + l;
    const float m = valid ? mean[row] : 0.f;
    const float r = valid ? rstd[row] : 0.f;
    float xh[NV][VEC], gv[NV][VEC], gs[NV][VEC];
    float2 s = make_float2(0.f, 0.f);
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      const int64_t c = (threadIdx.x + j * static_cast<int64_t>(blockDim.x)) * VEC;
      if (valid && c < D) {
        float sc[VEC];
        load_float<T, VEC>(x + row * D + c, xh[j]);
        load_float<T, VEC>(g + row * D + c, gv[j]);
        if (per_token) {
          load_float<T, VEC>(scale + row * D + c, sc);
        }
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
    const float mean_gs = __fdiv_rn(s.x, static_cast<float>(D)), mean_gsx = __fdiv_rn(s.y, static_cast<float>(D));
    if (!valid) continue;  // after the block-wide reduction of this iteration
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      const int64_t c = (threadIdx.x + j * static_cast<int64_t>(blockDim.x)) * VEC;
      if (c >= D) continue;
      float d[VEC];
#pragma unroll
      for (int i = 0; i < VEC; ++i) d[i] = r * (gs[j][i] - mean_gs - xh[j][i] * mean_gsx);
      store_float<T, VEC>(dx + row * D + c, d);
      if (!cond_grad) continue;
      if (per_token) {
        float ds[VEC];
#pragma unroll
        for (int i = 0; i < VEC; ++i) ds[i] = gv[j][i] * xh[j][i];
        store_float<T, VEC>(dshift_tok + row * D + c, gv[j]);
        store_float<T, VEC>(dscale_tok + row * D + c, ds);
      } else {
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          acc_shift[j].add(i, gv[j][i]);
          acc_scale[j].add(i, gv[j][i] * xh[j][i]);
        }
      }
    }
  }
  if (per_token || !cond_grad) return;
  const int64_t prow = (b * gridDim.x + blockIdx.x) * blockDim.y + threadIdx.y;
#pragma unroll
  for (int j = 0; j < NV; ++j) {
    const int64_t c = (threadIdx.x + j * static_cast<int64_t>(blockDim.x)) * VEC;
    if (c < D) {
      store_float<float, VEC>(part_shift + prow * D + c, acc_shift[j].sum);
      store_float<float, VEC>(part_scale + prow * D + c, acc_scale[j].sum);
    }
  }
}

template <typename T, int VEC>
__global__ void gated_fwd_kernel(const T* __restrict__ x,     // [rows, D]
                                 const T* __restrict__ y,     // [rows, D]
                                 const T* __restrict__ gate,  // [B or rows, D]
                                 T* __restrict__ out,         // [rows, D]
                                 int64_t rows, int64_t L, int64_t D, bool per_token) {
  const int64_t row = blockIdx.x * static_cast<int64_t>(blockDim.y) + threadIdx.y;
  if (row >= rows) return;
  const int64_t crow = per_token ? row : row / L;
  for (int64_t c = threadIdx.x * VEC; c < D; c += blockDim.x * VEC) {
    float a[VEC], bv[VEC], gt[VEC];
    load_float<T, VEC>(x + row * D + c, a);
    load_float<T, VEC>(y + row * D + c, bv);
    load_float<T, VEC>(gate + crow * D + c, gt);
#pragma unroll
    for (int i = 0; i < VEC; ++i) a[i] += gt[i] * bv[i];
    store_float<T, VEC>(out + row * D + c, a);
  }
}

// Block (chunk of rows_per_chunk tokens, sample b): dy = gate * g; dgate = g * y per token, or its
// sum over this thread's rows (one partial row of [B, chunks * blockDim.y, D]) per sample.
template <typename T, int VEC>
__global__ void gated_bwd_kernel(const T* __restrict__ g,         // [B, L, D]
                                 const T* __restrict__ y,         // [B, L, D]
                                 const T* __restrict__ gate,      // [B, D] or [B, L, D]
                                 T* __restrict__ dy,              // [B, L, D] or nullptr
                                 T* __restrict__ dgate_tok,       // [B, L, D] (per token) or nullptr
                                 float* __restrict__ part_gate,   // [B, chunks * blockDim.y, D] or nullptr
                                 int64_t L, int64_t D, int64_t rows_per_chunk, bool per_token) {
  const int64_t b = blockIdx.y;
  const int64_t l0 = blockIdx.x * rows_per_chunk;
  const int64_t l1 = l0 + rows_per_chunk < L ? l0 + rows_per_chunk : L;
  const bool gate_grad = dgate_tok != nullptr || part_gate != nullptr;
  const int64_t prow = (b * gridDim.x + blockIdx.x) * blockDim.y + threadIdx.y;
  for (int64_t c = threadIdx.x * VEC; c < D; c += blockDim.x * VEC) {
    float gt[VEC];
    KahanSum<VEC> acc;
    if (!per_token) load_float<T, VEC>(gate + b * D + c, gt);
    for (int64_t l = l0 + threadIdx.y; l < l1; l += blockDim.y) {
      const int64_t off = (b * L + l) * D + c;
      float gv[VEC];
      load_float<T, VEC>(g + off, gv);
      if (dy != nullptr) {
        if (per_token) load_float<T, VEC>(gate + off, gt);
        float d[VEC];
#pragma unroll
        for (int i = 0; i < VEC; ++i) d[i] = gt[i] * gv[i];
        store_float<T, VEC>(dy + off, d);
      }
      if (gate_grad) {
        float yv[VEC];
        load_float<T, VEC>(y + off, yv);
#pragma unroll
        for (int i = 0; i < VEC; ++i) yv[i] *= gv[i];
        if (per_token) {
          store_float<T, VEC>(dgate_tok + off, yv);
        } else {
#pragma unroll
          for (int i = 0; i < VEC; ++i) acc.add(i, yv[i]);
        }
      }
    }
    if (part_gate != nullptr) store_float<float, VEC>(part_gate + prow * D + c, acc.sum);
  }
}

void check_same(const at::Tensor& t, const at::Tensor& like, const char* op, const char* name) {
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " must be on ", like.device(), " (got ", t.device(), ")");
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": ", name, " must have dtype ", like.scalar_type(),
              " (got ", t.scalar_type(), ")");
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

void check_main(const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 3 && x.is_contiguous(), op, ": ", name,
              " must be a contiguous CUDA [B, L, D] tensor (got ", x.sizes(), " on ", x.device(), ")");
}

// Conditioning tensor [B, D] (per sample) or [B, L, D] (per token); returns true for per token.
bool check_cond(const at::Tensor& t, const at::Tensor& x, const char* op, const char* name) {
  check_same(t, x, op, name);
  const int64_t B = x.size(0), L = x.size(1), D = x.size(2);
  const bool per_sample = t.dim() == 2 && t.size(0) == B && t.size(1) == D;
  const bool per_token = t.dim() == 3 && t.sizes() == x.sizes();
  TORCH_CHECK(per_sample || per_token, op, ": ", name, " must be [B, D] = [", B, ", ", D, "] or [B, L, D] = [", B,
              ", ", L, ", ", D, "] (got ", t.sizes(), ")");
  return per_token;
}

// Rows of D / VEC packs, NV packs per thread: at most kMaxThreadsX threads along x.
int packs_per_thread(int64_t nvec, const char* op) {
  for (int nv : {1, 2, 4, 8}) {
    if (ceil_div(nvec, nv) <= kMaxThreadsX) return nv;
  }
  TORCH_CHECK(false, op, ": feature dim too large (", nvec, " packs per row; at most ", 8 * kMaxThreadsX, ")");
  return 0;
}

template <typename F>
void dispatch_nv(int nv, F&& f) {
  switch (nv) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    default: f(std::integral_constant<int, 8>{}); break;
  }
}

// Token chunking for the per-sample backward kernels: grid (chunks, B) with rows_per_chunk a
// multiple of block.y, enough chunks to fill the GPU about once.
struct TokenChunks {
  int64_t rows, count;
};

TokenChunks token_chunks(int64_t B, int64_t L, dim3 block) {
  const int64_t most = ceil_div(L, block.y);
  const int64_t want = num_chunks(most, B * block.x * block.y);
  const int64_t rows = ceil_div(ceil_div(L, want), block.y) * block.y;
  return {rows, ceil_div(L, rows)};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> layernorm_modulate_fwd(const at::Tensor& x, const at::Tensor& shift,
                                                                      const at::Tensor& scale, double eps) {
  constexpr const char* op = "layernorm_modulate";
  check_main(x, op, "x");
  const bool tok_shift = check_cond(shift, x, op, "shift");
  const bool tok_scale = check_cond(scale, x, op, "scale");
  TORCH_CHECK(tok_shift == tok_scale, op, ": shift and scale must both be [B, D] or both [B, L, D]");
  const int64_t B = x.size(0), L = x.size(1), D = x.size(2), rows = B * L;
  TORCH_CHECK(D > 0, op, ": feature dim D must be positive");
  c10::cuda::CUDAGuard guard(x.device());
  auto out = at::empty_like(x);
  auto fopts = x.options().dtype(at::kFloat);
  auto mean = at::empty({B, L}, fopts);
  auto rstd = at::empty({B, L}, fopts);
  if (rows == 0) return {out, mean, rstd};
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_dtype(x.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    dispatch_vec<T>(D, {x.data_ptr(), shift.data_ptr(), scale.data_ptr(), out.data_ptr()}, [&](auto vec) {
      constexpr int VEC = decltype(vec)::value;
      const int nv = packs_per_thread(D / VEC, op);
      dispatch_nv(nv, [&](auto nvc) {
        constexpr int NV = decltype(nvc)::value;
        const dim3 block = row_block(D / VEC, NV, kMaxThreadsX);
        const dim3 grid(static_cast<unsigned>(ceil_div(rows, block.y)));
        ln_mod_fwd_kernel<T, VEC, NV><<<grid, block, 0, stream>>>(
            x.data_ptr<T>(), shift.data_ptr<T>(), scale.data_ptr<T>(), out.data_ptr<T>(), mean.data_ptr<float>(),
            rstd.data_ptr<float>(), rows, L, D, tok_shift, static_cast<float>(eps));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return {out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layernorm_modulate_bwd(const at::Tensor& grad_out, const at::Tensor& x,
                                                                      const at::Tensor& scale, const at::Tensor& mean,
                                                                      const at::Tensor& rstd, bool cond_grad) {
  constexpr const char* op = "layernorm_modulate_backward";
  check_main(x, op, "x");
  check_same(grad_out, x, op, "grad_out");
  TORCH_CHECK(grad_out.sizes() == x.sizes(), op, ": grad_out must match x ", x.sizes(), " (got ", grad_out.sizes(), ")");
  const bool per_token = check_cond(scale, x, op, "scale");
  const int64_t B = x.size(0), L = x.size(1), D = x.size(2);
  for (const at::Tensor* t : {&mean, &rstd}) {
    TORCH_CHECK(t->device() == x.device() && t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 2 &&
                    t->size(0) == B && t->size(1) == L,
                op, ": mean and rstd must be contiguous fp32 [B, L] tensors on ", x.device());
  }
  TORCH_CHECK(B <= 65535, op, ": batch size at most 65535 (got ", B, ")");
  c10::cuda::CUDAGuard guard(x.device());
  auto dx = at::empty_like(x);
  const auto cond_shape = scale.sizes();
  auto dshift = cond_grad ? at::empty(cond_shape, x.options()) : at::empty({0}, x.options());
  auto dscale = cond_grad ? at::empty(cond_shape, x.options()) : at::empty({0}, x.options());
  if (B * L * D == 0) {
    dshift.zero_();
    dscale.zero_();
    return {dx, dshift, dscale};
  }
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_dtype(x.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    dispatch_vec<T>(D, {grad_out.data_ptr(), x.data_ptr(), scale.data_ptr(), dx.data_ptr(), dshift.data_ptr(),
                        dscale.data_ptr()}, [&](auto vec) {
      constexpr int VEC = decltype(vec)::value;
      const int nv = packs_per_thread(D / VEC, op);
      dispatch_nv(nv, [&](auto nvc) {
        constexpr int NV = decltype(nvc)::value;
        const dim3 block = row_block(D / VEC, NV, kMaxThreadsX);
        const TokenChunks ch = token_chunks(B, L, block);
        const bool partials = cond_grad && !per_token;
        at::Tensor part_shift, part_scale;
        if (partials) {
          part_shift = at::empty({B, ch.count * block.y, D}, x.options().dtype(at::kFloat));
          part_scale = at::empty_like(part_shift);
        }
        const bool tok = cond_grad && per_token;
        const dim3 grid(static_cast<unsigned>(ch.count), static_cast<unsigned>(B));
        ln_mod_bwd_kernel<T, VEC, NV><<<grid, block, 0, stream>>>(
            grad_out.data_ptr<T>(), x.data_ptr<T>(), scale.data_ptr<T>(), mean.data_ptr<float>(),
            rstd.data_ptr<float>(), dx.data_ptr<T>(), tok ? dshift.data_ptr<T>() : nullptr,
            tok ? dscale.data_ptr<T>() : nullptr, partials ? part_shift.data_ptr<float>() : nullptr,
            partials ? part_scale.data_ptr<float>() : nullptr, L, D, ch.rows, per_token);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        if (partials) {
          column_sum(part_shift, dshift);
          column_sum(part_scale, dscale);
        }
      });
    });
  });
  return {dx, dshift, dscale};
}

at::Tensor gated_residual_fwd(const at::Tensor& x, const at::Tensor& y, const at::Tensor& gate) {
  constexpr const char* op = "gated_residual";
  check_main(x, op, "x");
  check_same(y, x, op, "y");
  TORCH_CHECK(y.sizes() == x.sizes(), op, ": y must match x ", x.sizes(), " (got ", y.sizes(), ")");
  const bool per_token = check_cond(gate, x, op, "gate");
  const int64_t L = x.size(1), D = x.size(2), rows = x.size(0) * L;
  c10::cuda::CUDAGuard guard(x.device());
  auto out = at::empty_like(x);
  if (rows == 0 || D == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_dtype(x.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    dispatch_vec<T>(D, {x.data_ptr(), y.data_ptr(), gate.data_ptr(), out.data_ptr()}, [&](auto vec) {
      constexpr int VEC = decltype(vec)::value;
      const dim3 block = row_block(D / VEC);
      const dim3 grid(static_cast<unsigned>(ceil_div(rows, block.y)));
      gated_fwd_kernel<T, VEC><<<grid, block, 0, stream>>>(x.data_ptr<T>(), y.data_ptr<T>(), gate.data_ptr<T>(),
                                                          out.data_ptr<T>(), rows, L, D, per_token);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> gated_residual_bwd(const at::Tensor& grad_out, const at::Tensor& y,
                                                      const at::Tensor& gate, bool y_grad, bool gate_grad) {
  constexpr const char* op = "gated_residual_backward";
  check_main(y, op, "y");
  check_same(grad_out, y, op, "grad_out");
  TORCH_CHECK(grad_out.sizes() == y.sizes(), op, ": grad_out must match y ", y.sizes(), " (got ", grad_out.sizes(), ")");
  const bool per_token = check_cond(gate, y, op, "gate");
  const int64_t B = y.size(0), L = y.size(1), D = y.size(2);
  TORCH_CHECK(B <= 65535, op, ": batch size at most 65535 (got ", B, ")");
  c10::cuda::CUDAGuard guard(y.device());
  auto dy = y_grad ? at::empty_like(y) : at::empty({0}, y.options());
  auto dgate = gate_grad ? at::empty(gate.sizes(), y.options()) : at::empty({0}, y.options());
  if (B * L * D == 0) {
    dgate.zero_();
    return {dy, dgate};
  }
  if (!y_grad && !gate_grad) return {dy, dgate};
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_dtype(y.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    dispatch_vec<T>(D, {grad_out.data_ptr(), y.data_ptr(), gate.data_ptr(), dy.data_ptr(), dgate.data_ptr()},
                    [&](auto vec) {
      constexpr int VEC = decltype(vec)::value;
      const dim3 block = row_block(D / VEC);
      const TokenChunks ch = token_chunks(B, L, block);
      const bool partials = gate_grad && !per_token;
      at::Tensor part;
      if (partials) part = at::empty({B, ch.count * block.y, D}, y.options().dtype(at::kFloat));
      const dim3 grid(static_cast<unsigned>(ch.count), static_cast<unsigned>(B));
      gated_bwd_kernel<T, VEC><<<grid, block, 0, stream>>>(
          grad_out.data_ptr<T>(), y.data_ptr<T>(), gate.data_ptr<T>(), y_grad ? dy.data_ptr<T>() : nullptr,
          gate_grad && per_token ? dgate.data_ptr<T>() : nullptr, partials ? part.data_ptr<float>() : nullptr, L, D,
          ch.rows, per_token);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (partials) column_sum(part, dgate);
    });
  });
  return {dy, dgate};
}

}  // namespace maskdit
