// The CUDA backend against the CPU path, on a GPU. One binary, no doctest
// (its templated test cases do not build under nvcc): a small harness that
// counts failures. Exit status 77 when there is no usable device, which CTest
// reports as skipped (tests/CMakeLists.txt: SKIP_RETURN_CODE 77).
//
// Every shared case (SPARSEVLM_TEST_CASES_DIR) and seeded in-tree case (LLaVA-1.5, NeXT and
// video token counts among them) runs on the CPU (prune_step)
// and on the GPU (cuda::prune_step_async), in float32, float16 and bfloat16
// copies, from the attention and from q/k (all rows, rater rows only, and with
// an LSE), alone and as one ragged batch of 32; the results must be equal:
// raters, rank, keep count, keep set, clusters and sequence exactly, the
// scores and merged rows bit for bit (the arithmetic is shared: core/), and
// within the spec's tolerance as a fallback report. Then the plan's gathers
// against plan.hpp / positions.hpp / kv_cache.hpp (dense and paged), the pinned length slot, and
// the NaN flags, and a prefill session on device tensors (cuda::prune_layer). Everything runs on a non-blocking stream; then one workspace poisoned
// with 0xFF and reused across every shape, two host threads at once, the step captured
// in a CUDA graph and replayed, and a host pointer refused before anything is enqueued.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include <sparsevlm/cuda/kv_cache.cuh>
#include <sparsevlm/cuda/session.cuh>
#include <sparsevlm/cuda/step.cuh>
#include <sparsevlm/kv_cache.hpp>
#include <sparsevlm/plan.hpp>
#include <sparsevlm/positions.hpp>
#include <sparsevlm/session.hpp>
#include <sparsevlm/workspace.hpp>

#include "../../examples/cuda_device.hpp"
#include "../step_case.hpp"

namespace {

using sparsevlm::index_t;
namespace cu = sparsevlm::cuda;

int failures = 0;
int checks = 0;
std::string context;

#define EXPECT(cond)                                                                       \
  do {                                                                                     \
    ++checks;                                                                              \
    if (!(cond)) {                                                                         \
      ++failures;                                                                          \
      std::printf("FAIL %s:%d [%s] %s\n", __FILE__, __LINE__, context.c_str(), #cond);     \
    }                                                                                      \
  } while (0)

#define CUDA_OK(expr)                                                                      \
  do {                                                                                     \
    const cudaError_t e_ = (expr);                                                         \
    if (e_ != cudaSuccess) {                                                               \
      std::printf("CUDA error %s at %s:%d [%s]: %s\n", cudaGetErrorString(e_), __FILE__,   \
                  __LINE__, context.c_str(), #expr);                                       \
      std::exit(1);                                                                        \
    }                                                                                      \
  } while (0)

/// A device copy of a host vector (freed with the object).
template <class T>
struct dev {
  T* p = nullptr;
  std::size_t n = 0;
  dev() = default;
  explicit dev(std::size_t count) : n(count) {
    CUDA_OK(cudaMalloc(reinterpret_cast<void**>(&p), (n > 0 ? n : 1) * sizeof(T)));
  }
  explicit dev(const std::vector<T>& v) : dev(v.size()) {
    if (n > 0) CUDA_OK(cudaMemcpy(p, v.data(), n * sizeof(T), cudaMemcpyHostToDevice));
  }
  dev(const dev&) = delete;
  dev& operator=(const dev&) = delete;
  dev(dev&& o) noexcept : p(o.p), n(o.n) { o.p = nullptr; }
  ~dev() { cudaFree(p); }
  std::vector<T> get() const {
    std::vector<T> v(n);
    if (n > 0) CUDA_OK(cudaMemcpy(v.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost));
    return v;
  }
};

template <class T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0);
}

bool within_spec(const std::vector<float>& a, const std::vector<float>& b) {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i)
    if (!(std::fabs(static_cast<double>(a[i]) - b[i]) <= 1e-5 + 1e-4 * std::fabs(static_cast<double>(b[i]))))
      return false;
  return true;
}

/// Compares a downloaded GPU result with the CPU's.
void compare(const sparsevlm::step_result& g, const cu::step_status& st,
             const sparsevlm::step_result& c) {
  EXPECT(st.ok());
  EXPECT(g.raters == c.raters);
  EXPECT(g.rank == c.rank);
  EXPECT(g.keep_count == c.keep_count);
  EXPECT(g.keep == c.keep);
  EXPECT(g.recycled.clusters == c.recycled.clusters);
  EXPECT(g.sequence == c.sequence);
  EXPECT(within_spec(g.recycled.merged, c.recycled.merged));
  EXPECT(same_bits(g.recycled.merged, c.recycled.merged));
  EXPECT(same_bits(g.scores, c.scores));
}

/// One case's tensors on the device, in element type T.
template <class T>
struct device_case {
  dev<T> embeds, attn, hidden, q, k;
  dev<index_t> raters;
  explicit device_case(const svt::flat_case& c)
      : embeds(svt::converted<T>(c.embeds)),
        attn(svt::converted<T>(c.attn)),
        hidden(svt::converted<T>(c.hidden)),
        q(svt::converted<T>(c.q)),
        k(svt::converted<T>(c.k)),
        raters(c.raters ? *c.raters : std::vector<index_t>{}) {}

  sparsevlm::step_inputs<T, T, T> inputs(const svt::flat_case& c) const {
    using namespace sparsevlm;
    std::optional<std::span<const index_t>> r;
    if (c.raters) r = std::span<const index_t>(raters.p, c.raters->size());
    return {matrix_view<const T>(embeds.p, {c.L, c.de}, "embeds"),
            tensor3_view<const T>(attn.p, {c.H, c.L, c.L}, "attn"),
            matrix_view<const T>(hidden.p, {c.L, c.d}, "hidden"), visual_span{c.S, c.N}, r};
  }
  sparsevlm::step_inputs_qk<T, T, T, T> inputs_qk(const svt::flat_case& c) const {
    using namespace sparsevlm;
    std::optional<std::span<const index_t>> r;
    if (c.raters) r = std::span<const index_t>(raters.p, c.raters->size());
    return {matrix_view<const T>(embeds.p, {c.L, c.de}, "embeds"),
            qk_view<T, T>{tensor3_view<const T>(q.p, {c.H, c.L, c.dh}, "q"),
                          tensor3_view<const T>(k.p, {c.Hkv, c.L, c.dh}, "k"), std::nullopt, 0.0},
            matrix_view<const T>(hidden.p, {c.L, c.d}, "hidden"), visual_span{c.S, c.N}, r};
  }
};

/// Runs one step on the GPU (two-phase workspace), downloads it.
template <class Inputs>
sparsevlm::step_result gpu_step(const Inputs& in, const sparsevlm::step_options& opt,
                                cu::step_status& st, cudaStream_t stream, index_t* pinned) {
  std::size_t bytes = 0;
  cu::device_step step;
  CUDA_OK(cu::prune_step_async(in, opt, nullptr, bytes, step, nullptr, stream));
  dev<unsigned char> ws(bytes);
  CUDA_OK(cu::prune_step_async(in, opt, ws.p, bytes, step, pinned, stream));
  sparsevlm::step_result r;
  CUDA_OK(cu::download(step, r, st, stream));
  return r;
}

template <class T>
void run_case(const svt::flat_case& c, svt::elem e, cudaStream_t stream, index_t* pinned) {
  const device_case<T> d(c);
  for (bool qk : {false, true}) {
    if (qk && !c.has_qk()) continue;
    context = c.name + (qk ? " q/k " : " attn ") + svt::elem_name(e);
    sparsevlm::step_result want;
    try {
      want = svt::cpu_step(c, e, qk);
    } catch (const sparsevlm::error& err) {
      std::printf("note [%s]: the CPU refuses this copy (%s): skipped\n", context.c_str(), err.what());
      continue;
    }
    cu::step_status st;
    *pinned = -7;
    const auto got = qk ? gpu_step(d.inputs_qk(c), c.options, st, stream, pinned)
                        : gpu_step(d.inputs(c), c.options, st, stream, pinned);
    compare(got, st, want);
    EXPECT(*pinned == static_cast<index_t>(want.sequence.size()));  // download synchronised
  }
}

/// q holding only the rater rows, and an engine's LSE: the same decisions.
void run_qk_variants(const svt::flat_case& c, cudaStream_t stream) {
  // The variants below pick their raters from the embeddings (q holds their rows).
  if (!c.has_qk() || c.raters) return;
  const auto want = svt::cpu_step(c, svt::elem::f32, true);
  const index_t R = static_cast<index_t>(want.raters.size());
  if (R == 0) return;
  using namespace sparsevlm;
  // Rater rows only: q_r[h][r] = q[h][raters[r]].
  std::vector<float> qr(static_cast<std::size_t>(c.H * R * c.dh));
  for (index_t h = 0; h < c.H; ++h)
    for (index_t r = 0; r < R; ++r)
      for (index_t x = 0; x < c.dh; ++x)
        qr[static_cast<std::size_t>((h * R + r) * c.dh + x)] =
            c.q[static_cast<std::size_t>((h * c.L + want.raters[static_cast<std::size_t>(r)]) * c.dh + x)];
  // LSE of every query row over its causal keys (float32, natural log).
  const float scale = 1.0f / std::sqrt(static_cast<float>(c.dh));
  std::vector<float> lse(static_cast<std::size_t>(c.H * c.L));
  const index_t group = c.H / c.Hkv;
  for (index_t h = 0; h < c.H; ++h)
    for (index_t t = 0; t < c.L; ++t) {
      std::vector<double> z(static_cast<std::size_t>(t + 1));
      double mx = -INFINITY;
      for (index_t u = 0; u <= t; ++u) {
        double s = 0.0;
        for (index_t x = 0; x < c.dh; ++x)
          s += static_cast<double>(c.q[static_cast<std::size_t>((h * c.L + t) * c.dh + x)]) *
               c.k[static_cast<std::size_t>(((h / group) * c.L + u) * c.dh + x)];
        z[static_cast<std::size_t>(u)] = scale * s;
        mx = std::max(mx, z[static_cast<std::size_t>(u)]);
      }
      double sum = 0.0;
      for (double v : z) sum += std::exp(v - mx);
      lse[static_cast<std::size_t>(h * c.L + t)] = static_cast<float>(mx + std::log(sum));
    }
  const dev<float> e(c.embeds), hd(c.hidden), q(c.q), k(c.k), qrd(qr), lsed(lse);
  const matrix_view<const float> ev(e.p, {c.L, c.de}), hv(hd.p, {c.L, c.d});
  const tensor3_view<const float> kv(k.p, {c.Hkv, c.L, c.dh});
  {
    context = c.name + " q/k rater rows";
    step_inputs_qk<float, float, float, float> in{
        ev, qk_view<float, float>{tensor3_view<const float>(qrd.p, {c.H, R, c.dh}), kv, std::nullopt, 0.0},
        hv, visual_span{c.S, c.N}, std::nullopt};
    cu::step_status st;
    index_t slot = 0;
    compare(gpu_step(in, c.options, st, stream, &slot), st, want);
  }
  {
    context = c.name + " q/k with lse";
    step_inputs_qk<float, float, float, float> in{
        ev,
        qk_view<float, float>{tensor3_view<const float>(q.p, {c.H, c.L, c.dh}), kv,
                              matrix_view<const float>(lsed.p, {c.H, c.L}), 0.0},
        hv, visual_span{c.S, c.N}, std::nullopt};
    step_inputs_qk<float, float, float, float> host{
        matrix_view<const float>(c.embeds.data(), {c.L, c.de}),
        qk_view<float, float>{tensor3_view<const float>(c.q.data(), {c.H, c.L, c.dh}),
                              tensor3_view<const float>(c.k.data(), {c.Hkv, c.L, c.dh}),
                              matrix_view<const float>(lse.data(), {c.H, c.L}), 0.0},
        matrix_view<const float>(c.hidden.data(), {c.L, c.d}), visual_span{c.S, c.N}, std::nullopt};
    const auto want_lse = prune_step(host, c.options);
    cu::step_status st;
    index_t slot = 0;
    compare(gpu_step(in, c.options, st, stream, &slot), st, want_lse);
  }
}

/// A ragged batch of 32 steps (the cases in turn), one workspace, one stream.
void run_batch(const std::vector<svt::flat_case>& all, cudaStream_t stream, index_t* pinned) {
  if (all.empty()) return;
  context = "batch of 32";
  std::vector<std::unique_ptr<device_case<float>>> held;
  std::vector<sparsevlm::step_inputs<float, float, float>> steps;
  std::vector<sparsevlm::step_options> opts;
  std::vector<sparsevlm::step_result> want;
  for (int b = 0; b < 32; ++b) {
    const auto& c = all[static_cast<std::size_t>(b) % all.size()];
    held.push_back(std::make_unique<device_case<float>>(c));
    steps.push_back(held.back()->inputs(c));
    opts.push_back(c.options);
    want.push_back(svt::cpu_step(c, svt::elem::f32, false));
  }
  std::vector<cu::device_step> out(steps.size());
  std::size_t bytes = 0;
  using In = sparsevlm::step_inputs<float, float, float>;
  CUDA_OK(cu::prune_batch_async<In>(steps, opts, nullptr, bytes, out, nullptr, stream));
  dev<unsigned char> ws(bytes);
  CUDA_OK(cu::prune_batch_async<In>(steps, opts, ws.p, bytes, out, pinned, stream));
  CUDA_OK(cudaStreamSynchronize(stream));
  for (std::size_t b = 0; b < steps.size(); ++b) {
    context = "batch of 32, step " + std::to_string(b);
    sparsevlm::step_result r;
    cu::step_status st;
    CUDA_OK(cu::download(out[b], r, st, stream));
    compare(r, st, want[b]);
    EXPECT(pinned[b] == static_cast<index_t>(want[b].sequence.size()));
  }
}

/// The plan on the device: hidden states (bfloat16), position ids, K/V rows.
void run_plan(const svt::flat_case& c, cudaStream_t stream) {
  using namespace sparsevlm;
  context = c.name + " plan";
  const auto want = svt::cpu_step(c, svt::elem::f32, false);
  const device_case<float> d(c);
  std::size_t bytes = 0;
  cu::device_step step;
  CUDA_OK(cu::prune_step_async(d.inputs(c), c.options, nullptr, bytes, step, nullptr, stream));
  dev<unsigned char> ws(bytes);
  CUDA_OK(cu::prune_step_async(d.inputs(c), c.options, ws.p, bytes, step, nullptr, stream));
  const index_t n = static_cast<index_t>(want.sequence.size());
  const index_t ncl = static_cast<index_t>(want.recycled.clusters.size());

  const auto hb = svt::converted<bfloat16>(c.hidden);
  const dev<bfloat16> hin(hb);
  dev<bfloat16> hout(hb.size());
  CUDA_OK(cu::apply_plan_async(step, matrix_view<const bfloat16>(hin.p, {c.L, c.d}),
                               matrix_view<bfloat16>(hout.p, {c.L, c.d}), stream));
  std::vector<bfloat16> ref(static_cast<std::size_t>(n * c.d));
  apply_plan(std::span<const index_t>(want.sequence), matrix_view<const bfloat16>(hb.data(), {c.L, c.d}),
             matrix_view<const float>(want.recycled.merged.data(), {ncl, c.d}),
             matrix_view<bfloat16>(ref.data(), {n, c.d}));
  auto got = hout.get();
  got.resize(ref.size());
  EXPECT(same_bits(got, ref));

  std::vector<index_t> pos(static_cast<std::size_t>(3 * c.L));
  for (std::size_t i = 0; i < pos.size(); ++i) pos[i] = static_cast<index_t>(7 * i + 1);
  const dev<index_t> pin(pos);
  for (position_policy policy : {position_policy::renumber, position_policy::keep_original}) {
    dev<index_t> pout(pos.size());
    CUDA_OK(cu::pruned_positions_async(step, matrix_view<const index_t>(pin.p, {3, c.L}), policy,
                                       matrix_view<index_t>(pout.p, {3, c.L}), stream));
    std::vector<index_t> pref(static_cast<std::size_t>(3 * n));
    pruned_positions(std::span<const index_t>(want.sequence), want.recycled.clusters,
                     matrix_view<const index_t>(pos.data(), {3, c.L}), policy,
                     matrix_view<index_t>(pref.data(), {3, n}));
    const auto pg = pout.get();
    bool same = true;
    for (index_t r = 0; r < 3; ++r)
      for (index_t i = 0; i < n; ++i)
        same = same && pg[static_cast<std::size_t>(r * c.L + i)] == pref[static_cast<std::size_t>(r * n + i)];
    EXPECT(same);
  }

  // A [heads, L, dh] cache seen as [L, heads, dh].
  const index_t heads = 2, hd = 4;
  std::vector<float> kv(static_cast<std::size_t>(heads * c.L * hd));
  for (std::size_t i = 0; i < kv.size(); ++i) kv[i] = static_cast<float>(i);
  const dev<float> kin(kv);
  dev<float> kout(kv.size());
  CUDA_OK(cu::apply_plan_kv_async(
      step, tensor3_view<const float>(kin.p, {c.L, heads, hd}, {hd, c.L * hd, 1}),
      tensor3_view<float>(kout.p, {c.L, heads, hd}, {hd, c.L * hd, 1}), stream));
  const auto kg = kout.get();
  const auto kseq = kv_sequence(std::span<const index_t>(want.sequence));
  bool same = true;
  for (std::size_t i = 0; i < kseq.size(); ++i)
    for (index_t h = 0; h < heads; ++h)
      for (index_t x = 0; x < hd; ++x)
        same = same && kg[static_cast<std::size_t>(h * c.L * hd + static_cast<index_t>(i) * hd + x)] ==
                           kv[static_cast<std::size_t>(h * c.L * hd + kseq[i] * hd + x)];
  EXPECT(same);
}

/// The paged compaction on the device (cuda/kv_cache.cuh) against the CPU's
/// compact_paged_kv, with the step's own sequence as the device array: a
/// bfloat16 NHD cache with an int32 table and float32 recycled rows, an HND
/// float cache with an int64 table and the recycled-free sequence; then a
/// refused sequence (the CPU's error, the cache unchanged) and a host pointer.
void run_paged(const svt::flat_case& c, cudaStream_t stream) {
  using namespace sparsevlm;
  context = c.name + " paged";
  const auto want = svt::cpu_step(c, svt::elem::f32, false);
  const index_t heads = 2, hd = 5, bs = 16;
  const index_t pages = (c.L + bs - 1) / bs, blocks = pages + 3;
  std::vector<index_t> table64(static_cast<std::size_t>(pages));
  for (index_t j = 0; j < pages; ++j) table64[static_cast<std::size_t>(j)] = (j * 7 + 2) % blocks;
  // (j·7 + 2) mod blocks is a permutation when gcd(7, blocks) = 1; else shift by one page.
  if (blocks % 7 == 0)
    for (auto& b : table64) b = (b + 1) % blocks;
  const std::vector<std::int32_t> table32(table64.begin(), table64.end());
  const index_t ncl = static_cast<index_t>(want.recycled.clusters.size());
  std::vector<float> rec(static_cast<std::size_t>(ncl * heads * hd));
  for (std::size_t i = 0; i < rec.size(); ++i) rec[i] = 0.25f * static_cast<float>(i) - 3.0f;
  const std::size_t elems = static_cast<std::size_t>(blocks * bs * heads * hd);
  std::vector<float> base(elems);
  for (std::size_t i = 0; i < elems; ++i) base[i] = static_cast<float>(i % 977) - 400.0f;
  const dev<index_t> seq(want.sequence);
  const auto kseq = kv_sequence(std::span<const index_t>(want.sequence));
  const dev<index_t> kseq_d(kseq);
  const dev<float> rec_d(rec);
  const dev<std::int32_t> t32(table32);
  const dev<index_t> t64(table64);
  const index_t n = static_cast<index_t>(want.sequence.size());
  dev<unsigned char> ws(cu::compact_paged_kv_workspace_bytes<float>(n, heads, hd));
  cu::compact_status st;
  {  // bfloat16 NHD, int32 table, recycled rows
    const auto hb = svt::converted<bfloat16>(base);
    std::vector<bfloat16> ref = hb;
    compact_paged_kv(std::span<const index_t>(want.sequence),
                     strided_view<bfloat16, 4>(ref.data(), {blocks, bs, heads, hd}),
                     page_layout::blocks_tokens_heads_dim, std::span<const index_t>(table64),
                     tensor3_view<const float>(rec.data(), {ncl, heads, hd}));
    dev<bfloat16> cache(hb);
    CUDA_OK(cu::compact_paged_kv_async(
        seq.p, n, strided_view<bfloat16, 4>(cache.p, {blocks, bs, heads, hd}),
        page_layout::blocks_tokens_heads_dim, t32.p, pages,
        tensor3_view<const float>(rec_d.p, {ncl, heads, hd}), ws.p, ws.n, stream));
    CUDA_OK(cu::download_compact_status(ws.p, st, stream));
    EXPECT(st.ok());
    EXPECT(same_bits(cache.get(), ref));
  }
  {  // float HND, int64 table, the recycled-free sequence
    std::vector<float> ref = base;
    compact_paged_kv(std::span<const index_t>(kseq),
                     strided_view<float, 4>(ref.data(), {blocks, heads, bs, hd}),
                     page_layout::blocks_heads_tokens_dim, std::span<const index_t>(table64));
    const auto compact_hnd = [&](const index_t* seq_d, std::size_t n, float* cache_p) {
      CUDA_OK(cu::compact_paged_kv_async(
          seq_d, static_cast<index_t>(n), strided_view<float, 4>(cache_p, {blocks, heads, bs, hd}),
          page_layout::blocks_heads_tokens_dim, t64.p, pages, ws.p, ws.n, stream));
      CUDA_OK(cu::download_compact_status(ws.p, st, stream));
    };
    dev<float> cache(base);
    compact_hnd(kseq_d.p, kseq.size(), cache.p);
    EXPECT(st.ok());
    EXPECT(same_bits(cache.get(), ref));
    // A source below its index: refused on the device, the cache as it was.
    std::vector<index_t> bad(kseq.begin(), kseq.end());
    if (bad.size() >= 2) {
      std::swap(bad[0], bad[bad.size() - 1]);
      const dev<index_t> bad_d(bad);
      dev<float> cache2(base);
      compact_hnd(bad_d.p, bad.size(), cache2.p);
      EXPECT(!st.ok());
      std::string cpu_message, dev_message;
      try {
        std::vector<float> tmp = base;
        compact_paged_kv(std::span<const index_t>(bad),
                         strided_view<float, 4>(tmp.data(), {blocks, heads, bs, hd}),
                         page_layout::blocks_heads_tokens_dim, std::span<const index_t>(table64));
      } catch (const sparsevlm::error& e) {
        cpu_message = e.what();
      }
      try {
        st.raise();
      } catch (const sparsevlm::error& e) {
        dev_message = e.what();
      }
      EXPECT(!cpu_message.empty() && dev_message == cpu_message);
      EXPECT(same_bits(cache2.get(), base));
    }
    // A host table is refused before anything is enqueued.
    bool refused = false;
    try {
      (void)cu::compact_paged_kv_async(
          kseq_d.p, static_cast<index_t>(kseq.size()),
          strided_view<float, 4>(cache.p, {blocks, heads, bs, hd}),
          page_layout::blocks_heads_tokens_dim, table64.data(), pages, ws.p, ws.n, stream);
    } catch (const sparsevlm::error& e) {
      refused = std::string_view(e.what()).find("block_table") != std::string_view::npos;
    }
    EXPECT(refused);
  }
}

/// NaN in the attention: the step's length is −1 and the flag says why.
void run_flags(const svt::flat_case& c0, cudaStream_t stream) {
  if (c0.raters || c0.S + c0.N >= c0.L) return;
  svt::flat_case c = c0;
  for (index_t h = 0; h < c.H; ++h)
    for (index_t t = c.S + c.N; t < c.L; ++t)
      c.attn[static_cast<std::size_t>((h * c.L + t) * c.L + c.S)] = std::numeric_limits<float>::quiet_NaN();
  bool cpu_throws = false;
  try {
    (void)svt::cpu_step(c, svt::elem::f32, false);
  } catch (const sparsevlm::error&) {
    cpu_throws = true;
  }
  context = c.name + " NaN attention";
  const device_case<float> d(c);
  cu::step_status st;
  index_t slot = 0;
  const auto got = gpu_step(d.inputs(c), c.options, st, stream, &slot);
  EXPECT((slot == -1) == cpu_throws);
  EXPECT(st.non_finite_scores == cpu_throws);
}

/// One workspace, sized for the largest case and filled with 0xFF bytes (NaN and
/// -1 everywhere), serves every case in turn: nothing a step reads may come from an
/// earlier step or from memory no kernel of this step wrote.
void run_poisoned_reuse(const std::vector<svt::flat_case>& all, cudaStream_t stream) {
  std::size_t bytes = 0;
  for (const auto& c : all) {
    std::size_t n = 0;
    cu::device_step unused;
    const device_case<float> d(c);
    CUDA_OK(cu::prune_step_async(d.inputs(c), c.options, nullptr, n, unused, nullptr, stream));
    bytes = std::max(bytes, n);
  }
  dev<unsigned char> ws(bytes);
  CUDA_OK(cudaMemsetAsync(ws.p, 0xff, bytes, stream));
  for (int round = 0; round < 2; ++round)
    for (const auto& c : all) {
      context = c.name + " poisoned workspace, reused, round " + std::to_string(round);
      const device_case<float> d(c);
      std::size_t n = bytes;
      cu::device_step step;
      CUDA_OK(cu::prune_step_async(d.inputs(c), c.options, ws.p, n, step, nullptr, stream));
      sparsevlm::step_result r;
      cu::step_status st;
      CUDA_OK(cu::download(step, r, st, stream));
      compare(r, st, svt::cpu_step(c, svt::elem::f32, false));
    }
}

/// Two host threads on one device, each with its own non-blocking stream and
/// workspace, running different shapes at once (the shared-memory attribute and
/// the cached device limits are process-wide): the results of each must be the CPU's.
void run_two_threads(const std::vector<svt::flat_case>& all) {
  if (all.size() < 2) return;
  std::vector<sparsevlm::step_result> got[2];
  std::vector<cu::step_status> status[2];
  std::string error[2];
  const auto work = [&](int t) {
    try {
      cudaStream_t s = nullptr;
      if (cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking) != cudaSuccess) throw std::runtime_error("stream");
      for (int round = 0; round < 3; ++round)
        for (std::size_t i = static_cast<std::size_t>(t); i < all.size(); i += 2) {
          const auto& c = all[i];
          const device_case<float> d(c);
          cu::step_status st;
          got[t].push_back(gpu_step(d.inputs(c), c.options, st, s, nullptr));
          status[t].push_back(st);
        }
      cudaStreamDestroy(s);
    } catch (const std::exception& e) {
      error[t] = e.what();
    }
  };
  std::thread a(work, 0), b(work, 1);
  a.join();
  b.join();
  for (int t = 0; t < 2; ++t) {
    context = "thread " + std::to_string(t);
    EXPECT(error[t].empty());
    std::size_t k = 0;
    for (int round = 0; round < 3; ++round)
      for (std::size_t i = static_cast<std::size_t>(t); i < all.size() && k < got[t].size(); i += 2, ++k) {
        context = "thread " + std::to_string(t) + " " + all[i].name;
        compare(got[t][k], status[t][k], svt::cpu_step(all[i], svt::elem::f32, false));
      }
  }
}

/// prune_step_async captured into a CUDA graph (docs/cuda.md: no host
/// synchronisation, no allocation, so the whole step is capturable), replayed twice.
void run_graph(const svt::flat_case& c, cudaStream_t stream, index_t* pinned) {
  context = c.name + " CUDA graph";
  const device_case<float> d(c);
  std::size_t bytes = 0;
  cu::device_step step;
  CUDA_OK(cu::prune_step_async(d.inputs(c), c.options, nullptr, bytes, step, nullptr, stream));
  dev<unsigned char> ws(bytes);
  cudaGraph_t graph = nullptr;
  CUDA_OK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
  const cudaError_t launched = cu::prune_step_async(d.inputs(c), c.options, ws.p, bytes, step, pinned, stream);
  CUDA_OK(cudaStreamEndCapture(stream, &graph));
  CUDA_OK(launched);
  cudaGraphExec_t exec = nullptr;
  CUDA_OK(cudaGraphInstantiate(&exec, graph, 0));
  const auto want = svt::cpu_step(c, svt::elem::f32, false);
  for (int replay = 0; replay < 2; ++replay) {
    *pinned = -7;
    CUDA_OK(cudaGraphLaunch(exec, stream));
    sparsevlm::step_result r;
    cu::step_status st;
    CUDA_OK(cu::download(step, r, st, stream));
    compare(r, st, want);
    EXPECT(*pinned == static_cast<index_t>(want.sequence.size()));
  }
  CUDA_OK(cudaGraphExecDestroy(exec));
  CUDA_OK(cudaGraphDestroy(graph));
}

/// A host pointer is refused on the host, naming the argument, before anything is
/// enqueued, and the context stays usable (no sticky illegal-address error).
void run_host_pointer(const svt::flat_case& c, cudaStream_t stream) {
  context = c.name + " host pointer";
  const device_case<float> d(c);
  auto in = d.inputs(c);
  const std::vector<float> host_hidden = c.hidden;
  in.hidden = sparsevlm::matrix_view<const float>(host_hidden.data(), {c.L, c.d}, "hidden");
  std::size_t bytes = 0;
  cu::device_step step;
  CUDA_OK(cu::prune_step_async(in, c.options, nullptr, bytes, step, nullptr, stream));
  dev<unsigned char> ws(bytes);
  bool refused = false;
  try {
    (void)cu::prune_step_async(in, c.options, ws.p, bytes, step, nullptr, stream);
  } catch (const sparsevlm::error& e) {
    refused = std::string(e.what()).find("hidden") != std::string::npos;
  }
  EXPECT(refused);
  CUDA_OK(cudaStreamSynchronize(stream));
  EXPECT(cudaGetLastError() == cudaSuccess);
  cu::step_status st;
  compare(gpu_step(d.inputs(c), c.options, st, stream, nullptr), st,
          svt::cpu_step(c, svt::elem::f32, false));
}

}  // namespace

/// A prefill session on device tensors (cuda::prune_layer) against the same
/// session on the host (prefill_session::prune): one pruning layer with the
/// case's options and raters, the same plan (sequence, kv_sequence, spans,
/// positions, step decisions), the step's scores and merged rows bit for bit
/// from the device step, and the session moved on in the same way.
void run_session(const svt::flat_case& c, cudaStream_t stream) {
  using namespace sparsevlm;
  context = c.name + " session on device tensors";
  step_result want_step;
  try {
    want_step = svt::cpu_step(c, svt::elem::f32, false);
  } catch (const sparsevlm::error&) {
    return;  // a flagged step: run_flags covers it
  }
  session_config cfg;
  cfg.layers = 3;
  cfg.schedule = {{0, c.options}};
  const prefill_layout layout = prefill_layout::from_counts(c.S, c.N, c.L - c.S - c.N);
  prefill_session host(layout, std::span<const index_t>(want_step.raters), cfg);
  prefill_session on_gpu(layout, std::span<const index_t>(want_step.raters), cfg);
  workspace ws;
  const layer_plan want =
      host.prune(0, tensor3_view<const float>(c.attn.data(), {c.H, c.L, c.L}, "attn"),
                 matrix_view<const float>(c.hidden.data(), {c.L, c.d}, "hidden"), ws);
  const device_case<float> d(c);
  const tensor3_view<const float> attn(d.attn.p, {c.H, c.L, c.L}, "attn");
  const matrix_view<const float> hidden(d.hidden.p, {c.L, c.d}, "hidden");
  std::size_t bytes = 0;
  cu::device_step step;
  layer_plan got;
  CUDA_OK(cu::prune_layer(on_gpu, 0, attn, hidden, nullptr, bytes, step, got, stream));
  EXPECT(on_gpu.steps_done() == 0);  // the size query changes nothing
  dev<unsigned char> w(bytes);
  CUDA_OK(cudaMemsetAsync(w.p, 0xff, bytes, stream));
  CUDA_OK(cu::prune_layer(on_gpu, 0, attn, hidden, w.p, bytes, step, got, stream));
  EXPECT(got.step.raters == want.step.raters);
  EXPECT(got.step.rank == want.step.rank);
  EXPECT(got.step.keep == want.step.keep);
  EXPECT(got.step.recycled.clusters == want.step.recycled.clusters);
  EXPECT(got.step.sequence == want.step.sequence);
  EXPECT(got.step.scores.empty() && got.step.recycled.merged.empty());  // left on the device
  EXPECT(got.kv_sequence == want.kv_sequence);
  EXPECT(got.length == want.length);
  EXPECT(got.positions == want.positions);
  EXPECT(got.visual.start == want.visual.start && got.visual.len == want.visual.len);
  EXPECT(on_gpu.length() == host.length() && on_gpu.steps_done() == 1);
  EXPECT(std::vector<index_t>(on_gpu.raters().begin(), on_gpu.raters().end()) ==
         std::vector<index_t>(host.raters().begin(), host.raters().end()));
  step_result full;
  cu::step_status st;
  CUDA_OK(cu::download(step, full, st, stream));
  EXPECT(same_bits(full.scores, want.step.scores));
  EXPECT(same_bits(full.recycled.merged, want.step.recycled.merged));
  // The layer done, the session refuses it again, and stays as it is.
  bool refused = false;
  try {
    (void)cu::prune_layer(on_gpu, 0, attn, hidden, w.p, bytes, step, got, stream);
  } catch (const sparsevlm::error&) {
    refused = true;
  }
  EXPECT(refused && on_gpu.steps_done() == 1);
}

int main() {
  if (const int status = sparsevlm::examples::cuda_device_status(); status != 0) return status;
  cudaDeviceProp prop{};
  CUDA_OK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device 0: %s (sm_%d%d)\n", prop.name, prop.major, prop.minor);
#ifdef SPARSEVLM_TEST_CASES_DIR
  std::vector<svt::flat_case> all = svt::load_flat_cases(SPARSEVLM_TEST_CASES_DIR);
#else
  std::vector<svt::flat_case> all;
#endif
  if (all.empty())
    std::printf("no shared cases found (CMake's SPARSEVLM_CASES_DIR): the in-tree cases only\n");
  // The seeded in-tree cases too (step_case.hpp): GQA, caller raters, other shapes.
  for (auto& c : svt::synthetic_cases()) all.push_back(std::move(c));
  // Steps at LLaVA-1.5's and LLaVA-NeXT's token counts (N 576, 2880).
  for (auto& c : svt::model_shape_cases()) all.push_back(std::move(c));
  // And a video's (8 × 576 frames: N 4608, 1,383 recycled rows).
  for (auto& c : svt::video_shape_cases()) all.push_back(std::move(c));
  // A non-blocking stream: a kernel or copy that went to the legacy default
  // stream instead would not be ordered with the step's and would show as a mismatch.
  cudaStream_t stream = nullptr;
  CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  index_t* pinned = nullptr;
  CUDA_OK(cudaMallocHost(reinterpret_cast<void**>(&pinned), 32 * sizeof(index_t)));
  for (const auto& c : all) {
    run_case<float>(c, svt::elem::f32, stream, pinned);
    run_case<sparsevlm::half>(c, svt::elem::f16, stream, pinned);
    run_case<sparsevlm::bfloat16>(c, svt::elem::bf16, stream, pinned);
    run_qk_variants(c, stream);
    run_plan(c, stream);
    run_paged(c, stream);
    run_flags(c, stream);
    run_session(c, stream);
  }
  run_batch(all, stream, pinned);
  run_poisoned_reuse(all, stream);
  run_two_threads(all);
  run_graph(all.back(), stream, pinned);
  run_host_pointer(all.front(), stream);
  CUDA_OK(cudaFreeHost(pinned));
  CUDA_OK(cudaStreamDestroy(stream));
  std::printf("%d checks, %d failed, %zu cases\n", checks, failures, all.size());
  return failures == 0 ? 0 : 1;
}
