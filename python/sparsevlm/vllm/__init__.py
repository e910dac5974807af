"""SparseVLM inside vLLM V1's own prefill (docs/vllm.md): out of tree, vLLM unchanged.

    import sparsevlm.vllm, vllm
    llm = vllm.LLM(model=path, max_model_len=4096, **sparsevlm.vllm.engine_args("v1.5-192"))
    llm.generate(...)                   # each prompt with an image is pruned in its prefill

Installing the package registers the ``vllm.general_plugins`` entry point
:func:`register`, which vLLM calls in every one of its processes: it adds the
architectures of :data:`ARCHITECTURES` to vLLM's model registry (lazily: nothing of
vLLM is imported until a model is built). An engine prunes when its config names
one of them (``hf_overrides={"architectures": [...]}``) and carries the preset
(``hf_overrides={"sparsevlm": {"preset": ...}}``); :func:`engine_args` writes both,
with the engine settings the plugin needs. Other engines stay stock.

This module imports nothing of vLLM; ``sparsevlm.vllm.models`` holds the model
classes (it imports vLLM). Tested with vLLM ``TESTED_VLLM`` (CPU build, CPU_ATTN).
"""
from __future__ import annotations

import os
from typing import Optional, Union

TESTED_VLLM = "0.32.0"
"""The vLLM version the plugin is tested with; other versions are refused at start-up
(the plugin relies on vLLM internals, listed in docs/vllm.md)."""

ARCHITECTURES = {
    # vLLM's (and the checkpoint's) architecture -> the SparseVLM one
    "LlavaForConditionalGeneration": "SparseVLMLlavaForConditionalGeneration",
    "LlavaNextForConditionalGeneration": "SparseVLMLlavaNextForConditionalGeneration",
    "Qwen2VLForConditionalGeneration": "SparseVLMQwen2VLForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration": "SparseVLMQwen2_5_VLForConditionalGeneration",
}
"""The stock architectures the plugin has a SparseVLM version of."""

OPTIONS = ("preset", "positions", "budget", "kv", "dump_dir")
"""The keys of ``hf_overrides["sparsevlm"]`` (see :func:`engine_args`)."""


def register() -> None:
    """The ``vllm.general_plugins`` entry point: registers :data:`ARCHITECTURES`'
    SparseVLM classes with vLLM's ``ModelRegistry`` (by name; imported on use)."""
    from vllm import ModelRegistry

    for ours in ARCHITECTURES.values():
        if ours not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(ours, f"sparsevlm.vllm.models:{ours}")


def engine_args(preset: str = "v1.5-192", *, architecture: str = "LlavaForConditionalGeneration",
                positions: Optional[str] = None, budget: Optional[str] = None,
                kv: str = "reference", dump_dir: Optional[Union[str, os.PathLike]] = None,
                max_model_len: Optional[int] = None) -> dict:
    """The ``vllm.LLM`` / ``EngineArgs`` keyword arguments that make an engine prune.

    preset: a published preset's name (``sparsevlm.preset_names()``), derived for the
    model's depth and each prompt's visual tokens as the Hugging Face drop-in does.
    architecture: the checkpoint's (a key of :data:`ARCHITECTURES`). positions:
    None (the preset's), "renumber" or "keep_original". budget: None, "global" or
    "per_span". kv: the caches of the layers up to a pruning layer, as
    ``sparsevlm.hf``'s ``kv=`` ("reference": kept whole; "survivors" or "merged":
    compacted inside the request's pages, so those layers decode against fewer rows;
    vLLM still reserves every page). dump_dir: write every pruning step as a case folder (as the
    environment variable ``SPARSEVLM_DUMP_DIR`` does). max_model_len: also sets
    ``max_num_batched_tokens`` to it (a prompt must fit one step: raters need the
    whole prompt).

    Returns ``hf_overrides`` (architecture and options) with ``enforce_eager=True``,
    ``enable_prefix_caching=False`` and ``enable_chunked_prefill=False``, which the
    plugin requires (it refuses an engine without them, naming the setting). Raises
    :class:`sparsevlm.Error` naming the argument.
    """
    from .. import Error, preset_names
    from ..hf import _check_options

    if architecture not in ARCHITECTURES:
        raise Error(f"architecture: expected one of {list(ARCHITECTURES)}, got {architecture!r}")
    names = list(preset_names())
    if preset not in names:
        raise Error(f"preset: expected one of {names}, got {preset!r}")
    _check_options(kv=kv, positions=positions, budget=budget)
    options = {"preset": preset, "positions": positions, "budget": budget, "kv": kv,
               "dump_dir": None if dump_dir is None else os.fspath(dump_dir)}
    out = {"hf_overrides": {"architectures": [ARCHITECTURES[architecture]], "sparsevlm": options},
           "enforce_eager": True, "enable_prefix_caching": False, "enable_chunked_prefill": False}
    if max_model_len is not None:
        out["max_model_len"] = out["max_num_batched_tokens"] = int(max_model_len)
    return out
