// The summary attention s = c + MHSA(LN(c)) of every group of T frames, as one op.
//
// The order of work is the same on every device and lives here; a device supplies four
// fused kernels (a `Kernels` class with the static functions used below). The q/k/v projections
// come as the modules hold them and are stacked here by one copy, W_qkv = [W_q; W_k; W_v] [3C, C]
// and b_qkv = [b_q | b_k | b_v] [3C] one after the other in `qkv_params` (stacked by the caller in
// Python, they cost more host time per call than the whole op takes on the GPU); the forward
// returns them for the backward.
// Between the kernels the projections are ATen matmuls (cuBLAS / CPU BLAS) on all rows of the
// batch at once:
//
//   forward:  stack qkv_params -> LN (kernel) -> [q|k|v] = LN(c) W_qkv^T (one matmul, biases
//             added in the next kernel)
//             -> attention per (group, head), also writing c + b_out (kernel)
//             -> out = (c + b_out) + o W_out^T (one in-place matmul)
//   backward: the same in reverse with four matmuls, the attention backward (kernel) and LN
//             backward fused with every bias and LN-parameter gradient (kernel).
//
// Tensors passed to kernels are contiguous; `mean` and `rstd` are in the accumulation type
// (float; double for double).
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <tuple>
#include <utility>

#include "summary_shape.h"

namespace vitaclip {

using SummaryForward = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using SummaryBackward =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

inline void check_parameter(const at::Tensor& c, const at::Tensor& p, at::IntArrayRef shape, const char* name) {
  TORCH_CHECK_VALUE(p.sizes() == shape, "summary_attention: ", name, " has shape ", p.sizes(), ", expected ",
                    shape);
  TORCH_CHECK_VALUE(p.scalar_type() == c.scalar_type(), "summary_attention: ", name, " has dtype ",
                    p.scalar_type(), " but c has ", c.scalar_type());
  TORCH_CHECK_VALUE(p.device() == c.device(), "summary_attention: ", name, " is on ", p.device(),
                    " but c is on ", c.device());
}

// [W_q; W_k; W_v] flat, then [b_q | b_k | b_v]: [3C * C + 3C].
inline at::Tensor stack_qkv(const at::Tensor& q_weight, const at::Tensor& q_bias, const at::Tensor& k_weight,
                            const at::Tensor& k_bias, const at::Tensor& v_weight, const at::Tensor& v_bias) {
  return at::cat({q_weight.reshape(-1), k_weight.reshape(-1), v_weight.reshape(-1), q_bias, k_bias, v_bias});
}

inline at::Tensor qkv_weight_of(const at::Tensor& qkv_params, int64_t width) {
  return qkv_params.narrow(0, 0, 3 * width * width).view({3 * width, width});
}

inline at::Tensor qkv_bias_of(const at::Tensor& qkv_params, int64_t width) {
  return qkv_params.narrow(0, 3 * width * width, 3 * width);
}

// The shape of c [groups, frames, width].
inline SummaryShape check_summary_shape(const at::Tensor& c, int64_t num_heads) {
  TORCH_CHECK_VALUE(c.dim() == 3, "summary_attention: c must be [groups, frames, width], got shape ", c.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(c.scalar_type()), "summary_attention: c must be floating point, got ",
                    c.scalar_type());
  const SummaryShape shape{c.size(0), c.size(1), c.size(2), num_heads};
  TORCH_CHECK_VALUE(shape.groups > 0 && shape.frames > 0 && shape.width > 0,
                    "summary_attention: c must not be empty, got shape ", c.sizes());
  TORCH_CHECK_VALUE(num_heads > 0 && shape.width % num_heads == 0, "summary_attention: width ", shape.width,
                    " is not divisible by num_heads ", num_heads);
  return shape;
}

inline SummaryShape check_summary_inputs(const at::Tensor& c, const at::Tensor& ln_weight,
                                         const at::Tensor& ln_bias, const at::Tensor& q_weight,
                                         const at::Tensor& q_bias, const at::Tensor& k_weight,
                                         const at::Tensor& k_bias, const at::Tensor& v_weight,
                                         const at::Tensor& v_bias, const at::Tensor& out_weight,
                                         const at::Tensor& out_bias, int64_t num_heads) {
  const SummaryShape shape = check_summary_shape(c, num_heads);
  const int64_t w = shape.width;
  check_parameter(c, ln_weight, {w}, "ln_weight");
  check_parameter(c, ln_bias, {w}, "ln_bias");
  check_parameter(c, q_weight, {w, w}, "q_weight");
  check_parameter(c, q_bias, {w}, "q_bias");
  check_parameter(c, k_weight, {w, w}, "k_weight");
  check_parameter(c, k_bias, {w}, "k_bias");
  check_parameter(c, v_weight, {w, w}, "v_weight");
  check_parameter(c, v_bias, {w}, "v_bias");
  check_parameter(c, out_weight, {w, w}, "out_weight");
  check_parameter(c, out_bias, {w}, "out_bias");
  return shape;
}

// The backward's inputs: what the forward returned for c and the parameters, the statistics in the
// accumulation type. (The op is public: a mismatched call must not read out of bounds.)
inline SummaryShape check_summary_backward_inputs(const at::Tensor& grad_out, const at::Tensor& c,
                                                  const at::Tensor& normed, const at::Tensor& qkv,
                                                  const at::Tensor& heads_out, const at::Tensor& mean,
                                                  const at::Tensor& rstd, const at::Tensor& ln_weight,
                                                  const at::Tensor& qkv_params,
                                                  const at::Tensor& out_weight, int64_t num_heads) {
  const SummaryShape shape = check_summary_shape(c, num_heads);
  const int64_t rows = shape.rows(), w = shape.width;
  check_parameter(c, ln_weight, {w}, "ln_weight");
  check_parameter(c, qkv_params, {3 * w * w + 3 * w}, "qkv_params");
  check_parameter(c, out_weight, {w, w}, "out_weight");
  check_parameter(c, grad_out, c.sizes(), "grad_out");
  check_parameter(c, normed, {rows, w}, "normed");
  check_parameter(c, qkv, {rows, 3 * w}, "qkv");
  check_parameter(c, heads_out, {rows, w}, "heads_out");
  for (const auto& [stat, name] : {std::pair{&mean, "mean"}, std::pair{&rstd, "rstd"}}) {
    TORCH_CHECK_VALUE(stat->sizes() == at::IntArrayRef({rows}) &&
                          stat->scalar_type() == at::toOpMathType(c.scalar_type()) && stat->device() == c.device(),
                      "summary_attention_backward: ", name, " must be [", rows, "] of ",
                      at::toOpMathType(c.scalar_type()), " on ", c.device(), ", got ", stat->sizes(), " of ",
                      stat->scalar_type(), " on ", stat->device());
  }
  return shape;
}

// Autocast must not reach the matmuls inside: they would run in autocast's dtype and the kernels
// would read their outputs as the inputs' dtype. (The forward's autocast kernel casts the inputs and
// calls below autocast; the backward has none and runs in the caller's autocast state.)
struct NoAutocast {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

// Returns (out [G, T, C], and what the backward needs: normed = LN(c) [M, C],
// qkv = normed W_qkv^T without biases [M, 3C], heads_out = attention output [M, C], mean, rstd [M],
// qkv_params).
template <class Kernels>
SummaryForward summary_attention_forward(const at::Tensor& c, const at::Tensor& ln_weight,
                                         const at::Tensor& ln_bias, const at::Tensor& q_weight,
                                         const at::Tensor& q_bias, const at::Tensor& k_weight,
                                         const at::Tensor& k_bias, const at::Tensor& v_weight,
                                         const at::Tensor& v_bias, const at::Tensor& out_weight,
                                         const at::Tensor& out_bias, int64_t num_heads, double eps) {
  const SummaryShape shape = check_summary_inputs(c, ln_weight, ln_bias, q_weight, q_bias, k_weight, k_bias,
                                                  v_weight, v_bias, out_weight, out_bias, num_heads);
  Kernels::check_sizes(shape);
  const c10::DeviceGuard guard(c.device());
  const NoAutocast no_autocast;
  const int64_t rows = shape.rows(), width = shape.width;
  const at::Tensor qkv_params = stack_qkv(q_weight, q_bias, k_weight, k_bias, v_weight, v_bias);
  const at::Tensor x = c.contiguous().view({rows, width});
  const auto stat_options = c.options().dtype(at::toOpMathType(c.scalar_type()));

  at::Tensor normed = at::empty({rows, width}, c.options());
  at::Tensor mean = at::empty({rows}, stat_options);
  at::Tensor rstd = at::empty({rows}, stat_options);
  Kernels::layer_norm_forward(x, ln_weight.contiguous(), ln_bias.contiguous(), eps, normed, mean, rstd);

  const at::Tensor qkv = at::mm(normed, qkv_weight_of(qkv_params, width).t());

  at::Tensor heads_out = at::empty({rows, width}, c.options());
  at::Tensor out = at::empty({rows, width}, c.options());
  Kernels::attention_forward(shape, qkv, qkv_bias_of(qkv_params, width), x, out_bias.contiguous(), heads_out, out);
  out.addmm_(heads_out, out_weight.t());
  return {out.view({shape.groups, shape.frames, width}), normed, qkv, heads_out, mean, rstd, qkv_params};
}

// Gradients of (c, ln_weight, ln_bias, W_qkv, b_qkv, out_weight, out_bias) from the gradient of `out`
// and what the forward returned.
template <class Kernels>
SummaryBackward summary_attention_backward(const at::Tensor& grad_out, const at::Tensor& c,
                                           const at::Tensor& normed, const at::Tensor& qkv,
                                           const at::Tensor& heads_out, const at::Tensor& mean,
                                           const at::Tensor& rstd, const at::Tensor& ln_weight,
                                           const at::Tensor& qkv_params, const at::Tensor& out_weight,
                                           int64_t num_heads) {
  const SummaryShape shape = check_summary_backward_inputs(grad_out, c, normed, qkv, heads_out, mean, rstd, ln_weight,
                                                           qkv_params, out_weight, num_heads);
  Kernels::check_sizes(shape);
  const int64_t rows = shape.rows(), width = shape.width;
  const c10::DeviceGuard guard(c.device());
  const NoAutocast no_autocast;
  const at::Tensor x = c.contiguous().view({rows, width});
  const at::Tensor dout = grad_out.contiguous().view({rows, width});
  const at::Tensor stacked = qkv_params.contiguous();

  const at::Tensor grad_out_weight = at::mm(dout.t(), heads_out);
  const at::Tensor grad_heads = at::mm(dout, out_weight);

  at::Tensor grad_qkv = at::empty({rows, 3 * width}, c.options());
  Kernels::attention_backward(shape, qkv.contiguous(), qkv_bias_of(stacked, width), grad_heads, grad_qkv);

  const at::Tensor grad_qkv_weight = at::mm(grad_qkv.t(), normed);
  const at::Tensor grad_normed = at::mm(grad_qkv, qkv_weight_of(stacked, width));

  at::Tensor grad_c = at::empty({rows, width}, c.options());
  at::Tensor grad_ln_weight = at::empty({width}, c.options());
  at::Tensor grad_ln_bias = at::empty({width}, c.options());
  at::Tensor grad_qkv_bias = at::empty({3 * width}, c.options());
  at::Tensor grad_out_bias = at::empty({width}, c.options());
  Kernels::layer_norm_backward(grad_normed, dout, grad_qkv, x, mean.contiguous(), rstd.contiguous(),
                               ln_weight.contiguous(), grad_c, grad_ln_weight, grad_ln_bias, grad_qkv_bias,
                               grad_out_bias);
  return {grad_c.view(c.sizes()), grad_ln_weight, grad_ln_bias, grad_qkv_weight, grad_qkv_bias, grad_out_weight,
          grad_out_bias};
}

}  // namespace vitaclip
