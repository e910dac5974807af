// Stages 5-6 on the device: the keep count with the recycling sizes
// (keep_count.hpp, core::decide_keep and core::recycled_counts) and the keep set
// (keep_set.hpp, in core::ranks_before's order). Launched by pipeline.hpp's
// keep_count / keep_set, enqueued by cuda/keep_set.cuh. Conventions:
// step_kernels.hpp.
#pragma once

#include <cstdint>

#include "step_kernels.hpp"

namespace sparsevlm::cuda::detail {

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
    const i64 keep =
        core::decide_keep(N, counts->raters, counts->rank, fixed, fixed_keep, scale, bias);
    const core::recycle_counts rc = core::recycled_counts(N - keep, recycle, fraction, divisor);
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
          if (core::ranks_before(chunk[q], base + q, sj, j)) ++before;
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

}  // namespace sparsevlm::cuda::detail
