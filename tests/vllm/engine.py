"""Runs vLLM engines on the tiny checkpoints, one after another in this process, and
writes what each generated, as JSON.

    build/venv-vllm/bin/python tests/vllm/engine.py specs.json out.json

specs: {name: spec}. Each spec: {"model": dir, "family": "llava" (default) |
"llava_next" | "qwen2_vl" | "qwen2_5_vl", "engine": {LLM keyword arguments}, "sparsevlm":
{engine_args keyword arguments} or null (stock), "env": {variables set while the
engine is built and runs; the first engine's are set before vLLM is imported, so an
engine whose workers read them at import (tensor parallel) runs in a call of its own},
"runs": [{"kind": "batch" | "staggered", "prompts": [{"question", "image" (a seed, or
null), "max_tokens"}]}]}. A "batch" run is one ``llm.generate``; a "staggered" run adds
its prompts one at a time through the engine's ``add_request``, each after the previous
one decoded two tokens, so prefills share steps with decodes.

out: {name: {"runs": [[{"tokens", "logprobs", "prompt_len"}] per prompt], "steps": per
forward of the SparseVLM model, its requests as [tokens, seq_len, "prefill" | "decode" |
"stock"]; "resumes": prefills recognised as a preempted request's recompute; "rewriter":
the metadata rewriter's class (null when no step ran pruned); "error": the exception's
text when the engine failed to start ("start") or to run ("run")}}. The engines share a
process (importing torch and vLLM and starting a process take most of a tiny engine's
time); each is deleted, and vLLM's own cleanup between engines run (what its tests do),
before the next is built. The engine runs in this process
(VLLM_ENABLE_V1_MULTIPROCESSING=0) so the plugin's steps can be recorded here.
"""
import json
import os
import sys
import traceback

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tiny_llava  # noqa: E402
import tiny_llava_next  # noqa: E402
import tiny_qwen2_5_vl  # noqa: E402
import tiny_qwen2_vl  # noqa: E402

FAMILY = {"llava": tiny_llava, "llava_next": tiny_llava_next, "qwen2_vl": tiny_qwen2_vl,
          "qwen2_5_vl": tiny_qwen2_5_vl}
tiny = tiny_llava

STEPS: list = []
RESUMES = [0]
REWRITER = [None]


def _record():
    from sparsevlm.vllm import models

    requests, resumed = models.Runtime._requests, models.Runtime._resumed

    def _requests(self, md, *a):
        REWRITER[0] = type(self.rewriter).__name__
        reqs = requests(self, md, *a)
        STEPS.append([[r.n, r.seq, "prefill" if r.session is not None else
                       "decode" if r.state is not None else "stock"] for r in reqs])
        return reqs

    def _resumed(self, ids):
        out = resumed(self, ids)
        RESUMES[0] += out is not None
        return out

    models.Runtime._requests, models.Runtime._resumed = _requests, _resumed


def _prompt(p):
    if p.get("image") is None:
        return {"prompt": tiny.text_prompt(p["question"])}
    return {"prompt": tiny.prompt(p["question"]),
            "multi_modal_data": {"image": tiny.image(p["image"])}}


def _result(out):
    o = out.outputs[0]
    return {"tokens": list(o.token_ids),
            "logprobs": [float(lp[t].logprob) for t, lp in zip(o.token_ids, o.logprobs)],
            "prompt_len": len(out.prompt_token_ids)}


def _staggered(llm, vllm, prompts):
    eng = llm.llm_engine
    done: dict = {}
    pending = list(enumerate(prompts))
    decoded = 2  # the first prompt starts at once
    while pending or eng.has_unfinished_requests():
        if pending and decoded >= 2:
            i, p = pending.pop(0)
            eng.add_request(str(i), _prompt(p), _params(vllm, p))
            decoded = 0
        for out in eng.step():
            if out.finished:
                done[int(out.request_id)] = _result(out)
        decoded += 1
    return [done[i] for i in range(len(prompts))]


def _params(vllm, p):
    return vllm.SamplingParams(max_tokens=p["max_tokens"], temperature=0.0, logprobs=1)


def _run(name, spec):
    """One engine of the specs: builds it, runs its runs, deletes it."""
    global tiny
    tiny = FAMILY[spec.get("family", "llava")]
    STEPS.clear()
    RESUMES[0] = 0
    REWRITER[0] = None
    out = {"runs": [], "steps": [], "resumes": 0, "rewriter": None}
    import vllm

    kw = {}
    if spec.get("sparsevlm") is not None:
        import sparsevlm.vllm

        kw = sparsevlm.vllm.engine_args(**spec["sparsevlm"])
    kw.update(spec["engine"])  # after: the refused settings' test overrides engine_args
    try:
        llm = vllm.LLM(model=spec["model"], dtype="float32", runner="generate",
                       limit_mm_per_prompt={"image": 1}, **kw)
    except Exception as e:  # the refused settings' test reads this
        out["error"] = f"start: {type(e).__name__}: {e}"
        return out
    try:
        for run in spec["runs"]:
            prompts = run["prompts"]
            if run["kind"] == "batch":
                res = llm.generate([_prompt(p) for p in prompts],
                                   [_params(vllm, p) for p in prompts])
                out["runs"].append([_result(r) for r in res])
            else:
                out["runs"].append(_staggered(llm, vllm, prompts))
    except Exception:
        out["error"] = f"run {name}: {traceback.format_exc()}"
    finally:
        del llm
    out.update(steps=list(STEPS), resumes=RESUMES[0], rewriter=REWRITER[0])
    return out


def main(spec_path, out_path):
    specs = json.load(open(spec_path))
    out = {}
    recorded = False
    for name, spec in specs.items():
        env = spec.get("env", {})
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        if spec.get("sparsevlm") is not None and not recorded:
            _record()
            recorded = True
        try:
            out[name] = _run(name, spec)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            # What vLLM's tests do between engines in one process: the model-parallel
            # groups torn down, the environment's cache dropped, the memory collected.
            from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

            cleanup_dist_env_and_memory()
        json.dump(out, open(out_path, "w"))  # what ran so far, should a later engine crash


if __name__ == "__main__":
    main(*sys.argv[1:3])
