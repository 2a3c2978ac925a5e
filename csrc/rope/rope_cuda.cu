// CUDA kernel of RoPE over strided views, in float32. A block covers a run of positions of one
// (batch, head); each thread takes one group of N consecutive rotated pairs (laid out as in
// rope_math.h's pair_index) or N pass-through dims. Where the last dims are contiguous and
// aligned, N = 4 and every access is a vector access, so that enough bytes are in flight to
// saturate memory; otherwise N = 1 over arbitrary strides.
#include <type_traits>

#include "common/cuda_utils.cuh"
#include "common/launch.cuh"
#include "rmsnorm/vector_io.cuh"
#include "rope/rope.h"
#include "rope/rope_math.h"

namespace turbomoe::rope {
namespace {

struct View4d {
  const void* data;
  int64_t s0, s1, s2, s3;
};

struct View3d {
  const void* data;
  int64_t s0, s1, s2;
};

View4d view4(const Arg& a) {
  return {a.data(), a.stride(0), a.stride(1), a.stride(2), a.stride(3)};
}
View3d view3(const Arg& a) { return {a.data(), a.stride(0), a.stride(1), a.stride(2)}; }

constexpr int kThreads = 256;
constexpr int kVec = 4;

// M elements from p on: one vector access (kVector: stride 1 and alignment checked by the
// host) or M strided scalar ones.
template <int M, bool kVector, typename T>
__device__ __forceinline__ void load_run(const T* p, int64_t stride, float (&v)[M]) {
  if constexpr (kVector) {
    cuda::load_floats<M>(p, v);
  } else {
#pragma unroll
    for (int i = 0; i < M; ++i) v[i] = cuda::load(p + i * stride);
  }
}

template <int M, bool kVector, typename T>
__device__ __forceinline__ void store_run(T* p, int64_t stride, const float (&v)[M]) {
  if constexpr (kVector) {
    cuda::store_floats<M>(p, v);
  } else {
#pragma unroll
    for (int i = 0; i < M; ++i) cuda::store(p + i * stride, v[i]);
  }
}

// Grid: x = runs of rows_per_block positions, y = head, z = batch. Thread item t is position
// t / groups of the run, group t % groups. In the backward, in is grad_out and out is grad_x;
// each item reads and writes only its own elements, so the non-interleaved form may run in
// place.
template <typename In, typename Cs, typename Out, int N>
__global__ void __launch_bounds__(kThreads)
    rope_kernel(bool interleaved, bool backward, int64_t seq, int64_t dim, int64_t rot,
                bool broadcast, int rows_per_block, View4d in, View3d cos, View3d sin, View4d out) {
  cuda::wait_for_prior_grids();
  cuda::allow_next_grid();
  constexpr bool kVector = N > 1;
  const int64_t half = rot / 2;
  const int rot_groups = static_cast<int>(half / N);
  const int groups = rot_groups + static_cast<int>((dim - rot) / N);
  const int64_t h = blockIdx.y, b = blockIdx.z, cb = broadcast ? 0 : b;
  for (int t = threadIdx.x; t < rows_per_block * groups; t += kThreads) {
    const int64_t s = int64_t(blockIdx.x) * rows_per_block + t / groups;
    if (s >= seq) break;  // later items only have later positions
    const int g = t % groups;
    const In* ip = static_cast<const In*>(in.data) + b * in.s0 + h * in.s1 + s * in.s2;
    Out* op = static_cast<Out*>(const_cast<void*>(out.data)) + b * out.s0 + h * out.s1 + s * out.s2;
    if (g >= rot_groups) {
      const int64_t d = rot + int64_t(g - rot_groups) * N;
      float v[N];
      load_run<N, kVector>(ip + d * in.s3, in.s3, v);
      store_run<N, kVector>(op + d * out.s3, out.s3, v);
      continue;
    }
    const int64_t k = int64_t(g) * N;  // first pair of the group
    const Cs* cp = static_cast<const Cs*>(cos.data) + cb * cos.s0 + s * cos.s1;
    const Cs* sp = static_cast<const Cs*>(sin.data) + cb * sin.s0 + s * sin.s1;
    float c1[N], s1[N], c2[N], s2[N], y1[N], y2[N];
    load_run<N, kVector>(cp + k * cos.s2, cos.s2, c1);
    load_run<N, kVector>(sp + k * sin.s2, sin.s2, s1);
    if (interleaved) {  // both outputs of a pair use column k
#pragma unroll
      for (int i = 0; i < N; ++i) {
        c2[i] = c1[i];
        s2[i] = s1[i];
      }
    } else {
      load_run<N, kVector>(cp + (k + half) * cos.s2, cos.s2, c2);
      load_run<N, kVector>(sp + (k + half) * sin.s2, sin.s2, s2);
    }
    // Interleaved pairs sit at (2k, 2k + 1) of x / grad_x: 2N consecutive elements.
    if (!backward) {
      float x1[N], x2[N];
      if (interleaved) {
        float xx[2 * N];
        load_run<2 * N, kVector>(ip + 2 * k * in.s3, in.s3, xx);
#pragma unroll
        for (int i = 0; i < N; ++i) {
          x1[i] = xx[2 * i];
          x2[i] = xx[2 * i + 1];
        }
      } else {
        load_run<N, kVector>(ip + k * in.s3, in.s3, x1);
        load_run<N, kVector>(ip + (k + half) * in.s3, in.s3, x2);
      }
#pragma unroll
      for (int i = 0; i < N; ++i) rotate(x1[i], x2[i], c1[i], s1[i], c2[i], s2[i], &y1[i], &y2[i]);
      store_run<N, kVector>(op + k * out.s3, out.s3, y1);
      store_run<N, kVector>(op + (k + half) * out.s3, out.s3, y2);
    } else {
      float dy1[N], dy2[N];
      load_run<N, kVector>(ip + k * in.s3, in.s3, dy1);
      load_run<N, kVector>(ip + (k + half) * in.s3, in.s3, dy2);
#pragma unroll
      for (int i = 0; i < N; ++i) {
        rotate_transpose(dy1[i], dy2[i], c1[i], s1[i], c2[i], s2[i], &y1[i], &y2[i]);
      }
      if (interleaved) {
        float xx[2 * N];
#pragma unroll
        for (int i = 0; i < N; ++i) {
          xx[2 * i] = y1[i];
          xx[2 * i + 1] = y2[i];
        }
        store_run<2 * N, kVector>(op + 2 * k * out.s3, out.s3, xx);
      } else {
        store_run<N, kVector>(op + k * out.s3, out.s3, y1);
        store_run<N, kVector>(op + (k + half) * out.s3, out.s3, y2);
      }
    }
  }
}

// True when runs of m elements along the last dim of every row of a are aligned vectors.
bool aligned_rows(const Arg& a, int64_t m) {
  if (a.stride(a.ndim() - 1) != 1) return false;
  for (int d = 0; d + 1 < a.ndim(); ++d) {
    if (a.stride(d) % m != 0) return false;
  }
  return reinterpret_cast<uintptr_t>(a.data()) % (m * dtype_size(a.dtype())) == 0;
}

}  // namespace

void apply_cuda(bool interleaved, bool backward, const Arg& in, const Arg& cos, const Arg& sin,
                const Arg& out, void* stream) {
  cuda::DeviceGuard device(in.t().device_index);
  const int64_t batch = in.size(0), heads = in.size(1), seq = in.size(2);
  const int64_t dim = in.size(3), rot = cos.size(2), half = rot / 2;
  if (batch * heads * seq == 0 || half + (dim - rot) == 0) return;
  if (batch > 65535 || heads > 65535 || half + (dim - rot) > (int64_t{1} << 24)) {
    unsupported("RoPE on CUDA takes at most 65535 batches and heads and 2^24 dims, got " +
                shape_string(in.t()));
  }
  const bool vec = half % kVec == 0 && (dim - rot) % kVec == 0 && aligned_rows(in, 2 * kVec) &&
                   aligned_rows(out, 2 * kVec) && aligned_rows(cos, kVec) &&
                   aligned_rows(sin, kVec);
  const int n = vec ? kVec : 1;
  const int groups = static_cast<int>(half / n + (dim - rot) / n);
  const int rows_per_block = groups >= kThreads ? 1 : kThreads / groups;
  const dim3 grid(static_cast<unsigned>((seq + rows_per_block - 1) / rows_per_block),
                  static_cast<unsigned>(heads), static_cast<unsigned>(batch));
  cuda::dispatch_f32_bf16(in.dtype(), [&](auto in_tag) {
    using In = std::remove_pointer_t<decltype(in_tag)>;
    cuda::dispatch_f32_bf16(cos.dtype(), [&](auto cs_tag) {
      using Cs = std::remove_pointer_t<decltype(cs_tag)>;
      cuda::dispatch_f32_bf16(out.dtype(), [&](auto out_tag) {
        using Out = std::remove_pointer_t<decltype(out_tag)>;
        auto kernel = vec ? rope_kernel<In, Cs, Out, kVec> : rope_kernel<In, Cs, Out, 1>;
        cuda::launch("rope_kernel", kernel, grid, kThreads, 0, cuda::as_stream(stream), interleaved,
                     backward, seq, dim, rot, cos.size(0) == 1, rows_per_block, view4(in),
                     view3(cos), view3(sin), view4(out));
      });
    });
  });
}

}  // namespace turbomoe::rope
