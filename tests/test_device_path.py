"""The device path of the torch engine (:mod:`layerscope._device`): the background block
reader (pinned, double-buffered host blocks on CUDA), plans sized to the device's budget
(tiles, Gram rounds), several devices sharing the tiles, device memory failures as
``MemoryBudgetError``.

``device="cpu"`` (and several ``"cpu"`` devices) run the same code as CUDA but for the pinned
buffers and the copy stream, so these run in every ``make test``; CUDA-only checks are marked
and skipped without a CUDA device.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import layerscope
import numpy as np
import pytest
from layerscope._device.arith import _TileSums
from layerscope._device.devices import DEVICE_MEMORY_ENV, Devices, resolve_device
from layerscope._device.feed import _Feed, _Layers, _Slot
from layerscope._device.passes import DevicePlan
from layerscope._source import resolve
from layerscope.errors import InvalidArgumentError, MemoryBudgetError, NonFiniteError

torch = pytest.importorskip("torch")

from conftest import TILED_BUDGET, adversarial, adversarial_pair  # noqa: E402

CUDA = pytest.mark.skipif(not torch.cuda.is_available(),
                          reason="needs a CUDA device (torch.cuda.is_available() is False)")
MULTI_CUDA = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2,
    reason="needs two CUDA devices")


def _feed_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "layerscope-feed"]


def _store(tmp_path: Path, arrays: dict[str, np.ndarray], dtype: str = "float32") -> Path:
    """A store of ``arrays`` in shards of about 40 rows (blocks cross shard ends)."""
    from layerscope import write_store

    out = tmp_path / "s"
    row = sum(a.shape[1] for a in arrays.values()) * (2 if dtype == "bfloat16" else 4)
    write_store(out, arrays, dtype=dtype, shard_bytes=40 * row)
    return out


def test_feed_reads_every_block_in_order(tmp_path: Path) -> None:
    """The reader thread's blocks (a store with shards of ~40 rows: blocks cross shard ends;
    bf16 decoded to f32; a range that starts mid-store): the rows the store holds, in order,
    each block its own copy of the values (the double buffer is not seen); the thread ends."""
    rng = np.random.default_rng(0)
    d = {"a": rng.standard_normal((203, 7)), "b": rng.standard_normal((203, 5))}
    path = _store(tmp_path, d, dtype="bfloat16")
    src = resolve(str(path))
    layers = _Layers([(src, ["a", "b"])])
    want = {k: src.read(k, 0, 203, dtype=np.float32) for k in d}
    seen = []
    for start, stop, ts in _Feed(torch, torch.device("cpu"), layers, [1, 0], 11, 203, 37):
        assert [t.dtype for t in ts] == [torch.float32, torch.float32]
        np.testing.assert_array_equal(ts[0].numpy(), want["b"][start:stop])
        np.testing.assert_array_equal(ts[1].numpy(), want["a"][start:stop])
        seen.append((start, stop))
    assert seen[0] == (11, 48) and seen[-1] == (196, 203)
    assert all(a[1] == b[0] for a, b in zip(seen, seen[1:]))
    assert not _feed_threads()


def test_feed_errors_and_early_exit(tmp_path: Path) -> None:
    """A reader failure reaches the consumer as the reader's own exception, where the block
    would have been; leaving the loop early stops the reader (no thread left behind)."""
    rng = np.random.default_rng(1)
    d = {"a": rng.standard_normal((120, 4))}

    class Failing(_Layers):
        def read_into(self, idx: Any, start: int, stop: int, outs: Any) -> None:
            if start >= 60:
                raise MemoryBudgetError("the third block")
            super().read_into(idx, start, stop, outs)

    layers = Failing([(resolve(d), ["a"])])
    got = []
    with pytest.raises(MemoryBudgetError, match="third block"):
        for start, _, _ in _Feed(torch, torch.device("cpu"), layers, [0], 0, 120, 30):
            got.append(start)
    assert got == [0, 30]
    assert not _feed_threads()
    for start, _, _ in _Feed(torch, torch.device("cpu"), _Layers([(resolve(d), ["a"])]), [0],
                             0, 120, 10):
        if start == 20:
            break
    assert not _feed_threads()


def test_device_arrays_are_not_modified() -> None:
    """The caller's arrays stay as they were through every device plan (the Gram route
    centres a copy, not the array it was given)."""
    d = adversarial()
    before = {k: v.copy() for k, v in d.items()}
    for strategy in ("single-pass", "tiled", "gram"):
        layerscope.cka(d, device="cpu", strategy=strategy, progress=False,
                       max_memory=TILED_BUDGET if strategy == "tiled" else None)
        for k in d:
            np.testing.assert_array_equal(d[k], before[k])


def test_several_devices_share_the_tiles(tmp_path: Path) -> None:
    """Two devices (two CPU workers: the code CUDA GPUs run) share a tiled pass over two
    stores: the table equals one device's and the Rust engine's; meta names both; a progress
    callback sees the rows of every tile; the comma form is the same devices."""
    _, _, pa, pb = adversarial_pair(tmp_path)
    calls: list[tuple[int, int]] = []
    kw: dict[str, Any] = dict(compute="float32", strategy="tiled", max_memory=TILED_BUDGET)
    rust = layerscope.cka(pa, pb, progress=False, **kw)
    one = layerscope.cka(pa, pb, progress=False, device="cpu", **kw)
    two = layerscope.cka(pa, pb, device=["cpu", "cpu"],
                         progress=lambda done, total: calls.append((done, total)), **kw)
    assert two.meta["devices"] == ["cpu", "cpu"] and "devices" not in one.meta
    assert two.meta["plan"]["passes"] == one.meta["plan"]["passes"] > 2
    np.testing.assert_allclose(two.values, one.values, rtol=0, atol=1e-12)
    np.testing.assert_allclose(two.values, rust.values, rtol=0, atol=1e-6)
    assert calls and calls[-1][0] == calls[-1][1]
    dev = resolve_device("cpu, cpu")
    assert isinstance(dev, Devices) and dev.type == "cpu" and str(dev) == "cpu,cpu"
    assert resolve_device(["cpu"]) == torch.device("cpu")


def test_a_failing_device_stops_the_others() -> None:
    """A tile that fails on one device (a NaN under nonfinite='error') is the caller's
    NonFiniteError; the other workers stop; no thread is left behind."""
    d = adversarial()
    d["y"] = d["y"].copy()
    d["y"][97, 3] = np.nan
    with pytest.raises(NonFiniteError, match=r'"y".*row 97'):
        layerscope.cka(d, device=["cpu", "cpu", "cpu"], strategy="tiled",
                       max_memory=TILED_BUDGET, progress=False)
    alive = [t for t in threading.enumerate() if t.name.startswith("layerscope-")]
    assert not alive, alive


def test_plans_sized_to_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """A device budget below the host's (LAYERSCOPE_MAX_DEVICE_MEMORY) cuts the plan to it:
    more tiles than the host's plan, the Gram route in rounds (Grams streamed past the held
    ones), the same table as the Rust engine's; meta says which budget sized the plan."""
    d = adversarial()
    names = list(d)
    dims = [d[k].shape[1] for k in names]
    n = 150
    host = layerscope.cka(d, progress=False, strategy="tiled")
    monkeypatch.setenv(DEVICE_MEMORY_ENV, TILED_BUDGET)
    small = layerscope.cka(d, progress=False, strategy="tiled", device="cpu")
    assert small.meta["plan"]["passes"] > host.meta["plan"]["passes"]
    assert DEVICE_MEMORY_ENV in small.meta["device_budget"]["source"]
    np.testing.assert_allclose(small.values, host.values, rtol=0, atol=1e-10)
    # the Gram route: room for two of the four Grams at a time
    from layerscope import _native

    full = _native.pair_plan(dims, len(dims), n, None, "float64", None, "gram")
    assert full["rounds"] == [[[0, 1, 2, 3], []]] or len(full["rounds"]) == 1
    budget = int(full["peak_bytes"]) - 2 * n * n * 8
    monkeypatch.setenv(DEVICE_MEMORY_ENV, str(budget))
    plan = DevicePlan(dims, len(dims), n, None, "float64", None, "gram",
                              torch.device("cpu"))
    assert plan.gram is not None and len(plan.gram["rounds"]) > 1
    for est in ("biased", "debiased"):
        rust = layerscope.cka(d, progress=False, strategy="gram", estimator=est)
        dev = layerscope.cka(d, progress=False, strategy="gram", estimator=est, device="cpu")
        assert dev.meta["plan"]["strategy"] == "gram"
        np.testing.assert_allclose(dev.values, rust.values, rtol=0, atol=1e-10)


def test_gram_route_that_does_not_fit_the_device_runs_tiles(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Few rows and wide layers (the Gram route ranks first) but a device too small for two
    Grams: the device runs the moment tiles instead, the same table."""
    rng = np.random.default_rng(4)
    d = {f"l{i}": rng.standard_normal((400, 600)) + 30.0 for i in range(3)}
    rust = layerscope.cka(d, progress=False)
    assert rust.meta["plan"]["strategy"] == "gram"
    monkeypatch.setenv(DEVICE_MEMORY_ENV, str(2 * 400 * 400 * 8))
    dev = layerscope.cka(d, progress=False, device="cpu")
    assert dev.meta["plan"]["strategy"] == "tiled"
    np.testing.assert_allclose(dev.values, rust.values, rtol=0, atol=1e-10)


def test_device_path_argument_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Typed errors: devices of different types, an empty list, a bad device budget."""
    arrays = {"a": np.random.default_rng(0).standard_normal((50, 4))}
    for bad in ([], ["cpu", 3], ["cpu", "meta"]):
        with pytest.raises(InvalidArgumentError):
            layerscope.cka(arrays, device=bad, progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(InvalidArgumentError, match="CUDA"):
            layerscope.cka(arrays, device="cpu,cuda", progress=False)
    monkeypatch.setenv(DEVICE_MEMORY_ENV, "lots")
    with pytest.raises(InvalidArgumentError, match=DEVICE_MEMORY_ENV):
        layerscope.cka(arrays, device="cpu", progress=False)


def test_device_out_of_memory_is_a_budget_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """An allocation the device refuses mid-pass (torch's OutOfMemoryError) reaches the caller
    as a MemoryBudgetError that says what to lower."""
    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError

    def refuse(*a: Any, **k: Any) -> Any:
        raise oom("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(_TileSums, "add", refuse)
    arrays = {"a": np.random.default_rng(0).standard_normal((50, 4))}
    with pytest.raises(MemoryBudgetError, match=DEVICE_MEMORY_ENV):
        layerscope.cka(arrays, device="cpu", progress=False, strategy="tiled")
    with pytest.raises(MemoryBudgetError, match="out of memory"):
        layerscope.spectrum(arrays, device="cpu", progress=False)


@CUDA
def test_cuda_feed_pinned_and_asynchronous(tmp_path: Path) -> None:
    """On CUDA the host blocks are pinned and copied on a side stream; the blocks that reach
    the device are the store's rows."""
    rng = np.random.default_rng(0)
    d = {"a": rng.standard_normal((500, 33))}
    src = resolve(str(_store(tmp_path, d)))
    layers = _Layers([(src, ["a"])])
    feed = _Feed(torch, torch.device("cuda"), layers, [0], 0, 500, 64)
    got = []
    for _, _, ts in feed:
        assert ts[0].is_cuda
        got.append(ts[0].cpu().numpy())
    np.testing.assert_array_equal(np.concatenate(got), src.read("a", 0, 500, np.float32))
    slot = _Slot(torch, torch.device("cuda"), [(4, 4)], [np.float32])
    assert slot.host[0].is_pinned()


@MULTI_CUDA
def test_gpus_share_the_tiles() -> None:
    """device='cuda' with several GPUs visible: every GPU runs tiles; the same table."""
    d = adversarial()
    one = layerscope.cka(d, device="cuda:0", strategy="tiled", max_memory=TILED_BUDGET,
                         progress=False)
    all_ = layerscope.cka(d, device="cuda", strategy="tiled", max_memory=TILED_BUDGET,
                          progress=False)
    assert len(all_.meta["devices"]) == torch.cuda.device_count()
    np.testing.assert_allclose(all_.values, one.values, rtol=0, atol=1e-12)
