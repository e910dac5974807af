// Thread blocks as a type, so that an algorithm written once runs as a CUDA
// kernel and on the CPU.
//
// A *block context* `b` is what a CUDA thread knows about itself: b.rank() and
// b.size() (its thread and the block's thread count), b.bx()/b.by() and
// b.gx()/b.gy() (its block and the grid, x and y), and b.sync() (a barrier for
// the whole block, __syncthreads). The CUDA backend passes cuda::detail::
// cuda_block; the tests run the same bodies on CPU threads with a std::barrier
// (tests/test_step_kernels.cpp), and `serial_block` runs a one-thread body in place.
//
// The kernels of this library are functors `body(b, shared)` over such a
// context (cuda/detail/*_kernels.hpp). Rules they follow, so that both backends
// agree: no atomics (a flag that several threads may raise is written, never
// read-modified-written: raise_flag); no warp-level intrinsics; every barrier is
// reached by every thread of the block; and every sum whose order matters runs
// in one thread, in the order the CPU stage uses.
#pragma once

#include <cstdint>

#include "../config.hpp"

#if !defined(__CUDA_ARCH__)
#include <atomic>
#endif

namespace sparsevlm::detail::core {

/// One thread, one block: algorithms written for a block run serially.
struct serial_block {
  SPARSEVLM_HD std::int64_t rank() const noexcept { return 0; }
  SPARSEVLM_HD std::int64_t size() const noexcept { return 1; }
  SPARSEVLM_HD std::int64_t bx() const noexcept { return 0; }
  SPARSEVLM_HD std::int64_t by() const noexcept { return 0; }
  SPARSEVLM_HD std::int64_t gx() const noexcept { return 1; }
  SPARSEVLM_HD std::int64_t gy() const noexcept { return 1; }
  SPARSEVLM_HD void sync() const noexcept {}
};

/// Sets a flag word to 1. Every writer writes the same value, so no atomic
/// read-modify-write is needed on the device; on the host (where the tests run
/// bodies on several threads) it is an atomic store so the race is defined.
SPARSEVLM_HD inline void raise_flag(std::int64_t* flag) noexcept {
#if defined(__CUDA_ARCH__)
  *reinterpret_cast<volatile std::int64_t*>(flag) = 1;
#else
  std::atomic_ref<std::int64_t>(*flag).store(1, std::memory_order_relaxed);
#endif
}

/// Smallest power of two >= n (n >= 1).
SPARSEVLM_HD constexpr std::int64_t pow2_at_least(std::int64_t n) noexcept {
  std::int64_t p = 1;
  while (p < n) p <<= 1;
  return p;
}

/// Ceiling division for positive operands.
SPARSEVLM_HD constexpr std::int64_t ceil_div(std::int64_t a, std::int64_t b) noexcept {
  return (a + b - 1) / b;
}

}  // namespace sparsevlm::detail::core
