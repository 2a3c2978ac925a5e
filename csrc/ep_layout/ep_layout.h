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

}  // namespace turbomoe::ep_layout
