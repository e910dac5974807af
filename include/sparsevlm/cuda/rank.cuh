// Stage 4 on the device: the numerical rank of P (rank.hpp's numerical_rank).
#pragma once

#include "common.cuh"

namespace sparsevlm::cuda {

/// rank = #{λ of G > λ_max·(max(R, N)·2^-23)²} with G = P·Pᵀ (R <= N) or Pᵀ·P,
/// m = min(R, N): G by canonical float64 dot products in 32×32 (or 16×16) tiles, then the
/// CPU's own rank arithmetic (core/eigen.hpp's gram_rank) on ONE thread block:
/// the Householder reduction's per-row loops are split over the block (each
/// cross-row sum taken by every thread itself, as 8 lane sums in a fixed order;
/// three barriers per column), and the Sturm counts that
/// find λ_max (64 points per multisection round, about 9 rounds) and count the
/// eigenvalues above the threshold are spread over the threads. Same bits as
/// the CPU, hence the same rank.
///
/// Limit and fallback: G lives in shared memory while (m² + 2m + 72)·8 bytes fit
/// the device's opt-in limit (227 KB on H100: m <= 169; 163 KB on A100: m <= 143;
/// m <= 128 fits both); a larger m runs the same code on G in global memory
/// (same bits; the O(m²) serial steps then pay global-memory latency). m is
/// bounded by the workspace's shape (min(T, N)).
/// Cost: m²·max(R,N)/2 multiply-adds for G; 4m³/3 for the reduction in 3
/// block-wide steps per column with O(m²) serial sums in all; then about 9
/// rounds of one Sturm count (m steps) per thread.
inline cudaError_t numerical_rank_async(const device_step& step, cudaStream_t stream) {
  detail::device_exec ex(stream);
  if (ex.status != cudaSuccess) return ex.status;
  detail::pipeline::rank(
      ex, step.visual.len,
      std::min(detail::pipeline::raters_bound(step.length, step.visual.start, step.visual.len),
               step.visual.len),
      step.buf);
  return ex.status;
}

}  // namespace sparsevlm::cuda
