// io/npy.hpp and io/case.hpp: the .npy reader/writer and case folders.

#include <chrono>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>
#include <sparsevlm/io/case.hpp>
#include <sparsevlm/io/npy.hpp>

#include "test_util.hpp"

namespace fs = std::filesystem;
using sparsevlm::errc;
using sparsevlm::index_t;
namespace io = sparsevlm::io;

namespace {

/// An .npy image built by hand: magic, version, little-endian header length,
/// the dict padded with spaces and a newline to a multiple of 64, the payload.
std::vector<std::byte> npy_image(int major, const std::string& dict, const void* data,
                                 std::size_t nbytes) {
  const std::size_t pre = major == 1 ? 10 : 12;
  std::string header = dict;
  const std::size_t unpadded = pre + header.size() + 1;
  header.append((64 - unpadded % 64) % 64, ' ');
  header += '\n';
  std::vector<std::byte> out;
  const unsigned char magic[6] = {0x93, 'N', 'U', 'M', 'P', 'Y'};
  for (unsigned char ch : magic) out.push_back(static_cast<std::byte>(ch));
  out.push_back(static_cast<std::byte>(major));
  out.push_back(std::byte{0});
  std::size_t len = header.size();
  for (std::size_t b = 0; b < pre - 8; ++b) {
    out.push_back(static_cast<std::byte>(len & 0xff));
    len >>= 8;
  }
  for (char ch : header) out.push_back(static_cast<std::byte>(ch));
  const auto* p = static_cast<const std::byte*>(data);
  out.insert(out.end(), p, p + nbytes);
  return out;
}

std::string f4_dict(const std::string& shape) {
  return "{'descr': '<f4', 'fortran_order': False, 'shape': " + shape + ", }";
}

io::npy_array parse(const std::vector<std::byte>& img) { return io::parse_npy(img, "x.npy"); }

struct temp_dir {
  fs::path path;
  temp_dir() {
    static int counter = 0;
    const auto stamp = std::chrono::steady_clock::now().time_since_epoch().count();
    path = fs::temp_directory_path() /
           ("sparsevlm_test_" + std::to_string(stamp) + "_" + std::to_string(++counter));
    fs::create_directories(path);
  }
  ~temp_dir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  temp_dir(const temp_dir&) = delete;
  temp_dir& operator=(const temp_dir&) = delete;
};

void write_text(const fs::path& p, const std::string& text) {
  std::ofstream f(p, std::ios::trunc);
  f << text;
}

void write_bytes(const fs::path& p, const std::vector<std::byte>& bytes) {
  std::ofstream f(p, std::ios::binary | std::ios::trunc);
  f.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
}

// The step of test_step.cpp's example A as a case folder: L = 7, visual [1, 5),
// raters {5, 6}, head 0 rows 5 and 6 = (1, .5, .25, .125) and half of it, head 1
// zero (attention elsewhere 1/64), hidden row p = (p, -2p). Rank 1, policy
// floor(2 * 1) = 2 keeps positions 1, 2; the other two are one cluster,
// merged (3.5, -7); sequence 0 1 2 -1 5 6.
struct case_a {
  std::vector<float> embeds, attn, hidden;
  case_a() : embeds(14), attn(2 * 49, 1.0f / 64), hidden(14) {
    const float r5[4] = {1, 0.5f, 0.25f, 0.125f};
    for (int j = 0; j < 4; ++j) {
      attn[static_cast<std::size_t>(5 * 7 + 1 + j)] = r5[j];
      attn[static_cast<std::size_t>(6 * 7 + 1 + j)] = r5[j] / 2;
      attn[static_cast<std::size_t>(49 + 5 * 7 + 1 + j)] = 0;
      attn[static_cast<std::size_t>(49 + 6 * 7 + 1 + j)] = 0;
    }
    for (int p = 0; p < 7; ++p) {
      hidden[static_cast<std::size_t>(2 * p)] = static_cast<float>(p);
      hidden[static_cast<std::size_t>(2 * p + 1)] = static_cast<float>(-2 * p);
      embeds[static_cast<std::size_t>(2 * p)] = static_cast<float>(p % 3);
      embeds[static_cast<std::size_t>(2 * p + 1)] = static_cast<float>(p % 2);
    }
  }
  void write(const fs::path& dir) const {
    const std::vector<index_t> s2{7, 2}, s3{2, 7, 7};
    io::write_npy(dir / "embeds.npy", embeds.data(), s2);
    io::write_npy(dir / "attn.npy", attn.data(), s3);
    io::write_npy(dir / "hidden.npy", hidden.data(), s2);
  }
};

nlohmann::json case_a_json() {
  return nlohmann::json::parse(R"({
    "format": "sparsevlm-case/1",
    "visual": {"start": 1, "len": 4},
    "embeds": "embeds.npy", "attn": "attn.npy", "hidden": "hidden.npy",
    "raters": [5, 6],
    "policy": {"kind": "rank", "scale": 2.0, "bias": 0},
    "recycle": {"enabled": true, "fraction": 0.5, "cluster_divisor": 10}
  })");
}

}  // namespace

TEST_CASE("npy: valid float32, float16 and int64 images, versions 1 and 2") {
  const float f[6] = {1, -2, 0.5f, 3, 4, 1e-3f};
  auto a = parse(npy_image(1, f4_dict("(2, 3)"), f, sizeof f));
  CHECK(a.type == io::npy_type::f32);
  CHECK(a.shape == std::vector<index_t>{2, 3});
  CHECK(a.count() == 6);
  CHECK(a.bytes == 24);
  CHECK(std::memcmp(a.as<float>(), f, sizeof f) == 0);

  const std::uint16_t h[3] = {0x3c00, 0x0001, 0xc000};  // 1, 2^-24, -2
  a = parse(npy_image(1, "{'descr': '<f2', 'fortran_order': False, 'shape': (3,), }", h, sizeof h));
  CHECK(a.type == io::npy_type::f16);
  CHECK(a.shape == std::vector<index_t>{3});
  CHECK(sparsevlm::to_float(a.as<sparsevlm::half>()[1]) == std::ldexp(1.0f, -24));
  CHECK(sparsevlm::to_float(a.as<sparsevlm::half>()[2]) == -2.0f);

  const std::int64_t i[4] = {1, -2, 3, std::int64_t{1} << 40};
  a = parse(npy_image(1, "{'descr': '<i8', 'fortran_order': False, 'shape': (2, 2), }", i, sizeof i));
  CHECK(a.type == io::npy_type::i64);
  CHECK(a.as<std::int64_t>()[3] == (std::int64_t{1} << 40));
  CHECK(a.as<std::int64_t>()[1] == -2);

  // Version 2 (4-byte header length), double quotes, keys in another order,
  // no trailing comma.
  a = parse(npy_image(2, R"({"shape": (4,), "fortran_order": False, "descr": "<f4"})", f, 16));
  CHECK(a.type == io::npy_type::f32);
  CHECK(a.shape == std::vector<index_t>{4});
  CHECK(a.as<float>()[3] == 3.0f);
  // A scalar (shape ()) holds one element; shape (0, 3) none.
  a = parse(npy_image(1, f4_dict("()"), f, 4));
  CHECK(a.shape.empty());
  CHECK(a.count() == 1);
  CHECK(a.as<float>()[0] == 1.0f);
  a = parse(npy_image(1, f4_dict("(0, 3)"), f, 0));
  CHECK(a.count() == 0);
  CHECK(a.bytes == 0);
}

TEST_CASE("npy: malformed images are refused with errc::bad_file naming the file") {
  const float f[6] = {1, 2, 3, 4, 5, 6};
  const auto good = npy_image(1, f4_dict("(2, 3)"), f, sizeof f);
  REQUIRE_NOTHROW(parse(good));

  auto bad = good;
  bad[1] = std::byte{'X'};
  SV_CHECK_THROWS(errc::bad_file, "x.npy", parse(bad));
  SV_CHECK_THROWS(errc::bad_file, "magic", parse(bad));
  SV_CHECK_THROWS(errc::bad_file, "x.npy", parse(std::vector<std::byte>(good.begin(), good.begin() + 9)));
  SV_CHECK_THROWS(errc::bad_file, "x.npy", parse(std::vector<std::byte>{}));
  bad = good;
  bad[6] = std::byte{4};
  SV_CHECK_THROWS(errc::bad_file, "version", parse(bad));
  // Truncated data, and trailing bytes.
  SV_CHECK_THROWS(errc::bad_file, "truncated", parse(std::vector<std::byte>(good.begin(), good.end() - 1)));
  bad = good;
  bad.push_back(std::byte{0});
  SV_CHECK_THROWS(errc::bad_file, "trailing", parse(bad));
  // A header length pointing past the end of the file.
  bad = good;
  bad[9] = std::byte{0x7f};
  SV_CHECK_THROWS(errc::bad_file, "truncated", parse(bad));
  // A version 2 preamble cut short.
  const auto v2 = npy_image(2, f4_dict("(1,)"), f, 4);
  REQUIRE_NOTHROW(parse(v2));
  SV_CHECK_THROWS(errc::bad_file, "x.npy", parse(std::vector<std::byte>(v2.begin(), v2.begin() + 11)));
  // Unsupported dtypes.
  const double d[6] = {};
  SV_CHECK_THROWS(errc::bad_file, "'<f8'",
                  parse(npy_image(1, "{'descr': '<f8', 'fortran_order': False, 'shape': (2, 3), }", d, sizeof d)));
  SV_CHECK_THROWS(errc::bad_file, "'>f4'",
                  parse(npy_image(1, "{'descr': '>f4', 'fortran_order': False, 'shape': (2, 3), }", f, sizeof f)));
  SV_CHECK_THROWS(errc::bad_file, "'|u1'",
                  parse(npy_image(1, "{'descr': '|u1', 'fortran_order': False, 'shape': (4,), }", f, 4)));
  // Fortran order.
  SV_CHECK_THROWS(errc::bad_file, "fortran_order",
                  parse(npy_image(1, "{'descr': '<f4', 'fortran_order': True, 'shape': (2, 3), }", f, sizeof f)));
  // Malformed header dicts.
  for (const char* dict : {
           "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), ",      // no closing brace
           "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3)} junk",  // text after the dict
           "{'descr': '<f4', 'fortran_order': False}",                        // missing shape
           "{'descr': '<f4', 'fortran_order': false, 'shape': (2, 3)}",       // not a Python bool
           "{'descr': '<f4', 'fortran_order': False, 'shape': (2, -3)}",      // negative extent
           "{'descr': '<f4', 'fortran_order': False, 'shape': [2, 3]}",       // a list
           "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), 'x': 1}",  // unknown key
           "{descr: '<f4', 'fortran_order': False, 'shape': (2, 3)}",         // unquoted key
           "{'descr': '<f4, 'fortran_order': False, 'shape': (2, 3)}",        // unbalanced quote
           "('descr', '<f4')",                                                // not a dict
       }) {
    INFO(dict);
    SV_CHECK_THROWS(errc::bad_file, "x.npy", parse(npy_image(1, dict, f, sizeof f)));
  }
  // Shapes that overflow: an entry past int64, and a product past size_t.
  SV_CHECK_THROWS(errc::bad_file, "int64", parse(npy_image(1, f4_dict("(99999999999999999999,)"), f, 4)));
  SV_CHECK_THROWS(errc::bad_file, "overflowing",
                  parse(npy_image(1, f4_dict("(4294967296, 4294967296, 4294967296)"), f, 4)));
}

TEST_CASE("npy: format_npy -> parse_npy round trip, and files") {
  std::mt19937 g(3);
  for (const std::vector<index_t>& shape :
       {std::vector<index_t>{2, 3}, {5}, {}, {0, 4}, {1, 1, 7}, {3, 4, 5}}) {
    index_t n = 1;
    for (index_t e : shape) n *= e;
    const auto data = svt::random_floats(g, static_cast<std::size_t>(n), -10.0f, 10.0f);
    const auto img = io::format_npy(data.data(), shape);
    // The header is padded so that the data starts on a 64-byte boundary.
    const std::size_t header_len = static_cast<unsigned char>(img[8]) | (static_cast<std::size_t>(static_cast<unsigned char>(img[9])) << 8);
    CHECK((10 + header_len) % 64 == 0);
    CHECK(img[10 + header_len - 1] == '\n');
    const auto a = io::parse_npy(std::as_bytes(std::span<const char>(img)), "rt");
    CHECK(a.type == io::npy_type::f32);
    CHECK(a.shape == shape);
    CHECK(a.count() == n);
    if (!data.empty())  // memcmp must not see the null data of an empty vector
      CHECK(std::memcmp(a.as<float>(), data.data(), data.size() * sizeof(float)) == 0);
  }
  temp_dir tmp;
  const std::vector<float> v{1, 2, 3, 4, 5, 6};
  io::write_npy(tmp.path / "a.npy", v.data(), std::vector<index_t>{3, 2});
  const auto a = io::read_npy(tmp.path / "a.npy");
  CHECK(a.shape == std::vector<index_t>{3, 2});
  CHECK(a.as<float>()[5] == 6.0f);
  SV_CHECK_THROWS(errc::bad_file, "nope.npy", io::read_npy(tmp.path / "nope.npy"));
  SV_CHECK_THROWS(errc::bad_file, "no_such_dir",
                  io::write_npy(tmp.path / "no_such_dir" / "a.npy", v.data(), std::vector<index_t>{6}));
}

TEST_CASE("case: a valid case loads and runs") {
  temp_dir tmp;
  const case_a ca;
  ca.write(tmp.path);
  write_text(tmp.path / "case.json", case_a_json().dump());
  const io::case_data c = io::load_case(tmp.path);
  CHECK(c.visual.start == 1);
  CHECK(c.visual.len == 4);
  REQUIRE(c.raters.has_value());
  CHECK(*c.raters == std::vector<index_t>{5, 6});
  CHECK(c.options.policy.kind == sparsevlm::keep_policy::kind_t::rank);
  CHECK(c.options.policy.scale == 2.0);
  CHECK(c.options.recycle.enabled);
  CHECK(c.options.recycle.fraction == 0.5);
  CHECK(c.options.recycle.cluster_divisor == 10.0);
  CHECK(c.attn.shape == std::vector<index_t>{2, 7, 7});
  CHECK_FALSE(c.q.has_value());
  sparsevlm::workspace ws;
  const auto r = io::run_case(c, ws);
  CHECK(r.raters == std::vector<index_t>{5, 6});
  CHECK(r.rank == 1);
  CHECK(r.keep == std::vector<index_t>{1, 2});
  CHECK(r.recycled.clusters == std::vector<std::vector<index_t>>{{3, 4}});
  CHECK(r.recycled.merged == std::vector<float>{3.5f, -7.0f});
  CHECK(r.sequence == std::vector<index_t>{0, 1, 2, -1, 5, 6});

  // Without "raters", the raters come from embeds; the result is that of
  // prune_step on the same arrays.
  auto j = case_a_json();
  j.erase("raters");
  j["policy"] = {{"kind", "fixed"}, {"keep", 1}};
  const auto c2 = io::load_case_json(j.dump(), tmp.path);
  CHECK_FALSE(c2.raters.has_value());
  CHECK(c2.options.policy.kind == sparsevlm::keep_policy::kind_t::fixed);
  CHECK(c2.options.policy.keep == 1);
  const auto r2 = io::run_case(c2, ws);
  sparsevlm::step_inputs<float, float, float> in;
  in.embeds = sparsevlm::matrix_view<const float>(ca.embeds.data(), {7, 2});
  in.attn = sparsevlm::tensor3_view<const float>(ca.attn.data(), {2, 7, 7});
  in.hidden = sparsevlm::matrix_view<const float>(ca.hidden.data(), {7, 2});
  in.visual = {1, 4};
  const auto direct = sparsevlm::prune_step(in, c2.options);
  CHECK(r2.raters == direct.raters);
  CHECK(r2.keep == direct.keep);
  CHECK(r2.keep_count == 1);
  CHECK(r2.recycled.clusters == direct.recycled.clusters);
  CHECK(r2.sequence == direct.sequence);

  // float16 files of the same (exactly representable) values give the same result.
  auto write_f16 = [&](const char* name, const std::vector<float>& v, const std::string& shape) {
    const auto h = svt::convert<sparsevlm::half>(v);
    write_bytes(tmp.path / name,
                npy_image(1, "{'descr': '<f2', 'fortran_order': False, 'shape': " + shape + ", }",
                          h.data(), h.size() * 2));
  };
  write_f16("attn16.npy", ca.attn, "(2, 7, 7)");
  write_f16("hidden16.npy", ca.hidden, "(7, 2)");
  auto j16 = case_a_json();
  j16["attn"] = "attn16.npy";
  j16["hidden"] = "hidden16.npy";
  const auto c16 = io::load_case_json(j16.dump(), tmp.path);
  CHECK(c16.attn.type == io::npy_type::f16);
  const auto r16 = io::run_case(c16, ws);
  CHECK(r16.keep == r.keep);
  CHECK(r16.recycled.clusters == r.recycled.clusters);
  CHECK(r16.recycled.merged == r.recycled.merged);
  CHECK(r16.sequence == r.sequence);
}

TEST_CASE("case: lenient where the spec is silent") {
  temp_dir tmp;
  case_a().write(tmp.path);
  sparsevlm::workspace ws;
  const auto base = io::run_case(io::load_case_json(case_a_json().dump(), tmp.path), ws);
  // Integral floats (as NumPy-backed JSON writers emit them) are integers.
  auto j = case_a_json();
  j["visual"] = {{"start", 1.0}, {"len", 4.0}};
  const auto c = io::load_case_json(j.dump(), tmp.path);
  CHECK(c.visual.start == 1);
  CHECK(c.visual.len == 4);
  // Raters in any order are the same raters (the result lists them ascending).
  j = case_a_json();
  j["raters"] = {6, 5};
  const auto r = io::run_case(io::load_case_json(j.dump(), tmp.path), ws);
  CHECK(r.raters == std::vector<index_t>{5, 6});
  CHECK(r.keep == base.keep);
  CHECK(r.sequence == base.sequence);
  // But a fractional count or a repeated rater is still refused.
  j = case_a_json();
  j["visual"]["len"] = 4.5;
  SV_CHECK_THROWS(sparsevlm::errc::bad_file, "case.json.visual.len",
                  io::load_case_json(j.dump(), tmp.path));
  j = case_a_json();
  j["raters"] = {5, 5};
  SV_CHECK_THROWS(sparsevlm::errc::invalid_argument, "raters[1]",
                  io::run_case(io::load_case_json(j.dump(), tmp.path), ws));
}

TEST_CASE("case: malformed case.json and files") {
  temp_dir tmp;
  case_a().write(tmp.path);
  // Extra files: a 2-D attention, an int64 array, a hidden with too few rows.
  const std::vector<float> flat(49, 0.0f);
  io::write_npy(tmp.path / "attn2d.npy", flat.data(), std::vector<index_t>{7, 7});
  const std::int64_t ints[14] = {};
  write_bytes(tmp.path / "ints.npy",
              npy_image(1, "{'descr': '<i8', 'fortran_order': False, 'shape': (7, 2), }", ints, sizeof ints));
  io::write_npy(tmp.path / "short.npy", flat.data(), std::vector<index_t>{6, 2});

  const auto load = [&](const std::string& text) { return io::load_case_json(text, tmp.path); };
  const auto with = [&](const std::string& ptr, const nlohmann::json& v) {
    auto j = case_a_json();
    j[nlohmann::json::json_pointer(ptr)] = v;
    return j.dump();
  };
  const auto without = [&](const std::string& key) {
    auto j = case_a_json();
    j.erase(key);
    return j.dump();
  };
  REQUIRE_NOTHROW(load(case_a_json().dump()));

  SV_CHECK_THROWS(errc::bad_file, "case.json", load("{"));
  SV_CHECK_THROWS(errc::bad_file, "case.json", load("[1, 2]"));
  SV_CHECK_THROWS(errc::bad_file, "case.json.format", load(with("/format", "sparsevlm-case/2")));
  SV_CHECK_THROWS(errc::bad_file, "case.json.format", load(with("/format", 1)));
  SV_CHECK_THROWS(errc::bad_file, "case.json.format", load(without("format")));
  SV_CHECK_THROWS(errc::bad_file, "case.json.visual", load(without("visual")));
  SV_CHECK_THROWS(errc::bad_file, "case.json.hidden", load(without("hidden")));
  SV_CHECK_THROWS(errc::bad_file, "case.json.policy", load(without("policy")));
  SV_CHECK_THROWS(errc::bad_file, "case.json.recycle", load(without("recycle")));
  SV_CHECK_THROWS(errc::bad_file, "case.json.visual.start", load(with("/visual/start", "1")));
  SV_CHECK_THROWS(errc::bad_file, "case.json.visual.len", load(with("/visual/len", 4.5)));
  SV_CHECK_THROWS(errc::bad_file, "case.json.visual.len", load(with("/visual/len", nullptr)));
  SV_CHECK_THROWS(errc::bad_file, "case.json.policy.kind", load(with("/policy/kind", "topk")));
  SV_CHECK_THROWS(errc::bad_file, "case.json.policy.scale", load(with("/policy/scale", "2")));
  SV_CHECK_THROWS(errc::bad_file, "case.json.recycle.enabled", load(with("/recycle/enabled", 1)));
  SV_CHECK_THROWS(errc::bad_file, "case.json.recycle.fraction", load(with("/recycle/fraction", "0.5")));
  SV_CHECK_THROWS(errc::bad_file, "case.json.raters", load(with("/raters", "5")));
  SV_CHECK_THROWS(errc::bad_file, "case.json.raters[1]", load(with("/raters", {5, "6"})));
  SV_CHECK_THROWS(errc::bad_file, "case.json.embeds", load(with("/embeds", 3)));
  // File names must stay inside the folder.
  SV_CHECK_THROWS(errc::bad_file, "case.json.embeds", load(with("/embeds", "../embeds.npy")));
  SV_CHECK_THROWS(errc::bad_file, "case.json.attn", load(with("/attn", "sub/../../attn.npy")));
  SV_CHECK_THROWS(errc::bad_file, "case.json.hidden", load(with("/hidden", (tmp.path / "hidden.npy").string())));
  SV_CHECK_THROWS(errc::bad_file, "case.json.hidden", load(with("/hidden", "")));
  // Missing or unsuitable files.
  SV_CHECK_THROWS(errc::bad_file, "missing.npy", load(with("/hidden", "missing.npy")));
  SV_CHECK_THROWS(errc::bad_file, "3 dimensions", load(with("/attn", "attn2d.npy")));
  SV_CHECK_THROWS(errc::bad_file, "float32 or float16", load(with("/embeds", "ints.npy")));
  SV_CHECK_THROWS(errc::bad_file, "case.json", io::load_case(tmp.path / "no_such_case"));
  // Out-of-range options are invalid arguments.
  SV_CHECK_THROWS(errc::invalid_argument, "recycle.fraction", load(with("/recycle/fraction", 0)));
  SV_CHECK_THROWS(errc::invalid_argument, "recycle.fraction", load(with("/recycle/fraction", 1.5)));
  SV_CHECK_THROWS(errc::invalid_argument, "recycle.cluster_divisor",
                  load(with("/recycle/cluster_divisor", 1)));
  SV_CHECK_THROWS(errc::invalid_argument, "policy.keep",
                  load(with("/policy", {{"kind", "fixed"}, {"keep", -1}})));
  // Shapes that disagree load, and are refused when the step runs.
  const auto c = load(with("/hidden", "short.npy"));
  sparsevlm::workspace ws;
  SV_CHECK_THROWS(errc::shape_mismatch, "hidden.extent[0]", io::run_case(c, ws));
}

TEST_CASE("case: compare agrees with itself and catches differences") {
  temp_dir tmp;
  case_a().write(tmp.path);
  write_text(tmp.path / "case.json", case_a_json().dump());
  sparsevlm::workspace ws;
  const auto r = io::run_case(io::load_case(tmp.path), ws);
  REQUIRE_FALSE(r.recycled.clusters.empty());
  io::write_result(r, tmp.path / "out");
  const auto e = io::read_expected(tmp.path / "out");
  // result.json holds the spec's keys.
  for (const char* key : {"raters", "rank", "keep_count", "keep", "clusters", "merged", "sequence"})
    CHECK_MESSAGE(e.json.contains(key), key);
  CHECK(e.json["merged"] == "merged.npy");
  CHECK(e.json["clusters"] == nlohmann::json::parse("[[3, 4]]"));
  REQUIRE(e.merged.has_value());
  CHECK(e.merged->shape == std::vector<index_t>{1, 2});
  CHECK(io::compare(r, e).empty());

  auto k = r;
  k.keep[0] = 3;
  auto diffs = io::compare(k, e);
  REQUIRE(diffs.size() == 1);
  CHECK(diffs[0].rfind("keep:", 0) == 0);

  auto m = r;
  m.recycled.merged[1] *= 1.001f;  // 1e-3 relative: beyond 1e-4
  diffs = io::compare(m, e);
  REQUIRE(diffs.size() == 1);
  CHECK(diffs[0].find("merged[0, 1]") != std::string::npos);
  m = r;
  m.recycled.merged[0] *= 1.0f + 2e-4f;
  CHECK_FALSE(io::compare(m, e).empty());
  m = r;
  m.recycled.merged[0] *= 1.0f + 1e-6f;  // inside the tolerance
  CHECK(io::compare(m, e).empty());

  auto q = r;
  q.rank = 2;
  q.sequence.back() = 4;
  diffs = io::compare(q, e);
  CHECK(diffs.size() == 2);

  // Nothing recycled on one side only.
  auto none = r;
  none.recycled.clusters.clear();
  none.recycled.merged.clear();
  diffs = io::compare(none, e);
  CHECK(diffs.size() == 2);  // clusters and merged

  // A result without recycling written and read back agrees with itself.
  io::write_result(none, tmp.path / "out2");
  const auto e2 = io::read_expected(tmp.path / "out2");
  CHECK_FALSE(e2.merged.has_value());
  CHECK_FALSE(e2.json.contains("merged"));
  CHECK(io::compare(none, e2).empty());
  SV_CHECK_THROWS(errc::bad_file, "result.json", io::read_expected(tmp.path / "nowhere"));
}

TEST_CASE("case: every shared spec case agrees with its expected result") {
  const std::vector<fs::path> cases = svt::shared_case_dirs();
  if (cases.empty()) return;
  sparsevlm::workspace ws;  // shared across cases, as an engine would
  for (const auto& c : cases) {
    INFO("case ", c.filename().string());
    const io::case_data data = io::load_case(c);
    const sparsevlm::step_result r = io::run_case(data, ws);
    const io::expected_result e = io::read_expected(c / "expected");
    const auto diffs = io::compare(r, e);
    CHECK_MESSAGE(diffs.empty(), (diffs.empty() ? std::string() : diffs.front()));
  }
}

TEST_CASE("npy: an empty array with huge trailing extents is refused, not overflowed") {
  const auto img = npy_image(1, f4_dict("(0, 4294967296, 4294967296)"), nullptr, 0);
  SV_CHECK_THROWS(sparsevlm::errc::bad_file, "x.npy", parse(img));
}
