// The CUDA backend's kernels, written once for any block context
// (core/block.hpp): nvcc runs them as __global__ functions (cuda/common.cuh),
// the CPU tests run the very same code on CPU threads (tests/test_core.cpp).
// Host-compilable: no CUDA header is needed to read or test them.
//
// Each kernel is a functor `body(b, smem)`: its members are the launch's
// arguments (device pointers, strides, host-known sizes); `b` is the block
// context, `smem` the block's dynamic shared memory. The counts that the data
// decide (raters R, rank, keep, recycled s, clusters c) stay on the device in a
// step_counts; a kernel reads them and sizes its grid for the worst case that
// the host knows (core/pipeline.hpp). Nothing here synchronises the device.
//
// Arithmetic: every value that a CPU stage computes is computed here with the
// same operations in the same order (the comment of each body names the CPU
// code it mirrors): dot products through core/dot.hpp, exp through
// core/exp.hpp, sums in one thread in the CPU's order, decisions through
// core/math.hpp.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "../dtype.hpp"
#include "block.hpp"
#include "dot.hpp"
#include "eigen.hpp"
#include "exp.hpp"
#include "math.hpp"

namespace sparsevlm::core::kernels {

using i64 = std::int64_t;

/// What went wrong in a step, as flags on the device (the CPU path throws the
/// matching sparsevlm::error).
enum step_flag : int {
  flag_embeds = 0,     ///< a rater logit is NaN/Inf (non-finite embeds, or an overflow)
  flag_scores = 1,     ///< a score is NaN/Inf (non-finite attention or q/k/lse)
  flag_hidden = 2,     ///< a hidden row that recycling merges holds NaN/Inf
  flag_eigen = 3,      ///< the rank's eigen-solver did not converge
  flag_raters = 4,     ///< caller raters not ascending or not text positions
  flag_count = 5
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
};

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
/// row as float (called only for i < na, k < depth). Needs exactly
/// tile_threads<Tile> threads.
///
/// Rows are staged tile_depth elements at a time; lane l of a pair still
/// accumulates elements l, l + lanes, ... in order across the stages, the
/// staged values past `depth` are zero, and lane groups that start at or past
/// `depth` are skipped: exactly the CPU's loop `for (k = 0; k < d; k += lanes)`.
template <class Acc, int Tile, class Block, class LA, class LB, class Out>
SPARSEVLM_HD void dot_tile(const Block& b, float* smem, i64 na, i64 nb, i64 depth, LA&& la,
                           LB&& lb, Out&& out) {
  constexpr int lanes = std::is_same_v<Acc, float> ? dot32_lanes : dot64_lanes;
  constexpr int ks = tile_depth + 1;  // padded row stride in shared memory
  float* sa = smem;
  float* sb = smem + Tile * ks;
  const i64 t = b.rank(), nt = b.size();
  Acc acc[tile_pairs][lanes];
  for (int q = 0; q < tile_pairs; ++q)
    for (int l = 0; l < lanes; ++l) acc[q][l] = Acc(0);
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
      const float* ra = sa + (p / Tile) * ks;
      const float* rb = sb + (p % Tile) * ks;
      for (int g = 0; g < tile_depth; g += lanes) {
        if (k0 + g >= depth) break;
        for (int l = 0; l < lanes; ++l) {
          if constexpr (std::is_same_v<Acc, float>) {
            acc[q][l] = fma32(ra[g + l], rb[g + l], acc[q][l]);
          } else {
            acc[q][l] = fma64(static_cast<double>(ra[g + l]), static_cast<double>(rb[g + l]),
                              acc[q][l]);
          }
        }
      }
    }
    b.sync();
  }
  for (int q = 0; q < tile_pairs; ++q) {
    const i64 p = t + q * nt;
    const i64 i = p / Tile, j = p % Tile;
    if (i < na && j < nb) {
      if constexpr (std::is_same_v<Acc, float>) {
        out(i, j, reduce16(acc[q]));
      } else {
        out(i, j, reduce8(acc[q]));
      }
    }
  }
}

/// The Tile×Tile block (i0, j0) of a symmetric Gram matrix g (row stride ld) in
/// double (dot_tile with Acc = double): rows are load(r, k); only pairs with
/// i <= j are computed into both g[i][j] and g[j][i] (blocks below the diagonal
/// are the caller's to skip), so each pair is one number.
template <int Tile, class Block, class Load>
SPARSEVLM_HD void gram_tile(const Block& b, float* smem, i64 i0, i64 j0, i64 na, i64 nb,
                            i64 depth, Load load, double* g, i64 ld) {
  dot_tile<double, Tile>(
      b, smem, na, nb, depth, [load, i0](i64 r, i64 k) { return load(i0 + r, k); },
      [load, j0](i64 r, i64 k) { return load(j0 + r, k); },
      [g, ld, i0, j0](i64 i, i64 j, double v) {
        if (i0 + i > j0 + j) return;
        g[(i0 + i) * ld + j0 + j] = v;
        g[(j0 + j) * ld + i0 + i] = v;
      });
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

// ---- stage 1: raters (raters.hpp, select_raters) ----------------------------

/// logits[i·T + t] = dot32(visual row i, text row t) over the embeddings.
/// Grid: (ceil(N / Tile), ceil(T / Tile)); tile_threads<Tile> threads.
template <class TE, int Tile>
struct rater_logits {
  rows2<TE> embeds;
  i64 first_visual, n_visual, first_text, n_text, dim;
  float* logits;
  step_counts* counts;

  template <class Block>
  SPARSEVLM_HD void operator()(const Block& b, void* smem) const {
    const i64 i0 = b.bx() * Tile, t0 = b.by() * Tile;
    const i64 na = n_visual - i0 < Tile ? n_visual - i0 : Tile;
    const i64 nb = n_text - t0 < Tile ? n_text - t0 : Tile;
    const auto e = embeds;
    const i64 fv = first_visual + i0, ft = first_text + t0;
    dot_tile<float, Tile>(
        b, static_cast<float*>(smem), na, nb, dim,
        [e, fv](i64 r, i64 k) { return e.at(fv + r, k); },
        [e, ft](i64 r, i64 k) { return e.at(ft + r, k); },
        [&](i64 i, i64 t, float v) {
          logits[(i0 + i) * n_text + t0 + t] = v;
          if (!std::isfinite(v)) raise_flag(&counts->flags[flag_embeds]);
        });
  }
};

/// Per visual row i: the max of its logits and Σ_t exp(logit − max) in text
/// order, in double. One thread per row (grid-stride).
struct rater_row_stats {
  const float* logits;
  i64 n_visual, n_text;
  double* row_max;
  double* row_sum;

  template <class Block>
  SPARSEVLM_HD void operator()(const Block& b, void*) const {
    for (i64 i = thread_id(b); i < n_visual; i += thread_count(b)) {
      const float* li = logits + i * n_text;
      double mx = -INFINITY;
      for (i64 t = 0; t < n_text; ++t) {
        const double v = static_cast<double>(li[t]);
        mx = mx < v ? v : mx;  // std::max(mx, v)
      }
      double sum = 0.0;
      for (i64 t = 0; t < n_text; ++t) sum += exp64(static_cast<double>(li[t]) - mx);
      row_max[i] = mx;
      row_sum[i] = sum;
    }
  }
};

/// Per text token t: m[t] = (Σ_i exp(logit[i][t] − max_i) / sum_i) / N, visual
/// rows in order (the CPU adds row i's probabilities into m row by row; each
/// m[t] sees the same additions in the same order). One thread per text token.
struct rater_column_means {
  const float* logits;
  i64 n_visual, n_text;
  const double* row_max;
  const double* row_sum;
  double* m;

  template <class Block>
  SPARSEVLM_HD void operator()(const Block& b, void*) const {
    for (i64 t = thread_id(b); t < n_text; t += thread_count(b)) {
      double acc = 0.0;
      for (i64 i = 0; i < n_visual; ++i)
        acc += exp64(static_cast<double>(logits[i * n_text + t]) - row_max[i]) / row_sum[i];
      m[t] = acc / static_cast<double>(n_visual);
    }
  }
};

/// The raters: text positions t with m[t] > mean(m), none when all m[t] are
/// equal or there is no text. One block; thread 0 does the O(T) pass.
struct rater_pick {
  const double* m;
  i64 n_text, first_text;
  i64* raters;
  step_counts* counts;

  template <class Block>
  SPARSEVLM_HD void operator()(const Block& b, void*) const {
    if (b.rank() != 0 || b.bx() != 0) return;
    counts->raters = pick_raters(m, n_text, first_text, raters);
  }
};

/// Caller-given raters: copied, and checked as check_raters does (ascending,
/// unique, inside the text [first_text, L)), which raises flag_raters. Grid-stride.
struct rater_copy {
  const i64* given;
  i64 n_given, first_text, length;
  i64* raters;
  step_counts* counts;

  template <class Block>
  SPARSEVLM_HD void operator()(const Block& b, void*) const {
    for (i64 r = thread_id(b); r < n_given; r += thread_count(b)) {
      const i64 v = given[r];
      if (v < first_text || v >= length || (r > 0 && !(v > given[r - 1])))
        raise_flag(&counts->flags[flag_raters]);
      raters[r] = v;
    }
    if (thread_id(b) == 0) counts->raters = n_given;
  }
};

/// Resets the counts of a step (the first kernel of every step).
struct counts_reset {
  step_counts* counts;
  template <class Block>
  SPARSEVLM_HD void operator()(const Block& b, void*) const {
    if (thread_id(b) != 0) return;
    counts->raters = counts->rank = counts->keep = counts->recycled = counts->clusters = 0;
    counts->length = 0;
    for (int f = 0; f < flag_count; ++f) counts->flags[f] = 0;
  }
};

// ---- stages 2-3: P and the scores (scores.hpp, scores_qk.hpp) ----------------

/// P[r][j] = (Σ_h attn[h][raters[r]][S + j]) / H in float32, heads in order;
/// score[j] = (Σ_r P[r][j]) / R, raters in order (detail::finish_scores: P is
/// divided first, the scores sum the divided values). One thread per column j,
/// so each column's sums run in the CPU's order. Grid-stride over N.
template <class TA>
struct scores_from_attention {
  rows3<TA> attn;
  i64 heads, first_visual, n_visual;
  const i64* raters;
  float* P;  ///< [R, N]
  float* scores;
  step_counts* counts;

  template <class Block>
  SPARSEVLM_HD void operator()(const Block& b, void*) const {
    if (failed(counts, flag_scores)) return;
    const i64 R = counts->raters;
    const float hf = static_cast<float>(heads);
    for (i64 j = thread_id(b); j < n_visual; j += thread_count(b)) {
      float score = 0.0f;
      for (i64 r = 0; r < R; ++r) {
        const i64 q = raters[r];
        float p = 0.0f;
        for (i64 h = 0; h < heads; ++h) p += attn.at(h, q, first_visual + j);
        p /= hf;
        P[r * n_visual + j] = p;
        score += p;
      }
      if (R > 0) score /= static_cast<float>(R);
      scores[j] = score;
      if (!std::isfinite(score)) raise_flag(&counts->flags[flag_scores]);
    }
  }
};

/// Q/K path, logits: z[h][r][u] = dot32(q[h][row(r)], k[h / group][u]) for the
/// rater rows r < R and keys u < raters[R−1] + 1 (float32; the scale is applied
/// later, as scores_qk.hpp does). Grid: (ceil(Kmax / Tile), H · ceil(Rmax / Tile)).
template <class TQ, class TK, int Tile>
struct qk_logits {
  rows3<TQ> q;
  rows3<TK> k;
  i64 group;         ///< H / Hkv
  bool all_queries;  ///< q holds all L rows (else only the R rater rows)
  i64 q_rows;        ///< q's rows: L, or R (else the step is flagged)
  i64 head_dim, r_tiles, r_max, k_max;
  const i64* raters;
  float* z;  ///< [H, r_max, k_max]
  step_counts* counts;

  template <class Block>
  SPARSEVLM_HD void operator()(const Block& b, void* smem) const {
    const i64 R = counts->raters;
    if (R == 0 || failed(counts, flag_scores)) return;
    if (!all_queries && q_rows != R) {  // q holds rater rows, but not R of them
      raise_flag(&counts->flags[flag_scores]);
      return;
    }
    const i64 keys = raters[R - 1] + 1;
    const i64 h = b.by() / r_tiles, r0 = (b.by() % r_tiles) * Tile, u0 = b.bx() * Tile;
    if (r0 >= R || u0 >= keys) return;  // the whole block leaves together
    const i64 na = R - r0 < Tile ? R - r0 : Tile;
    const i64 nb = keys - u0 < Tile ? keys - u0 : Tile;
    const i64 g = h / group;
    const auto qv = q;
    const auto kv = k;
    const i64* rt = raters;
    const bool all = all_queries;
    dot_tile<float, Tile>(
        b, static_cast<float*>(smem), na, nb, head_dim,
        [qv, rt, all, h, r0](i64 r, i64 c) { return qv.at(h, all ? rt[r0 + r] : r0 + r, c); },
        [kv, g, u0](i64 u, i64 c) { return kv.at(g, u0 + u, c); },
        [&](i64 r, i64 u, float v) { z[(h * r_max + r0 + r) * k_max + u0 + u] = v; });
  }
};

/// Q/K path, per (head, rater row): the softmax offset and denominator of row
/// t = raters[r] over its causal keys u <= t, with zz = double(scale · z):
/// without LSE, offset = max zz and sum = Σ_u exp(zz − max) in key order; with
/// the engine's LSE, offset = lse and sum = 1 (x / 1 is exact, so one formula
/// serves both). Flags NaN/Inf logits or LSE. Grid: (Rmax, H), any block size;
/// smem: size() doubles. The exponentials are computed in parallel, the sum in
/// thread 0 in key order.
struct qk_row_stats {
  const float* z;
  i64 r_max, k_max;
  float scale;
  const float* lse;  ///< [H, Lq] or null
  i64 lse_s0, lse_s1;
  bool all_queries;
  const i64* raters;
  double* offset;  ///< [H, r_max]
  double* sum;
  step_counts* counts;

  template <class Block>
  SPARSEVLM_HD void operator()(const Block& b, void* smem) const {
    const i64 r = b.bx(), h = b.by();
    if (r >= counts->raters || failed(counts, flag_scores)) return;
    double* buf = static_cast<double*>(smem);
    const i64 t = raters[r];
    const float* zr = z + (h * r_max + r) * k_max;
    const i64 tid = b.rank(), nt = b.size();
    double mx = -INFINITY;
    bool finite = true;
    for (i64 u = tid; u <= t; u += nt) {
      const double v = static_cast<double>(scale * zr[u]);
      finite = finite && std::isfinite(v);
      mx = mx < v ? v : mx;
    }
    if (!finite) raise_flag(&counts->flags[flag_scores]);
    buf[tid] = mx;
    b.sync();
    if (tid == 0) {
      double m = -INFINITY;
      for (i64 i = 0; i < nt; ++i) m = m < buf[i] ? buf[i] : m;  // max: any order gives it
      buf[0] = m;
    }
    b.sync();
    const double row_max = buf[0];
    b.sync();
    const i64 idx = h * r_max + r;
    if (lse) {
      if (tid == 0) {
        const i64 qrow = all_queries ? t : r;
        const double l = static_cast<double>(lse[h * lse_s0 + qrow * lse_s1]);
        if (!std::isfinite(l)) raise_flag(&counts->flags[flag_scores]);
        offset[idx] = l;
        sum[idx] = 1.0;
      }
      return;
    }
    double s = 0.0;  // thread 0's running sum, keys in order
    for (i64 base = 0; base <= t; base += nt) {
      const i64 u = base + tid;
      buf[tid] = u <= t ? exp64(static_cast<double>(scale * zr[u]) - row_max) : 0.0;
      b.sync();
      if (tid == 0) {
        const i64 n = t + 1 - base < nt ? t + 1 - base : nt;
        for (i64 i = 0; i < n; ++i) s += buf[i];
      }
      b.sync();
    }
    if (tid == 0) {
      offset[idx] = row_max;
      sum[idx] = s;
    }
  }
};

/// Q/K path, P and the scores: a[h][r][j] = float(exp(double(scale · z) −
/// offset) / sum), then exactly scores_from_attention's sums. One thread per
/// column j (grid-stride).
struct scores_from_qk {
  const float* z;
  i64 heads, r_max, k_max;
  float scale;
  const double* offset;
  const double* sum;
  i64 first_visual, n_visual;
  float* P;
  float* scores;
  step_counts* counts;

  template <class Block>
  SPARSEVLM_HD void operator()(const Block& b, void*) const {
    if (failed(counts, flag_scores)) return;
    const i64 R = counts->raters;
    const float hf = static_cast<float>(heads);
    for (i64 j = thread_id(b); j < n_visual; j += thread_count(b)) {
      float score = 0.0f;
      for (i64 r = 0; r < R; ++r) {
        float p = 0.0f;
        for (i64 h = 0; h < heads; ++h) {
          const i64 idx = h * r_max + r;
          const double zz = static_cast<double>(scale * z[idx * k_max + first_visual + j]);
          p += static_cast<float>(exp64(zz - offset[idx]) / sum[idx]);
        }
        p /= hf;
        P[r * n_visual + j] = p;
        score += p;
      }
      if (R > 0) score /= static_cast<float>(R);
      scores[j] = score;
      if (!std::isfinite(score)) raise_flag(&counts->flags[flag_scores]);
    }
  }
};

// ---- stage 4: rank (rank.hpp, numerical_rank) -------------------------------

/// G = P·Pᵀ (R <= N) or Pᵀ·P (R > N), m = min(R, N), with dot64 over the
/// depth max(R, N); G is m×m row-major, each pair computed once (upper tiles;
/// the diagonal tiles write i <= j and mirror). Grid: (tiles, tiles) for m_max.
template <int Tile>
struct rank_gram {
  const float* P;  ///< [R, N]
  i64 n_visual;
  double* G;
  step_counts* counts;

  template <class Block>
  SPARSEVLM_HD void operator()(const Block& b, void* smem) const {
    const i64 R = counts->raters, N = n_visual;
    const i64 m = R < N ? R : N, depth = R < N ? N : R;
    const i64 i0 = b.bx() * Tile, j0 = b.by() * Tile;
    if (failed(counts) || i0 >= m || j0 >= m || j0 < i0) return;
    const i64 na = m - i0 < Tile ? m - i0 : Tile, nb = m - j0 < Tile ? m - j0 : Tile;
    const float* p = P;
    const bool rows = R <= N;  // the m vectors are rows of P (else its columns)
    const auto load = [p, rows, N](i64 i, i64 k) { return rows ? p[i * N + k] : p[k * N + i]; };
    gram_tile<Tile>(b, static_cast<float*>(smem), i0, j0, na, nb, depth, load, G, m);
  }
};

/// The rank from G: eigenvalues by the block-parallel symmetric solver
/// (core/eigen.hpp, the CPU's own code), then the count of λ > λ_max·(max(R,N)·
/// 2^-23)². One block. With `in_shared`, G is copied into shared memory first
/// (smem: m_max² + 2·m_max + 4 doubles); else the solver works on G in place
/// in global memory, with `scratch` (2·m_max doubles) for the eigenvalues.
struct rank_solve {
  double* G;
  double* scratch;
  i64 n_visual;
  bool in_shared;
  step_counts* counts;

  template <class Block>
  SPARSEVLM_HD void operator()(const Block& b, void* smem) const {
    const i64 R = counts->raters, N = n_visual;
    if (R == 0 || failed(counts)) {
      if (b.rank() == 0) counts->rank = 0;
      return;
    }
    const i64 m = R < N ? R : N, depth = R < N ? N : R;
    double* sh = static_cast<double*>(smem);
    double* a = G;
    double* lambda = scratch;
    double* bc = sh;
    if (in_shared) {
      a = sh + 4;
      lambda = a + m * m;
      for (i64 i = b.rank(); i < m * m; i += b.size()) a[i] = G[i];
      b.sync();
    }
    const bool ok = symmetric_eigenvalues(b, a, m, lambda, lambda + m, bc);
    if (b.rank() != 0) return;
    if (!ok) {
      raise_flag(&counts->flags[flag_eigen]);
      counts->rank = 0;
      return;
    }
    double lambda_max = 0.0;
    for (i64 i = 0; i < m; ++i) lambda_max = lambda_max < lambda[i] ? lambda[i] : lambda_max;
    i64 rank = 0;
    if (lambda_max > 0.0) {
      const double threshold = rank_threshold_sq(lambda_max, depth);
      for (i64 i = 0; i < m; ++i)
        if (lambda[i] > threshold) ++rank;
    }
    counts->rank = rank;
  }
};

// ---- stage 5: keep count (keep_count.hpp) and the recycling sizes ----------

/// keep (spec step 5), then s = recycle_count(N − keep) and c = cluster_count(s)
/// when recycling. One thread.
struct keep_decide {
  i64 n_visual;
  bool fixed;
  double scale, bias;
  i64 fixed_keep;
  bool recycle;
  double fraction, divisor;
  step_counts* counts;

  template <class Block>
  SPARSEVLM_HD void operator()(const Block& b, void*) const {
    if (thread_id(b) != 0) return;
    const i64 N = n_visual;
    const i64 keep = decide_keep(N, counts->raters, counts->rank, fixed, fixed_keep, scale, bias);
    const recycle_counts rc = recycled_counts(N - keep, recycle, fraction, divisor);
    counts->keep = keep;
    counts->recycled = rc.rows;
    counts->clusters = rc.clusters;
  }
};

// ---- stage 6: keep set (keep_set.hpp, select_keep) --------------------------

/// The position of every visual token in the total order core::ranks_before
/// (higher score first, ties to the lower index): pos[j] = #{i ranking before
/// j}, and order[pos[j]] = j. O(N²) comparisons against score blocks staged in
/// shared memory (size() floats); exact, and with no sort to get wrong. Grid:
/// ceil(N / size()) blocks, one thread per token.
struct keep_ranks {
  const float* scores;
  i64 n_visual;
  i64* pos;
  i64* order;
  step_counts* counts;

  template <class Block>
  SPARSEVLM_HD void operator()(const Block& b, void* smem) const {
    if (failed(counts)) return;
    float* chunk = static_cast<float*>(smem);
    const i64 N = n_visual, nt = b.size();
    const i64 j = b.bx() * nt + b.rank();
    const float sj = j < N ? scores[j] : 0.0f;
    i64 before = 0;
    for (i64 base = 0; base < N; base += nt) {
      if (base + b.rank() < N) chunk[b.rank()] = scores[base + b.rank()];
      b.sync();
      const i64 n = N - base < nt ? N - base : nt;
      if (j < N)
        for (i64 q = 0; q < n; ++q)
          if (ranks_before(chunk[q], base + q, sj, j)) ++before;
      b.sync();
    }
    if (j < N) {
      pos[j] = before;
      order[before] = j;
    }
  }
};

/// keep[] = S + j for the tokens with pos[j] < keep, ascending: a block-wide
/// prefix sum over the visual tokens in order. One block; smem: size() i64.
struct keep_list {
  const i64* pos;
  i64 first_visual, n_visual;
  i64* keep;
  step_counts* counts;

  template <class Block>
  SPARSEVLM_HD void operator()(const Block& b, void* smem) const {
    if (failed(counts)) return;
    i64* scan = static_cast<i64*>(smem);
    const i64 k = counts->keep, nt = b.size(), t = b.rank();
    i64 carry = 0;
    for (i64 base = 0; base < n_visual; base += nt) {
      const i64 j = base + t;
      const bool in = j < n_visual && pos[j] < k;
      scan[t] = in ? 1 : 0;
      b.sync();
      for (i64 off = 1; off < nt; off <<= 1) {  // inclusive Hillis-Steele scan
        const i64 add = t >= off ? scan[t - off] : 0;
        b.sync();
        scan[t] += add;
        b.sync();
      }
      if (in) keep[carry + scan[t] - 1] = first_visual + j;
      carry += scan[nt - 1];
      b.sync();
    }
  }
};

// ---- stage 7: recycling (recycle.hpp) --------------------------------------

/// The Gram matrix of the s recycled hidden rows (selected token i is visual
/// token order[keep + i]), dot64 over d, upper tiles, mirrored; ld = s_max.
/// Flags NaN/Inf in those rows. Grid: (tiles, tiles) for s_max.
template <class TH, int Tile>
struct recycle_gram {
  rows2<TH> hidden;
  i64 first_visual, dim, ld;
  const i64* order;
  double* G;
  step_counts* counts;

  template <class Block>
  SPARSEVLM_HD void operator()(const Block& b, void* smem) const {
    const i64 s = counts->recycled;
    const i64 i0 = b.bx() * Tile, j0 = b.by() * Tile;
    if (failed(counts, flag_hidden) || i0 >= s || j0 >= s || j0 < i0) return;
    const i64 na = s - i0 < Tile ? s - i0 : Tile, nb = s - j0 < Tile ? s - j0 : Tile;
    const i64* sel = order + counts->keep;
    const auto h = hidden;
    const i64 S = first_visual;
    i64* flag = &counts->flags[flag_hidden];
    const auto load = [h, sel, S, flag](i64 i, i64 k) {
      const float v = h.at(S + sel[i], k);
      if (!std::isfinite(v)) raise_flag(flag);
      return v;
    };
    gram_tile<Tile>(b, static_cast<float*>(smem), i0, j0, na, nb, dim, load, G, ld);
  }
};

/// diag[i] = G[i][i], saved so that D can replace G in place. Grid-stride.
struct recycle_diag {
  const double* G;
  i64 ld;
  double* diag;
  step_counts* counts;

  template <class Block>
  SPARSEVLM_HD void operator()(const Block& b, void*) const {
    if (failed(counts)) return;
    const i64 s = counts->recycled;
    for (i64 i = thread_id(b); i < s; i += thread_count(b)) diag[i] = G[i * ld + i];
  }
};

/// D[i][j] = gram_distance(G_ii, G_jj, G_ij) for i < j, mirrored, 0 on the
/// diagonal, written over G (`GD`, ld = s_max): the one thread of pair i < j
/// is the only one that reads G_ij = G_ji, and it reads before it writes.
/// Grid-stride over s².
struct recycle_distances {
  double* GD;
  i64 ld;
  const double* diag;
  double sqrt_d;
  step_counts* counts;

  template <class Block>
  SPARSEVLM_HD void operator()(const Block& b, void*) const {
    if (failed(counts)) return;
    const i64 s = counts->recycled;
    for (i64 e = thread_id(b); e < s * s; e += thread_count(b)) {
      const i64 i = e / s, j = e % s;
      if (i == j) {
        GD[i * ld + i] = 0.0;
      } else if (i < j) {
        const double dist = gram_distance(diag[i], diag[j], GD[i * ld + j], sqrt_d);
        GD[i * ld + j] = dist;
        GD[j * ld + i] = dist;
      }
    }
  }
};

/// The largest entry of D (>= 0: dpc_knn starts its max at 0). One block;
/// smem: size() doubles; the result in *dmax.
struct recycle_dmax {
  const double* D;
  i64 ld;
  double* dmax;
  step_counts* counts;

  template <class Block>
  SPARSEVLM_HD void operator()(const Block& b, void* smem) const {
    if (failed(counts)) return;
    const i64 s = counts->recycled;
    double* buf = static_cast<double*>(smem);
    double mx = 0.0;
    for (i64 e = b.rank(); e < s * s; e += b.size()) {
      const double v = D[(e / s) * ld + e % s];
      mx = mx < v ? v : mx;
    }
    buf[b.rank()] = mx;
    b.sync();
    if (b.rank() == 0) {
      double m = 0.0;
      for (i64 i = 0; i < b.size(); ++i) m = m < buf[i] ? buf[i] : m;
      *dmax = m;
    }
  }
};

/// ρ_i = core::density of the k = c smallest entries of row i of D, found by
/// sorting the row in shared memory (bitonic; smem: pow2_at_least(s_max)
/// doubles). One block per row; grid s_max.
struct recycle_density {
  const double* D;
  i64 ld;
  double* rho;
  step_counts* counts;

  template <class Block>
  SPARSEVLM_HD void operator()(const Block& b, void* smem) const {
    const i64 s = counts->recycled, i = b.bx();
    if (failed(counts) || i >= s) return;
    double* v = static_cast<double*>(smem);
    const i64 n = pow2_at_least(s);
    for (i64 j = b.rank(); j < n; j += b.size()) v[j] = j < s ? D[i * ld + j] : INFINITY;
    b.sync();
    bitonic_sort(b, v, n);
    if (b.rank() == 0) rho[i] = density(v, counts->clusters);
  }
};

/// δ_i = min D[i][j] over the tokens j denser than i (core::denser), D's max
/// for the densest; γ_i = ρ_i·δ_i. One thread per token (grid-stride).
struct recycle_gamma {
  const double* D;
  i64 ld;
  const double* rho;
  const double* dmax;
  double* gamma;
  step_counts* counts;

  template <class Block>
  SPARSEVLM_HD void operator()(const Block& b, void*) const {
    if (failed(counts)) return;
    const i64 s = counts->recycled;
    for (i64 i = thread_id(b); i < s; i += thread_count(b)) {
      double delta = *dmax;
      for (i64 j = 0; j < s; ++j)
        if (denser(rho[j], j, rho[i], i)) delta = nearer(delta, D[i * ld + j]);
      gamma[i] = rho[i] * delta;
    }
  }
};

/// Each token's position in the order ranks_before on γ; the first c are the
/// centres, centres[q] = the q-th. One thread per token (grid-stride).
struct recycle_centres {
  const double* gamma;
  i64* gpos;
  i64* centres;
  step_counts* counts;

  template <class Block>
  SPARSEVLM_HD void operator()(const Block& b, void*) const {
    if (failed(counts)) return;
    const i64 s = counts->recycled, c = counts->clusters;
    for (i64 i = thread_id(b); i < s; i += thread_count(b)) {
      i64 before = 0;
      for (i64 j = 0; j < s; ++j)
        if (ranks_before(gamma[j], j, gamma[i], i)) ++before;
      gpos[i] = before;
      if (before < c) centres[before] = i;
    }
  }
};

/// label[i]: a centre's own cluster, else the nearest centre (strictly nearer
/// replaces, so ties go to the earlier centre). One thread per token.
struct recycle_assign {
  const double* D;
  i64 ld;
  const i64* gpos;
  const i64* centres;
  i64* label;
  step_counts* counts;

  template <class Block>
  SPARSEVLM_HD void operator()(const Block& b, void*) const {
    if (failed(counts)) return;
    const i64 s = counts->recycled, c = counts->clusters;
    for (i64 i = thread_id(b); i < s; i += thread_count(b)) {
      if (gpos[i] < c) {
        label[i] = gpos[i];
        continue;
      }
      label[i] = nearest_centre(D + i * ld, centres, c);
    }
  }
};

/// offsets[q] = members before cluster q (c + 1 entries). One block; smem none.
struct recycle_offsets {
  const i64* label;
  i64* offsets;
  step_counts* counts;

  template <class Block>
  SPARSEVLM_HD void operator()(const Block& b, void*) const {
    if (failed(counts)) return;
    const i64 s = counts->recycled, c = counts->clusters;
    for (i64 q = b.rank(); q < c; q += b.size()) {
      i64 n = 0;
      for (i64 i = 0; i < s; ++i) n += label[i] == q ? 1 : 0;
      offsets[q + 1] = n;
    }
    b.sync();
    if (b.rank() == 0) {
      offsets[0] = 0;
      for (i64 q = 0; q < c; ++q) offsets[q + 1] += offsets[q];
    }
  }
};

/// Cluster members as absolute positions, ascending within each cluster
/// (members[offsets[q] ..]). One thread per token (grid-stride).
struct recycle_members {
  const i64* order;
  const i64* label;
  const i64* offsets;
  i64 first_visual;
  i64* members;
  step_counts* counts;

  template <class Block>
  SPARSEVLM_HD void operator()(const Block& b, void*) const {
    if (failed(counts)) return;
    const i64 s = counts->recycled;
    const i64* sel = order + counts->keep;
    for (i64 i = thread_id(b); i < s; i += thread_count(b)) {
      i64 within = 0;
      for (i64 j = 0; j < s; ++j) within += (label[j] == label[i] && sel[j] < sel[i]) ? 1 : 0;
      members[offsets[label[i]] + within] = first_visual + sel[i];
    }
  }
};

/// merged[q][col] = float((Σ over members, ascending positions, of double(x)) /
/// count). One thread per (cluster, column), grid-stride over c_max·d.
template <class TH>
struct recycle_merge {
  rows2<TH> hidden;
  i64 dim, c_max;
  const i64* offsets;
  const i64* members;
  float* merged;  ///< [c_max, d]
  step_counts* counts;

  template <class Block>
  SPARSEVLM_HD void operator()(const Block& b, void*) const {
    if (failed(counts)) return;
    const i64 c = counts->clusters;
    for (i64 e = thread_id(b); e < c * dim; e += thread_count(b)) {
      const i64 q = e / dim, col = e % dim;
      double acc = 0.0;
      for (i64 m = offsets[q]; m < offsets[q + 1]; ++m)
        acc += static_cast<double>(hidden.at(members[m], col));
      merged[q * dim + col] =
          static_cast<float>(acc / static_cast<double>(offsets[q + 1] - offsets[q]));
    }
  }
};

// ---- stage 8: the plan (plan.hpp) -------------------------------------------

/// The new sequence: prefix, kept tokens, -(k + 1) for recycled token k, text.
/// Writes counts->length (−1 when a flag is raised: nothing else is written).
/// Grid-stride over L.
struct plan_sequence {
  i64 length, first_visual, n_visual;
  const i64* keep;
  i64* sequence;
  step_counts* counts;

  template <class Block>
  SPARSEVLM_HD void operator()(const Block& b, void*) const {
    const bool bad = failed(counts);
    const i64 k = counts->keep, c = counts->clusters, S = first_visual;
    const i64 n = length - n_visual + k + c;
    if (thread_id(b) == 0) counts->length = bad ? -1 : n;
    if (bad) return;
    for (i64 i = thread_id(b); i < n; i += thread_count(b))
      sequence[i] = sequence_entry(i, S, n_visual, keep, k, c);
  }
};

/// What a recycled entry of the sequence becomes in a gathered array.
enum class recycled_rows {
  merged,        ///< the cluster mean (hidden states): merged row k, converted
  first_member,  ///< the row of the cluster's first member (position ids)
  drop           ///< no row: the entry is skipped (K/V of layers before the step)
};

/// Row r of `out` after the step. Returns the source row (>= 0), or -(k + 1) for
/// recycled token k, or a huge negative value when out row r does not exist.
SPARSEVLM_HD inline i64 plan_source(const i64* sequence, const step_counts* counts, i64 r,
                                    recycled_rows mode, i64 first_visual) noexcept {
  const i64 n = counts->length, c = counts->clusters, k = counts->keep;
  if (mode == recycled_rows::drop) {
    if (r >= n - c) return INT64_MIN;
    return sequence[r < first_visual + k ? r : r + c];
  }
  return r < n ? sequence[r] : INT64_MIN;
}

/// out[r][a][b] for r < the new length: in[source] or the recycled row, per
/// `mode`. [tokens, A, B] views with any strides (hidden states [L, 1, d], K/V
/// [L, heads, head_dim], position ids [L, 1, rows]). Does nothing after an
/// error (length −1). Grid-stride over rows_max·A·B.
template <class T>
struct plan_gather {
  const T* in;
  i64 in_s0, in_s1, in_s2;
  T* out;
  i64 out_s0, out_s1, out_s2;
  i64 rows_max, A, B;
  recycled_rows mode;
  const float* merged;  ///< [c, A·B] row-major (mode merged)
  const i64* offsets;   ///< (mode first_member)
  const i64* members;
  const i64* sequence;
  i64 first_visual;
  const step_counts* counts;

  template <class Block>
  SPARSEVLM_HD void operator()(const Block& b, void*) const {
    if (counts->length < 0) return;
    const i64 per_row = A * B;
    for (i64 e = thread_id(b); e < rows_max * per_row; e += thread_count(b)) {
      const i64 r = e / per_row, x = (e % per_row) / B, y = e % B;
      const i64 src = plan_source(sequence, counts, r, mode, first_visual);
      if (src == INT64_MIN) continue;
      T v;
      if (src >= 0) {
        v = in[src * in_s0 + x * in_s1 + y * in_s2];
      } else if (mode == recycled_rows::first_member) {
        v = in[members[offsets[-src - 1]] * in_s0 + x * in_s1 + y * in_s2];
      } else {
        if constexpr (std::is_same_v<T, float> || std::is_same_v<T, half> ||
                      std::is_same_v<T, bfloat16>) {
          v = from_float<T>(merged[(-src - 1) * per_row + x * B + y]);
        } else {
          continue;  // integer arrays have no merged rows (checked by the launcher)
        }
      }
      out[r * out_s0 + x * out_s1 + y * out_s2] = v;
    }
  }
};

/// Renumbered position ids: out[row][i] = i for i < the new length.
struct plan_renumber {
  i64* out;
  i64 s0, s1, rows, rows_max;
  const step_counts* counts;

  template <class Block>
  SPARSEVLM_HD void operator()(const Block& b, void*) const {
    const i64 n = counts->length;
    if (n < 0) return;
    for (i64 e = thread_id(b); e < rows * rows_max; e += thread_count(b)) {
      const i64 r = e / rows_max, i = e % rows_max;
      if (i < n) out[r * s0 + i * s1] = i;
    }
  }
};

}  // namespace sparsevlm::core::kernels
