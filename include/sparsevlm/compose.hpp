// The one composition of a SparseVLM pruning step (spec steps 1-8) over K >= 1
// visual spans of one sequence: prune_step (step.hpp, one span), prune_step_spans
// (spans.hpp, several), the prefill session and batches (through those two) and
// the tensor-parallel step (tensor_parallel.hpp) all run detail::run_step below,
// with the stage hook on every path. Also the span types and rules the
// composition needs (span_budget, span_options, span_part, spans_result,
// check_spans, make_sequence_spans); prune_step_spans (spans.hpp) is their entry.
#pragma once

#include <cstring>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "keep_count.hpp"
#include "keep_set.hpp"
#include "plan.hpp"
#include "rank.hpp"
#include "raters.hpp"
#include "recycle.hpp"
#include "types.hpp"
#include "workspace.hpp"

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

namespace detail {

/// make_sequence_spans (below) into `seq`, reusing its capacity.
inline void make_sequence_spans_into(index_t length, std::span<const visual_span> spans,
                                     std::span<const index_t> keep,
                                     std::span<const index_t> recycled,
                                     std::vector<index_t>& seq) {
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
  seq.clear();
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
}

}  // namespace detail

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
  std::vector<index_t> seq;
  detail::make_sequence_spans_into(length, spans, keep, recycled, seq);
  return seq;
}

namespace detail {

/// Spec step 1 with V = the union of the spans' rows and T = the tokens after the
/// last span. One span is select_raters itself; with several, the union's rows and
/// the text rows are converted (exactly) into the raters' own row buffers
/// (ws.raters: N·d_e and T·d_e floats, as for one span of converted rows), and
/// the same arithmetic runs in the same order as if the union were contiguous in
/// `embeds`. No allocation once the workspace is sized.
template <class TE>
void select_raters_spans(matrix_view<const TE> embeds, std::span<const visual_span> spans,
                         workspace& ws, std::vector<index_t>& raters) {
  if (spans.size() == 1) {
    select_raters_trusted(embeds, spans[0], ws, raters);
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
  const index_t Tn = L - text;
  float* vrows = workspace::take(ws.raters.visual, static_cast<std::size_t>(n * d));
  float* trows = workspace::take(ws.raters.text, static_cast<std::size_t>(Tn * d));
  const auto copy_rows = [&](float* out, index_t from, index_t to) {
    for (index_t p = from; p < to; ++p, out += d)
      for (index_t c = 0; c < d; ++c) out[c] = to_float(embeds(p, c));
    return out;
  };
  float* at = vrows;
  for (const visual_span& v : spans) at = copy_rows(at, v.start, v.end());
  copy_rows(trows, text, L);
  raters_from_rows(vrows, d, n, trows, d, Tn, d, text, ws, raters, [](index_t) {
    // Inputs are finite (checked above), so this is a float32 overflow; the
    // union's row numbers would mislead.
    fail(errc::non_finite, "embeds (visual rows against text rows)",
         "dot products that fit in float32", "an overflow to Inf");
  });
}

/// The default per-stage hook of the compositions.
struct no_op {
  void operator()(const char*) const noexcept {}
};

/// Parks a result's cluster member lists in the workspace rather than free them,
/// and empties its recycling.
inline void park_clusters(recycle_result& r, workspace& ws, index_t dim) {
  while (!r.clusters.empty()) {
    ws.spare_clusters.push_back(std::move(r.clusters.back()));
    r.clusters.pop_back();
  }
  r.merged.clear();
  r.dim = dim;
}

/// The step over `spans` (K >= 1, checked by the caller) around a scoring
/// callback `score(raters, visual, P, scores)` (relevance_scores or
/// relevance_scores_qk on one span); `done(stage)` after each stage, "raters",
/// "scores", "rank", "keep", "recycle", "plan" in that order.
///
/// - Raters: caller's, or spec step 1 over the union of the spans with the text
///   after the last (select_raters_spans; one span: select_raters itself).
/// - Scores and P, [R, n] over the union's columns: with `one_pass`, `score` runs
///   once on the hull [first start, last end) and the spans' columns are kept;
///   else once per span into the union's columns. Both give the same bits: every
///   score and P column depends on its own column only (the head mean, the
///   gravity correction), which is also why the union's P is each span's P side
///   by side. With one span both are the span itself.
/// - Rank and keep count: span_budget::global, the rank of the union's P and the
///   policy over n = all visual tokens (several spans: the top keep over the
///   union, split by span); per_span, each span's rank and policy (res.rank = −1).
/// - Keep sets and recycling, span by span (the spec's steps 6-7 on each span's
///   scores with its keep count, so clusters never cross spans); with several
///   spans the hook reports "keep" and "recycle" after the last span.
/// - Sequence: make_sequence (one span) or make_sequence_spans.
///
/// `res` (a step_result or a spans_result: the same fields) is written in place
/// (its vectors reused); `parts`, required with
/// several spans, receives one span_part per span (also reused). Nothing is
/// allocated once `ws`, `res` and `parts` have held a step of this shape.
template <class TE, class TH, class Result, class Score, class Done>
void run_step(matrix_view<const TE> embeds, matrix_view<const TH> hidden,
              std::span<const visual_span> spans,
              const std::optional<std::span<const index_t>>& raters, index_t L,
              const span_options& opt, workspace& ws, bool one_pass, Result& res,
              std::vector<span_part>* parts, Score&& score, Done&& done) {
  const std::size_t K = spans.size();
  SPARSEVLM_ASSERT(K >= 1 && (K == 1 || parts != nullptr));
  const bool several = K > 1;
  index_t n = 0;
  for (const visual_span& v : spans) n += v.len;
  const visual_span hull{spans.front().start, spans.back().end() - spans.front().start};

  // 1. Raters.
  if (raters) {
    res.raters.assign(raters->begin(), raters->end());
  } else {
    select_raters_spans(embeds, spans, ws, res.raters);
  }
  done("raters");
  const index_t R = static_cast<index_t>(res.raters.size());
  const std::span<const index_t> rs(res.raters);

  // 2-3. P and the scores. P is the step's own scratch: it outlives the scoring
  // stage, into the rank. One row even when R = 0, so that the column offsets
  // below stay inside the buffer.
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
  done("scores");

  // 4-5. Rank and keep counts.
  if (parts) {
    parts->resize(K);
    for (std::size_t i = 0; i < K; ++i) {
      span_part& part = (*parts)[i];
      part.visual = spans[i];
      part.rank = -1;
      part.keep_count = 0;
      part.first_cluster = part.clusters = 0;
    }
  }
  res.keep_count = 0;
  if (opt.budget == span_budget::global) {
    res.rank = R > 0 ? numerical_rank_trusted(matrix_view<const float>(P, {R, n}, "P"), ws) : 0;
    res.keep_count = keep_count(opt.policy, res.rank, n, R);
    if (several) {
      // The top keep_count over the union, split by span: restricted to one span,
      // the union's order (score, then position) is that span's, so each span's
      // share is the top of its own scores, chosen again below with its pruned
      // order.
      std::vector<index_t>& kept = res.keep;  // union indices for now
      select_keep_trusted(res.scores, 0, res.keep_count, 0, kept, ws.step.ranked, ws);
      std::size_t i = 0;
      index_t end = spans[0].len;
      for (index_t u : kept) {
        while (u >= end) end += spans[++i].len;
        ++(*parts)[i].keep_count;
      }
    } else if (parts) {
      (*parts)[0].keep_count = res.keep_count;
    }
  } else {
    res.rank = -1;
    index_t off = 0;
    for (std::size_t i = 0; i < K; ++i) {
      const index_t len = spans[i].len;
      const keep_policy& pol = opt.span_policies.empty() ? opt.policy : opt.span_policies[i];
      const matrix_view<const float> Pi(P + off, {R, len}, {n, 1}, "P");
      const index_t rank = R > 0 ? numerical_rank_trusted(Pi, ws) : 0;
      const index_t keep = keep_count(pol, rank, len, R);
      if (parts) (*parts)[i].rank = rank, (*parts)[i].keep_count = keep;
      res.keep_count += keep;
      off += len;
    }
  }
  done("rank");

  // 6-7. Keep sets and recycling, span by span. With one span the keep set and
  // the clusters go straight into `res`; with several, each span's into its part
  // and then appended.
  std::vector<index_t>& order = ws.step.ranked;
  if (!several) {
    const visual_span v = spans[0];
    const detail::core::recycle_counts rc =
        detail::core::recycled_counts(v.len - res.keep_count, opt.recycle.enabled, opt.recycle.fraction,
                              opt.recycle.cluster_divisor);
    select_keep_trusted(res.scores, v.start, res.keep_count, rc.rows, res.keep, order, ws);
    done("keep");
    if (rc.rows > 0) {
      recycle_trusted(hidden, v,
                      std::span<const index_t>(order.data(), static_cast<std::size_t>(rc.rows)),
                      rc.clusters, res.recycled, ws);
    } else {
      park_clusters(res.recycled, ws, hidden.extent(1));
    }
    done("recycle");
    const index_t c = static_cast<index_t>(res.recycled.clusters.size());
    if (parts) {
      span_part& part = (*parts)[0];
      part.keep = res.keep;
      part.clusters = c;
    }
    // 8. The sequence.
    write_sequence(L, v, res.keep, c, res.sequence);
    done("plan");
    return;
  }
  res.keep.clear();
  park_clusters(res.recycled, ws, hidden.extent(1));
  // One span's clusters land in ws.step.span_clusters and are moved on into
  // `res`; each span's cluster count in ws.step.span_counts (K <= N entries).
  recycle_result& rr = ws.step.span_clusters;
  index_t* recycled_per_span = workspace::take(ws.step.span_counts, K);
  index_t off = 0;
  for (std::size_t i = 0; i < K; ++i) {
    const visual_span v = spans[i];
    span_part& part = (*parts)[i];
    const detail::core::recycle_counts rc =
        detail::core::recycled_counts(v.len - part.keep_count, opt.recycle.enabled, opt.recycle.fraction,
                              opt.recycle.cluster_divisor);
    select_keep_trusted(std::span<const float>(res.scores).subspan(
                            static_cast<std::size_t>(off), static_cast<std::size_t>(v.len)),
                        v.start, part.keep_count, rc.rows, part.keep, order, ws);
    res.keep.insert(res.keep.end(), part.keep.begin(), part.keep.end());
    part.first_cluster = static_cast<index_t>(res.recycled.clusters.size());
    if (rc.rows > 0) {
      recycle_trusted(hidden, v,
                      std::span<const index_t>(order.data(), static_cast<std::size_t>(rc.rows)),
                      rc.clusters, rr, ws);
      part.clusters = static_cast<index_t>(rr.clusters.size());
      // The member lists move (their capacity with them); rr is left without
      // lists, and its next recycle() draws them from ws.spare_clusters.
      for (auto& members : rr.clusters) res.recycled.clusters.push_back(std::move(members));
      rr.clusters.clear();
      res.recycled.merged.insert(res.recycled.merged.end(), rr.merged.begin(), rr.merged.end());
    }
    recycled_per_span[i] = part.clusters;
    off += v.len;
  }
  done("keep");
  done("recycle");
  // 8. The sequence.
  make_sequence_spans_into(L, spans, res.keep, std::span<const index_t>(recycled_per_span, K),
                           res.sequence);
  done("plan");
}

}  // namespace detail

}  // namespace sparsevlm
