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

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <span>
#include <utility>
#include <type_traits>
#include <vector>

#include "../check.hpp"
#include "detail/pipeline.hpp"
#include "launch_plan.hpp"
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
///
/// On sm_90 the launches are programmatic (device_exec::launch): the kernel may
/// be launched while the one before it on the stream (ours or the caller's) is
/// still finishing, so the first thing every block does is wait for that grid to
/// complete and its memory to be visible (griddepcontrol.wait; it returns at
/// once for a launch that is not programmatic). What overlaps is the launch's
/// own latency, never a read of the previous kernel's results.
///
/// The body is a __grid_constant__ parameter: it is read where the launch put it,
/// never copied into each thread's local memory when a body takes its own
/// address or indexes into itself (a chain's phases, a batch's steps: up to 32
/// KB of parameters).
template <class Body>
__global__ void run_body(const __grid_constant__ Body body) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
  extern __shared__ double shared_mem[];
  body(cuda_block{}, static_cast<void*>(shared_mem));
}

/// Devices whose per-device facts (once_per_device) are remembered; a higher
/// ordinal reads them at every call.
inline constexpr int cached_devices = 64;

/// A fact about `device` (a nonzero integer) taken once: from `slot[device]` when
/// an earlier call stored it, else from read(v), stored when it succeeds. The
/// same fact may be read twice by two threads at once, never torn.
template <class Read>
cudaError_t once_per_device(std::atomic<std::int64_t>* slot, int device, std::int64_t& v, Read&& read) {
  const bool cacheable = device >= 0 && device < cached_devices;
  if (cacheable) {
    v = slot[device].load(std::memory_order_acquire);
    if (v != 0) return cudaSuccess;
  }
  const cudaError_t e = read(v);
  if (e == cudaSuccess && cacheable) slot[device].store(v, std::memory_order_release);
  return e;
}

/// The opt-in shared memory per block of `device`, read once per device (a step
/// would otherwise pay two runtime calls for it).
inline cudaError_t shared_optin(int device, std::size_t& bytes) {
  static std::atomic<std::int64_t> known[cached_devices] = {};
  std::int64_t v = 0;
  const cudaError_t e = once_per_device(known, device, v, [device](std::int64_t& out) {
    int optin = 0;
    const cudaError_t r = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    out = optin > 0 ? optin : static_cast<std::int64_t>(launch_policy::default_shared);
    return r;
  });
  if (e == cudaSuccess) bytes = static_cast<std::size_t>(v);
  return e;
}

/// Whether run_body<Body> may be launched programmatically on `device`: the
/// device takes programmatic dependent launches (compute capability 9.0 and
/// later) and the code it runs was compiled from PTX of that generation, so it
/// holds run_body's griddepcontrol.wait (an engine that builds these headers for
/// sm_80 only and runs them on an H100 JIT-compiles compute_80 PTX, which has no
/// wait: that kernel gets a plain launch). Read once per device and kernel.
template <class Body>
cudaError_t programmatic_launch(int device, bool& yes) {
  static std::atomic<std::int64_t> known[cached_devices] = {};  // 1: no, 2: yes
  std::int64_t v = 0;
  const cudaError_t e = once_per_device(known, device, v, [device](std::int64_t& out) {
    int major = 0;
    cudaError_t r = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
    cudaFuncAttributes attr{};
    if (r == cudaSuccess && major >= 9) r = cudaFuncGetAttributes(&attr, run_body<Body>);
    out = major >= 9 && attr.ptxVersion >= 90 ? 2 : 1;
    return r;
  });
  if (e == cudaSuccess) yes = v == 2;
  return e;
}

/// Lets run_body<Body> use up to `bytes` (the device's opt-in maximum) of dynamic
/// shared memory. Set once per device and kernel, always to the same value, so
/// that host threads launching different shapes never race on the attribute (a
/// per-launch exact size would: one thread's smaller value could land between
/// another's set and launch).
template <class Body>
cudaError_t allow_shared(int device, std::size_t bytes) {
  static std::atomic<std::int64_t> done[cached_devices] = {};  // 1: set
  std::int64_t v = 0;
  return once_per_device(done, device, v, [bytes](std::int64_t& out) {
    out = 1;
    return cudaFuncSetAttribute(run_body<Body>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                static_cast<int>(bytes));
  });
}

/// detail/pipeline.hpp's executor: enqueues on `stream`, keeps the first error
/// and enqueues nothing after it. Block sizes, grids and the shared-memory rule
/// are launch_policy's, the launch plan's (launch_plan.hpp).
struct device_exec : launch_policy {
  cudaStream_t stream = nullptr;
  cudaError_t status = cudaSuccess;
  int device = 0;
  std::size_t smem_limit = default_shared;

  explicit device_exec(cudaStream_t s) : stream(s) {
    status = cudaGetDevice(&device);
    if (status == cudaSuccess) status = shared_optin(device, smem_limit);
  }

  [[nodiscard]] std::size_t max_shared() const noexcept { return smem_limit; }

  template <class Body>
  void launch(const Body& body, std::int64_t gx, std::int64_t gy, int nthreads, std::size_t smem) {
    if (status != cudaSuccess || gx <= 0 || gy <= 0) return;
    if (!fits(gx, gy, nthreads, smem, smem_limit)) {
      status = cudaErrorInvalidConfiguration;
      return;
    }
    if (smem > default_shared) {
      status = allow_shared<Body>(device, smem_limit);
      if (status != cudaSuccess) return;
    }
    // cudaLaunchKernelExC returns this launch's own error: cudaGetLastError after a
    // <<<>>> launch would also return (and clear) an error the caller's earlier
    // work left behind. On sm_90 the launch is programmatic (run_body waits for
    // the previous grid before anything else): the previous kernel triggers no
    // dependents early, so this one is launched as its blocks exit, which hides
    // the launch's latency and the memory flush; inside a CUDA graph the capture
    // keeps it as a programmatic edge.
    bool programmatic = false;
    status = programmatic_launch<Body>(device, programmatic);
    if (status != cudaSuccess) return;
    Body arg = body;
    void* args[] = {&arg};
    cudaLaunchAttribute attr[1]{};
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cudaLaunchConfig_t cfg{};
    cfg.gridDim = dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy));
    cfg.blockDim = dim3(static_cast<unsigned>(nthreads));
    cfg.dynamicSmemBytes = smem;
    cfg.stream = stream;
    cfg.attrs = attr;
    cfg.numAttrs = programmatic ? 1 : 0;
    status = cudaLaunchKernelExC(&cfg, reinterpret_cast<const void*>(&run_body<Body>), args);
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

/// begin_step's host checks: the shape, the workspace, the step's length and
/// span. Returns the step with its bounds and, when `workspace` is given, its
/// buffers laid out (nothing is enqueued). Errors: sparsevlm::error.
inline device_step check_begin(const step_shape& shape, index_t length, visual_span visual,
                               void* workspace, std::size_t bytes) {
  using sparsevlm::detail::concat;
  const pipeline::bounds b = bounds_of(shape);
  pipeline::buffers buf;
  const std::size_t need = pipeline::layout(b, nullptr, buf);
  SPARSEVLM_CHECK(bytes >= need, errc::invalid_argument, "workspace bytes",
                  concat(">= ", need, " (step_workspace_bytes)"), bytes);
  SPARSEVLM_CHECK(reinterpret_cast<std::uintptr_t>(workspace) % 256 == 0, errc::invalid_argument,
                  "workspace", "a 256-byte aligned device pointer (as cudaMalloc returns)",
                  "an unaligned one");
  SPARSEVLM_CHECK(length >= 1 && length <= shape.length, errc::shape_mismatch, "length",
                  concat("in [1, ", shape.length, "] (shape.length)"), length);
  sparsevlm::detail::check_span(visual, length, "length");
  SPARSEVLM_CHECK(visual.len <= shape.visual && length - visual.len <= b.text, errc::shape_mismatch,
                  "visual.len",
                  concat("<= ", shape.visual, " (shape.visual), with length − len <= ", b.text),
                  visual.len);
  if (workspace != nullptr) pipeline::layout(b, workspace, buf);
  return device_step{buf, b, length, visual, shape.hidden_dim};
}

/// Refuses arguments a kernel cannot dereference (check_device_pointer for each
/// {pointer, name}); returns the first failing query.
inline cudaError_t check_device_pointers(
    std::initializer_list<std::pair<const void*, const char*>> args) {
  for (const auto& [p, name] : args) {
    const cudaError_t e = check_device_pointer(p, name);
    if (e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

}  // namespace detail

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
  if (workspace == nullptr) {
    bytes = step_workspace_bytes(shape);
    return cudaSuccess;
  }
  const device_step st = detail::check_begin(shape, length, visual, workspace, bytes);
  detail::device_exec ex(stream);
  if (ex.status != cudaSuccess) return ex.status;
  detail::check_limits(st.bounds, ex.max_shared());
  step = st;
  detail::pipeline::reset(ex, st.buf);
  return ex.status;
}

namespace detail {

/// download's body; `values` false skips the scores and the merged rows (the
/// float outputs), leaving them empty in `out`.
inline cudaError_t download_step(const device_step& step, step_result& out, step_status& status,
                                 bool values, cudaStream_t stream) {
  const index_t N = step.visual.len, d = step.hidden_dim;
  const index_t T = pipeline::raters_bound(step.length, step.visual.start, N);
  const index_t s_max = step.bounds.s_max, c_max = step.bounds.c_max;
  const auto n_values = [&](index_t n) { return values ? static_cast<std::size_t>(n) : 0; };
  step_counts c{};
  std::vector<index_t> raters(static_cast<std::size_t>(T)), keep(static_cast<std::size_t>(N)),
      sequence(static_cast<std::size_t>(step.length)),
      offsets(static_cast<std::size_t>(c_max + 1)), members(static_cast<std::size_t>(s_max));
  std::vector<float> scores(n_values(N)), merged(n_values(c_max * d));
  cudaError_t e = cudaMemcpyAsync(&c, step.buf.counts, sizeof c, cudaMemcpyDeviceToHost, stream);
  const auto get = [&](auto& vec, const auto* src) {
    if (e == cudaSuccess && !vec.empty())
      e = cudaMemcpyAsync(vec.data(), src, vec.size() * sizeof(vec[0]), cudaMemcpyDeviceToHost,
                          stream);
  };
  get(raters, step.buf.raters);
  get(scores, step.buf.scores);
  get(keep, step.buf.keep);
  get(sequence, step.buf.sequence);
  get(offsets, step.buf.offsets);
  get(members, step.buf.members);
  get(merged, step.buf.merged);
  if (e == cudaSuccess) e = cudaStreamSynchronize(stream);
  if (e != cudaSuccess) return e;
  status = status_of(c);
  out = step_result{};
  out.rank = c.rank;
  out.keep_count = c.keep;
  out.recycled.dim = d;
  const auto first = [](const auto& vec, index_t n) {
    using V = std::decay_t<decltype(vec)>;
    const std::size_t k = std::min(vec.size(), static_cast<std::size_t>(n > 0 ? n : 0));
    return V(vec.begin(), vec.begin() + static_cast<std::ptrdiff_t>(k));
  };
  out.raters = first(raters, c.raters);
  if (c.length < 0) return cudaSuccess;  // after a flag, later stages may not have run
  out.scores = std::move(scores);
  out.keep = first(keep, c.keep);
  out.sequence = first(sequence, c.length);
  out.recycled.merged = first(merged, c.clusters * d);
  for (index_t q = 0; q < c.clusters; ++q)
    out.recycled.clusters.emplace_back(members.begin() + offsets[static_cast<std::size_t>(q)],
                                       members.begin() + offsets[static_cast<std::size_t>(q) + 1]);
  return cudaSuccess;
}

}  // namespace detail

/// Reads a finished step back into a host result (synchronous: one
/// cudaStreamSynchronize on `stream`; for tests, tools and bindings, not the hot
/// path). Every output is copied at its bound (the counts are on the device, and
/// waiting for them first would be a second synchronisation), then trimmed to the
/// counts. `status` receives the device flags (status.raise() throws them).
/// After a flagged error, `out` holds the raters and counts read so far and
/// empty lists (scores included: the kernel that would have written them may
/// not have run).
inline cudaError_t download(const device_step& step, step_result& out, step_status& status,
                            cudaStream_t stream) {
  return detail::download_step(step, out, status, true, stream);
}

/// download without the float outputs: raters, rank, keep set, clusters and
/// sequence (O(n) integers), with `out.scores` and `out.recycled.merged` left
/// empty; what the host needs to lay out the next layer (cuda::prune_layer).
/// One cudaStreamSynchronize on `stream`.
inline cudaError_t download_decisions(const device_step& step, step_result& out,
                                      step_status& status, cudaStream_t stream) {
  return detail::download_step(step, out, status, false, stream);
}

}  // namespace sparsevlm::cuda
