// The fused q/k RMSNorm + RoPE against the two ops it replaces, called one after the other
// through the C ABI (bitwise: same arithmetic, same roundings in between), its determinism, and
// every argument error.
#include <cstring>
#include <vector>

#include "common/test_util.h"

namespace {

using turbomoe::testing::HostTensor;

constexpr float kEps = 1e-6f;

struct Shape {
  int64_t batch, seq, heads, dim;
  int32_t dtype;       // x, y, weight, grad_x
  int32_t cs_dtype;    // cos, sin
  int32_t grad_dtype;  // grad_y
  bool broadcast;      // cos/sin of batch 1
  int64_t rows() const { return batch * seq * heads; }
};

// A [B,NH,S,D] view of a contiguous [B,S,NH,D] tensor: the layout the attention hands RoPE.
tm_tensor heads_first(HostTensor& t) {
  tm_tensor d = *t.desc();
  const int64_t b = d.sizes[0], s = d.sizes[1], h = d.sizes[2], dim = d.sizes[3];
  const int64_t sizes[4] = {b, h, s, dim};
  const int64_t strides[4] = {s * h * dim, dim, h * dim, 1};
  for (int i = 0; i < 4; ++i) {
    d.sizes[i] = sizes[i];
    d.strides[i] = strides[i];
  }
  return d;
}

// The [B*S*NH, D] rows of a contiguous [B,S,NH,D] tensor.
tm_tensor rows_view(HostTensor& t) {
  tm_tensor d = *t.desc();
  d.ndim = 2;
  d.sizes[0] = t.sizes()[0] * t.sizes()[1] * t.sizes()[2];
  d.sizes[1] = t.sizes()[3];
  d.strides[0] = t.sizes()[3];
  d.strides[1] = 1;
  return d;
}

struct Inputs {
  HostTensor x, w, cos, sin, grad_y;
};

Inputs make_inputs(const Shape& s, std::mt19937_64& rng) {
  Inputs in{HostTensor({s.batch, s.seq, s.heads, s.dim}, s.dtype), HostTensor({s.dim}, s.dtype),
            HostTensor({s.broadcast ? 1 : s.batch, s.seq, s.dim}, s.cs_dtype),
            HostTensor({s.broadcast ? 1 : s.batch, s.seq, s.dim}, s.cs_dtype),
            HostTensor({s.batch, s.seq, s.heads, s.dim}, s.grad_dtype)};
  in.x.fill_uniform(rng, -3, 3);
  in.w.fill_uniform(rng, 0.5, 1.5);
  in.cos.fill_uniform(rng);
  in.sin.fill_uniform(rng);
  in.grad_y.fill_uniform(rng);
  return in;
}

class QkNormRopeTest : public ::testing::TestWithParam<Shape> {};

TEST_P(QkNormRopeTest, ForwardIsRmsNormThenRope) {
  const Shape s = GetParam();
  auto rng = turbomoe::testing::rng_for_test();
  Inputs in = make_inputs(s, rng);
  HostTensor y({s.batch, s.seq, s.heads, s.dim}, s.dtype), rstd({s.rows()}, TM_DTYPE_FLOAT32);
  y.poison();
  rstd.poison();
  TM_ASSERT_OK(tm_qk_norm_rope_forward(in.x.desc(), in.w.desc(), kEps, in.cos.desc(), in.sin.desc(),
                                       y.desc(), rstd.desc(), nullptr));

  HostTensor normed({s.batch, s.seq, s.heads, s.dim}, s.dtype),
      want({s.batch, s.seq, s.heads, s.dim}, s.dtype);
  HostTensor want_rstd({s.rows()}, TM_DTYPE_FLOAT32);
  tm_tensor x_rows = rows_view(in.x), normed_rows = rows_view(normed);
  TM_ASSERT_OK(
      tm_rmsnorm_forward(&x_rows, in.w.desc(), kEps, &normed_rows, want_rstd.desc(), nullptr));
  const tm_rope_params params{sizeof(tm_rope_params), 0};
  tm_tensor normed_heads = heads_first(normed), want_heads = heads_first(want);
  TM_ASSERT_OK(
      tm_rope_forward(&params, &normed_heads, in.cos.desc(), in.sin.desc(), &want_heads, nullptr));
  EXPECT_EQ(y.values(), want.values());
  EXPECT_EQ(rstd.values(), want_rstd.values());
}

TEST_P(QkNormRopeTest, BackwardIsRopeBackwardThenRmsNormBackward) {
  const Shape s = GetParam();
  auto rng = turbomoe::testing::rng_for_test();
  Inputs in = make_inputs(s, rng);
  HostTensor y({s.batch, s.seq, s.heads, s.dim}, s.dtype), rstd({s.rows()}, TM_DTYPE_FLOAT32);
  TM_ASSERT_OK(tm_qk_norm_rope_forward(in.x.desc(), in.w.desc(), kEps, in.cos.desc(), in.sin.desc(),
                                       y.desc(), rstd.desc(), nullptr));
  HostTensor gx({s.batch, s.seq, s.heads, s.dim}, s.dtype), gw({s.dim}, TM_DTYPE_FLOAT32);
  gx.poison();
  gw.poison();
  TM_ASSERT_OK(tm_qk_norm_rope_backward(in.grad_y.desc(), in.x.desc(), in.w.desc(), rstd.desc(),
                                        in.cos.desc(), in.sin.desc(), gx.desc(), gw.desc(), nullptr,
                                        0, nullptr));

  HostTensor grad_normed({s.batch, s.seq, s.heads, s.dim}, s.grad_dtype);
  const tm_rope_params params{sizeof(tm_rope_params), 0};
  tm_tensor gy_heads = heads_first(in.grad_y), gn_heads = heads_first(grad_normed);
  TM_ASSERT_OK(
      tm_rope_backward(&params, &gy_heads, in.cos.desc(), in.sin.desc(), &gn_heads, nullptr));
  HostTensor want_gx({s.batch, s.seq, s.heads, s.dim}, s.dtype), want_gw({s.dim}, TM_DTYPE_FLOAT32);
  tm_tensor gn_rows = rows_view(grad_normed), x_rows = rows_view(in.x),
            gx_rows = rows_view(want_gx);
  TM_ASSERT_OK(tm_rmsnorm_backward(&gn_rows, &x_rows, in.w.desc(), rstd.desc(), &gx_rows,
                                   want_gw.desc(), nullptr, 0, nullptr));
  EXPECT_EQ(gx.values(), want_gx.values());
  EXPECT_EQ(gw.values(), want_gw.values());

  // Without a weight gradient the input gradient is the same.
  HostTensor gx_only({s.batch, s.seq, s.heads, s.dim}, s.dtype);
  TM_ASSERT_OK(tm_qk_norm_rope_backward(in.grad_y.desc(), in.x.desc(), in.w.desc(), rstd.desc(),
                                        in.cos.desc(), in.sin.desc(), gx_only.desc(), nullptr,
                                        nullptr, 0, nullptr));
  EXPECT_EQ(gx_only.values(), want_gx.values());
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, QkNormRopeTest,
    ::testing::Values(
        Shape{2, 5, 3, 128, TM_DTYPE_BFLOAT16, TM_DTYPE_BFLOAT16, TM_DTYPE_BFLOAT16, false},
        Shape{2, 5, 3, 128, TM_DTYPE_BFLOAT16, TM_DTYPE_FLOAT32, TM_DTYPE_BFLOAT16, true},
        Shape{1, 7, 2, 64, TM_DTYPE_FLOAT32, TM_DTYPE_FLOAT32, TM_DTYPE_FLOAT32, true},
        Shape{3, 4, 1, 256, TM_DTYPE_FLOAT32, TM_DTYPE_BFLOAT16, TM_DTYPE_BFLOAT16, false},
        Shape{1, 3, 4, 64, TM_DTYPE_BFLOAT16, TM_DTYPE_BFLOAT16, TM_DTYPE_FLOAT32, false}));

TEST(QkNormRope, WithoutWeight) {
  auto rng = turbomoe::testing::rng_for_test();
  const Shape s{1, 3, 2, 64, TM_DTYPE_FLOAT32, TM_DTYPE_FLOAT32, TM_DTYPE_FLOAT32, true};
  Inputs in = make_inputs(s, rng);
  HostTensor y({1, 3, 2, 64}, s.dtype), y_ones({1, 3, 2, 64}, s.dtype), ones({64}, s.dtype);
  HostTensor rstd({6}, TM_DTYPE_FLOAT32);
  for (int64_t i = 0; i < 64; ++i) ones.set(i, 1.0);
  TM_ASSERT_OK(tm_qk_norm_rope_forward(in.x.desc(), nullptr, kEps, in.cos.desc(), in.sin.desc(),
                                       y.desc(), rstd.desc(), nullptr));
  TM_ASSERT_OK(tm_qk_norm_rope_forward(in.x.desc(), ones.desc(), kEps, in.cos.desc(), in.sin.desc(),
                                       y_ones.desc(), rstd.desc(), nullptr));
  EXPECT_EQ(y.values(), y_ones.values());
  HostTensor gx({1, 3, 2, 64}, s.dtype), gw({64}, TM_DTYPE_FLOAT32);
  TM_EXPECT_ERROR(
      tm_qk_norm_rope_backward(in.grad_y.desc(), in.x.desc(), nullptr, rstd.desc(), in.cos.desc(),
                               in.sin.desc(), gx.desc(), gw.desc(), nullptr, 0, nullptr),
      TM_ERR_INVALID_ARGUMENT, "grad_weight must be NULL");
}

TEST(QkNormRope, ZeroRowsStillWriteTheWeightGradient) {
  HostTensor x({0, 3, 2, 64}, TM_DTYPE_FLOAT32), y({0, 3, 2, 64}, TM_DTYPE_FLOAT32);
  HostTensor w({64}, TM_DTYPE_FLOAT32), cos({1, 3, 64}, TM_DTYPE_FLOAT32);
  HostTensor sin({1, 3, 64}, TM_DTYPE_FLOAT32), rstd({0}, TM_DTYPE_FLOAT32);
  HostTensor gw({64}, TM_DTYPE_FLOAT32);
  TM_ASSERT_OK(tm_qk_norm_rope_forward(x.desc(), w.desc(), kEps, cos.desc(), sin.desc(), y.desc(),
                                       rstd.desc(), nullptr));
  gw.poison();
  TM_ASSERT_OK(tm_qk_norm_rope_backward(y.desc(), x.desc(), w.desc(), rstd.desc(), cos.desc(),
                                        sin.desc(), y.desc(), gw.desc(), nullptr, 0, nullptr));
  EXPECT_EQ(gw.values(), std::vector<double>(64, 0.0));
}

TEST(QkNormRope, RejectsBadArguments) {
  HostTensor x({1, 3, 2, 64}, TM_DTYPE_FLOAT32), y({1, 3, 2, 64}, TM_DTYPE_FLOAT32);
  HostTensor w({64}, TM_DTYPE_FLOAT32), cos({1, 3, 64}, TM_DTYPE_FLOAT32);
  HostTensor sin({1, 3, 64}, TM_DTYPE_FLOAT32), rstd({6}, TM_DTYPE_FLOAT32);
  HostTensor x96({1, 3, 2, 96}, TM_DTYPE_FLOAT32), w_bf16({64}, TM_DTYPE_BFLOAT16);
  HostTensor y_bf16({1, 3, 2, 64}, TM_DTYPE_BFLOAT16), cos_short({1, 2, 64}, TM_DTYPE_FLOAT32);
  HostTensor cos_half({1, 3, 32}, TM_DTYPE_FLOAT32), cos_batch({2, 3, 64}, TM_DTYPE_FLOAT32);
  HostTensor rstd_short({5}, TM_DTYPE_FLOAT32), x3({3, 2, 64}, TM_DTYPE_FLOAT32);
  HostTensor sin_bf16({1, 3, 64}, TM_DTYPE_BFLOAT16);
  auto forward = [&](HostTensor& xx, HostTensor* ww, HostTensor& cc, HostTensor& ss, HostTensor& yy,
                     HostTensor& rr, float eps = kEps) {
    return tm_qk_norm_rope_forward(xx.desc(), ww != nullptr ? ww->desc() : nullptr, eps, cc.desc(),
                                   ss.desc(), yy.desc(), rr.desc(), nullptr);
  };
  TM_EXPECT_ERROR(forward(x96, nullptr, cos, sin, x96, rstd), TM_ERR_INVALID_ARGUMENT,
                  "must be 64, 128 or 256");
  TM_EXPECT_ERROR(forward(x3, &w, cos, sin, y, rstd), TM_ERR_INVALID_ARGUMENT, "x");
  TM_EXPECT_ERROR(forward(x, &w_bf16, cos, sin, y, rstd), TM_ERR_INVALID_ARGUMENT, "weight");
  TM_EXPECT_ERROR(forward(x, &w, cos, sin, y_bf16, rstd), TM_ERR_INVALID_ARGUMENT, "y");
  TM_EXPECT_ERROR(forward(x, &w, cos_short, cos_short, y, rstd), TM_ERR_INVALID_ARGUMENT,
                  "sequence length");
  TM_EXPECT_ERROR(forward(x, &w, cos_half, cos_half, y, rstd), TM_ERR_INVALID_ARGUMENT, "head dim");
  TM_EXPECT_ERROR(forward(x, &w, cos_batch, cos_batch, y, rstd), TM_ERR_INVALID_ARGUMENT,
                  "batch of x");
  TM_EXPECT_ERROR(forward(x, &w, cos, sin_bf16, y, rstd), TM_ERR_INVALID_ARGUMENT, "sin");
  TM_EXPECT_ERROR(forward(x, &w, cos, sin, y, rstd_short), TM_ERR_INVALID_ARGUMENT, "rstd");
  TM_EXPECT_ERROR(forward(x, &w, cos, sin, y, rstd, -1.0f), TM_ERR_INVALID_ARGUMENT, "eps");
  TM_EXPECT_ERROR(tm_qk_norm_rope_forward(x.desc(), w.desc(), kEps, cos.desc(), sin.desc(),
                                          y.desc(), nullptr, nullptr),
                  TM_ERR_INVALID_ARGUMENT, "rstd");

  HostTensor gx({1, 3, 2, 64}, TM_DTYPE_FLOAT32), gw({64}, TM_DTYPE_FLOAT32);
  HostTensor gx_bf16({1, 3, 2, 64}, TM_DTYPE_BFLOAT16), gw_long({65}, TM_DTYPE_FLOAT32);
  HostTensor gy_short({1, 2, 2, 64}, TM_DTYPE_FLOAT32);
  auto backward = [&](HostTensor& gy, HostTensor& gxx, HostTensor* gww) {
    return tm_qk_norm_rope_backward(gy.desc(), x.desc(), w.desc(), rstd.desc(), cos.desc(),
                                    sin.desc(), gxx.desc(), gww != nullptr ? gww->desc() : nullptr,
                                    nullptr, 0, nullptr);
  };
  TM_EXPECT_ERROR(backward(gy_short, gx, &gw), TM_ERR_INVALID_ARGUMENT, "grad_y");
  TM_EXPECT_ERROR(backward(y, gx_bf16, &gw), TM_ERR_INVALID_ARGUMENT, "grad_x");
  TM_EXPECT_ERROR(backward(y, gx, &gw_long), TM_ERR_INVALID_ARGUMENT, "grad_weight");
}

TEST(QkNormRope, BackwardIsDeterministic) {
  auto rng = turbomoe::testing::rng_for_test();
  const Shape s{2, 4, 3, 128, TM_DTYPE_BFLOAT16, TM_DTYPE_BFLOAT16, TM_DTYPE_BFLOAT16, false};
  Inputs in = make_inputs(s, rng);
  HostTensor y({2, 4, 3, 128}, s.dtype), rstd({24}, TM_DTYPE_FLOAT32);
  TM_ASSERT_OK(tm_qk_norm_rope_forward(in.x.desc(), in.w.desc(), kEps, in.cos.desc(), in.sin.desc(),
                                       y.desc(), rstd.desc(), nullptr));
  std::vector<double> first;
  for (int run = 0; run < 2; ++run) {
    HostTensor gx({2, 4, 3, 128}, s.dtype), gw({128}, TM_DTYPE_FLOAT32);
    TM_ASSERT_OK(tm_qk_norm_rope_backward(in.grad_y.desc(), in.x.desc(), in.w.desc(), rstd.desc(),
                                          in.cos.desc(), in.sin.desc(), gx.desc(), gw.desc(),
                                          nullptr, 0, nullptr));
    std::vector<double> all = gx.values();
    const std::vector<double> g = gw.values();
    all.insert(all.end(), g.begin(), g.end());
    if (run == 0) {
      first = all;
    } else {
      EXPECT_EQ(all, first);
    }
  }
}

}  // namespace
