// Reusable scratch memory for a pruning step.
#pragma once

#include <algorithm>
#include <cstddef>
#include <new>
#include <type_traits>
#include <vector>

#include "types.hpp"
#include "view.hpp"

namespace sparsevlm {

/// The largest step a workspace is reserved for (one model shape). Where the
/// data decide a size (raters R <= text tokens, recycled rows s), the worst case
/// is assumed.
struct step_shape {
  index_t length = 0;       ///< L, the longest sequence
  index_t visual = 0;       ///< N
  index_t heads = 0;        ///< H
  index_t embed_dim = 0;    ///< d_e (0 when the caller always gives the raters)
  index_t hidden_dim = 0;   ///< d
  index_t head_dim = 0;     ///< dh of the q/k form (0: attention form only)
  double recycle_fraction = 0.0;  ///< the largest recycling fraction (0: off)
  bool gravity = false;     ///< SparseVLM+'s RoPE correction is used
  double cluster_divisor = 10.0;  ///< the smallest recycling cluster divisor
};

namespace detail {
/// std::allocator with the rows aligned to 64 bytes (a cache line, one AVX-512
/// register). The float and double scratch buffers are what the SIMD kernels
/// stream through; with malloc's 16-byte alignment, where a buffer lands depends
/// on the process's allocation history, and a misaligned one made the same step
/// up to a third slower in one process than in another.
template <class T>
struct line_allocator {
  using value_type = T;
  static constexpr std::align_val_t alignment{64};
  line_allocator() noexcept = default;
  template <class U>
  line_allocator(const line_allocator<U>&) noexcept {}  // NOLINT: rebinding is implicit
  [[nodiscard]] T* allocate(std::size_t n) {
    return static_cast<T*>(::operator new(n * sizeof(T), alignment));
  }
  // The unsized form: Clang before 19 declares no sized deallocation by default.
  void deallocate(T* p, std::size_t) noexcept { ::operator delete(p, alignment); }
  template <class U>
  bool operator==(const line_allocator<U>&) const noexcept {
    return true;
  }
};
}  // namespace detail

/// A scratch vector whose data is 64-byte aligned (detail::line_allocator).
template <class T>
using scratch_vector = std::vector<T, detail::line_allocator<T>>;

/// Scratch buffers reused across steps. A step grows them to the shape it sees
/// and never shrinks them, so after the first step of a model shape the stages
/// allocate nothing except their results. Not thread-safe: one per thread.
class workspace {
 public:
  /// Bytes currently held (a measure for engines that budget memory).
  [[nodiscard]] std::size_t bytes() const noexcept {
    return (f32_a.capacity() + f32_b.capacity() + f32_c.capacity() + f32_d.capacity() +
            f32_e.capacity() + f32_f.capacity()) *
               sizeof(float) +
           (f64_a.capacity() + f64_b.capacity() + f64_c.capacity() + f64_d.capacity() +
            f64_e.capacity()) *
               sizeof(double) +
           (idx_a.capacity() + idx_b.capacity() + idx_c.capacity() + idx_d.capacity() +
            idx_e.capacity()) *
               sizeof(index_t);
  }

  /// Reserves every buffer for steps up to `shape`, so that no stage allocates
  /// afterwards; with `out`, also the caller's result that prune_step_into will
  /// fill (it swaps `out` with `result`, so both are reserved). After this, a
  /// step of at most `shape` allocates nothing at all.
  /// Uses the same table as required_bytes, so the two cannot disagree.
  void reserve(const step_shape& shape, step_result* out = nullptr) {
    visit_needs(shape, [](auto& v, std::size_t n) { v.reserve(std::max(v.capacity(), n)); });
    reserve_result(result, shape);
    if (out) reserve_result(*out, shape);
    // Cluster member lists for this result and the caller's, each large enough
    // for any cluster (up to s_max members): 2·c_max·s_max indices in all.
    const std::size_t c = cluster_bound(shape), members = cluster_rows(shape);
    spare_clusters.reserve(2 * c);
    while (spare_clusters.size() < 2 * c) spare_clusters.emplace_back();
    for (auto& m : spare_clusters) m.reserve(members);
  }

  /// The scratch bytes a step of `shape` needs at most (the size query an
  /// engine budgets with; the result's own vectors are not included).
  [[nodiscard]] static std::size_t required_bytes(const step_shape& shape) {
    std::size_t total = 0;
    visit_sizes(shape, [&](auto& v, std::size_t n) {
      total += n * sizeof(typename std::remove_reference_t<decltype(v)>::value_type);
    });
    return total;
  }

  /// Grows `v` to at least `n` elements and returns its data.
  template <class T, class A>
  static T* take(std::vector<T, A>& v, std::size_t n) {
    if (v.size() < n) v.resize(n);
    return v.data();
  }

  // Stages use these in a fixed way; they are public so that the stage headers
  // need no friendship, not for callers. A buffer is only held across a call to
  // another stage where this table says so (take() may reallocate):
  //   f32_a  raters: visual rows (when converted); prune_step: P (after raters)
  //   f32_b  raters: text rows (when converted);  scores_qk: one key head;
  //          rank: P copied (transposed when R > N);  recycle: the selected rows
  //   f32_c  raters: logits (N·T);  scores_qk: one query row
  //   f32_d  scoring driver: one row of probabilities
  //   f32_e  scoring driver: the gravity table (R·N)
  //   f32_f  scores_qk: one row of logits
  //   f64_a  raters: m;  gravity: one row of biases;  rank: eigenvalues + scratch;
  //          recycle: the Gram matrix
  //   f64_b  raters: exps;  scoring driver: head totals;
  //          dpc_knn: rho, gamma, scratch row
  //   f64_c  rank: Gram matrix;  scores_qk: logits;  recycle: D
  //   f64_d  recycle: cluster sums; gravity: frequencies
  //   f64_e  gravity: distance table
  //   idx_a  select_keep: order          idx_b  prune_step: ranked pruned tokens
  //   idx_c  scoring driver: chosen heads; recycle: seen marks
  //   idx_d  scoring driver: head order; recycle: centres
  //   idx_e  recycle: labels
  // The float and double buffers are 64-byte aligned (scratch_vector): the SIMD
  // kernels stream through them.
  scratch_vector<float> f32_a, f32_b, f32_c, f32_d, f32_e, f32_f;
  scratch_vector<double> f64_a, f64_b, f64_c, f64_d, f64_e;
  std::vector<index_t> idx_a, idx_b, idx_c, idx_d, idx_e;
  /// prune_step_into builds its result here and swaps it into the caller's
  /// (so the caller's result is untouched on error, and both sets of vectors
  /// keep their capacity for the next step).
  step_result result;
  /// Cluster member lists not in use (see recycle()).
  std::vector<std::vector<index_t>> spare_clusters;

 private:
  static void reserve_result(step_result& r, const step_shape& s) {
    const std::size_t c = cluster_bound(s);
    r.raters.reserve(text_bound(s));
    r.scores.reserve(static_cast<std::size_t>(s.visual));
    r.keep.reserve(static_cast<std::size_t>(s.visual));
    r.sequence.reserve(static_cast<std::size_t>(s.length));
    r.recycled.merged.reserve(c * static_cast<std::size_t>(s.hidden_dim));
    r.recycled.clusters.reserve(c);
  }
  static std::size_t text_bound(const step_shape& s) {
    return static_cast<std::size_t>(std::max<index_t>(s.length - s.visual, 0));
  }
  /// s_max = min(N, floor(fraction·N) + 1) recycled rows (0: recycling off).
  static std::size_t cluster_rows(const step_shape& s) {
    if (!(s.recycle_fraction > 0.0)) return 0;
    const auto n = static_cast<std::size_t>(s.visual);
    return std::min(n, static_cast<std::size_t>(s.recycle_fraction * static_cast<double>(n)) + 1);
  }
  /// c_max = floor(s_max / divisor) + 1 clusters, at most s_max.
  static std::size_t cluster_bound(const step_shape& s) {
    const std::size_t rows = cluster_rows(s);
    if (rows == 0) return 0;
    const double div = s.cluster_divisor > 1.0 ? s.cluster_divisor : 1.0;
    return std::min(rows, static_cast<std::size_t>(static_cast<double>(rows) / div) + 1);
  }

  /// fn(buffer, elements) for every buffer, with the largest size any stage
  /// takes it to for a step of `shape` (the table above, as sizes).
  template <class Self, class Fn>
  static void visit_needs_impl(Self* self, const step_shape& s, Fn&& fn) {
    using z = std::size_t;
    const z L = static_cast<z>(s.length), N = static_cast<z>(s.visual), H = static_cast<z>(s.heads);
    const z de = static_cast<z>(s.embed_dim), d = static_cast<z>(s.hidden_dim);
    const z dh = static_cast<z>(s.head_dim);
    const z T = text_bound(s), R = T, m = std::min(R, N), sm = cluster_rows(s);
    const z qkL = dh > 0 ? L : 0, grav = s.gravity ? 1 : 0;
    fn(self->f32_a, std::max(N * de, R * N));
    fn(self->f32_b, std::max({T * de, qkL * dh, R * N, sm * d}));
    fn(self->f32_c, std::max(N * T, dh));
    fn(self->f32_d, N);
    fn(self->f32_e, grav * R * N);
    fn(self->f32_f, qkL);
    fn(self->f64_a, std::max({T, grav * L, 2 * m, sm * sm}));
    fn(self->f64_b, std::max({T, H, 3 * sm}));
    fn(self->f64_c, std::max({m * m, qkL, sm * sm}));
    fn(self->f64_d, std::max(sm > 0 ? d : z{0}, grav * dh));
    fn(self->f64_e, grav * (4 * L + 1));
    fn(self->idx_a, N);
    fn(self->idx_b, N);
    fn(self->idx_c, std::max(H, N));
    fn(self->idx_d, std::max(H, sm));
    fn(self->idx_e, sm);
  }
  template <class Fn>
  void visit_needs(const step_shape& s, Fn&& fn) {
    visit_needs_impl(this, s, fn);
  }
  template <class Fn>
  static void visit_sizes(const step_shape& s, Fn&& fn) {
    workspace probe;  // sizes only: nothing is allocated through it
    visit_needs_impl(&probe, s, fn);
  }
};

}  // namespace sparsevlm
