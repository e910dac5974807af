// See step_case.hpp.
#include "step_case.hpp"

#include <algorithm>
#include <filesystem>

#include <sparsevlm/io/case.hpp>

namespace svt {

namespace {

std::vector<float> widen(const sparsevlm::io::npy_array& a) {
  std::vector<float> out(static_cast<std::size_t>(a.count()));
  if (a.type == sparsevlm::io::npy_type::f16) {
    for (std::size_t i = 0; i < out.size(); ++i) out[i] = sparsevlm::to_float(a.as<sparsevlm::half>()[i]);
  } else {
    std::copy(a.as<float>(), a.as<float>() + out.size(), out.begin());
  }
  return out;
}

template <class T>
std::vector<T> as(const std::vector<float>& v) {
  std::vector<T> out(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) out[i] = sparsevlm::from_float<T>(v[i]);
  return out;
}

template <class T>
sparsevlm::step_result run(const flat_case& c, bool qk) {
  using namespace sparsevlm;
  const std::vector<T> e = as<T>(c.embeds), h = as<T>(c.hidden);
  const matrix_view<const T> ev(e.data(), {c.L, c.de}, "embeds");
  const matrix_view<const T> hv(h.data(), {c.L, c.d}, "hidden");
  std::optional<std::span<const index_t>> raters;
  if (c.raters) raters = std::span<const index_t>(*c.raters);
  const visual_span vis{c.S, c.N};
  if (qk) {
    const std::vector<T> q = as<T>(c.q), k = as<T>(c.k);
    step_inputs_qk<T, T, T, T> in{
        ev,
        qk_view<T, T>{tensor3_view<const T>(q.data(), {c.H, c.L, c.dh}, "q"),
                      tensor3_view<const T>(k.data(), {c.Hkv, c.L, c.dh}, "k"), std::nullopt, 0.0},
        hv, vis, raters};
    return prune_step(in, c.options);
  }
  const std::vector<T> a = as<T>(c.attn);
  step_inputs<T, T, T> in{ev, tensor3_view<const T>(a.data(), {c.H, c.L, c.L}, "attn"), hv, vis,
                          raters};
  return prune_step(in, c.options);
}

}  // namespace

const char* elem_name(elem e) {
  switch (e) {
    case elem::f32: return "float32";
    case elem::f16: return "float16";
    case elem::bf16: return "bfloat16";
  }
  return "?";
}

std::vector<flat_case> load_flat_cases(const std::string& dir) {
  namespace fs = std::filesystem;
  std::vector<fs::path> dirs;
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return {};
  for (const auto& entry : fs::directory_iterator(dir))
    if (fs::exists(entry.path() / "case.json")) dirs.push_back(entry.path());
  std::sort(dirs.begin(), dirs.end());
  std::vector<flat_case> out;
  for (const auto& p : dirs) {
    const sparsevlm::io::case_data data = sparsevlm::io::load_case(p);
    flat_case c;
    c.name = p.filename().string();
    c.L = data.attn.shape[1];
    c.H = data.attn.shape[0];
    c.S = data.visual.start;
    c.N = data.visual.len;
    c.de = data.embeds.shape[1];
    c.d = data.hidden.shape[1];
    c.embeds = widen(data.embeds);
    c.attn = widen(data.attn);
    c.hidden = widen(data.hidden);
    if (data.q && data.k) {
      c.Hkv = data.k->shape[0];
      c.dh = data.q->shape[2];
      c.q = widen(*data.q);
      c.k = widen(*data.k);
    }
    c.raters = data.raters;
    c.options = data.options;
    out.push_back(std::move(c));
  }
  return out;
}

std::vector<float> rounded(const std::vector<float>& v, elem e) {
  std::vector<float> out(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) {
    switch (e) {
      case elem::f32: out[i] = v[i]; break;
      case elem::f16: out[i] = sparsevlm::to_float(sparsevlm::to_half(v[i])); break;
      case elem::bf16: out[i] = sparsevlm::to_float(sparsevlm::to_bfloat16(v[i])); break;
    }
  }
  return out;
}

sparsevlm::step_result cpu_step(const flat_case& c, elem e, bool qk) {
  switch (e) {
    case elem::f16: return run<sparsevlm::half>(c, qk);
    case elem::bf16: return run<sparsevlm::bfloat16>(c, qk);
    case elem::f32: break;
  }
  return run<float>(c, qk);
}

}  // namespace svt
