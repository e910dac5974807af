// The main demo: synthesises one LLaVA-1.5-7B-shaped pruning step in memory
// (32 heads, 35 prefix + 576 visual + 60 text tokens, hidden size 4096), prunes it
// with the authors' 192-token preset, and prints what was decided and how long
// each stage took; then what the whole prefill costs with that preset and with
// v1.5-192 (plan_budget: visual tokens per layer, equivalent tokens, FLOPs);
// then runs a short multi-layer prefill with prefill_session on a toy model, once
// with one image and once with two (per-span budgets), and prints the tokens per
// layer. No files needed.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <string>
#include <random>
#include <thread>
#include <vector>

#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>
#include <sparsevlm/budget.hpp>
#include <sparsevlm/io/npy.hpp>
#include <sparsevlm/sparsevlm.hpp>

#include "stage_timer.hpp"
#include "synthetic.hpp"

using namespace sparsevlm;
using examples::synthesise;
using examples::synthetic_step;


namespace {

/// Writes the synthetic step as a spec case folder, so that `sparsevlm bench` and
/// `sparsevlm run` can be pointed at the same LLaVA-shaped step.
void write_case(const synthetic_step& s, const std::filesystem::path& dir) {
  std::filesystem::create_directories(dir);
  const index_t L = s.length();
  const std::array<index_t, 2> ld{L, s.dim};
  const std::array<index_t, 3> hll{s.heads, L, L};
  io::write_npy(dir / "embeds.npy", s.embeds.data(), ld);
  io::write_npy(dir / "hidden.npy", s.hidden.data(), ld);
  io::write_npy(dir / "attn.npy", s.attn.data(), hll);
  const nlohmann::ordered_json j = {
      {"format", "sparsevlm-case/1"},
      {"visual", {{"start", s.prefix}, {"len", s.n_visual}}},
      {"embeds", "embeds.npy"},
      {"attn", "attn.npy"},
      {"hidden", "hidden.npy"},
      {"policy", {{"kind", "rank"}, {"scale", 13.5}, {"bias", 0}}},
      {"recycle", {{"enabled", true}, {"fraction", 0.3}, {"cluster_divisor", 10}}}};
  std::ofstream(dir / "case.json") << j.dump(1) << "\n";
}

/// "576 x3, 301 x4, …": each run of equal counts, with its length.
std::string runs(const std::vector<index_t>& v) {
  std::string out;
  for (std::size_t i = 0; i < v.size();) {
    std::size_t j = i;
    while (j < v.size() && v[j] == v[i]) ++j;
    out += (out.empty() ? "" : ", ") + std::to_string(v[i]) + " x" + std::to_string(j - i);
    i = j;
  }
  return out;
}

/// What preset `name` costs on LLaVA-1.5-7B with `text` text tokens, before the
/// forward (plan_budget): the visual tokens entering each of the 32 layers,
/// the equivalent tokens, and the prefill FLOPs of the decoder layers.
void print_plan(const char* name, index_t text) {
  const model_shape& m = find_model("llava-1.5-7b");
  const budget_plan b = plan_budget(m, find_preset(name), text);
  std::printf("plan %s on %s (prefix %lld, visual %lld, text %lld)%s:\n", name, m.name.c_str(),
              static_cast<long long>(b.prefix), static_cast<long long>(b.visual),
              static_cast<long long>(b.text),
              b.exact ? ", exact" : ", upper bounds (the keep follows the rank found in the forward)");
  std::printf("  visual tokens entering each layer: %s\n", runs(b.visual_tokens_per_layer).c_str());
  std::printf("  equivalent tokens: %.2f (authors' count: %.2f)\n", b.equivalent_tokens,
              b.authors_equivalent_tokens);
  std::printf("  prefill FLOPs: dense %.2f T, pruned %.2f T (%.3f of dense)\n", b.flops.dense * 1e-12,
              b.flops.pruned * 1e-12, b.flops.pruned / b.flops.dense);
}

/// A short multi-layer prefill with prefill_session on a toy 6-layer decoder
/// (d = 32, 4 heads) over `layout`: each layer's causal attention is recomputed
/// from the compacted hidden states, and the session prunes after layers 1 and
/// 3 (fixed 24 then 12 kept over all spans, split by `budget`, recycling on).
void session_demo(const char* title, const prefill_layout& layout, span_budget budget) {
  constexpr index_t d = 32, heads = 4, dh = d / heads;
  constexpr index_t layers = 6;
  std::mt19937 g(2410);
  std::uniform_real_distribution<float> u(-0.5f, 0.5f);
  std::vector<float> wq(static_cast<std::size_t>(layers * d * d)), wk(wq.size());
  for (float& w : wq) w = u(g);
  for (float& w : wk) w = u(g);
  std::vector<float> x(static_cast<std::size_t>(layout.length * d));
  for (float& v : x) v = 2.0f * u(g);

  session_config cfg;
  cfg.layers = layers;
  cfg.budget = budget;
  step_options keep24, keep12;
  keep24.policy = keep_policy::fixed(24);
  keep12.policy = keep_policy::fixed(12);
  cfg.schedule = {{1, keep24}, {3, keep12}};
  workspace ws;
  prefill_session session(layout, matrix_view<const float>(x.data(), {layout.length, d}), cfg, ws);
  const auto spans_text = [&] {
    std::string t;
    for (const visual_span& v : session.spans())
      t += (t.empty() ? "" : " + ") + std::to_string(v.len);
    return t;
  };
  std::printf("prefill session on a toy %lld-layer model, %s (%lld tokens, visual %s):\n",
              static_cast<long long>(layers), title, static_cast<long long>(layout.length),
              spans_text().c_str());
  for (index_t l = 0; l < layers; ++l) {
    const index_t n = session.length();
    std::printf("  layer %lld: %lld tokens (%lld visual%s%s)\n", static_cast<long long>(l),
                static_cast<long long>(n), static_cast<long long>(session.visual_tokens()),
                session.spans().size() > 1 ? ": " : "",
                session.spans().size() > 1 ? spans_text().c_str() : "");
    // The toy layer: x += mean over heads of softmax(q kᵀ / sqrt(dh)) x, causal.
    std::vector<float> q(static_cast<std::size_t>(n * d), 0.0f), k(q.size(), 0.0f);
    for (index_t t = 0; t < n; ++t)
      for (index_t c = 0; c < d; ++c)
        for (index_t i = 0; i < d; ++i) {
          const float xv = x[static_cast<std::size_t>(t * d + i)];
          q[static_cast<std::size_t>(t * d + c)] += xv * wq[static_cast<std::size_t>((l * d + i) * d + c)];
          k[static_cast<std::size_t>(t * d + c)] += xv * wk[static_cast<std::size_t>((l * d + i) * d + c)];
        }
    std::vector<float> attn(static_cast<std::size_t>(heads * n * n), 0.0f);
    for (index_t h = 0; h < heads; ++h)
      for (index_t t = 0; t < n; ++t) {
        float* row = &attn[static_cast<std::size_t>((h * n + t) * n)];
        float mx = -1e30f, sum = 0.0f;
        for (index_t s = 0; s <= t; ++s) {
          float dot = 0.0f;
          for (index_t c = 0; c < dh; ++c)
            dot += q[static_cast<std::size_t>(t * d + h * dh + c)] * k[static_cast<std::size_t>(s * d + h * dh + c)];
          row[s] = dot / std::sqrt(static_cast<float>(dh));
          mx = std::max(mx, row[s]);
        }
        for (index_t s = 0; s <= t; ++s) sum += (row[s] = std::exp(row[s] - mx));
        for (index_t s = 0; s <= t; ++s) row[s] /= sum;
      }
    std::vector<float> out(x.begin(), x.begin() + n * d);
    for (index_t t = 0; t < n; ++t)
      for (index_t h = 0; h < heads; ++h)
        for (index_t s = 0; s <= t; ++s) {
          const float a = attn[static_cast<std::size_t>((h * n + t) * n + s)] / static_cast<float>(heads);
          for (index_t c = 0; c < d; ++c)
            out[static_cast<std::size_t>(t * d + c)] += a * x[static_cast<std::size_t>(s * d + c)];
        }
    x = out;
    if (!session.prunes_after(l)) continue;
    const layer_plan plan = session.prune(l, tensor3_view<const float>(attn.data(), {heads, n, n}),
                                          matrix_view<const float>(x.data(), {n, d}), ws);
    const index_t c = static_cast<index_t>(plan.step.recycled.clusters.size());
    apply_plan_inplace(plan.step.sequence, matrix_view<float>(x.data(), {n, d}),
                       matrix_view<const float>(plan.step.recycled.merged.data(), {c, d}));
    x.resize(static_cast<std::size_t>(plan.length * d));
    std::string kept;
    for (const span_part& p : plan.parts)
      kept += (kept.empty() ? "" : " + ") + std::to_string(p.keep_count);
    std::printf("  pruned after layer %lld: kept %lld of %lld visual%s%s%s, %lld recycled -> %lld tokens\n",
                static_cast<long long>(l), static_cast<long long>(plan.step.keep_count),
                static_cast<long long>(plan.step.scores.size()),
                plan.parts.size() > 1 ? " (" : "", plan.parts.size() > 1 ? kept.c_str() : "",
                plan.parts.size() > 1 ? ")" : "", static_cast<long long>(c),
                static_cast<long long>(plan.length));
  }
}

}  // namespace

// Usage: sparsevlm_demo [CASE_DIR]  (with CASE_DIR, also write the step there as a case)
int main(int argc, char** argv) {
  const synthetic_step s = synthesise(2410);
  const index_t L = s.length();
  if (argc > 2) {
    std::fprintf(stderr, "usage: sparsevlm_demo [CASE_DIR]\n");
    return 2;
  }
  if (argc == 2) {
    try {
      write_case(s, argv[1]);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "sparsevlm_demo: %s\n", e.what());
      return 2;
    }
    std::printf("wrote the synthetic step as a case to %s\n", argv[1]);
  }
  step_inputs<float, float, float> in{
      matrix_view<const float>(s.embeds.data(), {L, s.dim}, "embeds"),
      tensor3_view<const float>(s.attn.data(), {s.heads, L, L}, "attn"),
      matrix_view<const float>(s.hidden.data(), {L, s.dim}, "hidden"),
      visual_span{s.prefix, s.n_visual},
      std::nullopt};
  step_options opt;
  opt.policy = keep_policy::rank(13.5, 0.0);  // the authors' 192-token preset
  opt.recycle = recycle_options{true, 0.3, 10.0};

  const step_result r = prune_step(in, opt);
  std::printf("sparsevlm %s demo: LLaVA-1.5-7B-shaped step, H=%lld L=%lld (prefix %lld, visual %lld, "
              "text %lld), d=%lld, policy rank 13.5/0, recycling 0.3/10\n",
              SPARSEVLM_VERSION_STRING, static_cast<long long>(s.heads), static_cast<long long>(L),
              static_cast<long long>(s.prefix), static_cast<long long>(s.n_visual),
              static_cast<long long>(s.n_text), static_cast<long long>(s.dim));
  std::printf("raters (%zu):", r.raters.size());
  for (index_t p : r.raters) std::printf(" %lld", static_cast<long long>(p));
  std::printf("\nrank of P: %lld\nkept visual tokens: %lld of %lld\n", static_cast<long long>(r.rank),
              static_cast<long long>(r.keep_count), static_cast<long long>(s.n_visual));
  std::printf("recycled clusters: %zu\n", r.recycled.clusters.size());
  for (std::size_t i = 0; i < r.recycled.clusters.size(); ++i) {
    std::printf("  cluster %zu (%zu tokens):", i, r.recycled.clusters[i].size());
    for (index_t p : r.recycled.clusters[i]) std::printf(" %lld", static_cast<long long>(p));
    std::printf("\n");
  }
  std::printf("new sequence length: %zu (was %lld)\n", r.sequence.size(), static_cast<long long>(L));

  const auto med = examples::time_stages(in, opt, 5);
  std::printf("median time over 5 runs, 1 thread (%u hardware threads):\n",
              std::thread::hardware_concurrency());
  for (const char* n : {"raters", "scores", "rank", "keep", "recycle", "plan", "total"})
    std::printf("  %-8s %9.3f ms\n", n, med.at(n));
  print_plan("v1-192", s.n_text);  // the policy above, at every pruning layer
  std::printf("  (the step above, one such layer: rank %lld kept %lld of %lld, %zu recycled)\n",
              static_cast<long long>(r.rank), static_cast<long long>(r.keep_count),
              static_cast<long long>(s.n_visual), r.recycled.clusters.size());
  print_plan("v1.5-192", s.n_text);  // its fixed-keep release
  session_demo("one image", prefill_layout::from_counts(3, 48, 8), span_budget::global);
  // Two 24-token images with "Image 2:" (2 tokens) between them.
  session_demo("two images, per-span budget",
               prefill_layout::from_counts(3, std::vector<index_t>{24, 24}, 8, 2),
               span_budget::per_span);
  return 0;
}
