// docs/cuda.md's usage example, compiled so that it cannot rot: one pruning
// step on the GPU the way an engine runs it (workspace sized once, everything
// stream-ordered, the new length read from a pinned slot after an event), then
// the same step on the CPU for comparison. Exits 77 (skipped) without a GPU, 1 when
// one is there but unusable (cuda_device.hpp).
#include <cuda_runtime.h>

#include <cstdio>
#include <vector>

#include <sparsevlm/cuda/step.cuh>

#include "cuda_device.hpp"
#include "synthetic.hpp"

#define CHECK_CUDA(expr)                                                                  \
  do {                                                                                    \
    const cudaError_t e_ = (expr);                                                        \
    if (e_ != cudaSuccess) {                                                              \
      std::fprintf(stderr, "%s: %s\n", #expr, cudaGetErrorString(e_));                     \
      return 1;                                                                           \
    }                                                                                     \
  } while (0)

int main() {
  using namespace sparsevlm;
  if (const int status = examples::cuda_device_status(); status != 0) return status;
  examples::synthetic_step shape;
  shape.heads = 8;
  shape.prefix = 10;
  shape.n_visual = 144;
  shape.n_text = 20;
  shape.dim = 256;
  const examples::synthetic_step s = examples::synthesise(7, shape);
  const index_t H = s.heads, L = s.length(), d = s.dim, prefix_len = s.prefix, n_visual = s.n_visual;
  float *embeds = nullptr, *attn = nullptr, *hidden = nullptr, *hidden_out = nullptr;
  CHECK_CUDA(cudaMalloc(reinterpret_cast<void**>(&embeds), s.embeds.size() * sizeof(float)));
  CHECK_CUDA(cudaMalloc(reinterpret_cast<void**>(&attn), s.attn.size() * sizeof(float)));
  CHECK_CUDA(cudaMalloc(reinterpret_cast<void**>(&hidden), s.hidden.size() * sizeof(float)));
  CHECK_CUDA(cudaMalloc(reinterpret_cast<void**>(&hidden_out), s.hidden.size() * sizeof(float)));
  CHECK_CUDA(cudaMemcpy(embeds, s.embeds.data(), s.embeds.size() * sizeof(float), cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(attn, s.attn.data(), s.attn.size() * sizeof(float), cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(hidden, s.hidden.data(), s.hidden.size() * sizeof(float), cudaMemcpyHostToDevice));
  cudaStream_t stream = nullptr;
  cudaEvent_t done = nullptr;
  index_t* new_len = nullptr;  // pinned: the one value the host reads
  CHECK_CUDA(cudaStreamCreate(&stream));
  CHECK_CUDA(cudaEventCreateWithFlags(&done, cudaEventDisableTiming));
  CHECK_CUDA(cudaMallocHost(reinterpret_cast<void**>(&new_len), sizeof(index_t)));

  // --- docs/cuda.md snippet begins
  step_inputs<float, float, float> in{                // views over DEVICE memory
      matrix_view<const float>(embeds, {L, d}),        // input embeddings [L, d]
      tensor3_view<const float>(attn, {H, L, L}),      // the layer's attention [H, L, L]
      matrix_view<const float>(hidden, {L, d}),        // the layer's output [L, d]
      visual_span{prefix_len, n_visual}, std::nullopt};
  step_options opt;                                    // rank policy 13.5/0, recycling 0.3/10
  // Once per model shape: the workspace size query, then one allocation.
  std::size_t bytes = 0;
  cuda::device_step step;
  CHECK_CUDA(cuda::prune_step_async(in, opt, nullptr, bytes, step, nullptr, stream));
  void* ws = nullptr;
  CHECK_CUDA(cudaMalloc(&ws, bytes));
  // Per step: all stream-ordered, no synchronisation, no allocation.
  CHECK_CUDA(cuda::prune_step_async(in, opt, ws, bytes, step, new_len, stream));
  CHECK_CUDA(cuda::apply_plan_async(step, in.hidden, matrix_view<float>(hidden_out, {L, d}), stream));
  CHECK_CUDA(cudaEventRecord(done, stream));
  // ... the engine queues more work; when it needs the count:
  CHECK_CUDA(cudaEventSynchronize(done));
  const index_t n = *new_len;  // rows [0, n) of hidden_out are the new sequence (-1: NaN/Inf input)
  // --- docs/cuda.md snippet ends

  const step_result cpu = prune_step(
      step_inputs<float, float, float>{matrix_view<const float>(s.embeds.data(), {L, d}),
                                       tensor3_view<const float>(s.attn.data(), {H, L, L}),
                                       matrix_view<const float>(s.hidden.data(), {L, d}),
                                       visual_span{prefix_len, n_visual}, std::nullopt},
      opt);
  step_result gpu;
  cuda::step_status status;
  CHECK_CUDA(cuda::download(step, gpu, status, stream));
  const bool same = status.ok() && gpu.keep == cpu.keep && gpu.recycled.clusters == cpu.recycled.clusters &&
                    gpu.sequence == cpu.sequence && n == static_cast<index_t>(cpu.sequence.size());
  std::printf("GPU: kept %lld of %lld visual tokens, %zu clusters; sequence %lld -> %lld tokens (%s the CPU)\n",
              static_cast<long long>(gpu.keep_count), static_cast<long long>(n_visual),
              gpu.recycled.clusters.size(), static_cast<long long>(L), static_cast<long long>(n),
              same ? "same as" : "DIFFERENT from");
  cudaFree(ws);
  cudaFree(embeds);
  cudaFree(attn);
  cudaFree(hidden);
  cudaFree(hidden_out);
  cudaFreeHost(new_len);
  cudaEventDestroy(done);
  cudaStreamDestroy(stream);
  return same ? 0 : 1;
}
