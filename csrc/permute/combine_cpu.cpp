// CPU reference of the combine: the weighted sum of each token's expert rows (k ascending, float
// accumulation) and its backward.
#include <string>
#include <vector>

#include "common/numeric.h"
#include "permute/permute.h"

namespace turbomoe::permute {
namespace {

float weight_at(const std::optional<Arg>& weights, int64_t t, int64_t k) {
  if (!weights) return 1.0f;
  const int64_t off = t * weights->stride(0) + k * weights->stride(1);
  return dispatch_floating(weights->dtype(), [&](auto tag) {
    return to_float(weights->ptr<const decltype(tag)>()[off]);
  });
}

void check_rows(const Arg& pair_to_row, int64_t rows) {
  const int32_t* p2r = pair_to_row.ptr<const int32_t>();
  for (int64_t p = 0; p < pair_to_row.size(0); ++p) {
    if (p2r[p] < -1 || p2r[p] >= rows) {
      invalid("pair_to_row[" + std::to_string(p) + "] is " + std::to_string(p2r[p]) +
              ", outside [-1, " + std::to_string(rows) + ")");
    }
  }
}

}  // namespace

void combine_forward_cpu(const Arg& rows, const Arg& pair_to_row, const std::optional<Arg>& weights,
                         int64_t top_k, const Arg& out) {
  check_rows(pair_to_row, rows.size(0));
  const int64_t tokens = out.size(0), hidden = out.size(1);
  const int32_t* p2r = pair_to_row.ptr<const int32_t>();
  std::vector<float> acc(static_cast<size_t>(hidden));
  dispatch_floating(rows.dtype(), [&](auto tag) {
    using T = decltype(tag);
    for (int64_t t = 0; t < tokens; ++t) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t k = 0; k < top_k; ++k) {
        const int32_t r = p2r[t * top_k + k];
        if (r < 0) continue;
        const float w = weight_at(weights, t, k);
        const T* x = rows.ptr<const T>() + r * rows.stride(0);
        for (int64_t h = 0; h < hidden; ++h) acc[h] += w * to_float(x[h]);
      }
      T* y = out.ptr<T>() + t * out.stride(0);
      for (int64_t h = 0; h < hidden; ++h) y[h] = from_float<T>(acc[h]);
    }
  });
}

void combine_backward_cpu(const CombineBackward& c) {
  const Arg& grad_out = c.grad_out;
  const Arg& grad_rows = c.grad_rows;
  const std::optional<Arg>& rows = c.rows;
  const std::optional<Arg>& weights = c.weights;
  const std::optional<Arg>& grad_weights = c.grad_weights;
  const int64_t top_k = c.top_k;
  const int64_t num_rows = grad_rows.size(0), tokens = grad_out.size(0), hidden = grad_out.size(1);
  check_rows(c.pair_to_row, num_rows);
  const int32_t* p2r = c.pair_to_row.ptr<const int32_t>();
  // A row reached twice would make "grad_rows[row] = ..." ambiguous.
  std::vector<char> seen(static_cast<size_t>(num_rows), 0);
  for (int64_t p = 0; p < c.pair_to_row.size(0); ++p) {
    if (p2r[p] < 0) continue;
    if (seen[p2r[p]]) {
      invalid("pair_to_row maps two pairs to row " + std::to_string(p2r[p]));
    }
    seen[p2r[p]] = 1;
  }
  if (c.expert_offsets) {
    // The CUDA kernel trusts this promise (it leaves rows below the count to the pairs).
    const Arg& offsets = *c.expert_offsets;
    const int64_t used = offsets.ptr<const int32_t>()[offsets.size(0) - 1];
    if (used < 0 || used > num_rows) {
      invalid("expert_offsets ends at " + std::to_string(used) + ", outside [0, " +
              std::to_string(num_rows) + "] rows");
    }
    for (int64_t row = 0; row < num_rows; ++row) {
      if (static_cast<bool>(seen[row]) != (row < used)) {
        invalid("pair_to_row does not map onto rows [0, " + std::to_string(used) +
                ") exactly, as expert_offsets promises: row " + std::to_string(row) + " is " +
                (seen[row] ? "mapped" : "not mapped"));
      }
    }
  }
  dispatch_floating(grad_out.dtype(), [&](auto tag) {
    using T = decltype(tag);
    for (int64_t r = 0; r < num_rows; ++r) {
      if (seen[r]) continue;
      T* d = grad_rows.ptr<T>() + r * grad_rows.stride(0);
      for (int64_t h = 0; h < hidden; ++h) d[h] = from_float<T>(0.0f);
    }
    for (int64_t t = 0; t < tokens; ++t) {
      const T* g = grad_out.ptr<const T>() + t * grad_out.stride(0);
      for (int64_t k = 0; k < top_k; ++k) {
        const int32_t r = p2r[t * top_k + k];
        float dot = 0.0f;
        if (r >= 0) {
          const float w = weight_at(weights, t, k);
          T* d = grad_rows.ptr<T>() + r * grad_rows.stride(0);
          for (int64_t h = 0; h < hidden; ++h) d[h] = from_float<T>(w * to_float(g[h]));
          if (grad_weights) {
            const T* x = rows->ptr<const T>() + r * rows->stride(0);
            for (int64_t h = 0; h < hidden; ++h) dot += to_float(g[h]) * to_float(x[h]);
          }
        }
        if (grad_weights) {
          const int64_t off = t * grad_weights->stride(0) + k * grad_weights->stride(1);
          dispatch_floating(grad_weights->dtype(), [&](auto gw_tag) {
            using G = decltype(gw_tag);
            grad_weights->ptr<G>()[off] = from_float<G>(dot);
          });
        }
      }
    }
  });
}

}  // namespace turbomoe::permute
