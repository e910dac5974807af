// Stage 7: recycle part of the pruned tokens by DPC-KNN clustering.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <span>
#include <type_traits>
#include <vector>

#include "check.hpp"
#include "core/math.hpp"
#include "cpu/dispatch.hpp"
#include "types.hpp"
#include "workspace.hpp"

namespace sparsevlm {

/// Validates recycling options: 0 < fraction <= 1, cluster_divisor > 1, finite.
inline void check_recycle_options(const recycle_options& o) {
  SPARSEVLM_CHECK(std::isfinite(o.fraction) && o.fraction > 0.0 && o.fraction <= 1.0,
                  errc::invalid_argument, "recycle.fraction", "in (0, 1]", o.fraction);
  SPARSEVLM_CHECK(std::isfinite(o.cluster_divisor) && o.cluster_divisor > 1.0,
                  errc::invalid_argument, "recycle.cluster_divisor", "a finite number > 1",
                  o.cluster_divisor);
}

/// DPC-KNN clustering of s points from their distance matrix (spec step 7).
///
/// - `D`: s×s row-major (size checked), symmetric, zero diagonal, finite, >= 0
///   (the values are trusted: recycle builds them so).
/// - `c`: clusters, 1 <= c <= s (checked); also the k of the k nearest neighbours.
/// - `centres` receives the c centre indices in descending ρ·δ (ties to the lower
///   index); `label[i]` receives the cluster (0..c-1, in that order) of point i.
///
/// Rules, all exact comparisons through core/math.hpp: ρ_i = exp(−mean of the k
/// smallest D[i][·]²), summed in ascending order so equal multisets give equal ρ;
/// j denser than i by detail::core::denser; δ_i = min D[i][j] over denser j, or max(D) for
/// the densest; a non-centre joins its nearest centre, ties to the earlier centre.
/// Cost: O(s²) plus O(s·k log k). Scratch: s + 2s doubles.
inline void dpc_knn(std::span<const double> D, index_t s, index_t c, std::vector<index_t>& centres,
                    std::vector<index_t>& label, workspace& ws) {
  using detail::concat;
  SPARSEVLM_CHECK(s >= 1, errc::invalid_argument, "s", ">= 1", s);
  SPARSEVLM_CHECK(c >= 1 && c <= s, errc::invalid_argument, "c", concat("in [1, ", s, "]"), c);
  SPARSEVLM_CHECK(static_cast<index_t>(D.size()) == s * s, errc::shape_mismatch, "D.size()",
                  concat(s, " x ", s, " = ", s * s), D.size());
  double* rho = workspace::take(ws.recycle.density, static_cast<std::size_t>(3 * s));
  double* gamma = rho + s;
  double* tmp = rho + 2 * s;
  const index_t k = c;
  double dmax = 0.0;
  for (index_t i = 0; i < s * s; ++i) dmax = std::max(dmax, D[static_cast<std::size_t>(i)]);
  for (index_t i = 0; i < s; ++i) {
    std::copy(D.begin() + i * s, D.begin() + (i + 1) * s, tmp);
    std::nth_element(tmp, tmp + (k - 1), tmp + s);
    std::sort(tmp, tmp + k);
    rho[i] = detail::core::density(tmp, k);
  }
  for (index_t i = 0; i < s; ++i) {
    double delta = dmax;
    for (index_t j = 0; j < s; ++j)
      if (detail::core::denser(rho[j], j, rho[i], i))
        delta = detail::core::nearer(delta, D[static_cast<std::size_t>(i * s + j)]);
    gamma[i] = rho[i] * delta;
  }
  centres.resize(static_cast<std::size_t>(s));
  std::iota(centres.begin(), centres.end(), index_t{0});
  const auto better = [&](index_t a, index_t b) {
    return detail::core::ranks_before(gamma[a], a, gamma[b], b);
  };
  std::partial_sort(centres.begin(), centres.begin() + c, centres.end(), better);
  centres.resize(static_cast<std::size_t>(c));

  label.assign(static_cast<std::size_t>(s), -1);
  for (index_t q = 0; q < c; ++q) label[static_cast<std::size_t>(centres[q])] = q;
  for (index_t i = 0; i < s; ++i) {
    if (label[static_cast<std::size_t>(i)] >= 0) continue;
    label[static_cast<std::size_t>(i)] =
        detail::core::nearest_centre(D.data() + i * s, centres.data(), c);
  }
}

namespace detail {

/// recycle() on a selection known to be valid (the composition's: the top
/// pruned tokens of select_keep, their cluster count from recycled_counts);
/// the selected hidden rows are still checked, since only the data can say
/// whether they are finite.
template <class T>
void recycle_trusted(matrix_view<const T> hidden, visual_span visual,
                     std::span<const index_t> selected, index_t clusters, recycle_result& out,
                     workspace& ws) {
  const index_t d = hidden.extent(1);
  const index_t s = static_cast<index_t>(selected.size());
  for (index_t i = 0; i < s; ++i) {
    const index_t row = visual.start + selected[static_cast<std::size_t>(i)];
    check_finite_rows(hidden, row, row + 1, "hidden");
  }
  // recycle()'s marks become the slots of the selected rows below: N entries.
  if (ws.recycle.seen.size() < static_cast<std::size_t>(visual.len))
    ws.recycle.seen.resize(static_cast<std::size_t>(visual.len));

  // The selected rows as float32, contiguous: the Gram kernel and the means read them.
  float* x = workspace::take(ws.recycle.rows, static_cast<std::size_t>(s * d));
  const cpu::detail::kernel_table& k = cpu::detail::kernels();
  for (index_t i = 0; i < s; ++i) {
    const index_t row = visual.start + selected[static_cast<std::size_t>(i)];
    float* xi = x + i * d;
    if (hidden.stride(1) == 1) {
      if constexpr (std::is_same_v<T, float>) {
        std::memcpy(xi, hidden.row(row), static_cast<std::size_t>(d) * sizeof(float));
      } else if constexpr (std::is_same_v<T, half>) {
        k.cvt_f16(xi, reinterpret_cast<const std::uint16_t*>(hidden.row(row)), d);
      } else {
        k.cvt_bf16(xi, reinterpret_cast<const std::uint16_t*>(hidden.row(row)), d);
      }
    } else {
      for (index_t c = 0; c < d; ++c) xi[c] = to_float(hidden(row, c));
    }
  }
  // ‖x_i − x_j‖² = G_ii + G_jj − 2·G_ij from the Gram matrix G = X·Xᵀ in double
  // (exact products of float32 values, one fixed association for every entry):
  // half the arithmetic of differencing each pair. Duplicate rows give three
  // bit-identical dot products, hence exactly 0; the cancellation error for
  // distinct rows is about 2^-50·(‖x_i‖² + ‖x_j‖²), far inside the spec's
  // 1e-6 decision margin at any realistic hidden-state scale.
  double* G = workspace::take(ws.recycle.gram, static_cast<std::size_t>(s * s));
  k.gram_f64(x, d, s, d, G);
  double* D = workspace::take(ws.recycle.distances, static_cast<std::size_t>(s * s));
  const double sqrt_d = std::sqrt(static_cast<double>(d));
  for (index_t i = 0; i < s; ++i) {
    D[i * s + i] = 0.0;
    for (index_t j = i + 1; j < s; ++j) {
      const double dist = detail::core::gram_distance(G[i * s + i], G[j * s + j], G[i * s + j], sqrt_d);
      D[i * s + j] = dist;
      D[j * s + i] = dist;
    }
  }

  std::vector<index_t>& centres = ws.recycle.centres;
  std::vector<index_t>& label = ws.recycle.labels;
  dpc_knn(std::span<const double>(D, static_cast<std::size_t>(s * s)), s, clusters, centres, label,
          ws);

  // Every check has passed: fill `out` in place, reusing its capacity.
  recycle_result& r = out;
  r.dim = d;
  // Resize the cluster lists through the workspace's spare lists, so that a
  // list and its capacity survive steps with fewer clusters (no allocation
  // once every list has held its largest cluster; workspace::reserve sizes them).
  auto& cl = r.clusters;
  auto& spare = ws.spare_clusters;
  while (static_cast<index_t>(cl.size()) > clusters) {
    spare.push_back(std::move(cl.back()));
    cl.pop_back();
  }
  while (static_cast<index_t>(cl.size()) < clusters) {
    if (spare.empty()) {
      cl.emplace_back();
    } else {
      cl.push_back(std::move(spare.back()));
      spare.pop_back();
    }
  }
  for (auto& members : cl) members.clear();
  for (index_t i = 0; i < s; ++i)
    r.clusters[static_cast<std::size_t>(label[static_cast<std::size_t>(i)])].push_back(
        visual.start + selected[static_cast<std::size_t>(i)]);
  // Where each visual index sits among the selected rows of x.
  std::vector<index_t>& slot = ws.recycle.seen;
  for (index_t i = 0; i < s; ++i) slot[static_cast<std::size_t>(selected[static_cast<std::size_t>(i)])] = i;
  r.merged.assign(static_cast<std::size_t>(clusters * d), 0.0f);
  double* acc = workspace::take(ws.recycle.sums, static_cast<std::size_t>(d));
  for (index_t q = 0; q < clusters; ++q) {
    auto& members = r.clusters[static_cast<std::size_t>(q)];
    std::sort(members.begin(), members.end());
    std::fill(acc, acc + d, 0.0);
    for (index_t pos : members) {  // ascending positions: the sum order is fixed
      const float* xr = x + slot[static_cast<std::size_t>(pos - visual.start)] * d;
      for (index_t c = 0; c < d; ++c) acc[c] += static_cast<double>(xr[c]);
    }
    const double count = static_cast<double>(members.size());
    for (index_t c = 0; c < d; ++c)
      r.merged[static_cast<std::size_t>(q * d + c)] =
          static_cast<float>(acc[c] / count);
  }
}

}  // namespace detail

/// Recycles the selected pruned tokens (spec step 7, after the selection).
///
/// - `hidden`: [L, d] float32/float16/bfloat16, any strides, d >= 1.
/// - `visual`: the visual span; `selected`: s >= 1 relative visual indices in
///   ranked order (descending score, ties to the lower index), as select_keep
///   returns them first in `pruned_out`; distinct.
/// - `clusters`: c, 1 <= c <= s (detail::core::cluster_count gives the spec's value).
/// - `out`: clusters (absolute positions, ascending within a cluster) and merged
///   rows [c, d] float32, the plain mean of each cluster's hidden rows.
///
/// D[i][j] = ‖x_i − x_j‖₂ / sqrt(d) is computed in double from the Gram matrix
/// (cpu::detail::kernel_table::gram_f64, identical on every instruction set), once per
/// pair, so it is exactly symmetric and exactly 0 for duplicate rows.
/// Cost: O(s²·d/2) multiply-adds for D, O(s·d) for the means. Scratch: s·d
/// floats, 2s² + 3s + d doubles, N + 2s indices.
/// Errors: shape_mismatch / invalid_argument for bad extents or indices;
/// non_finite for NaN/Inf in a selected hidden row. `out` is untouched on error;
/// otherwise its vectors are reused (no allocation once they are large enough).
template <class T>
void recycle(matrix_view<const T> hidden, visual_span visual, std::span<const index_t> selected,
             index_t clusters, recycle_result& out, workspace& ws) {
  const index_t L = hidden.extent(0);
  const index_t d = hidden.extent(1);
  const index_t s = static_cast<index_t>(selected.size());
  detail::check_span(visual, L, "hidden.extent[0]");
  SPARSEVLM_CHECK(d >= 1, errc::shape_mismatch, "hidden.extent[1]", ">= 1", d);
  SPARSEVLM_CHECK(s >= 1, errc::invalid_argument, "selected.size()", ">= 1", s);
  SPARSEVLM_CHECK(clusters >= 1 && clusters <= s, errc::invalid_argument, "clusters",
                  detail::concat("in [1, ", s, "]"), clusters);
  std::vector<index_t>& seen = ws.recycle.seen;  // marks the visual indices met so far
  seen.assign(static_cast<std::size_t>(visual.len), 0);
  for (index_t i = 0; i < s; ++i) {
    const index_t v = selected[static_cast<std::size_t>(i)];
    SPARSEVLM_CHECK(v >= 0 && v < visual.len, errc::invalid_argument,
                    detail::concat("selected[", i, "]"),
                    detail::concat("a visual index in [0, ", visual.len, ")"), v);
    SPARSEVLM_CHECK(seen[static_cast<std::size_t>(v)] == 0, errc::invalid_argument,
                    detail::concat("selected[", i, "]"), "distinct indices",
                    detail::concat(v, ", already listed"));
    seen[static_cast<std::size_t>(v)] = 1;
  }
  detail::recycle_trusted(hidden, visual, selected, clusters, out, ws);
}

}  // namespace sparsevlm
