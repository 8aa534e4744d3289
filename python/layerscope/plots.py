"""Matplotlib figures (imported lazily: matplotlib is an optional dependency)."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

#: Pairs with a permutation p-value at or above this are hatched in :func:`heatmap`.
NULL_ALPHA = 0.05


def _mpl() -> Any:
    from ._optional import require

    matplotlib = require("matplotlib", "a figure")

    if matplotlib.get_backend().lower() not in ("agg", "module://matplotlib_inline.backend_inline"):
        try:
            import matplotlib.pyplot as plt  # noqa: F401
        except Exception:  # pragma: no cover - headless fallbacks
            matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def heatmap(res: Any, ax: Any = None, title: str | None = None, annotate: bool | None = None) -> Any:
    """Layer × layer heatmap of a :class:`~layerscope.results.MatrixResult`."""
    plt = _mpl()
    if ax is None:
        size = max(4.0, 0.45 * max(len(res.rows), len(res.cols)) + 2.0)
        fig, ax = plt.subplots(figsize=(size + 1.0, size))
    else:
        fig = ax.figure
    est = res.meta.get("estimator")
    title = title or f"{res.measure}{' (' + est + ')' if est else ''}"
    p = res.meta.get("p_values")
    marked = None
    if p is not None and res.meta.get("calibration", {}).get("null"):
        p = np.asarray(p, dtype=float)
        marked = np.isfinite(p) & (p >= NULL_ALPHA)
        title += f"\nhatched: p ≥ {NULL_ALPHA} ({res.meta['calibration']['null']} permutations)"
    heat(ax, res.values, res.rows, res.cols, title, annotate=annotate, hatch=marked)
    fig.tight_layout()
    return fig


def _short(name: str, width: int = 18) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1):]


def _suffix(name: str, parts: int) -> str:
    segs = name.split(".")
    return ".".join(segs[-parts:]) if parts < len(segs) else name


def tick_labels(layers: Sequence[str]) -> list[str]:
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


def xticks(ax: Any, labels: Sequence[str], fontsize: int = 8) -> None:
    """x tick labels, rotated when they would collide."""
    wide = len(labels) * max((len(s) for s in labels), default=0) > 40
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=40 if wide else 0, ha="right" if wide else "center",
                       rotation_mode="anchor" if wide else "default", fontsize=fontsize)


def figure(w: float, h: float) -> Any:
    """A matplotlib Figure drawn off-screen (no pyplot state, no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def png_bytes(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", facecolor="white")
    return buf.getvalue()


def heat(ax: Any, values: np.ndarray, rows: Sequence[str], cols: Sequence[str], title: str,
          *, vmin: float | None = None, vmax: float | None = None, cbar_label: str = "",
          cmap: str = "magma", xlabel: str = "", ylabel: str = "",
          annotate: bool | None = None, hatch: np.ndarray | None = None) -> Any:
    """The one layer × layer heatmap (of :func:`heatmap` and the report): colour range
    ``[min(0, min), max(1, max)]`` unless given, short unique tick labels, each cell
    annotated when there are at most 256 (``annotate``), a colour bar; the cells where
    ``hatch`` is True hatched (pairs not distinguishable from a permutation null)."""
    vals = np.asarray(values, dtype=float)
    finite = vals[np.isfinite(vals)]
    lo = vmin if vmin is not None else (min(0.0, float(finite.min())) if finite.size else 0.0)
    hi = vmax if vmax is not None else (max(1.0, float(finite.max())) if finite.size else 1.0)
    im = ax.imshow(vals, cmap=cmap, vmin=lo, vmax=hi, origin="upper", aspect="auto")
    xticks(ax, tick_labels(cols))
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(tick_labels(rows), fontsize=8)
    if annotate if annotate is not None else vals.size <= 256:
        for i in range(vals.shape[0]):
            for j in range(vals.shape[1]):
                v = vals[i, j]
                light = np.isfinite(v) and v > lo + 0.6 * (hi - lo)
                ax.text(j, i, "nan" if not np.isfinite(v) else f"{v:.2f}", ha="center",
                        va="center", fontsize=7, color="black" if light else "white")
    if hatch is not None:
        from matplotlib.patches import Rectangle

        for i, j in zip(*np.nonzero(hatch)):
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="///",
                                   edgecolor="0.6", linewidth=0))
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
