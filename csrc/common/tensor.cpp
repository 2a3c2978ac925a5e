#include "common/tensor.h"

#include <string>

namespace turbomoe {

const char* dtype_name(int32_t dtype) {
  switch (dtype) {
    case TM_DTYPE_FLOAT32:
      return "float32";
    case TM_DTYPE_BFLOAT16:
      return "bfloat16";
    case TM_DTYPE_FLOAT16:
      return "float16";
    case TM_DTYPE_INT32:
      return "int32";
    case TM_DTYPE_INT64:
      return "int64";
    default:
      return "unknown";
  }
}

const char* device_name(int32_t device_type) {
  switch (device_type) {
    case TM_DEVICE_CPU:
      return "cpu";
    case TM_DEVICE_CUDA:
      return "cuda";
    default:
      return "unknown";
  }
}

size_t dtype_size(int32_t dtype) {
  switch (dtype) {
    case TM_DTYPE_FLOAT32:
    case TM_DTYPE_INT32:
      return 4;
    case TM_DTYPE_BFLOAT16:
    case TM_DTYPE_FLOAT16:
      return 2;
    case TM_DTYPE_INT64:
      return 8;
    default:
      return 0;
  }
}

bool is_floating(int32_t dtype) {
  return dtype == TM_DTYPE_FLOAT32 || dtype == TM_DTYPE_BFLOAT16 || dtype == TM_DTYPE_FLOAT16;
}

// No iostreams in the library: with a static libstdc++ inside a process that also loaded the
// shared one (Python + torch), stream facets can fail and silently drop output.
std::string shape_string(const tm_tensor& t) {
  std::string s = "[";
  for (int i = 0; i < t.ndim; ++i) s += (i ? ", " : "") + std::to_string(t.sizes[i]);
  return s + "]";
}

Arg::Arg(const tm_tensor* t, const char* name) : t_(t), name_(name) {
  const std::string n(name);
  if (t == nullptr) invalid(n + " is NULL");
  if (dtype_size(t->dtype) == 0) invalid(n + " has unknown dtype code " + std::to_string(t->dtype));
  if (t->device_type != TM_DEVICE_CPU && t->device_type != TM_DEVICE_CUDA) {
    invalid(n + " has unknown device type " + std::to_string(t->device_type));
  }
  if (t->ndim < 0 || t->ndim > TM_MAX_DIMS) {
    invalid(n + " has rank " + std::to_string(t->ndim) + ", outside 0.." +
            std::to_string(TM_MAX_DIMS));
  }
  for (int i = 0; i < t->ndim; ++i) {
    if (t->sizes[i] < 0) invalid(n + " has negative size " + shape_string(*t));
    if (t->strides[i] < 0) invalid(n + " has a negative stride (flipped views are unsupported)");
  }
  if (t->data == nullptr && numel() > 0) invalid(n + " has a NULL data pointer");
  if (t->data != nullptr && reinterpret_cast<uintptr_t>(t->data) % dtype_size(t->dtype) != 0) {
    invalid(n + " data pointer is not aligned to its " + dtype_name(t->dtype) + " element size");
  }
}

int64_t Arg::numel() const {
  int64_t n = 1;
  for (int i = 0; i < t_->ndim; ++i) n *= t_->sizes[i];
  return n;
}

const Arg& Arg::dtype_in(std::initializer_list<int32_t> allowed) const {
  for (int32_t d : allowed) {
    if (d == t_->dtype) return *this;
  }
  std::string list;
  for (int32_t d : allowed) list += std::string(list.empty() ? "" : " or ") + dtype_name(d);
  invalid(std::string(name_) + " has dtype " + dtype_name(t_->dtype) + ", expected " + list);
}

const Arg& Arg::floating() const {
  return dtype_in({TM_DTYPE_FLOAT32, TM_DTYPE_BFLOAT16, TM_DTYPE_FLOAT16});
}

const Arg& Arg::index() const { return dtype_in({TM_DTYPE_INT32, TM_DTYPE_INT64}); }

const Arg& Arg::ndim_is(int n) const {
  if (t_->ndim != n) {
    invalid(std::string(name_) + " must have rank " + std::to_string(n) + ", got shape " +
            shape_string(*t_));
  }
  return *this;
}

const Arg& Arg::size_is(int dim, int64_t expected, const char* what) const {
  if (dim >= t_->ndim || t_->sizes[dim] != expected) {
    invalid(std::string(name_) + " has shape " + shape_string(*t_) + ": dim " +
            std::to_string(dim) + " must be " + std::to_string(expected) + " (" + what + ")");
  }
  return *this;
}

// A tensor without elements has no layout to get wrong; autograd hands such gradients with
// stride 0, so rejecting them would only force callers to copy nothing.
const Arg& Arg::contiguous() const {
  if (numel() == 0) return *this;
  int64_t expected = 1;
  for (int i = t_->ndim - 1; i >= 0; --i) {
    if (t_->sizes[i] != 1 && t_->strides[i] != expected) {
      invalid(std::string(name_) + " must be contiguous (row-major)");
    }
    expected *= t_->sizes[i];
  }
  return *this;
}

const Arg& Arg::rows_contiguous() const {
  if (numel() == 0) return *this;
  if (t_->ndim > 0 && t_->sizes[t_->ndim - 1] > 1 && t_->strides[t_->ndim - 1] != 1) {
    invalid(std::string(name_) + " must have a contiguous last dimension (stride 1)");
  }
  return *this;
}

const Arg& Arg::same_dtype(const Arg& other) const {
  if (t_->dtype != other.dtype()) {
    invalid(std::string(name_) + " has dtype " + dtype_name(t_->dtype) + " but " + other.name() +
            " has " + dtype_name(other.dtype()) + "; they must match");
  }
  return *this;
}

const Arg& Arg::same_shape(const Arg& other) const {
  bool same = t_->ndim == other.ndim();
  for (int i = 0; same && i < t_->ndim; ++i) same = t_->sizes[i] == other.size(i);
  if (!same) {
    invalid(std::string(name_) + " has shape " + shape_string(*t_) + " but " + other.name() +
            " has " + shape_string(other.t()) + "; they must match");
  }
  return *this;
}

void check_workspace(const void* workspace, size_t bytes, size_t needed, const char* query) {
  if (needed == 0) return;
  if (bytes < needed) {
    fail(TM_ERR_OUT_OF_MEMORY, "workspace_bytes is " + std::to_string(bytes) +
                                   " but this call needs " + std::to_string(needed) + " (see " +
                                   query + ")");
  }
  if (workspace == nullptr)
    invalid("workspace is NULL but this call needs " + std::to_string(needed) + " bytes");
  if (reinterpret_cast<uintptr_t>(workspace) % kWorkspaceAlignment != 0) {
    invalid("workspace must be " + std::to_string(kWorkspaceAlignment) + "-byte aligned");
  }
}

int32_t common_device(std::initializer_list<const Arg*> args) {
  const Arg* first = nullptr;
  for (const Arg* a : args) {
    if (a == nullptr) continue;
    if (first == nullptr) {
      first = a;
      continue;
    }
    if (a->device_type() != first->device_type() ||
        a->t().device_index != first->t().device_index) {
      invalid(std::string(a->name()) + " is on " + device_name(a->device_type()) + ":" +
              std::to_string(a->t().device_index) + " but " + first->name() + " is on " +
              device_name(first->device_type()) + ":" + std::to_string(first->t().device_index) +
              "; all tensors must share one device");
    }
  }
  return first == nullptr ? TM_DEVICE_CPU : first->device_type();
}

}  // namespace turbomoe
