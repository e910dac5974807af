// Stage 1: choose the text tokens that rate the visual tokens.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <span>
#include <vector>

#include "check.hpp"
#include "workspace.hpp"

namespace sparsevlm {

namespace detail {

/// Copies rows [r0, r0 + n) of `m` into a row-major float32 buffer.
template <class T>
void rows_to_f32(matrix_view<const T> m, index_t r0, index_t n, float* out) {
  const index_t d = m.extent(1);
  for (index_t r = 0; r < n; ++r)
    for (index_t c = 0; c < d; ++c) out[r * d + c] = to_float(m(r0 + r, c));
}

/// Dot product in float32 with a fixed association (8 interleaved partial sums,
/// combined in a fixed order). Every logit is computed the same way, so identical
/// text embeddings give bit-identical logits, which the "all m equal" rule needs;
/// a blocked GEMM does not promise that across its panels.
inline float dot_f32(const float* a, const float* b, index_t n) noexcept {
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  index_t k = 0;
  for (; k + 8 <= n; k += 8)
    for (int l = 0; l < 8; ++l) acc[l] += a[k + l] * b[k + l];
  for (int l = 0; l < 8 && k < n; ++k, ++l) acc[l] += a[k] * b[k];  // the < 8 tail
  return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

}  // namespace detail

/// Text raters (paper Sec. 3.2; spec step 1).
///
/// With V = embeds[S:S+N] and T = embeds[S+N:L]: M = softmax over the text axis of
/// V·Tᵀ, m = column mean of M, and the raters are the text positions t with
/// m[t] > mean(m), as absolute positions, ascending. No text tokens, or all m[t]
/// equal (checked exactly, before the mean, so rounding of the mean cannot invent
/// raters), gives no raters.
///
/// - `embeds`: [L, d] float32/float16/bfloat16, any strides; d >= 1.
/// - `visual`: [S, S+N) inside [0, L), N >= 1.
/// - Returns the raters (R <= L - S - N of them).
/// - Cost: O(N·T·d) for the logits (float32 dot products, one fixed summation
///   order for all), O(N·T) exp in double. Scratch from `ws`: (N + T)·d floats,
///   2T doubles.
/// - Errors: shape_mismatch for a bad span or d = 0; non_finite for NaN/Inf in
///   the rows of `embeds` it reads (rows S..L), or a logit that overflows float32.
template <class T>
std::vector<index_t> select_raters(matrix_view<const T> embeds, visual_span visual,
                                   workspace& ws) {
  const index_t L = embeds.extent(0);
  const index_t d = embeds.extent(1);
  detail::check_span(visual, L, "embeds.extent[0]");
  SPARSEVLM_CHECK(d >= 1, errc::shape_mismatch, "embeds.extent[1]", ">= 1", d);
  detail::check_finite_rows(embeds, visual.start, L, "embeds");

  const index_t N = visual.len;
  const index_t Tn = L - visual.end();
  std::vector<index_t> raters;
  if (Tn == 0) return raters;

  float* vbuf = workspace::take(ws.f32_a, static_cast<std::size_t>(N * d));
  float* tbuf = workspace::take(ws.f32_b, static_cast<std::size_t>(Tn * d));
  detail::rows_to_f32(embeds, visual.start, N, vbuf);
  detail::rows_to_f32(embeds, visual.end(), Tn, tbuf);
  double* e = workspace::take(ws.f64_b, static_cast<std::size_t>(Tn));
  double* m = workspace::take(ws.f64_a, static_cast<std::size_t>(Tn));
  std::fill(m, m + Tn, 0.0);
  for (index_t i = 0; i < N; ++i) {
    double mx = -std::numeric_limits<double>::infinity();
    for (index_t t = 0; t < Tn; ++t) {
      e[t] = static_cast<double>(detail::dot_f32(vbuf + i * d, tbuf + t * d, d));
      // Finite embeddings can still overflow a float32 dot product; the softmax
      // would then turn Inf − Inf into NaN and silently choose no raters.
      SPARSEVLM_CHECK(std::isfinite(e[t]), errc::non_finite,
                      detail::concat("embeds rows ", visual.start + i, " and ", visual.end() + t),
                      "a dot product that fits in float32", "an overflow to Inf");
      mx = std::max(mx, e[t]);
    }
    double sum = 0.0;
    for (index_t t = 0; t < Tn; ++t) sum += (e[t] = std::exp(e[t] - mx));
    for (index_t t = 0; t < Tn; ++t) m[t] += e[t] / sum;
  }
  for (index_t t = 0; t < Tn; ++t) m[t] /= static_cast<double>(N);
  if (std::all_of(m, m + Tn, [&](double v) { return v == m[0]; })) return raters;
  double mean = 0.0;
  for (index_t t = 0; t < Tn; ++t) mean += m[t];
  mean /= static_cast<double>(Tn);
  for (index_t t = 0; t < Tn; ++t)
    if (m[t] > mean) raters.push_back(visual.end() + t);
  return raters;
}

/// Convenience overload with a temporary workspace.
template <class T>
std::vector<index_t> select_raters(matrix_view<const T> embeds, visual_span visual) {
  workspace ws;
  return select_raters(embeds, visual, ws);
}

/// Validates caller-given raters: ascending, unique, inside the text [S+N, L).
inline void check_raters(std::span<const index_t> raters, visual_span visual, index_t L) {
  for (std::size_t i = 0; i < raters.size(); ++i) {
    const index_t r = raters[i];
    SPARSEVLM_CHECK(r >= visual.end() && r < L, errc::invalid_argument,
                    detail::concat("raters[", i, "]"),
                    detail::concat("a text position in [", visual.end(), ", ", L, ")"), r);
    if (i > 0) {
      SPARSEVLM_CHECK(r > raters[i - 1], errc::invalid_argument, detail::concat("raters[", i, "]"),
                      detail::concat("> raters[", i - 1, "] = ", raters[i - 1],
                                     " (ascending, unique)"),
                      r);
    }
  }
}

}  // namespace sparsevlm
