"""SparseVLM inside a Hugging Face model's own ``generate()`` and ``forward``.

    import sparsevlm.hf
    handle = sparsevlm.hf.sparsify(model, "v1.5-192")   # an already loaded model
    out = model.generate(**inputs, max_new_tokens=64)    # prunes inside the prefill
    handle.stats                                         # what the last prefill did
    handle.remove()                                      # the stock model again

How it hooks in (docs/python.md, "Hugging Face: sparsify"): the text model's
``forward`` is replaced, on that instance only, by a thin decoder loop that calls
the model's own modules (``embed_tokens``, each decoder layer as is, ``rotary_emb``,
``norm``; transformers' ``create_causal_mask``) and can change the sequence between
two layers. A forward pre-hook on the outer model records the call's ``input_ids``,
which say where the visual tokens are. At a pruning layer the
attention function is wrapped for that layer's call only, to keep its q/k after
RoPE (or its probabilities, ``scores_from="attn"`` under eager attention). Nothing
else of the model changes; ``remove()`` deletes the instance attribute and the hook.

Every batch row is pruned on its own: its own spans, raters, keep sets and position
ids (one :class:`sparsevlm.PrefillSession` per row). Rows of different new lengths
are re-padded on the left, with the attention mask to match. The text model returns
its hidden states at the input's ``[batch, length]``: every surviving token at its
original position (the text always survives, so the logits of every text token are
where the input put them), zeros at pruned visual positions; recycled tokens, which
have no original position, are not returned.

Decoding needs per-layer state (each layer's cache length, padding and first
decode position id); it rides on the ``DynamicCache`` object itself, whose class
becomes :class:`SparsifiedCache` (a ``DynamicCache`` that reports the original
length, and keeps its state through ``crop``, ``reorder_cache`` and ``reset``), so
it lives and dies with the generation that made it.

transformers is not a dependency of the package; this module imports it when
:func:`sparsify` is called. Tested with transformers 5.24 (``TESTED_TRANSFORMERS``).
"""
from __future__ import annotations

import itertools
import json
import os
import sys
import threading
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import numpy as np

from . import Error, PrefillSession, SessionConfig, StepOptions, apply_plan, derive_config, has_cuda
from . import Layout as _Layout

TESTED_TRANSFORMERS = "5.24"
"""The transformers minor version this module is tested with (docs/python.md)."""

SUPPORTED = {
    # outer class -> the decoder (text model) classes it is tested with
    "LlavaForConditionalGeneration": ("LlamaModel",),
    "LlavaNextForConditionalGeneration": ("LlamaModel",),
    "Qwen2VLForConditionalGeneration": ("Qwen2VLTextModel",),
    "Qwen2_5_VLForConditionalGeneration": ("Qwen2_5_VLTextModel",),
    "LlavaOnevisionForConditionalGeneration": ("Qwen2Model",),
    "InternVLForConditionalGeneration": ("Qwen2Model",),
    "Qwen3VLForConditionalGeneration": ("Qwen3VLTextModel",),
}
"""Model classes :func:`sparsify` accepts, each with its tested text-model classes."""

KV_OPTIONS = ("reference", "survivors", "merged")
"""The ``kv=`` choices for the caches of the layers up to a pruning layer:
"reference" keeps them whole (the authors' code: each layer ends with its own
length), "survivors" compacts them to the tokens that survive (recycled tokens
have no row there), "merged" to the full new sequence, a recycled token's K/V
being the mean of its members' (docs/integration.md, "KV caches")."""

SCORES_FROM = ("qk", "attn")
POSITIONS = (None, "renumber", "keep_original")
BUDGETS = (None, "global", "per_span")


def _check_options(name=lambda key: key, **values) -> None:
    """Raises :class:`Error` for a kv / positions / budget value outside its choices,
    naming it as ``name(key)`` (the vLLM plugin's come from ``hf_overrides``)."""
    allowed = {"kv": KV_OPTIONS, "positions": POSITIONS, "budget": BUDGETS}
    for key, value in values.items():
        if value not in allowed[key]:
            raise Error(f"{name(key)}: expected one of {list(allowed[key])}, got {value!r}")

_ATTENTION = ("sdpa", "eager", "flash_attention_2")
_CALLS = itertools.count()  # process-wide prefill counter: dump folder names
_LOCK = threading.Lock()  # registration of the capture functions


# ------------------------------------------------------------------ attention capture

# id(attention module) -> slot, armed only while that module's pruning layer runs.
_slots: dict[int, dict] = {}


def _capture_name(base: str) -> str:
    return f"sparsevlm_{base}"


def _base_function(module, base: str):
    """The attention function `base` as the module would call it: the modelling
    file's own ``eager_attention_forward`` for "eager", else the registry's."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if base == "eager":
        fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if fn is None:
            raise Error(f"attention: expected {type(module).__module__}.eager_attention_forward "
                        f"(transformers internals changed; see docs/python.md), got none")
        return fn
    return ALL_ATTENTION_FUNCTIONS[base]


def _make_capture(base: str):
    def capture(module, query, key, value, attention_mask, **kwargs):
        # The real function runs under its own name: flash_attention_forward, for
        # one, reads config._attn_implementation to pick its kernel.
        cfg = module.config
        name = cfg._attn_implementation
        cfg._attn_implementation = base
        try:
            out = _base_function(module, base)(module, query, key, value, attention_mask, **kwargs)
        finally:
            cfg._attn_implementation = name
        slot = _slots.get(id(module))
        if slot is not None:
            slot["q"], slot["k"] = query, key  # [B, H, n, dh], [B, Hkv, n, dh] after RoPE
            slot["scaling"] = kwargs.get("scaling")
            slot["attn"] = out[1] if isinstance(out, tuple) and len(out) > 1 else None
        return out

    capture.__name__ = f"capture_{base}"
    return capture


def _register(base: str) -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    name = _capture_name(base)
    with _LOCK:
        AttentionInterface.register(name, _make_capture(base))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    return name


# ----------------------------------------------------------------------------- stats


@dataclass
class StepStats:
    """One pruning layer of one batch row: ``layer``, tokens ``entering`` it,
    ``visual`` tokens before the step, ``rank``, ``kept`` visual tokens, ``recycled``
    merged tokens, ``length`` after the step, the ``case`` folder dumped for it
    (None when not dumped), and the session's :class:`sparsevlm.LayerPlan`
    (``plan.sequence``, ``plan.clusters``, ``plan.positions``: the decisions)."""

    layer: int
    entering: int
    visual: int
    rank: int
    kept: int
    recycled: int
    length: int
    case: Optional[str] = None
    plan: Any = None


@dataclass
class RowStats:
    """One batch row of the last prefill: ``tokens`` [layers] tokens entering each
    decoder layer; ``spans`` the visual spans (start, len) in the row's own token
    positions (padding excluded); ``raters`` their positions, ascending (empty when
    the row had no visual tokens); ``steps`` one :class:`StepStats` per pruning
    layer that ran."""

    tokens: list
    spans: list
    raters: list
    steps: list = field(default_factory=list)


# ------------------------------------------------------------------------- the handle


def sparsify(model, preset: Union[str, SessionConfig] = "v1.5-192", *, scores_from: str = "qk",
             positions: Optional[str] = None, kv: str = "reference", budget: Optional[str] = None,
             dump_dir: Optional[Union[str, os.PathLike]] = None) -> "Sparsified":
    """Makes an already loaded Hugging Face VLM prune inside its prefill.

    Afterwards ``model.generate(...)`` and ``model(...)`` prune; decoding, sampling,
    stopping criteria and ``use_cache`` work as usual. model: one of
    :data:`SUPPORTED`. preset: a published preset's name (carried over to the
    model's depth and each prompt's visual tokens by ``derive_config``) or a
    :class:`SessionConfig` whose ``layers`` is the model's depth. scores_from: "qk"
    (the pruning layer's q/k after RoPE, with sdpa, eager or flash_attention_2) or
    "attn" (its probabilities; eager attention). positions: None (the preset's
    policy), "renumber" or "keep_original". kv: one of :data:`KV_OPTIONS`. budget:
    None (the config's), "global" or "per_span" for several images or frames.
    dump_dir: write every pruning step of every row as a case folder (also set by
    the environment variable ``SPARSEVLM_DUMP_DIR``).

    Returns the :class:`Sparsified` handle. Raises :class:`sparsevlm.Error` naming
    the argument (an unsupported class, a preset that does not fit the model, an
    attention implementation that cannot give what ``scores_from`` needs); the model
    is then untouched.
    """
    return Sparsified(model, preset, scores_from=scores_from, positions=positions, kv=kv,
                      budget=budget, dump_dir=dump_dir)


class Sparsified:
    """The pruning installed on one model (see :func:`sparsify`).

    stats: per batch row of the last prefill, a :class:`RowStats`. calls: prefills
    run so far. remove(): the stock model again (idempotent). One generation at a
    time per model.
    """

    def __init__(self, model, preset, *, scores_from, positions, kv, budget, dump_dir):
        import torch  # noqa: F401  (transformers needs it; fail here, not mid-call)
        import transformers

        cls = type(model).__name__
        if cls not in SUPPORTED:
            raise Error(f"model: expected one of {', '.join(SUPPORTED)} (docs/python.md), got {cls}")
        text = _text_model(model)
        tcls = type(text).__name__
        if tcls not in SUPPORTED[cls]:
            raise Error(f"model.model.language_model: expected {' or '.join(SUPPORTED[cls])} for "
                        f"{cls}, got {tcls}")
        prev = vars(text).get("forward")  # accelerate's hooks wrap forward per instance
        if isinstance(getattr(prev, "__self__", None), Sparsified):
            raise Error("model: expected a stock model, got one already sparsified "
                        "(call remove() on its handle first)")
        devices = sorted({str(d) for d in (getattr(model, "hf_device_map", None) or {}).values()})
        if len(devices) > 1:
            raise Error(f"model.hf_device_map: expected one device, got {devices} (a model "
                        f"split over devices is not supported)")
        cfg = text.config
        for attr in ("embed_tokens", "layers", "norm", "rotary_emb"):
            if not hasattr(text, attr):
                raise Error(f"{tcls}.{attr}: expected the decoder's module (transformers "
                            f"internals changed; tested with {TESTED_TRANSFORMERS}), got none")
        types = getattr(cfg, "layer_types", None) or ["full_attention"] * len(text.layers)
        if any(t != "full_attention" for t in types):
            raise Error(f"config.layer_types: expected full attention in every layer, got "
                        f"{sorted(set(types))} (sliding-window caches are not supported)")
        if scores_from not in SCORES_FROM:
            raise Error(f"scores_from: expected one of {list(SCORES_FROM)}, got {scores_from!r}")
        impl = cfg._attn_implementation
        _check_attention(impl, scores_from)
        _check_options(kv=kv, positions=positions, budget=budget)

        self.model = model
        self.text_model = text
        self.layers = len(text.layers)
        self.heads = int(cfg.num_attention_heads)
        self.hidden = int(cfg.hidden_size)
        self.mlp = int(getattr(cfg, "intermediate_size", 4 * self.hidden))
        self.preset = preset
        self.scores_from = scores_from
        self.positions = positions
        self.kv = kv
        self.budget = budget
        self.dump_dir = None if dump_dir is None else os.fspath(dump_dir)
        self.attention = impl
        self.mrope = cls.startswith("Qwen")
        # Rows the stock text model expands missing or 2-D position ids to: Qwen3-VL
        # prepends the text positions to the three mRoPE rows.
        self._pos_rows = 4 if cls.startswith("Qwen3") else 3
        self.stats: list = []
        self.calls = 0
        self._visual_ids = [i for i in (getattr(model.config, "image_token_id", None),
                                        getattr(model.config, "video_token_id", None)) if i is not None]
        if not self._visual_ids:
            raise Error(f"model.config.image_token_id: expected the image placeholder id, got none")
        # The schedule must fit the model before anything is installed.
        if isinstance(preset, str):
            self._config(35, 576, "preset")  # LLaVA-1.5's counts: the preset's own check
        elif isinstance(preset, SessionConfig):
            if preset.layers != self.layers:
                raise Error(f"preset.layers: expected {self.layers} (the model's decoder layers), "
                            f"got {preset.layers}")
            for i, (layer, _) in enumerate(preset.schedule):
                if not 0 <= layer < self.layers - 1:
                    raise Error(f"preset.schedule[{i}].layer: expected in [0, {self.layers - 1}) for "
                                f"a {self.layers}-layer model, got {layer}")
        else:
            raise Error(f"preset: expected a preset name or a SessionConfig, got {type(preset).__name__}")
        self._capture = _register(impl)
        self._version = transformers.__version__

        self._call: Optional[dict] = None
        self._prev_forward = prev
        self._stock_forward = text.forward
        self._hook = model.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
        text.forward = self._forward  # instance attribute: remove() restores the class's

    # ----------------------------------------------------------------- install, remove

    def remove(self) -> None:
        """Uninstalls everything :func:`sparsify` installed; the model is stock again."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if vars(self.text_model).get("forward") == self._forward:
            if self._prev_forward is not None:
                self.text_model.forward = self._prev_forward
            else:
                del self.text_model.forward

    @property
    def installed(self) -> bool:
        return self._hook is not None

    def _pre_hook(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self._call = {"input_ids": ids}
        return None

    # ------------------------------------------------------------------------ configs

    def _config(self, prefix: int, visual: int, where: str) -> SessionConfig:
        """The SessionConfig for one row: the preset derived for its counts, with the
        handle's positions and budget."""
        return _session_config(self.preset, self.text_model.config, self.layers, self.heads,
                               self.hidden, self.mlp, prefix, visual, self.positions, self.budget,
                               self.mrope, type(self.model).__name__, where)

    # ---------------------------------------------------------------------- the forward

    def _forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                 inputs_embeds=None, use_cache=None, **kwargs):
        """The text model's forward while sparsified (the stock signature)."""
        from transformers import DynamicCache

        tm = self.text_model
        if cache is None:
            cache = kwargs.pop("past_key_values", None)
        for flag in ("output_attentions", "output_hidden_states"):
            if kwargs.get(flag):
                raise Error(f"{flag}: expected False while sparsified (the layers run on "
                            f"sequences of different lengths), got True")
        if (input_ids is None) == (inputs_embeds is None):
            raise Error("input_ids / inputs_embeds: expected exactly one, got "
                        + ("both" if input_ids is not None else "neither"))
        # Qwen3-VL's deepstack: visual features added to the first layers' outputs.
        deepstack = (kwargs.pop("visual_pos_masks", None), kwargs.pop("deepstack_visual_embeds", None))
        call, self._call = self._call, None
        if inputs_embeds is None:
            inputs_embeds = tm.embed_tokens(input_ids)
        if use_cache is None:
            use_cache = tm.config.use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=tm.config)
        state = getattr(cache, "_sparsevlm", None) if cache is not None else None
        if state is not None:
            return self._decode(inputs_embeds, cache, state, kwargs)
        ids = call.get("input_ids") if call else None
        if cache is not None and cache.get_seq_length() > 0:
            # A cache this handle did not prefill (continued generation): stock.
            return self._stock_forward(input_ids=None, attention_mask=attention_mask,
                                       position_ids=position_ids, cache=cache,
                                       inputs_embeds=inputs_embeds, use_cache=use_cache,
                                       **_with_deepstack(kwargs, deepstack))
        if ids is None or ids.shape[:2] != inputs_embeds.shape[:2]:
            raise Error("input_ids: expected the prompt's token ids at the model's forward (they say "
                        "where the visual tokens are), got "
                        + ("none (inputs_embeds only)" if ids is None else f"shape {tuple(ids.shape)}"))
        if cache is not None and not isinstance(cache, DynamicCache):
            raise Error(f"cache: expected a DynamicCache (per-layer lengths), got {type(cache).__name__}")
        return self._prefill(ids, inputs_embeds, attention_mask, position_ids, cache, use_cache,
                             kwargs, deepstack)

    # ------------------------------------------------------------------------ prefill

    def _rows(self, ids, mask, full_pos):
        """Per row: the valid columns and the visual spans in the row's own positions.

        A span is a maximal run of one visual token id (LLaVA: an image, with
        LLaVA-NeXT's tiles and newline tokens; two images with no token between them
        would form one span). Under mRoPE a run is also cut where its temporal
        position id changes: each image is one span, each temporal patch of a video
        (two frames for Qwen2-VL's temporal_patch_size 2) is one span."""
        import torch

        B, L = ids.shape
        if mask is not None and (mask.ndim != 2 or tuple(mask.shape) != (B, L)):
            raise Error(f"attention_mask: expected a 2-D [{B}, {L}] padding mask, got shape "
                        f"{tuple(mask.shape)}")
        rows = []
        for b in range(B):
            cols = (torch.arange(L, device=ids.device) if mask is None
                    else torch.nonzero(mask[b].bool()).flatten())
            tok = ids[b].index_select(0, cols).cpu().numpy()
            t = None
            if self.mrope:
                t = full_pos[0, min(b, full_pos.shape[1] - 1)].index_select(0, cols).cpu().numpy()
            rows.append((cols, _runs(tok, self._visual_ids, t)))
        return rows

    def _prefill(self, ids, embeds, attention_mask, position_ids, cache, use_cache, kwargs,
                 deepstack=(None, None)):
        import torch
        from transformers.masking_utils import create_causal_mask
        from transformers.modeling_outputs import BaseModelOutputWithPast

        tm = self.text_model
        cfg = tm.config
        B, L, _ = embeds.shape
        dev = embeds.device
        # Position ids exactly as the stock forward makes them.
        rope_pos, layer_pos, mask_pos = self._stock_positions(position_ids, B, L, dev)
        P = rope_pos.shape[0] if self.mrope else 1
        full_pos = rope_pos if self.mrope else rope_pos[None]  # [P, B or 1, L]
        rows = self._rows(ids, attention_mask, full_pos)
        if not any(spans for _, spans in rows):  # no visual token in the batch: stock
            self.stats = [RowStats([int(c.numel())] * self.layers, [], []) for c, _ in rows]
            return self._stock_forward(input_ids=None, attention_mask=attention_mask,
                                       position_ids=position_ids, cache=cache, inputs_embeds=embeds,
                                       use_cache=use_cache, **_with_deepstack(kwargs, deepstack))
        impl = cfg._attn_implementation
        if impl != self.attention:  # switched since sparsify (set_attn_implementation)
            _check_attention(impl, self.scores_from)
            self._capture, self.attention = _register(impl), impl
        self.calls += 1
        call_no = next(_CALLS)
        dump = self.dump_dir or os.environ.get("SPARSEVLM_DUMP_DIR") or None

        sessions, stats, row_embeds = [], [], {}
        for b, (cols, spans) in enumerate(rows):
            n = int(cols.numel())
            pos_b = full_pos[:, min(b, full_pos.shape[1] - 1)].index_select(-1, cols).cpu()
            if not spans:
                sessions.append(None)
                stats.append(RowStats([], [], []))
                continue
            layout = _Layout(n, spans)
            conf = self._config(spans[0][0], sum(s[1] for s in spans), f"input_ids[{b}]")
            e = embeds[b].index_select(0, cols)
            s = PrefillSession(layout, conf, embeds=_host(e), positions=pos_b.contiguous())
            sessions.append(s)
            row_embeds[b] = e  # the dump's embeds.npy at the first step
            stats.append(RowStats([], list(spans), [int(r) for r in s.raters]))
        self.stats = stats
        ds_mask, ds_embeds = deepstack
        ds_layers = len(ds_embeds) if ds_embeds is not None else 0
        for b, st in enumerate(sessions):
            first = st.next_layer if st is not None else None
            if first is not None and first < ds_layers - 1:
                raise Error(f"preset.schedule[0].layer: expected >= {ds_layers - 1} for "
                            f"{type(self.model).__name__} (its deepstack adds visual features to "
                            f"the outputs of layers 0..{ds_layers - 1}), got {first} (row {b})")

        state = _State(self.layers, B)
        # The current packing: per row the columns of its tokens, their positions.
        cur_cols = [c for c, _ in rows]
        cur_pos = [full_pos[:, min(b, full_pos.shape[1] - 1)].index_select(-1, c)
                   for b, c in enumerate(cur_cols)]
        hidden = embeds
        mask2d = None if attention_mask is None else attention_mask.bool()
        group_mask = create_causal_mask(config=cfg, inputs_embeds=embeds, attention_mask=attention_mask,
                                        cache=cache, position_ids=mask_pos)
        rope = tm.rotary_emb(hidden, position_ids=rope_pos)
        base = _first_decode_ids(cur_pos, dev)
        pruned_any = False
        for i, layer in enumerate(tm.layers):
            for b, st in enumerate(stats):
                st.tokens.append(int(cur_cols[b].numel()))
            prunes = [b for b, s in enumerate(sessions) if s is not None and s.prunes_after(i)]
            slot = None
            if prunes:
                slot = _slots[id(layer.self_attn)] = {}
                tm.config._attn_implementation = self._capture
            try:
                hidden = layer(hidden, attention_mask=group_mask, position_embeddings=rope,
                               position_ids=layer_pos, cache=cache, use_cache=use_cache, **kwargs)
            finally:
                if slot is not None:
                    tm.config._attn_implementation = impl
                    _slots.pop(id(layer.self_attn), None)
            if i < ds_layers:  # before any pruning (checked above): the stock addition
                hidden = tm._deepstack_process(hidden, ds_mask, ds_embeds[i])
            state.keymask[i] = mask2d
            state.cols[i] = list(cur_cols)
            state.held[i] = [torch.arange(c.numel(), device=dev) for c in cur_cols]
            state.base[i] = base
            if not prunes:
                continue
            if "q" not in slot:
                raise Error(f"layer {i}: expected the attention function {self._capture!r} to run "
                            f"(transformers internals changed; see docs/python.md), got no call")
            new_rows = [None] * B
            for b in prunes:
                r = self._prune_row(b, i, sessions[b], hidden, cur_cols[b], slot, dump, call_no,
                                    row_embeds[b])
                p = r["plan"]
                stats[b].steps.append(StepStats(i, r["entering"], r["visual"], int(p.rank),
                                                int(p.keep_count), len(p.clusters), int(p.length),
                                                r["case"], p))
                new_rows[b] = p
            slot.clear()
            pruned_any = True
            # The pruned rows' new tokens; the others keep theirs. Re-pack on the left.
            parts, poss = [], []
            for b in range(B):
                rows_b = hidden[b].index_select(0, cur_cols[b])
                if new_rows[b] is None:
                    parts.append(rows_b)
                    poss.append(cur_pos[b])
                else:
                    parts.append(apply_plan(new_rows[b], rows_b))
                    poss.append(torch.as_tensor(new_rows[b].positions, device=dev))
            if self.kv != "reference" and cache is not None:
                self._compact(cache, state, i, sessions, new_rows, prunes)
            hidden, cur_cols, mask2d = _pack_left(parts, dev)
            cur_pos = poss
            packed = _pack_positions(poss, cur_cols, hidden.shape[1], P, dev)  # [P, B, n]
            rope_pos = packed if self.mrope else packed[0]
            layer_pos = None if self.mrope else packed[0]
            group_mask = create_causal_mask(config=cfg, inputs_embeds=hidden, attention_mask=mask2d,
                                            cache=cache, position_ids=None, layer_idx=i + 1)
            rope = tm.rotary_emb(hidden, position_ids=rope_pos)
            base = _first_decode_ids(cur_pos, dev)

        hidden = tm.norm(hidden)
        if pruned_any:
            hidden = self._unpack(hidden, embeds, rows, sessions, cur_cols)
        if cache is not None:
            state.finish(cache, L)
            cache.__class__ = _sparsified_cache_class()
            cache._sparsevlm = state
        return BaseModelOutputWithPast(last_hidden_state=hidden, cache=cache)

    def _stock_positions(self, position_ids, B, L, dev):
        """(rope positions, the layers' position_ids kwarg, the mask's position_ids) as
        the stock text model derives them from its position_ids argument."""
        import torch

        if self.mrope:
            r = self._pos_rows
            if position_ids is None:
                p = torch.arange(L, device=dev).view(1, 1, -1).expand(r, B, -1)
            elif position_ids.ndim == 2:
                p = position_ids[None, ...].expand(r, position_ids.shape[0], -1)
            else:
                p = position_ids
            if p.ndim == 3 and p.shape[0] == 4:
                return p[1:], p[0], p[0]
            return p, None, None
        p = position_ids if position_ids is not None else torch.arange(L, device=dev)[None]
        return p, p, p

    def _prune_row(self, b, layer, session, hidden, cols, slot, dump, call_no, embeds):
        """One row's step at `layer`: the session's plan, and the case folder."""
        h = hidden[b].index_select(0, cols)
        n = int(cols.numel())
        scale = slot.get("scaling")
        scale = 0.0 if scale is None else float(scale)
        if self.scores_from == "attn":
            a = slot.get("attn")
            if a is None:
                raise Error(f"layer {layer}: expected attention probabilities from eager attention, "
                            f"got none")
            a = a[b].index_select(1, cols).index_select(2, cols)
            q = k = None
        else:
            a = None
            k = slot["k"][b].index_select(1, cols)
            qfull = slot["q"][b].index_select(1, cols)
            raters = torch_long(session.raters, qfull.device)
            q = qfull.index_select(1, raters)
        raters_before = [int(r) for r in session.raters.tolist()]
        first = session.steps_done == 0
        visual, visual_tokens = session.visual, session.visual_tokens
        options = dict(session.config.schedule)[layer]
        # CUDA tensors stay on the device when the package has the CUDA step and the
        # step is one span without gravity (PrefillSession.prune then runs it there);
        # otherwise the step's inputs are copied to the host.
        held = sum(1 for s in session.spans if s[1] > 0)
        keep = h.device.type == "cpu" or (has_cuda() and held == 1 and not options.gravity.enabled
                                          and not options.top_heads)
        put = (lambda t: t.detach()) if keep else _host
        if a is not None:
            plan = session.prune(layer, put(h), attn=put(a))
        else:
            plan = session.prune(layer, put(h), q=put(q), k=put(k), scale=scale)
        case = None
        if dump:
            case = write_case(dump, call_no, b, layer, h, a, None if a is not None else qfull, k,
                              scale, raters_before, first, visual, options, plan,
                              len(session.spans), embeds)
        return {"plan": plan, "case": case, "entering": n, "visual": visual_tokens}

    # -------------------------------------------------------------------------- caches

    def _compact(self, cache, state, upto, sessions, plans, prunes):
        """kv="survivors" / "merged": the caches of layers 0..upto after the step."""
        import torch

        for j in range(upto + 1):
            entry = cache.layers[j]
            keys, values = entry.keys, entry.values
            new_k, new_v, held = [], [], []
            for b in range(keys.shape[0]):
                cols = state.cols[j][b].to(keys.device)
                if plans[b] is None:
                    new_k.append(keys[b].index_select(1, cols))
                    new_v.append(values[b].index_select(1, cols))
                    held.append(state.held[j][b])
                    continue
                if self.kv == "survivors":
                    rows = torch_long(sessions[b].kv_rows(j), keys.device)
                    idx = torch.searchsorted(state.held[j][b].to(keys.device), rows)
                    if idx.numel() and (int(idx.max()) >= state.held[j][b].numel() or not torch.equal(
                            state.held[j][b].to(keys.device)[idx], rows)):
                        raise Error(f"kv_rows({j}): expected rows that layer {j}'s cache holds, "
                                    f"got others (row {b})")
                    sel = cols.index_select(0, idx)
                    new_k.append(keys[b].index_select(1, sel))
                    new_v.append(values[b].index_select(1, sel))
                    held.append(rows)
                else:  # merged: every layer up to here holds this step's input rows
                    seq = torch_long(plans[b].sequence, keys.device)
                    kb, vb = keys[b].index_select(1, cols), values[b].index_select(1, cols)
                    mk = [kb.index_select(1, torch_long(c, keys.device)).float().mean(1)
                          for c in plans[b].clusters]
                    mv = [vb.index_select(1, torch_long(c, keys.device)).float().mean(1)
                          for c in plans[b].clusters]
                    src_k = torch.cat([kb] + [m[:, None].to(kb.dtype) for m in mk], 1)
                    src_v = torch.cat([vb] + [m[:, None].to(vb.dtype) for m in mv], 1)
                    n_in = kb.shape[1]
                    idx = torch.where(seq >= 0, seq, n_in - 1 - seq)
                    new_k.append(src_k.index_select(1, idx))
                    new_v.append(src_v.index_select(1, idx))
                    held.append(torch.arange(seq.numel(), device=keys.device))
            width = max(x.shape[1] for x in new_k)
            k_out = keys.new_zeros(keys.shape[0], keys.shape[1], width, keys.shape[3])
            v_out = values.new_zeros(values.shape[0], values.shape[1], width, values.shape[3])
            cols_out = []
            for b, (kb, vb) in enumerate(zip(new_k, new_v)):
                w = kb.shape[1]
                k_out[b, :, width - w:] = kb
                v_out[b, :, width - w:] = vb
                cols_out.append(torch.arange(width - w, width, device=keys.device))
            entry.keys, entry.values = k_out, v_out
            state.cols[j], state.held[j] = cols_out, held
            lens = [c.numel() for c in cols_out]
            state.keymask[j] = None if all(x == width for x in lens) else torch.stack(
                [torch.arange(width, device=keys.device) >= width - x for x in lens])

    def _unpack(self, hidden, embeds, rows, sessions, cur_cols):
        """[B, n, d] of the pruned sequence -> [B, L, d] at the input's positions:
        each surviving token where it was, zeros where a visual token was pruned."""
        import torch

        B, L = embeds.shape[:2]
        out = hidden.new_zeros(B, L, hidden.shape[-1])
        for b, (cols, _) in enumerate(rows):
            s = sessions[b]
            if s is None or s.steps_done == 0:
                out[b].index_copy_(0, cols, hidden[b].index_select(0, cur_cols[b]))
                continue
            origin = torch_long(s.origins, hidden.device)
            live = torch.nonzero(origin >= 0).flatten()
            out[b].index_copy_(0, cols.index_select(0, origin.index_select(0, live)),
                               hidden[b].index_select(0, cur_cols[b].index_select(0, live)))
        return out

    # --------------------------------------------------------------------------- decode

    def _decode(self, embeds, cache, state, kwargs):
        """New tokens through every layer: each attends to its whole cache (with its
        own padding) and continues from its own first decode position. The model's
        attention_mask and position_ids are not read: the state has each layer's."""
        import torch
        from transformers.masking_utils import create_causal_mask
        from transformers.modeling_outputs import BaseModelOutputWithPast

        tm = self.text_model
        B, m, _ = embeds.shape
        if B != state.batch:
            raise Error(f"inputs_embeds.shape[0]: expected {state.batch} (the prefill's batch), got {B}")
        state.check(cache)
        dev = embeds.device
        step = torch.arange(m, device=dev) + state.t
        ropes: dict = {}
        masks: dict = {}
        hidden = embeds
        for j, layer in enumerate(tm.layers):
            km = state.keymask[j]
            # Layers with the same padding and length share one mask, and layers with
            # the same first positions one rotary embedding (keys known on the host).
            mkey = (state.group[j], state.width[j])
            if mkey not in masks:
                m2 = None if km is None else torch.cat([km, km.new_ones(B, m)], 1)
                masks[mkey] = create_causal_mask(config=tm.config, inputs_embeds=hidden,
                                                 attention_mask=m2, cache=cache,
                                                 position_ids=None, layer_idx=j)
            key = state.base_key[j]
            if key not in ropes:
                pos = state.base[j][:, None] + step[None]
                rp = pos[None].expand(3, B, m) if self.mrope else pos
                ropes[key] = (tm.rotary_emb(hidden, position_ids=rp), None if self.mrope else pos)
            rope, lpos = ropes[key]
            hidden = layer(hidden, attention_mask=masks[mkey], position_embeddings=rope,
                           position_ids=lpos, cache=cache, use_cache=True, **kwargs)
        state.advance(m)
        return BaseModelOutputWithPast(last_hidden_state=tm.norm(hidden), cache=cache)

    # ---------------------------------------------------------------------------- dumps

def write_case(root, call_no, b, layer, h, attn, q, k, scale, raters, first, visual, options,
           plan, n_spans, embeds):
    """Writes one pruning step as the case folder ``pid<PID>-call<N>-row<B>-layer<L>``
    under `root` (../shared/spec/case-format.md) with the library's decision in
    expected/; returns the folder, or None when the step cannot be written in the
    format (several spans, SparseVLM+ scoring; the reason goes to skipped.txt).
    h [n, d] the layer's output, attn [H, n, n] or q [H, n, dh] / k [Hkv, n, dh] the
    whole sequence's, raters the session's before the step, first whether it is the
    sequence's first step (embeds [n, d_e] then chose the raters). Shared by the
    Hugging Face and vLLM integrations."""
    import torch

    name = f"pid{os.getpid()}-call{call_no:05d}-row{b:03d}-layer{layer:03d}"
    path = os.path.join(os.fspath(root), name)
    why = None
    if n_spans != 1:
        why = f"{n_spans} visual spans (a case has one)"
    elif options.top_heads or options.gravity.enabled:
        why = "SparseVLM+ scoring (top_heads / gravity are not in the case format)"
    elif attn is None and scale and abs(scale * q.shape[-1] ** 0.5 - 1.0) > 1e-6:
        why = f"attention scale {scale} (a case's q/k are scored with 1/sqrt(dh))"
    os.makedirs(root, exist_ok=True)
    if why:
        with open(os.path.join(root, "skipped.txt"), "a") as f:
            f.write(f"{name}: {why}\n")
        return None
    os.makedirs(os.path.join(path, "expected"), exist_ok=True)

    def arr(t):
        t = t.detach().cpu()
        return t.numpy() if t.dtype == torch.float16 else t.float().numpy()

    if attn is None:  # the probabilities the case format needs, from q/k
        qf, kf = q.float(), k.float()
        rep = qf.shape[0] // kf.shape[0]
        kf = kf.repeat_interleave(rep, 0)
        s = (qf @ kf.transpose(1, 2)) * (scale or qf.shape[-1] ** -0.5)
        n = s.shape[-1]
        causal = torch.ones(n, n, dtype=torch.bool, device=s.device).tril()
        attn = torch.softmax(s.masked_fill(~causal, float("-inf")), -1)
        np.save(os.path.join(path, "q.npy"), arr(q))
        np.save(os.path.join(path, "k.npy"), arr(k))
    np.save(os.path.join(path, "attn.npy"), arr(attn))
    np.save(os.path.join(path, "hidden.npy"), arr(h))
    # The input embeddings choose the raters at the first step; later steps give
    # them, and embeds.npy (a required file) then holds the step's hidden states.
    e = embeds if first else h
    np.save(os.path.join(path, "embeds.npy"), arr(e))
    pol = options.policy
    case = {
        "format": "sparsevlm-case/1",
        "visual": {"start": int(visual[0]), "len": int(visual[1])},
        "embeds": "embeds.npy", "attn": "attn.npy", "hidden": "hidden.npy",
        "policy": ({"kind": "rank", "scale": pol.scale, "bias": pol.bias} if pol.kind == "rank"
                   else {"kind": "fixed", "keep": int(pol.keep)}),
        "recycle": {"enabled": bool(options.recycle.enabled),
                    "fraction": options.recycle.fraction,
                    "cluster_divisor": options.recycle.cluster_divisor},
    }
    if q is not None:
        case["q"], case["k"] = "q.npy", "k.npy"
    if not first:
        case["raters"] = raters
    with open(os.path.join(path, "case.json"), "w") as f:
        json.dump(case, f, indent=1)
    res = {
        "raters": [int(r) for r in plan.raters], "rank": int(plan.rank),
        "keep_count": int(plan.keep_count), "keep": [int(x) for x in plan.keep],
        "clusters": [[int(x) for x in c] for c in plan.clusters],
        "sequence": [int(x) for x in plan.sequence],
    }
    if plan.clusters:
        res["merged"] = "merged.npy"
        np.save(os.path.join(path, "expected", "merged.npy"),
                np.asarray(plan.merged.cpu() if hasattr(plan.merged, "cpu") else plan.merged,
                           dtype=np.float32))
    with open(os.path.join(path, "expected", "result.json"), "w") as f:
        json.dump(res, f, indent=1)
    return path


def _session_config(preset, text_config, layers: int, heads: int, hidden: int, mlp: int,
                    prefix: int, visual: int, positions: Optional[str], budget: Optional[str],
                    mrope: bool, model_name: str, where: str) -> SessionConfig:
    """The SessionConfig for one sequence: `preset` (a name, derived for this model's
    shape and the sequence's `prefix` and `visual` counts by ``derive_config``, or a
    SessionConfig) with `positions` and `budget` when given; SparseVLM+'s RoPE gravity
    takes the decoder's RoPE base from `text_config`. Shared by the Hugging Face and
    vLLM integrations. Raises :class:`Error` prefixed by `where`."""
    if isinstance(preset, str):
        try:
            c = derive_config(preset, layers, heads, hidden, mlp, prefix, visual)
        except Error as e:
            raise Error(f"{where} ({preset!r} on this {layers}-layer model, "
                        f"{visual} visual tokens): {e}") from None
    else:
        c = preset
    schedule = []
    for layer, opt in c.schedule:
        if opt.gravity.enabled:
            g = opt.gravity
            if mrope:
                raise Error(f"{where}: SparseVLM+'s RoPE gravity expects 1-D RoPE, got mRoPE "
                            f"({model_name}); use a v1/v1.5 preset")
            rope = getattr(text_config, "rope_parameters", None) or {}
            g.base = float(rope.get("rope_theta", getattr(text_config, "rope_theta", 10000.0)))
            g.rotary_dim = g.rotary_dim or g.head_dim
            opt = StepOptions(policy=opt.policy, recycle=opt.recycle, top_heads=opt.top_heads,
                              gravity=g)
        schedule.append((layer, opt))
    return SessionConfig(c.layers, schedule, positions=positions or c.positions,
                         budget=budget or c.budget)


class _State:
    """What decoding needs per layer: the padding of its cache (``keymask`` [B, T]
    or None), the column of each held row (``cols``) and the coordinate it was
    written in (``held``), the first decode position id per row (``base`` [B], and
    ``base_key`` the same on the host), the cache's length (``width``) and
    ``group`` (layers with the same padding share a number); ``t`` tokens decoded;
    ``length`` the prompt's (padded) length."""

    def __init__(self, layers: int, batch: int):
        self.batch = batch
        self.keymask: list = [None] * layers
        self.cols: list = [None] * layers
        self.held: list = [None] * layers
        self.base: list = [None] * layers
        self.base_key: list = [None] * layers
        self.width: list = [0] * layers
        self.group: list = [0] * layers
        self.t = 0
        self.length = 0

    def finish(self, cache, length: int) -> None:
        """After the prefill: the lengths, groups and host keys decoding uses."""
        self.length, self.t = length, 0
        self.width = [int(cache.layers[j].keys.shape[-2]) for j in range(len(self.base))]
        self.base_key = [tuple(b.tolist()) for b in self.base]
        self._regroup()

    def _regroup(self) -> None:
        ids: dict = {}
        self.group = [ids.setdefault(id(k) if k is not None else None, len(ids)) for k in self.keymask]

    def check(self, cache) -> None:
        for j, w in enumerate(self.width):
            got = int(cache.layers[j].keys.shape[-2]) if cache.layers[j].keys is not None else 0
            if got != w:
                raise Error(f"cache.layers[{j}]: expected {w} rows (what the sparsified prefill "
                            f"and {self.t} decode steps left), got {got} (edited outside "
                            f"SparsifiedCache's crop / reorder_cache)")

    def _map_masks(self, fn) -> None:
        """keymask[j] = fn(keymask[j]) once per distinct mask (layers share them)."""
        done: dict = {}
        for j, km in enumerate(self.keymask):
            if km is not None:
                if id(km) not in done:
                    done[id(km)] = fn(km)
                self.keymask[j] = done[id(km)]

    def advance(self, m: int) -> None:
        import torch

        self._map_masks(lambda km: torch.cat([km, km.new_ones(km.shape[0], m)], 1))
        self.width = [w + m for w in self.width]
        self.t += m
        self._regroup()

    def rewind(self, r: int) -> None:
        if not 0 <= r <= self.t:
            raise Error(f"cache.crop: expected to remove at most the {self.t} decoded tokens, "
                        f"got {r} (the prompt's caches were pruned)")
        if r:
            self._map_masks(lambda km: km[:, : km.shape[1] - r])
        self.width = [w - r for w in self.width]
        self.t -= r
        self._regroup()

    def select(self, idx) -> None:
        """Rows `idx` of the batch, in that order (beam search, contrastive search)."""
        rows = [int(i) for i in idx.tolist()]
        self._map_masks(lambda km: km.index_select(0, idx.to(km.device)))
        for j in range(len(self.base)):
            self.base[j] = self.base[j].index_select(0, idx.to(self.base[j].device))
            self.base_key[j] = tuple(self.base_key[j][i] for i in rows)
            self.cols[j] = [self.cols[j][i] for i in rows]
            self.held[j] = [self.held[j][i] for i in rows]
        self.batch = len(rows)
        self._regroup()


_SPARSIFIED_CACHE = None


def _sparsified_cache_class():
    """SparsifiedCache, made on first use (transformers is imported lazily)."""
    global _SPARSIFIED_CACHE
    if _SPARSIFIED_CACHE is None:
        from transformers import DynamicCache

        class SparsifiedCache(DynamicCache):
            """The DynamicCache of a sparsified prefill: its layers hold different
            numbers of rows, so it reports the original length (prompt + decoded,
            what generate() counts) and keeps its per-layer state through crop
            (assisted decoding), reorder_cache (beam search) and reset."""

            def get_seq_length(self, layer_idx: int = 0) -> int:
                return self._sparsevlm.length + self._sparsevlm.t

            def crop(self, tokens_to_remove: int) -> None:
                if tokens_to_remove > 0:  # DynamicCache refuses these too
                    raise Error(f"cache.crop: expected a negative count, got {tokens_to_remove}")
                self._sparsevlm.rewind(-tokens_to_remove)
                super().crop(tokens_to_remove)

            def reorder_cache(self, beam_idx) -> None:
                super().reorder_cache(beam_idx)
                self._sparsevlm.select(beam_idx)

            def batch_select_indices(self, indices) -> None:
                super().batch_select_indices(indices)
                self._sparsevlm.select(indices)

            def batch_repeat_interleave(self, repeats: int) -> None:
                import torch

                super().batch_repeat_interleave(repeats)
                self._sparsevlm.select(torch.arange(self._sparsevlm.batch).repeat_interleave(repeats))

            def reset(self) -> None:
                super().reset()
                del self._sparsevlm
                self.__class__ = DynamicCache

        _SPARSIFIED_CACHE = SparsifiedCache
    return _SPARSIFIED_CACHE


def _first_decode_ids(positions, dev):
    """[B]: 1 + the largest position id of each row (every mRoPE row), where a layer
    that runs on these positions continues while decoding."""
    import torch

    return torch.stack([p.max() + 1 if p.numel() else p.new_zeros(()) for p in positions]).to(dev)


def _with_deepstack(kwargs, deepstack):
    mask, embeds = deepstack
    if embeds is None:
        return kwargs
    return dict(kwargs, visual_pos_masks=mask, deepstack_visual_embeds=embeds)


def _check_attention(impl, scores_from):
    if impl not in _ATTENTION:
        raise Error(f"attn_implementation: expected one of {list(_ATTENTION)}, got {impl!r}")
    if scores_from == "attn" and impl != "eager":
        raise Error(f"scores_from='attn': expected attn_implementation 'eager' (it alone "
                    f"forms the probabilities), got {impl!r}; use scores_from='qk'")


def _text_model(model):
    inner = getattr(model, "model", None)
    text = getattr(inner, "language_model", None)
    if text is None:
        raise Error(f"model.model.language_model: expected the decoder, got none "
                    f"({type(model).__name__})")
    return text


def _host(t):
    t = t.detach()
    return t if t.device.type == "cpu" else t.cpu()


def torch_long(x, device):
    import torch

    return torch.as_tensor(x, dtype=torch.long).to(device)


def _runs(tok: np.ndarray, ids: list, t: Optional[np.ndarray]) -> list:
    """(start, len) of each maximal run of one visual token id (and, given the
    temporal position ids `t`, of one temporal id)."""
    out, i, n = [], 0, len(tok)
    while i < n:
        if tok[i] in ids:
            j = i
            while j < n and tok[j] == tok[i] and (t is None or t[j] == t[i]):
                j += 1
            out.append((i, j - i))
            i = j
        else:
            i += 1
    return out


def _pack_left(parts, dev):
    """[n_b, d] rows -> [B, n_max, d] padded on the left, the columns of each row,
    and the 2-D mask (None when no row is padded)."""
    import torch

    width = max(p.shape[0] for p in parts)
    out = parts[0].new_zeros(len(parts), width, parts[0].shape[1])
    cols = []
    for b, p in enumerate(parts):
        out[b, width - p.shape[0]:] = p
        cols.append(torch.arange(width - p.shape[0], width, device=dev))
    if all(p.shape[0] == width for p in parts):
        return out, cols, None
    mask = torch.stack([torch.arange(width, device=dev) >= width - p.shape[0] for p in parts])
    return out, cols, mask


def _pack_positions(poss, cols, width, P, dev):
    import torch

    out = torch.zeros(P, len(poss), width, dtype=torch.long, device=dev)
    for b, (p, c) in enumerate(zip(poss, cols)):
        out[:, b].index_copy_(1, c, p.to(dev).reshape(P, -1))
    return out
