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
* when `session.prunes_after(l)`, a forward hook on `layer.self_attn` has kept that
  layer's eager attention probabilities `[1, H, n, n]`; the session decides
  (`session.prune(l, hidden, attn=attn)`), the hidden states are compacted with
  `sparsevlm.apply_plan`, and the `DynamicCache` of every layer already written is
  compacted so that layer `j` holds exactly the rows `session.kv_rows(j)` (option 2
  of docs/integration.md: the survivors, recycled tokens have no K/V there);
* decoding then runs one token at a time through the same loop; every layer attends
  to its whole (compacted) cache, and its position id continues from the ids its
  cache was written with (docs/integration.md, "Decode positions").

Transformers internals relied on (5.x): `LlamaDecoderLayer.forward(hidden_states,
attention_mask, position_ids, cache, use_cache, position_embeddings)`,
`LlamaAttention.forward` returning `(attn_output, attn_weights)` (the weights are the
softmax probabilities with `attn_implementation="eager"`), `DynamicLayer.keys` /
`.values` of shape `[batch, kv_heads, tokens, head_dim]` in `cache.layers[i]`, and
`create_causal_mask(..., cache=cache, layer_idx=i)`, which sizes each layer's mask
from that layer's own cache length.

Run the demo (random weights, LLaVA-1.5-like token counts)::

    build/venv/bin/python examples/python/hf_llava.py --threads 1     # 8 x 1024 Llama, 671 tokens
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
    CLIPVisionConfig,
    DynamicCache,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
)
from transformers.masking_utils import create_causal_mask

try:  # the pruning path needs the bindings; the unpruned path runs without them
    import sparsevlm as sv
except ImportError:  # pragma: no cover - exercised only without the package
    sv = None


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
) -> LlavaForConditionalGeneration:
    """A LLaVA with random weights built from a config in code (no hub access).

    CLIP ViT at 336 px with 14 px patches gives 24 x 24 = 576 image tokens (the
    "default" strategy drops the CLS token). Eager attention, so every decoder layer
    computes its attention probabilities. The image token is the last vocabulary id;
    there is no EOS token, so greedy generation always runs `max_new_tokens` steps.
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
    model = LlavaForConditionalGeneration._from_config(
        config, attn_implementation="eager", dtype=dtype
    )
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
) -> PrefillState:
    """Run the prompt through the decoder with SparseVLM pruning.

    `session` is None (the stock prefill), a `sparsevlm.SessionConfig` (a
    `PrefillSession` is built here, raters chosen from the input embeddings) or an
    already built `sparsevlm.PrefillSession` (e.g. with caller raters). Batch size 1.
    `mask_hook(layer, mask)` may replace a layer's 4-D additive mask (tests use it).
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
                position_ids=None, layer_idx=i,
            )
        mask = masks[n] if mask_hook is None else mask_hook(i, masks[n])
        if rope is None:
            rope = lm.rotary_emb(hidden, position_ids=positions)
        prunes = session is not None and session.prunes_after(i)
        handle = layer.self_attn.register_forward_hook(keep_attn) if prunes else None
        try:
            hidden = layer(
                hidden, attention_mask=mask, position_ids=positions, cache=cache,
                use_cache=use_cache, position_embeddings=rope,
            )
        finally:
            if handle is not None:
                handle.remove()
        decode_base[i] = int(positions.max()) + 1
        held[i] = torch.arange(n, device=device)
        if not prunes:
            continue

        t_step = time.perf_counter()
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
) -> tuple[list[int], PrefillState]:
    """Greedy decoding after the (pruned) prefill. Returns the new tokens and the state."""
    if state is None:
        state = prefill(model, input_ids, pixel_values, session)
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
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3, help="prefill timings: median of this many")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1 suits a small shared machine; more on your own)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    _need_sv()
    torch.set_num_threads(a.threads)

    t0 = time.perf_counter()
    model = build_model(hidden=a.hidden, layers=a.layers, heads=a.heads, kv_heads=a.kv_heads,
                        intermediate=a.intermediate, vocab=a.vocab, seed=a.seed)
    ids, pixels = make_inputs(model, a.prefix, a.text, seed=a.seed + 1)
    prefix, visual, text = image_span(ids, model.config.image_token_id)
    print(f"model: {a.layers} layers, hidden {a.hidden}, {a.heads} heads, "
          f"{sum(x.numel() for x in model.parameters()) / 1e6:.0f}M params "
          f"(built in {time.perf_counter() - t0:.1f} s); threads {a.threads}")
    print(f"prompt: {ids.shape[1]} tokens = prefix {prefix} + image {visual} + text {text}")

    keeps = a.keep if a.keep else None
    config = lambda: make_config(a.layers, a.prune_layers, keeps, scale=a.scale, bias=a.bias,  # noqa: E731
                                 recycle=not a.no_recycle, positions=a.positions)

    with torch.no_grad():
        embeds = embed_inputs(model, ids, pixels)  # the vision tower is the same for both

        def timed(cfg_fn):
            times = []
            for _ in range(a.repeats):
                t = time.perf_counter()
                st = prefill(model, ids, None, cfg_fn(), inputs_embeds=embeds)
                times.append(time.perf_counter() - t)
            return statistics.median(times), st

        t_full, _ = timed(lambda: None)
        t_pruned, st = timed(config)

    policy = f"fixed {keeps}" if keeps else f"rank*{a.scale}+{a.bias}"
    print(f"pruning after layers {a.prune_layers}, keep {policy}, recycle {not a.no_recycle}, "
          f"positions {a.positions}")
    for i, n in enumerate(st.layer_tokens):
        note = ""
        if i in st.plans:
            pl = st.plans[i]
            note = (f"  -> prune: rank {pl.rank}, keep {pl.keep_count}, recycled "
                    f"{len(pl.clusters)}, next {pl.length}")
        print(f"  layer {i:2d}: {n:4d} tokens, cache {st.cache.layers[i].keys.shape[-2]:4d} rows{note}")

    with torch.no_grad():
        full_tokens, _ = generate(model, ids, pixels, None, a.new_tokens)
        pruned_tokens, _ = generate(model, ids, pixels, config(), a.new_tokens)
    print(f"greedy tokens, no pruning: {full_tokens}")
    print(f"greedy tokens, pruned    : {pruned_tokens}")
    print(f"prefill (decoder, median of {a.repeats}): no pruning {t_full * 1e3:.0f} ms, "
          f"pruned {t_pruned * 1e3:.0f} ms (of which SparseVLM steps and cache compaction "
          f"{st.timings['pruning'] * 1e3:.0f} ms), speed-up {t_full / t_pruned:.2f}x")


if __name__ == "__main__":
    main()
