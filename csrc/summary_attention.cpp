// Schema of the vitaclip ops and the Python module entry point of vitaclip._C.
// The CPU and CUDA kernels register themselves in their own files; fake (meta) shapes and
// autograd are registered from Python in vitaclip/ops/summary_ext.py.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing vitaclip._C loads this library, which registers the ops; it has no Python API.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(vitaclip, m) {
  m.set_python_module("vitaclip.ops.summary_ext");
  m.def(
      "summary_attention(Tensor c, Tensor ln_weight, Tensor ln_bias, Tensor q_weight, Tensor q_bias, "
      "Tensor k_weight, Tensor k_bias, Tensor v_weight, Tensor v_bias, Tensor out_weight, Tensor out_bias, "
      "int num_heads, float eps) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "summary_attention_backward(Tensor grad_out, Tensor c, Tensor normed, Tensor qkv, Tensor heads_out, "
      "Tensor mean, Tensor rstd, Tensor ln_weight, Tensor q_weight, Tensor q_bias, Tensor k_weight, "
      "Tensor k_bias, Tensor v_weight, Tensor v_bias, Tensor out_weight, int num_heads) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}
