// Stage 7 on the device: recycling by DPC-KNN (recycle.hpp).
#pragma once

#include "common.cuh"

namespace sparsevlm::cuda {

/// Clusters the s recycled tokens (the best-scored pruned ones) and merges
/// them, with recycle()'s rules: the Gram matrix of their hidden rows by
/// canonical float64 dot products (32×32 tiles), D = detail::core::gram_distance over
/// it in place, ρ from each row's c smallest entries (the row sorted in shared
/// memory), δ and γ = ρ·δ by detail::core::denser / detail::core::nearer, the c best γ by
/// detail::core::ranks_before as centres, every other token to its nearest centre
/// (ties to the earlier), members listed ascending, and each merged row the
/// double-precision sum of its members' rows in ascending position order.
///
/// - `hidden`: [L, d] float32/float16/bfloat16 in device memory, any strides.
/// - Limit: one row of D in shared memory, pow2(s_max)·8 bytes (s_max <= 16384
///   on H100/A100, i.e. N up to ~54 000 at the authors' fraction 0.3).
/// - ρ uses the library's exp (core/exp.hpp), as the CPU does: the same
///   densities, so the spec's exact ties (and every other decision) are kept.
/// - Errors: sparsevlm::error for extents beyond the step or the workspace's
///   shape; NaN/Inf in a merged row raises non_finite_hidden.
namespace detail {

/// recycle_async's host checks.
template <class TH>
void check_recycle_hidden(const device_step& step, matrix_view<const TH> hidden) {
  SPARSEVLM_CHECK(hidden.extent(0) == step.length, errc::shape_mismatch, "hidden.extent[0]",
                  sparsevlm::detail::concat(step.length, " (the step's length)"), hidden.extent(0));
  SPARSEVLM_CHECK(hidden.extent(1) == step.hidden_dim, errc::shape_mismatch, "hidden.extent[1]",
                  sparsevlm::detail::concat(step.hidden_dim, " (shape.hidden_dim)"),
                  hidden.extent(1));
}

}  // namespace detail

template <class TH>
cudaError_t recycle_async(const device_step& step, matrix_view<const TH> hidden,
                          cudaStream_t stream) {
  detail::check_recycle_hidden(step, hidden);
  if (const cudaError_t e = detail::check_device_pointer(hidden.data(), "hidden"); e != cudaSuccess)
    return e;
  detail::device_exec ex(stream);
  if (ex.status != cudaSuccess) return ex.status;
  detail::pipeline::recycle(ex, detail::rows_of(hidden), step.visual.start, hidden.extent(1),
                          step.bounds.s_max, step.bounds.c_max, step.buf);
  return ex.status;
}

}  // namespace sparsevlm::cuda
