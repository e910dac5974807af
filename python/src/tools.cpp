// The tools of the extension (sparsevlm::tools, not the installed library): spec
// cases (run_case, load_case), .npy arrays, pictures (show), and build_info, how
// each unit of the module was compiled.
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <string>
#include <utility>
#include <vector>

#include <sparsevlm/cpu/dispatch.hpp>
#include <sparsevlm/io/case.hpp>
#include <sparsevlm/io/picture.hpp>

#include "arrays.hpp"
#include "module.hpp"

#ifdef SPARSEVLM_PYTHON_CUDA
#include "cuda_step.hpp"
#endif

namespace svpy {

namespace {
using namespace nb::literals;

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
  // Every unit of the module's own code: each includes the library's inline
  // kernels, so any one built for size would slow the package down.
  units["module"] = unit(module_unit_build());
  units["module.options"] = unit(options_unit_build());
  units["module.step"] = unit(step_unit_build());
  units["module.session"] = unit(session_unit_build());
  units["module.tools"] = unit(SPARSEVLM_THIS_UNIT_BUILD);
  std::vector<std::string> compiled, supported;
  for (int i = 0; i < sv::cpu::isa_count; ++i) {
    const auto id = static_cast<sv::cpu::isa>(i);
    const sv::cpu::detail::kernel_table* t = sv::cpu::detail::compiled_kernels(id);
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

}  // namespace

void bind_tools(nb::module_& m) {
  m.def("build_info", &build_info_py,
        "How each unit of the module was compiled and which kernel tables it holds.");
  m.def("run_case", &run_case_py, "case_dir"_a, "scores_from"_a = "attn");
  m.def("load_case", &load_case_py, "case_dir"_a);
  m.def("show", &show_py, "case_dir"_a, "grid"_a, "out"_a, "cell"_a = 16, "scores_from"_a = "attn");
}

}  // namespace svpy
