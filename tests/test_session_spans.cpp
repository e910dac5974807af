// Prefill sessions over several visual spans (interleaved images, video frames):
// the toy decoder of toy_decoder.hpp runs a multi-layer prefill on the compacted
// sequences, and the test follows every token by an identity of its own (its
// input position, or a number for a recycled token together with the span it
// was born in) to check the session's spans, raters, position ids, KV rows and
// its steps against prune_step / prune_step_spans called directly.
#include <algorithm>
#include <array>
#include <cstring>
#include <optional>
#include <random>
#include <span>
#include <vector>

#include <sparsevlm/batch.hpp>
#include <sparsevlm/session.hpp>

#include "test_util.hpp"
#include "toy_decoder.hpp"

using sparsevlm::errc;
using sparsevlm::index_t;
using sparsevlm::keep_policy;
using sparsevlm::layer_plan;
using sparsevlm::matrix_view;
using sparsevlm::position_policy;
using sparsevlm::prefill_layout;
using sparsevlm::prefill_session;
using sparsevlm::pruning_layer;
using sparsevlm::session_config;
using sparsevlm::span_budget;
using sparsevlm::span_options;
using sparsevlm::spans_result;
using sparsevlm::step_options;
using sparsevlm::step_result;
using sparsevlm::tensor3_view;
using sparsevlm::visual_span;
using sparsevlm::workspace;
using svt_toy::kDim;
using svt_toy::kHeadDim;
using svt_toy::kHeads;
using svt_toy::kLayers;
using svt_toy::toy_model;

using seq_t = std::vector<index_t>;

namespace {

constexpr auto renumber = position_policy::renumber;
constexpr auto keep_original = position_policy::keep_original;
constexpr auto global = span_budget::global;
constexpr auto per_span = span_budget::per_span;

/// Two images with two tokens between them ("Image 2:"), then the question:
/// prefix 3, 14 visual, 2, 10 visual, 8 text (L = 37).
prefill_layout two_images() { return prefill_layout::from_counts(3, seq_t{14, 10}, 8, 2); }

/// Three spans, the last two adjacent (video frames): prefix 2, 8, gap 1, 10, 6,
/// then 7 text tokens (L = 34).
prefill_layout three_spans() {
  prefill_layout l;
  l.length = 34;
  l.spans = {{2, 8}, {11, 10}, {21, 6}};
  return l;
}

step_options fixed_options(index_t keep, bool recycle) {
  step_options o;
  o.policy = keep_policy::fixed(keep);
  o.recycle.enabled = recycle;
  return o;
}

/// Fixed 16, 10, 6 at layers 1, 3, 5 of the 7-layer toy (24 visual tokens in
/// both layouts above).
session_config fixed_config(bool recycle, position_policy policy, span_budget budget) {
  session_config c;
  c.layers = kLayers;
  c.positions = policy;
  c.budget = budget;
  c.schedule = {{1, fixed_options(16, recycle)},
                {3, fixed_options(10, recycle)},
                {5, fixed_options(6, recycle)}};
  return c;
}

session_config rank_config(span_budget budget) {
  session_config c;
  c.layers = kLayers;
  c.budget = budget;
  step_options o;
  o.policy = keep_policy::rank(2.0, 1.0);
  c.schedule = {{0, o}, {2, o}, {4, o}};
  return c;
}

/// Input position ids [rows, L]: 0..L−1 in one row; with three, mRoPE-like:
/// a text token takes (t, t, t) with t one past the largest id so far, each
/// span a grid 4 wide at t = that value (h = t + j/4, w = t + j%4).
seq_t layout_positions(const prefill_layout& lay, index_t rows) {
  const index_t L = lay.length;
  seq_t ids(static_cast<std::size_t>(rows * L));
  const std::vector<visual_span> spans = lay.visual_spans();
  index_t next = 0;
  for (index_t p = 0; p < L;) {
    const auto in = std::find_if(spans.begin(), spans.end(),
                                 [&](const visual_span& v) { return v.start == p; });
    if (rows == 3 && in != spans.end()) {
      index_t mx = next;
      for (index_t j = 0; j < in->len; ++j) {
        const index_t t = next, h = next + j / 4, w = next + j % 4;
        ids[static_cast<std::size_t>(0 * L + p + j)] = t;
        ids[static_cast<std::size_t>(1 * L + p + j)] = h;
        ids[static_cast<std::size_t>(2 * L + p + j)] = w;
        mx = std::max({mx, h, w});
      }
      next = mx + 1;
      p += in->len;
      continue;
    }
    for (index_t r = 0; r < rows; ++r)
      ids[static_cast<std::size_t>(r * L + p)] = rows == 3 ? next : p;
    ++next;
    ++p;
  }
  return ids;
}

void check_same(const step_result& a, const step_result& b) { svt::check_same_result(a, b); }

void check_same(const layer_plan& a, const layer_plan& b) {
  check_same(a.step, b.step);
  CHECK(a.layer == b.layer);
  CHECK(a.length == b.length);
  CHECK(a.positions == b.positions);
  CHECK(a.kv_sequence == b.kv_sequence);
  REQUIRE(a.spans.size() == b.spans.size());
  for (std::size_t i = 0; i < a.spans.size(); ++i) {
    CHECK(a.spans[i].start == b.spans[i].start);
    CHECK(a.spans[i].len == b.spans[i].len);
  }
}

/// The test's own per-span split of a fixed keep K over spans of v_i tokens
/// (Hamilton's method: floors of K·v_i/V, then one more token to the largest
/// remainders, ties to the lower span). The cases below never reach a span's
/// cap of v_i − 1, where the library's rule also redistributes.
seq_t hamilton(index_t K, const seq_t& v) {
  index_t V = 0;
  for (index_t n : v) V += n;
  seq_t k(v.size());
  std::vector<std::pair<double, std::size_t>> rem;
  index_t left = K;
  for (std::size_t i = 0; i < v.size(); ++i) {
    const double q = static_cast<double>(K) * static_cast<double>(v[i]) / static_cast<double>(V);
    k[i] = static_cast<index_t>(q);
    left -= k[i];
    rem.emplace_back(-(q - static_cast<double>(k[i])), i);
  }
  std::stable_sort(rem.begin(), rem.end());
  for (index_t j = 0; j < left; ++j) ++k[rem[static_cast<std::size_t>(j)].second];
  for (std::size_t i = 0; i < v.size(); ++i) REQUIRE(k[i] <= std::max<index_t>(v[i] - 1, 0));
  return k;
}

struct run_options {
  index_t rows = 1;
  bool qk = false;
  bool gravity = false;
};

struct run_record {
  std::vector<layer_plan> plans;
  std::vector<float> hidden;  // final [n, d]
  seq_t ids;
  index_t length = 0;
};

/// Runs the toy prefill over `lay` with a session and checks it at every
/// pruning layer against the test's own bookkeeping and a direct step.
run_record run_spans(const prefill_layout& lay, session_config cfg, const run_options& ro,
                     unsigned seed = 7) {
  const toy_model model(seed);
  std::mt19937 g(seed + 1);
  const index_t L = lay.length;
  const std::vector<float> embeds =
      svt::random_floats(g, static_cast<std::size_t>(L * kDim), -1.0f, 1.0f);
  const std::vector<visual_span> spans0 = lay.visual_spans();
  const std::size_t S = spans0.size();
  const seq_t pos0 = layout_positions(lay, ro.rows);
  const index_t rows = ro.rows;
  if (ro.gravity)
    for (pruning_layer& s : cfg.schedule) {
      s.options.scoring.gravity.enabled = true;
      s.options.scoring.gravity.head_dim = kHeadDim;
    }

  workspace ws;
  prefill_session session(lay, matrix_view<const float>(embeds.data(), {L, kDim}), cfg, ws,
                          matrix_view<const index_t>(pos0.data(), {rows, L}));
  REQUIRE(session.spans().size() == S);

  // Raters: step 1 over the union of the spans and the text after the last,
  // through the public select_raters on a copied block.
  seq_t raters0;
  {
    const index_t text = spans0.back().end();
    std::vector<float> block;
    index_t n = 0;
    const auto copy = [&](index_t from, index_t to) {
      block.insert(block.end(), embeds.begin() + from * kDim, embeds.begin() + to * kDim);
    };
    for (const visual_span& v : spans0) {
      copy(v.start, v.end());
      n += v.len;
    }
    copy(text, L);
    raters0 = sparsevlm::select_raters(
        matrix_view<const float>(block.data(), {n + L - text, kDim}), visual_span{0, n});
    for (index_t& r : raters0) r += text - n;
  }
  REQUIRE(!raters0.empty());
  CHECK(seq_t(session.raters().begin(), session.raters().end()) == raters0);

  // Token identities: input positions, or 1000·(step + 1) + cluster; `owner`
  // is the layout span a token belongs to (−1 for text and prefix), and
  // `where` its place in the input's order (a recycled token: its span's start).
  const auto span_of = [&](index_t p) {
    for (std::size_t i = 0; i < S; ++i)
      if (p >= spans0[i].start && p < spans0[i].end()) return static_cast<index_t>(i);
    return index_t{-1};
  };
  std::vector<index_t> owner_of_recycled(8000, -1);
  const auto owner = [&](index_t id) {
    return id >= 1000 ? owner_of_recycled[static_cast<std::size_t>(id)] : span_of(id);
  };
  const auto where = [&](index_t id) {
    return id >= 1000 ? spans0[static_cast<std::size_t>(owner(id))].start : id;
  };

  index_t n = L;
  std::vector<float> X = embeds;
  seq_t ids(static_cast<std::size_t>(L));
  for (index_t i = 0; i < L; ++i) ids[static_cast<std::size_t>(i)] = i;
  seq_t pos = pos0;
  std::vector<seq_t> written_ids(kLayers);

  run_record rec;
  for (index_t l = 0; l < kLayers; ++l) {
    CHECK(session.length() == n);
    written_ids[static_cast<std::size_t>(l)] = ids;
    const std::vector<float> A = model.attention(l, X, n);
    std::vector<float> out = model.forward(l, X, n, A);
    if (!session.prunes_after(l)) {
      X = out;
      continue;
    }
    // The spans from the identities: span i holds its tokens, contiguous, at
    // the place its first token had in the input's order.
    std::vector<visual_span> want(S);
    seq_t counts(S, 0);
    for (std::size_t i = 0; i < S; ++i) {
      index_t before = 0, first = -1, len = 0;
      for (index_t t = 0; t < n; ++t) {
        const index_t id = ids[static_cast<std::size_t>(t)];
        if (owner(id) == static_cast<index_t>(i)) {
          if (first < 0) first = t;
          CHECK(t == first + len);  // contiguous
          ++len;
        } else if (where(id) < spans0[i].start) {
          ++before;
        }
      }
      CHECK((first < 0 || first == before));
      want[i] = {before, len};
      counts[i] = len;
    }
    for (std::size_t i = 0; i < S; ++i) {
      CAPTURE(i);
      CHECK(session.spans()[i].start == want[i].start);
      CHECK(session.spans()[i].len == want[i].len);
    }
    seq_t raters;
    for (index_t t = 0; t < n; ++t)
      if (std::find(raters0.begin(), raters0.end(), ids[static_cast<std::size_t>(t)]) != raters0.end())
        raters.push_back(t);
    CHECK(raters.size() == raters0.size());
    CHECK(seq_t(session.raters().begin(), session.raters().end()) == raters);
    for (index_t t = 0; t < n; ++t) {
      const index_t id = ids[static_cast<std::size_t>(t)];
      CHECK(session.origins()[static_cast<std::size_t>(t)] == (id >= 1000 ? -1 : id));
    }
    for (index_t r = 0; r < rows; ++r)
      for (index_t t = 0; t < n; ++t)
        CHECK(session.positions()(r, t) == pos[static_cast<std::size_t>(r * n + t)]);

    // The same decisions, directly.
    step_options opt = cfg.schedule[session.steps_done()].options;
    if (ro.gravity)
      opt.scoring.gravity.positions = std::span<const index_t>(pos.data(), static_cast<std::size_t>(n));
    std::vector<visual_span> holding;
    seq_t hold_counts;
    for (const visual_span& v : want)
      if (v.len > 0) {
        holding.push_back(v);
        hold_counts.push_back(v.len);
      }
    const std::optional<std::span<const index_t>> rview(raters);
    const matrix_view<const float> hv(out.data(), {n, kDim});
    const tensor3_view<const float> av(A.data(), {kHeads, n, n});
    const std::vector<float> q = model.queries(l, X, n), k = model.keys(l, X, n);
    const sparsevlm::qk_view<float, float> qk{
        tensor3_view<const float>(q.data(), {kHeads, n, kHeadDim}),
        tensor3_view<const float>(k.data(), {kHeads, n, kHeadDim}), std::nullopt, 0.0};
    const sparsevlm::step_inputs<float, float, float> in{matrix_view<const float>(), av, hv, {},
                                                         rview};
    const sparsevlm::step_inputs_qk<float, float, float, float> in_qk{matrix_view<const float>(),
                                                                      qk, hv, {}, rview};
    step_result direct;
    std::vector<sparsevlm::span_part> direct_parts;
    REQUIRE(!holding.empty());
    if (holding.size() == 1) {
      auto one = in;
      auto one_qk = in_qk;
      one.visual = one_qk.visual = holding[0];
      direct = ro.qk ? sparsevlm::prune_step(one_qk, opt) : sparsevlm::prune_step(one, opt);
    } else {
      span_options so;
      so.budget = cfg.budget;
      so.policy = opt.policy;
      so.recycle = opt.recycle;
      so.scoring = opt.scoring;
      std::vector<keep_policy> shares;
      if (cfg.budget == per_span && opt.policy.kind == keep_policy::kind_t::fixed) {
        for (index_t kk : hamilton(opt.policy.keep, hold_counts))
          shares.push_back(keep_policy::fixed(kk));
        so.span_policies = shares;
      }
      spans_result sr = ro.qk ? sparsevlm::prune_step_spans(in_qk, holding, so)
                              : sparsevlm::prune_step_spans(in, holding, so);
      direct.raters = sr.raters;
      direct.scores = sr.scores;
      direct.rank = sr.rank;
      direct.keep_count = sr.keep_count;
      direct.keep = sr.keep;
      direct.recycled = sr.recycled;
      direct.sequence = sr.sequence;
      direct_parts = sr.spans;
    }
    const layer_plan plan = ro.qk ? session.prune(l, qk, hv, ws) : session.prune(l, av, hv, ws);
    check_same(plan.step, direct);
    const step_result& r = plan.step;
    const index_t n_new = static_cast<index_t>(r.sequence.size());
    const index_t c = static_cast<index_t>(r.recycled.clusters.size());
    CHECK(plan.layer == l);
    CHECK(plan.length == n_new);
    CHECK(plan.kv_sequence == sparsevlm::kv_sequence(r.sequence));
    CHECK(session.kv_rows(l) == plan.kv_sequence);

    // Parts: one per layout span, the direct ones for the spans with tokens.
    REQUIRE(plan.parts.size() == S);
    std::size_t h = 0;
    index_t kept = 0;
    for (std::size_t i = 0; i < S; ++i) {
      CAPTURE(i);
      const sparsevlm::span_part& p = plan.parts[i];
      CHECK(p.visual.start == want[i].start);
      CHECK(p.visual.len == want[i].len);
      kept += p.keep_count;
      if (want[i].len == 0) {
        CHECK(p.keep_count == 0);
        CHECK(p.clusters == 0);
        continue;
      }
      if (!direct_parts.empty()) {
        const sparsevlm::span_part& d = direct_parts[h];
        CHECK(p.rank == d.rank);
        CHECK(p.keep_count == d.keep_count);
        CHECK(p.keep == d.keep);
        CHECK(p.first_cluster == d.first_cluster);
        CHECK(p.clusters == d.clusters);
      } else {
        CHECK(p.keep == r.keep);
        CHECK(p.clusters == c);
      }
      ++h;
      // Each cluster's members are tokens of this span only.
      for (index_t cl = p.first_cluster; cl < p.first_cluster + p.clusters; ++cl)
        for (index_t m : r.recycled.clusters[static_cast<std::size_t>(cl)])
          CHECK(owner(ids[static_cast<std::size_t>(m)]) == static_cast<index_t>(i));
    }
    CHECK(kept == r.keep_count);
    if (cfg.budget == per_span && opt.policy.kind == keep_policy::kind_t::fixed &&
        holding.size() >= 2) {
      const seq_t shares = hamilton(opt.policy.keep, hold_counts);
      index_t j = 0;
      for (std::size_t i = 0; i < S; ++i)
        if (want[i].len > 0) CHECK(plan.parts[i].keep_count == shares[static_cast<std::size_t>(j++)]);
    }

    // Expected ids after the step.
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

    // The engine's side, and the identities after the step.
    sparsevlm::apply_plan_inplace(r.sequence, matrix_view<float>(out.data(), {n, kDim}),
                                  matrix_view<const float>(r.recycled.merged.data(), {c, kDim}));
    seq_t ids_new(static_cast<std::size_t>(n_new));
    const index_t step_no = static_cast<index_t>(session.steps_done());  // already advanced
    for (index_t i = 0; i < n_new; ++i) {
      const index_t p = r.sequence[static_cast<std::size_t>(i)];
      if (p >= 0) {
        ids_new[static_cast<std::size_t>(i)] = ids[static_cast<std::size_t>(p)];
      } else {
        const index_t id = 1000 * step_no + (-p - 1);
        const index_t first = r.recycled.clusters[static_cast<std::size_t>(-p - 1)][0];
        owner_of_recycled[static_cast<std::size_t>(id)] = owner(ids[static_cast<std::size_t>(first)]);
        ids_new[static_cast<std::size_t>(i)] = id;
      }
    }
    ids = ids_new;
    pos = pos_new;
    n = n_new;
    out.resize(static_cast<std::size_t>(n * kDim));
    X = out;

    // The new spans: span i's kept tokens, then its recycled tokens.
    REQUIRE(plan.spans.size() == S);
    for (std::size_t i = 0; i < S; ++i) {
      CAPTURE(i);
      const visual_span v = plan.spans[i];
      CHECK(v.len == plan.parts[i].keep_count + plan.parts[i].clusters);
      for (index_t t = v.start; t < v.end(); ++t)
        CHECK(owner(ids[static_cast<std::size_t>(t)]) == static_cast<index_t>(i));
      // Kept tokens existed before this step (recycled ones of earlier steps
      // included); the tokens after them were born at this step.
      for (index_t t = v.start; t < v.start + plan.parts[i].keep_count; ++t)
        CHECK(ids[static_cast<std::size_t>(t)] < 1000 * step_no);
      for (index_t t = v.start + plan.parts[i].keep_count; t < v.end(); ++t)
        CHECK(ids[static_cast<std::size_t>(t)] >= 1000 * step_no);
      CHECK(session.spans()[i].start == v.start);
      CHECK(session.spans()[i].len == v.len);
    }
    CHECK(plan.visual.start == plan.spans.front().start);
    CHECK(plan.visual.end() == plan.spans.back().end());
    CHECK(session.visual_tokens() == r.keep_count + c);
    rec.plans.push_back(plan);
  }
  CHECK(session.finished());

  // Text after the last span and between spans all survive, in order.
  seq_t text_ids;
  for (index_t id : ids)
    if (id < 1000 && span_of(id) < 0) text_ids.push_back(id);
  seq_t all_text;
  for (index_t p = 0; p < L; ++p)
    if (span_of(p) < 0) all_text.push_back(p);
  CHECK(text_ids == all_text);
  for (std::size_t i = 0; i < raters0.size(); ++i)
    CHECK(session.origins()[static_cast<std::size_t>(session.raters()[i])] == raters0[i]);
  const index_t mx = *std::max_element(pos0.begin(), pos0.end());
  CHECK(session.next_position() == (cfg.positions == renumber ? n : mx + 1));

  // Caches kept whole: kv_rows(j) picks, in order, the current tokens that
  // layer j was written with.
  for (index_t j = 0; j < kLayers; ++j) {
    const seq_t& w = written_ids[static_cast<std::size_t>(j)];
    seq_t expect;
    for (index_t id : ids)
      if (std::find(w.begin(), w.end(), id) != w.end()) expect.push_back(id);
    seq_t got;
    for (index_t q : session.kv_rows(j)) got.push_back(w[static_cast<std::size_t>(q)]);
    CHECK(got == expect);
  }
  rec.hidden = X;
  rec.ids = ids;
  rec.length = n;
  return rec;
}

}  // namespace

TEST_CASE("session spans: 2 and 3 spans, fixed 16/10/6, global and per-span, both policies, 1 and 3 rows") {
  for (int which = 0; which < 2; ++which)
    for (span_budget budget : {global, per_span})
      for (bool recycle : {true, false})
        for (position_policy policy : {renumber, keep_original})
          for (index_t rows : {index_t{1}, index_t{3}}) {
            CAPTURE(which);
            CAPTURE(static_cast<int>(budget));
            CAPTURE(recycle);
            CAPTURE(static_cast<int>(policy));
            CAPTURE(rows);
            const prefill_layout lay = which == 0 ? two_images() : three_spans();
            const run_record rec =
                run_spans(lay, fixed_config(recycle, policy, budget), {rows, false, false});
            REQUIRE(rec.plans.size() == 3);
            // The union keeps the schedule's count in both modes.
            CHECK(rec.plans[0].step.keep_count == 16);
            CHECK(rec.plans[1].step.keep_count == 10);
            CHECK(rec.plans[2].step.keep_count == 6);
          }
}

TEST_CASE("session spans: a per-span fixed keep is the layer's total split by each span's share") {
  // two_images: 14 and 10 visual tokens. Keep 16: 16·14/24 = 9.33, 16·10/24 =
  // 6.67 -> 9 + 6, the last token to the larger remainder (span 1): 9, 7. With
  // recycling (fraction 0.3, divisor 10) each span gets one cluster: 10, 8.
  // Keep 10 of 18: 5.56, 4.44 -> 6, 4; one cluster each: 7, 5. Keep 6 of 12:
  // 3.5, 2.5 -> 3 + 2, the tie to span 0: 4, 2.
  const run_record rec = run_spans(two_images(), fixed_config(true, renumber, per_span), {});
  REQUIRE(rec.plans.size() == 3);
  const auto keeps = [&](std::size_t k) {
    return seq_t{rec.plans[k].parts[0].keep_count, rec.plans[k].parts[1].keep_count};
  };
  CHECK(keeps(0) == seq_t{9, 7});
  CHECK(rec.plans[0].spans[0].len == 10);
  CHECK(rec.plans[0].spans[1].len == 8);
  CHECK(keeps(1) == seq_t{6, 4});
  CHECK(keeps(2) == seq_t{4, 2});
  // The second span starts after the first span's kept and recycled tokens and
  // the two tokens between the images.
  CHECK(rec.plans[2].spans[0].start == 3);
  CHECK(rec.plans[2].spans[1].start == 3 + 5 + 2);
  CHECK(rec.length == 3 + 5 + 2 + 3 + 8);
}

TEST_CASE("session spans: the split's caps, for the library's rule") {
  using sparsevlm::detail::apportion_keep;
  CHECK(apportion_keep(16, seq_t{14, 10}) == seq_t{9, 7});
  CHECK(apportion_keep(6, seq_t{7, 5}) == seq_t{4, 2});
  CHECK(apportion_keep(0, seq_t{7, 5}) == seq_t{0, 0});
  // A one-token span keeps nothing (at most N_i − 1): the rest goes elsewhere.
  CHECK(apportion_keep(10, seq_t{20, 1}) == seq_t{10, 0});
  // Capped spans pass their share on, possibly several tokens to one span.
  CHECK(apportion_keep(11, seq_t{10, 2, 2}) == seq_t{9, 1, 1});
  // More than the spans can keep: each keeps N_i − 1; empty spans get 0.
  CHECK(apportion_keep(50, seq_t{4, 0, 3}) == seq_t{3, 0, 2});
  CHECK(apportion_keep(5, seq_t{0, 0}) == seq_t{0, 0});
}

TEST_CASE("session spans: rank policies, the Q/K path, and the gravity correction") {
  for (span_budget budget : {global, per_span})
    for (bool qk : {false, true}) {
      CAPTURE(static_cast<int>(budget));
      CAPTURE(qk);
      const run_record rec = run_spans(three_spans(), rank_config(budget), {1, qk, false}, 11);
      REQUIRE(rec.plans.size() == 3);
      for (const layer_plan& p : rec.plans) {
        if (budget == global) {
          CHECK(p.step.rank >= 1);
          for (const auto& part : p.parts) CHECK(part.rank == -1);
        } else {
          CHECK(p.step.rank == -1);
          for (const auto& part : p.parts)
            if (part.visual.len > 0) CHECK(part.rank >= 1);
        }
      }
    }
  const session_config c = fixed_config(false, keep_original, per_span);
  const run_record rec = run_spans(two_images(), c, {1, false, true}, 5);
  CHECK(rec.plans.size() == 3);
}

TEST_CASE("session spans: one span is the single-span session, field for field") {
  // The same one-span layout written three ways, under both budgets: the plans
  // and the final hidden states are identical (run_spans also compares each
  // step with prune_step directly).
  prefill_layout as_list;
  as_list.length = 35;
  as_list.spans = {{3, 24}};
  std::vector<session_config> configs{fixed_config(true, renumber, global),
                                      fixed_config(false, keep_original, global),
                                      rank_config(global)};
  for (std::size_t k = 0; k < configs.size(); ++k)
    for (bool qk : {false, true}) {
      CAPTURE(k);
      CAPTURE(qk);
      const run_record a = run_spans(prefill_layout::from_counts(3, 24, 8), configs[k], {1, qk, false});
      const run_record b = run_spans(as_list, configs[k], {1, qk, false});
      const run_record c = run_spans(prefill_layout::from_counts(3, seq_t{24}, 8), configs[k],
                                     {1, qk, false});
      session_config per = configs[k];
      per.budget = per_span;
      const run_record d = run_spans(as_list, per, {1, qk, false});
      REQUIRE(a.plans.size() == configs[k].schedule.size());
      for (const run_record* o : {&b, &c, &d}) {
        REQUIRE(o->plans.size() == a.plans.size());
        for (std::size_t i = 0; i < a.plans.size(); ++i) check_same(a.plans[i], o->plans[i]);
        CHECK(o->hidden == a.hidden);
      }
      for (const layer_plan& p : a.plans) {
        REQUIRE(p.spans.size() == 1);
        CHECK(p.visual.start == p.spans[0].start);
        CHECK(p.visual.len == p.spans[0].len);
        CHECK(p.parts[0].rank == -1);  // global: the rank is step.rank
      }
      for (const layer_plan& p : d.plans) CHECK(p.parts[0].rank == p.step.rank);
    }
}

TEST_CASE("session spans: a span that loses every token is skipped, and an all-empty step keeps all") {
  // Spans of 20 and 1 tokens, per-span keep 10 without recycling: the one-token
  // span keeps nothing and is gone; the next step prunes the other one alone.
  prefill_layout lay = prefill_layout::from_counts(2, seq_t{20, 1}, 6, 1);
  session_config c;
  c.layers = kLayers;
  c.budget = per_span;
  c.schedule = {{1, fixed_options(10, false)}, {3, fixed_options(5, false)}};
  const run_record rec = run_spans(lay, c, {3, false, false});
  REQUIRE(rec.plans.size() == 2);
  CHECK(rec.plans[0].parts[1].keep_count == 0);
  CHECK(rec.plans[0].spans[1].start == 2 + 10 + 1);
  CHECK(rec.plans[0].spans[1].len == 0);
  CHECK(rec.plans[1].parts[1].visual.len == 0);
  CHECK(rec.plans[1].spans[0].len == 5);
  CHECK(rec.plans[1].spans[1].start == 2 + 5 + 1);
  CHECK(rec.length == 2 + 5 + 1 + 6);

  // A rank policy that keeps nothing empties every span; the step after keeps all.
  session_config z;
  z.layers = kLayers;
  z.budget = per_span;
  step_options o;
  o.policy = keep_policy::rank(0.0, 0.0);
  o.recycle.enabled = false;
  z.schedule = {{1, o}, {2, o}};
  const toy_model model(7);
  std::mt19937 g(8);
  const prefill_layout two = two_images();
  std::vector<float> X = svt::random_floats(g, static_cast<std::size_t>(two.length * kDim), -1.0f, 1.0f);
  workspace ws;
  prefill_session s(two, matrix_view<const float>(X.data(), {two.length, kDim}), z, ws);
  std::vector<float> A = model.attention(1, X, two.length);
  std::vector<float> H = model.forward(1, X, two.length, A);
  const layer_plan p1 = s.prune(1, tensor3_view<const float>(A.data(), {kHeads, two.length, two.length}),
                                matrix_view<const float>(H.data(), {two.length, kDim}), ws);
  CHECK(s.visual_tokens() == 0);
  CHECK(p1.spans[0].len == 0);
  CHECK(p1.spans[1].start == 3 + 2);
  const index_t n = p1.length;
  CHECK(n == 3 + 2 + 8);
  sparsevlm::apply_plan_inplace(p1.step.sequence, matrix_view<float>(H.data(), {two.length, kDim}),
                                matrix_view<const float>());
  H.resize(static_cast<std::size_t>(n * kDim));
  A = model.attention(2, H, n);
  const layer_plan p2 = s.prune(2, tensor3_view<const float>(A.data(), {kHeads, n, n}),
                                matrix_view<const float>(H.data(), {n, kDim}), ws);
  CHECK(p2.length == n);
  for (index_t i = 0; i < n; ++i) CHECK(p2.step.sequence[static_cast<std::size_t>(i)] == i);
  CHECK(p2.parts.size() == 2);
}

TEST_CASE("session spans: bad layouts and budgets give clear errors") {
  std::mt19937 g(3);
  const std::vector<float> e = svt::random_floats(g, static_cast<std::size_t>(40 * kDim), -1.0f, 1.0f);
  const matrix_view<const float> ev(e.data(), {37, kDim});
  workspace ws;
  const session_config cfg = fixed_config(true, renumber, global);
  const auto with = [](std::vector<visual_span> s) {
    prefill_layout l;
    l.length = 37;
    l.spans = std::move(s);
    return l;
  };
  SV_CHECK_THROWS(errc::shape_mismatch,
                  "layout.spans[1].start: expected >= 17 (the end of spans[0]: spans sorted by "
                  "position, not overlapping), got 12",
                  prefill_session(with({{3, 14}, {12, 10}}), ev, cfg, ws));
  SV_CHECK_THROWS(errc::shape_mismatch, "layout.spans[1].start: expected >= 29",
                  prefill_session(with({{19, 10}, {3, 14}}), ev, cfg, ws));
  SV_CHECK_THROWS(errc::shape_mismatch, "layout.spans[1]: expected a span inside [0, 37) (length)",
                  prefill_session(with({{3, 14}, {30, 10}}), ev, cfg, ws));
  SV_CHECK_THROWS(errc::shape_mismatch, "layout.spans[1].len: expected >= 1",
                  prefill_session(with({{3, 14}, {19, 0}}), ev, cfg, ws));
  SV_CHECK_THROWS(errc::shape_mismatch, "layout.spans[0].start: expected >= 0",
                  prefill_session(with({{-1, 14}, {19, 10}}), ev, cfg, ws));
  prefill_layout both = two_images();
  both.visual = {3, 14};
  SV_CHECK_THROWS(errc::invalid_argument,
                  "layout.visual: expected unset ({0, 0}) when layout.spans is given, got start 3, len 14",
                  prefill_session(both, ev, cfg, ws));
  SV_CHECK_THROWS(errc::shape_mismatch, "embeds.extent[0]: expected 37 (layout.length), got 40",
                  prefill_session(two_images(), matrix_view<const float>(e.data(), {40, kDim}), cfg, ws));

  // Budgets: the union's count (global), or less one per span (per_span).
  session_config c = cfg;
  c.schedule[0].options.policy.keep = 24;
  SV_CHECK_THROWS(errc::invalid_argument,
                  "config.schedule[0].options.policy.keep: expected < 24 (visual tokens entering "
                  "the step after layer 1), got 24",
                  prefill_session(two_images(), ev, c, ws));
  c.budget = per_span;
  c.schedule[0].options.policy.keep = 23;
  SV_CHECK_THROWS(errc::invalid_argument,
                  "config.schedule[0].options.policy.keep: expected <= 22 (the 24 visual tokens "
                  "entering the step after layer 1, less one for each of the 2 spans",
                  prefill_session(two_images(), ev, c, ws));
  // per_span counts are exact: 16 -> (9 + 1, 7 + 1) = 18 enter layer 3's step.
  c = fixed_config(true, renumber, per_span);
  c.schedule[1].options.policy.keep = 17;
  SV_CHECK_THROWS(errc::invalid_argument, "config.schedule[1].options.policy.keep: expected <= 16 (the 18",
                  prefill_session(two_images(), ev, c, ws));
  // global over several spans: the split is the scores', so the count is an
  // upper bound (each span at most its size, and at most 16 + its clusters).
  c = fixed_config(true, renumber, global);
  c.schedule[1].options.policy.keep = 24;
  SV_CHECK_THROWS(errc::invalid_argument,
                  "config.schedule[1].options.policy.keep: expected < 24 (visual tokens entering "
                  "the step after layer 3), got 24",
                  prefill_session(two_images(), ev, c, ws));
  c.schedule[1].options.policy.keep = 20;  // may be clamped at run time, not certainly
  CHECK_NOTHROW(prefill_session(two_images(), ev, c, ws));
  c = cfg;
  c.budget = static_cast<span_budget>(7);
  SV_CHECK_THROWS(errc::invalid_argument, "config.budget: expected global or per_span",
                  prefill_session(two_images(), ev, c, ws));
  // Caller raters must follow the last span (the tokens between spans are not text).
  const seq_t between{17, 30};
  SV_CHECK_THROWS(errc::invalid_argument, "raters[0]", prefill_session(two_images(), between, cfg));
  const seq_t after{30, 33};
  CHECK_NOTHROW(prefill_session(two_images(), after, cfg));
}

TEST_CASE("session spans: a failed prune leaves a multi-span session unchanged") {
  const toy_model model(7);
  std::mt19937 g(8);
  const prefill_layout lay = three_spans();
  const index_t L = lay.length;
  std::vector<float> X = svt::random_floats(g, static_cast<std::size_t>(L * kDim), -1.0f, 1.0f);
  workspace ws;
  prefill_session s(lay, matrix_view<const float>(X.data(), {L, kDim}),
                    fixed_config(true, renumber, per_span), ws);
  std::vector<float> A = model.attention(1, X, L);
  const std::vector<float> H = model.forward(1, X, L, A);
  const tensor3_view<const float> av(A.data(), {kHeads, L, L});
  const matrix_view<const float> hv(H.data(), {L, kDim});
  SV_CHECK_THROWS(errc::invalid_argument, "layer: expected 1", s.prune(2, av, hv, ws));
  SV_CHECK_THROWS(errc::shape_mismatch, "hidden.extent[0]",
                  s.prune(1, av, matrix_view<const float>(H.data(), {L - 1, kDim}), ws));
  A[static_cast<std::size_t>(s.raters()[0] * L + 12)] = svt::kNaNf;  // a span-1 column
  SV_CHECK_THROWS(errc::non_finite, "attn", s.prune(1, av, hv, ws));
  CHECK(s.steps_done() == 0);
  CHECK(s.length() == L);
  REQUIRE(s.spans().size() == 3);
  CHECK(s.spans()[1].start == 11);
  CHECK(s.spans()[1].len == 10);
  CHECK(s.visual().start == 2);
  CHECK(s.visual().len == 25);
  CHECK(s.visual_tokens() == 24);
}

TEST_CASE("session spans: prune_sessions with multi-span sessions == one by one") {
  // A two-image session, a three-span one and a one-span one, batched in one
  // packed array: each plan equals the session's own.
  const toy_model model(21);
  const std::vector<prefill_layout> lays{two_images(), three_spans(),
                                         prefill_layout::from_counts(4, 12, 5)};
  session_config one;
  one.layers = kLayers;
  one.schedule = {{2, fixed_options(6, true)}};
  const std::vector<session_config> cfgs{fixed_config(true, keep_original, per_span),
                                         rank_config(global), one};
  const auto B = static_cast<index_t>(lays.size());
  std::mt19937 g(5);
  std::vector<std::vector<float>> embeds;
  for (const prefill_layout& l : lays)
    embeds.push_back(svt::random_floats(g, static_cast<std::size_t>(l.length * kDim), -1.0f, 1.0f));

  std::vector<std::vector<std::optional<layer_plan>>> solo(static_cast<std::size_t>(B));
  for (index_t b = 0; b < B; ++b) {
    const auto k = static_cast<std::size_t>(b);
    workspace ws;
    prefill_session s(lays[k], matrix_view<const float>(embeds[k].data(), {lays[k].length, kDim}),
                      cfgs[k], ws);
    std::vector<float> X = embeds[k];
    index_t n = lays[k].length;
    for (index_t l = 0; l < kLayers; ++l) {
      const std::vector<float> A = model.attention(l, X, n);
      std::vector<float> out = model.forward(l, X, n, A);
      std::optional<layer_plan> plan;
      if (s.prunes_after(l)) {
        plan = s.prune(l, tensor3_view<const float>(A.data(), {kHeads, n, n}),
                       matrix_view<const float>(out.data(), {n, kDim}), ws);
        const index_t c = static_cast<index_t>(plan->step.recycled.clusters.size());
        sparsevlm::apply_plan_inplace(plan->step.sequence, matrix_view<float>(out.data(), {n, kDim}),
                                      matrix_view<const float>(plan->step.recycled.merged.data(), {c, kDim}));
        n = plan->length;
        out.resize(static_cast<std::size_t>(n * kDim));
      }
      solo[k].push_back(std::move(plan));
      X = out;
    }
  }

  std::vector<workspace> wss(1);
  std::vector<prefill_session> sessions;
  seq_t cu{0};
  std::vector<float> packed;
  for (index_t b = 0; b < B; ++b) {
    const auto k = static_cast<std::size_t>(b);
    sessions.emplace_back(lays[k], matrix_view<const float>(embeds[k].data(), {lays[k].length, kDim}),
                          cfgs[k], wss[0]);
    cu.push_back(cu.back() + lays[k].length);
    packed.insert(packed.end(), embeds[k].begin(), embeds[k].end());
  }
  for (index_t l = 0; l < kLayers; ++l) {
    const auto layout = sparsevlm::ragged_layout::packed(cu);
    std::vector<std::vector<float>> attn(static_cast<std::size_t>(B));
    std::vector<tensor3_view<const float>> av;
    std::vector<float> out_packed;
    for (index_t b = 0; b < B; ++b) {
      const index_t n = layout.length(b);
      const std::vector<float> X(packed.begin() + layout.offset(b) * kDim,
                                 packed.begin() + (layout.offset(b) + n) * kDim);
      attn[static_cast<std::size_t>(b)] = model.attention(l, X, n);
      av.emplace_back(attn[static_cast<std::size_t>(b)].data(), std::array<index_t, 3>{kHeads, n, n});
      const std::vector<float> o = model.forward(l, X, n, attn[static_cast<std::size_t>(b)]);
      out_packed.insert(out_packed.end(), o.begin(), o.end());
    }
    const matrix_view<float> hv(out_packed.data(), {layout.rows(), kDim});
    const auto plans = sparsevlm::prune_sessions(
        std::span<prefill_session>(sessions), l, layout,
        std::span<const tensor3_view<const float>>(av), matrix_view<const float>(hv),
        std::span<workspace>(wss));
    for (index_t b = 0; b < B; ++b) {
      const auto& mine = plans[static_cast<std::size_t>(b)];
      const auto& ref = solo[static_cast<std::size_t>(b)][static_cast<std::size_t>(l)];
      REQUIRE(mine.has_value() == ref.has_value());
      if (mine) check_same(*mine, *ref);
    }
    seq_t cu_new(static_cast<std::size_t>(B + 1));
    const index_t total = sparsevlm::compact_packed(
        layout, std::span<const std::optional<layer_plan>>(plans), hv, std::span<index_t>(cu_new));
    out_packed.resize(static_cast<std::size_t>(total * kDim));
    packed = out_packed;
    cu = cu_new;
  }
  for (const prefill_session& s : sessions) CHECK(s.finished());
}

// docs/integration.md, "Several images or video frames": the snippet between the
// markers is the one on that page (keep them the same).
TEST_CASE("session spans: integration.md snippet") {
  const sparsevlm::model_shape model = sparsevlm::find_model("video-llava-7b");
  using namespace sparsevlm;
  // [snippet]
  prefill_layout video = prefill_layout::from_counts(/*prefix*/ 35, std::vector<index_t>(8, 256),
                                                     /*text*/ 60);  // 8 frames of 256 tokens
  session_config config = make_session_config(find_preset("v1.5-192"), model);
  config.budget = span_budget::per_span;  // or span_budget::global (the default)
  // [snippet]
  REQUIRE(video.spans.size() == 8);
  CHECK(video.spans[7].start == 35 + 7 * 256);
  CHECK(video.length == 35 + 8 * 256 + 60);
  const seq_t raters{video.length - 3, video.length - 1};
  const prefill_session s(video, raters, config);
  CHECK(s.visual_tokens() == 2048);
  CHECK(s.visual().start == 35);
  CHECK(s.visual().len == 2048);
}
