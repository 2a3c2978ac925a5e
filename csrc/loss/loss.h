// Cross-entropy and fused linear cross-entropy: internal entry points of the CPU reference and
// the CUDA kernels, called after tm_cross_entropy_* / tm_linear_cross_entropy_* have validated
// their arguments.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>

#include "common/tensor.h"

namespace turbomoe::loss {

// Throws TM_ERR_INVALID_ARGUMENT naming the first label outside [0, vocab) that is not
// ignore_index. CPU only: the CUDA kernels mark such rows with NaN instead of synchronising.
void check_labels_cpu(const Arg& labels, int64_t vocab, int64_t ignore_index);

// log(sum(exp(z))) of one float32 row: its max, then the sum of exp(z - max) in index order.
float row_lse(const float* z, int64_t vocab);

// logits [N,V]; labels [N]; loss, lse [N] float32. Ignored rows get loss 0 and lse 0.
void ce_forward_cpu(const Arg& logits, const Arg& labels, int64_t ignore_index, const Arg& loss,
                    const Arg& lse);
void ce_backward_cpu(const Arg& grad_loss, const Arg& logits, const Arg& labels, const Arg& lse,
                     int64_t ignore_index, const Arg& grad_logits);
void ce_forward_cuda(const Arg& logits, const Arg& labels, int64_t ignore_index, const Arg& loss,
                     const Arg& lse, void* stream);
void ce_backward_cuda(const Arg& grad_loss, const Arg& logits, const Arg& labels, const Arg& lse,
                      int64_t ignore_index, const Arg& grad_logits, void* stream);
// Forward and backward with every row read once (see loss_cuda.cu); grad_logits may alias
// logits.
void ce_forward_backward_cuda(const Arg& grad_loss, const Arg& logits, const Arg& labels,
                              int64_t ignore_index, const Arg& loss, const Arg& lse,
                              const Arg& grad_logits, void* stream);

// x *= scale (rounded to x's dtype) unless scale == 1; scale one float32 element.
void scale_unless_one_cpu(const Arg& scale, const Arg& x);
void scale_unless_one_cuda(const Arg& scale, const Arg& x, void* stream);

// Float32 scratch of the CPU linear cross-entropy, as offsets (in floats) into the workspace:
// weight^T [H,V] (so that logits are axpys over contiguous rows), one chunk of logits [C,V] and
// of hidden [C,H]; the backward adds a float32 copy of a bfloat16 weight [V,H] and a float32
// accumulator for a bfloat16 grad_weight [V,H].
struct LinearCeWorkspace {
  int64_t chunk = 0;  // rows per chunk: min(chunk_rows, n)
  size_t weight_t = 0, logits = 0, hidden = 0, weight_f32 = 0, grad_weight_f32 = 0;
  size_t floats = 0;  // total
};

// Throws TM_ERR_INVALID_ARGUMENT when a size would not fit in size_t bytes.
inline LinearCeWorkspace linear_ce_workspace(int64_t chunk_rows, int64_t n, int64_t hidden,
                                             int64_t vocab, bool weight_copy,
                                             bool grad_weight_acc) {
  LinearCeWorkspace w;
  if (n == 0) return w;
  w.chunk = chunk_rows < n ? chunk_rows : n;
  bool overflow = false;
  auto mul = [&](size_t a, size_t b) {
    size_t r = 0;
    overflow |= __builtin_mul_overflow(a, b, &r);
    return r;
  };
  auto add = [&](size_t a, size_t b) {
    size_t r = 0;
    overflow |= __builtin_add_overflow(a, b, &r);
    return r;
  };
  const size_t h = static_cast<size_t>(hidden), v = static_cast<size_t>(vocab);
  const size_t c = static_cast<size_t>(w.chunk);
  w.logits = add(w.weight_t, mul(h, v));
  w.hidden = add(w.logits, mul(c, v));
  w.weight_f32 = add(w.hidden, mul(c, h));
  w.grad_weight_f32 = add(w.weight_f32, weight_copy ? mul(v, h) : 0);
  w.floats = add(w.grad_weight_f32, grad_weight_acc ? mul(v, h) : 0);
  if (overflow || w.floats > SIZE_MAX / sizeof(float)) {
    invalid("the linear cross-entropy workspace for these sizes does not fit in size_t");
  }
  return w;
}

void linear_ce_forward_cpu(const tm_linear_ce_params& p, const Arg& hidden, const Arg& weight,
                           const Arg& labels, const Arg& loss, const Arg& lse, float* workspace);
void linear_ce_backward_cpu(const tm_linear_ce_params& p, const Arg& grad_loss, const Arg& hidden,
                            const Arg& weight, const Arg& labels, const Arg& lse,
                            const Arg& grad_hidden, const std::optional<Arg>& grad_weight,
                            float* workspace);

}  // namespace turbomoe::loss
