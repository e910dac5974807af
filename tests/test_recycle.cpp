// Stage 7: DPC-KNN recycling.
#include <algorithm>
#include <set>
#include <vector>

#include "test_util.hpp"

using sparsevlm::errc;
using sparsevlm::index_t;
using sparsevlm::matrix_view;
using sparsevlm::recycle;
using sparsevlm::recycle_result;
using sparsevlm::visual_span;

namespace {

using clusters_t = std::vector<std::vector<index_t>>;

recycle_result run(const std::vector<float>& hidden, index_t L, index_t d, visual_span v,
                   const std::vector<index_t>& selected, index_t c) {
  sparsevlm::workspace ws;
  recycle_result out;
  recycle(matrix_view<const float>(hidden.data(), {L, d}), v, selected, c, out, ws);
  return out;
}

}  // namespace

TEST_CASE("recycle: 1-D, c = 2, mutual nearest neighbours tie in density") {
  // L = 8, d = 1, S = 2, N = 6. Rows not selected (and the prefix) are NaN: they
  // must not be read. Selected, in ranked order i = 0..3, are visual 4, 0, 5, 2,
  // i.e. rows 6, 2, 7, 4 with values x = 0, 1, 3, 10.
  //   D (d = 1, so |xi - xj|):  i0 [0 1 3 10]  i1 [1 0 2 9]  i2 [3 2 0 7]  i3 [10 9 7 0]
  //   k = c = 2 smallest:       i0 {0,1}  i1 {0,1}  i2 {0,2}  i3 {0,7}
  //   rho = exp(-mean sq):      e^-0.5, e^-0.5 (exact tie), e^-2, e^-24.5
  //   denser: i0 beats i1 on the tie (lower index), so i0 is the densest:
  //   delta:                    i0 = max D = 10, i1 = 1, i2 = min(3, 2) = 2, i3 = min(10, 9, 7) = 7
  //   gamma = rho * delta:      6.07, 0.607, 0.271, 1.6e-10 -> centres i0, i1
  //   i2: D to i0 = 3, to i1 = 2 -> i1;  i3: 10 vs 9 -> i1.
  // Clusters (absolute, ascending): [{6}, {2, 4, 7}]; merged: [0], [(1 + 3 + 10) / 3].
  std::vector<float> h(8, svt::kNaNf);
  h[6] = 0;
  h[2] = 1;
  h[7] = 3;
  h[4] = 10;
  auto r = run(h, 8, 1, {2, 6}, {4, 0, 5, 2}, 2);
  CHECK(r.clusters == clusters_t{{6}, {2, 4, 7}});
  CHECK(r.dim == 1);
  REQUIRE(r.merged.size() == 2);
  CHECK(r.merged[0] == 0.0f);
  CHECK(r.merged[1] == doctest::Approx(14.0 / 3.0));

  // Swapping the ranked order of the tied pair flips the tie: now i0 is x = 1
  // (visual 0) and i1 is x = 0 (visual 4). rho: both e^-0.5 again, i0 densest with
  // delta 10; i1 delta 1; centres i0 (x=1), i1 (x=0). x = 3: D = 2 to i0, 3 to i1
  // -> i0; x = 10: 9 vs 10 -> i0. Clusters: [{2, 4, 7}, {6}].
  r = run(h, 8, 1, {2, 6}, {0, 4, 5, 2}, 2);
  CHECK(r.clusters == clusters_t{{2, 4, 7}, {6}});
  REQUIRE(r.merged.size() == 2);
  CHECK(r.merged[0] == doctest::Approx(14.0 / 3.0));
  CHECK(r.merged[1] == 0.0f);
}

TEST_CASE("recycle: duplicate rows, distance exactly 0") {
  // d = 2, S = 0, N = 3: v0 = (0, 0), v1 = (0, 0), v2 = (3, 4); c = 2.
  // D(0,1) = 0, D(0,2) = D(1,2) = 5 / sqrt(2) = 3.536.
  // rho: v0 = v1 = exp(-(0 + 0) / 2) = 1 (tie), v2 = exp(-(0 + 12.5) / 2) = e^-6.25.
  // v0 densest (lower index): delta = max D = 3.536, gamma 3.536;
  // v1: delta = D(1, 0) = 0, gamma 0; v2: delta = 3.536, gamma = 0.0068.
  // Centres v0, v2; v1 joins v0 (distance 0). Clusters [{0, 1}, {2}].
  const std::vector<float> h{0, 0, 0, 0, 3, 4};
  auto r = run(h, 3, 2, {0, 3}, {0, 1, 2}, 2);
  CHECK(r.clusters == clusters_t{{0, 1}, {2}});
  CHECK(r.merged == std::vector<float>{0, 0, 3, 4});
  // Ranked order (v2, v0, v1): v0 (i1) beats v1 (i2) on the tie; the same clusters.
  r = run(h, 3, 2, {0, 3}, {2, 0, 1}, 2);
  CHECK(r.clusters == clusters_t{{0, 1}, {2}});
  CHECK(r.merged == std::vector<float>{0, 0, 3, 4});
  // c = 1: everything in one cluster, the mean (1, 4/3).
  r = run(h, 3, 2, {0, 3}, {2, 0, 1}, 1);
  CHECK(r.clusters == clusters_t{{0, 1, 2}});
  CHECK(r.merged[0] == doctest::Approx(1.0));
  CHECK(r.merged[1] == doctest::Approx(4.0 / 3.0));
  // c = 3 = s: every token is its own centre; gamma order v0 (3.536), v2 (0.0068), v1 (0).
  r = run(h, 3, 2, {0, 3}, {0, 1, 2}, 3);
  CHECK(r.clusters == clusters_t{{0}, {2}, {1}});
}

TEST_CASE("recycle: a single recycled token") {
  // s = 1, c = 1: D = [0], the token is its own cluster, merged = its row.
  const std::vector<float> h{9, 9, 1.5f, -2, 7, 7};
  const auto r = run(h, 3, 2, {1, 1}, {0}, 1);
  CHECK(r.clusters == clusters_t{{1}});
  CHECK(r.merged == std::vector<float>{1.5f, -2});
  CHECK(r.dim == 2);
}

TEST_CASE("recycle: 2-D, two groups, all densities tied") {
  // d = 2, S = 1, N = 5: v0 (0,0), v1 (1,0), v2 (0,1), v3 (10,10), v4 (11,10); c = k = 2.
  // Every point's nearest neighbour is at Euclidean distance 1, so every rho is
  // exp(-(0 + 1/2) / 2): all tied, and the order is by index.
  // delta: v0 = max D (v0-v4, sqrt(221)/sqrt(2)); v1 = D(1,0) = 1/sqrt2;
  //   v2 = min(D(2,0), D(2,1)) = 1/sqrt2; v3 = min(sqrt(200), sqrt(181), sqrt(181))/sqrt2;
  //   v4 = D(4,3) = 1/sqrt2. Centres v0 and v3.
  // v1, v2 join v0; v4 joins v3. Clusters [{1,2,3}, {4,5}], means (1/3, 1/3), (10.5, 10).
  const std::vector<float> h{5, 5, 0, 0, 1, 0, 0, 1, 10, 10, 11, 10, 5, 5};
  const auto r = run(h, 7, 2, {1, 5}, {0, 1, 2, 3, 4}, 2);
  CHECK(r.clusters == clusters_t{{1, 2, 3}, {4, 5}});
  REQUIRE(r.merged.size() == 4);
  CHECK(r.merged[0] == doctest::Approx(1.0 / 3.0));
  CHECK(r.merged[1] == doctest::Approx(1.0 / 3.0));
  CHECK(r.merged[2] == doctest::Approx(10.5));
  CHECK(r.merged[3] == doctest::Approx(10.0));
}

TEST_CASE("recycle: 1-D, c = 3, outliers join their nearest centre") {
  // x = 0, 1, 3, 10, 11 (S = 0, selected in order 0..4), c = k = 3.
  //   D rows: i0 [0 1 3 10 11] i1 [1 0 2 9 10] i2 [3 2 0 7 8] i3 [10 9 7 0 1] i4 [11 10 8 1 0]
  //   3 smallest squared, mean: i0 (0+1+9)/3, i1 (0+1+4)/3, i2 (0+4+9)/3, i3 (0+1+49)/3, i4 (0+1+64)/3
  //   rho: 0.0357, 0.189, 0.0131, 5.8e-8, 3.9e-10 -> i1 densest
  //   delta: i1 = 11 (max D); i0 = D(0,1) = 1; i2 = min(2, 3) = 2; i3 = min(9, 10, 7) = 7;
  //          i4 = min(11, 10, 8, 1) = 1
  //   gamma: i1 2.08, i0 0.0357, i2 0.0262, i3 4e-7, i4 4e-10 -> centres i1, i0, i2
  //   i3: D to centres 9, 10, 7 -> i2; i4: 10, 11, 8 -> i2.
  // Clusters [{1}, {0}, {2, 3, 4}]; merged [1], [0], [(3 + 10 + 11) / 3 = 8].
  const std::vector<float> h{0, 1, 3, 10, 11};
  const auto r = run(h, 5, 1, {0, 5}, {0, 1, 2, 3, 4}, 3);
  CHECK(r.clusters == clusters_t{{1}, {0}, {2, 3, 4}});
  CHECK(r.merged == std::vector<float>{1, 0, 8});

  // dpc_knn on the same distance matrix directly.
  std::vector<double> D(25);
  for (int i = 0; i < 5; ++i)
    for (int j = 0; j < 5; ++j) D[static_cast<std::size_t>(i * 5 + j)] = std::fabs(h[static_cast<std::size_t>(i)] - h[static_cast<std::size_t>(j)]);
  sparsevlm::workspace ws;
  std::vector<index_t> centres, label;
  sparsevlm::dpc_knn(D, 5, 3, centres, label, ws);
  CHECK(centres == std::vector<index_t>{1, 0, 2});
  CHECK(label == std::vector<index_t>{1, 0, 2, 2, 2});
}

TEST_CASE("recycle: float16 and strided hidden") {
  // The c = 3 example through a float16 view and through a column view
  // of a [5, 3] buffer (stride 3).
  const std::vector<float> h{0, 1, 3, 10, 11};
  const auto h16 = svt::convert<sparsevlm::half>(h);
  sparsevlm::workspace ws;
  recycle_result r;
  const std::vector<index_t> sel{0, 1, 2, 3, 4};
  recycle(matrix_view<const sparsevlm::half>(h16.data(), {5, 1}), visual_span{0, 5}, sel, 3, r, ws);
  CHECK(r.clusters == clusters_t{{1}, {0}, {2, 3, 4}});
  CHECK(r.merged == std::vector<float>{1, 0, 8});
  std::vector<float> wide(15, -7.0f);
  for (std::size_t i = 0; i < 5; ++i) wide[i * 3 + 1] = h[i];
  recycle(matrix_view<const float>(wide.data() + 1, {5, 1}, {3, 1}), visual_span{0, 5}, sel, 3, r,
          ws);
  CHECK(r.clusters == clusters_t{{1}, {0}, {2, 3, 4}});
  CHECK(r.merged == std::vector<float>{1, 0, 8});
}

TEST_CASE("recycle: malformed input leaves the output untouched") {
  std::vector<float> h{0, 1, 3, 10, 11, 12};
  const matrix_view<const float> hv(h.data(), {6, 1}, "hidden");
  sparsevlm::workspace ws;
  recycle_result out;
  out.clusters = {{99}};
  out.merged = {5.0f};
  out.dim = 1;
  const visual_span v{1, 4};
  const std::vector<index_t> sel{0, 2};
  SV_CHECK_THROWS(errc::invalid_argument, "clusters", recycle(hv, v, sel, 0, out, ws));
  SV_CHECK_THROWS(errc::invalid_argument, "clusters", recycle(hv, v, sel, 3, out, ws));
  SV_CHECK_THROWS(errc::invalid_argument, "selected.size()",
                  recycle(hv, v, std::vector<index_t>{}, 1, out, ws));
  SV_CHECK_THROWS(errc::invalid_argument, "selected[1]",
                  recycle(hv, v, std::vector<index_t>{0, 4}, 1, out, ws));
  SV_CHECK_THROWS(errc::invalid_argument, "selected[0]",
                  recycle(hv, v, std::vector<index_t>{-1, 2}, 1, out, ws));
  SV_CHECK_THROWS(errc::invalid_argument, "selected",
                  recycle(hv, v, std::vector<index_t>{2, 0, 2}, 1, out, ws));
  SV_CHECK_THROWS(errc::shape_mismatch, "visual", recycle(hv, visual_span{4, 4}, sel, 1, out, ws));
  SV_CHECK_THROWS(errc::shape_mismatch, "visual.len", recycle(hv, visual_span{1, 0}, sel, 1, out, ws));
  SV_CHECK_THROWS(errc::shape_mismatch, "hidden.extent[1]",
                  recycle(matrix_view<const float>(nullptr, {6, 0}), v, sel, 1, out, ws));
  h[3] = svt::kNaNf;  // row 3 = visual 2, selected
  SV_CHECK_THROWS(errc::non_finite, "hidden[3, 0]", recycle(hv, v, sel, 1, out, ws));
  h[3] = svt::kInff;
  SV_CHECK_THROWS(errc::non_finite, "hidden[3, 0]", recycle(hv, v, sel, 1, out, ws));
  CHECK(out.clusters == clusters_t{{99}});
  CHECK(out.merged == std::vector<float>{5.0f});
  // A NaN in a row that is not selected is fine.
  h[3] = 3;
  h[2] = svt::kNaNf;  // visual 1, not selected
  CHECK_NOTHROW(recycle(hv, v, sel, 2, out, ws));
  CHECK(out.clusters.size() == 2);
}

TEST_CASE("recycle: check_recycle_options") {
  using sparsevlm::check_recycle_options;
  using sparsevlm::recycle_options;
  CHECK_NOTHROW(check_recycle_options(recycle_options{true, 1.0, 1.0001}));
  CHECK_NOTHROW(check_recycle_options(recycle_options{true, 1e-9, 10}));
  SV_CHECK_THROWS(errc::invalid_argument, "recycle.fraction", check_recycle_options(recycle_options{true, 0.0, 10}));
  SV_CHECK_THROWS(errc::invalid_argument, "recycle.fraction", check_recycle_options(recycle_options{true, -0.1, 10}));
  SV_CHECK_THROWS(errc::invalid_argument, "recycle.fraction", check_recycle_options(recycle_options{true, 1.5, 10}));
  SV_CHECK_THROWS(errc::invalid_argument, "recycle.fraction", check_recycle_options(recycle_options{true, svt::kNaN, 10}));
  SV_CHECK_THROWS(errc::invalid_argument, "recycle.cluster_divisor", check_recycle_options(recycle_options{true, 0.3, 1.0}));
  SV_CHECK_THROWS(errc::invalid_argument, "recycle.cluster_divisor", check_recycle_options(recycle_options{true, 0.3, 0.5}));
  SV_CHECK_THROWS(errc::invalid_argument, "recycle.cluster_divisor", check_recycle_options(recycle_options{true, 0.3, -2}));
  SV_CHECK_THROWS(errc::invalid_argument, "recycle.cluster_divisor",
                  check_recycle_options(recycle_options{true, 0.3, std::numeric_limits<double>::infinity()}));
  SV_CHECK_THROWS(errc::invalid_argument, "recycle.cluster_divisor", check_recycle_options(recycle_options{true, 0.3, svt::kNaN}));
}

TEST_CASE("recycle: property, partition, means and a naive DPC-KNN") {
  std::mt19937 g(4242);
  sparsevlm::workspace ws;  // reused across shapes on purpose
  for (int it = 0; it < 60; ++it) {
    const index_t S = svt::rand_int(g, 0, 3), N = svt::rand_int(g, 1, 14),
                  T = svt::rand_int(g, 0, 2), d = svt::rand_int(g, 1, 6);
    const index_t L = S + N + T;
    const index_t s = svt::rand_int(g, 1, N);
    const index_t c = svt::rand_int(g, 1, std::min<index_t>(s, 4));
    std::vector<index_t> perm(static_cast<std::size_t>(N));
    std::iota(perm.begin(), perm.end(), index_t{0});
    std::shuffle(perm.begin(), perm.end(), g);
    const std::vector<index_t> sel(perm.begin(), perm.begin() + s);
    auto h = svt::random_floats(g, static_cast<std::size_t>(L * d), -2.0f, 2.0f);
    // Duplicate some selected rows exactly: distance-0 pairs and density ties.
    for (index_t i = 1; i < s; ++i)
      if (svt::rand_int(g, 0, 3) == 0) {
        const index_t src = sel[static_cast<std::size_t>(svt::rand_int(g, 0, i - 1))];
        const index_t dst = sel[static_cast<std::size_t>(i)];
        for (index_t q = 0; q < d; ++q)
          h[static_cast<std::size_t>((S + dst) * d + q)] = h[static_cast<std::size_t>((S + src) * d + q)];
      }
    INFO("it=", it, " S=", S, " N=", N, " d=", d, " s=", s, " c=", c);
    recycle_result r;
    recycle(matrix_view<const float>(h.data(), {L, d}), visual_span{S, N}, sel, c, r, ws);
    REQUIRE(r.clusters.size() == static_cast<std::size_t>(c));
    CHECK(r.dim == d);
    REQUIRE(r.merged.size() == static_cast<std::size_t>(c * d));
    // A partition of the selected tokens, each cluster non-empty and ascending.
    std::vector<index_t> all;
    for (const auto& cl : r.clusters) {
      CHECK_FALSE(cl.empty());
      CHECK(std::is_sorted(cl.begin(), cl.end()));
      all.insert(all.end(), cl.begin(), cl.end());
    }
    std::sort(all.begin(), all.end());
    std::vector<index_t> want_all;
    for (index_t v : sel) want_all.push_back(S + v);
    std::sort(want_all.begin(), want_all.end());
    CHECK(all == want_all);
    // Merged row = mean of the members' hidden rows.
    for (std::size_t q = 0; q < r.clusters.size(); ++q)
      for (index_t col = 0; col < d; ++col) {
        double acc = 0.0;
        for (index_t p : r.clusters[q]) acc += h[static_cast<std::size_t>(p * d + col)];
        CHECK(r.merged[q * static_cast<std::size_t>(d) + static_cast<std::size_t>(col)] ==
              doctest::Approx(acc / static_cast<double>(r.clusters[q].size())).epsilon(1e-6));
      }
    // Exactly the clusters of a naive implementation of the spec.
    std::vector<double> x;
    for (index_t v : sel)
      for (index_t q = 0; q < d; ++q) x.push_back(h[static_cast<std::size_t>((S + v) * d + q)]);
    auto ref = svt::ref_dpc_knn(x, s, d, c);
    for (auto& cl : ref) {
      for (index_t& i : cl) i = S + sel[static_cast<std::size_t>(i)];
      std::sort(cl.begin(), cl.end());
    }
    CHECK(r.clusters == ref);
  }
}

TEST_CASE("dpc_knn: counts are checked in release builds too") {
  const std::vector<double> D{0.0, 1.0, 1.0, 0.0};
  std::vector<sparsevlm::index_t> centres, label;
  sparsevlm::workspace ws;
  SV_CHECK_THROWS(sparsevlm::errc::invalid_argument, "c", sparsevlm::dpc_knn(D, 2, 0, centres, label, ws));
  SV_CHECK_THROWS(sparsevlm::errc::invalid_argument, "c", sparsevlm::dpc_knn(D, 2, 3, centres, label, ws));
  SV_CHECK_THROWS(sparsevlm::errc::shape_mismatch, "D.size()", sparsevlm::dpc_knn(D, 3, 1, centres, label, ws));
}
