// CPU kernels of the summary attention (see summary_attention.h), accumulating in
// at::opmath_type (float for half/bfloat16/float, double for double).
#include "summary_attention.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace vitaclip {
namespace {

// q, k, v of one (group, head) with their biases (qkv_bias: [b_q | b_k | b_v]), each [T, Dh] row-major.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
struct HeadInputs {
  std::vector<acc_t> q, k, v;

  HeadInputs(const SummaryShape& s, const scalar_t* qkv, const scalar_t* qkv_bias, int64_t g, int64_t h) {
    const int64_t T = s.frames, Dh = s.head_dim(), C = s.width;
    q.resize(T * Dh);
    k.resize(T * Dh);
    v.resize(T * Dh);
    for (int64_t t = 0; t < T; ++t) {
      const scalar_t* row = qkv + (g * T + t) * 3 * C + h * Dh;
      const scalar_t* bias = qkv_bias + h * Dh;
      for (int64_t d = 0; d < Dh; ++d) {
        q[t * Dh + d] = acc_t(row[d]) + acc_t(bias[d]);
        k[t * Dh + d] = acc_t(row[C + d]) + acc_t(bias[C + d]);
        v[t * Dh + d] = acc_t(row[2 * C + d]) + acc_t(bias[2 * C + d]);
      }
    }
  }

  // Softmax(q k^T * scale), [T, T] row-major.
  std::vector<acc_t> probabilities(int64_t T, int64_t Dh) const {
    const acc_t scale = acc_t(1) / std::sqrt(acc_t(Dh));
    std::vector<acc_t> p(T * T);
    for (int64_t i = 0; i < T; ++i) {
      acc_t row_max = -std::numeric_limits<acc_t>::infinity();
      for (int64_t j = 0; j < T; ++j) {
        acc_t s = 0;
        for (int64_t d = 0; d < Dh; ++d) s += q[i * Dh + d] * k[j * Dh + d];
        p[i * T + j] = s * scale;
        row_max = std::max(row_max, p[i * T + j]);
      }
      acc_t sum = 0;
      for (int64_t j = 0; j < T; ++j) sum += (p[i * T + j] = std::exp(p[i * T + j] - row_max));
      for (int64_t j = 0; j < T; ++j) p[i * T + j] /= sum;
    }
    return p;
  }
};

// Calls fn(g, h, in, p) for every (group, head), in parallel: `in` holds the head's q, k, v with
// their biases, p [T, T] its attention probabilities.
template <typename scalar_t, typename Fn>
void for_each_head(const SummaryShape& s, const at::Tensor& qkv, const at::Tensor& qkv_bias, const Fn& fn) {
  at::parallel_for(0, s.groups * s.heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t gh = begin; gh < end; ++gh) {
      const int64_t g = gh / s.heads, h = gh % s.heads;
      const HeadInputs<scalar_t> in(s, qkv.data_ptr<scalar_t>(), qkv_bias.data_ptr<scalar_t>(), g, h);
      fn(g, h, in, in.probabilities(s.frames, s.head_dim()));
    }
  });
}

struct CpuKernels {
  static void check_sizes(const SummaryShape&) {}  // 64-bit sizes and indices throughout

  static void layer_norm_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                 double eps, const at::Tensor& normed, const at::Tensor& mean,
                                 const at::Tensor& rstd) {
    const int64_t rows = x.size(0), C = x.size(1);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "layer_norm_forward_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t *xp = x.data_ptr<scalar_t>(), *wp = weight.data_ptr<scalar_t>(),
                     *bp = bias.data_ptr<scalar_t>();
      scalar_t* yp = normed.data_ptr<scalar_t>();
      acc_t *mp = mean.data_ptr<acc_t>(), *rp = rstd.data_ptr<acc_t>();
      at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const scalar_t* row = xp + r * C;
          acc_t sum = 0, sq = 0;
          for (int64_t j = 0; j < C; ++j) sum += acc_t(row[j]);
          const acc_t mu = sum / C;
          for (int64_t j = 0; j < C; ++j) sq += (acc_t(row[j]) - mu) * (acc_t(row[j]) - mu);
          const acc_t inv = acc_t(1) / std::sqrt(sq / C + acc_t(eps));
          for (int64_t j = 0; j < C; ++j)
            yp[r * C + j] = scalar_t((acc_t(row[j]) - mu) * inv * acc_t(wp[j]) + acc_t(bp[j]));
          mp[r] = mu;
          rp[r] = inv;
        }
      });
    });
  }

  static void attention_forward(const SummaryShape& s, const at::Tensor& qkv, const at::Tensor& qkv_bias,
                                const at::Tensor& x, const at::Tensor& out_bias, const at::Tensor& heads_out,
                                const at::Tensor& residual) {
    const int64_t T = s.frames, Dh = s.head_dim(), C = s.width;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "attention_forward_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t *xp = x.data_ptr<scalar_t>(), *obp = out_bias.data_ptr<scalar_t>();
      scalar_t *op = heads_out.data_ptr<scalar_t>(), *rp = residual.data_ptr<scalar_t>();
      for_each_head<scalar_t>(s, qkv, qkv_bias, [&](int64_t g, int64_t h, const HeadInputs<scalar_t>& in,
                                                    const std::vector<acc_t>& p) {
        for (int64_t i = 0; i < T; ++i) {
          const int64_t base = (g * T + i) * C + h * Dh;
          for (int64_t d = 0; d < Dh; ++d) {
            acc_t o = 0;
            for (int64_t j = 0; j < T; ++j) o += p[i * T + j] * in.v[j * Dh + d];
            op[base + d] = scalar_t(o);
            rp[base + d] = scalar_t(acc_t(xp[base + d]) + acc_t(obp[h * Dh + d]));
          }
        }
      });
    });
  }

  static void attention_backward(const SummaryShape& s, const at::Tensor& qkv, const at::Tensor& qkv_bias,
                                 const at::Tensor& grad_heads, const at::Tensor& grad_qkv) {
    const int64_t T = s.frames, Dh = s.head_dim(), C = s.width;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, qkv.scalar_type(), "attention_backward_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const acc_t scale = acc_t(1) / std::sqrt(acc_t(Dh));
      const scalar_t* dop = grad_heads.data_ptr<scalar_t>();
      scalar_t* dqkv = grad_qkv.data_ptr<scalar_t>();
      for_each_head<scalar_t>(s, qkv, qkv_bias, [&](int64_t g, int64_t h, const HeadInputs<scalar_t>& in,
                                                    const std::vector<acc_t>& p) {
        auto grad_o = [&](int64_t i, int64_t d) { return acc_t(dop[(g * T + i) * C + h * Dh + d]); };
        // dS = P * (dP - rowsum(P * dP)) * scale, with dP = dO V^T.
        std::vector<acc_t> ds(T * T);
        for (int64_t i = 0; i < T; ++i) {
          acc_t row_dot = 0;
          for (int64_t j = 0; j < T; ++j) {
            acc_t dp = 0;
            for (int64_t d = 0; d < Dh; ++d) dp += grad_o(i, d) * in.v[j * Dh + d];
            ds[i * T + j] = dp;
            row_dot += p[i * T + j] * dp;
          }
          for (int64_t j = 0; j < T; ++j) ds[i * T + j] = p[i * T + j] * (ds[i * T + j] - row_dot) * scale;
        }
        for (int64_t i = 0; i < T; ++i) {
          scalar_t* row = dqkv + (g * T + i) * 3 * C + h * Dh;
          for (int64_t d = 0; d < Dh; ++d) {
            acc_t dq = 0, dk = 0, dv = 0;
            for (int64_t j = 0; j < T; ++j) {
              dq += ds[i * T + j] * in.k[j * Dh + d];
              dk += ds[j * T + i] * in.q[j * Dh + d];
              dv += p[j * T + i] * grad_o(j, d);
            }
            row[d] = scalar_t(dq);
            row[C + d] = scalar_t(dk);
            row[2 * C + d] = scalar_t(dv);
          }
        }
      });
    });
  }

  static void layer_norm_backward(const at::Tensor& grad_normed, const at::Tensor& grad_out,
                                  const at::Tensor& grad_qkv, const at::Tensor& x, const at::Tensor& mean,
                                  const at::Tensor& rstd, const at::Tensor& weight, const at::Tensor& grad_x,
                                  const at::Tensor& grad_weight, const at::Tensor& grad_bias,
                                  const at::Tensor& grad_qkv_bias, const at::Tensor& grad_out_bias) {
    const int64_t rows = x.size(0), C = x.size(1);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "layer_norm_backward_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t *dy = grad_normed.data_ptr<scalar_t>(), *dout = grad_out.data_ptr<scalar_t>(),
                     *dqkv = grad_qkv.data_ptr<scalar_t>(), *xp = x.data_ptr<scalar_t>(),
                     *wp = weight.data_ptr<scalar_t>();
      const acc_t *mp = mean.data_ptr<acc_t>(), *rp = rstd.data_ptr<acc_t>();
      auto xhat = [&](int64_t r, int64_t j) { return (acc_t(xp[r * C + j]) - mp[r]) * rp[r]; };
      // dx = dout (residual) + rstd * (w dy - mean(w dy) - xhat * mean(w dy xhat)), per row.
      scalar_t* dx = grad_x.data_ptr<scalar_t>();
      at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          acc_t a = 0, b = 0;
          for (int64_t j = 0; j < C; ++j) {
            const acc_t wdy = acc_t(wp[j]) * acc_t(dy[r * C + j]);
            a += wdy;
            b += wdy * xhat(r, j);
          }
          a /= C;
          b /= C;
          for (int64_t j = 0; j < C; ++j) {
            const acc_t wdy = acc_t(wp[j]) * acc_t(dy[r * C + j]);
            dx[r * C + j] = scalar_t(acc_t(dout[r * C + j]) + rp[r] * (wdy - a - xhat(r, j) * b));
          }
        }
      });
      // Column sums over all rows: LN weight and bias, the q/k/v biases and the out bias.
      scalar_t *dw = grad_weight.data_ptr<scalar_t>(), *db = grad_bias.data_ptr<scalar_t>(),
               *dqkv_b = grad_qkv_bias.data_ptr<scalar_t>(), *dout_b = grad_out_bias.data_ptr<scalar_t>();
      at::parallel_for(0, C, 16, [&](int64_t begin, int64_t end) {
        for (int64_t j = begin; j < end; ++j) {
          acc_t sw = 0, sb = 0, sq = 0, sk = 0, sv = 0, so = 0;
          for (int64_t r = 0; r < rows; ++r) {
            sw += acc_t(dy[r * C + j]) * xhat(r, j);
            sb += acc_t(dy[r * C + j]);
            sq += acc_t(dqkv[r * 3 * C + j]);
            sk += acc_t(dqkv[r * 3 * C + C + j]);
            sv += acc_t(dqkv[r * 3 * C + 2 * C + j]);
            so += acc_t(dout[r * C + j]);
          }
          dw[j] = scalar_t(sw);
          db[j] = scalar_t(sb);
          dqkv_b[j] = scalar_t(sq);
          dqkv_b[C + j] = scalar_t(sk);
          dqkv_b[2 * C + j] = scalar_t(sv);
          dout_b[j] = scalar_t(so);
        }
      });
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(vitaclip, CPU, m) {
  m.impl("summary_attention", &summary_attention_forward<CpuKernels>);
  m.impl("summary_attention_backward", &summary_attention_backward<CpuKernels>);
}

}  // namespace vitaclip
