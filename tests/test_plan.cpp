// Stage 8: the new sequence and applying it.
#include <algorithm>
#include <vector>

#include "test_util.hpp"

using sparsevlm::apply_plan;
using sparsevlm::apply_plan_inplace;
using sparsevlm::errc;
using sparsevlm::index_t;
using sparsevlm::make_sequence;
using sparsevlm::matrix_view;
using sparsevlm::visual_span;

using seq_t = std::vector<index_t>;

namespace {

// in[p][c] = 10 p + c for an [L, w] array; recycled[i][c] = 100 + 10 i + c.
std::vector<float> source_rows(index_t L, index_t w) {
  std::vector<float> v(static_cast<std::size_t>(L * w));
  for (index_t p = 0; p < L; ++p)
    for (index_t c = 0; c < w; ++c) v[static_cast<std::size_t>(p * w + c)] = static_cast<float>(10 * p + c);
  return v;
}
std::vector<float> recycled_rows(index_t n, index_t w) {
  std::vector<float> v(static_cast<std::size_t>(n * w));
  for (index_t i = 0; i < n; ++i)
    for (index_t c = 0; c < w; ++c) v[static_cast<std::size_t>(i * w + c)] = static_cast<float>(100 + 10 * i + c);
  return v;
}
// The row that sequence entry p stands for.
float expected(index_t p, index_t c) {
  return p >= 0 ? static_cast<float>(10 * p + c) : static_cast<float>(100 + 10 * (-p - 1) + c);
}

}  // namespace

TEST_CASE("plan: make_sequence hand examples") {
  // L = 8, S = 2, N = 4 (visual 2-5), text 6-7; keep {3, 5}, 2 recycled:
  // prefix 0 1, kept 3 5, recycled -1 -2, text 6 7. Length 8 - 4 + 2 + 2 = 8.
  CHECK(make_sequence(8, {2, 4}, seq_t{3, 5}, 2) == seq_t{0, 1, 3, 5, -1, -2, 6, 7});
  // Keep all, nothing recycled: the identity.
  CHECK(make_sequence(8, {2, 4}, seq_t{2, 3, 4, 5}, 0) == seq_t{0, 1, 2, 3, 4, 5, 6, 7});
  // Keep none, one recycled: 8 - 4 + 0 + 1 = 5 entries.
  CHECK(make_sequence(8, {2, 4}, seq_t{}, 1) == seq_t{0, 1, -1, 6, 7});
  // Keep none, recycle none: prefix + text.
  CHECK(make_sequence(8, {2, 4}, seq_t{}, 0) == seq_t{0, 1, 6, 7});
  // No prefix, no text.
  CHECK(make_sequence(3, {0, 3}, seq_t{1}, 1) == seq_t{1, -1});
  // Every recycled slot filled: 4 pruned, 4 recycled.
  CHECK(make_sequence(5, {1, 4}, seq_t{}, 4) == seq_t{0, -1, -2, -3, -4});
}

TEST_CASE("plan: make_sequence malformed input") {
  SV_CHECK_THROWS(errc::invalid_argument, "keep[0]", make_sequence(8, {2, 4}, seq_t{1}, 0));
  SV_CHECK_THROWS(errc::invalid_argument, "keep[1]", make_sequence(8, {2, 4}, seq_t{3, 6}, 0));
  SV_CHECK_THROWS(errc::invalid_argument, "keep[1]", make_sequence(8, {2, 4}, seq_t{4, 3}, 0));
  SV_CHECK_THROWS(errc::invalid_argument, "keep[1]", make_sequence(8, {2, 4}, seq_t{3, 3}, 0));
  SV_CHECK_THROWS(errc::invalid_argument, "recycled", make_sequence(8, {2, 4}, seq_t{3, 5}, 3));
  SV_CHECK_THROWS(errc::invalid_argument, "recycled", make_sequence(8, {2, 4}, seq_t{3, 5}, -1));
  SV_CHECK_THROWS(errc::shape_mismatch, "visual", make_sequence(8, {6, 4}, seq_t{}, 0));
  SV_CHECK_THROWS(errc::shape_mismatch, "visual.len", make_sequence(8, {2, 0}, seq_t{}, 0));
}

TEST_CASE("plan: apply_plan on float32, float16, bfloat16 and strided arrays") {
  const seq_t seq{0, 1, 3, 5, -1, -2, 6, 7};
  const index_t L = 8, w = 3, n = 8, c = 2;
  const auto in = source_rows(L, w);
  const auto rec = recycled_rows(c, w);
  const matrix_view<const float> rv(rec.data(), {c, w});

  std::vector<float> out(static_cast<std::size_t>(n * w), -1.0f);
  apply_plan(seq, matrix_view<const float>(in.data(), {L, w}), rv, matrix_view<float>(out.data(), {n, w}));
  for (index_t i = 0; i < n; ++i)
    for (index_t col = 0; col < w; ++col)
      CHECK(out[static_cast<std::size_t>(i * w + col)] == expected(seq[static_cast<std::size_t>(i)], col));

  // float16 rows, float32 recycled rows converted on the way (all values < 128 are exact).
  const auto in16 = svt::convert<sparsevlm::half>(in);
  std::vector<sparsevlm::half> out16(static_cast<std::size_t>(n * w));
  apply_plan(seq, matrix_view<const sparsevlm::half>(in16.data(), {L, w}), rv,
             matrix_view<sparsevlm::half>(out16.data(), {n, w}));
  for (index_t i = 0; i < n; ++i)
    for (index_t col = 0; col < w; ++col)
      CHECK(sparsevlm::to_float(out16[static_cast<std::size_t>(i * w + col)]) ==
            expected(seq[static_cast<std::size_t>(i)], col));

  const auto inb = svt::convert<sparsevlm::bfloat16>(in);
  std::vector<sparsevlm::bfloat16> outb(static_cast<std::size_t>(n * w));
  apply_plan(seq, matrix_view<const sparsevlm::bfloat16>(inb.data(), {L, w}), rv,
             matrix_view<sparsevlm::bfloat16>(outb.data(), {n, w}));
  for (index_t i = 0; i < n; ++i)
    for (index_t col = 0; col < w; ++col)
      CHECK(sparsevlm::to_float(outb[static_cast<std::size_t>(i * w + col)]) ==
            expected(seq[static_cast<std::size_t>(i)], col));

  // Input stored transposed ([w][L], strides (1, L)); output column-major.
  std::vector<float> inT(in.size());
  for (index_t p = 0; p < L; ++p)
    for (index_t col = 0; col < w; ++col) inT[static_cast<std::size_t>(col * L + p)] = in[static_cast<std::size_t>(p * w + col)];
  std::vector<float> outT(static_cast<std::size_t>(n * w), -1.0f);
  apply_plan(seq, matrix_view<const float>(inT.data(), {L, w}, {1, L}), rv,
             matrix_view<float>(outT.data(), {n, w}, {1, n}));
  for (index_t i = 0; i < n; ++i)
    for (index_t col = 0; col < w; ++col)
      CHECK(outT[static_cast<std::size_t>(col * n + i)] == expected(seq[static_cast<std::size_t>(i)], col));
}

TEST_CASE("plan: position ids as int64 [L, 1] views") {
  // Positions 1000 + p; recycled tokens get the caller's chosen ids 7 and 8.
  const seq_t seq{0, 1, 3, 5, -1, -2, 6, 7};
  std::vector<index_t> pos(8);
  for (index_t p = 0; p < 8; ++p) pos[static_cast<std::size_t>(p)] = 1000 + p;
  const std::vector<index_t> rec{7, 8};
  std::vector<index_t> out(8, -5);
  apply_plan(seq, matrix_view<const index_t>(pos.data(), {8, 1}),
             matrix_view<const index_t>(rec.data(), {2, 1}), matrix_view<index_t>(out.data(), {8, 1}));
  CHECK(out == seq_t{1000, 1001, 1003, 1005, 7, 8, 1006, 1007});
  // In place: keep {3}, one recycled -> 6 tokens; rows 6, 7 stay as they were.
  const seq_t seq2 = make_sequence(8, {2, 4}, seq_t{3}, 1);
  CHECK(seq2 == seq_t{0, 1, 3, -1, 6, 7});
  const index_t n = apply_plan_inplace(seq2, matrix_view<index_t>(pos.data(), {8, 1}),
                                       matrix_view<const index_t>(rec.data(), {1, 1}));
  CHECK(n == 6);
  CHECK(pos == seq_t{1000, 1001, 1003, 7, 1006, 1007, 1006, 1007});
}

TEST_CASE("plan: apply_plan_inplace equals apply_plan") {
  const seq_t seq = make_sequence(8, {2, 4}, seq_t{3}, 1);  // {0, 1, 3, -1, 6, 7}
  const index_t L = 8, w = 3;
  const auto rec = recycled_rows(1, w);
  const matrix_view<const float> rv(rec.data(), {1, w});
  auto buf = source_rows(L, w);
  const index_t n = apply_plan_inplace(seq, matrix_view<float>(buf.data(), {L, w}), rv);
  CHECK(n == 6);
  for (index_t i = 0; i < n; ++i)
    for (index_t col = 0; col < w; ++col)
      CHECK(buf[static_cast<std::size_t>(i * w + col)] == expected(seq[static_cast<std::size_t>(i)], col));
  for (index_t i = n; i < L; ++i)  // rows past n untouched
    for (index_t col = 0; col < w; ++col)
      CHECK(buf[static_cast<std::size_t>(i * w + col)] == expected(i, col));

  // float16 hidden in place with float32 recycled rows.
  auto b16 = svt::convert<sparsevlm::half>(source_rows(L, w));
  CHECK(apply_plan_inplace(seq, matrix_view<sparsevlm::half>(b16.data(), {L, w}), rv) == 6);
  for (index_t i = 0; i < n; ++i)
    for (index_t col = 0; col < w; ++col)
      CHECK(sparsevlm::to_float(b16[static_cast<std::size_t>(i * w + col)]) ==
            expected(seq[static_cast<std::size_t>(i)], col));

  // Column-major in place (element-wise copies).
  std::vector<float> cm(static_cast<std::size_t>(L * w));
  for (index_t p = 0; p < L; ++p)
    for (index_t col = 0; col < w; ++col) cm[static_cast<std::size_t>(col * L + p)] = expected(p, col);
  CHECK(apply_plan_inplace(seq, matrix_view<float>(cm.data(), {L, w}, {1, L}), rv) == 6);
  for (index_t i = 0; i < n; ++i)
    for (index_t col = 0; col < w; ++col)
      CHECK(cm[static_cast<std::size_t>(col * L + i)] == expected(seq[static_cast<std::size_t>(i)], col));
}

TEST_CASE("plan: malformed input leaves outputs untouched") {
  const index_t L = 8, w = 3;
  const auto in = source_rows(L, w);
  const matrix_view<const float> iv(in.data(), {L, w});
  const auto rec = recycled_rows(2, w);
  const matrix_view<const float> rv(rec.data(), {2, w});
  std::vector<float> out(static_cast<std::size_t>(8 * w), -1.0f);
  const matrix_view<float> ov(out.data(), {8, w});
  const seq_t good{0, 1, 3, 5, -1, -2, 6, 7};
  SV_CHECK_THROWS(errc::shape_mismatch, "out",
                  apply_plan(good, iv, rv, matrix_view<float>(out.data(), {7, w})));
  SV_CHECK_THROWS(errc::shape_mismatch, "out",
                  apply_plan(good, iv, rv, matrix_view<float>(out.data(), {8, 2})));
  SV_CHECK_THROWS(errc::invalid_argument, "sequence[2]",
                  apply_plan(seq_t{0, 1, 8, 5, -1, -2, 6, 7}, iv, rv, ov));
  SV_CHECK_THROWS(errc::invalid_argument, "sequence[5]",
                  apply_plan(seq_t{0, 1, 3, 5, -1, -3, 6, 7}, iv, rv, ov));
  SV_CHECK_THROWS(errc::invalid_argument, "sequence[4]",
                  apply_plan(good, iv, matrix_view<const float>(nullptr, {0, w}), ov));
  SV_CHECK_THROWS(errc::shape_mismatch, "recycled.extent[1]",
                  apply_plan(good, iv, matrix_view<const float>(rec.data(), {2, 2}), ov));
  CHECK(std::all_of(out.begin(), out.end(), [](float v) { return v == -1.0f; }));

  auto buf = source_rows(L, w);
  const auto orig = buf;
  const matrix_view<float> bv(buf.data(), {L, w});
  // A source entry before its output position cannot be compacted in place.
  SV_CHECK_THROWS(errc::invalid_argument, "sequence[1]", apply_plan_inplace(seq_t{1, 0}, bv, rv));
  SV_CHECK_THROWS(errc::shape_mismatch, "sequence.size()",
                  apply_plan_inplace(seq_t(9, 0), bv, rv));
  SV_CHECK_THROWS(errc::invalid_argument, "sequence[3]",
                  apply_plan_inplace(seq_t{0, 1, 2, -3}, bv, rv));
  SV_CHECK_THROWS(errc::shape_mismatch, "recycled.extent[1]",
                  apply_plan_inplace(good, bv, matrix_view<const float>(rec.data(), {3, 2})));
  CHECK(buf == orig);
}

TEST_CASE("plan: property, sequence layout and in-place equals out-of-place") {
  std::mt19937 g(8);
  for (int it = 0; it < 60; ++it) {
    const index_t S = svt::rand_int(g, 0, 4), N = svt::rand_int(g, 1, 12),
                  T = svt::rand_int(g, 0, 5), w = svt::rand_int(g, 1, 4);
    const index_t L = S + N + T;
    std::vector<index_t> keep;
    for (index_t j = 0; j < N; ++j)
      if (svt::rand_int(g, 0, 1)) keep.push_back(S + j);
    const index_t k = static_cast<index_t>(keep.size());
    const index_t c = svt::rand_int(g, 0, N - k);
    INFO("it=", it, " S=", S, " N=", N, " T=", T, " keep=", k, " c=", c);
    const seq_t seq = make_sequence(L, {S, N}, keep, c);
    REQUIRE(static_cast<index_t>(seq.size()) == L - N + k + c);
    seq_t want;
    for (index_t p = 0; p < S; ++p) want.push_back(p);
    want.insert(want.end(), keep.begin(), keep.end());
    for (index_t i = 1; i <= c; ++i) want.push_back(-i);
    for (index_t p = S + N; p < L; ++p) want.push_back(p);
    CHECK(seq == want);
    for (std::size_t i = 0; i < seq.size(); ++i)
      if (seq[i] >= 0) CHECK(seq[i] >= static_cast<index_t>(i));

    const auto in = svt::random_floats(g, static_cast<std::size_t>(L * w), -1.0f, 1.0f);
    const auto rec = svt::random_floats(g, static_cast<std::size_t>(c * w), -1.0f, 1.0f);
    const matrix_view<const float> rv(c > 0 ? rec.data() : nullptr, {c, w});
    const index_t n = static_cast<index_t>(seq.size());
    std::vector<float> out(static_cast<std::size_t>(n * w));
    apply_plan(seq, matrix_view<const float>(in.data(), {L, w}), rv,
               matrix_view<float>(n > 0 ? out.data() : nullptr, {n, w}));
    auto buf = in;
    CHECK(apply_plan_inplace(seq, matrix_view<float>(buf.data(), {L, w}), rv) == n);
    CHECK(std::equal(out.begin(), out.end(), buf.begin()));
    for (index_t i = 0; i < n; ++i) {
      const index_t p = seq[static_cast<std::size_t>(i)];
      const float* src = p >= 0 ? &in[static_cast<std::size_t>(p * w)] : &rec[static_cast<std::size_t>((-p - 1) * w)];
      CHECK(std::equal(src, src + w, out.begin() + i * w));
    }
  }
}

TEST_CASE("plan: zero-width per-token arrays are a no-op, even over null data") {
  const std::vector<sparsevlm::index_t> seq{0, 2};
  sparsevlm::matrix_view<const float> in(nullptr, {3, 0});
  sparsevlm::matrix_view<float> out(nullptr, {2, 0});
  sparsevlm::matrix_view<const float> rec(nullptr, {0, 0});
  sparsevlm::apply_plan(std::span<const sparsevlm::index_t>(seq), in, rec, out);
  CHECK(sparsevlm::apply_plan_inplace(std::span<const sparsevlm::index_t>(seq),
                                      sparsevlm::matrix_view<float>(nullptr, {3, 0}), rec) == 2);
}
