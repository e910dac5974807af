"""Tensor-parallel scoring across processes: torch.distributed (gloo, loopback),
heads split over the ranks, one all-reduce, the same decisions as one process."""
import json
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import sparsevlm as sv  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples" / "python"))
import tp_demo  # noqa: E402

from test_package import case_dirs, load_case  # noqa: E402


def test_options_pickle():
    o = sv.StepOptions(policy=sv.KeepPolicy.rank(9.0, 6.0),
                       recycle=sv.RecycleOptions(enabled=False, fraction=0.5, cluster_divisor=4.0),
                       top_heads=14, gravity=sv.RopeGravity(enabled=True, head_dim=128))
    p = pickle.loads(pickle.dumps(o))
    assert (p.policy.kind, p.policy.scale, p.policy.bias) == ("rank", 9.0, 6.0)
    assert (p.recycle.enabled, p.recycle.fraction, p.recycle.cluster_divisor) == (False, 0.5, 4.0)
    assert p.top_heads == 14 and p.gravity.enabled and p.gravity.head_dim == 128
    f = pickle.loads(pickle.dumps(sv.KeepPolicy.fixed(64)))
    assert (f.kind, f.keep) == ("fixed", 64)


def test_one_rank_is_the_step():
    # World 1: the head sums of every head, finished, are prune_step bit for bit.
    for case in case_dirs:
        c, a, opts, visual = load_case(case)
        raters = c.get("raters") or sv.select_raters(a["embeds"], visual).tolist()
        p = sv.partial_relevance(raters, visual, attn_local=a["attn"])
        assert p.shape == (len(raters), visual[1]) and p.dtype == np.float32
        r = sv.prune_step_from_head_sums(p, a["attn"].shape[0], a["hidden"], visual, raters, opts)
        one = sv.prune_step(a["hidden"], visual, attn=a["attn"], raters=raters, options=opts)
        assert np.array_equal(r.scores, one.scores) and r.keep.tolist() == one.keep.tolist()
        assert r.clusters == one.clusters and np.array_equal(r.merged, one.merged)


def test_head_sums_refuse_per_head_options():
    c, a, opts, visual = load_case(case_dirs[0])
    raters = c.get("raters") or sv.select_raters(a["embeds"], visual).tolist()
    p = sv.partial_relevance(raters, visual, attn_local=a["attn"])
    with pytest.raises(sv.Error, match=r"top_heads"):
        sv.prune_step_from_head_sums(p, a["attn"].shape[0], a["hidden"], visual, raters,
                                     sv.StepOptions(top_heads=2))
    with pytest.raises(sv.Error, match=r"P_sum"):
        sv.prune_step_from_head_sums(p[:, 1:], a["attn"].shape[0], a["hidden"], visual, raters)


def test_two_processes_decide_as_one(tmp_path):
    out = tmp_path / "tp.jsonl"
    args = ["--world", "2", "--out", str(out)] + sum((["--case", str(c)] for c in case_dirs), [])
    assert tp_demo.main(args) == 0
    lines = [json.loads(l) for l in out.read_text().splitlines()]
    assert len(lines) == len(case_dirs)
    for rec in lines:
        assert rec["same_decisions"] and rec["merged_close"], rec
        assert rec["heads_per_rank"][0][1] == rec["heads_per_rank"][1][0]  # heads split in two


def test_two_processes_synthetic_llava_step(tmp_path):
    out = tmp_path / "tp.jsonl"
    assert tp_demo.main(["--world", "2", "--out", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert rec["heads"] == 32 and rec["allreduce_floats"] == rec["raters"] * 576
    assert rec["same_decisions"]
