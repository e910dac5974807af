// Arithmetic with one rounding per operation, written so that no compiler flag
// can change it on the device. nvcc contracts a·b + c into one fused
// multiply-add by default (-fmad=true), and --use_fast_math (-prec-div=false,
// -prec-sqrt=false) approximates float32 division and square roots; the
// __*_rn intrinsics are never contracted or approximated, so a kernel written
// with these gives the CPU's bits under any -fmad and -prec-* setting (a CTest
// compiles the kernels both ways and compares the PTX). What no intrinsic
// prevents: -ftz=true (part of --use_fast_math) flushes float32 subnormals
// (below 2^-126) to zero. On the host these are the plain operators; the units
// that could fuse them are compiled with -ffp-contract=off.
#pragma once

#include <cmath>

#include "../config.hpp"

namespace sparsevlm::detail::core {

#if defined(__CUDA_ARCH__)
SPARSEVLM_HD inline float add_rn(float a, float b) noexcept { return __fadd_rn(a, b); }
SPARSEVLM_HD inline float sub_rn(float a, float b) noexcept { return __fsub_rn(a, b); }
SPARSEVLM_HD inline float mul_rn(float a, float b) noexcept { return __fmul_rn(a, b); }
SPARSEVLM_HD inline float div_rn(float a, float b) noexcept { return __fdiv_rn(a, b); }
SPARSEVLM_HD inline float sqrt_rn(float a) noexcept { return __fsqrt_rn(a); }
SPARSEVLM_HD inline double add_rn(double a, double b) noexcept { return __dadd_rn(a, b); }
SPARSEVLM_HD inline double sub_rn(double a, double b) noexcept { return __dsub_rn(a, b); }
SPARSEVLM_HD inline double mul_rn(double a, double b) noexcept { return __dmul_rn(a, b); }
SPARSEVLM_HD inline double div_rn(double a, double b) noexcept { return __ddiv_rn(a, b); }
SPARSEVLM_HD inline double sqrt_rn(double a) noexcept { return __dsqrt_rn(a); }
#else
SPARSEVLM_HD inline float add_rn(float a, float b) noexcept { return a + b; }
SPARSEVLM_HD inline float sub_rn(float a, float b) noexcept { return a - b; }
SPARSEVLM_HD inline float mul_rn(float a, float b) noexcept { return a * b; }
SPARSEVLM_HD inline float div_rn(float a, float b) noexcept { return a / b; }
SPARSEVLM_HD inline float sqrt_rn(float a) noexcept { return std::sqrt(a); }
SPARSEVLM_HD inline double add_rn(double a, double b) noexcept { return a + b; }
SPARSEVLM_HD inline double sub_rn(double a, double b) noexcept { return a - b; }
SPARSEVLM_HD inline double mul_rn(double a, double b) noexcept { return a * b; }
SPARSEVLM_HD inline double div_rn(double a, double b) noexcept { return a / b; }
SPARSEVLM_HD inline double sqrt_rn(double a) noexcept { return std::sqrt(a); }
#endif

}  // namespace sparsevlm::detail::core
