/*
 * turbomoe C ABI.
 *
 * The only boundary between the engine (C++20/CUDA) and its users (the Python layer through ctypes,
 * or C/C++ programs). Nothing here depends on Python or libtorch.
 *
 * Conventions
 * - Every function returns a tm_status. On failure, tm_last_error() returns a thread-local,
 *   human-readable message naming the offending argument; it stays valid until the next call
 *   into the library from the same thread.
 * - Tensors cross the boundary as tm_tensor descriptors: data pointer, dtype, device, rank, sizes
 *   and strides (in elements). Memory is always owned by the caller, outputs included. Functions
 *   that need scratch memory take (workspace, workspace_bytes) and have a *_workspace_size query.
 * - Every call takes the CUDA stream it runs on (a cudaStream_t passed as void*; NULL is the
 *   legacy default stream). CPU calls ignore it. CUDA calls never synchronise the host.
 * - All tensors of one call live on the same device. Floating tensors are float32 or bfloat16
 *   (float16 where stated); arithmetic accumulates in float32.
 * - Parameter structs start with struct_size (set it to sizeof the struct) so that the library
 *   can reject a caller compiled against a different layout.
 * - Optional tensor arguments may be NULL.
 */
#ifndef TURBOMOE_TURBOMOE_H_
#define TURBOMOE_TURBOMOE_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define TM_API __declspec(dllexport)
#else
#define TM_API __attribute__((visibility("default")))
#endif

/* Bumped whenever a signature, enum value or struct layout below changes. */
#define TM_ABI_VERSION 2

typedef enum tm_status {
  TM_OK = 0,
  TM_ERR_INVALID_ARGUMENT = 1, /* null pointer, wrong dtype, shape mismatch, bad value */
  TM_ERR_UNSUPPORTED = 2,      /* valid request this build or device cannot run */
  TM_ERR_CUDA = 3,             /* a CUDA runtime call or kernel launch failed */
  TM_ERR_OUT_OF_MEMORY = 4,    /* host allocation failed or workspace too small */
  TM_ERR_INTERNAL = 5          /* a bug in turbomoe: please report the message */
} tm_status;

typedef enum tm_dtype {
  TM_DTYPE_FLOAT32 = 1,
  TM_DTYPE_BFLOAT16 = 2,
  TM_DTYPE_FLOAT16 = 3,
  TM_DTYPE_INT32 = 4,
  TM_DTYPE_INT64 = 5
} tm_dtype;

typedef enum tm_device_type { TM_DEVICE_CPU = 1, TM_DEVICE_CUDA = 2 } tm_device_type;

#define TM_MAX_DIMS 6

typedef struct tm_tensor {
  void* data;           /* may be NULL only when the tensor has no element */
  int32_t dtype;        /* tm_dtype */
  int32_t device_type;  /* tm_device_type */
  int32_t device_index; /* CUDA ordinal; 0 for CPU */
  int32_t ndim;         /* 0 .. TM_MAX_DIMS */
  int64_t sizes[TM_MAX_DIMS];
  int64_t strides[TM_MAX_DIMS]; /* in elements, not bytes */
} tm_tensor;

/* ---------------------------------------------------------------- library */

TM_API const char* tm_last_error(void);
TM_API int32_t tm_abi_version(void);
TM_API const char* tm_version_string(void);
/* 1 when this build contains CUDA kernels, else 0. */
TM_API int32_t tm_built_with_cuda(void);
/* One line describing the build: version, compiler, CUDA version and architectures. */
TM_API const char* tm_build_info(void);

/* ---------------------------------------------------------------- routing
 * Router logits [T, E] -> per-token top-k expert ids and weights.
 *
 * TM_ROUTING_SOFTMAX_TOPK (Qwen, Mixtral, OLMoE): p = softmax(logits); ids = top-k of p;
 *   w = p[ids], divided by their sum when renormalize != 0.
 * TM_ROUTING_SIGMOID_GROUP_TOPK (DeepSeek-V3, GLM-4.5): s = sigmoid(logits); choice = s + bias;
 *   experts form n_group equal groups scored by the sum of their top-2 choice values; only the
 *   best topk_group groups compete; ids = top-k of choice among them; w = s[ids], divided by
 *   (sum + renorm_epsilon) when renormalize != 0; finally w *= routed_scaling_factor.
 * TM_ROUTING_TOPK_SOFTMAX (GPT-OSS, Granite): ids = top-k of logits; w = softmax over those k.
 *
 * Ties are broken toward the lower expert id; ids are ordered by descending selection value.
 * scores [T, E] float32 is written for the backward: softmax probabilities, sigmoid scores, or
 * the logits themselves (TOPK_SOFTMAX).
 */
typedef enum tm_routing_kind {
  TM_ROUTING_SOFTMAX_TOPK = 1,
  TM_ROUTING_SIGMOID_GROUP_TOPK = 2,
  TM_ROUTING_TOPK_SOFTMAX = 3
} tm_routing_kind;

typedef struct tm_routing_params {
  uint32_t struct_size;
  int32_t kind;                /* tm_routing_kind */
  int32_t top_k;               /* 1 .. E */
  int32_t renormalize;         /* 0 or 1 */
  int32_t n_group;             /* SIGMOID_GROUP_TOPK: groups (E % n_group == 0); 1 = no grouping */
  int32_t topk_group;          /* SIGMOID_GROUP_TOPK: groups kept, 1 .. n_group */
  float routed_scaling_factor; /* SIGMOID_GROUP_TOPK; 1 elsewhere */
  float renorm_epsilon;        /* added to the denominator of the renormalisation */
} tm_routing_params;

/* logits [T,E] f32/bf16; correction_bias [E] f32 or NULL (SIGMOID only);
 * topk_weights [T,K] f32; topk_ids [T,K] int32/int64; scores [T,E] f32. */
TM_API tm_status tm_routing_forward(const tm_routing_params* params, const tm_tensor* logits,
                                    const tm_tensor* correction_bias, tm_tensor* topk_weights,
                                    tm_tensor* topk_ids, tm_tensor* scores, void* stream);

/* grad_topk_weights [T,K] f32; scores, topk_ids from the forward; grad_logits [T,E] f32/bf16
 * (overwritten). The ids are not differentiable; the bias receives no gradient. */
TM_API tm_status tm_routing_backward(const tm_routing_params* params,
                                     const tm_tensor* grad_topk_weights, const tm_tensor* scores,
                                     const tm_tensor* topk_ids, tm_tensor* grad_logits,
                                     void* stream);

/* ---------------------------------------------------------------- permute
 * The T*K (token, slot) pairs, pair p = t*K + k, are sorted by expert id with a stable counting
 * sort. An id equal to num_experts is the "dropped" sentinel (Hugging Face's expert-parallel
 * contract: a slot owned by another rank); its pair gets no row. Ids < 0 or > num_experts are
 * rejected on CPU; on CUDA they cannot be reported without a host sync and are treated as dropped.
 *
 * sorted_pairs [T*K] int32: row r holds pair sorted_pairs[r]; rows >= expert_offsets[E] are -1.
 * pair_to_row [T*K] int32: inverse permutation; -1 for dropped pairs.
 * expert_offsets [E+1] int32: expert e owns rows [offsets[e], offsets[e+1]); offsets[0] = 0.
 */
TM_API tm_status tm_permute_plan_workspace_size(int64_t num_pairs, int64_t num_experts,
                                                int32_t device_type, size_t* bytes);
TM_API tm_status tm_permute_plan(const tm_tensor* topk_ids, int64_t num_experts,
                                 tm_tensor* sorted_pairs, tm_tensor* pair_to_row,
                                 tm_tensor* expert_offsets, void* workspace, size_t workspace_bytes,
                                 void* stream);

/* dst[r] = src[sorted_pairs[r] / top_k] for r < offsets[E]; rows >= offsets[E] are zeroed.
 * src [T,H], sorted_pairs [P] with P >= T*top_k, dst [M,H] with offsets[E] <= M <= P (M = P
 * unless the caller knows how many pairs are routed), same float dtype, rows contiguous. Pairs
 * in [T*top_k, P) name tokens past src and give zero rows: the expert-parallel dispatch pads its
 * blocks that way without a padded copy of src. */
TM_API tm_status tm_gather_rows(const tm_tensor* src, const tm_tensor* sorted_pairs,
                                const tm_tensor* expert_offsets, int64_t top_k, tm_tensor* dst,
                                void* stream);

/* out[t] = sum_k weights[t,k] * rows[pair_to_row[t*K+k]], k ascending, dropped pairs skipped.
 * weights NULL means all ones (this is the backward of tm_gather_rows). Deterministic.
 * rows [M,H], pair_to_row [T*K], weights [T,K] f32/bf16 or NULL, out [T,H]. */
TM_API tm_status tm_combine_forward(const tm_tensor* rows, const tm_tensor* pair_to_row,
                                    const tm_tensor* weights, tm_tensor* out, void* stream);

/* grad_rows[pair_to_row[t*K+k]] = weights[t,k] * grad_out[t] (rows no pair maps to are zeroed);
 * grad_weights[t,k] = <grad_out[t], rows[pair_to_row[t*K+k]]> (0 for dropped pairs).
 * weights NULL means all ones; grad_weights may be NULL (then rows may be NULL).
 * expert_offsets [E+1] int32 or NULL: when given (tm_permute_plan's), the pairs map exactly
 * onto rows [0, expert_offsets[E]), so only the rows from there on are zeroed, in the kernel's
 * own launch, instead of clearing every row before writing the mapped ones (a whole extra write
 * of grad_rows). The CPU checks that promise; on CUDA it cannot be checked without a host sync.
 */
TM_API tm_status tm_combine_backward(const tm_tensor* grad_out, const tm_tensor* rows,
                                     const tm_tensor* pair_to_row, const tm_tensor* weights,
                                     const tm_tensor* expert_offsets, tm_tensor* grad_rows,
                                     tm_tensor* grad_weights, void* stream);

/* ---------------------------------------------------------------- expert-parallel layout
 * Which tokens each rank receives when the E experts are owned in R contiguous blocks of E/R
 * (expert e lives on rank e / (E/R); num_experts must be a multiple of num_ranks). A token is
 * sent to a rank once however many of its K slots that rank owns. An id equal to num_experts is
 * the dropped sentinel (no destination). Ids < 0 or > num_experts are rejected on CPU; on CUDA
 * they cannot be reported without a host sync and are treated as dropped. Deterministic.
 *
 * topk_ids [T,K] int32/int64 (any strides).
 * rank_counts [R] int32: tokens sent to rank r (each token counted once per destination rank).
 * expert_counts [E] int32: (token, slot) pairs routed to expert e.
 * send_order [T*R] int32: the token ids for each destination rank, ascending, packed by rank:
 *   rank r's block starts at the exclusive prefix of rank_counts; entries past the total are -1.
 * token_rank_slot [T,R] int32: position of token t inside rank r's block, or -1 when t sends
 *   nothing to r.
 * The CUDA kernel (one block) covers up to 64 ranks.
 */
TM_API tm_status tm_ep_layout_workspace_size(int64_t num_tokens, int64_t num_experts,
                                             int64_t num_ranks, int32_t device_type, size_t* bytes);
TM_API tm_status tm_ep_layout(const tm_tensor* topk_ids, int64_t num_experts, int64_t num_ranks,
                              tm_tensor* rank_counts, tm_tensor* expert_counts,
                              tm_tensor* send_order, tm_tensor* token_rank_slot, void* workspace,
                              size_t workspace_bytes, void* stream);

/* The send side of the fixed-block expert-parallel exchange. Every destination rank r receives a
 * block of C = capacity rows (C >= T); row r*C + s carries the token at position s of r's block
 * (as tm_ep_layout placed it), rows past r's count are padding. A "cell" is a (token, rank) pair
 * t*R + r of the token list padded to C+1 tokens: tokens T..C are zero rows, and cell T*R feeds
 * every padding row. R is the size of rank_counts.
 * topk_ids [T,K] int32/int64, topk_weights [T,K] f32/bf16/f16; rank_counts [R], send_order
 * [T*R] and token_rank_slot [T,R] int32 are tm_ep_layout's outputs for the same ids.
 * send_pairs [(C+1)*R] int32: the cell each send row reads (T*R for padding rows, and for the R
 *   rows past R*C).
 * pair_to_row [(C+1)*R] int32: the inverse, the send row of each cell, -1 where none.
 * send_meta [R*C, 2K] float32: per send row, its K slots' expert ids local to the destination
 *   (E/R where the slot's expert lives on another rank, and on padding rows), then their routing
 *   weights (0 there). Local ids are far below 2^24, so float32 holds them exactly.
 * bad_ids [1] int32: how many ids lie outside [0, E); they are treated as dropped. Checking it
 *   costs the caller a host read, so the model path asserts on the device instead.
 * One kernel on CUDA; deterministic. */
TM_API tm_status tm_ep_send_plan(const tm_tensor* topk_ids, const tm_tensor* topk_weights,
                                 const tm_tensor* rank_counts, const tm_tensor* send_order,
                                 const tm_tensor* token_rank_slot, int64_t num_experts,
                                 int64_t capacity, tm_tensor* send_pairs, tm_tensor* pair_to_row,
                                 tm_tensor* send_meta, tm_tensor* bad_ids, void* stream);

/* Backward of send_meta's weight columns: grad_weights[t,k] = grad_meta[r*C + s, K + k] where
 * expert topk_ids[t,k] lives on rank r and token t sits at position s of r's block; 0 for ids
 * outside [0, E). grad_meta [R*C, 2K] float32 with unit last-dim stride, grad_weights [T,K]
 * f32/bf16/f16 contiguous. */
TM_API tm_status tm_ep_send_plan_backward(const tm_tensor* grad_meta, const tm_tensor* topk_ids,
                                          const tm_tensor* token_rank_slot, int64_t num_experts,
                                          int64_t capacity, tm_tensor* grad_weights, void* stream);

/* ---------------------------------------------------------------- NVLink peer exchange
 * The intranode transport of the expert-parallel exchange: every rank of one node allocates one
 * device buffer, the ranks swap CUDA IPC handles (through any side channel: the Python layer uses
 * torch.distributed) and map each other's buffers once. After that an exchange is kernels only:
 * no host synchronisation, so a step that uses it can be captured in a CUDA graph.
 *
 * Each buffer holds a data region of data_bytes plus the barrier flags. An exchange is
 *   tm_peer_barrier  (every rank is done reading the data region of the previous exchange)
 *   tm_peer_push ... (each rank writes its blocks into the peers' data regions)
 *   tm_peer_barrier  (every rank's writes have landed)
 * after which each rank reads its own data region (tm_peer_comm_data). Every rank must make the
 * same sequence of calls, like any collective. The barrier counts on the device, so replays of
 * a captured graph stay in step. A barrier that waits longer than timeout_s for a peer prints
 * which rank it waited for and traps: the process's CUDA context fails with an error instead of
 * hanging.
 *
 * The object belongs to the process that created it, one device, at most TM_PEER_MAX_RANKS
 * ranks. tm_peer_comm_destroy unmaps the peers and frees the buffer; call it only when no rank
 * will push into this rank again (after a device synchronisation and a host barrier).
 */
#define TM_PEER_HANDLE_BYTES 64
#define TM_PEER_MAX_RANKS 8
typedef struct tm_peer_comm tm_peer_comm;

/* Allocates and zeroes the buffer on `device`; 0 <= rank < world <= TM_PEER_MAX_RANKS,
 * data_bytes > 0 (rounded up to a multiple of 256). */
TM_API tm_status tm_peer_comm_create(int32_t device, int32_t rank, int32_t world, size_t data_bytes,
                                     tm_peer_comm** comm);
/* This rank's IPC handle: TM_PEER_HANDLE_BYTES bytes written to handle. */
TM_API tm_status tm_peer_comm_export(const tm_peer_comm* comm, void* handle);
/* Maps the peers' buffers: handles holds world handles of TM_PEER_HANDLE_BYTES, in rank order
 * (this rank's own entry is not opened). Once per object. */
TM_API tm_status tm_peer_comm_connect(tm_peer_comm* comm, const void* handles);
/* The start and size of this rank's data region (a device pointer, aligned to 256 bytes). */
TM_API tm_status tm_peer_comm_data(const tm_peer_comm* comm, void** data, size_t* data_bytes);
/* One launch of a single small block; timeout_s > 0. */
TM_API tm_status tm_peer_barrier(tm_peer_comm* comm, double timeout_s, void* stream);
/* src [world*block_rows, W] contiguous, on the comm's device, any dtype: block j (rows
 * j*block_rows ..) is written to rank j's data region at offset + rank*block_bytes, where
 * block_bytes = block_rows*W*element size (rank = this rank; the own block is a local copy).
 * offset and block_bytes must be multiples of 16, and offset + world*block_bytes at most
 * data_bytes. ctas (1..1024) is the number of thread blocks, i.e. the SMs the copy occupies. */
TM_API tm_status tm_peer_push(tm_peer_comm* comm, const tm_tensor* src, int64_t block_rows,
                              size_t offset, int32_t ctas, void* stream);
/* NULL is accepted. */
TM_API void tm_peer_comm_destroy(tm_peer_comm* comm);

/* ---------------------------------------------------------------- grouped GEMM
 * x [M,K] rows grouped by expert through expert_offsets [E+1] (from tm_permute_plan);
 * w [E,N,K] (the nn.Linear convention: y = x w^T). Rows >= offsets[E] of every M-sized output
 * are zeroed. w may be any strided view (e.g. a transposed [E,K,N] parameter seen as [E,N,K]);
 * CUDA kernels need w (and dw) with a unit last-dim stride, else TM_ERR_UNSUPPORTED; on CUDA the
 * offsets are not validated (that would need a host sync), only clamped into [0, M].
 */
typedef enum tm_gemm_pass {
  TM_GEMM_FORWARD = 1,    /* y = x w^T */
  TM_GEMM_GRAD_INPUT = 2, /* dx = dy w */
  TM_GEMM_GRAD_WEIGHT = 3 /* dw[e] = dy_e^T x_e */
} tm_gemm_pass;

TM_API tm_status tm_grouped_gemm_workspace_size(int32_t pass, int64_t m, int64_t n, int64_t k,
                                                int64_t num_experts, int32_t device_type,
                                                size_t* bytes);

/* y [M,N] = x [M,K] . w[e]^T per expert. */
TM_API tm_status tm_grouped_gemm_forward(const tm_tensor* x, const tm_tensor* w,
                                         const tm_tensor* expert_offsets, tm_tensor* y,
                                         void* workspace, size_t workspace_bytes, void* stream);
/* The forward with the token gather folded into the GEMM's operand load:
 * y [M,N] row r = src[sorted_pairs[r] / top_k] . w[e]^T for the rows r of expert e, i.e.
 * tm_gather_rows(src, sorted_pairs, expert_offsets, top_k, x) then tm_grouped_gemm_forward(x, ...)
 * without the permuted copy x. src [T,K], sorted_pairs int32 [P] with P >= T*top_k and
 * offsets[E] <= M <= P; pairs naming tokens past src give zero rows; rows >= offsets[E] of y are
 * zeroed. On CPU every pair below offsets[E] is checked to lie in [0, P); on CUDA (no host sync)
 * a negative pair reads as a zero row. */
TM_API tm_status tm_grouped_gemm_forward_gathered(const tm_tensor* src,
                                                  const tm_tensor* sorted_pairs, int64_t top_k,
                                                  const tm_tensor* w,
                                                  const tm_tensor* expert_offsets, tm_tensor* y,
                                                  void* stream);
/* dx [M,K] = dy [M,N] . w[e]. */
TM_API tm_status tm_grouped_gemm_backward_input(const tm_tensor* dy, const tm_tensor* w,
                                                const tm_tensor* expert_offsets, tm_tensor* dx,
                                                void* workspace, size_t workspace_bytes,
                                                void* stream);
/* The grad-input with the token gather folded into the operand load: dx [M,K] row r =
 * dy_src[sorted_pairs[r] / top_k] . w[e] for the rows r of expert e, i.e. tm_gather_rows(dy_src,
 * ...) then tm_grouped_gemm_backward_input without the permuted copy (the down projection's
 * grad-input of the lean experts, whose output gradient is per token). dy_src [T,N],
 * sorted_pairs and the rest as tm_grouped_gemm_forward_gathered's. */
TM_API tm_status tm_grouped_gemm_backward_input_gathered(const tm_tensor* dy_src,
                                                         const tm_tensor* sorted_pairs,
                                                         int64_t top_k, const tm_tensor* w,
                                                         const tm_tensor* expert_offsets,
                                                         tm_tensor* dx, void* stream);
/* SMs the persistent Hopper grouped GEMM leaves to other streams (default 0: it takes every SM).
 * Its CTAs fill whole SMs (registers and shared memory) and take tiles in a fixed order, so a
 * kernel that runs beside it (the expert-parallel exchange on its side stream) would otherwise
 * hold SMs that some of its CTAs wait for, or wait itself until the GEMM ends. Process-wide;
 * sms in [0, 1024]. The getter returns the current value. */
TM_API tm_status tm_set_gemm_sm_margin(int32_t sms);
TM_API int32_t tm_gemm_sm_margin(void);

/* The grad-weight of tm_grouped_gemm_forward_gathered's weight: dw [E,N,K] = dy_e^T . x_e with
 * x's row r = src[sorted_pairs[r] / top_k] (the rows tm_gather_rows would give), read from src
 * directly. dy [M,N], src [T,K] of dy's dtype, sorted_pairs int32 [P] with P >= T*top_k and
 * P >= M; checks as tm_grouped_gemm_forward_gathered's. */
TM_API tm_status tm_grouped_gemm_backward_weight_gathered(const tm_tensor* dy, const tm_tensor* src,
                                                          const tm_tensor* sorted_pairs,
                                                          int64_t top_k,
                                                          const tm_tensor* expert_offsets,
                                                          tm_tensor* dw, void* stream);
/* dw [E,N,K] = dy_e^T . x_e with dy's row r = dy_src[sorted_pairs[r] / top_k] (x [M,K] as
 * stored): the weight gradient of a projection whose output gradient is per token, read from
 * dy_src [T,N] directly. Checks as tm_grouped_gemm_backward_weight_gathered's. */
TM_API tm_status tm_grouped_gemm_backward_weight_gathered_dy(
    const tm_tensor* dy_src, const tm_tensor* x, const tm_tensor* sorted_pairs, int64_t top_k,
    const tm_tensor* expert_offsets, tm_tensor* dw, void* stream);
/* dw [E,N,K] = dy_e^T . x_e (overwritten; zero for experts without rows); f32 or the dtype of x. */
TM_API tm_status tm_grouped_gemm_backward_weight(const tm_tensor* dy, const tm_tensor* x,
                                                 const tm_tensor* expert_offsets, tm_tensor* dw,
                                                 void* workspace, size_t workspace_bytes,
                                                 void* stream);
/* tm_grouped_gemm_backward_weight, except that the slices dw[e] of experts without rows are the
 * caller's: they may be left unwritten (the Hopper kernel skips them) or written as zeros (the
 * other paths). With tm_zero_empty_experts on another stream, their bytes (most of dw under
 * skewed routing) need not hold up the GEMM. Same checks. */
TM_API tm_status tm_grouped_gemm_backward_weight_routed(const tm_tensor* dy, const tm_tensor* x,
                                                        const tm_tensor* expert_offsets,
                                                        tm_tensor* dw, void* workspace,
                                                        size_t workspace_bytes, void* stream);
/* out[e] = 0 for every expert e without rows (expert_offsets[e + 1] == expert_offsets[e]); the
 * other slices are not touched. out [E,N,K] contiguous, float32 or bfloat16; expert_offsets int32
 * [E+1] (on the host: validated as everywhere else). Reads the offsets on the device: no sync. */
TM_API tm_status tm_zero_empty_experts(const tm_tensor* expert_offsets, tm_tensor* out,
                                       void* stream);

/* ---------------------------------------------------------------- gated activations
 * out = act(gate) * up, element-wise over [M,I]; every tensor may be a strided 2-D view (so that
 * the halves of a fused [M,2I] gate/up buffer, concatenated or interleaved, need no copy).
 * TM_SWIGLU_SILU: silu(gate) * up.
 * TM_SWIGLU_CLAMPED (GPT-OSS): g = min(gate, limit); u = clamp(up, -limit, limit);
 *   out = (u + 1) * g * sigmoid(alpha * g).
 */
typedef enum tm_swiglu_variant { TM_SWIGLU_SILU = 1, TM_SWIGLU_CLAMPED = 2 } tm_swiglu_variant;

typedef struct tm_swiglu_params {
  uint32_t struct_size;
  int32_t variant; /* tm_swiglu_variant */
  float alpha;     /* CLAMPED only */
  float limit;     /* CLAMPED only */
} tm_swiglu_params;

TM_API tm_status tm_swiglu_forward(const tm_swiglu_params* params, const tm_tensor* gate,
                                   const tm_tensor* up, tm_tensor* out, void* stream);
TM_API tm_status tm_swiglu_backward(const tm_swiglu_params* params, const tm_tensor* grad_out,
                                    const tm_tensor* gate, const tm_tensor* up,
                                    tm_tensor* grad_gate, tm_tensor* grad_up, void* stream);

/* The routed experts' backward through the activation and the routing weight, in one pass (the
 * lean experts, python/turbomoe/ops/moe_lean.py). For row r with weight w = row_weights[r] and
 * U = grad_rows[r] (the down projection's grad-input before any weighting):
 *   act          = act(gate, up), rounded to gate's dtype (as the forward stored it)
 *   grad_weights[r] = <U, act> (float32 accumulation)
 *   weighted_act = act * w, w first rounded to act's dtype (the down projection's dW operand)
 *   grad_act     = w * U, rounded to grad_rows' dtype; grad_gate, grad_up = tm_swiglu_backward
 *                  of grad_act at (gate, up)
 * i.e. the composed tm_swiglu_forward, tm_combine_backward (K = 1), a scaling and
 * tm_swiglu_backward, with the same roundings. grad_rows, gate, up, grad_gate, grad_up,
 * weighted_act: [M,I] strided 2-D views of one floating dtype; row_weights [M] of any floating
 * dtype; grad_weights [M] float32; weighted_act may be NULL (not computed).
 */
TM_API tm_status tm_swiglu_weighted_backward(const tm_swiglu_params* params,
                                             const tm_tensor* grad_rows, const tm_tensor* gate,
                                             const tm_tensor* up, const tm_tensor* row_weights,
                                             tm_tensor* grad_gate, tm_tensor* grad_up,
                                             tm_tensor* weighted_act, tm_tensor* grad_weights,
                                             void* stream);

/* gate_up [M,2I] = x [M,K] . w[e]^T per expert (w [E,2I,K]: the I gate rows, then the I up rows)
 * and act [M,I] = the gated activation of gate_up's two halves as stored, i.e. the same as
 * tm_grouped_gemm_forward followed by tm_swiglu_forward on gate_up's halves. On Hopper with bf16
 * outputs and I a multiple of 64 the activation runs in the GEMM's epilogue (the gate/up output
 * is not read back); elsewhere the two ops run in turn. gate_up and act: rows contiguous, of the
 * dtype of x or float32 (both the same). Rows >= offsets[E] of both are zeroed. The fused pass is
 * opt-in (environment TURBOMOE_HOPPER_GEMM_SWIGLU=1) while the two ops in turn measure faster. */
TM_API tm_status tm_grouped_gemm_swiglu_forward(const tm_swiglu_params* params, const tm_tensor* x,
                                                const tm_tensor* w, const tm_tensor* expert_offsets,
                                                tm_tensor* gate_up, tm_tensor* act, void* stream);

/* ---------------------------------------------------------------- RMSNorm
 * y = weight * cast(x * rstd), rstd = 1 / sqrt(mean(x^2) + eps) in float32, over the last dim.
 * x, y [R,H] rows contiguous; weight [H] or NULL; rstd [R] f32 or NULL (saved for backward).
 */
TM_API tm_status tm_rmsnorm_forward(const tm_tensor* x, const tm_tensor* weight, float eps,
                                    tm_tensor* y, tm_tensor* rstd, void* stream);
TM_API tm_status tm_rmsnorm_backward_workspace_size(int64_t rows, int64_t hidden,
                                                    int32_t device_type, size_t* bytes);
/* grad_x [R,H]; grad_weight [H] f32 or NULL (overwritten, deterministic reduction). */
TM_API tm_status tm_rmsnorm_backward(const tm_tensor* grad_y, const tm_tensor* x,
                                     const tm_tensor* weight, const tm_tensor* rstd,
                                     tm_tensor* grad_x, tm_tensor* grad_weight, void* workspace,
                                     size_t workspace_bytes, void* stream);

/* ---------------------------------------------------------------- residual add + RMSNorm
 * A decoder layer's "h = residual + x; y = RMSNorm(h)" in one pass over the rows:
 *   sum = cast(x + residual) in x's dtype, then y and rstd as tm_rmsnorm_forward(sum, ...),
 * bitwise the add followed by tm_rmsnorm_forward. x, residual, sum [R,H] rows contiguous, one
 * dtype (float32/bfloat16); y [R,H]; weight, rstd, eps as tm_rmsnorm_forward. sum and y must not
 * overlap x, residual or each other.
 */
TM_API tm_status tm_add_rmsnorm_forward(const tm_tensor* x, const tm_tensor* residual,
                                        const tm_tensor* weight, float eps, tm_tensor* sum,
                                        tm_tensor* y, tm_tensor* rstd, void* stream);
/* tm_rmsnorm_backward for an x that also reaches the loss by another path (the residual stream):
 * grad_x = cast(cast(RMSNorm's grad_x) + grad_residual), bitwise tm_rmsnorm_backward followed by
 * adding grad_residual [R,H] (grad_x's dtype, rows contiguous, not overlapping grad_x). With
 * grad_residual NULL this is tm_rmsnorm_backward. Same workspace. */
TM_API tm_status tm_rmsnorm_backward_add(const tm_tensor* grad_y, const tm_tensor* x,
                                         const tm_tensor* weight, const tm_tensor* rstd,
                                         const tm_tensor* grad_residual, tm_tensor* grad_x,
                                         tm_tensor* grad_weight, void* workspace,
                                         size_t workspace_bytes, void* stream);

/* ---------------------------------------------------------------- q/k RMSNorm + RoPE
 * Qwen3's attention normalises each head of q and k (RMSNorm over the head dim) and then applies
 * RoPE; this is both in one pass, bitwise tm_rmsnorm_forward over the rows [B*S*NH, D] followed
 * by tm_rope_forward (rotate_half form over the whole head):
 *   y = rope(weight * cast(x * rstd)), the normalised values rounded to x's dtype in between.
 * x, y [B,S,NH,D] contiguous, same dtype (float32/bfloat16), D = 64, 128 or 256; weight [D] in
 * x's dtype or NULL; cos/sin [B or 1,S,D], last dim contiguous; rstd [B*S*NH] float32 (required:
 * the backward reads it). On CUDA every tensor's data and row strides are multiples of 8
 * elements. The backward (grad_y [B,S,NH,D] contiguous, the gradient of y) takes the workspace
 * of tm_rmsnorm_backward_workspace_size(B*S*NH, D, ...) when grad_weight is given, and is
 * bitwise tm_rope_backward followed by tm_rmsnorm_backward.
 */
TM_API tm_status tm_qk_norm_rope_forward(const tm_tensor* x, const tm_tensor* weight, float eps,
                                         const tm_tensor* cos, const tm_tensor* sin, tm_tensor* y,
                                         tm_tensor* rstd, void* stream);
TM_API tm_status tm_qk_norm_rope_backward(const tm_tensor* grad_y, const tm_tensor* x,
                                          const tm_tensor* weight, const tm_tensor* rstd,
                                          const tm_tensor* cos, const tm_tensor* sin,
                                          tm_tensor* grad_x, tm_tensor* grad_weight,
                                          void* workspace, size_t workspace_bytes, void* stream);

/* ---------------------------------------------------------------- RoPE
 * x [B,NH,S,D] (any strides), cos/sin [B,S,R] with R <= D even: the first R dims of each head
 * are rotated, the rest pass through. Non-interleaved (rotate_half) form:
 *   out[i] = x[i] cos[i] - x[i+R/2] sin[i],  out[i+R/2] = x[i+R/2] cos[i+R/2] + x[i] sin[i+R/2].
 * With interleaved = 1 the rotated dims of x are read as pairs (2j, 2j+1) and the result is
 * written in the de-interleaved order that Hugging Face's DeepSeek-V3
 * apply_rotary_pos_emb_interleave produces.
 */
typedef struct tm_rope_params {
  uint32_t struct_size;
  int32_t interleaved; /* 0 or 1 */
} tm_rope_params;

TM_API tm_status tm_rope_forward(const tm_rope_params* params, const tm_tensor* x,
                                 const tm_tensor* cos, const tm_tensor* sin, tm_tensor* out,
                                 void* stream);
TM_API tm_status tm_rope_backward(const tm_rope_params* params, const tm_tensor* grad_out,
                                  const tm_tensor* cos, const tm_tensor* sin, tm_tensor* grad_x,
                                  void* stream);

/* ---------------------------------------------------------------- cross-entropy
 * Per-row cross-entropy over logits [N,V]; labels [N] int64; rows whose label equals
 * ignore_index get loss 0 and gradient 0. Labels outside [0,V) otherwise are rejected on CPU;
 * on CUDA (no host sync) such a row gets a NaN loss and a NaN gradient row.
 * loss [N] f32, lse [N] f32 (log-sum-exp, saved for the backward).
 */
TM_API tm_status tm_cross_entropy_forward(const tm_tensor* logits, const tm_tensor* labels,
                                          int64_t ignore_index, tm_tensor* loss, tm_tensor* lse,
                                          void* stream);
/* grad_logits [N,V] = grad_loss[n] * (softmax - onehot); may alias logits. grad_loss [N] f32. */
TM_API tm_status tm_cross_entropy_backward(const tm_tensor* grad_loss, const tm_tensor* logits,
                                           const tm_tensor* labels, const tm_tensor* lse,
                                           int64_t ignore_index, tm_tensor* grad_logits,
                                           void* stream);
/* Both at once, for a caller that has the upstream gradient before the forward (a loss that is
 * a fixed scale of the summed rows): loss and lse as tm_cross_entropy_forward, grad_logits as
 * tm_cross_entropy_backward with that lse (may alias logits). On CUDA, with the environment
 * variable TURBOMOE_CE_ONE_PASS=1, one kernel reads each row from memory once (a cluster of
 * CTAs holds it in shared memory) where the two read it twice; opt-in until measured faster. */
TM_API tm_status tm_cross_entropy_forward_backward(const tm_tensor* grad_loss,
                                                   const tm_tensor* logits, const tm_tensor* labels,
                                                   int64_t ignore_index, tm_tensor* loss,
                                                   tm_tensor* lse, tm_tensor* grad_logits,
                                                   void* stream);

/* x *= scale, skipped (nothing read or written) when scale is exactly 1, decided on the device
 * without a host sync. scale: one float32 element on x's device (a loss's upstream gradient,
 * normally the autograd seed 1); x: contiguous float32 / bfloat16, in place, scale rounded to
 * x's dtype first. For gradients formed in a loss's forward (ops/loss_total.py), so that the
 * backward of a unit seed costs a launch instead of a pass over the lm_head's gradient. */
TM_API tm_status tm_scale_unless_one(const tm_tensor* scale, tm_tensor* x, void* stream);

/* Fused linear cross-entropy: logits = hidden [N,H] . weight [V,H]^T never exist beyond one
 * chunk of chunk_rows rows at a time. */
typedef struct tm_linear_ce_params {
  uint32_t struct_size;
  int64_t ignore_index;
  int64_t chunk_rows; /* rows per chunk; > 0 */
} tm_linear_ce_params;

TM_API tm_status tm_linear_cross_entropy_workspace_size(const tm_linear_ce_params* params,
                                                        int64_t n, int64_t hidden, int64_t vocab,
                                                        int32_t device_type, size_t* bytes);
/* loss [N] f32 (0 where ignored), lse [N] f32. */
TM_API tm_status tm_linear_cross_entropy_forward(const tm_linear_ce_params* params,
                                                 const tm_tensor* hidden, const tm_tensor* weight,
                                                 const tm_tensor* labels, tm_tensor* loss,
                                                 tm_tensor* lse, void* workspace,
                                                 size_t workspace_bytes, void* stream);
/* grad_hidden [N,H] (overwritten); grad_weight [V,H] f32 or the dtype of weight (overwritten),
 * or NULL. grad_loss [N] f32. */
TM_API tm_status tm_linear_cross_entropy_backward(
    const tm_linear_ce_params* params, const tm_tensor* grad_loss, const tm_tensor* hidden,
    const tm_tensor* weight, const tm_tensor* labels, const tm_tensor* lse, tm_tensor* grad_hidden,
    tm_tensor* grad_weight, void* workspace, size_t workspace_bytes, void* stream);

/* ---------------------------------------------------------------- optimizer
 * One AdamW step (decoupled weight decay) in place, element by element, in float32 from the
 * stored values, rounded once into each tensor's dtype:
 *   m = lerp(m, g, 1 - beta1);  v = beta2 * v + (1 - beta2) * g * g
 *   p = p * (1 - lr * weight_decay)
 *       - lr * (m / (1 - beta1^step)) / (sqrt(v / (1 - beta2^step)) + eps)
 * with g = grad * grad_scale in float32 when grad_scale is given (a float32 tensor of one element
 * on the same device, read on the device: a gradient-clipping factor needs no host sync).
 * param f32/bf16; grad f32/bf16; exp_avg and exp_avg_sq f32/bf16, the same dtype; all
 * contiguous, of one shape, not overlapping. step counts from 1 (this step included).
 */
typedef struct tm_adamw_params {
  uint32_t struct_size;
  double lr;
  double beta1;
  double beta2;
  double eps;
  double weight_decay;
  int64_t step;
} tm_adamw_params;

TM_API tm_status tm_adamw_step(const tm_adamw_params* params, tm_tensor* param,
                               const tm_tensor* grad, tm_tensor* exp_avg, tm_tensor* exp_avg_sq,
                               const tm_tensor* grad_scale, void* stream);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* TURBOMOE_TURBOMOE_H_ */
