// Unsigned types of 2, 4, 8 and 16 bytes, for kernels that move elements as raw bits (a copy, or
// a vector load of several elements at once).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace turbomoe::permute {

template <int Bytes>
struct RawOf;
template <>
struct RawOf<16> {
  using type = uint4;
};
template <>
struct RawOf<8> {
  using type = uint2;
};
template <>
struct RawOf<4> {
  using type = uint32_t;
};
template <>
struct RawOf<2> {
  using type = uint16_t;
};

}  // namespace turbomoe::permute
