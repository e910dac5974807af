// A paged K/V compaction on the device: kv_cache.hpp's compact_paged_kv over a
// cache, block table and sequence in device memory, stream-ordered, with no host
// synchronisation and no allocation (the caller gives the workspace). The
// kernels are cuda/detail/kv_cache_kernels.hpp; the rules (what an entry may be,
// where a token's row lives, the first fault and its message) are kv_cache.hpp's.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "common.cuh"
#include "detail/kv_cache_kernels.hpp"
#include "results.hpp"

namespace sparsevlm::cuda {

/// Bytes of device workspace compact_paged_kv_async needs for up to `tokens`
/// sequence entries of a cache with `heads` × `head_dim` elements of type T per
/// token: a status word and one staging row per entry (the device copy runs in
/// two phases, detail/kv_cache_kernels.hpp). Errors: shape_mismatch for a negative
/// extent.
template <class T>
std::size_t compact_paged_kv_workspace_bytes(index_t tokens, index_t heads, index_t head_dim) {
  SPARSEVLM_CHECK(tokens >= 0 && heads >= 0 && head_dim >= 0, errc::shape_mismatch,
                  "tokens, heads, head_dim", ">= 0",
                  sparsevlm::detail::concat(tokens, ", ", heads, ", ", head_dim));
  return detail::paged_workspace_bytes(tokens, heads, head_dim, sizeof(T));
}

/// compact_paged_kv on the device: afterwards the request's first `n` tokens in
/// `cache` hold the new sequence (token i = old token sequence[i], or recycled
/// row -sequence[i] - 1 converted to T). Three kernels on `stream`: a one-block
/// check, then gather into and scatter from the workspace's staging rows.
///
/// - `sequence`: [n] int64 in device memory (e.g. device_step::sequence(), or
///   its recycled-free form), the same rules as the CPU function.
/// - `cache`: one layer's K or V pages in device memory, views and `layout` as
///   the CPU function (T = float, half or bfloat16).
/// - `block_table`: [table_size] page ids in device memory, B = int32 (vLLM's
///   tables, no widening needed) or int64.
/// - `recycled`: [c, heads, head_dim] in device memory, or c = 0.
/// - `workspace`: device memory of at least compact_paged_kv_workspace_bytes<T>(n,
///   heads, head_dim) bytes, 256-byte aligned; it also receives the status,
///   which download_compact_status reads back.
/// - Cost: 3 launches; 2·n·heads·head_dim element copies (staged, so rows that
///   stay are skipped); no host synchronisation.
/// - Errors: sparsevlm::error, before anything is enqueued, for what the host
///   can see (layout, block size, recycled extents, workspace size or alignment,
///   a pointer that is not device memory); the checks the data decide (entries,
///   coverage, page ids) run on the device: after one fails the cache is left
///   untouched and the status holds the fault. cudaError_t from the launches.
template <class T, class U, class B>
cudaError_t compact_paged_kv_async(const index_t* sequence, index_t n, strided_view<T, 4> cache,
                                   page_layout layout, const B* block_table, index_t table_size,
                                   tensor3_view<const U> recycled, void* workspace,
                                   std::size_t workspace_bytes, cudaStream_t stream) {
  static_assert(std::is_same_v<B, std::int32_t> || std::is_same_v<B, std::int64_t>,
                "block_table: int32 or int64 page ids");
  using sparsevlm::detail::concat;
  const strided_view<T, 4> kv = sparsevlm::detail::check_paged_args(cache, layout, recycled);
  SPARSEVLM_CHECK(n >= 0, errc::shape_mismatch, "n", ">= 0", n);
  SPARSEVLM_CHECK(table_size >= 0, errc::shape_mismatch, "table_size", ">= 0", table_size);
  const std::size_t need =
      compact_paged_kv_workspace_bytes<T>(n, kv.extent(2), kv.extent(3));
  SPARSEVLM_CHECK(workspace != nullptr && workspace_bytes >= need, errc::invalid_argument,
                  "workspace bytes", concat(">= ", need, " (compact_paged_kv_workspace_bytes)"),
                  workspace == nullptr ? std::size_t{0} : workspace_bytes);
  SPARSEVLM_CHECK(reinterpret_cast<std::uintptr_t>(workspace) % 256 == 0, errc::invalid_argument,
                  "workspace", "a 256-byte aligned device pointer (as cudaMalloc returns)",
                  "an unaligned one");
  SPARSEVLM_CHECK(n == 0 || sequence != nullptr, errc::invalid_argument, "sequence",
                  concat("a device pointer to ", n, " entries"), "null");
  SPARSEVLM_CHECK(table_size == 0 || block_table != nullptr, errc::invalid_argument,
                  "block_table", concat("a device pointer to ", table_size, " page ids"), "null");
  for (const auto& [p, name] :
       {std::pair<const void*, const char*>{sequence, "sequence"}, {kv.data(), "cache"},
        {block_table, "block_table"}, {recycled.data(), "recycled"}, {workspace, "workspace"}}) {
    const cudaError_t e = detail::check_device_pointer(p, name);
    if (e != cudaSuccess) return e;
  }
  const auto a = detail::make_paged_args(sequence, n, kv, block_table, table_size, recycled,
                                         workspace);
  detail::device_exec ex(stream);
  if (ex.status != cudaSuccess) return ex.status;
  detail::compact_paged(ex, a);
  return ex.status;
}

/// compact_paged_kv_async without recycled rows (e.g. a kv_sequence).
template <class T, class B>
cudaError_t compact_paged_kv_async(const index_t* sequence, index_t n, strided_view<T, 4> cache,
                                   page_layout layout, const B* block_table, index_t table_size,
                                   void* workspace, std::size_t workspace_bytes,
                                   cudaStream_t stream) {
  return compact_paged_kv_async(sequence, n, cache, layout, block_table, table_size,
                                tensor3_view<const T>(), workspace, workspace_bytes, stream);
}

/// Reads the status of the last compaction in `workspace` (synchronous: waits
/// for `stream`; call status.raise() to turn a fault into the CPU's error).
inline cudaError_t download_compact_status(const void* workspace, compact_status& status,
                                           cudaStream_t stream) {
  cudaError_t e = cudaMemcpyAsync(&status.fault, workspace, sizeof status.fault,
                                  cudaMemcpyDeviceToHost, stream);
  if (e == cudaSuccess) e = cudaStreamSynchronize(stream);
  return e;
}

}  // namespace sparsevlm::cuda
