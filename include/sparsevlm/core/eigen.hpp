// Eigenvalues of a small symmetric matrix in double, with no allocation: the
// rank stage's solver, shared by the CPU (one thread) and the CUDA backend (one
// thread block, same bits).
#pragma once

#include <cmath>
#include <cstdint>

#include "../config.hpp"
#include "block.hpp"
#include "rn.hpp"

namespace sparsevlm::detail::core {

/// Eigenvalues of the symmetric n×n matrix `a` (row-major; only the lower
/// triangle is read; destroyed), computed by the threads of block `b`
/// (core/block.hpp): Householder reduction to tridiagonal form (Golub & Van
/// Loan, Alg. 8.3.1, eigenvalues only), then implicit QL with Wilkinson-type
/// shifts (the classic tqli); both are backward stable, so each eigenvalue is
/// found to about n·2^-52·|λ_max|.
///
/// The arithmetic does not depend on the number of threads: the reduction's
/// O(n²) per-column loops are split across the block by row (each row's sum
/// still runs in one thread, in column order), while every sum across rows and
/// the whole QL phase run in thread 0 in the serial order. One thread
/// (serial_block, the CPU) and a CUDA block of any size give the same bits.
///
/// - `d` (n): receives the eigenvalues, unordered; `e` (n): scratch; `bc` (4):
///   scratch the block shares (shared memory on the device). All of them, and
///   `a`, must be visible to every thread of the block.
/// - Returns, on every thread, false if the QL iteration did not converge within
///   60 sweeps per eigenvalue (never seen for symmetric input; the caller falls
///   back or reports it).
/// - Cost: 4n³/3 + O(n²) flops; O(n²) barrier steps.
/// - Every operation is one rounding (core/rn.hpp), so nvcc's flags cannot fuse or
///   approximate any of it.
template <class Block>
SPARSEVLM_HD bool symmetric_eigenvalues(const Block& b, double* a, std::int64_t n, double* d,
                                        double* e, double* bc) noexcept {
  using std::fabs;
  if (n <= 0) return true;
  const std::int64_t t0 = b.rank(), nt = b.size();
  const bool lead = t0 == 0;
  // Householder: for column k, zero a[k+2.., k] with a reflector from the left
  // and right, updating the trailing lower triangle.
  for (std::int64_t k = 0; k + 2 < n; ++k) {
    if (lead) {
      double scale = 0.0;
      for (std::int64_t i = k + 1; i < n; ++i) scale = add_rn(scale, fabs(a[i * n + k]));
      bc[0] = scale;
    }
    b.sync();
    const double scale = bc[0];
    if (scale == 0.0) {  // already reduced in this column
      if (lead) {
        d[k] = a[k * n + k];
        e[k] = 0.0;
      }
      b.sync();  // bc[0] is rewritten by the next column
      continue;
    }
    for (std::int64_t i = k + 1 + t0; i < n; i += nt) a[i * n + k] = div_rn(a[i * n + k], scale);  // scaled v
    b.sync();
    if (lead) {
      double h = 0.0;
      for (std::int64_t i = k + 1; i < n; ++i) h = add_rn(h, mul_rn(a[i * n + k], a[i * n + k]));
      const double f = a[(k + 1) * n + k];
      const double g = f >= 0.0 ? -sqrt_rn(h) : sqrt_rn(h);
      e[k] = mul_rn(scale, g);
      h = sub_rn(h, mul_rn(f, g));  // = ‖v‖² / 2 with v = x − g·e1
      a[(k + 1) * n + k] = sub_rn(f, g);
      bc[1] = h;
    }
    b.sync();
    const double h = bc[1];
    // p = A·v / h over the trailing block (lower triangle), into d[k+1..] as scratch.
    for (std::int64_t i = k + 1 + t0; i < n; i += nt) {
      double s = 0.0;
      for (std::int64_t j = k + 1; j <= i; ++j) s = add_rn(s, mul_rn(a[i * n + j], a[j * n + k]));
      for (std::int64_t j = i + 1; j < n; ++j) s = add_rn(s, mul_rn(a[j * n + i], a[j * n + k]));
      d[i] = div_rn(s, h);
    }
    b.sync();
    if (lead) {
      double vp = 0.0;
      for (std::int64_t i = k + 1; i < n; ++i) vp = add_rn(vp, mul_rn(d[i], a[i * n + k]));
      bc[2] = div_rn(vp, add_rn(h, h));
    }
    b.sync();
    const double kk = bc[2];
    for (std::int64_t i = k + 1 + t0; i < n; i += nt) d[i] = sub_rn(d[i], mul_rn(kk, a[i * n + k]));  // w
    b.sync();
    for (std::int64_t i = k + 1 + t0; i < n; i += nt)
      for (std::int64_t j = k + 1; j <= i; ++j)
        a[i * n + j] = sub_rn(a[i * n + j],
                              add_rn(mul_rn(a[i * n + k], d[j]), mul_rn(d[i], a[j * n + k])));
    b.sync();
    if (lead) d[k] = a[k * n + k];
  }
  if (lead) {
    bool ok = true;
    if (n >= 2) {
      d[n - 2] = a[(n - 2) * n + (n - 2)];
      e[n - 2] = a[(n - 1) * n + (n - 2)];
    }
    d[n - 1] = a[(n - 1) * n + (n - 1)];
    e[n - 1] = 0.0;

    // Implicit QL on the tridiagonal (d, e), e[i] coupling i and i + 1.
    for (std::int64_t l = 0; l < n && ok; ++l) {
      int iter = 0;
      std::int64_t m;
      do {
        for (m = l; m + 1 < n; ++m) {
          const double dd = add_rn(fabs(d[m]), fabs(d[m + 1]));
          if (fabs(e[m]) <= mul_rn(0x1p-53, dd)) break;
        }
        if (m != l) {
          if (++iter > 60) {
            ok = false;
            break;
          }
          double g = div_rn(sub_rn(d[l + 1], d[l]), mul_rn(2.0, e[l]));
          double r = sqrt_rn(add_rn(mul_rn(g, g), 1.0));
          g = add_rn(sub_rn(d[m], d[l]), div_rn(e[l], add_rn(g, g >= 0.0 ? fabs(r) : -fabs(r))));
          double s = 1.0, c = 1.0, p = 0.0;
          std::int64_t i = m - 1;
          bool early = false;
          for (; i >= l; --i) {
            double f = mul_rn(s, e[i]);
            const double bb = mul_rn(c, e[i]);
            r = sqrt_rn(add_rn(mul_rn(f, f), mul_rn(g, g)));
            e[i + 1] = r;
            if (r == 0.0) {  // underflow: deflate and restart
              d[i + 1] = sub_rn(d[i + 1], p);
              e[m] = 0.0;
              early = true;
              break;
            }
            s = div_rn(f, r);
            c = div_rn(g, r);
            g = sub_rn(d[i + 1], p);
            r = add_rn(mul_rn(sub_rn(d[i], g), s), mul_rn(mul_rn(2.0, c), bb));
            p = mul_rn(s, r);
            d[i + 1] = add_rn(g, p);
            g = sub_rn(mul_rn(c, r), bb);
          }
          if (early) continue;
          d[l] = sub_rn(d[l], p);
          e[l] = g;
          e[m] = 0.0;
        }
      } while (m != l);
    }
    bc[3] = ok ? 1.0 : 0.0;
  }
  b.sync();
  return bc[3] != 0.0;
}

/// The same on one thread, in place (the CPU rank stage).
SPARSEVLM_HD inline bool symmetric_eigenvalues(double* a, std::int64_t n, double* d,
                                               double* e) noexcept {
  double bc[4] = {};
  return symmetric_eigenvalues(serial_block{}, a, n, d, e, bc);
}

}  // namespace sparsevlm::detail::core
