"""The planner of the exact linear pass: the same answers under every plan.

Each strategy is forced on the same data — ``"single-pass"`` (one accumulator over all
layers), ``"tiled"`` (budgets small enough for several tiles and for layers split into
feature-column blocks) and ``"gram"`` (per-layer centred Grams, the budget holding only some
of them at once) — and compared with each other and with the f64 Gram reference
(``ref_linear`` of ``test_cka``: Kornblith et al. 2019 / Song et al. 2012 from explicit
Gram matrices): 1e-10 in float64 compute, 1e-6 in float32, on the adversarial cases of the
CKA tests (large per-feature mean offsets, bf16 storage, n < d, constant columns, duplicated
rows) and across two stores.
"""

from __future__ import annotations

from pathlib import Path

import layerscope
import numpy as np
import pytest
from conftest import TILED_BUDGET, adversarial, adversarial_pair, ref_linear
from layerscope import InvalidArgumentError, MemoryBudgetError, cka, write_store


def _both(src: object, other: object = None, **kw: object) -> tuple:
    """The single pass and the other plans (tiled, gram) under ``TILED_BUDGET``."""
    one = cka(src, other, strategy="single-pass", progress=False, **kw)  # type: ignore[arg-type]
    tiled = cka(src, other, strategy="tiled", max_memory=TILED_BUDGET, progress=False,
                **kw)  # type: ignore[arg-type]
    gram = cka(src, other, strategy="gram", max_memory=TILED_BUDGET, progress=False,
               **kw)  # type: ignore[arg-type]
    assert one.meta["plan"]["strategy"] == "single-pass" and one.meta["plan"]["passes"] == 1
    plan = tiled.meta["plan"]
    assert plan["strategy"] == "tiled" and plan["passes"] >= 3, plan
    assert plan["peak_bytes"] <= 2 << 20, plan
    # the multiply-adds do not grow with the tiles (within one source: D(D+1)/2 per row)
    if other is None:
        assert plan["flops"] == one.meta["plan"]["flops"], (plan, one.meta["plan"])
    assert plan["bytes_read"] > one.meta["plan"]["bytes_read"]
    gp = gram.meta["plan"]
    assert gp["strategy"] == "gram" and gp["peak_bytes"] <= 2 << 20, gp
    assert gp["flops"] < one.meta["plan"]["flops"], (gp, one.meta["plan"])
    return one, tiled, gram


@pytest.mark.parametrize("n", [150, 60])  # 60 rows: n < d for every layer but w
@pytest.mark.parametrize("estimator", ["biased", "debiased"])
def test_tiled_equals_single_pass_and_reference_f64(n: int, estimator: str) -> None:
    d = adversarial(n)
    one, *others = _both(d, estimator=estimator, compute="float64")
    names = list(d)
    for r in others:
        assert np.abs(r.values - one.values).max() <= 1e-10, r.meta["plan"]
        for i, a in enumerate(names):
            for j, b in enumerate(names):
                want = ref_linear(d[a], d[b], estimator)
                assert abs(r.values[i, j] - want) <= 1e-9, (a, b, r.values[i, j], want)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tiled_equals_single_pass_float32_stores(tmp_path: Path, dtype: str) -> None:
    d = adversarial()
    p = tmp_path / "s"
    write_store(p, {k: v.astype(np.float32) for k, v in d.items()}, dtype=dtype,
                shard_bytes=64 << 10)
    s = layerscope.open(p)
    stored = {k: s.read(k, dtype=np.float64) for k in d}
    for est in ("biased", "debiased"):
        one, *others = _both(p, estimator=est)  # compute="auto": float32 products
        for r in others:
            assert r.meta["compute"] == "float32"
            assert np.abs(r.values - one.values).max() <= 1e-6, r.meta["plan"]
            for i, a in enumerate(d):
                for j, b in enumerate(d):
                    want = ref_linear(stored[a], stored[b], est)
                    assert abs(r.values[i, j] - want) <= 1e-6, (est, a, b, r.meta["plan"])


def test_tiled_across_two_stores(tmp_path: Path) -> None:
    d, e, pa, pb = adversarial_pair(tmp_path)
    for est in ("biased", "debiased"):
        one, *others = _both(pa, pb, estimator=est, compute="float64")
        for r in others:
            assert r.values.shape == (4, 2)
            assert np.abs(r.values - one.values).max() <= 1e-10, r.meta["plan"]
            for i, a in enumerate(d):
                for j, b in enumerate(e):
                    assert abs(r.values[i, j] - ref_linear(d[a], e[b], est)) <= 1e-9


def test_auto_picks_the_cheapest_plan_that_fits() -> None:
    d = adversarial()  # 150 rows against D = 570: the Grams are far cheaper
    r = cka(d, progress=False)
    assert r.meta["plan"]["strategy"] == "gram", r.meta["plan"]
    rng = np.random.default_rng(0)
    many = {"a": rng.standard_normal((3000, 16)), "b": rng.standard_normal((3000, 24))}
    assert cka(many, progress=False).meta["plan"]["strategy"] == "single-pass"
    # many rows, a budget below the single pass: tiles (the Grams would not fit)
    wide = {f"l{i}": rng.standard_normal((3000, 200)) for i in range(4)}
    r = cka(wide, max_memory="4M", progress=False)
    assert r.meta["plan"]["strategy"] == "tiled", r.meta["plan"]


def test_strategy_errors() -> None:
    d = adversarial()
    with pytest.raises(InvalidArgumentError, match="single-pass.*tiled.*gram"):
        cka(d, strategy="diagonal", progress=False)
    with pytest.raises(InvalidArgumentError, match="strategy"):
        cka(d, kernel="rbf", strategy="tiled", progress=False)
    with pytest.raises(MemoryBudgetError, match="at most|not even one"):
        cka(d, strategy="single-pass", max_memory=TILED_BUDGET, progress=False)
    with pytest.raises(MemoryBudgetError, match="a budget of at least"):
        cka(d, strategy="tiled", max_memory="64K", progress=False)


def test_nonfinite_under_tiles() -> None:
    d = adversarial()
    d["y"] = d["y"].copy()
    d["y"][41, 3] = np.nan
    clean = cka({k: v for k, v in d.items() if k != "y"}, progress=False)
    for strategy in ("tiled", "gram"):
        with pytest.raises(layerscope.NonFiniteError, match="row 41"):
            cka(d, max_memory=TILED_BUDGET, strategy=strategy, progress=False)
        with pytest.warns(RuntimeWarning, match="non-finite"):
            r = cka(d, max_memory=TILED_BUDGET, nonfinite="nan", strategy=strategy,
                    progress=False)
        assert r.meta["plan"]["strategy"] == strategy
        assert np.isnan(r.values[1]).all() and np.isnan(r.values[:, 1]).all()
        assert r.meta["nonfinite_rows"] == {"y": 41}
        assert np.abs(np.delete(np.delete(r.values, 1, 0), 1, 1) - clean.values).max() <= 1e-10


def test_progress_spans_all_passes() -> None:
    seen: list[tuple[int, int]] = []
    r = cka(adversarial(), max_memory=TILED_BUDGET, strategy="tiled",
            progress=lambda a, b: seen.append((a, b)))
    passes = r.meta["plan"]["passes"]
    assert seen[-1] == (150 * passes, 150 * passes), seen[-3:]
    assert all(b == 150 * passes for _, b in seen)
    assert [a for a, _ in seen] == sorted(a for a, _ in seen)
