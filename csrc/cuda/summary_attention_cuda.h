// The CUDA kernels of the summary attention, behind an ATen-light interface (TensorBase only)
// so that nvcc does not parse all of ATen; summary_attention.h describes what each one does.
#pragma once

#include <ATen/core/TensorBase.h>

#include <cstdint>
#include <vector>

#include "../summary_shape.h"

namespace vitaclip {

struct CudaKernels {
  // The compute capabilities x 100 (800 for 8.0) this library has CUDA code for.
  static std::vector<int64_t> archs();
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
