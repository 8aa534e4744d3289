"""Statistics during capture (``capture(..., accumulate=True)``, issue 33 slice 3): the moments
accumulated on the model's device while it runs equal those of the store the same capture
writes, feed ``cka``/``spectrum``/``alignment``/``analyze`` with no disk traffic, need no store
at all (``out=None``), merge with the core's accumulators, and are refused before anything is
accumulated when they do not fit the device's memory."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import layerscope  # noqa: E402
from conftest import ref_linear  # noqa: E402
from layerscope import _native  # noqa: E402
from layerscope.errors import (  # noqa: E402
    CaptureError,
    InvalidArgumentError,
    MemoryBudgetError,
    MissingLayerError,
)


def _model() -> Any:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(16, 48), torch.nn.GELU(), torch.nn.Linear(48, 24), torch.nn.Tanh(),
        torch.nn.Linear(24, 8))


def _batches(k: int = 12, rows: int = 41, offset: float = 30.0) -> list[Any]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(rows, 16, generator=g) * 2 + offset for _ in range(k)]


LAYERS = ["0", "2", "4"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_capture_moments_equal_the_store(tmp_path: Path, dtype: str) -> None:
    """One capture writes the store and accumulates: linear CKA (biased, debiased), spectra,
    alignment and analyze from the capture equal those from its store (1e-6) and the f64
    reference of the stored values; the capture's plan reads nothing."""
    model = _model()
    with torch.no_grad(), layerscope.capture(model, layers=LAYERS, out=tmp_path / "s",
                                             dtype=dtype, accumulate=True) as cap:
        for x in _batches():
            model(x)
    st = cap.store
    assert int(cap.moments.n) == st.num_rows == 12 * 41
    stored = {k: st.read(k, dtype=np.float64) for k in st.layers}
    for est in ("biased", "debiased"):
        a = layerscope.cka(cap, estimator=est)
        b = layerscope.cka(st, estimator=est, progress=False)
        assert a.meta["plan"]["strategy"] == "captured" and a.meta["plan"]["bytes_read"] == 0
        assert a.meta["device"] == "cpu" and a.rows == st.layers
        np.testing.assert_allclose(a.values, b.values, rtol=0, atol=1e-6)
        want = ref_linear(stored["0"], stored["4"], est)
        assert abs(a.values[0, 2] - want) < 1e-6
    sa = layerscope.spectrum(cap, progress=False)
    sb = layerscope.spectrum(st, progress=False)
    for k in LAYERS:
        ea, eb = np.asarray(sa.eigenvalues[k]), np.asarray(sb.eigenvalues[k])
        np.testing.assert_allclose(ea, eb, rtol=0, atol=1e-6 * eb.max())
    for method in ("subspace", "procrustes"):
        aa = layerscope.alignment(cap, method=method, k=4, progress=False)
        ab = layerscope.alignment(st, method=method, k=4, progress=False)
        np.testing.assert_allclose(aa.values, ab.values, rtol=0, atol=1e-6, err_msg=method)
    r = layerscope.analyze(cap, k=4, layers=["0", "4"], progress=False)
    assert r["cka"].rows == ["0", "4"]
    np.testing.assert_allclose(r["cka"].values, layerscope.cka(st, layers=["0", "4"],
                                                              progress=False).values, atol=1e-6)


def test_float64_accumulation_for_cca(tmp_path: Path) -> None:
    """CCA of rank-deficient layers (layer "0" has rank 16 of 48: a ridge) amplifies float32
    rounding; ``compute="float64"`` gives the store's numbers to 1e-9."""
    model = _model()
    with torch.no_grad(), layerscope.capture(model, layers=LAYERS, out=tmp_path / "s",
                                             dtype="bfloat16", accumulate=True,
                                             compute="float64") as cap:
        for x in _batches():
            model(x)
    for method in ("cca", "svcca", "pwcca"):
        aa = layerscope.alignment(cap, method=method, k=4, progress=False)
        ab = layerscope.alignment(cap.store, method=method, k=4, progress=False)
        assert aa.meta["compute"] == "float64"
        np.testing.assert_allclose(aa.values, ab.values, rtol=0, atol=1e-9, err_msg=method)
    with pytest.raises(InvalidArgumentError, match="accumulate"):
        layerscope.capture(model, out=tmp_path / "t", compute="float64")


def test_statistics_without_a_store(tmp_path: Path) -> None:
    """``out=None``: nothing is written, the statistics are there; max_rows truncates them as
    it truncates a store; a layer glob selects among the captured layers."""
    model = _model()
    with layerscope.capture(model, layers=LAYERS, accumulate=True, max_rows=300,
                            dtype="float32") as cap, \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")  # max_rows reached
        for x in _batches():
            model(x)
    assert cap.store is None and int(cap.moments.n) == 300
    with layerscope.capture(model, layers=LAYERS, out=tmp_path / "s", max_rows=300,
                            dtype="float32") as cap2, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for x in _batches():
            model(x)
    a = layerscope.cka(cap, layers=["2", "4"])
    b = layerscope.cka(cap2.store, layers=["2", "4"], progress=False)
    np.testing.assert_allclose(a.values, b.values, rtol=0, atol=1e-6)
    with pytest.raises(MissingLayerError):
        layerscope.cka(cap, layers=["9"])
    with pytest.raises(InvalidArgumentError, match="accumulate"):
        layerscope.capture(model, layers=LAYERS)
    with pytest.raises(InvalidArgumentError, match="RBF"):
        layerscope.cka(cap, kernel="rbf")
    with pytest.raises(InvalidArgumentError, match="stores"):
        layerscope.cka(cap, cap2.store)
    with pytest.raises(CaptureError, match="accumulate"):
        _ = cap2.moments


def test_tokens_with_padding_and_nan_rows() -> None:
    """Sequence outputs pooled to tokens under a padding mask: the statistics count exactly
    the real tokens; the rows equal the stored ones."""
    torch.manual_seed(2)
    lin = torch.nn.Sequential(torch.nn.Linear(8, 12), torch.nn.ReLU(), torch.nn.Linear(12, 6))
    x = torch.randn(3, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    with layerscope.capture(lin, layers=["0", "2"], accumulate=True, pool="tokens",
                            dtype="float32") as cap:
        cap.mask(mask)
        lin(x)
    m = cap.moments
    assert int(m.n) == int(mask.sum())
    rows = x[mask.bool()]
    h0 = lin[0](rows).detach().double().numpy()
    np.testing.assert_allclose(np.asarray(m.mean(0)), h0.mean(0), rtol=0, atol=1e-6)
    c = h0 - h0.mean(0)
    np.testing.assert_allclose(np.asarray(m.block(0, 0)), c.T @ c, rtol=0, atol=1e-5)


def test_capture_accumulators_merge_with_the_cores() -> None:
    """The capture's sums are the core's serialised accumulator: merged with a CPU
    accumulator of the next rows (another shift and first block), the moments of all rows."""
    model = _model()
    xs = _batches()
    with layerscope.capture(model, layers=LAYERS, accumulate=True, dtype="float32") as cap:
        for x in xs[:6]:
            model(x)
    first = _native.MomentAccumulator.from_bytes(cap._acc.to_bytes())
    with torch.no_grad():
        h = [model[0](torch.cat(xs[6:]))]
        h.append(model[2](model[1](h[0])))
        h.append(model[4](model[3](h[1])))
    rest = _native.MomentAccumulator([48, 24, 8], LAYERS)
    rest.update([t.numpy().astype(np.float64) for t in h])
    first.merge(rest)
    merged = first.finalize(3)
    with layerscope.capture(model, layers=LAYERS, accumulate=True, dtype="float32") as whole:
        for x in xs:
            model(x)
    r = list(range(3))
    for deb in (False, True):
        np.testing.assert_allclose(np.asarray(merged.cka(r, r, deb)),
                                   np.asarray(whole.moments.cka(r, r, deb)), atol=1e-6)


def test_accumulator_that_does_not_fit_is_refused(monkeypatch: Any, tmp_path: Path) -> None:
    """The accumulator beyond the device's budget: the first forward pass raises a
    MemoryBudgetError saying what works (a store and the planner's tiled passes) before
    anything is accumulated (or written: the first batch is where the widths are known)."""
    model = _model()
    monkeypatch.setenv("LAYERSCOPE_MAX_MEMORY", "8K")
    with pytest.raises(MemoryBudgetError, match="write the store.*tiled passes"):
        with layerscope.capture(model, layers=LAYERS, out=tmp_path / "s",
                                accumulate=True) as cap:
            model(_batches(1)[0])
    assert cap._acc.n == 0 and cap.store is None


def test_drifting_batches_warn() -> None:
    """Batches whose means drift far from the first batch's (the shift of the float32
    products): a RuntimeWarning on reading the statistics, as a float32 pass warns."""
    model = _model()
    with layerscope.capture(model, layers=["0"], accumulate=True) as cap:
        model(torch.randn(20, 16))
        for _ in range(5):
            model(torch.randn(20, 16) + 100)
    with pytest.warns(RuntimeWarning, match="standard deviations"):
        _ = cap.moments
