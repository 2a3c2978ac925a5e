// RMSNorm: internal entry points of the CPU reference and the CUDA kernels, called after
// tm_rmsnorm_* has validated its arguments.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>

#include "common/tensor.h"

namespace turbomoe::rmsnorm {

// Shape of the CUDA backward. A team of threads (a power of two, 4 to 256) works on one row, each
// thread keeping up to `cached` 8-element vectors of it in registers. Each team owns a fixed run
// of consecutive rows and one row of grad_weight partial sums in the workspace; the partial rows
// are then added in a fixed two-stage order. Everything here depends on the problem shape only,
// never on the GPU, so the workspace size and the reduction order (hence the bits of
// grad_weight) are the same on every device.
inline constexpr int64_t kVectorElems = 8;
inline constexpr int kBackwardCached = 2;
inline constexpr int64_t kBackwardThreadsTarget = 65536;  // enough rows in flight to fill a GPU
inline constexpr int64_t kReduceSliceRows = 64;           // partial rows per first-stage block
// Up to this many partial rows the reduction is one stage: one block a column chunk adds all the
// rows (the decoder norms at 4096 x 2048: 512 rows, 64 KiB a block), where a second launch
// would cost more than the parallel adds it buys. Beyond it (the per-head q/k norms: 16,384
// rows of 128 columns, only 4 column chunks) the rows are first split into slices.
inline constexpr int64_t kSingleStageRows = 1024;

inline int team_size(int64_t hidden, int cached) {
  const int64_t vectors = (hidden + kVectorElems - 1) / kVectorElems;
  const int64_t wanted = (vectors + cached - 1) / cached;
  int team = 4;
  while (team < 256 && team < wanted) team *= 2;
  return team;
}

struct BackwardPlan {
  int team = 0;               // threads per row
  int64_t rows_per_team = 0;  // consecutive rows of one team
  int64_t partials = 0;       // teams with rows = rows of partial sums
  int64_t slices = 0;         // first-stage reduction blocks along the partial rows
  int64_t workspace_floats = 0;
};

inline BackwardPlan backward_plan(int64_t rows, int64_t hidden) {
  BackwardPlan p;
  p.team = team_size(hidden, kBackwardCached);
  const int64_t max_partials = kBackwardThreadsTarget / p.team;
  p.rows_per_team = rows <= max_partials ? 1 : (rows + max_partials - 1) / max_partials;
  p.partials = (rows + p.rows_per_team - 1) / p.rows_per_team;
  p.slices =
      p.partials <= kSingleStageRows ? 1 : (p.partials + kReduceSliceRows - 1) / kReduceSliceRows;
  // With one slice, the first stage writes grad_weight directly and needs no slice rows.
  p.workspace_floats = (p.partials + (p.slices > 1 ? p.slices : 0)) * hidden;
  return p;
}

// tm_add_rmsnorm_forward: the rows normalised are cast(x + residual), written to sum.
struct ResidualAdd {
  Arg residual;
  Arg sum;
};

void forward_cpu(const Arg& x, const std::optional<Arg>& weight, float eps, const Arg& y,
                 const std::optional<Arg>& rstd, const std::optional<ResidualAdd>& add);
// grad_residual (tm_rmsnorm_backward_add) is added to each row of grad_x after its rounding.
void backward_cpu(const Arg& grad_y, const Arg& x, const std::optional<Arg>& weight,
                  const Arg& rstd, const std::optional<Arg>& grad_residual, const Arg& grad_x,
                  const std::optional<Arg>& grad_weight);

void forward_cuda(const Arg& x, const std::optional<Arg>& weight, float eps, const Arg& y,
                  const std::optional<Arg>& rstd, const std::optional<ResidualAdd>& add,
                  void* stream);
// workspace holds backward_plan(rows, hidden).workspace_floats floats when grad_weight is given.
void backward_cuda(const Arg& grad_y, const Arg& x, const std::optional<Arg>& weight,
                   const Arg& rstd, const std::optional<Arg>& grad_residual, const Arg& grad_x,
                   const std::optional<Arg>& grad_weight, void* workspace, void* stream);
// grad_weight [hidden] = the sum of the backward kernel's partial rows (the first plan.partials
// rows of the workspace), in the fixed two-stage order.
void reduce_partials_cuda(const BackwardPlan& plan, int64_t hidden, float* workspace,
                          float* grad_weight, void* stream);

}  // namespace turbomoe::rmsnorm
