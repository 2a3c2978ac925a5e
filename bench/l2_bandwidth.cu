// How fast can the SMs pull operands into shared memory through the TMA unit, from L2 and from
// DRAM? The row passes of the Hopper grouped GEMM load 48 KiB a stage for 4.19 MFLOP (a 128 x
// 256 tile, 64 deep): at their 632 TFLOP/s (H100, gate/up forward) that is 7.2 TB/s out of L2.
// If this benchmark's L2 ceiling is about that, the passes are L2-bound and only loading each
// operand once for two CTAs (cluster multicast) lifts them; if it is well above, the loss is
// elsewhere (latency, the pipeline). Standalone (never part of the library):
//   nvcc -std=c++20 -O3 -arch=sm_90a -I csrc -I include -o /tmp/l2bw bench/l2_bandwidth.cu &&
//   /tmp/l2bw
// Each CTA (one an SM) streams its share of a buffer through a ring of 4 stages of 48 KiB, as
// the GEMM's producer does, with 1-D bulk copies (cp.async.bulk) of 16 KiB completing on the
// stage's mbarrier; one warp waits on each stage and frees it at once (no computation), so the
// copies are the only work. Buffers: 24 MiB (held in L2 after the first pass) and 4 GiB (DRAM).
//
// (Launched through the library's launch_config, one CTA a tile as clusters of 1.)
// Then the same in 2-CTA clusters laid out as the row passes' `cluster_rows` kernel: a stage is
// 16 KiB of this CTA's own (A) and 32 KiB shared by the pair (B), of which each CTA loads one half
// and multicasts it into both; the consumer of each CTA frees the stage in both (a stage is
// refilled only when both have read it). 48 KiB land in each CTA a stage for 32 KiB read from L2.
// If the pair's stage rate is ~1.5x the single CTA's, multicast lifts the L2 ceiling as the
// bytes say and the pair kernel's loss (docs/perf-notes.md) is in its own code; if not, the
// multicast path itself is the bound. Last, each consumer also holds every stage for a fixed
// number of cycles (1000-1600: about the WGMMAs' time at the dense peak, ~0.7 us), which shows
// what the pair's coupling (each stage waits for the slower of two CTAs) costs a pipeline of 4
// stages.
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdio>
#include <vector>

#include "common/launch.cuh"
#include "grouped_gemm/sm90_ptx.cuh"

namespace {

constexpr int kStages = 4;
constexpr int kCopiesPerStage = 3;
constexpr int kCopyBytes = 16 << 10;
constexpr int kStageBytes = kCopiesPerStage * kCopyBytes;  // 48 KiB, the GEMM's stage
constexpr int kThreads = 64;                               // warp 0 loads, warp 1 consumes
constexpr int kPairChunkBytes = 4 * kCopyBytes;  // a cluster's stage in the buffer: A0, A1, B

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
__device__ __forceinline__ void bulk_load(uint32_t dst, const void* src, uint32_t bytes,
                                          uint32_t bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::
          "r"(dst),
      "l"(reinterpret_cast<uint64_t>(src)), "r"(bytes), "r"(bar)
      : "memory");
}

// The same copy landing at the same shared-memory offset in every CTA of the cluster in
// cta_mask, completing on each one's mbarrier at `bar`'s offset.
__device__ __forceinline__ void bulk_load_multicast(uint32_t dst, const void* src, uint32_t bytes,
                                                    uint32_t bar, uint16_t cta_mask) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster "
      "[%0], [%1], %2, [%3], %4;" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(src)), "r"(bytes), "r"(bar), "h"(cta_mask)
      : "memory");
}
#endif

// Streams `stages` stages of the buffer (stage i of this CTA at (blockIdx.x + i * gridDim.x) %
// buffer_stages) through shared memory; *sink gets a word of the last stage so nothing is elided.
// kPair: 2-CTA clusters (launched with a cluster dimension of 2), B multicast as described above;
// a buffer stage is then 64 KiB (A of rank 0, A of rank 1, B), stage i of the cluster at
// (cluster + i * clusters) % buffer_stages. spin: cycles each consumer holds a stage.
template <bool kPair>
__global__ void __launch_bounds__(kThreads, 1)
    stream_kernel(const unsigned char* buffer, int64_t buffer_stages, int64_t stages, int64_t spin,
                  uint32_t* sink) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using namespace turbomoe::hopper_gemm;
  extern __shared__ __align__(1024) unsigned char smem[];
  __shared__ __align__(8) uint64_t bars[2 * kStages];
  const uint32_t full = smem_addr(&bars[0]);
  const uint32_t empty = smem_addr(&bars[kStages]);
  const uint32_t base = smem_addr(smem);
  const uint32_t rank = kPair ? cluster_rank() : 0;
  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbar_init(full + 8 * s, 1);
      mbar_init(empty + 8 * s, kPair ? 2 : 1);  // the consumers of every CTA that fills it
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  if constexpr (kPair) cluster_sync();  // the peer's barriers exist before any multicast
  const int64_t unit = kPair ? blockIdx.x / 2 : blockIdx.x;
  const int64_t units = kPair ? gridDim.x / 2 : gridDim.x;
  if (threadIdx.x == 0) {
    for (int64_t i = 0; i < stages; ++i) {
      const uint32_t s = static_cast<uint32_t>(i % kStages);
      mbar_wait(empty + 8 * s, static_cast<uint32_t>((i / kStages) & 1) ^ 1u);
      mbar_arrive_expect_tx(full + 8 * s, kStageBytes);
      const int64_t chunk = (unit + i * units) % buffer_stages;
      const uint32_t dst = base + s * kStageBytes;
      if constexpr (kPair) {
        const unsigned char* src = buffer + chunk * kPairChunkBytes;
        bulk_load(dst, src + rank * kCopyBytes, kCopyBytes, full + 8 * s);  // own A
        const uint32_t half = dst + kCopyBytes + rank * kCopyBytes;         // half of B
        bulk_load_multicast(half, src + 2 * kCopyBytes + rank * kCopyBytes, kCopyBytes,
                            full + 8 * s, 0x3);
      } else {
        for (int c = 0; c < kCopiesPerStage; ++c) {
          bulk_load(dst + c * kCopyBytes, buffer + chunk * kStageBytes + c * kCopyBytes, kCopyBytes,
                    full + 8 * s);
        }
      }
    }
  } else if (threadIdx.x == 32) {
    uint32_t last = 0;
    for (int64_t i = 0; i < stages; ++i) {
      const uint32_t s = static_cast<uint32_t>(i % kStages);
      mbar_wait(full + 8 * s, static_cast<uint32_t>((i / kStages) & 1));
      last += *reinterpret_cast<const uint32_t*>(smem + s * kStageBytes);
      if (spin > 0) {
        const int64_t until = clock64() + spin;
        while (clock64() < until) {
        }
      }
      if constexpr (kPair) {
        mbar_arrive_in(empty + 8 * s, 0);
        mbar_arrive_in(empty + 8 * s, 1);
      } else {
        mbar_arrive(empty + 8 * s);
      }
    }
    sink[blockIdx.x] = last;
  }
  // Neither CTA of a pair may exit while the other can still multicast into it or arrive on
  // its barriers.
  if constexpr (kPair) cluster_sync();
#endif
}

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    std::fprintf(stderr, "%s: %s\n", what, cudaGetErrorString(err));
    std::exit(1);
  }
}

// The stream kernel's launch: `ctas` CTAs in clusters of `cluster` (1: one CTA a tile, 2: pairs);
// *attrs must outlive the launch.
cudaLaunchConfig_t pair_config(int ctas, unsigned cluster,
                               std::array<cudaLaunchAttribute, 2>* attrs) {
  return turbomoe::cuda::launch_config(dim3(static_cast<unsigned>(ctas)), dim3(kThreads),
                                       kStages * kStageBytes, nullptr, cluster, false, attrs);
}

// Median stages/s (all CTAs together) of `reps` launches streaming `stages_per_cta` stages per
// CTA; pair: in 2-CTA clusters (ctas even).
double stage_rate(const unsigned char* buffer, int64_t buffer_bytes, int ctas,
                  int64_t stages_per_cta, int64_t spin, bool pair, uint32_t* sink, int reps) {
  const int64_t buffer_stages = buffer_bytes / (pair ? kPairChunkBytes : kStageBytes);
  std::array<cudaLaunchAttribute, 2> cluster{};
  const cudaLaunchConfig_t config = pair_config(ctas, pair ? 2 : 1, &cluster);
  cudaEvent_t start, stop;
  check(cudaEventCreate(&start), "event");
  check(cudaEventCreate(&stop), "event");
  std::vector<float> ms;
  for (int r = 0; r < reps + 1; ++r) {  // the first launch warms L2 and the clocks
    check(cudaEventRecord(start), "record");
    if (pair) {
      check(cudaLaunchKernelEx(&config, stream_kernel<true>, buffer, buffer_stages, stages_per_cta,
                               spin, sink),
            "stream_kernel (pairs)");
    } else {
      check(cudaLaunchKernelEx(&config, stream_kernel<false>, buffer, buffer_stages, stages_per_cta,
                               spin, sink),
            "stream_kernel");
    }
    check(cudaEventRecord(stop), "record");
    check(cudaEventSynchronize(stop), "sync");
    check(cudaGetLastError(), "stream_kernel");
    float t = 0;
    check(cudaEventElapsedTime(&t, start, stop), "elapsed");
    if (r > 0) ms.push_back(t);
  }
  check(cudaEventDestroy(start), "event");
  check(cudaEventDestroy(stop), "event");
  std::sort(ms.begin(), ms.end());
  return static_cast<double>(ctas) * stages_per_cta / (ms[ms.size() / 2] * 1e-3);
}

// The row passes' FLOP a CTA-stage: a 128 x 256 tile, 64 deep.
constexpr double kStageFlop = 2.0 * 128 * 256 * 64;

}  // namespace

int main() {
  int device = 0, sms = 0;
  check(cudaGetDevice(&device), "device");
  check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "SM count");
  cudaDeviceProp prop{};
  check(cudaGetDeviceProperties(&prop, device), "properties");
  for (const auto kernel : {stream_kernel<false>, stream_kernel<true>}) {
    check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               kStages * kStageBytes),
          "shared memory size");
  }
  uint32_t* sink = nullptr;
  check(cudaMalloc(&sink, sizeof(uint32_t) * sms), "sink");
  // ~48 KiB x 2000 stages a CTA: ~13 GB a launch over 132 SMs, a few ms at L2 speed.
  const int64_t stages_per_cta = 2000;
  int pair_ctas = sms / 2 * 2;
  {
    // Clusters live inside one GPC: fewer pairs than sms / 2 may be resident at once.
    std::array<cudaLaunchAttribute, 2> cluster{};
    const cudaLaunchConfig_t config = pair_config(pair_ctas, 2, &cluster);
    int resident = 0;
    check(cudaOccupancyMaxActiveClusters(&resident, stream_kernel<true>, &config),
          "max active clusters");
    std::printf("2-CTA clusters resident at once: %d\n", resident);
    pair_ctas = std::min(pair_ctas, 2 * resident);
  }
  std::printf("%s, %d SMs, L2 %d MiB; stages of %d KiB (%d bulk copies), ring of %d\n", prop.name,
              sms, prop.l2CacheSize >> 20, kStageBytes >> 10, kCopiesPerStage, kStages);
  for (const int64_t mib : {24L, 4096L}) {
    unsigned char* buffer = nullptr;
    const int64_t bytes = mib << 20;
    check(cudaMalloc(&buffer, bytes), "buffer");
    check(cudaMemset(buffer, 1, bytes), "memset");
    for (const int ctas : {sms / 2, sms}) {
      const double stages = stage_rate(buffer, bytes, ctas, stages_per_cta, 0, false, sink, 5);
      const double bps = stages * kStageBytes;
      std::printf(
          "buffer %5ld MiB, %3d CTAs: %6.2f TB/s (%5.1f GB/s an SM) -> row passes <= %4.0f "
          "TFLOP/s\n",
          static_cast<long>(mib), ctas, bps / 1e12, bps / ctas / 1e9, stages * kStageFlop / 1e12);
    }
    // 2-CTA clusters, B multicast: 48 KiB land in each CTA a stage, 32 KiB of it read from L2.
    const double pairs = stage_rate(buffer, bytes, pair_ctas, stages_per_cta, 0, true, sink, 5);
    std::printf(
        "buffer %5ld MiB, %3d CTAs in pairs, B multicast: %6.2f TB/s landed, %6.2f TB/s from L2 "
        "-> row passes <= %4.0f TFLOP/s\n",
        static_cast<long>(mib), pair_ctas, pairs * kStageBytes / 1e12,
        pairs * 2 * kCopyBytes / 1e12, pairs * kStageFlop / 1e12);
    if (mib == 24) {
      // Consumers that hold each stage for `spin` cycles, as the WGMMAs do: the pipeline's rate
      // against the spin alone (1 stage per spin a CTA), one CTA a tile against pairs.
      for (const int64_t spin : {1000L, 1300L, 1600L}) {
        const double one = stage_rate(buffer, bytes, sms, stages_per_cta / 2, spin, false, sink, 3);
        const double two =
            stage_rate(buffer, bytes, pair_ctas, stages_per_cta / 2, spin, true, sink, 3);
        std::printf(
            "consumers hold a stage %4ld cycles: one CTA a tile %4.0f TFLOP/s, pairs %4.0f "
            "TFLOP/s\n",
            static_cast<long>(spin), one * kStageFlop / 1e12, two * kStageFlop / 1e12);
      }
    }
    check(cudaFree(buffer), "free");
  }
  check(cudaFree(sink), "free");
  return 0;
}
