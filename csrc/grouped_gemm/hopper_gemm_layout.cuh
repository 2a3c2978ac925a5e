// The Hopper grouped GEMM's shapes and parameters, shared by its kernel (hopper_gemm_kernel.cuh)
// and its host side (hopper_gemm.cu): the tile and stage sizes, the epilogue modes and their
// shared-memory layouts, the passes and the kernel's parameter block.
#pragma once

#include <cstdint>

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
  // Grad-weight with a zero box: the empty experts' slices of dw are not written at all (the
  // caller zeroes them elsewhere, tm_zero_empty_experts, e.g. under another kernel's compute).
  int32_t leave_empty_experts;
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

}  // namespace turbomoe::hopper_gemm
