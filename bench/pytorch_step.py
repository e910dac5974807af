#!/usr/bin/env python3
"""One SparseVLM pruning step the way the authors' PyTorch code does it, on a case folder.

Reads a case (docs: shared spec "sparsevlm-case/1": case.json + .npy files), runs the
step with the SparseVLM authors' tensor pipeline (their code materialises everything
the straightforward way), times it, and prints one JSON object on stdout:

  {"torch_version", "threads", "case", "shapes": {H, L, N, d, R}, "median_ms",
   "stages_ms": {...}, "keep_count", "rank", "check": {...}}

The pipeline, as in the authors' LLaVA code (inference path, batch 1):
  raters    softmax(V @ T^T, over text).mean(over visual) > its mean   (from the embeds)
  head_mean attn.mean(0): the head mean of the WHOLE [H, L, L] attention
  relevance A[raters][:, S:S+N] and its mean over raters (the scores)
  rank      torch.linalg.matrix_rank of that [R, N] relevance matrix (float32)
  keep      keep count from the case policy, torch.topk of the scores
  recycle   top 30% of the pruned by score, DPC-KNN over their hidden rows with the
            pairwise-difference tensor (x[:, None] - x[None]).norm(-1) / sqrt(d),
            density from the k smallest, delta, top-c centres, nearest-centre
            assignment, cluster means (index_add_)
  compact   index_select of the kept rows and torch.cat with the recycled tokens

Deviations from the authors' code, both needed to compare with the spec's result:
the density uses the spec's deterministic tie-break instead of the authors' 1e-6
random jitter, and float16 inputs are upcast to float32 when loaded (outside timing).

On a GPU, --device cuda runs the same pipeline with every tensor on the device
(torch.set_default_device), loads the inputs there outside timing, and calls
torch.cuda.synchronize() at each stage boundary, so that the per-stage and total
times are wall-clock times of completed GPU work (what bench/bench_cuda.cu measures
with CUDA events for this library). The host-side .tolist()/.item() calls the
authors' code makes are part of the timed work, as they are in their pipeline.

Usage: pytorch_step.py CASE_DIR [--threads N] [--repeat N] [--warmup N] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

STAGES = ("raters", "head_mean", "relevance", "rank", "keep", "recycle", "compact")


def load_case(case_dir: Path, device: str = "cpu") -> dict:
    meta = json.loads((case_dir / "case.json").read_text())
    if meta.get("format") != "sparsevlm-case/1":
        raise SystemExit(f"{case_dir}: not a sparsevlm-case/1 folder")

    def arr(key: str) -> torch.Tensor:
        a = np.load(case_dir / meta[key])
        # The authors upcast half-precision tensors with .float() before the rank and
        # the clustering; here every input is float32 from the start.
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(device)

    return {
        "meta": meta,
        "embeds": arr("embeds"),
        "attn": arr("attn"),
        "hidden": arr("hidden"),
        "S": int(meta["visual"]["start"]),
        "N": int(meta["visual"]["len"]),
        "raters": meta.get("raters"),
        "policy": meta["policy"],
        "recycle": meta["recycle"],
    }


def keep_from_policy(policy: dict, rank: int, n: int) -> int:
    if policy["kind"] == "rank":
        if rank == n:
            return n
        return max(0, min(math.floor(rank * float(policy["scale"]) + float(policy["bias"])), n - 1))
    if policy["kind"] == "fixed":
        return min(int(policy["keep"]), n - 1)
    raise SystemExit(f"unknown policy kind {policy['kind']!r}")


def cluster_and_merge(x: torch.Tensor, cluster_num: int):
    """DPC-KNN as in the authors' utils.cluster_and_merge (batch 1), returning the
    centres in score order, each token's cluster index and the merged rows."""
    s, c_dim = x.shape
    dist_matrix = (x[:, None, :] - x[None, :, :]).norm(dim=-1, p=2) / (c_dim ** 0.5)  # [s, s]
    dist_nearest, _ = torch.topk(dist_matrix, k=cluster_num, dim=-1, largest=False)
    density = (-(dist_nearest ** 2).mean(dim=-1)).exp()
    # The authors add torch.rand(...) * 1e-6 to the density to break ties; the spec
    # breaks them deterministically: j is denser than i when rho_j > rho_i, or equal
    # and j < i.
    idx = torch.arange(s)
    mask = (density[None, :] > density[:, None]) | (
        (density[None, :] == density[:, None]) & (idx[None, :] < idx[:, None]))
    mask = mask.type(x.dtype)
    dist_max = dist_matrix.max()
    dist, _ = (dist_matrix * mask + dist_max * (1 - mask)).min(dim=-1)
    score = dist * density
    _, index_down = torch.topk(score, k=cluster_num, dim=-1)  # centres, by score
    idx_cluster = dist_matrix[index_down].argmin(dim=0)  # nearest centre
    idx_cluster[index_down] = torch.arange(cluster_num)  # a centre joins itself
    counts = torch.zeros(cluster_num, 1, dtype=x.dtype).index_add_(
        0, idx_cluster, torch.ones(s, 1, dtype=x.dtype))
    merged = torch.zeros(cluster_num, c_dim, dtype=x.dtype).index_add_(0, idx_cluster, x) / counts
    return index_down, idx_cluster, merged


def step(case: dict, tick) -> dict:
    """One pruning step; `tick(name)` is called at the end of each stage."""
    embeds, attn, hidden = case["embeds"], case["attn"], case["hidden"]
    S, N = case["S"], case["N"]
    L = attn.shape[1]
    T0 = S + N  # first text position

    # 1. raters (authors: select text tokens from the input embeddings)
    if case["raters"] is not None:
        rater_idx = torch.tensor(case["raters"], dtype=torch.long)
    elif L > T0:
        v_t = embeds[S:T0]
        t_t = embeds[T0:]
        m_v_t = (v_t @ t_t.transpose(0, 1)).softmax(1).mean(0)  # [L - T0]
        rater_idx = torch.where(m_v_t > m_v_t.mean())[0] + T0
    else:
        rater_idx = torch.zeros(0, dtype=torch.long)
    tick("raters")
    R = int(rater_idx.numel())

    rank = 0
    keep_count = N
    keep_pos = torch.arange(S, T0)
    clusters: list[list[int]] = []
    merged = hidden.new_zeros(0, hidden.shape[1])
    if R > 0:
        # 2. head mean over the whole attention, as in attn_postprocess_rank
        mean_attn = attn.mean(0)  # [L, L]
        tick("head_mean")
        # 3. relevance matrix and scores
        relation_vis_text = mean_attn[rater_idx, S:T0]  # [R, N]
        scores = relation_vis_text.mean(0)  # [N]
        tick("relevance")
        # 4. rank
        rank = int(torch.linalg.matrix_rank(relation_vis_text.float()).item())
        tick("rank")
        # 5./6. keep count and keep set
        keep_count = keep_from_policy(case["policy"], rank, N)
        mask = torch.ones(N, dtype=torch.bool)
        if keep_count < N:
            mask = torch.zeros(N, dtype=torch.bool)
            _, indices = torch.topk(scores, keep_count)
            mask[indices] = True
        keep_pos = torch.where(mask)[0] + S
        tick("keep")
        # 7. recycling
        rc = case["recycle"]
        pruned = torch.where(~mask)[0]
        if rc["enabled"] and pruned.numel() > 0:
            n = int(pruned.numel())
            s = min(n, math.floor(float(rc["fraction"]) * n) + 1)
            order = scores[pruned].topk(s)[1]
            chosen = pruned[order] + S  # absolute positions, by descending score
            cluster_num = math.floor(s / float(rc["cluster_divisor"])) + 1
            index_down, idx_cluster, merged = cluster_and_merge(hidden[chosen], cluster_num)
            clusters = [sorted(chosen[idx_cluster == i].tolist()) for i in range(cluster_num)]
        tick("recycle")
    else:
        for name in ("head_mean", "relevance", "rank", "keep", "recycle"):
            tick(name)

    # 8. compaction into the new sequence
    select_idx = torch.cat((torch.arange(0, S), keep_pos, torch.arange(T0, L)))
    select_token = hidden.index_select(0, select_idx)
    n_front = S + int(keep_pos.numel())
    new_hidden = torch.cat((select_token[:n_front], merged, select_token[n_front:]), dim=0)
    tick("compact")

    return {
        "raters": rater_idx.tolist(),
        "rank": rank,
        "keep_count": keep_count,
        "keep": keep_pos.tolist(),
        "clusters": clusters,
        "merged": merged,
        "sequence": list(range(S)) + keep_pos.tolist() + [-(i + 1) for i in range(len(clusters))]
        + list(range(T0, L)),
        "new_hidden": new_hidden,
    }


def timed_run(case: dict, sync=lambda: None):
    """`sync` waits for the device (torch.cuda.synchronize on a GPU) before each
    clock reading, so a stage's time covers its kernels, not just their launch."""
    marks = {}
    sync()
    last = [time.perf_counter()]
    t0 = last[0]

    def tick(name: str) -> None:
        sync()
        now = time.perf_counter()
        marks[name] = (now - last[0]) * 1e3
        last[0] = now

    r = step(case, tick)
    marks["total"] = (last[0] - t0) * 1e3
    return r, marks


def check(case_dir: Path, r: dict) -> dict | None:
    exp_dir = case_dir / "expected"
    if not (exp_dir / "result.json").is_file():
        return None
    e = json.loads((exp_dir / "result.json").read_text())
    out = {}
    for key in ("raters", "rank", "keep_count", "keep"):
        out[key] = r[key] == e[key]
    # Informational (exact-tie details of recycling may differ); never a failure.
    out["clusters"] = r["clusters"] == e["clusters"]
    out["sequence"] = r["sequence"] == e["sequence"]
    if e.get("merged") and r["merged"].numel() > 0 and (exp_dir / e["merged"]).is_file():
        em = torch.from_numpy(np.load(exp_dir / e["merged"]).astype(np.float32)).to(r["merged"].device)
        out["merged"] = em.shape == r["merged"].shape and bool(
            torch.allclose(r["merged"], em, rtol=1e-4, atol=1e-5))
    out["agree"] = all(out[k] for k in ("raters", "rank", "keep_count", "keep"))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("case_dir", type=Path)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="where the tensors live; cuda times with torch.cuda.synchronize()")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    sync = lambda: None  # noqa: E731
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("pytorch_step: --device cuda, but torch sees no CUDA device")
        # Every tensor the pipeline creates (arange, zeros, ...) lands on the GPU too.
        torch.set_default_device("cuda")
        sync = torch.cuda.synchronize
    case = load_case(args.case_dir, args.device)
    sync()

    with torch.inference_mode():
        for _ in range(args.warmup):
            timed_run(case, sync)
        samples: dict[str, list[float]] = {}
        r = None
        for _ in range(args.repeat):
            r, marks = timed_run(case, sync)
            for k, v in marks.items():
                samples.setdefault(k, []).append(v)

    H, L, _ = case["attn"].shape
    out = {
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "case": args.case_dir.name,
        "shapes": {"H": H, "L": L, "N": case["N"], "d": case["hidden"].shape[1],
                   "R": len(r["raters"])},
        "repeat": args.repeat,
        "median_ms": round(statistics.median(samples["total"]), 4),
        "stages_ms": {k: round(statistics.median(samples[k]), 4) for k in STAGES},
        "keep_count": r["keep_count"],
        "rank": r["rank"],
        "recycled_clusters": len(r["clusters"]),
        "new_length": int(r["new_hidden"].shape[0]),
    }
    c = check(args.case_dir, r)
    if c is not None:
        out["check"] = c
        print(f"pytorch_step: {args.case_dir.name}: "
              + ("agrees with expected/result.json on raters, rank, keep_count, keep"
                 if c["agree"] else "DISAGREES with expected/result.json")
              + f" (clusters {'equal' if c['clusters'] else 'differ'}"
              + (f", merged {'match' if c['merged'] else 'differ'}" if "merged" in c else "")
              + ")", file=sys.stderr)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
