// Batches of ragged sequences (batch.hpp): prune_batch equals prune_step one
// sequence at a time, packed or padded, serially or through a 2-thread hook;
// compact_packed; and the errors.
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

#include "test_util.hpp"

using sparsevlm::errc;
using sparsevlm::index_t;
using sparsevlm::keep_policy;
using sparsevlm::matrix_view;
using sparsevlm::parallel_body;
using sparsevlm::parallel_for_fn;
using sparsevlm::ragged_layout;
using sparsevlm::step_options;
using sparsevlm::step_result;
using sparsevlm::tensor3_view;
using sparsevlm::visual_span;
using sparsevlm::workspace;

using seq_t = std::vector<index_t>;
using raters_t = std::optional<std::span<const index_t>>;

namespace {

constexpr index_t kDim = 8, kHeads = 2, kHeadDim = 4;

/// A 2-thread parallel_for built on std::thread (worker ids 0 and 1).
void two_threads(index_t n, const parallel_body& body) {
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
  step_options options;
  bool own_raters = false;
  [[nodiscard]] index_t length() const { return prefix + visual + text; }
};

step_options with_policy(keep_policy p, bool recycle, index_t top_heads = 0) {
  step_options o;
  o.policy = p;
  o.recycle.enabled = recycle;
  o.scoring.top_heads = top_heads;
  return o;
}

/// Five ragged sequences with their own options (per-request settings).
std::vector<seq_spec> specs() {
  return {{3, 24, 8, with_policy(keep_policy::fixed(10), true)},
          {0, 12, 5, with_policy(keep_policy::rank(2.0, 1.0), true)},
          {5, 30, 11, with_policy(keep_policy::fixed(4), false, 1), true},
          {2, 7, 3, with_policy(keep_policy::rank(13.5, 0.0), true)},
          {1, 18, 6, with_policy(keep_policy::fixed(0), true)}};
}

/// Per-sequence tensors, and the same rows packed and padded.
struct fixture {
  std::vector<seq_spec> spec = specs();
  std::vector<std::vector<float>> embeds, hidden, attn, q, k;  // per sequence
  std::vector<seq_t> raters;                                     // caller raters (relative)
  seq_t cu{0}, lengths;
  index_t max_len = 0;
  std::vector<float> embeds_packed, hidden_packed, embeds_padded, hidden_padded;
  std::vector<tensor3_view<const float>> attn_views;
  std::vector<sparsevlm::qk_view<float, float>> qk_views;
  std::vector<visual_span> visual;
  std::vector<raters_t> rater_opts;
  std::vector<step_options> options;

  explicit fixture(unsigned seed) {
    std::mt19937 g(seed);
    for (const seq_spec& s : spec) max_len = std::max(max_len, s.length());
    for (const seq_spec& s : spec) {
      const index_t L = s.length();
      embeds.push_back(svt::random_floats(g, static_cast<std::size_t>(L * kDim), -1.0f, 1.0f));
      hidden.push_back(svt::random_floats(g, static_cast<std::size_t>(L * kDim), -1.0f, 1.0f));
      q.push_back(svt::random_floats(g, static_cast<std::size_t>(kHeads * L * kHeadDim), -1.5f, 1.5f));
      k.push_back(svt::random_floats(g, static_cast<std::size_t>(kHeads * L * kHeadDim), -1.5f, 1.5f));
      // Causal softmax of random logits.
      std::vector<float> a(static_cast<std::size_t>(kHeads * L * L), 0.0f);
      const std::vector<float> logits = svt::random_floats(g, a.size(), -2.0f, 2.0f);
      for (index_t h = 0; h < kHeads; ++h)
        for (index_t t = 0; t < L; ++t) {
          double sum = 0.0;
          for (index_t u = 0; u <= t; ++u)
            sum += std::exp(static_cast<double>(logits[static_cast<std::size_t>((h * L + t) * L + u)]));
          for (index_t u = 0; u <= t; ++u)
            a[static_cast<std::size_t>((h * L + t) * L + u)] = static_cast<float>(
                std::exp(static_cast<double>(logits[static_cast<std::size_t>((h * L + t) * L + u)])) / sum);
        }
      attn.push_back(std::move(a));
      raters.push_back(s.own_raters ? seq_t{s.prefix + s.visual + 1, s.prefix + s.visual + 4,
                                            L - 1}
                                    : seq_t{});
      cu.push_back(cu.back() + L);
      lengths.push_back(L);
      visual.push_back({s.prefix, s.visual});
      options.push_back(s.options);
    }
    embeds_padded.assign(static_cast<std::size_t>(max_len * kDim) * spec.size(), 0.0f);
    hidden_padded = embeds_padded;
    for (std::size_t b = 0; b < spec.size(); ++b) {
      const index_t L = spec[b].length();
      embeds_packed.insert(embeds_packed.end(), embeds[b].begin(), embeds[b].end());
      hidden_packed.insert(hidden_packed.end(), hidden[b].begin(), hidden[b].end());
      std::copy(embeds[b].begin(), embeds[b].end(),
                embeds_padded.begin() + static_cast<std::ptrdiff_t>(b) * max_len * kDim);
      std::copy(hidden[b].begin(), hidden[b].end(),
                hidden_padded.begin() + static_cast<std::ptrdiff_t>(b) * max_len * kDim);
      attn_views.emplace_back(attn[b].data(), std::array<index_t, 3>{kHeads, L, L});
      qk_views.push_back({tensor3_view<const float>(q[b].data(), {kHeads, L, kHeadDim}),
                          tensor3_view<const float>(k[b].data(), {kHeads, L, kHeadDim}),
                          std::nullopt, 0.0});
      rater_opts.push_back(spec[b].own_raters ? raters_t(std::span<const index_t>(raters[b]))
                                              : std::nullopt);
    }
  }

  [[nodiscard]] index_t count() const { return static_cast<index_t>(spec.size()); }

  /// prune_step on sequence b alone.
  [[nodiscard]] step_result alone(std::size_t b, bool qk) const {
    const index_t L = spec[b].length();
    const matrix_view<const float> ev(embeds[b].data(), {L, kDim});
    const matrix_view<const float> hv(hidden[b].data(), {L, kDim});
    if (qk)
      return sparsevlm::prune_step(sparsevlm::step_inputs_qk<float, float, float, float>{
                                       ev, qk_views[b], hv, visual[b], rater_opts[b]},
                                   options[b]);
    return sparsevlm::prune_step(
        sparsevlm::step_inputs<float, float, float>{ev, attn_views[b], hv, visual[b], rater_opts[b]},
        options[b]);
  }

  [[nodiscard]] sparsevlm::batch_inputs<float, tensor3_view<const float>, float> packed() const {
    return {ragged_layout::packed(cu),
            matrix_view<const float>(embeds_packed.data(), {cu.back(), kDim}),
            attn_views,
            matrix_view<const float>(hidden_packed.data(), {cu.back(), kDim}),
            visual,
            rater_opts};
  }
};

void check_same(const step_result& a, const step_result& b) { svt::check_same_result(a, b); }

}  // namespace

TEST_CASE("batch: packed (cu_seqlens) == one by one, serial and with a 2-thread hook") {
  const fixture f(2026);
  const auto in = f.packed();
  for (int mode = 0; mode < 3; ++mode) {
    CAPTURE(mode);
    std::vector<workspace> ws(2);
    const parallel_for_fn hook = mode == 0 ? parallel_for_fn() : parallel_for_fn(two_threads);
    // mode 2: the workspaces are reused from a first batch (grown, not cleared).
    if (mode == 2) (void)sparsevlm::prune_batch(in, std::span<const step_options>(f.options), std::span<workspace>(ws), hook);
    const std::vector<step_result> got =
        sparsevlm::prune_batch(in, std::span<const step_options>(f.options), std::span<workspace>(ws), hook);
    REQUIRE(got.size() == f.spec.size());
    for (std::size_t b = 0; b < got.size(); ++b) {
      CAPTURE(b);
      check_same(got[b], f.alone(b, false));
    }
    // The different options did act per sequence.
    CHECK(got[0].keep_count == 10);
    CHECK(got[2].keep_count == 4);
    CHECK(got[2].raters == f.raters[2]);
    CHECK(got[2].recycled.clusters.empty());
    CHECK(got[4].keep_count == 0);
  }
}

TEST_CASE("batch: padded layout and Q/K sources == one by one") {
  const fixture f(7);
  std::vector<workspace> ws(2);
  const sparsevlm::batch_inputs<float, tensor3_view<const float>, float> padded{
      ragged_layout::padded(f.lengths, f.max_len),
      matrix_view<const float>(f.embeds_padded.data(), {f.count() * f.max_len, kDim}),
      f.attn_views,
      matrix_view<const float>(f.hidden_padded.data(), {f.count() * f.max_len, kDim}),
      f.visual,
      f.rater_opts};
  const auto got = sparsevlm::prune_batch(padded, std::span<const step_options>(f.options),
                                          std::span<workspace>(ws), parallel_for_fn(two_threads));
  for (std::size_t b = 0; b < got.size(); ++b) check_same(got[b], f.alone(b, false));

  const sparsevlm::batch_inputs<float, sparsevlm::qk_view<float, float>, float> qk{
      ragged_layout::packed(f.cu),
      matrix_view<const float>(f.embeds_packed.data(), {f.cu.back(), kDim}),
      f.qk_views,
      matrix_view<const float>(f.hidden_packed.data(), {f.cu.back(), kDim}),
      f.visual,
      {}};  // no caller raters: every sequence selects its own
  std::vector<step_options> one{with_policy(keep_policy::fixed(3), true)};  // one for all
  const auto got_qk = sparsevlm::prune_batch(qk, std::span<const step_options>(one),
                                             std::span<workspace>(ws), parallel_for_fn(two_threads));
  for (std::size_t b = 0; b < got_qk.size(); ++b) {
    const index_t L = f.spec[b].length();
    const step_result want = sparsevlm::prune_step(
        sparsevlm::step_inputs_qk<float, float, float, float>{
            matrix_view<const float>(f.embeds[b].data(), {L, kDim}), f.qk_views[b],
            matrix_view<const float>(f.hidden[b].data(), {L, kDim}), f.visual[b], std::nullopt},
        one[0]);
    check_same(got_qk[b], want);
    CHECK(got_qk[b].keep_count == std::min<index_t>(3, f.spec[b].visual - 1));
  }
}

TEST_CASE("batch: compact_packed packs each sequence's plan") {
  const fixture f(11);
  const auto in = f.packed();
  std::vector<workspace> ws(1);
  const auto res = sparsevlm::prune_batch(in, std::span<const step_options>(f.options),
                                          std::span<workspace>(ws));
  for (bool padded : {false, true}) {
    CAPTURE(padded);
    std::vector<float> rows = padded ? f.hidden_padded : f.hidden_packed;
    const ragged_layout layout =
        padded ? ragged_layout::padded(f.lengths, f.max_len) : ragged_layout::packed(f.cu);
    seq_t cu_out(f.spec.size() + 1);
    const index_t total = sparsevlm::compact_packed(
        layout, std::span<const step_result>(res),
        matrix_view<float>(rows.data(), {layout.rows(), kDim}), std::span<index_t>(cu_out));
    CHECK(total == cu_out.back());
    for (std::size_t b = 0; b < res.size(); ++b) {
      const index_t n = static_cast<index_t>(res[b].sequence.size());
      REQUIRE(cu_out[b + 1] - cu_out[b] == n);
      std::vector<float> want(static_cast<std::size_t>(n * kDim));
      const index_t c = static_cast<index_t>(res[b].recycled.clusters.size());
      sparsevlm::apply_plan(res[b].sequence,
                            matrix_view<const float>(f.hidden[b].data(), {f.spec[b].length(), kDim}),
                            matrix_view<const float>(res[b].recycled.merged.data(), {c, kDim}),
                            matrix_view<float>(want.data(), {n, kDim}));
      CHECK(std::memcmp(rows.data() + cu_out[b] * kDim, want.data(), want.size() * sizeof(float)) == 0);
    }
  }
}

TEST_CASE("batch: layouts, counts and hooks are validated with clear errors") {
  const fixture f(5);
  const auto in = f.packed();
  std::vector<workspace> ws(2);
  const std::span<const step_options> opts(f.options);
  const std::span<workspace> wss(ws);

  // Layouts.
  const seq_t cu_bad0{1, 5, 9};
  SV_CHECK_THROWS(errc::invalid_argument, "cu_seqlens[0]: expected 0, got 1", ragged_layout::packed(cu_bad0));
  const seq_t cu_dec{0, 5, 4};
  SV_CHECK_THROWS(errc::invalid_argument, "cu_seqlens[2]: expected >= 5 (non-decreasing), got 4",
                  ragged_layout::packed(cu_dec));
  SV_CHECK_THROWS(errc::invalid_argument, "cu_seqlens.size(): expected >= 1", ragged_layout::packed({}));
  const seq_t lens{4, 17};
  SV_CHECK_THROWS(errc::invalid_argument, "lengths[1]: expected in [0, 16] (max_length), got 17",
                  ragged_layout::padded(lens, 16));
  SV_CHECK_THROWS(errc::invalid_argument, "max_length: expected >= 0", ragged_layout::padded(lens, -1));
  CHECK(ragged_layout::padded(lens, 20).rows() == 40);
  CHECK(ragged_layout::padded(lens, 20).offset(1) == 20);
  CHECK(ragged_layout::packed(f.cu).count() == 5);

  // Counts and rows.
  auto bad = in;
  bad.attn = std::span<const tensor3_view<const float>>(f.attn_views).first(4);
  SV_CHECK_THROWS(errc::shape_mismatch, "attn.size(): expected 5 (sequences in the layout), got 4",
                  sparsevlm::prune_batch(bad, opts, wss));
  bad = in;
  bad.visual = std::span<const visual_span>(f.visual).first(3);
  SV_CHECK_THROWS(errc::shape_mismatch, "visual.size(): expected 5", sparsevlm::prune_batch(bad, opts, wss));
  bad = in;
  bad.raters = std::span<const raters_t>(f.rater_opts).first(2);
  SV_CHECK_THROWS(errc::shape_mismatch, "raters.size(): expected 0 or 5", sparsevlm::prune_batch(bad, opts, wss));
  SV_CHECK_THROWS(errc::shape_mismatch, "options.size(): expected 1 or 5 (sequences in the layout), got 2",
                  sparsevlm::prune_batch(in, opts.first(2), wss));
  SV_CHECK_THROWS(errc::invalid_argument, "ws.size(): expected >= 1", sparsevlm::prune_batch(in, opts, wss.first(0)));
  bad = in;
  bad.hidden = matrix_view<const float>(f.hidden_packed.data(), {f.cu.back() - 1, kDim});
  SV_CHECK_THROWS(errc::shape_mismatch, "hidden.extent[0]: expected 135 (layout rows), got 134",
                  sparsevlm::prune_batch(bad, opts, wss));
  bad = in;
  bad.embeds = matrix_view<const float>();
  SV_CHECK_THROWS(errc::shape_mismatch, "embeds.extent[0]: expected 135 (layout rows), got 0",
                  sparsevlm::prune_batch(bad, opts, wss));

  // One sequence's own checks, named by its index.
  std::vector<visual_span> vis = f.visual;
  vis[3] = visual_span{2, 12};  // sequence 3 has 12 tokens
  bad = in;
  bad.visual = vis;
  SV_CHECK_THROWS(errc::shape_mismatch, "batch[3].visual: expected a span inside [0, 12)",
                  sparsevlm::prune_batch(bad, opts, wss));
  std::vector<step_options> o = f.options;
  o[1].policy.keep = -1;
  o[1].policy.kind = keep_policy::kind_t::fixed;
  SV_CHECK_THROWS(errc::invalid_argument, "batch[1].policy.keep", sparsevlm::prune_batch(in, std::span<const step_options>(o), wss));
  std::vector<raters_t> rv = f.rater_opts;
  const seq_t inside_visual{3};
  rv[0] = std::span<const index_t>(inside_visual);
  bad = in;
  bad.raters = rv;
  SV_CHECK_THROWS(errc::invalid_argument, "batch[0].raters[0]", sparsevlm::prune_batch(bad, opts, wss));

  // Errors found while computing: the lowest sequence, after every task ran.
  std::vector<float> a1 = f.attn[1], a3 = f.attn[3];
  const std::vector<step_result> ok = sparsevlm::prune_batch(in, opts, wss);
  const auto nan_at_rater = [&](std::vector<float>& a, std::size_t b) {
    const index_t L = f.spec[b].length(), r = ok[b].raters.at(0);
    a[static_cast<std::size_t>(r * L + f.spec[b].prefix)] = svt::kNaNf;
  };
  nan_at_rater(a1, 1);
  nan_at_rater(a3, 3);
  std::vector<tensor3_view<const float>> av = f.attn_views;
  av[1] = tensor3_view<const float>(a1.data(), av[1].extents());
  av[3] = tensor3_view<const float>(a3.data(), av[3].extents());
  bad = in;
  bad.attn = av;
  SV_CHECK_THROWS(errc::non_finite, "batch[1].", sparsevlm::prune_batch(bad, opts, wss, parallel_for_fn(two_threads)));

  // Hooks that break the contract.
  const parallel_for_fn bad_worker = [](index_t n, const parallel_body& body) {
    for (index_t i = 0; i < n; ++i) body(i, 2);
  };
  SV_CHECK_THROWS(errc::invalid_argument, "parallel_for worker id: expected in [0, 2) (ws.size()), got 2",
                  sparsevlm::prune_batch(in, opts, wss, bad_worker));
  const parallel_for_fn skips = [](index_t n, const parallel_body& body) {
    for (index_t i = 0; i + 1 < n; ++i) body(i, 0);
  };
  SV_CHECK_THROWS(errc::invalid_argument, "parallel_for: expected a call of the body for every index in [0, 5), got none for 4",
                  sparsevlm::prune_batch(in, opts, wss, skips));

  // compact_packed.
  std::vector<float> rows = f.hidden_packed;
  const matrix_view<float> rv_(rows.data(), {f.cu.back(), kDim});
  seq_t cu_out(6);
  const ragged_layout layout = ragged_layout::packed(f.cu);
  SV_CHECK_THROWS(errc::shape_mismatch, "plans.size(): expected 5",
                  sparsevlm::compact_packed(layout, std::span<const step_result>(ok).first(4), rv_,
                                            std::span<index_t>(cu_out)));
  SV_CHECK_THROWS(errc::shape_mismatch, "cu_out.size(): expected 6 (B + 1), got 5",
                  sparsevlm::compact_packed(layout, std::span<const step_result>(ok), rv_,
                                            std::span<index_t>(cu_out).first(5)));
  std::vector<step_result> broken = ok;
  broken[2].sequence[1] = 0;  // a source before its output row
  SV_CHECK_THROWS(errc::invalid_argument, "plans[2].sequence[1]",
                  sparsevlm::compact_packed(layout, std::span<const step_result>(broken), rv_,
                                            std::span<index_t>(cu_out)));
  CHECK(rows == f.hidden_packed);  // untouched on error
}

// docs/integration.md, "Batches": the snippet between the markers is the one on
// that page (keep them the same).
TEST_CASE("batch: integration.md snippet") {
  const fixture f(3);
  const std::vector<index_t>& cu_seqlens = f.cu;
  const matrix_view<const float> embeds(f.embeds_packed.data(), {f.cu.back(), kDim});
  std::vector<float> hidden_rows = f.hidden_packed;
  const matrix_view<float> hidden(hidden_rows.data(), {f.cu.back(), kDim});
  const std::vector<tensor3_view<const float>>& attn = f.attn_views;  // one per sequence
  const std::vector<visual_span>& visual = f.visual;
  const std::vector<step_options>& options = f.options;  // per request
  const auto pool_parallel_for = two_threads;             // stands for the engine's pool
  using namespace sparsevlm;
  // [snippet]
  const ragged_layout layout = ragged_layout::packed(cu_seqlens);  // B + 1 varlen offsets
  const batch_inputs<float, tensor3_view<const float>, float> in{
      layout, embeds, attn, matrix_view<const float>(hidden), visual, {}};
  std::vector<workspace> ws(2);  // one per worker of the hook, reused across calls
  const parallel_for_fn hook = [&](index_t n, const parallel_body& body) {
    pool_parallel_for(n, body);  // body(i, worker id in [0, 2))
  };
  const std::vector<step_result> res = prune_batch(in, std::span<const step_options>(options),
                                                   std::span<workspace>(ws), hook);
  std::vector<index_t> cu_new(cu_seqlens.size());
  const index_t total = compact_packed(layout, std::span<const step_result>(res), hidden,
                                       std::span<index_t>(cu_new));
  // [snippet]
  REQUIRE(res.size() == f.spec.size());
  CHECK(total == cu_new.back());
  for (std::size_t b = 0; b < res.size(); ++b)
    CHECK(cu_new[b + 1] - cu_new[b] == static_cast<index_t>(res[b].sequence.size()));
}
