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
#include "detail/batch.hpp"
#include "keep_set.cuh"
#include "plan.cuh"
#include "rank.cuh"
#include "raters.cuh"
#include "recycle.cuh"
#include "scores.cuh"

namespace sparsevlm::cuda {

namespace detail {

/// How far a step goes: its host checks (extents, options), then also the
/// device pointer queries, or all of it with the launches; `launch_checked`
/// launches after the host checks alone, for a step whose pointers an
/// all_checks call has just queried (prune_batch_async).
enum class step_upto { host_checks, all_checks, launch, launch_checked };

/// Whether a step at `upto` queries its device pointers.
inline bool queries_pointers(step_upto upto) {
  return upto == step_upto::all_checks || upto == step_upto::launch;
}

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

/// A whole step: every host check first (the shapes, the options, each stage's
/// arguments, and that every pointer a kernel reads is device memory), so a
/// refused step has enqueued nothing; then pipeline::run_step's launches on one
/// executor (the sequence plan_step records), and the pinned length's copy.
/// `upto` stops it after the host checks or after all checks (prune_batch_async
/// checks every step before it enqueues the first).
/// `check_scores(pre)` checks the scoring source against the step and returns
/// the cudaError_t of its pointer queries; `enqueue(ex, args, bounds, buffers)`
/// runs pipeline::run_step with that source. With `batch`, the launches are
/// recorded there (batch_exec: launched with the other steps' at its flush)
/// and `pinned_length` is the caller's to copy.
template <class TE, class TH, class CheckScores, class Enqueue>
cudaError_t run(matrix_view<const TE> embeds, matrix_view<const TH> hidden, index_t length,
                visual_span visual, const std::optional<std::span<const index_t>>& raters,
                const step_shape& shape, const step_options& opt, void* workspace,
                std::size_t& bytes, device_step& out, index_t* pinned_length,
                cudaStream_t stream, step_upto upto, CheckScores&& check_scores,
                Enqueue&& enqueue, batch_exec<device_exec>* batch) {
  check_policy(opt.policy);
  if (opt.recycle.enabled) check_recycle_options(opt.recycle);
  SPARSEVLM_CHECK(hidden.extent(0) == length, errc::shape_mismatch, "hidden.extent[0]", length,
                  hidden.extent(0));
  SPARSEVLM_CHECK(hidden.extent(1) >= 1, errc::shape_mismatch, "hidden.extent[1]", ">= 1",
                  hidden.extent(1));
  sparsevlm::detail::check_span(visual, length, "length");
  if (workspace == nullptr) return begin_step(shape, length, visual, nullptr, bytes, out, stream);
  device_step st = check_begin(shape, length, visual, workspace, bytes);
  if (raters) {
    check_set_raters(st, *raters);
  } else {
    check_select_raters(st, embeds);
  }
  const pipeline::decide_args decide = decide_args_of(opt, st.bounds, visual.len);
  if (opt.recycle.enabled) check_recycle_hidden(st, hidden);
  cudaError_t e = check_scores(st);
  if (upto == step_upto::host_checks) return e;
  if (e == cudaSuccess && queries_pointers(upto))
    e = check_device_pointers({{raters ? static_cast<const void*>(raters->data()) : embeds.data(),
                                raters ? "raters" : "embeds"},
                               {hidden.data(), "hidden"},
                               {workspace, "workspace"}});
  if (e != cudaSuccess) return e;
  device_exec ex(stream);
  if (ex.status != cudaSuccess) return ex.status;
  check_limits(st.bounds, ex.max_shared());
  if (upto == step_upto::all_checks) return cudaSuccess;  // nothing enqueued

  pipeline::step_args<TE, TH> a;
  a.embeds = rows_of(embeds);
  a.embed_dim = raters ? 0 : embeds.extent(1);
  a.given = raters.has_value();
  a.raters = raters ? raters->data() : nullptr;
  a.n_raters = raters ? static_cast<index_t>(raters->size()) : 0;
  a.hidden = rows_of(hidden);
  a.hidden_dim = hidden.extent(1);
  a.length = length;
  a.first_visual = visual.start;
  a.n_visual = visual.len;
  a.decide = decide;
  if (batch != nullptr) {
    batch->begin_step();
    enqueue(*batch, a, st.bounds, st.buf);
    out = st;
    return batch->status;
  }
  enqueue(ex, a, st.bounds, st.buf);
  // cudaMemcpyDefault: the slot may be pinned host memory or device memory.
  if (ex.status == cudaSuccess && pinned_length != nullptr)
    ex.status = cudaMemcpyAsync(pinned_length, st.length_slot(), sizeof(index_t),
                                cudaMemcpyDefault, stream);
  out = st;
  return ex.status;
}

/// prune_step_async's body, as far as `upto` (run).
template <class TE, class TA, class TH>
cudaError_t step_async(const step_inputs<TE, TA, TH>& in, const step_options& opt,
                       void* workspace, std::size_t& bytes, device_step& out,
                       index_t* pinned_length, cudaStream_t stream, step_upto upto,
                       batch_exec<device_exec>* batch = nullptr) {
  detail::check_scoring(opt.scoring);
  const index_t L = in.attn.extent(1);
  const step_shape shape = detail::shape_of(in.embeds, in.hidden, L, in.visual,
                                            in.raters.has_value(), in.attn.extent(0), 0, opt);
  return detail::run(
      in.embeds, in.hidden, L, in.visual, in.raters, shape, opt, workspace, bytes, out,
      pinned_length, stream, upto,
      [&](const device_step& st) {
        detail::check_attn(st, in.attn, opt.scoring);
        return queries_pointers(upto) ? detail::check_device_pointer(in.attn.data(), "attn")
                                      : cudaSuccess;
      },
      [&](auto& ex, const auto& a, const detail::pipeline::bounds& b,
          const detail::pipeline::buffers& buf) {
        detail::pipeline::run_step(ex, a, detail::rows_of(in.attn), in.attn.extent(0), b, buf);
      },
      batch);
}

template <class TE, class TQ, class TK, class TH>
cudaError_t step_async(const step_inputs_qk<TE, TQ, TK, TH>& in, const step_options& opt,
                       void* workspace, std::size_t& bytes, device_step& out,
                       index_t* pinned_length, cudaStream_t stream, step_upto upto,
                       batch_exec<device_exec>* batch = nullptr) {
  detail::check_scoring(opt.scoring);
  const index_t L = in.qk.k.extent(1);
  const step_shape shape =
      detail::shape_of(in.embeds, in.hidden, L, in.visual, in.raters.has_value(),
                       in.qk.q.extent(0), in.qk.q.extent(2) > 0 ? in.qk.q.extent(2) : 1, opt);
  detail::pipeline::qk_args<TQ, TK> q;
  return detail::run(
      in.embeds, in.hidden, L, in.visual, in.raters, shape, opt, workspace, bytes, out,
      pinned_length, stream, upto,
      [&](const device_step& st) {
        q = detail::qk_args_of(st, in.qk, opt.scoring);
        return queries_pointers(upto) ? detail::check_qk_pointers(in.qk) : cudaSuccess;
      },
      [&](auto& ex, const auto& a, const detail::pipeline::bounds& b,
          const detail::pipeline::buffers& buf) { detail::pipeline::run_step(ex, a, q, b, buf); },
      batch);
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
  return detail::step_async(in, opt, workspace, bytes, out, pinned_length, stream,
                            detail::step_upto::launch);
}

/// The same step scoring from queries and keys (step_inputs_qk; L from k).
template <class TE, class TQ, class TK, class TH>
cudaError_t prune_step_async(const step_inputs_qk<TE, TQ, TK, TH>& in, const step_options& opt,
                             void* workspace, std::size_t& bytes, device_step& out,
                             index_t* pinned_length, cudaStream_t stream) {
  return detail::step_async(in, opt, workspace, bytes, out, pinned_length, stream,
                            detail::step_upto::launch);
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
/// span) on `stream`, into consecutive slices of one workspace. Two-phase like
/// prune_step_async (workspace == nullptr: `bytes` receives the total). Every
/// step is checked before the first is enqueued (a step's error names it:
/// "steps[3]: hidden.extent[0]: ..."). `options` has 1 entry (shared) or B;
/// `out` B entries (valid when the call returns cudaSuccess: a launch error
/// may leave later steps unlaunched); `pinned_lengths`, when not null, B slots
/// (copied after every step's kernels).
///
/// The steps run together: launch i of every step (the counts reset, the
/// raters-and-scores chain, the rest) is one grid (detail::batched, up to
/// batch_width steps a grid), so one step's one-block phases overlap the
/// others' instead of running one step after another: 3 launches for a batch
/// (more past batch_width steps), each step's bits as prune_step_async's.
/// With set_chained_launches(false), each step's kernels are launched one by
/// one, steps interleaved.
template <class Inputs>
cudaError_t prune_batch_async(std::span<const Inputs> steps, std::span<const step_options> options,
                              void* workspace, std::size_t& bytes, std::span<device_step> out,
                              index_t* pinned_lengths, cudaStream_t stream) {
  const std::size_t B = steps.size();
  SPARSEVLM_CHECK(options.size() == 1 || options.size() == B, errc::shape_mismatch,
                  "options.size()", sparsevlm::detail::concat("1 or ", B), options.size());
  SPARSEVLM_CHECK(out.size() == B, errc::shape_mismatch, "out.size()", B, out.size());
  // Step b (its checks, or its launches recorded in `batch`), with its errors naming it.
  device_step unused;
  std::optional<detail::batch_exec<detail::device_exec>> batch;  // after the checks: its
                                                                 // constructor asks the runtime
  const auto checked = [&](std::size_t b, void* ws, std::size_t& n, detail::step_upto upto) {
    const bool launch = upto == detail::step_upto::launch_checked;
    try {
      return detail::step_async(steps[b], options[options.size() == 1 ? 0 : b], ws, n,
                                launch ? out[b] : unused, nullptr, stream, upto,
                                launch ? &*batch : nullptr);
    } catch (const error& err) {
      throw error(err.code(), sparsevlm::detail::concat("steps[", b, "]: ", err.what()));
    }
  };
  std::vector<std::size_t> need(B);
  std::size_t total = 0;
  for (std::size_t b = 0; b < B; ++b) {
    std::size_t n = 0;
    const cudaError_t e = checked(b, nullptr, n, detail::step_upto::launch);  // a size query
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
  // Every step's checks before the first enqueue, the host's first (extents,
  // options), then the device pointer queries: a refused batch has touched
  // nothing, whichever step is at fault.
  for (const auto upto : {detail::step_upto::host_checks, detail::step_upto::all_checks}) {
    auto* base = static_cast<unsigned char*>(workspace);
    for (std::size_t b = 0; b < B; ++b) {
      std::size_t n = need[b];
      const cudaError_t e = checked(b, base, n, upto);
      if (e != cudaSuccess) return e;
      base += need[b];
    }
  }
  // The launches, recorded (with the host checks again: they build each step's
  // state, but no second round of pointer queries), then enqueued together.
  batch.emplace(stream);
  if (batch->status != cudaSuccess) return batch->status;
  auto* base = static_cast<unsigned char*>(workspace);
  for (std::size_t b = 0; b < B; ++b) {
    std::size_t n = need[b];
    const cudaError_t e = checked(b, base, n, detail::step_upto::launch_checked);
    if (e != cudaSuccess) return e;
    base += need[b];  // a multiple of 256 (layout rounds up)
  }
  batch->flush();
  if (batch->status != cudaSuccess) return batch->status;
  // cudaMemcpyDefault: the slots may be pinned host memory or device memory.
  for (std::size_t b = 0; b < B && pinned_lengths != nullptr; ++b) {
    const cudaError_t e = cudaMemcpyAsync(pinned_lengths + b, out[b].length_slot(), sizeof(index_t),
                                          cudaMemcpyDefault, stream);
    if (e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

}  // namespace sparsevlm::cuda
