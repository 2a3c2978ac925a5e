// Helpers for the GoogleTest suites: host tensors behind tm_tensor descriptors, seeded random
// data, relative error against double-precision references, and checks on error statuses.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "turbomoe/turbomoe.h"

namespace turbomoe::testing {

inline uint16_t float_to_bf16_bits(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline float bf16_bits_to_float(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// A dense row-major host tensor that owns its bytes and exposes a tm_tensor descriptor.
class HostTensor {
 public:
  HostTensor() = default;
  HostTensor(std::vector<int64_t> sizes, int32_t dtype) : sizes_(std::move(sizes)), dtype_(dtype) {
    bytes_.assign(static_cast<size_t>(numel()) * elem_size(), 0);
  }

  static size_t elem_size(int32_t dtype) {
    switch (dtype) {
      case TM_DTYPE_FLOAT32:
      case TM_DTYPE_INT32:
        return 4;
      case TM_DTYPE_INT64:
        return 8;
      default:
        return 2;
    }
  }
  size_t elem_size() const { return elem_size(dtype_); }
  int64_t numel() const {
    int64_t n = 1;
    for (int64_t s : sizes_) n *= s;
    return n;
  }
  int32_t dtype() const { return dtype_; }
  const std::vector<int64_t>& sizes() const { return sizes_; }

  // The descriptor; it points at this object's storage, so keep the HostTensor alive.
  tm_tensor* desc() {
    std::memset(&desc_, 0, sizeof desc_);
    desc_.data = bytes_.empty() ? nullptr : bytes_.data();
    desc_.dtype = dtype_;
    desc_.device_type = TM_DEVICE_CPU;
    desc_.ndim = static_cast<int32_t>(sizes_.size());
    int64_t stride = 1;
    for (int i = desc_.ndim - 1; i >= 0; --i) {
      desc_.sizes[i] = sizes_[i];
      desc_.strides[i] = stride;
      stride *= sizes_[i];
    }
    return &desc_;
  }

  double get(int64_t i) const {
    const uint8_t* p = bytes_.data() + static_cast<size_t>(i) * elem_size();
    switch (dtype_) {
      case TM_DTYPE_FLOAT32: {
        float v;
        std::memcpy(&v, p, 4);
        return v;
      }
      case TM_DTYPE_BFLOAT16: {
        uint16_t b;
        std::memcpy(&b, p, 2);
        return bf16_bits_to_float(b);
      }
      case TM_DTYPE_INT32: {
        int32_t v;
        std::memcpy(&v, p, 4);
        return v;
      }
      case TM_DTYPE_INT64: {
        int64_t v;
        std::memcpy(&v, p, 8);
        return static_cast<double>(v);
      }
      default:
        ADD_FAILURE() << "HostTensor::get: unsupported dtype";
        return 0;
    }
  }

  void set(int64_t i, double v) {
    uint8_t* p = bytes_.data() + static_cast<size_t>(i) * elem_size();
    switch (dtype_) {
      case TM_DTYPE_FLOAT32: {
        const float f = static_cast<float>(v);
        std::memcpy(p, &f, 4);
        break;
      }
      case TM_DTYPE_BFLOAT16: {
        const uint16_t b = float_to_bf16_bits(static_cast<float>(v));
        std::memcpy(p, &b, 2);
        break;
      }
      case TM_DTYPE_INT32: {
        const int32_t x = static_cast<int32_t>(v);
        std::memcpy(p, &x, 4);
        break;
      }
      case TM_DTYPE_INT64: {
        const int64_t x = static_cast<int64_t>(v);
        std::memcpy(p, &x, 8);
        break;
      }
      default:
        ADD_FAILURE() << "HostTensor::set: unsupported dtype";
    }
  }

  std::vector<double> values() const {
    std::vector<double> v(static_cast<size_t>(numel()));
    for (int64_t i = 0; i < numel(); ++i) v[static_cast<size_t>(i)] = get(i);
    return v;
  }

  // Fills with NaN (floating) or a large sentinel (integers): unwritten outputs then fail.
  void poison() {
    for (int64_t i = 0; i < numel(); ++i) {
      set(i, dtype_ == TM_DTYPE_INT32 || dtype_ == TM_DTYPE_INT64 ? 0x3fffffff : NAN);
    }
  }

  void fill_uniform(std::mt19937_64& rng, double lo = -1.0, double hi = 1.0) {
    std::uniform_real_distribution<double> dist(lo, hi);
    for (int64_t i = 0; i < numel(); ++i) set(i, dist(rng));
  }

 private:
  std::vector<int64_t> sizes_;
  int32_t dtype_ = TM_DTYPE_FLOAT32;
  std::vector<uint8_t> bytes_;
  tm_tensor desc_{};
};

// ||a - b|| / ||b||, with NaN anywhere giving +inf.
inline double rel_error(const std::vector<double>& a, const std::vector<double>& b) {
  if (a.size() != b.size()) return INFINITY;
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (std::isnan(a[i]) || std::isnan(b[i])) return INFINITY;
    num += (a[i] - b[i]) * (a[i] - b[i]);
    den += b[i] * b[i];
  }
  return den == 0 ? std::sqrt(num) : std::sqrt(num / den);
}

// The [T,K] `ids` stored again as [K,T] in `storage`, and a [T,K] descriptor over that storage
// (strides 1, T): for the tests that an op reads strided ids. Keep `storage` alive meanwhile.
inline tm_tensor transposed_view(const HostTensor& ids, HostTensor& storage) {
  const int64_t tokens = ids.sizes()[0], top_k = ids.sizes()[1];
  storage = HostTensor({top_k, tokens}, ids.dtype());
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t k = 0; k < top_k; ++k) storage.set(k * tokens + t, ids.get(t * top_k + k));
  }
  tm_tensor view = *storage.desc();
  view.sizes[0] = tokens;
  view.sizes[1] = top_k;
  view.strides[0] = 1;
  view.strides[1] = tokens;
  return view;
}

// Seeds from the test name so that a failure reproduces, while each test draws its own data.
inline std::mt19937_64 rng_for_test() {
  const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
  const std::string key = std::string(info->test_suite_name()) + "." + info->name();
  return std::mt19937_64(std::hash<std::string>{}(key));
}

// Expects `status` to equal `expected` and the last error to mention `fragment`.
#define TM_EXPECT_ERROR(call, expected, fragment)                                 \
  do {                                                                            \
    const tm_status tm_status_ = (call);                                          \
    EXPECT_EQ(tm_status_, (expected)) << "call: " #call;                          \
    const std::string tm_msg_ = tm_last_error();                                  \
    EXPECT_NE(tm_msg_.find(fragment), std::string::npos)                          \
        << "message '" << tm_msg_ << "' does not mention '" << (fragment) << "'"; \
  } while (0)

#define TM_ASSERT_OK(call) ASSERT_EQ((call), TM_OK) << tm_last_error()

}  // namespace turbomoe::testing
