"""Calibrated CKA (``cka(..., null=B, bootstrap=B2)``): permutation p-values, the null mean
and percentile bootstrap intervals, against f64 references written here from the
definitions (explicit Gram matrices, the H-centring and Song et al.'s unbiased HSIC), with
the very permutations and resamples the library draws (``_calibrate.draws``)."""

from __future__ import annotations

from pathlib import Path

import layerscope as ls
import numpy as np
import pytest
from conftest import adversarial, cka_from_grams, llm_like
from layerscope.errors import InvalidArgumentError, MemoryBudgetError, NonFiniteError
from layerscope.measures._calibrate import draws


def _rbf(x: np.ndarray, s: np.ndarray | None, sigma: float) -> np.ndarray:
    """The RBF kernel of rows ``s`` of ``x``, bandwidth from those rows' distances (median
    of all of them, diagonal included; Kornblith et al. 2019)."""
    x = np.asarray(x, dtype=np.float64)
    x = x - x.mean(axis=0)
    d = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    if s is not None:
        d = d[np.ix_(s, s)]
    bw = sigma * np.sqrt(np.median(d))
    return np.exp(-d / (2 * bw * bw))


def _lin(x: np.ndarray, s: np.ndarray | None) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    x = x - x.mean(axis=0)
    k = x @ x.T
    return k if s is None else k[np.ix_(s, s)]


def _tied_cka(k: np.ndarray, lg: np.ndarray, s: np.ndarray, unbiased: bool) -> float:
    """CKA of a resample whose pairs of copies of one row (``s_i = s_j``, ``i ≠ j``) are
    left out. Biased: ``HKH`` (explicit ``H``) without those pairs. Debiased: they count as
    the diagonal — ``K̃`` zero there, U-centred, the sum over the other pairs."""
    m = len(s)
    tie = s[:, None] == s[None, :]

    def u(k: np.ndarray) -> np.ndarray:
        if not unbiased:
            h = np.eye(m) - np.ones((m, m)) / m
            return np.where(tie & ~np.eye(m, dtype=bool), 0.0, h @ k @ h)
        kt = np.where(tie, 0.0, k)
        r = kt.sum(1)
        c = kt - r[:, None] / (m - 2) - r[None, :] / (m - 2) + r.sum() / ((m - 1) * (m - 2))
        return np.where(tie, 0.0, c)

    a, b = u(k), u(lg)
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def _reference(xs: dict[str, np.ndarray], kernel: str, estimator: str, null: int,
               bootstrap: int, seed: int, sigma: float = 1.0,
               ys: dict[str, np.ndarray] | None = None,
               confidence: float = 0.95) -> dict[str, np.ndarray]:
    unb = estimator == "debiased"
    m = len(next(iter(xs.values())))
    gram = (lambda x, s: _lin(x, s)) if kernel == "linear" else (lambda x, s: _rbf(x, s, sigma))
    a = list(xs.values())
    b = list((ys or xs).values())
    obs = np.array([[cka_from_grams(gram(x, None), gram(y, None), unb) for y in b] for x in a])
    perms = np.concatenate(list(draws("null", m, null, seed))) if null else np.zeros((0, m))
    nulls = []
    for p in perms.astype(np.int64):
        t = np.empty_like(obs)
        for i, x in enumerate(a):
            for j, y in enumerate(b):
                # within one source: cell (i, j), i <= j, permutes layer j (then mirrored)
                if ys is None and i > j:
                    continue
                t[i, j] = cka_from_grams(gram(x, None), gram(y, None)[np.ix_(p, p)], unb)
        if ys is None:
            t = np.triu(t) + np.triu(t, 1).T
        nulls.append(t)
    boots = []
    if bootstrap:
        for s in np.concatenate(list(draws("bootstrap", m, bootstrap, seed))).astype(np.int64):
            t = np.empty_like(obs)
            for i, x in enumerate(a):
                for j, y in enumerate(b):
                    kx, ky = gram(x, s), gram(y, s)
                    t[i, j] = _tied_cka(kx, ky, s, unb)
            if ys is None:
                np.fill_diagonal(t, 1.0)
            boots.append(t)
    out = {"values": obs}
    if null:
        nl = np.array(nulls)
        out["p"] = (1 + (nl >= obs).sum(0)) / (null + 1)
        out["null_mean"] = nl.mean(0)
    if bootstrap:
        out["ci"] = np.quantile(np.array(boots), [(1 - confidence) / 2, (1 + confidence) / 2],
                                axis=0)
    return out


def _data(m: int = 40, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = llm_like(m, 12, seed)  # offsets 50–1000x the spread
    y = (x - x.mean(0)) @ rng.standard_normal((12, 7)) * 0.3 + rng.standard_normal((m, 7))
    z = rng.standard_normal((m, 5)) * 1e-4 + 3.0  # tiny scale
    return {"x": x, "y": y, "z": z}


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
@pytest.mark.parametrize("estimator", ["biased", "debiased"])
def test_equal_to_the_reference_within_one_source(kernel: str, estimator: str) -> None:
    xs = _data()
    r = ls.cka(xs, kernel=kernel, estimator=estimator, null=23, bootstrap=21, seed=5,
               progress=False)
    ref = _reference(xs, kernel, estimator, 23, 21, seed=5)
    cal = r.meta["calibration"]
    assert cal["n"] == 40 and cal["null"] == 23 and cal["bootstrap"] == 21
    np.testing.assert_allclose(cal["values"], ref["values"], atol=1e-10)
    np.testing.assert_allclose(r.values, ref["values"], atol=1e-10)
    np.testing.assert_array_equal(r.meta["p_values"], ref["p"])
    np.testing.assert_allclose(r.meta["null_mean"], ref["null_mean"], atol=1e-10)
    np.testing.assert_allclose(r.meta["ci"], ref["ci"], atol=1e-10)
    assert r.meta["p_values"].shape == (3, 3) and r.meta["ci"].shape == (2, 3, 3)
    # within one source every table is symmetric
    np.testing.assert_array_equal(r.meta["p_values"], r.meta["p_values"].T)


@pytest.mark.parametrize("estimator", ["biased", "debiased"])
def test_two_sources_and_a_sample(estimator: str) -> None:
    xs = _data(90, 1)
    ys = {"u": xs["y"] @ np.random.default_rng(2).standard_normal((7, 9)),
          "v": np.random.default_rng(3).standard_normal((90, 4))}
    r = ls.cka(xs, ys, estimator=estimator, null=15, bootstrap=9, sample=50, seed=3,
               confidence=0.8, progress=False)
    idx = np.sort(np.random.default_rng(3).choice(90, size=50, replace=False))
    sx = {k: v[idx] for k, v in xs.items()}
    sy = {k: v[idx] for k, v in ys.items()}
    ref = _reference(sx, "linear", estimator, 15, 9, seed=3, ys=sy, confidence=0.8)
    assert r.meta["p_values"].shape == (3, 2)
    np.testing.assert_allclose(r.values, ref["values"], atol=1e-10)  # linear on the sample
    np.testing.assert_allclose(r.meta["calibration"]["values"], ref["values"], atol=1e-10)
    np.testing.assert_array_equal(r.meta["p_values"], ref["p"])
    np.testing.assert_allclose(r.meta["null_mean"], ref["null_mean"], atol=1e-10)
    np.testing.assert_allclose(r.meta["ci"], ref["ci"], atol=1e-10)
    assert r.meta["calibration"]["rows"] == "sample="


def test_p_values_uniform_when_unrelated_and_smallest_when_related() -> None:
    low = 0
    for seed in range(20):
        rng = np.random.default_rng(100 + seed)
        xs = {"a": rng.standard_normal((120, 30)), "b": rng.standard_normal((120, 40)) + 7.0}
        r = ls.cka(xs, estimator="debiased", null=99, seed=seed, progress=False)
        low += r.meta["p_values"][0, 1] < 0.05
    assert low <= 4  # about 1 expected of 20
    rng = np.random.default_rng(1)
    x = rng.standard_normal((200, 20))
    xs = {"a": x, "b": x @ rng.standard_normal((20, 30)) + 0.3 * rng.standard_normal((200, 30))}
    for est in ("biased", "debiased"):
        r = ls.cka(xs, estimator=est, null=49, progress=False)
        assert r.meta["p_values"][0, 1] == 1 / 50
        # what unrelated layers give: biased well above 0 at these widths, debiased near 0
        nm = r.meta["null_mean"][0, 1]
        assert (0.05 < nm < 0.3) if est == "biased" else abs(nm) < 0.02


def test_intervals_contain_the_value_and_shrink_with_n() -> None:
    rng = np.random.default_rng(4)
    widths = []
    for n in (150, 1200):
        x = rng.standard_normal((n, 16))
        xs = {"a": x, "b": x[:, :8] @ rng.standard_normal((8, 12)) + rng.standard_normal((n, 12)),
              "c": rng.standard_normal((n, 10))}
        for est in ("biased", "debiased"):
            r = ls.cka(xs, estimator=est, bootstrap=60, progress=False)
            lo, hi = r.meta["ci"]
            assert lo[0, 1] <= r.values[0, 1] <= hi[0, 1]
            # unrelated: the resamples centre on the value too (the copy pairs left out)
            assert lo[0, 2] <= r.values[0, 2] <= hi[0, 2]
            widths.append(hi[0, 1] - lo[0, 1])
            assert np.all(lo <= hi)
    assert widths[2] < 0.6 * widths[0] and widths[3] < 0.6 * widths[1]


def test_adversarial_layers_and_stores(tmp_path: Path) -> None:
    d = adversarial(60)  # LLM-like offsets, a constant column, duplicated rows, 1e-3 scale
    p = tmp_path / "s"
    ls.write_store(p, {k: v.astype(np.float32) for k, v in d.items()}, shard_bytes=8 << 10)
    r = ls.cka(p, estimator="debiased", null=11, bootstrap=7, progress=False)
    stored = {k: v.astype(np.float32).astype(np.float64) for k, v in d.items()}
    ref = _reference(stored, "linear", "debiased", 11, 7, seed=0)
    np.testing.assert_allclose(r.meta["calibration"]["values"], ref["values"], atol=1e-9)
    np.testing.assert_array_equal(r.meta["p_values"], ref["p"])
    np.testing.assert_allclose(r.meta["ci"], ref["ci"], atol=1e-9)
    # bf16 storage: exact widening, the same calibration as from the widened values
    import torch

    t = {k: torch.from_numpy(v.astype(np.float32)).to(torch.bfloat16) for k, v in d.items()}
    wide = {k: v.float().numpy().astype(np.float64) for k, v in t.items()}
    a = ls.cka(t, null=9, progress=False)
    b = ls.cka(wide, null=9, progress=False)
    np.testing.assert_array_equal(a.meta["p_values"], b.meta["p_values"])
    np.testing.assert_allclose(a.meta["null_mean"], b.meta["null_mean"], atol=1e-12)


def test_reproducible_and_saved(tmp_path: Path) -> None:
    xs = _data(60, 2)
    a = ls.cka(xs, null=30, bootstrap=10, seed=1, progress=False)
    b = ls.cka(xs, null=30, bootstrap=10, seed=1, progress=False)
    c = ls.cka(xs, null=30, bootstrap=10, seed=2, progress=False)
    np.testing.assert_array_equal(a.meta["null_mean"], b.meta["null_mean"])
    np.testing.assert_array_equal(a.meta["ci"], b.meta["ci"])
    assert not np.array_equal(a.meta["null_mean"], c.meta["null_mean"])
    back = ls.load_result(a.save(tmp_path / "r.json"))
    np.testing.assert_array_equal(back.meta["p_values"], a.meta["p_values"])
    np.testing.assert_array_equal(back.meta["ci"], a.meta["ci"])


def test_nonfinite_layers_and_arguments() -> None:
    xs = _data(40, 3)
    xs["bad"] = xs["y"].copy()
    xs["bad"][5, 2] = np.nan
    with pytest.raises(NonFiniteError):
        ls.cka(xs, null=5, progress=False)
    with pytest.warns(RuntimeWarning):
        r = ls.cka(xs, null=5, nonfinite="nan", progress=False)
    assert np.isnan(r.meta["p_values"][3]).all() and np.isnan(r.meta["p_values"][:, 3]).all()
    assert np.isfinite(r.meta["p_values"][:3, :3]).all()
    assert r.meta["calibration"]["left_out"] == ["bad"]
    good = {k: v for k, v in xs.items() if k != "bad"}
    np.testing.assert_array_equal(
        r.meta["p_values"][:3, :3], ls.cka(good, null=5, progress=False).meta["p_values"])
    for kw in ({"null": -1}, {"bootstrap": 1.5}, {"null": True}, {"confidence": 1.0},
               {"confidence": 0}, {"null": 3, "estimator": "minibatch"}):
        with pytest.raises(InvalidArgumentError):
            ls.cka(good, progress=False, **kw)  # type: ignore[arg-type]


def test_rows_follow_the_memory_budget() -> None:
    rng = np.random.default_rng(0)
    xs = {f"l{i}": rng.standard_normal((700, 8)) for i in range(3)}
    # all rows fit a large budget; a small one gets the largest sample whose Grams fit
    r = ls.cka(xs, null=3, progress=False)
    assert r.meta["calibration"]["n"] == 700 and r.meta["calibration"]["rows"] == "all rows"
    need = ls._native.calibration_bytes(3, 700, 8, "linear")
    small = ls.cka(xs, null=3, progress=False, max_memory=need // 2)
    m = small.meta["calibration"]["n"]
    assert 300 < m < 700 and "fit the memory budget" in small.meta["calibration"]["rows"]
    assert ls._native.calibration_bytes(3, m, 8, "linear") <= need // 2
    with pytest.raises(MemoryBudgetError, match="calibration"):
        ls.cka(xs, null=3, sample=700, progress=False, max_memory=need // 2)


def test_cli_marks_pairs_like_the_null(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from layerscope.cli import main

    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 12))
    p = tmp_path / "s"
    ls.write_store(p, {"a": x, "b": x @ rng.standard_normal((12, 9)),
                       "c": rng.standard_normal((300, 6))})
    png, out = tmp_path / "h.png", tmp_path / "r.json"
    assert main(["cka", str(p), "--null", "19", "--bootstrap", "8", "--confidence", "0.9",
                 "--plot", str(png), "--out", str(out), "-q"]) == 0
    assert png.stat().st_size > 0
    res = ls.load_result(out)
    assert res.meta["calibration"]["null"] == 19 and res.meta["calibration"]["confidence"] == 0.9
    capsys.readouterr()
    assert main(["cka", str(p), "--null", "39", "--bootstrap", "8"]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    row_c = next(line for line in lines if line.startswith("c "))
    row_a = next(line for line in lines if line.startswith("a "))
    assert row_c.count("°") == 2 and "°" not in row_a.split()[2]  # a-b related
    assert "null mean CKA" in text and "percentile interval of 8" in text
    capsys.readouterr()
    assert main(["cka", str(p), "--null", "19"]) == 0
    assert "the smallest p-value is 1/20" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["cka", str(p), "--null", "-1"])
