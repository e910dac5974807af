// The main demo: synthesises one LLaVA-1.5-7B-shaped pruning step in memory
// (32 heads, 35 prefix + 576 visual + 60 text tokens, hidden size 4096), prunes it
// with the authors' 192-token preset, and prints what was decided and how long
// each stage took. No files needed.
#include <cstdio>
#include <thread>
#include <vector>

#include <sparsevlm/sparsevlm.hpp>

#include "stage_timer.hpp"
#include "synthetic.hpp"

using namespace sparsevlm;
using examples::synthesise;
using examples::synthetic_step;


int main() {
  const synthetic_step s = synthesise(2410);
  const index_t L = s.length();
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
