// C ABI of the AdamW step: validation, then the CPU reference or the CUDA kernel.
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <string>

#include "common/device.h"
#include "optim/adamw.h"

namespace {

using turbomoe::Arg;

void finite_in(double value, const char* name, double low, double high) {
  if (!(std::isfinite(value) && value >= low && value <= high)) {
    turbomoe::invalid(std::string("params.") + name + " is " + std::to_string(value) +
                      ", expected a finite value in [" + std::to_string(low) + ", " +
                      std::to_string(high) + "]");
  }
}

turbomoe::optim::AdamwConstants constants(const tm_adamw_params& p) {
  finite_in(p.lr, "lr", 0.0, HUGE_VAL);
  finite_in(p.beta1, "beta1", 0.0, 1.0);
  finite_in(p.beta2, "beta2", 0.0, 1.0);
  finite_in(p.eps, "eps", 0.0, HUGE_VAL);
  finite_in(p.weight_decay, "weight_decay", 0.0, HUGE_VAL);
  if (p.beta1 >= 1.0 || p.beta2 >= 1.0) turbomoe::invalid("params.beta1 and beta2 must be < 1");
  if (p.step < 1) {
    turbomoe::invalid("params.step is " + std::to_string(p.step) +
                      ", expected the 1-based count of this step");
  }
  // Double on the host, float32 on the device: how torch turns the Python scalars of
  // turbomoe.train.optim.AdamW's tensor ops into operands.
  const double step = static_cast<double>(p.step);
  turbomoe::optim::AdamwConstants c{};
  c.lerp_weight = static_cast<float>(1.0 - p.beta1);
  c.beta2 = static_cast<float>(p.beta2);
  c.one_minus_beta2 = static_cast<float>(1.0 - p.beta2);
  c.bias_correction1 = static_cast<float>(1.0 - std::pow(p.beta1, step));
  c.bias_correction2 = static_cast<float>(1.0 - std::pow(p.beta2, step));
  c.eps = static_cast<float>(p.eps);
  c.decay = static_cast<float>(1.0 - p.lr * p.weight_decay);
  c.neg_lr = static_cast<float>(-p.lr);
  c.apply_decay = p.weight_decay != 0.0;
  if (c.bias_correction1 <= 0.0f || c.bias_correction2 <= 0.0f) {
    turbomoe::invalid("params.beta1/beta2 are 0 at this step: no bias correction is defined");
  }
  return c;
}

// The step reads and writes every tensor element by element: overlapping storage would mix a
// moment into another tensor's update.
void disjoint(std::initializer_list<const Arg*> args) {
  for (const Arg* a : args) {
    for (const Arg* b : args) {
      if (a >= b || a->numel() == 0) continue;
      const auto begin_a = reinterpret_cast<uintptr_t>(a->data());
      const auto begin_b = reinterpret_cast<uintptr_t>(b->data());
      const uintptr_t end_a = begin_a + a->numel() * turbomoe::dtype_size(a->dtype());
      const uintptr_t end_b = begin_b + b->numel() * turbomoe::dtype_size(b->dtype());
      if (begin_a < end_b && begin_b < end_a) {
        turbomoe::invalid(std::string(a->name()) + " and " + b->name() + " share memory");
      }
    }
  }
}

}  // namespace

extern "C" {

tm_status tm_adamw_step(const tm_adamw_params* params, tm_tensor* param, const tm_tensor* grad,
                        tm_tensor* exp_avg, tm_tensor* exp_avg_sq, const tm_tensor* grad_scale,
                        void* stream) {
  return turbomoe::guard(__func__, [&] {
    const auto c = constants(turbomoe::check_params(params, "params"));
    const Arg p(param, "param"), g(grad, "grad"), m(exp_avg, "exp_avg"),
        v(exp_avg_sq, "exp_avg_sq");
    p.dtype_in({TM_DTYPE_FLOAT32, TM_DTYPE_BFLOAT16}).contiguous();
    g.dtype_in({TM_DTYPE_FLOAT32, TM_DTYPE_BFLOAT16}).contiguous().same_shape(p);
    m.dtype_in({TM_DTYPE_FLOAT32, TM_DTYPE_BFLOAT16}).contiguous().same_shape(p);
    v.contiguous().same_shape(p).same_dtype(m);
    const int32_t device = turbomoe::common_device({&p, &g, &m, &v});
    disjoint({&p, &g, &m, &v});
    const float* scale = nullptr;
    if (grad_scale != nullptr) {
      const Arg s(grad_scale, "grad_scale");
      s.dtype_in({TM_DTYPE_FLOAT32});
      if (s.numel() != 1) {
        turbomoe::invalid("grad_scale has " + std::to_string(s.numel()) +
                          " elements, expected one (a float32 scalar)");
      }
      turbomoe::common_device({&p, &s});
      scale = s.ptr<const float>();
    }
    turbomoe::require_cuda_build(device, "tm_adamw_step");
    if (p.numel() == 0) return;
    if (device == TM_DEVICE_CPU) {
      turbomoe::optim::adamw_cpu(c, p, g, m, v, scale);
    } else {
      TM_CUDA_ONLY(turbomoe::optim::adamw_cuda(c, p, g, m, v, scale, stream));
    }
  });
}

}  // extern "C"
