// A synthetic LLaVA-shaped pruning step (shared by the demo and the benchmarks).
//
// The attention is built so that the text raters look at the image through a
// few shared "topics" (each head mixes the same 14 visual patterns), which is
// what makes P low-rank in real models and lets the rank policy cut; visual
// hidden states scatter around 24 centroids so recycling finds clusters.
#pragma once

#include <algorithm>
#include <random>
#include <vector>

#include <sparsevlm/view.hpp>

namespace sparsevlm::examples {

/// A synthetic LLaVA-1.5-7B-shaped step (defaults), row-major float32 buffers.
struct synthetic_step {
  index_t heads = 32, prefix = 35, n_visual = 576, n_text = 60, dim = 4096;
  [[nodiscard]] index_t length() const { return prefix + n_visual + n_text; }
  std::vector<float> embeds, attn, hidden;
};

/// Fills the buffers of `s` (whose shape fields the caller may set first)
/// deterministically from `seed`.
inline synthetic_step synthesise(unsigned seed, synthetic_step s = {}) {
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

}  // namespace sparsevlm::examples
