// See step_case.hpp.
#include "step_case.hpp"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <functional>
#include <random>
#include <stdexcept>

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
sparsevlm::step_result run(const flat_case& c, bool qk) {
  using namespace sparsevlm;
  const std::vector<T> e = svt::converted<T>(c.embeds), h = svt::converted<T>(c.hidden);
  const matrix_view<const T> ev(e.data(), {c.L, c.de}, "embeds");
  const matrix_view<const T> hv(h.data(), {c.L, c.d}, "hidden");
  std::optional<std::span<const index_t>> raters;
  if (c.raters) raters = std::span<const index_t>(*c.raters);
  const visual_span vis{c.S, c.N};
  if (qk) {
    const std::vector<T> q = svt::converted<T>(c.q), k = svt::converted<T>(c.k);
    step_inputs_qk<T, T, T, T> in{
        ev,
        qk_view<T, T>{tensor3_view<const T>(q.data(), {c.H, c.L, c.dh}, "q"),
                      tensor3_view<const T>(k.data(), {c.Hkv, c.L, c.dh}, "k"), std::nullopt, 0.0},
        hv, vis, raters};
    return prune_step(in, c.options);
  }
  const std::vector<T> a = svt::converted<T>(c.attn);
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

namespace {

struct synthetic_shape {
  index_t L, S, N, H, Hkv, dh, de, d;
  sparsevlm::keep_policy policy;
  bool recycle;
  double fraction, divisor;
  bool given_raters;
};

flat_case draw(const synthetic_shape& s, std::mt19937& g, int index) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const auto fill = [&](std::vector<float>& v, std::size_t n, float sd) {
    v.resize(n);
    for (float& x : v) x = sd * normal(g);
  };
  flat_case c;
  c.name = "synthetic-" + std::to_string(index);
  c.L = s.L, c.S = s.S, c.N = s.N, c.H = s.H, c.Hkv = s.Hkv, c.dh = s.dh, c.de = s.de, c.d = s.d;
  fill(c.embeds, static_cast<std::size_t>(s.L * s.de), 1.0f);
  fill(c.hidden, static_cast<std::size_t>(s.L * s.d), 1.0f);
  fill(c.q, static_cast<std::size_t>(s.H * s.L * s.dh), 1.5f);
  fill(c.k, static_cast<std::size_t>(s.Hkv * s.L * s.dh), 1.5f);
  const double scale = 1.0 / std::sqrt(static_cast<double>(s.dh));
  c.attn.assign(static_cast<std::size_t>(s.H * s.L * s.L), 0.0f);
  std::vector<double> row(static_cast<std::size_t>(s.L));
  for (index_t h = 0; h < s.H; ++h) {
    const index_t kh = h / (s.H / s.Hkv);
    for (index_t i = 0; i < s.L; ++i) {
      double top = -1e300;
      for (index_t j = 0; j <= i; ++j) {
        double dot = 0.0;
        for (index_t x = 0; x < s.dh; ++x)
          dot += static_cast<double>(c.q[static_cast<std::size_t>((h * s.L + i) * s.dh + x)]) *
                 c.k[static_cast<std::size_t>((kh * s.L + j) * s.dh + x)];
        row[static_cast<std::size_t>(j)] = dot * scale;
        top = std::max(top, row[static_cast<std::size_t>(j)]);
      }
      double sum = 0.0;
      for (index_t j = 0; j <= i; ++j) sum += (row[static_cast<std::size_t>(j)] = std::exp(row[static_cast<std::size_t>(j)] - top));
      for (index_t j = 0; j <= i; ++j)
        c.attn[static_cast<std::size_t>((h * s.L + i) * s.L + j)] =
            static_cast<float>(row[static_cast<std::size_t>(j)] / sum);
    }
  }
  c.options.policy = s.policy;
  c.options.recycle.enabled = s.recycle;
  c.options.recycle.fraction = s.fraction;
  c.options.recycle.cluster_divisor = s.divisor;
  if (s.given_raters) {
    // Every third text position after the visual span, as an engine might give.
    std::vector<index_t> r;
    for (index_t p = s.S + s.N; p < s.L; p += 3) r.push_back(p);
    c.raters = r;
  }
  return c;
}

// The spec's margin at the keep boundary: the smallest kept score and the largest
// dropped one at least 1e-6 apart (both score forms).
bool clears_margin(const flat_case& c) {
  for (bool qk : {false, true}) {
    const sparsevlm::step_result r = cpu_step(c, elem::f32, qk);
    if (r.keep_count <= 0 || r.keep_count >= c.N) continue;
    std::vector<float> s = r.scores;
    std::sort(s.begin(), s.end(), std::greater<>());
    if (s[static_cast<std::size_t>(r.keep_count - 1)] - s[static_cast<std::size_t>(r.keep_count)] < 1e-6f)
      return false;
  }
  return true;
}

}  // namespace

std::vector<flat_case> synthetic_cases() {
  using kp = sparsevlm::keep_policy;
  const synthetic_shape shapes[] = {
      // L   S   N   H Hkv dh de  d   policy           recycle frac div  raters
      {40, 3, 24, 2, 2, 8, 16, 16, kp::fixed(10), true, 0.3, 10.0, false},
      {72, 5, 48, 4, 2, 8, 32, 24, kp::rank(0.8, 0.0), true, 0.5, 4.0, false},
      {100, 1, 64, 3, 3, 16, 24, 32, kp::rank(9.0, 6.0), true, 0.3, 10.0, false},
      {56, 0, 40, 2, 1, 8, 16, 8, kp::fixed(5), false, 0.3, 10.0, false},
      {64, 4, 36, 2, 2, 12, 16, 16, kp::rank(13.5, 0.0), true, 0.8, 3.0, true},
  };
  std::vector<flat_case> out;
  std::mt19937 g(1203);
  int index = 0;
  for (const synthetic_shape& s : shapes) {
    for (int attempt = 0;; ++attempt) {
      flat_case c = draw(s, g, index);
      if (clears_margin(c)) {
        out.push_back(std::move(c));
        break;
      }
      if (attempt == 20) throw std::runtime_error("synthetic_cases: no draw cleared the margin");
    }
    ++index;
  }
  return out;
}

std::vector<flat_case> model_shape_cases() {
  using kp = sparsevlm::keep_policy;
  // The token counts of LLaVA-1.5 (35 + 576 + 60) and LLaVA-NeXT (35 + 2880 + 60),
  // with few heads and small embeddings so the CPU-thread emulation stays quick:
  // the grids, tiles, shared-memory bounds and recycled counts are those shapes'.
  const synthetic_shape shapes[] = {
      // L     S   N     H Hkv dh de  d   policy              recycle frac div  raters
      {671, 35, 576, 2, 2, 8, 16, 16, kp::rank(0.8, 0.0), true, 0.3, 10.0, false},
      {671, 35, 576, 2, 1, 8, 16, 16, kp::fixed(192), true, 0.3, 10.0, true},
      {2975, 35, 2880, 2, 2, 8, 16, 16, kp::rank(9.0, 6.0), true, 0.3, 10.0, false},
  };
  std::vector<flat_case> out;
  std::mt19937 g(576);
  int index = 100;
  for (const synthetic_shape& s : shapes) out.push_back(draw(s, g, index++));
  return out;
}

std::vector<flat_case> video_shape_cases() {
  using kp = sparsevlm::keep_policy;
  // 8 frames of 576 tokens after a 35-token prompt, a 60-token question: the
  // recycled rows' Gram matrix (1,383 rows), D and its densities at a video's size.
  const synthetic_shape video{4703, 35, 4608, 2, 2, 8, 16, 16, kp::rank(0.6, 0.0),
                              true, 0.3, 10.0, false};
  std::mt19937 g(4608);
  return {draw(video, g, 200)};
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
