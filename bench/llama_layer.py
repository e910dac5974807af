#!/usr/bin/env python3
"""One Llama-7B decoder layer's bf16 prefill on a GPU, for scale against a pruning step.

A LlamaDecoderLayer (hidden 4096, 32 heads, MLP 11008, transformers' own module,
random weights) runs a prefill of --length tokens (671: LLaVA-1.5's 35 + 576 + 60)
in bfloat16 with SDPA attention; the median of --repeat forwards, timed with CUDA
events. Prints one JSON line.

    python3 bench/llama_layer.py --length 671 --repeat 50
"""
import argparse
import json
import statistics


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--length", type=int, default=671)
    ap.add_argument("--repeat", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    a = ap.parse_args()
    import torch
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    if not torch.cuda.is_available():
        raise SystemExit("llama_layer: no CUDA device")
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                      num_key_value_heads=32, max_position_embeddings=4096)
    cfg._attn_implementation = "sdpa"
    dev, dt = torch.device("cuda"), torch.bfloat16
    layer = LlamaDecoderLayer(cfg, layer_idx=0).to(dev, dt).eval()
    rope = LlamaRotaryEmbedding(cfg).to(dev)
    x = torch.randn(1, a.length, 4096, device=dev, dtype=dt)
    pos = torch.arange(a.length, device=dev)[None]
    emb = rope(x, pos)
    times = []
    with torch.no_grad():
        for i in range(a.warmup + a.repeat):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            layer(x, position_embeddings=emb, position_ids=pos, attention_mask=None)
            end.record()
            torch.cuda.synchronize()
            if i >= a.warmup:
                times.append(start.elapsed_time(end))
    print(json.dumps({"layer": "llama-7b", "dtype": "bf16", "length": a.length,
                      "median_ms": statistics.median(times), "min_ms": min(times),
                      "device": torch.cuda.get_device_name(0)}))


if __name__ == "__main__":
    main()
