// Expert-parallel layout: which tokens each rank receives, deduplicated per destination rank.
// Internal entry points of the CPU reference and the CUDA kernel, called after tm_ep_layout has
// validated its arguments.
#pragma once

#include <cstddef>
#include <cstdint>

#include "common/tensor.h"

namespace turbomoe::ep_layout {

// Largest rank count the CUDA kernel covers (a token's destination set is one 64-bit mask).
inline constexpr int64_t kCudaMaxRanks = 64;

// The rank that owns expert e when E experts are split into contiguous blocks of E/R.
inline int64_t owner_rank(int64_t expert, int64_t experts_per_rank) {
  return expert / experts_per_rank;
}

void layout_cpu(const Arg& ids, int64_t experts, int64_t ranks, const Arg& rank_counts,
                const Arg& expert_counts, const Arg& send_order, const Arg& token_rank_slot);
void layout_cuda(const Arg& ids, int64_t experts, int64_t ranks, const Arg& rank_counts,
                 const Arg& expert_counts, const Arg& send_order, const Arg& token_rank_slot,
                 void* stream);

// The send side of the fixed-block exchange (tm_ep_send_plan); arguments already validated.
struct SendPlanArgs {
  const Arg& ids;
  const Arg& weights;
  const Arg& rank_counts;
  const Arg& send_order;
  const Arg& token_rank_slot;
  int64_t experts, capacity;
  const Arg& send_pairs;
  const Arg& pair_to_row;
  const Arg& send_meta;
  const Arg& bad_ids;
};

void send_plan_cpu(const SendPlanArgs& a);
void send_plan_cuda(const SendPlanArgs& a, void* stream);
void send_plan_backward_cpu(const Arg& grad_meta, const Arg& ids, const Arg& token_rank_slot,
                            int64_t experts, int64_t capacity, const Arg& grad_weights);
void send_plan_backward_cuda(const Arg& grad_meta, const Arg& ids, const Arg& token_rank_slot,
                             int64_t experts, int64_t capacity, const Arg& grad_weights,
                             void* stream);

}  // namespace turbomoe::ep_layout
