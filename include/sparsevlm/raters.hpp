// Stage 1: choose the text tokens that rate the visual tokens.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <span>
#include <vector>

#include "check.hpp"
#include "core/math.hpp"
#include "cpu/dispatch.hpp"
#include "workspace.hpp"

namespace sparsevlm {

namespace detail {

/// Rows [r0, r0 + n) of `m` as float32 rows: a pointer into `m` itself when
/// its rows are float32 and contiguous (returns the row stride), else a copy
/// into `buf` (converted with the active kernels; returns d).
template <class T>
const float* rows_as_f32(matrix_view<const T> m, index_t r0, index_t n, scratch_vector<float>& buf,
                         index_t& ld) {
  const index_t d = m.extent(1);
  if constexpr (std::is_same_v<T, float>) {
    if (m.stride(1) == 1) {
      ld = m.stride(0);
      return m.row(r0);
    }
  }
  float* out = workspace::take(buf, static_cast<std::size_t>(n * d));
  ld = d;
  const cpu::detail::kernel_table& k = cpu::detail::kernels();
  for (index_t r = 0; r < n; ++r) {
    float* o = out + r * d;
    if (m.stride(1) == 1 && !std::is_same_v<T, float>) {
      const auto* bits = reinterpret_cast<const std::uint16_t*>(m.row(r0 + r));
      if constexpr (std::is_same_v<T, half>) k.cvt_f16(o, bits, d);
      else k.cvt_bf16(o, bits, d);
    } else {
      for (index_t c = 0; c < d; ++c) o[c] = to_float(m(r0 + r, c));
    }
  }
  return out;
}

/// Spec step 1 on rows already in float32: N visual rows at `vrows` (row stride
/// ldv), Tn >= 1 text rows at `trows` (ldt), d columns; raters numbered from
/// `first_text`. `bad_logit(i)` is called for the first non-finite logit i
/// (visual row i / Tn, text row i % Tn) and must throw. select_raters and the
/// multi-span step (select_raters_spans) both end here.
template <class BadLogit>
void raters_from_rows(const float* vrows, index_t ldv, index_t N, const float* trows,
                      index_t ldt, index_t Tn, index_t d, index_t first_text, workspace& ws,
                      std::vector<index_t>& raters, BadLogit&& bad_logit) {
  float* logits = workspace::take(ws.raters.logits, static_cast<std::size_t>(N * Tn));
  const cpu::detail::kernel_table& kt = cpu::detail::kernels();
  kt.dot_rows(vrows, ldv, N, trows, ldt, Tn, d, logits, Tn);
  // Every visual row meets every text row, so a NaN/Inf anywhere in the rows
  // makes some logit non-finite: one check of the N·T logits replaces a scan of
  // the (N + T)·d inputs. Finite inputs can still overflow a float32 dot
  // product; the softmax would then turn Inf − Inf into NaN and silently choose
  // no raters.
  for (index_t i = 0; i < N * Tn; ++i)
    if (!std::isfinite(logits[i])) bad_logit(i);
  double* e = workspace::take(ws.raters.exps, static_cast<std::size_t>(Tn));
  double* m = workspace::take(ws.raters.mean, static_cast<std::size_t>(Tn));
  std::fill(m, m + Tn, 0.0);
  for (index_t i = 0; i < N; ++i) {
    const float* li = logits + i * Tn;
    double mx = -std::numeric_limits<double>::infinity();
    for (index_t t = 0; t < Tn; ++t) mx = std::max(mx, static_cast<double>(li[t]));
    for (index_t t = 0; t < Tn; ++t) e[t] = static_cast<double>(li[t]) - mx;
    kt.exp_f64(e, Tn);  // the shared exp: the same bits on every instruction set
    double sum = 0.0;
    for (index_t t = 0; t < Tn; ++t) sum += e[t];
    for (index_t t = 0; t < Tn; ++t) m[t] += e[t] / sum;
  }
  for (index_t t = 0; t < Tn; ++t) m[t] /= static_cast<double>(N);
  // Sized to the text and cut to the pick: within the reserved capacity (R <= T),
  // so no allocation once sized.
  raters.resize(static_cast<std::size_t>(Tn));
  raters.resize(static_cast<std::size_t>(detail::core::pick_raters(m, Tn, first_text, raters.data())));
}

}  // namespace detail

namespace detail {

/// select_raters after its argument checks (the span inside `embeds`, d >= 1), for
/// the composition, whose boundary checked them; the data checks (non-finite rows,
/// overflowing logits) stay.
template <class T>
void select_raters_trusted(matrix_view<const T> embeds, visual_span visual, workspace& ws,
                           std::vector<index_t>& raters) {
  const index_t L = embeds.extent(0);
  const index_t d = embeds.extent(1);
  const index_t N = visual.len;
  const index_t Tn = L - visual.end();
  if (Tn == 0) {
    raters.clear();
    return;
  }

  index_t ldv = 0, ldt = 0;
  const float* vrows = detail::rows_as_f32(embeds, visual.start, N, ws.raters.visual, ldv);
  const float* trows = detail::rows_as_f32(embeds, visual.end(), Tn, ws.raters.text, ldt);
  detail::raters_from_rows(vrows, ldv, N, trows, ldt, Tn, d, visual.end(), ws, raters,
                           [&](index_t i) {
                             detail::check_finite_rows(embeds, visual.start, L, "embeds");
                             detail::fail(errc::non_finite,
                                          detail::concat("embeds rows ", visual.start + i / Tn,
                                                         " and ", visual.end() + i % Tn),
                                          "a dot product that fits in float32",
                                          "an overflow to Inf");
                           });
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
/// - `raters` receives the raters (R <= L - S - N of them), reusing its
///   capacity; it is untouched on error.
/// - Cost: O(N·T·d) for the logits (float32 dot products with the fixed
///   association of cpu/kernel_table.hpp, so every instruction set gives the same
///   bits), O(N·T) exp in double. Scratch from `ws`: N·T floats, 2T doubles, and
///   (N + T)·d floats unless the rows are contiguous float32 (read in place).
/// - Errors: shape_mismatch for a bad span or d = 0; non_finite for NaN/Inf in
///   the rows of `embeds` it reads (rows S..L; none when T = 0), or a logit that
///   overflows float32.
template <class T>
void select_raters(matrix_view<const T> embeds, visual_span visual, workspace& ws,
                   std::vector<index_t>& raters) {
  detail::check_span(visual, embeds.extent(0), "embeds.extent[0]");
  SPARSEVLM_CHECK(embeds.extent(1) >= 1, errc::shape_mismatch, "embeds.extent[1]", ">= 1",
                  embeds.extent(1));
  detail::select_raters_trusted(embeds, visual, ws, raters);
}

/// As above, returning the raters in a new vector.
template <class T>
std::vector<index_t> select_raters(matrix_view<const T> embeds, visual_span visual,
                                   workspace& ws) {
  std::vector<index_t> raters;
  select_raters(embeds, visual, ws, raters);
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
