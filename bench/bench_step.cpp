// Google Benchmark: one pruning step as an engine runs it, at model shapes and
// element types, against the memory bandwidth of one core.
//
//   BM_step/<shape>/<type>     prune_step (raters chosen from the embeds) plus
//                              apply_plan of the hidden states into a preallocated
//                              buffer; counters bytes, GB/s, probe_GB/s,
//                              x_of_limit (common.hpp), us_per_token = time / N
//   BM_layer/<shape>/<type>    one pruning layer as the session runs it: raters
//                              given (chosen once before layer 0), workspace and
//                              result reserved (prune_step_into, no allocation),
//                              plus the compaction; same counters as BM_step
//   BM_stages/<shape>/<type>   the same step, each stage timed inside it through
//                              prune_step's hook: <stage>_ms, and the
//                              bandwidth-bound stages against the probe
//                              (scores_x: rater rows of the attention; plan_x:
//                              the compaction)
//   .../scalar                 7B float32 with the scalar kernels forced, so the
//                              SIMD speed-up reads off one run
//   BM_copy_256MB              the probe itself as a benchmark
//   BM_rank_64x2880            the rank at the issue's reference size
//
// Shapes and inputs: common.hpp. Labels name the active instruction set and what
// the step decided (raters, rank, keep count, recycled tokens / clusters).
#include <benchmark/benchmark.h>

#include <chrono>
#include <cstring>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "common.hpp"

namespace {

using namespace sparsevlm;
using namespace sparsevlm::bench;

/// What one benchmark holds: the inputs, one workspace and one output buffer for
/// the compacted hidden states, reused by every iteration.
template <class T>
struct step_fixture {
  step_inputs<T, T, T> in;
  step_options opt = options();
  workspace ws;
  std::vector<T> out;
  step_result first;

  explicit step_fixture(const step_data<T>& data) : in(data.inputs()) {
    first = prune_step(in, opt, ws);  // validates, sizes the workspace, fixes n_out
    out.resize(first.sequence.size() * static_cast<std::size_t>(in.hidden.extent(1)));
    apply(first);
  }

  void apply(const step_result& r) {
    const index_t d = in.hidden.extent(1);
    const index_t c = static_cast<index_t>(r.recycled.clusters.size());
    apply_plan(std::span<const index_t>(r.sequence), in.hidden,
               matrix_view<const float>(r.recycled.merged.data(), {c, d}),
               matrix_view<T>(out.data(), {static_cast<index_t>(r.sequence.size()), d}));
  }

  [[nodiscard]] std::string label() const {
    std::int64_t s = 0;
    for (const auto& cl : first.recycled.clusters) s += static_cast<std::int64_t>(cl.size());
    return isa_label() + " R" + std::to_string(first.raters.size()) + " rank" +
           std::to_string(first.rank) + " keep" + std::to_string(first.keep_count) + " rec" +
           std::to_string(s) + "/" + std::to_string(first.recycled.clusters.size());
  }
};

/// Forces the scalar kernels when asked and builds the fixture; false (with the
/// benchmark marked skipped) when the shape's data cannot be made.
template <class T>
bool setup(benchmark::State& state, const shape& sh, bool scalar,
           std::optional<cpu::scoped_isa>& force, std::optional<step_fixture<T>>& f) {
  if (scalar) force.emplace(cpu::isa::scalar);
  try {
    f.emplace(data_for<T>(sh));
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
    return false;
  }
  return true;
}

template <class T>
void BM_step(benchmark::State& state, shape sh, bool scalar) {
  std::optional<cpu::scoped_isa> force;
  std::optional<step_fixture<T>> f;
  if (!setup(state, sh, scalar, force, f)) return;
  for (auto _ : state) {
    const step_result r = prune_step(f->in, f->opt, f->ws);
    f->apply(r);
    benchmark::DoNotOptimize(f->out.data());
    benchmark::ClobberMemory();
  }
  const examples::step_traffic b = examples::traffic(f->in, f->first);
  report_bandwidth(state, static_cast<double>(b.total()));
  using C = benchmark::Counter;
  state.counters["us_per_token"] =
      C(static_cast<double>(sh.n_visual) * 1e-6, C::kIsIterationInvariantRate | C::kInvert);
  state.SetLabel(f->label());
}

/// One pruning layer as the session runs it: raters chosen once before layer 0
/// and given to every step, the workspace and the result reserved for the
/// shape (prune_step_into: no allocation), then the hidden-state compaction.
template <class T>
void BM_layer(benchmark::State& state, shape sh, bool scalar) {
  std::optional<cpu::scoped_isa> force;
  std::optional<step_fixture<T>> f;
  if (!setup(state, sh, scalar, force, f)) return;
  step_inputs<T, T, T> in = f->in;
  const std::vector<index_t> raters = f->first.raters;
  in.raters = std::span<const index_t>(raters);
  step_shape shp{in.attn.extent(1),      sh.n_visual, in.attn.extent(0), 0,
                 in.hidden.extent(1),    0,           f->opt.recycle.fraction};
  workspace ws;
  step_result r;
  ws.reserve(shp, &r);
  for (auto _ : state) {
    prune_step_into(in, f->opt, ws, r);
    f->apply(r);
    benchmark::DoNotOptimize(f->out.data());
    benchmark::ClobberMemory();
  }
  const examples::step_traffic b = examples::traffic(in, f->first);
  report_bandwidth(state, static_cast<double>(b.total()));
  state.SetLabel(f->label());
}

template <class T>
void BM_stages(benchmark::State& state, shape sh, bool scalar) {
  using clock = std::chrono::steady_clock;
  std::optional<cpu::scoped_isa> force;
  std::optional<step_fixture<T>> f;
  if (!setup(state, sh, scalar, force, f)) return;
  constexpr std::array<const char*, 6> names{"raters", "scores", "rank", "keep", "recycle", "plan"};
  std::array<double, 6> sum{};  // seconds per stage over all iterations
  for (auto _ : state) {
    std::size_t i = 0;
    auto last = clock::now();
    const step_result r = prune_step(f->in, f->opt, f->ws, [&](const char*) {
      const auto now = clock::now();
      sum[i++] += std::chrono::duration<double>(now - last).count();
      last = now;
    });
    f->apply(r);  // the compaction is part of "plan", as in examples/stage_timer.hpp
    benchmark::DoNotOptimize(f->out.data());
    benchmark::ClobberMemory();
    sum[5] += std::chrono::duration<double>(clock::now() - last).count();
  }
  using C = benchmark::Counter;
  for (std::size_t i = 0; i < names.size(); ++i)
    state.counters[std::string(names[i]) + "_ms"] = C(sum[i] * 1e3, C::kAvgIterations);
  const examples::step_traffic b = examples::traffic(f->in, f->first);
  const double n = static_cast<double>(state.iterations());
  if (copy_bw > 0.0 && n > 0.0) {
    state.counters["scores_x"] = sum[1] / n / (static_cast<double>(b.scores) / copy_bw);
    state.counters["plan_x"] = sum[5] / n / (static_cast<double>(b.compaction) / copy_bw);
  }
  state.SetLabel(f->label());
}

template <class T>
void register_shape(const shape& sh, bool with_scalar) {
  const std::string tail = std::string("/") + sh.name + "/" + type_tag<T>();
  const auto add = [&](const std::string& name, auto fn, bool scalar) {
    benchmark::RegisterBenchmark(name.c_str(), fn, sh, scalar)
        ->Unit(benchmark::kMillisecond)
        ->UseRealTime();
  };
  add("BM_step" + tail, BM_step<T>, false);
  add("BM_layer" + tail, BM_layer<T>, false);
  add("BM_stages" + tail, BM_stages<T>, false);
  if (with_scalar) {
    add("BM_step" + tail + "/scalar", BM_step<T>, true);
    add("BM_stages" + tail + "/scalar", BM_stages<T>, true);
  }
}

// Shape by shape, so that each shape's data is generated once per type (common.hpp).
[[maybe_unused]] const bool registered = [] {
  for (const shape& sh : shapes) {
    const bool is_7b = std::strcmp(sh.name, llava15_7b.name) == 0;
    register_shape<float>(sh, is_7b);
    register_shape<half>(sh, false);
    register_shape<bfloat16>(sh, false);
  }
  return true;
}();

void BM_copy_256MB(benchmark::State& state) {
  constexpr std::size_t bytes = std::size_t{256} << 20;
  const std::unique_ptr<char[]> src(new char[bytes]), dst(new char[bytes]);
  std::memset(src.get(), 1, bytes);
  std::memset(dst.get(), 0, bytes);
  for (auto _ : state) {
    std::memcpy(dst.get(), src.get(), bytes);
    benchmark::DoNotOptimize(dst.get());
    benchmark::ClobberMemory();
  }
  report_bandwidth(state, 2.0 * static_cast<double>(bytes));  // read + written
}
BENCHMARK(BM_copy_256MB)->Unit(benchmark::kMillisecond)->UseRealTime();

// The rank at the issue's reference size: R x N = 64 x 2880 (LLaVA-NeXT AnyRes),
// random non-negative P (full rank 64).
void BM_rank_64x2880(benchmark::State& state) {
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> u(0.0f, 1.0f);
  std::vector<float> p(64 * 2880);
  for (float& v : p) v = u(rng);
  workspace ws;
  index_t rank = 0;
  for (auto _ : state)
    benchmark::DoNotOptimize(rank = numerical_rank(matrix_view<const float>(p.data(), {64, 2880}), ws));
  state.counters["rank"] = static_cast<double>(rank);
  state.SetLabel(isa_label());
}
BENCHMARK(BM_rank_64x2880)->Unit(benchmark::kMicrosecond);

}  // namespace
