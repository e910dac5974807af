// See cuda_step.hpp.
#include "cuda_step.hpp"

#include <bit>
#include <optional>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

#include <sparsevlm/cuda/kv_cache.cuh>
#include <sparsevlm/cuda/step.cuh>
#include <sparsevlm/dlpack.hpp>

namespace sparsevlm_py {
namespace {

namespace sv = sparsevlm;
using sv::index_t;

void cuda_check(cudaError_t e, const char* call) {
  if (e != cudaSuccess)
    throw std::runtime_error(std::string("CUDA: ") + call + " failed: " + cudaGetErrorString(e));
}

// Device scratch kept per thread and device between calls, grown when a step needs
// more: a cudaMalloc/cudaFree per call would synchronise the device each time.
// Reused on any stream: every call waits for its stream before it returns, on
// its error paths too (finish_or_wait), so no earlier call's work is pending on
// a buffer; not keyed by stream, so a server that makes a stream per request
// does not grow one buffer per stream.
class scratch {
 public:
  static void* get(int device, int slot, std::size_t bytes) {
    thread_local scratch cache;
    return cache.take(device, slot, bytes);
  }
  ~scratch() {
    for (auto& e : entries_) cudaFree(e.p);  // may fail at process exit; nothing to do then
  }

 private:
  struct entry {
    int device, slot;
    void* p;
    std::size_t bytes;
  };
  void* take(int device, int slot, std::size_t bytes) {
    if (bytes == 0) return nullptr;
    for (auto& e : entries_) {
      if (e.device != device || e.slot != slot) continue;
      if (e.bytes >= bytes) return e.p;
      // Grown to the next power of two: a run of growing shapes reallocates (and
      // synchronises the device in cudaFree) O(log) times, not once per step.
      const std::size_t grown = std::bit_ceil(bytes);
      cuda_check(cudaFree(e.p), "cudaFree");
      e.p = nullptr;
      e.bytes = 0;
      cuda_check(cudaMalloc(&e.p, grown), "cudaMalloc");
      e.bytes = grown;
      return e.p;
    }
    void* p = nullptr;
    cuda_check(cudaMalloc(&p, bytes), "cudaMalloc");
    entries_.push_back({device, slot, p, bytes});
    return p;
  }
  std::vector<entry> entries_;
};
enum : int { workspace_slot = 0, raters_slot = 1, paged_sequence_slot = 2, paged_table_slot = 3,
             paged_workspace_slot = 4 };

// Makes the arrays' device current for the call, and restores the caller's.
struct device_guard {
  int previous = -1;
  explicit device_guard(int ordinal) {
    cuda_check(cudaGetDevice(&previous), "cudaGetDevice");
    if (ordinal >= 0 && ordinal != previous) cuda_check(cudaSetDevice(ordinal), "cudaSetDevice");
  }
  ~device_guard() {
    if (previous >= 0) cudaSetDevice(previous);
  }
  device_guard(const device_guard&) = delete;
  device_guard& operator=(const device_guard&) = delete;
};

// The one device all arrays live on (managed memory: any).
int common_device(const device_step_arrays& a) {
  int ordinal = -1;
  const std::pair<const DLTensor*, const char*> all[] = {
      {a.hidden, "hidden"}, {a.attn, "attn"}, {a.q, "q"}, {a.k, "k"}, {a.lse, "lse"}, {a.embeds, "embeds"}};
  for (const auto& [t, name] : all) {
    if (t == nullptr) continue;
    const int o = sv::check_device(*t, name, sv::device_kind::cuda);
    if (o < 0) continue;
    SPARSEVLM_CHECK(ordinal < 0 || o == ordinal, sv::errc::invalid_argument,
                    sv::detail::concat(name, ".device"),
                    sv::detail::concat("cuda:", ordinal, " (where hidden is)"),
                    sv::dl_device_name(t->device));
    ordinal = o;
  }
  return ordinal;
}

// Runs `work` (which enqueues on `stream`); if it throws, waits for the stream
// before rethrowing, so that nothing it enqueued is still pending on the scratch
// when the next call takes it.
template <class Work>
auto finish_or_wait(cudaStream_t stream, Work&& work) {
  try {
    return work();
  } catch (...) {
    cudaStreamSynchronize(stream);  // its own error, if any, is the one thrown below
    throw;
  }
}

// Caller raters on their way to the device: the host positions and the scratch
// they are copied to (the step's raters span points there).
struct raters_upload {
  const std::vector<index_t>* host = nullptr;
  void* device = nullptr;
};

template <class Inputs>
sv::step_result run(const Inputs& in, const sv::step_options& opt, const raters_upload& up,
                    cudaStream_t stream) {
  std::size_t bytes = 0;
  sv::cuda::device_step step;
  cuda_check(sv::cuda::prune_step_async(in, opt, nullptr, bytes, step, nullptr, stream),
             "prune_step_async (size query)");
  int device = 0;
  cuda_check(cudaGetDevice(&device), "cudaGetDevice");
  void* ws = scratch::get(device, workspace_slot, bytes);
  // Every check (extents, options, device pointers) before the first enqueue.
  std::size_t checked = bytes;
  cuda_check(sv::cuda::detail::step_async(in, opt, ws, checked, step, nullptr, stream,
                                          sv::cuda::detail::step_upto::all_checks),
             "prune_step_async (checks)");
  return finish_or_wait(stream, [&] {
    if (up.host != nullptr && !up.host->empty())
      cuda_check(cudaMemcpyAsync(up.device, up.host->data(), up.host->size() * sizeof(index_t),
                                 cudaMemcpyHostToDevice, stream),
                 "cudaMemcpyAsync (raters)");
    // No synchronisation until download's one: the step and the copies are stream-ordered.
    cuda_check(sv::cuda::prune_step_async(in, opt, ws, bytes, step, nullptr, stream),
               "prune_step_async");
    sv::step_result r;
    sv::cuda::step_status status;
    cuda_check(sv::cuda::download(step, r, status, stream), "download");
    status.raise();
    return r;
  });
}

template <class T>
sv::step_result run_typed(const device_step_arrays& a, sv::visual_span visual,
                          std::optional<std::span<const index_t>> raters, const raters_upload& up,
                          const sv::step_options& opt, cudaStream_t stream) {
  constexpr auto cuda = sv::device_kind::cuda;
  const auto hidden = sv::view_of<const T, 2>(*a.hidden, "hidden", cuda);
  const auto embeds = a.embeds != nullptr ? sv::view_of<const T, 2>(*a.embeds, "embeds", cuda)
                                          : sv::matrix_view<const T>(nullptr, {0, 0}, "embeds");
  if (a.attn != nullptr) {
    const sv::step_inputs<T, T, T> in{embeds, sv::view_of<const T, 3>(*a.attn, "attn", cuda), hidden,
                                      visual, raters};
    return run(in, opt, up, stream);
  }
  std::optional<sv::matrix_view<const float>> lse;
  if (a.lse != nullptr) lse = sv::view_of<const float, 2>(*a.lse, "lse", cuda);
  const sv::qk_view<T, T> qk{sv::view_of<const T, 3>(*a.q, "q", cuda),
                             sv::view_of<const T, 3>(*a.k, "k", cuda), lse, a.scale};
  const sv::step_inputs_qk<T, T, T, T> in{embeds, qk, hidden, visual, raters};
  return run(in, opt, up, stream);
}

}  // namespace

sv::step_result cuda_prune_step(const device_step_arrays& a, sv::visual_span visual,
                                const std::vector<index_t>* raters, const sv::step_options& opt,
                                std::uintptr_t stream_handle) {
  const device_guard guard(common_device(a));
  const auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  // Caller raters go to the device (the launchers read them there), copied once
  // every check has passed (run).
  std::optional<std::span<const index_t>> raters_view;
  raters_upload up;
  if (raters != nullptr) {
    int device = 0;
    cuda_check(cudaGetDevice(&device), "cudaGetDevice");
    up.host = raters;
    up.device = scratch::get(device, raters_slot, raters->size() * sizeof(index_t));
    raters_view = std::span<const index_t>(static_cast<const index_t*>(up.device), raters->size());
  }
  const DLDataType dt = a.hidden->dtype;
  if (dt.code == kDLFloat && dt.bits == 16)
    return run_typed<sv::half>(a, visual, raters_view, up, opt, stream);
  if (dt.code == kDLBfloat && dt.bits == 16)
    return run_typed<sv::bfloat16>(a, visual, raters_view, up, opt, stream);
  return run_typed<float>(a, visual, raters_view, up, opt, stream);  // view_of refuses other dtypes
}

namespace {

template <class T, class U>
index_t compact_typed(sv::strided_view<T, 4> cache, sv::page_layout layout,
                      std::span<const index_t> seq, std::span<const index_t> table,
                      sv::tensor3_view<const U> rec, cudaStream_t stream) {
  // The CPU function's checks on the host copies first: a refused call enqueues
  // nothing, and its error is the CPU's (the device repeats them as a guard).
  const auto kv = sv::detail::check_paged_args(cache, layout, rec);
  sv::detail::throw_paged_fault(sv::detail::find_paged_fault(
      seq.data(), static_cast<index_t>(seq.size()), rec.extent(0), table.data(),
      static_cast<index_t>(table.size()), kv.extent(1), kv.extent(0)));
  int device = 0;
  cuda_check(cudaGetDevice(&device), "cudaGetDevice");
  const auto upload = [&](std::span<const index_t> host, int slot) -> const index_t* {
    const std::size_t bytes = host.size_bytes();
    void* dev = scratch::get(device, slot, bytes);
    if (bytes > 0)
      cuda_check(cudaMemcpyAsync(dev, host.data(), bytes, cudaMemcpyHostToDevice, stream),
                 "cudaMemcpyAsync (compact_paged_kv)");
    return static_cast<const index_t*>(dev);
  };
  const index_t n = static_cast<index_t>(seq.size());
  const std::size_t bytes = sv::cuda::compact_paged_kv_workspace_bytes<T>(n, kv.extent(2), kv.extent(3));
  void* ws = scratch::get(device, paged_workspace_slot, bytes);
  return finish_or_wait(stream, [&] {
    const index_t* seq_d = upload(seq, paged_sequence_slot);
    const index_t* table_d = upload(table, paged_table_slot);
    cuda_check(sv::cuda::compact_paged_kv_async(seq_d, n, cache, layout, table_d,
                                                static_cast<index_t>(table.size()), rec, ws, bytes,
                                                stream),
               "compact_paged_kv_async");
    sv::cuda::compact_status status;
    cuda_check(sv::cuda::download_compact_status(ws, status, stream), "download_compact_status");
    status.raise();
    return n;
  });
}

template <class T>
index_t compact_cache(const DLTensor& cache, sv::page_layout layout, std::span<const index_t> seq,
                      std::span<const index_t> table, const DLTensor* recycled,
                      cudaStream_t stream) {
  constexpr auto cuda = sv::device_kind::cuda;
  const auto kv = sv::view_of<T, 4>(cache, "cache", cuda);
  if (recycled == nullptr)
    return compact_typed(kv, layout, seq, table,
                         sv::tensor3_view<const T>(nullptr, {0, 0, 0}, "recycled"), stream);
  const DLDataType dt = recycled->dtype;
  if (dt.code == kDLFloat && dt.bits == 16)
    return compact_typed(kv, layout, seq, table,
                         sv::view_of<const sv::half, 3>(*recycled, "recycled", cuda), stream);
  if (dt.code == kDLBfloat && dt.bits == 16)
    return compact_typed(kv, layout, seq, table,
                         sv::view_of<const sv::bfloat16, 3>(*recycled, "recycled", cuda), stream);
  return compact_typed(kv, layout, seq, table,
                       sv::view_of<const float, 3>(*recycled, "recycled", cuda), stream);
}

}  // namespace

index_t cuda_compact_paged_kv(const DLTensor& cache, bool hnd, std::span<const index_t> sequence,
                              std::span<const index_t> block_table, const DLTensor* recycled,
                              std::uintptr_t stream_handle) {
  const int ordinal = sv::check_device(cache, "cache", sv::device_kind::cuda);
  if (recycled != nullptr) {
    const int o = sv::check_device(*recycled, "recycled", sv::device_kind::cuda);
    SPARSEVLM_CHECK(o < 0 || ordinal < 0 || o == ordinal, sv::errc::invalid_argument,
                    "recycled.device", sv::detail::concat("cuda:", ordinal, " (where cache is)"),
                    sv::dl_device_name(recycled->device));
  }
  const device_guard guard(ordinal);
  const auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const sv::page_layout layout =
      hnd ? sv::page_layout::blocks_heads_tokens_dim : sv::page_layout::blocks_tokens_heads_dim;
  const DLDataType dt = cache.dtype;
  if (dt.code == kDLFloat && dt.bits == 16)
    return compact_cache<sv::half>(cache, layout, sequence, block_table, recycled, stream);
  if (dt.code == kDLBfloat && dt.bits == 16)
    return compact_cache<sv::bfloat16>(cache, layout, sequence, block_table, recycled, stream);
  return compact_cache<float>(cache, layout, sequence, block_table, recycled, stream);  // view_of refuses others
}

sparsevlm::cpu::unit_build cuda_unit_build() noexcept { return SPARSEVLM_THIS_UNIT_BUILD; }

}  // namespace sparsevlm_py
