"""Tensor-parallel SparseVLM scoring with torch.distributed (gloo, on loopback).

Each of `--world` processes holds a contiguous block of the attention heads, as a
tensor-parallel engine shards them, and scores the visual tokens with its own
heads only (sparsevlm.partial_relevance: [R, N] head sums). One all-reduce of
R*N floats combines the partial sums; every rank then finishes the step
(sparsevlm.prune_step_from_head_sums) and reaches the same decisions. Rank 0
compares them with the single-process step (sparsevlm.prune_step) and prints
one JSON line per step. See docs/tensor-parallel.md.

    python examples/python/tp_demo.py                      # a synthetic LLaVA-1.5-shaped step
    python examples/python/tp_demo.py --case ../shared/cases/rank_recycle --world 2

Exit status 0 when every rank's decisions equal the single-process ones.
"""
import argparse
import json
import os
import socket
import tempfile
import sys

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import sparsevlm as sv

DECISIONS = ("raters", "rank", "keep_count", "keep", "clusters", "sequence")


def synthetic_step(seed=0, H=32, prefix=35, N=576, T=60, d=256):
    """A LLaVA-1.5-shaped step: random causal attention with a few salient patches."""
    rng = np.random.default_rng(seed)
    L = prefix + N + T
    logits = rng.standard_normal((H, L, L)).astype(np.float32)
    logits[:, :, prefix + rng.choice(N, 40, replace=False)] += 2.0  # what the question looks at
    logits += np.triu(np.full((L, L), -np.inf, np.float32), 1)
    attn = np.exp(logits - logits.max(-1, keepdims=True))
    attn /= attn.sum(-1, keepdims=True)
    embeds = rng.standard_normal((L, d)).astype(np.float32)
    hidden = rng.standard_normal((L, d)).astype(np.float32)
    opts = sv.StepOptions(policy=sv.KeepPolicy.rank(13.5, 0.0))
    return {"name": "synthetic", "attn": attn, "embeds": embeds, "hidden": hidden,
            "visual": (prefix, N), "raters": None, "options": opts}


def case_step(case_dir):
    """A spec case folder (../shared/spec/case-format.md) as a step."""
    c = sv.load_case(case_dir)
    f32 = {k: np.asarray(c[k], np.float32) for k in ("attn", "embeds", "hidden")}
    return {"name": c["name"], **f32, "visual": c["visual"], "raters": c["raters"],
            "options": c["options"]}


def decisions(r):
    return {"raters": r.raters.tolist(), "rank": r.rank, "keep_count": r.keep_count,
            "keep": r.keep.tolist(), "clusters": r.clusters, "sequence": r.sequence.tolist()}


def head_block(rank, world, H):
    """Heads [lo, hi) of `rank`: contiguous blocks, as Megatron-style TP shards them."""
    return rank * H // world, (rank + 1) * H // world


def worker(rank, world, port, steps, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    torch.set_num_threads(1)
    lines = []
    for s in steps:
        H = s["attn"].shape[0]
        lo, hi = head_block(rank, world, H)
        # Embeddings are replicated in TP: every rank chooses the same raters.
        raters = (s["raters"] if s["raters"] is not None
                  else sv.select_raters(s["embeds"], s["visual"]).tolist())
        attn_local = torch.from_numpy(s["attn"][lo:hi])  # this rank's heads only
        p = sv.partial_relevance(raters, s["visual"], attn_local=attn_local)  # [R, N] head sums
        dist.all_reduce(p, op=dist.ReduceOp.SUM)  # R*N floats
        r = sv.prune_step_from_head_sums(p, H, torch.from_numpy(s["hidden"]), s["visual"], raters,
                                         s["options"])
        mine = decisions(r)
        # Every rank must decide the same: gather them on rank 0 and compare.
        every = [None] * world
        dist.all_gather_object(every, mine)
        if rank == 0:
            one = sv.prune_step(s["hidden"], s["visual"], attn=s["attn"], embeds=s["embeds"],
                                raters=s["raters"], options=s["options"])
            ref = decisions(one)
            same = all(e == ref for e in every)
            merged_same = bool(np.allclose(r.merged.numpy(), one.merged, rtol=1e-5, atol=1e-6))
            lines.append({"step": s["name"], "world": world, "heads": H,
                          "heads_per_rank": [list(head_block(i, world, H)) for i in range(world)],
                          "raters": len(raters), "allreduce_floats": int(p.numel()),
                          "keep_count": ref["keep_count"], "clusters": len(ref["clusters"]),
                          "same_decisions": same, "merged_close": merged_same,
                          "max_score_diff": float(np.max(np.abs(r.scores.numpy() - one.scores)))})
    if rank == 0:
        with open(out, "w") as f:
            for line in lines:
                f.write(json.dumps(line) + "\n")
    dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", action="append", default=[], help="case folder (repeatable)")
    ap.add_argument("--world", type=int, default=2, help="processes (tensor-parallel ranks)")
    ap.add_argument("--out", default=None, help="where rank 0 writes its lines (default: a temp file)")
    a = ap.parse_args(argv)
    if a.out is None:
        a.out = os.path.join(tempfile.mkdtemp(prefix="tp_demo_"), "tp_demo.jsonl")
    steps = [case_step(c) for c in a.case] or [synthetic_step()]
    for s in steps:  # every rank holds at least one head
        if not 1 <= a.world <= s["attn"].shape[0]:
            ap.error(f"--world: expected 1..{s['attn'].shape[0]} (the heads of {s['name']}), got {a.world}")
    mp.spawn(worker, args=(a.world, free_port(), steps, a.out), nprocs=a.world, join=True)
    ok = True
    for line in open(a.out):
        print(line.rstrip())
        rec = json.loads(line)
        ok &= rec["same_decisions"] and rec["merged_close"]
    print("decisions identical to one process" if ok else "DECISIONS DIFFER")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
