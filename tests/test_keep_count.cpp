// Stage 5: keep count, and the counting rules of core/math.hpp.
#include <cmath>
#include <limits>

#include "test_util.hpp"

using sparsevlm::errc;
using sparsevlm::index_t;
using sparsevlm::keep_count;
using sparsevlm::keep_policy;

TEST_CASE("keep_count: rank policy, hand values") {
  // floor(3 * 2 + 1) = 7, inside [0, N - 1 = 9].
  CHECK(keep_count(keep_policy::rank(2.0, 1.0), 3, 10, 4) == 7);
  // floor(5 * 13.5) = floor(67.5) = 67 < 99.
  CHECK(keep_count(keep_policy::rank(13.5, 0.0), 5, 100, 4) == 67);
  // 67 clamped to N - 1 = 19.
  CHECK(keep_count(keep_policy::rank(13.5, 0.0), 5, 20, 4) == 19);
  // floor(3 * 0.8) = floor(2.4) = 2; floor(2 * 9 + 6) = 24.
  CHECK(keep_count(keep_policy::rank(0.8, 0.0), 3, 64, 2) == 2);
  CHECK(keep_count(keep_policy::rank(9.0, 6.0), 2, 64, 2) == 24);
  // Negative values clamp to 0: floor(3 * 1 - 10) = -7 -> 0; floor(-0.5) = -1 -> 0.
  CHECK(keep_count(keep_policy::rank(1.0, -10.0), 3, 10, 4) == 0);
  CHECK(keep_count(keep_policy::rank(0.0, -0.5), 3, 10, 4) == 0);
  // floor, not round: 2 * 1 + 0.999 -> 2.
  CHECK(keep_count(keep_policy::rank(1.0, 0.999), 2, 10, 4) == 2);
  // Rank 0 with a positive bias: floor(0 + 3.5) = 3.
  CHECK(keep_count(keep_policy::rank(5.0, 3.5), 0, 10, 4) == 3);
  // Huge values are clamped before any integer conversion.
  CHECK(keep_count(keep_policy::rank(1e300, 0.0), 3, 10, 4) == 9);
  CHECK(keep_count(keep_policy::rank(-1e300, 0.0), 3, 10, 4) == 0);
  CHECK(keep_count(keep_policy::rank(1.0, 1e19), 3, 10, 4) == 9);
}

TEST_CASE("keep_count: keep-all cases") {
  // rank == N keeps all N, whatever scale and bias say.
  CHECK(keep_count(keep_policy::rank(0.0, 0.0), 4, 4, 6) == 4);
  CHECK(keep_count(keep_policy::rank(1.0, -100.0), 4, 4, 6) == 4);
  // No raters keeps all N, for either policy.
  CHECK(keep_count(keep_policy::rank(13.5, 0.0), 0, 7, 0) == 7);
  CHECK(keep_count(keep_policy::fixed(2), 0, 7, 0) == 7);
  // N = 1: rank 1 == N keeps 1; rank 0 keeps min(floor(0 * a + b), 0) = 0.
  CHECK(keep_count(keep_policy::rank(13.5, 0.0), 1, 1, 3) == 1);
  CHECK(keep_count(keep_policy::rank(13.5, 5.0), 0, 1, 3) == 0);
}

TEST_CASE("keep_count: fixed policy") {
  CHECK(keep_count(keep_policy::fixed(3), 2, 10, 4) == 3);
  CHECK(keep_count(keep_policy::fixed(0), 2, 10, 4) == 0);
  // keep >= N -> N - 1.
  CHECK(keep_count(keep_policy::fixed(10), 2, 10, 4) == 9);
  CHECK(keep_count(keep_policy::fixed(1000), 2, 10, 4) == 9);
  // The rank does not matter for a fixed policy, even rank == N.
  CHECK(keep_count(keep_policy::fixed(20), 10, 10, 4) == 9);
  CHECK(keep_count(keep_policy::fixed(5), 1, 1, 1) == 0);  // N = 1 keeps 0
}

TEST_CASE("keep_count: malformed input") {
  constexpr double nan = std::numeric_limits<double>::quiet_NaN();
  constexpr double inf = std::numeric_limits<double>::infinity();
  SV_CHECK_THROWS(errc::invalid_argument, "policy.scale", keep_count(keep_policy::rank(nan, 0), 1, 4, 1));
  SV_CHECK_THROWS(errc::invalid_argument, "policy.scale", keep_count(keep_policy::rank(inf, 0), 1, 4, 1));
  SV_CHECK_THROWS(errc::invalid_argument, "policy.bias", keep_count(keep_policy::rank(1, -inf), 1, 4, 1));
  SV_CHECK_THROWS(errc::invalid_argument, "policy.keep", keep_count(keep_policy::fixed(-1), 1, 4, 1));
  SV_CHECK_THROWS(errc::invalid_argument, "n_visual", keep_count(keep_policy::fixed(1), 0, 0, 1));
  SV_CHECK_THROWS(errc::invalid_argument, "rank", keep_count(keep_policy::fixed(1), 5, 4, 1));
  SV_CHECK_THROWS(errc::invalid_argument, "rank", keep_count(keep_policy::fixed(1), -1, 4, 1));
  SV_CHECK_THROWS(errc::invalid_argument, "n_raters", keep_count(keep_policy::fixed(1), 1, 4, -1));
  // check_policy alone.
  SV_CHECK_THROWS(errc::invalid_argument, "policy.scale", sparsevlm::check_policy(keep_policy::rank(nan, 0)));
  CHECK_NOTHROW(sparsevlm::check_policy(keep_policy::rank(-3, 2)));
  CHECK_NOTHROW(sparsevlm::check_policy(keep_policy::fixed(0)));
}

TEST_CASE("keep_count: property, 0 <= keep <= N and the spec formula") {
  std::mt19937 g(5);
  for (int it = 0; it < 200; ++it) {
    const index_t N = svt::rand_int(g, 1, 40), rank = svt::rand_int(g, 0, N),
                  R = svt::rand_int(g, 0, 3);
    const double a = std::uniform_real_distribution<double>(-2.0, 20.0)(g);
    const double b = std::uniform_real_distribution<double>(-10.0, 10.0)(g);
    const index_t k = keep_count(keep_policy::rank(a, b), rank, N, R);
    INFO("N=", N, " rank=", rank, " R=", R, " a=", a, " b=", b);
    CHECK(k >= 0);
    CHECK(k <= N);
    index_t want;
    if (R == 0 || rank == N) {
      want = N;
    } else {
      const double v = std::floor(static_cast<double>(rank) * a + b);
      want = v <= 0 ? 0 : v >= static_cast<double>(N - 1) ? N - 1 : static_cast<index_t>(v);
    }
    CHECK(k == want);
    if (R > 0 && rank < N) CHECK(k < N);  // something is pruned
    const index_t fk = svt::rand_int(g, 0, 50);
    CHECK(keep_count(keep_policy::fixed(fk), rank, N, R) == (R == 0 ? N : std::min(fk, N - 1)));
  }
}

TEST_CASE("core: recycle_count and cluster_count") {
  using sparsevlm::detail::core::cluster_count;
  using sparsevlm::detail::core::recycle_count;
  // s = min(n, floor(f n) + 1)
  CHECK(recycle_count(10, 0.5) == 6);    // floor(5) + 1
  CHECK(recycle_count(10, 0.25) == 3);   // floor(2.5) + 1
  CHECK(recycle_count(1, 0.3) == 1);     // floor(0.3) + 1 = 1
  CHECK(recycle_count(3, 1.0) == 3);     // min(3, 4)
  CHECK(recycle_count(4, 0.75) == 4);    // min(4, 3 + 1)
  CHECK(recycle_count(7, 0.1) == 1);     // floor(0.7) + 1
  // c = floor(s / divisor) + 1
  CHECK(cluster_count(4, 10.0) == 1);
  CHECK(cluster_count(25, 10.0) == 3);
  CHECK(cluster_count(20, 10.0) == 3);   // floor(2) + 1
  CHECK(cluster_count(2, 1.5) == 2);     // floor(1.33) + 1
  CHECK(cluster_count(1, 1.01) == 1);
  CHECK(cluster_count(8, 4.0) == 3);
  CHECK(sparsevlm::detail::core::rank_keep(3, 2.0, 1.0, 10) == 7);
  CHECK(sparsevlm::detail::core::rank_keep(3, 2.0, 1.0, 5) == 4);
  CHECK(sparsevlm::detail::core::rank_keep(3, -2.0, 1.0, 5) == 0);
  CHECK(sparsevlm::detail::core::rank_keep(3, std::numeric_limits<double>::quiet_NaN(), 0.0, 5) == 0);
}

TEST_CASE("keep_count: floor(rank*scale + bias) rounds like the Python reference") {
  // 6 · 0.3 = 1.7999999999999998 in double, + 0.2 = 1.9999999999999998: floor 1,
  // whatever the compiler's multiply-add contraction (a fused FMA would give 2).
  CHECK(sparsevlm::detail::core::rank_keep(6, 0.3, 0.2, 100) == 1);
  CHECK(sparsevlm::keep_count(sparsevlm::keep_policy::rank(0.3, 0.2), 6, 100, 10) == 1);
}
