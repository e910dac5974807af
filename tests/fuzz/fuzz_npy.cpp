// Arbitrary bytes into the .npy parser: it must return a consistent array or
// throw sparsevlm::error(bad_file); anything else (a crash, a sanitizer report,
// another exception) is a finding.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <sparsevlm/io/npy.hpp>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  try {
    const auto a = sparsevlm::io::parse_npy(
        std::span<const std::byte>(reinterpret_cast<const std::byte*>(data), size), "fuzz.npy");
    std::size_t esize = a.type == sparsevlm::io::npy_type::f16 ? 2 : a.type == sparsevlm::io::npy_type::i64 ? 8 : 4;
    if (static_cast<std::size_t>(a.count()) * esize != a.bytes) std::abort();
    // Touch every byte so ASan sees any short buffer.
    const auto* p = reinterpret_cast<const unsigned char*>(a.data());
    volatile unsigned sum = 0;
    for (std::size_t i = 0; i < a.bytes; ++i) sum = sum + p[i];
  } catch (const sparsevlm::error& e) {
    if (e.code() != sparsevlm::errc::bad_file) std::abort();
  }
  return 0;
}
