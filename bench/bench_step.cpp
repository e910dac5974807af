// Google Benchmark: one pruning step and its stages at LLaVA-1.5-7B shapes
// (H 32, L 671 = 35 + 576 + 60, d 4096), float32 and float16 attention.
// The CPU-speed issue extends this with more shapes and a bandwidth probe.
#include <benchmark/benchmark.h>

#include <random>
#include <vector>

#include <sparsevlm/sparsevlm.hpp>

#include "synthetic.hpp"

namespace {

using namespace sparsevlm;

const examples::synthetic_step& llava7b() {
  static const examples::synthetic_step s = examples::synthesise(2410);
  return s;
}

template <class TA>
const std::vector<TA>& attn_as() {
  static const std::vector<TA> a = [] {
    std::vector<TA> out;
    for (float v : llava7b().attn) out.push_back(from_float<TA>(v));
    return out;
  }();
  return a;
}

step_options preset192() {
  step_options o;
  o.policy = keep_policy::rank(13.5, 0.0);
  return o;
}

template <class TA>
step_inputs<float, TA, float> inputs() {
  const auto& s = llava7b();
  const index_t L = s.length();
  return {matrix_view<const float>(s.embeds.data(), {L, s.dim}),
          tensor3_view<const TA>(attn_as<TA>().data(), {s.heads, L, L}),
          matrix_view<const float>(s.hidden.data(), {L, s.dim}),
          visual_span{s.prefix, s.n_visual}, std::nullopt};
}

template <class TA>
void BM_step(benchmark::State& state) {
  const auto in = inputs<TA>();
  const step_options opt = preset192();
  workspace ws;
  for (auto _ : state) benchmark::DoNotOptimize(prune_step(in, opt, ws));
}
BENCHMARK(BM_step<float>)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_step<half>)->Unit(benchmark::kMillisecond);

template <class TA>
void BM_scores(benchmark::State& state) {
  const auto in = inputs<TA>();
  workspace ws;
  const auto raters = select_raters(in.embeds, in.visual, ws);
  const index_t R = static_cast<index_t>(raters.size()), N = in.visual.len;
  std::vector<float> p(static_cast<std::size_t>(R * N)), scores(static_cast<std::size_t>(N));
  for (auto _ : state) {
    relevance_scores(in.attn, raters, in.visual, matrix_view<float>(p.data(), {R, N}), scores,
                     score_options{}, ws);
    benchmark::DoNotOptimize(scores.data());
  }
  state.SetBytesProcessed(state.iterations() * in.attn.extent(0) * R * N *
                          static_cast<std::int64_t>(sizeof(TA)));
}
BENCHMARK(BM_scores<float>)->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_scores<half>)->Unit(benchmark::kMicrosecond);

void BM_raters(benchmark::State& state) {
  const auto in = inputs<float>();
  workspace ws;
  for (auto _ : state) benchmark::DoNotOptimize(select_raters(in.embeds, in.visual, ws));
}
BENCHMARK(BM_raters)->Unit(benchmark::kMillisecond);

void BM_recycle(benchmark::State& state) {
  const auto in = inputs<float>();
  const step_result r = prune_step(in, preset192());
  const index_t N = in.visual.len;
  std::vector<index_t> kept, order;
  workspace ws;
  const index_t s = core::recycle_count(N - r.keep_count, 0.3);
  select_keep(r.scores, in.visual.start, r.keep_count, s, kept, order, ws);
  recycle_result out;
  for (auto _ : state) {
    recycle(in.hidden, in.visual, std::span<const index_t>(order.data(), static_cast<std::size_t>(s)),
            core::cluster_count(s, 10.0), out, ws);
    benchmark::DoNotOptimize(out.merged.data());
  }
}
BENCHMARK(BM_recycle)->Unit(benchmark::kMillisecond);

// The rank at the reference size: R x N = 64 x 2880 (LLaVA-NeXT AnyRes),
// random non-negative P (full rank 64).
void BM_rank_64x2880(benchmark::State& state) {
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> u(0.0f, 1.0f);
  std::vector<float> p(64 * 2880);
  for (float& v : p) v = u(rng);
  workspace ws;
  index_t rank = 0;
  for (auto _ : state) benchmark::DoNotOptimize(rank = numerical_rank(matrix_view<const float>(p.data(), {64, 2880}), ws));
  state.counters["rank"] = static_cast<double>(rank);
}
BENCHMARK(BM_rank_64x2880)->Unit(benchmark::kMicrosecond);

}  // namespace

BENCHMARK_MAIN();
