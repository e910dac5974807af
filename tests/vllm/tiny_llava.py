"""A tiny random-weight LLaVA-1.5 saved as a checkpoint vLLM 0.32 and transformers both load.

CLIP at 336 px with 14 px patches (576 image tokens, as LLaVA-1.5), a Llama decoder of
hidden 256 and `layers` layers, a small byte-level BPE tokenizer trained here (no hub
access), LLaVA's processor and prompt format ("USER: <image>\\n... ASSISTANT:"). float32.

vLLM 0.32's loader expects the vision tower's weights as ``vision_tower.vision_model.*``
(transformers 5.x saves ``vision_tower.*``); :func:`save` renames them; transformers
loads either.
"""
from __future__ import annotations

import os

IMAGE = "<image>"
SPECIAL = ["<unk>", "<s>", "</s>", "<pad>", IMAGE]
_CORPUS = [
    "USER: What is in the picture? ASSISTANT: A cat sits on a red mat near the door.",
    "Describe the image in one sentence. The sky is blue and the grass is green.",
    "How many dogs are there? There are two dogs playing with a ball in the park.",
    "What color is the car? The car is yellow, parked by the old stone bridge.",
    "a b c d e f g h i j k l m n o p q r s t u v w x y z 0 1 2 3 4 5 6 7 8 9 . , ? !",
]


def _tokenizer(vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>",
                                   extra_special_tokens={"image_token": IMAGE})


def text_config(tok, layers: int, *, hidden: int = 256, heads: int = 4, intermediate: int = 512):
    """The Llama decoder config of the tiny LLaVA models (as many KV heads as heads)."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate,
                       num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=heads, max_position_embeddings=4096,
                       rms_norm_eps=1e-5, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                       tie_word_embeddings=False)


def spread(model):
    """Scales the decoder's q/k projections by 4 (in place): random weights then give a
    spread of attention, not a near-uniform one, so the pruning decisions matter."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if "language_model" in name and name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(4.0)
    return model


def build(layers: int = 4, *, seed: int = 0, vocab: int = 512, hidden: int = 256, heads: int = 4,
          intermediate: int = 512):
    """(model, processor): the float32 LLaVA and its LlavaProcessor, weights from `seed`;
    the decoder `layers` x `hidden` wide with `heads` heads (as many KV heads) and an
    MLP of `intermediate`."""
    import torch
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    tok = _tokenizer(vocab)
    text = text_config(tok, layers, hidden=hidden, heads=heads, intermediate=intermediate)
    vision = CLIPVisionConfig(image_size=336, patch_size=14, hidden_size=64, intermediate_size=128,
                              num_hidden_layers=2, num_attention_heads=2, projection_dim=64)
    cfg = LlavaConfig(text_config=text, vision_config=vision,
                      image_token_id=tok.convert_tokens_to_ids(IMAGE),
                      vision_feature_layer=-2, vision_feature_select_strategy="default",
                      projector_hidden_act="gelu", tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = spread(LlavaForConditionalGeneration(cfg).float().eval())
    ip = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=14,
                          vision_feature_select_strategy="default", image_token=IMAGE,
                          num_additional_image_tokens=1,
                          chat_template=None)
    return model, proc


def save(model, proc, path: str) -> str:
    """Writes the checkpoint (safetensors, config, tokenizer, processor) to `path`."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    model.config.save_pretrained(path)
    model.generation_config.save_pretrained(path)
    proc.save_pretrained(path)
    state = {}
    for k, v in model.state_dict().items():
        if k.startswith("model.vision_tower.") and \
                not k.startswith("model.vision_tower.vision_model."):
            k = "model.vision_tower.vision_model." + k[len("model.vision_tower."):]
        state[k] = v.detach().contiguous().clone()
    save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    return path


def image(seed: int = 0, size=(336, 336)):
    """A random RGB picture (PIL)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def prompt(question: str) -> str:
    return f"USER: {IMAGE}\n{question} ASSISTANT:"


def text_prompt(question: str) -> str:
    """A prompt without an image (the plugin leaves it to the stock path)."""
    return f"USER: {question} ASSISTANT:"


_NAMES = {"input_ids": "ids", "pixel_values": "pix", "image_sizes": "sizes",
          "image_grid_thw": "grid"}


def inputs(processor, prompts, path: str, family=None) -> str:
    """Writes what the processor makes of `prompts` ({"question", "image": seed or None})
    to the .npz `path`: ids<i> (input_ids) and, for a prompt with an image, pix<i>
    (pixel_values) with sizes<i> (LLaVA-NeXT's image_sizes) or grid<i> (Qwen's
    image_grid_thw). family: the tiny_* module whose prompt format and pictures to use
    (this one by default)."""
    import sys

    import numpy as np

    fam = family or sys.modules[__name__]
    arrays = {}
    for i, p in enumerate(prompts):
        if p.get("image") is None:
            x = processor(text=fam.text_prompt(p["question"]), return_tensors="np")
        else:
            x = processor(images=fam.image(p["image"]), text=fam.prompt(p["question"]),
                          return_tensors="np")
        for k, short in _NAMES.items():
            if k in x:
                arrays[f"{short}{i}"] = np.asarray(x[k])
    np.savez(path, **arrays)
    return path
