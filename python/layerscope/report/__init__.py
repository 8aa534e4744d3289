"""``layerscope.report``: every measure on one store (or two), in as few passes as possible,
written as one self-contained HTML page plus ``results.json`` and PNGs.

Passes over the data (:mod:`.run`):

* ONE streaming moment pass over every layer of every input together (the layers of two
  stores are concatenated, so the within-model and cross-model tables share it): linear CKA
  (biased, Kornblith et al. 2019; debiased, Song et al. 2012 unbiased HSIC), per-layer spectra
  and the top-k subspace overlap (mean cos² of the principal angles); when that one pass does
  not fit the memory budget, :func:`layerscope.analyze` plans the passes of each table;
* one seeded sample of ``sample`` rows for the neighbour family: RBF CKA (bandwidth
  σ·√(median squared pairwise distance), σ = 1), intrinsic dimension by TwoNN (Facco et al.
  2017, percentile bootstrap CIs) and Levina–Bickel MLE (k = 20).

A measure that fails on the data becomes a visible note instead of an error. Every section
(:mod:`.sections`) carries plain-words summary lines computed from the numbers
(:mod:`.summaries`), and every figure a caption naming the estimator, the number of rows, the
sample and the seed.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .._optional import require
from .._progress import Progress, stage
from .._source import check_comparable, resolve
from .._validate import (
    BACKEND,
    RAY_ADDRESS,
    SEED,
    Bool,
    Int,
    Text,
    Texts,
    check_backend,
    validated,
)
from ..results import Result, _jsonable, atomic_write_text
from . import html
from .run import Side, calibration, moments, neighbours
from .sections import (
    Document,
    section_cka,
    section_cross,
    section_id,
    section_spectra,
    section_summary,
)

__all__ = ["report"]


@validated(sample=(None, Int(1)), bootstrap=Int(0), null=Int(0), rbf=Bool(), progress=Bool(),
           seed=SEED,
           title=(None, Text()), labels=(None, Texts(2)), backend=BACKEND,
           ray_address=RAY_ADDRESS)
def report(store: Any, other: Any = None, out: str | os.PathLike[str] = "report", *,
           sample: int | None = 2048, bootstrap: int = 20, null: int = 99, rbf: bool = True,
           progress: bool = True, seed: int = 0, title: str | None = None,
           labels: tuple[str, str] | None = None, backend: str = "local",
           ray_address: str | None = None) -> Path:
    """Run every measure on ``store`` (and ``other``) and write an HTML report to ``out``.

    Writes ``out/report.html`` (one self-contained page: inline CSS, PNG figures embedded as
    base64, no network, no JavaScript), ``out/results.json`` (every number: each Result's
    ``to_dict()``, the summary lines, the figure captions) and each figure as ``out/*.png``.

    Passes: one moment pass over all layers of both inputs (linear CKA biased and debiased
    within each input and across the two, spectra, top-k subspace overlap with ``k = min(32,
    smallest numerical rank)``), and one seeded sample of ``sample`` rows (``None`` = all rows,
    RBF CKA capped at 4096) for RBF CKA and intrinsic dimension (TwoNN with ``bootstrap``
    percentile-bootstrap resamples, Levina–Bickel MLE with k = 20). ``seed`` selects the
    sample; it is recorded with every result. ``rbf=False`` skips RBF CKA. ``null``: the
    permutations of the biased linear CKA's null on the same sample (``cka(..., null=)``; 0:
    none): pairs not distinguishable from it are hatched, and its mean — what unrelated
    layers give at this sample — is in the caption.

    ``store`` / ``other``: an ActivationStore, a store path or a dict of 2-D arrays; two
    inputs must have the same row ids in the same order. ``labels`` names them in the text
    and figures (default: :meth:`Source.short_name`: the metadata's label, else its model name
    unless that is a path on disk, else the store folder's name; "A" / "B" for arrays).
    ``backend="ray"``: every measure runs as tasks on a Ray cluster (the moment pass as
    row-range tasks, RBF CKA as tasks per layer and per block of pairs, intrinsic dimension
    per layer; ``ray_address`` as in :func:`layerscope.cka`): the same numbers.

    Returns the path of ``report.html``.
    """
    t_start = time.perf_counter()
    check_backend(backend, ray_address)
    on: dict[str, Any] = {"backend": backend}
    if ray_address is not None:
        on["ray_address"] = ray_address
    require("matplotlib", "the report's figures")
    a = resolve(store)
    b = resolve(other) if other is not None else None
    if b is not None:
        check_comparable(a, b)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)  # only once the inputs are known to be usable

    la, lb = labels if labels else (a.short_name("A"), b.short_name("B") if b else "B")
    if b is not None and la == lb:
        la, lb = f"{la} (A)", f"{lb} (B)"
    notes: list[str] = []
    timings: dict[str, float] = {}
    sides = [Side("source", la, a)] + ([Side("other", lb, b)] if b is not None else [])
    cross = Side("cross", f"{la} × {lb}", a) if b is not None else None

    # ---- pass 1: moments (all rows, streamed once)
    stage(progress, "report", "moment pass over " + " and ".join(
        f"{s.title} ({s.src.num_rows:,} rows, {len(s.src.all_layers)} layers)" for s in sides))
    t0 = time.perf_counter()
    moment_plan = moments(sides, cross, notes, progress, on)
    timings["moments"] = time.perf_counter() - t0

    # ---- pass 2: the seeded sample (neighbour family)
    for s in sides:
        stage(progress, "report", f"sampled measures on {s.title} (sample={sample}, seed={seed})")
        t0 = time.perf_counter()
        neighbours(s, None, notes, sample=sample, seed=seed, bootstrap=bootstrap, rbf=rbf,
                    progress=progress, on=on)
        calibration(s, notes, null=null, sample=sample, seed=seed, progress=progress, on=on)
        timings[f"neighbours/{s.tag}"] = time.perf_counter() - t0
    if cross is not None and b is not None and rbf:
        t0 = time.perf_counter()
        neighbours(cross, b, notes, sample=sample, seed=seed, bootstrap=bootstrap, rbf=rbf,
                    progress=progress, on=on)
        timings["neighbours/cross"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    doc = Document(out)
    steps: list[Callable[[], None]] = [
        lambda: section_summary(doc, sides),
        lambda: section_cka(doc, sides, sample, seed),
        *([lambda: section_cross(doc, cross, sides, sample, seed)] if cross is not None
          else []),
        lambda: section_spectra(doc, sides, cross),
        lambda: section_id(doc, sides, sample, seed, bootstrap),
    ]
    with Progress(progress, "report sections", unit="step") as prog:
        cb = prog.cb
        for i, step in enumerate(steps):
            step()
            if cb is not None:
                cb(i + 1, len(steps))
    timings["figures"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start

    from .. import __version__

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
                       "moment_passes": moment_plan, "backend": backend},
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
        sections.append(("notes", "Notes", "".join(html.note(n) for n in notes)))
    text = html.page(title or "layerscope report", sub, sections,
                      f"layerscope {__version__} · numbers in results.json · "
                      f"total {timings['total']:.1f} s")
    path = out / "report.html"
    atomic_write_text(path, text)
    for f in (path, out / "results.json"):
        os.chmod(f, 0o644)
    stage(progress, "report", f"wrote {path}")
    return path
