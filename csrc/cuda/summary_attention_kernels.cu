// CUDA kernels of the summary attention (see ../summary_attention.h). Four launches besides the
// matmuls, none with atomics: LN forward (a block per row), attention forward and backward (a
// block per (group, head), q/k/v of the T frames in shared memory), and LN backward fused with
// all bias / LN-parameter gradients (blocks per row, then blocks per 32 columns).
// Everything accumulates in at::opmath_type (float; double for double).
#include "summary_attention_cuda.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <limits>

namespace vitaclip {
namespace {

constexpr int kThreads = 256;
constexpr int kAttentionThreads = 128;
constexpr int kWarp = 32;
constexpr int kColumnTile = 32;                          // columns per column-sum block
constexpr int kColumnRows = kThreads / kColumnTile;      // rows summed in parallel per column block

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v = max(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// Sum over the block; `scratch` holds kWarp values and is free again on return.
template <typename T>
__device__ T block_sum(T v, T* scratch) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int n_warps = (blockDim.x + kWarp - 1) / kWarp;
  v = warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = warp_sum(lane < n_warps ? scratch[lane] : T(0));
    if (lane == 0) scratch[0] = v;
  }
  __syncthreads();
  const T total = scratch[0];
  __syncthreads();
  return total;
}

template <typename scalar_t, typename acc_t>
__global__ void layer_norm_forward_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ weight,
                                          const scalar_t* __restrict__ bias, acc_t eps, int C,
                                          scalar_t* __restrict__ normed, acc_t* __restrict__ mean,
                                          acc_t* __restrict__ rstd) {
  __shared__ acc_t scratch[kWarp];
  const int64_t r = blockIdx.x;
  const scalar_t* row = x + r * C;
  acc_t sum = 0;
  for (int j = threadIdx.x; j < C; j += blockDim.x) sum += acc_t(row[j]);
  const acc_t mu = block_sum(sum, scratch) / C;
  acc_t sq = 0;
  for (int j = threadIdx.x; j < C; j += blockDim.x) {
    const acc_t d = acc_t(row[j]) - mu;
    sq += d * d;
  }
  const acc_t inv = acc_t(1) / sqrt(block_sum(sq, scratch) / C + eps);
  for (int j = threadIdx.x; j < C; j += blockDim.x)
    normed[r * C + j] = scalar_t((acc_t(row[j]) - mu) * inv * acc_t(weight[j]) + acc_t(bias[j]));
  if (threadIdx.x == 0) {
    mean[r] = mu;
    rstd[r] = inv;
  }
}

// Shared memory of one (group, head): T rows of Dh values each, padded to Dh + 1 so that
// threads reading consecutive rows hit different banks.
struct HeadLayout {
  int T, Dh, H, C;
  __host__ __device__ int ld() const { return Dh + 1; }
  __host__ __device__ int matrix() const { return T * ld(); }
};

// Loads q, k, v (+ biases, qkv_bias = [b_q | b_k | b_v]) of group g, head h from qkv [M, 3C] into
// shared memory as acc_t.
template <typename scalar_t, typename acc_t>
__device__ void load_qkv(const HeadLayout& L, const scalar_t* __restrict__ qkv, const scalar_t* __restrict__ qkv_bias,
                         int g, int h, acc_t* q, acc_t* k, acc_t* v) {
  for (int idx = threadIdx.x; idx < L.T * L.Dh; idx += blockDim.x) {
    const int t = idx / L.Dh, d = idx % L.Dh, col = h * L.Dh + d;
    const scalar_t* row = qkv + (int64_t(g) * L.T + t) * 3 * L.C + col;
    q[t * L.ld() + d] = acc_t(row[0]) + acc_t(qkv_bias[col]);
    k[t * L.ld() + d] = acc_t(row[L.C]) + acc_t(qkv_bias[L.C + col]);
    v[t * L.ld() + d] = acc_t(row[2 * L.C]) + acc_t(qkv_bias[2 * L.C + col]);
  }
}

// p [T, T] = softmax(q k^T * scale), one warp per row for the softmax. Ends synchronised.
template <typename acc_t>
__device__ void attention_probabilities(const HeadLayout& L, const acc_t* q, const acc_t* k, acc_t scale,
                                        acc_t* p) {
  for (int idx = threadIdx.x; idx < L.T * L.T; idx += blockDim.x) {
    const int i = idx / L.T, j = idx % L.T;
    acc_t s = 0;
    for (int d = 0; d < L.Dh; ++d) s += q[i * L.ld() + d] * k[j * L.ld() + d];
    p[idx] = s * scale;
  }
  __syncthreads();
  const int lane = threadIdx.x % kWarp, n_warps = blockDim.x / kWarp;
  for (int i = threadIdx.x / kWarp; i < L.T; i += n_warps) {
    acc_t* row = p + i * L.T;
    acc_t m = -INFINITY;
    for (int j = lane; j < L.T; j += kWarp) m = max(m, row[j]);
    m = warp_max(m);
    acc_t sum = 0;
    for (int j = lane; j < L.T; j += kWarp) sum += (row[j] = exp(row[j] - m));
    const acc_t inv = acc_t(1) / warp_sum(sum);
    for (int j = lane; j < L.T; j += kWarp) row[j] *= inv;
  }
  __syncthreads();
}

template <typename scalar_t, typename acc_t>
__global__ void attention_forward_kernel(HeadLayout L, const scalar_t* __restrict__ qkv,
                                         const scalar_t* __restrict__ qkv_bias, const scalar_t* __restrict__ x,
                                         const scalar_t* __restrict__ out_bias, acc_t scale,
                                         scalar_t* __restrict__ heads_out, scalar_t* __restrict__ residual) {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  acc_t* q = reinterpret_cast<acc_t*>(shared_bytes);
  acc_t* k = q + L.matrix();
  acc_t* v = k + L.matrix();
  acc_t* p = v + L.matrix();
  const int g = blockIdx.x / L.H, h = blockIdx.x % L.H;
  load_qkv(L, qkv, qkv_bias, g, h, q, k, v);
  __syncthreads();
  attention_probabilities(L, q, k, scale, p);
  for (int idx = threadIdx.x; idx < L.T * L.Dh; idx += blockDim.x) {
    const int i = idx / L.Dh, d = idx % L.Dh;
    acc_t o = 0;
    for (int j = 0; j < L.T; ++j) o += p[i * L.T + j] * v[j * L.ld() + d];
    const int64_t offset = (int64_t(g) * L.T + i) * L.C + h * L.Dh + d;
    heads_out[offset] = scalar_t(o);
    residual[offset] = scalar_t(acc_t(x[offset]) + acc_t(out_bias[h * L.Dh + d]));
  }
}

template <typename scalar_t, typename acc_t>
__global__ void attention_backward_kernel(HeadLayout L, const scalar_t* __restrict__ qkv,
                                          const scalar_t* __restrict__ qkv_bias,
                                          const scalar_t* __restrict__ grad_heads, acc_t scale,
                                          scalar_t* __restrict__ grad_qkv) {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  acc_t* q = reinterpret_cast<acc_t*>(shared_bytes);
  acc_t* k = q + L.matrix();
  acc_t* v = k + L.matrix();
  acc_t* dout = v + L.matrix();
  acc_t* p = dout + L.matrix();
  acc_t* ds = p + L.T * L.T;
  const int g = blockIdx.x / L.H, h = blockIdx.x % L.H;
  load_qkv(L, qkv, qkv_bias, g, h, q, k, v);
  for (int idx = threadIdx.x; idx < L.T * L.Dh; idx += blockDim.x) {
    const int t = idx / L.Dh, d = idx % L.Dh;
    dout[t * L.ld() + d] = acc_t(grad_heads[(int64_t(g) * L.T + t) * L.C + h * L.Dh + d]);
  }
  __syncthreads();
  attention_probabilities(L, q, k, scale, p);
  for (int idx = threadIdx.x; idx < L.T * L.T; idx += blockDim.x) {  // dP = dO V^T
    const int i = idx / L.T, j = idx % L.T;
    acc_t s = 0;
    for (int d = 0; d < L.Dh; ++d) s += dout[i * L.ld() + d] * v[j * L.ld() + d];
    ds[idx] = s;
  }
  __syncthreads();
  const int lane = threadIdx.x % kWarp, n_warps = blockDim.x / kWarp;
  for (int i = threadIdx.x / kWarp; i < L.T; i += n_warps) {  // dS = P (dP - rowsum(P dP)) scale
    acc_t dot = 0;
    for (int j = lane; j < L.T; j += kWarp) dot += p[i * L.T + j] * ds[i * L.T + j];
    dot = warp_sum(dot);
    for (int j = lane; j < L.T; j += kWarp) ds[i * L.T + j] = p[i * L.T + j] * (ds[i * L.T + j] - dot) * scale;
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < L.T * L.Dh; idx += blockDim.x) {
    const int i = idx / L.Dh, d = idx % L.Dh;
    acc_t dq = 0, dk = 0, dv = 0;
    for (int j = 0; j < L.T; ++j) {
      dq += ds[i * L.T + j] * k[j * L.ld() + d];
      dk += ds[j * L.T + i] * q[j * L.ld() + d];
      dv += p[j * L.T + i] * dout[j * L.ld() + d];
    }
    scalar_t* row = grad_qkv + (int64_t(g) * L.T + i) * 3 * L.C + h * L.Dh + d;
    row[0] = scalar_t(dq);
    row[L.C] = scalar_t(dk);
    row[2 * L.C] = scalar_t(dv);
  }
}

// Blocks [0, rows): dx of one row. Blocks after: sums over all rows of 32 columns of the
// concatenated [LN weight | LN bias | q/k/v biases | out bias] gradients (6C columns).
template <typename scalar_t, typename acc_t>
__global__ void layer_norm_backward_kernel(int rows, int C, const scalar_t* __restrict__ grad_normed,
                                           const scalar_t* __restrict__ grad_out,
                                           const scalar_t* __restrict__ grad_qkv, const scalar_t* __restrict__ x,
                                           const acc_t* __restrict__ mean, const acc_t* __restrict__ rstd,
                                           const scalar_t* __restrict__ weight, scalar_t* __restrict__ grad_x,
                                           scalar_t* __restrict__ grad_weight, scalar_t* __restrict__ grad_bias,
                                           scalar_t* __restrict__ grad_qkv_bias, scalar_t* __restrict__ grad_out_bias) {
  __shared__ acc_t scratch[kColumnRows][kColumnTile + 1];
  if (int(blockIdx.x) < rows) {  // dx = dout + rstd * (w dy - mean(w dy) - xhat * mean(w dy xhat))
    const int64_t r = blockIdx.x;
    const acc_t mu = mean[r], inv = rstd[r];
    acc_t a = 0, b = 0;
    for (int j = threadIdx.x; j < C; j += blockDim.x) {
      const acc_t wdy = acc_t(weight[j]) * acc_t(grad_normed[r * C + j]);
      a += wdy;
      b += wdy * (acc_t(x[r * C + j]) - mu) * inv;
    }
    a = block_sum(a, &scratch[0][0]) / C;
    b = block_sum(b, &scratch[0][0]) / C;
    for (int j = threadIdx.x; j < C; j += blockDim.x) {
      const acc_t wdy = acc_t(weight[j]) * acc_t(grad_normed[r * C + j]);
      const acc_t xhat = (acc_t(x[r * C + j]) - mu) * inv;
      grad_x[r * C + j] = scalar_t(acc_t(grad_out[r * C + j]) + inv * (wdy - a - xhat * b));
    }
    return;
  }
  const int lane = threadIdx.x % kColumnTile, row_lane = threadIdx.x / kColumnTile;
  const int col = (int(blockIdx.x) - rows) * kColumnTile + lane;
  acc_t sum = 0;
  if (col < 6 * C) {
    for (int r = row_lane; r < rows; r += kColumnRows) {
      if (col < C) {
        sum += acc_t(grad_normed[int64_t(r) * C + col]) * (acc_t(x[int64_t(r) * C + col]) - mean[r]) * rstd[r];
      } else if (col < 2 * C) {
        sum += acc_t(grad_normed[int64_t(r) * C + col - C]);
      } else if (col < 5 * C) {
        sum += acc_t(grad_qkv[int64_t(r) * 3 * C + col - 2 * C]);
      } else {
        sum += acc_t(grad_out[int64_t(r) * C + col - 5 * C]);
      }
    }
  }
  scratch[row_lane][lane] = sum;
  __syncthreads();
  if (row_lane != 0 || col >= 6 * C) return;
  for (int i = 1; i < kColumnRows; ++i) sum += scratch[i][lane];
  if (col < C) {
    grad_weight[col] = scalar_t(sum);
  } else if (col < 2 * C) {
    grad_bias[col - C] = scalar_t(sum);
  } else if (col < 5 * C) {
    grad_qkv_bias[col - 2 * C] = scalar_t(sum);
  } else {
    grad_out_bias[col - 5 * C] = scalar_t(sum);
  }
}

// in 32-bit ints: CudaKernels::check_sizes refused larger shapes before any launch
HeadLayout head_layout(const SummaryShape& s) {
  return HeadLayout{int(s.frames), int(s.head_dim()), int(s.heads), int(s.width)};
}

// Launches `kernel` with `bytes` of dynamic shared memory, opting in above the 48 KiB default.
template <typename Kernel, typename... Args>
void launch_attention(Kernel kernel, const SummaryShape& s, size_t bytes, Args... args) {
  if (bytes > 48 * 1024) {
    int device = 0, limit = 0;
    C10_CUDA_CHECK(cudaGetDevice(&device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    TORCH_CHECK_VALUE(bytes <= size_t(limit), "summary_attention: ", s.frames, " frames of head dim ",
                      s.head_dim(), " need ", bytes, " bytes of shared memory per block, the GPU has ", limit);
    // the device's most, not this call's: another thread's launch with a larger size may come in between
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, limit));
  }
  kernel<<<s.groups * s.heads, kAttentionThreads, bytes, c10::cuda::getCurrentCUDAStream()>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

// The kernels size and index a block's shared matrices (T x (Dh + 1), T x T), the grid (groups x
// heads blocks; a block per row in the LayerNorms, ceil(6C / kColumnTile) more in their backward) in
// 32-bit ints: refused, rather than wrapped, beyond, before any work is launched (such T are far past
// any GPU's shared memory, which the launch checks; the model sends those shapes to PyTorch).
void CudaKernels::check_sizes(const SummaryShape& s) {
  constexpr int64_t kMaxInt = std::numeric_limits<int>::max();
  TORCH_CHECK_VALUE(s.frames * s.frames <= kMaxInt / 8 && s.frames * (s.head_dim() + 1) <= kMaxInt / 8 &&
                        s.groups * s.heads <= kMaxInt && s.rows() + 6 * s.width <= kMaxInt,
                    "summary_attention: ", s.groups, " groups of ", s.frames, " frames, ", s.heads,
                    " heads of dim ", s.head_dim(), ": beyond the CUDA kernels' 32-bit sizes");
}

bool CudaKernels::runs_on(int64_t device) {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || device < 0 || device >= count) {
    (void)cudaGetLastError();
    return false;
  }
  // torch's guard: it makes no context on the device it returns to when there was none
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  // fails (no kernel image) where neither machine code for the GPU nor PTX it can compile was built
  cudaFuncAttributes attributes;
  const cudaError_t found = cudaFuncGetAttributes(&attributes, layer_norm_forward_kernel<float, float>);
  (void)cudaGetLastError();
  return found == cudaSuccess;
}

void CudaKernels::layer_norm_forward(const at::TensorBase& x, const at::TensorBase& weight,
                                     const at::TensorBase& bias, double eps, const at::TensorBase& normed,
                                     const at::TensorBase& mean, const at::TensorBase& rstd) {
  const int rows = int(x.size(0)), C = int(x.size(1));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "layer_norm_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    layer_norm_forward_kernel<scalar_t, acc_t><<<rows, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        x.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), bias.data_ptr<scalar_t>(), acc_t(eps), C,
        normed.data_ptr<scalar_t>(), mean.data_ptr<acc_t>(), rstd.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void CudaKernels::attention_forward(const SummaryShape& s, const at::TensorBase& qkv, const at::TensorBase& qkv_bias,
                                    const at::TensorBase& x, const at::TensorBase& out_bias,
                                    const at::TensorBase& heads_out, const at::TensorBase& residual) {
  const HeadLayout L = head_layout(s);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "attention_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const size_t bytes = size_t(3 * L.matrix() + L.T * L.T) * sizeof(acc_t);
    launch_attention(attention_forward_kernel<scalar_t, acc_t>, s, bytes, L, qkv.data_ptr<scalar_t>(),
                     qkv_bias.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), out_bias.data_ptr<scalar_t>(),
                     acc_t(1 / std::sqrt(double(L.Dh))), heads_out.data_ptr<scalar_t>(),
                     residual.data_ptr<scalar_t>());
  });
}

void CudaKernels::attention_backward(const SummaryShape& s, const at::TensorBase& qkv,
                                     const at::TensorBase& qkv_bias, const at::TensorBase& grad_heads,
                                     const at::TensorBase& grad_qkv) {
  const HeadLayout L = head_layout(s);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, qkv.scalar_type(), "attention_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const size_t bytes = size_t(4 * L.matrix() + 2 * L.T * L.T) * sizeof(acc_t);
    launch_attention(attention_backward_kernel<scalar_t, acc_t>, s, bytes, L, qkv.data_ptr<scalar_t>(),
                     qkv_bias.data_ptr<scalar_t>(), grad_heads.data_ptr<scalar_t>(), acc_t(1 / std::sqrt(double(L.Dh))),
                     grad_qkv.data_ptr<scalar_t>());
  });
}

void CudaKernels::layer_norm_backward(const at::TensorBase& grad_normed, const at::TensorBase& grad_out,
                                      const at::TensorBase& grad_qkv, const at::TensorBase& x,
                                      const at::TensorBase& mean, const at::TensorBase& rstd,
                                      const at::TensorBase& weight, const at::TensorBase& grad_x,
                                      const at::TensorBase& grad_weight, const at::TensorBase& grad_bias,
                                      const at::TensorBase& grad_qkv_bias, const at::TensorBase& grad_out_bias) {
  const int rows = int(x.size(0)), C = int(x.size(1));
  const int blocks = rows + (6 * C + kColumnTile - 1) / kColumnTile;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "layer_norm_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    layer_norm_backward_kernel<scalar_t, acc_t><<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        rows, C, grad_normed.data_ptr<scalar_t>(), grad_out.data_ptr<scalar_t>(), grad_qkv.data_ptr<scalar_t>(),
        x.data_ptr<scalar_t>(), mean.data_ptr<acc_t>(), rstd.data_ptr<acc_t>(), weight.data_ptr<scalar_t>(),
        grad_x.data_ptr<scalar_t>(), grad_weight.data_ptr<scalar_t>(), grad_bias.data_ptr<scalar_t>(),
        grad_qkv_bias.data_ptr<scalar_t>(), grad_out_bias.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace vitaclip
