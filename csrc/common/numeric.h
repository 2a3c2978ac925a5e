// Scalar types of the CPU reference: bfloat16 and float16 storage with float32 arithmetic, and a
// dispatcher from a runtime dtype code to a typed lambda.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>

#include "common/error.h"
#include "common/tensor.h"

namespace turbomoe {

struct bf16 {
  uint16_t bits;
};

struct f16 {
  uint16_t bits;
};

inline float to_float(float v) { return v; }

inline float to_float(bf16 v) {
  uint32_t u = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline float to_float(f16 v) {
  const uint32_t sign = (v.bits & 0x8000u) << 16;
  const uint32_t exp = (v.bits >> 10) & 0x1f;
  uint32_t mant = v.bits & 0x3ffu;
  uint32_t u;
  if (exp == 0) {
    if (mant == 0) {
      u = sign;
    } else {  // subnormal: renormalise
      int e = -1;
      do {
        ++e;
        mant <<= 1;
      } while ((mant & 0x400u) == 0);
      u = sign | static_cast<uint32_t>(127 - 15 - e) << 23 | (mant & 0x3ffu) << 13;
    }
  } else if (exp == 0x1f) {
    u = sign | 0x7f800000u | mant << 13;
  } else {
    u = sign | (exp + 127 - 15) << 23 | mant << 13;
  }
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

template <typename T>
T from_float(float v);

template <>
inline float from_float<float>(float v) {
  return v;
}

// Round to nearest even, as torch does; NaN stays NaN.
template <>
inline bf16 from_float<bf16>(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{static_cast<uint16_t>((u >> 16) | 0x40)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16{static_cast<uint16_t>(u >> 16)};
}

template <>
inline f16 from_float<f16>(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) return f16{static_cast<uint16_t>(sign | 0x7e00u)};
  if (abs >= 0x477ff000u) return f16{static_cast<uint16_t>(sign | 0x7c00u)};  // overflow -> inf
  if (abs < 0x38800000u) {  // subnormal or zero in half precision
    float a;
    std::memcpy(&a, &abs, sizeof a);
    const float scaled = a * 16777216.0f;  // 2^24: units of the smallest half subnormal
    return f16{static_cast<uint16_t>(sign | static_cast<uint16_t>(std::nearbyint(scaled)))};
  }
  uint32_t rounded = abs + 0xfffu + ((abs >> 13) & 1u);
  return f16{static_cast<uint16_t>(sign | ((rounded - (112u << 23)) >> 13))};
}

// Calls fn with a value of the storage type for a floating dtype code.
template <typename Fn>
decltype(auto) dispatch_floating(int32_t dtype, Fn&& fn) {
  switch (dtype) {
    case TM_DTYPE_FLOAT32:
      return fn(float{});
    case TM_DTYPE_BFLOAT16:
      return fn(bf16{});
    case TM_DTYPE_FLOAT16:
      return fn(f16{});
    default:
      invalid(std::string("unsupported floating dtype ") + dtype_name(dtype));
  }
}

// Calls fn with a value of the storage type for an index dtype code.
template <typename Fn>
decltype(auto) dispatch_index(int32_t dtype, Fn&& fn) {
  switch (dtype) {
    case TM_DTYPE_INT32:
      return fn(int32_t{});
    case TM_DTYPE_INT64:
      return fn(int64_t{});
    default:
      invalid(std::string("unsupported index dtype ") + dtype_name(dtype));
  }
}

// Reads element i of a 1-D index tensor of either index dtype, as int64.
inline int64_t read_index(const Arg& a, int64_t i) {
  const int64_t off = i * a.stride(0);
  return a.dtype() == TM_DTYPE_INT32 ? a.ptr<const int32_t>()[off] : a.ptr<const int64_t>()[off];
}

}  // namespace turbomoe
