// workspace.hpp: the size query, reserve(), and no allocation once sized.
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <new>
#include <type_traits>
#include <algorithm>
#include <array>

#include "test_util.hpp"

// Counts every global operator new in this binary while `g_counting` is set
// (the tests run on one thread, so a plain flag is enough).
namespace {
std::atomic<bool> g_counting{false};
std::atomic<long> g_allocations{0};
}  // namespace

// GCC pairs the free() below with this operator new only by name; the pairing is right.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
void* operator new(std::size_t n) {
  if (g_counting.load(std::memory_order_relaxed)) g_allocations.fetch_add(1);
  if (void* p = std::malloc(n ? n : 1)) return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t n) { return operator new(n); }
void* operator new(std::size_t n, const std::nothrow_t&) noexcept {
  if (g_counting.load(std::memory_order_relaxed)) g_allocations.fetch_add(1);
  return std::malloc(n ? n : 1);
}
void* operator new[](std::size_t n, const std::nothrow_t& t) noexcept { return operator new(n, t); }
// The aligned forms (the workspace's float and double buffers use them).
void* operator new(std::size_t n, std::align_val_t a) {
  if (g_counting.load(std::memory_order_relaxed)) g_allocations.fetch_add(1);
  const std::size_t al = static_cast<std::size_t>(a);
  if (void* p = std::aligned_alloc(al, (n + al - 1) / al * al + (n ? 0 : al))) return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t n, std::align_val_t a) { return operator new(n, a); }
void operator delete(void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }
// Every form of delete frees what one of the forms above got from malloc.
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
void operator delete(void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete[](void* p, const std::nothrow_t&) noexcept { std::free(p); }
#pragma GCC diagnostic pop

using namespace sparsevlm;

namespace {

/// A LLaVA-like step, scaled down: prefix 5, N visual, T text, H heads.
struct toy {
  index_t S = 5, N, T, H, d, dh = 16, L;
  std::vector<float> embeds, attn, hidden, q, k;
  toy(std::mt19937& g, index_t n, index_t t, index_t h, index_t dim)
      : N(n), T(t), H(h), d(dim), L(5 + n + t) {
    embeds = svt::random_floats(g, static_cast<std::size_t>(L * d), -1.0f, 1.0f);
    attn = svt::random_floats(g, static_cast<std::size_t>(H * L * L), 0.0f, 1.0f);
    hidden = svt::random_floats(g, static_cast<std::size_t>(L * d), -1.0f, 1.0f);
    q = svt::random_floats(g, static_cast<std::size_t>(H * L * dh), -1.0f, 1.0f);
    k = svt::random_floats(g, static_cast<std::size_t>(H * L * dh), -1.0f, 1.0f);
  }
  step_inputs<float, float, float> inputs() const {
    return {matrix_view<const float>(embeds.data(), {L, d}, "embeds"),
            tensor3_view<const float>(attn.data(), {H, L, L}, "attn"),
            matrix_view<const float>(hidden.data(), {L, d}, "hidden"), visual_span{S, N},
            std::nullopt};
  }
  step_inputs_qk<float, float, float, float> inputs_qk() const {
    return {matrix_view<const float>(embeds.data(), {L, d}, "embeds"),
            {tensor3_view<const float>(q.data(), {H, L, dh}, "q"),
             tensor3_view<const float>(k.data(), {H, L, dh}, "k"), std::nullopt, 0.0},
            matrix_view<const float>(hidden.data(), {L, d}, "hidden"), visual_span{S, N},
            std::nullopt};
  }
  step_shape shape(double fraction, bool gravity = false) const {
    return step_shape{L, N, H, d, d, dh, fraction, gravity};
  }
};

/// A reused result (step_result or spans_result) equals a fresh one.
template <class Result>
void check_same_result(const Result& out, const Result& fresh) {
  CHECK(out.keep == fresh.keep);
  CHECK(out.recycled.clusters == fresh.recycled.clusters);
  CHECK(out.recycled.merged == fresh.recycled.merged);
  CHECK(out.sequence == fresh.sequence);
  CHECK(out.scores == fresh.scores);
  CHECK(out.raters == fresh.raters);
}

/// Each buffer's capacity, in order.
std::vector<std::size_t> capacities(const workspace& ws) {
  std::vector<std::size_t> out;
  ws.visit_buffers([&](const auto& v) { out.push_back(v.capacity()); });
  return out;
}

}  // namespace

TEST_CASE("workspace: required_bytes matches reserve() and bounds what steps take") {
  std::mt19937 g(31);
  for (int it = 0; it < 12; ++it) {
    const toy t(g, svt::rand_int(g, 2, 60), svt::rand_int(g, 0, 12), svt::rand_int(g, 1, 4),
                svt::rand_int(g, 1, 40));
    INFO("it=", it, " N=", t.N, " T=", t.T, " H=", t.H, " d=", t.d);
    step_options o;
    o.policy = keep_policy::fixed(svt::rand_int(g, 0, t.N));
    o.recycle.fraction = 0.5;
    o.recycle.cluster_divisor = 2.0;
    step_shape sh = t.shape(o.recycle.fraction);
    sh.cluster_divisor = o.recycle.cluster_divisor;
    workspace ws;
    ws.reserve(sh);
    const auto reserved = capacities(ws);
    // What reserve() holds is what the size query reports.
    CHECK(ws.bytes() == workspace::required_bytes(sh));
    step_result out;
    prune_step_into(t.inputs(), o, ws, out);
    prune_step_into(t.inputs_qk(), o, ws, out);
    o.policy = keep_policy::fixed(0);  // the most recycling
    prune_step_into(t.inputs(), o, ws, out);
    CHECK(capacities(ws) == reserved);  // no buffer had to grow
  }
  // A larger shape needs more; a shape without recycling or q/k needs less.
  const step_shape big{700, 576, 32, 4096, 4096, 128, 0.3, false};
  step_shape small = big;
  small.recycle_fraction = 0.0;
  small.head_dim = 0;
  CHECK(workspace::required_bytes(small) < workspace::required_bytes(big));
  MESSAGE("LLaVA-1.5-7B step (L 700, N 576, H 32, d 4096, dh 128, recycling 0.3): ",
          workspace::required_bytes(big), " bytes of scratch");
}

TEST_CASE("workspace: the float and double buffers are 64-byte aligned, reserved or grown") {
  std::mt19937 g(7);
  const toy t(g, 40, 9, 3, 24);
  const auto aligned = [](const auto& v) {
    return v.capacity() == 0 || reinterpret_cast<std::uintptr_t>(v.data()) % 64 == 0;
  };
  const auto check_all = [&](const workspace& ws) {
    int checked = 0;
    ws.visit_buffers([&](const auto& v) {
      using T = typename std::remove_reference_t<decltype(v)>::value_type;
      if constexpr (std::is_floating_point_v<T>) {  // the scratch_vectors the SIMD kernels stream
        CHECK(aligned(v));
        ++checked;
      }
    });
    CHECK(checked == 26);  // every float and double buffer of every stage
  };
  workspace grown;  // grown by the steps themselves
  step_options o;
  o.policy = keep_policy::fixed(5);
  (void)prune_step(t.inputs(), o, grown);
  (void)prune_step(t.inputs_qk(), o, grown);
  CHECK(grown.raters.visual.capacity() + grown.step.P.capacity() > 0);
  check_all(grown);
  workspace reserved;
  reserved.reserve(t.shape(0.3));
  CHECK(reserved.raters.visual.capacity() > 0);
  check_all(reserved);
  // Odd sizes too: every allocation of the allocator is aligned.
  for (std::size_t n : {1, 3, 17, 1000, 100003}) {
    scratch_vector<float> f(n);
    scratch_vector<double> d(n);
    CHECK(aligned(f));
    CHECK(aligned(d));
  }
}

TEST_CASE("workspace: after reserve(shape, &out), steps allocate nothing at all") {
  std::mt19937 g(32);
  // One shape, many data sets; policies whose keep count (hence the number and
  // sizes of clusters) changes from step to step.
  std::vector<toy> data;
  for (int i = 0; i < 6; ++i) data.emplace_back(g, 48, 10, 3, 24);
  std::vector<step_options> opts(3);
  opts[0].policy = keep_policy::fixed(20);
  opts[1].policy = keep_policy::rank(2.5, 1.0);
  opts[2].policy = keep_policy::fixed(3);
  for (auto& o : opts) {
    o.recycle.fraction = 0.8;
    o.recycle.cluster_divisor = 3.0;
  }
  step_shape shape = data[0].shape(0.8);
  shape.cluster_divisor = 3.0;
  workspace ws;
  step_result out;
  ws.reserve(shape, &out);
  std::array<int, 64> seen_counts{};  // no allocation inside the counted loop
  g_allocations = 0;
  g_counting = true;
  for (int rep = 0; rep < 40; ++rep) {
    const toy& t = data[static_cast<std::size_t>(rep) % data.size()];
    const step_options& o = opts[static_cast<std::size_t>(rep) % opts.size()];
    if (rep % 2) prune_step_into(t.inputs(), o, ws, out);
    else prune_step_into(t.inputs_qk(), o, ws, out);
    seen_counts[std::min<std::size_t>(out.recycled.clusters.size(), 63)] = 1;
  }
  g_counting = false;
  CHECK(g_allocations.load() == 0);
  CHECK(std::count(seen_counts.begin(), seen_counts.end(), 1) >= 3);  // the lists moved around
  // The reused result is the same as a fresh one.
  prune_step_into(data[0].inputs(), opts[1], ws, out);
  const step_result fresh = prune_step(data[0].inputs(), opts[1]);
  check_same_result(out, fresh);
}

TEST_CASE("workspace: without reserve, a warmed-up fixed-shape loop stops allocating") {
  std::mt19937 g(34);
  const toy a(g, 40, 8, 2, 16);
  step_options o;
  o.policy = keep_policy::fixed(10);
  workspace ws;
  step_result out;
  for (int rep = 0; rep < 3; ++rep) prune_step_into(a.inputs(), o, ws, out);
  g_allocations = 0;
  g_counting = true;
  for (int rep = 0; rep < 5; ++rep) prune_step_into(a.inputs(), o, ws, out);
  g_counting = false;
  CHECK(g_allocations.load() == 0);
}

TEST_CASE("workspace: prune_step_into leaves the caller's result untouched on error") {
  std::mt19937 g(33);
  toy t(g, 20, 6, 2, 8);
  step_options o;
  o.policy = keep_policy::fixed(5);
  workspace ws;
  step_result out;
  prune_step_into(t.inputs(), o, ws, out);
  const step_result before = out;
  // A NaN in a recycled hidden row is only found inside recycling, after the
  // raters, scores and rank were computed.
  for (index_t p = t.S; p < t.S + t.N; ++p) t.hidden[static_cast<std::size_t>(p * t.d)] = svt::kNaNf;
  SV_CHECK_THROWS(errc::non_finite, "hidden[", prune_step_into(t.inputs(), o, ws, out));
  CHECK(out.keep == before.keep);
  CHECK(out.sequence == before.sequence);
  CHECK(out.recycled.merged == before.recycled.merged);
  CHECK(out.raters == before.raters);
}

TEST_CASE("workspace: a warmed-up multi-span loop (prune_step_spans_into) stops allocating") {
  std::mt19937 g(35);
  const toy a(g, 48, 9, 2, 16);
  // Three images inside the toy's visual region, with text between them.
  const std::vector<visual_span> spans{{a.S, 12}, {a.S + 15, 14}, {a.S + 32, a.N - 32}};
  for (const auto budget : {span_budget::global, span_budget::per_span}) {
    INFO("per_span ", budget == span_budget::per_span);
    span_options o;
    o.budget = budget;
    o.policy = keep_policy::fixed(budget == span_budget::global ? 12 : 4);
    o.recycle.fraction = 0.8;
    o.recycle.cluster_divisor = 3.0;
    workspace ws;
    spans_result out;
    for (int rep = 0; rep < 3; ++rep) {
      prune_step_spans_into(a.inputs(), spans, o, ws, out);
      prune_step_spans_into(a.inputs_qk(), spans, o, ws, out);
    }
    REQUIRE(out.recycled.clusters.size() >= 3);  // every span recycled
    g_allocations = 0;
    g_counting = true;
    for (int rep = 0; rep < 5; ++rep) {
      prune_step_spans_into(a.inputs(), spans, o, ws, out);
      prune_step_spans_into(a.inputs_qk(), spans, o, ws, out);
    }
    g_counting = false;
    CHECK(g_allocations.load() == 0);
    // The reused result is the same as a fresh one.
    const spans_result fresh = prune_step_spans(a.inputs_qk(), spans, o);
    check_same_result(out, fresh);
    REQUIRE(out.spans.size() == fresh.spans.size());
    for (std::size_t i = 0; i < out.spans.size(); ++i) {
      CHECK(out.spans[i].keep == fresh.spans[i].keep);
      CHECK(out.spans[i].clusters == fresh.spans[i].clusters);
      CHECK(out.spans[i].first_cluster == fresh.spans[i].first_cluster);
    }
  }
}
