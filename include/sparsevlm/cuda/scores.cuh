// Stages 2-3 on the device: the relevance matrix P and the scores, from the
// attention probabilities (scores.hpp) or from queries and keys (scores_qk.hpp).
#pragma once

#include <cmath>

#include "../scores_qk.hpp"
#include "common.cuh"

namespace sparsevlm::cuda {

namespace detail {
inline void check_scoring(const score_options& o) {
  SPARSEVLM_CHECK(o.top_heads == 0, errc::invalid_argument, "scoring.top_heads",
                  "0 (the CUDA backend averages all heads)", o.top_heads);
  SPARSEVLM_CHECK(!o.gravity.enabled, errc::invalid_argument, "scoring.gravity.enabled",
                  "false (the CUDA backend has no RoPE gravity correction)", "true");
}

/// relevance_scores_async's host checks.
template <class TA>
void check_attn(const device_step& step, tensor3_view<const TA> attn, const score_options& opt) {
  check_scoring(opt);
  SPARSEVLM_CHECK(attn.extent(0) >= 1, errc::shape_mismatch, "attn.extent[0] (heads)", ">= 1",
                  attn.extent(0));
  SPARSEVLM_CHECK(attn.extent(1) == step.length && attn.extent(2) == step.length,
                  errc::shape_mismatch, "attn",
                  sparsevlm::detail::concat("[H, ", step.length, ", ", step.length, "]"),
                  sparsevlm::detail::concat("[", attn.extent(0), ", ", attn.extent(1), ", ",
                                            attn.extent(2), "]"));
}

/// relevance_scores_qk_async's host checks, and the q/k arguments of its kernels.
template <class TQ, class TK>
pipeline::qk_args<TQ, TK> qk_args_of(const device_step& step, const qk_view<TQ, TK>& qk,
                                     const score_options& opt) {
  check_scoring(opt);
  const index_t H = qk.q.extent(0), Lq = qk.q.extent(1), dh = qk.q.extent(2);
  const index_t Hkv = qk.k.extent(0), L = qk.k.extent(1);
  SPARSEVLM_CHECK(step.bounds.qk && H <= step.bounds.heads, errc::invalid_argument,
                  "q.extent[0] (heads)",
                  sparsevlm::detail::concat("<= ", step.bounds.heads,
                                            " with shape.head_dim > 0 (the workspace's q/k buffers)"),
                  H);
  sparsevlm::detail::check_qk_heads(qk);  // scores_qk.hpp's rules
  SPARSEVLM_CHECK(L == step.length, errc::shape_mismatch, "k.extent[1]",
                  sparsevlm::detail::concat(step.length, " (the step's length)"), L);
  // q may hold only the rater rows; their count R is on the device, so only
  // the all-rows form is checked exactly (R <= T is all the host knows).
  const index_t T = step.length - step.visual.end();
  SPARSEVLM_CHECK(Lq == L || Lq <= T, errc::shape_mismatch, "q.extent[1]",
                  sparsevlm::detail::concat(L, " (all queries) or R <= ", T, " (the rater rows)"), Lq);
  SPARSEVLM_CHECK(std::isfinite(qk.scale) && qk.scale >= 0.0, errc::invalid_argument, "scale",
                  "a finite number >= 0 (0: 1/sqrt(dh))", qk.scale);
  if (qk.lse) {
    SPARSEVLM_CHECK(qk.lse->extent(0) == H && qk.lse->extent(1) == Lq, errc::shape_mismatch, "lse",
                    sparsevlm::detail::concat("[", H, ", ", Lq, "]"),
                    sparsevlm::detail::concat("[", qk.lse->extent(0), ", ", qk.lse->extent(1), "]"));
  }
  pipeline::qk_args<TQ, TK> a;
  a.q = rows_of(qk.q);
  a.k = rows_of(qk.k);
  a.heads = H;
  a.kv_heads = Hkv;
  a.head_dim = dh;
  a.length = L;
  a.all_queries = Lq == L;
  a.q_rows = Lq;
  // As relevance_scores_qk rounds it.
  a.scale = qk.scale > 0.0 ? static_cast<float>(qk.scale)
                           : 1.0f / std::sqrt(static_cast<float>(dh));
  if (qk.lse) {
    a.lse = qk.lse->data();
    a.lse_s0 = qk.lse->stride(0);
    a.lse_s1 = qk.lse->stride(1);
  }
  return a;
}

/// The q, k and lse pointers a kernel will read.
template <class TQ, class TK>
cudaError_t check_qk_pointers(const qk_view<TQ, TK>& qk) {
  return check_device_pointers({{qk.q.data(), "q"},
                                {qk.k.data(), "k"},
                                {qk.lse ? static_cast<const void*>(qk.lse->data()) : nullptr, "lse"}});
}

}  // namespace detail

/// P[r][j] = (Σ_h attn[h][raters[r]][S+j]) / H and score[j] = (Σ_r P[r][j]) / R,
/// float32, heads then raters in order: one thread per visual token does the
/// sums of its column, so the bits are relevance_scores's. Fused: reads only
/// the rater rows' visual columns, H·R·N values, and never forms the head mean.
///
/// - `attn`: [H, L, L] float32/float16/bfloat16 in device memory, any strides.
/// - `opt`: only the spec's plain mean (top_heads = 0, no gravity).
/// - Errors: sparsevlm::error for extents or options; a NaN/Inf score raises
///   non_finite_scores on the device.
template <class TA>
cudaError_t relevance_scores_async(const device_step& step, tensor3_view<const TA> attn,
                                   const score_options& opt, cudaStream_t stream) {
  detail::check_attn(step, attn, opt);
  if (const cudaError_t e = detail::check_device_pointer(attn.data(), "attn"); e != cudaSuccess)
    return e;
  detail::device_exec ex(stream);
  if (ex.status != cudaSuccess) return ex.status;
  detail::pipeline::scores_attention(ex, detail::rows_of(attn), attn.extent(0), step.visual.start,
                                   step.visual.len, step.buf);
  return ex.status;
}

/// The same from queries and keys (scores_qk.hpp's relevance_scores_qk): the
/// rater rows' logits against keys 0..(last rater) as canonical float32 dot
/// products, z = double(scale·logit), the causal softmax in double (max, then
/// Σ exp in key order in one thread; or the engine's LSE), then P and the scores
/// as above. Nothing of size L² is formed: H·T·L floats of workspace.
///
/// - `qk`: q [H, L or R, dh], k [Hkv, L, dh] (H % Hkv == 0), optional lse [H, Lq]
///   float32 (natural log), all in device memory, any strides.
/// - exp is the library's own (core/exp.hpp), as on the CPU: the same
///   probabilities, bit for bit.
/// - Errors: sparsevlm::error for extents, head counts beyond the workspace's
///   shape, or options; NaN/Inf logits or LSE raise non_finite_scores.
template <class TQ, class TK>
cudaError_t relevance_scores_qk_async(const device_step& step, const qk_view<TQ, TK>& qk,
                                      const score_options& opt, cudaStream_t stream) {
  const detail::pipeline::qk_args<TQ, TK> a = detail::qk_args_of(step, qk, opt);
  if (const cudaError_t e = detail::check_qk_pointers(qk); e != cudaSuccess) return e;
  detail::device_exec ex(stream);
  if (ex.status != cudaSuccess) return ex.status;
  detail::pipeline::scores_qk(
      ex, a, step.visual.start, step.visual.len,
      detail::pipeline::raters_bound(step.length, step.visual.start, step.visual.len), step.buf);
  return ex.status;
}

}  // namespace sparsevlm::cuda
