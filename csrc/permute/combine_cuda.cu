// CUDA combine: one block per token, threads across the hidden dimension in 16-byte vectors when
// the rows allow it. Each output element sums its k terms in ascending k, and the weight
// gradients use a fixed-shape block reduction, so results never depend on scheduling.
// Rows outside [0, M) in pair_to_row cannot be reported without a host sync; they count as
// dropped. pair_to_row must map distinct pairs to distinct rows (as tm_permute_plan does).
#include <cuda_bf16.h>

#include "common/cuda_utils.cuh"
#include "common/launch.cuh"
#include "permute/permute.h"
#include "permute/plan_rows.cuh"
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

// Slots whose rows a thread loads together before adding them up (in ascending k, as before):
// with one slot at a time each thread had a single 16-byte load in flight, and the forward ran
// at ~79% of its copy floor (H100 profile: 59 us a call for 32k x 4 KiB rows against ~47).
constexpr int kSlotBatch = 8;

template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    combine_forward_kernel(Rows rows, int64_t num_rows, const int32_t* pair_to_row,
                           SlotView weights, Rows out, int64_t tokens, int64_t top_k,
                           int64_t hidden) {
  cuda::wait_for_prior_grids();
  cuda::allow_next_grid();
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

// The backward walks a token's slots in batches of kSlotBatch as the forward does: the batch's
// row indices, then each thread's vectors of all its rows (one load each in flight together),
// then the scaled stores. The weight gradients' dot products keep their per-thread order (h
// ascending) and their reduction shape (warp butterfly, then the warps' partials added in order
// by one thread), so each is the same float as with one slot at a time.
template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    combine_backward_kernel(Rows grad_out, Rows rows, int64_t num_rows, const int32_t* pair_to_row,
                            SlotView weights, Rows grad_rows, SlotView grad_weights, int64_t tokens,
                            int64_t top_k, int64_t hidden, const int32_t* offsets, int experts) {
  cuda::wait_for_prior_grids();
  cuda::allow_next_grid();
  __shared__ float partial[kThreads / kWarp][kSlotBatch];
  const bool want_dot = grad_weights.data != nullptr;
  const int tid = static_cast<int>(threadIdx.x);
  for (int64_t t = blockIdx.x; t < tokens; t += gridDim.x) {
    const T* g_row = static_cast<const T*>(grad_out.data) + t * grad_out.ld;
    for (int64_t k0 = 0; k0 < top_k; k0 += kSlotBatch) {
      int64_t r[kSlotBatch];
      bool routed[kSlotBatch];
      float w[kSlotBatch];
      float dot[kSlotBatch];
#pragma unroll
      for (int j = 0; j < kSlotBatch; ++j) {
        r[j] = k0 + j < top_k ? pair_to_row[t * top_k + k0 + j] : -1;
      }
#pragma unroll
      for (int j = 0; j < kSlotBatch; ++j) {
        routed[j] = r[j] >= 0 && r[j] < num_rows;
        w[j] = routed[j] ? read_slot(weights, t, k0 + j) : 0.0f;
        dot[j] = 0.0f;
      }
      for (int64_t h = int64_t(tid) * V; h < hidden; h += int64_t(kThreads) * V) {
        Pack<T, V> g;
        g.load(g_row + h);
        Pack<T, V> x[kSlotBatch];
        if (want_dot) {
#pragma unroll
          for (int j = 0; j < kSlotBatch; ++j) {
            if (routed[j]) x[j].load(static_cast<const T*>(rows.data) + r[j] * rows.ld + h);
          }
        }
#pragma unroll
        for (int j = 0; j < kSlotBatch; ++j) {
          if (!routed[j]) continue;
          Pack<T, V> d;
#pragma unroll
          for (int i = 0; i < V; ++i) d.set(i, w[j] * g.get(i));
          d.save(static_cast<T*>(grad_rows.data) + r[j] * grad_rows.ld + h);
          if (want_dot) {
#pragma unroll
            for (int i = 0; i < V; ++i) dot[j] += g.get(i) * x[j].get(i);
          }
        }
      }
      if (want_dot) {
#pragma unroll
        for (int j = 0; j < kSlotBatch; ++j) {
          float v = dot[j];
          for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
          if (tid % kWarp == 0) partial[tid / kWarp][j] = v;
        }
        __syncthreads();
        if (tid < kSlotBatch && k0 + tid < top_k) {
          float total = 0.0f;
          for (int wp = 0; wp < kThreads / kWarp; ++wp) total += partial[wp][tid];
          write_slot(grad_weights, t, k0 + tid, total);
        }
        __syncthreads();  // partial is refilled by the next batch
      }
    }
  }
  // The rows no pair maps to (past the plan's rows, when the caller gave its offsets) are
  // cleared here rather than by a memset of every row beforehand.
  if (offsets != nullptr) {
    const int64_t first = planned_rows(offsets, experts, num_rows);
    for (int64_t row = first + blockIdx.x; row < num_rows; row += gridDim.x) {
      Pack<T, V> zero;
#pragma unroll
      for (int i = 0; i < V; ++i) zero.set(i, 0.0f);
      for (int64_t h = int64_t(tid) * V; h < hidden; h += int64_t(kThreads) * V) {
        zero.save(static_cast<T*>(grad_rows.data) + row * grad_rows.ld + h);
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
    cuda::launch("combine_forward_kernel", combine_forward_kernel<T, kVec>, grid_for(tokens),
                 kThreads, 0, stream, rows_of(rows), rows.size(0), p2r.ptr<const int32_t>(), w,
                 rows_of(out), tokens, top_k, hidden);
  } else {
    cuda::launch("combine_forward_kernel", combine_forward_kernel<T, 1>, grid_for(tokens), kThreads,
                 0, stream, rows_of(rows), rows.size(0), p2r.ptr<const int32_t>(), w, rows_of(out),
                 tokens, top_k, hidden);
  }
}

template <typename T>
void launch_backward(const CombineBackward& c, cudaStream_t stream) {
  const int64_t tokens = c.grad_out.size(0), hidden = c.grad_out.size(1);
  const Rows r = c.rows ? rows_of(*c.rows) : Rows{nullptr, 0};
  const SlotView w = slot_view(c.weights), gw = slot_view(c.grad_weights);
  const int32_t* p2r = c.pair_to_row.ptr<const int32_t>();
  const int32_t* offsets = c.expert_offsets ? c.expert_offsets->ptr<const int32_t>() : nullptr;
  const int experts = c.expert_offsets ? static_cast<int>(c.expert_offsets->size(0) - 1) : 0;
  constexpr int kVec = 16 / sizeof(T);
  if (vectorizable({&c.grad_out, &c.grad_rows, c.rows ? &*c.rows : nullptr}, hidden)) {
    cuda::launch("combine_backward_kernel", combine_backward_kernel<T, kVec>, grid_for(tokens),
                 kThreads, 0, stream, rows_of(c.grad_out), r, c.grad_rows.size(0), p2r, w,
                 rows_of(c.grad_rows), gw, tokens, c.top_k, hidden, offsets, experts);
  } else {
    cuda::launch("combine_backward_kernel", combine_backward_kernel<T, 1>, grid_for(tokens),
                 kThreads, 0, stream, rows_of(c.grad_out), r, c.grad_rows.size(0), p2r, w,
                 rows_of(c.grad_rows), gw, tokens, c.top_k, hidden, offsets, experts);
  }
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

void combine_backward_cuda(const CombineBackward& c, void* stream) {
  const Arg& grad_rows = c.grad_rows;
  cuda::DeviceGuard device(grad_rows.t().device_index);
  const cudaStream_t s = cuda::as_stream(stream);
  const bool launches = c.grad_out.size(0) > 0 && c.top_k > 0;
  // Rows that no pair reaches must read as zero. Without the offsets' promise, which rows those
  // are is only known on the device: all rows are cleared first, then the mapped ones
  // overwritten. With it, the kernel clears the rows past the mapped ones itself.
  if (grad_rows.numel() > 0 && (!c.expert_offsets || !launches)) {
    const size_t elem = dtype_size(grad_rows.dtype());
    const size_t width = static_cast<size_t>(grad_rows.size(1)) * elem;
    const size_t pitch =
        grad_rows.size(0) > 1 ? static_cast<size_t>(grad_rows.stride(0)) * elem : width;
    cuda::check(cudaMemset2DAsync(grad_rows.data(), pitch, 0, width,
                                  static_cast<size_t>(grad_rows.size(0)), s),
                "cudaMemset2DAsync(grad_rows)");
  }
  if (!launches) return;
  if (c.grad_out.dtype() == TM_DTYPE_FLOAT32) {
    launch_backward<float>(c, s);
  } else {
    launch_backward<__nv_bfloat16>(c, s);
  }
}

}  // namespace turbomoe::permute
