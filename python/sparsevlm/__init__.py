"""SparseVLM visual-token sparsification (arXiv 2410.04417) for Python engines.

The same C++ core as the header-only library (``include/sparsevlm``), over the
arrays an engine already has: anything that speaks DLPack (NumPy, PyTorch, CuPy,
JAX) in float32, float16 or bfloat16, with any strides, read in place (no
copy). Every computation releases the GIL. Results come back in the caller's
framework: NumPy arrays for NumPy input, ``torch`` tensors on the input's
device for PyTorch input. Errors raise :class:`Error` (a ``ValueError``) with
"argument: expected X, got Y". See docs/python.md.

Shapes: ``L`` sequence length, ``H`` heads, ``d`` hidden size, ``N`` visual
tokens, ``R`` raters, ``c`` recycled clusters, ``dh`` head size.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Tuple, Union

import numpy as np

from . import _sparsevlm as _ext
from ._sparsevlm import (
    Error,
    has_cuda,
    KeepPolicy,
    Layout,
    RecycleOptions,
    RopeGravity,
    SessionConfig,
    StepOptions,
    isa,
    model_names,
    preset_config,
    preset_config_for,
    derive_config,
    preset_names,
)

__version__: str = _ext.__version__

__all__ = [
    "Error", "KeepPolicy", "RecycleOptions", "RopeGravity", "StepOptions", "SessionConfig",
    "Layout", "StepResult", "LayerPlan", "PrefillSession", "prune_step", "select_raters",
    "apply_plan", "compact_paged_kv", "run_case", "load_case", "preset_config", "preset_config_for", "derive_config",
    "preset_names", "model_names", "isa", "has_cuda", "build_info", "partial_relevance",
    "prune_step_from_head_sums", "show",
]

Array = Any  # any DLPack-capable array (numpy.ndarray, torch.Tensor, ...)
Span = Tuple[int, int]  # (start, len) of a visual span


def build_info() -> dict:
    """How this installed module was compiled, for build checks.

    Returns ``units``: for each translation unit ("module": the bindings and the
    scalar kernels; "avx2", "avx512": the SIMD kernel tables; "cuda": the CUDA
    path's host code when built), whether the compiler optimised it
    (``optimize``: GCC/Clang's ``__OPTIMIZE__``) and whether for size
    (``optimize_size``: ``__OPTIMIZE_SIZE__``, -Os/-Oz, which makes the kernels
    about 3x slower); ``isa_compiled`` / ``isa_supported`` / ``isa_active``: the
    kernel tables in the module, those this CPU runs, the one in use;
    ``compiler``; ``cuda``. tests/python/test_package.py asserts that no unit was
    built for size.
    """
    return _ext.build_info()


def _is_torch(x: Any) -> bool:
    return type(x).__module__.split(".")[0] == "torch"


def _arg(x: Optional[Array], name: str, cuda: bool = False) -> Optional[Array]:
    """An array as the extension reads it (None stays None). CUDA tensors only
    where ``cuda`` (prune_step) and the build has the CUDA path."""
    if x is None:
        return None
    if _is_torch(x):
        if x.device.type != "cpu" and not (cuda and _ext.has_cuda()):
            why = ("this function runs on the CPU" if _ext.has_cuda() else
                   "this build of sparsevlm has no CUDA backend; see docs/python.md")
            raise Error(f"{name}: expected a CPU tensor ({why}), got device {x.device}")
        return x.detach()  # DLPack refuses tensors that require grad
    if isinstance(x, np.ndarray) or hasattr(x, "__dlpack__"):
        return x
    return np.asarray(x)


def _stream_of(x: Any) -> int:
    """The caller's current CUDA stream for a device array (0: the default stream)."""
    if _is_torch(x) and x.device.type == "cuda":
        import torch

        return int(torch.cuda.current_stream(x.device).cuda_stream)
    if type(x).__module__.split(".")[0] == "cupy":
        import cupy

        with x.device:  # the current stream of the array's device
            return int(cupy.cuda.get_current_stream().ptr)
    return 0


def _span(v: Sequence[int], name: str = "visual") -> Span:
    try:
        s, n = v
        return int(s), int(n)
    except (TypeError, ValueError):
        raise Error(f"{name}: expected a (start, len) pair, got {v!r}") from None


def _ints(v: Optional[Sequence[int]], name: str) -> Optional[list]:
    if v is None:
        return None
    a = np.asarray(v.cpu() if _is_torch(v) else v)
    if a.ndim != 1 or (a.size and not np.issubdtype(a.dtype, np.integer)):
        raise Error(f"{name}: expected a 1-D sequence of integers, got {a.dtype} of shape {a.shape}")
    return [int(i) for i in a]


class _Like:
    """Converts the extension's NumPy outputs to the framework and device of `ref`."""

    def __init__(self, ref: Any):
        self.device = ref.device if _is_torch(ref) else None
        if self.device is not None:
            import torch

            self._from_numpy = torch.from_numpy
            self._cpu = self.device.type == "cpu"

    def __call__(self, a: np.ndarray) -> Array:
        if self.device is None:
            return a
        t = self._from_numpy(a)  # shares the array's memory: no copy on the CPU
        return t if self._cpu else t.to(self.device)


@dataclass(frozen=True)
class StepResult:
    """What one pruning step decided (the spec's result, plus the scores).

    raters: [R] int64 absolute positions, ascending. scores: [N] float32, one per
    visual token. rank: numerical rank of the [R, N] relevance matrix. keep_count
    and keep: [keep_count] int64 absolute positions, ascending. clusters: each
    recycled cluster's members (absolute positions, ascending), clusters in
    descending order of their centre's rho*delta. merged: [c, d] float32, row i
    the mean of cluster i's hidden rows. sequence: the new sequence as source
    positions, -(i+1) standing for merged row i.
    """

    raters: Array
    scores: Array
    rank: int
    keep_count: int
    keep: Array
    clusters: list
    merged: Array
    sequence: Array


@dataclass(frozen=True)
class LayerPlan(StepResult):
    """What one pruning layer of a session decided, and the state after it.

    layer: the decoder layer whose output was pruned. kv_sequence: `sequence`
    without recycled entries, the rows to keep in the K/V caches written with this
    layer's tokens. length: tokens after the step. spans / visual: the new visual
    spans as (start, len). parts: per span of the layout, its keep decisions.
    positions: [rows, length] int64 position ids of the layers after this one.
    """

    layer: int = -1
    kv_sequence: Array = None
    length: int = 0
    spans: list = None
    visual: Span = (0, 0)
    parts: list = None
    positions: Array = None


_STEP_KEYS = ("raters", "scores", "rank", "keep_count", "keep", "clusters", "merged", "sequence")
_ARRAY_KEYS = ("raters", "scores", "keep", "merged", "sequence", "kv_sequence", "positions")


def _result(d: dict, like: _Like, cls=StepResult):
    return cls(**{k: (like(v) if k in _ARRAY_KEYS else v) for k, v in d.items()})


def _source(attn, q, k, lse, scale, cuda=False):
    return _ext._Source(attn=_arg(attn, "attn", cuda), q=_arg(q, "q", cuda), k=_arg(k, "k", cuda),
                        lse=_arg(lse, "lse", cuda), scale=float(scale))


def select_raters(embeds: Array, visual: Sequence[int]) -> Array:
    """The text raters of a sequence (spec step 1).

    embeds: [L, d_e] input embeddings (float32/float16/bfloat16); visual: (S, N).
    Returns [R] int64 absolute positions, ascending (possibly empty). Cost
    O(N*T*d_e), T = L - S - N text tokens.
    """
    return _Like(embeds)(_ext.select_raters(_arg(embeds, "embeds"), _span(visual)))


def prune_step(hidden: Array, visual: Sequence[int], *, attn: Optional[Array] = None,
               q: Optional[Array] = None, k: Optional[Array] = None,
               lse: Optional[Array] = None, scale: float = 0.0,
               embeds: Optional[Array] = None, raters: Optional[Sequence[int]] = None,
               options: Optional[StepOptions] = None) -> StepResult:
    """One SparseVLM pruning step of one sequence (spec steps 1-8).

    hidden: [L, d] the pruning layer's output. visual: (S, N), the visual tokens
    are positions [S, S+N). Scores come from either ``attn`` [H, L, L] (attention
    probabilities, row = query) or ``q`` [H, L or R, dh] and ``k`` [Hkv, L, dh]
    after RoPE (fused-attention engines; optional ``lse`` [H, L or R] float32,
    ``scale`` 0 means 1/sqrt(dh)). Raters from ``embeds`` [L, d_e], or given as
    ``raters`` (absolute positions in the text, ascending). The step decides; it
    does not move your tensors: ``apply_plan(result, hidden)`` compacts them.

    Cost: O(N*T*d_e) raters + O(H*R*N) scores (O(H*R*L*dh) from q/k) + O(s^2*d)
    recycling. Deterministic: the same decisions on every CPU instruction set.

    CUDA arrays (when ``has_cuda()``: a build with SPARSEVLM_CUDA=ON) run on the
    GPU through the CUDA specialization, on the caller's current stream (torch,
    CuPy), all arrays of one dtype on one device; the call waits for the result.
    """
    like = _Like(hidden)
    d = _ext.prune_step(_arg(hidden, "hidden", True), _span(visual),
                        _source(attn, q, k, lse, scale, True),
                        embeds=_arg(embeds, "embeds", True), raters=_ints(raters, "raters"),
                        options=options if options is not None else StepOptions(),
                        stream=_stream_of(hidden))
    return _result(d, like)


def apply_plan(plan: Union[StepResult, Array], hidden: Array,
               merged: Optional[Array] = None) -> Array:
    """The compacted hidden states: ``hidden`` [L, d] gathered along ``plan.sequence``.

    Entry p >= 0 takes row p of hidden, entry -(i+1) row i of ``merged`` (default
    ``plan.merged``, cast to hidden's dtype). ``plan`` is a StepResult/LayerPlan
    or a sequence array (then pass ``merged`` when it has negative entries).
    Returns [len(sequence), d] in hidden's framework, dtype and device (NumPy or
    torch, CUDA tensors included). Cost O(len(sequence)*d).
    """
    if isinstance(plan, StepResult):
        seq, m = plan.sequence, (plan.merged if merged is None else merged)
    else:
        seq, m = plan, merged
    s = np.asarray(seq.cpu() if _is_torch(seq) else seq)
    if s.ndim != 1 or (s.size and not np.issubdtype(s.dtype, np.integer)):
        raise Error(f"sequence: expected 1-D integers, got {s.dtype} of shape {s.shape}")
    s = np.ascontiguousarray(s, dtype=np.int64)
    if _is_torch(hidden) and hidden.device.type != "cpu":
        return _apply_plan_device(s, hidden, m)
    if getattr(hidden, "ndim", None) != 2:
        raise Error(f"hidden: expected a 2-D [L, d] array, got {getattr(hidden, 'ndim', type(hidden))} dims")
    n, d = int(s.shape[0]), int(hidden.shape[1])
    if _is_torch(hidden):
        import torch

        h = hidden.detach()
        out = torch.empty((n, d), dtype=h.dtype)
    else:
        h = np.asarray(hidden)
        out = np.empty((n, d), dtype=h.dtype)
    # plan.hpp's apply_plan: its checks and messages, GIL released, no copy of hidden.
    _ext.apply_plan(s, _arg(h, "hidden"), _arg(m, "merged"), out)
    return out


def _apply_plan_device(s: np.ndarray, hidden: Array, m: Optional[Array]) -> Array:
    """apply_plan on a device tensor: the same gather by torch on its device (the
    C++ gather reads host memory), after the checks plan.hpp makes."""
    import torch

    if hidden.ndim != 2:
        raise Error(f"hidden: expected a 2-D [L, d] array, got {hidden.ndim} dims")
    L, d = int(hidden.shape[0]), int(hidden.shape[1])
    c = 0 if m is None or int(m.shape[0]) == 0 else int(m.shape[0])
    if c > 0 and m.ndim != 2:
        raise Error(f"merged: expected a 2-D [c, {d}] array, got {m.ndim} dims")
    _ext.check_apply_plan(s, L, d, c, int(m.shape[1]) if c > 0 else d)  # plan.hpp's rules
    idx = np.where(s >= 0, s, L - 1 - s)  # -(i+1) -> row L+i of [hidden; merged]
    src = hidden.detach()
    if c > 0:
        mt = m if _is_torch(m) else torch.from_numpy(np.ascontiguousarray(m))
        src = torch.cat([src, mt.to(device=hidden.device, dtype=hidden.dtype)])
    return src.index_select(0, torch.from_numpy(idx).to(hidden.device))


PAGE_LAYOUTS = ("NHD", "HND")
"""compact_paged_kv's page layouts: "NHD" [blocks, block_size, heads, head_dim] (vLLM's
FlashAttention, FlashInfer's NHD), "HND" [blocks, heads, block_size, head_dim] (vLLM's
CPU backend, FlashInfer's HND)."""


def compact_paged_kv(cache: Array, block_table: Array, sequence: Union[StepResult, Array],
                     layout: str = "NHD", recycled: Optional[Array] = None) -> int:
    """Moves one request's rows to the front of its pages, in place (kv_cache.hpp).

    The request's logical token t lives in page ``block_table[t // block_size]`` at
    slot ``t % block_size``; afterwards its first ``len(sequence)`` tokens hold the
    new sequence: token i = old token ``sequence[i]``, or ``recycled[-sequence[i]-1]``
    for a negative entry. The pages and the table stay as they are; what is past the
    new length is untouched.

    cache: one layer's K (or V) pages, 4-D per ``layout`` (:data:`PAGE_LAYOUTS`), any
    strides, float32/float16/bfloat16, NumPy or torch (CPU; CUDA: cuda/kv_cache.cuh's
    kernels on the tensor's current stream where ``has_cuda()``, else the same moves by
    torch on the device after the same checks). vLLM's CPU cache [blocks, heads,
    block_size, 2*head_dim] holds, per block and head, the block's K then its V; under
    its "vec" kernels V is token-major and K dim-major, so both are "HND" strided views
    (``sparsevlm.vllm.attention.CpuAttnRewriter.kv_pages``). vLLM's FlashAttention cache
    of the same shape gives K as ``cache[..., :head_dim]`` and V as
    ``cache[..., head_dim:]``, layout "HND". block_table: the request's page ids
    (any integer dtype). sequence: a plan (``plan.sequence``) or indices; every source
    entry p at index i must have p >= i (make_sequence's order; ``kv_sequence`` for a
    cache written before the step). recycled: [c, heads, head_dim] rows for negative
    entries (e.g. cluster means of K), or None.

    Returns the new token count. Raises :class:`Error` naming the argument (a source
    below its index or out of range, a table too short, a page id outside the cache,
    a shape that does not match); the cache is then unchanged. Cost O(len(sequence) *
    heads * head_dim), no allocation on the CPU path.
    """
    seq = sequence.sequence if isinstance(sequence, StepResult) else sequence
    s = _int64s(seq, "sequence")
    t = _int64s(block_table, "block_table")
    if layout not in PAGE_LAYOUTS:
        raise Error(f"layout: expected one of {list(PAGE_LAYOUTS)}, got {layout!r}")
    if getattr(cache, "ndim", None) != 4:
        raise Error(f"cache: expected a 4-D paged cache ({layout}), got "
                    f"{getattr(cache, 'ndim', type(cache).__name__)} dims")
    if _is_torch(cache) and cache.device.type == "cuda" and _ext.has_cuda():
        # cuda/kv_cache.cuh's kernels, on the caller's stream (the call returns when
        # the rows have moved).
        if recycled is not None:
            import torch

            rec = recycled if _is_torch(recycled) else torch.from_numpy(np.asarray(recycled))
            recycled = rec.to(cache.device)
        return int(_ext.compact_paged_kv(s, cache.detach(), layout == "HND", t,
                                         _arg(recycled, "recycled", True), _stream_of(cache)))
    if _is_torch(cache) and cache.device.type != "cpu":
        return _compact_paged_device(cache, t, s, layout, recycled)
    return int(_ext.compact_paged_kv(s, _arg(cache, "cache"), layout == "HND", t,
                                     _arg(recycled, "recycled")))


def _int64s(x: Any, name: str) -> np.ndarray:
    a = np.asarray(x.cpu() if _is_torch(x) else x)
    if a.ndim != 1 or (a.size and not np.issubdtype(a.dtype, np.integer)):
        raise Error(f"{name}: expected 1-D integers, got {a.dtype} of shape {a.shape}")
    return np.ascontiguousarray(a, dtype=np.int64)


def _compact_paged_device(cache, table: np.ndarray, s: np.ndarray, layout: str,
                          recycled) -> int:
    """compact_paged_kv on a device tensor: kv_cache.hpp's checks, then one gather of
    the rows read and one scatter of the rows written, by torch on the device (all
    reads happen before any write, so no ordering is needed)."""
    import torch

    kv = cache if layout == "NHD" else cache.transpose(1, 2)  # [blocks, bs, heads, dim]
    blocks, bs, heads, dim = (int(x) for x in kv.shape)
    rshape = [] if recycled is None else [int(x) for x in recycled.shape]
    # kv_cache.hpp's rules (the recycled rows' shape, each entry, the table's coverage
    # and page ids), checked by the C++ code itself before torch moves anything.
    _ext.check_compact_paged(s, table, blocks, bs, heads, dim, rshape)
    c = rshape[0] if rshape else 0
    n = int(s.size)
    if n == 0:
        return 0
    dev = cache.device
    tab = torch.from_numpy(table).to(dev)
    src = torch.from_numpy(np.maximum(s, 0)).to(dev)
    rows = kv[tab[src // bs], src % bs]  # [n, heads, dim], a copy
    if c:
        neg = torch.from_numpy(s < 0).to(dev)
        rec = recycled if _is_torch(recycled) else torch.from_numpy(np.ascontiguousarray(recycled))
        rec = rec.to(device=dev, dtype=cache.dtype)
        rows[neg] = rec[torch.from_numpy(-s[s < 0] - 1).to(dev)]
    dst = torch.arange(n, device=dev)
    kv[tab[dst // bs], dst % bs] = rows
    return n


class PrefillSession:
    """SparseVLM over every pruning layer of one sequence's prefill.

    layout: a :class:`Layout` (``Layout.from_counts(prefix, visual, text)``, or
    several visual spans). config: a :class:`SessionConfig` (``preset_config``).
    Raters from ``embeds`` [length, d_e] (chosen once, as the paper does), or
    given as ``raters``. positions: optional [rows, length] int64 input position
    ids (1 row for 1-D RoPE, 3 for mRoPE); default 0..length-1.

    Run the decoder; after layer ``l`` with ``prunes_after(l)``, call
    :meth:`prune` with that layer's attention (or q/k) and output hidden states,
    compact the hidden states with :func:`apply_plan` and the K/V caches with
    ``kv_rows``/``plan.kv_sequence``, and continue with ``plan.positions``. A
    failed call leaves the session unchanged. One thread at a time per session
    (calls are serialised).

    CUDA tensors (a build with the CUDA path, ``has_cuda()``): :meth:`prune` runs
    the step on the GPU through :func:`prune_step` and moves on with
    :meth:`commit`, so the hidden states and q/k never reach the host (one visual
    span with tokens; no RoPE gravity). A step decided elsewhere (tensor
    parallelism) goes through :meth:`commit` too.
    """

    def __init__(self, layout: Layout, config: SessionConfig, *, embeds: Optional[Array] = None,
                 raters: Optional[Sequence[int]] = None, positions: Optional[Array] = None):
        ref = embeds if embeds is not None else positions
        self._like = _Like(ref) if ref is not None else _Like(None)
        self._s = _ext._Session(layout, config, embeds=_arg(embeds, "embeds"),
                                raters=_ints(raters, "raters"),
                                positions=_arg(positions, "positions"))

    def prune(self, layer: int, hidden: Array, *, attn: Optional[Array] = None,
              q: Optional[Array] = None, k: Optional[Array] = None, lse: Optional[Array] = None,
              scale: float = 0.0) -> LayerPlan:
        """Prunes the output of decoder layer ``layer`` (the next pruning layer).

        hidden: [n, d], n = ``length``; attn: [H, n, n], or q [H, n or R, dh] and
        k [Hkv, n, dh] (+ lse). Returns the :class:`LayerPlan`; the session moves
        to the new sequence. Outputs follow hidden's framework and device.
        """
        if _is_torch(hidden) and hidden.device.type == "cuda" and _ext.has_cuda():
            return self._prune_on_device(int(layer), hidden, attn, q, k, lse, scale)
        like = _Like(hidden)
        d = self._s.prune(int(layer), _arg(hidden, "hidden"), _source(attn, q, k, lse, scale))
        self._like = like  # only once the step succeeded: a failed call changes nothing
        return _result(d, like, LayerPlan)

    def _prune_on_device(self, layer, hidden, attn, q, k, lse, scale) -> LayerPlan:
        """CUDA tensors: the step runs on the GPU (prune_step's CUDA path, on the
        caller's stream) with the session's raters and the layer's options, and
        :meth:`commit` moves the session on: only the decisions reach the host."""
        held = [s for s in self.spans if s[1] > 0]
        if len(held) != 1:
            raise Error(f"hidden: expected CPU tensors for a step over {len(held)} spans (the CUDA "
                        f"step takes one span), got device {hidden.device}")
        options = dict(self.config.schedule).get(layer)
        if options is None or not self.prunes_after(layer):
            raise Error(f"layer: expected {self.next_layer} (the next pruning layer), got {layer}")
        if options.gravity.enabled or options.top_heads:
            raise Error(f"hidden: expected CPU tensors for SparseVLM+'s head selection and RoPE "
                        f"gravity (not on the CUDA step), got device {hidden.device}")
        step = prune_step(hidden, held[0], attn=attn, q=q, k=k, lse=lse, scale=scale,
                          raters=self.raters, options=options)
        return self.commit(layer, step)

    def commit(self, layer: int, step: StepResult) -> LayerPlan:
        """Moves the session past pruning layer ``layer`` with a step decided
        elsewhere: :func:`prune_step` on CUDA tensors, or
        :func:`prune_step_from_head_sums` (tensor parallelism), run on the one span
        that holds tokens (``visual``) with ``raters=session.raters`` and the
        layer's options. Checks that the step is one of that span with these
        raters, then returns what :meth:`prune` returns (its scores and merged rows
        are the step's, as given). Errors name the field (``step.sequence``,
        ``step.raters``, ``spans``, ...); the session is then unchanged."""
        held = [s for s in self.spans if s[1] > 0]
        c, n = len(step.clusters), (held[0][1] if len(held) == 1 else int(step.scores.shape[0]))
        m_rows = int(step.merged.shape[0]) if getattr(step.merged, "ndim", 0) == 2 else -1
        if m_rows != c:
            raise Error(f"step.merged: expected [{c}, d] (one row per cluster), got shape "
                        f"{tuple(getattr(step.merged, 'shape', ()))}")
        if tuple(step.scores.shape) != (n,):
            raise Error(f"step.scores: expected [{n}] (the span's visual tokens), got shape "
                        f"{tuple(step.scores.shape)}")
        like = _Like(step.sequence)
        d = self._s.commit(int(layer), _ints(step.raters, "step.raters"), int(step.rank),
                           int(step.keep_count), _ints(step.keep, "step.keep"),
                           [_ints(c, "step.clusters") for c in step.clusters],
                           _ints(step.sequence, "step.sequence"))
        d.pop("scores")
        d.pop("merged")
        self._like = like
        out = {k: (like(v) if k in _ARRAY_KEYS else v) for k, v in d.items()}
        return LayerPlan(scores=step.scores, merged=step.merged, **out)

    def prunes_after(self, layer: int) -> bool:
        """True when ``layer`` is the next pruning layer of the schedule."""
        return self._s.prunes_after(int(layer))

    def kv_rows(self, layer: int) -> Array:
        """[rows] int64: the rows the K/V cache of ``layer``, kept whole since it was
        written, keeps to hold the current tokens less the recycled ones."""
        return self._like(self._s.kv_rows(int(layer)))

    def next_position(self) -> int:
        """Position id of the first generated token in the layers after the last
        pruning layer done (docs/integration.md, "Decode positions")."""
        return self._s.next_position()

    @property
    def length(self) -> int:
        """Tokens the next layer runs on."""
        return self._s.length

    @property
    def positions(self) -> Array:
        """[rows, length] int64 current position ids."""
        return self._like(self._s.positions)

    @property
    def raters(self) -> Array:
        """[R] int64 the raters at their current positions."""
        return self._like(self._s.raters)

    @property
    def origins(self) -> Array:
        """[length] int64 original position of each current token; -1 when recycled."""
        return self._like(self._s.origins)

    @property
    def visual(self) -> Span:
        return self._s.visual

    @property
    def spans(self) -> list:
        return self._s.spans

    @property
    def visual_tokens(self) -> int:
        return self._s.visual_tokens

    @property
    def next_layer(self) -> Optional[int]:
        return self._s.next_layer

    @property
    def steps_done(self) -> int:
        return self._s.steps_done

    @property
    def finished(self) -> bool:
        return self._s.finished

    @property
    def config(self) -> SessionConfig:
        return self._s.config


def run_case(case_dir: Union[str, os.PathLike], scores_from: str = "attn") -> dict:
    """Runs a case folder (../shared/spec/case-format.md) and returns the spec's
    result: raters, rank, keep_count, keep, clusters, sequence as in result.json,
    and ``merged`` as a [c, d] float32 NumPy array (absent when nothing is
    recycled). ``scores_from="qk"`` scores from the case's q.npy/k.npy."""
    return _ext.run_case(os.fspath(case_dir), scores_from)


def partial_relevance(raters: Sequence[int], visual: Sequence[int], *,
                      attn_local: Optional[Array] = None, q_local: Optional[Array] = None,
                      k_local: Optional[Array] = None, lse_local: Optional[Array] = None,
                      scale: float = 0.0) -> Array:
    """Tensor parallelism: this rank's [R, N] float32 head SUMS of the relevance matrix.

    A tensor-parallel rank holds H_local of the H heads: ``attn_local``
    [H_local, L, L], or ``q_local`` [H_local, L or R, dh] and ``k_local``
    [Hkv_local, L, dh] (+ ``lse_local``). Returns sum over its heads of
    attn[h][raters[r]][S + j], heads in order. Sum the ranks' outputs (one
    all-reduce of R*N floats) and finish with :func:`prune_step_from_head_sums`.
    With one rank holding every head the step is bit-identical to prune_step;
    with several, the all-reduce adds in another order (decisions are the same
    unless a value is within float32 rounding of a boundary). docs/tensor-parallel.md.
    Cost O(H_local*R*N) reads (O(H_local*R*L*dh) from q/k).
    """
    ref = attn_local if attn_local is not None else q_local
    src = _ext._Source(attn=_arg(attn_local, "attn_local"), q=_arg(q_local, "q_local"),
                       k=_arg(k_local, "k_local"), lse=_arg(lse_local, "lse_local"),
                       scale=float(scale))
    return _Like(ref)(_ext.partial_relevance(src, _ints(raters, "raters"), _span(visual)))


def prune_step_from_head_sums(p_sum: Array, heads: int, hidden: Array, visual: Sequence[int],
                              raters: Sequence[int],
                              options: Optional[StepOptions] = None) -> StepResult:
    """Finishes a step from the all-reduced head sums (tensor parallelism).

    p_sum: [R, N] float32, the sum over all ``heads`` heads (every rank's
    :func:`partial_relevance`, all-reduced); hidden: [L, d]; raters: the R raters
    the sums were formed for. Returns what prune_step returns. SparseVLM+'s
    top_heads and gravity options need per-head data and are refused.
    """
    d = _ext.prune_step_from_head_sums(_arg(p_sum, "P_sum"), int(heads), _arg(hidden, "hidden"),
                                       _span(visual), _ints(raters, "raters"),
                                       options if options is not None else StepOptions())
    return _result(d, _Like(hidden))


def show(case_dir: Union[str, os.PathLike], grid: Sequence[int], out: Union[str, os.PathLike], *,
         cell: int = 16, scores_from: str = "attn") -> dict:
    """Runs a case and writes a PNG of its visual grid: kept patches as they are,
    recycled ones tinted with their cluster's colour, dropped ones dark; over the
    case's ``image.png`` when it has one, else on a plain canvas of ``cell``
    pixels a patch. grid: (rows, cols), rows*cols = N, tokens row-major. Returns
    the counts (kept, recycled, clusters, dropped) and the picture's size. The
    CLI's ``sparsevlm show`` draws the same picture.
    """
    g = _span(grid, "grid")
    return _ext.show(os.fspath(case_dir), g, os.fspath(out), int(cell), scores_from)


def load_case(case_dir: Union[str, os.PathLike]) -> dict:
    """A case folder (spec format) as prune_step's arguments, checked as the CLI
    checks it: ``embeds``, ``attn``, ``hidden`` (and ``q``, ``k`` when the case has
    them) as NumPy arrays in their stored dtype (float32/float16), ``visual``
    (S, N), ``raters`` (a list, or None to select them), ``options`` (StepOptions)
    and ``name``. ``prune_step(c["hidden"], c["visual"], attn=c["attn"],
    embeds=c["embeds"], raters=c["raters"], options=c["options"])`` is ``run_case``.
    """
    return _ext.load_case(os.fspath(case_dir))
