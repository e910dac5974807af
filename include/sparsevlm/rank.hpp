// Stage 4: the numerical rank of the relevance matrix.
#pragma once

#include <algorithm>

#include "check.hpp"
#include "core/eigen.hpp"
#include "cpu/dispatch.hpp"
#include "workspace.hpp"

namespace sparsevlm {

namespace detail {

/// numerical_rank on a P known to be finite (the composition's: every score,
/// a sum of P's column, was checked finite by the scoring stage, and a finite
/// float32 sum has finite terms).
inline index_t numerical_rank_trusted(matrix_view<const float> P, workspace& ws) {
  const index_t R = P.extent(0);
  const index_t N = P.extent(1);
  if (R == 0 || N == 0) return 0;
  const index_t m = std::min(R, N), depth = std::max(R, N);
  // The m rows whose Gram matrix is wanted, row-major: P itself when it is
  // row-major and R <= N, else a copy (transposed when R > N).
  const float* rows = nullptr;
  index_t ld = 0;
  if (R <= N && P.stride(1) == 1) {
    rows = P.data();
    ld = P.stride(0);
  } else {
    float* buf = workspace::take(ws.rank.P, static_cast<std::size_t>(R * N));
    for (index_t r = 0; r < R; ++r)
      for (index_t j = 0; j < N; ++j) {
        if (R <= N) buf[r * N + j] = P(r, j);
        else buf[j * R + r] = P(r, j);
      }
    rows = buf;
    ld = depth;
  }
  double* G = workspace::take(ws.rank.gram, static_cast<std::size_t>(m * m));
  cpu::detail::kernels().gram_f64(rows, ld, m, depth, G);
  double* de = workspace::take(ws.rank.eigen, static_cast<std::size_t>(2 * m));
  double bc[detail::core::eigen_shared];
  return detail::core::gram_rank(detail::core::serial_block{}, G, m, depth, de, de + m, bc);
}

}  // namespace detail

/// Numerical rank of P (spec step 4): the number of singular values σ with
/// σ > σ_max · max(R, N) · 2^-23.
///
/// Method: the singular values of P are the square roots of the eigenvalues of
/// the Gram matrix G = P·Pᵀ (R×R when R <= N, else Pᵀ·P, N×N). G is formed in
/// double from exact products of the float32 entries (cpu::detail::kernel_table's
/// gram_f64: the same bits on every instruction set), reduced to a tridiagonal
/// matrix by Householder reflectors, and Sturm counts on that give λ_max (by
/// multisection) and the number of eigenvalues λ > λ_max · (max(R, N) · 2^-23)²
/// (core/eigen.hpp's gram_rank). It works in the workspace, so the stage
/// allocates nothing.
///
/// Why this is exact at the spec's tolerance: forming G in double perturbs it by
/// about max(R,N)·2^-53·λ_max and the reduction and the Sturm counts are backward
/// stable, adding about m·2^-52·λ_max (m = min(R, N)), while the threshold is at least
/// λ_max·(max(R,N)·2^-23)². Near the threshold σ is therefore known to a relative
/// (R+N)·2^-52 / (2·max(R,N)²·2^-46) < 2% / max(R, N) of the tolerance — far
/// tighter than a float32 SVD of P itself, whose singular values carry an error
/// of about 2^-23·σ_max (1/max(R,N) of the tolerance).
/// Squaring does lose the small singular values far *below* the threshold, but
/// those never count.
///
/// - `P`: [R, N] float32, any strides. R = 0 or N = 0 gives 0; P = 0 gives 0.
/// - Cost: m²·max(R,N)/2 double multiply-adds for G (at 64×2880 about 6 M) plus
///   4m³/3 for the reduction and about 600 Sturm counts of m steps (at most 1,025).
///   Scratch: R·N floats (unless P is row-major with R <= N), m² + 2m doubles.
/// - Errors: non_finite when P holds NaN/Inf.
inline index_t numerical_rank(matrix_view<const float> P, workspace& ws) {
  const index_t R = P.extent(0);
  const index_t N = P.extent(1);
  if (R == 0 || N == 0) return 0;
  detail::check_finite_rows(P, 0, R, "P");
  return detail::numerical_rank_trusted(P, ws);
}

/// Convenience overload with a temporary workspace.
inline index_t numerical_rank(matrix_view<const float> P) {
  workspace ws;
  return numerical_rank(P, ws);
}

}  // namespace sparsevlm
