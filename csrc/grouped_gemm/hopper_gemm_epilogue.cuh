// The Hopper grouped GEMM's epilogues: a consumer's finished half-tile stored straight from its
// registers, or staged in swizzled shared-memory boxes and written by TMA bulk stores (whole,
// split or in quarters), and the SwiGLU forward's gate/up + activation stores.
#pragma once

#include <cuda.h>  // CUtensorMap (the type only: the library never links libcuda)
#include <cuda_bf16.h>

#include <cstdint>

#include "activation/swiglu_math.h"
#include "grouped_gemm/hopper_gemm_layout.cuh"
#include "grouped_gemm/sm90_ptx.cuh"

namespace turbomoe::hopper_gemm {

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)

template <typename OutT>
__device__ __forceinline__ void store_pair(OutT* dst, float a, float b) {
  if constexpr (sizeof(OutT) == 4) {
    *reinterpret_cast<float2*>(dst) = make_float2(a, b);
  } else {
    *reinterpret_cast<__nv_bfloat162*>(dst) = __floats2bfloat162_rn(a, b);
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

}  // namespace turbomoe::hopper_gemm
