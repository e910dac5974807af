// The RoPE attention-bias ("gravity") correction of SparseVLM+, shared by both
// scoring paths.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <span>
#include <vector>

#include "check.hpp"
#include "raters.hpp"
#include "types.hpp"
#include "workspace.hpp"

namespace sparsevlm {

/// Validates gravity options against a sequence of `length` tokens.
inline void check_gravity(const rope_gravity& g, index_t length) {
  if (!g.enabled) return;
  SPARSEVLM_CHECK(g.head_dim >= 1, errc::invalid_argument, "gravity.head_dim", ">= 1", g.head_dim);
  const index_t rd = g.rotary_dim == 0 ? g.head_dim : g.rotary_dim;
  SPARSEVLM_CHECK(rd >= 2 && rd % 2 == 0 && rd <= g.head_dim, errc::invalid_argument,
                  "gravity.rotary_dim", detail::concat("an even number in [2, ", g.head_dim, "]"), rd);
  SPARSEVLM_CHECK(std::isfinite(g.base) && g.base > 1.0, errc::invalid_argument, "gravity.base",
                  "a finite number > 1", g.base);
  SPARSEVLM_CHECK(std::isfinite(g.scale) && g.scale >= 0.0, errc::invalid_argument,
                  "gravity.scale", "a finite number >= 0 (0: 1/sqrt(head_dim))", g.scale);
  SPARSEVLM_CHECK(std::isfinite(g.min_ratio) && g.min_ratio > 0.0 && g.min_ratio <= 1.0,
                  errc::invalid_argument, "gravity.min_ratio", "in (0, 1]", g.min_ratio);
  SPARSEVLM_CHECK(g.positions.empty() || static_cast<index_t>(g.positions.size()) == length,
                  errc::shape_mismatch, "gravity.positions.size()",
                  detail::concat("0 (0..L-1) or L = ", length), g.positions.size());
  // Bounded so that position differences cannot overflow (and stay exact in double).
  constexpr index_t max_pos = index_t{1} << 48;
  for (std::size_t u = 0; u < g.positions.size(); ++u)
    SPARSEVLM_CHECK(g.positions[u] >= -max_pos && g.positions[u] <= max_pos,
                    errc::invalid_argument, detail::concat("gravity.positions[", u, "]"),
                    "a position id within ±2^48", g.positions[u]);
}

namespace detail {

/// gravity_table after its checks (options, span, raters, out's size): the scorers'
/// form inside a step, whose boundary checked them.
inline void gravity_table_trusted(const rope_gravity& g, std::span<const index_t> raters,
                                  visual_span visual, index_t length, std::span<float> out,
                                  workspace& ws) {
  const index_t rd = g.rotary_dim == 0 ? g.head_dim : g.rotary_dim;
  const double scale = g.scale > 0.0 ? g.scale : 1.0 / std::sqrt(static_cast<double>(g.head_dim));
  const auto pos = [&](index_t u) {
    return g.positions.empty() ? u : g.positions[static_cast<std::size_t>(u)];
  };
  double* theta = workspace::take(ws.gravity.frequencies, static_cast<std::size_t>(rd / 2));
  for (index_t i = 0; i < rd / 2; ++i)
    theta[i] = std::pow(g.base, -2.0 * static_cast<double>(i) / static_cast<double>(rd));
  const auto bias = [&](double delta) {
    double s = 0.0;
    for (index_t i = 0; i < rd / 2; ++i) s += std::cos(delta * theta[i]);
    return 2.0 * scale * s;
  };
  index_t pmin = std::numeric_limits<index_t>::max(), pmax = std::numeric_limits<index_t>::min();
  for (index_t u = 0; u < length; ++u) {
    pmin = std::min(pmin, pos(u));
    pmax = std::max(pmax, pos(u));
  }
  // Distances are |Δ| (cos is even); tabulate them when the positions are compact.
  const bool tabulate = length > 0 && pmax - pmin <= 4 * length;
  double* table = nullptr;
  if (tabulate) {
    table = workspace::take(ws.gravity.distances, static_cast<std::size_t>(pmax - pmin + 1));
    for (index_t dlt = 0; dlt <= pmax - pmin; ++dlt) table[dlt] = bias(static_cast<double>(dlt));
  }
  double* b = workspace::take(ws.gravity.biases, static_cast<std::size_t>(length));
  for (std::size_t r = 0; r < raters.size(); ++r) {
    const index_t t = raters[r];
    double mx = -std::numeric_limits<double>::infinity();
    for (index_t u = 0; u <= t; ++u) {
      const index_t dlt = pos(t) > pos(u) ? pos(t) - pos(u) : pos(u) - pos(t);
      b[u] = tabulate ? table[dlt] : bias(static_cast<double>(dlt));
      mx = std::max(mx, b[u]);
    }
    double sum = 0.0;
    for (index_t u = 0; u <= t; ++u) sum += std::exp(b[u] - mx);
    const double floor = g.min_ratio / static_cast<double>(t + 1);
    for (index_t j = 0; j < visual.len; ++j) {
      const double p = std::exp(b[visual.start + j] - mx) / sum;
      out[static_cast<index_t>(r) * visual.len + j] = static_cast<float>(std::max(p, floor));
    }
  }
}

}  // namespace detail

/// The guarded bias probabilities ĝ[r][j] for every rater row and visual column.
///
/// For rater row t = raters[r] (position p_t) and key u <= t (position p_u):
///
///   b(u) = scale · 2 · Σ_{i < rd/2} cos((p_t − p_u) · θ_i),  θ_i = base^(−2i/rd)
///
/// is the logit that all-ones q and k get under (Hugging Face-layout) RoPE —
/// q_rot·k_rot = Σ_i 2·cos(Δθ_i) plus a constant for unrotated dims, which the
/// softmax cancels — and g = softmax over u = 0..t of b. The output is
/// ĝ[r][j] = max(g(S + j), min_ratio / (t + 1)); divide attention by it.
///
/// - `raters`, `visual`: as for the scorers (checked); `out`: R·N floats,
///   row-major (size checked). Positions within ±2^48. Cost: O(R·L) plus O(D·rd) cosines for a table
///   over the distances D met (or O(R·L·rd) when positions span more than 4L).
/// - Errors: as check_gravity.
inline void gravity_table(const rope_gravity& g, std::span<const index_t> raters,
                          visual_span visual, index_t length, std::span<float> out,
                          workspace& ws) {
  check_gravity(g, length);
  detail::check_span(visual, length, "length");
  check_raters(raters, visual, length);
  SPARSEVLM_CHECK(out.size() == raters.size() * static_cast<std::size_t>(visual.len),
                  errc::shape_mismatch, "out.size()",
                  detail::concat(raters.size(), " x ", visual.len), out.size());
  detail::gravity_table_trusted(g, raters, visual, length, out, ws);
}

}  // namespace sparsevlm
