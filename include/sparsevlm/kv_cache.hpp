// KV caches after a pruning step: compaction in place, the recycled-free
// sequence, and cluster means of cached K/V rows. See docs/integration.md for
// which layers' caches change (only those written before the step, and only
// when the engine chooses to compact them).
#pragma once

#include <cstring>
#include <span>
#include <type_traits>
#include <vector>

#include "plan.hpp"

namespace sparsevlm {

/// How a per-layer K or V cache is laid out. Strides are free in both.
enum class kv_layout {
  tokens_heads_dim,  ///< [tokens, heads, head_dim] (FlashAttention / vLLM order)
  heads_tokens_dim,  ///< [heads, tokens, head_dim] (one batch item of an HF cache)
};

namespace detail {

inline void check_layout(kv_layout layout) {
  SPARSEVLM_CHECK(layout == kv_layout::tokens_heads_dim || layout == kv_layout::heads_tokens_dim,
                  errc::invalid_argument, "layout", "tokens_heads_dim or heads_tokens_dim",
                  static_cast<int>(layout));
}

/// The view's token axis (0 or 1) under `layout`.
inline std::size_t token_axis(kv_layout layout) {
  return layout == kv_layout::tokens_heads_dim ? 0 : 1;
}

/// The same elements seen as [tokens, heads, head_dim], so the kernels below
/// handle one layout. Swapping two axes keeps a non-aliasing view non-aliasing.
template <class T>
tensor3_view<T> token_major(tensor3_view<T> v, kv_layout layout) {
  if (layout == kv_layout::tokens_heads_dim) return v;
  return tensor3_view<T>(v.data(), {v.extent(1), v.extent(0), v.extent(2)},
                         {v.stride(1), v.stride(0), v.stride(2)});
}

/// Checks that a side array (recycled rows in, cluster means out) has the
/// cache's heads and head_dim, `tokens` rows, and the same layout.
template <class T>
void check_side_kv(tensor3_view<T> side, index_t tokens, index_t heads, index_t head_dim,
                   kv_layout layout, const char* name) {
  const std::size_t t = token_axis(layout), h = 1 - t;
  SPARSEVLM_CHECK(side.extent(t) == tokens, errc::shape_mismatch,
                  concat(name, ".extent[", t, "] (tokens)"), tokens, side.extent(t));
  SPARSEVLM_CHECK(side.extent(h) == heads, errc::shape_mismatch,
                  concat(name, ".extent[", h, "] (heads)"), concat(heads, ", as the cache"),
                  side.extent(h));
  SPARSEVLM_CHECK(side.extent(2) == head_dim, errc::shape_mismatch,
                  concat(name, ".extent[2] (head_dim)"), concat(head_dim, ", as the cache"),
                  side.extent(2));
}

/// Copies token `src`'s [heads, head_dim] block over token `dst` (src != dst, so
/// the non-aliasing view makes the two blocks disjoint).
template <class T>
void move_token(tensor3_view<T> kv, index_t dst, index_t src) {
  const index_t heads = kv.extent(1), dim = kv.extent(2);
  const bool rows_contiguous = kv.stride(2) == 1 || dim == 1;
  if (rows_contiguous && (kv.stride(1) == dim || heads == 1)) {
    std::memcpy(&kv(dst, 0, 0), &kv(src, 0, 0), static_cast<std::size_t>(heads * dim) * sizeof(T));
    return;
  }
  for (index_t h = 0; h < heads; ++h) {
    if (rows_contiguous) {
      std::memcpy(&kv(dst, h, 0), &kv(src, h, 0), static_cast<std::size_t>(dim) * sizeof(T));
    } else {
      for (index_t c = 0; c < dim; ++c) kv(dst, h, c) = kv(src, h, c);
    }
  }
}

}  // namespace detail

/// The sequence without its recycled entries: what the caches of layers that
/// ran BEFORE the step can be compacted with, since recycled tokens were born
/// from the step's output and have no K/V row there. Order is kept, so every
/// source entry p at its new index i still has p >= i.
/// Cost: O(sequence.size()). No errors (entries are not inspected).
inline std::vector<index_t> kv_sequence(std::span<const index_t> sequence) {
  std::vector<index_t> out;
  out.reserve(sequence.size());
  for (index_t p : sequence)
    if (p >= 0) out.push_back(p);
  return out;
}

/// kv_sequence over several consecutive steps: `steps[k]` is step k's sequence,
/// whose entries index step k−1's output (steps[0] indexes the cache's rows).
/// Returns the cache rows that survive every step as real tokens, in order: what
/// a cache written before steps[0] is compacted with to match the token list
/// after the last step, less the tokens recycled at any step. (Chaining the
/// one-step form is wrong: it drops recycled slots, which shifts the indices of
/// the next step.) For a cache written after step j, pass steps j+1, ….
/// - Cost: O(total entries). Errors: invalid_argument when a source entry of
///   steps[k] (k >= 1) is not an index into steps[k−1], named "steps[k][i]".
inline std::vector<index_t> kv_sequence(std::span<const std::vector<index_t>> steps) {
  for (std::size_t k = 1; k < steps.size(); ++k) {
    const index_t prev = static_cast<index_t>(steps[k - 1].size());
    for (std::size_t i = 0; i < steps[k].size(); ++i)
      SPARSEVLM_CHECK(steps[k][i] < prev, errc::invalid_argument,
                      detail::concat("steps[", k, "][", i, "]"),
                      detail::concat("a recycled entry (< 0) or an index into steps[", k - 1,
                                     "] (< ", prev, ")"),
                      steps[k][i]);
  }
  if (steps.empty()) return {};
  // map[i]: the cache row of step k's output token i, or -1 for a recycled one.
  std::vector<index_t> map(steps[0].begin(), steps[0].end());
  for (std::size_t k = 1; k < steps.size(); ++k) {
    std::vector<index_t> next(steps[k].size());
    for (std::size_t i = 0; i < steps[k].size(); ++i) {
      const index_t q = steps[k][i];
      next[i] = q >= 0 ? map[static_cast<std::size_t>(q)] : -1;
    }
    map.swap(next);
  }
  return kv_sequence(std::span<const index_t>(map));
}

/// Compacts one layer's K or V cache in place so that its first
/// sequence.size() tokens hold the new sequence: token i becomes old token
/// sequence[i], or recycled token -sequence[i] - 1 (converted to T) for a
/// negative entry. Returns the new token count; tokens past it are untouched.
///
/// - `sequence`: from make_sequence / step_result::sequence, or kv_sequence of it.
///   Every source entry p at index i must satisfy p >= i (rows only move toward
///   the front, in order, so none is overwritten before it is read).
/// - `cache`: [tokens, heads, head_dim] or [heads, tokens, head_dim] per
///   `layout`, any non-aliasing strides; T = float, half or bfloat16.
/// - `recycled`: the recycled tokens' rows in the same layout ([c, heads,
///   head_dim] or [heads, c, head_dim]), U = float, half or bfloat16; c = 0 (and
///   a null pointer) is fine when the sequence has no negative entry. It must
///   not overlap the cache's first sequence.size() tokens (not checked).
/// - Cost: O(sequence.size()) checks, then heads·head_dim element copies per
///   token that moves (tokens with p == i, e.g. the prefix, are skipped); whole
///   token blocks are copied with one memcpy when contiguous. No allocation.
/// - Errors (cache untouched): invalid_argument for a bad `layout`, an entry
///   outside [0, tokens) ∪ [-c, -1], or a source entry p < i; shape_mismatch
///   when sequence.size() > tokens or `recycled` does not match the cache.
template <class T, class U>
index_t compact_kv(std::span<const index_t> sequence, tensor3_view<T> cache, kv_layout layout,
                   tensor3_view<const U> recycled) {
  detail::check_layout(layout);
  const tensor3_view<T> kv = detail::token_major(cache, layout);
  const index_t tokens = kv.extent(0), heads = kv.extent(1), dim = kv.extent(2);
  const index_t n = static_cast<index_t>(sequence.size());
  const std::size_t t = detail::token_axis(layout);
  SPARSEVLM_CHECK(n <= tokens, errc::shape_mismatch, "sequence.size()",
                  detail::concat("<= cache.extent[", t, "] (tokens) = ", tokens), n);
  const index_t c = recycled.extent(t);
  if (c > 0) detail::check_side_kv(recycled, c, heads, dim, layout, "recycled");
  for (index_t i = 0; i < n; ++i) {
    const index_t p = sequence[static_cast<std::size_t>(i)];
    SPARSEVLM_CHECK(p < tokens && p >= -c, errc::invalid_argument,
                    detail::concat("sequence[", i, "]"),
                    detail::concat("a cached token in [0, ", tokens, ") or a recycled index in [-",
                                   c, ", -1]"),
                    p);
    SPARSEVLM_CHECK(p < 0 || p >= i, errc::invalid_argument, detail::concat("sequence[", i, "]"),
                    detail::concat(">= ", i, " for an in-place compaction"), p);
  }
  if (heads == 0 || dim == 0) return n;  // no elements (and possibly no data)
  const tensor3_view<const U> rec = detail::token_major(recycled, layout);
  for (index_t i = 0; i < n; ++i) {
    const index_t p = sequence[static_cast<std::size_t>(i)];
    if (p == i) continue;
    if (p >= 0) {
      detail::move_token(kv, i, p);
    } else {
      const index_t r = -p - 1;
      for (index_t h = 0; h < heads; ++h)
        for (index_t d = 0; d < dim; ++d) kv(i, h, d) = detail::convert_element<T>(rec(r, h, d));
    }
  }
  return n;
}

/// compact_kv for a sequence without recycled entries (e.g. kv_sequence(seq)).
/// Errors: as above; a negative entry is refused as out of range.
template <class T>
index_t compact_kv(std::span<const index_t> sequence, tensor3_view<T> cache, kv_layout layout) {
  return compact_kv(sequence, cache, layout, tensor3_view<const T>());
}

/// Cluster means of cached rows: out token i = the plain mean of the cache's
/// rows at clusters[i]'s members. This gives the caches of layers that ran
/// before the step a K/V row per recycled token, mirroring how the step merges
/// hidden states, so that an engine needing the same token count in every
/// layer can compact them with the full sequence. It is an approximation (the
/// rows carry RoPE at their members' own positions); SparseVLM's reference keeps
/// those caches whole instead. Call it BEFORE compact_kv moves the members.
///
/// - `clusters`: step_result::recycled.clusters; each non-empty, members
///   ascending and unique, inside [0, tokens).
/// - `cache`: as compact_kv (read only); `out`: [clusters.size(), heads,
///   head_dim] or [heads, clusters.size(), head_dim] in the same layout, must not
///   overlap `cache` (not checked).
/// - Arithmetic: each member's element widened to double, summed in ascending
///   member order, divided by the member count, rounded to float32 and then to U.
/// - Cost: O(total members · heads · head_dim). No allocation.
/// - Errors (out untouched): invalid_argument for a bad layout or cluster;
///   shape_mismatch when `out` does not match.
template <class T, class U>
void merge_kv(std::span<const std::vector<index_t>> clusters, tensor3_view<const T> cache,
              kv_layout layout, tensor3_view<U> out) {
  detail::check_layout(layout);
  const tensor3_view<const T> kv = detail::token_major(cache, layout);
  const index_t tokens = kv.extent(0), heads = kv.extent(1), dim = kv.extent(2);
  const index_t c = static_cast<index_t>(clusters.size());
  detail::check_side_kv(out, c, heads, dim, layout, "out");
  for (std::size_t q = 0; q < clusters.size(); ++q) {
    const std::vector<index_t>& m = clusters[q];
    SPARSEVLM_CHECK(!m.empty(), errc::invalid_argument, detail::concat("clusters[", q, "]"),
                    "at least one member", "an empty cluster");
    for (std::size_t j = 0; j < m.size(); ++j) {
      SPARSEVLM_CHECK(m[j] >= 0 && m[j] < tokens, errc::invalid_argument,
                      detail::concat("clusters[", q, "][", j, "]"),
                      detail::concat("a cached token in [0, ", tokens, ")"), m[j]);
      if (j > 0)
        SPARSEVLM_CHECK(m[j] > m[j - 1], errc::invalid_argument,
                        detail::concat("clusters[", q, "][", j, "]"), "ascending, unique members",
                        m[j]);
    }
  }
  const tensor3_view<U> o = detail::token_major(out, layout);
  for (index_t q = 0; q < c; ++q) {
    const std::vector<index_t>& m = clusters[static_cast<std::size_t>(q)];
    const double count = static_cast<double>(m.size());
    for (index_t h = 0; h < heads; ++h)
      for (index_t d = 0; d < dim; ++d) {
        double acc = 0.0;
        for (index_t p : m) acc += static_cast<double>(to_float(kv(p, h, d)));
        o(q, h, d) = from_float<std::remove_cv_t<U>>(static_cast<float>(acc / count));
      }
  }
}

}  // namespace sparsevlm
