// Stages 2-3 on the device: P and the scores, from the attention probabilities
// (scores.hpp) or from queries and keys (scores_qk.hpp). Launched by
// pipeline.hpp's scores_attention / scores_qk, enqueued by cuda/scores.cuh.
// Conventions: step_kernels.hpp.
#pragma once

#include <cmath>
#include <cstdint>

#include "step_kernels.hpp"

namespace sparsevlm::cuda::detail {

/// The scores of a block's `cols` columns from P (core::column_score, raters in
/// order), one thread per column, after the block's barrier; raises flag_scores on
/// a non-finite score.
template <class Block>
SPARSEVLM_HD void finish_columns(const Block& b, i64 cols, i64 n_visual, i64 R, float hf,
                                 float* P, float* scores, step_counts* counts) {
  const i64 j = b.bx() * cols + b.rank();
  if (b.rank() >= cols || j >= n_visual) return;
  const float score = core::column_score(R, hf, P + j, n_visual);
  scores[j] = score;
  if (!std::isfinite(score)) core::raise_flag(&counts->flags[flag_scores]);
}

/// P[r][j] = (Σ_h attn[h][raters[r]][S + j]) / H in float32, heads in order;
/// score[j] = (Σ_r P[r][j]) / R, raters in order: core::column_score, as the
/// CPU's finish_scores. A block takes `cols` adjacent columns (the grid is
/// ceil(N / cols)): its threads are size()/cols lanes of raters × cols columns,
/// each (r, j) summing its heads in order (adjacent threads read adjacent
/// columns), then after the barrier one thread per column adds its raters in
/// order. Every sum is one thread's, in the CPU's order.
template <class TA>
struct scores_from_attention {
  rows3<TA> attn;
  i64 heads, first_visual, n_visual, cols;
  const i64* raters;
  float* P;  ///< [R, N]
  float* scores;
  step_counts* counts;

  template <class Block>
  SPARSEVLM_HD void operator()(const Block& b, void*) const {
    if (failed(counts, flag_scores)) return;
    const i64 R = counts->raters;
    const i64 lanes = b.size() / cols, lane = b.rank() / cols;
    const i64 j = b.bx() * cols + b.rank() % cols;
    if (lane < lanes && j < n_visual)
      for (i64 r = lane; r < R; r += lanes) {
        const i64 q = raters[r];
        float p = 0.0f;
        for (i64 h = 0; h < heads; ++h) p = core::add_rn(p, attn.at(h, q, first_visual + j));
        P[r * n_visual + j] = p;
      }
    b.sync();
    finish_columns(b, cols, n_visual, R, static_cast<float>(heads), P, scores, counts);
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
      core::raise_flag(&counts->flags[flag_scores]);
      return;
    }
    const i64 keys = raters[R - 1] + 1;
    // (head, rater tile) on x, key tiles on y: heads·r_tiles may exceed y's 65,535.
    const i64 h = b.bx() / r_tiles, r0 = (b.bx() % r_tiles) * Tile, u0 = b.by() * Tile;
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
      const double v = static_cast<double>(core::mul_rn(scale, zr[u]));
      finite = finite && std::isfinite(v);
      mx = mx < v ? v : mx;
    }
    if (!finite) core::raise_flag(&counts->flags[flag_scores]);
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
        if (!std::isfinite(l)) core::raise_flag(&counts->flags[flag_scores]);
        offset[idx] = l;
        sum[idx] = 1.0;
      }
      return;
    }
    double s = 0.0;  // thread 0's running sum, keys in order
    for (i64 base = 0; base <= t; base += nt) {
      const i64 u = base + tid;
      buf[tid] = u <= t ? core::exp64(core::sub_rn(static_cast<double>(core::mul_rn(scale, zr[u])),
                                                   row_max))
                        : 0.0;
      b.sync();
      if (tid == 0) {
        const i64 n = t + 1 - base < nt ? t + 1 - base : nt;
        for (i64 i = 0; i < n; ++i) s = core::add_rn(s, buf[i]);
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
/// offset) / sum), then exactly scores_from_attention's sums, with its layout:
/// `cols` columns a block, lanes of raters, then one thread per column.
struct scores_from_qk {
  const float* z;
  i64 heads, r_max, k_max;
  float scale;
  const double* offset;
  const double* sum;
  i64 first_visual, n_visual, cols;
  float* P;
  float* scores;
  step_counts* counts;

  template <class Block>
  SPARSEVLM_HD void operator()(const Block& b, void*) const {
    if (failed(counts, flag_scores)) return;
    const i64 R = counts->raters;
    const i64 lanes = b.size() / cols, lane = b.rank() / cols;
    const i64 j = b.bx() * cols + b.rank() % cols;
    if (lane < lanes && j < n_visual)
      for (i64 r = lane; r < R; r += lanes) {
        float p = 0.0f;
        for (i64 h = 0; h < heads; ++h) {
          const i64 idx = h * r_max + r;
          const double zz =
              static_cast<double>(core::mul_rn(scale, z[idx * k_max + first_visual + j]));
          p = core::add_rn(
              p, static_cast<float>(core::div_rn(core::exp64(core::sub_rn(zz, offset[idx])), sum[idx])));
        }
        P[r * n_visual + j] = p;
      }
    b.sync();
    finish_columns(b, cols, n_visual, R, static_cast<float>(heads), P, scores, counts);
  }
};

}  // namespace sparsevlm::cuda::detail
