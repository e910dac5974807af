// Stage 4: numerical rank of P.
#include <Eigen/Dense>
#include <Eigen/SVD>
#include <algorithm>
#include <array>
#include <cmath>
#include <utility>
#include <vector>

#include "test_util.hpp"

using sparsevlm::errc;
using sparsevlm::index_t;
using sparsevlm::matrix_view;
using sparsevlm::numerical_rank;

namespace {

index_t rank_of(const std::vector<float>& p, index_t R, index_t N) {
  return numerical_rank(matrix_view<const float>(p.data(), {R, N}));
}

struct svd_rank {
  index_t rank = 0;
  double closest = 1e300;  // min over sigma of |sigma / threshold - 1|
};

// The spec's count with Eigen's JacobiSVD in double (two-sided Jacobi, accurate
// in the small singular values), independently of the library's Gram method.
svd_rank jacobi_rank(const std::vector<float>& p, index_t R, index_t N) {
  Eigen::MatrixXd M(R, N);
  for (index_t r = 0; r < R; ++r)
    for (index_t j = 0; j < N; ++j) M(r, j) = static_cast<double>(p[static_cast<std::size_t>(r * N + j)]);
  Eigen::JacobiSVD<Eigen::MatrixXd> svd(M);
  const auto& sv = svd.singularValues();
  svd_rank out;
  if (sv.size() == 0 || !(sv(0) > 0.0)) return out;
  const double thr = sv(0) * static_cast<double>(std::max(R, N)) * std::ldexp(1.0, -23);
  for (Eigen::Index i = 0; i < sv.size(); ++i) {
    if (sv(i) > thr) ++out.rank;
    out.closest = std::min(out.closest, std::fabs(sv(i) / thr - 1.0));
  }
  return out;
}

}  // namespace

TEST_CASE("rank: hand examples") {
  // The zero matrix has no singular value above 0.
  CHECK(rank_of(std::vector<float>(12, 0.0f), 3, 4) == 0);
  // Row 2 = 2 * row 1: rank 1.
  CHECK(rank_of({1, 2, 3, 2, 4, 6}, 2, 3) == 1);
  // Two equal rows plus an independent one: rank 2.
  CHECK(rank_of({1, 2, 3, 1, 2, 3, 0, 1, 0}, 3, 3) == 2);
  // Identity: rank 3.
  CHECK(rank_of({1, 0, 0, 0, 1, 0, 0, 0, 1}, 3, 3) == 3);
  CHECK(rank_of({5}, 1, 1) == 1);
  CHECK(rank_of({0}, 1, 1) == 0);
  // Tall (R > N), rank 2 and rank 1.
  CHECK(rank_of({1, 0, 0, 1, 1, 1}, 3, 2) == 2);
  CHECK(rank_of({1, 2, 2, 4, 3, 6, 0, 0}, 4, 2) == 1);
  // A single row or column of non-zeros has rank 1.
  CHECK(rank_of({0, 0.5f, 0, 0.25f}, 1, 4) == 1);
  CHECK(rank_of({0, 0.5f, 0, 0.25f}, 4, 1) == 1);
  // Empty P: rank 0.
  CHECK(numerical_rank(matrix_view<const float>(nullptr, {0, 4})) == 0);
  CHECK(numerical_rank(matrix_view<const float>(nullptr, {3, 0})) == 0);
}

TEST_CASE("rank: the tolerance sigma_max * max(R, N) * 2^-23") {
  // diag(1, t), 2x2: threshold = 1 * 2 * 2^-23 = 2^-22.
  const float thr = std::ldexp(1.0f, -22);
  CHECK(rank_of({1, 0, 0, 1.01f * thr}, 2, 2) == 2);
  CHECK(rank_of({1, 0, 0, 0.99f * thr}, 2, 2) == 1);
  // 2x5 with singular values 1 and t: threshold = 5 * 2^-23.
  const float thr5 = 5.0f * std::ldexp(1.0f, -23);
  CHECK(rank_of({1, 0, 0, 0, 0, 0, 1.05f * thr5, 0, 0, 0}, 2, 5) == 2);
  CHECK(rank_of({1, 0, 0, 0, 0, 0, 0.95f * thr5, 0, 0, 0}, 2, 5) == 1);
  // The threshold scales with sigma_max: same shape, scaled by 1e-30 and 1e30.
  CHECK(rank_of({1e-30f, 0, 0, 1.05e-30f * thr}, 2, 2) == 2);
  CHECK(rank_of({1e-30f, 0, 0, 0.95e-30f * thr}, 2, 2) == 1);
  CHECK(rank_of({1e30f, 0, 0, 1.05e30f * thr}, 2, 2) == 2);
  CHECK(rank_of({1e30f, 0, 0, 0.95e30f * thr}, 2, 2) == 1);
}

TEST_CASE("rank: strided views and workspace reuse") {
  // [[1, 2, 3], [2, 4, 6]] stored transposed: its transpose has the same rank.
  const std::vector<float> t{1, 2, 2, 4, 3, 6};  // the 3x2 transpose, row-major
  CHECK(numerical_rank(matrix_view<const float>(t.data(), {2, 3}, {1, 2})) == 1);
  sparsevlm::workspace ws;
  const std::vector<float> big(64, 1.0f);
  CHECK(numerical_rank(matrix_view<const float>(big.data(), {8, 8}), ws) == 1);
  const std::vector<float> id{1, 0, 0, 1};
  CHECK(numerical_rank(matrix_view<const float>(id.data(), {2, 2}), ws) == 2);
}

TEST_CASE("rank: NaN or Inf in P is refused") {
  SV_CHECK_THROWS(errc::non_finite, "P[1, 0]", rank_of({1, 2, svt::kNaNf, 4}, 2, 2));
  SV_CHECK_THROWS(errc::non_finite, "P[0, 1]", rank_of({1, svt::kInff, 3, 4}, 2, 2));
}

TEST_CASE("rank: agrees with Eigen JacobiSVD on random, duplicated-row and scaled matrices") {
  std::mt19937 g(2024);
  int compared = 0, skipped = 0;
  for (int it = 0; it < 60; ++it) {
    const index_t R = svt::rand_int(g, 1, 10), N = svt::rand_int(g, 1, 12);
    const int kind = it % 3;
    std::vector<float> p(static_cast<std::size_t>(R * N));
    index_t built_rank = std::min(R, N);
    if (kind == 0) {  // random, full rank almost surely
      p = svt::random_floats(g, p.size(), 0.0f, 1.0f);
    } else if (kind == 1) {  // A (R x k) * B (k x N) in float: rank k
      const index_t k = svt::rand_int(g, 1, std::min(R, N));
      const auto A = svt::random_floats(g, static_cast<std::size_t>(R * k), -1.0f, 1.0f);
      const auto B = svt::random_floats(g, static_cast<std::size_t>(k * N), -1.0f, 1.0f);
      for (index_t r = 0; r < R; ++r)
        for (index_t j = 0; j < N; ++j) {
          float acc = 0.0f;
          for (index_t q = 0; q < k; ++q)
            acc += A[static_cast<std::size_t>(r * k + q)] * B[static_cast<std::size_t>(q * N + j)];
          p[static_cast<std::size_t>(r * N + j)] = acc;
        }
      built_rank = k;
    } else {  // u distinct random rows, the others exact duplicates of them
      const index_t u = svt::rand_int(g, 1, R);
      const auto rows = svt::random_floats(g, static_cast<std::size_t>(u * N), 0.0f, 1.0f);
      for (index_t r = 0; r < R; ++r) {
        const index_t src = r < u ? r : svt::rand_int(g, 0, u - 1);
        for (index_t j = 0; j < N; ++j)
          p[static_cast<std::size_t>(r * N + j)] = rows[static_cast<std::size_t>(src * N + j)];
      }
      built_rank = std::min(u, N);
    }
    for (const double scale : {1.0, 1e-30, 1e30}) {
      std::vector<float> ps(p);
      for (float& x : ps) x = static_cast<float>(x * scale);
      INFO("it=", it, " kind=", kind, " R=", R, " N=", N, " scale=", scale);
      const svd_rank want = jacobi_rank(ps, R, N);
      if (want.closest < 0.01) {  // a singular value within 1% of the tolerance
        ++skipped;
        continue;
      }
      ++compared;
      CHECK(rank_of(ps, R, N) == want.rank);
      CHECK(want.rank == built_rank);  // the construction did what it says
    }
  }
  CHECK(compared >= 170);
  CHECK(skipped <= 10);
}

TEST_CASE("rank: near-rank-deficient matrices around the tolerance, and larger shapes") {
  // P = A·B (rank k) + δ·E with δ set so that the extra singular values sit at
  // a chosen multiple of the tolerance: the count must match JacobiSVD's
  // whenever no singular value is within 1% of the threshold.
  std::mt19937 g(4242);
  int compared = 0, skipped = 0;
  for (int it = 0; it < 120; ++it) {
    const index_t R = svt::rand_int(g, 2, 40), N = svt::rand_int(g, 2, 120);
    const index_t k = svt::rand_int(g, 1, std::min(R, N) - 1);
    const auto A = svt::random_floats(g, static_cast<std::size_t>(R * k), 0.0f, 1.0f);
    const auto B = svt::random_floats(g, static_cast<std::size_t>(k * N), 0.0f, 1.0f);
    const auto E = svt::random_floats(g, static_cast<std::size_t>(R * N), -1.0f, 1.0f);
    std::vector<double> base(static_cast<std::size_t>(R * N));
    for (index_t r = 0; r < R; ++r)
      for (index_t j = 0; j < N; ++j) {
        double acc = 0.0;
        for (index_t q = 0; q < k; ++q)
          acc += double(A[static_cast<std::size_t>(r * k + q)]) * B[static_cast<std::size_t>(q * N + j)];
        base[static_cast<std::size_t>(r * N + j)] = acc;
      }
    // σ_max ≈ ‖A·B‖₂; a random R×N matrix of ±1 entries has σ ≈ sqrt(R) + sqrt(N).
    Eigen::MatrixXd M(R, N);
    for (index_t r = 0; r < R; ++r)
      for (index_t j = 0; j < N; ++j) M(r, j) = base[static_cast<std::size_t>(r * N + j)];
    const double smax = Eigen::JacobiSVD<Eigen::MatrixXd>(M).singularValues()(0);
    const double tol = smax * static_cast<double>(std::max(R, N)) * std::ldexp(1.0, -23);
    const double factor = std::array<double, 6>{0.05, 0.3, 0.8, 1.3, 3.0, 30.0}[it % 6];
    const double delta = factor * tol / (std::sqrt(double(R)) + std::sqrt(double(N)));
    std::vector<float> p(static_cast<std::size_t>(R * N));
    for (std::size_t i = 0; i < p.size(); ++i) p[i] = static_cast<float>(base[i] + delta * E[i]);
    INFO("it=", it, " R=", R, " N=", N, " k=", k, " factor=", factor);
    const svd_rank want = jacobi_rank(p, R, N);
    if (want.closest < 0.01) {
      ++skipped;
      continue;
    }
    ++compared;
    CHECK(rank_of(p, R, N) == want.rank);
  }
  CHECK(compared >= 100);
  MESSAGE(compared, " compared, ", skipped, " within 1% of the threshold");
  // Both orientations of a larger matrix (R > N uses Pᵀ·P).
  for (const auto& [R, N] : {std::pair<index_t, index_t>{64, 2880}, {90, 30}}) {
    const auto p = svt::random_floats(g, static_cast<std::size_t>(R * N), 0.0f, 1.0f);
    const svd_rank want = jacobi_rank(p, R, N);
    if (want.closest >= 0.01) CHECK(rank_of(p, R, N) == want.rank);
  }
}

TEST_CASE("rank: the tridiagonal reduction, Sturm counts and lambda_max on their own") {
  namespace core = sparsevlm::detail::core;
  // Random symmetric matrices against Eigen's solver: the reduction keeps the
  // eigenvalues, sturm_count(x) counts those below x, largest_eigenvalue finds the top.
  for (int n : {1, 2, 3, 7, 30, 64, 100}) {
    INFO("n ", n);
    Eigen::MatrixXd M = Eigen::MatrixXd::Random(n, n);
    M = (M + M.transpose()).eval();
    if (n == 7) M = (M * M.transpose()).eval();  // positive semi-definite, as a Gram matrix
    std::vector<double> buf(static_cast<std::size_t>(n * n)), d(static_cast<std::size_t>(n)),
        e(static_cast<std::size_t>(n));
    for (int i = 0; i < n; ++i)
      for (int j = 0; j < n; ++j) buf[static_cast<std::size_t>(i * n + j)] = M(i, j);
    double bc[core::eigen_shared];
    core::tridiagonalize(core::serial_block{}, buf.data(), n, d.data(), e.data());
    CHECK(e[static_cast<std::size_t>(n - 1)] == 0.0);
    Eigen::MatrixXd T = Eigen::MatrixXd::Zero(n, n);
    for (int i = 0; i < n; ++i) {
      T(i, i) = d[static_cast<std::size_t>(i)];
      if (i + 1 < n) T(i, i + 1) = T(i + 1, i) = e[static_cast<std::size_t>(i)];
    }
    const Eigen::VectorXd want = Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd>(M, Eigen::EigenvaluesOnly).eigenvalues();
    const Eigen::VectorXd got = Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd>(T, Eigen::EigenvaluesOnly).eigenvalues();
    const double scale = want.cwiseAbs().maxCoeff();
    for (int i = 0; i < n; ++i) CHECK(std::fabs(got(i) - want(i)) <= 1e-12 * scale);

    const core::top_eigenvalue top = core::largest_eigenvalue(core::serial_block{}, d.data(), e.data(), n, bc);
    if (want(n - 1) > 0.0) {
      CHECK(top.lambda_max == doctest::Approx(want(n - 1)).epsilon(1e-13));
    } else {
      CHECK(top.lambda_max == 0.0);  // no positive Gershgorin bound
    }
    // e now holds the squares: counts between the eigenvalues are exact.
    for (int i = 0; i + 1 < n; ++i) {
      if (want(i + 1) - want(i) < 1e-9 * scale) continue;
      const double x = 0.5 * (want(i) + want(i + 1));
      CHECK(core::sturm_count(d.data(), e.data(), n, x, top.pivmin) == i + 1);
    }
    CHECK(core::sturm_count(d.data(), e.data(), n, want(0) - 1.0, top.pivmin) == 0);
    CHECK(core::sturm_count(d.data(), e.data(), n, want(n - 1) + 1.0, top.pivmin) == n);
  }
  // A diagonal matrix: λ_max is its largest entry, met by no Gershgorin margin.
  double a[9] = {3, 0, 0, 0, 1, 0, 0, 0, 2}, d[3], e[3], bc[core::eigen_shared];
  core::tridiagonalize(core::serial_block{}, a, 3, d, e);
  CHECK(core::largest_eigenvalue(core::serial_block{}, d, e, 3, bc).lambda_max == doctest::Approx(3.0).epsilon(1e-15));
  // The zero matrix has rank 0; so has m = 0.
  double z[4] = {0, 0, 0, 0};
  CHECK(core::gram_rank(core::serial_block{}, z, 2, 10, d, e, bc) == 0);
  CHECK(core::gram_rank(core::serial_block{}, z, 0, 10, d, e, bc) == 0);
}

