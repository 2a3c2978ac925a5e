// CUDA helpers shared by the kernels: status checks that become turbomoe::Error, a device guard,
// and the bf16/f32 load/store conversions every kernel uses.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <string>

#include "common/error.h"
#include "common/tensor.h"

namespace turbomoe::cuda {

inline void check(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return;
  const tm_status status = err == cudaErrorMemoryAllocation ? TM_ERR_OUT_OF_MEMORY : TM_ERR_CUDA;
  fail(status, std::string(what) + ": " + cudaGetErrorString(err));
}

inline cudaStream_t as_stream(void* stream) { return static_cast<cudaStream_t>(stream); }

// Makes the tensor's device current for the lifetime of the guard.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) : device_(device) {
    check(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device) check(cudaSetDevice(device), "cudaSetDevice");
  }
  // Restores only what it changed: every op call passes through here, so the common case (the
  // tensor is on the current device) costs one cudaGetDevice and nothing else.
  ~DeviceGuard() {
    if (previous_ != device_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int device_ = 0;
  int previous_ = 0;
};

__device__ __forceinline__ float load(const float* p) { return *p; }
__device__ __forceinline__ float load(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ float load(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16(v); }
__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half(v); }

// Calls fn with a null pointer of the device storage type for a floating dtype code.
template <typename Fn>
decltype(auto) dispatch_floating(int32_t dtype, Fn&& fn) {
  switch (dtype) {
    case TM_DTYPE_FLOAT32:
      return fn(static_cast<float*>(nullptr));
    case TM_DTYPE_BFLOAT16:
      return fn(static_cast<__nv_bfloat16*>(nullptr));
    case TM_DTYPE_FLOAT16:
      return fn(static_cast<__half*>(nullptr));
    default:
      invalid(std::string("unsupported floating dtype ") + dtype_name(dtype));
  }
}

inline unsigned blocks_for(int64_t n, int threads) {
  const int64_t b = (n + threads - 1) / threads;
  return static_cast<unsigned>(b < 1 ? 1 : (b > 65535 * 64 ? 65535 * 64 : b));
}

}  // namespace turbomoe::cuda
