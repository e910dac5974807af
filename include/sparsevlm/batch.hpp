// Batches of ragged sequences: one pruning step per sequence (prune_batch), one
// pruning layer of several prefill sessions (prune_sessions), and the packed
// compaction that follows (compact_packed). See docs/integration.md ("Batches").
#pragma once

#include <exception>
#include <functional>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "session.hpp"

namespace sparsevlm {

/// Where B sequences sit in one token-major array [rows, w] (hidden states,
/// embeddings): sequence b is rows [offset(b), offset(b) + length(b)). A cheap
/// value that borrows the caller's offsets or lengths: keep them alive.
class ragged_layout {
 public:
  ragged_layout() = default;

  /// Packed, as FlashAttention's varlen `cu_seqlens`: B + 1 offsets, cu[0] = 0,
  /// non-decreasing; sequence b is rows [cu[b], cu[b+1]), rows() = cu[B].
  /// Errors: invalid_argument naming the entry ("cu_seqlens[2]: expected >= 17
  /// (non-decreasing), got 12"), or an empty span.
  static ragged_layout packed(std::span<const index_t> cu_seqlens) {
    SPARSEVLM_CHECK(!cu_seqlens.empty(), errc::invalid_argument, "cu_seqlens.size()",
                    ">= 1 (B + 1 offsets)", 0);
    SPARSEVLM_CHECK(cu_seqlens[0] == 0, errc::invalid_argument, "cu_seqlens[0]", 0, cu_seqlens[0]);
    for (std::size_t i = 1; i < cu_seqlens.size(); ++i)
      SPARSEVLM_CHECK(cu_seqlens[i] >= cu_seqlens[i - 1], errc::invalid_argument,
                      detail::concat("cu_seqlens[", i, "]"),
                      detail::concat(">= ", cu_seqlens[i - 1], " (non-decreasing)"), cu_seqlens[i]);
    ragged_layout l;
    l.v_ = cu_seqlens;
    l.packed_ = true;
    return l;
  }

  /// Padded: a [B, max_length, w] array seen as [B·max_length, w]; sequence b is
  /// the first lengths[b] rows of its slot, rows() = B·max_length.
  /// Errors: invalid_argument for max_length < 0 or a length outside
  /// [0, max_length] ("lengths[1]: expected in [0, 16], got 17").
  static ragged_layout padded(std::span<const index_t> lengths, index_t max_length) {
    SPARSEVLM_CHECK(max_length >= 0, errc::invalid_argument, "max_length", ">= 0", max_length);
    for (std::size_t i = 0; i < lengths.size(); ++i)
      SPARSEVLM_CHECK(lengths[i] >= 0 && lengths[i] <= max_length, errc::invalid_argument,
                      detail::concat("lengths[", i, "]"),
                      detail::concat("in [0, ", max_length, "] (max_length)"), lengths[i]);
    ragged_layout l;
    l.v_ = lengths;
    l.packed_ = false;
    l.stride_ = max_length;
    return l;
  }

  /// B, the number of sequences.
  [[nodiscard]] index_t count() const noexcept {
    return packed_ ? static_cast<index_t>(v_.size()) - (v_.empty() ? 0 : 1)
                   : static_cast<index_t>(v_.size());
  }
  [[nodiscard]] index_t offset(index_t b) const noexcept {
    return packed_ ? v_[static_cast<std::size_t>(b)] : b * stride_;
  }
  [[nodiscard]] index_t length(index_t b) const noexcept {
    const auto i = static_cast<std::size_t>(b);
    return packed_ ? v_[i + 1] - v_[i] : v_[i];
  }
  /// Rows of the array the layout describes.
  [[nodiscard]] index_t rows() const noexcept {
    if (packed_) return v_.empty() ? 0 : v_.back();
    return count() * stride_;
  }

 private:
  std::span<const index_t> v_{};
  index_t stride_ = 0;
  bool packed_ = true;
};

/// The body of a parallel loop: run task `i` on worker `worker`.
using parallel_body = std::function<void(index_t i, index_t worker)>;

/// An engine's parallel for, pointed at its own thread pool (the library keeps
/// none): it must call body(i, w) exactly once for every i in [0, n), with a
/// worker id w in [0, workers) that no two concurrent calls share, and return
/// when every call has returned. The body does not throw (errors are collected
/// and rethrown by the caller after the loop). A pool of P threads passes its
/// thread index and is given P workspaces; `w = 0` for every i is a serial loop.
using parallel_for_fn = std::function<void(index_t n, const parallel_body& body)>;

/// One pruning step of B ragged sequences. `Source` is the attention source of
/// one sequence: tensor3_view<const TA> (attention probabilities) or
/// qk_view<TQ, TK> (queries and keys), as in step_inputs / step_inputs_qk.
template <class TE, class Source, class TH>
struct batch_inputs {
  ragged_layout layout;  ///< where each sequence's rows are in `embeds` and `hidden`
  /// [layout.rows(), d_e]; not read (may be empty) when every sequence has raters.
  matrix_view<const TE> embeds;
  std::span<const Source> attn;  ///< B entries: [H, L_b, L_b], or q/k with L_b keys
  matrix_view<const TH> hidden;  ///< [layout.rows(), d]
  /// B spans, relative to each sequence's first row (as if it were alone).
  std::span<const visual_span> visual;
  /// Empty, or B entries: caller raters of sequence b, relative like `visual`.
  std::span<const std::optional<std::span<const index_t>>> raters{};
};

namespace detail {

/// Rows [r0, r0 + n) of `m`, same strides.
template <class T>
matrix_view<T> row_block(matrix_view<T> m, index_t r0, index_t n, const char* name) {
  if (n == 0 || m.empty()) return matrix_view<T>(nullptr, {n, m.extent(1)}, {m.stride(0), m.stride(1)}, name);
  return matrix_view<T>(m.row(r0), {n, m.extent(1)}, {m.stride(0), m.stride(1)}, name);
}

inline void check_batch_common(index_t B, std::size_t n_src, std::size_t n_options,
                               std::size_t n_ws) {
  SPARSEVLM_CHECK(static_cast<index_t>(n_src) == B, errc::shape_mismatch, "attn.size()",
                  concat(B, " (sequences in the layout)"), n_src);
  SPARSEVLM_CHECK(n_options == 1 || static_cast<index_t>(n_options) == B, errc::shape_mismatch,
                  "options.size()", concat("1 or ", B, " (sequences in the layout)"), n_options);
  SPARSEVLM_CHECK(n_ws >= 1, errc::invalid_argument, "ws.size()", ">= 1 (one per worker)", n_ws);
}

/// Runs task(i, ws) for i in [0, n) through the hook (serially without one, or
/// for a single task); every sparsevlm::error is prefixed with "batch[id(i)]."
/// and the one of the lowest i is rethrown once all tasks are done.
template <class Task, class Id>
void run_tasks(index_t n, std::span<workspace> ws, const parallel_for_fn& parallel_for,
               Task&& task, Id&& id) {
  std::vector<std::exception_ptr> errors(static_cast<std::size_t>(n));
  std::vector<unsigned char> ran(static_cast<std::size_t>(n), 0);
  const index_t workers = static_cast<index_t>(ws.size());
  const parallel_body body = [&](index_t i, index_t w) {
    const auto k = static_cast<std::size_t>(i);
    try {
      SPARSEVLM_CHECK(w >= 0 && w < workers, errc::invalid_argument, "parallel_for worker id",
                      concat("in [0, ", workers, ") (ws.size())"), w);
      try {
        task(i, ws[static_cast<std::size_t>(w)]);
      } catch (const error& e) {
        throw error(e.code(), concat("batch[", id(i), "].", e.what()));
      }
    } catch (...) {
      errors[k] = std::current_exception();
    }
    ran[k] = 1;
  };
  if (parallel_for && n >= 2) {
    parallel_for(n, body);
  } else {
    for (index_t i = 0; i < n; ++i) body(i, 0);
  }
  for (index_t i = 0; i < n; ++i)
    SPARSEVLM_CHECK(ran[static_cast<std::size_t>(i)], errc::invalid_argument, "parallel_for",
                    concat("a call of the body for every index in [0, ", n, ")"),
                    concat("none for ", i));
  for (const std::exception_ptr& e : errors)
    if (e) std::rethrow_exception(e);
}

}  // namespace detail

/// One pruning step (prune_step) of each of B ragged sequences; result b is
/// what prune_step gives for sequence b alone (its own rows of embeds and
/// hidden, attn[b], visual[b], raters[b], options[b]), in that sequence's
/// coordinates, bit for bit, whatever the hook and the worker count.
///
/// - `options`: B entries (per-request policy, recycling, scoring), or one for
///   all.
/// - `ws`: one workspace per worker of `parallel_for` (a single one without a
///   hook); each grows to the largest sequence its worker meets and is reused.
/// - `parallel_for`: optional (parallel_for_fn). Sequences are independent
///   tasks; with B >= 2 and a hook they run through it, else serially. The
///   steps themselves are single-threaded, so a pool pays once sequences are a
///   few hundred tokens (the cost of one step; see bench/).
/// - Errors: shape_mismatch / invalid_argument for the batch (counts, rows of
///   embeds and hidden) first, then each sequence's check_step, named
///   "batch[b].…" ("batch[2].visual: expected a span inside [0, 40) …"), all
///   before any step runs; an error found while computing (non-finite values)
///   is reported for the lowest such b once every task has finished. Nothing is
///   returned on error.
template <class TE, class Source, class TH>
std::vector<step_result> prune_batch(const batch_inputs<TE, Source, TH>& in,
                                     std::span<const step_options> options,
                                     std::span<workspace> ws,
                                     const parallel_for_fn& parallel_for = {}) {
  const index_t B = in.layout.count();
  detail::check_batch_common(B, in.attn.size(), options.size(), ws.size());
  SPARSEVLM_CHECK(static_cast<index_t>(in.visual.size()) == B, errc::shape_mismatch,
                  "visual.size()", detail::concat(B, " (sequences in the layout)"),
                  in.visual.size());
  SPARSEVLM_CHECK(in.raters.empty() || static_cast<index_t>(in.raters.size()) == B,
                  errc::shape_mismatch, "raters.size()",
                  detail::concat("0 or ", B, " (sequences in the layout)"), in.raters.size());
  SPARSEVLM_CHECK(in.hidden.extent(0) == in.layout.rows(), errc::shape_mismatch,
                  "hidden.extent[0]", detail::concat(in.layout.rows(), " (layout rows)"),
                  in.hidden.extent(0));
  bool needs_embeds = in.raters.empty();
  for (const auto& r : in.raters) needs_embeds = needs_embeds || !r;
  if (needs_embeds)
    SPARSEVLM_CHECK(in.embeds.extent(0) == in.layout.rows(), errc::shape_mismatch,
                    "embeds.extent[0]", detail::concat(in.layout.rows(), " (layout rows)"),
                    in.embeds.extent(0));

  const auto inputs = [&](index_t b) {
    const auto k = static_cast<std::size_t>(b);
    const index_t off = in.layout.offset(b), len = in.layout.length(b);
    const bool own = !in.raters.empty() && in.raters[k].has_value();
    return detail::make_step_inputs(
        own ? matrix_view<const TE>() : detail::row_block(in.embeds, off, len, "embeds"),
        in.attn[k], detail::row_block(in.hidden, off, len, "hidden"), in.visual[k],
        own ? in.raters[k] : std::nullopt);
  };
  const auto opt = [&](index_t b) -> const step_options& {
    return options[options.size() == 1 ? 0 : static_cast<std::size_t>(b)];
  };
  for (index_t b = 0; b < B; ++b)
    detail::with_prefix(detail::concat("batch[", b, "]."), [&] { check_step(inputs(b), opt(b)); });

  std::vector<step_result> results(static_cast<std::size_t>(B));
  detail::run_tasks(
      B, ws, parallel_for,
      [&](index_t b, workspace& w) {
        results[static_cast<std::size_t>(b)] = prune_step(inputs(b), opt(b), w);
      },
      [](index_t b) { return b; });
  return results;
}

/// One pruning layer of B prefill sessions whose tokens sit ragged in one
/// array: every session with prunes_after(layer) is pruned with attn[b] and its
/// rows of `hidden` (as prefill_session::prune would do alone, bit for bit);
/// entry b of the result is its plan, or nullopt for a session that does not
/// prune after `layer` (its attn[b] is not read and may be empty). Each session
/// keeps its own schedule, budget and position policy (per-request settings).
///
/// - `layout`: B sequences, layout.length(b) == sessions[b].length();
///   `hidden`: [layout.rows(), d]; `attn`: B entries as for prune_batch.
/// - `ws`, `parallel_for`: as prune_batch; the tasks are the pruning sessions.
/// - Errors: as prune_batch, plus invalid_argument "batch[b].layer" for a
///   session whose next pruning layer is before `layer` (the engine skipped it).
///   Every session is decided before any is changed: on error none is.
template <class Source, class TH>
std::vector<std::optional<layer_plan>> prune_sessions(std::span<prefill_session> sessions,
                                                      index_t layer, const ragged_layout& layout,
                                                      std::span<const Source> attn,
                                                      matrix_view<const TH> hidden,
                                                      std::span<workspace> ws,
                                                      const parallel_for_fn& parallel_for = {}) {
  const index_t B = layout.count();
  SPARSEVLM_CHECK(static_cast<index_t>(sessions.size()) == B, errc::shape_mismatch,
                  "sessions.size()", detail::concat(B, " (sequences in the layout)"),
                  sessions.size());
  detail::check_batch_common(B, attn.size(), 1, ws.size());
  SPARSEVLM_CHECK(hidden.extent(0) == layout.rows(), errc::shape_mismatch, "hidden.extent[0]",
                  detail::concat(layout.rows(), " (layout rows)"), hidden.extent(0));
  std::vector<index_t> todo;
  for (index_t b = 0; b < B; ++b) {
    const prefill_session& s = sessions[static_cast<std::size_t>(b)];
    const std::string at = detail::concat("batch[", b, "].");
    SPARSEVLM_CHECK(layout.length(b) == s.length(), errc::shape_mismatch,
                    detail::concat("layout.length(", b, ")"),
                    detail::concat(s.length(), " (sessions[", b, "].length())"), layout.length(b));
    const std::optional<index_t> next = s.next_layer();
    SPARSEVLM_CHECK(!next || *next >= layer, errc::invalid_argument, at + "layer",
                    detail::concat("<= ", *next, " (the session's next pruning layer, not yet done)"),
                    layer);
    if (s.prunes_after(layer)) todo.push_back(b);
  }

  std::vector<layer_plan> steps(todo.size());
  detail::run_tasks(
      static_cast<index_t>(todo.size()), ws, parallel_for,
      [&](index_t i, workspace& w) {
        const index_t b = todo[static_cast<std::size_t>(i)];
        const auto k = static_cast<std::size_t>(b);
        steps[static_cast<std::size_t>(i)] = detail::session_compute(
            sessions[k], layer, attn[k],
            detail::row_block(hidden, layout.offset(b), layout.length(b), "hidden"), w);
      },
      [&](index_t i) { return todo[static_cast<std::size_t>(i)]; });

  std::vector<std::optional<layer_plan>> plans(static_cast<std::size_t>(B));
  for (std::size_t i = 0; i < todo.size(); ++i) {
    const auto k = static_cast<std::size_t>(todo[i]);
    plans[k] = detail::session_commit(sessions[k], std::move(steps[i]));
  }
  return plans;
}

namespace detail {

/// compact_packed with `get(b)` giving sequence b's plan as (sequence, recycled),
/// or a null sequence for a sequence that keeps its rows.
template <class T, class Get>
index_t compact_packed_impl(const ragged_layout& layout, index_t n_plans, Get&& get,
                            matrix_view<T> inout, std::span<index_t> cu_out) {
  const index_t B = layout.count();
  SPARSEVLM_CHECK(n_plans == B, errc::shape_mismatch, "plans.size()",
                  concat(B, " (sequences in the layout)"), n_plans);
  SPARSEVLM_CHECK(static_cast<index_t>(cu_out.size()) == B + 1, errc::shape_mismatch,
                  "cu_out.size()", concat(B + 1, " (B + 1)"), cu_out.size());
  SPARSEVLM_CHECK(inout.extent(0) == layout.rows(), errc::shape_mismatch, "inout.extent[0]",
                  concat(layout.rows(), " (layout rows)"), inout.extent(0));
  const index_t w = inout.extent(1);
  for (index_t b = 0; b < B; ++b) {
    const auto [seq, rec] = get(b);
    if (!seq) continue;
    const index_t L = layout.length(b);
    const index_t c = static_cast<index_t>(rec->clusters.size());
    const std::string at = concat("plans[", b, "].");
    SPARSEVLM_CHECK(static_cast<index_t>(seq->size()) <= L, errc::shape_mismatch,
                    at + "sequence.size()", concat("<= ", L, " (layout.length(", b, "))"),
                    seq->size());
    if (c > 0)
      SPARSEVLM_CHECK(rec->dim == w && rec->merged.size() == static_cast<std::size_t>(c * w),
                      errc::shape_mismatch, at + "recycled",
                      concat(c, " merged rows of width ", w, " (inout.extent[1])"),
                      concat(rec->merged.size(), " values of width ", rec->dim));
    for (std::size_t i = 0; i < seq->size(); ++i) {
      const index_t p = (*seq)[i];
      SPARSEVLM_CHECK(p < L && p >= -c && (p < 0 || p >= static_cast<index_t>(i)),
                      errc::invalid_argument, concat(at, "sequence[", i, "]"),
                      concat("a row in [", i, ", ", L, ") or a recycled index in [-", c, ", -1]"),
                      p);
    }
  }
  // Rows only move toward the front: sequence b's output starts at or before
  // its input (earlier sequences shrank), and within it source p >= i.
  index_t out = 0;
  cu_out[0] = 0;
  for (index_t b = 0; b < B; ++b) {
    const auto [seq, rec] = get(b);
    const index_t in0 = layout.offset(b);
    const index_t n = seq ? static_cast<index_t>(seq->size()) : layout.length(b);
    if (w > 0) {
      const index_t c = seq ? static_cast<index_t>(rec->clusters.size()) : 0;
      const matrix_view<const float> merged(c > 0 ? rec->merged.data() : nullptr, {c, w},
                                            "merged");
      for (index_t i = 0; i < n; ++i) {
        const index_t p = seq ? (*seq)[static_cast<std::size_t>(i)] : i;
        if (p >= 0) {
          if (out + i != in0 + p) copy_row(inout, out + i, &inout(in0 + p, 0), inout.stride(1), w);
        } else {
          write_recycled(inout, out + i, merged, -p - 1);
        }
      }
    }
    out += n;
    cu_out[static_cast<std::size_t>(b + 1)] = out;
  }
  return out;
}

}  // namespace detail

/// Compacts a per-token array of B ragged sequences ([layout.rows(), w]: hidden
/// states, or any per-token rows) in place after prune_batch, and packs it:
/// sequence b's rows become results[b].sequence applied to them (recycled rows
/// from results[b].recycled.merged, converted to T), starting at row cu_out[b].
/// Writes cu_out (B + 1 entries, the new varlen offsets); returns cu_out[B].
/// Rows from cu_out[B] on are left as they were. A padded engine can instead
/// compact each slot with apply_plan_inplace and keep its padding.
/// - Cost: O(total new rows · w) copies; no allocation.
/// - Errors (inout untouched): shape_mismatch for counts and widths,
///   invalid_argument for a sequence entry outside its sequence.
template <class T>
index_t compact_packed(const ragged_layout& layout, std::span<const step_result> results,
                       matrix_view<T> inout, std::span<index_t> cu_out) {
  return detail::compact_packed_impl(
      layout, static_cast<index_t>(results.size()),
      [&](index_t b) {
        const step_result& r = results[static_cast<std::size_t>(b)];
        return std::pair{&r.sequence, &r.recycled};
      },
      inout, cu_out);
}

/// As above after prune_sessions: a session without a plan (nullopt) keeps its
/// rows, moved to its new offset.
template <class T>
index_t compact_packed(const ragged_layout& layout,
                       std::span<const std::optional<layer_plan>> plans, matrix_view<T> inout,
                       std::span<index_t> cu_out) {
  return detail::compact_packed_impl(
      layout, static_cast<index_t>(plans.size()),
      [&](index_t b) {
        const std::optional<layer_plan>& p = plans[static_cast<std::size_t>(b)];
        return p ? std::pair{&p->step.sequence, &p->step.recycled}
                 : std::pair<const std::vector<index_t>*, const recycle_result*>{nullptr, nullptr};
      },
      inout, cu_out);
}

}  // namespace sparsevlm
