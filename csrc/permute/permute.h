// Permutation of (token, slot) pairs into expert-contiguous rows and back: the plan (stable
// counting sort), the row gather, and the weighted combine. Internal entry points of the CPU
// reference and the CUDA kernels, called after tm_permute_plan / tm_gather_rows /
// tm_combine_* have validated their arguments.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>

#include "common/tensor.h"

namespace turbomoe::permute {

// The CUDA plan gives each block this many consecutive pairs; its workspace holds one count per
// (block, expert).
inline constexpr int64_t kPlanChunk = 1024;
// Largest expert count the CUDA plan covers (its per-expert counters live in shared memory).
inline constexpr int64_t kCudaMaxExperts = 8192;

inline size_t plan_workspace_bytes_cuda(int64_t pairs, int64_t experts) {
  const int64_t blocks = (pairs + kPlanChunk - 1) / kPlanChunk;
  return static_cast<size_t>(blocks * experts) * sizeof(int32_t);
}

void plan_cpu(const Arg& ids, int64_t experts, const Arg& sorted_pairs, const Arg& pair_to_row,
              const Arg& offsets);
void plan_cuda(const Arg& ids, int64_t experts, const Arg& sorted_pairs, const Arg& pair_to_row,
               const Arg& offsets, void* workspace, void* stream);

void gather_cpu(const Arg& src, const Arg& sorted_pairs, const Arg& offsets, int64_t top_k,
                const Arg& dst);
void gather_cuda(const Arg& src, const Arg& sorted_pairs, const Arg& offsets, int64_t top_k,
                 const Arg& dst, void* stream);

void combine_forward_cpu(const Arg& rows, const Arg& pair_to_row, const std::optional<Arg>& weights,
                         int64_t top_k, const Arg& out);
void combine_forward_cuda(const Arg& rows, const Arg& pair_to_row,
                          const std::optional<Arg>& weights, int64_t top_k, const Arg& out,
                          void* stream);

// The combine's backward; expert_offsets, when given, promises that the pairs map exactly onto
// rows [0, expert_offsets[E]) (tm_combine_backward).
struct CombineBackward {
  const Arg& grad_out;
  const std::optional<Arg>& rows;
  const Arg& pair_to_row;
  const std::optional<Arg>& weights;
  const std::optional<Arg>& expert_offsets;
  int64_t top_k;
  const Arg& grad_rows;
  const std::optional<Arg>& grad_weights;
};
void combine_backward_cpu(const CombineBackward& c);
void combine_backward_cuda(const CombineBackward& c, void* stream);

}  // namespace turbomoe::permute
