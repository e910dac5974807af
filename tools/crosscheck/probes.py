#!/usr/bin/env python3
"""Probe cases outside the spec's "no decision within 1e-6" guarantee or
testing input validation.  These are informational, not pass/fail.

    probes.py OUT_DIR

Writes OUT_DIR/<name>/ case folders plus OUT_DIR/probes.json describing what
each probe expects (exit code and, for floor probes, the alternatives).
"""
import copy
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import generate as gen  # noqa: E402
import reference as ref  # noqa: E402


def base_case(rng, kind="random", want=None):
    while True:
        cj, arrays, flags = gen.gen_one(rng, kind)
        res, merged, info, mg, viol = gen.evaluate(cj, arrays)
        if viol or not res["raters"]:
            continue
        if want and not want(cj, arrays, res, info):
            continue
        return cj, arrays, flags, res, merged, info


def write(out, name, cj, arrays, expect_rc, note, table, scores_from="attn", earlier="order", v2=False,
          raw=None):
    d = os.path.join(out, name)
    case = {"json": cj, **arrays}
    try:
        res, merged, info = ref.step(case, scores_from, ref.Margins(), earlier=earlier)
    except Exception as e:  # invalid inputs: no expected result
        res, merged = {"raters": [], "rank": 0, "keep_count": 0, "keep": [], "clusters": [], "sequence": []}, None
    gen.write_case(d, cj, arrays, res, merged, {"kind": "probe:" + name, "flags": {}, "note": note}, v2=v2)
    if raw:
        for fname, data in raw.items():
            with open(os.path.join(d, fname), "wb") as f:
                f.write(data)
    table[name] = {"expect_rc": expect_rc, "note": note}
    return res


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(99)
    table = {}

    # --- floor() precision probes (outside the spec guarantee) -------------
    def fixed_prune(n, N=None, fr=0.3, dv=10.0):
        cj, arrays, flags, *_ = base_case(rng, "random", want=lambda cj, a, r, i: cj["visual"]["len"] >= n + 1)
        cj = copy.deepcopy(cj)
        N = cj["visual"]["len"]
        cj["policy"] = {"kind": "fixed", "keep": N - n}
        cj["recycle"] = {"enabled": True, "fraction": fr, "cluster_divisor": dv}
        return cj, arrays

    # fraction*n: exact decimal 29, float64 and float32 give 28.99999...
    cj, a = fixed_prune(100, fr=0.29)
    write(out, "floor_frac_0.29x100", cj, a, 0,
          "floor(0.29*100): exact 29, f64 28, f32 28; expected written with f64 (s=29); exact math gives s=30", table)
    # fraction*n: f64 7.0 (exact 7), f32 6.99999988
    cj, a = fixed_prune(20, fr=0.35)
    write(out, "floor_frac_0.35x20", cj, a, 0,
          "floor(0.35*20): exact 7, f64 7, f32 6; expected written with f64/exact (s=8); f32 gives s=7", table)
    # s/divisor: 73/7.3
    cj, a = fixed_prune(73, fr=1.0, dv=7.3)
    write(out, "floor_div_73_over_7.3", cj, a, 0,
          "floor(73/7.3): exact 10, f64 %r, f32 %r; expected written with f64" % (
              73 / 7.3, float(np.float32(73) / np.float32(7.3))), table)

    # --- 'earlier centre' ambiguity: nearest-centre tie where the earlier centre
    # in the rho*delta order has the higher index --------------------------------
    got = 0
    for attempt in range(20000):
        cj, arrays, flags = gen.gen_one(rng, "grid_hidden")
        res, merged, info, mg, viol = gen.evaluate(cj, arrays)
        if viol or not info.get("earlier_centre_ambiguous"):
            continue
        r_idx = write(out, f"ambig_earlier_centre_{got}", cj, arrays, 0,
                      "expected uses 'earlier centre' = earlier in the rho*delta order; "
                      "the by-index reading differs", table)
        r2, m2, _ = ref.step({"json": cj, **arrays}, "attn", ref.Margins(), earlier="index")
        ref.write_result(os.path.join(out, f"ambig_earlier_centre_{got}", "expected_by_index"), r2, m2)
        got += 1
        if got >= 3:
            break
    print("ambiguity probes:", got, "after", attempt + 1, "draws")

    # --- unsorted given raters ----------------------------------------------
    cj, arrays, flags, res, merged, info = base_case(rng, "given_raters",
                                                     want=lambda cj, a, r, i: len(cj.get("raters", [])) >= 3)
    cj = copy.deepcopy(cj)
    cj["raters"] = list(reversed(cj["raters"]))
    write(out, "given_raters_unsorted", cj, arrays, 0,
          "raters given in descending order; result raters must be ascending", table)

    # --- invalid inputs: expect exit 2 ----------------------------------------
    cj0, arrays0, flags0, *_ = base_case(rng, "qk_gqa", want=lambda cj, a, r, i: a["q"].shape[0] >= 2)
    H = arrays0["q"].shape[0]

    def bad(name, note, mut_cj=None, mut_arr=None, raw=None):
        cj = copy.deepcopy(cj0)
        arrays = {k: v.copy() for k, v in arrays0.items()}
        if mut_cj:
            mut_cj(cj)
        if mut_arr:
            mut_arr(arrays)
        write(out, "bad_" + name, cj, arrays, 2, note, table, raw=raw)

    bad("format", "format string sparsevlm-case/2", lambda c: c.update(format="sparsevlm-case/2"))
    bad("fraction_0", "recycle.fraction = 0 (spec: 0 < f <= 1)", lambda c: c["recycle"].update(fraction=0.0))
    bad("fraction_gt1", "recycle.fraction = 1.5", lambda c: c["recycle"].update(fraction=1.5))
    bad("divisor_1", "cluster_divisor = 1 (spec: c > 1)", lambda c: c["recycle"].update(cluster_divisor=1.0))
    bad("keep_neg", "fixed keep = -1 (spec: k >= 0)", lambda c: c.update(policy={"kind": "fixed", "keep": -1}))
    bad("policy_kind", "unknown policy kind", lambda c: c.update(policy={"kind": "magic"}))
    bad("visual_oob", "visual start+len > L",
        lambda c: c["visual"].update(len=arrays0["embeds"].shape[0] - c["visual"]["start"] + 1))
    bad("rater_not_text", "given rater at a visual position",
        lambda c: c.update(raters=[c["visual"]["start"]]))
    bad("rater_oob", "given rater >= L", lambda c: c.update(raters=[arrays0["embeds"].shape[0]]))
    bad("attn_shape", "attn [H, L, L-1]", mut_arr=lambda a: a.update(attn=np.ascontiguousarray(a["attn"][:, :, :-1])))
    bad("hidden_rows", "hidden has L-1 rows", mut_arr=lambda a: a.update(hidden=np.ascontiguousarray(a["hidden"][:-1])))
    bad("attn_float64", "attn stored as float64", mut_arr=lambda a: a.update(attn=a["attn"].astype(np.float64)))
    bad("missing_hidden", "case.json names a missing hidden file", lambda c: c.update(hidden="nope.npy"))

    def kv_bad(a):
        if H % (H - 1 if H > 2 else 3) != 0:
            a.update(k=np.ascontiguousarray(np.repeat(a["k"][:1], H - 1 if H > 2 else 3, axis=0)))
    bad("gqa_indivisible", "H % Hkv != 0", mut_arr=kv_bad)
    # big-endian and fortran-order npy written by hand
    be = None
    d = os.path.join(out, "bad_attn_bigendian")
    bad("attn_bigendian", "attn.npy big-endian '>f4'", mut_arr=lambda a: a.update(attn=a["attn"].astype(">f4")))
    bad("attn_fortran", "attn.npy fortran_order True",
        mut_arr=lambda a: a.update(attn=np.asfortranarray(a["attn"])))
    # note: gen.save_npy makes arrays C-contiguous; rewrite the fortran one by hand
    with open(os.path.join(out, "bad_attn_fortran", "attn.npy"), "wb") as f:
        np.lib.format.write_array(f, np.asfortranarray(arrays0["attn"].astype(np.float32)), version=(1, 0))
    with open(os.path.join(out, "probes.json"), "w") as f:
        json.dump(table, f, indent=1)
    print(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
