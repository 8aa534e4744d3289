"""Intrinsic dimension (TwoNN, TwoNN-MLE, Levina–Bickel MLE, GRIDE, PCA) against
scikit-dimension and dadapy's 2NN formula (re-implemented from its source) on the same points;
known dimensions; duplicates (and the anchors' collapse); exactness under f32 cancellation,
massive-norm rows and f16/bf16 stores; scales; bootstrap; progress/Ctrl-C; typed errors; CLI."""

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


# ------------------------------------------------------------------ dadapy (formula re-implemented)


def brute_sorted_distances(x: np.ndarray, k: int) -> np.ndarray:
    """Exact f64 distances to the k nearest neighbours (self excluded), no GEMM."""
    d2 = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d2, np.inf)
    return np.sqrt(np.sort(d2, axis=1)[:, :k])


def dadapy_id_2nn(r: np.ndarray, fraction: float = 0.9, algorithm: str = "base") -> float:
    """dadapy ``IdEstimation._compute_id_2NN`` (sissa-data-science/DADApy, id_estimation.py),
    re-implemented line by line: ``mus = r2/r1``; ``N_eff = int(N * fraction)``; ``"ml"``:
    ``(N - 1) / Σ log mus`` over ALL points; ``"base"``: ``curve_fit`` of ``y = m x`` with
    ``x`` = the ``N_eff`` smallest log mus, ``y = -log(1 - i/N)``."""
    from scipy.optimize import curve_fit

    mus = r[:, 1] / r[:, 0]
    n = mus.shape[0]
    n_eff = int(n * fraction)
    log_mus = np.log(mus)
    reduced = np.sort(log_mus)[:n_eff]
    if algorithm == "ml":
        return float((n - 1) / np.sum(log_mus))
    y = -np.log(1 - np.arange(1, n_eff + 1) / n)
    popt, _ = curve_fit(lambda x, m: m * x, reduced, y)
    return float(popt[0])


@pytest.mark.parametrize("name", list(DATA))
def test_twonn_matches_dadapy_formula(name: str) -> None:
    x = DATA[name]
    r = brute_sorted_distances(x, 2)
    assert ours(x, method="twonn").values["x"] == pytest.approx(dadapy_id_2nn(r), rel=1e-6)
    assert ours(x, method="twonn-mle", discard_fraction=0.0).values["x"] == pytest.approx(
        dadapy_id_2nn(r, algorithm="ml"), rel=1e-6
    )


# ------------------------------------------------------------------ duplicates: anchors collapse


def test_duplicates_anchor_collapse() -> None:
    """5 % exact duplicates: the anchors' MLE collapses to 0 (log(r_k/0) = inf), dadapy's
    2NN "ml" to 0 too; ours (duplicates="drop") stays within 2 % of the de-duplicated value."""
    rng = np.random.default_rng(3)
    base = rng.standard_normal((600, 6)) @ rng.standard_normal((6, 30))
    x = np.concatenate([base[:570], base[rng.choice(570, 30, replace=False)]])
    uniq = base[:570]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert skdim.id.MLE().fit(x, n_neighbors=20).dimension_ == 0.0
        with np.errstate(divide="ignore"):
            r = brute_sorted_distances(x, 2)
            assert dadapy_id_2nn(r, algorithm="ml") == 0.0
    ref = skdim.id.MLE().fit(uniq, n_neighbors=20).dimension_
    got = ours(x, method="mle").values["x"]
    assert got == pytest.approx(ref, rel=1e-6)  # drop keeps exactly the unique rows here
    assert abs(got / ref - 1) < 0.02


# ------------------------------------------------------------------ exactness under cancellation


def test_f32_two_clusters_gemm_cancels() -> None:
    """Two clusters ±3e4 apart (stored f32), spread 1: centring does not remove the
    separation, so f32 GEMM distances ||a||² + ||b||² − 2ab inside a cluster are pure
    cancellation noise (shown below); the engine's certified f64 recomputation still
    returns the exact neighbours and no fake duplicates."""
    rng = np.random.default_rng(11)
    n, d = 300, 24
    z = rng.standard_normal((n, 4)) @ rng.standard_normal((4, d))
    centres = np.where(np.arange(n)[:, None] < n // 2, 3e4, -3e4) * np.ones(d) / np.sqrt(d)
    x32 = (z + centres + 500.0 * rng.standard_normal(d)).astype(np.float32)
    xs = x32.astype(np.float64)
    # naive f32 GEMM distances (even on centred data) are garbage at this scale
    xc = (xs - xs.mean(0)).astype(np.float32)
    nrm = (xc * xc).sum(1)
    naive = nrm[:, None] + nrm[None, :] - 2 * (xc @ xc.T)
    d2 = ((xs[:, None, :] - xs[None, :, :]) ** 2).sum(-1)
    off = ~np.eye(n, dtype=bool)
    assert np.max(np.abs(naive - d2)[off]) > 0.5 * np.median(d2[:5, :100][off[:5, :100]])
    g = _native.knn_graph(np.ascontiguousarray(xs), 5, duplicates="keep")
    np.fill_diagonal(d2, np.inf)
    order = np.argsort(d2, axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(g["idx"], order)
    np.testing.assert_allclose(g["dist"], np.sqrt(np.take_along_axis(d2, order, 1)), rtol=1e-14)
    assert g["duplicates"] == 0
    r = layerscope.intrinsic_dimension({"x": x32}, method="twonn", sample=None, progress=False)
    assert r.values["x"] == pytest.approx(skdim.id.TwoNN().fit(xs).dimension_, rel=1e-6)


def test_massive_activation_row_keeps_exactness() -> None:
    """One row with a norm 1e4 times the others (LLM "massive activations"): per-pair error
    bounds keep the other rows certified; neighbours stay exact."""
    rng = np.random.default_rng(12)
    x = rng.standard_normal((400, 32)) @ rng.standard_normal((32, 32))
    x[17] *= 1e4
    x32 = (x + 200.0 * rng.standard_normal(32)).astype(np.float32).astype(np.float64)
    g = _native.knn_graph(x32, 6, duplicates="keep")
    d2 = ((x32[:, None, :] - x32[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d2, np.inf)
    np.testing.assert_array_equal(g["idx"], np.argsort(d2, axis=1, kind="stable")[:, :6])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_store_with_offsets(tmp_path: object, dtype: str) -> None:
    from layerscope._source import resolve

    rng = np.random.default_rng(13)
    x = rng.standard_normal((400, 5)) @ rng.standard_normal((5, 20))
    x = x + (100.0 if dtype == "float16" else 10.0) * rng.standard_normal(20)
    path = tmp_path / dtype  # type: ignore[operator]
    layerscope.write_store(path, {"h": x}, dtype=dtype)
    dec = resolve(str(path)).read("h", 0, 400, dtype=np.float64)  # the stored values
    uniq = np.unique(dec, axis=0)
    for m, ref in (
        ("twonn", skdim.id.TwoNN().fit(uniq).dimension_),
        ("mle", skdim.id.MLE().fit(uniq, n_neighbors=20).dimension_),
    ):
        r = layerscope.intrinsic_dimension(str(path), method=m, sample=None, progress=False)
        assert r.values["h"] == pytest.approx(ref, rel=1e-6)
        assert r.details["h"]["duplicates"] == 400 - len(uniq)


# ------------------------------------------------------------------ known dimensions, more shapes


def test_known_dimensions_high_ambient_and_noise() -> None:
    rng = np.random.default_rng(21)
    # n < d: a 10-dim Gaussian subspace in 1000 ambient dimensions, 300 points
    lin = rng.standard_normal((300, 10)) @ rng.standard_normal((10, 1000))
    for m in ("twonn", "mle"):
        v = ours(lin, method=m).values["x"]
        assert 7.0 < v < 11.5, (m, v)
    assert ours(lin, method="twonn").values["x"] == pytest.approx(
        skdim.id.TwoNN().fit(lin).dimension_, rel=1e-6
    )
    # S^5 in 40 dims with small noise, and constant columns (must not change anything)
    s = rng.standard_normal((600, 6))
    s /= np.linalg.norm(s, axis=1, keepdims=True)
    sph = _rotate(s, 40, rng) + 1e-3 * rng.standard_normal((600, 40))
    v = ours(sph, method="gride", n1=2, n2=4).values["x"]
    assert 4.3 < v < 5.8
    const = np.concatenate([sph, np.full((600, 3), 7.5)], axis=1)
    for m in ("twonn", "mle", "gride"):
        assert ours(const, method=m).values["x"] == pytest.approx(
            ours(sph, method=m).values["x"], rel=1e-10
        )


def test_lattice_ties_give_nan_with_reason() -> None:
    g = np.stack(np.meshgrid(np.arange(12.0), np.arange(12.0)), -1).reshape(-1, 2)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        r = ours(g, method="twonn-mle", discard_fraction=0.0)
    assert np.isnan(r.values["x"]) and "μ" in r.details["x"]["reason"]
    assert any("NaN" in str(i.message) for i in w)


# ------------------------------------------------------------------ PCA


def test_pca_matches_numpy_spectrum() -> None:
    x = DATA["linear8_in20_noisy"]
    r = ours(x, method="pca", pca_threshold=0.9)
    lam = np.linalg.eigvalsh(np.cov(x, rowvar=False))[::-1]
    lam = np.maximum(lam, 0)
    share = np.cumsum(lam) / lam.sum()
    assert r.values["x"] == float(np.argmax(share >= 0.9) + 1)
    assert r.details["x"]["pca_id_99"] == float(np.argmax(share >= 0.99) + 1)
    assert r.details["x"]["participation_ratio"] == pytest.approx(
        lam.sum() ** 2 / (lam**2).sum(), rel=1e-9
    )
    assert ours(DATA["linear5_in60"], method="pca").values["x"] <= 5
    assert ours(DATA["swissroll"], method="pca", pca_threshold=0.99).values["x"] == 3
    assert "participation_ratio" in r.table.columns
    with pytest.raises(InvalidArgumentError):
        ours(x, method="pca", pca_threshold=0.0)


# ------------------------------------------------------------------ robustness, progress, CLI


@pytest.mark.parametrize("n", [0, 1, 2, 3])
def test_tiny_inputs_raise_typed_errors(n: int) -> None:
    x = np.random.default_rng(0).standard_normal((n, 4))
    for m in ("twonn", "twonn-mle", "mle", "gride") if n < 3 else ("mle",):
        with pytest.raises(layerscope.LayerscopeError):
            ours(x, method=m)  # too few points for the neighbours the method needs
    with pytest.raises(layerscope.LayerscopeError):
        _native.knn_graph(np.zeros((n, 3)), 2)
    with pytest.raises(layerscope.LayerscopeError):
        _native.id_estimate(np.ones((n, 1)), "twonn")


def test_native_rejects_bad_arguments() -> None:
    d = np.sort(np.random.default_rng(0).random((50, 4)) + 0.1, axis=1)
    for kw in (
        {"method": "gride", "n1": 3, "n2": 6},
        {"method": "mle", "k": 9},
        {"method": "twonn", "discard_fraction": 1.5},
        {"method": "mle", "pool": "geometric"},
        {"method": "nope"},
    ):
        with pytest.raises(InvalidArgumentError):
            _native.id_estimate(d, **kw)
    with pytest.raises(InvalidArgumentError):
        ours(DATA["swissroll"], k=-3)
    with pytest.raises(InvalidArgumentError):
        ours(DATA["swissroll"], tolerance=-1.0)
    inf = DATA["swissroll"].copy()
    inf[3, 0] = np.inf
    with pytest.raises(layerscope.NonFiniteError):
        _native.knn_graph(inf, 3)


def test_progress_and_interrupt() -> None:
    x = np.random.default_rng(0).standard_normal((2000, 8))
    calls: list[tuple[int, int]] = []
    layerscope.intrinsic_dimension(
        {"x": x}, sample=None, progress=lambda d, t: calls.append((d, t))
    )
    assert calls and calls[-1] == (2000, 2000)

    def stop(done: int, total: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        layerscope.intrinsic_dimension({"x": x}, sample=None, progress=stop)
    with pytest.raises(KeyboardInterrupt):
        layerscope.mutual_knn({"x": x, "y": x[:, :4]}, sample=None, progress=stop)


def test_cli_pca_gride_scales_and_rsa(tmp_path: object, capsys: object) -> None:
    from layerscope.cli import main

    store = tmp_path / "s"  # type: ignore[operator]
    layerscope.write_store(
        store,
        {"l0": DATA["sphere3_noisy"].astype(np.float32), "l1": DATA["linear5_in60"]},
    )
    out = tmp_path / "g.json"  # type: ignore[operator]
    args = ["id", str(store), "--method", "gride", "--scales", "1", "2", "4"]
    assert main([*args, "--out", str(out), "--quiet"]) == 0
    res = load_result(out)
    assert res.scales["l0"]["n1"] == [1, 2, 4]
    assert main(["id", str(store), "--method", "pca"]) == 0
    assert "participation_ratio" in capsys.readouterr().out  # type: ignore[attr-defined]
    out2 = tmp_path / "rsa.json"  # type: ignore[operator]
    assert main(["rsa", str(store), "--sample", "all", "--out", str(out2), "--quiet"]) == 0
    from scipy.spatial.distance import pdist
    from scipy.stats import spearmanr

    rs = load_result(out2)
    a = DATA["sphere3_noisy"].astype(np.float32).astype(np.float64)
    ref = spearmanr(pdist(a), pdist(DATA["linear5_in60"]))[0]
    assert rs.values[0, 1] == pytest.approx(ref, rel=1e-9)


def test_pca_f32_offsets_store_and_errors(tmp_path: object) -> None:
    rng = np.random.default_rng(31)
    x = rng.standard_normal((500, 6)) @ rng.standard_normal((6, 40)) + 0.05 * rng.standard_normal(
        (500, 40)
    )
    x32 = (x + 1000.0 * rng.standard_normal(40)).astype(np.float32)
    path = tmp_path / "p"  # type: ignore[operator]
    layerscope.write_store(path, {"a": x32})
    r = layerscope.intrinsic_dimension(str(path), method="pca", pca_threshold=0.99, progress=False)
    xs = x32.astype(np.float64)
    lam = np.maximum(np.linalg.eigvalsh(np.cov(xs, rowvar=False))[::-1], 0)
    share = np.cumsum(lam) / lam.sum()
    assert r.values["a"] == float(np.argmax(share >= 0.99) + 1)
    assert r.details["a"]["participation_ratio"] == pytest.approx(
        lam.sum() ** 2 / (lam**2).sum(), rel=1e-6
    )
    assert r.meta["n"] == 500 and "moments" in r.meta["pca_engine"]
    with pytest.raises(layerscope.LayerscopeError):
        ours(x[:1], method="pca")
    bad = x.copy()
    bad[9, 9] = np.nan
    with pytest.raises(layerscope.NonFiniteError):
        ours(bad, method="pca")


def test_intrinsic_dimensions_share_one_graph_and_equal_single_calls() -> None:
    """intrinsic_dimensions builds one kNN graph per layer (as many neighbours as the most
    demanding method) and must give exactly what one call per method gives: the exact kNN
    makes the first neighbours of a larger graph identical to a smaller one's."""
    rng = np.random.default_rng(17)
    x = rng.standard_normal((1500, 6)) @ rng.standard_normal((6, 40))
    x = np.vstack([x, x[:60]])  # duplicates: dropped the same way in both paths
    src = {"a": x, "b": np.tanh(x / 3.0)}
    methods = ("twonn", "mle", "gride", "twonn-mle", "pca")
    kw = dict(k=12, n1=2, n2=4, bootstrap=25, seed=3, sample=1200, scales=[1, 2])
    many = layerscope.intrinsic_dimensions(src, methods=methods, progress=False, **kw)
    assert list(many) == list(methods)
    for m in methods:
        one = layerscope.intrinsic_dimension(src, method=m, progress=False, **kw)
        assert one.values == many[m].values, m
        assert one.ci == many[m].ci, m
        if m != "pca":
            assert one.details == many[m].details, m
            assert one.scales == many[m].scales, m
            assert many[m].meta["knn_k"] == 12 and many[m].meta["sample_hash"] == one.meta[
                "sample_hash"]
    with pytest.raises(layerscope.InvalidArgumentError):
        layerscope.intrinsic_dimensions(src, methods=(), progress=False)
    with pytest.raises(layerscope.InvalidArgumentError):
        layerscope.intrinsic_dimensions(src, methods=("twonn", "nope"), progress=False)
