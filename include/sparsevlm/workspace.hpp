// Reusable scratch memory for a pruning step.
#pragma once

#include <cstddef>
#include <vector>

#include "view.hpp"

namespace sparsevlm {

/// Scratch buffers reused across steps. A step grows them to the shape it sees
/// and never shrinks them, so after the first step of a model shape the stages
/// allocate nothing except their results. Not thread-safe: one per thread.
class workspace {
 public:
  /// Bytes currently held (a measure for engines that budget memory).
  [[nodiscard]] std::size_t bytes() const noexcept {
    return (f32_a.capacity() + f32_b.capacity() + f32_c.capacity() + f32_d.capacity() +
            f32_e.capacity() + f32_f.capacity()) *
               sizeof(float) +
           (f64_a.capacity() + f64_b.capacity() + f64_c.capacity() + f64_d.capacity() +
            f64_e.capacity()) *
               sizeof(double) +
           (idx_a.capacity() + idx_b.capacity() + idx_c.capacity() + idx_d.capacity() +
            idx_e.capacity()) *
               sizeof(index_t);
  }

  /// Grows `v` to at least `n` elements and returns its data.
  template <class T>
  static T* take(std::vector<T>& v, std::size_t n) {
    if (v.size() < n) v.resize(n);
    return v.data();
  }

  // Stages use these in a fixed way; they are public so that the stage headers
  // need no friendship, not for callers. A buffer is only held across a call to
  // another stage where this table says so (take() may reallocate):
  //   f32_a  raters: visual rows (when converted); prune_step: P (after raters)
  //   f32_b  raters: text rows (when converted);  scores_qk: one key head;
  //          recycle: the selected rows
  //   f32_c  raters: logits (N·T);  scores_qk: one query row
  //   f32_d  scoring driver: one row of probabilities
  //   f32_e  scoring driver: the gravity table (R·N)
  //   f32_f  scores_qk: one row of logits
  //   f64_a  raters: m;  gravity: one row of biases;  recycle: the Gram matrix
  //   f64_b  raters: exps;  scoring driver: head totals;  rank: P in double;
  //          dpc_knn: rho, gamma, scratch row
  //   f64_c  rank: Gram matrix;  scores_qk: logits;  recycle: D
  //   f64_d  recycle: cluster sums; gravity: frequencies
  //   f64_e  gravity: distance table
  //   idx_a  select_keep: order          idx_b  prune_step: ranked pruned tokens
  //   idx_c  scoring driver: chosen heads; recycle: seen marks
  //   idx_d  scoring driver: head order; recycle: centres
  //   idx_e  recycle: labels
  std::vector<float> f32_a, f32_b, f32_c, f32_d, f32_e, f32_f;
  std::vector<double> f64_a, f64_b, f64_c, f64_d, f64_e;
  std::vector<index_t> idx_a, idx_b, idx_c, idx_d, idx_e;
};

}  // namespace sparsevlm
