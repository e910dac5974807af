"""sparsevlm.hf.sparsify: SparseVLM inside Hugging Face generate() and forward.

Every family of sparsevlm.hf.SUPPORTED, built with random weights in code
(hf_models.py). The pruned generations are compared with a slow reference written
here in plain tensor operations (no cache object, no transformers attention or mask
code, no library call): it takes only the step's decisions (each LayerPlan's
sequence, clusters and positions, from handle.stats) and keeps, for every layer, the
K/V rows and position ids that the chosen kv= option says.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

sys.path.insert(0, os.path.dirname(__file__))
import hf_models as hm  # noqa: E402

import sparsevlm as sv  # noqa: E402
import sparsevlm.hf as svh  # noqa: E402

LAYERS = 8  # v1.5 presets derive to layers 0, 1, 3 on 8 layers
NEW = 5


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _model(family, **kw):
    kw.setdefault("layers", LAYERS)
    if family == "qwen3_vl":
        # One deepstack layer: its features are added to layer 0's output, before the
        # v1.5 presets' first pruning layer (0 on 8 layers). The released models add
        # three (layers 0-2) and prune first after layer 2 (see the test below).
        kw.setdefault("deepstack", [1])
    return hm.build(family, **kw)


def _generate(model, kw, new=NEW, **gen):
    with torch.no_grad():
        out = model.generate(**kw, max_new_tokens=new, do_sample=False, **gen)
    return out[:, kw["input_ids"].shape[1]:]


# ------------------------------------------------------------------- the slow reference


def _rotate(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), -1)


def _attend(layer, x, pos, K, V, mrope, tm):
    """One decoder layer on the new rows x [n, d] at positions pos ([n] or [3, n]),
    attending to K/V rows [Hkv, m, dh] before them (appended to in place order):
    returns (output [n, d], K', V')."""
    a = layer.self_attn
    n = x.shape[0]
    h = layer.input_layernorm(x[None])[0]
    dh = a.head_dim
    q = a.q_proj(h).view(n, -1, dh)
    k = a.k_proj(h).view(n, -1, dh)
    if hasattr(a, "q_norm"):  # Qwen3: per-head RMS norms before RoPE
        q, k = a.q_norm(q), a.k_norm(k)
    q, k = q.transpose(0, 1), k.transpose(0, 1)
    v = a.v_proj(h).view(n, -1, dh).transpose(0, 1)
    p = pos.view(3, 1, n) if mrope else pos.view(1, n)
    cos, sin = tm.rotary_emb(x[None], p)
    cos, sin = cos[0], sin[0]
    q = q * cos + _rotate(q) * sin
    k = k * cos + _rotate(k) * sin
    K = torch.cat([K, k], 1)
    V = torch.cat([V, v], 1)
    rep = q.shape[0] // K.shape[0]
    Kr, Vr = K.repeat_interleave(rep, 0), V.repeat_interleave(rep, 0)
    s = (q.float() @ Kr.float().transpose(1, 2)) * a.scaling
    m = K.shape[1]
    allowed = torch.arange(m)[None, :] <= (m - n + torch.arange(n))[:, None]
    s = s.masked_fill(~allowed, float("-inf"))
    o = (torch.softmax(s, -1) @ Vr.float()).to(x.dtype).transpose(0, 1).reshape(n, -1)
    x = x + a.o_proj(o)
    x = x + layer.mlp(layer.post_attention_layernorm(x[None])[0])
    return x, K, V


def reference_generate(model, ref, plans, kv, new):
    """Greedy tokens of one unpadded row under the recorded decisions.

    ref: the row's input embeddings [L, d], input position ids [P, L] and deepstack
    (_reference_inputs); plans: layer -> LayerPlan (sequence, clusters, positions). kv: "reference"
    (layers keep what they were written with), "survivors" (layers up to a pruning
    layer drop the rows of tokens that did not survive, recycled ones have none),
    "merged" (they hold the new sequence, a recycled row the mean of its members'
    K/V). Decode position of layer j: 1 + the largest id it was written with.
    deepstack: Qwen3-VL's (visual mask [L], per-layer features), added to the outputs
    of its first layers at the visual positions (before any pruning layer)."""
    tm = svh._text_model(model)
    embeds, pos, deepstack = ref.embeds, ref.pos, ref.deepstack
    mrope = pos.shape[0] == 3
    x = embeds
    p = pos if mrope else pos[0]
    K, V, ident, base = [], [], [], []
    hkv = tm.layers[0].self_attn.k_proj.out_features // tm.layers[0].self_attn.head_dim
    dh = tm.layers[0].self_attn.head_dim
    for j, layer in enumerate(tm.layers):
        empty = x.new_zeros(hkv, 0, dh)
        x, Kj, Vj = _attend(layer, x, p, empty, empty, mrope, tm)
        if deepstack is not None and j < len(deepstack[1]):
            assert x.shape[0] == embeds.shape[0]  # nothing pruned yet
            x = x.clone()
            x[deepstack[0]] = x[deepstack[0]] + deepstack[1][j].to(x.dtype)
        K.append(Kj)
        V.append(Vj)
        ident.append(list(range(x.shape[0])))  # row r holds token r of this sequence
        base.append(int(p.max()) + 1)
        if j in plans:
            pl = plans[j]
            seq = [int(s) for s in pl.sequence]
            clusters = [[int(m) for m in c] for c in pl.clusters]
            merged = [x[c].float().mean(0).to(x.dtype) for c in clusters]
            x = torch.stack([x[s] if s >= 0 else merged[-s - 1] for s in seq])
            new_index = {s: i for i, s in enumerate(seq) if s >= 0}
            for i in range(j + 1):
                if kv == "survivors":
                    keep = [r for r, t in enumerate(ident[i]) if t in new_index]
                    K[i], V[i] = K[i][:, keep], V[i][:, keep]
                    ident[i] = [new_index[ident[i][r]] for r in keep]
                elif kv == "merged":
                    cols = []
                    mk, mv = [], []
                    for c in clusters:
                        mk.append(K[i][:, c].float().mean(1).to(K[i].dtype))
                        mv.append(V[i][:, c].float().mean(1).to(V[i].dtype))
                    K[i] = torch.stack([K[i][:, s] if s >= 0 else mk[-s - 1] for s in seq], 1)
                    V[i] = torch.stack([V[i][:, s] if s >= 0 else mv[-s - 1] for s in seq], 1)
                    ident[i] = list(range(len(seq)))
                    del cols
                else:  # reference: whole; the identities still follow the sequence
                    ident[i] = [new_index.get(t, -1) for t in ident[i]]
            p = torch.as_tensor(pl.positions)
            p = p if mrope else p[0]
    logits = model.lm_head(tm.norm(x[-1:][None]))[0, -1]
    tokens = []
    for g in range(new):
        tokens.append(int(logits.argmax()))
        if g + 1 == new:
            break
        x = tm.embed_tokens(torch.tensor([tokens[-1]]))
        for j, layer in enumerate(tm.layers):
            pj = torch.tensor([base[j] + g])
            pj = pj.expand(3, 1).reshape(3, 1) if mrope else pj
            x, K[j], V[j] = _attend(layer, x, pj, K[j], V[j], mrope, tm)
        logits = model.lm_head(tm.norm(x[None]))[0, -1]
    return tokens


def _row_inputs(model, family, prompt, **kw):
    return hm.inputs(model, family, prompts=[prompt], **kw)


@dataclass
class RefInputs:
    embeds: Any  # [L, d]
    pos: Any  # [P, L]
    deepstack: Any = None  # Qwen3-VL: (visual mask [L], [features [n_visual, d] per layer])


def _reference_inputs(model, family, kw):
    """The text model's input embeddings [L, d], position ids [P, L] and deepstack
    features for a one-row input, captured from the stock forward."""
    tm = svh._text_model(model)
    seen = {}

    def hook(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"][0]
        seen["pos"] = kwargs.get("position_ids")
        if kwargs.get("deepstack_visual_embeds") is not None:
            seen["deepstack"] = (kwargs["visual_pos_masks"][0], kwargs["deepstack_visual_embeds"])

    h = tm.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**kw)
    finally:
        h.remove()
    L = seen["embeds"].shape[0]
    p = seen["pos"]
    if family in hm.QWEN_FAMILIES:
        p = p[-3:, 0]
    else:
        p = torch.arange(L)[None] if p is None else p[:1]
    return RefInputs(seen["embeds"], p, seen.get("deepstack"))


FAMILIES = list(hm.FAMILIES)
SCORES = list(svh.SCORES_FROM)
PROMPT = {"prefix": 5, "images": 1, "text": 9}


# ------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("family", FAMILIES)
def test_supported_table_matches_the_helper(family):
    model = _model(family, layers=2)
    assert type(model).__name__ in svh.SUPPORTED


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_disabled_and_removed_are_bit_identical(family, impl):
    model = _model(family, attn_implementation=impl)
    kw = hm.inputs(model, family, prompts=[PROMPT, {"prefix": 3, "images": 1, "text": 4}])
    with torch.no_grad():
        stock = model(**kw).logits
    stock_tokens = _generate(model, kw)
    h = svh.sparsify(model, sv.SessionConfig(LAYERS, []))
    with torch.no_grad():
        ours = model(**kw).logits
    assert torch.equal(ours, stock)
    assert torch.equal(_generate(model, kw), stock_tokens)
    assert all(r.tokens == [r.tokens[0]] * LAYERS and not r.steps for r in h.stats)
    h.remove()
    h.remove()  # idempotent
    assert "forward" not in vars(svh._text_model(model))
    pruned = svh.sparsify(model, "v1.5-192")
    with torch.no_grad():
        assert not torch.equal(model(**kw).logits, stock)  # pruning changes the logits
    pruned.remove()
    with torch.no_grad():
        assert torch.equal(model(**kw).logits, stock)
    assert torch.equal(_generate(model, kw), stock_tokens)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kv", svh.KV_OPTIONS)
def test_generate_matches_the_slow_reference(family, kv):
    model = _model(family)
    kw = _row_inputs(model, family, PROMPT)
    ref = _reference_inputs(model, family, kw)
    h = svh.sparsify(model, "v1.5-192", kv=kv)
    got = _generate(model, kw)[0].tolist()
    (row,) = h.stats
    plans = {s.layer: s.plan for s in row.steps}
    assert sorted(plans) == [0, 1, 3]
    assert any(s.recycled for s in row.steps)  # the merged K/V path is exercised
    want = reference_generate(model, ref, plans, kv, NEW)
    assert got == want
    # Tokens per layer: what the derived preset says.
    N = row.spans[0][1]
    conf = sv.derive_config("v1.5-192", LAYERS, model.config.text_config.num_attention_heads,
                            model.config.text_config.hidden_size,
                            model.config.text_config.intermediate_size, row.spans[0][0], N)
    L = kw["input_ids"].shape[1]
    expect, n, vis = [], L, N
    keeps = {layer: o.policy.keep for layer, o in conf.schedule}
    for layer in range(LAYERS):
        expect.append(n)
        if layer in keeps:
            pruned = vis - keeps[layer]
            s_ = min(pruned, int(0.3 * pruned) + 1)
            c = s_ // 10 + 1
            n = n - vis + keeps[layer] + c
            vis = keeps[layer] + c
    assert row.tokens == expect


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_keep_original_positions_match_the_reference(family):
    model = _model(family)
    kw = _row_inputs(model, family, PROMPT)
    ref = _reference_inputs(model, family, kw)
    h = svh.sparsify(model, "v1.5-128", positions="keep_original")
    got = _generate(model, kw)[0].tolist()
    plans = {s.layer: s.plan for s in h.stats[0].steps}
    last = plans[max(plans)]
    assert int(torch.as_tensor(last.positions).max()) == int(ref.pos.max())  # ids kept
    assert got == reference_generate(model, ref, plans, "reference", NEW)


@pytest.mark.parametrize("family", FAMILIES)
def test_scores_from_attn_under_eager(family):
    model = _model(family, attn_implementation="eager")
    kw = _row_inputs(model, family, PROMPT)
    qk = svh.sparsify(model, "v1.5-192", scores_from="qk")
    t_qk = _generate(model, kw)
    seq_qk = [s.plan.sequence.tolist() for s in qk.stats[0].steps]
    qk.remove()
    at = svh.sparsify(model, "v1.5-192", scores_from="attn")
    t_at = _generate(model, kw)
    assert [s.plan.sequence.tolist() for s in at.stats[0].steps] == seq_qk
    assert torch.equal(t_qk, t_at)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kv", svh.KV_OPTIONS)
def test_batch_equals_one_by_one(family, kv):
    model = _model(family)
    prompts = [PROMPT, {"prefix": 3, "images": 0, "text": 6},
               {"prefix": 8, "images": 1, "text": 3}]
    kw = hm.inputs(model, family, prompts=prompts, padding_side="left")
    h = svh.sparsify(model, "v1.5-192", kv=kv)
    batch = _generate(model, kw)
    lengths = [r.tokens[-1] for r in h.stats]
    assert len(set(lengths)) > 1  # rows of different new lengths were re-padded
    assert h.stats[1].steps == []  # the text-only row is not pruned
    for b, p in enumerate(prompts):
        one = _generate(model, _row_inputs(model, family, p, first_row=b))
        assert batch[b].tolist() == one[0].tolist(), f"row {b}"
    h.remove()


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_right_padded_forward_keeps_each_rows_logits(family):
    model = _model(family)
    prompts = [PROMPT, {"prefix": 8, "images": 1, "text": 3}]
    kw = hm.inputs(model, family, prompts=prompts, padding_side="right")
    h = svh.sparsify(model, "v1.5-192")
    with torch.no_grad():
        logits = model(**kw).logits
    assert logits.shape[:2] == kw["input_ids"].shape  # the input's [batch, length]
    for b, p in enumerate(prompts):
        last = int(kw["attention_mask"][b].sum()) - 1
        with torch.no_grad():
            one = model(**_row_inputs(model, family, p, first_row=b)).logits[0, -1]
        torch.testing.assert_close(logits[b, last], one, rtol=1e-4, atol=1e-4)
    h.remove()


@pytest.mark.parametrize("family", ["llava", "llava_onevision", "internvl", "qwen2_vl"])
@pytest.mark.parametrize("kv", svh.KV_OPTIONS)
def test_several_images_are_several_spans(family, kv):
    model = _model(family)
    prompt = {"prefix": 4, "images": 2, "between": 3, "text": 8}
    kw = _row_inputs(model, family, prompt)
    ref = _reference_inputs(model, family, kw)
    for budget in ("global", "per_span"):
        h = svh.sparsify(model, "v1.5-192", budget=budget, kv=kv)
        got = _generate(model, kw)[0].tolist()
        (row,) = h.stats
        assert [s[1] for s in row.spans] == hm.visual_token_counts(model, family, prompt)
        plans = {s.layer: s.plan for s in row.steps}
        assert len(plans[0].parts) == 2
        assert got == reference_generate(model, ref, plans, kv, NEW)
        h.remove()


@pytest.mark.parametrize("kv", svh.KV_OPTIONS)
def test_a_onevision_video_is_one_span(kv):
    # LLaVA-OneVision lays a video's frames out as one run of video tokens (and a
    # newline token after them): one span, pruned as a whole.
    family = "llava_onevision"
    model = _model(family)
    prompt = {"prefix": 4, "video": True, "frames": 3, "text": 8}
    kw = _row_inputs(model, family, prompt)
    ref = _reference_inputs(model, family, kw)
    h = svh.sparsify(model, "video", kv=kv)
    got = _generate(model, kw)[0].tolist()
    (row,) = h.stats
    assert [s[1] for s in row.spans] == hm.visual_token_counts(model, family, prompt)
    plans = {s.layer: s.plan for s in row.steps}
    assert plans and row.tokens[-1] < row.tokens[0]
    assert got == reference_generate(model, ref, plans, kv, NEW)


@pytest.mark.parametrize("family", hm.QWEN_FAMILIES)
@pytest.mark.parametrize("budget", ["global", "per_span"])
def test_video_frames_are_spans(family, budget):
    model = _model(family)
    kw = _row_inputs(model, family, {"prefix": 4, "video": True, "frames": 3, "text": 8})
    ref = _reference_inputs(model, family, kw)
    h = svh.sparsify(model, "video", budget=budget)
    got = _generate(model, kw)[0].tolist()
    (row,) = h.stats
    assert len(row.spans) == 3 and len({s[1] for s in row.spans}) == 1
    plans = {s.layer: s.plan for s in row.steps}
    assert plans and all(len(p.parts) == 3 for p in plans.values())
    if budget == "per_span":  # a rank policy on each frame's own rank
        assert all(part["rank"] >= 0 for p in plans.values() for part in p.parts)
    assert got == reference_generate(model, ref, plans, "reference", NEW)


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_prune(family, dtype, tmp_path):
    model = _model(family, dtype=dtype)
    kw = _row_inputs(model, family, PROMPT)
    h = svh.sparsify(model, "v1.5-192", dump_dir=tmp_path)
    out = _generate(model, kw)
    assert out.shape == (1, NEW)
    steps = h.stats[0].steps
    assert [s.layer for s in steps] == [0, 1, 3]
    assert steps[0].plan.merged.dtype == torch.float32  # merged rows: float32, cast on apply
    for s in steps:  # the steps read the model's dtype; their dumps re-run the same
        _check_case(s.case)


def test_sampling_and_stopping_criteria():
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopAfter(StoppingCriteria):
        def __init__(self, n):
            self.n, self.calls = n, 0

        def __call__(self, input_ids, scores, **kw):
            self.calls += 1
            return torch.full((input_ids.shape[0],), self.calls >= self.n, dtype=torch.bool)

    model = _model("llava")
    kw = _row_inputs(model, "llava", PROMPT)
    h = svh.sparsify(model, "v1.5-192")
    torch.manual_seed(0)
    with torch.no_grad():
        a = model.generate(**kw, max_new_tokens=6, do_sample=True, top_k=5)
    torch.manual_seed(0)
    with torch.no_grad():
        b = model.generate(**kw, max_new_tokens=6, do_sample=True, top_k=5)
    assert torch.equal(a, b) and a.shape[1] == kw["input_ids"].shape[1] + 6
    with torch.no_grad():
        c = model.generate(**kw, max_new_tokens=20, do_sample=False,
                           stopping_criteria=StoppingCriteriaList([StopAfter(3)]))
    assert c.shape[1] == kw["input_ids"].shape[1] + 3
    assert h.calls == 3
    with torch.no_grad():  # no cache: every step is a pruned prefill of the whole sequence
        d = model.generate(**kw, max_new_tokens=3, do_sample=False, use_cache=False)
    assert d.shape[1] == kw["input_ids"].shape[1] + 3 and h.calls == 6
    assert h.stats[0].tokens[0] == kw["input_ids"].shape[1] + 2


def _check_case(path):
    """sparsevlm check (the CLI when SPARSEVLM_CLI names it), else run_case against
    expected/: the step re-run from the folder gives the dumped decision. A q/k dump
    is re-run from its q/k (what the library ran), an attn dump from attn."""
    source = "qk" if os.path.exists(os.path.join(path, "q.npy")) else "attn"
    cli = os.environ.get("SPARSEVLM_CLI")
    if cli:
        r = subprocess.run([cli, "check", path, "--scores-from", source], capture_output=True,
                           text=True)
        assert r.returncode == 0, r.stdout + r.stderr
        return
    got = sv.run_case(path, source)
    with open(os.path.join(path, "expected", "result.json")) as f:
        want = json.load(f)
    for key in ("raters", "rank", "keep_count", "keep", "clusters", "sequence"):
        assert got[key] == want[key], key


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("scores_from", SCORES)
def test_every_dumped_step_passes_check(family, scores_from, tmp_path):
    model = _model(family, attn_implementation="eager" if scores_from == "attn" else "sdpa")
    prompts = [PROMPT, {"prefix": 8, "images": 1, "text": 3}]
    kw = hm.inputs(model, family, prompts=prompts)
    h = svh.sparsify(model, "v1.5-192", dump_dir=tmp_path, scores_from=scores_from)
    _generate(model, kw, new=2)
    names = sorted(os.listdir(tmp_path))
    assert len(names) == 2 * 3
    call = names[0][: names[0].index("-row")]  # pid<PID>-call<NNNNN>
    assert call.startswith(f"pid{os.getpid()}-call")
    assert names == [f"{call}-row{b:03d}-layer{l:03d}" for b in range(2) for l in (0, 1, 3)]
    for b, row in enumerate(h.stats):
        for s in row.steps:
            assert s.case == str(tmp_path / f"{call}-row{b:03d}-layer{s.layer:03d}")
    for name in names:
        path = str(tmp_path / name)
        case = json.load(open(os.path.join(path, "case.json")))
        assert ("raters" in case) == (not name.endswith("layer000"))
        assert ("q" in case) == (scores_from == "qk")
        _check_case(path)


def test_dump_dir_from_the_environment(tmp_path, monkeypatch):
    model = _model("llava")
    kw = _row_inputs(model, "llava", PROMPT)
    h = svh.sparsify(model, "v1.5-192")
    _generate(model, kw, new=1)
    assert all(s.case is None for s in h.stats[0].steps)  # off by default
    monkeypatch.setenv("SPARSEVLM_DUMP_DIR", str(tmp_path))
    _generate(model, kw, new=1)
    assert len(os.listdir(tmp_path)) == 3
    _check_case(str(tmp_path / sorted(os.listdir(tmp_path))[0]))


def _untouched(model, stock_logits, kw):
    assert "forward" not in vars(svh._text_model(model))
    assert not model._forward_pre_hooks
    with torch.no_grad():
        assert torch.equal(model(**kw).logits, stock_logits)


def test_bad_input_raises_and_leaves_the_model_untouched():
    from transformers import LlamaConfig, LlamaForCausalLM

    lm = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=2))
    with pytest.raises(sv.Error, match="LlamaForCausalLM"):
        svh.sparsify(lm, "v1.5-192")
    model = _model("llava")
    kw = _row_inputs(model, "llava", PROMPT)
    with torch.no_grad():
        stock = model(**kw).logits
    bad = [
        (dict(preset=sv.SessionConfig(LAYERS, [(LAYERS + 2, sv.StepOptions())])),
         r"preset.schedule\[0\].layer: expected in \[0, 7\)"),
        (dict(preset=sv.SessionConfig(32, [(2, sv.StepOptions())])), "preset.layers: expected 8"),
        (dict(scores_from="attn"), "scores_from='attn': expected attn_implementation 'eager'"),
        (dict(scores_from="probs"), "scores_from: expected one of"),
        (dict(kv="all"), "kv: expected one of"),
        (dict(positions="shift"), "positions: expected"),
        (dict(budget="each"), "budget: expected"),
        (dict(preset="v9-1"), "preset"),
    ]
    for args, msg in bad:
        with pytest.raises(sv.Error, match=msg):
            svh.sparsify(model, **({"preset": "v1.5-192"} | args))
        _untouched(model, stock, kw)
    # An attention implementation the capture cannot wrap (a custom registered one).
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    AttentionInterface.register("test_custom_attention", ALL_ATTENTION_FUNCTIONS["sdpa"])
    custom = _model("llava", attn_implementation="eager")
    custom.config.text_config._attn_implementation = "test_custom_attention"
    with pytest.raises(sv.Error, match="attn_implementation: expected one of .*'test_custom_attention'"):
        svh.sparsify(custom, "v1.5-192")
    assert "forward" not in vars(svh._text_model(custom)) and not custom._forward_pre_hooks
    shallow = _model("llava", layers=4)
    with pytest.raises(sv.Error, match=r"preset .*'v1.5-192' on this 4-layer model"):
        svh.sparsify(shallow, "v1.5-192")
    assert "forward" not in vars(svh._text_model(shallow))
    h = svh.sparsify(model, "v1.5-192")
    with pytest.raises(sv.Error, match="already sparsified"):
        svh.sparsify(model, "v1.5-192")
    h.remove()
    _untouched(model, stock, kw)


def test_the_transformers_internals_relied_on():
    """docs/python.md lists them; this fails loudly when one changes."""
    import inspect

    from transformers import masking_utils

    assert "layer_idx" in inspect.signature(masking_utils.create_causal_mask).parameters
    for family in FAMILIES:
        model = _model(family, layers=2)
        tm = svh._text_model(model)
        params = inspect.signature(type(tm.layers[0]).forward).parameters
        for name in ("hidden_states", "attention_mask", "position_ids", "cache", "use_cache",
                     "position_embeddings"):
            assert name in params, (family, name)
        tparams = inspect.signature(type(tm).forward).parameters
        for name in ("input_ids", "attention_mask", "position_ids", "cache", "inputs_embeds",
                     "use_cache"):
            assert name in tparams, (family, name)
        src = inspect.getsource(type(tm.layers[0].self_attn).forward)
        assert "config._attn_implementation" in src and "scaling=self.scaling" in src
        assert hasattr(sys.modules[type(tm.layers[0].self_attn).__module__],
                       "eager_attention_forward")
        if family == "qwen3_vl":
            assert {"visual_pos_masks", "deepstack_visual_embeds"} <= set(tparams)
            assert callable(getattr(tm, "_deepstack_process", None))
    # A pruning layer whose attention function is not called through the config
    # raises instead of running unpruned.
    model = _model("llava")
    kw = _row_inputs(model, "llava", PROMPT)
    h = svh.sparsify(model, "v1.5-192")
    h._capture = "sdpa"  # as if the capture were bypassed
    with pytest.raises(sv.Error, match="expected the attention function"):
        with torch.no_grad():
            model(**kw)
    h.remove()


def test_the_example_runs():
    script = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "python",
                          "hf_generate.py")
    r = subprocess.run([sys.executable, script, "--layers", "8", "--hidden", "128", "--heads", "4",
                        "--repeats", "1", "--new-tokens", "2"], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "visual spans [(35, 576)]" in out
    assert "tokens entering each layer: [671, 404, 299, 299, 208, 208, 208, 208]" in out
    assert "after layer 0: " in out and "kept 300 of 576" in out
    assert "pruned generate:" in out and "prefill (forward" in out


@pytest.mark.parametrize("kv", svh.KV_OPTIONS)
def test_the_cache_keeps_its_state_through_crop_reorder_and_reset(kv):
    from transformers import DynamicCache

    model = _model("llava")
    kw = _row_inputs(model, "llava", PROMPT)
    L = kw["input_ids"].shape[1]
    h = svh.sparsify(model, "v1.5-192", kv=kv)
    cache = DynamicCache(config=model.config.text_config)
    with torch.no_grad():
        first = model(**kw, cache=cache).logits[0, -1]
        assert isinstance(cache, DynamicCache) and type(cache).__name__ == "SparsifiedCache"
        assert cache.get_seq_length() == L  # what generate() counts, whatever layer 0 holds
        tokens, steps = [int(first.argmax())], []
        for _ in range(3):
            out = model(input_ids=torch.tensor([[tokens[-1]]]), cache=cache).logits[0, -1]
            steps.append(out)
            tokens.append(int(out.argmax()))
        assert cache.get_seq_length() == L + 3
        # Assisted decoding rejects candidates with crop: the last two tokens again.
        cache.crop(-2)
        assert cache.get_seq_length() == L + 1
        for i in (1, 2):
            again = model(input_ids=torch.tensor([[tokens[i]]]), cache=cache).logits[0, -1]
            torch.testing.assert_close(again, steps[i], rtol=1e-5, atol=1e-5)
        with pytest.raises(sv.Error, match="cache.crop: expected to remove at most the 3 decoded"):
            cache.crop(-4)  # into the pruned prompt
        # A cache edited behind the state's back is refused, not decoded wrongly.
        cache.layers[0].keys = cache.layers[0].keys[..., :-1, :]
        with pytest.raises(sv.Error, match=r"cache.layers\[0\]: expected"):
            model(input_ids=torch.tensor([[tokens[-1]]]), cache=cache)
        # reset() makes it a plain empty DynamicCache: the next prompt is pruned again.
        cache.reset()
        assert type(cache) is DynamicCache and not hasattr(cache, "_sparsevlm")
        calls = h.calls
        torch.testing.assert_close(model(**kw, cache=cache).logits[0, -1], first, rtol=0, atol=0)
        assert h.calls == calls + 1
    # Beam search reorders the cache rows (and the state with them).
    with torch.no_grad():
        beams = model.generate(**kw, max_new_tokens=4, num_beams=3, do_sample=False)
    assert beams.shape == (1, L + 4)


def test_qwen3_vl_prunes_after_its_deepstack_layers():
    model = _model("qwen3_vl", deepstack=[0, 1])  # features added after layers 0 and 1
    kw = _row_inputs(model, "qwen3_vl", PROMPT)
    with torch.no_grad():
        stock = model(**kw).logits
    h = svh.sparsify(model, "v1.5-192")  # first pruning layer 0 on 8 layers
    with pytest.raises(sv.Error, match=r"preset.schedule\[0\].layer: expected >= 1 for "
                                       r"Qwen3VLForConditionalGeneration"):
        with torch.no_grad():
            model(**kw)
    h.remove()
    cfg = sv.SessionConfig(LAYERS, [(1, sv.StepOptions(policy=sv.KeepPolicy.fixed(24))),
                                    (3, sv.StepOptions(policy=sv.KeepPolicy.fixed(12)))])
    ref = _reference_inputs(model, "qwen3_vl", kw)
    assert ref.deepstack is not None and len(ref.deepstack[1]) == 2
    h = svh.sparsify(model, cfg)
    got = _generate(model, kw)[0].tolist()
    plans = {s.layer: s.plan for s in h.stats[0].steps}
    assert sorted(plans) == [1, 3]
    assert got == reference_generate(model, ref, plans, "reference", NEW)
    h.remove()
    with torch.no_grad():
        assert torch.equal(model(**kw).logits, stock)
