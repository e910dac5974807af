// The Python extension `sparsevlm._sparsevlm`: nanobind bindings over the
// header-only library. Arrays arrive as any DLPack-capable object (NumPy,
// PyTorch, CuPy, JAX) and are read in place through include/sparsevlm/dlpack.hpp,
// so every shape, stride, dtype and device check is the library's own and the
// messages are the C++ ones. Results come back as NumPy arrays that own their
// memory; python/sparsevlm/__init__.py turns them into the caller's framework.
// Every computation runs with the GIL released.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <sparsevlm/dlpack.hpp>
#include <sparsevlm/io/case.hpp>
#include <sparsevlm/io/picture.hpp>
#include <sparsevlm/sparsevlm.hpp>

#ifdef SPARSEVLM_PYTHON_CUDA
#include "cuda_step.hpp"
#endif

namespace nb = nanobind;
namespace sv = sparsevlm;
using namespace nb::literals;
using sv::index_t;

namespace {

using array_in = nb::ndarray<nb::ro>;
using array_out = nb::ndarray<>;  // writable (apply_plan's output)
using opt_array = std::optional<array_in>;
using span_pair = std::pair<index_t, index_t>;

// A DLTensor describing `a` (nanobind keeps the shape and strides arrays alive
// as long as `a`). nanobind always fills strides, in elements.
template <class Array>
DLTensor dl_of(const Array& a) {
  DLTensor t{};
  t.data = a.data_handle();
  t.byte_offset = a.byte_offset();
  t.device = DLDevice{static_cast<DLDeviceType>(a.device_type()), static_cast<int32_t>(a.device_id())};
  t.ndim = static_cast<int32_t>(a.ndim());
  t.dtype = DLDataType{a.dtype().code, a.dtype().bits, a.dtype().lanes};
  t.shape = const_cast<int64_t*>(a.shape_ptr());
  t.strides = const_cast<int64_t*>(a.stride_ptr());
  return t;
}

template <std::size_t Rank, class F>
decltype(auto) visit(const array_in& a, const char* name, F&& f) {
  const DLTensor t = dl_of(a);
  return sv::visit_dlpack<Rank>(t, name, std::forward<F>(f));
}

template <class T, std::size_t Rank>
sv::strided_view<const T, Rank> typed(const array_in& a, const char* name) {
  const DLTensor t = dl_of(a);
  return sv::view_of<const T, Rank>(t, name);
}

sv::visual_span span_of(span_pair v) { return sv::visual_span{v.first, v.second}; }

// A NumPy array that owns `v` (moved to the heap; freed with the array).
template <class T>
nb::object to_numpy(std::vector<T>&& v, std::initializer_list<std::size_t> shape) {
  auto* heap = new std::vector<T>(std::move(v));
  if (heap->empty()) heap->reserve(1);  // a non-null pointer for empty arrays
  nb::capsule owner(heap, [](void* p) noexcept { delete static_cast<std::vector<T>*>(p); });
  return nb::cast(nb::ndarray<nb::numpy, T>(heap->data(), shape, owner));
}

nb::list clusters_list(const std::vector<std::vector<index_t>>& clusters) {
  nb::list out;
  for (const auto& c : clusters) out.append(nb::cast(c));
  return out;
}

nb::dict step_dict(sv::step_result&& r) {
  nb::dict d;
  const std::size_t R = r.raters.size(), N = r.scores.size(), K = r.keep.size();
  const std::size_t c = r.recycled.clusters.size(), L = r.sequence.size();
  d["raters"] = to_numpy(std::move(r.raters), {R});
  d["scores"] = to_numpy(std::move(r.scores), {N});
  d["rank"] = r.rank;
  d["keep_count"] = r.keep_count;
  d["keep"] = to_numpy(std::move(r.keep), {K});
  d["clusters"] = clusters_list(r.recycled.clusters);
  d["merged"] = to_numpy(std::move(r.recycled.merged), {c, static_cast<std::size_t>(r.recycled.dim)});
  d["sequence"] = to_numpy(std::move(r.sequence), {L});
  return d;
}

// Steps and stages use one workspace per calling thread: it grows to the
// largest shape seen and is reused, so repeated calls do not allocate scratch.
sv::workspace& thread_workspace() {
  thread_local sv::workspace ws;
  return ws;
}

// Raters from `embeds` over `visual` (select_raters), GIL released.
std::vector<index_t> raters_from(const array_in& embeds, sv::visual_span visual) {
  return visit<2>(embeds, "embeds", [&](auto e) {
    nb::gil_scoped_release unlocked;
    std::vector<index_t> r;
    sv::select_raters(e, visual, thread_workspace(), r);
    return r;
  });
}

// The attention source of a step or session call: attn, or q and k (+ lse).
struct score_source {
  opt_array attn, q, k, lse;
  double scale = 0.0;

  void check() const {
    const bool qk = q.has_value() || k.has_value();
    if (attn.has_value() == qk)
      throw sv::error(sv::errc::invalid_argument,
                      "attn, q/k: expected either attn or both q and k, got " +
                          std::string(attn ? "attn and q/k" : "neither"));
    if (qk && !(q && k))
      throw sv::error(sv::errc::invalid_argument,
                      std::string("q, k: expected both, got only ") + (q ? "q" : "k"));
    if (lse && !qk)
      throw sv::error(sv::errc::invalid_argument, "lse: expected only with q and k, got it with attn");
    if (qk && (q->dtype() != k->dtype()))
      throw sv::error(sv::errc::invalid_argument,
                      "k.dtype: expected the dtype of q, got a different one");
  }

  // Calls f(src) with a tensor3_view (attn) or a qk_view (q/k), typed.
  template <class F>
  decltype(auto) visit(F&& f) const {
    check();
    if (attn) return ::visit<3>(*attn, "attn", [&](auto a) { return f(a); });
    std::optional<sv::matrix_view<const float>> l;
    if (lse) l = typed<float, 2>(*lse, "lse");
    return ::visit<3>(*q, "q", [&](auto qv) {
      using TQ = typename decltype(qv)::value_type;
      const auto kv = typed<TQ, 3>(*k, "k");
      return f(sv::qk_view<TQ, TQ>{qv, kv, l, scale});
    });
  }
};

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

// A prefill session and a lock: calls run with the GIL released, so two Python
// threads could otherwise step one session at once. Scratch comes from the
// calling thread's workspace (the session keeps nothing in it between calls), so
// a new session per request does not grow a cold workspace at its first prune.
struct py_session {
  sv::prefill_session s;
  mutable std::mutex busy;

  // Readers take the lock too: prune() replaces the session's buffers.
  [[nodiscard]] std::unique_lock<std::mutex> hold() const { return std::unique_lock<std::mutex>(busy); }
};

nb::list spans_list(std::span<const sv::visual_span> spans) {
  nb::list out;
  for (const auto& v : spans) out.append(nb::make_tuple(v.start, v.len));
  return out;
}

nb::object positions_array(sv::matrix_view<const index_t> p) {
  std::vector<index_t> v(static_cast<std::size_t>(p.extent(0) * p.extent(1)));
  for (index_t r = 0; r < p.extent(0); ++r)
    for (index_t i = 0; i < p.extent(1); ++i) v[static_cast<std::size_t>(r * p.extent(1) + i)] = p(r, i);
  return to_numpy(std::move(v), {static_cast<std::size_t>(p.extent(0)), static_cast<std::size_t>(p.extent(1))});
}

nb::dict plan_dict(sv::layer_plan&& p) {
  nb::dict d = step_dict(std::move(p.step));
  d["layer"] = p.layer;
  d["kv_sequence"] = to_numpy(std::move(p.kv_sequence), {p.kv_sequence.size()});
  d["length"] = p.length;
  d["spans"] = spans_list(p.spans);
  d["visual"] = nb::make_tuple(p.visual.start, p.visual.len);
  nb::list parts;
  for (const auto& part : p.parts) {
    nb::dict q;
    q["visual"] = nb::make_tuple(part.visual.start, part.visual.len);
    q["rank"] = part.rank;
    q["keep_count"] = part.keep_count;
    q["keep"] = nb::cast(part.keep);
    q["first_cluster"] = part.first_cluster;
    q["clusters"] = part.clusters;
    parts.append(q);
  }
  d["parts"] = parts;
  const auto rows = static_cast<std::size_t>(p.rows), n = static_cast<std::size_t>(p.length);
  d["positions"] = to_numpy(std::move(p.positions), {rows, n});
  return d;
}

sv::position_policy position_policy_of(const std::string& s) {
  if (s == "renumber") return sv::position_policy::renumber;
  if (s == "keep_original") return sv::position_policy::keep_original;
  throw sv::error(sv::errc::invalid_argument,
                  "positions: expected 'renumber' or 'keep_original', got '" + s + "'");
}
std::string position_policy_name(sv::position_policy p) {
  return p == sv::position_policy::renumber ? "renumber" : "keep_original";
}
sv::span_budget budget_of(const std::string& s) {
  if (s == "global") return sv::span_budget::global;
  if (s == "per_span") return sv::span_budget::per_span;
  throw sv::error(sv::errc::invalid_argument,
                  "budget: expected 'global' or 'per_span', got '" + s + "'");
}

std::optional<sv::matrix_view<const index_t>> positions_of(const opt_array& positions) {
  if (!positions) return std::nullopt;
  return typed<index_t, 2>(*positions, "positions");
}

nb::dict run_case_py(const std::string& dir, const std::string& scores_from) {
  if (scores_from != "attn" && scores_from != "qk")
    throw sv::error(sv::errc::invalid_argument,
                    "scores_from: expected 'attn' or 'qk', got '" + scores_from + "'");
  std::string json;
  sv::step_result r;
  {
    nb::gil_scoped_release unlocked;
    const sv::io::case_data c = sv::io::load_case(dir);
    r = sv::io::run_case(c, thread_workspace(),
                         scores_from == "qk" ? sv::io::scores_source::qk : sv::io::scores_source::attn);
    json = sv::io::result_json(r).dump();
  }
  nb::dict d = nb::cast<nb::dict>(nb::module_::import_("json").attr("loads")(json));
  if (!r.recycled.clusters.empty()) {
    const auto c = r.recycled.clusters.size();
    d["merged"] = to_numpy(std::move(r.recycled.merged), {c, static_cast<std::size_t>(r.recycled.dim)});
  }
  return d;
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

nb::dict show_py(const std::string& case_dir, std::pair<index_t, index_t> grid, const std::string& out,
                 index_t cell, const std::string& scores_from) {
  if (scores_from != "attn" && scores_from != "qk")
    throw sv::error(sv::errc::invalid_argument,
                    "scores_from: expected 'attn' or 'qk', got '" + scores_from + "'");
  if (grid.first < 1 || grid.second < 1)
    throw sv::error(sv::errc::invalid_argument,
                    sv::detail::concat("grid: expected (rows, cols) >= 1, got (", grid.first, ", ",
                                       grid.second, ")"));
  sv::io::shown_case s;
  {
    nb::gil_scoped_release unlocked;
    s = sv::io::show_case(case_dir, {grid.first, grid.second}, out, cell,
                          scores_from == "qk" ? sv::io::scores_source::qk : sv::io::scores_source::attn);
  }
  nb::dict d;
  d["kept"] = s.counts.kept;
  d["recycled"] = s.counts.recycled;
  d["clusters"] = s.counts.clusters;
  d["dropped"] = s.counts.dropped;
  d["width"] = s.width;
  d["height"] = s.height;
  d["over_image"] = s.over_image;
  return d;
}

using policy_state_t = std::tuple<bool, double, double, index_t>;  // (is rank, scale, bias, keep)
policy_state_t policy_state(const sv::keep_policy& p) {
  return {p.kind == sv::keep_policy::kind_t::rank, p.scale, p.bias, p.keep};
}
sv::keep_policy policy_of(const policy_state_t& st) {
  sv::keep_policy p{};
  p.kind = std::get<0>(st) ? sv::keep_policy::kind_t::rank : sv::keep_policy::kind_t::fixed;
  p.scale = std::get<1>(st);
  p.bias = std::get<2>(st);
  p.keep = std::get<3>(st);
  return p;
}

// A NumPy array owning a loaded .npy (its storage moved, no copy).
nb::object npy_to_numpy(sv::io::npy_array&& a) {
  auto* heap = new sv::io::npy_array(std::move(a));
  if (heap->storage.empty()) heap->storage.resize(1);  // a non-null pointer for empty arrays
  nb::capsule owner(heap, [](void* p) noexcept { delete static_cast<sv::io::npy_array*>(p); });
  std::vector<std::size_t> shape(heap->shape.begin(), heap->shape.end());
  const nb::dlpack::dtype dt =
      heap->type == sv::io::npy_type::f16
          ? nb::dlpack::dtype{static_cast<std::uint8_t>(nb::dlpack::dtype_code::Float), 16, 1}
      : heap->type == sv::io::npy_type::i64 ? nb::dtype<int64_t>()
                                            : nb::dtype<float>();
  return nb::cast(nb::ndarray<nb::numpy>(heap->storage.data(), shape.size(), shape.data(), owner,
                                         nullptr, dt));
}

nb::dict load_case_py(const std::string& dir) {
  sv::io::case_data c;
  {
    nb::gil_scoped_release unlocked;
    c = sv::io::load_case(dir);
  }
  nb::dict d;
  d["name"] = c.name;
  d["visual"] = nb::make_tuple(c.visual.start, c.visual.len);
  d["raters"] = c.raters ? nb::cast(*c.raters) : nb::none();
  d["options"] = c.options;
  d["embeds"] = npy_to_numpy(std::move(c.embeds));
  d["attn"] = npy_to_numpy(std::move(c.attn));
  d["hidden"] = npy_to_numpy(std::move(c.hidden));
  if (c.q) d["q"] = npy_to_numpy(std::move(*c.q));
  if (c.k) d["k"] = npy_to_numpy(std::move(*c.k));
  return d;
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

// How each unit of this module was compiled (cpu::unit_build), and what the
// kernel tables hold: the guard against a size-optimised build (docs/python.md).
nb::dict build_info_py() {
  const auto unit = [](const sv::cpu::unit_build& b) {
    nb::dict d;
    d["known"] = b.known;
    d["optimize"] = b.optimize;
    d["optimize_size"] = b.optimize_size;
    return d;
  };
  nb::dict units;
  units["module"] = unit(SPARSEVLM_THIS_UNIT_BUILD);
  std::vector<std::string> compiled, supported;
  for (int i = 0; i < sv::cpu::isa_count; ++i) {
    const auto id = static_cast<sv::cpu::isa>(i);
    const sv::cpu::kernel_table* t = sv::cpu::compiled_kernels(id);
    if (t == nullptr) continue;
    compiled.emplace_back(sv::cpu::isa_name(id));
    if (sv::cpu::isa_supported(id)) supported.emplace_back(sv::cpu::isa_name(id));
    // The scalar kernels are inline code of the module's own unit.
    if (id != sv::cpu::isa::scalar) units[sv::cpu::isa_name(id)] = unit(t->build);
  }
#ifdef SPARSEVLM_PYTHON_CUDA
  units["cuda"] = unit(sparsevlm_py::cuda_unit_build());
#endif
  nb::dict d;
  d["units"] = units;
  d["isa_compiled"] = compiled;
  d["isa_supported"] = supported;
  d["isa_active"] = std::string(sv::cpu::isa_name(sv::cpu::active_isa()));
#if defined(__clang__)
  d["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  d["compiler"] = std::string("gcc ") + __VERSION__;
#else
  d["compiler"] = std::string("unknown");
#endif
  d["cuda"] = nb::bool_(
#ifdef SPARSEVLM_PYTHON_CUDA
      true
#else
      false
#endif
  );
  return d;
}

// Token counts of a layout: each >= 0 and their sum a valid length (no overflow).
void check_counts(const std::vector<index_t>& counts) {
  constexpr index_t limit = index_t{1} << 40;
  index_t total = 0;
  for (index_t c : counts) {
    SPARSEVLM_CHECK(c >= 0 && c <= limit, sv::errc::invalid_argument, "layout counts",
                    sv::detail::concat("each in [0, 2^40]"), c);
    total += c;
  }
  SPARSEVLM_CHECK(total <= limit, sv::errc::invalid_argument, "layout length", "<= 2^40", total);
}

}  // namespace

NB_MODULE(_sparsevlm, m) {
  m.doc() = "SparseVLM visual-token pruning (C++ core). Use the `sparsevlm` package.";
  m.attr("__version__") = SPARSEVLM_VERSION_STRING;
  nb::exception<sv::error>(m, "Error", PyExc_ValueError);

  m.def("isa", [] { return std::string(sv::cpu::isa_name(sv::cpu::active_isa())); },
        "The CPU instruction set the kernels use now: 'scalar', 'avx2' or 'avx512'.");

  nb::class_<sv::keep_policy>(m, "KeepPolicy", "How many visual tokens a step keeps (spec step 5).")
      .def_static("rank", &sv::keep_policy::rank, "scale"_a = 13.5, "bias"_a = 0.0,
                  "keep = max(0, min(floor(rank*scale + bias), N-1)); all N when rank == N.")
      .def_static("fixed", &sv::keep_policy::fixed, "keep"_a, "keep = min(keep, N-1).")
      .def_prop_ro("kind", [](const sv::keep_policy& p) {
        return p.kind == sv::keep_policy::kind_t::rank ? "rank" : "fixed";
      })
      .def_rw("scale", &sv::keep_policy::scale)
      .def_rw("bias", &sv::keep_policy::bias)
      .def_rw("keep", &sv::keep_policy::keep)
      .def("__getstate__", [](const sv::keep_policy& p) { return policy_state(p); })
      .def("__setstate__", [](sv::keep_policy& p, const policy_state_t& st) {
        new (&p) sv::keep_policy(policy_of(st));
      })
      .def("__repr__", [](const sv::keep_policy& p) {
        return p.kind == sv::keep_policy::kind_t::rank
                   ? sv::detail::concat("KeepPolicy.rank(scale=", p.scale, ", bias=", p.bias, ")")
                   : sv::detail::concat("KeepPolicy.fixed(", p.keep, ")");
      });

  nb::class_<sv::recycle_options>(m, "RecycleOptions", "Token recycling (spec step 7).")
      .def(
          "__init__",
          [](sv::recycle_options* o, bool enabled, double fraction, double divisor) {
            new (o) sv::recycle_options{enabled, fraction, divisor};
          },
          "enabled"_a = true, "fraction"_a = 0.3, "cluster_divisor"_a = 10.0)
      .def_rw("enabled", &sv::recycle_options::enabled)
      .def_rw("fraction", &sv::recycle_options::fraction)
      .def_rw("cluster_divisor", &sv::recycle_options::cluster_divisor)
      .def("__getstate__", [](const sv::recycle_options& o) {
        return std::make_tuple(o.enabled, o.fraction, o.cluster_divisor);
      })
      .def("__setstate__", [](sv::recycle_options& o, const std::tuple<bool, double, double>& st) {
        new (&o) sv::recycle_options{std::get<0>(st), std::get<1>(st), std::get<2>(st)};
      })
      .def("__repr__", [](const sv::recycle_options& o) {
        return sv::detail::concat("RecycleOptions(enabled=", o.enabled ? "True" : "False",
                                  ", fraction=", o.fraction, ", cluster_divisor=",
                                  o.cluster_divisor, ")");
      });

  nb::class_<sv::rope_gravity>(m, "RopeGravity",
                               "SparseVLM+'s RoPE gravity correction (docs/algorithm.md).")
      .def(
          "__init__",
          [](sv::rope_gravity* g, bool enabled, index_t head_dim, index_t rotary_dim, double base,
             double scale, double min_ratio) {
            new (g) sv::rope_gravity{};
            g->enabled = enabled;
            g->head_dim = head_dim;
            g->rotary_dim = rotary_dim;
            g->base = base;
            g->scale = scale;
            g->min_ratio = min_ratio;
          },
          "enabled"_a = false, "head_dim"_a = 0, "rotary_dim"_a = 0, "base"_a = 10000.0,
          "scale"_a = 0.0, "min_ratio"_a = 1e-3)
      .def_rw("enabled", &sv::rope_gravity::enabled)
      .def_rw("head_dim", &sv::rope_gravity::head_dim)
      .def_rw("rotary_dim", &sv::rope_gravity::rotary_dim)
      .def_rw("base", &sv::rope_gravity::base)
      .def_rw("scale", &sv::rope_gravity::scale)
      .def_rw("min_ratio", &sv::rope_gravity::min_ratio);

  nb::class_<sv::step_options>(m, "StepOptions", "Options of one pruning step.")
      .def(
          "__init__",
          [](sv::step_options* o, const sv::keep_policy& policy, const sv::recycle_options& recycle,
             index_t top_heads, const sv::rope_gravity& gravity) {
            new (o) sv::step_options{};
            o->policy = policy;
            o->recycle = recycle;
            o->scoring.top_heads = top_heads;
            o->scoring.gravity = gravity;
          },
          "policy"_a = sv::keep_policy{}, "recycle"_a = sv::recycle_options{}, "top_heads"_a = 0,
          "gravity"_a = sv::rope_gravity{})
      .def_rw("policy", &sv::step_options::policy)
      .def_rw("recycle", &sv::step_options::recycle)
      .def_prop_rw(
          "top_heads", [](const sv::step_options& o) { return o.scoring.top_heads; },
          [](sv::step_options& o, index_t k) { o.scoring.top_heads = k; })
      .def_prop_rw(
          "gravity", [](const sv::step_options& o) { return o.scoring.gravity; },
          [](sv::step_options& o, const sv::rope_gravity& g) { o.scoring.gravity = g; })
      // Picklable, so options travel to worker processes (multiprocessing, torch.distributed).
      .def("__getstate__", [](const sv::step_options& o) {
        const auto& g = o.scoring.gravity;
        return std::make_tuple(policy_state(o.policy),
                               std::make_tuple(o.recycle.enabled, o.recycle.fraction,
                                               o.recycle.cluster_divisor),
                               o.scoring.top_heads,
                               std::make_tuple(g.enabled, g.head_dim, g.rotary_dim, g.base, g.scale,
                                               g.min_ratio));
      })
      .def("__setstate__",
           [](sv::step_options& o,
              const std::tuple<policy_state_t, std::tuple<bool, double, double>, index_t,
                               std::tuple<bool, index_t, index_t, double, double, double>>& st) {
             new (&o) sv::step_options{};
             o.policy = policy_of(std::get<0>(st));
             const auto& r = std::get<1>(st);
             o.recycle = {std::get<0>(r), std::get<1>(r), std::get<2>(r)};
             o.scoring.top_heads = std::get<2>(st);
             const auto& g = std::get<3>(st);
             auto& og = o.scoring.gravity;
             std::tie(og.enabled, og.head_dim, og.rotary_dim, og.base, og.scale, og.min_ratio) = g;
           })
      .def("__repr__", [](const sv::step_options& o) {
        const auto& p = o.policy;
        return sv::detail::concat(
            "StepOptions(policy=",
            p.kind == sv::keep_policy::kind_t::rank
                ? sv::detail::concat("KeepPolicy.rank(scale=", p.scale, ", bias=", p.bias, ")")
                : sv::detail::concat("KeepPolicy.fixed(", p.keep, ")"),
            ", recycle=", o.recycle.enabled ? "on" : "off", ", top_heads=", o.scoring.top_heads,
            ")");
      });

  nb::class_<sv::session_config>(m, "SessionConfig",
                                 "What a prefill session does over the forward.")
      .def(
          "__init__",
          [](sv::session_config* c, index_t layers,
             const std::vector<std::pair<index_t, sv::step_options>>& schedule,
             const std::string& positions, const std::string& budget) {
            new (c) sv::session_config{};
            c->layers = layers;
            for (const auto& [layer, o] : schedule) c->schedule.push_back({layer, o});
            c->positions = position_policy_of(positions);
            c->budget = budget_of(budget);
          },
          "layers"_a, "schedule"_a, "positions"_a = "renumber", "budget"_a = "global")
      .def_rw("layers", &sv::session_config::layers)
      .def_prop_ro("schedule",
                   [](const sv::session_config& c) {
                     std::vector<std::pair<index_t, sv::step_options>> s;
                     for (const auto& p : c.schedule) s.emplace_back(p.layer, p.options);
                     return s;
                   })
      .def_prop_ro("positions", [](const sv::session_config& c) { return position_policy_name(c.positions); })
      .def_prop_ro("budget", [](const sv::session_config& c) {
        return c.budget == sv::span_budget::global ? "global" : "per_span";
      });

  m.def(
      "preset_config",
      [](const std::string& preset, const std::string& model) {
        return sv::make_session_config(sv::find_preset(preset), sv::find_model(model));
      },
      "preset"_a, "model"_a,
      "The SessionConfig of a published preset ('v1.5-192', 'plus-64', 'video', ...) on a\n"
      "built-in model ('llava-1.5-7b', ...).");
  m.def(
      "preset_config_for",
      [](const std::string& preset, index_t layers, index_t heads, index_t hidden, index_t mlp,
         index_t prefix, index_t visual) {
        sv::model_shape s{"custom", layers, heads, hidden, mlp, prefix, visual};
        return sv::make_session_config(sv::find_preset(preset), s);
      },
      "preset"_a, "layers"_a, "heads"_a, "hidden"_a, "mlp"_a, "prefix"_a, "visual"_a,
      "The SessionConfig of a preset on a model given by its shape: the preset's own\n"
      "layers and keeps, with the shape's head selection and gravity head size (see\n"
      "derive_config to carry the layers and keeps over to another depth or count).");
  m.def(
      "derive_config",
      [](const std::string& preset, index_t layers, index_t heads, index_t hidden, index_t mlp,
         index_t prefix, index_t visual) {
        // presets.hpp's derive_schedule, from the preset's own model to this shape.
        const sv::preset& p = sv::find_preset(preset);
        const sv::model_shape to{"custom", layers, heads, hidden, mlp, prefix, visual};
        return sv::make_session_config(sv::derive_schedule(p, sv::find_model(p.model), to), to);
      },
      "preset"_a, "layers"_a, "heads"_a, "hidden"_a, "mlp"_a, "prefix"_a, "visual"_a,
      "The SessionConfig of a preset carried over to a model given by its shape\n"
      "(derive_schedule: same fraction of the depth before each pruning layer, same\n"
      "fraction of the visual tokens at each keep; refused when the layers collide).");
  m.def("preset_names", [] {
    std::vector<std::string> n;
    for (const auto& p : sv::known_presets()) n.push_back(p.name);
    return n;
  });
  m.def("model_names", [] {
    std::vector<std::string> n;
    for (const auto& s : sv::known_models()) n.push_back(s.name);
    return n;
  });

  nb::class_<sv::prefill_layout>(m, "Layout", "Where the parts of one sequence sit before layer 0.")
      .def(
          "__init__",
          [](sv::prefill_layout* l, index_t length, std::vector<span_pair> spans) {
            new (l) sv::prefill_layout{};
            l->length = length;
            if (spans.size() == 1) {
              l->visual = span_of(spans[0]);
            } else {
              for (const auto& s : spans) l->spans.push_back(span_of(s));
            }
          },
          "length"_a, "spans"_a, "A sequence of `length` tokens with visual spans [(start, len), ...].")
      .def_static(
          "from_counts",
          [](index_t prefix, index_t visual, index_t text) {
            check_counts({prefix, visual, text});
            return sv::prefill_layout::from_counts(prefix, visual, text);
          },
          "prefix"_a, "visual"_a, "text"_a)
      .def_static(
          "from_counts",
          [](index_t prefix, const std::vector<index_t>& visual, index_t text, index_t between) {
            std::vector<index_t> all{prefix, text};
            all.insert(all.end(), visual.begin(), visual.end());
            for (std::size_t i = 1; i < visual.size(); ++i) all.push_back(between);
            check_counts(all);
            return sv::prefill_layout::from_counts(prefix, visual, text, between);
          },
          "prefix"_a, "visual"_a, "text"_a, "between"_a = 0)
      .def_ro("length", &sv::prefill_layout::length)
      .def_prop_ro("spans", [](const sv::prefill_layout& l) { return spans_list(l.visual_spans()); });

  nb::class_<py_session>(m, "_Session")
      .def(
          "__init__",
          [](py_session* self, const sv::prefill_layout& layout, const sv::session_config& config,
             const opt_array& embeds, std::optional<std::vector<index_t>> raters,
             const opt_array& positions) {
            const auto pos = positions_of(positions);
            if (raters.has_value() == embeds.has_value())
              throw sv::error(sv::errc::invalid_argument,
                              std::string("embeds, raters: expected exactly one, got ") +
                                  (raters ? "both" : "neither"));
            if (raters) {
              nb::gil_scoped_release unlocked;
              new (self) py_session{sv::prefill_session(layout, *raters, config, pos), {}};
              return;
            }
            visit<2>(*embeds, "embeds", [&](auto e) {
              nb::gil_scoped_release unlocked;
              new (self) py_session{sv::prefill_session(layout, e, config, thread_workspace(), pos), {}};
              return 0;
            });
          },
          "layout"_a, "config"_a, "embeds"_a = nb::none(), "raters"_a = nb::none(),
          "positions"_a = nb::none())
      .def(
          "prune",
          [](py_session& self, index_t layer, const array_in& hidden, const score_source& src) {
            sv::layer_plan p = src.visit([&](auto s) {
              return visit<2>(hidden, "hidden", [&](auto h) {
                nb::gil_scoped_release unlocked;
                const std::lock_guard<std::mutex> lock(self.busy);
                return self.s.prune(layer, s, h, thread_workspace());
              });
            });
            return plan_dict(std::move(p));
          },
          "layer"_a, "hidden"_a, "source"_a)
      .def(
          "commit",
          [](py_session& self, index_t layer, std::vector<index_t> raters, index_t rank,
             index_t keep_count, std::vector<index_t> keep,
             std::vector<std::vector<index_t>> clusters, std::vector<index_t> sequence) {
            // A step decided elsewhere (the CUDA step, a tensor-parallel step); its
            // scores and merged rows stay with the caller (PrefillSession.commit).
            sv::step_result r;
            r.raters = std::move(raters);
            r.rank = rank;
            r.keep_count = keep_count;
            r.keep = std::move(keep);
            r.recycled.clusters = std::move(clusters);
            r.sequence = std::move(sequence);
            sv::layer_plan p;
            {
              nb::gil_scoped_release unlocked;
              const std::lock_guard<std::mutex> lock(self.busy);
              p = self.s.commit(layer, std::move(r));
            }
            return plan_dict(std::move(p));
          },
          "layer"_a, "raters"_a, "rank"_a, "keep_count"_a, "keep"_a, "clusters"_a, "sequence"_a)
      .def("prunes_after", [](const py_session& s, index_t layer) { const auto held = s.hold(); return s.s.prunes_after(layer); })
      .def_prop_ro("next_layer", [](const py_session& s) { const auto held = s.hold(); return s.s.next_layer(); })
      .def_prop_ro("steps_done", [](const py_session& s) { const auto held = s.hold(); return s.s.steps_done(); })
      .def_prop_ro("finished", [](const py_session& s) { const auto held = s.hold(); return s.s.finished(); })
      .def_prop_ro("length", [](const py_session& s) { const auto held = s.hold(); return s.s.length(); })
      .def_prop_ro("visual", [](const py_session& s) { const auto held = s.hold();
        const auto v = s.s.visual();
        return nb::make_tuple(v.start, v.len);
      })
      .def_prop_ro("spans", [](const py_session& s) { const auto held = s.hold(); return spans_list(s.s.spans()); })
      .def_prop_ro("visual_tokens", [](const py_session& s) { const auto held = s.hold(); return s.s.visual_tokens(); })
      .def_prop_ro("raters", [](const py_session& s) { const auto held = s.hold();
        const auto r = s.s.raters();
        return to_numpy(std::vector<index_t>(r.begin(), r.end()), {r.size()});
      })
      .def_prop_ro("positions", [](const py_session& s) { const auto held = s.hold(); return positions_array(s.s.positions()); })
      .def_prop_ro("origins", [](const py_session& s) { const auto held = s.hold();
        const auto o = s.s.origins();
        return to_numpy(std::vector<index_t>(o.begin(), o.end()), {o.size()});
      })
      .def_prop_ro("config", [](const py_session& s) { const auto held = s.hold(); return s.s.config(); })
      .def("next_position", [](const py_session& s) { const auto held = s.hold(); return s.s.next_position(); })
      .def("kv_rows", [](const py_session& s, index_t layer) { const auto held = s.hold();
        std::vector<index_t> r = s.s.kv_rows(layer);
        const std::size_t n = r.size();
        return to_numpy(std::move(r), {n});
      });

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
  m.def("build_info", &build_info_py,
        "How each unit of the module was compiled and which kernel tables it holds.");
  m.def("run_case", &run_case_py, "case_dir"_a, "scores_from"_a = "attn");
  m.def("load_case", &load_case_py, "case_dir"_a);
  m.def("partial_relevance", &partial_py, "source"_a, "raters"_a, "visual"_a);
  m.def("prune_step_from_head_sums", &from_head_sums_py, "P_sum"_a, "heads"_a, "hidden"_a,
        "visual"_a, "raters"_a, "options"_a = sv::step_options{});
  m.def("show", &show_py, "case_dir"_a, "grid"_a, "out"_a, "cell"_a = 16, "scores_from"_a = "attn");
}
