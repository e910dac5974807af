// Position ids after a pruning step, and where decoding continues. See
// docs/integration.md ("Position ids") for which layers use which ids.
#pragma once

#include <functional>
#include <limits>
#include <span>
#include <vector>

#include "plan.hpp"

namespace sparsevlm {

/// Which position ids the layers after a pruning step run with.
enum class position_policy {
  /// 0, 1, …, n−1 in every row, as if the pruned sequence had been the input
  /// (SparseVLM v1/v1.5's reference slices its arange position ids to the new
  /// length).
  renumber,
  /// Every kept token keeps its original ids (prefix, kept visual tokens, text),
  /// so RoPE distances between surviving tokens are those of the unpruned model.
  /// A recycled token takes all its ids from its cluster's first member (the
  /// lowest position): see pruned_positions.
  keep_original,
};

namespace detail {

inline void check_policy(position_policy policy) {
  SPARSEVLM_CHECK(policy == position_policy::renumber || policy == position_policy::keep_original,
                  errc::invalid_argument, "policy", "renumber or keep_original",
                  static_cast<int>(policy));
}

/// True when the elements of `a` and `b` lie in intersecting address ranges (a
/// conservative test: interleaved but disjoint views count as overlapping).
template <class A, class B>
bool ranges_overlap(matrix_view<A> a, matrix_view<B> b) {
  if (a.empty() || b.empty()) return false;
  const auto* a0 = reinterpret_cast<const unsigned char*>(a.data());
  const auto* b0 = reinterpret_cast<const unsigned char*>(b.data());
  const auto* a1 = reinterpret_cast<const unsigned char*>(&a(a.extent(0) - 1, a.extent(1) - 1) + 1);
  const auto* b1 = reinterpret_cast<const unsigned char*>(&b(b.extent(0) - 1, b.extent(1) - 1) + 1);
  const std::less<const unsigned char*> lt;
  return lt(a0, b1) && lt(b0, a1);
}

}  // namespace detail

/// Position ids of the new sequence, row by row: out[r][i] for the token that
/// sequence[i] names.
///
/// - renumber: out[r][i] = i.
/// - keep_original: out[r][i] = positions[r][p] for a source entry p; for
///   recycled token k (entry -(k+1)), positions[r][clusters[k][0]]: every row
///   from the cluster's first member. Why that token: its ids are ones the
///   unpruned model really gave a token of the cluster, so under mRoPE the
///   (t, h, w) triple is a real grid cell rather than a per-row mix; it needs
///   nothing the step result lacks (clusters are listed member-ascending, the
///   centre is not kept); and it never exceeds the largest original id, so
///   next_position is unaffected. The recycled token's hidden state is a mean,
///   so no single id is exact; a deterministic real one is the honest choice.
///
/// - `sequence`: make_sequence / step_result::sequence over the L tokens that
///   `positions` describes; `clusters`: step_result::recycled.clusters (each
///   non-empty, members in [0, L)); every negative entry must name a cluster.
///   Both policies validate the same inputs, so switching policy never turns a
///   bad call into a good one.
/// - `positions`: [rows, L] ids before the step (rows = 1 for 1-D RoPE, 3 for
///   Qwen2-VL's mRoPE), any strides; `out`: [rows, sequence.size()], must not
///   overlap `positions` (checked conservatively by address range: the
///   recycled ids are read from rows that an in-place pass would already have
///   overwritten).
/// - Cost: O(rows · sequence.size() + total cluster members). No allocation.
/// - Errors (out untouched): invalid_argument for a bad policy, sequence entry,
///   cluster, or an overlapping `out`; shape_mismatch for `out`'s extents.
inline void pruned_positions(std::span<const index_t> sequence,
                             std::span<const std::vector<index_t>> clusters,
                             matrix_view<const index_t> positions, position_policy policy,
                             matrix_view<index_t> out) {
  detail::check_policy(policy);
  const index_t rows = positions.extent(0), L = positions.extent(1);
  const index_t n = static_cast<index_t>(sequence.size());
  const index_t c = static_cast<index_t>(clusters.size());
  SPARSEVLM_CHECK(out.extent(0) == rows && out.extent(1) == n, errc::shape_mismatch, "out",
                  detail::concat("[", rows, ", ", n, "] (positions rows, sequence.size())"),
                  detail::concat("[", out.extent(0), ", ", out.extent(1), "]"));
  for (std::size_t q = 0; q < clusters.size(); ++q) {
    SPARSEVLM_CHECK(!clusters[q].empty(), errc::invalid_argument,
                    detail::concat("clusters[", q, "]"), "at least one member", "an empty cluster");
    for (std::size_t j = 0; j < clusters[q].size(); ++j)
      SPARSEVLM_CHECK(clusters[q][j] >= 0 && clusters[q][j] < L, errc::invalid_argument,
                      detail::concat("clusters[", q, "][", j, "]"),
                      detail::concat("a position in [0, ", L, ")"), clusters[q][j]);
  }
  for (index_t i = 0; i < n; ++i) {
    const index_t p = sequence[static_cast<std::size_t>(i)];
    SPARSEVLM_CHECK(p < L && p >= -c, errc::invalid_argument, detail::concat("sequence[", i, "]"),
                    detail::concat("a position in [0, ", L, ") or a recycled index in [-", c,
                                   ", -1]"),
                    p);
  }
  SPARSEVLM_CHECK(!detail::ranges_overlap(positions, matrix_view<const index_t>(out)),
                  errc::invalid_argument, "out", "memory that does not overlap positions",
                  "an overlapping view");
  for (index_t r = 0; r < rows; ++r)
    for (index_t i = 0; i < n; ++i) {
      if (policy == position_policy::renumber) {
        out(r, i) = i;
      } else {
        const index_t p = sequence[static_cast<std::size_t>(i)];
        out(r, i) = positions(r, p >= 0 ? p : clusters[static_cast<std::size_t>(-p - 1)].front());
      }
    }
}

/// One row of ids ([L] in, [sequence.size()] out): pruned_positions above.
inline std::vector<index_t> pruned_positions(std::span<const index_t> sequence,
                                             std::span<const std::vector<index_t>> clusters,
                                             std::span<const index_t> positions,
                                             position_policy policy) {
  const index_t L = static_cast<index_t>(positions.size());
  std::vector<index_t> out(sequence.size());
  pruned_positions(sequence, clusters,
                   matrix_view<const index_t>(positions.data(), {1, L}, "positions"), policy,
                   matrix_view<index_t>(out.data(), {1, static_cast<index_t>(out.size())}, "out"));
  return out;
}

/// The position id of the first token generated after a prefill whose layers
/// after the step ran with pruned_positions(…, policy); the g-th generated token
/// (from 0) takes this + g. The same id in every row.
///
/// - renumber: new_length (one past n−1).
/// - keep_original: 1 + the largest id in `positions`, over all rows and tokens:
///   where the unpruned model continues. Over all rows, not per row, because
///   mRoPE models (Qwen2-VL) continue text at max + 1 in all three rows; per-row
///   maxima would differ when the sequence ends with visual tokens.
///
/// - `positions`: [rows, L], the ids BEFORE the step (for several steps, the ids
///   before the first step: a later step may prune the token that held the
///   maximum when no text follows the image); `new_length`: sequence.size(), in
///   [0, L]. With rows = 0 or L = 0, keep_original returns 0.
/// - Layers that ran before the step keep the ids they were written with; their
///   decode position is this function applied to those ids (see
///   docs/integration.md).
/// - Cost: O(rows · L) for keep_original, O(1) for renumber.
/// - Errors: invalid_argument for a bad policy, new_length outside [0, L], or a
///   maximum id of INT64_MAX (its successor overflows).
inline index_t next_position(matrix_view<const index_t> positions, index_t new_length,
                             position_policy policy) {
  detail::check_policy(policy);
  const index_t L = positions.extent(1);
  SPARSEVLM_CHECK(new_length >= 0 && new_length <= L, errc::invalid_argument, "new_length",
                  detail::concat("in [0, ", L, "] (positions.extent[1])"), new_length);
  if (policy == position_policy::renumber) return new_length;
  if (positions.empty()) return 0;
  index_t mx = std::numeric_limits<index_t>::min();
  for (index_t r = 0; r < positions.extent(0); ++r)
    for (index_t t = 0; t < L; ++t) mx = positions(r, t) > mx ? positions(r, t) : mx;
  SPARSEVLM_CHECK(mx < std::numeric_limits<index_t>::max(), errc::invalid_argument, "positions",
                  "a maximum id below INT64_MAX", mx);
  return mx + 1;
}

/// One row of ids: next_position above.
inline index_t next_position(std::span<const index_t> positions, index_t new_length,
                             position_policy policy) {
  return next_position(
      matrix_view<const index_t>(positions.data(), {1, static_cast<index_t>(positions.size())},
                                 "positions"),
      new_length, policy);
}

}  // namespace sparsevlm
