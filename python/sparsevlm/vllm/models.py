"""The SparseVLM model classes vLLM builds (registered by :func:`sparsevlm.vllm.register`).

Each class is vLLM's own model class (its multimodal processor, vision tower and
weight loading are inherited) whose ``forward`` runs the decoder itself through
:class:`Runtime`: the stock layers, one by one, with the sequence of every request
that prefills an image cut after each of its pruning layers. What makes that work
inside vLLM V1 (docs/vllm.md, "Internals relied on"):

- ``requires_raw_input_tokens``: the runner passes ``input_ids`` with the merged
  ``inputs_embeds``, so the image placeholders say where the visual tokens are.
- Every attention layer reads its metadata from ``forward_context.attn_metadata
  [layer_name]`` and writes K/V at ``forward_context.slot_mapping[layer_name]``. After
  a cut the following layers get their own entries (rewritten by the backend's
  :class:`sparsevlm.vllm.attention.Rewriter`); the shared metadata object is never
  mutated, and both dicts are restored when the forward returns.
- A pruned request's later layers hold its surviving tokens' K/V in its first slots
  (vLLM's KV manager still reserves all of them: memory is not saved). Decoding gives
  those layers ``seq_len - removed`` and the matching slot and position id; the
  state lives in :class:`_Pruned`, keyed by the request's first KV block (request
  identity is not visible to a model; with prefix caching off a block has one owner).
- The output keeps the input's token count (the runner reads it at the original
  token indices): each surviving token at its place, zeros where one was pruned.
"""
from __future__ import annotations

import collections
import itertools
import logging
import os
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from .. import (Error, Layout, PrefillSession, apply_plan, compact_paged_kv, partial_relevance,
               preset_names, prune_step_from_head_sums)
from ..hf import _check_options, _runs, _session_config, write_case
from . import OPTIONS, TESTED_VLLM
from .attention import rewriter_for

_CALLS = itertools.count()  # process-wide prefill counter: dump folder names
logger = logging.getLogger("sparsevlm.vllm")
_RESUMABLE = 256  # ended or evicted requests remembered for a resume after preemption


def check_engine(vllm_config) -> None:
    """Refuses, naming the setting, an engine the plugin cannot run exactly."""
    import vllm

    if vllm.__version__.split("+")[0] != TESTED_VLLM:
        raise Error(f"vllm: expected version {TESTED_VLLM} (the plugin relies on its internals, "
                    f"docs/vllm.md), got {vllm.__version__}")
    mc, cc, sc, pc = (vllm_config.model_config, vllm_config.cache_config,
                      vllm_config.scheduler_config, vllm_config.parallel_config)
    why = []
    if cc.enable_prefix_caching:
        why.append("enable_prefix_caching: expected False (a pruned layer's cache cannot be "
                   "shared by prefix; request state is keyed by the first block), got True")
    if sc.enable_chunked_prefill:
        why.append("enable_chunked_prefill: expected False (the raters need the whole prompt "
                   "in one step), got True")
    if not mc.enforce_eager:
        why.append("enforce_eager: expected True (pruned shapes are data-dependent; a "
                   "CUDA-graph or compiled forward would replay stale metadata), got False")
    if pc.pipeline_parallel_size != 1:
        why.append(f"pipeline_parallel_size: expected 1, got {pc.pipeline_parallel_size}")
    spec = vllm_config.speculative_config
    if spec is not None:
        why.append(f"speculative_config: expected None (drafts would decode against pruned "
                   f"caches the draft model does not have), got method "
                   f"{getattr(spec, 'method', None)!r}")
    if getattr(vllm_config, "kv_transfer_config", None) is not None:
        why.append("kv_transfer_config: expected None (externally computed tokens shorten "
                   "the prefill the raters need, and a connector would ship pruned pages), "
                   "got one")
    if getattr(vllm_config, "use_v2_model_runner", False):
        why.append("model runner: expected V1 (VLLM_USE_V2_MODEL_RUNNER=0; the plugin relies on "
                   "the V1 runner's internals, docs/vllm.md), got V2 (vLLM's default where "
                   "Triton runs, or VLLM_USE_V2_MODEL_RUNNER=1)")
    if why:
        raise Error("sparsevlm.vllm: this engine's settings cannot be pruned exactly: "
                    + "; ".join(why) + " (sparsevlm.vllm.engine_args gives the settings)")


def _options(hf_config) -> dict:
    raw = getattr(hf_config, "sparsevlm", None) or {}
    if not isinstance(raw, dict):
        raise Error(f"hf_overrides['sparsevlm']: expected a dict, got {type(raw).__name__}")
    bad = sorted(set(raw) - set(OPTIONS))
    if bad:
        raise Error(f"hf_overrides['sparsevlm']: expected keys among {list(OPTIONS)}, got {bad}")
    out = {k: raw.get(k) for k in OPTIONS}
    out["preset"] = out["preset"] or "v1.5-192"
    out["kv"] = out["kv"] or "reference"
    names = list(preset_names())
    if out["preset"] not in names:
        raise Error(f"hf_overrides['sparsevlm']['preset']: expected one of {names}, got "
                    f"{out['preset']!r}")
    _check_options(lambda key: f"hf_overrides['sparsevlm'][{key!r}]", kv=out["kv"],
                   positions=out["positions"], budget=out["budget"])
    return out


@dataclass
class _Pruned:
    """One pruned request, for its decode steps and a resume after preemption.

    prompt: its prompt's ids; removed [layers]: tokens fewer than the prompt each
    layer's cache holds; base [layers]: each layer's first decode position id, and
    stock_base the stock one (1 + the prompt's largest position id: vLLM gives decode
    step t the position stock_base + t); raters: the session's (prompt positions);
    decoded: ids fed by decode steps."""

    prompt: torch.Tensor
    removed: list
    base: list
    stock_base: int
    raters: list
    decoded: list = field(default_factory=list)


@dataclass
class _Req:
    """One request of the current step: its place in the flat batch (``q0``, ``n``
    tokens), ``seq`` its seq_len, ``block`` its first block id, and what runs:
    ``session`` (a pruned prefill) or ``state`` (a decode of a pruned request)."""

    index: int
    q0: int
    n: int
    seq: int
    block: int
    session: Optional[PrefillSession] = None
    state: Optional[_Pruned] = None
    embeds: Optional[torch.Tensor] = None
    positions: Optional[torch.Tensor] = None  # the prompt's [n] (or mRoPE [3, n]) position ids
    removed: int = 0  # tokens removed so far (prefill)
    held: dict = field(default_factory=dict)  # kv != "reference": layer -> rows its cache holds


class Runtime:
    """The decoder loop of one SparseVLM model instance (see the module's doc)."""

    def __init__(self, model, vllm_config):
        text = model.language_model.model
        self.model = model
        self.text = text
        self.layers = list(text.layers)
        start, end = getattr(text, "start_layer", 0), getattr(text, "end_layer", len(self.layers))
        if (start, end) != (0, len(self.layers)):
            raise Error(f"pipeline_parallel_size: expected 1 (the plugin runs every decoder "
                        f"layer), got a partial model (layers {start}..{end} of "
                        f"{len(self.layers)})")
        hf = vllm_config.model_config.hf_config
        self.options = _options(hf)
        self.kv = self.options["kv"]
        tc = hf.text_config
        self.text_config = tc
        self.n_layers = len(self.layers)
        self.heads = int(tc.num_attention_heads)
        self.hidden = int(tc.hidden_size)
        self.mlp = int(getattr(tc, "intermediate_size", 4 * self.hidden))
        image = getattr(hf, "image_token_id", None)
        if image is None:
            image = getattr(hf, "image_token_index", None)
        if image is None:
            raise Error("hf_config.image_token_id: expected the image placeholder id, got none")
        video = getattr(hf, "video_token_id", None)
        self.visual_ids = [int(image)] + ([int(video)] if video is not None else [])
        self.mrope = bool(getattr(model, "supports_mrope", False))
        self.kv_heads = int(getattr(tc, "num_key_value_heads", None) or self.heads)
        from vllm.distributed import (get_tensor_model_parallel_rank,
                                      get_tensor_model_parallel_world_size)

        self.tp = get_tensor_model_parallel_world_size()
        self.tp_rank = get_tensor_model_parallel_rank()
        self.attn = [layer.self_attn.attn for layer in self.layers]
        self.names = [a.layer_name for a in self.attn]
        self.rewriter = rewriter_for(self.attn[0], vllm_config)  # refuses other backends
        windows = sorted({w for w in (getattr(x.impl, "sliding_window", None) for x in self.attn)
                          if w not in (None, -1)})
        if windows:
            raise Error(f"sliding_window: expected full attention in every decoder layer (one "
                        f"KV-cache group, one block table), got windows {windows}")
        if self.kv != "reference":
            dtype = vllm_config.cache_config.cache_dtype
            if dtype != "auto":
                raise Error(f"kv_cache_dtype: expected 'auto' for kv={self.kv!r} (compaction "
                            f"moves and averages the model's dtype), got {dtype!r}")
            self.rewriter.check_kv(self.attn[0])
        # The schedule must fit the model before the engine starts (LLaVA-1.5's counts).
        self._config(35, 576, "hf_overrides['sparsevlm']['preset']")
        self.states: dict = {}  # first block id -> _Pruned
        self.resumable: collections.OrderedDict = collections.OrderedDict()  # ended requests
        self._ended = itertools.count()
        self._capture: dict = {}
        self.mm_mask = None  # embed_input_ids' is_multimodal of the current step
        self._warned_resume = False
        for j, a in enumerate(self.attn):
            a.register_forward_pre_hook(self._hook(j))

    # ------------------------------------------------------------------ helpers

    def _config(self, prefix: int, visual: int, where: str):
        o = self.options
        return _session_config(o["preset"], self.text_config, self.n_layers, self.heads,
                               self.hidden, self.mlp, prefix, visual, o["positions"],
                               o["budget"], self.mrope, type(self.model).__name__, where)

    def _hook(self, j: int):
        def pre(module, args):
            slot = self._capture.get(j)
            if slot is not None:  # q [T, H*dh], k [T, Hkv*dh] after RoPE
                slot["q"], slot["k"] = args[0], args[1]
        return pre

    def _forget(self, block: int) -> None:
        st = self.states.pop(block, None)
        if st is not None:
            self.resumable[next(self._ended)] = st
            while len(self.resumable) > _RESUMABLE:
                self.resumable.popitem(last=False)

    def _resumed(self, ids: torch.Tensor) -> Optional[list]:
        """The raters of a pruned request that was preempted and is now recomputed
        (vLLM prefills its prompt and outputs again): a known request whose prefilled
        ids, then the ids its decode steps fed, then one more token make up `ids`.
        The raters' scores depend only on earlier tokens (causal attention), so the
        recompute decides what the first prefill did; raters chosen afresh would
        count the outputs too. Found, not removed: two requests can be identical."""
        n = ids.numel()
        for st in itertools.chain(self.states.values(), reversed(self.resumable.values())):
            p, d = len(st.prompt), len(st.decoded)
            if p + d + 1 == n and torch.equal(ids[:p], st.prompt) and \
                    ids[p:p + d].tolist() == st.decoded:
                return list(st.raters)
        return None

    # ------------------------------------------------------------------ forward

    def forward(self, input_ids, positions, intermediate_tensors, inputs_embeds, stock, **kwargs):
        from vllm.forward_context import get_forward_context

        fc = get_forward_context()
        md_all = fc.attn_metadata
        if intermediate_tensors is not None:
            raise Error("intermediate_tensors: expected None (pipeline parallelism is refused), "
                        "got some")
        md0 = md_all.get(self.names[0]) if isinstance(md_all, dict) else None
        if md0 is None or input_ids is None or inputs_embeds is None:
            return stock(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)
        reqs = self._requests(md0, input_ids, positions, inputs_embeds)
        if not any(r.session is not None or r.state is not None for r in reqs):
            return stock(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)
        slots = dict(fc.slot_mapping)
        try:
            return self._run(fc, md_all, reqs, input_ids, positions, inputs_embeds)
        finally:
            fc.attn_metadata, fc.slot_mapping = md_all, slots
            self._capture.clear()

    def _requests(self, md, input_ids, positions, embeds) -> list:
        qsl_t, seq_t, table = self.rewriter.batch(md)
        qsl, seq = qsl_t.cpu().tolist(), seq_t.cpu().tolist()
        reqs = []
        dump = self.options["dump_dir"] or os.environ.get("SPARSEVLM_DUMP_DIR") or None
        ids_host = None
        # The runner's own mask of the positions that received multimodal embeddings
        # (recorded by embed_input_ids this step): a placeholder id typed as text is not
        # a visual token. Without it (no multimodal input this step) nothing is visual.
        mask, self.mm_mask = self.mm_mask, None
        if mask is not None and mask.numel() < int(qsl[len(seq)]):
            mask = None
        mask_host = mask.cpu().numpy() if mask is not None else None
        for r in range(len(seq)):
            q0, q1 = int(qsl[r]), int(qsl[r + 1])
            n, s = q1 - q0, int(seq[r])
            block = int(table[r, 0])
            req = _Req(r, q0, n, s, block)
            if n == s:  # a prefill from scratch (prefix caching and chunking are off)
                self._forget(block)
                if ids_host is None:
                    ids_host = input_ids.cpu()
                ids = ids_host[q0:q1]
                # Under mRoPE a span is also cut where the temporal position changes
                # (each image, each temporal patch of a video), as sparsevlm.hf does.
                t = positions[0, q0:q1].cpu().numpy() if self.mrope else None
                tok = ids.numpy().copy()
                if mask_host is None:
                    tok[:] = -1
                else:
                    tok[~mask_host[q0:q1]] = -1
                spans = _runs(tok, self.visual_ids, t)
                if spans:
                    self._start(req, ids, spans, embeds, positions, r)
            else:
                st = self.states.get(block)
                if st is not None:
                    if n != 1:
                        raise Error(f"request {r}: expected one new token per decode step of a "
                                    f"pruned request, got {n} (chunked prefill or speculative "
                                    f"decoding)")
                    st.decoded.append(int(input_ids[q0]))
                    req.state = st
            reqs.append(req)
        self.dump = dump
        return reqs

    def _start(self, req, ids, spans, embeds, positions, r):
        """A pruned prefill's session. A prompt the preset cannot be derived for (e.g.
        too few visual tokens for its keep counts) runs unpruned, with a warning: one
        request must not stop the engine and every other request with it."""
        n = req.n
        e = embeds[req.q0:req.q0 + n]
        resumed = self._resumed(ids)
        if resumed is not None and self.kv != "reference" and not self._warned_resume:
            self._warned_resume = True
            logger.warning("sparsevlm.vllm: a preempted request is recomputed with kv=%r: its "
                           "output tokens now attend to uncompacted caches up to the pruning "
                           "layers, so it may continue differently than without preemption "
                           "(kv='reference' resumes exactly)", self.kv)
        pos = positions[..., req.q0:req.q0 + n]
        kw = {"raters": resumed} if resumed is not None else {"embeds": e.detach().cpu()}
        try:
            conf = self._config(spans[0][0], sum(s[1] for s in spans), f"request {r}")
            req.session = PrefillSession(Layout(n, spans), conf,
                                         positions=pos.cpu().reshape(-1, n).contiguous(), **kw)
        except Error as err:
            logger.warning("sparsevlm.vllm: request %d (%d tokens, visual spans %s) runs "
                           "unpruned: %s", r, n, spans, err)
            return
        req.embeds = e
        req.positions = pos
        base = int(pos.max()) + 1
        req.state = _Pruned(ids.clone(), [0] * self.n_layers, [base] * self.n_layers, base,
                            [int(x) for x in req.session.raters.tolist()])

    # ------------------------------------------------------------- the decoder loop

    def _run(self, fc, md_all, reqs, input_ids, positions, embeds):
        dev = embeds.device
        T = int(embeds.shape[0])
        md0 = md_all[self.names[0]]
        table = self.rewriter.batch(md0)[2]
        block_size = int(self.attn[0].kv_cache.shape[2])  # [blocks, Hkv, bs, 2 dh] (vLLM 0.32)
        self._table, self._block_size = table.cpu().long(), block_size
        call_no = next(_CALLS) if any(r.session for r in reqs) else None
        # The current flat batch: per request its hidden rows and positions.
        segs = [embeds[r.q0:r.q0 + r.n] for r in reqs]
        poss = [positions[..., r.q0:r.q0 + r.n] for r in reqs]
        hidden, residual = embeds[:T], None
        if T > sum(r.n for r in reqs):  # padding rows after the requests: not carried
            hidden = hidden[:sum(r.n for r in reqs)]
        base_md, base_slots = dict(md_all), dict(fc.slot_mapping)
        cur_md, cur_slots = base_md, base_slots
        key_prev = None
        flat_pos = positions[..., :hidden.shape[0]]
        for i, layer in enumerate(self.layers):
            # What layer i's metadata and positions depend on: per decode its cache's
            # shortfall and first decode position (layers with equal shortfalls can
            # differ in positions, kv="survivors"); the prefills' tokens change only at
            # a cut, which resets key_prev.
            key = tuple((r.state.removed[i], r.state.base[i] - r.state.stock_base)
                        if r.session is None and r.state else (r.removed, 0) for r in reqs)
            if key != key_prev:
                if all(a == 0 and b == 0 for a, b in key):
                    cur_md, cur_slots = base_md, base_slots
                    flat_pos = positions[..., :hidden.shape[0]]
                else:
                    cur_md, cur_slots, flat_pos = self._rewrite(i, reqs, md0, base_md, base_slots,
                                                                table, block_size, poss, dev)
                key_prev = key
                fc.attn_metadata, fc.slot_mapping = cur_md, cur_slots
            prunes = [r for r in reqs if r.session is not None and r.session.prunes_after(i)]
            if prunes:
                self._capture[i] = {}
            hidden, residual = layer(flat_pos, hidden, residual)
            if self.kv != "reference":  # the rows each layer's cache was written with
                for r, seg in zip(reqs, segs):
                    if r.session is not None:
                        r.held[i] = torch.arange(seg.shape[0])
            if not prunes:
                continue
            slot = self._capture.pop(i)
            if "q" not in slot:
                raise Error(f"layer {i}: expected its attention to run (vLLM internals changed; "
                            f"docs/vllm.md), got no call")
            stream = hidden + residual
            segs = list(torch.split(stream, [s.shape[0] for s in segs]))
            qs = torch.split(slot["q"][:stream.shape[0]], [s.shape[0] for s in segs])
            ks = torch.split(slot["k"][:stream.shape[0]], [s.shape[0] for s in segs])
            for r in prunes:
                j = reqs.index(r)
                segs[j], poss[j] = self._prune(r, i, segs[j], qs[j], ks[j], call_no, dev)
            hidden, residual = torch.cat(segs), None
            key_prev = None  # the flat batch changed
        out, _ = (self.text.norm(hidden, residual) if residual is not None
                  else (self.text.norm(hidden), None))
        return self._unpack(out, reqs, T)

    def _prune(self, r, i, h, q_flat, k_flat, call_no, dev):
        attn = self.attn[i]
        s = r.session
        n = h.shape[0]
        H, Hkv, dh = attn.num_heads, attn.num_kv_heads, attn.head_size
        q_all = q_flat.reshape(n, H, dh).transpose(0, 1)
        k = k_flat.reshape(n, Hkv, dh).transpose(0, 1)
        raters_before = [int(x) for x in s.raters.tolist()]
        first = s.steps_done == 0
        visual = s.visual
        options = dict(s.config.schedule)[i]
        q = q_all.index_select(1, torch.as_tensor(raters_before, dtype=torch.long, device=dev))
        scale = float(attn.impl.scale)
        if self.tp == 1:
            plan = s.prune(i, h.detach().cpu(), q=q.detach().cpu().contiguous(),
                           k=k.detach().cpu().contiguous(), scale=scale)
        else:
            plan = self._prune_tp(r, i, h, q, k, scale, options, raters_before)
        if self.dump:
            if self.tp > 1:  # the case holds every head: gather them (a collective)
                q_all = self._gather_heads(q_all, self.heads)
                k = self._gather_heads(k, self.kv_heads)
            if self.tp_rank == 0:
                write_case(self.dump, call_no, r.index, i, h, None, q_all, k, scale,
                           raters_before, first, visual, options, plan, len(s.spans), r.embeds)
        if self.kv != "reference":
            self._compact(r, i, plan)
        new_h = apply_plan(plan, h)
        pos = torch.as_tensor(np.asarray(plan.positions), dtype=r.positions.dtype, device=dev)
        pos = pos.reshape(r.positions.shape[0], -1) if self.mrope else pos.reshape(-1)
        r.removed = r.state.prompt.numel() - new_h.shape[0]
        st = r.state
        nxt = int(pos.max()) + 1 if pos.numel() else 0
        for j in range(i + 1, self.n_layers):
            st.removed[j], st.base[j] = r.removed, nxt
        return new_h, pos

    def _prune_tp(self, r, i, h, q, k, scale, options, raters):
        """Tensor parallelism. One visual span, SparseVLM/v1.5 scoring: this rank's head
        sums (partial_relevance on its q/k heads), one all-reduce of [R, N] floats over
        vLLM's tensor-parallel group, the step finished from the sums on the replicated
        hidden states, and the session moved on with it (docs/tensor-parallel.md).
        Several spans or SparseVLM+ (per-head data): the rater rows of q and the keys
        are all-gathered and every rank runs the session's step on all heads. Either
        way the ranks' decisions are then compared (one all-gather of two integers): a
        difference raises rather than letting the ranks' sequences diverge."""
        from vllm.distributed import (tensor_model_parallel_all_gather,
                                      tensor_model_parallel_all_reduce)

        s = r.session
        held = [sp for sp in s.spans if sp[1] > 0]
        hc = h.detach().cpu()
        if len(held) == 1 and not options.top_heads and not options.gravity.enabled:
            p = partial_relevance(raters, held[0], q_local=q.detach().cpu().contiguous(),
                                  k_local=k.detach().cpu().contiguous(), scale=scale)
            p = tensor_model_parallel_all_reduce(p)
            step = prune_step_from_head_sums(p, self.heads, hc, held[0], raters, options)
            plan = s.commit(i, step)
        else:
            qa, ka = self._gather_heads(q, self.heads), self._gather_heads(k, self.kv_heads)
            plan = s.prune(i, hc, q=qa.cpu().contiguous(), k=ka.cpu().contiguous(), scale=scale)
        seq = torch.as_tensor(np.asarray(plan.sequence), dtype=torch.long)
        # float32 (vLLM's CPU all-gather takes no integers); both values below 2^24.
        check = int(((seq + 7) * torch.arange(1, seq.numel() + 1)).sum()) % 1000003
        mine = torch.tensor([[float(seq.numel()), float(check)]], dtype=torch.float32)
        every = tensor_model_parallel_all_gather(mine, dim=0)
        if not bool((every == mine).all()):
            raise Error(f"tensor parallelism: expected every rank to decide the same sequence at "
                        f"layer {i} (request {r.index}), got (length, checksum) {every.tolist()}")
        return plan

    def _gather_heads(self, x, total):
        """[H_local, n, dh] on each rank -> [total, n, dh] (KV heads replicated over
        ranks when total < tp: one copy of each)."""
        from vllm.distributed import tensor_model_parallel_all_gather

        g = tensor_model_parallel_all_gather(x.contiguous(), dim=0)
        if g.shape[0] != total:
            g = g[:: g.shape[0] // total][:total]
        return g

    def _compact(self, r, upto, plan):
        """kv="survivors" / "merged" (as sparsevlm.hf): the request's K/V rows in the
        caches of layers 0..upto compacted inside its pages by compact_paged_kv; those
        layers then decode against ``prompt - removed`` rows."""
        table = self._table[r.index]
        bs = self._block_size
        n_prompt = r.state.prompt.numel()
        for j in range(upto + 1):
            held = r.held[j]
            rec_idx = []
            if self.kv == "survivors":
                rows = torch.as_tensor(np.asarray(r.session.kv_rows(j)), dtype=torch.long)
                seq = torch.searchsorted(held, rows)
                if seq.numel() and (int(seq.max()) >= held.numel()
                                    or not torch.equal(held[seq], rows)):
                    miss = rows[~torch.isin(rows, held)].tolist()[:1] or ["(order)"]
                    raise Error(f"kv_rows({j}): expected rows that layer {j}'s cache holds "
                                f"({held.numel()} rows), got row {miss[0]} outside them "
                                f"(request {r.index})")
                r.held[j] = rows
            else:  # merged: every layer up to here holds this step's input rows
                seq = torch.as_tensor(np.asarray(plan.sequence), dtype=torch.long)
                rec_idx = [torch.as_tensor(c, dtype=torch.long) for c in plan.clusters]
                r.held[j] = torch.arange(seq.numel())
            k, v, layout = self.rewriter.kv_pages(self.attn[j])
            for cache in (k, v):
                pages = cache if layout == "HND" else cache.transpose(1, 2)  # [blocks, H, bs, dh]
                rec = None
                if rec_idx:  # a recycled token's K/V: its members' mean (read before moving)
                    rec = torch.stack([pages[table[m // bs], :, m % bs].float().mean(0)
                                       for m in rec_idx]).to(cache.dtype)
                compact_paged_kv(cache, table, seq, layout=layout, recycled=rec)
            r.state.removed[j] = n_prompt - int(seq.numel())

    def _rewrite(self, i, reqs, md0, base_md, base_slots, table, bs, poss, dev):
        """Layer i's metadata, slot mapping and position ids when some request's
        tokens or cache length differ from the step's."""
        qsl, seq, slots, pos = [0], [], [], []
        for r, p in zip(reqs, poss):
            if r.session is not None:  # a prefill (pruned or not yet)
                n = p.shape[-1]
                idx = torch.arange(n, device=dev)
                seq.append(n)
                pos.append(p)
            elif r.state is not None:  # a decode: its cache is `removed` rows shorter here
                rm = r.state.removed[i]
                idx = torch.tensor([r.seq - 1 - rm], device=dev)
                seq.append(r.seq - rm)
                pos.append(p - r.state.stock_base + r.state.base[i])
            else:
                idx = torch.arange(r.seq - r.n, r.seq, device=dev)
                seq.append(r.seq)
                pos.append(p)
            qsl.append(qsl[-1] + int(idx.numel()))
            blocks = table[r.index].to(dev).long().index_select(0, idx // bs)
            slots.append(blocks * bs + idx % bs)
        slot_t = torch.cat(slots)
        qsl0, seq0, _ = self.rewriter.batch(md0)
        qsl_t = torch.tensor(qsl, dtype=qsl0.dtype, device=qsl0.device)
        seq_t = torch.tensor(seq, dtype=seq0.dtype, device=seq0.device)
        md = dict(base_md)
        sl = dict(base_slots)
        done: dict = {}
        for j, name in enumerate(self.names):  # layers of one metadata object share one rewrite
            old = base_md[name]
            slot_n = slot_t.to(base_slots[name].dtype)
            if id(old) not in done:
                done[id(old)] = self.rewriter.rewrite(old, self.attn[j], qsl_t, seq_t, slot_n)
            md[name] = done[id(old)]
            sl[name] = slot_n
        return md, sl, torch.cat(pos, -1).to(torch.long)

    def _unpack(self, hidden, reqs, T):
        out = hidden.new_zeros(T, hidden.shape[-1])
        at = 0
        for r in reqs:
            s = r.session
            if s is None or s.steps_done == 0:
                m = r.n
                out[r.q0:r.q0 + m] = hidden[at:at + m]
            else:
                m = s.length
                origin = torch.as_tensor(np.asarray(s.origins), dtype=torch.long,
                                         device=hidden.device)
                live = torch.nonzero(origin >= 0).flatten()
                out.index_copy_(0, r.q0 + origin.index_select(0, live),
                                hidden[at:at + m].index_select(0, live))
                self.states[r.block] = r.state
            at += m
        return out


def _mixin(base):
    """vLLM's model class `base` with the SparseVLM forward."""

    class SparseVLM(base):
        requires_raw_input_tokens = True

        def __init__(self, *, vllm_config, prefix: str = ""):
            check_engine(vllm_config)  # before the weights load: refuse early
            super().__init__(vllm_config=vllm_config, prefix=prefix)
            self.sparsevlm = Runtime(self, vllm_config)

        def embed_input_ids(self, input_ids, multimodal_embeddings=None, *, is_multimodal=None,
                            **kwargs):
            self.sparsevlm.mm_mask = is_multimodal  # [tokens] bool: where images were merged
            return super().embed_input_ids(input_ids, multimodal_embeddings,
                                           is_multimodal=is_multimodal, **kwargs)

        def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None,
                    **kwargs):
            return self.sparsevlm.forward(input_ids, positions, intermediate_tensors,
                                          inputs_embeds, super().forward, **kwargs)

    SparseVLM.__name__ = SparseVLM.__qualname__ = f"SparseVLM{base.__name__}"
    return SparseVLM


def _classes():
    from vllm.model_executor.models.llava import LlavaForConditionalGeneration
    from vllm.model_executor.models.llava_next import LlavaNextForConditionalGeneration
    from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
    from vllm.model_executor.models.qwen2_vl import Qwen2VLForConditionalGeneration

    return {f"SparseVLM{c.__name__}": _mixin(c) for c in (
        LlavaForConditionalGeneration, LlavaNextForConditionalGeneration,
        Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration)}


globals().update(_classes())
