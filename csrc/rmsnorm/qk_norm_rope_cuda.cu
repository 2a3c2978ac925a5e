// CUDA kernels of the fused q/k RMSNorm + RoPE. A team of D/16 lanes takes one head (one row of
// [B*S*NH, D]); each lane holds the 8 dims [8 * lane, +8) and their rotate_half partners half a
// row further, so RoPE pairs never leave a thread. The sum of squares adds the two vectors of a
// lane and then butterflies over the team, which is the order of the RMSNorm forward's team of
// D/8 lanes (its first butterfly step adds exactly those two vectors): the fused forward is
// bitwise tm_rmsnorm_forward followed by tm_rope_forward. The backward is the RMSNorm backward
// kernel with RoPE's transpose applied to each row as it is loaded (backward_kernel.cuh).
#include "common/launch.cuh"
#include "rmsnorm/backward_kernel.cuh"
#include "rmsnorm/qk_norm_rope.h"
#include "rmsnorm/rmsnorm.h"
#include "rmsnorm/vector_io.cuh"
#include "rope/rope_math.h"

namespace turbomoe::rmsnorm {
namespace {

constexpr int kN = cuda::kVecElems;

template <typename T>
using Elem = std::remove_pointer_t<T>;

template <typename X, typename Cs>
__global__ void __launch_bounds__(kThreads)
    qk_norm_rope_forward_kernel(int team, int64_t rows, int64_t hidden, float eps, const X* x,
                                const X* weight, RopeRows rope, X* y, float* rstd) {
  cuda::wait_for_prior_grids();
  cuda::allow_next_grid();
  const int lane = static_cast<int>(threadIdx.x) % team;
  const int64_t r = (int64_t(blockIdx.x) * kThreads + threadIdx.x) / team;
  const bool active = r < rows;
  const int64_t half = hidden / 2, c = int64_t(lane) * kN;
  float v1[kN] = {}, v2[kN] = {};
  if (active) {
    cuda::load_floats<kN>(x + r * hidden + c, v1);
    cuda::load_floats<kN>(x + r * hidden + c + half, v2);
  }
  float sum1 = 0.0f, sum2 = 0.0f;
#pragma unroll
  for (int i = 0; i < kN; ++i) sum1 += v1[i] * v1[i];
#pragma unroll
  for (int i = 0; i < kN; ++i) sum2 += v2[i] * v2[i];
  float sum_sq = sum1 + sum2;
  // Every lane of the warp takes part (teams divide the warp; inactive rows add zeros).
  for (int offset = team / 2; offset > 0; offset >>= 1) {
    sum_sq += __shfl_xor_sync(0xffffffffu, sum_sq, offset);
  }
  if (!active) return;
  const float rs = rsqrtf(sum_sq / static_cast<float>(hidden) + eps);
  if (lane == 0) rstd[r] = rs;
  float w1[kN], w2[kN];
  load_weight<kN>(weight, c, w1);
  load_weight<kN>(weight, c + half, w2);
  // The normalised values as the RMSNorm op stores them (in X), which RoPE then reads.
#pragma unroll
  for (int i = 0; i < kN; ++i) {
    v1[i] = cuda::round_to<X>(cuda::round_to<X>(v1[i] * rs) * w1[i]);
    v2[i] = cuda::round_to<X>(cuda::round_to<X>(v2[i] * rs) * w2[i]);
  }
  const int64_t s = (r / rope.heads) % rope.seq, b = r / (rope.heads * rope.seq);
  const Cs* cp =
      static_cast<const Cs*>(rope.cos) + b * rope.cos_batch_stride + s * rope.cos_seq_stride;
  const Cs* sp =
      static_cast<const Cs*>(rope.sin) + b * rope.sin_batch_stride + s * rope.sin_seq_stride;
  float c1[kN], s1[kN], c2[kN], s2[kN], y1[kN], y2[kN];
  cuda::load_floats<kN>(cp + c, c1);
  cuda::load_floats<kN>(sp + c, s1);
  cuda::load_floats<kN>(cp + c + half, c2);
  cuda::load_floats<kN>(sp + c + half, s2);
#pragma unroll
  for (int i = 0; i < kN; ++i)
    rope::rotate(v1[i], v2[i], c1[i], s1[i], c2[i], s2[i], &y1[i], &y2[i]);
  cuda::store_floats<kN>(y + r * hidden + c, y1);
  cuda::store_floats<kN>(y + r * hidden + c + half, y2);
}

RopeRows rope_rows(const Arg& x, const Arg& cos, const Arg& sin) {
  RopeRows rope;
  rope.cos = cos.data();
  rope.sin = sin.data();
  rope.seq = x.size(1);
  rope.heads = x.size(2);
  const bool broadcast = cos.size(0) == 1;
  rope.cos_batch_stride = broadcast ? 0 : cos.stride(0);
  rope.sin_batch_stride = broadcast ? 0 : sin.stride(0);
  rope.cos_seq_stride = cos.stride(1);
  rope.sin_seq_stride = sin.stride(1);
  return rope;
}

}  // namespace

void qk_norm_rope_forward_cuda(const Arg& x, const std::optional<Arg>& weight, float eps,
                               const Arg& cos, const Arg& sin, const Arg& y, const Arg& rstd,
                               void* stream) {
  cuda::DeviceGuard device(x.t().device_index);
  const int64_t hidden = x.size(3);
  const int64_t rows = x.size(0) * x.size(1) * x.size(2);
  const int team = static_cast<int>(hidden / (2 * kN));
  const int64_t rows_per_block = kThreads / team;
  const unsigned blocks = static_cast<unsigned>((rows + rows_per_block - 1) / rows_per_block);
  const RopeRows rope = rope_rows(x, cos, sin);
  cuda::dispatch_f32_bf16(x.dtype(), [&](auto x_tag) {
    using X = Elem<decltype(x_tag)>;
    cuda::dispatch_f32_bf16(cos.dtype(), [&](auto cs_tag) {
      using Cs = Elem<decltype(cs_tag)>;
      cuda::launch("qk_norm_rope_forward_kernel", qk_norm_rope_forward_kernel<X, Cs>, blocks,
                   kThreads, 0, cuda::as_stream(stream), team, rows, hidden, eps, x.ptr<const X>(),
                   weight ? weight->ptr<const X>() : nullptr, rope, y.ptr<X>(), rstd.ptr<float>());
    });
  });
}

void qk_norm_rope_backward_cuda(const Arg& grad_y, const Arg& x, const std::optional<Arg>& weight,
                                const Arg& rstd, const Arg& cos, const Arg& sin, const Arg& grad_x,
                                const std::optional<Arg>& grad_weight, void* workspace,
                                void* stream) {
  cuda::DeviceGuard device(x.t().device_index);
  const int64_t hidden = x.size(3);
  const int64_t rows = x.size(0) * x.size(1) * x.size(2);
  const BackwardPlan plan = backward_plan(rows, hidden);
  float* partial = grad_weight ? static_cast<float*>(workspace) : nullptr;
  if (rows > 0) {
    const RopeRows rope = rope_rows(x, cos, sin);
    const int64_t teams_per_block = kThreads / plan.team;
    const unsigned blocks =
        static_cast<unsigned>((plan.partials + teams_per_block - 1) / teams_per_block);
    cuda::dispatch_f32_bf16(x.dtype(), [&](auto x_tag) {
      using X = Elem<decltype(x_tag)>;
      cuda::dispatch_f32_bf16(grad_y.dtype(), [&](auto g_tag) {
        using G = Elem<decltype(g_tag)>;
        cuda::dispatch_f32_bf16(cos.dtype(), [&](auto cs_tag) {
          using Cs = Elem<decltype(cs_tag)>;
          cuda::launch("backward_kernel", backward_kernel<X, X, G, X, kN, false, true, Cs>, blocks,
                       kThreads, 0, cuda::as_stream(stream), plan.team, plan.partials,
                       plan.rows_per_team, rows, hidden, grad_y.ptr<const G>(), hidden,
                       x.ptr<const X>(), hidden, weight ? weight->ptr<const X>() : nullptr,
                       rstd.ptr<const float>(), rstd.stride(0), grad_x.ptr<X>(), hidden, partial,
                       rope, nullptr, 0);
        });
      });
    });
  }
  if (grad_weight) reduce_partials_cuda(plan, hidden, partial, grad_weight->ptr<float>(), stream);
}

}  // namespace turbomoe::rmsnorm
