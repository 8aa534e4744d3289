"""``layerscope report`` and ``layerscope demo``: every measure on one store (or two), in as
few passes as possible, written as one self-contained HTML page plus ``results.json`` and PNGs.

Passes over the data:

* ONE streaming moment pass over every layer of every input together (the layers of two
  stores are concatenated, so the within-model and cross-model tables share it): linear CKA
  (biased, Kornblith et al. 2019; debiased, Song et al. 2012 unbiased HSIC), per-layer spectra
  and the top-k subspace overlap (mean cos² of the principal angles);
* one seeded sample of ``sample`` rows for the neighbour family: RBF CKA (bandwidth
  σ·√(median squared pairwise distance), σ = 1), intrinsic dimension by TwoNN (Facco et al.
  2017, percentile bootstrap CIs) and Levina–Bickel MLE (k = 20).

When the private moment helpers of :mod:`layerscope.alignment` are missing, the report falls
back to :func:`layerscope.analyze` (one pass per input plus one for the cross tables); a
measure whose module is missing becomes a visible note instead of an error.

Every section carries plain-words summary lines computed from the numbers, and every figure
a caption naming the estimator, the number of rows, the sample and the seed.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import io
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import _html, _native
from ._source import Source, check_comparable, resolve
from .errors import LayerscopeError, MemoryBudgetError
from .results import Result, _jsonable, atomic_write_text

ADJ_THRESHOLD = 0.95  # "redundant neighbour" threshold used in the summary lines


# --------------------------------------------------------------------------- small helpers


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(f"layerscope report: {msg}", file=sys.stderr, flush=True)


def _short(name: str, width: int = 18) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1):]


def _suffix(name: str, parts: int) -> str:
    segs = name.split(".")
    return ".".join(segs[-parts:]) if parts < len(segs) else name


def _labels(layers: Sequence[str]) -> list[str]:
    """Short, unique tick labels for figures: drop the dotted prefix every name shares
    (``encoder.layer.``), else keep the shortest dotted suffix that stays unique
    (``encoder.layer.3`` → ``layer.3`` beside ``embeddings``; a bare number keeps the segment
    before it). The text of the report uses the full names."""
    names = list(layers)
    if len(names) > 1:
        prefix = os.path.commonprefix(names)
        cut = max(prefix.rfind("."), prefix.rfind("/"), prefix.rfind("_"))
        if cut >= 0 and all(len(n) > cut + 1 for n in names):
            names = [n[cut + 1:] for n in names]
        else:
            for parts in range(1, 1 + max(n.count(".") + 1 for n in names)):
                short = []
                for n in names:
                    p = parts + (1 if _suffix(n, parts).isdigit() else 0)
                    short.append(_suffix(n, p))
                if len(set(short)) == len(short):
                    names = short
                    break
    return [_short(n) for n in names]


def _xticks(ax: Any, labels: Sequence[str], fontsize: int = 8) -> None:
    """x tick labels, rotated when they would collide."""
    wide = len(labels) * max((len(s) for s in labels), default=0) > 40
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=40 if wide else 0, ha="right" if wide else "center",
                       rotation_mode="anchor" if wide else "default", fontsize=fontsize)


def _fmt(x: Any, nd: int = 3) -> str:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return str(x)
    if not np.isfinite(v):
        return "nan"
    return f"{v:.{nd}f}"


def _mean(x: Any) -> float:
    """Mean of the finite entries (NaN when there are none, without a warning)."""
    v = np.asarray(x, dtype=float).ravel()
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else float("nan")


def _span(names: Sequence[str], i: int, j: int) -> str:
    return names[i] if i == j else f"{names[i]}–{names[j]}"


class _Unavailable(Exception):
    """A measure's module is missing in this build: the section says so instead of failing."""


def _api(module: str, name: str) -> Callable[..., Any]:
    import importlib

    try:
        mod = importlib.import_module(f"layerscope.{module}")
        fn = getattr(mod, name)
    except (ImportError, AttributeError) as e:
        raise _Unavailable(f"layerscope.{name} is not available in this build ({e})") from e
    return fn


def _try(notes: list[str], what: str, fn: Callable[[], Any]) -> Any:
    """Run one measure; a missing module or a LayerscopeError becomes a visible note."""
    try:
        return fn()
    except _Unavailable as e:
        notes.append(f"{what}: skipped — {e}")
    except LayerscopeError as e:
        notes.append(f"{what}: skipped — {type(e).__name__}: {e}")
    return None


def _sample_arg(sample: int | None, n: int) -> int | None:
    if sample is None or sample >= n:
        return None
    return int(sample)


# --------------------------------------------------------------------------- measures


class _Side:
    """All results of one input (or of the cross tables): name → Result."""

    def __init__(self, tag: str, title: str, src: Source) -> None:
        self.tag = tag
        self.title = title
        self.src = src
        self.res: dict[str, Any] = {}


K_MAX = _native.DEFAULT_ALIGN_K  # top-k of the subspace overlap: min(K_MAX, smallest rank)


def _one_pass(sides: list[_Side], cross: _Side | None, notes: list[str],
              progress: bool) -> None:
    """ONE streaming moment pass over every layer of every input (both stores concatenated),
    then, from those moments alone: linear CKA (biased, debiased) within each input and across
    the two, the spectra, and the top-k subspace overlap (k = min(32, smallest numerical rank
    of the layers involved, from the spectra of the same moments))."""
    al = "alignment"
    compute, split = _api(al, "_compute_moments"), _api(al, "_split")
    cka_result, measures = _api(al, "_cka_result"), _api(al, "_measures")
    spectrum_result = _api(al, "_spectrum_result")
    alignment_result = _api(al, "_alignment_result")
    a = sides[0].src
    b = sides[1].src if len(sides) > 1 else None
    moments, meta = compute(a, None, b, None, progress)
    meta = {**meta, "n": int(moments.n)}
    rows, cols, rnames, cnames = split(moments, b)
    groups: list[tuple[_Side, list[int], list[int], list[str], list[str]]] = [
        (sides[0], rows, rows, rnames, rnames)]
    if b is not None and cross is not None:
        groups += [(sides[1], cols, cols, cnames, cnames), (cross, rows, cols, rnames, cnames)]
    for side, r, c, rn, cn in groups:
        for key, deb in (("cka_linear_biased", False), ("cka_linear_debiased", True)):
            side.res[key] = cka_result(moments, r, c, rn, cn, debiased=deb, meta=meta)
    spec_idx = rows + (cols if b is not None else [])
    spectra = list(measures(moments, spec_idx, None)["spectra"])
    sides[0].res["spectrum"] = spectrum_result(spectra[:len(rows)], rnames, None, meta)
    if b is not None:
        sides[1].res["spectrum"] = spectrum_result(spectra[len(rows):], cnames, None, meta)
    rank = {i: float(sp["rank"]) for i, sp in zip(spec_idx, spectra)}
    names = [str(x) for x in moments.names]
    for side, r, c, rn, cn in groups:
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
        res = measures(moments, [], {"rows": r_ok, "cols": c_ok, "method": "subspace",
                                     "space": "samples", "ridge_eps": 1e-4,
                                     "symmetric": side is not cross, "k": k})
        al = alignment_result(res["alignment"], [names[i] for i in r_ok],
                              [names[i] for i in c_ok], "subspace", "samples", k, 1e-4, meta)
        if dropped:
            notes.append(f"subspace overlap of {side.title}: layer(s) {', '.join(dropped)} left "
                         "out (rank 0: constant activations)")
            al = _expand(al, rn, cn, {"layers_skipped": dropped})
        side.res["subspace_overlap"] = al


def _expand(res: Any, rows: list[str], cols: list[str], meta: dict[str, Any]) -> Any:
    """A MatrixResult over ``rows`` × ``cols`` holding ``res``'s cells, NaN elsewhere."""
    from .results import MatrixResult

    full = np.full((len(rows), len(cols)), np.nan)
    ri = [rows.index(x) for x in res.rows]
    ci = [cols.index(x) for x in res.cols]
    full[np.ix_(ri, ci)] = np.asarray(res.values, dtype=float)
    return MatrixResult(full, rows, cols, {**res.meta, **meta})


def _public_passes(sides: list[_Side], cross: _Side | None, notes: list[str],
                   progress: bool) -> None:
    """Fallback through the public API (one pass per input and one for the cross tables)."""
    b = sides[1].src if len(sides) > 1 else None
    jobs = [(s, None) for s in sides] + ([(cross, b)] if cross is not None else [])
    for side, other in jobs:
        src = side.src
        dims = [*src.dims.values(), *(other.dims.values() if other is not None else [])]
        k = max(1, min([K_MAX, *dims, src.num_rows - 1]))
        side.res["subspace_k"] = k
        ms = ("cka", "cka_debiased", "alignment") + (("spectrum",) if other is None else ())
        out = _try(notes, f"moments of {side.title}", lambda: _api("alignment", "analyze")(
            src, other, measures=ms, k=k, progress=progress))  # noqa: B023
        if out is None:
            continue
        side.res["cka_linear_biased"] = out.get("cka")
        side.res["cka_linear_debiased"] = out.get("cka_debiased")
        side.res["subspace_overlap"] = out.get("alignment")
        if "spectrum" in out:
            side.res["spectrum"] = out["spectrum"]


def _moments(sides: list[_Side], cross: _Side | None, notes: list[str], progress: bool) -> str:
    """The moment family; returns how it ran (recorded in results.json)."""
    try:
        _one_pass(sides, cross, notes, progress)
        return "one moment pass over all layers of all inputs"
    except (_Unavailable, MemoryBudgetError):
        # one pass over everything does not fit: analyze per input plans its own passes
        # (layer tiles when needed)
        _public_passes(sides, cross, notes, progress)
        return ("layerscope.analyze per input (its own plan: one pass or layer tiles each, "
                "plus the cross tables)")
    except LayerscopeError as e:
        notes.append(f"moment measures: skipped — {type(e).__name__}: {e}")
        return "failed"


def _rbf_cka(src: Source, other: Source | None, *, sample: int | None, seed: int,
             progress: bool, layers: list[str] | None = None,
             other_layers: list[str] | None = None) -> Any:
    """Biased RBF CKA (σ = 1, median rule) through the public ``layerscope.cka``."""
    return _api("cka", "cka")(src, other, kernel="rbf", estimator="biased", sample=sample,
                              seed=seed, layers=layers, other_layers=other_layers,
                              progress=progress)


def _rbf_robust(src: Source, other: Source | None, notes: list[str], label: str, *,
                sample: int | None, seed: int, progress: bool) -> Any:
    """RBF CKA of all layers; when a layer makes it fail (e.g. more than half of the sampled
    rows coincide, so the median-rule bandwidth is 0), probe each layer alone and compute
    the table without the failing ones (NaN there, each reason in the notes)."""
    try:
        return _rbf_cka(src, other, sample=sample, seed=seed, progress=progress)
    except LayerscopeError as e:
        first = e
    la, lb = list(src.all_layers), list((other or src).all_layers)

    def usable(s: Source, tag: str, names: list[str]) -> list[str]:
        ok = []
        for x in names:
            try:
                _rbf_cka(s, None, sample=sample, seed=seed, progress=False, layers=[x])
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
                   other_layers=gb if other is not None else None)
    skipped = [x for x in la if x not in ga]
    if other is not None:
        skipped += [f"other:{x}" for x in lb if x not in gb]
    return _expand(res, la, lb, {"layers_skipped": skipped})


def _id_robust(src: Source, notes: list[str], label: str, **kw: Any) -> Any:
    """Intrinsic dimension of all layers; when a layer makes it fail (too few distinct rows
    for the neighbours it needs), estimate the others one by one and name the failing one."""
    fn = _api("idim", "intrinsic_dimension")
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
    cls = type(next(iter(parts.values())))
    one = next(iter(parts.values()))
    layers = list(parts)
    return cls(layers, {x: parts[x].values[x] for x in layers},
               ci={x: parts[x].ci[x] for x in layers if x in parts[x].ci},
               errors={x: parts[x].errors[x] for x in layers if x in parts[x].errors},
               details={x: parts[x].details.get(x) for x in layers},
               scales={x: parts[x].scales[x] for x in layers if x in parts[x].scales},
               meta={**one.meta, "layers_skipped": [x for x in src.all_layers
                                                    if x not in parts]})


def _neighbours(side: _Side, other: Source | None, notes: list[str], *, sample: int | None,
                seed: int, bootstrap: int, rbf: bool, progress: bool) -> None:
    """The seeded-sample family: RBF CKA, TwoNN and MLE (with bootstrap CIs)."""
    src = side.src
    m = _sample_arg(sample, src.num_rows)
    if rbf:
        side.res["cka_rbf"] = _try(notes, f"RBF CKA ({side.title})", lambda: _rbf_robust(
            src, other, notes, side.title, sample=m, seed=seed, progress=progress))
    if other is not None:
        return
    for key, what, kw in (("id_twonn", "TwoNN", {"method": "twonn"}),
                          ("id_mle", "MLE", {"method": "mle", "k": 20})):
        label = f"intrinsic dimension ({what}) of {side.title}"
        side.res[key] = _try(notes, label, lambda kw=kw, label=label: _id_robust(
            src, notes, label, sample=m, seed=seed, progress=progress, bootstrap=bootstrap,
            **kw))


# --------------------------------------------------------------------------- figures


def _figure(w: float, h: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", facecolor="white")
    return buf.getvalue()


def _heat(ax: Any, values: np.ndarray, rows: Sequence[str], cols: Sequence[str], title: str,
          *, vmin: float | None = None, vmax: float | None = None, cbar_label: str = "",
          cmap: str = "magma", xlabel: str = "", ylabel: str = "") -> Any:
    vals = np.asarray(values, dtype=float)
    finite = vals[np.isfinite(vals)]
    lo = vmin if vmin is not None else (min(0.0, float(finite.min())) if finite.size else 0.0)
    hi = vmax if vmax is not None else (max(1.0, float(finite.max())) if finite.size else 1.0)
    im = ax.imshow(vals, cmap=cmap, vmin=lo, vmax=hi, origin="upper", aspect="auto")
    _xticks(ax, _labels(cols))
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(_labels(rows), fontsize=8)
    if vals.size <= 256:
        for i in range(vals.shape[0]):
            for j in range(vals.shape[1]):
                v = vals[i, j]
                light = np.isfinite(v) and v > lo + 0.6 * (hi - lo)
                ax.text(j, i, "nan" if not np.isfinite(v) else f"{v:.2f}", ha="center",
                        va="center", fontsize=7, color="black" if light else "white")
    ax.set_title(title, fontsize=11)
    if xlabel:
        ax.set_xlabel(xlabel, fontsize=9)
    if ylabel:
        ax.set_ylabel(ylabel, fontsize=9)
    cb = ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
    cb.ax.tick_params(labelsize=8)
    if cbar_label:
        cb.set_label(cbar_label, fontsize=9)
    return im


def _meta_text(res: Any) -> str:
    meta = getattr(res, "meta", {}) or {}
    parts = []
    n = meta.get("n", meta.get("rows_used", meta.get("n_rows")))
    if n is not None:
        parts.append(f"n={n}")
    s = meta.get("sample")
    if s is not None:
        parts.append(f"sample={s}")
    if meta.get("seed") is not None and (s is not None or "sample" in meta):
        parts.append(f"seed={meta.get('seed')}")
    return ", ".join(parts)


# --------------------------------------------------------------------------- summaries


def adjacent_summary(adj: np.ndarray, names: Sequence[str], label: str,
                     threshold: float = ADJ_THRESHOLD) -> list[str]:
    """Plain-words lines about the adjacent-layer CKA curve ``adj[i] = CKA(layer i, i+1)``."""
    adj = np.asarray(adj, dtype=float)
    if adj.size == 0 or not np.isfinite(adj).any():
        return []
    lines = []
    runs = []
    i = 0
    while i < adj.size:
        if np.isfinite(adj[i]) and adj[i] > threshold:
            j = i
            while j + 1 < adj.size and np.isfinite(adj[j + 1]) and adj[j + 1] > threshold:
                j += 1
            runs.append((i, j + 1))
            i = j + 1
        else:
            i += 1
    if runs:
        spans = ", ".join(f"layers {_span(names, a, b)}" for a, b in runs)
        lines.append(f"{label}: {spans} are > {threshold:.2f} similar to their neighbours "
                     "(candidates to prune, skip or merge).")
    else:
        k = int(np.nanargmax(adj))
        lines.append(f"{label}: no two adjacent layers exceed {threshold:.2f}; the closest "
                     f"neighbours are layers {names[k]} and {names[k + 1]} ({_fmt(adj[k])}).")
    k = int(np.nanargmin(adj))
    lines.append(f"{label}: the largest change is between layers {names[k]} and "
                 f"{names[k + 1]} (CKA {_fmt(adj[k])}).")
    return lines


def pair_summary(values: np.ndarray, names: Sequence[str], label: str) -> list[str]:
    """The most and least similar pair of distinct layers of a symmetric table."""
    v = np.asarray(values, dtype=float)
    L = v.shape[0]
    if L < 2:
        return []
    iu = np.triu_indices(L, 1)
    off = v[iu]
    if not np.isfinite(off).any():
        return []
    a, b = int(np.nanargmax(off)), int(np.nanargmin(off))
    return [f"{label}: the most similar pair of distinct layers is {names[iu[0][a]]} and "
            f"{names[iu[1][a]]} ({_fmt(off[a])}); the least similar is {names[iu[0][b]]} and "
            f"{names[iu[1][b]]} ({_fmt(off[b])})."]


def agreement_summary(ref: np.ndarray, other: np.ndarray, names: Sequence[str], label: str,
                      other_label: str, ref_label: str) -> list[str]:
    """How far a second estimator's table is from the reference one (max |difference| over
    distinct layer pairs, and where)."""
    a, b = np.asarray(ref, dtype=float), np.asarray(other, dtype=float)
    if a.shape != b.shape or a.shape[0] < 2:
        return []
    iu = np.triu_indices(a.shape[0], 1)
    d = np.abs(b[iu] - a[iu])
    if not np.isfinite(d).any():
        return []
    k = int(np.nanargmax(d))
    i, j = int(iu[0][k]), int(iu[1][k])
    top = f"{d[k]:.1e}" if d[k] < 5e-4 else _fmt(d[k])
    return [f"{label}: {other_label} and {ref_label} differ by at most {top} over all pairs of "
            f"layers (largest at {names[i]} / {names[j]}: {_fmt(b[i, j])} vs "
            f"{_fmt(a[i, j])})."]


def best_match(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the column of the largest value and that value (NaN rows give -1)."""
    v = np.asarray(values, dtype=float)
    idx = np.full(v.shape[0], -1, dtype=np.int64)
    best = np.full(v.shape[0], np.nan)
    for i in range(v.shape[0]):
        if np.isfinite(v[i]).any():
            idx[i] = int(np.nanargmax(v[i]))
            best[i] = v[i, idx[i]]
    return idx, best


def _relative_depth(n: int) -> np.ndarray:
    return np.linspace(0.0, 1.0, n) if n > 1 else np.zeros(n)


def cross_summary(values: np.ndarray, rows: Sequence[str], cols: Sequence[str],
                  label_a: str, label_b: str) -> list[str]:
    idx, best = best_match(values)
    if (idx < 0).all():
        return []
    ra, rb = _relative_depth(len(rows)), _relative_depth(len(cols))
    ok = idx >= 0
    same_depth = int(np.sum(np.abs(ra[ok] - rb[idx[ok]]) <= 0.15 + 1e-12))
    pairs = ", ".join(f"{rows[i]}→{cols[idx[i]]}" for i in range(len(rows)) if idx[i] >= 0)
    k = int(np.nanargmax(best))
    w = int(np.nanargmin(best))
    return [
        f"Best match in {label_b} for each layer of {label_a}: {pairs}.",
        f"{same_depth} of {int(ok.sum())} layers of {label_a} best match a layer of {label_b} "
        "at about the same relative depth (within 15 %).",
        f"Best-match CKA ranges from {_fmt(best[w])} ({rows[w]}) to {_fmt(best[k])} ({rows[k]}); "
        f"mean {_fmt(_mean(best))}.",
    ]


def id_summary(values: Sequence[float], names: Sequence[str], label: str) -> list[str]:
    v = np.asarray(values, dtype=float)
    if v.size == 0 or not np.isfinite(v).any():
        return []
    d = np.diff(v)
    k = int(np.nanargmax(v))
    rng = f"from {_fmt(v[0], 1)} ({names[0]}) to {_fmt(v[-1], 1)} ({names[-1]})"
    if v.size < 3:
        shape = f"ID goes {rng}"
    elif np.all(d < 0):
        shape = f"ID decreases monotonically with depth, {rng}"
    elif np.all(d > 0):
        shape = f"ID increases monotonically with depth, {rng}"
    elif 0 < k < v.size - 1:
        shape = (f"ID peaks at {names[k]} ({_fmt(v[k], 1)}) and is lower at both ends "
                 f"({_fmt(v[0], 1)} first, {_fmt(v[-1], 1)} last): a hunchback profile")
    else:
        shape = (f"ID is not monotonic: maximum {_fmt(v[k], 1)} at {names[k]}, "
                 f"minimum {_fmt(np.nanmin(v), 1)} at {names[int(np.nanargmin(v))]}")
    return [f"{label}: {shape}."]


def duplicate_summary(details: dict[str, Any], layers: Sequence[str], label: str) -> list[str]:
    """Which layers had duplicated sampled rows (dropped before the neighbour estimators)."""
    dup = [(name, int(details[name].get("duplicates") or 0),
            int(details[name].get("rows_used") or 0) + int(details[name].get("duplicates") or 0))
           for name in layers if isinstance(details.get(name), dict)]
    dup = [d for d in dup if d[1] > 0]
    if not dup:
        return []
    return [f"{label}: duplicated rows in the sample were dropped before estimating ID — "
            + "; ".join(f"{name}: {k} of {n}" for name, k, n in dup)
            + " (identical inputs give identical rows, e.g. the same token at the same position of "
            "an embedding layer)."]


def id_disagreement(twonn: Any, mle: Any, label: str, factor: float = 2.0) -> list[str]:
    """Layers where TwoNN and MLE differ by more than ``factor`` (either way)."""
    if twonn is None or mle is None:
        return []
    far = []
    for name in getattr(twonn, "layers", []):
        a, b = twonn.values.get(name, np.nan), mle.values.get(name, np.nan)
        if np.isfinite(a) and np.isfinite(b) and a > 0 and b > 0 and max(a / b, b / a) > factor:
            far.append(f"{name} ({_fmt(a, 1)} vs {_fmt(b, 1)})")
    if not far:
        return [f"{label}: TwoNN and MLE agree within a factor {factor:g} at every layer."]
    return [f"{label}: TwoNN and MLE differ by more than {factor:g}× at " + ", ".join(far)
            + ". TwoNN looks only at the two nearest neighbours, so near-duplicate rows pull it "
            "towards 1 and isolated points push it up; MLE averages over k = 20 neighbours."]


def spectrum_summary(table: dict[str, dict[str, float]], evr: dict[str, np.ndarray],
                     layers: Sequence[str], names: Sequence[str], label: str) -> list[str]:
    lines = []
    er = [table.get(name, {}).get("effective_rank", np.nan) for name in layers]
    er = np.asarray(er, dtype=float)
    if np.isfinite(er).any():
        lo, hi = int(np.nanargmin(er)), int(np.nanargmax(er))
        lines.append(f"{label}: effective rank ranges from {_fmt(er[lo], 1)} ({names[lo]}) to "
                     f"{_fmt(er[hi], 1)} ({names[hi]}).")
    top1 = np.array([float(np.asarray(evr[name])[0]) if name in evr and np.asarray(evr[name]).size
                     else np.nan for name in layers])
    if np.isfinite(top1).any():
        k = int(np.nanargmax(top1))
        lines.append(f"{label}: the top principal component explains up to "
                     f"{100 * top1[k]:.1f} % of the variance ({names[k]}); "
                     f"median over layers {100 * np.nanmedian(top1):.1f} %.")
    pid = [table.get(name, {}).get("pca_id_90", np.nan) for name in layers]
    pid = np.asarray(pid, dtype=float)
    if np.isfinite(pid).any():
        lines.append(f"{label}: components for 90 % of the variance: "
                     + "; ".join(f"{n}: {int(p)}" for n, p in zip(names, pid) if np.isfinite(p))
                     + ".")
    return lines


def overlap_summary(values: np.ndarray, names: Sequence[str], label: str, k: int) -> list[str]:
    v = np.asarray(values, dtype=float)
    L = v.shape[0]
    if L < 3:
        return pair_summary(v, names, label)
    adj = np.array([v[i, i + 1] for i in range(L - 1)])
    far = v[np.triu_indices(L, 2)]
    if not (np.isfinite(adj).any() and np.isfinite(far).any()):
        return pair_summary(v, names, label)
    return [f"{label}: top-{k} subspaces of adjacent layers overlap {_fmt(_mean(adj))} "
            f"on average (mean cos²), layers two or more apart {_fmt(_mean(far))}."]


# --------------------------------------------------------------------------- the report


def _meta_get(meta: dict[str, Any], *keys: str) -> Any:
    """The first of ``keys`` found at the top level of the metadata, then under ``user``
    (what the caller passed to capture) and ``capture`` (what capture recorded)."""
    for scope in (meta, meta.get("user"), meta.get("capture")):
        if isinstance(scope, dict):
            for k in keys:
                if scope.get(k) not in (None, ""):
                    return scope[k]
    return None


def _flat_meta(meta: dict[str, Any]) -> list[tuple[str, str]]:
    rows = []
    for key, val in meta.items():
        if isinstance(val, dict) and key in ("user", "capture"):
            for k2, v2 in val.items():
                if k2 in ("layers",):
                    continue
                rows.append((f"{key}.{k2}", v2))
        else:
            rows.append((key, val))
    out = []
    for key, val in rows:
        text = val if isinstance(val, str) else json.dumps(_jsonable(val), default=str)
        out.append((key, text if len(text) <= 160 else text[:157] + "…"))
    return out


def _store_summary(side: _Side) -> tuple[list[tuple[str, str]], str, dict[str, Any]]:
    """(the key rows of the summary table, the full metadata as a collapsible table, info)."""
    src = side.src
    info: dict[str, Any] = {"layers": list(src.all_layers), "dims": dict(src.dims),
                            "rows": int(src.num_rows)}
    meta: dict[str, Any] = {}
    if src.is_store:
        st = src.store
        info["path"] = str(getattr(st, "path", "") or "")
        info["dtypes"] = {k: str(v) for k, v in dict(getattr(st, "dtypes", {}) or {}).items()}
        meta = dict(getattr(st, "metadata", {}) or {})
        info["metadata"] = meta
    else:
        info["dtypes"] = {k: str(a.dtype) for k, a in (src.arrays or {}).items()}
    model = _meta_get(meta, "model", "model_name", "model_class") or "—"
    pool = _meta_get(meta, "pool", "pooling") or "—"
    rows = [
        ("store", info.get("path") or "(in-memory arrays)"),
        ("model", str(model)),
        ("layers", f"{len(src.all_layers)}: " + ", ".join(src.all_layers)),
        ("widths", ", ".join(sorted({str(d) for d in src.dims.values()}, key=int))),
        ("rows", f"{src.num_rows:,}"),
        ("dtype", ", ".join(sorted(set(info["dtypes"].values())))),
        ("pooling", str(pool)),
    ]
    for key, label in (("corpus", "inputs"), ("inputs", "inputs"), ("dataset", "inputs")):
        v = _meta_get(meta, key)
        if v is not None:
            rows.append((label, str(v)))
            break
    flat = _flat_meta(meta)
    details = ""
    if flat:
        details = (f"<details><summary>all metadata of {_html.esc(side.title)} "
                   f"({len(flat)} entries)</summary>"
                   + _html.table(["key", "value"], flat, left_cols=2) + "</details>")
    return rows, details, info


def report(store: Any, other: Any = None, out: str | os.PathLike[str] = "report", *,
           sample: int | None = 2048, bootstrap: int = 20, rbf: bool = True,
           progress: bool = True, seed: int = 0, title: str | None = None,
           labels: tuple[str, str] | None = None) -> Path:
    """Run every measure on ``store`` (and ``other``) and write an HTML report to ``out``.

    Writes ``out/report.html`` (one self-contained page: inline CSS, PNG figures embedded as
    base64, no network, no JavaScript), ``out/results.json`` (every number: each Result's
    ``to_dict()``, the summary lines, the figure captions) and each figure as ``out/*.png``.

    Passes: one moment pass over all layers of both inputs (linear CKA biased and debiased
    within each input and across the two, spectra, top-k subspace overlap with ``k = min(32,
    smallest numerical rank)``), and one seeded sample of ``sample`` rows (``None`` = all rows,
    RBF CKA capped at 4096) for RBF CKA and intrinsic dimension (TwoNN with ``bootstrap``
    percentile-bootstrap resamples, Levina–Bickel MLE with k = 20). ``seed`` selects the
    sample; it is recorded with every result. ``rbf=False`` skips RBF CKA.

    ``store`` / ``other``: an ActivationStore, a store path or a dict of 2-D arrays; two
    inputs must have the same row ids in the same order. ``labels`` names them in the text
    (default: the model name from the metadata, else "A" / "B"). Returns the path of
    ``report.html``.
    """
    t_start = time.perf_counter()
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise ImportError("layerscope.report draws its figures with matplotlib: "
                          "pip install 'layerscope[plot]' (or matplotlib)")
    a = resolve(store)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    b = resolve(other) if other is not None else None
    if b is not None:
        check_comparable(a, b)

    def default_label(src: Source, fallback: str) -> str:
        meta = dict(getattr(src.store, "metadata", {}) or {}) if src.is_store else {}
        name = _meta_get(meta, "label", "model", "model_name")
        return str(name) if name else fallback

    la, lb = labels if labels else (default_label(a, "A"), default_label(b, "B") if b else "B")
    if b is not None and la == lb:
        la, lb = f"{la} (A)", f"{lb} (B)"
    notes: list[str] = []
    timings: dict[str, float] = {}
    sides = [_Side("source", la, a)] + ([_Side("other", lb, b)] if b is not None else [])
    cross = _Side("cross", f"{la} × {lb}", a) if b is not None else None

    # ---- pass 1: moments (all rows, streamed once)
    _log(progress, "moment pass over " + " and ".join(
        f"{s.title} ({s.src.num_rows:,} rows, {len(s.src.all_layers)} layers)" for s in sides))
    t0 = time.perf_counter()
    moment_plan = _moments(sides, cross, notes, progress)
    timings["moments"] = time.perf_counter() - t0

    # ---- pass 2: the seeded sample (neighbour family)
    for s in sides:
        _log(progress, f"sampled measures on {s.title} (sample={sample}, seed={seed})")
        t0 = time.perf_counter()
        _neighbours(s, None, notes, sample=sample, seed=seed, bootstrap=bootstrap, rbf=rbf,
                    progress=progress)
        timings[f"neighbours/{s.tag}"] = time.perf_counter() - t0
    if cross is not None and b is not None and rbf:
        t0 = time.perf_counter()
        _neighbours(cross, b, notes, sample=sample, seed=seed, bootstrap=bootstrap, rbf=rbf,
                    progress=progress)
        timings["neighbours/cross"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    doc = _Document(out)
    steps: list[Callable[[], None]] = [
        lambda: _section_summary(doc, sides),
        lambda: _section_cka(doc, sides, sample, seed),
        *([lambda: _section_cross(doc, cross, sides, sample, seed)] if cross is not None
          else []),
        lambda: _section_spectra(doc, sides, cross),
        lambda: _section_id(doc, sides, sample, seed, bootstrap),
    ]
    from ._progress import Progress

    with Progress(progress, "report sections", unit="step") as prog:
        cb = prog.cb
        for i, step in enumerate(steps):
            step()
            if cb is not None:
                cb(i + 1, len(steps))
    timings["figures"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start

    from . import __version__

    created = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    results: dict[str, Any] = {}
    for s in [*sides, *([cross] if cross is not None else [])]:
        results[s.tag] = {k: (v.to_dict() if isinstance(v, Result) else _jsonable(v))
                          for k, v in s.res.items() if v is not None}
    payload = {
        "layerscope_version": __version__,
        "created": created,
        "parameters": {"sample": sample, "bootstrap": bootstrap, "rbf": rbf, "seed": seed,
                       "subspace_k": sides[0].res.get("subspace_k"),
                       "moment_passes": moment_plan},
        "inputs": {s.tag: {"label": s.title, **doc.info.get(s.tag, {})} for s in sides},
        "summary": doc.summary,
        "figures": doc.captions,
        "notes": notes,
        "timings_s": timings,
        "results": results,
    }
    atomic_write_text(out / "results.json",
                      json.dumps(_jsonable(payload), indent=1, allow_nan=False, default=str))
    sub = (f"{la} vs {lb}" if b is not None else la) + f" · {a.num_rows:,} rows · {created}"
    sections = list(doc.sections)
    if notes:
        sections.append(("notes", "Notes", "".join(_html.note(n) for n in notes)))
    text = _html.page(title or "layerscope report", sub, sections,
                      f"layerscope {__version__} · numbers in results.json · "
                      f"total {timings['total']:.1f} s")
    path = out / "report.html"
    atomic_write_text(path, text)
    for f in (path, out / "results.json"):
        os.chmod(f, 0o644)
    _log(progress, f"wrote {path}")
    return path


class _Document:
    def __init__(self, out: Path) -> None:
        self.out = out
        self.sections: list[tuple[str, str, str]] = []
        self.summary: dict[str, list[str]] = {}
        self.captions: dict[str, str] = {}
        self.info: dict[str, Any] = {}

    def add_figure(self, name: str, fig: Any, caption: str) -> str:
        png = _png(fig)
        (self.out / f"{name}.png").write_bytes(png)
        self.captions[f"{name}.png"] = caption
        return _html.figure(png, caption, alt=name)

    def add(self, anchor: str, heading: str, lines: list[str], body: str) -> None:
        self.summary[anchor] = lines
        self.sections.append((anchor, heading, _html.summary_list(lines) + body))


def _section_summary(doc: _Document, sides: list[_Side]) -> None:
    lines = []
    tables = []
    details = ""
    for s in sides:
        rows, more, info = _store_summary(s)
        doc.info[s.tag] = info
        tables.append(rows)
        details += more
        lines.append(f"{s.title}: {len(s.src.all_layers)} layers, {s.src.num_rows:,} rows, "
                     f"widths {', '.join(sorted({str(d) for d in s.src.dims.values()}, key=int))}"
                     f", stored as {', '.join(sorted(set(info['dtypes'].values())))}.")
    if len(sides) > 1:
        lines.append("The two inputs have the same row ids in the same order (checked), so every "
                     "cross-model number compares the two models on the same tokens.")
    keys = list(dict.fromkeys(k for t in tables for k, _ in t))
    grid = [[k, *[dict(t).get(k, "—") for t in tables]] for k in keys]
    body = _html.table(["", *[s.title for s in sides]], grid, left_cols=1 + len(sides)) + details
    doc.add("store", "Store", lines, body)


def _section_cka(doc: _Document, sides: list[_Side], sample: int | None, seed: int) -> None:
    lines: list[str] = []
    body = ""
    kinds = [("cka_linear_biased", "linear CKA, biased"),
             ("cka_linear_debiased", "linear CKA, debiased"),
             ("cka_rbf", "RBF CKA (sampled)")]
    curves: list[tuple[str, str, np.ndarray, list[str]]] = []
    for s in sides:
        present = [(k, t) for k, t in kinds if isinstance(s.res.get(k), Result)]
        if not present:
            continue
        fig = _figure(5.2 * len(present), 4.6)
        axes = fig.subplots(1, len(present), squeeze=False)[0]
        parts = []
        for ax, (k, t) in zip(axes, present):
            r = s.res[k]
            _heat(ax, r.values, r.rows, r.cols, f"{t}", cbar_label="CKA")
            parts.append(f"{t}: {_meta_text(r)}")
        fig.suptitle(f"Layer × layer CKA — {s.title}", fontsize=12)
        fig.tight_layout()
        cap = (f"Layer × layer CKA of {s.title}. Linear CKA = ‖XᵀY‖²_F / (‖XᵀX‖_F ‖YᵀY‖_F) on "
               "centred activations, exact over all rows from one streaming moment pass "
               "(Kornblith et al. 2019); debiased = the same ratio of unbiased HSIC estimates "
               "(Song et al. 2012; can be negative, never clamped); RBF CKA = biased HSIC of "
               "Gaussian kernels with bandwidth σ·√(median squared pairwise distance), σ = 1, "
               "on a seeded sample of rows. " + "; ".join(parts) + ".")
        body += doc.add_figure(f"cka_{s.tag}", fig, cap)
        names = list(s.src.all_layers)
        for k, t in kinds:
            r = s.res.get(k)
            if isinstance(r, Result) and len(r.rows) > 1:
                adj = np.array([r.values[i, i + 1] for i in range(len(r.rows) - 1)])
                curves.append((s.title, t, adj, list(r.rows)))
                if k == "cka_linear_biased":
                    lines += adjacent_summary(adj, names, f"{s.title} ({t})")
                    lines += pair_summary(r.values, names, f"{s.title} ({t})")
        base = s.res.get("cka_linear_biased")
        if isinstance(base, Result):
            for k, t in kinds[1:]:
                r = s.res.get(k)
                if isinstance(r, Result):
                    lines += agreement_summary(
                        base.values, r.values, names, s.title,
                        {"cka_linear_debiased": "debiased"}.get(k, t), "biased linear CKA")
    if curves:
        fig = _figure(8.5, 4.4)
        ax = fig.subplots()
        styles = {"linear CKA, biased": "o-", "linear CKA, debiased": "s--",
                  "RBF CKA (sampled)": "^:"}
        colors = ["#3b5bdb", "#e8590c"]
        titles = list(dict.fromkeys(c[0] for c in curves))
        for who, t, adj, _rows in curves:
            ci = titles.index(who)
            ax.plot(range(len(adj)), adj, styles.get(t, "o-"), color=colors[ci % 2],
                    label=f"{who}: {t}", alpha=0.9 if ci == 0 else 0.7)
        rows0 = curves[0][3]
        names = _labels(rows0)
        _xticks(ax, [f"{names[i]}→{names[i + 1]}" for i in range(len(rows0) - 1)])
        ax.axhline(ADJ_THRESHOLD, color="grey", lw=0.8, ls="--")
        ax.text(1.005, ADJ_THRESHOLD, f"{ADJ_THRESHOLD}", transform=ax.get_yaxis_transform(),
                va="center", ha="left", fontsize=8, color="grey")
        ax.set_ylabel("CKA(layer i, layer i+1)")
        ax.set_xlabel("adjacent layer pair")
        ax.set_title("Adjacent-layer similarity (layer-pruning view)", fontsize=11)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
        fig.tight_layout()
        body += doc.add_figure(
            "adjacent", fig,
            "Layer-pruning view: CKA between each layer and the next (the first diagonal above "
            "the heatmaps' main diagonal) — linear CKA biased (circles, solid) and debiased "
            "(squares, dashed), exact over all rows; RBF CKA on the seeded sample (triangles, "
            "dotted). Pairs above the dashed 0.95 line are near-duplicates of their neighbour: "
            "candidates to prune, skip or merge; dips mark where the representation changes.")
    if not body:
        body = _html.note("No CKA result is available (see Notes).")
    doc.add("cka", "CKA across layers", lines, body)


def _section_cross(doc: _Document, cross: _Side, sides: list[_Side], sample: int | None,
                   seed: int) -> None:
    la, lb = sides[0].title, sides[1].title
    lines: list[str] = []
    body = ""
    main = cross.res.get("cka_linear_biased")
    panels = [(k, t) for k, t in (("cka_linear_biased", "linear CKA, biased"),
                                   ("cka_linear_debiased", "linear CKA, debiased"),
                                   ("cka_rbf", "RBF CKA (sampled)"))
              if isinstance(cross.res.get(k), Result)]
    if panels:
        fig = _figure(5.4 * len(panels), 4.8)
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        parts = []
        from matplotlib.patches import Rectangle

        for pi, (ax, (k, t)) in enumerate(zip(axes, panels)):
            r = cross.res[k]
            _heat(ax, r.values, r.rows, r.cols, t, cbar_label="CKA",
                  ylabel=f"rows: {la}" if pi == 0 else "", xlabel=f"columns: {lb}")
            idx, _ = best_match(r.values)
            for i, j in enumerate(idx):
                if j >= 0:
                    ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False,
                                           edgecolor="#00e5ff", lw=2.0))
            parts.append(f"{t}: {_meta_text(r)}")
        fig.suptitle(f"Cross-model CKA — rows {la}, columns {lb}", fontsize=12)
        fig.tight_layout()
        body += doc.add_figure(
            "cross_cka", fig,
            f"CKA between every layer of {la} (rows) and every layer of {lb} (columns), on the "
            "same inputs (row ids checked equal): linear CKA biased (Kornblith et al. 2019) and "
            "debiased (unbiased HSIC, Song et al. 2012) exact over all rows from the same moment "
            "pass as the within-model tables; RBF CKA (median-rule bandwidth, σ = 1) on the same "
            "seeded sample of rows of both models. The outlined cell in each row is that "
            "layer's best match (argmax of the row). " + "; ".join(parts) + ".")
    if isinstance(main, Result):
        lines += cross_summary(main.values, main.rows, main.cols, la, lb)
        ref, _ = best_match(main.values)
        for k, t in (("cka_linear_debiased", "linear CKA, debiased"), ("cka_rbf", "RBF CKA")):
            r = cross.res.get(k)
            if isinstance(r, Result) and np.shape(r.values) == np.shape(main.values):
                idx, _ = best_match(r.values)
                same = int(np.sum((idx == ref) & (ref >= 0)))
                lines.append(f"{t} picks the same best match for {same} of {len(ref)} layers "
                             f"of {la}.")
        fig = _figure(5.6, 4.3)
        ax = fig.subplots()
        ra, rb = _relative_depth(len(main.rows)), _relative_depth(len(main.cols))
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--", label="same relative depth")
        for k, t, mk, dx in (("cka_linear_biased", "linear CKA, biased", "o", -0.012),
                             ("cka_linear_debiased", "linear CKA, debiased", "s", 0.0),
                             ("cka_rbf", "RBF CKA", "^", 0.012)):
            r = cross.res.get(k)
            if not isinstance(r, Result):
                continue
            idx, best = best_match(r.values)
            ok = idx >= 0
            sc = ax.scatter(ra[ok] + dx, rb[idx[ok]], c=best[ok], cmap="viridis", vmin=0, vmax=1,
                            marker=mk, s=60, edgecolors="black", linewidths=0.5, label=t)
        ax.set_xlabel(f"relative depth in {la}")
        ax.set_ylabel(f"relative depth of best match in {lb}")
        ax.set_xlim(-0.05, 1.05)
        ax.set_ylim(-0.05, 1.05)
        ax.set_title("Best match per layer along relative depth", fontsize=11)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
        cb = fig.colorbar(sc, ax=ax)
        cb.set_label("CKA of the best match", fontsize=9)
        fig.tight_layout()
        body += doc.add_figure(
            "cross_best_match", fig,
            f"Layer-matching view: for each layer of {la} (x, relative depth 0 = first, 1 = last "
            f"layer) the relative depth of its best-matching layer in {lb} (y), i.e. the argmax "
            "of each row of the cross-model tables: linear CKA biased (circles), debiased "
            "(squares), RBF on the seeded sample (triangles), offset slightly in x to stay "
            "visible; colour = the CKA of that match. Points on the diagonal mean the two "
            "models line up layer by layer.")
    if not body:
        body = _html.note("No cross-model result is available (see Notes).")
    doc.add("cross", f"Layer matching: {la} vs {lb}", lines, body)


def _section_spectra(doc: _Document, sides: list[_Side], cross: _Side | None) -> None:
    lines: list[str] = []
    body = ""
    from matplotlib import colormaps

    for s in sides:
        sp = s.res.get("spectrum")
        if sp is None:
            continue
        layers = [name for name in s.src.all_layers if name in getattr(sp, "eigenvalues", {})]
        if not layers:
            continue
        names = _labels(layers)
        evr = {name: np.asarray(sp.explained_variance_ratio[name], dtype=float) for name in layers}
        table = {name: dict(sp.table.get(name, {})) for name in layers} if hasattr(
            sp, "table") else {}
        fig = _figure(11.5, 4.4)
        ax1, ax2 = fig.subplots(1, 2)
        cmap = colormaps["viridis"]
        for i, name in enumerate(layers):
            e = evr[name]
            e = e[np.isfinite(e) & (e > 0)]
            color = cmap(i / max(1, len(layers) - 1))
            r = np.arange(1, e.size + 1)
            ax1.loglog(r, e, color=color, lw=1.4, label=names[i])
            ax2.semilogx(r, np.cumsum(e), color=color, lw=1.4, label=names[i])
        tops = [float(np.nanmax(v)) for v in evr.values() if np.isfinite(v).any()]
        if tops:  # the display floor only: near-zero eigenvalues (rank deficiency) stay in JSON
            lo, _ = ax1.get_ylim()
            ax1.set_ylim(max(lo, 1e-7 * max(tops)), None)
        ax1.set_xlabel("principal component (rank)")
        ax1.set_ylabel("explained variance ratio")
        ax1.set_title("Spectrum per layer (log-log)", fontsize=11)
        ax1.grid(alpha=0.3, which="both")
        ax2.axhline(0.9, color="grey", lw=0.8, ls="--")
        ax2.set_xlabel("number of components")
        ax2.set_ylabel("cumulative explained variance")
        ax2.set_title("Variance vs rank", fontsize=11)
        ax2.grid(alpha=0.3, which="both")
        ax2.legend(fontsize=7, loc="lower right", ncol=2 if len(layers) > 8 else 1,
                   title="layer", title_fontsize=8)
        fig.suptitle(f"Spectra — {s.title}", fontsize=12)
        fig.tight_layout()
        body += doc.add_figure(
            f"spectra_{s.tag}", fig,
            f"Eigenvalues of each layer's covariance ({s.title}), from the same moment pass as "
            f"linear CKA over {_meta_text(sp) or 'all rows'}, normalised to explained-variance "
            "ratios; colour runs from the first (purple) to the last layer (yellow). The log "
            "axis stops at 1e-7 of the largest ratio; every eigenvalue is in results.json.")
        lines += spectrum_summary(table, evr, layers, layers, s.title)
        metrics = [m for m in ("effective_rank", "participation_ratio", "stable_rank",
                               "pca_id_90", "pca_id_95", "pca_id_99")
                   if any(m in table.get(n, {}) for n in layers)]
        if metrics:
            rows = [[name, *[_fmt(table[name].get(m, np.nan), 1 if "rank" in m or "ratio" in m
                                   else 0) for m in metrics]] for name in layers]
            body += _html.table(["layer", *[m.replace("_", " ") for m in metrics]], rows)
    panels = [s for s in [*sides, *([cross] if cross is not None else [])]
              if isinstance(s.res.get("subspace_overlap"), Result)]
    if panels:
        fig = _figure(5.6 * len(panels), 4.9)
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        parts = []
        for ax, s in zip(axes, panels):
            ov = s.res["subspace_overlap"]
            k = s.res.get("subspace_k")
            _heat(ax, ov.values, ov.rows, ov.cols, f"top-{k} overlap — {s.title}",
                  vmin=0.0, vmax=1.0, cbar_label="mean cos² of principal angles",
                  cmap="viridis",
                  xlabel=f"rows: {sides[0].title} · columns: {sides[1].title}"
                  if s is cross else "")
            parts.append(f"{s.title}: k={k}, {_meta_text(ov)}")
            if s is not cross:
                lines += overlap_summary(ov.values, ov.rows, s.title, int(k or 0))
            else:
                idx, best = best_match(ov.values)
                if (idx >= 0).any():
                    lines.append(f"{s.title}: mean best-match subspace overlap "
                                 f"{_fmt(_mean(best))}.")
        fig.suptitle("Shared principal subspaces between layers", fontsize=12)
        fig.tight_layout()
        body += doc.add_figure(
            "subspace_overlap", fig,
            "Overlap of the top-k principal subspaces (token/sample space) of every layer pair: "
            "mean cos² of the principal angles (1 = the same subspace; about k/n for unrelated "
            "random subspaces of the n-dimensional sample space), from the accumulated "
            "cross-covariances — no second pass. "
            + "; ".join(parts) + ".")
    if not body:
        body = _html.note("No spectrum or alignment result is available (see Notes).")
    doc.add("spectra", "Spectra and shared subspaces", lines, body)


def _section_id(doc: _Document, sides: list[_Side], sample: int | None, seed: int,
                bootstrap: int) -> None:
    lines: list[str] = []
    body = ""
    series = []
    for s in sides:
        for key, meth in (("id_twonn", "TwoNN"), ("id_mle", "MLE (k=20)")):
            r = s.res.get(key)
            if r is None or not hasattr(r, "values"):
                continue
            layers = [name for name in s.src.all_layers if name in r.values]
            vals = np.array([float(r.values[name]) for name in layers])
            ci = getattr(r, "ci", None) or {}
            lo = np.array([float(ci[name][0]) if name in ci else np.nan for name in layers])
            hi = np.array([float(ci[name][1]) if name in ci else np.nan for name in layers])
            series.append((s.title, meth, layers, vals, lo, hi, r))
            if key == "id_twonn":
                lines += id_summary(vals, layers, f"{s.title} (TwoNN)")
                if np.isfinite(lo).any():
                    w = np.nanmax(hi - lo)
                    lines.append(f"{s.title} (TwoNN): widest 95 % bootstrap interval "
                                 f"{_fmt(w, 1)} over {bootstrap} resamples.")
                lines += duplicate_summary(getattr(r, "details", {}) or {}, layers, s.title)
        lines += id_disagreement(s.res.get("id_twonn"), s.res.get("id_mle"), s.title)
    if series:
        fig = _figure(8.5, 4.6)
        ax = fig.subplots()
        colors = ["#3b5bdb", "#e8590c"]
        titles = list(dict.fromkeys(x[0] for x in series))
        parts = []
        for who, meth, layers, vals, lo, hi, r in series:
            c = colors[titles.index(who) % 2]
            x = np.arange(len(layers))
            style = "o-" if meth == "TwoNN" else "s--"
            ax.plot(x, vals, style, color=c, label=f"{who}: {meth}")
            if np.isfinite(lo).any():
                ax.fill_between(x, lo, hi, color=c, alpha=0.18, lw=0)
            parts.append(f"{who} {meth}: {_meta_text(r)}")
        layers0 = series[0][2]
        _xticks(ax, _labels(layers0))
        ax.set_xlabel("layer")
        allv = np.concatenate([x[3] for x in series])
        allv = allv[np.isfinite(allv) & (allv > 0)]
        logy = allv.size > 0 and float(allv.max()) > 15 * float(allv.min())
        if logy:  # IDs spanning more than a decade: a log axis keeps the small ones readable
            ax.set_yscale("log")
        ax.set_ylabel("intrinsic dimension" + (" (log axis)" if logy else ""))
        ax.set_title("Intrinsic dimension by depth", fontsize=11)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        fig.tight_layout()
        body += doc.add_figure(
            "intrinsic_dimension", fig,
            "Intrinsic dimension of each layer's activations on a seeded sample: TwoNN (Facco "
            "et al. 2017) and Levina–Bickel MLE with k=20 neighbours (MacKay–Ghahramani "
            "harmonic pooling); shaded bands (and the table's brackets) = 2.5–97.5 % percentile "
            f"bootstrap intervals over {bootstrap} resamples of the per-point statistics; exact "
            "nearest neighbours, "
            "duplicate rows dropped" + ("; log y axis" if logy else "") + ". "
            + "; ".join(parts) + ".")
        all_layers = list(dict.fromkeys(name for x in series for name in x[2]))
        cells: list[list[str]] = [[name] for name in all_layers]
        for _who, _meth, layers, vals, lo, hi, _ in series:
            got = {name: (v, a_, b_) for name, v, a_, b_ in zip(layers, vals, lo, hi)}
            for row, name in zip(cells, all_layers):
                v, a_, b_ = got.get(name, (np.nan, np.nan, np.nan))
                ci = f" [{_fmt(a_, 2)}, {_fmt(b_, 2)}]" if np.isfinite(a_) else ""
                row.append(_fmt(v, 2) + ci if name in got else "—")
        body += _html.table(["layer", *[f"{x[0]}: {x[1]}" for x in series]], cells)
    if not body:
        body = _html.note("No intrinsic-dimension result is available (see Notes).")
    doc.add("id", "Intrinsic dimension by depth", lines, body)


# --------------------------------------------------------------------------- demo


def _batches(texts: Sequence[str], size: int) -> list[list[str]]:
    return [list(texts[i:i + size]) for i in range(0, len(texts), size)]


def demo(out: str | os.PathLike[str] = "layerscope-demo", *, texts: int = 400,
         max_length: int = 64, max_rows: int = 20000, quick: bool = False, seed: int = 0,
         sample: int = 2048, bootstrap: int = 20, progress: bool = True) -> Path:
    """Capture all-MiniLM-L6-v2 (real weights, CPU) and a control — the same architecture with
    seeded random weights — on the bundled text corpus (docstrings of Python's standard
    library), token rows of the embedding output and the six encoder layers stored as float16
    (at most ``max_rows`` rows), then write the report comparing the two. ``quick`` shrinks
    everything for tests. Returns the path of ``report.html``.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    from tqdm.auto import tqdm

    from .capture import capture
    from .corpus import stdlib_corpus
    from .models import load_minilm, minilm_random

    if quick:
        texts, max_length, max_rows = min(texts, 24), min(max_length, 32), min(max_rows, 600)
        sample, bootstrap = min(sample, 300), min(bootstrap, 5)
    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = list(stdlib_corpus(texts))
    model, tokenizer = load_minilm()
    control = minilm_random(seed)
    layers = ["embeddings", "encoder.layer.*"]
    batch_size = 16
    stores = {}
    for tag, label, m in (("minilm", "MiniLM-L6 (trained)", model),
                          ("control", f"MiniLM-L6 (random init, seed {seed})", control)):
        meta = {"label": label, "model": "sentence-transformers/all-MiniLM-L6-v2"
                if tag == "minilm" else f"all-MiniLM-L6-v2 architecture, random weights "
                f"(seed {seed})", "corpus": f"{len(corpus)} Python stdlib docstrings",
                "max_length": max_length}
        with torch.inference_mode(), capture(
                m, layers=layers, out=out / "stores" / tag, pool="tokens", dtype="float16",
                max_rows=max_rows, metadata=meta, overwrite=True) as cap:
            batches = _batches(corpus, batch_size)
            for batch in tqdm(batches, desc=f"capture {tag}", unit="batch",
                              disable=not progress):
                enc = tokenizer(batch, padding=True, truncation=True, max_length=max_length,
                                return_tensors="pt")
                m(**enc)
                if cap.rows_queued >= max_rows:  # the row cap is reached: stop early
                    break
        stores[tag] = cap.store
    t_capture = time.perf_counter() - t0
    path = report(stores["minilm"], stores["control"], out, sample=sample, bootstrap=bootstrap,
                  seed=seed, progress=progress, title="layerscope demo: MiniLM vs random control",
                  labels=("MiniLM", "random control"))
    if progress:
        print(f"layerscope demo: capture {t_capture:.1f} s, total "
              f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return path


# --------------------------------------------------------------------------- CLI


def _cmd_report(args: argparse.Namespace) -> int:
    path = report(args.store, args.other, args.out, sample=args.sample or None,
                  bootstrap=args.bootstrap, rbf=not args.no_rbf, seed=args.seed,
                  progress=not args.quiet)
    print(f"report: {path.resolve()}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    path = demo(args.out, texts=args.texts, quick=args.quick, progress=not args.quiet)
    print(f"report: {path.resolve()}")
    return 0


def add_cli(sub: Any) -> None:
    p = sub.add_parser("report", help="every measure on a store (or two) → one HTML report",
                       description="Run every measure in as few passes as possible and write "
                                   "DIR/report.html (self-contained), DIR/results.json and "
                                   "the figures as PNG files.")
    p.add_argument("store", help="activation store (folder)")
    p.add_argument("other", nargs="?", default=None,
                   help="a second store with the same row ids (cross-model comparison)")
    p.add_argument("-o", "--out", default="report", help="output folder (default: report)")
    p.add_argument("--sample", type=int, default=2048,
                   help="rows sampled for RBF CKA and intrinsic dimension (0 = all rows)")
    p.add_argument("--bootstrap", type=int, default=20, help="bootstrap resamples for ID CIs")
    p.add_argument("--no-rbf", action="store_true", help="skip RBF CKA")
    p.add_argument("--seed", type=int, default=0, help="seed of the row sample")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=_cmd_report)

    d = sub.add_parser("demo", help="capture MiniLM and a random control, write the report",
                       description="Capture all-MiniLM-L6-v2 (real weights, CPU) and the same "
                                   "architecture with seeded random weights on the bundled text "
                                   "corpus, then write the report comparing them.")
    d.add_argument("--out", default="layerscope-demo", help="output folder")
    d.add_argument("--texts", type=int, default=400, help="number of texts from the corpus")
    d.add_argument("--quick", action="store_true", help="tiny run (tests)")
    d.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    d.set_defaults(func=_cmd_demo)

