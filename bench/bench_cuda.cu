// Google Benchmark on the GPU: one pruning step (cuda::prune_step_async) plus
// the compaction of the hidden states (cuda::apply_plan_async), timed with CUDA
// events (manual time), at the CPU benchmarks' shapes (common.hpp) and inputs
// (the same synthetic step, seed 2410), in float32, float16 and bfloat16.
//
//   BM_cuda_step/<shape>/<type>     the whole step + compaction, raters chosen
//                                   on the device; the workspace is allocated
//                                   once outside the loop (as an engine would)
//   BM_cuda_stage/<shape>/f32       the same step with an event after each stage:
//                                   <stage>_ms counters
//   BM_cuda_qk/<shape>/f32          scores from Q/K (random q, k; dh 128, R 30)
//   BM_cuda_step_separate/<shape>/bf16  BM_cuda_step with one launch per kernel
//                                   (set_chained_launches(false)): what chaining gains
//   BM_cuda_batch32/<shape>/bf16/<together|one_by_one>  32 steps of the shape
//                                   (N <= 2880): prune_batch_async (launch i of
//                                   every step as one grid) against 32
//                                   prune_step_async calls; us_per_seq counter
//
// Labels: what the GPU decided (R, rank, keep, recycled rows / clusters) next to
// what the CPU decides on the same step (they must agree). Built with
// SPARSEVLM_BUILD_BENCH and SPARSEVLM_CUDA; never run in CI. Without a device
// every benchmark reports an error and the program exits normally.
#include <benchmark/benchmark.h>
#include <cuda_runtime.h>

#include <cstdio>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include <sparsevlm/cuda/step.cuh>

#include "cuda_data.hpp"

namespace {

using namespace sparsevlm;
namespace gpu = sparsevlm::bench::gpu;

struct cuda_failure {
  std::string what;
};

void ok(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw cuda_failure{std::string(what) + ": " + cudaGetErrorString(e)};
}

template <class T>
struct buffer {
  T* p = nullptr;
  explicit buffer(std::size_t n) { ok(cudaMalloc(reinterpret_cast<void**>(&p), (n ? n : 1) * sizeof(T)), "cudaMalloc"); }
  buffer(const buffer&) = delete;
  buffer& operator=(const buffer&) = delete;
  ~buffer() { cudaFree(p); }
};

template <class T>
std::vector<T> as(const std::vector<float>& v) {
  std::vector<T> out(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) out[i] = from_float<T>(v[i]);
  return out;
}

template <class T>
constexpr const char* tag() {
  if constexpr (std::is_same_v<T, float>) return "f32";
  if constexpr (std::is_same_v<T, half>) return "f16";
  return "bf16";
}

step_options options() {  // common.hpp's options(): rank(13.5, 0), recycling 0.3 / 10
  step_options o;
  o.policy = keep_policy::rank(13.5, 0.0);
  o.recycle = recycle_options{true, 0.3, 10.0};
  return o;
}

/// One shape's step on the device in T: the whole attention [H, L, L] is
/// allocated (up to 11 GB at 16×576 in float32) but only its text rows are
/// written, which are all a step reads.
template <class T>
struct device_step_data {
  gpu::shape sh;
  std::unique_ptr<buffer<T>> embeds, hidden, attn, out;
  std::string cpu;

  explicit device_step_data(const gpu::shape& s) : sh(s) {
    const gpu::step host = gpu::make_step(s);
    const index_t L = s.length(), d = s.dim, T_ = s.n_text, first_text = s.prefix + s.n_visual;
    embeds = std::make_unique<buffer<T>>(host.embeds.size());
    hidden = std::make_unique<buffer<T>>(host.hidden.size());
    out = std::make_unique<buffer<T>>(host.hidden.size());
    attn = std::make_unique<buffer<T>>(static_cast<std::size_t>(s.heads * L * L));
    ok(cudaMemcpy(embeds->p, as<T>(host.embeds).data(), host.embeds.size() * sizeof(T), cudaMemcpyHostToDevice), "upload");
    ok(cudaMemcpy(hidden->p, as<T>(host.hidden).data(), host.hidden.size() * sizeof(T), cudaMemcpyHostToDevice), "upload");
    const std::vector<T> rows = as<T>(host.attn_text);
    for (index_t h = 0; h < s.heads; ++h)
      ok(cudaMemcpy(attn->p + (h * L + first_text) * L, rows.data() + h * T_ * L,
                    static_cast<std::size_t>(T_ * L) * sizeof(T), cudaMemcpyHostToDevice),
         "upload");
    if constexpr (std::is_same_v<T, float>) cpu = gpu::cpu_label(host);
    (void)d;
  }

  step_inputs<T, T, T> inputs() const {
    const index_t L = sh.length();
    return {matrix_view<const T>(embeds->p, {L, sh.dim}), tensor3_view<const T>(attn->p, {sh.heads, L, L}),
            matrix_view<const T>(hidden->p, {L, sh.dim}), visual_span{sh.prefix, sh.n_visual}, std::nullopt};
  }
};

/// One shape's device data at a time, kept across the calls Google Benchmark
/// makes of a benchmark function (generation and upload take seconds at the
/// video shapes; the old one is freed first: never two on the device).
struct holder {
  std::shared_ptr<void> data;
  std::string key;
};
holder& held() {
  static holder h;
  return h;
}

template <class T>
const device_step_data<T>& data_for(const gpu::shape& sh) {
  holder& h = held();
  const std::string want = sh.name + "/" + tag<T>();
  if (h.key != want) {
    h.data.reset();
    h.key.clear();
    h.data = std::make_shared<device_step_data<T>>(sh);
    h.key = want;
  }
  return *static_cast<const device_step_data<T>*>(h.data.get());
}

std::string label_of(const cuda::device_step& st, cudaStream_t stream) {
  step_result r;
  cuda::step_status status;
  ok(cuda::download(st, r, status, stream), "download");
  std::int64_t rec = 0;
  for (const auto& c : r.recycled.clusters) rec += static_cast<std::int64_t>(c.size());
  return std::string(status.ok() ? "" : "FLAGGED ") + "gpu: R" + std::to_string(r.raters.size()) +
         " rank" + std::to_string(r.rank) + " keep" + std::to_string(r.keep_count) + " rec" +
         std::to_string(rec) + "/" + std::to_string(r.recycled.clusters.size());
}

struct events {
  cudaEvent_t a = nullptr, b = nullptr;
  events() {
    ok(cudaEventCreate(&a), "cudaEventCreate");
    ok(cudaEventCreate(&b), "cudaEventCreate");
  }
  ~events() {
    cudaEventDestroy(a);
    cudaEventDestroy(b);
  }
  double ms() const {
    float v = 0.0f;
    ok(cudaEventElapsedTime(&v, a, b), "cudaEventElapsedTime");
    return v;
  }
};

template <class T>
void BM_cuda_step(benchmark::State& state, gpu::shape sh) {
  try {
    const device_step_data<T>& data = data_for<T>(sh);
    const auto in = data.inputs();
    const step_options opt = options();
    cudaStream_t stream = nullptr;
    ok(cudaStreamCreate(&stream), "cudaStreamCreate");
    std::size_t bytes = 0;
    cuda::device_step st;
    ok(cuda::prune_step_async(in, opt, nullptr, bytes, st, nullptr, stream), "size query");
    buffer<unsigned char> ws(bytes);
    index_t* pinned = nullptr;
    ok(cudaMallocHost(reinterpret_cast<void**>(&pinned), sizeof(index_t)), "cudaMallocHost");
    const index_t L = sh.length();
    const auto run = [&] {
      ok(cuda::prune_step_async(in, opt, ws.p, bytes, st, pinned, stream), "prune_step_async");
      ok(cuda::apply_plan_async(st, in.hidden, matrix_view<T>(data.out->p, {L, sh.dim}), stream),
         "apply_plan_async");
    };
    run();  // warm-up (module load, first-touch)
    ok(cudaStreamSynchronize(stream), "sync");
    events ev;
    for (auto _ : state) {
      ok(cudaEventRecord(ev.a, stream), "record");
      run();
      ok(cudaEventRecord(ev.b, stream), "record");
      ok(cudaEventSynchronize(ev.b), "sync");
      state.SetIterationTime(ev.ms() * 1e-3);
    }
    state.counters["workspace_MB"] = static_cast<double>(bytes) / (1024.0 * 1024.0);
    state.counters["new_length"] = static_cast<double>(*pinned);
    state.SetLabel(label_of(st, stream) + (data.cpu.empty() ? "" : " | " + data.cpu));
    cudaFreeHost(pinned);
    cudaStreamDestroy(stream);
  } catch (const cuda_failure& f) {
    state.SkipWithError(f.what.c_str());
  } catch (const sparsevlm::error& e) {
    state.SkipWithError(e.what());
  }
}

void BM_cuda_stage(benchmark::State& state, gpu::shape sh) {
  try {
    const device_step_data<float>& data = data_for<float>(sh);
    const auto in = data.inputs();
    const step_options opt = options();
    cudaStream_t stream = nullptr;
    ok(cudaStreamCreate(&stream), "cudaStreamCreate");
    step_shape shape;
    shape.length = sh.length();
    shape.visual = sh.n_visual;
    shape.heads = sh.heads;
    shape.embed_dim = sh.dim;
    shape.hidden_dim = sh.dim;
    shape.recycle_fraction = opt.recycle.fraction;
    shape.cluster_divisor = opt.recycle.cluster_divisor;
    const std::size_t bytes = cuda::step_workspace_bytes(shape);
    buffer<unsigned char> ws(bytes);
    const char* names[] = {"raters", "scores", "rank", "keep", "recycle", "plan"};
    std::vector<cudaEvent_t> marks(7);
    for (auto& m : marks) ok(cudaEventCreate(&m), "cudaEventCreate");
    std::vector<double> sums(6, 0.0);
    cuda::device_step st;
    const index_t L = sh.length();
    const auto run = [&] {
      std::size_t b = bytes;
      ok(cudaEventRecord(marks[0], stream), "record");
      ok(cuda::begin_step(shape, L, in.visual, ws.p, b, st, stream), "begin_step");
      ok(cuda::select_raters_async(st, in.embeds, stream), "raters");
      ok(cudaEventRecord(marks[1], stream), "record");
      ok(cuda::relevance_scores_async(st, in.attn, opt.scoring, stream), "scores");
      ok(cudaEventRecord(marks[2], stream), "record");
      ok(cuda::numerical_rank_async(st, stream), "rank");
      ok(cudaEventRecord(marks[3], stream), "record");
      ok(cuda::keep_count_async(st, opt, stream), "keep count");
      ok(cuda::select_keep_async(st, stream), "keep set");
      ok(cudaEventRecord(marks[4], stream), "record");
      ok(cuda::recycle_async(st, in.hidden, stream), "recycle");
      ok(cudaEventRecord(marks[5], stream), "record");
      ok(cuda::make_sequence_async(st, nullptr, stream), "sequence");
      ok(cuda::apply_plan_async(st, in.hidden, matrix_view<float>(data.out->p, {L, sh.dim}), stream),
         "apply_plan_async");
      ok(cudaEventRecord(marks[6], stream), "record");
      ok(cudaEventSynchronize(marks[6]), "sync");
    };
    run();
    for (auto _ : state) {
      run();
      float total = 0.0f;
      for (int i = 0; i < 6; ++i) {
        float v = 0.0f;
        ok(cudaEventElapsedTime(&v, marks[static_cast<std::size_t>(i)], marks[static_cast<std::size_t>(i) + 1]), "elapsed");
        sums[static_cast<std::size_t>(i)] += v;
        total += v;
      }
      state.SetIterationTime(total * 1e-3);
    }
    for (int i = 0; i < 6; ++i)
      state.counters[std::string(names[i]) + "_ms"] =
          sums[static_cast<std::size_t>(i)] / static_cast<double>(state.iterations());
    state.SetLabel(label_of(st, stream));
    for (auto& m : marks) cudaEventDestroy(m);
    cudaStreamDestroy(stream);
  } catch (const cuda_failure& f) {
    state.SkipWithError(f.what.c_str());
  } catch (const sparsevlm::error& e) {
    state.SkipWithError(e.what());
  }
}

/// Scores from Q/K alone (what a fused-attention engine runs): H 32, dh 128,
/// 30 raters evenly over the text, random q and k.
void BM_cuda_qk(benchmark::State& state, gpu::shape sh) {
  try {
    const index_t H = sh.heads, dh = 128, L = sh.length(), N = sh.n_visual, S = sh.prefix;
    std::mt19937 rng(5);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::vector<float> q(static_cast<std::size_t>(H * L * dh)), k(q.size());
    for (float& v : q) v = normal(rng);
    for (float& v : k) v = normal(rng);
    std::vector<index_t> raters;
    for (index_t i = 0; i < 30; ++i) raters.push_back(S + N + i * sh.n_text / 30);
    buffer<float> qd(q.size()), kd(k.size());
    buffer<index_t> rd(raters.size());
    ok(cudaMemcpy(qd.p, q.data(), q.size() * sizeof(float), cudaMemcpyHostToDevice), "upload");
    ok(cudaMemcpy(kd.p, k.data(), k.size() * sizeof(float), cudaMemcpyHostToDevice), "upload");
    ok(cudaMemcpy(rd.p, raters.data(), raters.size() * sizeof(index_t), cudaMemcpyHostToDevice), "upload");
    cudaStream_t stream = nullptr;
    ok(cudaStreamCreate(&stream), "cudaStreamCreate");
    step_shape shape;
    shape.length = L;
    shape.visual = N;
    shape.heads = H;
    shape.hidden_dim = 1;
    shape.head_dim = dh;
    const std::size_t bytes = cuda::step_workspace_bytes(shape);
    buffer<unsigned char> ws(bytes);
    const qk_view<float, float> qk{tensor3_view<const float>(qd.p, {H, L, dh}),
                                   tensor3_view<const float>(kd.p, {H, L, dh}), std::nullopt, 0.0};
    cuda::device_step st;
    const auto run = [&] {
      std::size_t b = bytes;
      ok(cuda::begin_step(shape, L, visual_span{S, N}, ws.p, b, st, stream), "begin_step");
      ok(cuda::set_raters_async(st, std::span<const index_t>(rd.p, raters.size()), stream), "raters");
      ok(cuda::relevance_scores_qk_async(st, qk, score_options{}, stream), "scores_qk");
    };
    run();
    ok(cudaStreamSynchronize(stream), "sync");
    events ev;
    for (auto _ : state) {
      ok(cudaEventRecord(ev.a, stream), "record");
      run();
      ok(cudaEventRecord(ev.b, stream), "record");
      ok(cudaEventSynchronize(ev.b), "sync");
      state.SetIterationTime(ev.ms() * 1e-3);
    }
    state.counters["workspace_MB"] = static_cast<double>(bytes) / (1024.0 * 1024.0);
    cudaStreamDestroy(stream);
  } catch (const cuda_failure& f) {
    state.SkipWithError(f.what.c_str());
  } catch (const sparsevlm::error& e) {
    state.SkipWithError(e.what());
  }
}

/// BM_cuda_step with one launch per kernel (cuda::set_chained_launches(false)):
/// what chaining the kernels gains on this GPU, in the same run.
template <class T>
void BM_cuda_step_separate(benchmark::State& state, gpu::shape sh) {
  cuda::set_chained_launches(false);
  BM_cuda_step<T>(state, sh);
  cuda::set_chained_launches(true);
}

/// 32 copies of the shape's step (the same inputs, a workspace slice each):
/// prune_batch_async, or (together == false) prune_step_async 32 times.
template <class T>
void BM_cuda_batch32(benchmark::State& state, gpu::shape sh, bool together) {
  try {
    constexpr int B = 32;
    const device_step_data<T>& data = data_for<T>(sh);
    const std::vector<step_inputs<T, T, T>> steps(B, data.inputs());
    const std::vector<step_options> opts(1, options());
    std::vector<cuda::device_step> out(B);
    cudaStream_t stream = nullptr;
    ok(cudaStreamCreate(&stream), "cudaStreamCreate");
    using In = step_inputs<T, T, T>;
    std::size_t bytes = 0;
    ok(cuda::prune_batch_async<In>(steps, opts, nullptr, bytes, out, nullptr, stream), "size query");
    buffer<unsigned char> ws(bytes);
    std::size_t one = 0;
    ok(cuda::prune_step_async(steps[0], opts[0], nullptr, one, out[0], nullptr, stream), "size query");
    const auto run = [&] {
      if (together) {
        ok(cuda::prune_batch_async<In>(steps, opts, ws.p, bytes, out, nullptr, stream), "prune_batch_async");
        return;
      }
      for (int b = 0; b < B; ++b)
        ok(cuda::prune_step_async(steps[b], opts[0], ws.p + static_cast<std::size_t>(b) * one, one,
                                  out[b], nullptr, stream),
           "prune_step_async");
    };
    run();  // warm-up
    ok(cudaStreamSynchronize(stream), "sync");
    events ev;
    double total_ms = 0.0;
    for (auto _ : state) {
      ok(cudaEventRecord(ev.a, stream), "record");
      run();
      ok(cudaEventRecord(ev.b, stream), "record");
      ok(cudaEventSynchronize(ev.b), "sync");
      const double ms = ev.ms();
      total_ms += ms;
      state.SetIterationTime(ms * 1e-3);
    }
    state.counters["us_per_seq"] =
        benchmark::Counter(total_ms * 1e3 / B, benchmark::Counter::kAvgIterations);
    state.SetLabel(label_of(out[B - 1], stream));
    cudaStreamDestroy(stream);
  } catch (const cuda_failure& f) {
    state.SkipWithError(f.what.c_str());
  } catch (const sparsevlm::error& e) {
    state.SkipWithError(e.what());
  }
}

template <class T>
void register_step(const gpu::shape& sh) {
  benchmark::RegisterBenchmark(("BM_cuda_step/" + sh.name + "/" + tag<T>()).c_str(), BM_cuda_step<T>, sh)
      ->UseManualTime()
      ->Unit(benchmark::kMillisecond);
}

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    std::printf("no CUDA device: nothing to measure\n");
    return 0;
  }
  cudaDeviceProp prop{};
  if (cudaGetDeviceProperties(&prop, 0) == cudaSuccess) benchmark::AddCustomContext("cuda_device", prop.name);
  for (const auto& sh : gpu::shapes()) {
    register_step<float>(sh);
    register_step<half>(sh);
    register_step<bfloat16>(sh);
    benchmark::RegisterBenchmark(("BM_cuda_step_separate/" + sh.name + "/bf16").c_str(),
                                 BM_cuda_step_separate<bfloat16>, sh)
        ->UseManualTime()
        ->Unit(benchmark::kMillisecond);
    for (const bool together : {true, false}) {
      if (sh.n_visual > 2880) break;  // 32 workspaces of a video step: too much memory
      benchmark::RegisterBenchmark(("BM_cuda_batch32/" + sh.name + "/bf16/" +
                                    (together ? "together" : "one_by_one")).c_str(),
                                   BM_cuda_batch32<bfloat16>, sh, together)
          ->UseManualTime()
          ->Unit(benchmark::kMillisecond);
    }
    benchmark::RegisterBenchmark(("BM_cuda_stage/" + sh.name + "/f32").c_str(), BM_cuda_stage, sh)
        ->UseManualTime()
        ->Unit(benchmark::kMillisecond);
    benchmark::RegisterBenchmark(("BM_cuda_qk/" + sh.name + "/f32").c_str(), BM_cuda_qk, sh)
        ->UseManualTime()
        ->Unit(benchmark::kMillisecond);
  }
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
