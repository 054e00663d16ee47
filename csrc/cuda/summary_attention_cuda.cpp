// Registers the CUDA implementation: the shared order of work with the CUDA kernels.
#include <torch/library.h>

#include "../summary_attention.h"
#include "summary_attention_cuda.h"

namespace vitaclip {

// Python asks once per GPU, to send GPUs the build has no code for to the PyTorch path.
TORCH_LIBRARY_FRAGMENT(vitaclip, m) { m.def("cuda_kernels_run_on(int device) -> bool", &CudaKernels::runs_on); }

TORCH_LIBRARY_IMPL(vitaclip, CUDA, m) {
  m.impl("summary_attention", &summary_attention_forward<CudaKernels>);
  m.impl("summary_attention_backward", &summary_attention_backward<CudaKernels>);
}

}  // namespace vitaclip
