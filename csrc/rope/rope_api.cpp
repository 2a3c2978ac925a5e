// C ABI of RoPE: validation, then the CPU reference or the CUDA kernels.
#include <string>

#include "common/device.h"
#include "rope/rope.h"

namespace {

using turbomoe::Arg;

const tm_rope_params& check_rope_params(const tm_rope_params* params) {
  const auto& p = turbomoe::check_params(params, "params");
  if (p.interleaved != 0 && p.interleaved != 1) {
    turbomoe::invalid("params.interleaved is " + std::to_string(p.interleaved) +
                      ", expected 0 or 1");
  }
  return p;
}

// in is x (forward) or grad_out (backward); out is out or grad_x. Returns the device type.
int32_t check_call(const tm_rope_params& p, const Arg& in, const Arg& cos, const Arg& sin,
                   const Arg& out) {
  in.dtype_in({TM_DTYPE_FLOAT32, TM_DTYPE_BFLOAT16}).ndim_is(4);
  cos.dtype_in({TM_DTYPE_FLOAT32, TM_DTYPE_BFLOAT16}).ndim_is(3);
  sin.dtype_in({TM_DTYPE_FLOAT32, TM_DTYPE_BFLOAT16}).same_dtype(cos).same_shape(cos);
  const std::string cos_shape = turbomoe::shape_string(cos.t());
  const int64_t batch = in.size(0), seq = in.size(2), dim = in.size(3), rot = cos.size(2);
  if (cos.size(0) != batch && cos.size(0) != 1) {
    turbomoe::invalid("cos has shape " + cos_shape + ": dim 0 must be " + std::to_string(batch) +
                      " (the batch of " + in.name() + ") or 1");
  }
  const std::string seq_what = std::string("the sequence length, dim 2, of ") + in.name();
  cos.size_is(1, seq, seq_what.c_str());
  if (rot % 2 != 0) {
    turbomoe::invalid("cos has shape " + cos_shape + ": the rotary dims (last dim) must be even");
  }
  if (rot > dim) {
    turbomoe::invalid("cos has shape " + cos_shape + ": the rotary dims (last dim) must be <= " +
                      std::to_string(dim) + ", the head dim of " + in.name());
  }
  out.dtype_in({TM_DTYPE_FLOAT32, TM_DTYPE_BFLOAT16}).same_shape(in);
  // The interleaved layout moves values between dims, so a kernel writing in place would
  // overwrite inputs other threads have yet to read.
  if (p.interleaved && out.data() == in.data() && out.numel() > 0) {
    turbomoe::invalid(std::string(out.name()) + " aliases " + in.name() +
                      ": in-place RoPE is supported only when params.interleaved is 0");
  }
  return turbomoe::common_device({&in, &cos, &sin, &out});
}

void run(const char* function, const tm_rope_params& p, bool backward, const Arg& in,
         const Arg& cos, const Arg& sin, const Arg& out, void* stream) {
  const int32_t device = check_call(p, in, cos, sin, out);
  turbomoe::require_cuda_build(device, function);
  if (in.numel() == 0) return;
  if (device == TM_DEVICE_CPU) {
    turbomoe::rope::apply_cpu(p.interleaved != 0, backward, in, cos, sin, out);
  } else {
    TM_CUDA_ONLY(
        turbomoe::rope::apply_cuda(p.interleaved != 0, backward, in, cos, sin, out, stream));
  }
}

}  // namespace

extern "C" {

tm_status tm_rope_forward(const tm_rope_params* params, const tm_tensor* x, const tm_tensor* cos,
                          const tm_tensor* sin, tm_tensor* out, void* stream) {
  return turbomoe::guard(__func__, [&] {
    const auto& p = check_rope_params(params);
    const Arg xa(x, "x"), ca(cos, "cos"), sa(sin, "sin"), oa(out, "out");
    run(__func__, p, /*backward=*/false, xa, ca, sa, oa, stream);
  });
}

tm_status tm_rope_backward(const tm_rope_params* params, const tm_tensor* grad_out,
                           const tm_tensor* cos, const tm_tensor* sin, tm_tensor* grad_x,
                           void* stream) {
  return turbomoe::guard(__func__, [&] {
    const auto& p = check_rope_params(params);
    const Arg go(grad_out, "grad_out"), ca(cos, "cos"), sa(sin, "sin"), gx(grad_x, "grad_x");
    run(__func__, p, /*backward=*/true, go, ca, sa, gx, stream);
  });
}

}  // extern "C"
