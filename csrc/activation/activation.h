// Gated activations (SwiGLU and GPT-OSS's clamped variant): internal entry points of the CPU
// reference and the CUDA kernels, called after tm_swiglu_* has validated its arguments.
#pragma once

#include "common/tensor.h"

namespace turbomoe::activation {

// The params of tm_swiglu_* (and of the fused GEMM + SwiGLU): a known variant, and for the
// clamped one a positive limit and a finite alpha; else TM_ERR_INVALID_ARGUMENT.
const tm_swiglu_params& check_swiglu_params(const tm_swiglu_params* params);

void swiglu_forward_cpu(const tm_swiglu_params& p, const Arg& gate, const Arg& up, const Arg& out);
void swiglu_backward_cpu(const tm_swiglu_params& p, const Arg& grad_out, const Arg& gate,
                         const Arg& up, const Arg& grad_gate, const Arg& grad_up);

// tm_swiglu_weighted_backward; weighted_act may be absent.
void swiglu_weighted_backward_cpu(const tm_swiglu_params& p, const Arg& grad_rows, const Arg& gate,
                                  const Arg& up, const Arg& row_weights, const Arg& grad_gate,
                                  const Arg& grad_up, const Arg* weighted_act,
                                  const Arg& grad_weights);

void swiglu_forward_cuda(const tm_swiglu_params& p, const Arg& gate, const Arg& up, const Arg& out,
                         void* stream);
void swiglu_backward_cuda(const tm_swiglu_params& p, const Arg& grad_out, const Arg& gate,
                          const Arg& up, const Arg& grad_gate, const Arg& grad_up, void* stream);

void swiglu_weighted_backward_cuda(const tm_swiglu_params& p, const Arg& grad_rows, const Arg& gate,
                                   const Arg& up, const Arg& row_weights, const Arg& grad_gate,
                                   const Arg& grad_up, const Arg* weighted_act,
                                   const Arg& grad_weights, void* stream);

}  // namespace turbomoe::activation
