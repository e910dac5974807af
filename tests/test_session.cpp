// The prefill session (session.hpp): a multi-layer synthetic prefill in which a
// tiny model recomputes its attention from the compacted hidden states at every
// layer, and the test tracks every token by an identity of its own to check the
// session's raters, spans, position ids and KV bookkeeping against it.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <optional>
#include <random>
#include <span>
#include <thread>
#include <vector>

#include <sparsevlm/batch.hpp>
#include <sparsevlm/session.hpp>

#include "test_util.hpp"
#include "toy_decoder.hpp"

using sparsevlm::errc;
using sparsevlm::index_t;
using sparsevlm::keep_policy;
using sparsevlm::kv_layout;
using sparsevlm::layer_plan;
using sparsevlm::matrix_view;
using sparsevlm::position_policy;
using sparsevlm::prefill_layout;
using sparsevlm::prefill_session;
using sparsevlm::pruning_layer;
using sparsevlm::session_config;
using sparsevlm::step_options;
using sparsevlm::step_result;
using sparsevlm::tensor3_view;
using sparsevlm::visual_span;
using sparsevlm::workspace;

using seq_t = std::vector<index_t>;

namespace {

constexpr index_t kPrefix = 3, kVisual = 24, kText = 8, kLen = kPrefix + kVisual + kText;
using svt_toy::kDim;
using svt_toy::kHeadDim;
using svt_toy::kHeads;
using svt_toy::kLayers;
using svt_toy::toy_model;
constexpr auto renumber = position_policy::renumber;
constexpr auto keep_original = position_policy::keep_original;

/// Input embeddings [kLen, d].
std::vector<float> toy_embeds(unsigned seed) {
  std::mt19937 g(seed);
  return svt::random_floats(g, static_cast<std::size_t>(kLen * kDim), -1.0f, 1.0f);
}

/// Position ids before layer 0, row-major [rows, kLen]: 0..L−1 for one row;
/// for three, Qwen2-VL-style mRoPE: prefix (t, t, t), a 4×6 image at t = 3
/// (h = 3 + row, w = 3 + col), then text from max + 1 = 9 in every row.
seq_t toy_positions(index_t rows) {
  seq_t ids(static_cast<std::size_t>(rows * kLen));
  for (index_t r = 0; r < rows; ++r)
    for (index_t p = 0; p < kLen; ++p) {
      index_t v = p;
      if (rows == 3) {
        if (p >= kPrefix && p < kPrefix + kVisual) {
          const index_t j = p - kPrefix;
          v = r == 0 ? 3 : r == 1 ? 3 + j / 6 : 3 + j % 6;
        } else if (p >= kPrefix + kVisual) {
          v = 9 + (p - kPrefix - kVisual);
        }
      }
      ids[static_cast<std::size_t>(r * kLen + p)] = v;
    }
  return ids;
}

/// A step option set with a fixed or rank policy.
step_options fixed_options(index_t keep, bool recycle) {
  step_options o;
  o.policy = keep_policy::fixed(keep);
  o.recycle.enabled = recycle;
  return o;
}

/// v1.5-like: fixed 16, 10, 6 at layers 1, 3, 5 of the 7-layer toy.
session_config v15_config(bool recycle, position_policy policy) {
  session_config c;
  c.layers = kLayers;
  c.positions = policy;
  c.schedule = {{1, fixed_options(16, recycle)},
                {3, fixed_options(10, recycle)},
                {5, fixed_options(6, recycle)}};
  return c;
}

void check_same(const step_result& a, const step_result& b) { svt::check_same_result(a, b); }

/// Identity of a token for the test: its input position, or 1000·(step + 1) +
/// cluster for a token recycled at that step.
bool is_recycled_id(index_t id) { return id >= 1000; }
bool is_visual_id(index_t id) {
  return is_recycled_id(id) || (id >= kPrefix && id < kPrefix + kVisual);
}

struct prefill_options {
  session_config config;
  index_t rows = 1;
  bool use_qk = false;
  bool gravity = false;  // enable the RoPE gravity correction at every pruning layer
};

struct prefill_record {
  std::vector<layer_plan> plans;
  std::vector<float> hidden;  // final [n, d]
  seq_t ids;                  // final token identities
  index_t length = 0;
};

/// Runs the toy prefill with a session and checks, at every pruning layer, the
/// session against the test's own bookkeeping (token identities).
prefill_record run_prefill(const prefill_options& po, unsigned seed = 7) {
  const toy_model model(seed);
  const std::vector<float> embeds = toy_embeds(seed + 1);
  const seq_t pos0 = toy_positions(po.rows);
  const index_t rows = po.rows;
  session_config cfg = po.config;
  for (pruning_layer& s : cfg.schedule)
    if (po.gravity) {
      s.options.scoring.gravity.enabled = true;
      s.options.scoring.gravity.head_dim = kHeadDim;
    }

  workspace ws;
  const prefill_layout layout = prefill_layout::from_counts(kPrefix, kVisual, kText);
  prefill_session session(layout, matrix_view<const float>(embeds.data(), {kLen, kDim}), cfg, ws,
                          matrix_view<const index_t>(pos0.data(), {rows, kLen}));

  // Raters are chosen once, from the input embeddings.
  const seq_t raters0 =
      sparsevlm::select_raters(matrix_view<const float>(embeds.data(), {kLen, kDim}), layout.visual);
  REQUIRE(!raters0.empty());
  CHECK(seq_t(session.raters().begin(), session.raters().end()) == raters0);

  index_t n = kLen;
  std::vector<float> X = embeds;
  seq_t ids(static_cast<std::size_t>(kLen));
  for (index_t i = 0; i < kLen; ++i) ids[static_cast<std::size_t>(i)] = i;
  seq_t pos = pos0;  // the test's own current ids [rows, n]

  // KV caches, [tokens, heads, head_dim] per layer: as written ("whole") and
  // compacted at every step to the full new sequence (merge_kv + compact_kv).
  std::vector<std::vector<float>> kv_whole(kLayers), kv_full(kLayers);
  std::vector<seq_t> written_ids(kLayers);
  std::vector<index_t> full_len(kLayers, 0);

  prefill_record rec;
  for (index_t l = 0; l < kLayers; ++l) {
    const auto L = static_cast<std::size_t>(l);
    CHECK(session.length() == n);
    const std::vector<float> A = model.attention(l, X, n);
    // The layer's K cache ([n, H, dh]) as it is written.
    const std::vector<float> kh = model.keys(l, X, n);  // [H, n, dh]
    kv_whole[L].resize(static_cast<std::size_t>(n * kDim));
    for (index_t t = 0; t < n; ++t)
      for (index_t h = 0; h < kHeads; ++h)
        for (index_t c = 0; c < kHeadDim; ++c)
          kv_whole[L][static_cast<std::size_t>((t * kHeads + h) * kHeadDim + c)] =
              kh[static_cast<std::size_t>((h * n + t) * kHeadDim + c)];
    kv_full[L] = kv_whole[L];
    full_len[L] = n;
    written_ids[L] = ids;
    std::vector<float> out = model.forward(l, X, n, A);

    if (!session.prunes_after(l)) {
      X = out;
      continue;
    }
    // The test's own view of the layer: visual span from the identities, the
    // raters as the same text tokens, then a direct prune_step to compare.
    index_t vstart = -1, vlen = 0;
    for (index_t i = 0; i < n; ++i)
      if (is_visual_id(ids[static_cast<std::size_t>(i)])) {
        if (vstart < 0) vstart = i;
        CHECK(i == vstart + vlen);  // contiguous
        ++vlen;
      }
    CHECK(session.visual().start == vstart);
    CHECK(session.visual().len == vlen);
    seq_t raters;
    for (index_t i = 0; i < n; ++i)
      if (std::find(raters0.begin(), raters0.end(), ids[static_cast<std::size_t>(i)]) != raters0.end())
        raters.push_back(i);
    CHECK(raters.size() == raters0.size());
    CHECK(seq_t(session.raters().begin(), session.raters().end()) == raters);
    for (index_t i = 0; i < n; ++i) {
      const index_t id = ids[static_cast<std::size_t>(i)];
      CHECK(session.origins()[static_cast<std::size_t>(i)] == (is_recycled_id(id) ? -1 : id));
    }
    for (index_t r = 0; r < rows; ++r)
      for (index_t i = 0; i < n; ++i)
        CHECK(session.positions()(r, i) == pos[static_cast<std::size_t>(r * n + i)]);

    step_options opt = cfg.schedule[session.steps_done()].options;
    if (po.gravity) opt.scoring.gravity.positions = std::span<const index_t>(pos.data(), static_cast<std::size_t>(n));
    const std::optional<std::span<const index_t>> rview(raters);
    const matrix_view<const float> hv(out.data(), {n, kDim});
    step_result direct;
    layer_plan plan;
    if (po.use_qk) {
      const std::vector<float> q = model.queries(l, X, n), k = model.keys(l, X, n);
      sparsevlm::qk_view<float, float> qk{tensor3_view<const float>(q.data(), {kHeads, n, kHeadDim}),
                                          tensor3_view<const float>(k.data(), {kHeads, n, kHeadDim}),
                                          std::nullopt, 0.0};
      direct = sparsevlm::prune_step(
          sparsevlm::step_inputs_qk<float, float, float, float>{matrix_view<const float>(), qk, hv,
                                                                visual_span{vstart, vlen}, rview},
          opt);
      plan = session.prune(l, qk, hv, ws);
    } else {
      const tensor3_view<const float> av(A.data(), {kHeads, n, n});
      direct = sparsevlm::prune_step(
          sparsevlm::step_inputs<float, float, float>{matrix_view<const float>(), av, hv,
                                                      visual_span{vstart, vlen}, rview},
          opt);
      plan = session.prune(l, av, hv, ws);
    }
    check_same(plan.step, direct);
    const step_result& r = plan.step;
    const index_t n_new = static_cast<index_t>(r.sequence.size());
    const index_t c = static_cast<index_t>(r.recycled.clusters.size());
    CHECK(plan.layer == l);
    CHECK(plan.length == n_new);
    CHECK(plan.visual.start == kPrefix);
    CHECK(plan.visual.len == r.keep_count + c);
    CHECK(plan.kv_sequence == sparsevlm::kv_sequence(r.sequence));
    CHECK(session.kv_rows(l) == plan.kv_sequence);

    // Expected ids after the step, from the test's own rule.
    seq_t pos_new(static_cast<std::size_t>(rows * n_new));
    for (index_t row = 0; row < rows; ++row)
      for (index_t i = 0; i < n_new; ++i) {
        const index_t p = r.sequence[static_cast<std::size_t>(i)];
        index_t v = i;
        if (cfg.positions == keep_original) {
          const index_t src = p >= 0 ? p : r.recycled.clusters[static_cast<std::size_t>(-p - 1)][0];
          v = pos[static_cast<std::size_t>(row * n + src)];
        }
        pos_new[static_cast<std::size_t>(row * n_new + i)] = v;
      }
    CHECK(plan.positions == pos_new);
    CHECK(plan.rows == rows);

    // Option 3 for every cache written so far: one row per recycled token,
    // then the full new sequence.
    for (index_t j = 0; j <= l; ++j) {
      const auto J = static_cast<std::size_t>(j);
      const tensor3_view<float> cache(kv_full[J].data(), {full_len[J], kHeads, kHeadDim});
      std::vector<float> merged(static_cast<std::size_t>(c * kDim));
      const tensor3_view<float> mv(merged.data(), {c, kHeads, kHeadDim});
      sparsevlm::merge_kv(r.recycled.clusters, tensor3_view<const float>(cache),
                          kv_layout::tokens_heads_dim, mv);
      full_len[J] = sparsevlm::compact_kv(r.sequence, cache, kv_layout::tokens_heads_dim,
                                          tensor3_view<const float>(mv));
    }

    // The engine's side: hidden states and the test's identities and ids.
    const matrix_view<float> hio(out.data(), {n, kDim});
    sparsevlm::apply_plan_inplace(r.sequence, hio,
                                  matrix_view<const float>(r.recycled.merged.data(), {c, kDim}));
    seq_t ids_new(static_cast<std::size_t>(n_new));
    const index_t step_no = static_cast<index_t>(session.steps_done());  // already advanced
    for (index_t i = 0; i < n_new; ++i) {
      const index_t p = r.sequence[static_cast<std::size_t>(i)];
      ids_new[static_cast<std::size_t>(i)] =
          p >= 0 ? ids[static_cast<std::size_t>(p)] : 1000 * step_no + (-p - 1);
    }
    ids = ids_new;
    pos = pos_new;
    n = n_new;
    out.resize(static_cast<std::size_t>(n * kDim));
    X = out;
    rec.plans.push_back(plan);

    // The session's state matches the plan.
    CHECK(session.length() == n);
    CHECK(session.visual().start == plan.visual.start);
    CHECK(session.visual().len == plan.visual.len);
    for (index_t row = 0; row < rows; ++row)
      for (index_t i = 0; i < n; ++i)
        CHECK(session.positions()(row, i) == pos[static_cast<std::size_t>(row * n + i)]);
  }
  CHECK(session.finished());
  CHECK_FALSE(session.next_layer().has_value());

  // Text tokens all survive, in order, at the end.
  for (index_t t = 0; t < kText; ++t)
    CHECK(ids[static_cast<std::size_t>(n - kText + t)] == kPrefix + kVisual + t);
  // Raters are still the same text tokens.
  for (std::size_t i = 0; i < raters0.size(); ++i)
    CHECK(session.origins()[static_cast<std::size_t>(session.raters()[i])] == raters0[i]);
  // Decode position.
  const index_t mx = *std::max_element(pos0.begin(), pos0.end());
  CHECK(session.next_position() == (cfg.positions == renumber ? n : mx + 1));

  // Caches kept whole, compacted at the end with kv_rows: each layer keeps the
  // rows of the current tokens it was written with, in order.
  for (index_t j = 0; j < kLayers; ++j) {
    const auto J = static_cast<std::size_t>(j);
    const seq_t rows_j = session.kv_rows(j);
    seq_t expect_ids;
    for (index_t id : ids)
      if (std::find(written_ids[J].begin(), written_ids[J].end(), id) != written_ids[J].end())
        expect_ids.push_back(id);
    seq_t got_ids;
    for (index_t q : rows_j) got_ids.push_back(written_ids[J][static_cast<std::size_t>(q)]);
    CHECK(got_ids == expect_ids);
    std::vector<float> cache = kv_whole[J];
    const index_t tokens = static_cast<index_t>(written_ids[J].size());
    const index_t kept = sparsevlm::compact_kv(
        rows_j, tensor3_view<float>(cache.data(), {tokens, kHeads, kHeadDim}),
        kv_layout::tokens_heads_dim);
    REQUIRE(kept == static_cast<index_t>(rows_j.size()));
    for (index_t i = 0; i < kept; ++i)
      CHECK(std::memcmp(&cache[static_cast<std::size_t>(i * kDim)],
                        &kv_whole[J][static_cast<std::size_t>(rows_j[static_cast<std::size_t>(i)] * kDim)],
                        kDim * sizeof(float)) == 0);
    // Option 3, step by step: every layer holds the n current tokens; the real
    // ones carry the rows they were written with.
    CHECK(full_len[J] == n);
    for (index_t i = 0; i < n; ++i) {
      const auto it = std::find(written_ids[J].begin(), written_ids[J].end(), ids[static_cast<std::size_t>(i)]);
      if (it == written_ids[J].end()) continue;  // recycled after layer j: a merged row
      const auto q = static_cast<std::size_t>(it - written_ids[J].begin());
      CHECK(std::memcmp(&kv_full[J][static_cast<std::size_t>(i * kDim)], &kv_whole[J][q * kDim],
                        kDim * sizeof(float)) == 0);
    }
  }
  rec.hidden = X;
  rec.ids = ids;
  rec.length = n;
  return rec;
}

}  // namespace

TEST_CASE("session: v1.5-like prefill, fixed 16/10/6 at layers 1/3/5, both policies, 1 and 3 rows") {
  for (bool recycle : {true, false})
    for (position_policy policy : {renumber, keep_original})
      for (index_t rows : {index_t{1}, index_t{3}}) {
        CAPTURE(recycle);
        CAPTURE(static_cast<int>(policy));
        CAPTURE(rows);
        const prefill_record rec = run_prefill({v15_config(recycle, policy), rows, false, false});
        REQUIRE(rec.plans.size() == 3);
        // Visual tokens per pruning layer: N, then keep + c.
        const index_t c1 = recycle ? 1 : 0;  // s = floor(0.3·n) + 1 <= 3, c = floor(s/10) + 1
        CHECK(rec.plans[0].visual.len == 16 + c1);
        CHECK(rec.plans[1].visual.len == 10 + c1);
        CHECK(rec.plans[2].visual.len == 6 + c1);
        CHECK(rec.length == kPrefix + 6 + c1 + kText);
        // A token recycled at one step is a visual token at the next: it is
        // scored and may be kept or pruned there.
        if (recycle) {
          const step_result& s2 = rec.plans[1].step;
          CHECK(s2.scores.size() == 17);
        }
      }
}

TEST_CASE("session: rank policy, recycling, and the Q/K path") {
  session_config c;
  c.layers = kLayers;
  step_options o;
  o.policy = keep_policy::rank(3.0, 1.0);
  c.schedule = {{0, o}, {2, o}, {4, o}};
  for (bool qk : {false, true}) {
    CAPTURE(qk);
    const prefill_record rec = run_prefill({c, 1, qk, false}, 11);
    REQUIRE(rec.plans.size() == 3);
    for (const layer_plan& p : rec.plans) CHECK(p.step.rank >= 1);
  }
}

TEST_CASE("session: SparseVLM+-like keep_original with the gravity correction") {
  // The session hands the gravity the current (original) ids of the tokens.
  const prefill_record rec =
      run_prefill({v15_config(false, keep_original), 1, false, true}, 5);
  REQUIRE(rec.plans.size() == 3);
}

TEST_CASE("session: layers the session does not prune, and an empty schedule") {
  session_config c = v15_config(true, renumber);
  const std::vector<float> e = toy_embeds(3);
  workspace ws;
  prefill_session s(prefill_layout::from_counts(kPrefix, kVisual, kText),
                    matrix_view<const float>(e.data(), {kLen, kDim}), c, ws);
  CHECK(s.next_layer() == index_t{1});
  for (index_t l : {0, 2, 3, 4, 5, 6}) CHECK_FALSE(s.prunes_after(l));
  CHECK(s.prunes_after(1));
  CHECK(s.length() == kLen);
  CHECK(s.positions().extent(0) == 1);
  CHECK(s.positions()(0, 7) == 7);
  CHECK(s.kv_rows(6).size() == static_cast<std::size_t>(kLen));

  session_config none;
  none.layers = kLayers;
  prefill_session idle(prefill_layout::from_counts(kPrefix, kVisual, kText),
                       matrix_view<const float>(e.data(), {kLen, kDim}), none, ws);
  CHECK(idle.finished());
  for (index_t l = 0; l < kLayers; ++l) CHECK_FALSE(idle.prunes_after(l));
  CHECK(idle.next_position() == kLen);
}

TEST_CASE("session: from a preset") {
  const sparsevlm::preset& p = sparsevlm::find_preset("plus-64");
  sparsevlm::model_shape m = sparsevlm::find_model("llava-1.5-7b");
  const session_config c = sparsevlm::make_session_config(p, m);
  CHECK(c.layers == 32);
  CHECK(c.positions == keep_original);
  REQUIRE(c.schedule.size() == 3);
  CHECK(c.schedule[0].layer == 2);
  CHECK(c.schedule[2].options.policy.keep == 20);
  CHECK(c.schedule[0].options.scoring.top_heads == 14);
  CHECK(c.schedule[0].options.scoring.gravity.enabled);
  CHECK_FALSE(c.schedule[0].options.recycle.enabled);
  // The preset on a 576-token LLaVA sequence, with caller raters.
  const index_t L = 35 + 576 + 10;
  const seq_t raters{612, 615};
  prefill_session s(prefill_layout::from_counts(35, 576, 10), raters, c);
  CHECK(s.visual().len == 576);
  // Too few visual tokens for the preset's keeps.
  SV_CHECK_THROWS(errc::invalid_argument, "config.schedule[0].options.policy.keep: expected < 50",
                  prefill_session(prefill_layout::from_counts(35, 50, 10), raters, c));
  CHECK(L == s.length());
}

TEST_CASE("session: bad layouts and schedules give clear errors") {
  const std::vector<float> e = toy_embeds(3);
  const matrix_view<const float> ev(e.data(), {kLen, kDim});
  workspace ws;
  const prefill_layout good = prefill_layout::from_counts(kPrefix, kVisual, kText);
  const session_config cfg = v15_config(true, renumber);

  SV_CHECK_THROWS(errc::shape_mismatch, "layout.visual: expected a span inside [0, 35)",
                  prefill_session(prefill_layout{kLen, visual_span{30, 10}}, ev, cfg, ws));
  SV_CHECK_THROWS(errc::shape_mismatch, "layout.visual.len: expected >= 1",
                  prefill_session(prefill_layout{kLen, visual_span{3, 0}}, ev, cfg, ws));
  SV_CHECK_THROWS(errc::shape_mismatch, "layout.visual.start",
                  prefill_session(prefill_layout{kLen, visual_span{-1, 4}}, ev, cfg, ws));
  SV_CHECK_THROWS(errc::shape_mismatch, "embeds.extent[0]: expected 36 (layout.length), got 35",
                  prefill_session(prefill_layout{kLen + 1, visual_span{3, 24}}, ev, cfg, ws));

  session_config c = cfg;
  std::swap(c.schedule[0], c.schedule[1]);
  SV_CHECK_THROWS(errc::invalid_argument,
                  "config.schedule[1].layer: expected > 3 (strictly increasing), got 1",
                  prefill_session(good, ev, c, ws));
  c = cfg;
  c.schedule[2].layer = 6;
  SV_CHECK_THROWS(errc::invalid_argument,
                  "config.schedule[2].layer: expected in [0, 6) for a 7-layer model",
                  prefill_session(good, ev, c, ws));
  c = cfg;
  c.schedule[0].layer = -1;
  SV_CHECK_THROWS(errc::invalid_argument, "config.schedule[0].layer", prefill_session(good, ev, c, ws));
  c = cfg;
  c.layers = 0;
  SV_CHECK_THROWS(errc::invalid_argument, "config.layers: expected >= 1", prefill_session(good, ev, c, ws));
  // Budgets larger than the visual tokens entering the step.
  c = cfg;
  c.schedule[0].options.policy.keep = 24;
  SV_CHECK_THROWS(errc::invalid_argument,
                  "config.schedule[0].options.policy.keep: expected < 24 (visual tokens entering "
                  "the step after layer 1), got 24",
                  prefill_session(good, ev, c, ws));
  c = cfg;
  c.schedule[1].options.policy.keep = 17;  // 16 kept + 1 recycled enter layer 3's step
  SV_CHECK_THROWS(errc::invalid_argument, "config.schedule[1].options.policy.keep: expected < 17",
                  prefill_session(good, ev, c, ws));
  c.schedule[0].options.recycle.enabled = false;  // now 16 enter
  SV_CHECK_THROWS(errc::invalid_argument, "config.schedule[1].options.policy.keep: expected < 16",
                  prefill_session(good, ev, c, ws));
  c = cfg;
  c.schedule[0].options.policy.keep = -2;
  SV_CHECK_THROWS(errc::invalid_argument, "config.schedule[0].options.policy.keep: expected >= 0",
                  prefill_session(good, ev, c, ws));
  c = cfg;
  c.schedule[1].options.recycle.fraction = 0.0;
  SV_CHECK_THROWS(errc::invalid_argument, "config.schedule[1].options.", prefill_session(good, ev, c, ws));
  c = cfg;
  c.positions = static_cast<position_policy>(9);
  SV_CHECK_THROWS(errc::invalid_argument, "policy", prefill_session(good, ev, c, ws));

  // Position ids.
  const seq_t ids = toy_positions(3);
  SV_CHECK_THROWS(errc::shape_mismatch, "positions.extent[1]: expected 35 (layout.length), got 34",
                  prefill_session(good, ev, cfg, ws, matrix_view<const index_t>(ids.data(), {3, 34})));
  SV_CHECK_THROWS(errc::shape_mismatch, "positions.extent[0] (rows): expected >= 1",
                  prefill_session(good, ev, cfg, ws, matrix_view<const index_t>(ids.data(), {0, 35})));
  c = cfg;
  c.schedule[0].options.scoring.gravity.enabled = true;
  c.schedule[0].options.scoring.gravity.head_dim = kHeadDim;
  SV_CHECK_THROWS(errc::invalid_argument, "config.schedule[0].options.scoring.gravity.enabled",
                  prefill_session(good, ev, c, ws, matrix_view<const index_t>(ids.data(), {3, 35})));
  const seq_t own(35, 0);
  c.schedule[0].options.scoring.gravity.positions = own;
  SV_CHECK_THROWS(errc::invalid_argument,
                  "config.schedule[0].options.scoring.gravity.positions: expected empty",
                  prefill_session(good, ev, c, ws));

  // Caller raters outside the text.
  const seq_t bad_raters{5};
  SV_CHECK_THROWS(errc::invalid_argument, "raters[0]", prefill_session(good, bad_raters, cfg));
}

TEST_CASE("session: prune out of order, past the end, or with the wrong length leaves it unchanged") {
  const toy_model model(7);
  const std::vector<float> e = toy_embeds(8);
  workspace ws;
  session_config cfg = v15_config(true, renumber);
  cfg.schedule.resize(1);
  prefill_session s(prefill_layout::from_counts(kPrefix, kVisual, kText),
                    matrix_view<const float>(e.data(), {kLen, kDim}), cfg, ws);
  const std::vector<float> A = model.attention(1, e, kLen);
  const std::vector<float> H = model.forward(1, e, kLen, A);
  const tensor3_view<const float> av(A.data(), {kHeads, kLen, kLen});
  const matrix_view<const float> hv(H.data(), {kLen, kDim});

  SV_CHECK_THROWS(errc::invalid_argument,
                  "layer: expected 1 (the next pruning layer of the session), got 3",
                  s.prune(3, av, hv, ws));
  SV_CHECK_THROWS(errc::invalid_argument, "layer: expected 1", s.prune(0, av, hv, ws));
  const tensor3_view<const float> short_av(A.data(), {kHeads, kLen - 1, kLen - 1});
  SV_CHECK_THROWS(errc::shape_mismatch,
                  "attn.extent[1]: expected 35 (the session's current length), got 34",
                  s.prune(1, short_av, hv, ws));
  SV_CHECK_THROWS(errc::shape_mismatch, "hidden.extent[0]",
                  s.prune(1, av, matrix_view<const float>(H.data(), {kLen - 1, kDim}), ws));
  CHECK(s.length() == kLen);
  CHECK(s.steps_done() == 0);
  CHECK(s.visual().len == kVisual);

  const layer_plan p = s.prune(1, av, hv, ws);
  CHECK(p.length == kLen - kVisual + 16 + 1);
  CHECK(s.finished());
  SV_CHECK_THROWS(errc::invalid_argument, "layer: expected no more calls (all 1 pruning layers",
                  s.prune(3, av, hv, ws));
  SV_CHECK_THROWS(errc::invalid_argument, "layer: expected in [0, 7)", (void)s.kv_rows(7));
}

TEST_CASE("session: commit of a step decided elsewhere == prune, and bad steps change nothing") {
  const toy_model model(7);
  const std::vector<float> e = toy_embeds(8);
  workspace ws;
  const session_config cfg = v15_config(true, renumber);
  const prefill_layout layout = prefill_layout::from_counts(kPrefix, kVisual, kText);
  prefill_session by_prune(layout, matrix_view<const float>(e.data(), {kLen, kDim}), cfg, ws);
  prefill_session by_commit(layout, matrix_view<const float>(e.data(), {kLen, kDim}), cfg, ws);
  std::vector<float> X = e;
  index_t n = kLen;
  for (const pruning_layer& at : cfg.schedule) {
    const std::vector<float> A = model.attention(at.layer, X, n);
    const std::vector<float> H = model.forward(at.layer, X, n, A);
    const tensor3_view<const float> av(A.data(), {kHeads, n, n});
    const matrix_view<const float> hv(H.data(), {n, kDim});
    const std::optional<std::span<const index_t>> rv(by_commit.raters());
    const step_result step = sparsevlm::prune_step(
        sparsevlm::step_inputs<float, float, float>{matrix_view<const float>(), av, hv,
                                                    by_commit.visual(), rv},
        at.options);

    // Refused steps, each leaving the session as it was.
    step_result bad = step;
    bad.raters.pop_back();
    SV_CHECK_THROWS(errc::invalid_argument, "step.raters: expected the session's",
                    by_commit.commit(at.layer, bad));
    bad = step;
    bad.sequence.back() = 0;
    SV_CHECK_THROWS(errc::invalid_argument, "step.sequence: expected make_sequence",
                    by_commit.commit(at.layer, bad));
    bad = step;
    bad.keep.front() = 0;  // in the prefix
    SV_CHECK_THROWS(errc::invalid_argument, "step.keep", by_commit.commit(at.layer, bad));
    bad = step;
    bad.keep_count += 1;
    SV_CHECK_THROWS(errc::invalid_argument, "step.keep_count: expected", by_commit.commit(at.layer, bad));
    bad = step;
    bad.rank = static_cast<index_t>(step.raters.size()) + 1;
    SV_CHECK_THROWS(errc::invalid_argument, "step.rank: expected in [0, ", by_commit.commit(at.layer, bad));
    bad = step;
    bad.recycled.clusters.emplace_back();
    SV_CHECK_THROWS(errc::invalid_argument, "step.recycled.clusters: expected", by_commit.commit(at.layer, bad));
    REQUIRE(!step.recycled.clusters.empty());  // v15_config(true, ...) recycles
    bad = step;
    bad.recycled.clusters[0] = {step.keep.front()};  // a kept token
    SV_CHECK_THROWS(errc::invalid_argument, "step.recycled.clusters[0]: expected pruned positions",
                    by_commit.commit(at.layer, bad));
    for (std::size_t c = 0; c < step.recycled.clusters.size(); ++c) {
      if (step.recycled.clusters[c].size() < 2) continue;
      bad = step;
      std::reverse(bad.recycled.clusters[c].begin(), bad.recycled.clusters[c].end());
      SV_CHECK_THROWS(errc::invalid_argument, "expected ascending members",
                      by_commit.commit(at.layer, bad));
      break;
    }
    SV_CHECK_THROWS(errc::invalid_argument, "layer: expected", by_commit.commit(at.layer + 1, step));
    CHECK(by_commit.length() == n);

    const layer_plan a = by_prune.prune(at.layer, av, hv, ws);
    const layer_plan b = by_commit.commit(at.layer, step);
    check_same(b.step, a.step);
    CHECK(b.length == a.length);
    CHECK(b.kv_sequence == a.kv_sequence);
    CHECK(b.positions == a.positions);
    CHECK(b.spans.size() == a.spans.size());
    CHECK(b.parts.size() == 1);
    CHECK(b.parts[0].keep == a.parts[0].keep);
    CHECK(b.parts[0].clusters == a.parts[0].clusters);
    CHECK(seq_t(by_commit.raters().begin(), by_commit.raters().end()) ==
          seq_t(by_prune.raters().begin(), by_prune.raters().end()));
    CHECK(seq_t(by_commit.origins().begin(), by_commit.origins().end()) ==
          seq_t(by_prune.origins().begin(), by_prune.origins().end()));
    // The next layer runs on the compacted hidden states.
    std::vector<float> next(static_cast<std::size_t>(a.length * kDim));
    sparsevlm::apply_plan(a.step.sequence, hv,
                          matrix_view<const float>(a.step.recycled.merged.data(),
                                                   {static_cast<index_t>(a.step.recycled.clusters.size()), kDim}),
                          matrix_view<float>(next.data(), {a.length, kDim}));
    X = std::move(next);
    n = a.length;
  }
  CHECK(by_commit.finished());
  for (index_t l = 0; l < kLayers; ++l) CHECK(by_commit.kv_rows(l) == by_prune.kv_rows(l));
}

TEST_CASE("session: a rank step that keeps nothing leaves an identity step after it") {
  // Rank policy with scale 0, recycling off: keep = 0, the visual span empties,
  // and the next pruning layer keeps every token.
  const toy_model model(7);
  const std::vector<float> e = toy_embeds(8);
  workspace ws;
  session_config cfg;
  cfg.layers = kLayers;
  step_options o;
  o.policy = keep_policy::rank(0.0, 0.0);
  o.recycle.enabled = false;
  cfg.schedule = {{1, o}, {2, o}};
  prefill_session s(prefill_layout::from_counts(kPrefix, kVisual, kText),
                    matrix_view<const float>(e.data(), {kLen, kDim}), cfg, ws);
  std::vector<float> A = model.attention(1, e, kLen);
  std::vector<float> H = model.forward(1, e, kLen, A);
  const layer_plan p1 = s.prune(1, tensor3_view<const float>(A.data(), {kHeads, kLen, kLen}),
                                matrix_view<const float>(H.data(), {kLen, kDim}), ws);
  REQUIRE(p1.visual.len == 0);
  const index_t n = p1.length;
  CHECK(n == kPrefix + kText);
  sparsevlm::apply_plan_inplace(p1.step.sequence, matrix_view<float>(H.data(), {kLen, kDim}),
                                matrix_view<const float>());
  H.resize(static_cast<std::size_t>(n * kDim));
  A = model.attention(2, H, n);
  const layer_plan p2 = s.prune(2, tensor3_view<const float>(A.data(), {kHeads, n, n}),
                                matrix_view<const float>(H.data(), {n, kDim}), ws);
  CHECK(p2.length == n);
  CHECK(p2.step.sequence == sparsevlm::kv_sequence(p2.step.sequence));
  for (index_t i = 0; i < n; ++i) CHECK(p2.step.sequence[static_cast<std::size_t>(i)] == i);
  CHECK(s.raters().size() == p1.step.raters.size());
}

// ---- prune_sessions: a batched prefill of ragged sessions ---------------------

namespace {

/// A 2-thread parallel_for built on std::thread (worker ids 0 and 1).
void two_threads(index_t n, const sparsevlm::parallel_body& body) {
  std::atomic<index_t> next{0};
  const auto run = [&](index_t w) {
    for (index_t i = next++; i < n; i = next++) body(i, w);
  };
  std::thread t(run, 1);
  run(0);
  t.join();
}

struct seq_spec {
  index_t prefix, visual, text;
  session_config config;
};

}  // namespace

TEST_CASE("session: batched sessions (prune_sessions, compact_packed) == one by one") {
  // Five ragged requests, each with its own schedule, budget and policy; the
  // toy's layers run on one packed [total, d] array.
  const toy_model model(21);
  std::vector<seq_spec> specs;
  {
    session_config a = v15_config(true, renumber);
    session_config b = v15_config(false, keep_original);
    session_config c;
    c.layers = kLayers;
    step_options ro;
    ro.policy = keep_policy::rank(2.0, 2.0);
    c.schedule = {{0, ro}, {3, ro}};
    session_config d;  // no pruning at all
    d.layers = kLayers;
    session_config e;
    e.layers = kLayers;
    e.positions = keep_original;
    e.schedule = {{2, fixed_options(5, true)}};
    specs = {{3, 24, 8, a}, {2, 20, 6, b}, {0, 30, 9, c}, {4, 12, 5, d}, {1, 16, 7, e}};
  }
  const auto B = static_cast<index_t>(specs.size());

  for (int mode = 0; mode < 2; ++mode) {
    CAPTURE(mode);
    std::mt19937 g(99);
    std::vector<std::vector<float>> embeds;
    for (const seq_spec& s : specs)
      embeds.push_back(svt::random_floats(
          g, static_cast<std::size_t>((s.prefix + s.visual + s.text) * kDim), -1.0f, 1.0f));

    // One by one.
    std::vector<std::vector<std::optional<layer_plan>>> solo(static_cast<std::size_t>(B));
    std::vector<std::vector<float>> solo_hidden(static_cast<std::size_t>(B));
    for (index_t b = 0; b < B; ++b) {
      const seq_spec& s = specs[static_cast<std::size_t>(b)];
      workspace ws;
      const index_t L = s.prefix + s.visual + s.text;
      prefill_session ses(prefill_layout::from_counts(s.prefix, s.visual, s.text),
                          matrix_view<const float>(embeds[static_cast<std::size_t>(b)].data(), {L, kDim}),
                          s.config, ws);
      std::vector<float> X = embeds[static_cast<std::size_t>(b)];
      index_t n = L;
      for (index_t l = 0; l < kLayers; ++l) {
        const std::vector<float> A = model.attention(l, X, n);
        std::vector<float> out = model.forward(l, X, n, A);
        std::optional<layer_plan> plan;
        if (ses.prunes_after(l)) {
          plan = ses.prune(l, tensor3_view<const float>(A.data(), {kHeads, n, n}),
                           matrix_view<const float>(out.data(), {n, kDim}), ws);
          const index_t c = static_cast<index_t>(plan->step.recycled.clusters.size());
          sparsevlm::apply_plan_inplace(
              plan->step.sequence, matrix_view<float>(out.data(), {n, kDim}),
              matrix_view<const float>(plan->step.recycled.merged.data(), {c, kDim}));
          n = plan->length;
          out.resize(static_cast<std::size_t>(n * kDim));
        }
        solo[static_cast<std::size_t>(b)].push_back(std::move(plan));
        X = out;
      }
      solo_hidden[static_cast<std::size_t>(b)] = X;
    }

    // Batched: sessions over a packed array, two workspaces for two workers.
    std::vector<workspace> wss(2);
    std::vector<prefill_session> sessions;
    seq_t cu{0};
    for (index_t b = 0; b < B; ++b) {
      const seq_spec& s = specs[static_cast<std::size_t>(b)];
      const index_t L = s.prefix + s.visual + s.text;
      sessions.emplace_back(prefill_layout::from_counts(s.prefix, s.visual, s.text),
                            matrix_view<const float>(embeds[static_cast<std::size_t>(b)].data(), {L, kDim}),
                            s.config, wss[0]);
      cu.push_back(cu.back() + L);
    }
    std::vector<float> packed;
    for (const auto& e : embeds) packed.insert(packed.end(), e.begin(), e.end());
    const sparsevlm::parallel_for_fn hook =
        mode == 1 ? sparsevlm::parallel_for_fn(two_threads) : sparsevlm::parallel_for_fn();
    for (index_t l = 0; l < kLayers; ++l) {
      // The toy layer on each sequence of the packed array.
      const sparsevlm::ragged_layout layout = sparsevlm::ragged_layout::packed(cu);
      std::vector<std::vector<float>> attn(static_cast<std::size_t>(B));
      std::vector<tensor3_view<const float>> av(static_cast<std::size_t>(B));
      std::vector<float> out_packed;
      for (index_t b = 0; b < B; ++b) {
        const index_t n = layout.length(b);
        const std::vector<float> X(packed.begin() + layout.offset(b) * kDim,
                                   packed.begin() + (layout.offset(b) + n) * kDim);
        attn[static_cast<std::size_t>(b)] = model.attention(l, X, n);
        av[static_cast<std::size_t>(b)] =
            tensor3_view<const float>(attn[static_cast<std::size_t>(b)].data(), {kHeads, n, n});
        const std::vector<float> o = model.forward(l, X, n, attn[static_cast<std::size_t>(b)]);
        out_packed.insert(out_packed.end(), o.begin(), o.end());
      }
      const matrix_view<float> hv(out_packed.data(), {layout.rows(), kDim});
      const auto plans = sparsevlm::prune_sessions(
          std::span<prefill_session>(sessions), l, layout,
          std::span<const tensor3_view<const float>>(av), matrix_view<const float>(hv),
          std::span<workspace>(wss), hook);
      REQUIRE(plans.size() == static_cast<std::size_t>(B));
      for (index_t b = 0; b < B; ++b) {
        const auto& mine = plans[static_cast<std::size_t>(b)];
        const auto& ref = solo[static_cast<std::size_t>(b)][static_cast<std::size_t>(l)];
        REQUIRE(mine.has_value() == ref.has_value());
        if (!mine) continue;
        check_same(mine->step, ref->step);
        CHECK(mine->positions == ref->positions);
        CHECK(mine->visual.len == ref->visual.len);
      }
      seq_t cu_new(static_cast<std::size_t>(B + 1));
      const index_t total = sparsevlm::compact_packed(
          layout, std::span<const std::optional<layer_plan>>(plans), hv, std::span<index_t>(cu_new));
      out_packed.resize(static_cast<std::size_t>(total * kDim));
      packed = out_packed;
      cu = cu_new;
    }
    for (index_t b = 0; b < B; ++b) {
      const auto off = static_cast<std::size_t>(cu[static_cast<std::size_t>(b)] * kDim);
      const std::vector<float>& want = solo_hidden[static_cast<std::size_t>(b)];
      REQUIRE(cu[static_cast<std::size_t>(b + 1)] - cu[static_cast<std::size_t>(b)] ==
              static_cast<index_t>(want.size()) / kDim);
      CHECK(std::memcmp(packed.data() + off, want.data(), want.size() * sizeof(float)) == 0);
      CHECK(sessions[static_cast<std::size_t>(b)].finished());
    }
  }
}

TEST_CASE("session: prune_sessions refuses a skipped layer and changes no session on error") {
  const toy_model model(3);
  std::vector<float> e0 = toy_embeds(1), e1 = toy_embeds(2);
  workspace ws;
  const prefill_layout lay = prefill_layout::from_counts(kPrefix, kVisual, kText);
  std::vector<prefill_session> sessions;
  sessions.emplace_back(lay, matrix_view<const float>(e0.data(), {kLen, kDim}),
                        v15_config(true, renumber), ws);
  sessions.emplace_back(lay, matrix_view<const float>(e1.data(), {kLen, kDim}),
                        v15_config(true, renumber), ws);
  const seq_t cu{0, kLen, 2 * kLen};
  const auto layout = sparsevlm::ragged_layout::packed(cu);
  std::vector<float> packed = e0;
  packed.insert(packed.end(), e1.begin(), e1.end());
  const std::vector<float> A0 = model.attention(1, e0, kLen);
  std::vector<float> A1 = model.attention(1, e1, kLen);
  std::vector<tensor3_view<const float>> av{tensor3_view<const float>(A0.data(), {kHeads, kLen, kLen}),
                                            tensor3_view<const float>(A1.data(), {kHeads, kLen, kLen})};
  const matrix_view<const float> hv(packed.data(), {2 * kLen, kDim});
  std::vector<workspace> wss(1);
  const auto call = [&](index_t layer) {
    return sparsevlm::prune_sessions(std::span<prefill_session>(sessions), layer, layout,
                                     std::span<const tensor3_view<const float>>(av), hv,
                                     std::span<workspace>(wss));
  };
  SV_CHECK_THROWS(errc::invalid_argument,
                  "batch[0].layer: expected <= 1 (the session's next pruning layer, not yet done), got 2",
                  call(2));
  // A NaN in sequence 1's attention: sequence 0 is decided but not committed.
  A1[static_cast<std::size_t>(sessions[1].raters()[0] * kLen + kPrefix)] = svt::kNaNf;
  SV_CHECK_THROWS(errc::non_finite, "batch[1].", call(1));
  CHECK(sessions[0].steps_done() == 0);
  CHECK(sessions[0].length() == kLen);
  CHECK(sessions[1].steps_done() == 0);
  // Lengths must match the sessions'.
  const seq_t cu_bad{0, kLen - 1, 2 * kLen};
  SV_CHECK_THROWS(errc::shape_mismatch, "layout.length(0): expected 35 (sessions[0].length()), got 34",
                  sparsevlm::prune_sessions(std::span<prefill_session>(sessions), 1,
                                            sparsevlm::ragged_layout::packed(cu_bad),
                                            std::span<const tensor3_view<const float>>(av), hv,
                                            std::span<workspace>(wss)));
}

// docs/integration.md, "A prefill with the session, step by step": the snippet
// between the markers is the one on that page (keep them the same).
TEST_CASE("session: integration.md snippet") {
  const toy_model model(7);
  const std::vector<float> input = toy_embeds(8);  // [L, d] input embeddings
  const index_t layers = kLayers, d = kDim, heads = kHeads, head_dim = kHeadDim;
  const auto run_layer = [&](index_t l, std::vector<float>& hidden, index_t n,
                             std::vector<float>& attn, std::vector<float>& k_rows) {
    const std::vector<float> x(hidden.begin(), hidden.begin() + n * d);
    attn = model.attention(l, x, n);
    const std::vector<float> kh = model.keys(l, x, n);  // [H, n, dh] -> [n, H, dh]
    k_rows.assign(static_cast<std::size_t>(n * d), 0.0f);
    for (index_t t = 0; t < n; ++t)
      for (index_t h = 0; h < heads; ++h)
        for (index_t c = 0; c < head_dim; ++c)
          k_rows[static_cast<std::size_t>((t * heads + h) * head_dim + c)] =
              kh[static_cast<std::size_t>((h * n + t) * head_dim + c)];
    const std::vector<float> out = model.forward(l, x, n, attn);
    std::copy(out.begin(), out.end(), hidden.begin());
  };
  std::vector<float> hidden = input;
  std::vector<std::vector<float>> k_cache(static_cast<std::size_t>(layers));
  std::vector<index_t> cache_len(static_cast<std::size_t>(layers), 0);
  std::vector<float> attn;
  const session_config config = v15_config(true, renumber);
  using namespace sparsevlm;
  // [snippet]
  workspace ws;
  const prefill_layout layout = prefill_layout::from_counts(/*prefix*/ 3, /*visual*/ 24, /*text*/ 8);
  // Raters are chosen here, once, from the input embeddings.
  prefill_session session(layout, matrix_view<const float>(input.data(), {layout.length, d}), config, ws);
  for (index_t l = 0; l < layers; ++l) {
    const index_t n = session.length();  // layer l runs on n tokens, ids session.positions()
    run_layer(l, hidden, n, attn, k_cache[l]);
    cache_len[l] = n;
    if (!session.prunes_after(l)) continue;  // nothing to do, nothing spent
    const layer_plan plan = session.prune(l, tensor3_view<const float>(attn.data(), {heads, n, n}),
                                          matrix_view<const float>(hidden.data(), {n, d}), ws);
    const index_t c = static_cast<index_t>(plan.step.recycled.clusters.size());
    // Hidden states: n -> plan.length rows, recycled tokens after the kept visual ones.
    apply_plan_inplace(plan.step.sequence, matrix_view<float>(hidden.data(), {n, d}),
                       matrix_view<const float>(plan.step.recycled.merged.data(), {c, d}));
    // KV caches, option 3 (same tokens in every layer): each layer written so far.
    for (index_t j = 0; j <= l; ++j) {
      const tensor3_view<float> cache(k_cache[j].data(), {cache_len[j], heads, head_dim});
      std::vector<float> rec(static_cast<std::size_t>(c * heads * head_dim));
      const tensor3_view<float> rv(rec.data(), {c, heads, head_dim});
      merge_kv(plan.step.recycled.clusters, tensor3_view<const float>(cache),
               kv_layout::tokens_heads_dim, rv);
      cache_len[j] = compact_kv(plan.step.sequence, cache, kv_layout::tokens_heads_dim,
                                tensor3_view<const float>(rv));
    }
  }
  const index_t first_decode_id = session.next_position();  // for the layers after the last step
  // [snippet]
  CHECK(session.finished());
  CHECK(first_decode_id == session.length());
  for (index_t j = 0; j < layers; ++j) CHECK(cache_len[static_cast<std::size_t>(j)] == session.length());
  CHECK(session.length() == kPrefix + 6 + 1 + kText);
}
