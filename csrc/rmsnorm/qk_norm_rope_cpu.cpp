// CPU reference of the fused q/k RMSNorm + RoPE: per row, RMSNorm's row arithmetic
// (row_math_cpu.h) and then RoPE's (rope_math.h, rotate_half form over the whole head), with the
// normalised row rounded to y's dtype in between as the two separate ops store and reload it, so
// the result is bitwise what tm_rmsnorm_forward + tm_rope_forward (and their backwards) give on
// the CPU.
#include <algorithm>
#include <vector>

#include "common/numeric.h"
#include "rmsnorm/qk_norm_rope.h"
#include "rmsnorm/row_math_cpu.h"
#include "rope/rope_math.h"

namespace turbomoe::rmsnorm {
namespace {

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
  if (weight) cpu::read_row(*weight, 0, w);
  for (int64_t r = 0; r < rows; ++r) {
    cpu::read_row(x, r * d, row);
    rstd.ptr<float>()[r * rstd.stride(0)] = cpu::normalise(row, w, eps, x.dtype());
    cpu::round_to_dtype(y.dtype(), row);  // the normalised row as the RMSNorm op stores it
    read_cos_sin(cos, sin, r, seq, heads, c, s);
    for (int64_t k = 0; k < half; ++k) {
      rope::rotate(row[k], row[k + half], c[k], s[k], c[k + half], s[k + half], &out[k],
                   &out[k + half]);
    }
    cpu::write_row(out, y, r * d);
  }
}

void qk_norm_rope_backward_cpu(const Arg& grad_y, const Arg& x, const std::optional<Arg>& weight,
                               const Arg& rstd, const Arg& cos, const Arg& sin, const Arg& grad_x,
                               const std::optional<Arg>& grad_weight) {
  const int64_t seq = x.size(1), heads = x.size(2), d = x.size(3), half = d / 2;
  const int64_t rows = x.size(0) * seq * heads;
  const size_t n = static_cast<size_t>(d);
  std::vector<float> w(n, 1.0f), xr(n), gy(n), dy(n), dx(n), scratch(n), c(n), s(n);
  if (weight) cpu::read_row(*weight, 0, w);
  float* gw = grad_weight ? grad_weight->ptr<float>() : nullptr;
  if (gw != nullptr) std::fill(gw, gw + d, 0.0f);
  for (int64_t r = 0; r < rows; ++r) {
    cpu::read_row(x, r * d, xr);
    cpu::read_row(grad_y, r * d, gy);
    read_cos_sin(cos, sin, r, seq, heads, c, s);
    for (int64_t k = 0; k < half; ++k) {
      rope::rotate_transpose(gy[k], gy[k + half], c[k], s[k], c[k + half], s[k + half], &dy[k],
                             &dy[k + half]);
    }
    cpu::round_to_dtype(grad_y.dtype(), dy);  // RoPE's gradient as its backward stores it
    const float rs = rstd.ptr<const float>()[r * rstd.stride(0)];
    cpu::backward(xr, dy, w, rs, x.dtype(), dx, scratch, gw);
    cpu::write_row(dx, grad_x, r * d);
  }
}

}  // namespace turbomoe::rmsnorm
