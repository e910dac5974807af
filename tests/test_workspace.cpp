// workspace.hpp: the size query, reserve(), and no allocation once sized.
#include <atomic>
#include <cstdlib>
#include <new>

#include "test_util.hpp"

// Counts every global operator new in this binary while `g_counting` is set
// (the tests run on one thread, so a plain flag is enough).
namespace {
std::atomic<bool> g_counting{false};
std::atomic<long> g_allocations{0};
}  // namespace

void* operator new(std::size_t n) {
  if (g_counting.load(std::memory_order_relaxed)) g_allocations.fetch_add(1);
  if (void* p = std::malloc(n ? n : 1)) return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t n) { return operator new(n); }
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }

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

/// Each buffer's capacity, in order.
std::vector<std::size_t> capacities(const workspace& ws) {
  return {ws.f32_a.capacity(), ws.f32_b.capacity(), ws.f32_c.capacity(), ws.f32_d.capacity(),
          ws.f32_e.capacity(), ws.f32_f.capacity(), ws.f64_a.capacity(), ws.f64_b.capacity(),
          ws.f64_c.capacity(), ws.f64_d.capacity(), ws.f64_e.capacity(), ws.idx_a.capacity(),
          ws.idx_b.capacity(), ws.idx_c.capacity(), ws.idx_d.capacity(), ws.idx_e.capacity()};
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
    const step_shape sh = t.shape(o.recycle.fraction);
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

TEST_CASE("workspace: no allocation once sized, for a fixed budget, in both input forms") {
  std::mt19937 g(32);
  const toy a(g, 48, 10, 3, 24), b(g, 48, 10, 3, 24);  // one shape, two data sets
  step_options o;
  o.policy = keep_policy::fixed(20);
  workspace ws;
  ws.reserve(a.shape(o.recycle.fraction));
  step_result out;
  // Two warm-up steps: the first swaps ws.result's vectors into `out`, the
  // second gives ws.result the caller's old ones.
  prune_step_into(a.inputs(), o, ws, out);
  prune_step_into(b.inputs_qk(), o, ws, out);
  const step_result first = out;
  g_allocations = 0;
  g_counting = true;
  for (int rep = 0; rep < 3; ++rep) {
    prune_step_into(a.inputs(), o, ws, out);
    prune_step_into(b.inputs(), o, ws, out);
    prune_step_into(a.inputs_qk(), o, ws, out);
    prune_step_into(b.inputs_qk(), o, ws, out);
  }
  g_counting = false;
  CHECK(g_allocations.load() == 0);
  CHECK(out.keep_count == 20);
  CHECK_FALSE(out.recycled.clusters.empty());
  // And the reused result is the same as a fresh one.
  prune_step_into(a.inputs(), o, ws, out);
  const step_result fresh = prune_step(a.inputs(), o);
  CHECK(out.keep == fresh.keep);
  CHECK(out.recycled.clusters == fresh.recycled.clusters);
  CHECK(out.recycled.merged == fresh.recycled.merged);
  CHECK(out.sequence == fresh.sequence);
  CHECK(out.scores == fresh.scores);
  (void)first;
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
