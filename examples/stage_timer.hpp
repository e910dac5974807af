// Times each stage of a pruning step in memory (shared by the CLI's `bench`, the
// demo and bench/), through prune_step's per-stage hook: the stages are timed
// inside the real step, as an engine runs it. Also the yardstick the times are
// read against: the bytes a step must touch, and the copy bandwidth of one core.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <ctime>
#include <limits>
#include <map>
#include <memory>
#include <optional>
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

/// The median of each named series of samples.
inline std::map<std::string, double> medians(std::map<std::string, std::vector<double>>& samples) {
  std::map<std::string, double> median;
  for (auto& [name, v] : samples) {
    std::sort(v.begin(), v.end());
    median[name] = v[v.size() / 2];
  }
  return median;
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
  return medians(samples);
}

/// Median milliseconds of each public call an engine (or the Python package) makes
/// for this step, each timed alone over `repeat` runs with a warm workspace:
/// - "prune_step": prune_step(in, opt, ws), the decisions only;
/// - "select_raters": select_raters(embeds, visual, ws, out), on the case's embeds
///   even when the case gives its raters;
/// - "session_prune": prefill_session::prune of a one-layer schedule with the
///   step's raters given (the session is built untimed before each run);
/// - "apply_plan": apply_plan of the decided sequence to the hidden states into a
///   second buffer.
/// The yardstick bench/python_overhead.py holds the Python package against.
template <class Inputs>
std::map<std::string, double> time_calls(const Inputs& in, const step_options& opt, int repeat) {
  using clock = std::chrono::steady_clock;
  using TH = typename decltype(in.hidden)::value_type;
  workspace ws;
  const index_t L = sequence_length(in);
  const index_t d = in.hidden.extent(1);
  const step_result first = prune_step(in, opt, ws);
  std::map<std::string, std::vector<double>> samples;
  // `repeat` timed runs of call(), each after an untimed setup().
  const auto time = [&](const char* name, auto&& call, auto&& setup) {
    for (int it = 0; it < repeat; ++it) {
      setup();
      const auto t0 = clock::now();
      call();
      samples[name].push_back(std::chrono::duration<double, std::milli>(clock::now() - t0).count());
    }
  };
  const auto nothing = [] {};
  time("prune_step", [&] { (void)prune_step(in, opt, ws); }, nothing);
  std::vector<index_t> raters;
  time("select_raters", [&] { select_raters(in.embeds, in.visual, ws, raters); }, nothing);
  const prefill_layout layout =
      prefill_layout::from_counts(in.visual.start, in.visual.len, L - in.visual.start - in.visual.len);
  session_config cfg;
  cfg.layers = 2;
  cfg.schedule = {{0, opt}};
  std::optional<prefill_session> s;
  time(
      "session_prune",
      [&] {
        if constexpr (requires { in.attn; }) {
          (void)s->prune(0, in.attn, in.hidden, ws);
        } else {
          (void)s->prune(0, in.qk, in.hidden, ws);
        }
      },
      [&] { s.emplace(layout, std::span<const index_t>(first.raters), cfg); });
  const index_t n = static_cast<index_t>(first.sequence.size());
  const index_t c = static_cast<index_t>(first.recycled.clusters.size());
  std::vector<TH> out_rows(static_cast<std::size_t>(n * d));
  time("apply_plan", [&] {
    apply_plan(std::span<const index_t>(first.sequence), in.hidden,
               matrix_view<const float>(first.recycled.merged.data(), {c, d}),
               matrix_view<TH>(out_rows.data(), {n, d}));
  }, nothing);
  return medians(samples);
}

/// The bytes one step must touch at least, each once: what a single core would
/// spend moving them at its copy bandwidth is the floor the step's time is
/// compared with ("x of the bandwidth limit").
struct step_traffic {
  /// Scoring: the rater rows' visual columns of the attention, H·R·N elements;
  /// for the Q/K form the queries' rater rows, H·R·dh, and the keys up to the
  /// last rater, Hkv·(last + 1)·dh (plus the LSE rows when given).
  std::int64_t scores = 0;
  /// Rater selection: embeds rows S..L, (N + T)·d_e elements; 0 with caller raters.
  std::int64_t raters = 0;
  /// Recycling: the s hidden rows it merges, s·d elements.
  std::int64_t recycle = 0;
  /// Applying the plan to the hidden states: n_out rows read and written, 2·n_out·d.
  std::int64_t compaction = 0;
  [[nodiscard]] std::int64_t total() const { return scores + raters + recycle + compaction; }
};

namespace detail_traffic {

template <class TE, class TH>
void common_traffic(step_traffic& b, matrix_view<const TE> embeds, matrix_view<const TH> hidden,
                    visual_span visual, bool caller_raters, const step_result& r) {
  if (!caller_raters)
    b.raters = (embeds.extent(0) - visual.start) * embeds.extent(1) *
               static_cast<std::int64_t>(sizeof(TE));
  std::int64_t s = 0;
  for (const auto& cl : r.recycled.clusters) s += static_cast<std::int64_t>(cl.size());
  const std::int64_t row = hidden.extent(1) * static_cast<std::int64_t>(sizeof(TH));
  b.recycle = s * row;
  b.compaction = 2 * static_cast<std::int64_t>(r.sequence.size()) * row;
}

}  // namespace detail_traffic

/// step_traffic of a step on `in` that decided `r`.
template <class TE, class TA, class TH>
step_traffic traffic(const step_inputs<TE, TA, TH>& in, const step_result& r) {
  step_traffic b;
  b.scores = in.attn.extent(0) * static_cast<std::int64_t>(r.raters.size()) * in.visual.len *
             static_cast<std::int64_t>(sizeof(TA));
  detail_traffic::common_traffic(b, in.embeds, in.hidden, in.visual, in.raters.has_value(), r);
  return b;
}

template <class TE, class TQ, class TK, class TH>
step_traffic traffic(const step_inputs_qk<TE, TQ, TK, TH>& in, const step_result& r) {
  step_traffic b;
  const std::int64_t R = static_cast<std::int64_t>(r.raters.size());
  const index_t H = in.qk.q.extent(0), dh = in.qk.q.extent(2), Hkv = in.qk.k.extent(0);
  const index_t keys = r.raters.empty() ? 0 : r.raters.back() + 1;
  b.scores = H * R * dh * static_cast<std::int64_t>(sizeof(TQ)) +
             Hkv * keys * dh * static_cast<std::int64_t>(sizeof(TK)) +
             (in.qk.lse ? H * R * static_cast<std::int64_t>(sizeof(float)) : 0);
  detail_traffic::common_traffic(b, in.embeds, in.hidden, in.visual, in.raters.has_value(), r);
  return b;
}

/// One core's copy bandwidth in bytes per second (see copy_bandwidth).
struct copy_probe {
  double wall = 0.0;  ///< from wall-clock time, what stage timings compare with
  double cpu = 0.0;   ///< from the process's CPU time (std::clock): on a machine
                      ///< whose cores are shared, closer to what the core can do
};

/// Bytes read plus bytes written per second by memcpy of a `bytes` buffer
/// (STREAM's "Copy" convention, so it compares with step_traffic, which counts
/// reads and writes alike), best of `reps` copies after one untimed copy. Both
/// buffers are written before timing, so no page fault is timed. Holds 2·bytes
/// while it runs.
inline copy_probe copy_bandwidth(std::size_t bytes = std::size_t{256} << 20, int reps = 5) {
  using clock = std::chrono::steady_clock;
  const std::unique_ptr<char[]> src(new char[bytes]), dst(new char[bytes]);
  std::memset(src.get(), 1, bytes);
  std::memset(dst.get(), 0, bytes);
  volatile char sink = 0;
  double best = std::numeric_limits<double>::infinity(), best_cpu = best;
  for (int i = 0; i <= reps; ++i) {
    const std::clock_t c0 = std::clock();
    const auto t0 = clock::now();
    std::memcpy(dst.get(), src.get(), bytes);
    const auto t1 = clock::now();
    const std::clock_t c1 = std::clock();
    sink = dst[static_cast<std::size_t>(i) * 4099 % bytes];  // keeps the copy observable
    if (i == 0) continue;
    best = std::min(best, std::chrono::duration<double>(t1 - t0).count());
    best_cpu = std::min(best_cpu, static_cast<double>(c1 - c0) / CLOCKS_PER_SEC);
  }
  (void)sink;
  const double moved = 2.0 * static_cast<double>(bytes);
  return {moved / best, best_cpu > 0.0 ? moved / best_cpu : 0.0};
}

}  // namespace sparsevlm::examples
