// The plan against a stable sort, the row gather against direct indexing, and every argument
// error of tm_permute_plan, tm_permute_plan_workspace_size and tm_gather_rows.
#include <algorithm>
#include <numeric>
#include <vector>

#include "common/test_util.h"

namespace {

using turbomoe::testing::HostTensor;

struct Plan {
  HostTensor sorted, p2r, offsets;
};

Plan run_plan(HostTensor& ids, int64_t experts, tm_tensor* ids_desc = nullptr) {
  const int64_t pairs = ids.numel();
  Plan p{HostTensor({pairs}, TM_DTYPE_INT32), HostTensor({pairs}, TM_DTYPE_INT32),
         HostTensor({experts + 1}, TM_DTYPE_INT32)};
  p.sorted.poison();
  p.p2r.poison();
  p.offsets.poison();
  size_t bytes = 1;
  EXPECT_EQ(tm_permute_plan_workspace_size(pairs, experts, TM_DEVICE_CPU, &bytes), TM_OK);
  EXPECT_EQ(bytes, 0u);
  const tm_status status =
      tm_permute_plan(ids_desc ? ids_desc : ids.desc(), experts, p.sorted.desc(), p.p2r.desc(),
                      p.offsets.desc(), nullptr, 0, nullptr);
  EXPECT_EQ(status, TM_OK) << tm_last_error();
  return p;
}

enum class Scenario { kRandom, kWithDropped, kOneExpertTakesAll, kEmptyExpert };

// [T,K] ids; experts == num_experts means dropped.
HostTensor make_ids(std::mt19937_64& rng, int64_t tokens, int64_t top_k, int64_t experts,
                    Scenario s, int32_t dtype) {
  HostTensor ids({tokens, top_k}, dtype);
  std::uniform_int_distribution<int64_t> pick(0, experts - 1);
  std::uniform_real_distribution<double> coin(0, 1);
  for (int64_t i = 0; i < ids.numel(); ++i) {
    int64_t e = pick(rng);
    if (s == Scenario::kWithDropped && coin(rng) < 0.25) e = experts;
    if (s == Scenario::kOneExpertTakesAll) e = experts - 1;
    if (s == Scenario::kEmptyExpert && e == 1) e = 0;
    ids.set(i, static_cast<double>(e));
  }
  return ids;
}

// The reference: a stable sort of the pair indices by expert, dropped pairs left out.
void expect_stable_sort(const HostTensor& ids, int64_t experts, const Plan& p) {
  const int64_t pairs = ids.numel();
  std::vector<int64_t> order;
  for (int64_t i = 0; i < pairs; ++i) {
    if (ids.get(i) != experts) order.push_back(i);
  }
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return ids.get(a) < ids.get(b); });
  for (int64_t e = 0; e <= experts; ++e) {
    const auto expected =
        std::count_if(order.begin(), order.end(), [&](int64_t i) { return ids.get(i) < e; });
    EXPECT_EQ(p.offsets.get(e), expected) << "expert_offsets[" << e << "]";
  }
  for (int64_t r = 0; r < pairs; ++r) {
    const double expected = r < static_cast<int64_t>(order.size()) ? order[r] : -1;
    EXPECT_EQ(p.sorted.get(r), expected) << "sorted_pairs[" << r << "]";
  }
  for (int64_t i = 0; i < pairs; ++i) {
    const auto it = std::find(order.begin(), order.end(), i);
    const double expected = it == order.end() ? -1 : static_cast<double>(it - order.begin());
    EXPECT_EQ(p.p2r.get(i), expected) << "pair_to_row[" << i << "]";
  }
}

class PermutePlanTest
    : public ::testing::TestWithParam<std::tuple<Scenario, int32_t, std::tuple<int, int, int>>> {};

TEST_P(PermutePlanTest, MatchesAStableSortByExpert) {
  const auto [scenario, dtype, shape] = GetParam();
  const auto [tokens, top_k, experts] = shape;
  auto rng = turbomoe::testing::rng_for_test();
  HostTensor ids = make_ids(rng, tokens, top_k, experts, scenario, dtype);
  const Plan p = run_plan(ids, experts);
  expect_stable_sort(ids, experts, p);
  // Deterministic: a second run gives the same bits.
  const Plan again = run_plan(ids, experts);
  EXPECT_EQ(again.sorted.values(), p.sorted.values());
  EXPECT_EQ(again.p2r.values(), p.p2r.values());
  EXPECT_EQ(again.offsets.values(), p.offsets.values());
}

INSTANTIATE_TEST_SUITE_P(
    Permute, PermutePlanTest,
    ::testing::Combine(::testing::Values(Scenario::kRandom, Scenario::kWithDropped,
                                         Scenario::kOneExpertTakesAll, Scenario::kEmptyExpert),
                       ::testing::Values(TM_DTYPE_INT32, TM_DTYPE_INT64),
                       ::testing::Values(std::tuple{13, 2, 5}, std::tuple{1, 1, 1},
                                         std::tuple{300, 8, 64}, std::tuple{2000, 1, 3})));

TEST(Permute, PlanReadsStridedIds) {
  auto rng = turbomoe::testing::rng_for_test();
  const int64_t tokens = 11, top_k = 3, experts = 4;
  HostTensor ids = make_ids(rng, tokens, top_k, experts, Scenario::kWithDropped, TM_DTYPE_INT64);
  HostTensor transposed;  // the same ids stored [K,T]
  tm_tensor view = turbomoe::testing::transposed_view(ids, transposed);
  const Plan p = run_plan(ids, experts, &view);
  expect_stable_sort(ids, experts, p);
}

TEST(Permute, ZeroTokensGiveZeroOffsets) {
  HostTensor ids({0, 4}, TM_DTYPE_INT32);
  const Plan p = run_plan(ids, 6);
  EXPECT_EQ(p.offsets.values(), std::vector<double>(7, 0.0));
}

TEST(Permute, WorkspaceSize) {
  size_t bytes = 7;
  TM_ASSERT_OK(tm_permute_plan_workspace_size(5000, 64, TM_DEVICE_CPU, &bytes));
  EXPECT_EQ(bytes, 0u);
  if (tm_built_with_cuda() != 0) {
    TM_ASSERT_OK(tm_permute_plan_workspace_size(5000, 64, TM_DEVICE_CUDA, &bytes));
    EXPECT_GE(bytes, 5u * 64 * sizeof(int32_t));  // one count per (1024-pair block, expert)
    TM_ASSERT_OK(tm_permute_plan_workspace_size(0, 64, TM_DEVICE_CUDA, &bytes));
    EXPECT_EQ(bytes, 0u);
  } else {  // a CPU-only build (TM_DISABLE_CUDA) says so instead of sizing a CUDA workspace
    TM_EXPECT_ERROR(tm_permute_plan_workspace_size(5000, 64, TM_DEVICE_CUDA, &bytes),
                    TM_ERR_UNSUPPORTED, "without CUDA");
  }
  TM_EXPECT_ERROR(tm_permute_plan_workspace_size(10, 4, TM_DEVICE_CPU, nullptr),
                  TM_ERR_INVALID_ARGUMENT, "bytes");
  TM_EXPECT_ERROR(tm_permute_plan_workspace_size(-1, 4, TM_DEVICE_CPU, &bytes),
                  TM_ERR_INVALID_ARGUMENT, "num_pairs");
  TM_EXPECT_ERROR(tm_permute_plan_workspace_size(10, 0, TM_DEVICE_CPU, &bytes),
                  TM_ERR_INVALID_ARGUMENT, "num_experts");
  TM_EXPECT_ERROR(tm_permute_plan_workspace_size(10, 4, 7, &bytes), TM_ERR_INVALID_ARGUMENT,
                  "device_type");
}

TEST(Permute, RejectsBadPlanArguments) {
  const int64_t experts = 4;
  HostTensor ids({3, 2}, TM_DTYPE_INT32), sorted({6}, TM_DTYPE_INT32), p2r({6}, TM_DTYPE_INT32);
  HostTensor off({experts + 1}, TM_DTYPE_INT32), ids_f({3, 2}, TM_DTYPE_FLOAT32);
  HostTensor ids_1d({6}, TM_DTYPE_INT32), short_idx({5}, TM_DTYPE_INT32);
  HostTensor idx64({6}, TM_DTYPE_INT64), off_short({experts}, TM_DTYPE_INT32);
  HostTensor wide({6, 2}, TM_DTYPE_INT32);
  for (int64_t i = 0; i < 6; ++i) ids.set(i, i % experts);
  auto plan = [&](tm_tensor* i, int64_t e, tm_tensor* s, tm_tensor* p, tm_tensor* o) {
    return tm_permute_plan(i, e, s, p, o, nullptr, 0, nullptr);
  };
  TM_ASSERT_OK(plan(ids.desc(), experts, sorted.desc(), p2r.desc(), off.desc()));
  TM_EXPECT_ERROR(plan(nullptr, experts, sorted.desc(), p2r.desc(), off.desc()),
                  TM_ERR_INVALID_ARGUMENT, "topk_ids");
  TM_EXPECT_ERROR(plan(ids_f.desc(), experts, sorted.desc(), p2r.desc(), off.desc()),
                  TM_ERR_INVALID_ARGUMENT, "topk_ids");
  TM_EXPECT_ERROR(plan(ids_1d.desc(), experts, sorted.desc(), p2r.desc(), off.desc()),
                  TM_ERR_INVALID_ARGUMENT, "topk_ids");
  TM_EXPECT_ERROR(plan(ids.desc(), 0, sorted.desc(), p2r.desc(), off.desc()),
                  TM_ERR_INVALID_ARGUMENT, "num_experts");
  TM_EXPECT_ERROR(plan(ids.desc(), experts, nullptr, p2r.desc(), off.desc()),
                  TM_ERR_INVALID_ARGUMENT, "sorted_pairs");
  TM_EXPECT_ERROR(plan(ids.desc(), experts, short_idx.desc(), p2r.desc(), off.desc()),
                  TM_ERR_INVALID_ARGUMENT, "sorted_pairs");
  TM_EXPECT_ERROR(plan(ids.desc(), experts, idx64.desc(), p2r.desc(), off.desc()),
                  TM_ERR_INVALID_ARGUMENT, "sorted_pairs");
  TM_EXPECT_ERROR(plan(ids.desc(), experts, sorted.desc(), nullptr, off.desc()),
                  TM_ERR_INVALID_ARGUMENT, "pair_to_row");
  TM_EXPECT_ERROR(plan(ids.desc(), experts, sorted.desc(), short_idx.desc(), off.desc()),
                  TM_ERR_INVALID_ARGUMENT, "pair_to_row");
  TM_EXPECT_ERROR(plan(ids.desc(), experts, sorted.desc(), p2r.desc(), nullptr),
                  TM_ERR_INVALID_ARGUMENT, "expert_offsets");
  TM_EXPECT_ERROR(plan(ids.desc(), experts, sorted.desc(), p2r.desc(), off_short.desc()),
                  TM_ERR_INVALID_ARGUMENT, "expert_offsets");
  tm_tensor strided = *wide.desc();  // column 0 of a [6,2] buffer: [6] with stride 2
  strided.ndim = 1;
  strided.strides[0] = 2;
  TM_EXPECT_ERROR(plan(ids.desc(), experts, &strided, p2r.desc(), off.desc()),
                  TM_ERR_INVALID_ARGUMENT, "sorted_pairs");
  tm_tensor on_cuda = *p2r.desc();
  on_cuda.device_type = TM_DEVICE_CUDA;
  TM_EXPECT_ERROR(plan(ids.desc(), experts, sorted.desc(), &on_cuda, off.desc()),
                  TM_ERR_INVALID_ARGUMENT, "pair_to_row");
  for (double bad : {-1.0, static_cast<double>(experts + 1)}) {
    ids.set(3, bad);
    TM_EXPECT_ERROR(plan(ids.desc(), experts, sorted.desc(), p2r.desc(), off.desc()),
                    TM_ERR_INVALID_ARGUMENT, "topk_ids[1, 1]");
  }
  ids.set(3, experts);  // the dropped sentinel itself is fine
  TM_ASSERT_OK(plan(ids.desc(), experts, sorted.desc(), p2r.desc(), off.desc()));
}

class GatherTest : public ::testing::TestWithParam<int32_t> {};

TEST_P(GatherTest, CopiesTheTokenRowOfEachSortedPair) {
  const int32_t dtype = GetParam();
  auto rng = turbomoe::testing::rng_for_test();
  for (auto scenario :
       {Scenario::kWithDropped, Scenario::kOneExpertTakesAll, Scenario::kEmptyExpert}) {
    const int64_t tokens = 13, top_k = 2, experts = 5, hidden = 72;
    HostTensor ids = make_ids(rng, tokens, top_k, experts, scenario, TM_DTYPE_INT32);
    Plan p = run_plan(ids, experts);
    HostTensor src({tokens, hidden}, dtype), dst({tokens * top_k, hidden}, dtype);
    src.fill_uniform(rng);
    dst.poison();
    TM_ASSERT_OK(
        tm_gather_rows(src.desc(), p.sorted.desc(), p.offsets.desc(), top_k, dst.desc(), nullptr));
    const int64_t used = static_cast<int64_t>(p.offsets.get(experts));
    for (int64_t r = 0; r < tokens * top_k; ++r) {
      const int64_t token = r < used ? static_cast<int64_t>(p.sorted.get(r)) / top_k : -1;
      for (int64_t h = 0; h < hidden; ++h) {
        const double expected = token >= 0 ? src.get(token * hidden + h) : 0.0;
        ASSERT_EQ(dst.get(r * hidden + h), expected) << "row " << r << " col " << h;
      }
    }
  }
}

// The expert-parallel owner sizes dst by the pairs actually routed (offsets[E]), not T*top_k.
TEST(Gather, ShortDstHoldsExactlyTheRoutedRows) {
  auto rng = turbomoe::testing::rng_for_test();
  const int64_t tokens = 13, top_k = 2, experts = 5, hidden = 16;
  HostTensor ids = make_ids(rng, tokens, top_k, experts, Scenario::kRandom, TM_DTYPE_INT32);
  ids.set(0, static_cast<double>(experts));  // two dropped pairs: the sentinel id
  ids.set(3, static_cast<double>(experts));
  Plan p = run_plan(ids, experts);
  const int64_t used = static_cast<int64_t>(p.offsets.get(experts));
  ASSERT_EQ(used, tokens * top_k - 2);
  HostTensor src({tokens, hidden}, TM_DTYPE_FLOAT32), dst({used, hidden}, TM_DTYPE_FLOAT32);
  src.fill_uniform(rng);
  dst.poison();
  TM_ASSERT_OK(
      tm_gather_rows(src.desc(), p.sorted.desc(), p.offsets.desc(), top_k, dst.desc(), nullptr));
  for (int64_t r = 0; r < used; ++r) {
    const int64_t token = static_cast<int64_t>(p.sorted.get(r)) / top_k;
    for (int64_t h = 0; h < hidden; ++h) {
      ASSERT_EQ(dst.get(r * hidden + h), src.get(token * hidden + h)) << "row " << r;
    }
  }
}

// The expert-parallel dispatch names a "zero token" past src for the padding of its blocks:
// those pairs give zero rows, without a padded copy of src. Pairs past sorted_pairs' own
// length are still errors.
TEST(Gather, PairsPastTheTokensOfSrcGiveZeroRows) {
  auto rng = turbomoe::testing::rng_for_test();
  const int64_t tokens = 3, top_k = 2, hidden = 8, pairs = 10;  // 2 tokens' worth of padding
  HostTensor src({tokens, hidden}, TM_DTYPE_FLOAT32), dst({pairs, hidden}, TM_DTYPE_FLOAT32);
  HostTensor sorted({pairs}, TM_DTYPE_INT32), off({2}, TM_DTYPE_INT32);
  src.fill_uniform(rng);
  dst.poison();
  const int32_t order[pairs] = {5, 8, 0, 6, 9, 1, 7, 2, 3, 4};
  for (int64_t r = 0; r < pairs; ++r) sorted.set(r, order[r]);
  off.set(0, 0);
  off.set(1, pairs);
  TM_ASSERT_OK(tm_gather_rows(src.desc(), sorted.desc(), off.desc(), top_k, dst.desc(), nullptr));
  for (int64_t r = 0; r < pairs; ++r) {
    const int64_t token = order[r] / top_k;
    for (int64_t h = 0; h < hidden; ++h) {
      const double expected = token < tokens ? src.get(token * hidden + h) : 0.0;
      ASSERT_EQ(dst.get(r * hidden + h), expected) << "row " << r;
    }
  }
  sorted.set(4, pairs);  // past every pair there is: an error, not a zero row
  TM_EXPECT_ERROR(tm_gather_rows(src.desc(), sorted.desc(), off.desc(), top_k, dst.desc(), nullptr),
                  TM_ERR_INVALID_ARGUMENT, "sorted_pairs[4] is 10");
}

INSTANTIATE_TEST_SUITE_P(Gather, GatherTest,
                         ::testing::Values(TM_DTYPE_FLOAT32, TM_DTYPE_BFLOAT16));

TEST(Gather, RejectsBadArguments) {
  const int64_t tokens = 3, top_k = 2, experts = 2, hidden = 8;
  HostTensor src({tokens, hidden}, TM_DTYPE_FLOAT32), dst({6, hidden}, TM_DTYPE_FLOAT32);
  HostTensor sorted({6}, TM_DTYPE_INT32), off({experts + 1}, TM_DTYPE_INT32);
  HostTensor dst_bf({6, hidden}, TM_DTYPE_BFLOAT16), dst_rows({5, hidden}, TM_DTYPE_FLOAT32);
  HostTensor dst_h({6, hidden + 1}, TM_DTYPE_FLOAT32), sorted_short({5}, TM_DTYPE_INT32);
  HostTensor off_i64({experts + 1}, TM_DTYPE_INT64), src_int({tokens, hidden}, TM_DTYPE_INT32);
  HostTensor wide({tokens, 2 * hidden}, TM_DTYPE_FLOAT32), off_empty({0}, TM_DTYPE_INT32);
  for (int64_t r = 0; r < 6; ++r) sorted.set(r, r);
  const double offsets[3] = {0, 4, 6};
  for (int e = 0; e <= experts; ++e) off.set(e, offsets[e]);
  auto gather = [&](tm_tensor* s, tm_tensor* sp, tm_tensor* o, int64_t k, tm_tensor* d) {
    return tm_gather_rows(s, sp, o, k, d, nullptr);
  };
  TM_ASSERT_OK(gather(src.desc(), sorted.desc(), off.desc(), top_k, dst.desc()));
  TM_EXPECT_ERROR(gather(nullptr, sorted.desc(), off.desc(), top_k, dst.desc()),
                  TM_ERR_INVALID_ARGUMENT, "src");
  TM_EXPECT_ERROR(gather(src_int.desc(), sorted.desc(), off.desc(), top_k, dst.desc()),
                  TM_ERR_INVALID_ARGUMENT, "src");
  TM_EXPECT_ERROR(gather(src.desc(), nullptr, off.desc(), top_k, dst.desc()),
                  TM_ERR_INVALID_ARGUMENT, "sorted_pairs");
  TM_EXPECT_ERROR(gather(src.desc(), sorted_short.desc(), off.desc(), top_k, dst.desc()),
                  TM_ERR_INVALID_ARGUMENT, "sorted_pairs");
  TM_EXPECT_ERROR(gather(src.desc(), sorted.desc(), nullptr, top_k, dst.desc()),
                  TM_ERR_INVALID_ARGUMENT, "expert_offsets");
  TM_EXPECT_ERROR(gather(src.desc(), sorted.desc(), off_i64.desc(), top_k, dst.desc()),
                  TM_ERR_INVALID_ARGUMENT, "expert_offsets");
  TM_EXPECT_ERROR(gather(src.desc(), sorted.desc(), off_empty.desc(), top_k, dst.desc()),
                  TM_ERR_INVALID_ARGUMENT, "expert_offsets");
  TM_EXPECT_ERROR(gather(src.desc(), sorted.desc(), off.desc(), 0, dst.desc()),
                  TM_ERR_INVALID_ARGUMENT, "top_k");
  TM_EXPECT_ERROR(gather(src.desc(), sorted.desc(), off.desc(), top_k, nullptr),
                  TM_ERR_INVALID_ARGUMENT, "dst");
  TM_EXPECT_ERROR(gather(src.desc(), sorted.desc(), off.desc(), top_k, dst_bf.desc()),
                  TM_ERR_INVALID_ARGUMENT, "dst");
  // Fewer dst rows than pairs are fine only while offsets[E] (6 here) fits; more never are.
  TM_EXPECT_ERROR(gather(src.desc(), sorted.desc(), off.desc(), top_k, dst_rows.desc()),
                  TM_ERR_INVALID_ARGUMENT, "expert_offsets");
  HostTensor dst_long({7, hidden}, TM_DTYPE_FLOAT32);
  TM_EXPECT_ERROR(gather(src.desc(), sorted.desc(), off.desc(), top_k, dst_long.desc()),
                  TM_ERR_INVALID_ARGUMENT, "dst");
  TM_EXPECT_ERROR(gather(src.desc(), sorted.desc(), off.desc(), top_k, dst_h.desc()),
                  TM_ERR_INVALID_ARGUMENT, "dst");
  tm_tensor every_other = *wide.desc();  // [T,H] with column stride 2
  every_other.sizes[1] = hidden;
  every_other.strides[1] = 2;
  TM_EXPECT_ERROR(gather(&every_other, sorted.desc(), off.desc(), top_k, dst.desc()),
                  TM_ERR_INVALID_ARGUMENT, "src");
  // Offset values: must start at 0, never decrease, end within the rows.
  const double bad_offsets[3][3] = {{1, 4, 6}, {0, 4, 3}, {0, 4, 7}};
  for (const auto& b : bad_offsets) {
    for (int e = 0; e <= experts; ++e) off.set(e, b[e]);
    TM_EXPECT_ERROR(gather(src.desc(), sorted.desc(), off.desc(), top_k, dst.desc()),
                    TM_ERR_INVALID_ARGUMENT, "expert_offsets");
  }
  for (int e = 0; e <= experts; ++e) off.set(e, offsets[e]);
  for (double bad : {-1.0, 6.0}) {
    sorted.set(2, bad);
    TM_EXPECT_ERROR(gather(src.desc(), sorted.desc(), off.desc(), top_k, dst.desc()),
                    TM_ERR_INVALID_ARGUMENT, "sorted_pairs[2]");
  }
}

TEST(Gather, ZeroTokensIsANoOp) {
  HostTensor src({0, 8}, TM_DTYPE_FLOAT32), dst({0, 8}, TM_DTYPE_FLOAT32);
  HostTensor sorted({0}, TM_DTYPE_INT32), off({3}, TM_DTYPE_INT32);
  TM_ASSERT_OK(tm_gather_rows(src.desc(), sorted.desc(), off.desc(), 2, dst.desc(), nullptr));
}

}  // namespace
