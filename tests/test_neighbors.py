"""RSA against scipy (pdist + spearmanr/pearsonr) and mutual kNN against a brute-force numpy
reference; exact neighbours on offset f32 data."""

from __future__ import annotations

import layerscope
import numpy as np
import pytest
from conftest import noisy_linear
from layerscope import _native
from layerscope._sample import sample_indices
from layerscope.errors import InvalidArgumentError, MismatchError
from scipy.spatial.distance import pdist
from scipy.stats import pearsonr, spearmanr


def layers(m: int = 150, seed: int = 0) -> dict[str, np.ndarray]:
    rng, out = noisy_linear(m, 12, 20, 0.5, seed)
    relu = np.maximum(out["x"] @ rng.standard_normal((12, 30)), 0)
    out["relu"] = relu + 0.01 * rng.standard_normal((m, 30))
    out["noise"] = rng.standard_normal((m, 7))
    return out


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
    """Euclidean neighbours of the raw rows (``normalize=False``)."""
    na, nb = brute_knn(a, k), brute_knn(b, k)
    return float(np.mean([len(set(p) & set(q)) / k for p, q in zip(na, nb)]))


def huh_mutual_knn(a: np.ndarray, b: np.ndarray, k: int) -> float:
    """Huh et al. 2024 (platonic-rep ``metrics.py``), in numpy: features L2-normalised
    (``F.normalize``), ``knn = (f @ f.T).fill_diagonal_(-1e8).argsort(descending)[:, :k]``,
    masks ``lvm_mask[i, knn_A] = 1``, ``acc = (mask_A * mask_B).sum(1) / k``, mean."""

    def knn(f: np.ndarray) -> np.ndarray:
        f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
        sim = f @ f.T
        np.fill_diagonal(sim, -1e8)
        return np.argsort(-sim, axis=1, kind="stable")[:, :k]

    n = a.shape[0]
    ma, mb = np.zeros((n, n)), np.zeros((n, n))
    rows = np.arange(n)[:, None]
    ma[rows, knn(a)] = 1.0
    mb[rows, knn(b)] = 1.0
    return float(((ma * mb).sum(1) / k).mean())


@pytest.mark.parametrize("k", [1, 5, 10])
def test_mutual_knn_matches_huh_reference(k: int) -> None:
    ls = layers()
    res = layerscope.mutual_knn(ls, k=k, sample=None, progress=False)
    raw = layerscope.mutual_knn(ls, k=k, sample=None, normalize=False, progress=False)
    names = list(ls)
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            assert res.values[i, j] == pytest.approx(huh_mutual_knn(ls[a], ls[b], k), abs=1e-15)
            assert raw.values[i, j] == pytest.approx(ref_mutual_knn(ls[a], ls[b], k), abs=1e-15)
    np.testing.assert_array_equal(np.diag(res.values), 1.0)
    assert res.meta["normalize"] is True and raw.meta["normalize"] is False
    # the two definitions genuinely differ on un-normalised data
    assert not np.allclose(res.values, raw.values)


def test_mutual_knn_cosine_neighbours_do_not_depend_on_scale() -> None:
    """Rows are scaled to unit norm exactly (torch's F.normalize would leave rows of norm
    below 1e-12 unnormalised and so change the neighbours of tiny-scale activations)."""
    ls = layers()
    want = layerscope.mutual_knn(ls, k=5, progress=False).values
    for scale in (1e-20, 1e20):
        got = layerscope.mutual_knn({k: v * scale for k, v in ls.items()}, k=5, progress=False)
        np.testing.assert_array_equal(got.values, want)


def test_mutual_knn_cross_and_f32_offsets() -> None:
    ls = layers(m=120)
    rng = np.random.default_rng(2)
    off = (ls["lin"] + 1000.0 * rng.standard_normal(20)).astype(np.float32)
    res = layerscope.mutual_knn(
        {"x": ls["x"]}, {"off": off}, k=7, sample=None, normalize=False, progress=False
    )
    ref = ref_mutual_knn(ls["x"], off.astype(np.float64), 7)
    assert res.values[0, 0] == pytest.approx(ref, abs=1e-15)
    res = layerscope.mutual_knn({"x": ls["x"]}, {"off": off}, k=7, sample=None, progress=False)
    assert res.values[0, 0] == pytest.approx(
        huh_mutual_knn(ls["x"], off.astype(np.float64), 7), abs=1e-15
    )
    res = layerscope.mutual_knn(ls, k=5, sample=50, seed=1, progress=False)
    idx = sample_indices(120, 50, 1)
    assert res.values[0, 1] == pytest.approx(huh_mutual_knn(ls["x"][idx], ls["lin"][idx], 5))


def test_cross_store_row_ids_checked(tmp_path: object) -> None:
    ls = layers(m=60)
    a = tmp_path / "a"  # type: ignore[operator]
    b = tmp_path / "b"  # type: ignore[operator]
    c = tmp_path / "c"  # type: ignore[operator]
    layerscope.write_store(a, {"x": ls["x"]})
    layerscope.write_store(b, {"lin": ls["lin"]})
    ids = np.arange(60)
    ids[[7, 8]] = ids[[8, 7]]
    layerscope.write_store(c, {"lin": ls["lin"]}, row_ids=ids)
    res = layerscope.rsa(str(a), str(b), sample=None, progress=False)
    assert res.values[0, 0] == pytest.approx(spearmanr(pdist(ls["x"]), pdist(ls["lin"]))[0])
    res = layerscope.mutual_knn(str(a), str(b), k=5, sample=None, progress=False)
    assert res.values[0, 0] == pytest.approx(huh_mutual_knn(ls["x"], ls["lin"], 5))
    for f in (layerscope.rsa, layerscope.mutual_knn):
        with pytest.raises(MismatchError, match="row 7"):
            f(str(a), str(c), sample=None, progress=False)


def test_bad_inputs_typed_errors() -> None:
    ls = layers(m=30)
    bad = ls["x"].copy()
    bad[4, 2] = np.nan
    for f in (layerscope.rsa, layerscope.mutual_knn):
        with pytest.raises(layerscope.NonFiniteError, match="row 4"):
            f({"b": bad}, sample=None, progress=False)
    with pytest.raises(InvalidArgumentError):
        layerscope.mutual_knn(ls, k=30, sample=None, progress=False)
    with pytest.raises(InvalidArgumentError):
        layerscope.mutual_knn(ls, k=0, sample=None, progress=False)
    with pytest.raises(InvalidArgumentError):
        layerscope.rsa({"x": ls["x"][:2]}, sample=None, progress=False)
    with pytest.raises(InvalidArgumentError):
        layerscope.rsa(ls, dissimilarity="cosine", progress=False)
    with pytest.raises(InvalidArgumentError):
        _native.rsa_matrix([ls["x"][:2]])
    with pytest.raises(MismatchError):
        _native.neighbour_matrix([ls["x"]], [ls["x"][:20]], "mutual_knn", k=3)
    with pytest.raises(InvalidArgumentError):
        _native.neighbour_matrix([ls["x"]], None, "mutual_knn", k=30)


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


def test_knn_graph_exact_on_random_adversarial_shapes() -> None:
    """Random shapes, scales 1e-4..1e4, mean offsets up to 1e4 x the spread, a huge-norm row,
    rounded (tied) coordinates, all stored f32: neighbour sets and distances equal brute force
    (exact f64, ties by index)."""
    rng = np.random.default_rng(123)
    for _ in range(30):
        m = int(rng.integers(3, 300))
        d = int(rng.integers(1, 60))
        k = int(rng.integers(1, min(m - 1, 25) + 1))
        x = rng.standard_normal((m, d)) * 10.0 ** rng.uniform(-4, 4)
        if rng.random() < 0.5:
            x = x + 10.0 ** rng.uniform(0, 4) * np.abs(x).max() * rng.standard_normal(d)
        if rng.random() < 0.3:
            x[rng.integers(m)] *= 1e3
        if rng.random() < 0.3:
            x = np.round(x, 1)
        x = x.astype(np.float32).astype(np.float64)
        g = _native.knn_graph(x, k, duplicates="keep")
        d2 = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
        np.fill_diagonal(d2, np.inf)
        order = np.lexsort((np.broadcast_to(np.arange(m), (m, m)), d2), axis=1)[:, :k]
        np.testing.assert_array_equal(g["idx"], order, err_msg=f"m={m} d={d} k={k}")
        np.testing.assert_allclose(
            g["dist"], np.sqrt(np.take_along_axis(d2, order, 1)), rtol=1e-13, atol=0
        )


@pytest.mark.parametrize("measure", ["rbf", "rbf-debiased", "rsa", "knn"])
def test_prepared_layers_in_blocks_equal_the_all_pairs_tables(measure: str) -> None:
    """The unit of a distributed run: each layer prepared alone and pickled (as a Ray task
    returns it), the table in blocks (a diagonal block within, off-diagonal blocks across)
    — bit-for-bit the local all-pairs table, and the cross table too."""
    import pickle

    xs = [np.ascontiguousarray(v) + 40.0 for v in layers(90, seed=4).values()]
    kind, opts, local = {
        "rbf": ("rbf", {}, lambda a, b=None: _native.rbf_hsic(a, b)["values"]),
        "rbf-debiased": ("rbf", {"unbiased": True},
                         lambda a, b=None: _native.rbf_hsic(a, b, unbiased=True)["values"]),
        "rsa": ("rsa", {"dissimilarity": "correlation"},
                lambda a, b=None: _native.rsa_matrix(a, b, dissimilarity="correlation")),
        "knn": ("knn", {"k": 6, "normalize": True},
                lambda a, b=None: _native.neighbour_matrix(a, b, "mutual_knn", k=6,
                                                           normalize=True)),
    }[measure]
    preps = [pickle.loads(pickle.dumps(_native.prepare_layer(x, kind, **opts))) for x in xs]
    assert preps[0].kind == kind
    full = _native.prepared_table(preps)
    np.testing.assert_array_equal(full["values"], local(xs))
    blocks = np.full((4, 4), np.nan)
    blocks[:2, :2] = _native.prepared_table(preps[:2])["values"]
    blocks[2:, 2:] = _native.prepared_table(preps[2:])["values"]
    off = _native.prepared_table(preps[:2], preps[2:])["values"]
    blocks[:2, 2:], blocks[2:, :2] = off, off.T
    np.testing.assert_array_equal(blocks, local(xs))
    np.testing.assert_array_equal(off, local(xs[:2], xs[2:]))
    if kind == "rbf":
        bw = [p.bandwidth for p in preps]
        np.testing.assert_array_equal(full["bw_a"], bw)
        np.testing.assert_array_equal(bw, _native.rbf_hsic(xs, unbiased=bool(opts))["bw_a"])


def test_prepared_layer_errors() -> None:
    x = np.ascontiguousarray(layers(40)["x"])
    p = _native.prepare_layer(x, "rsa")
    data = p.to_bytes()
    for bad in (data[:-1], data + b"\0", b"junk", data[:9] + b"\xff" * 8):
        with pytest.raises(InvalidArgumentError, match="malformed prepared layer|wrong magic"):
            _native.PreparedLayer.from_bytes(bad)
    k = _native.prepare_layer(x, "knn", k=3)
    with pytest.raises(MismatchError, match="different measures"):
        _native.prepared_table([p, k])
    with pytest.raises(InvalidArgumentError, match="measure"):
        _native.prepare_layer(x, "cosine")
    for measure, option in (("rsa", "k"), ("knn", "sigma"), ("rbf", "compare")):
        with pytest.raises(InvalidArgumentError, match=f'takes .* not "{option}"'):
            _native.prepare_layer(x, measure, **{option: 1})
        with pytest.raises(InvalidArgumentError, match=f'takes .* not "{option}"'):
            _native.prepare_bytes(measure, 40, 5, **{option: 1})
    # the defaults are those of the measure's own function
    assert _native.prepare_bytes("knn", 40, 5) == _native.prepare_bytes("knn", 40, 5, k=10,
                                                                       normalize=False)
    with pytest.raises(layerscope.MemoryBudgetError):
        _native.prepare_layer(x, "rbf", max_memory=1000)
    r40 = _native.prepare_layer(x, "rbf")
    r30 = _native.prepare_layer(np.ascontiguousarray(x[:30]), "rbf")
    with pytest.raises(MismatchError, match="rows"):
        _native.prepared_table([r40], [r30])
