// Tensor-parallel scoring: each rank's partial head sums, and the step finished
// from their all-reduced total.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <span>
#include <type_traits>
#include <utility>

#include "check.hpp"
#include "cpu/dispatch.hpp"
#include "raters.hpp"
#include "scores.hpp"
#include "scores_qk.hpp"
#include "step.hpp"
#include "types.hpp"
#include "workspace.hpp"

namespace sparsevlm {

// Scoring decomposes over heads:
//
//   P[r][j]  = (1/H) · Σ_h attn[h][raters[r]][S+j]
//   score[j] = (1/R) · Σ_r P[r][j]
//
// so a rank holding heads [h0, h1) computes the head sum over its heads
// (partial_relevance), the engine all-reduces the [R, N] sums (sum), and every
// rank finishes the step from the total (prune_step_from_head_sums). The rank
// stage needs P itself, not just the N scores, so the all-reduce carries R·N
// floats. The raters must be the same on every rank: each rank runs
// select_raters on its (replicated) input embeddings, which gives the same bits
// everywhere, or rank 0 runs it and broadcasts the R positions.
//
// Precision: with one rank the sums are the ones relevance_scores forms, and
// the result is bit-identical to prune_step with the same raters. With several,
// the all-reduce adds the ranks' partial sums in its own order, so P may differ
// from one process's in the last float32 bits; the decisions (rank, keep set,
// clusters, sequence) are the same unless a score or a singular value lies
// within float32 rounding of a decision boundary (the spec's cases keep 1e-6
// margins). Exact ties stay exact: identical columns get identical partial sums
// on every rank, hence identical totals in any reduction order.

namespace detail {

/// Copies a contiguous [R, N] buffer into a strided view.
inline void store_rows(const float* src, matrix_view<float> dst) {
  const index_t R = dst.extent(0), N = dst.extent(1);
  for (index_t r = 0; r < R; ++r)
    for (index_t j = 0; j < N; ++j) dst(r, j) = src[r * N + j];
}

/// Throws non_finite naming `name[h, row, c]` for the first NaN/Inf in row
/// `row` of head `h` of `v` ([heads, rows, dh]).
template <class T>
void check_finite_head_rows(tensor3_view<const T> v, index_t h, index_t row, const char* name) {
  for (index_t c = 0; c < v.extent(2); ++c) {
    const float x = to_float(v(h, row, c));
    if (!std::isfinite(x))
      fail(errc::non_finite, concat(name, "[", h, ", ", row, ", ", c, "]"), "a finite value", x);
  }
}

}  // namespace detail

/// One rank's share of the relevance matrix: the float32 head SUM (not the
/// mean) over its local heads, heads in order.
///
///   P_part[r][j] = Σ_{h < H_local} attn_local[h][raters[r]][S + j]
///
/// The additions are exactly those relevance_scores makes before it divides
/// by H (same kernels, same order, starting from 0), so with all H heads local
/// P_part is bit-identical to its head sums. Add the ranks' P_part (an
/// all-reduce) and pass the total to prune_step_from_head_sums.
///
/// - `attn_local`: [H_local, L, L] float32/float16/bfloat16 probabilities of
///   this rank's heads (row = query), any strides; H_local >= 1.
/// - `raters`: R absolute positions, ascending, inside the text (check_raters);
///   the same on every rank.
/// - `P_part`: [R, N] float32 output, any strides; untouched on error.
/// - Cost: O(H_local·R·N) reads, O(R·N) writes. Scratch from `ws`: R·N floats
///   (ws.partial.sums; a workspace reserved for the step's shape holds it).
/// - Errors: shape_mismatch for `attn_local` extents (H_local = 0, not square),
///   a span outside L, or `P_part` not [R, N]; invalid_argument for bad raters;
///   non_finite naming the element (`attn_local[h, q, c]`) when a value read is
///   NaN/Inf, or `P_part[r, j]` when finite values overflow.
template <class T>
void partial_relevance(tensor3_view<const T> attn_local, std::span<const index_t> raters,
                       visual_span visual, matrix_view<float> P_part, workspace& ws) {
  const index_t H = attn_local.extent(0);
  const index_t L = attn_local.extent(1);
  const index_t R = static_cast<index_t>(raters.size());
  const index_t N = visual.len;
  SPARSEVLM_CHECK(H >= 1, errc::shape_mismatch, "attn_local.extent[0] (local heads)", ">= 1", H);
  SPARSEVLM_CHECK(attn_local.extent(2) == L, errc::shape_mismatch, "attn_local.extent[2]",
                  detail::concat(L, " (= attn_local.extent[1], square attention)"),
                  attn_local.extent(2));
  detail::check_span(visual, L, "attn_local.extent[1]");
  check_raters(raters, visual, L);
  SPARSEVLM_CHECK(P_part.extent(0) == R && P_part.extent(1) == N, errc::shape_mismatch, "P_part",
                  detail::concat("[", R, ", ", N, "]"),
                  detail::concat("[", P_part.extent(0), ", ", P_part.extent(1), "]"));
  if (R == 0) return;

  // Summed in scratch, so that P_part is untouched when a NaN turns up.
  float* acc = workspace::take(ws.partial.sums, static_cast<std::size_t>(R * N));
  std::fill(acc, acc + R * N, 0.0f);
  const cpu::detail::kernel_table& k = cpu::detail::kernels();
  const index_t as = attn_local.stride(2);
  for (index_t h = 0; h < H; ++h)
    for (index_t r = 0; r < R; ++r)
      detail::add_widened(k, acc + r * N, 1,
                          &attn_local(h, raters[static_cast<std::size_t>(r)], visual.start), N, as);
  if (!detail::row_all_finite(acc, R * N)) {
    // A NaN/Inf read reaches its sum; name the element, not the sum.
    for (index_t r = 0; r < R; ++r)
      for (index_t j = 0; j < N; ++j) {
        if (std::isfinite(acc[r * N + j])) continue;
        const index_t q = raters[static_cast<std::size_t>(r)];
        for (index_t h = 0; h < H; ++h) {
          const float v = to_float(attn_local(h, q, visual.start + j));
          if (!std::isfinite(v))
            detail::fail(errc::non_finite,
                         detail::concat("attn_local[", h, ", ", q, ", ", visual.start + j, "]"),
                         "a finite value", v);
        }
        detail::fail(errc::non_finite, detail::concat("P_part[", r, ", ", j, "]"),
                     "a finite sum of attention values", "an overflow to Inf");
      }
  }
  detail::store_rows(acc, P_part);
}

/// As above with a temporary workspace.
template <class T>
void partial_relevance(tensor3_view<const T> attn_local, std::span<const index_t> raters,
                       visual_span visual, matrix_view<float> P_part) {
  workspace ws;
  partial_relevance(attn_local, raters, visual, P_part, ws);
}

/// partial_relevance from this rank's queries and keys (fused attention): the
/// head sum over the local query heads of the rater rows' causal softmax,
/// recomputed as relevance_scores_qk does (see scores_qk.hpp).
///
///   P_part[r][j] = Σ_{h < H_local} a[h][raters[r]][S + j]
///
/// Each local query head runs through relevance_scores_qk alone (with its key
/// head), and the heads' rows are added in order from 0: the values and
/// additions of relevance_scores_qk's own head sum, so with all heads local
/// P_part is bit-identical to it.
///
/// - `qk_local`: q [H_local, L or R, dh], k [Hkv_local, L, dh] with
///   H_local % Hkv_local == 0 (local query head h reads local key head
///   h / (H_local / Hkv_local): a contiguous block of query heads with the key
///   heads it uses, or one replicated key head), optional lse [H_local, L or R];
///   float32/float16/bfloat16, any strides.
/// - `raters`, `P_part`: as partial_relevance; P_part untouched on error.
/// - Cost: relevance_scores_qk's, O(H_local·R·L·dh), plus refilling the key head
///   once per query head instead of once per key head (O(H_local·L·dh) widening)
///   and O(H_local·R·N) adds. Scratch from `ws`: relevance_scores_qk's, plus
///   R·N floats (ws.partial.sums) and R·N + N floats (ws.partial.head).
/// - Errors: as relevance_scores_qk (shape_mismatch, invalid_argument), and
///   non_finite naming `q[h, row, c]` / `k[g, u, c]` (local head indices) or the
///   lse; overflowing logits are reported with the local query head, the inner
///   message counting that head as head 0.
template <class TQ, class TK>
void partial_relevance_qk(const qk_view<TQ, TK>& qk_local, std::span<const index_t> raters,
                          visual_span visual, matrix_view<float> P_part, workspace& ws) {
  detail::check_qk(qk_local, raters, visual);
  const index_t H = qk_local.q.extent(0), Lq = qk_local.q.extent(1), dh = qk_local.q.extent(2);
  const index_t Hkv = qk_local.k.extent(0), L = qk_local.k.extent(1);
  const index_t R = static_cast<index_t>(raters.size());
  const index_t N = visual.len;
  SPARSEVLM_CHECK(P_part.extent(0) == R && P_part.extent(1) == N, errc::shape_mismatch, "P_part",
                  detail::concat("[", R, ", ", N, "]"),
                  detail::concat("[", P_part.extent(0), ", ", P_part.extent(1), "]"));
  if (R == 0) return;
  if (qk_local.lse) detail::check_finite_rows(*qk_local.lse, 0, H, "lse");
  // Checked up front (O((H·R + Hkv·t_max)·dh), small beside the logits) so that
  // the messages carry the local head indices, not those of the one-head views.
  const index_t group = H / Hkv;
  const index_t kmax = raters[static_cast<std::size_t>(R - 1)] + 1;
  for (index_t h = 0; h < H; ++h)
    for (index_t r = 0; r < R; ++r)
      detail::check_finite_head_rows(qk_local.q, h, Lq == L ? raters[static_cast<std::size_t>(r)] : r,
                                     "q");
  for (index_t g = 0; g < Hkv; ++g)
    for (index_t u = 0; u < kmax; ++u) detail::check_finite_head_rows(qk_local.k, g, u, "k");

  float* acc = workspace::take(ws.partial.sums, static_cast<std::size_t>(R * N));
  // Both are this stage's own: relevance_scores_qk, called per head below, uses others.
  float* one = workspace::take(ws.partial.head, static_cast<std::size_t>(R * N + N));
  std::fill(acc, acc + R * N, 0.0f);
  const matrix_view<float> P_one(one, {R, N}, "P");
  const std::span<float> s_one(one + R * N, static_cast<std::size_t>(N));
  for (index_t h = 0; h < H; ++h) {
    const index_t g = h / group;
    qk_view<TQ, TK> head{
        tensor3_view<const TQ>(&qk_local.q(h, 0, 0), {1, Lq, dh}, qk_local.q.strides(), "q"),
        tensor3_view<const TK>(&qk_local.k(g, 0, 0), {1, L, dh}, qk_local.k.strides(), "k"),
        std::nullopt, qk_local.scale};
    if (qk_local.lse)
      head.lse = matrix_view<const float>(&(*qk_local.lse)(h, 0), {1, Lq}, qk_local.lse->strides(),
                                          "lse");
    try {
      // One head: P_one is its rows (0 + a, divided by 1: exact).
      relevance_scores_qk(head, raters, visual, P_one, s_one, score_options{}, ws);
    } catch (const error& e) {
      throw error(e.code(), detail::concat("local query head ", h, ": ", e.what()));
    }
    for (index_t i = 0; i < R * N; ++i) acc[i] += one[i];
  }
  detail::store_rows(acc, P_part);
}

/// As above with a temporary workspace.
template <class TQ, class TK>
void partial_relevance_qk(const qk_view<TQ, TK>& qk_local, std::span<const index_t> raters,
                          visual_span visual, matrix_view<float> P_part) {
  workspace ws;
  partial_relevance_qk(qk_local, raters, visual, P_part, ws);
}

/// What every rank has after the all-reduce: the inputs of the rest of a step.
template <class TH>
struct head_sum_inputs {
  /// [R, N] float32: Σ over ALL H heads of attn[h][raters[r]][S + j], the sum of
  /// the ranks' partial_relevance outputs.
  matrix_view<const float> P_sum;
  index_t heads = 0;              ///< H, the total head count over all ranks
  matrix_view<const TH> hidden;   ///< [L, d] this layer's output hidden states
  visual_span visual;             ///< [S, S+N)
  /// The R raters the partial sums were formed for (absolute, ascending, inside
  /// the text): select_raters on the replicated embeddings, or broadcast.
  std::span<const index_t> raters;
};

/// Validates head_sum_inputs and options (as check_step; L is hidden.extent[0]):
/// heads >= 1, span inside L with N >= 1, d >= 1, raters valid, P_sum [R, N],
/// policy and recycling in range, and no scoring option that needs per-head data
/// (top_heads, gravity). Throws sparsevlm::error naming the argument. P_sum's
/// values are checked where they are read.
template <class TH>
void check_step(const head_sum_inputs<TH>& in, const step_options& opt) {
  SPARSEVLM_CHECK(in.heads >= 1, errc::invalid_argument, "heads", ">= 1 (H, all ranks' heads)",
                  in.heads);
  const index_t L = in.hidden.extent(0);
  detail::check_step_common(matrix_view<const float>{}, in.hidden, in.visual,
                            std::optional<std::span<const index_t>>(in.raters), L,
                            "hidden.extent[0]", opt);
  SPARSEVLM_CHECK(opt.scoring.top_heads == 0, errc::invalid_argument, "scoring.top_heads",
                  "0 (head selection ranks each head's total, which the head sums no longer "
                  "hold)",
                  opt.scoring.top_heads);
  SPARSEVLM_CHECK(!opt.scoring.gravity.enabled, errc::invalid_argument, "scoring.gravity.enabled",
                  "false (the gravity correction divides each head's probabilities before "
                  "they are summed)",
                  "true");
  const index_t R = static_cast<index_t>(in.raters.size());
  SPARSEVLM_CHECK(in.P_sum.extent(0) == R && in.P_sum.extent(1) == in.visual.len,
                  errc::shape_mismatch, "P_sum", detail::concat("[", R, ", ", in.visual.len, "]"),
                  detail::concat("[", in.P_sum.extent(0), ", ", in.P_sum.extent(1), "]"));
}

/// The rest of a pruning step (spec steps 3-8) from the all-reduced head sums,
/// into a caller-held result: P = P_sum / H, the scores, rank, keep count, keep
/// set, recycling and the new sequence, exactly as prune_step_into computes them
/// (detail::run_step; P divided and the scores formed by detail::finish_scores).
/// With one rank, P_sum from partial_relevance over all heads, and the same
/// raters, the result is bit-identical to prune_step's; with several, see the
/// precision note at the top of this header.
///
/// - Shapes: P_sum [R, N] float32 (any strides), hidden [L, d] (float32/float16/
///   bfloat16, any strides), N >= 1; `raters` as used for the partial sums.
/// - Cost: O(R·N) to copy and divide P_sum, then prune_step's rank, keep,
///   recycling and plan costs; no rater selection, no attention.
/// - Allocation: none once `ws` and `out` have held a step of this shape (as
///   prune_step_into).
/// - Errors: sparsevlm::error (check_step above; non_finite naming
///   `P_sum[r, j]` for a NaN/Inf, or `scores[j]` on overflow); `out` is untouched
///   on error. `opt.scoring` must be default: top_heads and gravity need
///   per-head data (invalid_argument).
/// - `done(stage)` as prune_step_into: "raters" (the given raters copied),
///   "scores", "rank", "keep", "recycle", "plan".
template <class TH, class Done = detail::no_op>
void prune_step_from_head_sums_into(const head_sum_inputs<TH>& in, const step_options& opt,
                                    workspace& ws, step_result& out, Done&& done = {}) {
  check_step(in, opt);
  detail::run_single(
      matrix_view<const float>{}, in.hidden, in.visual,
      std::optional<std::span<const index_t>>(in.raters), in.hidden.extent(0), opt, ws, ws.result,
      [&](std::span<const index_t>, visual_span, matrix_view<float> P, std::span<float> scores) {
        const index_t R = P.extent(0), N = P.extent(1);
        detail::check_finite_rows(in.P_sum, 0, R, "P_sum");
        for (index_t r = 0; r < R; ++r)
          for (index_t j = 0; j < N; ++j) P(r, j) = in.P_sum(r, j);
        detail::finish_scores(P, scores, in.heads);
        for (index_t j = 0; j < N; ++j)
          SPARSEVLM_CHECK(std::isfinite(scores[static_cast<std::size_t>(j)]), errc::non_finite,
                          detail::concat("scores[", j, "]"), "a finite sum of attention values",
                          "an overflow to Inf");
      },
      done);
  std::swap(out, ws.result);
}

/// prune_step_from_head_sums_into returning a new result.
template <class TH, class Done = detail::no_op>
step_result prune_step_from_head_sums(const head_sum_inputs<TH>& in, const step_options& opt,
                                      workspace& ws, Done&& done = {}) {
  step_result out;
  prune_step_from_head_sums_into(in, opt, ws, out, std::forward<Done>(done));
  return out;
}

/// Convenience overload with a temporary workspace.
template <class TH>
step_result prune_step_from_head_sums(const head_sum_inputs<TH>& in, const step_options& opt) {
  workspace ws;
  return prune_step_from_head_sums(in, opt, ws);
}

}  // namespace sparsevlm
