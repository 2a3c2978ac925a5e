// The generic CUDA grouped GEMM (shared-memory tiles, float32 accumulation; bf16 on tensor cores
// through WMMA, float32 on CUDA cores): the fallback of the dispatcher, for every GPU and layout
// with a unit-stride last dimension.
#pragma once

#include <cstdint>

#include "turbomoe/turbomoe.h"

namespace turbomoe::grouped_gemm {

// One pass of C = A . B per expert, described by the tensors of tm_grouped_gemm_*:
//   forward      A = x  [M,K]   B = w [E,N,K]   C = y  [M,N]   (rows of A and C grouped)
//   grad-input   A = dy [M,N]   B = w [E,N,K]   C = dx [M,K]   (rows of A and C grouped)
//   grad-weight  A = dy [M,N]   B = x [M,K]     C = dw [E,N,K] (the reduction runs over rows)
// Every matrix has a unit stride along its last dimension; the lds are the other strides.
struct TiledProblem {
  tm_gemm_pass pass;
  int32_t in_dtype;   // float32 or bfloat16: A and B
  int32_t out_dtype;  // float32 or in_dtype
  const void* a;
  int64_t a_ld;
  const void* b;
  int64_t b_ld;      // w: stride(1); x (grad-weight): stride(0)
  int64_t b_expert;  // w: stride(0); 0 for grad-weight
  void* c;
  int64_t c_ld;      // y, dx: stride(0); dw: stride(1)
  int64_t c_expert;  // dw: stride(0); 0 otherwise
  const int32_t* offsets;
  int32_t experts;
  int64_t rows;  // M, the rows of x / dy
  int64_t n;     // the columns of C
  int64_t k;     // forward: K; grad-input: N; grad-weight: unused (its reduction is the rows)
  int64_t m;     // grad-weight: N, the rows of each dw[e]; unused otherwise
  // Optional gathered rows of one operand (gather_a: A's, i.e. x of the forward or dy of the
  // backward passes; else B's, x of the grad-weight): that operand's row r is row
  // gather_pairs[r] / gather_top_k of the matrix given (gather_src_rows rows, ld apart; tokens
  // outside read as zeros) instead of row r.
  const int32_t* gather_pairs = nullptr;
  int32_t gather_top_k = 1;
  int64_t gather_src_rows = 0;
  bool gather_a = true;
};

// Runs the pass on `stream`, including the zeroing of rows >= offsets[E] of y / dx.
void launch_tiled(const TiledProblem& p, void* stream);

}  // namespace turbomoe::grouped_gemm
