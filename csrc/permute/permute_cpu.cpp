// CPU reference of the plan (a stable counting sort of the (token, slot) pairs by expert) and of
// the row gather.
#include <cstring>
#include <string>
#include <vector>

#include "common/expert_ids.h"
#include "common/numeric.h"
#include "permute/permute.h"

namespace turbomoe::permute {

void plan_cpu(const Arg& ids, int64_t experts, const Arg& sorted_pairs, const Arg& pair_to_row,
              const Arg& offsets) {
  const int64_t tokens = ids.size(0), top_k = ids.size(1), pairs = tokens * top_k;
  std::vector<int32_t> expert(static_cast<size_t>(pairs));
  std::vector<int64_t> counts(static_cast<size_t>(experts) + 1, 0);
  dispatch_index(ids.dtype(), [&](auto tag) {
    using Id = decltype(tag);
    for (int64_t t = 0; t < tokens; ++t) {
      for (int64_t k = 0; k < top_k; ++k) {
        const int64_t e = checked_expert_id<Id>(ids, t, k, experts);
        expert[t * top_k + k] = static_cast<int32_t>(e);
        ++counts[e];
      }
    }
  });
  int32_t* off = offsets.ptr<int32_t>();
  std::vector<int32_t> cursor(static_cast<size_t>(experts));
  off[0] = 0;
  for (int64_t e = 0; e < experts; ++e) {
    cursor[e] = off[e];
    off[e + 1] = static_cast<int32_t>(off[e] + counts[e]);
  }
  int32_t* sorted = sorted_pairs.ptr<int32_t>();
  int32_t* p2r = pair_to_row.ptr<int32_t>();
  for (int64_t p = 0; p < pairs; ++p) {
    const int32_t e = expert[p];
    if (e == experts) {
      p2r[p] = -1;
      continue;
    }
    const int32_t row = cursor[e]++;
    sorted[row] = static_cast<int32_t>(p);
    p2r[p] = row;
  }
  for (int64_t r = off[experts]; r < pairs; ++r) sorted[r] = -1;
}

void gather_cpu(const Arg& src, const Arg& sorted_pairs, const Arg& offsets, int64_t top_k,
                const Arg& dst) {
  const int64_t rows = dst.size(0), hidden = dst.size(1), tokens = src.size(0);
  const int64_t used = offsets.ptr<const int32_t>()[offsets.size(0) - 1];
  const int64_t pairs = sorted_pairs.size(0);
  const int32_t* sorted = sorted_pairs.ptr<const int32_t>();
  for (int64_t r = 0; r < used; ++r) {
    if (sorted[r] < 0 || sorted[r] >= pairs) {
      invalid("sorted_pairs[" + std::to_string(r) + "] is " + std::to_string(sorted[r]) +
              ", outside [0, " + std::to_string(pairs) + ")");
    }
  }
  const size_t elem = dtype_size(src.dtype()), row_bytes = static_cast<size_t>(hidden) * elem;
  const auto* in = static_cast<const char*>(src.data());
  auto* out = static_cast<char*>(dst.data());
  for (int64_t r = 0; r < rows; ++r) {
    char* d = out + r * dst.stride(0) * elem;
    const int64_t token = r < used ? sorted[r] / top_k : tokens;
    if (token < tokens) {
      std::memcpy(d, in + token * src.stride(0) * elem, row_bytes);
    } else {
      std::memset(d, 0, row_bytes);  // all-zero bits are +0 in every floating dtype
    }
  }
}

}  // namespace turbomoe::permute
