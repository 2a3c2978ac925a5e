// The per-pair math of RoPE, shared by the CPU reference and the CUDA kernels. Each of the R/2
// rotated pairs k of a head is read from two positions of x and written to two positions of out;
// the backward reads the output positions of grad_out and writes the input positions of grad_x.
#pragma once

#include <cstdint>

#include "common/host_device.h"

namespace turbomoe::rope {

struct PairIndex {
  int64_t in1, in2;    // dims of x holding the pair
  int64_t out1, out2;  // dims of out receiving it
  int64_t cs1, cs2;    // cos/sin columns used for out1 and out2
};

// rotate_half form: pair (k, k + R/2) stays in place, each half with its own cos/sin column.
// Interleaved (HF DeepSeek-V3 apply_rotary_pos_emb_interleave): pair (2k, 2k + 1) is written to
// (k, k + R/2), both rotated by column k (HF reads only the first half of cos/sin).
TM_HOST_DEVICE PairIndex pair_index(bool interleaved, int64_t k, int64_t half) {
  if (interleaved) return {2 * k, 2 * k + 1, k, k + half, k, k};
  return {k, k + half, k, k + half, k, k + half};
}

// Forward: y1 = x1 c1 - x2 s1, y2 = x2 c2 + x1 s2.
TM_HOST_DEVICE void rotate(float x1, float x2, float c1, float s1, float c2, float s2, float* y1,
                           float* y2) {
  *y1 = x1 * c1 - x2 * s1;
  *y2 = x2 * c2 + x1 * s2;
}

// Transpose of rotate, exact even when the cos/sin of the two halves differ.
TM_HOST_DEVICE void rotate_transpose(float dy1, float dy2, float c1, float s1, float c2, float s2,
                                     float* dx1, float* dx2) {
  *dx1 = c1 * dy1 + s2 * dy2;
  *dx2 = c2 * dy2 - s1 * dy1;
}

}  // namespace turbomoe::rope
