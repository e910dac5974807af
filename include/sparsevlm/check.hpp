// Boundary checks shared by the stage functions.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
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

/// True when the exponent bits of every element are not all ones: a branch-free
/// scan over one contiguous row that the compiler vectorises.
template <class T>
bool row_all_finite(const T* p, index_t n) noexcept {
  if constexpr (std::is_same_v<T, float>) {
    std::uint32_t bad = 0;
    for (index_t c = 0; c < n; ++c) {
      std::uint32_t u;
      std::memcpy(&u, p + c, sizeof u);
      bad |= static_cast<std::uint32_t>((u & 0x7f800000u) == 0x7f800000u);
    }
    return bad == 0;
  } else {  // half: exponent 0x7c00; bfloat16: 0x7f80
    constexpr std::uint16_t mask = std::is_same_v<T, half> ? 0x7c00u : 0x7f80u;
    std::uint32_t bad = 0;
    for (index_t c = 0; c < n; ++c) bad |= static_cast<std::uint32_t>((p[c].bits & mask) == mask);
    return bad == 0;
  }
}

/// Throws errc::non_finite naming the first NaN/Inf of rows [r0, r1) of `m`.
template <class T>
void check_finite_rows(matrix_view<const T> m, index_t r0, index_t r1, const char* name) {
  if (m.stride(1) == 1 || m.extent(1) <= 1) {
    bool ok = true;
    for (index_t r = r0; r < r1 && ok; ++r) ok = row_all_finite(m.row(r), m.extent(1));
    if (ok) return;  // else rescan below to name the element
  }
  for (index_t r = r0; r < r1; ++r)
    for (index_t c = 0; c < m.extent(1); ++c) {
      const float v = to_float(m(r, c));
      if (!std::isfinite(v)) {
        fail(errc::non_finite, concat(name, "[", r, ", ", c, "]"), "a finite value", v);
      }
    }
}

}  // namespace sparsevlm::detail
