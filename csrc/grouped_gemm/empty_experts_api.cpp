// C ABI of tm_zero_empty_experts: validation, then the CPU reference or the kernel.
#include <cstdint>
#include <limits>

#include "common/device.h"
#include "grouped_gemm/grouped_gemm.h"
#include "permute/expert_offsets.h"

using turbomoe::Arg;

extern "C" {

tm_status tm_zero_empty_experts(const tm_tensor* expert_offsets, tm_tensor* out, void* stream) {
  return turbomoe::guard(__func__, [&] {
    const Arg off(expert_offsets, "expert_offsets"), oa(out, "out");
    oa.dtype_in({TM_DTYPE_FLOAT32, TM_DTYPE_BFLOAT16}).ndim_is(3).contiguous();
    turbomoe::check_expert_offsets_shape(off);
    off.size_is(0, oa.size(0) + 1, "E + 1, E from out");
    const int32_t device = turbomoe::common_device({&off, &oa});
    turbomoe::require_cuda_build(device, __func__);
    if (device == TM_DEVICE_CPU) {
      turbomoe::check_expert_offsets_values(off, std::numeric_limits<int32_t>::max());
    }
    if (oa.numel() == 0) return;
    if (device == TM_DEVICE_CPU) {
      turbomoe::grouped_gemm::zero_empty_experts_cpu(off, oa);
    } else {
      TM_CUDA_ONLY(turbomoe::grouped_gemm::zero_empty_experts_cuda(off, oa, stream));
    }
  });
}

}  // extern "C"
