#!/usr/bin/env python3
"""vLLM prefill and decode speed with and without the SparseVLM plugin, in one run.

A random-weight LLaVA-1.5-shaped checkpoint (tests/vllm/tiny_llava.py: CLIP 336/14, 576
image tokens, a byte-level BPE tokenizer) with a --layers x --hidden Llama decoder (16 x
512, 8 heads, MLP 1408 by default) is served by vLLM's CPU build, stock and with
``sparsevlm.vllm.engine_args(--preset)`` (v1.5-192: derived for 16 layers), each engine in
its own process (eager, no prefix caching, no chunked prefill in both, so only the
pruning differs). Per repeat: a batch of --batch prompts, each with its own picture,
generated with max_tokens=1 (the prefill, vision tower included) and with
max_tokens=--decode (decode tokens/s = batch * (decode - 1) / (t_decode - t_prefill)).
Medians of --repeats after one warm-up; ratios from the same run.

    build/venv-vllm/bin/python bench/vllm_throughput.py
    build/venv-vllm/bin/python bench/vllm_throughput.py --layers 16 --batch 4 --json out.json
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

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "vllm"))
import tiny_llava  # noqa: E402

QUESTIONS = ["What is in the picture?", "How many dogs?", "Describe the image.",
             "What color is the car?"]


def _engine(args) -> dict:
    """One engine (this process): the timings of --repeats repeats."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    import vllm

    kw = dict(enforce_eager=True, enable_prefix_caching=False, enable_chunked_prefill=False,
              max_model_len=1024, max_num_batched_tokens=1024 * args.batch)
    if args.mode == "pruned":
        import sparsevlm.vllm

        kw.update(sparsevlm.vllm.engine_args(args.preset))
        kw["max_num_batched_tokens"] = 1024 * args.batch
    llm = vllm.LLM(model=args.model, dtype="float32", runner="generate",
                   limit_mm_per_prompt={"image": 1}, max_num_seqs=args.batch, **kw)
    prompts = [{"prompt": tiny_llava.prompt(QUESTIONS[i % len(QUESTIONS)]),
                "multi_modal_data": {"image": tiny_llava.image(i)}} for i in range(args.batch)]

    def run(m):
        t = time.perf_counter()
        out = llm.generate(prompts, vllm.SamplingParams(max_tokens=m, temperature=0.0,
                                                        ignore_eos=True), use_tqdm=False)
        return time.perf_counter() - t, out

    run(args.decode)  # warm-up
    pre, dec = [], []
    for _ in range(args.repeats):
        t1, out = run(1)
        tn, _ = run(args.decode)
        pre.append(t1)
        dec.append(args.batch * (args.decode - 1) / max(tn - t1, 1e-9))
    return {"prefill_s": statistics.median(pre), "prefill_all": pre,
            "decode_tok_s": statistics.median(dec), "decode_all": dec,
            "prompt_tokens": [len(o.prompt_token_ids) for o in out]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--intermediate", type=int, default=1408)
    ap.add_argument("--preset", default="v1.5-192")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--decode", type=int, default=33)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json")
    ap.add_argument("--mode", choices=["stock", "pruned"], help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mode:  # a child: one engine
        json.dump(_engine(args), open(args.out, "w"))
        return
    with tempfile.TemporaryDirectory() as tmp:
        model, proc = tiny_llava.build(args.layers, seed=1, hidden=args.hidden, heads=args.heads,
                                       intermediate=args.intermediate)
        path = tiny_llava.save(model, proc, os.path.join(tmp, "model"))
        del model
        res = {}
        for mode in ("stock", "pruned"):
            out = os.path.join(tmp, f"{mode}.json")
            cmd = [sys.executable, __file__, "--mode", mode, "--model", path, "--out", out]
            for k in ("layers", "hidden", "heads", "intermediate", "preset", "batch", "decode",
                      "repeats"):
                cmd += [f"--{k}", str(getattr(args, k))]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            res[mode] = json.load(open(out))
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if "model name" in l)
    except (OSError, StopIteration):
        pass
    s, p = res["stock"], res["pruned"]
    report = {"cpu": cpu, "cores": os.cpu_count(), "shape": vars(args) | {"mode": None},
              "prompt_tokens": s["prompt_tokens"], "stock": s, "pruned": p,
              "prefill_speedup": s["prefill_s"] / p["prefill_s"],
              "decode_speedup": p["decode_tok_s"] / s["decode_tok_s"]}
    print(f"{cpu}, {os.cpu_count()} cores; decoder {args.layers} x {args.hidden} "
          f"({args.heads} heads, MLP {args.intermediate}); prompts of {s['prompt_tokens']} "
          f"tokens (576 image each); {args.preset}")
    print(f"{'':8} {'prefill s':>10} {'prefill tok/s':>14} {'decode tok/s':>13}")
    for name, r in (("stock", s), ("pruned", p)):
        rate = sum(r["prompt_tokens"]) / r["prefill_s"]
        print(f"{name:8} {r['prefill_s']:10.3f} {rate:14.0f} {r['decode_tok_s']:13.1f}")
    print(f"prefill x{report['prefill_speedup']:.2f}, decode x{report['decode_speedup']:.2f} "
          f"(stock / pruned time; medians of {args.repeats})")
    if args.json:
        json.dump(report, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
