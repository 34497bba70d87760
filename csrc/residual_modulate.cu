// Gated residual fused with the LayerNorm-modulate after it (DiT blocks), forward and backward:
//   x_new = x + gate * y;  h = LayerNorm(x_new) * (1 + scale) + shift   (no affine, fp32 statistics)
// gate/shift/scale are all per sample [B, D] (broadcast over the L tokens) or all per token [B, L, D].
// The forward reads x and y once and writes x_new, h and the row statistics; h normalises x_new as stored.
// The backward reads the grads of x_new and h, x_new and y once and writes dx and dy; per-sample
// conditioning grads are fp32 per-block partials reduced by column_sum in a fixed order (deterministic).
#include "rows.cuh"

namespace maskdit {
namespace {

// One row per threadIdx.y; thread x holds its packs of x_new in registers (rows.cuh).
template <typename T, int VEC, int NV>
__global__ void res_ln_mod_fwd_kernel(const T* __restrict__ x,      // [rows, D]
                                      const T* __restrict__ y,      // [rows, D]
                                      const T* __restrict__ gate,   // [B or rows, D]
                                      const T* __restrict__ shift,  // [B or rows, D]
                                      const T* __restrict__ scale,  // [B or rows, D]
                                      T* __restrict__ x_new,        // [rows, D]
                                      T* __restrict__ h,            // [rows, D]
                                      float* __restrict__ mean_out, // [rows]
                                      float* __restrict__ rstd_out, // [rows]
                                      int64_t rows, int64_t L, int64_t D, bool per_token, float eps) {
  const int64_t row = blockIdx.x * static_cast<int64_t>(blockDim.y) + threadIdx.y;
  const bool valid = row < rows;  // no early return: row_stats synchronises the block
  const int64_t crow = per_token ? row : row / L;
  float v[NV][VEC];
#pragma unroll
  for (int j = 0; j < NV; ++j) {
    const int64_t c = row_col<VEC>(j);
    if (valid && c < D) {
      float yv[VEC], gv[VEC];
      load_float<T, VEC>(x + row * D + c, v[j]);
      load_float<T, VEC>(y + row * D + c, yv);
      load_float<T, VEC>(gate + crow * D + c, gv);
      Pack<T, VEC> out;
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        out.v[i] = static_cast<T>(v[j][i] + gv[i] * yv[i]);
        v[j][i] = static_cast<float>(out.v[i]);  // h normalises x_new as stored
      }
      store_pack<T, VEC>(x_new + row * D + c, out);
    }
  }
  const float2 stats = row_stats<VEC, NV>(v, valid, D, eps);
  if (!valid) return;
  store_modulated<T, VEC, NV>(v, stats, shift + crow * D, scale + crow * D, h + row * D, D);
  if (threadIdx.x == 0) {
    mean_out[row] = stats.x;
    rstd_out[row] = stats.y;
  }
}

// Block (chunk of rows_per_chunk tokens, sample b). The whole grad of x_new is
//   g = gx + rstd * (gs - mean(gs) - xhat * mean(gs * xhat)),  gs = gh * (1 + scale),
// then dx = g, dy = gate * g, dgate = g * y, dshift = gh, dscale = gh * xhat. Conditioning grads: per token,
// written directly; per sample, each thread accumulates its columns over its rows and writes one partial row
// of each plane of [3 (gate, shift, scale), B, chunks * blockDim.y, D].
template <typename T, int VEC, int NV>
__global__ void res_ln_mod_bwd_kernel(const T* __restrict__ gx,         // [B, L, D] grad of x_new
                                      const T* __restrict__ gh,         // [B, L, D] grad of h
                                      const T* __restrict__ xn,         // [B, L, D] x_new
                                      const T* __restrict__ y,          // [B, L, D]
                                      const T* __restrict__ gate,       // [B, D] or [B, L, D]
                                      const T* __restrict__ scale,      // [B, D] or [B, L, D]
                                      const float* __restrict__ mean,   // [B, L]
                                      const float* __restrict__ rstd,   // [B, L]
                                      T* __restrict__ dx,               // [B, L, D]
                                      T* __restrict__ dy,               // [B, L, D]
                                      T* __restrict__ dgate_tok,        // [B, L, D] (per token) or nullptr
                                      T* __restrict__ dshift_tok,       // [B, L, D] (per token) or nullptr
                                      T* __restrict__ dscale_tok,       // [B, L, D] (per token) or nullptr
                                      float* __restrict__ part,         // [3, B, chunks * blockDim.y, D] or nullptr
                                      int64_t L, int64_t D, int64_t rows_per_chunk, bool per_token) {
  const int64_t B = gridDim.y, b = blockIdx.y;
  const int64_t l0 = blockIdx.x * rows_per_chunk;
  const int64_t l1 = l0 + rows_per_chunk < L ? l0 + rows_per_chunk : L;
  const bool cond_grad = dgate_tok != nullptr || part != nullptr;
  float gate_b[NV][VEC], scale1_b[NV][VEC];
  KahanSum<VEC> acc_gate[NV], acc_shift[NV], acc_scale[NV];
#pragma unroll
  for (int j = 0; j < NV; ++j) {
    const int64_t c = row_col<VEC>(j);
    if (!per_token && c < D) {
      load_float<T, VEC>(gate + b * D + c, gate_b[j]);
      load_float<T, VEC>(scale + b * D + c, scale1_b[j]);
#pragma unroll
      for (int i = 0; i < VEC; ++i) scale1_b[j][i] += 1.f;
    }
  }
  for (int64_t lb = l0; lb < l1; lb += blockDim.y) {  // same trip count for the whole block
    const int64_t l = lb + threadIdx.y;
    const bool valid = l < l1;
    const int64_t row = b * L + l;
    const float r = valid ? rstd[row] : 0.f;
    const T* scale_row = per_token ? scale + row * D : nullptr;
    float xh[NV][VEC], dh[NV][VEC], gs[NV][VEC];
    const float2 means = ln_grad_row<T, VEC, NV>(xn + row * D, gh + row * D, scale_row, scale1_b,
                                                 valid ? mean[row] : 0.f, r, valid, per_token, D, xh, dh, gs);
    if (!valid) continue;  // after the block-wide reduction of this iteration
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      const int64_t c = row_col<VEC>(j);
      if (c >= D) continue;
      const int64_t off = row * D + c;
      float g[VEC], gt[VEC], d[VEC];
      load_float<T, VEC>(gx + off, g);
      if (per_token) load_float<T, VEC>(gate + off, gt);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        g[i] += r * (gs[j][i] - means.x - xh[j][i] * means.y);
        d[i] = (per_token ? gt[i] : gate_b[j][i]) * g[i];
      }
      store_float<T, VEC>(dx + off, g);
      store_float<T, VEC>(dy + off, d);
      if (!cond_grad) continue;
      float yv[VEC];
      load_float<T, VEC>(y + off, yv);
      if (per_token) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          yv[i] *= g[i];
          xh[j][i] *= dh[j][i];
        }
        store_float<T, VEC>(dgate_tok + off, yv);
        store_float<T, VEC>(dshift_tok + off, dh[j]);
        store_float<T, VEC>(dscale_tok + off, xh[j]);
      } else {
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          acc_gate[j].add(i, g[i] * yv[i]);
          acc_shift[j].add(i, dh[j][i]);
          acc_scale[j].add(i, dh[j][i] * xh[j][i]);
        }
      }
    }
  }
  if (part == nullptr) return;
  const int64_t prows = gridDim.x * static_cast<int64_t>(blockDim.y);
  const int64_t prow = b * prows + blockIdx.x * blockDim.y + threadIdx.y;
  const int64_t plane = B * prows * D;
#pragma unroll
  for (int j = 0; j < NV; ++j) {
    const int64_t c = row_col<VEC>(j);
    if (c < D) {
      store_float<float, VEC>(part + prow * D + c, acc_gate[j].sum);
      store_float<float, VEC>(part + plane + prow * D + c, acc_shift[j].sum);
      store_float<float, VEC>(part + 2 * plane + prow * D + c, acc_scale[j].sum);
    }
  }
}

// Every tensor argument: CUDA, contiguous, of x's dtype; `tokens` of x's shape [B, L, D], `conds` (gate, shift,
// scale) of one shape, [B, D] or [B, L, D]. Returns whether the conditioning is per token.
bool check_inputs(const char* op, const at::Tensor& x, std::initializer_list<const at::Tensor*> tokens,
                  std::initializer_list<const at::Tensor*> conds) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 3, op, ": tensors must be CUDA [B, L, D] (got ", x.sizes(), " on ",
              x.device(), ")");
  TORCH_CHECK(x.size(0) <= 65535, op, ": batch size at most 65535 (got ", x.size(0), ")");
  const at::Tensor& cond = **conds.begin();
  const bool per_token = cond.sizes() == x.sizes();
  TORCH_CHECK(per_token || (cond.dim() == 2 && cond.size(0) == x.size(0) && cond.size(1) == x.size(2)), op,
              ": conditioning must be [B, D] or [B, L, D] for x ", x.sizes(), " (got ", cond.sizes(), ")");
  auto check = [&](const at::Tensor& t, at::IntArrayRef shape) {
    TORCH_CHECK(t.device() == x.device() && t.scalar_type() == x.scalar_type() && t.is_contiguous(), op,
                ": every tensor must be contiguous, on ", x.device(), " and of dtype ", x.scalar_type());
    TORCH_CHECK(t.sizes() == shape, op, ": expected shape ", shape, " (got ", t.sizes(), ")");
  };
  for (const at::Tensor* t : tokens) check(*t, x.sizes());
  for (const at::Tensor* t : conds) check(*t, cond.sizes());
  return per_token;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> residual_layernorm_modulate_fwd(
    const at::Tensor& x, const at::Tensor& y, const at::Tensor& gate, const at::Tensor& shift, const at::Tensor& scale,
    double eps) {
  constexpr const char* op = "residual_layernorm_modulate";
  const bool per_token = check_inputs(op, x, {&x, &y}, {&gate, &shift, &scale});
  const int64_t B = x.size(0), L = x.size(1), D = x.size(2), rows = B * L;
  c10::cuda::CUDAGuard guard(x.device());
  auto x_new = at::empty_like(x);
  auto h = at::empty_like(x);
  auto fopts = x.options().dtype(at::kFloat);
  auto mean = at::empty({B, L}, fopts);
  auto rstd = at::empty({B, L}, fopts);
  if (x.numel() == 0) return {x_new, h, mean, rstd};  // the statistics are read only by a backward with tokens
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_dtype(x.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    dispatch_vec<T>(D, {x.data_ptr(), y.data_ptr(), gate.data_ptr(), shift.data_ptr(), scale.data_ptr(),
                        x_new.data_ptr(), h.data_ptr()}, [&](auto vec) {
      constexpr int VEC = decltype(vec)::value;
      dispatch_row_packs(D / VEC, op, [&](auto nvc) {
        constexpr int NV = decltype(nvc)::value;
        const dim3 block = row_block(D / VEC, NV, kRowThreads);
        const dim3 grid(static_cast<unsigned>(ceil_div(rows, block.y)));
        res_ln_mod_fwd_kernel<T, VEC, NV><<<grid, block, 0, stream>>>(
            x.data_ptr<T>(), y.data_ptr<T>(), gate.data_ptr<T>(), shift.data_ptr<T>(), scale.data_ptr<T>(),
            x_new.data_ptr<T>(), h.data_ptr<T>(), mean.data_ptr<float>(), rstd.data_ptr<float>(), rows, L, D,
            per_token, static_cast<float>(eps));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return {x_new, h, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> residual_layernorm_modulate_bwd(
    const at::Tensor& grad_x, const at::Tensor& grad_h, const at::Tensor& x_new, const at::Tensor& y,
    const at::Tensor& gate, const at::Tensor& scale, const at::Tensor& mean, const at::Tensor& rstd, bool cond_grad) {
  constexpr const char* op = "residual_layernorm_modulate_backward";
  const bool per_token = check_inputs(op, x_new, {&grad_x, &grad_h, &y}, {&gate, &scale});
  const int64_t B = x_new.size(0), L = x_new.size(1), D = x_new.size(2);
  for (const at::Tensor* t : {&mean, &rstd}) {
    TORCH_CHECK(t->device() == x_new.device() && t->scalar_type() == at::kFloat && t->is_contiguous() &&
                    t->dim() == 2 && t->size(0) == B && t->size(1) == L,
                op, ": mean and rstd must be contiguous fp32 [B, L] tensors on ", x_new.device());
  }
  c10::cuda::CUDAGuard guard(x_new.device());
  auto dx = at::empty_like(x_new);
  auto dy = at::empty_like(x_new);
  auto cond_grad_buffer = [&] {
    return cond_grad ? at::empty(gate.sizes(), x_new.options()) : at::empty({0}, x_new.options());
  };
  auto dgate = cond_grad_buffer(), dshift = cond_grad_buffer(), dscale = cond_grad_buffer();
  if (x_new.numel() == 0) {  // no tokens: per-sample grads are empty sums
    for (at::Tensor* t : {&dgate, &dshift, &dscale}) t->zero_();
    return {dx, dy, dgate, dshift, dscale};
  }
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_dtype(x_new.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    dispatch_vec<T>(D, {grad_x.data_ptr(), grad_h.data_ptr(), x_new.data_ptr(), y.data_ptr(), gate.data_ptr(),
                        scale.data_ptr(), dx.data_ptr(), dy.data_ptr(), dgate.data_ptr(), dshift.data_ptr(),
                        dscale.data_ptr()}, [&](auto vec) {
      constexpr int VEC = decltype(vec)::value;
      dispatch_row_packs(D / VEC, op, [&](auto nvc) {
        constexpr int NV = decltype(nvc)::value;
        const dim3 block = row_block(D / VEC, NV, kRowThreads);
        const TokenChunks ch = token_chunks(B, L, block);
        const bool partials = cond_grad && !per_token, tok = cond_grad && per_token;
        at::Tensor part;
        if (partials) part = at::empty({3, B, ch.count * block.y, D}, x_new.options().dtype(at::kFloat));
        const dim3 grid(static_cast<unsigned>(ch.count), static_cast<unsigned>(B));
        res_ln_mod_bwd_kernel<T, VEC, NV><<<grid, block, 0, stream>>>(
            grad_x.data_ptr<T>(), grad_h.data_ptr<T>(), x_new.data_ptr<T>(), y.data_ptr<T>(), gate.data_ptr<T>(),
            scale.data_ptr<T>(), mean.data_ptr<float>(), rstd.data_ptr<float>(), dx.data_ptr<T>(), dy.data_ptr<T>(),
            tok ? dgate.data_ptr<T>() : nullptr, tok ? dshift.data_ptr<T>() : nullptr,
            tok ? dscale.data_ptr<T>() : nullptr, partials ? part.data_ptr<float>() : nullptr, L, D, ch.rows,
            per_token);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        if (partials) {
          column_sum(part[0], dgate);
          column_sum(part[1], dshift);
          column_sum(part[2], dscale);
        }
      });
    });
  });
  return {dx, dy, dgate, dshift, dscale};
}

}  // namespace maskdit
