// The GPU benchmarks' inputs, made on the host (cuda_data.cpp, compiled by the
// host compiler: it includes the CPU library and examples/synthetic.hpp), as
// plain float32 arrays that bench_cuda.cu uploads in any element type.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace sparsevlm::bench::gpu {

/// A model shape of common.hpp (heads, prefix, visual N, text T, width d).
struct shape {
  std::string name;
  std::int64_t heads, prefix, n_visual, n_text, dim;
  [[nodiscard]] std::int64_t length() const { return prefix + n_visual + n_text; }
};

/// common.hpp's shapes, in its order: 7B, 13B, AnyRes, video 8×576, 16×576.
std::vector<shape> shapes();

/// The synthetic step of common.hpp (examples::generate, seed 2410) as float32:
/// embeds and hidden [L, d]; of the attention only the text rows, which are all
/// a step reads: attn_text[h][t − (S + N)][·] = attn[h][t][·], [H, T, L].
struct step {
  shape sh;
  std::vector<float> embeds, hidden, attn_text;
};
step make_step(const shape& s);

/// What the CPU decides on that step (float32), for the labels: R, rank, keep,
/// recycled rows and clusters.
std::string cpu_label(const step& s);

}  // namespace sparsevlm::bench::gpu
