// See cuda_data.hpp.
#include "cuda_data.hpp"

#include "common.hpp"

namespace sparsevlm::bench::gpu {

std::vector<shape> shapes() {
  std::vector<shape> out;
  for (const auto& s : bench::shapes) out.push_back({s.name, s.heads, s.prefix, s.n_visual, s.n_text, s.dim});
  return out;
}

step make_step(const shape& s) {
  step out;
  out.sh = s;
  const index_t L = s.length(), d = s.dim, T = s.n_text, first_text = s.prefix + s.n_visual;
  out.embeds.resize(static_cast<std::size_t>(L * d));
  out.hidden.resize(static_cast<std::size_t>(L * d));
  out.attn_text.assign(static_cast<std::size_t>(s.heads * T * L), 0.0f);
  examples::synthetic_step g;
  g.heads = s.heads;
  g.prefix = s.prefix;
  g.n_visual = s.n_visual;
  g.n_text = s.n_text;
  g.dim = s.dim;
  const auto rows = [d](std::vector<float>& dst) {
    return [&dst, d](index_t t, const float* row) { std::copy(row, row + d, dst.begin() + t * d); };
  };
  examples::generate(2410, g, false, rows(out.embeds), rows(out.hidden),
                     [&](index_t h, index_t t, const float* row) {
                       std::copy(row, row + t + 1,
                                 out.attn_text.begin() + (h * T + (t - first_text)) * L);
                     });
  return out;
}

std::string cpu_label(const step& s) {
  const bench::step_data<float>& data = bench::data_for<float>(
      bench::shape{s.sh.name.c_str(), s.sh.heads, s.sh.prefix, s.sh.n_visual, s.sh.n_text, s.sh.dim});
  const step_result r = prune_step(data.inputs(), bench::options());
  std::int64_t rec = 0;
  for (const auto& c : r.recycled.clusters) rec += static_cast<std::int64_t>(c.size());
  return "cpu: R" + std::to_string(r.raters.size()) + " rank" + std::to_string(r.rank) + " keep" +
         std::to_string(r.keep_count) + " rec" + std::to_string(rec) + "/" +
         std::to_string(r.recycled.clusters.size());
}

}  // namespace sparsevlm::bench::gpu
