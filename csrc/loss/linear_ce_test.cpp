// Fused linear cross-entropy (CPU) against a double-precision reference of hidden . weight^T
// followed by cross-entropy, with ignored rows and chunk sizes that do not divide N or exceed
// it; gradients against finite differences; bitwise independence from chunk_rows; workspace
// sizes; the CUDA refusal; every argument error.
#include <cmath>
#include <vector>

#include "common/test_util.h"

namespace {

using turbomoe::testing::HostTensor;
using turbomoe::testing::rel_error;

constexpr int64_t kIgnore = -100;

tm_linear_ce_params params(int64_t chunk_rows) {
  tm_linear_ce_params p{};
  p.struct_size = sizeof p;
  p.ignore_index = kIgnore;
  p.chunk_rows = chunk_rows;
  return p;
}

struct Problem {
  int64_t n, hidden, vocab;
};

// Random inputs of one problem in one dtype; about one row in four ignored (never the first).
struct Inputs {
  HostTensor hidden, weight, labels, grad_loss;
  Inputs(const Problem& p, int32_t dtype, std::mt19937_64& rng)
      : hidden({p.n, p.hidden}, dtype),
        weight({p.vocab, p.hidden}, dtype),
        labels({p.n}, TM_DTYPE_INT64),
        grad_loss({p.n}, TM_DTYPE_FLOAT32) {
    hidden.fill_uniform(rng, -1, 1);
    weight.fill_uniform(rng, -0.5, 0.5);
    grad_loss.fill_uniform(rng, 0.5, 2);
    std::uniform_int_distribution<int64_t> cls(0, p.vocab - 1), quarter(0, 3);
    for (int64_t r = 0; r < p.n; ++r)
      labels.set(r, r > 0 && quarter(rng) == 0 ? kIgnore : cls(rng));
  }
};

// Per-row losses of the double reference from explicit double tensors.
struct Reference {
  int64_t n, h, v;
  std::vector<double> hidden, weight, labels;

  double logit(int64_t r, int64_t c) const {
    double z = 0;
    for (int64_t k = 0; k < h; ++k) z += hidden[r * h + k] * weight[c * h + k];
    return z;
  }
  double lse(int64_t r) const {
    std::vector<double> z(v);
    double m = -INFINITY;
    for (int64_t c = 0; c < v; ++c) m = std::max(m, z[c] = logit(r, c));
    double s = 0;
    for (double x : z) s += std::exp(x - m);
    return m + std::log(s);
  }
  double loss(int64_t r) const {
    const auto label = static_cast<int64_t>(labels[r]);
    return label == kIgnore ? 0.0 : lse(r) - logit(r, label);
  }
};

Reference reference(const Problem& p, const Inputs& in) {
  return {p.n, p.hidden, p.vocab, in.hidden.values(), in.weight.values(), in.labels.values()};
}

std::vector<float> workspace_for(const tm_linear_ce_params& prm, const Problem& p) {
  size_t bytes = 0;
  EXPECT_EQ(
      tm_linear_cross_entropy_workspace_size(&prm, p.n, p.hidden, p.vocab, TM_DEVICE_CPU, &bytes),
      TM_OK);
  return std::vector<float>(bytes / sizeof(float) + 1);
}

struct Outputs {
  HostTensor loss, lse, grad_hidden, grad_weight;
};

// Forward then backward; grad_weight in gw_dtype (0: not requested).
Outputs run(const tm_linear_ce_params& prm, const Problem& p, Inputs& in, int32_t gw_dtype) {
  const int32_t dtype = in.hidden.dtype();
  Outputs o{HostTensor({p.n}, TM_DTYPE_FLOAT32), HostTensor({p.n}, TM_DTYPE_FLOAT32),
            HostTensor({p.n, p.hidden}, dtype),
            HostTensor({p.vocab, p.hidden}, gw_dtype ? gw_dtype : TM_DTYPE_FLOAT32)};
  o.loss.poison();
  o.lse.poison();
  o.grad_hidden.poison();
  o.grad_weight.poison();
  std::vector<float> ws = workspace_for(prm, p);
  const size_t ws_bytes = ws.size() * sizeof(float);
  EXPECT_EQ(
      tm_linear_cross_entropy_forward(&prm, in.hidden.desc(), in.weight.desc(), in.labels.desc(),
                                      o.loss.desc(), o.lse.desc(), ws.data(), ws_bytes, nullptr),
      TM_OK)
      << tm_last_error();
  EXPECT_EQ(tm_linear_cross_entropy_backward(
                &prm, in.grad_loss.desc(), in.hidden.desc(), in.weight.desc(), in.labels.desc(),
                o.lse.desc(), o.grad_hidden.desc(), gw_dtype ? o.grad_weight.desc() : nullptr,
                ws.data(), ws_bytes, nullptr),
            TM_OK)
      << tm_last_error();
  return o;
}

class LinearCrossEntropyTest : public ::testing::TestWithParam<int32_t> {};

TEST_P(LinearCrossEntropyTest, ForwardMatchesDoubleReference) {
  const int32_t dtype = GetParam();
  auto rng = turbomoe::testing::rng_for_test();
  const std::pair<Problem, int64_t> cases[] = {
      {{13, 72, 300}, 4},  // chunk_rows does not divide N
      {{5, 16, 40}, 8},    // N < chunk_rows
      {{1, 1, 1}, 1},
      {{29, 33, 7}, 29},
  };
  for (const auto& [p, chunk] : cases) {
    Inputs in(p, dtype, rng);
    const Reference ref = reference(p, in);
    const Outputs o = run(params(chunk), p, in, 0);
    std::vector<double> want_loss, want_lse;
    for (int64_t r = 0; r < p.n; ++r) {
      const bool ignored = static_cast<int64_t>(ref.labels[r]) == kIgnore;
      want_loss.push_back(ref.loss(r));
      want_lse.push_back(ignored ? 0.0 : ref.lse(r));
    }
    // Inputs are exact in either dtype; the arithmetic is float32.
    EXPECT_LT(rel_error(o.loss.values(), want_loss), 1e-5) << p.n << "x" << p.hidden;
    EXPECT_LT(rel_error(o.lse.values(), want_lse), 1e-5);
  }
}

TEST_P(LinearCrossEntropyTest, BackwardMatchesFiniteDifferences) {
  const int32_t dtype = GetParam();
  auto rng = turbomoe::testing::rng_for_test();
  const Problem p{13, 72, 40};
  Inputs in(p, dtype, rng);
  Reference ref = reference(p, in);
  const std::vector<double> gl = in.grad_loss.values();
  for (int32_t gw_dtype : {int32_t{TM_DTYPE_FLOAT32}, dtype}) {
    const Outputs o = run(params(5), p, in, gw_dtype);
    const double h = 1e-5;
    // d/d hidden[r, k] touches only row r's loss.
    std::vector<double> want_gh;
    for (int64_t r = 0; r < p.n; ++r) {
      for (int64_t k = 0; k < p.hidden; ++k) {
        double& x = ref.hidden[r * p.hidden + k];
        const double keep = x;
        x = keep + h;
        const double up = ref.loss(r);
        x = keep - h;
        const double down = ref.loss(r);
        x = keep;
        want_gh.push_back(gl[r] * (up - down) / (2 * h));
      }
    }
    std::vector<double> want_gw;
    for (int64_t i = 0; i < p.vocab * p.hidden; ++i) {
      double& w = ref.weight[i];
      const double keep = w;
      double up = 0, down = 0;
      w = keep + h;
      for (int64_t r = 0; r < p.n; ++r) up += gl[r] * ref.loss(r);
      w = keep - h;
      for (int64_t r = 0; r < p.n; ++r) down += gl[r] * ref.loss(r);
      w = keep;
      want_gw.push_back((up - down) / (2 * h));
    }
    const double tol = dtype == TM_DTYPE_FLOAT32 ? 1e-4 : 1e-2;
    EXPECT_LT(rel_error(o.grad_hidden.values(), want_gh), tol);
    EXPECT_LT(rel_error(o.grad_weight.values(), want_gw), gw_dtype == TM_DTYPE_FLOAT32 ? 1e-4 : tol)
        << "grad_weight dtype " << gw_dtype;
  }
}

// Every sum runs in an order independent of the chunking, so the results are bitwise equal.
TEST_P(LinearCrossEntropyTest, ResultsDoNotDependOnChunkRows) {
  const int32_t dtype = GetParam();
  auto rng = turbomoe::testing::rng_for_test();
  const Problem p{13, 72, 300};
  Inputs in(p, dtype, rng);
  const Outputs first = run(params(13), p, in, dtype);
  for (int64_t chunk : {1, 3, 4, 13, 100}) {
    const Outputs o = run(params(chunk), p, in, dtype);
    EXPECT_EQ(o.loss.values(), first.loss.values()) << "chunk_rows " << chunk;
    EXPECT_EQ(o.lse.values(), first.lse.values());
    EXPECT_EQ(o.grad_hidden.values(), first.grad_hidden.values());
    EXPECT_EQ(o.grad_weight.values(), first.grad_weight.values());
  }
}

INSTANTIATE_TEST_SUITE_P(LinearCrossEntropy, LinearCrossEntropyTest,
                         ::testing::Values(TM_DTYPE_FLOAT32, TM_DTYPE_BFLOAT16));

TEST(LinearCrossEntropy, ZeroRowsZeroGradWeight) {
  const tm_linear_ce_params prm = params(4);
  HostTensor hidden({0, 8}, TM_DTYPE_BFLOAT16), weight({5, 8}, TM_DTYPE_BFLOAT16);
  HostTensor labels({0}, TM_DTYPE_INT64), per_row({0}, TM_DTYPE_FLOAT32);
  HostTensor grad_weight({5, 8}, TM_DTYPE_BFLOAT16);
  size_t bytes = 1;
  TM_ASSERT_OK(tm_linear_cross_entropy_workspace_size(&prm, 0, 8, 5, TM_DEVICE_CPU, &bytes));
  EXPECT_EQ(bytes, 0u);
  TM_ASSERT_OK(tm_linear_cross_entropy_forward(&prm, hidden.desc(), weight.desc(), labels.desc(),
                                               per_row.desc(), per_row.desc(), nullptr, 0,
                                               nullptr));
  grad_weight.poison();
  TM_ASSERT_OK(tm_linear_cross_entropy_backward(&prm, per_row.desc(), hidden.desc(), weight.desc(),
                                                labels.desc(), per_row.desc(), hidden.desc(),
                                                grad_weight.desc(), nullptr, 0, nullptr));
  EXPECT_EQ(grad_weight.values(), std::vector<double>(40, 0.0));
}

TEST(LinearCrossEntropy, WorkspaceSize) {
  const tm_linear_ce_params prm = params(4);
  size_t cpu = 0, cuda = 0;
  TM_ASSERT_OK(tm_linear_cross_entropy_workspace_size(&prm, 13, 72, 300, TM_DEVICE_CPU, &cpu));
  // weight^T, a logits chunk and a hidden chunk, plus the bfloat16 backward's two [V,H] buffers.
  EXPECT_EQ(cpu, (72u * 300u + 4u * 300u + 4u * 72u + 2u * 300u * 72u) * 4u);
  TM_ASSERT_OK(tm_linear_cross_entropy_workspace_size(&prm, 13, 72, 300, TM_DEVICE_CUDA, &cuda));
  EXPECT_EQ(cuda, 4u * 300u * 4u);  // one float32 logits chunk
  TM_ASSERT_OK(tm_linear_cross_entropy_workspace_size(&prm, 2, 72, 300, TM_DEVICE_CUDA, &cuda));
  EXPECT_EQ(cuda, 2u * 300u * 4u);  // N < chunk_rows
  TM_EXPECT_ERROR(tm_linear_cross_entropy_workspace_size(nullptr, 13, 72, 300, TM_DEVICE_CPU, &cpu),
                  TM_ERR_INVALID_ARGUMENT, "params is NULL");
  TM_EXPECT_ERROR(tm_linear_cross_entropy_workspace_size(&prm, 13, 72, 300, TM_DEVICE_CPU, nullptr),
                  TM_ERR_INVALID_ARGUMENT, "bytes is NULL");
  TM_EXPECT_ERROR(tm_linear_cross_entropy_workspace_size(&prm, -1, 72, 300, TM_DEVICE_CPU, &cpu),
                  TM_ERR_INVALID_ARGUMENT, "n is -1");
  TM_EXPECT_ERROR(tm_linear_cross_entropy_workspace_size(&prm, 13, -1, 300, TM_DEVICE_CPU, &cpu),
                  TM_ERR_INVALID_ARGUMENT, "hidden is -1");
  TM_EXPECT_ERROR(tm_linear_cross_entropy_workspace_size(&prm, 13, 72, 0, TM_DEVICE_CPU, &cpu),
                  TM_ERR_INVALID_ARGUMENT, "vocab is 0");
  TM_EXPECT_ERROR(tm_linear_cross_entropy_workspace_size(&prm, 13, 72, 300, 0, &cpu),
                  TM_ERR_INVALID_ARGUMENT, "device_type");
  const int64_t huge = int64_t{1} << 40;
  TM_EXPECT_ERROR(
      tm_linear_cross_entropy_workspace_size(&prm, huge, huge, huge, TM_DEVICE_CPU, &cpu),
      TM_ERR_INVALID_ARGUMENT, "does not fit");
}

TEST(LinearCrossEntropy, RefusesCuda) {
  const tm_linear_ce_params prm = params(4);
  HostTensor hidden({4, 8}, TM_DTYPE_FLOAT32), weight({5, 8}, TM_DTYPE_FLOAT32);
  HostTensor labels({4}, TM_DTYPE_INT64), loss({4}, TM_DTYPE_FLOAT32), lse({4}, TM_DTYPE_FLOAT32);
  std::vector<tm_tensor> g;
  for (HostTensor* t : {&hidden, &weight, &labels, &loss, &lse}) {
    g.push_back(*t->desc());
    g.back().device_type = TM_DEVICE_CUDA;
  }
  TM_EXPECT_ERROR(
      tm_linear_cross_entropy_forward(&prm, &g[0], &g[1], &g[2], &g[3], &g[4], nullptr, 0, nullptr),
      TM_ERR_UNSUPPORTED, "cuBLAS");
  TM_EXPECT_ERROR(tm_linear_cross_entropy_backward(&prm, &g[3], &g[0], &g[1], &g[2], &g[4], &g[0],
                                                   nullptr, nullptr, 0, nullptr),
                  TM_ERR_UNSUPPORTED, "tm_cross_entropy_forward/backward");
}

TEST(LinearCrossEntropy, RejectsBadArguments) {
  tm_linear_ce_params prm = params(4);
  const Problem p{4, 8, 5};
  HostTensor hidden({4, 8}, TM_DTYPE_FLOAT32), weight({5, 8}, TM_DTYPE_FLOAT32);
  HostTensor labels({4}, TM_DTYPE_INT64), loss({4}, TM_DTYPE_FLOAT32), lse({4}, TM_DTYPE_FLOAT32);
  HostTensor grad_hidden({4, 8}, TM_DTYPE_FLOAT32), grad_weight({5, 8}, TM_DTYPE_FLOAT32);
  HostTensor weight_bf16({5, 8}, TM_DTYPE_BFLOAT16), weight_h7({5, 7}, TM_DTYPE_FLOAT32);
  HostTensor labels5({5}, TM_DTYPE_INT64), loss_bf16({4}, TM_DTYPE_BFLOAT16);
  HostTensor gh_short({3, 8}, TM_DTYPE_FLOAT32), gw_bf16({5, 8}, TM_DTYPE_BFLOAT16);
  HostTensor gw_short({4, 8}, TM_DTYPE_FLOAT32), no_vocab({0, 8}, TM_DTYPE_FLOAT32);
  for (int64_t r = 0; r < 4; ++r) labels.set(r, r);
  std::vector<float> ws = workspace_for(prm, p);
  const size_t bytes = ws.size() * sizeof(float);
  auto fwd = [&](const tm_tensor* h, const tm_tensor* w, const tm_tensor* lb, tm_tensor* l,
                 tm_tensor* e) {
    return tm_linear_cross_entropy_forward(&prm, h, w, lb, l, e, ws.data(), bytes, nullptr);
  };
  auto bwd = [&](const tm_tensor* gl, const tm_tensor* lb, tm_tensor* gh, tm_tensor* gw) {
    return tm_linear_cross_entropy_backward(&prm, gl, hidden.desc(), weight.desc(), lb, lse.desc(),
                                            gh, gw, ws.data(), bytes, nullptr);
  };
  TM_EXPECT_ERROR(fwd(nullptr, weight.desc(), labels.desc(), loss.desc(), lse.desc()),
                  TM_ERR_INVALID_ARGUMENT, "hidden is NULL");
  TM_EXPECT_ERROR(fwd(hidden.desc(), nullptr, labels.desc(), loss.desc(), lse.desc()),
                  TM_ERR_INVALID_ARGUMENT, "weight is NULL");
  TM_EXPECT_ERROR(fwd(hidden.desc(), weight.desc(), nullptr, loss.desc(), lse.desc()),
                  TM_ERR_INVALID_ARGUMENT, "labels is NULL");
  TM_EXPECT_ERROR(fwd(hidden.desc(), weight.desc(), labels.desc(), nullptr, lse.desc()),
                  TM_ERR_INVALID_ARGUMENT, "loss is NULL");
  TM_EXPECT_ERROR(fwd(hidden.desc(), weight.desc(), labels.desc(), loss.desc(), nullptr),
                  TM_ERR_INVALID_ARGUMENT, "lse is NULL");
  TM_EXPECT_ERROR(fwd(hidden.desc(), weight_bf16.desc(), labels.desc(), loss.desc(), lse.desc()),
                  TM_ERR_INVALID_ARGUMENT, "weight has dtype bfloat16 but hidden has float32");
  TM_EXPECT_ERROR(fwd(hidden.desc(), weight_h7.desc(), labels.desc(), loss.desc(), lse.desc()),
                  TM_ERR_INVALID_ARGUMENT, "the hidden size of hidden");
  TM_EXPECT_ERROR(fwd(hidden.desc(), no_vocab.desc(), labels.desc(), loss.desc(), lse.desc()),
                  TM_ERR_INVALID_ARGUMENT, "weight has no classes");
  TM_EXPECT_ERROR(fwd(hidden.desc(), weight.desc(), labels5.desc(), loss.desc(), lse.desc()),
                  TM_ERR_INVALID_ARGUMENT, "labels has shape [5]");
  TM_EXPECT_ERROR(fwd(hidden.desc(), weight.desc(), labels.desc(), loss_bf16.desc(), lse.desc()),
                  TM_ERR_INVALID_ARGUMENT, "loss has dtype bfloat16");
  tm_tensor hidden_cols = *hidden.desc();  // last-dim stride 2
  hidden_cols.sizes[1] = 4;
  hidden_cols.strides[1] = 2;
  HostTensor weight4({5, 4}, TM_DTYPE_FLOAT32);
  TM_EXPECT_ERROR(fwd(&hidden_cols, weight4.desc(), labels.desc(), loss.desc(), lse.desc()),
                  TM_ERR_INVALID_ARGUMENT, "hidden must have a contiguous last dimension");
  labels.set(1, 5);
  TM_EXPECT_ERROR(fwd(hidden.desc(), weight.desc(), labels.desc(), loss.desc(), lse.desc()),
                  TM_ERR_INVALID_ARGUMENT, "labels[1] is 5, outside [0, 5)");
  TM_EXPECT_ERROR(bwd(loss.desc(), labels.desc(), grad_hidden.desc(), grad_weight.desc()),
                  TM_ERR_INVALID_ARGUMENT, "labels[1] is 5");
  labels.set(1, 1);
  TM_EXPECT_ERROR(tm_linear_cross_entropy_forward(&prm, hidden.desc(), weight.desc(), labels.desc(),
                                                  loss.desc(), lse.desc(), ws.data(), 64, nullptr),
                  TM_ERR_OUT_OF_MEMORY, "workspace_bytes is 64");
  TM_EXPECT_ERROR(tm_linear_cross_entropy_forward(&prm, hidden.desc(), weight.desc(), labels.desc(),
                                                  loss.desc(), lse.desc(), nullptr, bytes, nullptr),
                  TM_ERR_INVALID_ARGUMENT, "workspace is NULL");
  TM_EXPECT_ERROR(tm_linear_cross_entropy_forward(
                      &prm, hidden.desc(), weight.desc(), labels.desc(), loss.desc(), lse.desc(),
                      reinterpret_cast<char*>(ws.data()) + 4, bytes - 4, nullptr),
                  TM_ERR_INVALID_ARGUMENT, "workspace must be 16-byte aligned");

  TM_EXPECT_ERROR(bwd(nullptr, labels.desc(), grad_hidden.desc(), grad_weight.desc()),
                  TM_ERR_INVALID_ARGUMENT, "grad_loss is NULL");
  TM_EXPECT_ERROR(bwd(loss.desc(), labels.desc(), nullptr, grad_weight.desc()),
                  TM_ERR_INVALID_ARGUMENT, "grad_hidden is NULL");
  TM_EXPECT_ERROR(bwd(loss_bf16.desc(), labels.desc(), grad_hidden.desc(), grad_weight.desc()),
                  TM_ERR_INVALID_ARGUMENT, "grad_loss has dtype bfloat16");
  TM_EXPECT_ERROR(bwd(loss.desc(), labels.desc(), gh_short.desc(), grad_weight.desc()),
                  TM_ERR_INVALID_ARGUMENT, "grad_hidden has shape");
  TM_EXPECT_ERROR(bwd(loss.desc(), labels.desc(), grad_hidden.desc(), gw_bf16.desc()),
                  TM_ERR_INVALID_ARGUMENT, "grad_weight has dtype bfloat16 but weight has float32");
  TM_EXPECT_ERROR(bwd(loss.desc(), labels.desc(), grad_hidden.desc(), gw_short.desc()),
                  TM_ERR_INVALID_ARGUMENT, "grad_weight has shape");
  TM_EXPECT_ERROR(tm_linear_cross_entropy_backward(&prm, loss.desc(), hidden.desc(), weight.desc(),
                                                   labels.desc(), lse.desc(), grad_hidden.desc(),
                                                   grad_weight.desc(), ws.data(), 8, nullptr),
                  TM_ERR_OUT_OF_MEMORY, "workspace_bytes is 8");

  prm.chunk_rows = 0;
  TM_EXPECT_ERROR(fwd(hidden.desc(), weight.desc(), labels.desc(), loss.desc(), lse.desc()),
                  TM_ERR_INVALID_ARGUMENT, "params.chunk_rows is 0");
  prm = params(4);
  prm.struct_size = 8;
  TM_EXPECT_ERROR(fwd(hidden.desc(), weight.desc(), labels.desc(), loss.desc(), lse.desc()),
                  TM_ERR_INVALID_ARGUMENT, "params.struct_size");
  TM_EXPECT_ERROR(
      tm_linear_cross_entropy_forward(nullptr, hidden.desc(), weight.desc(), labels.desc(),
                                      loss.desc(), lse.desc(), ws.data(), bytes, nullptr),
      TM_ERR_INVALID_ARGUMENT, "params is NULL");
}

}  // namespace
