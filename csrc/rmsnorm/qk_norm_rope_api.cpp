// C ABI of the fused q/k RMSNorm + RoPE: validation, then the CPU reference or the CUDA kernels.
#include <cmath>
#include <cstdint>
#include <string>

#include "common/device.h"
#include "rmsnorm/qk_norm_rope.h"
#include "rmsnorm/rmsnorm.h"

namespace {

using turbomoe::Arg;

constexpr int64_t kVector = 8;  // elements a CUDA thread moves at once

// x-like [B,S,NH,D], float32/bfloat16, contiguous, D one of the head dims the kernels take.
void check_heads(const Arg& a) {
  a.dtype_in({TM_DTYPE_FLOAT32, TM_DTYPE_BFLOAT16}).ndim_is(4).contiguous();
  if (!turbomoe::rmsnorm::qk_norm_rope_head_dim_ok(a.size(3))) {
    turbomoe::invalid(std::string(a.name()) + " has shape " + turbomoe::shape_string(a.t()) +
                      ": the head dim (last dim) must be 64, 128 or 256");
  }
}

void check_weight(const std::optional<Arg>& w, const Arg& x) {
  if (!w) return;
  w->same_dtype(x).ndim_is(1).size_is(0, x.size(3), "the head dim of x").contiguous();
}

void check_rstd(const Arg& r, const Arg& x) {
  r.dtype_in({TM_DTYPE_FLOAT32})
      .ndim_is(1)
      .size_is(0, x.size(0) * x.size(1) * x.size(2), "the rows (B*S*NH) of x")
      .contiguous();
}

// cos/sin [B or 1, S, D], the rotate_half form over the whole head.
void check_cos_sin(const Arg& cos, const Arg& sin, const Arg& x) {
  cos.dtype_in({TM_DTYPE_FLOAT32, TM_DTYPE_BFLOAT16}).ndim_is(3).rows_contiguous();
  sin.same_dtype(cos).same_shape(cos).rows_contiguous();
  if (cos.size(0) != x.size(0) && cos.size(0) != 1) {
    turbomoe::invalid("cos has shape " + turbomoe::shape_string(cos.t()) + ": dim 0 must be " +
                      std::to_string(x.size(0)) + " (the batch of x) or 1");
  }
  cos.size_is(1, x.size(1), "the sequence length, dim 1, of x");
  cos.size_is(2, x.size(3), "the head dim of x (RoPE over the whole head)");
}

// The CUDA kernels read every row with 8-element vector accesses.
void check_vector_aligned(const Arg& a) {
  const uintptr_t align = static_cast<uintptr_t>(kVector) * turbomoe::dtype_size(a.dtype());
  bool ok = reinterpret_cast<uintptr_t>(a.data()) % align == 0;
  for (int d = 0; d + 1 < a.ndim(); ++d) ok = ok && a.stride(d) % kVector == 0;
  if (!ok) {
    turbomoe::invalid(std::string(a.name()) +
                      ": on CUDA its data and row strides must be multiples of 8 elements");
  }
}

void check_eps(float eps) {
  if (!(std::isfinite(eps) && eps >= 0.0f)) {
    turbomoe::invalid("eps is " + std::to_string(eps) + ", expected a finite value >= 0");
  }
}

}  // namespace

extern "C" {

tm_status tm_qk_norm_rope_forward(const tm_tensor* x, const tm_tensor* weight, float eps,
                                  const tm_tensor* cos, const tm_tensor* sin, tm_tensor* y,
                                  tm_tensor* rstd, void* stream) {
  return turbomoe::guard(__func__, [&] {
    const Arg xa(x, "x"), ca(cos, "cos"), sa(sin, "sin"), ya(y, "y"), ra(rstd, "rstd");
    const auto wa = turbomoe::optional_arg(weight, "weight");
    check_heads(xa);
    ya.same_dtype(xa).same_shape(xa).contiguous();
    check_weight(wa, xa);
    check_cos_sin(ca, sa, xa);
    check_rstd(ra, xa);
    check_eps(eps);
    const int32_t device = turbomoe::common_device({&xa, &ca, &sa, &ya, &ra, wa ? &*wa : nullptr});
    turbomoe::require_cuda_build(device, "tm_qk_norm_rope_forward");
    if (xa.numel() == 0) return;
    if (device == TM_DEVICE_CPU) {
      turbomoe::rmsnorm::qk_norm_rope_forward_cpu(xa, wa, eps, ca, sa, ya, ra);
      return;
    }
    for (const Arg* a : {&xa, &ya, &ca, &sa}) check_vector_aligned(*a);
    if (wa) check_vector_aligned(*wa);
    TM_CUDA_ONLY(turbomoe::rmsnorm::qk_norm_rope_forward_cuda(xa, wa, eps, ca, sa, ya, ra, stream));
  });
}

tm_status tm_qk_norm_rope_backward(const tm_tensor* grad_y, const tm_tensor* x,
                                   const tm_tensor* weight, const tm_tensor* rstd,
                                   const tm_tensor* cos, const tm_tensor* sin, tm_tensor* grad_x,
                                   tm_tensor* grad_weight, void* workspace, size_t workspace_bytes,
                                   void* stream) {
  return turbomoe::guard(__func__, [&] {
    const Arg gy(grad_y, "grad_y"), xa(x, "x"), ra(rstd, "rstd"), ca(cos, "cos"), sa(sin, "sin"),
        gx(grad_x, "grad_x");
    const auto wa = turbomoe::optional_arg(weight, "weight");
    const auto gw = turbomoe::optional_arg(grad_weight, "grad_weight");
    check_heads(xa);
    check_heads(gy);
    gy.same_shape(xa);
    gx.same_dtype(xa).same_shape(xa).contiguous();
    check_weight(wa, xa);
    check_rstd(ra, xa);
    check_cos_sin(ca, sa, xa);
    if (gw) {
      if (!wa) turbomoe::invalid("grad_weight must be NULL when weight is NULL");
      gw->dtype_in({TM_DTYPE_FLOAT32}).ndim_is(1).size_is(0, xa.size(3), "the head dim of x");
      gw->contiguous();
    }
    const int32_t device = turbomoe::common_device(
        {&gy, &xa, &ra, &ca, &sa, &gx, wa ? &*wa : nullptr, gw ? &*gw : nullptr});
    const int64_t rows = xa.size(0) * xa.size(1) * xa.size(2);
    size_t needed = 0;
    if (gw && device == TM_DEVICE_CUDA) {
      needed =
          static_cast<size_t>(turbomoe::rmsnorm::backward_plan(rows, xa.size(3)).workspace_floats) *
          sizeof(float);
    }
    turbomoe::check_workspace(workspace, workspace_bytes, needed,
                              "tm_rmsnorm_backward_workspace_size (rows B*S*NH, hidden D)");
    turbomoe::require_cuda_build(device, "tm_qk_norm_rope_backward");
    // Zero rows still overwrite grad_weight (with zeros).
    if (rows == 0 && !gw) return;
    if (device == TM_DEVICE_CPU) {
      turbomoe::rmsnorm::qk_norm_rope_backward_cpu(gy, xa, wa, ra, ca, sa, gx, gw);
      return;
    }
    for (const Arg* a : {&gy, &xa, &gx, &ca, &sa}) check_vector_aligned(*a);
    if (wa) check_vector_aligned(*wa);
    TM_CUDA_ONLY(turbomoe::rmsnorm::qk_norm_rope_backward_cuda(gy, xa, wa, ra, ca, sa, gx, gw,
                                                               workspace, stream));
  });
}

}  // extern "C"
