"""A tiny random-weight LLaVA-NeXT saved as a checkpoint vLLM 0.32 and transformers both load.

CLIP at 224 px with 14 px patches (16 x 16 = 256 tokens a tile), AnyRes grid pinpoints
[[224, 448], [448, 224], [448, 448]]: a 224 x 448 (h x w) picture is laid out as the base
tile, two tiles side by side, and an ``image_newline`` per feature row: 256 + 16 * 32 + 16 =
784 image tokens, one span. The Llama decoder, tokenizer and prompt are tiny_llava's.
Same interface as tiny_llava (build, save, image, prompt, text_prompt, inputs).
"""
from __future__ import annotations

import tiny_llava

IMAGE = tiny_llava.IMAGE
prompt, text_prompt, save = tiny_llava.prompt, tiny_llava.text_prompt, tiny_llava.save
PINPOINTS = [[224, 448], [448, 224], [448, 448]]


def image(seed: int = 0):
    return tiny_llava.image(seed, size=(448, 224))


def inputs(processor, prompts, path: str) -> str:
    import sys

    return tiny_llava.inputs(processor, prompts, path, sys.modules[__name__])


def build(layers: int = 8, *, seed: int = 0, vocab: int = 512):
    """(model, processor): the float32 LLaVA-NeXT and its LlavaNextProcessor."""
    import torch
    from transformers import (CLIPVisionConfig, LlavaNextConfig,
                              LlavaNextForConditionalGeneration, LlavaNextImageProcessor,
                              LlavaNextProcessor)

    tok = tiny_llava._tokenizer(vocab)
    text = tiny_llava.text_config(tok, layers)
    vision = CLIPVisionConfig(image_size=224, patch_size=14, hidden_size=64, intermediate_size=128,
                              num_hidden_layers=2, num_attention_heads=2, projection_dim=64)
    cfg = LlavaNextConfig(text_config=text, vision_config=vision,
                          image_token_id=tok.convert_tokens_to_ids(IMAGE),
                          image_grid_pinpoints=PINPOINTS,
                          vision_feature_layer=-2, vision_feature_select_strategy="default",
                          projector_hidden_act="gelu", tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = tiny_llava.spread(LlavaNextForConditionalGeneration(cfg).float().eval())
    ip = LlavaNextImageProcessor(size={"shortest_edge": 224},
                                 crop_size={"height": 224, "width": 224},
                                 image_grid_pinpoints=PINPOINTS)
    proc = LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=14,
                              vision_feature_select_strategy="default", image_token=IMAGE,
                              num_additional_image_tokens=1, chat_template=None)
    return model, proc
