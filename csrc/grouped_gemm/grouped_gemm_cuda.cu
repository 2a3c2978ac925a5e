// CUDA dispatch of the grouped GEMM: the Hopper TMA/WGMMA kernel where it covers the call, else
// the generic tiled kernel.
#include <string>

#include "activation/activation.h"
#include "common/cuda_utils.cuh"
#include "grouped_gemm/grouped_gemm.h"
#include "grouped_gemm/hopper_gemm.h"
#include "grouped_gemm/tiled_gemm.h"

namespace turbomoe::grouped_gemm {
namespace {

void require_unit_last_stride(const Arg& a) {
  const int last = a.ndim() - 1;
  if (a.size(last) > 1 && a.stride(last) != 1) {
    std::string strides;
    for (int i = 0; i < a.ndim(); ++i) strides += (i ? ", " : "") + std::to_string(a.stride(i));
    unsupported(std::string(a.name()) + " has strides [" + strides +
                "]; the CUDA grouped GEMM needs a contiguous last dimension (make the "
                "weight contiguous in the [E, N, K] layout)");
  }
}

int32_t expert_count(const Arg& offsets) { return static_cast<int32_t>(offsets.size(0) - 1); }

// `p` with one operand's rows gathered from src (gather_a: A's, else B's): row r is
// src[sorted_pairs[r] / top_k].
TiledProblem with_gather(TiledProblem p, const Arg& sorted_pairs, int64_t top_k, const Arg& src,
                         bool gather_a) {
  p.gather_pairs = sorted_pairs.ptr<const int32_t>();
  p.gather_top_k = static_cast<int32_t>(top_k);
  p.gather_src_rows = src.size(0);
  p.gather_a = gather_a;
  return p;
}

}  // namespace

void forward_cuda(const Arg& x, const Arg& w, const Arg& offsets, const Arg& y, void* stream) {
  require_unit_last_stride(w);
  cuda::DeviceGuard device(x.t().device_index);
  if (hopper_grouped_gemm_forward(x.t(), w.t(), offsets.t(), y.t(), stream)) return;
  launch_tiled({TM_GEMM_FORWARD, x.dtype(), y.dtype(), x.data(), x.stride(0), w.data(), w.stride(1),
                w.stride(0), y.data(), y.stride(0), 0, offsets.ptr<const int32_t>(),
                expert_count(offsets), x.size(0), y.size(1), x.size(1), 0},
               stream);
}

void forward_gathered_cuda(const Arg& src, const Arg& sorted_pairs, int64_t top_k, const Arg& w,
                           const Arg& offsets, const Arg& y, void* stream) {
  require_unit_last_stride(w);
  cuda::DeviceGuard device(src.t().device_index);
  if (hopper_grouped_gemm_forward_gathered(src.t(), sorted_pairs.t(), top_k, w.t(), offsets.t(),
                                           y.t(), stream)) {
    return;
  }
  launch_tiled(
      with_gather({TM_GEMM_FORWARD, src.dtype(), y.dtype(), src.data(), src.stride(0), w.data(),
                   w.stride(1), w.stride(0), y.data(), y.stride(0), 0, offsets.ptr<const int32_t>(),
                   expert_count(offsets), y.size(0), y.size(1), src.size(1), 0},
                  sorted_pairs, top_k, src, /*gather_a=*/true),
      stream);
}

void backward_weight_gathered_cuda(const Arg& dy, const Arg& src, const Arg& sorted_pairs,
                                   int64_t top_k, const Arg& offsets, const Arg& dw, void* stream) {
  require_unit_last_stride(dw);
  cuda::DeviceGuard device(dy.t().device_index);
  if (hopper_grouped_gemm_backward_weight_gathered(dy.t(), src.t(), sorted_pairs.t(), top_k,
                                                   offsets.t(), dw.t(), stream)) {
    return;
  }
  launch_tiled(with_gather({TM_GEMM_GRAD_WEIGHT, src.dtype(), dw.dtype(), dy.data(), dy.stride(0),
                            src.data(), src.stride(0), 0, dw.data(), dw.stride(1), dw.stride(0),
                            offsets.ptr<const int32_t>(), expert_count(offsets), dy.size(0),
                            dw.size(2), 0, dw.size(1)},
                           sorted_pairs, top_k, src, /*gather_a=*/false),
               stream);
}

void backward_weight_gathered_dy_cuda(const Arg& dy_src, const Arg& x, const Arg& sorted_pairs,
                                      int64_t top_k, const Arg& offsets, const Arg& dw,
                                      void* stream) {
  require_unit_last_stride(dw);
  cuda::DeviceGuard device(dy_src.t().device_index);
  if (hopper_grouped_gemm_backward_weight_gathered_dy(dy_src.t(), x.t(), sorted_pairs.t(), top_k,
                                                      offsets.t(), dw.t(), stream)) {
    return;
  }
  launch_tiled(with_gather({TM_GEMM_GRAD_WEIGHT, x.dtype(), dw.dtype(), dy_src.data(),
                            dy_src.stride(0), x.data(), x.stride(0), 0, dw.data(), dw.stride(1),
                            dw.stride(0), offsets.ptr<const int32_t>(), expert_count(offsets),
                            x.size(0), dw.size(2), 0, dw.size(1)},
                           sorted_pairs, top_k, dy_src, /*gather_a=*/true),
               stream);
}

void backward_input_gathered_cuda(const Arg& dy_src, const Arg& sorted_pairs, int64_t top_k,
                                  const Arg& w, const Arg& offsets, const Arg& dx, void* stream) {
  require_unit_last_stride(w);
  cuda::DeviceGuard device(dy_src.t().device_index);
  if (hopper_grouped_gemm_backward_input_gathered(dy_src.t(), sorted_pairs.t(), top_k, w.t(),
                                                  offsets.t(), dx.t(), stream)) {
    return;
  }
  launch_tiled(with_gather({TM_GEMM_GRAD_INPUT, dy_src.dtype(), dx.dtype(), dy_src.data(),
                            dy_src.stride(0), w.data(), w.stride(1), w.stride(0), dx.data(),
                            dx.stride(0), 0, offsets.ptr<const int32_t>(), expert_count(offsets),
                            dx.size(0), dx.size(1), dy_src.size(1), 0},
                           sorted_pairs, top_k, dy_src, /*gather_a=*/true),
               stream);
}

void backward_input_cuda(const Arg& dy, const Arg& w, const Arg& offsets, const Arg& dx,
                         void* stream) {
  require_unit_last_stride(w);
  cuda::DeviceGuard device(dy.t().device_index);
  if (hopper_grouped_gemm_backward_input(dy.t(), w.t(), offsets.t(), dx.t(), stream)) return;
  launch_tiled({TM_GEMM_GRAD_INPUT, dy.dtype(), dx.dtype(), dy.data(), dy.stride(0), w.data(),
                w.stride(1), w.stride(0), dx.data(), dx.stride(0), 0, offsets.ptr<const int32_t>(),
                expert_count(offsets), dy.size(0), dx.size(1), dy.size(1), 0},
               stream);
}

void backward_weight_cuda(const Arg& dy, const Arg& x, const Arg& offsets, const Arg& dw,
                          bool leave_empty_experts, void* stream) {
  require_unit_last_stride(dw);
  cuda::DeviceGuard device(dy.t().device_index);
  if (hopper_grouped_gemm_backward_weight(dy.t(), x.t(), offsets.t(), dw.t(), leave_empty_experts,
                                          stream)) {
    return;
  }
  launch_tiled({TM_GEMM_GRAD_WEIGHT, x.dtype(), dw.dtype(), dy.data(), dy.stride(0), x.data(),
                x.stride(0), 0, dw.data(), dw.stride(1), dw.stride(0), offsets.ptr<const int32_t>(),
                expert_count(offsets), dy.size(0), dw.size(2), 0, dw.size(1)},
               stream);
}

void swiglu_forward_cuda(const tm_swiglu_params& p, const Arg& x, const Arg& w, const Arg& offsets,
                         const Arg& gate_up, const Arg& act, void* stream) {
  require_unit_last_stride(w);
  cuda::DeviceGuard device(x.t().device_index);
  if (hopper_grouped_gemm_swiglu_forward(p, x.t(), w.t(), offsets.t(), gate_up.t(), act.t(),
                                         stream)) {
    return;
  }
  forward_cuda(x, w, offsets, gate_up, stream);
  const int64_t inter = act.size(1);
  const tm_tensor gate = column_block(gate_up.t(), 0, inter);
  const tm_tensor up = column_block(gate_up.t(), inter, inter);
  activation::swiglu_forward_cuda(p, Arg(&gate, "gate"), Arg(&up, "up"), act, stream);
}

}  // namespace turbomoe::grouped_gemm
