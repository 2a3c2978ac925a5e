// CPU reference of the expert-parallel layout: one pass over the tokens in order, so each rank's
// send block lists its tokens ascending.
#include <string>
#include <vector>

#include "common/expert_ids.h"
#include "common/numeric.h"
#include "ep_layout/ep_layout.h"

namespace turbomoe::ep_layout {

void layout_cpu(const Arg& ids, int64_t experts, int64_t ranks, const Arg& rank_counts,
                const Arg& expert_counts, const Arg& send_order, const Arg& token_rank_slot) {
  const int64_t tokens = ids.size(0), top_k = ids.size(1), per_rank = experts / ranks;
  std::vector<int64_t> e_count(static_cast<size_t>(experts), 0);
  std::vector<int64_t> r_count(static_cast<size_t>(ranks), 0);
  // slot[t*R + r]: position of token t in rank r's block, -1 if t sends nothing to r.
  std::vector<int32_t> slot(static_cast<size_t>(tokens * ranks), -1);
  dispatch_index(ids.dtype(), [&](auto tag) {
    using Id = decltype(tag);
    for (int64_t t = 0; t < tokens; ++t) {
      for (int64_t k = 0; k < top_k; ++k) {
        const int64_t e = checked_expert_id<Id>(ids, t, k, experts);
        if (e == experts) continue;
        ++e_count[e];
        const int64_t r = owner_rank(e, per_rank);
        int32_t& s = slot[t * ranks + r];
        if (s < 0) s = static_cast<int32_t>(r_count[r]++);
      }
    }
  });
  int32_t* rc = rank_counts.ptr<int32_t>();
  std::vector<int64_t> start(static_cast<size_t>(ranks));
  int64_t total = 0;
  for (int64_t r = 0; r < ranks; ++r) {
    rc[r] = static_cast<int32_t>(r_count[r]);
    start[r] = total;
    total += r_count[r];
  }
  int32_t* ec = expert_counts.ptr<int32_t>();
  for (int64_t e = 0; e < experts; ++e) ec[e] = static_cast<int32_t>(e_count[e]);
  int32_t* order = send_order.ptr<int32_t>();
  int32_t* trs = token_rank_slot.ptr<int32_t>();
  for (int64_t i = total; i < tokens * ranks; ++i) order[i] = -1;
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t r = 0; r < ranks; ++r) {
      const int32_t s = slot[t * ranks + r];
      trs[t * ranks + r] = s;
      if (s >= 0) order[start[r] + s] = static_cast<int32_t>(t);
    }
  }
}

}  // namespace turbomoe::ep_layout
