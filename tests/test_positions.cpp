// Position ids after a pruning step (positions.hpp).
#include <algorithm>
#include <vector>

#include "test_util.hpp"

using sparsevlm::errc;
using sparsevlm::index_t;
using sparsevlm::make_sequence;
using sparsevlm::matrix_view;
using sparsevlm::next_position;
using sparsevlm::position_policy;
using sparsevlm::pruned_positions;

using seq_t = std::vector<index_t>;
using clusters_t = std::vector<seq_t>;

namespace {

constexpr auto renumber = position_policy::renumber;
constexpr auto keep_original = position_policy::keep_original;

seq_t iota(index_t n, index_t from = 0) {
  seq_t v(static_cast<std::size_t>(n));
  for (index_t i = 0; i < n; ++i) v[static_cast<std::size_t>(i)] = from + i;
  return v;
}

// Qwen2-VL-style mRoPE ids, rows t/h/w, for: 2 prefix text tokens, a 1×2×3
// image (t = 2; h = 2 + row; w = 2 + col), then `text` text tokens starting at
// max + 1 = 5 in every row. Returned row-major [3, L].
seq_t mrope_ids(index_t text) {
  const index_t L = 2 + 6 + text;
  seq_t ids(static_cast<std::size_t>(3 * L));
  auto put = [&](index_t r, index_t p, index_t v) { ids[static_cast<std::size_t>(r * L + p)] = v; };
  for (index_t p = 0; p < 2; ++p)
    for (index_t r = 0; r < 3; ++r) put(r, p, p);
  for (index_t j = 0; j < 6; ++j) {
    put(0, 2 + j, 2);
    put(1, 2 + j, 2 + j / 3);
    put(2, 2 + j, 2 + j % 3);
  }
  for (index_t t = 0; t < text; ++t)
    for (index_t r = 0; r < 3; ++r) put(r, 8 + t, 5 + t);
  return ids;
}

}  // namespace

TEST_CASE("positions: one row, both policies") {
  // L = 10, visual [2, 8), keep {3, 6}; pruned {2, 4, 5, 7}, of which {2, 5, 7}
  // recycled into one cluster (4 dropped). Sequence {0 1 3 6 -1 8 9}, n = 7.
  // Original ids 100 + p (e.g. a cached system prompt of 100 tokens before them).
  const seq_t seq = make_sequence(10, {2, 6}, seq_t{3, 6}, 1);
  REQUIRE(seq == seq_t{0, 1, 3, 6, -1, 8, 9});
  const clusters_t clusters{{2, 5, 7}};
  const seq_t pos = iota(10, 100);
  // renumber: 0..6.
  CHECK(pruned_positions(seq, clusters, pos, renumber) == iota(7));
  // keep_original: kept tokens keep 100 + p; the recycled token takes its first
  // member's id, 102 (so it reads as the image's first pruned cell, not a new one).
  CHECK(pruned_positions(seq, clusters, pos, keep_original) == seq_t{100, 101, 103, 106, 102, 108, 109});
  // Decoding continues at n (renumber) or at 1 + the largest original id (keep_original).
  CHECK(next_position(pos, 7, renumber) == 7);
  CHECK(next_position(pos, 7, keep_original) == 110);
  // Cluster order, not member order, decides which recycled slot gets which id.
  const seq_t seq2 = make_sequence(10, {2, 6}, seq_t{3}, 2);
  REQUIRE(seq2 == seq_t{0, 1, 3, -1, -2, 8, 9});
  CHECK(pruned_positions(seq2, clusters_t{{5, 7}, {2, 4}}, iota(10), keep_original) ==
        seq_t{0, 1, 3, 5, 2, 8, 9});
  CHECK(pruned_positions(seq2, clusters_t{{5, 7}, {2, 4}}, iota(10), renumber) == iota(7));
}

TEST_CASE("positions: mRoPE (3 rows) with both policies") {
  // ids (t, h, w) per token: prefix (0,0,0) (1,1,1); image r0: (2,2,2) (2,2,3) (2,2,4),
  // r1: (2,3,2) (2,3,3) (2,3,4) at positions 2..7; text (5,5,5) (6,6,6) at 8, 9.
  const seq_t ids = mrope_ids(2);
  const index_t L = 10;
  const matrix_view<const index_t> pv(ids.data(), {3, L});
  // keep {3} (cell r0c1), one cluster {4, 6} (cells r0c2, r1c1): sequence {0 1 3 -1 8 9}.
  const seq_t seq = make_sequence(L, {2, 6}, seq_t{3}, 1);
  REQUIRE(seq == seq_t{0, 1, 3, -1, 8, 9});
  const clusters_t clusters{{4, 6}};
  seq_t out(3 * 6, -1);
  const matrix_view<index_t> ov(out.data(), {3, 6});
  pruned_positions(seq, clusters, pv, keep_original, ov);
  // The recycled token is cell r0c2 in all three rows: (2, 2, 4), not a per-row mix.
  CHECK(out == seq_t{0, 1, 2, 2, 5, 6,    // t
                     0, 1, 2, 2, 5, 6,    // h
                     0, 1, 3, 4, 5, 6});  // w
  pruned_positions(seq, clusters, pv, renumber, ov);
  CHECK(out == seq_t{0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5});
  CHECK(next_position(pv, 6, renumber) == 6);
  CHECK(next_position(pv, 6, keep_original) == 7);  // Qwen2-VL: max (6) + 1, every row

  // No text after the image: per-row maxima would be t 2, h 3, w 4; the unpruned
  // model continues at max over all rows + 1 = 5 in every row.
  const seq_t img_last = mrope_ids(0);
  const matrix_view<const index_t> iv(img_last.data(), {3, 8});
  CHECK(next_position(iv, 5, keep_original) == 5);
  CHECK(next_position(iv, 5, renumber) == 5);
  CHECK(next_position(iv, 3, renumber) == 3);
}

TEST_CASE("positions: strided ids (HF's [3, batch, L] layout, column-major)") {
  // Two batch items in a [3, 2, L] buffer; item 1 is the [3, L] view at offset L
  // with strides (2L, 1). Item 1's ids are mrope_ids(2) + 1000.
  const index_t L = 10;
  const seq_t base = mrope_ids(2);
  seq_t buf(static_cast<std::size_t>(3 * 2 * L), -7);
  for (index_t r = 0; r < 3; ++r)
    for (index_t p = 0; p < L; ++p)
      buf[static_cast<std::size_t>((r * 2 + 1) * L + p)] = base[static_cast<std::size_t>(r * L + p)] + 1000;
  const matrix_view<const index_t> item1(buf.data() + L, {3, L}, {2 * L, 1});
  const seq_t seq{0, 1, 3, -1, 8, 9};
  // Output column-major: [3, 6] with strides (1, 3).
  seq_t out(18, -1);
  pruned_positions(seq, clusters_t{{4, 6}}, item1, keep_original,
                   matrix_view<index_t>(out.data(), {3, 6}, {1, 3}));
  const seq_t t_row{1000, 1001, 1002, 1002, 1005, 1006}, w_row{1000, 1001, 1003, 1004, 1005, 1006};
  for (index_t i = 0; i < 6; ++i) {
    CHECK(out[static_cast<std::size_t>(i * 3 + 0)] == t_row[static_cast<std::size_t>(i)]);
    CHECK(out[static_cast<std::size_t>(i * 3 + 1)] == t_row[static_cast<std::size_t>(i)]);
    CHECK(out[static_cast<std::size_t>(i * 3 + 2)] == w_row[static_cast<std::size_t>(i)]);
  }
  CHECK(next_position(item1, 6, keep_original) == 1007);
}

TEST_CASE("positions: two steps chained") {
  // Step 1 on L = 10 (visual [2, 8)): keep {3, 6}, cluster {2, 5, 7}: {0 1 3 6 -1 8 9}.
  // Step 2 on that 7-token sequence (visual [2, 5) = old 3, 6, recycled): keep
  // its position 3 (old 6), recycle {2, 4} (old 3 and the step-1 recycled token):
  // sequence {0 1 3 -1 5 6}.
  const seq_t ids0 = iota(10);
  const seq_t s1 = make_sequence(10, {2, 6}, seq_t{3, 6}, 1);
  const seq_t ids1 = pruned_positions(s1, clusters_t{{2, 5, 7}}, ids0, keep_original);
  REQUIRE(ids1 == seq_t{0, 1, 3, 6, 2, 8, 9});
  const seq_t s2 = make_sequence(7, {2, 3}, seq_t{3}, 1);
  REQUIRE(s2 == seq_t{0, 1, 3, -1, 5, 6});
  const seq_t ids2 = pruned_positions(s2, clusters_t{{2, 4}}, ids1, keep_original);
  CHECK(ids2 == seq_t{0, 1, 6, 3, 8, 9});  // recycled: step-2 member 2 held old id 3
  CHECK(next_position(ids0, 6, keep_original) == 10);
  CHECK(next_position(ids1, 6, keep_original) == 10);
  CHECK(pruned_positions(s2, clusters_t{{2, 4}}, ids1, renumber) == iota(6));
}

TEST_CASE("positions: zero-size inputs") {
  // No rows: nothing to write, entries still checked against L.
  pruned_positions(seq_t{0, 1}, clusters_t{}, matrix_view<const index_t>(nullptr, {0, 3}), keep_original,
                   matrix_view<index_t>(nullptr, {0, 2}));
  SV_CHECK_THROWS(errc::invalid_argument, "sequence[1]",
                  pruned_positions(seq_t{0, 3}, clusters_t{}, matrix_view<const index_t>(nullptr, {0, 3}),
                                   keep_original, matrix_view<index_t>(nullptr, {0, 2})));
  // Empty sequence.
  CHECK(pruned_positions(seq_t{}, clusters_t{}, iota(4), keep_original).empty());
  CHECK(next_position(seq_t{}, 0, keep_original) == 0);
  CHECK(next_position(seq_t{}, 0, renumber) == 0);
  CHECK(next_position(matrix_view<const index_t>(nullptr, {0, 5}), 3, keep_original) == 0);
}

TEST_CASE("positions: malformed input is refused and leaves out untouched") {
  const seq_t pos = iota(10);
  const matrix_view<const index_t> pv(pos.data(), {1, 10});
  const seq_t seq{0, 1, 3, 6, -1, 8, 9};
  const clusters_t clusters{{2, 5, 7}};
  seq_t out(7, -3);
  const matrix_view<index_t> ov(out.data(), {1, 7});
  for (position_policy policy : {renumber, keep_original}) {
    SV_CHECK_THROWS(errc::shape_mismatch, "out",
                    pruned_positions(seq, clusters, pv, policy, matrix_view<index_t>(out.data(), {1, 6})));
    SV_CHECK_THROWS(errc::shape_mismatch, "out",
                    pruned_positions(seq, clusters, pv, policy, matrix_view<index_t>(out.data(), {7, 1})));
    SV_CHECK_THROWS(errc::invalid_argument, "sequence[2]",
                    pruned_positions(seq_t{0, 1, 10}, clusters, pv, policy,
                                     matrix_view<index_t>(out.data(), {1, 3})));
    SV_CHECK_THROWS(errc::invalid_argument, "sequence[4]",
                    pruned_positions(seq_t{0, 1, 3, 6, -2, 8, 9}, clusters, pv, policy, ov));
    SV_CHECK_THROWS(errc::invalid_argument, "sequence[4]", pruned_positions(seq, clusters_t{}, pv, policy, ov));
    SV_CHECK_THROWS(errc::invalid_argument, "clusters[0]", pruned_positions(seq, clusters_t{{}}, pv, policy, ov));
    SV_CHECK_THROWS(errc::invalid_argument, "clusters[0][1]",
                    pruned_positions(seq, clusters_t{{2, 10}}, pv, policy, ov));
    SV_CHECK_THROWS(errc::invalid_argument, "clusters[0][0]",
                    pruned_positions(seq, clusters_t{{-1}}, pv, policy, ov));
  }
  SV_CHECK_THROWS(errc::invalid_argument, "policy",
                  pruned_positions(seq, clusters, pv, static_cast<position_policy>(5), ov));
  CHECK(std::all_of(out.begin(), out.end(), [](index_t v) { return v == -3; }));
  // In place (out over the ids) is refused: recycled ids are read from rows an
  // in-place pass would already have overwritten.
  seq_t inplace = iota(10);
  SV_CHECK_THROWS(errc::invalid_argument, "out",
                  pruned_positions(seq, clusters, matrix_view<const index_t>(inplace.data(), {1, 10}),
                                   keep_original, matrix_view<index_t>(inplace.data(), {1, 7})));
  CHECK(inplace == iota(10));

  SV_CHECK_THROWS(errc::invalid_argument, "new_length", next_position(pos, 11, renumber));
  SV_CHECK_THROWS(errc::invalid_argument, "new_length", next_position(pos, -1, keep_original));
  SV_CHECK_THROWS(errc::invalid_argument, "policy", next_position(pos, 3, static_cast<position_policy>(9)));
  const seq_t huge{0, std::numeric_limits<index_t>::max()};
  SV_CHECK_THROWS(errc::invalid_argument, "positions", next_position(huge, 2, keep_original));
  CHECK(next_position(huge, 2, renumber) == 2);
}

TEST_CASE("positions: property, both policies equal a naive reference over random plans") {
  std::mt19937 g(77);
  for (int it = 0; it < 200; ++it) {
    const index_t S = svt::rand_int(g, 0, 3), N = svt::rand_int(g, 1, 10), T = svt::rand_int(g, 0, 4);
    const index_t L = S + N + T, rows = svt::rand_int(g, 1, 3);
    seq_t keep, pruned;
    for (index_t j = 0; j < N; ++j) (svt::rand_int(g, 0, 1) ? keep : pruned).push_back(S + j);
    // Random clusters over a random subset of the pruned tokens, members ascending.
    std::shuffle(pruned.begin(), pruned.end(), g);
    const index_t s = svt::rand_int(g, 0, static_cast<index_t>(pruned.size()));
    const index_t c = s == 0 ? 0 : svt::rand_int(g, 1, s);
    clusters_t clusters(static_cast<std::size_t>(c));
    for (index_t i = 0; i < s; ++i)
      clusters[static_cast<std::size_t>(i < c ? i : svt::rand_int(g, 0, c - 1))].push_back(
          pruned[static_cast<std::size_t>(i)]);
    for (auto& m : clusters) std::sort(m.begin(), m.end());
    const seq_t seq = make_sequence(L, {S, N}, keep, c);
    const index_t n = static_cast<index_t>(seq.size());
    seq_t ids(static_cast<std::size_t>(rows * L));
    for (auto& v : ids) v = svt::rand_int(g, 0, 1000);
    INFO("it=", it, " L=", L, " rows=", rows, " c=", c);
    const matrix_view<const index_t> pv(ids.data(), {rows, L});
    for (position_policy policy : {renumber, keep_original}) {
      seq_t out(static_cast<std::size_t>(rows * n), -1);
      pruned_positions(seq, clusters, pv, policy, matrix_view<index_t>(out.data(), {rows, n}));
      for (index_t r = 0; r < rows; ++r)
        for (index_t i = 0; i < n; ++i) {
          const index_t p = seq[static_cast<std::size_t>(i)];
          const index_t src = p >= 0 ? p : clusters[static_cast<std::size_t>(-p - 1)][0];
          const index_t expect = policy == renumber ? i : ids[static_cast<std::size_t>(r * L + src)];
          CHECK(out[static_cast<std::size_t>(r * n + i)] == expect);
        }
      const index_t mx = *std::max_element(ids.begin(), ids.end());
      CHECK(next_position(pv, n, policy) == (policy == renumber ? n : mx + 1));
    }
  }
}

TEST_CASE("positions: integration.md snippet compiles and runs") {
  // Mirrors docs/integration.md, "Position ids": 1-D ids 0..L-1, one step.
  const index_t L = 10;
  const seq_t ids = iota(L);
  sparsevlm::step_result r;
  r.sequence = make_sequence(L, {2, 6}, seq_t{3, 6}, 1);
  r.recycled.clusters = {{2, 5, 7}};

  // --- snippet ---
  const auto policy = sparsevlm::position_policy::keep_original;
  std::vector<index_t> later = sparsevlm::pruned_positions(r.sequence, r.recycled.clusters, ids, policy);
  const index_t n = static_cast<index_t>(r.sequence.size());
  const index_t decode_later = sparsevlm::next_position(ids, n, policy);  // layers > l
  // Layers <= l were written with `ids` whatever the policy: 1 + their largest id.
  const index_t decode_early = sparsevlm::next_position(ids, L, sparsevlm::position_policy::keep_original);
  // --- end snippet ---
  CHECK(later == seq_t{0, 1, 3, 6, 2, 8, 9});
  CHECK(decode_later == 10);
  CHECK(decode_early == 10);
}
