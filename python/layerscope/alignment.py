"""Spectra and subspace alignment from the one-pass moments.

Every quantity here is a function of the centred cross-products ``C_ij = Σ_a (x_a − x̄)(y_a − ȳ)ᵀ``
accumulated in ONE streaming pass (:func:`layerscope._moments.compute_moments`), so spectra,
alignment and linear CKA can be computed together without reading the data twice
(:func:`analyze`). Spectra alone run one pass per layer (each layer read once, no
cross blocks computed). When one pass over every selected layer (and the eigendecompositions
held with it) does not fit the memory budget, alignment and ``analyze`` run in layer tiles
(unions of two layer groups, one pass each; see :func:`layerscope._moments.measure_tiles`),
with the same sums and so the same answers;
``meta["plan"]`` records the strategy, passes, peak bytes, bytes read and FLOPs. Formulas, sources and the quantities that coincide are in
``docs/alignment.md``; in short, with ``C_ii = V_i Λ_i V_iᵀ`` and ``Σ_i = Λ_i^{1/2}``:

* spectrum: eigenvalues of ``C_ii/(n−1)``; effective rank (Roy & Vetterli 2007, on singular
  values), participation ratio ``(Σλ)²/Σλ²``, stable rank ``Σλ/λ₁``, PCA-ID at 90/95/99 %;
* ``method="subspace"``, ``space="samples"``: cosines of the principal angles between the
  top-k left singular subspaces of the centred activations = singular values of
  ``Σ_i⁻¹ V_iᵀ C_ij V_j Σ_j⁻¹`` (top-k blocks); ``space="features"``: of ``V_iᵀ V_j``;
* ``"svcca"`` (Raghu et al. 2017): CCA of the top-k PCA subspaces; its canonical correlations
  *are* the sample-space principal cosines of the kept subspaces (value: their mean);
* ``"pwcca"`` (Morcos et al. 2018): the same correlations weighted by the projection of the row
  layer's centred neurons on its canonical variates;
* ``"cca"``: mean squared canonical correlation of the full layers (ridge when singular);
* ``"procrustes"``: ``‖C_ij‖_* / sqrt(tr C_ii tr C_jj)`` and the angular distance
  ``arccos`` of it (Williams et al. 2021).

Quantities that coincide (each shown by a test in ``tests/test_alignment.py``):

* SVCCA's canonical correlations = the ``space="samples"`` principal cosines of the kept
  top-k subspaces (the reduced data ``X̃_i V_i[:, :k]`` spans exactly the top-k left singular
  subspace; CCA between two spans is their principal angles, Björck & Golub 1973);
* with full-rank layers of equal width ``d`` and no ridge, the CCA canonical correlations =
  the sample-space principal cosines at ``k = d``, so CCA R² = subspace overlap at ``k = d``;
* PWCCA with uniform weights is SVCCA (``extra["mean_cca"]`` is that unweighted mean);
* the Procrustes similarity = the sum of the per-pair "cosines" (normalised singular values
  of ``C_ij``), and ``1 − similarity = ‖A R* − B‖_F² / 2`` for the Frobenius-normalised
  centred data (``scipy.linalg.orthogonal_procrustes``).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import _native
from ._memory import add_max_memory_arg, max_memory_bytes
from .errors import InvalidArgumentError
from .results import MatrixResult, Result

METHODS = ("subspace", "svcca", "pwcca", "cca", "procrustes")
SPACES = ("samples", "features")
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
_VALUE_NAMES = {
    "subspace": "subspace overlap (mean cos²)",
    "svcca": "SVCCA (mean canonical correlation)",
    "pwcca": "PWCCA (projection-weighted mean canonical correlation)",
    "cca": "CCA R² (mean squared canonical correlation)",
    "procrustes": "Procrustes similarity (nuclear norm)",
}


# --------------------------------------------------------------------------- results


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

    def to_pandas(self) -> Any:
        """One row per layer, one column per measure."""
        import pandas as pd

        return pd.DataFrame([self.table[layer] for layer in self.layers], index=self.layers)

    def plot(self, ax: Any = None, title: str | None = None) -> Any:
        """Log-log spectra (eigenvalue vs index) per layer; returns the Figure.

        Only the eigenvalues above the layer's rank tolerance (``table[layer]["rank_tol"]``,
        the ones the measures use) are drawn: the others are zeros up to round-off (≈1e-16 of
        the largest), which a log axis would show as a meaningless cliff; they stay in
        ``eigenvalues``."""
        from .plots import _mpl

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


class AlignmentResult(MatrixResult):
    """Layer × layer alignment (``values``) plus every pair's principal cosines or canonical
    correlations (``cosines(row, col)``) and per-method extras in ``extra`` (``grassmann``:
    ``sqrt(Σθ²)`` for subspace/SVCCA; ``distance``: Procrustes angular distance;
    ``mean_cca``: the unweighted mean for PWCCA)."""

    kind = "alignment"

    def cosines(self, row: str, col: str) -> np.ndarray:
        """All principal cosines (canonical correlations; for Procrustes the normalised singular
        values of ``C_ij``) of the pair, descending, as computed."""
        try:
            r, c = self.rows.index(row), self.cols.index(col)
        except ValueError:
            from .errors import MissingLayerError

            raise MissingLayerError(f"no pair ({row!r}, {col!r}) in this result") from None
        return np.asarray(self.extra["cosines"][r][c], dtype=np.float64)

    def plot_cosines(
        self,
        pairs: Sequence[tuple[str, str]] | None = None,
        ax: Any = None,
        title: str | None = None,
    ) -> Any:
        """Per-pair cosine curves (cosine vs index). Default pairs: adjacent layers (square
        results) or each row layer against its best-matching column."""
        from .plots import _mpl

        plt = _mpl()
        if pairs is None:
            if self.rows == self.cols:
                pairs = [(self.rows[i], self.rows[i + 1]) for i in range(len(self.rows) - 1)]
            else:
                pairs = [
                    (r, self.cols[int(np.nanargmax(self.values[i]))])
                    for i, r in enumerate(self.rows)
                ]
        if ax is None:
            fig, ax = plt.subplots(figsize=(6.5, 4.5))
        else:
            fig = ax.figure
        for r, c in pairs:
            cs = self.cosines(r, c)
            ax.plot(np.arange(1, cs.size + 1), cs, lw=1.2, label=f"{r} / {c}")
        ax.set_xlabel("index")
        ax.set_ylabel("cosine / canonical correlation")
        ax.set_ylim(0, 1.05)
        ax.set_title(title or f"{self.meta.get('method', 'alignment')} cosines per pair")
        if len(pairs) <= 16:
            ax.legend(fontsize=7)
        fig.tight_layout()
        return fig


# --------------------------------------------------------------------------- moments glue


def _k_args(k: int | str) -> dict[str, Any]:
    if isinstance(k, str):
        if k != "auto":
            raise InvalidArgumentError(f"k must be a positive int or 'auto', got {k!r}")
        return {"variance": 0.99}
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise InvalidArgumentError(f"k must be a positive int or 'auto', got {k!r}")
    return {"k": int(k)}


def _align_opts(method: str, space: str, k: int | str, ridge: float) -> dict[str, Any]:
    """The options of ``Moments.alignment`` for one alignment method (``k`` only where the
    method keeps top-k subspaces)."""
    kargs = _k_args(k) if method in ("subspace", "svcca", "pwcca") else {"k": 1}
    return {"method": method, "space": space, "ridge_eps": ridge, **kargs}


def _check_method(method: str, space: str) -> None:
    if method not in METHODS:
        raise InvalidArgumentError(f"method must be one of {METHODS}, got {method!r}")
    if space not in SPACES:
        raise InvalidArgumentError(f"space must be one of {SPACES}, got {space!r}")


def _spectrum_result(
    spectra: list[dict[str, Any]], layers: list[str], top: int | None, meta: dict[str, Any]
) -> SpectrumResult:
    if top is not None and (isinstance(top, bool) or int(top) < 1):
        raise InvalidArgumentError(f"top must be a positive int, got {top!r}")
    ev, evr, table = {}, {}, {}
    for layer, s in zip(layers, spectra):
        e = np.asarray(s["eigenvalues"])
        r = np.asarray(s["explained_variance_ratio"])
        ev[layer] = e[:top] if top is not None else e
        evr[layer] = r[:top] if top is not None else r
        table[layer] = {m: float(s[m]) for m in SPECTRUM_MEASURES}
    return SpectrumResult(layers, ev, evr, table, {**meta, "measure": "spectrum", "top": top})


def _alignment_result(
    a: dict[str, Any],
    rows: list[str],
    cols: list[str],
    method: str,
    space: str,
    k: int | str,
    ridge: float,
    meta: dict[str, Any],
) -> AlignmentResult:
    nr, nc = int(a["nrows"]), int(a["ncols"])
    values = np.asarray(a["values"]).reshape(nr, nc)
    cos = list(a["cosines"])
    extra: dict[str, Any] = {
        "cosines": [[np.asarray(cos[r * nc + c]) for c in range(nc)] for r in range(nr)],
    }
    for name, v in dict(a["extras"]).items():
        extra[name] = np.asarray(v).reshape(nr, nc)
    m = {
        **meta,
        "measure": _VALUE_NAMES[method],
        "method": method,
        "estimator": method,
        "k": k,
    }
    if method == "subspace":
        m["space"] = space
        m["estimator"] = f"subspace/{space}"
    if method in ("subspace", "svcca", "pwcca"):
        m["row_k"] = list(a["row_k"])
        m["col_k"] = list(a["col_k"])
    if method == "cca":
        m["ridge_eps"] = ridge
        m["row_ridge"] = list(a["row_ridge"])
        m["col_ridge"] = list(a["col_ridge"])
        m["ridge_rule"] = "r = eps*tr(C_ii)/d_i added to C_ii when n <= d_i or C_ii is singular"
    if method == "pwcca":
        m["pwcca_weights"] = "row layer (values[i, j] weights by rows[i]'s neurons)"
    return AlignmentResult(values, rows, cols, m, extra)


def _measures(
    moments: Any,
    spectrum_layers: list[int],
    align: dict[str, Any] | None,
    max_memory: int | None = None,
    pca_threshold: float | None = None,
) -> dict[str, Any]:
    """Spectra of ``spectrum_layers`` (with ``pca_id`` at ``pca_threshold`` when given) and,
    when ``align`` (rows, cols and the options of ``Moments.alignment``) is given, the
    alignment: both computed in Rust on the moments (``{"spectra": [...], "alignment": dict
    | None}``)."""
    if align is None:
        return {"spectra": moments.spectrum(spectrum_layers, max_memory=max_memory,
                                            pca_threshold=pca_threshold),
                "alignment": None}
    return dict(moments.alignment(spectrum_layers=spectrum_layers, max_memory=max_memory,
                                  **align))


def _compute_moments(
    source: Any,
    layers: Any,
    other: Any,
    other_layers: Any,
    progress: bool,
    compute: str = "float64",
    max_memory: int | None = None,
) -> tuple[Any, dict[str, Any]]:
    from ._moments import compute_moments

    return compute_moments(
        source, layers, other, other_layers, progress=progress, compute=compute,
        max_memory=max_memory,
    )


def _split(moments: Any, other: Any) -> tuple[list[int], list[int], list[str], list[str]]:
    """Row/col layer indices and names inside the moments (``other``'s layers come after
    ``source``'s: ``num_a`` then ``num_b``)."""
    names = [str(x) for x in moments.names]
    na = int(moments.num_a) if other is not None else len(names)
    rows = list(range(na))
    cols = list(range(na, len(names))) if other is not None else rows
    return rows, cols, [names[i] for i in rows], [names[i] for i in cols]


class _Tiles:
    """Moment measures over the passes of :func:`layerscope._moments.measure_tiles`: one
    pass when every selected layer fits at once, else tiles of layers (spectra: groups;
    alignment and linear CKA: unions of two groups, so every pair meets in some tile). Each
    tile's moments serve every measure asked of the layers and pairs it holds; the tables
    are assembled from the tiles (each layer and pair taken from the first tile that has
    it: the same sums, so the same numbers as one pass, to rounding)."""

    def __init__(
        self, source: Any, layers: Any, other: Any, other_layers: Any, *, pairs: bool,
        compute: str, budget: int | None, progress: Any,
    ) -> None:
        from ._moments import _itemsize, measure_tiles, resolve_compute
        from ._source import check_comparable, resolve

        self.a = resolve(source)
        self.la = self.a.select(layers)
        self.b = None
        self.lb: list[str] = []
        if other is not None:
            self.b = resolve(other)
            self.lb = self.b.select(other_layers)
            check_comparable(self.a, self.b)
        parts = [(self.a, self.la)] + ([(self.b, self.lb)] if self.b is not None else [])
        self.num_a = len(self.la)
        self.names = self.la + self.lb
        self.dims = [src.dims[x] for src, ls in parts for x in ls]
        self.item = [_itemsize(src, x) for src, ls in parts for x in ls]
        self.n = int(self.a.num_rows)
        self.compute = resolve_compute(compute, parts)
        self.budget = budget
        self.progress = progress
        if self.n == 0:
            raise InvalidArgumentError("the source has no rows")
        self.strategy, self.tiles, self.peak = measure_tiles(
            self.dims, self.num_a, self.n, self.compute, budget,
            "alignment" if pairs else "spectrum")

    def run(self, each: Any) -> dict[str, Any]:
        """``each(tile, moments, local)`` for every tile (``local``: global layer index →
        index inside the tile's moments); returns the meta of all passes."""
        from ._moments import compute_moments
        from ._progress import PassProgress

        t0 = time.perf_counter()
        metas: list[dict[str, Any]] = []
        with PassProgress(self.progress, "moments", len(self.tiles)) as prog:
            for p, tile in enumerate(self.tiles):
                ta = [self.names[i] for i in tile if i < self.num_a]
                tb = [self.names[i] for i in tile if i >= self.num_a]
                # a tile of second-source layers only (their spectra) reads that source
                first, fl, second, sl = ((self.a, ta, self.b if tb else None, tb or None)
                                         if ta else (self.b, tb, None, None))
                m, meta = compute_moments(
                    first, fl, second, sl, progress=prog.pass_cb(p) or False,
                    max_memory=self.budget, compute=self.compute)
                each(tile, m, {g: k for k, g in enumerate(tile)})
                metas.append(meta)
        meta = dict(metas[0])
        meta["shift_offset"] = max(float(x["shift_offset"]) for x in metas)
        bad: dict[str, int] = {}
        for x in metas:
            bad.update(x.get("nonfinite_rows", {}))
        if bad:
            meta["nonfinite_rows"] = bad
        selected = sum(self.n * d * s for d, s in zip(self.dims, self.item))
        meta.update(passes=len(self.tiles), seconds_pass=time.perf_counter() - t0)
        meta["plan"] = {
            "strategy": self.strategy, "passes": len(self.tiles), "peak_bytes": self.peak,
            "bytes_read": sum(int(x["plan"]["bytes_read"]) for x in metas),
            "bytes_selected": selected,
            "flops": sum(int(x["plan"]["flops"]) for x in metas),
            "block_rows": max(int(x["block_rows"]) for x in metas),
        }
        if self.strategy != "single-pass":
            meta["plan"]["tiles"] = [[self.names[i] for i in t] for t in self.tiles]
        return meta

    # Index helpers: rows are the first source's layers; cols the second's (or the same).
    @property
    def rows(self) -> list[int]:
        return list(range(self.num_a))

    @property
    def cols(self) -> list[int]:
        return list(range(self.num_a, len(self.names))) if self.b is not None else self.rows


class _Table:
    """A rows × cols table filled from tiles (first tile to hold a pair wins)."""

    def __init__(self, rows: list[int], cols: list[int]) -> None:
        self.rows, self.cols = rows, cols
        self.ri = {g: r for r, g in enumerate(rows)}
        self.ci = {g: c for c, g in enumerate(cols)}
        self.done = np.zeros((len(rows), len(cols)), dtype=bool)

    def local(self, tile: list[int], local: dict[int, int]) -> tuple[list[int], list[int]]:
        """The tile's row and col layers (tile-local indices)."""
        return ([local[g] for g in tile if g in self.ri],
                [local[g] for g in tile if g in self.ci])

    def cells(self, tile: list[int]) -> list[tuple[int, int, int, int]]:
        """``(r, c, i, j)``: new table cells of this tile, with their positions inside the
        tile's rows × cols block; marks them done."""
        tr = [g for g in tile if g in self.ri]
        tc = [g for g in tile if g in self.ci]
        out = []
        for i, gr in enumerate(tr):
            for j, gc in enumerate(tc):
                r, c = self.ri[gr], self.ci[gc]
                if not self.done[r, c]:
                    self.done[r, c] = True
                    out.append((r, c, i, j))
        return out


def _assemble_alignment(nr: int, nc: int) -> dict[str, Any]:
    return {"nrows": nr, "ncols": nc, "values": np.full(nr * nc, np.nan),
            "cosines": [np.empty(0)] * (nr * nc), "extras": {}, "row_k": [0] * nr,
            "col_k": [0] * nc, "row_ridge": [0.0] * nr, "col_ridge": [0.0] * nc}


def _put_alignment(
    dst: dict[str, Any], src: dict[str, Any], cells: list[tuple[int, int, int, int]],
) -> None:
    """Copy a tile's alignment cells (tile-local ``i, j``) into the assembled table."""
    nc, tnc = dst["ncols"], int(src["ncols"])
    vals = np.asarray(src["values"])
    cos = list(src["cosines"])
    ex = {name: np.asarray(v) for name, v in dict(src["extras"]).items()}
    for name in ex:
        dst["extras"].setdefault(name, np.full(dst["nrows"] * nc, np.nan))
    for r, c, i, j in cells:
        dst["values"][r * nc + c] = vals[i * tnc + j]
        dst["cosines"][r * nc + c] = cos[i * tnc + j]
        for name, v in ex.items():
            dst["extras"][name][r * nc + c] = v[i * tnc + j]
        dst["row_k"][r] = int(src["row_k"][i])
        dst["col_k"][c] = int(src["col_k"][j])
        dst["row_ridge"][r] = float(src["row_ridge"][i])
        dst["col_ridge"][c] = float(src["col_ridge"][j])


def _run_measures(
    source: Any, layers: Any, other: Any, other_layers: Any, *, spectrum: bool,
    aligns: dict[str, dict[str, Any]], ckas: list[bool], compute: str, budget: int | None,
    progress: Any, pca_threshold: float | None = None,
) -> tuple[_Tiles, dict[str, Any], dict[str, Any]]:
    """Spectra (of every selected layer when ``spectrum``), the alignments ``aligns``
    (key → options of ``Moments.alignment``, without rows/cols) and linear CKA (``ckas``: the
    ``debiased`` flags) from the passes of one plan; returns ``(tiles, raw results, meta)``
    with ``raw["spectra"]`` (per layer, in order), ``raw[key]`` (alignment dicts as
    ``Moments.alignment`` returns them) and ``raw[("cka", debiased)]`` (rows × cols arrays)."""
    pairs = bool(aligns or ckas)
    t = _Tiles(source, layers, other, other_layers, pairs=pairs, compute=compute,
               budget=budget, progress=progress)
    rows, cols = t.rows, t.cols
    nr, nc = len(rows), len(cols)
    raw: dict[str, Any] = {}
    spectra: list[Any] = [None] * len(t.names)
    tables = {key: _Table(rows, cols) for key in aligns}
    for key in aligns:
        raw[key] = _assemble_alignment(nr, nc)
    cka_tab = _Table(rows, cols)
    for deb in ckas:
        raw[("cka", deb)] = np.full((nr, nc), np.nan)
    seconds = {"measures": 0.0}

    def each(tile: list[int], m: Any, local: dict[int, int]) -> None:
        t2 = time.perf_counter()
        spec = [g for g in tile if spectrum and spectra[g] is None]
        jobs: list[tuple[str | None, dict[str, Any] | None]] = list(aligns.items()) or [
            (None, None)]
        for key, opts in jobs:
            align = None
            if key is not None and opts is not None:
                lr, lc = tables[key].local(tile, local)
                if not lr or not lc:
                    continue
                align = {"rows": lr, "cols": lc, **opts,
                         "symmetric": other is None}
            if align is None and not spec:
                continue
            res = _measures(m, [local[g] for g in spec], align, budget,
                            pca_threshold if align is None else None)
            for g, sp in zip(spec, list(res["spectra"])):
                spectra[g] = sp
            spec = []
            if key is not None:
                _put_alignment(raw[key], res["alignment"], tables[key].cells(tile))
        if ckas:
            lr, lc = cka_tab.local(tile, local)
            cells = cka_tab.cells(tile) if lr and lc else []
            for deb in ckas:
                if cells:
                    v = np.asarray(m.cka(lr, lc, debiased=deb), dtype=np.float64)
                    v = v.reshape(len(lr), len(lc))
                    for r, c, i, j in cells:
                        raw[("cka", deb)][r, c] = v[i, j]
        seconds["measures"] += time.perf_counter() - t2

    meta = t.run(each)
    meta["seconds_pass"] -= seconds["measures"]
    meta["seconds_measures"] = seconds["measures"]
    raw["spectra"] = spectra
    return t, raw, meta


# --------------------------------------------------------------------------- public API


def spectrum(
    source: Any,
    layers: Sequence[str] | str | None = None,
    top: int | None = None,
    progress: bool = True,
    *,
    max_memory: int | str | None = None,
) -> SpectrumResult:
    """Per-layer covariance spectra (one pass over the rows).

    ``source``: a store, a path or a dict of arrays; ``layers``: names (default all);
    ``top``: keep only the ``top`` leading eigenvalues in the output (the measures always use
    the full spectrum); ``max_memory``: the memory budget (bytes or ``"4G"``; default
    ``LAYERSCOPE_MAX_MEMORY`` or 0.8 × the machine's available memory, see
    :func:`layerscope.memory_budget`). See :class:`SpectrumResult` for the measures and the
    rank rule."""
    budget = max_memory_bytes(max_memory)
    t, raw, meta = _run_measures(source, layers, None, None, spectrum=True, aligns={}, ckas=[],
                                 compute="float64", budget=budget, progress=progress)
    return _spectrum_result(list(raw["spectra"]), t.names, top, meta)


def alignment(
    source: Any,
    other: Any = None,
    *,
    method: str = "subspace",
    k: int | str = _native.DEFAULT_ALIGN_K,
    space: str = "samples",
    layers: Sequence[str] | str | None = None,
    other_layers: Sequence[str] | str | None = None,
    ridge: float = 1e-4,
    progress: bool = True,
    max_memory: int | str | None = None,
) -> AlignmentResult:
    """Alignment of every layer pair (rows = ``source`` layers, cols = ``other`` layers or the
    same layers), from one pass of moments.

    ``method``: ``"subspace"`` (principal angles between top-k PCA subspaces; value = mean
    cos², ``extra["grassmann"]`` = ``sqrt(Σθ²)``), ``"svcca"`` (Raghu et al. 2017; value = mean
    canonical correlation of the top-k — or, ``k="auto"``, 99 %-variance — PCA subspaces; these
    correlations equal the ``space="samples"`` principal cosines), ``"pwcca"`` (Morcos et al.
    2018; weights from the row layer), ``"cca"`` (mean R² of the full layers, ridge
    ``ridge·tr(C)/d`` when ``n ≤ d`` or ``C`` is singular, recorded in ``meta``),
    ``"procrustes"`` (``‖C_ij‖_*/sqrt(tr C_ii tr C_jj)``; ``extra["distance"]`` = arccos).
    ``space``: ``"samples"`` (token space; any widths) or ``"features"`` (equal widths).
    ``k`` larger than a layer's numerical rank raises :class:`InvalidArgumentError` naming the
    layer and its rank (no silent truncation; ``k="auto"`` never exceeds it).

    Coinciding quantities (tested): ``svcca`` cosines = ``subspace``/``samples`` cosines at
    the same ``k``; ``pwcca``'s ``extra["mean_cca"]`` = the ``svcca`` value; ``cca`` R² of
    full-rank equal-width layers = ``subspace`` overlap at ``k = d``; the ``procrustes``
    value = the sum of its cosines. ``space="samples"`` measures how much two layers share the
    same *token* directions (xKV's cross-layer SVD); it is invariant to any invertible mixing
    of a layer's features, unlike per-token cosine similarity. ``max_memory``: the memory
    budget, as in :func:`spectrum`."""
    _check_method(method, space)
    budget = max_memory_bytes(max_memory)
    opts = _align_opts(method, space, k, ridge)
    t, raw, meta = _run_measures(source, layers, other, other_layers, spectrum=False,
                                 aligns={"alignment": opts}, ckas=[], compute="float64",
                                 budget=budget, progress=progress)
    rn, cn = [t.names[i] for i in t.rows], [t.names[i] for i in t.cols]
    return _alignment_result(raw["alignment"], rn, cn, method, space, k, ridge, meta)


def analyze(
    source: Any,
    other: Any = None,
    *,
    measures: Sequence[str] = ("cka", "cka_debiased", "spectrum", "alignment"),
    layers: Sequence[str] | str | None = None,
    other_layers: Sequence[str] | str | None = None,
    k: int | str = _native.DEFAULT_ALIGN_K,
    progress: bool = True,
    max_memory: int | str | None = None,
    **kw: Any,
) -> dict[str, Result]:
    """CKA, spectra and alignment from ONE pass over the data (a single moment accumulation).

    ``measures``: any of ``"cka"`` (biased linear CKA), ``"cka_debiased"``, ``"spectrum"``
    (of the ``source`` layers; with ``other``, also ``"spectrum_other"``), ``"alignment"``
    (with ``method``/``space`` from the keywords) and ``"alignment:<method>"`` for further
    methods from the same pass (e.g. ``["alignment", "alignment:procrustes",
    "alignment:svcca"]``). Extra keywords go to the alignment (``method``, ``space``,
    ``ridge``) and spectrum (``top``); ``compute="float32"`` runs the pass with float32
    block products (see :func:`layerscope.cka`); ``max_memory``: the memory budget, as in
    :func:`spectrum`. All arguments are checked before the pass.
    Returns ``{measure: Result}`` keyed by the strings of ``measures``."""
    budget = max_memory_bytes(max_memory)
    bad = set(kw) - {"method", "space", "ridge", "top", "compute"}
    if bad:
        raise InvalidArgumentError(f"unknown keyword(s) {sorted(bad)}")
    from ._moments import check_compute

    compute = check_compute(kw.get("compute", "float64"))
    space = kw.get("space", "samples")
    ridge = float(kw.get("ridge", 1e-4))
    top = kw.get("top")
    if top is not None and (
        isinstance(top, bool) or not isinstance(top, (int, np.integer)) or top < 1
    ):
        raise InvalidArgumentError(f"top must be a positive int, got {top!r}")
    aligns: dict[str, str] = {}  # measure key -> method
    for mname in measures:
        if mname in ("cka", "cka_debiased", "spectrum"):
            continue
        if mname == "alignment":
            aligns[mname] = kw.get("method", "subspace")
        elif mname.startswith("alignment:"):
            aligns[mname] = mname.split(":", 1)[1]
        else:
            raise InvalidArgumentError(
                f"unknown measure {mname!r}; choose from 'cka', 'cka_debiased', 'spectrum', "
                f"'alignment', 'alignment:<method>' with method in {METHODS}"
            )
    for method in aligns.values():
        _check_method(method, space)
        if method in ("subspace", "svcca", "pwcca"):
            _k_args(k)
    opts = {key: _align_opts(method, space, k, ridge) for key, method in aligns.items()}
    ckas = [deb for name, deb in (("cka", False), ("cka_debiased", True)) if name in measures]
    t, raw, meta = _run_measures(source, layers, other, other_layers,
                                 spectrum="spectrum" in measures, aligns=opts, ckas=ckas,
                                 compute=compute, budget=budget, progress=progress)
    rn, cn = [t.names[i] for i in t.rows], [t.names[i] for i in t.cols]
    out: dict[str, Result] = {}
    for mname, deb in (("cka", False), ("cka_debiased", True)):
        if mname in measures:
            out[mname] = _cka_table(raw[("cka", deb)], rn, cn, debiased=deb, meta=meta)
    if "spectrum" in measures:
        sp = list(raw["spectra"])
        out["spectrum"] = _spectrum_result(sp[: len(t.rows)], rn, top, meta)
        if other is not None:
            out["spectrum_other"] = _spectrum_result(sp[len(t.rows):], cn, top, meta)
    for key, method in aligns.items():
        out[key] = _alignment_result(raw[key], rn, cn, method, space, k, ridge, meta)
    return out


def _cka_result(
    moments: Any,
    rows: list[int],
    cols: list[int],
    rnames: list[str],
    cnames: list[str],
    *,
    debiased: bool,
    meta: dict[str, Any],
) -> MatrixResult:
    """Linear CKA table from the same moments (H2a's ``Moments.cka``)."""
    vals = np.asarray(moments.cka(rows, cols, debiased=debiased), dtype=np.float64)
    vals = vals.reshape(len(rows), len(cols))
    return _cka_table(vals, rnames, cnames, debiased=debiased, meta=meta)


def _cka_table(
    vals: np.ndarray, rnames: list[str], cnames: list[str], *, debiased: bool,
    meta: dict[str, Any],
) -> MatrixResult:
    """A linear CKA table as a result (the meta every linear CKA from moments records)."""
    est = "linear, debiased" if debiased else "linear"
    return MatrixResult(
        vals, rnames, cnames, {**meta, "measure": "CKA", "estimator": est, "debiased": debiased}
    )


# --------------------------------------------------------------------------- CLI


def _k_cli(s: str) -> int | str:
    return s if s == "auto" else int(s)


def add_cli(sub: Any) -> None:
    """``layerscope align STORE [OTHER] ...`` and ``layerscope spectrum STORE ...``."""
    p = sub.add_parser(
        "align",
        help="subspace alignment (principal angles, SVCCA, PWCCA, CCA, "
        "Procrustes) for all layer pairs, one pass",
    )
    p.add_argument("store")
    p.add_argument("other", nargs="?", default=None)
    p.add_argument("--method", default="subspace", choices=list(METHODS))
    p.add_argument(
        "--k", type=_k_cli, default=_native.DEFAULT_ALIGN_K, help="kept directions, or 'auto' (99%% variance)"
    )
    p.add_argument("--space", default="samples", choices=list(SPACES))
    p.add_argument("--ridge", type=float, default=1e-4, help="CCA ridge eps (·tr(C)/d)")
    p.add_argument("--layers", nargs="+", default=None)
    p.add_argument("--other-layers", nargs="+", default=None)
    p.add_argument("--out", default=None, help="write the result as JSON")
    p.add_argument("--plot", default=None, help="write the overlap heatmap (png/pdf/svg)")
    p.add_argument(
        "--plot-cosines", default=None, help="write per-pair cosine curves (png/pdf/svg)"
    )
    add_max_memory_arg(p)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_align)

    q = sub.add_parser("spectrum", help="per-layer covariance spectra, effective rank, PCA-ID")
    q.add_argument("store")
    q.add_argument("--layers", nargs="+", default=None)
    q.add_argument("--top", type=int, default=None)
    q.add_argument("--out", default=None, help="write the result as JSON")
    q.add_argument("--plot", default=None, help="write the log-log spectra (png/pdf/svg)")
    add_max_memory_arg(q)
    q.add_argument("--quiet", action="store_true")
    q.set_defaults(func=_cmd_spectrum)


def _cmd_align(args: argparse.Namespace) -> int:
    res = alignment(
        args.store,
        args.other,
        method=args.method,
        k=args.k,
        space=args.space,
        layers=args.layers,
        other_layers=args.other_layers,
        ridge=args.ridge,
        progress=not args.quiet,
        max_memory=args.max_memory,
    )
    print(res.to_pandas().round(3).to_string())
    if args.out:
        res.save(args.out)
    if args.plot:
        res.plot().savefig(args.plot)
    if args.plot_cosines:
        res.plot_cosines().savefig(args.plot_cosines)
    return 0


def _cmd_spectrum(args: argparse.Namespace) -> int:
    res = spectrum(
        args.store, layers=args.layers, top=args.top, progress=not args.quiet,
        max_memory=args.max_memory,
    )
    print(res.to_pandas().round(3).to_string())
    if args.out:
        res.save(args.out)
    if args.plot:
        res.plot().savefig(args.plot)
    return 0
