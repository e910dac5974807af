// Stage 7 on the device: DPC-KNN over the recycled hidden rows and the merge of
// each cluster (recycle.hpp). Launched by pipeline.hpp's recycle, enqueued by
// cuda/recycle.cuh. Conventions: step_kernels.hpp.
#pragma once

#include <cmath>
#include <cstdint>

#include "step_kernels.hpp"

namespace sparsevlm::cuda::detail {

/// The Gram matrix of the s recycled hidden rows (selected token i is visual
/// token order[keep + i]), dot64 over d, upper tiles, mirrored; ld = s_max.
/// Flags NaN/Inf in those rows. Grid: (tiles, tiles) for s_max.
///
/// With `G2` (pipeline::gram_lane_split: few tiles), the grid is (tiles,
/// 2·tiles) and each dot product's 8 lanes are shared by two blocks: blocks
/// with by < tiles write the even lanes' half into G, the others the odd
/// lanes' into G2, and the Gram entry is add_rn(G, G2) (core::reduce8_half),
/// the same bits, taken by recycle_diag and recycle_distances. Why: at LLaVA
/// sizes (s = 173) the upper tiles are 66 blocks, half an H100.
template <class TH, int Tile>
struct recycle_gram {
  rows2<TH> hidden;
  i64 first_visual, dim, ld;
  const i64* order;
  double* G;
  double* G2;     ///< null: one block a tile, all lanes
  i64 col_tiles;  ///< ⌈s_max / Tile⌉ (with G2: by % col_tiles is the tile column)
  step_counts* counts;

  template <class Block>
  SPARSEVLM_HD void operator()(const Block& b, void* smem) const {
    const i64 s = counts->recycled;
    const int half = G2 != nullptr && b.by() >= col_tiles ? 1 : 0;
    const i64 i0 = b.bx() * Tile, j0 = (b.by() - half * col_tiles) * Tile;
    if (failed(counts, flag_hidden) || i0 >= s || j0 >= s || j0 < i0) return;
    const i64 na = s - i0 < Tile ? s - i0 : Tile, nb = s - j0 < Tile ? s - j0 : Tile;
    const i64* sel = order + counts->keep;
    const auto h = hidden;
    const i64 S = first_visual;
    i64* flag = &counts->flags[flag_hidden];
    const auto load = [h, sel, S, flag](i64 i, i64 k) {
      const float v = h.at(S + sel[i], k);
      if (!std::isfinite(v)) core::raise_flag(flag);
      return v;
    };
    if (G2 == nullptr) {
      gram_tile<Tile>(b, static_cast<float*>(smem), i0, j0, na, nb, dim, load, G, ld);
    } else {
      gram_tile<Tile, 2>(b, static_cast<float*>(smem), i0, j0, na, nb, dim, load,
                         half == 0 ? G : G2, ld, half);
    }
  }
};

/// Entry (i, j) of the recycled rows' Gram matrix: G's, or add_rn(G, G2) when
/// recycle_gram split the lanes (the last add of reduce8).
SPARSEVLM_HD inline double gram_entry(const double* G, const double* G2, i64 at) {
  return G2 == nullptr ? G[at] : core::add_rn(G[at], G2[at]);
}

/// diag[i] = G[i][i] (gram_entry), saved so that D can replace G in place; D's
/// maximum (recycle_distances') starts at 0. Grid-stride.
struct recycle_diag {
  const double* G;
  const double* G2;  ///< recycle_gram's odd lanes, or null
  i64 ld;
  double* diag;
  std::uint64_t* dmax;
  step_counts* counts;

  template <class Block>
  SPARSEVLM_HD void operator()(const Block& b, void*) const {
    if (failed(counts)) return;
    const i64 s = counts->recycled;
    if (thread_id(b) == 0) *dmax = 0;
    for (i64 i = thread_id(b); i < s; i += thread_count(b)) diag[i] = gram_entry(G, G2, i * ld + i);
  }
};

/// D[i][j] = gram_distance(G_ii, G_jj, G_ij) for i < j (G_ij: gram_entry), mirrored, 0 on the
/// diagonal, written over G (`GD`, ld = s_max): the one thread of pair i < j
/// is the only one that reads G_ij = G_ji, and it reads before it writes. Also
/// D's largest entry (>= 0: dpc_knn starts its max at 0): each block's maximum,
/// then one exact atomic max per block into *dmax (core::max_nonnegative).
/// Grid-stride over s²; smem: size() doubles.
struct recycle_distances {
  double* GD;
  const double* G2;  ///< recycle_gram's odd lanes, or null (gram_entry)
  i64 ld;
  const double* diag;
  double sqrt_d;
  std::uint64_t* dmax;
  step_counts* counts;

  template <class Block>
  SPARSEVLM_HD void operator()(const Block& b, void* smem) const {
    if (failed(counts)) return;
    const i64 s = counts->recycled;
    double mx = 0.0;
    for (i64 e = thread_id(b); e < s * s; e += thread_count(b)) {
      const i64 i = e / s, j = e % s;
      if (i == j) {
        GD[i * ld + i] = 0.0;
      } else if (i < j) {
        const double dist = core::gram_distance(diag[i], diag[j], gram_entry(GD, G2, i * ld + j), sqrt_d);
        GD[i * ld + j] = dist;
        GD[j * ld + i] = dist;
        mx = mx < dist ? dist : mx;
      }
    }
    double* buf = static_cast<double*>(smem);
    buf[b.rank()] = mx;
    b.sync();
    if (b.rank() == 0) {
      double m = 0.0;
      for (i64 t = 0; t < b.size(); ++t) m = m < buf[t] ? buf[t] : m;  // a max: any order
      core::max_nonnegative(dmax, m);
    }
  }
};

/// ρ_i = core::density of the k = c smallest entries of row i of D, found by
/// sorting the row in shared memory (bitonic; smem: pow2_at_least(s_max)
/// doubles). One block per row; grid s_max.
struct recycle_density {
  const double* D;
  i64 ld;
  double* rho;
  step_counts* counts;

  template <class Block>
  SPARSEVLM_HD void operator()(const Block& b, void* smem) const {
    const i64 s = counts->recycled, i = b.bx();
    if (failed(counts) || i >= s) return;
    double* v = static_cast<double*>(smem);
    const i64 n = core::pow2_at_least(s);
    for (i64 j = b.rank(); j < n; j += b.size()) v[j] = j < s ? D[i * ld + j] : INFINITY;
    b.sync();
    bitonic_sort(b, v, n);
    if (b.rank() == 0) rho[i] = core::density(v, counts->clusters);
  }
};

/// δ_i = min D[i][j] over the tokens j denser than i (core::denser), D's max
/// for the densest; γ_i = ρ_i·δ_i. One block per token (grid s_max): its
/// threads take the minimum over a stride of j each, then thread 0 over theirs
/// (a minimum is the same in any order). smem: size() doubles.
struct recycle_gamma {
  const double* D;
  i64 ld;
  const double* rho;
  const std::uint64_t* dmax;
  double* gamma;
  step_counts* counts;

  template <class Block>
  SPARSEVLM_HD void operator()(const Block& b, void* smem) const {
    const i64 s = counts->recycled, i = b.bx();
    if (failed(counts) || i >= s) return;
    const double top = core::double_of_bits(*dmax);
    double delta = top;
    for (i64 j = b.rank(); j < s; j += b.size())
      if (core::denser(rho[j], j, rho[i], i)) delta = core::nearer(delta, D[i * ld + j]);
    double* buf = static_cast<double*>(smem);
    buf[b.rank()] = delta;
    b.sync();
    if (b.rank() == 0) {
      double m = top;
      for (i64 t = 0; t < b.size(); ++t) m = core::nearer(m, buf[t]);
      gamma[i] = core::mul_rn(rho[i], m);
    }
  }
};

/// Each token's position in the order ranks_before on γ; the first c are the
/// centres, centres[q] = the q-th. One thread per token (grid-stride).
struct recycle_centres {
  const double* gamma;
  i64* gpos;
  i64* centres;
  step_counts* counts;

  template <class Block>
  SPARSEVLM_HD void operator()(const Block& b, void*) const {
    if (failed(counts)) return;
    const i64 s = counts->recycled, c = counts->clusters;
    for (i64 i = thread_id(b); i < s; i += thread_count(b)) {
      i64 before = 0;
      for (i64 j = 0; j < s; ++j)
        if (core::ranks_before(gamma[j], j, gamma[i], i)) ++before;
      gpos[i] = before;
      if (before < c) centres[before] = i;
    }
  }
};

/// label[i]: a centre's own cluster, else the nearest centre (strictly nearer
/// replaces, so ties go to the earlier centre). One thread per token.
struct recycle_assign {
  const double* D;
  i64 ld;
  const i64* gpos;
  const i64* centres;
  i64* label;
  step_counts* counts;

  template <class Block>
  SPARSEVLM_HD void operator()(const Block& b, void*) const {
    if (failed(counts)) return;
    const i64 s = counts->recycled, c = counts->clusters;
    for (i64 i = thread_id(b); i < s; i += thread_count(b)) {
      if (gpos[i] < c) {
        label[i] = gpos[i];
        continue;
      }
      label[i] = core::nearest_centre(D + i * ld, centres, c);
    }
  }
};

/// offsets[q] = members before cluster q (c + 1 entries). One block; smem none.
struct recycle_offsets {
  const i64* label;
  i64* offsets;
  step_counts* counts;

  template <class Block>
  SPARSEVLM_HD void operator()(const Block& b, void*) const {
    if (failed(counts)) return;
    const i64 s = counts->recycled, c = counts->clusters;
    for (i64 q = b.rank(); q < c; q += b.size()) {
      i64 n = 0;
      for (i64 i = 0; i < s; ++i) n += label[i] == q ? 1 : 0;
      offsets[q + 1] = n;
    }
    b.sync();
    if (b.rank() == 0) {
      offsets[0] = 0;
      for (i64 q = 0; q < c; ++q) offsets[q + 1] += offsets[q];
    }
  }
};

/// Cluster members as absolute positions, ascending within each cluster
/// (members[offsets[q] ..]). One thread per token (grid-stride).
struct recycle_members {
  const i64* order;
  const i64* label;
  const i64* offsets;
  i64 first_visual;
  i64* members;
  step_counts* counts;

  template <class Block>
  SPARSEVLM_HD void operator()(const Block& b, void*) const {
    if (failed(counts)) return;
    const i64 s = counts->recycled;
    const i64* sel = order + counts->keep;
    for (i64 i = thread_id(b); i < s; i += thread_count(b)) {
      i64 within = 0;
      for (i64 j = 0; j < s; ++j) within += (label[j] == label[i] && sel[j] < sel[i]) ? 1 : 0;
      members[offsets[label[i]] + within] = first_visual + sel[i];
    }
  }
};

/// merged[q][col] = float((Σ over members, ascending positions, of double(x)) /
/// count). One thread per (cluster, column), grid-stride over c_max·d.
template <class TH>
struct recycle_merge {
  rows2<TH> hidden;
  i64 dim, c_max;
  const i64* offsets;
  const i64* members;
  float* merged;  ///< [c_max, d]
  step_counts* counts;

  template <class Block>
  SPARSEVLM_HD void operator()(const Block& b, void*) const {
    if (failed(counts)) return;
    const i64 c = counts->clusters;
    for (i64 e = thread_id(b); e < c * dim; e += thread_count(b)) {
      const i64 q = e / dim, col = e % dim;
      double acc = 0.0;
      for (i64 m = offsets[q]; m < offsets[q + 1]; ++m)
        acc = core::add_rn(acc, static_cast<double>(hidden.at(members[m], col)));
      merged[q * dim + col] =
          static_cast<float>(core::div_rn(acc, static_cast<double>(offsets[q + 1] - offsets[q])));
    }
  }
};

}  // namespace sparsevlm::cuda::detail
