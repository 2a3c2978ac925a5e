// C ABI of RMSNorm (and of the residual add / gradient fused with it): validation, then the CPU
// reference or the CUDA kernels.
#include <cmath>
#include <cstdint>
#include <string>
#include <utility>

#include "common/device.h"
#include "rmsnorm/rmsnorm.h"

namespace {

using turbomoe::Arg;

void check_device_type(int32_t device_type) {
  if (device_type != TM_DEVICE_CPU && device_type != TM_DEVICE_CUDA) {
    turbomoe::invalid("device_type is " + std::to_string(device_type) +
                      ", expected TM_DEVICE_CPU (1) or TM_DEVICE_CUDA (2)");
  }
}

// Bounds the sizes so that no product below overflows.
constexpr int64_t kMaxHidden = int64_t{1} << 31;

size_t workspace_bytes_for(int64_t rows, int64_t hidden, int32_t device_type) {
  if (device_type == TM_DEVICE_CPU) return 0;  // the CPU accumulates straight into grad_weight
  return static_cast<size_t>(turbomoe::rmsnorm::backward_plan(rows, hidden).workspace_floats) *
         sizeof(float);
}

// x-like [R,H]: float32/bfloat16, last dim contiguous, H > 0 (the mean over no element is
// undefined).
void check_rows(const Arg& a) {
  a.dtype_in({TM_DTYPE_FLOAT32, TM_DTYPE_BFLOAT16}).ndim_is(2).rows_contiguous();
  if (a.size(1) == 0) turbomoe::invalid(std::string(a.name()) + " has an empty last dimension");
  if (a.size(1) > kMaxHidden) {
    turbomoe::invalid(std::string(a.name()) + " has a last dimension above 2^31");
  }
}

void check_weight(const std::optional<Arg>& w, int64_t hidden) {
  if (!w) return;
  w->dtype_in({TM_DTYPE_FLOAT32, TM_DTYPE_BFLOAT16})
      .ndim_is(1)
      .size_is(0, hidden, "the hidden size of x")
      .contiguous();
}

void check_rstd(const Arg& r, int64_t rows) {
  r.dtype_in({TM_DTYPE_FLOAT32}).ndim_is(1).size_is(0, rows, "the rows of x");
}

// The bytes a [R,H] rows-contiguous tensor's elements span.
std::pair<uintptr_t, uintptr_t> span_of(const Arg& a) {
  const auto begin = reinterpret_cast<uintptr_t>(a.data());
  if (a.size(0) == 0) return {begin, begin};
  const int64_t last = (a.size(0) - 1) * a.stride(0) + a.size(1);
  return {begin, begin + static_cast<uintptr_t>(last) * turbomoe::dtype_size(a.dtype())};
}

// An output written while `input` is still read (another thread's row, or a later pass of the
// same row) must not share memory with it.
void check_disjoint(const Arg& output, const Arg& input) {
  const auto [ob, oe] = span_of(output);
  const auto [ib, ie] = span_of(input);
  if (ob < ie && ib < oe) {
    turbomoe::invalid(std::string(output.name()) + " overlaps " + input.name());
  }
}

void check_eps(float eps) {
  if (!(std::isfinite(eps) && eps >= 0.0f)) {
    turbomoe::invalid("eps is " + std::to_string(eps) + ", expected a finite value >= 0");
  }
}

// tm_rmsnorm_forward, and tm_add_rmsnorm_forward when residual and sum are given.
void forward(const Arg& xa, const std::optional<Arg>& wa, float eps, const Arg& ya,
             const std::optional<Arg>& ra, const std::optional<turbomoe::rmsnorm::ResidualAdd>& add,
             void* stream, const char* entry) {
  check_rows(xa);
  check_rows(ya);
  ya.same_shape(xa);
  check_weight(wa, xa.size(1));
  if (ra) check_rstd(*ra, xa.size(0));
  check_eps(eps);
  const Arg* res = add ? &add->residual : nullptr;
  const Arg* sum = add ? &add->sum : nullptr;
  if (add) {
    for (const Arg* a : {res, sum}) {
      check_rows(*a);
      a->same_shape(xa).same_dtype(xa);
    }
    for (const Arg* out : {sum, &ya}) {
      check_disjoint(*out, xa);
      check_disjoint(*out, *res);
    }
    check_disjoint(ya, *sum);
  }
  const int32_t device =
      turbomoe::common_device({&xa, &ya, wa ? &*wa : nullptr, ra ? &*ra : nullptr, res, sum});
  turbomoe::require_cuda_build(device, entry);
  if (xa.size(0) == 0) return;
  if (device == TM_DEVICE_CPU) {
    turbomoe::rmsnorm::forward_cpu(xa, wa, eps, ya, ra, add);
  } else {
    TM_CUDA_ONLY(turbomoe::rmsnorm::forward_cuda(xa, wa, eps, ya, ra, add, stream));
  }
}

// tm_rmsnorm_backward, and tm_rmsnorm_backward_add when grad_residual is given.
void backward(const Arg& gy, const Arg& xa, const std::optional<Arg>& wa, const Arg& ra,
              const std::optional<Arg>& gr, const Arg& gx, const std::optional<Arg>& gw,
              void* workspace, size_t workspace_bytes, void* stream, const char* entry) {
  check_rows(xa);
  check_rows(gy);
  gy.same_shape(xa);
  check_rows(gx);
  gx.same_shape(xa);
  check_weight(wa, xa.size(1));
  check_rstd(ra, xa.size(0));
  if (gw) {
    if (!wa) turbomoe::invalid("grad_weight must be NULL when weight is NULL");
    gw->dtype_in({TM_DTYPE_FLOAT32}).ndim_is(1).size_is(0, xa.size(1), "the hidden size of x");
    gw->contiguous();
  }
  if (gr) {
    check_rows(*gr);
    gr->same_shape(xa).same_dtype(gx);
    check_disjoint(gx, *gr);
  }
  const int32_t device = turbomoe::common_device(
      {&gy, &xa, wa ? &*wa : nullptr, &ra, &gx, gw ? &*gw : nullptr, gr ? &*gr : nullptr});
  const size_t needed = gw ? workspace_bytes_for(xa.size(0), xa.size(1), device) : 0;
  turbomoe::check_workspace(workspace, workspace_bytes, needed,
                            "tm_rmsnorm_backward_workspace_size");
  turbomoe::require_cuda_build(device, entry);
  // Zero rows still overwrite grad_weight (with zeros), so only an empty grad_x without a
  // grad_weight is a no-op.
  if (xa.size(0) == 0 && !gw) return;
  if (device == TM_DEVICE_CPU) {
    turbomoe::rmsnorm::backward_cpu(gy, xa, wa, ra, gr, gx, gw);
  } else {
    TM_CUDA_ONLY(turbomoe::rmsnorm::backward_cuda(gy, xa, wa, ra, gr, gx, gw, workspace, stream));
  }
}

}  // namespace

extern "C" {

tm_status tm_rmsnorm_forward(const tm_tensor* x, const tm_tensor* weight, float eps, tm_tensor* y,
                             tm_tensor* rstd, void* stream) {
  return turbomoe::guard(__func__, [&] {
    const Arg xa(x, "x"), ya(y, "y");
    forward(xa, turbomoe::optional_arg(weight, "weight"), eps, ya,
            turbomoe::optional_arg(rstd, "rstd"), std::nullopt, stream, "tm_rmsnorm_forward");
  });
}

tm_status tm_add_rmsnorm_forward(const tm_tensor* x, const tm_tensor* residual,
                                 const tm_tensor* weight, float eps, tm_tensor* sum, tm_tensor* y,
                                 tm_tensor* rstd, void* stream) {
  return turbomoe::guard(__func__, [&] {
    const Arg xa(x, "x"), ya(y, "y");
    const turbomoe::rmsnorm::ResidualAdd add{Arg(residual, "residual"), Arg(sum, "sum")};
    forward(xa, turbomoe::optional_arg(weight, "weight"), eps, ya,
            turbomoe::optional_arg(rstd, "rstd"), add, stream, "tm_add_rmsnorm_forward");
  });
}

tm_status tm_rmsnorm_backward_workspace_size(int64_t rows, int64_t hidden, int32_t device_type,
                                             size_t* bytes) {
  return turbomoe::guard(__func__, [&] {
    if (bytes == nullptr) turbomoe::invalid("bytes is NULL");
    if (rows < 0) turbomoe::invalid("rows is " + std::to_string(rows) + ", expected >= 0");
    if (hidden < 0 || hidden > kMaxHidden) {
      turbomoe::invalid("hidden is " + std::to_string(hidden) + ", expected 0 .. 2^31");
    }
    check_device_type(device_type);
    *bytes = workspace_bytes_for(rows, hidden, device_type);
  });
}

tm_status tm_rmsnorm_backward(const tm_tensor* grad_y, const tm_tensor* x, const tm_tensor* weight,
                              const tm_tensor* rstd, tm_tensor* grad_x, tm_tensor* grad_weight,
                              void* workspace, size_t workspace_bytes, void* stream) {
  return turbomoe::guard(__func__, [&] {
    backward(Arg(grad_y, "grad_y"), Arg(x, "x"), turbomoe::optional_arg(weight, "weight"),
             Arg(rstd, "rstd"), std::nullopt, Arg(grad_x, "grad_x"),
             turbomoe::optional_arg(grad_weight, "grad_weight"), workspace, workspace_bytes, stream,
             "tm_rmsnorm_backward");
  });
}

tm_status tm_rmsnorm_backward_add(const tm_tensor* grad_y, const tm_tensor* x,
                                  const tm_tensor* weight, const tm_tensor* rstd,
                                  const tm_tensor* grad_residual, tm_tensor* grad_x,
                                  tm_tensor* grad_weight, void* workspace, size_t workspace_bytes,
                                  void* stream) {
  return turbomoe::guard(__func__, [&] {
    backward(Arg(grad_y, "grad_y"), Arg(x, "x"), turbomoe::optional_arg(weight, "weight"),
             Arg(rstd, "rstd"), turbomoe::optional_arg(grad_residual, "grad_residual"),
             Arg(grad_x, "grad_x"), turbomoe::optional_arg(grad_weight, "grad_weight"), workspace,
             workspace_bytes, stream, "tm_rmsnorm_backward_add");
  });
}

}  // extern "C"
