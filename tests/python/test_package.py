"""The Python package against the CLI, the spec cases and its own contract.

Run from the repository root after `pip install .`: pytest tests/python.
SPARSEVLM_CLI names the CLI binary (default build/examples/sparsevlm) and
SPARSEVLM_CASES_DIR the spec cases (default ../shared/cases).
"""
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import sparsevlm as sv

ROOT = Path(__file__).resolve().parents[2]
CASES = Path(os.environ.get("SPARSEVLM_CASES_DIR", ROOT.parent / "shared" / "cases"))
CLI = Path(os.environ.get("SPARSEVLM_CLI", ROOT / "build" / "examples" / "sparsevlm"))
case_dirs = sorted(p.parent for p in CASES.glob("*/case.json"))
LIST_KEYS = ("raters", "rank", "keep_count", "keep", "clusters", "sequence")


def load_case(d):
    c = sv.load_case(d)
    arrays = {k: c[k] for k in ("embeds", "attn", "hidden", "q", "k") if k in c}
    raw = {"raters": c["raters"]} if c["raters"] is not None else {}
    return raw, arrays, c["options"], c["visual"]


def test_there_are_cases():
    assert case_dirs, f"no spec cases under {CASES}"


def test_cli_cuda_plan_and_the_performance_model():
    # `sparsevlm cuda-plan` needs no GPU: one JSON document, every launch within the
    # limits; bench/cuda_model.py prices each of those launches.
    if not CLI.exists():
        pytest.skip(f"no CLI at {CLI} (set SPARSEVLM_CLI)")
    out = subprocess.run([str(CLI), "cuda-plan", "--model", "llava-1.5-7b", "--scores-from", "qk"],
                         check=True, capture_output=True, text=True)
    plan = json.loads(out.stdout)
    # Three launches: the counts reset, then two chains of kernels (their phases).
    assert [k["name"] for k in plan["kernels"]][0] == "counts_reset" and len(plan["kernels"]) == 3
    names = [ph["name"] for k in plan["kernels"] for ph in k.get("phases", [k])]
    assert plan["host_syncs"] == 0 and plan["within_limits"] and plan["length"] == 671
    assert names[0] == "counts_reset" and "qk_logits" in names and names[-1] == "plan_sequence"
    assert all(k["grid"][0] == sum(ph["grid"][0] * ph["grid"][1] for ph in k["phases"])
               for k in plan["kernels"][1:])
    model = subprocess.run([sys.executable, str(ROOT / "bench" / "cuda_model.py"), "--cli",
                            str(CLI), "--model", "llava-1.5-7b", "--scores-from", "qk", "--json"],
                           check=True, capture_output=True, text=True)
    m = json.loads(model.stdout)
    assert [k["name"] for k in m["kernels"]] == names
    assert (plan["recycled_max"], plan["clusters_max"]) == (173, 18)  # 576 · 0.3, / 10
    assert m["shape"]["s"] == 173 and m["shape"]["H"] == plan["heads"] == 32
    assert m["launches"] == 3 and m["handoffs"] == len(names) - 3
    assert m["total_us"] == pytest.approx(m["compute_us"] + m["launch_gaps_us"] + m["handoffs_us"])
    assert all(k["us"] >= 0 for k in m["kernels"]) and m["compute_us"] > 0
    # The kernels' parameters (a chain's bodies by value) within CUDA 12.1's 32,764 bytes.
    assert all(0 < k["param_bytes"] <= 32764 for k in plan["kernels"])
    # 32 steps side by side (prune_batch_async): the serial phases once, the work 32
    # times; a batched launch carries as many steps as its parameters hold.
    batch = json.loads(subprocess.run([sys.executable, str(ROOT / "bench" / "cuda_model.py"), "--cli",
                                       str(CLI), "--model", "llava-1.5-7b", "--scores-from", "qk",
                                       "--batch", "32", "--json"],
                                      check=True, capture_output=True, text=True).stdout)
    assert batch["batch"] == 32 and batch["launches"] >= 3
    assert m["total_us"] < batch["total_us"] < 32 * m["total_us"]
    assert batch["per_seq_us"] == pytest.approx(batch["total_us"] / 32)


@pytest.mark.parametrize("case", case_dirs, ids=lambda p: p.name)
def test_run_case_agrees_with_expected(case):
    got = sv.run_case(case)
    want = json.loads((case / "expected" / "result.json").read_text())
    for k in LIST_KEYS:
        assert got[k] == want[k], k
    if "merged" in want:
        m = np.load(case / "expected" / want["merged"])
        assert got["merged"].dtype == np.float32 and got["merged"].shape == m.shape
        np.testing.assert_allclose(got["merged"], m, rtol=1e-4, atol=1e-5)
    else:
        assert "merged" not in got


def qk_case():
    for c in case_dirs:
        if "q" in json.loads((c / "case.json").read_text()):
            return c
    pytest.skip(f"no case with q/k under {CASES}")


def test_cli_bench_calls_and_overhead_script(tmp_path):
    # `sparsevlm bench --calls` prints one JSON line with a positive median per
    # call, and bench/python_overhead.py turns it into its table on a real case.
    if not CLI.exists():
        pytest.skip(f"no CLI at {CLI} (set SPARSEVLM_CLI)")
    case = qk_case()
    for source in ("attn", "qk"):
        out = subprocess.run([str(CLI), "bench", str(case), "--calls", "--repeat", "2",
                              "--scores-from", source], check=True, capture_output=True, text=True)
        (line,) = out.stdout.strip().splitlines()
        j = json.loads(line)
        assert j["scores_from"] == source and j["repeat"] == 2
        assert set(j["median_ms"]) == {"prune_step", "select_raters", "session_prune", "apply_plan"}
        assert all(v > 0 for v in j["median_ms"].values())
    # Per stage: one JSON document too, the bandwidth figures inside it.
    out = subprocess.run([str(CLI), "bench", str(case), "--repeat", "2"], check=True,
                         capture_output=True, text=True)
    j = json.loads(out.stdout)
    assert {"total", "raters", "scores", "rank", "keep", "recycle", "plan"} == set(j["median_ms"])
    assert j["isa"] == sv.isa() and j["bandwidth"]["bytes"] > 0
    assert j["bandwidth"]["x_of_bandwidth_limit"] > 0
    table = tmp_path / "table.json"
    subprocess.run([sys.executable, str(ROOT / "bench" / "python_overhead.py"), "--cli", str(CLI),
                    "--case", str(case), "--repeat", "2", "--rounds", "1", "--json", str(table)],
                   check=True, capture_output=True, text=True)
    rows = json.loads(table.read_text())["rows"]
    assert [r["call"] for r in rows] == ["prune_step attn", "prune_step qk", "select_raters",
                                         "session prune attn", "apply_plan"]
    for r in rows:
        assert r["cpp_ms"] > 0 and r["numpy_ratio"] == pytest.approx(r["numpy_ms"] / r["cpp_ms"])


@pytest.mark.parametrize("case", case_dirs, ids=lambda p: p.name)
@pytest.mark.parametrize("source", ["attn", "qk"])
def test_run_case_agrees_with_cli(case, source, tmp_path):
    if not CLI.exists():
        pytest.skip(f"no CLI at {CLI} (set SPARSEVLM_CLI)")
    if source == "qk" and "q" not in json.loads((case / "case.json").read_text()):
        pytest.skip("case without q/k")
    subprocess.run([str(CLI), "run", str(case), str(tmp_path), "--scores-from", source], check=True)
    cli = json.loads((tmp_path / "result.json").read_text())
    got = sv.run_case(case, scores_from=source)
    assert {k: got[k] for k in LIST_KEYS} == {k: cli[k] for k in LIST_KEYS}
    if "merged" in cli:
        assert np.array_equal(got["merged"], np.load(tmp_path / cli["merged"]))  # same bits
    else:
        assert "merged" not in got


@pytest.mark.parametrize("case", case_dirs, ids=lambda p: p.name)
def test_prune_step_matches_run_case(case):
    c, a, opts, visual = load_case(case)
    r = sv.prune_step(a["hidden"], visual, attn=a["attn"], embeds=a["embeds"],
                      raters=c.get("raters"), options=opts)
    want = sv.run_case(case)
    assert r.raters.tolist() == want["raters"] and r.rank == want["rank"]
    assert r.keep.tolist() == want["keep"] and r.sequence.tolist() == want["sequence"]
    assert r.clusters == want["clusters"]
    if r.clusters:
        assert np.array_equal(r.merged, want["merged"])
    else:
        assert r.merged.shape == (0, a["hidden"].shape[1])
    if "q" in a:  # the fused-attention form decides the same
        rq = sv.prune_step(a["hidden"], visual, q=a["q"], k=a["k"], embeds=a["embeds"],
                           raters=c.get("raters"), options=opts)
        assert rq.keep.tolist() == want["keep"] and rq.clusters == want["clusters"]


def first_case():
    return load_case(case_dirs[0])


def test_strided_views_are_read_in_place():
    c, a, opts, visual = first_case()
    attn, hidden, embeds = a["attn"], a["hidden"], a["embeds"]
    base = sv.prune_step(hidden, visual, attn=attn, embeds=embeds, options=opts)
    # The same tensors as non-contiguous views: every other row of a wider array,
    # a transposed store, a head-strided buffer.
    wide = np.zeros((hidden.shape[0] * 2, hidden.shape[1] + 3), np.float32)
    wide[::2, 1:1 + hidden.shape[1]] = hidden
    h_view = wide[::2, 1:1 + hidden.shape[1]]
    e_view = np.ascontiguousarray(embeds.T).T
    a_buf = np.zeros((attn.shape[0] * 2,) + attn.shape[1:], np.float32)
    a_buf[::2] = attn
    a_view = a_buf[::2]
    assert not h_view.flags.c_contiguous and not e_view.flags.c_contiguous
    r = sv.prune_step(h_view, visual, attn=a_view, embeds=e_view, options=opts)
    assert r.keep.tolist() == base.keep.tolist() and r.clusters == base.clusters
    assert np.array_equal(r.merged, base.merged)


def test_dtypes_and_torch_outputs():
    torch = pytest.importorskip("torch")
    c, a, opts, visual = first_case()
    base = sv.prune_step(a["hidden"], visual, attn=a["attn"], embeds=a["embeds"], options=opts)
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        t = {k: torch.from_numpy(v).to(dt) for k, v in a.items()}
        r = sv.prune_step(t["hidden"], visual, attn=t["attn"], embeds=t["embeds"], options=opts)
        assert isinstance(r.keep, torch.Tensor) and r.keep.dtype == torch.int64
        assert r.merged.dtype == torch.float32 and r.keep.device.type == "cpu"
        if dt == torch.float32:
            assert r.keep.tolist() == base.keep.tolist()
        # The compaction keeps hidden's dtype and puts the merged rows in place.
        out = sv.apply_plan(r, t["hidden"])
        assert out.dtype == dt and out.shape[0] == r.sequence.shape[0]
        ref = sv.apply_plan(r.sequence.numpy(), t["hidden"].float().numpy(), r.merged.numpy())
        assert torch.equal(out.float(), torch.from_numpy(ref).to(dt).float())
    # A tensor that requires grad is read (detached), not refused.
    h = torch.from_numpy(a["hidden"]).requires_grad_()
    r = sv.prune_step(h, visual, attn=torch.from_numpy(a["attn"]), embeds=a["embeds"], options=opts)
    assert r.keep.tolist() == base.keep.tolist()


def test_apply_plan_device_path_equals_cpu_path():
    """The torch path device tensors take (run here on CPU tensors) gathers what
    plan.hpp gathers, and refuses what it refuses with the same message: its checks
    are plan.hpp's own (check_apply_plan)."""
    torch = pytest.importorskip("torch")
    hidden = np.arange(12, dtype=np.float32).reshape(6, 2)
    merged = np.array([[100, 101], [200, 201]], np.float32)
    seq = np.array([0, 2, -2, -1, 5], dtype=np.int64)
    got = sv._apply_plan_device(seq, torch.from_numpy(hidden), torch.from_numpy(merged))
    assert got.tolist() == sv.apply_plan(seq, hidden, merged).tolist()
    bad = [(np.array([0, -2]), merged[:1]), (np.array([0, 6]), None),
           (np.array([0, -1]), np.zeros((1, 3), np.float32)), (np.array([-1]), None)]
    for s, m in bad:
        with pytest.raises(sv.Error) as cpu:
            sv.apply_plan(s, hidden, m)
        with pytest.raises(sv.Error) as dev:
            sv._apply_plan_device(s.astype(np.int64), torch.from_numpy(hidden),
                                  None if m is None else torch.from_numpy(m))
        assert str(dev.value) == str(cpu.value)


def test_apply_plan_numpy():
    hidden = np.arange(12, dtype=np.float32).reshape(6, 2)
    merged = np.array([[100, 101], [200, 201]], np.float32)
    out = sv.apply_plan(np.array([0, 2, -2, -1, 5]), hidden, merged)
    assert out.tolist() == [[0, 1], [4, 5], [200, 201], [100, 101], [10, 11]]
    with pytest.raises(sv.Error, match=r"sequence\[1\]: expected a source row in \[0, 6\) or a recycled index in \[-1, -1\], got -2"):
        sv.apply_plan(np.array([0, -2]), hidden, merged[:1])
    with pytest.raises(sv.Error, match=r"sequence\[1\]: expected a source row in \[0, 6\).*got 6"):
        sv.apply_plan(np.array([0, 6]), hidden)
    with pytest.raises(sv.Error, match=r"recycled.extent\[1\]: expected 2, got 3"):
        sv.apply_plan(np.array([0, -1]), hidden, np.zeros((1, 3), np.float32))
    with pytest.raises(sv.Error, match=r"sequence: expected 1-D integers"):
        sv.apply_plan(np.array([0.5]), hidden)
    # Strided input, float16 and bfloat16 (torch), recycled rows converted.
    strided = np.arange(24, dtype=np.float32).reshape(6, 4)[:, ::2]
    assert sv.apply_plan(np.array([5, 0, -1]), strided, merged).tolist() == [[20, 22], [0, 2], [100, 101]]
    # The output is new memory: writing it leaves hidden as it was.
    out = sv.apply_plan(np.array([0, 1]), hidden)
    out[:] = -1
    assert hidden[0, 0] == 0 and hidden[1, 1] == 3


def test_apply_plan_torch_dtypes():
    torch = pytest.importorskip("torch")
    hidden = torch.arange(12, dtype=torch.float32).reshape(6, 2)
    merged = np.array([[100, 101], [200, 201]], np.float32)
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        h = hidden.to(dt).requires_grad_()
        out = sv.apply_plan(torch.tensor([1, -2, 5]), h, torch.from_numpy(merged))
        assert isinstance(out, torch.Tensor) and out.dtype == dt and not out.requires_grad
        assert out.float().tolist() == [[2, 3], [200, 201], [10, 11]]
    # A transposed (column-strided) tensor is read through its strides.
    t = torch.arange(12, dtype=torch.float32).reshape(2, 6).t()
    assert sv.apply_plan(np.array([4, 0]), t).tolist() == [[4, 10], [0, 6]]


def test_no_unit_built_for_size():
    # nanobind compiles extension modules with -Os unless told NOMINSIZE; that made
    # the package 3x slower than the library (python/CMakeLists.txt). Every unit of
    # the installed module must be optimised, none for size.
    b = sv.build_info()
    units = b["units"]
    assert "module" in units
    for name, u in units.items():
        assert u["known"], (name, b)
        assert u["optimize"] and not u["optimize_size"], (name, b)
    assert b["isa_active"] == sv.isa() and b["isa_active"] in b["isa_supported"]
    assert set(b["isa_supported"]) <= set(b["isa_compiled"]) and "scalar" in b["isa_compiled"]
    if platform.machine() in ("x86_64", "AMD64"):
        # Both SIMD tables are compiled in, each from its own unit.
        assert {"avx2", "avx512"} <= set(b["isa_compiled"]) and {"avx2", "avx512"} <= set(units)
    assert b["cuda"] is sv.has_cuda() and (("cuda" in units) is sv.has_cuda())


def test_errors_name_the_argument():
    c, a, opts, visual = first_case()
    h, at, e = a["hidden"], a["attn"], a["embeds"]
    with pytest.raises(sv.Error, match=r"^attn\.extent\[2\]: expected"):
        sv.prune_step(h, visual, attn=at[:, :, :-1], embeds=e, options=opts)
    with pytest.raises(sv.Error, match=r"attn\.dtype: expected float32, float16 or bfloat16, got int64"):
        sv.prune_step(h, visual, attn=at.astype(np.int64), embeds=e, options=opts)
    with pytest.raises(ValueError, match=r"attn, q/k: expected either attn or both q and k, got neither"):
        sv.prune_step(h, visual, embeds=e)
    with pytest.raises(sv.Error, match=r"embeds: expected an array \(or raters=...\), got None"):
        sv.prune_step(h, visual, attn=at)
    with pytest.raises(sv.Error, match=r"^hidden\.extent\[0\]: expected"):
        sv.prune_step(h[:-1], visual, attn=at, embeds=e, options=opts)
    with pytest.raises(sv.Error, match=r"visual: expected a \(start, len\) pair"):
        sv.prune_step(h, 5, attn=at, embeds=e)
    bad = at.copy()
    bad[0, -1, visual[0]] = np.nan  # a rater row reads it
    with pytest.raises(sv.Error, match=r"attn"):
        sv.prune_step(h, visual, attn=bad, embeds=e, raters=[at.shape[1] - 1], options=opts)
    with pytest.raises(sv.Error, match=r"policy"):
        sv.prune_step(h, visual, attn=at, embeds=e,
                      options=sv.StepOptions(policy=sv.KeepPolicy.fixed(-1)))
    with pytest.raises(sv.Error, match=r"case\.json"):
        sv.run_case(CASES / "no-such-case")
    with pytest.raises(sv.Error, match=r"scores_from: expected 'attn' or 'qk', got 'x'"):
        sv.run_case(case_dirs[0], scores_from="x")


def test_session_one_layer_equals_the_step():
    for case in case_dirs:
        c, a, opts, visual = load_case(case)
        L = a["hidden"].shape[0]
        layout = sv.Layout.from_counts(visual[0], visual[1], L - visual[0] - visual[1])
        cfg = sv.SessionConfig(layers=4, schedule=[(1, opts)])
        kw = {"raters": c["raters"]} if "raters" in c else {"embeds": a["embeds"]}
        s = sv.PrefillSession(layout, cfg, **kw)
        assert s.prunes_after(1) and not s.prunes_after(0) and s.length == L
        with pytest.raises(sv.Error, match=r"layer: expected 1 \(the next pruning layer.*\), got 2"):
            s.prune(2, a["hidden"], attn=a["attn"])
        assert s.length == L and s.steps_done == 0  # unchanged by the failed call
        p = s.prune(1, a["hidden"], attn=a["attn"])
        want = sv.run_case(case)
        assert p.keep.tolist() == want["keep"] and p.sequence.tolist() == want["sequence"]
        assert p.length == len(want["sequence"]) == s.length and s.finished
        assert p.kv_sequence.tolist() == [i for i in want["sequence"] if i >= 0]
        assert s.kv_rows(0).tolist() == p.kv_sequence.tolist()  # written before the step
        assert s.kv_rows(2).tolist() == list(range(s.length))  # written after it
        assert p.positions.shape == (1, p.length)
        assert p.positions[0].tolist() == list(range(p.length))  # renumber
        assert s.next_position() == p.length


def test_session_commit_of_an_outside_step_equals_prune():
    # PrefillSession.commit: the path of CUDA tensors (prune_step on the device, then
    # commit) and of tensor parallelism, checked here with the CPU step.
    import dataclasses

    rng = np.random.default_rng(3)
    P, N, T, d, H = 4, 40, 12, 32, 2
    L = P + N + T
    embeds = rng.standard_normal((L, d), dtype=np.float32)
    opts = sv.StepOptions(policy=sv.KeepPolicy.fixed(20),
                          recycle=sv.RecycleOptions(fraction=0.5, cluster_divisor=3.0))
    cfg = sv.SessionConfig(layers=6, schedule=[(1, opts), (3, sv.StepOptions(
        policy=sv.KeepPolicy.fixed(8)))], positions="keep_original")
    layout = sv.Layout.from_counts(P, N, T)
    a, b = (sv.PrefillSession(layout, cfg, embeds=embeds) for _ in range(2))
    n = L
    for layer in (1, 3):
        logits = rng.standard_normal((H, n, n)).astype(np.float32)
        logits[:, np.triu_indices(n, 1)[0], np.triu_indices(n, 1)[1]] = -np.inf
        attn = np.exp(logits - logits.max(-1, keepdims=True))
        attn /= attn.sum(-1, keepdims=True)
        hidden = rng.standard_normal((n, d), dtype=np.float32)
        options = dict(cfg.schedule)[layer]
        step = sv.prune_step(hidden, b.visual, attn=attn, raters=b.raters, options=options)
        for bad, field in [(dataclasses.replace(step, sequence=step.sequence[::-1].copy()), "step.sequence"),
                           (dataclasses.replace(step, raters=step.raters[1:]), "step.raters"),
                           (dataclasses.replace(step, keep_count=step.keep_count + 1), "step.keep_count"),
                           (dataclasses.replace(step, merged=step.merged[:0]), "step.merged"),
                           (dataclasses.replace(step, scores=step.scores[1:]), "step.scores")]:
            with pytest.raises(sv.Error, match=f"^{field}: expected"):
                b.commit(layer, bad)
            assert b.length == n and b.next_layer == layer  # unchanged
        with pytest.raises(sv.Error, match=r"^layer: expected"):
            b.commit(layer + 1, step)
        want = a.prune(layer, hidden, attn=attn)
        got = b.commit(layer, step)
        for key in ("raters", "keep", "sequence", "kv_sequence", "positions", "scores", "merged"):
            assert np.array_equal(getattr(got, key), getattr(want, key)), key
        assert got.clusters == want.clusters and got.parts == want.parts
        assert (got.length, got.spans, got.visual) == (want.length, want.spans, want.visual)
        assert b.origins.tolist() == a.origins.tolist() and b.next_position() == a.next_position()
        n = got.length
    assert b.finished and all(b.kv_rows(j).tolist() == a.kv_rows(j).tolist() for j in range(6))


def test_derive_config_carries_a_preset_over():
    c = sv.derive_config("v1.5-192", 16, 16, 1024, 2816, 35, 576)
    assert [l for l, _ in c.schedule] == [1, 3, 7]
    assert [o.policy.keep for _, o in c.schedule] == [300, 200, 110]
    c = sv.derive_config("v1.5-192", 32, 32, 4096, 11008, 35, 64)
    assert [o.policy.keep for _, o in c.schedule] == [33, 22, 12]  # round(keep * 64 / 576)
    with pytest.raises(sv.Error, match=r"preset.schedule\[\d\]\.layer"):
        sv.derive_config("v1.5-192", 4, 4, 64, 128, 5, 64)  # layers collide on 4 layers


def test_presets():
    assert "v1.5-192" in sv.preset_names() and "llava-1.5-7b" in sv.model_names()
    cfg = sv.preset_config("v1.5-192", "llava-1.5-7b")
    assert cfg.layers == 32 and [l for l, _ in cfg.schedule] == [2, 6, 15]
    with pytest.raises(sv.Error, match=r"preset: expected one of"):
        sv.preset_config("v9", "llava-1.5-7b")


def test_the_gil_is_released():
    # With a switch interval far longer than the test, a thread that held the GIL
    # through its calls would keep the main thread out until it ended: the main
    # thread would count nothing while it is alive. (The main thread yields with
    # sleep(0) so the worker gets the GIL back between calls.)
    rng = np.random.default_rng(0)
    L, N, H = 700, 576, 8
    attn = rng.random((H, L, L), dtype=np.float32)
    hidden = rng.standard_normal((L, 256), dtype=np.float32)
    raters = list(range(L - 60, L))
    opts = sv.StepOptions(policy=sv.KeepPolicy.fixed(60),
                          recycle=sv.RecycleOptions(fraction=1.0, cluster_divisor=2.0))
    started, count = threading.Event(), [0]

    def work():
        started.set()
        for _ in range(10):
            sv.prune_step(hidden, (20, N), attn=attn, raters=raters, options=opts)

    old = sys.getswitchinterval()
    sys.setswitchinterval(30.0)
    try:
        t = threading.Thread(target=work)
        t.start()
        started.wait()
        while t.is_alive():
            count[0] += 1
            if count[0] % 100 == 0:
                time.sleep(0)
        t.join()
    finally:
        sys.setswitchinterval(old)
    assert count[0] > 0


def test_cuda_arrays():
    torch = pytest.importorskip("torch")
    c, a, opts, visual = first_case()
    t = {k: torch.from_numpy(v) for k, v in a.items()}
    if not (sv.has_cuda() and torch.cuda.is_available()):
        # Without the CUDA path (or a GPU), CUDA tensors are refused by name.
        if torch.cuda.is_available():
            with pytest.raises(sv.Error, match=r"^hidden: expected a CPU tensor"):
                sv.prune_step(t["hidden"].cuda(), visual, attn=t["attn"].cuda(), embeds=t["embeds"].cuda())
        pytest.skip("no CUDA build of the package or no GPU: the GPU comparison did not run")
    # On a GPU: the CUDA specialization decides what the CPU decides, bit for bit,
    # on every case, from attn and from q/k; outputs stay on the device.
    for case in case_dirs:
        c, a, opts, visual = load_case(case)
        cpu = sv.prune_step(a["hidden"], visual, attn=a["attn"], embeds=a["embeds"],
                            raters=c.get("raters"), options=opts)
        g = {k: torch.from_numpy(v).cuda() for k, v in a.items()}
        r = sv.prune_step(g["hidden"], visual, attn=g["attn"], embeds=g["embeds"],
                          raters=c.get("raters"), options=opts)
        assert r.keep.device.type == "cuda"
        assert r.keep.cpu().tolist() == cpu.keep.tolist() and r.clusters == cpu.clusters
        assert np.array_equal(r.scores.cpu().numpy(), cpu.scores)
        assert np.array_equal(r.merged.cpu().numpy(), cpu.merged)
        if "q" in g:
            rq = sv.prune_step(g["hidden"], visual, q=g["q"], k=g["k"], embeds=g["embeds"],
                               raters=c.get("raters"), options=opts)
            assert rq.keep.cpu().tolist() == cpu.keep.tolist()


def test_load_case_keeps_stored_dtypes():
    for case in case_dirs:
        c = sv.load_case(case)
        meta = json.loads((case / "case.json").read_text())
        for key in ("embeds", "attn", "hidden"):
            stored = np.load(case / meta[key])
            assert c[key].dtype == stored.dtype and np.array_equal(c[key], stored), key
        assert c["visual"] == (meta["visual"]["start"], meta["visual"]["len"])
        assert c["raters"] == meta.get("raters")
    with pytest.raises(sv.Error, match=r"case\.json"):
        sv.load_case(CASES / "no-such-case")


def test_review_regressions():
    torch = pytest.importorskip("torch")
    c, a, opts, visual = first_case()
    L = a["hidden"].shape[0]
    # Raters are checked before the [R, N] output is allocated.
    with pytest.raises(sv.Error, match=r"raters\[0\]: expected a text position"):
        sv.partial_relevance(list(range(10**6)), visual, attn_local=a["attn"])
    # A grid whose rows*cols overflows int64 is refused by name, not wrapped around.
    with pytest.raises(sv.Error, match=r"^grid: expected rows x cols"):
        sv.show(case_dirs[0], (2**62 + 64, 4), "/nonexistent/x.png")
    with pytest.raises(sv.Error, match=r"layout"):
        sv.Layout.from_counts(2**62, 2**62, 2**62)
    # A failed prune leaves the session as it was, its outputs' framework included.
    layout = sv.Layout.from_counts(visual[0], visual[1], L - visual[0] - visual[1])
    s = sv.PrefillSession(layout, sv.SessionConfig(layers=4, schedule=[(1, opts)]),
                          embeds=a["embeds"])
    with pytest.raises(sv.Error):
        s.prune(1, torch.from_numpy(a["hidden"][:-1]), attn=torch.from_numpy(a["attn"]))
    assert isinstance(s.positions, np.ndarray) and s.length == L


def test_session_readers_wait_for_prune():
    # Readers and prune() on two threads: every read sees a whole state, the one
    # before the step or the one after it (prune replaces the buffers).
    rng = np.random.default_rng(1)
    S, N, T, H = 4, 2000, 400, 2
    L = S + N + T
    attn = rng.random((H, L, L), dtype=np.float32)
    hidden = rng.standard_normal((L, 16), dtype=np.float32)
    s = sv.PrefillSession(sv.Layout.from_counts(S, N, T),
                          sv.SessionConfig(layers=3, schedule=[(0, sv.StepOptions(
                              policy=sv.KeepPolicy.fixed(100)))]),
                          raters=list(range(L - 50, L)))
    seen, done = [], threading.Event()

    def read():
        while not done.is_set():
            p = s.positions
            seen.append((p.shape[1], s.length, p[0].tolist() == list(range(p.shape[1]))))

    t = threading.Thread(target=read)
    t.start()
    try:
        s.prune(0, hidden, attn=attn)
    finally:
        done.set()
        t.join()
    assert seen and all(ok for _, _, ok in seen)
    assert {w for w, _, _ in seen} <= {L, s.length}
