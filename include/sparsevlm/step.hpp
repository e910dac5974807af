// One SparseVLM pruning step: the stages composed.
#pragma once

#include <optional>
#include <span>
#include <vector>

#include "keep_count.hpp"
#include "keep_set.hpp"
#include "plan.hpp"
#include "rank.hpp"
#include "raters.hpp"
#include "recycle.hpp"
#include "scores.hpp"

namespace sparsevlm {

/// The tensors of one pruning step of one sequence (spec "case"): views over the
/// engine's own memory. Element types may differ between the three.
template <class TE, class TA, class TH>
struct step_inputs {
  matrix_view<const TE> embeds;   ///< [L, d_e] input embeddings (for rater selection)
  tensor3_view<const TA> attn;    ///< [H, L, L] this layer's attention probabilities
  matrix_view<const TH> hidden;   ///< [L, d] this layer's output hidden states
  visual_span visual;             ///< [S, S+N)
  /// Caller-chosen raters (absolute, ascending, inside the text); when set,
  /// rater selection is skipped and `embeds` is not read.
  std::optional<std::span<const index_t>> raters;
};

/// Validates a step's inputs and options: shapes agree (L from attn), the span is
/// inside the sequence with N >= 1, d >= 1, options in range, raters valid, and
/// `hidden` entirely finite. Throws sparsevlm::error naming the argument.
template <class TE, class TA, class TH>
void check_step(const step_inputs<TE, TA, TH>& in, const step_options& opt) {
  const index_t L = in.attn.extent(1);
  SPARSEVLM_CHECK(in.attn.extent(0) >= 1, errc::shape_mismatch, "attn.extent[0] (heads)", ">= 1",
                  in.attn.extent(0));
  SPARSEVLM_CHECK(in.attn.extent(2) == L, errc::shape_mismatch, "attn.extent[2]",
                  detail::concat(L, " (= attn.extent[1], square attention)"), in.attn.extent(2));
  detail::check_span(in.visual, L, "attn.extent[1]");
  SPARSEVLM_CHECK(in.hidden.extent(0) == L, errc::shape_mismatch, "hidden.extent[0]",
                  detail::concat(L, " (= attn.extent[1])"), in.hidden.extent(0));
  SPARSEVLM_CHECK(in.hidden.extent(1) >= 1, errc::shape_mismatch, "hidden.extent[1]", ">= 1",
                  in.hidden.extent(1));
  if (in.raters) {
    check_raters(*in.raters, in.visual, L);
  } else {
    SPARSEVLM_CHECK(in.embeds.extent(0) == L, errc::shape_mismatch, "embeds.extent[0]",
                    detail::concat(L, " (= attn.extent[1])"), in.embeds.extent(0));
    SPARSEVLM_CHECK(in.embeds.extent(1) >= 1, errc::shape_mismatch, "embeds.extent[1]", ">= 1",
                    in.embeds.extent(1));
  }
  check_policy(opt.policy);
  if (opt.recycle.enabled) check_recycle_options(opt.recycle);
  detail::check_finite_rows(in.hidden, 0, L, "hidden");
}

/// One pruning step (spec steps 1-8) on the CPU.
///
/// Decides raters, scores, rank, keep count, keep set, recycled clusters with
/// their merged rows, and the new sequence; it does not move the engine's
/// tensors (apply the returned `sequence` with apply_plan / apply_plan_inplace).
///
/// - Shapes: attn [H, L, L], hidden [L, d], embeds [L, d_e]; N >= 1; see the
///   stage functions for the rules, and docs/algorithm.md.
/// - Cost: O(N·T·d_e) rater selection (skipped with caller raters), O(H·R·N)
///   scoring, O(min(R,N)²·max(R,N)) rank, O(N) keep set, O(s²·d) recycling,
///   O(L) plan, with s = min(n, floor(fraction·n) + 1), n = N − keep.
/// - Scratch comes from `ws` (reuse it across steps: no allocation once sized);
///   the result's vectors are allocated.
/// - Errors: sparsevlm::error (see check_step); nothing is returned on error.
/// - Deterministic: same inputs, same decisions, on every run and thread count.
template <class TE, class TA, class TH>
step_result prune_step(const step_inputs<TE, TA, TH>& in, const step_options& opt,
                       workspace& ws) {
  check_step(in, opt);
  const index_t L = in.attn.extent(1);
  const index_t N = in.visual.len;
  step_result res;
  if (in.raters) {
    res.raters.assign(in.raters->begin(), in.raters->end());
  } else {
    res.raters = select_raters(in.embeds, in.visual, ws);
  }
  const index_t R = static_cast<index_t>(res.raters.size());

  res.scores.assign(static_cast<std::size_t>(N), 0.0f);
  // Rater selection is done with f32_a, so P can live there.
  matrix_view<float> P(workspace::take(ws.f32_a, static_cast<std::size_t>(R * N)), {R, N}, "P");
  relevance_scores(in.attn, res.raters, in.visual, P, res.scores);
  res.rank = R > 0 ? numerical_rank(matrix_view<const float>(P), ws) : 0;
  res.keep_count = keep_count(opt.policy, res.rank, N, R);

  const index_t pruned = N - res.keep_count;
  const bool recycling = opt.recycle.enabled && pruned > 0;
  const index_t s = recycling ? core::recycle_count(pruned, opt.recycle.fraction) : 0;
  std::vector<index_t>& order = ws.idx_b;
  select_keep(res.scores, in.visual.start, res.keep_count, s, res.keep, order, ws);
  if (recycling) {
    const index_t c = core::cluster_count(s, opt.recycle.cluster_divisor);
    recycle(in.hidden, in.visual, std::span<const index_t>(order.data(), static_cast<std::size_t>(s)),
            c, res.recycled, ws);
  } else {
    res.recycled.dim = in.hidden.extent(1);
  }
  res.sequence = make_sequence(L, in.visual, res.keep,
                               static_cast<index_t>(res.recycled.clusters.size()));
  return res;
}

/// Convenience overload with a temporary workspace.
template <class TE, class TA, class TH>
step_result prune_step(const step_inputs<TE, TA, TH>& in, const step_options& opt) {
  workspace ws;
  return prune_step(in, opt, ws);
}

}  // namespace sparsevlm
