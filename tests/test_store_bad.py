"""Every bad store input gives a clear typed error naming the file and tensor; nothing panics."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import layerscope as ls
import numpy as np
import pytest
from layerscope.errors import (
    FormatError,
    LayerscopeError,
    MismatchError,
    StoreExistsError,
    StoreLockedError,
    StoreNotFoundError,
)

SHARD = "shard-00000.safetensors"


def _store(tmp_path: Path, name: str = "s", **kw: Any) -> Path:
    p = tmp_path / name
    rng = np.random.default_rng(1)
    ls.write_store(
        p,
        {
            "a": rng.standard_normal((6, 3)).astype(np.float32),
            "b": rng.standard_normal((6, 5)).astype(np.float32),
        },
        **kw,
    )
    return p


def _shard_bytes(header: dict[str, Any], data: bytes) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


def _entry(dtype: str, shape: list[int], start: int, stop: int) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [start, stop]}


def _good_header() -> dict[str, Any]:
    return {
        "__row_id__": _entry("I64", [6], 0, 48),
        "a": _entry("F32", [6, 3], 48, 120),
        "b": _entry("F32", [6, 5], 120, 240),
    }


def _edit_manifest(p: Path, fn) -> None:
    m = json.loads((p / "layerscope.json").read_text())
    fn(m)
    (p / "layerscope.json").write_text(json.dumps(m))


def _expect(p: Path, cls: type, *words: str) -> str:
    with pytest.raises(cls) as ei:
        ls.open(p)
    msg = str(ei.value)
    for w in words:
        assert w in msg, msg
    return msg


def test_sanity_handmade_shard_is_valid(tmp_path: Path) -> None:
    p = _store(tmp_path)
    raw = _shard_bytes(_good_header(), bytes(240))
    (p / SHARD).write_bytes(raw)
    _edit_manifest(p, lambda m: m["shards"][0].update(bytes=len(raw)))
    s = ls.open(p)
    assert s.read("a").shape == (6, 3)


def test_truncated_shard(tmp_path: Path) -> None:
    p = _store(tmp_path)
    raw = (p / SHARD).read_bytes()
    (p / SHARD).write_bytes(raw[:-7])
    _expect(p, FormatError, SHARD, "truncated")
    (p / SHARD).write_bytes(raw[:5])
    _expect(p, FormatError, SHARD, "too short")


def test_header_length_beyond_file(tmp_path: Path) -> None:
    p = _store(tmp_path)
    raw = bytearray((p / SHARD).read_bytes())
    raw[:8] = struct.pack("<Q", len(raw))
    (p / SHARD).write_bytes(bytes(raw))
    _expect(p, FormatError, SHARD, "beyond the end of the file")


def test_header_too_large(tmp_path: Path) -> None:
    p = _store(tmp_path)
    raw = bytearray((p / SHARD).read_bytes())
    raw[:8] = struct.pack("<Q", 200_000_000)
    (p / SHARD).write_bytes(bytes(raw))
    _expect(p, FormatError, SHARD, "100 MB")


def test_header_not_utf8_or_not_object(tmp_path: Path) -> None:
    p = _store(tmp_path)
    (p / SHARD).write_bytes(struct.pack("<Q", 4) + b"{\xff\xfe}")
    _expect(p, FormatError, SHARD, "UTF-8")
    (p / SHARD).write_bytes(struct.pack("<Q", 6) + b"[1, 2]")
    _expect(p, FormatError, SHARD, "JSON object")
    (p / SHARD).write_bytes(struct.pack("<Q", 5) + b'{"a":')
    _expect(p, FormatError, SHARD, "not valid JSON")


def _bad_header(tmp_path: Path, name: str, header: dict[str, Any], data_len: int) -> Path:
    p = _store(tmp_path, name)
    (p / SHARD).write_bytes(_shard_bytes(header, bytes(data_len)))
    return p


def test_unknown_dtype(tmp_path: Path) -> None:
    h = _good_header()
    h["a"]["dtype"] = "Q7"
    _expect(
        _bad_header(tmp_path, "d", h, 240),
        FormatError,
        SHARD,
        '"a"',
        "unknown dtype",
    )
    h = _good_header()
    h["a"]["dtype"] = "I32"  # a safetensors dtype, not allowed for a layer
    h["a"]["shape"] = [6, 3]
    p = _bad_header(tmp_path, "i", h, 240)
    msg = _expect(p, MismatchError, SHARD, '"a"', "I32")
    assert "F32" in msg


def test_offsets(tmp_path: Path) -> None:
    h = _good_header()
    h["b"]["data_offsets"] = [100, 220]
    h["b"]["shape"] = [6, 5]
    _expect(_bad_header(tmp_path, "o", h, 240), FormatError, SHARD, "overlap")
    h = _good_header()
    h["b"]["data_offsets"] = [128, 248]
    _expect(_bad_header(tmp_path, "g", h, 248), FormatError, SHARD, "not contiguous")
    h = _good_header()
    _expect(_bad_header(tmp_path, "b", h, 200), FormatError, SHARD, '"b"', "out of bounds")
    _expect(_bad_header(tmp_path, "t", h, 250), FormatError, SHARD, "trailing bytes")


def test_shape_times_dtype_not_bytes(tmp_path: Path) -> None:
    h = _good_header()
    h["b"]["shape"] = [6, 4]
    _expect(_bad_header(tmp_path, "x", h, 240), FormatError, SHARD, '"b"', "96 bytes", "120 bytes")


def test_rows_differ_across_layers(tmp_path: Path) -> None:
    h = _good_header()
    h["b"] = _entry("F32", [4, 5], 120, 200)
    _expect(_bad_header(tmp_path, "r", h, 200), FormatError, SHARD, "rows differ across layers")


def test_row_id_and_columns(tmp_path: Path) -> None:
    h = _good_header()
    del h["__row_id__"]
    h["a"]["data_offsets"] = [0, 72]
    h["b"]["data_offsets"] = [72, 192]
    _expect(_bad_header(tmp_path, "n", h, 192), FormatError, SHARD, "__row_id__", "missing")
    h = _good_header()
    h["__row_id__"]["dtype"] = "F64"
    _expect(
        _bad_header(tmp_path, "f", h, 240), FormatError, SHARD, "__row_id__", "expected I64 [6]"
    )
    h = _good_header()
    h["extra"] = _entry("F32", [6, 1], 240, 264)
    _expect(
        _bad_header(tmp_path, "e", h, 264), MismatchError, SHARD, '"extra"', "not in the manifest"
    )


@pytest.mark.parametrize(
    ("what", "edit", "words"),
    [
        ("rows", lambda m: (m["shards"][0].update(rows=5), m.update(num_rows=5)), ["5"]),
        ("dim", lambda m: m["layers"][1].update(dim=4), ['"b"', "dim 5", "4"]),
        ("dtype", lambda m: m["layers"][0].update(dtype="BF16"), ['"a"', "F32", "BF16"]),
        ("bytes", lambda m: m["shards"][0].update(bytes=10), ["bytes"]),
    ],
)
def test_manifest_disagrees_with_shard(tmp_path: Path, what, edit, words) -> None:
    p = _store(tmp_path)
    _edit_manifest(p, edit)
    _expect(p, MismatchError, SHARD, *words)


def test_checksum_mismatch(tmp_path: Path) -> None:
    p = _store(tmp_path)
    raw = bytearray((p / SHARD).read_bytes())
    raw[-1] ^= 0xFF  # flip a data bit: header still valid
    (p / SHARD).write_bytes(bytes(raw))
    s = ls.open(p)  # sizes are checked on open, checksums on request
    with pytest.raises(MismatchError, match="sha256"):
        s.verify()
    # verify=True: opening stays cheap; every read checks the shards it touches first
    v = ls.open(p, verify=True)
    assert v.verified and not s.verified
    for read in (lambda: v.read("a"), lambda: ls.cka(v), lambda: ls.spectrum(v),
                 lambda: v.row_ids()):
        with pytest.raises(MismatchError, match=SHARD):
            read()
    ls.cka(s)  # without verification the changed bytes are read as they are


def test_a_shard_changed_after_opening_is_an_error_not_a_crash(tmp_path: Path) -> None:
    """Truncated after the store was opened: the mapped pages past the new end would kill
    the process with SIGBUS; each read checks the shard is the file opened, unchanged."""
    for verify in (False, True):
        p = _store(tmp_path, f"t{verify}")
        s = ls.open(p, verify=verify)
        before = ls.cka(s, progress=False).values
        os.truncate(p / SHARD, 100)
        reads = (lambda s: s.read("b"), lambda s: ls.cka(s, progress=False),
                 lambda s: s.take("a", np.array([5])), lambda s: s.check_finite(),
                 lambda s: ls.intrinsic_dimension(s, method="pca", progress=False))
        for read in reads:
            with pytest.raises(MismatchError, match="truncated") as ei:
                read(s)
            assert SHARD in str(ei.value) and "reopen" in str(ei.value)
        assert before.shape == (2, 2)
    p = _store(tmp_path, "m")
    s = ls.open(p)
    raw = bytearray((p / SHARD).read_bytes())
    raw[-1] ^= 1
    os.utime(p / SHARD, ns=(0, 10**9))  # another modification time, same size
    (p / SHARD).write_bytes(bytes(raw))
    with pytest.raises(MismatchError, match="was modified"):
        ls.cka(s)
    assert ls.cka(ls.open(p), progress=False).values.shape == (2, 2)  # reopened: read as it now is


def test_cli_verify_checks_every_shard_it_reads(tmp_path: Path, capsys) -> None:
    from layerscope.cli import main

    p = _store(tmp_path, shard_bytes=100)
    assert main(["cka", str(p), "--verify", "-q"]) == 0
    raw = bytearray((p / "shard-00001.safetensors").read_bytes())
    raw[-1] ^= 0xFF
    (p / "shard-00001.safetensors").write_bytes(bytes(raw))
    capsys.readouterr()
    assert main(["cka", str(p), "-q"]) == 0  # the structure is intact: read unverified
    for cmd in (["cka", str(p), str(p)], ["spectrum", str(p)], ["align", str(p)],
                ["id", str(p), "--method", "pca"]):
        assert main([*cmd, "--verify", "-q"]) == 2, cmd
        err = capsys.readouterr().err
        assert "sha256" in err and "shard-00001" in err, err
    assert main(["report", str(p), "-o", str(tmp_path / "r"), "--verify", "-q"]) == 2
    assert main(["verify", str(p)]) == 2
    assert main(["info", str(p), "--verify"]) == 2


def test_missing_shard_and_store(tmp_path: Path) -> None:
    p = _store(tmp_path, shard_bytes=100)
    os.remove(p / "shard-00001.safetensors")
    _expect(p, StoreNotFoundError, "shard-00001.safetensors", "missing")
    with pytest.raises(FileNotFoundError):
        ls.open(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    _expect(tmp_path / "empty", StoreNotFoundError, "layerscope.json")


def test_bad_manifests(tmp_path: Path) -> None:
    p = _store(tmp_path)
    _edit_manifest(p, lambda m: m["layers"].append(dict(m["layers"][0])))
    _expect(p, FormatError, "layerscope.json", "duplicate layer name", '"a"')
    for text, words in [
        (b"\xff\x00", ["UTF-8"]),
        (b"[1]", ["JSON object"]),
        (b"{", ["not valid JSON"]),
    ]:
        (p / "layerscope.json").write_bytes(text)
        _expect(p, FormatError, "layerscope.json", *words)
    p = _store(tmp_path, "v")
    _edit_manifest(p, lambda m: m.update(format_version=2))
    _expect(p, FormatError, "format_version 2")
    p = _store(tmp_path, "u")
    _edit_manifest(p, lambda m: m["layers"][0].update(dtype="F8"))
    _expect(p, FormatError, "unknown dtype", '"F8"')


@pytest.mark.parametrize(
    "name", ["../outside.safetensors", "/etc/passwd", "sub/shard.safetensors", ".."]
)
def test_file_name_escaping_store(tmp_path: Path, name: str) -> None:
    p = _store(tmp_path)
    _edit_manifest(p, lambda m: m["shards"][0].update(file=name))
    _expect(p, FormatError, "plain file name")


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symlinks on this platform")
def test_symlink_out_of_store(tmp_path: Path) -> None:
    p = _store(tmp_path)
    outside = tmp_path / "elsewhere.safetensors"
    os.replace(p / SHARD, outside)
    os.symlink(outside, p / SHARD)
    _expect(p, FormatError, SHARD, "outside the store folder")


def test_existing_store_without_overwrite(tmp_path: Path) -> None:
    p = _store(tmp_path)
    before = sorted(f.name for f in p.iterdir())
    with pytest.raises(StoreExistsError, match="overwrite"):
        _store(tmp_path)
    assert sorted(f.name for f in p.iterdir()) == before
    ls.open(p)  # untouched and valid
    f = tmp_path / "plain"
    f.write_text("x")
    with pytest.raises(StoreExistsError):
        ls.write_store(f, {"a": np.zeros((2, 2))}, overwrite=True)
    assert f.read_text() == "x"


def test_all_errors_are_layerscope_errors(tmp_path: Path) -> None:
    p = _store(tmp_path)
    (p / SHARD).write_bytes(b"\x00" * 3)
    with pytest.raises(LayerscopeError):
        ls.open(p)


def _fails_fast(fn: Any, cls: type, *words: str) -> None:
    """``fn()`` raises ``cls`` naming ``words`` within 10 s (run in a thread: a regression
    that blocks on a FIFO fails the test instead of hanging the suite)."""
    import threading

    box: dict[str, BaseException] = {}

    def run() -> None:
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - checked below
            box["e"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), "blocked on a named pipe"
    e = box.get("e")
    assert isinstance(e, cls), repr(e)
    for w in words:
        assert w in str(e), str(e)


def test_named_pipes_devices_and_outside_links_are_refused(tmp_path: Path) -> None:
    p = _store(tmp_path)
    m = p / "layerscope.json"
    saved = m.read_bytes()
    m.unlink()
    os.mkfifo(m)
    for fn in (lambda: ls.open(p), lambda: ls.open(p, verify=True)):
        _fails_fast(fn, FormatError, "layerscope.json", "named pipe")
    m.unlink()
    os.symlink("/dev/zero", m)  # never read without bound
    _fails_fast(lambda: ls.open(p), FormatError, "outside the store folder")
    m.unlink()
    (tmp_path / "elsewhere.json").write_bytes(saved)
    os.symlink(tmp_path / "elsewhere.json", m)  # confined like the shards
    _fails_fast(lambda: ls.open(p), FormatError, "outside the store folder")
    m.unlink()
    m.write_bytes(saved)
    (p / SHARD).unlink()
    os.mkfifo(p / SHARD)
    _fails_fast(lambda: ls.open(p), FormatError, SHARD, "named pipe")
    # other tools' dumps and saved results, too
    fifo = tmp_path / "dump.npy"
    os.mkfifo(fifo)
    _fails_fast(lambda: ls.convert(fifo, tmp_path / "c"), FormatError, "named pipe")
    _fails_fast(lambda: ls.convert(fifo, tmp_path / "c", format="npy"), FormatError,
                "named pipe")
    fifo = tmp_path / "result.json"
    os.mkfifo(fifo)
    _fails_fast(lambda: ls.load_result(fifo), FormatError, "named pipe")


def test_one_writer_per_store(tmp_path: Path) -> None:
    p = tmp_path / "s"
    x = np.ones((4, 3), np.float32)
    w = ls.StoreWriter(p)
    w.append({"a": x})
    for overwrite in (False, True):
        with pytest.raises(StoreLockedError, match=f"pid {os.getpid()}") as ei:
            ls.write_store(p, {"a": x}, overwrite=overwrite)
        assert isinstance(ei.value, ls.LockedError) and "one writer at a time" in str(ei.value)
    assert w.close().num_rows == 4  # the first writer's files were left alone
    # a writer in another process holds the lock until that process ends (kill -9 too)
    import subprocess
    import sys

    code = ("import layerscope as ls, numpy as np, sys, time\n"
            "w = ls.StoreWriter(sys.argv[1], overwrite=True)\n"
            "w.append({'a': np.ones((2, 3), np.float32)})\n"
            "print('ready', flush=True)\ntime.sleep(60)\n")
    child = subprocess.Popen([sys.executable, "-c", code, str(p)], stdout=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        with pytest.raises(StoreLockedError, match=f"pid {child.pid}"):
            ls.write_store(p, {"a": x}, overwrite=True)
    finally:
        child.kill()
        child.wait()
    ls.write_store(p, {"a": x}, overwrite=True)  # released by the OS
    assert ls.open(p).num_rows == 4
    assert not [f for f in os.listdir(p) if f.endswith(".tmp")]
