// Google Benchmark: scores from Q/K (what a fused-attention engine has) against
// forming the full [H, L, L] causal softmax and its head mean, which is what the
// authors' code does at each pruning layer. Reports time and temporary bytes.
//
// Shapes: LLaVA-1.5-7B (H 32, dh 128, L 671 = 35 + 576 + 60, R 10, 30, 40 raters) and a
// long video prompt (16 × 576 visual tokens, L 9311), where the full matrix
// would need 32 · 9311² floats (11 GB): only our path runs there. The bandwidth
// counters (common.hpp) count the least both paths must read: q's rater rows and
// the keys up to the last rater.
#include <benchmark/benchmark.h>

#include <Eigen/Core>
#include <cmath>
#include <memory>
#include <random>
#include <vector>

#include <sparsevlm/sparsevlm.hpp>

#include "common.hpp"

namespace {

using namespace sparsevlm;

struct qk_case {
  index_t H = 32, Hkv = 32, dh = 128, prefix = 35, N = 576, text = 60;
  std::vector<float> q, k;
  std::vector<index_t> raters;
  index_t L() const { return prefix + N + text; }
  /// What either path must read at least: the rater rows of q and the keys up
  /// to the last rater (float32).
  double min_bytes() const {
    const double R = static_cast<double>(raters.size());
    return (static_cast<double>(H) * R + static_cast<double>(Hkv * (raters.back() + 1))) *
           static_cast<double>(dh) * sizeof(float);
  }
};

const qk_case& make_case(index_t n_visual, index_t n_raters = 30) {
  static std::vector<std::unique_ptr<qk_case>> cache;
  for (const auto& c : cache)
    if (c->N == n_visual && static_cast<index_t>(c->raters.size()) == n_raters) return *c;
  auto c = std::make_unique<qk_case>();
  c->N = n_visual;
  std::mt19937 rng(5);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  c->q.resize(static_cast<std::size_t>(c->H * c->L() * c->dh));
  c->k.resize(static_cast<std::size_t>(c->Hkv * c->L() * c->dh));
  for (float& v : c->q) v = normal(rng);
  for (float& v : c->k) v = normal(rng);
  // n_raters of the 60 text tokens, evenly spread.
  for (index_t i = 0; i < n_raters; ++i) c->raters.push_back(c->prefix + c->N + i * c->text / n_raters);
  cache.push_back(std::move(c));
  return *cache.back();
}

void BM_scores_from_qk(benchmark::State& state) {
  const qk_case& c = make_case(state.range(0), state.range(1));
  const index_t L = c.L(), R = static_cast<index_t>(c.raters.size());
  qk_view<float, float> qk{tensor3_view<const float>(c.q.data(), {c.H, L, c.dh}),
                           tensor3_view<const float>(c.k.data(), {c.Hkv, L, c.dh}), std::nullopt, 0.0};
  std::vector<float> p(static_cast<std::size_t>(R * c.N)), scores(static_cast<std::size_t>(c.N));
  workspace ws;
  for (auto _ : state) {
    relevance_scores_qk(qk, c.raters, visual_span{c.prefix, c.N}, matrix_view<float>(p.data(), {R, c.N}),
                        scores, score_options{}, ws);
    benchmark::DoNotOptimize(scores.data());
  }
  state.counters["L"] = static_cast<double>(L);
  state.counters["R"] = static_cast<double>(R);
  state.counters["temp_bytes"] = static_cast<double>(ws.bytes() + p.size() * sizeof(float));
  state.counters["full_matrix_bytes"] = static_cast<double>(c.H) * static_cast<double>(L) *
                                        static_cast<double>(L) * sizeof(float);
  bench::report_bandwidth(state, c.min_bytes());
  state.SetLabel(bench::isa_label());
}
BENCHMARK(BM_scores_from_qk)
    ->Args({576, 10})
    ->Args({576, 30})
    ->Args({576, 40})
    ->Args({16 * 576, 30})
    ->Unit(benchmark::kMillisecond);

// The authors' way: softmax(Q·Kᵀ·scale + causal mask) for every head and row,
// the head mean of the whole [L, L], then the rater rows' visual columns.
void BM_full_attention(benchmark::State& state) {
  const qk_case& c = make_case(state.range(0));
  const index_t L = c.L(), R = static_cast<index_t>(c.raters.size());
  using RowMat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  std::vector<float> attn(static_cast<std::size_t>(c.H * L * L)), mean(static_cast<std::size_t>(L * L));
  std::vector<float> scores(static_cast<std::size_t>(c.N));
  const float scale = 1.0f / std::sqrt(static_cast<float>(c.dh));
  for (auto _ : state) {
    for (index_t h = 0; h < c.H; ++h) {
      Eigen::Map<const RowMat> Q(c.q.data() + h * L * c.dh, L, c.dh);
      Eigen::Map<const RowMat> K(c.k.data() + h * L * c.dh, L, c.dh);
      Eigen::Map<RowMat> A(attn.data() + h * L * L, L, L);
      A.noalias() = (Q * K.transpose()) * scale;
      for (index_t t = 0; t < L; ++t) {
        float mx = A.row(t).head(t + 1).maxCoeff();
        float sum = 0.0f;
        for (index_t u = 0; u <= t; ++u) sum += (A(t, u) = std::exp(A(t, u) - mx));
        for (index_t u = 0; u <= t; ++u) A(t, u) /= sum;
        for (index_t u = t + 1; u < L; ++u) A(t, u) = 0.0f;
      }
    }
    Eigen::Map<RowMat> M(mean.data(), L, L);
    M.setZero();
    for (index_t h = 0; h < c.H; ++h) M += Eigen::Map<const RowMat>(attn.data() + h * L * L, L, L);
    M /= static_cast<float>(c.H);
    std::fill(scores.begin(), scores.end(), 0.0f);
    for (index_t t : c.raters)
      for (index_t j = 0; j < c.N; ++j) scores[static_cast<std::size_t>(j)] += M(t, c.prefix + j) / static_cast<float>(R);
    benchmark::DoNotOptimize(scores.data());
  }
  state.counters["L"] = static_cast<double>(L);
  state.counters["temp_bytes"] = static_cast<double>((attn.size() + mean.size()) * sizeof(float));
  bench::report_bandwidth(state, c.min_bytes());
  state.SetLabel("Eigen");
}
BENCHMARK(BM_full_attention)->Arg(576)->Unit(benchmark::kMillisecond);

}  // namespace
