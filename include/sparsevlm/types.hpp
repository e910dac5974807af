// Plain options and results: what an engine holds between calls.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "view.hpp"

namespace sparsevlm {

/// How many visual tokens a step keeps (spec step 5).
struct keep_policy {
  enum class kind_t { rank, fixed };
  kind_t kind = kind_t::rank;
  double scale = 13.5;  ///< rank policy: keep = floor(rank * scale + bias)
  double bias = 0.0;
  index_t keep = 0;     ///< fixed policy: keep = min(keep, N - 1)

  /// The reference's rank-adaptive form. Authors' presets: (13.5, 0) for a
  /// 192-token budget, (9, 6) for 128, (0.8, 0) for 64; video uses (1, 0).
  static keep_policy rank(double scale, double bias) {
    return keep_policy{kind_t::rank, scale, bias, 0};
  }
  /// A fixed count, clamped to N - 1.
  static keep_policy fixed(index_t keep) { return keep_policy{kind_t::fixed, 0.0, 0.0, keep}; }
};

/// Token recycling (spec step 7).
struct recycle_options {
  bool enabled = true;
  double fraction = 0.3;         ///< 0 < fraction <= 1
  double cluster_divisor = 10.0;  ///< > 1
};

/// The RoPE attention-bias ("gravity") correction of SparseVLM+: the attention
/// is divided by the attention that all-ones queries and keys would get under
/// the layer's RoPE at the same positions, which removes the positional prior
/// (nearby keys look relevant because they are near). See gravity.hpp.
struct rope_gravity {
  bool enabled = false;
  index_t head_dim = 0;    ///< dh of the layer (required when enabled)
  index_t rotary_dim = 0;  ///< rotated dims; 0 means head_dim. Even.
  double base = 10000.0;   ///< RoPE theta: θ_i = base^(−2i/rotary_dim)
  double scale = 0.0;      ///< softmax scale; 0 means 1/sqrt(head_dim)
  /// Position id of every token [L] (1-D RoPE); empty means 0..L−1.
  std::span<const index_t> positions{};
  /// The guard: the bias probability is floored at min_ratio/(t+1) (a share of
  /// the uniform attention of row t) before dividing, so tokens that RoPE all but
  /// hides are amplified at most (t+1)/min_ratio times, never divided by zero.
  double min_ratio = 1e-3;
};

/// Options of the scoring stage (both the attention and the Q/K path).
struct score_options {
  /// 0 averages all H heads (the spec). k in [1, H] averages only the k heads
  /// with the largest total rater→visual attention (after the gravity correction
  /// when that is on), ties to the lower head; SparseVLM+ keeps 14 of 32, i.e.
  /// round(14·H/32) for other head counts (see top_heads_for).
  index_t top_heads = 0;
  rope_gravity gravity{};
};

/// SparseVLM+'s head count scaled to H heads: round(14·H / 32), at least 1.
inline index_t top_heads_for(index_t heads) {
  const index_t k = (14 * heads + 16) / 32;
  return k < 1 ? 1 : k;
}

struct step_options {
  keep_policy policy{};
  recycle_options recycle{};
  score_options scoring{};  ///< defaults: the spec's plain head mean
};

/// The recycled tokens of one step.
struct recycle_result {
  /// Each cluster's members as absolute positions, ascending; clusters in
  /// descending order of their centre's rho * delta.
  std::vector<std::vector<index_t>> clusters;
  /// Row-major [clusters.size(), dim] float32: row i is the mean of cluster i's
  /// hidden rows.
  std::vector<float> merged;
  index_t dim = 0;
};

/// Everything one pruning step decides (the spec's result, plus the scores).
struct step_result {
  std::vector<index_t> raters;  ///< absolute positions, ascending
  std::vector<float> scores;    ///< [N], one per visual token
  index_t rank = 0;
  index_t keep_count = 0;
  std::vector<index_t> keep;  ///< absolute positions, ascending
  recycle_result recycled;
  /// The new sequence as source positions; -(i + 1) stands for recycled token i.
  std::vector<index_t> sequence;
};

/// One span's part of a multi-span step.
struct span_part {
  visual_span visual;
  /// per_span: the numerical rank of this span's P (its R rows and N_i columns);
  /// global: -1 (only the union's rank is computed, spans_result::rank).
  index_t rank = -1;
  index_t keep_count = 0;
  std::vector<index_t> keep;  ///< absolute positions, ascending
  /// This span's clusters are spans_result::recycled.clusters[first_cluster,
  /// first_cluster + clusters) (and the same rows of `merged`).
  index_t first_cluster = 0;
  index_t clusters = 0;
};

/// Everything a multi-span step decides. With one span every field equals
/// prune_step's step_result (rank: in global mode).
struct spans_result {
  std::vector<index_t> raters;  ///< absolute positions after the last span, ascending
  std::vector<float> scores;    ///< one per visual token: span 0's, then span 1's, ...
  index_t rank = -1;            ///< global: rank of P over the union; per_span: -1
  index_t keep_count = 0;       ///< kept tokens over all spans
  std::vector<index_t> keep;    ///< every kept position, ascending
  /// Every span's clusters, span after span (each span's in the spec's order);
  /// merged row i is recycled token i. Clusters never cross spans.
  recycle_result recycled;
  std::vector<span_part> spans;  ///< one per span, in span order
  /// The new sequence as source positions; -(i + 1) stands for recycled token i
  /// (numbered across spans in sequence order), so apply_plan takes it as is.
  std::vector<index_t> sequence;
};

}  // namespace sparsevlm
