// CPU reference of RMSNorm (with the residual add before it or the residual gradient after its
// backward, when given): rows are converted to float32 once, normalised with float32
// arithmetic and converted back, so each element is read and written once (row_math_cpu.h).
#include <algorithm>
#include <vector>

#include "rmsnorm/rmsnorm.h"
#include "rmsnorm/row_math_cpu.h"

namespace turbomoe::rmsnorm {

void forward_cpu(const Arg& x, const std::optional<Arg>& weight, float eps, const Arg& y,
                 const std::optional<Arg>& rstd, const std::optional<ResidualAdd>& add) {
  const int64_t rows = x.size(0), hidden = x.size(1);
  std::vector<float> w(static_cast<size_t>(hidden), 1.0f), row(w.size()), res(w.size());
  if (weight) cpu::read_row(*weight, 0, w);
  for (int64_t r = 0; r < rows; ++r) {
    cpu::read_row(x, r * x.stride(0), row);
    if (add) {
      cpu::read_row(add->residual, r * add->residual.stride(0), res);
      for (size_t i = 0; i < row.size(); ++i) row[i] += res[i];
      cpu::round_to_dtype(x.dtype(), row);
      cpu::write_row(row, add->sum, r * add->sum.stride(0));
    }
    const float rs = cpu::normalise(row, w, eps, x.dtype());
    if (rstd) rstd->ptr<float>()[r * rstd->stride(0)] = rs;
    cpu::write_row(row, y, r * y.stride(0));
  }
}

void backward_cpu(const Arg& grad_y, const Arg& x, const std::optional<Arg>& weight,
                  const Arg& rstd, const std::optional<Arg>& grad_residual, const Arg& grad_x,
                  const std::optional<Arg>& grad_weight) {
  const int64_t rows = x.size(0), hidden = x.size(1);
  const size_t h = static_cast<size_t>(hidden);
  std::vector<float> w(h, 1.0f), xr(h), dy(h), dx(h), n(h), res(h);
  if (weight) cpu::read_row(*weight, 0, w);
  float* gw = grad_weight ? grad_weight->ptr<float>() : nullptr;
  if (gw != nullptr) std::fill(gw, gw + hidden, 0.0f);
  for (int64_t r = 0; r < rows; ++r) {
    cpu::read_row(x, r * x.stride(0), xr);
    cpu::read_row(grad_y, r * grad_y.stride(0), dy);
    const float rs = rstd.ptr<const float>()[r * rstd.stride(0)];
    cpu::backward(xr, dy, w, rs, x.dtype(), dx, n, gw);
    if (grad_residual) {
      cpu::round_to_dtype(grad_x.dtype(), dx);
      cpu::read_row(*grad_residual, r * grad_residual->stride(0), res);
      for (size_t i = 0; i < h; ++i) dx[i] += res[i];
    }
    cpu::write_row(dx, grad_x, r * grad_x.stride(0));
  }
}

}  // namespace turbomoe::rmsnorm
