// Schema and autograd of the vitaclip ops, and the Python module entry point of vitaclip._C.
// CPU and CUDA kernels register themselves in their own files; fake (meta) shapes for
// torch.compile are registered from Python in vitaclip/ops/summary_ext.py.
//
// Autograd is a C++ function on the Autograd key rather than torch.library.register_autograd:
// the Python route costs tens of microseconds per call (a Python autograd.Function, and
// re-reading the 13-argument schema each forward), more than the whole fused op on the GPU.
#include <Python.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/grad_mode.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include "summary_attention.h"

extern "C" {
// Importing vitaclip._C loads this library, which registers the ops; it has no Python API.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace vitaclip {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr const char* kNoDoubleBackward =
    "summary_attention: double backward (create_graph=True) is not supported; "
    "set VITACLIP_DISABLE_EXT=1 to use the PyTorch path";

SummaryForward call_forward(const Tensor& c, const Tensor& ln_weight, const Tensor& ln_bias, const Tensor& q_weight,
                            const Tensor& q_bias, const Tensor& k_weight, const Tensor& k_bias, const Tensor& v_weight,
                            const Tensor& v_bias, const Tensor& out_weight, const Tensor& out_bias, int64_t num_heads,
                            double eps) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("vitaclip::summary_attention", "")
                             .typed<SummaryForward(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                   const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                   const Tensor&, const Tensor&, const Tensor&, int64_t, double)>();
  return op.call(c, ln_weight, ln_bias, q_weight, q_bias, k_weight, k_bias, v_weight, v_bias, out_weight, out_bias,
                 num_heads, eps);
}

SummaryBackward call_backward(const variable_list& saved, const Tensor& grad_out, int64_t num_heads) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("vitaclip::summary_attention_backward", "")
          .typed<SummaryBackward(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                 const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t)>();
  return op.call(grad_out, saved[0], saved[1], saved[2], saved[3], saved[4], saved[5], saved[6], saved[7],
                 saved[8], num_heads);
}

class SummaryAttentionFunction : public torch::autograd::Function<SummaryAttentionFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& c, const Tensor& ln_weight, const Tensor& ln_bias,
                               const Tensor& q_weight, const Tensor& q_bias, const Tensor& k_weight,
                               const Tensor& k_bias, const Tensor& v_weight, const Tensor& v_bias,
                               const Tensor& out_weight, const Tensor& out_bias, int64_t num_heads, double eps) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, normed, qkv, heads_out, mean, rstd, qkv_params] = call_forward(
        c, ln_weight, ln_bias, q_weight, q_bias, k_weight, k_bias, v_weight, v_bias, out_weight, out_bias, num_heads,
        eps);
    // Only `out` is differentiable; the rest is what the backward reads.
    ctx->mark_non_differentiable({normed, qkv, heads_out, mean, rstd, qkv_params});
    // Their gradients are never used: without this, autograd fills six zero tensors (one [M, 3C])
    // per backward, more kernel launches than the backward itself makes.
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({c, normed, qkv, heads_out, mean, rstd, ln_weight, qkv_params, out_weight});
    ctx->saved_data["num_heads"] = num_heads;
    return {out, normed, qkv, heads_out, mean, rstd, qkv_params};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // Grad mode is on here exactly under create_graph=True. The backward op's own refusal sees only
    // its inputs: with c, the LN weight and the out weight frozen and a loss linear in `out`, none
    // needs grad, and a q/k/v (or LN bias) gradient came back without the op's second-order term.
    TORCH_CHECK(!at::GradMode::is_enabled(), kNoDoubleBackward);
    if (!grads[0].defined()) return variable_list(13);  // `out` did not reach the loss
    auto [dc, dln_w, dln_b, dqkv_w, dqkv_b, dout_w, dout_b] =
        call_backward(ctx->get_saved_variables(), grads[0], ctx->saved_data["num_heads"].toInt());
    const auto dw = dqkv_w.chunk(3), db = dqkv_b.chunk(3);  // views: no copies
    return {dc, dln_w, dln_b, dw[0], db[0], dw[1], db[1], dw[2], db[2], dout_w, dout_b, Tensor(), Tensor()};
  }
};

SummaryForward summary_attention_autograd(const Tensor& c, const Tensor& ln_weight, const Tensor& ln_bias,
                                          const Tensor& q_weight, const Tensor& q_bias, const Tensor& k_weight,
                                          const Tensor& k_bias, const Tensor& v_weight, const Tensor& v_bias,
                                          const Tensor& out_weight, const Tensor& out_bias, int64_t num_heads,
                                          double eps) {
  if (!torch::autograd::compute_requires_grad(c, ln_weight, ln_bias, q_weight, q_bias, k_weight, k_bias, v_weight,
                                              v_bias, out_weight, out_bias)) {  // no graph to record
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_forward(c, ln_weight, ln_bias, q_weight, q_bias, k_weight, k_bias, v_weight, v_bias, out_weight,
                        out_bias, num_heads, eps);
  }
  const variable_list outs = SummaryAttentionFunction::apply(c, ln_weight, ln_bias, q_weight, q_bias, k_weight,
                                                             k_bias, v_weight, v_bias, out_weight, out_bias,
                                                             num_heads, eps);
  return {outs[0], outs[1], outs[2], outs[3], outs[4], outs[5], outs[6]};
}

// Autocast runs the op in its dtype, as it would the projections the op replaces (a custom op has no
// autocast rule of its own), with the parameters' casts cached for the autocast region as for
// those; `out` comes back in the dtype of the residual sum c + out_proj(...). Float64 is left alone.
SummaryForward summary_attention_autocast(const Tensor& c, const Tensor& ln_weight, const Tensor& ln_bias,
                                          const Tensor& q_weight, const Tensor& q_bias, const Tensor& k_weight,
                                          const Tensor& k_bias, const Tensor& v_weight, const Tensor& v_bias,
                                          const Tensor& out_weight, const Tensor& out_bias, int64_t num_heads,
                                          double eps) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  if (c.scalar_type() == at::kDouble) {
    return call_forward(c, ln_weight, ln_bias, q_weight, q_bias, k_weight, k_bias, v_weight, v_bias, out_weight,
                        out_bias, num_heads, eps);
  }
  const c10::DeviceType device_type = c.device().type();
  const at::ScalarType dtype = at::autocast::get_autocast_dtype(device_type);
  const auto cast = [&](const Tensor& t) { return at::autocast::cached_cast(dtype, t, device_type); };
  SummaryForward outs = call_forward(cast(c), cast(ln_weight), cast(ln_bias), cast(q_weight), cast(q_bias),
                                     cast(k_weight), cast(k_bias), cast(v_weight), cast(v_bias), cast(out_weight),
                                     cast(out_bias), num_heads, eps);
  std::get<0>(outs) = std::get<0>(outs).to(at::promote_types(c.scalar_type(), dtype));
  return outs;
}

// The backward is not differentiable: with create_graph=True (a double backward) it would silently
// contribute nothing to the second derivative, so it refuses instead.
SummaryBackward summary_attention_backward_autograd(const Tensor& grad_out, const Tensor& c, const Tensor& normed,
                                                    const Tensor& qkv, const Tensor& heads_out, const Tensor& mean,
                                                    const Tensor& rstd, const Tensor& ln_weight,
                                                    const Tensor& qkv_params, const Tensor& out_weight,
                                                    int64_t num_heads) {
  TORCH_CHECK(!torch::autograd::compute_requires_grad(grad_out, c, normed, qkv, heads_out, mean, rstd, ln_weight,
                                                      qkv_params, out_weight),
              kNoDoubleBackward);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return call_backward({c, normed, qkv, heads_out, mean, rstd, ln_weight, qkv_params, out_weight}, grad_out,
                       num_heads);
}

}  // namespace

TORCH_LIBRARY(vitaclip, m) {
  m.set_python_module("vitaclip.ops.summary_ext");
  m.def(
      "summary_attention(Tensor c, Tensor ln_weight, Tensor ln_bias, Tensor q_weight, Tensor q_bias, "
      "Tensor k_weight, Tensor k_bias, Tensor v_weight, Tensor v_bias, Tensor out_weight, Tensor out_bias, "
      "int num_heads, float eps) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "summary_attention_backward(Tensor grad_out, Tensor c, Tensor normed, Tensor qkv, Tensor heads_out, "
      "Tensor mean, Tensor rstd, Tensor ln_weight, Tensor qkv_params, Tensor out_weight, int num_heads) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(vitaclip, Autograd, m) {
  m.impl("summary_attention", &summary_attention_autograd);
  m.impl("summary_attention_backward", &summary_attention_backward_autograd);
}

TORCH_LIBRARY_IMPL(vitaclip, AutocastCPU, m) { m.impl("summary_attention", &summary_attention_autocast); }
TORCH_LIBRARY_IMPL(vitaclip, AutocastCUDA, m) { m.impl("summary_attention", &summary_attention_autocast); }

}  // namespace vitaclip
