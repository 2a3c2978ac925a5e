// The scalar pieces of routing shared by the CPU reference and the CUDA kernels, so that both
// select the same experts and compute the same weights and gradients.
#pragma once

#include <cmath>

#include "common/host_device.h"
#include "turbomoe/turbomoe.h"

namespace turbomoe::routing {

TM_HOST_DEVICE float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

// NaN compares false both ways, which would leave a top-k round without a winner; ranking it as
// -inf keeps the order total, so every round picks exactly one expert.
TM_HOST_DEVICE float selection_key(float v) { return v != v ? -INFINITY : v; }

// The selection order: larger key first, the lower id on ties. It is a strict total order over
// (key, id), so "the best candidate ranked after the previous pick" walks the top-k in order.
TM_HOST_DEVICE bool ranks_before(float va, int ia, float vb, int ib) {
  return va > vb || (va == vb && ia < ib);
}

// The value compared during selection for an expert whose logit is x and whose score is s.
// Softmax is monotonic, so SOFTMAX_TOPK ranks the logits themselves: the same order as the
// probabilities, and exact on every device because no exp() rounding is involved.
TM_HOST_DEVICE float choice_value(int kind, float x, float s, float bias) {
  return kind == TM_ROUTING_SIGMOID_GROUP_TOPK ? s + bias : x;
}

// Weight scale: DeepSeek's routed_scaling_factor applies to the sigmoid router only.
TM_HOST_DEVICE float weight_scale(const tm_routing_params& p) {
  return p.kind == TM_ROUTING_SIGMOID_GROUP_TOPK ? p.routed_scaling_factor : 1.0f;
}

// TOPK_SOFTMAX weights already sum to one, so renormalisation only applies to the other kinds.
TM_HOST_DEVICE bool renormalizes(const tm_routing_params& p) {
  return p.renormalize != 0 && p.kind != TM_ROUTING_TOPK_SOFTMAX;
}

// Weight of slot k from its selected score z (probability, sigmoid score or logit). For
// TOPK_SOFTMAX, zmax and denom are the max and sum of exp(z - zmax) over the k slots; for the
// other kinds denom is (sum z + eps) when renormalising, else 1.
TM_HOST_DEVICE float slot_weight(const tm_routing_params& p, float z, float zmax, float denom) {
  if (p.kind == TM_ROUTING_TOPK_SOFTMAX) return expf(z - zmax) / denom;
  return weight_scale(p) * (z / denom);
}

// d loss / d z of one slot, given its upstream gradient g, its weight w and dot = sum_k g_k w_k.
TM_HOST_DEVICE float slot_grad(const tm_routing_params& p, float g, float w, float dot,
                               float denom) {
  if (p.kind == TM_ROUTING_TOPK_SOFTMAX) return w * (g - dot);
  if (renormalizes(p)) return (weight_scale(p) * g - dot) / denom;
  return weight_scale(p) * g;
}

// d loss / d logit of expert e from gz, the gradient accumulated on its score s, and (softmax
// only) centre = sum over slots of gz * s.
TM_HOST_DEVICE float logit_grad(int kind, float gz, float s, float centre) {
  switch (kind) {
    case TM_ROUTING_SOFTMAX_TOPK:
      return s * (gz - centre);
    case TM_ROUTING_SIGMOID_GROUP_TOPK:
      return gz * s * (1.0f - s);
    default:
      return gz;
  }
}

}  // namespace turbomoe::routing
