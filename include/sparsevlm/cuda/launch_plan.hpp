// The launch plan of a device step, computed on the host: which kernels
// prune_step_async enqueues for a shape and options (name, grid, block, dynamic
// shared memory), how many host synchronisations it makes (none) and the
// workspace it needs. Host-compilable (no CUDA header): the CLI prints it
// (`sparsevlm cuda-plan`) and the tests check it against the device limits on a
// machine without a GPU.
//
// It is not a model of the launcher but the launcher's own sequence:
// prune_step_async (step.cuh) and plan_step both run
// detail::pipeline::run_step, the first with the device executor (common.cuh),
// the second with the recording one below, and both executors take their block
// sizes, grids and shared-memory rules from detail::launch_policy.
#pragma once

#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "../check.hpp"
#include "../error.hpp"
#include "../keep_count.hpp"
#include "../recycle.hpp"
#include "../types.hpp"
#include "../workspace.hpp"
#include "detail/pipeline.hpp"

namespace sparsevlm::cuda {

/// One phase of a chained launch: a kernel body and the grid it runs over, as
/// if launched alone (its blocks are that many of the launch's).
struct kernel_phase {
  std::string name;  ///< the kernel body (cuda/detail/*_kernels.hpp), e.g. "rank_gram"
  std::array<std::int64_t, 3> grid{1, 1, 1};
  std::size_t smem_bytes = 0;  ///< what the body needs (the launch takes the largest)
};

/// One kernel launch of a plan. Grids and blocks are [x, y, z].
struct kernel_launch {
  /// The kernel body (cuda/detail/*_kernels.hpp), e.g. "counts_reset"; a chained
  /// launch is named by its phases with blocks, "rank_gram|rank_solve+keep_decide|..."
  /// (a '+' joins a body and the one-block tail in its last block).
  std::string name;
  std::array<std::int64_t, 3> grid{1, 1, 1};
  std::array<std::int64_t, 3> block{1, 1, 1};
  std::size_t smem_bytes = 0;  ///< dynamic shared memory
  std::vector<kernel_phase> phases;  ///< a chained launch's phases with blocks, in order
  std::size_t param_bytes = 0;  ///< the kernel's parameters (the body, copied by value)
};

namespace detail {
/// The kernel parameters a launch may take: 32,764 bytes since CUDA 12.1 on
/// Volta and later (4 KB before), so on nvcc 13's every target.
inline constexpr std::size_t max_param_bytes = 32764;
}  // namespace detail

/// The limits a launch must respect on a device generation.
struct device_limits {
  const char* name = "sm_90";
  std::int64_t max_threads = 1024;          ///< threads per block
  std::int64_t max_grid_x = 2147483647;     ///< 2^31 − 1
  std::int64_t max_grid_yz = 65535;
  std::size_t max_shared_optin = 232448;    ///< opt-in dynamic shared memory per block
  std::size_t max_param_bytes = detail::max_param_bytes;  ///< kernel parameters

  /// A100 (sm_80): 163 KB of opt-in shared memory per block.
  static constexpr device_limits sm80() {
    return {"sm_80", 1024, 2147483647, 65535, 166912, detail::max_param_bytes};
  }
  /// H100 / H200 (sm_90): 227 KB.
  static constexpr device_limits sm90() {
    return {"sm_90", 1024, 2147483647, 65535, 232448, detail::max_param_bytes};
  }
};

/// What a device step launches.
struct launch_plan {
  std::vector<kernel_launch> kernels;  ///< in launch order (empty grids are not launched)
  int host_syncs = 0;                  ///< host synchronisations inside the call
  int copies = 0;                      ///< memory copies enqueued (the pinned length)
  std::size_t workspace_bytes = 0;     ///< step_workspace_bytes of the shape
  std::int64_t recycled_max = 0;       ///< recycled rows the kernels are launched for (s_max)
  std::int64_t clusters_max = 0;       ///< clusters (c_max)

  /// The first launch outside `lim` as "name: what", or "" when all fit.
  [[nodiscard]] std::string violation(const device_limits& lim) const {
    for (const kernel_launch& k : kernels) {
      const auto bad = [&](const char* what, std::int64_t got, std::int64_t max) {
        return sparsevlm::detail::concat(k.name, ": ", what, " ", got, " > ", max, " (", lim.name,
                                         ")");
      };
      const std::int64_t threads = k.block[0] * k.block[1] * k.block[2];
      if (threads > lim.max_threads) return bad("threads", threads, lim.max_threads);
      if (k.grid[0] > lim.max_grid_x) return bad("grid x", k.grid[0], lim.max_grid_x);
      if (k.grid[1] > lim.max_grid_yz) return bad("grid y", k.grid[1], lim.max_grid_yz);
      if (k.grid[2] > lim.max_grid_yz) return bad("grid z", k.grid[2], lim.max_grid_yz);
      if (k.smem_bytes > lim.max_shared_optin)
        return bad("shared bytes", static_cast<std::int64_t>(k.smem_bytes),
                   static_cast<std::int64_t>(lim.max_shared_optin));
      if (k.param_bytes > lim.max_param_bytes)
        return bad("parameter bytes", static_cast<std::int64_t>(k.param_bytes),
                   static_cast<std::int64_t>(lim.max_param_bytes));
    }
    return {};
  }
};

namespace detail {
/// chained_launches()' setting: 1 chained (the default), 0 one launch per kernel.
inline std::atomic<int> chained_setting{1};
}  // namespace detail

/// Whether a step's kernels run as chained launches (docs/cuda.md, "Chained
/// launches": 3 launches a step, the default) or one launch per kernel (17 from
/// the attention), process-wide. The bits are the same either way; the second
/// form is for measuring what chaining gains on a given GPU and as a fallback.
/// Read when a launcher (or plan_step) runs; set it before launching, not while
/// another thread launches.
inline void set_chained_launches(bool on) noexcept {
  detail::chained_setting.store(on ? 1 : 0, std::memory_order_relaxed);
}
[[nodiscard]] inline bool chained_launches() noexcept {
  return detail::chained_setting.load(std::memory_order_relaxed) != 0;
}

namespace detail {

/// The device executor's launch rules, shared with the recording executor.
struct launch_policy {
  static constexpr int tile = 32;                   ///< 32×32 dot tiles: 256 threads
  static constexpr int small_tile = 16;             ///< 16×16 dot tiles: 64 threads
  /// Fewer 32×32 tiles than this (about an H100's 132 SMs) take 16×16 ones.
  static constexpr std::int64_t wide_blocks = 128;
  static constexpr int block_threads = 256;         ///< element-wise and per-token kernels
  static constexpr std::int64_t max_grid = 8192;    ///< grid-stride loops: enough blocks for any GPU
  static constexpr std::size_t default_shared = 48 * 1024;  ///< without the opt-in attribute
  static_assert(tile_threads<tile> <= block_threads,
                "a chained launch runs the dot tiles at the block size of its other phases");

  [[nodiscard]] int threads() const noexcept { return block_threads; }
  /// Whether a stage's phases run as one chained launch (chained_launches()).
  [[nodiscard]] static bool chained() noexcept { return chained_launches(); }
  [[nodiscard]] std::int64_t wide_grid() const noexcept { return wide_blocks; }
  [[nodiscard]] std::int64_t grid(std::int64_t n) const noexcept {
    if (n <= 0) return 0;
    const std::int64_t g = core::ceil_div(n, block_threads);
    return g < max_grid ? g : max_grid;
  }
  /// Whether a launch fits the one-dimensional blocks and the grids a device takes.
  [[nodiscard]] static bool fits(std::int64_t gx, std::int64_t gy, int nthreads, std::size_t smem,
                                 std::size_t smem_limit) noexcept {
    return gx <= 2147483647 && gy <= 65535 && nthreads >= 1 && nthreads <= 1024 &&
           smem <= smem_limit;
  }
};

/// The launches' own names (kernel_name without the fused forms).
template <class Body>
std::string body_name() {
#if defined(__GNUC__) || defined(__clang__)
  const std::string_view f = __PRETTY_FUNCTION__;  // "... [with Body = ns::name<T, 32>; ...]"
  const std::size_t at = f.find("Body = ");
  if (at == std::string_view::npos) return "kernel";
  std::string_view t = f.substr(at + 7);
  t = t.substr(0, t.find_first_of(";]<"));
  const std::size_t colon = t.rfind("::");
  return std::string(colon == std::string_view::npos ? t : t.substr(colon + 2));
#else
  return "kernel";
#endif
}

/// The kernel body's name without namespaces or template arguments, from the
/// compiler's function signature ("rank_solve", "recycle_gram").
/// A fused launch (in_order, with_tail) is named by its bodies, "keep_ranks+keep_list".
template <class Body>
std::string kernel_name() {
  if constexpr (requires { typename Body::named_type; }) {
    return kernel_name<typename Body::named_type>();
  } else if constexpr (requires {
                  typename Body::first_type;
                  typename Body::then_type;
                }) {
    return kernel_name<typename Body::first_type>() + "+" +
           kernel_name<typename Body::then_type>();
  } else {
    return body_name<Body>();
  }
}

/// pipeline's executor that records each launch instead of enqueueing it.
struct plan_exec : launch_policy {
  std::vector<kernel_launch>* out = nullptr;
  std::size_t smem_limit = default_shared;
  [[nodiscard]] std::size_t max_shared() const noexcept { return smem_limit; }
  template <class Body>
  void launch(const Body& body, std::int64_t gx, std::int64_t gy, int nthreads, std::size_t smem) {
    if (gx <= 0 || gy <= 0) return;  // as the device executor: nothing to run
    kernel_launch k{kernel_name<Body>(), {gx, gy, 1}, {nthreads, 1, 1}, smem, {}, sizeof(Body)};
    if constexpr (requires { body.list; }) {  // a chain: its phases with blocks
      k.name.clear();
      body.list.each([&](const auto& ph) {
        if (ph.blocks() == 0) return;
        using P = typename std::remove_cvref_t<decltype(ph.body)>;
        k.phases.push_back(kernel_phase{kernel_name<P>(), {ph.gx, ph.gy, 1}, ph.smem});
        k.name += (k.name.empty() ? "" : "|") + k.phases.back().name;
      });
    }
    out->push_back(std::move(k));
  }
};

/// The step's bounds from a workspace shape (what the workspace is sized for).
/// Errors: sparsevlm::error for a shape the backend cannot run.
inline pipeline::bounds bounds_of(const step_shape& s) {
  using sparsevlm::detail::concat;
  SPARSEVLM_CHECK(s.length >= 0 && s.visual >= 1 && s.visual <= s.length, errc::shape_mismatch,
                  "shape.visual", concat("in [1, ", s.length, "] (shape.length)"), s.visual);
  SPARSEVLM_CHECK(s.heads >= 0 && s.embed_dim >= 0 && s.hidden_dim >= 1 && s.head_dim >= 0,
                  errc::shape_mismatch, "shape", "heads, embed_dim, head_dim >= 0 and hidden_dim >= 1",
                  concat("heads ", s.heads, ", embed_dim ", s.embed_dim, ", hidden_dim ",
                         s.hidden_dim, ", head_dim ", s.head_dim));
  SPARSEVLM_CHECK(!s.gravity, errc::invalid_argument, "shape.gravity",
                  "false (the CUDA backend has no RoPE gravity correction)", "true");
  return pipeline::make_bounds(s.length, s.visual, s.heads, s.embed_dim, s.hidden_dim,
                               s.head_dim > 0, s.recycle_fraction, s.cluster_divisor);
}

/// The limits of the one-block kernels against a device's shared memory
/// (docs/cuda.md). Errors: sparsevlm::error.
inline void check_limits(const pipeline::bounds& b, std::size_t smem_limit) {
  SPARSEVLM_CHECK(pipeline::density_shared_bytes(b.s_max) <= smem_limit, errc::invalid_argument,
                  "recycled rows (s_max)",
                  sparsevlm::detail::concat("at most ", smem_limit / sizeof(double),
                                            " after rounding up to a power of two (one row of D in "
                                            "shared memory)"),
                  b.s_max);
}

/// The keep-count and recycling options as the kernels take them, checked
/// against the workspace's bounds for a span of N tokens.
/// Errors: sparsevlm::error for a bad policy or recycling options, or a
/// recycling fraction / divisor beyond the workspace's shape.
inline pipeline::decide_args decide_args_of(const step_options& opt, const pipeline::bounds& b,
                                            index_t N) {
  check_policy(opt.policy);
  pipeline::decide_args a;
  a.fixed = opt.policy.kind == keep_policy::kind_t::fixed;
  a.scale = opt.policy.scale;
  a.bias = opt.policy.bias;
  a.fixed_keep = opt.policy.keep;
  a.recycle = opt.recycle.enabled;
  if (a.recycle) {
    check_recycle_options(opt.recycle);
    const index_t s = core::recycle_count(N, opt.recycle.fraction);
    const index_t c = core::cluster_count(s, opt.recycle.cluster_divisor);
    SPARSEVLM_CHECK(s <= b.s_max && c <= b.c_max, errc::invalid_argument, "recycle options",
                    sparsevlm::detail::concat("at most ", b.s_max, " rows in ", b.c_max,
                                              " clusters (the workspace's shape)"),
                    sparsevlm::detail::concat(s, " rows in ", c, " clusters"));
    a.fraction = opt.recycle.fraction;
    a.divisor = opt.recycle.cluster_divisor;
  }
  return a;
}

}  // namespace detail

/// Bytes of device workspace a step of at most `shape` needs: the size query
/// of the two-phase protocol (the same routine lays the buffers out, so the
/// two cannot disagree). A workspace of this size serves any step whose
/// extents and options stay within `shape`. shape.head_dim > 0 reserves the
/// q/k path's buffers (H·T·L floats of logits, T = L − N).
/// Errors: sparsevlm::error for a shape the backend cannot run.
inline std::size_t step_workspace_bytes(const step_shape& shape) {
  detail::pipeline::buffers unused;
  return detail::pipeline::layout(detail::bounds_of(shape), nullptr, unused);
}

/// How a step's raters and scores are given (the input form of prune_step_async).
struct step_form {
  bool given_raters = false;  ///< step_inputs::raters set (else chosen from embeds)
  bool qk = false;            ///< step_inputs_qk (else the attention probabilities)
  bool pinned_length = true;  ///< a pinned slot receives the new length (one copy)
};

/// The launches prune_step_async makes for a step of `length` tokens with the
/// visual span `visual`, in a workspace of `shape`, with `opt`, on a device whose
/// opt-in shared memory per block is `max_shared` bytes. The kernels' grids do
/// not depend on the element types. Cost: O(kernels); no CUDA call.
/// Errors: those prune_step_async raises for the shape, span and options
/// (sparsevlm::error), before anything would be enqueued.
inline launch_plan plan_step(const step_shape& shape, index_t length, visual_span visual,
                             const step_options& opt, step_form form = {},
                             std::size_t max_shared = device_limits::sm90().max_shared_optin) {
  const detail::pipeline::bounds b = detail::bounds_of(shape);
  SPARSEVLM_CHECK(length >= 1 && length <= shape.length, errc::shape_mismatch, "length",
                  sparsevlm::detail::concat("in [1, ", shape.length, "] (shape.length)"), length);
  sparsevlm::detail::check_span(visual, length, "length");
  SPARSEVLM_CHECK(form.given_raters || shape.embed_dim > 0, errc::invalid_argument,
                  "shape.embed_dim", "> 0 to choose raters on the device", 0);
  SPARSEVLM_CHECK(!form.qk || (shape.head_dim > 0 && shape.heads >= 1), errc::invalid_argument,
                  "shape.head_dim", "> 0 with heads >= 1 for the q/k form", shape.head_dim);
  detail::check_limits(b, max_shared);
  launch_plan plan;
  plan.workspace_bytes = step_workspace_bytes(shape);
  detail::plan_exec ex;
  ex.out = &plan.kernels;
  ex.smem_limit = max_shared;
  detail::pipeline::step_args<float, float> a;
  a.embed_dim = form.given_raters ? 0 : shape.embed_dim;
  a.given = form.given_raters;
  a.n_raters = length - visual.end();
  a.hidden_dim = shape.hidden_dim;
  a.length = length;
  a.first_visual = visual.start;
  a.n_visual = visual.len;
  a.decide = detail::decide_args_of(opt, b, visual.len);
  detail::pipeline::buffers buf;  // null: nothing runs
  if (form.qk) {
    detail::pipeline::qk_args<float, float> q;
    q.heads = shape.heads;
    q.kv_heads = shape.heads;
    q.head_dim = shape.head_dim;
    q.length = length;
    q.q_rows = length;
    detail::pipeline::run_step(ex, a, q, b, buf);
  } else {
    detail::pipeline::run_step(ex, a, detail::rows3<float>{}, shape.heads, b, buf);
  }
  plan.copies = form.pinned_length ? 1 : 0;
  plan.recycled_max = b.s_max;
  plan.clusters_max = b.c_max;
  return plan;
}

}  // namespace sparsevlm::cuda
