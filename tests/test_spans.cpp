// prune_step_spans: several visual spans in one sequence.
#include <algorithm>
#include <cmath>
#include <filesystem>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include <sparsevlm/io/case.hpp>

#include "test_util.hpp"

namespace fs = std::filesystem;
namespace io = sparsevlm::io;
using sparsevlm::errc;
using sparsevlm::index_t;
using sparsevlm::keep_policy;
using sparsevlm::matrix_view;
using sparsevlm::prune_step;
using sparsevlm::prune_step_spans;
using sparsevlm::qk_view;
using sparsevlm::span_budget;
using sparsevlm::span_options;
using sparsevlm::spans_result;
using sparsevlm::step_inputs;
using sparsevlm::step_inputs_qk;
using sparsevlm::step_options;
using sparsevlm::step_result;
using sparsevlm::tensor3_view;
using sparsevlm::visual_span;

using seq_t = std::vector<index_t>;

namespace {

using inputs_f = step_inputs<float, float, float>;
using inputs_qk_f = step_inputs_qk<float, float, float, float>;

/// A random sequence of length L with the given spans: embeds [L, de], an
/// attention [H, L, L] of positive rows summing to 1, q [H, L, dh], k [Hkv, L, dh],
/// hidden [L, d].
struct layout {
  index_t L, H = 4, Hkv = 2, dh = 8, de = 8, d = 6;
  std::vector<visual_span> spans;
  std::vector<float> embeds, attn, q, k, hidden;
  seq_t raters;  ///< caller raters, when used

  layout(std::mt19937& g, index_t length, std::vector<visual_span> s)
      : L(length), spans(std::move(s)) {
    const auto Lz = static_cast<std::size_t>(L);
    embeds = svt::random_floats(g, Lz * static_cast<std::size_t>(de), -1.0f, 1.0f);
    hidden = svt::random_floats(g, Lz * static_cast<std::size_t>(d), -1.0f, 1.0f);
    q = svt::random_floats(g, static_cast<std::size_t>(H * L * dh), -1.0f, 1.0f);
    k = svt::random_floats(g, static_cast<std::size_t>(Hkv * L * dh), -1.0f, 1.0f);
    attn = svt::random_floats(g, static_cast<std::size_t>(H) * Lz * Lz, 0.01f, 1.0f);
    for (std::size_t row = 0; row < static_cast<std::size_t>(H) * Lz; ++row) {
      float sum = 0.0f;
      for (std::size_t c = 0; c < Lz; ++c) sum += attn[row * Lz + c];
      for (std::size_t c = 0; c < Lz; ++c) attn[row * Lz + c] /= sum;
    }
    // Caller raters: every other text position after the last span.
    for (index_t t = spans.back().end(); t < L; t += 2) raters.push_back(t);
  }
  inputs_f inputs(bool caller_raters, visual_span visual = {}) const {
    inputs_f in;
    in.embeds = matrix_view<const float>(embeds.data(), {L, de}, "embeds");
    in.attn = tensor3_view<const float>(attn.data(), {H, L, L}, "attn");
    in.hidden = matrix_view<const float>(hidden.data(), {L, d}, "hidden");
    in.visual = visual;
    if (caller_raters) in.raters = std::span<const index_t>(raters);
    return in;
  }
  inputs_qk_f inputs_qk(bool caller_raters, visual_span visual = {}) const {
    inputs_qk_f in;
    in.embeds = matrix_view<const float>(embeds.data(), {L, de}, "embeds");
    in.qk.q = tensor3_view<const float>(q.data(), {H, L, dh}, "q");
    in.qk.k = tensor3_view<const float>(k.data(), {Hkv, L, dh}, "k");
    in.hidden = matrix_view<const float>(hidden.data(), {L, d}, "hidden");
    in.visual = visual;
    if (caller_raters) in.raters = std::span<const index_t>(raters);
    return in;
  }
  std::span<const visual_span> view() const { return spans; }
  index_t total() const {
    index_t n = 0;
    for (const auto& v : spans) n += v.len;
    return n;
  }
};

/// Random sorted, non-overlapping spans in [0, L), some adjacent, with text after.
std::vector<visual_span> random_spans(std::mt19937& g, index_t count, index_t& L) {
  std::vector<visual_span> spans;
  index_t p = svt::rand_int(g, 0, 3);
  for (index_t i = 0; i < count; ++i) {
    const index_t len = svt::rand_int(g, 1, 12);
    spans.push_back({p, len});
    p += len + (svt::rand_int(g, 0, 2) == 0 ? 0 : svt::rand_int(g, 1, 4));
  }
  L = spans.back().end() + svt::rand_int(g, 2, 9);
  return spans;
}

keep_policy random_policy(std::mt19937& g, index_t n) {
  if (svt::rand_int(g, 0, 1) == 0) return keep_policy::fixed(svt::rand_int(g, 0, n + 2));
  const double scales[] = {0.5, 1.0, 2.0, 3.0};
  return keep_policy::rank(scales[svt::rand_int(g, 0, 3)],
                           static_cast<double>(svt::rand_int(g, -1, 2)));
}

span_options random_options(std::mt19937& g, index_t n, span_budget budget) {
  span_options o;
  o.budget = budget;
  o.policy = random_policy(g, n);
  const double divisors[] = {1.5, 2.0, 3.0, 10.0};
  o.recycle = {svt::rand_int(g, 0, 3) != 0, svt::rand_int(g, 1, 10) / 10.0,
               divisors[svt::rand_int(g, 0, 3)]};
  return o;
}

step_options as_step(const span_options& o) {
  step_options s;
  s.policy = o.policy;
  s.recycle = o.recycle;
  s.scoring = o.scoring;
  return s;
}

/// Field-for-field equality of a one-span result with prune_step's.
void check_same(const step_result& a, const spans_result& b, span_budget budget) {
  CHECK(a.raters == b.raters);
  CHECK(a.scores == b.scores);  // bit for bit
  REQUIRE(b.spans.size() == 1);
  CHECK(a.rank == (budget == span_budget::global ? b.rank : b.spans[0].rank));
  CHECK(a.keep_count == b.keep_count);
  CHECK(a.keep_count == b.spans[0].keep_count);
  CHECK(a.keep == b.keep);
  CHECK(a.keep == b.spans[0].keep);
  CHECK(a.recycled.clusters == b.recycled.clusters);
  CHECK(a.recycled.merged == b.recycled.merged);
  CHECK(a.recycled.dim == b.recycled.dim);
  CHECK(b.spans[0].first_cluster == 0);
  CHECK(b.spans[0].clusters == static_cast<index_t>(a.recycled.clusters.size()));
  CHECK(a.sequence == b.sequence);
}

/// The span index holding absolute position p.
std::size_t owner(const std::vector<visual_span>& spans, index_t p) {
  for (std::size_t i = 0; i < spans.size(); ++i)
    if (p >= spans[i].start && p < spans[i].end()) return i;
  FAIL("position ", p, " is in no span");
  return 0;
}

/// Invariants every multi-span result satisfies, from the rules in the header
/// (independent of how the keep counts were chosen): keep sets are each span's
/// top by score; recycling takes the spec's s_i best pruned tokens of each span
/// and never crosses spans; merged rows are cluster means; the sequence is the
/// layout with each span replaced.
void check_structure(const layout& lay, const spans_result& r, const span_options& o) {
  const auto& spans = lay.spans;
  REQUIRE(r.spans.size() == spans.size());
  REQUIRE(static_cast<index_t>(r.scores.size()) == lay.total());
  index_t off = 0, kept_total = 0, next_cluster = 0;
  seq_t all_keep;
  for (std::size_t i = 0; i < spans.size(); ++i) {
    const auto& part = r.spans[i];
    const visual_span v = spans[i];
    CHECK(part.visual.start == v.start);
    CHECK(part.visual.len == v.len);
    const std::vector<float> sc(r.scores.begin() + off, r.scores.begin() + off + v.len);
    const seq_t order = svt::ranked(sc);  // span-relative, best first
    seq_t top(order.begin(), order.begin() + part.keep_count);
    std::sort(top.begin(), top.end());
    for (index_t& t : top) t += v.start;
    CHECK(part.keep == top);
    all_keep.insert(all_keep.end(), part.keep.begin(), part.keep.end());
    kept_total += part.keep_count;

    const index_t pruned = v.len - part.keep_count;
    const index_t s = o.recycle.enabled && pruned > 0
                          ? sparsevlm::detail::core::recycle_count(pruned, o.recycle.fraction)
                          : 0;
    const index_t c = s > 0 ? sparsevlm::detail::core::cluster_count(s, o.recycle.cluster_divisor) : 0;
    CHECK(part.first_cluster == next_cluster);
    CHECK(part.clusters == c);
    seq_t members;
    for (index_t q = part.first_cluster; q < part.first_cluster + part.clusters; ++q) {
      const auto& cl = r.recycled.clusters[static_cast<std::size_t>(q)];
      REQUIRE_FALSE(cl.empty());
      std::vector<double> mean(static_cast<std::size_t>(lay.d), 0.0);
      for (index_t p : cl) {
        CHECK(owner(spans, p) == i);  // never another span's token
        members.push_back(p);
        for (index_t c2 = 0; c2 < lay.d; ++c2)
          mean[static_cast<std::size_t>(c2)] += lay.hidden[static_cast<std::size_t>(p * lay.d + c2)];
      }
      for (index_t c2 = 0; c2 < lay.d; ++c2) {
        const double want = mean[static_cast<std::size_t>(c2)] / static_cast<double>(cl.size());
        CHECK(r.recycled.merged[static_cast<std::size_t>(q * lay.d + c2)] ==
              doctest::Approx(want).epsilon(1e-5));
      }
    }
    std::sort(members.begin(), members.end());
    seq_t want(order.begin() + part.keep_count, order.begin() + part.keep_count + s);
    for (index_t& t : want) t += v.start;
    std::sort(want.begin(), want.end());
    CHECK(members == want);
    next_cluster += part.clusters;
    off += v.len;
  }
  CHECK(static_cast<index_t>(r.recycled.clusters.size()) == next_cluster);
  CHECK(static_cast<index_t>(r.recycled.merged.size()) == next_cluster * lay.d);
  CHECK(r.keep_count == kept_total);
  CHECK(r.keep == all_keep);

  // The sequence, built naively from the layout.
  seq_t seq;
  index_t p = 0, rec = 0;
  for (std::size_t i = 0; i < spans.size(); ++i) {
    for (; p < spans[i].start; ++p) seq.push_back(p);
    seq.insert(seq.end(), r.spans[i].keep.begin(), r.spans[i].keep.end());
    for (index_t q = 0; q < r.spans[i].clusters; ++q) seq.push_back(-(++rec));
    p = spans[i].end();
  }
  for (; p < lay.L; ++p) seq.push_back(p);
  CHECK(r.sequence == seq);
}

/// Spec step 1 over the union of the spans (V) and the text after the last (T),
/// in double, through the shared reference on a copied block.
std::vector<double> ref_union_means(const layout& lay) {
  std::vector<double> block;
  const auto copy = [&](index_t from, index_t to) {
    for (index_t p = from; p < to; ++p)
      for (index_t c = 0; c < lay.de; ++c)
        block.push_back(lay.embeds[static_cast<std::size_t>(p * lay.de + c)]);
  };
  for (const auto& v : lay.spans) copy(v.start, v.end());
  copy(lay.spans.back().end(), lay.L);
  const index_t n = lay.total();
  return svt::ref_rater_means(block, lay.de, n + lay.L - lay.spans.back().end(), 0, n);
}

}  // namespace

TEST_CASE("spans: one span equals prune_step on random inputs (attention and q/k)") {
  std::mt19937 g(4041);
  sparsevlm::workspace ws, ws_ref;
  for (int trial = 0; trial < 120; ++trial) {
    INFO("trial ", trial);
    index_t L = 0;
    const auto spans = random_spans(g, 1, L);
    if (trial % 10 == 9) L = spans.back().end();  // no text: no raters
    const layout lay(g, L, spans);
    const auto budget = trial % 2 == 0 ? span_budget::global : span_budget::per_span;
    span_options o = random_options(g, lay.total(), budget);
    if (trial % 7 == 3) o.scoring.top_heads = svt::rand_int(g, 1, lay.H);
    if (trial % 5 == 2) {
      o.scoring.gravity.enabled = true;
      o.scoring.gravity.head_dim = lay.dh;
    }
    const bool caller = trial % 3 == 0;
    const auto a = prune_step(lay.inputs(caller, spans[0]), as_step(o), ws_ref);
    check_same(a, prune_step_spans(lay.inputs(caller), lay.view(), o, ws), budget);
    const auto b = prune_step(lay.inputs_qk(caller, spans[0]), as_step(o), ws_ref);
    check_same(b, prune_step_spans(lay.inputs_qk(caller), lay.view(), o, ws), budget);
  }
}

TEST_CASE("spans: one span equals prune_step and the expected result on the shared cases") {
  const std::vector<fs::path> cases = svt::shared_case_dirs();
  if (cases.empty()) return;
  sparsevlm::workspace ws;
  for (const auto& c : cases) {
    INFO("case ", c.filename().string());
    const io::case_data data = io::load_case(c);
    const io::expected_result expected = io::read_expected(c / "expected");
    std::vector<io::scores_source> sources{io::scores_source::attn};
    if (data.q && data.k) sources.push_back(io::scores_source::qk);
    for (const auto from : sources) {
      for (const auto budget : {span_budget::global, span_budget::per_span}) {
        span_options o;
        o.budget = budget;
        o.policy = data.options.policy;
        o.recycle = data.options.recycle;
        o.scoring = data.options.scoring;
        const visual_span spans[] = {data.visual};
        const spans_result r = io::visit_case(
            data, [&](const auto& in) { return prune_step_spans(in, spans, o, ws); }, from);
        const step_result a = io::visit_case(
            data, [&](const auto& in) { return prune_step(in, data.options, ws); }, from);
        check_same(a, r, budget);
        step_result as_step_result;
        as_step_result.raters = r.raters;
        as_step_result.scores = r.scores;
        as_step_result.rank = budget == span_budget::global ? r.rank : r.spans[0].rank;
        as_step_result.keep_count = r.keep_count;
        as_step_result.keep = r.keep;
        as_step_result.recycled = r.recycled;
        as_step_result.sequence = r.sequence;
        const auto diffs = io::compare(as_step_result, expected);
        CHECK_MESSAGE(diffs.empty(), (diffs.empty() ? std::string() : diffs.front()));
      }
    }
  }
}

TEST_CASE("spans: a global budget keeps the top k over the union") {
  std::mt19937 g(77);
  sparsevlm::workspace ws;
  for (int trial = 0; trial < 80; ++trial) {
    INFO("trial ", trial);
    index_t L = 0;
    const auto spans = random_spans(g, 2 + trial % 2, L);
    const layout lay(g, L, spans);
    const index_t n = lay.total();
    const span_options o = random_options(g, n, span_budget::global);
    const bool qk = trial % 4 == 1;
    const spans_result r = qk ? prune_step_spans(lay.inputs_qk(false), lay.view(), o, ws)
                              : prune_step_spans(lay.inputs(false), lay.view(), o, ws);

    // Raters: the spec's rule with V = the union, T = after the last span (a
    // margin keeps float32 rounding out of the comparison).
    const auto m = ref_union_means(lay);
    double mean = 0.0;
    for (double v : m) mean += v;
    mean /= static_cast<double>(m.size());
    const index_t text = spans.back().end();
    for (std::size_t t = 0; t < m.size(); ++t) {
      const bool is_rater =
          std::find(r.raters.begin(), r.raters.end(), text + static_cast<index_t>(t)) !=
          r.raters.end();
      if (m[t] > mean + 1e-9) CHECK(is_rater);
      if (m[t] < mean - 1e-9) CHECK_FALSE(is_rater);
    }
    const index_t R = static_cast<index_t>(r.raters.size());

    // Scores against the double reference (attention form; q/k in the test below).
    if (!qk) {
      std::vector<double> attn_d(lay.attn.begin(), lay.attn.end());
      index_t off = 0;
      for (const auto& v : spans) {
        const auto ref = svt::ref_scores(attn_d, lay.H, lay.L, r.raters, v.start, v.len);
        for (index_t j = 0; j < v.len; ++j)
          CHECK(r.scores[static_cast<std::size_t>(off + j)] ==
                doctest::Approx(ref[static_cast<std::size_t>(j)]).epsilon(1e-5));
        off += v.len;
      }
    }

    // Random P of R <= n rows has full row rank; the policy then applies to N = n.
    if (R > 0) CHECK(r.rank == std::min(R, n));
    index_t want_keep = n;
    if (R > 0) {
      if (o.policy.kind == keep_policy::kind_t::fixed) {
        want_keep = std::min(o.policy.keep, n - 1);
      } else if (r.rank < n) {
        want_keep = sparsevlm::detail::core::rank_keep(r.rank, o.policy.scale, o.policy.bias, n);
      }
    }
    CHECK(r.keep_count == want_keep);
    // The keep set: the top keep_count by score over the union, ties to the lower position.
    const seq_t order = svt::ranked(r.scores);
    std::vector<index_t> union_pos;
    for (const auto& v : spans)
      for (index_t p = v.start; p < v.end(); ++p) union_pos.push_back(p);
    seq_t top;
    for (index_t i = 0; i < want_keep; ++i)
      top.push_back(union_pos[static_cast<std::size_t>(order[static_cast<std::size_t>(i)])]);
    std::sort(top.begin(), top.end());
    CHECK(r.keep == top);
    for (const auto& part : r.spans) CHECK(part.rank == -1);
    check_structure(lay, r, o);
  }
}

TEST_CASE("spans: per-span budgets equal prune_step on each span alone") {
  std::mt19937 g(909);
  sparsevlm::workspace ws, ws_ref;
  for (int trial = 0; trial < 60; ++trial) {
    INFO("trial ", trial);
    index_t L = 0;
    const auto spans = random_spans(g, 2 + trial % 3, L);
    const layout lay(g, L, spans);
    span_options o = random_options(g, lay.total(), span_budget::per_span);
    std::vector<keep_policy> policies;
    if (trial % 2 == 1) {  // a policy of its own for each span
      for (const auto& v : spans) policies.push_back(random_policy(g, v.len));
      o.span_policies = policies;
    }
    if (trial % 5 == 4) o.scoring.top_heads = svt::rand_int(g, 1, lay.H);
    const bool qk = trial % 3 != 0;
    const spans_result r = qk ? prune_step_spans(lay.inputs_qk(true), lay.view(), o, ws)
                              : prune_step_spans(lay.inputs(true), lay.view(), o, ws);
    CHECK(r.raters == lay.raters);
    CHECK(r.rank == -1);
    index_t off = 0;
    for (std::size_t i = 0; i < spans.size(); ++i) {
      INFO("span ", i);
      step_options so = as_step(o);
      if (!policies.empty()) so.policy = policies[i];
      // Caller raters after the last span are text for every span.
      const step_result a = qk ? prune_step(lay.inputs_qk(true, spans[i]), so, ws_ref)
                               : prune_step(lay.inputs(true, spans[i]), so, ws_ref);
      const auto& part = r.spans[i];
      CHECK(std::equal(a.scores.begin(), a.scores.end(), r.scores.begin() + off));
      CHECK(part.rank == a.rank);
      CHECK(part.keep_count == a.keep_count);
      CHECK(part.keep == a.keep);
      REQUIRE(part.clusters == static_cast<index_t>(a.recycled.clusters.size()));
      for (index_t q = 0; q < part.clusters; ++q)
        CHECK(r.recycled.clusters[static_cast<std::size_t>(part.first_cluster + q)] ==
              a.recycled.clusters[static_cast<std::size_t>(q)]);
      CHECK(std::equal(a.recycled.merged.begin(), a.recycled.merged.end(),
                       r.recycled.merged.begin() + part.first_cluster * lay.d));
      off += spans[i].len;
    }
    check_structure(lay, r, o);
  }
}

TEST_CASE("spans: scores from q/k in one pass equal each span scored alone") {
  // The q/k form scores the hull [first start, last end) once and keeps the
  // spans' columns; the text between spans must not leak into the union.
  std::mt19937 g(31337);
  sparsevlm::workspace ws, ws_ref;
  for (int trial = 0; trial < 30; ++trial) {
    index_t L = 0;
    const auto spans = random_spans(g, 3, L);
    const layout lay(g, L, spans);
    span_options o = random_options(g, lay.total(), span_budget::global);
    if (trial % 2 == 0) {
      o.scoring.gravity.enabled = true;
      o.scoring.gravity.head_dim = lay.dh;
    }
    const spans_result r = prune_step_spans(lay.inputs_qk(true), lay.view(), o, ws);
    index_t off = 0;
    for (const auto& v : spans) {
      const step_result a = prune_step(lay.inputs_qk(true, v), as_step(o), ws_ref);
      CHECK(std::equal(a.scores.begin(), a.scores.end(), r.scores.begin() + off));
      off += v.len;
    }
    check_structure(lay, r, o);
  }
}

TEST_CASE("spans: each span's rank sees its own columns only") {
  // Within each span every key (and every attention column) is the same, so
  // each span's P has rank 1 and the union's P rank 3 (one column direction per
  // span); a column of the text between spans leaking in would raise them.
  std::mt19937 g(2718);
  const std::vector<visual_span> spans{{1, 5}, {9, 4}, {15, 6}};
  layout lay(g, 30, spans);  // caller raters 21, 23, ..., 29: R = 5
  const auto Lz = static_cast<std::size_t>(lay.L);
  for (const auto& v : spans)
    for (index_t p = v.start + 1; p < v.end(); ++p) {
      for (index_t kh = 0; kh < lay.Hkv; ++kh)
        for (index_t c = 0; c < lay.dh; ++c)
          lay.k[static_cast<std::size_t>((kh * lay.L + p) * lay.dh + c)] =
              lay.k[static_cast<std::size_t>((kh * lay.L + v.start) * lay.dh + c)];
      for (std::size_t row = 0; row < static_cast<std::size_t>(lay.H) * Lz; ++row)
        lay.attn[row * Lz + static_cast<std::size_t>(p)] =
            lay.attn[row * Lz + static_cast<std::size_t>(v.start)];
    }
  for (const bool qk : {false, true}) {
    INFO("q/k: ", qk);
    span_options o;
    o.policy = keep_policy::rank(2.0, 0.0);
    o.recycle.enabled = false;
    const auto g_res = qk ? prune_step_spans(lay.inputs_qk(true), lay.view(), o)
                          : prune_step_spans(lay.inputs(true), lay.view(), o);
    CHECK(g_res.rank == 3);
    CHECK(g_res.keep_count == 6);
    o.budget = span_budget::per_span;
    const auto p_res = qk ? prune_step_spans(lay.inputs_qk(true), lay.view(), o)
                          : prune_step_spans(lay.inputs(true), lay.view(), o);
    for (const auto& part : p_res.spans) {
      CHECK(part.rank == 1);
      CHECK(part.keep_count == 2);
      // Equal scores within a span: ties go to the lower positions.
      CHECK(part.keep == seq_t{part.visual.start, part.visual.start + 1});
    }
  }
}

TEST_CASE("spans: recycling never mixes spans, and the plan applies") {
  // Three spans, a global budget of 4 out of 24: most tokens are pruned and
  // every span recycles its own.
  std::mt19937 g(5);
  const std::vector<visual_span> spans{{2, 8}, {12, 8}, {20, 8}};  // 20 follows 12+8: adjacent
  const layout lay(g, 34, spans);
  span_options o;
  o.policy = keep_policy::fixed(4);
  o.recycle = {true, 0.5, 2.0};
  const spans_result r = prune_step_spans(lay.inputs(false), lay.view(), o);
  CHECK(r.keep_count == 4);
  CHECK(r.spans.size() == 3);
  index_t recycled = 0;
  for (std::size_t i = 0; i < spans.size(); ++i) {
    const index_t pruned = spans[i].len - r.spans[i].keep_count;
    const index_t s = sparsevlm::detail::core::recycle_count(pruned, 0.5);
    CHECK(r.spans[i].clusters == sparsevlm::detail::core::cluster_count(s, 2.0));
    recycled += r.spans[i].clusters;
  }
  check_structure(lay, r, o);
  CHECK(static_cast<index_t>(r.sequence.size()) == lay.L - 24 + 4 + recycled);

  // apply_plan with the merged rows, and the in-place form, give the same rows.
  const auto c = static_cast<index_t>(r.recycled.clusters.size());
  const matrix_view<const float> merged(r.recycled.merged.data(), {c, lay.d}, "merged");
  const auto n_out = static_cast<index_t>(r.sequence.size());
  std::vector<float> out(static_cast<std::size_t>(n_out * lay.d));
  sparsevlm::apply_plan(std::span<const index_t>(r.sequence),
                        matrix_view<const float>(lay.hidden.data(), {lay.L, lay.d}),
                        merged, matrix_view<float>(out.data(), {n_out, lay.d}));
  for (index_t i = 0; i < n_out; ++i) {
    const index_t p = r.sequence[static_cast<std::size_t>(i)];
    for (index_t col = 0; col < lay.d; ++col) {
      const float want = p >= 0 ? lay.hidden[static_cast<std::size_t>(p * lay.d + col)]
                                : r.recycled.merged[static_cast<std::size_t>((-p - 1) * lay.d + col)];
      CHECK(out[static_cast<std::size_t>(i * lay.d + col)] == want);
    }
  }
  std::vector<float> inplace = lay.hidden;
  CHECK(sparsevlm::apply_plan_inplace(std::span<const index_t>(r.sequence),
                                      matrix_view<float>(inplace.data(), {lay.L, lay.d}),
                                      merged) == n_out);
  CHECK(std::equal(out.begin(), out.end(), inplace.begin()));
}

TEST_CASE("spans: no text after the last span keeps every token") {
  std::mt19937 g(8);
  const std::vector<visual_span> spans{{1, 4}, {7, 3}};
  const layout lay(g, 10, spans);  // the last span reaches the end
  for (const auto budget : {span_budget::global, span_budget::per_span}) {
    span_options o;
    o.budget = budget;
    o.policy = keep_policy::fixed(0);
    const spans_result r = prune_step_spans(lay.inputs(false), lay.view(), o);
    CHECK(r.raters.empty());
    CHECK(r.keep == seq_t{1, 2, 3, 4, 7, 8, 9});
    CHECK(r.recycled.clusters.empty());
    CHECK(r.sequence == seq_t{0, 1, 2, 3, 4, 5, 6, 7, 8, 9});
  }
}

TEST_CASE("spans: fixed budgets beyond N are clamped to N - 1, as in the spec") {
  std::mt19937 g(12);
  const std::vector<visual_span> spans{{0, 5}, {6, 3}};
  const layout lay(g, 14, spans);
  span_options o;
  o.policy = keep_policy::fixed(100);
  o.recycle.enabled = false;
  CHECK(prune_step_spans(lay.inputs(true), lay.view(), o).keep_count == 7);  // n - 1
  o.budget = span_budget::per_span;
  const auto r = prune_step_spans(lay.inputs(true), lay.view(), o);
  CHECK(r.spans[0].keep_count == 4);
  CHECK(r.spans[1].keep_count == 2);
  CHECK(r.keep_count == 6);
}

TEST_CASE("spans: bad layouts and options give clear errors") {
  std::mt19937 g(3);
  const layout lay(g, 20, {{2, 4}, {8, 4}});
  const auto in = lay.inputs(false);
  const auto in_qk = lay.inputs_qk(false);
  const span_options o;
  using spans_t = std::vector<visual_span>;
  const auto run = [&](const spans_t& s, const span_options& opt = {}) {
    return prune_step_spans(in, std::span<const visual_span>(s), opt);
  };
  SV_CHECK_THROWS(errc::shape_mismatch, "spans: expected at least one visual span", run({}));
  SV_CHECK_THROWS(errc::shape_mismatch, "spans[1].len: expected >= 1", run({{2, 4}, {8, 0}}));
  SV_CHECK_THROWS(errc::shape_mismatch, "spans[0].start: expected >= 0", run({{-1, 4}}));
  SV_CHECK_THROWS(errc::shape_mismatch, "spans[1]: expected a span inside [0, 20)",
                  run({{2, 4}, {18, 3}}));
  SV_CHECK_THROWS(errc::shape_mismatch, "spans[2]: expected a span inside [0, 20)",
                  run({{0, 1}, {2, 1}, {20, 1}}));
  // Overlapping, and unsorted: the message names the span and the bound.
  SV_CHECK_THROWS(errc::shape_mismatch,
                  "spans[1].start: expected >= 6 (the end of spans[0]: spans sorted by position, "
                  "not overlapping), got 5",
                  run({{2, 4}, {5, 4}}));
  SV_CHECK_THROWS(errc::shape_mismatch, "spans[1].start: expected >= 12", run({{8, 4}, {2, 4}}));
  SV_CHECK_THROWS(errc::shape_mismatch, "spans[1].start", prune_step_spans(in_qk, spans_t{{2, 4}, {3, 1}}, o));
  // Caller raters must follow the last span.
  const seq_t early{7, 14};
  auto with_raters = in;
  with_raters.raters = std::span<const index_t>(early);
  SV_CHECK_THROWS(errc::invalid_argument, "raters[0]: expected a text position in [12, 20)",
                  prune_step_spans(with_raters, lay.view(), o));
  // Per-span policies: one per span, only with per_span budgets, each valid.
  const std::vector<keep_policy> one{keep_policy::fixed(1)};
  const std::vector<keep_policy> two{keep_policy::fixed(1), keep_policy::fixed(-2)};
  span_options p;
  p.span_policies = one;
  SV_CHECK_THROWS(errc::invalid_argument, "span_policies: expected empty with span_budget::global",
                  prune_step_spans(in, lay.view(), p));
  p.budget = span_budget::per_span;
  SV_CHECK_THROWS(errc::invalid_argument, "span_policies.size(): expected 2 (one per span) or 0, got 1",
                  prune_step_spans(in, lay.view(), p));
  p.span_policies = two;
  SV_CHECK_THROWS(errc::invalid_argument, "span_policies[1]: policy.keep: expected >= 0, got -2",
                  prune_step_spans(in, lay.view(), p));
  span_options bad_policy;
  bad_policy.policy = keep_policy::fixed(-1);
  SV_CHECK_THROWS(errc::invalid_argument, "policy.keep", prune_step_spans(in, lay.view(), bad_policy));
  // Shapes: hidden rows must match L.
  auto short_hidden = in;
  short_hidden.hidden = matrix_view<const float>(lay.hidden.data(), {19, lay.d});
  SV_CHECK_THROWS(errc::shape_mismatch, "hidden.extent[0]: expected 20",
                  prune_step_spans(short_hidden, lay.view(), o));
}

TEST_CASE("spans: make_sequence_spans checks its arguments") {
  const std::vector<visual_span> spans{{1, 3}, {5, 2}};
  CHECK(sparsevlm::make_sequence_spans(8, spans, seq_t{2, 6}, seq_t{1, 1}) ==
        seq_t{0, 2, -1, 4, 6, -2, 7});
  CHECK(sparsevlm::make_sequence_spans(8, spans, seq_t{}, seq_t{0, 0}) == seq_t{0, 4, 7});
  SV_CHECK_THROWS(errc::shape_mismatch, "recycled.size(): expected 2 (one count per span)",
                  sparsevlm::make_sequence_spans(8, spans, seq_t{2}, seq_t{1}));
  SV_CHECK_THROWS(errc::invalid_argument, "keep[0]",
                  sparsevlm::make_sequence_spans(8, spans, seq_t{4}, seq_t{0, 0}));
  SV_CHECK_THROWS(errc::invalid_argument, "keep[1]",
                  sparsevlm::make_sequence_spans(8, spans, seq_t{2, 7}, seq_t{0, 0}));
  SV_CHECK_THROWS(errc::invalid_argument, "keep[1]",
                  sparsevlm::make_sequence_spans(8, spans, seq_t{3, 2}, seq_t{0, 0}));
  SV_CHECK_THROWS(errc::invalid_argument, "recycled[1]: expected in [0, 1]",
                  sparsevlm::make_sequence_spans(8, spans, seq_t{6}, seq_t{0, 2}));
}

TEST_CASE("spans: the per-stage hook sees every stage once, in order, for one span and several") {
  std::mt19937 g(8123);
  sparsevlm::workspace ws;
  const std::vector<std::string> want{"raters", "scores", "rank", "keep", "recycle", "plan"};
  for (index_t count : {1, 3}) {
    for (const auto budget : {span_budget::global, span_budget::per_span}) {
      INFO("spans ", count, " per_span ", budget == span_budget::per_span);
      index_t L = 0;
      const auto spans = random_spans(g, count, L);
      const layout lay(g, L, spans);
      const span_options o = random_options(g, lay.total(), budget);
      std::vector<std::string> seen, seen_qk;
      const auto a = prune_step_spans(lay.inputs(false), lay.view(), o, ws,
                                      [&](const char* s) { seen.emplace_back(s); });
      const auto b = prune_step_spans(lay.inputs_qk(false), lay.view(), o, ws,
                                      [&](const char* s) { seen_qk.emplace_back(s); });
      CHECK(seen == want);
      CHECK(seen_qk == want);
      // The hook observes; it does not change the decisions.
      const auto c = prune_step_spans(lay.inputs(false), lay.view(), o, ws);
      CHECK(a.keep == c.keep);
      CHECK(a.sequence == c.sequence);
      const auto d = prune_step_spans(lay.inputs_qk(false), lay.view(), o, ws);
      CHECK(b.keep == d.keep);
    }
  }
}
