// The CPU references' row arithmetic of RMSNorm, shared by tm_rmsnorm_* (rmsnorm_cpu.cpp) and
// tm_qk_norm_rope_* (qk_norm_rope_cpu.cpp) so that the fused reference is the same arithmetic as
// the op it fuses: rows are converted to float32 once, normalised in float32, converted back.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "common/numeric.h"
#include "common/tensor.h"

namespace turbomoe::rmsnorm::cpu {

// dst.size() elements of a from element `offset` on, as float32.
inline void read_row(const Arg& a, int64_t offset, std::vector<float>& dst) {
  dispatch_floating(a.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T* p = a.ptr<const T>() + offset;
    for (size_t i = 0; i < dst.size(); ++i) dst[i] = to_float(p[i]);
  });
}

inline void write_row(const std::vector<float>& src, const Arg& a, int64_t offset) {
  dispatch_floating(a.dtype(), [&](auto tag) {
    using T = decltype(tag);
    T* p = a.ptr<T>() + offset;
    for (size_t i = 0; i < src.size(); ++i) p[i] = from_float<T>(src[i]);
  });
}

// What a cast to dtype and back does to each value (HF's `hidden.to(input_dtype)`).
inline void round_to_dtype(int32_t dtype, std::vector<float>& v) {
  dispatch_floating(dtype, [&](auto tag) {
    using T = decltype(tag);
    for (float& f : v) f = to_float(from_float<T>(f));
  });
}

// row := w * cast(row * rstd) in x's dtype; returns rstd = 1 / sqrt(mean(row²) + eps).
inline float normalise(std::vector<float>& row, const std::vector<float>& w, float eps,
                       int32_t x_dtype) {
  float sum_sq = 0.0f;
  for (float v : row) sum_sq += v * v;
  const float rs = 1.0f / std::sqrt(sum_sq / static_cast<float>(row.size()) + eps);
  for (float& v : row) v *= rs;
  round_to_dtype(x_dtype, row);
  for (size_t i = 0; i < row.size(); ++i) row[i] *= w[i];
  return rs;
}

// With n = x * rstd and dn = dy * w: dx = rstd * (dn - n * mean(dn * n)); adds dy * cast(n) to
// gw (the weight's gradient, rows in ascending order) unless it is null. n is scratch space.
inline void backward(const std::vector<float>& x, const std::vector<float>& dy,
                     const std::vector<float>& w, float rs, int32_t x_dtype, std::vector<float>& dx,
                     std::vector<float>& n, float* gw) {
  const size_t h = x.size();
  float dot = 0.0f;
  for (size_t i = 0; i < h; ++i) dot += dy[i] * w[i] * (x[i] * rs);
  const float mean = dot / static_cast<float>(h);
  for (size_t i = 0; i < h; ++i) {
    n[i] = x[i] * rs;
    dx[i] = rs * (dy[i] * w[i] - n[i] * mean);
  }
  if (gw == nullptr) return;
  round_to_dtype(x_dtype, n);
  for (size_t i = 0; i < h; ++i) gw[i] += dy[i] * n[i];
}

}  // namespace turbomoe::rmsnorm::cpu
