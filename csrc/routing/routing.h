// Router: logits -> top-k expert ids and weights (softmax, sigmoid with groups and bias, or top-k
// then softmax). Internal entry points of the CPU reference and the CUDA kernels, called after
// tm_routing_* has validated its arguments.
#pragma once

#include <optional>

#include "common/tensor.h"

namespace turbomoe::routing {

// Largest expert count and top-k the CUDA kernels cover (one warp per token).
inline constexpr int64_t kCudaMaxExperts = 4096;
inline constexpr int64_t kCudaMaxTopK = 32;

void forward_cpu(const tm_routing_params& p, const Arg& logits, const std::optional<Arg>& bias,
                 const Arg& weights, const Arg& ids, const Arg& scores);
void backward_cpu(const tm_routing_params& p, const Arg& grad_weights, const Arg& scores,
                  const Arg& ids, const Arg& grad_logits);

void forward_cuda(const tm_routing_params& p, const Arg& logits, const std::optional<Arg>& bias,
                  const Arg& weights, const Arg& ids, const Arg& scores, void* stream);
void backward_cuda(const tm_routing_params& p, const Arg& grad_weights, const Arg& scores,
                   const Arg& ids, const Arg& grad_logits, void* stream);

}  // namespace turbomoe::routing
