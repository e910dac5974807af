// sparsevlm: run, check and time spec cases (shared/spec/case-format.md).
//
//   sparsevlm run CASE_DIR OUT_DIR     write OUT_DIR/result.json (+ merged.npy)
//   sparsevlm check CASE_DIR           compare with CASE_DIR/expected/
//   sparsevlm bench CASE_DIR [--repeat N]   median in-memory time per stage, JSON
//   --scores-from qk (any command): score from the case's q.npy/k.npy instead of
//   attn.npy, the path of fused-attention engines.
//
// Exit codes: 0 success / agreement, 1 disagreement, 2 bad input (one line on
// stderr saying why).
#include <CLI/CLI.hpp>
#include <cstdio>
#include <iostream>
#include <nlohmann/json.hpp>
#include <sparsevlm/io/case.hpp>

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

int cmd_bench(const std::string& case_dir, int repeat, io::scores_source from) {
  const io::case_data c = io::load_case(case_dir);
  {
    workspace ws;
    (void)io::run_case(c, ws, from);  // validates the inputs once, before timing
  }
  const auto med = io::visit_case(
      c, [&](const auto& in) { return examples::time_stages(in, c.options, repeat); }, from);
  nlohmann::ordered_json j;
  j["case"] = c.name;
  j["repeat"] = repeat;
  j["threads"] = 1;
  j["scores_from"] = from == io::scores_source::qk ? "qk" : "attn";
  j["median_ms"] = nlohmann::ordered_json::object();
  for (const char* stage : {"total", "raters", "scores", "rank", "keep", "recycle", "plan"})
    j["median_ms"][stage] = med.at(stage);
  std::cout << j.dump() << "\n";
  return 0;
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
  std::string scores_from = "attn";
  for (auto* sub : {run, check, bench})
    sub->add_option("--scores-from", scores_from,
                    "attn: the case's attention matrix; qk: its q.npy/k.npy (fused-attention path)")
        ->check(CLI::IsMember({"attn", "qk"}));

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
    if (*run) return cmd_run(case_dir, out_dir, from);
    if (*check) return cmd_check(case_dir, from);
    return cmd_bench(case_dir, repeat, from);
  } catch (const sparsevlm::error& e) {
    std::cerr << "sparsevlm: " << e.what() << "\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "sparsevlm: " << e.what() << "\n";
    return 2;
  }
}
