// Stage 2 and 3 for fused-attention engines: P and the scores from Q and K.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <span>

#include "check.hpp"
#include "raters.hpp"
#include "cpu/dispatch.hpp"
#include "scores.hpp"
#include "workspace.hpp"

namespace sparsevlm {

/// What a FlashAttention-style engine has at a pruning layer, in place of the
/// attention probabilities. Element types may differ between q and k.
///
/// Masking: causal only (row t attends to keys 0..t), the spec's mask. Sliding
/// windows, ALiBi, soft-capping and other score modifiers are not supported:
/// with them the probabilities computed here would differ from the engine's.
template <class TQ, class TK>
struct qk_view {
  /// [H, L, dh] all queries (rater r is row raters[r]), or [H, R, dh] only the
  /// rater rows, in rater order. After RoPE.
  tensor3_view<const TQ> q;
  /// [Hkv, L, dh] keys after RoPE; H % Hkv == 0, query head h reads key head
  /// h / (H / Hkv) (Hugging Face's repeat_kv layout).
  tensor3_view<const TK> k;
  /// Optional [H, Lq] float32 natural-log log-sum-exp of each query row's scaled
  /// logits over its causal keys (FlashAttention-2/3 `softmax_lse`; Lq as for q).
  /// FlashInfer returns base-2 LSE: multiply it by ln 2 first.
  std::optional<matrix_view<const float>> lse;
  /// Softmax scale; 0 means 1/sqrt(dh).
  double scale = 0.0;
};

namespace detail {

/// The head counts and head dims of q and k.
template <class TQ, class TK>
void check_qk_heads(const qk_view<TQ, TK>& qk) {
  const index_t H = qk.q.extent(0), dh = qk.q.extent(2), Hkv = qk.k.extent(0);
  SPARSEVLM_CHECK(H >= 1, errc::shape_mismatch, "q.extent[0] (heads)", ">= 1", H);
  SPARSEVLM_CHECK(Hkv >= 1 && H % Hkv == 0, errc::shape_mismatch, "k.extent[0] (kv heads)",
                  concat("a divisor of the ", H, " query heads"), Hkv);
  SPARSEVLM_CHECK(dh >= 1, errc::shape_mismatch, "q.extent[2] (head dim)", ">= 1", dh);
  SPARSEVLM_CHECK(qk.k.extent(2) == dh, errc::shape_mismatch, "k.extent[2] (head dim)",
                  concat(dh, " (= q.extent[2])"), qk.k.extent(2));
}

/// q's rows (all L queries, or the R rater rows), the scale and the LSE's extents.
template <class TQ, class TK>
void check_qk_rows(const qk_view<TQ, TK>& qk, index_t R) {
  const index_t H = qk.q.extent(0), Lq = qk.q.extent(1), L = qk.k.extent(1);
  SPARSEVLM_CHECK(Lq == L || Lq == R, errc::shape_mismatch, "q.extent[1]",
                  concat(L, " (all queries) or ", R, " (the rater rows)"), Lq);
  SPARSEVLM_CHECK(std::isfinite(qk.scale) && qk.scale >= 0.0, errc::invalid_argument, "scale",
                  "a finite number >= 0 (0: 1/sqrt(dh))", qk.scale);
  if (qk.lse) {
    SPARSEVLM_CHECK(qk.lse->extent(0) == H && qk.lse->extent(1) == Lq, errc::shape_mismatch, "lse",
                    concat("[", H, ", ", Lq, "]"),
                    concat("[", qk.lse->extent(0), ", ", qk.lse->extent(1), "]"));
  }
}

/// The q/k checks a step makes once its raters are known (its boundary checked the
/// span, and the raters are valid): q may hold only the R rater rows.
template <class TQ, class TK>
void check_qk_args(const qk_view<TQ, TK>& qk, index_t R) {
  check_qk_heads(qk);
  check_qk_rows(qk, R);
}

/// Every check of relevance_scores_qk's arguments but the outputs' sizes.
template <class TQ, class TK>
void check_qk(const qk_view<TQ, TK>& qk, std::span<const index_t> raters, visual_span visual) {
  check_qk_heads(qk);
  check_span(visual, qk.k.extent(1), "k.extent[1]");
  check_raters(raters, visual, qk.k.extent(1));
  check_qk_rows(qk, static_cast<index_t>(raters.size()));
}

/// Copies one row of a [*, *, dh] view into a float32 buffer.
template <class T>
void row_to_f32(tensor3_view<const T> v, index_t a, index_t b, float* out) {
  for (index_t c = 0; c < v.extent(2); ++c) out[c] = to_float(v(a, b, c));
}

template <class TQ, class TK>
[[noreturn]] void fail_non_finite_qk(const qk_view<TQ, TK>& qk, index_t h, index_t qrow,
                                     index_t kh, index_t t) {
  for (index_t c = 0; c < qk.q.extent(2); ++c)
    if (!std::isfinite(to_float(qk.q(h, qrow, c))))
      fail(errc::non_finite, concat("q[", h, ", ", qrow, ", ", c, "]"), "a finite value",
           to_float(qk.q(h, qrow, c)));
  for (index_t u = 0; u <= t; ++u)
    for (index_t c = 0; c < qk.k.extent(2); ++c)
      if (!std::isfinite(to_float(qk.k(kh, u, c))))
        fail(errc::non_finite, concat("k[", kh, ", ", u, ", ", c, "]"), "a finite value",
             to_float(qk.k(kh, u, c)));
  fail(errc::non_finite, concat("logits of query row ", qrow, " in head ", h),
       "finite scaled dot products", "an overflow to Inf");
}

}  // namespace detail

namespace detail {

/// relevance_scores_qk after its argument checks (check_qk or, inside a step,
/// check_qk_args; the gravity options; the outputs' sizes): the composition's form;
/// the data checks stay.
template <class TQ, class TK>
void relevance_scores_qk_trusted(const qk_view<TQ, TK>& qk, std::span<const index_t> raters,
                                 visual_span visual, matrix_view<float> P,
                                 std::span<float> scores, const score_options& opt,
                                 workspace& ws) {
  const index_t H = qk.q.extent(0), Lq = qk.q.extent(1), dh = qk.q.extent(2);
  const index_t Hkv = qk.k.extent(0), L = qk.k.extent(1);
  const index_t R = static_cast<index_t>(raters.size());
  const index_t N = visual.len;
  if (qk.lse) check_finite_rows(*qk.lse, 0, H, "lse");
  const float scale =
      qk.scale > 0.0 ? static_cast<float>(qk.scale) : 1.0f / std::sqrt(static_cast<float>(dh));
  const index_t group = H / Hkv;
  // Only keys 0..max rater are ever read.
  const index_t kmax = R > 0 ? raters[static_cast<std::size_t>(R - 1)] + 1 : 0;

  float* kbuf = workspace::take(ws.qk.keys, static_cast<std::size_t>(kmax * dh));
  float* qbuf = workspace::take(ws.qk.query, static_cast<std::size_t>(dh));
  double* z = workspace::take(ws.qk.logits, static_cast<std::size_t>(L));
  float* zf = workspace::take(ws.qk.logits_f32, static_cast<std::size_t>(L));
  const cpu::detail::kernel_table& kt = cpu::detail::kernels();
  index_t cached = -1;  // the key head now in kbuf; heads are visited in order
  const auto row = [&](index_t h, index_t r, float* out) {
    const index_t g = h / group;
    if (g != cached) {
      for (index_t u = 0; u < kmax; ++u) row_to_f32(qk.k, g, u, kbuf + u * dh);
      cached = g;
    }
    const index_t t = raters[static_cast<std::size_t>(r)];
    const index_t qrow = Lq == L ? t : r;
    row_to_f32(qk.q, h, qrow, qbuf);
    double mx = -std::numeric_limits<double>::infinity();
    bool finite = true;
    kt.dot_rows(qbuf, dh, 1, kbuf, dh, t + 1, dh, zf, t + 1);
    for (index_t u = 0; u <= t; ++u) {
      z[u] = static_cast<double>(scale * zf[u]);
      finite = finite && std::isfinite(z[u]);
      mx = std::max(mx, z[u]);
    }
    if (!finite) fail_non_finite_qk(qk, h, qrow, g, t);
    if (qk.lse) {
      const double lse = static_cast<double>((*qk.lse)(h, qrow));
      double* zv = z + visual.start;
      for (index_t j = 0; j < N; ++j) zv[j] -= lse;
      kt.exp_f64(zv, N);
      for (index_t j = 0; j < N; ++j) out[j] = static_cast<float>(zv[j]);
    } else {
      for (index_t u = 0; u <= t; ++u) z[u] -= mx;
      kt.exp_f64(z, t + 1);
      double sum = 0.0;
      for (index_t u = 0; u <= t; ++u) sum += z[u];
      for (index_t j = 0; j < N; ++j) out[j] = static_cast<float>(z[visual.start + j] / sum);
    }
  };
  float* tmp = workspace::take(ws.scoring.row, static_cast<std::size_t>(N));  // the driver's row buffer
  accumulate_scores(H, raters, visual, L, opt, P, scores, ws, row,
                    [&](index_t h, index_t r, float* dst) {
                      row(h, r, tmp);
                      const index_t ps = P.stride(1);
                      for (index_t j = 0; j < N; ++j) dst[j * ps] += tmp[j];
                    });
  for (index_t j = 0; j < N; ++j)
    SPARSEVLM_CHECK(std::isfinite(scores[static_cast<std::size_t>(j)]), errc::non_finite,
                    concat("scores[", j, "]"), "a finite value (check lse)",
                    scores[static_cast<std::size_t>(j)]);
}

}  // namespace detail

/// Relevance matrix and scores from queries and keys (spec steps 2-3, with the
/// rater rows' attention recomputed instead of read), never forming anything of
/// size L².
///
/// For each query head h (key head g = h / (H/Hkv)) and rater row t = raters[r]:
///
///   z[u]      = scale · q[h][t]·k[g][u]                 u = 0..t (causal)
///   a[h][t][u] = exp(z[u] − m) / Σ_{u'<=t} exp(z[u'] − m)     m = max z
///   or, given the engine's softmax_lse ℓ = log Σ_{u<=t} exp(z[u]):  exp(z[u] − ℓ)
///
/// then P and the scores exactly as relevance_scores forms them from a (the same
/// driver, so the same gravity correction and head selection from `opt`): heads
/// summed in order in float32 and divided by the heads kept, raters summed in
/// order and divided by R. Logits are float32 dot products with one fixed association;
/// the exponentials and the LSE are computed in double.
///
/// - Views: see qk_view; float32/float16/bfloat16, any strides.
/// - `P`: [R, N] float32 output; `scores`: N float32 outputs.
/// - Cost: O(H·R·L·dh) multiply-adds, O(H·R·L) exp (twice for the chosen heads
///   with top_heads). Memory from `ws`: one key head as float32 (L·dh floats,
///   refilled per key head), L doubles, dh + N floats (+ R·N with gravity).
/// - Errors: shape_mismatch (q/k/lse extents, Hkv not dividing H, head dims);
///   invalid_argument (raters, scale); non_finite (NaN/Inf in q or k rows used,
///   in the LSE, or overflowing logits). On non_finite, P and the scores are
///   unspecified (found while computing, as in relevance_scores).
template <class TQ, class TK>
void relevance_scores_qk(const qk_view<TQ, TK>& qk, std::span<const index_t> raters,
                         visual_span visual, matrix_view<float> P, std::span<float> scores,
                         const score_options& opt, workspace& ws) {
  detail::check_qk(qk, raters, visual);
  check_gravity(opt.gravity, qk.k.extent(1));
  detail::check_score_outputs(P, scores, static_cast<index_t>(raters.size()), visual.len);
  detail::relevance_scores_qk_trusted(qk, raters, visual, P, scores, opt, ws);
}

}  // namespace sparsevlm
