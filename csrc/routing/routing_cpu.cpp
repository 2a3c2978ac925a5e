// CPU reference of the routers: one token at a time, float32 arithmetic in the order Hugging Face
// uses (softmax or sigmoid, optional group mask, top-k, renormalise, scale).
#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "common/numeric.h"
#include "routing/routing.h"
#include "routing/routing_math.h"

namespace turbomoe::routing {
namespace {

template <typename T>
T& at(const Arg& a, int64_t r, int64_t c) {
  return a.ptr<T>()[r * a.stride(0) + c * a.stride(1)];
}

// Writes the top `count` eligible entries of `keys` to `out`, best first.
void select_top(const std::vector<float>& keys, const std::vector<char>& eligible, int count,
                int* out) {
  const int n = static_cast<int>(keys.size());
  float prev_v = 0.0f;
  int prev_i = -1;
  for (int round = 0; round < count; ++round) {
    int best = -1;
    for (int i = 0; i < n; ++i) {
      if (!eligible[i]) continue;
      if (prev_i >= 0 && !ranks_before(prev_v, prev_i, keys[i], i)) continue;
      if (best < 0 || ranks_before(keys[i], i, keys[best], best)) best = i;
    }
    out[round] = best;
    prev_v = keys[best];
    prev_i = best;
  }
}

// DeepSeek-V3's group limit: a group's score is the sum of its two best choice values; experts
// outside the best topk_group groups are not eligible.
void mask_groups(const tm_routing_params& p, const std::vector<float>& keys,
                 std::vector<char>& eligible) {
  const int n = static_cast<int>(keys.size());
  const int size = n / p.n_group;
  std::vector<float> group_keys(static_cast<size_t>(p.n_group));
  for (int g = 0; g < p.n_group; ++g) {
    float best1 = -INFINITY, best2 = -INFINITY;
    for (int i = g * size; i < (g + 1) * size; ++i) {
      if (keys[i] > best1) {
        best2 = best1;
        best1 = keys[i];
      } else if (keys[i] > best2) {
        best2 = keys[i];
      }
    }
    group_keys[g] = selection_key(size >= 2 ? best1 + best2 : best1);
  }
  std::vector<int> kept(static_cast<size_t>(p.topk_group));
  select_top(group_keys, std::vector<char>(group_keys.size(), 1), p.topk_group, kept.data());
  std::fill(eligible.begin(), eligible.end(), 0);
  for (int g : kept) std::fill_n(eligible.begin() + g * size, size, 1);
}

template <typename In, typename Id>
void forward_typed(const tm_routing_params& p, const Arg& logits, const std::optional<Arg>& bias,
                   const Arg& weights, const Arg& ids, const Arg& scores) {
  const int64_t tokens = logits.size(0);
  const int n = static_cast<int>(logits.size(1));
  const int k = p.top_k;
  std::vector<float> x(n), keys(n);
  std::vector<char> eligible(n);
  std::vector<int> picked(k);
  std::vector<float> z(k);
  for (int64_t t = 0; t < tokens; ++t) {
    for (int e = 0; e < n; ++e) x[e] = to_float(at<const In>(logits, t, e));
    float row_max = -INFINITY, row_sum = 0.0f;
    if (p.kind == TM_ROUTING_SOFTMAX_TOPK) {
      for (int e = 0; e < n; ++e) row_max = std::fmax(row_max, x[e]);
      for (int e = 0; e < n; ++e) row_sum += std::exp(x[e] - row_max);
    }
    for (int e = 0; e < n; ++e) {
      float s = x[e];
      if (p.kind == TM_ROUTING_SOFTMAX_TOPK) s = std::exp(x[e] - row_max) / row_sum;
      if (p.kind == TM_ROUTING_SIGMOID_GROUP_TOPK) s = sigmoid(x[e]);
      at<float>(scores, t, e) = s;
      const float b = bias ? bias->ptr<const float>()[e * bias->stride(0)] : 0.0f;
      keys[e] = selection_key(choice_value(p.kind, x[e], s, b));
    }
    std::fill(eligible.begin(), eligible.end(), 1);
    if (p.kind == TM_ROUTING_SIGMOID_GROUP_TOPK && p.topk_group < p.n_group) {
      mask_groups(p, keys, eligible);
    }
    select_top(keys, eligible, k, picked.data());

    float zmax = -INFINITY, denom = 0.0f;
    for (int j = 0; j < k; ++j) {
      z[j] = at<float>(scores, t, picked[j]);
      zmax = std::fmax(zmax, z[j]);
    }
    for (int j = 0; j < k; ++j) {
      denom += p.kind == TM_ROUTING_TOPK_SOFTMAX ? std::exp(z[j] - zmax) : z[j];
    }
    if (p.kind != TM_ROUTING_TOPK_SOFTMAX) denom = renormalizes(p) ? denom + p.renorm_epsilon : 1;
    for (int j = 0; j < k; ++j) {
      at<float>(weights, t, j) = slot_weight(p, z[j], zmax, denom);
      at<Id>(ids, t, j) = static_cast<Id>(picked[j]);
    }
  }
}

template <typename Id, typename Out>
void backward_typed(const tm_routing_params& p, const Arg& grad_weights, const Arg& scores,
                    const Arg& ids, const Arg& grad_logits) {
  const int64_t tokens = scores.size(0);
  const int n = static_cast<int>(scores.size(1));
  const int k = p.top_k;
  std::vector<int> id(k);
  std::vector<float> z(k), g(k), w(k), gz(n);
  // Checked up front so that a bad id leaves grad_logits untouched.
  for (int64_t t = 0; t < tokens; ++t) {
    for (int j = 0; j < k; ++j) {
      const int64_t e = at<const Id>(ids, t, j);
      if (e < 0 || e >= n) {
        invalid("topk_ids[" + std::to_string(t) + ", " + std::to_string(j) + "] is " +
                std::to_string(e) + ", outside [0, " + std::to_string(n) + ")");
      }
    }
  }
  for (int64_t t = 0; t < tokens; ++t) {
    float zmax = -INFINITY, denom = 0.0f;
    for (int j = 0; j < k; ++j) {
      const int64_t e = at<const Id>(ids, t, j);
      id[j] = static_cast<int>(e);
      z[j] = at<const float>(scores, t, e);
      g[j] = at<const float>(grad_weights, t, j);
      zmax = std::fmax(zmax, z[j]);
    }
    for (int j = 0; j < k; ++j) {
      denom += p.kind == TM_ROUTING_TOPK_SOFTMAX ? std::exp(z[j] - zmax) : z[j];
    }
    if (p.kind != TM_ROUTING_TOPK_SOFTMAX) denom = renormalizes(p) ? denom + p.renorm_epsilon : 1;
    float dot = 0.0f;
    for (int j = 0; j < k; ++j) {
      w[j] = slot_weight(p, z[j], zmax, denom);
      dot += g[j] * w[j];
    }
    std::fill(gz.begin(), gz.end(), 0.0f);
    float centre = 0.0f;
    for (int j = 0; j < k; ++j) {
      const float d = slot_grad(p, g[j], w[j], dot, denom);
      gz[id[j]] += d;
      centre += d * z[j];
    }
    for (int e = 0; e < n; ++e) {
      const float s = at<const float>(scores, t, e);
      at<Out>(grad_logits, t, e) = from_float<Out>(logit_grad(p.kind, gz[e], s, centre));
    }
  }
}

}  // namespace

void forward_cpu(const tm_routing_params& p, const Arg& logits, const std::optional<Arg>& bias,
                 const Arg& weights, const Arg& ids, const Arg& scores) {
  dispatch_floating(logits.dtype(), [&](auto in_tag) {
    dispatch_index(ids.dtype(), [&](auto id_tag) {
      forward_typed<decltype(in_tag), decltype(id_tag)>(p, logits, bias, weights, ids, scores);
    });
  });
}

void backward_cpu(const tm_routing_params& p, const Arg& grad_weights, const Arg& scores,
                  const Arg& ids, const Arg& grad_logits) {
  dispatch_index(ids.dtype(), [&](auto id_tag) {
    dispatch_floating(grad_logits.dtype(), [&](auto out_tag) {
      backward_typed<decltype(id_tag), decltype(out_tag)>(p, grad_weights, scores, ids,
                                                          grad_logits);
    });
  });
}

}  // namespace turbomoe::routing
