// A toy decoder for the session tests (test_session.cpp, test_session_spans.cpp):
// a few layers whose attention is recomputed from the hidden states they are
// given, so that a multi-layer prefill runs on the compacted sequences as a real
// decoder would.
#pragma once

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include "test_util.hpp"

namespace svt_toy {

using sparsevlm::index_t;

constexpr index_t kDim = 16, kHeads = 2, kHeadDim = kDim / kHeads, kLayers = 7;

/// A 7-layer toy decoder: layer l maps X [n, d] to X + tanh(mean_h(A_l) X W_o),
/// with A_l the causal softmax of (X W_q)(X W_k)ᵀ / sqrt(dh) per head. Weights
/// are fixed by the seed; nothing depends on the token count, so the layers run
/// on the compacted sequences as a real decoder would.
struct toy_model {
  std::vector<float> wq, wk, wv, wo;  // [layers, d, d] each

  explicit toy_model(unsigned seed) {
    std::mt19937 g(seed);
    const auto n = static_cast<std::size_t>(kLayers * kDim * kDim);
    wq = svt::random_floats(g, n, -0.6f, 0.6f);
    wk = svt::random_floats(g, n, -0.6f, 0.6f);
    wv = svt::random_floats(g, n, -0.5f, 0.5f);
    wo = svt::random_floats(g, n, -0.4f, 0.4f);
  }

  /// X [n, d] times layer l's W [d, d].
  static std::vector<float> mul(const std::vector<float>& X, index_t n, const std::vector<float>& w,
                                index_t l) {
    std::vector<float> out(static_cast<std::size_t>(n * kDim));
    for (index_t t = 0; t < n; ++t)
      for (index_t c = 0; c < kDim; ++c) {
        double acc = 0.0;
        for (index_t k = 0; k < kDim; ++k)
          acc += static_cast<double>(X[static_cast<std::size_t>(t * kDim + k)]) *
                 w[static_cast<std::size_t>((l * kDim + k) * kDim + c)];
        out[static_cast<std::size_t>(t * kDim + c)] = static_cast<float>(acc);
      }
    return out;
  }

  /// [n, d] projections seen as [H, n, dh] (head h is columns h·dh …).
  static std::vector<float> heads_major(const std::vector<float>& P, index_t n) {
    std::vector<float> out(P.size());
    for (index_t h = 0; h < kHeads; ++h)
      for (index_t t = 0; t < n; ++t)
        for (index_t c = 0; c < kHeadDim; ++c)
          out[static_cast<std::size_t>((h * n + t) * kHeadDim + c)] =
              P[static_cast<std::size_t>(t * kDim + h * kHeadDim + c)];
    return out;
  }

  std::vector<float> queries(index_t l, const std::vector<float>& X, index_t n) const {
    return heads_major(mul(X, n, wq, l), n);
  }
  std::vector<float> keys(index_t l, const std::vector<float>& X, index_t n) const {
    return heads_major(mul(X, n, wk, l), n);
  }

  /// [H, n, n] causal attention probabilities of layer l.
  std::vector<float> attention(index_t l, const std::vector<float>& X, index_t n) const {
    const std::vector<float> q = queries(l, X, n), k = keys(l, X, n);
    std::vector<float> A(static_cast<std::size_t>(kHeads * n * n), 0.0f);
    const double scale = 1.0 / std::sqrt(static_cast<double>(kHeadDim));
    std::vector<double> logit(static_cast<std::size_t>(n));
    for (index_t h = 0; h < kHeads; ++h)
      for (index_t t = 0; t < n; ++t) {
        double mx = -1e300;
        for (index_t u = 0; u <= t; ++u) {
          double acc = 0.0;
          for (index_t c = 0; c < kHeadDim; ++c)
            acc += static_cast<double>(q[static_cast<std::size_t>((h * n + t) * kHeadDim + c)]) *
                   k[static_cast<std::size_t>((h * n + u) * kHeadDim + c)];
          logit[static_cast<std::size_t>(u)] = acc * scale;
          mx = std::max(mx, acc * scale);
        }
        double sum = 0.0;
        for (index_t u = 0; u <= t; ++u) sum += std::exp(logit[static_cast<std::size_t>(u)] - mx);
        for (index_t u = 0; u <= t; ++u)
          A[static_cast<std::size_t>((h * n + t) * n + u)] =
              static_cast<float>(std::exp(logit[static_cast<std::size_t>(u)] - mx) / sum);
      }
    return A;
  }

  /// The layer's output hidden states.
  std::vector<float> forward(index_t l, const std::vector<float>& X, index_t n,
                             const std::vector<float>& A) const {
    std::vector<float> mixed(static_cast<std::size_t>(n * kDim), 0.0f);
    for (index_t t = 0; t < n; ++t)
      for (index_t c = 0; c < kDim; ++c) {
        double acc = 0.0;
        for (index_t h = 0; h < kHeads; ++h)
          for (index_t u = 0; u <= t; ++u)
            acc += static_cast<double>(A[static_cast<std::size_t>((h * n + t) * n + u)]) *
                   X[static_cast<std::size_t>(u * kDim + c)];
        mixed[static_cast<std::size_t>(t * kDim + c)] = static_cast<float>(acc / kHeads);
      }
    const std::vector<float> o = mul(mixed, n, wo, l);
    std::vector<float> out(X.begin(), X.begin() + n * kDim);
    for (std::size_t i = 0; i < out.size(); ++i) out[i] += std::tanh(o[i]);
    return out;
  }
};

}  // namespace svt_toy
