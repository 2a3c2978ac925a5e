// tm_scale_unless_one: a unit scale leaves every bit alone (NaNs included, so nothing was
// rewritten), any other scale multiplies by the scale rounded to x's dtype; argument errors.
#include <cmath>
#include <vector>

#include "common/test_util.h"

namespace {

using turbomoe::testing::HostTensor;

class ScaleUnlessOneTest : public ::testing::TestWithParam<int32_t> {};

TEST_P(ScaleUnlessOneTest, UnitScaleTouchesNothing) {
  HostTensor x({5, 7}, GetParam());
  auto rng = turbomoe::testing::rng_for_test();
  x.fill_uniform(rng, -3, 3);
  x.set(4, NAN);
  const std::vector<double> before = x.values();
  HostTensor scale({1}, TM_DTYPE_FLOAT32);
  scale.set(0, 1.0);
  TM_ASSERT_OK(tm_scale_unless_one(scale.desc(), x.desc(), nullptr));
  const std::vector<double> after = x.values();
  for (size_t i = 0; i < before.size(); ++i) {
    if (std::isnan(before[i])) {
      EXPECT_TRUE(std::isnan(after[i]));
    } else {
      EXPECT_EQ(after[i], before[i]) << "element " << i;
    }
  }
}

TEST_P(ScaleUnlessOneTest, OtherScalesMultiplyByTheRoundedScale) {
  const int32_t dtype = GetParam();
  HostTensor x({3, 4}, dtype), rounded({1}, dtype);
  auto rng = turbomoe::testing::rng_for_test();
  x.fill_uniform(rng, -3, 3);
  const std::vector<double> before = x.values();
  const double s = 0.3;  // not exact in bfloat16
  rounded.set(0, s);
  HostTensor scale({1}, TM_DTYPE_FLOAT32);
  scale.set(0, s);
  TM_ASSERT_OK(tm_scale_unless_one(scale.desc(), x.desc(), nullptr));
  HostTensor want({3, 4}, dtype);
  for (int64_t i = 0; i < 12; ++i) {
    // The product in float32, rounded once to dtype by set().
    want.set(i, static_cast<float>(before[i]) * static_cast<float>(rounded.get(0)));
  }
  EXPECT_EQ(x.values(), want.values());
}

INSTANTIATE_TEST_SUITE_P(Scale, ScaleUnlessOneTest,
                         ::testing::Values(TM_DTYPE_FLOAT32, TM_DTYPE_BFLOAT16));

TEST(ScaleUnlessOne, RejectsBadArguments) {
  HostTensor x({4}, TM_DTYPE_FLOAT32), two({2}, TM_DTYPE_FLOAT32), half({1}, TM_DTYPE_BFLOAT16);
  HostTensor ints({4}, TM_DTYPE_INT32);
  TM_EXPECT_ERROR(tm_scale_unless_one(two.desc(), x.desc(), nullptr), TM_ERR_INVALID_ARGUMENT,
                  "expected 1");
  TM_EXPECT_ERROR(tm_scale_unless_one(half.desc(), x.desc(), nullptr), TM_ERR_INVALID_ARGUMENT,
                  "scale");
  HostTensor one({1}, TM_DTYPE_FLOAT32);
  TM_EXPECT_ERROR(tm_scale_unless_one(one.desc(), ints.desc(), nullptr), TM_ERR_INVALID_ARGUMENT,
                  "x");
  TM_EXPECT_ERROR(tm_scale_unless_one(one.desc(), nullptr, nullptr), TM_ERR_INVALID_ARGUMENT,
                  "x is NULL");
  HostTensor strided({4, 2}, TM_DTYPE_FLOAT32);
  tm_tensor column = *strided.desc();
  column.ndim = 1;
  column.sizes[0] = 4;
  column.strides[0] = 2;
  TM_EXPECT_ERROR(tm_scale_unless_one(one.desc(), &column, nullptr), TM_ERR_INVALID_ARGUMENT, "x");
}

}  // namespace
