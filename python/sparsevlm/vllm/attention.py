"""Attention-metadata rewriters: one per vLLM attention backend (docs/vllm.md).

After a cut, the layers that follow see other query lengths, other cache lengths and
other slots than the step's metadata describes. A :class:`Rewriter` returns a new
metadata object for them from the step's (which all layers of a KV-cache group share,
so it is never mutated) and the new per-request counts.

- CPU_ATTN (:class:`CpuAttnRewriter`): tested (tests/vllm).
- :class:`BuilderRewriter`, for any backend: the step's ``CommonAttentionMetadata``
  with the new counts, rebuilt by the backend's own metadata builder. Tested on
  CPU_ATTN (``SPARSEVLM_VLLM_REWRITER=builder``); it serves FLASHINFER and
  TRITON_ATTN, whose builders plan work that a copied object could not redo, and
  which have not run (no GPU was available).
- FLASH_ATTN (:class:`FlashAttnRewriter`): written to vLLM 0.32's
  ``FlashAttentionMetadata``; it has not run.

Untested backends are refused unless ``SPARSEVLM_VLLM_UNTESTED=1``; any other backend
(FlexAttention, MLA, ...) is refused at start-up.
"""
from __future__ import annotations

import dataclasses
import functools
import os

from .. import Error


class Rewriter:
    """rewrite(md, layer, query_start_loc [R+1] int32, seq_lens [R] int32, slot_mapping
    [T'] int64) -> a new metadata object of md's type for `layer`'s group; md is not
    changed. The tensors are on md's devices.

    kv_pages(layer) -> (K, V, page layout): views of the layer's paged K and V caches in
    a layout of :func:`sparsevlm.compact_paged_kv` (the kv="survivors" / "merged"
    options compact them); raises :class:`Error` where the backend's layout is not known."""

    def rewrite(self, md, layer, query_start_loc, seq_lens, slot_mapping):
        raise NotImplementedError

    def kv_pages(self, layer):
        raise NotImplementedError

    def check_kv(self, layer):
        """Refuses at start-up a kv option kv_pages cannot serve (default: none)."""

    def batch(self, md):
        """(query_start_loc [R+1], seq_lens [R], block_table [R, pages]) of the step, on
        md's devices (default: md's own fields, as CPU_ATTN and FLASH_ATTN keep them)."""
        return md.query_start_loc, md.seq_lens, md.block_table


def _counts(query_start_loc, seq_lens):
    q = query_start_loc.cpu()
    lens = q[1:] - q[:-1]
    return int(q[-1]), int(lens.max()) if lens.numel() else 0, \
        int(seq_lens.max()) if seq_lens.numel() else 0


class CpuAttnRewriter(Rewriter):
    """CPU_ATTN (``v1/attention/backends/cpu_attn.py``): the counts, and the scheduler
    metadata rebuilt as its builder does (``ops.cpu_attn_get_scheduler_metadata``)."""

    def __init__(self, vllm_config):
        self.dtype = vllm_config.model_config.dtype
        self.config = vllm_config

    def check_kv(self, layer):
        """At start-up, for kv="survivors"/"merged": the ISA the builder will choose."""
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        cc = self.config.cache_config
        isa = _get_attn_isa(self.dtype, cc.block_size, layer.impl.head_size, cc.cache_dtype)
        if isa != "vec":
            raise Error(f"kv: expected CPU_ATTN's 'vec' kernels for kv='survivors'/'merged' (the "
                        f"page layout the plugin knows: x86, head_dim a multiple of 32, no AMX "
                        f"for bfloat16), got ISA {isa!r} for dtype {self.dtype}; use "
                        f"kv='reference'")

    def rewrite(self, md, layer, query_start_loc, seq_lens, slot_mapping):
        from vllm import _custom_ops as ops
        from vllm import envs

        for f in ("dynamic_causal", "encoder_cache"):
            if getattr(md, f) is not None:
                raise Error(f"attention metadata.{f}: expected None (CPU_ATTN's causal decoder "
                            f"path), got a tensor")
        if md.use_sdpa_prefill:
            raise Error("attention metadata.use_sdpa_prefill: expected False (CPU_ATTN's own "
                        "kernels), got True")
        impl = layer.impl
        tokens, max_q, max_s = _counts(query_start_loc, seq_lens)
        window = impl.sliding_window if impl.sliding_window is not None else -1
        sched = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=int(seq_lens.numel()), num_heads=impl.num_heads,
            num_kv_heads=impl.num_kv_heads, head_dim=impl.head_size, seq_lens=seq_lens,
            dtype=self.dtype, query_start_loc=query_start_loc, causal=md.causal,
            sliding_window_size=window, isa=layer.isa, enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
            dynamic_causal=None, kv_cache_dtype=impl.kv_cache_dtype)
        return dataclasses.replace(md, num_actual_tokens=tokens, max_query_len=max_q,
                                   query_start_loc=query_start_loc, max_seq_len=max_s,
                                   seq_lens=seq_lens, slot_mapping=slot_mapping,
                                   scheduler_metadata=sched)

    def kv_pages(self, layer):
        """CPU_ATTN's cache [blocks, Hkv, block_size, 2 dh] holds, per block and head, the
        block's K then its V, each block_size * dh values. How the kernel orders them
        depends on its ISA: "vec" (x86 without AMX for bfloat16, head_dim a multiple of
        32) writes V token-major [block_size, dh] and K dim-major [dh, block_size]
        (tests/vllm/test_plugin.py::test_cpu_page_layout checks it against vLLM's own
        writer). Other ISAs (amx, vec16, neon, ...) pack K differently: refused."""
        import torch

        isa = getattr(layer, "isa", None)
        if isa != "vec":
            raise Error(f"kv: expected CPU_ATTN's 'vec' kernels for kv='survivors'/'merged' "
                        f"(the page layout the plugin knows), got ISA {isa!r}; use "
                        f"kv='reference'")
        c = layer.kv_cache
        nb, hkv, bs, two = (int(x) for x in c.shape)
        dh = two // 2
        st = c.stride()
        off = c.storage_offset()
        # [blocks, Hkv, block_size, dh] views of the two halves of each (block, head).
        k = torch.as_strided(c, (nb, hkv, bs, dh), (st[0], st[1], 1, bs), off)
        v = torch.as_strided(c, (nb, hkv, bs, dh), (st[0], st[1], dh, 1), off + bs * dh)
        return k, v, "HND"


class FlashAttnRewriter(Rewriter):
    """FLASH_ATTN (``v1/attention/backends/flash_attn.py``), untested: the counts on
    the device; no cascade, no DCP, no ahead-of-time schedule (FlashAttention then
    schedules itself)."""

    def rewrite(self, md, layer, query_start_loc, seq_lens, slot_mapping):
        if getattr(md, "use_cascade", False):
            raise Error("attention metadata.use_cascade: expected False, got True")
        if getattr(md, "dcp_context_kv_lens", None) is not None:
            raise Error("attention metadata.dcp_context_kv_lens: expected None (no decode "
                        "context parallelism), got a tensor")
        tokens, max_q, max_s = _counts(query_start_loc, seq_lens)
        lens = (query_start_loc[1:] - query_start_loc[:-1]).cpu()
        decodes = int((lens == 1).sum())
        return dataclasses.replace(
            md, num_actual_tokens=tokens, max_query_len=max_q, query_start_loc=query_start_loc,
            max_seq_len=max_s, seq_lens=seq_lens, slot_mapping=slot_mapping,
            scheduler_metadata=None, max_num_splits=0, num_decode_reqs=decodes,
            num_prefill_reqs=int(lens.numel()) - decodes, num_decode_tokens=decodes,
            num_prefill_tokens=tokens - decodes)

    def kv_pages(self, layer):
        """FlashAttention's cache in vLLM 0.32 is [blocks, Hkv, block_size, 2 dh] (its
        forward splits the last axis at dh): K and V as HND views."""
        c = layer.kv_cache
        dh = int(c.shape[-1]) // 2
        return c[..., :dh], c[..., dh:], "HND"


_SOURCE = "_sparsevlm_source"


def install_capture() -> None:
    """Makes every metadata object vLLM builds remember what it was built from.

    Wraps ``vllm.v1.worker.utils.AttentionGroup.build_metadata`` (the one call through
    which vLLM 0.32's runner builds each KV-cache group's metadata for a step) so that
    the object it returns carries ``(group, CommonAttentionMetadata, ubatch index)``.
    The wrapper calls the original unchanged and only adds that attribute; installed
    once per process, by the model when the builder rewriter is chosen."""
    from vllm.v1.worker.utils import AttentionGroup

    orig = AttentionGroup.build_metadata
    if getattr(orig, "_sparsevlm_capture", False):
        return

    @functools.wraps(orig)
    def build_metadata(self, common_attn_metadata, ubatch_idx=0, common_prefix_len=0,
                       **kwargs):
        md = orig(self, common_attn_metadata, ubatch_idx, common_prefix_len, **kwargs)
        try:
            object.__setattr__(md, _SOURCE, (self, common_attn_metadata, ubatch_idx))
        except (AttributeError, TypeError):  # a slotted or frozen type: rewrite refuses it
            pass
        return md

    build_metadata._sparsevlm_capture = True
    AttentionGroup.build_metadata = build_metadata


class BuilderRewriter(Rewriter):
    """Any backend: the step's ``CommonAttentionMetadata`` (captured by
    :func:`install_capture`) with the new query starts, sequence lengths and slots,
    built again by the same group's builder, so the backend plans the rewritten batch
    itself (FlashInfer's wrappers, FlashAttention's schedule, CPU_ATTN's scheduler
    metadata). Builders keep per-step state (FlashInfer re-plans its wrappers in
    place): a rewritten object is valid until the next rewrite or step, which is how
    the decoder loop uses it (layers in order; the step's own object is only used by
    layers before the first rewrite). The page layout of every vLLM 0.32 backend
    without a quantised cache: [blocks, Hkv, block_size, 2 dh] with K and V the
    halves of the last axis (CPU_ATTN's own packing excepted, see kv_pages)."""

    _REFUSED = ("dcp_local_seq_lens", "encoder_seq_lens", "mm_req_doc_ranges",
                "rswa_prefix_lens", "replayssm_decode_base_cpu")

    def __init__(self, vllm_config=None, backend: str = ""):
        self.backend = backend
        self.cpu = CpuAttnRewriter(vllm_config) if backend == "CPU_ATTN" else None
        install_capture()

    def _source(self, md):
        src = getattr(md, _SOURCE, None)
        if src is None:
            raise Error(f"attention metadata ({type(md).__name__}): expected one built through "
                        f"AttentionGroup.build_metadata (vLLM 0.32's runner; docs/vllm.md, "
                        f"internals relied on), got one without its CommonAttentionMetadata")
        return src

    def batch(self, md):
        _, c, _ = self._source(md)
        return c.query_start_loc, c.seq_lens, c.block_table_tensor

    def check_kv(self, layer):
        if self.cpu is not None:
            self.cpu.check_kv(layer)

    def rewrite(self, md, layer, query_start_loc, seq_lens, slot_mapping):
        group, c, ubatch = self._source(md)
        if getattr(group, "kernel_block_size", None) is not None:
            raise Error(f"attention group {group.layer_names[0]}: expected the KV block size "
                        f"as the kernel's (no kernel block table), got kernel block size "
                        f"{group.kernel_block_size}")
        for f in self._REFUSED:
            if getattr(c, f, None) is not None:
                raise Error(f"CommonAttentionMetadata.{f}: expected None (a causal decoder "
                            f"without context parallelism, cross-attention, PrefixLM ranges "
                            f"or R-SWA), got a value")
        q_cpu = query_start_loc.detach().to("cpu", c.query_start_loc_cpu.dtype)
        s_cpu = seq_lens.detach().to("cpu")
        lens = q_cpu[1:] - q_cpu[:-1]
        new = dataclasses.replace(
            c,
            query_start_loc=query_start_loc.to(c.query_start_loc.device,
                                               c.query_start_loc.dtype),
            query_start_loc_cpu=q_cpu,
            seq_lens=seq_lens.to(c.seq_lens.device, c.seq_lens.dtype),
            num_reqs=int(seq_lens.numel()),
            num_actual_tokens=int(q_cpu[-1]),
            max_query_len=int(lens.max()) if lens.numel() else 0,
            max_seq_len=int(s_cpu.max()) if s_cpu.numel() else 0,
            slot_mapping=slot_mapping.to(c.slot_mapping.device, c.slot_mapping.dtype),
            seq_lens_cpu_upper_bound=(s_cpu.to(c.seq_lens_cpu_upper_bound.dtype)
                                      if c.seq_lens_cpu_upper_bound is not None else None),
            positions=None, logits_indices_padded=None, num_logits_indices=None,
            max_logits_per_req=None, _num_computed_tokens_cache=None,
            _token_to_req_indices_cache=None)
        return group.build_metadata(new, ubatch, 0)

    def kv_pages(self, layer):
        if self.cpu is not None:
            return self.cpu.kv_pages(layer)
        c = layer.kv_cache
        dh = int(c.shape[-1]) // 2
        return c[..., :dh], c[..., dh:], "HND"


REWRITERS = {"CPU_ATTN": CpuAttnRewriter, "FLASH_ATTN": FlashAttnRewriter,
             "FLASHINFER": BuilderRewriter, "TRITON_ATTN": BuilderRewriter}
TESTED = ("CPU_ATTN",)


def rewriter_for(layer, vllm_config) -> Rewriter:
    """The rewriter for `layer`'s backend; refuses a backend without a tested one
    (an untested one with ``SPARSEVLM_VLLM_UNTESTED=1``), naming it.
    ``SPARSEVLM_VLLM_REWRITER=builder`` chooses :class:`BuilderRewriter` for any
    backend that is allowed (on CPU_ATTN: to test it)."""
    name = layer.attn_backend.get_name()
    untested = os.environ.get("SPARSEVLM_VLLM_UNTESTED") == "1"
    choice = os.environ.get("SPARSEVLM_VLLM_REWRITER", "")
    if choice not in ("", "builder"):
        raise Error(f"SPARSEVLM_VLLM_REWRITER: expected unset or 'builder', got {choice!r}")
    if name not in REWRITERS or (name not in TESTED and not untested):
        raise Error(f"attention backend: expected one of {list(TESTED)} (the backends whose "
                    f"metadata the plugin rewrites and tests"
                    + (f"; {[n for n in REWRITERS if n not in TESTED]} are written but untested, "
                       f"SPARSEVLM_VLLM_UNTESTED=1 allows them" if name in REWRITERS else "")
                    + f"), got {name}")
    cls = BuilderRewriter if choice == "builder" else REWRITERS[name]
    if cls is BuilderRewriter:
        return BuilderRewriter(vllm_config, name)
    return cls(vllm_config) if cls is CpuAttnRewriter else cls()


__all__ = ["Rewriter", "CpuAttnRewriter", "FlashAttnRewriter", "BuilderRewriter", "REWRITERS",
           "TESTED", "install_capture", "rewriter_for"]
