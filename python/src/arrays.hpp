// What every part of the extension shares: arrays in (any DLPack-capable object,
// read in place through include/sparsevlm/dlpack.hpp, so the checks and messages
// are the library's), NumPy arrays out (owning their memory), a step's result as
// a dict, the calling thread's workspace, and the attention source of a step or
// session call. Inline, in one namespace, so that every unit of the module shares
// one workspace per thread.
#pragma once

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <sparsevlm/dlpack.hpp>
#include <sparsevlm/scores_qk.hpp>
#include <sparsevlm/types.hpp>
#include <sparsevlm/view.hpp>
#include <sparsevlm/workspace.hpp>

namespace svpy {

namespace nb = nanobind;
namespace sv = sparsevlm;
using sv::index_t;

using array_in = nb::ndarray<nb::ro>;
using array_out = nb::ndarray<>;  // writable (apply_plan's output)
using opt_array = std::optional<array_in>;
using span_pair = std::pair<index_t, index_t>;

// A DLTensor describing `a` (nanobind keeps the shape and strides arrays alive
// as long as `a`). nanobind always fills strides, in elements.
template <class Array>
inline DLTensor dl_of(const Array& a) {
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

inline sv::visual_span span_of(span_pair v) { return sv::visual_span{v.first, v.second}; }

// A NumPy array that owns `v` (moved to the heap; freed with the array).
template <class T>
nb::object to_numpy(std::vector<T>&& v, std::initializer_list<std::size_t> shape) {
  auto* heap = new std::vector<T>(std::move(v));
  if (heap->empty()) heap->reserve(1);  // a non-null pointer for empty arrays
  nb::capsule owner(heap, [](void* p) noexcept { delete static_cast<std::vector<T>*>(p); });
  return nb::cast(nb::ndarray<nb::numpy, T>(heap->data(), shape, owner));
}

inline nb::list clusters_list(const std::vector<std::vector<index_t>>& clusters) {
  nb::list out;
  for (const auto& c : clusters) out.append(nb::cast(c));
  return out;
}

inline nb::dict step_dict(sv::step_result&& r) {
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
inline sv::workspace& thread_workspace() {
  thread_local sv::workspace ws;
  return ws;
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
    if (attn) return svpy::visit<3>(*attn, "attn", [&](auto a) { return f(a); });
    std::optional<sv::matrix_view<const float>> l;
    if (lse) l = typed<float, 2>(*lse, "lse");
    return svpy::visit<3>(*q, "q", [&](auto qv) {
      using TQ = typename decltype(qv)::value_type;
      const auto kv = typed<TQ, 3>(*k, "k");
      return f(sv::qk_view<TQ, TQ>{qv, kv, l, scale});
    });
  }
};

}  // namespace svpy
