// Internal entry points of the Hopper (sm_90a) grouped GEMM: TMA + WGMMA, persistent CTAs that
// derive their tile schedule on the device from expert_offsets (no host read of the counts).
//
// Each function either runs the whole pass on `stream` and returns true, or launches nothing and
// returns false when the call is outside what the kernel covers (device not sm_90, dtypes,
// layouts, alignment, too many experts), so that the caller can run its generic kernel instead.
// CUDA failures throw turbomoe::Error. Shapes are assumed consistent (the API layer validated
// them); only what this kernel additionally needs is checked here.
//
// Covered: x / w / dy bfloat16, outputs bfloat16 or float32 with unit last-dim stride;
// expert_offsets int32 [E+1], E <= 1024; every bf16 operand with unit last-dim stride, 16-byte
// aligned data and row strides that are multiples of 8 elements; output column count even.
// Environment: TURBOMOE_DISABLE_HOPPER_GEMM=1 makes every function return false;
// TURBOMOE_HOPPER_GEMM_EPILOGUE=tma|split|direct|deferred, TURBOMOE_HOPPER_GEMM_SKIP_HALVES=0|1,
// TURBOMOE_HOPPER_GEMM_TRIM_TAIL=0|1, TURBOMOE_HOPPER_GEMM_BALANCE_DW=0|1 and
// TURBOMOE_HOPPER_GEMM_CLUSTER_DW=0|1 pick kernel variants
// for A/B timing (hopper_gemm.cu; docs/perf-notes-gemm.md and perf-notes.md have the numbers).
#pragma once

#include "turbomoe/turbomoe.h"

namespace turbomoe {

// y [M,N] = x [M,K] . w[e]^T, w [E,N,K] with K contiguous. Rows >= offsets[E] of y are zeroed.
bool hopper_grouped_gemm_forward(const tm_tensor& x, const tm_tensor& w,
                                 const tm_tensor& expert_offsets, const tm_tensor& y, void* stream);

// dx [M,K] = dy [M,N] . w[e], w [E,N,K] with K contiguous. Rows >= offsets[E] of dx are zeroed.
bool hopper_grouped_gemm_backward_input(const tm_tensor& dy, const tm_tensor& w,
                                        const tm_tensor& expert_offsets, const tm_tensor& dx,
                                        void* stream);

// gate_up [M,2I] = x [M,K] . w[e]^T (w [E,2I,K]: the I gate rows, then the I up rows) and
// act [M,I] = the gated activation of gate_up's halves as stored (bf16), in one pass: the
// activation runs in the GEMM's epilogue. Covered: the forward's conditions, bf16 outputs,
// I a multiple of 64. Rows >= offsets[E] of both outputs are zeroed.
// Opt-in: only with TURBOMOE_HOPPER_GEMM_SWIGLU=1 (otherwise it declines and the caller runs the
// GEMM and the activation kernel, measured faster so far).
bool hopper_grouped_gemm_swiglu_forward(const tm_swiglu_params& params, const tm_tensor& x,
                                        const tm_tensor& w, const tm_tensor& expert_offsets,
                                        const tm_tensor& gate_up, const tm_tensor& act,
                                        void* stream);

// y [M,N] = src[sorted_pairs[r] / top_k] . w[e]^T for each row r of expert e: the forward with
// the token gather in the A load (no permuted copy of the activations). Tokens at or past src's
// rows give zero rows; rows >= offsets[E] of y are zeroed. Covered: the forward's conditions
// with src in place of x, K a multiple of 8, sorted_pairs int32 with at least M entries.
// TURBOMOE_HOPPER_GEMM_GATHER=0 declines it (the caller gathers, then runs the forward).
bool hopper_grouped_gemm_forward_gathered(const tm_tensor& src, const tm_tensor& sorted_pairs,
                                          int64_t top_k, const tm_tensor& w,
                                          const tm_tensor& expert_offsets, const tm_tensor& y,
                                          void* stream);

// dw [E,N,K] = dy_e^T . x_e with x_e's rows gathered: row r of x is src[sorted_pairs[r] /
// top_k] (tokens past src: zero rows). Covered: the grad-weight's conditions with src in place of
// x, K a multiple of 8, sorted_pairs int32 with at least M entries; TURBOMOE_HOPPER_GEMM_GATHER=0
// declines it.
bool hopper_grouped_gemm_backward_weight_gathered(const tm_tensor& dy, const tm_tensor& src,
                                                  const tm_tensor& sorted_pairs, int64_t top_k,
                                                  const tm_tensor& expert_offsets,
                                                  const tm_tensor& dw, void* stream);

// dx [M,K] = dy_src[sorted_pairs[r] / top_k] . w[e] for each row r of expert e: the grad-input
// with the token gather in the A load. Covered: the grad-input's conditions with dy_src in place
// of dy, N a multiple of 8; declined as the gathered forward is.
bool hopper_grouped_gemm_backward_input_gathered(const tm_tensor& dy_src,
                                                 const tm_tensor& sorted_pairs, int64_t top_k,
                                                 const tm_tensor& w,
                                                 const tm_tensor& expert_offsets,
                                                 const tm_tensor& dx, void* stream);

// dw [E,N,K] = dy_e^T . x_e with dy_e's rows gathered: row r of dy is dy_src[sorted_pairs[r] /
// top_k]. Covered: the grad-weight's conditions with dy_src in place of dy, N a multiple of 8;
// declined as the other gathered passes are.
bool hopper_grouped_gemm_backward_weight_gathered_dy(const tm_tensor& dy_src, const tm_tensor& x,
                                                     const tm_tensor& sorted_pairs, int64_t top_k,
                                                     const tm_tensor& expert_offsets,
                                                     const tm_tensor& dw, void* stream);

// dw [E,N,K] = dy_e^T . x_e for every expert (zero for experts without rows; with
// leave_empty_experts, the slices of experts without rows may be left unwritten).
bool hopper_grouped_gemm_backward_weight(const tm_tensor& dy, const tm_tensor& x,
                                         const tm_tensor& expert_offsets, const tm_tensor& dw,
                                         bool leave_empty_experts, void* stream);

}  // namespace turbomoe
