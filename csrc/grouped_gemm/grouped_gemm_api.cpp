// C ABI of the grouped GEMM: validation, then the CPU reference or the CUDA dispatcher.
#include <atomic>
#include <string>

#include "activation/activation.h"
#include "common/device.h"
#include "grouped_gemm/grouped_gemm.h"
#include "permute/expert_offsets.h"

namespace {

using turbomoe::Arg;
using turbomoe::invalid;

// Rows-contiguous [rows, cols] matrix of float32 or bfloat16.
void check_matrix(const Arg& a) {
  a.dtype_in({TM_DTYPE_FLOAT32, TM_DTYPE_BFLOAT16}).ndim_is(2).rows_contiguous();
}

// Outputs are float32 or the input dtype.
void check_output_dtype(const Arg& out, const Arg& in) {
  if (out.dtype() != TM_DTYPE_FLOAT32 && out.dtype() != in.dtype()) {
    invalid(std::string(out.name()) + " has dtype " + turbomoe::dtype_name(out.dtype()) +
            ", expected float32 or " + turbomoe::dtype_name(in.dtype()) + " (the dtype of " +
            in.name() + ")");
  }
}

// w [E, N, K] of the dtype of `in`, whose last dimension is `k`; returns E.
int64_t check_weight(const Arg& w, const Arg& in, int64_t k, const char* what) {
  w.dtype_in({TM_DTYPE_FLOAT32, TM_DTYPE_BFLOAT16}).ndim_is(3).same_dtype(in);
  w.size_is(2, k, what);
  return w.size(0);
}

// expert_offsets [E+1] int32 for the E experts of `from`.
void check_offsets(const Arg& offsets, int64_t experts, const char* from) {
  turbomoe::check_expert_offsets_shape(offsets);
  offsets.size_is(0, experts + 1, from);
}

// The weight gradient dw [E, N, K] (float32 or the inputs' dtype) = dy_e^T x_e of dy [*, N] and
// x [*, K] of one dtype (either may hold token rows that a gather reads), and expert_offsets
// [E+1]; returns E.
int64_t check_weight_grad(const Arg& dy, const Arg& x, const Arg& dw, const Arg& offsets) {
  check_matrix(dy);
  check_matrix(x);
  x.same_dtype(dy);
  dw.dtype_in({TM_DTYPE_FLOAT32, TM_DTYPE_BFLOAT16}).ndim_is(3);
  check_output_dtype(dw, x);
  const std::string n_what = std::string("N, the columns of ") + dy.name();
  const std::string k_what = std::string("K, the columns of ") + x.name();
  dw.size_is(1, dy.size(1), n_what.c_str()).size_is(2, x.size(1), k_what.c_str());
  check_offsets(offsets, dw.size(0), "E + 1, E from dw");
  return dw.size(0);
}

// The gather of the *_gathered passes: src [T, K] rows, sorted_pairs int32 [P] with
// P >= T * top_k and >= `rows` (the rows of the permuted space); on the CPU, every routed row's
// pair in [0, P) (offsets validated first; on CUDA nothing is read on the host).
void check_gather(const Arg& src, const Arg& sorted_pairs, int64_t top_k, int64_t rows,
                  const Arg& offsets, int64_t experts, const char* rows_name) {
  if (top_k < 1) invalid("top_k is " + std::to_string(top_k) + ", expected >= 1");
  sorted_pairs.dtype_in({TM_DTYPE_INT32}).ndim_is(1).contiguous();
  const int64_t pairs = sorted_pairs.size(0);
  if (pairs < src.size(0) * top_k) {
    invalid("sorted_pairs has " + std::to_string(pairs) + " entries, fewer than the " +
            std::to_string(src.size(0) * top_k) + " pairs of src (tokens * top_k)");
  }
  if (rows > pairs) {
    invalid(std::string(rows_name) + " has " + std::to_string(rows) + " rows, more than the " +
            std::to_string(pairs) + " entries of sorted_pairs");
  }
  if (offsets.device_type() != TM_DEVICE_CPU || sorted_pairs.device_type() != TM_DEVICE_CPU) {
    return;
  }
  turbomoe::check_expert_offsets_values(offsets, rows);
  const int32_t* sorted = sorted_pairs.ptr<const int32_t>();
  const int32_t routed = offsets.ptr<const int32_t>()[experts];
  for (int32_t r = 0; r < routed; ++r) {
    if (sorted[r] < 0 || sorted[r] >= pairs) {
      invalid("sorted_pairs[" + std::to_string(r) + "] is " + std::to_string(sorted[r]) +
              ", outside [0, " + std::to_string(pairs) + ")");
    }
  }
}

template <typename Cpu, typename Cuda>
void run(const char* op, std::initializer_list<const Arg*> args, const Arg& offsets, int64_t rows,
         const Arg& out, Cpu&& cpu, Cuda&& cuda) {
  const int32_t device = turbomoe::common_device(args);
  turbomoe::require_cuda_build(device, op);
  if (device == TM_DEVICE_CPU) turbomoe::check_expert_offsets_values(offsets, rows);
  if (out.numel() == 0) return;
  if (device == TM_DEVICE_CPU) {
    cpu();
  } else {
    cuda();
  }
}

// dw = dy_e^T x_e (tm_grouped_gemm_backward_weight and its _routed twin).
void backward_weight(const char* op, const tm_tensor* dy, const tm_tensor* x,
                     const tm_tensor* expert_offsets, tm_tensor* dw, bool leave_empty_experts,
                     void* stream) {
  const Arg dya(dy, "dy"), xa(x, "x"), off(expert_offsets, "expert_offsets"), dwa(dw, "dw");
  check_weight_grad(dya, xa, dwa, off);
  xa.size_is(0, dya.size(0), "M, the rows of dy");
  run(
      op, {&dya, &xa, &off, &dwa}, off, dya.size(0), dwa,
      [&] { turbomoe::grouped_gemm::backward_weight_cpu(dya, xa, off, dwa); },
      [&] {
        TM_CUDA_ONLY(turbomoe::grouped_gemm::backward_weight_cuda(dya, xa, off, dwa,
                                                                  leave_empty_experts, stream));
      });
}

std::atomic<int> g_sm_margin{0};

}  // namespace

namespace turbomoe::grouped_gemm {

int sm_margin() { return g_sm_margin.load(std::memory_order_relaxed); }

}  // namespace turbomoe::grouped_gemm

extern "C" {

tm_status tm_set_gemm_sm_margin(int32_t sms) {
  return turbomoe::guard(__func__, [&] {
    if (sms < 0 || sms > 1024) invalid("sms is " + std::to_string(sms) + ", expected [0, 1024]");
    g_sm_margin.store(sms, std::memory_order_relaxed);
  });
}

int32_t tm_gemm_sm_margin(void) { return g_sm_margin.load(std::memory_order_relaxed); }

tm_status tm_grouped_gemm_workspace_size(int32_t pass, int64_t m, int64_t n, int64_t k,
                                         int64_t num_experts, int32_t device_type, size_t* bytes) {
  return turbomoe::guard(__func__, [&] {
    if (bytes == nullptr) invalid("bytes is NULL");
    if (pass != TM_GEMM_FORWARD && pass != TM_GEMM_GRAD_INPUT && pass != TM_GEMM_GRAD_WEIGHT) {
      invalid("pass is " + std::to_string(pass) +
              ", expected TM_GEMM_FORWARD (1), TM_GEMM_GRAD_INPUT (2) or TM_GEMM_GRAD_WEIGHT (3)");
    }
    if (m < 0 || n < 0 || k < 0) invalid("m, n and k must be >= 0");
    if (num_experts < 0) invalid("num_experts must be >= 0");
    if (device_type != TM_DEVICE_CPU && device_type != TM_DEVICE_CUDA) {
      invalid("device_type is " + std::to_string(device_type) +
              ", expected TM_DEVICE_CPU or TM_DEVICE_CUDA");
    }
    *bytes = 0;  // every kernel derives its tile schedule on the device, without scratch
  });
}

tm_status tm_grouped_gemm_forward(const tm_tensor* x, const tm_tensor* w,
                                  const tm_tensor* expert_offsets, tm_tensor* y, void* workspace,
                                  size_t workspace_bytes, void* stream) {
  return turbomoe::guard(__func__, [&] {
    const Arg xa(x, "x"), wa(w, "w"), off(expert_offsets, "expert_offsets"), ya(y, "y");
    check_matrix(xa);
    const int64_t experts = check_weight(wa, xa, xa.size(1), "K, the columns of x");
    check_offsets(off, experts, "E + 1, E from w");
    check_matrix(ya);
    check_output_dtype(ya, xa);
    ya.size_is(0, xa.size(0), "M, the rows of x").size_is(1, wa.size(1), "N, from w");
    run(
        "tm_grouped_gemm_forward", {&xa, &wa, &off, &ya}, off, xa.size(0), ya,
        [&] { turbomoe::grouped_gemm::forward_cpu(xa, wa, off, ya); },
        [&] { TM_CUDA_ONLY(turbomoe::grouped_gemm::forward_cuda(xa, wa, off, ya, stream)); });
  });
}

tm_status tm_grouped_gemm_forward_gathered(const tm_tensor* src, const tm_tensor* sorted_pairs,
                                           int64_t top_k, const tm_tensor* w,
                                           const tm_tensor* expert_offsets, tm_tensor* y,
                                           void* stream) {
  return turbomoe::guard(__func__, [&] {
    const Arg sa(src, "src"), sp(sorted_pairs, "sorted_pairs"), wa(w, "w"),
        off(expert_offsets, "expert_offsets"), ya(y, "y");
    check_matrix(sa);
    const int64_t experts = check_weight(wa, sa, sa.size(1), "K, the columns of src");
    check_offsets(off, experts, "E + 1, E from w");
    check_matrix(ya);
    check_output_dtype(ya, sa);
    ya.size_is(1, wa.size(1), "N, from w");
    turbomoe::common_device({&sa, &sp, &wa, &off, &ya});
    check_gather(sa, sp, top_k, ya.size(0), off, experts, "y");
    run(
        "tm_grouped_gemm_forward_gathered", {&sa, &sp, &wa, &off, &ya}, off, ya.size(0), ya,
        [&] { turbomoe::grouped_gemm::forward_gathered_cpu(sa, sp, top_k, wa, off, ya); },
        [&] {
          TM_CUDA_ONLY(
              turbomoe::grouped_gemm::forward_gathered_cuda(sa, sp, top_k, wa, off, ya, stream));
        });
  });
}

tm_status tm_grouped_gemm_backward_input(const tm_tensor* dy, const tm_tensor* w,
                                         const tm_tensor* expert_offsets, tm_tensor* dx,
                                         void* workspace, size_t workspace_bytes, void* stream) {
  return turbomoe::guard(__func__, [&] {
    const Arg dya(dy, "dy"), wa(w, "w"), off(expert_offsets, "expert_offsets"), dxa(dx, "dx");
    check_matrix(dya);
    wa.dtype_in({TM_DTYPE_FLOAT32, TM_DTYPE_BFLOAT16}).ndim_is(3).same_dtype(dya);
    wa.size_is(1, dya.size(1), "N, the columns of dy");
    const int64_t experts = wa.size(0);
    check_offsets(off, experts, "E + 1, E from w");
    check_matrix(dxa);
    check_output_dtype(dxa, dya);
    dxa.size_is(0, dya.size(0), "M, the rows of dy").size_is(1, wa.size(2), "K, from w");
    run(
        "tm_grouped_gemm_backward_input", {&dya, &wa, &off, &dxa}, off, dya.size(0), dxa,
        [&] { turbomoe::grouped_gemm::backward_input_cpu(dya, wa, off, dxa); },
        [&] {
          TM_CUDA_ONLY(turbomoe::grouped_gemm::backward_input_cuda(dya, wa, off, dxa, stream));
        });
  });
}

tm_status tm_grouped_gemm_backward_input_gathered(const tm_tensor* dy_src,
                                                  const tm_tensor* sorted_pairs, int64_t top_k,
                                                  const tm_tensor* w,
                                                  const tm_tensor* expert_offsets, tm_tensor* dx,
                                                  void* stream) {
  return turbomoe::guard(__func__, [&] {
    const Arg da(dy_src, "dy_src"), sp(sorted_pairs, "sorted_pairs"), wa(w, "w"),
        off(expert_offsets, "expert_offsets"), dxa(dx, "dx");
    check_matrix(da);
    wa.dtype_in({TM_DTYPE_FLOAT32, TM_DTYPE_BFLOAT16}).ndim_is(3).same_dtype(da);
    wa.size_is(1, da.size(1), "N, the columns of dy_src");
    const int64_t experts = wa.size(0);
    check_offsets(off, experts, "E + 1, E from w");
    check_matrix(dxa);
    check_output_dtype(dxa, da);
    dxa.size_is(1, wa.size(2), "K, from w");
    turbomoe::common_device({&da, &sp, &wa, &off, &dxa});
    check_gather(da, sp, top_k, dxa.size(0), off, experts, "dx");
    run(
        "tm_grouped_gemm_backward_input_gathered", {&da, &sp, &wa, &off, &dxa}, off, dxa.size(0),
        dxa,
        [&] { turbomoe::grouped_gemm::backward_input_gathered_cpu(da, sp, top_k, wa, off, dxa); },
        [&] {
          TM_CUDA_ONLY(turbomoe::grouped_gemm::backward_input_gathered_cuda(da, sp, top_k, wa, off,
                                                                            dxa, stream));
        });
  });
}

tm_status tm_grouped_gemm_backward_weight(const tm_tensor* dy, const tm_tensor* x,
                                          const tm_tensor* expert_offsets, tm_tensor* dw,
                                          void* workspace, size_t workspace_bytes, void* stream) {
  return turbomoe::guard(__func__, [&] {
    backward_weight(__func__, dy, x, expert_offsets, dw, /*leave_empty_experts=*/false, stream);
  });
}

tm_status tm_grouped_gemm_backward_weight_routed(const tm_tensor* dy, const tm_tensor* x,
                                                 const tm_tensor* expert_offsets, tm_tensor* dw,
                                                 void* workspace, size_t workspace_bytes,
                                                 void* stream) {
  return turbomoe::guard(__func__, [&] {
    backward_weight(__func__, dy, x, expert_offsets, dw, /*leave_empty_experts=*/true, stream);
  });
}

tm_status tm_grouped_gemm_backward_weight_gathered(const tm_tensor* dy, const tm_tensor* src,
                                                   const tm_tensor* sorted_pairs, int64_t top_k,
                                                   const tm_tensor* expert_offsets, tm_tensor* dw,
                                                   void* stream) {
  return turbomoe::guard(__func__, [&] {
    const Arg dya(dy, "dy"), sa(src, "src"), sp(sorted_pairs, "sorted_pairs"),
        off(expert_offsets, "expert_offsets"), dwa(dw, "dw");
    const int64_t experts = check_weight_grad(dya, sa, dwa, off);
    turbomoe::common_device({&dya, &sa, &sp, &off, &dwa});
    check_gather(sa, sp, top_k, dya.size(0), off, experts, "dy");
    run(
        "tm_grouped_gemm_backward_weight_gathered", {&dya, &sa, &sp, &off, &dwa}, off, dya.size(0),
        dwa,
        [&] { turbomoe::grouped_gemm::backward_weight_gathered_cpu(dya, sa, sp, top_k, off, dwa); },
        [&] {
          TM_CUDA_ONLY(turbomoe::grouped_gemm::backward_weight_gathered_cuda(dya, sa, sp, top_k,
                                                                             off, dwa, stream));
        });
  });
}

tm_status tm_grouped_gemm_backward_weight_gathered_dy(const tm_tensor* dy_src, const tm_tensor* x,
                                                      const tm_tensor* sorted_pairs, int64_t top_k,
                                                      const tm_tensor* expert_offsets,
                                                      tm_tensor* dw, void* stream) {
  return turbomoe::guard(__func__, [&] {
    const Arg da(dy_src, "dy_src"), xa(x, "x"), sp(sorted_pairs, "sorted_pairs"),
        off(expert_offsets, "expert_offsets"), dwa(dw, "dw");
    const int64_t experts = check_weight_grad(da, xa, dwa, off);
    turbomoe::common_device({&da, &xa, &sp, &off, &dwa});
    check_gather(da, sp, top_k, xa.size(0), off, experts, "x");
    run(
        "tm_grouped_gemm_backward_weight_gathered_dy", {&da, &xa, &sp, &off, &dwa}, off, xa.size(0),
        dwa,
        [&] {
          turbomoe::grouped_gemm::backward_weight_gathered_dy_cpu(da, xa, sp, top_k, off, dwa);
        },
        [&] {
          TM_CUDA_ONLY(turbomoe::grouped_gemm::backward_weight_gathered_dy_cuda(da, xa, sp, top_k,
                                                                                off, dwa, stream));
        });
  });
}

tm_status tm_grouped_gemm_swiglu_forward(const tm_swiglu_params* params, const tm_tensor* x,
                                         const tm_tensor* w, const tm_tensor* expert_offsets,
                                         tm_tensor* gate_up, tm_tensor* act, void* stream) {
  return turbomoe::guard(__func__, [&] {
    const auto& p = turbomoe::activation::check_swiglu_params(params);
    const Arg xa(x, "x"), wa(w, "w"), off(expert_offsets, "expert_offsets");
    const Arg gua(gate_up, "gate_up"), aa(act, "act");
    check_matrix(xa);
    const int64_t experts = check_weight(wa, xa, xa.size(1), "K, the columns of x");
    if (wa.size(1) % 2 != 0) {
      invalid("w has " + std::to_string(wa.size(1)) +
              " rows per expert, expected an even 2I (the gate rows, then the up rows)");
    }
    check_offsets(off, experts, "E + 1, E from w");
    check_matrix(gua);
    check_output_dtype(gua, xa);
    gua.size_is(0, xa.size(0), "M, the rows of x").size_is(1, wa.size(1), "2I, from w");
    check_matrix(aa);
    aa.same_dtype(gua);
    aa.size_is(0, xa.size(0), "M, the rows of x").size_is(1, wa.size(1) / 2, "I, from w");
    run(
        "tm_grouped_gemm_swiglu_forward", {&xa, &wa, &off, &gua, &aa}, off, xa.size(0), gua,
        [&] { turbomoe::grouped_gemm::swiglu_forward_cpu(p, xa, wa, off, gua, aa); },
        [&] {
          TM_CUDA_ONLY(
              turbomoe::grouped_gemm::swiglu_forward_cuda(p, xa, wa, off, gua, aa, stream));
        });
  });
}

}  // extern "C"
