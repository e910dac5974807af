// Stage 6: keep set and the ranked order of the pruned tokens.
#include <algorithm>
#include <set>
#include <vector>

#include "test_util.hpp"

using sparsevlm::errc;
using sparsevlm::index_t;
using sparsevlm::select_keep;

TEST_CASE("keep_set: hand examples") {
  // Scores by relative index: 0:0.1 1:0.5 2:0.3 3:0.5 4:0.2; S = 10.
  const std::vector<float> s{0.1f, 0.5f, 0.3f, 0.5f, 0.2f};
  CHECK(select_keep(s, 10, 2) == std::vector<index_t>{11, 13});      // the two 0.5s
  CHECK(select_keep(s, 10, 3) == std::vector<index_t>{11, 12, 13});  // + 0.3
  CHECK(select_keep(s, 10, 1) == std::vector<index_t>{11});          // tie 1 vs 3 -> lower
  CHECK(select_keep(s, 10, 0).empty());
  CHECK(select_keep(s, 10, 5) == std::vector<index_t>{10, 11, 12, 13, 14});
  CHECK(select_keep(s, 0, 4) == std::vector<index_t>{1, 2, 3, 4});  // drops 0.1 at 0
}

TEST_CASE("keep_set: ties toward the lower position") {
  const std::vector<float> eq(6, 0.25f);
  CHECK(select_keep(eq, 3, 2) == std::vector<index_t>{3, 4});
  CHECK(select_keep(eq, 3, 5) == std::vector<index_t>{3, 4, 5, 6, 7});
  // -0.0 == +0.0: a tie, so the lower position wins whichever sign it has.
  CHECK(select_keep(std::vector<float>{0.0f, -0.0f}, 0, 1) == std::vector<index_t>{0});
  CHECK(select_keep(std::vector<float>{-0.0f, 0.0f}, 0, 1) == std::vector<index_t>{0});
  // Negative scores order normally.
  CHECK(select_keep(std::vector<float>{-3.0f, -1.0f, -2.0f}, 0, 1) == std::vector<index_t>{1});
}

TEST_CASE("keep_set: pruned order for recycling") {
  // 0:0.1 1:0.5 2:0.3 3:0.5 4:0.2 5:0.3; keep 1 -> {1} (tie with 3 goes to 1).
  // Pruned ranked: 3 (0.5), 2 (0.3), 5 (0.3, tie -> after 2), 4 (0.2), 0 (0.1).
  const std::vector<float> s{0.1f, 0.5f, 0.3f, 0.5f, 0.2f, 0.3f};
  sparsevlm::workspace ws;
  std::vector<index_t> kept, pruned;
  select_keep(s, 100, 1, 3, kept, pruned, ws);
  CHECK(kept == std::vector<index_t>{101});
  REQUIRE(pruned.size() == 5);
  CHECK(std::vector<index_t>(pruned.begin(), pruned.begin() + 3) == std::vector<index_t>{3, 2, 5});
  CHECK(std::set<index_t>(pruned.begin() + 3, pruned.end()) == std::set<index_t>{0, 4});
  // All of them ranked.
  select_keep(s, 100, 1, 5, kept, pruned, ws);
  CHECK(pruned == std::vector<index_t>{3, 2, 5, 4, 0});
  // Nothing kept, everything ranked.
  select_keep(s, 0, 0, 6, kept, pruned, ws);
  CHECK(kept.empty());
  CHECK(pruned == std::vector<index_t>{1, 3, 2, 5, 4, 0});
  // Everything kept: nothing pruned.
  select_keep(s, 0, 6, 0, kept, pruned, ws);
  CHECK(kept.size() == 6);
  CHECK(pruned.empty());
}

TEST_CASE("keep_set: malformed input") {
  const std::vector<float> s{0.1f, 0.5f, 0.3f};
  sparsevlm::workspace ws;
  std::vector<index_t> kept{42}, pruned{43};
  SV_CHECK_THROWS(errc::invalid_argument, "keep", select_keep(s, 0, 4));
  SV_CHECK_THROWS(errc::invalid_argument, "keep", select_keep(s, 0, -1));
  SV_CHECK_THROWS(errc::invalid_argument, "top_pruned", select_keep(s, 0, 1, 3, kept, pruned, ws));
  SV_CHECK_THROWS(errc::invalid_argument, "top_pruned", select_keep(s, 0, 1, -1, kept, pruned, ws));
  const std::vector<float> bad{0.1f, 0.5f, svt::kNaNf};
  SV_CHECK_THROWS(errc::non_finite, "scores[2]", select_keep(bad, 0, 1, 0, kept, pruned, ws));
  const std::vector<float> inf{svt::kInff, 0.5f};
  SV_CHECK_THROWS(errc::non_finite, "scores[0]", select_keep(inf, 0, 1));
  // Outputs untouched on error.
  CHECK(kept == std::vector<index_t>{42});
  CHECK(pruned == std::vector<index_t>{43});
}

TEST_CASE("keep_set: property, top-k by (score desc, position asc)") {
  std::mt19937 g(31337);
  sparsevlm::workspace ws;
  for (int it = 0; it < 80; ++it) {
    const index_t N = svt::rand_int(g, 1, 30), S = svt::rand_int(g, 0, 5);
    // Few distinct values, so ties are everywhere.
    const auto s = svt::random_grid(g, static_cast<std::size_t>(N), 0, it % 2 ? 3 : 1000, 4.0f);
    const index_t keep = svt::rand_int(g, 0, N);
    const index_t top = svt::rand_int(g, 0, N - keep);
    INFO("it=", it, " N=", N, " keep=", keep, " top=", top);
    std::vector<index_t> kept, pruned;
    select_keep(s, S, keep, top, kept, pruned, ws);
    const auto order = svt::ranked(s);  // stable sort: ties keep the lower index first
    std::vector<index_t> want(order.begin(), order.begin() + keep);
    for (index_t& w : want) w += S;
    std::sort(want.begin(), want.end());
    CHECK(kept == want);
    CHECK(std::is_sorted(kept.begin(), kept.end()));
    CHECK(std::adjacent_find(kept.begin(), kept.end()) == kept.end());
    for (index_t k : kept) CHECK((k >= S && k < S + N));
    REQUIRE(pruned.size() == static_cast<std::size_t>(N - keep));
    CHECK(std::vector<index_t>(pruned.begin(), pruned.begin() + top) ==
          std::vector<index_t>(order.begin() + keep, order.begin() + keep + top));
    // kept and pruned partition 0..N-1.
    std::vector<index_t> all(pruned);
    for (index_t k : kept) all.push_back(k - S);
    std::sort(all.begin(), all.end());
    for (index_t j = 0; j < N; ++j) CHECK(all[static_cast<std::size_t>(j)] == j);
    // The convenience form agrees.
    CHECK(select_keep(s, S, keep) == kept);
  }
}
