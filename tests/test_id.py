"""Intrinsic dimension (TwoNN, TwoNN-MLE, Levina–Bickel MLE, GRIDE) against scikit-dimension
on the same points, plus duplicates, offsets, scales and bootstrap."""

from __future__ import annotations

import warnings

import layerscope
import numpy as np
import pytest
from layerscope import _native
from layerscope.errors import InvalidArgumentError
from layerscope.results import load_result

skdim = pytest.importorskip("skdim")


def _rotate(x: np.ndarray, d_out: int, rng: np.random.Generator) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((d_out, x.shape[1])))
    return x @ q.T


def datasets() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(42)
    n = 500
    out = {}
    out["linear5_in60"] = rng.standard_normal((n, 5)) @ rng.standard_normal((5, 60))
    t = 1.5 * np.pi * (1 + 2 * rng.random(n))
    roll = np.stack([t * np.cos(t), 21 * rng.random(n), t * np.sin(t)], axis=1)
    out["swissroll"] = roll
    s = rng.standard_normal((n, 4))
    s /= np.linalg.norm(s, axis=1, keepdims=True)
    out["sphere3_in30"] = _rotate(s, 30, rng)
    out["sphere3_noisy"] = out["sphere3_in30"] + 0.01 * rng.standard_normal((n, 30))
    out["linear8_in20_noisy"] = rng.standard_normal((n, 8)) @ rng.standard_normal(
        (8, 20)
    ) + 0.05 * rng.standard_normal((n, 20))
    return out


DATA = datasets()


def ours(x: np.ndarray, **kw: object) -> object:
    return layerscope.intrinsic_dimension({"x": x}, sample=None, progress=False, **kw)


@pytest.mark.parametrize("name", list(DATA))
def test_twonn_matches_skdim(name: str) -> None:
    x = DATA[name]
    ref = skdim.id.TwoNN().fit(x).dimension_
    assert ours(x, method="twonn").values["x"] == pytest.approx(ref, rel=1e-6)
    ref = skdim.id.TwoNN(method="mle").fit(x).dimension_
    assert ours(x, method="twonn-mle").values["x"] == pytest.approx(ref, rel=1e-6)
    ref = skdim.id.TwoNN(discard_fraction=0.25).fit(x).dimension_
    assert ours(x, method="twonn", discard_fraction=0.25).values["x"] == pytest.approx(
        ref, rel=1e-6
    )


@pytest.mark.parametrize("name", list(DATA))
def test_mle_matches_skdim(name: str) -> None:
    x = DATA[name]
    ref = skdim.id.MLE().fit(x, n_neighbors=20).dimension_
    assert ours(x, method="mle", k=20).values["x"] == pytest.approx(ref, rel=1e-6)
    ref = skdim.id.MLE().fit(x, n_neighbors=10, comb="mean").dimension_
    assert ours(x, method="mle", k=10, pool="mean").values["x"] == pytest.approx(ref, rel=1e-6)
    ref = skdim.id.MLE().fit(x, n_neighbors=10, comb="median").dimension_
    assert ours(x, method="mle", k=10, pool="median").values["x"] == pytest.approx(ref, rel=1e-6)


@pytest.mark.parametrize("name", list(DATA))
@pytest.mark.parametrize("n1,n2", [(1, 2), (2, 4), (4, 8), (3, 10)])
def test_gride_matches_skdim(name: str, n1: int, n2: int) -> None:
    x = DATA[name]
    g = skdim.id.GRIDE(n1=n1, n2=n2).fit(x)
    r = ours(x, method="gride", n1=n1, n2=n2)
    assert r.values["x"] == pytest.approx(g.dimension_, rel=1e-6)
    assert r.errors["x"] == pytest.approx(g.error_, rel=1e-6)


def test_gride_multiscale_matches_skdim() -> None:
    x = DATA["sphere3_noisy"]
    g = skdim.id.GRIDE(multiscale=True, range_max=16).fit(x)
    r = ours(x, method="gride", scales=list(g.scales_))
    sc = r.scales["x"]
    np.testing.assert_allclose(sc["dimension"], g.dimension_scales_, rtol=1e-6)
    np.testing.assert_allclose(sc["error"], g.error_scales_, rtol=1e-6)
    np.testing.assert_allclose(sc["radius"], g.radius_scales_, rtol=1e-9)


def test_twonn_mle_closed_form_without_discard() -> None:
    x = DATA["linear5_in60"]
    d2 = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d2, np.inf)
    r = np.sqrt(np.sort(d2, axis=1)[:, :2])
    mu = r[:, 1] / r[:, 0]
    ref = (len(mu) - 1) / np.log(mu).sum()
    assert ours(x, method="twonn-mle", discard_fraction=0.0).values["x"] == pytest.approx(
        ref, rel=1e-12
    )


def test_known_dimensions() -> None:
    assert 4.3 < ours(DATA["linear5_in60"], method="twonn").values["x"] < 5.7
    assert 1.7 < ours(DATA["swissroll"], method="mle").values["x"] < 2.3
    assert 2.5 < ours(DATA["sphere3_in30"], method="gride", n1=2, n2=4).values["x"] < 3.5


def test_f32_offsets_exact_neighbours() -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((400, 6)) @ rng.standard_normal((6, 48))
    x32 = (x + 1000.0 * rng.standard_normal(48)).astype(np.float32)
    xs = x32.astype(np.float64)
    g = _native.knn_graph(np.ascontiguousarray(xs), 5, duplicates="keep")
    d2 = ((xs[:, None, :] - xs[None, :, :]) ** 2).sum(-1)  # exact f64 reference
    np.fill_diagonal(d2, np.inf)
    order = np.argsort(d2, axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(g["idx"], order)
    np.testing.assert_allclose(g["dist"], np.sqrt(np.take_along_axis(d2, order, 1)), rtol=1e-14)
    # and the estimate equals the formula on those exact distances
    r = np.sqrt(np.take_along_axis(d2, order, 1))
    mu = r[:, 1] / r[:, 0]
    ref = (len(mu) - 1) / np.log(mu).sum()
    got = layerscope.intrinsic_dimension(
        {"x": x32}, method="twonn-mle", discard_fraction=0.0, sample=None, progress=False
    ).values["x"]
    assert got == pytest.approx(ref, rel=1e-12)


@pytest.mark.parametrize("scale", [1e-4, 1e4])
def test_scale_invariance(scale: float) -> None:
    x = DATA["sphere3_noisy"]
    for m in ("twonn", "mle", "gride"):
        a = ours(x, method=m).values["x"]
        b = ours(x * scale, method=m).values["x"]
        assert b == pytest.approx(a, rel=1e-9)


def test_duplicates() -> None:
    rng = np.random.default_rng(3)
    base = rng.standard_normal((600, 6)) @ rng.standard_normal((6, 30))
    n_dup = 30  # 5 % of the 600 rows are exact copies of other rows
    x = np.concatenate([base[:570], base[rng.choice(570, n_dup, replace=False)]])
    uniq = base[:570]
    for m in ("twonn", "twonn-mle", "mle", "gride"):
        r = ours(x, method=m)
        ref = ours(uniq, method=m).values["x"]
        assert r.values["x"] == pytest.approx(ref, rel=0.02)
        assert r.details["x"]["duplicates"] == n_dup
        assert r.details["x"]["rows_used"] == 570
    with pytest.raises(InvalidArgumentError, match="30 of 600"):
        ours(x, method="twonn", duplicates="error")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        r = ours(x, method="twonn", duplicates="keep")
    assert np.isnan(r.values["x"]) and r.details["x"]["reason"]
    assert any("duplicate" in str(i.message) for i in w)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert np.isnan(ours(x, method="mle", duplicates="keep").values["x"])


def test_near_duplicates_tolerance() -> None:
    rng = np.random.default_rng(4)
    x = rng.standard_normal((300, 10))
    y = np.concatenate([x, x[:10] + 1e-12])
    r = ours(y, method="twonn")
    assert r.details["x"]["duplicates"] == 10
    r = ours(y, method="twonn", tolerance=0.0)
    assert r.details["x"]["duplicates"] == 0


def test_bootstrap_and_result_roundtrip(tmp_path: object) -> None:
    x = DATA["linear5_in60"]
    r = layerscope.intrinsic_dimension(
        {"a": x, "b": x[:, :10]}, method="mle", bootstrap=100, seed=7, sample=400, progress=False
    )
    for layer in ("a", "b"):
        lo, hi = r.ci[layer]
        assert lo < r.values[layer] < hi
    r2 = layerscope.intrinsic_dimension(
        {"a": x, "b": x[:, :10]}, method="mle", bootstrap=100, seed=7, sample=400, progress=False
    )
    assert r.ci == r2.ci and r.meta["sample_hash"] == r2.meta["sample_hash"]
    assert r.meta["n"] == 400
    assert list(r.table.index) == ["a", "b"]
    p = tmp_path / "id.json"  # type: ignore[operator]
    r.save(p)
    back = load_result(p)
    assert back.values == r.values and back.ci == r.ci
    fig = r.plot()
    assert fig is not None


def test_sampling_is_seeded() -> None:
    x = DATA["linear8_in20_noisy"]
    idx = np.sort(np.random.default_rng(5).choice(len(x), size=300, replace=False))
    a = layerscope.intrinsic_dimension({"x": x}, sample=300, seed=5, progress=False).values["x"]
    b = ours(x[idx]).values["x"]
    assert a == b


def test_bad_arguments() -> None:
    x = DATA["swissroll"]
    with pytest.raises(InvalidArgumentError):
        ours(x, method="nope")
    with pytest.raises(InvalidArgumentError):
        ours(x, method="gride", n1=3, n2=2)
    with pytest.raises(InvalidArgumentError):
        ours(x, method="mle", k=1)
    with pytest.raises(InvalidArgumentError):
        ours(x[:10], method="mle", k=20)
    with pytest.raises(InvalidArgumentError):
        ours(x, duplicates="maybe")
    with pytest.raises(InvalidArgumentError):
        ours(x, method="twonn", discard_fraction=0.0)  # F = 1 at the largest μ
    bad = x.copy()
    bad[7, 1] = np.nan
    with pytest.raises(layerscope.NonFiniteError):
        ours(bad)


def test_cli(tmp_path: object) -> None:
    from layerscope.cli import main

    store = tmp_path / "s"  # type: ignore[operator]
    layerscope.write_store(
        store,
        {"l0": DATA["swissroll"].astype(np.float32), "l1": DATA["linear5_in60"].astype(np.float32)},
    )
    out = tmp_path / "id.json"  # type: ignore[operator]
    assert main(["id", str(store), "--method", "mle", "--out", str(out), "--quiet"]) == 0
    res = load_result(out)
    ref = (
        skdim.id.MLE()
        .fit(DATA["swissroll"].astype(np.float32).astype(np.float64), n_neighbors=20)
        .dimension_
    )
    assert res.values["l0"] == pytest.approx(ref, rel=1e-6)
