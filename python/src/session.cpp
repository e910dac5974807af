// The prefill session from Python: Layout and _Session (session.hpp), each call
// under the session's lock with the GIL released.
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include <sparsevlm/session.hpp>

#include "arrays.hpp"
#include "module.hpp"

namespace svpy {

namespace {
using namespace nb::literals;

// A prefill session and a lock: calls run with the GIL released, so two Python
// threads could otherwise step one session at once. Scratch comes from the
// calling thread's workspace (the session keeps nothing in it between calls), so
// a new session per request does not grow a cold workspace at its first prune.
struct py_session {
  sv::prefill_session s;
  mutable std::mutex busy;
};

// The one way a call reaches the session: under its lock. `stepping` releases the
// GIL first (prune, commit: they compute); `reading` keeps it (the getters only
// copy out) and converts the member's result for Python. Readers take the lock
// too, since prune() replaces the session's buffers.
template <class F>
decltype(auto) stepping(py_session& self, F&& f) {
  nb::gil_scoped_release unlocked;
  const std::lock_guard<std::mutex> lock(self.busy);
  return f(self.s);
}
struct as_is {
  template <class T>
  T operator()(T&& v) const {
    return std::forward<T>(v);
  }
};
/// A getter for def_prop_ro: the const member Member, converted by Convert.
template <auto Member, class Convert = as_is>
auto reading(Convert convert = {}) {
  return [convert](const py_session& self) {
    const std::lock_guard<std::mutex> lock(self.busy);
    return convert((self.s.*Member)());
  };
}
/// The same for a member that takes a layer.
template <auto Member, class Convert = as_is>
auto reading_layer(Convert convert = {}) {
  return [convert](const py_session& self, index_t layer) {
    const std::lock_guard<std::mutex> lock(self.busy);
    return convert((self.s.*Member)(layer));
  };
}

// An index list as an owning NumPy array.
nb::object index_array(std::span<const index_t> v) {
  return to_numpy(std::vector<index_t>(v.begin(), v.end()), {v.size()});
}

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

std::optional<sv::matrix_view<const index_t>> positions_of(const opt_array& positions) {
  if (!positions) return std::nullopt;
  return typed<index_t, 2>(*positions, "positions");
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

void bind_session(nb::module_& m) {
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
                return stepping(self, [&](sv::prefill_session& ss) {
                  return ss.prune(layer, s, h, thread_workspace());
                });
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
            sv::layer_plan p = stepping(
                self, [&](sv::prefill_session& ss) { return ss.commit(layer, std::move(r)); });
            return plan_dict(std::move(p));
          },
          "layer"_a, "raters"_a, "rank"_a, "keep_count"_a, "keep"_a, "clusters"_a, "sequence"_a)
      .def("prunes_after", reading_layer<&sv::prefill_session::prunes_after>())
      .def_prop_ro("next_layer", reading<&sv::prefill_session::next_layer>())
      .def_prop_ro("steps_done", reading<&sv::prefill_session::steps_done>())
      .def_prop_ro("finished", reading<&sv::prefill_session::finished>())
      .def_prop_ro("length", reading<&sv::prefill_session::length>())
      .def_prop_ro("visual", reading<&sv::prefill_session::visual>(
                                 [](sv::visual_span v) { return nb::make_tuple(v.start, v.len); }))
      .def_prop_ro("spans", reading<&sv::prefill_session::spans>(
                                [](std::span<const sv::visual_span> v) { return spans_list(v); }))
      .def_prop_ro("visual_tokens", reading<&sv::prefill_session::visual_tokens>())
      .def_prop_ro("raters", reading<&sv::prefill_session::raters>(index_array))
      .def_prop_ro("positions", reading<&sv::prefill_session::positions>(
                                    [](sv::matrix_view<const index_t> p) { return positions_array(p); }))
      .def_prop_ro("origins", reading<&sv::prefill_session::origins>(index_array))
      .def_prop_ro("config", reading<&sv::prefill_session::config>())
      .def("next_position", reading<&sv::prefill_session::next_position>())
      .def("kv_rows", reading_layer<&sv::prefill_session::kv_rows>([](std::vector<index_t> r) {
             const std::size_t n = r.size();
             return to_numpy(std::move(r), {n});
           }));
}

sparsevlm::cpu::unit_build session_unit_build() { return SPARSEVLM_THIS_UNIT_BUILD; }

}  // namespace svpy
