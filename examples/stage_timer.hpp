// Times each stage of a pruning step in memory (shared by the CLI's `bench`
// and the demo), calling the public stage functions exactly as prune_step does.
#pragma once

#include <algorithm>
#include <chrono>
#include <map>
#include <string>
#include <vector>

#include <sparsevlm/sparsevlm.hpp>

namespace sparsevlm::examples {

template <class TE, class TA, class TH>
index_t sequence_length(const step_inputs<TE, TA, TH>& in) {
  return in.attn.extent(1);
}
template <class TE, class TQ, class TK, class TH>
index_t sequence_length(const step_inputs_qk<TE, TQ, TK, TH>& in) {
  return in.qk.k.extent(1);
}
template <class TE, class TA, class TH>
void score_stage(const step_inputs<TE, TA, TH>& in, std::span<const index_t> raters,
                 matrix_view<float> P, std::span<float> scores, const score_options& o,
                 workspace& ws) {
  relevance_scores(in.attn, raters, in.visual, P, scores, o, ws);
}
template <class TE, class TQ, class TK, class TH>
void score_stage(const step_inputs_qk<TE, TQ, TK, TH>& in, std::span<const index_t> raters,
                 matrix_view<float> P, std::span<float> scores, const score_options& o,
                 workspace& ws) {
  relevance_scores_qk(in.qk, raters, in.visual, P, scores, o, ws);
}

/// Median milliseconds per stage over `repeat` runs; "total" is prune_step plus
/// applying its plan to the hidden states (the whole step an engine pays for).
/// `Inputs` is a step_inputs or a step_inputs_qk.
template <class Inputs>
std::map<std::string, double> time_stages(const Inputs& in, const step_options& opt, int repeat) {
  using TH = typename decltype(in.hidden)::value_type;
  using clock = std::chrono::steady_clock;
  const char* names[] = {"total", "raters", "scores", "rank", "keep", "recycle", "plan"};
  std::map<std::string, std::vector<double>> samples;
  workspace ws;
  const index_t L = sequence_length(in);
  const index_t N = in.visual.len;
  const index_t d = in.hidden.extent(1);
  std::vector<TH> out_rows(static_cast<std::size_t>(L * d));
  const auto ms = [](clock::time_point a, clock::time_point b) {
    return std::chrono::duration<double, std::milli>(b - a).count();
  };
  for (int it = 0; it < repeat; ++it) {
    auto t0 = clock::now();
    const step_result full = prune_step(in, opt, ws);
    matrix_view<const float> merged(full.recycled.merged.data(),
                                    {static_cast<index_t>(full.recycled.clusters.size()), d});
    apply_plan(std::span<const index_t>(full.sequence), in.hidden, merged,
               matrix_view<TH>(out_rows.data(), {static_cast<index_t>(full.sequence.size()), d}));
    auto t1 = clock::now();
    samples["total"].push_back(ms(t0, t1));

    t0 = clock::now();
    std::vector<index_t> raters = in.raters ? std::vector<index_t>(in.raters->begin(), in.raters->end())
                                            : select_raters(in.embeds, in.visual, ws);
    t1 = clock::now();
    samples["raters"].push_back(ms(t0, t1));

    const index_t R = static_cast<index_t>(raters.size());
    std::vector<float> pbuf(static_cast<std::size_t>(R * N)), scores(static_cast<std::size_t>(N));
    matrix_view<float> P(pbuf.data(), {R, N});
    t0 = clock::now();
    score_stage(in, raters, P, scores, opt.scoring, ws);
    t1 = clock::now();
    samples["scores"].push_back(ms(t0, t1));

    t0 = clock::now();
    const index_t rank = R > 0 ? numerical_rank(matrix_view<const float>(P), ws) : 0;
    t1 = clock::now();
    samples["rank"].push_back(ms(t0, t1));

    t0 = clock::now();
    const index_t keep = keep_count(opt.policy, rank, N, R);
    const index_t pruned = N - keep;
    const bool recycling = opt.recycle.enabled && pruned > 0;
    const index_t s = recycling ? core::recycle_count(pruned, opt.recycle.fraction) : 0;
    std::vector<index_t> kept, order;
    select_keep(scores, in.visual.start, keep, s, kept, order, ws);
    t1 = clock::now();
    samples["keep"].push_back(ms(t0, t1));

    recycle_result rec;
    t0 = clock::now();
    if (recycling)
      recycle(in.hidden, in.visual, std::span<const index_t>(order.data(), static_cast<std::size_t>(s)),
              core::cluster_count(s, opt.recycle.cluster_divisor), rec, ws);
    t1 = clock::now();
    samples["recycle"].push_back(ms(t0, t1));

    t0 = clock::now();
    const auto seq = make_sequence(L, in.visual, kept, static_cast<index_t>(rec.clusters.size()));
    apply_plan(std::span<const index_t>(seq), in.hidden,
               matrix_view<const float>(rec.merged.data(), {static_cast<index_t>(rec.clusters.size()), d}),
               matrix_view<TH>(out_rows.data(), {static_cast<index_t>(seq.size()), d}));
    t1 = clock::now();
    samples["plan"].push_back(ms(t0, t1));
  }
  std::map<std::string, double> median;
  for (const char* n : names) {
    auto& v = samples[n];
    std::sort(v.begin(), v.end());
    median[n] = v.empty() ? 0.0 : v[v.size() / 2];
  }
  return median;
}

}  // namespace sparsevlm::examples
