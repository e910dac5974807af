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

/// The step of `shape`'s shape fields, generated deterministically from `seed`
/// and handed out one row at a time (so that a caller can store any element type,
/// or only some rows, without a float32 copy of the whole step):
///
/// - `embeds_row(t, const float* row)` and `hidden_row(t, row)`: d values, t in [0, L);
/// - `attn_row(h, t, const float* row)`: the first t + 1 columns of attention row
///   (h, t) (the causal prefix; the rest are zero), for the text rows t >= S + N
///   only unless `all_attn_rows`. The other rows are uniform over their prefix
///   and take no random draws, so the text rows are the same either way.
template <class EmbedsRow, class HiddenRow, class AttnRow>
void generate(unsigned seed, const synthetic_step& shape, bool all_attn_rows,
              EmbedsRow&& embeds_row, HiddenRow&& hidden_row, AttnRow&& attn_row) {
  const index_t L = shape.length(), H = shape.heads, N = shape.n_visual, S = shape.prefix,
                d = shape.dim;
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> uniform(0.0f, 1.0f);
  std::vector<float> row_f(static_cast<std::size_t>(std::max(L, d)));

  for (index_t t = 0; t < L; ++t) {
    for (index_t k = 0; k < d; ++k) row_f[static_cast<std::size_t>(k)] = 0.02f * normal(rng);
    embeds_row(t, static_cast<const float*>(row_f.data()));
  }

  // Visual hidden states scatter around 24 centroids, so recycling finds clusters.
  std::vector<float> centroids(static_cast<std::size_t>(24 * d));
  for (float& v : centroids) v = normal(rng);
  for (index_t t = 0; t < L; ++t) {
    const bool visual = t >= S && t < S + N;
    const index_t c = static_cast<index_t>(rng() % 24);
    for (index_t k = 0; k < d; ++k)
      row_f[static_cast<std::size_t>(k)] =
          visual ? centroids[static_cast<std::size_t>(c * d + k)] + 0.3f * normal(rng) : normal(rng);
    hidden_row(t, static_cast<const float*>(row_f.data()));
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
  std::vector<double> row(static_cast<std::size_t>(L));
  std::vector<double> w(topics);
  for (index_t h = 0; h < H; ++h)
    for (index_t t = 0; t < L; ++t) {
      const bool text = t >= S + N;
      if (!text && !all_attn_rows) continue;
      const index_t keys = t + 1;
      std::fill(row.begin(), row.begin() + keys, 0.0);
      if (text) {
        const double beta = 0.3 + 0.4 * uniform(rng);
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
      for (index_t j = 0; j < keys; ++j)
        row_f[static_cast<std::size_t>(j)] = static_cast<float>(row[static_cast<std::size_t>(j)]);
      attn_row(h, t, static_cast<const float*>(row_f.data()));
    }
}

/// Fills the buffers of `s` (whose shape fields the caller may set first)
/// deterministically from `seed`: embeds and hidden [L, d], attn [H, L, L].
inline synthetic_step synthesise(unsigned seed, synthetic_step s = {}) {
  const index_t L = s.length(), d = s.dim;
  s.embeds.resize(static_cast<std::size_t>(L * d));
  s.hidden.resize(static_cast<std::size_t>(L * d));
  s.attn.assign(static_cast<std::size_t>(s.heads * L * L), 0.0f);
  const auto rows = [&](std::vector<float>& dst) {
    return [&dst, d](index_t t, const float* row) {
      std::copy(row, row + d, dst.begin() + t * d);
    };
  };
  generate(seed, s, true, rows(s.embeds), rows(s.hidden), [&](index_t h, index_t t, const float* row) {
    std::copy(row, row + t + 1, s.attn.begin() + (h * L + t) * L);
  });
  return s;
}

}  // namespace sparsevlm::examples
