// RoPE against a double-precision transcription of Hugging Face's rotate_half form and of
// DeepSeek-V3's apply_rotary_pos_emb_interleave, on strided views with R < D and broadcast
// cos/sin; backward against finite differences; in-place; and every argument error.
#include <cmath>
#include <vector>

#include "common/test_util.h"

namespace {

using turbomoe::testing::HostTensor;
using turbomoe::testing::rel_error;

tm_rope_params params(int interleaved) {
  tm_rope_params p{};
  p.struct_size = sizeof p;
  p.interleaved = interleaved;
  return p;
}

// A [B,NH,S,D] view of a HostTensor's storage with the given element strides.
struct View {
  HostTensor* storage;
  std::vector<int64_t> sizes, strides;

  tm_tensor desc() const {
    tm_tensor d = *storage->desc();
    d.ndim = static_cast<int32_t>(sizes.size());
    for (size_t i = 0; i < sizes.size(); ++i) {
      d.sizes[i] = sizes[i];
      d.strides[i] = strides[i];
    }
    return d;
  }
  int64_t offset(const std::vector<int64_t>& idx) const {
    int64_t o = 0;
    for (size_t i = 0; i < idx.size(); ++i) o += idx[i] * strides[i];
    return o;
  }
  double get(const std::vector<int64_t>& idx) const { return storage->get(offset(idx)); }
};

View dense(HostTensor& t) {
  View v{&t, t.sizes(), std::vector<int64_t>(t.sizes().size())};
  int64_t s = 1;
  for (size_t i = v.sizes.size(); i-- > 0;) {
    v.strides[i] = s;
    s *= v.sizes[i];
  }
  return v;
}

// [B,NH,S,D] seen through a [B,S,NH,D] buffer: how HF's q looks after transpose(1, 2).
View transposed_heads(HostTensor& bsnd) {
  const auto& s = bsnd.sizes();
  return View{&bsnd, {s[0], s[2], s[1], s[3]}, {s[1] * s[2] * s[3], s[3], s[2] * s[3], 1}};
}

// One head, transcribed from transformers 5.17: apply_rotary_pos_emb (rotate_half) on the first
// R dims with the rest passed through, or DeepSeek-V3's apply_rotary_pos_emb_interleave.
std::vector<double> ref_head(const std::vector<double>& x, const std::vector<double>& cos,
                             const std::vector<double>& sin, bool interleaved) {
  const size_t rot = cos.size(), half = rot / 2;
  std::vector<double> out = x;
  if (interleaved) {
    for (size_t j = 0; j < half; ++j) {  // cos = cos[..., :R/2]; x1 = x[0::2]; x2 = x[1::2]
      const double x1 = x[2 * j], x2 = x[2 * j + 1];
      out[j] = x1 * cos[j] - x2 * sin[j];
      out[j + half] = x2 * cos[j] + x1 * sin[j];
    }
    return out;
  }
  for (size_t i = 0; i < rot; ++i) {  // x * cos + rotate_half(x) * sin
    const double rotated = i < half ? -x[i + half] : x[i - half];
    out[i] = x[i] * cos[i] + rotated * sin[i];
  }
  return out;
}

struct Problem {
  int64_t batch, heads, seq, dim, rot;
  bool broadcast;  // cos/sin batch 1
};

// Inputs of one problem: x (seen transposed), cos, sin.
struct Inputs {
  HostTensor x_bsnd, cos, sin;
  View x;
  Inputs(const Problem& p, int32_t dtype, std::mt19937_64& rng)
      : x_bsnd({p.batch, p.seq, p.heads, p.dim}, dtype),
        cos({p.broadcast ? 1 : p.batch, p.seq, p.rot}, dtype),
        sin({p.broadcast ? 1 : p.batch, p.seq, p.rot}, dtype),
        x(transposed_heads(x_bsnd)) {
    x_bsnd.fill_uniform(rng, -2, 2);
    // Arbitrary values, so that nothing relies on the two halves of cos/sin being equal.
    cos.fill_uniform(rng);
    sin.fill_uniform(rng);
  }

  std::vector<double> cs_row(const HostTensor& t, const Problem& p, int64_t b, int64_t s) const {
    std::vector<double> v(static_cast<size_t>(p.rot));
    const int64_t cb = p.broadcast ? 0 : b;
    for (int64_t r = 0; r < p.rot; ++r) v[r] = t.get((cb * p.seq + s) * p.rot + r);
    return v;
  }
};

// Applies f(b, h, s, head values) to every head of a [B,NH,S,D] view, concatenating the results.
template <typename F>
std::vector<double> per_head(const Problem& p, const View& v, F&& f) {
  std::vector<double> all;
  for (int64_t b = 0; b < p.batch; ++b) {
    for (int64_t h = 0; h < p.heads; ++h) {
      for (int64_t s = 0; s < p.seq; ++s) {
        std::vector<double> head(static_cast<size_t>(p.dim));
        for (int64_t d = 0; d < p.dim; ++d) head[d] = v.get({b, h, s, d});
        const std::vector<double> r = f(b, s, head);
        all.insert(all.end(), r.begin(), r.end());
      }
    }
  }
  return all;
}

const Problem kProblems[] = {
    {2, 3, 5, 16, 16, false},  // full rotation
    {2, 3, 5, 16, 10, false},  // R < D, R/2 odd
    {3, 2, 7, 72, 64, true},   // cos/sin broadcast over the batch
    {1, 1, 1, 2, 2, true},
};

class RopeTest : public ::testing::TestWithParam<std::tuple<int, int32_t>> {};

TEST_P(RopeTest, ForwardMatchesHuggingFace) {
  const auto [interleaved, dtype] = GetParam();
  auto rng = turbomoe::testing::rng_for_test();
  const tm_rope_params prm = params(interleaved);
  for (const Problem& p : kProblems) {
    Inputs in(p, dtype, rng);
    HostTensor out({p.batch, p.heads, p.seq, p.dim}, dtype);
    out.poison();
    const tm_tensor xd = in.x.desc();
    TM_ASSERT_OK(tm_rope_forward(&prm, &xd, in.cos.desc(), in.sin.desc(), out.desc(), nullptr));
    const auto want = per_head(p, in.x, [&](int64_t b, int64_t s, const std::vector<double>& x) {
      return ref_head(x, in.cs_row(in.cos, p, b, s), in.cs_row(in.sin, p, b, s), interleaved);
    });
    EXPECT_LT(rel_error(out.values(), want), dtype == TM_DTYPE_FLOAT32 ? 1e-6 : 1e-2)
        << "D=" << p.dim << " R=" << p.rot;
  }
}

// With L = <grad_out, rope(x)>, grad_x is dL/dx: checked by central differences of the double
// reference, one element of x at a time.
TEST_P(RopeTest, BackwardMatchesFiniteDifferences) {
  const auto [interleaved, dtype] = GetParam();
  auto rng = turbomoe::testing::rng_for_test();
  const tm_rope_params prm = params(interleaved);
  for (const Problem& p : {kProblems[1], kProblems[2]}) {
    Inputs in(p, dtype, rng);
    HostTensor grad_out({p.batch, p.heads, p.seq, p.dim}, dtype);
    HostTensor grad_x_bsnd({p.batch, p.seq, p.heads, p.dim}, dtype);
    grad_out.fill_uniform(rng);
    grad_x_bsnd.poison();
    const View grad_x = transposed_heads(grad_x_bsnd);
    tm_tensor gxd = grad_x.desc();
    TM_ASSERT_OK(
        tm_rope_backward(&prm, grad_out.desc(), in.cos.desc(), in.sin.desc(), &gxd, nullptr));
    const View go = dense(grad_out);
    std::vector<double> want;
    const double h = 1e-3;  // exact for a linear function up to rounding
    for (int64_t b = 0; b < p.batch; ++b) {
      for (int64_t hd = 0; hd < p.heads; ++hd) {
        for (int64_t s = 0; s < p.seq; ++s) {
          const auto c = in.cs_row(in.cos, p, b, s), sn = in.cs_row(in.sin, p, b, s);
          std::vector<double> x(p.dim), g(p.dim);
          for (int64_t d = 0; d < p.dim; ++d) {
            x[d] = in.x.get({b, hd, s, d});
            g[d] = go.get({b, hd, s, d});
          }
          auto loss = [&] {
            const auto y = ref_head(x, c, sn, interleaved);
            double l = 0;
            for (int64_t d = 0; d < p.dim; ++d) l += g[d] * y[d];
            return l;
          };
          for (int64_t d = 0; d < p.dim; ++d) {
            const double keep = x[d];
            x[d] = keep + h;
            const double up = loss();
            x[d] = keep - h;
            const double down = loss();
            x[d] = keep;
            want.push_back((up - down) / (2 * h));
          }
        }
      }
    }
    const auto got =
        per_head(p, grad_x, [](int64_t, int64_t, const std::vector<double>& v) { return v; });
    EXPECT_LT(rel_error(got, want), dtype == TM_DTYPE_FLOAT32 ? 1e-4 : 1e-2)
        << "D=" << p.dim << " R=" << p.rot;
  }
}

INSTANTIATE_TEST_SUITE_P(Rope, RopeTest,
                         ::testing::Combine(::testing::Values(0, 1),
                                            ::testing::Values(TM_DTYPE_FLOAT32,
                                                              TM_DTYPE_BFLOAT16)));

TEST(Rope, MixedDtypesAndDeterminism) {
  auto rng = turbomoe::testing::rng_for_test();
  const Problem p = kProblems[1];
  const tm_rope_params prm = params(0);
  Inputs in(p, TM_DTYPE_BFLOAT16, rng);
  HostTensor cos32({p.batch, p.seq, p.rot}, TM_DTYPE_FLOAT32);
  HostTensor sin32({p.batch, p.seq, p.rot}, TM_DTYPE_FLOAT32);
  for (int64_t i = 0; i < cos32.numel(); ++i) {
    cos32.set(i, in.cos.get(i));
    sin32.set(i, in.sin.get(i));
  }
  const tm_tensor xd = in.x.desc();
  std::vector<double> first;
  for (int run = 0; run < 2; ++run) {
    HostTensor out({p.batch, p.heads, p.seq, p.dim}, TM_DTYPE_FLOAT32);
    out.poison();
    TM_ASSERT_OK(tm_rope_forward(&prm, &xd, cos32.desc(), sin32.desc(), out.desc(), nullptr));
    if (run == 1) {
      EXPECT_EQ(out.values(), first);
      continue;
    }
    first = out.values();
    const auto want = per_head(p, in.x, [&](int64_t b, int64_t s, const std::vector<double>& x) {
      return ref_head(x, in.cs_row(in.cos, p, b, s), in.cs_row(in.sin, p, b, s), false);
    });
    EXPECT_LT(rel_error(first, want), 1e-6);  // bf16 inputs, float32 math and output
  }
}

TEST(Rope, InPlaceWhenNotInterleaved) {
  auto rng = turbomoe::testing::rng_for_test();
  const Problem p = kProblems[1];
  const tm_rope_params prm = params(0);
  Inputs in(p, TM_DTYPE_FLOAT32, rng);
  const auto want = per_head(p, in.x, [&](int64_t b, int64_t s, const std::vector<double>& x) {
    return ref_head(x, in.cs_row(in.cos, p, b, s), in.cs_row(in.sin, p, b, s), false);
  });
  tm_tensor xd = in.x.desc();
  TM_ASSERT_OK(tm_rope_forward(&prm, &xd, in.cos.desc(), in.sin.desc(), &xd, nullptr));
  const auto got =
      per_head(p, in.x, [](int64_t, int64_t, const std::vector<double>& v) { return v; });
  EXPECT_LT(rel_error(got, want), 1e-6);
}

TEST(Rope, EmptyIsANoOp) {
  const tm_rope_params prm = params(1);
  HostTensor x({0, 2, 3, 8}, TM_DTYPE_FLOAT32), out({0, 2, 3, 8}, TM_DTYPE_FLOAT32);
  HostTensor cos({1, 3, 8}, TM_DTYPE_FLOAT32), sin({1, 3, 8}, TM_DTYPE_FLOAT32);
  TM_ASSERT_OK(tm_rope_forward(&prm, x.desc(), cos.desc(), sin.desc(), out.desc(), nullptr));
  TM_ASSERT_OK(tm_rope_backward(&prm, x.desc(), cos.desc(), sin.desc(), out.desc(), nullptr));
}

TEST(Rope, RejectsBadArguments) {
  tm_rope_params prm = params(0);
  HostTensor x({2, 3, 5, 8}, TM_DTYPE_FLOAT32), out({2, 3, 5, 8}, TM_DTYPE_FLOAT32);
  HostTensor cos({2, 5, 8}, TM_DTYPE_FLOAT32), sin({2, 5, 8}, TM_DTYPE_FLOAT32);
  HostTensor cos_bf16({2, 5, 8}, TM_DTYPE_BFLOAT16), sin_short({2, 5, 6}, TM_DTYPE_FLOAT32);
  HostTensor cos_b3({3, 5, 8}, TM_DTYPE_FLOAT32), cos_s4({2, 4, 8}, TM_DTYPE_FLOAT32);
  HostTensor cos_odd({2, 5, 7}, TM_DTYPE_FLOAT32), cos_wide({2, 5, 10}, TM_DTYPE_FLOAT32);
  HostTensor out_short({2, 3, 5, 7}, TM_DTYPE_FLOAT32), out_f16({2, 3, 5, 8}, TM_DTYPE_FLOAT16);
  HostTensor x3({2, 5, 8}, TM_DTYPE_FLOAT32), ints({2, 5, 8}, TM_DTYPE_INT32);
  auto fwd = [&](const tm_tensor* a, const tm_tensor* c, const tm_tensor* s, tm_tensor* o) {
    return tm_rope_forward(&prm, a, c, s, o, nullptr);
  };
  TM_EXPECT_ERROR(tm_rope_forward(nullptr, x.desc(), cos.desc(), sin.desc(), out.desc(), nullptr),
                  TM_ERR_INVALID_ARGUMENT, "params is NULL");
  TM_EXPECT_ERROR(fwd(nullptr, cos.desc(), sin.desc(), out.desc()), TM_ERR_INVALID_ARGUMENT,
                  "x is NULL");
  TM_EXPECT_ERROR(fwd(x.desc(), nullptr, sin.desc(), out.desc()), TM_ERR_INVALID_ARGUMENT,
                  "cos is NULL");
  TM_EXPECT_ERROR(fwd(x.desc(), cos.desc(), nullptr, out.desc()), TM_ERR_INVALID_ARGUMENT,
                  "sin is NULL");
  TM_EXPECT_ERROR(fwd(x.desc(), cos.desc(), sin.desc(), nullptr), TM_ERR_INVALID_ARGUMENT,
                  "out is NULL");
  TM_EXPECT_ERROR(fwd(x3.desc(), cos.desc(), sin.desc(), out.desc()), TM_ERR_INVALID_ARGUMENT,
                  "x must have rank 4");
  TM_EXPECT_ERROR(fwd(x.desc(), ints.desc(), sin.desc(), out.desc()), TM_ERR_INVALID_ARGUMENT,
                  "cos has dtype int32");
  TM_EXPECT_ERROR(fwd(x.desc(), cos_bf16.desc(), sin.desc(), out.desc()), TM_ERR_INVALID_ARGUMENT,
                  "sin has dtype float32 but cos has bfloat16");
  TM_EXPECT_ERROR(fwd(x.desc(), cos.desc(), sin_short.desc(), out.desc()), TM_ERR_INVALID_ARGUMENT,
                  "sin has shape");
  TM_EXPECT_ERROR(fwd(x.desc(), cos_b3.desc(), cos_b3.desc(), out.desc()), TM_ERR_INVALID_ARGUMENT,
                  "(the batch of x) or 1");
  TM_EXPECT_ERROR(fwd(x.desc(), cos_s4.desc(), cos_s4.desc(), out.desc()), TM_ERR_INVALID_ARGUMENT,
                  "the sequence length, dim 2, of x");
  TM_EXPECT_ERROR(fwd(x.desc(), cos_odd.desc(), cos_odd.desc(), out.desc()),
                  TM_ERR_INVALID_ARGUMENT, "must be even");
  TM_EXPECT_ERROR(fwd(x.desc(), cos_wide.desc(), cos_wide.desc(), out.desc()),
                  TM_ERR_INVALID_ARGUMENT, "must be <= 8, the head dim of x");
  TM_EXPECT_ERROR(fwd(x.desc(), cos.desc(), sin.desc(), out_short.desc()), TM_ERR_INVALID_ARGUMENT,
                  "out has shape");
  TM_EXPECT_ERROR(fwd(x.desc(), cos.desc(), sin.desc(), out_f16.desc()), TM_ERR_INVALID_ARGUMENT,
                  "out has dtype float16");
  tm_tensor cos_cuda = *cos.desc();
  cos_cuda.device_type = TM_DEVICE_CUDA;
  TM_EXPECT_ERROR(fwd(x.desc(), &cos_cuda, &cos_cuda, out.desc()), TM_ERR_INVALID_ARGUMENT,
                  "all tensors must share one device");
  prm.interleaved = 1;
  TM_EXPECT_ERROR(fwd(x.desc(), cos.desc(), sin.desc(), x.desc()), TM_ERR_INVALID_ARGUMENT,
                  "out aliases x");
  prm.interleaved = 2;
  TM_EXPECT_ERROR(fwd(x.desc(), cos.desc(), sin.desc(), out.desc()), TM_ERR_INVALID_ARGUMENT,
                  "params.interleaved");
  prm = params(0);
  prm.struct_size = 4;
  TM_EXPECT_ERROR(fwd(x.desc(), cos.desc(), sin.desc(), out.desc()), TM_ERR_INVALID_ARGUMENT,
                  "params.struct_size");
  prm = params(0);
  TM_EXPECT_ERROR(tm_rope_backward(&prm, nullptr, cos.desc(), sin.desc(), out.desc(), nullptr),
                  TM_ERR_INVALID_ARGUMENT, "grad_out is NULL");
  TM_EXPECT_ERROR(tm_rope_backward(&prm, x.desc(), cos.desc(), sin.desc(), nullptr, nullptr),
                  TM_ERR_INVALID_ARGUMENT, "grad_x is NULL");
  TM_EXPECT_ERROR(
      tm_rope_backward(&prm, x.desc(), cos.desc(), sin.desc(), out_short.desc(), nullptr),
      TM_ERR_INVALID_ARGUMENT, "grad_x has shape");
  TM_EXPECT_ERROR(
      tm_rope_backward(&prm, x.desc(), cos_s4.desc(), cos_s4.desc(), out.desc(), nullptr),
      TM_ERR_INVALID_ARGUMENT, "of grad_out");
}

}  // namespace
