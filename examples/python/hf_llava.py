#!/usr/bin/env python3
"""SparseVLM pruning inside a Hugging Face LLaVA prefill, with the engine's own modules.

The model is `transformers.LlavaForConditionalGeneration` (checked against
transformers 5.24). Nothing of the model is re-implemented: the token embedding, the
vision tower and projector (`get_image_features`, `get_placeholder_mask`,
`masked_scatter`, as `LlavaModel.forward` does), each `LlamaDecoderLayer` called as
is, the model's `rotary_emb`, final `norm`, `lm_head`, `DynamicCache` and
`masking_utils.create_causal_mask`. This file only replaces the *loop* of
`LlamaModel.forward` with a thin one that can change the sequence between two layers:

* layer `l` runs on the current `n` tokens with the causal mask for `n` tokens and
  the current position ids (0..L-1 before the first pruning layer, the session's ids
  after it);
* when `session.prunes_after(l)`, the session decides from that layer's attention
  (`session.prune(l, hidden, ...)`), the hidden states are compacted with
  `sparsevlm.apply_plan`, and the `DynamicCache` of every layer already written is
  compacted so that layer `j` holds exactly the rows `session.kv_rows(j)` (option 2
  of docs/integration.md: the survivors, recycled tokens have no K/V there);
* decoding then runs one token at a time through the same loop; every layer attends
  to its whole (compacted) cache, and its position id continues from the ids its
  cache was written with (docs/integration.md, "Decode positions").

Two ways to get the pruning layer's attention (`scores_from`):

* `"qk"` (fused attention, as real engines run): the decoder uses PyTorch SDPA and
  never forms the probabilities. The attention function `"sparsevlm_sdpa"`,
  registered in transformers' `AttentionInterface`, receives each layer's query and
  key states after RoPE; at a pruning layer it keeps the rater rows of the query
  `[H, R, dh]` and the keys `[Hkv, n, dh]`, then calls transformers' own `"sdpa"`
  function and returns exactly what it returns. The session scores from them
  (`session.prune(l, hidden, q=..., k=...)`, docs/fused-attention.md).
* `"attn"`: the decoder runs eager attention and a forward hook on
  `layer.self_attn` keeps the pruning layer's probabilities `[1, H, n, n]`
  (`session.prune(l, hidden, attn=...)`). The library decides the same from both.

Transformers internals relied on (5.x): `LlamaDecoderLayer.forward(hidden_states,
attention_mask, position_ids, cache, use_cache, position_embeddings)`;
`LlamaAttention.forward` calling `ALL_ATTENTION_FUNCTIONS.get_interface(
config._attn_implementation, ...)(module, query, key, value, attention_mask,
scaling=..., ...)` with query `[batch, heads, n, head_dim]` and key
`[batch, kv_heads, n, head_dim]` after RoPE and the cache update, and returning
`(attn_output, attn_weights)` (the weights are the softmax probabilities with eager
attention); `AttentionInterface.register` and `AttentionMaskInterface.register`
(masking_utils: a name absent from the mask registry gets no mask at all);
`PreTrainedModel.set_attn_implementation({"text_config": ...})`;
`DynamicLayer.keys` / `.values` of shape `[batch, kv_heads, tokens, head_dim]` in
`cache.layers[i]`; and `create_causal_mask(..., cache=cache, layer_idx=i)`, which
sizes each layer's mask from that layer's own cache length.

Run the demo (random weights, LLaVA-1.5-like token counts)::

    build/venv/bin/python examples/python/hf_llava.py --threads 1     # 8 x 1024 Llama, 671 tokens
    build/venv/bin/python examples/python/hf_llava.py --threads 1 --layers 32 --prune-layers 2,6,15
    build/venv/bin/python examples/python/hf_llava.py --keep "" --positions keep_original
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from transformers import (
    AttentionInterface,
    CLIPVisionConfig,
    DynamicCache,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
)
from transformers.masking_utils import (
    ALL_MASK_ATTENTION_FUNCTIONS,
    AttentionMaskInterface,
    create_causal_mask,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

try:  # the pruning path needs the bindings; the unpruned path runs without them
    import sparsevlm as sv
except ImportError:  # pragma: no cover - exercised only without the package
    sv = None


# ------------------------------------------------- q/k capture (fused attention)

QK_ATTENTION = "sparsevlm_sdpa"
"""The attention implementation name of SDPA with the q/k capture."""

SCORES_FROM = {"attn": "eager", "qk": QK_ATTENTION}
"""The decoder attention implementation each scoring mode needs."""

# id(attention module) -> slot, present only while that module's layer is a pruning
# layer being run; `sdpa_with_qk_capture` fills the slot's "q", "k" and "scaling".
_qk_slots: dict[int, dict[str, Any]] = {}


def sdpa_with_qk_capture(module, query, key, value, attention_mask, **kwargs):
    """transformers' own SDPA attention, keeping q/k of the layers being pruned.

    Called by `LlamaAttention.forward` as any attention function: query
    `[B, H, n, dh]` and key `[B, Hkv, n, dh]` after RoPE (the key as the cache
    returned it: at a prefill layer the cache was empty, so its n rows). When the
    module is armed (`_qk_slots`), it keeps batch item 0's query rows `slot["rows"]`
    (the raters, in the session's order; all rows when None) and the keys: views
    and one small [H, R, dh] gather, no copy of the attention. It then returns
    exactly what `ALL_ATTENTION_FUNCTIONS["sdpa"]` returns for the same arguments.
    """
    slot = _qk_slots.get(id(module))
    if slot is not None:
        q = query[0]
        rows = slot.get("rows")
        slot["q"] = q if rows is None else q.index_select(1, rows.to(q.device))
        slot["k"] = key[0]
        slot["scaling"] = kwargs.get("scaling")
    return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, **kwargs)


def register_qk_capture() -> None:
    """Registers `QK_ATTENTION` (idempotent): the attention function above, and for
    masks the same function as "sdpa" (`create_causal_mask` looks the mask function
    up by the implementation's name and returns no mask at all for an unknown name;
    with sdpa's own it returns what the stock sdpa model gets: None for a plain causal
    prefill or a one-token decode step, SDPA then applying `is_causal`)."""
    AttentionInterface.register(QK_ATTENTION, sdpa_with_qk_capture)
    AttentionMaskInterface.register(QK_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


register_qk_capture()


def decoder_attention(model: LlavaForConditionalGeneration) -> str:
    """The attention implementation the language model's layers use."""
    return text_model(model).config._attn_implementation


def set_decoder_attention(model: LlavaForConditionalGeneration, implementation: str) -> None:
    """Switches the language model's attention ("eager", "sdpa" or `QK_ATTENTION`)
    in place, weights untouched; the vision tower keeps its own."""
    if implementation == QK_ATTENTION:
        register_qk_capture()
    model.set_attn_implementation({"text_config": implementation})
    if decoder_attention(model) != implementation:
        raise RuntimeError(f"attention implementation: expected {implementation!r}, "
                           f"got {decoder_attention(model)!r}")


# --------------------------------------------------------------------------- model


def build_model(
    *,
    hidden: int = 256,
    layers: int = 6,
    heads: int = 4,
    kv_heads: int | None = None,
    intermediate: int | None = None,
    vocab: int = 1000,
    vision_hidden: int = 32,
    vision_layers: int = 2,
    image_size: int = 336,
    patch_size: int = 14,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "eager",
) -> LlavaForConditionalGeneration:
    """A LLaVA with random weights built from a config in code (no hub access).

    CLIP ViT at 336 px with 14 px patches gives 24 x 24 = 576 image tokens (the
    "default" strategy drops the CLS token). The image token is the last vocabulary
    id; there is no EOS token, so greedy generation always runs `max_new_tokens` steps.

    attn_implementation: "eager" (the whole model; every decoder layer computes its
    attention probabilities, for `scores_from="attn"`), "sdpa" (the stock default), or
    `QK_ATTENTION` (SDPA everywhere, the decoder through `sdpa_with_qk_capture`, for
    `scores_from="qk"`). The weights depend only on the sizes and the seed.
    """
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        image_size=image_size,
        patch_size=patch_size,
        hidden_size=vision_hidden,
        intermediate_size=2 * vision_hidden,
        num_hidden_layers=vision_layers,
        num_attention_heads=max(1, vision_hidden // 16),
        projection_dim=vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=None,
        pad_token_id=0,
    )
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=vocab - 1)
    base = "eager" if attn_implementation == "eager" else "sdpa"
    model = LlavaForConditionalGeneration._from_config(config, attn_implementation=base, dtype=dtype)
    if attn_implementation != base:
        set_decoder_attention(model, attn_implementation)
    return model.eval()


def make_inputs(
    model: LlavaForConditionalGeneration, prefix: int, text: int, seed: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """`input_ids` [1, prefix + 576 + text] with the image placeholders in the middle,
    and `pixel_values` [1, 3, 336, 336]."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    vocab = cfg.text_config.vocab_size
    n_img = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    ordinary = lambda k: torch.randint(3, vocab - 1, (k,), generator=g)  # noqa: E731
    ids = torch.cat(
        [torch.tensor([1]), ordinary(prefix - 1), torch.full((n_img,), cfg.image_token_id), ordinary(text)]
    )[None]
    size = cfg.vision_config.image_size
    pixels = torch.randn(1, 3, size, size, generator=g, dtype=model.dtype)
    return ids, pixels


# ------------------------------------------------------------------ building blocks


def text_model(model: LlavaForConditionalGeneration):
    """The LlamaModel inside the LLaVA (embed_tokens, layers, norm, rotary_emb)."""
    return model.model.language_model


def embed_inputs(
    model: LlavaForConditionalGeneration, input_ids: torch.Tensor, pixel_values: torch.Tensor | None
) -> torch.Tensor:
    """inputs_embeds [1, L, d] exactly as `LlavaModel.forward` builds them: token
    embeddings, image features from the vision tower and projector scattered into the
    image-token slots."""
    llava = model.model
    embeds = llava.get_input_embeddings()(input_ids)
    if pixel_values is not None:
        image = llava.get_image_features(pixel_values=pixel_values, return_dict=True).pooler_output
        image = torch.cat(image, dim=0).to(embeds.device, embeds.dtype)
        mask = llava.get_placeholder_mask(input_ids, inputs_embeds=embeds, image_features=image)
        embeds = embeds.masked_scatter(mask, image)
    return embeds


def image_span(input_ids: torch.Tensor, image_token_id: int) -> tuple[int, int, int]:
    """(prefix, visual, text) counts of a one-image prompt: the tokens before the
    first image token, the contiguous image tokens, and the rest."""
    ids = input_ids[0]
    where = (ids == image_token_id).nonzero().flatten()
    if where.numel() == 0:
        raise ValueError("input_ids: expected image tokens, got none")
    start, visual = int(where[0]), int(where.numel())
    if int(where[-1]) != start + visual - 1:
        raise ValueError("input_ids: expected one contiguous run of image tokens")
    return start, visual, int(ids.numel()) - start - visual


def make_config(
    layers: int,
    prune_layers: list[int],
    keeps: list[int] | None = None,
    *,
    scale: float = 13.5,
    bias: float = 0.0,
    recycle: bool = True,
    fraction: float = 0.3,
    cluster_divisor: float = 10.0,
    positions: str = "renumber",
):
    """A `sparsevlm.SessionConfig`: fixed keeps (one per pruning layer) when `keeps`
    is given, else the rank policy `floor(rank * scale + bias)`."""
    _need_sv()
    schedule = []
    for i, layer in enumerate(prune_layers):
        pol = sv.KeepPolicy.fixed(keeps[i]) if keeps else sv.KeepPolicy.rank(scale=scale, bias=bias)
        rec = sv.RecycleOptions(enabled=recycle, fraction=fraction, cluster_divisor=cluster_divisor)
        schedule.append((layer, sv.StepOptions(policy=pol, recycle=rec)))
    return sv.SessionConfig(layers=layers, schedule=schedule, positions=positions)


def _need_sv() -> None:
    if sv is None:
        raise ImportError("the pruning path needs the sparsevlm Python package")


def _as_long(x: Any, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.long, device=device)


# ---------------------------------------------------------------------- prefill


@dataclass
class PrefillState:
    """What `prefill` leaves for decoding (and for inspection)."""

    logits: torch.Tensor  # [1, vocab] of the last prompt token
    cache: DynamicCache
    session: Any  # sparsevlm.PrefillSession or None
    layer_tokens: list[int]  # tokens entering each decoder layer
    plans: dict[int, Any]  # pruning layer -> sparsevlm plan
    decode_base: list[int]  # first decode position id of each layer
    held: list[torch.Tensor]  # rows of each layer's cache, in the coordinates it was written in
    hidden: torch.Tensor | None = None  # [1, n, d] after the final norm (all rows)
    generated: int = 0  # decode steps run so far
    step_logits: list[torch.Tensor] = field(default_factory=list)  # [1, V] per generated token
    timings: dict[str, float] = field(default_factory=dict)


@torch.no_grad()
def prefill(
    model: LlavaForConditionalGeneration,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor | None,
    session: Any = None,
    *,
    inputs_embeds: torch.Tensor | None = None,
    use_cache: bool = True,
    mask_hook: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    scores_from: str | None = None,
) -> PrefillState:
    """Run the prompt through the decoder with SparseVLM pruning.

    `session` is None (the stock prefill), a `sparsevlm.SessionConfig` (a
    `PrefillSession` is built here, raters chosen from the input embeddings) or an
    already built `sparsevlm.PrefillSession` (e.g. with caller raters). Batch size 1.

    scores_from: "qk" (the decoder must run `QK_ATTENTION`: q/k captured from SDPA)
    or "attn" (the decoder must run "eager": probabilities from a hook); None picks
    the one the model's decoder attention allows. Without a session any
    implementation runs (the stock prefill).

    `mask_hook(layer, mask)` may replace a layer's 4-D mask (tests use it): additive
    float for eager, boolean (True = attend) for SDPA, which is then materialised
    instead of left to `is_causal`. In "qk" mode the rater rows must keep the plain
    causal mask: the scores are recomputed from q/k under that mask.
    """
    if input_ids.shape[0] != 1:
        raise ValueError(f"input_ids: expected batch size 1, got {input_ids.shape[0]}")
    lm = text_model(model)
    cfg = lm.config
    if inputs_embeds is None:
        inputs_embeds = embed_inputs(model, input_ids, pixel_values)
    hidden = inputs_embeds
    device = hidden.device
    L = hidden.shape[1]

    if session is not None and sv is not None and isinstance(session, sv.SessionConfig):
        prefix, visual, text = image_span(input_ids, model.config.image_token_id)
        layout = sv.Layout.from_counts(prefix, visual, text)
        session = sv.PrefillSession(layout, session, embeds=inputs_embeds[0])
    if session is not None and session.length != L:
        raise ValueError(f"session.length: expected {L} (the prompt), got {session.length}")
    implementation = cfg._attn_implementation
    if scores_from is None:
        scores_from = "qk" if implementation == QK_ATTENTION else "attn"
    if scores_from not in SCORES_FROM:
        raise ValueError(f"scores_from: expected one of {sorted(SCORES_FROM)}, got {scores_from!r}")
    if session is not None and implementation != SCORES_FROM[scores_from]:
        raise ValueError(
            f"scores_from={scores_from!r}: expected the decoder attention "
            f"{SCORES_FROM[scores_from]!r}, got {implementation!r} (build_model(attn_implementation=...) "
            f"or set_decoder_attention)")

    cache = DynamicCache(config=cfg) if use_cache else None
    n_layers = len(lm.layers)
    positions = torch.arange(L, device=device)[None]
    layer_tokens: list[int] = []
    plans: dict[int, Any] = {}
    decode_base = [0] * n_layers
    held: list[torch.Tensor] = [torch.empty(0, dtype=torch.long)] * n_layers
    masks: dict[int, torch.Tensor] = {}
    rope: tuple[torch.Tensor, torch.Tensor] | None = None
    captured: dict[str, torch.Tensor] = {}
    spent = 0.0  # in the pruning steps and compactions

    def keep_attn(_module, _args, output):
        captured["attn"] = output[1]

    for i, layer in enumerate(lm.layers):
        n = hidden.shape[1]
        layer_tokens.append(n)
        # The stock model builds one mask for the prompt; ours is rebuilt for each new
        # length, from the same function (this layer's cache is still empty here).
        if n not in masks:
            masks[n] = create_causal_mask(
                config=cfg, inputs_embeds=hidden, attention_mask=None, cache=cache,
                position_ids=None, layer_idx=i, allow_is_causal_skip=mask_hook is None,
            )
        mask = masks[n] if mask_hook is None else mask_hook(i, masks[n])
        if rope is None:
            rope = lm.rotary_emb(hidden, position_ids=positions)
        prunes = session is not None and session.prunes_after(i)
        handle, slot = None, None
        if prunes and scores_from == "qk":
            # Arm the capture for this layer only: the rater rows of q (session order).
            slot = _qk_slots[id(layer.self_attn)] = {"rows": _as_long(session.raters, device)}
        elif prunes:
            handle = layer.self_attn.register_forward_hook(keep_attn)
        try:
            hidden = layer(
                hidden, attention_mask=mask, position_ids=positions, cache=cache,
                use_cache=use_cache, position_embeddings=rope,
            )
        finally:
            if handle is not None:
                handle.remove()
            if slot is not None:
                _qk_slots.pop(id(layer.self_attn), None)
        decode_base[i] = int(positions.max()) + 1
        held[i] = torch.arange(n, device=device)
        if not prunes:
            continue

        t_step = time.perf_counter()
        if slot is not None:
            if "q" not in slot:
                raise RuntimeError(f"layer {i}: the attention function {QK_ATTENTION!r} did not run")
            scale = slot["scaling"]
            plan = session.prune(i, hidden[0], q=slot["q"], k=slot["k"],
                                 scale=0.0 if scale is None else float(scale))
            slot.clear()
        else:
            attn = captured.pop("attn", None)
            if attn is None:
                raise RuntimeError("no attention probabilities: load the model with attn_implementation='eager'")
            plan = session.prune(i, hidden[0], attn=attn[0])
        plans[i] = plan
        hidden = sv.apply_plan(plan, hidden[0])[None]
        positions = _as_long(session.positions, device)[:1]
        rope = None
        if cache is not None:
            _compact_caches(cache, session, held, upto=i)
        spent += time.perf_counter() - t_step

    # As the stock model under generate() (logits_to_keep=1): norm over all rows,
    # lm_head on the last one.
    hidden = lm.norm(hidden)
    logits = model.lm_head(hidden[:, -1:, :])[:, -1]
    state = PrefillState(logits, cache, session, layer_tokens, plans, decode_base, held, hidden)
    state.timings["pruning"] = spent
    # Layers after the last pruning layer continue from the session's decode id;
    # layers between two pruning layers (renumber) from 1 + the ids they were written
    # with, layers up to the first from 1 + the largest input id (integration.md).
    if session is not None and plans and decode_base[-1] != session.next_position():
        raise RuntimeError(f"decode position {decode_base[-1]} != session.next_position() "
                           f"{session.next_position()}")
    return state


def _compact_caches(cache: DynamicCache, session: Any, held: list[torch.Tensor], upto: int) -> None:
    """Compact the K/V of layers 0..upto so that layer j holds `session.kv_rows(j)`.

    `held[j]` lists the rows layer j's cache holds now, in the coordinates it was
    written in (kv_rows' coordinates), so repeated steps compose: the survivors are
    looked up in what is held and the cache keeps those rows, in order. The layer's
    `keys`/`values` are replaced by their `index_select` (a smaller tensor; the old
    one is freed), which is what `DynamicLayer.update` expects: it concatenates the
    next token's K/V onto whatever `keys`/`values` hold."""
    for j in range(upto + 1):
        rows = _as_long(session.kv_rows(j), held[j].device)
        if rows.numel() == held[j].numel() and torch.equal(rows, held[j]):
            continue
        idx = torch.searchsorted(held[j], rows)
        if idx.numel() and (int(idx.max()) >= held[j].numel() or not torch.equal(held[j][idx], rows)):
            raise RuntimeError(f"kv_rows({j}) names rows that layer {j}'s cache no longer holds")
        entry = cache.layers[j]
        sel = idx.to(entry.keys.device)
        entry.keys = entry.keys.index_select(-2, sel)
        entry.values = entry.values.index_select(-2, sel)
        held[j] = rows


# ----------------------------------------------------------------------- decode


@torch.no_grad()
def decode_step(model: LlavaForConditionalGeneration, state: PrefillState, token: int | torch.Tensor) -> torch.Tensor:
    """Feed one token; every layer attends to its whole cache. Returns logits [1, V]."""
    lm = text_model(model)
    cfg = lm.config
    cache = state.cache
    device = state.logits.device
    ids = _as_long(token, device).reshape(1, 1)
    hidden = lm.embed_tokens(ids)
    ropes: dict[int, tuple] = {}
    for i, layer in enumerate(lm.layers):
        pos_id = state.decode_base[i] + state.generated
        pos = torch.tensor([[pos_id]], device=device)
        if pos_id not in ropes:
            ropes[pos_id] = lm.rotary_emb(hidden, position_ids=pos)
        # Per-layer cache lengths differ after pruning: size the mask on this layer's cache.
        mask = create_causal_mask(
            config=cfg, inputs_embeds=hidden, attention_mask=None, cache=cache,
            position_ids=None, layer_idx=i,
        )
        hidden = layer(
            hidden, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True,
            position_embeddings=ropes[pos_id],
        )
    state.generated += 1
    hidden = lm.norm(hidden)
    return model.lm_head(hidden)[:, -1]


@torch.no_grad()
def generate(
    model: LlavaForConditionalGeneration,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor | None,
    session: Any = None,
    max_new_tokens: int = 8,
    *,
    state: PrefillState | None = None,
    scores_from: str | None = None,
) -> tuple[list[int], PrefillState]:
    """Greedy decoding after the (pruned) prefill, or after `state` when given.
    Returns the new tokens and the state."""
    if state is None:
        state = prefill(model, input_ids, pixel_values, session, scores_from=scores_from)
    tokens: list[int] = []
    logits = state.logits
    for step in range(max_new_tokens):
        state.step_logits.append(logits)
        tokens.append(int(logits.argmax(-1)))
        if step + 1 < max_new_tokens:
            logits = decode_step(model, state, tokens[-1])
    return tokens, state


# ------------------------------------------------------------------------- demo


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--vocab", type=int, default=32064)
    p.add_argument("--prefix", type=int, default=35, help="tokens before the image")
    p.add_argument("--text", type=int, default=60, help="tokens after the image")
    p.add_argument("--prune-layers", type=_ints, default=[1, 3, 5], help="e.g. 1,3,5")
    p.add_argument("--keep", type=_ints, default=[300, 200, 110],
                   help="fixed keep per pruning layer (v1.5-192 style); empty for the rank policy")
    p.add_argument("--scale", type=float, default=13.5, help="rank policy: keep = rank*scale + bias")
    p.add_argument("--bias", type=float, default=0.0)
    p.add_argument("--no-recycle", action="store_true")
    p.add_argument("--positions", choices=["renumber", "keep_original"], default="renumber")
    p.add_argument("--scores-from", choices=sorted(SCORES_FROM), default="qk",
                   help="the pruned run shown: q/k captured from SDPA (qk) or eager probabilities (attn)")
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3, help="prefill timings: median of this many")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1 suits a small shared machine; more on your own)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    _need_sv()
    torch.set_num_threads(a.threads)

    t0 = time.perf_counter()
    # One model, SDPA everywhere; the runs below switch only the decoder's attention.
    model = build_model(hidden=a.hidden, layers=a.layers, heads=a.heads, kv_heads=a.kv_heads,
                        intermediate=a.intermediate, vocab=a.vocab, seed=a.seed,
                        attn_implementation="sdpa")
    ids, pixels = make_inputs(model, a.prefix, a.text, seed=a.seed + 1)
    prefix, visual, text = image_span(ids, model.config.image_token_id)
    print(f"model: {a.layers} layers, hidden {a.hidden}, {a.heads} heads, "
          f"{sum(x.numel() for x in model.parameters()) / 1e6:.0f}M params "
          f"(built in {time.perf_counter() - t0:.1f} s); threads {a.threads}")
    print(f"prompt: {ids.shape[1]} tokens = prefix {prefix} + image {visual} + text {text}")

    keeps = a.keep if a.keep else None
    config = lambda: make_config(a.layers, a.prune_layers, keeps, scale=a.scale, bias=a.bias,  # noqa: E731
                                 recycle=not a.no_recycle, positions=a.positions)
    # name -> (decoder attention, session config or None, scores_from)
    runs = {
        "stock sdpa, no pruning": ("sdpa", lambda: None, None),
        "pruned, scores from q/k (sdpa)": (QK_ATTENTION, config, "qk"),
        "pruned, scores from attn (eager)": ("eager", config, "attn"),
    }
    shown = "pruned, scores from q/k (sdpa)" if a.scores_from == "qk" else "pruned, scores from attn (eager)"

    with torch.no_grad():
        embeds = embed_inputs(model, ids, pixels)  # the vision tower is the same for all runs
        times: dict[str, list[float]] = {name: [] for name in runs}
        spent: dict[str, list[float]] = {name: [] for name in runs}  # SparseVLM steps + compaction
        states: dict[str, PrefillState] = {}
        for _ in range(a.repeats):  # interleaved, so that a busy spell hits every run alike
            for name, (impl, cfg_fn, mode) in runs.items():
                set_decoder_attention(model, impl)
                t = time.perf_counter()
                states[name] = prefill(model, ids, None, cfg_fn(), inputs_embeds=embeds, scores_from=mode)
                times[name].append(time.perf_counter() - t)
                spent[name].append(states[name].timings["pruning"])
        st = states[shown]
        rows = [st.cache.layers[i].keys.shape[-2] for i in range(len(st.layer_tokens))]
        # Greedy decoding continues from each run's last prefill (its caches).
        tokens = {}
        for name in ("stock sdpa, no pruning", shown):
            set_decoder_attention(model, runs[name][0])
            tokens[name], _ = generate(model, ids, None, None, a.new_tokens, state=states[name])

    policy = f"fixed {keeps}" if keeps else f"rank*{a.scale}+{a.bias}"
    print(f"pruning after layers {a.prune_layers}, keep {policy}, recycle {not a.no_recycle}, "
          f"positions {a.positions}; shown: {shown}")
    for i, n in enumerate(st.layer_tokens):
        note = ""
        if i in st.plans:
            pl = st.plans[i]
            note = (f"  -> prune: rank {pl.rank}, keep {pl.keep_count}, recycled "
                    f"{len(pl.clusters)}, next {pl.length}")
        print(f"  layer {i:2d}: {n:4d} tokens, cache {rows[i]:4d} rows{note}")

    qk, eager = states["pruned, scores from q/k (sdpa)"], states["pruned, scores from attn (eager)"]
    same = [i for i in qk.plans if torch.equal(torch.as_tensor(qk.plans[i].sequence),
                                                torch.as_tensor(eager.plans[i].sequence))]
    print(f"q/k and attn decisions identical at pruning layers {same} of {list(qk.plans)} "
          f"(the decoders differ in rounding: SDPA vs eager attention)")
    print(f"greedy tokens, no pruning: {tokens['stock sdpa, no pruning']}")
    print(f"greedy tokens, {shown}: {tokens[shown]}")
    base = statistics.median(times["stock sdpa, no pruning"])
    print(f"prefill (decoder only, median of {a.repeats}, threads {a.threads}; the first run is "
          f"the wrapper without a session, bit-identical to the stock model):")
    for name in runs:
        t = statistics.median(times[name])
        extra = ""
        if name != "stock sdpa, no pruning":
            extra = (f", speed-up {base / t:.2f}x (of which SparseVLM steps and cache compaction "
                     f"{statistics.median(spent[name]) * 1e3:.0f} ms)")
        print(f"  {name:34s} {t * 1e3:7.0f} ms{extra}")


if __name__ == "__main__":
    main()
