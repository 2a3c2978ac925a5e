// tm_swiglu_weighted_backward against the composed ops it replaces (tm_swiglu_forward,
// tm_combine_backward with one slot a row, the weighting, tm_swiglu_backward), which round the
// same way: on the CPU every output must equal theirs exactly. Plus strided views, the optional
// output and argument errors.
#include "common/test_util.h"

namespace {

using turbomoe::testing::HostTensor;

#define TM_CHECK_OK(call) EXPECT_EQ((call), TM_OK) << tm_last_error()

tm_swiglu_params params(int variant) {
  tm_swiglu_params p{};
  p.struct_size = sizeof p;
  p.variant = variant;
  p.alpha = 1.702f;
  p.limit = 7.0f;
  return p;
}

// What the lean experts' backward computed before the fused op, from the C ABI's own ops.
struct Composed {
  HostTensor grad_gate, grad_up, weighted_act, grad_weights;
};

Composed composed(const tm_swiglu_params& p, HostTensor& grad_rows, HostTensor& gate,
                  HostTensor& up, HostTensor& row_weights) {
  const int64_t rows = gate.sizes()[0], cols = gate.sizes()[1];
  const int32_t dtype = gate.dtype();
  HostTensor act({rows, cols}, dtype), grad_act({rows, cols}, dtype);
  TM_CHECK_OK(tm_swiglu_forward(&p, gate.desc(), up.desc(), act.desc(), nullptr));
  HostTensor identity({rows}, TM_DTYPE_INT32), weights({rows, 1}, row_weights.dtype());
  for (int64_t r = 0; r < rows; ++r) {
    identity.set(r, static_cast<double>(r));
    weights.set(r, row_weights.get(r));
  }
  Composed c{HostTensor({rows, cols}, dtype), HostTensor({rows, cols}, dtype),
             HostTensor({rows, cols}, dtype), HostTensor({rows, 1}, TM_DTYPE_FLOAT32)};
  TM_CHECK_OK(tm_combine_backward(grad_rows.desc(), act.desc(), identity.desc(), weights.desc(),
                                  nullptr, grad_act.desc(), c.grad_weights.desc(), nullptr));
  // act * w with w rounded to act's dtype first (torch's `act * w.to(act.dtype)`).
  HostTensor w_rounded({1}, dtype), product({1}, dtype);
  for (int64_t r = 0; r < rows; ++r) {
    w_rounded.set(0, row_weights.get(r));
    for (int64_t col = 0; col < cols; ++col) {
      product.set(0, static_cast<double>(static_cast<float>(act.get(r * cols + col)) *
                                         static_cast<float>(w_rounded.get(0))));
      c.weighted_act.set(r * cols + col, product.get(0));
    }
  }
  TM_CHECK_OK(tm_swiglu_backward(&p, grad_act.desc(), gate.desc(), up.desc(), c.grad_gate.desc(),
                                 c.grad_up.desc(), nullptr));
  return c;
}

class WeightedBackwardTest : public ::testing::TestWithParam<std::tuple<int, int32_t, int32_t>> {};

TEST_P(WeightedBackwardTest, EqualsTheComposedOps) {
  const auto [variant, dtype, weight_dtype] = GetParam();
  auto rng = turbomoe::testing::rng_for_test();
  const tm_swiglu_params p = params(variant);
  for (auto [rows, cols] : {std::pair{13, 72}, std::pair{1, 1}, std::pair{40, 33}}) {
    HostTensor grad_rows({rows, cols}, dtype), gate({rows, cols}, dtype), up({rows, cols}, dtype);
    HostTensor row_weights({rows}, weight_dtype);
    grad_rows.fill_uniform(rng);
    gate.fill_uniform(rng, -9, 9);
    up.fill_uniform(rng, -9, 9);
    row_weights.fill_uniform(rng, 0, 1);
    row_weights.set(0, 0.0);  // a row past the routed ones
    HostTensor grad_gate({rows, cols}, dtype), grad_up({rows, cols}, dtype);
    HostTensor weighted_act({rows, cols}, dtype), grad_weights({rows}, TM_DTYPE_FLOAT32);
    grad_gate.poison();
    grad_up.poison();
    weighted_act.poison();
    grad_weights.poison();
    TM_ASSERT_OK(tm_swiglu_weighted_backward(&p, grad_rows.desc(), gate.desc(), up.desc(),
                                             row_weights.desc(), grad_gate.desc(), grad_up.desc(),
                                             weighted_act.desc(), grad_weights.desc(), nullptr));
    Composed c = composed(p, grad_rows, gate, up, row_weights);
    EXPECT_EQ(grad_gate.values(), c.grad_gate.values());
    EXPECT_EQ(grad_up.values(), c.grad_up.values());
    EXPECT_EQ(weighted_act.values(), c.weighted_act.values());
    EXPECT_EQ(grad_weights.values(), c.grad_weights.values());
  }
}

INSTANTIATE_TEST_SUITE_P(Variants, WeightedBackwardTest,
                         ::testing::Combine(::testing::Values(TM_SWIGLU_SILU, TM_SWIGLU_CLAMPED),
                                            ::testing::Values(TM_DTYPE_FLOAT32, TM_DTYPE_BFLOAT16),
                                            ::testing::Values(TM_DTYPE_FLOAT32,
                                                              TM_DTYPE_BFLOAT16)));

// The MoE layer passes the halves of one [M, 2I] gate/up buffer and of its gradient.
TEST(WeightedBackward, WorksOnHalvesOfFusedBuffersWithoutWeightedAct) {
  auto rng = turbomoe::testing::rng_for_test();
  const tm_swiglu_params p = params(TM_SWIGLU_SILU);
  const int64_t rows = 6, inter = 10;
  HostTensor gate_up({rows, 2 * inter}, TM_DTYPE_BFLOAT16);
  HostTensor grad_gate_up({rows, 2 * inter}, TM_DTYPE_BFLOAT16);
  HostTensor grad_rows({rows, inter}, TM_DTYPE_BFLOAT16), row_weights({rows}, TM_DTYPE_FLOAT32);
  HostTensor grad_weights({rows}, TM_DTYPE_FLOAT32);
  gate_up.fill_uniform(rng, -4, 4);
  grad_rows.fill_uniform(rng);
  row_weights.fill_uniform(rng, 0, 1);
  grad_gate_up.poison();
  const auto halves = [&](HostTensor& t) {
    tm_tensor first = *t.desc(), second = *t.desc();
    first.sizes[1] = second.sizes[1] = inter;
    second.data = static_cast<uint16_t*>(t.desc()->data) + inter;
    return std::pair{first, second};
  };
  auto [gate, up] = halves(gate_up);
  auto [grad_gate, grad_up] = halves(grad_gate_up);
  TM_ASSERT_OK(tm_swiglu_weighted_backward(&p, grad_rows.desc(), &gate, &up, row_weights.desc(),
                                           &grad_gate, &grad_up, nullptr, grad_weights.desc(),
                                           nullptr));
  // The same values from contiguous copies of the halves.
  HostTensor g({rows, inter}, TM_DTYPE_BFLOAT16), u({rows, inter}, TM_DTYPE_BFLOAT16);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < inter; ++c) {
      g.set(r * inter + c, gate_up.get(r * 2 * inter + c));
      u.set(r * inter + c, gate_up.get(r * 2 * inter + inter + c));
    }
  }
  Composed ref = composed(p, grad_rows, g, u, row_weights);
  for (int64_t r = 0; r < rows; ++r) {
    EXPECT_EQ(grad_weights.get(r), ref.grad_weights.get(r));
    for (int64_t c = 0; c < inter; ++c) {
      EXPECT_EQ(grad_gate_up.get(r * 2 * inter + c), ref.grad_gate.get(r * inter + c));
      EXPECT_EQ(grad_gate_up.get(r * 2 * inter + inter + c), ref.grad_up.get(r * inter + c));
    }
  }
}

TEST(WeightedBackward, RejectsBadArguments) {
  const tm_swiglu_params p = params(TM_SWIGLU_SILU);
  HostTensor m({4, 8}, TM_DTYPE_FLOAT32), o1({4, 8}, TM_DTYPE_FLOAT32);
  HostTensor o2({4, 8}, TM_DTYPE_FLOAT32), w({4}, TM_DTYPE_FLOAT32), gw({4}, TM_DTYPE_FLOAT32);
  HostTensor bf({4, 8}, TM_DTYPE_BFLOAT16), short_w({3}, TM_DTYPE_FLOAT32);
  HostTensor bf_gw({4}, TM_DTYPE_BFLOAT16), wide({4, 9}, TM_DTYPE_FLOAT32);
  const auto call = [&](tm_tensor* grad_rows, tm_tensor* up, tm_tensor* weights,
                        tm_tensor* weighted, tm_tensor* grad_weights) {
    return tm_swiglu_weighted_backward(&p, grad_rows, m.desc(), up, weights, o1.desc(), o2.desc(),
                                       weighted, grad_weights, nullptr);
  };
  TM_EXPECT_ERROR(call(bf.desc(), m.desc(), w.desc(), nullptr, gw.desc()), TM_ERR_INVALID_ARGUMENT,
                  "grad_rows");
  TM_EXPECT_ERROR(call(m.desc(), wide.desc(), w.desc(), nullptr, gw.desc()),
                  TM_ERR_INVALID_ARGUMENT, "up");
  TM_EXPECT_ERROR(call(m.desc(), m.desc(), short_w.desc(), nullptr, gw.desc()),
                  TM_ERR_INVALID_ARGUMENT, "row_weights");
  TM_EXPECT_ERROR(call(m.desc(), m.desc(), w.desc(), bf.desc(), gw.desc()), TM_ERR_INVALID_ARGUMENT,
                  "weighted_act");
  TM_EXPECT_ERROR(call(m.desc(), m.desc(), w.desc(), nullptr, bf_gw.desc()),
                  TM_ERR_INVALID_ARGUMENT, "grad_weights");
  TM_EXPECT_ERROR(call(m.desc(), m.desc(), w.desc(), nullptr, nullptr), TM_ERR_INVALID_ARGUMENT,
                  "grad_weights");
  tm_tensor on_cuda = *gw.desc();
  on_cuda.device_type = TM_DEVICE_CUDA;
  TM_EXPECT_ERROR(call(m.desc(), m.desc(), w.desc(), nullptr, &on_cuda), TM_ERR_INVALID_ARGUMENT,
                  "device");
  TM_EXPECT_ERROR(tm_swiglu_weighted_backward(nullptr, m.desc(), m.desc(), m.desc(), w.desc(),
                                              o1.desc(), o2.desc(), nullptr, gw.desc(), nullptr),
                  TM_ERR_INVALID_ARGUMENT, "params");
}

TEST(WeightedBackward, ZeroRowsIsANoOp) {
  const tm_swiglu_params p = params(TM_SWIGLU_SILU);
  HostTensor m({0, 8}, TM_DTYPE_FLOAT32), w({0}, TM_DTYPE_FLOAT32), gw({0}, TM_DTYPE_FLOAT32);
  TM_ASSERT_OK(tm_swiglu_weighted_backward(&p, m.desc(), m.desc(), m.desc(), w.desc(), m.desc(),
                                           m.desc(), nullptr, gw.desc(), nullptr));
}

}  // namespace
