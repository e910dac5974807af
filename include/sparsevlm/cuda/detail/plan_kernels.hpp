// Stage 8 on the device: the new sequence (plan.hpp's make_sequence) and the
// gathers that apply it to hidden states, K/V and position ids (apply_plan).
// Launched by pipeline.hpp's sequence / gather, enqueued by cuda/plan.cuh.
// Conventions: step_kernels.hpp.
#pragma once

#include <cstdint>

#include "step_kernels.hpp"

namespace sparsevlm::cuda::detail {

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
      sequence[i] = core::sequence_entry(i, S, n_visual, keep, k, c);
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

}  // namespace sparsevlm::cuda::detail
