// cuda/launch_plan.hpp: the kernels a device step launches, checked against the
// device limits of sm_80 and sm_90 on the model shapes the CUDA backend serves,
// without a GPU.
#include <doctest/doctest.h>

#include <algorithm>
#include <string>
#include <vector>

#include <sparsevlm/cuda/launch_plan.hpp>

namespace {

using namespace sparsevlm;
namespace pl = sparsevlm::cuda::detail::pipeline;

struct plan_shape {
  const char* name;
  index_t prefix, visual, text, heads, hidden;
};

// LLaVA-1.5-7B/13B (576 visual tokens), LLaVA-NeXT (AnyRes: 2880), video at
// 8 × 576 and 16 × 576 frames; a 35-token system prompt and a 60-token question.
const std::vector<plan_shape> shapes = {
    {"llava-1.5-7b", 35, 576, 60, 32, 4096},   {"llava-1.5-13b", 35, 576, 60, 40, 5120},
    {"llava-next-7b", 35, 2880, 60, 32, 4096}, {"video-4608", 35, 4608, 60, 32, 4096},
    {"video-9216", 35, 9216, 60, 32, 4096},
};

step_shape shape_of(const plan_shape& p, bool given, bool qk, bool recycle) {
  step_shape s;
  s.length = p.prefix + p.visual + p.text;
  s.visual = p.visual;
  s.heads = p.heads;
  s.embed_dim = given ? 0 : p.hidden;
  s.hidden_dim = p.hidden;
  s.head_dim = qk ? p.hidden / p.heads : 0;
  s.recycle_fraction = recycle ? 0.3 : 0.0;
  return s;
}

cuda::launch_plan plan_of(const plan_shape& p, bool given, bool qk, bool recycle,
                          std::size_t max_shared = cuda::device_limits::sm90().max_shared_optin) {
  step_options opt;
  opt.recycle.enabled = recycle;
  const step_shape s = shape_of(p, given, qk, recycle);
  return cuda::plan_step(s, s.length, visual_span{p.prefix, p.visual}, opt,
                         cuda::step_form{given, qk, true}, max_shared);
}

// The phase that runs body `name`, alone or fused with a tail ("keep_ranks+keep_list"),
// and the launch that holds it.
const cuda::kernel_phase* find(const cuda::launch_plan& plan, const std::string& name,
                               const cuda::kernel_launch** in = nullptr) {
  for (const cuda::kernel_launch& k : plan.kernels)
    for (const cuda::kernel_phase& p : k.phases)
      if (("+" + p.name + "+").find("+" + name + "+") != std::string::npos) {
        if (in != nullptr) *in = &k;
        return &p;
      }
  return nullptr;
}

std::vector<std::string> phase_names(const cuda::kernel_launch& k) {
  std::vector<std::string> out;
  for (const auto& p : k.phases) out.push_back(p.name);
  return out;
}

}  // namespace

TEST_CASE("launch plan: every launch fits sm_80 and sm_90 at the served shapes") {
  int plans = 0;
  for (const plan_shape& p : shapes)
    for (int form = 0; form < 8; ++form) {
      const bool given = form & 1, qk = form & 2, recycle = form & 4;
      INFO(p.name, " given ", given, " qk ", qk, " recycle ", recycle);
      for (const cuda::device_limits lim :
           {cuda::device_limits::sm80(), cuda::device_limits::sm90()}) {
        const cuda::launch_plan plan = plan_of(p, given, qk, recycle, lim.max_shared_optin);
        CHECK(plan.violation(lim).empty());
        CHECK(plan.host_syncs == 0);
        CHECK(plan.copies == 1);
        CHECK(plan.workspace_bytes == cuda::step_workspace_bytes(shape_of(p, given, qk, recycle)));
        // The counts reset, the raters and scores, the rest: three launches.
        REQUIRE(plan.kernels.size() == 3);
        CHECK(plan.kernels.front().name == "counts_reset");
        CHECK(plan.kernels.front().phases.empty());
        REQUIRE(!plan.kernels.back().phases.empty());
        CHECK(plan.kernels.back().phases.back().name == "plan_sequence");
        for (std::size_t i = 1; i < plan.kernels.size(); ++i) {
          const cuda::kernel_launch& k = plan.kernels[i];
          CHECK(k.block[0] == 256);
          std::int64_t blocks = 0;
          std::size_t most = 0;
          for (const cuda::kernel_phase& ph : k.phases) {
            CHECK(ph.name != "kernel");
            CHECK(ph.grid[0] >= 1);
            CHECK(ph.grid[1] >= 1);
            blocks += ph.grid[0] * ph.grid[1];
            most = std::max(most, ph.smem_bytes);
          }
          // A chain's blocks are its phases', its shared memory the largest
          // phase's (the ticket's word is reused by the body).
          CHECK(k.grid[0] == blocks);
          CHECK(k.smem_bytes == std::max<std::size_t>(most, 8));
          CHECK(k.phases.size() <= static_cast<std::size_t>(cuda::detail::max_phases));
        }
        // Recycling's kernels run exactly when it is on; raters come from the
        // embeddings exactly when they are not given.
        CHECK((find(plan, "recycle_gram") != nullptr) == recycle);
        CHECK((find(plan, "rater_logits") != nullptr) == !given);
        CHECK((find(plan, "rater_copy") != nullptr) == given);
        CHECK((find(plan, "qk_logits") != nullptr) == qk);
        CHECK((find(plan, "scores_from_attention") != nullptr) == !qk);
        ++plans;
      }
    }
  CHECK(plans == static_cast<int>(shapes.size()) * 16);
}

TEST_CASE("launch plan: a step is three launches, its kernels chained in order") {
  // LLaVA-1.5-7B from the attention: 22 launches, then 17 (tails), now 3.
  const cuda::launch_plan plan = plan_of(shapes[0], false, false, true);
  REQUIRE(plan.kernels.size() == 3);
  CHECK(phase_names(plan.kernels[1]) ==
        std::vector<std::string>{"rater_logits", "rater_row_stats", "rater_column_means+rater_pick",
                                 "scores_from_attention"});
  CHECK(plan.kernels[1].name ==
        "rater_logits|rater_row_stats|rater_column_means+rater_pick|scores_from_attention");
  CHECK(phase_names(plan.kernels[2]) ==
        std::vector<std::string>{"rank_gram", "rank_solve+keep_decide", "keep_ranks+keep_list",
                                 "recycle_gram+recycle_diag", "recycle_distances",
                                 "recycle_density", "recycle_gamma", "recycle_centres",
                                 "recycle_assign+recycle_offsets", "recycle_members",
                                 "recycle_merge", "plan_sequence"});
  // A tail's flag word sits past what either body uses.
  const cuda::kernel_phase* keep = find(plan, "keep_list");
  REQUIRE(keep != nullptr);
  CHECK(keep->smem_bytes == cuda::detail::with_tail_smem(256 * sizeof(float), 256 * sizeof(std::int64_t)));
  CHECK(keep->smem_bytes == 256 * 8 + 8);
  // Caller raters: the copy, then the scores.
  const cuda::launch_plan given = plan_of(shapes[0], true, false, true);
  REQUIRE(given.kernels.size() == 3);
  CHECK(phase_names(given.kernels[1]) ==
        std::vector<std::string>{"rater_copy", "scores_from_attention"});
  // Q/K: the logits and their row statistics before the scores, in the same launch.
  const cuda::launch_plan qk = plan_of(shapes[0], false, true, true);
  REQUIRE(qk.kernels.size() == 3);
  CHECK(phase_names(qk.kernels[1]) ==
        std::vector<std::string>{"rater_logits", "rater_row_stats", "rater_column_means+rater_pick",
                                 "qk_logits", "qk_row_stats", "scores_from_qk"});
  // Without recycling its phases have no blocks and are not listed.
  const cuda::launch_plan plain = plan_of(shapes[0], false, false, false);
  REQUIRE(plain.kernels.size() == 3);
  CHECK(phase_names(plain.kernels[2]) ==
        std::vector<std::string>{"rank_gram", "rank_solve+keep_decide", "keep_ranks+keep_list",
                                 "plan_sequence"});
}

TEST_CASE("launch plan: the rank kernel is bounded by the text after the span, not the prefix") {
  // At LLaVA-1.5 the raters are among the 60 question tokens: G is at most 60 × 60
  // doubles (29 KB) and fits without the opt-in attribute. Bounding it by L − N
  // (95, prefix included) asked for 73,752 bytes.
  const cuda::launch_plan plan = plan_of(shapes[0], false, false, true);
  const cuda::kernel_phase* solve = find(plan, "rank_solve");
  REQUIRE(solve != nullptr);
  CHECK(solve->smem_bytes == pl::rank_shared_bytes(60));
  CHECK(plan.recycled_max == 173);  // min(576, floor(0.3 · 576) + 1)
  CHECK(plan.clusters_max == 18);   // floor(173 / 10) + 1
  CHECK(solve->smem_bytes <= cuda::detail::launch_policy::default_shared);
  CHECK(pl::rank_shared_bytes(95) > cuda::detail::launch_policy::default_shared);
  // With no room for G in shared memory the kernel takes the global-memory path.
  const cuda::launch_plan small = plan_of(shapes[0], false, false, true, 16 * 1024);
  const cuda::kernel_phase* fallback = find(small, "rank_solve");
  REQUIRE(fallback != nullptr);
  CHECK(fallback->smem_bytes == sparsevlm::detail::core::eigen_shared * sizeof(double));
}

TEST_CASE("launch plan: dot tiles shrink to 16x16 where 32x32 would leave most SMs idle") {
  // LLaVA-1.5: 173 recycled rows give 6 x 6 tiles of 32 (36 blocks), so 11 x 11 of 16;
  // LLaVA-NeXT: 865 rows give 28 x 28 of 32, enough blocks as they are.
  const cuda::launch_plan llava = plan_of(shapes[0], false, false, true);
  const cuda::kernel_launch* in = nullptr;
  const cuda::kernel_phase* gram = find(llava, "recycle_gram", &in);
  REQUIRE(gram != nullptr);
  CHECK(gram->grid[0] == 11);
  // 66 tiles on or above the diagonal: each dot product's lanes split over two blocks.
  CHECK(gram->grid[1] == 22);
  CHECK(in->block[0] == 256);  // 16x16 tiles take the chain's 256 threads: a pair each
  CHECK(gram->smem_bytes == cuda::detail::with_tail_smem(cuda::detail::tile_smem<16>, 0));  // + the diagonal's tail
  const cuda::kernel_phase* logits = find(llava, "rater_logits");
  REQUIRE(logits != nullptr);
  CHECK(logits->grid[0] == 36);  // 576 / 16
  CHECK(logits->grid[1] == 4);   // 60 text tokens
  const plan_shape* next = nullptr;
  for (const auto& s : shapes)
    if (s.visual == 2880) next = &s;
  REQUIRE(next != nullptr);
  const cuda::launch_plan big = plan_of(*next, false, false, true);
  const cuda::kernel_phase* gram2 = find(big, "recycle_gram");
  REQUIRE(gram2 != nullptr);
  CHECK(gram2->grid[0] == 28);
  CHECK(gram2->grid[1] == 28);  // 406 tiles: no lane split
  CHECK(gram2->smem_bytes == cuda::detail::with_tail_smem(cuda::detail::tile_smem<32>, 0));
}

TEST_CASE("launch plan: set_chained_launches(false) gives one launch per kernel") {
  const cuda::launch_plan chained = plan_of(shapes[0], false, false, true);
  cuda::set_chained_launches(false);
  const cuda::launch_plan separate = plan_of(shapes[0], false, false, true);
  cuda::set_chained_launches(true);
  CHECK(cuda::chained_launches());
  // The same kernels, grids and shared memory, each launched alone.
  std::vector<std::string> names{"counts_reset"};
  for (std::size_t i = 1; i < chained.kernels.size(); ++i)
    for (const auto& ph : chained.kernels[i].phases) names.push_back(ph.name);
  REQUIRE(separate.kernels.size() == names.size());
  CHECK(separate.kernels.size() == 17);
  std::size_t at = 1;
  for (std::size_t i = 1; i < chained.kernels.size(); ++i)
    for (const auto& ph : chained.kernels[i].phases) {
      const cuda::kernel_launch& k = separate.kernels[at++];
      CHECK(k.name == ph.name);
      CHECK(k.phases.empty());
      CHECK(k.grid == ph.grid);
      CHECK(k.smem_bytes == ph.smem_bytes);
      CHECK(k.block[0] == 256);
    }
  CHECK(separate.violation(cuda::device_limits::sm80()).empty());
}

TEST_CASE("launch plan: a chain needs no more shared memory than its largest phase") {
  // 13,824 visual tokens recycle 4,148 rows: one row of D padded to 8,192 doubles
  // is exactly 64 KiB, a 64 KiB device's whole opt-in; the ticket's word must not
  // push the chain past it.
  const plan_shape big{"video-13824", 35, 13824, 60, 32, 4096};
  const std::size_t limit = 65536;
  const cuda::launch_plan plan = plan_of(big, false, false, true, limit);
  const cuda::kernel_phase* density = find(plan, "recycle_density");
  REQUIRE(density != nullptr);
  CHECK(density->smem_bytes == limit);
  cuda::device_limits lim = cuda::device_limits::sm80();
  lim.max_shared_optin = limit;
  CHECK(plan.violation(lim).empty());
}

TEST_CASE("launch plan: the q/k logits grid keeps its large extent on x") {
  // 64 heads and 40,000 question tokens: 64 · 1250 rater tiles would exceed y's 65,535.
  const plan_shape big{"long", 35, 576, 40000, 64, 8192};
  const cuda::launch_plan plan = plan_of(big, true, true, false);
  const cuda::kernel_phase* logits = find(plan, "qk_logits");
  REQUIRE(logits != nullptr);
  CHECK(logits->grid[0] == 64 * ((40000 + 31) / 32));
  CHECK(logits->grid[1] == (35 + 576 + 40000 + 31) / 32);
  CHECK(plan.violation(cuda::device_limits::sm90()).empty());
}

TEST_CASE("launch plan: violation names the launch and the limit") {
  cuda::launch_plan plan;
  plan.kernels.push_back({"k", {1, 70000, 1}, {256, 1, 1}, 0, {}});
  CHECK(plan.violation(cuda::device_limits::sm90()) == "k: grid y 70000 > 65535 (sm_90)");
  plan.kernels[0] = {"k", {1, 1, 1}, {2048, 1, 1}, 0, {}};
  CHECK(plan.violation(cuda::device_limits::sm80()) == "k: threads 2048 > 1024 (sm_80)");
  plan.kernels[0] = {"k", {1, 1, 1}, {256, 1, 1}, 200000, {}};
  CHECK(plan.violation(cuda::device_limits::sm80()) == "k: shared bytes 200000 > 166912 (sm_80)");
  CHECK(plan.violation(cuda::device_limits::sm90()).empty());
}

TEST_CASE("launch plan: refuses what prune_step_async refuses") {
  const step_shape s = shape_of(shapes[0], false, false, true);
  step_options opt;
  CHECK_THROWS_WITH_AS(cuda::plan_step(s, s.length + 1, visual_span{35, 576}, opt),
                       doctest::Contains("length"), error);
  CHECK_THROWS_WITH_AS(cuda::plan_step(s, s.length, visual_span{35, 700}, opt),
                       doctest::Contains("visual"), error);
  step_shape g = s;
  g.gravity = true;
  CHECK_THROWS_WITH_AS(cuda::plan_step(g, g.length, visual_span{35, 576}, opt),
                       doctest::Contains("shape.gravity"), error);
  step_options big = opt;
  big.recycle.fraction = 0.9;  // more rows than the shape's 0.3 reserved
  CHECK_THROWS_WITH_AS(cuda::plan_step(s, s.length, visual_span{35, 576}, big),
                       doctest::Contains("recycle options"), error);
  CHECK_THROWS_WITH_AS(
      cuda::plan_step(s, s.length, visual_span{35, 576}, opt, cuda::step_form{false, true, true}),
      doctest::Contains("shape.head_dim"), error);
}
