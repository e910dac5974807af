"""Tiny random-weight Hugging Face vision-language models and matching inputs.

A helper for the tests in this folder (no tests here). Everything is built from
configs in code: no hub access, no processor or tokenizer download. Seven families:

=================  ========================================  ==========================================
family             class                                     image placeholder tokens (defaults)
=================  ========================================  ==========================================
"llava"            LlavaForConditionalGeneration             (image_size / patch)^2 = (112/14)^2 = 64
"llava_next"       LlavaNextForConditionalGeneration         AnyRes: base tile + unpadded tiles + one
                                                             image_newline per feature row; an image of
                                                             (H, W) = (112, 224) gives 64 + 8*16 + 8 = 200
"qwen2_vl"         Qwen2VLForConditionalGeneration           t*h*w / merge^2; grid (1, 16, 16) -> 64
"qwen2_5_vl"       Qwen2_5_VLForConditionalGeneration        same; a video of grid (2, 16, 16) -> 128
                                                             (2 temporal groups of 64; qwen2_vl takes
                                                             videos the same way)
"llava_onevision"  LlavaOnevisionForConditionalGeneration    the only image of its row: AnyRes as
                                                             llava_next (SigLIP tile, no CLS), (112, 224)
                                                             -> 64 + 8*16 + 8 = 200; each image of a row
                                                             with several: base tile + one newline = 65
                                                             (the processor's multi-image mode); a video
                                                             of F frames -> F * 4*4 + 1 = 33 for F = 2
"internvl"         InternVLForConditionalGeneration          per tile (image_size / patch)^2 / 4 (pixel
                                                             shuffle 0.5) = (112/7)^2 / 4 = 64, inside
                                                             one <img> ... </img> pair per image
"qwen3_vl"         Qwen3VLForConditionalGeneration           image: h*w / merge^2; grid (16, 16) -> 64;
                                                             a video of grid (t, 16, 16): t runs of 64,
                                                             one per temporal patch (2 frames), each
                                                             after its own timestamp text and inside its
                                                             own vision_start ... vision_end
=================  ========================================  ==========================================

`build(family, ...)` returns the model (eval mode, deterministic from `seed`);
`inputs(model, family, prompts=[...])` returns the kwargs for `model.generate(**kw)`
or `model(**kw)`; `visual_token_counts` says how many placeholder tokens each image or
video of a prompt gets and `special_ids` / `text_id_range` say which ids are what.

Token ids (vocab V, 300 by default): pad 0 (`pad_token_id`), BOS 1 (LLaVA and
LLaVA-NeXT only: their rows start with it; id 1 is unused elsewhere), the special ids at
the top of the vocabulary (LLaVA: image V-1; Qwen, Qwen3-VL too: vision_start V-4,
vision_end V-3, image V-2, video V-1; OneVision: image V-2, video V-1; InternVL:
image_start `<img>` V-3, image_end `</img>` V-2, image `<IMG_CONTEXT>` V-1, the order of
the released checkpoints' 151665-151667) and ordinary text ids drawn from `text_id_range(model)` =
[2, lowest special id), which avoids every special id. There is no EOS
(`eos_token_id=None`), so greedy generation always runs `max_new_tokens` steps.

OneVision and InternVL use a Qwen2 text model (`Qwen2Model`, full attention in every
layer, untied lm_head); InternVL's config has no start/end ids, so they are kept as
`config.image_start_token_id` / `config.image_end_token_id` (see `special_ids`).

Qwen3-VL uses `Qwen3VLTextModel`: per-head RMS q_norm / k_norm (applied before RoPE),
interleaved M-RoPE (position_ids [4, B, L]: the text row, then t, h, w) and DeepStack
(the merged features of `deepstack_visual_indexes` vision layers are added to the
visual positions' hidden states after decoder layers 0, 1, ...). As its processor does,
it lays a video out per temporal patch: `<t.t seconds>` timestamp text (here a run of
ordinary ids), vision_start, the patch's video tokens, vision_end (see `inputs`).

Checked (outside the test suite) for every family with sdpa and eager attention:
greedy `generate` on batches of 1-5 rows with different prompts, left padding, text-only
rows and (Qwen) image and video rows mixed gives every row the tokens and logits (to
~2e-7) of that row run alone; the LLaVA-NeXT counts equal both the processor's
`_get_number_of_features` formula and the lengths `get_image_features` returns. The
same for OneVision (single- and multi-image rows, video rows) and InternVL (1-3 tiles
per image): the counts equal the processors' formulas and the feature lengths. Qwen3-VL
likewise (batches of 1-3 rows: images, several images of other grids, videos with 0, 6
and 7 timestamp tokens, text-only rows; logits to ~3e-7), its `mm_token_type_ids` equal
`create_mm_token_type_ids`' and the positions `generate` passes equal `get_rope_index`'s.
"""

from __future__ import annotations

import torch
from transformers import (
    CLIPVisionConfig,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Config,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    SiglipVisionConfig,
)
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches
from transformers.models.llava_onevision.modeling_llava_onevision import (
    image_size_to_num_patches as _onevision_num_patches,
)

FAMILIES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "llava_onevision", "internvl", "qwen3_vl")
#: Llama text model, rows start with BOS.
LLAVA_FAMILIES = ("llava", "llava_next")
#: M-RoPE text model, flat patches with `image_grid_thw` / `video_grid_thw` and
#: `mm_token_type_ids`, vision_start / vision_end around every image and every video
#: (Qwen3-VL: around every temporal patch of a video, each after its timestamp text).
QWEN_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
#: AnyRes tiling: `pixel_values` [num_images, max_tiles, 3, H, W] and `image_sizes`.
ANYRES_FAMILIES = ("llava_next", "llava_onevision")
#: Take a video (prompt key "video").
VIDEO_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "llava_onevision", "qwen3_vl")
#: Plain Qwen2 text model (1-D positions, full attention), no BOS.
QWEN2_TEXT_FAMILIES = ("llava_onevision", "internvl")

PAD_ID = 0
BOS_ID = 1

#: LLaVA / LLaVA-NeXT vision tile (CLIP image_size) and patch size.
LLAVA_IMAGE_SIZE = 112
LLAVA_PATCH = 14
#: LLaVA-NeXT image_grid_pinpoints (height, width), multiples of the tile size.
LLAVA_NEXT_PINPOINTS = [[112, 224], [224, 112], [224, 224]]
#: Default original image size (H, W) for LLaVA-NeXT: best resolution 112x224, 1x2 tiles.
LLAVA_NEXT_IMAGE = (112, 224)
#: Qwen patch size, temporal patch size, spatial merge size, default (h, w) patch grid.
QWEN_PATCH = 14
QWEN_TEMPORAL_PATCH = 2
QWEN_MERGE = 2
QWEN_GRID = (16, 16)
#: InternVL patch size: 112 / 7 = 16 patches a side, 8 after the 0.5 pixel shuffle -> 64.
INTERNVL_PATCH = 7
#: Qwen3-VL patch size (the released checkpoints': 16 px, flat patch rows of 3*2*16*16 = 1536).
QWEN3_PATCH = 16
#: Default timestamp tokens before each temporal patch of a Qwen3-VL video: the
#: processor writes "<0.2 seconds>", 6 tokens in the Qwen tokenizer ("<", "0", ".", "2",
#: " seconds", ">"; 7 from 10 s on).
QWEN3_TIMESTAMP = 6

_CLASSES = {
    "llava": LlavaForConditionalGeneration,
    "llava_next": LlavaNextForConditionalGeneration,
    "qwen2_vl": Qwen2VLForConditionalGeneration,
    "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
    "llava_onevision": LlavaOnevisionForConditionalGeneration,
    "internvl": InternVLForConditionalGeneration,
    "qwen3_vl": Qwen3VLForConditionalGeneration,
}


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, not {family!r}")


def _mrope_section(head_dim: int) -> list[int]:
    """Split head_dim / 2 rotary frequencies into (temporal, height, width) sections,
    the way the released checkpoints do (16, 24, 24 for head_dim 128): t gets a
    quarter, h and w share the rest."""
    half = head_dim // 2
    if half < 3:
        raise ValueError(f"head_dim {head_dim} is too small for M-RoPE")
    t = max(1, half // 4)
    h = (half - t) // 2
    return [t, h, half - t - h]


def _interleaved_mrope_section(head_dim: int) -> list[int]:
    """Qwen3-VL's (t, h, w) split of head_dim / 2 frequencies, h = w as in the released
    [24, 20, 20] for head_dim 128 ([4, 2, 2] for 16). Its rotary embedding interleaves
    them (frequency i is h when i % 3 == 1 and i < 3h, w when i % 3 == 2 and i < 3w, t
    otherwise), so 3 * w <= head_dim / 2 keeps every section whole."""
    half = head_dim // 2
    if half < 3:
        raise ValueError(f"head_dim {head_dim} is too small for M-RoPE")
    hw = max(1, min(half * 5 // 16, half // 3))
    return [half - 2 * hw, hw, hw]


def _deepstack_indexes(depth: int) -> list[int]:
    """Default Qwen3-VL DeepStack vision layers: [s, 2s, 3s] with s = (depth - 1) // 3
    (the released [8, 16, 24] for depth 27), every layer for depth <= 3 ([0, 1] for 2)."""
    step = (depth - 1) // 3
    return [step, 2 * step, 3 * step] if step >= 1 else list(range(depth))


# ------------------------------------------------------------------ models


def build(
    family: str,
    *,
    layers: int = 4,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    vocab: int = 300,
    intermediate: int | None = None,
    vision_layers: int = 2,
    vision_hidden: int = 32,
    vision_heads: int = 2,
    image_size: int = LLAVA_IMAGE_SIZE,
    patch_size: int | None = None,
    grid_pinpoints: list[list[int]] | None = None,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    seed: int = 0,
    deepstack: list[int] | None = None,
):
    """A tiny random-weight VLM of `family`, in eval mode, weights fixed by `seed` and the sizes.

    Text model: `layers` decoder layers, width `hidden`, `heads` query heads and
    `kv_heads` key/value heads (head_dim = hidden / heads), MLP width `intermediate`
    (2 * hidden by default), vocabulary `vocab`, pad id 0, no EOS. LLaVA families use a
    Llama (BOS 1); the Qwen families their own text model with M-RoPE whose
    `mrope_section` sums to head_dim / 2 (e.g. [2, 3, 3] for head_dim 16; Qwen3-VL's
    interleaved one [4, 2, 2]); OneVision and
    InternVL a Qwen2 (`Qwen2Config`, rope_theta 1e6, use_sliding_window False and
    layer_types all "full_attention", tie_word_embeddings False, no BOS).

    Vision tower: `vision_layers` layers of width `vision_hidden` with `vision_heads` heads.

    * "llava": CLIP at `image_size` px (112) with `patch_size` px patches (14),
      feature layer -2, "default" strategy (CLS dropped): (112/14)^2 = 64 tokens/image.
    * "llava_next": the same CLIP tile, `grid_pinpoints` (default
      [[112, 224], [224, 112], [224, 224]]), "spatial_unpad" packing with image_newline.
    * "qwen2_vl" / "qwen2_5_vl": `patch_size` 14, temporal patch 2, spatial merge 2.
      Qwen2.5-VL: window attention (window_size 112 px = 4x4 merged tokens) in every
      vision layer but the last, which is full attention (fullatt_block_indexes);
      tokens_per_second 2 as in the released checkpoints.
    * "llava_onevision": a SigLIP tile (no CLS, no pooling head) at `image_size` px with
      `patch_size` px patches (14), feature layer -1, "full" strategy, `grid_pinpoints`
      as llava_next, "anyres_max_9" (the unpadded grid is shrunk only past 1.1^2 * 9 tiles' area),
      image_newline; videos are 2x2 bilinear-pooled per frame.
    * "internvl": InternVL vision (CLS dropped, "default" strategy, last layer) at
      `image_size` px with `patch_size` px patches (7), pixel shuffle 0.5; the side
      image_size / patch must be even. `config.image_seq_length` = tokens per tile.
    * "qwen3_vl": text `Qwen3VLTextConfig` (head_dim = hidden / heads set explicitly,
      q_norm / k_norm, rope_theta 5e6, interleaved `mrope_section` from
      `_interleaved_mrope_section`, [4, 2, 2] for head_dim 16, untied lm_head); vision
      `patch_size` 16, temporal patch 2, spatial merge 2, MLP 2 * vision_hidden, the
      default 2304 = 48^2 learned position embeddings (bilinearly resampled to each
      grid), `deepstack` (default `_deepstack_indexes(vision_layers)`: [0, 1] for 2
      layers) the vision layers whose merged features are added after text layers
      0, 1, ... (only the first `layers` of them are used).

    `attn_implementation` ("sdpa", "eager", ...) is set for the whole model (text and
    vision) through `Cls._from_config(config, attn_implementation=..., dtype=dtype)`.
    """
    _check_family(family)
    if deepstack is not None and family != "qwen3_vl":
        raise ValueError("deepstack is a qwen3_vl option")
    if hidden % heads or heads % kv_heads:
        raise ValueError("hidden must be a multiple of heads and heads a multiple of kv_heads")
    intermediate = intermediate or 2 * hidden
    head_dim = hidden // heads
    torch.manual_seed(seed)
    # The decoder's sizes, shared by both kinds of text config. No EOS: greedy
    # generation always runs max_new_tokens steps.
    sizes = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                 num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                 max_position_embeddings=4096, eos_token_id=None, pad_token_id=PAD_ID)
    # The CLIP / SigLIP towers' sizes (LLaVA families).
    tower = dict(image_size=image_size, patch_size=patch_size or LLAVA_PATCH,
                 hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                 num_hidden_layers=vision_layers, num_attention_heads=vision_heads)
    # The Qwen2.5-VL / Qwen3-VL towers' sizes.
    qwen_tower = dict(depth=vision_layers, hidden_size=vision_hidden,
                      intermediate_size=2 * vision_hidden, out_hidden_size=hidden,
                      num_heads=vision_heads, temporal_patch_size=QWEN_TEMPORAL_PATCH,
                      spatial_merge_size=QWEN_MERGE)
    # AnyRes pinpoints: LLaVA-NeXT's, scaled to the tile size.
    pinpoints = [list(p) for p in grid_pinpoints or [
        [h * image_size // LLAVA_IMAGE_SIZE, w * image_size // LLAVA_IMAGE_SIZE]
        for h, w in LLAVA_NEXT_PINPOINTS]]
    if family in LLAVA_FAMILIES:
        patch = patch_size or LLAVA_PATCH
        vision = CLIPVisionConfig(**tower, projection_dim=vision_hidden)
        text = LlamaConfig(**sizes, bos_token_id=BOS_ID)
        common = dict(
            vision_config=vision,
            text_config=text,
            image_token_id=vocab - 1,
            vision_feature_select_strategy="default",
            vision_feature_layer=-2,
            image_seq_length=(image_size // patch) ** 2,
        )
        if family == "llava":
            config = LlavaConfig(**common)
        else:
            config = LlavaNextConfig(**common, image_grid_pinpoints=pinpoints)
    elif family in QWEN2_TEXT_FAMILIES:
        text = Qwen2Config(
            **sizes,
            bos_token_id=None,
            use_sliding_window=False,
            max_window_layers=layers,
            layer_types=["full_attention"] * layers,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            tie_word_embeddings=False,
        )
        if family == "llava_onevision":
            patch = patch_size or LLAVA_PATCH
            vision = SiglipVisionConfig(**tower, vision_use_head=False)
            config = LlavaOnevisionConfig(
                vision_config=vision,
                text_config=text,
                image_token_index=vocab - 2,
                video_token_index=vocab - 1,
                vision_feature_select_strategy="full",
                vision_feature_layer=-1,
                image_grid_pinpoints=pinpoints,
                vision_aspect_ratio="anyres_max_9",
                tie_word_embeddings=False,
            )
        else:
            patch = patch_size or INTERNVL_PATCH
            side = image_size // patch
            if image_size % patch or side % 2:
                raise ValueError(f"image_size / patch_size = {image_size} / {patch} must be an even integer")
            vision = InternVLVisionConfig(
                image_size=image_size,
                patch_size=patch,
                hidden_size=vision_hidden,
                intermediate_size=2 * vision_hidden,
                num_hidden_layers=vision_layers,
                num_attention_heads=vision_heads,
            )
            config = InternVLConfig(
                vision_config=vision,
                text_config=text,
                image_token_id=vocab - 1,
                image_seq_length=(side // 2) ** 2,
                downsample_ratio=0.5,
                vision_feature_layer=-1,
                vision_feature_select_strategy="default",
                tie_word_embeddings=False,
            )
            # Not InternVLConfig fields (the processor's tokenizer owns them): kept here
            # for `special_ids`.
            config.image_start_token_id = vocab - 3
            config.image_end_token_id = vocab - 2
    elif family == "qwen3_vl":
        patch = patch_size or QWEN3_PATCH
        stack = _deepstack_indexes(vision_layers) if deepstack is None else [int(i) for i in deepstack]
        if not stack or any(not 0 <= i < vision_layers for i in stack) or len(set(stack)) < len(stack):
            raise ValueError(f"deepstack {stack}: expected distinct vision layers in [0, {vision_layers})")
        text = dict(
            **sizes,
            head_dim=head_dim,
            bos_token_id=None,
            rope_parameters={"rope_type": "default", "rope_theta": 5000000.0,
                             "mrope_section": _interleaved_mrope_section(head_dim),
                             "mrope_interleaved": True},
        )
        vision = dict(**qwen_tower, patch_size=patch, deepstack_visual_indexes=stack)
        config = Qwen3VLConfig(text_config=text, vision_config=vision, vision_start_token_id=vocab - 4,
                               vision_end_token_id=vocab - 3, image_token_id=vocab - 2,
                               video_token_id=vocab - 1, tie_word_embeddings=False)
    else:
        patch = patch_size or QWEN_PATCH
        text = dict(
            **sizes,
            max_window_layers=layers,
            use_sliding_window=False,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                             "mrope_section": _mrope_section(head_dim)},
            bos_token_id=None,
        )
        ids = dict(
            vision_start_token_id=vocab - 4,
            vision_end_token_id=vocab - 3,
            image_token_id=vocab - 2,
            video_token_id=vocab - 1,
        )
        if family == "qwen2_vl":
            vision = dict(
                depth=vision_layers,
                embed_dim=vision_hidden,
                hidden_size=hidden,  # the merger's output width = the text width
                mlp_ratio=2,
                num_heads=vision_heads,
                patch_size=patch,
                temporal_patch_size=QWEN_TEMPORAL_PATCH,
                spatial_merge_size=QWEN_MERGE,
            )
            config = Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
        else:
            vision = dict(
                **qwen_tower,
                patch_size=patch,
                window_size=4 * QWEN_MERGE * patch,
                fullatt_block_indexes=[vision_layers - 1],
                tokens_per_second=2,
            )
            config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
    model = _CLASSES[family]._from_config(config, attn_implementation=attn_implementation, dtype=dtype)
    model.generation_config.pad_token_id = PAD_ID
    model.generation_config.eos_token_id = None
    return model.eval()


def family_of(model) -> str:
    """The family of a model `build` made (its config's model_type)."""
    family = model.config.model_type
    _check_family(family)
    return family


def special_ids(model) -> dict[str, int]:
    """The special ids of `model`: "pad", "image" and, where the family has them,
    "bos" (LLaVA families), "video" (Qwen families, Qwen3-VL included, and OneVision),
    "vision_start", "vision_end" (Qwen families), "image_start", "image_end" (InternVL).
    Qwen3-VL's video timestamps are ordinary text ids, not special ones."""
    cfg = model.config
    family = family_of(model)
    ids = {"pad": PAD_ID, "image": cfg.image_token_id}
    if family in QWEN_FAMILIES:
        ids.update(video=cfg.video_token_id, vision_start=cfg.vision_start_token_id,
                   vision_end=cfg.vision_end_token_id)
    elif family == "llava_onevision":
        ids["video"] = cfg.video_token_id
    elif family == "internvl":
        ids.update(image_start=cfg.image_start_token_id, image_end=cfg.image_end_token_id)
    else:
        ids["bos"] = BOS_ID
    return ids


def text_id_range(model) -> tuple[int, int]:
    """[lo, hi): the ordinary text ids, which avoid pad, BOS (id 1, in every family) and
    every special id."""
    lo = BOS_ID + 1
    hi = min(v for k, v in special_ids(model).items() if k not in ("pad", "bos"))
    return lo, hi


# ------------------------------------------------------------------ token counts


def _llava_next_tokens(model, size: tuple[int, int]) -> int:
    """Placeholder tokens of one LLaVA-NeXT image of original size (H, W).

    Counted with the model's own code, not a re-derivation: the number of tiles from
    `image_size_to_num_patches` (what `get_image_features` uses to split the tiles),
    then `model.model.pack_image_features` (the tile grid from
    `get_anyres_image_grid_shape`, `unpad_image`, one image_newline per row, the base
    tile) applied to zero features of width 1, so no vision forward is run."""
    cfg = model.config
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size
    tiles = image_size_to_num_patches(list(size), cfg.image_grid_pinpoints, cfg.vision_config.image_size)
    feats = [torch.zeros(tiles, side * side, 1)]
    _, lens = model.model.pack_image_features(
        feats, torch.tensor([list(size)]), cfg.vision_feature_select_strategy, image_newline=torch.zeros(1)
    )
    return int(lens[0])


def _onevision_tiles(model, size: tuple[int, int], multi: bool) -> int:
    """Tiles the OneVision model takes of one image: the AnyRes count
    (`image_size_to_num_patches`) for the only image of its row, 1 (the base tile) for
    each image of a row with several (`batch_num_images`), as `get_image_features` does."""
    cfg = model.config
    if multi:
        return 1
    return _onevision_num_patches(list(size), cfg.image_grid_pinpoints, cfg.vision_config.image_size)


def _onevision_tokens(model, size: tuple[int, int], multi: bool) -> int:
    """Placeholder tokens of one OneVision image of original size (H, W), counted with
    `model.model.pack_image_features` on zero features of width 1 (as for LLaVA-NeXT):
    the only image of its row gets base tile + unpadded grid (shrunk past
    `vision_aspect_ratio`) + one newline per row; an image of a multi-image row its base
    tile and one newline."""
    cfg = model.config
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size
    feats = [torch.zeros(_onevision_tiles(model, size, multi), side * side, 1)]
    _, lens = model.model.pack_image_features(
        feats, torch.tensor([list(size)]), image_newline=torch.zeros(1),
        vision_aspect_ratio=cfg.vision_aspect_ratio,
    )
    return int(lens[0])


def _onevision_video_tokens(model, frames: int) -> int:
    """Placeholder tokens of one OneVision video: each frame's side x side features
    pooled by `model.model.apply_pooling` (2x2 bilinear, ceil), frames one after
    another, then one image_newline: frames * ceil(side/2)^2 + 1."""
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    pooled = model.model.apply_pooling(torch.zeros(1, side * side, 1)).shape[1]
    return frames * pooled + 1


def _frames(prompt: dict) -> int:
    t = int(prompt.get("frames", 2))
    if t < 1:
        raise ValueError(f"a video needs at least one frame, not {t}")
    return t


def _internvl_tile_tokens(model) -> int:
    """Tokens per InternVL tile: the side x side patch grid (CLS dropped) after the
    model's own `pixel_shuffle` at `downsample_ratio` (0.5): (side/2)^2."""
    cfg = model.config
    side = cfg.vision_config.image_size[0] // cfg.vision_config.patch_size[0]
    out = model.model.pixel_shuffle(torch.zeros(1, side, side, 4), scale_factor=cfg.downsample_ratio)
    return out.shape[1] * out.shape[2]


def _tiles(prompt: dict, n: int) -> list[int]:
    tiles = prompt.get("tiles", 1)
    tiles = [int(tiles)] * n if isinstance(tiles, int) else [int(t) for t in tiles]
    if len(tiles) != n:
        raise ValueError(f"{len(tiles)} tile counts for {n} images")
    if any(t < 1 for t in tiles):
        raise ValueError(f"every image needs at least one tile, not {tiles}")
    return tiles


def _merge(model) -> int:
    return model.config.vision_config.spatial_merge_size


def _qwen_grid(model, prompt: dict, video: bool) -> tuple[int, int, int]:
    """(t, h, w) of the prompt's images (t=1) or video (t = "frames", default 2)."""
    h, w = (int(v) for v in prompt.get("grid", QWEN_GRID))
    merge = _merge(model)
    if h % merge or w % merge or h <= 0 or w <= 0:
        raise ValueError(f"the patch grid {(h, w)} must be a positive multiple of the merge size {merge}")
    t = int(prompt.get("frames", 2)) if video else 1
    if t < 1:
        raise ValueError(f"a video needs at least one temporal group, not {t}")
    return t, h, w


def visual_token_counts(model, family: str, prompt: dict) -> list[int]:
    """Placeholder tokens per image (or for the one video) of `prompt`, in prompt order.

    llava: (image_size / patch)^2 each. llava_next: see `_llava_next_tokens` (depends on
    the image's (H, W), `prompt["sizes"]`). Qwen: t*h*w / merge^2 per grid, which is
    how `get_image_features` / `get_video_features` split the merged features.
    qwen3_vl: the same per image; a video is t runs (one per temporal patch, each inside
    its own vision_start ... vision_end after its timestamp text), so it gets t counts of
    h*w / merge^2 (t * [64] for the default grid), the lengths of its placeholder runs in
    order; their sum is the video's t*h*w / merge^2 features.
    llava_onevision: see `_onevision_tokens` (AnyRes for a row's only image, 65 for each
    image of a multi-image row) and `_onevision_video_tokens` (frames * 16 + 1; frame f's
    tokens are the contiguous run [16 f, 16 f + 16) of the video's run, the newline is its
    last token). internvl: tiles * `_internvl_tile_tokens` (64) per image, without the
    image_start / image_end tokens around them."""
    _check_family(family)
    if family == "llava_onevision":
        if prompt.get("video", False):
            return [_onevision_video_tokens(model, _frames(prompt))]
        n = int(prompt.get("images", 1))
        return [_onevision_tokens(model, s, n > 1) for s in _sizes(prompt, n)]
    if family == "internvl":
        n = int(prompt.get("images", 1))
        return [t * _internvl_tile_tokens(model) for t in _tiles(prompt, n)]
    if family == "qwen3_vl" and prompt.get("video", False):
        t, h, w = _qwen_grid(model, prompt, video=True)
        return [h * w // _merge(model) ** 2] * t
    if family in QWEN_FAMILIES and prompt.get("video", False):
        t, h, w = _qwen_grid(model, prompt, video=True)
        return [t * h * w // _merge(model) ** 2]
    n = int(prompt.get("images", 1))
    if family == "llava":
        vc = model.config.vision_config
        return [(vc.image_size // vc.patch_size) ** 2] * n
    if family == "llava_next":
        return [_llava_next_tokens(model, s) for s in _sizes(prompt, n)]
    t, h, w = _qwen_grid(model, prompt, video=False)
    return [t * h * w // _merge(model) ** 2] * n


def _sizes(prompt: dict, n: int) -> list[tuple[int, int]]:
    sizes = prompt.get("sizes")
    if sizes is None:
        return [LLAVA_NEXT_IMAGE] * n
    if len(sizes) != n:
        raise ValueError(f"{len(sizes)} sizes for {n} images")
    return [tuple(int(v) for v in s) for s in sizes]


# ------------------------------------------------------------------ inputs


def inputs(model, family: str, *, prompts: list[dict], padding_side: str = "left", seed: int = 1,
           first_row: int = 0) -> dict:
    """Keyword arguments for `model.generate(**kw)` / `model(**kw)`, one row per prompt.

    Row b draws its text ids and pixels from its own generator, seeded by `seed` and
    `first_row + b`: `inputs(..., prompts=[p_b], first_row=b)` is row b of a batch
    alone (unpadded), for batch-versus-one-by-one comparisons.

    Each prompt is a dict (all keys optional):

    * "prefix" (4): text tokens before the first image; for the LLaVA families the
      first of them is BOS (id 1).
    * "images" (1): number of images, 0 for a text-only row.
    * "between" (2): text tokens between consecutive images.
    * "text" (8): text tokens after the last image (or video).
    * "video" (False; Qwen families, OneVision): one video instead of images ("images"
      ignored).
    * "frames" (2): Qwen: temporal groups t of the video (t * temporal_patch_size
      frames); OneVision: frames (all videos of a batch must have the same count).
    * "timestamp" (6, `QWEN3_TIMESTAMP`; qwen3_vl, ignored elsewhere): text tokens of the
      timestamp before each temporal patch of a video, 0 or more.
    * "grid" ((16, 16); Qwen): the (h, w) patch grid of every image / the video, even.
    * "sizes" (LLaVA-NeXT, OneVision): original (H, W) per image, default (112, 224) each
      (OneVision tiles by it only an image that is alone in its row).
    * "tiles" (1; InternVL): tiles per image, an int for all or a list, one per image.

    Row layout: [prefix][image_0][between][image_1]...[image_{n-1}][text]. An image is
    its placeholder run: LLaVA / LLaVA-NeXT / OneVision `image_token_id` * N (OneVision
    video: `video_token_id` * N); Qwen `vision_start`, `image_token_id` * N (or
    `video_token_id` * N), `vision_end`; InternVL `image_start`, `image_token_id` * N,
    `image_end` (as the InternVL processor writes `<img><IMG_CONTEXT>*N</img>`). N is
    given by `visual_token_counts`. Text ids are random in `text_id_range(model)`.
    A Qwen3-VL image is as Qwen's; its video is, for each temporal patch k < t (as
    `Qwen3VLProcessor.replace_video_token` writes `<{time:.1f} seconds>` +
    `<|vision_start|>` + `<|video_pad|>` * h*w/merge^2 + `<|vision_end|>` per patch):
    [timestamp_k][vision_start][video_token_id * h*w/merge^2][vision_end], the
    timestamp_k "timestamp" random ordinary ids (drawn after the prefix, patch by patch,
    before the text). `mm_token_type_ids` is 2 on the video tokens only (timestamps,
    vision_start and vision_end are 0, as `create_mm_token_type_ids` makes it), which
    `get_rope_index` needs: it takes each run of 2s as one (1, h, w) grid of the
    video's `video_grid_thw` row repeated t times.

    Returns (B prompts, L the longest row, `dtype` the model's):

    * `input_ids` [B, L] long, padded with pad id 0 on `padding_side` ("left"/"right");
    * `attention_mask` [B, L] long, 0 on the padding;
    * llava: `pixel_values` [num_images, 3, 112, 112], the images of row 0, then row 1, ...;
    * llava_next: `pixel_values` [num_images, max_tiles, 3, 112, 112] (tiles beyond an
      image's own count, `image_size_to_num_patches`, are zero) and `image_sizes`
      [num_images, 2] long (H, W);
    * qwen: `pixel_values` [sum t*h*w, 3 * 2 * 14 * 14 = 1176] and `image_grid_thw`
      [num_images, 3] long (t=1); `pixel_values_videos` [sum t*h*w, 1176] and
      `video_grid_thw` [num_videos, 3]; qwen2_5_vl also `second_per_grid_ts`
      [num_videos] float (1.0: fps 2 with temporal patch 2); and `mm_token_type_ids`
      [B, L] int (0 text, 1 image, 2 video), without which these transformers
      refuse grids (M-RoPE positions come from it); qwen3_vl the same with rows of
      3 * 2 * 16 * 16 = 1536 and one `video_grid_thw` row (t, h, w) per video (as its
      processor gives), no `second_per_grid_ts`;
    * llava_onevision: `pixel_values` [num_images, max_tiles, 3, 112, 112] (zero beyond an
      image's own tiles: AnyRes count for a row's only image, 1 in a multi-image row),
      `image_sizes` [num_images, 2] long (H, W) and `batch_num_images` [B] long (images per
      row, 0 for text-only and video rows; without it the model would tile every image);
      `pixel_values_videos` [num_videos, frames, 3, 112, 112];
    * internvl: `pixel_values` [sum of tiles, 3, 112, 112], the tiles of row 0's images in
      order, then row 1's, ...

    Vision tensors are left out when the batch has no image (or no video).
    """
    _check_family(family)
    if padding_side not in ("left", "right"):
        raise ValueError("padding_side must be 'left' or 'right'")
    if not prompts:
        raise ValueError("need at least one prompt")
    g = torch.Generator()
    dtype = model.dtype
    ids = special_ids(model)
    lo, hi = text_id_range(model)
    qwen = family in QWEN_FAMILIES

    def ordinary(k: int) -> list[int]:
        return torch.randint(lo, hi, (k,), generator=g).tolist() if k > 0 else []

    rows, types = [], []
    images, sizes, image_grids, video_grids = [], [], [], []
    videos, row_images = [], []  # OneVision
    for b, p in enumerate(prompts):
        g.manual_seed(seed * 1_000_003 + first_row + b)
        unknown = set(p) - {"prefix", "images", "between", "text", "video", "frames", "grid", "sizes",
                            "tiles", "timestamp"}
        if unknown:
            raise ValueError(f"unknown prompt keys {sorted(unknown)}")
        video = bool(p.get("video", False))
        if video and family not in VIDEO_FAMILIES:
            raise ValueError(f"{family} takes no video")
        prefix, between, text = int(p.get("prefix", 4)), int(p.get("between", 2)), int(p.get("text", 8))
        counts = visual_token_counts(model, family, p)
        row, typ = [], []

        def add(tokens, kind=0):
            row.extend(tokens)
            typ.extend([kind] * len(tokens))

        if family in LLAVA_FAMILIES and prefix > 0:
            add([BOS_ID] + ordinary(prefix - 1))
        else:
            add(ordinary(prefix))
        stamped = family == "qwen3_vl" and video  # counts: one per temporal patch
        for j, n in enumerate(counts):
            if j and not stamped:
                add(ordinary(between))
            if stamped:
                stamp = int(p.get("timestamp", QWEN3_TIMESTAMP))
                if stamp < 0:
                    raise ValueError(f"timestamp must be 0 or more tokens, not {stamp}")
                add(ordinary(stamp))
                add([ids["vision_start"]])
                add([ids["video"]] * n, 2)
                add([ids["vision_end"]])
            elif qwen:
                add([ids["vision_start"]])
                add([ids["video" if video else "image"]] * n, 2 if video else 1)
                add([ids["vision_end"]])
            elif family == "internvl":
                add([ids["image_start"]])
                add([ids["image"]] * n, 1)
                add([ids["image_end"]])
            elif video:
                add([ids["video"]] * n, 2)
            else:
                add([ids["image"]] * n, 1)
        add(ordinary(text))
        if not row:
            raise ValueError(f"empty prompt {p}")
        rows.append(row)
        types.append(typ)

        if family == "llava":
            size = model.config.vision_config.image_size
            images.extend(torch.randn(len(counts), 3, size, size, generator=g, dtype=dtype))
        elif family == "llava_next":
            tile = model.config.vision_config.image_size
            for s in _sizes(p, len(counts)):
                tiles = image_size_to_num_patches(list(s), model.config.image_grid_pinpoints, tile)
                images.append(torch.randn(tiles, 3, tile, tile, generator=g, dtype=dtype))
                sizes.append(list(s))
        elif family == "llava_onevision":
            tile = model.config.vision_config.image_size
            if video:
                videos.append(torch.randn(_frames(p), 3, tile, tile, generator=g, dtype=dtype))
                row_images.append(0)
            else:
                for s in _sizes(p, len(counts)):
                    tiles = _onevision_tiles(model, s, len(counts) > 1)
                    images.append(torch.randn(tiles, 3, tile, tile, generator=g, dtype=dtype))
                    sizes.append(list(s))
                row_images.append(len(counts))
        elif family == "internvl":
            tile = model.config.vision_config.image_size
            for t in _tiles(p, len(counts)):
                images.append(torch.randn(t, 3, *tile, generator=g, dtype=dtype))
        else:
            t, h, w = _qwen_grid(model, p, video)
            grids = video_grids if video else image_grids
            for _ in range(1 if video else len(counts)):  # a video: one grid (t, h, w)
                grids.append([t, h, w])
                images.append((video, torch.randn(t * h * w, _qwen_patch_dim(model), generator=g, dtype=dtype)))

    length = max(len(r) for r in rows)
    batch = len(rows)
    input_ids = torch.full((batch, length), PAD_ID, dtype=torch.long)
    attention_mask = torch.zeros(batch, length, dtype=torch.long)
    mm_types = torch.zeros(batch, length, dtype=torch.int32)
    for b, (row, typ) in enumerate(zip(rows, types)):
        span = slice(length - len(row), length) if padding_side == "left" else slice(0, len(row))
        input_ids[b, span] = torch.tensor(row)
        attention_mask[b, span] = 1
        mm_types[b, span] = torch.tensor(typ, dtype=torch.int32)
    kw = {"input_ids": input_ids, "attention_mask": attention_mask}

    if family == "llava":
        if images:
            kw["pixel_values"] = torch.stack(images)
    elif family in ANYRES_FAMILIES:
        if images:
            most = max(x.shape[0] for x in images)
            pixels = torch.zeros(len(images), most, *images[0].shape[1:], dtype=dtype)
            for i, x in enumerate(images):
                pixels[i, : x.shape[0]] = x
            kw["pixel_values"] = pixels
            kw["image_sizes"] = torch.tensor(sizes, dtype=torch.long)
            if family == "llava_onevision":
                kw["batch_num_images"] = torch.tensor(row_images, dtype=torch.long)
        if videos:
            if len({x.shape[0] for x in videos}) > 1:
                raise ValueError("all videos of a OneVision batch need the same number of frames")
            kw["pixel_values_videos"] = torch.stack(videos)
    elif family == "internvl":
        if images:
            kw["pixel_values"] = torch.cat(images)
    else:
        stills = [x for v, x in images if not v]
        clips = [x for v, x in images if v]
        if stills:
            kw["pixel_values"] = torch.cat(stills)
            kw["image_grid_thw"] = torch.tensor(image_grids, dtype=torch.long)
        if clips:
            kw["pixel_values_videos"] = torch.cat(clips)
            kw["video_grid_thw"] = torch.tensor(video_grids, dtype=torch.long)
            if family == "qwen2_5_vl":
                kw["second_per_grid_ts"] = torch.ones(len(clips), dtype=torch.float32)
        kw["mm_token_type_ids"] = mm_types
    return kw


def _qwen_patch_dim(model) -> int:
    """C * temporal_patch * patch * patch: the width of one flattened Qwen patch row."""
    vc = model.config.vision_config
    return vc.in_channels * vc.temporal_patch_size * vc.patch_size * vc.patch_size
