// Stage 1 on the device: the raters (raters.hpp's select_raters, or the caller's
// raters checked as check_raters does). Launched by pipeline.hpp's
// select_raters / given_raters, enqueued by cuda/raters.cuh. Conventions:
// step_kernels.hpp.
#pragma once

#include <cstdint>

#include "step_kernels.hpp"

namespace sparsevlm::cuda::detail {

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
          if (!std::isfinite(v)) core::raise_flag(&counts->flags[flag_embeds]);
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
      for (i64 t = 0; t < n_text; ++t)
        sum = core::add_rn(sum, core::exp64(core::sub_rn(static_cast<double>(li[t]), mx)));
      row_max[i] = mx;
      row_sum[i] = sum;
    }
  }
};

/// Per text token t: m[t] = (Σ_i exp(logit[i][t] − max_i) / sum_i) / N, visual
/// rows in order (the CPU adds row i's probabilities into m row by row; each
/// m[t] sees the same additions in the same order). One block per text token
/// (grid T): its threads compute a chunk of the terms into shared memory, then
/// thread 0 adds them in row order; smem: size() doubles.
struct rater_column_means {
  const float* logits;
  i64 n_visual, n_text;
  const double* row_max;
  const double* row_sum;
  double* m;

  template <class Block>
  SPARSEVLM_HD void operator()(const Block& b, void* smem) const {
    const i64 t = b.bx();
    if (t >= n_text) return;
    double* buf = static_cast<double*>(smem);
    const i64 tid = b.rank(), nt = b.size();
    double acc = 0.0;  // thread 0's running sum, rows in order
    for (i64 base = 0; base < n_visual; base += nt) {
      const i64 i = base + tid;
      if (i < n_visual)
        buf[tid] = core::div_rn(
            core::exp64(core::sub_rn(static_cast<double>(logits[i * n_text + t]), row_max[i])),
            row_sum[i]);
      b.sync();
      if (tid == 0) {
        const i64 n = n_visual - base < nt ? n_visual - base : nt;
        for (i64 k = 0; k < n; ++k) acc = core::add_rn(acc, buf[k]);
      }
      b.sync();
    }
    if (tid == 0) m[t] = core::div_rn(acc, static_cast<double>(n_visual));
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
    counts->raters = core::pick_raters(m, n_text, first_text, raters);
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
        core::raise_flag(&counts->flags[flag_raters]);
      raters[r] = v;
    }
    if (thread_id(b) == 0) counts->raters = n_given;
  }
};

}  // namespace sparsevlm::cuda::detail
