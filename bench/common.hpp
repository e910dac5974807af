// What the benchmarks share: model shapes, synthetic steps of those shapes in
// any element type, the step options, and the copy-bandwidth yardstick.
#pragma once

#include <benchmark/benchmark.h>
#include <sys/mman.h>
#include <unistd.h>

#include <array>
#include <cstdint>
#include <memory>
#include <new>
#include <string>
#include <vector>

#include <sparsevlm/sparsevlm.hpp>

#include "stage_timer.hpp"
#include "synthetic.hpp"

namespace sparsevlm::bench {

/// A model's pruning-layer shape: heads, prefix (system prompt) tokens, visual
/// tokens N, text tokens T, hidden size d (also the embedding size).
struct shape {
  const char* name;
  index_t heads, prefix, n_visual, n_text, dim;
  [[nodiscard]] index_t length() const { return prefix + n_visual + n_text; }
};

// Names carry N; the 7B, AnyRes and video shapes are also the N series (576, 2880,
// 4608, 9216 at the 7B heads and width), e.g.
// --benchmark_filter='BM_(step|stages)/(7b|anyres|video)[^/]*/f32/real_time'.
inline constexpr shape llava15_7b{"7b_n576", 32, 35, 576, 60, 4096};
inline constexpr shape llava15_13b{"13b_n576", 40, 35, 576, 60, 5120};
inline constexpr shape llava_next_anyres{"anyres_n2880", 32, 35, 2880, 60, 4096};
inline constexpr shape video_8x576{"video8_n4608", 32, 35, 8 * 576, 60, 4096};
inline constexpr shape video_16x576{"video16_n9216", 32, 35, 16 * 576, 60, 4096};
inline constexpr std::array<shape, 5> shapes{llava15_7b, llava15_13b, llava_next_anyres,
                                             video_8x576, video_16x576};

/// Short names of the element types, for benchmark names.
template <class T>
constexpr const char* type_tag() {
  if constexpr (std::is_same_v<T, float>) return "f32";
  if constexpr (std::is_same_v<T, half>) return "f16";
  return "bf16";
}

/// The authors' LLaVA-1.5 setting for a 192-token budget: the rank policy
/// keep = floor(13.5·rank), recycling fraction 0.3, cluster divisor 10. The
/// synthetic attention mixes 14 visual topics, so P has rank 14 and the step
/// keeps 189 tokens at every shape and element type (benchmark labels show the
/// rank and keep count), as the demo step does: the work per step differs
/// between shapes only through N, not through the policy. Recycling then merges
/// s = floor(0.3·(N − 189)) + 1 pruned tokens into floor(s/10) + 1 clusters.
inline step_options options() {
  step_options o;
  o.policy = keep_policy::rank(13.5, 0.0);
  o.recycle = recycle_options{true, 0.3, 10.0};
  return o;
}

/// An anonymous private mapping reserved with MAP_NORESERVE and PROT_NONE: a page
/// costs memory only once it is written, and only ranges passed to open() can be
/// touched at all, so a step that read any other row would fault rather than
/// silently read zeros.
class sparse_buffer {
 public:
  explicit sparse_buffer(std::size_t bytes) : bytes_(bytes) {
    void* p = mmap(nullptr, bytes_, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) throw std::bad_alloc();
    data_ = static_cast<char*>(p);
  }
  ~sparse_buffer() { munmap(data_, bytes_); }
  sparse_buffer(const sparse_buffer&) = delete;
  sparse_buffer& operator=(const sparse_buffer&) = delete;

  [[nodiscard]] char* data() const noexcept { return data_; }

  /// Makes [offset, offset + len) readable and writable (whole pages, so up to a
  /// page either side comes with it; those bytes read as zero).
  void open(std::size_t offset, std::size_t len) {
    const std::size_t page = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
    const std::size_t lo = offset / page * page;
    const std::size_t hi = std::min(bytes_, (offset + len + page - 1) / page * page);
    if (mprotect(data_ + lo, hi - lo, PROT_READ | PROT_WRITE) != 0) throw std::bad_alloc();
  }

 private:
  char* data_ = nullptr;
  std::size_t bytes_ = 0;
};

/// A synthetic step (examples/synthetic.hpp, seed 2410: at the 7B shape in
/// float32 it is exactly the demo's step) with all three tensors in T.
///
/// The attention [H, L, L] is a sparse_buffer in which only the text rows of each
/// head are written: the raters are text tokens, and scoring reads nothing but
/// the rater rows' visual columns, so these rows are all a step can read. At the
/// 16 × 576 video shape that is 32·60·9311 values (72 MB in float32) resident
/// of the 11 GB the whole matrix would take.
template <class T>
struct step_data {
  shape sh;
  sparse_buffer attn;
  std::vector<T> embeds, hidden;  ///< [L, d]

  explicit step_data(const shape& s)
      : sh(s),
        attn(static_cast<std::size_t>(s.heads * s.length() * s.length()) * sizeof(T)),
        embeds(static_cast<std::size_t>(s.length() * s.dim)),
        hidden(static_cast<std::size_t>(s.length() * s.dim)) {
    const index_t L = s.length(), d = s.dim, first_text = s.prefix + s.n_visual;
    const std::size_t row_bytes = static_cast<std::size_t>(L) * sizeof(T);
    for (index_t h = 0; h < s.heads; ++h)
      attn.open(static_cast<std::size_t>(h * L + first_text) * row_bytes,
                static_cast<std::size_t>(s.n_text) * row_bytes);
    examples::synthetic_step g;
    g.heads = s.heads;
    g.prefix = s.prefix;
    g.n_visual = s.n_visual;
    g.n_text = s.n_text;
    g.dim = s.dim;
    const auto rows = [d](std::vector<T>& dst) {
      return [&dst, d](index_t t, const float* row) {
        for (index_t k = 0; k < d; ++k) dst[static_cast<std::size_t>(t * d + k)] = from_float<T>(row[k]);
      };
    };
    T* a = attn_data();
    examples::generate(2410, g, false, rows(embeds), rows(hidden),
                       [&](index_t h, index_t t, const float* row) {
                         T* dst = a + (h * L + t) * L;
                         for (index_t j = 0; j <= t; ++j) dst[j] = from_float<T>(row[j]);
                       });
  }

  [[nodiscard]] T* attn_data() const { return reinterpret_cast<T*>(attn.data()); }

  [[nodiscard]] step_inputs<T, T, T> inputs() const {
    const index_t L = sh.length();
    return {matrix_view<const T>(embeds.data(), {L, sh.dim}, "embeds"),
            tensor3_view<const T>(attn_data(), {sh.heads, L, L}, "attn"),
            matrix_view<const T>(hidden.data(), {L, sh.dim}, "hidden"),
            visual_span{sh.prefix, sh.n_visual}, std::nullopt};
  }
};

namespace detail {
// One step's data at a time (the largest holds ~0.4 GB resident): benchmarks are
// registered shape by shape, so each is generated once per run.
inline std::shared_ptr<void> held;
inline std::string held_key;
}  // namespace detail

/// The synthetic step of `s` in T, generated on first use and kept until a
/// benchmark asks for another shape or type.
template <class T>
const step_data<T>& data_for(const shape& s) {
  const std::string key = std::string(s.name) + "/" + type_tag<T>();
  if (detail::held_key != key) {
    detail::held.reset();  // free the last one first: never two large steps at once
    detail::held_key.clear();
    detail::held = std::make_shared<step_data<T>>(s);
    detail::held_key = key;
  }
  return *static_cast<const step_data<T>*>(detail::held.get());
}

/// The copy bandwidth main() measured before running the benchmarks (bytes read
/// plus written per second, examples::copy_bandwidth, wall clock); 0 if it did not.
inline double copy_bw = 0.0;

/// The bandwidth counters of a benchmark that must touch `bytes` per iteration:
/// `bytes`, `GB/s` (bytes over the benchmark's own time), `probe_GB/s`, and
/// `x_of_limit` = time / (bytes / probe bandwidth), how many times slower than
/// moving those bytes once at the copy bandwidth (1 is the floor).
inline void report_bandwidth(benchmark::State& state, double bytes) {
  using C = benchmark::Counter;
  state.counters["bytes"] = C(bytes, C::kDefaults, C::kIs1024);
  state.counters["GB/s"] = C(bytes * 1e-9, C::kIsIterationInvariantRate);
  state.counters["probe_GB/s"] = copy_bw * 1e-9;
  // kInvert of a rate: (per-iteration time) / value.
  if (copy_bw > 0.0)
    state.counters["x_of_limit"] = C(bytes / copy_bw, C::kIsIterationInvariantRate | C::kInvert);
}

/// The instruction set the step kernels use now, for benchmark labels.
inline std::string isa_label() { return cpu::isa_name(cpu::active_isa()); }

}  // namespace sparsevlm::bench
