// Include in exactly one translation unit per instruction set, compiled with
// that set's flags, to put its kernels into the program:
//   AVX2:    -mavx2 -mfma -mf16c
//   AVX-512: -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx2 -mfma -mf16c
// (CMake: sparsevlm_add_isa_kernels(target) does this). Add -ffp-contract=off
// so that nothing but the explicit fused multiply-adds is fused.
//
// The unit must include nothing else: any inline function it shared with the
// rest of the program could be compiled here with instructions other machines
// lack, and the linker may keep that copy.
#pragma once

#include "simd.hpp"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(__AVX512DQ__) && defined(__FMA__) && defined(__F16C__)
#define SPARSEVLM_ISA_ARCH ::xsimd::avx512bw
#define SPARSEVLM_ISA_ID ::sparsevlm::cpu::isa::avx512
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define SPARSEVLM_ISA_ARCH ::xsimd::fma3<::xsimd::avx2>
#define SPARSEVLM_ISA_ID ::sparsevlm::cpu::isa::avx2
#else
#error "sparsevlm/cpu/instantiate.hpp needs -mavx2 -mfma -mf16c, or AVX-512 F/BW/VL/DQ as well"
#endif

namespace {
constexpr ::sparsevlm::cpu::detail::kernel_table sparsevlm_isa_table =
    ::sparsevlm::cpu::detail::simd::make_table<SPARSEVLM_ISA_ARCH>(SPARSEVLM_ISA_ID,
                                                           SPARSEVLM_THIS_UNIT_BUILD);
// Registered during static initialisation (the registry is constant-initialised).
[[maybe_unused]] const bool sparsevlm_isa_registered =
    (::sparsevlm::cpu::detail::registry[static_cast<int>(SPARSEVLM_ISA_ID)].store(
         &sparsevlm_isa_table, std::memory_order_release),
     true);
}  // namespace

#undef SPARSEVLM_ISA_ARCH
#undef SPARSEVLM_ISA_ID
