"""Round trips, conversions, interoperability, atomicity and CLI of the activation store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import weakref
from pathlib import Path

import layerscope as ls
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from layerscope.cli import main as cli_main
from layerscope.errors import (
    InvalidArgumentError,
    MismatchError,
    MissingLayerError,
    NonFiniteError,
    StoreExistsError,
)

RNG = np.random.default_rng(0)


def _data(rows: int, dim: int, dtype=np.float32, offset: float = 300.0) -> np.ndarray:
    # LLM-like: large per-feature offsets on top of unit spread
    return (RNG.standard_normal((rows, dim)) + offset * RNG.standard_normal(dim)).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_roundtrip_exact_many_shards(tmp_path: Path, dtype) -> None:
    a, b = _data(97, 5, dtype), _data(97, 3, dtype)
    s = ls.write_store(tmp_path / "s", {"a": a, "b": b}, shard_bytes=500, metadata={"model": "m"})
    assert len(s.shards) > 5
    assert s.layers == ["a", "b"]
    assert s.dims == {"a": 5, "b": 3}
    assert s.dtypes == {"a": np.dtype(dtype).name, "b": np.dtype(dtype).name}
    assert len(s) == s.num_rows == 97
    assert s.complete
    assert s.metadata["model"] == "m"
    np.testing.assert_array_equal(s.read("a", dtype=dtype), a)
    np.testing.assert_array_equal(s.read("b", 13, 71, dtype=dtype), b[13:71])
    assert s.read("a", 5, 5).shape == (0, 5)
    idx = np.array([96, 0, 40, 40, 7])
    np.testing.assert_array_equal(s.take("b", idx, dtype=dtype), b[idx])
    np.testing.assert_array_equal(s.row_ids(), np.arange(97))
    blocks = list(s.blocks(["b"], block_rows=30, dtype=dtype))
    assert [st for st, _ in blocks] == [0, 30, 60, 90]
    np.testing.assert_array_equal(np.concatenate([blk["b"] for _, blk in blocks]), b)
    s.verify()
    again = ls.open(s.path, verify=True)
    assert again.shards == s.shards
    assert "rows=97" in repr(s) and "a[5]" in repr(s)


def test_f64_read_as_f32_rounds_to_nearest(tmp_path: Path) -> None:
    a = _data(10, 4, np.float64)
    s = ls.write_store(tmp_path / "s", {"a": a})
    np.testing.assert_array_equal(s.read("a"), a.astype(np.float32))


def test_bf16_f16_conversion_matches_torch_numpy(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    x = np.concatenate(
        [_data(50, 6), np.array([[0, -0.0, 1e-8, 65504, -3.3e38, 1e-3]], np.float32)]
    )
    sb = ls.write_store(tmp_path / "bf", {"x": x}, dtype="bfloat16", shard_bytes=200)
    want_b = torch.from_numpy(x).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(sb.read("x"), want_b)
    np.testing.assert_array_equal(sb.read("x", dtype=np.float64), want_b.astype(np.float64))
    sh = ls.write_store(tmp_path / "h", {"x": x}, dtype=np.float16)
    with np.errstate(over="ignore"):
        want_h = x.astype(np.float16)  # -3.3e38 overflows to -inf in both
    np.testing.assert_array_equal(sh.read("x"), want_h.astype(np.float32))
    # torch bf16 / numpy f16 inputs pass through bit-exactly
    t = torch.from_numpy(x).to(torch.bfloat16)
    st_ = ls.write_store(tmp_path / "tb", {"x": t})
    assert st_.dtypes == {"x": "bfloat16"}
    np.testing.assert_array_equal(st_.read("x"), t.float().numpy())
    sf = ls.write_store(tmp_path / "nf", {"x": want_h})
    assert sf.dtypes == {"x": "float16"}
    np.testing.assert_array_equal(sf.read("x", dtype="float64"), want_h.astype(np.float64))


def _bf16_nearest_even(x: float) -> float:
    """Independent reference: the bf16 value nearest to ``x`` (exact rational arithmetic),
    ties to the even significand."""
    from fractions import Fraction

    import torch

    guess = int(torch.tensor([x], dtype=torch.float32).to(torch.bfloat16).view(torch.int16)[0])
    cands = []
    for d in range(-2, 3):
        bits = np.array([(guess + d) & 0xFFFF], np.uint16)
        v = float((bits.astype(np.uint32) << 16).view(np.float32)[0])
        if np.isfinite(v):
            cands.append((abs(Fraction(v) - Fraction(x)), int(bits[0]) & 1, v))
    return min(cands)[2]


def test_f64_input_to_half_types_correctly_rounded(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    base = rng.standard_normal(200) * 300
    # near-ties: the midpoint of two bf16 / f16 neighbours, nudged by 2^-40 relative
    mids = []
    for v in base[:50]:
        b = np.array([v], np.float32).view(np.uint32) & 0xFFFF0000
        lo = float(b.view(np.float32)[0])
        hi = float((b + 0x10000).view(np.float32)[0])
        mids += [(lo + hi) / 2 * (1 + 2.0**-40), (lo + hi) / 2 * (1 - 2.0**-40)]
        h = np.float16(v)
        h2 = np.nextafter(h, np.float16(np.inf))
        mids += [(float(h) + float(h2)) / 2 * (1 + 2.0**-45)]
    x = np.concatenate([base, mids, [1 + 2.0**-8 + 2.0**-40, 1 + 2.0**-11 + 2.0**-45]])
    x = x.reshape(-1, 1)
    sh = ls.write_store(tmp_path / "h", {"x": x}, dtype="float16")
    np.testing.assert_array_equal(sh.read("x", dtype="f64")[:, 0], x[:, 0].astype(np.float16))
    sb = ls.write_store(tmp_path / "b", {"x": x}, dtype="bfloat16")
    want = [_bf16_nearest_even(float(v)) for v in x[:, 0]]
    np.testing.assert_array_equal(sb.read("x", dtype="f64")[:, 0], want)


def test_shards_readable_by_safetensors(tmp_path: Path) -> None:
    sn = pytest.importorskip("safetensors.numpy")
    a, b = _data(40, 5), _data(40, 2)
    s = ls.write_store(
        tmp_path / "s",
        {"a": a, "b": b},
        shard_bytes=600,
        dtype="float16",
        row_ids=np.arange(40) * 10,
        columns={"__label__": np.arange(40) % 3},
    )
    got_a, got_ids, got_lab = [], [], []
    for sh in s.shards:
        t = sn.load_file(str(s.path / sh["file"]))
        assert set(t) == {"a", "b", "__row_id__", "__label__"}
        got_a.append(t["a"])
        got_ids.append(t["__row_id__"])
        got_lab.append(t["__label__"])
    np.testing.assert_array_equal(np.concatenate(got_a), a.astype(np.float16))
    np.testing.assert_array_equal(np.concatenate(got_ids), np.arange(40) * 10)
    np.testing.assert_array_equal(np.concatenate(got_lab), np.arange(40) % 3)
    np.testing.assert_array_equal(s.column("__label__"), np.arange(40) % 3)
    assert s.column("__sample__") is None


def test_bf16_shards_readable_by_safetensors_torch(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    stt = pytest.importorskip("safetensors.torch")
    x = _data(30, 4)
    s = ls.write_store(tmp_path / "s", {"x": x}, dtype="bfloat16", shard_bytes=100)
    parts = [stt.load_file(str(s.path / sh["file"]))["x"] for sh in s.shards]
    got = torch.cat(parts)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, torch.from_numpy(x).to(torch.bfloat16))


_DTYPES = ["float16", "bfloat16", "float32", "float64"]


def _expected(x: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "float16":
        return x.astype(np.float16).astype(np.float64)
    if dtype == "bfloat16":
        import torch

        return torch.from_numpy(x).to(torch.bfloat16).double().numpy()
    return x.astype(dtype).astype(np.float64)


@settings(max_examples=40, deadline=None)
@given(
    dtype=st.sampled_from(_DTYPES),
    rows=st.integers(1, 40),
    dims=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    shard_bytes=st.sampled_from([1, 64, 300, 1 << 20]),
    split=st.integers(0, 40),
    seed=st.integers(0, 2**32 - 1),
)
def test_hypothesis_roundtrip(
    tmp_path_factory, dtype, rows, dims, shard_bytes, split, seed
) -> None:
    pytest.importorskip("torch")
    rng = np.random.default_rng(seed)
    arrays = {
        f"l{i}": (rng.standard_normal((rows, d)) * 10).astype(np.float32)
        for i, d in enumerate(dims)
    }
    ids = rng.permutation(rows).astype(np.int64) - 5
    path = tmp_path_factory.mktemp("h") / "s"
    split = min(split, rows)
    with ls.StoreWriter(path, dtype=dtype, shard_bytes=shard_bytes) as w:
        for lo, hi in [(0, split), (split, rows)]:
            if hi > lo:
                w.append({k: v[lo:hi] for k, v in arrays.items()}, row_ids=ids[lo:hi])
        assert w.rows_written == rows
    s = w.store
    assert s is not None and s.num_rows == rows
    if shard_bytes == 1:
        assert len(s.shards) == rows
    np.testing.assert_array_equal(s.row_ids(), ids)
    for k, v in arrays.items():
        want = _expected(v, dtype)
        np.testing.assert_array_equal(s.read(k, dtype=np.float64), want)
        np.testing.assert_array_equal(s.read(k, dtype=np.float32), want.astype(np.float32))
        idx = rng.integers(0, rows, size=5)
        np.testing.assert_array_equal(s.take(k, idx), want[idx])


def test_nonfinite_reported(tmp_path: Path) -> None:
    a = _data(30, 3)
    a[17, 2] = np.nan
    a[25, 0] = np.inf
    s = ls.write_store(
        tmp_path / "s", {"a": a, "b": _data(30, 2)}, shard_bytes=100, dtype="bfloat16"
    )
    assert s.find_nonfinite("a") == 17
    assert s.find_nonfinite("b") is None
    assert np.isnan(s.read("a")[17, 2])  # reported, never silently dropped
    with pytest.raises(NonFiniteError, match=r"layer 'a'.*row 17"):
        s.check_finite()
    s.check_finite("b")


def test_missing_layer_and_bad_args(tmp_path: Path) -> None:
    s = ls.write_store(tmp_path / "s", {"a": _data(5, 2), "b": _data(5, 2)})
    with pytest.raises(MissingLayerError, match="available: a, b"):
        s.read("zz")
    with pytest.raises(KeyError):
        s.take("zz", [0])
    with pytest.raises(InvalidArgumentError):
        s.read("a", 3, 9)
    with pytest.raises(InvalidArgumentError):
        s.read("a", -1, 2)
    with pytest.raises(InvalidArgumentError):
        s.take("a", [5])
    with pytest.raises(InvalidArgumentError):
        s.take("a", [-1])
    with pytest.raises(InvalidArgumentError):
        s.read("a", dtype=np.int32)
    with pytest.raises(InvalidArgumentError):
        ls.write_store(tmp_path / "x", {"a": np.zeros(5)})
    with pytest.raises(InvalidArgumentError):
        ls.write_store(tmp_path / "y", {})
    with pytest.raises(InvalidArgumentError):
        ls.write_store(tmp_path / "z", {"a": _data(4, 2)}, dtype="int8")


def test_writer_mismatch_and_exists(tmp_path: Path) -> None:
    p = tmp_path / "s"
    with ls.StoreWriter(p) as w:
        w.append({"a": _data(4, 3), "b": _data(4, 2)})
        with pytest.raises(MismatchError):
            w.append({"a": _data(4, 3)})
        with pytest.raises(MismatchError):
            w.append({"a": _data(4, 4), "b": _data(4, 2)})
        with pytest.raises(MismatchError):
            w.append({"a": _data(4, 3), "b": _data(5, 2)})
        with pytest.raises(MismatchError):
            w.append({"a": _data(4, 3), "b": _data(4, 2)}, row_ids=[1, 2])
        # order of keys may differ
        w.append({"b": _data(2, 2), "a": _data(2, 3)})
    assert ls.open(p).num_rows == 6
    (p / "notes.txt").write_text("mine")
    with pytest.raises(StoreExistsError):
        ls.write_store(p, {"a": _data(3, 3)})
    with pytest.raises(FileExistsError):  # builtin base class
        ls.StoreWriter(p)
    s = ls.write_store(p, {"c": _data(3, 1)}, overwrite=True)
    assert s.layers == ["c"] and s.num_rows == 3
    assert (p / "notes.txt").read_text() == "mine"  # unrelated files are never deleted
    assert sorted(f.name for f in p.iterdir()) == [
        ".layerscope.lock",  # the writers' lock (not part of the store; FORMAT.md)
        "layerscope.json",
        "notes.txt",
        "shard-00000.safetensors",
    ]


def test_exception_inside_with_keeps_finished_shards(tmp_path: Path) -> None:
    p = tmp_path / "s"
    a = _data(25, 4)
    with pytest.raises(RuntimeError, match="boom"):
        with ls.StoreWriter(p, shard_bytes=10 * (4 * 4 + 8)) as w:
            w.append({"a": a})
            raise RuntimeError("boom")
    s = ls.open(p)
    assert not s.complete and s.num_rows == 20  # 2 finished shards of 10; 5 buffered rows lost
    np.testing.assert_array_equal(s.read("a"), a[:20])
    s.verify()
    assert "incomplete" in repr(s)


def test_killed_process_leaves_valid_store(tmp_path: Path) -> None:
    p = tmp_path / "s"
    code = f"""
import os, numpy as np, layerscope as ls
w = ls.StoreWriter({str(p)!r}, shard_bytes=8 * (3 * 8 + 8))
for i in range(5):
    w.append({{"a": np.full((7, 3), float(i))}})
os._exit(3)
"""
    r = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    )
    assert r.returncode == 3
    s = ls.open(p)
    assert s.num_rows == 32 and not s.complete
    np.testing.assert_array_equal(
        s.read("a", dtype=np.float64)[:, 0], np.repeat(np.arange(5.0), 7)[:32]
    )
    assert not [f for f in p.iterdir() if f.name.endswith(".tmp")]


_KILL_WRITER = """
import sys, numpy as np, layerscope as ls
path, dim = sys.argv[1], 64
w = ls.StoreWriter(path, dtype="float32", shard_bytes=40 * (4 * dim + 8))
i = 0
while True:  # row r holds r in every column: any torn write would show
    rows = np.arange(i, i + 17, dtype=np.float64)
    w.append({"a": np.repeat(rows[:, None], dim, axis=1)}, row_ids=np.arange(i, i + 17) * 3)
    i += 17
    if i % 170 == 0:
        print(w._native.rows_committed, flush=True)
"""


def test_kill_9_mid_write_leaves_valid_store(tmp_path: Path) -> None:
    import signal

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    for attempt, wait_rows in enumerate([200, 900, 2500]):
        p = tmp_path / f"s{attempt}"
        proc = subprocess.Popen(
            [sys.executable, "-c", _KILL_WRITER, str(p)], stdout=subprocess.PIPE, env=env, text=True
        )
        try:
            assert proc.stdout is not None
            for line in proc.stdout:  # wait until some shards are committed, then SIGKILL
                if int(line) >= wait_rows:
                    break
            os.kill(proc.pid, signal.SIGKILL)  # mid-append: buffers, temp files, renames
        finally:
            proc.kill()
            proc.wait()
        assert proc.returncode == -signal.SIGKILL
        s = ls.open(p, verify=True)  # structure + every sha256
        assert not s.complete
        n = s.num_rows
        assert n >= wait_rows and n % 40 == 0  # only whole shards of 40 rows
        assert all(sh["rows"] == 40 for sh in s.shards)
        a = s.read("a", dtype=np.float64)
        np.testing.assert_array_equal(a, np.repeat(np.arange(n, dtype=np.float64)[:, None], 64, 1))
        np.testing.assert_array_equal(s.row_ids(), np.arange(n) * 3)
        # leftovers are at most hidden temp files / one unlisted finished shard; overwriting
        # the interrupted store removes them
        listed = {sh["file"] for sh in s.shards} | {"layerscope.json"}
        extra = {f.name for f in p.iterdir()} - listed
        assert all(e.startswith(".") or e.startswith("shard-") for e in extra), extra
        ls.write_store(p, {"b": np.ones((3, 2))}, overwrite=True)
        assert sorted(f.name for f in p.iterdir()) == [
            ".layerscope.lock", "layerscope.json", "shard-00000.safetensors"]


def test_ctrl_c_interrupts_long_append(tmp_path: Path) -> None:
    import signal

    p = tmp_path / "s"
    # 10 rows a shard: 10 000 shards (seconds of work); the "Ctrl-C" lands after 0.3 s.
    x = np.repeat(np.arange(100_000, dtype=np.float32)[:, None], 16, axis=1)
    w = ls.StoreWriter(p, shard_bytes=10 * (16 * 4 + 8))
    # SIGALRM from the kernel, handled by Python's own Ctrl-C handler (it raises
    # KeyboardInterrupt): unlike a watcher thread it needs no GIL to be delivered, so it
    # lands however busy the machine is.
    old = signal.signal(signal.SIGALRM, signal.default_int_handler)
    signal.setitimer(signal.ITIMER_REAL, 0.3)
    try:
        with pytest.raises(KeyboardInterrupt):  # raised by the Rust writer between shards
            w.append({"a": x})
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    s = ls.open(p, verify=True)
    assert not s.complete and 20 <= s.num_rows < 100_000 and s.num_rows % 10 == 0
    np.testing.assert_array_equal(s.read("a")[:, 3], np.arange(s.num_rows, dtype=np.float32))
    with pytest.raises(InvalidArgumentError, match="stopped part-way"):
        w.close()


def test_blocks_release_and_read_block(tmp_path: Path) -> None:
    a, b, c = _data(103, 7), _data(103, 2), _data(103, 1)
    s = ls.write_store(tmp_path / "s", {"a": a, "b": b, "c": c}, dtype="bfloat16", shard_bytes=700)
    assert len(s.shards) == 5  # 25 rows a shard: blocks straddle shard boundaries
    want = {k: _expected(v, "bfloat16") for k, v in {"a": a, "b": b, "c": c}.items()}
    for layers in (None, ["c"], ["c", "a"], ["b", "b"]):
        for br in (1, 10, 103, 500):
            for release in (True, False):
                got = list(s.blocks(layers, block_rows=br, dtype=np.float64, release=release))
                names = list(s.layers if layers is None else layers)
                assert [st for st, _ in got] == list(range(0, 103, br))
                assert all(list(blk) == list(dict.fromkeys(names)) for _, blk in got)
                for n in names:
                    cat = np.concatenate([blk[n] for _, blk in got])
                    np.testing.assert_array_equal(cat, want[n])
                    assert all(blk[n].dtype == np.float64 for _, blk in got)
    default = list(s.blocks(["c"], dtype=np.float64))  # ~16 MiB blocks: one here
    assert len(default) == 1 and default[0][1]["c"].shape == (103, 1)
    blk = s.read_block(["b", "a"], 17, 60)
    assert list(blk) == ["b", "a"] and blk["a"].dtype == np.float32
    np.testing.assert_array_equal(blk["a"], want["a"][17:60].astype(np.float32))
    s.release()
    s.release(3, 4)
    np.testing.assert_array_equal(s.read("b", dtype="float64"), want["b"])  # still readable
    with pytest.raises(InvalidArgumentError):
        s.release(0, 104)
    with pytest.raises(MissingLayerError):
        next(s.blocks(["zz"]))
    with pytest.raises(InvalidArgumentError):
        next(s.blocks(block_rows=0))
    with pytest.raises(InvalidArgumentError):
        s.read_block(["a"], 5, 2)


def test_fresh_blocks_refill_only_what_nobody_holds(tmp_path: Path) -> None:
    """Fresh blocks (reuse=False): the arrays of blocks the caller dropped are refilled
    (their memory is already mapped), never one that is kept — in a list, through a view,
    through a memoryview — nor one made read-only; every block read is right."""
    a, b = _data(100, 7), _data(100, 3)
    s = ls.write_store(tmp_path / "s", {"a": a, "b": b}, dtype="bfloat16", shard_bytes=900)
    want = {k: _expected(v, "bfloat16") for k, v in {"a": a, "b": b}.items()}

    def ptr(x: np.ndarray) -> int:
        return int(x.__array_interface__["data"][0])

    # A loop that lets go of each block: two arrays per layer alternate (the iterator's
    # pool keeps them alive; without it the first would be gone).
    refs, got = [], []
    it = s.blocks(block_rows=10, dtype=np.float32)
    for _r0, blk in it:
        refs.append(weakref.ref(blk["a"]))
        got.append(blk["a"].copy())
        assert blk["a"].flags.owndata and blk["a"].flags.writeable
    del blk
    first, second = refs[0](), refs[1]()
    assert first is not None and second is not None and first is not second
    assert all(r() is (first if i % 2 == 0 else second) for i, r in enumerate(refs))
    del first, second
    np.testing.assert_array_equal(np.concatenate(got), want["a"])
    # Kept blocks are never touched again (all different, all right).
    kept = list(s.blocks(block_rows=10, dtype=np.float64))
    assert len({ptr(blk["b"]) for _, blk in kept}) == 10
    for k in ("a", "b"):
        np.testing.assert_array_equal(np.concatenate([blk[k] for _, blk in kept]), want[k])
    # A view, a memoryview or a read-only flag keeps a block's memory from being refilled.
    views, mems = [], []
    it = s.blocks(block_rows=10, dtype=np.float32)
    for i, (r0, blk) in enumerate(it):
        if i % 3 == 0:
            views.append((r0, blk["a"][2:5]))
        elif i % 3 == 1:
            mems.append((r0, memoryview(blk["b"])))
        else:
            blk["a"].setflags(write=False)
        del blk
    for r0, v in views:
        np.testing.assert_array_equal(v, want["a"][r0 + 2:r0 + 5])
    for r0, m in mems:
        np.testing.assert_array_equal(np.asarray(m), want["b"][r0:r0 + 10])


def test_blocks_reuse_refills_one_buffer(tmp_path: Path) -> None:
    a, b = _data(103, 7), _data(103, 3)
    s = ls.write_store(tmp_path / "s", {"a": a, "b": b}, dtype="float16", shard_bytes=700)
    want = {k: _expected(v, "float16") for k, v in {"a": a, "b": b}.items()}
    for dtype in (np.float32, np.float64):
        for br in (1, 10, 103, 500):
            fresh = [(r0, {k: v.copy() for k, v in blk.items()})
                     for r0, blk in s.blocks(block_rows=br, dtype=dtype)]
            seen, bases = [], set()
            for r0, blk in s.blocks(block_rows=br, dtype=dtype, reuse=True):
                assert all(v.dtype == dtype for v in blk.values())
                bases.add(id(blk["a"].base))
                seen.append((r0, {k: v.copy() for k, v in blk.items()}))
            assert len(bases) == 1  # one buffer, refilled
            assert [x for x, _ in seen] == [x for x, _ in fresh]
            for (_, got), (_, ref) in zip(seen, fresh):
                for k in ("a", "b"):
                    np.testing.assert_array_equal(got[k], ref[k])
            for k in ("a", "b"):
                np.testing.assert_array_equal(
                    np.concatenate([blk[k] for _, blk in seen]), want[k].astype(dtype))
    nat = s._native
    with pytest.raises(InvalidArgumentError):  # wrong shape
        nat.read_block_into(["a"], 0, 5, [np.empty((4, 7), np.float32)])
    with pytest.raises(InvalidArgumentError):  # mixed dtypes
        nat.read_block_into(["a", "b"], 0, 5, [np.empty((5, 7), np.float32),
                                               np.empty((5, 3), np.float64)])
    with pytest.raises(InvalidArgumentError):  # not C-contiguous
        nat.read_block_into(["a"], 0, 5, [np.empty((7, 5), np.float32).T])
    with pytest.raises(InvalidArgumentError):
        nat.read_block_into(["a"], 0, 5, [])


def test_torch_inputs_to_writer(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    x = torch.from_numpy(_data(12, 6))
    with ls.StoreWriter(tmp_path / "s") as w:
        w.append(
            {
                "bf": x.to(torch.bfloat16),
                "h": x.to(torch.float16),
                "f": x.requires_grad_(True)[:, ::2],  # grad + non-contiguous view
                "d": x.detach().double().t().contiguous().t(),  # Fortran order
                "i": torch.arange(24).reshape(12, 2),
            },
            row_ids=torch.arange(12) + 100,
            columns={"__label__": torch.arange(12) % 2},
        )
    s = w.store
    assert s is not None
    assert s.dtypes == {
        "bf": "bfloat16",
        "h": "float16",
        "f": "float32",
        "d": "float64",
        "i": "float64",
    }
    xd = x.detach()
    np.testing.assert_array_equal(s.read("bf"), xd.to(torch.bfloat16).float().numpy())
    np.testing.assert_array_equal(s.read("h"), xd.to(torch.float16).float().numpy())
    np.testing.assert_array_equal(s.read("f"), xd[:, ::2].numpy())
    np.testing.assert_array_equal(s.read("d", dtype="float64"), xd.double().numpy())
    np.testing.assert_array_equal(s.read("i", dtype="float64"), np.arange(24.0).reshape(12, 2))
    np.testing.assert_array_equal(s.row_ids(), np.arange(12) + 100)
    np.testing.assert_array_equal(s.column("__label__"), np.arange(12) % 2)
    # a torch bf16 store dtype converts f32 input like torch does
    t = ls.write_store(tmp_path / "t", {"x": xd}, dtype=torch.bfloat16)
    np.testing.assert_array_equal(t.read("x"), xd.to(torch.bfloat16).float().numpy())
    with pytest.raises(InvalidArgumentError):
        ls.write_store(tmp_path / "c", {"x": torch.zeros(3, 2, dtype=torch.complex64)})


def test_big_endian_and_fortran_numpy_inputs(tmp_path: Path) -> None:
    x = _data(9, 4, np.float64)
    s = ls.write_store(
        tmp_path / "s",
        {"be": x.astype(">f8"), "be16": x.astype(">f2"), "fo": np.asfortranarray(x)},
    )
    assert s.dtypes == {"be": "float64", "be16": "float16", "fo": "float64"}
    np.testing.assert_array_equal(s.read("be", dtype="f64"), x)
    np.testing.assert_array_equal(s.read("fo", dtype="f64"), x)
    np.testing.assert_array_equal(s.read("be16"), x.astype(np.float16).astype(np.float32))


def test_writer_from_background_thread(tmp_path: Path) -> None:
    p = tmp_path / "s"
    batches = [_data(50, 16) for _ in range(20)]
    w = ls.StoreWriter(p, dtype="bfloat16", shard_bytes=20_000)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            for b in batches:
                w.append({"x": b})
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    busy = sum(float(np.linalg.norm(b)) for b in batches)  # main thread keeps working
    t.join()
    assert not errors and busy > 0
    s = w.close()
    assert s.num_rows == 1000
    np.testing.assert_array_equal(
        s.read("x")[950:], _expected(batches[-1], "bfloat16").astype(np.float32)
    )


def test_cli_info(tmp_path: Path, capsys) -> None:
    p = tmp_path / "s"
    ls.write_store(
        p,
        {"enc.0": _data(12, 3), "enc.1": _data(12, 5)},
        dtype="bfloat16",
        metadata={"model": "tiny"},
        columns={"__sample__": np.arange(12) // 3},
    )
    assert cli_main(["info", str(p)]) == 0
    out = capsys.readouterr().out
    assert "rows     12" in out and "enc.1" in out and "bfloat16" in out and "__sample__" in out
    assert "tiny" in out
    assert cli_main(["info", str(p), "--json", "--verify"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["num_rows"] == 12
    assert [layer["dim"] for layer in info["layers"]] == [3, 5]
    assert info["bytes"] == sum(sh["bytes"] for sh in info["shards"])
    assert cli_main(["info", str(tmp_path / "nope")]) == 2
    assert "nope" in capsys.readouterr().err
    assert cli_main(["verify", str(p), "--finite"]) == 0
    assert "ok:" in capsys.readouterr().out
    shard = p / "shard-00000.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 1
    shard.write_bytes(bytes(raw))
    assert cli_main(["info", str(p)]) == 0  # sizes/headers fine; sha256 only on request
    capsys.readouterr()
    assert cli_main(["verify", str(p)]) == 2
    assert "sha256" in capsys.readouterr().err
    q = tmp_path / "nan"
    ls.write_store(q, {"x": np.array([[1.0, np.nan], [2.0, 3.0]])})
    assert cli_main(["verify", str(q)]) == 0
    capsys.readouterr()
    assert cli_main(["verify", str(q), "--finite"]) == 2
    assert "row 0" in capsys.readouterr().err


def test_cli_entry_point(tmp_path: Path) -> None:
    p = tmp_path / "s"
    ls.write_store(p, {"x": _data(5, 3)}, metadata={"model": "m"})
    exe = Path(sys.executable).with_name("layerscope")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "layerscope"]
    r = subprocess.run([*cmd, "info", str(p)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for word in ("rows     5", "shards   1", "dim      3", "float32", '"model": "m"'):
        assert word in r.stdout, r.stdout
