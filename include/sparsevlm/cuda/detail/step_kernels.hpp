// What every kernel of a pruning step on the device shares: the device-resident
// counts and flags (step_counts), the strided element views, and the building
// blocks (dot tiles, the bitonic sort, grid-stride indices). The stages' kernels
// are next to it, one file per stage: raters_kernels.hpp, scores_kernels.hpp,
// rank_kernels.hpp, keep_set_kernels.hpp, recycle_kernels.hpp, plan_kernels.hpp;
// pipeline.hpp launches them in order.
//
// Each kernel is a functor `body(b, smem)`, written once for any block context
// (core/block.hpp): nvcc runs it as a __global__ function (cuda/common.cuh), the
// CPU tests run the very same code on CPU threads (tests/test_core.cpp). Its
// members are the launch's arguments (device pointers, strides, host-known
// sizes); `b` is the block context, `smem` the block's dynamic shared memory.
// The counts that the data decide (raters R, rank, keep, recycled s, clusters c)
// stay on the device in a step_counts; a kernel reads them and sizes its grid for
// the worst case that the host knows (pipeline.hpp). Nothing here synchronises
// the device. Host-compilable: no CUDA header is needed to read or test them.
//
// Arithmetic: every value that a CPU stage computes is computed here with the
// same operations in the same order (the comment of each body names the CPU
// code it mirrors): dot products through core/dot.hpp, exp through
// core/exp.hpp, sums in one thread in the CPU's order, decisions and orders
// through core/math.hpp.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>

#include "../../core/block.hpp"
#include "../../core/dot.hpp"
#include "../../core/exp.hpp"
#include "../../core/math.hpp"
#include "../../dtype.hpp"

namespace sparsevlm::cuda::detail {

/// The shared rules (core/), under their short name for the kernel bodies.
namespace core = ::sparsevlm::detail::core;

using i64 = std::int64_t;

/// What went wrong in a step, as flags on the device (the CPU path throws the
/// matching sparsevlm::error).
enum step_flag : int {
  flag_embeds = 0,     ///< a rater logit is NaN/Inf (non-finite embeds, or an overflow)
  flag_scores = 1,     ///< a score is NaN/Inf (non-finite attention or q/k/lse)
  flag_hidden = 2,     ///< a hidden row that recycling merges holds NaN/Inf
  flag_raters = 3,     ///< caller raters not ascending or not text positions
  flag_count = 4
};

/// The device-resident state of one step: the counts the data decide, and the
/// flags. `length` is the new sequence length, or -1 when a flag is raised (the
/// plan kernels then leave every output untouched).
struct step_counts {
  i64 raters = 0;    ///< R
  i64 rank = 0;
  i64 keep = 0;      ///< keep count
  i64 recycled = 0;  ///< s, the recycled pruned tokens
  i64 clusters = 0;  ///< c
  i64 length = 0;    ///< the new sequence length, -1 on error
  i64 flags[flag_count] = {};
  /// Block arrivals of the kernels fused with a tail (with_tail), one word each.
  std::uint32_t arrivals[4] = {};
  /// A chained launch's (chain) block tickets, and the blocks of each of its
  /// phases that are done. Back to 0 when a chain ends, so the next one (the
  /// launches of a stream run one after another) starts from 0.
  std::uint32_t tickets = 0;
  std::uint32_t done[16] = {};
};

/// Phases a chained launch may hold (step_counts::done).
inline constexpr int max_phases = static_cast<int>(sizeof(step_counts::done) / sizeof(std::uint32_t));

/// The arrival words of step_counts: one per with_tail launch of a step.
enum arrival_slot : int { arrive_raters = 0, arrive_keep = 1, arrive_gram = 2, arrive_assign = 3 };

/// Whether a flag other than `own` is raised. A kernel that raises flag `own`
/// itself passes it, so that all threads of a block take the same branch (one
/// thread may raise it while another is still reading the flags).
SPARSEVLM_HD inline bool failed(const step_counts* c, int own = -1) noexcept {
  bool any = false;
  for (int f = 0; f < flag_count; ++f) any = any || (f != own && c->flags[f] != 0);
  return any;
}

/// [rows, cols] elements of T (float, half, bfloat16) with strides in elements.
template <class T>
struct rows2 {
  const T* p = nullptr;
  i64 s0 = 0, s1 = 0;
  SPARSEVLM_HD float at(i64 r, i64 c) const noexcept { return to_float(p[r * s0 + c * s1]); }
};

/// [a, b, c] elements of T with strides in elements.
template <class T>
struct rows3 {
  const T* p = nullptr;
  i64 s0 = 0, s1 = 0, s2 = 0;
  SPARSEVLM_HD float at(i64 a, i64 b, i64 c) const noexcept {
    return to_float(p[a * s0 + b * s1 + c * s2]);
  }
};

// ---- building blocks ---------------------------------------------------------

/// Depth staged through shared memory per step of a dot tile (a multiple of 16).
inline constexpr int tile_depth = 32;
/// Dot products (pairs) each thread of a dot tile owns.
inline constexpr int tile_pairs = 4;
/// Threads of a TILE×TILE dot tile.
template <int Tile>
inline constexpr int tile_threads = Tile * Tile / tile_pairs;
/// Shared memory of a dot tile, bytes (two staged blocks of rows, padded
/// against bank conflicts).
template <int Tile>
inline constexpr i64 tile_smem = 2 * Tile * (tile_depth + 1) * static_cast<i64>(sizeof(float));

/// The dot products of a Tile×Tile block of pairs: out(i, j, dot(A_i, B_j)) for
/// i < na, j < nb (tile-local indices), with the canonical arithmetic
/// (core/dot.hpp): Acc = float, 16 lanes with fma32; Acc = double, 8 lanes
/// with fma64 on the widened values. la(i, k) / lb(j, k) load element k of a
/// row as float (called only for i < na, k < depth). Needs at least
/// tile_threads<Tile> threads: thread t owns pairs t, t + nt, ... (at most
/// tile_pairs of them), so a block of more threads (a chained launch runs
/// every phase at the block size of its other kernels) gives each fewer pairs,
/// and a pair's dot product still runs in one thread in the canonical order.
///
/// Rows are staged tile_depth elements at a time; lane l of a pair still
/// accumulates elements l, l + lanes, ... in order across the stages, the
/// staged values past `depth` are zero, and lane groups that start at or past
/// `depth` are skipped: exactly the CPU's loop `for (k = 0; k < d; k += lanes)`.
///
/// Split = 2 (Acc = double only): the block computes only the lanes of parity
/// `half` (half, half + 2, ...) and out() receives core::reduce8_half of them;
/// the dot product is add_rn(half 0's, half 1's), the same bits (dot.hpp).
template <class Acc, int Tile, int Split = 1, class Block, class LA, class LB, class Out>
SPARSEVLM_HD void dot_tile(const Block& b, float* smem, i64 na, i64 nb, i64 depth, LA&& la,
                           LB&& lb, Out&& out, int half = 0) {
  static_assert(Split == 1 || (Split == 2 && std::is_same_v<Acc, double>),
                "only a float64 dot product's lanes split in two");
  constexpr int lanes = std::is_same_v<Acc, float> ? core::dot32_lanes : core::dot64_lanes;
  constexpr int own = lanes / Split;  // lanes this block accumulates: Split·j + half
  constexpr int ks = tile_depth + 1;  // padded row stride in shared memory
  float* sa = smem;
  float* sb = smem + Tile * ks;
  const i64 t = b.rank(), nt = b.size();
  const int l0 = Split == 1 ? 0 : half;
  Acc acc[tile_pairs][own];
  for (int q = 0; q < tile_pairs; ++q)
    for (int l = 0; l < own; ++l) acc[q][l] = Acc(0);
  for (i64 k0 = 0; k0 < depth; k0 += tile_depth) {
    for (i64 e = t; e < Tile * tile_depth; e += nt) {
      const i64 r = e / tile_depth, k = e % tile_depth;
      const bool kin = k0 + k < depth;
      sa[r * ks + k] = (r < na && kin) ? la(r, k0 + k) : 0.0f;
      sb[r * ks + k] = (r < nb && kin) ? lb(r, k0 + k) : 0.0f;
    }
    b.sync();
    for (int q = 0; q < tile_pairs; ++q) {
      const i64 p = t + q * nt;
      if (p >= Tile * Tile) break;
      const float* ra = sa + (p / Tile) * ks;
      const float* rb = sb + (p % Tile) * ks;
      for (int g = 0; g < tile_depth; g += lanes) {
        if (k0 + g >= depth) break;
        for (int l = 0; l < own; ++l) {
          const int k = g + Split * l + l0;
          if constexpr (std::is_same_v<Acc, float>) {
            acc[q][l] = core::fma32(ra[k], rb[k], acc[q][l]);
          } else {
            acc[q][l] = core::fma64(static_cast<double>(ra[k]), static_cast<double>(rb[k]), acc[q][l]);
          }
        }
      }
    }
    b.sync();
  }
  for (int q = 0; q < tile_pairs; ++q) {
    const i64 p = t + q * nt;
    const i64 i = p / Tile, j = p % Tile;
    if (p < Tile * Tile && i < na && j < nb) {
      if constexpr (std::is_same_v<Acc, float>) {
        out(i, j, core::reduce16(acc[q]));
      } else if constexpr (Split == 2) {
        out(i, j, core::reduce8_half(acc[q]));
      } else {
        out(i, j, core::reduce8(acc[q]));
      }
    }
  }
}

/// The Tile×Tile block (i0, j0) of a symmetric Gram matrix g (row stride ld) in
/// double (dot_tile with Acc = double): rows are load(r, k); only pairs with
/// i <= j are computed into both g[i][j] and g[j][i] (blocks below the diagonal
/// are the caller's to skip), so each pair is one number. Split = 2: only the
/// lanes of parity `half`, g receiving that half (dot_tile).
template <int Tile, int Split = 1, class Block, class Load>
SPARSEVLM_HD void gram_tile(const Block& b, float* smem, i64 i0, i64 j0, i64 na, i64 nb,
                            i64 depth, Load load, double* g, i64 ld, int half = 0) {
  dot_tile<double, Tile, Split>(
      b, smem, na, nb, depth, [load, i0](i64 r, i64 k) { return load(i0 + r, k); },
      [load, j0](i64 r, i64 k) { return load(j0 + r, k); },
      [g, ld, i0, j0](i64 i, i64 j, double v) {
        if (i0 + i > j0 + j) return;
        g[(i0 + i) * ld + j0 + j] = v;
        g[(j0 + j) * ld + i0 + i] = v;
      },
      half);
}

/// Sorts v[0, n) ascending in shared memory, n a power of two (bitonic network).
template <class Block>
SPARSEVLM_HD void bitonic_sort(const Block& b, double* v, i64 n) {
  for (i64 size = 2; size <= n; size <<= 1) {
    for (i64 stride = size >> 1; stride > 0; stride >>= 1) {
      for (i64 t = b.rank(); t < n / 2; t += b.size()) {
        const i64 i = 2 * stride * (t / stride) + t % stride;
        const i64 j = i + stride;
        const bool up = (i & size) == 0;
        const double x = v[i], y = v[j];
        if ((x > y) == up) {
          v[i] = y;
          v[j] = x;
        }
      }
      b.sync();
    }
  }
}

/// Global thread index and count of a 1-D grid (for grid-stride loops).
template <class Block>
SPARSEVLM_HD i64 thread_id(const Block& b) {
  return b.bx() * b.size() + b.rank();
}
template <class Block>
SPARSEVLM_HD i64 thread_count(const Block& b) {
  return b.gx() * b.size();
}

/// Resets the counts of a step (the first kernel of every step).
struct counts_reset {
  step_counts* counts;
  template <class Block>
  SPARSEVLM_HD void operator()(const Block& b, void*) const {
    if (thread_id(b) != 0) return;
    counts->raters = counts->rank = counts->keep = counts->recycled = counts->clusters = 0;
    counts->length = 0;
    for (int f = 0; f < flag_count; ++f) counts->flags[f] = 0;
    for (std::uint32_t& a : counts->arrivals) a = 0;
    counts->tickets = 0;
    for (std::uint32_t& d : counts->done) d = 0;
  }
};

/// Two one-block bodies in one launch: `first`, a barrier, then `then`, on the
/// same block (the rank's block goes on to the keep count). smem: the larger.
template <class First, class Then>
struct in_order {
  using first_type = First;
  using then_type = Then;
  First first;
  Then then;
  template <class Block>
  SPARSEVLM_HD void operator()(const Block& b, void* smem) const {
    first(b, smem);
    b.sync();
    then(b, smem);
  }
};

/// A kernel and the one-block kernel after it in one launch: `first` over the
/// launch's grid, then `then` in the block that finishes last
/// (core::last_block_to_arrive), as the only block of a one-block grid
/// (core::grid_block of one block), seeing every block's writes as it would after a kernel
/// boundary. One launch gap less; the same work and bits. The blocks are counted
/// in `counts->arrivals[slot]` (arrival_slot); the block's flag sits at byte
/// `flag_at` of its shared memory, past what either body uses (with_tail_smem).
template <class First, class Then>
struct with_tail {
  using first_type = First;
  using then_type = Then;
  First first;
  Then then;
  step_counts* counts;
  int slot;
  std::size_t flag_at;
  template <class Block>
  SPARSEVLM_HD void operator()(const Block& b, void* smem) const {
    first(b, smem);
    auto* flag = reinterpret_cast<std::uint32_t*>(static_cast<char*>(smem) + flag_at);
    if (core::last_block_to_arrive(b, &counts->arrivals[slot], flag))
      then(core::grid_block<Block>{b, 0, 0, 1, 1}, smem);
  }
};

/// Shared memory of a with_tail launch whose bodies need `first` and `then`
/// bytes: the larger, rounded up to 8, and 8 for the flag (at the returned
/// size minus 8).
inline std::size_t with_tail_smem(std::size_t first, std::size_t then) {
  const std::size_t m = first > then ? first : then;
  return (m + 7) / 8 * 8 + 8;
}

// ---- chained launches -----------------------------------------------------------

/// One phase of a chained launch: a kernel body and the grid it would have
/// been launched with, and the dynamic shared memory it needs.
template <class Body>
struct phase {
  Body body;
  i64 gx = 0, gy = 1;
  std::size_t smem = 0;
  [[nodiscard]] SPARSEVLM_HD i64 blocks() const noexcept { return gx > 0 && gy > 0 ? gx * gy : 0; }
};

/// The phases of a chained launch, in order (a list: nvcc's device code has no
/// std::tuple without relaxed constexpr).
template <class... Bodies>
struct phases;
template <>
struct phases<> {
  static constexpr int size = 0;
  template <class Block>
  SPARSEVLM_HD void run(const Block&, void*, i64, int, const std::uint32_t*, step_counts*) const {}
  template <class F>
  void each(F&&) const {}
};
template <class Head, class... Rest>
struct phases<Head, Rest...> {
  static constexpr int size = 1 + sizeof...(Rest);
  phase<Head> head;
  phases<Rest...> rest;

  /// Runs block v of the phases from index i on: the block waits for the earlier
  /// phases' blocks to be done (blocks[j] each), then runs its phase's body.
  template <class Block>
  SPARSEVLM_HD void run(const Block& b, void* smem, i64 v, int i, const std::uint32_t* blocks,
                        step_counts* counts) const {
    const i64 n = head.blocks();
    if (v >= n) {
      rest.run(b, smem, v - n, i + 1, blocks, counts);
      return;
    }
    // The nearest earlier phase with blocks: its blocks waited for the ones before
    // it (fences are cumulative), so its count covers every earlier phase.
    int j = i - 1;
    while (j >= 0 && blocks[j] == 0) --j;
    if (j >= 0) core::wait_for(b, &counts->done[j], blocks[j]);
    // The block as block (x, y) of the phase's own grid.
    head.body(core::grid_block<Block>{b, v % head.gx, v / head.gx, head.gx, head.gy}, smem);
  }
  /// f(phase) for each phase, in order (host: the launch plan, the totals).
  template <class F>
  void each(F&& f) const {
    f(head);
    rest.each(f);
  }
};

/// Phases as a list.
template <class... Bodies>
void assign_phases(phases<Bodies...>&) {}
template <class H, class... R, class... P>
void assign_phases(phases<H, R...>& out, const phase<H>& first, const P&... more) {
  out.head = first;
  assign_phases(out.rest, more...);
}
template <class... Bodies>
phases<Bodies...> phase_list(const phase<Bodies>&... p) {
  phases<Bodies...> out;
  assign_phases(out, p...);
  return out;
}

/// Two lists as one.
template <class... B>
void join_into(phases<B...>& out, const phases<>&, const phases<B...>& b) {
  out = b;
}
template <class H, class... R, class... A, class... B>
void join_into(phases<H, R...>& out, const phases<H, A...>& a, const phases<B...>& b) {
  out.head = a.head;
  join_into(out.rest, a.rest, b);
}
template <class... A, class... B>
phases<A..., B...> join(const phases<A...>& a, const phases<B...>& b) {
  phases<A..., B...> out;
  join_into(out, a, b);
  return out;
}

/// Kernels that run one after another, in one launch: a chain of phases. Each
/// block takes a ticket (core::block_ticket), which names the phase and the
/// block of that phase's grid it runs; before its body it waits until every
/// block of the earlier phases is done (core::wait_for), as a kernel boundary
/// would order them, and after it counts itself done (core::arrive). Tickets
/// are handed out in the order blocks start, so a waiting block only waits for
/// blocks that have started: no deadlock, whatever the device's occupancy, and
/// no cooperative launch. Each phase runs as in a launch of its own (its grid,
/// coordinates, shared memory), so the bits are the same; what goes is the
/// launch gaps between them. The block that finishes last puts the counters
/// back to 0. Needs the block size of every phase to be the launch's (the dot
/// tiles take any block of at least tile_threads<Tile> threads).
///
/// The ticket's shared word is the first 8 bytes of the block's shared memory,
/// which the phase's body may then use (block_ticket's second barrier), so a
/// chain needs no more shared memory than its largest phase.
///
/// Every buffer a phase writes is read by later phases of the same kernel, so
/// none may be read through a non-coherent path (__ldg, const __restrict__):
/// the CTest cuda.ptx_flags fails on ld.global.nc in the kernels.
template <class... Bodies>
struct chain {
  phases<Bodies...> list;
  std::uint32_t blocks[max_phases] = {};  ///< per phase
  int last = -1;                          ///< the last phase with blocks
  step_counts* counts = nullptr;

  template <class Block>
  SPARSEVLM_HD void operator()(const Block& b, void* smem) const {
    const std::uint32_t v = core::block_ticket(b, &counts->tickets, static_cast<std::uint32_t*>(smem));
    int p = 0;  // the phase of ticket v
    for (std::uint32_t first = 0; p < last && v >= first + blocks[p]; ++p) first += blocks[p];
    list.run(b, smem, v, 0, blocks, counts);
    if (core::arrive(b, &counts->done[p]) == blocks[last] && p == last) {
      // Every block has run: the earlier phases' before this phase began, this
      // phase's before its count reached its blocks. Fenced after those atomics,
      // as last_block_to_arrive's reset; the next kernel sees the zeros.
      core::reset_counter(&counts->tickets);
      for (int j = 0; j <= last; ++j) core::reset_counter(&counts->done[j]);
    }
  }
};

/// The chain of `list`: blocks per phase, the last phase with blocks, and the
/// shared memory of the launch (the largest phase's, at least the ticket's 8
/// bytes). Returns the blocks in all.
template <class... Bodies>
i64 make_chain(chain<Bodies...>& c, const phases<Bodies...>& list, step_counts* counts,
               std::size_t& smem) {
  static_assert(sizeof...(Bodies) <= max_phases, "a chain holds at most max_phases phases");
  c.list = list;
  c.counts = counts;
  i64 total = 0;
  std::size_t most = 0;
  int i = 0;
  list.each([&](const auto& ph) {
    const i64 n = ph.blocks();
    c.blocks[i] = static_cast<std::uint32_t>(n);
    if (n > 0) {
      c.last = i;
      most = most > ph.smem ? most : ph.smem;
    }
    total += n;
    ++i;
  });
  smem = most > 8 ? most : 8;
  return total;
}

/// One of two bodies chosen on the host: a dot-tile kernel at the small or the
/// large tile edge (pipeline::dot_tiles' choice), so that the choice is a value
/// and not a type, and a chain holding it is one kernel. Named as the large one.
template <class Small, class Big>
struct tile_choice {
  using named_type = Big;
  Small small;
  Big big;
  bool use_big = true;
  template <class Block>
  SPARSEVLM_HD void operator()(const Block& b, void* smem) const {
    if (use_big) {
      big(b, smem);
    } else {
      small(b, smem);
    }
  }
};

}  // namespace sparsevlm::cuda::detail
