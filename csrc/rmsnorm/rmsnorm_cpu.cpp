// CPU reference of RMSNorm: rows are converted to float32 once, normalised with float32
// arithmetic and converted back, so each element is read and written once.
#include <algorithm>
#include <cmath>
#include <vector>

#include "common/numeric.h"
#include "rmsnorm/rmsnorm.h"

namespace turbomoe::rmsnorm {
namespace {

// Row r of a [R,H] tensor (or the whole of a [H] one) as float32.
void read_row(const Arg& a, int64_t r, std::vector<float>& dst) {
  dispatch_floating(a.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T* p = a.ptr<const T>() + (a.ndim() == 2 ? r * a.stride(0) : 0);
    for (size_t i = 0; i < dst.size(); ++i) dst[i] = to_float(p[i]);
  });
}

void write_row(const std::vector<float>& src, const Arg& a, int64_t r) {
  dispatch_floating(a.dtype(), [&](auto tag) {
    using T = decltype(tag);
    T* p = a.ptr<T>() + r * a.stride(0);
    for (size_t i = 0; i < src.size(); ++i) p[i] = from_float<T>(src[i]);
  });
}

// What HF's `hidden.to(input_dtype)` does to the normalised values before the weight multiplies.
void round_to_dtype(int32_t dtype, std::vector<float>& v) {
  dispatch_floating(dtype, [&](auto tag) {
    using T = decltype(tag);
    for (float& f : v) f = to_float(from_float<T>(f));
  });
}

}  // namespace

void forward_cpu(const Arg& x, const std::optional<Arg>& weight, float eps, const Arg& y,
                 const std::optional<Arg>& rstd) {
  const int64_t rows = x.size(0), hidden = x.size(1);
  std::vector<float> w(static_cast<size_t>(hidden), 1.0f), row(w.size());
  if (weight) read_row(*weight, 0, w);
  for (int64_t r = 0; r < rows; ++r) {
    read_row(x, r, row);
    float sum_sq = 0.0f;
    for (float v : row) sum_sq += v * v;
    const float rs = 1.0f / std::sqrt(sum_sq / static_cast<float>(hidden) + eps);
    if (rstd) rstd->ptr<float>()[r * rstd->stride(0)] = rs;
    for (float& v : row) v *= rs;
    round_to_dtype(x.dtype(), row);
    for (size_t i = 0; i < row.size(); ++i) row[i] *= w[i];
    write_row(row, y, r);
  }
}

// With n = x * rstd and dn = dy * w: dx = rstd * (dn - n * mean(dn * n)); grad_weight sums
// dy * cast(n) over rows in ascending order.
void backward_cpu(const Arg& grad_y, const Arg& x, const std::optional<Arg>& weight,
                  const Arg& rstd, const Arg& grad_x, const std::optional<Arg>& grad_weight) {
  const int64_t rows = x.size(0), hidden = x.size(1);
  const size_t h = static_cast<size_t>(hidden);
  std::vector<float> w(h, 1.0f), xr(h), dy(h), dx(h), rounded(h);
  if (weight) read_row(*weight, 0, w);
  float* gw = grad_weight ? grad_weight->ptr<float>() : nullptr;
  if (gw != nullptr) std::fill(gw, gw + hidden, 0.0f);
  for (int64_t r = 0; r < rows; ++r) {
    read_row(x, r, xr);
    read_row(grad_y, r, dy);
    const float rs = rstd.ptr<const float>()[r * rstd.stride(0)];
    float dot = 0.0f;
    for (size_t i = 0; i < h; ++i) dot += dy[i] * w[i] * (xr[i] * rs);
    const float mean = dot / static_cast<float>(hidden);
    for (size_t i = 0; i < h; ++i) {
      const float n = xr[i] * rs;
      dx[i] = rs * (dy[i] * w[i] - n * mean);
      rounded[i] = n;
    }
    write_row(dx, grad_x, r);
    if (gw == nullptr) continue;
    round_to_dtype(x.dtype(), rounded);
    for (size_t i = 0; i < h; ++i) gw[i] += dy[i] * rounded[i];
  }
}

}  // namespace turbomoe::rmsnorm
