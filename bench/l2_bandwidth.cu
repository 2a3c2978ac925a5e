// How fast can the SMs pull operands into shared memory through the TMA unit, from L2 and from
// DRAM? The row passes of the Hopper grouped GEMM load 48 KiB a stage for 4.19 MFLOP (a 128 x
// 256 tile, 64 deep): at their 632 TFLOP/s (H100, gate/up forward) that is 7.2 TB/s out of L2.
// If this benchmark's L2 ceiling is about that, the passes are L2-bound and only loading each
// operand once for two CTAs (cluster multicast) lifts them; if it is well above, the loss is
// elsewhere (latency, the pipeline). Standalone (never part of the library):
//   nvcc -std=c++20 -O3 -arch=sm_90a -I csrc -o /tmp/l2bw bench/l2_bandwidth.cu && /tmp/l2bw
// Each CTA (one an SM) streams its share of a buffer through a ring of 4 stages of 48 KiB, as
// the GEMM's producer does, with 1-D bulk copies (cp.async.bulk) of 16 KiB completing on the
// stage's mbarrier; one warp waits on each stage and frees it at once (no computation), so the
// copies are the only work. Buffers: 24 MiB (held in L2 after the first pass) and 4 GiB (DRAM).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <vector>

#include "grouped_gemm/sm90_ptx.cuh"

namespace {

constexpr int kStages = 4;
constexpr int kCopiesPerStage = 3;
constexpr int kCopyBytes = 16 << 10;
constexpr int kStageBytes = kCopiesPerStage * kCopyBytes;  // 48 KiB, the GEMM's stage
constexpr int kThreads = 64;                               // warp 0 loads, warp 1 consumes

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
__device__ __forceinline__ void bulk_load(uint32_t dst, const void* src, uint32_t bytes,
                                          uint32_t bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::
          "r"(dst),
      "l"(reinterpret_cast<uint64_t>(src)), "r"(bytes), "r"(bar)
      : "memory");
}
#endif

// Streams `stages` stages of the buffer (stage i of this CTA at (blockIdx.x + i * gridDim.x) %
// buffer_stages) through shared memory; *sink gets a word of the last stage so nothing is elided.
__global__ void __launch_bounds__(kThreads, 1)
    stream_kernel(const unsigned char* buffer, int64_t buffer_stages, int64_t stages,
                  uint32_t* sink) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using namespace turbomoe::hopper_gemm;
  extern __shared__ __align__(1024) unsigned char smem[];
  __shared__ __align__(8) uint64_t bars[2 * kStages];
  const uint32_t full = smem_addr(&bars[0]);
  const uint32_t empty = smem_addr(&bars[kStages]);
  const uint32_t base = smem_addr(smem);
  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbar_init(full + 8 * s, 1);
      mbar_init(empty + 8 * s, 1);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int64_t i = 0; i < stages; ++i) {
      const uint32_t s = static_cast<uint32_t>(i % kStages);
      mbar_wait(empty + 8 * s, static_cast<uint32_t>((i / kStages) & 1) ^ 1u);
      mbar_arrive_expect_tx(full + 8 * s, kStageBytes);
      const int64_t chunk = (blockIdx.x + i * gridDim.x) % buffer_stages;
      for (int c = 0; c < kCopiesPerStage; ++c) {
        bulk_load(base + s * kStageBytes + c * kCopyBytes,
                  buffer + chunk * kStageBytes + c * kCopyBytes, kCopyBytes, full + 8 * s);
      }
    }
  } else if (threadIdx.x == 32) {
    uint32_t last = 0;
    for (int64_t i = 0; i < stages; ++i) {
      const uint32_t s = static_cast<uint32_t>(i % kStages);
      mbar_wait(full + 8 * s, static_cast<uint32_t>((i / kStages) & 1));
      last = *reinterpret_cast<const uint32_t*>(smem + s * kStageBytes);
      mbar_arrive(empty + 8 * s);
    }
    sink[blockIdx.x] = last;
  }
#endif
}

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    std::fprintf(stderr, "%s: %s\n", what, cudaGetErrorString(err));
    std::exit(1);
  }
}

// Median bytes/s of `reps` launches streaming `stages_per_cta` stages per CTA.
double rate(const unsigned char* buffer, int64_t buffer_bytes, int ctas, int64_t stages_per_cta,
            uint32_t* sink, int reps) {
  const int64_t buffer_stages = buffer_bytes / kStageBytes;
  const int smem = kStages * kStageBytes;
  cudaEvent_t start, stop;
  check(cudaEventCreate(&start), "event");
  check(cudaEventCreate(&stop), "event");
  std::vector<float> ms;
  for (int r = 0; r < reps + 1; ++r) {  // the first launch warms L2 and the clocks
    check(cudaEventRecord(start), "record");
    stream_kernel<<<ctas, kThreads, smem>>>(buffer, buffer_stages, stages_per_cta, sink);
    check(cudaEventRecord(stop), "record");
    check(cudaEventSynchronize(stop), "sync");
    check(cudaGetLastError(), "stream_kernel");
    float t = 0;
    check(cudaEventElapsedTime(&t, start, stop), "elapsed");
    if (r > 0) ms.push_back(t);
  }
  std::sort(ms.begin(), ms.end());
  const double bytes = static_cast<double>(ctas) * stages_per_cta * kStageBytes;
  return bytes / (ms[ms.size() / 2] * 1e-3);
}

}  // namespace

int main() {
  int device = 0, sms = 0;
  check(cudaGetDevice(&device), "device");
  check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "SM count");
  cudaDeviceProp prop{};
  check(cudaGetDeviceProperties(&prop, device), "properties");
  check(cudaFuncSetAttribute(stream_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             kStages * kStageBytes),
        "shared memory size");
  uint32_t* sink = nullptr;
  check(cudaMalloc(&sink, sizeof(uint32_t) * sms), "sink");
  // ~48 KiB x 2000 stages a CTA: ~13 GB a launch over 132 SMs, a few ms at L2 speed.
  const int64_t stages_per_cta = 2000;
  std::printf("%s, %d SMs, L2 %d MiB; stages of %d KiB (%d bulk copies), ring of %d\n", prop.name,
              sms, prop.l2CacheSize >> 20, kStageBytes >> 10, kCopiesPerStage, kStages);
  for (const int64_t mib : {24L, 4096L}) {
    unsigned char* buffer = nullptr;
    const int64_t bytes = mib << 20;
    check(cudaMalloc(&buffer, bytes), "buffer");
    check(cudaMemset(buffer, 1, bytes), "memset");
    for (const int ctas : {sms / 2, sms}) {
      const double bps = rate(buffer, bytes, ctas, stages_per_cta, sink, 5);
      // The GEMM's row passes: 48 KiB a stage for 2 * 128 * 256 * 64 FLOP.
      const double tflops = bps / kStageBytes * (2.0 * 128 * 256 * 64) / 1e12;
      std::printf(
          "buffer %5ld MiB, %3d CTAs: %6.2f TB/s (%5.1f GB/s an SM) -> row passes <= %4.0f "
          "TFLOP/s\n",
          static_cast<long>(mib), ctas, bps / 1e12, bps / ctas / 1e9, tflops);
    }
    check(cudaFree(buffer), "free");
  }
  check(cudaFree(sink), "free");
  return 0;
}
