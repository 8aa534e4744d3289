"""CKNNA (Huh et al. 2024): against an f64 reference written here from the paper's formula
(dense Grams, top-k masks with ties to the lowest index, Song et al.'s unbiased HSIC in the
trace form of the authors' code, without its 1e-6 guard)."""

from __future__ import annotations

from pathlib import Path

import layerscope as ls
import numpy as np
import pytest
from conftest import llm_like
from layerscope.errors import InvalidArgumentError


def _hsic_unbiased(k: np.ndarray, lg: np.ndarray) -> float:
    """Song et al. 2012, eq. 5, as the authors' ``hsic_unbiased``: ``sum(K̃ * L̃ᵀ)``
    (= tr(K̃L̃)), ``sum(K̃) sum(L̃)/((m−1)(m−2))``, ``2 sum(K̃ L̃)/(m−2)``, over ``m(m−3)``."""
    m = k.shape[0]
    kt = k - np.diag(np.diag(k))
    lt = lg - np.diag(np.diag(lg))
    return float(((kt * lt.T).sum() + kt.sum() * lt.sum() / ((m - 1) * (m - 2))
                  - 2 * (kt @ lt).sum() / (m - 2)) / (m * (m - 3)))


def _mask(g: np.ndarray, k: int) -> np.ndarray:
    """``M_ij = 1`` for the ``k`` largest ``g_ij``, ``j ≠ i``, ties to the lowest ``j``."""
    m = g.shape[0]
    out = np.zeros((m, m), dtype=bool)
    cols = np.arange(m)
    for i in range(m):
        others = cols[cols != i]
        order = np.lexsort((others, -g[i, others]))  # by value descending, then index
        out[i, others[order[:k]]] = True
    return out


def _unit(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, n, out=np.zeros_like(x), where=n > 0)


def ref_cknna(x: np.ndarray, y: np.ndarray, k: int, normalize: bool = True,
              guard: float = 0.0) -> float:
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if normalize:
        x, y = _unit(x), _unit(y)
    kx, ky = x @ x.T, y @ y.T
    mx, my = _mask(kx, k), _mask(ky, k)

    def align(a: np.ndarray, ma: np.ndarray, b: np.ndarray, mb: np.ndarray) -> float:
        mm = ma & mb
        return _hsic_unbiased(np.where(mm, a, 0.0), np.where(mm, b, 0.0))

    return align(kx, mx, ky, my) / (np.sqrt(align(kx, mx, kx, mx) * align(ky, my, ky, my))
                                    + guard)


def _layers(m: int = 120, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = llm_like(m, 16, seed)  # offsets 50–1000x the spread
    y = (x - x.mean(0)) @ rng.standard_normal((16, 24)) + 3 * rng.standard_normal((m, 24))
    z = rng.standard_normal((m, 9)) * 1e-3
    return {"x": x, "y": y, "z": z}


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("k", [1, 5, 10])
def test_equal_to_the_paper_formula(normalize: bool, k: int) -> None:
    d = _layers()
    r = ls.cknna(d, k=k, normalize=normalize, progress=False)
    names = list(d)
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            want = 1.0 if i == j else ref_cknna(d[a], d[b], k, normalize)
            assert abs(r.values[i, j] - want) < 1e-10, (a, b, r.values[i, j], want)
    # not symmetric: the masked Grams are not, and 1ᵀK̃L̃1 ≠ 1ᵀL̃K̃1
    assert r.values[0, 1] != r.values[1, 0]
    assert r.meta["k"] == k and r.meta["normalize"] == normalize and r.meta["n"] == 120


def test_two_sources_a_sample_and_widths_that_differ() -> None:
    d = _layers(300, 1)
    rng = np.random.default_rng(5)
    e = {"u": d["y"] @ rng.standard_normal((24, 50)), "v": rng.standard_normal((300, 3))}
    r = ls.cknna(d, e, k=7, sample=150, seed=4, progress=False)
    idx = np.sort(np.random.default_rng(4).choice(300, size=150, replace=False))
    for i, a in enumerate(d):
        for j, b in enumerate(e):
            want = ref_cknna(d[a][idx], e[b][idx], 7)
            assert abs(r.values[i, j] - want) < 1e-10
    assert r.values.shape == (3, 2) and r.meta["n"] == 150 and r.meta["seed"] == 4


def test_the_neighbour_sets_are_mutual_knn_s() -> None:
    # with unit-norm rows, the mask is mutual_knn's neighbour overlap
    d = _layers(200, 2)
    for a, b in (("x", "y"), ("y", "z")):
        xa, xb = _unit(d[a]), _unit(d[b])
        mm = _mask(xa @ xa.T, 6) & _mask(xb @ xb.T, 6)
        overlap = mm.sum() / (200 * 6)
        got = ls.mutual_knn({a: d[a], b: d[b]}, k=6, sample=None, progress=False).values[0, 1]
        assert abs(got - overlap) < 1e-12


def test_invariances_and_no_additive_guard() -> None:
    d = _layers(300, 3)
    q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((24, 24)))
    rot = {"x": d["x"], "y": d["y"] @ q}
    a = ls.cknna(d, k=10, progress=False).values
    b = ls.cknna(rot, k=10, progress=False).values
    assert abs(a[0, 1] - b[0, 1]) < 1e-10  # a rotation keeps every inner product
    scaled = ls.cknna({"x": d["x"] * 1e-6, "y": d["y"] * 1e6}, k=10, normalize=False,
                      progress=False).values[0, 1]
    raw = ls.cknna({"x": d["x"], "y": d["y"]}, k=10, normalize=False, progress=False)
    assert abs(scaled - raw.values[0, 1]) < 1e-10  # no scale enters the ratio
    # the authors' 1e-6 guard moves the value (by far more at a small scale)
    rng = np.random.default_rng(1)
    u = rng.standard_normal((300, 16))
    small = {"u": u * 1e-2, "v": (u @ rng.standard_normal((16, 8)) + rng.standard_normal(
        (300, 8))) * 1e-2}
    ours = ls.cknna(small, k=10, normalize=False, progress=False).values[0, 1]
    assert abs(ours - ref_cknna(small["u"], small["v"], 10, normalize=False)) < 1e-10
    guarded = ref_cknna(small["u"], small["v"], 10, normalize=False, guard=1e-6)
    assert abs(guarded - ours) > 0.1 * abs(ours)
    unit_guarded = ref_cknna(d["x"], d["y"], 10, guard=1e-6)
    assert 1e-7 < abs(unit_guarded - a[0, 1]) < 1e-2


def test_zero_layer_is_nan_and_stores(tmp_path: Path) -> None:
    d = _layers(80, 4)
    d["dead"] = np.zeros((80, 5))
    r = ls.cknna(d, k=5, progress=False)
    assert np.isnan(r.values[3]).all() and np.isnan(r.values[:, 3]).all()
    assert np.isfinite(r.values[:3, :3]).all()
    p = tmp_path / "s"
    ls.write_store(p, {k: v.astype(np.float32) for k, v in d.items() if k != "dead"},
                   dtype="bfloat16", shard_bytes=4 << 10)
    s = ls.open(p)
    r = ls.cknna(s, k=5, progress=False)
    wide = {x: s.read(x, 0, 80, dtype=np.float64) for x in s.layers}
    assert abs(r.values[0, 1] - ref_cknna(wide["x"], wide["y"], 5)) < 1e-10


def test_arguments_and_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = _layers(30, 5)
    for kw in ({"k": 0}, {"k": 30}, {"k": 2.5}, {"sample": 3}, {"normalize": "yes"}):
        with pytest.raises(InvalidArgumentError):
            ls.cknna(d, progress=False, **kw)  # type: ignore[arg-type]
    from layerscope.cli import main

    p = tmp_path / "s"
    ls.write_store(p, d)
    assert main(["cknna", str(p), "-k", "4", "--out", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "cknna | k = 4, unit-norm rows" in out
    back = ls.load_result(tmp_path / "r.json")
    np.testing.assert_array_equal(back.values, ls.cknna(d, k=4, progress=False).values)
