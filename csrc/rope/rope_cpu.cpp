// CPU reference of RoPE over strided [B,NH,S,D] views: each head's rotated dims are computed
// into a small buffer before any is written, so out may alias in.
#include <vector>

#include "common/numeric.h"
#include "rope/rope.h"
#include "rope/rope_math.h"

namespace turbomoe::rope {

void apply_cpu(bool interleaved, bool backward, const Arg& in, const Arg& cos, const Arg& sin,
               const Arg& out) {
  const int64_t batch = in.size(0), heads = in.size(1), seq = in.size(2), dim = in.size(3);
  const int64_t rot = cos.size(2), half = rot / 2;
  const bool broadcast = cos.size(0) == 1;
  dispatch_floating(in.dtype(), [&](auto in_tag) {
    using In = decltype(in_tag);
    dispatch_floating(cos.dtype(), [&](auto cs_tag) {
      using Cs = decltype(cs_tag);
      dispatch_floating(out.dtype(), [&](auto out_tag) {
        using Out = decltype(out_tag);
        std::vector<float> rotated(static_cast<size_t>(rot));
        for (int64_t b = 0; b < batch; ++b) {
          const int64_t cb = broadcast ? 0 : b;
          for (int64_t h = 0; h < heads; ++h) {
            for (int64_t s = 0; s < seq; ++s) {
              const In* ip =
                  in.ptr<const In>() + b * in.stride(0) + h * in.stride(1) + s * in.stride(2);
              Out* op = out.ptr<Out>() + b * out.stride(0) + h * out.stride(1) + s * out.stride(2);
              const Cs* cp = cos.ptr<const Cs>() + cb * cos.stride(0) + s * cos.stride(1);
              const Cs* sp = sin.ptr<const Cs>() + cb * sin.stride(0) + s * sin.stride(1);
              auto x = [&](int64_t d) { return to_float(ip[d * in.stride(3)]); };
              for (int64_t k = 0; k < half; ++k) {
                const PairIndex p = pair_index(interleaved, k, half);
                const float c1 = to_float(cp[p.cs1 * cos.stride(2)]);
                const float s1 = to_float(sp[p.cs1 * sin.stride(2)]);
                const float c2 = to_float(cp[p.cs2 * cos.stride(2)]);
                const float s2 = to_float(sp[p.cs2 * sin.stride(2)]);
                if (backward) {
                  rotate_transpose(x(p.out1), x(p.out2), c1, s1, c2, s2, &rotated[p.in1],
                                   &rotated[p.in2]);
                } else {
                  rotate(x(p.in1), x(p.in2), c1, s1, c2, s2, &rotated[p.out1], &rotated[p.out2]);
                }
              }
              for (int64_t d = 0; d < rot; ++d) {
                op[d * out.stride(3)] = from_float<Out>(rotated[d]);
              }
              for (int64_t d = rot; d < dim; ++d) op[d * out.stride(3)] = from_float<Out>(x(d));
            }
          }
        }
      });
    });
  });
}

}  // namespace turbomoe::rope
