// Stages 2-3: relevance matrix P and scores.
#include <array>
#include <algorithm>
#include <cstring>
#include <vector>

#include "test_util.hpp"

using sparsevlm::errc;
using sparsevlm::index_t;
using sparsevlm::matrix_view;
using sparsevlm::relevance_scores;
using sparsevlm::tensor3_view;
using sparsevlm::visual_span;

namespace {

// H = 2, L = 5: prefix 0, visual 1-2, text 3-4. Only the rater rows' visual
// columns are given; everything else is NaN, which the stage must never read.
//   head 0: row 3 -> (0.5, 0.25),  row 4 -> (0.125, 0.5)
//   head 1: row 3 -> (0.25, 0.25), row 4 -> (0.375, 0)
// Head means: P[row 3] = (0.375, 0.25), P[row 4] = (0.25, 0.25).
// With raters {3, 4}: scores = ((0.375 + 0.25) / 2, (0.25 + 0.25) / 2) = (0.3125, 0.25).
// With raters {4}:    P = [(0.25, 0.25)], scores = (0.25, 0.25).
// All of these are exact binary fractions, so equality is exact.
constexpr index_t kH = 2, kL = 5;
std::vector<float> hand_attn() {
  std::vector<float> a(static_cast<std::size_t>(kH * kL * kL), svt::kNaNf);
  auto at = [&](index_t h, index_t q, index_t k) -> float& {
    return a[static_cast<std::size_t>((h * kL + q) * kL + k)];
  };
  at(0, 3, 1) = 0.5f;
  at(0, 3, 2) = 0.25f;
  at(0, 4, 1) = 0.125f;
  at(0, 4, 2) = 0.5f;
  at(1, 3, 1) = 0.25f;
  at(1, 3, 2) = 0.25f;
  at(1, 4, 1) = 0.375f;
  at(1, 4, 2) = 0.0f;
  return a;
}

}  // namespace

TEST_CASE("scores: two-head hand example") {
  const auto a = hand_attn();
  const tensor3_view<const float> attn(a.data(), {kH, kL, kL}, "attn");
  const std::vector<index_t> raters{3, 4};
  std::array<float, 4> P{};
  std::array<float, 2> s{};
  relevance_scores(attn, raters, visual_span{1, 2}, matrix_view<float>(P.data(), {2, 2}), s);
  CHECK(P == std::array<float, 4>{0.375f, 0.25f, 0.25f, 0.25f});
  CHECK(s == std::array<float, 2>{0.3125f, 0.25f});

  const std::vector<index_t> one{4};
  std::array<float, 2> P1{};
  relevance_scores(attn, one, visual_span{1, 2}, matrix_view<float>(P1.data(), {1, 2}), s);
  CHECK(P1 == std::array<float, 2>{0.25f, 0.25f});
  CHECK(s == std::array<float, 2>{0.25f, 0.25f});
}

TEST_CASE("scores: strided attention, strided P, float16 and bfloat16") {
  const auto a = hand_attn();
  // Stored as [q][k][h] and viewed as [h][q][k] through strides (1, L*H, H).
  std::vector<float> perm(a.size());
  for (index_t h = 0; h < kH; ++h)
    for (index_t q = 0; q < kL; ++q)
      for (index_t k = 0; k < kL; ++k)
        perm[static_cast<std::size_t>((q * kL + k) * kH + h)] = a[static_cast<std::size_t>((h * kL + q) * kL + k)];
  const tensor3_view<const float> attn(perm.data(), {kH, kL, kL}, {1, kL * kH, kH}, "attn");
  const std::vector<index_t> raters{3, 4};
  // P column-major with a padding slot per column: P(r, j) at r + 3 j.
  std::array<float, 6> P{-1, -1, -1, -1, -1, -1};
  std::array<float, 2> s{};
  relevance_scores(attn, raters, visual_span{1, 2}, matrix_view<float>(P.data(), {2, 2}, {1, 3}), s);
  CHECK(P == std::array<float, 6>{0.375f, 0.25f, -1.0f, 0.25f, 0.25f, -1.0f});
  CHECK(s == std::array<float, 2>{0.3125f, 0.25f});

  const auto h = svt::convert<sparsevlm::half>(a);
  std::array<float, 4> Ph{};
  relevance_scores(tensor3_view<const sparsevlm::half>(h.data(), {kH, kL, kL}), raters,
                   visual_span{1, 2}, matrix_view<float>(Ph.data(), {2, 2}), s);
  CHECK(Ph == std::array<float, 4>{0.375f, 0.25f, 0.25f, 0.25f});
  CHECK(s == std::array<float, 2>{0.3125f, 0.25f});
  const auto b = svt::convert<sparsevlm::bfloat16>(a);
  relevance_scores(tensor3_view<const sparsevlm::bfloat16>(b.data(), {kH, kL, kL}), raters,
                   visual_span{1, 2}, matrix_view<float>(Ph.data(), {2, 2}), s);
  CHECK(s == std::array<float, 2>{0.3125f, 0.25f});
}

TEST_CASE("scores: no raters gives zero scores") {
  const auto a = hand_attn();
  std::array<float, 2> s{7.0f, 7.0f};
  relevance_scores(tensor3_view<const float>(a.data(), {kH, kL, kL}), std::vector<index_t>{},
                   visual_span{1, 2}, matrix_view<float>(nullptr, {0, 2}), s);
  CHECK(s == std::array<float, 2>{0.0f, 0.0f});
}

TEST_CASE("scores: malformed input") {
  auto a = hand_attn();
  const tensor3_view<const float> attn(a.data(), {kH, kL, kL}, "attn");
  const std::vector<index_t> raters{3, 4};
  std::array<float, 4> P{};
  std::array<float, 2> s{};
  const matrix_view<float> Pv(P.data(), {2, 2});
  SV_CHECK_THROWS(errc::shape_mismatch, "attn.extent[2]",
                  relevance_scores(tensor3_view<const float>(a.data(), {kH, kL, kL - 1}), raters,
                                   visual_span{1, 2}, Pv, s));
  SV_CHECK_THROWS(errc::shape_mismatch, "attn.extent[0]",
                  relevance_scores(tensor3_view<const float>(nullptr, {0, kL, kL}), raters,
                                   visual_span{1, 2}, Pv, s));
  SV_CHECK_THROWS(errc::shape_mismatch, "visual",
                  relevance_scores(attn, raters, visual_span{4, 2}, Pv, s));
  SV_CHECK_THROWS(errc::shape_mismatch, "visual.len",
                  relevance_scores(attn, raters, visual_span{1, 0}, Pv, s));
  SV_CHECK_THROWS(errc::invalid_argument, "raters[0]",
                  relevance_scores(attn, std::vector<index_t>{2, 4}, visual_span{1, 2}, Pv, s));
  SV_CHECK_THROWS(errc::invalid_argument, "raters[1]",
                  relevance_scores(attn, std::vector<index_t>{4, 3}, visual_span{1, 2}, Pv, s));
  SV_CHECK_THROWS(errc::shape_mismatch, "P",
                  relevance_scores(attn, raters, visual_span{1, 2},
                                   matrix_view<float>(P.data(), {1, 2}), s));
  std::array<float, 3> s3{};
  SV_CHECK_THROWS(errc::shape_mismatch, "scores.size()",
                  relevance_scores(attn, raters, visual_span{1, 2}, Pv, s3));

  // NaN / Inf in a rater row of the visual columns is named by its index.
  a[static_cast<std::size_t>((1 * kL + 3) * kL + 2)] = svt::kNaNf;  // attn[1, 3, 2]
  SV_CHECK_THROWS(errc::non_finite, "attn[1, 3, 2]",
                  relevance_scores(attn, raters, visual_span{1, 2}, Pv, s));
  std::ranges::copy(hand_attn(), a.begin());  // in place: attn views this buffer
  a[static_cast<std::size_t>((0 * kL + 4) * kL + 1)] = svt::kInff;  // attn[0, 4, 1]
  SV_CHECK_THROWS(errc::non_finite, "attn[0, 4, 1]",
                  relevance_scores(attn, raters, visual_span{1, 2}, Pv, s));
  // Finite values whose sum overflows float32: 3e38 + 3e38 = Inf.
  std::ranges::copy(hand_attn(), a.begin());  // in place: attn views this buffer
  a[static_cast<std::size_t>((0 * kL + 3) * kL + 1)] = 3e38f;
  a[static_cast<std::size_t>((1 * kL + 3) * kL + 1)] = 3e38f;
  SV_CHECK_THROWS(errc::non_finite, "scores[0]",
                  relevance_scores(attn, raters, visual_span{1, 2}, Pv, s));
}

TEST_CASE("scores: property test against a naive double reference") {
  std::mt19937 g(99);
  for (int it = 0; it < 60; ++it) {
    const index_t H = svt::rand_int(g, 1, 4), S = svt::rand_int(g, 0, 3),
                  N = svt::rand_int(g, 1, 9), T = svt::rand_int(g, 1, 6);
    const index_t L = S + N + T;
    INFO("it=", it, " H=", H, " S=", S, " N=", N, " T=", T);
    auto a = svt::random_floats(g, static_cast<std::size_t>(H * L * L), 0.0f, 1.0f);
    // Make column 0 of the visual span a copy of column 1 when N >= 2: identical
    // columns must give bit-identical scores (exact ties stay exact).
    if (N >= 2)
      for (index_t h = 0; h < H; ++h)
        for (index_t q = 0; q < L; ++q)
          a[static_cast<std::size_t>((h * L + q) * L + S)] = a[static_cast<std::size_t>((h * L + q) * L + S + 1)];
    std::vector<index_t> raters;
    for (index_t t = S + N; t < L; ++t)
      if (svt::rand_int(g, 0, 2) != 0) raters.push_back(t);
    const index_t R = static_cast<index_t>(raters.size());
    std::vector<float> P(static_cast<std::size_t>(R * N), -1.0f), s(static_cast<std::size_t>(N), -1.0f);
    const tensor3_view<const float> av(a.data(), {H, L, L});
    relevance_scores(av, raters, visual_span{S, N},
                     matrix_view<float>(R > 0 ? P.data() : nullptr, {R, N}), s);
    std::vector<double> ad(a.begin(), a.end());
    const auto want = svt::ref_scores(ad, H, L, raters, S, N);
    for (index_t j = 0; j < N; ++j)
      CHECK(s[static_cast<std::size_t>(j)] ==
            doctest::Approx(want[static_cast<std::size_t>(j)]).epsilon(1e-5));
    for (index_t r = 0; r < R; ++r)
      for (index_t j = 0; j < N; ++j) {
        double pm = 0.0;
        for (index_t h = 0; h < H; ++h)
          pm += ad[static_cast<std::size_t>((h * L + raters[static_cast<std::size_t>(r)]) * L + S + j)];
        CHECK(P[static_cast<std::size_t>(r * N + j)] == doctest::Approx(pm / static_cast<double>(H)).epsilon(1e-5));
      }
    if (N >= 2) CHECK(s[0] == s[1]);

    // The same values through float16 views give bit-identical P and scores
    // when they are exactly representable.
    for (float& x : a) x = sparsevlm::to_float(sparsevlm::to_half(x));
    std::vector<float> s32(static_cast<std::size_t>(N)), s16(static_cast<std::size_t>(N));
    std::vector<float> P32(P.size()), P16(P.size());
    relevance_scores(av, raters, visual_span{S, N},
                     matrix_view<float>(R > 0 ? P32.data() : nullptr, {R, N}), s32);
    const auto h16 = svt::convert<sparsevlm::half>(a);
    relevance_scores(tensor3_view<const sparsevlm::half>(h16.data(), {H, L, L}), raters,
                     visual_span{S, N}, matrix_view<float>(R > 0 ? P16.data() : nullptr, {R, N}),
                     s16);
    CHECK(s32 == s16);
    CHECK(P32 == P16);
  }
}
