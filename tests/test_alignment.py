"""Subspace alignment (principal angles, SVCCA, PWCCA, CCA, Procrustes) vs scipy and numpy
references written from the papers, on explicit SVDs of the centred data (f64)."""

from __future__ import annotations

import layerscope
import numpy as np
import pytest
import scipy.linalg as sla
from layerscope import _native
from layerscope.errors import InvalidArgumentError

RTOL = 1e-8


# ----------------------------------------------------------------------------- helpers


def centred(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x - x.mean(axis=0)


def native(
    xs: list[np.ndarray],
    method: str,
    k=None,
    space="samples",
    rows=None,
    cols=None,
    symmetric=False,
    variance=None,
    ridge_eps=1e-4,
):
    """Run the Rust measures on the f64 moments of explicit data."""
    idx = list(range(len(xs)))
    acc = _native.MomentAccumulator([x.shape[1] for x in xs], [f"l{i}" for i in idx])
    acc.update([np.ascontiguousarray(x, dtype=np.float64) for x in xs])
    out = acc.finalize().alignment(
        rows=idx if rows is None else rows,
        cols=idx if cols is None else cols,
        method=method,
        space=space,
        k=k,
        variance=variance,
        ridge_eps=ridge_eps,
        symmetric=symmetric,
    )
    a = out["alignment"]
    nr, nc = a["nrows"], a["ncols"]
    vals = np.asarray(a["values"]).reshape(nr, nc)
    cos = [[np.asarray(a["cosines"][r * nc + c]) for c in range(nc)] for r in range(nr)]
    return vals, cos, a


def left_sv(x: np.ndarray, k: int) -> np.ndarray:
    u, _, _ = np.linalg.svd(centred(x), full_matrices=False)
    return u[:, :k]


def right_sv(x: np.ndarray, k: int) -> np.ndarray:
    _, _, vt = np.linalg.svd(centred(x), full_matrices=False)
    return vt[:k].T


def ref_principal_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sort(np.cos(sla.subspace_angles(a, b)))[::-1]


def ref_svcca(x: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    """Raghu et al. 2017: SVD-reduce each layer to its top-k directions, then CCA (via QR)."""
    xr = centred(x) @ right_sv(x, k)
    yr = centred(y) @ right_sv(y, k)
    qx, _ = np.linalg.qr(xr)
    qy, _ = np.linalg.qr(yr)
    return np.linalg.svd(qx.T @ qy, compute_uv=False)


def ref_pwcca(x: np.ndarray, y: np.ndarray, k: int) -> float:
    """Morcos et al. 2018 (their compute_pwcca on centred data): CCA of the kept subspaces,
    canonical variates of x, QR of them, weights = Σ_neurons |Pᵀ x̃|, normalised."""
    xc = centred(x)
    xr = xc @ right_sv(x, k)
    yr = centred(y) @ right_sv(y, k)
    qx, _ = np.linalg.qr(xr)
    qy, _ = np.linalg.qr(yr)
    p, rho, _ = np.linalg.svd(qx.T @ qy)
    m = rho.size
    dirns = qx @ p[:, :m]  # canonical variates of x (n × m)
    pq, _ = np.linalg.qr(dirns)
    w = np.abs(pq.T @ xc).sum(axis=1)
    w = w / w.sum()
    return float(np.sum(w * rho))


def ref_cca_r2(x: np.ndarray, y: np.ndarray) -> float:
    qx, _ = np.linalg.qr(centred(x))
    qy, _ = np.linalg.qr(centred(y))
    rho = np.linalg.svd(qx.T @ qy, compute_uv=False)
    return float(np.sum(rho**2) / min(x.shape[1], y.shape[1]))


def ref_procrustes(x: np.ndarray, y: np.ndarray) -> float:
    """Orthogonal Procrustes on centred, Frobenius-normalised data (scipy), zero-padding the
    narrower layer: similarity = 1 − ‖AR − B‖²/2 = max_R tr(RᵀAᵀB)."""
    a, b = centred(x), centred(y)
    a, b = a / np.linalg.norm(a), b / np.linalg.norm(b)
    d = max(a.shape[1], b.shape[1])
    a = np.pad(a, ((0, 0), (0, d - a.shape[1])))
    b = np.pad(b, ((0, 0), (0, d - b.shape[1])))
    r, _ = sla.orthogonal_procrustes(a, b)
    return float(1.0 - np.linalg.norm(a @ r - b) ** 2 / 2.0)


def rng_data(
    seed: int, n: int, dims: list[int], offset: float = 0.0, scale: float = 1.0, shared: int = 3
) -> list[np.ndarray]:
    """Layers sharing a few latent token factors (so alignments are far from 0 and 1)."""
    g = np.random.default_rng(seed)
    z = g.standard_normal((n, shared))
    out = []
    for d in dims:
        x = z @ g.standard_normal((shared, d)) + 0.7 * g.standard_normal((n, d))
        x = x * g.uniform(0.5, 2.0, d)  # anisotropic, distinct eigenvalues
        out.append(scale * x + offset * g.uniform(-1, 1, d))
    return out


# ----------------------------------------------------------------------------- subspace


@pytest.mark.parametrize("dims", [[6, 9], [12, 12]])
def test_samples_subspace_matches_scipy(dims):
    xs = rng_data(0, 80, dims)
    k = 5
    vals, cos, a = native(xs, "subspace", k=k, symmetric=True)
    want = ref_principal_cosines(left_sv(xs[0], k), left_sv(xs[1], k))
    np.testing.assert_allclose(cos[0][1], want, rtol=RTOL, atol=RTOL)
    np.testing.assert_allclose(cos[1][0], want, rtol=RTOL, atol=RTOL)
    np.testing.assert_allclose(vals[0, 1], np.mean(want**2), rtol=RTOL)
    np.testing.assert_allclose(vals, vals.T, rtol=RTOL)
    np.testing.assert_allclose(np.diag(vals), 1.0, rtol=RTOL)
    theta = sla.subspace_angles(left_sv(xs[0], k), left_sv(xs[1], k))
    g = np.asarray(a["extras"]["grassmann"]).reshape(2, 2)
    np.testing.assert_allclose(g[0, 1], np.sqrt(np.sum(theta**2)), rtol=1e-7)


def test_features_subspace_matches_scipy_and_needs_equal_widths():
    xs = rng_data(1, 60, [10, 10])
    k = 4
    _, cos, _ = native(xs, "subspace", k=k, space="features")
    want = ref_principal_cosines(right_sv(xs[0], k), right_sv(xs[1], k))
    np.testing.assert_allclose(cos[0][1], want, rtol=RTOL, atol=RTOL)
    with pytest.raises(InvalidArgumentError, match="equal widths"):
        native(rng_data(1, 60, [10, 7]), "subspace", k=3, space="features")


def test_rank_deficient_layers_constant_and_duplicated_columns():
    g = np.random.default_rng(2)
    x = rng_data(2, 100, [8])[0]
    x = np.hstack([x, np.full((100, 2), 7.5), x[:, :2]])  # 2 constant, 2 duplicated: rank 8
    y = rng_data(3, 100, [5])[0]
    k = 5
    _, cos, _ = native([x, y], "subspace", k=k)
    want = ref_principal_cosines(left_sv(x, k), left_sv(y, k))
    np.testing.assert_allclose(cos[0][1], want, rtol=RTOL, atol=RTOL)
    with pytest.raises(InvalidArgumentError, match=r"l0.*rank 8|rank 8.*l0"):
        native([x, y[:, :5], g.standard_normal((100, 12))], "subspace", k=9, rows=[0], cols=[2])


def test_n_smaller_than_d_and_k_above_rank():
    xs = rng_data(4, 20, [50, 35])  # n < d: rank ≤ n − 1 = 19
    k = 6
    _, cos, _ = native(xs, "subspace", k=k)
    want = ref_principal_cosines(left_sv(xs[0], k), left_sv(xs[1], k))
    np.testing.assert_allclose(cos[0][1], want, rtol=RTOL, atol=RTOL)
    with pytest.raises(InvalidArgumentError, match="numerical rank 19") as e:
        native(xs, "subspace", k=25)
    assert "l0" in str(e.value)


# ----------------------------------------------------------------------------- SVCCA / PWCCA


@pytest.mark.parametrize("dims,k", [([7, 11], 4), ([9, 9], 9)])
def test_svcca_equals_reference_and_sample_space_cosines(dims, k):
    xs = rng_data(5, 90, dims)
    vals, cos, _ = native(xs, "svcca", k=k)
    want = ref_svcca(xs[0], xs[1], k)
    np.testing.assert_allclose(cos[0][1], want, rtol=RTOL, atol=RTOL)
    np.testing.assert_allclose(vals[0, 1], want.mean(), rtol=RTOL)
    # The coincidence stated in the docs: SVCCA correlations = sample-space principal cosines.
    _, scos, _ = native(xs, "subspace", k=k)
    np.testing.assert_allclose(cos[0][1], scos[0][1], rtol=1e-12, atol=1e-12)


def test_svcca_auto_keeps_99_percent():
    xs = rng_data(6, 120, [10, 14])
    _, _, a = native(xs, "svcca", variance=0.99)
    for x, k in zip(xs, a["row_k"]):
        lam = np.linalg.svd(centred(x), compute_uv=False) ** 2
        cum = np.cumsum(lam) / lam.sum()
        assert k == int(np.argmax(cum >= 0.99)) + 1


@pytest.mark.parametrize("dims,k", [([7, 11], 4), ([10, 6], 6)])
def test_pwcca_matches_morcos_formula(dims, k):
    xs = rng_data(7, 100, dims)
    vals, _, _ = native(xs, "pwcca", k=k, symmetric=True)
    np.testing.assert_allclose(vals[0, 1], ref_pwcca(xs[0], xs[1], k), rtol=RTOL)
    np.testing.assert_allclose(vals[1, 0], ref_pwcca(xs[1], xs[0], k), rtol=RTOL)
    np.testing.assert_allclose(np.diag(vals), 1.0, rtol=RTOL)


def test_pwcca_unweighted_mean_is_svcca():
    xs = rng_data(19, 120, [9, 12])
    _, _, pw = native(xs, "pwcca", k=5)
    sv, _, _ = native(xs, "svcca", k=5)
    mean_cca = np.asarray(pw["extras"]["mean_cca"]).reshape(2, 2)
    np.testing.assert_allclose(mean_cca, sv, rtol=1e-12)


# ----------------------------------------------------------------------------- CCA / Procrustes


def test_cca_full_rank_matches_qr_reference():
    xs = rng_data(8, 150, [6, 9])
    vals, cos, a = native(xs, "cca")
    np.testing.assert_allclose(vals[0, 1], ref_cca_r2(xs[0], xs[1]), rtol=RTOL)
    assert a["row_ridge"] == [0.0, 0.0]
    assert cos[0][1].size == 6


def test_cca_ridge_when_n_le_d():
    xs = rng_data(9, 12, [20, 15])
    eps = 1e-3
    vals, _, a = native(xs, "cca", ridge_eps=eps)
    cs = [centred(x) for x in xs]
    ridge = [eps * np.trace(c.T @ c) / c.shape[1] for c in cs]
    np.testing.assert_allclose(a["row_ridge"], ridge, rtol=1e-12)

    def inv_sqrt(c, r):
        w, v = np.linalg.eigh(c.T @ c + r * np.eye(c.shape[1]))
        return v @ np.diag(w**-0.5) @ v.T

    t = inv_sqrt(cs[0], ridge[0]) @ cs[0].T @ cs[1] @ inv_sqrt(cs[1], ridge[1])
    rho = np.linalg.svd(t, compute_uv=False)
    np.testing.assert_allclose(vals[0, 1], np.sum(rho**2) / 15, rtol=1e-7)
    assert 0 < vals[0, 1] < 1


def test_cca_full_rank_equal_widths_is_subspace_overlap_at_k_d():
    """Canonical correlations of full-rank layers = principal cosines of their column spaces
    (Björck & Golub 1973): CCA R² = sample-space subspace overlap at k = d."""
    xs = rng_data(20, 150, [7, 7])
    cv, ccos, a = native(xs, "cca")
    sv, scos, _ = native(xs, "subspace", k=7)
    assert a["row_ridge"] == [0.0, 0.0]
    np.testing.assert_allclose(ccos[0][1], scos[0][1], rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(cv, sv, rtol=1e-8)


@pytest.mark.parametrize("dims", [[8, 8], [5, 9]])
def test_procrustes_matches_scipy(dims):
    xs = rng_data(10, 70, dims, offset=50.0)
    vals, cos, a = native(xs, "procrustes", symmetric=True)
    want = ref_procrustes(xs[0], xs[1])
    np.testing.assert_allclose(vals[0, 1], want, rtol=RTOL)
    np.testing.assert_allclose(cos[0][1].sum(), want, rtol=RTOL)
    dist = np.asarray(a["extras"]["distance"]).reshape(2, 2)
    np.testing.assert_allclose(dist[0, 1], np.arccos(want), rtol=1e-7)
    np.testing.assert_allclose(np.diag(vals), 1.0, rtol=RTOL)


def test_scale_invariance_extremes():
    xs = rng_data(11, 60, [6, 8])
    for scale in (1e-4, 1e4):
        ys = [x * scale for x in xs]
        for method, k in (
            ("subspace", 4),
            ("svcca", 4),
            ("pwcca", 4),
            ("procrustes", None),
            ("cca", None),
        ):
            v1, _, _ = native(xs, method, k=k)
            v2, _, _ = native(ys, method, k=k)
            np.testing.assert_allclose(v2, v1, rtol=1e-7, err_msg=f"{method} scale {scale}")


def test_bad_arguments():
    xs = rng_data(12, 30, [4, 4])
    with pytest.raises(InvalidArgumentError):
        native(xs, "nope", k=2)
    with pytest.raises(InvalidArgumentError):
        native(xs, "subspace", k=0)
    with pytest.raises(InvalidArgumentError):
        native(xs, "subspace", k=2, space="tokens")
    with pytest.raises(InvalidArgumentError):
        native([xs[0], np.zeros((30, 3))], "subspace", k=1)  # zero-variance layer


# ----------------------------------------------------------------------------- xKV claim


def _token_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-token cosine similarity between two layers of equal width (the xKV baseline)."""
    return np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_xkv_shared_token_subspace_high_overlap_low_token_cosine():
    """The xKV claim on synthetic layers: every layer is a different rotation or random mixture
    of ONE shared rank-8 token subspace plus noise. Sample-space (token) subspace overlap is
    high while per-token cosine similarity between layers is low; an unrelated layer is the
    control (overlap ≈ k/n) and the same-layer token cosine is the other baseline (= 1)."""
    g = np.random.default_rng(13)
    n, r, d = 1500, 8, 64
    s = g.standard_normal((n, r))  # the shared token factors
    base = s @ g.standard_normal((r, d)) + 0.1 * g.standard_normal((n, d))
    layers = {"base": base}
    for i in range(2):  # exact rotations of the base layer (no extra noise)
        q, _ = np.linalg.qr(g.standard_normal((d, d)))
        layers[f"rot{i}"] = base @ q
    for i in range(2):  # fresh mixtures of the same factors + fresh noise
        layers[f"mix{i}"] = s @ g.standard_normal((r, d)) + 0.1 * g.standard_normal((n, d))
    layers["control"] = g.standard_normal((n, r)) @ g.standard_normal((r, d))
    al = layerscope.alignment(layers, k=r, progress=False)
    names = [x for x in layers if x != "control"]
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            tok = _token_cosine(layers[a], layers[b])
            # the per-token cosine baseline: near 0 (|cos| of random 64-d directions ≈ 0.1)
            assert np.mean(np.abs(tok)) < 0.2, (a, b, np.mean(np.abs(tok)))
            assert al[a, b] > 0.97, (a, b, al[a, b])
            if a == "base" and b.startswith("rot"):  # same data rotated: identical subspace
                np.testing.assert_allclose(al.cosines(a, b), 1.0, rtol=1e-9)
        assert al[a, "control"] < 0.05  # ≈ k/n for unrelated subspaces
    np.testing.assert_allclose(_token_cosine(base, base), 1.0)
    # Procrustes also sees the rotations as identical, the feature-space subspaces of the
    # independent mixtures do NOT align (it is the token space that is shared).
    pr = layerscope.alignment(layers, method="procrustes", progress=False)
    np.testing.assert_allclose(pr["base", "rot0"], 1.0, rtol=1e-9)
    fv = layerscope.alignment(layers, k=r, space="features", progress=False)
    assert fv["mix0", "mix1"] < 0.5


# ----------------------------------------------------------------------------- public API


def test_alignment_api_dict_source_and_result():
    xs = rng_data(14, 200, [12, 10, 12])
    src = {f"layer{i}": x for i, x in enumerate(xs)}
    al = layerscope.alignment(src, k=4, progress=False)
    assert al.rows == al.cols == list(src)
    want = ref_principal_cosines(left_sv(xs[0], 4), left_sv(xs[1], 4))
    np.testing.assert_allclose(al.cosines("layer0", "layer1"), want, rtol=1e-7, atol=1e-8)
    np.testing.assert_allclose(al["layer0", "layer1"], np.mean(want**2), rtol=1e-7)
    back = layerscope.results.result_from_dict(__import__("json").loads(al.to_json()))
    assert type(back).__name__ == "AlignmentResult"
    np.testing.assert_allclose(back.cosines("layer1", "layer2"), al.cosines("layer1", "layer2"))
    assert al.meta["method"] == "subspace" and al.meta["k"] == 4


def test_alignment_api_cross_model_and_f32_offsets(tmp_path):
    g = np.random.default_rng(15)
    xs = rng_data(15, 300, [16, 12], offset=1000.0, scale=1.0)
    a = {"h0": xs[0].astype(np.float32)}
    b = {"h0": xs[1].astype(np.float32), "h1": g.standard_normal((300, 5)).astype(np.float32)}
    al = layerscope.alignment(a, b, method="svcca", k=3, progress=False)
    assert al.rows == ["h0"] and al.cols == ["h0", "h1"]
    want = ref_svcca(a["h0"].astype(np.float64), b["h0"].astype(np.float64), 3)
    np.testing.assert_allclose(al.cosines("h0", "h0"), want, rtol=1e-7, atol=1e-8)


def test_alignment_bf16_store_with_mean_offsets(tmp_path):
    xs = rng_data(16, 256, [16, 16], offset=300.0)
    store = layerscope.write_store(tmp_path / "s", {"a": xs[0], "b": xs[1]}, dtype="bfloat16")
    al = layerscope.alignment(store, method="procrustes", progress=False)
    ra = store.read("a", 0, None, np.float64) if hasattr(store, "read") else None
    if ra is None:  # pragma: no cover
        pytest.fail("store.read missing")
    rb = store.read("b", 0, None, np.float64)
    np.testing.assert_allclose(al["a", "b"], ref_procrustes(ra, rb), rtol=1e-7)


def test_analyze_reads_data_once(monkeypatch):
    import layerscope._moments as mom

    alm = layerscope

    calls = []
    real = mom.compute_moments

    def counting(*args, **kw):
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(mom, "compute_moments", counting)
    xs = rng_data(17, 150, [8, 8, 6])
    src = {f"l{i}": x for i, x in enumerate(xs)}
    res = alm.analyze(src, k=3, progress=False)
    assert len(calls) == 1
    assert set(res) == {"cka", "cka_debiased", "spectrum", "alignment"}
    one = alm.alignment(src, k=3, progress=False)
    np.testing.assert_allclose(res["alignment"].values, one.values, rtol=1e-12)
    sp = alm.spectrum(src, progress=False)
    np.testing.assert_allclose(res["spectrum"].eigenvalues["l1"], sp.eigenvalues["l1"], rtol=1e-12)
    # biased linear CKA from the same pass
    a, b = centred(xs[0]), centred(xs[2])
    cka = np.linalg.norm(a.T @ b) ** 2 / (np.linalg.norm(a.T @ a) * np.linalg.norm(b.T @ b))
    np.testing.assert_allclose(res["cka"]["l0", "l2"], cka, rtol=1e-8)
    # several alignment methods, still one pass
    calls.clear()
    many = alm.analyze(
        src,
        measures=["spectrum", "alignment", "alignment:procrustes", "alignment:svcca"],
        k=3,
        progress=False,
    )
    assert len(calls) == 1
    assert set(many) == {"spectrum", "alignment", "alignment:procrustes", "alignment:svcca"}
    np.testing.assert_allclose(many["alignment"].values, one.values, rtol=1e-12)
    np.testing.assert_allclose(
        many["alignment:procrustes"]["l0", "l2"], ref_procrustes(xs[0], xs[2]), rtol=RTOL
    )
    np.testing.assert_allclose(
        many["alignment:svcca"].cosines("l0", "l1"),
        ref_svcca(xs[0], xs[1], 3),
        rtol=1e-8,
        atol=1e-10,
    )
    assert many["alignment:svcca"].meta["method"] == "svcca"
    # arguments are checked before the (expensive) pass
    calls.clear()
    for bad in ({"measures": ["alignment:nope"]}, {"k": 0}, {"top": 0}, {"space": "tokens"}):
        with pytest.raises(InvalidArgumentError):
            alm.analyze(src, progress=False, **bad)
    assert calls == []


def test_cli_align_and_spectrum(tmp_path):
    from layerscope.cli import main

    xs = rng_data(18, 100, [6, 6])
    layerscope.write_store(tmp_path / "s", {"a": xs[0], "b": xs[1]})
    out = tmp_path / "al.json"
    assert main(["align", str(tmp_path / "s"), "--k", "3", "--out", str(out), "--quiet"]) == 0
    res = layerscope.load_result(out)
    assert res.kind == "alignment" and res.values.shape == (2, 2)
    out2 = tmp_path / "sp.json"
    png = tmp_path / "sp.png"
    assert (
        main(["spectrum", str(tmp_path / "s"), "--out", str(out2), "--plot", str(png), "--quiet"])
        == 0
    )
    assert layerscope.load_result(out2).kind == "spectrum" and png.stat().st_size > 0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_subspace_from_low_precision_store_with_large_offsets(tmp_path, dtype):
    """f32/bf16 stores whose features carry mean offsets of ~1000× their spread: the shifted f64
    moments give the principal cosines of the stored values to 1e-7 (the f64 reference is
    computed on exactly the stored values)."""
    xs = rng_data(21, 400, [24, 16], offset=1000.0)
    store = layerscope.write_store(tmp_path / "s", {"a": xs[0], "b": xs[1]}, dtype=dtype)
    ra = store.read("a", 0, None, np.float64)
    rb = store.read("b", 0, None, np.float64)
    assert np.abs(ra.mean(0)).max() > 100 * ra.std(0).max()
    al = layerscope.alignment(store, k=6, progress=False)
    want = ref_principal_cosines(left_sv(ra, 6), left_sv(rb, 6))
    np.testing.assert_allclose(al.cosines("a", "b"), want, rtol=1e-7, atol=1e-9)
    sv = layerscope.alignment(store, method="svcca", k=6, progress=False)
    np.testing.assert_allclose(sv.cosines("a", "b"), want, rtol=1e-7, atol=1e-9)


def test_plots_return_figures():
    from matplotlib.figure import Figure

    xs = rng_data(22, 150, [8, 8, 10])
    xs[2] = np.hstack([xs[2], xs[2][:, :2]])  # width 12, rank 10
    src = {f"l{i}": x for i, x in enumerate(xs)}
    res = layerscope.analyze(src, measures=["spectrum", "alignment"], k=3, progress=False)
    al, sp = res["alignment"], res["spectrum"]
    fig = al.plot()  # overlap heatmap
    assert isinstance(fig, Figure) and fig.axes[0].images
    fig = al.plot_cosines()  # adjacent pairs by default
    assert isinstance(fig, Figure) and len(fig.axes[0].lines) == 2
    np.testing.assert_allclose(fig.axes[0].lines[0].get_ydata(), al.cosines("l0", "l1"))
    fig = al.plot_cosines([("l0", "l2")])
    assert len(fig.axes[0].lines) == 1
    fig = sp.plot()  # log-log spectra, one curve per layer
    assert isinstance(fig, Figure) and len(fig.axes[0].lines) == 3
    assert fig.axes[0].get_xscale() == "log" and fig.axes[0].get_yscale() == "log"
    # round-off eigenvalues (below the rank tolerance) are not drawn
    assert sp.table["l2"]["rank"] == 10 and sp.eigenvalues["l2"].size == 12
    assert len(fig.axes[0].lines[2].get_xdata()) == 10
    import matplotlib.pyplot as plt

    plt.close("all")


def test_cli_prints_table_and_writes_plots(tmp_path, capsys):
    from layerscope.cli import main

    xs = rng_data(23, 120, [6, 9, 6])
    layerscope.write_store(tmp_path / "s", {"a": xs[0], "b": xs[1], "c": xs[2]})
    heat, curves = tmp_path / "h.png", tmp_path / "c.png"
    rc = main(
        [
            "align",
            str(tmp_path / "s"),
            "--method",
            "svcca",
            "--k",
            "auto",
            "--layers",
            "a",
            "b",
            "--plot",
            str(heat),
            "--plot-cosines",
            str(curves),
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "a" in out and "b" in out and "c" not in out.split()
    assert out.splitlines()[-1].startswith("# align | svcca")
    assert heat.stat().st_size > 0 and curves.stat().st_size > 0
    rc = main(["spectrum", str(tmp_path / "s")])
    out = capsys.readouterr().out
    assert rc == 0 and "effective_rank" in out and "pca_id_99" in out
    # a k above the rank is a clean CLI error naming the layer, exit code 2
    rc = main(["align", str(tmp_path / "s"), "--k", "8", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "rank" in err and "'a'" in err.replace('"', "'")


def test_minilm_adjacent_layers_overlap_more_than_distant(tmp_path):
    """all-MiniLM-L6-v2 (real weights, offline) on 64 standard-library texts, one row per
    token: the sample-space top-16 subspace overlap of adjacent layers exceeds that of layers
    three apart, and the mean overlap decays with the layer distance."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from layerscope.capture import capture
    from layerscope.corpus import stdlib_corpus
    from layerscope.models import load_minilm

    model, tok = load_minilm()
    texts = stdlib_corpus(64, seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cap = capture(
        model, layers=["embeddings", "encoder.layer.*"], out=tmp_path / "s", pool="tokens"
    )
    try:
        with torch.inference_mode(), cap:
            for i in range(0, len(texts), 16):
                batch = texts[i : i + 16]
                enc = tok(batch, padding=True, truncation=True, max_length=128, return_tensors="pt")
                model(**enc)
    finally:
        torch.set_num_threads(threads)
    store = cap.store
    assert store.num_rows > 1000 and len(store.layers) == 7
    res = layerscope.analyze(store, measures=["spectrum", "alignment"], k=16, progress=False)
    al = res["alignment"]
    v = al.values
    for i in range(len(al.rows) - 3):
        assert v[i, i + 1] > v[i, i + 3], (al.rows[i], v[i])
    means = [al.diagonal_offset(k).mean() for k in range(1, 5)]
    assert means == sorted(means, reverse=True), means
    sp = res["spectrum"]
    for layer in sp.layers:
        t = sp.table[layer]
        assert 1 <= t["pca_id_90"] <= t["pca_id_95"] <= t["pca_id_99"] <= 384
        assert t["effective_rank"] > t["participation_ratio"] > t["stable_rank"] > 1


def test_alignment_stays_callable_after_analyze():
    """``layerscope.analyze`` imports the ``layerscope.alignment`` submodule; the package's
    ``alignment`` name must still be the function afterwards (fresh interpreter)."""
    import subprocess
    import sys

    code = (
        "import layerscope, numpy as np\n"
        "x = {'a': np.random.default_rng(0).standard_normal((50, 4))}\n"
        "layerscope.analyze(x, measures=['spectrum'], progress=False)\n"
        "assert callable(layerscope.alignment), type(layerscope.alignment)\n"
        "assert callable(layerscope.spectrum), type(layerscope.spectrum)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, (
        "layerscope.alignment is shadowed by its submodule after layerscope.analyze "
        "(alignment._unshadow should restore the function)\n" + r.stderr[-600:]
    )
