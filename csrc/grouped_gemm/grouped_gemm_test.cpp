// Grouped GEMM against double-precision loops (odd shapes, an expert without rows, one expert
// taking every row, a tail of dropped rows, a transposed weight view), gradients against finite
// differences of the forward, and every argument error.
#include <vector>

#include "common/test_util.h"

namespace {

using turbomoe::testing::HostTensor;
using turbomoe::testing::rel_error;

enum class Rows { kRandom, kOneExpert, kEmpty };

// Offsets of `experts` experts over `rows` rows: random counts with expert 1 (when there are
// more than two) left without rows and a few trailing rows dropped, or everything on the last
// expert.
HostTensor make_offsets(std::mt19937_64& rng, int64_t experts, int64_t rows, Rows mode) {
  HostTensor off({experts + 1}, TM_DTYPE_INT32);
  std::vector<int64_t> counts(static_cast<size_t>(experts), 0);
  if (mode == Rows::kOneExpert) {
    counts[experts - 1] = rows;
  } else if (mode == Rows::kRandom) {
    const int64_t used = rows - rows / 7;
    std::uniform_int_distribution<int64_t> pick(0, experts - 1);
    for (int64_t r = 0; r < used; ++r) {
      int64_t e = pick(rng);
      if (experts > 2 && e == 1) e = 0;
      ++counts[e];
    }
  }
  int64_t acc = 0;
  off.set(0, 0);
  for (int64_t e = 0; e < experts; ++e) off.set(e + 1, static_cast<double>(acc += counts[e]));
  return off;
}

int64_t expert_of_row(const HostTensor& off, int64_t r) {
  const int64_t experts = off.numel() - 1;
  for (int64_t e = 0; e < experts; ++e) {
    if (r >= off.get(e) && r < off.get(e + 1)) return e;
  }
  return -1;
}

// w viewed as [E,N,K]: element (e, n, k) of either a dense [E,N,K] buffer or, when transposed,
// of a dense [E,K,N] buffer.
struct Weight {
  HostTensor buf;
  bool transposed;
  tm_tensor view;
  Weight(int64_t e, int64_t n, int64_t k, int32_t dtype, bool t)
      : buf(t ? std::vector<int64_t>{e, k, n} : std::vector<int64_t>{e, n, k}, dtype),
        transposed(t) {}
  tm_tensor* desc() {
    view = *buf.desc();
    if (transposed) {
      std::swap(view.sizes[1], view.sizes[2]);
      std::swap(view.strides[1], view.strides[2]);
    }
    return &view;
  }
  int64_t n() const { return buf.sizes()[transposed ? 2 : 1]; }
  int64_t k() const { return buf.sizes()[transposed ? 1 : 2]; }
  double get(int64_t e, int64_t i, int64_t j) const {
    return transposed ? buf.get((e * k() + j) * n() + i) : buf.get((e * n() + i) * k() + j);
  }
};

double tol(int32_t in, int32_t out) {
  return in == TM_DTYPE_FLOAT32 && out == TM_DTYPE_FLOAT32 ? 1e-5 : 1e-2;
}

struct Case {
  int32_t in, out;
  bool transposed_w;
};

class GroupedGemmTest : public ::testing::TestWithParam<Case> {};

TEST_P(GroupedGemmTest, AllPassesMatchDoubleReference) {
  const auto [in, out, transposed] = GetParam();
  auto rng = turbomoe::testing::rng_for_test();
  struct Shape {
    int64_t m, n, k, experts;
    Rows mode;
  };
  for (const Shape s : {Shape{26, 72, 72, 5, Rows::kRandom}, Shape{26, 13, 72, 5, Rows::kOneExpert},
                        Shape{40, 33, 17, 3, Rows::kRandom}, Shape{9, 8, 8, 4, Rows::kEmpty},
                        Shape{1, 5, 3, 1, Rows::kRandom}}) {
    HostTensor off = make_offsets(rng, s.experts, s.m, s.mode);
    HostTensor x({s.m, s.k}, in), dy({s.m, s.n}, in);
    HostTensor y({s.m, s.n}, out), dx({s.m, s.k}, out), dw({s.experts, s.n, s.k}, out);
    Weight w(s.experts, s.n, s.k, in, transposed);
    x.fill_uniform(rng);
    dy.fill_uniform(rng);
    w.buf.fill_uniform(rng);
    y.poison();
    dx.poison();
    dw.poison();
    TM_ASSERT_OK(
        tm_grouped_gemm_forward(x.desc(), w.desc(), off.desc(), y.desc(), nullptr, 0, nullptr));
    TM_ASSERT_OK(tm_grouped_gemm_backward_input(dy.desc(), w.desc(), off.desc(), dx.desc(), nullptr,
                                                0, nullptr));
    TM_ASSERT_OK(tm_grouped_gemm_backward_weight(dy.desc(), x.desc(), off.desc(), dw.desc(),
                                                 nullptr, 0, nullptr));
    std::vector<double> ref_y(s.m * s.n, 0.0), ref_dx(s.m * s.k, 0.0);
    std::vector<double> ref_dw(s.experts * s.n * s.k, 0.0);
    for (int64_t r = 0; r < s.m; ++r) {
      const int64_t e = expert_of_row(off, r);
      if (e < 0) continue;  // a dropped row: zero in y and dx
      for (int64_t i = 0; i < s.n; ++i) {
        for (int64_t j = 0; j < s.k; ++j) {
          ref_y[r * s.n + i] += x.get(r * s.k + j) * w.get(e, i, j);
          ref_dx[r * s.k + j] += dy.get(r * s.n + i) * w.get(e, i, j);
          ref_dw[(e * s.n + i) * s.k + j] += dy.get(r * s.n + i) * x.get(r * s.k + j);
        }
      }
    }
    EXPECT_LT(rel_error(y.values(), ref_y), tol(in, out)) << "m " << s.m << " n " << s.n;
    EXPECT_LT(rel_error(dx.values(), ref_dx), tol(in, out)) << "m " << s.m << " n " << s.n;
    EXPECT_LT(rel_error(dw.values(), ref_dw), tol(in, out)) << "m " << s.m << " n " << s.n;
  }
}

INSTANTIATE_TEST_SUITE_P(GroupedGemm, GroupedGemmTest,
                         ::testing::Values(Case{TM_DTYPE_FLOAT32, TM_DTYPE_FLOAT32, false},
                                           Case{TM_DTYPE_FLOAT32, TM_DTYPE_FLOAT32, true},
                                           Case{TM_DTYPE_BFLOAT16, TM_DTYPE_BFLOAT16, false},
                                           Case{TM_DTYPE_BFLOAT16, TM_DTYPE_FLOAT32, false},
                                           Case{TM_DTYPE_BFLOAT16, TM_DTYPE_FLOAT32, true}));

// loss = <G, y(x, w)> through the library's forward; the backward passes must be its gradient.
TEST(GroupedGemm, BackwardMatchesFiniteDifferences) {
  auto rng = turbomoe::testing::rng_for_test();
  const int64_t m = 11, n = 6, k = 5, experts = 3;
  HostTensor off = make_offsets(rng, experts, m, Rows::kRandom);
  HostTensor x({m, k}, TM_DTYPE_FLOAT32), w({experts, n, k}, TM_DTYPE_FLOAT32);
  HostTensor g({m, n}, TM_DTYPE_FLOAT32), y({m, n}, TM_DTYPE_FLOAT32);
  HostTensor dx({m, k}, TM_DTYPE_FLOAT32), dw({experts, n, k}, TM_DTYPE_FLOAT32);
  x.fill_uniform(rng);
  w.fill_uniform(rng);
  g.fill_uniform(rng);
  dx.poison();
  dw.poison();
  TM_ASSERT_OK(tm_grouped_gemm_backward_input(g.desc(), w.desc(), off.desc(), dx.desc(), nullptr, 0,
                                              nullptr));
  TM_ASSERT_OK(tm_grouped_gemm_backward_weight(g.desc(), x.desc(), off.desc(), dw.desc(), nullptr,
                                               0, nullptr));
  auto loss = [&]() {
    EXPECT_EQ(
        tm_grouped_gemm_forward(x.desc(), w.desc(), off.desc(), y.desc(), nullptr, 0, nullptr),
        TM_OK);
    double s = 0;
    for (int64_t i = 0; i < y.numel(); ++i) s += g.get(i) * y.get(i);
    return s;
  };
  // The loss is bilinear, so a large step costs no truncation error and keeps rounding small.
  const double h = 0.25;
  auto finite_difference = [&](HostTensor& t) {
    std::vector<double> d;
    for (int64_t i = 0; i < t.numel(); ++i) {
      const double saved = t.get(i);
      t.set(i, saved + h);
      const double up = loss();
      t.set(i, saved - h);
      const double down = loss();
      t.set(i, saved);
      d.push_back((up - down) / (2 * h));
    }
    return d;
  };
  EXPECT_LT(rel_error(dx.values(), finite_difference(x)), 1e-4);
  EXPECT_LT(rel_error(dw.values(), finite_difference(w)), 1e-4);
}

TEST(GroupedGemm, WorkspaceSize) {
  size_t bytes = 9;
  for (int pass : {TM_GEMM_FORWARD, TM_GEMM_GRAD_INPUT, TM_GEMM_GRAD_WEIGHT}) {
    for (int device : {TM_DEVICE_CPU, TM_DEVICE_CUDA}) {
      TM_ASSERT_OK(tm_grouped_gemm_workspace_size(pass, 100, 64, 32, 8, device, &bytes));
      EXPECT_EQ(bytes, 0u);
    }
  }
  TM_EXPECT_ERROR(tm_grouped_gemm_workspace_size(0, 1, 1, 1, 1, TM_DEVICE_CPU, &bytes),
                  TM_ERR_INVALID_ARGUMENT, "pass");
  TM_EXPECT_ERROR(tm_grouped_gemm_workspace_size(1, -1, 1, 1, 1, TM_DEVICE_CPU, &bytes),
                  TM_ERR_INVALID_ARGUMENT, "m, n and k");
  TM_EXPECT_ERROR(tm_grouped_gemm_workspace_size(1, 1, 1, 1, -1, TM_DEVICE_CPU, &bytes),
                  TM_ERR_INVALID_ARGUMENT, "num_experts");
  TM_EXPECT_ERROR(tm_grouped_gemm_workspace_size(1, 1, 1, 1, 1, 5, &bytes), TM_ERR_INVALID_ARGUMENT,
                  "device_type");
  TM_EXPECT_ERROR(tm_grouped_gemm_workspace_size(1, 1, 1, 1, 1, TM_DEVICE_CPU, nullptr),
                  TM_ERR_INVALID_ARGUMENT, "bytes");
}

TEST(GroupedGemm, ZeroRowsAndEmptyExperts) {
  const int64_t experts = 3, n = 4, k = 5;
  HostTensor off({experts + 1}, TM_DTYPE_INT32);  // all zero: no expert has rows
  HostTensor x({0, k}, TM_DTYPE_FLOAT32), y({0, n}, TM_DTYPE_FLOAT32),
      w({experts, n, k}, TM_DTYPE_FLOAT32);
  HostTensor dw({experts, n, k}, TM_DTYPE_FLOAT32);
  TM_ASSERT_OK(
      tm_grouped_gemm_forward(x.desc(), w.desc(), off.desc(), y.desc(), nullptr, 0, nullptr));
  TM_ASSERT_OK(tm_grouped_gemm_backward_input(y.desc(), w.desc(), off.desc(), x.desc(), nullptr, 0,
                                              nullptr));
  dw.poison();
  TM_ASSERT_OK(tm_grouped_gemm_backward_weight(y.desc(), x.desc(), off.desc(), dw.desc(), nullptr,
                                               0, nullptr));
  EXPECT_EQ(dw.values(), std::vector<double>(experts * n * k, 0.0));
}

TEST(GroupedGemm, RejectsBadForwardArguments) {
  const int64_t m = 6, n = 4, k = 5, experts = 2;
  HostTensor x({m, k}, TM_DTYPE_FLOAT32), w({experts, n, k}, TM_DTYPE_FLOAT32);
  HostTensor off({experts + 1}, TM_DTYPE_INT32), y({m, n}, TM_DTYPE_FLOAT32);
  HostTensor x_bf({m, k}, TM_DTYPE_BFLOAT16), x_f16({m, k}, TM_DTYPE_FLOAT16);
  HostTensor w_k({experts, n, k + 1}, TM_DTYPE_FLOAT32), w_2d({n, k}, TM_DTYPE_FLOAT32);
  HostTensor off_i64({experts + 1}, TM_DTYPE_INT64), off_long({experts + 2}, TM_DTYPE_INT32);
  HostTensor y_rows({m + 1, n}, TM_DTYPE_FLOAT32), y_cols({m, n + 1}, TM_DTYPE_FLOAT32);
  HostTensor y_f16({m, n}, TM_DTYPE_FLOAT16), y_int({m, n}, TM_DTYPE_INT32);
  HostTensor wide({m, 2 * k}, TM_DTYPE_FLOAT32);
  const double good[3] = {0, 2, 5};
  for (int e = 0; e <= experts; ++e) off.set(e, good[e]);
  auto fwd = [&](tm_tensor* a, tm_tensor* b, tm_tensor* o, tm_tensor* c) {
    return tm_grouped_gemm_forward(a, b, o, c, nullptr, 0, nullptr);
  };
  TM_ASSERT_OK(fwd(x.desc(), w.desc(), off.desc(), y.desc()));
  TM_EXPECT_ERROR(fwd(nullptr, w.desc(), off.desc(), y.desc()), TM_ERR_INVALID_ARGUMENT, "x");
  TM_EXPECT_ERROR(fwd(x.desc(), nullptr, off.desc(), y.desc()), TM_ERR_INVALID_ARGUMENT, "w");
  TM_EXPECT_ERROR(fwd(x.desc(), w.desc(), nullptr, y.desc()), TM_ERR_INVALID_ARGUMENT,
                  "expert_offsets");
  TM_EXPECT_ERROR(fwd(x.desc(), w.desc(), off.desc(), nullptr), TM_ERR_INVALID_ARGUMENT, "y");
  TM_EXPECT_ERROR(fwd(x_f16.desc(), w.desc(), off.desc(), y.desc()), TM_ERR_INVALID_ARGUMENT, "x");
  TM_EXPECT_ERROR(fwd(x_bf.desc(), w.desc(), off.desc(), y.desc()), TM_ERR_INVALID_ARGUMENT, "w");
  TM_EXPECT_ERROR(fwd(x.desc(), w_k.desc(), off.desc(), y.desc()), TM_ERR_INVALID_ARGUMENT, "w");
  TM_EXPECT_ERROR(fwd(x.desc(), w_2d.desc(), off.desc(), y.desc()), TM_ERR_INVALID_ARGUMENT, "w");
  TM_EXPECT_ERROR(fwd(x.desc(), w.desc(), off_i64.desc(), y.desc()), TM_ERR_INVALID_ARGUMENT,
                  "expert_offsets");
  TM_EXPECT_ERROR(fwd(x.desc(), w.desc(), off_long.desc(), y.desc()), TM_ERR_INVALID_ARGUMENT,
                  "expert_offsets");
  TM_EXPECT_ERROR(fwd(x.desc(), w.desc(), off.desc(), y_rows.desc()), TM_ERR_INVALID_ARGUMENT, "y");
  TM_EXPECT_ERROR(fwd(x.desc(), w.desc(), off.desc(), y_cols.desc()), TM_ERR_INVALID_ARGUMENT, "y");
  TM_EXPECT_ERROR(fwd(x.desc(), w.desc(), off.desc(), y_f16.desc()), TM_ERR_INVALID_ARGUMENT, "y");
  TM_EXPECT_ERROR(fwd(x.desc(), w.desc(), off.desc(), y_int.desc()), TM_ERR_INVALID_ARGUMENT, "y");
  tm_tensor strided_x = *wide.desc();  // [m, k] with column stride 2
  strided_x.sizes[1] = k;
  strided_x.strides[1] = 2;
  TM_EXPECT_ERROR(fwd(&strided_x, w.desc(), off.desc(), y.desc()), TM_ERR_INVALID_ARGUMENT, "x");
  tm_tensor on_cuda = *y.desc();
  on_cuda.device_type = TM_DEVICE_CUDA;
  TM_EXPECT_ERROR(fwd(x.desc(), w.desc(), off.desc(), &on_cuda), TM_ERR_INVALID_ARGUMENT, "y");
  const double bad[3][3] = {{1, 2, 5}, {0, 4, 3}, {0, 2, 7}};
  for (const auto& b : bad) {
    for (int e = 0; e <= experts; ++e) off.set(e, b[e]);
    TM_EXPECT_ERROR(fwd(x.desc(), w.desc(), off.desc(), y.desc()), TM_ERR_INVALID_ARGUMENT,
                    "expert_offsets");
  }
}

TEST(GroupedGemm, RejectsBadBackwardArguments) {
  const int64_t m = 6, n = 4, k = 5, experts = 2;
  HostTensor dy({m, n}, TM_DTYPE_FLOAT32), x({m, k}, TM_DTYPE_FLOAT32);
  HostTensor w({experts, n, k}, TM_DTYPE_FLOAT32), off({experts + 1}, TM_DTYPE_INT32);
  HostTensor dx({m, k}, TM_DTYPE_FLOAT32), dw({experts, n, k}, TM_DTYPE_FLOAT32);
  HostTensor w_n({experts, n + 1, k}, TM_DTYPE_FLOAT32), dx_k({m, k + 1}, TM_DTYPE_FLOAT32);
  HostTensor x_rows({m + 1, k}, TM_DTYPE_FLOAT32), x_bf({m, k}, TM_DTYPE_BFLOAT16);
  HostTensor dw_e({experts + 1, n, k}, TM_DTYPE_FLOAT32),
      dw_n({experts, n + 1, k}, TM_DTYPE_FLOAT32);
  HostTensor dw_f16({experts, n, k}, TM_DTYPE_FLOAT16);
  off.set(1, 3);
  off.set(2, 6);
  auto bin = [&](tm_tensor* a, tm_tensor* b, tm_tensor* o, tm_tensor* c) {
    return tm_grouped_gemm_backward_input(a, b, o, c, nullptr, 0, nullptr);
  };
  auto bw = [&](tm_tensor* a, tm_tensor* b, tm_tensor* o, tm_tensor* c) {
    return tm_grouped_gemm_backward_weight(a, b, o, c, nullptr, 0, nullptr);
  };
  TM_ASSERT_OK(bin(dy.desc(), w.desc(), off.desc(), dx.desc()));
  TM_ASSERT_OK(bw(dy.desc(), x.desc(), off.desc(), dw.desc()));
  TM_EXPECT_ERROR(bin(nullptr, w.desc(), off.desc(), dx.desc()), TM_ERR_INVALID_ARGUMENT, "dy");
  TM_EXPECT_ERROR(bin(dy.desc(), nullptr, off.desc(), dx.desc()), TM_ERR_INVALID_ARGUMENT, "w");
  TM_EXPECT_ERROR(bin(dy.desc(), w_n.desc(), off.desc(), dx.desc()), TM_ERR_INVALID_ARGUMENT, "w");
  TM_EXPECT_ERROR(bin(dy.desc(), w.desc(), nullptr, dx.desc()), TM_ERR_INVALID_ARGUMENT,
                  "expert_offsets");
  TM_EXPECT_ERROR(bin(dy.desc(), w.desc(), off.desc(), nullptr), TM_ERR_INVALID_ARGUMENT, "dx");
  TM_EXPECT_ERROR(bin(dy.desc(), w.desc(), off.desc(), dx_k.desc()), TM_ERR_INVALID_ARGUMENT, "dx");
  TM_EXPECT_ERROR(bw(nullptr, x.desc(), off.desc(), dw.desc()), TM_ERR_INVALID_ARGUMENT, "dy");
  TM_EXPECT_ERROR(bw(dy.desc(), nullptr, off.desc(), dw.desc()), TM_ERR_INVALID_ARGUMENT, "x");
  TM_EXPECT_ERROR(bw(dy.desc(), x_rows.desc(), off.desc(), dw.desc()), TM_ERR_INVALID_ARGUMENT,
                  "x");
  TM_EXPECT_ERROR(bw(dy.desc(), x_bf.desc(), off.desc(), dw.desc()), TM_ERR_INVALID_ARGUMENT, "x");
  TM_EXPECT_ERROR(bw(dy.desc(), x.desc(), off.desc(), nullptr), TM_ERR_INVALID_ARGUMENT, "dw");
  TM_EXPECT_ERROR(bw(dy.desc(), x.desc(), off.desc(), dw_e.desc()), TM_ERR_INVALID_ARGUMENT,
                  "expert_offsets");
  TM_EXPECT_ERROR(bw(dy.desc(), x.desc(), off.desc(), dw_n.desc()), TM_ERR_INVALID_ARGUMENT, "dw");
  TM_EXPECT_ERROR(bw(dy.desc(), x.desc(), off.desc(), dw_f16.desc()), TM_ERR_INVALID_ARGUMENT,
                  "dw");
  off.set(2, 7);  // beyond the 6 rows
  TM_EXPECT_ERROR(bw(dy.desc(), x.desc(), off.desc(), dw.desc()), TM_ERR_INVALID_ARGUMENT,
                  "expert_offsets[2]");
}

}  // namespace

namespace {

TEST(GroupedGemm, SmMarginIsSetAndBounded) {
  EXPECT_EQ(tm_gemm_sm_margin(), 0);  // the default: the persistent grid takes every SM
  EXPECT_EQ(tm_set_gemm_sm_margin(17), TM_OK);
  EXPECT_EQ(tm_gemm_sm_margin(), 17);
  TM_EXPECT_ERROR(tm_set_gemm_sm_margin(-1), TM_ERR_INVALID_ARGUMENT, "sms is -1");
  TM_EXPECT_ERROR(tm_set_gemm_sm_margin(1025), TM_ERR_INVALID_ARGUMENT, "[0, 1024]");
  EXPECT_EQ(tm_gemm_sm_margin(), 17);  // a refused value changes nothing
  EXPECT_EQ(tm_set_gemm_sm_margin(0), TM_OK);
  EXPECT_EQ(tm_gemm_sm_margin(), 0);
}

}  // namespace
