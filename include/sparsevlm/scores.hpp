// Stage 2 and 3: the relevance matrix P and the per-visual-token scores.
#pragma once

#include <algorithm>
#include <cmath>
#include <span>
#include <vector>

#include "check.hpp"
#include "core/math.hpp"
#include "cpu/dispatch.hpp"
#include "gravity.hpp"
#include "raters.hpp"
#include "types.hpp"
#include "workspace.hpp"

namespace sparsevlm {

namespace detail {

/// Turns per-rater head sums in P into the head mean, then the scores: P /= H,
/// score[j] = (Σ_r P[r][j]) / R, raters in order, by detail::core::column_score (the
/// device kernels' rule too). Shared by both scoring paths and the
/// tensor-parallel finish, so that they round identically.
inline void finish_scores(matrix_view<float> P, std::span<float> scores, index_t heads) {
  const index_t R = P.extent(0), N = P.extent(1);
  const float hf = static_cast<float>(heads);
  for (index_t j = 0; j < N; ++j)
    scores[static_cast<std::size_t>(j)] =
        detail::core::column_score(R, hf, P.data() + j * P.stride(1), P.stride(0));
}

/// dst[j·dst_stride] += float(src[j·stride]) for j < n, with the kernel table's
/// add kernels when both strides are 1: the additions of relevance_scores (and of
/// partial_relevance, which must round identically).
template <class T>
void add_widened(const cpu::detail::kernel_table& k, float* dst, index_t dst_stride, const T* src,
                 index_t n, index_t stride) {
  if (stride == 1 && dst_stride == 1) {
    if constexpr (std::is_same_v<T, float>) {
      k.add_f32(dst, src, n);
    } else if constexpr (std::is_same_v<T, half>) {
      k.add_f16(dst, reinterpret_cast<const std::uint16_t*>(src), n);
    } else {
      k.add_bf16(dst, reinterpret_cast<const std::uint16_t*>(src), n);
    }
  } else {
    for (index_t j = 0; j < n; ++j) dst[j * dst_stride] += to_float(src[j * stride]);
  }
}

/// The scoring driver shared by both paths. `row(h, r, out)` writes the N
/// visual-column probabilities of head h, rater row r into `out`; `add(h, r,
/// dst)` adds them to `dst` (the fused form used when there is no gravity
/// correction; it must add exactly the values `row` writes). Applies the
/// gravity correction and head selection of `o`, then sums the chosen heads in
/// head order into P and finishes the scores (finish_scores).
/// Scratch: N + R·N floats (N without gravity), H doubles and indices.
template <class RowFn, class AddFn>
void accumulate_scores(index_t H, std::span<const index_t> raters, visual_span visual,
                       index_t length, const score_options& o, matrix_view<float> P,
                       std::span<float> scores, workspace& ws, RowFn&& row, AddFn&& add) {
  const index_t R = static_cast<index_t>(raters.size());
  const index_t N = visual.len;
  SPARSEVLM_CHECK(o.top_heads >= 0 && o.top_heads <= H, errc::invalid_argument,
                  "scoring.top_heads", concat("in [0, ", H, "] (0: all heads)"), o.top_heads);
  const float* gt = nullptr;
  if (o.gravity.enabled) {
    float* g = workspace::take(ws.scoring.gravity, static_cast<std::size_t>(R * N));
    gravity_table_trusted(o.gravity, raters, visual, length,
                          std::span<float>(g, static_cast<std::size_t>(R * N)), ws);
    gt = g;
  }
  float* buf = workspace::take(ws.scoring.row, static_cast<std::size_t>(N));
  const auto load = [&](index_t h, index_t r) {
    row(h, r, buf);
    if (gt)
      for (index_t j = 0; j < N; ++j) buf[j] /= gt[r * N + j];
  };
  const index_t k = o.top_heads > 0 ? o.top_heads : H;
  std::vector<index_t>& chosen = ws.scoring.chosen;  // 1 for the heads that are averaged
  chosen.assign(static_cast<std::size_t>(H), k == H ? 1 : 0);
  if (k < H) {
    double* total = workspace::take(ws.scoring.head_totals, static_cast<std::size_t>(H));
    for (index_t h = 0; h < H; ++h) {
      double t = 0.0;
      for (index_t r = 0; r < R; ++r) {
        load(h, r);
        for (index_t j = 0; j < N; ++j) t += static_cast<double>(buf[j]);
      }
      // A NaN total would break the strict order that nth_element needs, and a
      // head left out would hide it: refuse it here.
      SPARSEVLM_CHECK(std::isfinite(t), errc::non_finite,
                      concat("head ", h, " rater->visual attention"), "a finite total", t);
      total[h] = t;
    }
    std::vector<index_t>& order = ws.scoring.head_order;
    order.resize(static_cast<std::size_t>(H));
    for (index_t h = 0; h < H; ++h) order[static_cast<std::size_t>(h)] = h;
    std::nth_element(order.begin(), order.begin() + (k - 1), order.end(), [&](index_t a, index_t b) {
      return detail::core::ranks_before(total[a], a, total[b], b);
    });
    for (index_t i = 0; i < k; ++i) chosen[static_cast<std::size_t>(order[static_cast<std::size_t>(i)])] = 1;
  }
  for (index_t r = 0; r < R; ++r)
    for (index_t j = 0; j < N; ++j) P(r, j) = 0.0f;
  for (index_t h = 0; h < H; ++h) {
    if (!chosen[static_cast<std::size_t>(h)]) continue;
    for (index_t r = 0; r < R; ++r) {
      if (gt) {
        load(h, r);
        for (index_t j = 0; j < N; ++j) P(r, j) += buf[j];
      } else {
        add(h, r, &P(r, 0));
      }
    }
  }
  finish_scores(P, scores, k);
}

/// The outputs' sizes: P [R, N] and N scores (both scorers).
inline void check_score_outputs(matrix_view<float> P, std::span<float> scores, index_t R,
                                index_t N) {
  SPARSEVLM_CHECK(P.extent(0) == R && P.extent(1) == N, errc::shape_mismatch, "P",
                  concat("[", R, ", ", N, "]"), concat("[", P.extent(0), ", ", P.extent(1), "]"));
  SPARSEVLM_CHECK(static_cast<index_t>(scores.size()) == N, errc::shape_mismatch, "scores.size()",
                  N, scores.size());
}

/// relevance_scores after its argument checks (extents, span, raters, gravity
/// options, P and scores sizes): the composition's form; the data checks stay.
template <class T>
void relevance_scores_trusted(tensor3_view<const T> attn, std::span<const index_t> raters,
                              visual_span visual, matrix_view<float> P, std::span<float> scores,
                              const score_options& opt, workspace& ws) {
  const index_t H = attn.extent(0);
  const index_t L = attn.extent(1);
  const index_t R = static_cast<index_t>(raters.size());
  const index_t N = visual.len;
  const index_t as = attn.stride(2);
  const cpu::detail::kernel_table& k = cpu::detail::kernels();
  const auto rater_row = [&](index_t h, index_t r) {
    return &attn(h, raters[static_cast<std::size_t>(r)], visual.start);
  };
  detail::accumulate_scores(
      H, raters, visual, L, opt, P, scores, ws,
      [&](index_t h, index_t r, float* out) {
        const T* arow = rater_row(h, r);
        for (index_t j = 0; j < N; ++j) out[j] = to_float(arow[j * as]);
      },
      [&](index_t h, index_t r, float* dst) {
        detail::add_widened(k, dst, P.stride(1), rater_row(h, r), N, as);
      });
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
/// `opt` adds SparseVLM+'s options (default: none, the spec): the RoPE gravity
/// correction divides each probability by its guarded bias probability
/// (gravity_table) and `top_heads` averages only the heads with the largest
/// total rater→visual attention; P then divides by the number of heads kept.
///
/// - `attn`: [H, L, L] float32/float16/bfloat16 probabilities (row = query), any
///   strides; H >= 1.
/// - `raters`: R absolute positions, ascending, inside the text (see check_raters).
/// - `P`: [R, N] float32 output; `scores`: N float32 outputs.
/// - Cost: O(H·R·N) reads (twice for the chosen heads with top_heads), O(R·N)
///   writes; with gravity O(R·L) more. Scratch from `ws` (accumulate_scores).
/// - Errors: shape_mismatch for mismatched extents; invalid_argument for bad
///   raters; non_finite when a value read is NaN/Inf (outputs are then
///   unspecified: this is the one stage that validates while it computes, since
///   checking first would read the attention twice).
template <class T>
void relevance_scores(tensor3_view<const T> attn, std::span<const index_t> raters,
                      visual_span visual, matrix_view<float> P, std::span<float> scores,
                      const score_options& opt, workspace& ws) {
  const index_t L = attn.extent(1);
  SPARSEVLM_CHECK(attn.extent(0) >= 1, errc::shape_mismatch, "attn.extent[0] (heads)", ">= 1",
                  attn.extent(0));
  SPARSEVLM_CHECK(attn.extent(2) == L, errc::shape_mismatch, "attn.extent[2]",
                  detail::concat(L, " (= attn.extent[1], square attention)"), attn.extent(2));
  detail::check_span(visual, L, "attn.extent[1]");
  check_raters(raters, visual, L);
  check_gravity(opt.gravity, L);
  detail::check_score_outputs(P, scores, static_cast<index_t>(raters.size()), visual.len);
  detail::relevance_scores_trusted(attn, raters, visual, P, scores, opt, ws);
}

/// The spec's plain head mean (default score_options), with a temporary
/// workspace.
template <class T>
void relevance_scores(tensor3_view<const T> attn, std::span<const index_t> raters,
                      visual_span visual, matrix_view<float> P, std::span<float> scores) {
  workspace ws;
  relevance_scores(attn, raters, visual, P, scores, score_options{}, ws);
}

}  // namespace sparsevlm
