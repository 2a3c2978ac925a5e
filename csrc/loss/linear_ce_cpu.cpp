// CPU fused linear cross-entropy: the logits exist one chunk of rows at a time, in the caller's
// workspace. Every sum runs in an order that does not depend on chunk_rows (k ascending for a
// logit, v ascending for a grad_hidden element, rows ascending for a grad_weight element), so
// the results are deterministic and bitwise identical for any chunking. The inner loops are
// axpys over contiguous float32 rows, which the compiler vectorises.
#include <algorithm>
#include <cmath>
#include <vector>

#include "common/numeric.h"
#include "loss/loss.h"

namespace turbomoe::loss {
namespace {

void read_row(const Arg& a, int64_t r, float* dst) {
  dispatch_floating(a.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T* p = a.ptr<const T>() + r * a.stride(0);
    for (int64_t i = 0; i < a.size(1); ++i) dst[i] = to_float(p[i]);
  });
}

void write_row(const float* src, const Arg& a, int64_t r) {
  dispatch_floating(a.dtype(), [&](auto tag) {
    using T = decltype(tag);
    T* p = a.ptr<T>() + r * a.stride(0);
    for (int64_t i = 0; i < a.size(1); ++i) p[i] = from_float<T>(src[i]);
  });
}

float& at(const Arg& a, int64_t i) { return a.ptr<float>()[i * a.stride(0)]; }

inline void axpy(int64_t n, float a, const float* __restrict x, float* __restrict y) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

// weight_t[k * V + v] = weight[v, k].
void transpose_weight(const Arg& weight, float* weight_t) {
  const int64_t vocab = weight.size(0), hidden = weight.size(1);
  std::vector<float> row(static_cast<size_t>(hidden));
  for (int64_t v = 0; v < vocab; ++v) {
    read_row(weight, v, row.data());
    for (int64_t k = 0; k < hidden; ++k) weight_t[k * vocab + v] = row[k];
  }
}

// The rows [start, start + rows) of hidden as float32, which of them count, and their logits
// (zero for ignored rows, which are never multiplied).
struct Chunk {
  int64_t start = 0, rows = 0;
  float* hidden = nullptr;  // [rows, H]
  float* logits = nullptr;  // [rows, V]
  std::vector<char> active;
};

void compute_chunk(const Arg& hidden, const Arg& labels, int64_t ignore_index,
                   const float* weight_t, int64_t vocab, Chunk& c) {
  const int64_t h = hidden.size(1);
  for (int64_t i = 0; i < c.rows; ++i) {
    c.active[i] = read_index(labels, c.start + i) != ignore_index;
    read_row(hidden, c.start + i, c.hidden + i * h);
    float* z = c.logits + i * vocab;
    std::fill(z, z + vocab, 0.0f);
    if (!c.active[i]) continue;
    const float* hi = c.hidden + i * h;
    for (int64_t k = 0; k < h; ++k) axpy(vocab, hi[k], weight_t + k * vocab, z);
  }
}

}  // namespace

void linear_ce_forward_cpu(const tm_linear_ce_params& p, const Arg& hidden, const Arg& weight,
                           const Arg& labels, const Arg& loss, const Arg& lse, float* workspace) {
  const int64_t n = hidden.size(0), vocab = weight.size(0);
  check_labels_cpu(labels, vocab, p.ignore_index);
  const auto ws = linear_ce_workspace(p.chunk_rows, n, hidden.size(1), vocab, false, false);
  float* weight_t = workspace + ws.weight_t;
  transpose_weight(weight, weight_t);
  Chunk c;
  c.hidden = workspace + ws.hidden;
  c.logits = workspace + ws.logits;
  c.active.resize(static_cast<size_t>(ws.chunk));
  for (c.start = 0; c.start < n; c.start += ws.chunk) {
    c.rows = std::min(ws.chunk, n - c.start);
    compute_chunk(hidden, labels, p.ignore_index, weight_t, vocab, c);
    for (int64_t i = 0; i < c.rows; ++i) {
      const int64_t r = c.start + i;
      if (!c.active[i]) {
        at(loss, r) = 0.0f;
        at(lse, r) = 0.0f;
        continue;
      }
      const float* z = c.logits + i * vocab;
      const float l = row_lse(z, vocab);
      at(lse, r) = l;
      at(loss, r) = l - z[read_index(labels, r)];
    }
  }
}

// dlogits = grad_loss * (softmax - onehot) from the recomputed chunk logits and the forward's
// lse; then grad_hidden[r] = sum_v dlogits[r, v] weight[v] and grad_weight[v] += dlogits[r, v]
// hidden[r].
void linear_ce_backward_cpu(const tm_linear_ce_params& p, const Arg& grad_loss, const Arg& hidden,
                            const Arg& weight, const Arg& labels, const Arg& lse,
                            const Arg& grad_hidden, const std::optional<Arg>& grad_weight,
                            float* workspace) {
  const int64_t n = hidden.size(0), h = hidden.size(1), vocab = weight.size(0);
  check_labels_cpu(labels, vocab, p.ignore_index);
  const std::vector<float> zeros(static_cast<size_t>(h), 0.0f);
  if (n == 0) {
    for (int64_t v = 0; grad_weight && v < vocab; ++v) write_row(zeros.data(), *grad_weight, v);
    return;
  }
  const bool weight_copy = weight.dtype() != TM_DTYPE_FLOAT32;
  const bool grad_weight_acc = grad_weight && grad_weight->dtype() != TM_DTYPE_FLOAT32;
  const auto ws = linear_ce_workspace(p.chunk_rows, n, h, vocab, weight_copy, grad_weight_acc);
  float* weight_t = workspace + ws.weight_t;
  transpose_weight(weight, weight_t);
  float* weight_f32 = workspace + ws.weight_f32;
  for (int64_t v = 0; weight_copy && v < vocab; ++v) read_row(weight, v, weight_f32 + v * h);
  auto weight_row = [&](int64_t v) {
    return weight_copy ? weight_f32 + v * h : weight.ptr<const float>() + v * weight.stride(0);
  };
  float* acc = workspace + ws.grad_weight_f32;
  auto grad_weight_row = [&](int64_t v) {
    return grad_weight_acc ? acc + v * h : grad_weight->ptr<float>() + v * grad_weight->stride(0);
  };
  for (int64_t v = 0; grad_weight && v < vocab; ++v) {
    std::fill(grad_weight_row(v), grad_weight_row(v) + h, 0.0f);
  }

  Chunk c;
  c.hidden = workspace + ws.hidden;
  c.logits = workspace + ws.logits;
  c.active.resize(static_cast<size_t>(ws.chunk));
  std::vector<float> gh(static_cast<size_t>(h));
  for (c.start = 0; c.start < n; c.start += ws.chunk) {
    c.rows = std::min(ws.chunk, n - c.start);
    compute_chunk(hidden, labels, p.ignore_index, weight_t, vocab, c);
    for (int64_t i = 0; i < c.rows; ++i) {
      const int64_t r = c.start + i;
      if (!c.active[i]) {
        write_row(zeros.data(), grad_hidden, r);
        continue;
      }
      float* d = c.logits + i * vocab;
      const float g = at(grad_loss, r), l = at(lse, r);
      const int64_t label = read_index(labels, r);
      for (int64_t v = 0; v < vocab; ++v) {
        d[v] = g * (std::exp(d[v] - l) - (v == label ? 1.0f : 0.0f));
      }
      std::fill(gh.begin(), gh.end(), 0.0f);
      const float* hi = c.hidden + i * h;
      for (int64_t v = 0; v < vocab; ++v) {
        axpy(h, d[v], weight_row(v), gh.data());
        if (grad_weight) axpy(h, d[v], hi, grad_weight_row(v));
      }
      write_row(gh.data(), grad_hidden, r);
    }
  }
  for (int64_t v = 0; grad_weight_acc && v < vocab; ++v) write_row(acc + v * h, *grad_weight, v);
}

}  // namespace turbomoe::loss
