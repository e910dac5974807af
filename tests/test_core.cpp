// core/: the arithmetic both backends share (dot orders, the DPC-KNN rules, the
// block-parallel rank arithmetic), checked against the CPU's kernel tables and
// serial code. The CUDA stage kernels that use them are tested in
// test_step_kernels.cpp.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include <sparsevlm/core/block.hpp>
#include <sparsevlm/core/dot.hpp>
#include <sparsevlm/core/eigen.hpp>
#include <sparsevlm/core/math.hpp>
#include <sparsevlm/cpu/dispatch.hpp>

#include "cpu_grid.hpp"
#include "step_case.hpp"
#include "test_util.hpp"

namespace core = sparsevlm::detail::core;
using sparsevlm::index_t;

using svt::cpu_block;
using svt::run_grid;

namespace {

std::vector<double> random_symmetric(std::mt19937& g, index_t n, index_t rank) {
  // A = B·Bᵀ with B n×rank: symmetric positive semi-definite of the given rank.
  std::vector<double> b(static_cast<std::size_t>(n * rank)), a(static_cast<std::size_t>(n * n));
  std::uniform_real_distribution<double> u(-1.0, 1.0);
  for (double& x : b) x = u(g);
  for (index_t i = 0; i < n; ++i)
    for (index_t j = 0; j < n; ++j) {
      double s = 0.0;
      for (index_t k = 0; k < rank; ++k) s += b[i * rank + k] * b[j * rank + k];
      a[static_cast<std::size_t>(i * n + j)] = s;
    }
  return a;
}

}  // namespace

TEST_CASE("core: canonical dot products with loaders equal the kernel tables") {
  std::mt19937 g(7);
  for (index_t d : {1, 7, 15, 16, 17, 31, 33, 100, 257}) {
    const auto a = svt::random_floats(g, static_cast<std::size_t>(d), -2.0f, 2.0f);
    const auto b = svt::random_floats(g, static_cast<std::size_t>(d), -2.0f, 2.0f);
    float t32 = 0.0f;
    double t64 = 0.0;
    sparsevlm::cpu::detail::kernels().dot_rows(a.data(), d, 1, b.data(), d, 1, d, &t32, 1);
    std::vector<double> gm(4);
    std::vector<float> two(a);
    two.insert(two.end(), b.begin(), b.end());
    sparsevlm::cpu::detail::kernels().gram_f64(two.data(), d, 2, d, gm.data());
    t64 = gm[1];
    const float c32 = core::dot32(a.data(), b.data(), d);
    const double c64 = core::dot64(a.data(), b.data(), d);
    CHECK(std::memcmp(&t32, &c32, sizeof t32) == 0);
    CHECK(std::memcmp(&t64, &c64, sizeof t64) == 0);
    // Through typed loaders (bfloat16 storage, strided): the same as converting first.
    const auto ab = svt::converted<sparsevlm::bfloat16>(a);
    std::vector<float> aw(ab.size());
    for (std::size_t i = 0; i < ab.size(); ++i) aw[i] = sparsevlm::to_float(ab[i]);
    const float l32 = core::dot32_by([&](index_t k) { return sparsevlm::to_float(ab[k]); },
                                     [&](index_t k) { return b[k]; }, d);
    const float w32 = core::dot32(aw.data(), b.data(), d);
    CHECK(std::memcmp(&l32, &w32, sizeof l32) == 0);
  }
}

TEST_CASE("core: reduce8 in two halves and lane_sum8 keep dot64's order") {
  std::mt19937 g(11);
  // Magnitudes 2^-30 .. 2^30, so that the order of the additions shows in the bits.
  std::uniform_real_distribution<double> mant(-1.0, 1.0);
  std::uniform_int_distribution<int> expo(-30, 30);
  int differs = 0;
  for (int trial = 0; trial < 2000; ++trial) {
    double s[8], even[4], odd[4];
    for (double& x : s) x = std::ldexp(mant(g), expo(g));
    for (int j = 0; j < 4; ++j) {
      even[j] = s[2 * j];
      odd[j] = s[2 * j + 1];
    }
    const double whole = core::reduce8(s);
    const double halves = core::reduce8_half(even) + core::reduce8_half(odd);
    CHECK(std::memcmp(&whole, &halves, sizeof whole) == 0);
    // The serial sum differs: the check above is not trivially true.
    double serial = 0.0;
    for (double x : s) serial += x;
    differs += serial != whole;
  }
  CHECK(differs > 0);
  for (index_t n : {0, 1, 7, 8, 9, 60, 61}) {
    for (index_t lo : {0, 3}) {
      if (lo > n) continue;
      std::vector<double> v(static_cast<std::size_t>(n));
      for (double& x : v) x = std::ldexp(mant(g), expo(g));
      double lanes[8] = {};
      for (index_t i = lo; i < n; ++i) lanes[(i - lo) % 8] += v[static_cast<std::size_t>(i)];
      const double want = core::reduce8(lanes);
      const double got = core::lane_sum8(lo, n, [&](index_t i) { return v[static_cast<std::size_t>(i)]; });
      CHECK(std::memcmp(&want, &got, sizeof want) == 0);
      // Two sources, switching at every mid: the terms and lanes are the same.
      std::vector<double> w(v.size());
      for (double& x : w) x = std::ldexp(mant(g), expo(g));
      for (index_t mid = lo; mid <= n; ++mid) {
        double split[8] = {};
        for (index_t i = lo; i < n; ++i)
          split[(i - lo) % 8] += (i < mid ? v : w)[static_cast<std::size_t>(i)];
        const double want2 = core::reduce8(split);
        const double got2 = core::lane_sum8(
            lo, mid, n, [&](index_t i) { return v[static_cast<std::size_t>(i)]; },
            [&](index_t i) { return w[static_cast<std::size_t>(i)]; });
        CHECK(std::memcmp(&want2, &got2, sizeof want2) == 0);
      }
    }
  }
}

TEST_CASE("core: the DPC-KNN rules") {
  // Duplicate rows: three identical Gram entries give exactly 0.
  CHECK(core::gram_distance(2.5, 2.5, 2.5, 4.0) == 0.0);
  // Cancellation below zero is clamped, as std::max(sq, 0.0).
  CHECK(core::gram_distance(1.0, 1.0, 1.0 + 1e-15, 1.0) == 0.0);
  CHECK(core::gram_distance(4.0, 0.0, 0.0, 2.0) == 1.0);
  const double v[3] = {0.0, 0.5, 1.0};
  CHECK(core::density(v, 3) == std::exp(-(1.25 / 3.0)));
  CHECK(core::nearer(2.0, 1.0) == 1.0);
  CHECK(core::nearer(1.0, 2.0) == 1.0);
  CHECK(core::denser(0.5, 1, 0.5, 2));
  CHECK_FALSE(core::denser(0.5, 2, 0.5, 1));
  CHECK(core::ranks_before(1.0f, 5, 0.5f, 1));
  CHECK(core::ranks_before(0.0f, 1, -0.0f, 2));  // -0 == +0: the lower index first
}

TEST_CASE("core: the block-parallel rank arithmetic gives the serial bits on any block size") {
  // The reduction's diagonal and subdiagonal, lambda_max (multisection over the
  // block's threads) and the rank; block sizes below, at and above the 64 points.
  std::mt19937 g(11);
  for (index_t n : {1, 2, 3, 5, 17, 40, 70}) {
    for (index_t rank : {index_t{1}, std::max<index_t>(n / 2, 1), n}) {
      const auto a0 = random_symmetric(g, n, rank);
      std::vector<double> a = a0, d(static_cast<std::size_t>(n)), e(static_cast<std::size_t>(n));
      double bc0[core::eigen_shared];
      core::tridiagonalize(core::serial_block{}, a.data(), n, d.data(), e.data());
      const std::vector<double> d0 = d, e0 = e;
      const core::top_eigenvalue top = core::largest_eigenvalue(core::serial_block{}, d.data(), e.data(), n, bc0);
      std::vector<double> g0 = a0, dg(static_cast<std::size_t>(n)), eg(static_cast<std::size_t>(n));
      const std::int64_t want = core::gram_rank(core::serial_block{}, g0.data(), n, 4 * n, dg.data(), eg.data(), bc0);
      // A B·Bᵀ of rank r has r eigenvalues far above the threshold and n − r near 0.
      CHECK(want == rank);
      for (int threads : {1, 3, 8, 64, 100}) {
        INFO("n ", n, " rank ", rank, " threads ", threads);
        std::vector<double> b = a0, db(static_cast<std::size_t>(n)), eb(static_cast<std::size_t>(n));
        std::vector<double> bc(core::eigen_shared);
        std::vector<double> tops(static_cast<std::size_t>(threads));
        bool same_tridiagonal = false;
        run_grid(
            [&](const cpu_block& blk, void*) {
              core::tridiagonalize(blk, b.data(), n, db.data(), eb.data());
              if (blk.rank() == 0)
                same_tridiagonal = svt::same_bits(d0.data(), db.data(), d0.size()) &&
                                   svt::same_bits(e0.data(), eb.data(), e0.size());
              blk.sync();
              tops[static_cast<std::size_t>(blk.rank())] =
                  core::largest_eigenvalue(blk, db.data(), eb.data(), n, bc.data()).lambda_max;
            },
            1, 1, threads, 0);
        CHECK(same_tridiagonal);
        for (int t = 0; t < threads; ++t)
          CHECK(svt::same_bits(&top.lambda_max, &tops[static_cast<std::size_t>(t)], 1));
        std::vector<double> gb = a0;
        std::vector<std::int64_t> ranks(static_cast<std::size_t>(threads));
        run_grid(
            [&](const cpu_block& blk, void*) {
              ranks[static_cast<std::size_t>(blk.rank())] =
                  core::gram_rank(blk, gb.data(), n, 4 * n, db.data(), eb.data(), bc.data());
            },
            1, 1, threads, 0);
        for (int t = 0; t < threads; ++t) CHECK(ranks[static_cast<std::size_t>(t)] == want);
      }
    }
  }
}

