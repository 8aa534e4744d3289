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

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .._defaults import ALIGN_K, RIDGE
from .._moments import COMPUTE
from .._validate import LAYERS, RUN, Float, Int, OneOf, RunOptions, Strings, validated
from ..results import MatrixResult, Result
from ._passes import run_measures
from .spectrum import spectrum_result

if TYPE_CHECKING:  # Python < 3.11 has no typing.Unpack; the annotations are strings
    from typing_extensions import Unpack

METHODS = ("subspace", "svcca", "pwcca", "cca", "procrustes")
SPACES = ("samples", "features")
#: What :func:`analyze` computes: linear CKA (biased, debiased), the spectra, and alignment
#: by the ``method`` keyword or by a method of its own.
ANALYZE_MEASURES = ("cka", "cka_debiased", "spectrum", "alignment",
                    *(f"alignment:{m}" for m in METHODS))
_VALUE_NAMES = {
    "subspace": "subspace overlap (mean cos²)",
    "svcca": "SVCCA (mean canonical correlation)",
    "pwcca": "PWCCA (projection-weighted mean canonical correlation)",
    "cca": "CCA R² (mean squared canonical correlation)",
    "procrustes": "Procrustes similarity (nuclear norm)",
}


# --------------------------------------------------------------------------- results


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
            from ..errors import MissingLayerError

            raise MissingLayerError(f"no pair ({row!r}, {col!r}) in this result") from None
        return np.asarray(self.extra["cosines"][r][c], dtype=np.float64)

    def plot_cosines(
        self,
        pairs: Sequence[tuple[str, str]] | None = None,
        ax: Any = None,
        title: str | None = None,
    ) -> Any:
        """Per-pair cosine curves (cosine vs index). Default pairs: adjacent layers (one
        source) or each row layer against its best-matching column (two sources; the legend
        names each side by ``meta["sides"]``). Procrustes draws the cumulative sum of its
        normalised singular values, which ends at the table's value for the pair."""
        from ..plots import _mpl

        plt = _mpl()
        sides = self.meta.get("sides")
        if pairs is None:
            if sides is None and self.rows == self.cols:
                pairs = [(self.rows[i], self.rows[i + 1]) for i in range(len(self.rows) - 1)]
            else:
                pairs = [(r, self.cols[int(np.nanargmax(self.values[i]))])
                         for i, r in enumerate(self.rows) if np.isfinite(self.values[i]).any()]
        if ax is None:
            fig, ax = plt.subplots(figsize=(6.5, 4.5))
        else:
            fig = ax.figure
        method = self.meta.get("method", "alignment")
        cumulative = method == "procrustes"
        for r, c in pairs:
            cs = self.cosines(r, c)
            y = np.cumsum(cs) if cumulative else cs
            label = f"{sides[0]}: {r} / {sides[1]}: {c}" if sides else f"{r} / {c}"
            ax.plot(np.arange(1, cs.size + 1), y, lw=1.2, label=label)
        ax.set_xlabel("index")
        if cumulative:
            ax.set_ylabel("cumulative normalised singular value\n(ends at the table's value)")
        else:
            ax.set_ylabel("cosine / canonical correlation")
        ax.set_ylim(0, 1.05)
        ax.set_title(title or f"{method} {'cumulative ' if cumulative else ''}cosines per pair")
        if len(pairs) <= 16:
            ax.legend(fontsize=7)
        fig.tight_layout()
        return fig


# --------------------------------------------------------------------------- moments glue


#: ``k`` of the top-k methods: a number of directions, or "auto" (99 % of the variance).
K = (Int(1), OneOf("auto"))


class AnalyzeOptions(RunOptions, total=False):
    """:func:`analyze`'s keywords for the alignment (``method``, ``space``, ``ridge``), the
    spectra (``top``) and the pass (``compute``), and its :class:`RunOptions`."""

    method: str
    space: str
    ridge: float
    top: int | None
    compute: str


_ANALYZE = RUN.extend(AnalyzeOptions, method=(OneOf(*METHODS), "subspace"),
                      space=(OneOf(*SPACES), "samples"), ridge=(Float(0), RIDGE),
                      top=((None, Int(1)), None), compute=(OneOf(*COMPUTE), "float64"))


def _align_opts(method: str, space: str, k: int | str, ridge: float) -> dict[str, Any]:
    """The options of ``Moments.alignment`` for one alignment method (``k`` only where the
    method keeps top-k subspaces; ``k="auto"``: 99 % of the variance)."""
    if method not in ("subspace", "svcca", "pwcca"):
        kargs: dict[str, Any] = {"k": 1}
    else:
        kargs = {"variance": 0.99} if k == "auto" else {"k": k}
    return {"method": method, "space": space, "ridge_eps": ridge, **kargs}


def alignment_result(
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
        m["row_rank"] = [int(r) for r in a["row_rank"]]
        m["col_rank"] = [int(r) for r in a["col_rank"]]
        m["ridge_rule"] = "r = eps*tr(C_ii)/d_i added to C_ii when n <= d_i or C_ii is singular"
    if method == "pwcca":
        m["pwcca_weights"] = "row layer (values[i, j] weights by rows[i]'s neurons)"
    return AlignmentResult(values, rows, cols, m, extra)


# --------------------------------------------------------------------------- public API


@validated(method=OneOf(*METHODS), k=K, space=OneOf(*SPACES), layers=LAYERS,
           other_layers=LAYERS, ridge=Float(0), options=RUN)
def alignment(
    source: Any,
    other: Any = None,
    *,
    method: str = "subspace",
    k: int | str = ALIGN_K,
    space: str = "samples",
    layers: Sequence[str] | str | None = None,
    other_layers: Sequence[str] | str | None = None,
    ridge: float = RIDGE,
    **run: Unpack[RunOptions],
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
    of a layer's features, unlike per-token cosine similarity. ``run``: ``progress``,
    ``max_memory``, ``backend`` (``"ray"``: the passes cut into row-range tasks),
    ``ray_address``, ``device`` (the passes' block products there), see
    :class:`layerscope.RunOptions`."""
    opts = _align_opts(method, space, k, ridge)
    t, raw, meta = run_measures(source, layers, other, other_layers, spectrum=False,
                                aligns={"alignment": opts}, ckas=[], compute="float64",
                                run=run)
    rn, cn = [t.names[i] for i in t.rows], [t.names[i] for i in t.cols]
    return alignment_result(raw["alignment"], rn, cn, method, space, k, ridge, meta)


@validated(measures=Strings(options=ANALYZE_MEASURES), layers=LAYERS, other_layers=LAYERS,
           k=K, options=_ANALYZE)
def analyze(
    source: Any,
    other: Any = None,
    *,
    measures: Sequence[str] = ("cka", "cka_debiased", "spectrum", "alignment"),
    layers: Sequence[str] | str | None = None,
    other_layers: Sequence[str] | str | None = None,
    k: int | str = ALIGN_K,
    **kw: Unpack[AnalyzeOptions],
) -> dict[str, Result]:
    """CKA, spectra and alignment from ONE pass over the data (a single moment accumulation).

    ``measures``: any of ``"cka"`` (biased linear CKA), ``"cka_debiased"``, ``"spectrum"``
    (of the ``source`` layers; with ``other``, also ``"spectrum_other"``), ``"alignment"``
    (with ``method``/``space`` from the keywords) and ``"alignment:<method>"`` for further
    methods from the same pass (e.g. ``["alignment", "alignment:procrustes",
    "alignment:svcca"]``). Extra keywords go to the alignment (``method``, ``space``,
    ``ridge``) and spectrum (``top``); ``compute="float32"`` runs the pass with float32
    block products (see :func:`layerscope.cka`); the other keywords (``progress``,
    ``max_memory``, ``backend``, ``ray_address``, ``device``): as in :func:`alignment`. All
    arguments are checked before the pass (:class:`AnalyzeOptions`).
    Returns ``{measure: Result}`` keyed by the strings of ``measures``."""
    compute, space, ridge, top = kw["compute"], kw["space"], kw["ridge"], kw["top"]
    run: RunOptions = {name: kw[name] for name in RUN.options}  # type: ignore[misc]
    aligns: dict[str, str] = {}  # measure key -> method
    for mname in measures:
        if mname == "alignment":
            aligns[mname] = kw["method"]
        elif mname.startswith("alignment:"):
            aligns[mname] = mname.split(":", 1)[1]
    opts = {key: _align_opts(method, space, k, ridge) for key, method in aligns.items()}
    ckas = [deb for name, deb in (("cka", False), ("cka_debiased", True)) if name in measures]
    t, raw, meta = run_measures(source, layers, other, other_layers,
                                spectrum="spectrum" in measures, aligns=opts, ckas=ckas,
                                compute=compute, run=run)
    rn, cn = [t.names[i] for i in t.rows], [t.names[i] for i in t.cols]
    out: dict[str, Result] = {}
    for mname, deb in (("cka", False), ("cka_debiased", True)):
        if mname in measures:
            out[mname] = cka_table(raw[("cka", deb)], rn, cn, debiased=deb, meta=meta)
    if "spectrum" in measures:
        sp = list(raw["spectra"])
        out["spectrum"] = spectrum_result(sp[: len(t.rows)], rn, top, meta)
        if other is not None:
            out["spectrum_other"] = spectrum_result(sp[len(t.rows):], cn, top, meta)
    for key, method in aligns.items():
        out[key] = alignment_result(raw[key], rn, cn, method, space, k, ridge, meta)
    return out


def cka_table(
    vals: np.ndarray, rnames: list[str], cnames: list[str], *, debiased: bool,
    meta: dict[str, Any],
) -> MatrixResult:
    """A linear CKA table as a result (the meta every linear CKA from moments records)."""
    est = "linear, debiased" if debiased else "linear"
    return MatrixResult(
        vals, rnames, cnames, {**meta, "measure": "CKA", "estimator": est, "debiased": debiased}
    )

