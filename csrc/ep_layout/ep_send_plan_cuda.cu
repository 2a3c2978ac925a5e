// CUDA send side of the fixed-block exchange: one grid-stride kernel computes every output from
// tm_ep_layout's placement, each entry from its own index, so the result is deterministic; the
// weight backward is one thread per (token, slot).
#include <type_traits>

#include "common/cuda_utils.cuh"
#include "common/launch.cuh"
#include "common/numeric.h"
#include "ep_layout/ep_layout.h"

namespace turbomoe::ep_layout {
namespace {

constexpr int kThreads = 256;

struct PlanView {
  const void* ids;
  int64_t id_s0, id_s1;
  const void* weights;
  int64_t w_s0, w_s1;
  const int32_t* counts;
  const int32_t* order;
  const int32_t* slot;
  int64_t tokens, top_k, ranks, cap, experts;
  int32_t* pairs;
  int32_t* to_row;
  float* meta;
  int32_t* bad;
};

template <typename Id, typename W>
__global__ void send_plan_kernel(PlanView v) {
  cuda::wait_for_prior_grids();
  cuda::allow_next_grid();
  const int64_t per_rank = v.experts / v.ranks, zero_cell = v.tokens * v.ranks;
  const int64_t cells = (v.cap + 1) * v.ranks, id_pairs = v.tokens * v.top_k;
  const int64_t n = cells > id_pairs ? cells : id_pairs;
  const Id* ids = static_cast<const Id*>(v.ids);
  const W* w = static_cast<const W*>(v.weights);
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    if (i < id_pairs) {
      const int64_t e = ids[(i / v.top_k) * v.id_s0 + (i % v.top_k) * v.id_s1];
      if (e < 0 || e >= v.experts) atomicAdd(v.bad, 1);
    }
    if (i >= cells) continue;
    {  // pair_to_row: the send row of cell i = t*R + r
      const int64_t t = i / v.ranks, r = i % v.ranks;
      const int32_t s = t < v.tokens ? v.slot[t * v.ranks + r] : -1;
      v.to_row[i] = s >= 0 ? static_cast<int32_t>(r * v.cap + s) : -1;
    }
    if (i >= v.ranks * v.cap) {
      v.pairs[i] = static_cast<int32_t>(zero_cell);
      continue;
    }
    // Send row i = r*C + s: the token at position s of r's block, if r has that many.
    const int64_t r = i / v.cap, s = i % v.cap;
    int64_t start = 0;
    for (int64_t q = 0; q < r; ++q) start += v.counts[q];
    const bool claimed = s < v.counts[r];
    const int64_t t = claimed ? v.order[start + s] : -1;
    v.pairs[i] = static_cast<int32_t>(claimed ? t * v.ranks + r : zero_cell);
    float* m = v.meta + i * 2 * v.top_k;
    for (int64_t k = 0; k < v.top_k; ++k) {
      float local = static_cast<float>(per_rank), weight = 0.0f;
      if (claimed) {
        const int64_t e = ids[t * v.id_s0 + k * v.id_s1];
        if (e >= 0 && e < v.experts && e / per_rank == r) {
          local = static_cast<float>(e % per_rank);
          weight = cuda::load(w + t * v.w_s0 + k * v.w_s1);
        }
      }
      m[k] = local;
      m[v.top_k + k] = weight;
    }
  }
}

template <typename Id, typename W>
__global__ void send_plan_backward_kernel(const float* grad_meta, int64_t g_row, const Id* ids,
                                          int64_t id_s0, int64_t id_s1, const int32_t* slot,
                                          int64_t tokens, int64_t top_k, int64_t ranks, int64_t cap,
                                          int64_t experts, W* out) {
  cuda::wait_for_prior_grids();
  cuda::allow_next_grid();
  const int64_t per_rank = experts / ranks;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < tokens * top_k;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t t = i / top_k, k = i % top_k;
    const int64_t e = ids[t * id_s0 + k * id_s1];
    float g = 0.0f;
    if (e >= 0 && e < experts) {
      const int64_t r = e / per_rank;
      const int32_t s = slot[t * ranks + r];
      if (s >= 0) g = grad_meta[(r * cap + s) * g_row + top_k + k];
    }
    cuda::store(out + i, g);
  }
}

}  // namespace

void send_plan_cuda(const SendPlanArgs& a, void* stream) {
  cuda::DeviceGuard device(a.send_pairs.t().device_index);
  const cudaStream_t s = cuda::as_stream(stream);
  const PlanView v{a.ids.data(),
                   a.ids.stride(0),
                   a.ids.stride(1),
                   a.weights.data(),
                   a.weights.stride(0),
                   a.weights.stride(1),
                   a.rank_counts.ptr<const int32_t>(),
                   a.send_order.ptr<const int32_t>(),
                   a.token_rank_slot.ptr<const int32_t>(),
                   a.ids.size(0),
                   a.ids.size(1),
                   a.rank_counts.size(0),
                   a.capacity,
                   a.experts,
                   a.send_pairs.ptr<int32_t>(),
                   a.pair_to_row.ptr<int32_t>(),
                   a.send_meta.ptr<float>(),
                   a.bad_ids.ptr<int32_t>()};
  cuda::check(cudaMemsetAsync(v.bad, 0, sizeof(int32_t), s), "cudaMemsetAsync(bad_ids)");
  const int64_t cells = (v.cap + 1) * v.ranks, id_pairs = v.tokens * v.top_k;
  const unsigned blocks = cuda::blocks_for(cells > id_pairs ? cells : id_pairs, kThreads);
  dispatch_index(a.ids.dtype(), [&](auto id_tag) {
    using Id = decltype(id_tag);
    cuda::dispatch_floating(a.weights.dtype(), [&](auto w_ptr) {
      using W = std::remove_pointer_t<decltype(w_ptr)>;
      cuda::launch("send_plan_kernel", send_plan_kernel<Id, W>, blocks, kThreads, 0, s, v);
    });
  });
}

void send_plan_backward_cuda(const Arg& grad_meta, const Arg& ids, const Arg& token_rank_slot,
                             int64_t experts, int64_t capacity, const Arg& grad_weights,
                             void* stream) {
  cuda::DeviceGuard device(grad_weights.t().device_index);
  const cudaStream_t s = cuda::as_stream(stream);
  const int64_t tokens = ids.size(0), top_k = ids.size(1);
  if (tokens * top_k == 0) return;
  const unsigned blocks = cuda::blocks_for(tokens * top_k, kThreads);
  dispatch_index(ids.dtype(), [&](auto id_tag) {
    using Id = decltype(id_tag);
    cuda::dispatch_floating(grad_weights.dtype(), [&](auto w_ptr) {
      using W = std::remove_pointer_t<decltype(w_ptr)>;
      cuda::launch("send_plan_backward_kernel", send_plan_backward_kernel<Id, W>, blocks, kThreads,
                   0, s, grad_meta.ptr<const float>(), grad_meta.stride(0), ids.ptr<const Id>(),
                   ids.stride(0), ids.stride(1), token_rank_slot.ptr<const int32_t>(), tokens,
                   top_k, token_rank_slot.size(1), capacity, experts, grad_weights.ptr<W>());
    });
  });
}

}  // namespace turbomoe::ep_layout
