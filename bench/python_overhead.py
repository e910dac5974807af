#!/usr/bin/env python3
"""What the Python package costs over the C++ library, call by call, in one run.

Synthesises a LLaVA-1.5-7B-shaped step (35 prefix + 576 visual + 60 text tokens,
hidden size 4096, 32 heads of 128; float16 embeds, hidden, attention, q and k;
the rank policy 13.5 with recycling), writes it as a spec case folder, then
times the same calls
  prune_step (from attn and from q/k), select_raters, PrefillSession.prune
  (one pruning layer, raters given), apply_plan
through the CLI's in-memory timer (`sparsevlm bench CASE --calls`: C++, no
Python) and through the package from NumPy arrays and from CPU torch tensors,
and prints each median and its ratio to the C++ median. Both sides run on one
thread; each round runs the CLI and then Python, and the lowest median of the
rounds is kept per call (the machine is shared: the lowest is the least
disturbed).

    build/venv/bin/python bench/python_overhead.py --cli build/examples/sparsevlm
    build/venv/bin/python bench/python_overhead.py --cli ... --case DIR   # an existing case
    ... --json out.json   # the table as JSON as well

docs/python.md ("Speed") has a table made by this script.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def write_case(dir_: str, seed: int = 0) -> None:
    """The LLaVA-1.5-7B-shaped step as a case folder (spec format, float16)."""
    import torch

    S, N, T, d, H, dh = 35, 576, 60, 4096, 32, 128
    L = S + N + T
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(H, L, dh, generator=g)
    k = torch.randn(H, L, dh, generator=g)
    # A few visual keys that the text attends to strongly, as real images have.
    k[:, S:S + N] += 0.5 * torch.randn(H, 1, dh, generator=g) * (torch.rand(1, N, 1, generator=g) > 0.8)
    q16, k16 = q.half(), k.half()
    logits = (q16.float() @ k16.float().transpose(1, 2)) / dh ** 0.5
    logits.masked_fill_(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
    attn = torch.softmax(logits, dim=-1).half()
    embeds = torch.randn(L, d, generator=g).half()
    hidden = torch.randn(L, d, generator=g).half()
    os.makedirs(dir_, exist_ok=True)
    for name, t in (("q", q16), ("k", k16), ("attn", attn), ("embeds", embeds), ("hidden", hidden)):
        np.save(os.path.join(dir_, name + ".npy"), t.numpy())
    case = {"format": "sparsevlm-case/1", "visual": {"start": S, "len": N},
            "embeds": "embeds.npy", "attn": "attn.npy", "hidden": "hidden.npy",
            "q": "q.npy", "k": "k.npy",
            "policy": {"kind": "rank", "scale": 13.5, "bias": 0},
            "recycle": {"enabled": True, "fraction": 0.3, "cluster_divisor": 10}}
    with open(os.path.join(dir_, "case.json"), "w") as f:
        json.dump(case, f, indent=1)


def median_ms(fn, repeat: int, setup=None) -> float:
    """Median wall time of fn() in ms over `repeat` runs, after one warm-up run;
    setup() (untimed) runs before each."""
    if setup is not None:
        setup()
    fn()
    times = []
    for _ in range(repeat):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def cli_calls(cli: str, case: str, repeat: int, scores_from: str) -> dict:
    out = subprocess.run([cli, "bench", case, "--calls", "--repeat", str(repeat),
                          "--scores-from", scores_from], check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def python_calls(sv, case: str, repeat: int) -> dict:
    """{(call, framework): median ms} for the package's calls on the case."""
    import torch

    c = sv.load_case(case)
    visual, opt = c["visual"], c["options"]
    arrays = {"numpy": {k: c[k] for k in ("embeds", "attn", "hidden", "q", "k")}}
    arrays["torch"] = {k: torch.from_numpy(v) for k, v in arrays["numpy"].items()}
    S, N = visual
    L = int(c["hidden"].shape[0])
    layout = sv.Layout.from_counts(S, N, L - S - N)
    cfg = sv.SessionConfig(2, [(0, opt)])
    out = {}
    for fw, a in arrays.items():
        r = sv.prune_step(a["hidden"], visual, attn=a["attn"], embeds=a["embeds"], options=opt)
        raters = sv.select_raters(a["embeds"], visual)
        out[("prune_step attn", fw)] = median_ms(
            lambda: sv.prune_step(a["hidden"], visual, attn=a["attn"], embeds=a["embeds"], options=opt),
            repeat)
        out[("prune_step qk", fw)] = median_ms(
            lambda: sv.prune_step(a["hidden"], visual, q=a["q"], k=a["k"], embeds=a["embeds"], options=opt),
            repeat)
        out[("select_raters", fw)] = median_ms(lambda: sv.select_raters(a["embeds"], visual), repeat)
        holder = {}

        def new_session():
            holder["s"] = sv.PrefillSession(layout, cfg, raters=raters)

        out[("session prune attn", fw)] = median_ms(
            lambda: holder["s"].prune(0, a["hidden"], attn=a["attn"]), repeat, setup=new_session)
        out[("apply_plan", fw)] = median_ms(lambda: sv.apply_plan(r, a["hidden"]), repeat)
    return out


# (row name, the CLI's scores_from, the CLI's call)
ROWS = [("prune_step attn", "attn", "prune_step"), ("prune_step qk", "qk", "prune_step"),
        ("select_raters", "attn", "select_raters"), ("session prune attn", "attn", "session_prune"),
        ("apply_plan", "attn", "apply_plan")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cli", default="build/examples/sparsevlm", help="the sparsevlm CLI")
    ap.add_argument("--case", help="an existing case folder with q.npy/k.npy (default: synthesised)")
    ap.add_argument("--repeat", type=int, default=15, help="timed runs per call and round")
    ap.add_argument("--rounds", type=int, default=3, help="CLI-then-Python rounds")
    ap.add_argument("--json", help="also write the table here")
    args = ap.parse_args()
    if not os.access(args.cli, os.X_OK):
        print(f"--cli: expected the sparsevlm executable, got {args.cli!r} (build it first)", file=sys.stderr)
        return 2
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    import sparsevlm as sv

    with tempfile.TemporaryDirectory() as tmp:
        case = args.case or os.path.join(tmp, "llava15_7b")
        if not args.case:
            write_case(case)
        cpp: dict = {}
        py: dict = {}
        for _ in range(args.rounds):
            runs = {f: cli_calls(args.cli, case, args.repeat, f) for f in ("attn", "qk")}
            for name, f, call in ROWS:
                v = runs[f]["median_ms"][call]
                cpp[name] = min(cpp.get(name, v), v)
            for key, v in python_calls(sv, case, args.repeat).items():
                py[key] = min(py.get(key, v), v)
        isa = runs["attn"]["isa"]
    print(f"CPU: {cpu_model()}; kernels: C++ {isa}, package {sv.isa()}; 1 thread; "
          f"median of {args.repeat}, lowest of {args.rounds} rounds")
    print("case: LLaVA-1.5-7B shapes, L 671 (35 + 576 + 60), d 4096, H 32, dh 128, float16"
          if not args.case else f"case: {args.case}")
    print(f"{'call':<20} {'C++ ms':>8} {'NumPy ms':>9} {'ratio':>6} {'torch ms':>9} {'ratio':>6}")
    table = []
    for name, _, _ in ROWS:
        c, n, t = cpp[name], py[(name, "numpy")], py[(name, "torch")]
        table.append({"call": name, "cpp_ms": c, "numpy_ms": n, "numpy_ratio": n / c,
                      "torch_ms": t, "torch_ratio": t / c})
        print(f"{name:<20} {c:8.3f} {n:9.3f} {n / c:6.2f} {t:9.3f} {t / c:6.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": cpu_model(), "isa": isa, "repeat": args.repeat, "rounds": args.rounds,
                       "rows": table}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
