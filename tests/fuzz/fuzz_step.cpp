// Arbitrary shapes, options and values into prune_step. Each run must either
// throw sparsevlm::error or return a result that keeps the spec's invariants.
// Covers both input forms (attention, and q/k with or without an LSE) and the
// scoring options (head selection, RoPE gravity).
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <set>
#include <vector>
#include <sparsevlm/sparsevlm.hpp>

namespace {

struct reader {
  const std::uint8_t* p;
  std::size_t n;
  std::uint8_t byte() {
    if (n == 0) return 0;
    --n;
    return *p++;
  }
  float value() {
    // Mostly tame values, sometimes raw bit patterns (NaN, Inf, subnormals).
    const std::uint8_t mode = byte();
    if (mode < 200) return static_cast<float>(byte()) / 255.0f;
    std::uint32_t u = 0;
    for (int i = 0; i < 4; ++i) u = (u << 8) | byte();
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
  }
};

void check(bool ok) {
  if (!ok) std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using namespace sparsevlm;
  reader rd{data, size};
  const index_t H = 1 + rd.byte() % 3;
  const index_t L = rd.byte() % 24;
  const index_t S = static_cast<index_t>(rd.byte() % 8) - 1;  // may be -1: invalid
  const index_t N = rd.byte() % 20;
  const index_t d = rd.byte() % 6;
  step_options opt;
  const std::uint8_t pk = rd.byte();
  if (pk & 1) {
    opt.policy = keep_policy::fixed(static_cast<index_t>(rd.byte()) - 4);
  } else {
    opt.policy = keep_policy::rank(static_cast<double>(rd.byte()) / 16.0, static_cast<double>(rd.byte()) - 128.0);
  }
  opt.recycle.enabled = (pk & 2) != 0;
  opt.recycle.fraction = static_cast<double>(rd.byte()) / 200.0;
  opt.recycle.cluster_divisor = 0.5 + static_cast<double>(rd.byte()) / 8.0;
  // Scoring options: sometimes head selection (possibly out of range) and gravity.
  const std::uint8_t so = rd.byte();
  if (so & 1) opt.scoring.top_heads = static_cast<index_t>(rd.byte() % (H + 2));
  std::vector<index_t> positions;
  if (so & 2) {
    opt.scoring.gravity.enabled = true;
    opt.scoring.gravity.head_dim = static_cast<index_t>(rd.byte() % 6);
    opt.scoring.gravity.rotary_dim = static_cast<index_t>(rd.byte() % 6);
    opt.scoring.gravity.base = 1.0 + static_cast<double>(rd.byte()) * 100.0;
    opt.scoring.gravity.min_ratio = static_cast<double>(rd.byte()) / 128.0;
    if (so & 4) {
      for (index_t u = 0; u < L; ++u) positions.push_back(static_cast<index_t>(rd.byte()) * (so & 8 ? 100000 : 1));
      opt.scoring.gravity.positions = positions;
    }
  }
  const bool from_qk = (so & 16) != 0;
  const index_t Hkv = 1 + rd.byte() % 3;
  const index_t dh = rd.byte() % 4;
  const index_t Lq = (so & 32) ? static_cast<index_t>(rd.byte() % 24) : L;
  std::vector<float> embeds(static_cast<std::size_t>(L * d)), hidden(embeds.size()),
      attn(static_cast<std::size_t>(from_qk ? 0 : H * L * L)),
      q(static_cast<std::size_t>(from_qk ? H * Lq * dh : 0)),
      k(static_cast<std::size_t>(from_qk ? Hkv * L * dh : 0)),
      lse(static_cast<std::size_t>((from_qk && (so & 64)) ? H * Lq : 0));
  for (float& v : embeds) v = rd.value();
  for (float& v : hidden) v = rd.value();
  for (float& v : attn) v = rd.value();
  for (float& v : q) v = rd.value() * 4.0f - 2.0f;
  for (float& v : k) v = rd.value() * 4.0f - 2.0f;
  for (float& v : lse) v = rd.value() * 8.0f;
  try {
    step_result r;
    if (from_qk) {
      qk_view<float, float> qk{tensor3_view<const float>(q.data(), {H, Lq, dh}),
                               tensor3_view<const float>(k.data(), {Hkv, L, dh}), std::nullopt,
                               static_cast<double>(rd.byte() % 3) / 2.0};
      if (!lse.empty()) qk.lse = matrix_view<const float>(lse.data(), {H, Lq});
      step_inputs_qk<float, float, float, float> in{matrix_view<const float>(embeds.data(), {L, d}), qk,
                                                    matrix_view<const float>(hidden.data(), {L, d}),
                                                    visual_span{S, N}, std::nullopt};
      r = prune_step(in, opt);
    } else {
      step_inputs<float, float, float> in{matrix_view<const float>(embeds.data(), {L, d}),
                                          tensor3_view<const float>(attn.data(), {H, L, L}),
                                          matrix_view<const float>(hidden.data(), {L, d}),
                                          visual_span{S, N}, std::nullopt};
      r = prune_step(in, opt);
    }
    check(r.keep_count >= 0 && r.keep_count <= N);
    check(static_cast<index_t>(r.keep.size()) == r.keep_count);
    for (std::size_t i = 0; i < r.keep.size(); ++i) {
      check(r.keep[i] >= S && r.keep[i] < S + N);
      check(i == 0 || r.keep[i] > r.keep[i - 1]);
    }
    std::set<index_t> seen(r.keep.begin(), r.keep.end());
    for (const auto& cl : r.recycled.clusters) {
      check(!cl.empty());
      for (index_t p : cl) check(p >= S && p < S + N && seen.insert(p).second);
    }
    const index_t c = static_cast<index_t>(r.recycled.clusters.size());
    check(static_cast<index_t>(r.sequence.size()) == L - N + r.keep_count + c);
    for (float v : r.recycled.merged) check(std::isfinite(v));
  } catch (const error&) {
  }
  return 0;
}
