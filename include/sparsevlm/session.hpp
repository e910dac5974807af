// A prefill session: SparseVLM over every pruning layer of one sequence. See
// docs/integration.md ("A prefill with the session, step by step").
#pragma once

#include <algorithm>
#include <numeric>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "kv_cache.hpp"
#include "positions.hpp"
#include "presets.hpp"
#include "spans.hpp"
#include "step.hpp"

namespace sparsevlm {

/// Where the parts of one sequence sit before layer 0.
///
/// One visual span: `visual` = [S, S+N); the prefix (system prompt) is [0, S), the
/// text [S+N, length). Several (interleaved images, video frames): `spans`, sorted
/// by position, not overlapping (adjacent is fine), each with len >= 1, and
/// `visual` left unset ({0, 0}); tokens between spans (e.g. "Image 2:") are kept
/// as they are, and the text after the last span holds the raters (spans.hpp).
struct prefill_layout {
  index_t length = 0;
  visual_span visual{};  ///< the visual span of a one-span layout
  std::vector<visual_span> spans{};  ///< several spans; when non-empty, `visual` is unset

  /// The layout of `prefix` + `visual` + `text` tokens.
  static prefill_layout from_counts(index_t prefix, index_t visual, index_t text) {
    return {prefix + visual + text, visual_span{prefix, visual}, {}};
  }

  /// The layout of `prefix` tokens, then spans of visual[0], visual[1], …
  /// tokens with `between` tokens between consecutive spans, then `text` tokens
  /// (e.g. 8 video frames of 256: from_counts(35, std::vector<index_t>(8, 256), 60)).
  /// Not validated here (the session does it).
  static prefill_layout from_counts(index_t prefix, const std::vector<index_t>& visual,
                                    index_t text, index_t between = 0) {
    prefill_layout l;
    index_t p = prefix;
    for (std::size_t i = 0; i < visual.size(); ++i) {
      if (i > 0) p += between;
      l.spans.push_back({p, visual[i]});
      p += visual[i];
    }
    l.length = p + text;
    return l;
  }

  /// The visual spans: `spans`, or `visual` alone.
  [[nodiscard]] std::vector<visual_span> visual_spans() const {
    return spans.empty() ? std::vector<visual_span>{visual} : spans;
  }
};

/// One pruning layer of a session: the output of decoder layer `layer`
/// (0-based) is pruned with `options`, so layer `layer + 1` is the first to see
/// the pruned sequence.
struct pruning_layer {
  index_t layer = 0;
  step_options options{};
};

/// What a session does over the forward.
struct session_config {
  index_t layers = 0;                  ///< decoder layers of the model (its depth)
  std::vector<pruning_layer> schedule;  ///< strictly increasing, in [0, layers − 1); may be empty
  /// Position ids of the layers after each pruning layer (positions.hpp).
  position_policy positions = position_policy::renumber;
  /// With several visual spans, how each pruning layer's keep policy is spread
  /// (prune_step_spans). global: one policy over the union of the spans.
  /// per_span: a rank policy applies to each span's own rank; a fixed keep K is
  /// the layer's total, apportioned over the spans by their current visual
  /// tokens (detail::apportion_keep: largest remainder, each span at most
  /// N_i − 1), so a preset's schedule keeps its meaning and every span its
  /// share. With one span both are prune_step.
  span_budget budget = span_budget::global;
};

/// The configuration of preset `p` on model `m`: one pruning layer per schedule
/// entry with step_options_at(p, i, m), p's position policy, m.layers. The engine
/// still sets each entry's gravity base and rotary_dim when the preset corrects
/// for RoPE (the session supplies the gravity's position ids itself).
/// Errors: as step_options_at (a bad shape). The schedule is validated against
/// the real sequence when the session is built.
inline session_config make_session_config(const preset& p, const model_shape& m) {
  check_model_shape(m);
  session_config c;
  c.layers = m.layers;
  c.positions = p.position_ids;
  c.schedule.reserve(p.schedule.size());
  for (std::size_t i = 0; i < p.schedule.size(); ++i)
    c.schedule.push_back({p.schedule[i].layer, step_options_at(p, i, m)});
  return c;
}

/// What one pruning layer decided, and the state the layers after it run with.
struct layer_plan {
  index_t layer = 0;  ///< the decoder layer whose output was pruned
  /// The step, in the coordinates of this layer's tokens (the session's length
  /// before the call): compact the hidden states with
  /// apply_plan_inplace(step.sequence, hidden, merged rows of step.recycled).
  /// With several spans it is prune_step_spans' result: `scores` span after
  /// span (spans with tokens left), `recycled` every span's clusters span after
  /// span, `rank` the union's under the global budget, else the pruned span's
  /// when only one has tokens left, else −1 (see `parts`).
  step_result step;
  /// One per span of the layout, in order, in this layer's coordinates: the
  /// span as it entered, its rank (per_span budget; −1 under global), keep
  /// count and keep set, and its clusters in `step.recycled`. A span with no
  /// token left has len 0 and nothing kept.
  std::vector<span_part> parts;
  /// step.sequence without recycled entries (kv_sequence): compacts the caches
  /// of the layers written with this layer's tokens (those after the previous
  /// pruning layer, up to `layer`) to the real survivors. Earlier caches that
  /// were kept whole: prefill_session::kv_rows.
  std::vector<index_t> kv_sequence;
  index_t length = 0;  ///< tokens after the step (step.sequence.size())
  /// The new visual spans, one per span of the layout: span i's kept tokens,
  /// then its recycled tokens (which belong to span i from now on).
  std::vector<visual_span> spans;
  /// With one span, that span; with several, their hull [spans.front().start,
  /// spans.back().end()), which also holds the tokens between spans.
  visual_span visual{};
  index_t rows = 1;  ///< rows of `positions`
  /// [rows, length] row-major: the position ids of layers layer + 1, ….
  std::vector<index_t> positions;

  [[nodiscard]] matrix_view<const index_t> positions_view() const {
    return matrix_view<const index_t>(positions.data(), {rows, length}, "positions");
  }
};

namespace detail {

/// Adds `prefix` to the argument an error names ("visual.len: …" becomes
/// "layout.visual.len: …").
template <class F>
void with_prefix(const std::string& prefix, F&& f) {
  try {
    f();
  } catch (const error& e) {
    throw error(e.code(), prefix + e.what());
  }
}

template <class TE, class TA, class TH>
step_inputs<TE, TA, TH> make_step_inputs(matrix_view<const TE> embeds,
                                         tensor3_view<const TA> attn,
                                         matrix_view<const TH> hidden, visual_span visual,
                                         std::optional<std::span<const index_t>> raters) {
  return {embeds, attn, hidden, visual, raters};
}

template <class TE, class TQ, class TK, class TH>
step_inputs_qk<TE, TQ, TK, TH> make_step_inputs(matrix_view<const TE> embeds,
                                                const qk_view<TQ, TK>& qk,
                                                matrix_view<const TH> hidden, visual_span visual,
                                                std::optional<std::span<const index_t>> raters) {
  return {embeds, qk, hidden, visual, raters};
}

/// The token count of an attention source: attn.extent[1] or k.extent[1].
template <class TA>
index_t source_length(tensor3_view<const TA> attn) {
  return attn.extent(1);
}
template <class TQ, class TK>
index_t source_length(const qk_view<TQ, TK>& qk) {
  return qk.k.extent(1);
}
template <class TA>
const char* source_name(tensor3_view<const TA>) {
  return "attn.extent[1]";
}
template <class TQ, class TK>
const char* source_name(const qk_view<TQ, TK>&) {
  return "k.extent[1]";
}

/// A fixed keep `keep` spread over spans of v[i] visual tokens (the per_span
/// budget of a session): K = min(keep, Σ max(v_i − 1, 0)), since a span keeps
/// at most N_i − 1 (the spec's clamp); span i first gets ⌊K·v_i / V⌋ (V = Σ v_i),
/// then the remaining tokens go one at a time to the span with the largest
/// remainder K·v_i − k_i·V among those below v_i − 1, ties to the lower span.
/// The result sums to K; an empty span gets 0. Exact integer arithmetic; O(S²)
/// at most for S spans.
inline std::vector<index_t> apportion_keep(index_t keep, std::span<const index_t> v) {
  std::vector<index_t> k(v.size(), 0);
  index_t total = 0, cap = 0;
  for (index_t n : v) {
    total += n;
    cap += n > 0 ? n - 1 : 0;
  }
  const index_t K = std::min(std::max(keep, index_t{0}), cap);
  if (K == 0) return k;
  index_t left = K;
  for (std::size_t i = 0; i < v.size(); ++i) {
    k[i] = K * v[i] / total;  // <= v_i − 1, since K < total
    left -= k[i];
  }
  while (left > 0) {
    std::size_t best = v.size();
    for (std::size_t i = 0; i < v.size(); ++i)
      if (k[i] < v[i] - 1 &&
          (best == v.size() || K * v[i] - k[i] * total > K * v[best] - k[best] * total))
        best = i;
    ++k[best];  // one exists while Σ k < K <= Σ (v_i − 1)
    --left;
  }
  return k;
}

}  // namespace detail

class prefill_session;

namespace detail {
template <class Source, class TH>
layer_plan session_compute(const prefill_session& s, index_t layer, const Source& src,
                           matrix_view<const TH> hidden, workspace& ws);
layer_plan session_commit(prefill_session& s, layer_plan&& p);
layer_plan session_adopt(const prefill_session& s, index_t layer, step_result&& step);
const pruning_layer& session_next(const prefill_session& s, index_t layer);
void session_parts(const prefill_session& s, layer_plan& plan,
                   const std::vector<visual_span>& holding);
}  // namespace detail

/// SparseVLM over the forward of one sequence.
///
/// Built before layer 0 from the layout, the input embeddings (the raters are
/// chosen there, once, with select_raters, as the paper does) or caller raters,
/// and a config: the pruning layers with their step options, the position
/// policy, and (several visual spans) the budget mode. After each decoder layer
/// the engine asks prunes_after(layer); at a pruning layer it hands prune() that
/// layer's attention (or Q/K) and output hidden states and gets the layer_plan
/// back, which it applies to its own tensors (see docs/integration.md). Other
/// layers cost nothing.
///
/// The session tracks, across layers:
/// - each visual span: [S_i, S_i + keep_i + c_i) after a step: span i's kept
///   tokens, then its c_i recycled tokens, which count as span i's visual
///   tokens at the next pruning layer (the authors' `v_token_num = kept +
///   cluster_num`); a cluster never mixes spans;
/// - the raters: the same text tokens (after the last span) throughout, as in
///   the authors' code, at their current positions, which move left as visual
///   tokens go;
/// - the position ids, [rows, length] (1 row, or 3 for mRoPE), under the
///   config's policy, row-wise; a recycled token takes every row of its ids
///   from its cluster's first member under keep_original (pruned_positions);
/// - each current token's original position (origins, −1 for a recycled one),
///   and every step's sequence, for KV caches kept whole until later (kv_rows).
///
/// One span: each step is prune_step. Several: prune_step_spans over the spans
/// that still hold tokens, with config().budget; a step in which one span alone
/// holds tokens is prune_step on it. Either way a session over a one-span
/// layout decides exactly what it did before spans existed.
///
/// Errors: sparsevlm::error naming the argument; a failed call leaves the
/// session as it was. Not thread-safe; distinct sessions are independent.
class prefill_session {
 public:
  /// A session whose raters come from `embeds` ([length, d_e], float32, half or
  /// bfloat16): select_raters over the layout's visual span (several spans:
  /// over their union, with the text after the last span), with scratch from
  /// `ws`. `positions`: the ids of the input, [rows >= 1, length] (1 row for
  /// 1-D RoPE, 3 for Qwen2-VL's mRoPE), any strides, copied; default
  /// 0..length−1 in one row.
  /// Errors: see validate(); shape_mismatch for embeds.extent[0] != length;
  /// non_finite as select_raters.
  template <class TE>
  prefill_session(const prefill_layout& layout, matrix_view<const TE> embeds,
                  session_config config, workspace& ws,
                  std::optional<matrix_view<const index_t>> positions = std::nullopt) {
    validate(layout, config, positions);
    SPARSEVLM_CHECK(embeds.extent(0) == layout.length, errc::shape_mismatch, "embeds.extent[0]",
                    detail::concat(layout.length, " (layout.length)"), embeds.extent(0));
    std::vector<index_t> raters;
    detail::select_raters_spans(embeds, std::span<const visual_span>(layout.visual_spans()), ws,
                                raters);
    init(layout, std::move(config), std::move(raters), positions);
  }

  /// A session with caller raters: absolute positions in the input, ascending,
  /// unique, inside the text after the last span (check_raters). Otherwise as
  /// above.
  prefill_session(const prefill_layout& layout, std::span<const index_t> raters,
                  session_config config,
                  std::optional<matrix_view<const index_t>> positions = std::nullopt) {
    validate(layout, config, positions);
    check_raters(raters, layout.visual_spans().back(), layout.length);
    init(layout, std::move(config), std::vector<index_t>(raters.begin(), raters.end()), positions);
  }

  /// True when `layer` is the next pruning layer of the schedule: then prune()
  /// must be called with that layer's outputs before layer + 1 runs. O(1).
  [[nodiscard]] bool prunes_after(index_t layer) const noexcept {
    return next_ < cfg_.schedule.size() && cfg_.schedule[next_].layer == layer;
  }
  /// The next pruning layer, or nullopt when all are done.
  [[nodiscard]] std::optional<index_t> next_layer() const noexcept {
    if (finished()) return std::nullopt;
    return cfg_.schedule[next_].layer;
  }
  /// Pruning layers done so far (an index into config().schedule).
  [[nodiscard]] std::size_t steps_done() const noexcept { return next_; }
  /// True when every pruning layer of the schedule is done.
  [[nodiscard]] bool finished() const noexcept { return next_ == cfg_.schedule.size(); }

  [[nodiscard]] const session_config& config() const noexcept { return cfg_; }
  [[nodiscard]] const prefill_layout& layout() const noexcept { return layout_; }
  /// Tokens the next layer runs on.
  [[nodiscard]] index_t length() const noexcept { return n_; }
  /// The current visual spans, one per span of the layout, in order (recycled
  /// tokens included). A span's length can reach 0 (a rank policy that keeps
  /// nothing, or a global budget that keeps none of its tokens, with recycling
  /// off); later pruning layers skip it, and keep everything once all are empty.
  [[nodiscard]] std::span<const visual_span> spans() const noexcept { return spans_; }
  /// With one span, that span; with several, their hull [spans().front().start,
  /// spans().back().end()) (tokens between spans included).
  [[nodiscard]] visual_span visual() const noexcept {
    return {spans_.front().start, spans_.back().end() - spans_.front().start};
  }
  /// Visual tokens over all spans (recycled ones included).
  [[nodiscard]] index_t visual_tokens() const noexcept {
    index_t n = 0;
    for (const visual_span& v : spans_) n += v.len;
    return n;
  }
  /// The raters at their current positions, ascending (possibly none).
  [[nodiscard]] std::span<const index_t> raters() const noexcept { return raters_; }
  /// The current position ids [rows, length], row-major.
  [[nodiscard]] matrix_view<const index_t> positions() const {
    return matrix_view<const index_t>(pos_.data(), {rows_, n_}, "positions");
  }
  /// The original position of each current token; −1 for a recycled token.
  [[nodiscard]] std::span<const index_t> origins() const noexcept { return origin_; }
  /// The sequences of the steps done, in order (step k's entries index step
  /// k−1's output; step 0's index the input).
  [[nodiscard]] std::span<const std::vector<index_t>> sequences() const noexcept { return seqs_; }

  /// The position id of the first generated token in the layers after the last
  /// pruning layer done (next_position with the input's ids): the current
  /// length under renumber, 1 + the input's largest id under keep_original.
  /// Layers before the first pruning layer continue from 1 + the input's
  /// largest id under either policy (docs/integration.md, "Decode positions").
  [[nodiscard]] index_t next_position() const {
    return sparsevlm::next_position(
        matrix_view<const index_t>(pos0_.data(), {rows_, layout_.length}, "positions"), n_,
        cfg_.positions);
  }

  /// The rows that the K/V cache of decoder layer `layer` keeps to hold the
  /// current tokens less the recycled ones, for a cache left whole since it was
  /// written: kv_sequence over the steps done at layers >= `layer` (see
  /// kv_cache.hpp); 0..length−1 when no step after `layer` is done yet.
  /// Cost O(entries of those steps). Errors: invalid_argument for `layer`
  /// outside [0, config().layers).
  [[nodiscard]] std::vector<index_t> kv_rows(index_t layer) const {
    SPARSEVLM_CHECK(layer >= 0 && layer < cfg_.layers, errc::invalid_argument, "layer",
                    detail::concat("in [0, ", cfg_.layers, ")"), layer);
    std::size_t first = 0;
    while (first < next_ && cfg_.schedule[first].layer < layer) ++first;
    if (first == next_) {
      std::vector<index_t> all(static_cast<std::size_t>(n_));
      std::iota(all.begin(), all.end(), index_t{0});
      return all;
    }
    return kv_sequence(std::span<const std::vector<index_t>>(seqs_).subspan(first));
  }

  /// Prunes the output of decoder layer `layer` from its attention probabilities
  /// `attn` [H, n, n] and output hidden states `hidden` [n, d], n = length():
  /// prune_step (one span with tokens) or prune_step_spans (several) with the
  /// schedule's options, the session's raters and budget mode, then the state
  /// moves to the new sequence. Scratch from `ws` (reuse it).
  ///
  /// The step scores with the session's current raters (embeds are not read
  /// again); a RoPE gravity correction gets the current ids (row 0) as its
  /// positions. With no visual token left the step is the identity.
  ///
  /// Cost: prune_step's, or prune_step_spans' (which allocates its result) with
  /// several spans; plus O(rows·n) for the ids and O(n) bookkeeping.
  /// Errors: invalid_argument when `layer` is not the next pruning layer
  /// ("layer: expected 3 (the next pruning layer), got 5") or all are done;
  /// shape_mismatch when attn.extent[1] != length(); then as prune_step. The
  /// session is unchanged on error.
  template <class TA, class TH>
  layer_plan prune(index_t layer, tensor3_view<const TA> attn, matrix_view<const TH> hidden,
                   workspace& ws) {
    return detail::session_commit(*this, detail::session_compute(*this, layer, attn, hidden, ws));
  }

  /// As above from queries and keys (relevance_scores_qk): q [H, n or R, dh]
  /// (R rows in the order of raters()), k [Hkv, n, dh].
  template <class TQ, class TK, class TH>
  layer_plan prune(index_t layer, const qk_view<TQ, TK>& qk, matrix_view<const TH> hidden,
                   workspace& ws) {
    return detail::session_commit(*this, detail::session_compute(*this, layer, qk, hidden, ws));
  }

  /// Moves the session past pruning layer `layer` with a step decided elsewhere:
  /// the CUDA step (cuda/step.cuh) on device tensors, or a tensor-parallel step
  /// (prune_step_from_head_sums). `step` must be prune_step's result for the one
  /// span that holds tokens (visual()), with the session's raters() and the
  /// layer's options; its `scores` and merged rows are carried into the plan as
  /// given. Returns what prune() returns for that step.
  ///
  /// Cost: O(n + rows·n). Errors: invalid_argument when `layer` is not the next
  /// pruning layer, when not exactly one span holds tokens ("spans: expected one
  /// span with visual tokens for a step decided elsewhere, got 2"), when
  /// step.raters differ from raters(), or when the step is not one of this span
  /// (keep outside the span, not ascending, keep_count != keep.size(), a cluster
  /// member outside the span or kept, a sequence other than make_sequence's for
  /// the keep set and clusters). The session is unchanged on error.
  layer_plan commit(index_t layer, step_result step) {
    return detail::session_commit(*this, detail::session_adopt(*this, layer, std::move(step)));
  }

 private:
  template <class Source, class TH>
  friend layer_plan detail::session_compute(const prefill_session& s, index_t layer,
                                            const Source& src, matrix_view<const TH> hidden,
                                            workspace& ws);
  friend layer_plan detail::session_commit(prefill_session& s, layer_plan&& p);
  friend layer_plan detail::session_adopt(const prefill_session& s, index_t layer,
                                          step_result&& step);
  friend const pruning_layer& detail::session_next(const prefill_session& s, index_t layer);
  friend void detail::session_parts(const prefill_session& s, layer_plan& plan,
                                    const std::vector<visual_span>& holding);

  /// Checks the layout, the config against it, and the position ids:
  /// - layout: one span inside [0, length) with N >= 1 ("layout.visual…"), or
  ///   several (check_spans: sorted, not overlapping, each inside with len >= 1,
  ///   "layout.spans[1].start…") with `visual` unset;
  /// - config.layers >= 1; schedule layers strictly increasing, in
  ///   [0, layers − 1) ("config.schedule[1].layer: expected > 3 (strictly
  ///   increasing), got 3"); each policy and recycle options valid; the budget
  ///   mode valid; gravity positions left empty (the session supplies them) and
  ///   only with one-row ids (the correction models 1-D RoPE);
  /// - a fixed keep that the step would certainly clamp: not below the visual
  ///   tokens entering its step (all spans; N, then keep + c after each fixed
  ///   step), or, per_span with several spans holding tokens, above their count
  ///   less one per span. Counts are exact through fixed steps of one span and
  ///   per_span steps; after a rank step, or a global step over several spans
  ///   (whose split is decided by the scores), they are upper bounds;
  /// - positions: [rows >= 1, length].
  static void validate(const prefill_layout& layout, const session_config& cfg,
                       const std::optional<matrix_view<const index_t>>& positions) {
    if (layout.spans.empty()) {
      detail::with_prefix("layout.",
                          [&] { detail::check_span(layout.visual, layout.length, "length"); });
    } else {
      SPARSEVLM_CHECK(layout.visual.start == 0 && layout.visual.len == 0, errc::invalid_argument,
                      "layout.visual", "unset ({0, 0}) when layout.spans is given",
                      detail::concat("start ", layout.visual.start, ", len ", layout.visual.len));
      detail::with_prefix("layout.", [&] { check_spans(layout.spans, layout.length, "length"); });
    }
    const index_t rows = positions ? positions->extent(0) : 1;
    if (positions) {
      SPARSEVLM_CHECK(rows >= 1, errc::shape_mismatch, "positions.extent[0] (rows)", ">= 1", rows);
      SPARSEVLM_CHECK(positions->extent(1) == layout.length, errc::shape_mismatch,
                      "positions.extent[1]", detail::concat(layout.length, " (layout.length)"),
                      positions->extent(1));
    }
    detail::check_policy(cfg.positions);
    SPARSEVLM_CHECK(cfg.budget == span_budget::global || cfg.budget == span_budget::per_span,
                    errc::invalid_argument, "config.budget", "global or per_span",
                    static_cast<int>(cfg.budget));
    SPARSEVLM_CHECK(cfg.layers >= 1, errc::invalid_argument, "config.layers", ">= 1", cfg.layers);
    // Visual tokens of each span entering the next step: exact while `exact`,
    // else upper bounds (a step never grows a span: keep_i + c_i <= N_i).
    std::vector<index_t> v;
    for (const visual_span& s : layout.visual_spans()) v.push_back(s.len);
    bool exact = true;
    for (std::size_t i = 0; i < cfg.schedule.size(); ++i) {
      const pruning_layer& s = cfg.schedule[i];
      const std::string at = detail::concat("config.schedule[", i, "]");
      SPARSEVLM_CHECK(s.layer >= 0 && s.layer < cfg.layers - 1, errc::invalid_argument,
                      at + ".layer",
                      detail::concat("in [0, ", cfg.layers - 1, ") for a ", cfg.layers,
                                     "-layer model (a pruned output needs a later layer)"),
                      s.layer);
      if (i > 0)
        SPARSEVLM_CHECK(s.layer > cfg.schedule[i - 1].layer, errc::invalid_argument,
                        at + ".layer",
                        detail::concat("> ", cfg.schedule[i - 1].layer, " (strictly increasing)"),
                        s.layer);
      detail::with_prefix(at + ".options.", [&] {
        check_policy(s.options.policy);
        if (s.options.recycle.enabled) check_recycle_options(s.options.recycle);
      });
      const rope_gravity& g = s.options.scoring.gravity;
      if (g.enabled) {
        SPARSEVLM_CHECK(g.positions.empty(), errc::invalid_argument,
                        at + ".options.scoring.gravity.positions",
                        "empty (the session supplies the current ids)",
                        detail::concat(g.positions.size(), " ids"));
        SPARSEVLM_CHECK(rows == 1, errc::invalid_argument,
                        at + ".options.scoring.gravity.enabled",
                        "false with several rows of position ids (the correction models 1-D RoPE)",
                        detail::concat("true with ", rows, " rows"));
      }
      if (s.options.policy.kind != keep_policy::kind_t::fixed) {
        exact = false;
        continue;
      }
      const index_t keep = s.options.policy.keep;
      const recycle_options& r = s.options.recycle;
      index_t total = 0, holding = 0;
      for (index_t n : v) {
        total += n;
        holding += n > 0 ? 1 : 0;
      }
      const bool split = exact && holding >= 2 && cfg.budget == span_budget::per_span;
      if (split) {
        SPARSEVLM_CHECK(keep <= total - holding, errc::invalid_argument, at + ".options.policy.keep",
                        detail::concat("<= ", total - holding, " (the ", total,
                                       " visual tokens entering the step after layer ", s.layer,
                                       ", less one for each of the ", holding,
                                       " spans: a span keeps at most N_i - 1)"),
                        keep);
      } else {
        SPARSEVLM_CHECK(keep < total, errc::invalid_argument, at + ".options.policy.keep",
                        detail::concat("< ", total, " (visual tokens entering the step after layer ",
                                       s.layer, ")"),
                        keep);
      }
      if (exact && holding == 1) {
        for (index_t& n : v)
          if (n > 0) n = detail::tokens_after_step(keep, n, r).out;
      } else if (split) {
        const std::vector<index_t> k = detail::apportion_keep(keep, v);
        for (std::size_t j = 0; j < v.size(); ++j)
          if (v[j] > 0) v[j] = detail::tokens_after_step(k[j], v[j], r).out;
      } else {
        for (index_t& n : v) n = std::min(n, keep + detail::recycled_for(r, n));
        exact = false;
      }
    }
  }

  void init(const prefill_layout& layout, session_config cfg, std::vector<index_t> raters,
            const std::optional<matrix_view<const index_t>>& positions) {
    layout_ = layout;
    cfg_ = std::move(cfg);
    raters_ = std::move(raters);
    n_ = layout.length;
    spans_ = layout.visual_spans();
    rows_ = positions ? positions->extent(0) : 1;
    pos0_.resize(static_cast<std::size_t>(rows_ * n_));
    for (index_t r = 0; r < rows_; ++r)
      for (index_t t = 0; t < n_; ++t)
        pos0_[static_cast<std::size_t>(r * n_ + t)] = positions ? (*positions)(r, t) : t;
    pos_ = pos0_;
    origin_.resize(static_cast<std::size_t>(n_));
    std::iota(origin_.begin(), origin_.end(), index_t{0});
  }

  prefill_layout layout_{};
  session_config cfg_{};
  std::size_t next_ = 0;              // index of the next pruning layer in cfg_.schedule
  index_t n_ = 0;                     // current length
  std::vector<visual_span> spans_;    // current visual spans, one per span of the layout
  index_t rows_ = 1;                  // rows of position ids
  std::vector<index_t> raters_;       // current positions of the raters
  std::vector<index_t> pos0_;         // [rows, layout.length] input ids
  std::vector<index_t> pos_;          // [rows, n] current ids
  std::vector<index_t> origin_;       // [n] input position, or −1 for recycled
  std::vector<std::vector<index_t>> seqs_;  // the sequences of the steps done
};

namespace detail {

/// The session's next pruning layer, which `layer` must be (prune and commit).
inline const pruning_layer& session_next(const prefill_session& s, index_t layer) {
  SPARSEVLM_CHECK(!s.finished(), errc::invalid_argument, "layer",
                  concat("no more calls (all ", s.cfg_.schedule.size(),
                         " pruning layers of the session are done)"),
                  layer);
  const pruning_layer& at = s.cfg_.schedule[s.next_];
  SPARSEVLM_CHECK(at.layer == layer, errc::invalid_argument, "layer",
                  concat(at.layer, " (the next pruning layer of the session)"), layer);
  return at;
}

/// The decisions of the session's next step (plan.step and plan.parts), without
/// changing the session (so that a batch can decide every sequence before
/// committing any).
template <class Source, class TH>
layer_plan session_compute(const prefill_session& s, index_t layer, const Source& src,
                           matrix_view<const TH> hidden, workspace& ws) {
  const pruning_layer& at = session_next(s, layer);
  const index_t n = s.n_;
  SPARSEVLM_CHECK(source_length(src) == n, errc::shape_mismatch, source_name(src),
                  concat(n, " (the session's current length)"), source_length(src));

  layer_plan plan;
  plan.layer = layer;
  std::vector<visual_span> holding;  // the spans with tokens left
  std::vector<index_t> counts;       // every span's tokens, for the per_span split
  for (const visual_span& v : s.spans_) {
    if (v.len > 0) holding.push_back(v);
    counts.push_back(v.len);
  }
  step_result& r = plan.step;
  if (holding.empty()) {
    // Nothing left to prune: the identity step (prune_step needs N >= 1).
    SPARSEVLM_CHECK(hidden.extent(0) == n, errc::shape_mismatch, "hidden.extent[0]",
                    concat(n, " (the session's current length)"), hidden.extent(0));
    r.raters = s.raters_;
    r.recycled.dim = hidden.extent(1);
    r.sequence.resize(static_cast<std::size_t>(n));
    std::iota(r.sequence.begin(), r.sequence.end(), index_t{0});
  } else {
    step_options opt = at.options;
    if (opt.scoring.gravity.enabled)
      opt.scoring.gravity.positions =
          std::span<const index_t>(s.pos_.data(), static_cast<std::size_t>(n));
    const std::optional<std::span<const index_t>> raters(s.raters_);
    if (holding.size() == 1) {
      // Either budget: the union is this span, and a fixed keep apportioned over
      // one span is the keep itself (clamped by the step to N − 1).
      r = prune_step(make_step_inputs(matrix_view<const float>(), src, hidden, holding[0], raters),
                     opt, ws);
    } else {
      std::vector<keep_policy> shares;
      span_options so;
      so.budget = s.cfg_.budget;
      so.policy = opt.policy;
      so.recycle = opt.recycle;
      so.scoring = opt.scoring;
      if (so.budget == span_budget::per_span && opt.policy.kind == keep_policy::kind_t::fixed) {
        const std::vector<index_t> k = apportion_keep(opt.policy.keep, counts);
        for (std::size_t i = 0; i < counts.size(); ++i)
          if (counts[i] > 0) shares.push_back(keep_policy::fixed(k[i]));
        so.span_policies = shares;
      }
      spans_result sr = prune_step_spans(
          make_step_inputs(matrix_view<const float>(), src, hidden, visual_span{}, raters),
          std::span<const visual_span>(holding), so, ws);
      r.raters = std::move(sr.raters);
      r.scores = std::move(sr.scores);
      r.rank = sr.rank;
      r.keep_count = sr.keep_count;
      r.keep = std::move(sr.keep);
      r.recycled = std::move(sr.recycled);
      r.sequence = std::move(sr.sequence);
      plan.parts = std::move(sr.spans);
    }
  }
  session_parts(s, plan, holding);
  return plan;
}

/// plan.parts completed to one part per span of the layout (spans without tokens
/// get an empty part); with one span holding tokens, its part from plan.step.
inline void session_parts(const prefill_session& s, layer_plan& plan,
                          const std::vector<visual_span>& holding) {
  const step_result& r = plan.step;
  if (plan.parts.empty() && !holding.empty()) {
    span_part p;
    p.visual = holding[0];
    p.rank = s.cfg_.budget == span_budget::per_span ? r.rank : -1;
    p.keep_count = r.keep_count;
    p.keep = r.keep;
    p.clusters = static_cast<index_t>(r.recycled.clusters.size());
    plan.parts.push_back(std::move(p));
  }
  std::vector<span_part> parts;
  parts.reserve(s.spans_.size());
  std::size_t next = 0;
  index_t clusters = 0;
  for (const visual_span& v : s.spans_) {
    if (v.len > 0) {
      parts.push_back(std::move(plan.parts[next++]));
      clusters = parts.back().first_cluster + parts.back().clusters;
    } else {
      span_part p;
      p.visual = v;
      p.first_cluster = clusters;
      parts.push_back(std::move(p));
    }
  }
  plan.parts = std::move(parts);
}

/// The plan of a step decided elsewhere (prefill_session::commit), after checking
/// that it is a step of the session's one span with tokens, with its raters.
inline layer_plan session_adopt(const prefill_session& s, index_t layer, step_result&& step) {
  const step_options& opt = session_next(s, layer).options;
  std::vector<visual_span> holding;
  for (const visual_span& v : s.spans_)
    if (v.len > 0) holding.push_back(v);
  SPARSEVLM_CHECK(holding.size() == 1, errc::invalid_argument, "spans",
                  "one span with visual tokens for a step decided elsewhere", holding.size());
  const visual_span v = holding[0];
  SPARSEVLM_CHECK(step.raters == s.raters_, errc::invalid_argument, "step.raters",
                  concat("the session's ", s.raters_.size(), " raters"),
                  concat(step.raters.size(), " other positions"));
  const auto R = static_cast<index_t>(s.raters_.size());
  SPARSEVLM_CHECK(step.rank >= 0 && step.rank <= std::min(R, v.len), errc::invalid_argument,
                  "step.rank", concat("in [0, ", std::min(R, v.len), "] (raters x visual tokens)"),
                  step.rank);
  const index_t keep = keep_count(opt.policy, step.rank, v.len, R);
  SPARSEVLM_CHECK(step.keep_count == keep, errc::invalid_argument, "step.keep_count",
                  concat(keep, " (the layer's policy at rank ", step.rank, ")"), step.keep_count);
  SPARSEVLM_CHECK(static_cast<index_t>(step.keep.size()) == keep, errc::invalid_argument,
                  "step.keep", concat(keep, " positions (step.keep_count)"), step.keep.size());
  const index_t pruned = v.len - keep;
  const detail::core::recycle_counts rc = detail::core::recycled_counts(
      pruned, opt.recycle.enabled, opt.recycle.fraction, opt.recycle.cluster_divisor);
  const index_t members = rc.rows, want_c = rc.clusters;
  SPARSEVLM_CHECK(static_cast<index_t>(step.recycled.clusters.size()) == want_c,
                  errc::invalid_argument, "step.recycled.clusters",
                  concat(want_c, " clusters (the layer's recycling of ", pruned, " pruned tokens)"),
                  step.recycled.clusters.size());
  // make_sequence checks the keep set (inside the span, ascending, unique).
  std::vector<index_t> want;
  with_prefix("step.", [&] {
    want = make_sequence(s.n_, v, step.keep,
                         static_cast<index_t>(step.recycled.clusters.size()));
  });
  index_t total = 0;  // cluster members
  std::vector<char> used(static_cast<std::size_t>(v.len), 0);
  for (index_t k : step.keep) used[static_cast<std::size_t>(k - v.start)] = 1;
  for (std::size_t c = 0; c < step.recycled.clusters.size(); ++c) {
    const std::vector<index_t>& cluster = step.recycled.clusters[c];
    total += static_cast<index_t>(cluster.size());
    SPARSEVLM_CHECK(!cluster.empty(), errc::invalid_argument,
                    concat("step.recycled.clusters[", c, "]"), "at least one member", "none");
    for (std::size_t i = 0; i < cluster.size(); ++i) {
      const index_t m = cluster[i];
      SPARSEVLM_CHECK(i == 0 || m > cluster[i - 1], errc::invalid_argument,
                      concat("step.recycled.clusters[", c, "]"),
                      concat("ascending members (> ", i == 0 ? 0 : cluster[i - 1], ")"), m);
      const bool inside = m >= v.start && m < v.end();
      SPARSEVLM_CHECK(inside && !used[static_cast<std::size_t>(m - v.start)],
                      errc::invalid_argument, concat("step.recycled.clusters[", c, "]"),
                      concat("pruned positions of the span [", v.start, ", ", v.end(),
                             "), each in one cluster"),
                      m);
      used[static_cast<std::size_t>(m - v.start)] = 1;
    }
  }
  SPARSEVLM_CHECK(total == members, errc::invalid_argument, "step.recycled.clusters",
                  concat(members, " members in all (the recycled share of ", pruned, ")"), total);
  SPARSEVLM_CHECK(step.sequence == want, errc::invalid_argument, "step.sequence",
                  concat("make_sequence of the keep set and ", step.recycled.clusters.size(),
                         " clusters (", want.size(), " entries)"),
                  concat(step.sequence.size(), " other entries"));
  layer_plan plan;
  plan.layer = layer;
  plan.step = std::move(step);
  session_parts(s, plan, holding);
  return plan;
}

/// Moves the session to the sequence of `p` (a result of session_compute on it).
inline layer_plan session_commit(prefill_session& s, layer_plan&& p) {
  const step_result& r = p.step;
  const index_t n_old = s.n_;
  const index_t n = static_cast<index_t>(r.sequence.size());
  const index_t removed = n_old - n;  // visual tokens gone (pruned − recycled)

  p.length = n;
  p.spans.clear();
  p.spans.reserve(s.spans_.size());
  index_t gone = 0;  // tokens removed before the span
  for (const span_part& part : p.parts) {
    const index_t len = part.keep_count + part.clusters;
    p.spans.push_back({part.visual.start - gone, len});
    gone += part.visual.len - len;
  }
  SPARSEVLM_ASSERT(gone == removed);
  p.visual = {p.spans.front().start, p.spans.back().end() - p.spans.front().start};
  p.rows = s.rows_;
  p.positions.resize(static_cast<std::size_t>(s.rows_ * n));
  pruned_positions(r.sequence, r.recycled.clusters, s.positions(), s.cfg_.positions,
                   matrix_view<index_t>(p.positions.data(), {s.rows_, n}, "positions"));
  p.kv_sequence = kv_sequence(r.sequence);

  std::vector<index_t> origin(static_cast<std::size_t>(n));
  for (index_t i = 0; i < n; ++i) {
    const index_t q = r.sequence[static_cast<std::size_t>(i)];
    origin[static_cast<std::size_t>(i)] = q >= 0 ? s.origin_[static_cast<std::size_t>(q)] : -1;
  }
  std::vector<index_t> raters = s.raters_;
  for (index_t& q : raters) q -= removed;  // text after the last span
  std::vector<index_t> pos = p.positions;
  std::vector<index_t> seq = r.sequence;
  std::vector<visual_span> spans = p.spans;
  s.seqs_.reserve(s.seqs_.size() + 1);

  // Nothing below throws: the session changes all at once.
  s.seqs_.push_back(std::move(seq));
  s.origin_.swap(origin);
  s.raters_.swap(raters);
  s.pos_.swap(pos);
  s.spans_.swap(spans);
  s.n_ = n;
  ++s.next_;
  layer_plan out = std::move(p);
  return out;
}

}  // namespace detail

}  // namespace sparsevlm
