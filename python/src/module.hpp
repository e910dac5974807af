// The extension `sparsevlm._sparsevlm`, split by concern: each unit binds its part
// of the API into the module (module.cpp calls them in this order: the option
// types first, since the other parts' defaults are option values).
#pragma once

#include <nanobind/nanobind.h>

#include <sparsevlm/cpu/kernel_table.hpp>

namespace svpy {

void bind_options(nanobind::module_& m);  // options.cpp: KeepPolicy ... SessionConfig, presets
void bind_step(nanobind::module_& m);     // step.cpp: one step, its parts, the plan and the KV pages
void bind_session(nanobind::module_& m);  // session.cpp: Layout and the prefill session
void bind_tools(nanobind::module_& m);    // tools.cpp: spec cases, .npy, pictures, build_info

// How each unit was compiled (SPARSEVLM_THIS_UNIT_BUILD there), for build_info.
sparsevlm::cpu::unit_build options_unit_build();
sparsevlm::cpu::unit_build step_unit_build();
sparsevlm::cpu::unit_build session_unit_build();
sparsevlm::cpu::unit_build module_unit_build();

}  // namespace svpy
