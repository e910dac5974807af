// The option types of the extension (KeepPolicy, RecycleOptions, RopeGravity,
// StepOptions, SessionConfig) and the published presets.
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <string>
#include <tuple>
#include <vector>

#include <sparsevlm/presets.hpp>
#include <sparsevlm/session.hpp>
#include <sparsevlm/types.hpp>

#include "arrays.hpp"
#include "module.hpp"

namespace svpy {

namespace {
using namespace nb::literals;

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

}  // namespace

void bind_options(nb::module_& m) {
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

}

sparsevlm::cpu::unit_build options_unit_build() { return SPARSEVLM_THIS_UNIT_BUILD; }

}  // namespace svpy
