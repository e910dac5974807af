// The scalar kernels: the reference for the canonical arithmetic of
// kernel_table.hpp, and the path on machines without AVX2.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "../core/dot.hpp"
#include "../core/exp.hpp"
#include "../dtype.hpp"
#include "kernel_table.hpp"

namespace sparsevlm::cpu::detail::scalar {

using i64 = std::int64_t;

/// dot32 of kernel_table.hpp: 16 fused partial sums, zero-padded last chunk
/// (core/dot.hpp, which the CUDA kernels share).
inline float dot32(const float* a, const float* b, i64 d) noexcept { return ::sparsevlm::detail::core::dot32(a, b, d); }

/// dot64 of kernel_table.hpp: float32 rows widened, 8 fused partial sums.
inline double dot64(const float* a, const float* b, i64 d) noexcept { return ::sparsevlm::detail::core::dot64(a, b, d); }

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

/// exp of kernel_table.hpp (the reference for the SIMD paths; core/exp.hpp,
/// which the CUDA kernels share).
inline double exp64(double x) noexcept { return ::sparsevlm::detail::core::exp64(x); }

inline void exp_f64(double* x, i64 n) noexcept {
  for (i64 j = 0; j < n; ++j) x[j] = exp64(x[j]);
}

inline constexpr kernel_table table{isa::scalar, &dot_rows, &gram_f64, &add_f32,  &add_f16,
                                    &add_bf16,   &cvt_f16,  &cvt_bf16, &exp_f64,
                                    unit_build{}};

}  // namespace sparsevlm::cpu::detail::scalar
