// Case folders (shared/spec/case-format.md): load, run, write and compare.
// Not part of the umbrella header: needs nlohmann/json.
#pragma once

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include <sparsevlm/step.hpp>
#include "npy.hpp"

namespace sparsevlm::io {

/// A case in memory: the arrays, the layout and the options.
struct case_data {
  std::string name;
  visual_span visual;
  npy_array embeds, attn, hidden;
  std::optional<npy_array> q, k;
  std::optional<std::vector<index_t>> raters;
  step_options options;
};

namespace detail_case {

[[noreturn]] inline void bad(const std::string& arg, const std::string& expected,
                             const std::string& got) {
  sparsevlm::detail::fail(errc::bad_file, arg, expected, got);
}

inline std::string type_of(const nlohmann::json& j) { return j.type_name(); }

inline const nlohmann::json& member(const nlohmann::json& obj, const char* key,
                                    const std::string& where) {
  if (!obj.is_object()) bad(where, "an object", type_of(obj));
  const auto it = obj.find(key);
  if (it == obj.end()) bad(where + "." + key, "a value", "nothing (missing key)");
  return *it;
}

/// An integer; an integral float such as 64.0 (what some JSON writers emit for
/// NumPy numbers) is accepted as that integer.
inline index_t get_int(const nlohmann::json& j, const std::string& where) {
  if (j.is_number_float()) {
    const double v = j.get<double>();
    if (!(std::isfinite(v) && v == std::floor(v) && std::fabs(v) < 9.0e15))
      bad(where, "an integer", "number " + j.dump());
    return static_cast<index_t>(v);
  }
  if (!j.is_number_integer()) bad(where, "an integer", type_of(j) + " " + j.dump());
  if (j.is_number_unsigned() && j.get<std::uint64_t>() > static_cast<std::uint64_t>(INT64_MAX))
    bad(where, "an integer that fits in int64", j.dump());
  return j.get<index_t>();
}

inline double get_number(const nlohmann::json& j, const std::string& where) {
  if (!j.is_number()) bad(where, "a number", type_of(j) + " " + j.dump());
  return j.get<double>();
}

inline std::string get_string(const nlohmann::json& j, const std::string& where) {
  if (!j.is_string()) bad(where, "a string", type_of(j) + " " + j.dump());
  return j.get<std::string>();
}

inline npy_array load_array(const std::filesystem::path& dir, const nlohmann::json& root,
                            const char* key, std::size_t rank) {
  const std::string file = get_string(member(root, key, "case.json"), std::string("case.json.") + key);
  if (file.empty() || std::filesystem::path(file).is_absolute() ||
      file.find("..") != std::string::npos)
    bad(std::string("case.json.") + key, "a file name inside the case folder", "'" + file + "'");
  npy_array a = read_npy(dir / file);
  if (a.type == npy_type::i64)
    bad(file, "float32 or float16 data", std::string(npy_type_name(a.type)));
  if (a.shape.size() != rank)
    bad(file, std::to_string(rank) + " dimensions", std::to_string(a.shape.size()));
  return a;
}

}  // namespace detail_case

/// Parses case.json text and loads the arrays it names from `dir`. Checks the
/// format string, key types, dtypes (float32/float16), ranks, and the shapes that
/// tie attn, q and k together; agreement with embeds/hidden and the span is
/// checked when the step runs.
/// Errors: sparsevlm::error (errc::bad_file for JSON and files).
inline case_data load_case_json(const std::string& text, const std::filesystem::path& dir) {
  using namespace detail_case;
  nlohmann::json root;
  try {
    root = nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    bad("case.json", "valid JSON", std::string("a parse error (") + e.what() + ")");
  }
  if (!root.is_object()) bad("case.json", "an object", type_of(root));
  const std::string format = get_string(member(root, "format", "case.json"), "case.json.format");
  if (format != "sparsevlm-case/1")
    bad("case.json.format", "\"sparsevlm-case/1\"", "\"" + format + "\"");
  case_data c;
  c.name = dir.filename().string();
  if (c.name.empty()) c.name = dir.parent_path().filename().string();
  const auto& vis = member(root, "visual", "case.json");
  c.visual.start = get_int(member(vis, "start", "case.json.visual"), "case.json.visual.start");
  c.visual.len = get_int(member(vis, "len", "case.json.visual"), "case.json.visual.len");

  const auto& pol = member(root, "policy", "case.json");
  const std::string kind = get_string(member(pol, "kind", "case.json.policy"), "case.json.policy.kind");
  if (kind == "rank") {
    c.options.policy = keep_policy::rank(
        get_number(member(pol, "scale", "case.json.policy"), "case.json.policy.scale"),
        get_number(member(pol, "bias", "case.json.policy"), "case.json.policy.bias"));
  } else if (kind == "fixed") {
    c.options.policy =
        keep_policy::fixed(get_int(member(pol, "keep", "case.json.policy"), "case.json.policy.keep"));
  } else {
    bad("case.json.policy.kind", "\"rank\" or \"fixed\"", "\"" + kind + "\"");
  }
  const auto& rec = member(root, "recycle", "case.json");
  const auto& en = member(rec, "enabled", "case.json.recycle");
  if (!en.is_boolean()) bad("case.json.recycle.enabled", "a boolean", type_of(en));
  c.options.recycle.enabled = en.get<bool>();
  c.options.recycle.fraction =
      get_number(member(rec, "fraction", "case.json.recycle"), "case.json.recycle.fraction");
  c.options.recycle.cluster_divisor = get_number(member(rec, "cluster_divisor", "case.json.recycle"),
                                                 "case.json.recycle.cluster_divisor");
  // The spec constrains the options even when recycling is off.
  check_recycle_options(c.options.recycle);
  check_policy(c.options.policy);

  if (const auto it = root.find("raters"); it != root.end()) {
    if (!it->is_array()) bad("case.json.raters", "a list of integers", type_of(*it));
    std::vector<index_t> r;
    for (std::size_t i = 0; i < it->size(); ++i)
      r.push_back(get_int((*it)[i], "case.json.raters[" + std::to_string(i) + "]"));
    // The spec lists positions without promising an order; the API wants them
    // ascending. A repeated position stays an error (it would weigh a rater twice).
    std::sort(r.begin(), r.end());
    c.raters = std::move(r);
  }
  c.embeds = load_array(dir, root, "embeds", 2);
  c.attn = load_array(dir, root, "attn", 3);
  c.hidden = load_array(dir, root, "hidden", 2);
  if (root.contains("q") || root.contains("k")) {
    c.q = load_array(dir, root, "q", 3);
    c.k = load_array(dir, root, "k", 3);
  }
  // Shapes the spec ties together, checked here because a step reads only one
  // of attn and q/k: attn [H, L, L]; q [H, L, dh]; k [Hkv, L, dh], H % Hkv == 0.
  const auto shape_str = [](const npy_array& a) {
    std::string out = "(";
    for (std::size_t i = 0; i < a.shape.size(); ++i) out += (i ? ", " : "") + std::to_string(a.shape[i]);
    return out + ")";
  };
  const index_t H = c.attn.shape[0], L = c.attn.shape[1];
  if (c.attn.shape[2] != L) bad("attn.npy", "a shape (H, L, L)", shape_str(c.attn));
  if (c.q) {
    const auto& q = *c.q;
    const auto& k = *c.k;
    if (q.shape[0] != H || q.shape[1] != L)
      bad("q.npy", "a shape (" + std::to_string(H) + ", " + std::to_string(L) + ", dh) like attn's",
          shape_str(q));
    if (k.shape[1] != L || k.shape[2] != q.shape[2] || k.shape[0] < 1 || H % k.shape[0] != 0)
      bad("k.npy",
          "a shape (Hkv, " + std::to_string(L) + ", " + std::to_string(q.shape[2]) +
              ") with Hkv dividing " + std::to_string(H),
          shape_str(k));
  }
  return c;
}

/// Loads `dir/case.json` and its arrays. Errors: as load_case_json.
inline case_data load_case(const std::filesystem::path& dir) {
  std::ifstream f(dir / "case.json");
  if (!f) detail_case::bad((dir / "case.json").string(), "a readable file", "cannot open it");
  std::stringstream ss;
  ss << f.rdbuf();
  return load_case_json(ss.str(), dir);
}

namespace detail_case {

template <std::size_t Rank, class F>
decltype(auto) with_view(const npy_array& a, const char* name, F&& f) {
  std::array<index_t, Rank> ext{};
  for (std::size_t i = 0; i < Rank; ++i) ext[i] = a.shape[i];
  if (a.type == npy_type::f16)
    return f(strided_view<const half, Rank>(a.as<half>(), ext, name));
  return f(strided_view<const float, Rank>(a.as<float>(), ext, name));
}

}  // namespace detail_case

/// Where a case's scores come from: its attention matrix, or its q/k (spec).
enum class scores_source { attn, qk };

/// Calls `f(in)` with typed views over the case's arrays (each float32 or float16
/// as stored): `in` is a step_inputs<TE, TA, TH> for scores_source::attn, a
/// step_inputs_qk<TE, TQ, TK, TH> for scores_source::qk. Returns what `f`
/// returns. The views borrow from `c`.
/// Errors: errc::bad_file when qk is asked for and the case has no q/k.
template <class F>
decltype(auto) visit_case(const case_data& c, F&& f, scores_source from = scores_source::attn) {
  using detail_case::with_view;
  if (from == scores_source::qk && (!c.q || !c.k))
    detail_case::bad("case.json", "q and k files for scores from qk", "a case without them");
  return with_view<2>(c.embeds, "embeds", [&](auto e) {
    return with_view<2>(c.hidden, "hidden", [&](auto h) {
      using TE = typename decltype(e)::value_type;
      using TH = typename decltype(h)::value_type;
      const auto raters = c.raters ? std::optional<std::span<const index_t>>(*c.raters)
                                   : std::optional<std::span<const index_t>>();
      if (from == scores_source::qk) {
        return with_view<3>(*c.q, "q", [&](auto q) {
          return with_view<3>(*c.k, "k", [&](auto k) {
            using TQ = typename decltype(q)::value_type;
            using TK = typename decltype(k)::value_type;
            step_inputs_qk<TE, TQ, TK, TH> in{e, qk_view<TQ, TK>{q, k, std::nullopt, 0.0}, h,
                                              c.visual, raters};
            return f(in);
          });
        });
      }
      return with_view<3>(c.attn, "attn", [&](auto a) {
        using TA = typename decltype(a)::value_type;
        step_inputs<TE, TA, TH> in{e, a, h, c.visual, raters};
        return f(in);
      });
    });
  });
}

/// Runs the case's step through prune_step, scoring from `from`.
inline step_result run_case(const case_data& c, workspace& ws,
                            scores_source from = scores_source::attn) {
  // prune_step reads (and checks) only the hidden rows it recycles; a dumped
  // case is checked whole, since a NaN anywhere in it is a broken dump.
  detail_case::with_view<2>(c.hidden, "hidden", [](auto h) {
    detail::check_finite_rows(h, 0, h.extent(0), "hidden");
    return 0;
  });
  return visit_case(c, [&](const auto& in) { return prune_step(in, c.options, ws); }, from);
}

/// The spec's result.json object for a step result (`merged` names
/// "merged.npy" when something was recycled).
inline nlohmann::ordered_json result_json(const step_result& r) {
  nlohmann::ordered_json j;
  j["raters"] = r.raters;
  j["rank"] = r.rank;
  j["keep_count"] = r.keep_count;
  j["keep"] = r.keep;
  j["clusters"] = nlohmann::ordered_json::array();
  for (const auto& cl : r.recycled.clusters) j["clusters"].push_back(cl);
  if (!r.recycled.clusters.empty()) j["merged"] = "merged.npy";
  j["sequence"] = r.sequence;
  return j;
}

/// Writes result.json (+ merged.npy) into `out_dir`, creating it. Everything is
/// serialised first, so a failure to create the folder writes nothing.
inline void write_result(const step_result& r, const std::filesystem::path& out_dir) {
  const std::string text = result_json(r).dump() + "\n";
  std::error_code ec;
  std::filesystem::create_directories(out_dir, ec);
  if (ec || !std::filesystem::is_directory(out_dir))
    detail_case::bad(out_dir.string(), "a folder that can be created", ec ? ec.message() : "not a folder");
  if (!r.recycled.clusters.empty()) {
    const std::array<index_t, 2> shape{static_cast<index_t>(r.recycled.clusters.size()), r.recycled.dim};
    write_npy(out_dir / "merged.npy", r.recycled.merged.data(), shape);
  } else {
    // A merged.npy from an earlier run would contradict this result.
    std::filesystem::remove(out_dir / "merged.npy", ec);
  }
  std::ofstream f(out_dir / "result.json", std::ios::trunc);
  if (!f) detail_case::bad((out_dir / "result.json").string(), "a writable file", "cannot open it");
  f << text;
  f.flush();
  if (!f) detail_case::bad((out_dir / "result.json").string(), "a complete write", "a write error");
}

/// An expected result read from a folder: result.json (+ merged.npy).
struct expected_result {
  nlohmann::json json;
  std::optional<npy_array> merged;
};

inline expected_result read_expected(const std::filesystem::path& dir) {
  expected_result e;
  std::ifstream f(dir / "result.json");
  if (!f) detail_case::bad((dir / "result.json").string(), "a readable file", "cannot open it");
  try {
    e.json = nlohmann::json::parse(f);
  } catch (const nlohmann::json::exception& ex) {
    detail_case::bad((dir / "result.json").string(), "valid JSON", ex.what());
  }
  if (!e.json.is_object()) detail_case::bad((dir / "result.json").string(), "an object", e.json.type_name());
  if (e.json.contains("merged") && e.json["merged"].is_string()) {
    const std::string file = e.json["merged"].get<std::string>();
    if (file.empty() || std::filesystem::path(file).is_absolute() || file.find("..") != std::string::npos)
      detail_case::bad("result.json.merged", "a file name inside the folder", "'" + file + "'");
    e.merged = read_npy(dir / file);
    if (e.merged->type != npy_type::f32)
      detail_case::bad("merged", "float32", std::string(npy_type_name(e.merged->type)));
  }
  return e;
}

/// Compares a result with an expected one by the spec's agreement rule: every
/// list equal; merged rows within |a − b| <= 1e-5 + 1e-4·|b|. Returns one line per
/// disagreement; empty means they agree.
inline std::vector<std::string> compare(const step_result& r, const expected_result& e) {
  std::vector<std::string> diffs;
  const nlohmann::json got = nlohmann::json::parse(result_json(r).dump());
  for (const char* key : {"raters", "rank", "keep_count", "keep", "clusters", "sequence"}) {
    if (!e.json.contains(key)) {
      diffs.push_back(std::string(key) + ": missing from the expected result");
    } else if (got[key] != e.json[key]) {
      diffs.push_back(std::string(key) + ": expected " + e.json[key].dump() + ", got " + got[key].dump());
    }
  }
  const bool want_merged = e.merged.has_value();
  const bool have_merged = !r.recycled.clusters.empty();
  if (want_merged != have_merged) {
    diffs.push_back(std::string("merged: expected ") + (want_merged ? "rows" : "none") + ", got " +
                    (have_merged ? "rows" : "none"));
  } else if (have_merged) {
    const auto& m = *e.merged;
    const index_t rows = static_cast<index_t>(r.recycled.clusters.size());
    if (m.shape.size() != 2 || m.shape[0] != rows || m.shape[1] != r.recycled.dim) {
      diffs.push_back("merged: expected shape of " + std::to_string(rows) + "x" +
                      std::to_string(r.recycled.dim) + " in the expected file");
    } else {
      const float* want = m.as<float>();
      for (index_t i = 0; i < m.count(); ++i) {
        const double a = r.recycled.merged[static_cast<std::size_t>(i)];
        const double b = want[i];
        if (!(std::fabs(a - b) <= 1e-5 + 1e-4 * std::fabs(b))) {
          std::ostringstream os;
          os << "merged[" << i / r.recycled.dim << ", " << i % r.recycled.dim << "]: expected " << b
             << ", got " << a;
          diffs.push_back(os.str());
          break;
        }
      }
    }
  }
  return diffs;
}

}  // namespace sparsevlm::io
