// Boundary checks shared by the stage functions.
#pragma once

#include <cmath>
#include <string>

#include "dtype.hpp"
#include "error.hpp"
#include "view.hpp"

namespace sparsevlm::detail {

inline void check_span(visual_span vis, index_t length, const char* length_name) {
  SPARSEVLM_CHECK(vis.start >= 0, errc::shape_mismatch, "visual.start", ">= 0", vis.start);
  SPARSEVLM_CHECK(vis.len >= 1, errc::shape_mismatch, "visual.len", ">= 1 (N = 0 has nothing to prune)",
          vis.len);
  SPARSEVLM_CHECK(vis.start <= length && vis.len <= length - vis.start, errc::shape_mismatch,
          "visual", concat("a span inside [0, ", length, ") (", length_name, ")"),
          concat("start ", vis.start, ", len ", vis.len));
}

/// Throws errc::non_finite naming the first NaN/Inf of rows [r0, r1) of `m`.
template <class T>
void check_finite_rows(matrix_view<const T> m, index_t r0, index_t r1, const char* name) {
  for (index_t r = r0; r < r1; ++r)
    for (index_t c = 0; c < m.extent(1); ++c) {
      const float v = to_float(m(r, c));
      if (!std::isfinite(v)) {
        fail(errc::non_finite, concat(name, "[", r, ", ", c, "]"), "a finite value", v);
      }
    }
}

}  // namespace sparsevlm::detail
