// xsimd kernels, templated on the xsimd architecture. Included by the per-ISA
// translation units (cpu/instantiate.hpp), which are compiled with the matching
// -m flags; see kernel_table.hpp for the arithmetic every path shares.
//
// Everything here is a template on Arch, so two translation units compiled for
// different instruction sets never define the same symbol differently.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <xsimd/xsimd.hpp>

#include "kernel_table.hpp"

namespace sparsevlm::cpu::detail::simd {

using i64 = std::int64_t;

/// What xsimd 8.1 does not provide: float16 / bfloat16 bits to float32 and
/// float32 widened to float64 (one register's worth), and a fused multiply-add
/// on AVX-512 (xsimd 8.1 falls back to a·b + c there, rounded twice).
template <class Arch>
struct loads;

#if defined(__AVX512F__) && defined(__AVX512BW__)
template <>
struct loads<xsimd::avx512bw> {
  using F = xsimd::batch<float, xsimd::avx512bw>;
  using D = xsimd::batch<double, xsimd::avx512bw>;
  static F f16(const std::uint16_t* p) noexcept {
    return F(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
  }
  static F bf16(const std::uint16_t* p) noexcept {
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return F(_mm512_castsi512_ps(_mm512_slli_epi32(w, 16)));
  }
  static D widen(const float* p) noexcept { return D(_mm512_cvtps_pd(_mm256_loadu_ps(p))); }
  static F fma(F a, F b, F c) noexcept { return F(_mm512_fmadd_ps(a, b, c)); }
  static D fma(D a, D b, D c) noexcept { return D(_mm512_fmadd_pd(a, b, c)); }
  static D round(D x) noexcept {
    return D(_mm512_roundscale_pd(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  /// p·2^k correctly rounded (k integral), as std::ldexp.
  static D ldexp(D p, D k) noexcept { return D(_mm512_scalef_pd(p, k)); }
};
#endif

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
template <>
struct loads<xsimd::fma3<xsimd::avx2>> {
  using F = xsimd::batch<float, xsimd::fma3<xsimd::avx2>>;
  using D = xsimd::batch<double, xsimd::fma3<xsimd::avx2>>;
  static F f16(const std::uint16_t* p) noexcept {
    return F(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  static F bf16(const std::uint16_t* p) noexcept {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return F(_mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
  }
  static D widen(const float* p) noexcept { return D(_mm256_cvtps_pd(_mm_loadu_ps(p))); }
  static F fma(F a, F b, F c) noexcept { return F(_mm256_fmadd_ps(a, b, c)); }
  static D fma(D a, D b, D c) noexcept { return D(_mm256_fmadd_pd(a, b, c)); }
  static D round(D x) noexcept {
    return D(_mm256_round_pd(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  /// p·2^k correctly rounded (k integral, |k| <= 1100), as std::ldexp: p·2^h
  /// is exact for h = floor(k/2), so the one rounding is the last product's.
  static D ldexp(D p, D k) noexcept {
    const __m256d h = _mm256_floor_pd(_mm256_mul_pd(k, _mm256_set1_pd(0.5)));
    const __m256d k2 = _mm256_sub_pd(k, h);
    return D(_mm256_mul_pd(_mm256_mul_pd(p, pow2(h)), pow2(k2)));
  }

 private:
  /// 2^h for integral h in [-1022, 1023], built in the exponent field.
  static __m256d pow2(__m256d h) noexcept {
    const __m256d magic = _mm256_set1_pd(0x1.8p52);
    __m256i i = _mm256_castpd_si256(_mm256_add_pd(h, magic));
    i = _mm256_sub_epi64(i, _mm256_castpd_si256(magic));
    i = _mm256_slli_epi64(_mm256_add_epi64(i, _mm256_set1_epi64x(1023)), 52);
    return _mm256_castsi256_pd(i);
  }
};
#endif

/// The 16 float sums of one dot product combined pairwise (kernel_table.hpp).
template <class Arch>
inline float reduce16(const float* s) noexcept {
  float h[8];
  for (int l = 0; l < 8; ++l) h[l] = s[l] + s[l + 8];
  for (int l = 0; l < 4; ++l) h[l] = h[l] + h[l + 4];
  for (int l = 0; l < 2; ++l) h[l] = h[l] + h[l + 2];
  return h[0] + h[1];
}

template <class Arch>
inline double reduce8(const double* s) noexcept {
  double h[4];
  for (int l = 0; l < 4; ++l) h[l] = s[l] + s[l + 4];
  for (int l = 0; l < 2; ++l) h[l] = h[l] + h[l + 2];
  return h[0] + h[1];
}

/// An MA×MB tile of float32 dot products over depth [0, kl) of the given row
/// pointers, continuing the 16-lane partial sums held in `part` (row i, column
/// t at part + (i·ldp + t)·16). Depth kl is a multiple of 16 except in the
/// last block, whose partial chunk is zero-padded (kernel_table.hpp).
template <class Arch, int MA, int MB>
inline void dot_tile(const float* a, i64 lda, const float* b, i64 ldb, i64 kl, float* part,
                     i64 ldp) noexcept {
  using F = xsimd::batch<float, Arch>;
  constexpr int W = static_cast<int>(F::size);
  constexpr int V = 16 / W;
  static_assert(V * W == 16, "16 lanes per dot product");
  F acc[MA][MB][V];
  for (int i = 0; i < MA; ++i)
    for (int t = 0; t < MB; ++t)
      for (int v = 0; v < V; ++v) acc[i][t][v] = F::load_aligned(part + (i * ldp + t) * 16 + v * W);
  const auto step = [&](const float* const* pa, const float* const* pb, i64 k) {
    for (int v = 0; v < V; ++v) {
      F bv[MB];
      for (int t = 0; t < MB; ++t) bv[t] = F::load_unaligned(pb[t] + k + v * W);
      for (int i = 0; i < MA; ++i) {
        const F av = F::load_unaligned(pa[i] + k + v * W);
        for (int t = 0; t < MB; ++t) acc[i][t][v] = loads<Arch>::fma(av, bv[t], acc[i][t][v]);
      }
    }
  };
  const float* ra[MA];
  const float* rb[MB];
  for (int i = 0; i < MA; ++i) ra[i] = a + i * lda;
  for (int t = 0; t < MB; ++t) rb[t] = b + t * ldb;
  i64 k = 0;
  for (; k + 16 <= kl; k += 16) step(ra, rb, k);
  if (k < kl) {  // the zero-padded last chunk
    alignas(64) float pa[MA][16] = {};
    alignas(64) float pb[MB][16] = {};
    const std::size_t rem = static_cast<std::size_t>(kl - k) * sizeof(float);
    const float* qa[MA];
    const float* qb[MB];
    for (int i = 0; i < MA; ++i) {
      std::memcpy(pa[i], ra[i] + k, rem);
      qa[i] = pa[i];
    }
    for (int t = 0; t < MB; ++t) {
      std::memcpy(pb[t], rb[t] + k, rem);
      qb[t] = pb[t];
    }
    step(qa, qb, 0);
  }
  for (int i = 0; i < MA; ++i)
    for (int t = 0; t < MB; ++t)
      for (int v = 0; v < V; ++v) acc[i][t][v].store_aligned(part + (i * ldp + t) * 16 + v * W);
}

/// Tile sizes: as many accumulators as the register file holds with room for
/// the loads (32 registers on AVX-512, 16 on AVX2), and the cache blocks.
template <class Arch>
struct tiles {
  static constexpr bool wide = xsimd::batch<float, Arch>::size == 16;
  static constexpr int dot_a = wide ? 6 : 3;  // rows of a per register tile
  static constexpr int dot_b = wide ? 4 : 2;  // rows of b per register tile
  static constexpr int gram_i = wide ? 6 : 3;  // rows i per register tile
  static constexpr int gram_j = wide ? 4 : 2;  // rows j per register tile
  /// Depth block: the a tile's block stays in L1 while b's rows stream past.
  static constexpr i64 depth_block = 256;
  /// b rows per pass: the partial sums of an a tile against them stay in L1.
  static constexpr i64 b_block = 64;
  /// Rows j per pass of the Gram kernel (its partial sums stay in L1).
  static constexpr i64 gram_block = 48;
};

/// One a tile (MA rows) against b rows [0, nb), nb <= b_block, all depths.
template <class Arch, int MA>
inline void dot_panel(const float* a, i64 lda, const float* b, i64 ldb, i64 nb, i64 d, float* out,
                      i64 ldo) noexcept {
  constexpr int MB = tiles<Arch>::dot_b;
  constexpr i64 KC = tiles<Arch>::depth_block, NB = tiles<Arch>::b_block;
  alignas(64) float part[MA * NB * 16];
  for (i64 x = 0; x < MA * nb * 16; ++x) part[x] = 0.0f;
  for (i64 k0 = 0; k0 < d; k0 += KC) {
    const i64 kl = d - k0 < KC ? d - k0 : KC;
    i64 t = 0;
    for (; t + MB <= nb; t += MB)
      dot_tile<Arch, MA, MB>(a + k0, lda, b + t * ldb + k0, ldb, kl, part + t * 16, nb);
    for (; t < nb; ++t) dot_tile<Arch, MA, 1>(a + k0, lda, b + t * ldb + k0, ldb, kl, part + t * 16, nb);
  }
  for (int i = 0; i < MA; ++i)
    for (i64 t = 0; t < nb; ++t) out[i * ldo + t] = reduce16<Arch>(part + (i * nb + t) * 16);
}

template <class Arch>
void dot_rows(const float* a, i64 lda, i64 na, const float* b, i64 ldb, i64 nb, i64 d, float* out,
              i64 ldo) noexcept {
  constexpr int MA = tiles<Arch>::dot_a;
  constexpr i64 NB = tiles<Arch>::b_block;
  for (i64 t0 = 0; t0 < nb; t0 += NB) {
    const i64 nbc = nb - t0 < NB ? nb - t0 : NB;
    i64 i = 0;
    for (; i + MA <= na; i += MA)
      dot_panel<Arch, MA>(a + i * lda, lda, b + t0 * ldb, ldb, nbc, d, out + i * ldo + t0, ldo);
    for (; i < na; ++i)
      dot_panel<Arch, 1>(a + i * lda, lda, b + t0 * ldb, ldb, nbc, d, out + i * ldo + t0, ldo);
  }
}

/// An MI×MJ tile of float64 dot products over depth [0, kl): rows i come
/// widened and zero-padded to a multiple of 8 in `xi` (packed once per depth
/// block, reused by every tile of the panel), rows j as float32 (widened in
/// registers), continuing the 8-lane partial sums in `part` (row i, column t at
/// part + (i·ldp + t)·8).
template <class Arch, int MI, int MJ>
inline void gram_tile(const double* xi, i64 ldi, const float* xj, i64 ldj, i64 kl, double* part,
                      i64 ldp) noexcept {
  using D = xsimd::batch<double, Arch>;
  constexpr int W = static_cast<int>(D::size);
  constexpr int V = 8 / W;
  static_assert(V * W == 8, "8 lanes per dot product");
  D acc[MI][MJ][V];
  for (int i = 0; i < MI; ++i)
    for (int j = 0; j < MJ; ++j)
      for (int v = 0; v < V; ++v) acc[i][j][v] = D::load_aligned(part + (i * ldp + j) * 8 + v * W);
  const auto step = [&](const float* const* pj, i64 k, i64 kj) {
    for (int v = 0; v < V; ++v) {
      D bj[MJ];
      for (int j = 0; j < MJ; ++j) bj[j] = loads<Arch>::widen(pj[j] + kj + v * W);
      for (int i = 0; i < MI; ++i) {
        const D ai = D::load_aligned(xi + i * ldi + k + v * W);
        for (int j = 0; j < MJ; ++j) acc[i][j][v] = loads<Arch>::fma(ai, bj[j], acc[i][j][v]);
      }
    }
  };
  const float* rj[MJ];
  for (int j = 0; j < MJ; ++j) rj[j] = xj + j * ldj;
  i64 k = 0;
  for (; k + 8 <= kl; k += 8) step(rj, k, k);
  if (k < kl) {  // the zero-padded last chunk
    alignas(64) float pj[MJ][8] = {};
    const float* qj[MJ];
    for (int j = 0; j < MJ; ++j) {
      std::memcpy(pj[j], rj[j] + k, static_cast<std::size_t>(kl - k) * sizeof(float));
      qj[j] = pj[j];
    }
    step(qj, k, 0);
  }
  for (int i = 0; i < MI; ++i)
    for (int j = 0; j < MJ; ++j)
      for (int v = 0; v < V; ++v) acc[i][j][v].store_aligned(part + (i * ldp + j) * 8 + v * W);
}

/// Rows [i0, i0 + MI) against rows [j0, j0 + nj), nj <= gram_block, all depths;
/// writes g[i][j] for j >= i.
template <class Arch, int MI>
inline void gram_panel(const float* x, i64 ldx, i64 i0, i64 j0, i64 nj, i64 n, i64 d,
                       double* g) noexcept {
  constexpr int MJ = tiles<Arch>::gram_j;
  constexpr i64 KC = tiles<Arch>::depth_block, NB = tiles<Arch>::gram_block;
  alignas(64) double part[MI * NB * 8];
  alignas(64) double xi[MI * KC];
  for (i64 q = 0; q < MI * nj * 8; ++q) part[q] = 0.0;
  for (i64 k0 = 0; k0 < d; k0 += KC) {
    const i64 kl = d - k0 < KC ? d - k0 : KC;
    const i64 kp = (kl + 7) / 8 * 8;
    for (int i = 0; i < MI; ++i) {
      const float* src = x + (i0 + i) * ldx + k0;
      for (i64 k = 0; k < kp; ++k) xi[i * KC + k] = k < kl ? static_cast<double>(src[k]) : 0.0;
    }
    i64 t = 0;
    for (; t + MJ <= nj; t += MJ)
      gram_tile<Arch, MI, MJ>(xi, KC, x + (j0 + t) * ldx + k0, ldx, kl, part + t * 8, nj);
    for (; t < nj; ++t)
      gram_tile<Arch, MI, 1>(xi, KC, x + (j0 + t) * ldx + k0, ldx, kl, part + t * 8, nj);
  }
  for (int i = 0; i < MI; ++i)
    for (i64 t = 0; t < nj; ++t)
      if (j0 + t >= i0 + i) g[(i0 + i) * n + (j0 + t)] = reduce8<Arch>(part + (i * nj + t) * 8);
}

template <class Arch>
void gram_f64(const float* x, i64 ldx, i64 n, i64 d, double* g) noexcept {
  constexpr int MI = tiles<Arch>::gram_i;
  constexpr i64 NB = tiles<Arch>::gram_block;
  i64 i = 0;
  for (; i + MI <= n; i += MI)
    for (i64 j0 = i; j0 < n; j0 += NB)
      gram_panel<Arch, MI>(x, ldx, i, j0, n - j0 < NB ? n - j0 : NB, n, d, g);
  for (; i < n; ++i)
    for (i64 j0 = i; j0 < n; j0 += NB)
      gram_panel<Arch, 1>(x, ldx, i, j0, n - j0 < NB ? n - j0 : NB, n, d, g);
  for (i64 r = 0; r < n; ++r)
    for (i64 c = 0; c < r; ++c) g[r * n + c] = g[c * n + r];
}

/// acc[j] += f(src[j]) with a register-wide load `ld`; the tail goes through a
/// zero-padded buffer so it uses the same conversion as the body.
template <class Arch, class S, class Load>
inline void add_row(float* acc, const S* src, i64 n, Load ld) noexcept {
  using F = xsimd::batch<float, Arch>;
  constexpr i64 W = static_cast<i64>(F::size);
  i64 j = 0;
  for (; j + W <= n; j += W) (F::load_unaligned(acc + j) + ld(src + j)).store_unaligned(acc + j);
  if (j < n) {
    alignas(64) S ps[W] = {};
    alignas(64) float pf[W];
    std::memcpy(ps, src + j, static_cast<std::size_t>(n - j) * sizeof(S));
    ld(ps).store_aligned(pf);
    for (i64 l = 0; l < n - j; ++l) acc[j + l] += pf[l];
  }
}

template <class Arch, class S, class Load>
inline void cvt_row(float* dst, const S* src, i64 n, Load ld) noexcept {
  using F = xsimd::batch<float, Arch>;
  constexpr i64 W = static_cast<i64>(F::size);
  i64 j = 0;
  for (; j + W <= n; j += W) ld(src + j).store_unaligned(dst + j);
  if (j < n) {
    alignas(64) S ps[W] = {};
    alignas(64) float pf[W];
    std::memcpy(ps, src + j, static_cast<std::size_t>(n - j) * sizeof(S));
    ld(ps).store_aligned(pf);
    std::memcpy(dst + j, pf, static_cast<std::size_t>(n - j) * sizeof(float));
  }
}

template <class Arch>
void add_f32(float* acc, const float* src, i64 n) noexcept {
  add_row<Arch>(acc, src, n, [](const float* p) { return xsimd::batch<float, Arch>::load_unaligned(p); });
}
template <class Arch>
void add_f16(float* acc, const std::uint16_t* src, i64 n) noexcept {
  add_row<Arch>(acc, src, n, [](const std::uint16_t* p) { return loads<Arch>::f16(p); });
}
template <class Arch>
void add_bf16(float* acc, const std::uint16_t* src, i64 n) noexcept {
  add_row<Arch>(acc, src, n, [](const std::uint16_t* p) { return loads<Arch>::bf16(p); });
}
template <class Arch>
void cvt_f16(float* dst, const std::uint16_t* src, i64 n) noexcept {
  cvt_row<Arch>(dst, src, n, [](const std::uint16_t* p) { return loads<Arch>::f16(p); });
}
template <class Arch>
void cvt_bf16(float* dst, const std::uint16_t* src, i64 n) noexcept {
  cvt_row<Arch>(dst, src, n, [](const std::uint16_t* p) { return loads<Arch>::bf16(p); });
}

/// exp of kernel_table.hpp on one register.
template <class Arch>
inline xsimd::batch<double, Arch> exp_batch(xsimd::batch<double, Arch> x) noexcept {
  using D = xsimd::batch<double, Arch>;
  using K = exp_constants;
  const D x0 = x;
  const auto nan = xsimd::isnan(x);
  x = xsimd::min(xsimd::max(x, D(K::lo)), D(K::hi));
  const D k = loads<Arch>::round(x * D(K::log2e));
  D r = loads<Arch>::fma(-k, D(K::ln2_hi), x);
  r = loads<Arch>::fma(-k, D(K::ln2_lo), r);
  D p(K::c[0]);
  for (int i = 1; i < 14; ++i) p = loads<Arch>::fma(p, r, D(K::c[i]));
  return xsimd::select(nan, x0, loads<Arch>::ldexp(p, k));
}

template <class Arch>
void exp_f64(double* x, i64 n) noexcept {
  using D = xsimd::batch<double, Arch>;
  constexpr i64 W = static_cast<i64>(D::size);
  i64 j = 0;
  for (; j + W <= n; j += W) exp_batch<Arch>(D::load_unaligned(x + j)).store_unaligned(x + j);
  if (j < n) {
    alignas(64) double buf[W] = {};
    for (i64 l = 0; l < n - j; ++l) buf[l] = x[j + l];
    exp_batch<Arch>(D::load_aligned(buf)).store_aligned(buf);
    for (i64 l = 0; l < n - j; ++l) x[j + l] = buf[l];
  }
}

/// The table of one architecture; `build`: how the unit instantiating it was
/// compiled (cpu/instantiate.hpp passes SPARSEVLM_THIS_UNIT_BUILD).
template <class Arch>
constexpr kernel_table make_table(isa id, unit_build build = {}) noexcept {
  return kernel_table{id,
                      &dot_rows<Arch>,
                      &gram_f64<Arch>,
                      &add_f32<Arch>,
                      &add_f16<Arch>,
                      &add_bf16<Arch>,
                      &cvt_f16<Arch>,
                      &cvt_bf16<Arch>,
                      &exp_f64<Arch>,
                      build};
}

}  // namespace sparsevlm::cpu::detail::simd
