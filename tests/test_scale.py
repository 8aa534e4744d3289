"""Numbers at any scale (issue 32, slice 1): every measure on layers far from unit scale —
f32 stores near 1e±18 and beyond, subnormal f32, f64 data near 1e±200, a lone f32 outlier
near 1e38 — against independent f64 references (numpy, from the papers' formulas, on the
stored values) or, for the measures already checked against references at unit scale,
against the same data brought back to unit scale exactly (a power of two).

Before: ×1e18 f32 gave linear CKA 0.000 (exact 0.769), ×1e-25 gave 1.000, one 9.9e37 outlier
0.0 instead of 0.0615; f64 ×1e±200 NaN, mutual kNN 1.0, TwoNN "every row a duplicate".
"""

from __future__ import annotations

import warnings
from pathlib import Path

import layerscope as ls
import numpy as np
import pytest


def _layers(n: int = 200, seed: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n, 12)) + 4.0  # an offset, as LLM activations have
    b = np.tanh(a @ rng.standard_normal((12, 9))) + 0.3 * rng.standard_normal((n, 9))
    c = rng.standard_normal((n, 7))
    return {"a": a, "b": b, "c": c}


def _unit(x: np.ndarray) -> np.ndarray:
    """``x`` brought to unit scale by a power of two (exact)."""
    m = float(np.max(np.abs(x - x.mean(axis=0))))
    return np.ldexp(x, -(int(np.frexp(m)[1]) - 1)) if m > 0 else x


def cka_ref(x: np.ndarray, y: np.ndarray, debiased: bool = False) -> float:
    """Linear CKA from the formula (Kornblith et al. 2019; unbiased HSIC of Song et al. 2012,
    eq. 5), f64, on each layer first brought to unit scale (exact: CKA is scale free)."""
    x, y = _unit(x.astype(np.float64)), _unit(y.astype(np.float64))
    x, y = x - x.mean(0), y - y.mean(0)
    k, l_ = x @ x.T, y @ y.T
    n = k.shape[0]

    def hsic(k: np.ndarray, l_: np.ndarray) -> float:
        if not debiased:
            h = np.eye(n) - 1.0 / n
            return float(np.sum((h @ k @ h) * (h @ l_ @ h)))
        kt, lt = k - np.diag(np.diag(k)), l_ - np.diag(np.diag(l_))
        one = np.ones(n)
        return float(np.sum(kt * lt) + (one @ kt @ one) * (one @ lt @ one) / ((n - 1) * (n - 2))
                     - 2.0 * (one @ kt @ lt @ one) / (n - 2))

    return hsic(k, l_) / np.sqrt(hsic(k, k) * hsic(l_, l_))


def _store(tmp_path: Path, arrays: dict[str, np.ndarray], name: str, dtype: str) -> ls.ActivationStore:
    return ls.write_store(tmp_path / name, arrays, dtype=dtype, shard_bytes=20_000)


@pytest.mark.parametrize("factor", [1e18, 1e19, 1e25, 1e30, 1e-25, 1e-30, 1e-38])
def test_f32_stores_far_from_unit_scale(tmp_path: Path, factor: float) -> None:
    """The default f32 products (compute="auto" on an f32 store), every route."""
    x = _layers()
    s = _store(tmp_path, {"a": x["a"] * factor, "b": x["b"], "c": x["c"] * factor}, "s",
               "float32")
    stored = {k: s.read(k, dtype=np.float64) for k in s.layers}
    for estimator in ("biased", "debiased"):
        want = np.array([[cka_ref(stored[p], stored[q], estimator == "debiased")
                          for q in s.layers] for p in s.layers])
        for strategy in ("single-pass", "tiled", "gram"):
            kw = {"max_memory": 110_000} if strategy == "tiled" else {}
            r = ls.cka(s, estimator=estimator, strategy=strategy, progress=False, **kw)
            assert r.meta["compute"] == "float32"
            np.testing.assert_allclose(r.values, want, atol=2e-6,
                                       err_msg=f"{strategy} {estimator} ×{factor:g}")


def test_an_f32_outlier_near_the_limit(tmp_path: Path) -> None:
    """One finite value of 9.9e37 (a flipped exponent bit) in an f32 store: its blocks take
    f64 products; the biased CKA is the f64 reference's (it was 0.0)."""
    x = _layers()
    a = x["a"].copy()
    a[17, 3] = 9.9e37
    s = _store(tmp_path, {"a": a, "b": x["b"]}, "s", "float32")
    stored = {k: s.read(k, dtype=np.float64) for k in s.layers}
    want = cka_ref(stored["a"], stored["b"])
    for strategy in ("single-pass", "tiled", "gram"):
        kw = {"max_memory": 110_000} if strategy == "tiled" else {}
        got = ls.cka(s, strategy=strategy, progress=False, **kw).values[0, 1]
        assert got == pytest.approx(want, rel=1e-6), strategy
        assert 0.0 < got < 1.0


@pytest.mark.parametrize("factor", [1e200, 1e-200, 2.0**-1040])
def test_f64_layers_near_the_ends_of_the_range(factor: float) -> None:
    x = _layers()
    moved = {**x, "a": x["a"] * factor}
    for estimator in ("biased", "debiased"):
        for strategy in ("single-pass", "tiled", "gram"):
            kw = {"max_memory": 125_000} if strategy == "tiled" else {}
            got = ls.cka(moved, estimator=estimator, strategy=strategy, progress=False, **kw)
            ref = ls.cka(x, estimator=estimator, strategy=strategy, progress=False, **kw)
            np.testing.assert_allclose(got.values, ref.values, rtol=1e-9, atol=1e-11)
    for method in ("procrustes", "cca", "svcca", "subspace"):
        got = ls.alignment(moved, method=method, k=3, progress=False).values
        ref = ls.alignment(x, method=method, k=3, progress=False).values
        np.testing.assert_allclose(got, ref, rtol=1e-8, atol=1e-10, err_msg=method)
    for method in ("twonn", "mle", "gride"):
        got = ls.intrinsic_dimension(moved, method=method, sample=None, progress=False)
        ref = ls.intrinsic_dimension(x, method=method, sample=None, progress=False)
        assert got.values["a"] == pytest.approx(ref.values["a"], rel=1e-9), method
    np.testing.assert_allclose(ls.rsa(moved, sample=None, progress=False).values,
                               ls.rsa(x, sample=None, progress=False).values, atol=1e-12)
    for normalize in (False, True):
        got = ls.mutual_knn(moved, k=5, sample=None, normalize=normalize, progress=False)
        ref = ls.mutual_knn(x, k=5, sample=None, normalize=normalize, progress=False)
        np.testing.assert_array_equal(got.values, ref.values)
    got = ls.cka(moved, kernel="rbf", sample=None, progress=False)
    ref = ls.cka(x, kernel="rbf", sample=None, progress=False)
    np.testing.assert_allclose(got.values, ref.values, rtol=1e-9)
    # the reported bandwidths are in the data's units
    assert got.meta["bandwidths_a"]["a"] == pytest.approx(
        ref.meta["bandwidths_a"]["a"] * factor, rel=1e-12)
    for kernel in ("linear", "rbf"):
        got = ls.cka(moved, kernel=kernel, estimator="minibatch", batch_size=50, progress=False)
        ref = ls.cka(x, kernel=kernel, estimator="minibatch", batch_size=50, progress=False)
        np.testing.assert_allclose(got.values, ref.values, rtol=1e-9, atol=1e-12)


def test_spectra_are_reported_in_the_data_units() -> None:
    """Eigenvalues, total variance and rank tolerance scale by factor²; the ratios do not."""
    x = _layers()
    k = 300  # 2^600 ≈ 4e180: the squares (1e361) are beyond f64; the eigenvalues ×2^600 not
    moved = {**x, "a": np.ldexp(x["a"], k // 2)}
    got, ref = ls.spectrum(moved, progress=False), ls.spectrum(x, progress=False)
    np.testing.assert_allclose(got.eigenvalues["a"], np.ldexp(ref.eigenvalues["a"], k),
                               rtol=1e-10)
    for key in ("effective_rank", "participation_ratio", "stable_rank", "pca_id_90", "rank"):
        assert got.table["a"][key] == pytest.approx(ref.table["a"][key], rel=1e-10), key
    assert got.table["a"]["total_variance"] == pytest.approx(
        np.ldexp(ref.table["a"]["total_variance"], k), rel=1e-10)
    np.testing.assert_allclose(got.eigenvalues["b"], ref.eigenvalues["b"], rtol=1e-12)


def test_ordinary_layers_are_not_touched() -> None:
    """Within 2^±40 of unit scale nothing is rescaled: the same bits as before."""
    x = _layers()
    for factor in (2.0**39, 2.0**-39):
        moved = {**x, "a": x["a"] * factor}
        r = ls.cka(moved, progress=False)
        ref = ls.cka(x, progress=False)
        np.testing.assert_allclose(r.values, ref.values, rtol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ls.cka(x, progress=False)


def test_a_value_beyond_the_products_is_an_error_not_a_number() -> None:
    """An f64 value whose square is beyond f64 after the layer's unit was set by the rows
    before it (hand-fed accumulator): an error naming the layer."""
    from layerscope import _native

    x = _layers()
    acc = _native.MomentAccumulator([12, 9], ["a", "b"])
    acc.update([x["a"][:100], x["b"][:100]])
    late = x["a"][100:].copy()
    late[3, 2] = 1e200
    acc.update([late, x["b"][100:]])
    with pytest.raises(ls.NonFiniteError, match="overflow"):
        acc.finalize()


def test_nan_comes_with_its_reason(tmp_path: Path) -> None:
    """A NaN cell names why, in meta and in a warning: a constant layer (zero variance), or
    a debiased self-HSIC that is not positive (the f32 outlier above dominates its layer)."""
    x = _layers()
    a = x["a"].copy()
    a[17, 3] = 9.9e37
    s = _store(tmp_path, {"a": a, "b": x["b"], "k": np.full((200, 3), 7.0)}, "s", "float32")
    with pytest.warns(RuntimeWarning, match="k: zero variance") as rec:
        r = ls.cka(s, estimator="debiased", progress=False)
    assert rec[0].filename == __file__  # the warning points at the caller
    assert "zero variance" in r.meta["nan_reasons"]["k"]
    assert np.isnan(r.values[2]).all()
    if np.isnan(r.values[0, 1]):
        assert "self-HSIC is not positive" in r.meta["nan_reasons"]["a"]
        assert 0.0 < r.extra["biased"][0, 1] < 1.0
    assert "b" not in r.meta["nan_reasons"]


def test_cca_ridges_are_reported_in_the_data_units() -> None:
    """n ≤ d: CCA adds r = eps·tr(C_ii)/d_i; the reported ridge is the data's (×factor²)."""
    rng = np.random.default_rng(5)
    a = rng.standard_normal((15, 20))
    x = {"a": a, "b": np.tanh(a[:, :8])}
    moved = {**x, "a": np.ldexp(a, 400)}
    got = ls.alignment(moved, method="cca", progress=False)
    ref = ls.alignment(x, method="cca", progress=False)
    np.testing.assert_allclose(got.values, ref.values, rtol=1e-9)
    assert ref.meta["row_ridge"][0] > 0
    assert got.meta["row_ridge"][0] == pytest.approx(np.ldexp(ref.meta["row_ridge"][0], 800),
                                                     rel=1e-12)
    assert got.meta["row_ridge"][1] == pytest.approx(ref.meta["row_ridge"][1], rel=1e-12)
