// The Hopper grouped GEMM's tile schedule on the device: which tile (or pair of tiles, in 2-CTA
// clusters) a CTA takes next, what it covers, and how many operand boxes its stages load. The
// orders themselves are plain functions in tile_schedule.h, shared with the CPU tests.
#pragma once

#include "grouped_gemm/hopper_gemm_layout.cuh"
#include "grouped_gemm/sm90_ptx.cuh"
#include "grouped_gemm/tile_schedule.h"

namespace turbomoe::hopper_gemm {

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)

// The i-th tile of this CTA: grad-weight snakes (tile_schedule.h), the other passes deal
// round-robin. In clusters of kCluster CTAs the unit is the cluster: its CTAs take the same
// tile index and each computes its own part of it (decode_tile).
template <Pass P, int kCluster>
__device__ __forceinline__ int cta_tile(int i, const Params& p) {
  const int cta = static_cast<int>(blockIdx.x) / kCluster;
  const int grid = static_cast<int>(gridDim.x) / kCluster;
  return P == Pass::kGradWeight && p.balance_grad_weight != 0 ? snake_tile(i, cta, grid)
                                                              : i * grid + cta;
}

// One output tile of the schedule.
struct Tile {
  int expert;
  int row0;      // forward / grad-input: first output row; grad-weight: first row of the expert
  int row_end;   // rows [row0, row_end) belong to this tile's expert
  int out_row0;  // grad-weight: first row of dw[e] (an N index)
  int col0;      // first output column
  int k_iters;   // stages to reduce over (0: the tile is written as zeros)
};

// Largest e in [0, hi] with table[e] <= t (table non-decreasing, table[0] = 0 <= t).
__device__ __forceinline__ int upper_index(const int32_t* table, int hi, int t) {
  int lo = 0;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (table[mid] <= t) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// The dynamic shared memory's first 1024-byte aligned byte (the 128-byte swizzle's alignment),
// as a pointer and as a shared-space address; the kernels' layouts leave 1024 bytes of slack.
struct AlignedSmem {
  uint8_t* ptr;
  uint32_t addr;
};
__device__ __forceinline__ AlignedSmem aligned_smem(uint8_t* raw) {
  const uint32_t raw_addr = smem_addr(raw);
  const uint32_t addr = (raw_addr + 1023u) & ~1023u;
  return AlignedSmem{raw + (addr - raw_addr), addr};
}

// row_begin[0..E+1]: expert e's rows start at row_begin[e], clamped to [0, M] so that malformed
// offsets cannot send a store out of bounds; row_begin[E+1] = M closes the virtual expert of the
// unrouted rows. Every thread of the CTA calls it; a block barrier must follow before any read.
__device__ __forceinline__ void fill_row_begin(int32_t* row_begin, const Params& p, int tid,
                                               int threads) {
  for (int e = tid; e <= p.num_experts; e += threads) {
    row_begin[e] = min(max(p.offsets[e], 0), p.m);
  }
  if (tid == 0) row_begin[p.num_experts + 1] = p.m;
}

// Row passes: tile_begin[e] = the tiles of experts before e (row blocks of kRows rows x column
// blocks of `tile_cols` columns each), for e in [0, E + 1], where entry E is the virtual expert
// of the unrouted rows [offsets[E], M); returns the total. A warp-wide scan by warp 0 (the other
// threads pass through), then a block barrier: every thread of the CTA must call it.
template <int kRows>
__device__ __forceinline__ int scan_row_tiles(int32_t* tile_begin, const int32_t* row_begin,
                                              int num_experts, int out_cols, int tile_cols,
                                              int tid) {
  if (tid < 32) {
    const int lane = tid;
    const int n_blocks = ceil_div(out_cols, tile_cols);
    int carry = 0;
    for (int first = 0; first <= num_experts; first += 32) {
      const int e = first + lane;
      int v = 0;
      if (e <= num_experts) {
        const int rows = row_begin[e + 1] - row_begin[e];
        v = rows > 0 ? ceil_div(rows, kRows) * n_blocks : 0;
      }
#pragma unroll
      for (int d = 1; d < 32; d <<= 1) {
        const int up = __shfl_up_sync(0xffffffffu, v, d);
        if (lane >= d) v += up;
      }
      if (e <= num_experts) tile_begin[e + 1] = carry + v;
      carry += __shfl_sync(0xffffffffu, v, 31);
    }
    if (lane == 0) tile_begin[0] = 0;
  }
  __syncthreads();
  return tile_begin[num_experts + 1];
}

// Grad-weight tile t walks the experts in `order` (tile_begin's space; see the kernel); the
// other passes walk tile_begin's prefix sums, of row blocks of kRows rows (kBlockM: the
// cooperative tile; 64: one warpgroup's tile in the ping-pong kernel). In a grad-weight cluster,
// tile t is kCluster vertically adjacent output tiles (the same x columns and rows, so the same
// B operand), and `rank` picks this CTA's.
template <Pass P, int kCluster, int kRows = kBlockM>
__device__ __forceinline__ Tile decode_tile(int t, const Params& p, const int32_t* tile_begin,
                                            const int32_t* row_begin, int rank) {
  Tile tile{};
  const int num_experts = p.num_experts;
  if constexpr (P == Pass::kGradWeight) {
    const int n_blocks = ceil_div(p.out_rows, kBlockM);
    const int k_blocks = ceil_div(p.out_cols, kBlockN);
    const GradWeightTile g =
        cluster_grad_weight_tile(t, tile_begin, n_blocks, k_blocks, kCluster, rank);
    const int e = g.expert;
    tile.expert = e;
    tile.row0 = row_begin[e];
    tile.row_end = row_begin[e + 1];
    tile.out_row0 = g.out_block * kBlockM;
    tile.col0 = g.col_block * kBlockN;
    tile.k_iters = ceil_div(tile.row_end - tile.row0, kBlockK);
  } else {
    // Entry num_experts is the virtual expert owning rows [offsets[E], M): written as zeros.
    const int e = upper_index(tile_begin, num_experts, t);
    const int m_blocks = ceil_div(row_begin[e + 1] - row_begin[e], kRows);
    const RowTile rt = row_tile(t - tile_begin[e], m_blocks, kCluster > 1);
    tile.expert = e;
    tile.row0 = row_begin[e] + rt.m_block * kRows;
    tile.row_end = row_begin[e + 1];
    tile.out_row0 = 0;
    tile.col0 = rt.n_block * tile_cols<P>();
    tile.k_iters = e < num_experts ? ceil_div(p.reduce, kBlockK) : 0;
  }
  return tile;
}

// Row passes in 2-CTA clusters: a cluster takes the tiles 2 * pair and 2 * pair + 1 (the second
// may not exist), the CTA of rank r the first + r. Where both tiles are the same expert's and read
// the same weight columns (kShareColumns: B) or the same rows (kShareRows: A), each CTA loads
// half of that operand's boxes into both CTAs (TMA multicast). Both CTAs walk the same number
// of stages (a stage is refilled only when the consumers of both have released it): the longer
// of the two reductions; a CTA whose own tile reduces over nothing (unrouted rows, written as
// zeros, or no tile at all) only passes the stages through.
inline constexpr int kShareNone = 0;
inline constexpr int kShareRows = 1;
inline constexpr int kShareColumns = 2;
struct PairWork {
  Tile own;
  bool own_exists;
  int stages;
  int share;
};
template <Pass P>
__device__ __forceinline__ PairWork decode_pair(int pair, int total_tiles, const Params& p,
                                                const int32_t* tile_begin, const int32_t* row_begin,
                                                int rank) {
  const int t0 = 2 * pair;
  const bool second = t0 + 1 < total_tiles;
  const Tile first = decode_tile<P, 2>(t0, p, tile_begin, row_begin, 0);
  Tile other = first;
  other.k_iters = 0;
  if (second) other = decode_tile<P, 2>(t0 + 1, p, tile_begin, row_begin, 0);
  PairWork w;
  w.own = rank == 0 ? first : other;
  w.own_exists = rank == 0 || second;
  w.stages = max(first.k_iters, other.k_iters);
  w.share = kShareNone;
  if (second && first.k_iters > 0 && other.k_iters > 0 && first.expert == other.expert) {
    if (first.col0 == other.col0) {
      w.share = kShareColumns;
    } else if (first.row0 == other.row0) {
      w.share = kShareRows;
    }
  }
  return w;
}

// Boxes of a stage: A is two 64-row boxes (grad-weight: 64 output rows each), B four 64-wide
// boxes (forward: one 256-row box). Boxes wholly past the output's edge are skipped: they would
// only feed outputs that the epilogue drops. (A box partly outside is loaded whole; TMA fills
// zeros and counts the whole box in the transaction bytes.)
template <Pass P>
__device__ __forceinline__ int a_boxes(const Tile& tile, const Params& p) {
  return P == Pass::kGradWeight ? min(2, ceil_div(p.out_rows - tile.out_row0, 64)) : 2;
}
template <Pass P>
__device__ __forceinline__ int b_boxes(const Tile& tile, const Params& p) {
  return is_forward(P) ? 4 : min(4, ceil_div(p.out_cols - tile.col0, 64));
}

#endif  // sm_90a device code

}  // namespace turbomoe::hopper_gemm
