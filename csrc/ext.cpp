// maskdit_fast._C: CUDA kernels for the memory-bound ops. Every schema lives here, in one fragment per op
// file: the Python module named by set_python_module (maskdit_fast/ops/gather_scatter.py, .../modulate.py)
// registers the fake (meta) impls and the autograd wiring of those ops.
// Only torch/library.h and Python.h: torch/extension.h (all of libtorch + pybind11) would triple
// the compile time for an empty module.
#include <Python.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace maskdit {
at::Tensor gather_tokens_fwd(const at::Tensor& x, const at::Tensor& ids, const std::optional<at::Tensor>& pos);
std::tuple<at::Tensor, at::Tensor> gather_tokens_bwd(const at::Tensor& grad_out, const at::Tensor& ids,
                                                     int64_t length, bool pos_grad);
at::Tensor scatter_tokens_fwd(const at::Tensor& x_kept, const at::Tensor& ids, const at::Tensor& mask_token,
                              int64_t length, const std::optional<at::Tensor>& pos);
std::tuple<at::Tensor, at::Tensor, at::Tensor> scatter_tokens_bwd(const at::Tensor& grad_out, const at::Tensor& ids,
                                                                  bool mask_grad, bool pos_grad);
std::tuple<at::Tensor, at::Tensor, at::Tensor> layernorm_modulate_fwd(const at::Tensor& x, const at::Tensor& shift,
                                                                      const at::Tensor& scale, double eps);
std::tuple<at::Tensor, at::Tensor, at::Tensor> layernorm_modulate_bwd(const at::Tensor& grad_out, const at::Tensor& x,
                                                                      const at::Tensor& scale, const at::Tensor& mean,
                                                                      const at::Tensor& rstd, bool cond_grad);
at::Tensor gated_residual_fwd(const at::Tensor& x, const at::Tensor& y, const at::Tensor& gate);
std::tuple<at::Tensor, at::Tensor> gated_residual_bwd(const at::Tensor& grad_out, const at::Tensor& y,
                                                      const at::Tensor& gate, bool y_grad, bool gate_grad);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> residual_layernorm_modulate_fwd(
    const at::Tensor& x, const at::Tensor& y, const at::Tensor& gate, const at::Tensor& shift, const at::Tensor& scale,
    double eps);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> residual_layernorm_modulate_bwd(
    const at::Tensor& grad_x, const at::Tensor& grad_h, const at::Tensor& x_new, const at::Tensor& y,
    const at::Tensor& gate, const at::Tensor& scale, const at::Tensor& mean, const at::Tensor& rstd, bool cond_grad);
}  // namespace maskdit

// Backward ops return an empty [0] tensor for a gradient that was not requested.
TORCH_LIBRARY(maskdit_fast_C, m) {}

TORCH_LIBRARY_FRAGMENT(maskdit_fast_C, m) {
  m.set_python_module("maskdit_fast.ops.gather_scatter");
  // [B, L, D], [B, K] int64, [L, D]? -> [B, K, D]
  m.def("gather_tokens(Tensor x, Tensor ids_keep, Tensor? pos_embed) -> Tensor");
  // [B, K, D] -> (grad_x [B, L, D], grad_pos_embed [L, D] | [0])
  m.def("gather_tokens_backward(Tensor grad_out, Tensor ids_keep, int length, bool pos_grad) -> (Tensor, Tensor)");
  // [B, K, D], [B, K] int64, [D], L, [L, D]? -> [B, L, D]
  m.def("scatter_tokens(Tensor x_kept, Tensor ids_keep, Tensor mask_token, int length, Tensor? pos_embed) -> Tensor");
  // [B, L, D] -> (grad_x_kept [B, K, D], grad_mask_token [D] | [0], grad_pos_embed [L, D] | [0])
  m.def("scatter_tokens_backward(Tensor grad_out, Tensor ids_keep, bool mask_grad, bool pos_grad) "
        "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_FRAGMENT(maskdit_fast_C, m) {
  m.set_python_module("maskdit_fast.ops.modulate");
  // x [B, L, D], shift/scale [B, D] | [B, L, D] -> (out [B, L, D], mean [B, L] fp32, rstd [B, L] fp32)
  m.def("layernorm_modulate(Tensor x, Tensor shift, Tensor scale, float eps) -> (Tensor, Tensor, Tensor)");
  // -> (grad_x [B, L, D], grad_shift, grad_scale: shaped like scale | [0])
  m.def("layernorm_modulate_backward(Tensor grad_out, Tensor x, Tensor scale, Tensor mean, Tensor rstd, "
        "bool cond_grad) -> (Tensor, Tensor, Tensor)");
  // x, y [B, L, D], gate [B, D] | [B, L, D] -> [B, L, D]
  m.def("gated_residual(Tensor x, Tensor y, Tensor gate) -> Tensor");
  // -> (grad_y [B, L, D] | [0], grad_gate shaped like gate | [0]); grad_x is grad_out itself
  m.def("gated_residual_backward(Tensor grad_out, Tensor y, Tensor gate, bool y_grad, bool gate_grad) "
        "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_FRAGMENT(maskdit_fast_C, m) {
  m.set_python_module("maskdit_fast.ops.residual_modulate");
  // x, y [B, L, D], gate/shift/scale [B, D] | [B, L, D]
  //   -> (x_new [B, L, D], h [B, L, D], mean [B, L] fp32, rstd [B, L] fp32)
  m.def("residual_layernorm_modulate(Tensor x, Tensor y, Tensor gate, Tensor shift, Tensor scale, float eps) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  // -> (grad_x, grad_y [B, L, D], grad_gate, grad_shift, grad_scale: shaped like gate | [0])
  m.def("residual_layernorm_modulate_backward(Tensor grad_x, Tensor grad_h, Tensor x_new, Tensor y, Tensor gate, "
        "Tensor scale, Tensor mean, Tensor rstd, bool cond_grad) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(maskdit_fast_C, CUDA, m) {
  m.impl("gather_tokens", &maskdit::gather_tokens_fwd);
  m.impl("gather_tokens_backward", &maskdit::gather_tokens_bwd);
  m.impl("scatter_tokens", &maskdit::scatter_tokens_fwd);
  m.impl("scatter_tokens_backward", &maskdit::scatter_tokens_bwd);
  m.impl("layernorm_modulate", &maskdit::layernorm_modulate_fwd);
  m.impl("layernorm_modulate_backward", &maskdit::layernorm_modulate_bwd);
  m.impl("gated_residual", &maskdit::gated_residual_fwd);
  m.impl("gated_residual_backward", &maskdit::gated_residual_bwd);
  m.impl("residual_layernorm_modulate", &maskdit::residual_layernorm_modulate_fwd);
  m.impl("residual_layernorm_modulate_backward", &maskdit::residual_layernorm_modulate_bwd);
}

// `import maskdit_fast._C` loads this library, which runs the registrations above; the Python
// module itself is empty.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
