"""tests/vllm run in build/venv-vllm (./scripts/vllm-env.sh); anywhere else they fail at
collection, rather than skip, so a run that lacks vLLM cannot pass."""
import importlib.util
import sys

if importlib.util.find_spec("vllm") is None:
    raise RuntimeError(f"tests/vllm: expected vLLM in this Python ({sys.executable}); run them "
                       f"with build/venv-vllm/bin/python (./scripts/vllm-env.sh makes it)")
