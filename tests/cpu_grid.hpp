// CUDA thread blocks on CPU threads, for the tests that run the CUDA backend's
// kernel bodies (cuda/detail/*_kernels.hpp) without a GPU:
// one std::thread per CUDA thread, a std::barrier for __syncthreads.
#pragma once

#include <algorithm>
#include <barrier>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include <doctest/doctest.h>

#include <sparsevlm/core/block.hpp>
#include <sparsevlm/view.hpp>

namespace svt {

using sparsevlm::index_t;
namespace core = sparsevlm::detail::core;

/// A CUDA block on CPU threads.
struct cpu_block {
  index_t r, n, x, y, gxv, gyv;
  std::barrier<>* bar;
  index_t rank() const noexcept { return r; }
  index_t size() const noexcept { return n; }
  index_t bx() const noexcept { return x; }
  index_t by() const noexcept { return y; }
  index_t gx() const noexcept { return gxv; }
  index_t gy() const noexcept { return gyv; }
  void sync() const { bar->arrive_and_wait(); }
};

/// Runs `body` over a grid: the blocks one after another, each on `threads`
/// threads, in index order or (`reversed`) from the last block to the first, so
/// that a kernel that assumes an order of its blocks (the block that finishes
/// last being the last index, say) is caught. Shared memory is filled with 0xff
/// bytes (NaN) before every block, so a kernel that reads it before writing it
/// computes garbage.
template <class Body>
void run_grid(const Body& body, index_t gx, index_t gy, int threads, std::size_t smem,
              bool reversed = false) {
  std::vector<double> shared(smem / sizeof(double) + 1);
  std::barrier<> bar(threads);
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t)
    pool.emplace_back([&, t] {
      for (index_t yy = 0; yy < gy; ++yy)
        for (index_t xx = 0; xx < gx; ++xx) {
          const index_t y = reversed ? gy - 1 - yy : yy, x = reversed ? gx - 1 - xx : xx;
          if (t == 0) std::memset(shared.data(), 0xff, shared.size() * sizeof(double));
          bar.arrive_and_wait();
          body(cpu_block{t, threads, x, y, gx, gy, &bar}, static_cast<void*>(shared.data()));
          bar.arrive_and_wait();
        }
    });
  for (auto& th : pool) th.join();
}

/// Runs `body` over a grid with every block at once, each on `threads` threads
/// of its own (its own barrier and shared memory, filled with 0xff bytes): the
/// blocks of a chained launch then really wait for each other's phases and race
/// on the counters, tails and atomic maxima, as on a device.
template <class Body>
void run_grid_concurrent(const Body& body, index_t gx, index_t gy, int threads, std::size_t smem) {
  const index_t blocks = gx * gy;
  std::vector<std::vector<double>> shared(static_cast<std::size_t>(blocks),
                                          std::vector<double>(smem / sizeof(double) + 1));
  std::vector<std::unique_ptr<std::barrier<>>> bars;
  for (index_t i = 0; i < blocks; ++i) {
    std::memset(shared[static_cast<std::size_t>(i)].data(), 0xff,
                shared[static_cast<std::size_t>(i)].size() * sizeof(double));
    bars.push_back(std::make_unique<std::barrier<>>(threads));
  }
  std::vector<std::thread> pool;
  for (index_t i = 0; i < blocks; ++i)
    for (int t = 0; t < threads; ++t)
      pool.emplace_back([&, i, t] {
        body(cpu_block{t, threads, i % gx, i / gx, gx, gy, bars[static_cast<std::size_t>(i)].get()},
             static_cast<void*>(shared[static_cast<std::size_t>(i)].data()));
      });
  for (auto& th : pool) th.join();
}

/// The pipeline's executor on the CPU: small blocks and grids, so that every
/// grid-stride loop, tile edge and scan carry is exercised on the small cases.
struct cpu_exec {
  static constexpr int tile = 4;        // 4×4 dot tiles: tile_threads<4> = 4 threads
  static constexpr int small_tile = 2;  // 2×2 dot tiles: one thread, four pairs
  int block = 8;
  index_t max_blocks = 3;
  std::size_t shared = std::size_t{1} << 20;
  int launches = 0;

  index_t wide = 4;  // fewer 4×4 tiles than this take 2×2 ones (both occur in the cases)
  bool reversed = false;  // run each grid's blocks last to first
  bool concurrent = false;  // run every block of a grid at once (run_grid_concurrent)
  bool chain = true;  // a stage's phases in one chained launch (else one launch each)
  bool chained() const { return chain; }
  int threads() const { return block; }
  index_t wide_grid() const { return wide; }
  index_t grid(index_t n) const {
    return n <= 0 ? 0 : std::min<index_t>(core::ceil_div(n, block), max_blocks);
  }
  std::size_t max_shared() const { return shared; }
  template <class Body>
  void launch(const Body& body, index_t gx, index_t gy, int threads, std::size_t smem) {
    REQUIRE(smem <= shared);
    if (gx <= 0 || gy <= 0) return;
    ++launches;
    if (concurrent) {
      run_grid_concurrent(body, gx, gy, threads, smem);
    } else {
      run_grid(body, gx, gy, threads, smem, reversed);
    }
  }
};

}  // namespace svt
