// Strided 2-D views and 16-byte vector loads and stores shared by the activation kernels.
#pragma once

#include <cstdint>
#include <initializer_list>

#include "common/cuda_utils.cuh"
#include "common/tensor.h"

namespace turbomoe::activation {

struct View2d {
  void* data;
  int64_t s0, s1;
};

inline View2d view(const Arg& a) { return {a.data(), a.stride(0), a.stride(1)}; }

// V consecutive elements of T, loaded or stored as one access of V * sizeof(T) bytes.
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <typename T, int V>
__device__ __forceinline__ void load_pack(const View2d& view, int64_t r, int64_t c, float* out) {
  const auto pack =
      *reinterpret_cast<const Pack<T, V>*>(static_cast<const T*>(view.data) + r * view.s0 + c);
#pragma unroll
  for (int j = 0; j < V; ++j) out[j] = cuda::load(&pack.v[j]);
}

template <typename T, int V>
__device__ __forceinline__ void store_pack(const View2d& view, int64_t r, int64_t c,
                                           const float* in) {
  Pack<T, V> pack;
#pragma unroll
  for (int j = 0; j < V; ++j) cuda::store(&pack.v[j], in[j]);
  *reinterpret_cast<Pack<T, V>*>(static_cast<T*>(view.data) + r * view.s0 + c) = pack;
}

// True when the view can be read or written V elements (of elem_bytes each) at a time.
inline bool vectorizable(const Arg& a, int v, int elem_bytes) {
  const auto address = reinterpret_cast<uintptr_t>(a.data());
  return a.stride(1) == 1 && (a.size(0) <= 1 || a.stride(0) % v == 0) && a.size(1) % v == 0 &&
         address % static_cast<uintptr_t>(v * elem_bytes) == 0;
}

inline int dtype_bytes(int32_t dtype) { return dtype == TM_DTYPE_FLOAT32 ? 4 : 2; }

// The vector width (elements) shared by all views: 16 bytes of the widest element type when
// every view allows it, else 1 (the scalar kernel).
inline int vector_width(std::initializer_list<const Arg*> views) {
  int widest = 2;
  for (const Arg* a : views) widest = dtype_bytes(a->dtype()) > widest ? 4 : widest;
  const int v = 16 / widest;
  for (const Arg* a : views) {
    if (!vectorizable(*a, v, dtype_bytes(a->dtype()))) return 1;
  }
  return v;
}

}  // namespace turbomoe::activation
