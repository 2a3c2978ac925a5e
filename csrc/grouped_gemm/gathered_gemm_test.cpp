// The grouped GEMM passes with the token gather in their operand load
// (tm_grouped_gemm_forward_gathered, tm_grouped_gemm_backward_input_gathered,
// tm_grouped_gemm_backward_weight_gathered and _gathered_dy) against their definition,
// tm_gather_rows followed by the plain pass: equal to the bit on the CPU (the same
// rows go through the same loops), including pairs that name tokens past src, rows past
// offsets[E], and fewer rows than pairs; then every argument error.
#include <algorithm>
#include <numeric>
#include <vector>

#include "common/test_util.h"

namespace {

using turbomoe::testing::HostTensor;

struct Problem {
  int64_t tokens, top_k, experts, n, k, rows;  // rows: of y (<= pairs)
  int32_t in, out;
};

// Offsets over `routed` rows with random counts (expert 0 left empty when there are several).
HostTensor random_offsets(std::mt19937_64& rng, int64_t experts, int64_t routed) {
  std::vector<int64_t> counts(static_cast<size_t>(experts), 0);
  std::uniform_int_distribution<int64_t> pick(experts > 1 ? 1 : 0, experts - 1);
  for (int64_t r = 0; r < routed; ++r) ++counts[static_cast<size_t>(pick(rng))];
  HostTensor off({experts + 1}, TM_DTYPE_INT32);
  int64_t acc = 0;
  off.set(0, 0);
  for (int64_t e = 0; e < experts; ++e) off.set(e + 1, static_cast<double>(acc += counts[e]));
  return off;
}

// A permutation of the pairs [0, pairs) as sorted_pairs.
HostTensor shuffled_pairs(std::mt19937_64& rng, int64_t pairs) {
  std::vector<int32_t> order(static_cast<size_t>(pairs));
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), rng);
  HostTensor sorted({pairs}, TM_DTYPE_INT32);
  for (int64_t i = 0; i < pairs; ++i) sorted.set(i, order[static_cast<size_t>(i)]);
  return sorted;
}

bool any_nonzero(const HostTensor& t) {
  const std::vector<double> v = t.values();
  return std::any_of(v.begin(), v.end(), [](double d) { return d != 0.0; });
}

TEST(GatheredForward, EqualsGatherThenForward) {
  auto rng = turbomoe::testing::rng_for_test();
  for (const Problem p : {Problem{7, 2, 3, 12, 16, 14, TM_DTYPE_FLOAT32, TM_DTYPE_FLOAT32},
                          Problem{13, 4, 5, 24, 40, 52, TM_DTYPE_BFLOAT16, TM_DTYPE_BFLOAT16},
                          Problem{13, 4, 5, 24, 40, 40, TM_DTYPE_BFLOAT16, TM_DTYPE_FLOAT32},
                          Problem{1, 1, 1, 3, 8, 1, TM_DTYPE_FLOAT32, TM_DTYPE_FLOAT32}}) {
    // Two more pairs than src's tokens make: they name a missing token and give zero rows.
    const int64_t pairs = p.tokens * p.top_k + 2;
    const int64_t routed = std::max<int64_t>(p.rows - 3, 1);
    HostTensor src({p.tokens, p.k}, p.in), w({p.experts, p.n, p.k}, p.in);
    HostTensor off = random_offsets(rng, p.experts, routed);
    src.fill_uniform(rng);
    w.fill_uniform(rng);
    HostTensor sorted = shuffled_pairs(rng, pairs);

    HostTensor gathered({p.rows, p.k}, p.in), expected({p.rows, p.n}, p.out);
    HostTensor y({p.rows, p.n}, p.out);
    gathered.poison();
    expected.poison();
    y.poison();
    TM_ASSERT_OK(
        tm_gather_rows(src.desc(), sorted.desc(), off.desc(), p.top_k, gathered.desc(), nullptr));
    TM_ASSERT_OK(tm_grouped_gemm_forward(gathered.desc(), w.desc(), off.desc(), expected.desc(),
                                         nullptr, 0, nullptr));
    TM_ASSERT_OK(tm_grouped_gemm_forward_gathered(src.desc(), sorted.desc(), p.top_k, w.desc(),
                                                  off.desc(), y.desc(), nullptr));
    EXPECT_EQ(y.values(), expected.values()) << "tokens " << p.tokens << " rows " << p.rows;
    // Not vacuous: a row that names a present token carries products, not zeros.
    const int64_t present_row =
        static_cast<int64_t>(sorted.values()[0]) / p.top_k < p.tokens ? 0 : -1;
    if (present_row == 0) {
      const std::vector<double> v = y.values();
      EXPECT_TRUE(std::any_of(v.begin(), v.begin() + p.n, [](double d) { return d != 0.0; }));
    }
  }
}

TEST(GatheredGradWeight, EqualsGatherThenGradWeight) {
  auto rng = turbomoe::testing::rng_for_test();
  for (const Problem p : {Problem{7, 2, 3, 12, 16, 14, TM_DTYPE_FLOAT32, TM_DTYPE_FLOAT32},
                          Problem{13, 4, 5, 24, 40, 52, TM_DTYPE_BFLOAT16, TM_DTYPE_BFLOAT16},
                          Problem{13, 4, 5, 24, 40, 40, TM_DTYPE_BFLOAT16, TM_DTYPE_FLOAT32}}) {
    const int64_t pairs = p.tokens * p.top_k + 2;
    const int64_t routed = p.rows - 3;
    HostTensor src({p.tokens, p.k}, p.in), dy({p.rows, p.n}, p.in);
    HostTensor off = random_offsets(rng, p.experts, routed);
    src.fill_uniform(rng);
    dy.fill_uniform(rng);
    HostTensor sorted = shuffled_pairs(rng, pairs);

    HostTensor gathered({p.rows, p.k}, p.in);
    HostTensor expected({p.experts, p.n, p.k}, p.out), dw({p.experts, p.n, p.k}, p.out);
    expected.poison();
    dw.poison();
    TM_ASSERT_OK(
        tm_gather_rows(src.desc(), sorted.desc(), off.desc(), p.top_k, gathered.desc(), nullptr));
    TM_ASSERT_OK(tm_grouped_gemm_backward_weight(dy.desc(), gathered.desc(), off.desc(),
                                                 expected.desc(), nullptr, 0, nullptr));
    TM_ASSERT_OK(tm_grouped_gemm_backward_weight_gathered(dy.desc(), src.desc(), sorted.desc(),
                                                          p.top_k, off.desc(), dw.desc(), nullptr));
    EXPECT_EQ(dw.values(), expected.values()) << "tokens " << p.tokens << " rows " << p.rows;
    EXPECT_TRUE(any_nonzero(dw));
  }
}

// dy_src holds one gradient row per token, [tokens, n]; the pass reads row r of dy from
// dy_src[sorted_pairs[r] / top_k].
TEST(GatheredGradInput, EqualsGatherThenGradInput) {
  auto rng = turbomoe::testing::rng_for_test();
  for (const Problem p : {Problem{7, 2, 3, 16, 12, 14, TM_DTYPE_FLOAT32, TM_DTYPE_FLOAT32},
                          Problem{13, 4, 5, 40, 24, 52, TM_DTYPE_BFLOAT16, TM_DTYPE_BFLOAT16},
                          Problem{13, 4, 5, 40, 24, 40, TM_DTYPE_BFLOAT16, TM_DTYPE_FLOAT32}}) {
    const int64_t pairs = p.tokens * p.top_k + 2;
    HostTensor dy_src({p.tokens, p.n}, p.in), w({p.experts, p.n, p.k}, p.in);
    HostTensor sorted = shuffled_pairs(rng, pairs);
    HostTensor off = random_offsets(rng, p.experts, p.rows - 3);
    dy_src.fill_uniform(rng);
    w.fill_uniform(rng);
    HostTensor gathered({p.rows, p.n}, p.in), expected({p.rows, p.k}, p.out);
    HostTensor dx({p.rows, p.k}, p.out);
    gathered.poison();
    expected.poison();
    dx.poison();
    TM_ASSERT_OK(tm_gather_rows(dy_src.desc(), sorted.desc(), off.desc(), p.top_k, gathered.desc(),
                                nullptr));
    TM_ASSERT_OK(tm_grouped_gemm_backward_input(gathered.desc(), w.desc(), off.desc(),
                                                expected.desc(), nullptr, 0, nullptr));
    TM_ASSERT_OK(tm_grouped_gemm_backward_input_gathered(dy_src.desc(), sorted.desc(), p.top_k,
                                                         w.desc(), off.desc(), dx.desc(), nullptr));
    EXPECT_EQ(dx.values(), expected.values()) << "tokens " << p.tokens << " rows " << p.rows;
    EXPECT_TRUE(any_nonzero(dx));
  }
}

TEST(GatheredGradWeightDy, EqualsGatherThenGradWeight) {
  auto rng = turbomoe::testing::rng_for_test();
  for (const Problem p : {Problem{7, 2, 3, 16, 12, 14, TM_DTYPE_FLOAT32, TM_DTYPE_FLOAT32},
                          Problem{13, 4, 5, 40, 24, 52, TM_DTYPE_BFLOAT16, TM_DTYPE_BFLOAT16},
                          Problem{13, 4, 5, 40, 24, 40, TM_DTYPE_BFLOAT16, TM_DTYPE_FLOAT32}}) {
    const int64_t pairs = p.tokens * p.top_k + 2;
    HostTensor dy_src({p.tokens, p.n}, p.in), x({p.rows, p.k}, p.in);
    HostTensor sorted = shuffled_pairs(rng, pairs);
    HostTensor off = random_offsets(rng, p.experts, p.rows - 3);
    dy_src.fill_uniform(rng);
    x.fill_uniform(rng);
    HostTensor gathered({p.rows, p.n}, p.in);
    HostTensor expected({p.experts, p.n, p.k}, p.out), dw({p.experts, p.n, p.k}, p.out);
    expected.poison();
    dw.poison();
    TM_ASSERT_OK(tm_gather_rows(dy_src.desc(), sorted.desc(), off.desc(), p.top_k, gathered.desc(),
                                nullptr));
    TM_ASSERT_OK(tm_grouped_gemm_backward_weight(gathered.desc(), x.desc(), off.desc(),
                                                 expected.desc(), nullptr, 0, nullptr));
    TM_ASSERT_OK(tm_grouped_gemm_backward_weight_gathered_dy(
        dy_src.desc(), x.desc(), sorted.desc(), p.top_k, off.desc(), dw.desc(), nullptr));
    EXPECT_EQ(dw.values(), expected.values()) << "tokens " << p.tokens << " rows " << p.rows;
    EXPECT_TRUE(any_nonzero(dw));
  }
}

TEST(GatheredGradInput, RejectsBadArguments) {
  const int64_t tokens = 4, top_k = 2, experts = 2, n = 8, k = 3, rows = 8;
  HostTensor dy_src({tokens, n}, TM_DTYPE_FLOAT32), w({experts, n, k}, TM_DTYPE_FLOAT32);
  HostTensor sorted({tokens * top_k}, TM_DTYPE_INT32), off({experts + 1}, TM_DTYPE_INT32);
  HostTensor dx({rows, k}, TM_DTYPE_FLOAT32), dx_long({rows + 1, k}, TM_DTYPE_FLOAT32);
  HostTensor dx_cols({rows, k + 1}, TM_DTYPE_FLOAT32), w_n({experts, n + 1, k}, TM_DTYPE_FLOAT32);
  for (int64_t i = 0; i < tokens * top_k; ++i) sorted.set(i, static_cast<double>(i));
  off.set(0, 0);
  off.set(1, 3);
  off.set(2, 6);
  auto call = [&](tm_tensor* d, tm_tensor* sp, int64_t kk, tm_tensor* ww, tm_tensor* o,
                  tm_tensor* out) {
    return tm_grouped_gemm_backward_input_gathered(d, sp, kk, ww, o, out, nullptr);
  };
  TM_ASSERT_OK(call(dy_src.desc(), sorted.desc(), top_k, w.desc(), off.desc(), dx.desc()));
  TM_EXPECT_ERROR(call(nullptr, sorted.desc(), top_k, w.desc(), off.desc(), dx.desc()),
                  TM_ERR_INVALID_ARGUMENT, "dy_src");
  TM_EXPECT_ERROR(call(dy_src.desc(), sorted.desc(), -1, w.desc(), off.desc(), dx.desc()),
                  TM_ERR_INVALID_ARGUMENT, "top_k");
  TM_EXPECT_ERROR(call(dy_src.desc(), sorted.desc(), top_k, w_n.desc(), off.desc(), dx.desc()),
                  TM_ERR_INVALID_ARGUMENT, "w");
  TM_EXPECT_ERROR(call(dy_src.desc(), sorted.desc(), top_k, w.desc(), off.desc(), dx_long.desc()),
                  TM_ERR_INVALID_ARGUMENT, "dx");
  TM_EXPECT_ERROR(call(dy_src.desc(), sorted.desc(), top_k, w.desc(), off.desc(), dx_cols.desc()),
                  TM_ERR_INVALID_ARGUMENT, "dx");
  sorted.set(5, static_cast<double>(tokens * top_k));
  TM_EXPECT_ERROR(call(dy_src.desc(), sorted.desc(), top_k, w.desc(), off.desc(), dx.desc()),
                  TM_ERR_INVALID_ARGUMENT, "sorted_pairs[5]");
}

TEST(GatheredGradWeightDy, RejectsBadArguments) {
  const int64_t tokens = 4, top_k = 2, experts = 2, n = 8, k = 3, rows = 8;
  HostTensor dy_src({tokens, n}, TM_DTYPE_FLOAT32), x({rows, k}, TM_DTYPE_FLOAT32);
  HostTensor sorted({tokens * top_k}, TM_DTYPE_INT32), off({experts + 1}, TM_DTYPE_INT32);
  HostTensor dw({experts, n, k}, TM_DTYPE_FLOAT32), x_long({rows + 1, k}, TM_DTYPE_FLOAT32);
  HostTensor dw_n({experts, n + 1, k}, TM_DTYPE_FLOAT32), x_bf({rows, k}, TM_DTYPE_BFLOAT16);
  for (int64_t i = 0; i < tokens * top_k; ++i) sorted.set(i, static_cast<double>(i));
  off.set(0, 0);
  off.set(1, 3);
  off.set(2, 6);
  auto call = [&](tm_tensor* d, tm_tensor* xx, tm_tensor* sp, int64_t kk, tm_tensor* o,
                  tm_tensor* out) {
    return tm_grouped_gemm_backward_weight_gathered_dy(d, xx, sp, kk, o, out, nullptr);
  };
  TM_ASSERT_OK(call(dy_src.desc(), x.desc(), sorted.desc(), top_k, off.desc(), dw.desc()));
  TM_EXPECT_ERROR(call(dy_src.desc(), nullptr, sorted.desc(), top_k, off.desc(), dw.desc()),
                  TM_ERR_INVALID_ARGUMENT, "x");
  TM_EXPECT_ERROR(call(dy_src.desc(), x_bf.desc(), sorted.desc(), top_k, off.desc(), dw.desc()),
                  TM_ERR_INVALID_ARGUMENT, "x");
  TM_EXPECT_ERROR(call(dy_src.desc(), x.desc(), sorted.desc(), 0, off.desc(), dw.desc()),
                  TM_ERR_INVALID_ARGUMENT, "top_k");
  TM_EXPECT_ERROR(call(dy_src.desc(), x_long.desc(), sorted.desc(), top_k, off.desc(), dw.desc()),
                  TM_ERR_INVALID_ARGUMENT, "x");
  TM_EXPECT_ERROR(call(dy_src.desc(), x.desc(), sorted.desc(), top_k, off.desc(), dw_n.desc()),
                  TM_ERR_INVALID_ARGUMENT, "dw");
  sorted.set(1, -2);
  TM_EXPECT_ERROR(call(dy_src.desc(), x.desc(), sorted.desc(), top_k, off.desc(), dw.desc()),
                  TM_ERR_INVALID_ARGUMENT, "sorted_pairs[1]");
}

TEST(GatheredGradWeight, RejectsBadArguments) {
  const int64_t tokens = 4, top_k = 2, experts = 2, n = 3, k = 8, rows = 8;
  HostTensor src({tokens, k}, TM_DTYPE_FLOAT32), dy({rows, n}, TM_DTYPE_FLOAT32);
  HostTensor sorted({tokens * top_k}, TM_DTYPE_INT32), off({experts + 1}, TM_DTYPE_INT32);
  HostTensor dw({experts, n, k}, TM_DTYPE_FLOAT32), dy_long({rows + 1, n}, TM_DTYPE_FLOAT32);
  HostTensor dw_k({experts, n, k + 1}, TM_DTYPE_FLOAT32), src_bf({tokens, k}, TM_DTYPE_BFLOAT16);
  for (int64_t i = 0; i < tokens * top_k; ++i) sorted.set(i, static_cast<double>(i));
  off.set(0, 0);
  off.set(1, 3);
  off.set(2, 6);
  auto call = [&](tm_tensor* d, tm_tensor* s, tm_tensor* sp, int64_t kk, tm_tensor* o,
                  tm_tensor* w) {
    return tm_grouped_gemm_backward_weight_gathered(d, s, sp, kk, o, w, nullptr);
  };
  TM_ASSERT_OK(call(dy.desc(), src.desc(), sorted.desc(), top_k, off.desc(), dw.desc()));
  TM_EXPECT_ERROR(call(nullptr, src.desc(), sorted.desc(), top_k, off.desc(), dw.desc()),
                  TM_ERR_INVALID_ARGUMENT, "dy");
  TM_EXPECT_ERROR(call(dy.desc(), src_bf.desc(), sorted.desc(), top_k, off.desc(), dw.desc()),
                  TM_ERR_INVALID_ARGUMENT, "src");
  TM_EXPECT_ERROR(call(dy.desc(), src.desc(), sorted.desc(), 0, off.desc(), dw.desc()),
                  TM_ERR_INVALID_ARGUMENT, "top_k");
  TM_EXPECT_ERROR(call(dy_long.desc(), src.desc(), sorted.desc(), top_k, off.desc(), dw.desc()),
                  TM_ERR_INVALID_ARGUMENT, "dy");
  TM_EXPECT_ERROR(call(dy.desc(), src.desc(), sorted.desc(), top_k, off.desc(), dw_k.desc()),
                  TM_ERR_INVALID_ARGUMENT, "dw");
  sorted.set(4, -3);
  TM_EXPECT_ERROR(call(dy.desc(), src.desc(), sorted.desc(), top_k, off.desc(), dw.desc()),
                  TM_ERR_INVALID_ARGUMENT, "sorted_pairs[4]");
}

TEST(GatheredForward, RejectsBadArguments) {
  const int64_t tokens = 4, top_k = 2, experts = 2, n = 3, k = 8, rows = 8;
  HostTensor src({tokens, k}, TM_DTYPE_FLOAT32), w({experts, n, k}, TM_DTYPE_FLOAT32);
  HostTensor sorted({tokens * top_k}, TM_DTYPE_INT32), off({experts + 1}, TM_DTYPE_INT32);
  HostTensor y({rows, n}, TM_DTYPE_FLOAT32);
  HostTensor short_pairs({tokens * top_k - 1}, TM_DTYPE_INT32);
  HostTensor pairs_i64({tokens * top_k}, TM_DTYPE_INT64);
  HostTensor y_long({rows + 1, n}, TM_DTYPE_FLOAT32), y_cols({rows, n + 1}, TM_DTYPE_FLOAT32);
  HostTensor src_bf({tokens, k}, TM_DTYPE_BFLOAT16), w_k({experts, n, k + 1}, TM_DTYPE_FLOAT32);
  for (int64_t i = 0; i < tokens * top_k; ++i) sorted.set(i, static_cast<double>(i));
  off.set(0, 0);
  off.set(1, 3);
  off.set(2, 6);
  auto call = [&](tm_tensor* s, tm_tensor* sp, int64_t kk, tm_tensor* ww, tm_tensor* o,
                  tm_tensor* yy) {
    return tm_grouped_gemm_forward_gathered(s, sp, kk, ww, o, yy, nullptr);
  };
  TM_ASSERT_OK(call(src.desc(), sorted.desc(), top_k, w.desc(), off.desc(), y.desc()));
  TM_EXPECT_ERROR(call(nullptr, sorted.desc(), top_k, w.desc(), off.desc(), y.desc()),
                  TM_ERR_INVALID_ARGUMENT, "src");
  TM_EXPECT_ERROR(call(src.desc(), nullptr, top_k, w.desc(), off.desc(), y.desc()),
                  TM_ERR_INVALID_ARGUMENT, "sorted_pairs");
  TM_EXPECT_ERROR(call(src.desc(), sorted.desc(), 0, w.desc(), off.desc(), y.desc()),
                  TM_ERR_INVALID_ARGUMENT, "top_k");
  TM_EXPECT_ERROR(call(src.desc(), short_pairs.desc(), top_k, w.desc(), off.desc(), y.desc()),
                  TM_ERR_INVALID_ARGUMENT, "sorted_pairs");
  TM_EXPECT_ERROR(call(src.desc(), pairs_i64.desc(), top_k, w.desc(), off.desc(), y.desc()),
                  TM_ERR_INVALID_ARGUMENT, "sorted_pairs");
  TM_EXPECT_ERROR(call(src.desc(), sorted.desc(), top_k, w.desc(), off.desc(), y_long.desc()),
                  TM_ERR_INVALID_ARGUMENT, "y");
  TM_EXPECT_ERROR(call(src.desc(), sorted.desc(), top_k, w.desc(), off.desc(), y_cols.desc()),
                  TM_ERR_INVALID_ARGUMENT, "y");
  TM_EXPECT_ERROR(call(src_bf.desc(), sorted.desc(), top_k, w.desc(), off.desc(), y.desc()),
                  TM_ERR_INVALID_ARGUMENT, "w");
  TM_EXPECT_ERROR(call(src.desc(), sorted.desc(), top_k, w_k.desc(), off.desc(), y.desc()),
                  TM_ERR_INVALID_ARGUMENT, "w");
  // A routed row naming a pair outside [0, P), and offsets past y's rows.
  sorted.set(2, -1);
  TM_EXPECT_ERROR(call(src.desc(), sorted.desc(), top_k, w.desc(), off.desc(), y.desc()),
                  TM_ERR_INVALID_ARGUMENT, "sorted_pairs[2]");
  sorted.set(2, static_cast<double>(tokens * top_k));
  TM_EXPECT_ERROR(call(src.desc(), sorted.desc(), top_k, w.desc(), off.desc(), y.desc()),
                  TM_ERR_INVALID_ARGUMENT, "sorted_pairs[2]");
  sorted.set(2, 2);
  off.set(2, static_cast<double>(rows + 1));
  TM_EXPECT_ERROR(call(src.desc(), sorted.desc(), top_k, w.desc(), off.desc(), y.desc()),
                  TM_ERR_INVALID_ARGUMENT, "expert_offsets");
}

}  // namespace
