// Named presets: every published SparseVLM variant as a schedule of pruning layers,
// and the model shapes they were published for. See docs/presets.md.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <string>
#include <string_view>
#include <vector>

#include "core/math.hpp"
#include "error.hpp"
#include "keep_count.hpp"
#include "positions.hpp"
#include "recycle.hpp"
#include "types.hpp"

namespace sparsevlm {

/// The decoder shape that pruning and its accounting depend on.
struct model_shape {
  std::string name;
  index_t layers = 0;  ///< decoder layers
  index_t heads = 0;   ///< attention heads H
  index_t hidden = 0;  ///< hidden size d
  index_t mlp = 0;     ///< MLP intermediate size m
  index_t prefix = 0;  ///< tokens before the visual span (system prompt), S
  index_t visual = 0;  ///< visual tokens N
};

/// Validates a shape: layers, heads, hidden, mlp, visual >= 1, prefix >= 0, and
/// hidden a multiple of heads (the head size is hidden / heads). Errors name the
/// field ("model.layers: expected >= 1, got 0"), errc::invalid_argument.
inline void check_model_shape(const model_shape& m) {
  const auto positive = [](index_t v, const char* field) {
    SPARSEVLM_CHECK(v >= 1, errc::invalid_argument, field, ">= 1", v);
  };
  positive(m.layers, "model.layers");
  positive(m.heads, "model.heads");
  positive(m.hidden, "model.hidden");
  positive(m.mlp, "model.mlp");
  positive(m.visual, "model.visual");
  SPARSEVLM_CHECK(m.prefix >= 0, errc::invalid_argument, "model.prefix", ">= 0", m.prefix);
  SPARSEVLM_CHECK(m.hidden % m.heads == 0, errc::invalid_argument, "model.hidden",
                  detail::concat("a multiple of model.heads = ", m.heads), m.hidden);
}

/// The built-in shapes, in this order: llava-1.5-7b, llava-1.5-13b, llava-next-7b
/// (AnyRes, base image + 4 tiles: 5 × 576 = 2880 visual tokens), video-llava-7b
/// (8 frames × 256 tokens). Prefix 35 is LLaVA-1.5's system prompt before <image>.
inline const std::vector<model_shape>& known_models() {
  static const std::vector<model_shape> models{
      {"llava-1.5-7b", 32, 32, 4096, 11008, 35, 576},
      {"llava-1.5-13b", 40, 40, 5120, 13824, 35, 576},
      {"llava-next-7b", 32, 32, 4096, 11008, 35, 2880},
      {"video-llava-7b", 32, 32, 4096, 11008, 35, 2048},
  };
  return models;
}

namespace detail {

template <class T>
std::string name_list(const std::vector<T>& items) {
  std::string s;
  for (const T& it : items) s += (s.empty() ? "" : ", ") + it.name;
  return s;
}

}  // namespace detail

/// The built-in shape called `name`. Errors: invalid_argument "model: expected one
/// of <names>, got '<name>'".
inline const model_shape& find_model(std::string_view name) {
  for (const model_shape& m : known_models())
    if (m.name == name) return m;
  detail::fail(errc::invalid_argument, "model",
               detail::concat("one of ", detail::name_list(known_models())),
               detail::concat("'", name, "'"));
}

/// One pruning layer: the output of decoder layer `layer` (0-based) is pruned, so
/// layer `layer + 1` and every later layer see the pruned sequence.
struct layer_schedule {
  index_t layer = 0;
  keep_policy policy{};
};

/// A SparseVLM variant: where it prunes, how much it keeps, and how it scores.
struct preset {
  std::string name;    ///< "v1-192", "v1.5-128", "plus-64", "video", ...
  std::string source;  ///< where the numbers come from
  std::string model;   ///< the shape it is for: a built-in name for the published ones
  index_t budget = 0;  ///< the nominal token budget in the name; 0 when it has none
  std::vector<layer_schedule> schedule;  ///< ascending layers
  recycle_options recycle{};
  bool select_heads = false;  ///< SparseVLM+: score with top_heads_for(H) heads
  bool gravity = false;       ///< SparseVLM+: RoPE gravity correction
  /// Position ids after each pruning layer (positions.hpp): v1/v1.5 renumber,
  /// SparseVLM+ keeps the original ids.
  position_policy position_ids = position_policy::renumber;
};

namespace detail {

inline preset rank_preset(index_t budget, double scale, double bias) {
  preset p;
  p.name = concat("v1-", budget);
  p.source =
      "SparseVLM v1 (arXiv 2410.04417; Gumpest/SparseVLMs, rank-adaptive release): keep = "
      "floor(rank * scale + bias) at layers 2, 6, 15, 19 of LLaVA-1.5-7B";
  p.model = "llava-1.5-7b";
  p.budget = budget;
  for (index_t l : {2, 6, 15, 19}) p.schedule.push_back({l, keep_policy::rank(scale, bias)});
  return p;
}

inline preset fixed_preset(bool plus, index_t budget, std::vector<index_t> keeps) {
  preset p;
  p.name = concat(plus ? "plus-" : "v1.5-", budget);
  p.source = plus ? "SparseVLM+ (Gumpest/SparseVLMs, llava/model/language_model/score.py, "
                    "USE_VERSION=2_0): fixed keeps at layers 2, 6, 15; scores from the 14 of 32 "
                    "heads with the most rater-to-visual attention, RoPE gravity "
                    "correction, no recycling, original positions"
                  : "SparseVLM v1.5 (Gumpest/SparseVLMs, llava/model/language_model/score.py, "
                    "USE_VERSION=1_0): fixed keeps at layers 2, 6, 15";
  p.model = "llava-1.5-7b";
  p.budget = budget;
  const index_t layers[] = {2, 6, 15};
  for (std::size_t i = 0; i < keeps.size(); ++i)
    p.schedule.push_back({layers[i], keep_policy::fixed(keeps[i])});
  if (plus) {
    p.recycle.enabled = false;
    p.select_heads = true;
    p.gravity = true;
    p.position_ids = position_policy::keep_original;
  }
  return p;
}

}  // namespace detail

/// Every published variant, in this order: v1-192, v1-128, v1-64 (rank-adaptive),
/// v1.5-192, v1.5-128, v1.5-96, v1.5-64 (fixed), plus-192, plus-128, plus-96,
/// plus-64 (SparseVLM+), video. Each preset's `source` says where it comes from;
/// docs/presets.md tabulates them.
inline const std::vector<preset>& known_presets() {
  static const std::vector<preset> presets = [] {
    std::vector<preset> v;
    v.push_back(detail::rank_preset(192, 13.5, 0.0));
    v.push_back(detail::rank_preset(128, 9.0, 6.0));
    v.push_back(detail::rank_preset(64, 0.8, 0.0));
    v.push_back(detail::fixed_preset(false, 192, {300, 200, 110}));
    v.push_back(detail::fixed_preset(false, 128, {303, 110, 36}));
    v.push_back(detail::fixed_preset(false, 96, {238, 48, 26}));
    v.push_back(detail::fixed_preset(false, 64, {66, 30, 17}));
    v.push_back(detail::fixed_preset(true, 192, {300, 200, 118}));
    v.push_back(detail::fixed_preset(true, 128, {238, 108, 60}));
    v.push_back(detail::fixed_preset(true, 96, {246, 54, 28}));
    v.push_back(detail::fixed_preset(true, 64, {66, 34, 20}));
    preset video;
    video.name = "video";
    video.source =
        "SparseVLM on Video-LLaVA-7B (arXiv 2410.04417, video experiments; Gumpest/SparseVLMs "
        "videollava/): keep = rank after layer 1, recycling on";
    video.model = "video-llava-7b";
    video.schedule.push_back({1, keep_policy::rank(1.0, 0.0)});
    v.push_back(std::move(video));
    return v;
  }();
  return presets;
}

/// The built-in preset called `name`. Errors: invalid_argument "preset: expected
/// one of <names>, got '<name>'".
inline const preset& find_preset(std::string_view name) {
  for (const preset& p : known_presets())
    if (p.name == name) return p;
  detail::fail(errc::invalid_argument, "preset",
               detail::concat("one of ", detail::name_list(known_presets())),
               detail::concat("'", name, "'"));
}

namespace detail {

/// The token counts of one step on v >= 1 visual tokens.
struct layer_counts {
  index_t keep, recycled, out;
};

/// The clusters recycling adds back for `pruned` pruned tokens.
inline index_t recycled_for(const recycle_options& r, index_t pruned) {
  return detail::core::recycled_counts(pruned, r.enabled, r.fraction, r.cluster_divisor).clusters;
}

/// One step on v >= 1 visual tokens that keeps `keep` of them (clamped to v − 1,
/// as the spec clamps a fixed keep): keep, the clusters recycling adds, and the
/// visual tokens that leave (keep + clusters). The one token-count rule of the
/// preset checks, plan_budget and the prefill session's schedule check; the
/// step itself decides through detail::core::decide_keep and detail::core::recycled_counts, the
/// same rules.
inline layer_counts tokens_after_step(index_t keep, index_t v, const recycle_options& r) {
  const index_t k = std::min(keep, v - 1);
  const index_t c = recycled_for(r, v - k);
  return {k, c, k + c};
}

}  // namespace detail

/// Validates `p` for `m` (and `m` itself, with check_model_shape):
/// - at least one pruning layer; layers strictly increasing, in [0, layers − 1)
///   (pruning the last layer's output leaves no layer to see the saving);
/// - each policy valid (check_policy), and a fixed keep below the visual tokens at
///   that layer: the step would clamp it to N − 1, so the schedule is not what it
///   says. The visual tokens at a fixed layer follow the earlier fixed layers
///   (keep + recycled clusters); after a rank layer they are bounded by what
///   entered it (the rank policy may keep everything);
/// - the recycle options (check_recycle_options), also when recycling is off.
/// Errors: invalid_argument, naming the entry: "preset.schedule[1].layer: expected
/// > 2 (strictly increasing), got 2".
inline void check_schedule(const preset& p, const model_shape& m) {
  check_model_shape(m);
  check_recycle_options(p.recycle);
  SPARSEVLM_CHECK(!p.schedule.empty(), errc::invalid_argument, "preset.schedule",
                  "at least one pruning layer", "none");
  index_t visual = m.visual;
  for (std::size_t i = 0; i < p.schedule.size(); ++i) {
    const layer_schedule& s = p.schedule[i];
    const std::string at = detail::concat("preset.schedule[", i, "]");
    SPARSEVLM_CHECK(s.layer >= 0 && s.layer < m.layers - 1, errc::invalid_argument,
                    at + ".layer",
                    detail::concat("in [0, ", m.layers - 1, ") for a ", m.layers,
                                   "-layer model (a pruned output needs a later layer)"),
                    s.layer);
    if (i > 0) {
      SPARSEVLM_CHECK(s.layer > p.schedule[i - 1].layer, errc::invalid_argument, at + ".layer",
                      detail::concat("> ", p.schedule[i - 1].layer, " (strictly increasing)"),
                      s.layer);
    }
    try {
      check_policy(s.policy);
    } catch (const error& e) {
      throw error(e.code(), at + "." + e.what());
    }
    if (s.policy.kind == keep_policy::kind_t::fixed) {
      SPARSEVLM_CHECK(s.policy.keep < visual, errc::invalid_argument, at + ".policy.keep",
                      detail::concat("< ", visual, " (visual tokens at layer ", s.layer, ")"),
                      s.policy.keep);
      visual = detail::tokens_after_step(s.policy.keep, visual, p.recycle).out;
    }
  }
}

/// The step options of pruning layer `i` of `p` on model `m`: its keep policy, the
/// preset's recycling, and its scoring (top_heads_for(m.heads) heads when the
/// preset selects heads; gravity enabled with head_dim = hidden / heads when it
/// corrects for RoPE; the engine still sets the gravity's RoPE base, rotary_dim and
/// positions, which vary by model). Errors: invalid_argument for `i` out of range
/// or a bad shape.
inline step_options step_options_at(const preset& p, std::size_t i, const model_shape& m) {
  check_model_shape(m);
  SPARSEVLM_CHECK(i < p.schedule.size(), errc::invalid_argument, "i",
                  detail::concat("< ", p.schedule.size(), " (pruning layers of ", p.name, ")"), i);
  step_options o;
  o.policy = p.schedule[i].policy;
  o.recycle = p.recycle;
  o.scoring.top_heads = p.select_heads ? top_heads_for(m.heads) : 0;
  o.scoring.gravity.enabled = p.gravity;
  if (p.gravity) o.scoring.gravity.head_dim = m.hidden / m.heads;
  return o;
}

/// `p` (validated against `from`) carried over to the shape `to`, keeping the same
/// fraction of the depth in front of each pruning layer and the same fraction of
/// the visual tokens at each keep:
///
///   layer' = round((layer + 1) · to.layers / from.layers) − 1
///   fixed keep' = max(1, round(keep · to.visual / from.visual))
///   rank: scale' = scale · to.visual / from.visual, bias' = bias · to.visual / from.visual
///
/// round() is half up. `layer + 1` is the number of layers that run unpruned, which
/// is the quantity worth preserving (32 → 40 layers moves layer 2 to 3: 3 → 3.75 → 4
/// unpruned layers). A fixed keep never rounds to 0 (a schedule that drops every
/// visual token is not a SparseVLM variant). The result is named "<name>@<to.name>"
/// and validated against `to` with check_schedule, whose error names the first
/// entry that broke (e.g. two layers that round together on a shallow model).
/// There is no budget argument: the equivalent-token count is not linear in the
/// keeps (the layers before the first pruning layer always see all N), so scaling
/// keeps by a budget ratio would not hit the budget; plan_budget (budget.hpp) shows
/// what a schedule costs.
inline preset derive_schedule(const preset& p, const model_shape& from, const model_shape& to) {
  check_schedule(p, from);
  check_model_shape(to);
  const double depth = static_cast<double>(to.layers) / static_cast<double>(from.layers);
  const double tokens = static_cast<double>(to.visual) / static_cast<double>(from.visual);
  // Half up. The ratios of integers here are never within an ulp of a half they do
  // not equal, so the double division decides like exact arithmetic would.
  const auto round_half_up = [](double v) { return static_cast<index_t>(std::floor(v + 0.5)); };
  preset q = p;
  q.name = detail::concat(p.name, "@", to.name);
  q.source = detail::concat(p.source, "; derived from ", from.name, " for ", to.name);
  q.model = to.name;
  for (layer_schedule& s : q.schedule) {
    s.layer = round_half_up(static_cast<double>(s.layer + 1) * depth) - 1;
    if (s.policy.kind == keep_policy::kind_t::fixed) {
      const index_t k = round_half_up(static_cast<double>(s.policy.keep) * tokens);
      s.policy.keep = k < 1 ? 1 : k;
    } else {
      s.policy.scale *= tokens;
      s.policy.bias *= tokens;
    }
  }
  check_schedule(q, to);
  return q;
}

}  // namespace sparsevlm
