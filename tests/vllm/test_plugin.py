"""The vLLM plugin (sparsevlm.vllm) on vLLM 0.32's CPU build, against the Hugging Face
drop-in (sparsevlm.hf) on the same float32 weights. Runs in build/venv-vllm
(./scripts/vllm-env.sh), with build/venv (./scripts/python-env.sh) for the reference:

    build/venv-vllm/bin/python -m pytest -q tests/vllm

A family's engines run one after another in one process (tests/vllm/engine.py), its
references likewise in build/venv (tests/vllm/hf_reference.py); the tensor-parallel
engine has a process of its own. Four families, each with 8 decoder layers, on which
v1.5-192 prunes after layers 0, 1 and 3: LLaVA-1.5 (tiny_llava.py; 576 visual tokens ->
300 -> 200 -> 110, with recycled tokens), LLaVA-NeXT (tiny_llava_next.py; AnyRes, 784 ->
408 -> 272 -> 150), Qwen2-VL and Qwen2.5-VL (tiny_qwen2_vl.py, tiny_qwen2_5_vl.py; M-RoPE,
144 -> 75 -> 50 -> 28).
"""
import glob
import importlib.metadata
import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
import tiny_llava  # noqa: E402
import tiny_llava_next  # noqa: E402
import tiny_qwen2_5_vl  # noqa: E402
import tiny_qwen2_vl  # noqa: E402

import vllm  # noqa: E402  (conftest.py: a Python without vLLM fails here, never skips)
import sparsevlm  # noqa: E402
import sparsevlm.vllm as svv  # noqa: E402

HF_PYTHON = os.path.join(ROOT, "build", "venv", "bin", "python")
PRESET = "v1.5-192"
PRUNED_AFTER = [0, 1, 3]
PROMPTS = [
    {"question": "What is in the picture?", "image": 0, "max_tokens": 8},
    {"question": "How many dogs?", "image": 1, "max_tokens": 12},
    {"question": "What color is the car?", "image": None, "max_tokens": 6},
]
ENGINE = {"max_model_len": 1024}
FAMILIES = {"llava": (tiny_llava, "LlavaForConditionalGeneration", 576),
            "llava_next": (tiny_llava_next, "LlavaNextForConditionalGeneration", 784),
            "qwen2_vl": (tiny_qwen2_vl, "Qwen2VLForConditionalGeneration", 144),
            "qwen2_5_vl": (tiny_qwen2_5_vl, "Qwen2_5_VLForConditionalGeneration", 144)}


def _specs_run(python, script, tmp, specs):
    """Runs tests/vllm/`script` (engine.py, hf_reference.py) on `specs` ({name: spec})
    with `python`, in one fresh process, one spec after another; returns {name: its
    JSON}."""
    sp, out = os.path.join(tmp, "specs.json"), os.path.join(tmp, "out.json")
    json.dump(specs, open(sp, "w"))
    r = subprocess.run([python, os.path.join(HERE, script), sp, out],
                       capture_output=True, text=True, timeout=600 + 300 * len(specs))
    assert r.returncode == 0, \
        f"{script} {list(specs)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    return json.load(open(out))


def _engines(tmp, specs):
    """tests/vllm/engine.py's engines, in this venv: {name: its JSON}."""
    return _specs_run(sys.executable, "engine.py", tmp, specs)


def _ran(outs, name):
    """Engine `name`'s JSON, which must have started and run."""
    assert "error" not in outs[name], f"engine {name}: {outs[name]['error'][-6000:]}"
    return outs[name]


def _engine(tmp, name, spec):
    """One engine in a process of its own: tensor parallel (its workers read the
    environment when they import vLLM), the server's comparison."""
    return _ran(_engines(tmp, {name: spec}), name)


_BUILT: dict = {}


def _tiny(family, tmp_path_factory):
    """(family, checkpoint folder, the processor's inputs .npz, visual tokens per image),
    built once per family."""
    if family in _BUILT:
        return _BUILT[family]
    mod = FAMILIES[family][0]
    model, proc = mod.build(8, seed=1)
    path = mod.save(model, proc, str(tmp_path_factory.mktemp("tiny") / family))
    from transformers import AutoProcessor

    inputs = mod.inputs(AutoProcessor.from_pretrained(path), PROMPTS,
                        os.path.join(path, "inputs.npz"))
    _BUILT[family] = family, path, inputs, FAMILIES[family][2]
    return _BUILT[family]


@pytest.fixture(scope="module", params=list(FAMILIES))
def tiny(request, tmp_path_factory):
    return _tiny(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    return _tiny("llava", tmp_path_factory)


def _spec(tiny, **kw):
    family = tiny[0]
    spec = {"model": tiny[1], "family": family, "engine": ENGINE, "sparsevlm": None, "runs": []}
    spec.update(kw)
    if spec["sparsevlm"] is not None:
        spec["sparsevlm"] = dict(spec["sparsevlm"], architecture=FAMILIES[family][1])
    return spec


KV = ("survivors", "merged")  # test_kv_options_equal_the_hf_dropin
KEEP_FAMILIES = ("llava", "qwen2_vl")  # test_keep_original_positions_equal_the_hf_dropin
# test_preempted_requests_resume_exactly: 32-token blocks and 39 of them: two prompts
# (19 blocks each) run together, and the block one needs while decoding preempts the
# other, which vLLM recomputes.
PREEMPT_PROMPTS = [dict(p, max_tokens=40) for p in PROMPTS[:2]] + \
    [{"question": "Describe the image.", "image": 2, "max_tokens": 40}]
BATCH = {"kind": "batch", "prompts": PROMPTS}
STAGGERED = {"kind": "staggered", "prompts": PROMPTS}


def _family_specs(tiny, tmp):
    """Every engine the tests below need on one family, by name (the tests say why
    each is there). They run in one process: importing torch and vLLM and starting a
    process take most of a tiny engine's time."""
    family = tiny[0]
    specs = {
        "stock": _spec(tiny, engine=dict(ENGINE, enforce_eager=True), runs=[BATCH]),
        "pruned": _spec(tiny, sparsevlm={"preset": PRESET,
                                         "dump_dir": os.path.join(tmp, "pruned-dump")},
                        runs=[BATCH, STAGGERED]),
    }
    if family in KEEP_FAMILIES:
        specs["keep_original"] = _spec(
            tiny, sparsevlm={"preset": PRESET, "positions": "keep_original"}, runs=[BATCH])
    if family == "llava":
        for kv in KV:
            specs[kv] = _spec(tiny, sparsevlm={"preset": PRESET, "kv": kv}, runs=[BATCH])
        specs["builder"] = _spec(
            tiny, env={"SPARSEVLM_VLLM_REWRITER": "builder"},
            sparsevlm={"preset": PRESET, "kv": "survivors"}, runs=[BATCH, STAGGERED])
        specs["preempt"] = _spec(
            tiny, engine=dict(ENGINE, block_size=32, num_gpu_blocks_override=39),
            sparsevlm={"preset": PRESET},
            runs=[{"kind": "batch", "prompts": [p]} for p in PREEMPT_PROMPTS]
            + [{"kind": "batch", "prompts": PREEMPT_PROMPTS}])
        # Last: an engine that fails to start.
        specs["refused"] = _spec(
            tiny, engine=dict(ENGINE, enforce_eager=False, enable_prefix_caching=True,
                              enable_chunked_prefill=True),
            sparsevlm={"preset": PRESET})
    return specs


def _reference_specs(tiny, tmp):
    """The HF drop-in's pruned generate() on PROMPTS for each engine of
    _family_specs that is checked against it, by name."""
    def spec(name, kv="reference", positions=None):
        return {"model": tiny[1], "family": tiny[0], "inputs": tiny[2], "preset": PRESET,
                "kv": kv, "positions": positions, "dump_dir": os.path.join(tmp, f"{name}-dump"),
                "max_tokens": [p["max_tokens"] for p in PROMPTS]}

    specs = {"reference": spec("reference")}
    if tiny[0] in KEEP_FAMILIES:
        specs["keep_original"] = spec("keep_original", positions="keep_original")
    if tiny[0] == "llava":
        for kv in KV:
            specs[kv] = spec(kv, kv=kv)
    return specs


_RAN: dict = {}


def _once(key, tmp_path_factory, run):
    """run(tmp) once per key (its failure too: the tests that need it fail with its
    message instead of running it again)."""
    if key not in _RAN:
        try:
            _RAN[key] = run(str(tmp_path_factory.mktemp(key)))
        except (AssertionError, subprocess.TimeoutExpired) as e:
            _RAN[key] = e
    if isinstance(_RAN[key], Exception):
        pytest.fail(f"{type(_RAN[key]).__name__}: {_RAN[key]}")
    return _RAN[key]


def _family_engines(tiny, tmp_path_factory):
    """{name: JSON} of _family_specs' engines, their dumps under "tmp"."""
    def run(tmp):
        return dict(_engines(tmp, _family_specs(tiny, tmp)), tmp=tmp)
    return _once(f"engines-{tiny[0]}", tmp_path_factory, run)


def _references(tiny, tmp_path_factory):
    """{name: (outputs, dump folder)} of _reference_specs, in one build/venv process
    (tests/vllm/hf_reference.py)."""
    def run(tmp):
        if not os.path.exists(HF_PYTHON):
            pytest.fail(f"{HF_PYTHON}: expected build/venv (./scripts/python-env.sh), got none")
        specs = _reference_specs(tiny, tmp)
        got = _specs_run(HF_PYTHON, "hf_reference.py", tmp, specs)
        return {name: (got[name], s["dump_dir"]) for name, s in specs.items()}
    return _once(f"hf-{tiny[0]}", tmp_path_factory, run)


@pytest.fixture(scope="module")
def pruned(tiny, tmp_path_factory):
    engines = _family_engines(tiny, tmp_path_factory)
    return _ran(engines, "pruned"), os.path.join(engines["tmp"], "pruned-dump")


@pytest.fixture(scope="module")
def stock(tiny, tmp_path_factory):
    return _ran(_family_engines(tiny, tmp_path_factory), "stock")


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    return _references(tiny, tmp_path_factory)["reference"]


def _decisions(dump):
    """{layer: sorted decisions (result.json) of every step dumped after that layer}."""
    out: dict = {}
    for d in sorted(glob.glob(os.path.join(dump, "pid*-layer*"))):
        layer = int(d.rsplit("layer", 1)[1])
        res = json.load(open(os.path.join(d, "expected", "result.json")))
        out.setdefault(layer, []).append(res)
    return {k: sorted(v, key=json.dumps) for k, v in out.items()}


# ------------------------------------------------------------------------ no engine


def test_entry_point_and_engine_args():
    eps = importlib.metadata.entry_points(group="vllm.general_plugins")
    assert any(e.value == "sparsevlm.vllm:register" for e in eps)
    kw = svv.engine_args("v1.5-128", positions="renumber", max_model_len=2048)
    assert kw["hf_overrides"] == {
        "architectures": ["SparseVLMLlavaForConditionalGeneration"],
        "sparsevlm": {"preset": "v1.5-128", "positions": "renumber", "budget": None,
                      "kv": "reference", "dump_dir": None}}
    assert (kw["enforce_eager"], kw["enable_prefix_caching"], kw["enable_chunked_prefill"]) == \
        (True, False, False)
    assert kw["max_model_len"] == kw["max_num_batched_tokens"] == 2048
    for args, msg in [(dict(preset="v9"), "preset: expected one of"),
                      (dict(architecture="Qwen3VLForConditionalGeneration"), "architecture"),
                      (dict(positions="shift"), "positions: expected"),
                      (dict(budget="each"), "budget: expected"),
                      (dict(kv="all"), "kv: expected")]:
        with pytest.raises(sparsevlm.Error, match=msg):
            svv.engine_args(**({"preset": PRESET} | args))


def test_register_adds_the_architectures():
    svv.register()
    archs = vllm.ModelRegistry.get_supported_archs()
    assert all(a in archs for a in svv.ARCHITECTURES.values())


def _config(**kw):
    """A stand-in for vLLM's VllmConfig with the fields check_engine reads."""
    from types import SimpleNamespace as NS

    c = dict(prefix=False, chunked=False, eager=True, pp=1, spec=None, transfer=None, v2=False)
    c.update(kw)
    return NS(model_config=NS(enforce_eager=c["eager"]),
              cache_config=NS(enable_prefix_caching=c["prefix"]),
              scheduler_config=NS(enable_chunked_prefill=c["chunked"]),
              parallel_config=NS(pipeline_parallel_size=c["pp"], tensor_parallel_size=1),
              speculative_config=c["spec"], kv_transfer_config=c["transfer"],
              use_v2_model_runner=c["v2"])


def test_check_engine_names_each_refused_setting():
    from types import SimpleNamespace as NS

    from sparsevlm.vllm.models import check_engine

    check_engine(_config())  # the settings engine_args gives
    for kw, msg in [(dict(prefix=True), "enable_prefix_caching: expected False"),
                    (dict(chunked=True), "enable_chunked_prefill: expected False"),
                    (dict(eager=False), "enforce_eager: expected True"),
                    (dict(pp=2), "pipeline_parallel_size: expected 1, got 2"),
                    (dict(spec=NS(method="eagle")), "speculative_config: expected None .* 'eagle'"),
                    (dict(transfer=object()), "kv_transfer_config: expected None"),
                    (dict(v2=True), "model runner: expected V1")]:
        with pytest.raises(sparsevlm.Error, match=msg):
            check_engine(_config(**kw))


def test_hf_overrides_options_are_checked_by_key():
    from types import SimpleNamespace as NS

    from sparsevlm.vllm.models import _options

    assert _options(NS(sparsevlm={"preset": "v1.5-64"})) == {
        "preset": "v1.5-64", "positions": None, "budget": None, "kv": "reference",
        "dump_dir": None}
    for raw, msg in [({"preset": "v7"}, r"\['preset'\]: expected one of"),
                     ({"positions": "renum"}, r"\['positions'\]: expected one of"),
                     ({"budget": "all"}, r"\['budget'\]: expected one of"),
                     ({"kv": "some"}, r"\['kv'\]: expected one of"),
                     ({"layers": 3}, r"expected keys among")]:
        with pytest.raises(sparsevlm.Error, match=msg):
            _options(NS(sparsevlm=raw))


def test_rewriter_choice_by_backend_and_environment(monkeypatch):
    from sparsevlm.vllm import attention

    class Layer:
        def __init__(self, name):
            self.attn_backend = type("B", (), {"get_name": staticmethod(lambda: name)})

    monkeypatch.delenv("SPARSEVLM_VLLM_UNTESTED", raising=False)
    monkeypatch.delenv("SPARSEVLM_VLLM_REWRITER", raising=False)
    for name in ("FLASHINFER", "TRITON_ATTN", "FLASH_ATTN"):
        with pytest.raises(sparsevlm.Error,
                           match=f"SPARSEVLM_VLLM_UNTESTED=1 allows them.*got {name}"):
            attention.rewriter_for(Layer(name), None)
    with pytest.raises(sparsevlm.Error,
                       match="attention backend: expected one of .*got FLEX_ATTENTION"):
        attention.rewriter_for(Layer("FLEX_ATTENTION"), None)
    monkeypatch.setenv("SPARSEVLM_VLLM_UNTESTED", "1")
    assert type(attention.rewriter_for(Layer("FLASHINFER"), None)) is attention.BuilderRewriter
    assert type(attention.rewriter_for(Layer("FLASH_ATTN"), None)) is attention.FlashAttnRewriter
    monkeypatch.setenv("SPARSEVLM_VLLM_REWRITER", "builder")
    assert type(attention.rewriter_for(Layer("FLASH_ATTN"), None)) is attention.BuilderRewriter
    monkeypatch.setenv("SPARSEVLM_VLLM_REWRITER", "mine")
    with pytest.raises(sparsevlm.Error,
                       match="SPARSEVLM_VLLM_REWRITER: expected unset or 'builder', got 'mine'"):
        attention.rewriter_for(Layer("CPU_ATTN"), None)
    # Metadata that did not come through vLLM's builder call is refused by name.
    with pytest.raises(sparsevlm.Error, match="without its CommonAttentionMetadata"):
        attention.BuilderRewriter(None, "FLASHINFER").batch(object())


def test_cpu_page_layout():
    # kv="survivors"/"merged" compact CPU_ATTN's pages through views of their K and V
    # halves; the views must read what vLLM's own writer wrote, token by token.
    import types

    import torch
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    from sparsevlm.vllm.attention import CpuAttnRewriter

    nb, hkv, bs, dh = 3, 2, 32, 64
    isa = _get_attn_isa(torch.float32, bs, dh)
    cache = torch.zeros(nb, hkv, bs, 2 * dh)
    kc, vc = cache.view(nb, hkv, 2 * bs, dh).chunk(2, dim=2)
    key = torch.randn(5, hkv, dh)
    val = torch.randn(5, hkv, dh)
    slots = torch.tensor([0, 1, 31, 33, 70])
    ops.cpu_attn_reshape_and_cache(key, val, kc, vc, slots, isa, k_scale=1.0, v_scale=1.0,
                                   kv_cache_dtype="auto")
    layer = types.SimpleNamespace(isa=isa, kv_cache=cache)
    rw = CpuAttnRewriter.__new__(CpuAttnRewriter)
    if isa != "vec":
        with pytest.raises(sparsevlm.Error, match="'vec' kernels"):
            rw.kv_pages(layer)
        return
    k, v, layout = rw.kv_pages(layer)
    assert layout == "HND"
    for i, s in enumerate(slots.tolist()):
        assert torch.equal(k[s // bs, :, s % bs], key[i]), f"K of slot {s}"
        assert torch.equal(v[s // bs, :, s % bs], val[i]), f"V of slot {s}"


# ------------------------------------------------------------------------- engines


def test_pruned_tokens_and_logprobs_equal_the_hf_dropin(pruned, reference):
    got, want = pruned[0]["runs"][0], reference[0]
    assert [g["tokens"] for g in got] == [w["tokens"] for w in want]
    for g, w in zip(got, want):
        assert g["logprobs"] == pytest.approx(w["logprobs"], abs=2e-3)


def test_decisions_equal_the_hf_dropin_and_rerun_from_the_dumps(tiny, pruned, reference):
    got, want = _decisions(pruned[1]), _decisions(reference[1])
    assert sorted(want) == PRUNED_AFTER
    assert sorted(got) == PRUNED_AFTER
    for layer in PRUNED_AFTER:
        assert len(want[layer]) == 2  # the two prompts with an image
        assert len(got[layer]) == 4  # the same two, batched and staggered
        assert got[layer] == sorted(want[layer] * 2, key=json.dumps), f"layer {layer}"
        assert all(d["keep_count"] < tiny[3] for d in got[layer])
    # Every step vLLM ran re-runs from its case folder to the same decision.
    keys = ("raters", "rank", "keep_count", "keep", "clusters", "sequence")
    folders = sorted(glob.glob(os.path.join(pruned[1], "pid*")))
    assert len(folders) == 4 * len(PRUNED_AFTER)
    for d in folders:
        res = sparsevlm.run_case(d, "qk")
        exp = json.load(open(os.path.join(d, "expected", "result.json")))
        assert {k: res[k] for k in keys} == {k: exp[k] for k in keys}, d


def test_staggered_requests_share_steps_and_decode_the_same(pruned):
    out = pruned[0]
    assert out["runs"][1] == [dict(r, logprobs=pytest.approx(r["logprobs"], abs=1e-5))
                              for r in out["runs"][0]]
    kinds = [sorted({k for _, _, k in step}) for step in out["steps"]]
    assert ["decode", "prefill"] in kinds, "no step mixed a pruned prefill with a pruned decode"
    assert any("stock" in k and "decode" in k for k in kinds)


def test_text_only_requests_are_stock_and_pruning_changes_the_rest(pruned, stock):
    got, base = pruned[0]["runs"][0], stock["runs"][0]
    assert [g["prompt_len"] for g in got] == [b["prompt_len"] for b in base]
    assert got[2]["tokens"] == base[2]["tokens"]
    assert got[2]["logprobs"] == pytest.approx(base[2]["logprobs"], abs=1e-5)
    for i in (0, 1):
        diff = max(abs(a - b) for a, b in zip(got[i]["logprobs"], base[i]["logprobs"]))
        assert diff > 1e-3, f"prompt {i}: pruning changed nothing"


@pytest.mark.parametrize("kv", KV)
def test_kv_options_equal_the_hf_dropin(llava, tmp_path_factory, kv):
    # The caches of the layers up to each pruning layer are compacted inside the pages
    # (compact_paged_kv): later decode steps read fewer rows there, as in sparsevlm.hf.
    want = _references(llava, tmp_path_factory)[kv][0]
    got = _ran(_family_engines(llava, tmp_path_factory), kv)["runs"][0]
    assert [g["tokens"] for g in got] == [w["tokens"] for w in want]
    for g, w in zip(got, want):
        assert g["logprobs"] == pytest.approx(w["logprobs"], abs=2e-3)


def test_builder_rewriter_equals_the_hf_dropin(llava, tmp_path_factory):
    # The generic rewriter (the step's CommonAttentionMetadata with the new counts, built
    # again by the backend's own builder: what FlashInfer and Triton use on a GPU) on
    # CPU_ATTN, where it must give what the hand-written one gives: kv="survivors" makes
    # each decode's layers read caches of different lengths, the staggered run mixes
    # prefills and decodes in one step.
    want = _references(llava, tmp_path_factory)["survivors"][0]
    out = _ran(_family_engines(llava, tmp_path_factory), "builder")
    assert out["rewriter"] == "BuilderRewriter"
    assert len(out["runs"]) == 2
    for got in out["runs"]:
        assert [g["tokens"] for g in got] == [w["tokens"] for w in want]
        for g, w in zip(got, want):
            assert g["logprobs"] == pytest.approx(w["logprobs"], abs=2e-3)


def test_the_default_rewriter_is_the_hand_written_one(llava, tmp_path_factory):
    # The builder engine ran in the same process just before: its environment variable
    # must not have outlived it.
    engines = _family_engines(llava, tmp_path_factory)
    assert [_ran(engines, n)["rewriter"] for n in ("pruned", "survivors", "preempt")] == \
        ["CpuAttnRewriter"] * 3


@pytest.mark.parametrize("family", KEEP_FAMILIES)
def test_keep_original_positions_equal_the_hf_dropin(family, tmp_path_factory):
    # The other position policy: the layers after a cut keep the tokens' own (M-RoPE)
    # ids, and decoding continues every layer from the prompt's stock position.
    tiny = _tiny(family, tmp_path_factory)
    want = _references(tiny, tmp_path_factory)["keep_original"][0]
    got = _ran(_family_engines(tiny, tmp_path_factory), "keep_original")["runs"][0]
    assert [g["tokens"] for g in got] == [w["tokens"] for w in want]
    for g, w in zip(got, want):
        assert g["logprobs"] == pytest.approx(w["logprobs"], abs=2e-3)


def test_tensor_parallel_decides_as_the_hf_dropin(llava, tmp_path_factory, tmp_path):
    # Two ranks of two heads each: each scores its heads (partial_relevance), one
    # all-reduce, the step from the head sums; the dumps gather every head.
    want, want_dump = _references(llava, tmp_path_factory)["reference"]
    dump = str(tmp_path / "dump")
    # vLLM's CPU workers bind their threads per NUMA node; one node here: a core each.
    # The dump folder comes through the environment, which must reach the workers.
    cores = "|".join(str(c % os.cpu_count()) for c in range(2))
    out = _engine(str(tmp_path), "tp2", _spec(
        llava, engine=dict(ENGINE, tensor_parallel_size=2),
        env={"VLLM_CPU_OMP_THREADS_BIND": cores, "SPARSEVLM_DUMP_DIR": dump},
        sparsevlm={"preset": PRESET},
        runs=[BATCH]))
    got = out["runs"][0]
    assert [g["tokens"] for g in got] == [w["tokens"] for w in want]
    for g, w in zip(got, want):
        assert g["logprobs"] == pytest.approx(w["logprobs"], abs=2e-3)
    assert _decisions(dump) == _decisions(want_dump)


def test_preempted_requests_resume_exactly(llava, tmp_path_factory):
    # PREEMPT_PROMPTS alone, then together in a cache too small for them.
    out = _ran(_family_engines(llava, tmp_path_factory), "preempt")
    alone = [r[0] for r in out["runs"][:3]]
    together = out["runs"][3]
    assert out["resumes"] >= 1, "no request was preempted: the test's cache is too large"
    assert [r["tokens"] for r in together] == [r["tokens"] for r in alone]
    for a, b in zip(together, alone):
        assert a["logprobs"] == pytest.approx(b["logprobs"], abs=1e-4)


def test_unsupported_settings_are_refused_by_name(llava, tmp_path_factory):
    out = _family_engines(llava, tmp_path_factory)["refused"]
    err = out.get("error") or ""
    assert err.startswith("start: "), err[-2000:]
    for name in ("enable_prefix_caching: expected False", "enable_chunked_prefill: expected False",
                 "enforce_eager: expected True"):
        assert name in err, err[-2000:]
