// The tile schedules (tile_schedule.h): every grad-weight tile dealt to exactly one CTA, the
// experts ranked by descending rows, and the CTAs' work balanced under skewed routing; the row
// passes' tile order, whose consecutive tiles share an operand in 2-CTA clusters.
#include "grouped_gemm/tile_schedule.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <random>
#include <tuple>
#include <vector>

namespace {

using turbomoe::hopper_gemm::cluster_grad_weight_tile;
using turbomoe::hopper_gemm::grad_weight_tile;
using turbomoe::hopper_gemm::GradWeightTile;
using turbomoe::hopper_gemm::rank_by_rows;
using turbomoe::hopper_gemm::row_tile;
using turbomoe::hopper_gemm::RowTile;
using turbomoe::hopper_gemm::snake_tile;

// The tiles each CTA takes, walking i until its first tile past the end (as the kernel does).
std::vector<std::vector<int>> deal(int total, int grid) {
  std::vector<std::vector<int>> tiles(static_cast<size_t>(grid));
  for (int cta = 0; cta < grid; ++cta) {
    for (int i = 0;; ++i) {
      const int t = snake_tile(i, cta, grid);
      if (t >= total) break;
      tiles[cta].push_back(t);
    }
  }
  return tiles;
}

std::vector<int32_t> bounds_of(const std::vector<int>& counts) {
  std::vector<int32_t> bounds(counts.size() + 1, 0);
  std::partial_sum(counts.begin(), counts.end(), bounds.begin() + 1);
  return bounds;
}

TEST(TileSchedule, DealsEveryTileToExactlyOneCta) {
  for (const int grid : {1, 2, 7, 132}) {
    for (const int total : {0, 1, 6, 131, 132, 133, 264, 265, 1000, 12288}) {
      std::vector<int> seen(static_cast<size_t>(total), 0);
      for (const auto& tiles : deal(total, grid)) {
        for (size_t j = 0; j < tiles.size(); ++j) {
          ASSERT_GE(tiles[j], 0);
          ASSERT_LT(tiles[j], total);
          if (j > 0) {
            ASSERT_GT(tiles[j], tiles[j - 1]) << "a CTA's tiles must rise";
          }
          ++seen[tiles[j]];
        }
      }
      for (int t = 0; t < total; ++t) {
        ASSERT_EQ(seen[t], 1) << "tile " << t << " of " << total << " over " << grid << " CTAs";
      }
    }
  }
}

TEST(TileSchedule, RanksExpertsByDescendingRowsThenIndex) {
  std::mt19937 rng(7);
  std::uniform_int_distribution<int> rows(0, 5);  // small range: many ties and empty experts
  for (const int experts : {1, 2, 5, 128, 300}) {
    std::vector<int> counts(static_cast<size_t>(experts));
    for (int& c : counts) c = rows(rng);
    const std::vector<int32_t> bounds = bounds_of(counts);
    std::vector<int> order(static_cast<size_t>(experts), -1);
    for (int e = 0; e < experts; ++e) {
      const int rank = rank_by_rows(bounds.data(), experts, e);
      ASSERT_GE(rank, 0);
      ASSERT_LT(rank, experts);
      ASSERT_EQ(order[rank], -1) << "two experts share rank " << rank;
      order[rank] = e;
    }
    for (int r = 1; r < experts; ++r) {
      const int a = order[r - 1];
      const int b = order[r];
      ASSERT_TRUE(counts[a] > counts[b] || (counts[a] == counts[b] && a < b))
          << "rank " << r << ": expert " << a << " (" << counts[a] << " rows) before " << b << " ("
          << counts[b] << ")";
    }
  }
}

// The kernel's split of the grad-weight output: the experts with rows, ranked, computed
// (tiles 0 .. active * per_expert over the snake), the empty ones' zero tiles stored apart
// (tiles 0 .. (E - active) * per_expert of the order's tail). Together they must cover every
// (expert, row block, column block) exactly once, for any routing: a tile decoded from the
// expert's id instead of its slot in the order (the fault of 01ee323) lands outside its expert.
// With 2-CTA clusters the computed tiles count in vertical pairs, each CTA taking one of them.
TEST(TileSchedule, GradWeightTilesCoverEveryExpertTileOnce) {
  std::mt19937 rng(11);
  for (const int experts : {1, 3, 5, 128}) {
    for (const auto& [n_blocks, k_blocks, cluster] :
         {std::tuple{1, 1, 1}, {2, 3, 1}, {12, 8, 1}, {2, 3, 2}, {12, 8, 2}, {16, 3, 2}}) {
      for (int trial = 0; trial < 4; ++trial) {
        std::uniform_int_distribution<int> rows(0, trial == 0 ? 0 : 300);
        std::vector<int> counts(static_cast<size_t>(experts));
        for (int& c : counts) c = trial == 3 ? 4096 * (&c == &counts.back()) : rows(rng);
        const std::vector<int32_t> bounds = bounds_of(counts);
        std::vector<int32_t> order(static_cast<size_t>(experts));
        int active = 0;
        for (int e = 0; e < experts; ++e) {
          order[static_cast<size_t>(rank_by_rows(bounds.data(), experts, e))] = e;
          active += counts[static_cast<size_t>(e)] > 0 ? 1 : 0;
        }
        const int per_expert = n_blocks * k_blocks;
        std::vector<int> seen(static_cast<size_t>(experts * per_expert), 0);
        auto mark = [&](const GradWeightTile& g, bool computed) {
          ASSERT_GE(g.expert, 0);
          ASSERT_LT(g.expert, experts);
          ASSERT_EQ(counts[static_cast<size_t>(g.expert)] > 0, computed)
              << "expert " << g.expert << " on the wrong side of the split";
          ASSERT_GE(g.out_block, 0);
          ASSERT_LT(g.out_block, n_blocks);
          ASSERT_GE(g.col_block, 0);
          ASSERT_LT(g.col_block, k_blocks);
          ++seen[static_cast<size_t>((g.expert * n_blocks + g.out_block) * k_blocks + g.col_block)];
        };
        for (int t = 0; t < active * per_expert / cluster; ++t) {
          for (int rank = 0; rank < cluster; ++rank) {
            mark(cluster_grad_weight_tile(t, order.data(), n_blocks, k_blocks, cluster, rank),
                 true);
          }
        }
        for (int z = 0; z < (experts - active) * per_expert; ++z) {
          mark(grad_weight_tile(z, order.data() + active, k_blocks, per_expert), false);
        }
        for (size_t i = 0; i < seen.size(); ++i) {
          ASSERT_EQ(seen[i], 1) << "tile " << i << " of " << experts << " experts x " << per_expert
                                << ", clusters of " << cluster;
        }
      }
    }
  }
}

// Routing like the benchmark model's (bench/routing_stats.py): a few experts with nearly every
// token, a long tail, most experts empty. 96 tiles an expert (gate/up's grad-weight) over 132
// CTAs; a tile's work is its expert's reduction chunks.
TEST(TileSchedule, BalancesSkewedWorkAcrossCtas) {
  const int experts = 128;
  const int per_expert = 96;
  const int grid = 132;
  std::vector<int> counts(static_cast<size_t>(experts), 0);
  int left = 32768;
  for (int e = 0; e < 40 && left > 0; ++e) {
    const int rows = std::min(left, std::max(1, 4095 - 160 * e));
    counts[static_cast<size_t>((e * 37) % experts)] = rows;  // scattered over the expert ids
    left -= rows;
  }
  const std::vector<int32_t> bounds = bounds_of(counts);
  auto chunks = [&](int e) { return (counts[e] + 63) / 64; };

  std::vector<int> order(static_cast<size_t>(experts));
  for (int e = 0; e < experts; ++e) order[rank_by_rows(bounds.data(), experts, e)] = e;
  int active = 0;
  for (int c : counts) active += c > 0 ? 1 : 0;

  // Snake over the ranked experts' tiles (the empty ones' zero tiles are stored apart).
  std::vector<long> snake(static_cast<size_t>(grid), 0);
  const auto dealt = deal(active * per_expert, grid);
  for (int cta = 0; cta < grid; ++cta) {
    for (int t : dealt[cta]) snake[cta] += chunks(order[t / per_expert]);
  }
  // Expert order round-robin (the schedule before): tile t to CTA t % grid.
  std::vector<long> round_robin(static_cast<size_t>(grid), 0);
  for (int t = 0; t < experts * per_expert; ++t) round_robin[t % grid] += chunks(t / per_expert);

  const long total = std::accumulate(snake.begin(), snake.end(), 0L);
  const double mean = static_cast<double>(total) / grid;
  const long snake_max = *std::max_element(snake.begin(), snake.end());
  const long rr_max = *std::max_element(round_robin.begin(), round_robin.end());
  EXPECT_EQ(total, std::accumulate(round_robin.begin(), round_robin.end(), 0L));
  EXPECT_LE(snake_max, mean + chunks(order[0])) << "more than one tile above the mean";
  EXPECT_LT(snake_max, rr_max) << "no better than the expert-order round-robin";
  RecordProperty("snake_max_over_mean", std::to_string(snake_max / mean));
  RecordProperty("round_robin_max_over_mean", std::to_string(rr_max / mean));
}

TEST(TileSchedule, RowTilesCoverEveryBlockOnceInEitherOrder) {
  for (const bool snake : {false, true}) {
    for (const int m_blocks : {1, 2, 3, 7, 32}) {
      for (const int n_blocks : {1, 3, 6, 8}) {
        std::vector<int> seen(static_cast<size_t>(m_blocks * n_blocks), 0);
        for (int local = 0; local < m_blocks * n_blocks; ++local) {
          const RowTile t = row_tile(local, m_blocks, snake);
          ASSERT_GE(t.m_block, 0);
          ASSERT_LT(t.m_block, m_blocks);
          ASSERT_GE(t.n_block, 0);
          ASSERT_LT(t.n_block, n_blocks);
          ++seen[static_cast<size_t>(t.n_block * m_blocks + t.m_block)];
        }
        for (const int count : seen) ASSERT_EQ(count, 1) << m_blocks << " x " << n_blocks;
      }
    }
  }
}

// Two consecutive tiles of one expert (a cluster's pair, at either parity) read the same weight
// columns or the same rows in the snake order; in plain order a pair that crosses a column block
// of an expert with several row blocks shares neither.
TEST(TileSchedule, ConsecutiveSnakeRowTilesShareAnOperand) {
  for (const int m_blocks : {1, 2, 3, 5, 32}) {
    for (const int n_blocks : {1, 3, 6, 8}) {
      int plain_misses = 0;
      for (int local = 0; local + 1 < m_blocks * n_blocks; ++local) {
        const RowTile a = row_tile(local, m_blocks, true);
        const RowTile b = row_tile(local + 1, m_blocks, true);
        EXPECT_TRUE(a.n_block == b.n_block || a.m_block == b.m_block)
            << "tiles " << local << ", " << local + 1 << " of " << m_blocks << " x " << n_blocks;
        const RowTile pa = row_tile(local, m_blocks, false);
        const RowTile pb = row_tile(local + 1, m_blocks, false);
        if (pa.n_block != pb.n_block && pa.m_block != pb.m_block) ++plain_misses;
      }
      EXPECT_EQ(plain_misses, m_blocks > 1 ? n_blocks - 1 : 0);
    }
  }
}

}  // namespace
