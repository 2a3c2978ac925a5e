// C ABI of the gated activations: validation, then the CPU reference or the CUDA kernels.
#include <cmath>
#include <string>

#include "activation/activation.h"
#include "common/device.h"

namespace {

using turbomoe::Arg;

void check_matrix(const Arg& a) { a.floating().ndim_is(2); }

}  // namespace

namespace turbomoe::activation {

const tm_swiglu_params& check_swiglu_params(const tm_swiglu_params* params) {
  const auto& p = turbomoe::check_params(params, "params");
  if (p.variant != TM_SWIGLU_SILU && p.variant != TM_SWIGLU_CLAMPED) {
    turbomoe::invalid("params.variant is " + std::to_string(p.variant) +
                      ", expected TM_SWIGLU_SILU (1) or TM_SWIGLU_CLAMPED (2)");
  }
  if (p.variant == TM_SWIGLU_CLAMPED && !(p.limit > 0.0f && std::isfinite(p.alpha))) {
    turbomoe::invalid("params.limit must be > 0 and params.alpha finite for TM_SWIGLU_CLAMPED");
  }
  return p;
}

}  // namespace turbomoe::activation

extern "C" {

tm_status tm_swiglu_forward(const tm_swiglu_params* params, const tm_tensor* gate,
                            const tm_tensor* up, tm_tensor* out, void* stream) {
  return turbomoe::guard(__func__, [&] {
    const auto& p = turbomoe::activation::check_swiglu_params(params);
    const Arg g(gate, "gate"), u(up, "up"), o(out, "out");
    check_matrix(g);
    u.floating().same_shape(g).same_dtype(g);
    o.floating().same_shape(g);
    const int32_t device = turbomoe::common_device({&g, &u, &o});
    turbomoe::require_cuda_build(device, "tm_swiglu_forward");
    if (g.numel() == 0) return;
    if (device == TM_DEVICE_CPU) {
      turbomoe::activation::swiglu_forward_cpu(p, g, u, o);
    } else {
      TM_CUDA_ONLY(turbomoe::activation::swiglu_forward_cuda(p, g, u, o, stream));
    }
  });
}

tm_status tm_swiglu_backward(const tm_swiglu_params* params, const tm_tensor* grad_out,
                             const tm_tensor* gate, const tm_tensor* up, tm_tensor* grad_gate,
                             tm_tensor* grad_up, void* stream) {
  return turbomoe::guard(__func__, [&] {
    const auto& p = turbomoe::activation::check_swiglu_params(params);
    const Arg go(grad_out, "grad_out"), g(gate, "gate"), u(up, "up");
    const Arg gg(grad_gate, "grad_gate"), gu(grad_up, "grad_up");
    check_matrix(g);
    u.floating().same_shape(g).same_dtype(g);
    go.floating().same_shape(g);
    gg.floating().same_shape(g);
    gu.floating().same_shape(g).same_dtype(gg);
    const int32_t device = turbomoe::common_device({&go, &g, &u, &gg, &gu});
    turbomoe::require_cuda_build(device, "tm_swiglu_backward");
    if (g.numel() == 0) return;
    if (device == TM_DEVICE_CPU) {
      turbomoe::activation::swiglu_backward_cpu(p, go, g, u, gg, gu);
    } else {
      TM_CUDA_ONLY(turbomoe::activation::swiglu_backward_cuda(p, go, g, u, gg, gu, stream));
    }
  });
}

tm_status tm_swiglu_weighted_backward(const tm_swiglu_params* params, const tm_tensor* grad_rows,
                                      const tm_tensor* gate, const tm_tensor* up,
                                      const tm_tensor* row_weights, tm_tensor* grad_gate,
                                      tm_tensor* grad_up, tm_tensor* weighted_act,
                                      tm_tensor* grad_weights, void* stream) {
  return turbomoe::guard(__func__, [&] {
    const auto& p = turbomoe::activation::check_swiglu_params(params);
    const Arg gr(grad_rows, "grad_rows"), g(gate, "gate"), u(up, "up");
    const Arg w(row_weights, "row_weights"), gg(grad_gate, "grad_gate"), gu(grad_up, "grad_up");
    const Arg gw(grad_weights, "grad_weights");
    const auto wa = turbomoe::optional_arg(weighted_act, "weighted_act");
    check_matrix(g);
    u.floating().same_shape(g).same_dtype(g);
    gr.floating().same_shape(g).same_dtype(g);
    gg.floating().same_shape(g).same_dtype(g);
    gu.floating().same_shape(g).same_dtype(g);
    if (wa) wa->floating().same_shape(g).same_dtype(g);
    w.floating().ndim_is(1).size_is(0, g.size(0), "rows of gate");
    gw.dtype_in({TM_DTYPE_FLOAT32}).ndim_is(1).size_is(0, g.size(0), "rows of gate");
    const int32_t device =
        turbomoe::common_device({&gr, &g, &u, &w, &gg, &gu, wa ? &*wa : nullptr, &gw});
    turbomoe::require_cuda_build(device, "tm_swiglu_weighted_backward");
    if (g.size(0) == 0) return;
    const Arg* wa_arg = wa ? &*wa : nullptr;
    if (device == TM_DEVICE_CPU) {
      turbomoe::activation::swiglu_weighted_backward_cpu(p, gr, g, u, w, gg, gu, wa_arg, gw);
    } else {
      TM_CUDA_ONLY(turbomoe::activation::swiglu_weighted_backward_cuda(p, gr, g, u, w, gg, gu,
                                                                       wa_arg, gw, stream));
    }
  });
}

}  // extern "C"
