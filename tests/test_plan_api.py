"""The plan, visible: ``layerscope.plan`` / ``layerscope plan`` say what a call will do, the
call records the same in ``meta["plan"]``, and the moment measures (spectra, alignment,
``analyze``) run under layer tiles when one pass does not fit — with the same answers.

References: the single pass (itself checked against the formulas in ``test_alignment`` and
``test_spectrum``) and, independently here, numpy f64 from the centred data: covariance
eigenvalues, the Procrustes similarity ``‖X̄ᵀȲ‖_* / sqrt(‖X̄‖²_F ‖Ȳ‖²_F)`` (Williams et al.
2021) and linear CKA (``ref_linear`` of ``test_cka``).
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import layerscope
import layerscope.planner
import numpy as np
import pytest
from conftest import TILED_BUDGET, adversarial, adversarial_pair, ref_linear
from layerscope import InvalidArgumentError, MemoryBudgetError, cka, write_store
from layerscope._moments import measure_peak
from layerscope.cli import main

PLAN_KEYS = ("strategy", "passes", "peak_bytes", "bytes_read", "flops")


def _centred(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x - x.mean(axis=0)


def ref_procrustes(x: np.ndarray, y: np.ndarray) -> float:
    a, b = _centred(x), _centred(y)
    nuc = np.linalg.svd(a.T @ b, compute_uv=False).sum()
    return float(nuc / np.sqrt((a * a).sum() * (b * b).sum()))


def pair_budget(d: dict[str, np.ndarray]) -> int:
    """A budget holding the two widest layers' tile but not every layer at once."""
    w = sorted((x.shape[1] for x in d.values()), reverse=True)
    n = next(iter(d.values())).shape[0]
    need = measure_peak(w[:2], n, "float64")
    assert need * 1.05 < measure_peak(w, n, "float64")
    return int(need * 1.05)


@pytest.mark.parametrize("budget,strategy", [(None, None), (TILED_BUDGET, None),
                                             (TILED_BUDGET, "gram"), (None, "tiled")])
def test_plan_is_what_cka_runs(budget: str | None, strategy: str | None) -> None:
    d = adversarial()
    p = layerscope.plan(d, max_memory=budget, strategy=strategy)
    r = cka(d, max_memory=budget, strategy=strategy, progress=False)
    for key in (*PLAN_KEYS, "block_rows"):
        assert getattr(p, key) == r.meta["plan"][key], (key, p, r.meta["plan"])
    assert p.bytes_selected == r.meta["plan"]["bytes_selected"]
    assert p.budget_bytes >= p.peak_bytes and p.estimated_seconds > 0
    assert p.gemm_flops_per_s > 1e8  # measured here: any real machine does more
    assert set(p.alternatives) == {"single-pass", "tiled", "gram"}
    assert p.alternatives[p.strategy]["fits"]
    if budget is not None:  # the single pass needs more than 2M: said why
        alt = p.alternatives["single-pass"]
        assert not alt["fits"] and "budget" in alt["reason"], alt
    json.dumps(p.to_dict())
    assert p.strategy in str(p)


def test_plan_errors() -> None:
    d = adversarial()
    with pytest.raises(MemoryBudgetError, match="a budget of at least"):
        layerscope.plan(d, max_memory="64K")
    with pytest.raises(InvalidArgumentError, match="single-pass.*tiled.*gram"):
        layerscope.plan(d, strategy="diagonal")
    with pytest.raises(InvalidArgumentError, match="measure"):
        layerscope.plan(d, measure="rsa")
    with pytest.raises(InvalidArgumentError, match="strategy"):
        layerscope.plan(d, kernel="rbf", strategy="tiled")
    with pytest.raises(InvalidArgumentError, match="one source"):
        layerscope.plan(d, d, measure="spectrum")
    with pytest.raises(MemoryBudgetError, match="layer pair of widths"):
        layerscope.plan(d, measure="alignment", max_memory="1M")


def test_plan_of_rbf_and_minibatch() -> None:
    d = adversarial()
    p = layerscope.plan(d, kernel="rbf", sample=100)
    assert p.strategy == "sampled-gram" and p.block_rows == 100
    # the sampled rows (f64) and one 100 × 100 Gram per layer are held together
    assert p.peak_bytes >= 100 * 570 * 8 + 4 * 100 * 100 * 8
    m = layerscope.plan(d, estimator="minibatch", batch_size=50)
    assert m.strategy == "minibatch" and m.block_rows == 50
    assert m.peak_bytes == layerscope._native.minibatch_bytes([300, 90, 140, 40], 50)


ALIGN_CASES = [("subspace", 8), ("svcca", "auto"), ("pwcca", 8), ("cca", 1), ("procrustes", 1)]


@pytest.mark.parametrize("method,k", ALIGN_CASES)
def test_alignment_under_layer_tiles(method: str, k: int | str) -> None:
    d = adversarial()  # offsets, n < d for x, a constant column, duplicated rows, 1e-3 scale
    budget = pair_budget(d)
    one = layerscope.alignment(d, method=method, k=k, progress=False)
    tiled = layerscope.alignment(d, method=method, k=k, max_memory=budget, progress=False)
    plan = tiled.meta["plan"]
    assert one.meta["plan"]["strategy"] == "single-pass"
    assert plan["strategy"] == "layer-tiles" and plan["passes"] >= 3, plan
    assert plan["peak_bytes"] <= budget and plan["bytes_read"] > one.meta["plan"]["bytes_read"]
    assert np.abs(tiled.values - one.values).max() <= 1e-10
    for name, v in one.extra.items():
        if name == "cosines":
            for r in range(4):
                for c in range(4):
                    assert np.abs(np.asarray(v[r][c]) - tiled.extra[name][r][c]).max(
                        initial=0) <= 1e-10
        else:
            assert np.allclose(np.asarray(v), np.asarray(tiled.extra[name]), rtol=0,
                               atol=1e-10, equal_nan=True), name
    for key in ("row_k", "col_k", "row_ridge", "col_ridge"):
        assert one.meta.get(key) == tiled.meta.get(key), key
    if method == "procrustes":
        names = list(d)
        for i, a in enumerate(names):
            for j, b in enumerate(names):
                assert abs(tiled.values[i, j] - ref_procrustes(d[a], d[b])) <= 1e-10


def test_spectrum_runs_per_layer() -> None:
    d = adversarial()
    n = 150
    budget = int(measure_peak([300], n, "float64") * 1.05)  # the widest layer alone
    # the reference pass: every layer at once (analyze with a pair measure)
    one = layerscope.analyze(d, measures=["spectrum", "cka"], progress=False)["spectrum"]
    assert one.meta["plan"]["strategy"] == "single-pass"
    for kw in ({}, {"max_memory": budget}):
        per = layerscope.spectrum(d, progress=False, **kw)
        plan = per.meta["plan"]
        assert plan["strategy"] == "per-layer" and plan["passes"] == 4, plan
        assert plan["bytes_read"] == one.meta["plan"]["bytes_read"]  # each layer once
        assert plan["flops"] == n * sum(x.shape[1] * (x.shape[1] + 1) for x in d.values())
        for name, x in d.items():
            want = np.sort(np.linalg.eigvalsh(np.cov(x, rowvar=False)))[::-1]
            got = per.eigenvalues[name]
            assert np.abs(got - one.eigenvalues[name]).max() <= 1e-12 * want[0]
            assert np.abs(got - want).max() <= 1e-9 * want[0], name
            assert per.table[name] == one.table[name]
    with pytest.raises(MemoryBudgetError, match="spectrum of a layer of width 300"):
        layerscope.spectrum(d, max_memory=budget // 2, progress=False)


def test_plan_of_a_store_not_yet_made() -> None:
    p = layerscope.planner.plan_shapes([4096] * 33, 10**6, max_memory="16G")
    assert p.strategy == "tiled" and p.compute == "float32" and p.passes > 1
    assert p.bytes_selected == 33 * 4096 * 10**6 * 2  # bf16
    assert p.peak_bytes <= 16 << 30
    # the multiply-adds of a tiled pass are those of one pass: D(D+1)/2 per row
    assert p.flops == 2 * 10**6 * (33 * 4096) * (33 * 4096 + 1) // 2
    g = layerscope.planner.plan_shapes([4096] * 33, 2048)
    assert g.strategy == "gram"
    a = layerscope.planner.plan_shapes([8192] * 80, 10**7, measure="alignment",
                                       max_memory="64G")
    assert a.strategy == "layer-tiles" and a.peak_bytes <= 64 << 30
    with pytest.raises(InvalidArgumentError, match="dtype"):
        layerscope.planner.plan_shapes([8], 10, dtype="int4")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["plan", "--shape", "32x4096", "--rows", "1e6", "--max-memory", "16G",
                     "--json"]) == 0
    got = json.loads(out.getvalue())
    assert got["strategy"] == "tiled" and got["dims"] == [4096] * 32
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(["plan", "--shape", "32x4096"]) == 2
    assert "--rows" in err.getvalue()


def test_analyze_across_two_stores_under_layer_tiles(tmp_path: Path) -> None:
    d, e, pa, pb = adversarial_pair(tmp_path)
    ms = ["cka", "cka_debiased", "spectrum", "alignment", "alignment:procrustes"]
    budget = int(measure_peak([300, 260], 150, "float64") * 1.05)
    one = layerscope.analyze(pa, pb, measures=ms, k=8, progress=False)
    seen: list[tuple[int, int]] = []
    tiled = layerscope.analyze(pa, pb, measures=ms, k=8, max_memory=budget,
                               progress=lambda a, b: seen.append((a, b)))
    plan = tiled["cka"].meta["plan"]
    assert plan["strategy"] == "layer-tiles" and plan["passes"] >= 2, plan
    assert seen[-1] == (150 * plan["passes"],) * 2  # one progress over all passes
    for key in ("cka", "cka_debiased", "alignment", "alignment:procrustes"):
        assert tiled[key].values.shape == (4, 2)
        assert np.abs(tiled[key].values - one[key].values).max() <= 1e-10, key
    for key in ("spectrum", "spectrum_other"):
        for name, ev in one[key].eigenvalues.items():
            assert np.abs(tiled[key].eigenvalues[name] - ev).max() <= 1e-12 * ev[0]
    for i, a in enumerate(d):
        for j, b in enumerate(e):
            for key, est in (("cka", "biased"), ("cka_debiased", "debiased")):
                assert abs(tiled[key].values[i, j] - ref_linear(d[a], e[b], est)) <= 1e-9
            assert abs(tiled["alignment:procrustes"].values[i, j]
                       - ref_procrustes(d[a], e[b])) <= 1e-10


@pytest.mark.parametrize("measure", ["spectrum", "alignment"])
def test_plan_is_what_the_moment_measures_run(measure: str) -> None:
    d = adversarial()
    for budget in (None, pair_budget(d)):
        p = layerscope.plan(d, measure=measure, max_memory=budget)
        fn = layerscope.spectrum if measure == "spectrum" else layerscope.alignment
        r = fn(d, max_memory=budget, progress=False)
        for key in PLAN_KEYS:
            assert getattr(p, key) == r.meta["plan"][key], (key, p, r.meta["plan"])


def test_every_moment_result_records_its_plan() -> None:
    d = adversarial()
    results = [layerscope.spectrum(d, progress=False),
               layerscope.alignment(d, k=4, progress=False),
               *layerscope.analyze(d, k=4, progress=False).values()]
    for r in results:
        assert all(key in r.meta["plan"] for key in PLAN_KEYS), r.meta.get("plan")


def test_cli_plan(tmp_path: Path) -> None:
    p = tmp_path / "s"
    write_store(p, adversarial(), shard_bytes=64 << 10)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["plan", str(p), "--max-memory", TILED_BUDGET, "--strategy", "tiled",
                     "--json"]) == 0
    got = json.loads(out.getvalue())
    assert got["strategy"] == "tiled" and got["passes"] >= 3
    assert got["peak_bytes"] <= 2 << 20 and got["budget_source"] == "max_memory argument"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["plan", str(p), "--measure", "alignment"]) == 0
    assert "strategy      single-pass" in out.getvalue()
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(["plan", str(p), "--max-memory", "64K"]) == 2
    assert "a budget of at least" in err.getvalue()
