// CUDA kernels of the gated activations: a grid-stride loop over strided 2-D views, float32
// arithmetic, one read of each input and one write of each output.
#include "activation/activation.h"
#include "activation/swiglu_math.h"
#include "common/cuda_utils.cuh"

namespace turbomoe::activation {
namespace {

struct View2d {
  void* data;
  int64_t s0, s1;
};

View2d view(const Arg& a) { return {a.data(), a.stride(0), a.stride(1)}; }

template <typename In, typename Out>
__global__ void swiglu_forward_kernel(tm_swiglu_params p, int64_t rows, int64_t cols, View2d g,
                                      View2d u, View2d o) {
  const int64_t n = rows * cols;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / cols, c = i % cols;
    const float gv = cuda::load(static_cast<const In*>(g.data) + r * g.s0 + c * g.s1);
    const float uv = cuda::load(static_cast<const In*>(u.data) + r * u.s0 + c * u.s1);
    cuda::store(static_cast<Out*>(o.data) + r * o.s0 + c * o.s1,
                swiglu_value(p.variant, p.alpha, p.limit, gv, uv));
  }
}

template <typename In, typename Go, typename Out>
__global__ void swiglu_backward_kernel(tm_swiglu_params p, int64_t rows, int64_t cols, View2d go,
                                       View2d g, View2d u, View2d dg, View2d du) {
  const int64_t n = rows * cols;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / cols, c = i % cols;
    const float gv = cuda::load(static_cast<const In*>(g.data) + r * g.s0 + c * g.s1);
    const float uv = cuda::load(static_cast<const In*>(u.data) + r * u.s0 + c * u.s1);
    const float gov = cuda::load(static_cast<const Go*>(go.data) + r * go.s0 + c * go.s1);
    float dgv, duv;
    swiglu_grads(p.variant, p.alpha, p.limit, gv, uv, &dgv, &duv);
    cuda::store(static_cast<Out*>(dg.data) + r * dg.s0 + c * dg.s1, gov * dgv);
    cuda::store(static_cast<Out*>(du.data) + r * du.s0 + c * du.s1, gov * duv);
  }
}

constexpr int kThreads = 256;

}  // namespace

void swiglu_forward_cuda(const tm_swiglu_params& p, const Arg& gate, const Arg& up, const Arg& out,
                         void* stream) {
  cuda::DeviceGuard device(gate.t().device_index);
  const int64_t n = gate.numel();
  cuda::dispatch_floating(gate.dtype(), [&](auto in_tag) {
    using In = std::remove_pointer_t<decltype(in_tag)>;
    cuda::dispatch_floating(out.dtype(), [&](auto out_tag) {
      using Out = std::remove_pointer_t<decltype(out_tag)>;
      swiglu_forward_kernel<In, Out>
          <<<cuda::blocks_for(n, kThreads), kThreads, 0, cuda::as_stream(stream)>>>(
              p, gate.size(0), gate.size(1), view(gate), view(up), view(out));
    });
  });
  cuda::check_launch("swiglu_forward_kernel");
}

void swiglu_backward_cuda(const tm_swiglu_params& p, const Arg& grad_out, const Arg& gate,
                          const Arg& up, const Arg& grad_gate, const Arg& grad_up, void* stream) {
  cuda::DeviceGuard device(gate.t().device_index);
  const int64_t n = gate.numel();
  cuda::dispatch_floating(gate.dtype(), [&](auto in_tag) {
    using In = std::remove_pointer_t<decltype(in_tag)>;
    cuda::dispatch_floating(grad_out.dtype(), [&](auto go_tag) {
      using Go = std::remove_pointer_t<decltype(go_tag)>;
      cuda::dispatch_floating(grad_gate.dtype(), [&](auto out_tag) {
        using Out = std::remove_pointer_t<decltype(out_tag)>;
        swiglu_backward_kernel<In, Go, Out>
            <<<cuda::blocks_for(n, kThreads), kThreads, 0, cuda::as_stream(stream)>>>(
                p, gate.size(0), gate.size(1), view(grad_out), view(gate), view(up),
                view(grad_gate), view(grad_up));
      });
    });
  });
  cuda::check_launch("swiglu_backward_kernel");
}

}  // namespace turbomoe::activation
