// Scores from Q/K (scores_qk.hpp) and the scoring options shared by both paths
// (head selection, the RoPE gravity correction in gravity.hpp).
#include <doctest/doctest.h>

#include <cmath>
#include <filesystem>
#include <random>
#include <vector>

#include <sparsevlm/io/case.hpp>
#include <sparsevlm/sparsevlm.hpp>

#include "test_util.hpp"

namespace {

using namespace sparsevlm;

/// A random sequence with q/k and the causal attention they produce, computed
/// independently here in double (the test's reference for the attention path).
struct qk_fixture {
  index_t H, Hkv, dh, L, S, N;
  std::vector<float> q, k, attn, lse;
  std::vector<index_t> raters;

  qk_fixture(index_t heads, index_t kv_heads, unsigned seed, index_t head_dim = 16)
      : H(heads), Hkv(kv_heads), dh(head_dim), L(40), S(4), N(24) {
    std::mt19937 g(seed);
    q = svt::random_floats(g, static_cast<std::size_t>(H * L * dh), -1.0f, 1.0f);
    k = svt::random_floats(g, static_cast<std::size_t>(Hkv * L * dh), -1.0f, 1.0f);
    for (index_t t = S + N; t < L; t += 3) raters.push_back(t);
    attn.assign(static_cast<std::size_t>(H * L * L), 0.0f);
    lse.assign(static_cast<std::size_t>(H * L), 0.0f);
    const double scale = 1.0 / std::sqrt(static_cast<double>(dh));
    for (index_t h = 0; h < H; ++h) {
      const index_t kh = h / (H / Hkv);
      for (index_t t = 0; t < L; ++t) {
        std::vector<double> z(static_cast<std::size_t>(t + 1));
        double mx = -1e300;
        for (index_t u = 0; u <= t; ++u) {
          double s = 0.0;
          for (index_t c = 0; c < dh; ++c)
            s += static_cast<double>(q[static_cast<std::size_t>((h * L + t) * dh + c)]) *
                 static_cast<double>(k[static_cast<std::size_t>((kh * L + u) * dh + c)]);
          z[static_cast<std::size_t>(u)] = s * scale;
          mx = std::max(mx, s * scale);
        }
        double sum = 0.0;
        for (double v : z) sum += std::exp(v - mx);
        lse[static_cast<std::size_t>(h * L + t)] = static_cast<float>(mx + std::log(sum));
        for (index_t u = 0; u <= t; ++u)
          attn[static_cast<std::size_t>((h * L + t) * L + u)] =
              static_cast<float>(std::exp(z[static_cast<std::size_t>(u)] - mx) / sum);
      }
    }
  }
  index_t R() const { return static_cast<index_t>(raters.size()); }
};

template <class T>
qk_view<T, T> make_qk(const qk_fixture& f, const std::vector<T>& q, const std::vector<T>& k,
                      bool with_lse) {
  qk_view<T, T> v{tensor3_view<const T>(q.data(), {f.H, f.L, f.dh}),
                  tensor3_view<const T>(k.data(), {f.Hkv, f.L, f.dh}), std::nullopt, 0.0};
  if (with_lse) v.lse = matrix_view<const float>(f.lse.data(), {f.H, f.L});
  return v;
}

void check_close(const std::vector<float>& a, const std::vector<float>& b, double rel) {
  REQUIRE(a.size() == b.size());
  for (std::size_t i = 0; i < a.size(); ++i)
    CHECK_MESSAGE(std::fabs(a[i] - b[i]) <= rel * std::fabs(b[i]) + 1e-9, "at ", i, ": ", a[i],
                  " vs ", b[i]);
}

}  // namespace

TEST_CASE("scores_qk: GQA ratios 1, 4, 8, with and without LSE, match the attention path") {
  for (const auto& [H, Hkv] : {std::pair<index_t, index_t>{8, 8}, {8, 2}, {8, 1}}) {
    const qk_fixture f(H, Hkv, static_cast<unsigned>(11 * H + Hkv));
    const index_t R = f.R(), N = f.N;
    std::vector<float> p_ref(static_cast<std::size_t>(R * N)), s_ref(static_cast<std::size_t>(N));
    relevance_scores(tensor3_view<const float>(f.attn.data(), {f.H, f.L, f.L}), f.raters,
                     visual_span{f.S, N}, matrix_view<float>(p_ref.data(), {R, N}), s_ref);
    for (bool with_lse : {false, true}) {
      INFO("H=", H, " Hkv=", Hkv, " lse=", with_lse);
      std::vector<float> p(p_ref.size()), s(s_ref.size());
      workspace ws;
      relevance_scores_qk(make_qk(f, f.q, f.k, with_lse), f.raters, visual_span{f.S, N},
                          matrix_view<float>(p.data(), {R, N}), s, score_options{}, ws);
      check_close(p, p_ref, 1e-5);
      check_close(s, s_ref, 1e-5);
    }
  }
}

TEST_CASE("scores_qk: rater rows only ([H, R, dh]) equal all rows ([H, L, dh])") {
  const qk_fixture f(4, 2, 3);
  const index_t R = f.R(), N = f.N;
  std::vector<float> qr(static_cast<std::size_t>(f.H * R * f.dh)), lser(static_cast<std::size_t>(f.H * R));
  for (index_t h = 0; h < f.H; ++h)
    for (index_t r = 0; r < R; ++r) {
      lser[static_cast<std::size_t>(h * R + r)] = f.lse[static_cast<std::size_t>(h * f.L + f.raters[static_cast<std::size_t>(r)])];
      for (index_t c = 0; c < f.dh; ++c)
        qr[static_cast<std::size_t>((h * R + r) * f.dh + c)] =
            f.q[static_cast<std::size_t>((h * f.L + f.raters[static_cast<std::size_t>(r)]) * f.dh + c)];
    }
  for (bool with_lse : {false, true}) {
    std::vector<float> p_all(static_cast<std::size_t>(R * N)), s_all(static_cast<std::size_t>(N));
    std::vector<float> p_r(p_all.size()), s_r(s_all.size());
    workspace ws;
    relevance_scores_qk(make_qk(f, f.q, f.k, with_lse), f.raters, visual_span{f.S, N},
                        matrix_view<float>(p_all.data(), {R, N}), s_all, score_options{}, ws);
    qk_view<float, float> rows{tensor3_view<const float>(qr.data(), {f.H, R, f.dh}),
                               tensor3_view<const float>(f.k.data(), {f.Hkv, f.L, f.dh}),
                               std::nullopt, 0.0};
    if (with_lse) rows.lse = matrix_view<const float>(lser.data(), {f.H, R});
    relevance_scores_qk(rows, f.raters, visual_span{f.S, N}, matrix_view<float>(p_r.data(), {R, N}),
                        s_r, score_options{}, ws);
    // The same inputs in the same order: bit-identical.
    CHECK(p_all == p_r);
    CHECK(s_all == s_r);
  }
}

TEST_CASE("scores_qk: float16 and bfloat16 q/k give the scores of their float32 values") {
  const qk_fixture f(4, 1, 9);
  const index_t R = f.R(), N = f.N;
  const auto q16 = svt::convert<half>(f.q);
  const auto k16 = svt::convert<half>(f.k);
  const auto qb = svt::convert<bfloat16>(f.q);
  const auto kb = svt::convert<bfloat16>(f.k);
  // The float32 values that the 16-bit tensors hold exactly.
  std::vector<float> q16f, k16f, qbf, kbf;
  for (auto v : q16) q16f.push_back(to_float(v));
  for (auto v : k16) k16f.push_back(to_float(v));
  for (auto v : qb) qbf.push_back(to_float(v));
  for (auto v : kb) kbf.push_back(to_float(v));
  workspace ws;
  const auto run = [&](const auto& q, const auto& k) {
    std::vector<float> p(static_cast<std::size_t>(R * N)), s(static_cast<std::size_t>(N));
    relevance_scores_qk(make_qk(f, q, k, false), f.raters, visual_span{f.S, N},
                        matrix_view<float>(p.data(), {R, N}), s, score_options{}, ws);
    return s;
  };
  CHECK(run(q16, k16) == run(q16f, k16f));
  CHECK(run(qb, kb) == run(qbf, kbf));
  // And both are close to the float32 originals (16-bit rounding of q and k).
  check_close(run(q16, k16), run(f.q, f.k), 2e-2);
}

TEST_CASE("scores_qk: prune_step decides as the attention path") {
  for (const auto& [H, Hkv] : {std::pair<index_t, index_t>{8, 8}, {8, 2}, {8, 1}}) {
    const qk_fixture f(H, Hkv, static_cast<unsigned>(H + 100 * Hkv));
    std::mt19937 g(17);
    const auto hidden = svt::random_floats(g, static_cast<std::size_t>(f.L * 8), -1.0f, 1.0f);
    const matrix_view<const float> hv(hidden.data(), {f.L, 8});
    step_options opt;
    opt.policy = keep_policy::fixed(9);
    step_inputs<float, float, float> a{hv, tensor3_view<const float>(f.attn.data(), {f.H, f.L, f.L}),
                                       hv, visual_span{f.S, f.N}, std::span<const index_t>(f.raters)};
    step_inputs_qk<float, float, float, float> b{hv, make_qk(f, f.q, f.k, false), hv,
                                                 visual_span{f.S, f.N}, std::span<const index_t>(f.raters)};
    const step_result ra = prune_step(a, opt);
    const step_result rb = prune_step(b, opt);
    INFO("H=", H, " Hkv=", Hkv);
    CHECK(ra.rank == rb.rank);
    CHECK(ra.keep == rb.keep);
    CHECK(ra.recycled.clusters == rb.recycled.clusters);
    CHECK(ra.sequence == rb.sequence);
  }
}

TEST_CASE("scores_qk: bad inputs") {
  const qk_fixture f(4, 2, 5);
  const index_t R = f.R(), N = f.N;
  std::vector<float> p(static_cast<std::size_t>(R * N)), s(static_cast<std::size_t>(N));
  workspace ws;
  const auto run = [&](const qk_view<float, float>& v, std::span<const index_t> raters) {
    relevance_scores_qk(v, raters, visual_span{f.S, N}, matrix_view<float>(p.data(), {R, N}), s,
                        score_options{}, ws);
  };
  auto v = make_qk(f, f.q, f.k, true);
  SUBCASE("LSE of the wrong shape") {
    v.lse = matrix_view<const float>(f.lse.data(), {f.H, f.L - 1});
    SV_CHECK_THROWS(errc::shape_mismatch, "lse", run(v, f.raters));
  }
  SUBCASE("rater position beyond L") {
    std::vector<index_t> bad = f.raters;
    bad.back() = f.L;
    SV_CHECK_THROWS(errc::invalid_argument, "raters[", run(v, bad));
  }
  SUBCASE("Hkv not dividing H") {
    v.k = tensor3_view<const float>(f.k.data(), {3, f.L / 2, f.dh});
    SV_CHECK_THROWS(errc::shape_mismatch, "k.extent[0]", run(v, f.raters));
  }
  SUBCASE("head dims differ") {
    v.k = tensor3_view<const float>(f.k.data(), {f.Hkv, f.L, f.dh / 2});
    SV_CHECK_THROWS(errc::shape_mismatch, "k.extent[2]", run(v, f.raters));
  }
  SUBCASE("q rows neither L nor R") {
    v.q = tensor3_view<const float>(f.q.data(), {f.H, R + 1, f.dh});
    SV_CHECK_THROWS(errc::shape_mismatch, "q.extent[1]", run(v, f.raters));
  }
  SUBCASE("NaN in a key the raters read") {
    std::vector<float> k = f.k;
    k[static_cast<std::size_t>((1 * f.L + 5) * f.dh + 2)] = svt::kNaNf;
    auto w = make_qk(f, f.q, k, false);
    SV_CHECK_THROWS(errc::non_finite, "k[1, 5, 2]", run(w, f.raters));
  }
  SUBCASE("NaN in the LSE") {
    std::vector<float> lse = f.lse;
    lse[3] = svt::kNaNf;
    v.lse = matrix_view<const float>(lse.data(), {f.H, f.L});
    SV_CHECK_THROWS(errc::non_finite, "lse[0, 3]", run(v, f.raters));
  }
  SUBCASE("negative scale") {
    v.scale = -1.0;
    SV_CHECK_THROWS(errc::invalid_argument, "scale", run(v, f.raters));
  }
}

TEST_CASE("scoring options: top_heads averages only the strongest heads") {
  // H = 3, one rater row (t = 3), visual columns 1..2 (S = 1, N = 2), L = 4.
  // Head h puts (a_h, b_h) on the visual columns:
  //   h0: (0.10, 0.20) total 0.30;  h1: (0.40, 0.10) total 0.50;  h2: (0.05, 0.05) total 0.10.
  // top_heads = 2 keeps h1 and h0 (totals 0.5, 0.3): P = ((0.1+0.4)/2, (0.2+0.1)/2)
  // = (0.25, 0.15). top_heads = 1 keeps h1 alone: P = (0.4, 0.1).
  std::vector<float> attn(3 * 4 * 4, 0.0f);
  const float vals[3][2] = {{0.10f, 0.20f}, {0.40f, 0.10f}, {0.05f, 0.05f}};
  for (int h = 0; h < 3; ++h) {
    attn[static_cast<std::size_t>((h * 4 + 3) * 4 + 1)] = vals[h][0];
    attn[static_cast<std::size_t>((h * 4 + 3) * 4 + 2)] = vals[h][1];
  }
  const std::vector<index_t> raters{3};
  std::vector<float> p(2), s(2);
  workspace ws;
  score_options o;
  o.top_heads = 2;
  relevance_scores(tensor3_view<const float>(attn.data(), {3, 4, 4}), raters, visual_span{1, 2},
                   matrix_view<float>(p.data(), {1, 2}), s, o, ws);
  CHECK(p[0] == doctest::Approx(0.25));
  CHECK(p[1] == doctest::Approx(0.15));
  o.top_heads = 1;
  relevance_scores(tensor3_view<const float>(attn.data(), {3, 4, 4}), raters, visual_span{1, 2},
                   matrix_view<float>(p.data(), {1, 2}), s, o, ws);
  CHECK(p[0] == doctest::Approx(0.4));
  CHECK(p[1] == doctest::Approx(0.1));
  o.top_heads = 4;
  SV_CHECK_THROWS(errc::invalid_argument, "scoring.top_heads",
                  relevance_scores(tensor3_view<const float>(attn.data(), {3, 4, 4}), raters,
                                   visual_span{1, 2}, matrix_view<float>(p.data(), {1, 2}), s, o, ws));
  CHECK(top_heads_for(32) == 14);
  CHECK(top_heads_for(40) == 18);  // round(17.5) = 18
  CHECK(top_heads_for(1) == 1);
}

TEST_CASE("gravity: hand-worked bias probabilities and the guard") {
  // rotary_dim 2: one frequency θ_0 = base^0 = 1; scale s = 0.5, so
  // b(Δ) = 2·s·cos(Δ) = cos(Δ). Rater t = 2 at positions 0,1,2, visual span [0, 2):
  //   b(u=0) = cos 2 = −0.41615, b(u=1) = cos 1 = 0.54030, b(u=2) = cos 0 = 1.
  //   Z = e^−0.41615 + e^0.54030 + e^1 = 0.65959 + 1.71637 + 2.71828 = 5.09424
  //   g(0) = 0.65959 / 5.09424 = 0.12948,  g(1) = 1.71637 / 5.09424 = 0.33692.
  rope_gravity g;
  g.enabled = true;
  g.head_dim = 4;
  g.rotary_dim = 2;
  g.scale = 0.5;
  const std::vector<index_t> raters{2};
  float out[2];
  workspace ws;
  gravity_table(g, raters, visual_span{0, 2}, 3, out, ws);
  CHECK(out[0] == doctest::Approx(0.12948).epsilon(1e-4));
  CHECK(out[1] == doctest::Approx(0.33692).epsilon(1e-4));
  // The guard: with min_ratio 1, the floor is 1/(t+1) = 1/3 > g(0), so g(0) -> 1/3
  // while g(1) = 0.33692 stays (just above the floor).
  g.min_ratio = 1.0;
  gravity_table(g, raters, visual_span{0, 2}, 3, out, ws);
  CHECK(out[0] == doctest::Approx(1.0 / 3.0));
  CHECK(out[1] == doctest::Approx(0.33692).epsilon(1e-4));
  // Explicit positions: the same relative distances give the same table.
  const std::vector<index_t> pos{100, 101, 102};
  g.min_ratio = 1e-3;
  g.positions = pos;
  gravity_table(g, raters, visual_span{0, 2}, 3, out, ws);
  CHECK(out[0] == doctest::Approx(0.12948).epsilon(1e-4));
  // Far-apart positions take the direct (untabulated) route and agree with it.
  const std::vector<index_t> far{0, 1000000, 1000001};
  g.positions = far;
  float direct[2];
  gravity_table(g, raters, visual_span{0, 2}, 3, direct, ws);
  // b(u=0) = cos(1000001), b(u=1) = cos(1), b(u=2) = 1.
  const double b0 = std::cos(1000001.0), b1 = std::cos(1.0), b2 = 1.0;
  const double z = std::exp(b0) + std::exp(b1) + std::exp(b2);
  CHECK(direct[0] == doctest::Approx(std::exp(b0) / z).epsilon(1e-6));
  CHECK(direct[1] == doctest::Approx(std::exp(b1) / z).epsilon(1e-6));
}

TEST_CASE("gravity: bad options") {
  const std::vector<index_t> raters{2};
  float out[2];
  workspace ws;
  rope_gravity g;
  g.enabled = true;
  SV_CHECK_THROWS(errc::invalid_argument, "gravity.head_dim",
                  gravity_table(g, raters, visual_span{0, 2}, 3, out, ws));
  g.head_dim = 4;
  g.rotary_dim = 3;
  SV_CHECK_THROWS(errc::invalid_argument, "gravity.rotary_dim",
                  gravity_table(g, raters, visual_span{0, 2}, 3, out, ws));
  g.rotary_dim = 0;
  g.base = 1.0;
  SV_CHECK_THROWS(errc::invalid_argument, "gravity.base",
                  gravity_table(g, raters, visual_span{0, 2}, 3, out, ws));
  g.base = 10000.0;
  const std::vector<index_t> pos{0, 1};
  g.positions = pos;
  SV_CHECK_THROWS(errc::shape_mismatch, "gravity.positions",
                  gravity_table(g, raters, visual_span{0, 2}, 3, out, ws));
}

TEST_CASE("gravity: both paths apply it identically") {
  const qk_fixture f(4, 2, 21);
  const index_t R = f.R(), N = f.N;
  score_options o;
  o.top_heads = 2;
  o.gravity.enabled = true;
  o.gravity.head_dim = f.dh;
  std::vector<float> pa(static_cast<std::size_t>(R * N)), sa(static_cast<std::size_t>(N));
  std::vector<float> pb(pa.size()), sb(sa.size());
  workspace ws;
  relevance_scores(tensor3_view<const float>(f.attn.data(), {f.H, f.L, f.L}), f.raters,
                   visual_span{f.S, N}, matrix_view<float>(pa.data(), {R, N}), sa, o, ws);
  relevance_scores_qk(make_qk(f, f.q, f.k, false), f.raters, visual_span{f.S, N},
                      matrix_view<float>(pb.data(), {R, N}), sb, o, ws);
  check_close(pb, pa, 1e-5);
  check_close(sb, sa, 1e-5);
  // And the correction changes the scores (it is not a no-op).
  std::vector<float> plain(sa.size()), pp(pa.size());
  score_options o2;
  o2.top_heads = 2;
  relevance_scores(tensor3_view<const float>(f.attn.data(), {f.H, f.L, f.L}), f.raters,
                   visual_span{f.S, N}, matrix_view<float>(pp.data(), {R, N}), plain, o2, ws);
  CHECK(plain != sa);
}

TEST_CASE("scores_qk: shared cases with q/k give the attention path's scores within 1e-5") {
  namespace fs = std::filesystem;
  const std::vector<fs::path> dirs = svt::shared_case_dirs();
  if (dirs.empty()) return;
  int with_qk = 0;
  for (const fs::path& dir : dirs) {
    if (!fs::exists(dir / "q.npy")) continue;
    ++with_qk;
    INFO("case ", dir.filename().string());
    const io::case_data c = io::load_case(dir);
    workspace ws;
    const step_result a = io::run_case(c, ws, io::scores_source::attn);
    const step_result b = io::run_case(c, ws, io::scores_source::qk);
    check_close(b.scores, a.scores, 1e-5);
    CHECK(a.keep == b.keep);
    CHECK(a.recycled.clusters == b.recycled.clusters);
  }
  CHECK(with_qk > 0);
}

TEST_CASE("scoring options: a NaN in a head that top_heads leaves out is still refused") {
  // H = 2, one rater (t = 3), visual [1, 3). Head 1 holds a NaN; without the check
  // its NaN total would break the head ranking and, head 1 left out, vanish.
  std::vector<float> attn(2 * 4 * 4, 0.1f);
  attn[static_cast<std::size_t>((1 * 4 + 3) * 4 + 2)] = svt::kNaNf;
  const std::vector<index_t> raters{3};
  std::vector<float> p(2), s(2);
  workspace ws;
  score_options o;
  o.top_heads = 1;
  SV_CHECK_THROWS(errc::non_finite, "head 1",
                  relevance_scores(tensor3_view<const float>(attn.data(), {2, 4, 4}), raters,
                                   visual_span{1, 2}, matrix_view<float>(p.data(), {1, 2}), s, o, ws));
}

TEST_CASE("gravity: raters, span and output size are checked") {
  rope_gravity g;
  g.enabled = true;
  g.head_dim = 4;
  workspace ws;
  float out[2];
  const std::vector<index_t> beyond{3};
  SV_CHECK_THROWS(errc::invalid_argument, "raters[0]",
                  gravity_table(g, beyond, visual_span{0, 2}, 3, out, ws));
  const std::vector<index_t> ok{2};
  SV_CHECK_THROWS(errc::shape_mismatch, "visual", gravity_table(g, ok, visual_span{0, 4}, 3, out, ws));
  float small[1];
  SV_CHECK_THROWS(errc::shape_mismatch, "out.size()", gravity_table(g, ok, visual_span{0, 2}, 3, small, ws));
  const std::vector<index_t> huge{0, 1, index_t{1} << 60};
  g.positions = huge;
  SV_CHECK_THROWS(errc::invalid_argument, "gravity.positions[2]",
                  gravity_table(g, ok, visual_span{0, 2}, 3, out, ws));
}
