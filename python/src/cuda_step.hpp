// The package's CUDA path: prune_step on device arrays through the CUDA
// specialization (include/sparsevlm/cuda/). Compiled by nvcc into the extension
// when it is built with SPARSEVLM_CUDA=ON; this header keeps nvcc away from
// nanobind and the binding code away from CUDA.
#pragma once

#include <dlpack/dlpack.h>

#include <cstdint>
#include <span>
#include <vector>

#include <sparsevlm/cpu/kernel_table.hpp>
#include <sparsevlm/types.hpp>

namespace sparsevlm_py {

/// The device arrays of one step; absent ones are null. Every present array must
/// be CUDA memory on one device, and all of one dtype (float32, float16 or
/// bfloat16; `lse` float32).
struct device_step_arrays {
  const DLTensor* hidden = nullptr;  ///< [L, d]
  const DLTensor* attn = nullptr;    ///< [H, L, L], or q and k:
  const DLTensor* q = nullptr;       ///< [H, L or R, dh]
  const DLTensor* k = nullptr;       ///< [Hkv, L, dh]
  const DLTensor* lse = nullptr;     ///< [H, L or R] float32, optional
  double scale = 0.0;
  const DLTensor* embeds = nullptr;  ///< [L, d_e], when `raters` is null
};

/// One pruning step on the GPU: cuda::prune_step_sync on `stream` (a cudaStream_t
/// as an integer; 0 is the default stream) in a workspace cached per thread and
/// device (grown when a step needs more), then the result downloaded. `raters`
/// (host, absolute positions) replaces rater selection when not null. Same decisions as the CPU prune_step.
/// Errors: sparsevlm::error for bad arrays or options and for NaN/Inf the
/// kernels flag; std::runtime_error for a failing CUDA call.
sparsevlm::step_result cuda_prune_step(const device_step_arrays& a, sparsevlm::visual_span visual,
                                       const std::vector<sparsevlm::index_t>* raters,
                                       const sparsevlm::step_options& opt, std::uintptr_t stream);

/// kv_cache.hpp's compact_paged_kv on one layer's K (or V) pages in CUDA memory:
/// cuda::compact_paged_kv_async on `stream` (the host sequence and table copied to
/// device scratch kept per thread and device), then its status read back, so the
/// call returns when the rows have moved. `recycled` ([c, heads, head_dim] on the
/// cache's device) may be null. Errors: sparsevlm::error as the CPU function's,
/// raised on the host before anything is enqueued; std::runtime_error for a
/// failing CUDA call.
sparsevlm::index_t cuda_compact_paged_kv(const DLTensor& cache, bool hnd,
                                         std::span<const sparsevlm::index_t> sequence,
                                         std::span<const sparsevlm::index_t> block_table,
                                         const DLTensor* recycled, std::uintptr_t stream);

/// How this unit (cuda_step.cu's host code) was compiled: sparsevlm.build_info().
sparsevlm::cpu::unit_build cuda_unit_build() noexcept;

}  // namespace sparsevlm_py
