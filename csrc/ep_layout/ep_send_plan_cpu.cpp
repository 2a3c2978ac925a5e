// CPU reference of the send side of the fixed-block exchange and of its weight backward.
#include "common/expert_ids.h"
#include "common/numeric.h"
#include "ep_layout/ep_layout.h"

namespace turbomoe::ep_layout {

void send_plan_cpu(const SendPlanArgs& a) {
  const int64_t tokens = a.ids.size(0), top_k = a.ids.size(1);
  const int64_t ranks = a.rank_counts.size(0), cap = a.capacity, experts = a.experts;
  const int64_t per_rank = experts / ranks, zero_cell = tokens * ranks;
  const int32_t* counts = a.rank_counts.ptr<const int32_t>();
  const int32_t* order = a.send_order.ptr<const int32_t>();
  const int32_t* slot = a.token_rank_slot.ptr<const int32_t>();
  int32_t* pairs = a.send_pairs.ptr<int32_t>();
  int32_t* to_row = a.pair_to_row.ptr<int32_t>();
  float* meta = a.send_meta.ptr<float>();
  const int64_t cells = (cap + 1) * ranks;
  for (int64_t i = 0; i < cells; ++i) {
    pairs[i] = static_cast<int32_t>(zero_cell);
    const int64_t t = i / ranks, r = i % ranks;
    const int32_t s = t < tokens ? slot[t * ranks + r] : -1;
    to_row[i] = s >= 0 ? static_cast<int32_t>(r * cap + s) : -1;
  }
  for (int64_t row = 0; row < ranks * cap; ++row) {
    for (int64_t k = 0; k < top_k; ++k) {
      meta[row * 2 * top_k + k] = static_cast<float>(per_rank);
      meta[row * 2 * top_k + top_k + k] = 0.0f;
    }
  }
  int64_t start = 0;
  dispatch_index(a.ids.dtype(), [&](auto id_tag) {
    using Id = decltype(id_tag);
    dispatch_floating(a.weights.dtype(), [&](auto w_tag) {
      using W = decltype(w_tag);
      const W* w = a.weights.ptr<const W>();
      for (int64_t r = 0; r < ranks; ++r) {
        for (int64_t s = 0; s < counts[r]; ++s) {
          const int64_t t = order[start + s], row = r * cap + s;
          pairs[row] = static_cast<int32_t>(t * ranks + r);
          for (int64_t k = 0; k < top_k; ++k) {
            const int64_t e = expert_id<Id>(a.ids, t, k);
            if (e < 0 || e >= experts || e / per_rank != r) continue;
            meta[row * 2 * top_k + k] = static_cast<float>(e % per_rank);
            meta[row * 2 * top_k + top_k + k] =
                to_float(w[t * a.weights.stride(0) + k * a.weights.stride(1)]);
          }
        }
        start += counts[r];
      }
      int32_t bad = 0;
      for (int64_t t = 0; t < tokens; ++t) {
        for (int64_t k = 0; k < top_k; ++k) {
          const int64_t e = expert_id<Id>(a.ids, t, k);
          bad += (e < 0 || e >= experts) ? 1 : 0;
        }
      }
      *a.bad_ids.ptr<int32_t>() = bad;
    });
  });
}

void send_plan_backward_cpu(const Arg& grad_meta, const Arg& ids, const Arg& token_rank_slot,
                            int64_t experts, int64_t capacity, const Arg& grad_weights) {
  const int64_t tokens = ids.size(0), top_k = ids.size(1);
  const int64_t ranks = token_rank_slot.size(1), per_rank = experts / ranks;
  const float* g = grad_meta.ptr<const float>();
  const int64_t g_row = grad_meta.stride(0);
  const int32_t* slot = token_rank_slot.ptr<const int32_t>();
  dispatch_index(ids.dtype(), [&](auto id_tag) {
    using Id = decltype(id_tag);
    dispatch_floating(grad_weights.dtype(), [&](auto w_tag) {
      using W = decltype(w_tag);
      W* out = grad_weights.ptr<W>();
      for (int64_t t = 0; t < tokens; ++t) {
        for (int64_t k = 0; k < top_k; ++k) {
          const int64_t e = expert_id<Id>(ids, t, k);
          float v = 0.0f;
          if (e >= 0 && e < experts) {
            const int64_t r = e / per_rank;
            const int32_t s = slot[t * ranks + r];
            if (s >= 0) v = g[(r * capacity + s) * g_row + top_k + k];
          }
          out[t * top_k + k] = from_float<W>(v);
        }
      }
    });
  });
}

}  // namespace turbomoe::ep_layout
