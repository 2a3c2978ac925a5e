// The NVLink peer exchange on CUDA: one cudaMalloc per rank shared through CUDA IPC, a push kernel
// that copies each block straight into its destination's buffer, and a barrier kernel that counts
// on the device (so captured graphs replay it correctly) and traps after a time-out.
#include <cuda_runtime.h>

#include <cstdio>
#include <cstring>
#include <string>

#include "common/cuda_utils.cuh"
#include "common/launch.cuh"
#include "peer/peer.h"

namespace turbomoe::peer {
namespace {

struct Peers {
  char* base[TM_PEER_MAX_RANKS];  // every rank's allocation, as mapped in this process
};

__device__ __forceinline__ uint64_t global_timer_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__device__ __forceinline__ void store_release_sys(uint64_t* p, uint64_t v) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ uint64_t load_acquire_sys(const uint64_t* p) {
  uint64_t v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

// One thread per rank j: tell j that this rank arrived (slot `rank` of j's flags), then wait for
// j's arrival in this rank's own flags. The count only grows, so a peer that already went on to
// the next barrier (count + 1) also satisfies this one.
__global__ void barrier_kernel(Peers peers, int world, int rank, uint64_t timeout_ns,
                               double timeout_s) {
  cuda::wait_for_prior_grids();
  cuda::allow_next_grid();
  auto* const own = reinterpret_cast<uint64_t*>(peers.base[rank]);
  uint64_t* const epoch = own + kEpochOffset / sizeof(uint64_t);
  const uint64_t next = *epoch + 1;
  __syncthreads();  // every thread has read the count before thread 0 advances it
  const int j = static_cast<int>(threadIdx.x);
  if (j < world) {
    auto* const peer_flags = reinterpret_cast<uint64_t*>(peers.base[j] + kFlagsOffset);
    store_release_sys(peer_flags + rank, next);
    const uint64_t* const arrived = own + kFlagsOffset / sizeof(uint64_t) + j;
    const uint64_t start = global_timer_ns();
    while (load_acquire_sys(arrived) < next) {
      if (global_timer_ns() - start > timeout_ns) {
        printf(
            "turbomoe: NVLink peer barrier %llu on rank %d waited more than %.1f s for rank %d "
            "(it left the exchange or stopped); trapping so that the step fails instead of "
            "hanging\n",
            static_cast<unsigned long long>(next), rank, timeout_s, j);
        __trap();
      }
      __nanosleep(64);
    }
  }
  __syncthreads();
  if (j == 0) *epoch = next;
}

constexpr int kPushThreads = 512;
constexpr int kPushUnroll = 4;  // 16-byte loads in flight per thread before the stores

// Block j of src → rank j's data region at offset + rank * block_bytes. Each CTA starts at a
// different destination so that the links to all peers are busy at once.
__global__ void __launch_bounds__(kPushThreads)
    push_kernel(const uint4* __restrict__ src, Peers peers, int world, int rank, size_t block_vecs,
                size_t offset) {
  cuda::wait_for_prior_grids();
  cuda::allow_next_grid();
  const size_t step = static_cast<size_t>(gridDim.x) * kPushThreads * kPushUnroll;
  const size_t first = static_cast<size_t>(blockIdx.x) * kPushThreads * kPushUnroll + threadIdx.x;
  for (int d = 0; d < world; ++d) {
    const int j = (rank + 1 + static_cast<int>(blockIdx.x) + d) % world;
    const uint4* const from = src + static_cast<size_t>(j) * block_vecs;
    auto* const to = reinterpret_cast<uint4*>(peers.base[j] + kDataOffset + offset) +
                     static_cast<size_t>(rank) * block_vecs;
    for (size_t i = first; i < block_vecs; i += step) {
      uint4 v[kPushUnroll];
#pragma unroll
      for (int u = 0; u < kPushUnroll; ++u) {
        const size_t at = i + static_cast<size_t>(u) * kPushThreads;
        if (at < block_vecs) v[u] = __ldg(from + at);
      }
#pragma unroll
      for (int u = 0; u < kPushUnroll; ++u) {
        const size_t at = i + static_cast<size_t>(u) * kPushThreads;
        if (at < block_vecs) to[at] = v[u];
      }
    }
  }
  // The barrier that follows (another kernel) publishes these writes to the peers.
  __threadfence_system();
}

}  // namespace

Comm::Comm(int32_t device, int32_t rank, int32_t world, size_t data_bytes)
    : device_(device), rank_(rank), world_(world), data_bytes_(round_up(data_bytes, kDataAlign)) {
  cuda::DeviceGuard guard(device);
  cuda::check(cudaMalloc(&base_, allocation_bytes(data_bytes_)), "cudaMalloc (peer buffer)");
  // Flags and count start at zero on every rank before any handle leaves this process.
  const cudaError_t zeroed = cudaMemset(base_, 0, kDataOffset);
  const cudaError_t synced = zeroed == cudaSuccess ? cudaDeviceSynchronize() : zeroed;
  if (synced != cudaSuccess) {
    cudaFree(base_);
    cuda::check(synced, "cudaMemset (peer flags)");
  }
  peers_[rank] = base_;
}

Comm::~Comm() {
  int previous = 0;
  const bool switched = cudaGetDevice(&previous) == cudaSuccess && previous != device_ &&
                        cudaSetDevice(device_) == cudaSuccess;
  for (int j = 0; j < world_; ++j) {
    if (j != rank_ && peers_[j] != nullptr) cudaIpcCloseMemHandle(peers_[j]);
  }
  cudaFree(base_);
  if (switched) cudaSetDevice(previous);
}

void* Comm::data() const { return static_cast<char*>(base_) + kDataOffset; }

void Comm::export_handle(void* handle) const {
  static_assert(sizeof(cudaIpcMemHandle_t) == TM_PEER_HANDLE_BYTES);
  cuda::DeviceGuard guard(device_);
  cudaIpcMemHandle_t h;
  cuda::check(cudaIpcGetMemHandle(&h, base_), "cudaIpcGetMemHandle");
  std::memcpy(handle, &h, sizeof h);
}

void Comm::connect(const void* handles) {
  if (connected_) invalid("this comm is already connected");
  cuda::DeviceGuard guard(device_);
  const auto* bytes = static_cast<const char*>(handles);
  for (int j = 0; j < world_; ++j) {
    if (j == rank_) continue;
    cudaIpcMemHandle_t h;
    std::memcpy(&h, bytes + static_cast<size_t>(j) * sizeof h, sizeof h);
    void* mapped = nullptr;
    cuda::check(cudaIpcOpenMemHandle(&mapped, h, cudaIpcMemLazyEnablePeerAccess),
                ("cudaIpcOpenMemHandle (rank " + std::to_string(j) + "'s buffer)").c_str());
    peers_[j] = mapped;  // closed by the destructor, also when a later rank fails
  }
  connected_ = true;
}

namespace {

Peers peer_table(const std::array<void*, TM_PEER_MAX_RANKS>& mapped) {
  Peers p{};
  for (size_t j = 0; j < mapped.size(); ++j) p.base[j] = static_cast<char*>(mapped[j]);
  return p;
}

}  // namespace

void Comm::barrier(double timeout_s, void* stream) {
  if (!connected_) invalid("connect the comm before its first barrier");
  cuda::DeviceGuard guard(device_);
  const double ns = timeout_s * 1e9;
  const auto timeout_ns = ns > 1.8e19 ? UINT64_MAX : static_cast<uint64_t>(ns);
  cuda::launch("peer barrier_kernel", barrier_kernel, 1, 32, 0, cuda::as_stream(stream),
               peer_table(peers_), world_, rank_, timeout_ns, timeout_s);
}

void Comm::push(const void* src, size_t block_bytes, size_t offset, int32_t ctas, void* stream) {
  if (!connected_) invalid("connect the comm before pushing");
  cuda::DeviceGuard guard(device_);
  const size_t block_vecs = block_bytes / sizeof(uint4);
  const size_t needed =
      (block_vecs + kPushThreads * kPushUnroll - 1) / (kPushThreads * kPushUnroll);
  const int grid = static_cast<int>(needed < static_cast<size_t>(ctas) ? needed : ctas);
  cuda::launch("peer push_kernel", push_kernel, grid, kPushThreads, 0, cuda::as_stream(stream),
               static_cast<const uint4*>(src), peer_table(peers_), world_, rank_, block_vecs,
               offset);
}

}  // namespace turbomoe::peer
