// dlpack.hpp: DLTensor -> strided_view, the checks it makes, and prune_step on
// views taken from DLTensors.
#include <sparsevlm/dlpack.hpp>

#include <array>
#include <cstdint>
#include <limits>
#include <optional>
#include <random>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "test_util.hpp"

using sparsevlm::bfloat16;
using sparsevlm::device_kind;
using sparsevlm::errc;
using sparsevlm::half;
using sparsevlm::index_t;
using sparsevlm::matrix_view;
using sparsevlm::span_of;
using sparsevlm::step_inputs;
using sparsevlm::step_result;
using sparsevlm::strided_view;
using sparsevlm::tensor3_view;
using sparsevlm::view_of;
using sparsevlm::visit_dlpack;

namespace {

constexpr index_t kMax = std::numeric_limits<index_t>::max();

/// A DLTensor that owns its shape and strides arrays, as an exporter would.
struct dl {
  std::vector<std::int64_t> shape;
  std::optional<std::vector<std::int64_t>> strides;
  DLTensor t{};

  template <class T>
  dl(T* data, std::vector<std::int64_t> shp,
     std::optional<std::vector<std::int64_t>> str = std::nullopt, std::uint64_t byte_offset = 0)
      : shape(std::move(shp)), strides(std::move(str)) {
    t.data = const_cast<void*>(static_cast<const void*>(data));
    t.device = DLDevice{kDLCPU, 0};
    t.dtype = sparsevlm::dl_dtype_of<T>();
    t.byte_offset = byte_offset;
    sync();
  }
  /// Re-points shape/strides after the vectors change (or the struct moves).
  void sync() {
    t.ndim = static_cast<int>(shape.size());
    t.shape = shape.data();
    t.strides = strides ? strides->data() : nullptr;
  }
  dl(const dl& o) : shape(o.shape), strides(o.strides), t(o.t) { sync(); }
  dl& operator=(const dl&) = delete;
  const DLTensor& operator*() {
    sync();
    return t;
  }
};

std::vector<float> iota_floats(std::size_t n) {
  std::vector<float> v(n);
  for (std::size_t i = 0; i < n; ++i) v[i] = static_cast<float>(i);
  return v;
}

}  // namespace

TEST_CASE("dlpack: C-contiguous float32 with null strides") {
  std::vector<float> buf = iota_floats(24);
  dl a(buf.data(), {2, 3, 4});
  const tensor3_view<const float> v = view_of<const float, 3>(*a, "attn");
  CHECK(v.data() == buf.data());
  CHECK(v.extents() == std::array<index_t, 3>{2, 3, 4});
  CHECK(v.strides() == std::array<index_t, 3>{12, 4, 1});
  for (index_t h = 0; h < 2; ++h)
    for (index_t i = 0; i < 3; ++i)
      for (index_t j = 0; j < 4; ++j) CHECK(v(h, i, j) == static_cast<float>(h * 12 + i * 4 + j));
  // A non-const view writes through to the tensor's memory.
  const tensor3_view<float> w = view_of<float, 3>(*a, "out");
  w(1, 2, 3) = -1.0f;
  CHECK(buf[23] == -1.0f);
  // The same memory as a rank-1 vector of 24.
  dl flat(buf.data(), {24});
  CHECK(view_of<const float, 1>(*flat, "flat")(5) == 5.0f);
  // Empty tensors are fine, with or without a pointer.
  dl empty(buf.data(), {0, 4});
  CHECK(view_of<const float, 2>(*empty, "e").empty());
  empty.t.data = nullptr;
  CHECK(view_of<const float, 2>(*empty, "e").empty());
  CHECK(view_of<const float, 2>(*empty, "e").strides() == std::array<index_t, 2>{4, 1});
}

TEST_CASE("dlpack: float16, bfloat16 and int64 elements") {
  const std::vector<float> vals{0.5f, -1.25f, 3.0f, 1024.0f, -0.0078125f, 7.0f};
  const auto h = svt::convert<half>(vals);
  const auto b = svt::convert<bfloat16>(vals);
  dl th(h.data(), {2, 3});
  dl tb(b.data(), {2, 3});
  CHECK(th.t.dtype.code == kDLFloat);
  CHECK(th.t.dtype.bits == 16);
  CHECK(tb.t.dtype.code == kDLBfloat);
  const auto vh = view_of<const half, 2>(*th, "h");
  const auto vb = view_of<const bfloat16, 2>(*tb, "b");
  for (index_t i = 0; i < 2; ++i)
    for (index_t j = 0; j < 3; ++j) {
      CHECK(sparsevlm::to_float(vh(i, j)) == vals[static_cast<std::size_t>(i * 3 + j)]);
      CHECK(sparsevlm::to_float(vb(i, j)) == vals[static_cast<std::size_t>(i * 3 + j)]);
    }
  std::vector<index_t> pos{10, 11, 12, 40, 41, 42};
  dl tp(pos.data(), {3, 2});
  CHECK(tp.t.dtype.code == kDLInt);
  CHECK(tp.t.dtype.bits == 64);
  const auto vp = view_of<index_t, 2>(*tp, "position_ids");
  CHECK(vp(2, 1) == 42);
  vp(0, 0) = 9;
  CHECK(pos[0] == 9);
}

TEST_CASE("dlpack: explicit, transposed, sliced and broadcast strides; byte_offset") {
  std::vector<float> buf = iota_floats(20);  // a 4x5 row-major matrix, m(i, j) = 5i + j
  SUBCASE("explicit C strides equal the null-strides view") {
    dl a(buf.data(), {4, 5}, std::vector<std::int64_t>{5, 1});
    CHECK(view_of<const float, 2>(*a, "m")(3, 4) == 19.0f);
  }
  SUBCASE("transposed (torch .t(), strides in elements)") {
    dl a(buf.data(), {5, 4}, std::vector<std::int64_t>{1, 5});
    const auto v = view_of<const float, 2>(*a, "mt");
    for (index_t i = 0; i < 5; ++i)
      for (index_t j = 0; j < 4; ++j) CHECK(v(i, j) == static_cast<float>(5 * j + i));
    // Writable too: the transpose does not alias.
    view_of<float, 2>(*a, "mt")(4, 3) = -7.0f;
    CHECK(buf[19] == -7.0f);
  }
  SUBCASE("sliced m[1:3, 2:5] through byte_offset") {
    dl a(buf.data(), {2, 3}, std::vector<std::int64_t>{5, 1}, (1 * 5 + 2) * sizeof(float));
    const auto v = view_of<const float, 2>(*a, "s");
    CHECK(v.data() == buf.data() + 7);
    CHECK(v(0, 0) == 7.0f);
    CHECK(v(1, 2) == 14.0f);
  }
  SUBCASE("stepped m[::2, 1::2] through strides and byte_offset") {
    dl a(buf.data(), {2, 2}, std::vector<std::int64_t>{10, 2}, sizeof(float));
    const auto v = view_of<const float, 2>(*a, "s");
    CHECK(v(0, 0) == 1.0f);
    CHECK(v(0, 1) == 3.0f);
    CHECK(v(1, 0) == 11.0f);
    CHECK(v(1, 1) == 13.0f);
  }
  SUBCASE("broadcast (torch expand): const only") {
    dl a(buf.data(), {3, 5}, std::vector<std::int64_t>{0, 1});
    const auto v = view_of<const float, 2>(*a, "bc");
    CHECK(v(2, 4) == 4.0f);
    SV_CHECK_THROWS(errc::shape_mismatch, "bc.stride[0]", view_of<float, 2>(*a, "bc"));
  }
  SUBCASE("size-1 dimensions may carry any non-negative stride") {
    dl a(buf.data(), {1, 5}, std::vector<std::int64_t>{12345, 1});
    CHECK(view_of<float, 2>(*a, "row")(0, 3) == 3.0f);
  }
}

TEST_CASE("dlpack: devices") {
  std::vector<float> buf = iota_floats(6);
  dl a(buf.data(), {2, 3});
  SUBCASE("pinned host memory is host-readable") {
    a.t.device = DLDevice{kDLCUDAHost, 0};
    CHECK(view_of<const float, 2>(*a, "attn")(1, 1) == 4.0f);
    CHECK(sparsevlm::check_device(*a, "attn", device_kind::host) == -1);
  }
  SUBCASE("device memory is refused for host functions") {
    a.t.device = DLDevice{kDLCUDA, 0};
    SV_CHECK_THROWS(errc::invalid_argument,
                    "attn.device: expected host memory (kDLCPU or kDLCUDAHost) for a host "
                    "function, got kDLCUDA:0",
                    view_of<const float, 2>(*a, "attn"));
    a.t.device = DLDevice{kDLCUDAManaged, 0};
    SV_CHECK_THROWS(errc::invalid_argument, "got kDLCUDAManaged",
                    view_of<const float, 2>(*a, "attn", device_kind::host));
    a.t.device = DLDevice{kDLOpenCL, 0};
    SV_CHECK_THROWS(errc::invalid_argument, "attn.device: expected host memory",
                    view_of<const float, 2>(*a, "attn"));
    SV_CHECK_THROWS(errc::invalid_argument, "got device type 4",
                    view_of<const float, 2>(*a, "attn"));
  }
  SUBCASE("CUDA views: the pointer is kept (not read) and the ordinal reported") {
    a.t.device = DLDevice{kDLCUDA, 1};
    const auto v = view_of<const float, 2>(*a, "q", device_kind::cuda);
    CHECK(v.data() == buf.data());
    CHECK(v.strides() == std::array<index_t, 2>{3, 1});
    CHECK(sparsevlm::check_device(*a, "q", device_kind::cuda) == 1);
    a.t.device = DLDevice{kDLCUDAManaged, 0};
    CHECK(sparsevlm::check_device(*a, "q", device_kind::cuda) == -1);
    CHECK(view_of<const float, 2>(*a, "q", device_kind::cuda).data() == buf.data());
  }
  SUBCASE("CUDA views refuse host and pinned memory, and negative ordinals") {
    SV_CHECK_THROWS(errc::invalid_argument,
                    "q.device: expected CUDA memory (kDLCUDA or kDLCUDAManaged) for a CUDA "
                    "launcher, got kDLCPU",
                    view_of<const float, 2>(*a, "q", device_kind::cuda));
    a.t.device = DLDevice{kDLCUDAHost, 0};
    SV_CHECK_THROWS(errc::invalid_argument, "got kDLCUDAHost",
                    view_of<const float, 2>(*a, "q", device_kind::cuda));
    a.t.device = DLDevice{kDLCUDA, -1};
    SV_CHECK_THROWS(errc::invalid_argument, "q.device.device_id: expected >= 0, got -1",
                    view_of<const float, 2>(*a, "q", device_kind::cuda));
  }
}

TEST_CASE("dlpack: refusals name the argument, the expectation and what was found") {
  std::vector<float> buf = iota_floats(64);
  dl a(buf.data(), {2, 4, 8});
  SUBCASE("rank") {
    SV_CHECK_THROWS(errc::shape_mismatch, "attn.ndim: expected 2, got 3",
                    view_of<const float, 2>(*a, "attn"));
    a.t.shape = nullptr;
    SV_CHECK_THROWS(errc::shape_mismatch, "attn.shape: expected a non-null array",
                    view_of<const float, 3>(a.t, "attn"));
  }
  SUBCASE("dtype code, bits and lanes") {
    a.t.dtype = DLDataType{kDLBfloat, 16, 1};
    SV_CHECK_THROWS(errc::invalid_argument, "attn.dtype: expected float32, got bfloat16",
                    view_of<const float, 3>(*a, "attn"));
    a.t.dtype = DLDataType{kDLFloat, 64, 1};
    SV_CHECK_THROWS(errc::invalid_argument, "attn.dtype: expected float32, got float64",
                    view_of<const float, 3>(*a, "attn"));
    a.t.dtype = DLDataType{kDLFloat, 32, 4};
    SV_CHECK_THROWS(errc::invalid_argument, "attn.dtype: expected float32, got float32x4",
                    view_of<const float, 3>(*a, "attn"));
    a.t.dtype = DLDataType{kDLFloat, 32, 1};
    SV_CHECK_THROWS(errc::invalid_argument, "attn.dtype: expected float16, got float32",
                    view_of<const half, 3>(*a, "attn"));
    SV_CHECK_THROWS(errc::invalid_argument, "attn.dtype: expected bfloat16, got float32",
                    view_of<const bfloat16, 3>(*a, "attn"));
    SV_CHECK_THROWS(errc::invalid_argument, "pos.dtype: expected int64, got float32",
                    view_of<const index_t, 3>(*a, "pos"));
    a.t.dtype = DLDataType{kDLInt, 32, 1};
    SV_CHECK_THROWS(errc::invalid_argument, "pos.dtype: expected int64, got int32",
                    view_of<const index_t, 3>(*a, "pos"));
    a.t.dtype = DLDataType{kDLUInt, 64, 1};
    SV_CHECK_THROWS(errc::invalid_argument, "pos.dtype: expected int64, got uint64",
                    view_of<const index_t, 3>(*a, "pos"));
    a.t.dtype = DLDataType{42, 16, 1};
    SV_CHECK_THROWS(errc::invalid_argument, "got code 42 bits 16",
                    view_of<const half, 3>(*a, "attn"));
  }
  SUBCASE("byte_offset and alignment") {
    a.t.byte_offset = 6;
    SV_CHECK_THROWS(errc::invalid_argument,
                    "attn.byte_offset: expected a multiple of 4 (the float32 element size), got 6",
                    view_of<const float, 3>(*a, "attn"));
    a.t.byte_offset = 0;
    a.t.data = reinterpret_cast<std::byte*>(buf.data()) + 2;
    SV_CHECK_THROWS(errc::invalid_argument, "attn.data: expected an element pointer aligned to 4",
                    view_of<const float, 3>(*a, "attn"));
    a.t.data = buf.data();
    a.t.byte_offset = std::numeric_limits<std::uint64_t>::max() - 3;
    SV_CHECK_THROWS(errc::invalid_argument, "attn.byte_offset: expected a value that fits in int64",
                    view_of<const float, 3>(*a, "attn"));
  }
  SUBCASE("negative strides (reversed slices) and extents") {
    dl r(buf.data() + 7, {8}, std::vector<std::int64_t>{-1});
    SV_CHECK_THROWS(errc::shape_mismatch, "rev.stride[0]: expected >= 0, got -1",
                    view_of<const float, 1>(*r, "rev"));
    a.shape[1] = -4;
    SV_CHECK_THROWS(errc::shape_mismatch, "attn.extent[1]: expected >= 0, got -4",
                    view_of<const float, 3>(*a, "attn"));
  }
  SUBCASE("null data with a non-empty shape") {
    a.t.data = nullptr;
    SV_CHECK_THROWS(errc::invalid_argument, "attn.data: expected a non-null pointer",
                    view_of<const float, 3>(*a, "attn"));
    a.t.byte_offset = 64;  // an offset from null is not taken
    SV_CHECK_THROWS(errc::invalid_argument, "attn.data: expected a non-null pointer",
                    view_of<const float, 3>(*a, "attn"));
  }
  SUBCASE("shapes whose offsets overflow int64") {
    // C-contiguous: the trailing extents' product does not fit.
    dl c(buf.data(), {2, std::int64_t{1} << 32, std::int64_t{1} << 32});
    SV_CHECK_THROWS(errc::shape_mismatch, "attn.shape: expected C-contiguous strides that fit",
                    view_of<const float, 3>(*c, "attn"));
    // The leading extent alone takes the furthest offset past int64.
    dl l(buf.data(), {kMax, 2});
    SV_CHECK_THROWS(errc::shape_mismatch, "attn: expected an element offset that fits in int64",
                    view_of<const float, 2>(*l, "attn"));
    // Explicit strides.
    dl s(buf.data(), {4, 2}, std::vector<std::int64_t>{kMax / 2, 1});
    SV_CHECK_THROWS(errc::shape_mismatch, "attn: expected an element offset that fits in int64",
                    view_of<const float, 2>(*s, "attn"));
  }
  SUBCASE("writable views must not alias") {
    dl s(buf.data(), {4, 4}, std::vector<std::int64_t>{2, 1});
    CHECK(view_of<const float, 2>(*s, "win")(3, 3) == 9.0f);  // read-only: fine
    SV_CHECK_THROWS(errc::shape_mismatch, "out.stride[0]", view_of<float, 2>(*s, "out"));
  }
}

TEST_CASE("dlpack: span_of for raters and index lists") {
  std::vector<index_t> idx{5, 6, 9, 11};
  dl r(idx.data(), {4});
  const std::span<const index_t> s = span_of<const index_t>(*r, "raters");
  CHECK(s.data() == idx.data());
  CHECK(s.size() == 4);
  CHECK(s[3] == 11);
  dl stepped(idx.data(), {2}, std::vector<std::int64_t>{2});
  SV_CHECK_THROWS(errc::shape_mismatch, "raters.strides[0]: expected 1 (contiguous), got 2",
                  span_of<const index_t>(*stepped, "raters"));
  dl one(idx.data() + 1, {1}, std::vector<std::int64_t>{7});
  CHECK(span_of<const index_t>(*one, "raters")[0] == 6);
  dl none(static_cast<index_t*>(nullptr), {0});
  CHECK(span_of<const index_t>(*none, "raters").empty());
  std::vector<float> f(4);
  dl wrong(f.data(), {4});
  SV_CHECK_THROWS(errc::invalid_argument, "raters.dtype: expected int64, got float32",
                  span_of<const index_t>(*wrong, "raters"));
}

TEST_CASE("dlpack: visit_dlpack dispatches on the runtime dtype") {
  const std::vector<float> vals{1.5f, -2.0f, 0.25f, 8.0f};
  const auto h = svt::convert<half>(vals);
  const auto b = svt::convert<bfloat16>(vals);
  dl tf(vals.data(), {2, 2});
  dl th(h.data(), {2, 2});
  dl tb(b.data(), {2, 2});
  const auto probe = [](auto v) {
    using E = typename decltype(v)::element_type;
    static_assert(std::is_const_v<E>);
    return std::pair<sparsevlm::dtype, float>(sparsevlm::dtype_of<std::remove_cv_t<E>>::value,
                                              sparsevlm::to_float(v(1, 0)));
  };
  CHECK(visit_dlpack<2>(*tf, "x", probe) == std::pair(sparsevlm::dtype::float32, 0.25f));
  CHECK(visit_dlpack<2>(*th, "x", probe) == std::pair(sparsevlm::dtype::float16, 0.25f));
  CHECK(visit_dlpack<2>(*tb, "x", probe) == std::pair(sparsevlm::dtype::bfloat16, 0.25f));
  // The chosen view is still fully checked.
  SV_CHECK_THROWS(errc::shape_mismatch, "x.ndim: expected 3, got 2", visit_dlpack<3>(*th, "x", [](auto v) { return v.size(); }));
  std::vector<index_t> ints(4);
  dl ti(ints.data(), {2, 2});
  SV_CHECK_THROWS(errc::invalid_argument,
                  "ids.dtype: expected float32, float16 or bfloat16, got int64",
                  visit_dlpack<2>(*ti, "ids", probe));
  th.t.dtype.lanes = 2;
  SV_CHECK_THROWS(errc::invalid_argument, "got float16x2", visit_dlpack<2>(*th, "x", probe));
  tb.t.device = DLDevice{kDLCUDA, 0};
  SV_CHECK_THROWS(errc::invalid_argument, "x.device", visit_dlpack<2>(*tb, "x", probe));
  CHECK(visit_dlpack<2>(*tb, "x", [](auto v) { return v.data() != nullptr; },
                        device_kind::cuda));
}

namespace {

int deleter_calls = 0;

struct managed_owner {
  std::vector<float> data;
  std::vector<std::int64_t> shape;
  DLManagedTensor m{};
};

void delete_owner(DLManagedTensor* self) {
  ++deleter_calls;
  delete static_cast<managed_owner*>(self->manager_ctx);
}

/// What an exporter (torch.utils.dlpack.to_dlpack) hands over: a managed tensor
/// whose deleter frees the exporter's side.
DLManagedTensor* export_matrix(index_t rows, index_t cols) {
  auto* o = new managed_owner;
  o->data = iota_floats(static_cast<std::size_t>(rows * cols));
  o->shape = {rows, cols};
  o->m.dl_tensor.data = o->data.data();
  o->m.dl_tensor.device = DLDevice{kDLCPU, 0};
  o->m.dl_tensor.ndim = 2;
  o->m.dl_tensor.dtype = DLDataType{kDLFloat, 32, 1};
  o->m.dl_tensor.shape = o->shape.data();
  o->m.manager_ctx = o;
  o->m.deleter = delete_owner;
  return &o->m;
}

}  // namespace

TEST_CASE("dlpack: DLManagedTensor is borrowed, never released") {
  deleter_calls = 0;
  DLManagedTensor* m = export_matrix(3, 4);
  {
    const auto v = view_of<const float, 2>(*m, "hidden");
    CHECK(v(2, 3) == 11.0f);
    CHECK(visit_dlpack<2>(*m, "hidden", [](auto x) { return sparsevlm::to_float(x(1, 1)); }) ==
          5.0f);
    SV_CHECK_THROWS(errc::shape_mismatch, "hidden.ndim", view_of<const float, 3>(*m, "hidden"));
    m->dl_tensor.ndim = 1;
    m->dl_tensor.shape[0] = 12;
    CHECK(span_of<const float>(*m, "flat")[11] == 11.0f);
  }
  CHECK(deleter_calls == 0);  // views and errors leave the deleter to the caller
  m->deleter(m);
  CHECK(deleter_calls == 1);
}

namespace {

struct random_step {
  index_t S, N, T, H, L, d, de;
  std::vector<float> embeds, attn, hidden;
  sparsevlm::step_options opt;
};

random_step make_step(std::mt19937& g) {
  random_step c;
  c.S = svt::rand_int(g, 0, 3);
  c.N = svt::rand_int(g, 2, 12);
  c.T = svt::rand_int(g, 1, 6);
  c.H = svt::rand_int(g, 1, 3);
  c.d = svt::rand_int(g, 1, 5);
  c.de = svt::rand_int(g, 1, 5);
  c.L = c.S + c.N + c.T;
  const auto n = [](index_t a, index_t b) { return static_cast<std::size_t>(a * b); };
  // Exactly representable in bfloat16, so a bfloat16 copy decides the same.
  c.embeds = svt::random_grid(g, n(c.L, c.de), -64, 64, 32.0f);
  c.attn = svt::random_grid(g, n(c.H * c.L, c.L), 0, 127, 128.0f);
  c.hidden = svt::random_grid(g, n(c.L, c.d), -64, 64, 16.0f);
  c.opt.policy = sparsevlm::keep_policy::rank(std::uniform_real_distribution<double>(0.5, 3.0)(g),
                                              std::uniform_real_distribution<double>(-1.0, 2.0)(g));
  c.opt.recycle = {true, 0.5, 2.0};
  return c;
}

void check_same(const step_result& a, const step_result& b) {
  CHECK(a.raters == b.raters);
  CHECK(a.scores == b.scores);
  CHECK(a.rank == b.rank);
  CHECK(a.keep_count == b.keep_count);
  CHECK(a.keep == b.keep);
  CHECK(a.recycled.clusters == b.recycled.clusters);
  CHECK(a.recycled.merged == b.recycled.merged);
  CHECK(a.sequence == b.sequence);
}

}  // namespace

TEST_CASE("dlpack: prune_step on DLTensor views decides as on direct views") {
  std::mt19937 g(6062);
  int pruned = 0;
  for (int it = 0; it < 25; ++it) {
    const random_step c = make_step(g);
    INFO("it=", it, " S=", c.S, " N=", c.N, " T=", c.T, " H=", c.H, " d=", c.d);
    // Directly constructed views.
    step_inputs<float, float, float> direct;
    direct.embeds = matrix_view<const float>(c.embeds.data(), {c.L, c.de}, "embeds");
    direct.attn = tensor3_view<const float>(c.attn.data(), {c.H, c.L, c.L}, "attn");
    direct.hidden = matrix_view<const float>(c.hidden.data(), {c.L, c.d}, "hidden");
    direct.visual = {c.S, c.N};
    const step_result want = sparsevlm::prune_step(direct, c.opt);
    if (want.keep_count < c.N) ++pruned;

    // The same memory handed over as DLTensors (null strides).
    dl e(c.embeds.data(), {c.L, c.de});
    dl a(c.attn.data(), {c.H, c.L, c.L});
    dl h(c.hidden.data(), {c.L, c.d});
    step_inputs<float, float, float> in;
    in.embeds = view_of<const float, 2>(*e, "embeds");
    in.attn = view_of<const float, 3>(*a, "attn");
    in.hidden = view_of<const float, 2>(*h, "hidden");
    in.visual = {c.S, c.N};
    check_same(sparsevlm::prune_step(in, c.opt), want);

    // The raters of that step handed over as an int64 tensor.
    std::vector<index_t> raters = want.raters;
    dl r(raters.data(), {static_cast<std::int64_t>(raters.size())});
    in.raters = span_of<const index_t>(*r, "raters");
    check_same(sparsevlm::prune_step(in, c.opt), want);
    in.raters.reset();

    // The hidden states inside a wider, offset buffer (a slice of a [L, d + 3]
    // tensor starting at column 2), against the same strided view built directly.
    const index_t wide = c.d + 3;
    std::vector<float> padded(static_cast<std::size_t>(c.L * wide), svt::kNaNf);
    for (index_t p = 0; p < c.L; ++p)
      for (index_t j = 0; j < c.d; ++j)
        padded[static_cast<std::size_t>(p * wide + 2 + j)] =
            c.hidden[static_cast<std::size_t>(p * c.d + j)];
    dl hs(padded.data(), {c.L, c.d}, std::vector<std::int64_t>{wide, 1}, 2 * sizeof(float));
    in.hidden = view_of<const float, 2>(*hs, "hidden");
    step_inputs<float, float, float> direct_s = direct;
    direct_s.hidden = matrix_view<const float>(padded.data() + 2, {c.L, c.d}, {wide, 1}, "hidden");
    check_same(sparsevlm::prune_step(in, c.opt), sparsevlm::prune_step(direct_s, c.opt));

    // The attention as bfloat16 of a runtime dtype, through visit_dlpack.
    const auto a16 = svt::convert<bfloat16>(c.attn);
    dl ab(a16.data(), {c.H, c.L, c.L});
    const step_result got = visit_dlpack<3>(*ab, "attn", [&](auto av) {
      step_inputs<float, typename decltype(av)::value_type, float> mixed;
      mixed.embeds = direct.embeds;
      mixed.attn = av;
      mixed.hidden = direct.hidden;
      mixed.visual = direct.visual;
      return sparsevlm::prune_step(mixed, c.opt);
    });
    check_same(got, want);
  }
  CHECK(pruned >= 10);
}

// docs/dlpack.md, "From C++": keep the two in step.
namespace doc_snippet {

// An engine's hook: the tensors arrive as DLPack; the result is the plan.
sparsevlm::step_result prune_from_dlpack(const DLManagedTensor& attn,
                                         const DLManagedTensor& hidden,
                                         const DLManagedTensor& raters,
                                         sparsevlm::visual_span visual,
                                         const sparsevlm::step_options& opt,
                                         sparsevlm::workspace& ws) {
  using namespace sparsevlm;
  const auto h = view_of<const float, 2>(hidden, "hidden");
  const auto r = span_of<const index_t>(raters, "raters");
  return visit_dlpack<3>(attn, "attn", [&](auto a) {
    step_inputs<float, typename decltype(a)::value_type, float> in;
    in.attn = a;
    in.hidden = h;
    in.visual = visual;
    in.raters = r;  // caller-chosen raters: embeds is not read
    return prune_step(in, opt, ws);
  });
}

}  // namespace doc_snippet

TEST_CASE("dlpack: dlpack.md snippet") {
  // Example A of test_step.cpp: L = 7, visual 1-4, raters {5, 6}.
  constexpr index_t H = 2, L = 7, d = 2;
  std::vector<float> attn(static_cast<std::size_t>(H * L * L), svt::kNaNf);
  const float r5[4] = {1, 0.5f, 0.25f, 0.125f};
  for (index_t j = 0; j < 4; ++j) {
    attn[static_cast<std::size_t>((0 * L + 5) * L + 1 + j)] = r5[j];
    attn[static_cast<std::size_t>((0 * L + 6) * L + 1 + j)] = r5[j] / 2;
    attn[static_cast<std::size_t>((1 * L + 5) * L + 1 + j)] = 0;
    attn[static_cast<std::size_t>((1 * L + 6) * L + 1 + j)] = 0;
  }
  const auto attn16 = svt::convert<half>(attn);
  std::vector<float> hidden(static_cast<std::size_t>(L * d));
  for (index_t p = 0; p < L; ++p) {
    hidden[static_cast<std::size_t>(p * d)] = static_cast<float>(p);
    hidden[static_cast<std::size_t>(p * d + 1)] = static_cast<float>(-2 * p);
  }
  std::vector<index_t> raters{5, 6};
  dl ta(attn16.data(), {H, L, L});
  dl th(hidden.data(), {L, d});
  dl tr(raters.data(), {2});
  DLManagedTensor ma{*ta, nullptr, nullptr}, mh{*th, nullptr, nullptr}, mr{*tr, nullptr, nullptr};
  sparsevlm::step_options opt;
  opt.policy = sparsevlm::keep_policy::rank(2, 0);
  opt.recycle = {true, 0.5, 10};
  sparsevlm::workspace ws;
  const step_result res = doc_snippet::prune_from_dlpack(ma, mh, mr, {1, 4}, opt, ws);
  CHECK(res.scores == std::vector<float>{0.375f, 0.1875f, 0.09375f, 0.046875f});
  CHECK(res.keep == std::vector<index_t>{1, 2});
  CHECK(res.sequence == std::vector<index_t>{0, 1, 2, -1, 5, 6});
  ma.dl_tensor.device = DLDevice{kDLCUDA, 0};
  SV_CHECK_THROWS(errc::invalid_argument, "attn.device: expected host memory",
                  doc_snippet::prune_from_dlpack(ma, mh, mr, {1, 4}, opt, ws));
}
