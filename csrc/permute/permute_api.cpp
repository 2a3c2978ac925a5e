// C ABI of the plan and the row gather: validation, then the CPU reference or the CUDA kernels.
#include <cstdint>
#include <limits>
#include <string>

#include "common/device.h"
#include "permute/expert_offsets.h"
#include "permute/permute.h"

namespace {

using turbomoe::Arg;
using turbomoe::invalid;

void check_experts(int64_t experts) {
  if (experts < 1 || experts >= std::numeric_limits<int32_t>::max()) {
    invalid("num_experts is " + std::to_string(experts) + ", expected >= 1");
  }
}

void check_pair_index(const Arg& a, int64_t pairs) {
  a.dtype_in({TM_DTYPE_INT32}).ndim_is(1).size_is(0, pairs, "T*K pairs").contiguous();
}

}  // namespace

extern "C" {

tm_status tm_permute_plan_workspace_size(int64_t num_pairs, int64_t num_experts,
                                         int32_t device_type, size_t* bytes) {
  return turbomoe::guard(__func__, [&] {
    if (bytes == nullptr) invalid("bytes is NULL");
    if (num_pairs < 0) invalid("num_pairs is " + std::to_string(num_pairs) + ", expected >= 0");
    check_experts(num_experts);
    if (device_type != TM_DEVICE_CPU && device_type != TM_DEVICE_CUDA) {
      invalid("device_type is " + std::to_string(device_type) +
              ", expected TM_DEVICE_CPU or TM_DEVICE_CUDA");
    }
    *bytes = 0;
    if (device_type == TM_DEVICE_CUDA) {
      TM_CUDA_ONLY(*bytes = turbomoe::permute::plan_workspace_bytes_cuda(num_pairs, num_experts));
    }
  });
}

tm_status tm_permute_plan(const tm_tensor* topk_ids, int64_t num_experts, tm_tensor* sorted_pairs,
                          tm_tensor* pair_to_row, tm_tensor* expert_offsets, void* workspace,
                          size_t workspace_bytes, void* stream) {
  return turbomoe::guard(__func__, [&] {
    const Arg ids(topk_ids, "topk_ids");
    ids.index().ndim_is(2);
    check_experts(num_experts);
    const int64_t pairs = ids.numel();
    if (pairs > std::numeric_limits<int32_t>::max()) {
      invalid("topk_ids has " + std::to_string(pairs) + " pairs; row indices are int32");
    }
    const Arg sp(sorted_pairs, "sorted_pairs"), p2r(pair_to_row, "pair_to_row");
    const Arg off(expert_offsets, "expert_offsets");
    check_pair_index(sp, pairs);
    check_pair_index(p2r, pairs);
    off.dtype_in({TM_DTYPE_INT32}).ndim_is(1).size_is(0, num_experts + 1, "num_experts + 1");
    off.contiguous();
    const int32_t device = turbomoe::common_device({&ids, &sp, &p2r, &off});
    turbomoe::require_cuda_build(device, "tm_permute_plan");
    if (device == TM_DEVICE_CPU) {
      turbomoe::permute::plan_cpu(ids, num_experts, sp, p2r, off);
      return;
    }
    if (num_experts > turbomoe::permute::kCudaMaxExperts) {
      turbomoe::unsupported("the CUDA plan covers up to " +
                            std::to_string(turbomoe::permute::kCudaMaxExperts) +
                            " experts, got num_experts " + std::to_string(num_experts));
    }
    TM_CUDA_ONLY({
      turbomoe::check_workspace(workspace, workspace_bytes,
                                turbomoe::permute::plan_workspace_bytes_cuda(pairs, num_experts),
                                "tm_permute_plan_workspace_size");
      turbomoe::permute::plan_cuda(ids, num_experts, sp, p2r, off, workspace, stream);
    });
  });
}

tm_status tm_gather_rows(const tm_tensor* src, const tm_tensor* sorted_pairs,
                         const tm_tensor* expert_offsets, int64_t top_k, tm_tensor* dst,
                         void* stream) {
  return turbomoe::guard(__func__, [&] {
    const Arg s(src, "src"), sp(sorted_pairs, "sorted_pairs"),
        off(expert_offsets, "expert_offsets");
    const Arg d(dst, "dst");
    s.floating().ndim_is(2).rows_contiguous();
    if (top_k < 1) invalid("top_k is " + std::to_string(top_k) + ", expected >= 1");
    const int64_t token_pairs = s.size(0) * top_k;
    d.floating().ndim_is(2).same_dtype(s).rows_contiguous();
    d.size_is(1, s.size(1), "hidden size of src");
    sp.dtype_in({TM_DTYPE_INT32}).ndim_is(1).contiguous();
    // Pairs past src's tokens are allowed (they give zero rows), fewer than its tokens are not.
    const int64_t pairs = sp.size(0);
    if (pairs < token_pairs) {
      invalid("sorted_pairs has " + std::to_string(pairs) + " entries, fewer than the " +
              std::to_string(token_pairs) + " pairs of src (tokens * top_k)");
    }
    // dst may be shorter than the pairs when the caller knows how many are routed (the
    // expert-parallel owner does): rows past offsets[E] are only padding.
    if (d.size(0) > pairs) {
      invalid("dst has " + std::to_string(d.size(0)) + " rows, more than the " +
              std::to_string(pairs) + " entries of sorted_pairs");
    }
    turbomoe::check_expert_offsets_shape(off);
    const int32_t device = turbomoe::common_device({&s, &sp, &off, &d});
    turbomoe::require_cuda_build(device, "tm_gather_rows");
    // On CUDA the kernel stops at min(offsets[E], rows of dst): it never writes out of bounds.
    if (device == TM_DEVICE_CPU) turbomoe::check_expert_offsets_values(off, d.size(0));
    if (d.numel() == 0) return;
    if (device == TM_DEVICE_CPU) {
      turbomoe::permute::gather_cpu(s, sp, off, top_k, d);
    } else {
      TM_CUDA_ONLY(turbomoe::permute::gather_cuda(s, sp, off, top_k, d, stream));
    }
  });
}

}  // extern "C"
