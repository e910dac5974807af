// prune_step_async's host-side contract, on any machine (a GPU is not needed and
// not used): every argument error the host can see is thrown as sparsevlm::error
// naming the argument, before the first CUDA call that would enqueue work. Before
// this contract a stage's check ran after earlier stages were enqueued: without a
// GPU such a call returned the runtime's "no device" instead of the error, with one
// it threw after the device had started the step. No kernel runs here: every case
// is refused by a check that precedes the device pointer queries, so the fake
// device addresses below are never dereferenced.
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include <sparsevlm/cuda/session.cuh>
#include <sparsevlm/cuda/step.cuh>

namespace {

namespace sv = sparsevlm;
namespace cu = sparsevlm::cuda;
using sv::index_t;

int failures = 0, checks = 0;

/// Expects `f` to throw sparsevlm::error whose message contains `arg`.
template <class F>
void expect_refused(const char* what, const std::string& arg, F&& f) {
  ++checks;
  try {
    f();
    std::printf("FAIL [%s]: not refused\n", what);
    ++failures;
  } catch (const sv::error& e) {
    if (std::string(e.what()).find(arg) == std::string::npos) {
      std::printf("FAIL [%s]: refused as '%s', not naming %s\n", what, e.what(), arg.c_str());
      ++failures;
    }
  }
}

// Fake device addresses, 256-byte aligned: only their extents are read.
template <class T>
const T* fake(std::uintptr_t at) {
  return reinterpret_cast<const T*>(at * 4096);
}

}  // namespace

int main() {
  const index_t L = 671, S = 35, N = 576, H = 32, d = 64, dh = 16;
  const sv::matrix_view<const float> embeds(fake<float>(1), {L, d}, "embeds");
  const sv::matrix_view<const float> hidden(fake<float>(2), {L, d}, "hidden");
  const sv::tensor3_view<const float> q(fake<float>(3), {H, L, dh}, "q");
  void* ws = reinterpret_cast<void*>(std::uintptr_t{1} << 32);
  const sv::step_options opt;
  cu::device_step step;

  // The q/k form: the heads and LSE are checked with the raters' stage, after the
  // step has begun, in the launchers; prune_step_async checks them first.
  const auto qk_step = [&](const sv::qk_view<float, float>& qk) {
    const sv::step_inputs_qk<float, float, float, float> in{embeds, qk, hidden,
                                                            sv::visual_span{S, N}, std::nullopt};
    std::size_t bytes = 0;
    (void)cu::prune_step_async(in, opt, nullptr, bytes, step, nullptr, nullptr);  // size query
    (void)cu::prune_step_async(in, opt, ws, bytes, step, nullptr, nullptr);
  };
  expect_refused("kv heads not dividing the heads", "k.extent[0]", [&] {
    qk_step({q, sv::tensor3_view<const float>(fake<float>(4), {5, L, dh}, "k"), std::nullopt, 0.0});
  });
  expect_refused("lse of the wrong extent", "lse", [&] {
    qk_step({q, sv::tensor3_view<const float>(fake<float>(4), {H, L, dh}, "k"),
             sv::matrix_view<const float>(fake<float>(5), {H, L - 1}, "lse"), 0.0});
  });
  expect_refused("a negative scale", "scale", [&] {
    qk_step({q, sv::tensor3_view<const float>(fake<float>(4), {H, L, dh}, "k"), std::nullopt, -1.0});
  });

  // Caller raters: more than the text tokens after the span.
  expect_refused("more raters than text tokens", "raters.size()", [&] {
    const std::vector<index_t> many(static_cast<std::size_t>(L - S - N + 1), L - 1);
    const sv::step_inputs<float, float, float> in{
        embeds, sv::tensor3_view<const float>(fake<float>(6), {H, L, L}, "attn"), hidden,
        sv::visual_span{S, N}, std::span<const index_t>(fake<index_t>(7), many.size())};
    std::size_t bytes = 0;
    (void)cu::prune_step_async(in, opt, nullptr, bytes, step, nullptr, nullptr);
    (void)cu::prune_step_async(in, opt, ws, bytes, step, nullptr, nullptr);
  });

  // The attention's extents, the workspace and the options.
  const auto attn_step = [&](const sv::tensor3_view<const float>& attn, const sv::step_options& o,
                             std::size_t bytes_given) {
    const sv::step_inputs<float, float, float> in{embeds, attn, hidden, sv::visual_span{S, N},
                                                  std::nullopt};
    std::size_t bytes = bytes_given;
    (void)cu::prune_step_async(in, o, ws, bytes, step, nullptr, nullptr);
  };
  const sv::tensor3_view<const float> attn(fake<float>(6), {H, L, L}, "attn");
  expect_refused("non-square attention", "attn", [&] {
    attn_step(sv::tensor3_view<const float>(fake<float>(6), {H, L, L - 1}, "attn"), opt, 1 << 30);
  });
  expect_refused("a workspace too small", "workspace bytes", [&] { attn_step(attn, opt, 1024); });
  sv::step_options top = opt;
  top.scoring.top_heads = 8;
  expect_refused("top_heads on the GPU", "scoring.top_heads", [&] { attn_step(attn, top, 1 << 30); });
  sv::step_options bad = opt;
  bad.policy = sv::keep_policy::fixed(-3);
  expect_refused("a bad keep policy", "policy", [&] { attn_step(attn, bad, 1 << 30); });

  // The launch plan refuses what prune_step_async refuses, with the same names.
  sv::step_shape shape;
  shape.length = L;
  shape.visual = N;
  shape.heads = H;
  shape.embed_dim = d;
  shape.hidden_dim = d;
  shape.recycle_fraction = 0.3;
  expect_refused("plan: a span outside the step", "visual", [&] {
    (void)cu::plan_step(shape, L, sv::visual_span{S, L}, opt);
  });

  // cuda::prune_layer (a session on device tensors): the layer, the spans and the
  // extents are refused before any CUDA call, and the size query is the step's
  // plus the raters' slot, computed without a device.
  {
    sv::session_config cfg;
    cfg.layers = 4;
    cfg.schedule = {{1, opt}, {2, opt}};
    const std::vector<index_t> raters{S + N + 3, S + N + 10, L - 1};
    const sv::tensor3_view<const float> at(fake<float>(6), {H, L, L}, "attn");
    sv::prefill_session s(sv::prefill_layout::from_counts(S, N, L - S - N), raters, cfg);
    cu::device_step st;
    sv::layer_plan plan;
    std::size_t bytes = 0;
    ++checks;
    if (cu::prune_layer(s, 1, at, hidden, nullptr, bytes, st, plan, nullptr) != cudaSuccess) {
      std::printf("FAIL [session size query]: not cudaSuccess\n");
      ++failures;
    }
    std::size_t step_bytes = 0;
    const sv::step_inputs<float, float, float> in{
        sv::matrix_view<const float>(), at, hidden, sv::visual_span{S, N},
        std::span<const index_t>(fake<index_t>(7), raters.size())};
    (void)cu::prune_step_async(in, opt, nullptr, step_bytes, st, nullptr, nullptr);
    ++checks;
    if (bytes != step_bytes + 256) {
      std::printf("FAIL [session size query]: %zu bytes, expected the step's %zu + 256\n", bytes,
                  step_bytes);
      ++failures;
    }
    expect_refused("session: not the next pruning layer", "layer", [&] {
      (void)cu::prune_layer(s, 2, at, hidden, nullptr, bytes, st, plan, nullptr);
    });
    expect_refused("session: hidden of another length", "hidden.extent[0]", [&] {
      (void)cu::prune_layer(s, 1, at,
                            sv::matrix_view<const float>(fake<float>(2), {L - 1, d}, "hidden"),
                            nullptr, bytes, st, plan, nullptr);
    });
    expect_refused("session: attention of another length", "attn", [&] {
      (void)cu::prune_layer(s, 1,
                            sv::tensor3_view<const float>(fake<float>(6), {H, L - 1, L - 1}, "attn"),
                            hidden, nullptr, bytes, st, plan, nullptr);
    });
    expect_refused("session: a workspace smaller than the query", "workspace bytes", [&] {
      std::size_t small = bytes - 256;
      (void)cu::prune_layer(s, 1, at, hidden, ws, small, st, plan, nullptr);
    });
    // q/k: q holds all n rows or the session's R rater rows, as prefill_session::prune
    // checks (the step alone would accept any count up to the text tokens).
    const auto qk_rows = [&](index_t rows) {
      return sv::qk_view<float, float>{sv::tensor3_view<const float>(fake<float>(3), {H, rows, dh}, "q"),
                                       sv::tensor3_view<const float>(fake<float>(4), {H, L, dh}, "k"),
                                       std::nullopt, 0.0};
    };
    expect_refused("session: q of neither n nor R rows", "q.extent[1]", [&] {
      (void)cu::prune_layer(s, 1, qk_rows(5), hidden, nullptr, bytes, st, plan, nullptr);
    });
    ++checks;
    std::size_t qk_bytes = 0;
    if (cu::prune_layer(s, 1, qk_rows(3), hidden, nullptr, qk_bytes, st, plan, nullptr) !=
            cudaSuccess ||
        qk_bytes == 0) {
      std::printf("FAIL [session q/k size query]: q of the R rater rows refused\n");
      ++failures;
    }
    ++checks;
    if (s.length() != L || s.steps_done() != 0) {
      std::printf("FAIL [session]: a refused layer changed the session\n");
      ++failures;
    }
    // Two images: the GPU step takes one span.
    const sv::prefill_layout two = sv::prefill_layout::from_counts(S, std::vector<index_t>{288, 288}, L - S - N);
    sv::prefill_session s2(two, raters, cfg);
    expect_refused("session: two spans", "spans", [&] {
      (void)cu::prune_layer(s2, 1, at, hidden, nullptr, bytes, st, plan, nullptr);
    });
  }

  // prune_batch_async checks every step before it enqueues the first: a bad
  // second step is refused, naming it, before any CUDA call (without a GPU the
  // first step's pointer queries would otherwise have returned "no device").
  {
    const sv::tensor3_view<const float> at(fake<float>(6), {H, L, L}, "attn");
    const std::vector<sv::step_inputs<float, float, float>> batch{
        {embeds, at, hidden, sv::visual_span{S, N}, std::nullopt},
        {embeds, at, hidden, sv::visual_span{S, N + 61}, std::nullopt}};
    std::vector<cu::device_step> outs(2);
    const std::vector<sv::step_options> opts{opt};
    std::size_t bytes = std::size_t{1} << 30;
    expect_refused("batch: the second step's span", "steps[1]: visual", [&] {
      (void)cu::prune_batch_async(std::span<const sv::step_inputs<float, float, float>>(batch),
                                  std::span<const sv::step_options>(opts), ws, bytes,
                                  std::span<cu::device_step>(outs), nullptr, nullptr);
    });
    const std::vector<sv::step_inputs<float, float, float>> batch2{
        {embeds, at, hidden, sv::visual_span{S, N}, std::nullopt},
        {embeds, sv::tensor3_view<const float>(fake<float>(6), {H, L, L - 1}, "attn"), hidden,
         sv::visual_span{S, N}, std::nullopt}};
    expect_refused("batch: the second step's attention", "steps[1]: attn", [&] {
      (void)cu::prune_batch_async(std::span<const sv::step_inputs<float, float, float>>(batch2),
                                  std::span<const sv::step_options>(opts), ws, bytes,
                                  std::span<cu::device_step>(outs), nullptr, nullptr);
    });
  }

  std::printf("%d checks, %d failed\n", checks, failures);
  return failures == 0 ? 0 : 1;
}
