// Device helpers of the cross-entropy kernels (loss_cuda.cu, ce_forward_backward_cuda.cu): the
// labels, the online softmax's running (max, sum of exp) and its merges in a fixed order.
#pragma once

#include <cstdint>

#include "common/cuda_utils.cuh"
#include "common/tensor.h"

namespace turbomoe::loss {

struct Labels {
  const void* data;
  int64_t stride;
  bool is64;
};

inline Labels labels_of(const Arg& a) {
  return {a.data(), a.stride(0), a.dtype() == TM_DTYPE_INT64};
}

__device__ __forceinline__ int64_t label_at(const Labels& l, int64_t row) {
  return l.is64 ? static_cast<const int64_t*>(l.data)[row * l.stride]
                : static_cast<const int32_t*>(l.data)[row * l.stride];
}

// Adds N logits to the running (max m, sum s of exp(x - m)), rescaling at most once per pack so
// that lanes rarely diverge. -inf logits add nothing (and must not: -inf - -inf is NaN); NaN
// logits poison s, as they should.
template <int N>
__device__ __forceinline__ void online_add(float& m, float& s, const float (&v)[N]) {
  float pack_max = v[0];
#pragma unroll
  for (int i = 1; i < N; ++i) pack_max = fmaxf(pack_max, v[i]);
  if (pack_max > m) {
    s *= expf(m - pack_max);
    m = pack_max;
  }
  // exp2f is a few instructions cheaper than expf, which the forward is bound by; scaling the
  // (already formed) difference keeps its error relative to the difference, not to the logits.
  constexpr float kLog2e = 1.4426950408889634f;
#pragma unroll
  for (int i = 0; i < N; ++i) s += v[i] == -INFINITY ? 0.0f : exp2f((v[i] - m) * kLog2e);
}

__device__ __forceinline__ void merge(float& m, float& s, float m2, float s2) {
  const float mx = fmaxf(m, m2);
  if (mx == -INFINITY) return;  // both empty
  s = s * expf(m - mx) + s2 * expf(m2 - mx);
  m = mx;
}

// Leaves the row's (max, sum) in thread 0 of a kThreads-thread block, merged in a fixed order.
template <int kThreads>
__device__ __forceinline__ void block_merge(float& m, float& s) {
  constexpr int kWarps = kThreads / 32;
  __shared__ float warp_m[kWarps], warp_s[kWarps];
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, offset);
    const float s2 = __shfl_xor_sync(0xffffffffu, s, offset);
    merge(m, s, m2, s2);
  }
  if (threadIdx.x % 32 == 0) {
    warp_m[threadIdx.x / 32] = m;
    warp_s[threadIdx.x / 32] = s;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    m = warp_m[0];
    s = warp_s[0];
    for (int w = 1; w < kWarps; ++w) merge(m, s, warp_m[w], warp_s[w]);
  }
}

}  // namespace turbomoe::loss
