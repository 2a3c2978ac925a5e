// CUDA routers: one warp per token. The warp keeps the token's selection keys in shared memory
// and runs top-k as k rounds of a warp-wide arg-max over the candidates ranked after the previous
// pick, so no sort and no per-expert marking is needed. Sums over the k slots run in slot order
// on every lane, matching the CPU reference's order.
#include <type_traits>

#include "common/cuda_utils.cuh"
#include "common/launch.cuh"
#include "routing/routing.h"
#include "routing/routing_math.h"

namespace turbomoe::routing {
namespace {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kMaxWarpsPerBlock = 8;
constexpr int kSharedFloats = 48 * 1024 / 4;  // the default dynamic shared-memory limit

struct View2d {
  void* data;
  int64_t s0, s1;
};

View2d view(const Arg& a) { return {a.data(), a.stride(0), a.stride(1)}; }

template <typename T>
__device__ __forceinline__ T* at(const View2d& v, int64_t r, int64_t c) {
  return static_cast<T*>(v.data) + r * v.s0 + c * v.s1;
}

struct Candidate {
  float v;
  int i;  // -1: none
};

__device__ __forceinline__ Candidate better(Candidate a, Candidate b) {
  if (b.i < 0) return a;
  if (a.i < 0) return b;
  return ranks_before(b.v, b.i, a.v, a.i) ? b : a;
}

// `better` is a total order, so the butterfly leaves the same winner on every lane.
__device__ __forceinline__ Candidate warp_best(Candidate c) {
  for (int o = kWarp / 2; o > 0; o >>= 1) {
    const Candidate other{__shfl_xor_sync(kFullMask, c.v, o), __shfl_xor_sync(kFullMask, c.i, o)};
    c = better(c, other);
  }
  return c;
}

// Both butterflies are commutative at every step, so all lanes end with bit-identical results.
__device__ __forceinline__ float warp_sum(float v) {
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
  for (int o = kWarp / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

// The next candidate in selection order after `prev` among keys[0..n) (every `stride`-th one
// starting at the lane), skipping entries whose group flag is 0 when `kept` is given.
__device__ __forceinline__ Candidate next_pick(const float* keys, int n, const float* kept,
                                               int group_size, Candidate prev, int lane) {
  Candidate c{0.0f, -1};
  for (int i = lane; i < n; i += kWarp) {
    if (kept != nullptr && kept[i / group_size] == 0.0f) continue;
    const Candidate cand{keys[i], i};
    if (prev.i >= 0 && !ranks_before(prev.v, prev.i, cand.v, cand.i)) continue;
    c = better(c, cand);
  }
  return warp_best(c);
}

// Marks the topk_group best groups (sum of their two best keys) in kept[0..n_group).
__device__ void mask_groups(const tm_routing_params& p, const float* keys, int experts, float* kept,
                            float* group_keys, int lane) {
  const int size = experts / p.n_group;
  for (int g = lane; g < p.n_group; g += kWarp) {
    float best1 = -INFINITY, best2 = -INFINITY;
    for (int i = g * size; i < (g + 1) * size; ++i) {
      if (keys[i] > best1) {
        best2 = best1;
        best1 = keys[i];
      } else if (keys[i] > best2) {
        best2 = keys[i];
      }
    }
    group_keys[g] = selection_key(size >= 2 ? best1 + best2 : best1);
    kept[g] = 0.0f;
  }
  __syncwarp();
  Candidate prev{0.0f, -1};
  for (int round = 0; round < p.topk_group; ++round) {
    prev = next_pick(group_keys, p.n_group, nullptr, 1, prev, lane);
    if (lane == 0) kept[prev.i] = 1.0f;
  }
  __syncwarp();
}

template <typename In, typename Id>
__global__ void routing_forward_kernel(tm_routing_params p, int64_t tokens, int experts,
                                       View2d logits, const float* bias, int64_t bias_stride,
                                       View2d weights, View2d ids, View2d scores,
                                       int floats_per_warp) {
  cuda::wait_for_prior_grids();
  cuda::allow_next_grid();
  extern __shared__ float smem[];
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t t = int64_t(blockIdx.x) * (blockDim.x / kWarp) + warp;
  if (t >= tokens) return;  // the whole warp leaves together; no block barrier follows
  float* keys = smem + warp * floats_per_warp;

  float row_max = -INFINITY, row_sum = 0.0f;
  if (p.kind == TM_ROUTING_SOFTMAX_TOPK) {
    for (int e = lane; e < experts; e += kWarp) {
      row_max = fmaxf(row_max, cuda::load(at<const In>(logits, t, e)));
    }
    row_max = warp_max(row_max);
    for (int e = lane; e < experts; e += kWarp) {
      row_sum += expf(cuda::load(at<const In>(logits, t, e)) - row_max);
    }
    row_sum = warp_sum(row_sum);
  }
  for (int e = lane; e < experts; e += kWarp) {
    const float x = cuda::load(at<const In>(logits, t, e));
    float s = x;
    if (p.kind == TM_ROUTING_SOFTMAX_TOPK) s = expf(x - row_max) / row_sum;
    if (p.kind == TM_ROUTING_SIGMOID_GROUP_TOPK) s = sigmoid(x);
    *at<float>(scores, t, e) = s;
    const float b = bias != nullptr ? bias[e * bias_stride] : 0.0f;
    keys[e] = selection_key(choice_value(p.kind, x, s, b));
  }
  __syncwarp();

  const float* kept = nullptr;
  int group_size = experts;
  if (p.kind == TM_ROUTING_SIGMOID_GROUP_TOPK && p.topk_group < p.n_group) {
    float* flags = keys + experts;
    mask_groups(p, keys, experts, flags, flags + p.n_group, lane);
    kept = flags;
    group_size = experts / p.n_group;
  }

  Candidate prev{0.0f, -1};
  int my_id = 0;
  for (int round = 0; round < p.top_k; ++round) {
    prev = next_pick(keys, experts, kept, group_size, prev, lane);
    if (lane == round) my_id = prev.i;
  }
  // The scores row was written by this warp before the __syncwarp above, so it is visible here.
  const float z = lane < p.top_k ? *at<const float>(scores, t, my_id) : 0.0f;
  float zmax = -INFINITY, denom = 0.0f;
  for (int j = 0; j < p.top_k; ++j) zmax = fmaxf(zmax, __shfl_sync(kFullMask, z, j));
  for (int j = 0; j < p.top_k; ++j) {
    const float zj = __shfl_sync(kFullMask, z, j);
    denom += p.kind == TM_ROUTING_TOPK_SOFTMAX ? expf(zj - zmax) : zj;
  }
  if (p.kind != TM_ROUTING_TOPK_SOFTMAX) denom = renormalizes(p) ? denom + p.renorm_epsilon : 1.0f;
  if (lane < p.top_k) {
    *at<float>(weights, t, lane) = slot_weight(p, z, zmax, denom);
    *at<Id>(ids, t, lane) = static_cast<Id>(my_id);
  }
}

// Ids outside [0, experts) cannot be reported without a host sync; their slots are ignored.
template <typename Id, typename Out>
__global__ void routing_backward_kernel(tm_routing_params p, int64_t tokens, int experts,
                                        View2d grad_weights, View2d scores, View2d ids,
                                        View2d grad_logits) {
  cuda::wait_for_prior_grids();
  cuda::allow_next_grid();
  extern __shared__ float smem[];
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t t = int64_t(blockIdx.x) * (blockDim.x / kWarp) + warp;
  if (t >= tokens) return;
  float* gz = smem + warp * experts;
  for (int e = lane; e < experts; e += kWarp) gz[e] = 0.0f;

  int my_id = -1;
  float z = 0.0f, g = 0.0f;
  if (lane < p.top_k) {
    const int64_t e = *at<const Id>(ids, t, lane);
    if (e >= 0 && e < experts) {
      my_id = static_cast<int>(e);
      z = *at<const float>(scores, t, e);
    }
    g = *at<const float>(grad_weights, t, lane);
  }
  float zmax = -INFINITY, denom = 0.0f;
  for (int j = 0; j < p.top_k; ++j) zmax = fmaxf(zmax, __shfl_sync(kFullMask, z, j));
  for (int j = 0; j < p.top_k; ++j) {
    const float zj = __shfl_sync(kFullMask, z, j);
    denom += p.kind == TM_ROUTING_TOPK_SOFTMAX ? expf(zj - zmax) : zj;
  }
  if (p.kind != TM_ROUTING_TOPK_SOFTMAX) denom = renormalizes(p) ? denom + p.renorm_epsilon : 1.0f;
  const float w = slot_weight(p, z, zmax, denom);
  float dot = 0.0f;
  for (int j = 0; j < p.top_k; ++j) dot += __shfl_sync(kFullMask, g * w, j);
  const float d = my_id >= 0 ? slot_grad(p, g, w, dot, denom) : 0.0f;
  float centre = 0.0f;
  for (int j = 0; j < p.top_k; ++j) centre += __shfl_sync(kFullMask, d * z, j);
  __syncwarp();
  // One lane accumulates, slot by slot, so that repeated ids sum in a fixed order.
  for (int j = 0; j < p.top_k; ++j) {
    const float dj = __shfl_sync(kFullMask, d, j);
    const int ij = __shfl_sync(kFullMask, my_id, j);
    if (lane == 0 && ij >= 0) gz[ij] += dj;
  }
  __syncwarp();
  for (int e = lane; e < experts; e += kWarp) {
    const float s = *at<const float>(scores, t, e);
    cuda::store(at<Out>(grad_logits, t, e), logit_grad(p.kind, gz[e], s, centre));
  }
}

struct LaunchShape {
  unsigned blocks;
  int threads;
  size_t shared_bytes;
};

LaunchShape shape_for(int64_t tokens, int floats_per_warp) {
  int warps = kSharedFloats / floats_per_warp;
  warps = warps < 1 ? 1 : (warps > kMaxWarpsPerBlock ? kMaxWarpsPerBlock : warps);
  const int64_t blocks = (tokens + warps - 1) / warps;
  return {static_cast<unsigned>(blocks), warps * kWarp,
          static_cast<size_t>(warps) * floats_per_warp * sizeof(float)};
}

}  // namespace

void forward_cuda(const tm_routing_params& p, const Arg& logits, const std::optional<Arg>& bias,
                  const Arg& weights, const Arg& ids, const Arg& scores, void* stream) {
  cuda::DeviceGuard device(logits.t().device_index);
  const int64_t tokens = logits.size(0);
  const int experts = static_cast<int>(logits.size(1));
  const bool grouped = p.kind == TM_ROUTING_SIGMOID_GROUP_TOPK && p.topk_group < p.n_group;
  const int floats_per_warp = experts + (grouped ? 2 * p.n_group : 0);
  const LaunchShape s = shape_for(tokens, floats_per_warp);
  const float* bias_ptr = bias ? bias->ptr<const float>() : nullptr;
  const int64_t bias_stride = bias ? bias->stride(0) : 0;
  cuda::dispatch_floating(logits.dtype(), [&](auto in_tag) {
    using In = std::remove_pointer_t<decltype(in_tag)>;
    if (ids.dtype() == TM_DTYPE_INT32) {
      cuda::launch("routing_forward_kernel", routing_forward_kernel<In, int32_t>, s.blocks,
                   s.threads, s.shared_bytes, cuda::as_stream(stream), p, tokens, experts,
                   view(logits), bias_ptr, bias_stride, view(weights), view(ids), view(scores),
                   floats_per_warp);
    } else {
      cuda::launch("routing_forward_kernel", routing_forward_kernel<In, int64_t>, s.blocks,
                   s.threads, s.shared_bytes, cuda::as_stream(stream), p, tokens, experts,
                   view(logits), bias_ptr, bias_stride, view(weights), view(ids), view(scores),
                   floats_per_warp);
    }
  });
}

void backward_cuda(const tm_routing_params& p, const Arg& grad_weights, const Arg& scores,
                   const Arg& ids, const Arg& grad_logits, void* stream) {
  cuda::DeviceGuard device(scores.t().device_index);
  const int64_t tokens = scores.size(0);
  const int experts = static_cast<int>(scores.size(1));
  const LaunchShape s = shape_for(tokens, experts);
  cuda::dispatch_floating(grad_logits.dtype(), [&](auto out_tag) {
    using Out = std::remove_pointer_t<decltype(out_tag)>;
    if (ids.dtype() == TM_DTYPE_INT32) {
      cuda::launch("routing_backward_kernel", routing_backward_kernel<int32_t, Out>, s.blocks,
                   s.threads, s.shared_bytes, cuda::as_stream(stream), p, tokens, experts,
                   view(grad_weights), view(scores), view(ids), view(grad_logits));
    } else {
      cuda::launch("routing_backward_kernel", routing_backward_kernel<int64_t, Out>, s.blocks,
                   s.threads, s.shared_bytes, cuda::as_stream(stream), p, tokens, experts,
                   view(grad_weights), view(scores), view(ids), view(grad_logits));
    }
  });
}

}  // namespace turbomoe::routing
