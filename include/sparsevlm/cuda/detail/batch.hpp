// A batch of independent steps launched together: launch i of every step (the
// counts reset, then each chain) as one grid, so that the steps' one-block
// phases (the rank's reduction, the clusters) overlap on the GPU instead of
// running one step after another. Used by prune_batch_async (cuda/step.cuh);
// any executor of pipeline.hpp can be wrapped, so the CPU tests run it too.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <type_traits>
#include <utility>
#include <vector>

#include "../launch_plan.hpp"
#include "step_kernels.hpp"

namespace sparsevlm::cuda::detail {

/// How many launches of a body of `bytes` one batched launch carries: as many
/// as its parameters hold (max_param_bytes, launch_plan.hpp), at most 32.
constexpr int batch_width_of(std::size_t bytes) {
  const std::size_t k = (max_param_bytes - 64) / (bytes + 3 * sizeof(std::int64_t));
  return static_cast<int>(k < 1 ? 1 : k > 32 ? 32 : k);
}
template <class Body>
inline constexpr int batch_width = batch_width_of(sizeof(Body));

/// Up to K launches of the same body as one grid: launch k's gx·gy blocks are
/// blocks [first[k], first[k + 1]) of it, each run as block (x, y) of launch
/// k's own grid (core::grid_block) with the launch's threads and shared memory,
/// so a body computes what it computes in a launch of its own. The launches
/// must be independent (steps with their own workspace slices): their blocks
/// run in any order and at once. A chain's tickets and waits use its own step's
/// counters, and a block waits only on blocks of its step that took a ticket
/// before it (so have started): no deadlock, as for one chain.
template <class Body, int K>
struct batched {
  Body bodies[K];
  std::int64_t first[K + 1];
  std::int64_t gx[K];
  int n = 0;

  template <class Block>
  SPARSEVLM_HD void operator()(const Block& b, void* smem) const {
    const std::int64_t v = b.bx();
    int k = 0;
    while (k + 1 < n && v >= first[k + 1]) ++k;
    const std::int64_t local = v - first[k], gy = (first[k + 1] - first[k]) / gx[k];
    bodies[k](core::grid_block<Block>{b, local % gx[k], local / gx[k], gx[k], gy}, smem);
  }
};

/// Whether a body is launched batched (a chain or the counts reset: what a
/// step's three launches are). Other bodies (the separate-launch form) are
/// launched one by one, so that no batched kernel is compiled for each of them.
/// A variable template, so a test can declare its own bodies batchable.
template <class Body>
inline constexpr bool batchable = requires(const Body& b) { b.list; } ||
                                  std::is_same_v<Body, counts_reset>;

/// pipeline.hpp's executor over `Exec` that records the launches of several
/// steps (begin_step before each) and launches them at flush(): launch i of
/// every step in one batched grid per body type (batch_width at a time), then
/// launch i + 1, so each step's launches keep their order. Everything else
/// (threads, grids, tiles, shared memory) is Exec's, so the steps' bodies and
/// bits are what Exec alone would give.
template <class Exec>
struct batch_exec : Exec {
  using Exec::Exec;

  struct record {
    /// Batchable bodies: flush_as<Body> (also what groups launches of one type).
    void (*flush)(Exec&, const record* const*, std::size_t) = nullptr;
    std::function<void(Exec&)> alone;                                    ///< the others
    std::vector<unsigned char> body;
    std::int64_t gx = 0, gy = 0;
    int threads = 0;
    std::size_t smem = 0;
  };
  std::vector<std::vector<record>> steps;  ///< per step, its launches in order

  void begin_step() { steps.emplace_back(); }

  template <class Body>
  void launch(const Body& body, std::int64_t gx, std::int64_t gy, int nthreads, std::size_t smem) {
    if (gx <= 0 || gy <= 0) return;  // as every executor: nothing to run
    if (steps.empty()) begin_step();
    record r;
    r.gx = gx;
    r.gy = gy;
    r.threads = nthreads;
    r.smem = smem;
    if constexpr (batchable<Body>) {
      static_assert(std::is_trivially_copyable_v<Body>, "a batched body is copied as bytes");
      r.flush = &flush_as<Body>;
      r.body.resize(sizeof(Body));
      std::memcpy(r.body.data(), &body, sizeof(Body));
    } else {
      r.alone = [body, gx, gy, nthreads, smem](Exec& ex) { ex.launch(body, gx, gy, nthreads, smem); };
    }
    steps.back().push_back(std::move(r));
  }

  /// Launches what was recorded (then forgets it): launch i of every step, in
  /// groups of one body type and block size, before launch i + 1.
  void flush() {
    Exec& ex = *this;
    std::size_t depth = 0;
    for (const auto& s : steps) depth = s.size() > depth ? s.size() : depth;
    std::vector<const record*> group;
    std::vector<bool> done;
    for (std::size_t i = 0; i < depth; ++i) {
      done.assign(steps.size(), false);
      for (std::size_t s = 0; s < steps.size(); ++s) {
        if (done[s] || i >= steps[s].size()) continue;
        const record& r = steps[s][i];
        if (!r.flush) {
          r.alone(ex);
          continue;
        }
        group.clear();
        for (std::size_t t = s; t < steps.size(); ++t)
          if (!done[t] && i < steps[t].size() && steps[t][i].flush == r.flush &&
              steps[t][i].threads == r.threads) {
            group.push_back(&steps[t][i]);
            done[t] = true;
          }
        r.flush(ex, group.data(), group.size());
      }
    }
    steps.clear();
  }

 private:
  template <class Body>
  static void flush_as(Exec& ex, const record* const* recs, std::size_t n) {
    constexpr int K = batch_width<Body>;
    for (std::size_t at = 0; at < n; at += K) {
      const int k = static_cast<int>(n - at < static_cast<std::size_t>(K) ? n - at : K);
      if (k == 1) {  // alone: its own launch, no wrapper
        Body body;
        std::memcpy(static_cast<void*>(&body), recs[at]->body.data(), sizeof(Body));
        ex.launch(body, recs[at]->gx, recs[at]->gy, recs[at]->threads, recs[at]->smem);
        continue;
      }
      batched<Body, K> bt;
      bt.n = k;
      bt.first[0] = 0;
      std::size_t smem = 0;
      for (int j = 0; j < k; ++j) {
        const record& r = *recs[at + static_cast<std::size_t>(j)];
        std::memcpy(static_cast<void*>(&bt.bodies[j]), r.body.data(), sizeof(Body));
        bt.gx[j] = r.gx;
        bt.first[j + 1] = bt.first[j] + r.gx * r.gy;
        smem = r.smem > smem ? r.smem : smem;
      }
      static_assert(sizeof(bt) <= max_param_bytes, "a batched launch's parameters");
      ex.launch(bt, bt.first[k], 1, recs[at]->threads, smem);
    }
  }
};

}  // namespace sparsevlm::cuda::detail
