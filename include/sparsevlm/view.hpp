// Non-owning strided views over caller memory.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>

#include "dtype.hpp"
#include "error.hpp"

namespace sparsevlm {

/// Index type of every extent, stride and position in the library.
using index_t = std::int64_t;

/// A non-owning view of a `Rank`-dimensional array of `T` (`float`, `half`,
/// `bfloat16`, const or not, or `index_t` for position arrays), with strides in
/// elements. A cheap value: pass it by value.
///
/// Construction validates: extents >= 0, strides >= 0 (0 broadcasts, only for
/// read-only views), a non-null pointer when the view is non-empty, and that the
/// furthest element's offset fits in `index_t`. Writable views additionally need
/// strides that make distinct indices address distinct elements.
template <class T, std::size_t Rank>
class strided_view {
 public:
  using element_type = T;
  using value_type = std::remove_cv_t<T>;
  static constexpr std::size_t rank = Rank;

  strided_view() = default;

  /// A C-order (row-major, contiguous) view.
  strided_view(T* data, const std::array<index_t, Rank>& extents, const char* name = "view")
      : strided_view(data, extents, contiguous_strides(extents), name) {}

  /// A view with explicit strides (in elements, not bytes).
  strided_view(T* data, const std::array<index_t, Rank>& extents,
               const std::array<index_t, Rank>& strides, const char* name = "view")
      : data_(data), extents_(extents), strides_(strides) {
    validate(name);
  }

  /// Views of non-const elements convert to views of const elements.
  template <class U, class = std::enable_if_t<std::is_same_v<const U, T> && !std::is_same_v<U, T>>>
  strided_view(const strided_view<U, Rank>& other)  // NOLINT(google-explicit-constructor)
      : data_(other.data()), extents_(other.extents()), strides_(other.strides()) {}

  [[nodiscard]] T* data() const noexcept { return data_; }
  [[nodiscard]] const std::array<index_t, Rank>& extents() const noexcept { return extents_; }
  [[nodiscard]] const std::array<index_t, Rank>& strides() const noexcept { return strides_; }
  [[nodiscard]] index_t extent(std::size_t i) const noexcept { return extents_[i]; }
  [[nodiscard]] index_t stride(std::size_t i) const noexcept { return strides_[i]; }
  [[nodiscard]] index_t size() const noexcept {
    index_t n = 1;
    for (index_t e : extents_) n *= e;
    return n;
  }
  [[nodiscard]] bool empty() const noexcept { return size() == 0; }

  /// Element access; the indices are trusted (validate at the boundary).
  template <class... I>
  [[nodiscard]] T& operator()(I... idx) const noexcept {
    static_assert(sizeof...(I) == Rank, "one index per dimension");
    const std::array<index_t, Rank> ix{static_cast<index_t>(idx)...};
    index_t off = 0;
    for (std::size_t d = 0; d < Rank; ++d) off += ix[d] * strides_[d];
    return data_[off];
  }

  /// Pointer to the first element of row `i` of the leading dimension.
  [[nodiscard]] T* row(index_t i) const noexcept { return data_ + i * strides_[0]; }

  /// True when the trailing dimension is unit-stride (rows can be copied whole).
  [[nodiscard]] bool inner_contiguous() const noexcept {
    return Rank == 0 || strides_[Rank - 1] == 1 || extents_[Rank - 1] <= 1;
  }

  /// C-order strides for `extents`. Errors: shape_mismatch when a stride would
  /// not fit in index_t (checked before any arithmetic overflows).
  static std::array<index_t, Rank> contiguous_strides(const std::array<index_t, Rank>& extents) {
    std::array<index_t, Rank> s{};
    index_t acc = 1;
    for (std::size_t d = Rank; d-- > 0;) {
      s[d] = acc;
      if (d == 0) break;  // the leading extent multiplies no stride
      const index_t e = extents[d] > 0 ? extents[d] : 1;
      if (acc > std::numeric_limits<index_t>::max() / e)
        detail::fail(errc::shape_mismatch, "extents", "a product that fits in int64",
                     "an overflowing one");
      acc *= e;
    }
    return s;
  }

 private:
  void validate(const char* name) const {
    constexpr index_t max = std::numeric_limits<index_t>::max();
    index_t last = 0;  // offset of the furthest element
    bool empty_view = false;
    for (std::size_t d = 0; d < Rank; ++d) {
      SPARSEVLM_CHECK(extents_[d] >= 0, errc::shape_mismatch,
                      detail::concat(name, ".extent[", d, "]"), ">= 0", extents_[d]);
      SPARSEVLM_CHECK(strides_[d] >= 0, errc::shape_mismatch,
                      detail::concat(name, ".stride[", d, "]"), ">= 0", strides_[d]);
      if (extents_[d] == 0) empty_view = true;
    }
    if (empty_view) return;
    SPARSEVLM_CHECK(data_ != nullptr, errc::invalid_argument, detail::concat(name, ".data"),
                    "a non-null pointer for a non-empty view", "nullptr");
    for (std::size_t d = 0; d < Rank; ++d) {
      const index_t span = extents_[d] - 1;
      if (strides_[d] != 0 && span > (max - last) / strides_[d]) {
        detail::fail(errc::shape_mismatch, name, "an element offset that fits in int64",
                     "extents and strides that overflow it");
      }
      last += span * strides_[d];
    }
    if constexpr (!std::is_const_v<T>) {
      // Distinct indices must not alias, or writes through the view race with
      // each other: with dimensions sorted by stride, each stride must exceed the
      // furthest offset reachable through the smaller ones.
      std::array<std::size_t, Rank> order{};
      for (std::size_t d = 0; d < Rank; ++d) order[d] = d;
      for (std::size_t a = 1; a < Rank; ++a)
        for (std::size_t b = a; b > 0 && strides_[order[b]] < strides_[order[b - 1]]; --b)
          std::swap(order[b], order[b - 1]);
      index_t reach = 0;
      for (std::size_t i = 0; i < Rank; ++i) {
        const std::size_t d = order[i];
        if (extents_[d] <= 1) continue;
        SPARSEVLM_CHECK(strides_[d] > reach, errc::shape_mismatch,
                        detail::concat(name, ".stride[", d, "]"),
                        detail::concat("> ", reach, " so that a writable view does not alias"),
                        strides_[d]);
        reach += (extents_[d] - 1) * strides_[d];
      }
    }
  }

  T* data_ = nullptr;
  std::array<index_t, Rank> extents_{};
  std::array<index_t, Rank> strides_{};
};

template <class T>
using matrix_view = strided_view<T, 2>;
template <class T>
using tensor3_view = strided_view<T, 3>;

/// The visual span of a sequence: positions [start, start + len).
struct visual_span {
  index_t start = 0;
  index_t len = 0;
  [[nodiscard]] index_t end() const noexcept { return start + len; }
};

}  // namespace sparsevlm
