// tm_scale_unless_one: argument checks and the CPU / CUDA dispatch.
#include "common/device.h"
#include "common/tensor.h"
#include "loss/loss.h"

extern "C" {

tm_status tm_scale_unless_one(const tm_tensor* scale, tm_tensor* x, void* stream) {
  return turbomoe::guard(__func__, [&] {
    const turbomoe::Arg s(scale, "scale"), a(x, "x");
    s.dtype_in({TM_DTYPE_FLOAT32});
    if (s.numel() != 1) {
      turbomoe::invalid("scale has " + std::to_string(s.numel()) + " elements, expected 1");
    }
    a.dtype_in({TM_DTYPE_FLOAT32, TM_DTYPE_BFLOAT16}).contiguous();
    const int32_t device = turbomoe::common_device({&s, &a});
    turbomoe::require_cuda_build(device, "tm_scale_unless_one");
    if (a.numel() == 0) return;
    if (device == TM_DEVICE_CPU) {
      turbomoe::loss::scale_unless_one_cpu(s, a);
    } else {
      TM_CUDA_ONLY(turbomoe::loss::scale_unless_one_cuda(s, a, stream));
    }
  });
}

}  // extern "C"
