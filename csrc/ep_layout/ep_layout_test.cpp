// The expert-parallel layout against a per-rank loop over the tokens, and every argument error of
// tm_ep_layout and tm_ep_layout_workspace_size.
#include <tuple>
#include <vector>

#include "common/test_util.h"

namespace {

using turbomoe::testing::HostTensor;

struct Layout {
  HostTensor rank_counts, expert_counts, send_order, token_rank_slot;
};

Layout run_layout(HostTensor& ids, int64_t experts, int64_t ranks, tm_tensor* ids_desc = nullptr) {
  const int64_t tokens = ids.sizes()[0];
  Layout l{HostTensor({ranks}, TM_DTYPE_INT32), HostTensor({experts}, TM_DTYPE_INT32),
           HostTensor({tokens * ranks}, TM_DTYPE_INT32),
           HostTensor({tokens, ranks}, TM_DTYPE_INT32)};
  l.rank_counts.poison();
  l.expert_counts.poison();
  l.send_order.poison();
  l.token_rank_slot.poison();
  size_t bytes = 1;
  EXPECT_EQ(tm_ep_layout_workspace_size(tokens, experts, ranks, TM_DEVICE_CPU, &bytes), TM_OK);
  EXPECT_EQ(bytes, 0u);
  const tm_status status = tm_ep_layout(
      ids_desc ? ids_desc : ids.desc(), experts, ranks, l.rank_counts.desc(),
      l.expert_counts.desc(), l.send_order.desc(), l.token_rank_slot.desc(), nullptr, 0, nullptr);
  EXPECT_EQ(status, TM_OK) << tm_last_error();
  return l;
}

enum class Scenario { kRandom, kWithDropped, kOneRankTakesAll, kIdleRank, kAllDropped };

// [T,K] ids; experts == num_experts means dropped. kIdleRank keeps rank 1 (if any) empty.
HostTensor make_ids(std::mt19937_64& rng, int64_t tokens, int64_t top_k, int64_t experts,
                    int64_t ranks, Scenario s, int32_t dtype) {
  HostTensor ids({tokens, top_k}, dtype);
  const int64_t per_rank = experts / ranks;
  std::uniform_int_distribution<int64_t> pick(0, experts - 1);
  std::uniform_real_distribution<double> coin(0, 1);
  for (int64_t i = 0; i < ids.numel(); ++i) {
    int64_t e = pick(rng);
    if (s == Scenario::kWithDropped && coin(rng) < 0.25) e = experts;
    if (s == Scenario::kOneRankTakesAll) e = (ranks - 1) * per_rank + e % per_rank;
    if (s == Scenario::kIdleRank && ranks > 1 && e / per_rank == 1) e = e % per_rank;
    if (s == Scenario::kAllDropped) e = experts;
    ids.set(i, static_cast<double>(e));
  }
  return ids;
}

// The reference: for each rank, the tokens with at least one slot on it, ascending.
void expect_layout(const HostTensor& ids, int64_t experts, int64_t ranks, const Layout& l) {
  const int64_t tokens = ids.sizes()[0], top_k = ids.sizes()[1], per_rank = experts / ranks;
  std::vector<double> expert_counts(static_cast<size_t>(experts), 0.0);
  for (int64_t i = 0; i < ids.numel(); ++i) {
    const double e = ids.get(i);
    if (e < static_cast<double>(experts)) expert_counts[static_cast<size_t>(e)] += 1.0;
  }
  EXPECT_EQ(l.expert_counts.values(), expert_counts);
  std::vector<double> send_order, rank_counts;
  std::vector<double> slot(static_cast<size_t>(tokens * ranks), -1.0);
  for (int64_t r = 0; r < ranks; ++r) {
    double count = 0;
    for (int64_t t = 0; t < tokens; ++t) {
      bool sends = false;
      for (int64_t k = 0; k < top_k; ++k) {
        const double e = ids.get(t * top_k + k);
        sends =
            sends || (e < static_cast<double>(experts) && static_cast<int64_t>(e) / per_rank == r);
      }
      if (!sends) continue;
      slot[static_cast<size_t>(t * ranks + r)] = count;
      count += 1.0;
      send_order.push_back(static_cast<double>(t));
    }
    rank_counts.push_back(count);
  }
  send_order.resize(static_cast<size_t>(tokens * ranks), -1.0);
  EXPECT_EQ(l.rank_counts.values(), rank_counts);
  EXPECT_EQ(l.send_order.values(), send_order);
  EXPECT_EQ(l.token_rank_slot.values(), slot);
}

class EpLayoutTest : public ::testing::TestWithParam<
                         std::tuple<Scenario, int32_t, std::tuple<int, int, int, int>>> {};

TEST_P(EpLayoutTest, MatchesAPerRankLoop) {
  const auto [scenario, dtype, shape] = GetParam();
  const auto [tokens, top_k, experts, ranks] = shape;
  auto rng = turbomoe::testing::rng_for_test();
  HostTensor ids = make_ids(rng, tokens, top_k, experts, ranks, scenario, dtype);
  const Layout l = run_layout(ids, experts, ranks);
  expect_layout(ids, experts, ranks, l);
  const Layout again = run_layout(ids, experts, ranks);  // deterministic
  EXPECT_EQ(again.send_order.values(), l.send_order.values());
  EXPECT_EQ(again.token_rank_slot.values(), l.token_rank_slot.values());
}

INSTANTIATE_TEST_SUITE_P(
    EpLayout, EpLayoutTest,
    ::testing::Combine(::testing::Values(Scenario::kRandom, Scenario::kWithDropped,
                                         Scenario::kOneRankTakesAll, Scenario::kIdleRank,
                                         Scenario::kAllDropped),
                       ::testing::Values(TM_DTYPE_INT32, TM_DTYPE_INT64),
                       ::testing::Values(std::tuple{13, 2, 8, 4}, std::tuple{1, 1, 1, 1},
                                         std::tuple{300, 8, 64, 8}, std::tuple{2000, 4, 128, 64},
                                         std::tuple{50, 3, 6, 1}, std::tuple{40, 2, 6, 6})));

TEST(EpLayout, CountsATokenOncePerRank) {
  // Token 0: experts 0 and 1 (both rank 0) and 3 (rank 1); token 1: dropped, 2; token 2: 1, 1.
  HostTensor ids({3, 3}, TM_DTYPE_INT64);
  const std::vector<double> v{0, 1, 3, 4, 2, 4, 1, 1, 4};
  for (int64_t i = 0; i < 9; ++i) ids.set(i, v[i]);
  const Layout l = run_layout(ids, 4, 2);
  EXPECT_EQ(l.rank_counts.values(), (std::vector<double>{2, 2}));
  EXPECT_EQ(l.expert_counts.values(), (std::vector<double>{1, 3, 1, 1}));
  EXPECT_EQ(l.send_order.values(), (std::vector<double>{0, 2, 0, 1, -1, -1}));
  EXPECT_EQ(l.token_rank_slot.values(), (std::vector<double>{0, 0, -1, 1, 1, -1}));
}

TEST(EpLayout, ReadsStridedIds) {
  auto rng = turbomoe::testing::rng_for_test();
  const int64_t tokens = 11, top_k = 3, experts = 8, ranks = 4;
  HostTensor ids =
      make_ids(rng, tokens, top_k, experts, ranks, Scenario::kWithDropped, TM_DTYPE_INT32);
  HostTensor transposed;  // the same ids stored [K,T]
  tm_tensor view = turbomoe::testing::transposed_view(ids, transposed);
  const Layout l = run_layout(ids, experts, ranks, &view);
  expect_layout(ids, experts, ranks, l);
}

TEST(EpLayout, ZeroTokensGiveZeroCounts) {
  HostTensor ids({0, 4}, TM_DTYPE_INT64);
  const Layout l = run_layout(ids, 8, 4);
  EXPECT_EQ(l.rank_counts.values(), std::vector<double>(4, 0.0));
  EXPECT_EQ(l.expert_counts.values(), std::vector<double>(8, 0.0));
}

TEST(EpLayout, WorkspaceSize) {
  size_t bytes = 7;
  TM_ASSERT_OK(tm_ep_layout_workspace_size(5000, 64, 8, TM_DEVICE_CPU, &bytes));
  EXPECT_EQ(bytes, 0u);
  bytes = 7;
  TM_ASSERT_OK(tm_ep_layout_workspace_size(5000, 64, 8, TM_DEVICE_CUDA, &bytes));
  EXPECT_EQ(bytes, 0u);
  TM_EXPECT_ERROR(tm_ep_layout_workspace_size(10, 4, 2, TM_DEVICE_CPU, nullptr),
                  TM_ERR_INVALID_ARGUMENT, "bytes");
  TM_EXPECT_ERROR(tm_ep_layout_workspace_size(-1, 4, 2, TM_DEVICE_CPU, &bytes),
                  TM_ERR_INVALID_ARGUMENT, "num_tokens");
  TM_EXPECT_ERROR(tm_ep_layout_workspace_size(10, 0, 1, TM_DEVICE_CPU, &bytes),
                  TM_ERR_INVALID_ARGUMENT, "num_experts");
  TM_EXPECT_ERROR(tm_ep_layout_workspace_size(10, 4, 3, TM_DEVICE_CPU, &bytes),
                  TM_ERR_INVALID_ARGUMENT, "num_ranks");
  TM_EXPECT_ERROR(tm_ep_layout_workspace_size(10, 4, 2, 7, &bytes), TM_ERR_INVALID_ARGUMENT,
                  "device_type");
}

TEST(EpLayout, RejectsBadArguments) {
  const int64_t tokens = 3, experts = 4, ranks = 2;
  HostTensor ids({tokens, 2}, TM_DTYPE_INT32), ids_f({tokens, 2}, TM_DTYPE_FLOAT32);
  HostTensor ids_1d({6}, TM_DTYPE_INT32);
  HostTensor rc({ranks}, TM_DTYPE_INT32), ec({experts}, TM_DTYPE_INT32);
  HostTensor so({tokens * ranks}, TM_DTYPE_INT32), trs({tokens, ranks}, TM_DTYPE_INT32);
  HostTensor rc_short({ranks - 1}, TM_DTYPE_INT32), rc64({ranks}, TM_DTYPE_INT64);
  HostTensor ec_short({experts - 1}, TM_DTYPE_INT32),
      so_short({tokens * ranks - 1}, TM_DTYPE_INT32);
  HostTensor trs_flat({tokens * ranks}, TM_DTYPE_INT32),
      trs_wide({tokens, ranks + 1}, TM_DTYPE_INT32);
  HostTensor trs_tall({tokens + 1, ranks}, TM_DTYPE_INT32),
      wide({tokens * ranks, 2}, TM_DTYPE_INT32);
  for (int64_t i = 0; i < 6; ++i) ids.set(i, i % experts);
  auto layout = [&](tm_tensor* i, int64_t e, int64_t r, tm_tensor* a, tm_tensor* b, tm_tensor* c,
                    tm_tensor* d) {
    return tm_ep_layout(i, e, r, a, b, c, d, nullptr, 0, nullptr);
  };
  TM_ASSERT_OK(layout(ids.desc(), experts, ranks, rc.desc(), ec.desc(), so.desc(), trs.desc()));
  TM_EXPECT_ERROR(layout(nullptr, experts, ranks, rc.desc(), ec.desc(), so.desc(), trs.desc()),
                  TM_ERR_INVALID_ARGUMENT, "topk_ids");
  TM_EXPECT_ERROR(layout(ids_f.desc(), experts, ranks, rc.desc(), ec.desc(), so.desc(), trs.desc()),
                  TM_ERR_INVALID_ARGUMENT, "topk_ids");
  TM_EXPECT_ERROR(
      layout(ids_1d.desc(), experts, ranks, rc.desc(), ec.desc(), so.desc(), trs.desc()),
      TM_ERR_INVALID_ARGUMENT, "topk_ids");
  TM_EXPECT_ERROR(layout(ids.desc(), 0, ranks, rc.desc(), ec.desc(), so.desc(), trs.desc()),
                  TM_ERR_INVALID_ARGUMENT, "num_experts");
  for (int64_t bad_ranks : {int64_t{0}, int64_t{3}, experts + 1}) {
    TM_EXPECT_ERROR(
        layout(ids.desc(), experts, bad_ranks, rc.desc(), ec.desc(), so.desc(), trs.desc()),
        TM_ERR_INVALID_ARGUMENT, "num_ranks");
  }
  TM_EXPECT_ERROR(layout(ids.desc(), experts, ranks, nullptr, ec.desc(), so.desc(), trs.desc()),
                  TM_ERR_INVALID_ARGUMENT, "rank_counts");
  TM_EXPECT_ERROR(
      layout(ids.desc(), experts, ranks, rc_short.desc(), ec.desc(), so.desc(), trs.desc()),
      TM_ERR_INVALID_ARGUMENT, "rank_counts");
  TM_EXPECT_ERROR(layout(ids.desc(), experts, ranks, rc64.desc(), ec.desc(), so.desc(), trs.desc()),
                  TM_ERR_INVALID_ARGUMENT, "rank_counts");
  TM_EXPECT_ERROR(layout(ids.desc(), experts, ranks, rc.desc(), nullptr, so.desc(), trs.desc()),
                  TM_ERR_INVALID_ARGUMENT, "expert_counts");
  TM_EXPECT_ERROR(
      layout(ids.desc(), experts, ranks, rc.desc(), ec_short.desc(), so.desc(), trs.desc()),
      TM_ERR_INVALID_ARGUMENT, "expert_counts");
  TM_EXPECT_ERROR(layout(ids.desc(), experts, ranks, rc.desc(), ec.desc(), nullptr, trs.desc()),
                  TM_ERR_INVALID_ARGUMENT, "send_order");
  TM_EXPECT_ERROR(
      layout(ids.desc(), experts, ranks, rc.desc(), ec.desc(), so_short.desc(), trs.desc()),
      TM_ERR_INVALID_ARGUMENT, "send_order");
  tm_tensor strided = *wide.desc();  // column 0 of a [T*R,2] buffer: [T*R] with stride 2
  strided.ndim = 1;
  strided.strides[0] = 2;
  TM_EXPECT_ERROR(layout(ids.desc(), experts, ranks, rc.desc(), ec.desc(), &strided, trs.desc()),
                  TM_ERR_INVALID_ARGUMENT, "send_order");
  TM_EXPECT_ERROR(layout(ids.desc(), experts, ranks, rc.desc(), ec.desc(), so.desc(), nullptr),
                  TM_ERR_INVALID_ARGUMENT, "token_rank_slot");
  for (HostTensor* bad : {&trs_flat, &trs_wide, &trs_tall}) {
    TM_EXPECT_ERROR(
        layout(ids.desc(), experts, ranks, rc.desc(), ec.desc(), so.desc(), bad->desc()),
        TM_ERR_INVALID_ARGUMENT, "token_rank_slot");
  }
  tm_tensor on_cuda = *trs.desc();
  on_cuda.device_type = TM_DEVICE_CUDA;
  TM_EXPECT_ERROR(layout(ids.desc(), experts, ranks, rc.desc(), ec.desc(), so.desc(), &on_cuda),
                  TM_ERR_INVALID_ARGUMENT, "token_rank_slot");
  for (double bad : {-1.0, static_cast<double>(experts + 1)}) {
    ids.set(3, bad);
    TM_EXPECT_ERROR(layout(ids.desc(), experts, ranks, rc.desc(), ec.desc(), so.desc(), trs.desc()),
                    TM_ERR_INVALID_ARGUMENT, "topk_ids[1, 1]");
  }
  ids.set(3, experts);  // the dropped sentinel itself is fine
  TM_ASSERT_OK(layout(ids.desc(), experts, ranks, rc.desc(), ec.desc(), so.desc(), trs.desc()));
}

}  // namespace
