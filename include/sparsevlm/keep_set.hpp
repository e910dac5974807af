// Stage 6: which visual tokens to keep, and which pruned ones to recycle.
#pragma once

#include <algorithm>
#include <cmath>
#include <numeric>
#include <span>
#include <vector>

#include "core/math.hpp"
#include "error.hpp"
#include "view.hpp"
#include "workspace.hpp"

namespace sparsevlm {

namespace detail {

inline void check_scores(std::span<const float> scores) {
  for (std::size_t j = 0; j < scores.size(); ++j)
    SPARSEVLM_CHECK(std::isfinite(scores[j]), errc::non_finite, concat("scores[", j, "]"),
            "a finite value", scores[j]);
}

/// select_keep on arguments known to be valid (the composition's: keep and
/// top_pruned from keep_count and recycled_counts, scores checked finite by the
/// scoring stage).
inline void select_keep_trusted(std::span<const float> scores, index_t visual_start,
                                index_t keep, index_t top_pruned,
                                std::vector<index_t>& keep_out, std::vector<index_t>& pruned_out,
                                workspace& ws) {
  const index_t N = static_cast<index_t>(scores.size());

  index_t* order = workspace::take(ws.keep_set.order, static_cast<std::size_t>(N));
  std::iota(order, order + N, index_t{0});
  const auto better = [&](index_t a, index_t b) {
    return detail::core::ranks_before(scores[static_cast<std::size_t>(a)], a,
                              scores[static_cast<std::size_t>(b)], b);
  };
  if (keep > 0 && keep < N) std::nth_element(order, order + keep, order + N, better);
  keep_out.resize(static_cast<std::size_t>(keep));
  std::copy(order, order + keep, keep_out.begin());
  std::sort(keep_out.begin(), keep_out.end());
  for (index_t& k : keep_out) k += visual_start;

  index_t* rest = order + keep;
  const index_t n = N - keep;
  if (top_pruned > 0 && top_pruned < n) std::nth_element(rest, rest + top_pruned, rest + n, better);
  std::sort(rest, rest + top_pruned, better);
  pruned_out.assign(rest, rest + n);
}

}  // namespace detail

/// Keep set (spec step 6) and the order of the pruned tokens.
///
/// Partitions the visual tokens 0..N-1 (relative indices) by the total order
/// `detail::core::ranks_before` (higher score first, equal scores to the lower index):
///
/// - `keep_out` receives the `keep` best, as absolute positions S + j, ascending;
/// - `pruned_out` receives the other N − keep tokens' relative indices, the first
///   `top_pruned` of them in ranked order (the tokens recycling selects), the rest
///   in unspecified order. Pass `top_pruned = 0` when not recycling.
///
/// Cost: O(N) average (std::nth_element, a selection, not a sort) plus
/// O(keep·log keep + top·log top) for ordering the outputs. Scratch: N indices.
/// Errors: invalid_argument for keep outside [0, N] or top_pruned outside
/// [0, N − keep]; non_finite for a NaN/Inf score.
inline void select_keep(std::span<const float> scores, index_t visual_start, index_t keep,
                        index_t top_pruned, std::vector<index_t>& keep_out,
                        std::vector<index_t>& pruned_out, workspace& ws) {
  const index_t N = static_cast<index_t>(scores.size());
  SPARSEVLM_CHECK(keep >= 0 && keep <= N, errc::invalid_argument, "keep",
                  detail::concat("in [0, ", N, "]"), keep);
  SPARSEVLM_CHECK(top_pruned >= 0 && top_pruned <= N - keep, errc::invalid_argument, "top_pruned",
                  detail::concat("in [0, ", N - keep, "]"), top_pruned);
  detail::check_scores(scores);
  detail::select_keep_trusted(scores, visual_start, keep, top_pruned, keep_out, pruned_out, ws);
}

/// Convenience form: the keep set alone, absolute positions ascending.
inline std::vector<index_t> select_keep(std::span<const float> scores, index_t visual_start,
                                        index_t keep) {
  workspace ws;
  std::vector<index_t> kept, pruned;
  select_keep(scores, visual_start, keep, 0, kept, pruned, ws);
  return kept;
}

}  // namespace sparsevlm
