// Rotary position embedding: internal entry points of the CPU reference and the CUDA kernels,
// called after tm_rope_* has validated its arguments. One function serves both directions: the
// backward is the transpose of the forward's rotation (see rope_math.h).
#pragma once

#include "common/tensor.h"

namespace turbomoe::rope {

// in, out [B,NH,S,D]; cos, sin [B or 1,S,R].
void apply_cpu(bool interleaved, bool backward, const Arg& in, const Arg& cos, const Arg& sin,
               const Arg& out);
void apply_cuda(bool interleaved, bool backward, const Arg& in, const Arg& cos, const Arg& sin,
                const Arg& out, void* stream);

}  // namespace turbomoe::rope
