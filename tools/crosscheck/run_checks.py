#!/usr/bin/env python3
"""Run `sparsevlm check` on every case folder (and `--scores-from qk` where the
case has q/k); summarise by kind and print every disagreement / exit 2.

    run_checks.py CASES_DIR [--cli build/examples/sparsevlm] [-j 8]
"""
import argparse
import collections
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor


def run(cli, case, mode):
    cmd = [cli, "check", case] + (["--scores-from", "qk"] if mode == "qk" else [])
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    return case, mode, p.returncode, (p.stdout + p.stderr)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("cases")
    ap.add_argument("--cli", default="build/examples/sparsevlm")
    ap.add_argument("-j", type=int, default=8)
    args = ap.parse_args()
    cases = sorted(os.path.join(args.cases, c) for c in os.listdir(args.cases)
                   if os.path.isfile(os.path.join(args.cases, c, "case.json")))
    jobs = []
    for c in cases:
        jobs.append((c, "attn"))
        if os.path.exists(os.path.join(c, "q.npy")):
            jobs.append((c, "qk"))
    stats = collections.defaultdict(collections.Counter)
    bad = []
    with ThreadPoolExecutor(args.j) as ex:
        for case, mode, rc, out in ex.map(lambda j: run(args.cli, *j), jobs):
            kind = "?"
            mp = os.path.join(case, "xc_meta.json")
            if os.path.exists(mp):
                kind = json.load(open(mp))["kind"]
            stats[(kind, mode)][rc] += 1
            if rc != 0:
                bad.append((case, mode, rc, out))
    tot = collections.Counter()
    print(f"{'kind':28s} {'mode':5s} agree disagree bad_input other")
    for (kind, mode), cnt in sorted(stats.items()):
        print(f"{kind:28s} {mode:5s} {cnt[0]:5d} {cnt[1]:8d} {cnt[2]:9d} {sum(cnt.values()) - cnt[0] - cnt[1] - cnt[2]:5d}")
        tot.update(cnt)
    print(f"TOTAL runs={sum(tot.values())} agree={tot[0]} disagree={tot[1]} exit2={tot[2]} "
          f"other={sum(tot.values()) - tot[0] - tot[1] - tot[2]} cases={len(cases)}")
    for case, mode, rc, out in bad:
        print(f"\n=== {case} --scores-from {mode}: rc={rc}\n{out[:3000]}")
    sys.exit(0 if not bad else 1)


if __name__ == "__main__":
    main()
