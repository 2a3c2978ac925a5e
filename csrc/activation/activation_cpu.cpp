// CPU reference of the gated activations: one pass over strided 2-D views.
#include "activation/activation.h"
#include "activation/swiglu_math.h"
#include "common/numeric.h"

namespace turbomoe::activation {
namespace {

template <typename T>
T& at(const Arg& a, int64_t r, int64_t c) {
  return a.ptr<T>()[r * a.stride(0) + c * a.stride(1)];
}

}  // namespace

void swiglu_forward_cpu(const tm_swiglu_params& p, const Arg& gate, const Arg& up, const Arg& out) {
  dispatch_floating(gate.dtype(), [&](auto in_tag) {
    using In = decltype(in_tag);
    dispatch_floating(out.dtype(), [&](auto out_tag) {
      using Out = decltype(out_tag);
      for (int64_t r = 0; r < gate.size(0); ++r) {
        for (int64_t c = 0; c < gate.size(1); ++c) {
          const float v = swiglu_value(p.variant, p.alpha, p.limit, to_float(at<In>(gate, r, c)),
                                       to_float(at<In>(up, r, c)));
          at<Out>(out, r, c) = from_float<Out>(v);
        }
      }
    });
  });
}

void swiglu_backward_cpu(const tm_swiglu_params& p, const Arg& grad_out, const Arg& gate,
                         const Arg& up, const Arg& grad_gate, const Arg& grad_up) {
  dispatch_floating(gate.dtype(), [&](auto in_tag) {
    using In = decltype(in_tag);
    dispatch_floating(grad_out.dtype(), [&](auto go_tag) {
      using Go = decltype(go_tag);
      dispatch_floating(grad_gate.dtype(), [&](auto out_tag) {
        using Out = decltype(out_tag);
        for (int64_t r = 0; r < gate.size(0); ++r) {
          for (int64_t c = 0; c < gate.size(1); ++c) {
            float dg, du;
            swiglu_grads(p.variant, p.alpha, p.limit, to_float(at<In>(gate, r, c)),
                         to_float(at<In>(up, r, c)), &dg, &du);
            const float go = to_float(at<Go>(grad_out, r, c));
            at<Out>(grad_gate, r, c) = from_float<Out>(go * dg);
            at<Out>(grad_up, r, c) = from_float<Out>(go * du);
          }
        }
      });
    });
  });
}

}  // namespace turbomoe::activation
