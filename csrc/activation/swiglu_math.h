// The scalar math of the gated activations, shared by the CPU reference and the CUDA kernels so
// that both compute the same function.
#pragma once

#include <cmath>

#include "common/host_device.h"
#include "turbomoe/turbomoe.h"

namespace turbomoe::activation {

TM_HOST_DEVICE float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

TM_HOST_DEVICE float swiglu_value(int variant, float alpha, float limit, float g, float u) {
  if (variant == TM_SWIGLU_CLAMPED) {
    const float gc = fminf(g, limit);
    const float uc = fminf(fmaxf(u, -limit), limit);
    return (uc + 1.0f) * gc * sigmoid(alpha * gc);
  }
  return g * sigmoid(g) * u;
}

// d out / d gate and d out / d up at (g, u); clamped inputs get zero gradient past the limit,
// matching torch.clamp's gradient.
TM_HOST_DEVICE void swiglu_grads(int variant, float alpha, float limit, float g, float u, float* dg,
                                 float* du) {
  if (variant == TM_SWIGLU_CLAMPED) {
    const float gc = fminf(g, limit);
    const float uc = fminf(fmaxf(u, -limit), limit);
    const float s = sigmoid(alpha * gc);
    const float glu = gc * s;
    *du = (u >= -limit && u <= limit) ? glu : 0.0f;
    const float dglu = s + gc * alpha * s * (1.0f - s);
    *dg = g <= limit ? (uc + 1.0f) * dglu : 0.0f;
    return;
  }
  const float s = sigmoid(g);
  *du = g * s;
  *dg = u * s * (1.0f + g * (1.0f - s));
}

}  // namespace turbomoe::activation
