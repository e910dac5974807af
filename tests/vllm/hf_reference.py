"""The Hugging Face drop-in's pruned greedy generate() on the tiny LLaVA: the reference
the vLLM plugin is checked against. Runs in build/venv (transformers 5.24, what
sparsevlm.hf is tested with; vLLM 0.32 pins transformers < 5.20):

    build/venv/bin/python tests/vllm/hf_reference.py spec.json out.json

spec: {"model": dir, "inputs": an .npz with ids<i> [1, n] and, for prompts with an
image, pix<i> (made by the checkpoint's processor), "max_tokens": [per prompt],
"preset": name or null (stock), "dump_dir": dir or null}. Each prompt runs alone.
out: [{"tokens", "logprobs"}] per prompt (the chosen tokens' log-probabilities).
"""
import json
import sys

import numpy as np
import torch


def main(spec_path, out_path):
    import sparsevlm.hf
    from transformers import LlavaForConditionalGeneration

    spec = json.load(open(spec_path))
    model = LlavaForConditionalGeneration.from_pretrained(spec["model"]).eval()
    if spec.get("preset"):
        sparsevlm.hf.sparsify(model, spec["preset"], dump_dir=spec.get("dump_dir"))
    data = np.load(spec["inputs"])
    out = []
    for i, m in enumerate(spec["max_tokens"]):
        kw = {"input_ids": torch.from_numpy(data[f"ids{i}"])}
        if f"pix{i}" in data:
            kw["pixel_values"] = torch.from_numpy(data[f"pix{i}"])
        with torch.no_grad():
            g = model.generate(**kw, max_new_tokens=m, do_sample=False, output_scores=True,
                               return_dict_in_generate=True)
        toks = g.sequences[0, kw["input_ids"].shape[1]:].tolist()
        lps = [float(torch.log_softmax(s[0].float(), -1)[t]) for s, t in zip(g.scores, toks)]
        out.append({"tokens": toks, "logprobs": lps})
    json.dump(out, open(out_path, "w"))


if __name__ == "__main__":
    main(*sys.argv[1:3])
