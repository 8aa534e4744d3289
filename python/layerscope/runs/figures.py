"""What the user looks at after a batch: ``DIR/index.html`` (self-contained: inline CSS, the
figures embedded as PNG, no script, no network) and the same figures as ``DIR/figures/*.png``.

The figures are drawn from the tidy table alone (``results.csv``'s rows), so they show exactly
the numbers of the table:

* **CKA to the reference along the run** (``pairs="reference"``, and ``"all"`` through the
  reference's pairs): for each layer, the CKA of the store's layer with the reference's
  layer of the same name, stores in run order — when each layer converges to its final form
  (reference = the last checkpoint), or how far an edit moved it. A line per layer (a
  colour scale by depth beyond 10 layers), and the layer × store table as a heatmap.
* **Best-matching layer of the reference** (same pairings): for each layer of each store,
  the reference layer of highest CKA, against the "same position" diagonal — a layer
  removed, added or moved shows as a step off it.
* **CKA between consecutive stores** (``pairs="consecutive"``): the same, per step.
* **Adjacent-layer CKA of every store** (``pairs="each"``): CKA of each layer with the next,
  one line per store — where a layer was removed or two layers became redundant.
* **Intrinsic dimension by depth** (``id``) and **effective rank by depth** (``spectrum``):
  one line per store on one axis, per estimator.
* **A grid of the layer × layer heatmaps** of every CKA (and alignment) item, on one colour
  scale.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MissingDependencyError
from ..report import html
from ..results import atomic_write_bytes, atomic_write_text
from .table import COLUMNS, Row

MAX_GRID = 16  # heatmaps in the grid (the rest: in items/ and results.csv)
_I = {c: i for i, c in enumerate(COLUMNS)}


# --------------------------------------------------------------------------- series (no mpl)


def layer_order(rows: Sequence[Row], store: str) -> list[str]:
    """The layers of ``store`` in the order the table lists them (store order)."""
    seen: dict[str, None] = {}
    for r in rows:
        if r[0] == store:
            seen.setdefault(r[2], None)
        if r[1] == store and r[3]:
            seen.setdefault(r[3], None)
    return list(seen)


def same_layer_series(rows: Sequence[Row], measure: str, estimator: str,
                      pairs: Sequence[tuple[str, str]]) -> dict[str, list[float]]:
    """``{layer: [value for each (a, b) in pairs]}``: the value of ``layer`` of ``a`` against
    the layer of the same name of ``b`` (NaN where ``b`` lacks it); layers in ``a``'s order."""
    cell = {(r[0], r[1], r[2]): r[6] for r in rows
            if r[4] == measure and r[5] == estimator and r[2] == r[3]}
    layers: dict[str, None] = {}
    for a, _ in pairs:
        for name in layer_order([r for r in rows if r[4] == measure], a):
            layers.setdefault(name, None)
    return {name: [cell.get((a, b, name), math.nan) for a, b in pairs] for name in layers}


def adjacent_series(rows: Sequence[Row], estimator: str, store: str) -> tuple[list[str],
                                                                              list[float]]:
    """(the layers of ``store``, the CKA of each with the next one) from its within-store
    table."""
    own = [r for r in rows if r[4] == "cka" and r[5] == estimator and r[0] == store
           and r[1] == store]
    order = layer_order(own, store)
    cell = {(r[2], r[3]): r[6] for r in own}
    return order, [cell.get((a, b), math.nan) for a, b in zip(order, order[1:])]


def matching(rows: Sequence[Row], estimator: str, ref: str, other: str
             ) -> tuple[list[str], list[str], list[int]]:
    """The matching view of one CKA item: (the reference's layers, ``other``'s layers, for
    each layer of ``other`` the position of the reference layer of highest CKA with it)."""
    if any(r[4] == "cka" and r[0] == ref and r[1] == other for r in rows):
        rn, cn, vals = matrix(rows, "cka", estimator, ref, other)
    else:  # stored the other way round (pairs="all")
        cn, rn, vals = matrix(rows, "cka", estimator, other, ref)
        vals = vals.T
    best = [int(np.nanargmax(vals[:, j])) if np.isfinite(vals[:, j]).any() else -1
            for j in range(len(cn))]
    return rn, cn, best


def per_layer_series(rows: Sequence[Row], measure: str, estimator: str,
                     store: str) -> tuple[list[str], list[float]]:
    """A store measure (``id``, ``spectrum``) by depth: (layers, values)."""
    sel = [r for r in rows if r[4] == measure and r[5] == estimator and r[0] == store]
    return [r[2] for r in sel], [r[6] for r in sel]


def matrix(rows: Sequence[Row], measure: str, estimator: str, a: str, b: str
           ) -> tuple[list[str], list[str], np.ndarray]:
    """The layer × layer table of one item, rebuilt from its rows."""
    sel = [r for r in rows if r[4] == measure and r[5] == estimator and r[0] == a
           and r[1] == b]
    rn = list(dict.fromkeys(r[2] for r in sel))
    cn = list(dict.fromkeys(r[3] for r in sel))
    vals = np.full((len(rn), len(cn)), np.nan)
    ri, ci = {n: i for i, n in enumerate(rn)}, {n: i for i, n in enumerate(cn)}
    for r in sel:
        vals[ri[r[2]], ci[r[3]]] = r[6]
    return rn, cn, vals


# --------------------------------------------------------------------------- figures


class _Figures:
    """Draws each figure, writes it to ``figures/NAME.png`` and keeps its HTML."""

    def __init__(self, out: Path) -> None:
        from ..plots import _mpl

        _mpl()  # MissingDependencyError without matplotlib
        self.dir = out / "figures"
        self.dir.mkdir(exist_ok=True)
        self.html: list[tuple[str, str, str]] = []  # (anchor, heading, inner html)
        self.names: list[str] = []

    def add(self, anchor: str, heading: str, fig: Any, caption: str) -> None:
        from ..plots import png_bytes

        png = png_bytes(fig)
        atomic_write_bytes(self.dir / f"{anchor}.png", png)
        self.names.append(f"{anchor}.png")
        self.html.append((anchor, heading, html.figure(png, caption, alt=heading)))

    def prune(self) -> None:
        """Remove the figures of an earlier run of this folder that this run did not draw."""
        for old in self.dir.glob("*.png"):
            if old.name not in self.names:
                old.unlink(missing_ok=True)


def _curves(ax: Any, series: dict[str, list[float]], xlabels: list[str], ylabel: str,
            legend: str) -> None:
    """One line per series over ``xlabels``: a legend up to 10 lines, else a colour scale
    (viridis) from the first to the last series (depth, or run order)."""
    import matplotlib

    from ..plots import xticks

    names = list(series)
    many = len(names) > 10
    cmap = matplotlib.colormaps["viridis"]
    for i, (name, ys) in enumerate(series.items()):
        color = cmap(i / max(len(names) - 1, 1)) if many else None
        ax.plot(range(len(ys)), ys, marker="o", ms=3 if many else 4, lw=1.2 if many else 1.5,
                color=color, label=name)
    if many:
        sm = matplotlib.cm.ScalarMappable(
            cmap=cmap, norm=matplotlib.colors.Normalize(0, len(names) - 1))
        cb = ax.figure.colorbar(sm, ax=ax, fraction=0.046, pad=0.03)
        cb.set_ticks([0, len(names) - 1])
        cb.set_ticklabels([names[0], names[-1]])
        cb.set_label(legend, fontsize=9)
    elif names:
        ax.legend(title=legend, fontsize=7, title_fontsize=8, frameon=False,
                  ncol=2 if len(names) > 5 else 1)
    xticks(ax, xlabels)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.grid(alpha=0.3)


def _line_figure(figs: _Figures, anchor: str, heading: str, series: dict[str, list[float]],
                 xlabels: list[str], ylabel: str, legend: str, caption: str) -> None:
    from ..plots import figure

    fig = figure(max(6.0, 0.5 * len(xlabels) + 3.5), 3.8)
    _curves(fig.add_subplot(1, 1, 1), series, xlabels, ylabel, legend)
    fig.suptitle(heading, fontsize=11)
    figs.add(anchor, heading, fig, caption)


def _along(figs: _Figures, rows: list[Row], est: str, pairs: list[tuple[str, str]],
           anchor: str, heading: str, xlabels: list[str], caption: str) -> None:
    """CKA of each layer with the same layer of the other store, over store pairs: lines
    (one per layer) and the layer × pair table as a heatmap."""
    from ..plots import figure, heat, tick_labels

    series = same_layer_series(rows, "cka", est, pairs)
    if not series:
        return
    if len(pairs) > 1:  # one pair: a line of one point says nothing the table does not
        short = dict(zip(tick_labels(list(series)), series.values()))
        _line_figure(figs, anchor, heading, short, xlabels, f"CKA ({est})", "layer", caption)
    vals = np.array(list(series.values()))
    fig = figure(max(6.0, 0.55 * len(xlabels) + 3.5), max(3.0, 0.28 * len(series) + 1.5))
    heat(fig.add_subplot(1, 1, 1), vals, list(series), xlabels, f"{heading} (table)",
         cbar_label=f"CKA ({est})", annotate=vals.size <= 200)
    figs.add(f"{anchor}-table", f"{heading}: layer × store", fig,
             "The same numbers as a table: rows are layers in depth order, columns the store "
             "pairs in run order.")


def _matching(figs: _Figures, rows: list[Row], est: str, ref: str, others: list[str]
              ) -> None:
    """For each layer of each store, the reference layer it is most similar to."""
    from ..plots import figure, tick_labels

    fig = figure(6.5, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    ref_layers: list[str] = []
    longest: list[str] = []
    series: dict[str, list[float]] = {}
    for other in others:
        rn, cn, best = matching(rows, est, ref, other)
        ref_layers = rn if len(rn) > len(ref_layers) else ref_layers
        longest = cn if len(cn) > len(longest) else longest
        series[other] = [b if b >= 0 else math.nan for b in best]
    ax.plot([0, len(longest) - 1], [0, len(longest) - 1], ls="--", lw=1, color="0.6",
            label="same position")
    _curves(ax, series, tick_labels(longest), f"best-matching layer of {ref}", "store")
    ax.set_yticks(range(len(ref_layers)))
    ax.set_yticklabels(tick_labels(ref_layers), fontsize=8)
    ax.set_xlabel("layer of the store (by position)", fontsize=9)
    heading = f"Best-matching layer of {ref}"
    fig.suptitle(heading, fontsize=11)
    figs.add("matching", heading, fig,
             f"For each layer of each store, the layer of {ref} with the highest CKA ({est}) "
             "with it. On the dashed line a layer matches the reference layer at its own "
             "position; a step off the line is a shift (a layer removed, added or moved), a "
             "flat run is several layers that all resemble one reference layer.")


def _by_depth(figs: _Figures, rows: list[Row], labels: list[str], measure: str, est: str,
              what: str) -> None:
    """A store measure by depth, one line per store (x: position in the layer list)."""
    from ..plots import tick_labels

    series, longest = {}, []
    for lab in labels:
        names, ys = per_layer_series(rows, measure, est, lab)
        series[lab] = ys
        longest = names if len(names) > len(longest) else longest
    heading = f"{what[0].upper()}{what[1:]} by depth" + (f" ({est})" if measure == "id" else "")
    _line_figure(figs, f"{measure}-{est}", heading, series, tick_labels(longest),
                 f"{what} ({est})" if measure == "id" else what, "store",
                 f"The {what} of each layer, one line per store (x: the layer's position in "
                 "its store; tick labels: the names of the store with the most layers).")


def _grid(figs: _Figures, rows: list[Row], measure: str) -> None:
    """The layer × layer table of every item of ``measure``, on one colour scale."""
    from ..plots import figure, heat

    items = list(dict.fromkeys((r[0], r[1], r[5]) for r in rows if r[4] == measure))
    if not items:
        return
    shown = items[:MAX_GRID]
    ncol = min(4, len(shown))
    nrow = math.ceil(len(shown) / ncol)
    mats = [matrix(rows, measure, e, a, b) for a, b, e in shown]
    finite = np.concatenate([m[2][np.isfinite(m[2])] for m in mats])
    lo = min(0.0, float(finite.min())) if finite.size else 0.0
    hi = max(1.0, float(finite.max())) if finite.size else 1.0
    side = max(2.6 if len(shown) > 1 else 4.5, 0.22 * max(len(m[0]) for m in mats) + 1.6)
    fig = figure(ncol * (side + 0.8), nrow * side)
    for k, ((a, b, _), (rn, cn, vals)) in enumerate(zip(shown, mats)):
        heat(fig.add_subplot(nrow, ncol, k + 1), vals, rn, cn, f"{a} × {b}" if a != b else a,
             vmin=lo, vmax=hi, annotate=len(shown) == 1 and vals.size <= 256, ylabel=a,
             xlabel=b)
    fig.tight_layout()
    more = (f" (the first {MAX_GRID} of {len(items)}; all in results.csv)"
            if len(items) > len(shown) else "")
    name = "CKA" if measure == "cka" else "alignment"
    figs.add(f"{measure}-grid", f"All {name} tables", fig,
             f"The layer × layer {name} table of every item{more} on one colour scale "
             f"[{lo:.2f}, {hi:.2f}]: rows are the first store's layers, columns the second's.")


def draw(out: Path, rows: list[Row], labels: list[str], pairs: str,
         reference: str | None) -> _Figures:
    """Every figure that the batch's measures and pairing allow (see the module docstring);
    raises MissingDependencyError without matplotlib."""
    from ..plots import tick_labels

    figs = _Figures(out)
    est = min((r[5] for r in rows if r[4] == "cka"), default=None)
    if est is not None and pairs in ("reference", "all") and reference is not None:
        others = [x for x in labels if x != reference]
        done = {(r[0], r[1]) for r in rows}
        pl = [(reference, x) if (reference, x) in done else (x, reference) for x in others]
        _along(figs, rows, est, pl, "cka-to-reference",
               f"CKA of each layer to the same layer of {reference}", others,
               "For each layer (legend or colour: depth), the CKA of that layer of each store "
               f"with the same layer of the reference {reference}, stores in run order. With "
               "the last checkpoint as the reference, a line that reaches 1 early is a layer "
               "that settled early; after an edit, a drop marks the layers it moved. Layers "
               "the reference lacks are left out; an empty cell is a layer the store lacks.")
        _matching(figs, rows, est, reference, others)
    if est is not None and pairs == "consecutive":
        pl = list(zip(labels, labels[1:]))
        _along(figs, rows, est, pl, "cka-consecutive",
               "CKA of each layer between consecutive stores", [f"{a}→{b}" for a, b in pl],
               "For each layer, the CKA of that layer between each store and the next, in run "
               "order: the low points are the steps where the layer moved most.")
    if est is not None and pairs == "each":
        series, longest = {}, []
        for lab in labels:
            names, ys = adjacent_series(rows, est, lab)
            series[lab] = ys
            longest = names if len(names) > len(longest) else longest
        short = tick_labels(longest)
        _line_figure(figs, "adjacent", "Adjacent-layer CKA of every store", series,
                     [f"{a}→{b}" for a, b in zip(short, short[1:])],
                     f"CKA ({est}) with the next layer", "store",
                     "The CKA of each layer with the next one, one line per store (x: the "
                     "adjacent pairs by position; tick labels: the names of the store with the "
                     "most layers). Values near 1 mark "
                     "layers that barely change the representation (candidates to prune or "
                     "merge); a dip where another store stays high marks where the stores' "
                     "layers differ.")
    for est_id in dict.fromkeys(r[5] for r in rows if r[4] == "id"):
        _by_depth(figs, rows, labels, "id", est_id, "intrinsic dimension")
    if any(r[4] == "spectrum" for r in rows):
        _by_depth(figs, rows, labels, "spectrum", "effective_rank", "effective rank")
    for measure in ("cka", "align"):
        _grid(figs, rows, measure)
    figs.prune()
    return figs


def write_index(out: Path, rows: list[Row], labels: list[str], pairs: str,
                reference: str | None, measures: Sequence[str],
                options: dict[str, dict[str, Any]], stores: list[dict[str, Any]],
                counts: dict[str, int], failed: dict[str, str], figures: bool = True) -> Path:
    """``DIR/index.html``: the run (stores, options, what ran), every figure (when
    matplotlib is installed; otherwise a note naming the extra) and the failed items."""
    sections: list[tuple[str, str, str]] = []
    lines = [f"{len(labels)} stores in run order; pairs = {pairs}"
             + (f", reference {reference}" if pairs in ("reference", "all") and reference
                else "") + f"; measures: {', '.join(measures)}.",
             f"{sum(counts.values())} items: {counts['computed']} computed by this run, "
             f"{counts['skipped']} found done, {counts['failed']} failed.",
             f"The tidy table: results.csv, {len(rows)} rows (one per store pair, layer "
             "pair, measure and estimator); each item's full result under items/."]
    store_rows = [[s["label"], s["path"], s["rows"], s["layers"], s["dtype"],
                   s["fingerprint"][:12]] for s in stores]
    opt_rows = [[m, ", ".join(f"{k}={v!r}" for k, v in sorted(o.items())) or "defaults"]
                for m, o in options.items()]
    body = (html.summary_list(lines)
            + '<p><a href="results.csv">results.csv</a> · <a href="batch.json">batch.json</a>'
            + "</p>"
            + html.table(["store", "path", "rows", "layers", "dtype", "fingerprint"],
                         store_rows, left_cols=2)
            + html.table(["measure", "options"], opt_rows, left_cols=2))
    sections.append(("run", "The run", body))
    if figures:
        try:
            sections += draw(out, rows, labels, pairs, reference).html
        except MissingDependencyError as e:
            sections.append(("figures", "Figures", html.note(f"No figures: {e}")))
    if failed:
        sections.append(("failed", "Failed items", html.note(
            "These items are not in the table; the next run of the same batch retries them.")
            + html.table(["item", "error"], [[k, v] for k, v in failed.items()], left_cols=2)))
    from .. import __version__

    page = html.page("layerscope batch", f"{len(labels)} stores · {out.name}", sections,
                     f"layerscope {__version__}")
    atomic_write_text(out / "index.html", page)
    return out / "index.html"
