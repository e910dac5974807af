"""A tiny random-weight Qwen2-VL saved as a checkpoint vLLM 0.32 and transformers both load.

Qwen2-VL's vision tower (14 px patches, temporal patch 2, 2x2 merge) at 336 x 336 px
(a grid of 24 x 24 patches -> 144 image tokens), a Qwen2 decoder of hidden 256 with
M-RoPE (``mrope_section`` [8, 12, 12] for head_dim 64) and `layers` layers, the byte-level
BPE tokenizer of tiny_llava.py with Qwen's vision tokens, Qwen2-VL's processor and the
prompt "<|vision_start|><|image_pad|><|vision_end|>question". float32. Same interface as
tiny_llava (build, save, image, prompt, text_prompt, inputs).
"""
from __future__ import annotations

import os

import tiny_llava

VISION = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
image = tiny_llava.image


def _tokenizer(vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab,
                                  special_tokens=["<unk>", "<|endoftext|>"] + VISION,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(tiny_llava._CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>",
                                   eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>",
                                   extra_special_tokens={"image_token": "<|image_pad|>",
                                                         "video_token": "<|video_pad|>",
                                                         "vision_bos_token": "<|vision_start|>",
                                                         "vision_eos_token": "<|vision_end|>"})


def text_config(tok, layers: int) -> dict:
    """The Qwen2 decoder config of the tiny Qwen models: hidden 256, 4 heads of 64,
    M-RoPE sections [8, 12, 12]."""
    return dict(vocab_size=len(tok), hidden_size=256, intermediate_size=512,
                num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                max_position_embeddings=4096, rms_norm_eps=1e-6, max_window_layers=layers,
                use_sliding_window=False,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                 "mrope_section": [8, 12, 12]},
                bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                tie_word_embeddings=False)


def build(layers: int = 8, *, seed: int = 0, vocab: int = 512):
    """(model, processor): the float32 Qwen2-VL and its Qwen2VLProcessor, weights from `seed`."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    tok = _tokenizer(vocab)
    ids = {k: tok.convert_tokens_to_ids(t) for k, t in zip(
        ("vision_start_token_id", "vision_end_token_id", "image_token_id", "video_token_id"),
        VISION)}
    text = text_config(tok, layers)
    vision = dict(depth=2, embed_dim=64, hidden_size=256, mlp_ratio=2, num_heads=2, patch_size=14,
                  temporal_patch_size=2, spatial_merge_size=2)
    cfg = Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)
    torch.manual_seed(seed)
    model = tiny_llava.spread(Qwen2VLForConditionalGeneration(cfg).float().eval())
    ip = Qwen2VLImageProcessor(min_pixels=336 * 336, max_pixels=336 * 336, patch_size=14,
                               temporal_patch_size=2, merge_size=2)
    vp = Qwen2VLVideoProcessor(min_pixels=336 * 336, max_pixels=336 * 336, patch_size=14,
                               temporal_patch_size=2, merge_size=2)
    proc = Qwen2VLProcessor(image_processor=ip, tokenizer=tok, video_processor=vp,
                            chat_template=None)
    return model, proc


def save(model, proc, path: str) -> str:
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    proc.save_pretrained(path)
    return path


def prompt(question: str) -> str:
    return f"<|vision_start|><|image_pad|><|vision_end|>{question}"


def text_prompt(question: str) -> str:
    return question


def inputs(processor, prompts, path: str) -> str:
    import sys

    return tiny_llava.inputs(processor, prompts, path, sys.modules[__name__])
