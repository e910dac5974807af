// KV caches after a pruning step: compaction in place, the recycled-free
// sequence, and cluster means of cached K/V rows. See docs/integration.md for
// which layers' caches change (only those written before the step, and only
// when the engine chooses to compact them).
#pragma once

#include <algorithm>
#include <cstdint>
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
/// From its extents alone (the Python package checks a device tensor's this way).
inline void check_side_shape(const index_t (&extent)[3], index_t tokens, index_t heads,
                             index_t head_dim, kv_layout layout, const char* name) {
  const std::size_t t = token_axis(layout), h = 1 - t;
  SPARSEVLM_CHECK(extent[t] == tokens, errc::shape_mismatch,
                  concat(name, ".extent[", t, "] (tokens)"), tokens, extent[t]);
  SPARSEVLM_CHECK(extent[h] == heads, errc::shape_mismatch,
                  concat(name, ".extent[", h, "] (heads)"), concat(heads, ", as the cache"),
                  extent[h]);
  SPARSEVLM_CHECK(extent[2] == head_dim, errc::shape_mismatch,
                  concat(name, ".extent[2] (head_dim)"), concat(head_dim, ", as the cache"),
                  extent[2]);
}

template <class T>
void check_side_kv(tensor3_view<T> side, index_t tokens, index_t heads, index_t head_dim,
                   kv_layout layout, const char* name) {
  const index_t extent[3] = {side.extent(0), side.extent(1), side.extent(2)};
  check_side_shape(extent, tokens, heads, head_dim, layout, name);
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

/// How the pages of a paged K or V cache are laid out; the view is the cache's K (or V)
/// part alone, any strides. A page holds `block_size` consecutive tokens of one request.
enum class page_layout {
  blocks_tokens_heads_dim,  ///< [blocks, block_size, heads, head_dim]: "NHD" pages
                            ///< (vLLM's FlashAttention, FlashInfer's NHD)
  blocks_heads_tokens_dim,  ///< [blocks, heads, block_size, head_dim]: "HND" pages
                            ///< (vLLM's CPU backend, FlashInfer's HND)
};

namespace detail {

/// The paged cache seen as [blocks, block_size, heads, head_dim] (axes 1 and 2 swapped
/// for HND pages), so the loop below handles one layout.
template <class T>
strided_view<T, 4> page_major(strided_view<T, 4> v, page_layout layout) {
  if (layout == page_layout::blocks_tokens_heads_dim) return v;
  return strided_view<T, 4>(v.data(), {v.extent(0), v.extent(2), v.extent(1), v.extent(3)},
                            {v.stride(0), v.stride(2), v.stride(1), v.stride(3)});
}

// The rules of a paged compaction, written once: the CPU function below applies them
// serially, the CUDA kernels (cuda/detail/kv_cache_kernels.hpp) in parallel, and both
// report the same first fault with the same message (throw_paged_fault).

/// Entry p at index i: a recycled index in [-c, -1] or a token p >= i (rows only move
/// toward the front, which is what makes the in-place copy safe on the CPU).
SPARSEVLM_HD inline bool paged_entry_ok(std::int64_t p, std::int64_t i, std::int64_t c) noexcept {
  return p >= -c && (p < 0 || p >= i);
}
/// Tokens a valid entry touches: token i is written and p (if >= 0) read.
SPARSEVLM_HD inline std::int64_t paged_entry_reach(std::int64_t p, std::int64_t i) noexcept {
  return (p > i ? p : i) + 1;
}
/// A page id the cache holds: in [0, blocks).
template <class B>
SPARSEVLM_HD bool paged_page_ok(B page, std::int64_t blocks) noexcept {
  return page >= 0 && static_cast<std::int64_t>(page) < blocks;
}
/// Element (t, h, d) of a request's logical token t, as an offset from the page-major
/// view's data: page block_table[t / bs], slot t % bs.
template <class B>
SPARSEVLM_HD std::int64_t paged_offset(const B* block_table, std::int64_t bs, const std::int64_t* s,
                                       std::int64_t t, std::int64_t h, std::int64_t d) noexcept {
  return static_cast<std::int64_t>(block_table[t / bs]) * s[0] + (t % bs) * s[1] + h * s[2] +
         d * s[3];
}

/// The first check of a paged compaction that fails, in the order the checks run:
/// the sequence entries in index order, then the table's coverage, then the page ids
/// of the first ceil(needed / block_size) pages in order.
struct paged_fault {
  enum kind_t : std::int64_t { none = 0, entry = 1, coverage = 2, page = 3 };
  std::int64_t kind = none;
  std::int64_t index = 0;  ///< entry: i; coverage: the table size; page: j
  std::int64_t value = 0;  ///< entry: sequence[i]; page: block_table[j]
  std::int64_t needed = 0; ///< tokens read or written (coverage)
  std::int64_t recycled = 0, block_size = 0, blocks = 0;  ///< c, bs and the cache's pages
};

/// Finds the first fault serially (what the CUDA check kernel finds in parallel).
template <class B>
paged_fault find_paged_fault(const std::int64_t* sequence, std::int64_t n, std::int64_t c,
                             const B* block_table, std::int64_t table_size, std::int64_t bs,
                             std::int64_t blocks) {
  paged_fault f;
  f.recycled = c;
  f.block_size = bs;
  f.blocks = blocks;
  std::int64_t needed = 0;
  for (std::int64_t i = 0; i < n; ++i) {
    if (!paged_entry_ok(sequence[i], i, c)) {
      f.kind = paged_fault::entry;
      f.index = i;
      f.value = sequence[i];
      return f;
    }
    needed = std::max(needed, paged_entry_reach(sequence[i], i));
  }
  f.needed = needed;
  if (needed > table_size * bs) {
    f.kind = paged_fault::coverage;
    f.index = table_size;
    return f;
  }
  for (std::int64_t j = 0; j < (needed + bs - 1) / bs; ++j) {
    if (!paged_page_ok(block_table[j], blocks)) {
      f.kind = paged_fault::page;
      f.index = j;
      f.value = static_cast<std::int64_t>(block_table[j]);
      return f;
    }
  }
  return f;
}

/// Throws the error of a fault (a no-op for kind none): invalid_argument for an entry or
/// a page id, shape_mismatch for a table that covers too few tokens.
inline void throw_paged_fault(const paged_fault& f) {
  switch (f.kind) {
    case paged_fault::entry:
      fail(errc::invalid_argument, concat("sequence[", f.index, "]"),
           concat("a recycled index in [-", f.recycled, ", -1] or a token >= ", f.index,
                  " (an in-place compaction)"),
           f.value);
    case paged_fault::coverage:
      fail(errc::shape_mismatch, "block_table.size()",
           concat(">= ", (f.needed + f.block_size - 1) / f.block_size, " pages of ", f.block_size,
                  " tokens (", f.needed, " tokens are read or written)"),
           f.index);
    case paged_fault::page:
      fail(errc::invalid_argument, concat("block_table[", f.index, "]"),
           concat("a page id in [0, ", f.blocks, ") (cache.extent[0])"), f.value);
    default: return;
  }
}

/// The host-visible checks of a paged compaction (layout, block size, recycled rows'
/// heads and head_dim), shared by the CPU function and the CUDA launcher. Returns the
/// page-major view.
template <class T, class U>
strided_view<T, 4> check_paged_args(strided_view<T, 4> cache, page_layout layout,
                                    tensor3_view<const U> recycled) {
  SPARSEVLM_CHECK(layout == page_layout::blocks_tokens_heads_dim ||
                      layout == page_layout::blocks_heads_tokens_dim,
                  errc::invalid_argument, "layout", "blocks_tokens_heads_dim or blocks_heads_tokens_dim",
                  static_cast<int>(layout));
  const strided_view<T, 4> kv = page_major(cache, layout);
  const std::size_t slot_axis = layout == page_layout::blocks_tokens_heads_dim ? 1 : 2;
  SPARSEVLM_CHECK(kv.extent(1) > 0, errc::shape_mismatch,
                  concat("cache.extent[", slot_axis, "] (block_size)"), "> 0", kv.extent(1));
  if (recycled.extent(0) > 0)
    check_side_kv(recycled, recycled.extent(0), kv.extent(2), kv.extent(3),
                  kv_layout::tokens_heads_dim, "recycled");
  return kv;
}

}  // namespace detail

/// compact_kv for one request's rows inside a paged cache: the request's logical token t
/// lives in page block_table[t / block_size] at slot t % block_size, and afterwards its
/// first sequence.size() tokens hold the new sequence (token i = old token sequence[i],
/// or recycled token -sequence[i] - 1 converted to T). Pages are not freed or
/// reordered: the request keeps its block table, only its rows move. Returns the new
/// token count; tokens past it are untouched. On CUDA memory: cuda/kv_cache.cuh.
///
/// - `sequence`: as compact_kv (every source entry p at index i has p >= i; rows only
///   move toward the front, in order, which is what makes the in-place copy safe).
/// - `cache`: the whole K or V cache of one layer, [blocks, block_size, heads, head_dim]
///   or [blocks, heads, block_size, head_dim] per `layout`, any strides; T = float,
///   half or bfloat16. vLLM 0.32's caches are [blocks, heads, block_size, 2·head_dim]:
///   FlashAttention's gives K and V as the HND views of [..., :head_dim] and
///   [..., head_dim:]; the CPU backend's holds per block and head the K block then the V
///   block, both HND strided views (docs/integration.md).
/// - `block_table`: the request's page ids in token order (int64; an engine's int32
///   table is widened by the caller). It must cover every token read or written
///   (max(sequence.size(), largest source + 1) tokens); pages must be distinct (not
///   checked: shared pages give wrong rows, never an access outside the cache).
/// - `recycled`: [c, heads, head_dim] token-major rows, U = float, half or bfloat16; c = 0
///   (and a null pointer) when the sequence has no negative entry; it must not overlap
///   the cache (not checked).
/// - Cost: O(sequence.size()) checks, then heads·head_dim element copies per token that
///   moves (one memcpy per head when head_dim is contiguous). No allocation.
/// - Errors (cache untouched): invalid_argument for a bad `layout`, a sequence entry
///   outside [0, tokens) ∪ [-c, -1] or below its index, a page id outside [0, blocks);
///   shape_mismatch when the table covers fewer tokens than needed or `recycled`'s heads
///   or head_dim differ from the cache's.
template <class T, class U>
index_t compact_paged_kv(std::span<const index_t> sequence, strided_view<T, 4> cache,
                         page_layout layout, std::span<const index_t> block_table,
                         tensor3_view<const U> recycled) {
  const strided_view<T, 4> kv = detail::check_paged_args(cache, layout, recycled);
  const index_t blocks = kv.extent(0), bs = kv.extent(1), heads = kv.extent(2), dim = kv.extent(3);
  const index_t n = static_cast<index_t>(sequence.size());
  detail::throw_paged_fault(detail::find_paged_fault(sequence.data(), n, recycled.extent(0),
                                                     block_table.data(),
                                                     static_cast<index_t>(block_table.size()), bs,
                                                     blocks));
  if (heads == 0 || dim == 0) return n;
  const index_t s[4] = {kv.stride(0), kv.stride(1), kv.stride(2), kv.stride(3)};
  const auto row = [&](index_t t, index_t h) -> T* {
    return kv.data() + detail::paged_offset(block_table.data(), bs, s, t, h, 0);
  };
  const bool contiguous = kv.stride(3) == 1 || dim == 1;
  for (index_t i = 0; i < n; ++i) {
    const index_t p = sequence[static_cast<std::size_t>(i)];
    if (p == i) continue;
    for (index_t h = 0; h < heads; ++h) {
      T* dst = row(i, h);
      if (p >= 0) {
        const T* src = row(p, h);
        if (contiguous) {
          std::memcpy(dst, src, static_cast<std::size_t>(dim) * sizeof(T));
        } else {
          for (index_t d = 0; d < dim; ++d) dst[d * kv.stride(3)] = src[d * kv.stride(3)];
        }
      } else {
        for (index_t d = 0; d < dim; ++d)
          dst[d * kv.stride(3)] = detail::convert_element<T>(recycled(-p - 1, h, d));
      }
    }
  }
  return n;
}

/// compact_paged_kv for a sequence without recycled entries (e.g. kv_sequence(seq)).
template <class T>
index_t compact_paged_kv(std::span<const index_t> sequence, strided_view<T, 4> cache,
                         page_layout layout, std::span<const index_t> block_table) {
  return compact_paged_kv(sequence, cache, layout, block_table, tensor3_view<const T>());
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
