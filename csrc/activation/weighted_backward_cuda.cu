// CUDA kernel of tm_swiglu_weighted_backward: one warp a row (the routing weight's gradient is a
// dot product over the row), 16-byte accesses where every view allows them. Per element it reads
// grad_rows, gate and up once and writes grad_gate, grad_up and weighted_act once: 6 elements of
// traffic against 14 for the composed activation, combine-backward, scaling and SwiGLU-backward
// passes it replaces (docs/perf-notes.md).
#include "activation/activation.h"
#include "activation/swiglu_math.h"
#include "activation/vector_io.cuh"
#include "common/cuda_utils.cuh"
#include "common/launch.cuh"

namespace turbomoe::activation {
namespace {

// v rounded to T's precision, as storing it in a T tensor and reading it back would.
template <typename T>
__device__ __forceinline__ float rounded(float v) {
  T t;
  cuda::store(&t, v);
  return cuda::load(&t);
}

// V elements of row r from column c: one 16-byte access when V > 1 (unit column stride), else
// one strided element.
template <typename T, int V>
__device__ __forceinline__ void load_elems(const View2d& v, int64_t r, int64_t c, float* out) {
  if constexpr (V > 1) {
    load_pack<T, V>(v, r, c, out);
  } else {
    out[0] = cuda::load(static_cast<const T*>(v.data) + r * v.s0 + c * v.s1);
  }
}

template <typename T, int V>
__device__ __forceinline__ void store_elems(const View2d& v, int64_t r, int64_t c,
                                            const float* in) {
  if constexpr (V > 1) {
    store_pack<T, V>(v, r, c, in);
  } else {
    cuda::store(static_cast<T*>(v.data) + r * v.s0 + c * v.s1, in[0]);
  }
}

struct RowArgs {
  View2d grad_rows, gate, up, grad_gate, grad_up, weighted_act;  // weighted_act.data may be null
  const void* row_weights;
  int64_t row_weights_stride;
  float* grad_weights;
  int64_t grad_weights_stride;
};

constexpr int kThreads = 256;

// Four blocks an SM: 64 registers a thread, without spills (ptxas, sm_90a, bf16 x 8); left to
// itself ptxas took 72, three blocks, and the kernel ran at half its memory floor (H100).
template <typename T, typename W, int V>
__global__ void __launch_bounds__(kThreads, 4)
    swiglu_weighted_backward_kernel(tm_swiglu_params p, int64_t rows, int64_t cols, RowArgs a) {
  cuda::wait_for_prior_grids();
  cuda::allow_next_grid();
  const int lane = static_cast<int>(threadIdx.x & 31);
  const int64_t warps_per_block = blockDim.x / 32;
  const int64_t warps = gridDim.x * warps_per_block;
  const bool want_weighted = a.weighted_act.data != nullptr;
  for (int64_t r = blockIdx.x * warps_per_block + threadIdx.x / 32; r < rows; r += warps) {
    const float w = cuda::load(static_cast<const W*>(a.row_weights) + r * a.row_weights_stride);
    const float w_rounded = rounded<T>(w);
    float dot = 0.0f;
    for (int64_t c = static_cast<int64_t>(lane) * V; c < cols; c += 32 * V) {
      float g[V], u[V], grad[V], dg[V], du[V], weighted[V];
      load_elems<T, V>(a.gate, r, c, g);
      load_elems<T, V>(a.up, r, c, u);
      load_elems<T, V>(a.grad_rows, r, c, grad);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const float act = rounded<T>(swiglu_value(p.variant, p.alpha, p.limit, g[j], u[j]));
        dot += grad[j] * act;
        weighted[j] = act * w_rounded;
        const float grad_act = rounded<T>(w * grad[j]);
        float dgj, duj;
        swiglu_grads(p.variant, p.alpha, p.limit, g[j], u[j], &dgj, &duj);
        dg[j] = grad_act * dgj;
        du[j] = grad_act * duj;
      }
      store_elems<T, V>(a.grad_gate, r, c, dg);
      store_elems<T, V>(a.grad_up, r, c, du);
      if (want_weighted) store_elems<T, V>(a.weighted_act, r, c, weighted);
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      dot += __shfl_xor_sync(0xffffffffu, dot, offset);
    }
    if (lane == 0) a.grad_weights[r * a.grad_weights_stride] = dot;
  }
}

}  // namespace

void swiglu_weighted_backward_cuda(const tm_swiglu_params& p, const Arg& grad_rows, const Arg& gate,
                                   const Arg& up, const Arg& row_weights, const Arg& grad_gate,
                                   const Arg& grad_up, const Arg* weighted_act,
                                   const Arg& grad_weights, void* stream) {
  cuda::DeviceGuard device(gate.t().device_index);
  RowArgs a{};
  a.grad_rows = view(grad_rows);
  a.gate = view(gate);
  a.up = view(up);
  a.grad_gate = view(grad_gate);
  a.grad_up = view(grad_up);
  a.weighted_act = weighted_act != nullptr ? view(*weighted_act) : View2d{nullptr, 0, 0};
  a.row_weights = row_weights.data();
  a.row_weights_stride = row_weights.stride(0);
  a.grad_weights = grad_weights.ptr<float>();
  a.grad_weights_stride = grad_weights.stride(0);
  const int width = weighted_act != nullptr
                        ? vector_width({&grad_rows, &gate, &up, &grad_gate, &grad_up, weighted_act})
                        : vector_width({&grad_rows, &gate, &up, &grad_gate, &grad_up});
  const unsigned blocks = cuda::blocks_for(gate.size(0) * 32, kThreads);
  cuda::dispatch_floating(gate.dtype(), [&](auto tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    cuda::dispatch_floating(row_weights.dtype(), [&](auto w_tag) {
      using W = std::remove_pointer_t<decltype(w_tag)>;
      const auto launch = [&](auto kernel) {
        cuda::launch("swiglu_weighted_backward_kernel", kernel, blocks, kThreads, 0,
                     cuda::as_stream(stream), p, gate.size(0), gate.size(1), a);
      };
      // Every view has T's dtype, so the width is 16 bytes of T or 1.
      if (width > 1) {
        launch(swiglu_weighted_backward_kernel<T, W, 16 / sizeof(T)>);
      } else {
        launch(swiglu_weighted_backward_kernel<T, W, 1>);
      }
    });
  });
}

}  // namespace turbomoe::activation
