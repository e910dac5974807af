// Stage 5: how many visual tokens to keep.
#pragma once

#include <algorithm>
#include <cmath>

#include "core/math.hpp"
#include "error.hpp"
#include "types.hpp"

namespace sparsevlm {

/// Validates a keep policy: finite scale and bias, or a fixed count >= 0.
inline void check_policy(const keep_policy& p) {
  if (p.kind == keep_policy::kind_t::rank) {
    SPARSEVLM_CHECK(std::isfinite(p.scale), errc::invalid_argument, "policy.scale",
                    "a finite number", p.scale);
    SPARSEVLM_CHECK(std::isfinite(p.bias), errc::invalid_argument, "policy.bias",
                    "a finite number", p.bias);
  } else {
    SPARSEVLM_CHECK(p.keep >= 0, errc::invalid_argument, "policy.keep", ">= 0", p.keep);
  }
}

/// Keep count (spec step 5).
///
/// - No raters (`n_raters == 0`): N, nothing is pruned.
/// - Rank policy: N when rank == N; else max(0, min(floor(rank·scale + bias), N − 1)).
/// - Fixed policy: min(keep, N − 1).
///
/// Hence N = 1 with raters keeps 0, except under the rank policy when P has
/// rank 1. O(1).
/// Errors: invalid_argument for N < 1, rank outside [0, N], or a bad policy.
inline index_t keep_count(const keep_policy& policy, index_t rank, index_t n_visual,
                          index_t n_raters) {
  SPARSEVLM_CHECK(n_visual >= 1, errc::invalid_argument, "n_visual", ">= 1", n_visual);
  SPARSEVLM_CHECK(rank >= 0 && rank <= n_visual, errc::invalid_argument, "rank",
                  detail::concat("in [0, ", n_visual, "]"), rank);
  SPARSEVLM_CHECK(n_raters >= 0, errc::invalid_argument, "n_raters", ">= 0", n_raters);
  check_policy(policy);
  return detail::core::decide_keep(n_visual, n_raters, rank, policy.kind == keep_policy::kind_t::fixed,
                           policy.keep, policy.scale, policy.bias);
}

}  // namespace sparsevlm
