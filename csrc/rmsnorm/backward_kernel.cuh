// The RMSNorm backward kernel and the team helpers it shares between tm_rmsnorm_backward
// (rmsnorm_cuda.cu) and tm_qk_norm_rope_backward (qk_norm_rope_cuda.cu), which runs RoPE's
// backward on each row as it loads it. Included by those two translation units only.
#pragma once

#include <cstdint>

#include "common/launch.cuh"
#include "rmsnorm/rmsnorm.h"
#include "rmsnorm/vector_io.cuh"
#include "rope/rope_math.h"

namespace turbomoe::rmsnorm {
namespace {

constexpr int kThreads = 256;

// Where a row's cos/sin live: row r of [B*S*NH, D] is head r % NH of position (r / NH) % S of
// batch r / (NH * S); cos/sin are [B or 1, S, D] (batch_stride 0 when broadcast).
struct RopeRows {
  const void* cos = nullptr;
  const void* sin = nullptr;
  int64_t seq = 1, heads = 1;
  int64_t cos_batch_stride = 0, cos_seq_stride = 0;
  int64_t sin_batch_stride = 0, sin_seq_stride = 0;
};

// RoPE's backward (rope_math.h rotate_transpose, rotate_half form over the whole row) on dims
// [c, c + N) in g1 and their partners [c + half, ...) in g2, in place, each result rounded to G
// as tm_rope_backward stores it.
template <typename Cs, typename G, int N>
__device__ __forceinline__ void rope_transpose_row(const RopeRows& rope, int64_t row, int64_t c,
                                                   int64_t half, cuda::Pack<G, N>& g1,
                                                   cuda::Pack<G, N>& g2) {
  const int64_t s = (row / rope.heads) % rope.seq, b = row / (rope.heads * rope.seq);
  const Cs* cp =
      static_cast<const Cs*>(rope.cos) + b * rope.cos_batch_stride + s * rope.cos_seq_stride;
  const Cs* sp =
      static_cast<const Cs*>(rope.sin) + b * rope.sin_batch_stride + s * rope.sin_seq_stride;
  float c1[N], s1[N], c2[N], s2[N];
  cuda::load_floats<N>(cp + c, c1);
  cuda::load_floats<N>(sp + c, s1);
  cuda::load_floats<N>(cp + c + half, c2);
  cuda::load_floats<N>(sp + c + half, s2);
#pragma unroll
  for (int i = 0; i < N; ++i) {
    float d1, d2;
    rope::rotate_transpose(cuda::load(&g1.v[i]), cuda::load(&g2.v[i]), c1[i], s1[i], c2[i], s2[i],
                           &d1, &d2);
    cuda::store(&g1.v[i], d1);
    cuda::store(&g2.v[i], d2);
  }
}

// Sum over a team of `team` consecutive threads (a power of two, uniform over the block); every
// thread of the team gets the same bits. Teams wider than a warp combine their warps' sums
// through shared memory, so every thread of the block must call this.
__device__ __forceinline__ float team_sum(float v, int team, float* warp_sums) {
  const int width = team < 32 ? team : 32;
  for (int offset = width / 2; offset > 0; offset >>= 1) {
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  if (team <= 32) return v;
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = v;
  __syncthreads();
  const int first = static_cast<int>(threadIdx.x) / team * (team / 32);
  float total = 0.0f;
  for (int w = 0; w < team / 32; ++w) total += warp_sums[first + w];
  __syncthreads();  // warp_sums is reused by the next call
  return total;
}

template <int N, typename W>
__device__ __forceinline__ void load_weight(const W* weight, int64_t c, float (&w)[N]) {
  if (weight != nullptr) {
    cuda::load_floats<N>(weight + c, w);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) w[i] = 1.0f;
  }
}

// Team t owns rows [t * rows_per_team, ...) and partial row t. With n = x * rstd and
// dn = dy * w: dx = rstd * (dn - n * mean(dn * n)); the partial sums add dy * cast(n).
// kPrefetch: the cached vectors of the team's next row are loaded before the current row's team
// sum, so that their latency overlaps the sum's barriers and the current row's stores (twice the
// loads in flight; the same arithmetic in the same order, so bitwise the same results).
//
// grad_residual (tm_rmsnorm_backward_add; null otherwise): a gradient that reaches x by another
// path, added to each dx after it is rounded to DX (bitwise the backward followed by the add).
//
// kRope (tm_qk_norm_rope_backward): grad_y is the gradient of RoPE's output, and each loaded row
// first goes through RoPE's transpose (rope_transpose_row), rounded to G as the separate RoPE
// backward would store it. Needs the whole row in the two cached vectors of each thread
// (hidden == 2 * team * N), so that vector 0 holds dims [lane * N, +N) and vector 1 their
// rotate_half partners half a row further.
template <typename X, typename W, typename G, typename DX, int N, bool kPrefetch,
          bool kRope = false, typename Cs = float>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(int team, int64_t partials, int64_t rows_per_team, int64_t rows, int64_t hidden,
                    const G* grad_y, int64_t gy_stride, const X* x, int64_t x_stride,
                    const W* weight, const float* rstd, int64_t rstd_stride, DX* grad_x,
                    int64_t gx_stride, float* partial, RopeRows rope, const DX* grad_residual,
                    int64_t gr_stride) {
  cuda::wait_for_prior_grids();
  cuda::allow_next_grid();
  constexpr int kCached = kBackwardCached;
  __shared__ float warp_sums[kThreads / 32];
  const int lane = static_cast<int>(threadIdx.x) % team;
  const int64_t t = int64_t(blockIdx.x) * (kThreads / team) + threadIdx.x / team;
  const int64_t step = int64_t(team) * N;
  float* part = partial != nullptr && t < partials ? partial + t * hidden : nullptr;
  float acc[kCached][N];
#pragma unroll
  for (int j = 0; j < kCached; ++j) {
#pragma unroll
    for (int i = 0; i < N; ++i) acc[j][i] = 0.0f;
  }
  // Row `it` of this team (when it exists): its rstd and its cached vectors of x and grad_y, as
  // loaded (bf16 vectors take half the registers of their float values; the prefetching kernel
  // holds two rows).
  struct CachedRow {
    float rs;
    cuda::Pack<X, N> xv[kCached];
    cuda::Pack<G, N> gv[kCached];
    cuda::Pack<DX, N> rv[kCached];  // grad_residual's, when given
  };
  auto load_row = [&](int64_t it, CachedRow& row) {
    const int64_t r = t * rows_per_team + it;
    const bool active = t < partials && r < rows;
    const int64_t rr = active ? r : 0;
    row.rs = active ? rstd[rr * rstd_stride] : 0.0f;
#pragma unroll
    for (int j = 0; j < kCached; ++j) {
      const int64_t c = (int64_t(j) * team + lane) * N;
      if (active && c < hidden) {
        row.xv[j] = *reinterpret_cast<const cuda::Pack<X, N>*>(x + rr * x_stride + c);
        row.gv[j] = *reinterpret_cast<const cuda::Pack<G, N>*>(grad_y + rr * gy_stride + c);
        if (grad_residual != nullptr) {
          row.rv[j] =
              *reinterpret_cast<const cuda::Pack<DX, N>*>(grad_residual + rr * gr_stride + c);
        }
      }
    }
    if constexpr (kRope) {
      static_assert(kCached == 2, "RoPE pairs vector 0 with vector 1 of the same thread");
      if (active)
        rope_transpose_row<Cs>(rope, rr, int64_t(lane) * N, hidden / 2, row.gv[0], row.gv[1]);
    }
  };
  CachedRow cur;
  CachedRow next;
  // Every thread runs the same number of iterations: team_sum may hold block-wide barriers.
  for (int64_t it = 0; it < rows_per_team; ++it) {
    const int64_t r = t * rows_per_team + it;
    const bool active = t < partials && r < rows;
    const int64_t rr = active ? r : 0;
    if (kPrefetch && it > 0) {
      cur = next;
    } else {
      load_row(it, cur);
    }
    const float rs = cur.rs;
    const X* xr = x + rr * x_stride;
    const G* gr = grad_y + rr * gy_stride;
    // The row's cached values: element i of vector j.
    auto xv_at = [&](int j, int i) { return cuda::load(&cur.xv[j].v[i]); };
    auto gv_at = [&](int j, int i) { return cuda::load(&cur.gv[j].v[i]); };
    float dot = 0.0f;
#pragma unroll
    for (int j = 0; j < kCached; ++j) {
      const int64_t c = (int64_t(j) * team + lane) * N;
      if (active && c < hidden) {
        float w[N];
        load_weight<N>(weight, c, w);
#pragma unroll
        for (int i = 0; i < N; ++i) dot += gv_at(j, i) * w[i] * (xv_at(j, i) * rs);
      }
    }
    for (int64_t c = (int64_t(kCached) * team + lane) * N; active && c < hidden; c += step) {
      float xs[N], gs[N], w[N];
      cuda::load_floats<N>(xr + c, xs);
      cuda::load_floats<N>(gr + c, gs);
      load_weight<N>(weight, c, w);
#pragma unroll
      for (int i = 0; i < N; ++i) dot += gs[i] * w[i] * (xs[i] * rs);
    }
    if (kPrefetch && it + 1 < rows_per_team) load_row(it + 1, next);
    const float mean = team_sum(dot, team, warp_sums) / static_cast<float>(hidden);
    if (!active) continue;
    DX* dr = grad_x + r * gx_stride;
#pragma unroll
    for (int j = 0; j < kCached; ++j) {
      const int64_t c = (int64_t(j) * team + lane) * N;
      if (c < hidden) {
        float w[N], dx[N];
        load_weight<N>(weight, c, w);
#pragma unroll
        for (int i = 0; i < N; ++i) {
          const float n = xv_at(j, i) * rs;
          dx[i] = rs * (gv_at(j, i) * w[i] - n * mean);
          acc[j][i] += gv_at(j, i) * cuda::round_to<X>(n);
        }
        if (grad_residual != nullptr) {
#pragma unroll
          for (int i = 0; i < N; ++i) {
            dx[i] = cuda::round_to<DX>(dx[i]) + cuda::load(&cur.rv[j].v[i]);
          }
        }
        cuda::store_floats<N>(dr + c, dx);
      }
    }
    for (int64_t c = (int64_t(kCached) * team + lane) * N; c < hidden; c += step) {
      float xs[N], gs[N], w[N], dx[N], contrib[N];
      cuda::load_floats<N>(xr + c, xs);
      cuda::load_floats<N>(gr + c, gs);
      load_weight<N>(weight, c, w);
#pragma unroll
      for (int i = 0; i < N; ++i) {
        const float n = xs[i] * rs;
        dx[i] = rs * (gs[i] * w[i] - n * mean);
        contrib[i] = gs[i] * cuda::round_to<X>(n);
      }
      if (grad_residual != nullptr) {
        float res[N];
        cuda::load_floats<N>(grad_residual + r * gr_stride + c, res);
#pragma unroll
        for (int i = 0; i < N; ++i) dx[i] = cuda::round_to<DX>(dx[i]) + res[i];
      }
      cuda::store_floats<N>(dr + c, dx);
      if (part == nullptr) continue;
      // These columns of the partial row belong to this thread alone.
      if (it > 0) {
        float old[N];
        cuda::load_floats<N>(part + c, old);
#pragma unroll
        for (int i = 0; i < N; ++i) contrib[i] = old[i] + contrib[i];
      }
      cuda::store_floats<N>(part + c, contrib);
    }
  }
  if (part == nullptr) return;
#pragma unroll
  for (int j = 0; j < kCached; ++j) {
    const int64_t c = (int64_t(j) * team + lane) * N;
    if (c < hidden) cuda::store_floats<N>(part + c, acc[j]);
  }
}

}  // namespace
}  // namespace turbomoe::rmsnorm
