// The main demo: synthesises one LLaVA-1.5-7B-shaped pruning step in memory
// (32 heads, 35 prefix + 576 visual + 60 text tokens, hidden size 4096), prunes it
// with the authors' 192-token preset, and prints what was decided and how long
// each stage took. No files needed.
//
// The synthetic attention is built so that the text raters look at the image
// through a few shared "topics" (each head mixes the same 14 visual patterns),
// which is what makes P low-rank in real models and lets the rank policy cut.
#include <cstdio>
#include <random>
#include <thread>
#include <vector>

#include <sparsevlm/sparsevlm.hpp>

#include "stage_timer.hpp"

namespace {

using namespace sparsevlm;

struct synthetic_step {
  index_t heads = 32, prefix = 35, n_visual = 576, n_text = 60, dim = 4096;
  index_t length() const { return prefix + n_visual + n_text; }
  std::vector<float> embeds, attn, hidden;
};

synthetic_step synthesise(unsigned seed) {
  synthetic_step s;
  const index_t L = s.length(), H = s.heads, N = s.n_visual, S = s.prefix, d = s.dim;
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> uniform(0.0f, 1.0f);

  s.embeds.resize(static_cast<std::size_t>(L * d));
  for (float& v : s.embeds) v = 0.02f * normal(rng);

  // Visual hidden states scatter around 24 centroids, so recycling finds clusters.
  s.hidden.resize(static_cast<std::size_t>(L * d));
  std::vector<float> centroids(static_cast<std::size_t>(24 * d));
  for (float& v : centroids) v = normal(rng);
  for (index_t t = 0; t < L; ++t) {
    const bool visual = t >= S && t < S + N;
    const index_t c = static_cast<index_t>(rng() % 24);
    for (index_t k = 0; k < d; ++k)
      s.hidden[static_cast<std::size_t>(t * d + k)] =
          visual ? centroids[static_cast<std::size_t>(c * d + k)] + 0.3f * normal(rng) : normal(rng);
  }

  // 14 visual "topics": sparse non-negative patterns over the visual tokens.
  constexpr index_t topics = 14;
  std::vector<double> pattern(static_cast<std::size_t>(topics * N));
  for (index_t k = 0; k < topics; ++k) {
    double sum = 0.0;
    for (index_t j = 0; j < N; ++j) {
      const double u = uniform(rng);
      const double v = u * u * u * u;
      pattern[static_cast<std::size_t>(k * N + j)] = v;
      sum += v;
    }
    for (index_t j = 0; j < N; ++j) pattern[static_cast<std::size_t>(k * N + j)] /= sum;
  }
  // Rows: a causal distribution. Text rows put a share beta of their mass on a
  // mixture of topics (weights per head and row) and spread the rest uniformly.
  s.attn.assign(static_cast<std::size_t>(H * L * L), 0.0f);
  std::vector<double> row(static_cast<std::size_t>(L));
  for (index_t h = 0; h < H; ++h)
    for (index_t t = 0; t < L; ++t) {
      std::fill(row.begin(), row.end(), 0.0);
      const index_t keys = t + 1;
      if (t >= S + N) {
        const double beta = 0.3 + 0.4 * uniform(rng);
        std::vector<double> w(topics);
        double wsum = 0.0;
        for (double& x : w) wsum += (x = uniform(rng));
        for (index_t k = 0; k < topics; ++k)
          for (index_t j = 0; j < N; ++j)
            row[static_cast<std::size_t>(S + j)] +=
                beta * w[static_cast<std::size_t>(k)] / wsum * pattern[static_cast<std::size_t>(k * N + j)];
        const double rest = (1.0 - beta) / static_cast<double>(keys - N);
        for (index_t j = 0; j < keys; ++j)
          if (j < S || j >= S + N) row[static_cast<std::size_t>(j)] = rest;
      } else {
        for (index_t j = 0; j < keys; ++j) row[static_cast<std::size_t>(j)] = 1.0 / static_cast<double>(keys);
      }
      float* dst = &s.attn[static_cast<std::size_t>((h * L + t) * L)];
      for (index_t j = 0; j < keys; ++j) dst[j] = static_cast<float>(row[static_cast<std::size_t>(j)]);
    }
  return s;
}

}  // namespace

int main() {
  const synthetic_step s = synthesise(2410);
  const index_t L = s.length();
  step_inputs<float, float, float> in{
      matrix_view<const float>(s.embeds.data(), {L, s.dim}, "embeds"),
      tensor3_view<const float>(s.attn.data(), {s.heads, L, L}, "attn"),
      matrix_view<const float>(s.hidden.data(), {L, s.dim}, "hidden"),
      visual_span{s.prefix, s.n_visual},
      std::nullopt};
  step_options opt;
  opt.policy = keep_policy::rank(13.5, 0.0);  // the authors' 192-token preset
  opt.recycle = recycle_options{true, 0.3, 10.0};

  const step_result r = prune_step(in, opt);
  std::printf("sparsevlm %s demo: LLaVA-1.5-7B-shaped step, H=%lld L=%lld (prefix %lld, visual %lld, "
              "text %lld), d=%lld, policy rank 13.5/0, recycling 0.3/10\n",
              SPARSEVLM_VERSION_STRING, static_cast<long long>(s.heads), static_cast<long long>(L),
              static_cast<long long>(s.prefix), static_cast<long long>(s.n_visual),
              static_cast<long long>(s.n_text), static_cast<long long>(s.dim));
  std::printf("raters (%zu):", r.raters.size());
  for (index_t p : r.raters) std::printf(" %lld", static_cast<long long>(p));
  std::printf("\nrank of P: %lld\nkept visual tokens: %lld of %lld\n", static_cast<long long>(r.rank),
              static_cast<long long>(r.keep_count), static_cast<long long>(s.n_visual));
  std::printf("recycled clusters: %zu\n", r.recycled.clusters.size());
  for (std::size_t i = 0; i < r.recycled.clusters.size(); ++i) {
    std::printf("  cluster %zu (%zu tokens):", i, r.recycled.clusters[i].size());
    for (index_t p : r.recycled.clusters[i]) std::printf(" %lld", static_cast<long long>(p));
    std::printf("\n");
  }
  std::printf("new sequence length: %zu (was %lld)\n", r.sequence.size(), static_cast<long long>(L));

  const auto med = examples::time_stages(in, opt, 5);
  std::printf("median time over 5 runs, 1 thread (%u hardware threads):\n",
              std::thread::hardware_concurrency());
  for (const char* n : {"raters", "scores", "rank", "keep", "recycle", "plan", "total"})
    std::printf("  %-8s %9.3f ms\n", n, med.at(n));
  return 0;
}
