// Plan before the forward (budget.hpp): token counts per layer, the two
// equivalent-token figures, FLOPs, and the upper bounds of rank presets.
#include <algorithm>
#include <random>
#include <vector>

#include <sparsevlm/budget.hpp>

#include "test_util.hpp"

using sparsevlm::budget_plan;
using sparsevlm::errc;
using sparsevlm::index_t;
using sparsevlm::keep_policy;
using sparsevlm::model_shape;
using sparsevlm::plan_budget;
using sparsevlm::preset;
using sparsevlm::pruning_count;

namespace {

/// `count` copies of `v` appended to `out`.
void repeat(std::vector<index_t>& out, index_t v, int count) { out.insert(out.end(), count, v); }

bool same(const pruning_count& a, const pruning_count& b) {
  return a.layer == b.layer && a.visual_in == b.visual_in && a.keep == b.keep &&
         a.recycled == b.recycled && a.visual_out == b.visual_out;
}

const model_shape& llava7b() { return sparsevlm::find_model("llava-1.5-7b"); }

}  // namespace

TEST_CASE("budget: v1.5-192 on llava-1.5-7b") {
  const budget_plan b = plan_budget(llava7b(), sparsevlm::find_preset("v1.5-192"), 60);
  // Layer 2's output, N = 576: keep 300, n = 276 pruned, s = floor(0.3·276) + 1 = 83
  //   recycled tokens in c = floor(83/10) + 1 = 9 clusters: 309 visual tokens.
  // Layer 6's output, N = 309: keep 200, n = 109, s = floor(32.7) + 1 = 33, c = 4: 204.
  // Layer 15's output, N = 204: keep 110, n = 94, s = floor(28.2) + 1 = 29, c = 3: 113.
  std::vector<index_t> in;
  repeat(in, 576, 3);   // layers 0-2
  repeat(in, 309, 4);   // layers 3-6
  repeat(in, 204, 9);   // layers 7-15
  repeat(in, 113, 16);  // layers 16-31
  CHECK(b.visual_tokens_per_layer == in);
  std::vector<index_t> out;
  repeat(out, 576, 2);   // layers 0-1
  repeat(out, 309, 4);   // layers 2-5
  repeat(out, 204, 9);   // layers 6-14
  repeat(out, 113, 17);  // layers 15-31
  CHECK(b.visual_tokens_out_per_layer == out);
  REQUIRE(b.pruning.size() == 3);
  CHECK(same(b.pruning[0], {2, 576, 300, 9, 309}));
  CHECK(same(b.pruning[1], {6, 309, 200, 4, 204}));
  CHECK(same(b.pruning[2], {15, 204, 110, 3, 113}));
  CHECK(b.exact);
  // (3·576 + 4·309 + 9·204 + 16·113) / 32 = 6608 / 32
  CHECK(b.equivalent_tokens == 206.5);
  // (2·576 + 4·309 + 9·204 + 17·113) / 32 = 6145 / 32: the 192.03125 that the
  // authors' code logs ("equal token num") for this preset.
  CHECK(b.authors_equivalent_tokens == 192.03125);
  CHECK(b.prefix == 35);
  CHECK(b.visual == 576);
  CHECK(b.text == 60);
  // FLOPs: n = 35 + v + 60 per layer, d = 4096, m = 11008.
  const auto f = [](double n) {
    const double d = 4096, m = 11008;
    return 4 * n * d * d + 2 * n * n * d + 3 * n * d * m;
  };
  CHECK(b.flops.dense == doctest::Approx(32 * f(671)).epsilon(1e-15));
  CHECK(b.flops.pruned ==
        doctest::Approx(3 * f(671) + 4 * f(404) + 9 * f(299) + 16 * f(208)).epsilon(1e-15));
}

TEST_CASE("budget: plus-128 and plus-192, no recycling") {
  const budget_plan b = plan_budget(llava7b(), sparsevlm::find_preset("plus-128"), 60);
  std::vector<index_t> in;
  repeat(in, 576, 3);
  repeat(in, 238, 4);
  repeat(in, 108, 9);
  repeat(in, 60, 16);
  CHECK(b.visual_tokens_per_layer == in);
  REQUIRE(b.pruning.size() == 3);
  CHECK(same(b.pruning[0], {2, 576, 238, 0, 238}));
  CHECK(same(b.pruning[1], {6, 238, 108, 0, 108}));
  CHECK(same(b.pruning[2], {15, 108, 60, 0, 60}));
  CHECK(b.exact);
  // (3·576 + 4·238 + 9·108 + 16·60) / 32 = 4612 / 32
  CHECK(b.equivalent_tokens == 144.125);
  // (2·576 + 4·238 + 9·108 + 17·60) / 32 = 4096 / 32: the name's 128.
  CHECK(b.authors_equivalent_tokens == 128.0);
  // (2·576 + 4·300 + 9·200 + 17·118) / 32 = 6158 / 32
  CHECK(plan_budget(llava7b(), sparsevlm::find_preset("plus-192"), 60).authors_equivalent_tokens ==
        192.4375);
}

TEST_CASE("budget: video is an upper bound") {
  const budget_plan b =
      plan_budget(sparsevlm::find_model("video-llava-7b"), sparsevlm::find_preset("video"), 60);
  // Layer 1's output, N = 2048, keep = rank <= min(T, N - 1) = 60.
  //   keep 60: n = 1988, s = floor(596.4) + 1 = 597, c = floor(59.7) + 1 = 60 -> 120;
  //   keep 0 (rank 0) recycles the most: n = 2048, s = 615, c = 62 -> 62.
  CHECK_FALSE(b.exact);
  REQUIRE(b.pruning.size() == 1);
  CHECK(same(b.pruning[0], {1, 2048, 60, 62, 120}));
  std::vector<index_t> in;
  repeat(in, 2048, 2);
  repeat(in, 120, 30);
  CHECK(b.visual_tokens_per_layer == in);
  CHECK(b.equivalent_tokens == 240.5);          // (2·2048 + 30·120) / 32
  CHECK(b.authors_equivalent_tokens == 180.25);  // (2048 + 31·120) / 32
}

TEST_CASE("budget: v1 upper bounds") {
  SUBCASE("v1-128, 10 text tokens") {
    const budget_plan b = plan_budget(llava7b(), sparsevlm::find_preset("v1-128"), 10);
    CHECK_FALSE(b.exact);
    REQUIRE(b.pruning.size() == 4);
    // Layer 2, N = 576 exactly: keep <= floor(10·9 + 6) = 96, n = 480, s = 145,
    //   c = 15 -> 111. Rank 0 keeps floor(6) = 6 and recycles the most: n = 570,
    //   s = 172, c = 18.
    CHECK(same(b.pruning[0], {2, 576, 96, 18, 111}));
    // Layer 6, N <= 111: keep <= 96, n = 15, s = 5, c = 1 -> 97; rank 0: 6 kept,
    //   n = 105, s = 32, c = 4.
    CHECK(same(b.pruning[1], {6, 111, 96, 4, 97}));
    // Layer 15, N <= 97: keep <= 96, n = 1, c = 1 -> 97; rank 0: n = 91, s = 28, c = 3.
    CHECK(same(b.pruning[2], {15, 97, 96, 3, 97}));
    CHECK(same(b.pruning[3], {19, 97, 96, 3, 97}));
    std::vector<index_t> in;
    repeat(in, 576, 3);
    repeat(in, 111, 4);
    repeat(in, 97, 25);
    CHECK(b.visual_tokens_per_layer == in);
    CHECK(b.equivalent_tokens == 143.65625);  // (1728 + 444 + 2425) / 32
  }
  SUBCASE("v1-192, 60 text tokens: 60·13.5 > 575, so nothing is bounded below N") {
    const budget_plan b = plan_budget(llava7b(), sparsevlm::find_preset("v1-192"), 60);
    CHECK_FALSE(b.exact);
    CHECK(b.visual_tokens_per_layer == std::vector<index_t>(32, 576));
    CHECK(same(b.pruning[0], {2, 576, 575, 18, 576}));
    CHECK(b.equivalent_tokens == 576.0);
    CHECK(b.flops.pruned == b.flops.dense);
  }
  SUBCASE("v1-64, 60 text tokens: a step on at most T tokens may keep them all") {
    const budget_plan b = plan_budget(llava7b(), sparsevlm::find_preset("v1-64"), 60);
    // Layer 2: keep <= floor(60·0.8) = 48, n = 528, s = 159, c = 16 -> 64.
    CHECK(same(b.pruning[0], {2, 576, 48, 18, 64}));
    // Layer 6, N <= 64: keep <= 48 -> 49 out; but N may be <= 60 = T, and then
    // rank == N keeps all N: keep <= 60, out <= 60... and 60 > 49.
    CHECK(same(b.pruning[1], {6, 64, 60, 3, 60}));
    // Layer 15, N <= 60 = T: rank == N is possible, all kept.
    CHECK(same(b.pruning[2], {15, 60, 60, 2, 60}));
    CHECK(same(b.pruning[3], {19, 60, 60, 2, 60}));
  }
}

TEST_CASE("budget: the rank bounds hold for every rank the forward can find") {
  // Simulates forwards with random ranks in [0, min(T, N)] at every pruning layer,
  // through the library's own keep_count, and checks every count against the plan.
  std::mt19937 g(7);
  for (const char* name : {"v1-192", "v1-128", "v1-64", "video"}) {
    const preset& p = sparsevlm::find_preset(name);
    const model_shape& m = sparsevlm::find_model(p.model);
    for (index_t text : {1, 2, 5, 10, 20, 40, 60, 100, 300, 700}) {
      const budget_plan b = plan_budget(m, p, text);
      for (int trial = 0; trial < 200; ++trial) {
        index_t v = m.visual;
        for (std::size_t i = 0; i < p.schedule.size(); ++i) {
          // Extremes are likelier to break a bound: draw them half of the time.
          const index_t hi = std::min(text, v);
          const int pick = static_cast<int>(svt::rand_int(g, 0, 3));
          const index_t rank = pick == 0 ? 0 : pick == 1 ? hi : svt::rand_int(g, 0, hi);
          const index_t keep = sparsevlm::keep_count(p.schedule[i].policy, rank, v, text);
          const index_t rec = keep < v ? sparsevlm::detail::core::cluster_count(
                                             sparsevlm::detail::core::recycle_count(v - keep, 0.3), 10.0)
                                       : 0;
          CAPTURE(name);
          CAPTURE(text);
          CAPTURE(i);
          CHECK(v <= b.pruning[i].visual_in);
          CHECK(keep <= b.pruning[i].keep);
          CHECK(rec <= b.pruning[i].recycled);
          CHECK(keep + rec <= b.pruning[i].visual_out);
          v = keep + rec;
        }
      }
    }
  }
}

TEST_CASE("budget: FLOPs on a tiny shape by hand") {
  // 3 layers, d = 2, m = 3, prefix 1, N = 4, T = 2; prune after layer 0 to 1 token.
  // Per layer 4nd² + 2n²d + 3ndm = 16n + 4n² + 18n = 34n + 4n².
  //   n = 1 + 4 + 2 = 7: 238 + 196 = 434.   n = 1 + 1 + 2 = 4: 136 + 64 = 200.
  const model_shape m{"tiny", 3, 1, 2, 3, 1, 4};
  preset p;
  p.name = "tiny";
  p.schedule = {{0, keep_policy::fixed(1)}};
  p.recycle.enabled = false;
  budget_plan b = plan_budget(m, p, 2);
  CHECK(b.visual_tokens_per_layer == std::vector<index_t>{4, 1, 1});
  CHECK(b.flops.dense == 3 * 434.0);
  CHECK(b.flops.pruned == 434.0 + 2 * 200.0);
  // With recycling: n = 3 pruned, s = min(3, floor(0.9) + 1) = 1, c = 1: 2 tokens,
  // n = 5 per layer after: 170 + 100 = 270.
  p.recycle.enabled = true;
  b = plan_budget(m, p, 2);
  CHECK(b.visual_tokens_per_layer == std::vector<index_t>{4, 2, 2});
  CHECK(b.flops.pruned == 434.0 + 2 * 270.0);
  // The prefix override moves n by 9: n = 16 dense: 544 + 1024 = 1568.
  b = plan_budget(m, p, 2, std::nullopt, index_t{10});
  CHECK(b.prefix == 10);
  CHECK(b.flops.dense == 3 * 1568.0);
}

TEST_CASE("budget: no text tokens, no raters: nothing is pruned") {
  for (const char* name : {"v1.5-192", "v1-64"}) {
    CAPTURE(name);
    const budget_plan b = plan_budget(llava7b(), sparsevlm::find_preset(name), 0);
    CHECK(b.exact);
    CHECK(b.visual_tokens_per_layer == std::vector<index_t>(32, 576));
    CHECK(b.equivalent_tokens == 576.0);
    CHECK(b.authors_equivalent_tokens == 576.0);
    CHECK(same(b.pruning[0], {2, 576, 576, 0, 576}));
    CHECK(b.flops.pruned == b.flops.dense);
  }
}

TEST_CASE("budget: visual override") {
  // 400 visual tokens: keep 300, n = 100, s = 31, c = 4 -> 304; keep 200, n = 104,
  // s = 32, c = 4 -> 204; then as with 576.
  const budget_plan b =
      plan_budget(llava7b(), sparsevlm::find_preset("v1.5-192"), 60, index_t{400});
  CHECK(b.visual == 400);
  REQUIRE(b.pruning.size() == 3);
  CHECK(same(b.pruning[0], {2, 400, 300, 4, 304}));
  CHECK(same(b.pruning[1], {6, 304, 200, 4, 204}));
  CHECK(same(b.pruning[2], {15, 204, 110, 3, 113}));
}

TEST_CASE("budget: bad input") {
  const preset& p = sparsevlm::find_preset("v1.5-192");
  SV_CHECK_THROWS(errc::invalid_argument, "text_tokens: expected >= 0, got -1",
                  plan_budget(llava7b(), p, -1));
  SV_CHECK_THROWS(errc::invalid_argument, "visual: expected >= 1, got 0",
                  plan_budget(llava7b(), p, 10, index_t{0}));
  SV_CHECK_THROWS(errc::invalid_argument, "prefix: expected >= 0, got -2",
                  plan_budget(llava7b(), p, 10, std::nullopt, index_t{-2}));
  // 300 kept of 250 visual tokens is not what the schedule says.
  SV_CHECK_THROWS(errc::invalid_argument, "preset.schedule[0].policy.keep: expected < 250",
                  plan_budget(llava7b(), p, 10, index_t{250}));
  model_shape shallow = llava7b();
  shallow.layers = 15;
  SV_CHECK_THROWS(errc::invalid_argument, "preset.schedule[2].layer",
                  plan_budget(shallow, p, 10));
  model_shape bad = llava7b();
  bad.mlp = 0;
  SV_CHECK_THROWS(errc::invalid_argument, "model.mlp", plan_budget(bad, p, 10));
}
