// Plain options and results: what an engine holds between calls.
#pragma once

#include <cstdint>
#include <vector>

#include "view.hpp"

namespace sparsevlm {

/// How many visual tokens a step keeps (spec step 5).
struct keep_policy {
  enum class kind_t { rank, fixed };
  kind_t kind = kind_t::rank;
  double scale = 13.5;  ///< rank policy: keep = floor(rank * scale + bias)
  double bias = 0.0;
  index_t keep = 0;     ///< fixed policy: keep = min(keep, N - 1)

  /// The reference's rank-adaptive form. Authors' presets: (13.5, 0) for a
  /// 192-token budget, (9, 6) for 128, (0.8, 0) for 64; video uses (1, 0).
  static keep_policy rank(double scale, double bias) {
    return keep_policy{kind_t::rank, scale, bias, 0};
  }
  /// A fixed count, clamped to N - 1.
  static keep_policy fixed(index_t keep) { return keep_policy{kind_t::fixed, 0.0, 0.0, keep}; }
};

/// Token recycling (spec step 7).
struct recycle_options {
  bool enabled = true;
  double fraction = 0.3;         ///< 0 < fraction <= 1
  double cluster_divisor = 10.0;  ///< > 1
};

struct step_options {
  keep_policy policy{};
  recycle_options recycle{};
};

/// The recycled tokens of one step.
struct recycle_result {
  /// Each cluster's members as absolute positions, ascending; clusters in
  /// descending order of their centre's rho * delta.
  std::vector<std::vector<index_t>> clusters;
  /// Row-major [clusters.size(), dim] float32: row i is the mean of cluster i's
  /// hidden rows.
  std::vector<float> merged;
  index_t dim = 0;
};

/// Everything one pruning step decides (the spec's result, plus the scores).
struct step_result {
  std::vector<index_t> raters;  ///< absolute positions, ascending
  std::vector<float> scores;    ///< [N], one per visual token
  index_t rank = 0;
  index_t keep_count = 0;
  std::vector<index_t> keep;  ///< absolute positions, ascending
  recycle_result recycled;
  /// The new sequence as source positions; -(i + 1) stands for recycled token i.
  std::vector<index_t> sequence;
};

}  // namespace sparsevlm
