// The generic CUDA grouped GEMM (see tiled_gemm.h).
//
// A CTA computes one tile of C. For the row-grouped passes (forward, grad-input) the grid's x
// dimension enumerates row tiles expert by expert, ceil(rows_e / tile) of them per expert, plus
// spare slots (at most E more than ceil(M / tile)); warp 0 of each CTA finds its expert with a
// warp-wide prefix sum over the device-side offsets, so the host never reads the counts. For
// grad-weight, grid z is the expert and the reduction runs over that expert's rows.
//
// Operand tiles move global -> registers -> shared memory in 16-byte chunks, kept in the
// layout they have in global memory (contiguous along the reduction or along the output), and
// the next tile's global loads are issued before the current tile's math. bf16 multiplies on
// tensor cores through WMMA (16x16x16, float accumulators); float32 on CUDA cores, so that its
// results keep full float32 precision. Every output element is owned by one thread: results do
// not depend on scheduling.
#include <cuda_bf16.h>
#include <mma.h>

#include <string>
#include <type_traits>

#include "common/cuda_utils.cuh"
#include "common/launch.cuh"
#include "grouped_gemm/tiled_gemm.h"

namespace turbomoe::grouped_gemm {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarp = 32;

template <typename T>
struct Shape;
template <>
struct Shape<float> {  // 16 x 16 threads, each owning a 4 x 4 strided micro-tile
  static constexpr int kM = 64, kN = 64, kK = 16, kThreads = 256;
};
template <>
struct Shape<__nv_bfloat16> {  // 2 x 4 warps, each owning a 64 x 32 slab of 4 x 2 WMMA tiles
  static constexpr int kM = 128, kN = 128, kK = 32, kThreads = 256;
};

// Which dimension of each operand is contiguous, per pass (A is [m, k], B is [k, n]).
template <tm_gemm_pass P>
struct Layout {
  static constexpr bool kAKMajor = P != TM_GEMM_GRAD_WEIGHT;  // dy^T is contiguous along m
  static constexpr bool kBKMajor = P == TM_GEMM_FORWARD;      // w[e]^T is contiguous along k
  static constexpr bool kGroupedRows = P != TM_GEMM_GRAD_WEIGHT;
};

template <int Bytes>
struct Bits;
template <>
struct Bits<2> {
  using type = uint16_t;
};
template <>
struct Bits<4> {
  using type = uint32_t;
};

// Moves a kOuter x kContig tile, contiguous along kContig both in global and in shared memory,
// in 16-byte chunks. Elements outside the matrix read as zero.
template <typename T, int kOuter, int kContig, int kThreads>
struct TileLoader {
  static constexpr int kChunk = 16 / sizeof(T);
  static constexpr int kChunksPerRow = kContig / kChunk;
  static constexpr int kPerThread = kOuter * kChunksPerRow / kThreads;
  static_assert(kContig % kChunk == 0 && (kOuter * kChunksPerRow) % kThreads == 0,
                "tile does not split evenly into 16-byte chunks per thread");
  uint4 regs[kPerThread];

  // tile: element (0, 0) of the tile; outer_valid / contig_valid: how far the matrix extends
  // from it; vec: every chunk start is 16-byte aligned (checked once per matrix).
  __device__ __forceinline__ void load(const T* tile, int64_t outer_stride, int64_t outer_valid,
                                       int64_t contig_valid, bool vec) {
    using B = typename Bits<sizeof(T)>::type;
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      const int c = threadIdx.x + i * kThreads;
      const int o = c / kChunksPerRow, x = (c % kChunksPerRow) * kChunk;
      const int64_t valid = o < outer_valid ? contig_valid - x : 0;
      const T* p = tile + o * outer_stride + x;
      if (vec && valid >= kChunk) {
        regs[i] = *reinterpret_cast<const uint4*>(p);
      } else {
        regs[i] = make_uint4(0, 0, 0, 0);
        B* dst = reinterpret_cast<B*>(&regs[i]);
        const B* src = reinterpret_cast<const B*>(p);
#pragma unroll
        for (int j = 0; j < kChunk; ++j) {
          if (j < valid) dst[j] = src[j];
        }
      }
    }
  }

  // A gathered tile (the row passes' A, the grad-weight's A or B): tile row o is row
  // pairs[o] / top_k of `src` (ld apart), columns from k0; rows at or past outer_valid, and
  // tokens outside [0, src_rows), read as zero.
  __device__ __forceinline__ void load_gathered(const T* src, int64_t ld, const int32_t* pairs,
                                                int top_k, int64_t src_rows, int64_t outer_valid,
                                                int64_t k0, int64_t contig_valid, bool vec) {
    using B = typename Bits<sizeof(T)>::type;
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      const int c = threadIdx.x + i * kThreads;
      const int o = c / kChunksPerRow, x = (c % kChunksPerRow) * kChunk;
      const int64_t token = o < outer_valid && pairs[o] >= 0 ? pairs[o] / top_k : -1;
      const int64_t valid = token >= 0 && token < src_rows ? contig_valid - x : 0;
      const T* p = src + (valid > 0 ? token * ld + k0 + x : 0);
      if (vec && valid >= kChunk) {
        regs[i] = *reinterpret_cast<const uint4*>(p);
      } else {
        regs[i] = make_uint4(0, 0, 0, 0);
        B* dst = reinterpret_cast<B*>(&regs[i]);
        const B* from = reinterpret_cast<const B*>(p);
#pragma unroll
        for (int j = 0; j < kChunk; ++j) {
          if (j < valid) dst[j] = from[j];
        }
      }
    }
  }

  __device__ __forceinline__ void store(T* smem, int ld) const {
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      const int c = threadIdx.x + i * kThreads;
      const int o = c / kChunksPerRow, x = (c % kChunksPerRow) * kChunk;
      *reinterpret_cast<uint4*>(smem + o * ld + x) = regs[i];
    }
  }
};

constexpr int round_up(int v, int to) { return (v + to - 1) / to * to; }

// Shared-memory tiles of one pass. Rows are padded by 16 bytes, which keeps chunk stores aligned
// and staggers the banks that consecutive rows start on.
template <typename T, tm_gemm_pass P>
struct Tiles {
  using S = Shape<T>;
  using L = Layout<P>;
  static constexpr int kPad = 16 / sizeof(T);
  static constexpr int kAOuter = L::kAKMajor ? S::kM : S::kK;
  static constexpr int kAContig = L::kAKMajor ? S::kK : S::kM;
  static constexpr int kBOuter = L::kBKMajor ? S::kN : S::kK;
  static constexpr int kBContig = L::kBKMajor ? S::kK : S::kN;
  static constexpr int kALd = kAContig + kPad;
  static constexpr int kBLd = kBContig + kPad;
  static constexpr int kABytes = round_up(kAOuter * kALd * sizeof(T), 128);
  static constexpr int kBBytes = round_up(kBOuter * kBLd * sizeof(T), 128);
  using ALoader = TileLoader<T, kAOuter, kAContig, S::kThreads>;
  using BLoader = TileLoader<T, kBOuter, kBContig, S::kThreads>;

  // Offsets of element (m, kk) of the A tile and (kk, n) of the B tile.
  __device__ static constexpr int a_at(int m, int kk) {
    return L::kAKMajor ? m * kALd + kk : kk * kALd + m;
  }
  __device__ static constexpr int b_at(int kk, int n) {
    return L::kBKMajor ? n * kBLd + kk : kk * kBLd + n;
  }
};

// float32 (or any T) on CUDA cores: thread (tm, tn) owns rows tm + 16 i and columns tn + 16 j.
template <typename T, tm_gemm_pass P>
struct SimtMath {
  using S = Shape<T>;
  using X = Tiles<T, P>;
  static constexpr int kI = S::kM / 16, kJ = S::kN / 16;
  static constexpr int kScratchBytes = 0;
  static_assert(S::kThreads == 256, "the micro-tiles assume a 16 x 16 thread grid");
  float acc[kI][kJ];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < kI; ++i) {
#pragma unroll
      for (int j = 0; j < kJ; ++j) acc[i][j] = 0.0f;
    }
  }

  __device__ __forceinline__ void multiply(const T* as, const T* bs) {
    const int tm = threadIdx.x / 16, tn = threadIdx.x % 16;
#pragma unroll
    for (int kk = 0; kk < S::kK; ++kk) {
      float a[kI], b[kJ];
#pragma unroll
      for (int i = 0; i < kI; ++i) a[i] = cuda::load(as + X::a_at(tm + 16 * i, kk));
#pragma unroll
      for (int j = 0; j < kJ; ++j) b[j] = cuda::load(bs + X::b_at(kk, tn + 16 * j));
#pragma unroll
      for (int i = 0; i < kI; ++i) {
#pragma unroll
        for (int j = 0; j < kJ; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
      }
    }
  }

  template <typename Out>
  __device__ __forceinline__ void store(Out* c, int64_t ldc, int64_t valid_m, int64_t valid_n,
                                        unsigned char*) const {
    const int tm = threadIdx.x / 16, tn = threadIdx.x % 16;
#pragma unroll
    for (int i = 0; i < kI; ++i) {
#pragma unroll
      for (int j = 0; j < kJ; ++j) {
        const int m = tm + 16 * i, n = tn + 16 * j;
        if (m < valid_m && n < valid_n) cuda::store(c + m * ldc + n, acc[i][j]);
      }
    }
  }
};

// bf16 on tensor cores. Warp (wm, wn) owns rows wm*64 .. +64 and columns wn*32 .. +32.
template <tm_gemm_pass P>
struct WmmaMath {
  using T = __nv_bfloat16;
  using S = Shape<T>;
  using L = Layout<P>;
  using X = Tiles<T, P>;
  using ALayout = std::conditional_t<L::kAKMajor, nvcuda::wmma::row_major, nvcuda::wmma::col_major>;
  using BLayout = std::conditional_t<L::kBKMajor, nvcuda::wmma::col_major, nvcuda::wmma::row_major>;
  static constexpr int kI = 4, kJ = 2;
  static constexpr int kScratchBytes = S::kThreads / kWarp * 16 * 16 * sizeof(float);
  static_assert(S::kM == 2 * kI * 16 && S::kN == 4 * kJ * 16 && S::kThreads == 256,
                "warp layout must cover the CTA tile");
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> acc[kI][kJ];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < kI; ++i) {
#pragma unroll
      for (int j = 0; j < kJ; ++j) nvcuda::wmma::fill_fragment(acc[i][j], 0.0f);
    }
  }

  __device__ __forceinline__ void multiply(const T* as, const T* bs) {
    const int warp = threadIdx.x / kWarp, wm = warp / 4, wn = warp % 4;
#pragma unroll
    for (int kk = 0; kk < S::kK; kk += 16) {
      nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, T, ALayout> a[kI];
      nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, T, BLayout> b[kJ];
#pragma unroll
      for (int i = 0; i < kI; ++i) {
        nvcuda::wmma::load_matrix_sync(a[i], as + X::a_at(wm * 64 + i * 16, kk), X::kALd);
      }
#pragma unroll
      for (int j = 0; j < kJ; ++j) {
        nvcuda::wmma::load_matrix_sync(b[j], bs + X::b_at(kk, wn * 32 + j * 16), X::kBLd);
      }
#pragma unroll
      for (int i = 0; i < kI; ++i) {
#pragma unroll
        for (int j = 0; j < kJ; ++j) nvcuda::wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
      }
    }
  }

  // Each fragment goes through a per-warp 16 x 16 float buffer so that the bounds of the tile
  // can be applied element by element.
  template <typename Out>
  __device__ __forceinline__ void store(Out* c, int64_t ldc, int64_t valid_m, int64_t valid_n,
                                        unsigned char* scratch) const {
    const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
    const int wm = warp / 4, wn = warp % 4;
    float* buf = reinterpret_cast<float*>(scratch) + warp * 256;
    const int r = lane / 2, c0 = (lane % 2) * 8;
#pragma unroll
    for (int i = 0; i < kI; ++i) {
#pragma unroll
      for (int j = 0; j < kJ; ++j) {
        nvcuda::wmma::store_matrix_sync(buf, acc[i][j], 16, nvcuda::wmma::mem_row_major);
        __syncwarp();
        const int m = wm * 64 + i * 16 + r;
        for (int q = 0; q < 8; ++q) {
          const int n = wn * 32 + j * 16 + c0 + q;
          if (m < valid_m && n < valid_n) cuda::store(c + m * ldc + n, buf[r * 16 + c0 + q]);
        }
        __syncwarp();
      }
    }
  }
};

template <typename T, tm_gemm_pass P>
using Math = std::conditional_t<std::is_same_v<T, __nv_bfloat16>, WmmaMath<P>, SimtMath<T, P>>;

__device__ __forceinline__ int64_t clamp64(int64_t v, int64_t lo, int64_t hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}

// Run by warp 0: the expert and rows of row tile `tile`. out = {expert, first row, end row}, or
// expert -1 for a spare slot. Offsets are clamped into [0, rows] so that bad values cannot reach
// outside the matrices.
__device__ void find_row_tile(const int32_t* offsets, int experts, int64_t rows, int64_t tile,
                              int tile_rows, int64_t* out) {
  const int lane = threadIdx.x % kWarp;
  if (lane == 0) out[0] = -1;
  __syncwarp();
  int64_t before = 0;  // tiles of the experts already scanned
  for (int e0 = 0; e0 < experts; e0 += kWarp) {
    const int e = e0 + lane;
    int64_t begin = 0, end = 0, tiles = 0;
    if (e < experts) {
      begin = clamp64(offsets[e], 0, rows);
      end = clamp64(offsets[e + 1], begin, rows);
      tiles = (end - begin + tile_rows - 1) / tile_rows;
    }
    int64_t inclusive = tiles;
    for (int o = 1; o < kWarp; o <<= 1) {
      const int64_t v = __shfl_up_sync(kFullMask, inclusive, o);
      if (lane >= o) inclusive += v;
    }
    const int64_t first = before + inclusive - tiles;
    const bool mine = tile >= first && tile < first + tiles;
    if (mine) {
      out[0] = e;
      out[1] = begin + (tile - first) * tile_rows;
      out[2] = end;
    }
    if (__any_sync(kFullMask, mine)) return;
    before += __shfl_sync(kFullMask, inclusive, kWarp - 1);
  }
}

template <typename T>
__device__ __forceinline__ bool chunks_aligned(const void* base, int64_t ld, int64_t expert) {
  return reinterpret_cast<uintptr_t>(base) % 16 == 0 && ld * sizeof(T) % 16 == 0 &&
         expert * sizeof(T) % 16 == 0;
}

template <typename T, typename Out, tm_gemm_pass P>
__global__ void __launch_bounds__(Shape<T>::kThreads) tiled_gemm_kernel(TiledProblem p) {
  cuda::wait_for_prior_grids();
  cuda::allow_next_grid();
  using S = Shape<T>;
  using L = Layout<P>;
  using X = Tiles<T, P>;
  using M = Math<T, P>;
  __shared__ __align__(128) unsigned char smem[X::kABytes + X::kBBytes + M::kScratchBytes];
  T* as = reinterpret_cast<T*>(smem);
  T* bs = reinterpret_cast<T*>(smem + X::kABytes);

  // This CTA's tile: expert e, rows [m0, m_end) of C, columns from n0, reduction [kb, ke).
  int64_t e, m0, m_end, kb, ke;
  if constexpr (L::kGroupedRows) {
    __shared__ int64_t where[3];
    if (threadIdx.x < kWarp) {
      find_row_tile(p.offsets, p.experts, p.rows, blockIdx.x, S::kM, where);
    }
    __syncthreads();
    if (where[0] < 0) return;  // a spare slot: uniform across the CTA
    e = where[0];
    m0 = where[1];
    m_end = where[2];
    kb = 0;
    ke = p.k;
  } else {
    e = blockIdx.z;
    m0 = int64_t(blockIdx.x) * S::kM;
    m_end = p.m;
    kb = clamp64(p.offsets[e], 0, p.rows);
    ke = clamp64(p.offsets[e + 1], kb, p.rows);
  }
  const int64_t n0 = int64_t(blockIdx.y) * S::kN;
  const int64_t valid_m = m_end - m0, valid_n = p.n - n0;

  // A(m, k) = a[m * a_sm + k * a_sk], B(k, n) = b[e * b_expert + k * b_sk + n * b_sn]; the
  // stride along the contiguous dimension is 1, the other is the ld.
  const int64_t a_sm = L::kAKMajor ? p.a_ld : 1, a_sk = L::kAKMajor ? 1 : p.a_ld;
  const int64_t b_sn = L::kBKMajor ? p.b_ld : 1, b_sk = L::kBKMajor ? 1 : p.b_ld;
  const T* a_tile = static_cast<const T*>(p.a) + m0 * a_sm;
  const T* b_tile = static_cast<const T*>(p.b) + e * p.b_expert + n0 * b_sn;
  const bool a_vec = chunks_aligned<T>(p.a, p.a_ld, 0);
  const bool b_vec = chunks_aligned<T>(p.b, p.b_ld, p.b_expert);

  typename X::ALoader a_loader;
  typename X::BLoader b_loader;
  auto load = [&](int64_t k0) {
    const int64_t valid_k = ke - k0;
    const bool gathered = p.gather_pairs != nullptr;
    if (gathered && p.gather_a && L::kAKMajor) {
      // Forward, grad-input: A's tile rows are output rows.
      a_loader.load_gathered(static_cast<const T*>(p.a), p.a_ld, p.gather_pairs + m0,
                             p.gather_top_k, p.gather_src_rows, valid_m, k0, valid_k, a_vec);
    } else if (gathered && p.gather_a) {
      // Grad-weight: A's (dy's) tile rows are the reduction's, its columns start at m0.
      a_loader.load_gathered(static_cast<const T*>(p.a), p.a_ld, p.gather_pairs + k0,
                             p.gather_top_k, p.gather_src_rows, valid_k, m0, valid_m, a_vec);
    } else {
      a_loader.load(a_tile + k0 * a_sk, p.a_ld, L::kAKMajor ? valid_m : valid_k,
                    L::kAKMajor ? valid_k : valid_m, a_vec);
    }
    if (P == TM_GEMM_GRAD_WEIGHT && gathered && !p.gather_a) {
      // B's rows are the reduction's (k0 counts rows of x); its columns start at n0.
      b_loader.load_gathered(static_cast<const T*>(p.b), p.b_ld, p.gather_pairs + k0,
                             p.gather_top_k, p.gather_src_rows, valid_k, n0, valid_n, b_vec);
    } else {
      b_loader.load(b_tile + k0 * b_sk, p.b_ld, L::kBKMajor ? valid_n : valid_k,
                    L::kBKMajor ? valid_k : valid_n, b_vec);
    }
  };

  M math;
  math.zero();
  const int64_t k_tiles = (ke - kb + S::kK - 1) / S::kK;
  if (k_tiles > 0) load(kb);
  for (int64_t t = 0; t < k_tiles; ++t) {
    __syncthreads();  // the previous tile's math is done with shared memory
    a_loader.store(as, X::kALd);
    b_loader.store(bs, X::kBLd);
    __syncthreads();
    if (t + 1 < k_tiles) load(kb + (t + 1) * S::kK);
    math.multiply(as, bs);
  }
  Out* c = static_cast<Out*>(p.c) + e * p.c_expert + m0 * p.c_ld + n0;
  math.template store<Out>(c, p.c_ld, valid_m, valid_n, smem + X::kABytes + X::kBBytes);
}

// Rows [offsets[E], rows) of y / dx.
template <typename Out>
__global__ void zero_tail_rows_kernel(Out* c, int64_t ldc, int64_t rows, int64_t cols,
                                      const int32_t* offsets, int experts) {
  cuda::wait_for_prior_grids();
  cuda::allow_next_grid();
  const int64_t first = clamp64(offsets[experts], 0, rows);
  for (int64_t r = first + blockIdx.x; r < rows; r += gridDim.x) {
    for (int64_t col = threadIdx.x; col < cols; col += blockDim.x) {
      cuda::store(c + r * ldc + col, 0.0f);
    }
  }
}

constexpr int64_t kMaxGridYZ = 65535;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T, typename Out, tm_gemm_pass P>
void launch(const TiledProblem& p, cudaStream_t stream) {
  using S = Shape<T>;
  const int64_t col_tiles = ceil_div(p.n, S::kN);
  const int64_t first =
      P == TM_GEMM_GRAD_WEIGHT ? ceil_div(p.m, S::kM) : ceil_div(p.rows, S::kM) + p.experts;
  const int64_t depth = P == TM_GEMM_GRAD_WEIGHT ? p.experts : 1;
  if (col_tiles > kMaxGridYZ || depth > kMaxGridYZ || first > INT32_MAX) {
    unsupported("grouped GEMM too large for the generic CUDA kernel's grid (" +
                std::to_string(first) + " x " + std::to_string(col_tiles) + " x " +
                std::to_string(depth) + " tiles)");
  }
  const dim3 grid(static_cast<unsigned>(first), static_cast<unsigned>(col_tiles),
                  static_cast<unsigned>(depth));
  if (first > 0 && col_tiles > 0 && depth > 0) {
    cuda::launch("tiled_gemm_kernel", tiled_gemm_kernel<T, Out, P>, grid, S::kThreads, 0, stream,
                 p);
  }
  if (P != TM_GEMM_GRAD_WEIGHT && p.rows > 0 && p.n > 0) {
    const unsigned blocks = static_cast<unsigned>(p.rows < 1024 ? p.rows : 1024);
    cuda::launch("zero_tail_rows_kernel", zero_tail_rows_kernel<Out>, blocks, 256, 0, stream,
                 static_cast<Out*>(p.c), p.c_ld, p.rows, p.n, p.offsets, p.experts);
  }
}

template <typename T, typename Out>
void launch_pass(const TiledProblem& p, cudaStream_t stream) {
  switch (p.pass) {
    case TM_GEMM_FORWARD:
      return launch<T, Out, TM_GEMM_FORWARD>(p, stream);
    case TM_GEMM_GRAD_INPUT:
      return launch<T, Out, TM_GEMM_GRAD_INPUT>(p, stream);
    case TM_GEMM_GRAD_WEIGHT:
      return launch<T, Out, TM_GEMM_GRAD_WEIGHT>(p, stream);
  }
  fail(TM_ERR_INTERNAL, "launch_tiled: unknown pass " + std::to_string(p.pass));
}

}  // namespace

void launch_tiled(const TiledProblem& p, void* stream) {
  const cudaStream_t s = cuda::as_stream(stream);
  if (p.in_dtype == TM_DTYPE_FLOAT32) {
    launch_pass<float, float>(p, s);
  } else if (p.out_dtype == TM_DTYPE_FLOAT32) {
    launch_pass<__nv_bfloat16, float>(p, s);
  } else {
    launch_pass<__nv_bfloat16, __nv_bfloat16>(p, s);
  }
}

}  // namespace turbomoe::grouped_gemm
