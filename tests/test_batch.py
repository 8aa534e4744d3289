"""layerscope.batch: the same measures over many stores, resumable, one process per folder.

Checked against the single-store API (the numbers in the table are those of ``cka``,
``alignment``, ``intrinsic_dimensions`` and ``spectrum`` called directly), for every pairing;
resumed after ``kill -9`` (the same table as an uninterrupted run, no torn or duplicated
row); a changed store or changed options recompute exactly the items they touch; a second
process on the folder is refused while the first runs.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import layerscope as ls
import numpy as np
import pytest
from layerscope.errors import InvalidArgumentError, LockedError, MismatchError
from layerscope.runs import plan_items
from layerscope.runs.table import COLUMNS, read_csv


def batch(*args, **kwargs):
    """``layerscope.batch`` quiet and without figures (the figure tests ask for them)."""
    kwargs.setdefault("progress", False)
    kwargs.setdefault("figures", False)
    return ls.batch(*args, **kwargs)


def checkpoints(root: Path, steps: int = 4, n: int = 400, layers: int = 3, d: int = 16,
                seed: int = 0) -> list[Path]:
    """A drifting sequence of "checkpoints": fixed inputs through per-layer maps that move
    further from the first step's at each step (so CKA to step 0 falls with the step)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    paths = []
    for t in range(steps):
        arrays = {}
        for li in range(layers):
            w = np.random.default_rng(100 + li).standard_normal((d, d))
            drift = np.random.default_rng(1000 * t + li + 7).standard_normal((d, d)) * 0.4 * t
            arrays[f"layer.{li}"] = np.tanh(x @ (w + drift) / np.sqrt(d)).astype(np.float32)
        path = root / f"step-{t}"
        ls.write_store(path, arrays, overwrite=True)
        paths.append(path)
    return paths


def table(path: Path) -> list[dict]:
    return read_csv((path / "results.csv").read_text())


def key(r: dict) -> tuple:
    return tuple(r[c] for c in COLUMNS[:6])


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> list[Path]:
    return checkpoints(tmp_path_factory.mktemp("ckpts"))


def test_table_equals_the_single_store_api(ckpts, tmp_path):
    res = batch(ckpts, out=tmp_path / "b", measures=["cka", "align", "id", "spectrum"],
                   align={"k": 4}, id={"methods": ["twonn", "mle"], "k": 10}, sample=300,
                   progress=False)
    assert not res.failed and not res.skipped
    rows = table(tmp_path / "b")
    assert [tuple(r.values())[:6] for r in rows] == [tuple(r[:6]) for r in res.rows]
    assert len({key(r) for r in rows}) == len(rows)  # no duplicated row
    by = {key(r): r for r in rows}
    labels = [p.name for p in ckpts]
    for other, lab in zip(ckpts[1:], labels[1:]):
        # cka: sample= goes to both cka and id; the linear estimator uses the sample too
        ref = ls.cka(ckpts[0], other, sample=300, progress=False)
        al = ls.alignment(ckpts[0], other, k=4, progress=False)
        for i, a in enumerate(ref.rows):
            for j, b in enumerate(ref.cols):
                r = by[(labels[0], lab, a, b, "cka", "linear-biased")]
                assert r["value"] == ref.values[i, j]
                assert r["n"] == 300 and r["seed"] == 0
                assert by[(labels[0], lab, a, b, "align", "subspace")]["value"] == \
                    al.values[i, j]
    for path, lab in zip(ckpts, labels):
        ids = ls.intrinsic_dimensions(path, methods=["twonn", "mle"], k=10, sample=300,
                                      progress=False)
        sp = ls.spectrum(path, progress=False)
        for layer in sp.layers:
            for m in ("twonn", "mle"):
                r = by[(lab, "", layer, "", "id", m)]
                assert r["value"] == ids[m].values[layer]
                assert r["n"] == ids[m].details[layer]["rows_used"]
            assert by[(lab, "", layer, "", "spectrum", "effective_rank")]["value"] == \
                sp.table[layer]["effective_rank"]
    # the drift shows: CKA of layer.0 to step 0 falls along the run
    curve = [by[(labels[0], lab, "layer.0", "layer.0", "cka", "linear-biased")]["value"]
             for lab in labels[1:]]
    assert curve == sorted(curve, reverse=True) and curve[0] > curve[-1] + 0.05
    # each item's full result is kept
    full = res.result("cka", labels[0], labels[2])
    np.testing.assert_array_equal(full.values, ls.cka(ckpts[0], ckpts[2], sample=300,
                                                      progress=False).values)
    assert set(res.result("id", labels[1])) == {"twonn", "mle"}


def test_pairings(ckpts):
    labels = ["a", "b", "c", "d"]
    pairs = {p: [(i.a, i.b) for i in plan_items(labels, p, 0, ["cka"])]
             for p in ("reference", "consecutive", "all", "each")}
    assert pairs["reference"] == [("a", "b"), ("a", "c"), ("a", "d")]
    assert pairs["consecutive"] == [("a", "b"), ("b", "c"), ("c", "d")]
    assert pairs["all"] == [("a", "b"), ("a", "c"), ("a", "d"), ("b", "c"), ("b", "d"),
                            ("c", "d")]
    assert pairs["each"] == [("a", "a"), ("b", "b"), ("c", "c"), ("d", "d")]
    assert [(i.a, i.b) for i in plan_items(labels, "reference", 2, ["id"])] == \
        [(x, None) for x in labels]  # store measures: once per store whatever the pairing
    assert [(i.a, i.b) for i in plan_items(labels, "reference", 2, ["cka"])][0] == ("c", "a")


def test_each_and_reference_outside_the_list(ckpts, tmp_path):
    res = batch(ckpts[1:3], out=tmp_path / "e", pairs="each", progress=False,
                   labels=["one", "two"])
    within = ls.cka(ckpts[2], progress=False)
    by = {key(r): r["value"] for r in table(tmp_path / "e")}
    assert by[("two", "two", "layer.0", "layer.2", "cka", "linear-biased")] == within.values[0, 2]
    assert len(res.rows) == 2 * 9
    # a reference that is not among the stores is put first
    res = batch(ckpts[2:], out=tmp_path / "r", reference=ckpts[0], progress=False)
    assert res.labels == ["step-0", "step-2", "step-3"]
    assert {(r[0], r[1]) for r in res.rows} == {("step-0", "step-2"), ("step-0", "step-3")}
    # a reference named by its label
    res = batch(ckpts, out=tmp_path / "r2", reference="step-3", progress=False)
    assert {r[0] for r in res.rows} == {"step-3"}


def test_resume_skips_done_items_and_recomputes_changed_ones(ckpts, tmp_path):
    stores = [tmp_path / p.name for p in ckpts]
    for src, dst in zip(ckpts, stores):
        ls.write_store(dst, {k: ls.open(src).read(k) for k in ls.open(src).layers})
    out = tmp_path / "b"
    first = batch(stores, out=out, measures=["cka", "spectrum"], progress=False)
    assert len(first.computed) == 3 + 4 and not first.skipped
    again = batch(stores, out=out, measures=["cka", "spectrum"], progress=False)
    assert not again.computed and len(again.skipped) == 7
    assert (out / "results.csv").read_text() == to_text(first)
    # one store rewritten: the items that read it, and only those, run again
    rng = np.random.default_rng(5)
    ls.write_store(stores[2], {f"layer.{i}": rng.standard_normal((400, 16)) for i in range(3)},
                   overwrite=True)
    third = batch(stores, out=out, measures=["cka", "spectrum"], progress=False)
    assert sorted(map(str, third.computed)) == ["cka step-0 × step-2", "spectrum step-2"]
    by = {key(r): r["value"] for r in table(out)}
    assert by[("step-0", "step-2", "layer.1", "layer.1", "cka", "linear-biased")] == \
        ls.cka(stores[0], stores[2], progress=False)["layer.1", "layer.1"]
    # other options: those items run again; resume=False: all of them
    fourth = batch(stores, out=out, measures=["cka", "spectrum"], cka={"estimator":
                      "debiased"}, progress=False)
    assert sorted(map(str, fourth.computed)) == [f"cka step-0 × step-{i}" for i in (1, 2, 3)]
    assert {r[5] for r in fourth.rows if r[4] == "cka"} == {"linear-debiased"}
    fifth = batch(stores, out=out, measures=["cka", "spectrum"], cka={"estimator":
                     "debiased"}, resume=False, progress=False)
    assert len(fifth.computed) == 7
    # the budget and the number of workers decide how, not what: nothing is recomputed
    sixth = batch(stores, out=out, measures=["cka", "spectrum"], cka={"estimator":
                     "debiased"}, max_memory="1G", workers=1, progress=False)
    assert not sixth.computed


def to_text(res) -> str:
    from layerscope.runs.table import to_csv

    return to_csv(res.rows)


def test_parallel_items_equal_serial_and_budget_retry(ckpts, tmp_path):
    serial = batch(ckpts, out=tmp_path / "s", pairs="all", workers=1, progress=False)
    par = batch(ckpts, out=tmp_path / "p", pairs="all", workers=3, progress=False)
    assert serial.rows == par.rows and len(par.computed) == 6
    # the smallest budget one item fits in; at half of 1.5x it, the parallel share is refused
    # and each item runs again alone with the whole budget
    lo, hi = 1, 1 << 30
    while hi - lo > 1:
        mid = (lo + hi) // 2
        try:
            ls.cka(ckpts[0], ckpts[1], max_memory=mid, progress=False)
            hi = mid
        except ls.MemoryBudgetError:
            lo = mid
    retried = batch(ckpts[:3], out=tmp_path / "m", workers=2, max_memory=hi * 3 // 2,
                       progress=False)
    assert not retried.failed and len(retried.computed) == 2
    want = [r for r in serial.rows if r[0] == "step-0" and r[1] in ("step-1", "step-2")]
    assert [r[:6] for r in retried.rows] == [r[:6] for r in want]
    # at that budget the planner may choose another plan: the same numbers to rounding
    np.testing.assert_allclose([r[6] for r in retried.rows], [r[6] for r in want], rtol=1e-12)
    failed = batch(ckpts[:3], out=tmp_path / "f", workers=2, max_memory=lo,
                      progress=False)
    assert len(failed.failed) == 2 and not failed.rows
    assert all("MemoryBudgetError" in e for e in failed.failed.values())
    assert table(tmp_path / "f") == []


def test_refused_before_any_work(ckpts, tmp_path):
    out = tmp_path / "x"
    with pytest.raises(InvalidArgumentError, match="no selected measure .* takes sigmaa="):
        batch(ckpts, out=out, sigmaa=1.0)
    with pytest.raises(InvalidArgumentError, match="k= means neighbours for id"):
        batch(ckpts, out=out, measures=["id", "align"], k=3)
    with pytest.raises(InvalidArgumentError, match="'id' is not in measures"):
        batch(ckpts, out=out, id={"k": 3})
    with pytest.raises(InvalidArgumentError, match="estimator='nope'"):
        batch(ckpts, out=out, cka={"estimator": "nope"})
    with pytest.raises(InvalidArgumentError, match="seed=-1"):
        batch(ckpts, out=out, seed=-1)
    with pytest.raises(InvalidArgumentError, match="pairs="):
        batch(ckpts, out=out, pairs="some")
    with pytest.raises(InvalidArgumentError, match="is given twice"):
        batch([ckpts[0], ckpts[0]], out=out)
    with pytest.raises(InvalidArgumentError, match="gives nothing to compute"):
        batch(ckpts[:1], out=out)
    with pytest.raises(InvalidArgumentError, match="not distinct"):
        batch(ckpts[:2], out=out, labels=["a/b", "a b"])
    with pytest.raises(InvalidArgumentError, match="give two items one file name"):
        batch(ckpts, out=out, labels=["x__y", "z", "x", "y__z"], pairs="all")
    other = tmp_path / "other"
    ls.write_store(other, {"layer.0": np.zeros((401, 4), np.float32)})
    with pytest.raises(MismatchError, match="step-0 and other: the two sources have 400 and 401"):
        batch([ckpts[0], other], out=out)
    with pytest.raises(ls.StoreNotFoundError):
        batch([ckpts[0], tmp_path / "missing"], out=out)
    assert not out.exists()  # nothing was created for any of these
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("keep me")
    with pytest.raises(InvalidArgumentError, match="not a layerscope batch folder"):
        batch(ckpts, out=mine)
    assert os.listdir(mine) == ["thesis.tex"]


def test_failed_item_is_reported_kept_out_and_retried(ckpts, tmp_path):
    const = tmp_path / "const"
    x = ls.open(ckpts[0])
    ls.write_store(const, {k: np.full((400, 16), 3.0, np.float32) if k == "layer.1" else x.read(k)
                           for k in x.layers})
    res = batch([ckpts[0], const, ckpts[1]], out=tmp_path / "b", measures=["align"],
                   align={"k": 4}, progress=False)
    assert [str(i) for i in res.failed] == ["align step-0 × const"]
    assert "zero variance" in next(iter(res.failed.values()))
    assert {(r[0], r[1]) for r in res.rows} == {("step-0", "step-1")}
    again = batch([ckpts[0], const, ckpts[1]], out=tmp_path / "b", measures=["align"],
                     align={"k": 4}, progress=False)
    assert list(map(str, again.failed)) == ["align step-0 × const"] and not again.computed
    state = json.loads((tmp_path / "b" / "batch.json").read_text())
    assert state["state"] == "finished" and list(state["failed"]) == ["align step-0 × const"]


SCRIPT = textwrap.dedent("""
    import sys, layerscope as ls
    stores, out = sys.argv[1:-1], sys.argv[-1]
    res = ls.batch(stores, out=out, pairs="all", cka={"kernel": "rbf", "sample": 1200},
                   workers=1, progress=False, figures=False)
    print(len(res.computed), len(res.skipped))
""")


@pytest.fixture(scope="module")
def slow(tmp_path_factory) -> list[Path]:
    """Stores whose RBF items take a few tenths of a second each."""
    return checkpoints(tmp_path_factory.mktemp("slow"), steps=4, n=1500, layers=4, d=48)


def _spawn(stores: list[Path], out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", SCRIPT, *map(str, stores), str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(pred, what: str, timeout: float = 120.0) -> None:
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_kill_9_midway_then_resume_gives_the_uninterrupted_table(slow, tmp_path):
    whole = tmp_path / "whole"
    p = _spawn(slow, whole)
    assert p.wait(300) == 0, p.stderr.read()
    assert p.stdout.read().split() == ["6", "0"]
    out = tmp_path / "killed"
    p = _spawn(slow, out)
    items = out / "items" / "cka"
    _wait_for(lambda: items.is_dir() and len(list(items.glob("*.json"))) >= 2, "two items")
    p.send_signal(signal.SIGKILL)
    p.wait(60)
    done = len(list(items.glob("*.json")))
    assert 2 <= done < 6, "the kill came after the last item: make the items slower"
    if (out / "results.csv").exists():  # a snapshot of whole rows, never a torn one
        partial = table(out)
        assert len({key(r) for r in partial}) == len(partial)
        with open(out / "results.csv", newline="") as f:
            assert all(len(rec) == len(COLUMNS) for rec in csv.reader(f))
    p = _spawn(slow, out)
    assert p.wait(300) == 0, p.stderr.read()
    computed, skipped = map(int, p.stdout.read().split())
    assert skipped == done and computed == 6 - done
    assert (out / "results.csv").read_text() == (whole / "results.csv").read_text()
    assert not [f for f in out.rglob(".*.tmp")]  # temp files of the killed writes are gone


def test_second_process_is_refused_naming_the_holder(slow, tmp_path):
    out = tmp_path / "b"
    p = _spawn(slow, out)
    try:
        _wait_for(lambda: (out / "batch.json").exists(), "the first batch to start")
        with pytest.raises(LockedError, match=rf"another layerscope batch .*pid {p.pid}"):
            batch(slow, out=out, pairs="all", progress=False)
        res = subprocess.run([sys.executable, "-m", "layerscope", "batch", *map(str, slow),
                              "-o", str(out), "-q"], capture_output=True, text=True)
        assert res.returncode == 2 and "layerscope: error:" in res.stderr
        assert f"pid {p.pid}" in res.stderr
    finally:
        assert p.wait(300) == 0, p.stderr.read()
    assert len(table(out)) == 6 * 16  # the first batch's table is whole


def test_cli(ckpts, tmp_path):
    out = tmp_path / "b"
    cmd = [sys.executable, "-m", "layerscope", "batch", *map(str, ckpts), "-o", str(out),
           "--measures", "cka,id", "--id-methods", "twonn", "--id-sample", "200", "-q"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "# batch | 7 computed, 0 already done, 0 failed" in res.stdout
    rows = table(out)
    assert {r["measure"] for r in rows} == {"cka", "id"}
    assert {r["estimator"] for r in rows if r["measure"] == "id"} == {"twonn"}
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert "# batch | 0 computed, 7 already done" in res.stdout
    bad = subprocess.run(cmd[:-1] + ["--measures", "cka,nope"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--measures" in bad.stderr



PNG = b"\x89PNG\r\n\x1a\n"


def figures_of(out: Path) -> set[str]:
    return {p.stem for p in (out / "figures").glob("*.png")}


def check_index(out: Path) -> str:
    """index.html is self-contained: every figure embedded, nothing fetched, no script."""
    page = (out / "index.html").read_text()
    assert page.count('<img src="data:image/png;base64,') == len(figures_of(out))
    assert "<script" not in page and 'src="http' not in page and "url(" not in page
    for png in (out / "figures").glob("*.png"):
        assert png.read_bytes()[:8] == PNG
    return page


def test_figures_and_index(ckpts, tmp_path):
    pytest.importorskip("matplotlib")
    from layerscope.runs import figures as F

    out = tmp_path / "b"
    res = batch(ckpts, out=out, measures=["cka", "id", "spectrum", "align"], align={"k": 4},
                id={"methods": ["twonn", "mle"]}, sample=300, figures=True)
    assert res.index == out / "index.html"
    assert figures_of(out) == {"cka-to-reference", "cka-to-reference-table", "matching",
                               "id-twonn", "id-mle", "spectrum-effective_rank", "cka-grid",
                               "align-grid"}
    page = check_index(out)
    assert "step-0" in page and "results.csv" in page and "4 stores" in page
    # the figures' numbers are the table's
    labels = [p.name for p in ckpts]
    series = F.same_layer_series(res.rows, "cka", "linear-biased",
                                 [(labels[0], x) for x in labels[1:]])
    for lab, vals in zip(labels[1:], zip(*series.values())):
        ref = batch_value(res.rows, labels[0], lab)
        assert list(vals) == [ref[f"layer.{i}"] for i in range(3)]
    rn, cn, best = F.matching(res.rows, "linear-biased", labels[0], labels[3])
    assert best == [0, 1, 2] and rn == cn == ["layer.0", "layer.1", "layer.2"]
    names, ys = F.per_layer_series(res.rows, "id", "mle", labels[2])
    assert names == rn and ys == [res.result("id", labels[2])["mle"].values[n] for n in names]
    # another pairing in the same folder: its figures, and none left from the first run
    batch(ckpts, out=out, pairs="consecutive", figures=True)
    assert figures_of(out) == {"cka-consecutive", "cka-consecutive-table", "cka-grid"}
    check_index(out)
    batch(ckpts, out=out, pairs="each", figures=True)
    assert figures_of(out) == {"adjacent", "cka-grid"}
    layers, ys = F.adjacent_series(batch(ckpts, out=out, pairs="each").rows, "linear-biased",
                                   labels[1])
    within = ls.cka(ckpts[1], progress=False)
    assert ys == [within.values[i, i + 1] for i in range(2)] and layers == within.rows
    # all pairs: the reference views come from the first store's pairs
    batch(ckpts, out=out, pairs="all", figures=True)
    assert {"cka-to-reference", "matching"} <= figures_of(out)


def batch_value(rows, a, b) -> dict[str, float]:
    return {r[2]: r[6] for r in rows if r[0] == a and r[1] == b and r[2] == r[3]
            and r[4] == "cka"}


def test_index_without_matplotlib_or_figures(ckpts, tmp_path, monkeypatch):
    import layerscope.plots
    from layerscope.errors import MissingDependencyError

    def missing():
        raise MissingDependencyError("a figure: matplotlib is not installed; pip install "
                                     "'layerscope[plot]'")

    monkeypatch.setattr(layerscope.plots, "_mpl", missing)
    res = batch(ckpts, out=tmp_path / "b", figures=True)
    page = (tmp_path / "b" / "index.html").read_text()
    assert "No figures: a figure: matplotlib is not installed" in page and "<img" not in page
    assert len(table(tmp_path / "b")) == len(res.rows) == 3 * 9
    batch(ckpts, out=tmp_path / "c")  # figures=False: the run, no note
    page = (tmp_path / "c" / "index.html").read_text()
    assert "<img" not in page and "No figures" not in page and "step-3" in page


def test_minilm_against_itself_without_layer_3(tmp_path):
    """The example of docs/batch.md: all-MiniLM-L6-v2 (real weights, offline) and a copy with
    ``encoder.layer.3`` removed, captured on the same 64 texts (one row per token) and run
    through ``batch``. The matching view (for each layer of the copy, the original layer of
    highest CKA) shows the shift: the copy's layers 0-2 match the original's 0-2, its 3 and
    4 the original's 4 and 5; the adjacent-layer view of the copy drops where the layer went."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import copy

    from layerscope.capture.hf import capture_texts
    from layerscope.corpus import stdlib_corpus
    from layerscope.models import load_minilm

    model, tok = load_minilm()
    pruned = copy.deepcopy(model)
    del pruned.encoder.layer[3]
    pruned.config.num_hidden_layers = 5
    texts = stdlib_corpus(64, seed=0)
    for m, name in ((model, "minilm"), (pruned, "minilm-no-layer3")):
        capture_texts(m, tok, texts, tmp_path / name, layers=["embeddings", "encoder.layer.*"],
                      dtype="float32", progress=False)
    stores = [tmp_path / "minilm", tmp_path / "minilm-no-layer3"]
    res = batch(stores, out=tmp_path / "vs", figures=True)
    cross = res.result("cka", "minilm", "minilm-no-layer3")
    assert cross.cols[-1] == "encoder.layer.4" and len(cross.rows) == 7
    match = [cross.rows[i] for i in cross.values.argmax(axis=0)]
    assert match == ["embeddings", "encoder.layer.0", "encoder.layer.1", "encoder.layer.2",
                     "encoder.layer.4", "encoder.layer.5"]
    from layerscope.runs.figures import matching

    assert matching(res.rows, "linear-biased", "minilm", "minilm-no-layer3")[2] == \
        [0, 1, 2, 3, 5, 6]  # what the matching figure draws
    assert figures_of(tmp_path / "vs") == {"matching", "cka-to-reference-table", "cka-grid"}
    for j in range(4):  # the layers before the cut are the same computation
        assert abs(cross.values[j, j] - 1) < 1e-6
    each = batch(stores, out=tmp_path / "each", pairs="each", figures=True)
    assert "adjacent" in figures_of(tmp_path / "each")
    orig = each.result("cka", "minilm").diagonal_offset(1)
    cut = each.result("cka", "minilm-no-layer3").diagonal_offset(1)
    np.testing.assert_allclose(cut[:3], orig[:3], atol=1e-6)
    assert cut[3] < orig[3] - 0.03  # layer.2 -> the former layer.4: a larger step
