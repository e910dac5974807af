// Stage 8 on the device: the new sequence (plan.hpp's make_sequence) and its
// application to the engine's per-token arrays: hidden states, position ids
// (positions.hpp) and K/V rows (kv_cache.hpp).
#pragma once

#include <cstdint>

#include "../positions.hpp"
#include "common.cuh"

namespace sparsevlm::cuda {

/// The new sequence (prefix, kept tokens, −(k+1) for recycled token k, text) and
/// its length, on the device; the length is −1 when the step raised a flag. With
/// `pinned_length` (host memory from cudaMallocHost / cudaHostAlloc), the length
/// is copied there on `stream`: read it after an event recorded behind this call
/// (a pageable pointer works too, but the copy then blocks the host).
inline cudaError_t make_sequence_async(const device_step& step, index_t* pinned_length,
                                       cudaStream_t stream) {
  detail::device_exec ex(stream);
  if (ex.status != cudaSuccess) return ex.status;
  detail::pipeline::sequence(ex, step.length, step.visual.start, step.visual.len, step.buf);
  if (ex.status == cudaSuccess && pinned_length != nullptr)
    ex.status = cudaMemcpyAsync(pinned_length, step.length_slot(), sizeof(index_t),
                                cudaMemcpyDefault, stream);  // pinned host or device memory
  return ex.status;
}

namespace detail {

template <class T>
bool disjoint(const T* a, std::int64_t a_reach, const T* b, std::int64_t b_reach) {
  const auto lo_a = reinterpret_cast<std::uintptr_t>(a), lo_b = reinterpret_cast<std::uintptr_t>(b);
  const auto hi_a = lo_a + static_cast<std::uintptr_t>(a_reach) * sizeof(T);
  const auto hi_b = lo_b + static_cast<std::uintptr_t>(b_reach) * sizeof(T);
  return hi_a <= lo_b || hi_b <= lo_a;
}

template <class V>
std::int64_t reach(const V& v) {  // elements from the first to one past the last
  std::int64_t r = 1;
  for (std::size_t d = 0; d < V::rank; ++d)
    if (v.extent(d) == 0) return 0;
    else r += (v.extent(d) - 1) * v.stride(d);
  return r;
}

template <class T>
void check_gather(tensor3_view<const T> in, tensor3_view<T> out, const device_step& step,
                  const char* name) {
  using sparsevlm::detail::concat;
  SPARSEVLM_CHECK(in.extent(0) == step.length, errc::shape_mismatch, concat(name, ".extent[0]"),
                  concat(step.length, " (the step's length)"), in.extent(0));
  SPARSEVLM_CHECK(out.extent(0) >= step.length && out.extent(1) == in.extent(1) &&
                      out.extent(2) == in.extent(2),
                  errc::shape_mismatch, "out",
                  concat("[>= ", step.length, ", ", in.extent(1), ", ", in.extent(2),
                         "] (the new length is only known on the device)"),
                  concat("[", out.extent(0), ", ", out.extent(1), ", ", out.extent(2), "]"));
  SPARSEVLM_CHECK(disjoint(in.data(), reach(in), static_cast<const T*>(out.data()), reach(out)),
                  errc::invalid_argument, "out",
                  concat("memory disjoint from ", name, " (rows are gathered in parallel)"),
                  "an overlapping view");
}

template <class T>
detail::plan_gather<T> gather_of(const device_step& step, tensor3_view<const T> in,
                                        tensor3_view<T> out, detail::recycled_rows mode) {
  return detail::plan_gather<T>{in.data(),     in.stride(0),    in.stride(1),
                                       in.stride(2),  out.data(),      out.stride(0),
                                       out.stride(1), out.stride(2),   step.length,
                                       in.extent(1),  in.extent(2),    mode,
                                       step.buf.merged, step.buf.offsets, step.buf.members,
                                       step.buf.sequence, step.visual.start, step.buf.counts};
}

template <class T>
tensor3_view<T> as3(matrix_view<T> m) {
  return tensor3_view<T>(m.data(), {m.extent(0), 1, m.extent(1)}, {m.stride(0), 0, m.stride(1)},
                         "rows");
}

}  // namespace detail

/// out[i] = in[sequence[i]], or the merged row of recycled token k (float32,
/// converted to T) — apply_plan on the device, for the hidden states [L, d].
/// Writes rows [0, new length) of `out`; `out` needs L rows (the new length is
/// on the device) and must not overlap `in`. Does nothing after a flagged step.
template <class T>
cudaError_t apply_plan_async(const device_step& step, matrix_view<const T> in,
                             matrix_view<T> out, cudaStream_t stream) {
  SPARSEVLM_CHECK(in.extent(1) == step.hidden_dim, errc::shape_mismatch, "in.extent[1]",
                  sparsevlm::detail::concat(step.hidden_dim, " (the merged rows' width)"),
                  in.extent(1));
  const auto in3 = detail::as3(in);
  const auto out3 = detail::as3(out);
  detail::check_gather(in3, out3, step, "in");
  detail::device_exec ex(stream);
  if (ex.status != cudaSuccess) return ex.status;
  detail::pipeline::gather(ex, detail::gather_of(step, in3, out3, detail::recycled_rows::merged));
  return ex.status;
}

/// K or V rows of a layer that ran BEFORE the step ([L, heads, head_dim], any
/// strides, e.g. a [heads, L, dh] cache seen with its axes swapped): the
/// sequence without its recycled entries (kv_cache.hpp's kv_sequence), rows
/// [0, new length − c) of `out`. `out` needs L rows and must not overlap `in`.
template <class T>
cudaError_t apply_plan_kv_async(const device_step& step, tensor3_view<const T> in,
                                tensor3_view<T> out, cudaStream_t stream) {
  detail::check_gather(in, out, step, "in");
  detail::device_exec ex(stream);
  if (ex.status != cudaSuccess) return ex.status;
  detail::pipeline::gather(ex, detail::gather_of(step, in, out, detail::recycled_rows::drop));
  return ex.status;
}

/// Position ids after the step (positions.hpp's pruned_positions): `positions`
/// [rows, L] int64 (1 row for RoPE, 3 for mRoPE), `out` [rows, >= L]; renumber
/// writes 0..n−1, keep_original the original ids, a recycled token taking its
/// cluster's first member's. Columns [0, new length) are written.
inline cudaError_t pruned_positions_async(const device_step& step,
                                          matrix_view<const index_t> positions,
                                          position_policy policy, matrix_view<index_t> out,
                                          cudaStream_t stream) {
  SPARSEVLM_CHECK(policy == position_policy::renumber || policy == position_policy::keep_original,
                  errc::invalid_argument, "policy", "renumber or keep_original",
                  static_cast<int>(policy));
  SPARSEVLM_CHECK(out.extent(0) == positions.extent(0), errc::shape_mismatch, "out.extent[0]",
                  positions.extent(0), out.extent(0));
  // Token-major views of the [rows, L] arrays: [L, 1, rows].
  const tensor3_view<const index_t> in3(positions.data(), {positions.extent(1), 1, positions.extent(0)},
                                        {positions.stride(1), 0, positions.stride(0)}, "positions");
  const tensor3_view<index_t> out3(out.data(), {out.extent(1), 1, out.extent(0)},
                                   {out.stride(1), 0, out.stride(0)}, "out");
  detail::check_gather(in3, out3, step, "positions");
  detail::device_exec ex(stream);
  if (ex.status != cudaSuccess) return ex.status;
  if (policy == position_policy::renumber) {
    ex.launch(detail::plan_renumber{out.data(), out.stride(0), out.stride(1), out.extent(0),
                                           step.length, step.buf.counts},
              ex.grid(out.extent(0) * step.length), 1, ex.threads(), 0);
  } else {
    detail::pipeline::gather(
        ex, detail::gather_of(step, in3, out3, detail::recycled_rows::first_member));
  }
  return ex.status;
}

}  // namespace sparsevlm::cuda
