// C ABI of cross-entropy and fused linear cross-entropy: validation, then the CPU reference or
// the CUDA kernels.
#include <cstdint>
#include <string>

#include "common/device.h"
#include "loss/loss.h"

namespace {

using turbomoe::Arg;

void check_device_type(int32_t device_type) {
  if (device_type != TM_DEVICE_CPU && device_type != TM_DEVICE_CUDA) {
    turbomoe::invalid("device_type is " + std::to_string(device_type) +
                      ", expected TM_DEVICE_CPU (1) or TM_DEVICE_CUDA (2)");
  }
}

// [N,V] float32/bfloat16 with a contiguous last dim and at least one class.
void check_logits(const Arg& a) {
  a.dtype_in({TM_DTYPE_FLOAT32, TM_DTYPE_BFLOAT16}).ndim_is(2).rows_contiguous();
  if (a.size(1) == 0) turbomoe::invalid(std::string(a.name()) + " has no classes (dim 1 is 0)");
}

void check_labels(const Arg& labels, int64_t rows) {
  labels.index().ndim_is(1).size_is(0, rows, "one label per row");
}

// grad_logits like logits: in place is fine element for element; any other overlap would read
// overwritten logits.
void check_grad_logits(const Arg& grad, const Arg& logits) {
  check_logits(grad);
  grad.same_shape(logits);
  if (grad.data() == logits.data() &&
      (grad.dtype() != logits.dtype() || grad.stride(0) != logits.stride(0))) {
    turbomoe::invalid("grad_logits aliases logits but differs in dtype or row stride");
  }
}

void check_per_row(const Arg& a, int64_t rows) {
  a.dtype_in({TM_DTYPE_FLOAT32}).ndim_is(1).size_is(0, rows, "one value per row");
}

const tm_linear_ce_params& check_linear_params(const tm_linear_ce_params* params) {
  const auto& p = turbomoe::check_params(params, "params");
  if (p.chunk_rows <= 0) {
    turbomoe::invalid("params.chunk_rows is " + std::to_string(p.chunk_rows) + ", expected > 0");
  }
  return p;
}

// hidden [N,H], weight [V,H] of one float dtype; returns V.
int64_t check_linear_inputs(const Arg& hidden, const Arg& weight) {
  hidden.dtype_in({TM_DTYPE_FLOAT32, TM_DTYPE_BFLOAT16}).ndim_is(2).rows_contiguous();
  weight.same_dtype(hidden).ndim_is(2).size_is(1, hidden.size(1), "the hidden size of hidden");
  weight.rows_contiguous();
  if (weight.size(0) == 0) turbomoe::invalid("weight has no classes (dim 0 is 0)");
  return weight.size(0);
}

[[noreturn]] void linear_ce_on_cuda(const char* function) {
  turbomoe::unsupported(std::string(function) +
                        " runs on CPU only: on GPU the Python layer chunks the logits through "
                        "cuBLAS and tm_cross_entropy_forward/backward");
}

}  // namespace

extern "C" {

tm_status tm_cross_entropy_forward(const tm_tensor* logits, const tm_tensor* labels,
                                   int64_t ignore_index, tm_tensor* loss, tm_tensor* lse,
                                   void* stream) {
  return turbomoe::guard(__func__, [&] {
    const Arg lg(logits, "logits"), lb(labels, "labels"), ls(loss, "loss"), le(lse, "lse");
    check_logits(lg);
    check_labels(lb, lg.size(0));
    check_per_row(ls, lg.size(0));
    check_per_row(le, lg.size(0));
    const int32_t device = turbomoe::common_device({&lg, &lb, &ls, &le});
    turbomoe::require_cuda_build(device, "tm_cross_entropy_forward");
    if (lg.size(0) == 0) return;
    if (device == TM_DEVICE_CPU) {
      turbomoe::loss::ce_forward_cpu(lg, lb, ignore_index, ls, le);
    } else {
      TM_CUDA_ONLY(turbomoe::loss::ce_forward_cuda(lg, lb, ignore_index, ls, le, stream));
    }
  });
}

tm_status tm_cross_entropy_backward(const tm_tensor* grad_loss, const tm_tensor* logits,
                                    const tm_tensor* labels, const tm_tensor* lse,
                                    int64_t ignore_index, tm_tensor* grad_logits, void* stream) {
  return turbomoe::guard(__func__, [&] {
    const Arg gl(grad_loss, "grad_loss"), lg(logits, "logits"), lb(labels, "labels");
    const Arg le(lse, "lse"), gx(grad_logits, "grad_logits");
    check_logits(lg);
    check_labels(lb, lg.size(0));
    check_per_row(gl, lg.size(0));
    check_per_row(le, lg.size(0));
    check_grad_logits(gx, lg);
    const int32_t device = turbomoe::common_device({&gl, &lg, &lb, &le, &gx});
    turbomoe::require_cuda_build(device, "tm_cross_entropy_backward");
    if (lg.size(0) == 0) return;
    if (device == TM_DEVICE_CPU) {
      turbomoe::loss::ce_backward_cpu(gl, lg, lb, le, ignore_index, gx);
    } else {
      TM_CUDA_ONLY(turbomoe::loss::ce_backward_cuda(gl, lg, lb, le, ignore_index, gx, stream));
    }
  });
}

tm_status tm_cross_entropy_forward_backward(const tm_tensor* grad_loss, const tm_tensor* logits,
                                            const tm_tensor* labels, int64_t ignore_index,
                                            tm_tensor* loss, tm_tensor* lse, tm_tensor* grad_logits,
                                            void* stream) {
  return turbomoe::guard(__func__, [&] {
    const Arg gl(grad_loss, "grad_loss"), lg(logits, "logits"), lb(labels, "labels");
    const Arg ls(loss, "loss"), le(lse, "lse"), gx(grad_logits, "grad_logits");
    check_logits(lg);
    check_labels(lb, lg.size(0));
    check_per_row(gl, lg.size(0));
    check_per_row(ls, lg.size(0));
    check_per_row(le, lg.size(0));
    check_grad_logits(gx, lg);
    const int32_t device = turbomoe::common_device({&gl, &lg, &lb, &ls, &le, &gx});
    turbomoe::require_cuda_build(device, "tm_cross_entropy_forward_backward");
    if (lg.size(0) == 0) return;
    if (device == TM_DEVICE_CPU) {
      turbomoe::loss::ce_forward_cpu(lg, lb, ignore_index, ls, le);
      turbomoe::loss::ce_backward_cpu(gl, lg, lb, le, ignore_index, gx);
    } else {
      TM_CUDA_ONLY(
          turbomoe::loss::ce_forward_backward_cuda(gl, lg, lb, ignore_index, ls, le, gx, stream));
    }
  });
}

tm_status tm_linear_cross_entropy_workspace_size(const tm_linear_ce_params* params, int64_t n,
                                                 int64_t hidden, int64_t vocab, int32_t device_type,
                                                 size_t* bytes) {
  return turbomoe::guard(__func__, [&] {
    const auto& p = check_linear_params(params);
    if (bytes == nullptr) turbomoe::invalid("bytes is NULL");
    if (n < 0) turbomoe::invalid("n is " + std::to_string(n) + ", expected >= 0");
    if (hidden < 0) turbomoe::invalid("hidden is " + std::to_string(hidden) + ", expected >= 0");
    if (vocab <= 0) turbomoe::invalid("vocab is " + std::to_string(vocab) + ", expected > 0");
    check_device_type(device_type);
    // Enough for the forward and for a backward with bfloat16 weight and grad_weight. On CUDA
    // (where the Python layer does the chunking) one float32 chunk of logits.
    const auto w = turbomoe::loss::linear_ce_workspace(p.chunk_rows, n, hidden, vocab, true, true);
    const size_t floats = device_type == TM_DEVICE_CPU
                              ? w.floats
                              : static_cast<size_t>(w.chunk) * static_cast<size_t>(vocab);
    *bytes = floats * sizeof(float);
  });
}

tm_status tm_linear_cross_entropy_forward(const tm_linear_ce_params* params,
                                          const tm_tensor* hidden, const tm_tensor* weight,
                                          const tm_tensor* labels, tm_tensor* loss, tm_tensor* lse,
                                          void* workspace, size_t workspace_bytes, void* stream) {
  return turbomoe::guard(__func__, [&] {
    const auto& p = check_linear_params(params);
    const Arg hd(hidden, "hidden"), wt(weight, "weight"), lb(labels, "labels");
    const Arg ls(loss, "loss"), le(lse, "lse");
    const int64_t vocab = check_linear_inputs(hd, wt);
    const int64_t n = hd.size(0);
    check_labels(lb, n);
    check_per_row(ls, n);
    check_per_row(le, n);
    if (turbomoe::common_device({&hd, &wt, &lb, &ls, &le}) == TM_DEVICE_CUDA) {
      linear_ce_on_cuda("tm_linear_cross_entropy_forward");
    }
    const auto w =
        turbomoe::loss::linear_ce_workspace(p.chunk_rows, n, hd.size(1), vocab, false, false);
    turbomoe::check_workspace(workspace, workspace_bytes, w.floats * sizeof(float),
                              "tm_linear_cross_entropy_workspace_size");
    if (n == 0) return;
    turbomoe::loss::linear_ce_forward_cpu(p, hd, wt, lb, ls, le, static_cast<float*>(workspace));
  });
}

tm_status tm_linear_cross_entropy_backward(const tm_linear_ce_params* params,
                                           const tm_tensor* grad_loss, const tm_tensor* hidden,
                                           const tm_tensor* weight, const tm_tensor* labels,
                                           const tm_tensor* lse, tm_tensor* grad_hidden,
                                           tm_tensor* grad_weight, void* workspace,
                                           size_t workspace_bytes, void* stream) {
  return turbomoe::guard(__func__, [&] {
    const auto& p = check_linear_params(params);
    const Arg gl(grad_loss, "grad_loss"), hd(hidden, "hidden"), wt(weight, "weight");
    const Arg lb(labels, "labels"), le(lse, "lse"), gh(grad_hidden, "grad_hidden");
    const auto gw = turbomoe::optional_arg(grad_weight, "grad_weight");
    const int64_t vocab = check_linear_inputs(hd, wt);
    const int64_t n = hd.size(0);
    check_labels(lb, n);
    check_per_row(gl, n);
    check_per_row(le, n);
    gh.dtype_in({TM_DTYPE_FLOAT32, TM_DTYPE_BFLOAT16}).same_shape(hd).rows_contiguous();
    if (gw) {
      if (gw->dtype() != TM_DTYPE_FLOAT32) gw->same_dtype(wt);
      gw->same_shape(wt).rows_contiguous();
    }
    if (turbomoe::common_device({&gl, &hd, &wt, &lb, &le, &gh, gw ? &*gw : nullptr}) ==
        TM_DEVICE_CUDA) {
      linear_ce_on_cuda("tm_linear_cross_entropy_backward");
    }
    const bool weight_copy = wt.dtype() != TM_DTYPE_FLOAT32;
    const bool grad_weight_acc = gw && gw->dtype() != TM_DTYPE_FLOAT32;
    const auto w = turbomoe::loss::linear_ce_workspace(p.chunk_rows, n, hd.size(1), vocab,
                                                       weight_copy, grad_weight_acc);
    turbomoe::check_workspace(workspace, workspace_bytes, w.floats * sizeof(float),
                              "tm_linear_cross_entropy_workspace_size");
    // With no row, grad_weight is still overwritten (with zeros).
    if (n == 0 && !gw) return;
    turbomoe::loss::linear_ce_backward_cpu(p, gl, hd, wt, lb, le, gh, gw,
                                           static_cast<float*>(workspace));
  });
}

}  // extern "C"
