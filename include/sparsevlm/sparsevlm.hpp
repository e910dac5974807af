// sparsevlm: SparseVLM visual-token sparsification (arXiv 2410.04417), CPU API.
//
// One include gives every stage of a pruning step and their composition:
//   select_raters -> relevance_scores (or relevance_scores_qk) -> numerical_rank -> keep_count ->
//   select_keep -> recycle (dpc_knn) -> make_sequence -> apply_plan
// and prune_step, which runs them in order. See docs/algorithm.md. Tensor-parallel
// engines score per rank with partial_relevance and finish with
// prune_step_from_head_sums (docs/tensor-parallel.md).
#pragma once

#include "batch.hpp"
#include "config.hpp"
#include "core/math.hpp"
#include "dtype.hpp"
#include "error.hpp"
#include "gravity.hpp"
#include "keep_count.hpp"
#include "keep_set.hpp"
#include "kv_cache.hpp"
#include "plan.hpp"
#include "positions.hpp"
#include "presets.hpp"
#include "rank.hpp"
#include "raters.hpp"
#include "recycle.hpp"
#include "scores.hpp"
#include "scores_qk.hpp"
#include "session.hpp"
#include "spans.hpp"
#include "step.hpp"
#include "tensor_parallel.hpp"
#include "types.hpp"
#include "view.hpp"
#include "workspace.hpp"
