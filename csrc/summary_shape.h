// Sizes of one summary-attention call; free of ATen so that the CUDA kernels compile fast.
#pragma once

#include <cstdint>

namespace vitaclip {

// c is [groups, frames, width]; row g * frames + t of the flattened [rows, width] is frame t of group g.
struct SummaryShape {
  int64_t groups;
  int64_t frames;
  int64_t width;
  int64_t heads;
  int64_t head_dim() const { return width / heads; }
  int64_t rows() const { return groups * frames; }
};

}  // namespace vitaclip
