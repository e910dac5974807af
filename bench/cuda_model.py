#!/usr/bin/env python3
"""A performance model of one CUDA pruning step, per kernel, until a GPU measures it.

Takes the launch plan from `sparsevlm cuda-plan` (the kernels prune_step_async
launches, with their grids) and, per kernel, the bytes it moves and the
arithmetic it does at that shape; the time each needs at an H100's rates, with
the grid's share of the GPU (a kernel of B blocks uses at most B of its 132 SMs)
and one thread's latency for the serial parts. Prints a Markdown table (the one
in docs/cuda.md) or JSON.

    python3 bench/cuda_model.py --cli build/examples/sparsevlm --model llava-1.5-7b
    python3 bench/cuda_model.py --cli ... --model video-llava-7b --visual 9216 --json
    python3 bench/cuda_model.py --cli ... --model llava-1.5-7b --batch 32   # per sequence

Assumptions (H100 SXM; an H200 has the same SMs and 4.8 TB/s): 3.35 TB/s HBM,
67 TFLOP/s FP32 and 34 TFLOP/s FP64 without tensor cores, 132 SMs, 2 ns per
dependent double operation on one thread, 1.5 us between back-to-back launches
on a stream (about 0.7 us inside a CUDA graph), 1 us between two phases of a
chained launch (the blocks of the next phase are already resident and poll a
counter in L2). The raters are taken as all T
text tokens (the worst case, R <= T); elements are 2 bytes (bf16) for the
engine's tensors. A model, not a measurement: it says where the time goes.
"""
import argparse
import json
import math
import subprocess
import sys

BW = 3.35e12  # bytes/s
FP32 = 67e12
FP64 = 34e12
SMS = 132
SERIAL = 2e-9  # s per dependent double op on one thread
GAP = 1.5e-6  # s between launches on a stream
HANDOFF = 1.0e-6  # s between two phases of a chained launch (the last block's fence and
                  # count, seen by a polling block of the next phase: an L2 round trip or two)
MAX_PARAM = 32764  # kernel parameter bytes (CUDA 12.1+; launch_plan.hpp's detail::max_param_bytes)
ELEM = 2  # bytes per element of the engine's tensors (bf16)
EXP_FLOPS = 30  # double flops of the library's exp (range reduction, degree-13 Horner)


def kernel_cost(name, grid, sh):
    """(bytes, fp32 flops, fp64 flops, serial ops) of one kernel at shape sh."""
    N, T, L, H, de, d, dh = sh["N"], sh["T"], sh["L"], sh["H"], sh["de"], sh["d"], sh["dh"]
    R, m, s, c = T, min(T, N), sh["s"], sh["c"]
    p2 = 1 << max(s - 1, 0).bit_length() if s > 0 else 0
    table = {
        "counts_reset": (0, 0, 0, 8),
        "rater_logits": ((N + T) * de * ELEM + N * T * 4, 2 * N * T * de, 0, 0),
        "rater_row_stats": (N * T * 4, 0, N * T * EXP_FLOPS, 0),
        "rater_column_means": (N * T * 4, 0, N * T * EXP_FLOPS, 0),
        "rater_pick": (T * 8, 0, 0, 2 * T),
        "rater_copy": (R * 8, 0, 0, 0),
        "scores_from_attention": (H * R * N * ELEM + (R + 1) * N * 4, H * R * N + R * N, 0, 0),
        "qk_logits": ((H * R + H * L) * dh * ELEM + H * R * L * 4, 2 * H * R * L * dh, 0, 0),
        "qk_row_stats": (H * R * L * 4, 0, H * R * L * EXP_FLOPS, 0),
        "scores_from_qk": (H * R * N * 4 + (R + 1) * N * 4, H * R * N, H * R * N * EXP_FLOPS, 0),
        "rank_gram": (m * N * 4 + m * m * 8, 0, 2 * m * m * N, 0),
        # Householder over the block (4/3 m^3): the three cross-row sums (every
        # thread takes them) and each thread's row sum, 8 lane sums each (a chain
        # of r/8 + 3 for r rows left: about m^2/4 + 12 m dependent operations),
        # and 3 barriers per column (priced as 10 operations each);
        # then about 9 multisection rounds, each a Sturm count (3 dependent
        # operations per step) per thread, a scan of the 64 counts and 2
        # barriers; then one count.
        "rank_solve": (m * m * 8, 0, 4 * m ** 3 // 3,
                       m * m // 4 + 12 * m + 30 * m + 9 * (3 * m + 64 + 20) + 3 * m),
        "keep_decide": (0, 0, 0, 16),
        "keep_ranks": (N * 12, N * N, 0, 0),
        "keep_list": (N * 16, 0, 0, N // 4),
        # With its lanes split over two blocks (grid y twice x), the odd half is
        # written apart (G2) and read again by recycle_diag and recycle_distances.
        "recycle_gram": (s * d * ELEM + s * s * 8 * (2 if grid[1] > grid[0] else 1), 0,
                         2 * s * s * d, 0),
        "recycle_diag": (s * 8, 0, 0, 0),
        "recycle_distances": (2 * s * s * 8, 0, 6 * s * s, 0),  # D and its maximum
        "recycle_density": (s * s * 8, 0, s * p2 * max(int(math.log2(max(p2, 1))), 1) ** 2 // 2, 0),
        "recycle_gamma": (s * s * 8, 0, s * s, 0),
        "recycle_centres": (s * 16, 0, s * c, 0),
        "recycle_assign": (s * c * 8, 0, s * c, 0),
        "recycle_offsets": (s * 8, 0, 0, s),
        "recycle_members": (s * 16, 0, 0, 0),
        "recycle_merge": (s * d * ELEM + c * d * 4, 0, s * d, 0),
        "plan_sequence": (L * 8 * 2, 0, 0, 0),
    }
    return table.get(name, (0, 0, 0, 0))


def model(plan, sh, batch=1):
    """Per phase of each launch (a launch without phases is one), its time; the
    launch gaps; the handoffs between the phases of a chained launch. With
    batch = K (prune_batch_async: launch i of K equal steps as one grid), each
    phase has K times the blocks, bytes and flops, and its serial latency once:
    the steps' one-block phases run side by side."""
    rows, total, handoffs = [], 0.0, 0
    for k in plan["kernels"]:
        phases = k.get("phases") or [{"name": k["name"], "grid": k["grid"]}]
        handoffs += len(phases) - 1
        for ph in phases:
            blocks = ph["grid"][0] * ph["grid"][1] * ph["grid"][2]
            first = ph["name"].split("+")[0]
            if first in ("rank_gram", "recycle_gram"):
                # Symmetric: the blocks below the diagonal return at once (a grid
                # of twice the rows splits each dot product's lanes over two blocks).
                blocks = ph["grid"][0] * (ph["grid"][0] + 1) // 2 * (ph["grid"][1] // ph["grid"][0])
            # A fused body ("a+b"): body a over the grid, then b on the one block
            # that finishes last (with_tail) or on the same block (in_order).
            t, tb, t32, t64, tserial = 0.0, 0, 0, 0, 0
            for i, part in enumerate(ph["name"].split("+")):
                share = min(1.0, (blocks if i == 0 else 1) * batch / SMS)
                b, f32, f64, serial = kernel_cost(part, ph["grid"], sh)
                b, f32, f64 = b * batch, f32 * batch, f64 * batch
                t += max(b / (BW * share), f32 / (FP32 * share), f64 / (FP64 * share)) + serial * SERIAL
                tb, t32, t64, tserial = tb + b, t32 + f32, t64 + f64, tserial + serial
            rows.append({"name": ph["name"], "blocks": blocks, "bytes": tb, "fp32_flops": t32,
                         "fp64_flops": t64, "serial_ops": tserial, "us": t * 1e6})
            total += t
    # A batched launch carries as many steps as its parameters hold
    # (cuda/detail/batch.hpp's batch_width); more steps take more launches.
    launches = 0
    for k in plan["kernels"]:
        width = max(1, min(32, (MAX_PARAM - 64) // (k.get("param_bytes", 0) + 24)))
        launches += -(-batch // width)
    gaps = GAP * launches
    hand = HANDOFF * handoffs
    total_us = (total + gaps + hand) * 1e6
    return {"kernels": rows, "launches": launches, "handoffs": handoffs, "batch": batch,
            "compute_us": total * 1e6, "launch_gaps_us": gaps * 1e6, "handoffs_us": hand * 1e6,
            "total_us": total_us, "per_seq_us": total_us / batch}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cli", required=True, help="the sparsevlm CLI")
    ap.add_argument("--model", default="llava-1.5-7b")
    ap.add_argument("--visual", type=int)
    ap.add_argument("--text", type=int, default=60)
    ap.add_argument("--scores-from", default="attn", choices=["attn", "qk"])
    ap.add_argument("--batch", type=int, default=1,
                    help="K equal steps through prune_batch_async (launch i of every step as one grid)")
    ap.add_argument("--json", action="store_true", help="JSON instead of a Markdown table")
    a = ap.parse_args()
    cmd = [a.cli, "cuda-plan", "--model", a.model, "--text", str(a.text), "--scores-from",
           a.scores_from]
    if a.visual:
        cmd += ["--visual", str(a.visual)]
    plan = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    # The shape and the recycled counts as the library computes them (the plan's own).
    N, L, heads, d = plan["visual"]["len"], plan["length"], plan["heads"], plan["hidden"]
    sh = {"N": N, "T": plan["text"], "L": L, "H": heads, "de": d, "d": d, "dh": d // heads,
          "s": plan["recycled_max"], "c": plan["clusters_max"]}
    out = model(plan, sh, max(1, a.batch))
    out["shape"] = sh
    if a.json:
        json.dump(out, sys.stdout, indent=1)
        print()
        return
    print(f"{a.model}, N {N}, T {a.text}, L {L}, scores from {a.scores_from}, batch {out['batch']}: "
          f"{out['launches']} launches, {len(out['kernels'])} kernels")
    print()
    print("| kernel | blocks | MB moved | GFLOP fp32 | GFLOP fp64 | serial ops | model µs |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in out["kernels"]:
        print(f"| `{r['name']}` | {r['blocks']} | {r['bytes'] / 1e6:.2f} | "
              f"{r['fp32_flops'] / 1e9:.3f} | {r['fp64_flops'] / 1e9:.3f} | {r['serial_ops']} | "
              f"{r['us']:.1f} |")
    print(f"| kernels | | | | | | {out['compute_us']:.0f} |")
    print(f"| launch gaps ({out['launches']} × {GAP * 1e6:.1f} µs) | | | | | | "
          f"{out['launch_gaps_us']:.0f} |")
    print(f"| phase handoffs ({out['handoffs']} × {HANDOFF * 1e6:.1f} µs) | | | | | | "
          f"{out['handoffs_us']:.0f} |")
    if out["batch"] == 1:
        print(f"| **step** | | | | | | **{out['total_us']:.0f}** |")
    else:
        print(f"| **batch of {out['batch']}** | | | | | | **{out['total_us']:.0f}** |")
        print(f"| **per sequence** | | | | | | **{out['per_seq_us']:.1f}** |")


if __name__ == "__main__":
    main()
