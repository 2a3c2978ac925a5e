// CPU reference of the AdamW step: one pass over the flat tensors.
#include "common/numeric.h"
#include "optim/adamw.h"

namespace turbomoe::optim {

void adamw_cpu(const AdamwConstants& c, const Arg& param, const Arg& grad, const Arg& exp_avg,
               const Arg& exp_avg_sq, const float* grad_scale) {
  const int64_t n = param.numel();
  const float scale = grad_scale != nullptr ? *grad_scale : 1.0f;
  dispatch_floating(param.dtype(), [&](auto p_tag) {
    using P = decltype(p_tag);
    dispatch_floating(grad.dtype(), [&](auto g_tag) {
      using G = decltype(g_tag);
      dispatch_floating(exp_avg.dtype(), [&](auto s_tag) {
        using S = decltype(s_tag);
        P* p = param.ptr<P>();
        const G* g = grad.ptr<const G>();
        S* m = exp_avg.ptr<S>();
        S* v = exp_avg_sq.ptr<S>();
        for (int64_t i = 0; i < n; ++i) {
          float mi = to_float(m[i]), vi = to_float(v[i]);
          const float gi = grad_scale != nullptr ? to_float(g[i]) * scale : to_float(g[i]);
          const float w = adamw_element(c, to_float(p[i]), gi, mi, vi);
          m[i] = from_float<S>(mi);
          v[i] = from_float<S>(vi);
          p[i] = from_float<P>(w);
        }
      });
    });
  });
}

}  // namespace turbomoe::optim
