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
//   ex.launch(body, gx, gy, threads, smem_bytes)   enqueue one kernel
// Launches with an empty grid are skipped by the executor.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
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

/// Launches a dot-tile kernel over a rows × cols grid of pairs: make(tile)
/// builds its body for a tile edge (std::integral_constant<int, edge>), and the
/// grid is (⌈rows/edge⌉, ⌈cols/edge⌉). The edge is Exec::tile, or Exec::small_tile
/// when the large tiles would give fewer than ex.wide_grid() blocks (at LLaVA
/// sizes the recycled rows' Gram takes 36 blocks of 32×32: a quarter of an H100),
/// so that 4× the blocks share the work. A thread owns tile_pairs pairs either
/// way, and each pair's dot product runs in one thread in the canonical order,
/// so the edge changes which block computes a pair, never its bits.
///
/// With `tail` (a one-block body needing `tail_smem` bytes), the launch is a
/// with_tail: the tail runs in the last tile block to finish.
template <class Exec, class Make, class Tail = std::nullptr_t>
void dot_tiles(Exec& ex, i64 rows, i64 cols, Make&& make, const Tail& tail = nullptr,
               step_counts* counts = nullptr, int slot = 0, std::size_t tail_smem = 0) {
  constexpr int big = Exec::tile, small = Exec::small_tile;
  const auto go = [&](auto edge) {
    constexpr int t = decltype(edge)::value;
    const i64 gx = core::ceil_div(rows, t), gy = core::ceil_div(cols, t);
    const auto smem = static_cast<std::size_t>(tile_smem<t>);
    if constexpr (std::is_same_v<Tail, std::nullptr_t>) {
      ex.launch(make(edge), gx, gy, tile_threads<t>, smem);
    } else {
      const std::size_t both = with_tail_smem(smem, tail_smem);
      ex.launch(with_tail<decltype(make(edge)), Tail>{make(edge), tail, counts, slot, both - 8}, gx, gy,
                tile_threads<t>, both);
    }
  };
  if (core::ceil_div(rows, big) * core::ceil_div(cols, big) < ex.wide_grid()) {
    go(std::integral_constant<int, small>{});
  } else {
    go(std::integral_constant<int, big>{});
  }
}

// ---- the stages ---------------------------------------------------------------

/// Zeroes the counts and flags (first kernel of a step).
template <class Exec>
void reset(Exec& ex, const buffers& buf) {
  ex.launch(counts_reset{buf.counts}, 1, 1, 1, 0);
}

/// Stage 1 from the embeddings (raters.hpp): logits, row softmax statistics,
/// column means, the choice.
template <class Exec, class TE>
void select_raters(Exec& ex, rows2<TE> embeds, i64 length, i64 first_visual, i64 n_visual,
                   i64 embed_dim, const buffers& buf) {
  const i64 first_text = first_visual + n_visual, T = length - first_text;
  if (T > 0) {
    dot_tiles(ex, n_visual, T, [&](auto edge) {
      return rater_logits<TE, decltype(edge)::value>{embeds,    first_visual, n_visual,  first_text,
                                                     T,         embed_dim,    buf.logits, buf.counts};
    });
    ex.launch(rater_row_stats{buf.logits, n_visual, T, buf.row_max, buf.row_sum},
              ex.grid(n_visual), 1, ex.threads(), 0);
    // The choice runs in the last block of the column means.
    const std::size_t smem = with_tail_smem(static_cast<std::size_t>(ex.threads()) * sizeof(double), 0);
    ex.launch(with_tail<rater_column_means, rater_pick>{
                  rater_column_means{buf.logits, n_visual, T, buf.row_max, buf.row_sum, buf.m},
                  rater_pick{buf.m, T, first_text, buf.raters, buf.counts},
                  buf.counts, arrive_raters, smem - 8},
              T, 1, ex.threads(), smem);
  } else {
    ex.launch(rater_pick{buf.m, T, first_text, buf.raters, buf.counts}, 1, 1, 1, 0);
  }
}

/// Stage 1 with the caller's raters (device array of n absolute positions,
/// checked on the device: flag_raters).
template <class Exec>
void given_raters(Exec& ex, const i64* raters, i64 n, i64 first_text, i64 length,
                  const buffers& buf) {
  ex.launch(rater_copy{raters, n, first_text, length, buf.raters, buf.counts},
            std::max<i64>(ex.grid(n), 1), 1, ex.threads(), 0);
}

/// Columns a scoring block takes: 8 (each of a 256-thread block's 32 rater lanes
/// reads 8 adjacent floats, a 32-byte sector), at most the block's threads.
inline i64 score_columns(int threads) { return threads < 8 ? threads : 8; }

/// Stages 2-3 from the attention probabilities [H, L, L].
template <class Exec, class TA>
void scores_attention(Exec& ex, rows3<TA> attn, i64 heads, i64 first_visual, i64 n_visual,
                      const buffers& buf) {
  const i64 cols = score_columns(ex.threads());
  ex.launch(scores_from_attention<TA>{attn, heads, first_visual, n_visual, cols, buf.raters,
                                      buf.P, buf.scores, buf.counts},
            core::ceil_div(n_visual, cols), 1, ex.threads(), 0);
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
void scores_qk(Exec& ex, const qk_args<TQ, TK>& a, i64 first_visual, i64 n_visual, i64 r_max,
               const buffers& buf) {
  constexpr int tile = Exec::tile;
  const i64 k_max = a.length;
  const i64 r_tiles = core::ceil_div(r_max, tile);
  if (r_max > 0) {
    ex.launch(qk_logits<TQ, TK, tile>{a.q, a.k, a.heads / a.kv_heads, a.all_queries, a.q_rows,
                                       a.head_dim, r_tiles, r_max, k_max, buf.raters, buf.z,
                                       buf.counts},
              a.heads * r_tiles, core::ceil_div(k_max, tile), tile_threads<tile>,
              static_cast<std::size_t>(tile_smem<tile>));
    ex.launch(qk_row_stats{buf.z, r_max, k_max, a.scale, a.lse, a.lse_s0, a.lse_s1,
                           a.all_queries, buf.raters, buf.z_offset, buf.z_sum, buf.counts},
              r_max, a.heads, ex.threads(), static_cast<std::size_t>(ex.threads()) * sizeof(double));
  }
  const i64 cols = score_columns(ex.threads());
  ex.launch(scores_from_qk{buf.z, a.heads, r_max, k_max, a.scale, buf.z_offset, buf.z_sum,
                           first_visual, n_visual, cols, buf.P, buf.scores, buf.counts},
            core::ceil_div(n_visual, cols), 1, ex.threads(), 0);
}

/// Stage 4 (rank.hpp). G in shared memory when it fits, else in global memory
/// (the same code and bits, slower).
///
/// With `then` (finish: keep_decide), that one-block body runs after the rank
/// in the rank's block, in the same launch.
template <class Exec, class Then = std::nullptr_t>
void rank(Exec& ex, i64 n_visual, i64 m_max, const buffers& buf, const Then& then = nullptr) {
  if (m_max > 0) {
    dot_tiles(ex, m_max, m_max, [&](auto edge) {
      return rank_gram<decltype(edge)::value>{buf.P, n_visual, buf.G, buf.counts};
    });
  }
  const bool in_shared = rank_shared_bytes(m_max) <= ex.max_shared();
  const rank_solve solve{buf.G, buf.eig, n_visual, in_shared, buf.counts};
  const std::size_t smem = in_shared ? rank_shared_bytes(m_max) : core::eigen_shared * sizeof(double);
  if constexpr (std::is_same_v<Then, std::nullptr_t>) {
    ex.launch(solve, 1, 1, ex.threads(), smem);
  } else {
    ex.launch(in_order<rank_solve, Then>{solve, then}, 1, 1, ex.threads(), smem);
  }
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
template <class Exec>
void keep_count(Exec& ex, i64 n_visual, const decide_args& a, const buffers& buf) {
  ex.launch(keep_decide_of(n_visual, a, buf), 1, 1, 1, 0);
}

/// Stage 6 (keep_set.hpp): every token's place in the score order, then the
/// kept positions ascending.
template <class Exec>
void keep_set(Exec& ex, i64 first_visual, i64 n_visual, const buffers& buf) {
  const int t = ex.threads();
  // The list is made by the last block of the ranks.
  const std::size_t smem = with_tail_smem(static_cast<std::size_t>(t) * sizeof(float),
                                          static_cast<std::size_t>(t) * sizeof(i64));
  ex.launch(with_tail<keep_ranks, keep_list>{
                keep_ranks{buf.scores, n_visual, buf.pos, buf.order, buf.counts},
                keep_list{buf.pos, first_visual, n_visual, buf.keep, buf.counts},
                buf.counts, arrive_keep, smem - 8},
            core::ceil_div(n_visual, t), 1, t, smem);
}

/// Stage 7 (recycle.hpp): Gram matrix of the recycled rows, D over it, DPC-KNN,
/// cluster lists and means. Nothing runs past the counts' s (0: no recycling).
template <class Exec, class TH>
void recycle(Exec& ex, rows2<TH> hidden, i64 first_visual, i64 hidden_dim, i64 s_max, i64 c_max,
             const buffers& buf) {
  if (s_max == 0) return;
  const int t = ex.threads();
  const i64 ld = s_max;
  // G's diagonal is copied by the last tile block to finish.
  dot_tiles(
      ex, s_max, s_max,
      [&](auto edge) {
        return recycle_gram<TH, decltype(edge)::value>{hidden, first_visual, hidden_dim, ld,
                                                       buf.order, buf.D, buf.counts};
      },
      recycle_diag{buf.D, ld, buf.diag, buf.dmax, buf.counts}, buf.counts, arrive_gram);
  // D and its maximum in one pass (the maximum by one exact atomic per block).
  ex.launch(recycle_distances{buf.D, ld, buf.diag, std::sqrt(static_cast<double>(hidden_dim)),
                              buf.dmax, buf.counts},
            ex.grid(s_max * s_max), 1, t, static_cast<std::size_t>(t) * sizeof(double));
  ex.launch(recycle_density{buf.D, ld, buf.rho, buf.counts}, s_max, 1, t,
            density_shared_bytes(s_max));
  ex.launch(recycle_gamma{buf.D, ld, buf.rho, buf.dmax, buf.gamma, buf.counts}, s_max, 1, t,
            static_cast<std::size_t>(t) * sizeof(double));
  ex.launch(recycle_centres{buf.gamma, buf.gpos, buf.centres, buf.counts}, ex.grid(s_max), 1, t,
            0);
  // The clusters' offsets are counted by the last block of the assignment.
  ex.launch(with_tail<recycle_assign, recycle_offsets>{
                recycle_assign{buf.D, ld, buf.gpos, buf.centres, buf.label, buf.counts},
                recycle_offsets{buf.label, buf.offsets, buf.counts},
                buf.counts, arrive_assign, with_tail_smem(0, 0) - 8},
            ex.grid(s_max), 1, t, with_tail_smem(0, 0));
  ex.launch(recycle_members{buf.order, buf.label, buf.offsets, first_visual, buf.members,
                            buf.counts},
            ex.grid(s_max), 1, t, 0);
  ex.launch(recycle_merge<TH>{hidden, hidden_dim, c_max, buf.offsets, buf.members, buf.merged,
                              buf.counts},
            ex.grid(c_max * hidden_dim), 1, t, 0);
}

/// Stage 8 (plan.hpp): the new sequence and its length (−1 after an error).
template <class Exec>
void sequence(Exec& ex, i64 length, i64 first_visual, i64 n_visual, const buffers& buf) {
  ex.launch(plan_sequence{length, first_visual, n_visual, buf.keep, buf.sequence, buf.counts},
            ex.grid(length), 1, ex.threads(), 0);
}

/// Stages 4-8 after the scores, as prune_step runs them.
template <class Exec, class TH>
void finish(Exec& ex, rows2<TH> hidden, i64 length, i64 first_visual, i64 n_visual,
            i64 hidden_dim, const decide_args& decide, const bounds& bd, const buffers& buf) {
  // The keep count runs in the rank's block, after it.
  rank(ex, n_visual, std::min(raters_bound(length, first_visual, n_visual), n_visual), buf,
       keep_decide_of(n_visual, decide, buf));
  keep_set(ex, first_visual, n_visual, buf);
  recycle(ex, hidden, first_visual, hidden_dim, decide.recycle ? bd.s_max : 0, bd.c_max, buf);
  sequence(ex, length, first_visual, n_visual, buf);
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

template <class Exec, class TE, class TH>
void begin_step(Exec& ex, const step_args<TE, TH>& a, const buffers& buf) {
  reset(ex, buf);
  if (a.given) {
    given_raters(ex, a.raters, a.n_raters, a.first_visual + a.n_visual, a.length, buf);
  } else {
    select_raters(ex, a.embeds, a.length, a.first_visual, a.n_visual, a.embed_dim, buf);
  }
}

/// prune_step (step.hpp) scoring from the attention probabilities.
template <class Exec, class TE, class TH, class TA>
void run_step(Exec& ex, const step_args<TE, TH>& a, rows3<TA> attn, i64 heads, const bounds& bd,
              const buffers& buf) {
  begin_step(ex, a, buf);
  scores_attention(ex, attn, heads, a.first_visual, a.n_visual, buf);
  finish(ex, a.hidden, a.length, a.first_visual, a.n_visual, a.hidden_dim, a.decide, bd, buf);
}

/// prune_step (step.hpp) scoring from queries and keys.
template <class Exec, class TE, class TH, class TQ, class TK>
void run_step(Exec& ex, const step_args<TE, TH>& a, const qk_args<TQ, TK>& qk, const bounds& bd,
              const buffers& buf) {
  begin_step(ex, a, buf);
  scores_qk(ex, qk, a.first_visual, a.n_visual,
            raters_bound(a.length, a.first_visual, a.n_visual), buf);
  finish(ex, a.hidden, a.length, a.first_visual, a.n_visual, a.hidden_dim, a.decide, bd, buf);
}

}  // namespace sparsevlm::cuda::detail::pipeline
