// The AdamW step against a double-precision AdamW over several steps, for each dtype mix, and
// every argument error.
#include <cmath>
#include <tuple>
#include <vector>

#include "common/test_util.h"

namespace {

using turbomoe::testing::HostTensor;
using turbomoe::testing::rel_error;

tm_adamw_params params(int64_t step, double weight_decay) {
  tm_adamw_params p{};
  p.struct_size = sizeof p;
  p.lr = 5e-2;
  p.beta1 = 0.9;
  p.beta2 = 0.95;
  p.eps = 1e-8;
  p.weight_decay = weight_decay;
  p.step = step;
  return p;
}

// x as stored in a tensor of `dtype`.
double stored(int32_t dtype, double x) {
  const float f = static_cast<float>(x);
  if (dtype != TM_DTYPE_BFLOAT16) return f;
  return turbomoe::testing::bf16_bits_to_float(turbomoe::testing::float_to_bf16_bits(f));
}

std::vector<double> values(const HostTensor& t) {
  std::vector<double> out(static_cast<size_t>(t.numel()));
  for (int64_t i = 0; i < t.numel(); ++i) out[static_cast<size_t>(i)] = t.get(i);
  return out;
}

// (param dtype, grad dtype, moment dtype, weight decay)
class AdamwTest : public ::testing::TestWithParam<std::tuple<int32_t, int32_t, int32_t, double>> {};

TEST_P(AdamwTest, MatchesDoubleAdamwOverSteps) {
  const auto [p_dtype, g_dtype, s_dtype, weight_decay] = GetParam();
  auto rng = turbomoe::testing::rng_for_test();
  for (int64_t n : {int64_t{1}, int64_t{7}, int64_t{1000}}) {
    HostTensor param({n}, p_dtype), grad({n}, g_dtype), m({n}, s_dtype), v({n}, s_dtype);
    param.fill_uniform(rng, -1, 1);
    const std::vector<double> initial = values(param);
    std::vector<double> ref_p = initial, ref_m(static_cast<size_t>(n), 0.0),
                        ref_v(static_cast<size_t>(n), 0.0);
    for (int64_t step = 1; step <= 5; ++step) {
      grad.fill_uniform(rng, -2, 2);
      const tm_adamw_params p = params(step, weight_decay);
      TM_ASSERT_OK(
          tm_adamw_step(&p, param.desc(), grad.desc(), m.desc(), v.desc(), nullptr, nullptr));
      // In double, each stored value rounded to its tensor's dtype as the step stores it.
      for (int64_t i = 0; i < n; ++i) {
        const auto k = static_cast<size_t>(i);
        const double g = grad.get(i);
        const double m_new = p.beta1 * ref_m[k] + (1 - p.beta1) * g;
        const double v_new = p.beta2 * ref_v[k] + (1 - p.beta2) * g * g;
        const double m_hat = m_new / (1 - std::pow(p.beta1, step));
        const double v_hat = v_new / (1 - std::pow(p.beta2, step));
        const double w =
            ref_p[k] * (1 - p.lr * p.weight_decay) - p.lr * m_hat / (std::sqrt(v_hat) + p.eps);
        ref_m[k] = stored(s_dtype, m_new);
        ref_v[k] = stored(s_dtype, v_new);
        ref_p[k] = stored(p_dtype, w);
      }
    }
    // float32 arithmetic against double: a value near a bf16 rounding boundary may land one
    // unit (2^-8 relative) away, hence the looser bf16 bound.
    const double tol_p = p_dtype == TM_DTYPE_BFLOAT16 ? 2e-3 : 1e-5;
    const double tol_s = s_dtype == TM_DTYPE_BFLOAT16 ? 2e-3 : 1e-5;
    EXPECT_LT(rel_error(values(param), ref_p), tol_p) << "n=" << n;
    EXPECT_LT(rel_error(values(m), ref_m), tol_s) << "n=" << n;
    EXPECT_LT(rel_error(values(v), ref_v), tol_s) << "n=" << n;
    // Five steps of lr 5e-2 move the parameters by several percent: far beyond the bounds above.
    EXPECT_GT(rel_error(values(param), initial), 1e-2) << "n=" << n;
  }
}

INSTANTIATE_TEST_SUITE_P(Dtypes, AdamwTest,
                         ::testing::Combine(::testing::Values(TM_DTYPE_FLOAT32, TM_DTYPE_BFLOAT16),
                                            ::testing::Values(TM_DTYPE_FLOAT32, TM_DTYPE_BFLOAT16),
                                            ::testing::Values(TM_DTYPE_FLOAT32, TM_DTYPE_BFLOAT16),
                                            ::testing::Values(0.0, 0.1)));

TEST(Adamw, FirstStepMovesEachParameterByLearningRateTimesSign) {
  // At step 1 the bias-corrected m / sqrt(v) is g / |g|: every parameter moves by lr against its
  // gradient's sign (eps aside), whatever the gradient's size.
  HostTensor param({4}, TM_DTYPE_FLOAT32), grad({4}, TM_DTYPE_FLOAT32);
  HostTensor m({4}, TM_DTYPE_FLOAT32), v({4}, TM_DTYPE_FLOAT32);
  const double g[4] = {3.0, -0.01, 250.0, -7.5};
  for (int i = 0; i < 4; ++i) {
    param.set(i, 1.0);
    grad.set(i, g[i]);
  }
  const tm_adamw_params p = params(1, 0.0);
  TM_ASSERT_OK(tm_adamw_step(&p, param.desc(), grad.desc(), m.desc(), v.desc(), nullptr, nullptr));
  for (int i = 0; i < 4; ++i) {
    EXPECT_NEAR(param.get(i), 1.0 - p.lr * (g[i] > 0 ? 1 : -1), 1e-6) << i;
    EXPECT_NEAR(m.get(i), 0.1 * g[i], 1e-5 * std::abs(g[i])) << i;
    EXPECT_NEAR(v.get(i), 0.05 * g[i] * g[i], 1e-5 * g[i] * g[i]) << i;
  }
}

TEST(Adamw, GradScaleMultipliesTheGradient) {
  // With grad_scale s the step equals the step on s * grad (the clipping factor, read on the
  // tensors' device instead of a pass that rescales the gradients).
  auto rng = turbomoe::testing::rng_for_test();
  HostTensor p1({64}, TM_DTYPE_FLOAT32), g1({64}, TM_DTYPE_FLOAT32), m1({64}, TM_DTYPE_FLOAT32),
      v1({64}, TM_DTYPE_FLOAT32);
  HostTensor p2({64}, TM_DTYPE_FLOAT32), g2({64}, TM_DTYPE_FLOAT32), m2({64}, TM_DTYPE_FLOAT32),
      v2({64}, TM_DTYPE_FLOAT32), scale({}, TM_DTYPE_FLOAT32);
  p1.fill_uniform(rng, -1, 1);
  scale.set(0, 0.25);
  for (int64_t step = 1; step <= 3; ++step) {
    g1.fill_uniform(rng, -3, 3);
    for (int64_t i = 0; i < 64; ++i) {
      if (step == 1) p2.set(i, p1.get(i));
      g2.set(i, static_cast<double>(static_cast<float>(g1.get(i)) * 0.25f));
    }
    const tm_adamw_params p = params(step, 0.1);
    TM_ASSERT_OK(
        tm_adamw_step(&p, p1.desc(), g1.desc(), m1.desc(), v1.desc(), scale.desc(), nullptr));
    TM_ASSERT_OK(tm_adamw_step(&p, p2.desc(), g2.desc(), m2.desc(), v2.desc(), nullptr, nullptr));
  }
  for (int64_t i = 0; i < 64; ++i) {
    EXPECT_EQ(p1.get(i), p2.get(i)) << i;
    EXPECT_EQ(m1.get(i), m2.get(i)) << i;
    EXPECT_EQ(v1.get(i), v2.get(i)) << i;
  }
  // A scale that is not one float32 value.
  HostTensor two({2}, TM_DTYPE_FLOAT32), half_scale({}, TM_DTYPE_BFLOAT16);
  const tm_adamw_params p = params(4, 0.1);
  TM_EXPECT_ERROR(
      tm_adamw_step(&p, p1.desc(), g1.desc(), m1.desc(), v1.desc(), two.desc(), nullptr),
      TM_ERR_INVALID_ARGUMENT, "grad_scale");
  TM_EXPECT_ERROR(
      tm_adamw_step(&p, p1.desc(), g1.desc(), m1.desc(), v1.desc(), half_scale.desc(), nullptr),
      TM_ERR_INVALID_ARGUMENT, "grad_scale");
}

TEST(Adamw, RejectsBadArguments) {
  HostTensor param({8}, TM_DTYPE_FLOAT32), grad({8}, TM_DTYPE_FLOAT32);
  HostTensor m({8}, TM_DTYPE_FLOAT32), v({8}, TM_DTYPE_FLOAT32), v16({8}, TM_DTYPE_BFLOAT16);
  HostTensor short_grad({7}, TM_DTYPE_FLOAT32), half({8}, TM_DTYPE_FLOAT16);
  tm_adamw_params p = params(1, 0.0);
  TM_EXPECT_ERROR(
      tm_adamw_step(nullptr, param.desc(), grad.desc(), m.desc(), v.desc(), nullptr, nullptr),
      TM_ERR_INVALID_ARGUMENT, "params");
  p.step = 0;
  TM_EXPECT_ERROR(
      tm_adamw_step(&p, param.desc(), grad.desc(), m.desc(), v.desc(), nullptr, nullptr),
      TM_ERR_INVALID_ARGUMENT, "step");
  p = params(1, 0.0);
  p.beta2 = 1.0;
  TM_EXPECT_ERROR(
      tm_adamw_step(&p, param.desc(), grad.desc(), m.desc(), v.desc(), nullptr, nullptr),
      TM_ERR_INVALID_ARGUMENT, "beta");
  p = params(1, 0.0);
  p.lr = NAN;
  TM_EXPECT_ERROR(
      tm_adamw_step(&p, param.desc(), grad.desc(), m.desc(), v.desc(), nullptr, nullptr),
      TM_ERR_INVALID_ARGUMENT, "lr");
  p = params(1, 0.0);
  TM_EXPECT_ERROR(
      tm_adamw_step(&p, param.desc(), short_grad.desc(), m.desc(), v.desc(), nullptr, nullptr),
      TM_ERR_INVALID_ARGUMENT, "grad");
  TM_EXPECT_ERROR(
      tm_adamw_step(&p, param.desc(), grad.desc(), m.desc(), v16.desc(), nullptr, nullptr),
      TM_ERR_INVALID_ARGUMENT, "exp_avg_sq");
  TM_EXPECT_ERROR(tm_adamw_step(&p, half.desc(), grad.desc(), m.desc(), v.desc(), nullptr, nullptr),
                  TM_ERR_INVALID_ARGUMENT, "param");
  // Two moments in one buffer.
  TM_EXPECT_ERROR(
      tm_adamw_step(&p, param.desc(), grad.desc(), m.desc(), m.desc(), nullptr, nullptr),
      TM_ERR_INVALID_ARGUMENT, "share memory");
  // A strided view.
  tm_tensor strided = *param.desc();
  strided.sizes[0] = 4;
  strided.strides[0] = 2;
  HostTensor g4({4}, TM_DTYPE_FLOAT32), m4({4}, TM_DTYPE_FLOAT32), v4({4}, TM_DTYPE_FLOAT32);
  TM_EXPECT_ERROR(tm_adamw_step(&p, &strided, g4.desc(), m4.desc(), v4.desc(), nullptr, nullptr),
                  TM_ERR_INVALID_ARGUMENT, "param");
}

}  // namespace
