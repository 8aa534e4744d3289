"""Per-layer spectra vs numpy references from the formulas (independent route: singular
values of the explicitly centred data)."""

from __future__ import annotations

import json

import layerscope
import numpy as np
import pytest
from layerscope import _native


def ref_measures(x: np.ndarray) -> dict[str, float]:
    x = np.asarray(x, dtype=np.float64)
    xc = x - x.mean(axis=0)
    n, d = x.shape
    s = np.linalg.svd(xc, compute_uv=False)  # singular values of the centred data
    lam = s**2 / (n - 1)
    tol = lam.max() * max(n, d) * np.finfo(np.float64).eps
    lam = np.where(lam > tol, lam, 0.0)
    sig = np.sqrt(lam)
    p = sig[sig > 0] / sig.sum()
    cum = np.cumsum(lam) / lam.sum()
    return {
        "total_variance": lam.sum(),
        "rank": float(np.sum(lam > 0)),
        "effective_rank": float(np.exp(-np.sum(p * np.log(p)))),
        "participation_ratio": lam.sum() ** 2 / np.sum(lam**2),
        "stable_rank": lam.sum() / lam[0],
        "pca_id_90": float(np.argmax(cum >= 0.90) + 1),
        "pca_id_95": float(np.argmax(cum >= 0.95) + 1),
        "pca_id_99": float(np.argmax(cum >= 0.99) + 1),
    }


def native_spectra(xs: list[np.ndarray]) -> list[dict]:
    acc = _native.MomentAccumulator([x.shape[1] for x in xs], [f"l{i}" for i in range(len(xs))])
    acc.update([np.ascontiguousarray(x, dtype=np.float64) for x in xs])
    return list(acc.finalize().spectrum())


def data(seed: int, n: int, d: int) -> np.ndarray:
    g = np.random.default_rng(seed)
    return g.standard_normal((n, d)) * np.geomspace(10.0, 0.01, d)


@pytest.mark.parametrize("n,d", [(200, 12), (15, 40)])
def test_measures_match_reference(n, d):
    x = data(n + d, n, d)
    sp = native_spectra([x])[0]
    ref = ref_measures(x)
    for k, v in ref.items():
        np.testing.assert_allclose(sp[k], v, rtol=1e-8, err_msg=k)
    ev = np.sort(np.linalg.eigvalsh(np.cov(x.T)))[::-1]
    np.testing.assert_allclose(sp["eigenvalues"], ev, rtol=1e-8, atol=1e-12 * ev[0])
    np.testing.assert_allclose(sp["explained_variance_ratio"].sum(), 1.0, rtol=1e-10)


def test_rank_deficient_columns_and_round_off_not_clamped():
    x = data(1, 100, 6)
    x = np.hstack([x, np.full((100, 3), 4.0), x[:, :2] * 3.0])
    sp = native_spectra([x])[0]
    ref = ref_measures(x)
    assert sp["rank"] == 6
    for k, v in ref.items():
        np.testing.assert_allclose(sp[k], v, rtol=1e-8, err_msg=k)
    tail = sp["eigenvalues"][6:]
    assert np.all(np.abs(tail) <= sp["rank_tol"])  # zeros up to round-off, reported as-is


def test_zero_variance_layer_gives_nan_measures():
    sp = native_spectra([np.ones((10, 3))])[0]
    assert sp["rank"] == 0 and np.isnan(sp["effective_rank"]) and np.isnan(sp["pca_id_90"])


def test_spectrum_api_top_table_pandas_json(tmp_path):
    xs = {"a": data(2, 300, 10), "b": data(3, 300, 7) + 500.0}
    sp = layerscope.spectrum(xs, top=4, progress=False)
    assert sp.layers == ["a", "b"]
    assert sp.eigenvalues["a"].shape == (4,) and sp.explained_variance_ratio["b"].shape == (4,)
    ref = ref_measures(xs["b"])
    # measures from the full spectrum even though only the top 4 are kept
    np.testing.assert_allclose(sp.table["b"]["effective_rank"], ref["effective_rank"], rtol=1e-8)
    df = sp.to_pandas()
    assert list(df.index) == ["a", "b"] and "participation_ratio" in df.columns
    back = layerscope.load_result(sp.save(tmp_path / "sp.json"))
    assert back.kind == "spectrum"
    np.testing.assert_allclose(back.eigenvalues["a"], sp.eigenvalues["a"])
    assert back.table == json.loads(sp.to_json())["table"]
    fig = sp.plot()
    assert fig.axes[0].get_xscale() == "log"


def test_spectrum_f32_large_offsets():
    x = (data(4, 400, 8) + 1000.0).astype(np.float32)
    sp = layerscope.spectrum({"x": x}, progress=False)
    ref = ref_measures(x.astype(np.float64))
    for k in ("effective_rank", "participation_ratio", "stable_rank", "pca_id_95"):
        np.testing.assert_allclose(sp.table["x"][k], ref[k], rtol=1e-8, err_msg=k)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_spectrum_low_precision_store_offsets_and_n_below_d(tmp_path, dtype):
    """bf16/f16 stores with per-feature offsets ~300× the spread, one layer with n < d: the
    measures equal the f64 reference on exactly the stored values."""
    g = np.random.default_rng(7)
    wide = g.standard_normal((40, 64)) * np.geomspace(5.0, 0.05, 64) + 300.0 * g.uniform(-1, 1, 64)
    tall = data(8, 40, 6) + 300.0
    store = layerscope.write_store(tmp_path / "s", {"wide": wide, "tall": tall}, dtype=dtype)
    sp = layerscope.spectrum(store, progress=False)
    for layer in ("wide", "tall"):
        x = store.read(layer, 0, None, np.float64)
        ref = ref_measures(x)
        for k, v in ref.items():
            np.testing.assert_allclose(sp.table[layer][k], v, rtol=1e-8, err_msg=(layer, k))
    assert sp.table["wide"]["rank"] == 39  # n − 1 after centring
