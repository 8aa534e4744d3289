"""Per-layer covariance spectra from the moment engine: :func:`spectrum`.

The eigenvalues of each layer's covariance ``C_ii/(n−1)`` (one streamed pass per group of
layers that fits the memory budget; no cross blocks) and the measures derived from them:
effective rank (Roy & Vetterli 2007, on singular values), participation ratio
``(Σλ)²/Σλ²``, stable rank ``Σλ/λ₁`` and PCA-ID at 90/95/99 % (computed in Rust,
``layerscope_core::measures::spectrum``). See ``docs/alignment.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .._text import Table
from .._validate import LAYERS, PLACEMENT, PROGRESS, Int, Placement, validated
from ..results import Result
from ._passes import run_measures

if TYPE_CHECKING:  # Python < 3.11 has no typing.Unpack; the annotations are strings
    from typing_extensions import Unpack

SPECTRUM_MEASURES = (
    "total_variance",
    "rank",
    "rank_tol",
    "effective_rank",
    "participation_ratio",
    "stable_rank",
    "pca_id_90",
    "pca_id_95",
    "pca_id_99",
)

# The measures that count components (whole numbers, shown as integers).
COUNTS = ("rank", "pca_id_90", "pca_id_95", "pca_id_99")


def _count(measure: str, x: float | None) -> float | int | None:
    return int(x) if measure in COUNTS and x is not None and np.isfinite(x) else x


class SpectrumResult(Result):
    """Per-layer covariance spectra and the measures derived from them.

    Attributes: ``layers``; ``eigenvalues[layer]`` (descending, as computed — tiny negative
    round-off values are not clamped; ``top`` keeps only the leading ones);
    ``explained_variance_ratio[layer]`` (``λ_i / Σλ⁺``); ``table[layer][metric]`` with
    ``effective_rank`` (Roy & Vetterli 2007: ``exp(−Σ p ln p)``, ``p = σ/Σσ``, ``σ = sqrt(λ⁺)``),
    ``participation_ratio`` ``(Σλ⁺)²/Σ(λ⁺)²``, ``stable_rank`` ``Σλ⁺/λ₁``, ``pca_id_90/95/99``
    (smallest k whose cumulative share reaches the threshold), ``rank`` and ``rank_tol``
    (``λ⁺ = λ`` if ``λ > rank_tol = λ_max·max(n,d)·eps`` else 0), ``total_variance``.
    Measures always use the full spectrum, whatever ``top`` is.
    """

    kind = "spectrum"

    def __init__(
        self,
        layers: list[str],
        eigenvalues: dict[str, np.ndarray],
        explained_variance_ratio: dict[str, np.ndarray],
        table: dict[str, dict[str, float]],
        meta: dict[str, Any] | None = None,
    ) -> None:
        self.layers = list(layers)
        self.eigenvalues = {k: np.asarray(v, dtype=np.float64) for k, v in eigenvalues.items()}
        self.explained_variance_ratio = {
            k: np.asarray(v, dtype=np.float64) for k, v in explained_variance_ratio.items()
        }
        self.table = {k: {m: float(x) for m, x in v.items()} for k, v in table.items()}
        self.meta = dict(meta or {})

    def _fields(self) -> dict[str, Any]:
        return {
            "layers": self.layers,
            "eigenvalues": self.eigenvalues,
            "explained_variance_ratio": self.explained_variance_ratio,
            "table": self.table,
            "meta": self.meta,
        }

    def to_table(self) -> Table:
        """One row per layer, one column per measure (counts as integers)."""
        columns = list(dict.fromkeys(m for layer in self.layers for m in self.table[layer]))
        rows = [[_count(m, self.table[layer].get(m)) for m in columns] for layer in self.layers]
        return Table(self.layers, columns, rows, "layer")

    def to_pandas(self) -> Any:
        """:meth:`to_table` as a pandas DataFrame; needs the ``plot`` extra."""
        return self.to_table().to_pandas()

    def plot(self, ax: Any = None, title: str | None = None) -> Any:
        """Log-log spectra (eigenvalue vs index) per layer; returns the Figure.

        Only the eigenvalues above the layer's rank tolerance (``table[layer]["rank_tol"]``,
        the ones the measures use) are drawn: the others are zeros up to round-off (≈1e-16 of
        the largest), which a log axis would show as a meaningless cliff; they stay in
        ``eigenvalues``."""
        from ..plots import _mpl

        plt = _mpl()
        if ax is None:
            fig, ax = plt.subplots(figsize=(6.5, 4.5))
        else:
            fig = ax.figure
        cmap = plt.get_cmap("viridis")
        nl = max(1, len(self.layers) - 1)
        for i, layer in enumerate(self.layers):
            ev = self.eigenvalues[layer]
            idx = np.arange(1, ev.size + 1)
            keep = ev > max(0.0, self.table.get(layer, {}).get("rank_tol", 0.0))
            ax.loglog(idx[keep], ev[keep], color=cmap(i / nl), label=layer, lw=1.2)
        ax.set_xlabel("component")
        ax.set_ylabel("eigenvalue (variance)")
        ax.set_title(title or "covariance spectra")
        if len(self.layers) <= 16:
            ax.legend(fontsize=7)
        fig.tight_layout()
        return fig

    def __repr__(self) -> str:
        return f"<SpectrumResult {len(self.layers)} layers n={self.meta.get('n', '?')}>"


def spectrum_result(
    spectra: list[dict[str, Any]], layers: list[str], top: int | None, meta: dict[str, Any]
) -> SpectrumResult:
    """The per-layer spectrum dicts of the core as a result (``top`` leading eigenvalues
    kept in the output, all of them in the measures)."""
    ev, evr, table = {}, {}, {}
    for layer, s in zip(layers, spectra):
        e = np.asarray(s["eigenvalues"])
        r = np.asarray(s["explained_variance_ratio"])
        ev[layer] = e[:top] if top is not None else e
        evr[layer] = r[:top] if top is not None else r
        table[layer] = {m: float(s[m]) for m in SPECTRUM_MEASURES}
    return SpectrumResult(layers, ev, evr, table, {**meta, "measure": "spectrum", "top": top})


@validated(layers=LAYERS, top=(None, Int(1)), progress=PROGRESS, options=PLACEMENT)
def spectrum(
    source: Any,
    layers: Sequence[str] | str | None = None,
    top: int | None = None,
    progress: bool = True,
    **run: Unpack[Placement],
) -> SpectrumResult:
    """Per-layer covariance spectra (one pass over the rows).

    ``source``: a store, a path or a dict of arrays; ``layers``: names (default all);
    ``top``: keep only the ``top`` leading eigenvalues in the output (the measures always use
    the full spectrum); ``progress``: ``True`` (a bar), ``False`` or a callable
    ``cb(done, total)``; ``max_memory``, ``backend`` (``"ray"``: each layer's pass cut into
    row-range tasks), ``ray_address``, ``device`` (the passes' block products there): where
    and within what budget it runs, :class:`layerscope.Placement`. See
    :class:`SpectrumResult` for the measures and the rank rule."""
    t, raw, meta = run_measures(source, layers, None, None, spectrum=True, aligns={}, ckas=[],
                                compute="float64", run={**run, "progress": progress})
    return spectrum_result(list(raw["spectra"]), t.names, top, meta)
