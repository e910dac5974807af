// KV-cache compaction after a pruning step (kv_cache.hpp).
#include <algorithm>
#include <array>
#include <cstring>
#include <vector>

#include "test_util.hpp"

using sparsevlm::bfloat16;
using sparsevlm::compact_kv;
using sparsevlm::errc;
using sparsevlm::half;
using sparsevlm::index_t;
using sparsevlm::kv_layout;
using sparsevlm::kv_sequence;
using sparsevlm::make_sequence;
using sparsevlm::merge_kv;
using sparsevlm::tensor3_view;

using seq_t = std::vector<index_t>;

namespace {

// Cached element (token t, head h, dim d) = 16 t + 4 h + d; recycled token r's is
// −(1 + 16 r + 4 h + d). With t < 16, h < 4, d < 4 every value is an integer
// below 256 in magnitude, exact in float16 and bfloat16, and names its element.
float code(index_t t, index_t h, index_t d) { return static_cast<float>(16 * t + 4 * h + d); }
float rcode(index_t r, index_t h, index_t d) { return -static_cast<float>(1 + 16 * r + 4 * h + d); }
float want(index_t p, index_t h, index_t d) { return p >= 0 ? code(p, h, d) : rcode(-p - 1, h, d); }

// The element (token, head, dim) of a view in either layout.
template <class T>
T& at(tensor3_view<T> v, kv_layout layout, index_t t, index_t h, index_t d) {
  return layout == kv_layout::tokens_heads_dim ? v(t, h, d) : v(h, t, d);
}

std::array<index_t, 3> layout_extents(kv_layout layout, index_t tokens, index_t heads, index_t dim) {
  return layout == kv_layout::tokens_heads_dim ? std::array<index_t, 3>{tokens, heads, dim}
                                               : std::array<index_t, 3>{heads, tokens, dim};
}

// A contiguous cache (or recycled array) of T in `layout`, filled by `f`.
template <class T, class F>
std::vector<T> filled(kv_layout layout, index_t tokens, index_t heads, index_t dim, F f) {
  std::vector<T> buf(static_cast<std::size_t>(tokens * heads * dim));
  const tensor3_view<T> v(buf.data(), layout_extents(layout, tokens, heads, dim));
  for (index_t t = 0; t < tokens; ++t)
    for (index_t h = 0; h < heads; ++h)
      for (index_t d = 0; d < dim; ++d) at(v, layout, t, h, d) = sparsevlm::from_float<T>(f(t, h, d));
  return buf;
}

using svt::same_bits;

// Checks the first seq.size() tokens hold the sequence and the rest is as before.
template <class T>
void check_compacted(tensor3_view<T> v, kv_layout layout, const seq_t& seq, index_t tokens) {
  const std::size_t ta = layout == kv_layout::tokens_heads_dim ? 0 : 1;
  const index_t heads = v.extent(1 - ta), dim = v.extent(2);
  for (index_t t = 0; t < tokens; ++t)
    for (index_t h = 0; h < heads; ++h)
      for (index_t d = 0; d < dim; ++d) {
        const float expect = t < static_cast<index_t>(seq.size()) ? want(seq[static_cast<std::size_t>(t)], h, d)
                                                                   : code(t, h, d);
        INFO("t=", t, " h=", h, " d=", d);
        CHECK(sparsevlm::to_float(at(v, layout, t, h, d)) == expect);
      }
}

}  // namespace

TEST_CASE("kv: kv_sequence drops recycled entries and keeps order") {
  // L = 8, visual [2, 6), keep {3, 5}, 2 recycled: {0 1 3 5 -1 -2 6 7} -> {0 1 3 5 6 7}.
  CHECK(kv_sequence(seq_t{0, 1, 3, 5, -1, -2, 6, 7}) == seq_t{0, 1, 3, 5, 6, 7});
  CHECK(kv_sequence(seq_t{}).empty());
  CHECK(kv_sequence(seq_t{-1, -2}).empty());
  CHECK(kv_sequence(seq_t{0, 1, 2}) == seq_t{0, 1, 2});
}

TEST_CASE("kv: kv_sequence over several steps") {
  // Step 1 on L = 10 (visual [2, 8)): keep {3, 6}, one recycled: s1 = {0 1 3 6 -1 8 9}.
  // Step 2 on those 7 tokens (visual [2, 5)): keep index 3 (the step-1 recycled
  // token), one recycled: s2 = {0 1 3 -1 5 6}. A cache written before step 1 has
  // rows for 0 1 8 9 only among the survivors: index 3 of s1 is recycled.
  const seq_t s1 = make_sequence(10, {2, 6}, seq_t{3, 6}, 1);
  const seq_t s2 = make_sequence(7, {2, 3}, seq_t{4}, 1);
  REQUIRE(s1 == seq_t{0, 1, 3, 6, -1, 8, 9});
  REQUIRE(s2 == seq_t{0, 1, 4, -1, 5, 6});
  CHECK(kv_sequence(std::vector<seq_t>{s1, s2}) == seq_t{0, 1, 8, 9});
  // Keep index 2 (old 3) instead: it survives, {0 1 3 8 9}.
  const seq_t s2b = make_sequence(7, {2, 3}, seq_t{2}, 0);
  CHECK(kv_sequence(std::vector<seq_t>{s1, s2b}) == seq_t{0, 1, 3, 8, 9});
  // Chaining the one-step form instead would name the wrong rows: kv_sequence(s1)
  // = {0 1 3 6 8 9}, and s2b's entry 5 (old token 8) would read its 6th row, 9.
  CHECK(kv_sequence(std::vector<seq_t>{s1}) == kv_sequence(s1));
  CHECK(kv_sequence(std::vector<seq_t>{}).empty());
  // A cache written after step 1 (layers in (l1, l2]) has rows for s1's tokens,
  // recycled included: it takes kv_sequence(s2) alone.
  CHECK(kv_sequence(s2) == seq_t{0, 1, 4, 5, 6});
  SV_CHECK_THROWS(errc::invalid_argument, "steps[1][2]",
                  kv_sequence(std::vector<seq_t>{s1, seq_t{0, 1, 7}}));
}

TEST_CASE("kv: compact_kv hand example, both layouts, float32") {
  // L = 8 tokens, 2 heads, head_dim 3. Sequence {0 1 3 5 -1 -2 6 7}:
  //   token 2 <- old 3, token 3 <- old 5, tokens 4, 5 <- recycled 0, 1,
  //   tokens 6, 7 <- old 6, 7 (unchanged). New count 8.
  // e.g. head 1, dim 2 of new token 3 is code(5, 1, 2) = 80 + 4 + 2 = 86, and of
  // new token 4 is rcode(0, 1, 2) = -(1 + 4 + 2) = -7.
  const seq_t seq{0, 1, 3, 5, -1, -2, 6, 7};
  const index_t L = 8, H = 2, D = 3, c = 2;
  for (kv_layout layout : {kv_layout::tokens_heads_dim, kv_layout::heads_tokens_dim}) {
    auto cache = filled<float>(layout, L, H, D, code);
    const auto rec = filled<float>(layout, c, H, D, rcode);
    const tensor3_view<float> cv(cache.data(), layout_extents(layout, L, H, D));
    const tensor3_view<const float> rv(rec.data(), layout_extents(layout, c, H, D));
    CHECK(compact_kv(seq, cv, layout, rv) == 8);
    check_compacted(cv, layout, seq, L);
    CHECK(at(cv, layout, 3, 1, 2) == 86.0f);
    CHECK(at(cv, layout, 4, 1, 2) == -7.0f);
  }
  // keep {3}, one recycled: {0 1 3 -1 6 7}; 6 tokens, old tokens 6 and 7 remain as rows 6, 7.
  const seq_t seq2 = make_sequence(8, {2, 4}, seq_t{3}, 1);
  REQUIRE(seq2 == seq_t{0, 1, 3, -1, 6, 7});
  for (kv_layout layout : {kv_layout::tokens_heads_dim, kv_layout::heads_tokens_dim}) {
    auto cache = filled<float>(layout, L, H, D, code);
    const auto rec = filled<float>(layout, 1, H, D, rcode);
    const tensor3_view<float> cv(cache.data(), layout_extents(layout, L, H, D));
    CHECK(compact_kv(seq2, cv, layout,
                     tensor3_view<const float>(rec.data(), layout_extents(layout, 1, H, D))) == 6);
    check_compacted(cv, layout, seq2, L);
  }
}

TEST_CASE("kv: compact_kv with kv_sequence (caches of layers before the step)") {
  // The early layers have no rows for recycled tokens: {0 1 3 5 6 7}, 6 tokens.
  const seq_t kseq = kv_sequence(seq_t{0, 1, 3, 5, -1, -2, 6, 7});
  const index_t L = 8, H = 3, D = 2;
  for (kv_layout layout : {kv_layout::tokens_heads_dim, kv_layout::heads_tokens_dim}) {
    auto cache = filled<float>(layout, L, H, D, code);
    const tensor3_view<float> cv(cache.data(), layout_extents(layout, L, H, D));
    CHECK(compact_kv(kseq, cv, layout) == 6);
    check_compacted(cv, layout, kseq, L);
  }
}

TEST_CASE("kv: compact_kv on float16 and bfloat16 caches with float32 recycled rows") {
  const seq_t seq{0, 1, 3, 5, -1, -2, 6, 7};
  const index_t L = 8, H = 2, D = 4, c = 2;
  for (kv_layout layout : {kv_layout::tokens_heads_dim, kv_layout::heads_tokens_dim}) {
    const auto rec = filled<float>(layout, c, H, D, rcode);
    const tensor3_view<const float> rv(rec.data(), layout_extents(layout, c, H, D));
    auto c16 = filled<half>(layout, L, H, D, code);
    const tensor3_view<half> v16(c16.data(), layout_extents(layout, L, H, D));
    CHECK(compact_kv(seq, v16, layout, rv) == 8);
    check_compacted(v16, layout, seq, L);
    auto cb = filled<bfloat16>(layout, L, H, D, code);
    const tensor3_view<bfloat16> vb(cb.data(), layout_extents(layout, L, H, D));
    CHECK(compact_kv(seq, vb, layout, rv) == 8);
    check_compacted(vb, layout, seq, L);
    // bfloat16 recycled rows into a float16 cache.
    auto c16b = filled<half>(layout, L, H, D, code);
    const auto recb = filled<bfloat16>(layout, c, H, D, rcode);
    const tensor3_view<half> v16b(c16b.data(), layout_extents(layout, L, H, D));
    CHECK(compact_kv(seq, v16b, layout,
                     tensor3_view<const bfloat16>(recb.data(), layout_extents(layout, c, H, D))) == 8);
    check_compacted(v16b, layout, seq, L);
  }
}

TEST_CASE("kv: compact_kv on strided views (interleaved K/V, head_dim outermost)") {
  const seq_t seq{0, 1, 3, 5, -1, -2, 6, 7};
  const index_t L = 8, H = 2, D = 3, c = 2;
  const auto rec = filled<float>(kv_layout::tokens_heads_dim, c, H, D, rcode);
  const tensor3_view<const float> rv(rec.data(), {c, H, D});
  {
    // One buffer [L, 2, H, D] holding K (slot 0) and V (slot 1 = code + 500):
    // compacting K must leave every V element alone.
    std::vector<float> kvbuf(static_cast<std::size_t>(L * 2 * H * D));
    for (index_t t = 0; t < L; ++t)
      for (index_t s = 0; s < 2; ++s)
        for (index_t h = 0; h < H; ++h)
          for (index_t d = 0; d < D; ++d)
            kvbuf[static_cast<std::size_t>(((t * 2 + s) * H + h) * D + d)] = code(t, h, d) + (s ? 500.0f : 0.0f);
    const tensor3_view<float> k(kvbuf.data(), {L, H, D}, {2 * H * D, D, 1});
    CHECK(compact_kv(seq, k, kv_layout::tokens_heads_dim, rv) == 8);
    check_compacted(k, kv_layout::tokens_heads_dim, seq, L);
    for (index_t t = 0; t < L; ++t)
      for (index_t h = 0; h < H; ++h)
        for (index_t d = 0; d < D; ++d)
          CHECK(kvbuf[static_cast<std::size_t>(((t * 2 + 1) * H + h) * D + d)] == code(t, h, d) + 500.0f);
  }
  {
    // Storage [D, L, H] seen as tokens_heads_dim: strides (H, 1, L·H), element-wise path.
    std::vector<float> buf(static_cast<std::size_t>(L * H * D));
    const tensor3_view<float> v(buf.data(), {L, H, D}, {H, 1, L * H});
    for (index_t t = 0; t < L; ++t)
      for (index_t h = 0; h < H; ++h)
        for (index_t d = 0; d < D; ++d) v(t, h, d) = code(t, h, d);
    // Recycled rows stored [D, c, H] too.
    std::vector<float> rbuf(static_cast<std::size_t>(c * H * D));
    const tensor3_view<float> r(rbuf.data(), {c, H, D}, {H, 1, c * H});
    for (index_t i = 0; i < c; ++i)
      for (index_t h = 0; h < H; ++h)
        for (index_t d = 0; d < D; ++d) r(i, h, d) = rcode(i, h, d);
    CHECK(compact_kv(seq, v, kv_layout::tokens_heads_dim, tensor3_view<const float>(r)) == 8);
    check_compacted(v, kv_layout::tokens_heads_dim, seq, L);
  }
  {
    // Head-major cache with a padded token axis (capacity 10, 8 used): [H, 10, D] buffer.
    const index_t cap = 10;
    std::vector<float> buf(static_cast<std::size_t>(H * cap * D), 999.0f);
    const tensor3_view<float> full(buf.data(), {H, cap, D});
    const tensor3_view<float> v(buf.data(), {H, L, D}, {cap * D, D, 1});
    for (index_t t = 0; t < L; ++t)
      for (index_t h = 0; h < H; ++h)
        for (index_t d = 0; d < D; ++d) v(h, t, d) = code(t, h, d);
    const auto recH = filled<float>(kv_layout::heads_tokens_dim, c, H, D, rcode);
    CHECK(compact_kv(seq, v, kv_layout::heads_tokens_dim,
                     tensor3_view<const float>(recH.data(), {H, c, D})) == 8);
    check_compacted(v, kv_layout::heads_tokens_dim, seq, L);
    for (index_t h = 0; h < H; ++h)
      for (index_t t = L; t < cap; ++t)
        for (index_t d = 0; d < D; ++d) CHECK(full(h, t, d) == 999.0f);
  }
}

TEST_CASE("kv: merge_kv cluster means, then compact with the full sequence") {
  // L = 8, visual [2, 6), keep {3}, clusters {{4, 5}, {2}} (the first listed
  // cluster need not hold the lowest position). Sequence {0 1 3 -1 -2 6 7}.
  // Cluster 0's mean at (h, d) is (code(4,h,d) + code(5,h,d)) / 2 = 72 + 4h + d.
  const index_t L = 8, H = 2, D = 3;
  const std::vector<seq_t> clusters{{4, 5}, {2}};
  const seq_t seq = make_sequence(L, {2, 4}, seq_t{3}, 2);
  REQUIRE(seq == seq_t{0, 1, 3, -1, -2, 6, 7});
  for (kv_layout layout : {kv_layout::tokens_heads_dim, kv_layout::heads_tokens_dim}) {
    auto cache = filled<half>(layout, L, H, D, code);
    const tensor3_view<half> cv(cache.data(), layout_extents(layout, L, H, D));
    std::vector<half> merged(static_cast<std::size_t>(2 * H * D));
    const tensor3_view<half> mv(merged.data(), layout_extents(layout, 2, H, D));
    merge_kv(clusters, tensor3_view<const half>(cv), layout, mv);
    for (index_t h = 0; h < H; ++h)
      for (index_t d = 0; d < D; ++d) {
        CHECK(sparsevlm::to_float(at(mv, layout, 0, h, d)) == static_cast<float>(72 + 4 * h + d));
        CHECK(sparsevlm::to_float(at(mv, layout, 1, h, d)) == code(2, h, d));
      }
    CHECK(compact_kv(seq, cv, layout, tensor3_view<const half>(mv)) == 7);
    for (index_t h = 0; h < H; ++h)
      for (index_t d = 0; d < D; ++d) {
        CHECK(sparsevlm::to_float(at(cv, layout, 2, h, d)) == code(3, h, d));
        CHECK(sparsevlm::to_float(at(cv, layout, 3, h, d)) == static_cast<float>(72 + 4 * h + d));
        CHECK(sparsevlm::to_float(at(cv, layout, 4, h, d)) == code(2, h, d));
        CHECK(sparsevlm::to_float(at(cv, layout, 5, h, d)) == code(6, h, d));
        CHECK(sparsevlm::to_float(at(cv, layout, 7, h, d)) == code(7, h, d));  // past n: as before
      }
  }
  // Rounding: the mean of 1 and 2^-11 + 1 in float16 is 1 + 2^-12, a tie that
  // rounds to even (1.0); summing in double then rounding once gives exactly that.
  std::vector<float> two{1.0f, 1.0f + 1.0f / 1024.0f};
  const auto two16 = svt::convert<half>(two);
  half out{};
  merge_kv(std::vector<seq_t>{{0, 1}}, tensor3_view<const half>(two16.data(), {2, 1, 1}),
           kv_layout::tokens_heads_dim, tensor3_view<half>(&out, {1, 1, 1}));
  CHECK(sparsevlm::to_float(out) == sparsevlm::to_float(sparsevlm::to_half(1.0f + 1.0f / 2048.0f)));
}

TEST_CASE("kv: zero-size caches") {
  // No heads or head_dim: entries are still checked, nothing is touched, even over null data.
  CHECK(compact_kv(seq_t{0, 2}, tensor3_view<float>(nullptr, {4, 0, 8}), kv_layout::tokens_heads_dim) == 2);
  CHECK(compact_kv(seq_t{0, 2}, tensor3_view<float>(nullptr, {2, 4, 0}), kv_layout::heads_tokens_dim) == 2);
  SV_CHECK_THROWS(errc::invalid_argument, "sequence[1]",
                  compact_kv(seq_t{0, 4}, tensor3_view<float>(nullptr, {4, 0, 8}), kv_layout::tokens_heads_dim));
  // No tokens, empty sequence.
  CHECK(compact_kv(seq_t{}, tensor3_view<half>(nullptr, {0, 2, 8}), kv_layout::tokens_heads_dim) == 0);
  // Empty sequence over a real cache: count 0, cache untouched.
  auto cache = filled<float>(kv_layout::tokens_heads_dim, 3, 1, 2, code);
  const auto orig = cache;
  CHECK(compact_kv(seq_t{}, tensor3_view<float>(cache.data(), {3, 1, 2}), kv_layout::tokens_heads_dim) == 0);
  CHECK(cache == orig);
  // No clusters: nothing to merge.
  merge_kv(std::vector<seq_t>{}, tensor3_view<const float>(cache.data(), {3, 1, 2}),
           kv_layout::tokens_heads_dim, tensor3_view<float>(nullptr, {0, 1, 2}));
}

TEST_CASE("kv: malformed input is refused and leaves the cache untouched") {
  const index_t L = 8, H = 2, D = 3;
  const auto rec = filled<float>(kv_layout::tokens_heads_dim, 2, H, D, rcode);
  const tensor3_view<const float> rv(rec.data(), {2, H, D});
  auto cache = filled<float>(kv_layout::tokens_heads_dim, L, H, D, code);
  const auto orig = cache;
  const tensor3_view<float> cv(cache.data(), {L, H, D});
  const auto T = kv_layout::tokens_heads_dim;
  const seq_t good{0, 1, 3, 5, -1, -2, 6, 7};

  SV_CHECK_THROWS(errc::shape_mismatch, "sequence.size()", compact_kv(seq_t(9, 0), cv, T, rv));
  SV_CHECK_THROWS(errc::invalid_argument, "sequence[2]", compact_kv(seq_t{0, 1, 8}, cv, T, rv));
  SV_CHECK_THROWS(errc::invalid_argument, "sequence[5]",
                  compact_kv(seq_t{0, 1, 3, 5, -1, -3, 6, 7}, cv, T, rv));
  // Source before its output index: not compactable in place (error names the entry).
  SV_CHECK_THROWS(errc::invalid_argument, "sequence[1]", compact_kv(seq_t{1, 0}, cv, T, rv));
  SV_CHECK_THROWS(errc::invalid_argument, "for an in-place compaction",
                  compact_kv(seq_t{0, 2, 1}, cv, T, rv));
  // A recycled entry without recycled rows (the 3-argument form).
  SV_CHECK_THROWS(errc::invalid_argument, "sequence[4]", compact_kv(good, cv, T));
  // Recycled rows of the wrong shape.
  SV_CHECK_THROWS(errc::shape_mismatch, "recycled.extent[1] (heads)",
                  compact_kv(good, cv, T, tensor3_view<const float>(rec.data(), {2, 1, D})));
  SV_CHECK_THROWS(errc::shape_mismatch, "recycled.extent[2] (head_dim)",
                  compact_kv(good, cv, T, tensor3_view<const float>(rec.data(), {2, H, 2})));
  // Head-major recycled rows must be [H, c, D]: a [c, H, D] array with H != c is refused.
  auto hm = filled<float>(kv_layout::heads_tokens_dim, L, H, D, code);
  const auto hm_orig = hm;
  SV_CHECK_THROWS(errc::shape_mismatch, "recycled.extent[0] (heads)",
                  compact_kv(good, tensor3_view<float>(hm.data(), {H, L, D}), kv_layout::heads_tokens_dim,
                             tensor3_view<const float>(rec.data(), {3, 2, 2})));
  SV_CHECK_THROWS(errc::shape_mismatch, "cache.extent[1] (tokens)",
                  compact_kv(seq_t(9, 0), tensor3_view<float>(hm.data(), {H, L, D}), kv_layout::heads_tokens_dim));
  SV_CHECK_THROWS(errc::invalid_argument, "layout",
                  compact_kv(good, cv, static_cast<kv_layout>(7), rv));
  CHECK(cache == orig);
  CHECK(hm == hm_orig);

  std::vector<float> out(static_cast<std::size_t>(2 * H * D), -5.0f);
  const auto out_orig = out;
  const tensor3_view<float> ov(out.data(), {2, H, D});
  const tensor3_view<const float> ccv(cache.data(), {L, H, D});
  SV_CHECK_THROWS(errc::shape_mismatch, "out.extent[0] (tokens)",
                  merge_kv(std::vector<seq_t>{{2}}, ccv, T, ov));
  SV_CHECK_THROWS(errc::shape_mismatch, "out.extent[2] (head_dim)",
                  merge_kv(std::vector<seq_t>{{2}, {4}}, ccv, T, tensor3_view<float>(out.data(), {2, H, 2})));
  SV_CHECK_THROWS(errc::invalid_argument, "clusters[1]", merge_kv(std::vector<seq_t>{{2}, {}}, ccv, T, ov));
  SV_CHECK_THROWS(errc::invalid_argument, "clusters[0][1]",
                  merge_kv(std::vector<seq_t>{{2, 8}, {4}}, ccv, T, ov));
  SV_CHECK_THROWS(errc::invalid_argument, "clusters[0][0]",
                  merge_kv(std::vector<seq_t>{{-1}, {4}}, ccv, T, ov));
  SV_CHECK_THROWS(errc::invalid_argument, "ascending, unique members",
                  merge_kv(std::vector<seq_t>{{4, 4}, {2}}, ccv, T, ov));
  SV_CHECK_THROWS(errc::invalid_argument, "clusters[1][1]",
                  merge_kv(std::vector<seq_t>{{2}, {5, 4}}, ccv, T, ov));
  SV_CHECK_THROWS(errc::invalid_argument, "layout",
                  merge_kv(std::vector<seq_t>{{2}, {4}}, ccv, static_cast<kv_layout>(-1), ov));
  CHECK(out == out_orig);
}

namespace {

// A cache of T with the given logical extents stored with its axes in the order
// `perm` (outermost first) and `pad` extra elements per storage axis: any
// non-aliasing stride pattern. Elements outside the view hold a sentinel.
template <class T>
struct strided_cache {
  std::vector<T> buf;
  tensor3_view<T> view;
};

template <class T>
strided_cache<T> make_strided(std::mt19937& g, std::array<index_t, 3> ext, float sentinel) {
  std::array<std::size_t, 3> perm{0, 1, 2};
  std::shuffle(perm.begin(), perm.end(), g);
  std::array<index_t, 3> stored{};
  for (std::size_t k = 0; k < 3; ++k) stored[k] = ext[perm[k]] + svt::rand_int(g, 0, 2);
  std::array<index_t, 3> sstride{};
  index_t acc = 1;
  for (std::size_t k = 3; k-- > 0;) {
    sstride[k] = acc;
    acc *= stored[k];
  }
  std::array<index_t, 3> stride{};
  for (std::size_t k = 0; k < 3; ++k) stride[perm[k]] = sstride[k];
  strided_cache<T> c;
  c.buf.assign(static_cast<std::size_t>(acc), sparsevlm::from_float<T>(sentinel));
  c.view = tensor3_view<T>(c.buf.data(), ext, stride);
  return c;
}

template <class T>
void property_round(std::mt19937& g, int it) {
  const index_t S = svt::rand_int(g, 0, 3), N = svt::rand_int(g, 1, 8), Tt = svt::rand_int(g, 0, 4);
  const index_t L = S + N + Tt, H = svt::rand_int(g, 1, 4), D = svt::rand_int(g, 1, 4);
  const kv_layout layout = svt::rand_int(g, 0, 1) ? kv_layout::tokens_heads_dim : kv_layout::heads_tokens_dim;
  seq_t keep;
  for (index_t j = 0; j < N; ++j)
    if (svt::rand_int(g, 0, 1)) keep.push_back(S + j);
  const index_t c = svt::rand_int(g, 0, N - static_cast<index_t>(keep.size()));
  const seq_t full = make_sequence(L, {S, N}, keep, c);
  const bool early = svt::rand_int(g, 0, 1) == 1;  // a layer before the step: no recycled rows
  const seq_t seq = early ? kv_sequence(full) : full;
  INFO("it=", it, " L=", L, " H=", H, " D=", D, " c=", c, " early=", early,
       " layout=", static_cast<int>(layout));

  auto cache = make_strided<T>(g, layout_extents(layout, L, H, D), 4096.0f);
  for (index_t t = 0; t < L; ++t)
    for (index_t h = 0; h < H; ++h)
      for (index_t d = 0; d < D; ++d) at(cache.view, layout, t, h, d) = sparsevlm::from_float<T>(code(t, h, d));
  auto rec = make_strided<float>(g, layout_extents(layout, early ? 0 : c, H, D), 0.0f);
  for (index_t r = 0; r < (early ? 0 : c); ++r)
    for (index_t h = 0; h < H; ++h)
      for (index_t d = 0; d < D; ++d) at(rec.view, layout, r, h, d) = rcode(r, h, d);

  // Naive out-of-place gather into a copy of the whole buffer (padding included).
  std::vector<T> expect = cache.buf;
  const tensor3_view<T> ev(expect.data(), cache.view.extents(), cache.view.strides());
  for (std::size_t i = 0; i < seq.size(); ++i)
    for (index_t h = 0; h < H; ++h)
      for (index_t d = 0; d < D; ++d)
        at(ev, layout, static_cast<index_t>(i), h, d) = sparsevlm::from_float<T>(want(seq[i], h, d));

  const index_t n = early ? compact_kv(seq, cache.view, layout)
                          : compact_kv(seq, cache.view, layout, tensor3_view<const float>(rec.view));
  CHECK(n == static_cast<index_t>(seq.size()));
  CHECK(same_bits(cache.buf, expect));
}

}  // namespace

TEST_CASE("kv: property, in-place compaction equals a naive gather (random plans, layouts, strides)") {
  std::mt19937 g(404);
  for (int it = 0; it < 200; ++it) {
    switch (it % 3) {
      case 0: property_round<float>(g, it); break;
      case 1: property_round<half>(g, it); break;
      default: property_round<bfloat16>(g, it); break;
    }
  }
}

TEST_CASE("kv: integration.md snippet compiles and runs") {
  // Mirrors docs/integration.md, "KV caches after a pruning step".
  const index_t L = 8, heads = 2, head_dim = 4, layers = 4, l = 1;
  std::vector<std::vector<float>> k(static_cast<std::size_t>(layers)), v(k);
  for (auto* caches : {&k, &v})
    for (auto& layer : *caches)
      layer = filled<float>(kv_layout::heads_tokens_dim, L, heads, head_dim, code);
  const seq_t sequence = make_sequence(L, {2, 4}, seq_t{3, 5}, 1);  // {0 1 3 5 -1 6 7}
  const std::vector<seq_t> clusters{{2, 4}};

  // --- snippet: compact the caches of layers 0..l (written before the step) ---
  const std::vector<index_t> kv_seq = sparsevlm::kv_sequence(sequence);
  index_t early_len = 0;
  for (index_t layer = 0; layer <= l; ++layer)
    for (auto* caches : {&k, &v}) {
      tensor3_view<float> cache((*caches)[static_cast<std::size_t>(layer)].data(), {heads, L, head_dim});
      early_len = sparsevlm::compact_kv(kv_seq, cache, kv_layout::heads_tokens_dim);
    }
  // --- end snippet ---
  CHECK(early_len == 6);
  for (index_t layer = 0; layer <= l; ++layer)
    check_compacted(tensor3_view<float>(k[static_cast<std::size_t>(layer)].data(), {heads, L, head_dim}),
                    kv_layout::heads_tokens_dim, kv_seq, L);
  for (index_t layer = l + 1; layer < layers; ++layer)  // later layers: not touched by the step
    CHECK(k[static_cast<std::size_t>(layer)] == filled<float>(kv_layout::heads_tokens_dim, L, heads, head_dim, code));

  // --- snippet: or keep one token count in every layer, with cluster means ---
  std::vector<float> merged(static_cast<std::size_t>(heads * 1 * head_dim));
  auto fresh = filled<float>(kv_layout::heads_tokens_dim, L, heads, head_dim, code);
  tensor3_view<float> cache(fresh.data(), {heads, L, head_dim});
  tensor3_view<float> rec(merged.data(), {heads, static_cast<index_t>(clusters.size()), head_dim});
  sparsevlm::merge_kv(clusters, tensor3_view<const float>(cache), kv_layout::heads_tokens_dim, rec);
  const index_t n = sparsevlm::compact_kv(sequence, cache, kv_layout::heads_tokens_dim,
                                          tensor3_view<const float>(rec));
  // --- end snippet ---
  CHECK(n == 7);
  CHECK(cache(1, 4, 3) == (code(2, 1, 3) + code(4, 1, 3)) / 2.0f);
}

// ------------------------------------------------------------------ paged caches

namespace {

using sparsevlm::compact_paged_kv;
using sparsevlm::page_layout;

// A paged cache of `blocks` pages of `bs` tokens, 2 heads, head_dim 3 (an odd dim: the
// per-head copy), in `layout`, with the request's tokens spread over pages in the
// order `table`; element (token t, h, d) = code(t, h, d), other pages hold 999.
template <class T>
struct paged {
  page_layout layout;
  index_t blocks, bs, heads = 2, dim = 3;
  std::vector<index_t> table;
  std::vector<T> data;

  paged(page_layout l, index_t b, index_t block_size, std::vector<index_t> t)
      : layout(l), blocks(b), bs(block_size), table(std::move(t)),
        data(static_cast<std::size_t>(b * block_size * 2 * 3), sparsevlm::from_float<T>(999.0f)) {
    for (index_t tok = 0; tok < static_cast<index_t>(table.size()) * bs; ++tok)
      for (index_t h = 0; h < heads; ++h)
        for (index_t d = 0; d < dim; ++d) el(tok, h, d) = sparsevlm::from_float<T>(code(tok, h, d));
  }
  sparsevlm::strided_view<T, 4> view() {
    const std::array<index_t, 4> e = layout == page_layout::blocks_tokens_heads_dim
                                         ? std::array<index_t, 4>{blocks, bs, heads, dim}
                                         : std::array<index_t, 4>{blocks, heads, bs, dim};
    return sparsevlm::strided_view<T, 4>(data.data(), e, "cache");
  }
  T& el(index_t tok, index_t h, index_t d) {
    auto v = view();
    const index_t b = table[static_cast<std::size_t>(tok / bs)], s = tok % bs;
    return layout == page_layout::blocks_tokens_heads_dim ? v(b, s, h, d) : v(b, h, s, d);
  }
};

}  // namespace

TEST_CASE_TEMPLATE("kv: compact_paged_kv == compact_kv of the gathered rows, both page layouts",
                   T, float, half, bfloat16) {
  for (page_layout layout : {page_layout::blocks_tokens_heads_dim, page_layout::blocks_heads_tokens_dim}) {
    CAPTURE(static_cast<int>(layout));
    // Tokens 0..11 over pages 5, 1, 3 of 4 tokens (out of 6 pages); 2 recycled rows.
    paged<T> c(layout, 6, 4, {5, 1, 3});
    const std::vector<T> before = c.data;
    const seq_t seq{0, 1, 3, 6, -2, 7, 10, -1, 11};
    std::vector<float> rec(2 * 2 * 3);
    for (index_t r = 0; r < 2; ++r)
      for (index_t h = 0; h < 2; ++h)
        for (index_t d = 0; d < 3; ++d) rec[static_cast<std::size_t>((r * 2 + h) * 3 + d)] = rcode(r, h, d);
    const tensor3_view<const float> rv(rec.data(), {2, 2, 3}, "recycled");
    CHECK(compact_paged_kv(seq, c.view(), layout, c.table, rv) == 9);
    for (index_t i = 0; i < 12; ++i)
      for (index_t h = 0; h < 2; ++h)
        for (index_t d = 0; d < 3; ++d) {
          CAPTURE(i);
          const float w = i < 9 ? want(seq[static_cast<std::size_t>(i)], h, d) : code(i, h, d);
          CHECK(sparsevlm::to_float(c.el(i, h, d)) == w);
        }
    // The pages the request does not hold are untouched.
    for (index_t b : {0, 2, 4}) {
      const std::size_t page = static_cast<std::size_t>(4 * 2 * 3);
      CHECK(std::memcmp(c.data.data() + b * static_cast<index_t>(page),
                        before.data() + b * static_cast<index_t>(page), page * sizeof(T)) == 0);
    }
    // Without recycled rows, the survivors only (kv_sequence): equal to the dense kernel.
    paged<T> c2(layout, 6, 4, {5, 1, 3});
    const seq_t kept = kv_sequence(std::span<const index_t>(seq));
    CHECK(compact_paged_kv(std::span<const index_t>(kept), c2.view(), layout, c2.table) == 7);
    std::vector<T> dense(12 * 2 * 3);
    const tensor3_view<T> dv(dense.data(), {12, 2, 3}, "dense");
    for (index_t t = 0; t < 12; ++t)
      for (index_t h = 0; h < 2; ++h)
        for (index_t d = 0; d < 3; ++d) dv(t, h, d) = sparsevlm::from_float<T>(code(t, h, d));
    compact_kv(std::span<const index_t>(kept), dv, kv_layout::tokens_heads_dim);
    for (index_t t = 0; t < 12; ++t)
      for (index_t h = 0; h < 2; ++h)
        for (index_t d = 0; d < 3; ++d)
          CHECK(sparsevlm::to_float(c2.el(t, h, d)) == sparsevlm::to_float(dv(t, h, d)));
  }
}

TEST_CASE("kv: compact_paged_kv refuses bad input and changes nothing") {
  const page_layout L = page_layout::blocks_heads_tokens_dim;
  paged<float> c(L, 4, 4, {2, 0});
  const std::vector<float> before = c.data;
  const auto v = c.view();
  // A source below its index (not an in-place compaction), a recycled entry without rows.
  SV_CHECK_THROWS(errc::invalid_argument, "sequence[1]", compact_paged_kv(seq_t{1, 0}, v, L, c.table));
  SV_CHECK_THROWS(errc::invalid_argument, "sequence[0]", compact_paged_kv(seq_t{-1}, v, L, c.table));
  // Token 8 is past the two pages of the table.
  SV_CHECK_THROWS(errc::shape_mismatch, "block_table.size()",
                  compact_paged_kv(seq_t{0, 8}, v, L, c.table));
  // A page id outside the cache.
  SV_CHECK_THROWS(errc::invalid_argument, "block_table[1]",
                  compact_paged_kv(seq_t{0, 5}, v, L, seq_t{2, 4}));
  SV_CHECK_THROWS(errc::invalid_argument, "layout",
                  compact_paged_kv(seq_t{0}, v, static_cast<page_layout>(7), c.table));
  // Recycled rows with other heads than the cache.
  std::vector<float> rec(3 * 3);
  SV_CHECK_THROWS(errc::shape_mismatch, "recycled.extent[1] (heads)",
                  compact_paged_kv(seq_t{0, -1}, v, L, c.table,
                                   tensor3_view<const float>(rec.data(), {1, 3, 3}, "recycled")));
  CHECK(c.data == before);
}
