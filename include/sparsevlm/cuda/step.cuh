// One SparseVLM pruning step on the GPU: the stages composed (step.hpp's
// prune_step_into), stream-ordered, in a caller-provided workspace.
//
//   std::size_t bytes = 0;
//   cuda::prune_step_async(in, opt, nullptr, bytes, step, nullptr, stream);  // size query
//   ... allocate `bytes` of device memory once per model shape ...
//   cuda::prune_step_async(in, opt, ws, bytes, step, pinned_len, stream);
//   cuda::apply_plan_async(step, hidden, hidden_out, stream);
//   cudaEventRecord(done, stream);  ...  cudaEventSynchronize(done); n = *pinned_len;
//
// See docs/cuda.md for the protocol, the limits and what differs from the CPU.
#pragma once

#include <optional>
#include <span>
#include <vector>

#include "../step.hpp"
#include "keep_set.cuh"
#include "plan.cuh"
#include "rank.cuh"
#include "raters.cuh"
#include "recycle.cuh"
#include "scores.cuh"

namespace sparsevlm::cuda {

namespace detail {

template <class TE, class TH>
step_shape shape_of(matrix_view<const TE> embeds, matrix_view<const TH> hidden, index_t length,
                    visual_span visual, bool given, index_t heads, index_t head_dim,
                    const step_options& opt) {
  step_shape s;
  s.length = length;
  s.visual = visual.len;
  s.heads = heads;
  s.embed_dim = given ? 0 : embeds.extent(1);
  s.hidden_dim = hidden.extent(1);
  s.head_dim = head_dim;
  s.recycle_fraction = opt.recycle.enabled ? opt.recycle.fraction : 0.0;
  s.cluster_divisor = opt.recycle.cluster_divisor;
  return s;
}

/// Everything after the scores, and the stage 1 before them.
template <class TE, class TH, class Score>
cudaError_t run(matrix_view<const TE> embeds, matrix_view<const TH> hidden, index_t length,
                visual_span visual, const std::optional<std::span<const index_t>>& raters,
                const step_shape& shape, const step_options& opt, void* workspace,
                std::size_t& bytes, device_step& out, index_t* pinned_length,
                cudaStream_t stream, Score&& score) {
  check_policy(opt.policy);
  if (opt.recycle.enabled) check_recycle_options(opt.recycle);
  SPARSEVLM_CHECK(hidden.extent(0) == length, errc::shape_mismatch, "hidden.extent[0]", length,
                  hidden.extent(0));
  SPARSEVLM_CHECK(hidden.extent(1) >= 1, errc::shape_mismatch, "hidden.extent[1]", ">= 1",
                  hidden.extent(1));
  sparsevlm::detail::check_span(visual, length, "length");
  if (workspace == nullptr) return begin_step(shape, length, visual, nullptr, bytes, out, stream);
  if (!raters) {
    SPARSEVLM_CHECK(embeds.extent(0) == length && embeds.extent(1) >= 1, errc::shape_mismatch,
                    "embeds", sparsevlm::detail::concat("[", length, ", >= 1]"),
                    sparsevlm::detail::concat("[", embeds.extent(0), ", ", embeds.extent(1), "]"));
  }
  // Every host-side check of the stages below happens before anything is
  // enqueued: begin_step and the stage checks only throw on shapes, and the
  // shapes were derived from these very inputs.
  device_step st;
  cudaError_t e = begin_step(shape, length, visual, workspace, bytes, st, stream);
  if (e == cudaSuccess)
    e = raters ? set_raters_async(st, *raters, stream) : select_raters_async(st, embeds, stream);
  if (e == cudaSuccess) e = score(st);
  if (e == cudaSuccess) e = numerical_rank_async(st, stream);
  if (e == cudaSuccess) e = keep_count_async(st, opt, stream);
  if (e == cudaSuccess) e = select_keep_async(st, stream);
  if (e == cudaSuccess && opt.recycle.enabled) e = recycle_async(st, hidden, stream);
  if (e == cudaSuccess) e = make_sequence_async(st, pinned_length, stream);
  out = st;
  return e;
}

}  // namespace detail

/// One pruning step (spec steps 1-8) on the GPU, from the attention
/// probabilities: the decisions of prune_step_into (same raters, scores bits,
/// rank, keep set, clusters, merged rows, sequence; docs/cuda.md says why),
/// left on the device in `out`.
///
/// - `in`: step_inputs whose views and rater span point to DEVICE memory.
/// - Workspace, two-phase: with `workspace == nullptr`, sets `bytes` to the size
///   this step needs and enqueues nothing; else `workspace` (256-byte aligned,
///   `bytes` long, e.g. step_workspace_bytes(shape) for a model's largest shape)
///   holds every temporary and the outputs. Nothing is allocated.
/// - `pinned_length`: optional host slot (pinned) that receives the new
///   sequence length (−1 if the data raised a flag: NaN/Inf, bad raters) once
///   the stream reaches it; the only value that reaches the host.
/// - Stream-ordered; no device or stream synchronisation.
/// - Errors: sparsevlm::error for extents/options (before anything is enqueued;
///   SparseVLM+'s top_heads and gravity are not supported here); otherwise the
///   first cudaError_t of the launches.
template <class TE, class TA, class TH>
cudaError_t prune_step_async(const step_inputs<TE, TA, TH>& in, const step_options& opt,
                             void* workspace, std::size_t& bytes, device_step& out,
                             index_t* pinned_length, cudaStream_t stream) {
  detail::check_scoring(opt.scoring);
  const index_t L = in.attn.extent(1);
  const step_shape shape = detail::shape_of(in.embeds, in.hidden, L, in.visual,
                                            in.raters.has_value(), in.attn.extent(0), 0, opt);
  if (workspace != nullptr) {
    SPARSEVLM_CHECK(in.attn.extent(0) >= 1 && in.attn.extent(2) == L, errc::shape_mismatch, "attn",
                    sparsevlm::detail::concat("[H >= 1, ", L, ", ", L, "]"),
                    sparsevlm::detail::concat("[", in.attn.extent(0), ", ", L, ", ",
                                              in.attn.extent(2), "]"));
  }
  return detail::run(in.embeds, in.hidden, L, in.visual, in.raters, shape, opt, workspace, bytes,
                     out, pinned_length, stream, [&](const device_step& st) {
                       return relevance_scores_async(st, in.attn, opt.scoring, stream);
                     });
}

/// The same step scoring from queries and keys (step_inputs_qk; L from k).
template <class TE, class TQ, class TK, class TH>
cudaError_t prune_step_async(const step_inputs_qk<TE, TQ, TK, TH>& in, const step_options& opt,
                             void* workspace, std::size_t& bytes, device_step& out,
                             index_t* pinned_length, cudaStream_t stream) {
  detail::check_scoring(opt.scoring);
  const index_t L = in.qk.k.extent(1);
  const step_shape shape =
      detail::shape_of(in.embeds, in.hidden, L, in.visual, in.raters.has_value(),
                       in.qk.q.extent(0), in.qk.q.extent(2) > 0 ? in.qk.q.extent(2) : 1, opt);
  return detail::run(in.embeds, in.hidden, L, in.visual, in.raters, shape, opt, workspace, bytes,
                     out, pinned_length, stream, [&](const device_step& st) {
                       return relevance_scores_qk_async(st, in.qk, opt.scoring, stream);
                     });
}

/// The synchronous convenience form: prune_step_async, then waits for `stream`
/// and returns the new length in `length` (−1 after a flagged error: read the
/// flags with download()). `workspace` must be given (no size query here).
template <class Inputs>
cudaError_t prune_step_sync(const Inputs& in, const step_options& opt, void* workspace,
                            std::size_t bytes, device_step& out, index_t& length,
                            cudaStream_t stream) {
  SPARSEVLM_CHECK(workspace != nullptr, errc::invalid_argument, "workspace",
                  "device memory (size it with the async form's query)", "nullptr");
  index_t slot = -1;
  cudaError_t e = prune_step_async(in, opt, workspace, bytes, out, &slot, stream);
  if (e == cudaSuccess) e = cudaStreamSynchronize(stream);
  if (e == cudaSuccess) length = slot;
  return e;
}

/// B independent steps (a ragged batch: each Inputs has its own length and
/// span), enqueued one after another on `stream` into consecutive slices of
/// one workspace. Two-phase like prune_step_async (workspace == nullptr: `bytes`
/// receives the total). `options` has 1 entry (shared) or B; `out` B entries;
/// `pinned_lengths`, when not null, B slots. The kernels of one step run
/// back to back; steps do not overlap (a stream per slice would let them).
template <class Inputs>
cudaError_t prune_batch_async(std::span<const Inputs> steps, std::span<const step_options> options,
                              void* workspace, std::size_t& bytes, std::span<device_step> out,
                              index_t* pinned_lengths, cudaStream_t stream) {
  const std::size_t B = steps.size();
  SPARSEVLM_CHECK(options.size() == 1 || options.size() == B, errc::shape_mismatch,
                  "options.size()", sparsevlm::detail::concat("1 or ", B), options.size());
  SPARSEVLM_CHECK(out.size() == B, errc::shape_mismatch, "out.size()", B, out.size());
  std::vector<std::size_t> need(B);
  std::size_t total = 0;
  for (std::size_t b = 0; b < B; ++b) {
    std::size_t n = 0;
    device_step unused;
    const cudaError_t e = prune_step_async(steps[b], options[options.size() == 1 ? 0 : b], nullptr,
                                           n, unused, nullptr, stream);
    if (e != cudaSuccess) return e;
    need[b] = n;
    total += n;
  }
  if (workspace == nullptr) {
    bytes = total;
    return cudaSuccess;
  }
  SPARSEVLM_CHECK(bytes >= total, errc::invalid_argument, "workspace bytes",
                  sparsevlm::detail::concat(">= ", total, " (the size query)"), bytes);
  auto* base = static_cast<unsigned char*>(workspace);
  for (std::size_t b = 0; b < B; ++b) {
    std::size_t n = need[b];
    const cudaError_t e = prune_step_async(steps[b], options[options.size() == 1 ? 0 : b], base, n,
                                           out[b], pinned_lengths ? pinned_lengths + b : nullptr,
                                           stream);
    if (e != cudaSuccess) return e;
    base += need[b];  // a multiple of 256 (layout rounds up)
  }
  return cudaSuccess;
}

}  // namespace sparsevlm::cuda
