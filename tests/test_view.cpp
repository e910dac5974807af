// strided_view: layout, access, and the checks done at construction.
#include <array>
#include <limits>

#include "test_util.hpp"

using sparsevlm::errc;
using sparsevlm::index_t;
using sparsevlm::matrix_view;
using sparsevlm::strided_view;
using sparsevlm::tensor3_view;

TEST_CASE("view: contiguous strides and element access") {
  std::array<float, 24> buf{};
  for (std::size_t i = 0; i < buf.size(); ++i) buf[i] = static_cast<float>(i);
  tensor3_view<float> t(buf.data(), {2, 3, 4}, "t");
  // C order: strides are (3 * 4, 4, 1).
  CHECK(t.strides() == std::array<index_t, 3>{12, 4, 1});
  CHECK(t.size() == 24);
  CHECK_FALSE(t.empty());
  CHECK(t(1, 2, 3) == 23.0f);  // 12 + 8 + 3
  CHECK(t(0, 1, 2) == 6.0f);
  CHECK(t.row(1) == buf.data() + 12);
  CHECK(t.inner_contiguous());
  t(1, 0, 0) = -1.0f;
  CHECK(buf[12] == -1.0f);

  // Zero extents count as 1 for the strides of the outer dimensions.
  CHECK(strided_view<float, 3>::contiguous_strides({2, 0, 5}) == std::array<index_t, 3>{5, 5, 1});
}

TEST_CASE("view: explicit strides, transposed and broadcast") {
  const std::array<float, 6> buf{0, 1, 2, 3, 4, 5};  // a 2x3 matrix, row-major
  // The transpose: 3x2 with strides (1, 3), so T(i, j) = buf[i + 3 j].
  matrix_view<const float> tr(buf.data(), {3, 2}, {1, 3}, "tr");
  CHECK(tr(0, 1) == 3.0f);
  CHECK(tr(2, 0) == 2.0f);
  CHECK(tr(2, 1) == 5.0f);
  CHECK_FALSE(tr.inner_contiguous());
  // A read-only view may broadcast (stride 0) and alias.
  matrix_view<const float> bc(buf.data(), {4, 3}, {0, 1}, "bc");
  CHECK(bc(3, 2) == 2.0f);
  matrix_view<const float> al(buf.data(), {2, 2}, {1, 1}, "al");
  CHECK(al(1, 1) == 2.0f);
  // Non-const converts to const.
  std::array<float, 4> w{1, 2, 3, 4};
  matrix_view<float> mv(w.data(), {2, 2}, "mv");
  matrix_view<const float> cv = mv;
  CHECK(cv(1, 0) == 3.0f);
  CHECK(cv.data() == w.data());
  // Column-major writable view: strides (1, 2) for 2x3 do not alias.
  std::array<float, 6> cm{};
  matrix_view<float> col(cm.data(), {2, 3}, {1, 2}, "col");
  col(1, 2) = 7.0f;
  CHECK(cm[5] == 7.0f);
  // Position ids are index_t views.
  std::array<index_t, 3> pos{10, 11, 12};
  matrix_view<index_t> pv(pos.data(), {3, 1}, "pos");
  CHECK(pv(2, 0) == 12);
}

TEST_CASE("view: empty views may have a null pointer") {
  matrix_view<const float> e(nullptr, {0, 5}, "e");
  CHECK(e.empty());
  CHECK(e.size() == 0);
  matrix_view<float> e2(nullptr, {3, 0}, "e2");
  CHECK(e2.empty());
  matrix_view<const float> def;
  CHECK(def.empty());
}

TEST_CASE("view: malformed views are refused naming the argument") {
  std::array<float, 16> buf{};
  SV_CHECK_THROWS(errc::shape_mismatch, "A.extent[1]",
                  matrix_view<float>(buf.data(), {2, -1}, "A"));
  SV_CHECK_THROWS(errc::shape_mismatch, "A.stride[0]",
                  matrix_view<const float>(buf.data(), {2, 2}, {-2, 1}, "A"));
  SV_CHECK_THROWS(errc::shape_mismatch, "A.stride[1]",
                  matrix_view<float>(buf.data(), {2, 2}, {2, -1}, "A"));
  SV_CHECK_THROWS(errc::invalid_argument, "hidden.data",
                  matrix_view<const float>(nullptr, {2, 2}, "hidden"));
  // Writable views whose distinct indices address the same element.
  SV_CHECK_THROWS(errc::shape_mismatch, "W.stride",
                  matrix_view<float>(buf.data(), {2, 2}, {1, 1}, "W"));
  // 2x3 with strides (2, 1): element (1, 0) and (0, 2) are both at offset 2.
  SV_CHECK_THROWS(errc::shape_mismatch, "W.stride[0]",
                  matrix_view<float>(buf.data(), {2, 3}, {2, 1}, "W"));
  SV_CHECK_THROWS(errc::shape_mismatch, "W.stride[0]",
                  matrix_view<float>(buf.data(), {3, 2}, {0, 1}, "W"));  // broadcast rows
  SV_CHECK_THROWS(errc::shape_mismatch, "W.stride",
                  tensor3_view<float>(buf.data(), {2, 2, 2}, {2, 1, 2}, "W"));
  // Offsets that overflow int64.
  constexpr index_t big = std::numeric_limits<index_t>::max();
  SV_CHECK_THROWS(errc::shape_mismatch, "int64",
                  matrix_view<const float>(buf.data(), {2, 2}, {big, 1}, "O"));
  SV_CHECK_THROWS(errc::shape_mismatch, "int64",
                  matrix_view<const float>(buf.data(), {big, 3}, {1, big / 2}, "O"));
  // Stride 0 is fine for a writable view when the extent is 1, and the
  // non-aliasing exactly-packed layout is fine.
  CHECK_NOTHROW(matrix_view<float>(buf.data(), {1, 4}, {0, 1}, "ok"));
  CHECK_NOTHROW(tensor3_view<float>(buf.data(), {2, 2, 2}, {4, 1, 2}, "ok"));
  CHECK_NOTHROW(matrix_view<float>(buf.data(), {2, 3}, {3, 1}, "ok"));
}

TEST_CASE("view: visual_span end") {
  sparsevlm::visual_span v{3, 4};
  CHECK(v.end() == 7);
}

TEST_CASE("view: contiguous strides that would overflow int64 are refused") {
  float x = 0.0f;
  const std::array<sparsevlm::index_t, 3> ext{0, sparsevlm::index_t{1} << 32, sparsevlm::index_t{1} << 32};
  SV_CHECK_THROWS(sparsevlm::errc::shape_mismatch, "extents",
                  sparsevlm::tensor3_view<const float>(&x, ext));
}

TEST_CASE("view: a huge leading extent is not multiplied into a stride") {
  // {2^40, 2^40}: the strides {2^40, 1} fit, and the leading extent must not be
  // multiplied in (that product overflows: UBSan would catch it). The view is
  // then refused for its last offset, which does not fit.
  const std::array<sparsevlm::index_t, 2> ext{sparsevlm::index_t{1} << 40, sparsevlm::index_t{1} << 40};
  const auto s = sparsevlm::matrix_view<const float>::contiguous_strides(ext);
  CHECK(s[0] == (sparsevlm::index_t{1} << 40));
  CHECK(s[1] == 1);
  float x = 0.0f;
  SV_CHECK_THROWS(sparsevlm::errc::shape_mismatch, "", sparsevlm::matrix_view<const float>(&x, ext));
}
