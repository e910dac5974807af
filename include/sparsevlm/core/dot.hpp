// The canonical dot products (cpu/kernel_table.hpp) as __host__ __device__
// functions: the scalar CPU kernels and the CUDA kernels both call these, so a
// logit, a Gram entry or a distance has the same bits on every backend.
#pragma once

#include <cmath>
#include <cstdint>

#include "../config.hpp"
#include "rn.hpp"

namespace sparsevlm::detail::core {

/// Partial sums of a float32 dot product (lane l accumulates elements l, l + 16, ...).
inline constexpr int dot32_lanes = 16;
/// Partial sums of a float64 dot product of float32 rows.
inline constexpr int dot64_lanes = 8;

/// a·b + c rounded once. Spelled out per side so that neither compiler has a
/// choice: nvcc's __fmaf_rn is the fused instruction whatever -fmad says.
SPARSEVLM_HD inline float fma32(float a, float b, float c) noexcept {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

SPARSEVLM_HD inline double fma64(double a, double b, double c) noexcept {
#if defined(__CUDA_ARCH__)
  return __fma_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

/// The 16 partial sums combined pairwise: l + 8, then + 4, + 2, + 1.
SPARSEVLM_HD inline float reduce16(const float* s) noexcept {
  float h[8];
  for (int l = 0; l < 8; ++l) h[l] = add_rn(s[l], s[l + 8]);
  for (int l = 0; l < 4; ++l) h[l] = add_rn(h[l], h[l + 4]);
  for (int l = 0; l < 2; ++l) h[l] = add_rn(h[l], h[l + 2]);
  return add_rn(h[0], h[1]);
}

/// The 8 partial sums combined pairwise: l + 4, then + 2, + 1.
SPARSEVLM_HD inline double reduce8(const double* s) noexcept {
  double h[4];
  for (int l = 0; l < 4; ++l) h[l] = add_rn(s[l], s[l + 4]);
  for (int l = 0; l < 2; ++l) h[l] = add_rn(h[l], h[l + 2]);
  return add_rn(h[0], h[1]);
}

/// Half of reduce8: the four partial sums of the lanes of one parity g (lanes
/// g, g + 2, g + 4, g + 6, in that order in `p`) combined as reduce8 combines
/// them, so that reduce8(s) == add_rn(reduce8_half(s[0, 2, 4, 6]),
/// reduce8_half(s[1, 3, 5, 7])) bit for bit: reduce8 adds l and l + 4, then
/// l and l + 2, and those pairs never mix the parities before the last add.
/// Lets two blocks share one dot64's lanes (the CUDA recycling Gram at small
/// sizes) without changing its bits.
SPARSEVLM_HD inline double reduce8_half(const double* p) noexcept {
  return add_rn(add_rn(p[0], p[2]), add_rn(p[1], p[3]));
}

/// float32 dot product of `d` elements, `a(k)` and `b(k)` returning the k-th
/// element as float (exact conversions: the caller's loaders decide strides and
/// element types). 16 fused partial sums; in the last, partial chunk the lanes
/// past `d` multiply zeros, as every kernel table does.
template <class A, class B>
SPARSEVLM_HD float dot32_by(A&& a, B&& b, std::int64_t d) noexcept {
  float acc[dot32_lanes] = {};
  for (std::int64_t k = 0; k < d; k += dot32_lanes)
    for (int l = 0; l < dot32_lanes; ++l) {
      const bool in = k + l < d;
      acc[l] = fma32(in ? a(k + l) : 0.0f, in ? b(k + l) : 0.0f, acc[l]);
    }
  return reduce16(acc);
}

/// float64 dot product of two float32 sequences (widened exactly), 8 fused
/// partial sums, same rules.
template <class A, class B>
SPARSEVLM_HD double dot64_by(A&& a, B&& b, std::int64_t d) noexcept {
  double acc[dot64_lanes] = {};
  for (std::int64_t k = 0; k < d; k += dot64_lanes)
    for (int l = 0; l < dot64_lanes; ++l) {
      const bool in = k + l < d;
      acc[l] = fma64(in ? static_cast<double>(a(k + l)) : 0.0,
                     in ? static_cast<double>(b(k + l)) : 0.0, acc[l]);
    }
  return reduce8(acc);
}

/// dot32 of cpu/kernel_table.hpp over contiguous rows.
SPARSEVLM_HD inline float dot32(const float* a, const float* b, std::int64_t d) noexcept {
  return dot32_by([a](std::int64_t k) { return a[k]; }, [b](std::int64_t k) { return b[k]; }, d);
}

/// dot64 of cpu/kernel_table.hpp over contiguous rows.
SPARSEVLM_HD inline double dot64(const float* a, const float* b, std::int64_t d) noexcept {
  return dot64_by([a](std::int64_t k) { return a[k]; }, [b](std::int64_t k) { return b[k]; }, d);
}

}  // namespace sparsevlm::detail::core
