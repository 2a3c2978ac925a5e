// C ABI of the combine (the weighted sum of each token's expert rows) and its backward.
#include <string>

#include "common/device.h"
#include "permute/permute.h"

namespace {

using turbomoe::Arg;
using turbomoe::invalid;

// The slots per token: from the [T,K] weights when given, else from pair_to_row's length.
int64_t slots_per_token(const Arg& pair_to_row, int64_t tokens,
                        std::initializer_list<const std::optional<Arg>*> per_slot) {
  pair_to_row.dtype_in({TM_DTYPE_INT32}).ndim_is(1).contiguous();
  int64_t top_k = -1;
  for (const auto* a : per_slot) {
    if (!*a) continue;
    (*a)->dtype_in({TM_DTYPE_FLOAT32, TM_DTYPE_BFLOAT16}).ndim_is(2).size_is(0, tokens, "tokens");
    if (top_k < 0) top_k = (*a)->size(1);
    (*a)->size_is(1, top_k, "top_k");
  }
  if (top_k < 0) {
    if (tokens == 0) return pair_to_row.size(0) == 0 ? 0 : -1;
    if (pair_to_row.size(0) % tokens != 0) {
      invalid(std::string("pair_to_row has ") + std::to_string(pair_to_row.size(0)) +
              " entries, not a multiple of the " + std::to_string(tokens) + " tokens");
    }
    return pair_to_row.size(0) / tokens;
  }
  pair_to_row.size_is(0, tokens * top_k, "tokens * top_k");
  return top_k;
}

void check_row_matrix(const Arg& a) {
  a.dtype_in({TM_DTYPE_FLOAT32, TM_DTYPE_BFLOAT16}).ndim_is(2).rows_contiguous();
}

}  // namespace

extern "C" {

tm_status tm_combine_forward(const tm_tensor* rows, const tm_tensor* pair_to_row,
                             const tm_tensor* weights, tm_tensor* out, void* stream) {
  return turbomoe::guard(__func__, [&] {
    const Arg r(rows, "rows"), p2r(pair_to_row, "pair_to_row"), o(out, "out");
    const auto w = turbomoe::optional_arg(weights, "weights");
    check_row_matrix(r);
    check_row_matrix(o);
    o.same_dtype(r).size_is(1, r.size(1), "hidden size of rows");
    const int64_t top_k = slots_per_token(p2r, o.size(0), {&w});
    if (top_k < 0) invalid("pair_to_row must be empty when out has no token");
    const int32_t device = turbomoe::common_device({&r, &p2r, w ? &*w : nullptr, &o});
    turbomoe::require_cuda_build(device, "tm_combine_forward");
    if (o.numel() == 0) return;
    if (device == TM_DEVICE_CPU) {
      turbomoe::permute::combine_forward_cpu(r, p2r, w, top_k, o);
    } else {
      TM_CUDA_ONLY(turbomoe::permute::combine_forward_cuda(r, p2r, w, top_k, o, stream));
    }
  });
}

tm_status tm_combine_backward(const tm_tensor* grad_out, const tm_tensor* rows,
                              const tm_tensor* pair_to_row, const tm_tensor* weights,
                              const tm_tensor* expert_offsets, tm_tensor* grad_rows,
                              tm_tensor* grad_weights, void* stream) {
  return turbomoe::guard(__func__, [&] {
    const Arg go(grad_out, "grad_out"), p2r(pair_to_row, "pair_to_row");
    const Arg gr(grad_rows, "grad_rows");
    const auto r = turbomoe::optional_arg(rows, "rows");
    const auto w = turbomoe::optional_arg(weights, "weights");
    const auto offsets = turbomoe::optional_arg(expert_offsets, "expert_offsets");
    const auto gw = turbomoe::optional_arg(grad_weights, "grad_weights");
    check_row_matrix(go);
    check_row_matrix(gr);
    gr.same_dtype(go).size_is(1, go.size(1), "hidden size of grad_out");
    if (gw && !r) invalid("rows is NULL but grad_weights is requested");
    if (r) {
      check_row_matrix(*r);
      r->same_dtype(go).same_shape(gr);
    }
    if (offsets) {
      offsets->dtype_in({TM_DTYPE_INT32}).ndim_is(1).contiguous();
      if (offsets->size(0) < 1) invalid("expert_offsets is empty; expected [E+1] offsets");
    }
    const int64_t top_k = slots_per_token(p2r, go.size(0), {&w, &gw});
    if (top_k < 0) invalid("pair_to_row must be empty when grad_out has no token");
    const int32_t device =
        turbomoe::common_device({&go, r ? &*r : nullptr, &p2r, w ? &*w : nullptr,
                                 offsets ? &*offsets : nullptr, &gr, gw ? &*gw : nullptr});
    turbomoe::require_cuda_build(device, "tm_combine_backward");
    const turbomoe::permute::CombineBackward c{go, r, p2r, w, offsets, top_k, gr, gw};
    if (device == TM_DEVICE_CPU) {
      turbomoe::permute::combine_backward_cpu(c);
    } else {
      TM_CUDA_ONLY(turbomoe::permute::combine_backward_cuda(c, stream));
    }
  });
}

}  // extern "C"
