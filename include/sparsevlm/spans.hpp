// Several visual spans in one sequence: interleaved images, video frames. The
// span types (span_budget, span_options, span_part, spans_result), check_spans
// and make_sequence_spans are compose.hpp's, where the one composition of a step
// over K >= 1 spans lives; this header checks a multi-span step and runs it.
#pragma once

#include <cstring>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "step.hpp"

namespace sparsevlm {

namespace detail {

template <class TE, class TH>
void check_spans_common(matrix_view<const TE> embeds, matrix_view<const TH> hidden,
                        std::span<const visual_span> spans,
                        const std::optional<std::span<const index_t>>& raters, index_t L,
                        const char* l_name, const span_options& opt) {
  check_spans(spans, L, l_name);
  SPARSEVLM_CHECK(hidden.extent(0) == L, errc::shape_mismatch, "hidden.extent[0]",
                  concat(L, " (= ", l_name, ")"), hidden.extent(0));
  SPARSEVLM_CHECK(hidden.extent(1) >= 1, errc::shape_mismatch, "hidden.extent[1]", ">= 1",
                  hidden.extent(1));
  if (raters) {
    check_raters(*raters, spans.back(), L);  // after the last span
  } else {
    SPARSEVLM_CHECK(embeds.extent(0) == L, errc::shape_mismatch, "embeds.extent[0]",
                    concat(L, " (= ", l_name, ")"), embeds.extent(0));
    SPARSEVLM_CHECK(embeds.extent(1) >= 1, errc::shape_mismatch, "embeds.extent[1]", ">= 1",
                    embeds.extent(1));
  }
  if (opt.budget == span_budget::global) {
    SPARSEVLM_CHECK(opt.span_policies.empty(), errc::invalid_argument, "span_policies",
                    "empty with span_budget::global (one policy over the union)",
                    concat(opt.span_policies.size(), " policies"));
  } else if (!opt.span_policies.empty()) {
    SPARSEVLM_CHECK(opt.span_policies.size() == spans.size(), errc::invalid_argument,
                    "span_policies.size()", concat(spans.size(), " (one per span) or 0"),
                    opt.span_policies.size());
  }
  if (opt.span_policies.empty()) {
    check_policy(opt.policy);
  } else {
    for (std::size_t i = 0; i < opt.span_policies.size(); ++i) {
      try {
        check_policy(opt.span_policies[i]);
      } catch (const error& e) {
        throw error(e.code(), concat("span_policies[", i, "]: ", e.what()));
      }
    }
  }
  if (opt.recycle.enabled) check_recycle_options(opt.recycle);
  check_gravity(opt.scoring.gravity, L);
}

}  // namespace detail

/// Validates a multi-span step's inputs and options: the attention's shape (L
/// from attn), the span layout (check_spans), hidden/embeds extents, caller
/// raters (after the last span), the policies, the recycling options.
/// `in.visual` is not read: `spans` replaces it.
template <class TE, class TA, class TH>
void check_step_spans(const step_inputs<TE, TA, TH>& in, std::span<const visual_span> spans,
                      const span_options& opt) {
  const index_t L = in.attn.extent(1);
  SPARSEVLM_CHECK(in.attn.extent(0) >= 1, errc::shape_mismatch, "attn.extent[0] (heads)", ">= 1",
                  in.attn.extent(0));
  SPARSEVLM_CHECK(in.attn.extent(2) == L, errc::shape_mismatch, "attn.extent[2]",
                  detail::concat(L, " (= attn.extent[1], square attention)"), in.attn.extent(2));
  detail::check_spans_common(in.embeds, in.hidden, spans, in.raters, L, "attn.extent[1]", opt);
}

/// As above for the Q/K form (L from k.extent[1]).
template <class TE, class TQ, class TK, class TH>
void check_step_spans(const step_inputs_qk<TE, TQ, TK, TH>& in, std::span<const visual_span> spans,
                      const span_options& opt) {
  detail::check_spans_common(in.embeds, in.hidden, spans, in.raters, in.qk.k.extent(1),
                             "k.extent[1]", opt);
}

/// One pruning step over several visual spans of one sequence (interleaved
/// images, video frames). With one span it is prune_step, field for field.
///
/// Rules (docs/algorithm.md, "Several visual spans"):
/// - Raters: spec step 1 with V = the union of the spans and T = the tokens after
///   the last span (the question); caller raters must lie there too. Tokens
///   between spans are neither rated nor raters: they are kept as they are.
/// - Scores and P: each span's columns exactly as prune_step would score that
///   span with these raters (with `scoring.top_heads`, each span chooses its own
///   heads). The union's P is the spans' P side by side.
/// - span_budget::global: rank of the union's P, the policy applied with N = all
///   visual tokens, the keep set the top `keep` over the union (ties to the lower
///   position). span_budget::per_span: each span's rank, keep count and keep set
///   on its own. A fixed keep larger than the tokens it applies to is clamped to
///   N − 1 as in the spec (N of the union, or of the span).
/// - Recycling, in both modes: per span, the spec's rule on that span's pruned
///   count n_i (s_i = min(n_i, ⌊f·n_i⌋ + 1), c_i = ⌊s_i / divisor⌋ + 1), so a
///   cluster never mixes tokens of two spans.
/// - Sequence: make_sequence_spans; apply it with apply_plan and `recycled.merged`.
///
/// - Cost: as prune_step with N = all visual tokens, plus, for several spans
///   without caller raters, one float32 copy of the union and text rows of
///   `embeds` (in the workspace's rater rows); scoring from q/k reads each rater
///   row once for all spans (without top_heads), so spans add no O(H·R·L·dh)
///   passes. Rank: one O(R²·N) with the global budget, one per span with per_span.
/// - Allocation: none once `ws` and `out` have held a step of this layout (the
///   result is built in `ws.spans_out` and swapped into `out`, as
///   prune_step_into does; workspace::reserve sizes the buffers of one span of N
///   tokens, and the cluster lists of several spans are sized by the first step).
/// - Errors: sparsevlm::error (see check_step_spans and prune_step); `out` is
///   untouched on error. Deterministic.
/// - `done(stage)` as prune_step_into's hook; with several spans "keep" and
///   "recycle" are reported together, after the last span.
template <class TE, class TA, class TH, class Done = detail::no_op>
void prune_step_spans_into(const step_inputs<TE, TA, TH>& in, std::span<const visual_span> spans,
                           const span_options& opt, workspace& ws, spans_result& out,
                           Done&& done = {}) {
  check_step_spans(in, spans, opt);
  // Per span: reads only the visual columns, as prune_step does.
  detail::run_step(
      in.embeds, in.hidden, spans, in.raters, in.attn.extent(1), opt, ws, false, ws.spans_out,
      &ws.spans_out.spans,
      [&](std::span<const index_t> raters, visual_span v, matrix_view<float> P,
          std::span<float> scores) {
        detail::relevance_scores_trusted(in.attn, raters, v, P, scores, opt.scoring, ws);
      },
      std::forward<Done>(done));
  std::swap(out, ws.spans_out);
}

/// The Q/K form (fused-attention engines). Every rater row's softmax covers all
/// its keys anyway, so the spans are scored in one pass over the hull from the
/// first span's start to the last span's end; with `scoring.top_heads` (a choice
/// per span), one pass per span.
template <class TE, class TQ, class TK, class TH, class Done = detail::no_op>
void prune_step_spans_into(const step_inputs_qk<TE, TQ, TK, TH>& in,
                           std::span<const visual_span> spans, const span_options& opt,
                           workspace& ws, spans_result& out, Done&& done = {}) {
  check_step_spans(in, spans, opt);
  detail::run_step(
      in.embeds, in.hidden, spans, in.raters, in.qk.k.extent(1), opt, ws,
      opt.scoring.top_heads == 0, ws.spans_out, &ws.spans_out.spans,
      [&](std::span<const index_t> raters, visual_span v, matrix_view<float> P,
          std::span<float> scores) {
        detail::check_qk_args(in.qk, static_cast<index_t>(raters.size()));
        detail::relevance_scores_qk_trusted(in.qk, raters, v, P, scores, opt.scoring, ws);
      },
      std::forward<Done>(done));
  std::swap(out, ws.spans_out);
}

/// prune_step_spans_into returning a new result (either input form).
template <class Inputs, class Done = detail::no_op>
spans_result prune_step_spans(const Inputs& in, std::span<const visual_span> spans,
                              const span_options& opt, workspace& ws, Done&& done = {}) {
  spans_result out;
  prune_step_spans_into(in, spans, opt, ws, out, std::forward<Done>(done));
  return out;
}

/// Convenience overload with a temporary workspace (either input form).
template <class Inputs>
spans_result prune_step_spans(const Inputs& in, std::span<const visual_span> spans,
                              const span_options& opt) {
  workspace ws;
  return prune_step_spans(in, spans, opt, ws);
}

}  // namespace sparsevlm
