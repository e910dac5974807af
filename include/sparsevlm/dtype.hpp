// Storage types for 16-bit floats, and their exact conversions to float32.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string_view>
#include <type_traits>

#include "config.hpp"

namespace sparsevlm {

/// IEEE 754 binary16 storage. Only converts; arithmetic happens in float32.
struct half {
  std::uint16_t bits = 0;
};

/// bfloat16 storage (the upper 16 bits of a float32).
struct bfloat16 {
  std::uint16_t bits = 0;
};

/// Element types the views accept.
enum class dtype { float32, float16, bfloat16 };

constexpr std::string_view dtype_name(dtype t) noexcept {
  switch (t) {
    case dtype::float32: return "float32";
    case dtype::float16: return "float16";
    case dtype::bfloat16: return "bfloat16";
  }
  return "unknown";
}

template <class T>
struct dtype_of;
template <>
struct dtype_of<float> : std::integral_constant<dtype, dtype::float32> {};
template <>
struct dtype_of<half> : std::integral_constant<dtype, dtype::float16> {};
template <>
struct dtype_of<bfloat16> : std::integral_constant<dtype, dtype::bfloat16> {};

template <class T>
inline constexpr bool is_element_v =
    std::is_same_v<std::remove_cv_t<T>, float> || std::is_same_v<std::remove_cv_t<T>, half> ||
    std::is_same_v<std::remove_cv_t<T>, bfloat16>;

namespace detail {

SPARSEVLM_HD inline float bits_to_float(std::uint32_t u) noexcept {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

SPARSEVLM_HD inline std::uint32_t float_to_bits(float f) noexcept {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

}  // namespace detail

/// Exact binary16 -> float32, subnormals included. Done in integer arithmetic so
/// that no FTZ/DAZ mode of the FPU can flush small attention values to zero (a
/// shared case depends on them).
SPARSEVLM_HD inline float to_float(half h) noexcept {
  const std::uint32_t sign = static_cast<std::uint32_t>(h.bits & 0x8000u) << 16;
  std::uint32_t exp = (h.bits >> 10) & 0x1fu;
  std::uint32_t man = h.bits & 0x3ffu;
  std::uint32_t out;
  if (exp == 0x1fu) {
    out = sign | 0x7f800000u | (man << 13);  // Inf / NaN
  } else if (exp != 0) {
    out = sign | ((exp + 112u) << 23) | (man << 13);
  } else if (man == 0) {
    out = sign;  // signed zero
  } else {
    // Subnormal: normalise the mantissa; the value is man * 2^-24.
    int e = -1;
    do {
      ++e;
      man <<= 1;
    } while ((man & 0x400u) == 0);
    out = sign | ((112u - static_cast<std::uint32_t>(e)) << 23) | ((man & 0x3ffu) << 13);
  }
  return detail::bits_to_float(out);
}

SPARSEVLM_HD inline float to_float(bfloat16 b) noexcept {
  return detail::bits_to_float(static_cast<std::uint32_t>(b.bits) << 16);
}

SPARSEVLM_HD inline float to_float(float f) noexcept { return f; }

/// float32 -> binary16, round to nearest even, overflow to Inf, NaN kept NaN.
SPARSEVLM_HD inline half to_half(float f) noexcept {
  const std::uint32_t u = detail::float_to_bits(f);
  const std::uint16_t sign = static_cast<std::uint16_t>((u >> 16) & 0x8000u);
  const std::uint32_t abs = u & 0x7fffffffu;
  if (abs >= 0x7f800000u) {  // Inf or NaN
    return half{static_cast<std::uint16_t>(sign | 0x7c00u | (abs > 0x7f800000u ? 0x200u : 0u))};
  }
  if (abs >= 0x477ff000u) return half{static_cast<std::uint16_t>(sign | 0x7c00u)};  // rounds to Inf
  if (abs < 0x38800000u) {  // result is subnormal or zero
    if (abs < 0x33000000u) return half{sign};  // below half of the smallest subnormal
    const std::uint32_t exp = abs >> 23;
    const std::uint32_t man = (abs & 0x7fffffu) | 0x800000u;
    const std::uint32_t shift = 126u - exp;  // 14..24
    std::uint32_t r = man >> shift;
    const std::uint32_t rem = man & ((1u << shift) - 1u);
    const std::uint32_t halfway = 1u << (shift - 1u);
    if (rem > halfway || (rem == halfway && (r & 1u))) ++r;
    return half{static_cast<std::uint16_t>(sign | r)};
  }
  std::uint32_t r = ((abs >> 13) - (112u << 10));
  const std::uint32_t rem = abs & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) ++r;
  return half{static_cast<std::uint16_t>(sign | r)};
}

/// float32 -> bfloat16, round to nearest even, NaN kept NaN.
SPARSEVLM_HD inline bfloat16 to_bfloat16(float f) noexcept {
  const std::uint32_t u = detail::float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    return bfloat16{static_cast<std::uint16_t>((u >> 16) | 0x40u)};
  }
  const std::uint32_t rounding = 0x7fffu + ((u >> 16) & 1u);
  return bfloat16{static_cast<std::uint16_t>((u + rounding) >> 16)};
}

/// Converts a float32 to any element type (used by writers and tests).
template <class T>
SPARSEVLM_HD inline T from_float(float f) noexcept {
  if constexpr (std::is_same_v<T, half>) {
    return to_half(f);
  } else if constexpr (std::is_same_v<T, bfloat16>) {
    return to_bfloat16(f);
  } else {
    return f;
  }
}

}  // namespace sparsevlm
