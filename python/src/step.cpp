// One pruning step from Python: prune_step (CPU arrays, or CUDA arrays through
// cuda_step.cu), the raters alone, tensor-parallel partial scores and the step
// from their sum, and applying a plan to hidden states and paged K/V.
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include <sparsevlm/kv_cache.hpp>
#include <sparsevlm/plan.hpp>
#include <sparsevlm/raters.hpp>
#include <sparsevlm/step.hpp>
#include <sparsevlm/tensor_parallel.hpp>

#include "arrays.hpp"
#include "module.hpp"

#ifdef SPARSEVLM_PYTHON_CUDA
#include "cuda_step.hpp"
#endif

namespace svpy {

namespace {
using namespace nb::literals;

// Raters from `embeds` over `visual` (select_raters), GIL released.
std::vector<index_t> raters_from(const array_in& embeds, sv::visual_span visual) {
  return visit<2>(embeds, "embeds", [&](auto e) {
    nb::gil_scoped_release unlocked;
    std::vector<index_t> r;
    sv::select_raters(e, visual, thread_workspace(), r);
    return r;
  });
}

// prune_step with caller raters (embeds are not read then), either input form.
template <class TA, class TH>
sv::step_result run_step(sv::tensor3_view<const TA> attn, sv::matrix_view<const TH> h,
                         sv::visual_span visual, const std::vector<index_t>& raters,
                         const sv::step_options& opt) {
  const sv::step_inputs<float, TA, TH> in{sv::matrix_view<const float>(nullptr, {0, 0}, "embeds"),
                                          attn, h, visual, std::span<const index_t>(raters)};
  return sv::prune_step(in, opt, thread_workspace());
}
template <class TQ, class TK, class TH>
sv::step_result run_step(const sv::qk_view<TQ, TK>& qk, sv::matrix_view<const TH> h,
                         sv::visual_span visual, const std::vector<index_t>& raters,
                         const sv::step_options& opt) {
  const sv::step_inputs_qk<float, TQ, TK, TH> in{
      sv::matrix_view<const float>(nullptr, {0, 0}, "embeds"), qk, h, visual,
      std::span<const index_t>(raters)};
  return sv::prune_step(in, opt, thread_workspace());
}

bool on_cuda(const array_in& a) {
  return a.device_type() == kDLCUDA || a.device_type() == kDLCUDAManaged;
}

#ifdef SPARSEVLM_PYTHON_CUDA
// prune_step on CUDA arrays: the CUDA specialization, on the caller's stream.
nb::dict prune_step_cuda(const array_in& hidden, sv::visual_span visual, const score_source& src,
                         const opt_array& embeds, const std::optional<std::vector<index_t>>& raters,
                         const sv::step_options& opt, std::uintptr_t stream) {
  src.check();
  if (!raters && !embeds)
    throw sv::error(sv::errc::invalid_argument, "embeds: expected an array (or raters=...), got None");
  const auto dl = [](const opt_array& a) { return a ? std::optional<DLTensor>(dl_of(*a)) : std::nullopt; };
  const DLTensor h = dl_of(hidden);
  const auto at = dl(src.attn), q = dl(src.q), k = dl(src.k), l = dl(src.lse), e = dl(embeds);
  const auto ptr = [](const std::optional<DLTensor>& t) { return t ? &*t : nullptr; };
  const sparsevlm_py::device_step_arrays arrays{&h, ptr(at), ptr(q), ptr(k), ptr(l), src.scale,
                                                raters ? nullptr : ptr(e)};
  sv::step_result r;
  {
    nb::gil_scoped_release unlocked;
    r = sparsevlm_py::cuda_prune_step(arrays, visual, raters ? &*raters : nullptr, opt, stream);
  }
  return step_dict(std::move(r));
}
#endif

nb::dict prune_step_py(const array_in& hidden, span_pair visual_pair, const score_source& src,
                       const opt_array& embeds, std::optional<std::vector<index_t>> raters,
                       const sv::step_options& opt, std::uintptr_t stream) {
  const sv::visual_span visual = span_of(visual_pair);
#ifdef SPARSEVLM_PYTHON_CUDA
  if (on_cuda(hidden)) return prune_step_cuda(hidden, visual, src, embeds, raters, opt, stream);
#else
  (void)stream;
  if (on_cuda(hidden))
    throw sv::error(sv::errc::invalid_argument,
                    "hidden.device: expected a CPU array (this build of sparsevlm has no CUDA "
                    "backend: pip install . -Ccmake.define.SPARSEVLM_CUDA=ON), got a CUDA array");
#endif
  if (!raters) {
    if (!embeds)
      throw sv::error(sv::errc::invalid_argument,
                      "embeds: expected an array (or raters=...), got None");
    raters = raters_from(*embeds, visual);
  }
  sv::step_result r = src.visit([&](auto s) {
    return visit<2>(hidden, "hidden", [&](auto h) {
      nb::gil_scoped_release unlocked;
      return run_step(s, h, visual, *raters, opt);
    });
  });
  return step_dict(std::move(r));
}

// The [R, N] float32 head sums of the local heads (tensor_parallel.hpp). The
// span is checked against the source's L before the output is allocated.
template <class T>
void partial_into(sv::tensor3_view<const T> a, const std::vector<index_t>& raters,
                  sv::visual_span visual, sv::matrix_view<float> out) {
  sv::partial_relevance(a, raters, visual, out, thread_workspace());
}
template <class TQ, class TK>
void partial_into(const sv::qk_view<TQ, TK>& qk, const std::vector<index_t>& raters,
                  sv::visual_span visual, sv::matrix_view<float> out) {
  sv::partial_relevance_qk(qk, raters, visual, out, thread_workspace());
}
template <class T>
index_t length_of(sv::tensor3_view<const T> a) { return a.extent(1); }
template <class TQ, class TK>
index_t length_of(const sv::qk_view<TQ, TK>& qk) { return qk.k.extent(1); }

nb::object partial_py(const score_source& src, const std::vector<index_t>& raters,
                      span_pair visual_pair) {
  const sv::visual_span visual = span_of(visual_pair);
  return src.visit([&](auto s) {
    const index_t L = length_of(s);
    sv::detail::check_span(visual, L, src.attn ? "attn_local.extent[1]" : "k_local.extent[1]");
    sv::check_raters(raters, visual, L);  // before R·N floats are allocated
    const auto R = static_cast<index_t>(raters.size());
    std::vector<float> P(static_cast<std::size_t>(R * visual.len));
    {
      nb::gil_scoped_release unlocked;
      partial_into(s, raters, visual, sv::matrix_view<float>(P.data(), {R, visual.len}, "P_part"));
    }
    return to_numpy(std::move(P), {static_cast<std::size_t>(R), static_cast<std::size_t>(visual.len)});
  });
}

nb::dict from_head_sums_py(const array_in& p_sum, index_t heads, const array_in& hidden,
                           span_pair visual, const std::vector<index_t>& raters,
                           const sv::step_options& opt) {
  const auto P = typed<float, 2>(p_sum, "P_sum");
  sv::step_result r = visit<2>(hidden, "hidden", [&](auto h) {
    using TH = typename decltype(h)::value_type;
    nb::gil_scoped_release unlocked;
    const sv::head_sum_inputs<TH> in{P, heads, h, span_of(visual), raters};
    return sv::prune_step_from_head_sums(in, opt, thread_workspace());
  });
  return step_dict(std::move(r));
}

// apply_plan into `out` (allocated by the caller's framework, hidden's dtype):
// plan.hpp's own gather and checks, GIL released. merged may be absent (then the
// sequence must have no recycled entries) or any of the three dtypes.
void apply_plan_py(const array_in& sequence, const array_in& hidden, const opt_array& merged,
                   const array_out& out) {
  const DLTensor st = dl_of(sequence);
  const std::span<const index_t> seq = sv::span_of<const index_t>(st, "sequence");
  visit<2>(hidden, "hidden", [&](auto h) {
    using TH = typename decltype(h)::value_type;
    const DLTensor ot = dl_of(out);
    const auto o = sv::view_of<TH, 2>(ot, "out");
    const auto run = [&](auto m) {
      nb::gil_scoped_release unlocked;
      sv::apply_plan(seq, h, m, o);
      return 0;
    };
    if (!merged) {
      // No recycled rows: an empty [0, d] view (check_plan_args refuses any negative entry).
      return run(sv::matrix_view<const float>(nullptr, {0, h.extent(1)}, "merged"));
    }
    return visit<2>(*merged, "merged", run);
  });
}

// compact_paged_kv on one layer's K (or V) pages, in place; the Python wrapper has
// widened the block table and the sequence to int64 and named the layout.
index_t compact_paged_kv_py(const array_in& sequence, const array_out& cache, bool hnd,
                            const array_in& block_table, const opt_array& recycled,
                            std::uintptr_t stream) {
  const DLTensor st = dl_of(sequence), bt = dl_of(block_table), ct = dl_of(cache);
  const std::span<const index_t> seq = sv::span_of<const index_t>(st, "sequence");
  const std::span<const index_t> table = sv::span_of<const index_t>(bt, "block_table");
#ifdef SPARSEVLM_PYTHON_CUDA
  if (ct.device.device_type == kDLCUDA || ct.device.device_type == kDLCUDAManaged) {
    const std::optional<DLTensor> rt =
        recycled ? std::optional<DLTensor>(dl_of(*recycled)) : std::nullopt;
    nb::gil_scoped_release unlocked;
    return sparsevlm_py::cuda_compact_paged_kv(ct, hnd, seq, table, rt ? &*rt : nullptr, stream);
  }
#else
  (void)stream;
#endif
  const sv::page_layout layout =
      hnd ? sv::page_layout::blocks_heads_tokens_dim : sv::page_layout::blocks_tokens_heads_dim;
  return sv::visit_dlpack<4>(ct, "cache", [&](auto c) {
    using TC = typename decltype(c)::value_type;
    const auto kv = sv::view_of<TC, 4>(ct, "cache");
    const auto run = [&](auto r) {
      nb::gil_scoped_release unlocked;
      return sv::compact_paged_kv(seq, kv, layout, table, r);
    };
    if (!recycled) return run(sv::tensor3_view<const float>(nullptr, {0, 0, 0}, "recycled"));
    return visit<3>(*recycled, "recycled", run);
  });
}

// The rules apply_plan and compact_paged_kv check, from shapes alone: the Python
// package runs these before it moves a device tensor's rows itself (when the
// module has no CUDA kernels for that device), so the rules stay in plan.hpp and
// kv_cache.hpp.
void check_apply_plan_py(const array_in& sequence, index_t rows, index_t cols, index_t recycled,
                         index_t recycled_cols) {
  const DLTensor st = dl_of(sequence);
  sv::detail::check_plan_shape(sv::span_of<const index_t>(st, "sequence"), rows, cols, recycled,
                               recycled_cols);
}

void check_compact_paged_py(const array_in& sequence, const array_in& block_table, index_t blocks,
                            index_t block_size, index_t heads, index_t head_dim,
                            const std::vector<index_t>& recycled_shape) {
  const DLTensor st = dl_of(sequence), bt = dl_of(block_table);
  const std::span<const index_t> seq = sv::span_of<const index_t>(st, "sequence");
  const std::span<const index_t> table = sv::span_of<const index_t>(bt, "block_table");
  SPARSEVLM_CHECK(block_size > 0, sv::errc::shape_mismatch, "cache block_size", "> 0", block_size);
  SPARSEVLM_CHECK(recycled_shape.empty() || recycled_shape.size() == 3, sv::errc::shape_mismatch,
                  "recycled", "a 3-D [c, heads, head_dim] array",
                  sv::detail::concat(recycled_shape.size(), " dims"));
  const index_t c = recycled_shape.empty() ? 0 : recycled_shape[0];
  if (c > 0) {
    const index_t extent[3] = {recycled_shape[0], recycled_shape[1], recycled_shape[2]};
    sv::detail::check_side_shape(extent, c, heads, head_dim, sv::kv_layout::tokens_heads_dim,
                                 "recycled");
  }
  sv::detail::throw_paged_fault(sv::detail::find_paged_fault(
      seq.data(), static_cast<index_t>(seq.size()), c, table.data(),
      static_cast<index_t>(table.size()), block_size, blocks));
}

}  // namespace

void bind_step(nb::module_& m) {
  nb::class_<score_source>(m, "_Source")
      .def(
          "__init__",
          [](score_source* s, opt_array attn, opt_array q, opt_array k, opt_array lse, double scale) {
            new (s) score_source{std::move(attn), std::move(q), std::move(k), std::move(lse), scale};
          },
          "attn"_a = nb::none(), "q"_a = nb::none(), "k"_a = nb::none(), "lse"_a = nb::none(),
          "scale"_a = 0.0);

  m.def("prune_step", &prune_step_py, "hidden"_a, "visual"_a, "source"_a, "embeds"_a = nb::none(),
        "raters"_a = nb::none(), "options"_a = sv::step_options{}, "stream"_a = 0);
  m.def("has_cuda", [] {
#ifdef SPARSEVLM_PYTHON_CUDA
    return true;
#else
    return false;
#endif
  }, "True when this build runs prune_step on CUDA arrays (SPARSEVLM_CUDA=ON).");
  m.def(
      "select_raters",
      [](const array_in& embeds, span_pair visual) {
        std::vector<index_t> r = raters_from(embeds, span_of(visual));
        const std::size_t n = r.size();
        return to_numpy(std::move(r), {n});
      },
      "embeds"_a, "visual"_a);
  m.def("compact_paged_kv", &compact_paged_kv_py, "sequence"_a, "cache"_a, "hnd"_a, "block_table"_a,
        "recycled"_a.none(), "stream"_a = 0);
  m.def("apply_plan", &apply_plan_py, "sequence"_a, "hidden"_a, "merged"_a.none(), "out"_a);
  m.def("check_apply_plan", &check_apply_plan_py, "sequence"_a, "rows"_a, "cols"_a, "recycled"_a,
        "recycled_cols"_a);
  m.def("check_compact_paged", &check_compact_paged_py, "sequence"_a, "block_table"_a, "blocks"_a,
        "block_size"_a, "heads"_a, "head_dim"_a, "recycled_shape"_a);
  m.def("partial_relevance", &partial_py, "source"_a, "raters"_a, "visual"_a);
  m.def("prune_step_from_head_sums", &from_head_sums_py, "P_sum"_a, "heads"_a, "hidden"_a,
        "visual"_a, "raters"_a, "options"_a = sv::step_options{});
}

sparsevlm::cpu::unit_build step_unit_build() { return SPARSEVLM_THIS_UNIT_BUILD; }

}  // namespace svpy
