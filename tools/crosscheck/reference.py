#!/usr/bin/env python3
"""Independent float64 NumPy reference of one SparseVLM pruning step.

Written from shared/spec/case-format.md ("What one step computes", steps 1-8,
and "The result") only.  Besides the result it reports every *decision* the
step takes and how close it came to its boundary, so that a generator can
reject random cases that fall within the spec's 1e-6 margin (exact ties are
allowed: the spec's tie rules settle them).

Usage:
    reference.py CASE_DIR [--scores-from attn|qk] [--out OUT_DIR] [--margins]
"""
import argparse
import json
import math
import os
import sys
from fractions import Fraction

import numpy as np

EPS32 = 2.0 ** -23
VALUE_MARGIN = 1e-6      # absolute, on m / scores / rho / rho*delta / distances
RANK_REL_MARGIN = 1e-6   # relative, singular value vs tolerance
STRUCT_ZERO = 1e-10      # a singular value <= this * sigma_max is a structural 0


class Margins:
    """Collects decisions that come within the margin of their boundary."""

    def __init__(self, value_margin=None, rank_rel=None):
        self.vm = VALUE_MARGIN if value_margin is None else value_margin
        self.rr = RANK_REL_MARGIN if rank_rel is None else rank_rel
        self.violations = []
        self.min_gap = {}
        self.ties = []    # exact ties that the tie rules settled
        self.notes = []

    def gap(self, what, a, b):
        """a and b are compared; exact equality is a tie, else need |a-b| >= vm."""
        g = abs(float(a) - float(b))
        if a == b:
            self.ties.append(what)
            return
        self.min_gap[what] = min(self.min_gap.get(what, math.inf), g)
        if g < self.vm:
            self.violations.append(f"{what}: |{a!r} - {b!r}| = {g:.3g} < {self.vm}")

    def rel(self, what, x, tol):
        g = abs(x - tol) / tol if tol > 0 else math.inf
        self.min_gap[what] = min(self.min_gap.get(what, math.inf), g)
        if g < self.rr:
            self.violations.append(f"{what}: sv {x!r} vs tol {tol!r} rel gap {g:.3g}")

    def floor_check(self, what, f64, f32, exact):
        """the same floor() computed in float64, float32 and exactly must agree."""
        if not (f64 == f32 == exact):
            self.violations.append(f"{what}: floor differs by precision f64={f64} f32={f32} exact={exact}")


def load_npy(path):
    a = np.load(path, allow_pickle=False)
    return a


def load_case(case_dir):
    with open(os.path.join(case_dir, "case.json")) as f:
        cj = json.load(f)
    c = {"json": cj}
    for key in ("embeds", "attn", "hidden", "q", "k"):
        if key in cj:
            c[key] = load_npy(os.path.join(case_dir, cj[key]))
    return c


def softmax_rows(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def rater_rows_from_qk(q, k, rows):
    """A[rows, :] (mean over heads) from q/k: GQA, scale 1/sqrt(dh), causal."""
    q = q.astype(np.float64)
    k = k.astype(np.float64)
    H, L, dh = q.shape
    Hkv = k.shape[0]
    grp = H // Hkv
    out = np.zeros((len(rows), L))
    for ri, t in enumerate(rows):
        acc = np.zeros(L)
        for h in range(H):
            logits = k[h // grp, : t + 1] @ q[h, t] / math.sqrt(dh)
            logits = logits - logits.max()
            e = np.exp(logits)
            acc[: t + 1] += e / e.sum()
        out[ri] = acc / H
    return out


def order_desc(scores, idx):
    """idx sorted by descending score, ties toward the lower position."""
    idx = np.asarray(idx)
    return list(idx[np.lexsort((idx, -scores[idx]))])


def step(case, scores_from="attn", mg=None, earlier="order", rho_from_d2=False):
    """rho_from_d2: take the squared distances straight from the sum of squares
    instead of squaring D (mathematically the same; exact for grid data)."""
    """Returns (result dict, merged float64 array or None, info dict)."""
    if mg is None:
        mg = Margins()
    cj = case["json"]
    S = int(cj["visual"]["start"])
    N = int(cj["visual"]["len"])
    E = case["embeds"].astype(np.float64)
    L, d = E.shape
    Tn = L - S - N
    info = {"S": S, "N": N, "L": L, "d": d, "T": Tn}

    # 1. raters
    if "raters" in cj:
        raters = sorted(int(r) for r in cj["raters"])
        info["raters_given"] = True
    elif Tn <= 0:
        raters = []
    else:
        V = E[S:S + N]
        T = E[S + N:L]
        M = softmax_rows(V @ T.T)
        m = M.mean(axis=0)
        if np.all(m == m[0]):
            raters = []
            info["all_m_equal"] = True
        else:
            mu = m.mean()
            raters = [S + N + t for t in range(Tn) if m[t] > mu]
            for t in range(Tn):
                mg.gap("rater m vs mean(m)", m[t], mu)
    R = len(raters)
    info["R"] = R

    hidden = case["hidden"].astype(np.float64)

    def finish(rank, keep_count, keep_pos, clusters, merged):
        seq = list(range(S)) + list(keep_pos) + [-(i + 1) for i in range(len(clusters))] + list(range(S + N, L))
        res = {
            "raters": [int(x) for x in raters],
            "rank": int(rank),
            "keep_count": int(keep_count),
            "keep": [int(x) for x in keep_pos],
            "clusters": [[int(x) for x in c] for c in clusters],
            "sequence": [int(x) for x in seq],
        }
        if clusters:
            res["merged"] = "merged.npy"
        return res, merged, info

    if R == 0:
        return finish(0, N, list(range(S, S + N)), [], None)

    # 2. relevance matrix
    if scores_from == "qk":
        Ar = rater_rows_from_qk(case["q"], case["k"], raters)
    else:
        Ar = case["attn"][:, raters, :].astype(np.float64).mean(axis=0)
    P = Ar[:, S:S + N]

    # 3. scores
    score = P.mean(axis=0)
    info["score"] = score

    # 4. rank
    sv = np.linalg.svd(P, compute_uv=False)
    smax = float(sv.max()) if sv.size else 0.0
    tol = smax * max(R, N) * EPS32
    rank = int(np.sum(sv > tol))
    for x in sv:
        if smax == 0 or x <= STRUCT_ZERO * smax:
            continue
        mg.rel("singular value vs tol", float(x), tol)
    info["sv"] = sv
    info["tol"] = tol

    # 5. keep count
    pol = cj["policy"]
    if pol["kind"] == "rank":
        if rank == N:
            keep_count = N
        else:
            a, b = pol["scale"], pol["bias"]
            x64 = math.floor(rank * float(a) + float(b))
            x32 = math.floor(float(np.float32(rank) * np.float32(a) + np.float32(b)))
            xex = math.floor(rank * Fraction(repr(a)) + Fraction(repr(b)))
            clamp = lambda v: max(0, min(v, N - 1))
            mg.floor_check("floor(rank*scale+bias)", clamp(x64), clamp(x32), clamp(xex))
            keep_count = clamp(x64)
    elif pol["kind"] == "fixed":
        keep_count = min(int(pol["keep"]), N - 1)
    else:
        raise ValueError("unknown policy kind")

    # 6. keep set
    order = order_desc(score, np.arange(N))
    if 0 < keep_count < N:
        mg.gap("keep boundary score", score[order[keep_count - 1]], score[order[keep_count]])
    kept = sorted(order[:keep_count])
    keep_pos = [S + j for j in kept]

    # 7. recycling
    rc = cj["recycle"]
    n = N - keep_count
    clusters = []
    merged = None
    if rc["enabled"] and n >= 1:
        f = rc["fraction"]
        div = rc["cluster_divisor"]
        s64 = min(n, math.floor(float(f) * n) + 1)
        s32 = min(n, math.floor(float(np.float32(f) * np.float32(n))) + 1)
        sex = min(n, math.floor(Fraction(repr(f)) * n) + 1)
        mg.floor_check("floor(fraction*n)", s64, s32, sex)
        s = s64
        pruned = order[keep_count:]
        sel = pruned[:s]
        if s < n:
            mg.gap("recycle selection score", score[pruned[s - 1]], score[pruned[s]])
        c64 = math.floor(s / float(div)) + 1
        c32 = math.floor(float(np.float32(s) / np.float32(div))) + 1
        cex = math.floor(Fraction(s) / Fraction(repr(div))) + 1
        mg.floor_check("floor(s/divisor)", c64, c32, cex)
        c = c64
        kk = c
        X = hidden[[S + j for j in sel]]
        D = np.zeros((s, s))
        D2 = np.zeros((s, s))
        for i in range(s):
            diff = X[i + 1:] - X[i]
            D2[i, i + 1:] = (diff * diff).sum(axis=1)
            D[i, i + 1:] = np.sqrt(D2[i, i + 1:]) / math.sqrt(d)
        D = D + D.T  # each pair computed once, mirrored
        D2 = D2 + D2.T
        rho = np.empty(s)
        ksm = []
        for i in range(s):
            sm = np.sort(D[i])[:kk]
            ksm.append(sm)
            if rho_from_d2:
                rho[i] = math.exp(-float(np.sum(np.sort(D2[i])[:kk])) / d / kk)
            else:
                rho[i] = math.exp(-float(np.sum(sm * sm)) / kk)

        def denser(j, i):
            return rho[j] > rho[i] or (rho[j] == rho[i] and j < i)

        delta = np.empty(s)
        dmax = float(D.max())
        n_top = 0
        for i in range(s):
            cand = [D[i, j] for j in range(s) if j != i and denser(j, i)]
            if cand:
                delta[i] = min(cand)
            else:
                delta[i] = dmax
                n_top += 1
        assert n_top == 1
        g = rho * delta
        # margins: rho comparisons (all pairs), rho*delta at the centre boundary
        # and among centres; index order of exactly tied pairs must be robust
        tied_pairs = []
        for i in range(s):
            for j in range(i + 1, s):
                if rho[i] == rho[j]:
                    tied_pairs.append((i, j, "rho"))
                    if not (np.array_equal(ksm[i], ksm[j]) or rho[i] == 0.0):
                        mg.violations.append(f"non-structural rho tie {i},{j}")
                else:
                    mg.gap("rho comparison", rho[i], rho[j])
        corder = list(np.lexsort((np.arange(s), -g)))
        centres = corder[:c]
        for a_, b_ in zip(corder[:c], corder[1:c + 1]):
            mg.gap("rho*delta centre order/boundary", g[a_], g[b_])
            if g[a_] == g[b_]:
                tied_pairs.append((min(a_, b_), max(a_, b_), "rho*delta"))
                if not (g[a_] == 0.0 or (rho[a_] == rho[b_] and delta[a_] == delta[b_])):
                    mg.violations.append(f"non-structural rho*delta tie {a_},{b_}")
        # assignment
        members = {ci: [ci] for ci in centres}
        cset = set(centres)
        alt_diff = False
        for i in range(s):
            if i in cset:
                continue
            dist = np.array([D[i, cj_] for cj_ in centres])
            best = int(np.argmin(dist))  # first minimum = earlier centre in order
            if earlier == "index":
                mins = [centres[t] for t in range(c) if dist[t] == dist[best]]
                choice = centres.index(min(mins))
            else:
                choice = best
            mins_idx = [centres[t] for t in range(c) if dist[t] == dist[best]]
            if len(mins_idx) > 1 and centres.index(min(mins_idx)) != best:
                alt_diff = True
            srt = np.sort(dist)
            if c > 1:
                mg.gap("nearest-centre distance", srt[0], srt[1])
            members[centres[choice]].append(i)
        if alt_diff:
            info["earlier_centre_ambiguous"] = True
            mg.notes.append("nearest-centre tie where 'earlier centre' by order != by index")
        # robustness of the score order for pairs whose index order matters
        for i, j, why in tied_pairs:
            mg.gap(f"score order of {why}-tied pair", score[sel[i]], score[sel[j]])
        for ci in centres:
            idxs = members[ci]
            clusters.append(sorted(S + sel[t] for t in idxs))
        merged = np.stack([X[members[ci]].mean(axis=0) for ci in centres])
        info.update(s=s, c=c, rho=rho, delta=delta, g=g, n_rho_ties=sum(1 for t in tied_pairs if t[2] == "rho"),
                    n_g_ties=sum(1 for t in tied_pairs if t[2] == "rho*delta"))
    return finish(rank, keep_count, keep_pos, clusters, merged)


def write_result(out_dir, res, merged):
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "result.json"), "w") as f:
        json.dump(res, f, separators=(",", ":"))
    if merged is not None:
        np.save(os.path.join(out_dir, "merged.npy"), merged.astype(np.float32))


def compare(res_a, merged_a, res_b, merged_b, rtol=1e-4, atol=1e-5):
    diffs = []
    for key in ("raters", "rank", "keep_count", "keep", "clusters", "sequence"):
        if res_a.get(key) != res_b.get(key):
            diffs.append(key)
    if (merged_a is None) != (merged_b is None):
        diffs.append("merged presence")
    elif merged_a is not None:
        if merged_a.shape != merged_b.shape or not np.allclose(merged_a, merged_b, rtol=rtol, atol=atol):
            diffs.append("merged values")
    return diffs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("case_dir")
    ap.add_argument("--scores-from", default="attn", choices=["attn", "qk"])
    ap.add_argument("--out")
    ap.add_argument("--margins", action="store_true")
    ap.add_argument("--check", action="store_true", help="compare with CASE_DIR/expected")
    args = ap.parse_args()
    case = load_case(args.case_dir)
    mg = Margins()
    res, merged, info = step(case, args.scores_from, mg)
    if args.out:
        write_result(args.out, res, merged)
    else:
        print(json.dumps(res, separators=(",", ":")))
    if args.margins:
        print("violations:", mg.violations, file=sys.stderr)
        print("min gaps:", mg.min_gap, file=sys.stderr)
        print("ties:", sorted(set(mg.ties)), file=sys.stderr)
    if args.check:
        with open(os.path.join(args.case_dir, "expected", "result.json")) as f:
            exp = json.load(f)
        em = None
        if "merged" in exp:
            em = np.load(os.path.join(args.case_dir, "expected", exp["merged"])).astype(np.float64)
        diffs = compare(res, merged, exp, em)
        print("agree" if not diffs else f"DIFFER: {diffs}")
        sys.exit(0 if not diffs else 1)


if __name__ == "__main__":
    main()
