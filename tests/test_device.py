"""The torch engine (``device=``, :mod:`layerscope._device`) against the Rust engine.

``device="cpu"`` runs the torch engine's arithmetic on the CPU, so these run in every
``make test``: every plan of linear CKA (single pass, tiles with cross tiles and split
layers, the Gram route), one and two sources, f64 and f32 products, on the adversarial data
of the CKA tests (offsets 50–1000× the spread, a constant column, duplicated rows, a layer at
1e-3, n < d), bf16/f16 stores, layers far from unit scale, NaN; equal to the Rust engine to
1e-10 (f64) and 1e-6 (f32), and to the f64 reference of the formula. The tile sums the device
computes are the core's own serialised partials: they merge with the Rust engine's.
CUDA-only checks are marked and skipped without a CUDA device.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import layerscope
import numpy as np
import pytest
from layerscope import _native
from layerscope._device.devices import resolve_device
from layerscope._device.feed import _Layers
from layerscope._device.passes import run_tile
from layerscope._source import native_part, resolve
from layerscope.errors import InvalidArgumentError, NonFiniteError

torch = pytest.importorskip("torch")

from conftest import TILED_BUDGET, adversarial, adversarial_pair, llm_like, ref_linear  # noqa: E402

CUDA = pytest.mark.skipif(not torch.cuda.is_available(),
                          reason="needs a CUDA device (torch.cuda.is_available() is False)")

TOL = {"float64": 1e-10, "float32": 1e-6}


def _both(source: Any, other: Any = None, **kw: Any) -> tuple[Any, Any]:
    """The Rust engine's result and the torch engine's (device='cpu') for the same call."""
    rust = layerscope.cka(source, other, progress=False, **kw)
    dev = layerscope.cka(source, other, progress=False, device="cpu", **kw)
    return rust, dev


@pytest.mark.parametrize("compute", ["float64", "float32"])
@pytest.mark.parametrize("strategy", ["single-pass", "tiled", "gram"])
def test_linear_cka_every_plan_equals_the_rust_engine(compute: str, strategy: str) -> None:
    """Adversarial layers, biased and debiased, every plan: the torch engine equals the Rust
    engine (1e-10 in f64, 1e-6 in f32) and the f64 reference of the formula; the plan is the
    same; meta names the device."""
    d = adversarial()
    arrays = {k: v.astype(np.float32) if compute == "float32" else v for k, v in d.items()}
    budget = TILED_BUDGET if strategy == "tiled" else None
    for est in ("biased", "debiased"):
        rust, dev = _both(arrays, estimator=est, compute=compute, strategy=strategy,
                          max_memory=budget)
        assert dev.meta["plan"]["strategy"] == rust.meta["plan"]["strategy"] == strategy
        assert dev.meta["plan"]["passes"] == rust.meta["plan"]["passes"]
        if strategy == "tiled":
            assert dev.meta["plan"]["passes"] > 3  # cross tiles, the 300-wide layer split
        assert dev.meta["device"] == "cpu" and "device" not in rust.meta
        np.testing.assert_allclose(dev.values, rust.values, rtol=0, atol=TOL[compute])
        stored = {k: np.asarray(v, dtype=np.float64) for k, v in arrays.items()}
        names = list(stored)
        for i, a in enumerate(names):
            for j, b in enumerate(names):
                if i < j:
                    want = ref_linear(stored[a], stored[b], est)
                    assert abs(dev.values[i, j] - want) < 1e-6 if compute == "float32" \
                        else abs(dev.values[i, j] - want) < 1e-9, (est, a, b)


@pytest.mark.parametrize("strategy", ["single-pass", "tiled", "gram"])
def test_two_stores_every_plan(tmp_path: Path, strategy: str) -> None:
    """Two stores over the same rows (small shards: blocks cross shard ends), f32 products:
    the cross-model table equals the Rust engine's."""
    _, _, pa, pb = adversarial_pair(tmp_path)
    budget = TILED_BUDGET if strategy == "tiled" else None
    for est in ("biased", "debiased"):
        rust, dev = _both(pa, pb, estimator=est, compute="float32", strategy=strategy,
                          max_memory=budget)
        assert dev.values.shape == rust.values.shape == (4, 2)
        np.testing.assert_allclose(dev.values, rust.values, rtol=0, atol=1e-6)


@pytest.mark.parametrize("compute", ["float64", "float32"])
def test_a_shift_far_from_the_mean(compute: str) -> None:
    """2048 rows whose odd rows sit 8 spreads above the even ones: the 1024 rows the shift is
    sampled from are all odd, so the shifted data's mean is far from 0 and every term of the
    centring (the products of ``u`` with the squared norms ``r`` included) matters. Tiles
    (cross tiles) and one pass, biased and debiased: the torch engine equals the Rust engine
    and the f64 reference."""
    rng = np.random.default_rng(11)
    n = 2048
    x = rng.standard_normal((n, 40))
    x[1::2] += 8.0
    y = x[:, :20] @ rng.standard_normal((20, 30)) / 4 + rng.standard_normal((n, 30))
    z = rng.standard_normal((n, 24)) + x[:, :24] ** 2 / 10
    arrays = {k: v.astype(np.float32) if compute == "float32" else v
              for k, v in {"x": x, "y": y, "z": z}.items()}
    for strategy, budget in (("single-pass", None), ("tiled", "600K")):
        for est in ("biased", "debiased"):
            rust, dev = _both(arrays, estimator=est, compute=compute, strategy=strategy,
                              max_memory=budget)
            assert rust.meta["shift_offset"] > 0.9  # |ū| ≈ σ of all rows
            if strategy == "tiled":
                assert dev.meta["plan"]["passes"] >= 3
            np.testing.assert_allclose(dev.values, rust.values, rtol=0, atol=TOL[compute])
            want = ref_linear(np.asarray(arrays["x"], np.float64),
                              np.asarray(arrays["z"], np.float64), est)
            assert abs(dev.values[0, 2] - want) < 1e-6


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_half_precision_stores(tmp_path: Path, dtype: str) -> None:
    """bf16/f16/f32 stores of LLM-like data (offsets of 50–1000× the spread; f16 a smaller
    range), more rows than one block: the torch engine equals the Rust engine in f32 and f64
    products and the f64 reference of the stored values to 1e-6."""
    n = 2600
    rng = np.random.default_rng(21)
    x = llm_like(n, 40, 22)
    y = x[:, :24] @ rng.standard_normal((24, 56)) / 4 + llm_like(n, 56, 23)
    arrays = {"x": x, "y": y}
    if dtype == "float16":
        arrays = {k: v / 64 for k, v in arrays.items()}
    p = tmp_path / "s"
    layerscope.write_store(p, {k: v.astype(np.float32) for k, v in arrays.items()},
                           dtype=dtype, shard_bytes=256 << 10)
    s = layerscope.open(p)
    stored = {k: s.read(k, dtype=np.float64) for k in s.layers}
    for compute in ("float32", "float64"):
        rust, dev = _both(p, estimator="debiased", compute=compute)
        np.testing.assert_allclose(dev.values, rust.values, rtol=0, atol=TOL[compute])
        want = ref_linear(stored["x"], stored["y"], "debiased")
        assert abs(dev.values[0, 1] - want) < 1e-6


@pytest.mark.parametrize("scale", [1e-30, 1e30, 1e200])
def test_layers_far_from_unit_scale(scale: float) -> None:
    """A layer at 1e±30 / 1e200 next to an ordinary one: scaled by the same power of two as
    on the Rust engine (every plan), so the same numbers; f32 blocks the core would do in f64
    are done in f64 here too."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((200, 24))
    arrays = {"x": x, "y": (x[:, :12] @ rng.standard_normal((12, 16)) + rng.standard_normal(
        (200, 16))) * scale, "z": rng.standard_normal((200, 8)) + 1e3}
    for strategy in ("single-pass", "gram"):
        for compute in ("float64", "float32"):
            if scale == 1e200 and compute == "float32":
                continue  # not a float32 array
            arr = arrays if compute == "float64" or scale != 1e200 else arrays
            rust, dev = _both(arr, estimator="debiased", compute=compute, strategy=strategy)
            assert np.isfinite(dev.values).all()
            np.testing.assert_allclose(dev.values, rust.values, rtol=0, atol=TOL[compute])
    want = ref_linear(arrays["x"], arrays["y"] / scale, "biased")
    _, dev = _both(arrays)
    assert abs(dev.values[0, 1] - want) < 1e-9


def test_outlier_block_done_in_f64() -> None:
    """A lone f32 outlier near 1e37 (its block's f32 products would overflow): the device does
    that block in f64 as the core does; no Inf, the same CKA."""
    rng = np.random.default_rng(9)
    x = rng.standard_normal((300, 16)).astype(np.float32)
    x[17, 3] = 9.9e36
    arrays = {"x": x, "y": rng.standard_normal((300, 8)).astype(np.float32)}
    rust, dev = _both(arrays, compute="float32")
    assert np.isfinite(dev.values).all()
    np.testing.assert_allclose(dev.values, rust.values, rtol=0, atol=1e-6)


def test_spectrum_alignment_analyze_equal_the_rust_engine() -> None:
    """The moment measures on the device: spectra (eigenvalues, effective rank), every
    alignment method and ``analyze``'s one pass equal the Rust engine's (1e-9 relative)."""
    d = adversarial()
    arrays = {"x": d["x"], "y": d["y"], "w": d["w"]}
    a = layerscope.spectrum(arrays, progress=False)
    b = layerscope.spectrum(arrays, progress=False, device="cpu")
    assert b.meta["device"] == "cpu"
    for name in arrays:
        ea, eb = np.asarray(a.eigenvalues[name]), np.asarray(b.eigenvalues[name])
        np.testing.assert_allclose(eb, ea, rtol=1e-9, atol=1e-12 * ea.max())
    for method in ("subspace", "svcca", "pwcca", "cca", "procrustes"):
        a = layerscope.alignment(arrays, method=method, k=8, progress=False)
        b = layerscope.alignment(arrays, method=method, k=8, progress=False, device="cpu")
        np.testing.assert_allclose(b.values, a.values, rtol=0, atol=1e-9, err_msg=method)
    ra = layerscope.analyze(arrays, k=8, progress=False)
    rb = layerscope.analyze(arrays, k=8, progress=False, device="cpu", compute="float32")
    for key in ("cka", "cka_debiased", "alignment"):
        np.testing.assert_allclose(rb[key].values, ra[key].values, rtol=0, atol=1e-6,
                                   err_msg=key)


def test_alignment_tiles_on_the_device() -> None:
    """Alignment under a budget that needs layer tiles: the same table on the device."""
    d = adversarial()
    a = layerscope.alignment(d, method="procrustes", max_memory="8.5M", progress=False)
    b = layerscope.alignment(d, method="procrustes", max_memory="8.5M", progress=False,
                             device="cpu")
    assert b.meta["passes"] == a.meta["passes"] > 1
    np.testing.assert_allclose(b.values, a.values, rtol=0, atol=1e-10)


def test_device_tiles_are_the_cores_partials() -> None:
    """A tile's sums computed on the device are the core's serialised partial: merged with the
    Rust engine's partial of the same tile over other rows (``merge_partials``), the pair
    statistics equal the Rust engine's single pass over all rows."""
    d = adversarial()
    src = resolve(d)
    names = list(d)
    dims = [d[k].shape[1] for k in names]
    n = src.num_rows
    plan = _native.pair_plan(dims, len(dims), n, None, "float64", 2 << 20, "tiled")["tiles"]
    assert plan is not None and plan.tiles > 3
    nparts = [native_part(src, names)]
    out = _native.PairStatsBuilder(plan, names, n)
    first = {k: v[:60] for k, v in d.items()}  # rows 0..60 by the Rust engine
    rest = {k: v[60:] for k, v in d.items()}  # rows 60.. by the torch engine
    head = resolve(first)
    for t in range(plan.tiles):
        shift = plan.tile_shift(nparts, t)
        cpu = plan.run_tile([native_part(head, names)], names, t, 0, 60, shift)
        # the device's partial over rows 60.. under the same shift and scale
        part = _device_tile(plan, rest, names, t, shift, plan.tile_scale(nparts, t))
        out.add(t, _native.merge_partials(cpu, part))
    st = out.finish()
    want, _ = layerscope._moments.pair_stats(d, progress=False, strategy="single-pass")
    r = list(range(len(names)))
    for deb in (False, True):
        np.testing.assert_allclose(np.asarray(st.cka(r, r, deb)), np.asarray(want.cka(r, r, deb)),
                                   rtol=0, atol=1e-10)


def _device_tile(plan: Any, rows: dict[str, np.ndarray], names: list[str], t: int,
                 shift: np.ndarray, exps: list[int]) -> bytes:
    """``run_tile`` of the torch engine over ``rows`` with a given shift and scale."""
    src = resolve(rows)

    class Fixed:  # the plan with the full source's shift and scale
        def __getattr__(self, k: str) -> Any:
            return getattr(plan, k)

        def tile_shift(self, parts: Any, t: int) -> np.ndarray:
            return shift

        def tile_scale(self, parts: Any, t: int) -> list[int]:
            return exps

    return run_tile(torch, torch.device("cpu"), Fixed(), _Layers([(src, names)]),
                    [native_part(src, names)], t, src.num_rows, compute="float64",
                    check_finite=True, block_rows=37)


def test_nonfinite_values() -> None:
    """NaN: nonfinite='error' names the layer and first row as the Rust engine does;
    'nan' gives NaN cells for that layer (a warning) and the others unchanged."""
    rng = np.random.default_rng(3)
    arrays = {"a": rng.standard_normal((100, 6)), "b": rng.standard_normal((100, 5))}
    arrays["b"][41, 2] = np.nan
    for strategy in ("single-pass", "gram"):
        with pytest.raises(NonFiniteError, match=r'"b".*row 41'):
            layerscope.cka(arrays, device="cpu", strategy=strategy, progress=False)
        with pytest.warns(RuntimeWarning):
            rust = layerscope.cka(arrays, nonfinite="nan", strategy=strategy, progress=False)
        with pytest.warns(RuntimeWarning):
            dev = layerscope.cka(arrays, nonfinite="nan", strategy=strategy, progress=False,
                                 device="cpu")
        np.testing.assert_array_equal(np.isnan(dev.values), np.isnan(rust.values))
        assert dev.values[0, 0] == pytest.approx(1.0)
        assert dev.meta["nonfinite_rows"] == {"b": 41}


def test_device_argument_checks() -> None:
    """Typed errors for what cannot run: an unknown device, CUDA where torch sees none, TF32
    off CUDA, what device= cannot do on Ray; 'auto' without CUDA is the Rust
    engine; the user's TF32 settings are restored after a call."""
    arrays = {"a": np.random.default_rng(0).standard_normal((50, 4))}
    for bad in ("gpu0", "cuda:x", 3):
        with pytest.raises(InvalidArgumentError):
            layerscope.cka(arrays, device=bad, progress=False)
    with pytest.raises(InvalidArgumentError, match="tf32"):
        layerscope.cka(arrays, device="cpu", compute="tf32", progress=False)
    with pytest.raises(InvalidArgumentError, match="tf32"):
        layerscope.cka(arrays, compute="tf32", progress=False)
    # on Ray: the sampled measures run on the nodes' CPUs; Ray picks each task's GPU
    with pytest.raises(InvalidArgumentError, match="nodes' CPUs"):
        layerscope.cka(arrays, kernel="rbf", device="cpu", backend="ray", progress=False)
    with pytest.raises(InvalidArgumentError, match="Ray assigns a GPU"):
        layerscope.cka(arrays, device="cuda:1", backend="ray", progress=False)
    with pytest.raises(InvalidArgumentError, match="tf32"):
        layerscope.cka(arrays, device="cpu", compute="tf32", backend="ray", progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(InvalidArgumentError, match="CUDA"):
            layerscope.cka(arrays, device="cuda", progress=False)
        assert resolve_device("auto") is None
        r = layerscope.cka(arrays, device="auto", progress=False)
        assert "device" not in r.meta
    mm = torch.backends.cuda.matmul
    saved = mm.allow_tf32
    mm.allow_tf32 = True  # the user's (legacy API) setting
    try:
        layerscope.cka(arrays, device="cpu", progress=False)
        assert mm.allow_tf32 is True  # readable again, and unchanged
        mm.allow_tf32 = False
        layerscope.cka(arrays, device="cpu", progress=False)
        assert mm.allow_tf32 is False
        assert torch.get_float32_matmul_precision() in ("highest", "high", "medium")
    finally:
        mm.allow_tf32 = saved


@CUDA
@pytest.mark.parametrize("strategy", ["single-pass", "tiled", "gram"])
def test_cuda_equals_the_rust_engine(strategy: str) -> None:
    """On a CUDA device: every plan equals the Rust engine (f64 1e-10, f32 1e-6); TF32 is an
    approximation stated in meta, within 1e-2."""
    d = adversarial()
    budget = TILED_BUDGET if strategy == "tiled" else None
    for compute in ("float64", "float32"):
        arr = {k: v.astype(np.float32) if compute == "float32" else v for k, v in d.items()}
        rust = layerscope.cka(arr, compute=compute, strategy=strategy, max_memory=budget,
                              progress=False)
        dev = layerscope.cka(arr, compute=compute, strategy=strategy, max_memory=budget,
                             progress=False, device="cuda")
        assert dev.meta["device"].startswith("cuda")
        np.testing.assert_allclose(dev.values, rust.values, rtol=0, atol=TOL[compute])
    arr = {k: v.astype(np.float32) for k, v in d.items()}
    tf = layerscope.cka(arr, compute="tf32", strategy=strategy, max_memory=budget,
                        progress=False, device="cuda")
    assert "approximation" in tf.meta
    np.testing.assert_allclose(tf.values, rust.values, rtol=0, atol=1e-2)


def test_sums_from_elsewhere_are_checked() -> None:
    """What another engine hands to the core is checked: wrong sizes are a MismatchError,
    a non-finite shift or asymmetric pair sums an InvalidArgumentError — never a panic."""
    from layerscope.errors import MismatchError

    plan = _native.TilePlan.single([3, 2], 2, 10)
    names = ["a", "b"]
    ok = dict(shift=np.zeros(5), exps=[0, 0], products=np.zeros((7, 7)), sums=np.zeros(7),
              nonfinite=[None, None])
    assert plan.partial_from_sums(names, 0, 10, **ok)
    for key, bad in (("products", np.zeros((6, 6))), ("sums", np.zeros(6)),
                     ("shift", np.zeros(4)), ("exps", [0]), ("nonfinite", [None])):
        with pytest.raises(MismatchError):
            plan.partial_from_sums(names, 0, 10, **{**ok, key: bad})
    with pytest.raises(InvalidArgumentError):
        plan.partial_from_sums(names, 0, 10, **{**ok, "shift": np.full(5, np.nan)})
    with pytest.raises(InvalidArgumentError):
        plan.partial_from_sums(names, 0, 10, **{**ok, "exps": [0, 5000]})
    with pytest.raises(InvalidArgumentError):
        plan.partial_from_sums(names, 1, 10, **ok)  # no tile 1
    sq = np.eye(2)
    sq[0, 1] = 0.5
    pl = {"strategy": "gram", "passes": 1, "peak_bytes": 1, "block_rows": 10,
          "layer_reads": [1, 1], "madds": 1}
    with pytest.raises(InvalidArgumentError, match="symmetric"):
        _native.PairStats.from_sums(names, [3, 2], 2, 10, sq, np.eye(2), [1.0, 1.0],
                                    np.ones((2, 2), bool), [None, None], pl)
    with pytest.raises(MismatchError):
        _native.PairStats.from_sums(names, [3, 2], 2, 10, np.eye(3), np.eye(2), [1.0, 1.0],
                                    np.ones((2, 2), bool), [None, None], pl)


# --------------------------------------------------------------------- neighbour measures


def _sampled_data() -> dict[str, np.ndarray]:
    """300 rows: LLM-like offsets, a duplicated block of rows (ties, zero distances), a
    constant column, a layer at 1e-150 and one on an integer grid (many equal distances:
    the kNN certificate fails and the exhaustive recheck runs)."""
    rng = np.random.default_rng(17)
    x = llm_like(300, 40, 5)
    x[250:] = x[:50]
    y = np.tanh(x[:, :20] / 100) @ rng.standard_normal((20, 24)) + 0.1 * rng.standard_normal(
        (300, 24))
    y[:, 3] = 2.0
    grid = rng.integers(0, 3, size=(300, 6)).astype(np.float64)
    return {"x": x, "y": y, "tiny": rng.standard_normal((300, 12)) * 1e-150, "grid": grid}


@pytest.mark.parametrize("estimator", ["biased", "debiased"])
def test_rbf_cka_on_the_device(estimator: str) -> None:
    """RBF CKA: the device's distance products, the core's bandwidth, kernel and HSICs: the
    Rust engine's values and bandwidths (1e-10), one source and two."""
    d = _sampled_data()
    rust, dev = _both(d, kernel="rbf", estimator=estimator)
    np.testing.assert_allclose(dev.values, rust.values, rtol=0, atol=1e-10)
    for side in ("bandwidths_a", "bandwidths_b"):
        np.testing.assert_allclose(list(dev.meta[side].values()),
                                   list(rust.meta[side].values()), rtol=1e-12)
    other = {"u": d["y"] @ np.random.default_rng(2).standard_normal((24, 9))}
    rust, dev = _both(d, other, kernel="rbf", estimator=estimator, sample=200, seed=3)
    np.testing.assert_allclose(dev.values, rust.values, rtol=0, atol=1e-10)


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_minibatch_cka_on_the_device(kernel: str) -> None:
    """Minibatch CKA: each minibatch's Gram products on the device, centring, bandwidths and
    the unbiased HSIC in Rust — the Rust engine's values (1e-10), with a sample, a short final
    batch and two sources; a layer far from unit scale."""
    d = _sampled_data()
    rust, dev = _both(d, kernel=kernel, estimator="minibatch", batch_size=64)
    assert dev.meta["device"] == "cpu" and dev.meta["n_batches"] == rust.meta["n_batches"]
    np.testing.assert_allclose(dev.values, rust.values, rtol=0, atol=1e-10)
    other = {"u": d["y"] @ np.random.default_rng(2).standard_normal((24, 9))}
    rust, dev = _both(d, other, kernel=kernel, estimator="minibatch", batch_size=50,
                      sample=230, seed=1)
    np.testing.assert_allclose(dev.values, rust.values, rtol=0, atol=1e-10)


def test_rsa_and_mutual_knn_on_the_device() -> None:
    """RSA (Euclidean / correlation, Spearman / Pearson) and mutual kNN (cosine and
    Euclidean) with duplicated rows and tied distances: the Rust engine's tables."""
    d = _sampled_data()
    d.pop("tiny")  # a correlation RDM needs rows that are not constant: fine; keep it short
    for dis in ("euclidean", "correlation"):
        for cmp in ("spearman", "pearson"):
            kw: dict[str, Any] = dict(dissimilarity=dis, compare=cmp, progress=False)
            data = {k: v for k, v in d.items() if dis == "euclidean" or k != "grid"}
            rust = layerscope.rsa(data, **kw)
            dev = layerscope.rsa(data, device="cpu", **kw)
            assert dev.meta["device"] == "cpu"
            np.testing.assert_allclose(dev.values, rust.values, rtol=0, atol=1e-10)
    for normalize in (True, False):
        rust = layerscope.mutual_knn(d, k=7, normalize=normalize, progress=False)
        dev = layerscope.mutual_knn(d, k=7, normalize=normalize, progress=False, device="cpu")
        np.testing.assert_array_equal(dev.values, rust.values)


@pytest.mark.parametrize("duplicates", ["drop", "keep"])
def test_intrinsic_dimension_on_the_device(duplicates: str) -> None:
    """TwoNN, MLE, GRIDE (and PCA through the moment engine) from the device's kNN: the same
    neighbours and distances, so the same estimates; the kNN graph itself equal, including
    the grid layer whose certificate fails."""
    d = _sampled_data()
    grid = d.pop("grid")  # ties everywhere: r1 = r2, no estimate (its graph is checked below)
    methods = ["twonn", "mle", "gride", "pca"]
    kw: dict[str, Any] = dict(methods=methods, duplicates=duplicates, progress=False)
    with pytest.warns(UserWarning) if duplicates == "keep" else _nothing():
        rust = layerscope.intrinsic_dimensions(d, **kw)
    with pytest.warns(UserWarning) if duplicates == "keep" else _nothing():
        dev = layerscope.intrinsic_dimensions(d, device="cpu", **kw)
    for m in methods:
        assert dev[m].meta["device"] == "cpu"
        for layer in d:
            a, b = rust[m].values[layer], dev[m].values[layer]
            assert (np.isnan(a) and np.isnan(b)) or abs(a - b) <= 1e-10 * max(1.0, abs(a)), \
                (m, layer, a, b)
    from layerscope._device.products import DeviceProducts

    prod = DeviceProducts(torch, torch.device("cpu"))
    prod.BLOCK_BYTES = 300 * 128 * 4  # one 128-row block at a time: many chunks
    for x in (grid, d["x"]):
        g1 = _native.knn_graph(x, 9, duplicates=duplicates)
        g2 = _native.knn_graph(x, 9, duplicates=duplicates, products=prod)
        np.testing.assert_array_equal(g1["idx"], g2["idx"])
        np.testing.assert_array_equal(g1["dist"], g2["dist"])
        assert g1["duplicates"] == g2["duplicates"]


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def test_device_products_errors_reach_the_caller() -> None:
    """An exception raised by the device's products (out of memory, a driver error) comes
    out of the call unchanged; a product of the wrong size is a MismatchError."""
    from layerscope.errors import MismatchError

    x = np.random.default_rng(0).standard_normal((50, 4))

    class Broken:
        def gram_f64(self, x: np.ndarray) -> np.ndarray:
            raise MemoryError("CUDA out of memory (simulated)")

        def f32_gram_blocks(self, x: np.ndarray, block: int) -> Any:
            yield 0, np.zeros((3, 3), dtype=np.float32)

        def exact_condensed_sq(self, x: np.ndarray) -> np.ndarray:
            raise RuntimeError("driver error (simulated)")

    with pytest.raises(MemoryError, match="simulated"):
        _native.prepare_layer(x, "rbf", products=Broken())
    with pytest.raises(RuntimeError, match="driver error"):
        _native.prepare_layer(x, "rsa", products=Broken())
    with pytest.raises(MismatchError):
        _native.knn_graph(x, 3, products=Broken())


def test_cli_device(tmp_path: Path, capsys: Any) -> None:
    """``--device`` on the measure commands: the same tables as the Rust engine, the device
    named under the table; a device torch does not see is a usage error (exit 2)."""
    from layerscope.cli import main

    d = adversarial()
    p = tmp_path / "s"
    layerscope.write_store(p, {k: v.astype(np.float32) for k, v in d.items()})
    for cmd, extra in (("cka", []), ("cka", ["--kernel", "rbf"]), ("align", ["--k", "4"]),
                       ("spectrum", []), ("id", []), ("rsa", [])):
        outs = []
        for dev in ([], ["--device", "cpu"]):
            out = tmp_path / f"{cmd}{len(dev)}.json"
            assert main([cmd, str(p), *extra, *dev, "--out", str(out)]) == 0
            text = capsys.readouterr().out
            assert ("# device: cpu" in text) == bool(dev), (cmd, text)
            outs.append(layerscope.load_result(out))
        a, b = outs
        if cmd in ("spectrum", "id"):
            assert a.to_table().to_text(6) == b.to_table().to_text(6), cmd
        else:
            np.testing.assert_allclose(b.values, a.values, rtol=0, atol=1e-6, err_msg=cmd)
    if not torch.cuda.is_available():
        assert main(["cka", str(p), "--device", "cuda", "-q"]) == 2
        assert "no CUDA device" in capsys.readouterr().err
