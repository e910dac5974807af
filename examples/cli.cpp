// sparsevlm: run, check and time spec cases (shared/spec/case-format.md).
//
//   sparsevlm run CASE_DIR OUT_DIR     write OUT_DIR/result.json (+ merged.npy)
//   sparsevlm check CASE_DIR           compare with CASE_DIR/expected/
//   sparsevlm bench CASE_DIR [--repeat N] [--calls]
//                                      median in-memory time per stage, JSON
//                                      (--calls: of each public call alone)
//   sparsevlm plan --model NAME --preset NAME --text T [--visual N] [--prefix P]
//                  [--layers --heads --hidden --mlp] [--derive]
//                                      token counts and FLOPs of a preset, JSON
//   sparsevlm show CASE_DIR --grid ROWSxCOLS --out PNG [--cell PX]
//                                      picture of what the step kept, recycled, dropped
//                                      (over CASE_DIR/image.png when there is one)
//   --scores-from qk (run, check, bench, show): score from the case's q.npy/k.npy instead
//   of attn.npy, the path of fused-attention engines.
//
// Exit codes: 0 success / agreement, 1 disagreement, 2 bad input (one line on
// stderr saying why).
#include <CLI/CLI.hpp>
#include <array>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>
#include <sparsevlm/budget.hpp>
#include <sparsevlm/cuda/launch_plan.hpp>
#include <sparsevlm/io/case.hpp>
#include <sparsevlm/io/picture.hpp>

#include "stage_timer.hpp"

namespace {

using namespace sparsevlm;

int cmd_run(const std::string& case_dir, const std::string& out_dir, io::scores_source from) {
  workspace ws;
  const io::case_data c = io::load_case(case_dir);
  const step_result r = io::run_case(c, ws, from);
  io::write_result(r, out_dir);
  return 0;
}

int cmd_check(const std::string& case_dir, io::scores_source from) {
  workspace ws;
  const io::case_data c = io::load_case(case_dir);
  const io::expected_result e = io::read_expected(std::filesystem::path(case_dir) / "expected");
  const step_result r = io::run_case(c, ws, from);
  const auto diffs = io::compare(r, e);
  if (diffs.empty()) {
    std::cout << c.name << ": agree\n";
    return 0;
  }
  std::cout << c.name << ": DISAGREE\n";
  for (const auto& d : diffs) std::cout << "  " << d << "\n";
  return 1;
}

int cmd_bench(const std::string& case_dir, int repeat, io::scores_source from, bool calls) {
  const io::case_data c = io::load_case(case_dir);
  step_result first;
  {
    workspace ws;
    first = io::run_case(c, ws, from);  // validates the inputs once, before timing
  }
  // One JSON document on one line: the medians of each public call alone (--calls,
  // examples::time_calls) or of each stage inside the step (examples::time_stages),
  // and for the stages the bandwidth they reach.
  const auto med = io::visit_case(
      c,
      [&](const auto& in) {
        return calls ? examples::time_calls(in, c.options, repeat)
                     : examples::time_stages(in, c.options, repeat);
      },
      from);
  nlohmann::ordered_json j;
  j["case"] = c.name;
  j["repeat"] = repeat;
  j["threads"] = 1;
  j["scores_from"] = from == io::scores_source::qk ? "qk" : "attn";
  j["isa"] = cpu::isa_name(cpu::active_isa());
  j["median_ms"] = nlohmann::ordered_json::object();
  const auto names =
      calls ? std::vector<const char*>{"prune_step", "select_raters", "session_prune", "apply_plan"}
            : std::vector<const char*>{"total", "raters", "scores", "rank", "keep", "recycle", "plan"};
  for (const char* name : names) j["median_ms"][name] = med.at(name);
  if (calls) {
    std::cout << j.dump() << "\n";
    return 0;
  }

  // The median total against the memory bandwidth of this core: the bytes the
  // step must touch (examples::step_traffic) over a memcpy probe run here.
  const examples::step_traffic b = io::visit_case(
      c, [&](const auto& in) { return examples::traffic(in, first); }, from);
  const double seconds = med.at("total") * 1e-3;
  const double probe = examples::copy_bandwidth().wall;
  nlohmann::ordered_json& w = j["bandwidth"];
  w["bytes"] = b.total();
  w["bytes_by_stage"] = {{"raters", b.raters}, {"scores", b.scores}, {"recycle", b.recycle},
                         {"plan", b.compaction}};
  w["achieved_GB_per_s"] = static_cast<double>(b.total()) / seconds * 1e-9;
  w["copy_probe_GB_per_s"] = probe * 1e-9;  // memcpy of 256 MB, read + written, best of 5
  w["x_of_bandwidth_limit"] = seconds / (static_cast<double>(b.total()) / probe);
  std::cout << j.dump() << "\n";
  return 0;
}

/// "24x24" as a grid; anything else is refused with the flag's name.
io::patch_grid parse_grid(const std::string& text) {
  const std::size_t x = text.find_first_of("xX");
  const auto number = [](const std::string& part) -> index_t {
    // Nine digits at most, so that rows·cols cannot overflow.
    if (part.empty() || part.size() > 9 || part.find_first_not_of("0123456789") != part.npos)
      return 0;
    return std::stoll(part);
  };
  io::patch_grid g;
  if (x != std::string::npos) g = {number(text.substr(0, x)), number(text.substr(x + 1))};
  SPARSEVLM_CHECK(g.rows >= 1 && g.cols >= 1, errc::invalid_argument, "--grid",
                  "ROWSxCOLS with positive integers, such as 24x24", "'" + text + "'");
  return g;
}

int cmd_show(const std::string& case_dir, const std::string& grid_text, const std::string& out,
             index_t cell, io::scores_source from) {
  const io::patch_grid grid = parse_grid(grid_text);
  const io::shown_case s = io::show_case(case_dir, grid, out, cell, from, "--grid");
  const io::picture_counts& n = s.counts;
  std::cout << s.name << ": "
            << n.kept + n.recycled + n.dropped << " visual tokens on " << grid.rows << "x"
            << grid.cols << ": kept " << n.kept << ", recycled " << n.recycled << " into "
            << n.clusters << (n.clusters == 1 ? " cluster" : " clusters") << ", dropped "
            << n.dropped << "; wrote " << out << " (" << s.width << "x" << s.height
            << (s.over_image ? ", over image.png)" : ", plain canvas)") << "\n";
  return 0;
}

/// What `plan` was asked: a model name ("custom" for none), shape overrides, a
/// preset name, the counts.
struct plan_request {
  std::string model = "llava-1.5-7b", preset;
  index_t text = 0;
  std::optional<index_t> visual, prefix, layers, heads, hidden, mlp;
  bool derive = false;
};

int cmd_plan(const plan_request& q) {
  model_shape m;
  if (q.model == "custom") {
    m.name = "custom";
    for (const auto& [flag, v] : {std::pair{"--layers", q.layers}, std::pair{"--heads", q.heads},
                                  std::pair{"--hidden", q.hidden}, std::pair{"--mlp", q.mlp},
                                  std::pair{"--visual", q.visual}}) {
      SPARSEVLM_CHECK(v.has_value(), errc::invalid_argument, flag, "a value with --model custom",
                      "none");
    }
    m.visual = *q.visual;
  } else {
    m = find_model(q.model);
  }
  if (q.layers) m.layers = *q.layers;
  if (q.heads) m.heads = *q.heads;
  if (q.hidden) m.hidden = *q.hidden;
  if (q.mlp) m.mlp = *q.mlp;
  preset p = find_preset(q.preset);
  if (q.derive) {  // to the shape planned for, --visual included
    model_shape to = m;
    if (q.visual) to.visual = *q.visual;
    p = derive_schedule(p, find_model(p.model), to);
  }
  const budget_plan b = plan_budget(m, p, q.text, q.visual, q.prefix);

  nlohmann::ordered_json j;
  j["model"] = {{"name", m.name},     {"layers", m.layers}, {"heads", m.heads},
                {"hidden", m.hidden}, {"mlp", m.mlp},       {"prefix", b.prefix},
                {"visual", b.visual}};
  const step_options o = step_options_at(p, 0, m);
  j["preset"] = {{"name", p.name},
                 {"source", p.source},
                 {"recycle", p.recycle.enabled},
                 {"top_heads", o.scoring.top_heads},
                 {"gravity", p.gravity},
                 {"positions", p.position_ids == position_policy::renumber ? "renumber"
                                                                            : "keep_original"}};
  j["text_tokens"] = b.text;
  j["exact"] = b.exact;
  j["visual_tokens_per_layer"] = b.visual_tokens_per_layer;
  j["visual_tokens_out_per_layer"] = b.visual_tokens_out_per_layer;
  j["equivalent_tokens"] = b.equivalent_tokens;
  j["authors_equivalent_tokens"] = b.authors_equivalent_tokens;
  j["flops"] = {{"dense", b.flops.dense},
                {"pruned", b.flops.pruned},
                {"ratio", b.flops.pruned / b.flops.dense}};
  j["pruning_layers"] = nlohmann::ordered_json::array();
  for (const pruning_count& c : b.pruning)
    j["pruning_layers"].push_back({{"layer", c.layer},
                                   {"visual_in", c.visual_in},
                                   {"keep", c.keep},
                                   {"recycled", c.recycled},
                                   {"visual_out", c.visual_out}});
  std::cout << j.dump() << "\n";
  return 0;
}

/// What `cuda-plan` was asked for.
struct cuda_plan_request {
  std::string model = "llava-1.5-7b";
  index_t text = 60;
  std::optional<index_t> visual;
  std::string dtype = "f32";
  std::string scores_from = "attn";
  std::string arch = "sm_90";
  bool given_raters = false;
  bool no_recycle = false;
  bool separate = false;  ///< one launch per kernel (cuda::set_chained_launches(false))
};

/// The launches prune_step_async makes for a model's step, without a GPU
/// (cuda/launch_plan.hpp's plan_step): one JSON document on stdout.
int cmd_cuda_plan(const cuda_plan_request& q) {
  const model_shape& m = find_model(q.model);
  SPARSEVLM_CHECK(q.text >= 0, errc::invalid_argument, "--text", ">= 0", q.text);
  const index_t N = q.visual ? *q.visual : m.visual;
  SPARSEVLM_CHECK(N >= 1, errc::invalid_argument, "--visual", ">= 1", N);
  const cuda::device_limits lim = q.arch == "sm_80" ? cuda::device_limits::sm80()
                                                    : cuda::device_limits::sm90();
  step_options opt;
  opt.recycle.enabled = !q.no_recycle;
  step_shape shape;
  shape.length = m.prefix + N + q.text;
  shape.visual = N;
  shape.heads = m.heads;
  shape.embed_dim = q.given_raters ? 0 : m.hidden;
  shape.hidden_dim = m.hidden;
  shape.head_dim = q.scores_from == "qk" ? m.hidden / m.heads : 0;
  shape.recycle_fraction = opt.recycle.enabled ? opt.recycle.fraction : 0.0;
  shape.cluster_divisor = opt.recycle.cluster_divisor;
  cuda::step_form form;
  form.given_raters = q.given_raters;
  form.qk = q.scores_from == "qk";
  cuda::set_chained_launches(!q.separate);
  const cuda::launch_plan plan =
      cuda::plan_step(shape, shape.length, visual_span{m.prefix, N}, opt, form,
                      lim.max_shared_optin);
  nlohmann::ordered_json j;
  j["model"] = m.name;
  j["length"] = shape.length;
  j["visual"] = {{"start", m.prefix}, {"len", N}};
  j["dtype"] = q.dtype;  // the kernels' grids do not depend on it
  j["text"] = q.text;
  j["heads"] = m.heads;
  j["hidden"] = m.hidden;
  j["scores_from"] = q.scores_from;
  j["raters"] = q.given_raters ? "given" : "embeds";
  j["recycle"] = opt.recycle.enabled;
  j["arch"] = lim.name;
  j["chained"] = !q.separate;
  j["kernels"] = nlohmann::ordered_json::array();
  for (const cuda::kernel_launch& k : plan.kernels) {
    nlohmann::ordered_json one = {{"name", k.name},
                                  {"grid", k.grid},
                                  {"block", k.block},
                                  {"smem_bytes", k.smem_bytes},
                                  {"param_bytes", k.param_bytes}};
    // A chained launch: its kernels in order, each with the grid it runs over.
    if (!k.phases.empty()) {
      one["phases"] = nlohmann::ordered_json::array();
      for (const cuda::kernel_phase& ph : k.phases)
        one["phases"].push_back(
            {{"name", ph.name}, {"grid", ph.grid}, {"smem_bytes", ph.smem_bytes}});
    }
    j["kernels"].push_back(std::move(one));
  }
  j["host_syncs"] = plan.host_syncs;
  j["copies"] = plan.copies;
  j["workspace_bytes"] = plan.workspace_bytes;
  j["recycled_max"] = plan.recycled_max;
  j["clusters_max"] = plan.clusters_max;
  const std::string bad = plan.violation(lim);
  j["within_limits"] = bad.empty();
  if (!bad.empty()) j["violation"] = bad;
  std::cout << j.dump() << "\n";
  return bad.empty() ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"sparsevlm: one SparseVLM pruning step on spec case folders"};
  app.require_subcommand(1);
  std::string case_dir, out_dir;
  int repeat = 20;
  auto* run = app.add_subcommand("run", "run CASE_DIR, write OUT_DIR/result.json (+ merged.npy)");
  run->add_option("CASE_DIR", case_dir, "case folder")->required();
  run->add_option("OUT_DIR", out_dir, "output folder (created)")->required();
  auto* check = app.add_subcommand("check", "run CASE_DIR and compare with CASE_DIR/expected/");
  check->add_option("CASE_DIR", case_dir, "case folder")->required();
  auto* bench = app.add_subcommand("bench", "median in-memory time of the step and each stage");
  bench->add_option("CASE_DIR", case_dir, "case folder")->required();
  bench->add_option("--repeat", repeat, "timed repetitions")->check(CLI::Range(1, 1000000));
  bool calls = false;
  bench->add_flag("--calls", calls,
                  "time each public call alone instead (prune_step, select_raters, "
                  "session prune, apply_plan): one JSON line");
  std::string grid, out_png;
  index_t cell = 16;
  auto* show = app.add_subcommand(
      "show", "picture of the patches the step kept, recycled (a colour a cluster) and dropped");
  show->add_option("CASE_DIR", case_dir, "case folder (drawn over its image.png when present)")
      ->required();
  show->add_option("--grid", grid, "ROWSxCOLS patch grid of the visual tokens, row-major (24x24)")
      ->required();
  show->add_option("--out", out_png, "PNG file to write")->required();
  show->add_option("--cell", cell, "pixels a patch on the plain canvas (no image.png)")
      ->check(CLI::Range(1, 4096));
  std::string scores_from = "attn";
  for (auto* sub : {run, check, bench, show})
    sub->add_option("--scores-from", scores_from,
                    "attn: the case's attention matrix; qk: its q.npy/k.npy (fused-attention path)")
        ->check(CLI::IsMember({"attn", "qk"}));
  plan_request pq;
  std::array<index_t, 6> shape_flags{};  // --visual --prefix --layers --heads --hidden --mlp
  auto* plan = app.add_subcommand("plan", "token counts and FLOPs of a preset on a model, JSON");
  plan->add_option("--model", pq.model, "built-in model, or custom (give every shape flag)");
  plan->add_option("--preset", pq.preset, "preset name (v1-192, v1.5-128, plus-64, video, ...)")
      ->required();
  plan->add_option("--text", pq.text, "text tokens (the question)")->required();
  const std::array<CLI::Option*, 6> shape_opts{
      plan->add_option("--visual", shape_flags[0], "visual tokens N (overrides)"),
      plan->add_option("--prefix", shape_flags[1], "tokens before the image (overrides)"),
      plan->add_option("--layers", shape_flags[2], "decoder layers (overrides)"),
      plan->add_option("--heads", shape_flags[3], "attention heads (overrides)"),
      plan->add_option("--hidden", shape_flags[4], "hidden size d (overrides)"),
      plan->add_option("--mlp", shape_flags[5], "MLP intermediate size m (overrides)")};
  plan->add_flag("--derive", pq.derive,
                 "carry the schedule over from the preset's own model (docs/presets.md)");
  cuda_plan_request cq;
  auto* cplan = app.add_subcommand(
      "cuda-plan", "the kernels a CUDA step launches for a model (grids, shared memory), JSON; "
                   "no GPU needed");
  cplan->add_option("--model", cq.model, "built-in model (llava-1.5-7b, llava-next-7b, ...)");
  cplan->add_option("--text", cq.text, "text tokens after the image (default 60)")
      ->check(CLI::Range(index_t{0}, index_t{1} << 40));
  cplan->add_option("--visual", cq.visual, "visual tokens N (overrides the model's)");
  cplan->add_option("--dtype", cq.dtype, "element type of the inputs")
      ->check(CLI::IsMember({"f32", "f16", "bf16"}));
  cplan->add_option("--scores-from", cq.scores_from, "attn: attention probabilities; qk: q/k")
      ->check(CLI::IsMember({"attn", "qk"}));
  cplan->add_option("--arch", cq.arch, "device limits to check against")
      ->check(CLI::IsMember({"sm_80", "sm_90"}));
  cplan->add_flag("--given-raters", cq.given_raters, "the caller gives the raters");
  cplan->add_flag("--no-recycle", cq.no_recycle, "without recycling");
  cplan->add_flag("--separate-launches", cq.separate,
                  "one launch per kernel instead of chained launches "
                  "(cuda::set_chained_launches(false))");

  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::cerr << "sparsevlm: " << e.what() << "\n";
    return 2;
  }
  try {
    const auto from = scores_from == "qk" ? io::scores_source::qk : io::scores_source::attn;
    if (*plan) {
      std::optional<index_t>* const fields[] = {&pq.visual, &pq.prefix, &pq.layers,
                                                &pq.heads,  &pq.hidden, &pq.mlp};
      for (std::size_t i = 0; i < shape_opts.size(); ++i)
        if (shape_opts[i]->count() > 0) *fields[i] = shape_flags[i];
      return cmd_plan(pq);
    }
    if (*cplan) return cmd_cuda_plan(cq);
    if (*run) return cmd_run(case_dir, out_dir, from);
    if (*check) return cmd_check(case_dir, from);
    if (*show) return cmd_show(case_dir, grid, out_png, cell, from);
    return cmd_bench(case_dir, repeat, from, calls);
  } catch (const sparsevlm::error& e) {
    std::cerr << "sparsevlm: " << e.what() << "\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "sparsevlm: " << e.what() << "\n";
    return 2;
  }
}
