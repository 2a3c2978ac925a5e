// SwiGLU and clamped SwiGLU against double-precision loops, gradients against finite
// differences, and every argument error.
#include <cmath>

#include "common/test_util.h"

namespace {

using turbomoe::testing::HostTensor;
using turbomoe::testing::rel_error;

double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

double reference(const tm_swiglu_params& p, double g, double u) {
  if (p.variant == TM_SWIGLU_CLAMPED) {
    const double gc = std::min(g, static_cast<double>(p.limit));
    const double uc = std::clamp(u, -static_cast<double>(p.limit), static_cast<double>(p.limit));
    return (uc + 1.0) * gc * sigmoid(p.alpha * gc);
  }
  return g * sigmoid(g) * u;
}

tm_swiglu_params params(int variant) {
  tm_swiglu_params p{};
  p.struct_size = sizeof p;
  p.variant = variant;
  p.alpha = 1.702f;
  p.limit = 7.0f;
  return p;
}

class SwigluTest : public ::testing::TestWithParam<std::tuple<int, int32_t>> {};

TEST_P(SwigluTest, ForwardMatchesDoubleReference) {
  const auto [variant, dtype] = GetParam();
  auto rng = turbomoe::testing::rng_for_test();
  const tm_swiglu_params p = params(variant);
  for (auto [rows, cols] : {std::pair{13, 72}, std::pair{1, 1}, std::pair{64, 33}}) {
    HostTensor g({rows, cols}, dtype), u({rows, cols}, dtype), o({rows, cols}, dtype);
    g.fill_uniform(rng, -9, 9);
    u.fill_uniform(rng, -9, 9);
    o.poison();
    TM_ASSERT_OK(tm_swiglu_forward(&p, g.desc(), u.desc(), o.desc(), nullptr));
    std::vector<double> ref(static_cast<size_t>(g.numel()));
    for (int64_t i = 0; i < g.numel(); ++i) ref[i] = reference(p, g.get(i), u.get(i));
    EXPECT_LT(rel_error(o.values(), ref), dtype == TM_DTYPE_FLOAT32 ? 1e-6 : 1e-2);
  }
}

TEST_P(SwigluTest, BackwardMatchesFiniteDifferences) {
  const auto [variant, dtype] = GetParam();
  auto rng = turbomoe::testing::rng_for_test();
  const tm_swiglu_params p = params(variant);
  const int64_t rows = 7, cols = 9;
  HostTensor g({rows, cols}, dtype), u({rows, cols}, dtype), go({rows, cols}, dtype);
  HostTensor dg({rows, cols}, dtype), du({rows, cols}, dtype);
  g.fill_uniform(rng, -9, 9);
  u.fill_uniform(rng, -9, 9);
  go.fill_uniform(rng);
  dg.poison();
  du.poison();
  TM_ASSERT_OK(
      tm_swiglu_backward(&p, go.desc(), g.desc(), u.desc(), dg.desc(), du.desc(), nullptr));
  std::vector<double> ref_dg(g.numel()), ref_du(g.numel());
  const double h = 1e-5;
  for (int64_t i = 0; i < g.numel(); ++i) {
    const double gi = g.get(i), ui = u.get(i);
    ref_dg[i] = go.get(i) * (reference(p, gi + h, ui) - reference(p, gi - h, ui)) / (2 * h);
    ref_du[i] = go.get(i) * (reference(p, gi, ui + h) - reference(p, gi, ui - h)) / (2 * h);
  }
  // The differences are taken in double at the (possibly bf16-rounded) stored inputs.
  const double tol = dtype == TM_DTYPE_FLOAT32 ? 1e-4 : 1e-2;
  EXPECT_LT(rel_error(dg.values(), ref_dg), tol);
  EXPECT_LT(rel_error(du.values(), ref_du), tol);
}

INSTANTIATE_TEST_SUITE_P(Variants, SwigluTest,
                         ::testing::Combine(::testing::Values(TM_SWIGLU_SILU, TM_SWIGLU_CLAMPED),
                                            ::testing::Values(TM_DTYPE_FLOAT32,
                                                              TM_DTYPE_BFLOAT16)));

TEST(Swiglu, ReadsStridedHalvesOfAFusedBuffer) {
  auto rng = turbomoe::testing::rng_for_test();
  const tm_swiglu_params p = params(TM_SWIGLU_SILU);
  const int64_t rows = 5, inter = 6;
  HostTensor fused({rows, 2 * inter}, TM_DTYPE_FLOAT32), out({rows, inter}, TM_DTYPE_FLOAT32);
  fused.fill_uniform(rng);
  out.poison();
  tm_tensor gate = *fused.desc(), up = *fused.desc();
  gate.sizes[1] = up.sizes[1] = inter;
  up.data = static_cast<float*>(fused.desc()->data) + inter;
  TM_ASSERT_OK(tm_swiglu_forward(&p, &gate, &up, out.desc(), nullptr));
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < inter; ++c) {
      const double ref =
          reference(p, fused.get(r * 2 * inter + c), fused.get(r * 2 * inter + inter + c));
      EXPECT_NEAR(out.get(r * inter + c), ref, 1e-6);
    }
  }
}

TEST(Swiglu, RejectsBadArguments) {
  tm_swiglu_params p = params(TM_SWIGLU_SILU);
  HostTensor g({4, 8}, TM_DTYPE_FLOAT32), u({4, 8}, TM_DTYPE_FLOAT32), o({4, 8}, TM_DTYPE_FLOAT32);
  HostTensor wrong_shape({4, 7}, TM_DTYPE_FLOAT32), ints({4, 8}, TM_DTYPE_INT32);
  HostTensor bf({4, 8}, TM_DTYPE_BFLOAT16), rank3({4, 8, 1}, TM_DTYPE_FLOAT32);
  TM_EXPECT_ERROR(tm_swiglu_forward(nullptr, g.desc(), u.desc(), o.desc(), nullptr),
                  TM_ERR_INVALID_ARGUMENT, "params");
  TM_EXPECT_ERROR(tm_swiglu_forward(&p, nullptr, u.desc(), o.desc(), nullptr),
                  TM_ERR_INVALID_ARGUMENT, "gate");
  TM_EXPECT_ERROR(tm_swiglu_forward(&p, g.desc(), wrong_shape.desc(), o.desc(), nullptr),
                  TM_ERR_INVALID_ARGUMENT, "up");
  TM_EXPECT_ERROR(tm_swiglu_forward(&p, g.desc(), u.desc(), ints.desc(), nullptr),
                  TM_ERR_INVALID_ARGUMENT, "out");
  TM_EXPECT_ERROR(tm_swiglu_forward(&p, g.desc(), bf.desc(), o.desc(), nullptr),
                  TM_ERR_INVALID_ARGUMENT, "up");
  TM_EXPECT_ERROR(tm_swiglu_forward(&p, rank3.desc(), u.desc(), o.desc(), nullptr),
                  TM_ERR_INVALID_ARGUMENT, "gate");
  tm_tensor null_data = *g.desc();
  null_data.data = nullptr;
  TM_EXPECT_ERROR(tm_swiglu_forward(&p, &null_data, u.desc(), o.desc(), nullptr),
                  TM_ERR_INVALID_ARGUMENT, "gate");
  tm_tensor bad_dtype = *g.desc();
  bad_dtype.dtype = 99;
  TM_EXPECT_ERROR(tm_swiglu_forward(&p, &bad_dtype, u.desc(), o.desc(), nullptr),
                  TM_ERR_INVALID_ARGUMENT, "gate");
  tm_tensor on_cuda = *o.desc();
  on_cuda.device_type = TM_DEVICE_CUDA;
  TM_EXPECT_ERROR(tm_swiglu_forward(&p, g.desc(), u.desc(), &on_cuda, nullptr),
                  TM_ERR_INVALID_ARGUMENT, "device");
  p.struct_size = 3;
  TM_EXPECT_ERROR(tm_swiglu_forward(&p, g.desc(), u.desc(), o.desc(), nullptr),
                  TM_ERR_INVALID_ARGUMENT, "struct_size");
  p = params(42);
  TM_EXPECT_ERROR(tm_swiglu_forward(&p, g.desc(), u.desc(), o.desc(), nullptr),
                  TM_ERR_INVALID_ARGUMENT, "variant");
  p = params(TM_SWIGLU_SILU);
  TM_EXPECT_ERROR(tm_swiglu_backward(&p, g.desc(), g.desc(), u.desc(), o.desc(), nullptr, nullptr),
                  TM_ERR_INVALID_ARGUMENT, "grad_up");
}

TEST(Swiglu, ZeroRowsIsANoOp) {
  const tm_swiglu_params p = params(TM_SWIGLU_SILU);
  HostTensor g({0, 8}, TM_DTYPE_FLOAT32), u({0, 8}, TM_DTYPE_FLOAT32), o({0, 8}, TM_DTYPE_FLOAT32);
  TM_ASSERT_OK(tm_swiglu_forward(&p, g.desc(), u.desc(), o.desc(), nullptr));
}

}  // namespace
