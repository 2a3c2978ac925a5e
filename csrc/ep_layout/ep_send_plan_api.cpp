// C ABI of the send side of the fixed-block exchange: validation, then the CPU reference or the
// CUDA kernel.
#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>

#include "common/device.h"
#include "ep_layout/ep_layout.h"

namespace {

using turbomoe::Arg;
using turbomoe::invalid;

void check_plan_shape(int64_t tokens, int64_t experts, int64_t ranks, int64_t capacity) {
  if (ranks < 1 || experts < ranks || experts % ranks != 0) {
    invalid("num_experts " + std::to_string(experts) + " must be a positive multiple of the " +
            std::to_string(ranks) + " ranks of rank_counts");
  }
  if (capacity < tokens) {
    invalid("capacity " + std::to_string(capacity) + " is below the " + std::to_string(tokens) +
            " tokens: a rank's block must hold every token");
  }
  if ((capacity + 1) * ranks > std::numeric_limits<int32_t>::max()) {
    invalid("(capacity + 1) * ranks = " + std::to_string((capacity + 1) * ranks) +
            " must fit int32");
  }
}

void check_int32(const Arg& a, std::initializer_list<int64_t> sizes, const char* what) {
  a.dtype_in({TM_DTYPE_INT32}).ndim_is(static_cast<int>(sizes.size()));
  int dim = 0;
  for (int64_t n : sizes) a.size_is(dim++, n, what);
  a.contiguous();
}

}  // namespace

extern "C" {

tm_status tm_ep_send_plan(const tm_tensor* topk_ids, const tm_tensor* topk_weights,
                          const tm_tensor* rank_counts, const tm_tensor* send_order,
                          const tm_tensor* token_rank_slot, int64_t num_experts, int64_t capacity,
                          tm_tensor* send_pairs, tm_tensor* pair_to_row, tm_tensor* send_meta,
                          tm_tensor* bad_ids, void* stream) {
  return turbomoe::guard(__func__, [&] {
    const Arg ids(topk_ids, "topk_ids"), w(topk_weights, "topk_weights");
    ids.index().ndim_is(2);
    w.floating().ndim_is(2).same_shape(ids);
    const Arg rc(rank_counts, "rank_counts"), so(send_order, "send_order");
    const Arg trs(token_rank_slot, "token_rank_slot");
    rc.dtype_in({TM_DTYPE_INT32}).ndim_is(1).contiguous();
    const int64_t tokens = ids.size(0), top_k = ids.size(1), ranks = rc.size(0);
    check_plan_shape(tokens, num_experts, ranks, capacity);
    check_int32(so, {tokens * ranks}, "T*R");
    check_int32(trs, {tokens, ranks}, "[T, R]");
    const Arg pairs(send_pairs, "send_pairs"), to_row(pair_to_row, "pair_to_row");
    const Arg meta(send_meta, "send_meta"), bad(bad_ids, "bad_ids");
    check_int32(pairs, {(capacity + 1) * ranks}, "(C+1)*R");
    check_int32(to_row, {(capacity + 1) * ranks}, "(C+1)*R");
    meta.dtype_in({TM_DTYPE_FLOAT32}).ndim_is(2).size_is(0, ranks * capacity, "R*C");
    meta.size_is(1, 2 * top_k, "2K").contiguous();
    check_int32(bad, {1}, "1");
    const int32_t device =
        turbomoe::common_device({&ids, &w, &rc, &so, &trs, &pairs, &to_row, &meta, &bad});
    turbomoe::require_cuda_build(device, "tm_ep_send_plan");
    const turbomoe::ep_layout::SendPlanArgs args{ids,      w,     rc,     so,   trs, num_experts,
                                                 capacity, pairs, to_row, meta, bad};
    if (device == TM_DEVICE_CPU) {
      turbomoe::ep_layout::send_plan_cpu(args);
      return;
    }
    TM_CUDA_ONLY(turbomoe::ep_layout::send_plan_cuda(args, stream));
  });
}

tm_status tm_ep_send_plan_backward(const tm_tensor* grad_meta, const tm_tensor* topk_ids,
                                   const tm_tensor* token_rank_slot, int64_t num_experts,
                                   int64_t capacity, tm_tensor* grad_weights, void* stream) {
  return turbomoe::guard(__func__, [&] {
    const Arg g(grad_meta, "grad_meta"), ids(topk_ids, "topk_ids");
    const Arg trs(token_rank_slot, "token_rank_slot"), gw(grad_weights, "grad_weights");
    ids.index().ndim_is(2);
    const int64_t tokens = ids.size(0), top_k = ids.size(1);
    trs.dtype_in({TM_DTYPE_INT32}).ndim_is(2).size_is(0, tokens, "tokens of topk_ids");
    trs.contiguous();
    const int64_t ranks = trs.size(1);
    check_plan_shape(tokens, num_experts, ranks, capacity);
    g.dtype_in({TM_DTYPE_FLOAT32}).ndim_is(2).size_is(0, ranks * capacity, "R*C");
    g.size_is(1, 2 * top_k, "2K").rows_contiguous();
    gw.floating().ndim_is(2).same_shape(ids).contiguous();
    const int32_t device = turbomoe::common_device({&g, &ids, &trs, &gw});
    turbomoe::require_cuda_build(device, "tm_ep_send_plan_backward");
    if (device == TM_DEVICE_CPU) {
      turbomoe::ep_layout::send_plan_backward_cpu(g, ids, trs, num_experts, capacity, gw);
      return;
    }
    TM_CUDA_ONLY(turbomoe::ep_layout::send_plan_backward_cuda(g, ids, trs, num_experts, capacity,
                                                              gw, stream));
  });
}

}  // extern "C"
