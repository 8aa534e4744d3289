"""RSA against scipy (pdist + spearmanr/pearsonr) and mutual kNN against a brute-force numpy
reference; exact neighbours on offset f32 data."""

from __future__ import annotations

import layerscope
import numpy as np
import pytest
from layerscope import _native
from layerscope._kernel import sample_indices
from layerscope.errors import InvalidArgumentError, MismatchError
from scipy.spatial.distance import pdist
from scipy.stats import pearsonr, spearmanr


def layers(m: int = 150, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, 12))
    return {
        "x": x,
        "lin": x @ rng.standard_normal((12, 20)) + 0.5 * rng.standard_normal((m, 20)),
        "relu": np.maximum(x @ rng.standard_normal((12, 30)), 0)
        + 0.01 * rng.standard_normal((m, 30)),
        "noise": rng.standard_normal((m, 7)),
    }


@pytest.mark.parametrize("dissimilarity", ["euclidean", "correlation"])
@pytest.mark.parametrize("compare", ["spearman", "pearson"])
def test_rsa_matches_scipy(dissimilarity: str, compare: str) -> None:
    ls = layers()
    res = layerscope.rsa(
        ls, dissimilarity=dissimilarity, compare=compare, sample=None, progress=False
    )
    names = list(ls)
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            ra, rb = pdist(ls[a], dissimilarity), pdist(ls[b], dissimilarity)
            f = spearmanr if compare == "spearman" else pearsonr
            ref = f(ra, rb)[0]
            assert res.values[i, j] == pytest.approx(ref, rel=1e-9, abs=1e-12)
    assert res.meta["measure"] == "rsa"


def test_rsa_ties_other_source_and_offsets() -> None:
    ls = layers(m=80)
    rng = np.random.default_rng(1)
    x = ls["x"].copy()
    x[40:50] = x[:10]  # duplicated rows: tied zero distances
    q = np.round(ls["lin"], 0)  # many tied distances
    off = (ls["relu"] + 300.0 * rng.standard_normal(30)).astype(np.float32)
    res = layerscope.rsa({"x": x, "q": q}, {"off": off, "x": x}, sample=None, progress=False)
    for i, a in enumerate([x, q]):
        for j, b in enumerate([off.astype(np.float64), x]):
            ref = spearmanr(pdist(a), pdist(b))[0]
            assert res.values[i, j] == pytest.approx(ref, rel=1e-9)
    assert res.rows == ["x", "q"] and res.cols == ["off", "x"]


def test_rsa_sampling_and_errors() -> None:
    ls = layers(m=200)
    res = layerscope.rsa(ls, layers=["x", "lin"], sample=60, seed=4, progress=False)
    idx = sample_indices(200, 60, 4)
    ref = spearmanr(pdist(ls["x"][idx]), pdist(ls["lin"][idx]))[0]
    assert res.values[0, 1] == pytest.approx(ref, rel=1e-9)
    assert res.meta["n"] == 60
    bad = ls["x"].copy()
    bad[5] = 1.0
    with pytest.raises(InvalidArgumentError, match="row 5"):
        layerscope.rsa({"b": bad}, dissimilarity="correlation", sample=None, progress=False)
    with pytest.raises(InvalidArgumentError):
        layerscope.rsa(ls, compare="kendall", progress=False)
    with pytest.raises(MismatchError):
        layerscope.rsa(ls, {"z": np.zeros((10, 2))}, progress=False)


def brute_knn(x: np.ndarray, k: int) -> np.ndarray:
    d2 = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d2, np.inf)
    return np.argsort(d2, axis=1, kind="stable")[:, :k]


def ref_mutual_knn(a: np.ndarray, b: np.ndarray, k: int) -> float:
    na, nb = brute_knn(a, k), brute_knn(b, k)
    return float(np.mean([len(set(p) & set(q)) / k for p, q in zip(na, nb)]))


@pytest.mark.parametrize("k", [1, 5, 10])
def test_mutual_knn_matches_brute_force(k: int) -> None:
    ls = layers()
    res = layerscope.mutual_knn(ls, k=k, sample=None, progress=False)
    names = list(ls)
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            assert res.values[i, j] == pytest.approx(ref_mutual_knn(ls[a], ls[b], k), abs=1e-15)
    np.testing.assert_array_equal(np.diag(res.values), 1.0)


def test_mutual_knn_cross_and_f32_offsets() -> None:
    ls = layers(m=120)
    rng = np.random.default_rng(2)
    off = (ls["lin"] + 1000.0 * rng.standard_normal(20)).astype(np.float32)
    res = layerscope.mutual_knn({"x": ls["x"]}, {"off": off}, k=7, sample=None, progress=False)
    ref = ref_mutual_knn(ls["x"], off.astype(np.float64), 7)
    assert res.values[0, 0] == pytest.approx(ref, abs=1e-15)
    res = layerscope.mutual_knn(ls, k=5, sample=50, seed=1, progress=False)
    idx = sample_indices(120, 50, 1)
    assert res.values[0, 1] == pytest.approx(ref_mutual_knn(ls["x"][idx], ls["lin"][idx], 5))


def test_knn_graph_exact_f32_offsets_and_scales() -> None:
    rng = np.random.default_rng(9)
    for scale in (1e-4, 1.0, 1e4):
        x = rng.standard_normal((250, 40)) * scale
        x32 = (x + 700.0 * scale * rng.standard_normal(40)).astype(np.float32).astype(np.float64)
        g = _native.knn_graph(x32, 8, duplicates="keep")
        np.testing.assert_array_equal(g["idx"], brute_knn(x32, 8))
    with pytest.raises(InvalidArgumentError):
        _native.knn_graph(x32, 0)
    with pytest.raises(InvalidArgumentError):
        _native.knn_graph(x32, 250)
    with pytest.raises(InvalidArgumentError):
        _native.knn_graph(x32, 3, duplicates="sometimes")
