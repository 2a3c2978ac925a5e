// Grouped GEMM over expert-contiguous rows: internal entry points of the CPU reference and the
// CUDA dispatcher, called after tm_grouped_gemm_* has validated their arguments.
#pragma once

#include "common/tensor.h"

namespace turbomoe::grouped_gemm {

// y [M,N] = x [M,K] . w[e]^T; rows >= offsets[E] zeroed.
void forward_cpu(const Arg& x, const Arg& w, const Arg& offsets, const Arg& y);
// y [M,N] = src[sorted_pairs[r] / top_k] . w[e]^T for row r of expert e (tokens past src: zero
// rows); rows >= offsets[E] zeroed.
void forward_gathered_cpu(const Arg& src, const Arg& sorted_pairs, int64_t top_k, const Arg& w,
                          const Arg& offsets, const Arg& y);
// dx [M,K] = dy [M,N] . w[e]; rows >= offsets[E] zeroed.
void backward_input_cpu(const Arg& dy, const Arg& w, const Arg& offsets, const Arg& dx);
// The same with dy's row r = dy_src[sorted_pairs[r] / top_k] (tokens past dy_src: zero rows).
void backward_input_gathered_cpu(const Arg& dy_src, const Arg& sorted_pairs, int64_t top_k,
                                 const Arg& w, const Arg& offsets, const Arg& dx);
// dw [E,N,K] = dy_e^T . x_e; zero for experts without rows.
void backward_weight_cpu(const Arg& dy, const Arg& x, const Arg& offsets, const Arg& dw);
// The same with x's row r = src[sorted_pairs[r] / top_k] (tokens past src: zero rows).
void backward_weight_gathered_cpu(const Arg& dy, const Arg& src, const Arg& sorted_pairs,
                                  int64_t top_k, const Arg& offsets, const Arg& dw);
// dw [E,N,K] = dy_e^T . x_e with dy's row r = dy_src[sorted_pairs[r] / top_k] instead.
void backward_weight_gathered_dy_cpu(const Arg& dy_src, const Arg& x, const Arg& sorted_pairs,
                                     int64_t top_k, const Arg& offsets, const Arg& dw);

// gate_up [M,2I] = x . w[e]^T, act [M,I] = the gated activation of gate_up's halves as stored.
void swiglu_forward_cpu(const tm_swiglu_params& p, const Arg& x, const Arg& w, const Arg& offsets,
                        const Arg& gate_up, const Arg& act);
void swiglu_forward_cuda(const tm_swiglu_params& p, const Arg& x, const Arg& w, const Arg& offsets,
                         const Arg& gate_up, const Arg& act, void* stream);

// Columns [col0, col0 + cols) of a 2-D tensor, as a descriptor of the same storage.
tm_tensor column_block(const tm_tensor& t, int64_t col0, int64_t cols);

// SMs the persistent CUDA kernels leave free (tm_set_gemm_sm_margin).
int sm_margin();

void forward_cuda(const Arg& x, const Arg& w, const Arg& offsets, const Arg& y, void* stream);
void forward_gathered_cuda(const Arg& src, const Arg& sorted_pairs, int64_t top_k, const Arg& w,
                           const Arg& offsets, const Arg& y, void* stream);
void backward_input_cuda(const Arg& dy, const Arg& w, const Arg& offsets, const Arg& dx,
                         void* stream);
void backward_input_gathered_cuda(const Arg& dy_src, const Arg& sorted_pairs, int64_t top_k,
                                  const Arg& w, const Arg& offsets, const Arg& dx, void* stream);
void backward_weight_gathered_cuda(const Arg& dy, const Arg& src, const Arg& sorted_pairs,
                                   int64_t top_k, const Arg& offsets, const Arg& dw, void* stream);
void backward_weight_gathered_dy_cuda(const Arg& dy_src, const Arg& x, const Arg& sorted_pairs,
                                      int64_t top_k, const Arg& offsets, const Arg& dw,
                                      void* stream);
// leave_empty_experts: dw's slices of experts without rows may be left unwritten (where the
// kernel can skip them) instead of zeroed.
void backward_weight_cuda(const Arg& dy, const Arg& x, const Arg& offsets, const Arg& dw,
                          bool leave_empty_experts, void* stream);

// dw[e] = 0 for every expert e without rows (offsets[e + 1] == offsets[e]); the other slices are
// not touched. dw [E, ...] with each slice contiguous.
void zero_empty_experts_cpu(const Arg& offsets, const Arg& dw);
void zero_empty_experts_cuda(const Arg& offsets, const Arg& dw, void* stream);

}  // namespace turbomoe::grouped_gemm
