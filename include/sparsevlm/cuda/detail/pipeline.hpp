// The CUDA backend's launch sequence, written once for any executor: the
// device one (cuda/common.cuh) enqueues the stage kernels (the *_kernels.hpp
// next to this file) on a stream, the tests' CPU executor (tests/test_core.cpp)
// runs them on threads.
// Host-compilable, so the order of launches, their grids and the workspace
// layout are tested without a GPU.
//
// An executor `ex` provides:
//   Exec::tile                      edge of the dot-product tiles (threads:
//                                   tile_threads<Exec::tile>)
//   Exec::small_tile                the edge used instead when Exec::tile gives
//                                   fewer than ex.wide_grid() blocks (dot_tiles)
//   ex.threads()                    threads of the other kernels' blocks
//   ex.grid(n)                      blocks for a grid-stride loop over n items
//   ex.max_shared()                 dynamic shared memory a block may use, bytes
//   ex.chained()                    whether a stage's phases run as one chained launch
//   ex.launch(body, gx, gy, threads, smem_bytes)   enqueue one kernel
// Launches with an empty grid are skipped by the executor.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <type_traits>

#include "keep_set_kernels.hpp"
#include "plan_kernels.hpp"
#include "rank_kernels.hpp"
#include "raters_kernels.hpp"
#include "recycle_kernels.hpp"
#include "scores_kernels.hpp"
#include "step_kernels.hpp"

// The kernels are the enclosing namespace's (cuda::detail); the launch
// sequence keeps its own, so that its stage names (rank, keep_set, begin_step ...)
// never hide the public launchers of sparsevlm::cuda.
namespace sparsevlm::cuda::detail::pipeline {

using i64 = std::int64_t;

/// Host-known upper bounds of a step (what the workspace is sized for).
struct bounds {
  i64 length = 0;     ///< L
  i64 visual = 0;     ///< N
  i64 text = 0;       ///< T <= L − N (R <= T)
  i64 heads = 0;      ///< H (q/k path)
  i64 embed_dim = 0;  ///< 0: raters are always given
  i64 hidden_dim = 0;
  bool qk = false;    ///< the q/k path is used
  i64 s_max = 0;      ///< recycled rows (0: recycling off)
  i64 c_max = 0;      ///< clusters
  [[nodiscard]] i64 m_max() const { return std::min(text, visual); }
};

/// The raters of a step are text tokens after its span, so R <= length − (S + N), and
/// the rank's Gram matrix is at most min(R, N) square: the bound the rank and q/k
/// kernels are launched for (bounds::text, which includes the prefix, sizes the
/// workspace for any span; at LLaVA-1.5's 35 + 576 + 60 tokens it is 95 against 60,
/// and G would not fit the 48 KB without opt-in).
inline i64 raters_bound(i64 length, i64 first_visual, i64 n_visual) {
  return std::max<i64>(length - first_visual - n_visual, 0);
}

/// s_max = min(N, floor(fraction·N) + 1) and c_max = floor(s_max / divisor) + 1
/// (at most s_max): the largest s and c any keep count can give, since both
/// grow with the pruned count n <= N.
inline bounds make_bounds(i64 length, i64 visual, i64 heads, i64 embed_dim, i64 hidden_dim,
                          bool qk, double recycle_fraction, double cluster_divisor) {
  bounds b;
  b.length = length;
  b.visual = visual;
  b.text = std::max<i64>(length - visual, 0);
  b.heads = heads;
  b.embed_dim = embed_dim;
  b.hidden_dim = hidden_dim;
  b.qk = qk;
  if (recycle_fraction > 0.0 && visual > 0) {
    b.s_max = core::recycle_count(visual, recycle_fraction);
    b.c_max = core::cluster_count(b.s_max, cluster_divisor > 1.0 ? cluster_divisor : 1.0);
  }
  return b;
}

/// The recycled rows' Gram matrix splits each dot product's lanes over two
/// blocks (recycle_gram's G2) up to this many rows: there 16×16 tiles give at
/// most 136 blocks on or above the diagonal, about one an SM of an H100, and the
/// split doubles them. Above it the tiles alone fill the GPU. The bound is a
/// constant, not the device's, so the workspace layout depends on the shape only.
inline constexpr i64 lane_split_rows = 256;

/// Whether recycle_phases splits the Gram's lanes at this s_max.
inline bool gram_lane_split(i64 s_max) { return s_max > 0 && s_max <= lane_split_rows; }

/// Where each buffer of a step lives (device pointers into the workspace).
/// Outputs that outlive the step's kernels: counts, raters, scores, keep,
/// offsets, members, merged, sequence (read by the plan kernels and by
/// download()). The rest is scratch, and the stages' scratch shares one region.
struct buffers {
  step_counts* counts = nullptr;
  i64* raters = nullptr;    ///< [T]
  float* P = nullptr;       ///< [T, N]
  float* scores = nullptr;  ///< [N]
  i64* pos = nullptr;       ///< [N] each token's place in the score order
  i64* order = nullptr;     ///< [N] tokens by score order
  i64* keep = nullptr;      ///< [N] kept positions, ascending
  i64* offsets = nullptr;   ///< [c_max + 1]
  i64* members = nullptr;   ///< [s_max]
  float* merged = nullptr;  ///< [c_max, d]
  i64* sequence = nullptr;  ///< [L]
  // scratch of the raters stage
  float* logits = nullptr;  ///< [N, T]
  double* row_max = nullptr;
  double* row_sum = nullptr;  ///< [N]
  double* m = nullptr;        ///< [T]
  // scratch of the q/k scores
  float* z = nullptr;  ///< [H, T, L]
  double* z_offset = nullptr;
  double* z_sum = nullptr;  ///< [H, T]
  // scratch of the rank
  double* G = nullptr;    ///< [m_max²]
  double* eig = nullptr;  ///< [2·m_max]
  // scratch of recycling
  double* D = nullptr;     ///< [s_max²] the Gram matrix, then D over it
  double* D2 = nullptr;    ///< [min(s_max, lane_split_rows)²] the Gram's odd lanes (gram_lane_split)
  double* diag = nullptr;  ///< [s_max]
  double* rho = nullptr;
  double* gamma = nullptr;
  std::uint64_t* dmax = nullptr;  ///< [1] the bits of D's maximum (core::max_nonnegative)
  i64* gpos = nullptr;
  i64* centres = nullptr;
  i64* label = nullptr;
};

inline constexpr std::size_t alignment = 256;

/// Bump allocation over `base` (or counting only, when base is null).
struct carver {
  unsigned char* base;
  std::size_t off = 0;
  template <class T>
  T* take(i64 n) {
    off = (off + alignment - 1) / alignment * alignment;
    T* p = base ? reinterpret_cast<T*>(base + off) : nullptr;
    off += static_cast<std::size_t>(n > 0 ? n : 0) * sizeof(T);
    return p;
  }
};

/// Lays the buffers of a step with bounds `b` over `base` and returns the bytes
/// they take; with base == nullptr only the size (the workspace size query: the
/// same routine computes both, so they cannot disagree). Every buffer grows
/// with every bound, so a workspace sized for larger bounds fits a smaller step.
inline std::size_t layout(const bounds& b, void* base, buffers& out) {
  carver c{static_cast<unsigned char*>(base)};
  const i64 N = b.visual, T = b.text, L = b.length, d = b.hidden_dim;
  out.counts = c.take<step_counts>(1);
  out.raters = c.take<i64>(T);
  out.P = c.take<float>(T * N);
  out.scores = c.take<float>(N);
  out.pos = c.take<i64>(N);
  out.order = c.take<i64>(N);
  out.keep = c.take<i64>(N);
  out.offsets = c.take<i64>(b.c_max + 1);
  out.members = c.take<i64>(b.s_max);
  out.merged = c.take<float>(b.c_max * d);
  out.sequence = c.take<i64>(L);
  // One region for the stages' scratch: each stage's buffers start at its base.
  const std::size_t scratch = c.off;
  std::size_t end = scratch;
  const auto stage = [&](auto&& fill) {
    c.off = scratch;
    fill();
    end = std::max(end, c.off);
  };
  stage([&] {
    if (b.embed_dim > 0) {
      out.logits = c.take<float>(N * T);
      out.row_max = c.take<double>(N);
      out.row_sum = c.take<double>(N);
      out.m = c.take<double>(T);
    }
  });
  stage([&] {
    if (b.qk) {
      out.z = c.take<float>(b.heads * T * L);
      out.z_offset = c.take<double>(b.heads * T);
      out.z_sum = c.take<double>(b.heads * T);
    }
  });
  stage([&] {
    out.G = c.take<double>(b.m_max() * b.m_max());
    out.eig = c.take<double>(2 * b.m_max());
  });
  stage([&] {
    out.D = c.take<double>(b.s_max * b.s_max);
    // Taken at every s_max (not only where it is used) so that the layout grows
    // with every bound: a workspace sized for a larger s_max fits a smaller one.
    const i64 s2 = std::min(b.s_max, lane_split_rows);
    out.D2 = c.take<double>(s2 * s2);
    out.diag = c.take<double>(b.s_max);
    out.rho = c.take<double>(b.s_max);
    out.gamma = c.take<double>(b.s_max);
    out.dmax = c.take<std::uint64_t>(1);
    out.gpos = c.take<i64>(b.s_max);
    out.centres = c.take<i64>(b.c_max);
    out.label = c.take<i64>(b.s_max);
  });
  return (end + alignment - 1) / alignment * alignment;
}

/// Shared memory the rank kernel needs to hold G (m_max² + 2·m_max doubles, and
/// the block's core::eigen_shared).
inline std::size_t rank_shared_bytes(i64 m_max) {
  return static_cast<std::size_t>(m_max * m_max + 2 * m_max + core::eigen_shared) *
         sizeof(double);
}

/// Shared memory the density kernel needs: one row of D, padded to a power of two.
inline std::size_t density_shared_bytes(i64 s_max) {
  return static_cast<std::size_t>(s_max > 0 ? core::pow2_at_least(s_max) : 0) * sizeof(double);
}

/// A dot-tile kernel over a rows × cols grid of pairs as a phase: make(tile)
/// builds its body for a tile edge (std::integral_constant<int, edge>), and the
/// grid is (⌈rows/edge⌉, ⌈cols/edge⌉). The edge is Exec::tile, or Exec::small_tile
/// when the large tiles would give fewer than ex.wide_grid() blocks (at LLaVA
/// sizes the recycled rows' Gram takes 36 blocks of 32×32: a quarter of an H100),
/// so that 4× the blocks share the work. Either way the block has ex.threads()
/// threads (at least tile_threads<Exec::tile>), each pair's dot product runs in
/// one thread in the canonical order, and the edge changes which block computes
/// a pair, never its bits. Both edges are in the body (tile_choice), so the
/// choice is a value.
///
/// With `tail` (a one-block body needing `tail_smem` bytes), each edge's body is
/// a with_tail: the tail runs in the last tile block to finish.
template <class Exec, class Make, class Tail = std::nullptr_t>
auto dot_tiles(Exec& ex, i64 rows, i64 cols, Make&& make, const Tail& tail = nullptr,
               step_counts* counts = nullptr, int slot = 0, std::size_t tail_smem = 0) {
  constexpr int big = Exec::tile, small = Exec::small_tile;
  static_assert(tile_threads<big> <= 1024 && tile_threads<small> <= tile_threads<big>);
  // Fewer threads would leave pairs of the tile uncomputed (dot_tile).
  if (ex.threads() < tile_threads<big>)
    throw std::logic_error("pipeline::dot_tiles: the executor's blocks are smaller than a tile's threads");
  const auto body = [&](auto edge) {
    if constexpr (std::is_same_v<Tail, std::nullptr_t>) {
      return make(edge);
    } else {
      constexpr int t = decltype(edge)::value;
      const std::size_t both = with_tail_smem(static_cast<std::size_t>(tile_smem<t>), tail_smem);
      return with_tail<decltype(make(edge)), Tail>{make(edge), tail, counts, slot, both - 8};
    }
  };
  const auto smem_of = [&](int t) {
    const auto own = static_cast<std::size_t>(t == big ? tile_smem<big> : tile_smem<small>);
    return std::is_same_v<Tail, std::nullptr_t> ? own : with_tail_smem(own, tail_smem);
  };
  using S = decltype(body(std::integral_constant<int, small>{}));
  using B = decltype(body(std::integral_constant<int, big>{}));
  const bool use_big = core::ceil_div(rows, big) * core::ceil_div(cols, big) >= ex.wide_grid();
  const int t = use_big ? big : small;
  return phase<tile_choice<S, B>>{
      tile_choice<S, B>{body(std::integral_constant<int, small>{}),
                        body(std::integral_constant<int, big>{}), use_big},
      rows > 0 && cols > 0 ? core::ceil_div(rows, t) : 0, core::ceil_div(cols, t), smem_of(t)};
}

/// Launches `list` as one chained launch (chain) of ex.threads() threads, or,
/// when !ex.chained(), each phase with blocks as a launch of its own (the same
/// bodies, grids and bits; a kernel boundary between phases).
template <class Exec, class... Bodies>
void launch_chain(Exec& ex, const phases<Bodies...>& list, step_counts* counts) {
  if (!ex.chained()) {
    list.each([&](const auto& ph) {
      if (ph.blocks() > 0) ex.launch(ph.body, ph.gx, ph.gy, ex.threads(), ph.smem);
    });
    return;
  }
  chain<Bodies...> c;
  std::size_t smem = 0;
  const i64 total = make_chain(c, list, counts, smem);
  ex.launch(c, total, 1, ex.threads(), smem);
}

/// A phase of `n` blocks of ex.threads() threads (n <= 0: none).
template <class Body>
phase<Body> phase_of(const Body& body, i64 n, std::size_t smem = 0, i64 gy = 1) {
  return phase<Body>{body, n > 0 ? n : 0, gy, smem};
}

// ---- the stages, as phases ----------------------------------------------------
// Each stage is a list of phases, launched as one chain by its own launcher
// (raters.cuh ... plan.cuh) and joined with the others by run_step: a step is
// three launches (reset, then the raters and scores, then the rest).

/// Zeroes the counts and flags (first kernel of a step; the chains' counters
/// live in the counts, so it is a launch of its own).
template <class Exec>
void reset(Exec& ex, const buffers& buf) {
  ex.launch(counts_reset{buf.counts}, 1, 1, 1, 0);
}

/// Stage 1 (raters.hpp): with `given`, the caller's n_given raters (device array of
/// absolute positions, checked on the device: flag_raters); else from the
/// embeddings: logits, row softmax statistics, column means and the choice (in
/// the last block of the column means; alone when no text follows the span).
/// The phases of the other form have no blocks.
template <class Exec, class TE>
auto raters_phases(Exec& ex, bool given, const i64* raters, i64 n_given, rows2<TE> embeds,
                   i64 length, i64 first_visual, i64 n_visual, i64 embed_dim, const buffers& buf) {
  const i64 first_text = first_visual + n_visual, T = length - first_text;
  const bool pick = !given && T > 0;
  const std::size_t means_smem =
      with_tail_smem(static_cast<std::size_t>(ex.threads()) * sizeof(double), 0);
  return phase_list(
      phase_of(rater_copy{raters, n_given, first_text, length, buf.raters, buf.counts},
               given ? std::max<i64>(ex.grid(n_given), 1) : 0),
      dot_tiles(ex, pick ? n_visual : 0, T,
                [&](auto edge) {
                  return rater_logits<TE, decltype(edge)::value>{
                      embeds, first_visual, n_visual, first_text, T, embed_dim, buf.logits,
                      buf.counts};
                }),
      phase_of(rater_row_stats{buf.logits, n_visual, T, buf.row_max, buf.row_sum},
               pick ? ex.grid(n_visual) : 0),
      phase_of(with_tail<rater_column_means, rater_pick>{
                   rater_column_means{buf.logits, n_visual, T, buf.row_max, buf.row_sum, buf.m},
                   rater_pick{buf.m, T, first_text, buf.raters, buf.counts}, buf.counts,
                   arrive_raters, means_smem - 8},
               pick ? T : 0, means_smem),
      phase_of(rater_pick{buf.m, T, first_text, buf.raters, buf.counts}, given || pick ? 0 : 1));
}

/// Columns a scoring block takes: 8 (each of a 256-thread block's 32 rater lanes
/// reads 8 adjacent floats, a 32-byte sector), at most the block's threads.
inline i64 score_columns(int threads) { return threads < 8 ? threads : 8; }

/// Stages 2-3 from the attention probabilities [H, L, L].
template <class Exec, class TA>
auto scores_attention_phases(Exec& ex, rows3<TA> attn, i64 heads, i64 first_visual, i64 n_visual,
                             const buffers& buf) {
  const i64 cols = score_columns(ex.threads());
  return phase_list(phase_of(scores_from_attention<TA>{attn, heads, first_visual, n_visual, cols,
                                                        buf.raters, buf.P, buf.scores, buf.counts},
                             core::ceil_div(n_visual, cols)));
}

/// What the q/k path reads (scores_qk.hpp's qk_view on the device).
template <class TQ, class TK>
struct qk_args {
  rows3<TQ> q;
  rows3<TK> k;
  i64 heads = 0, kv_heads = 0, head_dim = 0, length = 0;
  bool all_queries = true;  ///< q is [H, L, dh] (else [H, R, dh])
  i64 q_rows = 0;           ///< q.extent[1]
  float scale = 0.0f;       ///< the softmax scale as the CPU rounds it
  const float* lse = nullptr;
  i64 lse_s0 = 0, lse_s1 = 0;
};

/// Stages 2-3 from queries and keys (scores_qk.hpp): logits of the rater rows
/// against the keys up to the last rater, per-row softmax statistics, then P
/// and the scores.
template <class Exec, class TQ, class TK>
auto scores_qk_phases(Exec& ex, const qk_args<TQ, TK>& a, i64 first_visual, i64 n_visual,
                      i64 r_max, const buffers& buf) {
  constexpr int tile = Exec::tile;
  const i64 k_max = a.length;
  const i64 r_tiles = core::ceil_div(r_max, tile);
  const i64 cols = score_columns(ex.threads());
  return phase_list(
      phase_of(qk_logits<TQ, TK, tile>{a.q, a.k, a.heads / a.kv_heads, a.all_queries, a.q_rows,
                                        a.head_dim, r_tiles, r_max, k_max, buf.raters, buf.z,
                                        buf.counts},
               r_max > 0 ? a.heads * r_tiles : 0, static_cast<std::size_t>(tile_smem<tile>),
               core::ceil_div(k_max, tile)),
      phase_of(qk_row_stats{buf.z, r_max, k_max, a.scale, a.lse, a.lse_s0, a.lse_s1,
                            a.all_queries, buf.raters, buf.z_offset, buf.z_sum, buf.counts},
               r_max > 0 ? r_max : 0, static_cast<std::size_t>(ex.threads()) * sizeof(double),
               a.heads),
      phase_of(scores_from_qk{buf.z, a.heads, r_max, k_max, a.scale, buf.z_offset, buf.z_sum,
                              first_visual, n_visual, cols, buf.P, buf.scores, buf.counts},
               core::ceil_div(n_visual, cols)));
}

/// Stage 4 (rank.hpp), with the keep count (stage 5) in the rank's block after
/// it when `decide` (else the keep count is its own launcher's). G in shared
/// memory when it fits, else in global memory (the same code and bits, slower).
template <class Exec>
auto rank_phases(Exec& ex, i64 n_visual, i64 m_max, const keep_decide& decide, bool with_decide,
                 const buffers& buf) {
  const bool in_shared = rank_shared_bytes(m_max) <= ex.max_shared();
  const rank_solve solve{buf.G, buf.eig, n_visual, in_shared, buf.counts};
  const std::size_t smem = in_shared ? rank_shared_bytes(m_max) : core::eigen_shared * sizeof(double);
  return phase_list(dot_tiles(ex, m_max, m_max,
                              [&](auto edge) {
                                return rank_gram<decltype(edge)::value>{buf.P, n_visual, buf.G,
                                                                        buf.counts};
                              }),
                    phase_of(in_order<rank_solve, keep_decide>{solve, decide}, with_decide ? 1 : 0, smem),
                    phase_of(solve, with_decide ? 0 : 1, smem));
}

/// Keep-count and recycling options as plain values.
struct decide_args {
  bool fixed = false;
  double scale = 0.0, bias = 0.0;
  i64 fixed_keep = 0;
  bool recycle = false;
  double fraction = 0.0, divisor = 10.0;
};

/// Stage 5 (keep_count.hpp), with s and c.
inline keep_decide keep_decide_of(i64 n_visual, const decide_args& a, const buffers& buf) {
  return keep_decide{n_visual, a.fixed,    a.scale,   a.bias,    a.fixed_keep,
                     a.recycle, a.fraction, a.divisor, buf.counts};
}

/// Stage 6 (keep_set.hpp): every token's place in the score order, then the
/// kept positions ascending (in the last block of the ranks).
template <class Exec>
auto keep_set_phases(Exec& ex, i64 first_visual, i64 n_visual, const buffers& buf) {
  const int t = ex.threads();
  const std::size_t smem = with_tail_smem(static_cast<std::size_t>(t) * sizeof(float),
                                          static_cast<std::size_t>(t) * sizeof(i64));
  return phase_list(phase_of(with_tail<keep_ranks, keep_list>{
                                 keep_ranks{buf.scores, n_visual, buf.pos, buf.order, buf.counts},
                                 keep_list{buf.pos, first_visual, n_visual, buf.keep, buf.counts},
                                 buf.counts, arrive_keep, smem - 8},
                             core::ceil_div(n_visual, t), smem));
}

/// Stage 7 (recycle.hpp): Gram matrix of the recycled rows (its diagonal copied
/// by the last tile block), D over it with its maximum, DPC-KNN, cluster lists
/// and means. Nothing runs past the counts' s; s_max == 0 (recycling off) gives
/// phases without blocks.
template <class Exec, class TH>
auto recycle_phases(Exec& ex, rows2<TH> hidden, i64 first_visual, i64 hidden_dim, i64 s_max,
                    i64 c_max, const buffers& buf) {
  const int t = ex.threads();
  const i64 ld = s_max;
  const auto on = [&](i64 n) { return s_max > 0 ? n : 0; };
  const bool split = gram_lane_split(s_max);
  double* const D2 = split ? buf.D2 : nullptr;
  auto gram = dot_tiles(
      ex, s_max, s_max,
      [&](auto edge) {
        constexpr int e = decltype(edge)::value;
        return recycle_gram<TH, e>{hidden,  first_visual, hidden_dim, ld, buf.order, buf.D, D2,
                                   core::ceil_div(s_max, e), buf.counts};
      },
      recycle_diag{buf.D, D2, ld, buf.diag, buf.dmax, buf.counts}, buf.counts, arrive_gram);
  if (split) gram.gy *= 2;  // the odd lanes' blocks (recycle_gram)
  return phase_list(
      gram,
      // D and its maximum in one pass (the maximum by one exact atomic per block).
      phase_of(recycle_distances{buf.D, D2, ld, buf.diag, std::sqrt(static_cast<double>(hidden_dim)),
                                 buf.dmax, buf.counts},
               on(ex.grid(s_max * s_max)), static_cast<std::size_t>(t) * sizeof(double)),
      phase_of(recycle_density{buf.D, ld, buf.rho, buf.counts}, on(s_max),
               density_shared_bytes(s_max)),
      phase_of(recycle_gamma{buf.D, ld, buf.rho, buf.dmax, buf.gamma, buf.counts}, on(s_max),
               static_cast<std::size_t>(t) * sizeof(double)),
      phase_of(recycle_centres{buf.gamma, buf.gpos, buf.centres, buf.counts}, on(ex.grid(s_max))),
      // The clusters' offsets are counted by the last block of the assignment.
      phase_of(with_tail<recycle_assign, recycle_offsets>{
                   recycle_assign{buf.D, ld, buf.gpos, buf.centres, buf.label, buf.counts},
                   recycle_offsets{buf.label, buf.offsets, buf.counts}, buf.counts, arrive_assign,
                   with_tail_smem(0, 0) - 8},
               on(ex.grid(s_max)), with_tail_smem(0, 0)),
      phase_of(recycle_members{buf.order, buf.label, buf.offsets, first_visual, buf.members,
                               buf.counts},
               on(ex.grid(s_max))),
      phase_of(recycle_merge<TH>{hidden, hidden_dim, c_max, buf.offsets, buf.members, buf.merged,
                                 buf.counts},
               on(ex.grid(c_max * hidden_dim))));
}

/// Stage 8 (plan.hpp): the new sequence and its length (−1 after an error).
template <class Exec>
auto sequence_phases(Exec& ex, i64 length, i64 first_visual, i64 n_visual, const buffers& buf) {
  return phase_list(phase_of(
      plan_sequence{length, first_visual, n_visual, buf.keep, buf.sequence, buf.counts},
      ex.grid(length)));
}

// ---- the stage launchers' launches (one chain each) --------------------------

template <class Exec, class TE>
void select_raters(Exec& ex, rows2<TE> embeds, i64 length, i64 first_visual, i64 n_visual,
                   i64 embed_dim, const buffers& buf) {
  launch_chain(ex,
               raters_phases(ex, false, nullptr, 0, embeds, length, first_visual, n_visual,
                             embed_dim, buf),
               buf.counts);
}
template <class Exec>
void given_raters(Exec& ex, const i64* raters, i64 n, i64 first_visual, i64 n_visual, i64 length,
                  const buffers& buf) {
  launch_chain(ex,
               raters_phases(ex, true, raters, n, rows2<float>{}, length, first_visual, n_visual,
                             0, buf),
               buf.counts);
}
template <class Exec, class TA>
void scores_attention(Exec& ex, rows3<TA> attn, i64 heads, i64 first_visual, i64 n_visual,
                      const buffers& buf) {
  launch_chain(ex, scores_attention_phases(ex, attn, heads, first_visual, n_visual, buf),
               buf.counts);
}
template <class Exec, class TQ, class TK>
void scores_qk(Exec& ex, const qk_args<TQ, TK>& a, i64 first_visual, i64 n_visual, i64 r_max,
               const buffers& buf) {
  launch_chain(ex, scores_qk_phases(ex, a, first_visual, n_visual, r_max, buf), buf.counts);
}
template <class Exec>
void rank(Exec& ex, i64 n_visual, i64 m_max, const buffers& buf) {
  launch_chain(ex, rank_phases(ex, n_visual, m_max, keep_decide{}, false, buf), buf.counts);
}
template <class Exec>
void keep_count(Exec& ex, i64 n_visual, const decide_args& a, const buffers& buf) {
  ex.launch(keep_decide_of(n_visual, a, buf), 1, 1, 1, 0);
}
template <class Exec>
void keep_set(Exec& ex, i64 first_visual, i64 n_visual, const buffers& buf) {
  launch_chain(ex, keep_set_phases(ex, first_visual, n_visual, buf), buf.counts);
}
template <class Exec, class TH>
void recycle(Exec& ex, rows2<TH> hidden, i64 first_visual, i64 hidden_dim, i64 s_max, i64 c_max,
             const buffers& buf) {
  launch_chain(ex, recycle_phases(ex, hidden, first_visual, hidden_dim, s_max, c_max, buf),
               buf.counts);
}
template <class Exec>
void sequence(Exec& ex, i64 length, i64 first_visual, i64 n_visual, const buffers& buf) {
  launch_chain(ex, sequence_phases(ex, length, first_visual, n_visual, buf), buf.counts);
}

/// A gather of per-token rows through the plan (plan_gather) over [tokens, A, B]
/// views; rows_max bounds the output rows (the new length is on the device).
template <class Exec, class T>
void gather(Exec& ex, const plan_gather<T>& g) {
  ex.launch(g, ex.grid(g.rows_max * g.A * g.B), 1, ex.threads(), 0);
}

/// One step's inputs besides the scoring source (device pointers).
template <class TE, class TH>
struct step_args {
  rows2<TE> embeds;
  i64 embed_dim = 0;
  bool given = false;         ///< raters given: `raters` holds n_raters positions
  const i64* raters = nullptr;
  i64 n_raters = 0;
  rows2<TH> hidden;
  i64 hidden_dim = 0;
  i64 length = 0, first_visual = 0, n_visual = 0;
  decide_args decide;
};

/// Stages 4-8 after the scores, as prune_step runs them, as one chain: the rank
/// with the keep count in its block, the keep set, recycling, the sequence.
template <class Exec, class TE, class TH>
void finish(Exec& ex, const step_args<TE, TH>& a, const bounds& bd, const buffers& buf) {
  const i64 m_max = std::min(raters_bound(a.length, a.first_visual, a.n_visual), a.n_visual);
  launch_chain(
      ex,
      join(join(rank_phases(ex, a.n_visual, m_max, keep_decide_of(a.n_visual, a.decide, buf), true,
                            buf),
                keep_set_phases(ex, a.first_visual, a.n_visual, buf)),
           join(recycle_phases(ex, a.hidden, a.first_visual, a.hidden_dim,
                               a.decide.recycle ? bd.s_max : 0, bd.c_max, buf),
                sequence_phases(ex, a.length, a.first_visual, a.n_visual, buf))),
      buf.counts);
}

/// The raters' phases of a step.
template <class Exec, class TE, class TH>
auto step_raters(Exec& ex, const step_args<TE, TH>& a, const buffers& buf) {
  return raters_phases(ex, a.given, a.raters, a.n_raters, a.embeds, a.length, a.first_visual,
                       a.n_visual, a.embed_dim, buf);
}

/// prune_step (step.hpp) scoring from the attention probabilities: three
/// launches (the counts reset; the raters and the scores; the rest).
template <class Exec, class TE, class TH, class TA>
void run_step(Exec& ex, const step_args<TE, TH>& a, rows3<TA> attn, i64 heads, const bounds& bd,
              const buffers& buf) {
  reset(ex, buf);
  launch_chain(ex,
               join(step_raters(ex, a, buf),
                    scores_attention_phases(ex, attn, heads, a.first_visual, a.n_visual, buf)),
               buf.counts);
  finish(ex, a, bd, buf);
}

/// prune_step (step.hpp) scoring from queries and keys: three launches.
template <class Exec, class TE, class TH, class TQ, class TK>
void run_step(Exec& ex, const step_args<TE, TH>& a, const qk_args<TQ, TK>& qk, const bounds& bd,
              const buffers& buf) {
  reset(ex, buf);
  launch_chain(ex,
               join(step_raters(ex, a, buf),
                    scores_qk_phases(ex, qk, a.first_visual, a.n_visual,
                                     raters_bound(a.length, a.first_visual, a.n_visual), buf)),
               buf.counts);
  finish(ex, a, bd, buf);
}

}  // namespace sparsevlm::cuda::detail::pipeline
