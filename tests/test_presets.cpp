// Named presets and model shapes (presets.hpp): the published numbers, the
// derive rule, and the schedule checks.
#include <string>
#include <vector>

#include "test_util.hpp"

using sparsevlm::errc;
using sparsevlm::index_t;
using sparsevlm::keep_policy;
using sparsevlm::layer_schedule;
using sparsevlm::model_shape;
using sparsevlm::position_policy;
using sparsevlm::preset;

namespace {

std::vector<index_t> layers_of(const preset& p) {
  std::vector<index_t> v;
  for (const layer_schedule& s : p.schedule) v.push_back(s.layer);
  return v;
}

std::vector<index_t> keeps_of(const preset& p) {
  std::vector<index_t> v;
  for (const layer_schedule& s : p.schedule) {
    REQUIRE(s.policy.kind == keep_policy::kind_t::fixed);
    v.push_back(s.policy.keep);
  }
  return v;
}

const model_shape& llava7b() { return sparsevlm::find_model("llava-1.5-7b"); }

}  // namespace

TEST_CASE("presets: built-in model shapes") {
  const auto& ms = sparsevlm::known_models();
  REQUIRE(ms.size() == 4);
  const model_shape& m7 = llava7b();
  CHECK(m7.layers == 32);
  CHECK(m7.heads == 32);
  CHECK(m7.hidden == 4096);
  CHECK(m7.mlp == 11008);
  CHECK(m7.prefix == 35);
  CHECK(m7.visual == 576);
  const model_shape& m13 = sparsevlm::find_model("llava-1.5-13b");
  CHECK(m13.layers == 40);
  CHECK(m13.heads == 40);
  CHECK(m13.hidden == 5120);
  CHECK(m13.mlp == 13824);
  CHECK(m13.prefix == 35);
  CHECK(m13.visual == 576);
  const model_shape& next = sparsevlm::find_model("llava-next-7b");
  CHECK(next.layers == 32);
  CHECK(next.hidden == 4096);
  CHECK(next.visual == 2880);
  const model_shape& video = sparsevlm::find_model("video-llava-7b");
  CHECK(video.layers == 32);
  CHECK(video.visual == 2048);  // 8 frames x 256
  for (const model_shape& m : ms) CHECK_NOTHROW(sparsevlm::check_model_shape(m));
}

TEST_CASE("presets: unknown names list the known ones") {
  SV_CHECK_THROWS(errc::invalid_argument, "model: expected one of llava-1.5-7b, llava-1.5-13b",
                  sparsevlm::find_model("llava-2"));
  SV_CHECK_THROWS(errc::invalid_argument, "got 'llava-2'", sparsevlm::find_model("llava-2"));
  SV_CHECK_THROWS(errc::invalid_argument, "preset: expected one of v1-192,",
                  sparsevlm::find_preset("v2-192"));
  SV_CHECK_THROWS(errc::invalid_argument, "plus-64, video", sparsevlm::find_preset("v2-192"));
  // Names are exact: no case folding, no trimming.
  SV_CHECK_THROWS(errc::invalid_argument, "preset", sparsevlm::find_preset("V1.5-192"));
  SV_CHECK_THROWS(errc::invalid_argument, "preset", sparsevlm::find_preset(""));
}

TEST_CASE("presets: every published variant by name") {
  const std::vector<std::string> names{"v1-192",   "v1-128",   "v1-64",    "v1.5-192",
                                       "v1.5-128", "v1.5-96",  "v1.5-64",  "plus-192",
                                       "plus-128", "plus-96",  "plus-64",  "video"};
  const auto& all = sparsevlm::known_presets();
  REQUIRE(all.size() == names.size());
  for (std::size_t i = 0; i < names.size(); ++i) {
    CAPTURE(names[i]);
    CHECK(all[i].name == names[i]);
    CHECK(&sparsevlm::find_preset(names[i]) == &all[i]);
    CHECK_FALSE(all[i].source.empty());
    // Each is valid on the model it was published for.
    CHECK_NOTHROW(sparsevlm::check_schedule(all[i], sparsevlm::find_model(all[i].model)));
  }
}

TEST_CASE("presets: v1 rank-adaptive") {
  struct row {
    const char* name;
    index_t budget;
    double scale, bias;
  };
  for (const row r : {row{"v1-192", 192, 13.5, 0.0}, row{"v1-128", 128, 9.0, 6.0},
                      row{"v1-64", 64, 0.8, 0.0}}) {
    CAPTURE(r.name);
    const preset& p = sparsevlm::find_preset(r.name);
    CHECK(p.budget == r.budget);
    CHECK(p.model == "llava-1.5-7b");
    CHECK(layers_of(p) == std::vector<index_t>{2, 6, 15, 19});
    for (const layer_schedule& s : p.schedule) {
      CHECK(s.policy.kind == keep_policy::kind_t::rank);
      CHECK(s.policy.scale == r.scale);
      CHECK(s.policy.bias == r.bias);
    }
    CHECK(p.recycle.enabled);
    CHECK(p.recycle.fraction == 0.3);
    CHECK(p.recycle.cluster_divisor == 10.0);
    CHECK_FALSE(p.select_heads);
    CHECK_FALSE(p.gravity);
    CHECK(p.position_ids == position_policy::renumber);
  }
}

TEST_CASE("presets: v1.5 fixed schedules") {
  struct row {
    const char* name;
    index_t budget;
    std::vector<index_t> keeps;
  };
  for (const row& r : {row{"v1.5-192", 192, {300, 200, 110}}, row{"v1.5-128", 128, {303, 110, 36}},
                       row{"v1.5-96", 96, {238, 48, 26}}, row{"v1.5-64", 64, {66, 30, 17}}}) {
    CAPTURE(r.name);
    const preset& p = sparsevlm::find_preset(r.name);
    CHECK(p.budget == r.budget);
    CHECK(layers_of(p) == std::vector<index_t>{2, 6, 15});
    CHECK(keeps_of(p) == r.keeps);
    CHECK(p.recycle.enabled);
    CHECK(p.recycle.fraction == 0.3);
    CHECK(p.recycle.cluster_divisor == 10.0);
    CHECK_FALSE(p.select_heads);
    CHECK_FALSE(p.gravity);
    CHECK(p.position_ids == position_policy::renumber);
  }
}

TEST_CASE("presets: SparseVLM+ schedules") {
  struct row {
    const char* name;
    index_t budget;
    std::vector<index_t> keeps;
  };
  for (const row& r : {row{"plus-192", 192, {300, 200, 118}}, row{"plus-128", 128, {238, 108, 60}},
                       row{"plus-96", 96, {246, 54, 28}}, row{"plus-64", 64, {66, 34, 20}}}) {
    CAPTURE(r.name);
    const preset& p = sparsevlm::find_preset(r.name);
    CHECK(p.budget == r.budget);
    CHECK(layers_of(p) == std::vector<index_t>{2, 6, 15});
    CHECK(keeps_of(p) == r.keeps);
    CHECK_FALSE(p.recycle.enabled);
    CHECK(p.select_heads);
    CHECK(p.gravity);
    CHECK(p.position_ids == position_policy::keep_original);
  }
}

TEST_CASE("presets: video") {
  const preset& p = sparsevlm::find_preset("video");
  CHECK(p.model == "video-llava-7b");
  CHECK(p.budget == 0);
  REQUIRE(p.schedule.size() == 1);
  CHECK(p.schedule[0].layer == 1);
  CHECK(p.schedule[0].policy.kind == keep_policy::kind_t::rank);
  CHECK(p.schedule[0].policy.scale == 1.0);
  CHECK(p.schedule[0].policy.bias == 0.0);
  CHECK(p.recycle.enabled);
  CHECK(p.position_ids == position_policy::renumber);
}

TEST_CASE("presets: step_options_at") {
  const preset& plus = sparsevlm::find_preset("plus-128");
  const sparsevlm::step_options o = sparsevlm::step_options_at(plus, 2, llava7b());
  CHECK(o.policy.kind == keep_policy::kind_t::fixed);
  CHECK(o.policy.keep == 60);
  CHECK_FALSE(o.recycle.enabled);
  CHECK(o.scoring.top_heads == 14);  // 14 of 32
  CHECK(o.scoring.gravity.enabled);
  CHECK(o.scoring.gravity.head_dim == 128);  // 4096 / 32
  // 40 heads: round(14 * 40 / 32) = round(17.5) = 18; head_dim 5120 / 40 = 128.
  const auto o13 = sparsevlm::step_options_at(plus, 0, sparsevlm::find_model("llava-1.5-13b"));
  CHECK(o13.scoring.top_heads == 18);
  CHECK(o13.policy.keep == 238);
  const auto o15 = sparsevlm::step_options_at(sparsevlm::find_preset("v1.5-64"), 1, llava7b());
  CHECK(o15.policy.keep == 30);
  CHECK(o15.recycle.enabled);
  CHECK(o15.scoring.top_heads == 0);
  CHECK_FALSE(o15.scoring.gravity.enabled);
  SV_CHECK_THROWS(errc::invalid_argument, "i: expected < 3",
                  sparsevlm::step_options_at(plus, 3, llava7b()));
}

TEST_CASE("presets: check_schedule refuses bad schedules") {
  const model_shape& m = llava7b();
  preset p = sparsevlm::find_preset("v1.5-192");

  SUBCASE("unsorted") {
    p.schedule[1].layer = 1;
    SV_CHECK_THROWS(errc::invalid_argument, "preset.schedule[1].layer: expected > 2",
                    sparsevlm::check_schedule(p, m));
  }
  SUBCASE("duplicate") {
    p.schedule[2].layer = 6;
    SV_CHECK_THROWS(errc::invalid_argument, "preset.schedule[2].layer: expected > 6",
                    sparsevlm::check_schedule(p, m));
  }
  SUBCASE("out of depth: pruning the last layer's output") {
    p.schedule[2].layer = 31;
    SV_CHECK_THROWS(errc::invalid_argument, "preset.schedule[2].layer: expected in [0, 31)",
                    sparsevlm::check_schedule(p, m));
    p.schedule[2].layer = 30;
    CHECK_NOTHROW(sparsevlm::check_schedule(p, m));
  }
  SUBCASE("negative layer") {
    p.schedule[0].layer = -1;
    SV_CHECK_THROWS(errc::invalid_argument, "preset.schedule[0].layer",
                    sparsevlm::check_schedule(p, m));
  }
  SUBCASE("fixed keep not below N") {
    p.schedule[0].policy.keep = 576;
    SV_CHECK_THROWS(errc::invalid_argument,
                    "preset.schedule[0].policy.keep: expected < 576 (visual tokens at layer 2), "
                    "got 576",
                    sparsevlm::check_schedule(p, m));
    p.schedule[0].policy.keep = 575;
    CHECK_NOTHROW(sparsevlm::check_schedule(p, m));
  }
  SUBCASE("fixed keep not below the visual tokens at a later layer") {
    // 300 kept + 9 recycled = 309 visual tokens at layer 6.
    p.schedule[1].policy.keep = 309;
    SV_CHECK_THROWS(errc::invalid_argument, "preset.schedule[1].policy.keep: expected < 309",
                    sparsevlm::check_schedule(p, m));
    p.schedule[1].policy.keep = 308;
    p.schedule[2].policy.keep = 100;
    CHECK_NOTHROW(sparsevlm::check_schedule(p, m));
  }
  SUBCASE("the same schedule on fewer visual tokens") {
    model_shape small = m;
    small.visual = 300;
    SV_CHECK_THROWS(errc::invalid_argument, "preset.schedule[0].policy.keep: expected < 300",
                    sparsevlm::check_schedule(p, small));
  }
  SUBCASE("a model too shallow for the schedule") {
    model_shape shallow = m;
    shallow.layers = 16;
    SV_CHECK_THROWS(errc::invalid_argument, "preset.schedule[2].layer: expected in [0, 15)",
                    sparsevlm::check_schedule(p, shallow));
  }
  SUBCASE("negative fixed keep, bad rank policy") {
    p.schedule[0].policy.keep = -1;
    SV_CHECK_THROWS(errc::invalid_argument, "preset.schedule[0].policy.keep: expected >= 0",
                    sparsevlm::check_schedule(p, m));
    preset r = sparsevlm::find_preset("v1-64");
    r.schedule[3].policy.scale = svt::kNaN;
    SV_CHECK_THROWS(errc::invalid_argument, "preset.schedule[3].policy.scale",
                    sparsevlm::check_schedule(r, m));
  }
  SUBCASE("no pruning layer") {
    p.schedule.clear();
    SV_CHECK_THROWS(errc::invalid_argument, "preset.schedule: expected at least one",
                    sparsevlm::check_schedule(p, m));
  }
  SUBCASE("recycle options") {
    p.recycle.fraction = 1.5;
    SV_CHECK_THROWS(errc::invalid_argument, "recycle.fraction", sparsevlm::check_schedule(p, m));
  }
  SUBCASE("bad shapes") {
    model_shape bad = m;
    bad.heads = 0;
    SV_CHECK_THROWS(errc::invalid_argument, "model.heads: expected >= 1, got 0",
                    sparsevlm::check_schedule(p, bad));
    bad = m;
    bad.hidden = 4100;
    SV_CHECK_THROWS(errc::invalid_argument, "model.hidden: expected a multiple of model.heads",
                    sparsevlm::check_schedule(p, bad));
    bad = m;
    bad.prefix = -1;
    SV_CHECK_THROWS(errc::invalid_argument, "model.prefix", sparsevlm::check_schedule(p, bad));
    bad = m;
    bad.visual = 0;
    SV_CHECK_THROWS(errc::invalid_argument, "model.visual", sparsevlm::check_schedule(p, bad));
  }
}

TEST_CASE("presets: rank layers bound later fixed keeps by what entered them") {
  // A rank layer may keep everything, so a fixed keep after it is checked against
  // the visual tokens that entered the rank layer.
  preset p;
  p.name = "mixed";
  p.schedule = {{2, keep_policy::rank(1.0, 0.0)}, {6, keep_policy::fixed(575)}};
  CHECK_NOTHROW(sparsevlm::check_schedule(p, llava7b()));
  p.schedule[1].policy.keep = 576;
  SV_CHECK_THROWS(errc::invalid_argument, "preset.schedule[1].policy.keep: expected < 576",
                  sparsevlm::check_schedule(p, llava7b()));
}

TEST_CASE("presets: derive_schedule") {
  const model_shape& m7 = llava7b();

  SUBCASE("deeper model: layer + 1 unpruned layers scale, keeps stay") {
    // 40 / 32 = 1.25: (2+1)·1.25 = 3.75 -> 4 -> layer 3; 7·1.25 = 8.75 -> 9 -> 8;
    // 16·1.25 = 20 -> 19.
    const preset q = sparsevlm::derive_schedule(sparsevlm::find_preset("v1.5-192"), m7,
                                                sparsevlm::find_model("llava-1.5-13b"));
    CHECK(q.name == "v1.5-192@llava-1.5-13b");
    CHECK(q.model == "llava-1.5-13b");
    CHECK(layers_of(q) == std::vector<index_t>{3, 8, 19});
    CHECK(keeps_of(q) == std::vector<index_t>{300, 200, 110});
    CHECK(q.recycle.enabled);
    // v1: 20·1.25 = 25 -> 24.
    const preset r = sparsevlm::derive_schedule(sparsevlm::find_preset("v1-192"), m7,
                                                sparsevlm::find_model("llava-1.5-13b"));
    CHECK(layers_of(r) == std::vector<index_t>{3, 8, 19, 24});
  }
  SUBCASE("more visual tokens: keeps and rank coefficients scale") {
    const model_shape& next = sparsevlm::find_model("llava-next-7b");  // 2880 = 5 x 576
    const preset q = sparsevlm::derive_schedule(sparsevlm::find_preset("v1.5-192"), m7, next);
    CHECK(layers_of(q) == std::vector<index_t>{2, 6, 15});
    CHECK(keeps_of(q) == std::vector<index_t>{1500, 1000, 550});
    const preset r = sparsevlm::derive_schedule(sparsevlm::find_preset("v1-128"), m7, next);
    for (const layer_schedule& s : r.schedule) {
      CHECK(s.policy.scale == 45.0);
      CHECK(s.policy.bias == 30.0);
    }
  }
  SUBCASE("rounding is half up") {
    model_shape half = m7;
    half.name = "half";
    half.visual = 288;  // 17·288/576 = 8.5 -> 9; 66 -> 33; 30 -> 15
    half.layers = 16;   // 3·16/32 = 1.5 -> 2 -> layer 1; 3.5 -> 4 -> 3; 8 -> 7
    const preset q = sparsevlm::derive_schedule(sparsevlm::find_preset("v1.5-64"), m7, half);
    CHECK(layers_of(q) == std::vector<index_t>{1, 3, 7});
    CHECK(keeps_of(q) == std::vector<index_t>{33, 15, 9});
  }
  SUBCASE("a small model: keeps never round to 0") {
    model_shape tiny = m7;
    tiny.name = "tiny";
    tiny.layers = 8;   // 0.75 -> 1 -> 0; 1.75 -> 2 -> 1; 4 -> 3
    tiny.visual = 16;  // 66·16/576 = 1.83 -> 2; 0.83 -> 1; 0.47 -> 0, raised to 1
    const preset q = sparsevlm::derive_schedule(sparsevlm::find_preset("v1.5-64"), m7, tiny);
    CHECK(layers_of(q) == std::vector<index_t>{0, 1, 3});
    CHECK(keeps_of(q) == std::vector<index_t>{2, 1, 1});
  }
  SUBCASE("identity") {
    const preset& p = sparsevlm::find_preset("plus-96");
    const preset q = sparsevlm::derive_schedule(p, m7, m7);
    CHECK(layers_of(q) == layers_of(p));
    CHECK(keeps_of(q) == keeps_of(p));
    CHECK(q.gravity);
    CHECK(q.select_heads);
  }
  SUBCASE("results that are not a schedule are refused") {
    model_shape shallow = m7;
    shallow.name = "shallow";
    shallow.layers = 6;  // 3·6/32 = 0.56 -> 1 -> 0; 7·6/32 = 1.31 -> 1 -> 0: collide
    SV_CHECK_THROWS(errc::invalid_argument, "preset.schedule[1].layer: expected > 0",
                    sparsevlm::derive_schedule(sparsevlm::find_preset("v1.5-192"), m7, shallow));
    shallow.layers = 4;  // 3·4/32 = 0.375 -> 0 -> layer -1
    SV_CHECK_THROWS(errc::invalid_argument, "preset.schedule[0].layer",
                    sparsevlm::derive_schedule(sparsevlm::find_preset("v1.5-192"), m7, shallow));
  }
  SUBCASE("the source must fit `from`") {
    model_shape small = m7;
    small.visual = 100;
    SV_CHECK_THROWS(errc::invalid_argument, "preset.schedule[0].policy.keep",
                    sparsevlm::derive_schedule(sparsevlm::find_preset("v1.5-192"), small, m7));
  }
}
