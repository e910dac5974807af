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

namespace detail {

/// The extents a step of a shape can reach, as sizes (where the data decide a
/// size, the worst case: raters R <= text tokens T, recycled rows s <= s_max).
struct scratch_sizes {
  std::size_t L, N, H, de, d, dh, T, R, m, sm, qkL, grav;
  explicit scratch_sizes(const step_shape& s) {
    using z = std::size_t;
    const auto nz = [](index_t v) { return static_cast<z>(v > 0 ? v : 0); };
    L = nz(s.length), N = nz(s.visual), H = nz(s.heads), de = nz(s.embed_dim);
    d = nz(s.hidden_dim), dh = nz(s.head_dim);
    T = L > N ? L - N : 0, R = T, m = std::min(R, N);
    sm = 0;  // s_max = min(N, floor(fraction·N) + 1) recycled rows (0: recycling off)
    if (s.recycle_fraction > 0.0)
      sm = std::min(N, static_cast<z>(s.recycle_fraction * static_cast<double>(N)) + 1);
    qkL = dh > 0 ? L : 0;
    grav = s.gravity ? 1 : 0;
  }
};

// Each stage's scratch, named by the stage that uses it, with needs(): the
// largest size each buffer reaches in a step of a shape. reserve() and
// required_bytes() both run every needs() (workspace::visit_needs), so the size
// query and the allocation cannot disagree. No two stages share a buffer, so no
// stage can overwrite what another still holds; the cost is the sum of the
// stages' scratch rather than its maximum (the raters' converted visual rows,
// N·d_e floats, dominate both at VLM shapes).

/// raters.hpp, select_raters.
struct raters_scratch {
  scratch_vector<float> visual;  ///< the visual embedding rows as float32 [N, d_e] (when converted)
  scratch_vector<float> text;    ///< the text rows as float32 [T, d_e] (when converted)
  scratch_vector<float> logits;  ///< [N, T]
  scratch_vector<double> mean;   ///< m [T]
  scratch_vector<double> exps;   ///< one row's exponentials [T]
  template <class Self, class Fn>
  static void needs(Self& b, const scratch_sizes& s, Fn&& fn) {
    fn(b.visual, s.N * s.de), fn(b.text, s.T * s.de), fn(b.logits, s.N * s.T);
    fn(b.mean, s.T), fn(b.exps, s.T);
  }
};

/// scores.hpp, the scoring driver of both score paths (accumulate_scores).
struct scoring_scratch {
  scratch_vector<float> row;           ///< one head's rater row over the visual columns [N]
  scratch_vector<float> gravity;       ///< the gravity table [R, N] (SparseVLM+)
  scratch_vector<double> head_totals;  ///< [H] (top_heads)
  std::vector<index_t> chosen;         ///< 1 for the heads that are averaged [H]
  std::vector<index_t> head_order;     ///< [H] (top_heads)
  template <class Self, class Fn>
  static void needs(Self& b, const scratch_sizes& s, Fn&& fn) {
    fn(b.row, s.N), fn(b.gravity, s.grav * s.R * s.N), fn(b.head_totals, s.H);
    fn(b.chosen, s.H), fn(b.head_order, s.H);
  }
};

/// scores_qk.hpp, the rows of the q/k path.
struct qk_scratch {
  scratch_vector<float> keys;        ///< one key head, the keys a rater row sees [L, dh]
  scratch_vector<float> query;       ///< one query row [dh]
  scratch_vector<float> logits_f32;  ///< one row of logits [L]
  scratch_vector<double> logits;     ///< the same in double [L]
  template <class Self, class Fn>
  static void needs(Self& b, const scratch_sizes& s, Fn&& fn) {
    fn(b.keys, s.qkL * s.dh), fn(b.query, s.qkL > 0 ? s.dh : 0), fn(b.logits_f32, s.qkL);
    fn(b.logits, s.qkL);
  }
};

/// gravity.hpp, the RoPE gravity table (SparseVLM+).
struct gravity_scratch {
  scratch_vector<double> biases;       ///< one row of biases [L]
  scratch_vector<double> frequencies;  ///< the rotary frequencies [dh / 2]
  scratch_vector<double> distances;    ///< the bias per relative distance [<= 4L + 1]
  template <class Self, class Fn>
  static void needs(Self& b, const scratch_sizes& s, Fn&& fn) {
    fn(b.biases, s.grav * s.L), fn(b.frequencies, s.grav * s.dh);
    fn(b.distances, s.grav * (4 * s.L + 1));
  }
};

/// rank.hpp, numerical_rank.
struct rank_scratch {
  scratch_vector<float> P;       ///< P copied (transposed when R > N) [R·N]
  scratch_vector<double> gram;   ///< the Gram matrix [m, m], m = min(R, N)
  scratch_vector<double> eigen;  ///< the tridiagonal's diagonal and subdiagonal [2m]
  template <class Self, class Fn>
  static void needs(Self& b, const scratch_sizes& s, Fn&& fn) {
    fn(b.P, s.R * s.N), fn(b.gram, s.m * s.m), fn(b.eigen, 2 * s.m);
  }
};

/// keep_set.hpp, select_keep.
struct keep_set_scratch {
  std::vector<index_t> order;  ///< the visual tokens in rank order [N]
  template <class Self, class Fn>
  static void needs(Self& b, const scratch_sizes& s, Fn&& fn) {
    fn(b.order, s.N);
  }
};

/// recycle.hpp, dpc_knn and recycle.
struct recycle_scratch {
  scratch_vector<float> rows;        ///< the selected hidden rows as float32 [s, d]
  scratch_vector<double> gram;       ///< their Gram matrix [s, s]
  scratch_vector<double> distances;  ///< D [s, s]
  scratch_vector<double> density;    ///< rho, gamma and one row of D [3s]
  scratch_vector<double> sums;       ///< one cluster's sum [d]
  std::vector<index_t> seen;         ///< per visual token: selected yet / its row [N]
  std::vector<index_t> centres;      ///< [<= s]
  std::vector<index_t> labels;       ///< each selected row's cluster [s]
  template <class Self, class Fn>
  static void needs(Self& b, const scratch_sizes& s, Fn&& fn) {
    const std::size_t on = s.sm > 0 ? 1 : 0;
    fn(b.rows, s.sm * s.d), fn(b.gram, s.sm * s.sm), fn(b.distances, s.sm * s.sm);
    fn(b.density, 3 * s.sm), fn(b.sums, on * s.d), fn(b.seen, on * s.N);
    fn(b.centres, s.sm), fn(b.labels, s.sm);
  }
};

/// step.hpp and spans.hpp (the compositions): what a step holds across its stages.
struct step_scratch {
  /// The rater rows' relevance, from scoring to the rank: [R, N], or [R, hull]
  /// over several spans, where the hull of the spans (<= L) may hold text.
  scratch_vector<float> P;
  std::vector<index_t> ranked;  ///< the pruned tokens, best first, for recycling [N]
  std::vector<index_t> span_counts;  ///< several spans: each span's clusters [K <= N]
  /// Several spans: one span's clusters, moved on into the step's result (its
  /// lists circulate through workspace::spare_clusters; not counted by bytes()).
  recycle_result span_clusters;
  template <class Self, class Fn>
  static void needs(Self& b, const scratch_sizes& s, Fn&& fn) {
    fn(b.P, std::max<std::size_t>(s.R, 1) * s.L), fn(b.ranked, s.N), fn(b.span_counts, s.N);
  }
};

/// tensor_parallel.hpp, the partial scores of a rank's heads.
struct partial_scratch {
  scratch_vector<float> sums;  ///< the head sums being accumulated [R, N]
  scratch_vector<float> head;  ///< one head's P and scores [R·N + N] (q/k form)
  template <class Self, class Fn>
  static void needs(Self& b, const scratch_sizes& s, Fn&& fn) {
    fn(b.sums, s.R * s.N), fn(b.head, s.R * s.N + s.N);
  }
};

}  // namespace detail

/// Scratch buffers reused across steps. A step grows them to the shape it sees
/// and never shrinks them, so after the first step of a model shape the stages
/// allocate nothing except their results. Not thread-safe: one per thread.
class workspace {
 public:
  /// Bytes currently held (a measure for engines that budget memory).
  [[nodiscard]] std::size_t bytes() const noexcept {
    std::size_t total = 0;
    visit_buffers([&](const auto& v) {
      total += v.capacity() * sizeof(typename std::remove_reference_t<decltype(v)>::value_type);
    });
    return total;
  }

  /// Reserves every buffer for steps up to `shape`, so that no stage allocates
  /// afterwards; with `out`, also the caller's result that prune_step_into will
  /// fill (it swaps `out` with `result`, so both are reserved). After this, a
  /// step of at most `shape` allocates nothing at all.
  /// Uses the same needs() as required_bytes, so the two cannot disagree.
  void reserve(const step_shape& shape, step_result* out = nullptr) {
    visit_needs(*this, shape, [](auto& v, std::size_t n) { v.reserve(std::max(v.capacity(), n)); });
    reserve_result(result, shape);
    if (out) reserve_result(*out, shape);
    // Cluster member lists for this result and the caller's, each large enough
    // for any cluster (up to s_max members): 2·c_max·s_max indices in all.
    const std::size_t c = cluster_bound(shape), members = detail::scratch_sizes(shape).sm;
    spare_clusters.reserve(2 * c);
    while (spare_clusters.size() < 2 * c) spare_clusters.emplace_back();
    for (auto& m : spare_clusters) m.reserve(members);
  }

  /// The scratch bytes a step of `shape` needs at most (the size query an
  /// engine budgets with; the result's own vectors are not included).
  [[nodiscard]] static std::size_t required_bytes(const step_shape& shape) {
    std::size_t total = 0;
    const workspace probe;  // sizes only: nothing is allocated through it
    visit_needs(probe, shape, [&](const auto& v, std::size_t n) {
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

  /// fn(buffer) for every scratch buffer (for budgets, tests and tools).
  template <class Fn>
  void visit_buffers(Fn&& fn) const {
    visit_needs(*this, step_shape{}, [&](const auto& v, std::size_t) { fn(v); });
  }

  // Each stage's scratch (detail:: above), public so that the stage headers need
  // no friendship, not for callers. The float and double buffers are 64-byte
  // aligned (scratch_vector): the SIMD kernels stream through them.
  detail::raters_scratch raters;
  detail::scoring_scratch scoring;
  detail::qk_scratch qk;
  detail::gravity_scratch gravity;
  detail::rank_scratch rank;
  detail::keep_set_scratch keep_set;
  detail::recycle_scratch recycle;
  detail::step_scratch step;
  detail::partial_scratch partial;
  /// prune_step_into builds its result here and swaps it into the caller's
  /// (so the caller's result is untouched on error, and both sets of vectors
  /// keep their capacity for the next step).
  step_result result;
  /// The same for prune_step_spans_into.
  spans_result spans_out;
  /// Cluster member lists not in use (see recycle()).
  std::vector<std::vector<index_t>> spare_clusters;

 private:
  static void reserve_result(step_result& r, const step_shape& s) {
    const std::size_t c = cluster_bound(s);
    const detail::scratch_sizes z(s);
    r.raters.reserve(z.T);
    r.scores.reserve(z.N);
    r.keep.reserve(z.N);
    r.sequence.reserve(z.L);
    r.recycled.merged.reserve(c * z.d);
    r.recycled.clusters.reserve(c);
  }
  /// c_max = floor(s_max / divisor) + 1 clusters, at most s_max.
  static std::size_t cluster_bound(const step_shape& s) {
    const std::size_t rows = detail::scratch_sizes(s).sm;
    if (rows == 0) return 0;
    const double div = s.cluster_divisor > 1.0 ? s.cluster_divisor : 1.0;
    return std::min(rows, static_cast<std::size_t>(static_cast<double>(rows) / div) + 1);
  }

  /// fn(buffer, elements) for every stage's buffers, with the size its needs()
  /// gives for a step of `shape`: the one size table.
  template <class Self, class Fn>
  static void visit_needs(Self& self, const step_shape& shape, Fn&& fn) {
    const detail::scratch_sizes s(shape);
    decltype(self.raters)::needs(self.raters, s, fn);
    decltype(self.scoring)::needs(self.scoring, s, fn);
    decltype(self.qk)::needs(self.qk, s, fn);
    decltype(self.gravity)::needs(self.gravity, s, fn);
    decltype(self.rank)::needs(self.rank, s, fn);
    decltype(self.keep_set)::needs(self.keep_set, s, fn);
    decltype(self.recycle)::needs(self.recycle, s, fn);
    decltype(self.step)::needs(self.step, s, fn);
    decltype(self.partial)::needs(self.partial, s, fn);
  }
};

}  // namespace sparsevlm
