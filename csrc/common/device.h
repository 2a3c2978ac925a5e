// Routing of a validated call to the CPU reference or the CUDA kernels.
#pragma once

#include <string>

#include "common/error.h"
#include "turbomoe/turbomoe.h"

namespace turbomoe {

#ifdef TM_WITH_CUDA
inline constexpr bool kBuiltWithCuda = true;
#else
inline constexpr bool kBuiltWithCuda = false;
#endif

// Throws TM_ERR_UNSUPPORTED for CUDA tensors in a build without CUDA.
inline void require_cuda_build(int32_t device_type, const char* op) {
  if (device_type == TM_DEVICE_CUDA && !kBuiltWithCuda) {
    unsupported(std::string(op) + " got CUDA tensors but this libturbomoe was built without CUDA");
  }
}

}  // namespace turbomoe
