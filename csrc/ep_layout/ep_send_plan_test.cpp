// The send side of the fixed-block exchange against a loop over (rank, token) written from the
// header's definition, its weight backward, and its argument errors.
#include <tuple>
#include <vector>

#include "common/test_util.h"

namespace {

using turbomoe::testing::HostTensor;

struct Placement {
  HostTensor rank_counts, expert_counts, send_order, token_rank_slot;
};

Placement place(HostTensor& ids, int64_t experts, int64_t ranks) {
  const int64_t tokens = ids.sizes()[0];
  Placement p{HostTensor({ranks}, TM_DTYPE_INT32), HostTensor({experts}, TM_DTYPE_INT32),
              HostTensor({tokens * ranks}, TM_DTYPE_INT32),
              HostTensor({tokens, ranks}, TM_DTYPE_INT32)};
  EXPECT_EQ(tm_ep_layout(ids.desc(), experts, ranks, p.rank_counts.desc(), p.expert_counts.desc(),
                         p.send_order.desc(), p.token_rank_slot.desc(), nullptr, 0, nullptr),
            TM_OK)
      << tm_last_error();
  return p;
}

struct Plan {
  HostTensor pairs, to_row, meta, bad;
};

Plan make_plan(int64_t tokens, int64_t top_k, int64_t ranks, int64_t cap) {
  Plan p{HostTensor({(cap + 1) * ranks}, TM_DTYPE_INT32),
         HostTensor({(cap + 1) * ranks}, TM_DTYPE_INT32),
         HostTensor({ranks * cap, 2 * top_k}, TM_DTYPE_FLOAT32), HostTensor({1}, TM_DTYPE_INT32)};
  p.pairs.poison();
  p.to_row.poison();
  p.meta.poison();
  p.bad.poison();
  return p;
}

tm_status run_plan(HostTensor& ids, HostTensor& w, Placement& pl, int64_t experts, int64_t cap,
                   Plan& p) {
  return tm_ep_send_plan(ids.desc(), w.desc(), pl.rank_counts.desc(), pl.send_order.desc(),
                         pl.token_rank_slot.desc(), experts, cap, p.pairs.desc(), p.to_row.desc(),
                         p.meta.desc(), p.bad.desc(), nullptr);
}

// Expected outputs straight from the definition: rank r's block lists, in token order, the tokens
// with a slot on r; ids outside [0, E) count as bad and go nowhere.
void expect_plan(const HostTensor& ids, const HostTensor& w, int64_t experts, int64_t ranks,
                 int64_t cap, const Plan& p) {
  const int64_t tokens = ids.sizes()[0], top_k = ids.sizes()[1], per_rank = experts / ranks;
  const double zero_cell = static_cast<double>(tokens * ranks);
  std::vector<double> pairs(static_cast<size_t>((cap + 1) * ranks), zero_cell);
  std::vector<double> to_row(static_cast<size_t>((cap + 1) * ranks), -1.0);
  std::vector<double> meta(static_cast<size_t>(ranks * cap * 2 * top_k), 0.0);
  for (int64_t row = 0; row < ranks * cap; ++row) {
    for (int64_t k = 0; k < top_k; ++k) meta[row * 2 * top_k + k] = static_cast<double>(per_rank);
  }
  double bad = 0;
  for (int64_t i = 0; i < ids.numel(); ++i) {
    const double e = ids.get(i);
    if (e < 0 || e >= static_cast<double>(experts)) bad += 1;
  }
  for (int64_t r = 0; r < ranks; ++r) {
    int64_t s = 0;
    for (int64_t t = 0; t < tokens; ++t) {
      bool sends = false;
      for (int64_t k = 0; k < top_k; ++k) {
        const double e = ids.get(t * top_k + k);
        if (e >= 0 && e < static_cast<double>(experts) && static_cast<int64_t>(e) / per_rank == r) {
          sends = true;
        }
      }
      if (!sends) continue;
      const int64_t row = r * cap + s++;
      pairs[row] = static_cast<double>(t * ranks + r);
      to_row[t * ranks + r] = static_cast<double>(row);
      for (int64_t k = 0; k < top_k; ++k) {
        const double e = ids.get(t * top_k + k);
        if (e < 0 || e >= static_cast<double>(experts) || static_cast<int64_t>(e) / per_rank != r) {
          continue;
        }
        meta[row * 2 * top_k + k] = static_cast<double>(static_cast<int64_t>(e) % per_rank);
        meta[row * 2 * top_k + top_k + k] = w.get(t * top_k + k);
      }
    }
  }
  EXPECT_EQ(p.pairs.values(), pairs);
  EXPECT_EQ(p.to_row.values(), to_row);
  EXPECT_EQ(p.meta.values(), meta);
  EXPECT_EQ(p.bad.values(), std::vector<double>{bad});
}

// [T,K] ids in [0, E), with some slots set to the dropped sentinel E when asked.
HostTensor random_ids(std::mt19937_64& rng, int64_t tokens, int64_t top_k, int64_t experts,
                      bool with_bad, int32_t dtype) {
  HostTensor ids({tokens, top_k}, dtype);
  std::uniform_int_distribution<int64_t> pick(0, experts - 1);
  std::uniform_real_distribution<double> coin(0, 1);
  for (int64_t i = 0; i < ids.numel(); ++i) {
    int64_t e = pick(rng);
    if (with_bad && coin(rng) < 0.1) e = experts;  // the CPU layout rejects anything else
    ids.set(i, static_cast<double>(e));
  }
  return ids;
}

HostTensor random_weights(std::mt19937_64& rng, int64_t tokens, int64_t top_k, int32_t dtype) {
  HostTensor w({tokens, top_k}, dtype);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  for (int64_t i = 0; i < w.numel(); ++i) w.set(i, u(rng));
  return w;
}

class EpSendPlanTest
    : public ::testing::TestWithParam<std::tuple<bool, int32_t, std::tuple<int, int, int, int>>> {};

TEST_P(EpSendPlanTest, MatchesTheDefinition) {
  const auto [with_bad, w_dtype, shape] = GetParam();
  const auto [tokens, top_k, experts, ranks] = shape;
  auto rng = turbomoe::testing::rng_for_test();
  HostTensor ids = random_ids(rng, tokens, top_k, experts, false, TM_DTYPE_INT64);
  Placement pl = place(ids, experts, ranks);  // placed from valid ids ...
  if (with_bad) ids = random_ids(rng, tokens, top_k, experts, true, TM_DTYPE_INT64);
  if (with_bad) pl = place(ids, experts, ranks);  // ... or from ids with sentinels
  HostTensor w = random_weights(rng, tokens, top_k, w_dtype);
  for (int64_t cap : {int64_t{tokens}, int64_t{tokens} + 5}) {
    Plan p = make_plan(tokens, top_k, ranks, cap);
    ASSERT_EQ(run_plan(ids, w, pl, experts, cap, p), TM_OK) << tm_last_error();
    expect_plan(ids, w, experts, ranks, cap, p);
  }
}

INSTANTIATE_TEST_SUITE_P(
    EpSendPlan, EpSendPlanTest,
    ::testing::Combine(::testing::Values(false, true),
                       ::testing::Values(TM_DTYPE_FLOAT32, TM_DTYPE_BFLOAT16),
                       ::testing::Values(std::tuple{13, 2, 8, 4}, std::tuple{1, 1, 1, 1},
                                         std::tuple{300, 8, 64, 8}, std::tuple{40, 2, 6, 6},
                                         std::tuple{0, 3, 8, 2})));

TEST(EpSendPlan, OneExampleByHand) {
  // E = 4 on R = 2 (experts 0,1 on rank 0; 2,3 on rank 1), K = 2, T = 3, C = 3.
  // Token 0 -> experts 1, 2; token 1 -> 3, 3; token 2 -> 0, 1.
  HostTensor ids({3, 2}, TM_DTYPE_INT32);
  const std::vector<double> v{1, 2, 3, 3, 0, 1};
  for (int64_t i = 0; i < 6; ++i) ids.set(i, v[i]);
  HostTensor w({3, 2}, TM_DTYPE_FLOAT32);
  const std::vector<double> wv{0.5, 0.25, 0.75, 0.125, 1.0, 2.0};
  for (int64_t i = 0; i < 6; ++i) w.set(i, wv[i]);
  Placement pl = place(ids, 4, 2);
  Plan p = make_plan(3, 2, 2, 3);
  ASSERT_EQ(run_plan(ids, w, pl, 4, 3, p), TM_OK) << tm_last_error();
  // Rank 0's block: tokens 0, 2 (rows 0, 1; row 2 padding); rank 1's: tokens 0, 1 (rows 3, 4).
  EXPECT_EQ(p.pairs.values(), (std::vector<double>{0, 4, 6, 1, 3, 6, 6, 6}));
  EXPECT_EQ(p.to_row.values(), (std::vector<double>{0, 3, -1, 4, 1, -1, -1, -1}));
  EXPECT_EQ(p.meta.values(), (std::vector<double>{1, 2, 0.5,  0,      // row 0: token 0 on rank 0
                                                  0, 1, 1.0,  2.0,    // row 1: token 2
                                                  2, 2, 0,    0,      // row 2: padding
                                                  2, 0, 0,    0.25,   // row 3: token 0 on rank 1
                                                  1, 1, 0.75, 0.125,  // row 4: token 1
                                                  2, 2, 0,    0}));   // row 5: padding
  EXPECT_EQ(p.bad.values(), std::vector<double>{0});

  // Backward: each (token, slot) reads the weight column of its owner's row.
  HostTensor g({6, 4}, TM_DTYPE_FLOAT32);
  for (int64_t i = 0; i < g.numel(); ++i) g.set(i, static_cast<double>(i));
  HostTensor gw({3, 2}, TM_DTYPE_FLOAT32);
  gw.poison();
  ASSERT_EQ(tm_ep_send_plan_backward(g.desc(), ids.desc(), pl.token_rank_slot.desc(), 4, 3,
                                     gw.desc(), nullptr),
            TM_OK)
      << tm_last_error();
  // t0: slot 0 (expert 1, rank 0, row 0) -> g[0, 2] = 2; slot 1 (expert 2, row 3) -> g[3, 3] = 15
  // t1: row 4 -> g[4, 2] = 18, g[4, 3] = 19; t2: row 1 -> g[1, 2] = 6, g[1, 3] = 7.
  EXPECT_EQ(gw.values(), (std::vector<double>{2, 15, 18, 19, 6, 7}));
}

TEST(EpSendPlan, ReadsStridedIds) {
  auto rng = turbomoe::testing::rng_for_test();
  const int64_t tokens = 11, top_k = 3, experts = 8, ranks = 4, cap = 12;
  HostTensor ids = random_ids(rng, tokens, top_k, experts, true, TM_DTYPE_INT32);
  HostTensor w = random_weights(rng, tokens, top_k, TM_DTYPE_FLOAT32);
  Placement pl = place(ids, experts, ranks);
  HostTensor transposed;
  tm_tensor view = turbomoe::testing::transposed_view(ids, transposed);
  Plan p = make_plan(tokens, top_k, ranks, cap);
  ASSERT_EQ(tm_ep_send_plan(&view, w.desc(), pl.rank_counts.desc(), pl.send_order.desc(),
                            pl.token_rank_slot.desc(), experts, cap, p.pairs.desc(),
                            p.to_row.desc(), p.meta.desc(), p.bad.desc(), nullptr),
            TM_OK)
      << tm_last_error();
  expect_plan(ids, w, experts, ranks, cap, p);
}

TEST(EpSendPlan, RejectsBadArguments) {
  HostTensor ids({3, 2}, TM_DTYPE_INT64);
  for (int64_t i = 0; i < 6; ++i) ids.set(i, static_cast<double>(i % 4));
  HostTensor w({3, 2}, TM_DTYPE_FLOAT32);
  Placement pl = place(ids, 4, 2);
  Plan p = make_plan(3, 2, 2, 3);
  TM_EXPECT_ERROR(run_plan(ids, w, pl, 4, 2, p), TM_ERR_INVALID_ARGUMENT, "capacity 2 is below");
  TM_EXPECT_ERROR(run_plan(ids, w, pl, 5, 3, p), TM_ERR_INVALID_ARGUMENT, "positive multiple");
  Plan small = make_plan(3, 2, 2, 2);
  TM_EXPECT_ERROR(run_plan(ids, w, pl, 4, 3, small), TM_ERR_INVALID_ARGUMENT, "send_pairs");
  HostTensor w_int({3, 2}, TM_DTYPE_INT32);
  TM_EXPECT_ERROR(run_plan(ids, w_int, pl, 4, 3, p), TM_ERR_INVALID_ARGUMENT, "topk_weights");
  HostTensor g({6, 3}, TM_DTYPE_FLOAT32), gw({3, 2}, TM_DTYPE_FLOAT32);
  TM_EXPECT_ERROR(tm_ep_send_plan_backward(g.desc(), ids.desc(), pl.token_rank_slot.desc(), 4, 3,
                                           gw.desc(), nullptr),
                  TM_ERR_INVALID_ARGUMENT, "grad_meta");
}

}  // namespace
