// The CUDA kernels of the summary attention, behind an ATen-light interface (TensorBase only)
// so that nvcc does not parse all of ATen; summary_attention.h describes what each one does.
#pragma once

#include <ATen/core/TensorBase.h>

#include <cstdint>

#include "../summary_shape.h"

namespace vitaclip {

struct CudaKernels {
  // Whether this library's CUDA code runs on GPU `device` (machine code for its architecture, or PTX
  // it can compile); false also where there is no such GPU or driver.
  static bool runs_on(int64_t device);
  // Refuses sizes past the kernels' 32-bit indexing (a ValueError naming them).
  static void check_sizes(const SummaryShape& s);
  static void layer_norm_forward(const at::TensorBase& x, const at::TensorBase& weight, const at::TensorBase& bias,
                                 double eps, const at::TensorBase& normed, const at::TensorBase& mean,
                                 const at::TensorBase& rstd);
  static void attention_forward(const SummaryShape& s, const at::TensorBase& qkv, const at::TensorBase& qkv_bias,
                                const at::TensorBase& x, const at::TensorBase& out_bias,
                                const at::TensorBase& heads_out, const at::TensorBase& residual);
  static void attention_backward(const SummaryShape& s, const at::TensorBase& qkv, const at::TensorBase& qkv_bias,
                                 const at::TensorBase& grad_heads, const at::TensorBase& grad_qkv);
  static void layer_norm_backward(const at::TensorBase& grad_normed, const at::TensorBase& grad_out,
                                  const at::TensorBase& grad_qkv, const at::TensorBase& x, const at::TensorBase& mean,
                                  const at::TensorBase& rstd, const at::TensorBase& weight,
                                  const at::TensorBase& grad_x, const at::TensorBase& grad_weight,
                                  const at::TensorBase& grad_bias, const at::TensorBase& grad_qkv_bias,
                                  const at::TensorBase& grad_out_bias);
};

}  // namespace vitaclip
