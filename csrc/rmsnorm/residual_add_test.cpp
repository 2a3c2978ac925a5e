// The residual add fused with RMSNorm (tm_add_rmsnorm_forward) and the residual gradient fused
// with its backward (tm_rmsnorm_backward_add): bitwise the unfused ops followed or preceded by the
// add, with padded rows, and every argument error of the new arguments.
#include <cmath>
#include <optional>
#include <vector>

#include "common/test_util.h"

namespace {

using turbomoe::testing::HostTensor;

constexpr float kEps = 1e-6f;

// out[i] = a[i] + b[i], rounded to out's dtype as a torch add of two tensors of that dtype.
void add_into(const HostTensor& a, const HostTensor& b, HostTensor& out) {
  for (int64_t i = 0; i < out.numel(); ++i) out.set(i, a.get(i) + b.get(i));
}

tm_tensor padded_rows(HostTensor& t, int64_t cols) {
  tm_tensor d = *t.desc();
  d.sizes[1] = cols;
  return d;
}

class ResidualAddTest : public ::testing::TestWithParam<std::tuple<int32_t, int32_t>> {};

TEST_P(ResidualAddTest, ForwardIsTheAddThenTheNorm) {
  const auto [dtype, w_dtype] = GetParam();
  auto rng = turbomoe::testing::rng_for_test();
  for (auto [rows, hidden] : {std::pair{13, 72}, std::pair{1, 1}, std::pair{5, 1000}}) {
    HostTensor x({rows, hidden}, dtype), res({rows, hidden}, dtype), w({hidden}, w_dtype);
    x.fill_uniform(rng, -3, 3);
    res.fill_uniform(rng, -3, 3);
    w.fill_uniform(rng, 0.5, 1.5);
    HostTensor sum({rows, hidden}, dtype), y({rows, hidden}, dtype), rstd({rows}, TM_DTYPE_FLOAT32);
    sum.poison();
    y.poison();
    rstd.poison();
    TM_ASSERT_OK(tm_add_rmsnorm_forward(x.desc(), res.desc(), w.desc(), kEps, sum.desc(), y.desc(),
                                        rstd.desc(), nullptr));
    HostTensor want_sum({rows, hidden}, dtype), want_y({rows, hidden}, dtype);
    HostTensor want_rstd({rows}, TM_DTYPE_FLOAT32);
    add_into(x, res, want_sum);
    TM_ASSERT_OK(tm_rmsnorm_forward(want_sum.desc(), w.desc(), kEps, want_y.desc(),
                                    want_rstd.desc(), nullptr));
    EXPECT_EQ(sum.values(), want_sum.values()) << rows << "x" << hidden;
    EXPECT_EQ(y.values(), want_y.values()) << rows << "x" << hidden;
    EXPECT_EQ(rstd.values(), want_rstd.values()) << rows << "x" << hidden;
  }
}

TEST_P(ResidualAddTest, BackwardIsTheBackwardThenTheAdd) {
  const auto [dtype, w_dtype] = GetParam();
  auto rng = turbomoe::testing::rng_for_test();
  const int64_t rows = 13, hidden = 72;
  HostTensor x({rows, hidden}, dtype), gy({rows, hidden}, dtype), w({hidden}, w_dtype);
  HostTensor y({rows, hidden}, dtype), rstd({rows}, TM_DTYPE_FLOAT32);
  HostTensor g_res({rows, hidden}, dtype);
  x.fill_uniform(rng, -3, 3);
  gy.fill_uniform(rng);
  w.fill_uniform(rng, 0.5, 1.5);
  g_res.fill_uniform(rng);
  TM_ASSERT_OK(tm_rmsnorm_forward(x.desc(), w.desc(), kEps, y.desc(), rstd.desc(), nullptr));
  HostTensor gx({rows, hidden}, dtype), gw({hidden}, TM_DTYPE_FLOAT32);
  gx.poison();
  gw.poison();
  TM_ASSERT_OK(tm_rmsnorm_backward_add(gy.desc(), x.desc(), w.desc(), rstd.desc(), g_res.desc(),
                                       gx.desc(), gw.desc(), nullptr, 0, nullptr));
  HostTensor norm_gx({rows, hidden}, dtype), want_gx({rows, hidden}, dtype);
  HostTensor want_gw({hidden}, TM_DTYPE_FLOAT32);
  TM_ASSERT_OK(tm_rmsnorm_backward(gy.desc(), x.desc(), w.desc(), rstd.desc(), norm_gx.desc(),
                                   want_gw.desc(), nullptr, 0, nullptr));
  add_into(norm_gx, g_res, want_gx);
  EXPECT_EQ(gx.values(), want_gx.values());
  EXPECT_EQ(gw.values(), want_gw.values());
  // Without a residual gradient it is tm_rmsnorm_backward.
  HostTensor plain_gx({rows, hidden}, dtype);
  plain_gx.poison();
  TM_ASSERT_OK(tm_rmsnorm_backward_add(gy.desc(), x.desc(), w.desc(), rstd.desc(), nullptr,
                                       plain_gx.desc(), nullptr, nullptr, 0, nullptr));
  EXPECT_EQ(plain_gx.values(), norm_gx.values());
}

INSTANTIATE_TEST_SUITE_P(ResidualAdd, ResidualAddTest,
                         ::testing::Combine(::testing::Values(TM_DTYPE_FLOAT32, TM_DTYPE_BFLOAT16),
                                            ::testing::Values(TM_DTYPE_FLOAT32,
                                                              TM_DTYPE_BFLOAT16)));

TEST(ResidualAdd, PaddedRows) {
  auto rng = turbomoe::testing::rng_for_test();
  const int64_t rows = 7, hidden = 40;
  const int32_t bf16 = TM_DTYPE_BFLOAT16;
  HostTensor x({rows, hidden + 8}, bf16), res({rows, hidden + 16}, bf16), w({hidden}, bf16);
  HostTensor sum({rows, hidden + 3}, bf16), y({rows, hidden + 5}, bf16);
  x.fill_uniform(rng, -3, 3);
  res.fill_uniform(rng, -3, 3);
  w.fill_uniform(rng, 0.5, 1.5);
  sum.poison();
  y.poison();
  tm_tensor xd = padded_rows(x, hidden), rd = padded_rows(res, hidden);
  tm_tensor sd = padded_rows(sum, hidden), yd = padded_rows(y, hidden);
  TM_ASSERT_OK(tm_add_rmsnorm_forward(&xd, &rd, w.desc(), kEps, &sd, &yd, nullptr, nullptr));
  HostTensor want_sum({rows, hidden}, bf16), want_y({rows, hidden}, bf16);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < hidden; ++c) {
      want_sum.set(r * hidden + c, x.get(r * (hidden + 8) + c) + res.get(r * (hidden + 16) + c));
    }
  }
  TM_ASSERT_OK(
      tm_rmsnorm_forward(want_sum.desc(), w.desc(), kEps, want_y.desc(), nullptr, nullptr));
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < hidden; ++c) {
      EXPECT_EQ(sum.get(r * (hidden + 3) + c), want_sum.get(r * hidden + c));
      EXPECT_EQ(y.get(r * (hidden + 5) + c), want_y.get(r * hidden + c));
    }
    for (int64_t c = hidden; c < hidden + 3; ++c)
      EXPECT_TRUE(std::isnan(sum.get(r * (hidden + 3) + c)));
  }
}

TEST(ResidualAdd, ForwardRejectsBadArguments) {
  const int32_t f32 = TM_DTYPE_FLOAT32;
  HostTensor x({4, 8}, f32), res({4, 8}, f32), sum({4, 8}, f32), y({4, 8}, f32), w({8}, f32);
  HostTensor res_bf16({4, 8}, TM_DTYPE_BFLOAT16), res_short({3, 8}, f32);
  HostTensor sum_bf16({4, 8}, TM_DTYPE_BFLOAT16);
  auto fwd = [&](const tm_tensor* xa, const tm_tensor* ra, tm_tensor* sa, tm_tensor* ya) {
    return tm_add_rmsnorm_forward(xa, ra, w.desc(), kEps, sa, ya, nullptr, nullptr);
  };
  TM_EXPECT_ERROR(fwd(x.desc(), nullptr, sum.desc(), y.desc()), TM_ERR_INVALID_ARGUMENT,
                  "residual");
  TM_EXPECT_ERROR(fwd(x.desc(), res.desc(), nullptr, y.desc()), TM_ERR_INVALID_ARGUMENT, "sum");
  TM_EXPECT_ERROR(fwd(x.desc(), res_bf16.desc(), sum.desc(), y.desc()), TM_ERR_INVALID_ARGUMENT,
                  "residual");
  TM_EXPECT_ERROR(fwd(x.desc(), res_short.desc(), sum.desc(), y.desc()), TM_ERR_INVALID_ARGUMENT,
                  "residual");
  TM_EXPECT_ERROR(fwd(x.desc(), res.desc(), sum_bf16.desc(), y.desc()), TM_ERR_INVALID_ARGUMENT,
                  "sum");
  // In place into an input, or both outputs in one buffer: refused, nothing written.
  TM_EXPECT_ERROR(fwd(x.desc(), res.desc(), x.desc(), y.desc()), TM_ERR_INVALID_ARGUMENT,
                  "sum overlaps x");
  TM_EXPECT_ERROR(fwd(x.desc(), res.desc(), sum.desc(), res.desc()), TM_ERR_INVALID_ARGUMENT,
                  "y overlaps residual");
  TM_EXPECT_ERROR(fwd(x.desc(), res.desc(), sum.desc(), sum.desc()), TM_ERR_INVALID_ARGUMENT,
                  "y overlaps sum");
  tm_tensor res_cuda = *res.desc();
  res_cuda.device_type = TM_DEVICE_CUDA;
  TM_EXPECT_ERROR(fwd(x.desc(), &res_cuda, sum.desc(), y.desc()), TM_ERR_INVALID_ARGUMENT,
                  "device");
}

TEST(ResidualAdd, BackwardRejectsBadArguments) {
  const int32_t f32 = TM_DTYPE_FLOAT32;
  HostTensor x({4, 8}, f32), gy({4, 8}, f32), gx({4, 8}, f32), w({8}, f32), rstd({4}, f32);
  HostTensor g_res({4, 8}, f32), g_res_bf16({4, 8}, TM_DTYPE_BFLOAT16), g_res_long({5, 8}, f32);
  auto bwd = [&](const tm_tensor* gr, tm_tensor* gxa) {
    return tm_rmsnorm_backward_add(gy.desc(), x.desc(), w.desc(), rstd.desc(), gr, gxa, nullptr,
                                   nullptr, 0, nullptr);
  };
  TM_EXPECT_ERROR(bwd(g_res_bf16.desc(), gx.desc()), TM_ERR_INVALID_ARGUMENT, "grad_residual");
  TM_EXPECT_ERROR(bwd(g_res_long.desc(), gx.desc()), TM_ERR_INVALID_ARGUMENT, "grad_residual");
  TM_EXPECT_ERROR(bwd(g_res.desc(), g_res.desc()), TM_ERR_INVALID_ARGUMENT,
                  "grad_x overlaps grad_residual");
}

}  // namespace
