// Choosing the kernel table at run time.
//
// A program gets the AVX2 and AVX-512 kernels by compiling cpu/instantiate.hpp
// once per instruction set (CMake: sparsevlm_add_isa_kernels(target)); those
// translation units register their tables before main. Without them every
// step runs the scalar kernels, with the same results, only slower.
#pragma once

#include <atomic>
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <cpuid.h>
#endif

#include "../error.hpp"
#include "kernel_table.hpp"
#include "scalar.hpp"

namespace sparsevlm::cpu {

namespace detail {
/// -1: automatic; else the forced isa.
inline constinit std::atomic<int> forced{-1};
}  // namespace detail

namespace detail {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
/// CPUID.1:ECX.F16C[bit 29] (clang 14's __builtin_cpu_supports has no "f16c").
inline bool cpu_has_f16c() noexcept {
  unsigned a = 0, b = 0, c = 0, d = 0;
  return __get_cpuid(1, &a, &b, &c, &d) != 0 && ((c >> 29) & 1u) != 0;
}
#endif
}  // namespace detail

/// Whether this CPU (and its OS) runs the instructions of `i`.
inline bool isa_supported(isa i) noexcept {
  switch (i) {
    case isa::scalar: return true;
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
    // Checks the OS-enabled register state too, not only CPUID.
    case isa::avx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
             detail::cpu_has_f16c();
    case isa::avx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#endif
    default: return false;
  }
}

/// Whether `i` can run here: compiled into the program and supported.
inline bool isa_available(isa i) noexcept {
  if (static_cast<int>(i) < 0 || static_cast<int>(i) >= isa_count) return false;
  if (i == isa::scalar) return true;
  return detail::registry[static_cast<int>(i)].load(std::memory_order_acquire) != nullptr &&
         isa_supported(i);
}

/// The best available instruction set.
inline isa best_isa() noexcept {
  for (int i = isa_count - 1; i > 0; --i)
    if (isa_available(static_cast<isa>(i))) return static_cast<isa>(i);
  return isa::scalar;
}

namespace detail {

/// The table compiled into the program for `i` (scalar: always), whether or not
/// this CPU runs it; null when it was not compiled in or `i` is out of range.
/// For build checks: table->build tells how its unit was compiled.
inline const kernel_table* compiled_kernels(isa i) noexcept {
  if (static_cast<int>(i) < 0 || static_cast<int>(i) >= isa_count) return nullptr;
  if (i == isa::scalar) return &scalar::table;
  return registry[static_cast<int>(i)].load(std::memory_order_acquire);
}

/// The kernels a step uses now: the forced ones (force_isa), else the best
/// available. Cost: two atomic loads and a cached CPUID test.
inline const kernel_table& kernels() noexcept {
  const int f = forced.load(std::memory_order_relaxed);
  const isa i = f >= 0 ? static_cast<isa>(f) : best_isa();
  if (i == isa::scalar) return scalar::table;
  return *registry[static_cast<int>(i)].load(std::memory_order_acquire);
}

}  // namespace detail

/// The instruction set the stages use now.
inline isa active_isa() noexcept { return detail::kernels().id; }

/// Makes every later step in the process use `i` (tests and benchmarks compare
/// the paths this way). Errors: invalid_argument when `i` is not available.
/// Not meant to be called while steps run on other threads.
inline void force_isa(isa i) {
  SPARSEVLM_CHECK(isa_available(i), errc::invalid_argument, "isa",
                  "an instruction set compiled into this program and supported by this CPU",
                  isa_name(i));
  detail::forced.store(static_cast<int>(i), std::memory_order_relaxed);
}

/// Back to automatic selection.
inline void reset_isa() noexcept { detail::forced.store(-1, std::memory_order_relaxed); }

/// force_isa for a scope.
class scoped_isa {
 public:
  explicit scoped_isa(isa i) : prev_(detail::forced.load(std::memory_order_relaxed)) { force_isa(i); }
  ~scoped_isa() { detail::forced.store(prev_, std::memory_order_relaxed); }
  scoped_isa(const scoped_isa&) = delete;
  scoped_isa& operator=(const scoped_isa&) = delete;

 private:
  int prev_;
};

}  // namespace sparsevlm::cpu
