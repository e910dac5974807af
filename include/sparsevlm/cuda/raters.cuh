// Stage 1 on the device: the text raters (raters.hpp's select_raters), or the
// caller's own.
#pragma once

#include <span>

#include "../check.hpp"
#include "common.cuh"

namespace sparsevlm::cuda {

namespace detail {

/// select_raters_async's host checks.
template <class TE>
void check_select_raters(const device_step& step, matrix_view<const TE> embeds) {
  SPARSEVLM_CHECK(embeds.extent(0) == step.length, errc::shape_mismatch, "embeds.extent[0]",
                  sparsevlm::detail::concat(step.length, " (the step's length)"), embeds.extent(0));
  SPARSEVLM_CHECK(embeds.extent(1) >= 1, errc::shape_mismatch, "embeds.extent[1]", ">= 1",
                  embeds.extent(1));
  SPARSEVLM_CHECK(step.bounds.embed_dim > 0, errc::invalid_argument, "shape.embed_dim",
                  "> 0 in the workspace's shape to choose raters on the device", 0);
}

/// set_raters_async's host check.
inline void check_set_raters(const device_step& step, std::span<const index_t> raters) {
  const index_t T = step.length - step.visual.end();
  SPARSEVLM_CHECK(static_cast<index_t>(raters.size()) <= T, errc::invalid_argument,
                  "raters.size()", sparsevlm::detail::concat("<= ", T, " (the text tokens)"),
                  raters.size());
}

}  // namespace detail

/// Chooses the raters from the embeddings, as select_raters: M = softmax over
/// the text of V·Tᵀ (float32 canonical dot products, 32×32 tiles; the softmax
/// in double, each row's sum and each text token's column sum in one thread in
/// the CPU's order), raters where m[t] > mean(m).
///
/// - `embeds`: [L, d_e] float32/float16/bfloat16 in device memory, any strides.
/// - Work: O(N·T·d_e) multiply-adds, 2·N·T exp. The count R stays on the device.
/// - exp is the library's own (core/exp.hpp), the CPU's, not CUDA's: the same
///   m[t] bits, hence the same raters.
/// - Errors: sparsevlm::error for extents that do not match the step or a
///   workspace sized without embed_dim; NaN/Inf logits raise non_finite_embeds.
template <class TE>
cudaError_t select_raters_async(const device_step& step, matrix_view<const TE> embeds,
                                cudaStream_t stream) {
  detail::check_select_raters(step, embeds);
  if (const cudaError_t e = detail::check_device_pointer(embeds.data(), "embeds"); e != cudaSuccess)
    return e;
  detail::device_exec ex(stream);
  if (ex.status != cudaSuccess) return ex.status;
  detail::pipeline::select_raters(ex, detail::rows_of(embeds), step.length, step.visual.start,
                                step.visual.len, embeds.extent(1), step.buf);
  return ex.status;
}

/// Uses the caller's raters: `raters` is a span over DEVICE memory of absolute
/// positions, ascending, inside the text [S+N, L) (checked on the device:
/// otherwise the bad_raters flag is raised and the step's length is −1).
/// Errors: sparsevlm::error when there are more raters than text tokens.
inline cudaError_t set_raters_async(const device_step& step, std::span<const index_t> raters,
                                    cudaStream_t stream) {
  detail::check_set_raters(step, raters);
  if (const cudaError_t e = detail::check_device_pointer(raters.data(), "raters"); e != cudaSuccess)
    return e;
  detail::device_exec ex(stream);
  if (ex.status != cudaSuccess) return ex.status;
  detail::pipeline::given_raters(ex, raters.data(), static_cast<index_t>(raters.size()),
                               step.visual.start, step.visual.len, step.length, step.buf);
  return ex.status;
}

}  // namespace sparsevlm::cuda
