// Cross-entropy against a double-precision reference with ignored rows, padded rows and large
// logits; gradients against finite differences; in-place backward; determinism; every argument
// error, including out-of-range labels.
#include <cmath>
#include <vector>

#include "common/test_util.h"

namespace {

using turbomoe::testing::HostTensor;
using turbomoe::testing::rel_error;

constexpr int64_t kIgnore = -100;

double ref_lse(const std::vector<double>& z) {
  double m = -INFINITY;
  for (double v : z) m = std::max(m, v);
  double s = 0;
  for (double v : z) s += std::exp(v - m);
  return m + std::log(s);
}

// Random labels in [0, vocab), about one row in four ignored (never the first).
HostTensor random_labels(int64_t rows, int64_t vocab, std::mt19937_64& rng,
                         int32_t dtype = TM_DTYPE_INT64) {
  HostTensor labels({rows}, dtype);
  std::uniform_int_distribution<int64_t> cls(0, vocab - 1), quarter(0, 3);
  for (int64_t r = 0; r < rows; ++r) {
    labels.set(r, r > 0 && quarter(rng) == 0 ? kIgnore : cls(rng));
  }
  return labels;
}

// Logits row r of a [rows, width] tensor, first vocab columns.
std::vector<double> row_of(const HostTensor& t, int64_t r, int64_t vocab) {
  std::vector<double> v(static_cast<size_t>(vocab));
  for (int64_t c = 0; c < vocab; ++c) v[c] = t.get(r * t.sizes()[1] + c);
  return v;
}

tm_tensor columns(HostTensor& t, int64_t cols) {
  tm_tensor d = *t.desc();
  d.sizes[1] = cols;
  return d;
}

struct Shape {
  int64_t rows, vocab, pad;
};

class CrossEntropyTest : public ::testing::TestWithParam<int32_t> {};

TEST_P(CrossEntropyTest, ForwardMatchesDoubleReference) {
  const int32_t dtype = GetParam();
  auto rng = turbomoe::testing::rng_for_test();
  for (const Shape& s : {Shape{13, 300, 0}, Shape{1, 1, 0}, Shape{7, 4099, 5}, Shape{4, 64, 8}}) {
    for (double offset : {0.0, 300.0}) {  // large logits must not overflow exp
      HostTensor logits({s.rows, s.vocab + s.pad}, dtype);
      logits.fill_uniform(rng, offset - 8, offset + 8);
      HostTensor labels = random_labels(s.rows, s.vocab, rng);
      HostTensor loss({s.rows}, TM_DTYPE_FLOAT32), lse({s.rows}, TM_DTYPE_FLOAT32);
      loss.poison();
      lse.poison();
      tm_tensor ld = columns(logits, s.vocab);
      TM_ASSERT_OK(
          tm_cross_entropy_forward(&ld, labels.desc(), kIgnore, loss.desc(), lse.desc(), nullptr));
      std::vector<double> want_loss, want_lse;
      for (int64_t r = 0; r < s.rows; ++r) {
        const auto label = static_cast<int64_t>(labels.get(r));
        if (label == kIgnore) {
          want_loss.push_back(0);
          want_lse.push_back(0);
          continue;
        }
        const std::vector<double> z = row_of(logits, r, s.vocab);
        want_lse.push_back(ref_lse(z));
        want_loss.push_back(want_lse.back() - z[label]);
      }
      // Inputs are exact in either dtype and the outputs float32: the same bound holds.
      EXPECT_LT(rel_error(loss.values(), want_loss), 1e-5) << s.rows << "x" << s.vocab;
      EXPECT_LT(rel_error(lse.values(), want_lse), 1e-5);
    }
  }
}

TEST_P(CrossEntropyTest, BackwardMatchesFiniteDifferences) {
  const int32_t dtype = GetParam();
  auto rng = turbomoe::testing::rng_for_test();
  const int64_t rows = 13, vocab = 300, pad = 3;
  HostTensor logits({rows, vocab}, dtype), grad({rows, vocab + pad}, dtype);
  logits.fill_uniform(rng, -4, 4);
  HostTensor labels = random_labels(rows, vocab, rng, TM_DTYPE_INT32);
  HostTensor loss({rows}, TM_DTYPE_FLOAT32), lse({rows}, TM_DTYPE_FLOAT32);
  HostTensor grad_loss({rows}, TM_DTYPE_FLOAT32);
  grad_loss.fill_uniform(rng, 0.5, 2);
  TM_ASSERT_OK(tm_cross_entropy_forward(logits.desc(), labels.desc(), kIgnore, loss.desc(),
                                        lse.desc(), nullptr));
  grad.poison();
  tm_tensor gd = columns(grad, vocab);
  TM_ASSERT_OK(tm_cross_entropy_backward(grad_loss.desc(), logits.desc(), labels.desc(), lse.desc(),
                                         kIgnore, &gd, nullptr));
  std::vector<double> got, want;
  const double h = 1e-5;
  for (int64_t r = 0; r < rows; ++r) {
    const auto label = static_cast<int64_t>(labels.get(r));
    std::vector<double> z = row_of(logits, r, vocab);
    auto row_loss = [&] { return label == kIgnore ? 0.0 : ref_lse(z) - z[label]; };
    for (int64_t c = 0; c < vocab; ++c) {
      const double keep = z[c];
      z[c] = keep + h;
      const double up = row_loss();
      z[c] = keep - h;
      const double down = row_loss();
      z[c] = keep;
      want.push_back(grad_loss.get(r) * (up - down) / (2 * h));
      got.push_back(grad.get(r * (vocab + pad) + c));
    }
    for (int64_t c = vocab; c < vocab + pad; ++c) {
      EXPECT_TRUE(std::isnan(grad.get(r * (vocab + pad) + c))) << "wrote into the row padding";
    }
  }
  EXPECT_LT(rel_error(got, want), dtype == TM_DTYPE_FLOAT32 ? 1e-4 : 1e-2);
}

// A random problem solved by the two separate calls (forward: loss and lse; backward out of
// place: grad), the baseline that the in-place and the one-call paths must reproduce.
struct TwoCallBaseline {
  HostTensor logits, labels, loss, lse, grad_loss, grad;
  TwoCallBaseline(int32_t dtype, int64_t rows, int64_t vocab, std::mt19937_64& rng)
      : logits({rows, vocab}, dtype),
        labels(random_labels(rows, vocab, rng)),
        loss({rows}, TM_DTYPE_FLOAT32),
        lse({rows}, TM_DTYPE_FLOAT32),
        grad_loss({rows}, TM_DTYPE_FLOAT32),
        grad({rows, vocab}, dtype) {
    logits.fill_uniform(rng, -4, 4);
    grad_loss.fill_uniform(rng, 0.5, 2);
    grad.poison();
  }
  void solve() {
    TM_ASSERT_OK(tm_cross_entropy_forward(logits.desc(), labels.desc(), kIgnore, loss.desc(),
                                          lse.desc(), nullptr));
    TM_ASSERT_OK(tm_cross_entropy_backward(grad_loss.desc(), logits.desc(), labels.desc(),
                                           lse.desc(), kIgnore, grad.desc(), nullptr));
  }
};

TEST_P(CrossEntropyTest, BackwardInPlaceMatchesOutOfPlace) {
  auto rng = turbomoe::testing::rng_for_test();
  TwoCallBaseline b(GetParam(), 9, 77, rng);
  b.solve();
  TM_ASSERT_OK(tm_cross_entropy_backward(b.grad_loss.desc(), b.logits.desc(), b.labels.desc(),
                                         b.lse.desc(), kIgnore, b.logits.desc(), nullptr));
  EXPECT_EQ(b.logits.values(), b.grad.values());
}

TEST_P(CrossEntropyTest, ForwardBackwardMatchesTheTwoCalls) {
  auto rng = turbomoe::testing::rng_for_test();
  const int64_t rows = 11;
  TwoCallBaseline b(GetParam(), rows, 93, rng);
  b.solve();
  HostTensor loss2({rows}, TM_DTYPE_FLOAT32), lse2({rows}, TM_DTYPE_FLOAT32);
  loss2.poison();
  lse2.poison();
  // In place: the gradient overwrites the logits it is formed from.
  TM_ASSERT_OK(tm_cross_entropy_forward_backward(b.grad_loss.desc(), b.logits.desc(),
                                                 b.labels.desc(), kIgnore, loss2.desc(),
                                                 lse2.desc(), b.logits.desc(), nullptr));
  EXPECT_EQ(loss2.values(), b.loss.values());
  EXPECT_EQ(lse2.values(), b.lse.values());
  EXPECT_EQ(b.logits.values(), b.grad.values());
}

TEST(CrossEntropy, ForwardBackwardRejectsAMisalignedAlias) {
  const int64_t rows = 4, vocab = 16;
  HostTensor logits({rows, vocab}, TM_DTYPE_FLOAT32);
  HostTensor labels({rows}, TM_DTYPE_INT64);
  HostTensor loss({rows}, TM_DTYPE_FLOAT32), lse({rows}, TM_DTYPE_FLOAT32);
  HostTensor grad_loss({rows}, TM_DTYPE_FLOAT32);
  tm_tensor as_bf16 = *logits.desc();
  as_bf16.dtype = TM_DTYPE_BFLOAT16;
  TM_EXPECT_ERROR(
      tm_cross_entropy_forward_backward(grad_loss.desc(), logits.desc(), labels.desc(), kIgnore,
                                        loss.desc(), lse.desc(), &as_bf16, nullptr),
      TM_ERR_INVALID_ARGUMENT, "aliases logits");
}

INSTANTIATE_TEST_SUITE_P(CrossEntropy, CrossEntropyTest,
                         ::testing::Values(TM_DTYPE_FLOAT32, TM_DTYPE_BFLOAT16));

TEST(CrossEntropy, IsDeterministic) {
  auto rng = turbomoe::testing::rng_for_test();
  const int64_t rows = 6, vocab = 1000;
  HostTensor logits({rows, vocab}, TM_DTYPE_FLOAT32);
  logits.fill_uniform(rng, -10, 10);
  HostTensor labels = random_labels(rows, vocab, rng);
  HostTensor grad_loss({rows}, TM_DTYPE_FLOAT32);
  grad_loss.fill_uniform(rng);
  std::vector<double> first_loss, first_grad;
  for (int run = 0; run < 2; ++run) {
    HostTensor loss({rows}, TM_DTYPE_FLOAT32), lse({rows}, TM_DTYPE_FLOAT32);
    HostTensor grad({rows, vocab}, TM_DTYPE_FLOAT32);
    loss.poison();
    grad.poison();
    TM_ASSERT_OK(tm_cross_entropy_forward(logits.desc(), labels.desc(), kIgnore, loss.desc(),
                                          lse.desc(), nullptr));
    TM_ASSERT_OK(tm_cross_entropy_backward(grad_loss.desc(), logits.desc(), labels.desc(),
                                           lse.desc(), kIgnore, grad.desc(), nullptr));
    if (run == 0) {
      first_loss = loss.values();
      first_grad = grad.values();
    } else {
      EXPECT_EQ(loss.values(), first_loss);
      EXPECT_EQ(grad.values(), first_grad);
    }
  }
}

TEST(CrossEntropy, ZeroRowsIsANoOp) {
  HostTensor logits({0, 10}, TM_DTYPE_FLOAT32), labels({0}, TM_DTYPE_INT64);
  HostTensor loss({0}, TM_DTYPE_FLOAT32), lse({0}, TM_DTYPE_FLOAT32);
  TM_ASSERT_OK(tm_cross_entropy_forward(logits.desc(), labels.desc(), kIgnore, loss.desc(),
                                        lse.desc(), nullptr));
  TM_ASSERT_OK(tm_cross_entropy_backward(loss.desc(), logits.desc(), labels.desc(), lse.desc(),
                                         kIgnore, logits.desc(), nullptr));
}

// Autograd hands empty gradients with stride 0: they carry no layout and must be accepted as is.
TEST(CrossEntropy, EmptyTensorsWithZeroStridesAreAccepted) {
  HostTensor logits({0, 10}, TM_DTYPE_FLOAT32), labels({0}, TM_DTYPE_INT64);
  HostTensor loss({0}, TM_DTYPE_FLOAT32), lse({0}, TM_DTYPE_FLOAT32);
  tm_tensor grad = *logits.desc();
  grad.strides[0] = grad.strides[1] = 0;
  TM_ASSERT_OK(
      tm_cross_entropy_forward(&grad, labels.desc(), kIgnore, loss.desc(), lse.desc(), nullptr));
  TM_ASSERT_OK(tm_cross_entropy_backward(loss.desc(), &grad, labels.desc(), lse.desc(), kIgnore,
                                         &grad, nullptr));
}

TEST(CrossEntropy, RejectsBadArguments) {
  HostTensor logits({4, 10}, TM_DTYPE_FLOAT32), labels({4}, TM_DTYPE_INT64);
  HostTensor loss({4}, TM_DTYPE_FLOAT32), lse({4}, TM_DTYPE_FLOAT32),
      grad({4, 10}, TM_DTYPE_FLOAT32);
  HostTensor int_logits({4, 10}, TM_DTYPE_INT32), f16_logits({4, 10}, TM_DTYPE_FLOAT16);
  HostTensor float_labels({4}, TM_DTYPE_FLOAT32), short_labels({3}, TM_DTYPE_INT64);
  HostTensor bf16_loss({4}, TM_DTYPE_BFLOAT16), short_lse({5}, TM_DTYPE_FLOAT32);
  HostTensor no_classes({4, 0}, TM_DTYPE_FLOAT32), rank3({4, 10, 1}, TM_DTYPE_FLOAT32);
  HostTensor grad_short({4, 9}, TM_DTYPE_FLOAT32), grad_bf16({4, 10}, TM_DTYPE_BFLOAT16);
  for (int64_t r = 0; r < 4; ++r) labels.set(r, r);
  auto fwd = [&](const tm_tensor* a, const tm_tensor* b, tm_tensor* c, tm_tensor* d) {
    return tm_cross_entropy_forward(a, b, kIgnore, c, d, nullptr);
  };
  TM_EXPECT_ERROR(fwd(nullptr, labels.desc(), loss.desc(), lse.desc()), TM_ERR_INVALID_ARGUMENT,
                  "logits is NULL");
  TM_EXPECT_ERROR(fwd(logits.desc(), nullptr, loss.desc(), lse.desc()), TM_ERR_INVALID_ARGUMENT,
                  "labels is NULL");
  TM_EXPECT_ERROR(fwd(logits.desc(), labels.desc(), nullptr, lse.desc()), TM_ERR_INVALID_ARGUMENT,
                  "loss is NULL");
  TM_EXPECT_ERROR(fwd(logits.desc(), labels.desc(), loss.desc(), nullptr), TM_ERR_INVALID_ARGUMENT,
                  "lse is NULL");
  TM_EXPECT_ERROR(fwd(int_logits.desc(), labels.desc(), loss.desc(), lse.desc()),
                  TM_ERR_INVALID_ARGUMENT, "logits has dtype int32");
  TM_EXPECT_ERROR(fwd(f16_logits.desc(), labels.desc(), loss.desc(), lse.desc()),
                  TM_ERR_INVALID_ARGUMENT, "logits has dtype float16");
  TM_EXPECT_ERROR(fwd(rank3.desc(), labels.desc(), loss.desc(), lse.desc()),
                  TM_ERR_INVALID_ARGUMENT, "logits must have rank 2");
  TM_EXPECT_ERROR(fwd(no_classes.desc(), labels.desc(), loss.desc(), lse.desc()),
                  TM_ERR_INVALID_ARGUMENT, "logits has no classes");
  TM_EXPECT_ERROR(fwd(logits.desc(), float_labels.desc(), loss.desc(), lse.desc()),
                  TM_ERR_INVALID_ARGUMENT, "labels has dtype float32");
  TM_EXPECT_ERROR(fwd(logits.desc(), short_labels.desc(), loss.desc(), lse.desc()),
                  TM_ERR_INVALID_ARGUMENT, "labels has shape [3]");
  TM_EXPECT_ERROR(fwd(logits.desc(), labels.desc(), bf16_loss.desc(), lse.desc()),
                  TM_ERR_INVALID_ARGUMENT, "loss has dtype bfloat16");
  TM_EXPECT_ERROR(fwd(logits.desc(), labels.desc(), loss.desc(), short_lse.desc()),
                  TM_ERR_INVALID_ARGUMENT, "lse has shape [5]");
  tm_tensor transposed = *logits.desc();  // [10, 4] view with last-dim stride 10
  transposed.sizes[0] = 10;
  transposed.sizes[1] = 4;
  transposed.strides[0] = 1;
  transposed.strides[1] = 10;
  HostTensor labels10({10}, TM_DTYPE_INT64), loss10({10}, TM_DTYPE_FLOAT32);
  TM_EXPECT_ERROR(fwd(&transposed, labels10.desc(), loss10.desc(), loss10.desc()),
                  TM_ERR_INVALID_ARGUMENT, "logits must have a contiguous last dimension");
  tm_tensor labels_gpu = *labels.desc();
  labels_gpu.device_type = TM_DEVICE_CUDA;
  TM_EXPECT_ERROR(fwd(logits.desc(), &labels_gpu, loss.desc(), lse.desc()), TM_ERR_INVALID_ARGUMENT,
                  "all tensors must share one device");

  // Labels outside [0, V) that are not ignore_index.
  labels.set(2, 10);
  TM_EXPECT_ERROR(fwd(logits.desc(), labels.desc(), loss.desc(), lse.desc()),
                  TM_ERR_INVALID_ARGUMENT, "labels[2] is 10, outside [0, 10)");
  labels.set(2, -1);
  TM_EXPECT_ERROR(fwd(logits.desc(), labels.desc(), loss.desc(), lse.desc()),
                  TM_ERR_INVALID_ARGUMENT, "labels[2] is -1");
  TM_EXPECT_ERROR(tm_cross_entropy_backward(loss.desc(), logits.desc(), labels.desc(), lse.desc(),
                                            kIgnore, grad.desc(), nullptr),
                  TM_ERR_INVALID_ARGUMENT, "labels[2] is -1");
  labels.set(2, 2);

  auto bwd = [&](const tm_tensor* gl, const tm_tensor* lg, const tm_tensor* lb, const tm_tensor* ls,
                 tm_tensor* g) {
    return tm_cross_entropy_backward(gl, lg, lb, ls, kIgnore, g, nullptr);
  };
  TM_EXPECT_ERROR(bwd(nullptr, logits.desc(), labels.desc(), lse.desc(), grad.desc()),
                  TM_ERR_INVALID_ARGUMENT, "grad_loss is NULL");
  TM_EXPECT_ERROR(bwd(loss.desc(), logits.desc(), labels.desc(), nullptr, grad.desc()),
                  TM_ERR_INVALID_ARGUMENT, "lse is NULL");
  TM_EXPECT_ERROR(bwd(loss.desc(), logits.desc(), labels.desc(), lse.desc(), nullptr),
                  TM_ERR_INVALID_ARGUMENT, "grad_logits is NULL");
  TM_EXPECT_ERROR(bwd(bf16_loss.desc(), logits.desc(), labels.desc(), lse.desc(), grad.desc()),
                  TM_ERR_INVALID_ARGUMENT, "grad_loss has dtype bfloat16");
  TM_EXPECT_ERROR(bwd(loss.desc(), logits.desc(), labels.desc(), lse.desc(), grad_short.desc()),
                  TM_ERR_INVALID_ARGUMENT, "grad_logits has shape");
  tm_tensor alias_bf16 = *grad_bf16.desc();
  alias_bf16.data = logits.desc()->data;
  TM_EXPECT_ERROR(bwd(loss.desc(), logits.desc(), labels.desc(), lse.desc(), &alias_bf16),
                  TM_ERR_INVALID_ARGUMENT, "grad_logits aliases logits");
}

}  // namespace
