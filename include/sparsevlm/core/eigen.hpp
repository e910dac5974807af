// The rank stage's eigenvalue arithmetic in double, with no allocation, shared
// by the CPU (one thread) and the CUDA backend (one thread block, same bits):
// Householder reduction to a tridiagonal matrix, Sturm counts on it, and the
// spec's rank as a count of eigenvalues above a threshold.
//
// Why Sturm counts and not an eigen-solver: the rank needs only λ_max (for the
// threshold) and how many eigenvalues lie above the threshold. Both are
// questions "how many eigenvalues are below x", each answered by one O(n)
// recurrence, and a thread block answers many of them at once. A QL solver
// (the classic tqli, used here before) runs its O(n²) iteration on one thread.
#pragma once

#include <cmath>
#include <cstdint>

#include "../config.hpp"
#include "block.hpp"
#include "dot.hpp"
#include "math.hpp"
#include "rn.hpp"

namespace sparsevlm::detail::core {

/// Σ over i in [lo, hi) of left(i) for i < mid and right(i) from mid on, in
/// dot64's order (core/dot.hpp): 8 partial sums, lane l taking i = lo + l,
/// lo + l + 8, ..., combined by reduce8. Why lanes: a sum in index order is one
/// chain of hi − lo dependent additions, which is what bounds the reduction's
/// time on a GPU block (its sums are latency, not throughput); 8 chains are
/// (hi − lo)/8 + 3 long and give the same bits on every backend because the
/// order is fixed, not the thread count's. Why two sources: a row of a
/// symmetric matrix stored as its lower triangle is read along the row left of
/// the diagonal and down the column right of it; only the group of 8 that
/// straddles `mid` chooses per term (a choice per term costs the CPU half its
/// speed here). The lanes are indexed by constants only (registers on a GPU).
template <class Left, class Right>
SPARSEVLM_HD double lane_sum8(std::int64_t lo, std::int64_t mid, std::int64_t hi, Left&& left,
                              Right&& right) noexcept {
  double acc[8] = {};
  std::int64_t i = lo;
  for (; i + 8 <= mid && i + 8 <= hi; i += 8)
    for (int l = 0; l < 8; ++l) acc[l] = add_rn(acc[l], left(i + l));
  if (i < mid && i < hi) {  // the group that holds mid (or the end)
    for (int l = 0; l < 8; ++l)
      if (i + l < hi) acc[l] = add_rn(acc[l], i + l < mid ? left(i + l) : right(i + l));
    i += 8;
  }
  for (; i + 8 <= hi; i += 8)
    for (int l = 0; l < 8; ++l) acc[l] = add_rn(acc[l], right(i + l));
  for (int l = 0; i + l < hi; ++l) acc[l] = add_rn(acc[l], right(i + l));
  return reduce8(acc);
}

/// Σ f(i) over i in [lo, hi) in the same order.
template <class F>
SPARSEVLM_HD double lane_sum8(std::int64_t lo, std::int64_t hi, F&& f) noexcept {
  return lane_sum8(lo, hi, hi, f, f);
}

/// Points per multisection round of largest_eigenvalue: each round shrinks the
/// interval holding λ_max 65-fold (about 6 bits), so about 9 rounds reach double
/// precision. A constant, not the block size, so every block size and the CPU
/// evaluate the same points.
inline constexpr std::int64_t multisection_points = 64;
static_assert(multisection_points % 8 == 0, "the one-thread path takes 8 points at a time");

/// Doubles of block-shared scratch (`bc`) that largest_eigenvalue and gram_rank
/// need.
inline constexpr std::int64_t eigen_shared = 8 + multisection_points;

/// Reduces the symmetric n×n matrix `a` (row-major; only the lower triangle is
/// read; destroyed) to a tridiagonal matrix with the same eigenvalues, by the
/// threads of block `b` (core/block.hpp): Householder reflectors (Golub & Van
/// Loan, Alg. 8.3.1, no eigenvectors), backward stable.
///
/// The arithmetic does not depend on the number of threads: the O(n²)
/// per-column loops are split across the block by row (each row's sum runs in
/// one thread), while each sum across rows (the column's scale, ‖v‖², v·p) is
/// taken by every thread itself, so that no thread waits for another's. Every
/// sum is a lane_sum8 (8 partial sums in a fixed order), which cuts its chain
/// of dependent additions 8-fold. One thread (serial_block, the CPU) and a
/// CUDA block of any size give the same bits.
///
/// - `d` (n): receives the diagonal; `e` (n): the subdiagonal, e[i] coupling i
///   and i + 1, e[n − 1] = 0 (and the reflectors while it runs). Both, and `a`,
///   must be visible to every thread of the block. On return (after a barrier)
///   every thread may read d and e.
/// - Cost: 4n³/3 + O(n²) flops; three barriers per column.
/// - Every operation is one rounding (core/rn.hpp), so nvcc's flags cannot fuse or
///   approximate any of it.
template <class Block>
SPARSEVLM_HD void tridiagonalize(const Block& b, double* a, std::int64_t n, double* d,
                                 double* e) noexcept {
  using std::fabs;
  if (n <= 0) return;
  const std::int64_t t0 = b.rank(), nt = b.size();
  const bool lead = t0 == 0;
  // Householder: for column k, zero a[k+2.., k] with a reflector from the left
  // and right, updating the trailing lower triangle. The reflector v lives in
  // e[k+1..] (free until the columns after k write their e), so that column k
  // of `a` stays as it was and every thread can take the sums over it itself:
  // three barriers per column.
  for (std::int64_t k = 0; k + 2 < n; ++k) {
    // Every thread, the same sums in the same order: scale, then h over v = x/scale.
    const double scale = lane_sum8(k + 1, n, [a, n, k](std::int64_t i) { return fabs(a[i * n + k]); });
    if (scale == 0.0) {  // already reduced in this column
      if (lead) {
        d[k] = a[k * n + k];
        e[k] = 0.0;
      }
      continue;
    }
    double h = lane_sum8(k + 1, n, [a, n, k, scale](std::int64_t i) {
      const double v = div_rn(a[i * n + k], scale);
      return mul_rn(v, v);
    });
    const double f = div_rn(a[(k + 1) * n + k], scale);
    const double g = f >= 0.0 ? -sqrt_rn(h) : sqrt_rn(h);
    h = sub_rn(h, mul_rn(f, g));  // = ‖v‖² / 2 with v = x − g·e1
    for (std::int64_t i = k + 1 + t0; i < n; i += nt)
      e[i] = i == k + 1 ? sub_rn(f, g) : div_rn(a[i * n + k], scale);  // v
    if (lead) e[k] = mul_rn(scale, g);
    b.sync();
    // p = A·v / h over the trailing block (lower triangle), into d[k+1..] as scratch.
    for (std::int64_t i = k + 1 + t0; i < n; i += nt) {
      // Row i of the symmetric trailing block: a[i, j] left of the diagonal, a[j, i] right.
      const double s = lane_sum8(
          k + 1, i + 1, n, [a, n, i, e](std::int64_t j) { return mul_rn(a[i * n + j], e[j]); },
          [a, n, i, e](std::int64_t j) { return mul_rn(a[j * n + i], e[j]); });
      d[i] = div_rn(s, h);
    }
    b.sync();
    const double vp = lane_sum8(k + 1, n, [d, e](std::int64_t i) { return mul_rn(d[i], e[i]); });  // every thread
    const double kk = div_rn(vp, add_rn(h, h));
    // A −= v·wᵀ + w·vᵀ with w = p − kk·v (each w taken where it is used).
    for (std::int64_t i = k + 1 + t0; i < n; i += nt) {
      const double wi = sub_rn(d[i], mul_rn(kk, e[i]));
      for (std::int64_t j = k + 1; j <= i; ++j) {
        const double wj = sub_rn(d[j], mul_rn(kk, e[j]));
        a[i * n + j] = sub_rn(a[i * n + j], add_rn(mul_rn(e[i], wj), mul_rn(wi, e[j])));
      }
    }
    b.sync();
    if (lead) d[k] = a[k * n + k];
  }
  if (lead) {
    if (n >= 2) {
      d[n - 2] = a[(n - 2) * n + (n - 2)];
      e[n - 2] = a[(n - 1) * n + (n - 2)];
    }
    d[n - 1] = a[(n - 1) * n + (n - 1)];
    e[n - 1] = 0.0;
  }
  b.sync();
}

/// Number of eigenvalues of the symmetric tridiagonal matrix T (diagonal `d`,
/// squared subdiagonal `e2`, n ≥ 1) that are below x: the negative pivots of the
/// LDLᵀ factorisation of T − xI (Sylvester's law of inertia), by the recurrence
/// q_i = (d_i − x) − e2_{i−1} / q_{i−1} (LAPACK's dstebz). A pivot smaller in
/// magnitude than `pivmin` is replaced by −pivmin, so nothing divides by zero
/// and e2 / pivmin cannot overflow (pivmin ≥ 2^-1022·max e2); an eigenvalue
/// equal to x therefore counts as below it. The count is that of a matrix within
/// a few units in the last place of T (the recurrence is backward stable), and
/// it is monotone in x. Cost: n divisions, one thread.
SPARSEVLM_HD inline std::int64_t sturm_count(const double* d, const double* e2, std::int64_t n,
                                             double x, double pivmin) noexcept {
  using std::fabs;
  std::int64_t below = 0;
  double q = sub_rn(d[0], x);
  for (std::int64_t i = 0;; ++i) {
    if (fabs(q) < pivmin) q = -pivmin;
    if (q < 0.0) ++below;
    if (i + 1 >= n) break;
    q = sub_rn(sub_rn(d[i + 1], x), div_rn(e2[i], q));
  }
  return below;
}

/// sturm_count at the `P` points x[0, P) at once, into below[0, P): the same
/// recurrence and bits per point, interleaved so that the P division chains
/// overlap (one chain is bound by the division's latency).
template <int P>
SPARSEVLM_HD void sturm_counts(const double* d, const double* e2, std::int64_t n, const double* x,
                               double pivmin, std::int64_t* below) noexcept {
  using std::fabs;
  double q[P];
  for (int p = 0; p < P; ++p) {
    q[p] = sub_rn(d[0], x[p]);
    below[p] = 0;
  }
  for (std::int64_t i = 0;; ++i) {
    for (int p = 0; p < P; ++p) {
      if (fabs(q[p]) < pivmin) q[p] = -pivmin;
      below[p] += q[p] < 0.0 ? 1 : 0;
    }
    if (i + 1 >= n) break;
    for (int p = 0; p < P; ++p) q[p] = sub_rn(sub_rn(d[i + 1], x[p]), div_rn(e2[i], q[p]));
  }
}

/// λ_max of a tridiagonal matrix, and the pivot floor its Sturm counts use.
struct top_eigenvalue {
  double lambda_max = 0.0;  ///< 0 when T = 0
  double pivmin = 0.0;      ///< sturm_count's pivot floor for this T
};

/// The largest eigenvalue of the symmetric tridiagonal (d, e) that tridiagonalize
/// wrote (n ≥ 1), by multisection: it starts from [max d, the Gershgorin upper
/// bound widened by a few ulps], and in each round the threads of `b` take the
/// Sturm counts at multisection_points equally spaced points; the interval
/// becomes the one between the last point with fewer than n eigenvalues below
/// it and the first with n. It stops when the interval is at most 2^-51·λ_max
/// wide or stops shrinking (at most 16 rounds; 9 is typical), and returns its
/// upper end, so λ_max is found to within about n·2^-52·‖T‖, as a QL solver
/// finds it.
///
/// - `e` is replaced by its squares (what sturm_count reads afterwards).
/// - `bc`: eigen_shared doubles the block shares (shared memory on the device).
///   The result is the same on every thread; a barrier ends the call.
/// - A matrix with no positive Gershgorin bound (T = 0 for a Gram matrix) gives
///   λ_max = 0 at once.
/// - Cost: at most 16 · multisection_points Sturm counts of n steps, spread over
///   the block; a serial scan of multisection_points counts per round.
template <class Block>
SPARSEVLM_HD top_eigenvalue largest_eigenvalue(const Block& b, const double* d, double* e,
                                               std::int64_t n, double* bc) noexcept {
  using std::fabs;
  constexpr std::int64_t K = multisection_points;
  const std::int64_t t0 = b.rank(), nt = b.size();
  const bool lead = t0 == 0;
  if (lead) {
    // Gershgorin and the largest diagonal entry (maxima: exact in any order).
    double lo = d[0], hi = 0.0, e2max = 0.0;
    for (std::int64_t i = 0; i < n; ++i) {
      const double left = i > 0 ? fabs(e[i - 1]) : 0.0, right = fabs(e[i]);
      const double g = add_rn(add_rn(d[i], left), right);
      hi = i == 0 || g > hi ? g : hi;
      lo = d[i] > lo ? d[i] : lo;
    }
    for (std::int64_t i = 0; i + 1 < n; ++i) {
      const double e2 = mul_rn(e[i], e[i]);
      e2max = e2 > e2max ? e2 : e2max;
      e[i] = e2;
    }
    const double pivmin = mul_rn(0x1p-1022, e2max > 1.0 ? e2max : 1.0);
    // The rounded bound may sit an ulp or two below the exact one.
    hi = add_rn(hi, add_rn(mul_rn(0x1p-50, fabs(hi)), pivmin));
    bc[0] = lo;
    bc[1] = hi;
    bc[2] = pivmin;
    bc[3] = hi > pivmin ? 0.0 : 1.0;  // done (T = 0)
    if (hi <= pivmin) bc[1] = 0.0;
  }
  b.sync();
  const double pivmin = bc[2];
  for (int round = 0; round < 16 && bc[3] == 0.0; ++round) {
    const double lo = bc[0], hi = bc[1];
    const double w = div_rn(sub_rn(hi, lo), static_cast<double>(K + 1));
    const auto point = [lo, w](std::int64_t k) { return add_rn(lo, mul_rn(w, static_cast<double>(k + 1))); };
    if (nt == 1) {  // one thread (the CPU): 8 points at a time, their divisions overlapping
      for (std::int64_t k = 0; k < K; k += 8) {
        double x[8];
        std::int64_t below[8];
        for (int p = 0; p < 8; ++p) x[p] = point(k + p);
        sturm_counts<8>(d, e, n, x, pivmin, below);
        for (int p = 0; p < 8; ++p) bc[8 + k + p] = static_cast<double>(below[p]);
      }
    } else {
      for (std::int64_t k = t0; k < K; k += nt)
        bc[8 + k] = static_cast<double>(sturm_count(d, e, n, point(k), pivmin));
    }
    b.sync();
    if (lead) {
      std::int64_t first = K;  // the first point with every eigenvalue below it
      for (std::int64_t k = 0; k < K && first == K; ++k)
        if (bc[8 + k] >= static_cast<double>(n)) first = k;
      const double nlo = first == 0 ? lo : point(first - 1);
      const double nhi = first == K ? hi : point(first);
      const bool stuck = nlo == lo && nhi == hi;
      bc[0] = nlo;
      bc[1] = nhi;
      bc[3] = stuck || sub_rn(nhi, nlo) <= mul_rn(0x1p-51, fabs(nhi)) ? 1.0 : 0.0;
    }
    b.sync();
  }
  return top_eigenvalue{bc[1], pivmin};
}

/// Spec step 4 on a Gram matrix: the number of eigenvalues of G (m×m, symmetric,
/// destroyed) above λ_max·(depth·2^-23)² (rank_threshold_sq), i.e. the number of
/// singular values of P above σ_max·depth·2^-23 when G = P·Pᵀ or Pᵀ·P and depth
/// = max(R, N). 0 when m = 0 or G = 0. By the threads of `b`, the same count on
/// every one of them and for every block size.
///
/// - `d`, `e` (m each) as in tridiagonalize, `bc` (eigen_shared) as in
///   largest_eigenvalue.
/// - Cost: 4m³/3 flops for the reduction, at most 16·64 + 1 Sturm counts of m
///   steps.
template <class Block>
SPARSEVLM_HD std::int64_t gram_rank(const Block& b, double* G, std::int64_t m, std::int64_t depth,
                                    double* d, double* e, double* bc) noexcept {
  if (m <= 0) return 0;
  tridiagonalize(b, G, m, d, e);
  const top_eigenvalue top = largest_eigenvalue(b, d, e, m, bc);
  if (!(top.lambda_max > 0.0)) return 0;
  // Eigenvalues at or below the threshold count as below it.
  const double threshold = rank_threshold_sq(top.lambda_max, depth);
  return m - sturm_count(d, e, m, threshold, top.pivmin);
}

}  // namespace sparsevlm::detail::core
