// Eigenvalues of a small symmetric matrix in double, with no allocation: the
// rank stage's solver, shared by the CPU and (later) CUDA backends.
#pragma once

#include <cmath>
#include <cstdint>

#include "../config.hpp"

namespace sparsevlm::core {

/// Eigenvalues of the symmetric n×n matrix `a` (row-major; only the lower
/// triangle is read; destroyed). Householder reduction to tridiagonal form
/// (Golub & Van Loan, Alg. 8.3.1, eigenvalues only), then implicit QL with
/// Wilkinson-type shifts (the classic tqli); both are backward stable, so each
/// eigenvalue is found to about n·2^-52·|λ_max|.
///
/// - `d` (n): receives the eigenvalues, unordered; `e` (n): scratch.
/// - Returns false if the QL iteration did not converge within 60 sweeps per
///   eigenvalue (never seen for symmetric input; the caller falls back).
/// - Cost: 4n³/3 + O(n²) flops.
SPARSEVLM_HD inline bool symmetric_eigenvalues(double* a, std::int64_t n, double* d,
                                               double* e) noexcept {
  using std::fabs;
  using std::sqrt;
  if (n <= 0) return true;
  // Householder: for column k, zero a[k+2.., k] with a reflector from the left
  // and right, updating the trailing lower triangle.
  for (std::int64_t k = 0; k + 2 < n; ++k) {
    double scale = 0.0;
    for (std::int64_t i = k + 1; i < n; ++i) scale += fabs(a[i * n + k]);
    if (scale == 0.0) {  // already reduced in this column
      d[k] = a[k * n + k];
      e[k] = 0.0;
      continue;
    }
    double h = 0.0;
    for (std::int64_t i = k + 1; i < n; ++i) {
      a[i * n + k] /= scale;  // scaled v, avoids over/underflow
      h += a[i * n + k] * a[i * n + k];
    }
    const double f = a[(k + 1) * n + k];
    const double g = f >= 0.0 ? -sqrt(h) : sqrt(h);
    e[k] = scale * g;
    h -= f * g;  // = ‖v‖² / 2 with v = x − g·e1
    a[(k + 1) * n + k] = f - g;
    // p = A·v / h over the trailing block (lower triangle), into d[k+1..] as scratch.
    double vp = 0.0;
    for (std::int64_t i = k + 1; i < n; ++i) {
      double s = 0.0;
      for (std::int64_t j = k + 1; j <= i; ++j) s += a[i * n + j] * a[j * n + k];
      for (std::int64_t j = i + 1; j < n; ++j) s += a[j * n + i] * a[j * n + k];
      d[i] = s / h;
      vp += d[i] * a[i * n + k];
    }
    const double kk = vp / (h + h);
    for (std::int64_t i = k + 1; i < n; ++i) d[i] -= kk * a[i * n + k];  // w
    for (std::int64_t i = k + 1; i < n; ++i)
      for (std::int64_t j = k + 1; j <= i; ++j)
        a[i * n + j] -= a[i * n + k] * d[j] + d[i] * a[j * n + k];
    d[k] = a[k * n + k];
  }
  if (n >= 2) {
    d[n - 2] = a[(n - 2) * n + (n - 2)];
    e[n - 2] = a[(n - 1) * n + (n - 2)];
  }
  d[n - 1] = a[(n - 1) * n + (n - 1)];
  e[n - 1] = 0.0;

  // Implicit QL on the tridiagonal (d, e), e[i] coupling i and i + 1.
  for (std::int64_t l = 0; l < n; ++l) {
    int iter = 0;
    std::int64_t m;
    do {
      for (m = l; m + 1 < n; ++m) {
        const double dd = fabs(d[m]) + fabs(d[m + 1]);
        if (fabs(e[m]) <= 0x1p-53 * dd) break;
      }
      if (m != l) {
        if (++iter > 60) return false;
        double g = (d[l + 1] - d[l]) / (2.0 * e[l]);
        double r = sqrt(g * g + 1.0);
        g = d[m] - d[l] + e[l] / (g + (g >= 0.0 ? fabs(r) : -fabs(r)));
        double s = 1.0, c = 1.0, p = 0.0;
        std::int64_t i = m - 1;
        bool early = false;
        for (; i >= l; --i) {
          double f = s * e[i];
          const double b = c * e[i];
          r = sqrt(f * f + g * g);
          e[i + 1] = r;
          if (r == 0.0) {  // underflow: deflate and restart
            d[i + 1] -= p;
            e[m] = 0.0;
            early = true;
            break;
          }
          s = f / r;
          c = g / r;
          g = d[i + 1] - p;
          r = (d[i] - g) * s + 2.0 * c * b;
          p = s * r;
          d[i + 1] = g + p;
          g = c * r - b;
        }
        if (early) continue;
        d[l] -= p;
        e[l] = g;
        e[m] = 0.0;
      }
    } while (m != l);
  }
  return true;
}

}  // namespace sparsevlm::core
