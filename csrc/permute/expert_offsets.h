// Validation of expert_offsets [E+1] int32, shared by the permute and grouped GEMM entry points.
#pragma once

#include <cstdint>
#include <string>

#include "common/tensor.h"

namespace turbomoe {

// Shape and dtype; returns E. Valid on every device.
inline int64_t check_expert_offsets_shape(const Arg& offsets) {
  offsets.dtype_in({TM_DTYPE_INT32}).ndim_is(1).contiguous();
  if (offsets.size(0) < 1) invalid(std::string(offsets.name()) + " must have E+1 >= 1 entries");
  return offsets.size(0) - 1;
}

// Values, for host tensors only (reading device memory would need a sync): starts at 0, never
// decreases, ends at or below `rows`.
inline void check_expert_offsets_values(const Arg& offsets, int64_t rows) {
  const int32_t* o = offsets.ptr<const int32_t>();
  const int64_t experts = offsets.size(0) - 1;
  const std::string name = offsets.name();
  if (o[0] != 0) invalid(name + "[0] is " + std::to_string(o[0]) + ", expected 0");
  for (int64_t e = 0; e < experts; ++e) {
    if (o[e + 1] < o[e]) {
      invalid(name + " decreases at expert " + std::to_string(e) + " (" + std::to_string(o[e]) +
              " then " + std::to_string(o[e + 1]) + ")");
    }
  }
  if (o[experts] > rows) {
    invalid(name + "[" + std::to_string(experts) + "] is " + std::to_string(o[experts]) +
            ", beyond the " + std::to_string(rows) + " rows");
  }
}

}  // namespace turbomoe
