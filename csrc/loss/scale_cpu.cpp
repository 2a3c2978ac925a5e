// CPU reference of tm_scale_unless_one.
#include "common/numeric.h"
#include "loss/loss.h"

namespace turbomoe::loss {

void scale_unless_one_cpu(const Arg& scale, const Arg& x) {
  const float s = *scale.ptr<const float>();
  if (s == 1.0f) return;
  dispatch_floating(x.dtype(), [&](auto tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    T* p = x.ptr<T>();
    const float rounded = to_float(from_float<T>(s));
    for (int64_t i = 0; i < x.numel(); ++i) p[i] = from_float<T>(to_float(p[i]) * rounded);
  });
}

}  // namespace turbomoe::loss
