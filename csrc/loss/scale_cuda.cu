// CUDA kernel of tm_scale_unless_one: every thread reads the scale and leaves at once when it is
// 1, so a unit seed costs one small launch; otherwise a grid-stride pass, 16 bytes at a time.
#include <algorithm>
#include <type_traits>

#include "common/cuda_utils.cuh"
#include "common/launch.cuh"
#include "loss/loss.h"
#include "rmsnorm/vector_io.cuh"

namespace turbomoe::loss {
namespace {

constexpr int kThreads = 256;
constexpr unsigned kMaxBlocks = 1024;

template <typename T, int N>
__global__ void __launch_bounds__(kThreads)
    scale_unless_one_kernel(const float* scale, T* x, int64_t vectors) {
  cuda::wait_for_prior_grids();
  cuda::allow_next_grid();
  const float s = *scale;
  if (s == 1.0f) return;
  const float rounded = cuda::round_to<T>(s);
  const int64_t stride = int64_t(gridDim.x) * kThreads;
  for (int64_t v = int64_t(blockIdx.x) * kThreads + threadIdx.x; v < vectors; v += stride) {
    float a[N];
    cuda::load_floats<N>(x + v * N, a);
#pragma unroll
    for (int i = 0; i < N; ++i) a[i] *= rounded;
    cuda::store_floats<N>(x + v * N, a);
  }
}

}  // namespace

void scale_unless_one_cuda(const Arg& scale, const Arg& x, void* stream) {
  cuda::DeviceGuard device(x.t().device_index);
  const int64_t n = x.numel();
  const bool vec = n % cuda::kVecElems == 0 && cuda::vectorisable(x);
  const int64_t vectors = vec ? n / cuda::kVecElems : n;
  // Grid-stride: a few blocks an SM of any GPU stream the pass when it runs, and are few to
  // launch when it does not.
  const unsigned blocks = std::min(cuda::blocks_for(vectors, kThreads), kMaxBlocks);
  cuda::dispatch_f32_bf16(x.dtype(), [&](auto tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    auto kernel = vec ? scale_unless_one_kernel<T, cuda::kVecElems> : scale_unless_one_kernel<T, 1>;
    cuda::launch("scale_unless_one_kernel", kernel, blocks, kThreads, 0, cuda::as_stream(stream),
                 scale.ptr<const float>(), x.ptr<T>(), vectors);
  });
}

}  // namespace turbomoe::loss
