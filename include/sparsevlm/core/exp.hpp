// The library's exp in double (cpu/kernel_table.hpp: one fixed algorithm, not
// the C library's) as a __host__ __device__ function: the scalar CPU kernels
// and the CUDA kernels both call this, so softmax weights and densities have
// the same bits on every backend.
#pragma once

#include <cmath>

#include "../config.hpp"
#include "../cpu/kernel_table.hpp"
#include "dot.hpp"

namespace sparsevlm::detail::core {

/// exp(x): k = nearbyint(x·log2 e), r = x − k·ln2 (two fused steps), a degree-13
/// Taylor polynomial by fused Horner steps, then p·2^k (ldexp, exact or
/// correctly rounded). NaN stays NaN; x is clamped to [−746, 710] first (0 and
/// +Inf beyond). Within 2 ulp of the true value.
SPARSEVLM_HD inline double exp64(double x) noexcept {
  using K = cpu::detail::exp_constants;
  // Local copies: constant expressions, so device code needs no global array.
  constexpr double c[14] = {K::c[0], K::c[1], K::c[2],  K::c[3],  K::c[4],  K::c[5],  K::c[6],
                            K::c[7], K::c[8], K::c[9], K::c[10], K::c[11], K::c[12], K::c[13]};
  constexpr double lo = K::lo, hi = K::hi, log2e = K::log2e;
  constexpr double ln2_hi = K::ln2_hi, ln2_lo = K::ln2_lo;
  if (x != x) return x;  // NaN
  x = x < lo ? lo : (x > hi ? hi : x);
  using std::ldexp;
  using std::nearbyint;
  const double k = nearbyint(mul_rn(x, log2e));
  double r = fma64(-k, ln2_hi, x);
  r = fma64(-k, ln2_lo, r);
  double p = c[0];
  for (int i = 1; i < 14; ++i) p = fma64(p, r, c[i]);
  return ldexp(p, static_cast<int>(k));
}

}  // namespace sparsevlm::detail::core
