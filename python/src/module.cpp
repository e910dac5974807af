// The Python extension `sparsevlm._sparsevlm`: nanobind bindings over the
// header-only library. Arrays arrive as any DLPack-capable object (NumPy,
// PyTorch, CuPy, JAX) and are read in place through include/sparsevlm/dlpack.hpp,
// so every shape, stride, dtype and device check is the library's own and the
// messages are the C++ ones. Results come back as NumPy arrays that own their
// memory; python/sparsevlm/__init__.py turns them into the caller's framework.
// Every computation runs with the GIL released.
//
// One unit per concern (module.hpp): arrays.hpp (what they share: DLPack in,
// NumPy out, the thread's workspace, the attention source), options.cpp,
// step.cpp, session.cpp, tools.cpp; this file makes the module.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include <string>

#include <sparsevlm/config.hpp>
#include <sparsevlm/cpu/dispatch.hpp>
#include <sparsevlm/error.hpp>

#include "module.hpp"

namespace nb = nanobind;
namespace sv = sparsevlm;

sparsevlm::cpu::unit_build svpy::module_unit_build() { return SPARSEVLM_THIS_UNIT_BUILD; }

NB_MODULE(_sparsevlm, m) {
  m.doc() = "SparseVLM visual-token pruning (C++ core). Use the `sparsevlm` package.";
  m.attr("__version__") = SPARSEVLM_VERSION_STRING;
  nb::exception<sv::error>(m, "Error", PyExc_ValueError);

  m.def("isa", [] { return std::string(sv::cpu::isa_name(sv::cpu::active_isa())); },
        "The CPU instruction set the kernels use now: 'scalar', 'avx2' or 'avx512'.");

  // The option types first: the other parts' defaults are option values.
  svpy::bind_options(m);
  svpy::bind_step(m);
  svpy::bind_session(m);
  svpy::bind_tools(m);
}
