// Decision rules shared by every backend. They are the library's determinism
// contract: the CPU and GPU paths call these and nothing else to compare.
#pragma once

#include <cmath>
#include <cstdint>

#include "../config.hpp"
#include "exp.hpp"

namespace sparsevlm::detail::core {

/// float32 machine epsilon, 2^-23: the spec's rank tolerance factor.
inline constexpr double rank_epsilon = 1.0 / 8388608.0;

/// Spec step 3, one visual column: p[r·stride] holds the head sum of rater row
/// r (heads added in head order from 0); it becomes P[r] = sum / H, and the
/// score (Σ_r P[r]) / R is returned, float32, raters in order from 0 (0 when
/// R = 0). The CPU (scores.hpp's finish_scores) and the device score kernels
/// (one thread per column) both call it, so the division and the order of the
/// sums have one home.
SPARSEVLM_HD inline float column_score(std::int64_t raters, float heads, float* p,
                                       std::int64_t stride) noexcept {
  float score = 0.0f;
  for (std::int64_t r = 0; r < raters; ++r) {
    const float v = div_rn(p[r * stride], heads);
    p[r * stride] = v;
    score = add_rn(score, v);
  }
  return raters > 0 ? div_rn(score, static_cast<float>(raters)) : score;
}

/// Strict total order "a ranks before b" on (score, position): higher score first,
/// equal scores to the lower position. Used for the keep set and for choosing
/// which pruned tokens are recycled.
template <class S, class I>
SPARSEVLM_HD constexpr bool ranks_before(S score_a, I a, S score_b, I b) noexcept {
  return score_a > score_b || (score_a == score_b && a < b);
}

/// DPC-KNN: token j is denser than token i (spec step 7). Densities are compared
/// exactly; equal densities go to the lower index, so the order is total.
template <class I>
SPARSEVLM_HD constexpr bool denser(double rho_j, I j, double rho_i, I i) noexcept {
  return rho_j > rho_i || (rho_j == rho_i && j < i);
}

/// Square of the rank threshold: singular value s counts when s^2 > this, with
/// `lambda_max` = sigma_max^2 and m = max(R, N).
SPARSEVLM_HD inline double rank_threshold_sq(double lambda_max, std::int64_t m) noexcept {
  const double t = mul_rn(static_cast<double>(m), rank_epsilon);
  return mul_rn(mul_rn(lambda_max, t), t);
}

/// Spec step 5, rank policy (without the rank == N and no-rater cases, which
/// keep everything): max(0, min(floor(rank * scale + bias), n - 1)). Clamped in
/// double before the conversion so that huge or negative values are defined.
SPARSEVLM_HD inline std::int64_t rank_keep(std::int64_t rank, double scale, double bias,
                                           std::int64_t n) noexcept {
  // Two roundings, as Python's `rank * scale + bias` (the reference): the volatile
  // keeps a compiler that fuses multiply-adds (-ffp-contract=fast with FMA, the
  // default on aarch64 and with -march=native) from changing floor's answer when
  // the exact value is an integer (6 · 0.3 + 0.2 gives 1 here, 2 fused).
#if defined(__CUDA_ARCH__)
  const double product = mul_rn(static_cast<double>(rank), scale);  // never fused (core/rn.hpp)
#else
  volatile double product = static_cast<double>(rank) * scale;
#endif
  const double v = std::floor(add_rn(product, bias));
  const double hi = static_cast<double>(n - 1);
  if (!(v > 0.0)) return 0;
  if (v >= hi) return n - 1;
  return static_cast<std::int64_t>(v);
}

/// Spec step 7: s = min(n, floor(fraction * n) + 1) tokens are recycled.
SPARSEVLM_HD inline std::int64_t recycle_count(std::int64_t n_pruned, double fraction) noexcept {
  const double v = add_rn(std::floor(mul_rn(fraction, static_cast<double>(n_pruned))), 1.0);
  return v >= static_cast<double>(n_pruned) ? n_pruned : static_cast<std::int64_t>(v);
}

/// Spec step 7: c = floor(s / cluster_divisor) + 1 clusters (never more than s).
SPARSEVLM_HD inline std::int64_t cluster_count(std::int64_t s, double cluster_divisor) noexcept {
  const double v = add_rn(std::floor(div_rn(static_cast<double>(s), cluster_divisor)), 1.0);
  return v >= static_cast<double>(s) ? s : static_cast<std::int64_t>(v);
}

/// Spec step 8's sequence layout, written once (plan.hpp's make_sequence and the
/// CUDA kernel call it): entry i of the new sequence for a visual span [S, S+N),
/// k kept positions `keep` and c recycled tokens: the prefix, the kept tokens,
/// -(j + 1) for recycled token j, then the text (i < L − N + k + c).
template <class Index>
SPARSEVLM_HD std::int64_t sequence_entry(std::int64_t i, std::int64_t S, std::int64_t N,
                                         const Index* keep, std::int64_t k,
                                         std::int64_t c) noexcept {
  if (i < S) return i;
  if (i < S + k) return keep[i - S];
  if (i < S + k + c) return -(i - S - k + 1);
  return S + N + (i - S - k - c);
}

/// Spec step 7's assignment of a non-centre, written once (recycle.hpp's dpc_knn
/// and the CUDA kernel call it): the cluster q of the nearest centre, row
/// `d_row` of D (d_row[centres[q]] its distance to centre q); a strictly nearer
/// centre replaces, so ties go to the earlier centre (c >= 1).
template <class Index>
SPARSEVLM_HD std::int64_t nearest_centre(const double* d_row, const Index* centres,
                                         std::int64_t c) noexcept {
  std::int64_t best = 0;
  double best_d = d_row[centres[0]];
  for (std::int64_t q = 1; q < c; ++q) {
    const double dq = d_row[centres[q]];
    if (dq < best_d) {
      best_d = dq;
      best = q;
    }
  }
  return best;
}

/// Spec step 1's pick, written once (raters.hpp and the CUDA kernel call it): the
/// text positions first_text + t with m[t] > mean(m), ascending, into `out`
/// (room for n_text); none when there is no text or every m[t] is equal (checked
/// exactly, before the mean, so the mean's rounding cannot invent raters). The
/// mean sums in index order. Returns the count.
SPARSEVLM_HD inline std::int64_t pick_raters(const double* m, std::int64_t n_text,
                                             std::int64_t first_text,
                                             std::int64_t* out) noexcept {
  if (n_text == 0) return 0;
  std::int64_t first_unequal = 1;
  while (first_unequal < n_text && m[first_unequal] == m[0]) ++first_unequal;
  if (first_unequal == n_text) return 0;  // every m[t] equal
  double mean = 0.0;
  for (std::int64_t t = 0; t < n_text; ++t) mean = add_rn(mean, m[t]);
  mean = div_rn(mean, static_cast<double>(n_text));
  std::int64_t r = 0;
  for (std::int64_t t = 0; t < n_text; ++t)
    if (m[t] > mean) out[r++] = first_text + t;
  return r;
}

/// Spec step 5, the whole keep rule (one home: keep_count.hpp and the CUDA
/// kernel call it): every token without raters or at full rank; else the fixed
/// count clamped to n − 1, or rank_keep.
SPARSEVLM_HD inline std::int64_t decide_keep(std::int64_t n_visual, std::int64_t n_raters,
                                             std::int64_t rank, bool fixed,
                                             std::int64_t fixed_keep, double scale,
                                             double bias) noexcept {
  if (n_raters == 0) return n_visual;
  if (fixed) return fixed_keep < n_visual - 1 ? fixed_keep : n_visual - 1;
  if (rank == n_visual) return n_visual;
  return rank_keep(rank, scale, bias, n_visual);
}

/// Spec step 7's counts for `pruned` tokens: s recycled rows and c clusters, both
/// 0 when recycling is off or nothing was pruned (one home: the step, the spans
/// step, the session's check, the presets' and the budget's token counts and the
/// CUDA kernel call it).
struct recycle_counts {
  std::int64_t rows = 0;
  std::int64_t clusters = 0;
};
SPARSEVLM_HD inline recycle_counts recycled_counts(std::int64_t pruned, bool enabled,
                                                   double fraction,
                                                   double cluster_divisor) noexcept {
  recycle_counts r;
  if (!enabled || pruned <= 0) return r;
  r.rows = recycle_count(pruned, fraction);
  r.clusters = cluster_count(r.rows, cluster_divisor);
  return r;
}

/// Spec step 7, one entry of D from the Gram matrix G = X·Xᵀ (double):
/// ‖x_i − x_j‖₂ / sqrt(d) = sqrt(max((G_ii + G_jj) − 2·G_ij, 0)) / sqrt(d).
/// Duplicate rows give three identical Gram entries, hence exactly 0.
SPARSEVLM_HD inline double gram_distance(double g_ii, double g_jj, double g_ij,
                                         double sqrt_d) noexcept {
  const double sq = sub_rn(add_rn(g_ii, g_jj), mul_rn(2.0, g_ij));
  return div_rn(sqrt_rn(sq < 0.0 ? 0.0 : sq), sqrt_d);  // std::max(sq, 0.0), bit for bit
}

/// Spec step 7: ρ = exp(−mean of the squares of the k smallest distances of a
/// row), `smallest` holding them in ascending order (so equal multisets give
/// equal sums, hence exactly equal densities). exp is the library's own
/// (core/exp.hpp), so the CPU and the GPU compute the same densities.
SPARSEVLM_HD inline double density(const double* smallest, std::int64_t k) noexcept {
  double sum = 0.0;
  for (std::int64_t t = 0; t < k; ++t) sum = add_rn(sum, mul_rn(smallest[t], smallest[t]));
  return exp64(-div_rn(sum, static_cast<double>(k)));
}

/// Spec step 7, δ: min(delta, dist) as std::min computes it.
SPARSEVLM_HD inline double nearer(double delta, double dist) noexcept {
  return dist < delta ? dist : delta;
}

}  // namespace sparsevlm::detail::core
