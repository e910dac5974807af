#!/usr/bin/env python3
"""SparseVLM inside Hugging Face ``generate()``: load, sparsify, generate.

What a user copies (any class of ``sparsevlm.hf.SUPPORTED``)::

    import torch, sparsevlm.hf
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float16, device_map="auto")
    processor = AutoProcessor.from_pretrained(path)
    inputs = processor(images=image, text=prompt, return_tensors="pt").to(model.device)
    handle = sparsevlm.hf.sparsify(model, "v1.5-192")        # the one line
    out = model.generate(**inputs, max_new_tokens=64, do_sample=False)
    print(processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    print(handle.stats[0].tokens)                            # tokens entering each layer

Run it::

    build/venv/bin/python examples/python/hf_generate.py            # random-weight LLaVA built in code
    build/venv/bin/python examples/python/hf_generate.py --model DIR --image cat.jpg \\
        --prompt "USER: <image>\\nWhat is in the picture? ASSISTANT:"

Without ``--model`` it builds a LLaVA-1.5-like model with random weights (CLIP at 336 px
with 14 px patches: 576 image tokens; a Llama of ``--layers`` layers), so it needs no
download; the generated tokens then mean nothing, the token counts and times do.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import sparsevlm.hf


def random_llava(layers: int, hidden: int, heads: int):
    """A LLaVA-1.5-shaped model with random weights, and a 35 + 576 + 60 token prompt."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    vision = CLIPVisionConfig(image_size=336, patch_size=14, hidden_size=64, intermediate_size=128,
                              num_hidden_layers=2, num_attention_heads=4)
    text = LlamaConfig(vocab_size=32064, hidden_size=hidden, intermediate_size=int(hidden * 2.75),
                       num_hidden_layers=layers, num_attention_heads=heads, bos_token_id=1,
                       eos_token_id=None, pad_token_id=0)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=32000)
    model = LlavaForConditionalGeneration._from_config(config, attn_implementation="sdpa").eval()
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, None
    g = torch.Generator().manual_seed(1)
    words = lambda n: torch.randint(2, 32000, (n,), generator=g)  # noqa: E731
    ids = torch.cat([torch.tensor([1]), words(34), torch.full((576,), 32000), words(60)])[None]
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
              "pixel_values": torch.randn(1, 3, 336, 336, generator=g)}
    return model, None, inputs


def load(path: str, image: str, prompt: str, device: str):
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    dtype = torch.float16 if device == "cuda" else torch.float32
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype).to(device).eval()
    processor = AutoProcessor.from_pretrained(path)
    inputs = processor(images=Image.open(image), text=prompt, return_tensors="pt").to(device)
    return model, processor, dict(inputs)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a local checkpoint or hub id (default: random weights)")
    p.add_argument("--image")
    p.add_argument("--prompt")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", default="v1.5-192", help="a published preset (sparsevlm.preset_names())")
    p.add_argument("--kv", default="reference", choices=sparsevlm.hf.KV_OPTIONS)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--layers", type=int, default=16, help="random model: decoder layers")
    p.add_argument("--hidden", type=int, default=1024, help="random model: hidden size")
    p.add_argument("--heads", type=int, default=16, help="random model: attention heads")
    p.add_argument("--repeats", type=int, default=3, help="prefill timings: median of this many")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.model:
        if not (a.image and a.prompt):
            p.error("--model needs --image and --prompt")
        model, processor, inputs = load(a.model, a.image, a.prompt, a.device)
    else:
        model, processor, inputs = random_llava(a.layers, a.hidden, a.heads)

    def prefill_ms():
        t = []
        for _ in range(a.repeats):
            start = time.perf_counter()
            with torch.no_grad():
                model(**inputs)
            t.append(time.perf_counter() - start)
        return statistics.median(t) * 1e3

    stock_ms = prefill_ms()
    with torch.no_grad():
        stock = model.generate(**inputs, max_new_tokens=a.new_tokens, do_sample=False)
    handle = sparsevlm.hf.sparsify(model, a.preset, kv=a.kv)  # the one line
    pruned_ms = prefill_ms()
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=a.new_tokens, do_sample=False)
    row = handle.stats[0]
    start = inputs["input_ids"].shape[1]
    print(f"{type(model).__name__}, {len(row.tokens)} decoder layers, preset {a.preset}, kv={a.kv}")
    print(f"visual spans {row.spans}, {len(row.raters)} raters")
    print(f"tokens entering each layer: {row.tokens}")
    for s in row.steps:
        print(f"  after layer {s.layer}: rank {s.rank}, kept {s.kept} of {s.visual}, "
              f"recycled {s.recycled}, {s.length} tokens")
    for name, ids in (("stock", stock), ("pruned", out)):
        text = ids[0, start:].tolist()
        if processor is not None:
            text = processor.batch_decode(ids[:, start:], skip_special_tokens=True)[0]
        print(f"{name:6s} generate: {text}")
    print(f"prefill (forward, median of {a.repeats}, {a.threads} thread(s)): stock {stock_ms:.0f} ms, "
          f"pruned {pruned_ms:.0f} ms ({stock_ms / pruned_ms:.2f}x)")
    handle.remove()


if __name__ == "__main__":
    main()
