"""Spectra and subspace alignment from the one-pass moments.

Every quantity here is a function of the centred cross-products ``C_ij = Σ_a (x_a − x̄)(y_a − ȳ)ᵀ``
accumulated in ONE streaming pass (:func:`layerscope._moments.compute_moments`), so spectra,
alignment and linear CKA can be computed together without reading the data twice
(:func:`analyze`). Formulas, sources and the quantities that coincide are in
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


def _moment_parts(m: Any) -> tuple[np.ndarray, list[int], int, list[str]]:
    """(C as a C-contiguous float64 ``D × D`` array — a zero-copy view of the Moments —,
    widths, n, layer names)."""
    cov = np.ascontiguousarray(m.cov(), dtype=np.float64)
    return cov, [int(d) for d in m.dims], int(m.n), [str(x) for x in m.names]


def _k_args(k: int | str) -> dict[str, Any]:
    if isinstance(k, str):
        if k != "auto":
            raise InvalidArgumentError(f"k must be a positive int or 'auto', got {k!r}")
        return {"variance": 0.99}
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise InvalidArgumentError(f"k must be a positive int or 'auto', got {k!r}")
    return {"k": int(k)}


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
) -> dict[str, Any]:
    cov, dims, n, names = _moment_parts(moments)
    kw: dict[str, Any] = {}
    if align is not None:
        kw = dict(align)
    return _native.moment_measures(
        cov, dims, n, names, spectrum_layers, max_memory=max_memory, **kw
    )


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
    t0 = time.perf_counter()
    moments, meta = _compute_moments(source, layers, None, None, progress, max_memory=budget)
    t1 = time.perf_counter()
    rows, _, names, _ = _split(moments, None)
    out = _measures(moments, rows, None, budget)
    meta = {
        **meta,
        "n": int(moments.n),
        "seconds_pass": t1 - t0,
        "seconds_measures": time.perf_counter() - t1,
    }
    return _spectrum_result(list(out["spectra"]), names, top, meta)


def alignment(
    source: Any,
    other: Any = None,
    *,
    method: str = "subspace",
    k: int | str = 32,
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
    kargs = _k_args(k) if method in ("subspace", "svcca", "pwcca") else {"k": 1}
    t0 = time.perf_counter()
    moments, meta = _compute_moments(
        source, layers, other, other_layers, progress, max_memory=budget
    )
    t1 = time.perf_counter()
    rows, cols, rnames, cnames = _split(moments, other)
    out = _measures(
        moments,
        [],
        {
            "rows": rows,
            "cols": cols,
            "method": method,
            "space": space,
            "ridge_eps": ridge,
            "symmetric": other is None,
            **kargs,
        },
        budget,
    )
    meta = {
        **meta,
        "n": int(moments.n),
        "seconds_pass": t1 - t0,
        "seconds_measures": time.perf_counter() - t1,
    }
    return _alignment_result(out["alignment"], rnames, cnames, method, space, k, ridge, meta)


def analyze(
    source: Any,
    other: Any = None,
    *,
    measures: Sequence[str] = ("cka", "cka_debiased", "spectrum", "alignment"),
    layers: Sequence[str] | str | None = None,
    other_layers: Sequence[str] | str | None = None,
    k: int | str = 32,
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
    t0 = time.perf_counter()
    moments, meta = _compute_moments(
        source, layers, other, other_layers, progress, compute, max_memory=budget
    )
    t1 = time.perf_counter()
    meta = {**meta, "n": int(moments.n), "seconds_pass": t1 - t0}
    rows, cols, rnames, cnames = _split(moments, other)
    out: dict[str, Result] = {}
    for mname in ("cka", "cka_debiased"):
        if mname in measures:
            out[mname] = _cka_result(
                moments, rows, cols, rnames, cnames, debiased=mname == "cka_debiased", meta=meta
            )
    # The eigendecompositions are shared inside one native call: the spectra ride along with
    # the first alignment (or run alone).
    spec_layers = rows + (cols if other is not None else []) if "spectrum" in measures else []
    jobs: list[tuple[str | None, str | None]] = [(a, m) for a, m in aligns.items()]
    jobs = jobs or [(None, None)]
    for key, method in jobs:
        align = None
        if method is not None:
            kargs = _k_args(k) if method in ("subspace", "svcca", "pwcca") else {"k": 1}
            align = {
                "rows": rows,
                "cols": cols,
                "method": method,
                "space": space,
                "ridge_eps": ridge,
                "symmetric": other is None,
                **kargs,
            }
        if align is None and not spec_layers:
            break
        t2 = time.perf_counter()
        res = _measures(moments, spec_layers, align, budget)
        mm = {**meta, "seconds_measures": time.perf_counter() - t2}
        if spec_layers:
            sp = list(res["spectra"])
            out["spectrum"] = _spectrum_result(sp[: len(rows)], rnames, top, mm)
            if other is not None:
                out["spectrum_other"] = _spectrum_result(sp[len(rows) :], cnames, top, mm)
            spec_layers = []
        if key is not None and method is not None:
            out[key] = _alignment_result(
                res["alignment"], rnames, cnames, method, space, k, ridge, mm
            )
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
        "--k", type=_k_cli, default=32, help="kept directions, or 'auto' (99%% variance)"
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
