"""Stock vLLM 0.32 (CPU build) on the tiny LLaVA (tiny_llava.py) decodes greedily to the
tokens transformers gives: the ground the vLLM plugin (test_plugin.py) stands on. Runs in
build/venv-vllm (./scripts/vllm-env.sh):

    build/venv-vllm/bin/python -m pytest -q tests/vllm

(./scripts/test.sh runs them.)
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import tiny_llava  # noqa: E402

import vllm  # noqa: E402  (conftest.py: a Python without vLLM fails here, never skips)


def test_greedy_tokens_equal_transformers(tmp_path, monkeypatch):
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # one process: no spawn guard
    model, proc = tiny_llava.build(4, seed=1)
    path = tiny_llava.save(model, proc, str(tmp_path / "tiny"))
    prompts = [tiny_llava.prompt(q) for q in ("What is in the picture?", "How many dogs?")]
    images = [tiny_llava.image(s) for s in (0, 1)]

    hf = LlavaForConditionalGeneration.from_pretrained(path).eval()
    hp = AutoProcessor.from_pretrained(path)
    want = []
    for text, img in zip(prompts, images):
        inp = hp(images=img, text=text, return_tensors="pt")
        assert int((inp["input_ids"] == hf.config.image_token_id).sum()) == 576
        with torch.no_grad():
            out = hf.generate(**inp, max_new_tokens=8, do_sample=False)
        want.append(out[0, inp["input_ids"].shape[1]:].tolist())

    llm = vllm.LLM(model=path, enforce_eager=True, max_model_len=1024, dtype="float32",
                   runner="generate",  # the tiny config is otherwise taken for a pooling model
                   limit_mm_per_prompt={"image": 1})
    outs = llm.generate([{"prompt": p, "multi_modal_data": {"image": i}}
                         for p, i in zip(prompts, images)],
                        vllm.SamplingParams(max_tokens=8, temperature=0.0))
    got = [list(o.outputs[0].token_ids) for o in outs]
    assert [len(o.prompt_token_ids) for o in outs] == [
        len(hp(images=i, text=p)["input_ids"][0]) for p, i in zip(prompts, images)]
    assert got == want
