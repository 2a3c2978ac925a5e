// The per-head q/k RMSNorm of Qwen3's attention fused with the RoPE that follows it: internal
// entry points of the CPU reference and the CUDA kernels, called after tm_qk_norm_rope_* has
// validated its arguments. x, y, grad_y, grad_x are [B,S,NH,D] (contiguous), handled as the rows
// [B*S*NH, D]; cos/sin [B or 1,S,D]; rstd [B*S*NH] float32.
#pragma once

#include <optional>

#include "common/tensor.h"

namespace turbomoe::rmsnorm {

// Head dims the CUDA kernels take: a team of D/16 lanes holds a whole head, each lane a vector of
// 8 dims and its rotate_half partner (the RMSNorm backward's team for D with two cached vectors).
inline bool qk_norm_rope_head_dim_ok(int64_t d) { return d == 64 || d == 128 || d == 256; }

void qk_norm_rope_forward_cpu(const Arg& x, const std::optional<Arg>& weight, float eps,
                              const Arg& cos, const Arg& sin, const Arg& y, const Arg& rstd);
void qk_norm_rope_backward_cpu(const Arg& grad_y, const Arg& x, const std::optional<Arg>& weight,
                               const Arg& rstd, const Arg& cos, const Arg& sin, const Arg& grad_x,
                               const std::optional<Arg>& grad_weight);

void qk_norm_rope_forward_cuda(const Arg& x, const std::optional<Arg>& weight, float eps,
                               const Arg& cos, const Arg& sin, const Arg& y, const Arg& rstd,
                               void* stream);
// workspace as for backward_cuda (tm_rmsnorm_backward_workspace_size of [B*S*NH, D]).
void qk_norm_rope_backward_cuda(const Arg& grad_y, const Arg& x, const std::optional<Arg>& weight,
                                const Arg& rstd, const Arg& cos, const Arg& sin, const Arg& grad_x,
                                const std::optional<Arg>& grad_weight, void* workspace,
                                void* stream);

}  // namespace turbomoe::rmsnorm
