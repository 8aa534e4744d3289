"""Property tests (hypothesis): the store round trip, byte-level mutations of shard headers
and manifests, and the invariances every measure must keep.

Derandomized (the same examples on every run, so CI is repeatable); the example counts are
in ``EXAMPLES`` and reported by ``pytest --hypothesis-show-statistics``. A mutated store may
be refused — with a :class:`LayerscopeError` subclass, nothing else — or read; never a crash
(a Rust panic would surface as ``PanicException``, a crash would end pytest) and never a
hang (``faulthandler`` ends the run with every thread's stack after ``HANG_SECONDS``).
"""

from __future__ import annotations

import faulthandler
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import layerscope as ls
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from layerscope.errors import LayerscopeError

EXAMPLES = {"roundtrip": 60, "mutation": 150, "invariance": 25}
HANG_SECONDS = 60
SHARD = "shard-00000.safetensors"


def _settings(n: int) -> Any:
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


@contextmanager
def _no_hang() -> Iterator[None]:
    faulthandler.dump_traceback_later(HANG_SECONDS, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


# ---------------------------------------------------------------------------- round trip

NAMES = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), min_codepoint=32), min_size=1,
    max_size=12,
).filter(lambda s: not s.startswith("__"))
DTYPES = ("float32", "float64", "float16", "bfloat16")


def _stored(x: np.ndarray, dtype: str) -> np.ndarray:
    """What the store must give back: ``x`` rounded once to ``dtype`` (nearest even)."""
    if dtype == "bfloat16":
        import torch

        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        return t.to(torch.bfloat16).to(torch.float64).numpy()
    return x.astype(dtype).astype(np.float64)


@_settings(EXAMPLES["roundtrip"])
@given(
    rows=st.sampled_from([0, 1, 2, 3, 7, 33]),
    dims=st.lists(st.integers(1, 9), min_size=1, max_size=3),
    names=st.lists(NAMES, min_size=3, max_size=3, unique=True),
    dtype=st.sampled_from(DTYPES),
    shard_rows=st.integers(1, 40),
    seed=st.integers(0, 2**32 - 1),
)
def test_store_round_trip(rows: int, dims: list[int], names: list[str], dtype: str,
                          shard_rows: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    data = {n: rng.standard_normal((rows, d)).astype(np.float32) * 10.0 ** rng.integers(-3, 4)
            for n, d in zip(names, dims)}
    ids = rng.permutation(10 * rows + 1)[:rows].astype(np.int64)
    with tempfile.TemporaryDirectory() as tmp, _no_hang():
        path = Path(tmp) / "s"
        row_bytes = sum(d * 8 for d in dims) + 8
        try:
            s = ls.write_store(path, data, row_ids=ids, dtype=dtype,
                               shard_bytes=shard_rows * row_bytes)
        except LayerscopeError as e:  # only an empty store may be refused
            assert rows == 0, e
            return
        again = ls.open(path, verify=True)
        for s_ in (s, again):
            assert s_.layers == list(data) and s_.num_rows == rows
            assert s_.dtypes == {n: dtype for n in data}
            np.testing.assert_array_equal(s_.row_ids(), ids)
            for n, x in data.items():
                got = s_.read(n, dtype=np.float64)
                assert got.shape == (rows, x.shape[1])
                np.testing.assert_array_equal(got, _stored(x, dtype))
        again.verify()


# ----------------------------------------------------------------------------- mutations


def _valid_store(root: Path) -> Path:
    rng = np.random.default_rng(0)
    return ls.write_store(
        root / "s",
        {"a": rng.standard_normal((9, 4)).astype(np.float32),
         "b": rng.standard_normal((9, 3)).astype(np.float16)},
        shard_bytes=200, columns={"__sample__": np.arange(9) // 3},
    ).path


def _use(path: Path) -> None:
    """Everything a user does with a store: open, read every layer, a moment pass, verify."""
    s = ls.open(path)
    for n in s.layers:
        s.read(n)
    s.row_ids()
    ls.cka(s, progress=False)
    ls.spectrum(s, progress=False)
    s.verify()


def _expect_typed(path: Path) -> None:
    try:
        _use(path)
    except LayerscopeError:
        pass  # refused with a typed error: fine


@_settings(EXAMPLES["mutation"])
@given(
    shard=st.integers(0, 3),
    where=st.floats(0.0, 1.0),
    how=st.sampled_from(["set", "flip", "insert", "delete", "truncate"]),
    value=st.integers(0, 255),
    in_header=st.booleans(),
)
def test_mutated_shard_headers_give_typed_errors(shard: int, where: float, how: str,
                                                 value: int, in_header: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp, _no_hang():
        p = _valid_store(Path(tmp))
        files = sorted(p.glob("shard-*.safetensors"))
        f = files[shard % len(files)]
        raw = bytearray(f.read_bytes())
        header_end = 8 + int.from_bytes(raw[:8], "little")
        pos = int(where * ((header_end if in_header else len(raw)) - 1))
        raw = _mutate(raw, pos, how, value)
        f.write_bytes(bytes(raw))
        _expect_typed(p)


def _mutate(raw: bytearray, pos: int, how: str, value: int) -> bytearray:
    if how == "set":
        raw[pos] = value
    elif how == "flip":
        raw[pos] ^= 1 << (value % 8)
    elif how == "insert":
        raw[pos:pos] = bytes([value])
    elif how == "delete":
        del raw[pos]
    else:
        del raw[pos:]
    return raw


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=3),
    max_leaves=6,
)


@_settings(EXAMPLES["mutation"])
@given(
    how=st.sampled_from(["bytes", "value"]),
    where=st.floats(0.0, 1.0),
    value=st.integers(0, 255),
    byte_how=st.sampled_from(["set", "flip", "insert", "delete", "truncate"]),
    key_path=st.lists(st.sampled_from(["layers", "shards", 0, 1, "dim", "dtype", "rows", "bytes",
                                       "file", "num_rows", "start_row", "columns", "version",
                                       "complete", "name", "sha256", "format"]),
                      min_size=1, max_size=3),
    new=JSON_VALUES,
)
def test_mutated_manifests_give_typed_errors(how: str, where: float, value: int, byte_how: str,
                                             key_path: list[Any], new: Any) -> None:
    with tempfile.TemporaryDirectory() as tmp, _no_hang():
        p = _valid_store(Path(tmp))
        m = p / "layerscope.json"
        if how == "bytes":
            raw = bytearray(m.read_bytes())
            m.write_bytes(bytes(_mutate(raw, int(where * (len(raw) - 1)), byte_how, value)))
        else:
            doc = json.loads(m.read_text())
            node: Any = doc
            for k in key_path[:-1]:
                try:
                    node = node[k]
                except (KeyError, IndexError, TypeError):
                    break
            try:
                node[key_path[-1]] = new
            except (IndexError, TypeError):
                pass
            m.write_text(json.dumps(doc))
        _expect_typed(p)


# ---------------------------------------------------------------------------- invariances

Transform = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def _orthogonal(d: int, rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


def _transforms(k: int, offset: float) -> dict[str, Transform]:
    """Per-layer transforms every measure below is invariant to (``scale``: exact, a power of
    two)."""
    return {
        "scale": lambda x, rng: x * 2.0 ** k,
        "translation": lambda x, rng: x + offset * rng.standard_normal(x.shape[1]),
        "rotation": lambda x, rng: x @ _orthogonal(x.shape[1], rng),
    }


def _measures() -> dict[str, Callable[[dict[str, np.ndarray]], np.ndarray]]:
    def id_(method: str, **kw: Any) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
        return lambda x: np.array(list(ls.intrinsic_dimension(
            x, method=method, sample=None, progress=False, **kw).values.values()))

    def spectrum_ratios(x: dict[str, np.ndarray]) -> np.ndarray:
        r = ls.spectrum(x, progress=False)
        return np.concatenate([[r.table[n]["effective_rank"], r.table[n]["participation_ratio"]]
                               for n in r.layers])

    return {
        "cka_linear": lambda x: ls.cka(x, progress=False).values,
        "cka_debiased": lambda x: ls.cka(x, estimator="debiased", progress=False).values,
        "cka_rbf": lambda x: ls.cka(x, kernel="rbf", sample=None, progress=False).values,
        "procrustes": lambda x: ls.alignment(x, method="procrustes", progress=False).values,
        "spectrum": spectrum_ratios,
        "twonn": id_("twonn"),
        "mle": id_("mle", k=5),
        "rsa": lambda x: ls.rsa(x, sample=None, progress=False).values,
        "mutual_knn": lambda x: ls.mutual_knn(x, k=3, sample=None, normalize=False,
                                              progress=False).values,
        "mutual_knn_cosine": lambda x: ls.mutual_knn(x, k=3, sample=None,
                                                     progress=False).values,
    }


# cosine neighbours depend on the origin: no translation invariance there
NOT_INVARIANT = {"mutual_knn_cosine": {"translation"}}


MEASURES = _measures()


@pytest.mark.parametrize("measure", list(MEASURES))
@_settings(EXAMPLES["invariance"])
@given(
    n=st.integers(12, 40),
    dims=st.tuples(st.integers(2, 8), st.integers(2, 8)),
    k=st.integers(-20, 20),
    offset=st.sampled_from([0.5, 10.0, 1000.0]),
    seed=st.integers(0, 2**32 - 1),
)
def test_measures_are_invariant(measure: str, n: int, dims: tuple[int, int], k: int,
                                offset: float, seed: int) -> None:
    """Scaling a layer by 2^k, translating it, rotating its features, and permuting the rows
    of all layers together leave every measure unchanged (spectrum: its scale-free ratios)."""
    rng = np.random.default_rng(seed)
    base = {"a": rng.standard_normal((n, dims[0]))}
    base["b"] = np.tanh(base["a"] @ rng.standard_normal((dims[0], dims[1]))) + \
        0.3 * rng.standard_normal((n, dims[1]))
    fn = MEASURES[measure]
    ref = fn(base)
    assert np.all(np.isfinite(ref)), ref
    for name, t in _transforms(k, offset).items():
        if name in NOT_INVARIANT.get(measure, ()):
            continue
        moved = {key: t(x, rng) for key, x in base.items()}
        np.testing.assert_allclose(fn(moved), ref, rtol=1e-7, atol=1e-9,
                                   err_msg=f"{measure} under {name}")
    perm = rng.permutation(n)
    np.testing.assert_allclose(fn({key: x[perm] for key, x in base.items()}), ref, rtol=1e-9,
                               atol=1e-10, err_msg=f"{measure} under a row permutation")


@pytest.mark.parametrize("measure", list(MEASURES))
@pytest.mark.parametrize("factor", [1e150, 1e-150, 1e200, 1e-200, 2.0**-1000])
def test_measures_at_extreme_scales(measure: str, factor: float) -> None:
    """The same invariance with one layer scaled to the ends of the f64 range (its squares,
    and fourth powers, far beyond it): each layer is computed in units of a power of two."""
    rng = np.random.default_rng(7)
    a = rng.standard_normal((30, 5))
    base = {"a": a, "b": np.tanh(a @ rng.standard_normal((5, 4)))}
    fn = MEASURES[measure]
    ref = fn(base)
    got = fn({"a": a * factor, "b": base["b"]})
    np.testing.assert_allclose(got, ref, rtol=1e-7, atol=1e-9)


def test_hypothesis_is_the_project_dependency() -> None:
    """The property tests above run on the pinned test extra, not a stub."""
    import hypothesis

    assert int(hypothesis.__version__.split(".")[0]) >= 6
    assert os.environ.get("HYPOTHESIS_PROFILE") in (None, "", "default")
