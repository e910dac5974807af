// The hot loops of a pruning step as a table of function pointers, one table per
// instruction set. Self-contained on purpose (no other sparsevlm header): the
// per-ISA translation units (cpu/instantiate.hpp) include it under -mavx2 or
// -mavx512f, and any inline function they share with the rest of the program
// could be compiled there with instructions the machine may lack.
#pragma once

#include <atomic>
#include <cstdint>

namespace sparsevlm::cpu {

/// The instruction sets a kernel table can be compiled for.
enum class isa : int { scalar = 0, avx2 = 1, avx512 = 2 };

inline constexpr int isa_count = 3;

constexpr const char* isa_name(isa i) noexcept {
  switch (i) {
    case isa::scalar: return "scalar";
    case isa::avx2: return "avx2";
    case isa::avx512: return "avx512";
  }
  return "unknown";
}

/// How one translation unit was compiled, from GCC's and Clang's predefined
/// macros: a build check can assert that no kernel unit was optimised for size
/// (-Os: nanobind's default for extension modules made the Python package 3x
/// slower) or left unoptimised. SPARSEVLM_THIS_UNIT_BUILD gives the value for the
/// unit it is expanded in.
struct unit_build {
  bool known = false;          ///< recorded by the unit (false: the scalar table, inline code of every unit)
  bool optimize = false;       ///< __OPTIMIZE__: -O1 or more, -Os and -Oz included
  bool optimize_size = false;  ///< __OPTIMIZE_SIZE__: -Os or -Oz
};

namespace detail {

/// One instruction set's kernels (internal: the stages call them through
/// detail::kernels(); a program chooses among them with force_isa). Every path computes bit-identical results
/// (the "canonical arithmetic" below), so which one runs never changes a
/// decision:
///
/// - float32 dot products use 16 partial sums, lane l accumulating elements
///   l, l + 16, l + 32, ... with fused multiply-adds, the last partial chunk
///   zero-padded; the 16 sums are combined pairwise (l + 8, then + 4, + 2, + 1).
///   AVX-512 holds the 16 sums in one register, AVX2 in two, scalar in an array
///   with std::fma.
/// - float64 dot products (of float32 rows, widened exactly) use 8 partial sums
///   the same way (l + 4, + 2, + 1).
/// - element-wise kernels (row sums, conversions) are exact per element.
/// - exp in double (softmax weights) is one fixed algorithm, not the C
///   library's: k = nearbyint(x·log2 e), r = x − k·ln2 (two fused steps), a
///   degree-13 Taylor polynomial by fused Horner steps, then p·2^k correctly
///   rounded (ldexp). Within 2 ulp of the true value, the same bits everywhere.
struct kernel_table {
  isa id;
  /// out[i·ldo + t] = dot32(a + i·lda, b + t·ldb, d) for i < na, t < nb.
  void (*dot_rows)(const float* a, std::int64_t lda, std::int64_t na, const float* b,
                   std::int64_t ldb, std::int64_t nb, std::int64_t d, float* out,
                   std::int64_t ldo);
  /// g[i·n + j] = g[j·n + i] = dot64(x_i, x_j) for i <= j < n (the full
  /// symmetric matrix, each pair computed once).
  void (*gram_f64)(const float* x, std::int64_t ldx, std::int64_t n, std::int64_t d, double* g);
  /// acc[j] += src[j] for j < n, with src float32 / float16 bits / bfloat16 bits.
  void (*add_f32)(float* acc, const float* src, std::int64_t n);
  void (*add_f16)(float* acc, const std::uint16_t* src, std::int64_t n);
  void (*add_bf16)(float* acc, const std::uint16_t* src, std::int64_t n);
  /// dst[j] = float(src[j]) for j < n (exact).
  void (*cvt_f16)(float* dst, const std::uint16_t* src, std::int64_t n);
  void (*cvt_bf16)(float* dst, const std::uint16_t* src, std::int64_t n);
  /// x[j] = exp(x[j]) for j < n, in place (exp_constants below).
  void (*exp_f64)(double* x, std::int64_t n);
  /// How the unit that compiled these kernels was built (cpu/instantiate.hpp
  /// records it; the scalar table leaves it unknown).
  unit_build build{};
};

/// The constants of the shared exp (kernel_table::exp_f64).
struct exp_constants {
  static constexpr double log2e = 1.4426950408889634;
  static constexpr double ln2_hi = 0x1.62e42fefa3800p-1;  // ln 2, last 11 bits zero
  static constexpr double ln2_lo = 0x1.ef35793c7673p-45;   // ln 2 − ln2_hi
  static constexpr double lo = -746.0, hi = 710.0;         // 0 and +Inf beyond
  /// 1/13!, 1/12!, ..., 1/1!, 1/0!: Horner order.
  static constexpr double c[14] = {1.0 / 6227020800.0, 1.0 / 479001600.0, 1.0 / 39916800.0,
                                   1.0 / 3628800.0,    1.0 / 362880.0,    1.0 / 40320.0,
                                   1.0 / 5040.0,       1.0 / 720.0,       1.0 / 120.0,
                                   1.0 / 24.0,         1.0 / 6.0,         0.5,
                                   1.0,                1.0};
};

}  // namespace detail

// The macros of the unit being compiled (a macro, not an inline variable, since
// its value differs between units: an inline variable would break the ODR).
#if defined(__OPTIMIZE__)
#define SPARSEVLM_DETAIL_UNIT_OPTIMIZE true
#else
#define SPARSEVLM_DETAIL_UNIT_OPTIMIZE false
#endif
#if defined(__OPTIMIZE_SIZE__)
#define SPARSEVLM_DETAIL_UNIT_OPTIMIZE_SIZE true
#else
#define SPARSEVLM_DETAIL_UNIT_OPTIMIZE_SIZE false
#endif
/// The unit_build of the translation unit this is expanded in.
#define SPARSEVLM_THIS_UNIT_BUILD                                        \
  (::sparsevlm::cpu::unit_build{true, SPARSEVLM_DETAIL_UNIT_OPTIMIZE, \
                                SPARSEVLM_DETAIL_UNIT_OPTIMIZE_SIZE})

namespace detail {
/// The tables the per-ISA translation units registered (null: not compiled in).
/// Constant-initialised, so a registration during static initialisation is
/// never lost to initialisation order.
inline constinit std::atomic<const kernel_table*> registry[isa_count] = {};
}  // namespace detail

}  // namespace sparsevlm::cpu
