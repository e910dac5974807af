"""The Hugging Face drop-in's pruned greedy generate() on a tiny checkpoint: the reference
the vLLM plugin is checked against. Runs in build/venv (transformers 5.24, what
sparsevlm.hf is tested with; vLLM 0.32 pins transformers < 5.20):

    build/venv/bin/python tests/vllm/hf_reference.py specs.json out.json

specs: {name: spec}, run one after another in this process (importing torch and
transformers takes most of a tiny model's time), each on a model loaded afresh. Each
spec: {"model": dir, "family": "llava" (default) | "llava_next" | "qwen2_vl" |
"qwen2_5_vl", "inputs": an .npz from tiny_llava.inputs (ids<i>, and for a prompt with an image pix<i>
with LLaVA-NeXT's sizes<i> or Qwen's grid<i>), "max_tokens": [per prompt], "preset": a
name or null (stock), "kv" and "positions": sparsevlm.hf's kv= and positions= (defaults
"reference" and null), "dump_dir": a folder or null}. Each prompt runs alone (batch 1).
out: {name: [{"tokens", "logprobs"}] per prompt (the chosen tokens' log-probabilities)}.
"""
import json
import sys

import numpy as np
import torch


def _run(spec):
    import sparsevlm.hf
    import transformers

    cls = {"llava": "LlavaForConditionalGeneration",
           "llava_next": "LlavaNextForConditionalGeneration",
           "qwen2_vl": "Qwen2VLForConditionalGeneration",
           "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}[spec.get("family", "llava")]
    model = getattr(transformers, cls).from_pretrained(spec["model"]).eval()
    if spec.get("preset"):
        sparsevlm.hf.sparsify(model, spec["preset"], kv=spec.get("kv", "reference"),
                              positions=spec.get("positions"), dump_dir=spec.get("dump_dir"))
    data = np.load(spec["inputs"])
    out = []
    for i, m in enumerate(spec["max_tokens"]):
        kw = {"input_ids": torch.from_numpy(data[f"ids{i}"])}
        if f"pix{i}" in data:
            kw["pixel_values"] = torch.from_numpy(data[f"pix{i}"])
        if f"sizes{i}" in data:
            kw["image_sizes"] = torch.from_numpy(data[f"sizes{i}"])
        if f"grid{i}" in data:  # Qwen2-VL: M-RoPE needs the grid and each token's type
            kw["image_grid_thw"] = torch.from_numpy(data[f"grid{i}"])
            kw["mm_token_type_ids"] = (kw["input_ids"] == model.config.image_token_id).int()
        with torch.no_grad():
            g = model.generate(**kw, max_new_tokens=m, do_sample=False, output_scores=True,
                               return_dict_in_generate=True)
        toks = g.sequences[0, kw["input_ids"].shape[1]:].tolist()
        lps = [float(torch.log_softmax(s[0].float(), -1)[t]) for s, t in zip(g.scores, toks)]
        out.append({"tokens": toks, "logprobs": lps})
    return out


def main(spec_path, out_path):
    specs = json.load(open(spec_path))
    json.dump({name: _run(spec) for name, spec in specs.items()}, open(out_path, "w"))


if __name__ == "__main__":
    main(*sys.argv[1:3])
