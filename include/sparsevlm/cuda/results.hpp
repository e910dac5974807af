// The CUDA backend's result and status types: what a device step is
// (device_step: where its outputs sit in the caller's workspace), and what a
// step or a paged compaction found (step_status, compact_status), as read back.
// Host-compilable: no CUDA header, so host code (an engine's scheduler, a
// binding) can hold, store and inspect them without nvcc; the launchers that
// fill them are the .cuh files beside this one.
#pragma once

#include "../error.hpp"
#include "../kv_cache.hpp"
#include "../types.hpp"
#include "detail/pipeline.hpp"

namespace sparsevlm::cuda {

/// Flags a step raised on the device (detail::step_flag), as read back.
struct step_status {
  bool non_finite_embeds = false;     ///< a rater logit was NaN/Inf
  bool non_finite_scores = false;     ///< attention, q/k or LSE gave a NaN/Inf score
  bool non_finite_hidden = false;     ///< a recycled hidden row held NaN/Inf
  bool bad_raters = false;            ///< caller raters not ascending text positions
  [[nodiscard]] bool ok() const noexcept {
    return !(non_finite_embeds || non_finite_scores || non_finite_hidden || bad_raters);
  }
  /// Throws the sparsevlm::error of the first flag (in the order the stages
  /// run: raters, rater logits, scores, recycled rows), as the CPU step throws
  /// for the same data; a no-op when ok().
  void raise() const {
    const auto fail = [](errc code, const char* argument, const char* expected) {
      sparsevlm::detail::fail(code, argument, expected, "NaN/Inf (flagged on the GPU)");
    };
    if (bad_raters)
      sparsevlm::detail::fail(errc::invalid_argument, "raters", "ascending text positions",
                              "others (flagged on the GPU)");
    if (non_finite_embeds) fail(errc::non_finite, "embeds", "finite rater logits");
    if (non_finite_scores) fail(errc::non_finite, "attn/q/k/lse", "finite scores");
    if (non_finite_hidden) fail(errc::non_finite, "hidden", "finite recycled rows");
  }
};

namespace detail {
/// The flags of read-back counts as a step_status (download's decoding).
inline step_status status_of(const step_counts& c) noexcept {
  return step_status{c.flags[flag_embeds] != 0, c.flags[flag_scores] != 0,
                     c.flags[flag_hidden] != 0, c.flags[flag_raters] != 0};
}
}  // namespace detail

/// One pruning step's state on the device: where its buffers sit in the
/// caller's workspace, and the host-known sizes. A cheap value (pointers only);
/// valid while the workspace is, and until the next step that uses it.
///
/// The outputs, in device memory (the counts are device-resident: read them
/// with download(), or the new length through the pinned slot of
/// prune_step_async):
///   raters [R], scores [N], keep [keep] (absolute, ascending), clusters as
///   offsets [c + 1] into members [s] (absolute positions, ascending within a
///   cluster), merged [c, d] float32, sequence [new length] (plan.hpp's).
struct device_step {
  detail::pipeline::buffers buf{};
  detail::pipeline::bounds bounds{};
  index_t length = 0;      ///< L of this step
  visual_span visual{};    ///< [S, S+N)
  index_t hidden_dim = 0;  ///< d

  [[nodiscard]] const detail::step_counts* counts() const noexcept { return buf.counts; }
  [[nodiscard]] const index_t* raters() const noexcept { return buf.raters; }
  [[nodiscard]] const float* scores() const noexcept { return buf.scores; }
  [[nodiscard]] const index_t* keep() const noexcept { return buf.keep; }
  [[nodiscard]] const index_t* cluster_offsets() const noexcept { return buf.offsets; }
  [[nodiscard]] const index_t* cluster_members() const noexcept { return buf.members; }
  [[nodiscard]] const float* merged() const noexcept { return buf.merged; }
  [[nodiscard]] const index_t* sequence() const noexcept { return buf.sequence; }
  /// Device address of the new sequence length (−1 after a flagged error).
  [[nodiscard]] const index_t* length_slot() const noexcept { return &buf.counts->length; }
};

/// What a device compaction found, as read back by download_compact_status.
struct compact_status {
  sparsevlm::detail::paged_fault fault{};
  /// True when every check passed (and the rows moved).
  [[nodiscard]] bool ok() const noexcept { return fault.kind == fault.none; }
  /// Throws the error compact_paged_kv (the CPU function) throws for the same
  /// arguments; a no-op when ok().
  void raise() const { sparsevlm::detail::throw_paged_fault(fault); }
};

}  // namespace sparsevlm::cuda
