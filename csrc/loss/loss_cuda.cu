// CUDA kernels of cross-entropy: one block per row. The forward keeps a running (max, sum of
// exp) per thread (online softmax: one read of the row, stable for any logit range) and merges
// the threads' pairs in a fixed order. The backward is one more read and one write per element.
// A label outside [0, V) that is not ignore_index cannot be reported without synchronising the
// host, so its row gets a NaN loss and NaN gradients instead.
#include <climits>
#include <type_traits>

#include "common/launch.cuh"
#include "loss/ce_math.cuh"
#include "loss/loss.h"
#include "rmsnorm/vector_io.cuh"

namespace turbomoe::loss {
namespace {

constexpr int kThreads = 256;

template <typename T, int N>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(int64_t vocab, const T* logits, int64_t row_stride, Labels labels,
                   int64_t ignore_index, float* loss, int64_t loss_stride, float* lse,
                   int64_t lse_stride) {
  cuda::wait_for_prior_grids();
  cuda::allow_next_grid();
  const int64_t row = blockIdx.x;
  const int64_t label = label_at(labels, row);
  if (label == ignore_index) {  // the whole block leaves together
    if (threadIdx.x == 0) {
      loss[row * loss_stride] = 0.0f;
      lse[row * lse_stride] = 0.0f;
    }
    return;
  }
  const T* z = logits + row * row_stride;
  float m = -INFINITY, s = 0.0f;
#pragma unroll 4
  for (int64_t c = int64_t(threadIdx.x) * N; c < vocab; c += kThreads * N) {
    float v[N];
    cuda::load_floats<N>(z + c, v);
    online_add<N>(m, s, v);
  }
  block_merge<kThreads>(m, s);
  if (threadIdx.x == 0) {
    const float l = m + logf(s);
    lse[row * lse_stride] = l;
    loss[row * loss_stride] = label >= 0 && label < vocab ? l - cuda::load(z + label) : NAN;
  }
}

template <typename T, typename G, int N>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(int64_t vocab, const T* logits, int64_t row_stride, Labels labels,
                    int64_t ignore_index, const float* grad_loss, int64_t gl_stride,
                    const float* lse, int64_t lse_stride, G* grad, int64_t grad_stride) {
  cuda::wait_for_prior_grids();
  cuda::allow_next_grid();
  const int64_t row = blockIdx.x;
  const int64_t label = label_at(labels, row);
  G* d = grad + row * grad_stride;
  if (label == ignore_index) {
    for (int64_t c = int64_t(threadIdx.x) * N; c < vocab; c += kThreads * N) {
      float zero[N];
#pragma unroll
      for (int i = 0; i < N; ++i) zero[i] = 0.0f;
      cuda::store_floats<N>(d + c, zero);
    }
    return;
  }
  const T* z = logits + row * row_stride;
  const float g = grad_loss[row * gl_stride], l = lse[row * lse_stride];
  const bool valid = label >= 0 && label < vocab;
  for (int64_t c = int64_t(threadIdx.x) * N; c < vocab; c += kThreads * N) {
    float v[N];
    cuda::load_floats<N>(z + c, v);  // read before the write below: d may alias z
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const float onehot = c + i == label ? 1.0f : 0.0f;
      v[i] = valid ? g * (expf(v[i] - l) - onehot) : NAN;
    }
    cuda::store_floats<N>(d + c, v);
  }
}

template <typename T>
using Elem = std::remove_pointer_t<T>;

void check_grid(int64_t rows) {
  if (rows > INT_MAX) {
    unsupported("cross-entropy on CUDA takes at most " + std::to_string(INT_MAX) +
                " rows per call, got " + std::to_string(rows));
  }
}

}  // namespace

void ce_forward_cuda(const Arg& logits, const Arg& labels, int64_t ignore_index, const Arg& loss,
                     const Arg& lse, void* stream) {
  cuda::DeviceGuard device(logits.t().device_index);
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  check_grid(rows);
  const bool vec = vocab % cuda::kVecElems == 0 && cuda::vectorisable(logits);
  cuda::dispatch_f32_bf16(logits.dtype(), [&](auto tag) {
    using T = Elem<decltype(tag)>;
    auto kernel = vec ? forward_kernel<T, cuda::kVecElems> : forward_kernel<T, 1>;
    cuda::launch("cross-entropy forward_kernel", kernel, static_cast<unsigned>(rows), kThreads, 0,
                 cuda::as_stream(stream), vocab, logits.ptr<const T>(), logits.stride(0),
                 labels_of(labels), ignore_index, loss.ptr<float>(), loss.stride(0),
                 lse.ptr<float>(), lse.stride(0));
  });
}

void ce_backward_cuda(const Arg& grad_loss, const Arg& logits, const Arg& labels, const Arg& lse,
                      int64_t ignore_index, const Arg& grad_logits, void* stream) {
  cuda::DeviceGuard device(logits.t().device_index);
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  check_grid(rows);
  const bool vec =
      vocab % cuda::kVecElems == 0 && cuda::vectorisable(logits) && cuda::vectorisable(grad_logits);
  cuda::dispatch_f32_bf16(logits.dtype(), [&](auto t_tag) {
    using T = Elem<decltype(t_tag)>;
    cuda::dispatch_f32_bf16(grad_logits.dtype(), [&](auto g_tag) {
      using G = Elem<decltype(g_tag)>;
      auto kernel = vec ? backward_kernel<T, G, cuda::kVecElems> : backward_kernel<T, G, 1>;
      cuda::launch("cross-entropy backward_kernel", kernel, static_cast<unsigned>(rows), kThreads,
                   0, cuda::as_stream(stream), vocab, logits.ptr<const T>(), logits.stride(0),
                   labels_of(labels), ignore_index, grad_loss.ptr<const float>(),
                   grad_loss.stride(0), lse.ptr<const float>(), lse.stride(0), grad_logits.ptr<G>(),
                   grad_logits.stride(0));
    });
  });
}

}  // namespace turbomoe::loss
