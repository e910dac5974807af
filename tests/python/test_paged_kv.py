"""sparsevlm.compact_paged_kv: one request's rows compacted inside a paged K/V cache
(kv_cache.hpp's compact_paged_kv), against a dense reference built here, on NumPy and
torch, both page layouts, K and V as the two halves of the last axis (vLLM 0.32's
FlashAttention cache; its CPU cache is checked in tests/vllm), and the torch device
path (run on CPU tensors here: no GPU on the test machines)."""
import numpy as np
import pytest

import sparsevlm
from sparsevlm import Error


def _paged(layout, blocks, bs, heads, dim, table, rng, dtype=np.float32):
    """(cache, dense): a random paged cache and the request's tokens as [T, heads, dim]."""
    shape = (blocks, bs, heads, dim) if layout == "NHD" else (blocks, heads, bs, dim)
    cache = rng.standard_normal(shape).astype(dtype)
    return cache, _gather(cache, layout, table, len(table) * bs)


def _gather(cache, layout, table, tokens):
    kv = cache if layout == "NHD" else cache.transpose(0, 2, 1, 3)
    bs = kv.shape[1]
    t = np.arange(tokens)
    return kv[np.asarray(table)[t // bs], t % bs].copy()


def _sequence(rng, tokens, keep, recycled):
    """Ascending survivors with `recycled` negative entries spliced in where make_sequence's
    order still holds (a source entry p at index i has p >= i)."""
    seq = [int(p) for p in np.sort(rng.choice(tokens, keep, replace=False))]
    for r in range(recycled):
        ok = [i for i in range(len(seq) + 1) if all(p < 0 or p >= j + 1 for j, p in
                                                     enumerate(seq[i:], start=i))]
        seq.insert(int(rng.choice(ok)), -(r + 1))
    return np.asarray(seq, dtype=np.int64)


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("seed", range(4))
def test_equals_dense_reference(layout, seed):
    rng = np.random.default_rng(seed)
    blocks, bs, heads, dim = 9, 4, 3, 5
    table = rng.permutation(blocks)[:6]
    cache, dense = _paged(layout, blocks, bs, heads, dim, table, rng)
    before = cache.copy()
    seq = _sequence(rng, 6 * bs, 13, 2)
    c = int((seq < 0).sum())
    rec = rng.standard_normal((max(c, 1), heads, dim)).astype(np.float32)
    n = sparsevlm.compact_paged_kv(cache, table, seq, layout, rec if c else None)
    assert n == len(seq)
    want = dense.copy()
    src = np.concatenate([dense, rec])
    want[:n] = src[np.where(seq >= 0, seq, len(dense) - 1 - seq)]
    np.testing.assert_array_equal(_gather(cache, layout, table, len(dense)), want)
    others = np.setdiff1d(np.arange(blocks), table)
    np.testing.assert_array_equal(cache[others], before[others])


def test_k_and_v_halves_of_the_last_axis_torch():
    # [blocks, heads, block_size, 2 dim], K then V on the last axis (vLLM 0.32's
    # FlashAttention cache): strided HND views, compacted in place.
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(7)
    blocks, heads, bs, dim = 5, 2, 32, 8
    cache = torch.from_numpy(rng.standard_normal((blocks, heads, bs, 2 * dim)).astype(np.float32))
    cache = cache.to(torch.bfloat16)
    table = torch.tensor([3, 0, 4], dtype=torch.int32)  # vLLM's int32 block table
    ref = cache.clone()
    seq = np.asarray([0, 1, 2] + list(range(40, 90)) + [95], dtype=np.int64)
    for half in (slice(0, dim), slice(dim, 2 * dim)):
        assert sparsevlm.compact_paged_kv(cache[..., half], table, seq, "HND") == len(seq)
    dense = ref.permute(0, 2, 1, 3)[table.long()].reshape(3 * bs, heads, 2 * dim)
    got = cache.permute(0, 2, 1, 3)[table.long()].reshape(3 * bs, heads, 2 * dim)
    assert torch.equal(got[: len(seq)], dense[torch.from_numpy(seq)])
    assert torch.equal(got[len(seq):], dense[len(seq):])
    assert torch.equal(cache[[1, 2]], ref[[1, 2]])


@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_device_path_equals_cpu_path(layout):
    """The torch path CUDA tensors take, run on CPU tensors, gives the C++ result."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    table = np.asarray([4, 1, 6, 2])
    cache, _ = _paged(layout, 8, 4, 2, 4, table, rng)
    seq = np.asarray([0, 2, 3, -1, 5, 9, -2, 14, 15], dtype=np.int64)
    rec = rng.standard_normal((2, 2, 4)).astype(np.float32)
    a = torch.from_numpy(cache.copy())
    b = torch.from_numpy(cache.copy())
    assert sparsevlm.compact_paged_kv(a, table, seq, layout, rec) == 9
    assert sparsevlm._compact_paged_device(b, table, seq, layout, torch.from_numpy(rec)) == 9
    assert torch.equal(a, b)


def test_bad_input_names_the_argument_and_changes_nothing():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    table = np.asarray([2, 0])
    cache, _ = _paged("HND", 4, 4, 2, 3, table, rng)
    before = cache.copy()
    cases = [  # (block_table, sequence, recycled, the argument named)
        (table, [1, 0], None, r"sequence\[1\]"),
        (table, [0, 8], None, r"block_table\.size\(\)"),
        (table, [0, -1], None, r"sequence\[1\]"),
        ([2, 9], [0, 5], None, r"block_table\[1\]"),
        (table, [0, -1], np.zeros((1, 3, 3), np.float32), "recycled"),
    ]
    for tab, seq, rec, name in cases:
        with pytest.raises(Error, match=name):
            sparsevlm.compact_paged_kv(cache, tab, seq, "HND", rec)
        # The device path (torch) makes the same checks.
        t = torch.from_numpy(cache)
        with pytest.raises(Error, match=name):
            sparsevlm._compact_paged_device(t, np.asarray(tab), np.asarray(seq), "HND",
                                            None if rec is None else torch.from_numpy(rec))
        np.testing.assert_array_equal(cache, before)
    with pytest.raises(Error, match="layout"):
        sparsevlm.compact_paged_kv(cache, table, [0], "XYZ")
    with pytest.raises(Error, match="sequence"):
        sparsevlm.compact_paged_kv(cache, table, [[0]], "HND")
    with pytest.raises(Error, match="4-D"):
        sparsevlm.compact_paged_kv(cache[0], table, [0], "HND")
    np.testing.assert_array_equal(cache, before)


def test_cuda_tensors_take_the_cuda_kernels():
    """On a GPU with the CUDA build: cuda/kv_cache.cuh's kernels move what the CPU moves,
    bit for bit, and refuse what it refuses, with the cache unchanged."""
    torch = pytest.importorskip("torch")
    if not (sparsevlm.has_cuda() and torch.cuda.is_available()):
        pytest.skip("no CUDA build of the package or no GPU: the GPU compaction did not run")
    rng = np.random.default_rng(5)
    table = np.asarray([4, 1, 6, 2])
    seq = np.asarray([0, 2, 3, -1, 5, 9, -2, 14, 15], dtype=np.int64)
    rec = rng.standard_normal((2, 2, 4)).astype(np.float32)
    for layout in ("NHD", "HND"):
        cache, _ = _paged(layout, 8, 4, 2, 4, table, rng)
        for dtype in (torch.float32, torch.bfloat16):
            cpu = torch.from_numpy(cache.copy()).to(dtype)
            gpu = cpu.cuda()
            assert sparsevlm.compact_paged_kv(cpu, table, seq, layout, rec) == 9
            t32 = torch.from_numpy(table.astype(np.int32)).cuda()
            assert sparsevlm.compact_paged_kv(gpu, t32, seq, layout, torch.from_numpy(rec).cuda()) == 9
            assert torch.equal(gpu.cpu(), cpu)
        gpu = torch.from_numpy(cache.copy()).cuda()
        with pytest.raises(Error, match=r"sequence\[1\]"):
            sparsevlm.compact_paged_kv(gpu, table, [1, 0], layout)
        assert torch.equal(gpu.cpu(), torch.from_numpy(cache))
