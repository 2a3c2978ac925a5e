// How the Hopper grouped GEMM's persistent CTAs share the tiles (the grad-weight's ranked and
// dealt in snake order, the row passes' order in 2-CTA clusters), as plain functions that the
// kernel and the CPU tests share.
//
// A grad-weight tile's work is its expert's row count, and real routing is skewed (a few experts
// take most rows, many none). The tiles go in descending order of their expert's rows (experts
// with rows first, most rows first, ties by index; then the empty ones) and are dealt in snake
// order: longest-processing-time-first, so that each CTA's sum of work stays within about one
// tile of the others'.
#pragma once

#include <cstdint>

#include "common/host_device.h"

namespace turbomoe::hopper_gemm {

// The i-th tile of CTA `cta` among `grid`: rounds of `grid` consecutive tiles, dealt forwards in
// even rounds and backwards in odd ones. A CTA's tiles rise with i, so it stops at the first one
// past the end.
TM_HOST_DEVICE int snake_tile(int i, int cta, int grid) {
  return i * grid + ((i & 1) != 0 ? grid - 1 - cta : cta);
}

// Expert e's place in the descending order of rows (row_begin: [E+1] non-decreasing bounds).
// Quadratic in E: the kernel's threads rank their experts in parallel, in shared memory.
TM_HOST_DEVICE int rank_by_rows(const int32_t* row_begin, int num_experts, int e) {
  const int rows = row_begin[e + 1] - row_begin[e];
  int rank = 0;
  for (int f = 0; f < num_experts; ++f) {
    const int other = row_begin[f + 1] - row_begin[f];
    rank += (other > rows || (other == rows && f < e)) ? 1 : 0;
  }
  return rank;
}

// Which output tile of which expert grad-weight tile t is, where `order` lists the experts in
// the order their tiles are walked (each expert's n_blocks x k_blocks tiles consecutive, row
// blocks outer). t counts from the start of `order`: the slot in the order is t / per_expert,
// the tile within the expert t % per_expert (not anything derived from the expert's id, which
// `order` permutes).
struct GradWeightTile {
  int expert;
  int out_block;  // block of the output's rows (kBlockM each)
  int col_block;  // block of the output's columns (kBlockN each)
};
TM_HOST_DEVICE GradWeightTile grad_weight_tile(int t, const int32_t* order, int k_blocks,
                                               int per_expert) {
  const int slot = t / per_expert;
  const int local = t - slot * per_expert;
  const int out_block = local / k_blocks;
  return GradWeightTile{order[slot], out_block, local - out_block * k_blocks};
}

// Grad-weight tile t of a cluster of `cluster` CTAs, which compute `cluster` vertically adjacent
// output tiles (n_blocks, a multiple of `cluster`, row blocks an expert) that read the same
// columns of x: tile t counts in those groups, and CTA `rank` of the cluster takes row block
// cluster * (t's group row) + rank.
TM_HOST_DEVICE GradWeightTile cluster_grad_weight_tile(int t, const int32_t* order, int n_blocks,
                                                       int k_blocks, int cluster, int rank) {
  GradWeightTile g = grad_weight_tile(t, order, k_blocks, n_blocks / cluster * k_blocks);
  g.out_block = g.out_block * cluster + rank;
  return g;
}

// Row passes (forward, grad-input): tile `local` of an expert with m_blocks row blocks (of
// kBlockM rows) and any number of column blocks, column blocks outer. One CTA a tile walks the
// row blocks in order within each column block. In 2-CTA clusters a pair of CTAs takes two
// consecutive tiles, which should read one operand in common so that each CTA loads half of it
// for both: the row blocks then run forwards in even column blocks and backwards in odd ones, so
// that two consecutive tiles of an expert share the weights' columns (same column block) or,
// where a column block turns into the next, the rows (same row block).
struct RowTile {
  int m_block;
  int n_block;
};
TM_HOST_DEVICE RowTile row_tile(int local, int m_blocks, bool snake) {
  const int n_block = local / m_blocks;
  const int j = local - n_block * m_blocks;
  return RowTile{snake && (n_block & 1) != 0 ? m_blocks - 1 - j : j, n_block};
}

}  // namespace turbomoe::hopper_gemm
