// CUDA plan and row gather.
//
// The plan is a stable counting sort in three launches, deterministic by construction:
//  1. count: each block histograms its kPlanChunk consecutive pairs (integer shared-memory
//     atomics, so the counts do not depend on their order);
//  2. scan: one block turns the per-(block, expert) counts into exclusive prefixes over blocks
//     and the expert totals into expert_offsets;
//  3. scatter: one warp per block walks its pairs in order, 32 at a time; __match_any_sync ranks
//     each pair among the earlier lanes with the same expert, and a per-expert cursor in shared
//     memory carries the rank across the 32-pair steps, so pairs keep their order within an
//     expert.
// Ids outside [0, E] cannot be reported without a host sync: the plan treats them as dropped.
#include <type_traits>

#include "common/cuda_utils.cuh"
#include "common/launch.cuh"
#include "permute/permute.h"
#include "permute/plan_rows.cuh"
#include "permute/raw_bits.cuh"

namespace turbomoe::permute {
namespace {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kCountThreads = 256;
constexpr int kScanThreads = 1024;

struct IdView {
  const void* data;
  int64_t s0, s1;
  int64_t top_k;
};

// The expert of pair p; E (dropped) for the sentinel and for out-of-range ids.
template <typename Id>
__device__ __forceinline__ int expert_of(const IdView& v, int64_t p, int experts) {
  const int64_t t = p / v.top_k, k = p % v.top_k;
  const int64_t e = static_cast<const Id*>(v.data)[t * v.s0 + k * v.s1];
  return (e < 0 || e > experts) ? experts : static_cast<int>(e);
}

template <typename Id>
__global__ void plan_count_kernel(IdView ids, int64_t pairs, int experts, int32_t* counts) {
  cuda::wait_for_prior_grids();
  cuda::allow_next_grid();
  extern __shared__ int32_t hist[];
  for (int e = threadIdx.x; e < experts; e += blockDim.x) hist[e] = 0;
  __syncthreads();
  const int64_t begin = int64_t(blockIdx.x) * kPlanChunk;
  const int64_t end = begin + kPlanChunk < pairs ? begin + kPlanChunk : pairs;
  for (int64_t p = begin + threadIdx.x; p < end; p += blockDim.x) {
    const int e = expert_of<Id>(ids, p, experts);
    if (e < experts) atomicAdd(&hist[e], 1);
  }
  __syncthreads();
  int32_t* out = counts + int64_t(blockIdx.x) * experts;
  for (int e = threadIdx.x; e < experts; e += blockDim.x) out[e] = hist[e];
}

// Single block. Thread i owns the contiguous experts [i*per, (i+1)*per).
__global__ void plan_scan_kernel(int32_t* counts, int64_t blocks, int experts, int32_t* offsets) {
  cuda::wait_for_prior_grids();
  cuda::allow_next_grid();
  __shared__ int32_t scan[kScanThreads];
  const int per = (experts + kScanThreads - 1) / kScanThreads;
  const int e0 = threadIdx.x * per;
  const int e1 = e0 + per < experts ? e0 + per : experts;
  int32_t run_total = 0;
  for (int e = e0; e < e1; ++e) {
    int32_t running = 0;
    for (int64_t b = 0; b < blocks; ++b) {
      const int32_t c = counts[b * experts + e];
      counts[b * experts + e] = running;
      running += c;
    }
    offsets[e] = running;  // the expert's total until the offsets are known
    run_total += running;
  }
  scan[threadIdx.x] = run_total;
  __syncthreads();
  for (int o = 1; o < kScanThreads; o <<= 1) {  // inclusive Hillis-Steele scan
    const int32_t v = threadIdx.x >= o ? scan[threadIdx.x - o] : 0;
    __syncthreads();
    scan[threadIdx.x] += v;
    __syncthreads();
  }
  int32_t base = scan[threadIdx.x] - run_total;
  for (int e = e0; e < e1; ++e) {
    const int32_t total = offsets[e];
    offsets[e] = base;
    base += total;
  }
  if (threadIdx.x == kScanThreads - 1) offsets[experts] = base;
}

// One warp per block of kPlanChunk pairs.
template <typename Id>
__global__ void plan_scatter_kernel(IdView ids, int64_t pairs, int experts, const int32_t* prefix,
                                    const int32_t* offsets, int32_t* sorted, int32_t* pair_to_row) {
  cuda::wait_for_prior_grids();
  cuda::allow_next_grid();
  extern __shared__ int32_t cursor[];
  const int lane = threadIdx.x;
  const int32_t* mine = prefix + int64_t(blockIdx.x) * experts;
  for (int e = lane; e < experts; e += kWarp) cursor[e] = offsets[e] + mine[e];
  __syncwarp();
  const int64_t begin = int64_t(blockIdx.x) * kPlanChunk;
  const int64_t end = begin + kPlanChunk < pairs ? begin + kPlanChunk : pairs;
  const unsigned lower_lanes = (1u << lane) - 1u;
  for (int64_t base = begin; base < end; base += kWarp) {
    const int64_t p = base + lane;
    const bool active = p < end;
    const int e = active ? expert_of<Id>(ids, p, experts) : -1;
    const unsigned peers = __match_any_sync(kFullMask, e);
    const int rank = __popc(peers & lower_lanes);
    if (active && e < experts) {
      const int32_t row = cursor[e] + rank;
      sorted[row] = static_cast<int32_t>(p);
      pair_to_row[p] = row;
    } else if (active) {
      pair_to_row[p] = -1;
    }
    __syncwarp();
    if (active && e < experts && rank == 0) cursor[e] += __popc(peers);
    __syncwarp();
  }
  // Rows share the index range of pairs: this block also marks its rows past the last used one.
  const int32_t used = offsets[experts];
  for (int64_t r = begin + lane; r < end; r += kWarp) {
    if (r >= used) sorted[r] = -1;
  }
}

// Copies whole rows as raw units of R (the dtype does not matter to a copy), one warp a row.
// Each lane issues all kGatherUnroll loads of a chunk before its stores, so that a warp keeps
// up to 32 x 8 x 16 bytes of its row in flight: the earlier version (a 128-thread block a row,
// loads and stores interleaved, one 16-byte load a thread in flight) ran at ~69% of the copy
// floor (H100 profile: 68 us for the Qwen3 layer's 32k x 4 KiB rows against ~47).
constexpr int kGatherThreads = 256;
constexpr int kGatherUnroll = 8;

template <typename R>
__global__ void __launch_bounds__(kGatherThreads)
    gather_kernel(const char* src, int64_t src_ld_bytes, int64_t tokens, const int32_t* sorted,
                  const int32_t* offsets, int experts, int64_t top_k, char* dst,
                  int64_t dst_ld_bytes, int64_t rows, int64_t units) {
  cuda::wait_for_prior_grids();
  cuda::allow_next_grid();
  const int64_t used = planned_rows(offsets, experts, rows);
  const int lane = static_cast<int>(threadIdx.x) % kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (kGatherThreads / kWarp);
  for (int64_t r =
           static_cast<int64_t>(blockIdx.x) * (kGatherThreads / kWarp) + threadIdx.x / kWarp;
       r < rows; r += warps) {
    R* d = reinterpret_cast<R*>(dst + r * dst_ld_bytes);
    const int64_t pair = r < used ? sorted[r] : -1;
    const int64_t token = pair >= 0 ? pair / top_k : -1;
    if (token < 0 || token >= tokens) {
      for (int64_t u = lane; u < units; u += kWarp) d[u] = R{};
      continue;
    }
    const R* s = reinterpret_cast<const R*>(src + token * src_ld_bytes);
    for (int64_t chunk = 0; chunk < units; chunk += kWarp * kGatherUnroll) {
      R v[kGatherUnroll];
#pragma unroll
      for (int i = 0; i < kGatherUnroll; ++i) {
        const int64_t u = chunk + i * kWarp + lane;
        if (u < units) v[i] = s[u];
      }
#pragma unroll
      for (int i = 0; i < kGatherUnroll; ++i) {
        const int64_t u = chunk + i * kWarp + lane;
        if (u < units) d[u] = v[i];
      }
    }
  }
}

// The widest unit (16, 8, 4 or 2 bytes) that divides every row start and the row length.
int unit_bytes(std::initializer_list<uintptr_t> values) {
  for (int unit : {16, 8, 4, 2}) {
    bool ok = true;
    for (uintptr_t v : values) ok = ok && v % unit == 0;
    if (ok) return unit;
  }
  return 1;  // unreachable: floating elements are at least 2 bytes
}

template <typename R>
void launch_gather(const Arg& src, const Arg& sorted_pairs, const Arg& offsets, int64_t top_k,
                   const Arg& dst, int64_t elem, cudaStream_t stream) {
  const int64_t rows = dst.size(0);
  constexpr int64_t kRowsPerBlock = kGatherThreads / kWarp;
  const int64_t wanted = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
  const unsigned blocks = static_cast<unsigned>(wanted < (1 << 20) ? wanted : (1 << 20));
  if (blocks == 0) return;
  cuda::launch("gather_kernel", gather_kernel<R>, blocks, kGatherThreads, 0, stream,
               static_cast<const char*>(src.data()), src.stride(0) * elem, src.size(0),
               sorted_pairs.ptr<const int32_t>(), offsets.ptr<const int32_t>(),
               static_cast<int>(offsets.size(0) - 1), top_k, static_cast<char*>(dst.data()),
               dst.stride(0) * elem, rows, dst.size(1) * elem / static_cast<int64_t>(sizeof(R)));
}

template <typename Id>
void launch_plan(const IdView& view, int64_t pairs, int experts, int32_t* counts,
                 const Arg& sorted_pairs, const Arg& pair_to_row, const Arg& offsets,
                 cudaStream_t stream) {
  const int64_t blocks = (pairs + kPlanChunk - 1) / kPlanChunk;
  const size_t shared = static_cast<size_t>(experts) * sizeof(int32_t);
  if (blocks > 0) {
    cuda::launch("plan_count_kernel", plan_count_kernel<Id>, static_cast<unsigned>(blocks),
                 kCountThreads, shared, stream, view, pairs, experts, counts);
  }
  cuda::launch("plan_scan_kernel", plan_scan_kernel, 1, kScanThreads, 0, stream, counts, blocks,
               experts, offsets.ptr<int32_t>());
  if (blocks > 0) {
    cuda::launch("plan_scatter_kernel", plan_scatter_kernel<Id>, static_cast<unsigned>(blocks),
                 kWarp, shared, stream, view, pairs, experts, counts, offsets.ptr<const int32_t>(),
                 sorted_pairs.ptr<int32_t>(), pair_to_row.ptr<int32_t>());
  }
}

}  // namespace

void plan_cuda(const Arg& ids, int64_t experts, const Arg& sorted_pairs, const Arg& pair_to_row,
               const Arg& offsets, void* workspace, void* stream) {
  cuda::DeviceGuard device(offsets.t().device_index);
  const IdView view{ids.data(), ids.stride(0), ids.stride(1), ids.size(1)};
  const int64_t pairs = ids.numel();
  auto* counts = static_cast<int32_t*>(workspace);
  const int e = static_cast<int>(experts);
  if (ids.dtype() == TM_DTYPE_INT32) {
    launch_plan<int32_t>(view, pairs, e, counts, sorted_pairs, pair_to_row, offsets,
                         cuda::as_stream(stream));
  } else {
    launch_plan<int64_t>(view, pairs, e, counts, sorted_pairs, pair_to_row, offsets,
                         cuda::as_stream(stream));
  }
}

void gather_cuda(const Arg& src, const Arg& sorted_pairs, const Arg& offsets, int64_t top_k,
                 const Arg& dst, void* stream) {
  cuda::DeviceGuard device(dst.t().device_index);
  const int64_t elem = static_cast<int64_t>(dtype_size(dst.dtype()));
  const int unit = unit_bytes(
      {reinterpret_cast<uintptr_t>(src.data()), reinterpret_cast<uintptr_t>(dst.data()),
       static_cast<uintptr_t>(src.stride(0) * elem), static_cast<uintptr_t>(dst.stride(0) * elem),
       static_cast<uintptr_t>(dst.size(1) * elem)});
  const cudaStream_t s = cuda::as_stream(stream);
  switch (unit) {
    case 16:
      launch_gather<RawOf<16>::type>(src, sorted_pairs, offsets, top_k, dst, elem, s);
      break;
    case 8:
      launch_gather<RawOf<8>::type>(src, sorted_pairs, offsets, top_k, dst, elem, s);
      break;
    case 4:
      launch_gather<RawOf<4>::type>(src, sorted_pairs, offsets, top_k, dst, elem, s);
      break;
    default:
      launch_gather<RawOf<2>::type>(src, sorted_pairs, offsets, top_k, dst, elem, s);
      break;
  }
}

}  // namespace turbomoe::permute
