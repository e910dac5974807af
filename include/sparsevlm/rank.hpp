// Stage 4: the numerical rank of the relevance matrix.
#pragma once

#include <Eigen/Core>
#include <Eigen/Eigenvalues>
#include <algorithm>

#include "check.hpp"
#include "core/math.hpp"
#include "workspace.hpp"

namespace sparsevlm {

/// Numerical rank of P (spec step 4): the number of singular values σ with
/// σ > σ_max · max(R, N) · 2^-23.
///
/// Method: the singular values of P are the square roots of the eigenvalues of
/// the Gram matrix G = P·Pᵀ (R×R when R <= N, else Pᵀ·P, N×N), which is formed in
/// double and solved with Eigen's symmetric eigen-solver (tridiagonalisation + QR,
/// eigenvalues only). The count is λ > λ_max · (max(R, N) · 2^-23)².
///
/// Why this is exact at the spec's tolerance: forming G in double perturbs it by
/// about max(R,N)·2^-53·λ_max and the solver is backward stable, adding about
/// m·2^-53·λ_max (m = min(R, N)), while the threshold is at least
/// λ_max·(max(R,N)·2^-23)². Near the threshold σ is therefore known to a relative
/// (R+N)·2^-53 / (2·max(R,N)²·2^-46) < 0.8% / max(R, N) of the tolerance — far
/// tighter than a float32 SVD of P itself, whose singular values carry an error
/// of about 2^-23·σ_max (1/max(R,N) of the tolerance).
/// Squaring does lose the small singular values far *below* the threshold, but
/// those never count.
///
/// - `P`: [R, N] float32, any strides. R = 0 or N = 0 gives 0; P = 0 gives 0.
/// - Cost: O(m²·max(R,N)) for G plus O(m³) for the eigenvalues, m = min(R, N);
///   at 64×2880 about 6 M double multiply-adds (lower triangle only). Scratch: m² + R·N doubles.
/// - Errors: non_finite when P holds NaN/Inf.
inline index_t numerical_rank(matrix_view<const float> P, workspace& ws) {
  const index_t R = P.extent(0);
  const index_t N = P.extent(1);
  if (R == 0 || N == 0) return 0;
  detail::check_finite_rows(P, 0, R, "P");
  using RowMatD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  double* pbuf = workspace::take(ws.f64_b, static_cast<std::size_t>(R * N));
  for (index_t r = 0; r < R; ++r)
    for (index_t j = 0; j < N; ++j) pbuf[r * N + j] = static_cast<double>(P(r, j));
  Eigen::Map<const RowMatD> Pd(pbuf, R, N);
  const index_t m = std::min(R, N);
  double* gbuf = workspace::take(ws.f64_c, static_cast<std::size_t>(m * m));
  Eigen::Map<Eigen::MatrixXd> G(gbuf, m, m);
  // Lower triangle only (half the work of a full product): the solver reads no more.
  G.setZero();
  if (R <= N) {
    G.selfadjointView<Eigen::Lower>().rankUpdate(Pd);
  } else {
    G.selfadjointView<Eigen::Lower>().rankUpdate(Pd.transpose());
  }
  Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> solver(G, Eigen::EigenvaluesOnly);
  const auto& lambda = solver.eigenvalues();
  const double lambda_max = lambda.maxCoeff();
  if (!(lambda_max > 0.0)) return 0;
  const double threshold = core::rank_threshold_sq(lambda_max, std::max(R, N));
  index_t rank = 0;
  for (index_t i = 0; i < m; ++i)
    if (lambda(i) > threshold) ++rank;
  return rank;
}

/// Convenience overload with a temporary workspace.
inline index_t numerical_rank(matrix_view<const float> P) {
  workspace ws;
  return numerical_rank(P, ws);
}

}  // namespace sparsevlm
