// One SparseVLM pruning step over one visual span: its inputs, their checks, and
// prune_step (the composition itself, shared with the multi-span step, is
// compose.hpp's detail::run_step).
#pragma once

#include <optional>
#include <span>
#include <utility>
#include <vector>

#include "compose.hpp"
#include "scores.hpp"
#include "scores_qk.hpp"

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

/// The same step for a fused-attention engine: queries and keys (and optionally
/// the LSE) in place of the attention probabilities. See relevance_scores_qk.
template <class TE, class TQ, class TK, class TH>
struct step_inputs_qk {
  matrix_view<const TE> embeds;   ///< [L, d_e]
  qk_view<TQ, TK> qk;             ///< q [H, L or R, dh], k [Hkv, L, dh], optional lse
  matrix_view<const TH> hidden;   ///< [L, d]
  visual_span visual;
  std::optional<std::span<const index_t>> raters;
};

namespace detail {

/// Checks shared by both input forms, with L taken from the attention source.
template <class TE, class TH>
void check_step_common(matrix_view<const TE> embeds, matrix_view<const TH> hidden,
                       visual_span visual, const std::optional<std::span<const index_t>>& raters,
                       index_t L, const char* l_name, const step_options& opt) {
  check_span(visual, L, l_name);
  SPARSEVLM_CHECK(hidden.extent(0) == L, errc::shape_mismatch, "hidden.extent[0]",
                  concat(L, " (= ", l_name, ")"), hidden.extent(0));
  SPARSEVLM_CHECK(hidden.extent(1) >= 1, errc::shape_mismatch, "hidden.extent[1]", ">= 1",
                  hidden.extent(1));
  if (raters) {
    check_raters(*raters, visual, L);
  } else {
    SPARSEVLM_CHECK(embeds.extent(0) == L, errc::shape_mismatch, "embeds.extent[0]",
                    concat(L, " (= ", l_name, ")"), embeds.extent(0));
    SPARSEVLM_CHECK(embeds.extent(1) >= 1, errc::shape_mismatch, "embeds.extent[1]", ">= 1",
                    embeds.extent(1));
  }
  check_policy(opt.policy);
  if (opt.recycle.enabled) check_recycle_options(opt.recycle);
  check_gravity(opt.scoring.gravity, L);
  // `hidden` is read only in the rows recycling merges, which recycle() checks:
  // a full scan would cost as much as compacting the hidden states.
}

/// The one composition (compose.hpp) over the single span `visual`, with the
/// global budget (a span_options that carries `opt`: no allocation).
template <class TE, class TH, class Score, class Done>
void run_single(matrix_view<const TE> embeds, matrix_view<const TH> hidden, visual_span visual,
                const std::optional<std::span<const index_t>>& raters, index_t L,
                const step_options& opt, workspace& ws, step_result& res, Score&& score,
                Done&& done) {
  const span_options so{span_budget::global, opt.policy, {}, opt.recycle, opt.scoring};
  run_step(embeds, hidden, std::span<const visual_span>(&visual, 1), raters, L, so, ws, false, res,
           nullptr, std::forward<Score>(score), std::forward<Done>(done));
}

}  // namespace detail

/// Validates a step's inputs and options: shapes agree (L from attn), the span is
/// inside the sequence with N >= 1, d >= 1, options in range, raters valid.
/// Throws sparsevlm::error naming the argument. (Values are checked where they
/// are read: embeds by rater selection, the attention by scoring, the hidden
/// rows that recycling merges by recycle().)
template <class TE, class TA, class TH>
void check_step(const step_inputs<TE, TA, TH>& in, const step_options& opt) {
  const index_t L = in.attn.extent(1);
  SPARSEVLM_CHECK(in.attn.extent(0) >= 1, errc::shape_mismatch, "attn.extent[0] (heads)", ">= 1",
                  in.attn.extent(0));
  SPARSEVLM_CHECK(in.attn.extent(2) == L, errc::shape_mismatch, "attn.extent[2]",
                  detail::concat(L, " (= attn.extent[1], square attention)"), in.attn.extent(2));
  detail::check_step_common(in.embeds, in.hidden, in.visual, in.raters, L, "attn.extent[1]", opt);
}

/// As above for the Q/K form (L from k.extent[1]; q/k/lse checked as in
/// relevance_scores_qk once the raters are known).
template <class TE, class TQ, class TK, class TH>
void check_step(const step_inputs_qk<TE, TQ, TK, TH>& in, const step_options& opt) {
  detail::check_step_common(in.embeds, in.hidden, in.visual, in.raters, in.qk.k.extent(1),
                            "k.extent[1]", opt);
}

/// One pruning step (spec steps 1-8) on the CPU, into a caller-held result.
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
/// - Allocation: none once `ws` (see workspace::reserve) and `out` have held a
///   step of this shape: every temporary lives in `ws`, and `out`'s vectors are
///   reused (the result is built in `ws.result` and swapped into `out`).
/// - Errors: sparsevlm::error (see check_step); `out` is untouched on error.
/// - Deterministic: same inputs, same decisions, on every run, thread count and
///   instruction set (cpu/kernel_table.hpp).
///
/// `done`, when given, is called as `done(stage)` right after each stage, with
/// stage "raters", "scores", "rank", "keep", "recycle", "plan" in that order (a
/// hook for per-stage timing or tracing; the default does nothing and costs
/// nothing).
template <class TE, class TA, class TH, class Done = detail::no_op>
void prune_step_into(const step_inputs<TE, TA, TH>& in, const step_options& opt, workspace& ws,
                     step_result& out, Done&& done = {}) {
  check_step(in, opt);
  detail::run_single(in.embeds, in.hidden, in.visual, in.raters, in.attn.extent(1), opt, ws,
                     ws.result,
                     [&](std::span<const index_t> raters, visual_span v, matrix_view<float> P,
                         std::span<float> scores) {
                       detail::relevance_scores_trusted(in.attn, raters, v, P, scores, opt.scoring, ws);
                     },
                     done);
  std::swap(out, ws.result);
}

/// One pruning step from queries and keys (fused-attention engines): the same
/// decisions as the attention form on the attention these q/k produce, with
/// scoring by relevance_scores_qk (cost O(H·R·L·dh), nothing of size L²).
template <class TE, class TQ, class TK, class TH, class Done = detail::no_op>
void prune_step_into(const step_inputs_qk<TE, TQ, TK, TH>& in, const step_options& opt,
                     workspace& ws, step_result& out, Done&& done = {}) {
  check_step(in, opt);
  detail::run_single(in.embeds, in.hidden, in.visual, in.raters, in.qk.k.extent(1), opt, ws,
                     ws.result,
                     [&](std::span<const index_t> raters, visual_span v, matrix_view<float> P,
                         std::span<float> scores) {
                       detail::check_qk_args(in.qk, static_cast<index_t>(raters.size()));
                       detail::relevance_scores_qk_trusted(in.qk, raters, v, P, scores, opt.scoring,
                                                           ws);
                     },
                     done);
  std::swap(out, ws.result);
}

/// prune_step_into returning a new result (allocates the result's vectors; the
/// temporaries still come from `ws`). Either input form.
template <class Inputs, class Done = detail::no_op>
step_result prune_step(const Inputs& in, const step_options& opt, workspace& ws,
                       Done&& done = {}) {
  step_result out;
  prune_step_into(in, opt, ws, out, std::forward<Done>(done));
  return out;
}

/// Convenience overload with a temporary workspace (either input form).
template <class Inputs>
step_result prune_step(const Inputs& in, const step_options& opt) {
  workspace ws;
  return prune_step(in, opt, ws);
}

}  // namespace sparsevlm
