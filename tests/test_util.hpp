// Helpers shared by the unit tests: random fills, element conversion, an error
// checker, and naive double-precision reimplementations of the spec's stages
// (written from shared/spec/case-format.md, not from the library's code).
#pragma once

#include <doctest/doctest.h>

#include <algorithm>
#include <filesystem>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <string_view>
#include <vector>

#include <sparsevlm/sparsevlm.hpp>

/// Checks that the expression throws sparsevlm::error with error code `code` and a
/// message containing `substr` (the argument it names). The expression goes last
/// so that commas inside it need no extra parentheses.
#define SV_CHECK_THROWS(sv_code_, sv_sub_, ...)                                             \
  do {                                                                                       \
    bool sv_thrown_ = false;                                                                 \
    try {                                                                                    \
      (void)(__VA_ARGS__);                                                                   \
    } catch (const ::sparsevlm::error& sv_e_) {                                              \
      sv_thrown_ = true;                                                                     \
      CHECK_MESSAGE(static_cast<int>(sv_e_.code()) == static_cast<int>(sv_code_), sv_e_.what()); \
      CHECK_MESSAGE(std::string_view(sv_e_.what()).find(sv_sub_) != std::string_view::npos,  \
                    "message '", std::string(sv_e_.what()), "' lacks '", std::string(sv_sub_), "'");                  \
    }                                                                                        \
    CHECK_MESSAGE(sv_thrown_, "no sparsevlm::error from: " #__VA_ARGS__);                   \
  } while (false)

namespace svt {

#ifdef SPARSEVLM_TEST_CASES_DIR
/// The spec case folders under SPARSEVLM_TEST_CASES_DIR, sorted; a failed check
/// when the folder exists but holds no case. A missing folder (a clone without
/// ../shared beside it, where the README's test command must still pass) gives a
/// MESSAGE naming it and no case: the tests over these folders then compare
/// nothing, which the MESSAGE reports; the device pipeline's tests (test_core.cpp)
/// also run the in-tree cases, so they always compare.
inline std::vector<std::filesystem::path> shared_case_dirs() {
  namespace fs = std::filesystem;
  const fs::path dir = SPARSEVLM_TEST_CASES_DIR;
  std::vector<fs::path> cases;
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) {
    MESSAGE("no case folder at ", dir.string(),
            " (CMake's SPARSEVLM_CASES_DIR, default ../shared/cases): its cases are skipped");
    return cases;
  }
  for (const auto& entry : fs::directory_iterator(dir))
    if (fs::exists(entry.path() / "case.json")) cases.push_back(entry.path());
  std::sort(cases.begin(), cases.end());
  CHECK_MESSAGE(!cases.empty(), "no case.json under ", dir.string());
  return cases;
}
#endif

using sparsevlm::index_t;

inline constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
inline constexpr float kNaNf = std::numeric_limits<float>::quiet_NaN();
inline constexpr float kInff = std::numeric_limits<float>::infinity();

/// Whether two vectors hold the same bytes (memcmp, which must not see the null
/// data of an empty vector).
template <class T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() &&
         (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0);
}

/// Checks that two step results decide the same: every list equal and the merged
/// rows bit for bit (they depend on the clusters only).
inline void check_same_decisions(const sparsevlm::step_result& a, const sparsevlm::step_result& b) {
  CHECK(a.raters == b.raters);
  CHECK(a.rank == b.rank);
  CHECK(a.keep_count == b.keep_count);
  CHECK(a.keep == b.keep);
  CHECK(a.recycled.clusters == b.recycled.clusters);
  CHECK(a.recycled.dim == b.recycled.dim);
  CHECK(a.sequence == b.sequence);
  CHECK(same_bits(a.recycled.merged, b.recycled.merged));
}

/// Checks that two step results are the same, scores and merged rows bit for bit.
inline void check_same_result(const sparsevlm::step_result& a, const sparsevlm::step_result& b) {
  check_same_decisions(a, b);
  CHECK(same_bits(a.scores, b.scores));
}

/// Uniform integer in [lo, hi].
inline index_t rand_int(std::mt19937& g, index_t lo, index_t hi) {
  return std::uniform_int_distribution<index_t>(lo, hi)(g);
}

/// Whether n elements at a and b have the same bits (n = 0: true, a and b unread).
template <class T>
bool same_bits(const T* a, const T* b, std::size_t n) {
  return n == 0 || std::memcmp(a, b, n * sizeof(T)) == 0;  // memcmp must not see null
}

inline std::vector<float> random_floats(std::mt19937& g, std::size_t n, float lo, float hi) {
  std::uniform_real_distribution<float> u(lo, hi);
  std::vector<float> v(n);
  for (float& x : v) x = u(g);
  return v;
}

/// Values k / denom with k uniform in [klo, khi]: exactly representable in float16
/// and bfloat16 when |k| < 256 and denom is a power of two (<= 8 significant bits).
inline std::vector<float> random_grid(std::mt19937& g, std::size_t n, int klo, int khi,
                                      float denom) {
  std::uniform_int_distribution<int> u(klo, khi);
  std::vector<float> v(n);
  for (float& x : v) x = static_cast<float>(u(g)) / denom;
  return v;
}

template <class T>
std::vector<T> convert(const std::vector<float>& v) {
  std::vector<T> out(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) out[i] = sparsevlm::from_float<T>(v[i]);
  return out;
}

/// Row-major [rows, cols] float matrix in doubles, read through to_float.
template <class T>
std::vector<double> to_double(sparsevlm::matrix_view<const T> m) {
  std::vector<double> out(static_cast<std::size_t>(m.extent(0) * m.extent(1)));
  for (index_t r = 0; r < m.extent(0); ++r)
    for (index_t c = 0; c < m.extent(1); ++c)
      out[static_cast<std::size_t>(r * m.extent(1) + c)] =
          static_cast<double>(sparsevlm::to_float(m(r, c)));
  return out;
}

/// Spec step 1 in double: returns m (one value per text token).
inline std::vector<double> ref_rater_means(const std::vector<double>& embeds, index_t d,
                                           index_t L, index_t S, index_t N) {
  const index_t T = L - S - N;
  std::vector<double> m(static_cast<std::size_t>(T), 0.0);
  for (index_t i = 0; i < N; ++i) {
    std::vector<double> logit(static_cast<std::size_t>(T));
    for (index_t t = 0; t < T; ++t) {
      double acc = 0.0;
      for (index_t c = 0; c < d; ++c)
        acc += embeds[static_cast<std::size_t>((S + i) * d + c)] *
               embeds[static_cast<std::size_t>((S + N + t) * d + c)];
      logit[static_cast<std::size_t>(t)] = acc;
    }
    const double mx = *std::max_element(logit.begin(), logit.end());
    double sum = 0.0;
    for (double l : logit) sum += std::exp(l - mx);
    for (index_t t = 0; t < T; ++t)
      m[static_cast<std::size_t>(t)] += std::exp(logit[static_cast<std::size_t>(t)] - mx) / sum;
  }
  for (double& v : m) v /= static_cast<double>(N);
  return m;
}

/// Spec steps 2-3 in double: score[j] = mean over raters of the head mean.
inline std::vector<double> ref_scores(const std::vector<double>& attn, index_t H, index_t L,
                                      const std::vector<index_t>& raters, index_t S, index_t N) {
  std::vector<double> s(static_cast<std::size_t>(N), 0.0);
  if (raters.empty()) return s;
  for (index_t j = 0; j < N; ++j) {
    double acc = 0.0;
    for (index_t r : raters)
      for (index_t h = 0; h < H; ++h)
        acc += attn[static_cast<std::size_t>((h * L + r) * L + S + j)];
    s[static_cast<std::size_t>(j)] =
        acc / static_cast<double>(H) / static_cast<double>(raters.size());
  }
  return s;
}

/// Indices 0..n-1 sorted by descending score, ties to the lower index.
template <class S>
std::vector<index_t> ranked(const std::vector<S>& scores) {
  std::vector<index_t> order(scores.size());
  std::iota(order.begin(), order.end(), index_t{0});
  std::stable_sort(order.begin(), order.end(), [&](index_t a, index_t b) {
    return scores[static_cast<std::size_t>(a)] > scores[static_cast<std::size_t>(b)];
  });
  return order;
}

/// DPC-KNN from the spec, naive: `x` is s rows of d doubles. Returns, per cluster
/// in the spec's order, the member indices (into x) ascending.
inline std::vector<std::vector<index_t>> ref_dpc_knn(const std::vector<double>& x, index_t s,
                                                     index_t d, index_t c) {
  const auto S = static_cast<std::size_t>(s);
  std::vector<double> D(S * S, 0.0);
  for (index_t i = 0; i < s; ++i)
    for (index_t j = i + 1; j < s; ++j) {
      double acc = 0.0;
      for (index_t t = 0; t < d; ++t) {
        const double diff = x[static_cast<std::size_t>(i * d + t)] - x[static_cast<std::size_t>(j * d + t)];
        acc += diff * diff;
      }
      const double v = std::sqrt(acc) / std::sqrt(static_cast<double>(d));
      D[static_cast<std::size_t>(i * s + j)] = v;
      D[static_cast<std::size_t>(j * s + i)] = v;
    }
  const double dmax = *std::max_element(D.begin(), D.end());
  std::vector<double> rho(S), gamma(S);
  for (index_t i = 0; i < s; ++i) {
    std::vector<double> row(D.begin() + i * s, D.begin() + (i + 1) * s);
    std::sort(row.begin(), row.end());  // canonical order: equal multisets, equal sums
    double sum = 0.0;
    for (index_t t = 0; t < c; ++t) sum += row[static_cast<std::size_t>(t)] * row[static_cast<std::size_t>(t)];
    rho[static_cast<std::size_t>(i)] = std::exp(-(sum / static_cast<double>(c)));
  }
  for (index_t i = 0; i < s; ++i) {
    double delta = dmax;
    for (index_t j = 0; j < s; ++j) {
      const double rj = rho[static_cast<std::size_t>(j)], ri = rho[static_cast<std::size_t>(i)];
      if (rj > ri || (rj == ri && j < i)) delta = std::min(delta, D[static_cast<std::size_t>(i * s + j)]);
    }
    gamma[static_cast<std::size_t>(i)] = rho[static_cast<std::size_t>(i)] * delta;
  }
  const std::vector<index_t> centres_all = ranked(gamma);
  const std::vector<index_t> centres(centres_all.begin(), centres_all.begin() + c);
  std::vector<std::vector<index_t>> clusters(static_cast<std::size_t>(c));
  for (index_t i = 0; i < s; ++i) {
    std::size_t best = 0;
    for (std::size_t q = 0; q < centres.size(); ++q) {
      if (centres[q] == i) {
        best = q;
        break;
      }
      if (D[static_cast<std::size_t>(i * s + centres[q])] <
          D[static_cast<std::size_t>(i * s + centres[best])])
        best = q;
    }
    clusters[best].push_back(i);
  }
  return clusters;
}

}  // namespace svt
