// Cross-entropy forward and backward in one kernel, for a caller that has the upstream gradient
// before the forward (ops/loss_total.py). The two-kernel path reads every logit twice from
// memory (the forward's online softmax, then the backward); here a row is read once into shared
// memory, its log-sum-exp formed, and its gradient written from shared memory: 2 bytes of
// traffic a bf16 logit instead of 3 (Qwen3's 151,936-token head: 1.24 GB a 4096-row step less).
//
// A row of V logits is split over a cluster of C CTAs (C = 1, 2, 4 or 8, the fewest whose slice
// is small enough for several CTAs an SM), each holding V / C of them; the CTAs exchange their
// (max, sum of exp) pairs through distributed shared memory and merge all C in rank order, so
// every CTA forms the same log-sum-exp bits. Rows too long for 8 CTAs, and GPUs without clusters
// (or builds without sm_90 code), take the two-kernel path, which is also the default until
// this kernel is measured faster (docs/perf-notes.md, fourteenth session).
#include <cooperative_groups.h>

#include <climits>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "common/launch.cuh"
#include "loss/ce_math.cuh"
#include "loss/loss.h"
#include "rmsnorm/vector_io.cuh"

namespace turbomoe::loss {
namespace {

namespace cg = cooperative_groups;

// Several CTAs an SM: while one waits for its slice's loads (latency-bound on its own), the
// others load or write. A first version with the fewest CTAs (a 152 KB slice each, one an SM,
// 512 threads) measured 1.74 ms for Qwen3's head on an H100, slower than the two kernels.
constexpr int kThreads = 256;
constexpr int kMaxCluster = 8;  // the portable cluster size
// A slice this small lets 4 CTAs share an SM; rows too long for that at 8 CTAs take slices up
// to the opt-in limit (227 KiB less the static reduction buffers).
constexpr int64_t kSharedSliceBytes = 48 * 1024;
constexpr int64_t kMaxSliceBytes = 224 * 1024;

// Logits a CTA holds: V / C rounded up to whole vectors (the slices start vector-aligned).
int64_t slice_len(int64_t vocab, int cluster, int vec) {
  const int64_t per = (vocab + cluster - 1) / cluster;
  return (per + vec - 1) / vec * vec;
}

template <typename T, typename G, int N>
__global__ void __launch_bounds__(kThreads)
    forward_backward_kernel(int64_t vocab, int64_t slice, const T* logits, int64_t row_stride,
                            Labels labels, int64_t ignore_index, const float* grad_loss,
                            int64_t gl_stride, float* loss, int64_t loss_stride, float* lse,
                            int64_t lse_stride, G* grad, int64_t grad_stride) {
  cuda::wait_for_prior_grids();
  cuda::allow_next_grid();
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  extern __shared__ __align__(128) uint8_t slice_smem[];
  T* held = reinterpret_cast<T*>(slice_smem);
  __shared__ float2 cta_stats;  // this CTA's (max, sum), read by the whole cluster
  __shared__ float row_lse;
  cg::cluster_group cluster = cg::this_cluster();
  const int rank = static_cast<int>(cluster.block_rank());
  const int ctas = static_cast<int>(cluster.num_blocks());
  const int64_t row = blockIdx.x / ctas;
  const int64_t begin = rank * slice;
  const int64_t end = begin + slice < vocab ? begin + slice : vocab;
  const int64_t label = label_at(labels, row);
  const T* z = logits + row * row_stride;
  G* d = grad + row * grad_stride;
  const int64_t first = begin + int64_t(threadIdx.x) * N;
  if (label == ignore_index) {  // the whole cluster leaves together, touching no peer
    for (int64_t c = first; c < end; c += kThreads * N) {
      float zero[N];
#pragma unroll
      for (int i = 0; i < N; ++i) zero[i] = 0.0f;
      cuda::store_floats<N>(d + c, zero);
    }
    if (rank == 0 && threadIdx.x == 0) {
      loss[row * loss_stride] = 0.0f;
      lse[row * lse_stride] = 0.0f;
    }
    return;
  }
  // kBatch vectors a thread loaded before any is used: 32 registers a thread left ptxas room
  // for one load in flight in a plain loop, and the slice's load phase is latency-bound.
  using Vec = cuda::Pack<T, N>;
  constexpr int kBatch = 4;
  constexpr int64_t kStep = int64_t(kThreads) * N;
  float m = -INFINITY, s = 0.0f;
  for (int64_t c0 = first; c0 < end; c0 += kBatch * kStep) {
    Vec raw[kBatch];
#pragma unroll
    for (int b = 0; b < kBatch; ++b) {
      if (c0 + b * kStep < end) raw[b] = *reinterpret_cast<const Vec*>(z + c0 + b * kStep);
    }
#pragma unroll
    for (int b = 0; b < kBatch; ++b) {
      const int64_t c = c0 + b * kStep;
      if (c >= end) break;
      // Kept as read (T), so the gradient sees the very logits the sum did.
      *reinterpret_cast<Vec*>(held + (c - begin)) = raw[b];
      float v[N];
      cuda::load_floats<N>(raw[b].v, v);
      online_add<N>(m, s, v);
    }
  }
  block_merge<kThreads>(m, s);
  if (threadIdx.x == 0) cta_stats = make_float2(m, s);
  cluster.sync();  // every CTA's pair is written
  if (threadIdx.x == 0) {
    float mm = -INFINITY, ss = 0.0f;
    for (int r = 0; r < ctas; ++r) {
      const float2 peer = *cluster.map_shared_rank(&cta_stats, r);
      merge(mm, ss, peer.x, peer.y);
    }
    row_lse = mm + logf(ss);
  }
  cluster.sync();  // every CTA has read its peers: from here on none touches another's memory
  const float l = row_lse;
  const bool valid = label >= 0 && label < vocab;
  if (threadIdx.x == 0) {
    if (rank == 0) lse[row * lse_stride] = l;
    // The CTA holding the label's logit writes the loss (rank 0 for an invalid label).
    if (valid ? label >= begin && label < end : rank == 0) {
      loss[row * loss_stride] = valid ? l - cuda::load(held + (label - begin)) : NAN;
    }
  }
  const float g = grad_loss[row * gl_stride];
  for (int64_t c = first; c < end; c += kThreads * N) {
    float v[N];
    cuda::load_floats<N>(held + (c - begin), v);
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const float onehot = c + i == label ? 1.0f : 0.0f;
      v[i] = valid ? g * (expf(v[i] - l) - onehot) : NAN;
    }
    cuda::store_floats<N>(d + c, v);
  }
#endif
}

template <typename T>
using Elem = std::remove_pointer_t<T>;

// The cluster size for a row of `vocab` T logits, or 0 when it takes the two-kernel path.
template <typename T, typename Kernel>
int cluster_for(Kernel kernel, int64_t vocab, int vec) {
  cudaFuncAttributes attr{};
  cuda::check(cudaFuncGetAttributes(&attr, kernel), "cudaFuncGetAttributes");
  // Clusters need the kernel's sm_90 code: on any other GPU the loaded code is the sm_80 PTX
  // JIT-compiled (ptxVersion 80), whose body is empty.
  if (attr.ptxVersion < 90) return 0;
  const auto bytes = [&](int c) { return slice_len(vocab, c, vec) * int64_t(sizeof(T)); };
  for (int c = 1; c <= kMaxCluster; c *= 2) {
    if (bytes(c) <= kSharedSliceBytes) return c;
  }
  return bytes(kMaxCluster) <= kMaxSliceBytes ? kMaxCluster : 0;
}

}  // namespace

void ce_forward_backward_cuda(const Arg& grad_loss, const Arg& logits, const Arg& labels,
                              int64_t ignore_index, const Arg& loss, const Arg& lse,
                              const Arg& grad_logits, void* stream) {
  cuda::DeviceGuard device(logits.t().device_index);
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  const bool vec =
      vocab % cuda::kVecElems == 0 && cuda::vectorisable(logits) && cuda::vectorisable(grad_logits);
  // Opt-in (TURBOMOE_CE_ONE_PASS=1) until measured faster than the two kernels on the device:
  // the first version (one 152 KB slice a CTA) was slower; this one is not yet measured.
  const char* one_pass = std::getenv("TURBOMOE_CE_ONE_PASS");
  bool fused = false;
  if (one_pass != nullptr && std::strcmp(one_pass, "1") == 0) {
    cuda::dispatch_f32_bf16(logits.dtype(), [&](auto t_tag) {
      using T = Elem<decltype(t_tag)>;
      cuda::dispatch_f32_bf16(grad_logits.dtype(), [&](auto g_tag) {
        using G = Elem<decltype(g_tag)>;
        const int n = vec ? cuda::kVecElems : 1;
        auto kernel =
            vec ? forward_backward_kernel<T, G, cuda::kVecElems> : forward_backward_kernel<T, G, 1>;
        const int ctas = cluster_for<T>(kernel, vocab, n);
        if (ctas == 0 || rows * ctas > INT_MAX) return;
        const int64_t slice = slice_len(vocab, ctas, n);
        const size_t smem = static_cast<size_t>(slice) * sizeof(T);
        cuda::check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem)),
                    "cudaFuncSetAttribute");
        cuda::launch_clusters(
            "cross-entropy forward_backward_kernel", kernel, static_cast<unsigned>(ctas),
            static_cast<unsigned>(rows * ctas), kThreads, smem, cuda::as_stream(stream), vocab,
            slice, logits.ptr<const T>(), logits.stride(0), labels_of(labels), ignore_index,
            grad_loss.ptr<const float>(), grad_loss.stride(0), loss.ptr<float>(), loss.stride(0),
            lse.ptr<float>(), lse.stride(0), grad_logits.ptr<G>(), grad_logits.stride(0));
        fused = true;
      });
    });
  }
  if (fused) return;
  ce_forward_cuda(logits, labels, ignore_index, loss, lse, stream);
  ce_backward_cuda(grad_loss, logits, labels, lse, ignore_index, grad_logits, stream);
}

}  // namespace turbomoe::loss
