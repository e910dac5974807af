// Instantiates every kernel of the CUDA backend (both step forms, the three
// element types, the plan's gathers, the paged compaction) for the PTX
// comparison of tests/cuda/ptx_flags.cmake: compiled to PTX only, never run.
#include <sparsevlm/cuda/kv_cache.cuh>
#include <sparsevlm/cuda/step.cuh>

namespace sv = sparsevlm;

template <class T>
void probe(const sv::step_options& opt, void* ws, std::size_t& bytes, sv::cuda::device_step& st,
           cudaStream_t s) {
  sv::step_inputs<T, T, T> in{};
  sv::cuda::prune_step_async(in, opt, ws, bytes, st, nullptr, s);
  sv::step_inputs_qk<T, T, T, T> qk{};
  sv::cuda::prune_step_async(qk, opt, ws, bytes, st, nullptr, s);
  sv::cuda::apply_plan_async(st, sv::matrix_view<const T>(), sv::matrix_view<T>(), s);
  sv::cuda::apply_plan_kv_async(st, sv::tensor3_view<const T>(), sv::tensor3_view<T>(), s);
  sv::cuda::compact_paged_kv_async(static_cast<const sv::index_t*>(nullptr), 0,
                                   sv::strided_view<T, 4>(), sv::page_layout::blocks_tokens_heads_dim,
                                   static_cast<const std::int32_t*>(nullptr), 0,
                                   sv::tensor3_view<const T>(), ws, bytes, s);
}

/// The batched chains of prune_batch_async (detail::batched), in the engines' type.
template <class In>
void probe_batch(const sv::step_options& opt, void* ws, std::size_t& bytes,
                 sv::cuda::device_step& st, cudaStream_t s) {
  const In in{};
  sv::cuda::prune_batch_async(std::span<const In>(&in, 1), std::span<const sv::step_options>(&opt, 1),
                              ws, bytes, std::span<sv::cuda::device_step>(&st, 1), nullptr, s);
}

void probe_all(const sv::step_options& opt, void* ws, std::size_t& bytes,
               sv::cuda::device_step& st, cudaStream_t s) {
  probe_batch<sv::step_inputs<sv::bfloat16, sv::bfloat16, sv::bfloat16>>(opt, ws, bytes, st, s);
  probe_batch<sv::step_inputs_qk<sv::bfloat16, sv::bfloat16, sv::bfloat16, sv::bfloat16>>(opt, ws, bytes,
                                                                                        st, s);
  probe<float>(opt, ws, bytes, st, s);
  probe<sv::half>(opt, ws, bytes, st, s);
  probe<sv::bfloat16>(opt, ws, bytes, st, s);
  sv::cuda::pruned_positions_async(st, sv::matrix_view<const sv::index_t>(),
                                   sv::position_policy{}, sv::matrix_view<sv::index_t>(), s);
}
