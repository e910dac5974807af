"""SparseVLM inside a Hugging Face LLaVA prefill (examples/python/hf_llava.py).

A small random-weight LlavaForConditionalGeneration (CLIP 336/14 -> 576 image tokens,
a 6-layer Llama with grouped-query attention) with the same weights three ways:
eager attention (`model`, scores from the probabilities, scores_from="attn"), the
stock SDPA (`sdpa_model`) and SDPA through the q/k capture registered in
transformers' AttentionInterface (`qk_model`, scores_from="qk"). It checks that:

* with pruning off, the wrapper's thin decoder loop is the stock model, bit for bit
  (final hidden states, logits, greedy tokens and every decode step's logits), for
  eager attention and for the capture model against the stock SDPA model;
* the q/k mode decides what the attention mode decides on the same inputs;
* with pruning (both modes), the token count entering each layer is what the plans
  say, each layer's KV cache holds exactly `session.kv_rows(layer)` after the prefill
  and grows by one row per decode step;
* the cached decode step equals a cache-free recomputation of the pruned prefill on
  the prompt plus the generated token, whose last query sees the same keys as the
  compacted caches: this checks the rows kept in each cache, their contents and the
  decode position ids of every layer.
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

_EXAMPLE = pathlib.Path(__file__).resolve().parents[2] / "examples" / "python" / "hf_llava.py"
_spec = importlib.util.spec_from_file_location("hf_llava", _EXAMPLE)
hf_llava = sys.modules.setdefault("hf_llava", importlib.util.module_from_spec(_spec))
if not hasattr(hf_llava, "prefill"):
    _spec.loader.exec_module(hf_llava)

LAYERS = 6
PREFIX = 8
TEXT = 24
VISUAL = 576


@pytest.fixture(scope="module", autouse=True)
def _threads():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 threads on 2 shared, busy cores can be 10-50x slower
    yield
    torch.set_num_threads(before)


def _build(attn_implementation):
    return hf_llava.build_model(hidden=256, layers=LAYERS, heads=4, kv_heads=2, vocab=1000, seed=0,
                                attn_implementation=attn_implementation)


@pytest.fixture(scope="module")
def model():
    """Eager attention everywhere: scores_from="attn"."""
    return _build("eager")


@pytest.fixture(scope="module")
def sdpa_model():
    """The stock default, SDPA everywhere; the reference for the capture model."""
    return _build("sdpa")


@pytest.fixture(scope="module")
def qk_model():
    """SDPA everywhere, the decoder through the q/k capture: scores_from="qk"."""
    return _build(hf_llava.QK_ATTENTION)


@pytest.fixture(scope="module")
def inputs(model):
    return hf_llava.make_inputs(model, PREFIX, TEXT, seed=1)


@pytest.fixture(scope="module")
def embeds(model, inputs):
    """One set of input embeddings for runs that compare the two modes (the eager and
    the SDPA vision towers round differently)."""
    ids, pixels = inputs
    with torch.no_grad():
        return hf_llava.embed_inputs(model, ids, pixels)


@pytest.fixture(scope="module")
def sv():
    return pytest.importorskip("sparsevlm")


def _model_for(request, mode):
    return request.getfixturevalue("qk_model" if mode == "qk" else "model")


def _config(sv, positions="renumber", policy="fixed"):
    if policy == "fixed":
        return hf_llava.make_config(LAYERS, [1, 3], [192, 96], positions=positions)
    return hf_llava.make_config(LAYERS, [1, 3], None, scale=13.5, bias=0.0, positions=positions)


# ------------------------------------------------------------------ pruning off


def test_the_three_models_share_their_weights(model, sdpa_model, qk_model):
    assert hf_llava.decoder_attention(model) == "eager"
    assert hf_llava.decoder_attention(sdpa_model) == "sdpa"
    assert hf_llava.decoder_attention(qk_model) == hf_llava.QK_ATTENTION
    # Only the decoder goes through the capture; the vision tower stays stock SDPA.
    assert qk_model.model.vision_tower.config._attn_implementation == "sdpa"
    ref = model.state_dict()
    for other in (sdpa_model, qk_model):
        theirs = other.state_dict()
        assert theirs.keys() == ref.keys()
        assert all(torch.equal(ref[k], theirs[k]) for k in ref)


def test_layout_of_the_prompt(model, inputs):
    ids, _ = inputs
    assert hf_llava.image_span(ids, model.config.image_token_id) == (PREFIX, VISUAL, TEXT)


def test_unpruned_prefill_is_the_stock_model(model, inputs):
    ids, pixels = inputs
    with torch.no_grad():
        state = hf_llava.prefill(model, ids, pixels, None)
        stock_hidden = model.model(input_ids=ids, pixel_values=pixels).last_hidden_state
        stock_all = model(input_ids=ids, pixel_values=pixels).logits
        stock_last = model(input_ids=ids, pixel_values=pixels, logits_to_keep=1).logits
        all_rows = model.lm_head(state.hidden)
    assert state.layer_tokens == [ids.shape[1]] * LAYERS
    # The decoder is the stock one bit for bit: every layer, the final norm.
    assert torch.equal(state.hidden, stock_hidden)
    # lm_head on the last row only, as generate() does (logits_to_keep=1): identical.
    assert torch.equal(state.logits, stock_last[:, -1])
    # model(...) without logits_to_keep multiplies all L rows by lm_head in one GEMM,
    # whose blocking for L rows differs from that for one row, so the last row can
    # differ in the last bits from a one-row product. Applied to all rows, the
    # wrapper's hidden states give the stock logits exactly.
    assert torch.equal(all_rows, stock_all)
    torch.testing.assert_close(state.logits, stock_all[:, -1], rtol=1e-5, atol=1e-5)
    for j in range(LAYERS):
        assert state.cache.layers[j].keys.shape[-2] == ids.shape[1]


def test_unpruned_greedy_generation_is_the_stock_model(model, inputs):
    ids, pixels = inputs
    k = 6
    with torch.no_grad():
        stock = model.generate(
            input_ids=ids, pixel_values=pixels, do_sample=False, max_new_tokens=k,
            output_logits=True, return_dict_in_generate=True,
        )
        tokens, state = hf_llava.generate(model, ids, pixels, None, k)
    assert tokens == stock.sequences[0, ids.shape[1]:].tolist()
    assert len(stock.logits) == len(state.step_logits) == k
    for mine, theirs in zip(state.step_logits, stock.logits):
        assert torch.equal(mine, theirs)


def test_empty_schedule_is_the_stock_model(model, inputs, sv):
    ids, pixels = inputs
    with torch.no_grad():
        empty = hf_llava.prefill(model, ids, pixels, sv.SessionConfig(layers=LAYERS, schedule=[]))
        stock = model(input_ids=ids, pixel_values=pixels, logits_to_keep=1).logits
        tokens, _ = hf_llava.generate(model, ids, pixels, sv.SessionConfig(layers=LAYERS, schedule=[]), 4)
        ref = model.generate(input_ids=ids, pixel_values=pixels, do_sample=False, max_new_tokens=4)
    assert torch.equal(empty.logits, stock[:, -1])
    assert tokens == ref[0, ids.shape[1]:].tolist()


def test_unpruned_capture_model_is_the_stock_sdpa_model(sdpa_model, qk_model, inputs, sv):
    """The capture calls transformers' own SDPA function and returns what it returns,
    and its mask function is SDPA's: the decoder is the stock SDPA one bit for bit."""
    ids, pixels = inputs
    k = 4
    with torch.no_grad():
        stock_hidden = sdpa_model.model(input_ids=ids, pixel_values=pixels).last_hidden_state
        stock_last = sdpa_model(input_ids=ids, pixel_values=pixels, logits_to_keep=1).logits
        # The capture model's own forward (no wrapper) is the stock one too.
        assert torch.equal(qk_model(input_ids=ids, pixel_values=pixels, logits_to_keep=1).logits, stock_last)
        state = hf_llava.prefill(qk_model, ids, pixels, None)
        empty = hf_llava.prefill(qk_model, ids, pixels, sv.SessionConfig(layers=LAYERS, schedule=[]),
                                 scores_from="qk")
        stock = sdpa_model.generate(
            input_ids=ids, pixel_values=pixels, do_sample=False, max_new_tokens=k,
            output_logits=True, return_dict_in_generate=True,
        )
        tokens, gen = hf_llava.generate(qk_model, ids, pixels, None, k)
    assert torch.equal(state.hidden, stock_hidden)
    assert torch.equal(state.logits, stock_last[:, -1])
    assert torch.equal(empty.logits, stock_last[:, -1])
    assert tokens == stock.sequences[0, ids.shape[1]:].tolist()
    for mine, theirs in zip(gen.step_logits, stock.logits, strict=True):
        assert torch.equal(mine, theirs)
    assert not hf_llava._qk_slots  # armed only while a pruning layer runs


def test_scores_from_needs_the_matching_attention(model, sdpa_model, qk_model, inputs, embeds, sv):
    ids, _ = inputs
    cfg = _config(sv)
    for m, mode in [(model, "qk"), (qk_model, "attn"), (sdpa_model, "qk"), (sdpa_model, None)]:
        with pytest.raises(ValueError, match="decoder attention"):
            hf_llava.prefill(m, ids, None, cfg, inputs_embeds=embeds, scores_from=mode)
    with pytest.raises(ValueError, match="scores_from"):
        hf_llava.prefill(qk_model, ids, None, cfg, inputs_embeds=embeds, scores_from="lse")


# ------------------------------------------------------------------- pruning on


@pytest.mark.parametrize(
    "positions,policy", [("renumber", "fixed"), ("keep_original", "rank")]
)
def test_qk_mode_decides_what_attn_mode_decides(model, qk_model, inputs, embeds, sv, positions, policy):
    """Eager model scoring from its probabilities, capture model (same weights, same
    input embeddings, same raters) scoring from q/k: the same plans at every layer.

    The library decides the same from q/k as from the probabilities these q/k give
    (docs/fused-attention.md). The two runs are not fed bit-identical q/k, though: the
    q/k of layer 1 come from hidden states after layer 0, whose attention output eager
    and SDPA round differently, and the differences carry on. Here the scores of the
    two runs agree to ~2e-7 relative, and the gap between the last kept and the first
    dropped score is ~20x the largest score difference at layer 1 under the rank
    policy and >= 1000x at the other layers, so every layer's decisions match (also
    the first pruning layer's, which is all the guarantee promises here) and are
    compared exactly. A failure that reports a margin near the score difference is
    rounding at a near tie, not a wrong capture. The score comparison (rtol 1e-5) is
    the sharper check of the capture: with random weights the visual ranking depends
    little on the query, and feeding each rater the query of the token before it
    keeps the same keep set but moves the scores by ~3e-4 relative.
    """
    ids, _ = inputs
    with torch.no_grad():
        a = hf_llava.prefill(model, ids, None, _config(sv, positions, policy), inputs_embeds=embeds,
                             scores_from="attn")
        b = hf_llava.prefill(qk_model, ids, None, _config(sv, positions, policy), inputs_embeds=embeds,
                             scores_from="qk")
    assert list(a.plans) == list(b.plans) == [1, 3]
    for layer, pa in a.plans.items():
        pb = b.plans[layer]
        sa, sb = torch.as_tensor(pa.scores), torch.as_tensor(pb.scores)
        torch.testing.assert_close(sb, sa, rtol=1e-5, atol=0)
        top = sa.sort(descending=True).values
        margin = float(top[pa.keep_count - 1] - top[pa.keep_count]) if pa.keep_count < top.numel() else None
        why = f"layer {layer}: score diff {float((sa - sb).abs().max()):.3g}, keep margin {margin}"
        assert torch.equal(torch.as_tensor(pa.raters), torch.as_tensor(pb.raters)), why
        assert (pa.rank, pa.keep_count) == (pb.rank, pb.keep_count), why
        assert torch.equal(torch.as_tensor(pa.keep), torch.as_tensor(pb.keep)), why
        assert pa.clusters == pb.clusters, why
        assert torch.equal(torch.as_tensor(pa.sequence), torch.as_tensor(pb.sequence)), why
        assert torch.equal(torch.as_tensor(pa.positions), torch.as_tensor(pb.positions)), why
    assert a.layer_tokens == b.layer_tokens
    assert a.decode_base == b.decode_base
    for j in range(LAYERS):
        assert torch.equal(torch.as_tensor(a.session.kv_rows(j)), torch.as_tensor(b.session.kv_rows(j)))
        assert a.cache.layers[j].keys.shape == b.cache.layers[j].keys.shape
    torch.testing.assert_close(b.logits, a.logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", ["attn", "qk"])
@pytest.mark.parametrize(
    "positions,policy", [("renumber", "fixed"), ("keep_original", "rank")]
)
def test_pruned_prefill_counts_caches_and_decode(request, inputs, sv, mode, positions, policy):
    model = _model_for(request, mode)
    ids, pixels = inputs
    L = ids.shape[1]
    with torch.no_grad():
        state = hf_llava.prefill(model, ids, pixels, _config(sv, positions, policy), scores_from=mode)
    sess = state.session
    p1, p3 = state.plans[1], state.plans[3]
    c1, c3 = len(p1.clusters), len(p3.clusters)
    if policy == "fixed":
        assert (p1.keep_count, p3.keep_count) == (192, 96)
    assert 0 < p1.keep_count < VISUAL and 0 < p3.keep_count < p1.keep_count + c1
    assert c1 > 0 and c3 > 0  # recycling is on
    assert p1.length == PREFIX + p1.keep_count + c1 + TEXT
    assert p3.length == PREFIX + p3.keep_count + c3 + TEXT
    assert state.layer_tokens == [L, L, p1.length, p1.length, p3.length, p3.length]
    assert sess.length == p3.length

    # Each cache holds exactly the rows the session names, in the coordinates it was
    # written in: layers 2-3 the survivors of step 3 less its recycled tokens,
    # layers 0-1 the original tokens that survived both steps.
    lens = [state.cache.layers[j].keys.shape[-2] for j in range(LAYERS)]
    assert lens == [len(sess.kv_rows(j)) for j in range(LAYERS)]
    assert lens[4] == lens[5] == p3.length
    assert lens[2] == lens[3] == p3.length - c3
    assert lens[0] == lens[1] <= PREFIX + p3.keep_count + TEXT
    for j in range(LAYERS):
        assert state.cache.layers[j].values.shape[-2] == lens[j]

    # Decode positions: layers 0-1 continue the input ids; the last layers from
    # session.next_position(); layers 2-3 from the ids they were written with.
    assert state.decode_base[0] == state.decode_base[1] == L
    assert state.decode_base[4] == state.decode_base[5] == sess.next_position()
    if positions == "renumber":
        assert sess.next_position() == p3.length
        assert state.decode_base[2] == state.decode_base[3] == p1.length
    else:
        assert state.decode_base == [L] * LAYERS

    assert torch.isfinite(state.logits).all()
    with torch.no_grad():
        token = int(state.logits.argmax(-1))
        for step in range(1, 5):
            logits = hf_llava.decode_step(model, state, token)
            assert torch.isfinite(logits).all()
            now = [state.cache.layers[j].keys.shape[-2] for j in range(LAYERS)]
            assert now == [n + step for n in lens]
            token = int(logits.argmax(-1))


@pytest.mark.parametrize("mode", ["attn", "qk"])
def test_pruned_generate_runs(request, inputs, sv, mode):
    model = _model_for(request, mode)
    ids, pixels = inputs
    with torch.no_grad():
        tokens, state = hf_llava.generate(model, ids, pixels, _config(sv), 5)
    assert len(tokens) == 5 and all(0 <= t < model.config.text_config.vocab_size for t in tokens)
    assert state.generated == 4  # the last token is not fed back
    assert all(torch.isfinite(x).all() for x in state.step_logits)


@pytest.mark.parametrize("mode", ["attn", "qk"])
@pytest.mark.parametrize("positions", ["renumber", "keep_original"])
def test_cached_decode_equals_recomputation(request, inputs, sv, mode, positions):
    """The first decode step against the compacted caches equals a cache-free prefill
    of prompt + that token with the same raters (so the same pruning: causal
    attention makes the raters' rows blind to the new token), in which the new
    token's query at layer j may see only the rows layer j's cache kept. In "qk" mode
    the mask is SDPA's boolean one (materialised because of mask_hook); the raters'
    rows keep the plain causal mask, which the q/k scores assume."""
    model = _model_for(request, mode)
    ids, pixels = inputs
    cfg = _config(sv, positions)
    with torch.no_grad():
        state = hf_llava.prefill(model, ids, pixels, cfg)
        token = int(state.logits.argmax(-1))
        cached = hf_llava.decode_step(model, state, token)

        ids2 = torch.cat([ids, torch.tensor([[token]])], dim=1)
        embeds2 = hf_llava.embed_inputs(model, ids2, pixels)
        raters = state.plans[1].raters
        layout2 = sv.Layout.from_counts(PREFIX, VISUAL, TEXT + 1)
        session2 = sv.PrefillSession(layout2, _config(sv, positions), raters=raters)

        def last_query_sees_cache(layer, mask):
            mask = mask.clone()
            if mask.dtype == torch.bool:  # SDPA: True = attend
                hide, see = False, True
            else:  # eager: additive
                hide, see = torch.finfo(mask.dtype).min, 0
            mask[..., -1, :] = hide
            mask[..., -1, state.held[layer]] = see
            mask[..., -1, -1] = see
            return mask

        fresh = hf_llava.prefill(
            model, ids2, pixels, session2, inputs_embeds=embeds2, use_cache=False,
            mask_hook=last_query_sees_cache,
        )
    for layer, plan in state.plans.items():
        again = fresh.plans[layer]
        seq, seq2 = torch.as_tensor(plan.sequence), torch.as_tensor(again.sequence)
        assert torch.equal(seq2[:-1], seq), f"layer {layer}: the recomputation pruned differently"
        assert seq2[-1] == seq.max() + 1
    assert fresh.layer_tokens == [n + 1 for n in state.layer_tokens]
    torch.testing.assert_close(fresh.logits, cached, rtol=1e-4, atol=1e-4)
