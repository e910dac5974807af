// The main demo: synthesises one LLaVA-1.5-7B-shaped pruning step in memory
// (32 heads, 35 prefix + 576 visual + 60 text tokens, hidden size 4096), prunes it
// with the authors' 192-token preset, and prints what was decided and how long
// each stage took. No files needed.
#include <array>
#include <cstdio>
#include <thread>
#include <vector>

#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>
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
  return 0;
}
