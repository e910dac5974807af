"""A tiny random-weight Qwen2.5-VL saved as a checkpoint vLLM 0.32 and transformers both load.

tiny_qwen2_vl's decoder, tokenizer, pictures and prompt with Qwen2.5-VL's vision tower
(window attention in 112 px windows, full attention in its last layer, RMSNorm, SwiGLU):
336 x 336 px -> 144 image tokens. Same interface as tiny_llava.
"""
from __future__ import annotations

import tiny_llava
import tiny_qwen2_vl

image, prompt, text_prompt, save = (tiny_qwen2_vl.image, tiny_qwen2_vl.prompt,
                                    tiny_qwen2_vl.text_prompt, tiny_qwen2_vl.save)


def inputs(processor, prompts, path: str) -> str:
    import sys

    return tiny_llava.inputs(processor, prompts, path, sys.modules[__name__])


def build(layers: int = 8, *, seed: int = 0, vocab: int = 512):
    """(model, processor): the float32 Qwen2.5-VL and its Qwen2_5_VLProcessor."""
    import torch
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                              Qwen2_5_VLProcessor)
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    tok = tiny_qwen2_vl._tokenizer(vocab)
    ids = {k: tok.convert_tokens_to_ids(t) for k, t in zip(
        ("vision_start_token_id", "vision_end_token_id", "image_token_id", "video_token_id"),
        tiny_qwen2_vl.VISION)}
    text = tiny_qwen2_vl.text_config(tok, layers)
    vision = dict(depth=2, hidden_size=64, intermediate_size=128, out_hidden_size=256, num_heads=2,
                  patch_size=14, temporal_patch_size=2, spatial_merge_size=2, window_size=112,
                  fullatt_block_indexes=[1], tokens_per_second=2)
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)
    torch.manual_seed(seed)
    model = tiny_llava.spread(Qwen2_5_VLForConditionalGeneration(cfg).float().eval())
    kw = dict(min_pixels=336 * 336, max_pixels=336 * 336, patch_size=14, temporal_patch_size=2,
              merge_size=2)
    proc = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(**kw), tokenizer=tok,
                               video_processor=Qwen2VLVideoProcessor(**kw), chat_template=None)
    return model, proc
