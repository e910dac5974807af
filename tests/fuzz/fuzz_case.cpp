// Arbitrary bytes as case.json, loaded against a fixture folder of small valid
// .npy files, then run: either a result or sparsevlm::error, nothing else.
#include <cstddef>
#include <cstdint>
#include <string>
#include <sparsevlm/io/case.hpp>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  try {
    const auto c = sparsevlm::io::load_case_json(text, SPARSEVLM_FUZZ_FIXTURE);
    sparsevlm::workspace ws;
    const auto r = sparsevlm::io::run_case(c, ws);
    (void)sparsevlm::io::result_json(r).dump();
  } catch (const sparsevlm::error&) {
  }
  return 0;
}
