// Host side of the Hopper grouped GEMM: coverage checks, TMA descriptors, launch.
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled (a type; the symbol comes from the runtime)

#include <array>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <string>

#include "common/cuda_utils.cuh"
#include "common/launch.cuh"
#include "grouped_gemm/grouped_gemm.h"
#include "grouped_gemm/hopper_gemm.h"
#include "grouped_gemm/hopper_gemm_kernel.cuh"
#include "grouped_gemm/hopper_gemm_pingpong.cuh"

namespace turbomoe {
namespace {

using hopper_gemm::Params;
using hopper_gemm::Pass;

bool disabled_by_env() {
  static const bool disabled = [] {
    const char* v = std::getenv("TURBOMOE_DISABLE_HOPPER_GEMM");
    return v != nullptr && v[0] != '\0' && v[0] != '0';
  }();
  return disabled;
}

// cuTensorMapEncodeTiled through the runtime's driver entry point, so that the library needs no
// link against libcuda. Null when the driver does not provide it.
PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static const PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult query{};
    const cudaError_t err = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000,
                                                             cudaEnableDefault, &query);
    if (err != cudaSuccess || query != cudaDriverEntryPointSuccess) {
      cudaGetLastError();  // do not leave the failure for the next launch check to find
      return static_cast<PFN_cuTensorMapEncodeTiled_v12000>(nullptr);
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(p);
  }();
  return fn;
}

bool aligned(const void* p, uintptr_t bytes) {
  return (reinterpret_cast<uintptr_t>(p) % bytes) == 0;
}

// A CUDA bf16 tensor of rank `ndim` that TMA can read: unit last-dim stride, 16-byte aligned
// base and 16-byte multiple strides.
bool tma_operand(const tm_tensor& t, int ndim) {
  if (t.device_type != TM_DEVICE_CUDA || t.dtype != TM_DTYPE_BFLOAT16 || t.ndim != ndim) {
    return false;
  }
  if (t.strides[ndim - 1] != 1 || !aligned(t.data, 16)) return false;
  for (int d = 0; d < ndim; ++d) {
    if (t.sizes[d] <= 0 || t.sizes[d] >= (int64_t{1} << 31)) return false;
  }
  for (int d = 0; d + 1 < ndim; ++d) {
    if (t.strides[d] <= 0 || t.strides[d] % 8 != 0) return false;
  }
  return true;
}

// An output the epilogue can write with paired (2-element) stores.
bool pair_store_output(const tm_tensor& t, int ndim) {
  if (t.device_type != TM_DEVICE_CUDA || t.ndim != ndim) return false;
  if (t.dtype != TM_DTYPE_BFLOAT16 && t.dtype != TM_DTYPE_FLOAT32) return false;
  const size_t elem = t.dtype == TM_DTYPE_FLOAT32 ? 4 : 2;
  if (t.strides[ndim - 1] != 1 || !aligned(t.data, 2 * elem)) return false;
  if (t.sizes[ndim - 1] % 2 != 0) return false;
  for (int d = 0; d + 1 < ndim; ++d) {
    if (t.strides[d] % 2 != 0) return false;
  }
  return true;
}

bool offsets_ok(const tm_tensor& o, int64_t* num_experts) {
  if (o.device_type != TM_DEVICE_CUDA || o.dtype != TM_DTYPE_INT32 || o.ndim != 1) return false;
  if (o.sizes[0] < 2 || (o.sizes[0] > 1 && o.strides[0] != 1)) return false;
  *num_experts = o.sizes[0] - 1;
  return *num_experts <= hopper_gemm::kMaxExperts;
}

// The per-device records (shared-memory attributes, resident clusters, bound contexts) cover
// device indices below this; others are served without a record.
constexpr int kMaxCachedDevices = 64;

// The tensor-map encoder is a driver API call: it needs the device's context current on the
// calling thread. The runtime binds it lazily, at the first call of the thread that needs it, and
// DeviceGuard skips cudaSetDevice when the device is already the current one, so a fresh thread
// whose first CUDA work is this GEMM (autograd's backward worker, when the op's backward runs
// first) reached the encoder without a context: CUDA_ERROR_INVALID_CONTEXT (201), found by the
// GPU tests. cudaSetDevice makes the primary context current (CUDA 12+); once a thread and device.
void bind_context(int device) {
  thread_local std::array<bool, kMaxCachedDevices> bound{};
  const bool cached = device >= 0 && device < kMaxCachedDevices;
  if (cached && bound[static_cast<size_t>(device)]) return;
  cuda::check(cudaSetDevice(device), "cudaSetDevice");
  if (cached) bound[static_cast<size_t>(device)] = true;
}

// Device checks: Hopper (the kernels are built for sm_90a only) and the caller's device.
// sm_count: the SMs the persistent grid may use (all of them less tm_set_gemm_sm_margin's, at
// least one).
bool device_ok(int device, int* sm_count) {
  int major = 0;
  cuda::check(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device),
              "cudaDeviceGetAttribute");
  if (major != 9) return false;
  bind_context(device);
  cuda::check(cudaDeviceGetAttribute(sm_count, cudaDevAttrMultiProcessorCount, device),
              "cudaDeviceGetAttribute");
  const int usable = *sm_count - grouped_gemm::sm_margin();
  *sm_count = usable > 1 ? usable : 1;
  return true;
}

// A row-major bf16 tensor of rank 2 or 3 (dims innermost first, strides in elements of the
// outer dims) as a TMA map with the 128-byte swizzle.
CUtensorMap make_map(const void* data, int rank, const uint64_t* dims, const uint64_t* strides,
                     const uint32_t* box) {
  CUtensorMap map{};
  cuuint64_t global_dims[3];
  cuuint64_t global_strides[2];
  cuuint32_t box_dims[3];
  cuuint32_t element_strides[3] = {1, 1, 1};
  for (int d = 0; d < rank; ++d) {
    global_dims[d] = dims[d];
    box_dims[d] = box[d];
  }
  for (int d = 0; d + 1 < rank; ++d) global_strides[d] = strides[d] * 2;  // bytes
  const CUresult res = tensor_map_encoder()(
      &map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, static_cast<cuuint32_t>(rank),
      const_cast<void*>(data), global_dims, global_strides, box_dims, element_strides,
      CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
      CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (res != CUDA_SUCCESS) {
    fail(TM_ERR_CUDA, "cuTensorMapEncodeTiled failed with CUresult " + std::to_string(res));
  }
  return map;
}

// A row-major [rows, cols] bf16 matrix read or written as boxes of `box_rows` rows by 64 columns.
CUtensorMap matrix_map(const tm_tensor& t, uint32_t box_rows) {
  const uint64_t dims[2] = {static_cast<uint64_t>(t.sizes[1]), static_cast<uint64_t>(t.sizes[0])};
  const uint64_t strides[1] = {static_cast<uint64_t>(t.strides[0])};
  const uint32_t box[2] = {64, box_rows};
  return make_map(t.data, 2, dims, strides, box);
}

// A per-expert [E, rows, cols] bf16 tensor (w, dw) as boxes of `box_rows` rows by 64 columns of
// one expert.
CUtensorMap expert_map(const tm_tensor& t, uint32_t box_rows) {
  const uint64_t dims[3] = {static_cast<uint64_t>(t.sizes[2]), static_cast<uint64_t>(t.sizes[1]),
                            static_cast<uint64_t>(t.sizes[0])};
  const uint64_t strides[2] = {static_cast<uint64_t>(t.strides[1]),
                               static_cast<uint64_t>(t.strides[0])};
  const uint32_t box[3] = {64, box_rows, 1};
  return make_map(t.data, 3, dims, strides, box);
}

// The persistent grid of a forward-like pass: no more CTAs than the most tiles `cols` output
// columns can make (every expert's row blocks of `block_rows`, one partial block each, plus the
// unrouted rows), `tiles_per_cta` at a time (the ping-pong kernel's CTA runs two at once).
int row_pass_grid(int64_t m, int64_t num_experts, int64_t cols, int tile_cols, int sm_count,
                  int block_rows = hopper_gemm::kBlockM, int tiles_per_cta = 1) {
  const int64_t n_blocks = hopper_gemm::ceil_div(static_cast<int>(cols), tile_cols);
  const int64_t max_tiles = (m / block_rows + num_experts + 1) * n_blocks;
  const int64_t ctas = (max_tiles + tiles_per_cta - 1) / tiles_per_cta;
  return static_cast<int>(ctas < sm_count ? ctas : sm_count);
}

// Variant switches for A/B timing (read at every call, so that a benchmark can flip them):
//   TURBOMOE_HOPPER_GEMM_EPILOGUE = tma | split | quarter | direct | deferred
//                                   (see hopper_gemm_layout.cuh);
//                                   unset: split for the row passes, quarter for
//                                   grad-weight (chosen_epilogue)
//   TURBOMOE_HOPPER_GEMM_SKIP_HALVES = 1 (default) | 0
//   TURBOMOE_HOPPER_GEMM_TRIM_TAIL = 1 (default) | 0
//   TURBOMOE_HOPPER_GEMM_BALANCE_DW = 1 (default) | 0
//   TURBOMOE_HOPPER_GEMM_CLUSTER_DW = 0 (default) | 1 (grad-weight in 2-CTA clusters)
//   TURBOMOE_HOPPER_GEMM_CLUSTER_ROWS = 0 (default) | 1 (forward, grad-input in 2-CTA clusters)
//   TURBOMOE_HOPPER_GEMM_PACE_ZEROS = 1 (default) | 0 (grad-weight's zero tiles all at the start)
//   TURBOMOE_HOPPER_GEMM_PINGPONG = 0 (default) | 1 (forward, grad-input: the ping-pong kernel)
bool env_is(const char* name, const char* value) {
  const char* v = std::getenv(name);
  return v != nullptr && std::strcmp(v, value) == 0;  // no allocation: read at every launch
}

// Raises `kernel`'s dynamic shared-memory limit to at least `smem` bytes on the current device.
// The attribute call costs microseconds of host time and a training step launches hundreds of
// GEMMs, so `known` (the caller's per-kernel, per-device record; null: no record) remembers the
// largest value set so far.
template <typename Kernel>
void ensure_smem_limit(Kernel kernel, int smem, std::atomic<int>* known) {
  if (known != nullptr && known->load(std::memory_order_relaxed) >= smem) return;
  cuda::check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem),
              "cudaFuncSetAttribute");
  if (known == nullptr) return;
  int seen = known->load(std::memory_order_relaxed);
  while (seen < smem && !known->compare_exchange_weak(seen, smem)) {
  }
}

// `device`: the current device (the caller's guard has set it), which keys the attribute record.
// With kCluster > 1, `grid` is a multiple of kCluster (cluster_grid).
template <Pass P, typename OutT, int kEpi, int kCluster = 1, int kGather = hopper_gemm::kGatherNone>
void launch(const CUtensorMap& a, const CUtensorMap& b, const CUtensorMap& out, const Params& p,
            int grid, int device, cudaStream_t stream) {
  auto kernel = hopper_gemm::grouped_gemm_kernel<P, OutT, kEpi, kCluster, kGather>;
  const int smem = hopper_gemm::Layout<kEpi>::smem_bytes(p.num_experts);
  // A static of this instantiation: one record per kernel (all of them share one type).
  static std::array<std::atomic<int>, kMaxCachedDevices> configured{};
  ensure_smem_limit(kernel, smem,
                    device >= 0 && device < kMaxCachedDevices ? &configured[device] : nullptr);
  if constexpr (kCluster == 1) {
    cuda::launch("hopper grouped_gemm_kernel", kernel, grid, hopper_gemm::kThreads, smem, stream, a,
                 b, out, p);
  } else {
    cuda::launch_clusters("hopper grouped_gemm_kernel (clusters)", kernel, kCluster, grid,
                          hopper_gemm::kThreads, smem, stream, a, b, out, p);
  }
}

// The persistent grid of a kCluster-CTA kernel: as many whole clusters as can be resident at
// once (clusters must fit in one GPC, so this can be below sm_count / kCluster) and no more than
// there are cluster tiles. 0 when no cluster fits.
template <Pass P, int kEpi, int kCluster>
int cluster_grid(int sm_count, int num_experts, int64_t cluster_tiles, int device,
                 cudaStream_t stream) {
  auto kernel =
      hopper_gemm::grouped_gemm_kernel<P, __nv_bfloat16, kEpi, kCluster, hopper_gemm::kGatherNone>;
  const int smem = hopper_gemm::Layout<kEpi>::smem_bytes(num_experts);
  static std::array<std::atomic<int>, kMaxCachedDevices> configured{};
  ensure_smem_limit(kernel, smem,
                    device >= 0 && device < kMaxCachedDevices ? &configured[device] : nullptr);
  // Resident clusters per device, asked once (the answer depends on the device only: one CTA an
  // SM at this shared-memory size whatever the expert count).
  static std::array<std::atomic<int>, kMaxCachedDevices> resident{};
  int clusters = device >= 0 && device < kMaxCachedDevices
                     ? resident[device].load(std::memory_order_relaxed)
                     : 0;
  if (clusters <= 0) {
    std::array<cudaLaunchAttribute, 2> attrs{};
    const int full = (sm_count / kCluster) * kCluster;
    const cudaLaunchConfig_t config =
        cuda::launch_config(dim3(full > 0 ? full : kCluster), dim3(hopper_gemm::kThreads),
                            static_cast<size_t>(smem), stream, kCluster, false, &attrs);
    cuda::check(cudaOccupancyMaxActiveClusters(&clusters, kernel, &config),
                "cudaOccupancyMaxActiveClusters");
    if (device >= 0 && device < kMaxCachedDevices) resident[device].store(clusters);
  }
  int64_t n = clusters < sm_count / kCluster ? clusters : sm_count / kCluster;
  if (cluster_tiles < n) n = cluster_tiles;
  return static_cast<int>(n) * kCluster;
}

void apply_variant_switches(Params* p) {
  p->skip_empty_halves = env_is("TURBOMOE_HOPPER_GEMM_SKIP_HALVES", "0") ? 0 : 1;
  p->trim_tail = env_is("TURBOMOE_HOPPER_GEMM_TRIM_TAIL", "0") ? 0 : 1;
  p->balance_grad_weight = env_is("TURBOMOE_HOPPER_GEMM_BALANCE_DW", "0") ? 0 : 1;
  p->pace_zero_tiles = env_is("TURBOMOE_HOPPER_GEMM_PACE_ZEROS", "0") ? 0 : 1;
}

// Whether TURBOMOE_HOPPER_GEMM_EPILOGUE is unset or "tma": the gathered kernels (launch_gathered)
// store through the whole-box TMA epilogue then, and through the direct one otherwise.
bool whole_box_or_unset() {
  const char* v = std::getenv("TURBOMOE_HOPPER_GEMM_EPILOGUE");
  return v == nullptr || v[0] == '\0' || std::strcmp(v, "tma") == 0;
}

// The epilogue of a bf16 pass whose output TMA can store into: TURBOMOE_HOPPER_GEMM_EPILOGUE when
// set; by default split for the forward and grad-input (4 stages; 2-10% faster than the whole-box
// epilogue on an H100, 32k rows, model routing) and quarter for the grad-weight (4 stages and the
// zero box its paced zero tiles need, which the split layout has no room for; 6-7% faster on an
// H200, sixteenth session). Split needs E <= kMaxExpertsSplit and falls back to the whole box.
template <Pass P>
int chosen_epilogue(int num_experts) {
  const char* v = std::getenv("TURBOMOE_HOPPER_GEMM_EPILOGUE");
  const int split = num_experts <= hopper_gemm::kMaxExpertsSplit ? hopper_gemm::kEpiTmaSplit
                                                                 : hopper_gemm::kEpiTma;
  if (v == nullptr || v[0] == '\0') {
    return P == Pass::kGradWeight ? hopper_gemm::kEpiTmaQuarter : split;
  }
  if (std::strcmp(v, "split") == 0) return split;
  if (std::strcmp(v, "quarter") == 0) return hopper_gemm::kEpiTmaQuarter;
  if (std::strcmp(v, "deferred") == 0) return hopper_gemm::kEpiTmaDeferred;
  if (std::strcmp(v, "direct") == 0) return hopper_gemm::kEpiDirect;
  return hopper_gemm::kEpiTma;
}

// out_map is null when the output cannot be written by TMA (fp32, or misaligned rows).
template <Pass P>
void launch_out(int32_t out_dtype, const CUtensorMap& a, const CUtensorMap& b,
                const CUtensorMap* out_map, Params p, int grid, int device, cudaStream_t stream) {
  apply_variant_switches(&p);
  if (out_dtype == TM_DTYPE_FLOAT32) {
    launch<P, float, hopper_gemm::kEpiDirect>(a, b, a, p, grid, device, stream);
    return;
  }
  switch (out_map == nullptr ? hopper_gemm::kEpiDirect : chosen_epilogue<P>(p.num_experts)) {
    case hopper_gemm::kEpiDirect:
      launch<P, __nv_bfloat16, hopper_gemm::kEpiDirect>(a, b, a, p, grid, device, stream);
      break;
    case hopper_gemm::kEpiTmaSplit:
      launch<P, __nv_bfloat16, hopper_gemm::kEpiTmaSplit>(a, b, *out_map, p, grid, device, stream);
      break;
    case hopper_gemm::kEpiTmaQuarter:
      launch<P, __nv_bfloat16, hopper_gemm::kEpiTmaQuarter>(a, b, *out_map, p, grid, device,
                                                            stream);
      break;
    case hopper_gemm::kEpiTmaDeferred:
      launch<P, __nv_bfloat16, hopper_gemm::kEpiTmaDeferred>(a, b, *out_map, p, grid, device,
                                                             stream);
      break;
    default:
      launch<P, __nv_bfloat16, hopper_gemm::kEpiTma>(a, b, *out_map, p, grid, device, stream);
  }
}

// A bf16 output that TMA can store into: 16-byte aligned base and row strides.
bool tma_storable(const tm_tensor& t) {
  if (t.dtype != TM_DTYPE_BFLOAT16 || !aligned(t.data, 16)) return false;
  for (int d = 0; d + 1 < t.ndim; ++d) {
    if (t.strides[d] % 8 != 0) return false;
  }
  return true;
}

// A grad-weight pass into dw [E, N, K] over M rows: its parameters (operands aside), its
// persistent grid (no more CTAs than tiles) and, where TMA can store dw, the output map.
struct GradWeightLaunch {
  Params p{};
  int64_t tiles = 0;  // output tiles (128 x 256) over all experts
  int grid = 0;
  bool tma_out = false;
  CUtensorMap map_out{};
};
GradWeightLaunch grad_weight_launch(const tm_tensor& dw, const tm_tensor& expert_offsets, int64_t m,
                                    int64_t num_experts, int sm_count) {
  const int64_t n = dw.sizes[1];
  const int64_t k = dw.sizes[2];
  GradWeightLaunch l;
  l.p.offsets = static_cast<const int32_t*>(expert_offsets.data);
  l.p.out = dw.data;
  l.p.out_row_stride = dw.strides[1];
  l.p.out_expert_stride = dw.strides[0];
  l.p.num_experts = static_cast<int32_t>(num_experts);
  l.p.m = static_cast<int32_t>(m);
  l.p.reduce = 0;
  l.p.out_rows = static_cast<int32_t>(n);
  l.p.out_cols = static_cast<int32_t>(k);
  l.tiles = num_experts * hopper_gemm::ceil_div(static_cast<int>(n), hopper_gemm::kBlockM) *
            hopper_gemm::ceil_div(static_cast<int>(k), hopper_gemm::kBlockN);
  l.grid = static_cast<int>(l.tiles < sm_count ? l.tiles : sm_count);
  l.tma_out = tma_storable(dw);
  if (l.tma_out) l.map_out = expert_map(dw, 64);
  return l;
}

// The gathered-operand kernels (kGather): float32 or bf16 through the direct epilogue, or bf16
// through the default TMA one.
template <Pass P, int kGather>
void launch_gathered(int32_t out_dtype, const CUtensorMap& a, const CUtensorMap& b,
                     const CUtensorMap* out_map, Params p, int grid, int device,
                     cudaStream_t stream) {
  apply_variant_switches(&p);
  if (out_dtype == TM_DTYPE_FLOAT32) {
    launch<P, float, hopper_gemm::kEpiDirect, 1, kGather>(a, b, a, p, grid, device, stream);
  } else if (out_map == nullptr || !whole_box_or_unset()) {
    launch<P, __nv_bfloat16, hopper_gemm::kEpiDirect, 1, kGather>(a, b, a, p, grid, device, stream);
  } else {
    launch<P, __nv_bfloat16, hopper_gemm::kEpiTma, 1, kGather>(a, b, *out_map, p, grid, device,
                                                               stream);
  }
}

// The gathered operand's source in the kernel's parameters.
void set_gather(Params* p, const tm_tensor& src, const tm_tensor& sorted_pairs, int64_t top_k) {
  p->gather_pairs = static_cast<const int32_t*>(sorted_pairs.data);
  p->gather_src = src.data;
  p->gather_src_stride = src.strides[0];
  p->gather_src_rows = static_cast<int32_t>(src.sizes[0]);
  p->gather_top_k = static_cast<int32_t>(top_k);
}

bool gather_declined() { return disabled_by_env() || env_is("TURBOMOE_HOPPER_GEMM_GATHER", "0"); }

// Whether every tensor of `rest` lives on `first`'s device.
bool on_one_device(const tm_tensor& first, std::initializer_list<const tm_tensor*> rest) {
  for (const tm_tensor* t : rest) {
    if (t->device_index != first.device_index) return false;
  }
  return true;
}

// A gathered operand's tensors: src [T, K] bf16 (16-byte row copies: K a multiple of 8),
// sorted_pairs int32 with at least `rows` entries, top_k in [1, 2^31).
bool gather_operands_ok(const tm_tensor& src, const tm_tensor& sorted_pairs, int64_t top_k,
                        int64_t rows) {
  return tma_operand(src, 2) && src.sizes[1] % 8 == 0 &&
         sorted_pairs.device_type == TM_DEVICE_CUDA && sorted_pairs.dtype == TM_DTYPE_INT32 &&
         sorted_pairs.ndim == 1 && (sorted_pairs.sizes[0] <= 1 || sorted_pairs.strides[0] == 1) &&
         sorted_pairs.sizes[0] >= rows && top_k >= 1 && top_k <= INT32_MAX &&
         sorted_pairs.device_index == src.device_index;
}

// Row passes in 2-CTA clusters (opt-in until measured faster: TURBOMOE_HOPPER_GEMM_CLUSTER_ROWS=1):
// bf16 outputs through the split or the whole-box TMA epilogue (chosen_epilogue).
bool row_pairs_wanted(int32_t out_dtype, bool tma_out, int epilogue) {
  return env_is("TURBOMOE_HOPPER_GEMM_CLUSTER_ROWS", "1") && out_dtype == TM_DTYPE_BFLOAT16 &&
         tma_out && (epilogue == hopper_gemm::kEpiTma || epilogue == hopper_gemm::kEpiTmaSplit);
}

// Launches a row pass in 2-CTA clusters (hopper_gemm_kernel.cuh, kRowPairs): A as 64-row boxes
// and the forward's weights as 128-row boxes, so that either operand can be loaded by halves.
// False when no cluster fits on the device (the caller then launches one CTA a tile).
template <Pass P>
bool launch_row_pairs(const tm_tensor& a, const tm_tensor& w, const CUtensorMap& map_out, Params p,
                      bool split, int sm_count, int device, cudaStream_t stream) {
  constexpr int kPair = 2;
  const int64_t tiles = row_pass_grid(p.m, p.num_experts, p.out_cols, hopper_gemm::kBlockN,
                                      INT32_MAX);  // the most tiles the pass can make
  const int64_t pairs = (tiles + 1) / kPair;
  const int grid = split ? cluster_grid<P, hopper_gemm::kEpiTmaSplit, kPair>(
                               sm_count, p.num_experts, pairs, device, stream)
                         : cluster_grid<P, hopper_gemm::kEpiTma, kPair>(sm_count, p.num_experts,
                                                                        pairs, device, stream);
  if (grid <= 0) return false;
  const CUtensorMap map_a = matrix_map(a, 64);
  const CUtensorMap map_b = expert_map(w, P == Pass::kForward ? hopper_gemm::kBlockN / 2 : 64);
  apply_variant_switches(&p);
  if (split) {
    launch<P, __nv_bfloat16, hopper_gemm::kEpiTmaSplit, kPair>(map_a, map_b, map_out, p, grid,
                                                               device, stream);
  } else {
    launch<P, __nv_bfloat16, hopper_gemm::kEpiTma, kPair>(map_a, map_b, map_out, p, grid, device,
                                                          stream);
  }
  return true;
}

// The ping-pong kernel for a row pass (opt-in until measured faster:
// TURBOMOE_HOPPER_GEMM_PINGPONG=1): bf16 outputs that TMA can store, through the quarter epilogue
// (5 stages) when that is the one chosen, else the split one (4 stages).
bool pingpong_wanted(int32_t out_dtype, bool tma_out) {
  return env_is("TURBOMOE_HOPPER_GEMM_PINGPONG", "1") && out_dtype == TM_DTYPE_BFLOAT16 && tma_out;
}

template <Pass P, int kEpi>
void launch_pingpong(const CUtensorMap& a, const CUtensorMap& b, const CUtensorMap& out,
                     const Params& p, int grid, int device, cudaStream_t stream) {
  auto kernel = hopper_gemm::pingpong_row_kernel<P, kEpi>;
  const int smem = hopper_gemm::PingPongLayout<kEpi>::smem_bytes(p.num_experts);
  static std::array<std::atomic<int>, kMaxCachedDevices> configured{};
  ensure_smem_limit(kernel, smem,
                    device >= 0 && device < kMaxCachedDevices ? &configured[device] : nullptr);
  cuda::launch("hopper pingpong_row_kernel", kernel, grid, hopper_gemm::kThreads, smem, stream, a,
               b, out, p);
}

// A row pass through the ping-pong kernel: A as 64-row boxes (one tile's rows), B as the
// cooperative kernel reads it.
template <Pass P>
void run_pingpong(const tm_tensor& a, const tm_tensor& w, const CUtensorMap& map_out, Params p,
                  int epilogue, int sm_count, int device, cudaStream_t stream) {
  const CUtensorMap map_a = matrix_map(a, hopper_gemm::kPingRows);
  const CUtensorMap map_b = expert_map(w, P == Pass::kForward ? hopper_gemm::kBlockN : 64);
  const int grid = row_pass_grid(p.m, p.num_experts, p.out_cols, hopper_gemm::kBlockN, sm_count,
                                 hopper_gemm::kPingRows, hopper_gemm::kConsumers);
  if (epilogue == hopper_gemm::kEpiTmaQuarter) {
    launch_pingpong<P, hopper_gemm::kEpiTmaQuarter>(map_a, map_b, map_out, p, grid, device, stream);
  } else {
    launch_pingpong<P, hopper_gemm::kEpiTmaSplit>(map_a, map_b, map_out, p, grid, device, stream);
  }
}

// The token gather of a row pass: A's row r is src[sorted_pairs[r] / top_k] (null: no gather).
struct RowGather {
  const tm_tensor* sorted_pairs = nullptr;
  int64_t top_k = 0;
};

// Shared by forward and grad-input: a = [M, R] activations (R the reduction) or, with `gather`,
// the token rows src [T, R] that A's rows are gathered from (kGatherA); w [E, N, K], out [M, C].
// The grid never exceeds the largest possible tile count.
template <Pass P>
bool run_row_pass(const tm_tensor& a, const RowGather& gather, const tm_tensor& w,
                  const tm_tensor& offsets, const tm_tensor& out, void* stream) {
  const bool gathered = gather.sorted_pairs != nullptr;
  if (gathered ? gather_declined() : disabled_by_env()) return false;
  int64_t num_experts = 0;
  if (!tma_operand(w, 3) || !pair_store_output(out, 2) || !offsets_ok(offsets, &num_experts) ||
      w.sizes[0] != num_experts) {
    return false;
  }
  const int64_t m = out.sizes[0];
  const int64_t n = w.sizes[1];
  const int64_t k = w.sizes[2];
  const int64_t reduce = P == Pass::kForward ? k : n;
  const int64_t cols = P == Pass::kForward ? n : k;
  // Gathered rows are copied 16 bytes at a time: aligned base and row stride, whole 8-element
  // chunks (gather_operands_ok).
  const bool a_ok = gathered ? gather_operands_ok(a, *gather.sorted_pairs, gather.top_k, m)
                             : tma_operand(a, 2) && a.sizes[0] == m;
  if (!a_ok || a.sizes[1] != reduce || out.sizes[1] != cols) return false;
  if (!on_one_device(a, {&w, &out, &offsets})) return false;
  cuda::DeviceGuard guard(a.device_index);
  int sm_count = 0;
  if (!device_ok(a.device_index, &sm_count) || tensor_map_encoder() == nullptr) return false;

  // One CTA a tile reads w[e], forward, as 256 rows of 64 K values; grad-input as four 64 x 64
  // boxes, 64 output columns (K) by 64 reduction rows (N) each (launch_row_pairs: its own maps).
  const uint32_t b_box_rows = P == Pass::kForward ? hopper_gemm::kBlockN : 64;

  Params p{};
  p.offsets = static_cast<const int32_t*>(offsets.data);
  p.out = out.data;
  p.out_row_stride = out.strides[0];
  p.out_expert_stride = 0;
  p.num_experts = static_cast<int32_t>(num_experts);
  p.m = static_cast<int32_t>(m);
  p.reduce = static_cast<int32_t>(reduce);
  p.out_rows = static_cast<int32_t>(m);
  p.out_cols = static_cast<int32_t>(cols);
  const int grid = row_pass_grid(m, num_experts, cols, hopper_gemm::kBlockN, sm_count);
  // Stored as 64 x 64 boxes: 64 columns by one consumer's 64 rows.
  CUtensorMap map_out{};
  const bool tma_out = tma_storable(out);
  if (tma_out) map_out = matrix_map(out, 64);
  const cudaStream_t s = cuda::as_stream(stream);
  if (gathered) {
    set_gather(&p, a, *gather.sorted_pairs, gather.top_k);
    const CUtensorMap map_b = expert_map(w, b_box_rows);
    // map_b stands in for the A map, which the gathered kernel does not read.
    launch_gathered<P, hopper_gemm::kGatherA>(out.dtype, map_b, map_b, tma_out ? &map_out : nullptr,
                                              p, grid, a.device_index, s);
    return true;
  }
  const int epilogue = chosen_epilogue<P>(p.num_experts);
  if (pingpong_wanted(out.dtype, tma_out)) {
    run_pingpong<P>(a, w, map_out, p, epilogue, sm_count, a.device_index, s);
  } else if (!(row_pairs_wanted(out.dtype, tma_out, epilogue) &&
               launch_row_pairs<P>(a, w, map_out, p, epilogue == hopper_gemm::kEpiTmaSplit,
                                   sm_count, a.device_index, s))) {
    const CUtensorMap map_a = matrix_map(a, hopper_gemm::kBlockM);
    const CUtensorMap map_b = expert_map(w, b_box_rows);
    launch_out<P>(out.dtype, map_a, map_b, tma_out ? &map_out : nullptr, p, grid, a.device_index,
                  s);
  }
  return true;
}

// The grad-weight dw [E, N, K] = dy_e^T . x_e with one operand's rows gathered from `src`:
// dy's (kGatherA: dy is src [T, N], x [M, K] as stored) or x's (kGatherB: dy [M, N] as stored,
// x is src [T, K]).
template <int kGather>
bool run_grad_weight_gathered(const tm_tensor& dy, const tm_tensor& x, const tm_tensor& src,
                              const tm_tensor& sorted_pairs, int64_t top_k,
                              const tm_tensor& expert_offsets, const tm_tensor& dw, void* stream) {
  if (gather_declined()) return false;
  constexpr bool kGatherDy = kGather == hopper_gemm::kGatherA;
  const tm_tensor& stored = kGatherDy ? x : dy;  // the operand TMA loads
  int64_t num_experts = 0;
  if (!tma_operand(stored, 2) || !pair_store_output(dw, 3) ||
      !offsets_ok(expert_offsets, &num_experts)) {
    return false;
  }
  const int64_t m = stored.sizes[0];
  if (!gather_operands_ok(src, sorted_pairs, top_k, m) || dy.ndim != 2 || x.ndim != 2 ||
      dw.sizes[0] != num_experts || dw.sizes[1] != dy.sizes[1] || dw.sizes[2] != x.sizes[1]) {
    return false;
  }
  if (!on_one_device(dy, {&x, &dw, &expert_offsets, &sorted_pairs})) return false;
  cuda::DeviceGuard guard(dy.device_index);
  int sm_count = 0;
  if (!device_ok(dy.device_index, &sm_count) || tensor_map_encoder() == nullptr) return false;

  // The stored operand as 64 x 64 boxes; its map stands in for the gathered operand's.
  const CUtensorMap map = matrix_map(stored, 64);
  GradWeightLaunch l = grad_weight_launch(dw, expert_offsets, m, num_experts, sm_count);
  set_gather(&l.p, src, sorted_pairs, top_k);
  launch_gathered<Pass::kGradWeight, kGather>(dw.dtype, map, map, l.tma_out ? &l.map_out : nullptr,
                                              l.p, l.grid, dy.device_index,
                                              cuda::as_stream(stream));
  return true;
}

// gate_up [M, 2I] and act [M, I] of the SwiGLU forward: bf16, rows the epilogue can store in
// pairs.
bool swiglu_outputs_ok(const tm_tensor& gate_up, const tm_tensor& act, int64_t m, int64_t inter) {
  return gate_up.dtype == TM_DTYPE_BFLOAT16 && act.dtype == TM_DTYPE_BFLOAT16 &&
         pair_store_output(gate_up, 2) && pair_store_output(act, 2) && gate_up.sizes[0] == m &&
         gate_up.sizes[1] == 2 * inter && act.sizes[0] == m && act.sizes[1] == inter;
}

}  // namespace

bool hopper_grouped_gemm_swiglu_forward(const tm_swiglu_params& params, const tm_tensor& x,
                                        const tm_tensor& w, const tm_tensor& expert_offsets,
                                        const tm_tensor& gate_up, const tm_tensor& act,
                                        void* stream) {
  // Opt-in until the fused pass measures faster than the plain forward + the activation kernel
  // (docs/perf-notes.md: the epilogue runs with both consumers stalled).
  if (disabled_by_env() || !env_is("TURBOMOE_HOPPER_GEMM_SWIGLU", "1")) return false;
  int64_t num_experts = 0;
  if (!tma_operand(x, 2) || !tma_operand(w, 3) || !offsets_ok(expert_offsets, &num_experts) ||
      w.sizes[0] != num_experts) {
    return false;
  }
  const int64_t m = x.sizes[0];
  const int64_t k = x.sizes[1];
  const int64_t n = w.sizes[1];
  const int64_t inter = n / 2;
  // Whole 64-column boxes of gate and of up: a box never straddles the two halves.
  if (w.sizes[2] != k || n % 2 != 0 || inter % 64 != 0 ||
      !swiglu_outputs_ok(gate_up, act, m, inter)) {
    return false;
  }
  if (!on_one_device(x, {&w, &gate_up, &act, &expert_offsets})) return false;
  cuda::DeviceGuard guard(x.device_index);
  int sm_count = 0;
  if (!device_ok(x.device_index, &sm_count) || tensor_map_encoder() == nullptr) return false;

  // 128 gate rows and 128 up rows a stage, 64 K values each.
  const CUtensorMap map_a = matrix_map(x, hopper_gemm::kBlockM);
  const CUtensorMap map_b = expert_map(w, hopper_gemm::kBlockN / 2);

  Params p{};
  p.offsets = static_cast<const int32_t*>(expert_offsets.data);
  p.out = gate_up.data;
  p.out_row_stride = gate_up.strides[0];
  p.out2 = act.data;
  p.out2_row_stride = act.strides[0];
  p.num_experts = static_cast<int32_t>(num_experts);
  p.m = static_cast<int32_t>(m);
  p.reduce = static_cast<int32_t>(k);
  p.out_rows = static_cast<int32_t>(m);
  p.out_cols = static_cast<int32_t>(inter);
  p.gate_rows = static_cast<int32_t>(inter);
  p.swiglu_variant = params.variant;
  p.swiglu_alpha = params.alpha;
  p.swiglu_limit = params.limit;
  p.skip_empty_halves = env_is("TURBOMOE_HOPPER_GEMM_SKIP_HALVES", "0") ? 0 : 1;
  const int grid = row_pass_grid(m, num_experts, inter,
                                 hopper_gemm::tile_cols<Pass::kForwardSwiglu>(), sm_count);
  const cudaStream_t s = cuda::as_stream(stream);
  // gate_up goes through the TMA epilogue where it can; the activation is stored from registers.
  if (tma_storable(gate_up) && !env_is("TURBOMOE_HOPPER_GEMM_EPILOGUE", "direct")) {
    const CUtensorMap map_gate_up = matrix_map(gate_up, 64);
    launch<Pass::kForwardSwiglu, __nv_bfloat16, hopper_gemm::kEpiTma>(map_a, map_b, map_gate_up, p,
                                                                      grid, x.device_index, s);
  } else {
    launch<Pass::kForwardSwiglu, __nv_bfloat16, hopper_gemm::kEpiDirect>(map_a, map_b, map_a, p,
                                                                         grid, x.device_index, s);
  }
  return true;
}

bool hopper_grouped_gemm_forward(const tm_tensor& x, const tm_tensor& w,
                                 const tm_tensor& expert_offsets, const tm_tensor& y,
                                 void* stream) {
  return run_row_pass<Pass::kForward>(x, RowGather{}, w, expert_offsets, y, stream);
}

bool hopper_grouped_gemm_forward_gathered(const tm_tensor& src, const tm_tensor& sorted_pairs,
                                          int64_t top_k, const tm_tensor& w,
                                          const tm_tensor& expert_offsets, const tm_tensor& y,
                                          void* stream) {
  return run_row_pass<Pass::kForward>(src, RowGather{&sorted_pairs, top_k}, w, expert_offsets, y,
                                      stream);
}

bool hopper_grouped_gemm_backward_input_gathered(const tm_tensor& dy_src,
                                                 const tm_tensor& sorted_pairs, int64_t top_k,
                                                 const tm_tensor& w,
                                                 const tm_tensor& expert_offsets,
                                                 const tm_tensor& dx, void* stream) {
  return run_row_pass<Pass::kGradInput>(dy_src, RowGather{&sorted_pairs, top_k}, w, expert_offsets,
                                        dx, stream);
}

bool hopper_grouped_gemm_backward_weight_gathered(const tm_tensor& dy, const tm_tensor& src,
                                                  const tm_tensor& sorted_pairs, int64_t top_k,
                                                  const tm_tensor& expert_offsets,
                                                  const tm_tensor& dw, void* stream) {
  return run_grad_weight_gathered<hopper_gemm::kGatherB>(dy, src, src, sorted_pairs, top_k,
                                                         expert_offsets, dw, stream);
}

bool hopper_grouped_gemm_backward_weight_gathered_dy(const tm_tensor& dy_src, const tm_tensor& x,
                                                     const tm_tensor& sorted_pairs, int64_t top_k,
                                                     const tm_tensor& expert_offsets,
                                                     const tm_tensor& dw, void* stream) {
  return run_grad_weight_gathered<hopper_gemm::kGatherA>(dy_src, x, dy_src, sorted_pairs, top_k,
                                                         expert_offsets, dw, stream);
}

bool hopper_grouped_gemm_backward_input(const tm_tensor& dy, const tm_tensor& w,
                                        const tm_tensor& expert_offsets, const tm_tensor& dx,
                                        void* stream) {
  return run_row_pass<Pass::kGradInput>(dy, RowGather{}, w, expert_offsets, dx, stream);
}

bool hopper_grouped_gemm_backward_weight(const tm_tensor& dy, const tm_tensor& x,
                                         const tm_tensor& expert_offsets, const tm_tensor& dw,
                                         bool leave_empty_experts, void* stream) {
  if (disabled_by_env()) return false;
  int64_t num_experts = 0;
  if (!tma_operand(dy, 2) || !tma_operand(x, 2) || !pair_store_output(dw, 3) ||
      !offsets_ok(expert_offsets, &num_experts)) {
    return false;
  }
  const int64_t m = dy.sizes[0];
  const int64_t n = dy.sizes[1];
  const int64_t k = x.sizes[1];
  if (x.sizes[0] != m || dw.sizes[0] != num_experts || dw.sizes[1] != n || dw.sizes[2] != k) {
    return false;
  }
  if (!on_one_device(dy, {&x, &dw, &expert_offsets})) return false;
  cuda::DeviceGuard guard(dy.device_index);
  int sm_count = 0;
  if (!device_ok(dy.device_index, &sm_count) || tensor_map_encoder() == nullptr) return false;

  // Both operands are read as 64 x 64 boxes: 64 output indices (N of dy, K of x) by 64 rows.
  const CUtensorMap map_a = matrix_map(dy, 64);
  const CUtensorMap map_b = matrix_map(x, 64);

  GradWeightLaunch l = grad_weight_launch(dw, expert_offsets, m, num_experts, sm_count);
  l.p.leave_empty_experts = leave_empty_experts ? 1 : 0;
  const cudaStream_t s = cuda::as_stream(stream);
  // 2-CTA clusters sharing the x operand (hopper_gemm_kernel.cuh): bf16 through the quarter
  // epilogue (the default) or the whole-box one, dw's rows in whole pairs of tiles.
  constexpr int kPair = 2;
  const int epilogue = chosen_epilogue<Pass::kGradWeight>(l.p.num_experts);
  const bool quarter = epilogue == hopper_gemm::kEpiTmaQuarter;
  if (env_is("TURBOMOE_HOPPER_GEMM_CLUSTER_DW", "1") && l.tma_out &&
      dw.dtype == TM_DTYPE_BFLOAT16 && (quarter || epilogue == hopper_gemm::kEpiTma) &&
      n % (kPair * hopper_gemm::kBlockM) == 0) {
    const int pair_grid = quarter
                              ? cluster_grid<Pass::kGradWeight, hopper_gemm::kEpiTmaQuarter, kPair>(
                                    sm_count, l.p.num_experts, l.tiles / kPair, dy.device_index, s)
                              : cluster_grid<Pass::kGradWeight, hopper_gemm::kEpiTma, kPair>(
                                    sm_count, l.p.num_experts, l.tiles / kPair, dy.device_index, s);
    if (pair_grid > 0) {
      apply_variant_switches(&l.p);
      if (quarter) {
        launch<Pass::kGradWeight, __nv_bfloat16, hopper_gemm::kEpiTmaQuarter, kPair>(
            map_a, map_b, l.map_out, l.p, pair_grid, dy.device_index, s);
      } else {
        launch<Pass::kGradWeight, __nv_bfloat16, hopper_gemm::kEpiTma, kPair>(
            map_a, map_b, l.map_out, l.p, pair_grid, dy.device_index, s);
      }
      return true;
    }
  }
  launch_out<Pass::kGradWeight>(dw.dtype, map_a, map_b, l.tma_out ? &l.map_out : nullptr, l.p,
                                l.grid, dy.device_index, s);
  return true;
}

}  // namespace turbomoe
