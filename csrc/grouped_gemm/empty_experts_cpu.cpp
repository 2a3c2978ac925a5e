// CPU reference of tm_zero_empty_experts.
#include <cstring>

#include "common/tensor.h"
#include "grouped_gemm/grouped_gemm.h"

namespace turbomoe::grouped_gemm {

void zero_empty_experts_cpu(const Arg& offsets, const Arg& dw) {
  const int32_t* off = offsets.ptr<const int32_t>();
  const int64_t experts = dw.size(0);
  const int64_t slice_bytes = dw.numel() / experts * dtype_size(dw.dtype());
  auto* base = static_cast<unsigned char*>(dw.t().data);
  for (int64_t e = 0; e < experts; ++e) {
    if (off[e + 1] == off[e]) std::memset(base + e * slice_bytes, 0, slice_bytes);
  }
}

}  // namespace turbomoe::grouped_gemm
