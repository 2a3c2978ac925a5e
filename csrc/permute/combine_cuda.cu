// CUDA combine: one block per token, threads across the hidden dimension in 16-byte vectors when
// the rows allow it. Each output element sums its k terms in ascending k, and the weight
// gradients use a fixed-shape block reduction, so results never depend on scheduling.
// Rows outside [0, M) in pair_to_row cannot be reported without a host sync; they count as
// dropped. pair_to_row must map distinct pairs to distinct rows (as tm_permute_plan does).
#include <cuda_bf16.h>

#include "common/cuda_utils.cuh"
#include "permute/permute.h"
#include "permute/raw_bits.cuh"

namespace turbomoe::permute {
namespace {

constexpr int kThreads = 128;
constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// A [T,K] f32/bf16 per-slot tensor read or written through its runtime dtype (the branch is
// uniform and per slot, not per element); data == nullptr means "absent".
struct SlotView {
  void* data;
  int32_t dtype;
  int64_t s0, s1;
};

SlotView slot_view(const std::optional<Arg>& a) {
  if (!a) return {nullptr, TM_DTYPE_FLOAT32, 0, 0};
  return {a->data(), a->dtype(), a->stride(0), a->stride(1)};
}

__device__ __forceinline__ float read_slot(const SlotView& v, int64_t t, int64_t k) {
  if (v.data == nullptr) return 1.0f;
  const int64_t off = t * v.s0 + k * v.s1;
  return v.dtype == TM_DTYPE_FLOAT32 ? static_cast<const float*>(v.data)[off]
                                     : cuda::load(static_cast<const __nv_bfloat16*>(v.data) + off);
}

__device__ __forceinline__ void write_slot(const SlotView& v, int64_t t, int64_t k, float x) {
  const int64_t off = t * v.s0 + k * v.s1;
  if (v.dtype == TM_DTYPE_FLOAT32) {
    static_cast<float*>(v.data)[off] = x;
  } else {
    cuda::store(static_cast<__nv_bfloat16*>(v.data) + off, x);
  }
}

// V consecutive elements moved as one load or store.
template <typename T, int V>
struct Pack {
  using Raw = typename RawOf<sizeof(T) * V>::type;
  Raw raw;
  __device__ __forceinline__ void load(const T* p) { raw = *reinterpret_cast<const Raw*>(p); }
  __device__ __forceinline__ void save(T* p) const { *reinterpret_cast<Raw*>(p) = raw; }
  __device__ __forceinline__ float get(int i) const {
    return cuda::load(reinterpret_cast<const T*>(&raw) + i);
  }
  __device__ __forceinline__ void set(int i, float v) {
    cuda::store(reinterpret_cast<T*>(&raw) + i, v);
  }
};

struct Rows {
  void* data;
  int64_t ld;  // elements between rows
};

Rows rows_of(const Arg& a) { return {a.data(), a.stride(0)}; }

__device__ __forceinline__ float block_sum(float v, float* partial) {
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  if (threadIdx.x % kWarp == 0) partial[threadIdx.x / kWarp] = v;
  __syncthreads();
  float total = 0.0f;
  if (threadIdx.x == 0) {
    for (int w = 0; w < kThreads / kWarp; ++w) total += partial[w];
  }
  __syncthreads();
  return total;  // valid in thread 0
}

// Slots whose rows a thread loads together before adding them up (in ascending k, as before):
// with one slot at a time each thread had a single 16-byte load in flight, and the forward ran
// at ~79% of its copy floor (H100 profile: 59 us a call for 32k x 4 KiB rows against ~47).
constexpr int kSlotBatch = 8;

template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    combine_forward_kernel(Rows rows, int64_t num_rows, const int32_t* pair_to_row,
                           SlotView weights, Rows out, int64_t tokens, int64_t top_k,
                           int64_t hidden) {
  for (int64_t t = blockIdx.x; t < tokens; t += gridDim.x) {
    for (int64_t h = int64_t(threadIdx.x) * V; h < hidden; h += int64_t(kThreads) * V) {
      float acc[V] = {};
      for (int64_t k0 = 0; k0 < top_k; k0 += kSlotBatch) {
        // All the batch's row indices first (independent loads), then all its rows.
        int64_t r[kSlotBatch];
#pragma unroll
        for (int j = 0; j < kSlotBatch; ++j) {
          r[j] = k0 + j < top_k ? pair_to_row[t * top_k + k0 + j] : -1;
        }
        Pack<T, V> x[kSlotBatch];
        float w[kSlotBatch];
        bool routed[kSlotBatch];
#pragma unroll
        for (int j = 0; j < kSlotBatch; ++j) {
          routed[j] = r[j] >= 0 && r[j] < num_rows;
          if (routed[j]) {
            w[j] = read_slot(weights, t, k0 + j);
            x[j].load(static_cast<const T*>(rows.data) + r[j] * rows.ld + h);
          }
        }
#pragma unroll
        for (int j = 0; j < kSlotBatch; ++j) {
          if (!routed[j]) continue;
#pragma unroll
          for (int i = 0; i < V; ++i) acc[i] += w[j] * x[j].get(i);
        }
      }
      Pack<T, V> y;
#pragma unroll
      for (int i = 0; i < V; ++i) y.set(i, acc[i]);
      y.save(static_cast<T*>(out.data) + t * out.ld + h);
    }
  }
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    combine_backward_kernel(Rows grad_out, Rows rows, int64_t num_rows, const int32_t* pair_to_row,
                            SlotView weights, Rows grad_rows, SlotView grad_weights, int64_t tokens,
                            int64_t top_k, int64_t hidden) {
  __shared__ float partial[kThreads / kWarp];
  const bool want_dot = grad_weights.data != nullptr;
  for (int64_t t = blockIdx.x; t < tokens; t += gridDim.x) {
    for (int64_t k = 0; k < top_k; ++k) {
      const int64_t r = pair_to_row[t * top_k + k];
      float dot = 0.0f;
      if (r >= 0 && r < num_rows) {
        const float w = read_slot(weights, t, k);
        for (int64_t h = int64_t(threadIdx.x) * V; h < hidden; h += int64_t(kThreads) * V) {
          Pack<T, V> g, d;
          g.load(static_cast<const T*>(grad_out.data) + t * grad_out.ld + h);
#pragma unroll
          for (int i = 0; i < V; ++i) d.set(i, w * g.get(i));
          d.save(static_cast<T*>(grad_rows.data) + r * grad_rows.ld + h);
          if (want_dot) {
            Pack<T, V> x;
            x.load(static_cast<const T*>(rows.data) + r * rows.ld + h);
#pragma unroll
            for (int i = 0; i < V; ++i) dot += g.get(i) * x.get(i);
          }
        }
      }
      if (want_dot) {
        dot = block_sum(dot, partial);
        if (threadIdx.x == 0) write_slot(grad_weights, t, k, dot);
      }
    }
  }
}

// 16-byte vectors when every row start and the row length allow them, else single elements.
bool vectorizable(std::initializer_list<const Arg*> mats, int64_t hidden) {
  const int64_t elem = static_cast<int64_t>(dtype_size(mats.begin()[0]->dtype()));
  if (hidden * elem % 16 != 0) return false;
  for (const Arg* a : mats) {
    if (a == nullptr) continue;
    if (reinterpret_cast<uintptr_t>(a->data()) % 16 != 0) return false;
    if (a->size(0) > 1 && a->stride(0) * elem % 16 != 0) return false;
  }
  return true;
}

unsigned grid_for(int64_t tokens) {
  return static_cast<unsigned>(tokens < (1 << 20) ? tokens : (1 << 20));
}

template <typename T>
void launch_forward(const Arg& rows, const Arg& p2r, const SlotView& w, int64_t top_k,
                    const Arg& out, cudaStream_t stream) {
  const int64_t tokens = out.size(0), hidden = out.size(1);
  constexpr int kVec = 16 / sizeof(T);
  if (vectorizable({&rows, &out}, hidden)) {
    combine_forward_kernel<T, kVec><<<grid_for(tokens), kThreads, 0, stream>>>(
        rows_of(rows), rows.size(0), p2r.ptr<const int32_t>(), w, rows_of(out), tokens, top_k,
        hidden);
  } else {
    combine_forward_kernel<T, 1><<<grid_for(tokens), kThreads, 0, stream>>>(
        rows_of(rows), rows.size(0), p2r.ptr<const int32_t>(), w, rows_of(out), tokens, top_k,
        hidden);
  }
  cuda::check_launch("combine_forward_kernel");
}

template <typename T>
void launch_backward(const Arg& grad_out, const std::optional<Arg>& rows, const Arg& p2r,
                     const SlotView& w, int64_t top_k, const Arg& grad_rows, const SlotView& gw,
                     cudaStream_t stream) {
  const int64_t tokens = grad_out.size(0), hidden = grad_out.size(1);
  const Rows r = rows ? rows_of(*rows) : Rows{nullptr, 0};
  constexpr int kVec = 16 / sizeof(T);
  if (vectorizable({&grad_out, &grad_rows, rows ? &*rows : nullptr}, hidden)) {
    combine_backward_kernel<T, kVec><<<grid_for(tokens), kThreads, 0, stream>>>(
        rows_of(grad_out), r, grad_rows.size(0), p2r.ptr<const int32_t>(), w, rows_of(grad_rows),
        gw, tokens, top_k, hidden);
  } else {
    combine_backward_kernel<T, 1><<<grid_for(tokens), kThreads, 0, stream>>>(
        rows_of(grad_out), r, grad_rows.size(0), p2r.ptr<const int32_t>(), w, rows_of(grad_rows),
        gw, tokens, top_k, hidden);
  }
  cuda::check_launch("combine_backward_kernel");
}

}  // namespace

void combine_forward_cuda(const Arg& rows, const Arg& pair_to_row,
                          const std::optional<Arg>& weights, int64_t top_k, const Arg& out,
                          void* stream) {
  cuda::DeviceGuard device(out.t().device_index);
  const SlotView w = slot_view(weights);
  if (out.dtype() == TM_DTYPE_FLOAT32) {
    launch_forward<float>(rows, pair_to_row, w, top_k, out, cuda::as_stream(stream));
  } else {
    launch_forward<__nv_bfloat16>(rows, pair_to_row, w, top_k, out, cuda::as_stream(stream));
  }
}

void combine_backward_cuda(const Arg& grad_out, const std::optional<Arg>& rows,
                           const Arg& pair_to_row, const std::optional<Arg>& weights, int64_t top_k,
                           const Arg& grad_rows, const std::optional<Arg>& grad_weights,
                           void* stream) {
  cuda::DeviceGuard device(grad_rows.t().device_index);
  const cudaStream_t s = cuda::as_stream(stream);
  // Rows that no pair reaches must read as zero; all rows are cleared first, then the mapped
  // ones are overwritten (which rows are mapped is only known on the device).
  if (grad_rows.numel() > 0) {
    const size_t elem = dtype_size(grad_rows.dtype());
    const size_t width = static_cast<size_t>(grad_rows.size(1)) * elem;
    const size_t pitch =
        grad_rows.size(0) > 1 ? static_cast<size_t>(grad_rows.stride(0)) * elem : width;
    cuda::check(cudaMemset2DAsync(grad_rows.data(), pitch, 0, width,
                                  static_cast<size_t>(grad_rows.size(0)), s),
                "cudaMemset2DAsync(grad_rows)");
  }
  if (grad_out.size(0) == 0 || top_k == 0) return;
  const SlotView w = slot_view(weights), gw = slot_view(grad_weights);
  if (grad_out.dtype() == TM_DTYPE_FLOAT32) {
    launch_backward<float>(grad_out, rows, pair_to_row, w, top_k, grad_rows, gw, s);
  } else {
    launch_backward<__nv_bfloat16>(grad_out, rows, pair_to_row, w, top_k, grad_rows, gw, s);
  }
}

}  // namespace turbomoe::permute
