// Row access shared by the row-wise kernels (RMSNorm, cross-entropy): N consecutive elements
// moved as one vector where the caller has checked the alignment, converted to float32, and the
// float32 / bfloat16 dispatch those kernels are instantiated for.
#pragma once

#include <cstdint>

#include "common/cuda_utils.cuh"

namespace turbomoe::cuda {

// Elements per vector access: 16 bytes of bfloat16, 32 bytes of float32.
inline constexpr int kVecElems = 8;

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <int N, typename T>
__device__ __forceinline__ void load_floats(const T* p, float (&out)[N]) {
  const Pack<T, N> pack = *reinterpret_cast<const Pack<T, N>*>(p);
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = load(&pack.v[i]);
}

template <int N, typename T>
__device__ __forceinline__ void store_floats(T* p, const float (&in)[N]) {
  Pack<T, N> pack;
#pragma unroll
  for (int i = 0; i < N; ++i) store(&pack.v[i], in[i]);
  *reinterpret_cast<Pack<T, N>*>(p) = pack;
}

// v as it reads back after a store into T: the rounding a dtype cast applies.
template <typename T>
__device__ __forceinline__ float round_to(float v) {
  T t;
  store(&t, v);
  return load(&t);
}

// Butterfly sum: every lane ends with the same bits, because each step adds the same two
// values (in either order, which IEEE addition does not distinguish).
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// True when every row of a (and its base) can be accessed kVecElems elements at a time.
inline bool vectorisable(const Arg& a) {
  const uintptr_t align = kVecElems * dtype_size(a.dtype());
  return reinterpret_cast<uintptr_t>(a.data()) % align == 0 &&
         (a.ndim() < 2 || a.stride(0) % kVecElems == 0);
}

// Calls fn with a null pointer of the device type of a float32 or bfloat16 dtype code (the
// validation upstream admits no other).
template <typename Fn>
decltype(auto) dispatch_f32_bf16(int32_t dtype, Fn&& fn) {
  if (dtype == TM_DTYPE_BFLOAT16) return fn(static_cast<__nv_bfloat16*>(nullptr));
  return fn(static_cast<float*>(nullptr));
}

}  // namespace turbomoe::cuda
