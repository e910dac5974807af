#!/usr/bin/env python3
"""Random SparseVLM spec cases (sparsevlm-case/1) with the reference's result.

    generate.py OUT_DIR [--count 400] [--seed 1]

Every case folder gets case.json, the .npy inputs, expected/result.json
(+ expected/merged.npy) from reference.py, and xc_meta.json (kind, flags and
the closest decision gaps; not part of the format).  Random draws whose
decisions fall within 1e-6 of a boundary (other than exact ties), or whose
floor() results depend on the arithmetic precision, are redrawn.
"""
import argparse
import json
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference as ref  # noqa: E402

KINDS = [
    # (kind, weight)
    ("random", 6),
    ("rank_preset", 4),
    ("rank_negbias", 2),
    ("fixed_zero", 2),
    ("fixed_small", 2),
    ("fixed_ge_N", 2),
    ("no_recycle", 1),
    ("fraction_one", 1),
    ("fp16_tiny", 3),
    ("dup_hidden", 4),
    ("dup_hidden_many", 2),
    ("score_ties", 3),
    ("all_equal_scores", 2),
    ("zero_visual_attn", 1),
    ("no_raters_identical_text", 1),
    ("no_text", 1),
    ("one_text", 1),
    ("given_raters", 3),
    ("given_raters_empty", 1),
    ("N1", 2),
    ("low_rank", 4),
    ("qk_gqa", 4),
    ("qk_dup_keys", 2),
    ("c2", 2),
    ("npy_v2", 1),
    ("grid_hidden", 6),
    ("rho_underflow", 2),
    ("peaky_text", 2),
    ("low_rank_nonpow2", 2),
    ("many_clusters", 3),
]


def softmax_masked(logits, L):
    mask = np.tril(np.ones((L, L), dtype=bool))
    z = np.where(mask, logits, -np.inf)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def pick_policy(rng, kind, N):
    if kind in ("fixed_zero",):
        return {"kind": "fixed", "keep": 0}
    if kind == "fixed_small":
        return {"kind": "fixed", "keep": int(rng.integers(1, max(2, min(N, 6))))}
    if kind == "fixed_ge_N":
        return {"kind": "fixed", "keep": int(N + rng.integers(0, 5))}
    if kind == "rank_preset":
        a, b = [(13.5, 0), (9.0, 6), (0.8, 0), (1.0, 0)][rng.integers(4)]
        return {"kind": "rank", "scale": a, "bias": b}
    if kind == "rank_negbias":
        a = float(np.round(rng.uniform(0.5, 12), int(rng.integers(0, 3))))
        b = int(rng.integers(-30, 0)) if rng.random() < 0.6 else float(np.round(rng.uniform(-20, -0.1), 2))
        return {"kind": "rank", "scale": a, "bias": b}
    r = rng.random()
    if r < 0.3:
        a, b = [(13.5, 0), (9.0, 6), (0.8, 0), (1.0, 0)][rng.integers(4)]
        return {"kind": "rank", "scale": a, "bias": b}
    if r < 0.6:
        a = float(np.round(rng.uniform(0.1, 20), int(rng.integers(0, 4))))
        b = int(rng.integers(-10, 11)) if rng.random() < 0.5 else float(np.round(rng.uniform(-10, 10), 3))
        return {"kind": "rank", "scale": a, "bias": b}
    k = [0, int(rng.integers(0, N + 1)), int(rng.integers(0, max(1, N // 3) + 1)), N, N + 10][rng.integers(5)]
    return {"kind": "fixed", "keep": int(k)}


def pick_recycle(rng, kind):
    en = rng.random() < 0.85
    if kind == "no_recycle":
        en = False
    if kind in ("dup_hidden", "dup_hidden_many", "c2", "fraction_one", "fixed_ge_N", "fixed_zero", "grid_hidden", "many_clusters", "rho_underflow"):
        en = True
    fr = [0.3, 1.0, 0.5, 0.05, 0.1, float(np.round(rng.uniform(0.01, 1.0), 3)), float(rng.uniform(1e-3, 1.0))][
        rng.integers(7)]
    if kind == "fraction_one":
        fr = 1.0
    dv = [10, 2, 1.5, 7.3, 3, float(np.round(rng.uniform(1.01, 25), 2)), float(rng.uniform(1.001, 40))][
        rng.integers(7)]
    if kind == "c2":
        dv = float([10, 7.3, 5, 20][rng.integers(4)])
    if kind in ("grid_hidden", "many_clusters", "rho_underflow"):
        en = True
        fr = float([1.0, 0.5, 0.3, np.round(rng.uniform(0.2, 1), 2)][rng.integers(4)])
        dv = float([1.5, 2, 3, 1.1, 7.3][rng.integers(5)])
    return {"enabled": bool(en), "fraction": fr, "cluster_divisor": dv}


def gen_one(rng, kind):
    """Returns (case_json, arrays{name: ndarray}, flags) or raises to redraw."""
    flags = {}
    H = int(rng.integers(1, 9))
    S = int(rng.integers(0, 21))
    N = int(rng.integers(1, 201)) if rng.random() < 0.6 else int(rng.integers(1, 60))
    T = int(rng.integers(1, 61))
    d = int(rng.integers(1, 65))
    if kind == "no_text":
        T = 0
    if kind == "one_text":
        T = 1
    if kind == "N1":
        N = 1
    if kind == "c2":
        N = int(rng.integers(20, 201))
    if kind in ("dup_hidden", "dup_hidden_many", "grid_hidden", "rho_underflow", "many_clusters"):
        N = int(rng.integers(10, 201))
    if kind == "grid_hidden":
        d = int(rng.integers(1, 9))
    L = S + N + T
    f16 = lambda p: rng.random() < p
    dt_emb = np.float16 if f16(0.2) else np.float32
    dt_hid = np.float16 if f16(0.2) else np.float32
    dt_att = np.float16 if (f16(0.2) or kind == "fp16_tiny") else np.float32

    # embeddings: logits V.T^T with std ~ lstd
    lstd = rng.uniform(0.3, 4.0) if kind != "peaky_text" else rng.uniform(10, 40)
    es = math.sqrt(lstd / math.sqrt(d))
    E = rng.normal(size=(L, d)) * es
    if kind == "no_raters_identical_text" and T > 0:
        E[S + N:] = E[S + N]
    elif T > 2 and rng.random() < 0.15:  # a few duplicated text rows (harmless ties in m)
        E[S + N + 1] = E[S + N]
        flags["dup_text_rows"] = True
    E = E.astype(dt_emb)

    arrays = {"embeds": E}
    cj = {"format": "sparsevlm-case/1", "visual": {"start": S, "len": N}, "embeds": "embeds.npy"}

    qk = kind in ("qk_gqa", "qk_dup_keys") or rng.random() < 0.08
    temp = rng.uniform(0.3, 3.0)
    if qk:
        divs = [x for x in range(1, H + 1) if H % x == 0]
        Hkv = int(divs[rng.integers(len(divs))])
        dh = int(rng.integers(1, 65))
        qs = math.sqrt(temp)
        q = (rng.normal(size=(H, L, dh)) * qs).astype(np.float32)
        k = (rng.normal(size=(Hkv, L, dh)) * qs).astype(np.float32)
        if kind == "qk_dup_keys" and N >= 2:
            npairs = int(rng.integers(1, max(2, N // 3)))
            for _ in range(npairs):
                j1, j2 = rng.choice(N, 2, replace=False)
                k[:, S + j2] = k[:, S + j1]
            flags["dup_keys"] = npairs
        grp = H // Hkv
        logits = np.einsum("hid,hjd->hij", q.astype(np.float64),
                           np.repeat(k.astype(np.float64), grp, axis=0)) / math.sqrt(dh)
        A = softmax_masked(logits, L)
        arrays["q"] = q
        arrays["k"] = k
        cj["q"] = "q.npy"
        cj["k"] = "k.npy"
        flags.update(Hkv=Hkv, dh=dh)
        dt_att = np.float32
    else:
        logits = rng.normal(size=(H, L, L)) * temp
        A = softmax_masked(logits, L)
        tr = slice(S + N, L)
        vs = slice(S, S + N)
        if T > 0:
            if kind == "score_ties" and N >= 2:
                npairs = int(rng.integers(1, max(2, N // 2)))
                for _ in range(npairs):
                    j1, j2 = rng.choice(N, 2, replace=False)
                    A[:, tr, S + j2] = A[:, tr, S + j1]
                A[:, tr] /= A[:, tr].sum(axis=-1, keepdims=True)
                flags["tied_columns"] = npairs
            elif kind == "all_equal_scores":
                mass = A[:, tr, vs].sum(axis=-1, keepdims=True)
                A[:, tr, vs] = mass / N
                A[:, tr] /= A[:, tr].sum(axis=-1, keepdims=True)
            elif kind == "zero_visual_attn":
                A[:, tr, vs] = 0.0
                A[:, tr] /= A[:, tr].sum(axis=-1, keepdims=True)
            elif kind == "fp16_tiny":
                tiny = rng.random(size=A.shape) < rng.uniform(0.1, 0.6)
                A = np.where(tiny, A * 10.0 ** rng.uniform(-6, -3, size=A.shape), A)
                A = A / A.sum(axis=-1, keepdims=True)
            elif kind in ("low_rank", "low_rank_nonpow2"):
                if kind == "low_rank_nonpow2":
                    H2 = [3, 5, 6, 7][rng.integers(4)]
                    H = H2
                    A = softmax_masked(rng.normal(size=(H, L, L)) * temp, L)
                elif rng.random() < 0.7:
                    H2 = [1, 2, 4, 8][rng.integers(4)]
                    if H2 != H:
                        H = H2
                        A = softmax_masked(rng.normal(size=(H, L, L)) * temp, L)
                K = int(rng.integers(1, 4))
                basis = rng.integers(0, 256, size=(K, N))
                coef = rng.integers(0, 3, size=(H, T, K))
                vis_int = np.einsum("htk,kn->htn", coef, basis)  # exact ints < 2048
                mx = vis_int.sum(axis=-1).max()
                e = max(0, math.ceil(math.log2(max(mx, 1) / 0.9)))
                vis = vis_int.astype(np.float64) * 2.0 ** -e
                vmass = vis.sum(axis=-1)
                rest = A[:, tr].copy()
                rest[:, :, vs] = 0.0
                rest = rest / rest.sum(axis=-1, keepdims=True) * (1.0 - vmass)[..., None]
                rest[:, :, vs] = vis
                A[:, tr] = rest
                flags.update(lowrank_K=K, H_pow2=(H & (H - 1)) == 0)
        if kind == "fp16_tiny" or (dt_att == np.float16 and rng.random() < 0.5):
            # subnormal float16 values outside the rater rows' visual block, too
            rows = np.arange(L)[None, :, None] < S + N  # not the rater rows
            A = np.where(rows & (rng.random(size=A.shape) < 0.05), A * 1e-5, A)
    A = A.astype(dt_att)
    if dt_att == np.float16:
        sub = np.count_nonzero((A > 0) & (A < np.float16(6.104e-5)))
        flags["fp16_subnormals"] = int(sub)
    arrays["attn"] = A
    cj["attn"] = "attn.npy"

    # hidden: gaussian mixture, optional exact duplicate rows
    sig = rng.uniform(0.05, 0.6)
    nc = int(rng.integers(1, 9))
    cen = rng.normal(size=(nc, d)) * rng.uniform(0.1, 0.8)
    X = cen[rng.integers(0, nc, size=L)] + rng.normal(size=(L, d)) * sig
    if kind in ("dup_hidden", "dup_hidden_many") or rng.random() < 0.1:
        frac = rng.uniform(0.5, 0.9) if kind == "dup_hidden_many" else rng.uniform(0.05, 0.4)
        ndup = max(1, int(frac * N))
        srcs = rng.integers(0, N, size=ndup)
        dsts = rng.integers(0, N, size=ndup)
        for a_, b_ in zip(srcs, dsts):
            X[S + b_] = X[S + a_]
        flags["dup_hidden_rows"] = ndup
    if kind == "grid_hidden":
        q = int(rng.integers(1, 4))
        X = rng.integers(-q, q + 1, size=(L, d)) * 2.0 ** -int(rng.integers(0, 4))
        flags["grid_q"] = q
    if kind == "rho_underflow":
        X = rng.normal(size=(L, d)) * rng.uniform(60, 300)
    arrays["hidden"] = X.astype(dt_hid)
    cj["hidden"] = "hidden.npy"

    cj["policy"] = pick_policy(rng, kind, N)
    cj["recycle"] = pick_recycle(rng, kind)
    if kind == "given_raters" and T > 0:
        R = int(rng.integers(1, T + 1))
        cj["raters"] = sorted(int(S + N + t) for t in rng.choice(T, R, replace=False))
    if kind == "given_raters_empty":
        cj["raters"] = []
    # json order like the shared cases
    order = ["format", "visual", "embeds", "attn", "hidden", "policy", "recycle", "raters", "q", "k"]
    cj = {k_: cj[k_] for k_ in order if k_ in cj}
    flags.update(H=H, S=S, N=N, T=T, d=d, dt_emb=np.dtype(dt_emb).name, dt_att=np.dtype(dt_att).name,
                 dt_hid=np.dtype(dt_hid).name, qk=qk)
    return cj, arrays, flags


def evaluate(cj, arrays):
    case = {"json": cj, **arrays}
    mg = ref.Margins()
    res, merged, info = ref.step(case, "attn", mg)
    viol = list(mg.violations)
    if "q" in arrays:
        mg2 = ref.Margins()
        res2, merged2, _ = ref.step(case, "qk", mg2)
        viol += ["qk: " + v for v in mg2.violations]
        dif = ref.compare(res, merged, res2, merged2)
        if dif:
            viol.append(f"attn and qk paths differ: {dif}")
    return res, merged, info, mg, viol


def interesting(kind, res, info, flags):
    """extra acceptance filters so that each kind exercises what it is for"""
    if kind in ("dup_hidden", "dup_hidden_many", "c2", "grid_hidden"):
        return info.get("n_rho_ties", 0) > 0 or info.get("n_g_ties", 0) > 0
    if kind == "rho_underflow" and not (info.get("c", 0) >= 3 and np.all(info["rho"] == 0)):
        return False
    if kind == "many_clusters":
        return info.get("c", 0) >= 3
    if kind in ("fixed_small", "fixed_zero", "fixed_ge_N", "score_ties", "low_rank") and not res["raters"]:
        return False
    return True


def save_npy(path, arr, v2):
    with open(path, "wb") as f:
        np.lib.format.write_array(f, np.ascontiguousarray(arr), version=(2, 0) if v2 else (1, 0),
                                  allow_pickle=False)


def write_case(dirp, cj, arrays, res, merged, meta, v2=False):
    os.makedirs(os.path.join(dirp, "expected"), exist_ok=True)
    with open(os.path.join(dirp, "case.json"), "w") as f:
        json.dump(cj, f, indent=1)
    for name, arr in arrays.items():
        save_npy(os.path.join(dirp, name + ".npy"), arr, v2)
    ref.write_result(os.path.join(dirp, "expected"), res, merged)
    with open(os.path.join(dirp, "xc_meta.json"), "w") as f:
        json.dump(meta, f, indent=1, default=str)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--count", type=int, default=400)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--value-margin", type=float, default=ref.VALUE_MARGIN,
                    help="absolute margin for non-tied decisions (spec: 1e-6)")
    ap.add_argument("--rank-margin", type=float, default=ref.RANK_REL_MARGIN,
                    help="relative margin singular value vs tolerance")
    args = ap.parse_args()
    ref.VALUE_MARGIN = args.value_margin
    ref.RANK_REL_MARGIN = args.rank_margin
    rng = np.random.default_rng(args.seed)
    names, w = zip(*KINDS)
    w = np.array(w, float) / sum(w)
    # every kind at least 4 times, rest weighted at random
    plan = [k for k in names for _ in range(4)]
    plan += list(rng.choice(names, size=max(0, args.count - len(plan)), p=w))
    rejects = {}
    for idx, kind in enumerate(plan):
        for attempt in range(400):
            cj, arrays, flags = gen_one(rng, kind)
            res, merged, info, mg, viol = evaluate(cj, arrays)
            if viol or not interesting(kind, res, info, flags):
                rejects[kind] = rejects.get(kind, 0) + 1
                continue
            break
        else:
            print(f"gave up on {kind}", file=sys.stderr)
            continue
        meta = {"kind": kind, "flags": flags, "attempts": attempt + 1,
                "min_gaps": mg.min_gap, "ties": sorted(set(mg.ties)), "notes": mg.notes,
                "rank": res["rank"], "R": len(res["raters"]), "keep_count": res["keep_count"],
                "s": info.get("s"), "c": info.get("c"), "n_rho_ties": info.get("n_rho_ties"),
                "n_g_ties": info.get("n_g_ties"), "earlier_centre_ambiguous": info.get("earlier_centre_ambiguous", False)}
        dirp = os.path.join(args.out, f"{idx:04d}_{kind}")
        write_case(dirp, cj, arrays, res, merged, meta, v2=(kind == "npy_v2"))
        print(f"{dirp} attempts={attempt + 1} R={len(res['raters'])} rank={res['rank']} "
              f"keep={res['keep_count']}/{flags['N']} clusters={len(res['clusters'])}", flush=True)
    print("rejected draws per kind:", rejects, file=sys.stderr)


if __name__ == "__main__":
    main()
