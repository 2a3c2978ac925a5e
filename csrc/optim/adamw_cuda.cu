// CUDA kernel of the AdamW step: a memory-bound pass reading param, grad and both moments and
// writing param and the moments once (22 bytes an element with bf16 parameters and float32
// moments), eight elements a thread per access where every pointer allows it.
#include "common/launch.cuh"
#include "optim/adamw.h"
#include "rmsnorm/vector_io.cuh"

namespace turbomoe::optim {
namespace {

constexpr int kThreads = 256;

template <typename P, typename G, typename S, int N>
__global__ void __launch_bounds__(kThreads)
    adamw_kernel(AdamwConstants c, int64_t n, P* __restrict__ param, const G* __restrict__ grad,
                 S* __restrict__ exp_avg, S* __restrict__ exp_avg_sq,
                 const float* __restrict__ grad_scale) {
  cuda::wait_for_prior_grids();
  cuda::allow_next_grid();
  const float scale = grad_scale != nullptr ? *grad_scale : 1.0f;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x * N;
  for (int64_t i = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * N; i < n; i += stride) {
    float p[N], g[N], m[N], v[N];
    cuda::load_floats<N>(param + i, p);
    cuda::load_floats<N>(grad + i, g);
    if (grad_scale != nullptr) {
#pragma unroll
      for (int k = 0; k < N; ++k) g[k] *= scale;
    }
    cuda::load_floats<N>(exp_avg + i, m);
    cuda::load_floats<N>(exp_avg_sq + i, v);
#pragma unroll
    for (int k = 0; k < N; ++k) p[k] = adamw_element(c, p[k], g[k], m[k], v[k]);
    cuda::store_floats<N>(exp_avg + i, m);
    cuda::store_floats<N>(exp_avg_sq + i, v);
    cuda::store_floats<N>(param + i, p);
  }
}

template <typename T>
using Elem = std::remove_pointer_t<T>;

bool aligned(const Arg& a) {
  return reinterpret_cast<uintptr_t>(a.data()) % (cuda::kVecElems * dtype_size(a.dtype())) == 0;
}

}  // namespace

void adamw_cuda(const AdamwConstants& c, const Arg& param, const Arg& grad, const Arg& exp_avg,
                const Arg& exp_avg_sq, const float* grad_scale, void* stream) {
  cuda::DeviceGuard device(param.t().device_index);
  const int64_t n = param.numel();
  // The vector body covers the largest multiple of 8 elements; a scalar launch takes the rest.
  const bool vec = aligned(param) && aligned(grad) && aligned(exp_avg) && aligned(exp_avg_sq);
  const int64_t body = vec ? n / cuda::kVecElems * cuda::kVecElems : 0;
  cuda::dispatch_f32_bf16(param.dtype(), [&](auto p_tag) {
    using P = Elem<decltype(p_tag)>;
    cuda::dispatch_f32_bf16(grad.dtype(), [&](auto g_tag) {
      using G = Elem<decltype(g_tag)>;
      cuda::dispatch_f32_bf16(exp_avg.dtype(), [&](auto s_tag) {
        using S = Elem<decltype(s_tag)>;
        P* p = param.ptr<P>();
        const G* g = grad.ptr<const G>();
        S* m = exp_avg.ptr<S>();
        S* v = exp_avg_sq.ptr<S>();
        const cudaStream_t s = cuda::as_stream(stream);
        if (body > 0) {
          cuda::launch("adamw_kernel", adamw_kernel<P, G, S, cuda::kVecElems>,
                       cuda::blocks_for(body / cuda::kVecElems, kThreads), kThreads, 0, s, c, body,
                       p, g, m, v, grad_scale);
        }
        if (n > body) {
          cuda::launch("adamw_kernel", adamw_kernel<P, G, S, 1>,
                       cuda::blocks_for(n - body, kThreads), kThreads, 0, s, c, n - body, p + body,
                       g + body, m + body, v + body, grad_scale);
        }
      });
    });
  });
}

}  // namespace turbomoe::optim
