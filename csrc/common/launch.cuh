// Kernel launches, with programmatic dependent launch (PDL) on Hopper when TURBOMOE_PDL=1.
//
// A kernel launched with PDL may be scheduled while the kernel before it in the stream is still
// running: its blocks become resident as that grid's blocks trigger or retire, and they wait in
// `griddepcontrol.wait` until that grid has completed and its memory is visible. What it saves
// is the gap between two dependent kernels (the next grid's launch and block scheduling), paid
// at each of the few hundred boundaries between turbomoe's kernels in a captured training step.
//
// The contract that makes it safe: every kernel of the library calls `wait_for_prior_grids()`
// before its first global memory access, reads and writes alike (the previous grid may still be
// reading a buffer that this one would overwrite). tests/python/test_kernel_sources.py checks
// that of every __global__ function in csrc/, and that no kernel is launched any other way.
// A kernel may call `allow_next_grid()` once it has waited: the grid after it is then scheduled
// as soon as all of its blocks are running, not when they have exited. Everything before the
// previous grid has completed by then (that grid waited for it), so the chain stays ordered.
// Without PDL (unset, or a device before sm_90) both calls return at once.
#pragma once

#include <cuda_runtime.h>

#include <array>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <utility>

#include "common/cuda_utils.cuh"

namespace turbomoe::cuda {

__device__ __forceinline__ void wait_for_prior_grids() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void allow_next_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Whether launches on the current device use PDL: TURBOMOE_PDL=1 (read at every launch, as the
// GEMM's switches are, so that a test can compare both in one process) on a device of compute
// capability 9.0 or newer (asked once a device).
inline bool programmatic_launch_enabled() {
  const char* v = std::getenv("TURBOMOE_PDL");
  if (v == nullptr || std::strcmp(v, "1") != 0) return false;
  constexpr int kDevices = 64;
  static std::array<std::atomic<int>, kDevices> major{};  // 0: not asked yet
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0) return false;
  int cc = device < kDevices ? major[device].load(std::memory_order_relaxed) : 0;
  if (cc == 0) {
    check(cudaDeviceGetAttribute(&cc, cudaDevAttrComputeCapabilityMajor, device),
          "cudaDeviceGetAttribute (compute capability)");
    if (device < kDevices) major[device].store(cc, std::memory_order_relaxed);
  }
  return cc >= 9;
}

// A launch configuration with its attributes: clusters of `cluster` CTAs along x (none when 0),
// and PDL when `programmatic`. `attrs` must outlive its use (cudaLaunchKernelEx and the occupancy
// queries read them through config.attrs).
inline cudaLaunchConfig_t launch_config(dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                                        unsigned cluster, bool programmatic,
                                        std::array<cudaLaunchAttribute, 2>* attrs) {
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  unsigned n = 0;
  if (cluster > 0) {
    cudaLaunchAttribute& a = (*attrs)[n++];
    a.id = cudaLaunchAttributeClusterDimension;
    a.val.clusterDim.x = cluster;
    a.val.clusterDim.y = 1;
    a.val.clusterDim.z = 1;
  }
  if (programmatic) {
    cudaLaunchAttribute& a = (*attrs)[n++];
    a.id = cudaLaunchAttributeProgrammaticStreamSerialization;
    a.val.programmaticStreamSerializationAllowed = 1;
  }
  config.attrs = n > 0 ? attrs->data() : nullptr;
  config.numAttrs = n;
  return config;
}

// kernel<<<grid, block, smem, stream>>>(args...), with PDL when enabled; raises turbomoe::Error
// naming `name` on a launch error.
template <typename... Params, typename... Args>
void launch(const char* name, void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
            cudaStream_t stream, Args&&... args) {
  std::array<cudaLaunchAttribute, 2> attrs{};
  const cudaLaunchConfig_t config =
      launch_config(grid, block, smem, stream, 0, programmatic_launch_enabled(), &attrs);
  check(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...), name);
}

// The same in clusters of `cluster` CTAs along x (grid.x a multiple of it; 1 is a cluster launch
// too, one CTA a cluster).
template <typename... Params, typename... Args>
void launch_clusters(const char* name, void (*kernel)(Params...), unsigned cluster, dim3 grid,
                     dim3 block, size_t smem, cudaStream_t stream, Args&&... args) {
  std::array<cudaLaunchAttribute, 2> attrs{};
  const cudaLaunchConfig_t config =
      launch_config(grid, block, smem, stream, cluster, programmatic_launch_enabled(), &attrs);
  check(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...), name);
}

}  // namespace turbomoe::cuda
