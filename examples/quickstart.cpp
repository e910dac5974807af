// The README's usage example, compiled so that it cannot rot: prune one step of
// a small synthetic sequence with float16 attention, then compact the hidden
// states in place.
#include <cstdio>
#include <vector>

#include <sparsevlm/sparsevlm.hpp>

#include "synthetic.hpp"

int main() {
  using namespace sparsevlm;
  examples::synthetic_step shape;
  shape.heads = 8;
  shape.prefix = 10;
  shape.n_visual = 144;
  shape.n_text = 20;
  shape.dim = 256;
  examples::synthetic_step s = examples::synthesise(7, shape);
  const index_t H = s.heads, L = s.length(), d = s.dim, prefix_len = s.prefix, n_visual = s.n_visual;
  std::vector<half> attn16;
  for (float v : s.attn) attn16.push_back(to_half(v));
  const float* embeds = s.embeds.data();
  const half* attn = attn16.data();
  float* hidden = s.hidden.data();

  // --- README snippet begins
  step_inputs<float, half, float> in{
      matrix_view<const float>(embeds, {L, d}),      // input embeddings [L, d]
      tensor3_view<const half>(attn, {H, L, L}),     // the layer's attention [H, L, L]
      matrix_view<const float>(hidden, {L, d}),      // the layer's output [L, d]
      visual_span{prefix_len, n_visual}, std::nullopt};
  step_options opt;                                  // rank policy 13.5/0, recycling 0.3/10
  workspace ws;                                      // reuse across steps
  step_result r = prune_step(in, opt, ws);
  // r.keep, r.recycled.clusters, r.recycled.merged, r.sequence ...
  const index_t c = static_cast<index_t>(r.recycled.clusters.size());
  const index_t new_len = apply_plan_inplace(r.sequence, matrix_view<float>(hidden, {L, d}),
                                             matrix_view<const float>(r.recycled.merged.data(), {c, d}));
  // --- README snippet ends

  std::printf("kept %lld of %lld visual tokens, %lld recycled; sequence %lld -> %lld tokens\n",
              static_cast<long long>(r.keep_count), static_cast<long long>(n_visual),
              static_cast<long long>(c), static_cast<long long>(L), static_cast<long long>(new_len));
  return new_len == static_cast<index_t>(r.sequence.size()) ? 0 : 1;
}
