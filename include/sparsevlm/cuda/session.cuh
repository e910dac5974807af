// One pruning layer of a prefill session (session.hpp) on device tensors: the
// step on the GPU with the session's raters and the layer's options, its
// decisions read back, the session moved on. The hidden states, attention or
// q/k, scores and merged rows never reach the host.
//
//   prefill_session s(layout, raters, config);        // host bookkeeping
//   std::size_t bytes = 0;
//   cuda::prune_layer(s, l, attn, hidden, nullptr, bytes, step, plan, stream);  // size
//   ... allocate `bytes` of device memory: the largest need over the schedule's
//       pruning layers (a later layer may recycle a larger fraction) ...
//   cuda::prune_layer(s, l, attn, hidden, ws, bytes, step, plan, stream);
//   cuda::apply_plan_async(step, hidden, hidden_out, stream);   // plan.length rows
//   ... compact the K/V caches with plan.kv_sequence, run layer l + 1 with plan.positions
#pragma once

#include <cstddef>
#include <optional>
#include <span>
#include <utility>

#include "../session.hpp"
#include "step.cuh"

namespace sparsevlm::cuda {

namespace detail {

/// The one span of `s` that holds visual tokens (the GPU step takes one span).
/// Errors: invalid_argument naming `spans` otherwise.
inline visual_span session_span(const prefill_session& s) {
  visual_span held{};
  std::size_t n = 0;
  for (const visual_span& v : s.spans())
    if (v.len > 0) {
      held = v;
      ++n;
    }
  SPARSEVLM_CHECK(n == 1, errc::invalid_argument, "spans",
                  "one span with visual tokens (the GPU step takes one; run prune() on host "
                  "tensors for several or none)",
                  n);
  return held;
}

/// Bytes of the raters' slot at the head of a session layer's workspace.
inline std::size_t session_raters_bytes(const prefill_session& s) {
  const std::size_t a = pipeline::alignment;
  return (s.raters().size() * sizeof(index_t) + a - 1) / a * a;
}

/// q/k: q holds all n rows or the R rater rows (scores_qk.hpp's rule); nothing to
/// check for the attention.
template <class TA>
void check_source_rows(const tensor3_view<const TA>&, index_t) {}
template <class TQ, class TK>
void check_source_rows(const qk_view<TQ, TK>& qk, index_t R) {
  sparsevlm::detail::check_qk_rows(qk, R);
}

/// prune_layer's body, for either scoring source (attention or q/k).
template <class Source, class TH>
cudaError_t session_layer(prefill_session& s, index_t layer, const Source& src,
                          matrix_view<const TH> hidden, void* workspace, std::size_t& bytes,
                          device_step& step, layer_plan& plan, cudaStream_t stream) {
  using sparsevlm::detail::concat;
  const step_options& opt = sparsevlm::detail::session_next(s, layer).options;
  const visual_span v = session_span(s);
  const index_t n = s.length();
  const auto R = static_cast<index_t>(s.raters().size());
  SPARSEVLM_CHECK(sparsevlm::detail::source_length(src) == n, errc::shape_mismatch,
                  sparsevlm::detail::source_name(src), concat(n, " (the session's length)"),
                  sparsevlm::detail::source_length(src));
  SPARSEVLM_CHECK(hidden.extent(0) == n, errc::shape_mismatch, "hidden.extent[0]",
                  concat(n, " (the session's length)"), hidden.extent(0));
  // q's rows as prefill_session::prune checks them (all n, or the R raters): the
  // step alone knows only R <= the text tokens.
  check_source_rows(src, R);
  const std::size_t head = session_raters_bytes(s);
  auto* base = static_cast<unsigned char*>(workspace);
  // The step reads the raters from the workspace's head.
  const auto in_at = [&](const index_t* raters) {
    return sparsevlm::detail::make_step_inputs(
        matrix_view<const TH>(), src, hidden, v,
        std::optional(std::span<const index_t>(raters, raters ? static_cast<std::size_t>(R) : 0)));
  };
  std::size_t need = 0;
  device_step query;
  cudaError_t e = prune_step_async(in_at(nullptr), opt, nullptr, need, query, nullptr, stream);
  if (e != cudaSuccess) return e;
  if (workspace == nullptr) {
    bytes = head + need;
    return cudaSuccess;
  }
  SPARSEVLM_CHECK(bytes >= head + need, errc::invalid_argument, "workspace bytes",
                  concat(">= ", head + need, " (the size query)"), bytes);
  e = check_device_pointer(workspace, "workspace");
  if (e != cudaSuccess) return e;
  const auto in = in_at(reinterpret_cast<const index_t*>(base));
  std::size_t rest = bytes - head;
  device_step st;
  // Every check (the workspace, the source's extents and pointers) before the
  // raters' copy, the first thing enqueued: a refused layer enqueues nothing.
  e = step_async(in, opt, base + head, rest, st, nullptr, stream, step_upto::all_checks);
  if (e != cudaSuccess) return e;
  if (R > 0)
    e = cudaMemcpyAsync(base, s.raters().data(), static_cast<std::size_t>(R) * sizeof(index_t),
                        cudaMemcpyHostToDevice, stream);
  if (e == cudaSuccess) e = prune_step_async(in, opt, base + head, rest, st, nullptr, stream);
  if (e != cudaSuccess) return e;
  // The one synchronisation: the host needs the decisions to lay out the next layer.
  step_result r;
  step_status status;
  e = download_decisions(st, r, status, stream);
  if (e != cudaSuccess) return e;
  status.raise();
  plan = s.commit(layer, std::move(r));  // checks the step against the session again
  step = st;
  return cudaSuccess;
}

}  // namespace detail

/// Prunes the output of decoder layer `layer` of a prefill_session on the GPU,
/// from the layer's attention probabilities `attn` [H, n, n] and output hidden
/// states `hidden` [n, d] (n = session.length()), both in DEVICE memory, on
/// `stream`: prune_step_async on the session's one span with visual tokens,
/// with its raters() (copied to the workspace's head) and the layer's options,
/// then the decisions read back and session.commit(layer, ...).
///
/// - Workspace, two-phase: with `workspace == nullptr`, sets `bytes` and does
///   nothing else (after checking the layer and the span); else `workspace`
///   (256-byte aligned device memory, `bytes` long) holds the raters, every
///   temporary and the outputs. Nothing is allocated. The need follows the
///   layer's length and recycling options: size one workspace for the largest
///   need over the schedule's pruning layers.
/// - `step`: the step's device outputs (scores, keep set, clusters, merged rows,
///   sequence), valid until the workspace is reused: apply_plan_async(step, …)
///   compacts the hidden states, the K/V cache kernels take step.sequence().
/// - `plan`: what prefill_session::prune returns for this step, except that
///   plan.step.scores and plan.step.recycled.merged are empty (they stay on the
///   device, in `step`).
/// - Synchronous: one cudaStreamSynchronize on `stream` (the host needs the new
///   length and positions before the next layer runs), so not capturable in a
///   graph; capture prune_step_async instead and commit its download.
/// - Cost: the step's kernels plus O(n) host bookkeeping and one read-back of
///   the decisions (raters, counts, keep set, clusters, sequence: O(n) integers).
/// - Errors (the session is then unchanged): sparsevlm::error when `layer` is
///   not the next pruning layer, when not exactly one span holds visual tokens
///   ("spans: …"), for extents and options (as prune_step_async, which refuses
///   SparseVLM+'s top_heads and RoPE gravity), for a host `workspace`, and for
///   the device's flags (non_finite for NaN/Inf scores, logits or recycled
///   rows, as the CPU session); otherwise the first cudaError_t. A layer refused
///   by a check has enqueued nothing.
template <class TA, class TH>
cudaError_t prune_layer(prefill_session& session, index_t layer, tensor3_view<const TA> attn,
                        matrix_view<const TH> hidden, void* workspace, std::size_t& bytes,
                        device_step& step, layer_plan& plan, cudaStream_t stream) {
  return detail::session_layer(session, layer, attn, hidden, workspace, bytes, step, plan, stream);
}

/// As above from queries and keys (prune_step_async's q/k form): q [H, n or R,
/// dh] (R rows in the order of session.raters()), k [Hkv, n, dh], an optional
/// LSE, all in device memory.
template <class TQ, class TK, class TH>
cudaError_t prune_layer(prefill_session& session, index_t layer, const qk_view<TQ, TK>& qk,
                        matrix_view<const TH> hidden, void* workspace, std::size_t& bytes,
                        device_step& step, layer_plan& plan, cudaStream_t stream) {
  return detail::session_layer(session, layer, qk, hidden, workspace, bytes, step, plan, stream);
}

}  // namespace sparsevlm::cuda
