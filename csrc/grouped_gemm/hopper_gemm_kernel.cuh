// Device side of the Hopper grouped GEMM (see hopper_gemm.h for the contract).
//
// One persistent CTA per SM, three warpgroups: warpgroup 0 is the producer (one thread issues
// TMA copies into a ring of shared-memory stages guarded by mbarriers), warpgroups 1 and 2 are
// consumers that each own 64 rows of the 128 x 256 output tile and run m64n256k16 WGMMAs out of
// the stages. Every CTA walks the same tile list, derived in shared memory from expert_offsets,
// taking tiles blockIdx.x, blockIdx.x + gridDim.x, ...
//
// Operands in shared memory are 64-element (128-byte) wide TMA boxes with the 128-byte swizzle,
// the canonical layout WGMMA reads. Per pass (A = the m64 operand, B = the n256 operand):
//   forward    D = x . w^T   A = x rows      K-major,  B = w[e] rows   K-major
//   grad-input D = dy . w    A = dy rows     K-major,  B = w[e]        N(output)-major
//   grad-weight D = dy^T . x A = dy^T        MN-major, B = x           MN-major
//   forward + SwiGLU          A = x rows      K-major,  B = 128 gate rows and the 128 up rows of
//                                                       the same columns of w[e], K-major; the
//                                                       epilogue stores gate/up and act(gate, up)
// The reduction of the grad-weight pass runs over an expert's rows; its last 64-row chunk may
// reach into the next expert, whose rows are cleared in shared memory before the WGMMA.
#pragma once

#include <cuda.h>  // CUtensorMap (the type only: the library never links libcuda)
#include <cuda_bf16.h>

#include <climits>
#include <cstdint>

#include "common/launch.cuh"
#include "grouped_gemm/hopper_gemm_epilogue.cuh"
#include "grouped_gemm/hopper_gemm_layout.cuh"
#include "grouped_gemm/hopper_gemm_loads.cuh"
#include "grouped_gemm/hopper_gemm_tiles.cuh"
#include "grouped_gemm/sm90_ptx.cuh"
#include "grouped_gemm/tile_schedule.h"

namespace turbomoe::hopper_gemm {

// TMA epilogues (bf16 outputs only): a consumer writes its accumulators into a swizzled staging
// buffer and one thread hands it to TMA bulk stores, which drain while the consumer already runs
// the next tile's WGMMAs. Otherwise, and for the 64-row halves that straddle an expert's end
// (TMA cannot drop rows inside a box), fragments are stored straight to global memory.
//
// kCluster = 2, grad-weight (launched with 2-CTA clusters): the two CTAs of a cluster
// compute vertically adjacent tiles, which read the same x columns (B), and each loads half of
// B into both CTAs' stages (TMA multicast): a third less operand traffic from L2, which bounds
// this pass (docs/perf-notes.md). A stage is refilled only when the consumers of both CTAs have
// released it, so each empty barrier counts the consumer warps of the whole cluster.
// kCluster = 2 for the forward and the grad-input (kRowPairs): a cluster takes two consecutive
// tiles of the row order (decode_pair), which mostly read the same weight columns, and each CTA
// loads half of them into both, as cuBLAS's 1x2 clusters do: per CTA and stage 32 KiB from L2
// instead of 48, for passes that L2 bandwidth bounds (docs/perf-notes.md).
//
// kGather (kGatherA / kGatherB): one operand's rows are gathered from the token rows
// (Params::gather_*) instead of read from a permuted copy: the producer warpgroup's 128 threads
// copy the stage's rows of it with cp.async, 16 bytes at a time into the slots of the 128-byte
// swizzle that TMA would have used, and each arrives on the stage's full barrier when its copies
// land; thread 0 still loads the other operand by TMA. The consumers make those generic-proxy
// writes visible to WGMMA (async proxy) with a proxy fence after their wait.
template <Pass P, typename OutT, int kEpi, int kCluster, int kGather>
__global__ void __launch_bounds__(kThreads, 1)
    grouped_gemm_kernel(const __grid_constant__ CUtensorMap map_a,
                        const __grid_constant__ CUtensorMap map_b,
                        const __grid_constant__ CUtensorMap map_out, const Params p) {
  cuda::wait_for_prior_grids();
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  static_assert(
      kCluster == 1 || (kCluster == 2 && P != Pass::kForwardSwiglu &&
                        (kEpi == kEpiTma || (P != Pass::kGradWeight && kEpi == kEpiTmaSplit) ||
                         (P == Pass::kGradWeight && kEpi == kEpiTmaQuarter))),
      "2-CTA clusters: the grad-weight and the plain row passes, TMA epilogues");
  // Row passes in clusters: the unit of the schedule is a pair of tiles (decode_pair).
  constexpr bool kRowPairs = kCluster > 1 && P != Pass::kGradWeight;
  static_assert(
      kGather == kGatherNone ||
          (kCluster == 1 && (kGather == kGatherA ? P == Pass::kForward || P == Pass::kGradInput ||
                                                       P == Pass::kGradWeight
                                                 : P == Pass::kGradWeight)),
      "gathered A rows serve the plain passes, gathered B rows the grad-weight");
  using L = Layout<kEpi>;
  constexpr int kStages = L::kStages;
  constexpr bool kTmaEpilogue = kEpi != kEpiDirect;
  static_assert(!kTmaEpilogue || sizeof(OutT) == 2, "the TMA epilogue stages bf16 tiles");
  static_assert(
      P != Pass::kForwardSwiglu || (sizeof(OutT) == 2 && (kEpi == kEpiTma || kEpi == kEpiDirect)),
      "the SwiGLU forward stores bf16 through the whole-box or the direct epilogue");
  extern __shared__ uint8_t smem_raw[];
  const AlignedSmem aligned = aligned_smem(smem_raw);
  const uint32_t base = aligned.addr;
  uint8_t* smem = aligned.ptr;
  const uint32_t full_bar = base + L::kBarOffset;
  const uint32_t empty_bar = full_bar + 8 * kStages;
  int32_t* tile_begin = reinterpret_cast<int32_t*>(smem + L::kSchedOffset);
  int32_t* row_begin = tile_begin + (p.num_experts + 2);

  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid & 31;
  const int num_experts = p.num_experts;

  fill_row_begin(row_begin, p, tid, kThreads);
  __shared__ int active_experts;  // grad-weight: experts with rows
  // Grad-weight, paced zero tiles: the producer's count of stages loaded, which thread 32 reads.
  __shared__ volatile int stages_loaded;
  const uint32_t zero_box = base + L::kZeroOffset;
  if constexpr (L::kZeroBox) {
    for (int i = tid; i < kBoxBytes / 16; i += kThreads) {
      *reinterpret_cast<uint4*>(smem + L::kZeroOffset + 16 * i) = make_uint4(0, 0, 0, 0);
    }
    // The zeros are read by TMA (the async proxy).
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
  }
  if (tid == 0) {
    active_experts = 0;
    stages_loaded = 0;
    for (int s = 0; s < kStages; ++s) {
      // Gathered A: thread 0's expect-tx arrival, then one cp.async arrival a producer thread.
      mbar_init(full_bar + 8 * s, kGather != kGatherNone ? 1 + 128 : 1);
      // One arrival per consumer warp of the cluster.
      mbar_init(empty_bar + 8 * s, kConsumers * 4 * kCluster);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    prefetch_tensor_map(&map_a);
    prefetch_tensor_map(&map_b);
    if constexpr (kTmaEpilogue) prefetch_tensor_map(&map_out);
  }
  __syncthreads();
  // The peer CTA's barriers must be initialised before any multicast or remote arrival.
  const int rank = kCluster > 1 ? static_cast<int>(cluster_rank()) : 0;
  if constexpr (kCluster > 1) cluster_sync();

  int total_tiles;
  int zero_tiles = 0;  // grad-weight with a zero box: tiles of experts without rows
  if constexpr (P == Pass::kGradWeight) {
    // order (in tile_begin's space, unused otherwise by this pass) lists the experts in
    // descending order of rows (tile_schedule.h), the empty ones last. With a zero box the empty
    // experts' zero tiles are not computed at all: one thread per CTA stores them from the zero
    // box while the consumers compute.
    int32_t* order = tile_begin;
    const bool balance = p.balance_grad_weight != 0;
    for (int e = tid; e < num_experts; e += kThreads) {
      order[balance ? rank_by_rows(row_begin, num_experts, e) : e] = e;
      if (row_begin[e + 1] > row_begin[e]) atomicAdd(&active_experts, 1);
    }
    __syncthreads();
    const int per_expert = ceil_div(p.out_rows, kBlockM) * ceil_div(p.out_cols, kBlockN);
    // The computed tiles are counted in cluster units (kCluster output tiles each; the host
    // launches clusters only where out_rows is a multiple of kCluster * kBlockM).
    if (L::kZeroBox && balance) {
      total_tiles = active_experts * per_expert / kCluster;
      zero_tiles = p.leave_empty_experts != 0 ? 0 : (num_experts - active_experts) * per_expert;
    } else {
      total_tiles = num_experts * per_expert / kCluster;
    }
  } else {
    total_tiles = scan_row_tiles<kBlockM>(tile_begin, row_begin, num_experts, p.out_cols,
                                          tile_cols<P>(), tid);
  }
  // What the CTAs (clusters) walk: tiles, or pairs of tiles (kRowPairs).
  const int total_units = kRowPairs ? (total_tiles + 1) / 2 : total_tiles;

  const int warpgroup = tid / 128;
  if (warpgroup == 0) {
    // Producer: one thread streams both operands of every stage.
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;");
    // The zero tiles of experts without rows (grad-weight with a zero box; thread 32): TMA
    // stores of the zero box, at most a few tiles in flight so that they share the memory
    // system with the operand loads. This CTA's are zero_tile, + gridDim.x, ...
    int zero_tile = static_cast<int>(blockIdx.x);
    const bool paced = L::kZeroBox && P == Pass::kGradWeight && kGather == kGatherNone &&
                       p.pace_zero_tiles != 0 && zero_tiles > 0;
    auto store_zero_tile = [&]() {
      if constexpr (L::kZeroBox) {
        const int k_blocks = ceil_div(p.out_cols, kBlockN);
        const int per_expert = ceil_div(p.out_rows, kBlockM) * k_blocks;
        const GradWeightTile g =
            grad_weight_tile(zero_tile, tile_begin + active_experts, k_blocks, per_expert);
        const int row0 = g.out_block * kBlockM;
        const int col0 = g.col_block * kBlockN;
        for (int r = row0; r < min(row0 + kBlockM, p.out_rows); r += 64) {
          for (int c = col0; c < min(col0 + kBlockN, p.out_cols); c += 64) {
            tma_store_3d(&map_out, zero_box, c, r, g.expert);
          }
        }
        bulk_commit();
        bulk_wait_pending<4>();
      }
      zero_tile += static_cast<int>(gridDim.x);
    };
    if constexpr (kGather != kGatherNone) {
      // Row passes: thread tid copies row tid of the A stage (two 64-row boxes, one a thread).
      // Grad-weight: row tid % 64 of the stage's reduction chunk into the gathered operand's
      // boxes, 64 columns each: A (dy^T) box tid / 64, or B (x) boxes 2 (tid / 64) and the next.
      // Rows past the expert's end read as zeros (the row passes' feed only dropped outputs; the
      // grad-weight's must add nothing, and its consumers clear them as well).
      constexpr bool kRowPass = P != Pass::kGradWeight;
      constexpr bool kIntoA = kGather == kGatherA;
      constexpr int kBoxesPerThread = kRowPass || kIntoA ? 1 : 2;
      const int box_row = tid & 63;
      const int first_box = kBoxesPerThread * (tid >> 6);
      // Multiples of 8 (host-checked): the gathered matrix's width.
      const int cols = kRowPass ? p.reduce : (kIntoA ? p.out_rows : p.out_cols);
      uint32_t it = 0;
      for (int i = 0;; ++i) {
        const int t = cta_tile<P, kCluster>(i, p);
        if (t >= total_units) break;
        const Tile tile = decode_tile<P, kCluster>(t, p, tile_begin, row_begin, rank);
        // Row passes: this thread's row is the same in every stage of the tile, so its pair is
        // read once here rather than before each stage's copies (a dependent global load).
        const char* tile_src = kRowPass ? gathered_row(p, tile.row0 + tid, tile.row_end) : nullptr;
        for (int k = 0; k < tile.k_iters; ++k, ++it) {
          const uint32_t s = it % kStages;
          const uint32_t phase = (it / kStages) & 1u;
          mbar_wait(empty_bar + 8 * s, phase ^ 1u);
          const uint32_t bar = full_bar + 8 * s;
          const uint32_t a_dst = base + s * kStageBytes;
          const uint32_t b_dst = a_dst + kTileABytes;
          if (tid == 0) {
            // The other operand still comes by TMA.
            const int boxes = kIntoA ? b_boxes<P>(tile, p) : a_boxes<P>(tile, p);
            mbar_arrive_expect_tx(bar, static_cast<uint32_t>(boxes * kBoxBytes));
            if constexpr (kIntoA) {
              load_b<P, kCluster>(&map_b, tile, k, boxes, b_dst, bar, p, rank);
            } else {
              load_a<P>(&map_a, tile, k, boxes, a_dst, bar);
            }
          }
          if constexpr (kRowPass) {
            copy_row_chunks(a_dst + first_box * kBoxBytes, box_row, tile_src, k * kBlockK, cols,
                            p.gather_src);
          } else {
            const char* src = gathered_row(p, tile.row0 + k * kBlockK + box_row, tile.row_end);
            const uint32_t dst = kIntoA ? a_dst : b_dst;
            const int col0 = kIntoA ? tile.out_row0 : tile.col0;
#pragma unroll 1
            for (int b = first_box; b < first_box + kBoxesPerThread; ++b) {
              copy_row_chunks(dst + b * kBoxBytes, box_row, src, col0 + 64 * b, cols, p.gather_src);
            }
          }
          cp_async_arrive(bar);
          // Thread 32 also copies rows here: it stores the zero tiles one a stage in between.
          if constexpr (P == Pass::kGradWeight) {
            if (tid == 32 && zero_tile < zero_tiles) store_zero_tile();
          }
        }
      }
      if (tid == 32) {
        while (zero_tile < zero_tiles) store_zero_tile();
        if (zero_tiles > 0) bulk_wait_all();
      }
    } else if (tid == 0) {
      uint32_t it = 0;
      for (int i = 0;; ++i) {
        const int t = cta_tile<P, kCluster>(i, p);
        if (t >= total_units) break;
        if constexpr (kRowPairs) {
          const PairWork w = decode_pair<P>(t, total_tiles, p, tile_begin, row_begin, rank);
          const int nb = b_boxes<P>(w.own, p);
          const uint32_t stage_bytes = static_cast<uint32_t>((2 + nb) * kBoxBytes);
          for (int k = 0; k < w.stages; ++k, ++it) {
            const uint32_t s = it % kStages;
            mbar_wait(empty_bar + 8 * s, ((it / kStages) & 1u) ^ 1u);
            const uint32_t bar = full_bar + 8 * s;
            if (w.own.k_iters == 0) {
              mbar_arrive(bar);  // nothing to load: the stage only passes through
            } else {
              mbar_arrive_expect_tx(bar, stage_bytes);
              load_pair_stage<P>(&map_a, &map_b, w.own, k, nb, w.share, rank,
                                 base + s * kStageBytes, bar);
            }
          }
          continue;
        }
        const Tile tile = decode_tile<P, kCluster>(t, p, tile_begin, row_begin, rank);
        const int na = a_boxes<P>(tile, p);
        const int nb = b_boxes<P>(tile, p);
        const uint32_t stage_bytes = static_cast<uint32_t>((na + nb) * kBoxBytes);
        for (int k = 0; k < tile.k_iters; ++k, ++it) {
          const uint32_t s = it % kStages;
          const uint32_t phase = (it / kStages) & 1u;
          mbar_wait(empty_bar + 8 * s, phase ^ 1u);
          const uint32_t bar = full_bar + 8 * s;
          const uint32_t a_dst = base + s * kStageBytes;
          mbar_arrive_expect_tx(bar, stage_bytes);
          load_a<P>(&map_a, tile, k, na, a_dst, bar);
          load_b<P, kCluster>(&map_b, tile, k, nb, a_dst + kTileABytes, bar, p, rank);
          if (paced) stages_loaded = static_cast<int>(it) + 1;
        }
      }
      if (paced) stages_loaded = INT_MAX;  // the rest of the zero tiles at once
    } else if (tid == 32) {
      if (paced) {
        // This CTA's stages (the producer's walk) and zero tiles: zero tile j waits until
        // j / zeros of the stages are loaded. A pacing heuristic only: the loads never wait on it.
        int stages = 0;
        for (int i = 0;; ++i) {
          const int t = cta_tile<P, kCluster>(i, p);
          if (t >= total_units) break;
          stages += decode_tile<P, kCluster>(t, p, tile_begin, row_begin, rank).k_iters;
        }
        const int grid = static_cast<int>(gridDim.x);
        const int zeros = zero_tiles > zero_tile ? (zero_tiles - zero_tile + grid - 1) / grid : 0;
        for (int j = 0; j < zeros; ++j) {
          const int64_t due = static_cast<int64_t>(j) * stages;
          while (static_cast<int64_t>(stages_loaded) * zeros < due) __nanosleep(200);
          store_zero_tile();
        }
      }
      while (zero_tile < zero_tiles) store_zero_tile();
      if (zero_tiles > 0) bulk_wait_all();
    }
  } else {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 232;");
    const int consumer = warpgroup - 1;  // which 64-row half of the tile
    const int ctid = tid - 128;          // 0..255 over both consumers
    const int wg_tid = tid & 127;
    const int warp_in_wg = wg_tid / 32;
    constexpr bool kTransA = P == Pass::kGradWeight;
    constexpr bool kTransB = !is_forward(P);
    // Byte step of the descriptors per 16-deep WGMMA: along the 128-byte row when K-major,
    // two 8-row swizzle groups when MN-major.
    constexpr uint32_t kStepA = kTransA ? 2048 : 32;
    constexpr uint32_t kStepB = kTransB ? 2048 : 32;
    constexpr uint32_t kLboA = kTransA ? kBoxBytes : 16;
    constexpr uint32_t kLboB = kTransB ? kBoxBytes : 16;
    const uint32_t epi = base + L::kEpiOffset + consumer * (L::kEpiBytes / kConsumers);

    // Fragment (i) of m64nNk16 sits at row 16*warp + lane/4 (+8 for odd i/2), column
    // 8*(i/4) + 2*(lane%4) + i%2.
    const int frag_row = warp_in_wg * 16 + (lane >> 2);
    constexpr bool kDefer = kEpi == kEpiTmaDeferred;
    float acc[128];
    // A finished tile in bf16 pairs (pair 2j + h: fragments 4j + 2h and 4j + 2h + 1), waiting
    // to be stored while the next tile's first WGMMAs run (kEpiTmaDeferred).
    uint32_t packed[64];
    // Frees stage s for the producer of every CTA that fills it (one lane per warp).
    auto release = [&](uint32_t s) {
      if constexpr (kCluster > 1) {
#pragma unroll
        for (int r = 0; r < kCluster; ++r) mbar_arrive_in(empty_bar + 8 * s, r);
      } else {
        mbar_arrive(empty_bar + 8 * s);
      }
    };
    Finished pending{};
    bool has_pending = false;
    auto flush = [&]() {
      if constexpr (kTmaEpilogue) {
        store_packed<P, kEpi>(packed, pending, p, &map_out, epi, consumer, wg_tid, lane, frag_row);
      }
      has_pending = false;
    };
    uint32_t it = 0;
    for (int i = 0;; ++i) {
      const int unit = cta_tile<P, kCluster>(i, p);
      if (unit >= total_units) break;
      Tile tile;
      int stages;  // stages to wait for and release (a pair's: both CTAs walk the same ones)
      bool exists = true;
      if constexpr (kRowPairs) {
        const PairWork w = decode_pair<P>(unit, total_tiles, p, tile_begin, row_begin, rank);
        tile = w.own;
        stages = w.stages;
        exists = w.own_exists;
      } else {
        tile = decode_tile<P, kCluster>(unit, p, tile_begin, row_begin, rank);
        stages = tile.k_iters;
      }
      // First output row of this consumer's half and the rows it may write.
      int half_row0;
      int row_limit;
      if constexpr (P == Pass::kGradWeight) {
        half_row0 = tile.out_row0 + consumer * 64;
        row_limit = p.out_rows;
      } else {
        half_row0 = tile.row0 + consumer * 64;
        row_limit = tile.row_end;
      }
      const bool idle =
          !exists || (P != Pass::kGradWeight && p.skip_empty_halves != 0 && half_row0 >= row_limit);
      // Without a WGMMA of this tile to hide behind, the previous tile is stored now.
      if (kDefer && has_pending && (idle || tile.k_iters == 0)) flush();
      // Nothing of ours to compute in these stages, but every one still needs our release.
      const int passed = idle || tile.k_iters == 0 ? stages : 0;
      for (int k = 0; k < passed; ++k, ++it) {
        const uint32_t s = it % kStages;
        mbar_wait(full_bar + 8 * s, (it / kStages) & 1u);
        if (lane == 0) release(s);
      }
      if (idle) continue;
      if (tile.k_iters == 0) {
#pragma unroll
        for (int i = 0; i < 128; ++i) acc[i] = 0.0f;
      }
      uint32_t prev_stage = 0;
      for (int k = 0; k < tile.k_iters; ++k, ++it) {
        const uint32_t s = it % kStages;
        const uint32_t phase = (it / kStages) & 1u;
        mbar_wait(full_bar + 8 * s, phase);
        // The gathered rows were written through the generic proxy; WGMMA reads the async one.
        if constexpr (kGather != kGatherNone) {
          asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
        }
        const uint32_t a_base = base + s * kStageBytes + consumer * kBoxBytes;
        const uint32_t b_base = base + s * kStageBytes + kTileABytes;
        int steps = kBlockK / 16;  // 16-deep WGMMAs of this chunk
        if constexpr (P == Pass::kGradWeight) {
          // The last chunk of an expert may hold rows of the next one (or rows past M). Rows
          // that its WGMMAs read must add nothing: they are cleared in both operands (0 *
          // garbage could still be NaN). Both consumers take the same branch (same tile).
          const int valid = tile.row_end - (tile.row0 + k * kBlockK);
          if (valid < kBlockK) {
            if (p.trim_tail != 0) steps = ceil_div(valid, 16);
            const int clear_rows = 16 * steps - valid;
            if (clear_rows > 0) {
              const int chunks = 6 * clear_rows * 8;  // 6 boxes x rows x 16-byte chunks
              uint8_t* stage = smem + s * kStageBytes;
              for (int i = ctid; i < chunks; i += 256) {
                const int box = i / (clear_rows * 8);
                const int rem = i - box * clear_rows * 8;
                const int row = valid + (rem >> 3);
                *reinterpret_cast<uint4*>(stage + box * kBoxBytes + row * 128 + (rem & 7) * 16) =
                    make_uint4(0, 0, 0, 0);
              }
              // Generic-proxy stores must be visible to the WGMMA (async proxy) of both
              // consumers.
              asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
              named_barrier(1, 256);
            }
          }
        }
        // One straight-line sequence per step count: WGMMAs issued under a per-step condition
        // make the compiler fence the accumulators between them.
        const int first_scale = k > 0 ? 1 : 0;
        if (steps == 4) {
          issue_steps<4, kTransA, kTransB, kStepA, kStepB, kLboA, kLboB>(acc, a_base, b_base,
                                                                         first_scale);
        } else if (steps == 3) {
          issue_steps<3, kTransA, kTransB, kStepA, kStepB, kLboA, kLboB>(acc, a_base, b_base,
                                                                         first_scale);
        } else if (steps == 2) {
          issue_steps<2, kTransA, kTransB, kStepA, kStepB, kLboA, kLboB>(acc, a_base, b_base,
                                                                         first_scale);
        } else {
          issue_steps<1, kTransA, kTransB, kStepA, kStepB, kLboA, kLboB>(acc, a_base, b_base,
                                                                         first_scale);
        }
        // The previous tile's stores overlap this tile's first WGMMAs.
        if (kDefer && has_pending) flush();
        // Keep one stage of WGMMAs in flight; the one before it is done, so its stage is free.
        wgmma_wait<1>();
        fence_acc(acc);
        if (k > 0 && lane == 0) release(prev_stage);
        prev_stage = s;
      }
      wgmma_wait<0>();
      fence_acc(acc);
      if (tile.k_iters > 0 && lane == 0) release(prev_stage);

      if constexpr (P == Pass::kForwardSwiglu) {
        Finished done{};
        done.half_row0 = half_row0;
        done.row_limit = row_limit;
        done.col0 = tile.col0;
        done.expert = tile.expert;
        done.staged = kTmaEpilogue && half_row0 + 64 <= row_limit;
        store_swiglu(acc, done, p, &map_out, epi, consumer, wg_tid, lane, frag_row);
        continue;
      }
      // Whole halves go through TMA (it clips at the tensor's edges); a half that straddles the
      // expert's end is stored row by row.
      Finished done{};
      done.half_row0 = half_row0;
      done.row_limit = row_limit;
      done.col0 = tile.col0;
      done.expert = tile.expert;
      done.staged = kTmaEpilogue && (half_row0 + 64 <= row_limit || P == Pass::kGradWeight);
      if constexpr (kTmaEpilogue) {
#pragma unroll
        for (int j = 0; j < 32; ++j) {
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            packed[2 * j + h] = pack_bf16(acc[4 * j + 2 * h], acc[4 * j + 2 * h + 1]);
          }
        }
        pending = done;
        has_pending = true;
        if constexpr (!kDefer) flush();
      } else {
        OutT* out = static_cast<OutT*>(p.out);
        if constexpr (P == Pass::kGradWeight) {
          out += static_cast<int64_t>(tile.expert) * p.out_expert_stride;
        }
        for_each_pair<32>(half_row0, row_limit, tile.col0, p.out_cols, lane, frag_row,
                          [&](int r, int c, int j, int half) {
                            OutT* row_ptr = out + static_cast<int64_t>(r) * p.out_row_stride;
                            store_pair(row_ptr + c, acc[4 * j + 2 * half],
                                       acc[4 * j + 2 * half + 1]);
                          });
      }
    }
    if (kDefer && has_pending) flush();
    if constexpr (kTmaEpilogue) {
      // Shared memory must outlive the bulk stores that read it.
      if (wg_tid == 0) bulk_wait_all();
    }
  }
  // A CTA's shared memory must outlive the peer's multicasts into it and arrivals on it.
  if constexpr (kCluster > 1) cluster_sync();
#else
  // Built for another architecture: the host never launches this (it checks for sm_90 first).
  __trap();
#endif
}

}  // namespace turbomoe::hopper_gemm
