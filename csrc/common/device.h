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

// Wraps a call into the CUDA kernels. Without CUDA the kernels do not exist, so the call is not
// compiled at all (the library must still link); require_cuda_build has rejected CUDA tensors
// before any such call is reached.
#ifdef TM_WITH_CUDA
#define TM_CUDA_ONLY(...) __VA_ARGS__
#else
#define TM_CUDA_ONLY(...) ::turbomoe::unsupported("this libturbomoe was built without CUDA")
#endif
