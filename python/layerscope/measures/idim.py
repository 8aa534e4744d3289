"""Intrinsic dimension and neighbourhood measures on a seeded sample of rows.

All three functions sample rows the same way — ``numpy.random.default_rng(seed).choice(n,
size=sample, replace=False)`` sorted (all rows when ``sample`` is None or ``>= n``) — and record
the seed, the number of rows and a hash of the indices in ``meta``. The neighbour engine
(Rust) finds exact k nearest neighbours: GEMM candidate lists on centred data, then the kept
candidates' distances recomputed exactly in f64 from the coordinates.

* :func:`intrinsic_dimension`: TwoNN (Facco et al. 2017), its MLE form, Levina–Bickel MLE
  (2004; MacKay–Ghahramani harmonic pooling by default), GRIDE (Denti et al. 2022).
  Definitions equal scikit-dimension's ``TwoNN``, ``MLE`` and ``GRIDE`` on duplicate-free
  data; ``"pca"`` comes from the moment engine (all rows). See docs/idim.md for formulas,
  tolerance rule and every deliberate difference from the anchors.
* :func:`rsa`: representational similarity analysis (RDM correlation, all layer pairs).
* :func:`mutual_knn`: mutual nearest-neighbour alignment (Huh et al. 2024).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import _native
from .._memory import check_budget
from .._progress import Progress
from .._sample import indices_hash, load, sample_indices
from .._source import resolve
from .._text import Table
from .._validate import (
    LAYERS,
    RUN,
    SEED,
    Float,
    Int,
    Ints,
    OneOf,
    RunOptions,
    Strings,
    validated,
)
from ..errors import InvalidArgumentError
from ..results import Result

if TYPE_CHECKING:  # Python < 3.11 has no typing.Unpack; the annotations are strings
    from typing_extensions import Unpack

METHODS = ("twonn", "twonn-mle", "mle", "gride", "pca")
KNN_METHODS = ("twonn", "twonn-mle", "mle", "gride")


def _f(v: Any) -> float:
    return float("nan") if v is None else float(v)


class IDResult(Result):
    """Intrinsic dimension per layer.

    ``values[layer]`` (float; NaN with ``details[layer]["reason"]`` when undefined),
    ``ci[layer]`` (2.5 / 97.5 % bootstrap percentiles, NaN without bootstrap),
    ``errors[layer]`` (GRIDE standard error, else NaN), ``details[layer]`` (rows used,
    duplicates, tolerance, ...), ``scales[layer]`` (GRIDE multiscale curve when requested),
    ``meta`` (method, parameters, seed, sample size and hash).
    """

    kind = "intrinsic_dimension"

    def __init__(
        self,
        layers: list[str],
        values: dict[str, float],
        ci: dict[str, Any] | None = None,
        errors: dict[str, float] | None = None,
        details: dict[str, Any] | None = None,
        scales: dict[str, Any] | None = None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        self.layers = list(layers)
        self.values = {k: _f(v) for k, v in values.items()}
        self.ci = {k: (_f(v[0]), _f(v[1])) for k, v in (ci or {}).items()}
        self.errors = {k: _f(v) for k, v in (errors or {}).items()}
        self.details = dict(details or {})
        self.scales = dict(scales or {})
        self.meta = dict(meta or {})

    def _fields(self) -> dict[str, Any]:
        return {
            "layers": self.layers,
            "values": self.values,
            "ci": {k: list(v) for k, v in self.ci.items()},
            "errors": self.errors,
            "details": self.details,
            "scales": self.scales,
            "meta": self.meta,
        }

    def to_table(self) -> Table:
        """One row per layer: id, ci_low, ci_high, error, rows, duplicates (and
        participation_ratio for ``method="pca"``)."""
        pca = self.meta.get("method") == "pca"
        columns = ["id", "ci_low", "ci_high", "error", "rows", "duplicates"]
        rows = []
        for name in self.layers:
            lo, hi = self.ci.get(name, (np.nan, np.nan))
            det = self.details.get(name, {})
            rows.append([self.values.get(name, np.nan), lo, hi, self.errors.get(name, np.nan),
                         det.get("rows_used"), det.get("duplicates"),
                         *([det.get("participation_ratio")] if pca else [])])
        return Table(self.layers, columns + (["participation_ratio"] if pca else []), rows,
                     "layer")

    @property
    def table(self) -> Any:
        """:meth:`to_table` as a pandas DataFrame; needs the ``plot`` extra."""
        return self.to_table().to_pandas()

    def plot(self, ax: Any = None, title: str | None = None) -> Any:
        """ID by depth (layer order) with bootstrap CIs as error bars; returns the Figure."""
        from ..plots import _mpl

        plt = _mpl()
        if ax is None:
            fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * len(self.layers) + 2), 3.5))
        else:
            fig = ax.figure
        y = np.array([self.values[k] for k in self.layers])
        x = np.arange(len(self.layers))
        lo = np.array([self.ci.get(k, (np.nan, np.nan))[0] for k in self.layers])
        hi = np.array([self.ci.get(k, (np.nan, np.nan))[1] for k in self.layers])
        if np.isfinite(lo).any():
            ax.errorbar(
                x, y, yerr=[np.nan_to_num(y - lo), np.nan_to_num(hi - y)], marker="o", capsize=3
            )
        else:
            ax.plot(x, y, marker="o")
        ax.set_xticks(x)
        ax.set_xticklabels(self.layers, rotation=60, ha="right", fontsize=8)
        ax.set_ylabel(f"intrinsic dimension ({self.meta.get('method', '')})")
        ax.set_title(title or "Intrinsic dimension by depth")
        fig.tight_layout()
        return fig

    def __repr__(self) -> str:
        return (
            f"<IDResult {self.meta.get('method')} {len(self.layers)} layers n={self.meta.get('n')}>"
        )


class IDOptions(RunOptions, total=False):
    """The estimators' options shared by :func:`intrinsic_dimension` and
    :func:`intrinsic_dimensions` (their docstring says what each means), and the
    :class:`RunOptions`."""

    sample: int | None
    seed: int
    k: int
    n1: int
    n2: int
    discard_fraction: float
    duplicates: str
    tolerance: float | None
    bootstrap: int
    scales: Sequence[int] | None
    pool: str
    pca_threshold: float


_ID = RUN.extend(
    IDOptions, sample=((None, Int(1)), 20000), seed=(SEED, 0), k=(Int(1), 20), n1=(Int(1), 1),
    n2=(Int(1), 2), discard_fraction=(Float(0, 1, hi_open=True), 0.1),
    duplicates=(OneOf("drop", "error", "keep"), "drop"), tolerance=((None, Float(0)), None),
    bootstrap=(Int(0), 0), scales=((None, Ints(Int(1))), None),
    pool=(OneOf("harmonic", "mean", "median"), "harmonic"),
    pca_threshold=(Float(0, 1, lo_open=True), 0.95))


@validated(method=OneOf(*METHODS), layers=LAYERS, options=_ID)
def intrinsic_dimension(
    source: Any,
    *,
    method: str = "twonn",
    layers: Sequence[str] | str | None = None,
    **options: Unpack[IDOptions],
) -> IDResult:
    """Intrinsic dimension of each layer from exact nearest neighbours of a seeded sample.

    Methods (``r_j`` = distance to the j-th nearest neighbour, self excluded):

    * ``"twonn"`` (Facco et al. 2017, Sci. Rep. 7:12140) = ``skdim.id.TwoNN().fit(X)`` =
      dadapy's ``compute_id_2NN()``:
      ``μ = r2/r1``; the ``⌊N(1 − discard_fraction)⌋`` smallest μ sorted, ``F_i = i/N``;
      least-squares slope through the origin of ``−log(1 − F_i)`` on ``log μ_(i)``.
    * ``"twonn-mle"`` = ``TwoNN(method="mle")``: ``(n_keep − 1)/(Σ log μ + (N − n_keep) log
      μ_(n_keep))``, i.e. ``(N − 1)/Σ log μ`` with ``discard_fraction=0``.
    * ``"mle"`` (Levina & Bickel 2004) = ``skdim.id.MLE().fit(X, n_neighbors=k)``: per point
      ``(k − 1)/Σ_j log(r_k/r_j)``, pooled by ``pool="harmonic"`` (MacKay & Ghahramani 2005;
      skdim's default), ``"mean"`` (the original) or ``"median"``.
    * ``"gride"`` (Denti et al. 2022, Sci. Rep. 12:20005) = ``skdim.id.GRIDE(n1, n2).fit(X)``:
      MLE of d from ``μ = r_{n2}/r_{n1}``, with its Fisher-information standard error in
      ``errors``; ``scales=[1, 2, 4, ...]`` adds the multiscale curve (n1 = s, n2 = 2s).
    * ``"pca"``: from the covariance spectrum ``λ_1 ≥ λ_2 ≥ …`` of ALL rows (the moment
      engine, one streaming pass; ``sample``/``seed`` are not used): the smallest ``k`` with
      ``Σ_{i≤k} λ⁺_i / Σ λ⁺ ≥ pca_threshold`` (``λ⁺ = max(λ, 0)``, round-off only); the
      participation ratio ``(Σλ⁺)²/Σ(λ⁺)²`` (Gao et al. 2017) and the 90/95/99 % counts are in
      ``details``. A linear measure: it over-counts curved manifolds (swiss roll → 3).

    Duplicates: two sampled rows closer than ``tolerance`` (default ``1e-7 ×`` the RMS radius
    ``sqrt(mean ||x_i − x̄||²)`` of the sample) are duplicates. ``"drop"`` keeps the first of
    each group (count in ``details``), ``"error"`` raises InvalidArgumentError with the count,
    ``"keep"`` warns; estimators that then see zero distances give NaN with the reason.
    Neighbour distances are exact: GEMM candidates are re-computed in f64 from the
    coordinates and certified (see ``layerscope_core::engine::neighbors``).

    ``bootstrap=B``: 2.5/97.5 % percentile CIs from B resamples (seeded by ``seed``) of the
    per-point statistics (μ_i, the pointwise MLEs, GRIDE's log μ_i), reusing the kNN graph
    (not for ``"pca"``).

    ``max_memory``: the memory budget (bytes or ``"4G"``; default ``LAYERSCOPE_MAX_MEMORY``,
    else 0.8 × the machine's available memory): the sample, its kNN graph and the distance
    blocks are checked against it before a row is read (``MemoryBudgetError`` otherwise).

    ``backend="ray"``: one task per layer on a Ray cluster runs this estimator on that layer
    (the same sample, seed and options: the same numbers), ``"pca"`` the moment passes cut
    into row-range tasks (:func:`layerscope.spectrum`); ``max_memory`` is then each node's
    budget, ``meta["backend"]`` and ``meta["tasks"]`` record what ran, ``ray_address`` as in
    :func:`layerscope.cka`.

    ``device``: None (the Rust CPU engine), ``"auto"`` or a torch device: the kNN's distance
    products (the f32 GEMM blocks) on that device, the lower bounds, the exact f64 recheck of
    the near neighbours and the estimators in Rust (:class:`layerscope._device.products.DeviceProducts`;
    the same neighbours and distances); ``"pca"``: the moment pass's products there.
    ``meta["device"]``.
    """
    return _estimate(source, [method], layers, **options)[method]


@validated(methods=Strings(options=METHODS), layers=LAYERS, options=_ID)
def intrinsic_dimensions(
    source: Any,
    *,
    methods: Sequence[str] = ("twonn", "mle"),
    layers: Sequence[str] | str | None = None,
    **options: Unpack[IDOptions],
) -> dict[str, IDResult]:
    """Several intrinsic-dimension estimators from ONE exact kNN graph per layer.

    Same arguments and definitions as :func:`intrinsic_dimension` (``methods`` any of
    ``"twonn"``, ``"twonn-mle"``, ``"mle"``, ``"gride"``, ``"pca"``); the graph is built once
    per layer with as many neighbours as the most demanding method needs, and every method is
    evaluated on it (the same sample, seed and duplicate handling), so e.g. TwoNN + MLE cost
    one kNN search instead of two (the multiscale GRIDE curve of ``scales`` is attached to
    every method's result, as in :func:`intrinsic_dimension`). Returns
    ``{method: IDResult}`` in the order of ``methods``; each equals the result of
    ``intrinsic_dimension(method=...)`` with the same arguments."""
    return _estimate(source, methods, layers, **options)


def _estimate(
    source: Any, methods: Sequence[str], layers: Any, *, sample: int | None, seed: int, k: int,
    n1: int, n2: int, discard_fraction: float, duplicates: str, tolerance: float | None,
    bootstrap: int, scales: Sequence[int] | None, pool: str, pca_threshold: float,
    progress: Any, max_memory: int | None, backend: str, ray_address: str | None, device: Any,
) -> dict[str, IDResult]:
    """The body of both public functions (every argument checked at their door)."""
    from .._moments import _device_for

    dev = _device_for(device, backend, "float64")
    budget = max_memory
    methods = list(dict.fromkeys(methods))
    knn_methods = [m for m in methods if m != "pca"]
    scales_l = scales or []
    needs = []
    for method in knn_methods:
        if method in ("twonn", "twonn-mle"):
            needs.append(2)
        elif method == "mle":
            if int(k) < 2:
                raise InvalidArgumentError(f"k must be >= 2, got {k}")
            needs.append(int(k))
        else:
            if not (1 <= n1 < n2):
                raise InvalidArgumentError(f"GRIDE needs 1 <= n1 < n2, got n1={n1}, n2={n2}")
            needs.append(int(n2))
    needs += [2 * s for s in scales_l]
    out: dict[str, IDResult] = {}
    if "pca" in methods:
        out["pca"] = _pca_id(source, layers, float(pca_threshold), progress, budget,
                             backend, ray_address, dev)
    if not knn_methods:
        return {m: out[m] for m in methods}
    if backend == "ray":
        from .._ray_sampled import intrinsic_dimensions as on_ray

        src = resolve(source)
        names = src.select(layers)
        options = dict(methods=knn_methods, sample=sample, seed=seed, k=k, n1=n1, n2=n2,
                       discard_fraction=discard_fraction, duplicates=duplicates,
                       tolerance=tolerance, bootstrap=bootstrap, scales=scales, pool=pool,
                       max_memory=budget)
        per_layer, tasks = on_ray(src, names, options, progress=progress,
                                  address=ray_address)
        for method, parts in per_layer.items():
            meta = {**parts[0].meta, "seconds": tasks["seconds"], "backend": "ray",
                    "tasks": tasks}
            out[method] = merge_layers(names, parts, meta)
        return {m: out[m] for m in methods}
    kneed = max(needs)
    t0 = time.perf_counter()
    src = resolve(source)
    names = src.select(layers)
    idx = sample_indices(src.num_rows, sample, seed)
    dmax = max((src.dims[x] for x in names), default=0)
    check_budget(
        int(_native.knn_bytes(int(idx.size), dmax, kneed)) + int(idx.size) * dmax * 8,
        f"the exact {kneed}-nearest-neighbour graph of {idx.size} sampled rows × {dmax} "
        "features", "use a smaller sample (sample=...)", budget)
    per: dict[str, dict[str, Any]] = {
        m: {"values": {}, "ci": {}, "errs": {}, "details": {}, "scales": {}} for m in knn_methods
    }
    from .._device.devices import describe
    from .._device.products import products

    prod = products(dev)
    with Progress(progress, "intrinsic dimension", unit="step") as prog:
        cb = prog.cb
        for name in names:
            x = load(src, name, idx)
            g = _native.knn_graph(x, kneed, duplicates=duplicates, tolerance=tolerance,
                                  max_memory=budget, progress=cb, products=prod)
            if duplicates == "keep" and g["duplicates"]:
                warnings.warn(
                    f"layer {name!r}: {g['duplicates']} sampled rows duplicate another row "
                    "(kept; estimators may return NaN)",
                    stacklevel=2,
                )
            for method in knn_methods:
                est = _native.id_estimate(
                    g["dist"],
                    method,
                    discard_fraction=discard_fraction,
                    k=int(k),
                    pool=pool,
                    n1=int(n1),
                    n2=int(n2),
                    bootstrap=int(bootstrap),
                    seed=int(seed),
                )
                if est["reason"]:
                    warnings.warn(
                        f"layer {name!r}: intrinsic dimension ({method}) is NaN: "
                        f"{est['reason']}",
                        stacklevel=2,
                    )
                r = per[method]
                r["values"][name] = est["value"]
                r["ci"][name] = tuple(est["ci"])
                r["errs"][name] = est["error"]
                r["details"][name] = {
                    "rows_used": int(g["dist"].shape[0]),
                    "duplicates": int(g["duplicates"]),
                    "tolerance": float(g["tolerance"]),
                    "points_in_estimate": int(est["n_used"]),
                    "reason": est["reason"],
                }
                if scales_l:
                    dims, es, rad = [], [], []
                    for sv in scales_l:
                        rs = _native.id_estimate(g["dist"], "gride", n1=sv, n2=2 * sv)
                        dims.append(rs["value"])
                        es.append(rs["error"])
                        rad.append(float(g["dist"][:, 2 * sv - 1].mean()))
                    r["scales"][name] = {
                        "n1": scales_l, "dimension": dims, "error": es, "radius": rad
                    }
    seconds = time.perf_counter() - t0
    for method in knn_methods:
        meta = {
            "method": method,
            "n": int(idx.size),
            "n_total": src.num_rows,
            "seed": seed,
            "sample": sample,
            "sample_hash": indices_hash(idx),
            "k": int(k),
            "n1": int(n1),
            "n2": int(n2),
            "discard_fraction": discard_fraction,
            "duplicates": duplicates,
            "tolerance_rule": "1e-7 * RMS radius of the sample" if tolerance is None else "given",
            "bootstrap": int(bootstrap),
            "pool": pool,
            "seconds": seconds,
            "knn_k": kneed,
            "methods_sharing_the_graph": knn_methods,
        }
        if dev is not None:
            meta["device"] = describe(dev)
        r = per[method]
        out[method] = IDResult(names, r["values"], ci=r["ci"], errors=r["errs"],
                               details=r["details"], scales=r["scales"], meta=meta)
    return {m: out[m] for m in methods}


def merge_layers(names: list[str], parts: Sequence[IDResult], meta: dict[str, Any]) -> IDResult:
    """Results of one method over some layers each (e.g. one layer per task), as one
    result over ``names`` with ``meta``."""
    def joined(field: str) -> dict[str, Any]:
        return {k: v for r in parts for k, v in getattr(r, field).items()}

    return IDResult(names, joined("values"), ci=joined("ci"), errors=joined("errors"),
                    details=joined("details"), scales=joined("scales"), meta=meta)


def _pca_id(source: Any, layers: Any, threshold: float, progress: Any,
            max_memory: int | None = None, backend: str = "local",
            ray_address: str | None = None, device: Any = None) -> IDResult:
    """``method="pca"``: the spectra of every layer from the moment engine's planned passes
    (``layerscope.spectrum``'s plan: whole layers grouped into passes that fit the budget),
    the PCA dimension at ``threshold`` computed in Rust (``Spectrum::pca_id``)."""
    from ._passes import run_measures

    t0 = time.perf_counter()
    values: dict[str, float] = {}
    details: dict[str, Any] = {}
    t, raw, pmeta = run_measures(source, layers, None, None, spectrum=True, aligns={},
                                  ckas=[], compute="float64", pca_threshold=threshold,
                                  run={"progress": progress, "max_memory": max_memory,
                                       "backend": backend, "ray_address": ray_address,
                                       "device": device})
    names = list(t.names)
    n = int(t.n)
    for name, sp in zip(names, raw["spectra"]):
        values[name] = float(sp["pca_id"])
        details[name] = {"rows_used": n, **{key: float(sp[key]) for key in (
            "participation_ratio", "pca_id_90", "pca_id_95", "pca_id_99")}}
    engine = "moments (all rows, " + (
        "one streaming pass)" if pmeta["plan"]["passes"] == 1
        else f"{pmeta['plan']['passes']} passes of whole layers)")
    meta = {
        "method": "pca",
        "n": n,
        "n_total": n,
        "pca_threshold": threshold,
        "pca_engine": engine,
        "plan": pmeta["plan"],
        "seconds": time.perf_counter() - t0,
        "backend": backend,
    }
    for key in ("tasks", "device"):
        if key in pmeta:
            meta[key] = pmeta[key]
    return IDResult(names, values, details=details, meta=meta)

