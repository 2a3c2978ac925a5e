// CUDA kernels of the gated activations, float32 arithmetic, one read of each input and one
// write of each output. Two forms: a vectorised one (16-byte loads and stores, one index
// division per vector) for row-contiguous views with aligned rows, which is what the MoE layer
// passes (the two halves of the grouped GEMM's [M, 2I] output), and a scalar grid-stride loop
// over arbitrary strided 2-D views for everything else. The scalar form ran the 32k x 768
// SwiGLU at ~1.1 TB/s on an H200 (docs/perf-notes.md), a third of the memory bandwidth.
#include "activation/activation.h"
#include "activation/swiglu_math.h"
#include "activation/vector_io.cuh"
#include "common/cuda_utils.cuh"
#include "common/launch.cuh"

namespace turbomoe::activation {
namespace {

template <typename In, typename Out>
__global__ void swiglu_forward_kernel(tm_swiglu_params p, int64_t rows, int64_t cols, View2d g,
                                      View2d u, View2d o) {
  cuda::wait_for_prior_grids();
  cuda::allow_next_grid();
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
  cuda::wait_for_prior_grids();
  cuda::allow_next_grid();
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

// Vectorised forms: every view has unit column stride, row strides and base addresses aligned
// to V elements, and cols % V == 0 (checked by vector_width on the host).
template <typename In, typename Out, int V>
__global__ void swiglu_forward_vec_kernel(tm_swiglu_params p, int64_t rows, int64_t cols, View2d g,
                                          View2d u, View2d o) {
  cuda::wait_for_prior_grids();
  cuda::allow_next_grid();
  const int64_t per_row = cols / V;
  const int64_t n = rows * per_row;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / per_row, c = (i - r * per_row) * V;
    float gv[V], uv[V], ov[V];
    load_pack<In, V>(g, r, c, gv);
    load_pack<In, V>(u, r, c, uv);
#pragma unroll
    for (int j = 0; j < V; ++j) ov[j] = swiglu_value(p.variant, p.alpha, p.limit, gv[j], uv[j]);
    store_pack<Out, V>(o, r, c, ov);
  }
}

template <typename In, typename Go, typename Out, int V>
__global__ void swiglu_backward_vec_kernel(tm_swiglu_params p, int64_t rows, int64_t cols,
                                           View2d go, View2d g, View2d u, View2d dg, View2d du) {
  cuda::wait_for_prior_grids();
  cuda::allow_next_grid();
  const int64_t per_row = cols / V;
  const int64_t n = rows * per_row;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / per_row, c = (i - r * per_row) * V;
    float gv[V], uv[V], gov[V], dgv[V], duv[V];
    load_pack<In, V>(g, r, c, gv);
    load_pack<In, V>(u, r, c, uv);
    load_pack<Go, V>(go, r, c, gov);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      float dgj, duj;
      swiglu_grads(p.variant, p.alpha, p.limit, gv[j], uv[j], &dgj, &duj);
      dgv[j] = gov[j] * dgj;
      duv[j] = gov[j] * duj;
    }
    store_pack<Out, V>(dg, r, c, dgv);
    store_pack<Out, V>(du, r, c, duv);
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
      const auto launch = [&](auto kernel, int v) {
        cuda::launch("swiglu_forward_kernel", kernel, cuda::blocks_for(n / v, kThreads), kThreads,
                     0, cuda::as_stream(stream), p, gate.size(0), gate.size(1), view(gate),
                     view(up), view(out));
      };
      switch (vector_width({&gate, &up, &out})) {
        case 8:
          launch(swiglu_forward_vec_kernel<In, Out, 8>, 8);
          break;
        case 4:
          launch(swiglu_forward_vec_kernel<In, Out, 4>, 4);
          break;
        default:
          launch(swiglu_forward_kernel<In, Out>, 1);
      }
    });
  });
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
        const auto launch = [&](auto kernel, int v) {
          cuda::launch("swiglu_backward_kernel", kernel, cuda::blocks_for(n / v, kThreads),
                       kThreads, 0, cuda::as_stream(stream), p, gate.size(0), gate.size(1),
                       view(grad_out), view(gate), view(up), view(grad_gate), view(grad_up));
        };
        switch (vector_width({&grad_out, &gate, &up, &grad_gate, &grad_up})) {
          case 8:
            launch(swiglu_backward_vec_kernel<In, Go, Out, 8>, 8);
            break;
          case 4:
            launch(swiglu_backward_vec_kernel<In, Go, Out, 4>, 4);
            break;
          default:
            launch(swiglu_backward_kernel<In, Go, Out>, 1);
        }
      });
    });
  });
}

}  // namespace turbomoe::activation
