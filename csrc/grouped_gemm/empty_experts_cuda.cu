// CUDA kernel of tm_zero_empty_experts: the grad-weight slices of experts without rows, zeroed
// apart from the grad-weight GEMM so that their bytes (most of dw under skewed routing) can be
// written on another stream while other kernels compute. The big kernels around it (the
// persistent GEMMs, cuDNN's attention) take a whole SM's registers, so this one cannot run beside
// them on an SM, only between their blocks: each block zeroes one 64 KiB chunk and exits (a
// few microseconds), so that a kernel whose block waits for an SM waits that long at most. The
// experts' emptiness is read on the device (no host sync); chunks of routed experts exit at once.
#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>

#include "common/cuda_utils.cuh"
#include "common/launch.cuh"
#include "grouped_gemm/grouped_gemm.h"

namespace turbomoe::grouped_gemm {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kChunkBytes = 64 << 10;  // a unit of work: one chunk of one expert's slice

// T: the store width (uint4 when every slice is 16-byte aligned and sized, else unsigned char).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    zero_empty_experts_kernel(const int32_t* offsets, unsigned char* dw, int64_t slice_bytes,
                              int64_t chunks_per_expert) {
  cuda::wait_for_prior_grids();
  cuda::allow_next_grid();
  const int64_t e = blockIdx.x / chunks_per_expert;
  if (offsets[e + 1] != offsets[e]) return;
  const int64_t begin = (blockIdx.x - e * chunks_per_expert) * kChunkBytes;
  const int64_t end = std::min(begin + kChunkBytes, slice_bytes);
  T* p = reinterpret_cast<T*>(dw + e * slice_bytes + begin);
  const int64_t n = (end - begin) / static_cast<int64_t>(sizeof(T));
  for (int64_t i = threadIdx.x; i < n; i += kThreads) p[i] = T{};
}

}  // namespace

void zero_empty_experts_cuda(const Arg& offsets, const Arg& dw, void* stream) {
  cuda::DeviceGuard device(dw.t().device_index);
  const int64_t experts = dw.size(0);
  const int64_t slice_bytes = dw.numel() / experts * static_cast<int64_t>(dtype_size(dw.dtype()));
  const int64_t chunks = (slice_bytes + kChunkBytes - 1) / kChunkBytes;
  const int64_t blocks = experts * chunks;
  if (blocks > std::numeric_limits<int32_t>::max()) {
    invalid("out has " + std::to_string(blocks) + " chunks of 64 KiB, more than one launch takes");
  }
  const auto* off = offsets.ptr<const int32_t>();
  auto* base = static_cast<unsigned char*>(dw.t().data);
  const bool vec = slice_bytes % 16 == 0 && reinterpret_cast<uintptr_t>(base) % 16 == 0;
  auto kernel = vec ? zero_empty_experts_kernel<uint4> : zero_empty_experts_kernel<unsigned char>;
  cuda::launch("zero_empty_experts_kernel", kernel, static_cast<unsigned>(blocks), kThreads, 0,
               cuda::as_stream(stream), off, base, slice_bytes, chunks);
}

}  // namespace turbomoe::grouped_gemm
