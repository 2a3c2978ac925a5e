// The Hopper grouped GEMM's ping-pong kernel for the row passes (forward, grad-input): the two
// consumer warpgroups work on different tiles, so that one stores its finished tile while the
// other computes (in the cooperative kernel, hopper_gemm_kernel.cuh, both stop for every
// epilogue, and nothing else keeps the tensor cores busy meanwhile).
//
// A tile is one warpgroup's: 64 rows x 256 columns (one m64n256 accumulator, the cooperative
// tile's half). The CTA's tiles, blockIdx.x, + gridDim.x, ..., go to its consumers by turns (even
// ones to consumer 0, odd ones to consumer 1), and the producer loads their stages in that order
// into one ring (A: one 64-row box, B as in the cooperative kernel). A consumer starts a tile's
// main loop only once the other has waited for the last stage of its previous tile (a turn
// mbarrier each): so each one's epilogue runs while the other has the tensor cores to itself,
// and no consumer waits on a stage's full barrier more than one phase ahead of it (a parity
// wait cannot tell phase n from phase n + 2: without the turns, consumer 1 waited for its first
// stage while the ring still held consumer 0's first ones, passed on their parity and read
// them, which broke the kernel on its first GPU run). No WGMMA changes: each 64-row group of
// outputs sees the same instructions in the same order as in the cooperative kernel (whose tiles
// start at the same multiples of 64 rows from each expert's start), so the outputs are bitwise the
// same.
//
// Measured slower than the cooperative kernel (H100: 6-14% a pass, eighteenth session): a 40 KiB
// stage feeds one consumer for 2.1 MFLOP instead of 4.2 for 48 KiB, so the ring covers half the
// operand latency in time, and the one consumer that computes waits for operands more often
// than the hidden epilogue saves (docs/perf-notes.md). Opt-in; the base for wider tiles.
#pragma once

#include <cuda.h>  // CUtensorMap (the type only: the library never links libcuda)
#include <cuda_bf16.h>

#include <cstdint>

#include "common/launch.cuh"
#include "grouped_gemm/hopper_gemm_epilogue.cuh"
#include "grouped_gemm/hopper_gemm_layout.cuh"
#include "grouped_gemm/hopper_gemm_loads.cuh"
#include "grouped_gemm/hopper_gemm_tiles.cuh"
#include "grouped_gemm/sm90_ptx.cuh"

namespace turbomoe::hopper_gemm {

inline constexpr int kPingRows = 64;  // rows of a ping-pong tile (one consumer's)

// Shared memory of the ping-pong kernel: the stages (A: one 64-row box; B: 256 x 64), the two
// consumers' epilogue buffers (kEpi's pieces, as in Layout), the mbarriers, the schedule tables.
// As many stages as fit beside them at kMaxExperts: 3 with the whole-box epilogue, 4 with the
// split one, 5 with the quarter one.
template <int kEpi>
struct PingPongLayout {
  static_assert(kEpi == kEpiTma || kEpi == kEpiTmaSplit || kEpi == kEpiTmaQuarter,
                "the ping-pong kernel stores through a TMA epilogue");
  static constexpr int kStageABytes = kBoxBytes;
  static constexpr int kStageBytes = kStageABytes + kTileBBytes;  // 40 KiB
  static constexpr int kEpiPieces = Layout<kEpi>::kEpiPieces;
  static constexpr int kEpiBytes = Layout<kEpi>::kEpiBytes;
  static constexpr int kFixedBytes = kEpiBytes + 2 * (kMaxExperts + 2) * 4 + 1024 + 16 * 8;
  static constexpr int kStages = (kSmemLimit - kFixedBytes) / kStageBytes;
  static constexpr int kEpiOffset = kStages * kStageBytes;
  static constexpr int kBarOffset = kEpiOffset + kEpiBytes;
  // Full and empty barriers a stage, then one turn barrier a consumer.
  static constexpr int kSchedOffset = kBarOffset + (2 * kStages + kConsumers) * 8;
  static constexpr int smem_bytes(int num_experts) {
    return kSchedOffset + 2 * (num_experts + 2) * 4 + 1024;  // + alignment slack
  }
};
static_assert(PingPongLayout<kEpiTma>::kStages >= 3);
static_assert(PingPongLayout<kEpiTmaSplit>::kStages >= 4);
static_assert(PingPongLayout<kEpiTmaQuarter>::kStages >= 5);
static_assert(PingPongLayout<kEpiTma>::smem_bytes(kMaxExperts) <= kSmemLimit);
static_assert(PingPongLayout<kEpiTmaSplit>::smem_bytes(kMaxExperts) <= kSmemLimit);
static_assert(PingPongLayout<kEpiTmaQuarter>::smem_bytes(kMaxExperts) <= kSmemLimit);

template <Pass P, int kEpi>
__global__ void __launch_bounds__(kThreads, 1)
    pingpong_row_kernel(const __grid_constant__ CUtensorMap map_a,
                        const __grid_constant__ CUtensorMap map_b,
                        const __grid_constant__ CUtensorMap map_out, const Params p) {
  cuda::wait_for_prior_grids();
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  static_assert(P == Pass::kForward || P == Pass::kGradInput, "the plain row passes");
  using L = PingPongLayout<kEpi>;
  constexpr int kStages = L::kStages;
  extern __shared__ uint8_t smem_raw[];
  const AlignedSmem aligned = aligned_smem(smem_raw);
  const uint32_t base = aligned.addr;
  uint8_t* smem = aligned.ptr;
  const uint32_t full_bar = base + L::kBarOffset;
  const uint32_t empty_bar = full_bar + 8 * kStages;
  const uint32_t turn_bar = empty_bar + 8 * kStages;
  int32_t* tile_begin = reinterpret_cast<int32_t*>(smem + L::kSchedOffset);
  int32_t* row_begin = tile_begin + (p.num_experts + 2);

  const int tid = static_cast<int>(threadIdx.x);
  const int num_experts = p.num_experts;
  fill_row_begin(row_begin, p, tid, kThreads);
  if (tid == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbar_init(full_bar + 8 * s, 1);
      mbar_init(empty_bar + 8 * s, 4);  // one arrival per warp of the consumer that used it
    }
    for (int c = 0; c < kConsumers; ++c) mbar_init(turn_bar + 8 * c, 1);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    prefetch_tensor_map(&map_a);
    prefetch_tensor_map(&map_b);
    prefetch_tensor_map(&map_out);
  }
  __syncthreads();
  const int total_tiles =
      scan_row_tiles<kPingRows>(tile_begin, row_begin, num_experts, p.out_cols, kBlockN, tid);
  const int grid = static_cast<int>(gridDim.x);
  const int cta = static_cast<int>(blockIdx.x);

  const int warpgroup = tid / 128;
  if (warpgroup == 0) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;");
    if (tid != 0) return;
    // Producer: both consumers' stages, in the order of the CTA's tiles.
    uint32_t it = 0;
    for (int t = cta; t < total_tiles; t += grid) {
      const Tile tile = decode_tile<P, 1, kPingRows>(t, p, tile_begin, row_begin, 0);
      const int nb = b_boxes<P>(tile, p);
      const uint32_t stage_bytes = static_cast<uint32_t>((1 + nb) * kBoxBytes);
      for (int k = 0; k < tile.k_iters; ++k, ++it) {
        const uint32_t s = it % kStages;
        mbar_wait(empty_bar + 8 * s, ((it / kStages) & 1u) ^ 1u);
        const uint32_t bar = full_bar + 8 * s;
        const uint32_t a_dst = base + s * L::kStageBytes;
        mbar_arrive_expect_tx(bar, stage_bytes);
        load_a<P>(&map_a, tile, k, 1, a_dst, bar);
        load_b<P, 1>(&map_b, tile, k, nb, a_dst + L::kStageABytes, bar, p, 0);
      }
    }
    return;
  }

  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;");
  const int consumer = warpgroup - 1;
  const int wg_tid = tid & 127;
  const int lane = tid & 31;
  constexpr bool kTransB = P == Pass::kGradInput;
  constexpr uint32_t kStepB = kTransB ? 2048 : 32;
  constexpr uint32_t kLboB = kTransB ? kBoxBytes : 16;
  const uint32_t epi = base + L::kEpiOffset + consumer * (L::kEpiBytes / kConsumers);
  // Fragment (i) of m64nNk16 sits at row 16*warp + lane/4 (+8 for odd i/2), column
  // 8*(i/4) + 2*(lane%4) + i%2.
  const int frag_row = (wg_tid / 32) * 16 + (lane >> 2);
  float acc[128];
  uint32_t packed[64];
  uint32_t it = 0;  // stages of the CTA's tiles so far, both consumers'
  uint32_t turns_waited = 0;
  int turn = 0;
  for (int t = cta; t < total_tiles; t += grid, ++turn) {
    const Tile tile = decode_tile<P, 1, kPingRows>(t, p, tile_begin, row_begin, 0);
    if ((turn & 1) != consumer) {
      it += static_cast<uint32_t>(tile.k_iters);  // the other consumer's stages
      continue;
    }
    // The other consumer has waited for every stage before this tile's (turn 0 has none before).
    if (turn > 0) {
      mbar_wait(turn_bar + 8 * consumer, turns_waited & 1u);
      ++turns_waited;
    }
    if (tile.k_iters == 0) {
#pragma unroll
      for (int i = 0; i < 128; ++i) acc[i] = 0.0f;  // unrouted rows: zeros
    }
    uint32_t prev_stage = 0;
    for (int k = 0; k < tile.k_iters; ++k, ++it) {
      const uint32_t s = it % kStages;
      mbar_wait(full_bar + 8 * s, (it / kStages) & 1u);
      const uint32_t a_base = base + s * L::kStageBytes;
      issue_steps<kBlockK / 16, false, kTransB, 32, kStepB, 16, kLboB>(
          acc, a_base, a_base + L::kStageABytes, k > 0 ? 1 : 0);
      // One stage of WGMMAs in flight; the one before it is done, so its stage is free.
      wgmma_wait<1>();
      fence_acc(acc);
      if (k > 0 && lane == 0) mbar_arrive(empty_bar + 8 * prev_stage);
      prev_stage = s;
    }
    // This tile's stages have all landed: the other consumer's turn (its WGMMAs may start while
    // ours drain).
    if (wg_tid == 0) mbar_arrive(turn_bar + 8 * (1 - consumer));
    wgmma_wait<0>();
    fence_acc(acc);
    if (tile.k_iters > 0 && lane == 0) mbar_arrive(empty_bar + 8 * prev_stage);

    Finished done{};
    done.half_row0 = tile.row0;
    done.row_limit = tile.row_end;
    done.col0 = tile.col0;
    done.expert = tile.expert;
    // TMA cannot drop rows inside a box: a tile that straddles its expert's end is stored row by
    // row.
    done.staged = tile.row0 + kPingRows <= tile.row_end;
#pragma unroll
    for (int j = 0; j < 32; ++j) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        packed[2 * j + h] = pack_bf16(acc[4 * j + 2 * h], acc[4 * j + 2 * h + 1]);
      }
    }
    store_packed<P, kEpi>(packed, done, p, &map_out, epi, consumer, wg_tid, lane, frag_row);
  }
  // Shared memory must outlive the bulk stores that read it.
  if (wg_tid == 0) bulk_wait_all();
#else
  // Built for another architecture: the host never launches this (it checks for sm_90 first).
  __trap();
#endif
}

}  // namespace turbomoe::hopper_gemm
