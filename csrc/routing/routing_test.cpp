// Routers against a double-precision transcription of Hugging Face's routers (Qwen3-MoE / Mixtral,
// DeepSeek-V3, GPT-OSS), gradients against finite differences, and every argument error.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "common/test_util.h"

namespace {

using turbomoe::testing::HostTensor;
using turbomoe::testing::rel_error;

struct Config {
  int kind;
  int64_t tokens, experts;
  int top_k, renormalize, n_group, topk_group;
  float scale;
};

tm_routing_params params_of(const Config& c) {
  tm_routing_params p{};
  p.struct_size = sizeof p;
  p.kind = c.kind;
  p.top_k = c.top_k;
  p.renormalize = c.renormalize;
  p.n_group = c.n_group;
  p.topk_group = c.topk_group;
  p.routed_scaling_factor = c.scale;
  p.renorm_epsilon = c.kind == TM_ROUTING_SIGMOID_GROUP_TOPK ? 1e-20f : 0.0f;
  return p;
}

// Indices of the `count` largest values among allowed entries, largest first, lower index on ties
// (torch.topk's set, in the order the ABI promises).
std::vector<int> top_indices(const std::vector<double>& v, const std::vector<bool>& allowed,
                             int count) {
  std::vector<int> order;
  for (int i = 0; i < static_cast<int>(v.size()); ++i) {
    if (allowed[i]) order.push_back(i);
  }
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return v[a] > v[b]; });
  order.resize(count);
  return order;
}

struct Routed {
  std::vector<int> ids;
  std::vector<double> weights, scores;
};

// One token through the Hugging Face router of `p.kind`, in double.
Routed reference_token(const tm_routing_params& p, const std::vector<double>& logits,
                       const std::vector<double>& bias) {
  const int n = static_cast<int>(logits.size());
  Routed r;
  r.scores = logits;
  if (p.kind == TM_ROUTING_SOFTMAX_TOPK) {  // Qwen3MoeTopKRouter / MixtralTopKRouter
    const double m = *std::max_element(logits.begin(), logits.end());
    double sum = 0;
    for (double x : logits) sum += std::exp(x - m);
    for (int e = 0; e < n; ++e) r.scores[e] = std::exp(logits[e] - m) / sum;
    r.ids = top_indices(r.scores, std::vector<bool>(n, true), p.top_k);
    for (int id : r.ids) r.weights.push_back(r.scores[id]);
    if (p.renormalize) {
      const double s = std::accumulate(r.weights.begin(), r.weights.end(), 0.0);
      for (double& w : r.weights) w /= s;
    }
  } else if (p.kind == TM_ROUTING_SIGMOID_GROUP_TOPK) {  // DeepseekV3TopkRouter
    std::vector<double> choice(n);
    for (int e = 0; e < n; ++e) {
      r.scores[e] = 1.0 / (1.0 + std::exp(-logits[e]));
      choice[e] = r.scores[e] + bias[e];
    }
    const int size = n / p.n_group;
    std::vector<double> group_scores(p.n_group);
    for (int g = 0; g < p.n_group; ++g) {
      std::vector<double> members(choice.begin() + g * size, choice.begin() + (g + 1) * size);
      std::sort(members.rbegin(), members.rend());
      group_scores[g] = members[0] + (size >= 2 ? members[1] : 0.0);
    }
    const auto groups = top_indices(group_scores, std::vector<bool>(p.n_group, true), p.topk_group);
    std::vector<bool> allowed(n, false);
    for (int g : groups) std::fill_n(allowed.begin() + g * size, size, true);
    r.ids = top_indices(choice, allowed, p.top_k);
    for (int id : r.ids) r.weights.push_back(r.scores[id]);
    if (p.renormalize) {
      const double s = std::accumulate(r.weights.begin(), r.weights.end(), 0.0) + 1e-20;
      for (double& w : r.weights) w /= s;
    }
    for (double& w : r.weights) w *= p.routed_scaling_factor;
  } else {  // GptOssTopKRouter
    r.ids = top_indices(logits, std::vector<bool>(n, true), p.top_k);
    const double m = logits[r.ids[0]];
    double sum = 0;
    for (int id : r.ids) sum += std::exp(logits[id] - m);
    for (int id : r.ids) r.weights.push_back(std::exp(logits[id] - m) / sum);
  }
  return r;
}

// The weights of one token as a function of its logits with the ids held fixed, in double.
std::vector<double> weights_with_ids(const tm_routing_params& p, const std::vector<double>& l,
                                     const std::vector<int>& ids) {
  std::vector<double> z;
  if (p.kind == TM_ROUTING_TOPK_SOFTMAX) {
    double m = -INFINITY, sum = 0;
    for (int id : ids) m = std::max(m, l[id]);
    for (int id : ids) sum += std::exp(l[id] - m);
    for (int id : ids) z.push_back(std::exp(l[id] - m) / sum);
    return z;
  }
  if (p.kind == TM_ROUTING_SOFTMAX_TOPK) {
    const double m = *std::max_element(l.begin(), l.end());
    double sum = 0;
    for (double x : l) sum += std::exp(x - m);
    for (int id : ids) z.push_back(std::exp(l[id] - m) / sum);
  } else {
    for (int id : ids) z.push_back(1.0 / (1.0 + std::exp(-l[id])));
  }
  const double scale = p.kind == TM_ROUTING_SIGMOID_GROUP_TOPK ? p.routed_scaling_factor : 1.0;
  const double denom =
      p.renormalize ? std::accumulate(z.begin(), z.end(), 0.0) + p.renorm_epsilon : 1.0;
  for (double& w : z) w = scale * w / denom;
  return z;
}

std::vector<double> row(const HostTensor& t, int64_t r, int64_t cols) {
  std::vector<double> v(cols);
  for (int64_t c = 0; c < cols; ++c) v[c] = t.get(r * cols + c);
  return v;
}

struct Outputs {
  HostTensor weights, ids, scores;
};

Outputs run_forward(const tm_routing_params& p, HostTensor& logits, HostTensor* bias,
                    int32_t id_dtype) {
  const int64_t t = logits.sizes()[0], e = logits.sizes()[1];
  Outputs o{HostTensor({t, p.top_k}, TM_DTYPE_FLOAT32), HostTensor({t, p.top_k}, id_dtype),
            HostTensor({t, e}, TM_DTYPE_FLOAT32)};
  o.weights.poison();
  o.ids.poison();
  o.scores.poison();
  const tm_status status =
      tm_routing_forward(&p, logits.desc(), bias ? bias->desc() : nullptr, o.weights.desc(),
                         o.ids.desc(), o.scores.desc(), nullptr);
  EXPECT_EQ(status, TM_OK) << tm_last_error();
  return o;
}

const Config kConfigs[] = {
    {TM_ROUTING_SOFTMAX_TOPK, 13, 5, 2, 1, 1, 1, 1.0f},
    {TM_ROUTING_SOFTMAX_TOPK, 40, 64, 8, 0, 1, 1, 1.0f},
    {TM_ROUTING_SOFTMAX_TOPK, 9, 128, 8, 1, 1, 1, 1.0f},
    {TM_ROUTING_SOFTMAX_TOPK, 6, 7, 7, 1, 1, 1, 1.0f},
    {TM_ROUTING_SIGMOID_GROUP_TOPK, 13, 5, 2, 1, 1, 1, 1.0f},
    {TM_ROUTING_SIGMOID_GROUP_TOPK, 13, 5, 2, 1, 5, 2, 2.0f},
    {TM_ROUTING_SIGMOID_GROUP_TOPK, 30, 64, 6, 1, 8, 3, 2.5f},
    {TM_ROUTING_SIGMOID_GROUP_TOPK, 11, 256, 8, 1, 8, 4, 2.5f},
    {TM_ROUTING_SIGMOID_GROUP_TOPK, 17, 32, 4, 0, 4, 2, 1.5f},
    {TM_ROUTING_TOPK_SOFTMAX, 13, 5, 2, 0, 1, 1, 1.0f},
    {TM_ROUTING_TOPK_SOFTMAX, 20, 32, 4, 0, 1, 1, 1.0f},
    {TM_ROUTING_TOPK_SOFTMAX, 5, 3, 1, 0, 1, 1, 1.0f},
};

class RoutingTest : public ::testing::TestWithParam<std::tuple<Config, int32_t, int32_t>> {};

TEST_P(RoutingTest, ForwardMatchesDoubleReference) {
  const auto [c, dtype, id_dtype] = GetParam();
  auto rng = turbomoe::testing::rng_for_test();
  const tm_routing_params p = params_of(c);
  HostTensor logits({c.tokens, c.experts}, dtype), bias({c.experts}, TM_DTYPE_FLOAT32);
  logits.fill_uniform(rng, -4, 4);
  bias.fill_uniform(rng, -0.5, 0.5);
  const bool with_bias = c.kind == TM_ROUTING_SIGMOID_GROUP_TOPK;
  Outputs o = run_forward(p, logits, with_bias ? &bias : nullptr, id_dtype);
  std::vector<double> ref_w, ref_s, got_w = o.weights.values();
  const std::vector<double> zero_bias(c.experts, 0.0);
  for (int64_t t = 0; t < c.tokens; ++t) {
    const Routed r =
        reference_token(p, row(logits, t, c.experts), with_bias ? bias.values() : zero_bias);
    for (int k = 0; k < c.top_k; ++k) {
      EXPECT_EQ(o.ids.get(t * c.top_k + k), r.ids[k]) << "token " << t << " slot " << k;
    }
    ref_w.insert(ref_w.end(), r.weights.begin(), r.weights.end());
    ref_s.insert(ref_s.end(), r.scores.begin(), r.scores.end());
  }
  EXPECT_LT(rel_error(got_w, ref_w), 1e-5);
  EXPECT_LT(rel_error(o.scores.values(), ref_s), 1e-5);
}

TEST_P(RoutingTest, BackwardMatchesFiniteDifferences) {
  const auto [c, dtype, id_dtype] = GetParam();
  auto rng = turbomoe::testing::rng_for_test();
  const tm_routing_params p = params_of(c);
  HostTensor logits({c.tokens, c.experts}, TM_DTYPE_FLOAT32), bias({c.experts}, TM_DTYPE_FLOAT32);
  logits.fill_uniform(rng, -3, 3);
  bias.fill_uniform(rng, -0.5, 0.5);
  const bool with_bias = c.kind == TM_ROUTING_SIGMOID_GROUP_TOPK;
  Outputs o = run_forward(p, logits, with_bias ? &bias : nullptr, id_dtype);
  HostTensor grad_w({c.tokens, c.top_k}, TM_DTYPE_FLOAT32), grad_l({c.tokens, c.experts}, dtype);
  grad_w.fill_uniform(rng);
  grad_l.poison();
  TM_ASSERT_OK(tm_routing_backward(&p, grad_w.desc(), o.scores.desc(), o.ids.desc(), grad_l.desc(),
                                   nullptr));
  std::vector<double> ref;
  const double h = 1e-6;
  for (int64_t t = 0; t < c.tokens; ++t) {
    std::vector<int> ids(c.top_k);
    for (int k = 0; k < c.top_k; ++k) ids[k] = static_cast<int>(o.ids.get(t * c.top_k + k));
    const std::vector<double> g = row(grad_w, t, c.top_k);
    std::vector<double> l = row(logits, t, c.experts);
    for (int64_t e = 0; e < c.experts; ++e) {
      const double saved = l[e];
      l[e] = saved + h;
      const auto up = weights_with_ids(p, l, ids);
      l[e] = saved - h;
      const auto down = weights_with_ids(p, l, ids);
      l[e] = saved;
      double d = 0;
      for (int k = 0; k < c.top_k; ++k) d += g[k] * (up[k] - down[k]) / (2 * h);
      ref.push_back(d);
    }
  }
  EXPECT_LT(rel_error(grad_l.values(), ref), dtype == TM_DTYPE_FLOAT32 ? 1e-4 : 1e-2);
}

INSTANTIATE_TEST_SUITE_P(Routing, RoutingTest,
                         ::testing::Combine(::testing::ValuesIn(kConfigs),
                                            ::testing::Values(TM_DTYPE_FLOAT32, TM_DTYPE_BFLOAT16),
                                            ::testing::Values(TM_DTYPE_INT32, TM_DTYPE_INT64)));

TEST(Routing, TiesGoToTheLowerExpertId) {
  for (int kind :
       {TM_ROUTING_SOFTMAX_TOPK, TM_ROUTING_SIGMOID_GROUP_TOPK, TM_ROUTING_TOPK_SOFTMAX}) {
    const tm_routing_params p = params_of({kind, 2, 8, 3, 1, 1, 1, 1.0f});
    HostTensor logits({2, 8}, TM_DTYPE_BFLOAT16);
    // Token 0: all equal. Token 1: experts 5 and 2 tie for first, 1 and 6 for third.
    const double values[2][8] = {{0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5},
                                 {0, 1, 2, -1, 0, 2, 1, -2}};
    for (int t = 0; t < 2; ++t) {
      for (int e = 0; e < 8; ++e) logits.set(t * 8 + e, values[t][e]);
    }
    Outputs o = run_forward(p, logits, nullptr, TM_DTYPE_INT32);
    const int expected[2][3] = {{0, 1, 2}, {2, 5, 1}};
    for (int t = 0; t < 2; ++t) {
      for (int k = 0; k < 3; ++k) EXPECT_EQ(o.ids.get(t * 3 + k), expected[t][k]) << kind;
    }
    for (int k = 0; k < 3; ++k) EXPECT_NEAR(o.weights.get(k), o.weights.get(0), 1e-7);
  }
}

TEST(Routing, GroupLimitExcludesTheBestExpertOfALosingGroup) {
  // Group 0 holds the single best expert but group 1 has the better top-2 sum.
  const tm_routing_params p = params_of({TM_ROUTING_SIGMOID_GROUP_TOPK, 1, 8, 2, 1, 2, 1, 1.0f});
  HostTensor logits({1, 8}, TM_DTYPE_FLOAT32);
  const double values[8] = {5, -5, -5, -5, 2, 2.5, -5, 1};
  for (int e = 0; e < 8; ++e) logits.set(e, values[e]);
  Outputs o = run_forward(p, logits, nullptr, TM_DTYPE_INT64);
  EXPECT_EQ(o.ids.get(0), 5);
  EXPECT_EQ(o.ids.get(1), 4);
}

TEST(Routing, ZeroTokensIsANoOp) {
  const tm_routing_params p = params_of({TM_ROUTING_SOFTMAX_TOPK, 0, 4, 2, 1, 1, 1, 1.0f});
  HostTensor logits({0, 4}, TM_DTYPE_FLOAT32), w({0, 2}, TM_DTYPE_FLOAT32);
  HostTensor ids({0, 2}, TM_DTYPE_INT32), s({0, 4}, TM_DTYPE_FLOAT32);
  TM_ASSERT_OK(
      tm_routing_forward(&p, logits.desc(), nullptr, w.desc(), ids.desc(), s.desc(), nullptr));
  TM_ASSERT_OK(tm_routing_backward(&p, w.desc(), s.desc(), ids.desc(), logits.desc(), nullptr));
}

TEST(Routing, RejectsBadForwardArguments) {
  tm_routing_params p = params_of({TM_ROUTING_SOFTMAX_TOPK, 4, 6, 2, 1, 1, 1, 1.0f});
  HostTensor l({4, 6}, TM_DTYPE_FLOAT32), w({4, 2}, TM_DTYPE_FLOAT32), ids({4, 2}, TM_DTYPE_INT32);
  HostTensor s({4, 6}, TM_DTYPE_FLOAT32), bias({6}, TM_DTYPE_FLOAT32);
  HostTensor w_short({3, 2}, TM_DTYPE_FLOAT32), w_bf({4, 2}, TM_DTYPE_BFLOAT16);
  HostTensor ids_f({4, 2}, TM_DTYPE_FLOAT32), ids_k3({4, 3}, TM_DTYPE_INT32);
  HostTensor s_wrong({4, 5}, TM_DTYPE_FLOAT32), l_int({4, 6}, TM_DTYPE_INT32);
  HostTensor l_f16({4, 6}, TM_DTYPE_FLOAT16), l_rank3({4, 6, 1}, TM_DTYPE_FLOAT32);
  HostTensor bias_short({5}, TM_DTYPE_FLOAT32);
  auto fwd = [&](const tm_routing_params* pp, HostTensor* a, HostTensor* b, HostTensor* c,
                 HostTensor* d, HostTensor* e) {
    return tm_routing_forward(pp, a ? a->desc() : nullptr, b ? b->desc() : nullptr,
                              c ? c->desc() : nullptr, d ? d->desc() : nullptr,
                              e ? e->desc() : nullptr, nullptr);
  };
  TM_EXPECT_ERROR(fwd(nullptr, &l, nullptr, &w, &ids, &s), TM_ERR_INVALID_ARGUMENT, "params");
  TM_EXPECT_ERROR(fwd(&p, nullptr, nullptr, &w, &ids, &s), TM_ERR_INVALID_ARGUMENT, "logits");
  TM_EXPECT_ERROR(fwd(&p, &l, nullptr, nullptr, &ids, &s), TM_ERR_INVALID_ARGUMENT, "topk_weights");
  TM_EXPECT_ERROR(fwd(&p, &l, nullptr, &w, nullptr, &s), TM_ERR_INVALID_ARGUMENT, "topk_ids");
  TM_EXPECT_ERROR(fwd(&p, &l, nullptr, &w, &ids, nullptr), TM_ERR_INVALID_ARGUMENT, "scores");
  TM_EXPECT_ERROR(fwd(&p, &l_int, nullptr, &w, &ids, &s), TM_ERR_INVALID_ARGUMENT, "logits");
  TM_EXPECT_ERROR(fwd(&p, &l_f16, nullptr, &w, &ids, &s), TM_ERR_INVALID_ARGUMENT, "logits");
  TM_EXPECT_ERROR(fwd(&p, &l_rank3, nullptr, &w, &ids, &s), TM_ERR_INVALID_ARGUMENT, "logits");
  TM_EXPECT_ERROR(fwd(&p, &l, nullptr, &w_short, &ids, &s), TM_ERR_INVALID_ARGUMENT,
                  "topk_weights");
  TM_EXPECT_ERROR(fwd(&p, &l, nullptr, &w_bf, &ids, &s), TM_ERR_INVALID_ARGUMENT, "topk_weights");
  TM_EXPECT_ERROR(fwd(&p, &l, nullptr, &w, &ids_f, &s), TM_ERR_INVALID_ARGUMENT, "topk_ids");
  TM_EXPECT_ERROR(fwd(&p, &l, nullptr, &w, &ids_k3, &s), TM_ERR_INVALID_ARGUMENT, "topk_ids");
  TM_EXPECT_ERROR(fwd(&p, &l, nullptr, &w, &ids, &s_wrong), TM_ERR_INVALID_ARGUMENT, "scores");
  TM_EXPECT_ERROR(fwd(&p, &l, &bias, &w, &ids, &s), TM_ERR_INVALID_ARGUMENT, "correction_bias");
  tm_tensor on_cuda = *s.desc();
  on_cuda.device_type = TM_DEVICE_CUDA;
  TM_EXPECT_ERROR(
      tm_routing_forward(&p, l.desc(), nullptr, w.desc(), ids.desc(), &on_cuda, nullptr),
      TM_ERR_INVALID_ARGUMENT, "scores");

  tm_routing_params bad = p;
  bad.struct_size = 4;
  TM_EXPECT_ERROR(fwd(&bad, &l, nullptr, &w, &ids, &s), TM_ERR_INVALID_ARGUMENT, "struct_size");
  bad = p;
  bad.kind = 9;
  TM_EXPECT_ERROR(fwd(&bad, &l, nullptr, &w, &ids, &s), TM_ERR_INVALID_ARGUMENT, "params.kind");
  bad = p;
  bad.top_k = 0;
  TM_EXPECT_ERROR(fwd(&bad, &l, nullptr, &w, &ids, &s), TM_ERR_INVALID_ARGUMENT, "params.top_k");
  bad.top_k = 7;
  TM_EXPECT_ERROR(fwd(&bad, &l, nullptr, &w, &ids, &s), TM_ERR_INVALID_ARGUMENT, "params.top_k");
  bad = p;
  bad.renormalize = 2;
  TM_EXPECT_ERROR(fwd(&bad, &l, nullptr, &w, &ids, &s), TM_ERR_INVALID_ARGUMENT,
                  "params.renormalize");
  bad = p;
  bad.renorm_epsilon = -1.0f;
  TM_EXPECT_ERROR(fwd(&bad, &l, nullptr, &w, &ids, &s), TM_ERR_INVALID_ARGUMENT,
                  "params.renorm_epsilon");

  tm_routing_params sig = params_of({TM_ROUTING_SIGMOID_GROUP_TOPK, 4, 6, 2, 1, 3, 1, 1.0f});
  TM_ASSERT_OK(fwd(&sig, &l, &bias, &w, &ids, &s));
  TM_EXPECT_ERROR(fwd(&sig, &l, &bias_short, &w, &ids, &s), TM_ERR_INVALID_ARGUMENT,
                  "correction_bias");
  TM_EXPECT_ERROR(fwd(&sig, &l, &w, &w, &ids, &s), TM_ERR_INVALID_ARGUMENT, "correction_bias");
  bad = sig;
  bad.n_group = 4;
  TM_EXPECT_ERROR(fwd(&bad, &l, &bias, &w, &ids, &s), TM_ERR_INVALID_ARGUMENT, "params.n_group");
  bad.n_group = 0;
  TM_EXPECT_ERROR(fwd(&bad, &l, &bias, &w, &ids, &s), TM_ERR_INVALID_ARGUMENT, "params.n_group");
  bad = sig;
  bad.topk_group = 4;
  TM_EXPECT_ERROR(fwd(&bad, &l, &bias, &w, &ids, &s), TM_ERR_INVALID_ARGUMENT, "params.topk_group");
  bad = sig;
  bad.n_group = 6;  // one expert per group, one group kept: top-2 cannot be met
  TM_EXPECT_ERROR(fwd(&bad, &l, &bias, &w, &ids, &s), TM_ERR_INVALID_ARGUMENT, "params.top_k");
  bad = sig;
  bad.routed_scaling_factor = INFINITY;
  TM_EXPECT_ERROR(fwd(&bad, &l, &bias, &w, &ids, &s), TM_ERR_INVALID_ARGUMENT,
                  "params.routed_scaling_factor");
}

TEST(Routing, RejectsBadBackwardArguments) {
  const tm_routing_params p = params_of({TM_ROUTING_SOFTMAX_TOPK, 4, 6, 2, 1, 1, 1, 1.0f});
  HostTensor gw({4, 2}, TM_DTYPE_FLOAT32), s({4, 6}, TM_DTYPE_FLOAT32);
  HostTensor ids({4, 2}, TM_DTYPE_INT64), gl({4, 6}, TM_DTYPE_FLOAT32);
  HostTensor gl_wrong({4, 7}, TM_DTYPE_FLOAT32), gl_int({4, 6}, TM_DTYPE_INT32);
  HostTensor gw_bf({4, 2}, TM_DTYPE_BFLOAT16), s_bf({4, 6}, TM_DTYPE_BFLOAT16);
  HostTensor ids_short({3, 2}, TM_DTYPE_INT64);
  auto rng = turbomoe::testing::rng_for_test();
  s.fill_uniform(rng, 0, 1);
  TM_EXPECT_ERROR(tm_routing_backward(nullptr, gw.desc(), s.desc(), ids.desc(), gl.desc(), nullptr),
                  TM_ERR_INVALID_ARGUMENT, "params");
  TM_EXPECT_ERROR(tm_routing_backward(&p, nullptr, s.desc(), ids.desc(), gl.desc(), nullptr),
                  TM_ERR_INVALID_ARGUMENT, "grad_topk_weights");
  TM_EXPECT_ERROR(tm_routing_backward(&p, gw.desc(), nullptr, ids.desc(), gl.desc(), nullptr),
                  TM_ERR_INVALID_ARGUMENT, "scores");
  TM_EXPECT_ERROR(tm_routing_backward(&p, gw.desc(), s.desc(), nullptr, gl.desc(), nullptr),
                  TM_ERR_INVALID_ARGUMENT, "topk_ids");
  TM_EXPECT_ERROR(tm_routing_backward(&p, gw.desc(), s.desc(), ids.desc(), nullptr, nullptr),
                  TM_ERR_INVALID_ARGUMENT, "grad_logits");
  TM_EXPECT_ERROR(tm_routing_backward(&p, gw_bf.desc(), s.desc(), ids.desc(), gl.desc(), nullptr),
                  TM_ERR_INVALID_ARGUMENT, "grad_topk_weights");
  TM_EXPECT_ERROR(tm_routing_backward(&p, gw.desc(), s_bf.desc(), ids.desc(), gl.desc(), nullptr),
                  TM_ERR_INVALID_ARGUMENT, "scores");
  TM_EXPECT_ERROR(
      tm_routing_backward(&p, gw.desc(), s.desc(), ids_short.desc(), gl.desc(), nullptr),
      TM_ERR_INVALID_ARGUMENT, "topk_ids");
  TM_EXPECT_ERROR(
      tm_routing_backward(&p, gw.desc(), s.desc(), ids.desc(), gl_wrong.desc(), nullptr),
      TM_ERR_INVALID_ARGUMENT, "grad_logits");
  TM_EXPECT_ERROR(tm_routing_backward(&p, gw.desc(), s.desc(), ids.desc(), gl_int.desc(), nullptr),
                  TM_ERR_INVALID_ARGUMENT, "grad_logits");
  for (double bad_id : {-1.0, 6.0}) {
    for (int64_t i = 0; i < ids.numel(); ++i) ids.set(i, i % 6);
    ids.set(5, bad_id);
    gl.poison();
    TM_EXPECT_ERROR(tm_routing_backward(&p, gw.desc(), s.desc(), ids.desc(), gl.desc(), nullptr),
                    TM_ERR_INVALID_ARGUMENT, "topk_ids[2, 1]");
  }
}

}  // namespace
