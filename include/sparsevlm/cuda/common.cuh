// What every CUDA stage shares: the device executor of detail/pipeline.hpp, the
// per-step device state (device_step) and its workspace protocol, and reading
// a step back to the host. Needs nvcc (a .cuh); the kernels themselves are the
// host-compilable bodies of detail/*_kernels.hpp.
//
// Conventions (docs/cuda.md): inputs are the library's views over *device*
// memory; every launcher is stream-ordered and returns cudaError_t; argument
// errors that the host can see (extents, options) throw sparsevlm::error
// before anything is enqueued; errors that only the data reveal (NaN, bad
// caller raters) raise a device flag, and the step's length becomes -1.
// No launcher allocates or synchronises the device.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <span>
#include <type_traits>
#include <vector>

#include "../check.hpp"
#include "detail/pipeline.hpp"
#include "results.hpp"
#include "../error.hpp"
#include "../types.hpp"
#include "../view.hpp"
#include "../workspace.hpp"

namespace sparsevlm::cuda {

namespace detail {


/// The block context of core/block.hpp for a CUDA thread block (1-D blocks,
/// 2-D grids). Host-callable so that nvcc accepts the bodies' host instances,
/// which are never run.
struct cuda_block {
  SPARSEVLM_HD std::int64_t rank() const noexcept {
#if defined(__CUDA_ARCH__)
    return threadIdx.x;
#else
    return 0;
#endif
  }
  SPARSEVLM_HD std::int64_t size() const noexcept {
#if defined(__CUDA_ARCH__)
    return blockDim.x;
#else
    return 1;
#endif
  }
  SPARSEVLM_HD std::int64_t bx() const noexcept {
#if defined(__CUDA_ARCH__)
    return blockIdx.x;
#else
    return 0;
#endif
  }
  SPARSEVLM_HD std::int64_t by() const noexcept {
#if defined(__CUDA_ARCH__)
    return blockIdx.y;
#else
    return 0;
#endif
  }
  SPARSEVLM_HD std::int64_t gx() const noexcept {
#if defined(__CUDA_ARCH__)
    return gridDim.x;
#else
    return 1;
#endif
  }
  SPARSEVLM_HD std::int64_t gy() const noexcept {
#if defined(__CUDA_ARCH__)
    return gridDim.y;
#else
    return 1;
#endif
  }
  SPARSEVLM_HD void sync() const noexcept {
#if defined(__CUDA_ARCH__)
    __syncthreads();
#endif
  }
};

/// The one kernel template: runs a body of detail/*_kernels.hpp.
template <class Body>
__global__ void run_body(Body body) {
  extern __shared__ double shared_mem[];
  body(cuda_block{}, static_cast<void*>(shared_mem));
}

/// Block size of the element-wise and per-token kernels.
inline constexpr int block_threads = 256;
/// Blocks of a grid-stride loop at most (enough to fill any current GPU).
inline constexpr std::int64_t max_grid = 8192;

/// detail/pipeline.hpp's executor: enqueues on `stream`, keeps the first error
/// and enqueues nothing after it.
struct device_exec {
  static constexpr int tile = 32;  // 32×32 dot tiles: 256 threads
  cudaStream_t stream = nullptr;
  cudaError_t status = cudaSuccess;
  std::size_t smem_limit = 48 * 1024;

  explicit device_exec(cudaStream_t s) : stream(s) {
    int dev = 0, optin = 0;
    status = cudaGetDevice(&dev);
    if (status == cudaSuccess)
      status = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
    if (status == cudaSuccess && optin > 0) smem_limit = static_cast<std::size_t>(optin);
  }

  [[nodiscard]] int threads() const noexcept { return block_threads; }
  [[nodiscard]] std::int64_t grid(std::int64_t n) const noexcept {
    if (n <= 0) return 0;
    const std::int64_t g = detail::core::ceil_div(n, block_threads);
    return g < max_grid ? g : max_grid;
  }
  [[nodiscard]] std::size_t max_shared() const noexcept { return smem_limit; }

  template <class Body>
  void launch(const Body& body, std::int64_t gx, std::int64_t gy, int nthreads, std::size_t smem) {
    if (status != cudaSuccess || gx <= 0 || gy <= 0) return;
    if (gx > 0x7fffffff || gy > 65535 || nthreads > 1024 || smem > smem_limit) {
      status = cudaErrorInvalidConfiguration;
      return;
    }
    if (smem > 48 * 1024) {
      status = cudaFuncSetAttribute(run_body<Body>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(smem));
      if (status != cudaSuccess) return;
    }
    run_body<Body><<<dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy)),
                     static_cast<unsigned>(nthreads), smem, stream>>>(body);
    status = cudaGetLastError();
  }
};

/// Refuses a pointer a kernel cannot dereference (host memory that is neither
/// pinned-mapped nor managed), naming the argument, so that it never becomes a
/// sticky illegal-address error in the caller's context. Null passes (an empty
/// argument). Throws sparsevlm::error; a failing query is returned.
inline cudaError_t check_device_pointer(const void* p, const char* name) {
  if (p == nullptr) return cudaSuccess;
  cudaPointerAttributes attr{};
  const cudaError_t e = cudaPointerGetAttributes(&attr, p);
  if (e != cudaSuccess) return e;
  SPARSEVLM_CHECK(attr.type == cudaMemoryTypeDevice || attr.type == cudaMemoryTypeManaged ||
                      (attr.type == cudaMemoryTypeHost && attr.devicePointer != nullptr),
                  errc::invalid_argument, name,
                  "device memory (cudaMalloc, cudaMallocManaged or mapped pinned memory)",
                  attr.type == cudaMemoryTypeHost ? "pinned host memory without a device mapping"
                                                  : "host memory");
  return cudaSuccess;
}

template <class T>
rows2<T> rows_of(matrix_view<const T> m) {
  return rows2<T>{m.data(), m.stride(0), m.stride(1)};
}
template <class T>
rows3<T> rows_of(tensor3_view<const T> m) {
  return rows3<T>{m.data(), m.stride(0), m.stride(1), m.stride(2)};
}

}  // namespace detail

namespace detail {

inline detail::pipeline::bounds bounds_of(const step_shape& s) {
  SPARSEVLM_CHECK(s.length >= 0 && s.visual >= 1 && s.visual <= s.length, errc::shape_mismatch,
                  "shape.visual", sparsevlm::detail::concat("in [1, ", s.length, "] (shape.length)"),
                  s.visual);
  SPARSEVLM_CHECK(s.heads >= 0 && s.embed_dim >= 0 && s.hidden_dim >= 1 && s.head_dim >= 0,
                  errc::shape_mismatch, "shape", "heads, embed_dim, head_dim >= 0 and hidden_dim >= 1",
                  sparsevlm::detail::concat("heads ", s.heads, ", embed_dim ", s.embed_dim,
                                            ", hidden_dim ", s.hidden_dim, ", head_dim ", s.head_dim));
  SPARSEVLM_CHECK(!s.gravity, errc::invalid_argument, "shape.gravity",
                  "false (the CUDA backend has no RoPE gravity correction)", "true");
  return detail::pipeline::make_bounds(s.length, s.visual, s.heads, s.embed_dim, s.hidden_dim,
                                     s.head_dim > 0, s.recycle_fraction, s.cluster_divisor);
}

/// Checks the limits of the one-block kernels against this device (docs/cuda.md).
inline void check_limits(const detail::pipeline::bounds& b, std::size_t smem_limit) {
  SPARSEVLM_CHECK(detail::pipeline::density_shared_bytes(b.s_max) <= smem_limit,
                  errc::invalid_argument, "recycled rows (s_max)",
                  sparsevlm::detail::concat("at most ", smem_limit / sizeof(double),
                                            " after rounding up to a power of two (one row of D in "
                                            "shared memory)"),
                  b.s_max);
}

}  // namespace detail

/// Bytes of device workspace a step of at most `shape` needs: the size query
/// of the two-phase protocol (the same routine lays the buffers out, so the
/// two cannot disagree). A workspace of this size serves any step whose
/// extents and options stay within `shape`. shape.head_dim > 0 reserves the
/// q/k path's buffers (H·T·L floats of logits, T = L − N).
/// Errors: sparsevlm::error for a shape the backend cannot run.
inline std::size_t step_workspace_bytes(const step_shape& shape) {
  detail::pipeline::buffers unused;
  return detail::pipeline::layout(detail::bounds_of(shape), nullptr, unused);
}

/// Starts a step in `workspace` (two-phase, as CUB: with workspace == nullptr
/// only sets `bytes` to what `shape` needs and enqueues nothing). Lays out the
/// buffers for `shape`, resets the device counts, and fills `step`. The stage
/// launchers (raters.cuh ... plan.cuh) then run on `step` in order; or use
/// prune_step_async (step.cuh), which does all of it.
/// Errors: sparsevlm::error for a bad shape or span, or `bytes` smaller than
/// needed; cudaError_t from the launch.
inline cudaError_t begin_step(const step_shape& shape, index_t length, visual_span visual,
                              void* workspace, std::size_t& bytes, device_step& step,
                              cudaStream_t stream) {
  const detail::pipeline::bounds b = detail::bounds_of(shape);
  detail::pipeline::buffers buf;
  const std::size_t need = detail::pipeline::layout(b, nullptr, buf);
  if (workspace == nullptr) {
    bytes = need;
    return cudaSuccess;
  }
  SPARSEVLM_CHECK(bytes >= need, errc::invalid_argument, "workspace bytes",
                  sparsevlm::detail::concat(">= ", need, " (step_workspace_bytes)"), bytes);
  SPARSEVLM_CHECK(reinterpret_cast<std::uintptr_t>(workspace) % 256 == 0, errc::invalid_argument,
                  "workspace", "a 256-byte aligned device pointer (as cudaMalloc returns)",
                  "an unaligned one");
  SPARSEVLM_CHECK(length >= 1 && length <= shape.length, errc::shape_mismatch, "length",
                  sparsevlm::detail::concat("in [1, ", shape.length, "] (shape.length)"), length);
  sparsevlm::detail::check_span(visual, length, "length");
  SPARSEVLM_CHECK(visual.len <= shape.visual && length - visual.len <= b.text, errc::shape_mismatch,
                  "visual.len", sparsevlm::detail::concat("<= ", shape.visual,
                                                          " (shape.visual), with length − len <= ",
                                                          b.text),
                  visual.len);
  detail::device_exec ex(stream);
  if (ex.status != cudaSuccess) return ex.status;
  detail::check_limits(b, ex.max_shared());
  detail::pipeline::layout(b, workspace, buf);
  step = device_step{buf, b, length, visual, shape.hidden_dim};
  detail::pipeline::reset(ex, buf);
  return ex.status;
}

/// Reads a finished step back into a host result (synchronous: waits for
/// `stream`; for tests, tools and debugging, not the hot path). `status`
/// receives the device flags. After a flagged error, `out` holds the raters and
/// counts read so far and empty lists.
inline cudaError_t download(const device_step& step, step_result& out, step_status& status,
                            cudaStream_t stream) {
  detail::step_counts c{};
  cudaError_t e = cudaMemcpyAsync(&c, step.buf.counts, sizeof c, cudaMemcpyDeviceToHost, stream);
  if (e == cudaSuccess) e = cudaStreamSynchronize(stream);
  if (e != cudaSuccess) return e;
  status = detail::status_of(c);
  const index_t N = step.visual.len, d = step.hidden_dim;
  out = step_result{};
  out.rank = c.rank;
  out.keep_count = c.keep;
  out.recycled.dim = d;
  const auto get = [&](auto& vec, const auto* src, index_t n) {
    vec.resize(static_cast<std::size_t>(n > 0 ? n : 0));
    if (n > 0 && e == cudaSuccess)
      e = cudaMemcpyAsync(vec.data(), src, static_cast<std::size_t>(n) * sizeof(vec[0]),
                          cudaMemcpyDeviceToHost, stream);
  };
  get(out.raters, step.buf.raters, c.raters);
  get(out.scores, step.buf.scores, N);
  std::vector<index_t> offsets, members;
  if (c.length >= 0) {
    get(out.keep, step.buf.keep, c.keep);
    get(out.sequence, step.buf.sequence, c.length);
    get(offsets, step.buf.offsets, c.clusters > 0 ? c.clusters + 1 : 0);
    get(members, step.buf.members, c.recycled);
    get(out.recycled.merged, step.buf.merged, c.clusters * d);
  }
  if (e == cudaSuccess) e = cudaStreamSynchronize(stream);
  if (e != cudaSuccess) return e;
  for (index_t q = 0; q < c.clusters && c.length >= 0; ++q)
    out.recycled.clusters.emplace_back(members.begin() + offsets[static_cast<std::size_t>(q)],
                                       members.begin() + offsets[static_cast<std::size_t>(q) + 1]);
  return cudaSuccess;
}

}  // namespace sparsevlm::cuda
