#!/usr/bin/env python3
"""Prefill time with and without sparsevlm.hf.sparsify, per model family, in one run.

Each family of sparsevlm.hf.SUPPORTED is built with random weights
(tests/python/hf_models.py) at a LLaVA-like token count: 35 prefix + about 576
visual + 60 text tokens (LLaVA: CLIP 336/14; LLaVA-NeXT: AnyRes at 336 px tiles,
base + tiles + newlines, and LLaVA-OneVision the same; Qwen2-VL / Qwen2.5-VL: a
48 x 48 patch grid, 576 merged tokens; Qwen2.5-VL video: 2 temporal patches of
24 x 24, 288 tokens; InternVL: 9 tiles of 64 tokens, 576; Qwen3-VL: 48 x 48 patches,
576 tokens, deepstack after layers 0 and 1). The decoder
is --layers x --hidden (16 x 1024, 16 heads, 4 KV heads, MLP 2816 by default); the
preset (v1.5-192 by default) is derived for that depth and each prompt's visual count.
A prefill is one `model(**inputs)` forward (vision tower included, use_cache on),
stock and sparsified alternately, median of --repeats, on --threads threads.

    build/venv/bin/python bench/hf_prefill.py --threads 1 --repeats 5
    build/venv/bin/python bench/hf_prefill.py --families llava qwen2_vl --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "python"))
sys.path.insert(0, os.path.dirname(__file__))
import hf_models as hm  # noqa: E402
from python_overhead import cpu_model  # noqa: E402

import sparsevlm.hf  # noqa: E402

CASES = {
    "llava": ("llava", dict(image_size=336), {"images": 1}),
    "llava_next": ("llava_next", dict(image_size=336, grid_pinpoints=[[336, 672], [672, 336]]),
                   {"images": 1, "sizes": [(336, 672)]}),
    "qwen2_vl": ("qwen2_vl", {}, {"images": 1, "grid": (48, 48)}),
    "qwen2_5_vl": ("qwen2_5_vl", {}, {"images": 1, "grid": (48, 48)}),
    "qwen2_5_vl video": ("qwen2_5_vl", {}, {"video": True, "frames": 2, "grid": (24, 24)}),
    "llava_onevision": ("llava_onevision", dict(image_size=336,
                                                grid_pinpoints=[[336, 672], [672, 336]]),
                        {"images": 1, "sizes": [(336, 672)]}),
    "internvl": ("internvl", {}, {"images": 1, "tiles": 9}),
    "qwen3_vl": ("qwen3_vl", {}, {"images": 1, "grid": (48, 48)}),
}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--families", nargs="*", default=list(CASES), choices=list(CASES))
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--preset", default="v1.5-192")
    p.add_argument("--kv", default="reference", choices=sparsevlm.hf.KV_OPTIONS)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="also write the rows as JSON here")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    print(f"CPU: {cpu_model()}, {a.threads} thread(s); decoder {a.layers} x {a.hidden}, "
          f"{a.heads} heads ({a.kv_heads} KV), float32; preset {a.preset}, kv={a.kv}; "
          f"median of {a.repeats}")
    rows = []
    for name in a.families:
        family, extra, prompt = CASES[name]
        model = hm.build(family, layers=a.layers, hidden=a.hidden, heads=a.heads,
                         kv_heads=a.kv_heads, intermediate=int(a.hidden * 2.75), vocab=1000,
                         vision_hidden=64, vision_heads=4, **extra)
        kw = hm.inputs(model, family, prompts=[{"prefix": 35, "text": 60, **prompt}])
        handle = sparsevlm.hf.sparsify(model, a.preset, kv=a.kv)
        handle.remove()
        times = {"stock": [], "pruned": []}
        stats = None
        for _ in range(a.repeats):
            for mode in ("stock", "pruned"):
                h = sparsevlm.hf.sparsify(model, a.preset, kv=a.kv) if mode == "pruned" else None
                t = time.perf_counter()
                with torch.no_grad():
                    model(**kw)
                times[mode].append(time.perf_counter() - t)
                if h is not None:
                    stats = h.stats[0]
                    h.remove()
        stock, pruned = (statistics.median(times[m]) * 1e3 for m in ("stock", "pruned"))
        row = {"family": name, "class": type(model).__name__, "tokens": stats.tokens[0],
               "visual": sum(s[1] for s in stats.spans), "spans": len(stats.spans),
               "after": stats.tokens[-1], "stock_ms": round(stock, 1),
               "pruned_ms": round(pruned, 1), "speedup": round(stock / pruned, 3)}
        rows.append(row)
        print(f"{name:17s} {row['class']:36s} {row['tokens']:5d} tokens ({row['visual']} visual in "
              f"{row['spans']} span(s)) -> {row['after']:4d}: stock {stock:7.0f} ms, "
              f"pruned {pruned:7.0f} ms, {stock / pruned:.2f}x")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"cpu": cpu_model(), "threads": a.threads, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
