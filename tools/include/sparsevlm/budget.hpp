// Plan before the forward: what a preset costs on a model, from counts alone
// (token counts and the authors' FLOPs accounting). A tool (sparsevlm::tools, not
// installed): the CLI's `plan`, the demo and the tests use it; an engine needs only the token-count rule it shares with the library
// (presets.hpp's detail::tokens_after_step).
#pragma once

#include <algorithm>
#include <optional>
#include <vector>

#include <sparsevlm/core/math.hpp>
#include <sparsevlm/error.hpp>
#include <sparsevlm/presets.hpp>

namespace sparsevlm {

/// One pruning layer of a plan.
struct pruning_count {
  index_t layer = 0;       ///< pruning happens on this layer's output
  index_t visual_in = 0;   ///< visual tokens (recycled ones included) in that output
  index_t keep = 0;        ///< kept visual tokens
  index_t recycled = 0;    ///< recycled tokens (clusters) added back
  index_t visual_out = 0;  ///< visual tokens entering layer + 1
};

/// Prefill FLOPs of the decoder layers, counted as the authors count them
/// (Gumpest/SparseVLMs, modelling_sparse_llama.py): 4nd² + 2n²d + 3ndm per layer,
/// n the sequence length entering the layer.
struct flops_count {
  double dense = 0.0;   ///< every layer at n = prefix + N + text
  double pruned = 0.0;  ///< every layer at its own n
};

/// What plan_budget reports.
struct budget_plan {
  /// Visual tokens entering each decoder layer (recycled ones included), one entry
  /// per layer.
  std::vector<index_t> visual_tokens_per_layer;
  /// Visual tokens each layer outputs: entry l is entry l + 1 of the above (after
  /// the pruning on layer l's output, if any); the last layer outputs what entered.
  std::vector<index_t> visual_tokens_out_per_layer;
  std::vector<pruning_count> pruning;  ///< one per pruning layer, in order
  /// Mean of visual_tokens_per_layer: the visual tokens an average layer computes on.
  double equivalent_tokens = 0.0;
  /// Mean of visual_tokens_out_per_layer: the authors' "equal token num" (their
  /// code appends each layer's post-pruning count; issue #35 of Gumpest/SparseVLMs).
  /// It counts a pruning layer at its pruned size although it ran on the full one.
  double authors_equivalent_tokens = 0.0;
  flops_count flops{};
  /// True when every count is exact. False for rank-adaptive presets, whose keep
  /// depends on the rank found in the forward: every count (and the FLOPs) is
  /// then an upper bound, each on its own (keep + recycled of one entry may exceed
  /// its visual_out, which bounds their sum).
  bool exact = true;
  index_t prefix = 0, visual = 0, text = 0;  ///< the counts planned for
};

namespace detail {

/// Upper bounds of one rank-policy step. The step keeps all `v` when rank == v and
/// else rank_keep(rank, a, b, v), with rank <= min(R, v) and R <= text raters.
/// rank_keep is monotone in rank (either way, by the sign of a), so its extremes
/// over [0, min(text, v − 1)] are at the ends. What leaves, keep + recycled(v −
/// keep), never falls when keep grows (one more kept token removes at most one
/// cluster), and for a fixed keep rule never falls when v grows: so the bounds at
/// the largest `v` hold for every smaller v, except that a v <= text can keep all
/// of itself (rank == v), which the `v_exact == false` candidate min(v, text) adds.
inline layer_counts rank_bounds(const keep_policy& p, const recycle_options& r, index_t v,
                                bool v_exact, index_t text) {
  const index_t r_max = std::min(text, v - 1);
  index_t keep = 0, recycled = 0, out = 0;
  for (index_t rank : {index_t{0}, r_max}) {
    const index_t k = detail::core::rank_keep(rank, p.scale, p.bias, v);
    keep = std::max(keep, k);
    recycled = std::max(recycled, recycled_for(r, v - k));
    out = std::max(out, k + recycled_for(r, v - k));
  }
  if (text >= v) keep = out = v;  // rank == v is possible: nothing pruned
  if (!v_exact) {
    keep = std::max(keep, std::min(v, text));
    out = std::max(out, std::min(v, text));
  }
  return {keep, recycled, out};
}

}  // namespace detail

/// The token counts and FLOPs of running `p` on `m` with `text_tokens` text
/// tokens, before the forward. `visual` and `prefix` override m.visual and
/// m.prefix (e.g. a LLaVA-NeXT image with fewer tiles).
///
/// Model: layer l's output is pruned when l is a pruning layer; the step keeps
/// min(keep, N − 1) for a fixed policy and, when recycling, adds
/// c = cluster_count(recycle_count(N − keep)) tokens, which are visual tokens from
/// then on (the next pruning layer's N is keep + c). Each step is assumed to have
/// raters (at least one text token; with the spec's rater selection, at least two
/// whose rater means differ): a step without raters keeps everything, which
/// `text_tokens == 0` plans. Rank presets: rank <= min(R, N) and R <= text_tokens,
/// so keep <= min(floor(min(T, N − 1)·scale + bias), N − 1), or N when T >= N;
/// the plan carries these upper bounds and exact = false.
///
/// Errors (invalid_argument): text_tokens < 0, visual < 1, prefix < 0, or what
/// check_schedule refuses for `p` on `m` with the overrides. O(layers).
inline budget_plan plan_budget(const model_shape& m, const preset& p, index_t text_tokens,
                               std::optional<index_t> visual = {},
                               std::optional<index_t> prefix = {}) {
  SPARSEVLM_CHECK(text_tokens >= 0, errc::invalid_argument, "text_tokens", ">= 0", text_tokens);
  if (visual) SPARSEVLM_CHECK(*visual >= 1, errc::invalid_argument, "visual", ">= 1", *visual);
  if (prefix) SPARSEVLM_CHECK(*prefix >= 0, errc::invalid_argument, "prefix", ">= 0", *prefix);
  model_shape shape = m;
  if (visual) shape.visual = *visual;
  if (prefix) shape.prefix = *prefix;
  check_schedule(p, shape);

  budget_plan plan;
  plan.prefix = shape.prefix;
  plan.visual = shape.visual;
  plan.text = text_tokens;
  const auto layers = static_cast<std::size_t>(shape.layers);
  plan.visual_tokens_per_layer.resize(layers);
  plan.visual_tokens_out_per_layer.resize(layers);

  const double d = static_cast<double>(shape.hidden);
  const double mlp = static_cast<double>(shape.mlp);
  const auto layer_flops = [&](index_t v) {
    const double n = static_cast<double>(shape.prefix) + static_cast<double>(v) +
                     static_cast<double>(text_tokens);
    return 4.0 * n * d * d + 2.0 * n * n * d + 3.0 * n * d * mlp;
  };
  const double dense_layer = layer_flops(shape.visual);

  index_t v = shape.visual;
  bool v_exact = true;
  std::size_t next = 0;
  double sum_in = 0.0, sum_out = 0.0;
  for (std::size_t l = 0; l < layers; ++l) {
    plan.visual_tokens_per_layer[l] = v;
    plan.flops.dense += dense_layer;
    plan.flops.pruned += layer_flops(v);
    sum_in += static_cast<double>(v);
    if (next < p.schedule.size() && p.schedule[next].layer == static_cast<index_t>(l)) {
      const keep_policy& pol = p.schedule[next].policy;
      detail::layer_counts c{v, 0, v};  // no text, no raters: nothing pruned
      if (text_tokens > 0 && v > 0) {
        if (pol.kind == keep_policy::kind_t::fixed) {
          c = detail::tokens_after_step(pol.keep, v, p.recycle);
        } else {
          c = detail::rank_bounds(pol, p.recycle, v, v_exact, text_tokens);
          v_exact = false;
        }
      }
      plan.pruning.push_back({p.schedule[next].layer, v, c.keep, c.recycled, c.out});
      v = c.out;
      ++next;
    }
    plan.visual_tokens_out_per_layer[l] = v;
    sum_out += static_cast<double>(v);
  }
  plan.exact = v_exact;
  plan.equivalent_tokens = sum_in / static_cast<double>(layers);
  plan.authors_equivalent_tokens = sum_out / static_cast<double>(layers);
  return plan;
}

}  // namespace sparsevlm
