// The combine and its backward against double-precision loops, the weight gradient against
// finite differences, and every argument error.
#include <algorithm>
#include <vector>

#include "common/test_util.h"

namespace {

using turbomoe::testing::HostTensor;
using turbomoe::testing::rel_error;

// pair_to_row of a random routing: each token's slots land on distinct rows of [0, M), some
// dropped (-1), and some rows left unreached.
HostTensor random_pair_to_row(std::mt19937_64& rng, int64_t tokens, int64_t top_k, int64_t rows) {
  std::vector<int32_t> perm(static_cast<size_t>(rows));
  for (int64_t r = 0; r < rows; ++r) perm[r] = static_cast<int32_t>(r);
  std::shuffle(perm.begin(), perm.end(), rng);
  HostTensor p2r({tokens * top_k}, TM_DTYPE_INT32);
  std::uniform_real_distribution<double> coin(0, 1);
  for (int64_t p = 0; p < tokens * top_k; ++p) {
    p2r.set(p, coin(rng) < 0.2 || p >= rows ? -1.0 : perm[p]);
  }
  return p2r;
}

double tol(int32_t dtype) { return dtype == TM_DTYPE_FLOAT32 ? 1e-5 : 1e-2; }

struct Case {
  int32_t dtype, weight_dtype;  // weight_dtype 0: no weights
};

class CombineTest : public ::testing::TestWithParam<Case> {};

TEST_P(CombineTest, ForwardMatchesDoubleReference) {
  const auto [dtype, weight_dtype] = GetParam();
  auto rng = turbomoe::testing::rng_for_test();
  for (auto [tokens, top_k, hidden] : {std::tuple{13, 2, 72}, std::tuple{5, 8, 13}}) {
    const int64_t rows = tokens * top_k;
    HostTensor r({rows, hidden}, dtype), out({tokens, hidden}, dtype);
    HostTensor w({tokens, top_k}, weight_dtype ? weight_dtype : TM_DTYPE_FLOAT32);
    HostTensor p2r = random_pair_to_row(rng, tokens, top_k, rows);
    r.fill_uniform(rng);
    w.fill_uniform(rng, 0, 1);
    out.poison();
    TM_ASSERT_OK(tm_combine_forward(r.desc(), p2r.desc(), weight_dtype ? w.desc() : nullptr,
                                    out.desc(), nullptr));
    std::vector<double> ref(static_cast<size_t>(tokens * hidden), 0.0);
    for (int64_t t = 0; t < tokens; ++t) {
      for (int64_t k = 0; k < top_k; ++k) {
        const int64_t row = static_cast<int64_t>(p2r.get(t * top_k + k));
        if (row < 0) continue;
        const double wk = weight_dtype ? w.get(t * top_k + k) : 1.0;
        for (int64_t h = 0; h < hidden; ++h) ref[t * hidden + h] += wk * r.get(row * hidden + h);
      }
    }
    EXPECT_LT(rel_error(out.values(), ref), tol(dtype));
    // Deterministic: the same inputs give the same bits.
    HostTensor again({tokens, hidden}, dtype);
    again.poison();
    TM_ASSERT_OK(tm_combine_forward(r.desc(), p2r.desc(), weight_dtype ? w.desc() : nullptr,
                                    again.desc(), nullptr));
    EXPECT_EQ(again.values(), out.values());
  }
}

TEST_P(CombineTest, BackwardMatchesDoubleReference) {
  const auto [dtype, weight_dtype] = GetParam();
  auto rng = turbomoe::testing::rng_for_test();
  const int64_t tokens = 13, top_k = 2, hidden = 72, rows = tokens * top_k + 3;
  HostTensor r({rows, hidden}, dtype), go({tokens, hidden}, dtype);
  HostTensor gr({rows, hidden}, dtype), gw({tokens, top_k}, TM_DTYPE_FLOAT32);
  HostTensor w({tokens, top_k}, weight_dtype ? weight_dtype : TM_DTYPE_FLOAT32);
  HostTensor p2r = random_pair_to_row(rng, tokens, top_k, rows);
  r.fill_uniform(rng);
  go.fill_uniform(rng);
  w.fill_uniform(rng, 0, 1);
  gr.poison();
  gw.poison();
  tm_tensor* wd = weight_dtype ? w.desc() : nullptr;
  TM_ASSERT_OK(tm_combine_backward(go.desc(), r.desc(), p2r.desc(), wd, nullptr, gr.desc(),
                                   gw.desc(), nullptr));
  std::vector<double> ref_gr(static_cast<size_t>(rows * hidden), 0.0), ref_gw;
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t k = 0; k < top_k; ++k) {
      const int64_t row = static_cast<int64_t>(p2r.get(t * top_k + k));
      double dot = 0;
      if (row >= 0) {
        const double wk = weight_dtype ? w.get(t * top_k + k) : 1.0;
        for (int64_t h = 0; h < hidden; ++h) {
          ref_gr[row * hidden + h] = wk * go.get(t * hidden + h);
          dot += go.get(t * hidden + h) * r.get(row * hidden + h);
        }
      }
      ref_gw.push_back(dot);
    }
  }
  EXPECT_LT(rel_error(gr.values(), ref_gr), tol(dtype));
  EXPECT_LT(rel_error(gw.values(), ref_gw), tol(dtype));
  // Without grad_weights, rows may be NULL and grad_rows is unchanged.
  HostTensor gr2({rows, hidden}, dtype);
  gr2.poison();
  TM_ASSERT_OK(tm_combine_backward(go.desc(), nullptr, p2r.desc(), wd, nullptr, gr2.desc(), nullptr,
                                   nullptr));
  EXPECT_EQ(gr2.values(), gr.values());
}

INSTANTIATE_TEST_SUITE_P(Combine, CombineTest,
                         ::testing::Values(Case{TM_DTYPE_FLOAT32, TM_DTYPE_FLOAT32},
                                           Case{TM_DTYPE_FLOAT32, TM_DTYPE_BFLOAT16},
                                           Case{TM_DTYPE_FLOAT32, 0},
                                           Case{TM_DTYPE_BFLOAT16, TM_DTYPE_FLOAT32},
                                           Case{TM_DTYPE_BFLOAT16, TM_DTYPE_BFLOAT16},
                                           Case{TM_DTYPE_BFLOAT16, 0}));

TEST(Combine, WeightGradientMatchesFiniteDifferences) {
  auto rng = turbomoe::testing::rng_for_test();
  const int64_t tokens = 7, top_k = 3, hidden = 20, rows = tokens * top_k;
  HostTensor r({rows, hidden}, TM_DTYPE_FLOAT32), go({tokens, hidden}, TM_DTYPE_FLOAT32);
  HostTensor w({tokens, top_k}, TM_DTYPE_FLOAT32), gr({rows, hidden}, TM_DTYPE_FLOAT32);
  HostTensor gw({tokens, top_k}, TM_DTYPE_FLOAT32), out({tokens, hidden}, TM_DTYPE_FLOAT32);
  HostTensor p2r = random_pair_to_row(rng, tokens, top_k, rows);
  r.fill_uniform(rng);
  go.fill_uniform(rng);
  w.fill_uniform(rng, 0, 1);
  gw.poison();
  TM_ASSERT_OK(tm_combine_backward(go.desc(), r.desc(), p2r.desc(), w.desc(), nullptr, gr.desc(),
                                   gw.desc(), nullptr));
  // loss(w) = <grad_out, combine(rows, w)>, evaluated through the library's forward.
  auto loss = [&]() {
    EXPECT_EQ(tm_combine_forward(r.desc(), p2r.desc(), w.desc(), out.desc(), nullptr), TM_OK);
    double s = 0;
    for (int64_t i = 0; i < out.numel(); ++i) s += go.get(i) * out.get(i);
    return s;
  };
  std::vector<double> ref;
  const double h = 0.25;  // the loss is linear in w, so a large step only lowers rounding noise
  for (int64_t i = 0; i < w.numel(); ++i) {
    const double saved = w.get(i);
    w.set(i, saved + h);
    const double up = loss();
    w.set(i, saved - h);
    const double down = loss();
    w.set(i, saved);
    ref.push_back((up - down) / (2 * h));
  }
  EXPECT_LT(rel_error(gw.values(), ref), 1e-4);
}

TEST(Combine, ZeroTokens) {
  HostTensor r({4, 8}, TM_DTYPE_FLOAT32), p2r({0}, TM_DTYPE_INT32), out({0, 8}, TM_DTYPE_FLOAT32);
  HostTensor gr({4, 8}, TM_DTYPE_FLOAT32);
  TM_ASSERT_OK(tm_combine_forward(r.desc(), p2r.desc(), nullptr, out.desc(), nullptr));
  gr.poison();
  TM_ASSERT_OK(tm_combine_backward(out.desc(), nullptr, p2r.desc(), nullptr, nullptr, gr.desc(),
                                   nullptr, nullptr));
  EXPECT_EQ(gr.values(), std::vector<double>(32, 0.0));  // no row is reached: all zero
}

TEST(Combine, RejectsBadForwardArguments) {
  const int64_t tokens = 3, top_k = 2, hidden = 8, rows = 6;
  HostTensor r({rows, hidden}, TM_DTYPE_FLOAT32), p2r({6}, TM_DTYPE_INT32);
  HostTensor w({tokens, top_k}, TM_DTYPE_FLOAT32), out({tokens, hidden}, TM_DTYPE_FLOAT32);
  HostTensor out_bf({tokens, hidden}, TM_DTYPE_BFLOAT16),
      out_h({tokens, hidden + 1}, TM_DTYPE_FLOAT32);
  HostTensor r_f16({rows, hidden}, TM_DTYPE_FLOAT16), w_wrong({tokens, 3}, TM_DTYPE_FLOAT32);
  HostTensor w_int({tokens, top_k}, TM_DTYPE_INT32), p2r_5({5}, TM_DTYPE_INT32);
  HostTensor p2r_64({6}, TM_DTYPE_INT64), wide({rows, 2 * hidden}, TM_DTYPE_FLOAT32);
  for (int64_t p = 0; p < 6; ++p) p2r.set(p, p);
  auto fwd = [&](tm_tensor* a, tm_tensor* b, tm_tensor* c, tm_tensor* d) {
    return tm_combine_forward(a, b, c, d, nullptr);
  };
  TM_ASSERT_OK(fwd(r.desc(), p2r.desc(), w.desc(), out.desc()));
  TM_EXPECT_ERROR(fwd(nullptr, p2r.desc(), w.desc(), out.desc()), TM_ERR_INVALID_ARGUMENT, "rows");
  TM_EXPECT_ERROR(fwd(r.desc(), nullptr, w.desc(), out.desc()), TM_ERR_INVALID_ARGUMENT,
                  "pair_to_row");
  TM_EXPECT_ERROR(fwd(r.desc(), p2r.desc(), w.desc(), nullptr), TM_ERR_INVALID_ARGUMENT, "out");
  TM_EXPECT_ERROR(fwd(r_f16.desc(), p2r.desc(), w.desc(), out.desc()), TM_ERR_INVALID_ARGUMENT,
                  "rows");
  TM_EXPECT_ERROR(fwd(r.desc(), p2r.desc(), w.desc(), out_bf.desc()), TM_ERR_INVALID_ARGUMENT,
                  "out");
  TM_EXPECT_ERROR(fwd(r.desc(), p2r.desc(), w.desc(), out_h.desc()), TM_ERR_INVALID_ARGUMENT,
                  "out");
  TM_EXPECT_ERROR(fwd(r.desc(), p2r.desc(), w_wrong.desc(), out.desc()), TM_ERR_INVALID_ARGUMENT,
                  "pair_to_row");
  TM_EXPECT_ERROR(fwd(r.desc(), p2r.desc(), w_int.desc(), out.desc()), TM_ERR_INVALID_ARGUMENT,
                  "weights");
  TM_EXPECT_ERROR(fwd(r.desc(), p2r_5.desc(), w.desc(), out.desc()), TM_ERR_INVALID_ARGUMENT,
                  "pair_to_row");
  TM_EXPECT_ERROR(fwd(r.desc(), p2r_5.desc(), nullptr, out.desc()), TM_ERR_INVALID_ARGUMENT,
                  "pair_to_row");
  TM_EXPECT_ERROR(fwd(r.desc(), p2r_64.desc(), w.desc(), out.desc()), TM_ERR_INVALID_ARGUMENT,
                  "pair_to_row");
  tm_tensor every_other = *wide.desc();
  every_other.sizes[1] = hidden;
  every_other.strides[1] = 2;
  TM_EXPECT_ERROR(fwd(&every_other, p2r.desc(), w.desc(), out.desc()), TM_ERR_INVALID_ARGUMENT,
                  "rows");
  tm_tensor on_cuda = *w.desc();
  on_cuda.device_type = TM_DEVICE_CUDA;
  TM_EXPECT_ERROR(fwd(r.desc(), p2r.desc(), &on_cuda, out.desc()), TM_ERR_INVALID_ARGUMENT,
                  "weights");
  for (double bad : {-2.0, 6.0}) {
    p2r.set(4, bad);
    TM_EXPECT_ERROR(fwd(r.desc(), p2r.desc(), w.desc(), out.desc()), TM_ERR_INVALID_ARGUMENT,
                    "pair_to_row[4]");
  }
}

TEST(Combine, RejectsBadBackwardArguments) {
  const int64_t tokens = 3, top_k = 2, hidden = 8, rows = 6;
  HostTensor go({tokens, hidden}, TM_DTYPE_FLOAT32), r({rows, hidden}, TM_DTYPE_FLOAT32);
  HostTensor p2r({6}, TM_DTYPE_INT32), w({tokens, top_k}, TM_DTYPE_FLOAT32);
  HostTensor gr({rows, hidden}, TM_DTYPE_FLOAT32), gw({tokens, top_k}, TM_DTYPE_FLOAT32);
  HostTensor gr_bf({rows, hidden}, TM_DTYPE_BFLOAT16),
      r_short({rows - 1, hidden}, TM_DTYPE_FLOAT32);
  HostTensor gw_wrong({tokens, 3}, TM_DTYPE_FLOAT32), gw_int({tokens, top_k}, TM_DTYPE_INT32);
  HostTensor gr_h({rows, hidden + 1}, TM_DTYPE_FLOAT32);
  for (int64_t p = 0; p < 6; ++p) p2r.set(p, p);
  auto bwd = [&](tm_tensor* a, tm_tensor* b, tm_tensor* c, tm_tensor* d, tm_tensor* e,
                 tm_tensor* f) { return tm_combine_backward(a, b, c, d, nullptr, e, f, nullptr); };
  TM_ASSERT_OK(bwd(go.desc(), r.desc(), p2r.desc(), w.desc(), gr.desc(), gw.desc()));
  TM_EXPECT_ERROR(bwd(nullptr, r.desc(), p2r.desc(), w.desc(), gr.desc(), gw.desc()),
                  TM_ERR_INVALID_ARGUMENT, "grad_out");
  TM_EXPECT_ERROR(bwd(go.desc(), nullptr, p2r.desc(), w.desc(), gr.desc(), gw.desc()),
                  TM_ERR_INVALID_ARGUMENT, "rows");
  TM_EXPECT_ERROR(bwd(go.desc(), r.desc(), nullptr, w.desc(), gr.desc(), gw.desc()),
                  TM_ERR_INVALID_ARGUMENT, "pair_to_row");
  TM_EXPECT_ERROR(bwd(go.desc(), r.desc(), p2r.desc(), w.desc(), nullptr, gw.desc()),
                  TM_ERR_INVALID_ARGUMENT, "grad_rows");
  TM_EXPECT_ERROR(bwd(go.desc(), r.desc(), p2r.desc(), w.desc(), gr_bf.desc(), gw.desc()),
                  TM_ERR_INVALID_ARGUMENT, "grad_rows");
  TM_EXPECT_ERROR(bwd(go.desc(), r.desc(), p2r.desc(), w.desc(), gr_h.desc(), gw.desc()),
                  TM_ERR_INVALID_ARGUMENT, "grad_rows");
  TM_EXPECT_ERROR(bwd(go.desc(), r_short.desc(), p2r.desc(), w.desc(), gr.desc(), gw.desc()),
                  TM_ERR_INVALID_ARGUMENT, "rows");
  TM_EXPECT_ERROR(bwd(go.desc(), r.desc(), p2r.desc(), w.desc(), gr.desc(), gw_wrong.desc()),
                  TM_ERR_INVALID_ARGUMENT, "grad_weights");
  TM_EXPECT_ERROR(bwd(go.desc(), r.desc(), p2r.desc(), w.desc(), gr.desc(), gw_int.desc()),
                  TM_ERR_INVALID_ARGUMENT, "grad_weights");
  p2r.set(3, 1);  // rows 1 reached twice
  TM_EXPECT_ERROR(bwd(go.desc(), r.desc(), p2r.desc(), w.desc(), gr.desc(), gw.desc()),
                  TM_ERR_INVALID_ARGUMENT, "pair_to_row");
  p2r.set(3, 7);
  TM_EXPECT_ERROR(bwd(go.desc(), r.desc(), p2r.desc(), w.desc(), gr.desc(), gw.desc()),
                  TM_ERR_INVALID_ARGUMENT, "pair_to_row[3]");
}

// pair_to_row of a permutation plan: the routed pairs fill rows [0, used) in a random order,
// dropped pairs are -1, and the rows from used on belong to no pair.
HostTensor planned_pair_to_row(std::mt19937_64& rng, int64_t pairs, int64_t* used) {
  std::uniform_real_distribution<double> coin(0, 1);
  std::vector<char> dropped(static_cast<size_t>(pairs));
  *used = 0;
  for (int64_t p = 0; p < pairs; ++p) {
    dropped[p] = coin(rng) < 0.25;
    *used += dropped[p] ? 0 : 1;
  }
  std::vector<int32_t> perm(static_cast<size_t>(*used));
  for (int64_t r = 0; r < *used; ++r) perm[r] = static_cast<int32_t>(r);
  std::shuffle(perm.begin(), perm.end(), rng);
  HostTensor p2r({pairs}, TM_DTYPE_INT32);
  for (int64_t p = 0, next = 0; p < pairs; ++p) p2r.set(p, dropped[p] ? -1.0 : perm[next++]);
  return p2r;
}

TEST(Combine, BackwardWithOffsetsEqualsBackwardWithout) {
  auto rng = turbomoe::testing::rng_for_test();
  for (int32_t dtype : {TM_DTYPE_FLOAT32, TM_DTYPE_BFLOAT16}) {
    // K = 11 spans two slot batches of the CUDA kernel.
    for (auto [tokens, top_k, hidden] : {std::tuple{9, 3, 40}, std::tuple{6, 11, 24}}) {
      const int64_t rows = tokens * top_k;
      int64_t used = 0;
      HostTensor p2r = planned_pair_to_row(rng, rows, &used);
      HostTensor offsets({4}, TM_DTYPE_INT32);  // only the last entry counts
      for (int64_t e = 0; e < 4; ++e) offsets.set(e, static_cast<double>(used * e / 3));
      HostTensor r({rows, hidden}, dtype), go({tokens, hidden}, dtype);
      HostTensor w({tokens, top_k}, TM_DTYPE_FLOAT32);
      r.fill_uniform(rng);
      go.fill_uniform(rng);
      w.fill_uniform(rng, 0, 1);
      HostTensor gr({rows, hidden}, dtype), gw({tokens, top_k}, TM_DTYPE_FLOAT32);
      HostTensor gr_plain({rows, hidden}, dtype), gw_plain({tokens, top_k}, TM_DTYPE_FLOAT32);
      for (HostTensor* t : {&gr, &gw, &gr_plain, &gw_plain}) t->poison();
      TM_ASSERT_OK(tm_combine_backward(go.desc(), r.desc(), p2r.desc(), w.desc(), offsets.desc(),
                                       gr.desc(), gw.desc(), nullptr));
      TM_ASSERT_OK(tm_combine_backward(go.desc(), r.desc(), p2r.desc(), w.desc(), nullptr,
                                       gr_plain.desc(), gw_plain.desc(), nullptr));
      EXPECT_EQ(gr.values(), gr_plain.values());
      EXPECT_EQ(gw.values(), gw_plain.values());
      for (int64_t i = used * hidden; i < rows * hidden; ++i) ASSERT_EQ(gr.get(i), 0.0) << i;
    }
  }
}

TEST(Combine, BackwardRejectsOffsetsThatBreakTheirPromise) {
  const int64_t tokens = 3, hidden = 8, rows = 7;
  HostTensor go({tokens, hidden}, TM_DTYPE_FLOAT32), p2r({6}, TM_DTYPE_INT32);
  HostTensor gr({rows, hidden}, TM_DTYPE_FLOAT32), offsets({2}, TM_DTYPE_INT32);
  HostTensor offsets_64({2}, TM_DTYPE_INT64), offsets_empty({0}, TM_DTYPE_INT32);
  for (int64_t p = 0; p < 6; ++p) p2r.set(p, static_cast<double>(p));  // rows [0, 6)
  auto bwd = [&](tm_tensor* o) {
    return tm_combine_backward(go.desc(), nullptr, p2r.desc(), nullptr, o, gr.desc(), nullptr,
                               nullptr);
  };
  offsets.set(1, 6);
  TM_ASSERT_OK(bwd(offsets.desc()));
  offsets.set(1, 5);  // row 5 is mapped past the promised end
  TM_EXPECT_ERROR(bwd(offsets.desc()), TM_ERR_INVALID_ARGUMENT, "row 5 is mapped");
  offsets.set(1, 7);  // row 6 is promised but no pair maps to it
  TM_EXPECT_ERROR(bwd(offsets.desc()), TM_ERR_INVALID_ARGUMENT, "row 6 is not mapped");
  offsets.set(1, 8);
  TM_EXPECT_ERROR(bwd(offsets.desc()), TM_ERR_INVALID_ARGUMENT, "outside [0, 7]");
  offsets.set(1, -1);
  TM_EXPECT_ERROR(bwd(offsets.desc()), TM_ERR_INVALID_ARGUMENT, "outside [0, 7]");
  TM_EXPECT_ERROR(bwd(offsets_64.desc()), TM_ERR_INVALID_ARGUMENT, "expert_offsets");
  TM_EXPECT_ERROR(bwd(offsets_empty.desc()), TM_ERR_INVALID_ARGUMENT, "expert_offsets");
  tm_tensor on_cuda = *offsets.desc();
  on_cuda.device_type = TM_DEVICE_CUDA;
  TM_EXPECT_ERROR(bwd(&on_cuda), TM_ERR_INVALID_ARGUMENT, "expert_offsets");
}

}  // namespace
