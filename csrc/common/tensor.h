// Checked access to the tm_tensor descriptors that cross the C ABI. Every entry point validates
// its arguments through these helpers, so each message names the argument and what was expected.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <string>

#include "common/error.h"
#include "turbomoe/turbomoe.h"

namespace turbomoe {

const char* dtype_name(int32_t dtype);
const char* device_name(int32_t device_type);
std::string shape_string(const tm_tensor& t);
size_t dtype_size(int32_t dtype);
bool is_floating(int32_t dtype);

// A validated tensor argument. Holds the descriptor by reference; the caller's struct outlives
// every call.
class Arg {
 public:
  // Rejects NULL, an unknown dtype/device, a bad rank, negative sizes, and a NULL data pointer
  // on a tensor that has elements.
  Arg(const tm_tensor* t, const char* name);

  const tm_tensor& t() const { return *t_; }
  const char* name() const { return name_; }
  int64_t numel() const;
  int64_t size(int dim) const { return t_->sizes[dim]; }
  int64_t stride(int dim) const { return t_->strides[dim]; }
  int ndim() const { return t_->ndim; }
  int32_t dtype() const { return t_->dtype; }
  int32_t device_type() const { return t_->device_type; }
  void* data() const { return t_->data; }
  template <typename T>
  T* ptr() const {
    return static_cast<T*>(t_->data);
  }

  const Arg& dtype_in(std::initializer_list<int32_t> allowed) const;
  const Arg& floating() const;  // float32 / bfloat16 / float16
  const Arg& index() const;     // int32 / int64
  const Arg& ndim_is(int n) const;
  const Arg& size_is(int dim, int64_t expected, const char* what) const;
  const Arg& contiguous() const;       // row-major, dense
  const Arg& rows_contiguous() const;  // last-dim stride 1 (rows may be padded)
  const Arg& same_dtype(const Arg& other) const;
  const Arg& same_shape(const Arg& other) const;

 private:
  const tm_tensor* t_;
  const char* name_;
};

// An optional argument: NULL gives an empty optional; anything else is validated like Arg.
inline std::optional<Arg> optional_arg(const tm_tensor* t, const char* name) {
  if (t == nullptr) return std::nullopt;
  return Arg(t, name);
}

// Workspaces are caller-owned scratch buffers: large enough for what the size query returned
// (else TM_ERR_OUT_OF_MEMORY naming that query), non-NULL and 16-byte aligned when needed.
inline constexpr size_t kWorkspaceAlignment = 16;
void check_workspace(const void* workspace, size_t bytes, size_t needed, const char* query);

// Every tensor of one call must live on one device; returns that device type.
int32_t common_device(std::initializer_list<const Arg*> args);

// Throws unless params is non-NULL and its struct_size matches this build's layout.
template <typename Params>
const Params& check_params(const Params* params, const char* name) {
  if (params == nullptr) invalid(std::string(name) + " is NULL");
  if (params->struct_size != sizeof(Params)) {
    invalid(std::string(name) + ".struct_size is " + std::to_string(params->struct_size) +
            ", expected " + std::to_string(sizeof(Params)) +
            " (header and library versions differ?)");
  }
  return *params;
}

}  // namespace turbomoe
