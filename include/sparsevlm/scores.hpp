// Stage 2 and 3: the relevance matrix P and the per-visual-token scores.
#pragma once

#include <algorithm>
#include <cmath>
#include <span>

#include "check.hpp"
#include "raters.hpp"

namespace sparsevlm {

namespace detail {

/// Turns per-rater head sums in P into the head mean, then the scores: P /= H,
/// score[j] = (Σ_r P[r][j]) / R, raters in order. Shared by both scoring paths
/// so that they round identically.
inline void finish_scores(matrix_view<float> P, std::span<float> scores, index_t heads) {
  const index_t R = P.extent(0), N = P.extent(1);
  const float hf = static_cast<float>(heads);
  for (index_t r = 0; r < R; ++r)
    for (index_t j = 0; j < N; ++j) P(r, j) /= hf;
  std::fill(scores.begin(), scores.end(), 0.0f);
  for (index_t r = 0; r < R; ++r)
    for (index_t j = 0; j < N; ++j) scores[static_cast<std::size_t>(j)] += P(r, j);
  if (R > 0) {
    const float rf = static_cast<float>(R);
    for (float& s : scores) s /= rf;
  }
}

}  // namespace detail

/// Relevance matrix and scores (spec steps 2-3), reading only the rater rows and
/// visual columns of the attention: the head mean of the whole L×L matrix is
/// never formed.
///
///   P[r][j]  = (1/H) · Σ_h attn[h][raters[r]][S + j]     (float32, heads in order)
///   score[j] = (1/R) · Σ_r P[r][j]                       (float32, raters in order)
///
/// Every column is summed in the same order, so identical columns give
/// bit-identical scores (exact ties stay exact).
///
/// - `attn`: [H, L, L] float32/float16/bfloat16 probabilities (row = query), any
///   strides; H >= 1.
/// - `raters`: R absolute positions, ascending, inside the text (see check_raters).
/// - `P`: [R, N] float32 output; `scores`: N float32 outputs.
/// - Cost: O(H·R·N) reads, O(R·N) writes, no scratch.
/// - Errors: shape_mismatch for mismatched extents; invalid_argument for bad
///   raters; non_finite when a value read is NaN/Inf (outputs are then
///   unspecified: this is the one stage that validates while it computes, since
///   checking first would read the attention twice).
template <class T>
void relevance_scores(tensor3_view<const T> attn, std::span<const index_t> raters,
                      visual_span visual, matrix_view<float> P, std::span<float> scores) {
  const index_t H = attn.extent(0);
  const index_t L = attn.extent(1);
  const index_t R = static_cast<index_t>(raters.size());
  const index_t N = visual.len;
  SPARSEVLM_CHECK(H >= 1, errc::shape_mismatch, "attn.extent[0] (heads)", ">= 1", H);
  SPARSEVLM_CHECK(attn.extent(2) == L, errc::shape_mismatch, "attn.extent[2]",
                  detail::concat(L, " (= attn.extent[1], square attention)"), attn.extent(2));
  detail::check_span(visual, L, "attn.extent[1]");
  check_raters(raters, visual, L);
  SPARSEVLM_CHECK(P.extent(0) == R && P.extent(1) == N, errc::shape_mismatch, "P",
                  detail::concat("[", R, ", ", N, "]"),
                  detail::concat("[", P.extent(0), ", ", P.extent(1), "]"));
  SPARSEVLM_CHECK(static_cast<index_t>(scores.size()) == N, errc::shape_mismatch, "scores.size()",
                  N, scores.size());

  for (index_t r = 0; r < R; ++r) {
    float* prow = &P(r, 0);
    const index_t ps = P.stride(1);
    for (index_t j = 0; j < N; ++j) prow[j * ps] = 0.0f;
    for (index_t h = 0; h < H; ++h) {
      const T* arow = &attn(h, raters[static_cast<std::size_t>(r)], visual.start);
      const index_t as = attn.stride(2);
      for (index_t j = 0; j < N; ++j) prow[j * ps] += to_float(arow[j * as]);
    }
  }
  detail::finish_scores(P, scores, H);
  for (index_t j = 0; j < N; ++j) {
    if (!std::isfinite(scores[static_cast<std::size_t>(j)])) {
      // Locate the culprit so the message names an element, not a column sum.
      for (index_t h = 0; h < H; ++h)
        for (index_t r = 0; r < R; ++r) {
          const index_t q = raters[static_cast<std::size_t>(r)];
          const float v = to_float(attn(h, q, visual.start + j));
          if (!std::isfinite(v)) {
            detail::fail(errc::non_finite,
                         detail::concat("attn[", h, ", ", q, ", ", visual.start + j, "]"),
                         "a finite value", v);
          }
        }
      detail::fail(errc::non_finite, detail::concat("scores[", j, "]"),
                   "a finite sum of attention values", "an overflow to Inf");
    }
  }
}

}  // namespace sparsevlm
