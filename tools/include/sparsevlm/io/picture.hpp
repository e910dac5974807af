// Pictures of a step: which visual patches were kept, recycled (and into which
// cluster) or dropped, drawn on the patch grid, over the input image when there
// is one, and PNG files to read the image from and write the picture to.
// Not part of the umbrella header: needs libpng 1.6 (<png.h>, link PNG::PNG).
#pragma once

#include <png.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include <sparsevlm/error.hpp>
#include <sparsevlm/types.hpp>
#include <sparsevlm/view.hpp>
#include "case.hpp"

namespace sparsevlm::io {

/// One 8-bit sRGB pixel.
struct rgb8 {
  std::uint8_t r = 0, g = 0, b = 0;
  friend bool operator==(const rgb8&, const rgb8&) = default;
};

/// An 8-bit sRGB image in memory: `pixels` is [height, width, 3], row-major,
/// no row padding (what libpng's simplified API reads and writes).
struct rgb_image {
  index_t width = 0, height = 0;
  std::vector<std::uint8_t> pixels;

  /// Unchecked: 0 <= x < width, 0 <= y < height.
  [[nodiscard]] rgb8 at(index_t x, index_t y) const {
    const std::uint8_t* p = pixels.data() + 3 * (y * width + x);
    return {p[0], p[1], p[2]};
  }
  /// Unchecked, as `at`.
  void set(index_t x, index_t y, rgb8 c) {
    std::uint8_t* p = pixels.data() + 3 * (y * width + x);
    p[0] = c.r;
    p[1] = c.g;
    p[2] = c.b;
  }
};

/// How the N visual tokens lie on the image: visual token j (relative to the
/// span's start) is patch (j / cols, j % cols), so rows·cols must equal N. That is
/// how LLaVA-style encoders flatten their patch grid (24x24 = 576 for LLaVA-1.5).
struct patch_grid {
  index_t rows = 0, cols = 0;
};

/// Drawing options.
struct picture_options {
  /// Pixels per patch side on the plain canvas (no background); ignored over an
  /// image, whose own size decides the picture's. From 4 on, 1-px grid lines
  /// separate the cells (the canvas is then cols·cell + 1 wide), so that equal
  /// neighbours still read as separate patches; below 4 they would hide the cells.
  index_t cell = 16;
};

/// What a picture shows, in patches (clusters: how many colours are in use).
struct picture_counts {
  index_t kept = 0, recycled = 0, clusters = 0, dropped = 0;
};

/// The fixed colours of the plain canvas. Kept is light and dropped dark so
/// that the recycled patches, the only saturated ones, stand out.
namespace palette {
inline constexpr rgb8 kept{232, 232, 232};
inline constexpr rgb8 dropped{64, 64, 64};
inline constexpr rgb8 grid_line{128, 128, 128};
}  // namespace palette

/// The colour of recycled cluster `cluster` (its index in
/// step_result::recycled.clusters). Hues step by the golden angle, so that
/// consecutive clusters, which tend to be neighbours in the picture, get
/// far-apart hues; the first 620 indices get distinct RGB8 values (a step
/// has floor(s / cluster_divisor) + 1 clusters, under 100 for N = 2880), though
/// with dozens some hues are close. The saturation keeps them apart from the
/// greys of kept and dropped patches.
/// Errors: errc::invalid_argument for a negative index.
inline rgb8 cluster_colour(index_t cluster) {
  SPARSEVLM_CHECK(cluster >= 0, errc::invalid_argument, "cluster", ">= 0", cluster);
  constexpr double golden_angle = 137.50776405003785;
  constexpr double s = 0.8, v = 0.95;
  const double h = std::fmod(static_cast<double>(cluster) * golden_angle, 360.0) / 60.0;
  const double f = h - std::floor(h);
  const double p = v * (1 - s), q = v * (1 - s * f), t = v * (1 - s * (1 - f));
  const double rgb[6][3] = {{v, t, p}, {q, v, p}, {p, v, t}, {p, q, v}, {t, p, v}, {v, p, q}};
  const double* c = rgb[std::min(static_cast<int>(h), 5)];
  const auto byte = [](double x) { return static_cast<std::uint8_t>(std::lround(x * 255.0)); };
  return {byte(c[0]), byte(c[1]), byte(c[2])};
}

namespace detail_picture {

inline constexpr std::int32_t dropped = -1;
inline constexpr std::int32_t kept = -2;

/// Dropped patches over the image: mostly grey (3/4 luma, 1/4 colour) and at a
/// quarter of the brightness, so that the content stays legible but clearly off.
/// Integer luma weights (BT.601, summing to 256) keep the result exact.
inline rgb8 darken(rgb8 c) {
  const unsigned y = (77u * c.r + 150u * c.g + 29u * c.b + 128u) >> 8;
  const auto dim = [y](std::uint8_t ch) {
    return static_cast<std::uint8_t>((3u * y + ch + 8u) >> 4);
  };
  return {dim(c.r), dim(c.g), dim(c.b)};
}

/// Recycled patches over the image: half image, half cluster colour.
inline std::uint8_t blend(std::uint8_t c, std::uint8_t k) {
  return static_cast<std::uint8_t>((unsigned{c} + unsigned{k} + 1u) >> 1);
}

inline std::string position_range(visual_span v) {
  return "a visual position in [" + std::to_string(v.start) + ", " + std::to_string(v.end()) +
         ") not already kept or recycled";
}

// libpng's own reader refuses wider or taller images (PNG_USER_WIDTH_MAX), so a
// picture within it can be read back; the pixel cap keeps one RGB buffer < 1 GiB.
inline constexpr index_t max_side = 1000000;
inline constexpr index_t max_pixels = index_t{1} << 28;

}  // namespace detail_picture

/// Draws which visual patches a step kept, recycled and dropped into `out`.
///
/// `keep` and the members of `clusters` are absolute sequence positions inside
/// `visual` (as step_result reports them); every other visual position counts as
/// dropped. Patch (i, j) is visual token visual.start + i·grid.cols + j.
///
/// With `background` (an image of the input, W×H ≥ cols×rows pixels) the picture
/// is W×H: patch (i, j) covers pixels [j·W/cols, (j+1)·W/cols) ×
/// [i·H/rows, (i+1)·H/rows) (integer division, so uneven sizes lose no pixel);
/// kept patches show the image as is, dropped ones darkened and desaturated to
/// (3·Y + c + 8) >> 4 (Y the BT.601 integer luma, c the channel), recycled ones
/// (c + k + 1) >> 1 with k = cluster_colour(cluster). `out` may be `*background`.
/// Without it, a plain canvas of opt.cell pixels a patch: palette::kept,
/// palette::dropped, cluster_colour(cluster), and palette::grid_line between the
/// cells when opt.cell >= 4.
///
/// Cost: O(N + Σ|clusters| + pixels) time, O(N) scratch; `out.pixels` reuses
/// its capacity. Deterministic: the same bits on every platform (integer
/// arithmetic, one rounding per colour channel in cluster_colour).
/// Errors (every check before `out` is touched): errc::shape_mismatch when
/// grid.rows·grid.cols ≠ visual.len, for an empty grid or span, or a background
/// whose pixels do not match its size or that has fewer pixels a side than
/// patches; errc::invalid_argument for a position outside the span or listed
/// twice ("keep[i]", "clusters[c][i]"), or a cell size whose canvas exceeds
/// 1,000,000 px a side or 2^28 pixels.
inline picture_counts render_picture(std::span<const index_t> keep,
                                     std::span<const std::vector<index_t>> clusters,
                                     visual_span visual, patch_grid grid,
                                     const rgb_image* background, const picture_options& opt,
                                     rgb_image& out) {
  using namespace detail_picture;
  const index_t n = visual.len;
  SPARSEVLM_CHECK(visual.start >= 0 && n >= 1, errc::shape_mismatch, "visual",
                  "start >= 0 and len >= 1", detail::concat("start ", visual.start, ", len ", n));
  SPARSEVLM_CHECK(
      grid.rows >= 1 && grid.cols >= 1 && grid.rows <= n / grid.cols && grid.rows * grid.cols == n,
      errc::shape_mismatch, "grid", detail::concat("rows x cols = ", n, " (visual.len)"),
      detail::concat(grid.rows, "x", grid.cols,
                     grid.rows >= 1 && grid.cols >= 1 && grid.rows <= n / grid.cols
                         ? detail::concat(" = ", grid.rows * grid.cols)
                         : std::string()));

  std::vector<std::int32_t> label(static_cast<std::size_t>(n), dropped);
  // The names are built only on failure (SPARSEVLM_CHECK), not once a position.
  const auto free_slot = [&](index_t pos) {
    return pos >= visual.start && pos < visual.end() &&
           label[static_cast<std::size_t>(pos - visual.start)] == dropped;
  };
  for (std::size_t i = 0; i < keep.size(); ++i) {
    SPARSEVLM_CHECK(free_slot(keep[i]), errc::invalid_argument, detail::concat("keep[", i, "]"),
                    position_range(visual), keep[i]);
    label[static_cast<std::size_t>(keep[i] - visual.start)] = kept;
  }
  picture_counts counts;
  counts.kept = static_cast<index_t>(keep.size());
  counts.clusters = static_cast<index_t>(clusters.size());
  for (std::size_t c = 0; c < clusters.size(); ++c) {
    for (std::size_t i = 0; i < clusters[c].size(); ++i) {
      const index_t pos = clusters[c][i];
      SPARSEVLM_CHECK(free_slot(pos), errc::invalid_argument,
                      detail::concat("clusters[", c, "][", i, "]"), position_range(visual), pos);
      label[static_cast<std::size_t>(pos - visual.start)] = static_cast<std::int32_t>(c);
    }
    counts.recycled += static_cast<index_t>(clusters[c].size());
  }
  counts.dropped = n - counts.kept - counts.recycled;

  index_t width = 0, height = 0;
  const bool lines = opt.cell >= 4;
  if (background) {
    const rgb_image& bg = *background;
    SPARSEVLM_CHECK(bg.width >= 0 && bg.height >= 0 && bg.width <= max_side &&
                        bg.height <= max_side &&
                        bg.pixels.size() == static_cast<std::size_t>(3 * bg.width * bg.height),
                    errc::shape_mismatch, "background.pixels",
                    detail::concat("3 x width x height bytes (", bg.width, "x", bg.height,
                                   " within ", max_side, " a side)"),
                    bg.pixels.size());
    SPARSEVLM_CHECK(bg.width >= grid.cols && bg.height >= grid.rows, errc::shape_mismatch,
                    "background",
                    detail::concat("at least ", grid.cols, "x", grid.rows, " pixels (one a patch)"),
                    detail::concat(bg.width, "x", bg.height));
    width = bg.width;
    height = bg.height;
  } else {
    const auto side = [&](index_t cells) {
      if (opt.cell < 1 || cells > max_side / opt.cell) return max_side + 1;
      return cells * opt.cell + (lines ? 1 : 0);
    };
    width = side(grid.cols);
    height = side(grid.rows);
    SPARSEVLM_CHECK(
        width <= max_side && height <= max_side && width <= max_pixels / height,
        errc::invalid_argument, "cell",
        detail::concat(">= 1 and a canvas within ", max_side, " px a side and ", max_pixels,
                       " pixels"),
        detail::concat(opt.cell, " px a patch on ", grid.rows, "x", grid.cols, " patches"));
  }

  // Every check has passed: from here on `out` changes.
  const auto at = [&](index_t i, index_t j) {
    return label[static_cast<std::size_t>(i * grid.cols + j)];
  };
  if (background) {
    const rgb_image& bg = *background;
    out.width = width;
    out.height = height;
    out.pixels.resize(static_cast<std::size_t>(3 * width * height));  // no-op when out is bg
    for (index_t i = 0; i < grid.rows; ++i) {
      const index_t y0 = i * height / grid.rows, y1 = (i + 1) * height / grid.rows;
      for (index_t j = 0; j < grid.cols; ++j) {
        const index_t x0 = j * width / grid.cols, x1 = (j + 1) * width / grid.cols;
        const std::int32_t l = at(i, j);
        if (l == kept) {
          if (&out == &bg) continue;
          for (index_t y = y0; y < y1; ++y)
            std::memcpy(out.pixels.data() + 3 * (y * width + x0),
                        bg.pixels.data() + 3 * (y * width + x0),
                        static_cast<std::size_t>(3 * (x1 - x0)));
          continue;
        }
        const rgb8 k = l >= 0 ? cluster_colour(l) : rgb8{};
        for (index_t y = y0; y < y1; ++y) {
          for (index_t x = x0; x < x1; ++x) {
            const rgb8 c = bg.at(x, y);
            out.set(
                x, y,
                l == dropped ? darken(c) : rgb8{blend(c.r, k.r), blend(c.g, k.g), blend(c.b, k.b)});
          }
        }
      }
    }
    return counts;
  }
  out.width = width;
  out.height = height;
  out.pixels.resize(static_cast<std::size_t>(3 * width * height));
  for (index_t y = 0; y < height; ++y)
    for (index_t x = 0; x < width; ++x) out.set(x, y, palette::grid_line);
  const index_t inset = lines ? 1 : 0;  // the cell's first row and column are its grid lines
  for (index_t i = 0; i < grid.rows; ++i) {
    for (index_t j = 0; j < grid.cols; ++j) {
      const std::int32_t l = at(i, j);
      const rgb8 c = l == kept      ? palette::kept
                     : l == dropped ? palette::dropped
                                    : cluster_colour(l);
      for (index_t y = i * opt.cell + inset; y < (i + 1) * opt.cell; ++y)
        for (index_t x = j * opt.cell + inset; x < (j + 1) * opt.cell; ++x) out.set(x, y, c);
    }
  }
  return counts;
}

/// render_picture for a step's result: its keep set and recycled clusters.
inline picture_counts render_picture(const step_result& r, visual_span visual, patch_grid grid,
                                     const rgb_image* background, const picture_options& opt,
                                     rgb_image& out) {
  return render_picture(r.keep, r.recycled.clusters, visual, grid, background, opt, out);
}

namespace detail_picture {

[[noreturn]] inline void bad(const std::string& name, const std::string& expected,
                             const std::string& got) {
  sparsevlm::detail::fail(errc::bad_file, name, expected, got);
}

inline std::string libpng_says(const png_image& img) {
  return std::string("libpng: ") + (img.message[0] ? img.message : "an unspecified error");
}

}  // namespace detail_picture

/// Decodes an in-memory PNG of any colour type and bit depth (grey, grey+alpha,
/// palette, RGB, RGBA; 1 to 16 bits; interlaced or not) to 8-bit sRGB through
/// libpng's simplified API: 16-bit samples are taken as linear light and
/// gamma-encoded, alpha is composited onto white. `name` labels errors.
/// Cost: O(pixels) time, one buffer of 3·W·H bytes.
/// Errors: errc::bad_file naming `name`: not a PNG, a libpng error (truncated,
/// corrupt data), or more than 2^28 pixels.
inline rgb_image decode_png(std::span<const std::byte> bytes, const std::string& name) {
  using namespace detail_picture;
  static constexpr unsigned char signature[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
  if (bytes.size() < 8 || std::memcmp(bytes.data(), signature, 8) != 0)
    bad(name, "a PNG file (signature \\x89PNG\\r\\n\\x1a\\n)",
        bytes.size() < 8 ? "fewer than 8 bytes" : "another signature");
  png_image img;
  std::memset(&img, 0, sizeof img);
  img.version = PNG_IMAGE_VERSION;
  // On failure libpng frees what it allocated; after success png_image_finish_read
  // does, so only the early exit between the two needs png_image_free.
  if (!png_image_begin_read_from_memory(&img, bytes.data(), bytes.size()))
    bad(name, "a valid PNG", libpng_says(img));
  const auto w = static_cast<index_t>(img.width), h = static_cast<index_t>(img.height);
  if (w < 1 || h < 1 || w > max_pixels / h) {
    png_image_free(&img);
    bad(name, "at most " + std::to_string(max_pixels) + " pixels",
        std::to_string(w) + "x" + std::to_string(h));
  }
  img.format = PNG_FORMAT_RGB;
  rgb_image out;
  out.width = w;
  out.height = h;
  out.pixels.resize(static_cast<std::size_t>(3 * w * h));
  const png_color white{255, 255, 255};
  if (!png_image_finish_read(&img, &white, out.pixels.data(), 0, nullptr))
    bad(name, "a valid PNG", libpng_says(img));
  return out;
}

/// Reads a PNG file as decode_png does.
/// Errors: errc::bad_file naming the file: missing, unreadable, or as decode_png.
inline rgb_image read_png(const std::filesystem::path& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) detail_picture::bad(path.string(), "a readable file", "cannot open it");
  const std::vector<char> buf((std::istreambuf_iterator<char>(f)),
                              std::istreambuf_iterator<char>());
  if (f.bad()) detail_picture::bad(path.string(), "a readable file", "a read error");
  return decode_png(std::as_bytes(std::span<const char>(buf)), path.string());
}

/// Encodes an image as an 8-bit RGB PNG (sRGB, default compression). `name`
/// labels errors.
/// Cost: O(pixels) time (deflate), one buffer of about 3·W·H bytes.
/// Errors: errc::shape_mismatch naming `name` for an empty image, a side over
/// 1,000,000 px, or pixels that do not match the size; errc::bad_file when
/// libpng fails.
inline std::vector<std::byte> encode_png(const rgb_image& image,
                                         const std::string& name = "image") {
  using namespace detail_picture;
  SPARSEVLM_CHECK(
      image.width >= 1 && image.height >= 1 && image.width <= max_side && image.height <= max_side,
      errc::shape_mismatch, name, detail::concat("1 to ", max_side, " pixels a side"),
      detail::concat(image.width, "x", image.height));
  SPARSEVLM_CHECK(image.pixels.size() == static_cast<std::size_t>(3 * image.width * image.height),
                  errc::shape_mismatch, name + ".pixels",
                  detail::concat(3 * image.width * image.height, " bytes (3 x ", image.width, " x ",
                                 image.height, ")"),
                  image.pixels.size());
  png_image img;
  std::memset(&img, 0, sizeof img);
  img.version = PNG_IMAGE_VERSION;
  img.width = static_cast<png_uint_32>(image.width);
  img.height = static_cast<png_uint_32>(image.height);
  img.format = PNG_FORMAT_RGB;
  // The bound never fills, so one deflate pass suffices (no size-query pass).
  png_alloc_size_t size = PNG_IMAGE_PNG_SIZE_MAX(img);
  std::vector<std::byte> out(static_cast<std::size_t>(size));
  if (!png_image_write_to_memory(&img, out.data(), &size, 0, image.pixels.data(), 0, nullptr))
    bad(name, "an encoded PNG", libpng_says(img));
  out.resize(static_cast<std::size_t>(size));
  return out;
}

/// Writes an image as a PNG file. It is encoded in memory first, so an encoding
/// error writes nothing; a failed write removes the partial file.
/// Errors: as encode_png (named by the path); errc::bad_file when the file
/// cannot be created or written.
inline void write_png(const std::filesystem::path& path, const rgb_image& image) {
  const std::vector<std::byte> bytes = encode_png(image, path.string());
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  if (!f) detail_picture::bad(path.string(), "a writable file", "cannot open it");
  f.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  f.close();
  if (!f) {
    std::error_code ec;
    std::filesystem::remove(path, ec);
    detail_picture::bad(path.string(), "a complete write", "a write error");
  }
}

/// What show_case drew.
struct shown_case {
  std::string name;  ///< the case's name (its folder)
  picture_counts counts;
  index_t width = 0, height = 0;
  bool over_image = false;  ///< drawn over the case's image.png
};

/// Runs the step of the case in `case_dir` (io::run_case, scores from `from`) and
/// writes its picture to `out`: over `case_dir/image.png` when that file exists,
/// else on a plain canvas of `cell` pixels a patch. `grid` lays the case's N
/// visual tokens out row-major (rows · cols must be N, checked before the step
/// runs: "--grid: expected rows x cols = 576 (the case's visual tokens), got
/// 24x23 = 552", with `grid_name` as the argument's name). Used by `sparsevlm
/// show` and the Python package's `sparsevlm.show`.
/// Cost: the step's, plus O(pixels). Errors: as load_case, run_case,
/// render_picture, read_png and write_png; nothing is written on error.
inline shown_case show_case(const std::filesystem::path& case_dir, patch_grid grid,
                            const std::filesystem::path& out, index_t cell = 16,
                            scores_source from = scores_source::attn,
                            const char* grid_name = "grid") {
  const case_data c = load_case(case_dir);
  // rows·cols is formed only when it cannot overflow.
  const bool fits = grid.rows >= 1 && grid.cols >= 1 && grid.rows <= c.visual.len / grid.cols;
  SPARSEVLM_CHECK(fits && grid.rows * grid.cols == c.visual.len, errc::shape_mismatch, grid_name,
                  detail::concat("rows x cols = ", c.visual.len, " (the case's visual tokens)"),
                  detail::concat(grid.rows, "x", grid.cols,
                                 fits ? detail::concat(" = ", grid.rows * grid.cols) : std::string()));
  const std::filesystem::path image_path = case_dir / "image.png";
  std::optional<rgb_image> image;
  if (std::filesystem::exists(image_path)) image = read_png(image_path);
  workspace ws;
  const step_result r = run_case(c, ws, from);
  rgb_image picture;
  shown_case shown;
  shown.name = c.name;
  shown.counts = render_picture(r, c.visual, grid, image ? &*image : nullptr,
                                picture_options{cell}, picture);
  write_png(out, picture);
  shown.width = picture.width;
  shown.height = picture.height;
  shown.over_image = image.has_value();
  return shown;
}

}  // namespace sparsevlm::io
