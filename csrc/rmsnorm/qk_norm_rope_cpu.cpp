// CPU reference of the fused q/k RMSNorm + RoPE: per row, the arithmetic of rmsnorm_cpu.cpp
// followed by that of rope_cpu.cpp (rotate_half form over the whole head), with the normalised
// row rounded to y's dtype in between as the two separate ops store and reload it, so the result
// is bitwise what tm_rmsnorm_forward + tm_rope_forward (and their backwards) give on the CPU.
#include <algorithm>
#include <cmath>
#include <vector>

#include "common/numeric.h"
#include "rmsnorm/qk_norm_rope.h"
#include "rope/rope_math.h"

namespace turbomoe::rmsnorm {
namespace {

// Row r of the contiguous [R, D] view of a [B,S,NH,D] tensor (or the whole of a [D] one).
void read_row(const Arg& a, int64_t r, int64_t d, std::vector<float>& dst) {
  dispatch_floating(a.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T* p = a.ptr<const T>() + (a.ndim() == 1 ? 0 : r * d);
    for (int64_t i = 0; i < d; ++i) dst[i] = to_float(p[i]);
  });
}

void write_row(const std::vector<float>& src, const Arg& a, int64_t r, int64_t d) {
  dispatch_floating(a.dtype(), [&](auto tag) {
    using T = decltype(tag);
    T* p = a.ptr<T>() + r * d;
    for (int64_t i = 0; i < d; ++i) p[i] = from_float<T>(src[i]);
  });
}

void round_to_dtype(int32_t dtype, std::vector<float>& v) {
  dispatch_floating(dtype, [&](auto tag) {
    using T = decltype(tag);
    for (float& f : v) f = to_float(from_float<T>(f));
  });
}

// cos/sin of the position of row r (head r % NH of position (r / NH) % S of batch r / (NH * S)).
void read_cos_sin(const Arg& cos, const Arg& sin, int64_t r, int64_t seq, int64_t heads,
                  std::vector<float>& c, std::vector<float>& s) {
  const int64_t pos = (r / heads) % seq, b = cos.size(0) == 1 ? 0 : r / (heads * seq);
  dispatch_floating(cos.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T* cp = cos.ptr<const T>() + b * cos.stride(0) + pos * cos.stride(1);
    const T* sp = sin.ptr<const T>() + b * sin.stride(0) + pos * sin.stride(1);
    for (size_t i = 0; i < c.size(); ++i) {
      c[i] = to_float(cp[static_cast<int64_t>(i) * cos.stride(2)]);
      s[i] = to_float(sp[static_cast<int64_t>(i) * sin.stride(2)]);
    }
  });
}

}  // namespace

void qk_norm_rope_forward_cpu(const Arg& x, const std::optional<Arg>& weight, float eps,
                              const Arg& cos, const Arg& sin, const Arg& y, const Arg& rstd) {
  const int64_t seq = x.size(1), heads = x.size(2), d = x.size(3), half = d / 2;
  const int64_t rows = x.size(0) * seq * heads;
  const size_t n = static_cast<size_t>(d);
  std::vector<float> w(n, 1.0f), row(n), c(n), s(n), out(n);
  if (weight) read_row(*weight, 0, d, w);
  for (int64_t r = 0; r < rows; ++r) {
    read_row(x, r, d, row);
    float sum_sq = 0.0f;
    for (float v : row) sum_sq += v * v;
    const float rs = 1.0f / std::sqrt(sum_sq / static_cast<float>(d) + eps);
    rstd.ptr<float>()[r * rstd.stride(0)] = rs;
    for (float& v : row) v *= rs;
    round_to_dtype(x.dtype(), row);
    for (size_t i = 0; i < n; ++i) row[i] *= w[i];
    round_to_dtype(y.dtype(), row);  // the normalised row as the RMSNorm op stores it
    read_cos_sin(cos, sin, r, seq, heads, c, s);
    for (int64_t k = 0; k < half; ++k) {
      rope::rotate(row[k], row[k + half], c[k], s[k], c[k + half], s[k + half], &out[k],
                   &out[k + half]);
    }
    write_row(out, y, r, d);
  }
}

void qk_norm_rope_backward_cpu(const Arg& grad_y, const Arg& x, const std::optional<Arg>& weight,
                               const Arg& rstd, const Arg& cos, const Arg& sin, const Arg& grad_x,
                               const std::optional<Arg>& grad_weight) {
  const int64_t seq = x.size(1), heads = x.size(2), d = x.size(3), half = d / 2;
  const int64_t rows = x.size(0) * seq * heads;
  const size_t n = static_cast<size_t>(d);
  std::vector<float> w(n, 1.0f), xr(n), gy(n), dy(n), dx(n), rounded(n), c(n), s(n);
  if (weight) read_row(*weight, 0, d, w);
  float* gw = grad_weight ? grad_weight->ptr<float>() : nullptr;
  if (gw != nullptr) std::fill(gw, gw + d, 0.0f);
  for (int64_t r = 0; r < rows; ++r) {
    read_row(x, r, d, xr);
    read_row(grad_y, r, d, gy);
    read_cos_sin(cos, sin, r, seq, heads, c, s);
    for (int64_t k = 0; k < half; ++k) {
      rope::rotate_transpose(gy[k], gy[k + half], c[k], s[k], c[k + half], s[k + half], &dy[k],
                             &dy[k + half]);
    }
    round_to_dtype(grad_y.dtype(), dy);  // RoPE's gradient as its backward stores it
    const float rs = rstd.ptr<const float>()[r * rstd.stride(0)];
    float dot = 0.0f;
    for (size_t i = 0; i < n; ++i) dot += dy[i] * w[i] * (xr[i] * rs);
    const float mean = dot / static_cast<float>(d);
    for (size_t i = 0; i < n; ++i) {
      const float nv = xr[i] * rs;
      dx[i] = rs * (dy[i] * w[i] - nv * mean);
      rounded[i] = nv;
    }
    write_row(dx, grad_x, r, d);
    if (gw == nullptr) continue;
    round_to_dtype(x.dtype(), rounded);
    for (size_t i = 0; i < n; ++i) gw[i] += dy[i] * rounded[i];
  }
}

}  // namespace turbomoe::rmsnorm
