// io/picture.hpp: pictures of a step's kept / recycled / dropped patches, and
// the PNG reader and writer. The expected colours are the header's documented
// formulas, restated here.
#include <png.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <sparsevlm/io/picture.hpp>
#include <string>
#include <vector>

#include "test_util.hpp"

namespace fs = std::filesystem;
using sparsevlm::errc;
using sparsevlm::index_t;
using sparsevlm::visual_span;
namespace io = sparsevlm::io;
using io::rgb8;

namespace {

struct picture_dir {
  fs::path path;
  picture_dir() {
    static int counter = 0;
    const auto stamp = std::chrono::steady_clock::now().time_since_epoch().count();
    path = fs::temp_directory_path() /
           ("sparsevlm_picture_" + std::to_string(stamp) + "_" + std::to_string(++counter));
    fs::create_directories(path);
  }
  ~picture_dir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  picture_dir(const picture_dir&) = delete;
  picture_dir& operator=(const picture_dir&) = delete;
};

io::rgb_image noise(index_t w, index_t h, unsigned seed) {
  io::rgb_image img;
  img.width = w;
  img.height = h;
  img.pixels.resize(static_cast<std::size_t>(3 * w * h));
  std::mt19937 rng(seed);
  for (auto& b : img.pixels) b = static_cast<std::uint8_t>(rng() & 0xff);
  return img;
}

// Through concat: g++ 12 reports a false -Wrestrict for "(" + std::string.
std::string str(rgb8 c) {
  return sparsevlm::detail::concat('(', unsigned{c.r}, ", ", unsigned{c.g}, ", ", unsigned{c.b},
                                   ')');
}

// A step on 6 visual tokens at positions 4..9, laid out 2x3:
//   row 0: 4 kept,    5 cluster 0, 6 cluster 1
//   row 1: 7 kept,    8 dropped,   9 cluster 0
const visual_span span{4, 6};
const io::patch_grid grid23{2, 3};
const std::vector<index_t> keep{4, 7};
const std::vector<std::vector<index_t>> clusters{{5, 9}, {6}};
enum class what { kept, dropped, c0, c1 };
const what layout[2][3] = {{what::kept, what::c0, what::c1}, {what::kept, what::dropped, what::c0}};

rgb8 plain(what w) {
  switch (w) {
    case what::kept:
      return io::palette::kept;
    case what::dropped:
      return io::palette::dropped;
    case what::c0:
      return io::cluster_colour(0);
    case what::c1:
      return io::cluster_colour(1);
  }
  return {};
}

/// The documented colour of pixel `c` of the background in a patch of kind `w`.
rgb8 over(rgb8 c, what w) {
  if (w == what::kept) return c;
  if (w == what::dropped) {
    const unsigned y = (77u * c.r + 150u * c.g + 29u * c.b + 128u) >> 8;
    const auto d = [&](unsigned ch) { return static_cast<std::uint8_t>((3 * y + ch + 8) >> 4); };
    return {d(c.r), d(c.g), d(c.b)};
  }
  const rgb8 k = io::cluster_colour(w == what::c0 ? 0 : 1);
  const auto m = [](unsigned a, unsigned b) { return static_cast<std::uint8_t>((a + b + 1) / 2); };
  return {m(c.r, k.r), m(c.g, k.g), m(c.b, k.b)};
}

}  // namespace

TEST_CASE("picture: plain canvas with grid lines, each cluster its own colour") {
  io::rgb_image out;
  const io::picture_counts n =
      io::render_picture(keep, clusters, span, grid23, nullptr, io::picture_options{8}, out);
  CHECK(n.kept == 2);
  CHECK(n.recycled == 3);
  CHECK(n.clusters == 2);
  CHECK(n.dropped == 1);
  REQUIRE(out.width == 3 * 8 + 1);
  REQUIRE(out.height == 2 * 8 + 1);
  REQUIRE(out.pixels.size() == static_cast<std::size_t>(3 * out.width * out.height));
  for (index_t y = 0; y < out.height; ++y) {
    for (index_t x = 0; x < out.width; ++x) {
      const bool line = x % 8 == 0 || y % 8 == 0;
      const rgb8 want = line ? io::palette::grid_line : plain(layout[y / 8][x / 8]);
      REQUIRE_MESSAGE(out.at(x, y) == want, "pixel (", x, ", ", y, "): ", str(out.at(x, y)),
                      " instead of ", str(want));
    }
  }
  CHECK(io::cluster_colour(0) != io::cluster_colour(1));
}

TEST_CASE("picture: below 4 px a cell, no grid lines") {
  io::rgb_image out;
  io::render_picture(keep, clusters, span, grid23, nullptr, io::picture_options{1}, out);
  REQUIRE(out.width == 3);
  REQUIRE(out.height == 2);
  for (index_t y = 0; y < 2; ++y)
    for (index_t x = 0; x < 3; ++x) CHECK(out.at(x, y) == plain(layout[y][x]));
  io::render_picture(keep, clusters, span, grid23, nullptr, io::picture_options{3}, out);
  REQUIRE(out.width == 9);
  REQUIRE(out.height == 6);
  for (index_t y = 0; y < 6; ++y)
    for (index_t x = 0; x < 9; ++x) CHECK(out.at(x, y) == plain(layout[y / 3][x / 3]));
}

TEST_CASE("picture: over a background of uneven patch sizes") {
  // 8x5 pixels on 3 columns and 2 rows: columns [0,2) [2,5) [5,8), rows [0,2) [2,5).
  const io::rgb_image bg = noise(8, 5, 7);
  io::rgb_image out;
  const io::picture_counts n =
      io::render_picture(keep, clusters, span, grid23, &bg, io::picture_options{}, out);
  CHECK(n.dropped == 1);
  REQUIRE(out.width == 8);
  REQUIRE(out.height == 5);
  const index_t col_of[8] = {0, 0, 1, 1, 1, 2, 2, 2};
  const index_t row_of[5] = {0, 0, 1, 1, 1};
  for (index_t y = 0; y < 5; ++y) {
    for (index_t x = 0; x < 8; ++x) {
      const rgb8 want = over(bg.at(x, y), layout[row_of[y]][col_of[x]]);
      REQUIRE_MESSAGE(out.at(x, y) == want, "pixel (", x, ", ", y, "): ", str(out.at(x, y)),
                      " instead of ", str(want));
    }
  }
  // White: kept stays white, dropped becomes a dark grey.
  io::rgb_image white{8, 5, std::vector<std::uint8_t>(8 * 5 * 3, 255)};
  io::render_picture(keep, clusters, span, grid23, &white, io::picture_options{}, out);
  CHECK(out.at(3, 3) == rgb8{64, 64, 64});  // (3·255 + 255 + 8) >> 4, the plain canvas's grey
  CHECK(out.at(0, 0) == rgb8{255, 255, 255});

  // In place: out is the background.
  io::render_picture(keep, clusters, span, grid23, &bg, io::picture_options{}, out);
  io::rgb_image inplace = bg;
  io::render_picture(keep, clusters, span, grid23, &inplace, io::picture_options{}, inplace);
  CHECK(inplace.pixels == out.pixels);
}

TEST_CASE("picture: a step_result's keep set and clusters") {
  sparsevlm::step_result r;
  r.keep = keep;
  r.recycled.clusters = clusters;
  io::rgb_image a, b;
  const auto na = io::render_picture(r, span, grid23, nullptr, io::picture_options{5}, a);
  const auto nb =
      io::render_picture(keep, clusters, span, grid23, nullptr, io::picture_options{5}, b);
  CHECK(a.pixels == b.pixels);
  CHECK(na.recycled == nb.recycled);
  // Nothing pruned: every patch kept.
  sparsevlm::step_result all;
  all.keep = {4, 5, 6, 7, 8, 9};
  const auto nall = io::render_picture(all, span, {1, 6}, nullptr, io::picture_options{1}, a);
  CHECK(nall.kept == 6);
  CHECK(nall.dropped == 0);
  for (index_t x = 0; x < 6; ++x) CHECK(a.at(x, 0) == io::palette::kept);
}

TEST_CASE("picture: cluster colours are distinct and apart from the greys") {
  std::vector<rgb8> seen;
  for (index_t c = 0; c < 64; ++c) {
    const rgb8 k = io::cluster_colour(c);
    for (const rgb8& s : seen) REQUIRE_MESSAGE(!(s == k), "cluster ", c, " repeats ", str(k));
    for (const rgb8 grey : {io::palette::kept, io::palette::dropped, io::palette::grid_line})
      CHECK(!(k == grey));
    // Saturated: the channels spread by at least half the range.
    const int hi = std::max({k.r, k.g, k.b}), lo = std::min({k.r, k.g, k.b});
    CHECK(hi - lo >= 128);
    seen.push_back(k);
  }
  SV_CHECK_THROWS(errc::invalid_argument, "cluster", io::cluster_colour(-1));
}

TEST_CASE("picture: bad input throws and leaves out untouched") {
  io::rgb_image out{1, 1, {1, 2, 3}};
  const io::rgb_image before = out;
  const io::picture_options opt{};
  SV_CHECK_THROWS(errc::shape_mismatch, "grid: expected rows x cols = 6 (visual.len), got 2x2 = 4",
                  io::render_picture(keep, clusters, span, {2, 2}, nullptr, opt, out));
  SV_CHECK_THROWS(errc::shape_mismatch, "grid",
                  io::render_picture(keep, clusters, span, {0, 6}, nullptr, opt, out));
  SV_CHECK_THROWS(errc::shape_mismatch, "visual",
                  io::render_picture({}, {}, visual_span{0, 0}, {1, 1}, nullptr, opt, out));
  SV_CHECK_THROWS(
      errc::invalid_argument, "keep[1]: expected a visual position in [4, 10)",
      io::render_picture(std::vector<index_t>{4, 10}, clusters, span, grid23, nullptr, opt, out));
  SV_CHECK_THROWS(
      errc::invalid_argument, "keep[1]",
      io::render_picture(std::vector<index_t>{4, 4}, {}, span, grid23, nullptr, opt, out));
  SV_CHECK_THROWS(errc::invalid_argument, "clusters[1][0]",
                  io::render_picture(keep, std::vector<std::vector<index_t>>{{5}, {7}}, span,
                                     grid23, nullptr, opt, out));
  SV_CHECK_THROWS(errc::invalid_argument, "clusters[0][0]",
                  io::render_picture(keep, std::vector<std::vector<index_t>>{{3}}, span, grid23,
                                     nullptr, opt, out));
  const io::rgb_image small = noise(2, 5, 1);
  SV_CHECK_THROWS(errc::shape_mismatch, "background: expected at least 3x2 pixels",
                  io::render_picture(keep, clusters, span, grid23, &small, opt, out));
  io::rgb_image ragged = noise(3, 2, 1);
  ragged.pixels.pop_back();
  SV_CHECK_THROWS(errc::shape_mismatch, "background.pixels",
                  io::render_picture(keep, clusters, span, grid23, &ragged, opt, out));
  SV_CHECK_THROWS(
      errc::invalid_argument, "cell",
      io::render_picture(keep, clusters, span, grid23, nullptr, io::picture_options{0}, out));
  SV_CHECK_THROWS(errc::invalid_argument, "cell",
                  io::render_picture(keep, clusters, span, grid23, nullptr,
                                     io::picture_options{index_t{1} << 40}, out));
  CHECK(out.width == before.width);
  CHECK(out.height == before.height);
  CHECK(out.pixels == before.pixels);
}

TEST_CASE("picture: PNG, encode then decode gives the same bits") {
  for (const auto& [w, h] : {std::pair<index_t, index_t>{1, 1}, {13, 7}, {64, 3}, {5, 40}}) {
    const io::rgb_image img = noise(w, h, static_cast<unsigned>(w * 100 + h));
    const std::vector<std::byte> png = io::encode_png(img);
    const io::rgb_image back = io::decode_png(png, "mem.png");
    CHECK(back.width == w);
    CHECK(back.height == h);
    CHECK(back.pixels == img.pixels);
  }
  SV_CHECK_THROWS(errc::shape_mismatch, "img: expected 1 to 1000000 pixels a side, got 0x3",
                  io::encode_png(io::rgb_image{0, 3, {}}, "img"));
  SV_CHECK_THROWS(errc::shape_mismatch, "img.pixels",
                  io::encode_png(io::rgb_image{2, 2, std::vector<std::uint8_t>(11)}, "img"));
}

TEST_CASE("picture: PNG, write_png then read_png gives the same bits") {
  picture_dir tmp;
  const io::rgb_image img = noise(31, 17, 3);
  io::write_png(tmp.path / "a.png", img);
  const io::rgb_image back = io::read_png(tmp.path / "a.png");
  CHECK(back.width == 31);
  CHECK(back.height == 17);
  CHECK(back.pixels == img.pixels);
  // A picture drawn over an image, through a file.
  io::rgb_image pic;
  io::render_picture(keep, clusters, span, grid23, &img, io::picture_options{}, pic);
  io::write_png(tmp.path / "pic.png", pic);
  CHECK(io::read_png(tmp.path / "pic.png").pixels == pic.pixels);
}

namespace {

/// A PNG in another layout, written by libpng's own simplified writer.
std::vector<std::byte> libpng_encode(png_uint_32 w, png_uint_32 h, png_uint_32 format,
                                     const void* pixels, const void* colormap = nullptr,
                                     png_uint_32 entries = 0) {
  png_image img;
  std::memset(&img, 0, sizeof img);
  img.version = PNG_IMAGE_VERSION;
  img.width = w;
  img.height = h;
  img.format = format;
  img.colormap_entries = entries;
  png_alloc_size_t size = 0;
  REQUIRE(png_image_write_get_memory_size(img, size, 0, pixels, 0, colormap));
  std::vector<std::byte> out(static_cast<std::size_t>(size));
  REQUIRE(png_image_write_to_memory(&img, out.data(), &size, 0, pixels, 0, colormap));
  out.resize(static_cast<std::size_t>(size));
  return out;
}

}  // namespace

TEST_CASE("picture: PNG, grey, grey+alpha, RGBA, palette and 16-bit files become RGB8") {
  SUBCASE("grey") {
    const std::uint8_t px[3] = {0, 77, 255};
    const auto back = io::decode_png(libpng_encode(3, 1, PNG_FORMAT_GRAY, px), "g.png");
    REQUIRE(back.width == 3);
    for (index_t x = 0; x < 3; ++x) CHECK(back.at(x, 0) == rgb8{px[x], px[x], px[x]});
  }
  SUBCASE("grey + alpha: opaque as is, transparent onto white") {
    const std::uint8_t px[4] = {90, 255, 10, 0};
    const auto back = io::decode_png(libpng_encode(2, 1, PNG_FORMAT_GA, px), "ga.png");
    CHECK(back.at(0, 0) == rgb8{90, 90, 90});
    CHECK(back.at(1, 0) == rgb8{255, 255, 255});
  }
  SUBCASE("RGBA: opaque as is, transparent onto white") {
    const std::uint8_t px[8] = {200, 30, 60, 255, 1, 2, 3, 0};
    const auto back = io::decode_png(libpng_encode(2, 1, PNG_FORMAT_RGBA, px), "rgba.png");
    CHECK(back.at(0, 0) == rgb8{200, 30, 60});
    CHECK(back.at(1, 0) == rgb8{255, 255, 255});
  }
  SUBCASE("palette") {
    const std::uint8_t map[9] = {10, 20, 30, 250, 128, 0, 0, 0, 255};
    const std::uint8_t idx[4] = {2, 0, 1, 2};
    const auto back =
        io::decode_png(libpng_encode(2, 2, PNG_FORMAT_RGB_COLORMAP, idx, map, 3), "pal.png");
    CHECK(back.at(0, 0) == rgb8{0, 0, 255});
    CHECK(back.at(1, 0) == rgb8{10, 20, 30});
    CHECK(back.at(0, 1) == rgb8{250, 128, 0});
    CHECK(back.at(1, 1) == rgb8{0, 0, 255});
  }
  SUBCASE("16-bit linear: gamma-encoded to 8-bit sRGB") {
    const std::uint16_t px[6] = {0, 65535, 0, 32768, 32768, 32768};
    const auto back = io::decode_png(libpng_encode(2, 1, PNG_FORMAT_LINEAR_RGB, px), "deep.png");
    CHECK(back.at(0, 0) == rgb8{0, 255, 0});
    // Linear one half: libpng's simplified reader encodes with gamma 1/2.2
    // (0.5^(1/2.2)·255 = 186.1), the exact sRGB curve would give 187.5.
    CHECK(back.at(1, 0).r >= 185);
    CHECK(back.at(1, 0).r <= 188);
  }
}

TEST_CASE("picture: PNG, missing, corrupt and truncated files throw naming the file") {
  picture_dir tmp;
  const fs::path missing = tmp.path / "missing.png";
  SV_CHECK_THROWS(errc::bad_file,
                  missing.string() + ": expected a readable file, got cannot open it",
                  io::read_png(missing));

  const fs::path text = tmp.path / "text.png";
  std::ofstream(text) << "this is not a PNG file at all";
  SV_CHECK_THROWS(errc::bad_file, text.string() + ": expected a PNG file", io::read_png(text));
  const fs::path tiny = tmp.path / "tiny.png";
  std::ofstream(tiny) << "\x89PNG";
  SV_CHECK_THROWS(errc::bad_file, "fewer than 8 bytes", io::read_png(tiny));

  const std::vector<std::byte> good = io::encode_png(noise(40, 40, 9));
  const auto write = [](const fs::path& p, const std::vector<std::byte>& bytes) {
    std::ofstream f(p, std::ios::binary);
    f.write(reinterpret_cast<const char*>(bytes.data()),
            static_cast<std::streamsize>(bytes.size()));
  };
  const fs::path cut = tmp.path / "cut.png";
  write(cut, std::vector<std::byte>(good.begin(),
                                    good.begin() + static_cast<std::ptrdiff_t>(good.size() / 2)));
  SV_CHECK_THROWS(errc::bad_file,
                  cut.string() + ": expected a valid PNG, got libpng: ", io::read_png(cut));
  const fs::path header_only = tmp.path / "header_only.png";
  write(header_only, std::vector<std::byte>(good.begin(), good.begin() + 20));
  SV_CHECK_THROWS(errc::bad_file, header_only.string() + ": expected a valid PNG",
                  io::read_png(header_only));
  std::vector<std::byte> flipped = good;
  flipped[flipped.size() / 2] ^= std::byte{0x5a};  // inside IDAT: a CRC error
  const fs::path bad_crc = tmp.path / "bad_crc.png";
  write(bad_crc, flipped);
  SV_CHECK_THROWS(errc::bad_file, bad_crc.string() + ": expected a valid PNG",
                  io::read_png(bad_crc));
}

TEST_CASE("picture: PNG, writing into a missing folder throws and creates nothing") {
  picture_dir tmp;
  const fs::path p = tmp.path / "no_such_dir" / "a.png";
  SV_CHECK_THROWS(errc::bad_file, p.string() + ": expected a writable file",
                  io::write_png(p, noise(2, 2, 1)));
  CHECK(!fs::exists(p));
  // An image that cannot be encoded leaves an existing file as it was.
  const fs::path keep_me = tmp.path / "keep.png";
  io::write_png(keep_me, noise(3, 3, 2));
  const auto size = fs::file_size(keep_me);
  SV_CHECK_THROWS(errc::shape_mismatch, keep_me.string(), io::write_png(keep_me, io::rgb_image{}));
  CHECK(fs::file_size(keep_me) == size);
}
