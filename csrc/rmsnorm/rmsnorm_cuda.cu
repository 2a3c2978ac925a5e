// CUDA kernels of RMSNorm (and of the residual add before it, tm_add_rmsnorm_forward, and the
// residual gradient after its backward, tm_rmsnorm_backward_add). Forward: one warp per row (part
// of a warp for narrow rows). Backward: a
// team of threads (see rmsnorm.h) per row, each thread keeping a few vectors of x and grad_y in
// registers so that the row is read from memory once; every team owns a fixed run of rows and keeps
// its grad_weight partial sums in registers (in the workspace past the cached columns), and two
// reduction kernels add the partial rows in a fixed order, so grad_weight is deterministic
// without atomics.
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "common/launch.cuh"
#include "rmsnorm/backward_kernel.cuh"
#include "rmsnorm/rmsnorm.h"
#include "rmsnorm/vector_io.cuh"

namespace turbomoe::rmsnorm {
namespace {

constexpr int kForwardWarps = 4;
constexpr int kReduceColumns = 32;
constexpr int kReduceGroups = kThreads / kReduceColumns;
static_assert(kVectorElems == cuda::kVecElems);

// A team of `team` lanes per row (a power of two up to 32: a warp for wide rows, part of one
// for rows narrower than 32 vectors, e.g. the per-head q/k norms of 128 values, which would
// otherwise leave half of each warp idle), two passes over the row (the second hits L1):
// measured faster on H200 than teams holding the row in registers, for hidden sizes 128 to 7168.
// kAdd (tm_add_rmsnorm_forward): the row normalised is cast(x + residual), formed in both passes
// (the same bits each time) and written to sum in the second.
template <typename X, typename W, typename Y, int N, bool kAdd>
__global__ void __launch_bounds__(kForwardWarps * 32)
    forward_kernel(int team, int64_t rows, int64_t hidden, float eps, const X* x, int64_t x_stride,
                   const W* weight, Y* y, int64_t y_stride, float* rstd, int64_t rstd_stride,
                   const X* residual, int64_t res_stride, X* sum, int64_t sum_stride) {
  cuda::wait_for_prior_grids();
  cuda::allow_next_grid();
  const int warp_lane = static_cast<int>(threadIdx.x) % 32;
  const int lane = warp_lane % team;
  const int64_t r =
      (int64_t(blockIdx.x) * kForwardWarps + threadIdx.x / 32) * (32 / team) + warp_lane / team;
  const bool active = r < rows;
  const X* xr = x + (active ? r : 0) * x_stride;
  const X* rr = kAdd ? residual + (active ? r : 0) * res_stride : nullptr;
  // The row's elements [c, c + N) as normalised: x's, or cast(x + residual)'s.
  auto load_row = [&](int64_t c, float(&v)[N]) {
    cuda::load_floats<N>(xr + c, v);
    if constexpr (kAdd) {
      float res[N];
      cuda::load_floats<N>(rr + c, res);
#pragma unroll
      for (int i = 0; i < N; ++i) v[i] = cuda::round_to<X>(v[i] + res[i]);
    }
  };
  float sum_sq = 0.0f;
  for (int64_t c = int64_t(lane) * N; active && c < hidden; c += int64_t(team) * N) {
    float v[N];
    load_row(c, v);
#pragma unroll
    for (int i = 0; i < N; ++i) sum_sq += v[i] * v[i];
  }
  // Within the team (xor offsets below `team` stay inside it); every lane of the warp takes part.
  for (int offset = team / 2; offset > 0; offset >>= 1) {
    sum_sq += __shfl_xor_sync(0xffffffffu, sum_sq, offset);
  }
  if (!active) return;  // nothing below synchronises
  const float rs = rsqrtf(sum_sq / static_cast<float>(hidden) + eps);
  if (lane == 0 && rstd != nullptr) rstd[r * rstd_stride] = rs;
  Y* yr = y + r * y_stride;
  for (int64_t c = int64_t(lane) * N; c < hidden; c += int64_t(team) * N) {
    float v[N], w[N];
    load_row(c, v);
    if constexpr (kAdd) cuda::store_floats<N>(sum + r * sum_stride + c, v);
    load_weight<N>(weight, c, w);
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] = cuda::round_to<X>(v[i] * rs) * w[i];
    cuda::store_floats<N>(yr + c, v);
  }
}

// out[blockIdx.y][c] = sum of in[p][c] over the rows p of slice blockIdx.y: kReduceGroups
// thread rows each add every kReduceGroups-th row in ascending order, then the groups are added
// in ascending order.
__global__ void __launch_bounds__(kThreads)
    reduce_rows_kernel(int64_t total_rows, int64_t slice_rows, int64_t hidden, const float* in,
                       float* out) {
  cuda::wait_for_prior_grids();
  cuda::allow_next_grid();
  __shared__ float sums[kReduceGroups][kReduceColumns];
  const int col = static_cast<int>(threadIdx.x) % kReduceColumns;
  const int group = static_cast<int>(threadIdx.x) / kReduceColumns;
  const int64_t c = int64_t(blockIdx.x) * kReduceColumns + col;
  const int64_t begin = int64_t(blockIdx.y) * slice_rows;
  const int64_t end = begin + slice_rows < total_rows ? begin + slice_rows : total_rows;
  float s = 0.0f;
  if (c < hidden) {
    // Unrolled so that 16 rows' loads are in flight (one stage over 512 partial rows is 64 rows
    // a thread: 4 round trips to L2 instead of 64); the adds keep their order.
#pragma unroll 16
    for (int64_t p = begin + group; p < end; p += kReduceGroups) s += in[p * hidden + c];
  }
  sums[group][col] = s;
  __syncthreads();
  if (group == 0 && c < hidden) {
    float total = 0.0f;
#pragma unroll
    for (int g = 0; g < kReduceGroups; ++g) total += sums[g][col];
    out[int64_t(blockIdx.y) * hidden + c] = total;
  }
}

template <typename T>
using Elem = std::remove_pointer_t<T>;

const void* data_or_null(const std::optional<Arg>& a) { return a ? a->data() : nullptr; }

}  // namespace

void forward_cuda(const Arg& x, const std::optional<Arg>& weight, float eps, const Arg& y,
                  const std::optional<Arg>& rstd, const std::optional<ResidualAdd>& add,
                  void* stream) {
  cuda::DeviceGuard device(x.t().device_index);
  const int64_t rows = x.size(0), hidden = x.size(1);
  const bool vec = hidden % cuda::kVecElems == 0 && cuda::vectorisable(x) &&
                   cuda::vectorisable(y) && (!weight || cuda::vectorisable(*weight)) &&
                   (!add || (cuda::vectorisable(add->residual) && cuda::vectorisable(add->sum)));
  // Lanes per row: enough for one pass of vectors over the row, at most a warp.
  const int64_t vectors = (hidden + (vec ? cuda::kVecElems : 1) - 1) / (vec ? cuda::kVecElems : 1);
  int team = 1;
  while (team < 32 && team < vectors) team *= 2;
  const int64_t rows_per_block = int64_t(kForwardWarps) * (32 / team);
  const unsigned blocks = static_cast<unsigned>((rows + rows_per_block - 1) / rows_per_block);
  float* rstd_ptr = rstd ? rstd->ptr<float>() : nullptr;
  const int64_t rstd_stride = rstd ? rstd->stride(0) : 0;
  const int32_t w_dtype = weight ? weight->dtype() : x.dtype();
  cuda::dispatch_f32_bf16(x.dtype(), [&](auto x_tag) {
    using X = Elem<decltype(x_tag)>;
    cuda::dispatch_f32_bf16(w_dtype, [&](auto w_tag) {
      using W = Elem<decltype(w_tag)>;
      cuda::dispatch_f32_bf16(y.dtype(), [&](auto y_tag) {
        using Y = Elem<decltype(y_tag)>;
        auto kernel =
            vec ? (add ? forward_kernel<X, W, Y, cuda::kVecElems, true>
                       : forward_kernel<X, W, Y, cuda::kVecElems, false>)
                : (add ? forward_kernel<X, W, Y, 1, true> : forward_kernel<X, W, Y, 1, false>);
        cuda::launch("rmsnorm forward_kernel", kernel, blocks, kForwardWarps * 32, 0,
                     cuda::as_stream(stream), team, rows, hidden, eps, x.ptr<const X>(),
                     x.stride(0), static_cast<const W*>(data_or_null(weight)), y.ptr<Y>(),
                     y.stride(0), rstd_ptr, rstd_stride,
                     add ? add->residual.ptr<const X>() : nullptr,
                     add ? add->residual.stride(0) : 0, add ? add->sum.ptr<X>() : nullptr,
                     add ? add->sum.stride(0) : 0);
      });
    });
  });
}

void backward_cuda(const Arg& grad_y, const Arg& x, const std::optional<Arg>& weight,
                   const Arg& rstd, const std::optional<Arg>& grad_residual, const Arg& grad_x,
                   const std::optional<Arg>& grad_weight, void* workspace, void* stream) {
  cuda::DeviceGuard device(x.t().device_index);
  const int64_t rows = x.size(0), hidden = x.size(1);
  const BackwardPlan plan = backward_plan(rows, hidden);
  // Opt-in (TURBOMOE_RMSNORM_PREFETCH=1) until measured faster on the device: the backward that
  // loads each team's next row under the current row's sum (bitwise the same results).
  const char* prefetch_env = std::getenv("TURBOMOE_RMSNORM_PREFETCH");
  const bool prefetch = prefetch_env != nullptr && std::strcmp(prefetch_env, "1") == 0;
  float* partial = grad_weight ? static_cast<float*>(workspace) : nullptr;
  if (rows > 0) {
    const bool vec = hidden % cuda::kVecElems == 0 && cuda::vectorisable(x) &&
                     cuda::vectorisable(grad_y) && cuda::vectorisable(grad_x) &&
                     (!grad_residual || cuda::vectorisable(*grad_residual)) &&
                     (!weight || cuda::vectorisable(*weight)) &&
                     reinterpret_cast<uintptr_t>(partial) % (cuda::kVecElems * sizeof(float)) == 0;
    const int64_t teams_per_block = kThreads / plan.team;
    const unsigned blocks =
        static_cast<unsigned>((plan.partials + teams_per_block - 1) / teams_per_block);
    const int32_t w_dtype = weight ? weight->dtype() : x.dtype();
    cuda::dispatch_f32_bf16(x.dtype(), [&](auto x_tag) {
      using X = Elem<decltype(x_tag)>;
      cuda::dispatch_f32_bf16(w_dtype, [&](auto w_tag) {
        using W = Elem<decltype(w_tag)>;
        cuda::dispatch_f32_bf16(grad_y.dtype(), [&](auto g_tag) {
          using G = Elem<decltype(g_tag)>;
          cuda::dispatch_f32_bf16(grad_x.dtype(), [&](auto dx_tag) {
            using DX = Elem<decltype(dx_tag)>;
            auto kernel = vec ? (prefetch ? backward_kernel<X, W, G, DX, cuda::kVecElems, true>
                                          : backward_kernel<X, W, G, DX, cuda::kVecElems, false>)
                              : backward_kernel<X, W, G, DX, 1, false>;
            cuda::launch("rmsnorm backward_kernel", kernel, blocks, kThreads, 0,
                         cuda::as_stream(stream), plan.team, plan.partials, plan.rows_per_team,
                         rows, hidden, grad_y.ptr<const G>(), grad_y.stride(0), x.ptr<const X>(),
                         x.stride(0), static_cast<const W*>(data_or_null(weight)),
                         rstd.ptr<const float>(), rstd.stride(0), grad_x.ptr<DX>(),
                         grad_x.stride(0), partial, RopeRows{},
                         grad_residual ? grad_residual->ptr<const DX>() : nullptr,
                         grad_residual ? grad_residual->stride(0) : 0);
          });
        });
      });
    });
  }
  if (grad_weight) reduce_partials_cuda(plan, hidden, partial, grad_weight->ptr<float>(), stream);
}

void reduce_partials_cuda(const BackwardPlan& plan, int64_t hidden, float* workspace,
                          float* grad_weight, void* stream) {
  // Stage one adds slices of kReduceSliceRows partial rows; stage two adds the slices. With one
  // slice (up to kSingleStageRows partial rows) stage one adds them all into grad_weight. With no
  // row at all, stage one writes zeros. The slices live in the workspace past the partial rows.
  const unsigned column_blocks =
      static_cast<unsigned>((hidden + kReduceColumns - 1) / kReduceColumns);
  const float* partial = workspace;
  float* slices = workspace + plan.partials * hidden;
  float* stage_one_out = plan.slices == 1 ? grad_weight : slices;
  cuda::launch("rmsnorm reduce_rows_kernel", reduce_rows_kernel,
               dim3(column_blocks, static_cast<unsigned>(plan.slices)), kThreads, 0,
               cuda::as_stream(stream), plan.partials,
               plan.slices == 1 ? plan.partials : kReduceSliceRows, hidden, partial, stage_one_out);
  if (plan.slices == 1) return;
  cuda::launch("rmsnorm reduce_rows_kernel", reduce_rows_kernel, dim3(column_blocks, 1), kThreads,
               0, cuda::as_stream(stream), plan.slices, plan.slices, hidden, slices, grad_weight);
}

}  // namespace turbomoe::rmsnorm
