// Stage 1: text raters.
#include <array>
#include <vector>

#include "test_util.hpp"

using sparsevlm::errc;
using sparsevlm::index_t;
using sparsevlm::matrix_view;
using sparsevlm::select_raters;
using sparsevlm::visual_span;

namespace {

// L = 6, d = 2: prefix 0, visual 1-2, text 3-5.
//   v0 = (1, 0), v1 = (0, 1); t0 = (0, 0), t1 = (2, 0), t2 = (0, 2).
// Logits of v0: (0, 2, 0), softmax = (1, e^2, 1) / (2 + e^2) = (0.1065, 0.7870, 0.1065).
// Logits of v1: (0, 0, 2), softmax = (0.1065, 0.1065, 0.7870).
// m = column mean = (0.1065, 0.4468, 0.4468); mean(m) = 1/3 (softmax rows sum to 1).
// Raters: t1, t2, i.e. absolute positions 4 and 5.
const std::vector<float> kTwoRaters = {9, 9, 1, 0, 0, 1, 0, 0, 2, 0, 0, 2};

}  // namespace

TEST_CASE("raters: hand example with two raters") {
  const matrix_view<const float> e(kTwoRaters.data(), {6, 2}, "embeds");
  CHECK(select_raters(e, visual_span{1, 2}) == std::vector<index_t>{4, 5});

  // The naive double reference agrees with the hand numbers above.
  const auto m = svt::ref_rater_means(svt::to_double(e), 2, 6, 1, 2);
  const double e2 = std::exp(2.0);
  CHECK(m[0] == doctest::Approx(1.0 / (2.0 + e2)));
  CHECK(m[1] == doctest::Approx((1.0 + e2) / (2.0 * (2.0 + e2))));
  CHECK(m[1] == doctest::Approx(0.4467).epsilon(1e-3));
  CHECK(m[2] == doctest::Approx(m[1]));
}

TEST_CASE("raters: same answer through float16, bfloat16 and strided views") {
  // Every value of kTwoRaters is exact in both 16-bit formats.
  const auto h = svt::convert<sparsevlm::half>(kTwoRaters);
  const auto b = svt::convert<sparsevlm::bfloat16>(kTwoRaters);
  CHECK(select_raters(matrix_view<const sparsevlm::half>(h.data(), {6, 2}), visual_span{1, 2}) ==
        std::vector<index_t>{4, 5});
  CHECK(select_raters(matrix_view<const sparsevlm::bfloat16>(b.data(), {6, 2}),
                      visual_span{1, 2}) == std::vector<index_t>{4, 5});
  // Stored transposed ([d][L]) and read through strides (1, L).
  std::vector<float> tr(12);
  for (int r = 0; r < 6; ++r)
    for (int c = 0; c < 2; ++c) tr[static_cast<std::size_t>(c * 6 + r)] = kTwoRaters[static_cast<std::size_t>(r * 2 + c)];
  CHECK(select_raters(matrix_view<const float>(tr.data(), {6, 2}, {1, 6}), visual_span{1, 2}) ==
        std::vector<index_t>{4, 5});
}

TEST_CASE("raters: hand example with one rater and a negative logit") {
  // N = 1 at position 0, v = (1, 0); text t0 = (-1, 0), t1 = (0, 0), t2 = (1, 0).
  // Logits (-1, 0, 1): softmax = (e^-1, 1, e) / (e^-1 + 1 + e) = (0.090, 0.245, 0.665).
  // mean = 1/3, so only t2 (position 3) is a rater; t1 = 0.245 is below it.
  const std::vector<float> e = {1, 0, -1, 0, 0, 0, 1, 0};
  CHECK(select_raters(matrix_view<const float>(e.data(), {4, 2}), visual_span{0, 1}) ==
        std::vector<index_t>{3});
  // Two identical visual tokens v = (1, 0), text (0, 0), (1, 0), (0, 0):
  // softmax (1, e, 1) / (2 + e) = (0.212, 0.576, 0.212) for both: rater t1 = position 3.
  const std::vector<float> e2 = {1, 0, 1, 0, 0, 0, 1, 0, 0, 0};
  CHECK(select_raters(matrix_view<const float>(e2.data(), {5, 2}), visual_span{0, 2}) ==
        std::vector<index_t>{3});
}

TEST_CASE("raters: no raters when m is flat or there is no text") {
  // Identical text rows: every softmax row is uniform, m = (1/2, 1/2): no raters.
  const std::vector<float> same = {1, 0, 0, 1, 1, 1, 1, 1};
  CHECK(select_raters(matrix_view<const float>(same.data(), {4, 2}), visual_span{0, 2}).empty());
  // Text orthogonal to every visual token: all logits 0, uniform softmax.
  const std::vector<float> orth = {1, 0, 2, 0, 0, 1, 0, -3};
  CHECK(select_raters(matrix_view<const float>(orth.data(), {4, 2}), visual_span{0, 2}).empty());
  // One text token: m = (1), all equal.
  const std::vector<float> one = {1, 0, 0, 1, 5, 5};
  CHECK(select_raters(matrix_view<const float>(one.data(), {3, 2}), visual_span{0, 2}).empty());
  // No text tokens at all (S + N = L).
  CHECK(select_raters(matrix_view<const float>(one.data(), {3, 2}), visual_span{1, 2}).empty());
}

TEST_CASE("raters: only rows S..L are read and checked") {
  std::vector<float> e = kTwoRaters;
  e[0] = svt::kNaNf;  // the prefix row
  e[1] = svt::kInff;
  CHECK(select_raters(matrix_view<const float>(e.data(), {6, 2}), visual_span{1, 2}) ==
        std::vector<index_t>{4, 5});
}

TEST_CASE("raters: malformed input") {
  std::vector<float> e = kTwoRaters;
  const matrix_view<const float> ok(e.data(), {6, 2}, "embeds");
  SV_CHECK_THROWS(errc::shape_mismatch, "visual", select_raters(ok, visual_span{5, 2}));
  SV_CHECK_THROWS(errc::shape_mismatch, "visual.len", select_raters(ok, visual_span{1, 0}));
  SV_CHECK_THROWS(errc::shape_mismatch, "visual.start", select_raters(ok, visual_span{-1, 2}));
  SV_CHECK_THROWS(errc::shape_mismatch, "embeds.extent[1]",
                  select_raters(matrix_view<const float>(nullptr, {6, 0}), visual_span{1, 2}));
  e[5] = svt::kNaNf;  // row 2 (visual), column 1
  SV_CHECK_THROWS(errc::non_finite, "embeds[2, 1]",
                  select_raters(matrix_view<const float>(e.data(), {6, 2}), visual_span{1, 2}));
  e[5] = 1.0f;
  e[10] = -svt::kInff;  // row 5 (text), column 0
  SV_CHECK_THROWS(errc::non_finite, "embeds[5, 0]",
                  select_raters(matrix_view<const float>(e.data(), {6, 2}), visual_span{1, 2}));
}

TEST_CASE("raters: check_raters") {
  using sparsevlm::check_raters;
  const visual_span v{1, 2};  // text is [3, 6)
  auto chk = [&](std::vector<index_t> r) { check_raters(r, v, 6); };
  CHECK_NOTHROW(chk({}));
  CHECK_NOTHROW(chk({3, 5}));
  CHECK_NOTHROW(chk({3, 4, 5}));
  SV_CHECK_THROWS(errc::invalid_argument, "raters[1]", chk({5, 4}));
  SV_CHECK_THROWS(errc::invalid_argument, "raters[1]", chk({4, 4}));
  SV_CHECK_THROWS(errc::invalid_argument, "raters[0]", chk({2}));  // visual, not text
  SV_CHECK_THROWS(errc::invalid_argument, "raters[0]", chk({0}));  // prefix
  SV_CHECK_THROWS(errc::invalid_argument, "raters[1]", chk({3, 6}));  // past L
  SV_CHECK_THROWS(errc::invalid_argument, "raters[0]", chk({-1}));
}

TEST_CASE("raters: property test against a naive double reference") {
  std::mt19937 g(1234);
  sparsevlm::workspace ws;
  int decided = 0, skipped = 0;
  for (int it = 0; it < 60; ++it) {
    const index_t S = svt::rand_int(g, 0, 3), N = svt::rand_int(g, 1, 8),
                  T = svt::rand_int(g, 0, 7), d = svt::rand_int(g, 1, 6);
    const index_t L = S + N + T;
    const auto e = svt::random_floats(g, static_cast<std::size_t>(L * d), -1.5f, 1.5f);
    const matrix_view<const float> ev(e.data(), {L, d});
    INFO("it=", it, " S=", S, " N=", N, " T=", T, " d=", d);
    const auto got = select_raters(ev, visual_span{S, N}, ws);
    CHECK(got == select_raters(ev, visual_span{S, N}));  // workspace reuse changes nothing
    for (std::size_t i = 0; i < got.size(); ++i) {
      CHECK(got[i] >= S + N);
      CHECK(got[i] < L);
      if (i > 0) CHECK(got[i] > got[i - 1]);
    }
    if (T == 0) {
      CHECK(got.empty());
      continue;
    }
    const auto m = svt::ref_rater_means(svt::to_double(ev), d, L, S, N);
    double mean = 0.0;
    for (double v : m) mean += v;
    mean /= static_cast<double>(T);
    for (index_t t = 0; t < T; ++t) {
      const double mt = m[static_cast<std::size_t>(t)];
      const bool listed = std::find(got.begin(), got.end(), S + N + t) != got.end();
      if (std::fabs(mt - mean) < 1e-5) {
        ++skipped;  // too close to the boundary for a float32 implementation
        continue;
      }
      ++decided;
      CHECK_MESSAGE(listed == (mt > mean), "t=", t, " m=", mt, " mean=", mean);
    }
  }
  CHECK(decided > 100);
  CHECK(skipped < decided / 10);
}

TEST_CASE("raters: float16 and bfloat16 views decide as float32 on exact values") {
  std::mt19937 g(77);
  for (int it = 0; it < 40; ++it) {
    const index_t S = svt::rand_int(g, 0, 2), N = svt::rand_int(g, 1, 6),
                  T = svt::rand_int(g, 1, 6), d = svt::rand_int(g, 1, 5);
    const index_t L = S + N + T;
    const auto e = svt::random_grid(g, static_cast<std::size_t>(L * d), -64, 64, 32.0f);
    const auto h = svt::convert<sparsevlm::half>(e);
    const auto b = svt::convert<sparsevlm::bfloat16>(e);
    const auto want = select_raters(matrix_view<const float>(e.data(), {L, d}), visual_span{S, N});
    CHECK(select_raters(matrix_view<const sparsevlm::half>(h.data(), {L, d}), visual_span{S, N}) ==
          want);
    CHECK(select_raters(matrix_view<const sparsevlm::bfloat16>(b.data(), {L, d}),
                        visual_span{S, N}) == want);
  }
}

TEST_CASE("raters: a finite embedding whose logit overflows float32 is refused") {
  // d = 1, visual {0, 2}, text {2, 3}: visual row 0 · text row 2 = 1e20 · 1e20 = 1e40,
  // beyond float32. Without the check the softmax would see Inf − Inf and quietly
  // return no raters.
  const std::vector<float> e{1e20f, 1e20f, 1e20f, 1.0f};
  SV_CHECK_THROWS(sparsevlm::errc::non_finite, "embeds rows 0 and 2",
                  sparsevlm::select_raters(sparsevlm::matrix_view<const float>(e.data(), {4, 1}),
                                           sparsevlm::visual_span{0, 2}));
}
