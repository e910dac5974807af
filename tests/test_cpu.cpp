// cpu/: the kernel tables and their run-time selection. Every instruction set
// this machine supports is compiled into the test binary
// (sparsevlm_add_isa_kernels), and each must give the scalar path's bits.
#include <array>
#include <cstring>
#include <filesystem>
#include <sparsevlm/io/case.hpp>

#include "test_util.hpp"

namespace cpu = sparsevlm::cpu;
namespace io = sparsevlm::io;
namespace fs = std::filesystem;
using sparsevlm::index_t;

namespace {

/// The instruction sets other than scalar that can run here.
std::vector<cpu::isa> simd_paths() {
  std::vector<cpu::isa> out;
  for (cpu::isa i : {cpu::isa::avx2, cpu::isa::avx512})
    if (cpu::isa_available(i)) out.push_back(i);
  return out;
}

using svt::same_bits;

/// Random floats over many binades, with signed zeros and float32 subnormals.
std::vector<float> wild_floats(std::mt19937& g, std::size_t n) {
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::uniform_int_distribution<int> e(-30, 8), pick(0, 19);
  std::vector<float> v(n);
  for (float& x : v) {
    const int p = pick(g);
    x = p == 0 ? -0.0f : p == 1 ? 1e-40f * u(g) : std::ldexp(u(g), e(g));
  }
  return v;
}

}  // namespace

TEST_CASE("cpu: selection, availability and forcing") {
  CHECK(cpu::isa_available(cpu::isa::scalar));
  CHECK(cpu::isa_supported(cpu::isa::scalar));
  // The test binary compiles every set in: what the CPU supports is available.
  for (cpu::isa i : {cpu::isa::avx2, cpu::isa::avx512}) {
    CHECK(cpu::isa_available(i) == cpu::isa_supported(i));
    if (!cpu::isa_supported(i)) MESSAGE(cpu::isa_name(i), " is not supported here: its path is not tested");
  }
  CHECK_FALSE(cpu::isa_available(static_cast<cpu::isa>(7)));
  SV_CHECK_THROWS(sparsevlm::errc::invalid_argument, "isa", cpu::force_isa(static_cast<cpu::isa>(7)));
  const cpu::isa best = cpu::best_isa();
  CHECK(cpu::active_isa() == best);
  {
    cpu::scoped_isa s(cpu::isa::scalar);
    CHECK(cpu::active_isa() == cpu::isa::scalar);
    CHECK(cpu::detail::kernels().id == cpu::isa::scalar);
  }
  CHECK(cpu::active_isa() == best);
  for (cpu::isa i : simd_paths()) {
    cpu::scoped_isa s(i);
    CHECK(cpu::detail::kernels().id == i);
  }
}

TEST_CASE("cpu: the compiled tables record how their units were built") {
  CHECK(cpu::detail::compiled_kernels(static_cast<cpu::isa>(7)) == nullptr);
  CHECK(cpu::detail::compiled_kernels(static_cast<cpu::isa>(-1)) == nullptr);
  REQUIRE(cpu::detail::compiled_kernels(cpu::isa::scalar) != nullptr);
  CHECK_FALSE(cpu::detail::compiled_kernels(cpu::isa::scalar)->build.known);
  constexpr cpu::unit_build here = SPARSEVLM_THIS_UNIT_BUILD;
  CHECK(here.known);
  CHECK_FALSE(here.optimize_size);
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  // The test binary compiles both sets in (sparsevlm_add_isa_kernels), with the
  // flags of this unit's build type: never for size.
  for (cpu::isa i : {cpu::isa::avx2, cpu::isa::avx512}) {
    const cpu::detail::kernel_table* t = cpu::detail::compiled_kernels(i);
    REQUIRE(t != nullptr);
    CHECK(t->id == i);
    CHECK(t->build.known);
    CHECK(t->build.optimize == here.optimize);
    CHECK_FALSE(t->build.optimize_size);
  }
#endif
}

TEST_CASE("cpu: dot_rows gives the scalar bits on every path, and is a dot product") {
  std::mt19937 g(11);
  const cpu::detail::kernel_table& ref = cpu::detail::scalar::table;
  for (index_t d : {1, 2, 7, 8, 15, 16, 17, 31, 32, 33, 100, 257, 4096}) {
    for (index_t na : {1, 3, 4, 9}) {
      for (index_t nb : {1, 2, 5, 8}) {
        INFO("d=", d, " na=", na, " nb=", nb);
        const index_t lda = d + 3, ldb = d + 1;  // rows need not be packed
        const auto a = wild_floats(g, static_cast<std::size_t>(na * lda));
        const auto b = wild_floats(g, static_cast<std::size_t>(nb * ldb));
        std::vector<float> want(static_cast<std::size_t>(na * nb));
        ref.dot_rows(a.data(), lda, na, b.data(), ldb, nb, d, want.data(), nb);
        for (index_t i = 0; i < na; ++i)
          for (index_t t = 0; t < nb; ++t) {
            long double exact = 0, mag = 0;
            for (index_t k = 0; k < d; ++k) {
              const long double p = static_cast<long double>(a[static_cast<std::size_t>(i * lda + k)]) *
                                    b[static_cast<std::size_t>(t * ldb + k)];
              exact += p;
              mag += std::fabs(p);
            }
            CHECK(std::fabs(static_cast<long double>(want[static_cast<std::size_t>(i * nb + t)]) - exact) <=
                  mag * 1e-6L + 1e-37L);
          }
        for (cpu::isa p : simd_paths()) {
          cpu::scoped_isa s(p);
          std::vector<float> got(want.size(), 123.0f);
          cpu::detail::kernels().dot_rows(a.data(), lda, na, b.data(), ldb, nb, d, got.data(), nb);
          CHECK_MESSAGE(same_bits(got, want), std::string(cpu::isa_name(p)));
        }
      }
    }
  }
  // Past the cache blocks: more than 64 b rows, several depth blocks and a
  // ragged last one, an output with its own stride.
  for (const auto& [na, nb, d] : {std::array<index_t, 3>{13, 70, 530}, {7, 129, 1000}, {1, 65, 257}}) {
    INFO("na=", na, " nb=", nb, " d=", d);
    const auto a = wild_floats(g, static_cast<std::size_t>(na * d));
    const auto b = wild_floats(g, static_cast<std::size_t>(nb * d));
    const index_t ldo = nb + 2;
    std::vector<float> want(static_cast<std::size_t>(na * ldo), -1.0f);
    ref.dot_rows(a.data(), d, na, b.data(), d, nb, d, want.data(), ldo);
    for (cpu::isa p : simd_paths()) {
      cpu::scoped_isa s(p);
      std::vector<float> got(want.size(), -1.0f);
      cpu::detail::kernels().dot_rows(a.data(), d, na, b.data(), d, nb, d, got.data(), ldo);
      CHECK_MESSAGE(same_bits(got, want), std::string(cpu::isa_name(p)));
    }
  }
}

TEST_CASE("cpu: gram_f64 gives the scalar bits, is symmetric, and duplicates give equal entries") {
  std::mt19937 g(12);
  for (index_t d : {1, 5, 8, 9, 64, 300, 1000}) {
    for (index_t n : {1, 2, 3, 5, 9, 13, 50, 101}) {
      INFO("d=", d, " n=", n);
      auto x = wild_floats(g, static_cast<std::size_t>(n * d));
      if (n >= 3)  // row 2 duplicates row 0
        std::copy(x.begin(), x.begin() + d, x.begin() + 2 * d);
      std::vector<double> want(static_cast<std::size_t>(n * n));
      cpu::detail::scalar::table.gram_f64(x.data(), d, n, d, want.data());
      for (index_t i = 0; i < n; ++i)
        for (index_t j = 0; j < n; ++j)
          CHECK(want[static_cast<std::size_t>(i * n + j)] == want[static_cast<std::size_t>(j * n + i)]);
      if (n >= 3) {  // ‖x0 − x2‖² from the Gram entries is exactly 0
        CHECK(want[0] + want[static_cast<std::size_t>(2 * n + 2)] - 2.0 * want[2] == 0.0);
      }
      for (cpu::isa p : simd_paths()) {
        cpu::scoped_isa s(p);
        std::vector<double> got(want.size(), 7.0);
        cpu::detail::kernels().gram_f64(x.data(), d, n, d, got.data());
        CHECK_MESSAGE(same_bits(got, want), std::string(cpu::isa_name(p)));
      }
    }
  }
}

TEST_CASE("cpu: conversions and row sums are exact for every 16-bit pattern") {
  std::vector<std::uint16_t> bits(65536 + 5);  // + 5: a ragged tail
  for (std::size_t i = 0; i < bits.size(); ++i) bits[i] = static_cast<std::uint16_t>(i * 40503u);
  const auto n = static_cast<index_t>(bits.size());
  std::vector<float> base(bits.size());
  std::mt19937 g(13);
  for (float& x : base) x = std::uniform_real_distribution<float>(-2.0f, 2.0f)(g);
  for (cpu::isa p : simd_paths()) {
    cpu::scoped_isa s(p);
    const cpu::detail::kernel_table& k = cpu::detail::kernels();
    std::vector<float> h(bits.size()), b(bits.size());
    k.cvt_f16(h.data(), bits.data(), n);
    k.cvt_bf16(b.data(), bits.data(), n);
    std::vector<float> ah = base, ab = base, af = base;
    k.add_f16(ah.data(), bits.data(), n);
    k.add_bf16(ab.data(), bits.data(), n);
    k.add_f32(af.data(), b.data(), n);
    std::size_t bad = 0;
    for (std::size_t i = 0; i < bits.size(); ++i) {
      const float wh = sparsevlm::to_float(sparsevlm::half{bits[i]});
      const float wb = sparsevlm::to_float(sparsevlm::bfloat16{bits[i]});
      const auto same = [](float x, float y) {
        return (std::isnan(x) && std::isnan(y)) || std::memcmp(&x, &y, sizeof x) == 0;
      };
      if (!same(h[i], wh) || !same(b[i], wb) || !same(ah[i], base[i] + wh) ||
          !same(ab[i], base[i] + wb) || !same(af[i], base[i] + wb))
        ++bad;
    }
    CHECK_MESSAGE(bad == 0, std::string(cpu::isa_name(p)));
  }
}

namespace {

struct rand_step {
  index_t S, N, T, H, d, dh, L;
  std::vector<float> embeds, attn, hidden, q, k;
};

rand_step make_step(std::mt19937& g) {
  rand_step c{};
  c.S = svt::rand_int(g, 0, 4);
  c.N = svt::rand_int(g, 1, 70);
  c.T = svt::rand_int(g, 0, 12);
  c.H = svt::rand_int(g, 1, 4);
  c.d = svt::rand_int(g, 1, 40);
  c.dh = svt::rand_int(g, 1, 20);
  c.L = c.S + c.N + c.T;
  c.embeds = svt::random_floats(g, static_cast<std::size_t>(c.L * c.d), -1.0f, 1.0f);
  c.attn = svt::random_floats(g, static_cast<std::size_t>(c.H * c.L * c.L), 0.0f, 1.0f);
  c.hidden = svt::random_floats(g, static_cast<std::size_t>(c.L * c.d), -2.0f, 2.0f);
  c.q = svt::random_floats(g, static_cast<std::size_t>(c.H * c.L * c.dh), -1.0f, 1.0f);
  c.k = svt::random_floats(g, static_cast<std::size_t>(c.H * c.L * c.dh), -1.0f, 1.0f);
  return c;
}

template <class T>
sparsevlm::step_result run(const rand_step& c, const std::vector<T>& e, const std::vector<T>& a,
                           const std::vector<T>& h, const sparsevlm::step_options& o, bool qk) {
  using namespace sparsevlm;
  matrix_view<const T> ev(e.data(), {c.L, c.d}, "embeds");
  matrix_view<const T> hv(h.data(), {c.L, c.d}, "hidden");
  if (qk) {
    step_inputs_qk<T, float, float, T> in{
        ev,
        {tensor3_view<const float>(c.q.data(), {c.H, c.L, c.dh}, "q"),
         tensor3_view<const float>(c.k.data(), {c.H, c.L, c.dh}, "k"), std::nullopt, 0.0},
        hv, visual_span{c.S, c.N}, std::nullopt};
    return prune_step(in, o);
  }
  step_inputs<T, T, T> in{ev, tensor3_view<const T>(a.data(), {c.H, c.L, c.L}, "attn"), hv,
                          visual_span{c.S, c.N}, std::nullopt};
  return prune_step(in, o);
}

bool identical(const sparsevlm::step_result& x, const sparsevlm::step_result& y) {
  return x.raters == y.raters && same_bits(x.scores, y.scores) && x.rank == y.rank &&
         x.keep_count == y.keep_count && x.keep == y.keep &&
         x.recycled.clusters == y.recycled.clusters && same_bits(x.recycled.merged, y.recycled.merged) &&
         x.sequence == y.sequence;
}

template <class T>
void check_paths(const rand_step& c, const sparsevlm::step_options& o, bool qk) {
  const auto e = svt::convert<T>(c.embeds), a = svt::convert<T>(c.attn), h = svt::convert<T>(c.hidden);
  sparsevlm::step_result want;
  {
    cpu::scoped_isa s(cpu::isa::scalar);
    want = run<T>(c, e, a, h, o, qk);
  }
  for (cpu::isa p : simd_paths()) {
    cpu::scoped_isa s(p);
    CHECK_MESSAGE(identical(run<T>(c, e, a, h, o, qk), want), std::string(cpu::isa_name(p)));
  }
}

}  // namespace

TEST_CASE("cpu: random steps decide bit for bit alike on every instruction set") {
  std::mt19937 g(2026);
  if (simd_paths().empty()) MESSAGE("no SIMD path on this machine: only scalar runs");
  sparsevlm::step_options o;
  o.policy = sparsevlm::keep_policy::rank(0.7, 1.0);
  o.recycle.fraction = 0.6;
  o.recycle.cluster_divisor = 3.0;
  int pruned = 0;
  for (int it = 0; it < 40; ++it) {
    const rand_step c = make_step(g);
    INFO("it=", it, " S=", c.S, " N=", c.N, " T=", c.T, " H=", c.H, " d=", c.d);
    check_paths<float>(c, o, false);
    check_paths<sparsevlm::half>(c, o, false);
    check_paths<sparsevlm::bfloat16>(c, o, false);
    check_paths<float>(c, o, true);
    {
      cpu::scoped_isa s(cpu::isa::scalar);
      const auto r = run<float>(c, c.embeds, c.attn, c.hidden, o, false);
      if (r.keep_count < c.N && !r.recycled.clusters.empty()) ++pruned;
    }
  }
  CHECK(pruned >= 10);  // the draws exercise pruning and recycling
}

TEST_CASE("cpu: every shared case agrees with its expected result on every instruction set") {
  const std::vector<fs::path> cases = svt::shared_case_dirs();
  if (cases.empty()) return;
  std::vector<cpu::isa> paths = simd_paths();
  paths.insert(paths.begin(), cpu::isa::scalar);
  for (cpu::isa p : paths) {
    cpu::scoped_isa s(p);
    sparsevlm::workspace ws;
    for (const auto& c : cases) {
      INFO("case ", c.filename().string(), " on ", std::string(cpu::isa_name(p)));
      const io::case_data data = io::load_case(c);
      const io::expected_result e = io::read_expected(c / "expected");
      auto diffs = io::compare(io::run_case(data, ws), e);
      CHECK_MESSAGE(diffs.empty(), (diffs.empty() ? std::string() : diffs.front()));
      if (fs::exists(c / "q.npy") && fs::exists(c / "k.npy")) {
        diffs = io::compare(io::run_case(data, ws, io::scores_source::qk), e);
        CHECK_MESSAGE(diffs.empty(), (diffs.empty() ? std::string() : diffs.front()));
      }
    }
  }
}

TEST_CASE("cpu: exp_f64 gives the scalar bits on every path and is within 2 ulp of exp") {
  std::mt19937 g(14);
  std::vector<double> x;
  for (double v = -750.0; v <= 712.0; v += 0.37) x.push_back(v);  // both range ends
  std::uniform_real_distribution<double> u(-40.0, 0.0), w(-1e-3, 1e-3);
  for (int i = 0; i < 20000; ++i) x.push_back(i % 2 ? u(g) : w(g));  // softmax's range
  for (double v : {0.0, -0.0, 1e-300, -1e-300, 709.78, -708.4, -745.1, -745.2,
                   std::numeric_limits<double>::infinity(), -std::numeric_limits<double>::infinity(),
                   std::numeric_limits<double>::quiet_NaN()})
    x.push_back(v);
  x.push_back(0.5);  // a ragged tail for every register width
  std::vector<double> want = x;
  cpu::detail::scalar::table.exp_f64(want.data(), static_cast<index_t>(want.size()));
  int far = 0;
  for (std::size_t i = 0; i < x.size(); ++i) {
    const double e = std::exp(x[i]);
    if (std::isnan(x[i])) {
      CHECK(std::isnan(want[i]));
    } else if (std::isinf(e)) {
      CHECK(want[i] == e);
    } else if (e >= std::numeric_limits<double>::min()) {
      if (std::fabs(want[i] - e) > 4.5e-16 * e) ++far;  // 2 ulp
    } else {
      CHECK(std::fabs(want[i] - e) <= std::numeric_limits<double>::denorm_min() * 2);
    }
  }
  CHECK(far == 0);
  for (cpu::isa p : simd_paths()) {
    cpu::scoped_isa s(p);
    std::vector<double> got = x;
    cpu::detail::kernels().exp_f64(got.data(), static_cast<index_t>(got.size()));
    std::size_t bad = 0;
    for (std::size_t i = 0; i < x.size(); ++i)
      if (!(std::isnan(got[i]) && std::isnan(want[i])) && std::memcmp(&got[i], &want[i], 8) != 0) {
        ++bad;
        MESSAGE("x=", x[i], " got ", got[i], " want ", want[i]);
      }
    CHECK_MESSAGE(bad == 0, std::string(cpu::isa_name(p)));
  }
}
