// A small, strict reader and writer for NumPy .npy files (format 1.0/2.0/3.0).
// Not part of the umbrella header: the CLI and tests use it; engines need not.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include <sparsevlm/dtype.hpp>
#include <sparsevlm/error.hpp>
#include <sparsevlm/view.hpp>

namespace sparsevlm::io {

/// Element types an .npy may hold here.
enum class npy_type { f32, f16, i64 };

/// A loaded array: C order, little-endian, data aligned for its element type.
struct npy_array {
  npy_type type = npy_type::f32;
  std::vector<index_t> shape;
  std::vector<std::uint64_t> storage;  // 8-byte aligned backing store
  std::size_t bytes = 0;

  [[nodiscard]] index_t count() const {
    index_t n = 1;
    for (index_t e : shape) n *= e;
    return n;
  }
  [[nodiscard]] const void* data() const { return storage.data(); }
  template <class T>
  [[nodiscard]] const T* as() const {
    return reinterpret_cast<const T*>(storage.data());
  }
};

inline std::string_view npy_type_name(npy_type t) {
  switch (t) {
    case npy_type::f32: return "float32";
    case npy_type::f16: return "float16";
    case npy_type::i64: return "int64";
  }
  return "unknown";
}

namespace detail_npy {

inline std::size_t element_size(npy_type t) { return t == npy_type::f16 ? 2 : t == npy_type::i64 ? 8 : 4; }

[[noreturn]] inline void bad(const std::string& name, const std::string& expected,
                             const std::string& got) {
  sparsevlm::detail::fail(errc::bad_file, name, expected, got);
}

/// Minimal parser of the header's Python dict literal:
/// {'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }
class header_parser {
 public:
  header_parser(std::string_view text, const std::string& name) : s_(text), name_(name) {}

  void parse(std::string& descr, bool& fortran, std::vector<index_t>& shape) {
    bool has_descr = false, has_fortran = false, has_shape = false;
    skip_ws();
    expect('{');
    for (;;) {
      skip_ws();
      if (peek() == '}') {
        ++i_;
        break;
      }
      const std::string key = parse_string();
      skip_ws();
      expect(':');
      skip_ws();
      if (key == "descr") {
        descr = parse_string();
        has_descr = true;
      } else if (key == "fortran_order") {
        fortran = parse_bool();
        has_fortran = true;
      } else if (key == "shape") {
        shape = parse_shape();
        has_shape = true;
      } else {
        bad(name_, "only the keys descr, fortran_order, shape in the header", "key '" + key + "'");
      }
      skip_ws();
      if (peek() == ',') {
        ++i_;
        continue;
      }
      skip_ws();
      expect('}');
      break;
    }
    if (!has_descr || !has_fortran || !has_shape)
      bad(name_, "a header with descr, fortran_order and shape", "a header missing one");
    skip_ws();
    if (i_ != s_.size()) bad(name_, "nothing after the header dict", "trailing characters");
  }

 private:
  char peek() const { return i_ < s_.size() ? s_[i_] : '\0'; }
  void skip_ws() {
    while (i_ < s_.size() && (s_[i_] == ' ' || s_[i_] == '\n' || s_[i_] == '\t' || s_[i_] == '\r'))
      ++i_;
  }
  void expect(char c) {
    if (peek() != c)
      bad(name_, std::string("'") + c + "' in the header",
          i_ < s_.size() ? std::string("'") + s_[i_] + "'" : "the end of the header");
    ++i_;
  }
  std::string parse_string() {
    const char q = peek();
    if (q != '\'' && q != '"') bad(name_, "a quoted string in the header", "something else");
    ++i_;
    const std::size_t end = s_.find(q, i_);
    if (end == std::string_view::npos) bad(name_, "a closed string in the header", "no closing quote");
    std::string out(s_.substr(i_, end - i_));
    i_ = end + 1;
    return out;
  }
  bool parse_bool() {
    if (s_.substr(i_, 4) == "True") {
      i_ += 4;
      return true;
    }
    if (s_.substr(i_, 5) == "False") {
      i_ += 5;
      return false;
    }
    bad(name_, "True or False for fortran_order", "something else");
  }
  std::vector<index_t> parse_shape() {
    std::vector<index_t> shape;
    expect('(');
    for (;;) {
      skip_ws();
      if (peek() == ')') {
        ++i_;
        break;
      }
      if (peek() < '0' || peek() > '9') bad(name_, "a non-negative integer in shape", "something else");
      index_t v = 0;
      while (peek() >= '0' && peek() <= '9') {
        const int digit = peek() - '0';
        if (v > (std::numeric_limits<index_t>::max() - digit) / 10)
          bad(name_, "a shape entry that fits in int64", "an overflowing one");
        v = v * 10 + digit;
        ++i_;
      }
      shape.push_back(v);
      if (shape.size() > 8) bad(name_, "at most 8 dimensions", "more");
      skip_ws();
      if (peek() == ',') {
        ++i_;
        continue;
      }
      skip_ws();
      expect(')');
      break;
    }
    return shape;
  }

  std::string_view s_;
  const std::string& name_;
  std::size_t i_ = 0;
};

}  // namespace detail_npy

/// Parses an in-memory .npy image. `name` labels errors (a file name).
/// Accepts little-endian float32 ('<f4'), float16 ('<f2') and int64 ('<i8'),
/// C order; rejects anything else, a bad magic or version, a malformed header,
/// and a payload whose size differs from the shape's (truncated or padded).
/// Errors: sparsevlm::error with errc::bad_file.
inline npy_array parse_npy(std::span<const std::byte> bytes, const std::string& name) {
  using detail_npy::bad;
  static constexpr unsigned char magic[6] = {0x93, 'N', 'U', 'M', 'P', 'Y'};
  if (bytes.size() < 10 || std::memcmp(bytes.data(), magic, 6) != 0)
    bad(name, "an .npy file (magic \\x93NUMPY)", bytes.size() < 10 ? "fewer than 10 bytes" : "another magic");
  const auto major = static_cast<unsigned>(bytes[6]);
  std::size_t header_len = 0, offset = 0;
  if (major == 1) {
    header_len = static_cast<std::size_t>(bytes[8]) | (static_cast<std::size_t>(bytes[9]) << 8);
    offset = 10;
  } else if (major == 2 || major == 3) {
    if (bytes.size() < 12) bad(name, "a complete version 2 preamble", "a truncated file");
    header_len = 0;
    for (int b = 3; b >= 0; --b) header_len = (header_len << 8) | static_cast<std::size_t>(bytes[8 + b]);
    offset = 12;
  } else {
    bad(name, "format version 1, 2 or 3", "version " + std::to_string(major));
  }
  if (header_len > bytes.size() - offset)
    bad(name, "a header of " + std::to_string(header_len) + " bytes", "a truncated file");
  const std::string_view header(reinterpret_cast<const char*>(bytes.data()) + offset, header_len);
  std::string descr;
  bool fortran = false;
  npy_array out;
  detail_npy::header_parser(header, name).parse(descr, fortran, out.shape);
  if (descr == "<f4") {
    out.type = npy_type::f32;
  } else if (descr == "<f2") {
    out.type = npy_type::f16;
  } else if (descr == "<i8") {
    out.type = npy_type::i64;
  } else {
    bad(name, "dtype '<f4' (float32), '<f2' (float16) or '<i8' (int64)", "'" + descr + "'");
  }
  if (fortran) bad(name, "C order (fortran_order: False)", "fortran_order: True");
  std::size_t count = 1;
  const std::size_t esize = detail_npy::element_size(out.type);
  // The product of the non-zero extents must fit too: an empty array of shape
  // (0, 2^32, 2^32) would otherwise overflow every stride computed from it.
  std::size_t nonzero = 1;
  for (index_t e : out.shape) {
    if (e == 0) continue;
    if (nonzero > std::numeric_limits<std::size_t>::max() / esize / static_cast<std::size_t>(e) ||
        static_cast<index_t>(nonzero) > std::numeric_limits<index_t>::max() / 8 / e)
      bad(name, "a shape whose byte size fits in memory", "an overflowing shape");
    nonzero *= static_cast<std::size_t>(e);
  }
  for (index_t e : out.shape) count *= static_cast<std::size_t>(e);
  const std::size_t payload = bytes.size() - offset - header_len;
  out.bytes = count * esize;
  if (payload != out.bytes)
    bad(name, std::to_string(out.bytes) + " data bytes for the shape",
        std::to_string(payload) + (payload < out.bytes ? " (truncated)" : " (trailing bytes)"));
  out.storage.resize((out.bytes + 7) / 8);
  if (out.bytes > 0) std::memcpy(out.storage.data(), bytes.data() + offset + header_len, out.bytes);
  return out;
}

/// Reads an .npy file. Errors: errc::bad_file when missing, unreadable or malformed.
inline npy_array read_npy(const std::filesystem::path& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) detail_npy::bad(path.string(), "a readable file", "cannot open it");
  std::vector<char> buf((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  return parse_npy(std::as_bytes(std::span<const char>(buf)), path.string());
}

/// Serialises a C-order float32 array as an .npy (format 1.0) image.
inline std::vector<char> format_npy(const float* data, std::span<const index_t> shape) {
  std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': (";
  std::size_t count = 1;
  for (std::size_t i = 0; i < shape.size(); ++i) {
    header += std::to_string(shape[i]);
    header += (shape.size() == 1 || i + 1 < shape.size()) ? "," : "";
    if (i + 1 < shape.size()) header += " ";
    count *= static_cast<std::size_t>(shape[i]);
  }
  header += "), }";
  // Pad so that the data starts at a multiple of 64 bytes, newline-terminated.
  const std::size_t unpadded = 10 + header.size() + 1;
  header.append((64 - unpadded % 64) % 64, ' ');
  header += '\n';
  // One allocation, filled with memcpy: chained inserts trip a g++ 12
  // -Wstringop-overflow false positive.
  const char pre[8] = {'\x93', 'N', 'U', 'M', 'P', 'Y', '\x01', '\x00'};
  std::vector<char> out(10 + header.size() + count * 4);
  std::memcpy(out.data(), pre, 8);
  out[8] = static_cast<char>(header.size() & 0xff);
  out[9] = static_cast<char>((header.size() >> 8) & 0xff);
  std::memcpy(out.data() + 10, header.data(), header.size());
  if (count > 0) std::memcpy(out.data() + 10 + header.size(), data, count * 4);
  return out;
}

/// Writes a C-order float32 array to `path`. Errors: errc::bad_file when the file
/// cannot be written.
inline void write_npy(const std::filesystem::path& path, const float* data,
                      std::span<const index_t> shape) {
  const std::vector<char> img = format_npy(data, shape);
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  if (!f) detail_npy::bad(path.string(), "a writable file", "cannot open it");
  f.write(img.data(), static_cast<std::streamsize>(img.size()));
  if (!f) detail_npy::bad(path.string(), "a complete write", "a write error");
}

}  // namespace sparsevlm::io
