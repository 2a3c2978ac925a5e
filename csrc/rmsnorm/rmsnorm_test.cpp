// RMSNorm against a double-precision reference of Hugging Face's Qwen3MoeRMSNorm, gradients
// against finite differences, padded rows, determinism, and every argument error.
#include <cmath>
#include <cstring>
#include <optional>
#include <vector>

#include "common/test_util.h"

namespace {

using turbomoe::testing::HostTensor;
using turbomoe::testing::rel_error;

constexpr float kEps = 1e-6f;

// What casting a float32 value to dtype and back does to it.
double round_like(int32_t dtype, double v) {
  if (dtype != TM_DTYPE_BFLOAT16) return static_cast<float>(v);
  using turbomoe::testing::bf16_bits_to_float;
  using turbomoe::testing::float_to_bf16_bits;
  return bf16_bits_to_float(float_to_bf16_bits(static_cast<float>(v)));
}

// A [rows, cols] view of the first cols columns of a 2-D tensor: rows padded when cols is less
// than the tensor's width.
tm_tensor columns(HostTensor& t, int64_t cols) {
  tm_tensor d = *t.desc();
  d.sizes[1] = cols;
  return d;
}

// Row r of the [rows, cols] view above.
std::vector<double> row_of(const HostTensor& t, int64_t r, int64_t cols) {
  std::vector<double> v(static_cast<size_t>(cols));
  for (int64_t c = 0; c < cols; ++c) v[c] = t.get(r * t.sizes()[1] + c);
  return v;
}

double ref_rstd(const std::vector<double>& x, double eps) {
  double ss = 0;
  for (double v : x) ss += v * v;
  return 1.0 / std::sqrt(ss / static_cast<double>(x.size()) + eps);
}

// y = w * cast(x * rstd); round_dtype 0 skips the cast (the function differentiated below).
std::vector<double> ref_row(const std::vector<double>& x, const std::vector<double>* w,
                            int32_t round_dtype, double eps) {
  const double rs = ref_rstd(x, eps);
  std::vector<double> y(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    const double n = round_dtype != 0 ? round_like(round_dtype, x[i] * rs) : x[i] * rs;
    y[i] = n * (w != nullptr ? (*w)[i] : 1.0);
  }
  return y;
}

double ref_row_loss(const std::vector<double>& x, const std::vector<double>* w,
                    const std::vector<double>& gy, double eps) {
  const std::vector<double> y = ref_row(x, w, 0, eps);
  double l = 0;
  for (size_t i = 0; i < y.size(); ++i) l += gy[i] * y[i];
  return l;
}

struct Problem {
  int64_t rows, hidden;
  int32_t x_dtype, w_dtype, y_dtype;  // w_dtype 0: no weight
};

// Runs the forward on random inputs and compares y and rstd with the reference.
void check_forward(const Problem& p, std::mt19937_64& rng, int64_t x_pad = 0, int64_t y_pad = 0) {
  HostTensor x({p.rows, p.hidden + x_pad}, p.x_dtype), y({p.rows, p.hidden + y_pad}, p.y_dtype);
  HostTensor w({p.hidden}, p.w_dtype != 0 ? p.w_dtype : TM_DTYPE_FLOAT32);
  HostTensor rstd({p.rows}, TM_DTYPE_FLOAT32);
  x.fill_uniform(rng, -3, 3);
  w.fill_uniform(rng, 0.5, 1.5);
  y.poison();
  rstd.poison();
  tm_tensor xd = columns(x, p.hidden), yd = columns(y, p.hidden);
  TM_ASSERT_OK(tm_rmsnorm_forward(&xd, p.w_dtype != 0 ? w.desc() : nullptr, kEps, &yd, rstd.desc(),
                                  nullptr));
  std::vector<double> got, want, got_rstd, want_rstd;
  const std::vector<double> wv = w.values();
  for (int64_t r = 0; r < p.rows; ++r) {
    const std::vector<double> xr = row_of(x, r, p.hidden);
    const std::vector<double> yr = ref_row(xr, p.w_dtype != 0 ? &wv : nullptr, p.x_dtype, kEps);
    const std::vector<double> gr = row_of(y, r, p.hidden);
    want.insert(want.end(), yr.begin(), yr.end());
    got.insert(got.end(), gr.begin(), gr.end());
    want_rstd.push_back(ref_rstd(xr, kEps));
    got_rstd.push_back(rstd.get(r));
  }
  const bool exact = p.x_dtype == TM_DTYPE_FLOAT32 && p.y_dtype == TM_DTYPE_FLOAT32 &&
                     p.w_dtype != TM_DTYPE_BFLOAT16;
  EXPECT_LT(rel_error(got, want), exact ? 1e-5 : 1e-2) << p.rows << "x" << p.hidden;
  EXPECT_LT(rel_error(got_rstd, want_rstd), 1e-5);
  for (int64_t r = 0; r < p.rows && y_pad > 0; ++r) {
    for (int64_t c = p.hidden; c < p.hidden + y_pad; ++c) {
      EXPECT_TRUE(std::isnan(y.get(r * (p.hidden + y_pad) + c))) << "wrote into the row padding";
    }
  }
}

class RmsNormTest : public ::testing::TestWithParam<std::tuple<int32_t, int32_t>> {};

TEST_P(RmsNormTest, ForwardMatchesDoubleReference) {
  const auto [dtype, w_dtype] = GetParam();
  auto rng = turbomoe::testing::rng_for_test();
  for (auto [rows, hidden] :
       {std::pair{13, 72}, std::pair{1, 1}, std::pair{64, 33}, std::pair{3, 1000}}) {
    check_forward({rows, hidden, dtype, w_dtype, dtype}, rng);
  }
}

TEST_P(RmsNormTest, ForwardReadsPaddedRows) {
  const auto [dtype, w_dtype] = GetParam();
  auto rng = turbomoe::testing::rng_for_test();
  check_forward({13, 72, dtype, w_dtype, dtype}, rng, /*x_pad=*/8, /*y_pad=*/3);
}

TEST_P(RmsNormTest, BackwardMatchesFiniteDifferences) {
  const auto [dtype, w_dtype] = GetParam();
  auto rng = turbomoe::testing::rng_for_test();
  const int64_t rows = 13, hidden = 72, pad = 5;
  const bool has_w = w_dtype != 0;
  HostTensor x({rows, hidden}, dtype), gy({rows, hidden + pad}, dtype);
  HostTensor w({hidden}, has_w ? w_dtype : TM_DTYPE_FLOAT32), y({rows, hidden}, dtype);
  HostTensor rstd({rows}, TM_DTYPE_FLOAT32), gx({rows, hidden}, dtype);
  HostTensor gw({hidden}, TM_DTYPE_FLOAT32);
  x.fill_uniform(rng, -3, 3);
  gy.fill_uniform(rng);
  w.fill_uniform(rng, 0.5, 1.5);
  rstd.poison();
  TM_ASSERT_OK(tm_rmsnorm_forward(x.desc(), has_w ? w.desc() : nullptr, kEps, y.desc(), rstd.desc(),
                                  nullptr));
  size_t ws_bytes = 1;
  TM_ASSERT_OK(tm_rmsnorm_backward_workspace_size(rows, hidden, TM_DEVICE_CPU, &ws_bytes));
  EXPECT_EQ(ws_bytes, 0u);
  gx.poison();
  gw.poison();
  tm_tensor gyd = columns(gy, hidden);
  TM_ASSERT_OK(tm_rmsnorm_backward(&gyd, x.desc(), has_w ? w.desc() : nullptr, rstd.desc(),
                                   gx.desc(), has_w ? gw.desc() : nullptr, nullptr, 0, nullptr));

  const double h = 1e-5;
  const std::vector<double> wv = w.values();
  const std::vector<double>* wp = has_w ? &wv : nullptr;
  std::vector<double> ref_gx, ref_gw(hidden, 0.0);
  for (int64_t r = 0; r < rows; ++r) {
    std::vector<double> xr = row_of(x, r, hidden);
    const std::vector<double> gr = row_of(gy, r, hidden);
    for (int64_t c = 0; c < hidden; ++c) {
      const double keep = xr[c];
      xr[c] = keep + h;
      const double up = ref_row_loss(xr, wp, gr, kEps);
      xr[c] = keep - h;
      const double down = ref_row_loss(xr, wp, gr, kEps);
      xr[c] = keep;
      ref_gx.push_back((up - down) / (2 * h));
    }
    if (!has_w) continue;
    std::vector<double> wl = wv;
    for (int64_t c = 0; c < hidden; ++c) {
      wl[c] = wv[c] + h;
      const double up = ref_row_loss(xr, &wl, gr, kEps);
      wl[c] = wv[c] - h;
      const double down = ref_row_loss(xr, &wl, gr, kEps);
      wl[c] = wv[c];
      ref_gw[c] += (up - down) / (2 * h);
    }
  }
  // The differences are taken in double at the stored (possibly bf16-rounded) inputs.
  const double tol = dtype == TM_DTYPE_FLOAT32 && w_dtype != TM_DTYPE_BFLOAT16 ? 1e-4 : 1e-2;
  EXPECT_LT(rel_error(gx.values(), ref_gx), tol);
  if (has_w) {
    EXPECT_LT(rel_error(gw.values(), ref_gw), tol);
  }
}

INSTANTIATE_TEST_SUITE_P(RmsNorm, RmsNormTest,
                         ::testing::Combine(::testing::Values(TM_DTYPE_FLOAT32, TM_DTYPE_BFLOAT16),
                                            ::testing::Values(0, TM_DTYPE_FLOAT32,
                                                              TM_DTYPE_BFLOAT16)));

TEST(RmsNorm, OutputDtypeMayDifferFromInput) {
  auto rng = turbomoe::testing::rng_for_test();
  // A float32 weight times a bfloat16 activation promotes to float32 in torch.
  check_forward({13, 72, TM_DTYPE_BFLOAT16, TM_DTYPE_FLOAT32, TM_DTYPE_FLOAT32}, rng);
  check_forward({13, 72, TM_DTYPE_FLOAT32, TM_DTYPE_FLOAT32, TM_DTYPE_BFLOAT16}, rng);
}

TEST(RmsNorm, BackwardIsDeterministic) {
  auto rng = turbomoe::testing::rng_for_test();
  const int64_t rows = 37, hidden = 72;
  HostTensor x({rows, hidden}, TM_DTYPE_FLOAT32), gy({rows, hidden}, TM_DTYPE_FLOAT32);
  HostTensor w({hidden}, TM_DTYPE_FLOAT32), rstd({rows}, TM_DTYPE_FLOAT32);
  HostTensor y({rows, hidden}, TM_DTYPE_FLOAT32);
  x.fill_uniform(rng, -3, 3);
  gy.fill_uniform(rng);
  w.fill_uniform(rng);
  TM_ASSERT_OK(tm_rmsnorm_forward(x.desc(), w.desc(), kEps, y.desc(), rstd.desc(), nullptr));
  std::vector<double> first_gx, first_gw;
  for (int run = 0; run < 2; ++run) {
    HostTensor gx({rows, hidden}, TM_DTYPE_FLOAT32), gw({hidden}, TM_DTYPE_FLOAT32);
    gx.poison();
    gw.poison();
    TM_ASSERT_OK(tm_rmsnorm_backward(gy.desc(), x.desc(), w.desc(), rstd.desc(), gx.desc(),
                                     gw.desc(), nullptr, 0, nullptr));
    if (run == 0) {
      first_gx = gx.values();
      first_gw = gw.values();
    } else {
      EXPECT_EQ(gx.values(), first_gx);
      EXPECT_EQ(gw.values(), first_gw);
    }
  }
}

TEST(RmsNorm, ZeroRows) {
  HostTensor x({0, 8}, TM_DTYPE_FLOAT32), y({0, 8}, TM_DTYPE_FLOAT32), w({8}, TM_DTYPE_FLOAT32);
  HostTensor rstd({0}, TM_DTYPE_FLOAT32), gw({8}, TM_DTYPE_FLOAT32);
  TM_ASSERT_OK(tm_rmsnorm_forward(x.desc(), w.desc(), kEps, y.desc(), rstd.desc(), nullptr));
  gw.poison();
  // No row contributes, so grad_weight is overwritten with zeros.
  TM_ASSERT_OK(tm_rmsnorm_backward(y.desc(), x.desc(), w.desc(), rstd.desc(), y.desc(), gw.desc(),
                                   nullptr, 0, nullptr));
  EXPECT_EQ(gw.values(), std::vector<double>(8, 0.0));
}

TEST(RmsNorm, WorkspaceSize) {
  size_t bytes = 0;
  TM_ASSERT_OK(tm_rmsnorm_backward_workspace_size(13, 72, TM_DEVICE_CPU, &bytes));
  EXPECT_EQ(bytes, 0u);
  // CUDA: float32 partial sums of grad_weight, one row per team of rows (one row each while rows
  // are few) plus, past 1024 partial rows, one row per 64-row reduction slice; bounded whatever
  // the rows.
  TM_ASSERT_OK(tm_rmsnorm_backward_workspace_size(13, 72, TM_DEVICE_CUDA, &bytes));
  EXPECT_EQ(bytes, 13u * 72u * 4u);
  TM_ASSERT_OK(tm_rmsnorm_backward_workspace_size(10000000, 72, TM_DEVICE_CUDA, &bytes));
  EXPECT_GT(bytes, 0u);
  EXPECT_LE(bytes, (16384u + 256u) * 72u * 4u);
  TM_ASSERT_OK(tm_rmsnorm_backward_workspace_size(1000, 72, TM_DEVICE_CUDA, &bytes));
  EXPECT_EQ(bytes, 1000u * 72u * 4u);  // one stage: no slice rows
  TM_ASSERT_OK(tm_rmsnorm_backward_workspace_size(2000, 72, TM_DEVICE_CUDA, &bytes));
  EXPECT_EQ(bytes, (2000u + 32u) * 72u * 4u);  // 32 slices of 64 partial rows
  TM_ASSERT_OK(tm_rmsnorm_backward_workspace_size(0, 72, TM_DEVICE_CUDA, &bytes));
  EXPECT_EQ(bytes, 0u);
  TM_EXPECT_ERROR(tm_rmsnorm_backward_workspace_size(13, 72, TM_DEVICE_CPU, nullptr),
                  TM_ERR_INVALID_ARGUMENT, "bytes");
  TM_EXPECT_ERROR(tm_rmsnorm_backward_workspace_size(-1, 72, TM_DEVICE_CPU, &bytes),
                  TM_ERR_INVALID_ARGUMENT, "rows");
  TM_EXPECT_ERROR(tm_rmsnorm_backward_workspace_size(13, -2, TM_DEVICE_CPU, &bytes),
                  TM_ERR_INVALID_ARGUMENT, "hidden");
  TM_EXPECT_ERROR(tm_rmsnorm_backward_workspace_size(13, int64_t{1} << 40, TM_DEVICE_CUDA, &bytes),
                  TM_ERR_INVALID_ARGUMENT, "hidden");
  TM_EXPECT_ERROR(tm_rmsnorm_backward_workspace_size(13, 72, 7, &bytes), TM_ERR_INVALID_ARGUMENT,
                  "device_type");
}

TEST(RmsNorm, ForwardRejectsBadArguments) {
  HostTensor x({4, 8}, TM_DTYPE_FLOAT32), y({4, 8}, TM_DTYPE_FLOAT32), w({8}, TM_DTYPE_FLOAT32);
  HostTensor rstd({4}, TM_DTYPE_FLOAT32), ints({4, 8}, TM_DTYPE_INT32);
  HostTensor halves({4, 8}, TM_DTYPE_FLOAT16), y_short({4, 7}, TM_DTYPE_FLOAT32);
  HostTensor w_long({9}, TM_DTYPE_FLOAT32), w_wide({16}, TM_DTYPE_FLOAT32);
  HostTensor rstd_short({3}, TM_DTYPE_FLOAT32), rstd_bf16({4}, TM_DTYPE_BFLOAT16);
  HostTensor rank3({4, 8, 1}, TM_DTYPE_FLOAT32), empty({4, 0}, TM_DTYPE_FLOAT32);
  TM_EXPECT_ERROR(tm_rmsnorm_forward(nullptr, w.desc(), kEps, y.desc(), rstd.desc(), nullptr),
                  TM_ERR_INVALID_ARGUMENT, "x");
  TM_EXPECT_ERROR(tm_rmsnorm_forward(x.desc(), w.desc(), kEps, nullptr, rstd.desc(), nullptr),
                  TM_ERR_INVALID_ARGUMENT, "y");
  TM_EXPECT_ERROR(tm_rmsnorm_forward(ints.desc(), w.desc(), kEps, y.desc(), rstd.desc(), nullptr),
                  TM_ERR_INVALID_ARGUMENT, "x has dtype int32");
  TM_EXPECT_ERROR(tm_rmsnorm_forward(halves.desc(), w.desc(), kEps, y.desc(), rstd.desc(), nullptr),
                  TM_ERR_INVALID_ARGUMENT, "x has dtype float16");
  TM_EXPECT_ERROR(tm_rmsnorm_forward(rank3.desc(), w.desc(), kEps, y.desc(), rstd.desc(), nullptr),
                  TM_ERR_INVALID_ARGUMENT, "x must have rank 2");
  TM_EXPECT_ERROR(tm_rmsnorm_forward(empty.desc(), nullptr, kEps, empty.desc(), nullptr, nullptr),
                  TM_ERR_INVALID_ARGUMENT, "x has an empty last dimension");
  TM_EXPECT_ERROR(
      tm_rmsnorm_forward(x.desc(), w.desc(), kEps, y_short.desc(), rstd.desc(), nullptr),
      TM_ERR_INVALID_ARGUMENT, "y");
  TM_EXPECT_ERROR(tm_rmsnorm_forward(x.desc(), w_long.desc(), kEps, y.desc(), rstd.desc(), nullptr),
                  TM_ERR_INVALID_ARGUMENT, "weight");
  tm_tensor w_strided = *w_wide.desc();
  w_strided.sizes[0] = 8;
  w_strided.strides[0] = 2;
  TM_EXPECT_ERROR(tm_rmsnorm_forward(x.desc(), &w_strided, kEps, y.desc(), rstd.desc(), nullptr),
                  TM_ERR_INVALID_ARGUMENT, "weight must be contiguous");
  TM_EXPECT_ERROR(
      tm_rmsnorm_forward(x.desc(), w.desc(), kEps, y.desc(), rstd_short.desc(), nullptr),
      TM_ERR_INVALID_ARGUMENT, "rstd");
  TM_EXPECT_ERROR(tm_rmsnorm_forward(x.desc(), w.desc(), kEps, y.desc(), rstd_bf16.desc(), nullptr),
                  TM_ERR_INVALID_ARGUMENT, "rstd has dtype bfloat16");
  TM_EXPECT_ERROR(tm_rmsnorm_forward(x.desc(), w.desc(), -1.0f, y.desc(), rstd.desc(), nullptr),
                  TM_ERR_INVALID_ARGUMENT, "eps");
  TM_EXPECT_ERROR(tm_rmsnorm_forward(x.desc(), w.desc(), NAN, y.desc(), rstd.desc(), nullptr),
                  TM_ERR_INVALID_ARGUMENT, "eps");
  tm_tensor x_cols = *x.desc();  // a transposed view: last-dim stride 4
  std::swap(x_cols.strides[0], x_cols.strides[1]);
  x_cols.sizes[0] = 8;
  x_cols.sizes[1] = 4;
  HostTensor y84({8, 4}, TM_DTYPE_FLOAT32), w4({4}, TM_DTYPE_FLOAT32), r8({8}, TM_DTYPE_FLOAT32);
  TM_EXPECT_ERROR(tm_rmsnorm_forward(&x_cols, w4.desc(), kEps, y84.desc(), r8.desc(), nullptr),
                  TM_ERR_INVALID_ARGUMENT, "x must have a contiguous last dimension");
  tm_tensor y_cuda = *y.desc();
  y_cuda.device_type = TM_DEVICE_CUDA;
  TM_EXPECT_ERROR(tm_rmsnorm_forward(x.desc(), w.desc(), kEps, &y_cuda, rstd.desc(), nullptr),
                  TM_ERR_INVALID_ARGUMENT, "device");
}

TEST(RmsNorm, BackwardRejectsBadArguments) {
  HostTensor x({4, 8}, TM_DTYPE_FLOAT32), gy({4, 8}, TM_DTYPE_FLOAT32),
      gx({4, 8}, TM_DTYPE_FLOAT32);
  HostTensor w({8}, TM_DTYPE_FLOAT32), rstd({4}, TM_DTYPE_FLOAT32), gw({8}, TM_DTYPE_FLOAT32);
  HostTensor gw_bf16({8}, TM_DTYPE_BFLOAT16), gw_short({7}, TM_DTYPE_FLOAT32);
  HostTensor gx_short({3, 8}, TM_DTYPE_FLOAT32), ints({4, 8}, TM_DTYPE_INT64);
  auto backward = [&](const tm_tensor* a, const tm_tensor* b, const tm_tensor* c,
                      const tm_tensor* d, tm_tensor* e, tm_tensor* f) {
    return tm_rmsnorm_backward(a, b, c, d, e, f, nullptr, 0, nullptr);
  };
  TM_EXPECT_ERROR(backward(nullptr, x.desc(), w.desc(), rstd.desc(), gx.desc(), gw.desc()),
                  TM_ERR_INVALID_ARGUMENT, "grad_y");
  TM_EXPECT_ERROR(backward(gy.desc(), nullptr, w.desc(), rstd.desc(), gx.desc(), gw.desc()),
                  TM_ERR_INVALID_ARGUMENT, "x");
  TM_EXPECT_ERROR(backward(gy.desc(), x.desc(), w.desc(), nullptr, gx.desc(), gw.desc()),
                  TM_ERR_INVALID_ARGUMENT, "rstd");
  TM_EXPECT_ERROR(backward(gy.desc(), x.desc(), w.desc(), rstd.desc(), nullptr, gw.desc()),
                  TM_ERR_INVALID_ARGUMENT, "grad_x");
  TM_EXPECT_ERROR(backward(ints.desc(), x.desc(), w.desc(), rstd.desc(), gx.desc(), gw.desc()),
                  TM_ERR_INVALID_ARGUMENT, "grad_y has dtype int64");
  TM_EXPECT_ERROR(backward(gy.desc(), x.desc(), w.desc(), rstd.desc(), gx_short.desc(), gw.desc()),
                  TM_ERR_INVALID_ARGUMENT, "grad_x");
  TM_EXPECT_ERROR(backward(gy.desc(), x.desc(), nullptr, rstd.desc(), gx.desc(), gw.desc()),
                  TM_ERR_INVALID_ARGUMENT, "grad_weight must be NULL when weight is NULL");
  TM_EXPECT_ERROR(backward(gy.desc(), x.desc(), w.desc(), rstd.desc(), gx.desc(), gw_bf16.desc()),
                  TM_ERR_INVALID_ARGUMENT, "grad_weight has dtype bfloat16");
  TM_EXPECT_ERROR(backward(gy.desc(), x.desc(), w.desc(), rstd.desc(), gx.desc(), gw_short.desc()),
                  TM_ERR_INVALID_ARGUMENT, "grad_weight");

  // The CUDA path needs a workspace; the sizes are checked before any memory is touched, so host
  // descriptors marked as CUDA exercise the checks on any build.
  std::vector<tm_tensor> on_gpu;
  for (HostTensor* t : {&gy, &x, &w, &rstd, &gx, &gw}) {
    on_gpu.push_back(*t->desc());
    on_gpu.back().device_type = TM_DEVICE_CUDA;
  }
  size_t need = 0;
  TM_ASSERT_OK(tm_rmsnorm_backward_workspace_size(4, 8, TM_DEVICE_CUDA, &need));
  ASSERT_GT(need, 0u);
  std::vector<float> ws(need / sizeof(float) + 8);
  TM_EXPECT_ERROR(tm_rmsnorm_backward(&on_gpu[0], &on_gpu[1], &on_gpu[2], &on_gpu[3], &on_gpu[4],
                                      &on_gpu[5], ws.data(), need - 4, nullptr),
                  TM_ERR_OUT_OF_MEMORY, "workspace_bytes");
  TM_EXPECT_ERROR(tm_rmsnorm_backward(&on_gpu[0], &on_gpu[1], &on_gpu[2], &on_gpu[3], &on_gpu[4],
                                      &on_gpu[5], nullptr, need, nullptr),
                  TM_ERR_INVALID_ARGUMENT, "workspace is NULL");
  char* misaligned = reinterpret_cast<char*>(ws.data()) + 4;
  TM_EXPECT_ERROR(tm_rmsnorm_backward(&on_gpu[0], &on_gpu[1], &on_gpu[2], &on_gpu[3], &on_gpu[4],
                                      &on_gpu[5], misaligned, need, nullptr),
                  TM_ERR_INVALID_ARGUMENT, "workspace must be 16-byte aligned");
}

}  // namespace
