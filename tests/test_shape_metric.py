"""Generalized shape metrics (Williams et al. 2021) against an f64 reference written here from
the paper's definition: the partially whitened data ``X Z`` themselves (zero-padded to equal
widths), the best rotation by orthogonal Procrustes (an SVD), then the angle or the Frobenius
distance — no moments, no nuclear-norm shortcut."""

from __future__ import annotations

from pathlib import Path

import layerscope as ls
import numpy as np
import pytest
from conftest import adversarial, llm_like
from layerscope._moments import measure_peak
from layerscope.errors import InvalidArgumentError


def _transformed(x: np.ndarray, alpha: float) -> np.ndarray:
    """``X̄ Z`` per ``sqrt(n − 1)`` rows, ``Z = V diag(α + (1 − α) λ^(−1/2)) Vᵀ`` from the
    covariance, ``λ`` floored at the rank tolerance ``λ_max · max(n, d) · ε``."""
    x = np.asarray(x, dtype=np.float64)
    n, d = x.shape
    xc = (x - x.mean(axis=0)) / np.sqrt(n - 1)
    lam, v = np.linalg.eigh(xc.T @ xc)
    tol = lam.max() * max(n, d) * np.finfo(np.float64).eps
    w = alpha + (1 - alpha) / np.sqrt(np.maximum(lam, tol))
    return xc @ (v * w) @ v.T


def ref_shape(x: np.ndarray, y: np.ndarray, alpha: float) -> tuple[float, float]:
    a, b = _transformed(x, alpha), _transformed(y, alpha)
    d = max(a.shape[1], b.shape[1])
    a = np.pad(a, ((0, 0), (0, d - a.shape[1])))
    b = np.pad(b, ((0, 0), (0, d - b.shape[1])))
    u, _, vt = np.linalg.svd(a.T @ b)  # the rotation Q minimising ‖a Q − b‖
    q = u @ vt
    aq = a @ q
    cos = float((aq * b).sum() / (np.linalg.norm(a) * np.linalg.norm(b)))
    return float(np.arccos(min(cos, 1.0))), float(np.linalg.norm(aq - b))


def _layers(n: int = 400, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = llm_like(n, 12, seed)  # offsets 50–1000x the spread
    y = (x - x.mean(0)) @ rng.standard_normal((12, 20)) * 0.2 + rng.standard_normal((n, 20))
    z = rng.standard_normal((n, 7)) * 1e-3 + 4.0
    return {"x": x, "y": y, "z": z}


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_equal_to_the_definition(alpha: float) -> None:
    d = _layers()
    ang = ls.shape_metric(d, alpha=alpha, progress=False)
    euc = ls.shape_metric(d, alpha=alpha, distance="euclidean", progress=False)
    names = list(d)
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            if i == j:
                assert ang.values[i, j] == 0.0 and euc.values[i, j] == 0.0
                continue
            ta, te = ref_shape(d[a], d[b], alpha)
            assert abs(ang.values[i, j] - ta) < 1e-10, (a, b, ang.values[i, j], ta)
            assert abs(euc.values[i, j] - te) < 1e-9 * max(1.0, te), (a, b)
    np.testing.assert_array_equal(ang.values, ang.values.T)
    np.testing.assert_array_equal(ang.extra["euclidean"], euc.values)
    assert ang.meta["alpha"] == alpha and ang.meta["distance"] == "angular"


def test_procrustes_end_rotations_and_the_triangle_inequality() -> None:
    d = _layers(300, 1)
    one = ls.shape_metric(d, progress=False).values
    pr = ls.alignment(d, method="procrustes", progress=False).extra["distance"]
    np.testing.assert_allclose(one[~np.eye(3, dtype=bool)], pr[~np.eye(3, dtype=bool)],
                               atol=1e-12)
    q, _ = np.linalg.qr(np.random.default_rng(2).standard_normal((20, 20)))
    rot = {**d, "y": d["y"] @ q + 7.0}  # a rotation and a translation of y
    for alpha in (0.0, 0.5, 1.0):
        a = ls.shape_metric(d, alpha=alpha, progress=False).values
        b = ls.shape_metric(rot, alpha=alpha, progress=False).values
        np.testing.assert_allclose(a, b, atol=1e-9)
    rng = np.random.default_rng(3)
    many = {f"l{i}": rng.standard_normal((200, 5)) @ rng.standard_normal((5, 6 + i))
            + rng.standard_normal((200, 6 + i)) for i in range(5)}
    for alpha in (0.0, 0.3, 1.0):
        for distance in ("angular", "euclidean"):
            v = ls.shape_metric(many, alpha=alpha, distance=distance, progress=False).values
            for i in range(5):
                for j in range(5):
                    for k in range(5):
                        assert v[i, k] <= v[i, j] + v[j, k] + 1e-9


def test_every_plan_and_two_stores(tmp_path: Path) -> None:
    d = adversarial(150)  # offsets, a constant column, duplicated rows, a 1e-3 layer, n < d
    e = {"u": d["y"] @ np.random.default_rng(3).standard_normal((90, 40)), "v": d["w"]}
    pa, pb = tmp_path / "a", tmp_path / "b"
    ls.write_store(pa, d, shard_bytes=64 << 10)
    ls.write_store(pb, e, shard_bytes=64 << 10)
    for alpha in (0.0, 0.5, 1.0):
        one = ls.shape_metric(pa, pb, alpha=alpha, progress=False)
        budget = int(measure_peak([300, 40], 150, "float64") * 1.05)  # the widest pair
        tiled = ls.shape_metric(pa, pb, alpha=alpha, progress=False, max_memory=budget)
        assert tiled.meta["plan"]["passes"] > 1
        np.testing.assert_allclose(tiled.values, one.values, atol=1e-10)
        for i, a in enumerate(d):
            for j, b in enumerate(e):
                if a == "x" and alpha < 1:  # 300 wide over 150 rows: checked below
                    continue
                # the cosine: arccos turns round-off near 1 into ~1e-8 (w and v are equal)
                want = np.cos(ref_shape(d[a], e[b], alpha)[0])
                assert abs(one.extra["similarity"][i, j] - want) < 1e-12, (a, b)
    # n < d, full whitening: the directions without variance carry nothing (finite, ≤ π/2)
    v = ls.shape_metric(pa, alpha=0.0, progress=False).values
    assert np.isfinite(v).all() and (v >= 0).all() and (v <= np.pi / 2 + 1e-12).all()
    # bf16 storage: the same as the widened values
    import torch

    t = {k: torch.from_numpy(x.astype(np.float32)).to(torch.bfloat16) for k, x in e.items()}
    wide = {k: x.float().numpy().astype(np.float64) for k, x in t.items()}
    np.testing.assert_allclose(ls.shape_metric(t, alpha=0.5, progress=False).values,
                               ls.shape_metric(wide, alpha=0.5, progress=False).values,
                               atol=1e-10)


def test_arguments_and_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = _layers(60, 4)
    for kw in ({"alpha": 1.5}, {"alpha": -0.1}, {"distance": "cosine"}, {"alpha": "x"}):
        with pytest.raises(InvalidArgumentError):
            ls.shape_metric(d, progress=False, **kw)  # type: ignore[arg-type]
    from layerscope.cli import main

    p = tmp_path / "s"
    ls.write_store(p, d)
    assert main(["shape", str(p), "--alpha", "0.5", "--out", str(tmp_path / "r.json")]) == 0
    assert "angular, alpha = 0.5" in capsys.readouterr().out
    back = ls.load_result(tmp_path / "r.json")
    np.testing.assert_array_equal(back.values,
                                  ls.shape_metric(d, alpha=0.5, progress=False).values)
