// sparsevlm: SparseVLM visual-token sparsification, header-only C++20.
#pragma once

#define SPARSEVLM_VERSION_MAJOR 0
#define SPARSEVLM_VERSION_MINOR 1
#define SPARSEVLM_VERSION_PATCH 0
#define SPARSEVLM_VERSION_STRING "0.1.0"

// Functions whose arithmetic is shared by the CPU and the CUDA backends are marked
// SPARSEVLM_HD so nvcc compiles them for both sides.
#if defined(__CUDACC__)
#define SPARSEVLM_HD __host__ __device__
#else
#define SPARSEVLM_HD
#endif

// Internal invariants: checked in debug builds, compiled out in release. Public
// inputs are never checked with this; they go through sparsevlm::error.
#if defined(NDEBUG)
#define SPARSEVLM_ASSERT(cond) ((void)0)
#else
#include <cassert>
#define SPARSEVLM_ASSERT(cond) assert(cond)
#endif
