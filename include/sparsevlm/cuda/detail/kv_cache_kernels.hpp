// The kernels of cuda/kv_cache.cuh (a paged K/V compaction on the device) and
// their launch sequence, written against core/block.hpp's block context so that
// tests/test_kv_cache_kernels.cpp runs them on CPU threads. Host-compilable.
//
// The CPU function (kv_cache.hpp's compact_paged_kv) moves rows in index order,
// which is safe in place because every source p >= i. A grid cannot keep that
// order, so the device copy runs in two phases through a staging buffer in the
// caller's workspace: gather every moved row, then scatter. Before them one
// block applies kv_cache.hpp's checks (the same rules, in parallel) and writes
// the first fault; the copy kernels read it and do nothing after a fault, so a
// refused compaction leaves the cache as it was.
#pragma once

#include <cstddef>
#include <cstdint>

#include "../../core/block.hpp"
#include "../../kv_cache.hpp"

namespace sparsevlm::cuda::detail {

using i64 = std::int64_t;
using sparsevlm::detail::paged_fault;

/// One compaction's arguments, all in device memory: the cache as the page-major view
/// [blocks, block_size, heads, head_dim] (`strides` of that view), the request's table
/// (B = int32 or int64), the recycled rows [c, heads, head_dim] and the staging rows
/// [n, heads, head_dim] (contiguous).
template <class T, class U, class B>
struct paged_args {
  const i64* sequence;
  i64 n;
  T* cache;
  i64 strides[4];
  i64 blocks, block_size, heads, dim;
  const B* table;
  i64 table_size;
  const U* recycled;
  i64 c, r0, r1, r2;
  T* stage;
  paged_fault* fault;
};

/// Dynamic shared memory of paged_check: two words per thread.
inline std::size_t paged_check_shared(int threads) {
  return 2 * static_cast<std::size_t>(threads) * sizeof(i64);
}

/// One block: finds the fault find_paged_fault finds (the first bad entry, else
/// the coverage, else the first bad page id among the pages used) with per-thread
/// minima and maxima, which are exact in any order. Thread 0 writes the fault
/// (kind none when every check passes) on every call, so a reused workspace never
/// shows an old one.
template <class T, class U, class B>
struct paged_check {
  paged_args<T, U, B> a;
  template <class Block>
  SPARSEVLM_HD void operator()(const Block& b, void* smem) const {
    i64* first = static_cast<i64*>(smem);
    i64* reach = first + b.size();
    const i64 t = b.rank(), nt = b.size();
    i64 my_first = a.n, my_reach = 0;
    for (i64 i = t; i < a.n; i += nt) {
      const i64 p = a.sequence[i];
      if (!sparsevlm::detail::paged_entry_ok(p, i, a.c)) {
        if (i < my_first) my_first = i;
      } else {
        const i64 r = sparsevlm::detail::paged_entry_reach(p, i);
        if (r > my_reach) my_reach = r;
      }
    }
    first[t] = my_first;
    reach[t] = my_reach;
    b.sync();
    i64 bad = a.n, needed = 0;
    for (i64 k = 0; k < nt; ++k) {
      if (first[k] < bad) bad = first[k];
      if (reach[k] > needed) needed = reach[k];
    }
    const i64 pages = (needed + a.block_size - 1) / a.block_size;
    const bool entries_ok = bad >= a.n && needed <= a.table_size * a.block_size;
    b.sync();  // every thread has read first[] and reach[] before they are reused
    i64 my_page = pages;
    if (entries_ok)
      for (i64 j = t; j < pages; j += nt)
        if (!sparsevlm::detail::paged_page_ok(a.table[j], a.blocks)) {
          my_page = j;
          break;
        }
    first[t] = my_page;
    b.sync();
    if (t != 0) return;
    paged_fault f;
    f.recycled = a.c;
    f.block_size = a.block_size;
    f.blocks = a.blocks;
    f.needed = needed;
    if (bad < a.n) {
      f.kind = paged_fault::entry;
      f.index = bad;
      f.value = a.sequence[bad];
      f.needed = 0;
    } else if (needed > a.table_size * a.block_size) {
      f.kind = paged_fault::coverage;
      f.index = a.table_size;
    } else {
      i64 page = pages;
      for (i64 k = 0; k < nt; ++k)
        if (first[k] < page) page = first[k];
      if (page < pages) {
        f.kind = paged_fault::page;
        f.index = page;
        f.value = static_cast<i64>(a.table[page]);
      }
    }
    *a.fault = f;
  }
};

/// The two phases of the copy, grid-stride over the n·heads·head_dim elements of
/// the tokens that move (p != i): the gather (Scatter = false) stages the element
/// token i takes, old token p's or recycled row -p-1's converted to T, as
/// stage[i][h][d]; the scatter writes it into token i's slot. No element is
/// written before every element has been read, whatever the order of threads.
template <class T, class U, class B, bool Scatter>
struct paged_move {
  paged_args<T, U, B> a;
  template <class Block>
  SPARSEVLM_HD void operator()(const Block& b, void*) const {
    if (a.fault->kind != paged_fault::none) return;
    const i64 hd = a.heads * a.dim, total = a.n * hd;
    for (i64 e = b.bx() * b.size() + b.rank(); e < total; e += b.gx() * b.size()) {
      const i64 i = e / hd, p = a.sequence[i];
      if (p == i) continue;
      const i64 h = (e - i * hd) / a.dim, d = e - i * hd - h * a.dim;
      const auto at = [&](i64 t) {
        return sparsevlm::detail::paged_offset(a.table, a.block_size, a.strides, t, h, d);
      };
      if constexpr (Scatter) {
        a.cache[at(i)] = a.stage[e];
      } else if (p >= 0) {
        a.stage[e] = a.cache[at(p)];
      } else {
        a.stage[e] = sparsevlm::detail::convert_element<T>(
            a.recycled[(-p - 1) * a.r0 + h * a.r1 + d * a.r2]);
      }
    }
  }
};
template <class T, class U, class B>
using paged_gather = paged_move<T, U, B, false>;
template <class T, class U, class B>
using paged_scatter = paged_move<T, U, B, true>;

/// The arguments of one compaction: `kv` the page-major view (check_paged_args),
/// `workspace` laid out as paged_workspace_bytes says (the fault, then the staging
/// rows at 256 bytes). Shared by the launcher and the CPU-thread tests.
template <class T, class U, class B>
paged_args<T, U, B> make_paged_args(const i64* sequence, i64 n, strided_view<T, 4> kv,
                                    const B* table, i64 table_size,
                                    tensor3_view<const U> recycled, void* workspace) {
  paged_args<T, U, B> a{};
  a.sequence = sequence;
  a.n = n;
  a.cache = kv.data();
  for (std::size_t d = 0; d < 4; ++d) a.strides[d] = kv.stride(d);
  a.blocks = kv.extent(0);
  a.block_size = kv.extent(1);
  a.heads = kv.extent(2);
  a.dim = kv.extent(3);
  a.table = table;
  a.table_size = table_size;
  a.recycled = recycled.data();
  a.c = recycled.extent(0);
  a.r0 = recycled.stride(0);
  a.r1 = recycled.stride(1);
  a.r2 = recycled.stride(2);
  a.fault = static_cast<paged_fault*>(workspace);
  a.stage = reinterpret_cast<T*>(static_cast<unsigned char*>(workspace) + 256);
  return a;
}

/// The launch sequence (three kernels, no host synchronisation), for any executor
/// of pipeline.hpp's kind.
template <class Exec, class T, class U, class B>
void compact_paged(Exec& ex, const paged_args<T, U, B>& a) {
  ex.launch(paged_check<T, U, B>{a}, 1, 1, ex.threads(), paged_check_shared(ex.threads()));
  const i64 elems = a.n * a.heads * a.dim;
  ex.launch(paged_gather<T, U, B>{a}, ex.grid(elems), 1, ex.threads(), 0);
  ex.launch(paged_scatter<T, U, B>{a}, ex.grid(elems), 1, ex.threads(), 0);
}

/// Workspace of a compaction of up to `tokens` entries: the fault word (256-byte
/// aligned, as every buffer of the library's workspaces), then the staging rows.
inline std::size_t paged_workspace_bytes(i64 tokens, i64 heads, i64 head_dim, std::size_t elem) {
  const std::size_t head = 256;
  return head + static_cast<std::size_t>(tokens * heads * head_dim) * elem;
}

}  // namespace sparsevlm::cuda::detail
