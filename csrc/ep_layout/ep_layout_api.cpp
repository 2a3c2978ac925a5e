// C ABI of the expert-parallel layout: validation, then the CPU reference or the CUDA kernel.
#include <cstdint>
#include <limits>
#include <string>

#include "common/device.h"
#include "ep_layout/ep_layout.h"

namespace {

using turbomoe::Arg;
using turbomoe::invalid;

// Experts split into R contiguous blocks of E/R.
void check_experts_and_ranks(int64_t experts, int64_t ranks) {
  if (experts < 1 || experts >= std::numeric_limits<int32_t>::max()) {
    invalid("num_experts is " + std::to_string(experts) + ", expected >= 1");
  }
  if (ranks < 1 || ranks > experts) {
    invalid("num_ranks is " + std::to_string(ranks) +
            ", expected in [1, num_experts = " + std::to_string(experts) + "]");
  }
  if (experts % ranks != 0) {
    invalid("num_experts " + std::to_string(experts) + " is not a multiple of num_ranks " +
            std::to_string(ranks) + " (each rank owns E/R contiguous experts)");
  }
}

void check_counts(const Arg& a, int64_t n, const char* what) {
  a.dtype_in({TM_DTYPE_INT32}).ndim_is(1).size_is(0, n, what).contiguous();
}

}  // namespace

extern "C" {

tm_status tm_ep_layout_workspace_size(int64_t num_tokens, int64_t num_experts, int64_t num_ranks,
                                      int32_t device_type, size_t* bytes) {
  return turbomoe::guard(__func__, [&] {
    if (bytes == nullptr) invalid("bytes is NULL");
    if (num_tokens < 0) {
      invalid("num_tokens is " + std::to_string(num_tokens) + ", expected >= 0");
    }
    check_experts_and_ranks(num_experts, num_ranks);
    if (device_type != TM_DEVICE_CPU && device_type != TM_DEVICE_CUDA) {
      invalid("device_type is " + std::to_string(device_type) +
              ", expected TM_DEVICE_CPU or TM_DEVICE_CUDA");
    }
    *bytes = 0;  // neither the CPU reference nor the single-block CUDA kernel needs scratch
  });
}

tm_status tm_ep_layout(const tm_tensor* topk_ids, int64_t num_experts, int64_t num_ranks,
                       tm_tensor* rank_counts, tm_tensor* expert_counts, tm_tensor* send_order,
                       tm_tensor* token_rank_slot, void* workspace, size_t workspace_bytes,
                       void* stream) {
  return turbomoe::guard(__func__, [&] {
    const Arg ids(topk_ids, "topk_ids");
    ids.index().ndim_is(2);
    check_experts_and_ranks(num_experts, num_ranks);
    const int64_t tokens = ids.size(0);
    if (tokens * num_ranks > std::numeric_limits<int32_t>::max()) {
      invalid("topk_ids has " + std::to_string(tokens) + " tokens; tokens * num_ranks (" +
              std::to_string(tokens * num_ranks) + ") must fit int32");
    }
    const Arg rc(rank_counts, "rank_counts"), ec(expert_counts, "expert_counts");
    const Arg so(send_order, "send_order"), trs(token_rank_slot, "token_rank_slot");
    check_counts(rc, num_ranks, "num_ranks");
    check_counts(ec, num_experts, "num_experts");
    check_counts(so, tokens * num_ranks, "T*num_ranks");
    trs.dtype_in({TM_DTYPE_INT32}).ndim_is(2).size_is(0, tokens, "tokens of topk_ids");
    trs.size_is(1, num_ranks, "num_ranks").contiguous();
    const int32_t device = turbomoe::common_device({&ids, &rc, &ec, &so, &trs});
    turbomoe::require_cuda_build(device, "tm_ep_layout");
    if (device == TM_DEVICE_CPU) {
      turbomoe::ep_layout::layout_cpu(ids, num_experts, num_ranks, rc, ec, so, trs);
      return;
    }
    if (num_ranks > turbomoe::ep_layout::kCudaMaxRanks) {
      turbomoe::unsupported("the CUDA layout covers up to " +
                            std::to_string(turbomoe::ep_layout::kCudaMaxRanks) +
                            " ranks, got num_ranks " + std::to_string(num_ranks));
    }
    TM_CUDA_ONLY({
      turbomoe::check_workspace(workspace, workspace_bytes, 0, "tm_ep_layout_workspace_size");
      turbomoe::ep_layout::layout_cuda(ids, num_experts, num_ranks, rc, ec, so, trs, stream);
    });
  });
}

}  // extern "C"
