// Tensor-parallel scoring: partial head sums per rank, the step from their total.
#include <algorithm>
#include <barrier>
#include <cmath>
#include <filesystem>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <sparsevlm/io/case.hpp>

#include "test_util.hpp"

namespace io = sparsevlm::io;
using sparsevlm::bfloat16;
using sparsevlm::errc;
using sparsevlm::half;
using sparsevlm::head_sum_inputs;
using sparsevlm::index_t;
using sparsevlm::keep_policy;
using sparsevlm::matrix_view;
using sparsevlm::partial_relevance;
using sparsevlm::partial_relevance_qk;
using sparsevlm::prune_step;
using sparsevlm::prune_step_from_head_sums;
using sparsevlm::prune_step_from_head_sums_into;
using sparsevlm::qk_view;
using sparsevlm::step_inputs;
using sparsevlm::step_inputs_qk;
using sparsevlm::step_options;
using sparsevlm::step_result;
using sparsevlm::tensor3_view;
using sparsevlm::visual_span;
using sparsevlm::workspace;

namespace {

using seq_t = std::vector<index_t>;

/// Rank k's heads of H over `world` ranks: a contiguous block, block sizes
/// differing by at most one (world need not divide H).
std::pair<index_t, index_t> head_block(index_t H, index_t world, index_t k) {
  return {H * k / world, H * (k + 1) / world};
}

/// The all-reduce: the ranks' partial sums added rank by rank in float32.
std::vector<float> all_reduce(const std::vector<std::vector<float>>& parts) {
  std::vector<float> total = parts.front();
  for (std::size_t k = 1; k < parts.size(); ++k)
    for (std::size_t i = 0; i < total.size(); ++i) total[i] += parts[k][i];
  return total;
}

/// One step as `world` ranks run it: partial_relevance on each rank's heads,
/// the all-reduce, then prune_step_from_head_sums.
template <class TA, class TH>
step_result tp_step(tensor3_view<const TA> attn, matrix_view<const TH> hidden, visual_span vis,
                    const seq_t& raters, const step_options& o, index_t world, workspace& ws) {
  const index_t H = attn.extent(0), L = attn.extent(1);
  const index_t R = static_cast<index_t>(raters.size()), N = vis.len;
  std::vector<std::vector<float>> parts(static_cast<std::size_t>(world));
  for (index_t k = 0; k < world; ++k) {
    const auto [h0, h1] = head_block(H, world, k);
    auto& part = parts[static_cast<std::size_t>(k)];
    part.assign(static_cast<std::size_t>(R * N), -1.0f);
    partial_relevance(tensor3_view<const TA>(attn.data() + h0 * attn.stride(0), {h1 - h0, L, L},
                                             attn.strides(), "attn_local"),
                      raters, vis, matrix_view<float>(part.data(), {R, N}), ws);
  }
  const std::vector<float> total = all_reduce(parts);
  const head_sum_inputs<TH> in{matrix_view<const float>(total.data(), {R, N}), H, hidden, vis,
                               raters};
  return prune_step_from_head_sums(in, o, ws);
}

/// As tp_step from q/k: rank k holds query heads [h0, h0 + H/world) and the key
/// heads they read (one replicated key head when a group spans several ranks).
template <class TQ, class TK, class TH>
step_result tp_step_qk(const qk_view<TQ, TK>& qk, matrix_view<const TH> hidden, visual_span vis,
                       const seq_t& raters, const step_options& o, index_t world, workspace& ws) {
  const index_t H = qk.q.extent(0), Lq = qk.q.extent(1), dh = qk.q.extent(2);
  const index_t Hkv = qk.k.extent(0), L = qk.k.extent(1);
  const index_t group = H / Hkv, Hl = H / world;
  REQUIRE(H % world == 0);
  REQUIRE((Hl % group == 0 || group % Hl == 0));
  const index_t R = static_cast<index_t>(raters.size()), N = vis.len;
  std::vector<std::vector<float>> parts(static_cast<std::size_t>(world));
  for (index_t k = 0; k < world; ++k) {
    const index_t h0 = k * Hl, g0 = h0 / group, gl = std::max<index_t>(1, Hl / group);
    qk_view<TQ, TK> local{
        tensor3_view<const TQ>(&qk.q(h0, 0, 0), {Hl, Lq, dh}, qk.q.strides(), "q"),
        tensor3_view<const TK>(&qk.k(g0, 0, 0), {gl, L, dh}, qk.k.strides(), "k"), std::nullopt,
        qk.scale};
    if (qk.lse)
      local.lse = matrix_view<const float>(&(*qk.lse)(h0, 0), {Hl, Lq}, qk.lse->strides(), "lse");
    auto& part = parts[static_cast<std::size_t>(k)];
    part.assign(static_cast<std::size_t>(R * N), -1.0f);
    partial_relevance_qk(local, raters, vis, matrix_view<float>(part.data(), {R, N}), ws);
  }
  const std::vector<float> total = all_reduce(parts);
  const head_sum_inputs<TH> in{matrix_view<const float>(total.data(), {R, N}), H, hidden, vis,
                               raters};
  return prune_step_from_head_sums(in, o, ws);
}

/// Same decisions; scores within float32 reassociation; merged rows depend on
/// the clusters only, so they are bit-identical.
void check_same_decisions(const step_result& a, const step_result& b) {
  svt::check_same_decisions(a, b);
  REQUIRE(a.scores.size() == b.scores.size());
  for (std::size_t j = 0; j < a.scores.size(); ++j)
    CHECK(std::abs(a.scores[j] - b.scores[j]) <= 2e-6f * std::abs(a.scores[j]));
}

/// The raters every rank would use: the given ones, or select_raters on the
/// (replicated) embeddings.
template <class In>
seq_t raters_of(const In& in, workspace& ws) {
  if (in.raters) return seq_t(in.raters->begin(), in.raters->end());
  return sparsevlm::select_raters(in.embeds, in.visual, ws);
}

}  // namespace

TEST_CASE("tensor parallel: all heads on one rank sum exactly what relevance_scores sums") {
  // H = 5, L = 12, visual [2, 9), raters {9, 11}; attention with a column stride of 2
  // and P_part column-major: the same bits as the contiguous, row-major form.
  std::mt19937 g(11);
  const index_t H = 5, L = 12, R = 2, N = 7;
  const visual_span vis{2, N};
  const seq_t raters{9, 11};
  const std::vector<float> a = svt::random_floats(g, static_cast<std::size_t>(H * L * L), 0, 1);
  std::vector<float> wide(a.size() * 2, svt::kNaNf);
  for (std::size_t i = 0; i < a.size(); ++i) wide[2 * i] = a[i];
  const tensor3_view<const float> attn(a.data(), {H, L, L});
  const tensor3_view<const float> attn_wide(wide.data(), {H, L, L}, {2 * L * L, 2 * L, 2});

  std::vector<float> mean(static_cast<std::size_t>(R * N)), scores(static_cast<std::size_t>(N));
  sparsevlm::relevance_scores(attn, raters, vis, matrix_view<float>(mean.data(), {R, N}), scores);
  std::vector<float> sum(static_cast<std::size_t>(R * N)), sum_cm(sum.size());
  partial_relevance(attn, raters, vis, matrix_view<float>(sum.data(), {R, N}));
  partial_relevance(attn_wide, raters, vis, matrix_view<float>(sum_cm.data(), {R, N}, {1, R}));
  for (index_t r = 0; r < R; ++r)
    for (index_t j = 0; j < N; ++j) {
      const float s = sum[static_cast<std::size_t>(r * N + j)];
      CHECK(s / static_cast<float>(H) == mean[static_cast<std::size_t>(r * N + j)]);
      CHECK(sum_cm[static_cast<std::size_t>(j * R + r)] == s);
    }
  // The float32 sum in head order, written out.
  for (index_t j = 0; j < N; ++j) {
    float s = 0.0f;
    for (index_t h = 0; h < H; ++h) s += a[static_cast<std::size_t>((h * L + 11) * L + 2 + j)];
    CHECK(sum[static_cast<std::size_t>(N + j)] == s);
  }
}

TEST_CASE("tensor parallel: the shared cases, world 1 bit-identical to prune_step, 2-4 and H the same decisions") {
  const std::vector<std::filesystem::path> cases = svt::shared_case_dirs();
  if (cases.empty()) return;
  workspace ws;
  int with_qk = 0;
  for (const auto& c : cases) {
    INFO("case ", c.filename().string());
    const io::case_data data = io::load_case(c);
    // visit_case instantiates both input forms; each visit uses only its own.
    io::visit_case(data, [&](const auto& in) {
      if constexpr (requires { in.attn; }) {
        const step_result ref = prune_step(in, data.options, ws);
        const seq_t raters = raters_of(in, ws);
        CHECK(raters == ref.raters);
        const index_t H = in.attn.extent(0);
        for (const index_t world : {index_t{1}, index_t{2}, index_t{3}, index_t{4}, H}) {
          INFO("world ", world);
          const step_result r =
              tp_step(in.attn, in.hidden, in.visual, raters, data.options, world, ws);
          if (world == 1) {
            svt::check_same_result(ref, r);
          } else {
            check_same_decisions(ref, r);
          }
        }
      }
      return 0;
    });
    if (!data.q || !data.k) continue;
    ++with_qk;
    io::visit_case(
        data,
        [&](const auto& in) {
          if constexpr (requires { in.qk; }) {
            const step_result ref = prune_step(in, data.options, ws);
            const seq_t raters = raters_of(in, ws);
            const index_t H = in.qk.q.extent(0);
            for (index_t world = 1; world <= H; world *= 2) {
              INFO("qk world ", world);
              const step_result r =
                  tp_step_qk(in.qk, in.hidden, in.visual, raters, data.options, world, ws);
              if (world == 1) {
                svt::check_same_result(ref, r);
              } else {
                check_same_decisions(ref, r);
              }
            }
          }
          return 0;
        },
        io::scores_source::qk);
  }
  CHECK(with_qk > 0);
}

namespace {

/// A random step with exact structure that reduction order cannot blur:
/// duplicated visual columns (exact score ties), a duplicated rater row (an
/// exactly rank-deficient P), duplicated hidden rows (exact DPC-KNN ties).
struct random_step {
  index_t S, N, T, L, H, de, d;
  std::vector<float> embeds, attn, hidden;
  std::vector<std::pair<index_t, index_t>> twin_columns;  // visual indices j0 < j1
  seq_t given_raters;  // empty: select_raters

  random_step(std::mt19937& g, int trial) {
    S = svt::rand_int(g, 0, 6);
    N = svt::rand_int(g, 8, 72);
    T = svt::rand_int(g, 3, 16);
    L = S + N + T;
    const index_t heads[] = {4, 6, 8, 12};
    H = heads[trial % 4];
    de = svt::rand_int(g, 2, 8);
    d = svt::rand_int(g, 3, 12);
    embeds = svt::random_floats(g, static_cast<std::size_t>(L * de), -1, 1);
    attn = svt::random_floats(g, static_cast<std::size_t>(H * L * L), 0, 1);
    hidden = svt::random_floats(g, static_cast<std::size_t>(L * d), -2, 2);
    // Three disjoint pairs (N >= 8), so that no copy undoes an earlier one.
    seq_t cols(static_cast<std::size_t>(N));
    for (index_t j = 0; j < N; ++j) cols[static_cast<std::size_t>(j)] = j;
    std::shuffle(cols.begin(), cols.end(), g);
    for (std::size_t t = 0; t < 3; ++t) {
      const index_t j0 = std::min(cols[2 * t], cols[2 * t + 1]);
      const index_t j1 = std::max(cols[2 * t], cols[2 * t + 1]);
      twin_columns.emplace_back(j0, j1);
      for (index_t h = 0; h < H; ++h)
        for (index_t q = 0; q < L; ++q) at(h, q, S + j1) = at(h, q, S + j0);
      for (index_t c = 0; c < d; ++c)
        hidden[static_cast<std::size_t>((S + j1) * d + c)] =
            hidden[static_cast<std::size_t>((S + j0) * d + c)];
    }
    const index_t t0 = S + N + svt::rand_int(g, 0, T - 2), t1 = svt::rand_int(g, t0 + 1, L - 1);
    for (index_t h = 0; h < H; ++h)
      for (index_t k = 0; k < L; ++k) at(h, t1, k) = at(h, t0, k);
    if (trial % 2 == 1) {
      for (index_t t = S + N; t < L; ++t)
        if (t == t0 || t == t1 || svt::rand_int(g, 0, 2) == 0) given_raters.push_back(t);
    }
  }
  float& at(index_t h, index_t q, index_t k) {
    return attn[static_cast<std::size_t>((h * L + q) * L + k)];
  }
  step_options options(std::mt19937& g, int trial) const {
    step_options o;
    if (trial % 3 == 0) {
      o.policy = keep_policy::fixed(svt::rand_int(g, 0, N));
    } else {
      o.policy = keep_policy::rank(std::uniform_real_distribution<double>(0.3, 3.0)(g),
                                   static_cast<double>(svt::rand_int(g, -2, 2)));
    }
    o.recycle.enabled = trial % 5 != 4;
    o.recycle.fraction = std::uniform_real_distribution<double>(0.1, 1.0)(g);
    o.recycle.cluster_divisor = std::uniform_real_distribution<double>(1.5, 6.0)(g);
    return o;
  }
};

template <class T>
void random_trials(unsigned seed, int trials) {
  std::mt19937 g(seed);
  workspace ws;
  for (int trial = 0; trial < trials; ++trial) {
    INFO("trial ", trial);
    const random_step st(g, trial);
    const step_options o = st.options(g, trial);
    const std::vector<T> e = svt::convert<T>(st.embeds), a = svt::convert<T>(st.attn),
                         h = svt::convert<T>(st.hidden);
    step_inputs<T, T, T> in{matrix_view<const T>(e.data(), {st.L, st.de}, "embeds"),
                            tensor3_view<const T>(a.data(), {st.H, st.L, st.L}, "attn"),
                            matrix_view<const T>(h.data(), {st.L, st.d}, "hidden"),
                            visual_span{st.S, st.N}, std::nullopt};
    if (!st.given_raters.empty()) in.raters = std::span<const index_t>(st.given_raters);
    const step_result ref = prune_step(in, o, ws);
    const seq_t raters = raters_of(in, ws);
    for (const index_t world : {index_t{1}, index_t{2}, index_t{3}, index_t{4}, st.H}) {
      INFO("world ", world);
      const step_result r = tp_step(in.attn, in.hidden, in.visual, raters, o, world, ws);
      if (world == 1) {
        svt::check_same_result(ref, r);
      } else {
        check_same_decisions(ref, r);
      }
      for (const auto& [j0, j1] : st.twin_columns)
        CHECK(svt::same_bits(std::vector<float>{r.scores[static_cast<std::size_t>(j0)]},
                             std::vector<float>{r.scores[static_cast<std::size_t>(j1)]}));
    }
  }
}

}  // namespace

TEST_CASE("tensor parallel: random steps, world 1 bit-identical, 2, 3, 4 and H the same decisions") {
  SUBCASE("float32") { random_trials<float>(101, 40); }
  SUBCASE("float16") { random_trials<half>(202, 40); }
  SUBCASE("bfloat16") { random_trials<bfloat16>(303, 40); }
}

TEST_CASE("tensor parallel: random q/k steps with GQA and LSE, world 1 bit-identical, 2-8 the same decisions") {
  std::mt19937 g(404);
  workspace ws;
  for (int trial = 0; trial < 24; ++trial) {
    INFO("trial ", trial);
    const index_t H = 8, Hkv = index_t{1} << (trial % 4), dh = svt::rand_int(g, 4, 12);
    const index_t S = svt::rand_int(g, 0, 4), N = svt::rand_int(g, 8, 40), T = svt::rand_int(g, 3, 10);
    const index_t L = S + N + T, d = svt::rand_int(g, 3, 8);
    seq_t raters;
    for (index_t t = S + N; t < L; ++t)
      if (raters.empty() || svt::rand_int(g, 0, 1) == 0) raters.push_back(t);
    const index_t R = static_cast<index_t>(raters.size());
    const bool rater_rows = trial % 3 == 1, with_lse = trial % 2 == 0;
    const index_t Lq = rater_rows ? R : L;
    const std::vector<half> q = svt::convert<half>(svt::random_floats(g, static_cast<std::size_t>(H * Lq * dh), -2, 2));
    const std::vector<float> k = svt::random_floats(g, static_cast<std::size_t>(Hkv * L * dh), -2, 2);
    const std::vector<float> hidden = svt::random_floats(g, static_cast<std::size_t>(L * d), -1, 1);
    // The LSE in double from the same values (any finite LSE is valid input; this
    // one makes the rows nearly sum to one).
    std::vector<float> lse(static_cast<std::size_t>(H * Lq), 0.0f);
    const double scale = 1.0 / std::sqrt(static_cast<double>(dh));
    for (index_t h = 0; h < H; ++h)
      for (index_t i = 0; i < Lq; ++i) {
        const index_t t = rater_rows ? raters[static_cast<std::size_t>(i)] : i;
        double sum = 0.0;
        for (index_t u = 0; u <= t; ++u) {
          double z = 0.0;
          for (index_t c = 0; c < dh; ++c)
            z += static_cast<double>(sparsevlm::to_float(q[static_cast<std::size_t>((h * Lq + i) * dh + c)])) *
                 static_cast<double>(k[static_cast<std::size_t>(((h / (H / Hkv)) * L + u) * dh + c)]);
          sum += std::exp(scale * z);
        }
        lse[static_cast<std::size_t>(h * Lq + i)] = static_cast<float>(std::log(sum));
      }
    qk_view<half, float> qk{tensor3_view<const half>(q.data(), {H, Lq, dh}, "q"),
                            tensor3_view<const float>(k.data(), {Hkv, L, dh}, "k"), std::nullopt, 0.0};
    if (with_lse) qk.lse = matrix_view<const float>(lse.data(), {H, Lq}, "lse");
    step_options o;
    o.policy = trial % 2 == 0 ? keep_policy::fixed(svt::rand_int(g, 0, N)) : keep_policy::rank(1.5, 0);
    const step_inputs_qk<float, half, float, float> in{
        matrix_view<const float>(), qk, matrix_view<const float>(hidden.data(), {L, d}, "hidden"),
        visual_span{S, N}, std::span<const index_t>(raters)};
    const step_result ref = prune_step(in, o, ws);
    for (index_t world = 1; world <= H; world *= 2) {
      INFO("world ", world);
      const step_result r = tp_step_qk(qk, in.hidden, in.visual, raters, o, world, ws);
      if (world == 1) {
        svt::check_same_result(ref, r);
      } else {
        check_same_decisions(ref, r);
      }
    }
  }
}

TEST_CASE("tensor parallel: partial_relevance refuses bad input and leaves P_part untouched") {
  // H = 3, L = 8, visual [1, 5), raters {6, 7}.
  const index_t H = 3, L = 8, R = 2, N = 4;
  const visual_span vis{1, N};
  const seq_t raters{6, 7};
  std::vector<float> a(static_cast<std::size_t>(H * L * L), 0.25f);
  std::vector<float> p(static_cast<std::size_t>(R * (N + 1)), 42.0f);
  const auto untouched = [&] {
    return std::all_of(p.begin(), p.end(), [](float v) { return v == 42.0f; });
  };
  const auto attn = [&](index_t heads, index_t cols) {
    return tensor3_view<const float>(a.data(), {heads, L, cols});
  };
  const matrix_view<float> P(p.data(), {R, N});
  workspace ws;
  SV_CHECK_THROWS(errc::shape_mismatch, "P_part: expected [2, 4], got [2, 5]",
                  partial_relevance(attn(H, L), raters, vis, matrix_view<float>(p.data(), {R, N + 1}), ws));
  SV_CHECK_THROWS(errc::shape_mismatch, "P_part: expected [2, 4], got [1, 4]",
                  partial_relevance(attn(H, L), raters, vis, matrix_view<float>(p.data(), {1, N}), ws));
  SV_CHECK_THROWS(errc::shape_mismatch, "attn_local.extent[0] (local heads): expected >= 1, got 0",
                  partial_relevance(attn(0, L), raters, vis, P, ws));
  SV_CHECK_THROWS(errc::shape_mismatch, "attn_local.extent[2]",
                  partial_relevance(attn(H, L - 1), raters, vis, P, ws));
  SV_CHECK_THROWS(errc::shape_mismatch, "visual",
                  partial_relevance(attn(H, L), raters, visual_span{5, 4}, P, ws));
  const seq_t in_visual{4, 7};
  SV_CHECK_THROWS(errc::invalid_argument, "raters[0]", partial_relevance(attn(H, L), in_visual, vis, P, ws));
  CHECK(untouched());

  // A NaN in local head 2, rater row 7, visual column 3 (position 4).
  a[static_cast<std::size_t>((2 * L + 7) * L + 4)] = svt::kNaNf;
  SV_CHECK_THROWS(errc::non_finite, "attn_local[2, 7, 4]: expected a finite value, got nan",
                  partial_relevance(attn(H, L), raters, vis, P, ws));
  CHECK(untouched());
  const std::vector<bfloat16> ab = svt::convert<bfloat16>(a);
  SV_CHECK_THROWS(errc::non_finite, "attn_local[2, 7, 4]",
                  partial_relevance(tensor3_view<const bfloat16>(ab.data(), {H, L, L}), raters, vis, P, ws));
  CHECK(untouched());
  // Finite values whose sum overflows.
  a[static_cast<std::size_t>((2 * L + 7) * L + 4)] = 3e38f;
  a[static_cast<std::size_t>((1 * L + 7) * L + 4)] = 3e38f;
  SV_CHECK_THROWS(errc::non_finite, "P_part[1, 3]", partial_relevance(attn(H, L), raters, vis, P, ws));
  CHECK(untouched());
}

TEST_CASE("tensor parallel: partial_relevance_qk names local heads and leaves P_part untouched") {
  // 4 local query heads over 2 local key heads, L = 7, visual [1, 4), raters {5, 6}.
  const index_t H = 4, Hkv = 2, L = 7, dh = 3, R = 2, N = 3;
  const visual_span vis{1, N};
  const seq_t raters{5, 6};
  std::mt19937 g(5);
  std::vector<float> q = svt::random_floats(g, static_cast<std::size_t>(H * L * dh), -1, 1);
  std::vector<float> k = svt::random_floats(g, static_cast<std::size_t>(Hkv * L * dh), -1, 1);
  std::vector<float> p(static_cast<std::size_t>(R * N), 42.0f);
  const auto untouched = [&] {
    return std::all_of(p.begin(), p.end(), [](float v) { return v == 42.0f; });
  };
  const auto qk = [&](index_t kv) {
    return qk_view<float, float>{tensor3_view<const float>(q.data(), {H, L, dh}),
                                 tensor3_view<const float>(k.data(), {kv, L, dh}), std::nullopt, 0.0};
  };
  const matrix_view<float> P(p.data(), {R, N});
  workspace ws;
  SV_CHECK_THROWS(errc::shape_mismatch, "P_part",
                  partial_relevance_qk(qk(Hkv), raters, vis, matrix_view<float>(p.data(), {R, N - 1}), ws));
  SV_CHECK_THROWS(errc::shape_mismatch, "k.extent[0] (kv heads)",
                  partial_relevance_qk(qk(3), raters, vis, P, ws));
  q[static_cast<std::size_t>((3 * L + 6) * dh + 1)] = svt::kNaNf;
  SV_CHECK_THROWS(errc::non_finite, "q[3, 6, 1]", partial_relevance_qk(qk(Hkv), raters, vis, P, ws));
  CHECK(untouched());
  q[static_cast<std::size_t>((3 * L + 6) * dh + 1)] = 0.5f;
  k[static_cast<std::size_t>((1 * L + 2) * dh + 0)] = svt::kInff;
  SV_CHECK_THROWS(errc::non_finite, "k[1, 2, 0]", partial_relevance_qk(qk(Hkv), raters, vis, P, ws));
  CHECK(untouched());
  k[static_cast<std::size_t>((1 * L + 2) * dh + 0)] = 0.5f;
  // Finite, then the same sums as the one-process head sum.
  partial_relevance_qk(qk(Hkv), raters, vis, P, ws);
  std::vector<float> mean(p.size()), scores(static_cast<std::size_t>(N));
  sparsevlm::relevance_scores_qk(qk(Hkv), raters, vis, matrix_view<float>(mean.data(), {R, N}),
                                 scores, sparsevlm::score_options{}, ws);
  for (std::size_t i = 0; i < p.size(); ++i) CHECK(p[i] / static_cast<float>(H) == mean[i]);
}

TEST_CASE("tensor parallel: prune_step_from_head_sums refuses bad input and leaves the result untouched") {
  // L = 10, visual [1, 7), raters {7, 9}, H = 4, hidden d = 2.
  const index_t L = 10, R = 2, N = 6, d = 2;
  const visual_span vis{1, N};
  const seq_t raters{7, 9};
  std::mt19937 g(9);
  std::vector<float> psum = svt::random_floats(g, static_cast<std::size_t>(R * N), 0.5f, 3.5f);
  const std::vector<float> hidden = svt::random_floats(g, static_cast<std::size_t>(L * d), -1, 1);
  const matrix_view<const float> hv(hidden.data(), {L, d});
  const auto inputs = [&](index_t rows, index_t cols, index_t heads) {
    return head_sum_inputs<float>{matrix_view<const float>(psum.data(), {rows, cols}), heads, hv, vis,
                                  raters};
  };
  step_options o;
  o.policy = keep_policy::fixed(3);
  workspace ws;
  step_result out;
  prune_step_from_head_sums_into(inputs(R, N, 4), o, ws, out);
  CHECK(out.keep_count == 3);
  CHECK(out.raters == raters);
  const step_result before = out;

  SV_CHECK_THROWS(errc::shape_mismatch, "P_sum: expected [2, 6], got [2, 5]",
                  prune_step_from_head_sums_into(inputs(R, N - 1, 4), o, ws, out));
  SV_CHECK_THROWS(errc::shape_mismatch, "P_sum: expected [2, 6], got [1, 6]",
                  prune_step_from_head_sums_into(inputs(1, N, 4), o, ws, out));
  SV_CHECK_THROWS(errc::invalid_argument, "heads: expected >= 1",
                  prune_step_from_head_sums_into(inputs(R, N, 0), o, ws, out));
  SV_CHECK_THROWS(errc::invalid_argument, "heads: expected >= 1",
                  prune_step_from_head_sums_into(inputs(R, N, -3), o, ws, out));
  step_options top = o;
  top.scoring.top_heads = 2;
  SV_CHECK_THROWS(errc::invalid_argument, "scoring.top_heads: expected 0",
                  prune_step_from_head_sums_into(inputs(R, N, 4), top, ws, out));
  step_options grav = o;
  grav.scoring.gravity.enabled = true;
  grav.scoring.gravity.head_dim = 8;
  SV_CHECK_THROWS(errc::invalid_argument, "scoring.gravity.enabled: expected false",
                  prune_step_from_head_sums_into(inputs(R, N, 4), grav, ws, out));
  step_options neg = o;
  neg.policy = keep_policy::fixed(-1);
  SV_CHECK_THROWS(errc::invalid_argument, "policy.keep",
                  prune_step_from_head_sums_into(inputs(R, N, 4), neg, ws, out));
  const seq_t bad_raters{9, 7};
  SV_CHECK_THROWS(errc::invalid_argument, "raters[1]",
                  prune_step_from_head_sums_into(
                      head_sum_inputs<float>{matrix_view<const float>(psum.data(), {R, N}), 4, hv, vis,
                                             bad_raters},
                      o, ws, out));
  SV_CHECK_THROWS(errc::shape_mismatch, "visual",
                  prune_step_from_head_sums_into(
                      head_sum_inputs<float>{matrix_view<const float>(psum.data(), {R, N}), 4, hv,
                                             visual_span{5, N}, raters},
                      o, ws, out));
  psum[static_cast<std::size_t>(1 * N + 2)] = svt::kNaNf;
  SV_CHECK_THROWS(errc::non_finite, "P_sum[1, 2]: expected a finite value, got nan",
                  prune_step_from_head_sums_into(inputs(R, N, 4), o, ws, out));
  psum[static_cast<std::size_t>(1 * N + 2)] = 3e38f;
  psum[static_cast<std::size_t>(0 * N + 2)] = 3e38f;
  SV_CHECK_THROWS(errc::non_finite, "scores[2]",
                  prune_step_from_head_sums_into(inputs(R, N, 1), o, ws, out));
  svt::check_same_result(before, out);
}

namespace {

/// One rank's step: the code of docs/tensor-parallel.md's example. `embeds` and
/// `hidden` are replicated, `attn_local` holds this rank's heads, and
/// `all_reduce_sum(data, count)` is the engine's collective.
template <class AllReduce>
step_result prune_on_rank(matrix_view<const half> embeds, tensor3_view<const half> attn_local,
                          matrix_view<const half> hidden, visual_span visual, index_t H,
                          const step_options& opt, workspace& ws, AllReduce&& all_reduce_sum) {
  using namespace sparsevlm;
  // --- begin docs example ---
  // Every rank chooses the same raters from the replicated embeddings.
  const std::vector<index_t> raters = select_raters(embeds, visual, ws);
  const index_t R = static_cast<index_t>(raters.size()), N = visual.len;
  std::vector<float> P(static_cast<std::size_t>(R * N));
  partial_relevance(attn_local, raters, visual, matrix_view<float>(P.data(), {R, N}), ws);
  all_reduce_sum(P.data(), P.size());  // Σ over the ranks, float32: the head sums of all H heads
  return prune_step_from_head_sums(
      head_sum_inputs<half>{matrix_view<const float>(P.data(), {R, N}), H, hidden, visual, raters},
      opt, ws);
  // --- end docs example ---
}

}  // namespace

TEST_CASE("tensor parallel: the docs/tensor-parallel.md example on four threads as ranks") {
  // H = 8 heads over world = 4 ranks (threads), float16; the all-reduce adds the
  // ranks' partial sums in rank order on every rank.
  const index_t L = 60, S = 5, N = 40, H = 8, world = 4, de = 16, d = 16;
  const visual_span visual{S, N};
  std::mt19937 g(2026);
  const std::vector<half> embeds = svt::convert<half>(svt::random_floats(g, static_cast<std::size_t>(L * de), -1, 1));
  const std::vector<half> attn = svt::convert<half>(svt::random_floats(g, static_cast<std::size_t>(H * L * L), 0, 1));
  const std::vector<half> hidden = svt::convert<half>(svt::random_floats(g, static_cast<std::size_t>(L * d), -1, 1));
  const matrix_view<const half> ev(embeds.data(), {L, de}), hv(hidden.data(), {L, d});
  step_options opt;
  opt.policy = keep_policy::fixed(16);

  std::vector<std::vector<float>> slots(static_cast<std::size_t>(world));
  std::barrier sync(static_cast<std::ptrdiff_t>(world));
  std::vector<step_result> results(static_cast<std::size_t>(world));
  std::vector<std::string> errors(static_cast<std::size_t>(world));
  std::vector<std::thread> ranks;
  for (index_t k = 0; k < world; ++k)
    ranks.emplace_back([&, k] {
      const auto slot = static_cast<std::size_t>(k);
      const auto all_reduce_sum = [&](float* data, std::size_t count) {
        slots[slot].assign(data, data + count);
        sync.arrive_and_wait();
        std::copy(slots[0].begin(), slots[0].end(), data);
        for (std::size_t i = 1; i < slots.size(); ++i)
          for (std::size_t c = 0; c < count; ++c) data[c] += slots[i][c];
        sync.arrive_and_wait();
      };
      const index_t Hl = H / world;
      const tensor3_view<const half> attn_local(attn.data() + k * Hl * L * L, {Hl, L, L});
      workspace ws;
      try {
        results[slot] = prune_on_rank(ev, attn_local, hv, visual, H, opt, ws, all_reduce_sum);
      } catch (const std::exception& e) {
        errors[slot] = e.what();
      }
    });
  for (auto& t : ranks) t.join();
  for (const std::string& e : errors) CHECK(e.empty());
  const step_inputs<half, half, half> in{ev, tensor3_view<const half>(attn.data(), {H, L, L}), hv,
                                         visual, std::nullopt};
  const step_result ref = prune_step(in, opt);
  CHECK(ref.keep_count == 16);
  for (const step_result& r : results) {
    check_same_decisions(ref, r);
    svt::check_same_result(results.front(), r);  // every rank decides the same, bit for bit
  }
}
