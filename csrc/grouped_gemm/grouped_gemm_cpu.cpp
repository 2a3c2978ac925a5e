// CPU reference of the grouped GEMM. Each expert's weight is first converted to a dense float
// matrix laid out so that the innermost loop runs over contiguous floats (a vectorisable
// multiply-add into a row accumulator), whatever the strides of w.
#include <algorithm>
#include <vector>

#include "activation/activation.h"
#include "common/numeric.h"
#include "grouped_gemm/grouped_gemm.h"

namespace turbomoe::grouped_gemm {
namespace {

// Row r's token, pairs[r] / top_k, or -1 for a token past the `tokens` rows of the source.
struct TokenOfRow {
  const int32_t* pairs;
  int64_t top_k;
  int64_t tokens;
  int64_t operator()(int64_t r) const {
    const int64_t token = pairs[r] / top_k;  // pairs[r] >= 0: validated by the caller
    return token < tokens ? token : -1;
  }
};

int64_t same_row(int64_t r) { return r; }

// Reads row r of a rows-contiguous [M, cols] matrix into floats.
template <typename T>
void read_row(const Arg& a, int64_t r, float* out) {
  const T* p = a.ptr<const T>() + r * a.stride(0);
  for (int64_t c = 0; c < a.size(1); ++c) out[c] = to_float(p[c]);
}

template <typename T>
void write_row(const Arg& a, int64_t r, const float* in) {
  T* p = a.ptr<T>() + r * a.stride(0);
  for (int64_t c = 0; c < a.size(1); ++c) p[c] = from_float<T>(in[c]);
}

template <typename T>
void zero_rows_from(const Arg& a, int64_t first) {
  const std::vector<float> zeros(static_cast<size_t>(a.size(1)), 0.0f);
  for (int64_t r = first; r < a.size(0); ++r) write_row<T>(a, r, zeros.data());
}

// w[e] as floats, [N][K] (transpose = false) or [K][N] (transpose = true), from any strides.
template <typename T>
void expert_weight(const Arg& w, int64_t e, bool transpose, std::vector<float>& out) {
  const int64_t n = w.size(1), k = w.size(2);
  out.resize(static_cast<size_t>(n * k));
  const T* base = w.ptr<const T>() + e * w.stride(0);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < k; ++j) {
      const float v = to_float(base[i * w.stride(1) + j * w.stride(2)]);
      out[transpose ? j * n + i : i * k + j] = v;
    }
  }
}

// out_row[c] = sum_i in_row[i] * mat[i][c] for each row r in [begin, end): row source_row(r) of
// `in` (or zeros where that is negative) times a dense [inner][cols] float matrix.
template <typename In, typename Out, typename SourceRow>
void rows_times(const Arg& in, const std::vector<float>& mat, int64_t begin, int64_t end,
                const Arg& out, SourceRow&& source_row) {
  const int64_t inner = in.size(1), cols = out.size(1);
  std::vector<float> a(static_cast<size_t>(inner)), acc(static_cast<size_t>(cols));
  for (int64_t r = begin; r < end; ++r) {
    const int64_t src = source_row(r);
    if (src >= 0) {
      read_row<In>(in, src, a.data());
    } else {
      std::fill(a.begin(), a.end(), 0.0f);
    }
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int64_t i = 0; i < inner; ++i) {
      const float av = a[i];
      const float* m = mat.data() + i * cols;
      for (int64_t c = 0; c < cols; ++c) acc[c] += av * m[c];
    }
    write_row<Out>(out, r, acc.data());
  }
}

template <typename In, typename Out>
void rows_times(const Arg& in, const std::vector<float>& mat, int64_t begin, int64_t end,
                const Arg& out) {
  rows_times<In, Out>(in, mat, begin, end, out, same_row);
}

template <typename Fn>
void dispatch_in_out(int32_t in_dtype, int32_t out_dtype, Fn&& fn) {
  dispatch_floating(in_dtype, [&](auto in_tag) {
    dispatch_floating(out_dtype, [&](auto out_tag) { fn(in_tag, out_tag); });
  });
}

}  // namespace

void forward_cpu(const Arg& x, const Arg& w, const Arg& offsets, const Arg& y) {
  const int32_t* off = offsets.ptr<const int32_t>();
  const int64_t experts = w.size(0);
  dispatch_in_out(x.dtype(), y.dtype(), [&](auto in_tag, auto out_tag) {
    using In = decltype(in_tag);
    using Out = decltype(out_tag);
    std::vector<float> wt;
    for (int64_t e = 0; e < experts; ++e) {
      if (off[e + 1] == off[e]) continue;
      expert_weight<In>(w, e, /*transpose=*/true, wt);  // [K][N]
      rows_times<In, Out>(x, wt, off[e], off[e + 1], y);
    }
    zero_rows_from<Out>(y, off[experts]);
  });
}

void forward_gathered_cpu(const Arg& src, const Arg& sorted_pairs, int64_t top_k, const Arg& w,
                          const Arg& offsets, const Arg& y) {
  const int32_t* off = offsets.ptr<const int32_t>();
  const int64_t experts = w.size(0);
  const TokenOfRow token_of{sorted_pairs.ptr<const int32_t>(), top_k, src.size(0)};
  dispatch_in_out(src.dtype(), y.dtype(), [&](auto in_tag, auto out_tag) {
    using In = decltype(in_tag);
    using Out = decltype(out_tag);
    std::vector<float> wt;
    for (int64_t e = 0; e < experts; ++e) {
      if (off[e + 1] == off[e]) continue;
      expert_weight<In>(w, e, /*transpose=*/true, wt);  // [K][N]
      rows_times<In, Out>(src, wt, off[e], off[e + 1], y, token_of);
    }
    zero_rows_from<Out>(y, off[experts]);
  });
}

namespace {

// dx's row r from dy's row source_row(r) (negative: zeros).
template <typename SourceRow>
void backward_input_rows(const Arg& dy, const Arg& w, const Arg& offsets, const Arg& dx,
                         SourceRow&& source_row) {
  const int32_t* off = offsets.ptr<const int32_t>();
  const int64_t experts = w.size(0);
  dispatch_in_out(dy.dtype(), dx.dtype(), [&](auto in_tag, auto out_tag) {
    using In = decltype(in_tag);
    using Out = decltype(out_tag);
    std::vector<float> wf;
    for (int64_t e = 0; e < experts; ++e) {
      if (off[e + 1] == off[e]) continue;
      expert_weight<In>(w, e, /*transpose=*/false, wf);  // [N][K]
      rows_times<In, Out>(dy, wf, off[e], off[e + 1], dx, source_row);
    }
    zero_rows_from<Out>(dx, off[experts]);
  });
}

}  // namespace

void backward_input_cpu(const Arg& dy, const Arg& w, const Arg& offsets, const Arg& dx) {
  backward_input_rows(dy, w, offsets, dx, same_row);
}

void backward_input_gathered_cpu(const Arg& dy_src, const Arg& sorted_pairs, int64_t top_k,
                                 const Arg& w, const Arg& offsets, const Arg& dx) {
  backward_input_rows(dy_src, w, offsets, dx,
                      TokenOfRow{sorted_pairs.ptr<const int32_t>(), top_k, dy_src.size(0)});
}

namespace {

// dw of the rows whose dy row is dy_row(r) and x row is x_row(r) (negative: zeros).
template <typename DyRow, typename XRow>
void backward_weight_rows(const Arg& dy, const Arg& x, const Arg& offsets, const Arg& dw,
                          DyRow&& dy_row, XRow&& x_row) {
  const int32_t* off = offsets.ptr<const int32_t>();
  const int64_t experts = dw.size(0), n = dw.size(1), k = dw.size(2);
  dispatch_in_out(x.dtype(), dw.dtype(), [&](auto in_tag, auto out_tag) {
    using In = decltype(in_tag);
    using Out = decltype(out_tag);
    std::vector<float> acc(static_cast<size_t>(n * k)), xr(static_cast<size_t>(k));
    std::vector<float> g(static_cast<size_t>(n));
    for (int64_t e = 0; e < experts; ++e) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t r = off[e]; r < off[e + 1]; ++r) {
        const int64_t src = x_row(r);
        if (src >= 0) {
          read_row<In>(x, src, xr.data());
        } else {
          std::fill(xr.begin(), xr.end(), 0.0f);
        }
        const int64_t dy_src = dy_row(r);
        if (dy_src >= 0) {
          read_row<In>(dy, dy_src, g.data());
        } else {
          std::fill(g.begin(), g.end(), 0.0f);
        }
        for (int64_t i = 0; i < n; ++i) {
          const float gv = g[i];
          float* a = acc.data() + i * k;
          for (int64_t j = 0; j < k; ++j) a[j] += gv * xr[j];
        }
      }
      Out* base = dw.ptr<Out>() + e * dw.stride(0);
      for (int64_t i = 0; i < n; ++i) {
        for (int64_t j = 0; j < k; ++j) {
          base[i * dw.stride(1) + j * dw.stride(2)] = from_float<Out>(acc[i * k + j]);
        }
      }
    }
  });
}

}  // namespace

void backward_weight_cpu(const Arg& dy, const Arg& x, const Arg& offsets, const Arg& dw) {
  backward_weight_rows(dy, x, offsets, dw, same_row, same_row);
}

void backward_weight_gathered_cpu(const Arg& dy, const Arg& src, const Arg& sorted_pairs,
                                  int64_t top_k, const Arg& offsets, const Arg& dw) {
  backward_weight_rows(dy, src, offsets, dw, same_row,
                       TokenOfRow{sorted_pairs.ptr<const int32_t>(), top_k, src.size(0)});
}

void backward_weight_gathered_dy_cpu(const Arg& dy_src, const Arg& x, const Arg& sorted_pairs,
                                     int64_t top_k, const Arg& offsets, const Arg& dw) {
  backward_weight_rows(dy_src, x, offsets, dw,
                       TokenOfRow{sorted_pairs.ptr<const int32_t>(), top_k, dy_src.size(0)},
                       same_row);
}

tm_tensor column_block(const tm_tensor& t, int64_t col0, int64_t cols) {
  tm_tensor block = t;
  block.sizes[1] = cols;
  if (t.data != nullptr) {
    block.data = static_cast<char*>(t.data) +
                 col0 * t.strides[1] * static_cast<int64_t>(dtype_size(t.dtype));
  }
  return block;
}

void swiglu_forward_cpu(const tm_swiglu_params& p, const Arg& x, const Arg& w, const Arg& offsets,
                        const Arg& gate_up, const Arg& act) {
  forward_cpu(x, w, offsets, gate_up);
  const int64_t inter = act.size(1);
  const tm_tensor gate = column_block(gate_up.t(), 0, inter);
  const tm_tensor up = column_block(gate_up.t(), inter, inter);
  activation::swiglu_forward_cpu(p, Arg(&gate, "gate"), Arg(&up, "up"), act);
}

}  // namespace turbomoe::grouped_gemm
