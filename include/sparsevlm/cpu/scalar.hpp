// The scalar kernels: the reference for the canonical arithmetic of
// kernel_table.hpp, and the path on machines without AVX2.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "../dtype.hpp"
#include "kernel_table.hpp"

namespace sparsevlm::cpu::scalar {

using i64 = std::int64_t;

/// dot32 of kernel_table.hpp: 16 fused partial sums, zero-padded last chunk.
inline float dot32(const float* a, const float* b, i64 d) noexcept {
  float acc[16] = {};
  for (i64 k = 0; k < d; k += 16)
    for (int l = 0; l < 16; ++l) {
      const bool in = k + l < d;
      acc[l] = std::fma(in ? a[k + l] : 0.0f, in ? b[k + l] : 0.0f, acc[l]);
    }
  float h[8];
  for (int l = 0; l < 8; ++l) h[l] = acc[l] + acc[l + 8];
  for (int l = 0; l < 4; ++l) h[l] = h[l] + h[l + 4];
  for (int l = 0; l < 2; ++l) h[l] = h[l] + h[l + 2];
  return h[0] + h[1];
}

/// dot64 of kernel_table.hpp: float32 rows widened, 8 fused partial sums.
inline double dot64(const float* a, const float* b, i64 d) noexcept {
  double acc[8] = {};
  for (i64 k = 0; k < d; k += 8)
    for (int l = 0; l < 8; ++l) {
      const bool in = k + l < d;
      acc[l] = std::fma(in ? static_cast<double>(a[k + l]) : 0.0,
                        in ? static_cast<double>(b[k + l]) : 0.0, acc[l]);
    }
  double h[4];
  for (int l = 0; l < 4; ++l) h[l] = acc[l] + acc[l + 4];
  for (int l = 0; l < 2; ++l) h[l] = h[l] + h[l + 2];
  return h[0] + h[1];
}

inline void dot_rows(const float* a, i64 lda, i64 na, const float* b, i64 ldb, i64 nb, i64 d,
                     float* out, i64 ldo) noexcept {
  for (i64 i = 0; i < na; ++i)
    for (i64 t = 0; t < nb; ++t) out[i * ldo + t] = dot32(a + i * lda, b + t * ldb, d);
}

inline void gram_f64(const float* x, i64 ldx, i64 n, i64 d, double* g) noexcept {
  for (i64 i = 0; i < n; ++i)
    for (i64 j = i; j < n; ++j) g[i * n + j] = g[j * n + i] = dot64(x + i * ldx, x + j * ldx, d);
}

inline void add_f32(float* acc, const float* src, i64 n) noexcept {
  for (i64 j = 0; j < n; ++j) acc[j] += src[j];
}
inline void add_f16(float* acc, const std::uint16_t* src, i64 n) noexcept {
  for (i64 j = 0; j < n; ++j) acc[j] += to_float(half{src[j]});
}
inline void add_bf16(float* acc, const std::uint16_t* src, i64 n) noexcept {
  for (i64 j = 0; j < n; ++j) acc[j] += to_float(bfloat16{src[j]});
}
inline void cvt_f16(float* dst, const std::uint16_t* src, i64 n) noexcept {
  for (i64 j = 0; j < n; ++j) dst[j] = to_float(half{src[j]});
}
inline void cvt_bf16(float* dst, const std::uint16_t* src, i64 n) noexcept {
  for (i64 j = 0; j < n; ++j) dst[j] = to_float(bfloat16{src[j]});
}

inline constexpr kernel_table table{isa::scalar, &dot_rows, &gram_f64, &add_f32, &add_f16,
                                    &add_bf16,   &cvt_f16,  &cvt_bf16};

}  // namespace sparsevlm::cpu::scalar
