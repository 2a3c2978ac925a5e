// CPU reference of cross-entropy: each row is converted to float32 once, reduced with a max
// pass and an exp-sum pass (numerically stable), and, in the backward, fully read before it is
// written, so that grad_logits may alias logits.
#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "common/numeric.h"
#include "loss/loss.h"

namespace turbomoe::loss {
namespace {

void read_row(const Arg& a, int64_t r, std::vector<float>& dst) {
  dispatch_floating(a.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T* p = a.ptr<const T>() + r * a.stride(0);
    for (size_t i = 0; i < dst.size(); ++i) dst[i] = to_float(p[i]);
  });
}

void write_row(const std::vector<float>& src, const Arg& a, int64_t r) {
  dispatch_floating(a.dtype(), [&](auto tag) {
    using T = decltype(tag);
    T* p = a.ptr<T>() + r * a.stride(0);
    for (size_t i = 0; i < src.size(); ++i) p[i] = from_float<T>(src[i]);
  });
}

float& at(const Arg& a, int64_t i) { return a.ptr<float>()[i * a.stride(0)]; }

}  // namespace

void check_labels_cpu(const Arg& labels, int64_t vocab, int64_t ignore_index) {
  for (int64_t i = 0; i < labels.size(0); ++i) {
    const int64_t label = read_index(labels, i);
    if (label != ignore_index && (label < 0 || label >= vocab)) {
      invalid("labels[" + std::to_string(i) + "] is " + std::to_string(label) + ", outside [0, " +
              std::to_string(vocab) + ") and not ignore_index (" + std::to_string(ignore_index) +
              ")");
    }
  }
}

float row_lse(const float* z, int64_t vocab) {
  float m = -INFINITY;
  for (int64_t v = 0; v < vocab; ++v) m = std::max(m, z[v]);
  if (m == -INFINITY) return m;  // every class impossible: avoid -inf - -inf
  float s = 0.0f;
  for (int64_t v = 0; v < vocab; ++v) s += std::exp(z[v] - m);
  return m + std::log(s);
}

void ce_forward_cpu(const Arg& logits, const Arg& labels, int64_t ignore_index, const Arg& loss,
                    const Arg& lse) {
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  check_labels_cpu(labels, vocab, ignore_index);
  std::vector<float> z(static_cast<size_t>(vocab));
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t label = read_index(labels, r);
    if (label == ignore_index) {
      at(loss, r) = 0.0f;
      at(lse, r) = 0.0f;
      continue;
    }
    read_row(logits, r, z);
    const float l = row_lse(z.data(), vocab);
    at(lse, r) = l;
    at(loss, r) = l - z[static_cast<size_t>(label)];
  }
}

void ce_backward_cpu(const Arg& grad_loss, const Arg& logits, const Arg& labels, const Arg& lse,
                     int64_t ignore_index, const Arg& grad_logits) {
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  check_labels_cpu(labels, vocab, ignore_index);
  std::vector<float> z(static_cast<size_t>(vocab));
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t label = read_index(labels, r);
    if (label == ignore_index) {
      std::fill(z.begin(), z.end(), 0.0f);
    } else {
      read_row(logits, r, z);
      const float g = at(grad_loss, r), l = at(lse, r);
      for (int64_t v = 0; v < vocab; ++v) {
        z[v] = g * (std::exp(z[v] - l) - (v == label ? 1.0f : 0.0f));
      }
    }
    write_row(z, grad_logits, r);
  }
}

}  // namespace turbomoe::loss
