// Minimal extension proving the csrc/ build path; the real kernels register their schemas here.
#include <torch/library.h>
#include <torch/extension.h>

at::Tensor axpby_cuda(const at::Tensor& x, const at::Tensor& y, double a, double b);

namespace {
at::Tensor axpby(const at::Tensor& x, const at::Tensor& y, double a, double b) {
  TORCH_CHECK(x.is_cuda() && y.is_cuda(), "axpby: tensors must be on CUDA");
  TORCH_CHECK(x.sizes() == y.sizes(), "axpby: shape mismatch ", x.sizes(), " vs ", y.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat && y.scalar_type() == at::kFloat, "axpby: float32 only");
  return axpby_cuda(x.contiguous(), y.contiguous(), a, b);
}
}  // namespace

TORCH_LIBRARY(maskdit_fast_C, m) {
  m.def("axpby(Tensor x, Tensor y, float a, float b) -> Tensor");
}

TORCH_LIBRARY_IMPL(maskdit_fast_C, CUDA, m) {
  m.impl("axpby", &axpby);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {}
