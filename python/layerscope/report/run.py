"""The report's measures, in as few passes as possible: ONE moment pass over every layer of
every input (:func:`one_pass`, falling back to :func:`layerscope.analyze`'s planned passes
when that one pass does not fit the memory budget) and one seeded sample for the neighbour
family (:func:`neighbours`: RBF CKA, TwoNN, MLE). A layer that makes a measure fail (constant
activations, too few distinct rows) is left out of that table and named in the notes."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from .._defaults import ALIGN_K
from .._source import Source
from ..errors import LayerscopeError, MemoryBudgetError
from ..measures import MomentTables, analyze, cka, intrinsic_dimension
from ..measures.idim import merge_layers
from ..results import MatrixResult

K_MAX = ALIGN_K  # top-k of the subspace overlap: min(K_MAX, smallest rank)


def attempt(notes: list[str], what: str, fn: Callable[[], Any]) -> Any:
    """Run one measure; a LayerscopeError becomes a visible note (the section says what is
    missing and why) instead of failing the report."""
    try:
        return fn()
    except LayerscopeError as e:
        notes.append(f"{what}: skipped — {type(e).__name__}: {e}")
    return None


def _sample_arg(sample: int | None, n: int) -> int | None:
    if sample is None or sample >= n:
        return None
    return int(sample)


class Side:
    """All results of one input (or of the cross tables): name → Result."""

    def __init__(self, tag: str, title: str, src: Source) -> None:
        self.tag = tag
        self.title = title
        self.src = src
        self.res: dict[str, Any] = {}


def one_pass(sides: list[Side], cross: Side | None, notes: list[str], progress: bool,
             on: dict[str, Any] | None = None) -> None:
    """ONE streaming moment pass over every layer of every input (both stores concatenated),
    then, from those moments alone: linear CKA (biased, debiased) within each input and across
    the two, the spectra, and the top-k subspace overlap (k = min(32, smallest numerical rank
    of the layers involved, from the spectra of the same moments)). ``on``: where it runs
    (``backend``, ``ray_address``)."""
    b = sides[1].src if len(sides) > 1 else None
    mt = MomentTables.compute(sides[0].src, b, progress=progress, **(on or {}))
    rows, cols = mt.rows, mt.cols
    groups: list[tuple[Side, list[int], list[int]]] = [(sides[0], rows, rows)]
    if b is not None and cross is not None:
        groups += [(sides[1], cols, cols), (cross, rows, cols)]
    for side, r, c in groups:
        for key, deb in (("cka_linear_biased", False), ("cka_linear_debiased", True)):
            side.res[key] = mt.cka(r, c, debiased=deb)
    spec_idx = rows + (cols if b is not None else [])
    spectra = mt.spectra(spec_idx)
    sides[0].res["spectrum"] = mt.spectrum(rows, spectra[:len(rows)])
    if b is not None:
        sides[1].res["spectrum"] = mt.spectrum(cols, spectra[len(rows):])
    rank = {i: float(sp["rank"]) for i, sp in zip(spec_idx, spectra)}
    names = mt.names
    for side, r, c in groups:
        # layers of numerical rank 0 (constant activations) have no principal subspace: they
        # are left out (NaN rows/columns, named in the notes) instead of sinking the table
        r_ok = [i for i in r if rank[i] >= 1]
        c_ok = [i for i in c if rank[i] >= 1]
        dropped = sorted({names[i] for i in (*r, *c) if rank[i] < 1})
        if not r_ok or not c_ok:
            notes.append(f"subspace overlap of {side.title}: skipped — no layer with a "
                         "nonzero spectrum (constant activations)")
            continue
        k = int(min([K_MAX, *[rank[i] for i in (*r_ok, *c_ok)]]))
        side.res["subspace_k"] = k
        al = mt.alignment(r_ok, c_ok, method="subspace", space="samples", k=k,
                          symmetric=side is not cross)
        if dropped:
            notes.append(f"subspace overlap of {side.title}: layer(s) {', '.join(dropped)} left "
                         "out (rank 0: constant activations)")
            al = expand(al, [names[i] for i in r], [names[i] for i in c],
                        {"layers_skipped": dropped})
        side.res["subspace_overlap"] = al



def expand(res: Any, rows: list[str], cols: list[str], meta: dict[str, Any]) -> Any:
    """A MatrixResult over ``rows`` × ``cols`` holding ``res``'s cells, NaN elsewhere."""
    full = np.full((len(rows), len(cols)), np.nan)
    ri = [rows.index(x) for x in res.rows]
    ci = [cols.index(x) for x in res.cols]
    full[np.ix_(ri, ci)] = np.asarray(res.values, dtype=float)
    return MatrixResult(full, rows, cols, {**res.meta, **meta})


def _public_passes(sides: list[Side], cross: Side | None, notes: list[str],
                   progress: bool, on: dict[str, Any]) -> None:
    """Fallback through the public API (one pass per input and one for the cross tables)."""
    b = sides[1].src if len(sides) > 1 else None
    jobs = [(s, None) for s in sides] + ([(cross, b)] if cross is not None else [])
    for side, other in jobs:
        src = side.src
        dims = [*src.dims.values(), *(other.dims.values() if other is not None else [])]
        k = max(1, min([K_MAX, *dims, src.num_rows - 1]))
        side.res["subspace_k"] = k
        ms = ("cka", "cka_debiased", "alignment") + (("spectrum",) if other is None else ())
        out = attempt(notes, f"moments of {side.title}", lambda: analyze(
            src, other, measures=ms, k=k, progress=progress, **on))  # noqa: B023
        if out is None:
            continue
        side.res["cka_linear_biased"] = out.get("cka")
        side.res["cka_linear_debiased"] = out.get("cka_debiased")
        side.res["subspace_overlap"] = out.get("alignment")
        if "spectrum" in out:
            side.res["spectrum"] = out["spectrum"]


def moments(sides: list[Side], cross: Side | None, notes: list[str], progress: bool,
            on: dict[str, Any]) -> str:
    """The moment family; returns how it ran (recorded in results.json)."""
    try:
        one_pass(sides, cross, notes, progress, on)
        return "one moment pass over all layers of all inputs"
    except MemoryBudgetError:
        # one pass over everything does not fit: analyze per input plans its own passes
        # (layer tiles when needed)
        _public_passes(sides, cross, notes, progress, on)
        return ("layerscope.analyze per input (its own plan: one pass or layer tiles each, "
                "plus the cross tables)")
    except LayerscopeError as e:
        notes.append(f"moment measures: skipped — {type(e).__name__}: {e}")
        return "failed"


def _rbf_cka(src: Source, other: Source | None, *, sample: int | None, seed: int,
             progress: bool, layers: list[str] | None = None,
             other_layers: list[str] | None = None, on: dict[str, Any] | None = None) -> Any:
    """Biased RBF CKA (σ = 1, median rule) through the public ``layerscope.cka``."""
    return cka(src, other, kernel="rbf", estimator="biased", sample=sample, seed=seed,
               layers=layers, other_layers=other_layers, progress=progress, **(on or {}))


def _rbf_robust(src: Source, other: Source | None, notes: list[str], label: str, *,
                sample: int | None, seed: int, progress: bool, on: dict[str, Any]) -> Any:
    """RBF CKA of all layers; when a layer makes it fail (e.g. more than half of the sampled
    rows coincide, so the median-rule bandwidth is 0), probe each layer alone and compute
    the table without the failing ones (NaN there, each reason in the notes)."""
    try:
        return _rbf_cka(src, other, sample=sample, seed=seed, progress=progress, on=on)
    except LayerscopeError as e:
        first = e
    la, lb = list(src.all_layers), list((other or src).all_layers)

    def usable(s: Source, tag: str, names: list[str]) -> list[str]:
        ok = []
        for x in names:
            try:
                _rbf_cka(s, None, sample=sample, seed=seed, progress=False, layers=[x], on=on)
                ok.append(x)
            except LayerscopeError as e:
                notes.append(f"RBF CKA ({label}): layer {tag}{x} left out — "
                             f"{type(e).__name__}: {e}")
        return ok

    ga = usable(src, "", la)
    gb = usable(other, "of the second input ", lb) if other is not None else ga
    if not ga or not gb or (ga == la and gb == lb):
        raise first
    res = _rbf_cka(src, other, sample=sample, seed=seed, progress=progress, layers=ga,
                   other_layers=gb if other is not None else None, on=on)
    skipped = [x for x in la if x not in ga]
    if other is not None:
        skipped += [f"other:{x}" for x in lb if x not in gb]
    return expand(res, la, lb, {"layers_skipped": skipped})


def _id_robust(src: Source, notes: list[str], label: str, **kw: Any) -> Any:
    """Intrinsic dimension of all layers; when a layer makes it fail (too few distinct rows
    for the neighbours it needs), estimate the others one by one and name the failing one."""
    fn = intrinsic_dimension
    try:
        return fn(src, **kw)
    except LayerscopeError as e:
        first = e
    parts: dict[str, Any] = {}
    for name in src.all_layers:
        try:
            parts[name] = fn(src, layers=[name], **kw)
        except LayerscopeError as e:
            notes.append(f"{label}: layer {name} left out — {type(e).__name__}: {e}")
    if not parts or len(parts) == len(src.all_layers):
        raise first
    one = next(iter(parts.values()))
    return merge_layers(list(parts), list(parts.values()),
                        {**one.meta, "layers_skipped": [x for x in src.all_layers
                                                        if x not in parts]})


def calibration(side: Side, notes: list[str], *, null: int, sample: int | None, seed: int,
                progress: bool, on: dict[str, Any] | None = None) -> None:
    """The permutation null of the biased linear CKA within one input, on the seeded sample
    (``cka(..., null=null)``): its p-values hatch the heatmap, its null mean goes in the
    caption."""
    if null <= 0:
        return
    m = _sample_arg(sample, side.src.num_rows)

    def run() -> Any:
        with warnings.catch_warnings():  # constant layers: NaN cells, noted by the CKA section
            warnings.filterwarnings("ignore", "CKA is NaN", RuntimeWarning)
            return cka(side.src, null=null, sample=m, seed=seed, progress=progress, **(on or {}))

    side.res["cka_null"] = attempt(notes, f"CKA permutation null ({side.title})", run)


def neighbours(side: Side, other: Source | None, notes: list[str], *, sample: int | None,
                seed: int, bootstrap: int, rbf: bool, progress: bool,
                on: dict[str, Any] | None = None) -> None:
    """The seeded-sample family: RBF CKA, TwoNN and MLE (with bootstrap CIs); ``on``: where
    they run (``backend``, ``ray_address``)."""
    on = on or {}
    src = side.src
    m = _sample_arg(sample, src.num_rows)
    if rbf:
        side.res["cka_rbf"] = attempt(notes, f"RBF CKA ({side.title})", lambda: _rbf_robust(
            src, other, notes, side.title, sample=m, seed=seed, progress=progress, on=on))
    if other is not None:
        return
    for key, what, kw in (("id_twonn", "TwoNN", {"method": "twonn"}),
                          ("id_mle", "MLE", {"method": "mle", "k": 20})):
        label = f"intrinsic dimension ({what}) of {side.title}"
        side.res[key] = attempt(notes, label, lambda kw=kw, label=label: _id_robust(
            src, notes, label, sample=m, seed=seed, progress=progress, bootstrap=bootstrap,
            **kw, **on))
