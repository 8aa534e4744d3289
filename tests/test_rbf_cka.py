"""RBF CKA (biased, debiased, minibatch) against a numpy f64 reference written from the
formulas: explicit Grams, Kornblith's median bandwidth, HKH, Song et al.'s unbiased HSIC."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from conftest import hsic_biased, hsic_unbiased, noisy_linear
from layerscope import _native, cka
from layerscope._sample import sample_indices
from layerscope.errors import InvalidArgumentError, MemoryBudgetError, MismatchError
from layerscope.results import MatrixResult


def rbf_cka(a: Any, b: Any, la: Any, lb: Any, **kw: Any) -> MatrixResult:
    """RBF CKA through the public function (the table of ``la`` × ``lb``)."""
    return cka(a, b, kernel="rbf", layers=la, other_layers=lb, **kw)


def ref_gram(x: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    d2 = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)  # exact, no GEMM
    bw = sigma * np.sqrt(np.median(d2))  # all m² entries, diagonal included
    return np.exp(-d2 / (2 * bw**2))


def ref_cka(x: np.ndarray, y: np.ndarray, unbiased: bool, sigma: float = 1.0) -> float:
    k, lg = ref_gram(x, sigma), ref_gram(y, sigma)
    f = hsic_unbiased if unbiased else hsic_biased
    return f(k, lg) / np.sqrt(f(k, k) * f(lg, lg))


def make_layers(m: int = 120, seed: int = 0) -> dict[str, np.ndarray]:
    rng, out = noisy_linear(m, 16, 24, 0.3, seed)
    out["tanh"] = np.tanh(out["x"][:, :8] * 2.0)
    out["indep"] = rng.standard_normal((m, 10))
    return out


@pytest.mark.parametrize("estimator", ["biased", "debiased"])
@pytest.mark.parametrize("sigma", [1.0, 0.5])
def test_matches_reference(estimator: str, sigma: float) -> None:
    layers = make_layers()
    res = rbf_cka(layers, None, None, None, estimator=estimator, sigma=sigma, progress=False)
    names = list(layers)
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            ref = ref_cka(layers[a], layers[b], estimator == "debiased", sigma)
            assert res.values[i, j] == pytest.approx(ref, rel=1e-9, abs=1e-12)
    np.testing.assert_array_equal(np.diag(res.values), 1.0)
    assert res.meta["kernel"] == "rbf" and res.meta["n"] == 120
    bw = np.sqrt(np.median(((layers["x"][:, None] - layers["x"][None]) ** 2).sum(-1)))
    assert res.meta["bandwidths_a"]["x"] == pytest.approx(sigma * bw, rel=1e-12)


def test_debiased_can_be_negative_never_clamped() -> None:
    layers = make_layers(m=60, seed=3)
    res = rbf_cka(layers, None, ["x"], None, estimator="debiased", progress=False)
    res2 = rbf_cka(
        {"x": layers["x"]},
        {"x": layers["indep"]},
        ["x"],
        ["x"],
        estimator="debiased",
        progress=False,
    )
    ref = ref_cka(layers["x"], layers["indep"], True)
    assert res2.values[0, 0] == pytest.approx(ref, rel=1e-9, abs=1e-12)
    assert res.values.shape == (1, 1)
    vals = [
        rbf_cka(
            {"a": make_layers(40, s)["x"]},
            {"b": make_layers(40, s + 100)["indep"]},
            None,
            None,
            estimator="debiased",
            progress=False,
        ).values[0, 0]
        for s in range(8)
    ]
    assert min(vals) < 0  # unbiased estimates of ~0 straddle 0


def test_cross_sources_and_offsets_f32() -> None:
    rng = np.random.default_rng(5)
    m = 100
    x = rng.standard_normal((m, 20))
    y = np.tanh(x @ rng.standard_normal((20, 12)))
    # LLM-like: f32 storage with mean offsets of 500x the spread
    x32 = (x + 500.0 * rng.standard_normal(20)).astype(np.float32)
    y32 = (y + 800.0 * rng.standard_normal(12)).astype(np.float32)
    for est in ("biased", "debiased"):
        res = rbf_cka({"x": x32}, {"y": y32}, None, None, estimator=est, progress=False)
        ref = ref_cka(x32.astype(np.float64), y32.astype(np.float64), est == "debiased")
        assert res.values[0, 0] == pytest.approx(ref, rel=1e-6)
        # translation invariance against the un-offset data (up to f32 rounding of the data)
        assert res.values[0, 0] == pytest.approx(ref_cka(x, y, est == "debiased"), abs=1e-3)


@pytest.mark.parametrize("scale", [1e-4, 1e4])
def test_scales(scale: float) -> None:
    layers = make_layers(m=80)
    a = rbf_cka(layers, None, None, None, progress=False).values
    b = rbf_cka({k: v * scale for k, v in layers.items()}, None, None, None, progress=False).values
    np.testing.assert_allclose(a, b, rtol=1e-9)


def test_minibatch_matches_reference() -> None:
    layers = make_layers(m=130)
    bs = 40
    res = cka(layers, kernel="rbf", estimator="minibatch", layers=["x", "lin"],
              batch_size=bs, progress=False)
    xs, ys = layers["x"], layers["lin"]
    batches = [slice(s, min(s + bs, 130)) for s in range(0, 130, bs)]
    batches = [b for b in batches if b.stop - b.start >= 4]
    kxy = np.mean([hsic_unbiased(ref_gram(xs[b]), ref_gram(ys[b])) for b in batches])
    kxx = np.mean([hsic_unbiased(ref_gram(xs[b]), ref_gram(xs[b])) for b in batches])
    kyy = np.mean([hsic_unbiased(ref_gram(ys[b]), ref_gram(ys[b])) for b in batches])
    assert res.values[0, 1] == pytest.approx(kxy / np.sqrt(kxx * kyy), rel=1e-9)
    assert res.meta["n_batches"] == 4 and res.meta["n"] == 130
    # the same rows as float32 arrays, a column slice of a wider array (read in place) and
    # float16: the one Rust pass reads each like a store's shards
    wide = np.concatenate([xs, np.zeros((130, 3))], axis=1).astype(np.float32)
    sliced = cka({"x": wide[:, : xs.shape[1]], "lin": ys.astype(np.float32)}, kernel="rbf",
                 estimator="minibatch", batch_size=bs, progress=False)
    assert sliced.values[0, 1] == pytest.approx(kxy / np.sqrt(kxx * kyy), rel=1e-5)
    assert sliced.meta["engine"] == "minibatch (rust-arrays)"


def test_sampling_duplicates_and_constant_column() -> None:
    layers = make_layers(m=300)
    res = rbf_cka(layers, None, ["x", "lin"], None, sample=100, seed=3, progress=False)
    idx = sample_indices(300, 100, 3)
    ref = ref_cka(layers["x"][idx], layers["lin"][idx], False)
    assert res.values[0, 1] == pytest.approx(ref, rel=1e-9)
    x = layers["x"][:100].copy()
    x[:, 3] = 7.0  # constant column
    x[50:60] = x[:10]  # duplicated rows
    y = layers["tanh"][:100]
    res = rbf_cka({"x": x, "y": y}, None, None, None, estimator="debiased", progress=False)
    assert res.values[0, 1] == pytest.approx(ref_cka(x, y, True), rel=1e-9)


def test_errors() -> None:
    layers = make_layers(m=50)
    with pytest.raises(MemoryBudgetError):
        rbf_cka(layers, None, None, None, progress=False, max_memory=1000)
    with pytest.raises(InvalidArgumentError):
        rbf_cka(layers, None, None, None, estimator="unbiased", progress=False)
    with pytest.raises(InvalidArgumentError):
        rbf_cka(layers, None, None, None, sigma=0.0, progress=False)
    with pytest.raises(MismatchError):
        rbf_cka(layers, {"z": np.zeros((49, 3))}, None, None, progress=False)
    same = np.ones((10, 3))
    with pytest.raises(InvalidArgumentError, match="median"):
        _native.rbf_hsic([same], None)


def test_tiny_and_non_finite_inputs_are_typed_errors() -> None:
    from layerscope.errors import NonFiniteError

    layers = make_layers(m=30)
    with pytest.raises(InvalidArgumentError):  # unbiased HSIC needs m >= 4
        rbf_cka({"x": layers["x"][:3]}, None, None, None, estimator="debiased", progress=False)
    with pytest.raises(InvalidArgumentError):
        _native.rbf_hsic([layers["x"][:1]], None)
    with pytest.raises(InvalidArgumentError):
        _native.rbf_hsic([], None)
    bad = layers["x"].copy()
    bad[6, 1] = np.nan
    with pytest.raises(NonFiniteError, match="row 6"):
        rbf_cka({"b": bad}, None, None, None, progress=False)
    with pytest.raises(NonFiniteError):
        _native.rbf_hsic([bad], None)


def test_progress_callback_and_interrupt() -> None:
    layers = make_layers(m=60)
    calls: list[tuple[int, int]] = []
    rbf_cka(layers, None, None, None, progress=lambda d, t: calls.append((d, t)))
    assert calls and calls[-1][0] == calls[-1][1]

    def stop(done: int, total: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        rbf_cka(layers, None, None, None, progress=stop)


@pytest.mark.parametrize(
    ("kernel", "estimator", "exact"),
    [("linear", "biased", False), ("linear", "debiased", False), ("rbf", "biased", True),
     ("rbf", "debiased", True), ("linear", "minibatch", True), ("rbf", "minibatch", True)],
)
def test_one_ratio_rule_for_every_estimator(kernel: str, estimator: str, exact: bool) -> None:
    """Every CKA ends in the one ratio of ``measures::hsic``: a layer with itself is exactly
    1, two copies of a layer give 1 (exactly where their HSIC values are computed the same
    way), and a layer with no variance gives NaN, never a number."""
    x = make_layers(m=64)["lin"]
    layers = {"a": x, "b": x.copy(), "c": 0.3 * x[:, ::-1] + 1.0}
    res = cka(layers, kernel=kernel, estimator=estimator, progress=False,
              **({"batch_size": 32} if estimator == "minibatch" else {}))
    np.testing.assert_array_equal(np.diag(res.values), 1.0)
    if exact:
        assert res.values[0, 1] == 1.0
    else:
        assert res.values[0, 1] == pytest.approx(1.0, abs=1e-12)
    if kernel == "linear":  # a constant layer has no RBF bandwidth (a typed error instead)
        flat = cka({"a": x, "k": np.ones((64, 3))}, kernel=kernel, estimator=estimator,
                   progress=False, **({"batch_size": 32} if estimator == "minibatch" else {}))
        assert np.isnan(flat.values[0, 1]) and np.isnan(flat.values[1, 1])
