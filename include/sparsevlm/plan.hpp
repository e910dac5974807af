// Stage 8: the new sequence, and applying it to per-token arrays.
#pragma once

#include <algorithm>
#include <cstring>
#include <span>
#include <type_traits>
#include <vector>

#include "check.hpp"
#include "core/math.hpp"

namespace sparsevlm {

namespace detail {

/// make_sequence on arguments known to be valid (the composition's keep set from
/// select_keep, its cluster count from recycled_counts).
inline void write_sequence(index_t length, visual_span visual, std::span<const index_t> keep,
                           index_t recycled, std::vector<index_t>& seq) {
  const index_t k = static_cast<index_t>(keep.size());
  const index_t n = length - visual.len + k + recycled;
  seq.resize(static_cast<std::size_t>(n));  // keeps its capacity
  for (index_t i = 0; i < n; ++i)
    seq[static_cast<std::size_t>(i)] =
        detail::core::sequence_entry(i, visual.start, visual.len, keep.data(), k, recycled);
}

}  // namespace detail

/// The new sequence (spec step 8): prefix, kept visual tokens in order, recycled
/// tokens in cluster order, text. Entries are source positions; -(i + 1) stands
/// for recycled token i.
///
/// - `length`: L; `visual`: inside [0, L); `keep`: absolute positions inside the
///   visual span, ascending and unique; `recycled`: c >= 0, at most N − keep.size().
/// - Returns L − N + keep.size() + c entries. Every source entry p at output
///   position i satisfies p >= i, which is what makes apply_plan_inplace safe.
/// - Cost: O(L). Errors: shape_mismatch / invalid_argument for bad arguments.
inline void make_sequence(index_t length, visual_span visual, std::span<const index_t> keep,
                          index_t recycled, std::vector<index_t>& seq) {
  detail::check_span(visual, length, "length");
  const index_t k = static_cast<index_t>(keep.size());
  for (std::size_t i = 0; i < keep.size(); ++i) {
    SPARSEVLM_CHECK(keep[i] >= visual.start && keep[i] < visual.end(), errc::invalid_argument,
                    detail::concat("keep[", i, "]"),
                    detail::concat("a visual position in [", visual.start, ", ", visual.end(), ")"),
                    keep[i]);
    if (i > 0)
      SPARSEVLM_CHECK(keep[i] > keep[i - 1], errc::invalid_argument,
                      detail::concat("keep[", i, "]"), "ascending, unique positions", keep[i]);
  }
  SPARSEVLM_CHECK(recycled >= 0 && recycled <= visual.len - k, errc::invalid_argument, "recycled",
                  detail::concat("in [0, ", visual.len - k, "] (the pruned count)"), recycled);
  detail::write_sequence(length, visual, keep, recycled, seq);
}

/// As above, returning the sequence in a new vector.
inline std::vector<index_t> make_sequence(index_t length, visual_span visual,
                                          std::span<const index_t> keep, index_t recycled) {
  std::vector<index_t> seq;
  make_sequence(length, visual, keep, recycled, seq);
  return seq;
}

namespace detail {

template <class To, class From>
SPARSEVLM_HD To convert_element(From v) {
  if constexpr (std::is_same_v<std::remove_cv_t<To>, std::remove_cv_t<From>>) {
    return v;
  } else if constexpr (is_element_v<To> && is_element_v<From>) {
    return from_float<std::remove_cv_t<To>>(to_float(v));
  } else {
    return static_cast<To>(v);
  }
}

/// apply_plan's rules for a sequence over `in_rows` source rows of `cols` columns
/// and c recycled rows of `recycled_cols` columns, from the shapes alone: the one
/// home of these checks (apply_plan, apply_plan_inplace, and the Python package
/// before it gathers device tensors itself). Cost O(sequence.size()).
inline void check_plan_shape(std::span<const index_t> sequence, index_t in_rows, index_t cols,
                             index_t c, index_t recycled_cols) {
  if (c > 0)
    SPARSEVLM_CHECK(recycled_cols == cols, errc::shape_mismatch, "recycled.extent[1]", cols,
                    recycled_cols);
  for (std::size_t i = 0; i < sequence.size(); ++i) {
    const index_t p = sequence[i];
    SPARSEVLM_CHECK(p < in_rows && p >= -c, errc::invalid_argument, concat("sequence[", i, "]"),
            concat("a source row in [0, ", in_rows, ") or a recycled index in [-", c, ", -1]"), p);
  }
}

template <class T, class U>
void check_plan_args(std::span<const index_t> sequence, index_t in_rows, index_t cols,
                     matrix_view<const U> recycled) {
  check_plan_shape(sequence, in_rows, cols, recycled.extent(0), recycled.extent(1));
}

template <class T>
void copy_row(matrix_view<T> out, index_t dst, const T* src_row, index_t src_stride,
              index_t cols) {
  T* d = &out(dst, 0);
  const index_t ds = out.stride(1);
  if (ds == 1 && src_stride == 1) {
    std::memmove(d, src_row, static_cast<std::size_t>(cols) * sizeof(T));
  } else {
    for (index_t c = 0; c < cols; ++c) d[c * ds] = src_row[c * src_stride];
  }
}

template <class T, class U>
void write_recycled(matrix_view<T> out, index_t dst, matrix_view<const U> recycled, index_t i) {
  for (index_t c = 0; c < out.extent(1); ++c) out(dst, c) = convert_element<T>(recycled(i, c));
}

}  // namespace detail

/// Applies a sequence to a per-token array: out[i] = in[sequence[i]], or
/// recycled[-sequence[i] - 1] for recycled entries (converted to T).
///
/// Works for any per-token array viewed as [tokens, width]: hidden states
/// ([L, d]), position ids ([L, 1] or one row of mRoPE ids), KV rows
/// ([L, heads·head_dim] when contiguous per token).
/// - `in`: [L, w]; `recycled`: [c, w] (c may be 0 when the sequence has no
///   negative entries); `out`: [sequence.size(), w], must not overlap `in`.
/// - Cost: O(sequence.size()·w) copies; contiguous rows are copied whole.
/// - Errors: shape_mismatch, invalid_argument; `out` untouched on error.
template <class T, class U>
void apply_plan(std::span<const index_t> sequence, matrix_view<const T> in,
                matrix_view<const U> recycled, matrix_view<T> out) {
  const index_t n = static_cast<index_t>(sequence.size());
  SPARSEVLM_CHECK(out.extent(0) == n && out.extent(1) == in.extent(1), errc::shape_mismatch, "out",
                  detail::concat("[", n, ", ", in.extent(1), "]"),
                  detail::concat("[", out.extent(0), ", ", out.extent(1), "]"));
  detail::check_plan_args<T, U>(sequence, in.extent(0), in.extent(1), recycled);
  if (in.extent(1) == 0) return;  // zero-width rows: nothing to move (and no data)
  for (index_t i = 0; i < n; ++i) {
    const index_t p = sequence[static_cast<std::size_t>(i)];
    if (p >= 0) {
      detail::copy_row(out, i, &in(p, 0), in.stride(1), in.extent(1));
    } else {
      detail::write_recycled(out, i, recycled, -p - 1);
    }
  }
}

/// In-place form: compacts `inout` ([L, w]) so that its first sequence.size()
/// rows hold the new sequence, with no second buffer. Safe because every source
/// entry p at position i has p >= i (make_sequence guarantees it; this function
/// checks it), so rows are moved forward in order and none is overwritten before
/// it is read. Returns the new token count; rows past it are left as they were.
/// Errors: as apply_plan, plus invalid_argument when a source entry p < i.
template <class T, class U>
index_t apply_plan_inplace(std::span<const index_t> sequence, matrix_view<T> inout,
                           matrix_view<const U> recycled) {
  const index_t n = static_cast<index_t>(sequence.size());
  SPARSEVLM_CHECK(n <= inout.extent(0), errc::shape_mismatch, "sequence.size()",
                  detail::concat("<= inout.extent[0] = ", inout.extent(0)), n);
  detail::check_plan_args<T, U>(sequence, inout.extent(0), inout.extent(1), recycled);
  for (index_t i = 0; i < n; ++i) {
    const index_t p = sequence[static_cast<std::size_t>(i)];
    SPARSEVLM_CHECK(p < 0 || p >= i, errc::invalid_argument, detail::concat("sequence[", i, "]"),
                    detail::concat(">= ", i, " for an in-place compaction"), p);
  }
  if (inout.extent(1) == 0) return n;
  for (index_t i = 0; i < n; ++i) {
    const index_t p = sequence[static_cast<std::size_t>(i)];
    if (p == i) continue;
    if (p >= 0) {
      detail::copy_row(inout, i, &inout(p, 0), inout.stride(1), inout.extent(1));
    } else {
      detail::write_recycled(inout, i, recycled, -p - 1);
    }
  }
  return n;
}

}  // namespace sparsevlm
