// CUDA kernel of tm_swiglu_weighted_backward: one warp a row (the routing weight's gradient is a
// dot product over the row), 16-byte accesses where every view allows them. Per element it reads
// grad_rows, gate and up once and writes grad_gate, grad_up and weighted_act once: 6 elements of
// traffic against 14 for the composed activation, combine-backward, scaling and SwiGLU-backward
// passes it replaces (docs/perf-notes.md).
#include "activation/activation.h"
#include "activation/swiglu_math.h"
#include "activation/vector_io.cuh"
#include "common/cuda_utils.cuh"

namespace turbomoe::activation {
namespace {

// v rounded to T's precision, as storing it in a T tensor and reading it back would.
template <typename T>
__device__ __forceinline__ float rounded(float v) {
  T t;
  cuda::store(&t, v);
  return cuda::load(&t);
}

// Element (r, c) of a strided view (the scalar path).
template <typename T>
__device__ __forceinline__ float load_elem(const View2d& v, int64_t r, int64_t c) {
  return cuda::load(static_cast<const T*>(v.data) + r * v.s0 + c * v.s1);
}

template <typename T>
__device__ __forceinline__ void store_elem(const View2d& v, int64_t r, int64_t c, float value) {
  cuda::store(static_cast<T*>(v.data) + r * v.s0 + c * v.s1, value);
}

struct RowArgs {
  View2d grad_rows, gate, up, grad_gate, grad_up, weighted_act;  // weighted_act.data may be null
  const void* row_weights;
  int64_t row_weights_stride;
  float* grad_weights;
  int64_t grad_weights_stride;
};

constexpr int kThreads = 256;

// Vectors of a row a lane loads before it computes with any of them: with one access at a time
// (the first version) a warp had three 16-byte loads a lane in flight and the kernel ran at half
// its memory floor on an H100 (0.200 ms against 0.103 at 32k x 768). Three make a whole row of
// the Qwen3-30B-A3B width (I = 768, bf16) one batch: nine loads a lane in flight, held packed.
constexpr int kBatch = 3;

// The math of V elements: d holds the gradient of the row's output (U), g and u the gate and up
// values; writes gate/up's gradients and w ⊙ act, adds ⟨U, act⟩ to dot.
template <typename T, int V>
__device__ __forceinline__ void weighted_elems(const tm_swiglu_params& p, float w, float w_rounded,
                                               const float* g, const float* u, const float* grad,
                                               float* dg, float* du, float* weighted, float* dot) {
#pragma unroll
  for (int j = 0; j < V; ++j) {
    const float act = rounded<T>(swiglu_value(p.variant, p.alpha, p.limit, g[j], u[j]));
    *dot += grad[j] * act;
    weighted[j] = act * w_rounded;
    const float grad_act = rounded<T>(w * grad[j]);
    float dgj, duj;
    swiglu_grads(p.variant, p.alpha, p.limit, g[j], u[j], &dgj, &duj);
    dg[j] = grad_act * dgj;
    du[j] = grad_act * duj;
  }
}

template <typename T, int V>
__device__ __forceinline__ Pack<T, V> load_raw(const View2d& v, int64_t r, int64_t c) {
  return *reinterpret_cast<const Pack<T, V>*>(static_cast<const T*>(v.data) + r * v.s0 + c);
}

template <typename T, int V>
__device__ __forceinline__ void unpack(const Pack<T, V>& pack, float* out) {
#pragma unroll
  for (int j = 0; j < V; ++j) out[j] = cuda::load(&pack.v[j]);
}

// Two blocks an SM for the vector path: the batch's packed vectors (36 registers with bf16 x 8)
// and the math take 124 registers without spills (ptxas, sm_90a; capped at 80 for three blocks
// it spilled 96 bytes a thread); 16 warps an SM then keep ~74 KB of loads in flight.
template <typename T, typename W, int V>
__global__ void __launch_bounds__(kThreads, V > 1 ? 2 : 4)
    swiglu_weighted_backward_kernel(tm_swiglu_params p, int64_t rows, int64_t cols, RowArgs a) {
  const int lane = static_cast<int>(threadIdx.x & 31);
  const int64_t warps_per_block = blockDim.x / 32;
  const int64_t warps = gridDim.x * warps_per_block;
  const bool want_weighted = a.weighted_act.data != nullptr;
  for (int64_t r = blockIdx.x * warps_per_block + threadIdx.x / 32; r < rows; r += warps) {
    const float w = cuda::load(static_cast<const W*>(a.row_weights) + r * a.row_weights_stride);
    const float w_rounded = rounded<T>(w);
    float dot = 0.0f;
    if constexpr (V > 1) {
      for (int64_t c0 = static_cast<int64_t>(lane) * V; c0 < cols; c0 += 32 * V * kBatch) {
        Pack<T, V> pg[kBatch], pu[kBatch], pd[kBatch];
#pragma unroll
        for (int b = 0; b < kBatch; ++b) {
          const int64_t c = c0 + b * 32 * V;
          if (c < cols) {
            pg[b] = load_raw<T, V>(a.gate, r, c);
            pu[b] = load_raw<T, V>(a.up, r, c);
            pd[b] = load_raw<T, V>(a.grad_rows, r, c);
          }
        }
#pragma unroll
        for (int b = 0; b < kBatch; ++b) {
          const int64_t c = c0 + b * 32 * V;
          if (c >= cols) break;
          float g[V], u[V], grad[V], dg[V], du[V], weighted[V];
          unpack<T, V>(pg[b], g);
          unpack<T, V>(pu[b], u);
          unpack<T, V>(pd[b], grad);
          weighted_elems<T, V>(p, w, w_rounded, g, u, grad, dg, du, weighted, &dot);
          store_pack<T, V>(a.grad_gate, r, c, dg);
          store_pack<T, V>(a.grad_up, r, c, du);
          if (want_weighted) store_pack<T, V>(a.weighted_act, r, c, weighted);
        }
      }
    } else {
      for (int64_t c = lane; c < cols; c += 32) {
        const float g = load_elem<T>(a.gate, r, c);
        const float u = load_elem<T>(a.up, r, c);
        const float grad = load_elem<T>(a.grad_rows, r, c);
        float dg, du, weighted;
        weighted_elems<T, 1>(p, w, w_rounded, &g, &u, &grad, &dg, &du, &weighted, &dot);
        store_elem<T>(a.grad_gate, r, c, dg);
        store_elem<T>(a.grad_up, r, c, du);
        if (want_weighted) store_elem<T>(a.weighted_act, r, c, weighted);
      }
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
        kernel<<<blocks, kThreads, 0, cuda::as_stream(stream)>>>(p, gate.size(0), gate.size(1), a);
      };
      // Every view has T's dtype, so the width is 16 bytes of T or 1.
      if (width > 1) {
        launch(swiglu_weighted_backward_kernel<T, W, 16 / sizeof(T)>);
      } else {
        launch(swiglu_weighted_backward_kernel<T, W, 1>);
      }
    });
  });
  cuda::check_launch("swiglu_weighted_backward_kernel");
}

}  // namespace turbomoe::activation
