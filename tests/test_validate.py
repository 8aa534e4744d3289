"""Every argument checked once, at the door: the cases a user hit (issue 27's list), each a
typed InvalidArgumentError naming the function, the parameter, the value and what is
allowed; numpy scalars accepted where numbers are; the same layer globs in every measure and
in the capture; unknown layer names answered with the closest ones."""

from __future__ import annotations

import inspect
from pathlib import Path

import layerscope
import numpy as np
import pytest
from layerscope import InvalidArgumentError, MissingLayerError, write_store
from layerscope._validate import SEED, Float, Int, OneOf, Strings, check, validated
from layerscope.cli import main


def _layers(n: int = 60) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 6))
    return {f"encoder.layer.{i}": x @ rng.standard_normal((6, 5)) + 0.1 * i
            for i in range(3)} | {"embeddings": x}


MEASURES = {
    "cka": lambda d, **kw: layerscope.cka(d, progress=False, **kw),
    "rbf": lambda d, **kw: layerscope.cka(d, kernel="rbf", progress=False, **kw),
    "id": lambda d, **kw: layerscope.intrinsic_dimension(d, progress=False, **kw),
    "ids": lambda d, **kw: layerscope.intrinsic_dimensions(d, progress=False, **kw),
    "rsa": lambda d, **kw: layerscope.rsa(d, progress=False, **kw),
    "knn": lambda d, **kw: layerscope.mutual_knn(d, k=3, progress=False, **kw),
}
SEEDED = ("rbf", "id", "ids", "rsa", "knn")


@pytest.mark.parametrize("what", SEEDED)
@pytest.mark.parametrize("seed", [-1, "abc", 1.5, True, 2**64])
def test_bad_seeds_are_typed_errors_naming_the_parameter(what: str, seed: object) -> None:
    with pytest.raises(InvalidArgumentError, match=r"seed=.* is not allowed; seed must be an "
                                                   r"integer in \[0, 18446744073709551615\]"):
        MEASURES[what](_layers(), seed=seed)


def test_negative_seed_with_bootstrap_is_not_an_overflow() -> None:
    with pytest.raises(InvalidArgumentError, match="seed"):
        layerscope.intrinsic_dimension(_layers(), seed=-1, bootstrap=5, progress=False)


@pytest.mark.parametrize("what", list(MEASURES))
def test_layers_must_be_names(what: str) -> None:
    with pytest.raises(InvalidArgumentError, match=r"layers=5 \(int\) is not allowed"):
        MEASURES[what](_layers(), layers=5)


def test_numpy_scalars_are_numbers() -> None:
    d = _layers()
    a = layerscope.cka(d, kernel="rbf", sigma=np.float32(1.0), sample=np.int64(40),
                       seed=np.uint8(3), progress=False)
    b = layerscope.cka(d, kernel="rbf", sigma=1.0, sample=40, seed=3, progress=False)
    np.testing.assert_array_equal(a.values, b.values)
    r = layerscope.mutual_knn(d, k=np.int32(3), sample=np.int16(50), progress=False)
    assert r.meta["k"] == 3 and type(r.meta["k"]) is int


@pytest.mark.parametrize("value", [True, False])
def test_bool_is_not_a_sample_size(value: bool) -> None:
    with pytest.raises(InvalidArgumentError, match=r"sample=(True|False) \(bool\)"):
        layerscope.cka(_layers(), kernel="rbf", sample=value, progress=False)


def test_sizes_as_strings_and_numbers() -> None:
    d = _layers()
    a = layerscope.cka(d, max_memory="1G", progress=False)
    b = layerscope.cka(d, max_memory=np.int64(1 << 30), progress=False)
    np.testing.assert_array_equal(a.values, b.values)
    with pytest.raises(InvalidArgumentError, match="max_memory='lots'"):
        layerscope.cka(d, max_memory="lots", progress=False)


def test_unsigned_row_ids_beyond_int64_are_refused(tmp_path: Path) -> None:
    x = np.ones((2, 3), np.float32)
    ids = np.array([1, 2**64 - 1], dtype=np.uint64)
    with pytest.raises(InvalidArgumentError, match="row id"):
        layerscope.write_store(tmp_path / "s", {"a": x}, row_ids=ids)
    st = layerscope.write_store(tmp_path / "t", {"a": x},
                                row_ids=np.array([1, 2**63 - 1], dtype=np.uint64))
    assert st.row_ids().tolist() == [1, 2**63 - 1]


def test_meta_and_sparse_tensors_are_typed_errors() -> None:
    torch = pytest.importorskip("torch")
    with pytest.raises(InvalidArgumentError, match="meta"):
        layerscope.cka({"a": torch.empty(5, 3, device="meta")}, progress=False)
    sparse = torch.eye(5).to_sparse()
    with pytest.raises(InvalidArgumentError, match="dense"):
        layerscope.cka({"a": sparse}, progress=False)


def test_unknown_layer_names_the_closest(tmp_path: Path) -> None:
    st = write_store(tmp_path / "s", _layers())
    with pytest.raises(MissingLayerError) as ei:
        layerscope.cka(st, layers=["encoder.layer.1", "encoder.layr.2"], progress=False)
    msg = str(ei.value)
    assert "'encoder.layr.2'" in msg and "closest names: 'encoder.layer.2'" in msg
    assert "embeddings" not in msg.split("closest names:")[1]  # not the whole list


@pytest.mark.parametrize("what", list(MEASURES))
def test_layer_globs_work_in_every_measure(what: str) -> None:
    d = _layers()
    res = MEASURES[what](d, layers="encoder.layer.*")
    res = res["twonn"] if isinstance(res, dict) else res
    got = list(getattr(res, "rows", None) or res.layers)
    assert got == [f"encoder.layer.{i}" for i in range(3)]


def test_layer_globs_in_spectrum_alignment_analyze_and_the_cli(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]
                                                               ) -> None:
    st = write_store(tmp_path / "s", _layers())
    want = [f"encoder.layer.{i}" for i in range(3)]
    assert layerscope.spectrum(st, layers="encoder.layer.*", progress=False).layers == want
    assert layerscope.alignment(st, layers=["encoder.layer.*"], k=2, progress=False).rows == want
    out = layerscope.analyze(st, layers="**.layer.[01]", k=2, progress=False)
    assert out["cka"].rows == want[:2]
    # an exact name keeps its place in the order given; a glob's matches come in store order
    assert layerscope.cka(st, layers=["embeddings", "encoder.*.2"], progress=False).rows == [
        "embeddings", "encoder.layer.2"]
    assert main(["cka", str(st.path), "--layers", "encoder.layer.*", "--quiet",
                 "--out", str(tmp_path / "r.json")]) == 0
    assert layerscope.load_result(tmp_path / "r.json").rows == want
    with pytest.raises(SystemExit) as exit_:  # argparse's usage error, before any work
        main(["cka", str(st.path), "--seed", "-1", "--kernel", "rbf", "--quiet"])
    assert exit_.value.code == 2 and "'-1' is not an integer in [0" in capsys.readouterr().err


def test_capture_takes_the_same_globs() -> None:
    torch = pytest.importorskip("torch")
    from layerscope.capture import resolve_layers

    net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    assert resolve_layers(net, "[02]") == ["0", "2"]
    with pytest.raises(layerscope.CaptureError, match="closest names"):
        resolve_layers(net, "5")


def test_messages_name_function_parameter_value_and_what_is_allowed() -> None:
    with pytest.raises(InvalidArgumentError) as ei:
        layerscope.alignment(_layers(), method="cka", progress=False)
    assert str(ei.value) == (
        "layerscope.alignment: method='cka' (str) is not allowed; method must be one of "
        "'subspace', 'svcca', 'pwcca', 'cca', 'procrustes'")
    assert isinstance(ei.value, ValueError) and isinstance(ei.value, layerscope.LayerscopeError)
    with pytest.raises(InvalidArgumentError, match=r"layerscope.analyze: top=0 .* None or an "
                                                   r"integer >= 1"):
        layerscope.analyze(_layers(), top=0, progress=False)
    with pytest.raises(InvalidArgumentError, match="unknown keyword"):
        layerscope.analyze(_layers(), tops=3, progress=False)


def test_rules() -> None:
    assert check("f", "x", np.float32(0.5), Float(0, 1)) == 0.5
    for bad in (float("nan"), float("inf"), "1", None, True):
        with pytest.raises(InvalidArgumentError):
            check("f", "x", bad, Float(0, 1))
    with pytest.raises(InvalidArgumentError, match=r"> 0"):
        check("f", "x", 0.0, Float(0, lo_open=True))
    assert check("f", "k", "auto", (Int(1), OneOf("auto"))) == "auto"
    assert check("f", "s", ("a", "b"), Strings()) == ["a", "b"]
    assert check("f", "s", "a", Strings()) == ["a"]
    for bad in ([], [1], b"a", {"a": 1}):
        with pytest.raises(InvalidArgumentError):
            check("f", "s", bad, Strings())
    assert check("f", "seed", 2**64 - 1, SEED) == 2**64 - 1
    with pytest.raises(TypeError, match="not parameters"):
        validated(nope=Int())(lambda x: x)


#: The public signatures as they were before the shared option groups (issue 27): positional
#: parameters in order, then the keyword-only ones by name (analyze's ``**kw`` was exactly
#: method, space, ridge, top and compute).
SIGNATURES = {
    "cka": ("source other=None",
            "backend='local' batch_size=None bootstrap=0 compute='auto' confidence=0.95 "
            "device=None estimator='biased' kernel='linear' layers=None max_memory=None "
            "nonfinite='error' null=0 other_layers=None progress=True ray_address=None "
            "sample=None seed=0 sigma=1.0 strategy=None"),
    "spectrum": ("source layers=None top=None progress=True",
                 "backend='local' device=None max_memory=None ray_address=None"),
    "alignment": ("source other=None",
                  "backend='local' device=None k=32 layers=None max_memory=None "
                  "method='subspace' other_layers=None progress=True ray_address=None "
                  "ridge=0.0001 space='samples'"),
    "analyze": ("source other=None",
                "backend='local' compute='float64' device=None k=32 layers=None "
                "max_memory=None measures=('cka', 'cka_debiased', 'spectrum', 'alignment') "
                "method='subspace' other_layers=None progress=True ray_address=None "
                "ridge=0.0001 space='samples' top=None"),
    "intrinsic_dimension": ("source",
                            "backend='local' bootstrap=0 device=None discard_fraction=0.1 "
                            "duplicates='drop' k=20 layers=None max_memory=None "
                            "method='twonn' n1=1 n2=2 pca_threshold=0.95 pool='harmonic' "
                            "progress=True ray_address=None sample=20000 scales=None seed=0 "
                            "tolerance=None"),
    "intrinsic_dimensions": ("source",
                             "backend='local' bootstrap=0 device=None discard_fraction=0.1 "
                             "duplicates='drop' k=20 layers=None max_memory=None "
                             "methods=('twonn', 'mle') n1=1 n2=2 pca_threshold=0.95 "
                             "pool='harmonic' progress=True ray_address=None sample=20000 "
                             "scales=None seed=0 tolerance=None"),
    "rsa": ("source other=None",
            "backend='local' compare='spearman' device=None dissimilarity='euclidean' "
            "layers=None max_memory=None other_layers=None progress=True ray_address=None "
            "sample=2000 seed=0"),
    "mutual_knn": ("source other=None",
                   "backend='local' device=None k=10 layers=None max_memory=None "
                   "normalize=True other_layers=None progress=True ray_address=None "
                   "sample=2000 seed=0"),
    "cknna": ("source other=None",
              "k=10 layers=None max_memory=None normalize=True other_layers=None "
              "progress=True sample=2000 seed=0"),
    "shape_metric": ("source other=None",
                     "alpha=1.0 backend='local' device=None distance='angular' layers=None "
                     "max_memory=None other_layers=None progress=True ray_address=None"),
    "report": ("store other=None out='report'",
               "backend='local' bootstrap=20 labels=None null=99 progress=True "
               "ray_address=None rbf=True sample=2048 seed=0 title=None"),
    "plan": ("source other=None",
             "batch_size=None block_rows=None compute='auto' estimator='biased' "
             "kernel='linear' layers=None max_memory=None measure='cka' other_layers=None "
             "sample=None strategy=None"),
}


def _shown(fn: object) -> tuple[str, str]:
    pos, kw = [], []
    for p in inspect.signature(fn).parameters.values():  # type: ignore[arg-type]
        text = p.name if p.default is inspect.Parameter.empty else f"{p.name}={p.default!r}"
        (kw if p.kind is inspect.Parameter.KEYWORD_ONLY else pos).append(text)
    return " ".join(pos), " ".join(sorted(kw))


def test_every_public_function_checks_its_arguments() -> None:
    """Each public entry is wrapped once (``__wrapped__``), and its public signature (what
    ``help()`` and ``inspect`` show, the shared option groups spelled out) is the one users
    call: the same parameters, kinds and defaults as before the groups."""
    for name in ("cka", "spectrum", "alignment", "analyze", "intrinsic_dimension",
                 "intrinsic_dimensions", "rsa", "mutual_knn", "cknna", "shape_metric",
                 "capture", "report", "plan"):
        fn = getattr(layerscope, name)
        if isinstance(fn, type):  # capture is the session class: its constructor checks
            fn = fn.__init__
        assert hasattr(fn, "__wrapped__"), name
        assert not hasattr(fn.__wrapped__, "__wrapped__"), name
        if name in SIGNATURES:
            assert _shown(fn) == SIGNATURES[name], name


def test_an_unknown_keyword_names_the_closest() -> None:
    """A misspelt keyword is an UnknownArgumentError (a TypeError, as Python's own, and an
    InvalidArgumentError) naming the closest keywords, for grouped options and own ones."""
    for fn, bad, near in ((layerscope.cka, "estimater", "estimator"),
                          (layerscope.rsa, "max_mem", "max_memory"),
                          (layerscope.intrinsic_dimension, "discard", "discard_fraction"),
                          (layerscope.analyze, "tops", "top")):
        with pytest.raises(layerscope.UnknownArgumentError, match=near) as ei:
            fn(_layers(), **{bad: 1})
        assert isinstance(ei.value, TypeError) and isinstance(ei.value, InvalidArgumentError)
    with pytest.raises(InvalidArgumentError, match="ray_address needs backend='ray'"):
        layerscope.rsa(_layers(), ray_address="127.0.0.1:1", progress=False)
