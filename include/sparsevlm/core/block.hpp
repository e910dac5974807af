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
// agree: atomics only where the result is the same in any order (a flag that
// several threads may raise is written, never read-modified-written: raise_flag;
// the maximum of non-negative doubles is an integer maximum of their bits:
// max_nonnegative); no warp-level intrinsics; every barrier is
// reached by every thread of the block; and every sum whose order matters runs
// in one thread, in the order the CPU stage uses.
#pragma once

#include <cstdint>

#include "../config.hpp"

#if !defined(__CUDA_ARCH__)
#include <atomic>
#include <bit>
#include <thread>
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

/// *bits = the bits of max(double(*bits), v), with v read as max(v, +0) (so -0
/// and NaN count as 0, as a serial `m = m < v ? v : m` from m = 0 treats them).
/// Non-negative doubles order as their bit patterns do as unsigned integers, so
/// one integer atomic max gives the exact maximum whatever the order of the
/// writers. `*bits` starts as 0 (the bits of +0.0).
SPARSEVLM_HD inline void max_nonnegative(std::uint64_t* bits, double v) noexcept {
  const double w = v > 0.0 ? v : 0.0;
#if defined(__CUDA_ARCH__)
  atomicMax(reinterpret_cast<unsigned long long*>(bits),
            static_cast<unsigned long long>(__double_as_longlong(w)));
#else
  const std::uint64_t b = std::bit_cast<std::uint64_t>(w);
  std::atomic_ref<std::uint64_t> a(*bits);
  std::uint64_t cur = a.load(std::memory_order_relaxed);
  while (cur < b && !a.compare_exchange_weak(cur, b, std::memory_order_relaxed)) {
  }
#endif
}

/// The double whose bits max_nonnegative keeps.
SPARSEVLM_HD inline double double_of_bits(std::uint64_t bits) noexcept {
#if defined(__CUDA_ARCH__)
  return __longlong_as_double(static_cast<long long>(bits));
#else
  return std::bit_cast<double>(bits);
#endif
}

/// A block context seen as block (x, y) of a gx × gy grid: the same threads and
/// barrier, other coordinates, so that a body runs as in a launch of its own.
/// A chained launch's phases (block (x, y) of the phase's grid) and a kernel
/// fused as a tail (last_block_to_arrive: block (0, 0) of (1, 1)) run their
/// bodies with one.
template <class Block>
struct grid_block {
  Block b;
  std::int64_t x = 0, y = 0, gxv = 1, gyv = 1;
  SPARSEVLM_HD std::int64_t rank() const noexcept { return b.rank(); }
  SPARSEVLM_HD std::int64_t size() const noexcept { return b.size(); }
  SPARSEVLM_HD std::int64_t bx() const noexcept { return x; }
  SPARSEVLM_HD std::int64_t by() const noexcept { return y; }
  SPARSEVLM_HD std::int64_t gx() const noexcept { return gxv; }
  SPARSEVLM_HD std::int64_t gy() const noexcept { return gyv; }
  SPARSEVLM_HD void sync() const { b.sync(); }
};

/// Whether this block is the last of its grid to get here: every thread of every
/// block calls it once, and it answers the same on all threads of a block, true in
/// exactly one block, which then sees every other block's writes (as after a
/// kernel boundary). `*arrivals` counts the blocks; it is 0 before the launch and
/// the last block puts it back to 0, so a graph replays it. `flag` is one word of
/// the block's shared memory.
///
/// On the device this is cooperative groups' grid barrier without the wait: a
/// barrier, then thread 0 fences (making the block's writes visible device-wide,
/// fences being cumulative over the barrier) and adds one; the last block fences
/// again before its barrier, so its threads read what the others wrote. On the
/// host (the tests' CPU threads) an acquire-release add does the same.
template <class Block>
SPARSEVLM_HD bool last_block_to_arrive(const Block& b, std::uint32_t* arrivals,
                                       std::uint32_t* flag) noexcept {
  b.sync();
  if (b.rank() == 0) {
    const auto blocks = static_cast<std::uint32_t>(b.gx() * b.gy());
#if defined(__CUDA_ARCH__)
    __threadfence();
    const bool last = atomicAdd(arrivals, 1u) + 1u == blocks;
    if (last) {
      __threadfence();
      *reinterpret_cast<volatile std::uint32_t*>(arrivals) = 0;
    }
#else
    std::atomic_ref<std::uint32_t> a(*arrivals);
    const bool last = a.fetch_add(1, std::memory_order_acq_rel) + 1 == blocks;
    if (last) a.store(0, std::memory_order_relaxed);
#endif
    *flag = last ? 1u : 0u;
  }
  b.sync();
  return *flag != 0;
}

/// The block's place in the order blocks start in: thread 0 takes the next
/// ticket of `*tickets` (0, 1, ...) and every thread of the block gets it. A
/// block holding ticket t knows that every ticket below t went to a block that
/// has already started, which is what lets a block wait for blocks with lower
/// tickets without deadlock, however many blocks the device holds at once (the
/// dynamic tile ids of CUB's single-pass scan rest on the same fact). `flag` is
/// one word of the block's shared memory.
template <class Block>
SPARSEVLM_HD std::uint32_t block_ticket(const Block& b, std::uint32_t* tickets,
                                        std::uint32_t* flag) noexcept {
  if (b.rank() == 0) {
#if defined(__CUDA_ARCH__)
    *flag = atomicAdd(tickets, 1u);
#else
    *flag = std::atomic_ref<std::uint32_t>(*tickets).fetch_add(1, std::memory_order_relaxed);
#endif
  }
  b.sync();
  const std::uint32_t t = *flag;
  b.sync();  // every thread has read it before the body may reuse the word
  return t;
}

/// Waits until `*count` reaches `target` (blocks of an earlier phase counted by
/// arrive()), then lets the whole block see what those blocks wrote, as after a
/// kernel boundary: thread 0 polls, fences, and the barrier releases the block.
template <class Block>
SPARSEVLM_HD void wait_for(const Block& b, const std::uint32_t* count,
                           std::uint32_t target) noexcept {
  if (b.rank() == 0) {
#if defined(__CUDA_ARCH__)
    while (*reinterpret_cast<const volatile std::uint32_t*>(count) < target) __nanosleep(64);
    __threadfence();
#else
    std::atomic_ref<std::uint32_t> a(*const_cast<std::uint32_t*>(count));
    while (a.load(std::memory_order_acquire) < target) std::this_thread::yield();
#endif
  }
  b.sync();
}

/// Counts this block into `*count` once every thread of it is done, making its
/// writes visible to a block that wait_for()s the count (a barrier, then thread
/// 0 fences and adds, as last_block_to_arrive). Returns the count after this
/// block's add on thread 0 (0 on the others).
template <class Block>
SPARSEVLM_HD std::uint32_t arrive(const Block& b, std::uint32_t* count) noexcept {
  b.sync();
  if (b.rank() != 0) return 0;
#if defined(__CUDA_ARCH__)
  __threadfence();
  return atomicAdd(count, 1u) + 1u;
#else
  return std::atomic_ref<std::uint32_t>(*count).fetch_add(1, std::memory_order_acq_rel) + 1;
#endif
}

/// Sets a counter that other blocks have finished updating back to 0, for the
/// next kernel (the caller knows every update is done): a fence orders the store
/// after the atomics this thread saw.
SPARSEVLM_HD inline void reset_counter(std::uint32_t* count) noexcept {
#if defined(__CUDA_ARCH__)
  __threadfence();
  *reinterpret_cast<volatile std::uint32_t*>(count) = 0;
#else
  std::atomic_ref<std::uint32_t>(*count).store(0, std::memory_order_release);
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
