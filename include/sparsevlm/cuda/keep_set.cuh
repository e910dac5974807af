// Stages 5-6 on the device: the keep count (keep_count.hpp) and the keep set
// (keep_set.hpp's select_keep), with the recycling sizes s and c.
#pragma once

#include "../keep_count.hpp"
#include "../recycle.hpp"
#include "common.cuh"

namespace sparsevlm::cuda {

/// keep from the rank and `opt.policy` (keep_count), then s = recycle_count and
/// c = cluster_count when `opt.recycle` is on (core/math.hpp's functions, the
/// CPU's). One thread.
/// Errors: sparsevlm::error for a bad policy or recycling options, or a
/// recycling fraction / divisor beyond the workspace's shape.
inline cudaError_t keep_count_async(const device_step& step, const step_options& opt,
                                    cudaStream_t stream) {
  const detail::pipeline::decide_args a = detail::decide_args_of(opt, step.bounds, step.visual.len);
  detail::device_exec ex(stream);
  if (ex.status != cudaSuccess) return ex.status;
  detail::pipeline::keep_count(ex, step.visual.len, a, step.buf);
  return ex.status;
}

/// The keep set: the `keep` tokens first in the order detail::core::ranks_before (higher
/// score, ties to the lower position), listed ascending; the pruned tokens in
/// that order feed recycling. Each token's place is the count of tokens ranking
/// before it (O(N²) comparisons from shared memory, ~85 M at N = 9216: cheaper
/// than a radix sort's launches at these sizes, and exact), then a block-wide
/// prefix sum lists the kept positions.
inline cudaError_t select_keep_async(const device_step& step, cudaStream_t stream) {
  detail::device_exec ex(stream);
  if (ex.status != cudaSuccess) return ex.status;
  detail::pipeline::keep_set(ex, step.visual.start, step.visual.len, step.buf);
  return ex.status;
}

}  // namespace sparsevlm::cuda
