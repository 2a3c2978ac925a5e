// The rows a permutation plan fills, read on the device: tm_permute_plan puts the routed pairs in
// rows [0, offsets[E]), so the kernels that also clear the other rows (the gather, the combine's
// backward) start clearing there. Clamped to [0, rows]: the count cannot be checked on the host
// without a sync.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace turbomoe::permute {

__device__ __forceinline__ int64_t planned_rows(const int32_t* offsets, int experts, int64_t rows) {
  const int64_t used = offsets[experts];
  return used < 0 ? 0 : (used > rows ? rows : used);
}

}  // namespace turbomoe::permute
