// CUDA expert-parallel layout: one block of kThreads threads, deterministic by construction.
//
// The block walks the tokens in chunks of kThreads, one token per thread:
//  1. each thread builds its token's destination mask (bit r set when a slot's expert lives on
//     rank r) and counts its pairs per expert with integer atomics (order-independent);
//  2. for every rank, a warp ballot of the mask bit gives each token its rank among the earlier
//     lanes of its warp; lane 0 stores the warp's count;
//  3. threads 0..R-1 scan their rank's warp counts in warp order, adding the running cursor
//     carried from earlier chunks, so positions follow token order;
//  4. each thread writes token_rank_slot for its token.
// After the last chunk, rank_counts and the exclusive prefix over ranks are known, and the block
// scatters every token t with token_rank_slot[t, r] >= 0 to send_order[start[r] + slot].
// Ids outside [0, E] cannot be reported without a host sync: the layout treats them as dropped.
#include "common/cuda_utils.cuh"
#include "common/launch.cuh"
#include "ep_layout/ep_layout.h"

namespace turbomoe::ep_layout {
namespace {

constexpr int kWarp = 32;
constexpr int kThreads = 1024;
constexpr int kWarps = kThreads / kWarp;
constexpr int kMaxRanks = static_cast<int>(kCudaMaxRanks);
constexpr unsigned kFullMask = 0xffffffffu;

struct IdView {
  const void* data;
  int64_t s0, s1;
  int64_t top_k;
};

struct Outputs {
  int32_t* rank_counts;
  int32_t* expert_counts;
  int32_t* send_order;
  int32_t* token_rank_slot;
};

template <typename Id>
__global__ void __launch_bounds__(kThreads)
    layout_kernel(IdView ids, int64_t tokens, int experts, int ranks, Outputs out) {
  cuda::wait_for_prior_grids();
  cuda::allow_next_grid();
  __shared__ int32_t warp_base[kWarps][kMaxRanks];  // per chunk: warp count, then its base
  __shared__ int32_t cursor[kMaxRanks];             // tokens placed per rank so far
  __shared__ int32_t start[kMaxRanks];              // exclusive prefix of rank_counts
  const int tid = threadIdx.x, lane = tid % kWarp, warp = tid / kWarp;
  const unsigned lower_lanes = (1u << lane) - 1u;
  const int per_rank = experts / ranks;
  for (int e = tid; e < experts; e += kThreads) out.expert_counts[e] = 0;
  if (tid < ranks) cursor[tid] = 0;
  __syncthreads();

  for (int64_t base = 0; base < tokens; base += kThreads) {
    const int64_t t = base + tid;
    const bool active = t < tokens;
    unsigned long long mask = 0;
    if (active) {
      for (int64_t k = 0; k < ids.top_k; ++k) {
        const int64_t e = static_cast<const Id*>(ids.data)[t * ids.s0 + k * ids.s1];
        if (e < 0 || e >= experts) continue;  // the sentinel E, and invalid ids, are dropped
        atomicAdd(&out.expert_counts[e], 1);
        mask |= 1ull << (static_cast<int>(e) / per_rank);
      }
    }
    for (int r = 0; r < ranks; ++r) {
      const unsigned votes = __ballot_sync(kFullMask, ((mask >> r) & 1ull) != 0);
      if (lane == 0) warp_base[warp][r] = __popc(votes);
    }
    __syncthreads();
    if (tid < ranks) {
      int32_t running = cursor[tid];
      for (int w = 0; w < kWarps; ++w) {
        const int32_t c = warp_base[w][tid];
        warp_base[w][tid] = running;
        running += c;
      }
      cursor[tid] = running;
    }
    __syncthreads();
    for (int r = 0; r < ranks; ++r) {
      const bool sends = ((mask >> r) & 1ull) != 0;
      const unsigned votes = __ballot_sync(kFullMask, sends);
      if (active) {
        out.token_rank_slot[t * ranks + r] =
            sends ? warp_base[warp][r] + __popc(votes & lower_lanes) : -1;
      }
    }
    __syncthreads();  // warp_base is rewritten by the next chunk
  }

  if (tid == 0) {
    int32_t total = 0;
    for (int r = 0; r < ranks; ++r) {
      out.rank_counts[r] = cursor[r];
      start[r] = total;
      total += cursor[r];
    }
  }
  __syncthreads();  // also makes this block's token_rank_slot writes visible to every thread
  const int64_t cells = tokens * ranks;
  int32_t total = 0;
  for (int r = 0; r < ranks; ++r) total += cursor[r];
  for (int64_t i = tid; i < cells; i += kThreads) {
    const int32_t s = out.token_rank_slot[i];
    if (s >= 0) out.send_order[start[i % ranks] + s] = static_cast<int32_t>(i / ranks);
    if (i >= total) out.send_order[i] = -1;
  }
}

}  // namespace

void layout_cuda(const Arg& ids, int64_t experts, int64_t ranks, const Arg& rank_counts,
                 const Arg& expert_counts, const Arg& send_order, const Arg& token_rank_slot,
                 void* stream) {
  cuda::DeviceGuard device(rank_counts.t().device_index);
  const IdView view{ids.data(), ids.stride(0), ids.stride(1), ids.size(1)};
  const Outputs out{rank_counts.ptr<int32_t>(), expert_counts.ptr<int32_t>(),
                    send_order.ptr<int32_t>(), token_rank_slot.ptr<int32_t>()};
  const int e = static_cast<int>(experts), r = static_cast<int>(ranks);
  const cudaStream_t s = cuda::as_stream(stream);
  if (ids.dtype() == TM_DTYPE_INT32) {
    cuda::launch("layout_kernel", layout_kernel<int32_t>, 1, kThreads, 0, s, view, ids.size(0), e,
                 r, out);
  } else {
    cuda::launch("layout_kernel", layout_kernel<int64_t>, 1, kThreads, 0, s, view, ids.size(0), e,
                 r, out);
  }
}

}  // namespace turbomoe::ep_layout
