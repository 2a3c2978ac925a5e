// AdamW: internal entry points of the CPU reference and the CUDA kernel, called after
// tm_adamw_step has validated its arguments.
#pragma once

#include "common/tensor.h"
#include "optim/adamw_math.h"

namespace turbomoe::optim {

// param, grad, exp_avg, exp_avg_sq: contiguous, the same number of elements; grad_scale: null or
// one float32 on the tensors' device, multiplied into every gradient element.
void adamw_cpu(const AdamwConstants& c, const Arg& param, const Arg& grad, const Arg& exp_avg,
               const Arg& exp_avg_sq, const float* grad_scale);
void adamw_cuda(const AdamwConstants& c, const Arg& param, const Arg& grad, const Arg& exp_avg,
                const Arg& exp_avg_sq, const float* grad_scale, void* stream);

}  // namespace turbomoe::optim
