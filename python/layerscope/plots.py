"""Matplotlib figures (imported lazily: matplotlib is an optional dependency)."""

from __future__ import annotations

from typing import Any

import numpy as np


def _mpl() -> Any:
    import matplotlib

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
    vals = np.asarray(res.values, dtype=float)
    finite = vals[np.isfinite(vals)]
    vmin = min(0.0, float(finite.min())) if finite.size else 0.0
    vmax = max(1.0, float(finite.max())) if finite.size else 1.0
    im = ax.imshow(vals, cmap="magma", vmin=vmin, vmax=vmax, origin="upper")
    ax.set_xticks(range(len(res.cols)))
    ax.set_yticks(range(len(res.rows)))
    ax.set_xticklabels([_short(c) for c in res.cols], rotation=60, ha="right", fontsize=8)
    ax.set_yticklabels([_short(r) for r in res.rows], fontsize=8)
    if annotate is None:
        annotate = vals.shape[0] * vals.shape[1] <= 256
    if annotate:
        for i in range(vals.shape[0]):
            for j in range(vals.shape[1]):
                v = vals[i, j]
                txt = "nan" if not np.isfinite(v) else f"{v:.2f}"
                color = "black" if np.isfinite(v) and v > vmin + 0.6 * (vmax - vmin) else "white"
                ax.text(j, i, txt, ha="center", va="center", fontsize=7, color=color)
    est = res.meta.get("estimator")
    ax.set_title(title or f"{res.measure}{' (' + est + ')' if est else ''}")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return fig


def _short(name: str, width: int = 22) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1):]
