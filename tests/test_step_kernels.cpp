// cuda/detail/step_kernels.hpp and the stage kernels beside it, launched in order
// by cuda/detail/pipeline.hpp: the CUDA step's bodies.
//
// The kernels and their launch sequence are written against a block context
// (core/block.hpp), so this file runs them on CPU threads (tests/cpu_grid.hpp:
// one std::thread per CUDA thread, a std::barrier for __syncthreads) and checks
// that the whole device pipeline decides exactly what prune_step decides, bit for
// bit, on every shared case and on the seeded in-tree ones (step_case.hpp's
// synthetic_cases).
// What this cannot check (the CUDA runtime, launch limits, the device's own
// exp) is left to tests/cuda/test_cuda.cu on a GPU machine.
#include <algorithm>
#include <array>
#include <mutex>
#include <barrier>
#include <cstring>
#include <limits>
#include <memory>
#include <thread>
#include <vector>

#include <sparsevlm/core/block.hpp>
#include <sparsevlm/core/dot.hpp>
#include <sparsevlm/core/eigen.hpp>
#include <sparsevlm/cuda/detail/batch.hpp>
#include <sparsevlm/cuda/detail/pipeline.hpp>
#include <sparsevlm/cuda/results.hpp>

#include "cpu_grid.hpp"
#include "step_case.hpp"
#include "test_util.hpp"

namespace core = sparsevlm::detail::core;
namespace kn = sparsevlm::cuda::detail;
namespace pl = sparsevlm::cuda::detail::pipeline;
using sparsevlm::index_t;

using svt::cpu_block;
using svt::cpu_exec;
using svt::run_grid;

namespace {

/// Host memory laid out as the device workspace.
struct host_workspace {
  std::vector<double> store;
  pl::buffers buf;
  explicit host_workspace(const pl::bounds& b) {
    const std::size_t bytes = pl::layout(b, nullptr, buf);
    store.assign(bytes / sizeof(double) + 64, std::numeric_limits<double>::quiet_NaN());
    // 256-byte alignment, as cudaMalloc gives.
    auto p = reinterpret_cast<std::uintptr_t>(store.data());
    void* base = reinterpret_cast<void*>((p + 255) / 256 * 256);
    CHECK(pl::layout(b, base, buf) == bytes);
  }
};

/// What the device pipeline produced, read back from (host) workspace memory.
struct pipeline_out {
  kn::step_counts counts;
  std::vector<index_t> raters, keep, sequence;
  std::vector<float> scores, merged;
  std::vector<std::vector<index_t>> clusters;
};

pipeline_out read_back(const pl::buffers& b, index_t N, index_t d) {
  pipeline_out o;
  o.counts = *b.counts;
  const auto& c = o.counts;
  o.raters.assign(b.raters, b.raters + c.raters);
  o.scores.assign(b.scores, b.scores + N);
  if (c.length < 0) return o;
  o.keep.assign(b.keep, b.keep + c.keep);
  o.sequence.assign(b.sequence, b.sequence + c.length);
  for (index_t q = 0; q < c.clusters; ++q)
    o.clusters.emplace_back(b.members + b.offsets[q], b.members + b.offsets[q + 1]);
  o.merged.assign(b.merged, b.merged + c.clusters * d);
  return o;
}

pl::decide_args decide_of(const sparsevlm::step_options& o) {
  pl::decide_args a;
  a.fixed = o.policy.kind == sparsevlm::keep_policy::kind_t::fixed;
  a.scale = o.policy.scale;
  a.bias = o.policy.bias;
  a.fixed_keep = o.policy.keep;
  a.recycle = o.recycle.enabled;
  a.fraction = o.recycle.fraction;
  a.divisor = o.recycle.cluster_divisor;
  return a;
}

pl::bounds bounds_of(const svt::flat_case& c, bool qk) {
  const auto& r = c.options.recycle;
  return pl::make_bounds(c.L, c.N, c.H, c.raters ? 0 : c.de, c.d, qk, r.enabled ? r.fraction : 0.0,
                         r.cluster_divisor);
}

/// Case `c`'s inputs in element type T, alive while its launches may still run.
template <class T>
struct held_case {
  std::vector<T> e, h, q, k, at;
};

/// Enqueues case `c` in element type T through the device pipeline on `ex`
/// (any executor: cpu_exec, or a batch_exec over it), into `ws`.
template <class T, class Ex>
void enqueue_case(Ex& ex, const svt::flat_case& c, bool qk, host_workspace& ws,
                  const pl::bounds& bd, held_case<T>& in) {
  in.e = svt::converted<T>(c.embeds);
  in.h = svt::converted<T>(c.hidden);
  pl::step_args<T, T> a;
  a.embeds = kn::rows2<T>{in.e.data(), c.de, 1};
  a.embed_dim = c.de;
  a.given = c.raters.has_value();
  if (a.given) {
    a.raters = c.raters->data();
    a.n_raters = static_cast<index_t>(c.raters->size());
  }
  a.hidden = kn::rows2<T>{in.h.data(), c.d, 1};
  a.hidden_dim = c.d;
  a.length = c.L;
  a.first_visual = c.S;
  a.n_visual = c.N;
  a.decide = decide_of(c.options);
  if (qk) {
    in.q = svt::converted<T>(c.q);
    in.k = svt::converted<T>(c.k);
    pl::qk_args<T, T> g;
    g.q = kn::rows3<T>{in.q.data(), c.L * c.dh, c.dh, 1};
    g.k = kn::rows3<T>{in.k.data(), c.L * c.dh, c.dh, 1};
    g.heads = c.H;
    g.kv_heads = c.Hkv;
    g.head_dim = c.dh;
    g.length = c.L;
    g.all_queries = true;
    g.q_rows = c.L;
    g.scale = 1.0f / std::sqrt(static_cast<float>(c.dh));
    pl::run_step(ex, a, g, bd, ws.buf);
  } else {
    in.at = svt::converted<T>(c.attn);
    pl::run_step(ex, a, kn::rows3<T>{in.at.data(), c.L * c.L, c.L, 1}, c.H, bd, ws.buf);
  }
}

/// Runs case `c` in element type T through the device pipeline on `ex`, into `ws`.
template <class T>
pipeline_out emulate(cpu_exec& ex, const svt::flat_case& c, bool qk, host_workspace& ws,
                     const pl::bounds& bd) {
  held_case<T> in;
  enqueue_case(ex, c, qk, ws, bd, in);
  return read_back(ws.buf, c.N, c.d);
}

/// Everything the step decides, compared with prune_step's result bit for bit.
void check_same(const pipeline_out& g, const sparsevlm::step_result& r) {
  CHECK(g.counts.length >= 0);
  for (int f = 0; f < kn::flag_count; ++f) CHECK(g.counts.flags[f] == 0);
  CHECK(g.raters == r.raters);
  CHECK(g.scores.size() == r.scores.size());
  CHECK(svt::same_bits(g.scores.data(), r.scores.data(), std::min(g.scores.size(), r.scores.size())));
  CHECK(g.counts.rank == r.rank);
  CHECK(g.counts.keep == r.keep_count);
  CHECK(g.keep == r.keep);
  CHECK(g.clusters == r.recycled.clusters);
  CHECK(g.merged.size() == r.recycled.merged.size());
  CHECK(svt::same_bits(g.merged.data(), r.recycled.merged.data(),
                  std::min(g.merged.size(), r.recycled.merged.size())));
  CHECK(g.sequence == r.sequence);
}

/// The shared cases (none, with a MESSAGE, in a clone without ../shared) and the
/// seeded in-tree ones (svt::synthetic_cases), so no test here compares nothing.
std::vector<svt::flat_case> cases() {
  static const std::vector<svt::flat_case> all = [] {
    std::vector<svt::flat_case> out;
#ifdef SPARSEVLM_TEST_CASES_DIR
    out = svt::load_flat_cases(SPARSEVLM_TEST_CASES_DIR);
#endif
    if (out.empty())
      MESSAGE("no shared case (CMake's SPARSEVLM_CASES_DIR, default ../shared/cases): only "
              "the in-tree cases are compared");
    for (auto& c : svt::synthetic_cases()) out.push_back(std::move(c));
    return out;
  }();
  REQUIRE(!all.empty());
  return all;
}

}  // namespace

TEST_CASE("step kernels: block bitonic sort and the keep-set scan") {
  std::mt19937 g(3);
  for (index_t n : {1, 2, 8, 64}) {
    std::vector<double> v(static_cast<std::size_t>(n));
    for (double& x : v) x = std::uniform_int_distribution<int>(0, 9)(g);  // many ties
    auto want = v;
    std::sort(want.begin(), want.end());
    run_grid([&](const cpu_block& b, void*) { kn::bitonic_sort(b, v.data(), n); }, 1, 1, 3, 0);
    CHECK(v == want);
  }
}

TEST_CASE("step kernels: the device pipeline, emulated on CPU threads, decides as prune_step on every case") {
  const auto all = cases();
  int compared = 0;
  for (const auto& c : all) {
    for (bool qk : {false, true}) {
      if (qk && !c.has_qk()) continue;
      for (svt::elem e : {svt::elem::f32, svt::elem::f16, svt::elem::bf16}) {
        INFO("case ", c.name, qk ? " (q/k)" : " (attn)", " ", svt::elem_name(e));
        sparsevlm::step_result want;
        try {
          want = svt::cpu_step(c, e, qk);
        } catch (const sparsevlm::error& err) {
          MESSAGE("CPU refuses this copy (", err.what(), "): skipped");
          continue;
        }
        const pl::bounds bd = bounds_of(c, qk);
        host_workspace ws(bd);
        cpu_exec ex;
        pipeline_out got;
        switch (e) {
          case svt::elem::f32: got = emulate<float>(ex, c, qk, ws, bd); break;
          case svt::elem::f16: got = emulate<sparsevlm::half>(ex, c, qk, ws, bd); break;
          case svt::elem::bf16: got = emulate<sparsevlm::bfloat16>(ex, c, qk, ws, bd); break;
        }
        check_same(got, want);
        ++compared;
      }
    }
  }
  CHECK(compared > 0);
}

TEST_CASE("step kernels: at LLaVA-1.5's and LLaVA-NeXT's token counts the emulation decides as prune_step") {
  // N 576 and 2880 behind a 35-token prefix, 60 question tokens: the rank kernel's
  // text bound, the recycled rows (173 and 865), the density rows' power-of-two
  // sort and the grid-stride loops at the sizes the GPU sees.
  int compared = 0;
  for (const auto& c : svt::model_shape_cases()) {
    for (bool qk : {false, true}) {
      INFO("case ", c.name, " N ", c.N, qk ? " (q/k)" : " (attn)");
      const sparsevlm::step_result want = svt::cpu_step(c, svt::elem::f32, qk);
      const pl::bounds bd = bounds_of(c, qk);
      host_workspace ws(bd);
      cpu_exec ex;
      // 32 threads a block at LLaVA-1.5's count; 8 at NeXT's, whose 865 recycled
      // rows make tens of thousands of 4×4 Gram tiles, each a block run: every
      // barrier of a CPU-thread block wakes each of its threads, so 32 threads
      // took 105 s of a 2-core machine (8: 45 s) and the same grids and bounds.
      ex.block = c.N > 1024 ? 8 : 32;
      ex.max_blocks = 16;
      const pipeline_out got = emulate<float>(ex, c, qk, ws, bd);
      check_same(got, want);
      CHECK(want.keep_count > 0);
      CHECK(want.keep_count < c.N);
      CHECK(!want.recycled.clusters.empty());
      ++compared;
    }
  }
  CHECK(compared == 6);
}

TEST_CASE("step kernels: the emulated pipeline with caller raters (and bad ones, flagged)") {
  const auto all = cases();
  int flagged = 0;
  for (const auto& c0 : all) {
    INFO("case ", c0.name);
    const auto chosen = svt::cpu_step(c0, svt::elem::f32, false).raters;
    svt::flat_case c = c0;
    c.raters = chosen;
    const auto want = svt::cpu_step(c, svt::elem::f32, false);
    const pl::bounds bd = bounds_of(c, false);
    CHECK(bd.embed_dim == 0);
    {
      host_workspace ws(bd);
      cpu_exec ex;
      check_same(emulate<float>(ex, c, false, ws, bd), want);
    }
    // A visual position, then a repeated one: check_raters refuses both.
    for (const std::vector<index_t>& bad :
         {std::vector<index_t>{c.S}, std::vector<index_t>{c.L - 1, c.L - 1}}) {
      if (c.S + c.N >= c.L) continue;
      c.raters = bad;
      host_workspace ws(bd);
      cpu_exec ex;
      const auto got = emulate<float>(ex, c, false, ws, bd);
      CHECK(got.counts.flags[kn::flag_raters] == 1);
      CHECK(sparsevlm::cuda::detail::status_of(got.counts).bad_raters);
      CHECK(got.counts.length == -1);
      ++flagged;
    }
  }
  CHECK(flagged > 0);
}

TEST_CASE("step kernels: the emulated q/k path with only the rater rows of q, and with an LSE") {
  const auto all = cases();
  int compared = 0;
  for (const auto& c : all) {
    // The pipeline below picks its raters from the embeddings (q holds their rows).
    if (!c.has_qk() || c.raters) continue;
    INFO("case ", c.name);
    const auto want = svt::cpu_step(c, svt::elem::f32, true);
    const index_t R = static_cast<index_t>(want.raters.size());
    if (R == 0) continue;
    // q_r[h][r] = q[h][raters[r]]; LSE of every query row over its causal keys.
    std::vector<float> qr(static_cast<std::size_t>(c.H * R * c.dh));
    for (index_t h = 0; h < c.H; ++h)
      for (index_t r = 0; r < R; ++r)
        for (index_t x = 0; x < c.dh; ++x)
          qr[static_cast<std::size_t>((h * R + r) * c.dh + x)] = c.q[static_cast<std::size_t>(
              (h * c.L + want.raters[static_cast<std::size_t>(r)]) * c.dh + x)];
    const float scale = 1.0f / std::sqrt(static_cast<float>(c.dh));
    std::vector<float> lse(static_cast<std::size_t>(c.H * c.L));
    for (index_t h = 0; h < c.H; ++h)
      for (index_t t = 0; t < c.L; ++t) {
        double mx = -INFINITY, sum = 0.0;
        std::vector<double> z(static_cast<std::size_t>(t + 1));
        for (index_t u = 0; u <= t; ++u) {
          double acc = 0.0;
          for (index_t x = 0; x < c.dh; ++x)
            acc += static_cast<double>(c.q[static_cast<std::size_t>((h * c.L + t) * c.dh + x)]) *
                   c.k[static_cast<std::size_t>(((h / (c.H / c.Hkv)) * c.L + u) * c.dh + x)];
          z[static_cast<std::size_t>(u)] = scale * acc;
          mx = std::max(mx, z[static_cast<std::size_t>(u)]);
        }
        for (double v : z) sum += std::exp(v - mx);
        lse[static_cast<std::size_t>(h * c.L + t)] = static_cast<float>(mx + std::log(sum));
      }
    using namespace sparsevlm;
    step_inputs_qk<float, float, float, float> host{
        matrix_view<const float>(c.embeds.data(), {c.L, c.de}),
        qk_view<float, float>{tensor3_view<const float>(c.q.data(), {c.H, c.L, c.dh}),
                              tensor3_view<const float>(c.k.data(), {c.Hkv, c.L, c.dh}),
                              matrix_view<const float>(lse.data(), {c.H, c.L}), 0.0},
        matrix_view<const float>(c.hidden.data(), {c.L, c.d}), visual_span{c.S, c.N}, std::nullopt};
    const step_result want_lse = prune_step(host, c.options);

    const pl::bounds bd = bounds_of(c, true);
    for (int variant = 0; variant < 3; ++variant) {
      pl::step_args<float, float> a;
      a.embeds = kn::rows2<float>{c.embeds.data(), c.de, 1};
      a.embed_dim = c.de;
      a.hidden = kn::rows2<float>{c.hidden.data(), c.d, 1};
      a.hidden_dim = c.d;
      a.length = c.L;
      a.first_visual = c.S;
      a.n_visual = c.N;
      a.decide = decide_of(c.options);
      pl::qk_args<float, float> g;
      g.k = kn::rows3<float>{c.k.data(), c.L * c.dh, c.dh, 1};
      g.heads = c.H;
      g.kv_heads = c.Hkv;
      g.head_dim = c.dh;
      g.length = c.L;
      g.scale = scale;
      if (variant < 2) {  // rater rows only (variant 1: q claims one row too many)
        g.q = kn::rows3<float>{qr.data(), R * c.dh, c.dh, 1};
        g.all_queries = false;
        g.q_rows = R + variant;
      } else {
        g.q = kn::rows3<float>{c.q.data(), c.L * c.dh, c.dh, 1};
        g.all_queries = true;
        g.q_rows = c.L;
        g.lse = lse.data();
        g.lse_s0 = c.L;
        g.lse_s1 = 1;
      }
      host_workspace ws(bd);
      cpu_exec ex;
      pl::run_step(ex, a, g, bd, ws.buf);
      const pipeline_out got = read_back(ws.buf, c.N, c.d);
      INFO("variant ", variant);
      if (variant == 0) check_same(got, want);
      if (variant == 1) CHECK((got.counts.length == -1 && got.counts.flags[kn::flag_scores] == 1));
      if (variant == 2) check_same(got, want_lse);
    }
    ++compared;
  }
  CHECK(compared > 0);
}

TEST_CASE("step kernels: the rank's global-memory fallback, other block shapes, either tile edge, blocks in reverse and one launch per kernel decide the same") {
  const auto all = cases();
  int fallback = 0;
  for (const auto& c : all) {
    INFO("case ", c.name);
    const auto want = svt::cpu_step(c, svt::elem::f32, false);
    const pl::bounds bd = bounds_of(c, false);
    for (int variant = 0; variant < 6; ++variant) {
      cpu_exec ex;
      if (variant >= 2) {
        // Every dot-tile kernel on the large tiles, or on the small ones; or the
        // blocks of every grid last to first (a fused tail runs in whichever
        // block finishes last).
        if (variant == 2) ex.wide = 1;
        if (variant == 3) ex.wide = std::int64_t{1} << 40;
        if (variant == 4) ex.reversed = true;
        // Or each phase as a launch of its own (set_chained_launches(false)).
        if (variant == 5) ex.chain = false;
        host_workspace ws(bd);
        check_same(emulate<float>(ex, c, false, ws, bd), want);
        CHECK((variant == 5) == (ex.launches > 3));
        continue;
      }
      // The rank kernel is launched for min(text after the span, N) rows.
      const pl::i64 m = std::min(pl::raters_bound(c.L, c.S, c.N), c.N);
      if (variant == 0) {
        ex.shared = pl::rank_shared_bytes(m) - 8;  // G does not fit: global memory
        ex.shared = std::max(ex.shared, pl::density_shared_bytes(bd.s_max));
        ex.shared = std::max<std::size_t>(ex.shared, kn::tile_smem<4>);
        if (pl::rank_shared_bytes(m) <= ex.shared) continue;
      } else {
        ex.block = 5;  // not a power of two
        ex.max_blocks = 1000;
      }
      host_workspace ws(bd);
      check_same(emulate<float>(ex, c, false, ws, bd), want);
      fallback += variant == 0;
    }
  }
  CHECK(fallback > 0);  // some case's G does not fit the shared memory given
}

TEST_CASE("step kernels: a step's chained launches with every block at once decide the same") {
  // Each launch's blocks all run at the same time, so the blocks of a phase
  // really wait for the earlier phases' blocks (the tickets, core::wait_for),
  // the with_tail counters and D's atomic maximum really race; the chains'
  // counters are back to 0 after each launch.
  const auto all = cases();
  int ran = 0;
  for (const auto& c : all) {
    if (ran == 6) break;
    for (bool qk : {false, true}) {
      if (qk && !c.has_qk()) continue;
      INFO("case ", c.name, qk ? " (q/k)" : " (attn)");
      const auto want = svt::cpu_step(c, svt::elem::f32, qk);
      const pl::bounds bd = bounds_of(c, qk);
      host_workspace ws(bd);
      cpu_exec ex;
      ex.concurrent = true;
      ex.block = 4;
      check_same(emulate<float>(ex, c, qk, ws, bd), want);
      CHECK(ex.launches == 3);
      const kn::step_counts& k = *ws.buf.counts;
      CHECK(k.tickets == 0);
      for (std::uint32_t d : k.done) CHECK(d == 0);
      for (std::uint32_t a : k.arrivals) CHECK(a == 0);
    }
    ++ran;
  }
  CHECK(ran == 6);
}

namespace {
/// A body that records which block of which launch it ran as.
struct where_body {
  int launch;
  std::vector<std::array<std::int64_t, 5>>* seen;
  std::mutex* m;
  template <class Block>
  void operator()(const Block& b, void*) const {
    if (b.rank() != 0) return;
    const std::lock_guard<std::mutex> lock(*m);
    seen->push_back({launch, b.bx(), b.by(), b.gx(), b.gy()});
  }
};
}  // namespace

TEST_CASE("step kernels: a batched grid runs every block of every launch once, at its own coordinates") {
  std::vector<std::array<std::int64_t, 5>> seen;
  std::mutex m;
  const std::int64_t grids[3][2] = {{3, 2}, {1, 1}, {4, 3}};
  kn::batched<where_body, 4> bt;
  bt.n = 3;
  bt.first[0] = 0;
  for (int k = 0; k < 3; ++k) {
    bt.bodies[k] = where_body{k, &seen, &m};
    bt.gx[k] = grids[k][0];
    bt.first[k + 1] = bt.first[k] + grids[k][0] * grids[k][1];
  }
  for (bool reversed : {false, true}) {
    seen.clear();
    cpu_exec ex;
    ex.reversed = reversed;
    ex.launch(bt, bt.first[3], 1, 2, 0);
    std::vector<std::array<std::int64_t, 5>> want;
    for (int k = 0; k < 3; ++k)
      for (std::int64_t y = 0; y < grids[k][1]; ++y)
        for (std::int64_t x = 0; x < grids[k][0]; ++x) want.push_back({k, x, y, grids[k][0], grids[k][1]});
    std::sort(seen.begin(), seen.end());
    std::sort(want.begin(), want.end());
    CHECK(seen == want);
  }
}

namespace {
/// A batchable body of ~10 KB (so a batched launch carries 3 of them) that
/// records where it ran, as where_body.
struct wide_body {
  int launch;
  std::vector<std::array<std::int64_t, 5>>* seen;
  std::mutex* m;
  std::array<char, 10000> pad;
  template <class Block>
  void operator()(const Block& b, void* s) const {
    where_body{launch, seen, m}(b, s);
  }
};
}  // namespace

template <>
inline constexpr bool sparsevlm::cuda::detail::batchable<wide_body> = true;

TEST_CASE("step kernels: batch_exec splits a group past batch_width, launches a lone one alone, and keeps each step's order") {
  static_assert(kn::batch_width<wide_body> == 3);
  std::vector<std::array<std::int64_t, 5>> seen;
  std::mutex m;
  kn::batch_exec<cpu_exec> ex;
  ex.reversed = true;
  // 7 steps: each a wide_body launch (launch index 0), then a where_body one
  // (index 1, not batchable: alone); step 6 has only its first.
  std::vector<std::array<std::int64_t, 5>> want;
  for (int st = 0; st < 7; ++st) {
    ex.begin_step();
    const std::int64_t gx = st + 1, gy = st % 2 + 1;
    ex.launch(wide_body{st, &seen, &m, {}}, gx, gy, 2, 0);
    for (std::int64_t y = 0; y < gy; ++y)
      for (std::int64_t x = 0; x < gx; ++x) want.push_back({st, x, y, gx, gy});
    if (st < 6) {
      ex.launch(where_body{100 + st, &seen, &m}, 1, 1, 2, 0);
      want.push_back({100 + st, 0, 0, 1, 1});
    }
  }
  CHECK(ex.launches == 0);
  ex.flush();
  // Index 0: 3 + 3 batched, then step 6 alone; index 1: six launches alone.
  CHECK(ex.launches == 3 + 6);
  // Every wide_body block ran before every where_body one (launch order kept).
  std::size_t first_where = seen.size();
  for (std::size_t i = 0; i < seen.size(); ++i)
    if (seen[i][0] >= 100 && first_where == seen.size()) first_where = i;
  for (std::size_t i = first_where; i < seen.size(); ++i) CHECK(seen[i][0] >= 100);
  std::sort(seen.begin(), seen.end());
  std::sort(want.begin(), want.end());
  CHECK(seen == want);
}

TEST_CASE("step kernels: a batch of steps, launch i of every step as one grid, decides as prune_step step by step") {
  // prune_batch_async's form (detail::batch_exec): ragged cases with their own
  // workspaces, recorded, then launched together; also with every block of a
  // batched grid at once, with blocks in reverse, and one launch per kernel.
  const auto all = cases();
  for (int variant = 0; variant < 4; ++variant) {
    for (bool qk : {false, true}) {
      INFO("variant ", variant, qk ? " (q/k)" : " (attn)");
      std::vector<const svt::flat_case*> picked;
      for (const auto& c : all)
        if (!qk || c.has_qk()) picked.push_back(&c);
      if (variant == 1)  // every block on a thread of its own: the smallest cases
        std::sort(picked.begin(), picked.end(),
                  [](const auto* a, const auto* b) { return a->L * a->N < b->L * b->N; });
      picked.resize(std::min<std::size_t>(picked.size(), variant == 1 ? 3 : 6));
      REQUIRE(picked.size() == (variant == 1 ? 3u : 6u));
      kn::batch_exec<cpu_exec> ex;
      ex.concurrent = variant == 1;
      if (ex.concurrent) ex.block = 4;
      ex.reversed = variant == 2;
      ex.chain = variant != 3;
      std::vector<std::unique_ptr<host_workspace>> ws;
      std::vector<held_case<float>> held(picked.size());
      for (std::size_t i = 0; i < picked.size(); ++i) {
        const pl::bounds bd = bounds_of(*picked[i], qk);
        ws.push_back(std::make_unique<host_workspace>(bd));
        ex.begin_step();
        enqueue_case(ex, *picked[i], qk, *ws.back(), bd, held[i]);
      }
      CHECK(ex.launches == 0);  // recorded, nothing run yet
      ex.flush();
      if (ex.chain) {
        CHECK(ex.launches == 3);  // every step's three launches, each as one grid
      } else {
        CHECK(ex.launches > 3 * static_cast<int>(picked.size()));
      }
      CHECK(ex.steps.empty());
      for (std::size_t i = 0; i < picked.size(); ++i) {
        const svt::flat_case& c = *picked[i];
        INFO("case ", c.name);
        check_same(read_back(ws[i]->buf, c.N, c.d), svt::cpu_step(c, svt::elem::f32, qk));
        const kn::step_counts& k = *ws[i]->buf.counts;
        CHECK(k.tickets == 0);  // each chain put its own counters back
        for (std::uint32_t d : k.done) CHECK(d == 0);
      }
    }
  }
}

TEST_CASE("step kernels: a workspace sized for a larger shape serves a smaller step; steps reuse it") {
  const auto all = cases();
  pl::bounds big;
  for (const auto& c : all) {
    const auto b = bounds_of(c, c.has_qk());
    big.length = std::max(big.length, b.length);
    big.visual = std::max(big.visual, b.visual);
    big.text = std::max(big.text, b.text);
    big.heads = std::max(big.heads, b.heads);
    big.embed_dim = std::max(big.embed_dim, c.de);
    big.hidden_dim = std::max(big.hidden_dim, b.hidden_dim);
    big.qk = true;
    big.s_max = std::max(big.s_max, b.s_max);
    big.c_max = std::max(big.c_max, b.c_max);
  }
  host_workspace ws(big);
  // Every case, one after another in the same workspace (a ragged batch run
  // sequence by sequence): the leftovers of one step never leak into the next.
  for (int round = 0; round < 2; ++round)
    for (const auto& c : all) {
      INFO("case ", c.name, " round ", round);
      const bool qk = round == 1 && c.has_qk();
      cpu_exec ex;
      // The kernels read their sizes from the step, the grids from the bounds.
      auto got = emulate<float>(ex, c, qk, ws, big);
      check_same(got, svt::cpu_step(c, svt::elem::f32, qk));
    }
}

TEST_CASE("step kernels: the plan gathers hidden states, position ids and K/V rows as plan.hpp does") {
  const auto all = cases();
  for (const auto& c : all) {
    INFO("case ", c.name);
    const auto want = svt::cpu_step(c, svt::elem::f32, false);
    const pl::bounds bd = bounds_of(c, false);
    host_workspace ws(bd);
    cpu_exec ex;
    emulate<float>(ex, c, false, ws, bd);
    const index_t n = static_cast<index_t>(want.sequence.size());
    const index_t ncl = static_cast<index_t>(want.recycled.clusters.size());
    // Hidden states in bfloat16: recycled rows come from the float32 means.
    const auto hb = svt::converted<sparsevlm::bfloat16>(c.hidden);
    std::vector<sparsevlm::bfloat16> out(static_cast<std::size_t>(c.L * c.d), sparsevlm::bfloat16{0x7fc1});
    kn::plan_gather<sparsevlm::bfloat16> gh{hb.data(), c.d, 0, 1, out.data(), c.d, 0, 1,
                                            c.L, 1, c.d, kn::recycled_rows::merged,
                                            ws.buf.merged, ws.buf.offsets, ws.buf.members,
                                            ws.buf.sequence, c.S, ws.buf.counts};
    pl::gather(ex, gh);
    std::vector<sparsevlm::bfloat16> ref(static_cast<std::size_t>(n * c.d));
    sparsevlm::apply_plan(std::span<const index_t>(want.sequence),
                          sparsevlm::matrix_view<const sparsevlm::bfloat16>(hb.data(), {c.L, c.d}),
                          sparsevlm::matrix_view<const float>(want.recycled.merged.data(), {ncl, c.d}),
                          sparsevlm::matrix_view<sparsevlm::bfloat16>(ref.data(), {n, c.d}));
    CHECK(svt::same_bits(out.data(), ref.data(), ref.size()));
    if (n < c.L) CHECK(out[static_cast<std::size_t>(n * c.d)].bits == 0x7fc1);  // rows past n untouched

    // Position ids [2, L] (two rows, as mRoPE's), keep_original: a recycled
    // token takes its cluster's first member's ids.
    std::vector<index_t> pos(static_cast<std::size_t>(2 * c.L)), pout(pos.size(), -7);
    for (index_t i = 0; i < c.L; ++i) {
      pos[static_cast<std::size_t>(i)] = i;
      pos[static_cast<std::size_t>(c.L + i)] = 1000 + 2 * i;
    }
    kn::plan_gather<index_t> gp{pos.data(), 1, 0, c.L, pout.data(), 1, 0, c.L,
                                c.L, 1, 2, kn::recycled_rows::first_member,
                                nullptr, ws.buf.offsets, ws.buf.members,
                                ws.buf.sequence, c.S, ws.buf.counts};
    pl::gather(ex, gp);
    std::vector<index_t> pref(static_cast<std::size_t>(2 * n));
    sparsevlm::pruned_positions(
        std::span<const index_t>(want.sequence), want.recycled.clusters,
        sparsevlm::matrix_view<const index_t>(pos.data(), {2, c.L}),
        sparsevlm::position_policy::keep_original,
        sparsevlm::matrix_view<index_t>(pref.data(), {2, n}));
    for (index_t r = 0; r < 2; ++r)
      for (index_t i = 0; i < n; ++i)
        CHECK(pout[static_cast<std::size_t>(r * c.L + i)] == pref[static_cast<std::size_t>(r * n + i)]);

    // Renumbered ids.
    std::vector<index_t> ren(static_cast<std::size_t>(c.L), -7);
    ex.launch(kn::plan_renumber{ren.data(), 0, 1, 1, c.L, ws.buf.counts}, ex.grid(c.L), 1,
              ex.threads(), 0);
    for (index_t i = 0; i < c.L; ++i) CHECK(ren[static_cast<std::size_t>(i)] == (i < n ? i : -7));

    // K/V rows [L, 2 heads, 3] of a layer before the step: recycled entries dropped.
    const index_t heads = 2, hd = 3;
    std::vector<float> kv(static_cast<std::size_t>(c.L * heads * hd)), kout(kv.size(), -1.0f);
    for (std::size_t i = 0; i < kv.size(); ++i) kv[i] = static_cast<float>(i);
    kn::plan_gather<float> gk{kv.data(), heads * hd, hd, 1, kout.data(), heads * hd, hd, 1,
                              c.L, heads, hd, kn::recycled_rows::drop,
                              nullptr, nullptr, nullptr, ws.buf.sequence, c.S, ws.buf.counts};
    pl::gather(ex, gk);
    const auto kseq = sparsevlm::kv_sequence(std::span<const index_t>(want.sequence));
    for (std::size_t i = 0; i < kseq.size(); ++i)
      for (index_t x = 0; x < heads * hd; ++x)
        CHECK(kout[i * static_cast<std::size_t>(heads * hd) + static_cast<std::size_t>(x)] ==
              kv[static_cast<std::size_t>(kseq[i] * heads * hd + x)]);
    if (static_cast<index_t>(kseq.size()) < c.L)
      CHECK(kout[kseq.size() * static_cast<std::size_t>(heads * hd)] == -1.0f);
  }
}

TEST_CASE("step kernels: a NaN flags the step (length -1) and the plan writes nothing") {
  const auto all = cases();
  int flagged = 0;
  for (const auto& c0 : all) {
    if (c0.raters || c0.N < 8) continue;
    for (int where = 0; where < 3; ++where) {
      svt::flat_case c = c0;
      const float nan = std::numeric_limits<float>::quiet_NaN();
      if (where == 0) c.embeds[static_cast<std::size_t>(c.S * c.de)] = nan;  // a visual embedding
      if (where == 1)  // every head's attention from every text row to visual token 0
        for (index_t h = 0; h < c.H; ++h)
          for (index_t t = c.S + c.N; t < c.L; ++t)
            c.attn[static_cast<std::size_t>((h * c.L + t) * c.L + c.S)] = nan;
      if (where == 2)  // every visual hidden row: recycling must meet one
        for (index_t j = 0; j < c.N; ++j) c.hidden[static_cast<std::size_t>((c.S + j) * c.d)] = nan;
      bool cpu_throws = false;
      try {
        (void)svt::cpu_step(c, svt::elem::f32, false);
      } catch (const sparsevlm::error&) {
        cpu_throws = true;
      }
      INFO("case ", c.name, " NaN in ", where == 0 ? "embeds" : where == 1 ? "attn" : "hidden");
      const pl::bounds bd = bounds_of(c, false);
      host_workspace ws(bd);
      cpu_exec ex;
      const auto got = emulate<float>(ex, c, false, ws, bd);
      CHECK((got.counts.length < 0) == cpu_throws);
      // The host decoding of cuda/results.hpp (what download() reports) names the
      // same stage: embeds, scores or hidden.
      const sparsevlm::cuda::step_status st = sparsevlm::cuda::detail::status_of(got.counts);
      CHECK(st.ok() == !cpu_throws);
      if (cpu_throws) {
        CHECK(st.non_finite_embeds == (where == 0));
        CHECK(st.non_finite_scores == (where == 1));
        CHECK(st.non_finite_hidden == (where == 2));
        CHECK_FALSE(st.bad_raters);
      }
      if (cpu_throws) {
        std::vector<float> out(static_cast<std::size_t>(c.L * c.d), 5.0f);
        kn::plan_gather<float> gh{c.hidden.data(), c.d, 0, 1, out.data(), c.d, 0, 1,
                                  c.L, 1, c.d, kn::recycled_rows::merged,
                                  ws.buf.merged, ws.buf.offsets, ws.buf.members,
                                  ws.buf.sequence, c.S, ws.buf.counts};
        pl::gather(ex, gh);
        CHECK(std::all_of(out.begin(), out.end(), [](float v) { return v == 5.0f; }));
        ++flagged;
      }
    }
  }
  CHECK(flagged > 0);
}
