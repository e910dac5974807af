// Times each stage of a pruning step in memory (shared by the CLI's `bench` and
// the demo), through prune_step's per-stage hook: the stages are timed inside the
// real step, as an engine runs it.
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

/// Median milliseconds per stage over `repeat` runs. "plan" includes applying the
/// plan to the hidden states (apply_plan into a second buffer), and "total" is
/// the whole: prune_step plus that copy, what an engine pays for one step.
/// `Inputs` is a step_inputs or a step_inputs_qk.
template <class Inputs>
std::map<std::string, double> time_stages(const Inputs& in, const step_options& opt, int repeat) {
  using clock = std::chrono::steady_clock;
  using TH = typename decltype(in.hidden)::value_type;
  std::map<std::string, std::vector<double>> samples;
  workspace ws;
  const index_t L = sequence_length(in);
  const index_t d = in.hidden.extent(1);
  std::vector<TH> out_rows(static_cast<std::size_t>(L * d));
  const auto ms = [](clock::time_point a, clock::time_point b) {
    return std::chrono::duration<double, std::milli>(b - a).count();
  };
  for (int it = 0; it < repeat; ++it) {
    const auto t0 = clock::now();
    auto last = t0;
    const step_result r = prune_step(in, opt, ws, [&](const char* stage) {
      const auto now = clock::now();
      samples[stage].push_back(ms(last, now));
      last = now;
    });
    const index_t c = static_cast<index_t>(r.recycled.clusters.size());
    apply_plan(std::span<const index_t>(r.sequence), in.hidden,
               matrix_view<const float>(r.recycled.merged.data(), {c, d}),
               matrix_view<TH>(out_rows.data(), {static_cast<index_t>(r.sequence.size()), d}));
    const auto t1 = clock::now();
    samples["plan"].back() += ms(last, t1);
    samples["total"].push_back(ms(t0, t1));
  }
  std::map<std::string, double> median;
  for (auto& [name, v] : samples) {
    std::sort(v.begin(), v.end());
    median[name] = v[v.size() / 2];
  }
  return median;
}

}  // namespace sparsevlm::examples
