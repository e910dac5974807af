// Prunes a tiny step through the installed headers; exits 0 when the result is
// the one worked out below.
#include <sparsevlm/sparsevlm.hpp>

int main() {
  using namespace sparsevlm;
  // Scores 0.1, 0.4, 0.3, 0.2 at positions 0..3: the two best are 1 and 2.
  const float scores[] = {0.1f, 0.4f, 0.3f, 0.2f};
  const auto kept = select_keep(scores, 0, 2);
  if (!(kept.size() == 2 && kept[0] == 1 && kept[1] == 2)) return 1;
  // sparsevlm_add_isa_kernels put the AVX2 kernels in (where the CPU has them).
  if (cpu::isa_supported(cpu::isa::avx2) && !cpu::isa_available(cpu::isa::avx2)) return 2;
  return 0;
}
