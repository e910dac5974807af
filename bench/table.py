#!/usr/bin/env python3
"""Markdown tables for bench/README.md from one sparsevlm_bench JSON run.

    build-bench/bench/sparsevlm_bench --benchmark_out=run.json --benchmark_out_format=json
    python3 bench/table.py run.json                      # prints the tables
    python3 bench/table.py run.json --update bench/README.md
        # replaces what lies between the README's "table.py begin/end" markers
    python3 bench/table.py run.json --cpu-time
        # figures from CPU time instead of wall-clock time (see below)

On a shared machine a benchmark that loses its core part of the time shows a
wall-clock time above its CPU time (`cpu/real` below 1). --cpu-time then reads
every time-based figure as if the core had been its own: times and the
x-of-limit figures against the probe's CPU-time bandwidth, GB/s by real/cpu
(the per-stage times are wall-clock inside the step and are scaled by their
benchmark's ratio, an approximation).

With --benchmark_repetitions, the median aggregates are used. Every figure in
the output comes from the one run, so the ratios are taken on the same machine
state.
"""
import json
import re
import statistics
import sys

STAGES = ["raters", "scores", "rank", "keep", "recycle", "plan"]
TYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}


def load(stream):
    text = stream.read()
    # Google Benchmark prints the JSON object alone with --benchmark_format=json;
    # tolerate console text around it.
    run = json.loads(text[text.index("{"): text.rindex("}") + 1])
    groups = {}
    for b in run["benchmarks"]:
        name = b.get("run_name", b["name"])
        groups.setdefault(name, []).append(b)
    chosen = {}
    for name, entries in groups.items():
        medians = [e for e in entries if e.get("aggregate_name") == "median"]
        if medians:
            chosen[name] = medians[0]
            continue
        its = [e for e in entries if e.get("run_type", "iteration") == "iteration"]
        if len(its) == 1:
            chosen[name] = its[0]
        elif its:  # repetitions without aggregates: median of each number
            m = dict(its[0])
            for k, v in its[0].items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    m[k] = statistics.median(e[k] for e in its if k in e)
            chosen[name] = m
    return run["context"], chosen


CPU_TIME = False


def busy(b):
    """Time-based figures are multiplied by this: cpu/real with --cpu-time, else 1."""
    return b["cpu_time"] / b["real_time"] if CPU_TIME and b.get("real_time") else 1.0


def ms(b):
    """A benchmark's time in milliseconds."""
    scale = {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3}[b.get("time_unit", "ns")]
    return b["cpu_time" if CPU_TIME else "real_time"] * scale


PROBE_RATIO = 1.0  # with --cpu-time: the probe's CPU-time bandwidth / its wall-clock one


def timed(b, key):
    """A counter that is a time (ms, µs per token) or a multiple of the limit."""
    if key not in b:
        return None
    limit = PROBE_RATIO if CPU_TIME and (key.endswith("_x") or key == "x_of_limit") else 1.0
    return b[key] * busy(b) * limit


def rate(b, key):
    """A counter that is per unit of time (GB/s)."""
    return b[key] / busy(b) if key in b else None


def fmt(x, digits=3):
    if x is None:
        return "—"
    if x == 0:
        return "0"
    mag = abs(x)
    if mag >= 100:
        return f"{x:.0f}"
    if mag >= 10:
        return f"{x:.1f}"
    if mag >= 1:
        return f"{x:.2f}"
    return f"{x:.{digits}g}"


def split(name):
    """'BM_step/7b_n576/f32/scalar/real_time' -> ('BM_step', '7b_n576', 'f32', scalar?)."""
    parts = [p for p in name.split("/") if p != "real_time"]
    if len(parts) < 3 or parts[2] not in TYPES:
        return None
    return parts[0], parts[1], parts[2], "scalar" in parts[3:]


def n_of(shape):
    m = re.search(r"n(\d+)$", shape)
    return int(m.group(1)) if m else None


def decided(label):
    """The label less its leading instruction set."""
    return " ".join(label.split()[1:]) if label else ""


def table(head, rows):
    out = ["| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


BEGIN, END = "<!-- table.py begin -->", "<!-- table.py end -->"


def main():
    global CPU_TIME, PROBE_RATIO
    args = sys.argv[1:]
    if "--cpu-time" in args:
        CPU_TIME = True
        args.remove("--cpu-time")
    update = None
    if "--update" in args:
        i = args.index("--update")
        update = args[i + 1]
        del args[i:i + 2]
    src = open(args[0]) if args and args[0] != "-" else sys.stdin
    ctx, b = load(src)
    if CPU_TIME:
        wall = next((v for k, v in ctx.items() if k.startswith("copy_probe_GB/s")), None)
        cpu = next((v for k, v in ctx.items() if k.startswith("copy_probe_cpu_GB/s")), None)
        if not wall or not cpu:
            sys.exit("table.py: --cpu-time needs the copy_probe_cpu_GB/s context of a newer run")
        PROBE_RATIO = float(cpu) / float(wall)
    text = tables(ctx, b)
    if update is None:
        print(text)
        return
    readme = open(update).read()
    if BEGIN not in readme or END not in readme:
        sys.exit(f"table.py: {update} has no {BEGIN} ... {END} markers")
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    open(update, "w").write(head + BEGIN + "\n" + text + "\n" + END + tail)


def tables(ctx, b):
    probe_key = next((k for k in ctx if k.startswith(
        "copy_probe_cpu_GB/s" if CPU_TIME else "copy_probe_GB/s")), None)
    step = {split(n): v for n, v in b.items() if n.startswith("BM_step/") and split(n)}
    stages = {split(n): v for n, v in b.items() if n.startswith("BM_stages/") and split(n)}
    out = []

    out.append(
        f"Run: {ctx.get('date', '?')}, {ctx.get('num_cpus', '?')} CPUs at "
        f"{ctx.get('mhz_per_cpu', '?')} MHz, sparsevlm kernels: {ctx.get('sparsevlm_isa', '?')}, "
        f"copy probe (memcpy 256 MB, read + written, best of 5): "
        f"{ctx.get(probe_key, '?') if probe_key else '?'} GB/s. "
        + ("Figures from CPU time (table.py --cpu-time). " if CPU_TIME else "Wall-clock times; ")
        + "`cpu/real` below 1 means the benchmark shared its core with other work."
    )

    rows = []
    for key, v in step.items():
        if key[3]:
            continue
        _, shape, t, _ = key
        rows.append([shape, TYPES[t], fmt(ms(v)), fmt(rate(v, "GB/s")), fmt(timed(v, "x_of_limit")),
                     fmt(timed(v, "us_per_token")), decided(v.get("label")),
                     fmt(v["cpu_time"] / v["real_time"], 2)])
    if rows:
        out.append("\n### One step (prune_step + apply_plan of the hidden states)\n")
        out.append(table(["shape", "type", "ms", "GB/s", "x of limit", "µs / visual token",
                          "decided", "cpu/real"], rows))

    layer = {split(n): v for n, v in b.items() if n.startswith("BM_layer/") and split(n)}
    rows = []
    for key, v in layer.items():
        if key[3]:
            continue
        _, shape, t, _ = key
        whole = step.get(("BM_step", shape, t, False))
        rows.append([shape, TYPES[t], fmt(ms(v)), fmt(rate(v, "GB/s")), fmt(timed(v, "x_of_limit")),
                     fmt(ms(whole) / ms(v), 2) if whole else "?",
                     fmt(v["cpu_time"] / v["real_time"], 2)])
    if rows:
        out.append("\n### One pruning layer as the session runs it (raters given, "
                   "prune_step_into with a reserved workspace, + compaction)\n")
        out.append(table(["shape", "type", "ms", "GB/s", "x of limit", "step / layer",
                          "cpu/real"], rows))

    rows = []
    for key, v in stages.items():
        if key[3]:
            continue
        _, shape, t, _ = key
        rows.append([shape, TYPES[t]] + [fmt(timed(v, s + "_ms")) for s in STAGES] +
                    [fmt(timed(v, "scores_x")), fmt(timed(v, "plan_x"))])
    if rows:
        out.append("\n### Stages inside the step (ms; plan includes the compaction)\n")
        out.append(table(["shape", "type"] + STAGES + ["scores x of limit", "plan x of limit"], rows))

    rows = []
    for key, v in step.items():
        if not key[3]:
            continue
        fast = step.get((key[0], key[1], key[2], False))
        if not fast:
            continue
        what = f"{key[1]} {TYPES[key[2]]}"
        rows.append([what + " step", fmt(ms(v)), fmt(ms(fast)), fmt(ms(v) / ms(fast), 2) + "×"])
        s_scalar = stages.get(("BM_stages", key[1], key[2], True))
        s_fast = stages.get(("BM_stages", key[1], key[2], False))
        if s_scalar and s_fast:
            for s in STAGES:
                a, f = timed(s_scalar, s + "_ms"), timed(s_fast, s + "_ms")
                if a is not None and f:
                    rows.append([f"{what} {s}", fmt(a), fmt(f), fmt(a / f, 2) + "×"])
    if rows:
        isa = ctx.get("sparsevlm_isa", "SIMD")
        out.append(f"\n### Scalar kernels against {isa} (same run)\n")
        out.append(table(["", "scalar ms", f"{isa} ms", "speed-up"], rows))

    series = sorted(((n_of(k[1]), k, v) for k, v in step.items()
                     if k[2] == "f32" and not k[3] and n_of(k[1]) and k[1].split("_")[0] != "13b"),
                    key=lambda x: x[0])
    if len(series) > 1:
        n0, k0, v0 = series[0]
        s0 = stages.get(("BM_stages", k0[1], "f32", False), {})
        rows = []
        for n, k, v in series:
            st = stages.get(("BM_stages", k[1], "f32", False), {})
            per = ms(v) / n * 1e3
            row = [str(n), fmt(ms(v)), fmt(per), fmt(per / (ms(v0) / n0 * 1e3), 2) + "×"]
            for s in ("raters", "scores", "recycle"):
                if s + "_ms" in st and s + "_ms" in s0 and s0[s + "_ms"]:
                    row.append(fmt((timed(st, s + "_ms") / n) / (timed(s0, s + "_ms") / n0), 2) + "×")
                else:
                    row.append("—")
            rows.append(row)
        out.append(f"\n### Linearity in N (float32, H 32, d 4096; time / N relative to N = {n0})\n")
        out.append(table(["N", "step ms", "µs / token", "step / N", "raters / N", "scores / N",
                          "recycle / N"], rows))

    full = b.get("BM_full_attention/576")
    rows = []
    for n, v in b.items():
        m = re.match(r"BM_scores_from_qk/(\d+)/(\d+)$", n)
        if not m:
            continue
        N, R = int(m.group(1)), int(m.group(2))
        against = full if (full and N == 576) else None
        rows.append([f"L {int(v['L'])} (N {N}), R {R}", fmt(ms(v)),
                     fmt(ms(against)) if against else "not run (11 GB)",
                     fmt(ms(against) / ms(v), 3) + "×" if against else "—",
                     fmt(v["temp_bytes"] / 1e6), fmt(v["full_matrix_bytes"] / 1e6 +
                                                      (v["L"] ** 2) * 4 / 1e6)])
    if rows:
        out.append("\n### Scores from Q/K against the full [H, L, L] softmax and head mean\n")
        out.append(table(["shape (H 32, dh 128, float32)", "from Q/K, ms", "full, ms", "speed-up",
                          "Q/K temp MB", "full temp MB"], rows))

    rows = []
    for n, v in b.items():
        if n.startswith(("BM_step/", "BM_layer/", "BM_stages/", "BM_scores_from_qk/",
                         "BM_full_attention/")):
            continue
        counters = {"GB/s": rate(v, "GB/s"), "x_of_limit": timed(v, "x_of_limit"),
                    "rank": v.get("rank")}
        counters = {k: x for k, x in counters.items() if x is not None}
        note = ", ".join(f"{k} {fmt(x)}" for k, x in counters.items())
        rows.append([f"`{n.replace('/real_time', '')}`", fmt(ms(v)), note, v.get("label", "")])
    if rows:
        out.append("\n### Other benchmarks\n")
        out.append(table(["benchmark", "ms", "counters", "label"], rows))

    return "\n".join(out)


if __name__ == "__main__":
    main()
