// prune_step: the stages composed.
#include <Eigen/Dense>
#include <Eigen/SVD>
#include <algorithm>
#include <optional>
#include <string>
#include <vector>

#include "test_util.hpp"

using sparsevlm::bfloat16;
using sparsevlm::errc;
using sparsevlm::half;
using sparsevlm::index_t;
using sparsevlm::keep_policy;
using sparsevlm::matrix_view;
using sparsevlm::prune_step;
using sparsevlm::step_inputs;
using sparsevlm::step_options;
using sparsevlm::step_result;
using sparsevlm::tensor3_view;
using sparsevlm::visual_span;

using seq_t = std::vector<index_t>;
using clusters_t = std::vector<std::vector<index_t>>;

namespace {

using inputs_f = step_inputs<float, float, float>;

step_options opts(keep_policy p, bool recycle = true, double fraction = 0.5, double divisor = 10) {
  step_options o;
  o.policy = p;
  o.recycle = {recycle, fraction, divisor};
  return o;
}

// Example A. L = 7: prefix 0, visual 1-4 (N = 4), text 5-6; H = 2; raters {5, 6}
// given by the caller. Head 0's rater rows over the visual columns are
//   row 5: (1, 0.5, 0.25, 0.125)    row 6: (0.5, 0.25, 0.125, 0.0625)
// and head 1's are 0, so the head mean is
//   P = [[0.5, 0.25, 0.125, 0.0625], [0.25, 0.125, 0.0625, 0.03125]]   (row 6 = row 5 / 2: rank 1)
//   scores = column means = (0.375, 0.1875, 0.09375, 0.046875).
// Every other attention entry is NaN: the step must not read it.
// hidden row p = (p, -2p), d = 2.
struct example_a {
  static constexpr index_t H = 2, L = 7, d = 2;
  std::vector<float> attn = std::vector<float>(static_cast<std::size_t>(H * L * L), svt::kNaNf);
  std::vector<float> hidden = std::vector<float>(static_cast<std::size_t>(L * d));
  seq_t raters{5, 6};
  example_a() {
    const float r5[4] = {1, 0.5f, 0.25f, 0.125f};
    for (index_t j = 0; j < 4; ++j) {
      at(0, 5, 1 + j) = r5[j];
      at(0, 6, 1 + j) = r5[j] / 2;
      at(1, 5, 1 + j) = 0;
      at(1, 6, 1 + j) = 0;
    }
    for (index_t p = 0; p < L; ++p) {
      hidden[static_cast<std::size_t>(p * d)] = static_cast<float>(p);
      hidden[static_cast<std::size_t>(p * d + 1)] = static_cast<float>(-2 * p);
    }
  }
  float& at(index_t h, index_t q, index_t k) { return attn[static_cast<std::size_t>((h * L + q) * L + k)]; }
  inputs_f inputs() const {
    inputs_f in;
    in.attn = tensor3_view<const float>(attn.data(), {H, L, L}, "attn");
    in.hidden = matrix_view<const float>(hidden.data(), {L, d}, "hidden");
    in.visual = {1, 4};
    in.raters = std::span<const index_t>(raters);
    return in;
  }
};

index_t spec_keep_count(const keep_policy& p, index_t rank, index_t N, index_t R) {
  if (R == 0) return N;
  if (p.kind == keep_policy::kind_t::fixed) return std::min(p.keep, N - 1);
  if (rank == N) return N;
  const double v = std::floor(static_cast<double>(rank) * p.scale + p.bias);
  return v <= 0 ? 0 : v >= static_cast<double>(N - 1) ? N - 1 : static_cast<index_t>(v);
}

}  // namespace

TEST_CASE("step: example A, rank policy with recycling") {
  example_a ex;
  // rank 1, policy floor(1 * 2 + 0) = 2 -> keep the two best, visual 0 and 1 =
  // positions 1, 2. Pruned n = 2 (positions 3, 4); s = min(2, floor(0.5 * 2) + 1) = 2;
  // c = floor(2 / 10) + 1 = 1: one cluster {3, 4}, merged = ((3 + 4) / 2, (-6 - 8) / 2).
  const step_result r = prune_step(ex.inputs(), opts(keep_policy::rank(2, 0)));
  CHECK(r.raters == seq_t{5, 6});
  CHECK(r.scores == std::vector<float>{0.375f, 0.1875f, 0.09375f, 0.046875f});
  CHECK(r.rank == 1);
  CHECK(r.keep_count == 2);
  CHECK(r.keep == seq_t{1, 2});
  CHECK(r.recycled.clusters == clusters_t{{3, 4}});
  CHECK(r.recycled.merged == std::vector<float>{3.5f, -7.0f});
  CHECK(r.recycled.dim == 2);
  CHECK(r.sequence == seq_t{0, 1, 2, -1, 5, 6});  // 7 - 4 + 2 + 1 = 6 tokens
}

TEST_CASE("step: example A, other policies") {
  example_a ex;
  // fixed 3: keep positions 1-3; pruned n = 1 (position 4): s = 1, c = 1.
  step_result r = prune_step(ex.inputs(), opts(keep_policy::fixed(3)));
  CHECK(r.keep_count == 3);
  CHECK(r.keep == seq_t{1, 2, 3});
  CHECK(r.recycled.clusters == clusters_t{{4}});
  CHECK(r.recycled.merged == std::vector<float>{4.0f, -8.0f});
  CHECK(r.sequence == seq_t{0, 1, 2, 3, -1, 5, 6});
  // fixed 100 -> N - 1 = 3, the same.
  CHECK(prune_step(ex.inputs(), opts(keep_policy::fixed(100))).keep == seq_t{1, 2, 3});
  // Recycling off: prune without merging.
  r = prune_step(ex.inputs(), opts(keep_policy::rank(2, 0), false));
  CHECK(r.keep == seq_t{1, 2});
  CHECK(r.recycled.clusters.empty());
  CHECK(r.recycled.merged.empty());
  CHECK(r.sequence == seq_t{0, 1, 2, 5, 6});
  // floor(1 * 0 - 1) = -1 -> keep 0. Pruned n = 4: s = min(4, floor(0.5 * 4) + 1) = 3,
  // the three best-scored (visual 0, 1, 2 = positions 1, 2, 3), one cluster.
  r = prune_step(ex.inputs(), opts(keep_policy::rank(0, -1)));
  CHECK(r.keep_count == 0);
  CHECK(r.keep.empty());
  CHECK(r.recycled.clusters == clusters_t{{1, 2, 3}});
  CHECK(r.recycled.merged == std::vector<float>{2.0f, -4.0f});
  CHECK(r.sequence == seq_t{0, -1, 5, 6});
  // divisor 1.5 with s = 3: c = floor(3 / 1.5) + 1 = 3 clusters, one per token.
  // The points (1,-2), (2,-4), (3,-6) lie on a line 1 apart (times sqrt 5 / sqrt 2);
  // k = 3 covers every row, so rho is exp(-(0 + a^2 + b^2) / 3): the middle point
  // (2,-4) has the smallest distances and is densest, delta = max D; the two
  // ends tie in rho (same multiset {0, u, 2u}) and the lower index, position 1
  // (ranked i = 0), is denser than position 3, so delta(pos 1) = D to pos 2 = u,
  // delta(pos 3) = u too; gamma(pos 1) = gamma(pos 3): ties to the lower index.
  // Clusters by gamma: {2}, {1}, {3}.
  r = prune_step(ex.inputs(), opts(keep_policy::rank(0, -1), true, 0.5, 1.5));
  CHECK(r.recycled.clusters == clusters_t{{2}, {1}, {3}});
  CHECK(r.sequence == seq_t{0, -1, -2, -3, 5, 6});
}

TEST_CASE("step: rank == N keeps everything") {
  // L = 5: prefix 0, visual 1-2, text 3-4; H = 1; raters {3, 4}.
  // P = [[0.5, 0.25], [0.25, 0.5]], det = 0.1875 != 0: rank 2 = N, keep all
  // although floor(2 * 0.5) = 1 would keep one.
  std::vector<float> attn(25, 0.0f);
  attn[3 * 5 + 1] = 0.5f;
  attn[3 * 5 + 2] = 0.25f;
  attn[4 * 5 + 1] = 0.25f;
  attn[4 * 5 + 2] = 0.5f;
  const std::vector<float> hidden(10, 1.0f);
  const seq_t raters{3, 4};
  inputs_f in;
  in.attn = tensor3_view<const float>(attn.data(), {1, 5, 5});
  in.hidden = matrix_view<const float>(hidden.data(), {5, 2});
  in.visual = {1, 2};
  in.raters = std::span<const index_t>(raters);
  const auto r = prune_step(in, opts(keep_policy::rank(0.5, 0)));
  CHECK(r.rank == 2);
  CHECK(r.keep_count == 2);
  CHECK(r.keep == seq_t{1, 2});
  CHECK(r.recycled.clusters.empty());
  CHECK(r.sequence == seq_t{0, 1, 2, 3, 4});
  // The fixed policy ignores the rank: min(5, N - 1) = 1, keeps the better
  // score (0.375 vs 0.375: a tie -> the lower position 1).
  const auto f = prune_step(in, opts(keep_policy::fixed(5)));
  CHECK(f.keep == seq_t{1});
  CHECK(f.recycled.clusters == clusters_t{{2}});
}

TEST_CASE("step: no raters keeps everything (not an error)") {
  // No text tokens: L = 3, visual 1-2 reaches the end. Raters come from embeds.
  const std::vector<float> e{1, 0, 0, 1, 1, 1};
  const std::vector<float> attn(9, 0.25f);
  const std::vector<float> hidden{1, 2, 3, 4, 5, 6};
  inputs_f in;
  in.embeds = matrix_view<const float>(e.data(), {3, 2});
  in.attn = tensor3_view<const float>(attn.data(), {1, 3, 3});
  in.hidden = matrix_view<const float>(hidden.data(), {3, 2});
  in.visual = {1, 2};
  for (const auto& o : {opts(keep_policy::rank(13.5, 0)), opts(keep_policy::fixed(0))}) {
    const auto r = prune_step(in, o);
    CHECK(r.raters.empty());
    CHECK(r.rank == 0);
    CHECK(r.keep_count == 2);
    CHECK(r.keep == seq_t{1, 2});
    CHECK(r.recycled.clusters.empty());
    CHECK(r.sequence == seq_t{0, 1, 2});
    CHECK(r.scores == std::vector<float>{0.0f, 0.0f});
  }
  // Text present but every m[t] equal (identical text rows): also no raters.
  const std::vector<float> e2{1, 0, 0, 1, 3, 3, 3, 3};
  const std::vector<float> attn2(16, 0.25f);
  const std::vector<float> hidden2(8, 0.5f);
  in.embeds = matrix_view<const float>(e2.data(), {4, 2});
  in.attn = tensor3_view<const float>(attn2.data(), {1, 4, 4});
  in.hidden = matrix_view<const float>(hidden2.data(), {4, 2});
  in.visual = {0, 2};
  const auto r = prune_step(in, opts(keep_policy::fixed(0)));
  CHECK(r.raters.empty());
  CHECK(r.keep == seq_t{0, 1});
  CHECK(r.sequence == seq_t{0, 1, 2, 3});
  // Caller-given empty raters mean the same.
  const seq_t none;
  in.raters = std::span<const index_t>(none);
  CHECK(prune_step(in, opts(keep_policy::fixed(0))).keep == seq_t{0, 1});
}

TEST_CASE("step: N = 1") {
  // L = 3: prefix 0, visual 1, text 2 (rater). Zero attention: P = [0], rank 0,
  // keep = max(0, min(floor(0 * 13.5 + 5), 0)) = 0; the token is recycled alone.
  std::vector<float> attn(9, 0.0f);
  const std::vector<float> hidden{1, 1, 7, 8, 2, 2};
  const seq_t raters{2};
  inputs_f in;
  in.attn = tensor3_view<const float>(attn.data(), {1, 3, 3});
  in.hidden = matrix_view<const float>(hidden.data(), {3, 2});
  in.visual = {1, 1};
  in.raters = std::span<const index_t>(raters);
  auto r = prune_step(in, opts(keep_policy::rank(13.5, 5)));
  CHECK(r.rank == 0);
  CHECK(r.keep_count == 0);
  CHECK(r.recycled.clusters == clusters_t{{1}});
  CHECK(r.recycled.merged == std::vector<float>{7, 8});
  CHECK(r.sequence == seq_t{0, -1, 2});
  // Non-zero attention: rank 1 == N keeps it.
  attn[2 * 3 + 1] = 0.5f;
  r = prune_step(in, opts(keep_policy::rank(13.5, 5)));
  CHECK(r.rank == 1);
  CHECK(r.keep_count == 1);
  CHECK(r.sequence == seq_t{0, 1, 2});
  // A fixed policy keeps min(k, 0) = 0.
  CHECK(prune_step(in, opts(keep_policy::fixed(4))).keep_count == 0);
}

TEST_CASE("step: malformed input") {
  example_a ex;
  const auto o = opts(keep_policy::rank(2, 0));
  inputs_f in = ex.inputs();
  {
    auto b = in;
    b.attn = tensor3_view<const float>(ex.attn.data(), {2, 7, 6});
    SV_CHECK_THROWS(errc::shape_mismatch, "attn.extent[2]", prune_step(b, o));
    b.attn = tensor3_view<const float>(nullptr, {0, 7, 7});
    SV_CHECK_THROWS(errc::shape_mismatch, "attn.extent[0]", prune_step(b, o));
  }
  {
    auto b = in;
    b.hidden = matrix_view<const float>(ex.hidden.data(), {6, 2});
    SV_CHECK_THROWS(errc::shape_mismatch, "hidden.extent[0]", prune_step(b, o));
    b.hidden = matrix_view<const float>(nullptr, {7, 0});
    SV_CHECK_THROWS(errc::shape_mismatch, "hidden.extent[1]", prune_step(b, o));
  }
  {
    auto b = in;
    b.visual = {5, 4};
    SV_CHECK_THROWS(errc::shape_mismatch, "visual", prune_step(b, o));
    b.visual = {1, 0};
    SV_CHECK_THROWS(errc::shape_mismatch, "visual.len", prune_step(b, o));
    b.visual = {-1, 3};
    SV_CHECK_THROWS(errc::shape_mismatch, "visual.start", prune_step(b, o));
  }
  {
    auto b = in;
    const seq_t down{6, 5}, vis{3}, past{7};
    b.raters = std::span<const index_t>(down);
    SV_CHECK_THROWS(errc::invalid_argument, "raters[1]", prune_step(b, o));
    b.raters = std::span<const index_t>(vis);
    SV_CHECK_THROWS(errc::invalid_argument, "raters[0]", prune_step(b, o));
    b.raters = std::span<const index_t>(past);
    SV_CHECK_THROWS(errc::invalid_argument, "raters[0]", prune_step(b, o));
    // Without caller raters, embeds must have L rows.
    b.raters.reset();
    b.embeds = matrix_view<const float>(ex.hidden.data(), {6, 2});
    SV_CHECK_THROWS(errc::shape_mismatch, "embeds.extent[0]", prune_step(b, o));
  }
  SV_CHECK_THROWS(errc::invalid_argument, "policy.scale",
                  prune_step(in, opts(keep_policy::rank(svt::kNaN, 0))));
  SV_CHECK_THROWS(errc::invalid_argument, "policy.keep", prune_step(in, opts(keep_policy::fixed(-1))));
  SV_CHECK_THROWS(errc::invalid_argument, "recycle.fraction",
                  prune_step(in, opts(keep_policy::rank(2, 0), true, 0.0)));
  SV_CHECK_THROWS(errc::invalid_argument, "recycle.fraction",
                  prune_step(in, opts(keep_policy::rank(2, 0), true, 1.5)));
  SV_CHECK_THROWS(errc::invalid_argument, "recycle.cluster_divisor",
                  prune_step(in, opts(keep_policy::rank(2, 0), true, 0.3, 1.0)));
  // NaN / Inf in a rater row of the visual columns.
  ex.at(1, 5, 2) = svt::kNaNf;
  SV_CHECK_THROWS(errc::non_finite, "attn[1, 5, 2]", prune_step(in, o));
  ex.at(1, 5, 2) = 0;
  ex.at(0, 6, 4) = -svt::kInff;
  SV_CHECK_THROWS(errc::non_finite, "attn[0, 6, 4]", prune_step(in, o));
  ex.at(0, 6, 4) = 0.0625f;
  // NaN / Inf in hidden rows the step does not read (prefix, text) change
  // nothing: only the recycled rows are read, and those are checked
  // (test_recycle.cpp; io::run_case checks a dumped case whole).
  const step_result before = prune_step(in, o);
  ex.hidden[1] = svt::kNaNf;  // hidden[0, 1], the prefix
  ex.hidden[12] = svt::kInff;  // hidden[6, 0], the text
  const step_result after = prune_step(in, o);
  CHECK(after.keep == before.keep);
  CHECK(after.recycled.clusters == before.recycled.clusters);
  CHECK(after.recycled.merged == before.recycled.merged);
  ex.hidden[1] = 0;
  ex.hidden[12] = 6;
  CHECK(prune_step(in, o).keep == seq_t{1, 2});  // restored: fine again
}

namespace {

struct random_case {
  index_t S, N, T, H, L, d, de;
  std::vector<float> embeds, attn, hidden;
  step_options opt;
};

random_case make_random(std::mt19937& g, bool grid) {
  random_case c;
  c.S = svt::rand_int(g, 0, 3);
  c.N = svt::rand_int(g, 1, 12);
  c.T = svt::rand_int(g, 0, 6);
  c.H = svt::rand_int(g, 1, 3);
  c.d = svt::rand_int(g, 1, 5);
  c.de = svt::rand_int(g, 1, 5);
  c.L = c.S + c.N + c.T;
  const auto n = [](index_t a, index_t b) { return static_cast<std::size_t>(a * b); };
  if (grid) {  // exactly representable in float16 and bfloat16
    c.embeds = svt::random_grid(g, n(c.L, c.de), -64, 64, 32.0f);
    c.attn = svt::random_grid(g, n(c.H * c.L, c.L), 0, 127, 128.0f);
    c.hidden = svt::random_grid(g, n(c.L, c.d), -64, 64, 16.0f);
  } else {
    c.embeds = svt::random_floats(g, n(c.L, c.de), -1.5f, 1.5f);
    c.attn = svt::random_floats(g, n(c.H * c.L, c.L), 0.0f, 1.0f);
    c.hidden = svt::random_floats(g, n(c.L, c.d), -2.0f, 2.0f);
  }
  // Some visual tokens duplicate another's hidden row: distance-0 pairs.
  for (index_t j = 1; j < c.N; ++j)
    if (svt::rand_int(g, 0, 4) == 0) {
      const index_t src = c.S + svt::rand_int(g, 0, j - 1);
      std::copy_n(c.hidden.begin() + src * c.d, c.d, c.hidden.begin() + (c.S + j) * c.d);
    }
  if (svt::rand_int(g, 0, 2) == 0) {
    c.opt.policy = keep_policy::fixed(svt::rand_int(g, 0, c.N + 1));
  } else {
    c.opt.policy = keep_policy::rank(std::uniform_real_distribution<double>(0.0, 4.0)(g),
                                     std::uniform_real_distribution<double>(-2.0, 3.0)(g));
  }
  c.opt.recycle.enabled = svt::rand_int(g, 0, 3) != 0;
  c.opt.recycle.fraction = std::uniform_real_distribution<double>(0.05, 1.0)(g);
  c.opt.recycle.cluster_divisor = std::uniform_real_distribution<double>(1.2, 6.0)(g);
  return c;
}

template <class T>
step_result run_as(const random_case& c, sparsevlm::workspace* ws = nullptr) {
  const auto e = svt::convert<T>(c.embeds);
  const auto a = svt::convert<T>(c.attn);
  const auto h = svt::convert<T>(c.hidden);
  step_inputs<T, T, T> in;
  in.embeds = matrix_view<const T>(e.data(), {c.L, c.de});
  in.attn = tensor3_view<const T>(a.data(), {c.H, c.L, c.L});
  in.hidden = matrix_view<const T>(h.data(), {c.L, c.d});
  in.visual = {c.S, c.N};
  return ws ? prune_step(in, c.opt, *ws) : prune_step(in, c.opt);
}

/// Checks every spec invariant of `r`; returns the number of clusters.
index_t check_invariants(const random_case& c, const step_result& r) {
  const index_t S = c.S, N = c.N, L = c.L;
  // Raters: ascending text positions, and those the naive reference decides
  // clearly (far from the mean) agree.
  for (std::size_t i = 0; i < r.raters.size(); ++i) {
    CHECK(r.raters[i] >= S + N);
    CHECK(r.raters[i] < L);
    if (i > 0) CHECK(r.raters[i] > r.raters[i - 1]);
  }
  if (c.T > 0) {
    const std::vector<double> ed(c.embeds.begin(), c.embeds.end());
    const auto m = svt::ref_rater_means(ed, c.de, L, S, N);
    double mean = 0.0;
    for (double v : m) mean += v;
    mean /= static_cast<double>(c.T);
    for (index_t t = 0; t < c.T; ++t) {
      const double mt = m[static_cast<std::size_t>(t)];
      if (std::fabs(mt - mean) < 1e-5) continue;
      const bool listed = std::find(r.raters.begin(), r.raters.end(), S + N + t) != r.raters.end();
      CHECK(listed == (mt > mean));
    }
  } else {
    CHECK(r.raters.empty());
  }
  const index_t R = static_cast<index_t>(r.raters.size());
  // Scores against the double reference.
  const std::vector<double> ad(c.attn.begin(), c.attn.end());
  const auto want_scores = svt::ref_scores(ad, c.H, L, r.raters, S, N);
  REQUIRE(r.scores.size() == static_cast<std::size_t>(N));
  for (index_t j = 0; j < N; ++j)
    CHECK(r.scores[static_cast<std::size_t>(j)] ==
          doctest::Approx(want_scores[static_cast<std::size_t>(j)]).epsilon(1e-5));
  // Rank against JacobiSVD of P (double), unless a singular value is near the tolerance.
  CHECK(r.rank >= 0);
  CHECK(r.rank <= std::min(R, N));
  if (R > 0) {
    Eigen::MatrixXd P(R, N);
    for (index_t q = 0; q < R; ++q)
      for (index_t j = 0; j < N; ++j) {
        double acc = 0.0;
        for (index_t h = 0; h < c.H; ++h)
          acc += ad[static_cast<std::size_t>((h * L + r.raters[static_cast<std::size_t>(q)]) * L + S + j)];
        P(q, j) = acc / static_cast<double>(c.H);
      }
    Eigen::JacobiSVD<Eigen::MatrixXd> svd(P);
    const auto& sv = svd.singularValues();
    if (sv(0) > 0) {
      const double thr = sv(0) * static_cast<double>(std::max(R, N)) * std::ldexp(1.0, -23);
      index_t want = 0;
      bool near = false;
      for (Eigen::Index i = 0; i < sv.size(); ++i) {
        if (sv(i) > thr) ++want;
        near = near || std::fabs(sv(i) / thr - 1.0) < 0.01;
      }
      if (!near) CHECK(r.rank == want);
    } else {
      CHECK(r.rank == 0);
    }
  }
  // Keep count.
  CHECK(r.keep_count >= 0);
  CHECK(r.keep_count <= N);
  CHECK(r.keep_count == spec_keep_count(c.opt.policy, r.rank, N, R));
  // Keep set: sorted, unique, inside the span, the top keep_count by (score, position).
  const auto order = svt::ranked(r.scores);
  seq_t want_keep(order.begin(), order.begin() + r.keep_count);
  for (index_t& k : want_keep) k += S;
  std::sort(want_keep.begin(), want_keep.end());
  CHECK(r.keep == want_keep);
  CHECK(std::adjacent_find(r.keep.begin(), r.keep.end()) == r.keep.end());
  for (index_t k : r.keep) CHECK((k >= S && k < S + N));
  // Recycling.
  const index_t n = N - r.keep_count;
  index_t nclusters = 0;
  if (c.opt.recycle.enabled && n > 0) {
    const index_t s = std::min<index_t>(
        n, static_cast<index_t>(std::floor(c.opt.recycle.fraction * static_cast<double>(n))) + 1);
    nclusters = std::min<index_t>(
        s, static_cast<index_t>(std::floor(static_cast<double>(s) / c.opt.recycle.cluster_divisor)) + 1);
    REQUIRE(r.recycled.clusters.size() == static_cast<std::size_t>(nclusters));
    // The s selected: the best-ranked pruned tokens.
    const seq_t selected(order.begin() + r.keep_count, order.begin() + r.keep_count + s);
    seq_t want_all;
    for (index_t v : selected) want_all.push_back(S + v);
    std::sort(want_all.begin(), want_all.end());
    seq_t all;
    for (const auto& cl : r.recycled.clusters) {
      CHECK_FALSE(cl.empty());
      CHECK(std::is_sorted(cl.begin(), cl.end()));
      all.insert(all.end(), cl.begin(), cl.end());
    }
    std::sort(all.begin(), all.end());
    CHECK(all == want_all);  // disjoint, and the union is the s selected
    for (index_t p : all) CHECK_FALSE(std::binary_search(r.keep.begin(), r.keep.end(), p));
    // Merged rows are the members' means.
    REQUIRE(r.recycled.merged.size() == static_cast<std::size_t>(nclusters * c.d));
    for (index_t q = 0; q < nclusters; ++q)
      for (index_t col = 0; col < c.d; ++col) {
        const auto& cl = r.recycled.clusters[static_cast<std::size_t>(q)];
        double acc = 0.0;
        for (index_t p : cl) acc += c.hidden[static_cast<std::size_t>(p * c.d + col)];
        CHECK(r.recycled.merged[static_cast<std::size_t>(q * c.d + col)] ==
              doctest::Approx(acc / static_cast<double>(cl.size())).epsilon(1e-6));
      }
    // The naive DPC-KNN on the selected rows, in ranked order.
    std::vector<double> x;
    for (index_t v : selected)
      for (index_t col = 0; col < c.d; ++col) x.push_back(c.hidden[static_cast<std::size_t>((S + v) * c.d + col)]);
    auto ref = svt::ref_dpc_knn(x, s, c.d, nclusters);
    for (auto& cl : ref) {
      for (index_t& i : cl) i = S + selected[static_cast<std::size_t>(i)];
      std::sort(cl.begin(), cl.end());
    }
    CHECK(r.recycled.clusters == ref);
  } else {
    CHECK(r.recycled.clusters.empty());
    CHECK(r.recycled.merged.empty());
  }
  // Sequence: prefix, keep, -1..-c, text; L - N + keep + c entries.
  seq_t want_seq;
  for (index_t p = 0; p < S; ++p) want_seq.push_back(p);
  want_seq.insert(want_seq.end(), r.keep.begin(), r.keep.end());
  for (index_t i = 1; i <= nclusters; ++i) want_seq.push_back(-i);
  for (index_t p = S + N; p < L; ++p) want_seq.push_back(p);
  CHECK(r.sequence.size() == static_cast<std::size_t>(L - N + r.keep_count + nclusters));
  CHECK(r.sequence == want_seq);
  return nclusters;
}

bool same_decisions(const step_result& a, const step_result& b) {
  return a.raters == b.raters && a.scores == b.scores && a.rank == b.rank &&
         a.keep_count == b.keep_count && a.keep == b.keep &&
         a.recycled.clusters == b.recycled.clusters && a.recycled.merged == b.recycled.merged &&
         a.sequence == b.sequence;
}

}  // namespace

TEST_CASE("step: property test on random shapes") {
  std::mt19937 g(20241125);
  sparsevlm::workspace ws;  // one workspace across every shape
  int pruned = 0, multi_cluster = 0;
  for (int it = 0; it < 60; ++it) {
    const random_case c = make_random(g, false);
    INFO("it=", it, " S=", c.S, " N=", c.N, " T=", c.T, " H=", c.H, " d=", c.d);
    const step_result r = run_as<float>(c, &ws);
    if (check_invariants(c, r) >= 2) ++multi_cluster;
    if (r.keep_count < c.N) ++pruned;
    CHECK(same_decisions(r, run_as<float>(c)));  // a reused workspace changes nothing
  }
  // The configurations exercise pruning and multi-cluster recycling.
  CHECK(pruned >= 20);
  CHECK(multi_cluster >= 5);
}

TEST_CASE("step: float16 and bfloat16 views decide as float32 on exact values") {
  std::mt19937 g(777);
  for (int it = 0; it < 50; ++it) {
    const random_case c = make_random(g, true);
    INFO("it=", it, " S=", c.S, " N=", c.N, " T=", c.T, " H=", c.H, " d=", c.d);
    const step_result r32 = run_as<float>(c);
    check_invariants(c, r32);
    CHECK(same_decisions(r32, run_as<half>(c)));
    CHECK(same_decisions(r32, run_as<bfloat16>(c)));
  }
}

TEST_CASE("step: mixed element types in one step") {
  example_a ex;
  const auto h16 = svt::convert<half>(ex.hidden);
  const auto a16 = svt::convert<bfloat16>(ex.attn);
  step_inputs<float, bfloat16, half> in;
  in.attn = tensor3_view<const bfloat16>(a16.data(), {2, 7, 7});
  in.hidden = matrix_view<const half>(h16.data(), {7, 2});
  in.visual = {1, 4};
  in.raters = std::span<const index_t>(ex.raters);
  const auto r = prune_step(in, opts(keep_policy::rank(2, 0)));
  CHECK(r.scores == std::vector<float>{0.375f, 0.1875f, 0.09375f, 0.046875f});
  CHECK(r.keep == seq_t{1, 2});
  CHECK(r.recycled.merged == std::vector<float>{3.5f, -7.0f});
  CHECK(r.sequence == seq_t{0, 1, 2, -1, 5, 6});
}

TEST_CASE("step: a span whose end overflows int64 is refused with a message") {
  std::vector<float> a(2 * 4 * 4, 0.25f), h(4 * 2, 1.0f);
  sparsevlm::step_inputs<float, float, float> in;
  in.embeds = sparsevlm::matrix_view<const float>(h.data(), {4, 2});
  in.attn = sparsevlm::tensor3_view<const float>(a.data(), {2, 4, 4});
  in.hidden = sparsevlm::matrix_view<const float>(h.data(), {4, 2});
  in.visual = {1, std::numeric_limits<sparsevlm::index_t>::max()};
  SV_CHECK_THROWS(sparsevlm::errc::shape_mismatch, "visual", sparsevlm::prune_step(in, sparsevlm::step_options{}));
}

TEST_CASE("step: the per-stage hook sees every stage once, in order") {
  std::vector<float> a(2 * 6 * 6, 1.0f / 6.0f), e(6 * 2), h(6 * 2);
  for (std::size_t i = 0; i < e.size(); ++i) {
    e[i] = static_cast<float>(i % 5) / 4.0f;
    h[i] = static_cast<float>(i);
  }
  sparsevlm::step_inputs<float, float, float> in;
  in.embeds = sparsevlm::matrix_view<const float>(e.data(), {6, 2});
  in.attn = sparsevlm::tensor3_view<const float>(a.data(), {2, 6, 6});
  in.hidden = sparsevlm::matrix_view<const float>(h.data(), {6, 2});
  in.visual = {1, 3};
  std::vector<std::string> seen;
  sparsevlm::workspace ws;
  const auto with_hook = sparsevlm::prune_step(in, sparsevlm::step_options{}, ws,
                                               [&](const char* stage) { seen.emplace_back(stage); });
  CHECK(seen == std::vector<std::string>{"raters", "scores", "rank", "keep", "recycle", "plan"});
  // The hook observes; it does not change the decisions.
  const auto without = sparsevlm::prune_step(in, sparsevlm::step_options{}, ws);
  CHECK(with_hook.keep == without.keep);
  CHECK(with_hook.sequence == without.sequence);
}
