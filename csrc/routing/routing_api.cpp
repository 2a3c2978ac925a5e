// C ABI of the routers: validation, then the CPU reference or the CUDA kernels.
#include <cmath>
#include <string>

#include "common/device.h"
#include "routing/routing.h"

namespace {

using turbomoe::Arg;
using turbomoe::invalid;

// Checks the parameters against the expert count of the logits.
const tm_routing_params& check_routing_params(const tm_routing_params* params, int64_t experts) {
  const auto& p = turbomoe::check_params(params, "params");
  if (p.kind != TM_ROUTING_SOFTMAX_TOPK && p.kind != TM_ROUTING_SIGMOID_GROUP_TOPK &&
      p.kind != TM_ROUTING_TOPK_SOFTMAX) {
    invalid("params.kind is " + std::to_string(p.kind) +
            ", expected TM_ROUTING_SOFTMAX_TOPK (1), TM_ROUTING_SIGMOID_GROUP_TOPK (2) or "
            "TM_ROUTING_TOPK_SOFTMAX (3)");
  }
  if (p.top_k < 1 || p.top_k > experts) {
    invalid("params.top_k is " + std::to_string(p.top_k) + ", expected 1.." +
            std::to_string(experts) + " (the number of experts)");
  }
  if (p.renormalize != 0 && p.renormalize != 1) {
    invalid("params.renormalize is " + std::to_string(p.renormalize) + ", expected 0 or 1");
  }
  if (!(std::isfinite(p.renorm_epsilon) && p.renorm_epsilon >= 0.0f)) {
    invalid("params.renorm_epsilon must be finite and >= 0");
  }
  if (p.kind != TM_ROUTING_SIGMOID_GROUP_TOPK) return p;
  if (!std::isfinite(p.routed_scaling_factor)) {
    invalid("params.routed_scaling_factor must be finite");
  }
  if (p.n_group < 1 || experts % p.n_group != 0) {
    invalid("params.n_group is " + std::to_string(p.n_group) + ", expected a divisor of the " +
            std::to_string(experts) + " experts");
  }
  if (p.topk_group < 1 || p.topk_group > p.n_group) {
    invalid("params.topk_group is " + std::to_string(p.topk_group) + ", expected 1.." +
            std::to_string(p.n_group) + " (params.n_group)");
  }
  const int64_t eligible = p.topk_group * (experts / p.n_group);
  if (p.top_k > eligible) {
    invalid("params.top_k is " + std::to_string(p.top_k) + " but params.topk_group keeps only " +
            std::to_string(eligible) + " experts");
  }
  return p;
}

void check_cuda_limits(int32_t device, int64_t experts, int64_t top_k) {
  if (device != TM_DEVICE_CUDA) return;
  if (experts > turbomoe::routing::kCudaMaxExperts || top_k > turbomoe::routing::kCudaMaxTopK) {
    turbomoe::unsupported(
        "the CUDA router covers up to " + std::to_string(turbomoe::routing::kCudaMaxExperts) +
        " experts and top_k up to " + std::to_string(turbomoe::routing::kCudaMaxTopK) + ", got " +
        std::to_string(experts) + " experts and top_k " + std::to_string(top_k));
  }
}

}  // namespace

extern "C" {

tm_status tm_routing_forward(const tm_routing_params* params, const tm_tensor* logits,
                             const tm_tensor* correction_bias, tm_tensor* topk_weights,
                             tm_tensor* topk_ids, tm_tensor* scores, void* stream) {
  return turbomoe::guard(__func__, [&] {
    turbomoe::check_params(params, "params");
    const Arg l(logits, "logits");
    l.dtype_in({TM_DTYPE_FLOAT32, TM_DTYPE_BFLOAT16}).ndim_is(2);
    const int64_t tokens = l.size(0), experts = l.size(1);
    const auto& p = check_routing_params(params, experts);
    const auto bias = turbomoe::optional_arg(correction_bias, "correction_bias");
    if (bias) {
      if (p.kind != TM_ROUTING_SIGMOID_GROUP_TOPK) {
        invalid("correction_bias is only used by TM_ROUTING_SIGMOID_GROUP_TOPK; pass NULL");
      }
      bias->dtype_in({TM_DTYPE_FLOAT32}).ndim_is(1).size_is(0, experts, "experts");
    }
    const Arg w(topk_weights, "topk_weights"), ids(topk_ids, "topk_ids"), s(scores, "scores");
    w.dtype_in({TM_DTYPE_FLOAT32})
        .ndim_is(2)
        .size_is(0, tokens, "tokens")
        .size_is(1, p.top_k, "top_k");
    ids.index().ndim_is(2).size_is(0, tokens, "tokens").size_is(1, p.top_k, "top_k");
    s.dtype_in({TM_DTYPE_FLOAT32}).same_shape(l);
    const int32_t device = turbomoe::common_device({&l, bias ? &*bias : nullptr, &w, &ids, &s});
    turbomoe::require_cuda_build(device, "tm_routing_forward");
    check_cuda_limits(device, experts, p.top_k);
    if (tokens == 0) return;
    if (device == TM_DEVICE_CPU) {
      turbomoe::routing::forward_cpu(p, l, bias, w, ids, s);
    } else {
      TM_CUDA_ONLY(turbomoe::routing::forward_cuda(p, l, bias, w, ids, s, stream));
    }
  });
}

tm_status tm_routing_backward(const tm_routing_params* params, const tm_tensor* grad_topk_weights,
                              const tm_tensor* scores, const tm_tensor* topk_ids,
                              tm_tensor* grad_logits, void* stream) {
  return turbomoe::guard(__func__, [&] {
    turbomoe::check_params(params, "params");
    const Arg s(scores, "scores");
    s.dtype_in({TM_DTYPE_FLOAT32}).ndim_is(2);
    const int64_t tokens = s.size(0), experts = s.size(1);
    const auto& p = check_routing_params(params, experts);
    const Arg gw(grad_topk_weights, "grad_topk_weights"), ids(topk_ids, "topk_ids");
    const Arg gl(grad_logits, "grad_logits");
    gw.dtype_in({TM_DTYPE_FLOAT32})
        .ndim_is(2)
        .size_is(0, tokens, "tokens")
        .size_is(1, p.top_k, "top_k");
    ids.index().ndim_is(2).size_is(0, tokens, "tokens").size_is(1, p.top_k, "top_k");
    gl.dtype_in({TM_DTYPE_FLOAT32, TM_DTYPE_BFLOAT16}).same_shape(s);
    const int32_t device = turbomoe::common_device({&gw, &s, &ids, &gl});
    turbomoe::require_cuda_build(device, "tm_routing_backward");
    check_cuda_limits(device, experts, p.top_k);
    if (tokens == 0) return;
    if (device == TM_DEVICE_CPU) {
      turbomoe::routing::backward_cpu(p, gw, s, ids, gl);
    } else {
      TM_CUDA_ONLY(turbomoe::routing::backward_cuda(p, gw, s, ids, gl, stream));
    }
  });
}

}  // extern "C"
