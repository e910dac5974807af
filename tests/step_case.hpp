// The shared spec cases as plain arrays, and the CPU step on copies of them in
// any element type: what the CUDA backend's tests compare against. Declared
// here, defined in step_case.cpp (host compiler: it reads the case files), so
// that nvcc-compiled tests can use it without compiling nlohmann/json.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include <sparsevlm/dtype.hpp>
#include <sparsevlm/types.hpp>
#include <sparsevlm/view.hpp>

namespace svt {

using sparsevlm::index_t;

/// `v` converted to T (float, half or bfloat16), element by element (inline and
/// doctest-free, so the nvcc-compiled tests share it).
template <class T>
std::vector<T> converted(const std::vector<float>& v) {
  std::vector<T> out(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) out[i] = sparsevlm::from_float<T>(v[i]);
  return out;
}

/// One case, every array as float32 values (float16 files are widened exactly).
struct flat_case {
  std::string name;
  index_t L = 0, S = 0, N = 0, H = 0, de = 0, d = 0;
  index_t Hkv = 0, dh = 0;  ///< 0 without q/k
  std::vector<float> embeds, attn, hidden, q, k;
  std::optional<std::vector<index_t>> raters;
  sparsevlm::step_options options;
  [[nodiscard]] bool has_qk() const { return dh > 0; }
};

/// The element type a test copies a case into.
enum class elem { f32, f16, bf16 };
const char* elem_name(elem e);

/// Every case folder under `dir` (sorted by name); empty when `dir` does not exist.
std::vector<flat_case> load_flat_cases(const std::string& dir);

/// Steps generated in the tree to the spec's shapes (shared/spec/case-format.md),
/// from fixed seeds, so that the tests that compare a backend with prune_step have
/// cases without ../shared: prefixes, GQA, both keep policies, recycling on and
/// off, caller raters. The attention is the causal softmax of q·kᵀ·scale per
/// head (kv head h / (H / Hkv)), so both score forms are present. A draw is kept
/// only when the keep boundary clears the spec's margin (the kept and the
/// dropped scores at least 1e-6 apart, as tools/crosscheck rejects); the rank and
/// DPC-KNN margins are not checked (the tests compare bits, which no margin
/// changes).
std::vector<flat_case> synthetic_cases();
/// Seeded steps at LLaVA-1.5's and LLaVA-NeXT's token counts (small H and d), for the
/// CPU-thread runs of the device kernels at those grids.
std::vector<flat_case> model_shape_cases();
/// A seeded step at a video's token count (8 × 576 visual tokens), for the GPU
/// test (the CPU-thread emulation of its 1,383 recycled rows would take minutes).
std::vector<flat_case> video_shape_cases();

/// prune_step on the CPU with embeds, attention (or q/k) and hidden converted
/// to `e` (round to nearest even), scoring from q/k when `qk`.
sparsevlm::step_result cpu_step(const flat_case& c, elem e, bool qk);

/// The values a case array holds after conversion to `e` (as float32).
std::vector<float> rounded(const std::vector<float>& v, elem e);

}  // namespace svt
