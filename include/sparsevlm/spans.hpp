// Several visual spans in one sequence: interleaved images, video frames.
#pragma once

#include <cstring>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "step.hpp"

namespace sparsevlm {

/// How the keep budget of a step with several visual spans is spread.
enum class span_budget {
  /// One policy over the union: N = all visual tokens, one rank (of P over every
  /// visual column), one top-`keep` by score over the union.
  global,
  /// Each span on its own: its own N, rank and keep count (`span_options::policy`,
  /// or `span_policies[i]`), the top of that span's scores.
  per_span,
};

/// Options of prune_step_spans: step_options plus how the budget is spread.
struct span_options {
  span_budget budget = span_budget::global;
  keep_policy policy{};  ///< global: over the union; per_span: each span's (unless below)
  /// per_span only: one policy per span, in span order; empty means `policy` for
  /// every span. Must be empty with span_budget::global.
  std::span<const keep_policy> span_policies{};
  recycle_options recycle{};
  score_options scoring{};
};

/// One span's part of a multi-span step.
struct span_part {
  visual_span visual;
  /// per_span: the numerical rank of this span's P (its R rows and N_i columns);
  /// global: -1 (only the union's rank is computed, spans_result::rank).
  index_t rank = -1;
  index_t keep_count = 0;
  std::vector<index_t> keep;  ///< absolute positions, ascending
  /// This span's clusters are spans_result::recycled.clusters[first_cluster,
  /// first_cluster + clusters) (and the same rows of `merged`).
  index_t first_cluster = 0;
  index_t clusters = 0;
};

/// Everything a multi-span step decides. With one span every field equals
/// prune_step's step_result (rank: in global mode).
struct spans_result {
  std::vector<index_t> raters;  ///< absolute positions after the last span, ascending
  std::vector<float> scores;    ///< one per visual token: span 0's, then span 1's, ...
  index_t rank = -1;            ///< global: rank of P over the union; per_span: -1
  index_t keep_count = 0;       ///< kept tokens over all spans
  std::vector<index_t> keep;    ///< every kept position, ascending
  /// Every span's clusters, span after span (each span's in the spec's order);
  /// merged row i is recycled token i. Clusters never cross spans.
  recycle_result recycled;
  std::vector<span_part> spans;  ///< one per span, in span order
  /// The new sequence as source positions; -(i + 1) stands for recycled token i
  /// (numbered across spans in sequence order), so apply_plan takes it as is.
  std::vector<index_t> sequence;
};

/// Validates a layout of visual spans in a sequence of `length` tokens: at least
/// one span; each with start >= 0, len >= 1 and inside [0, length); sorted by
/// position and not overlapping (spans[i].start >= spans[i-1].end(); adjacent
/// spans are allowed and stay separate spans).
/// Errors: shape_mismatch naming the span, e.g. "spans[1].start: expected >= 40
/// (the end of spans[0]: ...), got 35".
inline void check_spans(std::span<const visual_span> spans, index_t length,
                        const char* length_name) {
  using detail::concat;
  SPARSEVLM_CHECK(!spans.empty(), errc::shape_mismatch, "spans", "at least one visual span",
                  "none");
  for (std::size_t i = 0; i < spans.size(); ++i) {
    const visual_span v = spans[i];
    SPARSEVLM_CHECK(v.start >= 0, errc::shape_mismatch, concat("spans[", i, "].start"), ">= 0",
                    v.start);
    SPARSEVLM_CHECK(v.len >= 1, errc::shape_mismatch, concat("spans[", i, "].len"),
                    ">= 1 (an empty span has nothing to prune)", v.len);
    SPARSEVLM_CHECK(v.start <= length && v.len <= length - v.start, errc::shape_mismatch,
                    concat("spans[", i, "]"),
                    concat("a span inside [0, ", length, ") (", length_name, ")"),
                    concat("start ", v.start, ", len ", v.len));
    if (i > 0) {
      const index_t prev_end = spans[i - 1].end();
      SPARSEVLM_CHECK(v.start >= prev_end, errc::shape_mismatch, concat("spans[", i, "].start"),
                      concat(">= ", prev_end, " (the end of spans[", i - 1,
                             "]: spans sorted by position, not overlapping)"),
                      v.start);
    }
  }
}

/// The new sequence of a multi-span step: every non-visual position in order;
/// each span replaced by its kept positions (ascending) followed by its recycled
/// tokens. Recycled tokens are numbered across spans in sequence order: span i's
/// are -(first_i + 1) ... -(first_i + recycled[i]), first_i = Σ_{j<i} recycled[j].
///
/// - `keep`: every kept position, ascending, unique, each inside a span;
///   `recycled`: one count per span, each in [0, N_i − kept in span i].
/// - Every source entry p at output index i satisfies p >= i, so
///   apply_plan_inplace applies it.
/// - Cost O(L). Errors: shape_mismatch / invalid_argument.
inline std::vector<index_t> make_sequence_spans(index_t length, std::span<const visual_span> spans,
                                                std::span<const index_t> keep,
                                                std::span<const index_t> recycled) {
  using detail::concat;
  check_spans(spans, length, "length");
  SPARSEVLM_CHECK(recycled.size() == spans.size(), errc::shape_mismatch, "recycled.size()",
                  concat(spans.size(), " (one count per span)"), recycled.size());
  std::size_t k = 0;  // next entry of keep
  index_t total = length;
  for (std::size_t i = 0; i < spans.size(); ++i) {
    const visual_span v = spans[i];
    const std::size_t first = k;
    while (k < keep.size() && keep[k] < v.end()) {
      SPARSEVLM_CHECK(keep[k] >= v.start && (k == 0 || keep[k] > keep[k - 1]),
                      errc::invalid_argument, concat("keep[", k, "]"),
                      concat("ascending, unique positions inside the spans (here [", v.start, ", ",
                             v.end(), "))"),
                      keep[k]);
      ++k;
    }
    const index_t kept = static_cast<index_t>(k - first);
    SPARSEVLM_CHECK(recycled[i] >= 0 && recycled[i] <= v.len - kept, errc::invalid_argument,
                    concat("recycled[", i, "]"),
                    concat("in [0, ", v.len - kept, "] (span ", i, "'s pruned count)"),
                    recycled[i]);
    total += kept + recycled[i] - v.len;
  }
  SPARSEVLM_CHECK(k == keep.size(), errc::invalid_argument, concat("keep[", k, "]"),
                  concat("a position inside the spans (the last ends at ", spans.back().end(), ")"),
                  k < keep.size() ? keep[k] : 0);
  std::vector<index_t> seq;
  seq.reserve(static_cast<std::size_t>(total));
  index_t p = 0, next_recycled = 0;
  k = 0;
  for (std::size_t i = 0; i < spans.size(); ++i) {
    const visual_span v = spans[i];
    for (; p < v.start; ++p) seq.push_back(p);
    for (; k < keep.size() && keep[k] < v.end(); ++k) seq.push_back(keep[k]);
    for (index_t q = 0; q < recycled[i]; ++q) seq.push_back(-(++next_recycled));
    p = v.end();
  }
  for (; p < length; ++p) seq.push_back(p);
  return seq;
}

namespace detail {

/// Spec step 1 with V = the union of the spans' rows and T = the tokens after the
/// last span. One span is select_raters itself; several are copied (as float32,
/// exactly) into one [N + T, d] block, union rows then text rows, on which
/// select_raters runs with the visual span [0, N): the same arithmetic in the
/// same order as if the union were contiguous in `embeds`.
template <class TE>
void select_raters_spans(matrix_view<const TE> embeds, std::span<const visual_span> spans,
                         workspace& ws, std::vector<index_t>& raters) {
  if (spans.size() == 1) {
    select_raters(embeds, spans[0], ws, raters);
    return;
  }
  const index_t L = embeds.extent(0), d = embeds.extent(1);
  const index_t text = spans.back().end();
  if (text == L) {
    raters.clear();
    return;
  }
  index_t n = 0;
  for (const visual_span& v : spans) n += v.len;
  // Checked here, in `embeds`' own rows, so that an error names the real element.
  for (const visual_span& v : spans) check_finite_rows(embeds, v.start, v.end(), "embeds");
  check_finite_rows(embeds, text, L, "embeds");
  // A step-sized copy the workspace has no slot for (only with several spans and
  // no caller raters): O((N + T)·d), as much as reading the rows.
  std::vector<float> block(static_cast<std::size_t>((n + L - text) * d));
  index_t row = 0;
  const auto copy_rows = [&](index_t from, index_t to) {
    for (index_t p = from; p < to; ++p, ++row)
      for (index_t c = 0; c < d; ++c)
        block[static_cast<std::size_t>(row * d + c)] = to_float(embeds(p, c));
  };
  for (const visual_span& v : spans) copy_rows(v.start, v.end());
  copy_rows(text, L);
  try {
    select_raters(matrix_view<const float>(block.data(), {n + L - text, d}, "embeds"),
                  visual_span{0, n}, ws, raters);
  } catch (const error& e) {
    // Inputs are finite (checked above), so this is a float32 overflow; the
    // copy's row numbers would mislead.
    if (e.code() != errc::non_finite) throw;
    fail(errc::non_finite, "embeds (visual rows against text rows)",
         "dot products that fit in float32", "an overflow to Inf");
  }
  for (index_t& r : raters) r += text - n;
}

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
}

/// The multi-span step around a scoring callback `score(raters, visual, P, scores)`
/// (relevance_scores or relevance_scores_qk on one span). With `one_pass`, the
/// callback runs once on the hull [first start, last end) and the spans' columns
/// are kept; else once per span into the union's columns. Both give the same
/// bits: every score and P column depends on its own column only (the head mean,
/// the gravity correction), which is also why the union's P is each span's P
/// side by side.
template <class TE, class TH, class Score>
spans_result run_spans(matrix_view<const TE> embeds, matrix_view<const TH> hidden,
                       std::span<const visual_span> spans,
                       const std::optional<std::span<const index_t>>& raters, index_t L,
                       const span_options& opt, workspace& ws, bool one_pass, Score&& score) {
  const std::size_t K = spans.size();
  index_t n = 0;
  for (const visual_span& v : spans) n += v.len;
  const visual_span hull{spans.front().start, spans.back().end() - spans.front().start};

  spans_result res;
  if (raters) {
    res.raters.assign(raters->begin(), raters->end());
  } else {
    select_raters_spans(embeds, spans, ws, res.raters);
  }
  const index_t R = static_cast<index_t>(res.raters.size());
  const std::span<const index_t> rs(res.raters);

  // P over the union's columns, span after span, row-major [R, n] in the step's
  // own scratch (as prune_step). One row even when R = 0, so that the column
  // offsets below stay inside the buffer.
  const index_t width = one_pass ? hull.len : n;
  float* P = workspace::take(ws.step.P, static_cast<std::size_t>((R > 0 ? R : 1) * width));
  if (one_pass) {
    res.scores.assign(static_cast<std::size_t>(hull.len), 0.0f);
    score(rs, hull, matrix_view<float>(P, {R, hull.len}, "P"), std::span<float>(res.scores));
    if (hull.len != n) {  // drop the columns between spans; every move is to a lower address
      for (index_t r = 0; r < R; ++r) {
        index_t dst = r * n;
        for (const visual_span& v : spans) {
          std::memmove(P + dst, P + r * hull.len + (v.start - hull.start),
                       static_cast<std::size_t>(v.len) * sizeof(float));
          dst += v.len;
        }
      }
      index_t dst = 0;
      for (const visual_span& v : spans) {
        std::memmove(res.scores.data() + dst, res.scores.data() + (v.start - hull.start),
                     static_cast<std::size_t>(v.len) * sizeof(float));
        dst += v.len;
      }
      res.scores.resize(static_cast<std::size_t>(n));
    }
  } else {
    res.scores.assign(static_cast<std::size_t>(n), 0.0f);
    index_t off = 0;
    for (const visual_span& v : spans) {
      score(rs, v, matrix_view<float>(P + off, {R, v.len}, {n, 1}, "P"),
            std::span<float>(res.scores).subspan(static_cast<std::size_t>(off),
                                                 static_cast<std::size_t>(v.len)));
      off += v.len;
    }
  }

  res.spans.resize(K);
  for (std::size_t i = 0; i < K; ++i) res.spans[i].visual = spans[i];
  if (opt.budget == span_budget::global) {
    res.rank = R > 0 ? numerical_rank(matrix_view<const float>(P, {R, n}, "P"), ws) : 0;
    res.keep_count = keep_count(opt.policy, res.rank, n, R);
    // The top keep_count over the union, split by span: restricted to one span,
    // the union's order (score, then position) is that span's, so each span's
    // share is the top of its own scores, chosen again below with its pruned order.
    std::vector<index_t>& kept = res.keep;  // union indices for now
    select_keep(res.scores, 0, res.keep_count, 0, kept, ws.step.ranked, ws);
    std::size_t i = 0;
    index_t end = spans[0].len;
    for (index_t u : kept) {
      while (u >= end) end += spans[++i].len;
      ++res.spans[i].keep_count;
    }
  } else {
    index_t off = 0;
    for (std::size_t i = 0; i < K; ++i) {
      const index_t len = spans[i].len;
      const keep_policy& pol = opt.span_policies.empty() ? opt.policy : opt.span_policies[i];
      span_part& part = res.spans[i];
      part.rank =
          R > 0 ? numerical_rank(matrix_view<const float>(P + off, {R, len}, {n, 1}, "P"), ws) : 0;
      part.keep_count = keep_count(pol, part.rank, len, R);
      res.keep_count += part.keep_count;
      off += len;
    }
  }

  // Keep sets and recycling, span by span: the spec's steps 6-7 on each span's
  // scores with its keep count, so clusters never cross spans.
  res.keep.clear();
  res.recycled.dim = hidden.extent(1);
  std::vector<index_t> recycled_per_span(K, 0);
  recycle_result rr;  // one span's clusters, appended to res.recycled
  index_t off = 0;
  for (std::size_t i = 0; i < K; ++i) {
    const visual_span v = spans[i];
    span_part& part = res.spans[i];
    const core::recycle_counts rc = core::recycled_counts(
        v.len - part.keep_count, opt.recycle.enabled, opt.recycle.fraction,
        opt.recycle.cluster_divisor);
    const index_t s = rc.rows;
    std::vector<index_t>& order = ws.step.ranked;
    select_keep(std::span<const float>(res.scores).subspan(static_cast<std::size_t>(off),
                                                           static_cast<std::size_t>(v.len)),
                v.start, part.keep_count, s, part.keep, order, ws);
    res.keep.insert(res.keep.end(), part.keep.begin(), part.keep.end());
    part.first_cluster = static_cast<index_t>(res.recycled.clusters.size());
    if (s > 0) {
      recycle(hidden, v, std::span<const index_t>(order.data(), static_cast<std::size_t>(s)),
              rc.clusters, rr, ws);
      part.clusters = static_cast<index_t>(rr.clusters.size());
      res.recycled.clusters.insert(res.recycled.clusters.end(), rr.clusters.begin(),
                                   rr.clusters.end());
      res.recycled.merged.insert(res.recycled.merged.end(), rr.merged.begin(), rr.merged.end());
    }
    recycled_per_span[i] = part.clusters;
    off += v.len;
  }
  res.sequence = make_sequence_spans(L, spans, res.keep, recycled_per_span);
  return res;
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
///   without caller raters, one copy of the union and text rows of `embeds`
///   (allocated); scoring from q/k reads each rater row once for all spans
///   (without top_heads), so spans add no O(H·R·L·dh) passes. Rank: one
///   O(R²·N) with the global budget, one per span with per_span.
/// - Errors: sparsevlm::error (see check_step_spans and prune_step); nothing is
///   returned on error. Deterministic.
template <class TE, class TA, class TH>
spans_result prune_step_spans(const step_inputs<TE, TA, TH>& in,
                              std::span<const visual_span> spans, const span_options& opt,
                              workspace& ws) {
  check_step_spans(in, spans, opt);
  // Per span: reads only the visual columns, as prune_step does.
  return detail::run_spans(in.embeds, in.hidden, spans, in.raters, in.attn.extent(1), opt, ws,
                           false,
                           [&](std::span<const index_t> raters, visual_span v, matrix_view<float> P,
                               std::span<float> scores) {
                             relevance_scores(in.attn, raters, v, P, scores, opt.scoring, ws);
                           });
}

/// The Q/K form (fused-attention engines). Every rater row's softmax covers all
/// its keys anyway, so the spans are scored in one pass over the hull from the
/// first span's start to the last span's end; with `scoring.top_heads` (a choice
/// per span), one pass per span.
template <class TE, class TQ, class TK, class TH>
spans_result prune_step_spans(const step_inputs_qk<TE, TQ, TK, TH>& in,
                              std::span<const visual_span> spans, const span_options& opt,
                              workspace& ws) {
  check_step_spans(in, spans, opt);
  return detail::run_spans(in.embeds, in.hidden, spans, in.raters, in.qk.k.extent(1), opt, ws,
                           opt.scoring.top_heads == 0,
                           [&](std::span<const index_t> raters, visual_span v, matrix_view<float> P,
                               std::span<float> scores) {
                             relevance_scores_qk(in.qk, raters, v, P, scores, opt.scoring, ws);
                           });
}

/// Convenience overload with a temporary workspace (either input form).
template <class Inputs>
spans_result prune_step_spans(const Inputs& in, std::span<const visual_span> spans,
                              const span_options& opt) {
  workspace ws;
  return prune_step_spans(in, spans, opt, ws);
}

}  // namespace sparsevlm
