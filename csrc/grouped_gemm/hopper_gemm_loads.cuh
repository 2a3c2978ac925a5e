// The Hopper grouped GEMM's operand loads into a stage: TMA boxes of A and B (multicast into
// both CTAs of a cluster where they share an operand), or a gathered operand's rows copied by
// the producer warpgroup with cp.async into the swizzled slots TMA would have filled.
#pragma once

#include <cuda.h>  // CUtensorMap (the type only: the library never links libcuda)

#include <cstdint>

#include "grouped_gemm/hopper_gemm_tiles.cuh"
#include "grouped_gemm/sm90_ptx.cuh"

namespace turbomoe::hopper_gemm {

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)

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

#endif  // sm_90a device code

}  // namespace turbomoe::hopper_gemm
