// One AdamW element, shared by the CPU reference and the CUDA kernel so that both round the same
// float32 operations in the same order (the order of turbomoe.train.optim.AdamW's tensor ops).
#pragma once

#include <cmath>

#include "common/host_device.h"

namespace turbomoe::optim {

// The step's constants in float32, derived once on the host from tm_adamw_params.
struct AdamwConstants {
  float lerp_weight;       // 1 - beta1
  float beta2;             //
  float one_minus_beta2;   // 1 - beta2
  float bias_correction1;  // 1 - beta1^step
  float bias_correction2;  // 1 - beta2^step
  float eps;               //
  float decay;             // 1 - lr * weight_decay (1 when weight_decay is 0)
  float neg_lr;            // -lr
  bool apply_decay;        // weight_decay != 0
};

// m and v are updated in place (float32 values, rounded by the caller when stored); returns the
// new parameter value. m follows torch's lerp (the form it picks for weights below one half),
// v torch's addcmul.
TM_HOST_DEVICE float adamw_element(const AdamwConstants& c, float param, float grad, float& m,
                                   float& v) {
  m = c.lerp_weight < 0.5f ? m + c.lerp_weight * (grad - m)
                           : grad - (grad - m) * (1.0f - c.lerp_weight);
  v = v * c.beta2 + c.one_minus_beta2 * grad * grad;
  const float denom = sqrtf(v / c.bias_correction2) + c.eps;
  const float update = (m / c.bias_correction1) / denom;
  float w = param;
  if (c.apply_decay) w = w * c.decay;
  return w + c.neg_lr * update;
}

}  // namespace turbomoe::optim
