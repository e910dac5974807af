// Stage 4 on the device: the numerical rank of P (rank.hpp), with the CPU's own
// rank arithmetic (core/eigen.hpp). Launched by pipeline.hpp's rank, enqueued by
// cuda/rank.cuh. Conventions: step_kernels.hpp.
#pragma once

#include <cstdint>

#include "../../core/eigen.hpp"
#include "step_kernels.hpp"

namespace sparsevlm::cuda::detail {

/// G = P·Pᵀ (R <= N) or Pᵀ·P (R > N), m = min(R, N), with dot64 over the
/// depth max(R, N); G is m×m row-major, each pair computed once (upper tiles;
/// the diagonal tiles write i <= j and mirror). Grid: (tiles, tiles) for m_max.
template <int Tile>
struct rank_gram {
  const float* P;  ///< [R, N]
  i64 n_visual;
  double* G;
  step_counts* counts;

  template <class Block>
  SPARSEVLM_HD void operator()(const Block& b, void* smem) const {
    const i64 R = counts->raters, N = n_visual;
    const i64 m = R < N ? R : N, depth = R < N ? N : R;
    const i64 i0 = b.bx() * Tile, j0 = b.by() * Tile;
    if (failed(counts) || i0 >= m || j0 >= m || j0 < i0) return;
    const i64 na = m - i0 < Tile ? m - i0 : Tile, nb = m - j0 < Tile ? m - j0 : Tile;
    const float* p = P;
    const bool rows = R <= N;  // the m vectors are rows of P (else its columns)
    const auto load = [p, rows, N](i64 i, i64 k) { return rows ? p[i * N + k] : p[k * N + i]; };
    gram_tile<Tile>(b, static_cast<float*>(smem), i0, j0, na, nb, depth, load, G, m);
  }
};

/// The rank from G by the CPU's own code (core/eigen.hpp's gram_rank:
/// Householder reduction, then Sturm counts for λ_max and for the count of
/// λ > λ_max·(max(R,N)·2^-23)²), all on one block. With `in_shared`, G is
/// copied into shared memory first (smem: rank_shared_bytes(m_max)); else the
/// reduction works on G in place in global memory, with `scratch` (2·m_max
/// doubles) for the tridiagonal, and smem holds only the block's scratch
/// (core::eigen_shared doubles).
struct rank_solve {
  double* G;
  double* scratch;
  i64 n_visual;
  bool in_shared;
  step_counts* counts;

  template <class Block>
  SPARSEVLM_HD void operator()(const Block& b, void* smem) const {
    const i64 R = counts->raters, N = n_visual;
    if (R == 0 || failed(counts)) {
      if (b.rank() == 0) counts->rank = 0;
      return;
    }
    const i64 m = R < N ? R : N, depth = R < N ? N : R;
    double* sh = static_cast<double*>(smem);
    double* a = G;
    double* de = scratch;
    double* bc = sh;
    if (in_shared) {
      a = sh + core::eigen_shared;
      de = a + m * m;
      for (i64 i = b.rank(); i < m * m; i += b.size()) a[i] = G[i];
      b.sync();
    }
    const i64 rank = core::gram_rank(b, a, m, depth, de, de + m, bc);
    if (b.rank() == 0) counts->rank = rank;
  }
};

}  // namespace sparsevlm::cuda::detail
