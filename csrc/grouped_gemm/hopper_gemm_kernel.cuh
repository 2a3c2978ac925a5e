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

#include "activation/swiglu_math.h"
#include "grouped_gemm/sm90_ptx.cuh"
#include "grouped_gemm/tile_schedule.h"

namespace turbomoe::hopper_gemm {

inline constexpr int kBlockM = 128;  // output rows of a CTA tile (2 consumer warpgroups x 64)
inline constexpr int kBlockN = 256;  // output columns of a CTA tile (one n256 WGMMA)
inline constexpr int kBlockK = 64;   // reduction depth of a stage: one 128-byte swizzle row
inline constexpr int kConsumers = 2;
inline constexpr int kThreads = 128 * (1 + kConsumers);
inline constexpr int kBoxBytes = 64 * 64 * 2;                  // one 64 x 64 bf16 TMA box
inline constexpr int kTileABytes = kBlockM * kBlockK * 2;      // 16 KiB
inline constexpr int kTileBBytes = kBlockN * kBlockK * 2;      // 32 KiB
inline constexpr int kStageBytes = kTileABytes + kTileBBytes;  // 48 KiB
inline constexpr int kMaxExperts = 1024;

// Epilogue modes. kEpiDirect: fragments stored straight to global memory, 4 stages.
// kEpiTma: bf16 tiles staged in shared memory (one 64 x 256 half-tile per consumer, as four
// swizzled 64 x 64 boxes) and written by TMA bulk stores that drain while the next tile
// computes; the 64 KiB buffer costs a stage: 3 stages. kEpiTmaSplit: the same through a buffer
// half as big, filled and drained in two 128-column pieces, keeping 4 stages (fits only when the
// schedule tables are small: E <= kMaxExpertsSplit).
inline constexpr int kEpiDirect = 0;
inline constexpr int kEpiTma = 1;
inline constexpr int kEpiTmaSplit = 2;
// kEpiTmaDeferred: kEpiTma whose stores of a finished tile run while the next tile's first
// WGMMAs do (the tile is held meanwhile as 64 registers of bf16 pairs).
inline constexpr int kEpiTmaDeferred = 3;
inline constexpr int kMaxExpertsSplit = 200;
// kEpiTmaQuarter: the split epilogue in four 64-column pieces (a 16 KiB buffer), which leaves
// room for 4 stages and the zero box at any expert count: for the grad-weight, whose paced zero
// tiles need the box and whose operand loads wait on a 3-stage ring.
inline constexpr int kEpiTmaQuarter = 4;

// Shared memory: the stages (1024-byte aligned, as the 128-byte swizzle requires), the epilogue
// staging buffer, one 64 x 64 box of zeros (the source of the grad-weight's zero tiles, where
// it fits), the full/empty mbarriers, then the schedule tables (2 x (E+2) ints).
template <int kEpi>
struct Layout {
  static constexpr int kStages = kEpi == kEpiTma || kEpi == kEpiTmaDeferred ? 3 : 4;
  static constexpr int kEpiPieces = kEpi == kEpiTmaSplit ? 2 : (kEpi == kEpiTmaQuarter ? 4 : 1);
  static constexpr int kEpiOffset = kStages * kStageBytes;
  static constexpr int kEpiBytes = kEpi == kEpiDirect ? 0 : kConsumers * 4 * kBoxBytes / kEpiPieces;
  // The split epilogue's 4 stages leave no room for the zero box; the quarter one's do.
  static constexpr bool kZeroBox =
      kEpi == kEpiTma || kEpi == kEpiTmaDeferred || kEpi == kEpiTmaQuarter;
  static constexpr int kZeroOffset = kEpiOffset + kEpiBytes;
  static constexpr int kZeroBytes = kZeroBox ? kBoxBytes : 0;
  static constexpr int kBarOffset = kZeroOffset + kZeroBytes;
  static constexpr int kSchedOffset = kBarOffset + 2 * kStages * 8;
  static constexpr int smem_bytes(int num_experts) {
    return kSchedOffset + 2 * (num_experts + 2) * 4 + 1024;  // + alignment slack
  }
};
inline constexpr int kSmemLimit = 227 * 1024;
static_assert(Layout<kEpiTma>::smem_bytes(kMaxExperts) <= kSmemLimit);
static_assert(Layout<kEpiTmaDeferred>::smem_bytes(kMaxExperts) <= kSmemLimit);
static_assert(Layout<kEpiDirect>::smem_bytes(kMaxExperts) <= kSmemLimit);
static_assert(Layout<kEpiTmaSplit>::smem_bytes(kMaxExpertsSplit) <= kSmemLimit);
static_assert(Layout<kEpiTmaQuarter>::smem_bytes(kMaxExperts) <= kSmemLimit);

enum class Pass : int { kForward = 0, kGradInput = 1, kGradWeight = 2, kForwardSwiglu = 3 };

// The operand whose rows the producer gathers (Params::gather_*) instead of loading by TMA:
// kGatherA, the A rows of the forward (x) and the grad-input (dy), or the grad-weight's dy (the
// reduction rows of A = dy^T); kGatherB, the grad-weight's x (the reduction rows of B).
inline constexpr int kGatherNone = 0;
inline constexpr int kGatherA = 1;
inline constexpr int kGatherB = 2;

__host__ __device__ constexpr bool is_forward(Pass p) {
  return p == Pass::kForward || p == Pass::kForwardSwiglu;
}
// Output columns of a tile: the SwiGLU forward's 256 accumulator columns are 128 gate and the
// 128 up columns of the same index, which make 128 activation columns.
template <Pass P>
__host__ __device__ constexpr int tile_cols() {
  return P == Pass::kForwardSwiglu ? kBlockN / 2 : kBlockN;
}

struct Params {
  const int32_t* offsets;  // [E+1]
  void* out;
  int64_t out_row_stride;     // elements
  int64_t out_expert_stride;  // grad-weight only
  int32_t num_experts;
  int32_t m;         // rows of x / dy
  int32_t reduce;    // reduction length: K (forward), N (grad-input); unused by grad-weight
  int32_t out_rows;  // grad-weight: N (rows of dw[e])
  int32_t out_cols;  // forward: N; grad-input: K; grad-weight: K
  // Forward / grad-input: a consumer whose 64 rows of the tile all lie past the expert's end
  // skips its WGMMAs (the other one then has the tensor cores to itself).
  int32_t skip_empty_halves;
  // Grad-weight: in an expert's last, partial reduction chunk, the 16-row WGMMA steps wholly
  // past the expert's end are skipped, and only the rows of the step that straddles the end are
  // cleared (otherwise the whole tail of the chunk is cleared and multiplied).
  int32_t trim_tail;
  // Grad-weight: tiles in descending order of work, snaking over the CTAs, and empty experts'
  // zero tiles stored from the zero box (0: expert order, dealt round-robin, all computed).
  int32_t balance_grad_weight;
  // Grad-weight with a zero box: the zero tiles spread over the pass in step with the operand
  // loads (a share of them per stage loaded) instead of all stored at its start.
  int32_t pace_zero_tiles;
  // Forward + SwiGLU: out is gate_up [M, 2I] (the gate columns, then the up columns, as w's
  // rows), out2 the activation [M, I]; out_cols = gate_rows = I.
  void* out2;
  int64_t out2_row_stride;
  int32_t gate_rows;
  int32_t swiglu_variant;
  float swiglu_alpha;
  float swiglu_limit;
  // The token gather in an operand load (kGather): row r of the gathered matrix is row
  // gather_pairs[r] / gather_top_k of gather_src ([gather_src_rows, width] bf16, rows
  // gather_src_stride elements apart); tokens at or past gather_src_rows read as zeros.
  const int32_t* gather_pairs;
  const void* gather_src;
  int64_t gather_src_stride;
  int32_t gather_src_rows;
  int32_t gather_top_k;
};

__host__ __device__ constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)

// The first `kSteps` 16-deep WGMMAs of a stage as one commit group, behind their own fence (with
// the fence and commit outside the branch that picks kSteps, ptxas injects fences on every
// path). The first scales the accumulators by first_scale (0: overwrite), the others add.
template <int kSteps, bool kTransA, bool kTransB, uint32_t kStepA, uint32_t kStepB, uint32_t kLboA,
          uint32_t kLboB>
__device__ __forceinline__ void issue_steps(float (&acc)[128], uint32_t a_base, uint32_t b_base,
                                            int first_scale) {
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < kSteps; ++kk) {
    const uint64_t da = make_desc(a_base + kk * kStepA, kLboA, 1024);
    const uint64_t db = make_desc(b_base + kk * kStepB, kLboB, 1024);
    wgmma_m64n256k16<kTransA ? 1 : 0, kTransB ? 1 : 0>(acc, da, db, kk > 0 ? 1 : first_scale);
  }
  wgmma_commit();
}

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

// The gathered operand's row `row` (< row_end: of the tile's expert): row
// gather_pairs[row] / gather_top_k of gather_src, or null (zeros) past the expert's end or for a
// token outside gather_src.
__device__ __forceinline__ const char* gathered_row(const Params& p, int row, int row_end) {
  if (row >= row_end) return nullptr;
  const int pair = p.gather_pairs[row];
  const int token = pair >= 0 ? pair / p.gather_top_k : -1;
  if (token < 0 || token >= p.gather_src_rows) return nullptr;
  return static_cast<const char*>(p.gather_src) +
         static_cast<int64_t>(token) * p.gather_src_stride * 2;
}

// Columns [col, col + 64) of a bf16 row (src; null: zeros) into row box_row of a 64 x 64 box
// with the 128-byte swizzle, as TMA would have written it: 16-byte chunk j to slot
// j ^ (box_row % 8). Columns at or past `cols` read as zeros; a zero chunk still names a valid
// address (`anywhere`) though it reads nothing.
__device__ __forceinline__ void copy_row_chunks(uint32_t box, int box_row, const char* src, int col,
                                                int cols, const void* anywhere) {
  const uint32_t row_addr = box + box_row * 128;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const int c = col + 8 * j;
    const bool copy = src != nullptr && c < cols;
    cp_async_16(row_addr + ((j ^ (box_row & 7)) << 4), copy ? src + 2 * c : anywhere,
                copy ? 16u : 0u);
  }
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

// Grad-weight tile t walks the experts in `order` (tile_begin's space; see the kernel); the
// other passes walk tile_begin's prefix sums. In a grad-weight cluster, tile t is kCluster
// vertically adjacent output tiles (the same x columns and rows, so the same B operand), and
// `rank` picks this CTA's.
template <Pass P, int kCluster>
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
    const int m_blocks = ceil_div(row_begin[e + 1] - row_begin[e], kBlockM);
    const RowTile rt = row_tile(t - tile_begin[e], m_blocks, kCluster > 1);
    tile.expert = e;
    tile.row0 = row_begin[e] + rt.m_block * kBlockM;
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

template <typename OutT>
__device__ __forceinline__ void store_pair(OutT* dst, float a, float b) {
  if constexpr (sizeof(OutT) == 4) {
    *reinterpret_cast<float2*>(dst) = make_float2(a, b);
  } else {
    *reinterpret_cast<__nv_bfloat162*>(dst) = __floats2bfloat162_rn(a, b);
  }
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

// The A operand of reduction chunk k: the row passes' 128 rows (one 2-D box), the grad-weight's
// na 64-row boxes of dy^T.
template <Pass P>
__device__ __forceinline__ void load_a(const CUtensorMap* map_a, const Tile& tile, int k, int na,
                                       uint32_t a_dst, uint32_t bar) {
  const int kk = k * kBlockK;
  if constexpr (P == Pass::kGradWeight) {
    for (int i = 0; i < na; ++i) {
      tma_load_2d(map_a, a_dst + i * kBoxBytes, bar, tile.out_row0 + 64 * i, tile.row0 + kk);
    }
  } else {
    tma_load_2d(map_a, a_dst, bar, kk, tile.row0);
  }
}

// The B operand of reduction chunk k: the forward's 256 rows of w[e] (SwiGLU: 128 gate rows,
// then the 128 up rows of the same columns), the grad-input's nb 64-wide boxes of w[e], the
// grad-weight's nb 64-wide boxes of x. In a grad-weight cluster the CTAs share B: CTA `rank`
// loads boxes rank, rank + kCluster, ... into every CTA of the cluster.
template <Pass P, int kCluster>
__device__ __forceinline__ void load_b(const CUtensorMap* map_b, const Tile& tile, int k, int nb,
                                       uint32_t b_dst, uint32_t bar, const Params& p, int rank) {
  const int kk = k * kBlockK;
  if constexpr (P == Pass::kForward) {
    tma_load_3d(map_b, b_dst, bar, kk, tile.col0, tile.expert);
  } else if constexpr (P == Pass::kForwardSwiglu) {
    // Two 128-row boxes make the same swizzled 256-row operand as one (the pattern repeats
    // every 8 rows): the gate rows, then the up rows of the same columns. Past 2I TMA fills
    // zeros; a last gate box reaching past I reads up rows whose columns are never stored.
    tma_load_3d(map_b, b_dst, bar, kk, tile.col0, tile.expert);
    tma_load_3d(map_b, b_dst + 2 * kBoxBytes, bar, kk, p.gate_rows + tile.col0, tile.expert);
  } else if constexpr (P == Pass::kGradInput) {
    for (int i = 0; i < nb; ++i) {
      tma_load_3d(map_b, b_dst + i * kBoxBytes, bar, tile.col0 + 64 * i, kk, tile.expert);
    }
  } else if constexpr (kCluster > 1) {
    constexpr uint16_t kAll = (1u << kCluster) - 1u;
    for (int i = rank; i < nb; i += kCluster) {
      tma_load_2d_multicast(map_b, b_dst + i * kBoxBytes, bar, tile.col0 + 64 * i, tile.row0 + kk,
                            kAll);
    }
  } else {
    for (int i = 0; i < nb; ++i) {
      tma_load_2d(map_b, b_dst + i * kBoxBytes, bar, tile.col0 + 64 * i, tile.row0 + kk);
    }
  }
}

// One stage of a row pass in 2-CTA clusters (A read as two 64-row boxes, the forward's B as two
// 128-row boxes, the grad-input's as nb 64-wide boxes): the operand the pair shares only half of
// its boxes from this CTA, multicast into both, the other whole.
template <Pass P>
__device__ __forceinline__ void load_pair_stage(const CUtensorMap* map_a, const CUtensorMap* map_b,
                                                const Tile& tile, int k, int nb, int share,
                                                int rank, uint32_t a_dst, uint32_t bar) {
  constexpr uint16_t kBoth = 3;
  const int kk = k * kBlockK;
  const uint32_t b_dst = a_dst + kTileABytes;
  for (int h = 0; h < 2; ++h) {
    const uint32_t dst = a_dst + h * kBoxBytes;
    if (share != kShareRows) {
      tma_load_2d(map_a, dst, bar, kk, tile.row0 + 64 * h);
    } else if (h == rank) {
      tma_load_2d_multicast(map_a, dst, bar, kk, tile.row0 + 64 * h, kBoth);
    }
  }
  if constexpr (P == Pass::kForward) {
    for (int h = 0; h < 2; ++h) {
      const uint32_t dst = b_dst + h * 2 * kBoxBytes;
      if (share != kShareColumns) {
        tma_load_3d(map_b, dst, bar, kk, tile.col0 + 128 * h, tile.expert);
      } else if (h == rank) {
        tma_load_3d_multicast(map_b, dst, bar, kk, tile.col0 + 128 * h, tile.expert, kBoth);
      }
    }
  } else {
    for (int i = 0; i < nb; ++i) {
      const uint32_t dst = b_dst + i * kBoxBytes;
      if (share != kShareColumns) {
        tma_load_3d(map_b, dst, bar, tile.col0 + 64 * i, kk, tile.expert);
      } else if ((i & 1) == rank) {
        tma_load_3d_multicast(map_b, dst, bar, tile.col0 + 64 * i, kk, tile.expert, kBoth);
      }
    }
  }
}

// A finished tile half, as its epilogue needs it.
struct Finished {
  int half_row0;  // first output row of the consumer's half
  int row_limit;  // rows at or past it are not written
  int col0;
  int expert;
  bool staged;  // through the TMA staging buffer (else row-by-row stores)
};

// Writes kChunks 8-column chunks of a consumer's half-tile (value(j, half): the bf16 pair of
// chunk j at fragment row frag_row + 8 * half) into the staging boxes, 64 columns a box: chunk j
// goes to box j / 8, and its 16 bytes of each 128-byte row to slot (j % 8) ^ (row % 8) (the
// 128-byte swizzle the output maps use, which also keeps the eight rows of one store on distinct
// banks). Then makes them visible to the bulk stores.
template <int kChunks, typename Value>
__device__ __forceinline__ void stage_chunks(uint32_t epi, int lane, int frag_row, int consumer,
                                             Value&& value) {
#pragma unroll
  for (int j = 0; j < kChunks; ++j) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int r = frag_row + 8 * half;
      const uint32_t addr =
          epi + (j >> 3) * kBoxBytes + r * 128 + (((j & 7) ^ (r & 7)) << 4) + (lane & 3) * 4;
      st_shared_u32(addr, value(j, half));
    }
  }
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
  named_barrier(2 + consumer, 128);
}

// Row-by-row stores of a consumer's half-tile: store(r, c, j, half) for the column pair c, c + 1
// of chunk j (c = col0 + 8 * j + 2 * (lane % 4)) at output row r = half_row0 + frag_row +
// 8 * half, for kChunks chunks, skipping rows at or past row_limit and columns at or past cols.
template <int kChunks, typename Store>
__device__ __forceinline__ void for_each_pair(int half_row0, int row_limit, int col0, int cols,
                                              int lane, int frag_row, Store&& store) {
  const int c0 = col0 + 2 * (lane & 3);
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = half_row0 + frag_row + 8 * half;
    if (r < row_limit) {
#pragma unroll
      for (int j = 0; j < kChunks; ++j) {
        const int c = c0 + 8 * j;
        if (c < cols) store(r, c, j, half);
      }
    }
  }
}

// Stores a consumer's finished half-tile, held as bf16 pairs (see the kernel), into a bf16
// output: whole halves through the swizzled staging buffer and TMA bulk stores, which drain
// while the consumer runs on; a half that straddles the expert's end row by row.
template <Pass P, int kEpi>
__device__ __forceinline__ void store_packed(const uint32_t (&packed)[64], const Finished& f,
                                             const Params& p, const CUtensorMap* map_out,
                                             uint32_t epi, int consumer, int wg_tid, int lane,
                                             int frag_row) {
  using L = Layout<kEpi>;
  if (f.staged) {
    constexpr int kPieces = L::kEpiPieces;
    constexpr int kBoxesPerPiece = 4 / kPieces;
#pragma unroll
    for (int piece = 0; piece < kPieces; ++piece) {
      // The previous bulk stores must have read the buffer before it is rewritten.
      if (wg_tid == 0) bulk_wait_read();
      named_barrier(2 + consumer, 128);
      // This piece's 8-column chunks jj are the half-tile's chunks first + jj.
      const int first = piece * 8 * kBoxesPerPiece;
      stage_chunks<8 * kBoxesPerPiece>(epi, lane, frag_row, consumer, [&](int jj, int half) {
        return packed[2 * (first + jj) + half];
      });
      if (wg_tid == 0) {
        for (int cb = 0; cb < kBoxesPerPiece; ++cb) {
          const int c = f.col0 + 64 * (piece * kBoxesPerPiece + cb);
          if (c >= p.out_cols) break;
          if constexpr (P == Pass::kGradWeight) {
            tma_store_3d(map_out, epi + cb * kBoxBytes, c, f.half_row0, f.expert);
          } else {
            tma_store_2d(map_out, epi + cb * kBoxBytes, c, f.half_row0);
          }
        }
        bulk_commit();
      }
    }
  } else {
    __nv_bfloat16* out = static_cast<__nv_bfloat16*>(p.out);
    if constexpr (P == Pass::kGradWeight) {
      out += static_cast<int64_t>(f.expert) * p.out_expert_stride;
    }
    for_each_pair<32>(f.half_row0, f.row_limit, f.col0, p.out_cols, lane, frag_row,
                      [&](int r, int c, int j, int half) {
                        __nv_bfloat16* row_ptr = out + static_cast<int64_t>(r) * p.out_row_stride;
                        *reinterpret_cast<uint32_t*>(row_ptr + c) = packed[2 * j + half];
                      });
  }
}

// Forward + SwiGLU: the activation of two columns from their gate and up accumulators, each
// rounded to bf16 first, so that act equals the activation kernel applied to the stored gate_up.
__device__ __forceinline__ uint32_t swiglu_pair(const Params& p, float g0, float g1, float u0,
                                                float u1) {
  auto rounded = [](float v) { return __bfloat162float(__float2bfloat16_rn(v)); };
  const int v = p.swiglu_variant;
  return pack_bf16(
      activation::swiglu_value(v, p.swiglu_alpha, p.swiglu_limit, rounded(g0), rounded(u0)),
      activation::swiglu_value(v, p.swiglu_alpha, p.swiglu_limit, rounded(g1), rounded(u1)));
}

// Forward + SwiGLU epilogue of a consumer's finished 64 x 256 half-tile: acc[i] (i < 64) holds
// gate column col0 + c(i), acc[i + 64] the up column of the same index (c(i) = 8 * (i / 4) +
// 2 * (lane % 4) + i % 2). gate_up's gate and up pieces (64 x 128 each) go through the staging
// buffer and TMA like any tile; the activation's 64 x 128 piece is stored from registers. A
// second staging round for it (the first version) had to wait, with both consumers idle, for the
// TMA engine to read the first out of shared memory: 0.441 ms a call on H100 at 32k rows against
// 0.397 for the plain forward and the activation kernel. This version: 0.428 against 0.396
// (H100, tenth session): the register stores and the math stay exposed in the cooperative
// schedule, hence still opt-in. Columns at or past I are not stored (I % 64 == 0, host-checked).
__device__ __forceinline__ void store_swiglu(const float (&acc)[128], const Finished& f,
                                             const Params& p, const CUtensorMap* map_gate_up,
                                             uint32_t epi, int consumer, int wg_tid, int lane,
                                             int frag_row) {
  const int inter = p.gate_rows;
  if (f.staged) {
    // The previous bulk stores must have read the buffer before it is rewritten.
    if (wg_tid == 0) bulk_wait_read();
    named_barrier(2 + consumer, 128);
    // Boxes 0 and 1: the gate columns; boxes 2 and 3: the up columns.
    stage_chunks<32>(epi, lane, frag_row, consumer, [&](int j, int half) {
      return pack_bf16(acc[4 * j + 2 * half], acc[4 * j + 2 * half + 1]);
    });
    if (wg_tid == 0) {
      for (int cb = 0; cb < 4; ++cb) {
        const int c = f.col0 + 64 * (cb & 1);
        if (c < inter) {
          tma_store_2d(map_gate_up, epi + cb * kBoxBytes, (cb >= 2 ? inter : 0) + c, f.half_row0);
        }
      }
      bulk_commit();
    }
  }
  __nv_bfloat16* gate_up = static_cast<__nv_bfloat16*>(p.out);
  __nv_bfloat16* act = static_cast<__nv_bfloat16*>(p.out2);
  for_each_pair<16>(
      f.half_row0, f.row_limit, f.col0, inter, lane, frag_row, [&](int r, int c, int j, int half) {
        __nv_bfloat16* gu_row = gate_up + static_cast<int64_t>(r) * p.out_row_stride;
        __nv_bfloat16* act_row = act + static_cast<int64_t>(r) * p.out2_row_stride;
        const int i = 4 * j + 2 * half;
        if (!f.staged) {
          *reinterpret_cast<uint32_t*>(gu_row + c) = pack_bf16(acc[i], acc[i + 1]);
          *reinterpret_cast<uint32_t*>(gu_row + inter + c) = pack_bf16(acc[i + 64], acc[i + 65]);
        }
        *reinterpret_cast<uint32_t*>(act_row + c) =
            swiglu_pair(p, acc[i], acc[i + 1], acc[i + 64], acc[i + 65]);
      });
}

#endif  // sm_90a device code

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
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  static_assert(
      kCluster == 1 || (kCluster == 2 && P != Pass::kForwardSwiglu &&
                        (kEpi == kEpiTma || (P != Pass::kGradWeight && kEpi == kEpiTmaSplit))),
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
  const uint32_t raw_addr = smem_addr(smem_raw);
  const uint32_t base = (raw_addr + 1023u) & ~1023u;
  uint8_t* smem = smem_raw + (base - raw_addr);
  const uint32_t full_bar = base + L::kBarOffset;
  const uint32_t empty_bar = full_bar + 8 * kStages;
  int32_t* tile_begin = reinterpret_cast<int32_t*>(smem + L::kSchedOffset);
  int32_t* row_begin = tile_begin + (p.num_experts + 2);

  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid & 31;
  const int num_experts = p.num_experts;

  // Expert row ranges, clamped to [0, M] so that malformed offsets cannot send a store out of
  // bounds; row_begin[E+1] = M closes the virtual expert of unrouted rows.
  for (int e = tid; e <= num_experts; e += kThreads) {
    row_begin[e] = min(max(p.offsets[e], 0), p.m);
  }
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
    row_begin[num_experts + 1] = p.m;
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
      zero_tiles = (num_experts - active_experts) * per_expert;
    } else {
      total_tiles = num_experts * per_expert / kCluster;
    }
  } else {
    // tile_begin[e] = tiles of experts before e (m-blocks x n-blocks each): a warp-wide scan.
    if (tid < 32) {
      const int n_blocks = ceil_div(p.out_cols, tile_cols<P>());
      int carry = 0;
      for (int first = 0; first <= num_experts; first += 32) {
        const int e = first + lane;
        int v = 0;
        if (e <= num_experts) {
          const int rows = row_begin[e + 1] - row_begin[e];
          v = rows > 0 ? ceil_div(rows, kBlockM) * n_blocks : 0;
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
    total_tiles = tile_begin[num_experts + 1];
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
