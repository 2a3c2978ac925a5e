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

// Row by row, in the composed ops' order and roundings (see tm_swiglu_weighted_backward).
void swiglu_weighted_backward_cpu(const tm_swiglu_params& p, const Arg& grad_rows, const Arg& gate,
                                  const Arg& up, const Arg& row_weights, const Arg& grad_gate,
                                  const Arg& grad_up, const Arg* weighted_act,
                                  const Arg& grad_weights) {
  dispatch_floating(gate.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const auto rounded = [](float v) { return to_float(from_float<T>(v)); };
    dispatch_floating(row_weights.dtype(), [&](auto w_tag) {
      using W = decltype(w_tag);
      for (int64_t r = 0; r < gate.size(0); ++r) {
        const float w = to_float(row_weights.ptr<W>()[r * row_weights.stride(0)]);
        const float w_rounded = rounded(w);
        float dot = 0.0f;
        for (int64_t c = 0; c < gate.size(1); ++c) {
          const float g = to_float(at<T>(gate, r, c));
          const float u = to_float(at<T>(up, r, c));
          const float act = rounded(swiglu_value(p.variant, p.alpha, p.limit, g, u));
          const float grad = to_float(at<T>(grad_rows, r, c));
          dot += grad * act;
          if (weighted_act != nullptr) at<T>(*weighted_act, r, c) = from_float<T>(act * w_rounded);
          const float grad_act = rounded(w * grad);
          float dg, du;
          swiglu_grads(p.variant, p.alpha, p.limit, g, u, &dg, &du);
          at<T>(grad_gate, r, c) = from_float<T>(grad_act * dg);
          at<T>(grad_up, r, c) = from_float<T>(grad_act * du);
        }
        grad_weights.ptr<float>()[r * grad_weights.stride(0)] = dot;
      }
    });
  });
}

}  // namespace turbomoe::activation
