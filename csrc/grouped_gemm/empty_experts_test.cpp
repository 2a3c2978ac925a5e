// tm_zero_empty_experts zeroes exactly the slices of experts without rows, and
// tm_grouped_gemm_backward_weight_routed followed by it gives tm_grouped_gemm_backward_weight's
// result; argument errors.
#include <cmath>
#include <vector>

#include "common/test_util.h"

namespace {

using turbomoe::testing::HostTensor;

HostTensor offsets_of(const std::vector<int>& counts) {
  HostTensor off({static_cast<int64_t>(counts.size()) + 1}, TM_DTYPE_INT32);
  int total = 0;
  off.set(0, 0);
  for (size_t e = 0; e < counts.size(); ++e) {
    total += counts[e];
    off.set(static_cast<int64_t>(e) + 1, total);
  }
  return off;
}

class ZeroEmptyExpertsTest : public ::testing::TestWithParam<int32_t> {};

TEST_P(ZeroEmptyExpertsTest, ZeroesOnlyTheEmptyExperts) {
  const std::vector<int> counts = {3, 0, 5, 0, 0, 1};
  HostTensor off = offsets_of(counts);
  HostTensor dw({6, 3, 5}, GetParam());
  auto rng = turbomoe::testing::rng_for_test();
  dw.fill_uniform(rng, 1, 2);  // no zeros to start with
  dw.set(2 * 15 + 7, NAN);     // a routed expert's NaN stays as it was
  const std::vector<double> before = dw.values();
  TM_ASSERT_OK(tm_zero_empty_experts(off.desc(), dw.desc(), nullptr));
  const std::vector<double> after = dw.values();
  for (int64_t i = 0; i < 6 * 15; ++i) {
    const int64_t e = i / 15;
    if (counts[e] == 0) {
      EXPECT_EQ(after[i], 0.0) << "expert " << e << " element " << i % 15;
      EXPECT_FALSE(std::signbit(after[i])) << "expert " << e << ": -0";
    } else if (std::isnan(before[i])) {
      EXPECT_TRUE(std::isnan(after[i])) << "element " << i;
    } else {
      EXPECT_EQ(after[i], before[i]) << "expert " << e << " element " << i % 15;
    }
  }
}

TEST_P(ZeroEmptyExpertsTest, RoutedGradWeightThenZeroesIsTheGradWeight) {
  const int32_t dtype = GetParam();
  const std::vector<int> counts = {4, 0, 2, 0};
  HostTensor off = offsets_of(counts);
  HostTensor dy({7, 3}, dtype), x({7, 5}, dtype), want({4, 3, 5}, dtype), got({4, 3, 5}, dtype);
  auto rng = turbomoe::testing::rng_for_test();
  dy.fill_uniform(rng, -1, 1);
  x.fill_uniform(rng, -1, 1);
  want.poison();
  got.poison();
  TM_ASSERT_OK(tm_grouped_gemm_backward_weight(dy.desc(), x.desc(), off.desc(), want.desc(),
                                               nullptr, 0, nullptr));
  TM_ASSERT_OK(tm_grouped_gemm_backward_weight_routed(dy.desc(), x.desc(), off.desc(), got.desc(),
                                                      nullptr, 0, nullptr));
  TM_ASSERT_OK(tm_zero_empty_experts(off.desc(), got.desc(), nullptr));
  EXPECT_EQ(got.values(), want.values());
}

INSTANTIATE_TEST_SUITE_P(EmptyExperts, ZeroEmptyExpertsTest,
                         ::testing::Values(TM_DTYPE_FLOAT32, TM_DTYPE_BFLOAT16));

TEST(ZeroEmptyExperts, RejectsBadArguments) {
  HostTensor off = offsets_of({1, 0, 2});
  HostTensor dw({3, 2, 2}, TM_DTYPE_FLOAT32), four({4, 2, 2}, TM_DTYPE_FLOAT32);
  HostTensor flat({3, 4}, TM_DTYPE_FLOAT32), ints({3, 2, 2}, TM_DTYPE_INT32);
  TM_EXPECT_ERROR(tm_zero_empty_experts(off.desc(), four.desc(), nullptr), TM_ERR_INVALID_ARGUMENT,
                  "E + 1");
  TM_EXPECT_ERROR(tm_zero_empty_experts(off.desc(), flat.desc(), nullptr), TM_ERR_INVALID_ARGUMENT,
                  "out");
  TM_EXPECT_ERROR(tm_zero_empty_experts(off.desc(), ints.desc(), nullptr), TM_ERR_INVALID_ARGUMENT,
                  "out");
  TM_EXPECT_ERROR(tm_zero_empty_experts(nullptr, dw.desc(), nullptr), TM_ERR_INVALID_ARGUMENT,
                  "expert_offsets is NULL");
  HostTensor decreasing({4}, TM_DTYPE_INT32);
  decreasing.set(0, 0);
  decreasing.set(1, 2);
  decreasing.set(2, 1);
  decreasing.set(3, 3);
  TM_EXPECT_ERROR(tm_zero_empty_experts(decreasing.desc(), dw.desc(), nullptr),
                  TM_ERR_INVALID_ARGUMENT, "decreases at expert 1");
  tm_tensor strided = *dw.desc();
  strided.sizes[2] = 1;  // [3, 2, 1] with dw's strides [4, 2, 1]: slices 4 apart, not dense
  TM_EXPECT_ERROR(tm_zero_empty_experts(off.desc(), &strided, nullptr), TM_ERR_INVALID_ARGUMENT,
                  "out");
}

}  // namespace
