// half / bfloat16 storage and their conversions.
#include <cmath>
#include <cstdint>
#include <cstring>

#include "test_util.hpp"

using sparsevlm::bfloat16;
using sparsevlm::half;
using sparsevlm::to_bfloat16;
using sparsevlm::to_float;
using sparsevlm::to_half;
using svt::kInff;
using svt::kNaNf;

namespace {

// binary16 decoded from its definition, independently of the library:
// exponent field 0 -> man * 2^-24 (subnormal), else (1024 + man) * 2^(exp - 25).
double half_value(std::uint16_t bits) {
  const int exp = (bits >> 10) & 0x1f;
  const int man = bits & 0x3ff;
  const double sign = (bits & 0x8000) ? -1.0 : 1.0;
  if (exp == 0) return sign * std::ldexp(static_cast<double>(man), -24);
  return sign * std::ldexp(static_cast<double>(1024 + man), exp - 25);
}

std::uint32_t bits_of(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

float float_of(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

}  // namespace

TEST_CASE("dtype: names and traits") {
  CHECK(sparsevlm::dtype_name(sparsevlm::dtype::float32) == "float32");
  CHECK(sparsevlm::dtype_name(sparsevlm::dtype::float16) == "float16");
  CHECK(sparsevlm::dtype_name(sparsevlm::dtype::bfloat16) == "bfloat16");
  CHECK(sparsevlm::dtype_of<float>::value == sparsevlm::dtype::float32);
  CHECK(sparsevlm::dtype_of<half>::value == sparsevlm::dtype::float16);
  CHECK(sparsevlm::dtype_of<bfloat16>::value == sparsevlm::dtype::bfloat16);
  CHECK(sparsevlm::is_element_v<const float>);
  CHECK(sparsevlm::is_element_v<half>);
  CHECK_FALSE(sparsevlm::is_element_v<double>);
  CHECK_FALSE(sparsevlm::is_element_v<sparsevlm::index_t>);
}

TEST_CASE("dtype: float16 -> float32 hand values, subnormals exact") {
  // 0x0001 is the smallest subnormal, 1 * 2^-24; 0x03ff the largest, 1023 * 2^-24.
  CHECK(to_float(half{0x0001}) == std::ldexp(1.0f, -24));
  CHECK(to_float(half{0x03ff}) == 1023.0f * std::ldexp(1.0f, -24));
  CHECK(to_float(half{0x0200}) == std::ldexp(1.0f, -15));  // 512 * 2^-24
  CHECK(to_float(half{0x8001}) == -std::ldexp(1.0f, -24));
  CHECK(to_float(half{0x0400}) == std::ldexp(1.0f, -14));  // smallest normal
  CHECK(to_float(half{0x3c00}) == 1.0f);
  CHECK(to_float(half{0x3c01}) == 1.0f + std::ldexp(1.0f, -10));
  CHECK(to_float(half{0xc000}) == -2.0f);
  CHECK(to_float(half{0x7bff}) == 65504.0f);  // largest finite
  CHECK(to_float(half{0x3555}) == 1365.0f / 4096.0f);  // (1024 + 341) * 2^(13 - 25)
  const float nz = to_float(half{0x8000});
  CHECK(nz == 0.0f);
  CHECK(std::signbit(nz));
  CHECK(std::isinf(to_float(half{0x7c00})));
  CHECK(to_float(half{0xfc00}) < 0.0f);
  CHECK(std::isnan(to_float(half{0x7e00})));
  CHECK(std::isnan(to_float(half{0x7c01})));  // a signalling-NaN pattern stays NaN
}

TEST_CASE("dtype: float16 -> float32 exact for all 65536 patterns, round trip for non-NaN") {
  int checked = 0;
  for (std::uint32_t b = 0; b <= 0xffffu; ++b) {
    const auto bits = static_cast<std::uint16_t>(b);
    const float f = to_float(half{bits});
    const bool is_nan = ((bits >> 10) & 0x1f) == 0x1f && (bits & 0x3ff) != 0;
    if (is_nan) {
      if (!std::isnan(f)) FAIL_CHECK("NaN pattern ", b, " decoded to ", f);
      continue;
    }
    if (((bits >> 10) & 0x1f) != 0x1f) {
      if (static_cast<double>(f) != half_value(bits)) FAIL_CHECK("pattern ", b, " decoded to ", f);
    }
    if (std::signbit(f) != ((bits & 0x8000) != 0)) FAIL_CHECK("sign of pattern ", b);
    if (to_half(f).bits != bits) FAIL_CHECK("round trip of ", b, " gave ", to_half(f).bits);
    ++checked;
  }
  CHECK(checked == 65536 - 2 * 1023);
}

TEST_CASE("dtype: float32 -> float16 round to nearest even, hand values") {
  const float u = std::ldexp(1.0f, -11);  // half an ulp of float16 at 1.0
  CHECK(to_half(1.0f).bits == 0x3c00);
  CHECK(to_half(1.0f + u).bits == 0x3c00);                // tie -> even mantissa 0
  CHECK(to_half(1.0f + 3 * u).bits == 0x3c02);            // tie between 1 and 2 -> 2
  CHECK(to_half(1.0f + u + std::ldexp(1.0f, -20)).bits == 0x3c01);  // just above a tie
  CHECK(to_half(1.0f + u - std::ldexp(1.0f, -20)).bits == 0x3c00);  // just below
  CHECK(to_half(-2.0f).bits == 0xc000);
  CHECK(to_half(65504.0f).bits == 0x7bff);
  CHECK(to_half(65519.0f).bits == 0x7bff);  // below the tie with 65536
  CHECK(to_half(65520.0f).bits == 0x7c00);  // tie 65504/65536 -> even -> overflows to Inf
  CHECK(to_half(1e6f).bits == 0x7c00);
  CHECK(to_half(-1e6f).bits == 0xfc00);
  CHECK(to_half(kInff).bits == 0x7c00);
  CHECK(std::isnan(to_float(to_half(kNaNf))));
  CHECK(std::isnan(to_float(to_half(float_of(0x7f800001u)))));  // low-payload NaN stays NaN
  // Subnormal results: 2^-25 is half the smallest subnormal, a tie to even 0.
  CHECK(to_half(std::ldexp(1.0f, -25)).bits == 0x0000);
  CHECK(to_half(std::nextafter(std::ldexp(1.0f, -25), 1.0f)).bits == 0x0001);
  CHECK(to_half(std::ldexp(1.0f, -26)).bits == 0x0000);
  CHECK(to_half(3.0f * std::ldexp(1.0f, -25)).bits == 0x0002);  // 1.5 * 2^-24 -> 2
  CHECK(to_half(5.0f * std::ldexp(1.0f, -25)).bits == 0x0002);  // 2.5 * 2^-24 -> 2
  CHECK(to_half(-std::ldexp(1.0f, -24)).bits == 0x8001);
  CHECK(to_half(-0.0f).bits == 0x8000);
  // 1023.5 * 2^-24 lies halfway between the largest subnormal (odd) and 2^-14.
  CHECK(to_half(1023.5f * std::ldexp(1.0f, -24)).bits == 0x0400);
  CHECK(to_half(1022.5f * std::ldexp(1.0f, -24)).bits == 0x03fe);
}

TEST_CASE("dtype: float32 -> float16 exhaustive midpoints between neighbours") {
  // For each pair of adjacent finite float16 values a < b (bits i, i + 1), their
  // midpoint is exact in float32: it rounds to the even one of the two, and the
  // float32 neighbours of the midpoint round down and up.
  for (std::uint32_t i = 0; i < 0x7bffu; ++i) {
    const float a = to_float(half{static_cast<std::uint16_t>(i)});
    const float b = to_float(half{static_cast<std::uint16_t>(i + 1)});
    const float mid = static_cast<float>((static_cast<double>(a) + b) / 2);
    const std::uint16_t even = static_cast<std::uint16_t>((i & 1u) ? i + 1 : i);
    if (to_half(mid).bits != even) FAIL_CHECK("midpoint after ", i);
    if (to_half(std::nextafter(mid, 0.0f)).bits != i) FAIL_CHECK("below midpoint after ", i);
    if (to_half(std::nextafter(mid, kInff)).bits != i + 1) FAIL_CHECK("above midpoint after ", i);
    if (to_half(-mid).bits != (even | 0x8000u)) FAIL_CHECK("negative midpoint after ", i);
  }
}

TEST_CASE("dtype: bfloat16 conversions") {
  CHECK(to_float(bfloat16{0x3f80}) == 1.0f);
  CHECK(to_float(bfloat16{0xc040}) == -3.0f);
  CHECK(to_float(bfloat16{0x0001}) == float_of(0x00010000u));  // a float32 subnormal
  CHECK(to_bfloat16(1.0f).bits == 0x3f80);
  const float u = std::ldexp(1.0f, -8);  // half an ulp of bfloat16 at 1.0
  CHECK(to_bfloat16(1.0f + u).bits == 0x3f80);      // tie -> even
  CHECK(to_bfloat16(1.0f + 3 * u).bits == 0x3f82);  // tie -> even (up)
  CHECK(to_bfloat16(1.0f + u + std::ldexp(1.0f, -20)).bits == 0x3f81);
  CHECK(to_bfloat16(1.0f + u - std::ldexp(1.0f, -20)).bits == 0x3f80);
  CHECK(to_bfloat16(-(1.0f + 3 * u)).bits == 0xbf82);
  CHECK(to_bfloat16(float_of(0x7f7fffffu)).bits == 0x7f80);  // FLT_MAX rounds to Inf
  CHECK(to_bfloat16(float_of(0x7f7f7fffu)).bits == 0x7f7f);  // below the tie stays finite
  CHECK(to_bfloat16(kInff).bits == 0x7f80);
  CHECK(std::isnan(to_float(to_bfloat16(kNaNf))));
  CHECK(std::isnan(to_float(to_bfloat16(float_of(0x7f800001u)))));  // not turned into Inf
  CHECK(std::isnan(to_float(to_bfloat16(float_of(0xff800001u)))));

  // Round trip of every non-NaN pattern.
  for (std::uint32_t b = 0; b <= 0xffffu; ++b) {
    const bool is_nan = (b & 0x7f80u) == 0x7f80u && (b & 0x7fu) != 0;
    const float f = to_float(bfloat16{static_cast<std::uint16_t>(b)});
    if (bits_of(f) != (b << 16)) FAIL_CHECK("bfloat16 ", b, " decodes to ", f);
    if (is_nan) continue;
    if (to_bfloat16(f).bits != b) FAIL_CHECK("bfloat16 round trip of ", b);
  }
  // Midpoints between neighbours tie to even (exact in float32: 9 significant bits).
  for (std::uint32_t i = 0; i < 0x7f7fu; ++i) {
    const float a = to_float(bfloat16{static_cast<std::uint16_t>(i)});
    const float b = to_float(bfloat16{static_cast<std::uint16_t>(i + 1)});
    const float mid = static_cast<float>((static_cast<double>(a) + b) / 2);
    const std::uint32_t even = (i & 1u) ? i + 1 : i;
    if (to_bfloat16(mid).bits != even) FAIL_CHECK("bfloat16 midpoint after ", i);
    if (to_bfloat16(std::nextafter(mid, 0.0f)).bits != i) FAIL_CHECK("below bf16 midpoint ", i);
    if (to_bfloat16(std::nextafter(mid, kInff)).bits != i + 1) FAIL_CHECK("above bf16 midpoint ", i);
  }
}

TEST_CASE("dtype: from_float dispatches on the element type") {
  CHECK(sparsevlm::from_float<float>(0.1f) == 0.1f);
  CHECK(sparsevlm::from_float<half>(0.5f).bits == 0x3800);
  CHECK(sparsevlm::from_float<bfloat16>(0.5f).bits == 0x3f00);
}
