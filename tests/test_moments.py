"""The moment accumulator (engine 1) from Python: blocks, merge, serialisation, zero-copy
covariance, and the store streaming path, against numpy f64 two-pass references."""

from __future__ import annotations

import pickle
from pathlib import Path

import layerscope
import numpy as np
import pytest
from layerscope import _native
from layerscope._moments import compute_moments, plan
from layerscope.errors import (
    FormatError,
    InvalidArgumentError,
    MemoryBudgetError,
    MismatchError,
    NonFiniteError,
)
from layerscope.store import write_store

DIMS = [5, 8, 3]


def data(n: int = 97, seed: int = 0, offset: float = 300.0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for d in DIMS:
        off = offset * rng.uniform(0.5, 2.0, d)
        out.append(off + rng.standard_normal((n, d)) * rng.uniform(0.5, 2.0, d))
    return out


def ref(xs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centred cross-product C = Σ (z − z̄)(z − z̄)ᵀ, means, and rr[k,l] = Σ r_k r_l with
    r_l = ‖x_l − x̄_l‖² (numpy f64, two-pass)."""
    z = np.hstack([np.asarray(x, dtype=np.float64) for x in xs])
    mu = z.mean(axis=0)
    zc = z - mu
    r = np.stack([((x - x.mean(0)) ** 2).sum(1) for x in (np.asarray(v, np.float64) for v in xs)])
    return zc.T @ zc, mu, r @ r.T


def relerr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def acc_of(xs: list[np.ndarray], cuts: list[int]) -> _native.MomentAccumulator:
    acc = _native.MomentAccumulator(DIMS, ["a", "b", "c"])
    for s, e in zip(cuts[:-1], cuts[1:]):
        acc.update([np.ascontiguousarray(x[s:e]) for x in xs])
    return acc


def check(m: _native.Moments, xs: list[np.ndarray], tol: float = 1e-12) -> None:
    c, mu, rr = ref(xs)
    assert m.n == xs[0].shape[0]
    assert relerr(m.cross_products(), c) < tol
    got_rr = np.array([[m.rr(k, j) for j in range(3)] for k in range(3)])
    assert relerr(got_rr, rr) < tol
    assert relerr(np.concatenate([m.mean(i) for i in range(3)]), mu) < 1e-14
    o = np.cumsum([0, *DIMS])
    for i in range(3):
        for j in range(3):
            np.testing.assert_array_equal(m.block(i, j), m.cross_products()[o[i] : o[i + 1], o[j] : o[j + 1]])
        assert m.trace(i) == pytest.approx(np.trace(c[o[i] : o[i + 1], o[i] : o[i + 1]]), rel=1e-12)


def test_blocks_equal_one_update() -> None:
    xs = data()
    one = acc_of(xs, [0, 97]).finalize()
    check(one, xs)
    blocks = acc_of(xs, [0, 1, 2, 30, 31, 96, 97]).finalize()
    check(blocks, xs)
    assert relerr(blocks.cross_products(), one.cross_products()) < 1e-13


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_merge_halves_equals_whole(dtype: type) -> None:
    xs = [x.astype(dtype) for x in data(seed=1)]
    whole = acc_of(xs, [0, 97]).finalize()
    a = acc_of([x[:40] for x in xs], [0, 40])
    b = acc_of([x[40:] for x in xs], [0, 20, 57])  # a different reference shift
    a.merge(b)
    assert a.n == 97
    merged = a.finalize()
    check(merged, xs)
    assert relerr(merged.cross_products(), whole.cross_products()) < 1e-12
    # Merging into an empty accumulator.
    e = _native.MomentAccumulator(DIMS)
    e.merge(acc_of(xs, [0, 97]))
    assert relerr(e.finalize().cross_products(), whole.cross_products()) < 1e-14
    with pytest.raises(MismatchError):
        _native.MomentAccumulator([5, 8]).merge(acc_of(xs, [0, 97]))


def test_bytes_and_pickle_round_trip() -> None:
    xs = data(seed=2)
    acc = acc_of(xs, [0, 50, 97])
    want = acc_of(xs, [0, 50, 97]).finalize()
    b = acc.to_bytes()
    back = _native.MomentAccumulator.from_bytes(b)
    assert back.n == 97 and back.dims == DIMS and back.names == ["a", "b", "c"]
    assert back.to_bytes() == b
    np.testing.assert_array_equal(back.finalize().cross_products(), want.cross_products())
    p = pickle.loads(pickle.dumps(acc))
    np.testing.assert_array_equal(p.finalize().cross_products(), want.cross_products())
    # The round-tripped accumulator keeps accumulating.
    more = _native.MomentAccumulator.from_bytes(acc_of([x[:50] for x in xs], [0, 50]).to_bytes())
    more.update([np.ascontiguousarray(x[50:]) for x in xs])
    assert relerr(more.finalize().cross_products(), want.cross_products()) < 1e-13


@pytest.mark.parametrize("garbage", [b"", b"hello world", b"LSMOMACC", b"\x00" * 200])
def test_from_bytes_garbage_is_format_error(garbage: bytes) -> None:
    with pytest.raises(FormatError):
        _native.MomentAccumulator.from_bytes(garbage)


def test_from_bytes_truncated_and_flipped() -> None:
    b = acc_of(data(20), [0, 20]).to_bytes()
    for cut in (8, 12, 30, len(b) - 1):
        with pytest.raises(FormatError):
            _native.MomentAccumulator.from_bytes(b[:cut])
    with pytest.raises(FormatError):
        _native.MomentAccumulator.from_bytes(b + b"\x00")
    for i in range(0, len(b), 7):  # never a crash; a FormatError or a (different) value
        c = bytearray(b)
        c[i] ^= 0xA5
        try:
            _native.MomentAccumulator.from_bytes(bytes(c))
        except FormatError:
            pass


def test_cov_zero_copy_read_only() -> None:
    m = acc_of(data(), [0, 97]).finalize()
    c1, c2 = m.cross_products(), m.cross_products()
    assert c1.dtype == np.float64 and c1.shape == (16, 16)
    assert np.shares_memory(c1, c2)  # both view the moments' buffer
    assert not c1.flags.writeable
    with pytest.raises(ValueError):
        c1[0, 0] = 1.0
    np.testing.assert_array_equal(c1, c1.T)
    want = c1.copy()
    del m, c2
    np.testing.assert_array_equal(c1, want)  # the view keeps the moments alive


def test_finalized_accumulator_and_errors() -> None:
    xs = data(10)
    acc = acc_of(xs, [0, 10])
    acc.finalize()
    with pytest.raises(Exception, match="finalised"):
        acc.update([np.ascontiguousarray(x) for x in xs])
    acc = _native.MomentAccumulator(DIMS, ["a", "b", "c"])
    bad = [np.ascontiguousarray(x) for x in xs]
    bad[1][4, 2] = np.inf
    with pytest.raises(NonFiniteError, match="'b'|\"b\".*row 4"):
        acc.update(bad)
    assert acc.n == 0
    with pytest.raises(MismatchError):
        acc.update([np.ascontiguousarray(x) for x in xs[:2]])
    with pytest.raises(InvalidArgumentError, match="no rows"):
        _native.MomentAccumulator(DIMS).finalize()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float64"])
def test_store_streaming_equals_arrays(tmp_path: Path, dtype: str) -> None:
    xs = data(301, seed=3)
    p = tmp_path / "s"
    s = write_store(p, {"a": xs[0], "b": xs[1], "c": xs[2]}, dtype=dtype, shard_bytes=4096)
    stored = [s.read(k, dtype=np.float64) for k in ("a", "b", "c")]
    ms, meta = compute_moments(p, progress=False, block_rows=37)
    assert meta["engine"] == "rust-stream" and meta["n"] == 301
    ma, meta_a = compute_moments(
        {"a": stored[0], "b": stored[1], "c": stored[2]}, progress=False, block_rows=64
    )
    assert meta_a["engine"] == "rust-arrays"
    check(ms, stored)
    assert relerr(ms.cross_products(), ma.cross_products()) < 1e-12
    np.testing.assert_allclose(
        ms.cka([0, 1, 2], [0, 1, 2], True), ma.cka([0, 1, 2], [0, 1, 2], True), rtol=1e-11
    )


def test_two_sources_and_plan(tmp_path: Path) -> None:
    xs = data(50, seed=4)
    pa = tmp_path / "a"
    pb = tmp_path / "b"
    write_store(pa, {"a": xs[0], "b": xs[1]}, dtype="float32")
    write_store(pb, {"c": xs[2]}, dtype="float32")
    m, _ = compute_moments(pa, None, pb, None, progress=False)
    assert (m.num_a, m.num_b) == (2, 1) and m.names == ["a", "b", "c"]
    write_store(tmp_path / "d", {"c": xs[2]}, dtype="float32", row_ids=np.arange(50) + 1)
    with pytest.raises(MismatchError, match="row 0"):
        compute_moments(pa, None, tmp_path / "d", progress=False)
    p = plan([768] * 13, None)
    assert p["accumulator_bytes"] >= (768 * 13 + 13) ** 2 * 8
    assert p["budget_source"] and p["budget_bytes"] > 0
    with pytest.raises(MemoryBudgetError, match="not even one layer of width 768"):
        plan([768] * 13, 1 << 20)
    with pytest.raises(MemoryBudgetError, match="at most 3 of these 13 layers"):
        plan([768] * 13, int(_native.pass_bytes([768] * 3, p["block_rows"], "float64")))


def test_fortran_ordered_blocks_are_refused_not_transposed() -> None:
    """rust-numpy's as_slice accepts Fortran-ordered arrays too; the row-major kernels would
    read them transposed (silently wrong moments). The bindings refuse them instead."""
    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((50, 4)), rng.standard_normal((50, 3))
    acc = _native.MomentAccumulator([4, 3])
    with pytest.raises(InvalidArgumentError, match="C-contiguous"):
        acc.update([np.asfortranarray(x), np.asfortranarray(y)])
    acc.update([x, y])  # the failed update changed nothing
    want = _native.MomentAccumulator([4, 3])
    want.update([np.ascontiguousarray(x), np.ascontiguousarray(y)])
    assert np.array_equal(acc.finalize().cross_products(), want.finalize().cross_products())
    # The public API converts any layout itself.
    a = layerscope.cka({"x": np.asfortranarray(x), "y": y}, progress=False).values
    b = layerscope.cka({"x": x, "y": y}, progress=False).values
    assert np.array_equal(a, b)


def test_arrays_of_every_layout_and_dtype_go_through_the_one_pass() -> None:
    """In-memory arrays are a row source like a store: float32/float64 and float16 arrays,
    row and column slices (read where they lie), Fortran-ordered and integer arrays (copied
    once) and CPU torch tensors all give the moments of the same values (numpy f64 reference)."""
    xs = data(401, seed=7)
    wide = np.concatenate([xs[1], np.full((401, 4), np.nan)], axis=1)
    f16 = xs[2].astype(np.float16)
    every_other = np.repeat(xs[0], 2, axis=0)[::2]
    inputs = {
        "a": every_other,                  # row-strided view
        "b": wide[:, :8],                  # column slice of a wider array (NaN beyond)
        "c": f16,                          # half precision, read as bit patterns
    }
    m, meta = compute_moments(inputs, progress=False, block_rows=50)
    assert meta["engine"] == "rust-arrays" and meta["n"] == 401
    check(m, [xs[0], xs[1], f16.astype(np.float64)])
    fortran = {k: np.asfortranarray(v) for k, v in inputs.items()}
    mf, _ = compute_moments(fortran, progress=False)
    assert relerr(mf.cross_products(), m.cross_products()) < 1e-12
    ints = np.round(xs[0]).astype(np.int32)
    mi, _ = compute_moments({"i": ints}, progress=False)
    assert relerr(mi.cross_products(), ref([ints])[0]) < 1e-12
    torch = pytest.importorskip("torch")
    mt, _ = compute_moments({k: torch.from_numpy(np.ascontiguousarray(v))
                             for k, v in inputs.items()}, progress=False)
    assert relerr(mt.cross_products(), m.cross_products()) < 1e-12


def test_array_sources_are_not_copied_whole() -> None:
    """A 16 MiB float32 column slice streams through the Rust reader in blocks: numpy
    allocates nothing near its size (tracemalloc sees numpy's allocations, not Rust's)."""
    import tracemalloc

    rng = np.random.default_rng(1)
    big = rng.standard_normal((16384, 300)).astype(np.float32)
    x = {"x": big[:, :256], "y": big[:, 256:]}
    tracemalloc.start()
    try:
        compute_moments(x, progress=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < big.nbytes // 8, peak
