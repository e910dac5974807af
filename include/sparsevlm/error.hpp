// The one exception type of the host API, and the helpers that build its messages.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace sparsevlm {

/// What kind of input was refused. Stable: engines may switch on it.
enum class errc {
  invalid_argument = 1,  ///< a scalar option or count is out of range
  shape_mismatch = 2,    ///< a view's extents or strides do not fit the others
  non_finite = 3,        ///< NaN or Inf where a finite value is required
  bad_file = 4,          ///< an .npy or case.json that cannot be read as the spec says
};

/// Thrown by every public host function on bad input. The message has the form
/// "argument: expected X, got Y"; outputs are untouched when it is thrown.
class error : public std::runtime_error {
 public:
  error(errc code, const std::string& what) : std::runtime_error(what), code_(code) {}
  [[nodiscard]] errc code() const noexcept { return code_; }

 private:
  errc code_;
};

namespace detail {

template <class... Parts>
std::string concat(const Parts&... parts) {
  std::ostringstream os;
  (os << ... << parts);
  return os.str();
}

/// Throws `error(code, "<argument>: expected <expected>, got <got>")`.
template <class Expected, class Got>
[[noreturn]] void fail(errc code, const std::string& argument, const Expected& expected,
                       const Got& got) {
  throw error(code, concat(argument, ": expected ", expected, ", got ", got));
}

}  // namespace detail
}  // namespace sparsevlm

/// Throws sparsevlm::error(code, "argument: expected X, got Y") when `cond` is
/// false. A macro so that the message parts (often built with detail::concat)
/// are only evaluated on failure: checks inside per-element loops cost a compare.
#define SPARSEVLM_CHECK(cond, code, argument, expected, got)       \
  do {                                                            \
    if (!(cond)) ::sparsevlm::detail::fail(code, argument, expected, got); \
  } while (0)
