"""Neighbourhood measures on a seeded sample of rows, all layer pairs: :func:`rsa`
(representational similarity analysis, Kriegeskorte et al. 2008) and :func:`mutual_knn`
(mutual nearest-neighbour alignment, Huh et al. 2024). Rows are sampled as in
:mod:`layerscope.measures.idim` (seed, count and index hash in ``meta``); the RDMs and
neighbour sets are computed in Rust (``layerscope_core::measures::rsa``)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import _native
from .._progress import Progress
from .._sample import check_sample, indices_hash, load, sample_indices
from .._source import check_comparable, resolve
from .._validate import (
    LAYERS,
    MAX_MEMORY,
    PROGRESS,
    RUN,
    SEED,
    Bool,
    Int,
    OneOf,
    RunOptions,
    validated,
)
from ..errors import InvalidArgumentError
from ..results import MatrixResult

if TYPE_CHECKING:  # Python < 3.11 has no typing.Unpack; the annotations are strings
    from typing_extensions import Unpack


def _sampled_table(
    measure: str, source: Any, other: Any, layers: Any, other_layers: Any, sample: int | None,
    seed: int, table: Callable[[list[np.ndarray], list[np.ndarray] | None, Any], np.ndarray],
    *, min_rows: int, why: str, ray_measure: tuple[str, dict[str, Any]], run: RunOptions,
    **options: Any,
) -> MatrixResult:
    """A table of all layer pairs on a seeded sample: the sampled rows of every selected
    layer of ``source`` (and ``other``) in memory (f64, checked finite; the budget checked
    first), ``run(xa, xb, progress_cb)`` on them, the sample recorded in ``meta``. On
    ``backend="ray"``: ``ray_measure`` (the prepared-layer measure and its options) as
    tasks per layer and per block of pairs (:mod:`layerscope._ray_sampled`). With a
    ``device``: each layer prepared with its distance products there
    (``_native.prepare_layer(products=)``), the pair table in Rust — the steps of the Ray
    route, so the same numbers."""
    t0 = time.perf_counter()
    max_memory, progress, backend = run["max_memory"], run["progress"], run["backend"]
    from .._device.devices import describe
    from .._device.products import products
    from .._moments import _device_for

    dev = _device_for(run.get("device"), backend, "float64")
    a = resolve(source)
    b = resolve(other) if other is not None else None
    la = a.select(layers)
    if b is not None:
        check_comparable(a, b)
    lb = b.select(other_layers) if b is not None else la
    idx = sample_indices(a.num_rows, sample, seed)
    if idx.size < min_rows:
        raise InvalidArgumentError(f"{why}, got {idx.size}")
    extra: dict[str, Any] = {}
    if backend == "ray":
        from .._ray_sampled import pair_table

        r = pair_table(ray_measure[0], a, b, la, lb if b is not None else None, idx,
                       ray_measure[1], max_memory=max_memory, progress=progress,
                       address=run.get("ray_address"))
        vals = r["values"]
        extra = {"backend": "ray", "tasks": r["tasks"]}
    else:
        check_sample(a, b, la, lb, idx.size, max_memory)
        with Progress(progress, measure.replace("_", " "), unit="step") as prog:
            xa = [load(a, n, idx) for n in la]
            xb = [load(b, n, idx) for n in lb] if b is not None else None
            if dev is None:
                vals = table(xa, xb, prog.cb)
            else:
                prod = products(dev)
                kind, opts = ray_measure

                def prep(xs: list[np.ndarray]) -> list[Any]:
                    return [_native.prepare_layer(x, kind, max_memory=max_memory,
                                                  products=prod, **opts) for x in xs]

                pa = prep(xa)
                pb = prep(xb) if xb is not None else None
                vals = np.asarray(_native.prepared_table(pa, pb)["values"])
        extra = {"backend": "local"}
        if dev is not None:
            extra["device"] = describe(dev)
    meta = {"measure": measure, **options, "n": int(idx.size), "n_total": a.num_rows,
            "seed": seed, "sample": sample, "sample_hash": indices_hash(idx),
            "seconds": time.perf_counter() - t0, **extra}
    return MatrixResult(vals, la, lb, meta=meta)


@validated(layers=LAYERS, other_layers=LAYERS, dissimilarity=OneOf("euclidean", "correlation"),
           compare=OneOf("spearman", "pearson"), sample=(None, Int(1)), seed=SEED, options=RUN)
def rsa(
    source: Any,
    other: Any = None,
    *,
    layers: Sequence[str] | str | None = None,
    other_layers: Sequence[str] | str | None = None,
    dissimilarity: str = "euclidean",
    compare: str = "spearman",
    sample: int | None = 2000,
    seed: int = 0,
    **run: Unpack[RunOptions],
) -> MatrixResult:
    """Representational similarity analysis (Kriegeskorte et al. 2008) for all layer pairs.

    RDM of a layer on the sampled rows: the upper triangle (``i < j``, as
    ``scipy.spatial.distance.pdist``) of ``||x_i − x_j||`` (``"euclidean"``) or
    ``1 − corr(x_i, x_j)`` (``"correlation"``; a constant row is an error). Two RDMs are
    compared by Spearman (Pearson of average ranks, as ``scipy.stats.spearmanr``) or Pearson
    correlation. ``other=None``: all pairs of ``source`` layers. Memory: an m × m distance
    matrix per layer at a time plus ``m(m−1)/2`` floats per layer, checked against the memory
    budget ``max_memory`` (bytes or ``"4G"``; default ``LAYERSCOPE_MAX_MEMORY``, else 0.8 ×
    the machine's available memory) before any row is read.

    ``backend="ray"``: one task per layer prepares its RDM where the store lies, one task per
    block of layer pairs correlates them (:mod:`layerscope._ray_sampled`: the same functions,
    the same numbers); ``max_memory`` is then each node's budget, ``meta["tasks"]`` records
    what ran; ``ray_address`` as in :func:`layerscope.cka`.

    ``device``: None (the Rust CPU engine), ``"auto"`` or a torch device: the exact pairwise
    distances (from the differences, no GEMM) on that device, the RDMs and their
    correlations in Rust; ``meta["device"]``.
    """
    def table(xa: list[np.ndarray], xb: list[np.ndarray] | None, cb: Any) -> np.ndarray:
        return _native.rsa_matrix(xa, xb, dissimilarity=dissimilarity, compare=compare,
                                  max_memory=run["max_memory"], progress=cb)

    return _sampled_table(
        "rsa", source, other, layers, other_layers, sample, seed, table, min_rows=3,
        why="RSA needs at least 3 rows",
        ray_measure=("rsa", {"dissimilarity": dissimilarity, "compare": compare}), run=run,
        dissimilarity=dissimilarity, compare=compare)


@validated(k=Int(1), layers=LAYERS, other_layers=LAYERS, sample=(None, Int(1)), seed=SEED,
           normalize=Bool(), options=RUN)
def mutual_knn(
    source: Any,
    other: Any = None,
    *,
    k: int = 10,
    layers: Sequence[str] | str | None = None,
    other_layers: Sequence[str] | str | None = None,
    sample: int | None = 2000,
    seed: int = 0,
    normalize: bool = True,
    **run: Unpack[RunOptions],
) -> MatrixResult:
    """Mutual k-nearest-neighbour alignment (Huh, Cheung, Wang & Isola 2024, "The Platonic
    Representation Hypothesis", ICML) for all layer pairs::

        m_kNN(A, B) = mean_i |N_k^A(i) ∩ N_k^B(i)| / k

    over the sampled rows, ``N_k(i)`` the ``k`` nearest neighbours of row ``i`` (self
    excluded). As in the paper's code (``metrics.mutual_knn`` on ``F.normalize``-d features),
    ``normalize=True`` ranks neighbours by cosine similarity: rows are divided by their norm
    (in Rust, ``measures::rsa::unit_rows``; a zero row stays zero) and then ranked by
    Euclidean distance, which on the unit sphere orders exactly as ``-x_i·x_j``. (torch's
    ``F.normalize`` divides by ``max(||x||, 1e-12)``: the same except for rows of norm below
    1e-12, which it leaves unnormalised, so activations stored at a tiny scale lose their
    cosine neighbourhoods; here the result does not depend on the scale.) ``normalize=False``: Euclidean
    neighbours of the raw rows. Neighbour sets are exact (ties broken by row index; the
    reference's ``argsort`` breaks ties arbitrarily). Not applied: the reference pipeline's
    optional outlier clipping (``remove_outliers``, q=0.95) before the metric.
    ``max_memory``: the memory budget, as in :func:`rsa`; ``backend``, ``ray_address``: as in
    :func:`rsa`. ``device``: the kNN's f32 distance products on that torch device, the lower
    bounds and the exact f64 recheck in Rust (the same neighbour sets)."""
    def table(xa: list[np.ndarray], xb: list[np.ndarray] | None, cb: Any) -> np.ndarray:
        return _native.neighbour_matrix(xa, xb, "mutual_knn", k=k, normalize=normalize,
                                        max_memory=run["max_memory"], progress=cb)

    return _sampled_table(
        "mutual_knn", source, other, layers, other_layers, sample, seed, table,
        min_rows=k + 1, why=f"k = {k} neighbours needs more than k rows",
        ray_measure=("knn", {"k": k, "normalize": normalize}), run=run, k=k,
        normalize=normalize)


@validated(k=Int(1), layers=LAYERS, other_layers=LAYERS, sample=(None, Int(1)), seed=SEED,
           normalize=Bool(), progress=PROGRESS, max_memory=MAX_MEMORY)
def cknna(
    source: Any,
    other: Any = None,
    *,
    layers: Sequence[str] | str | None = None,
    other_layers: Sequence[str] | str | None = None,
    k: int = 10,
    sample: int | None = 2000,
    normalize: bool = True,
    seed: int = 0,
    progress: Any = True,
    max_memory: int | str | None = None,
) -> MatrixResult:
    """CKNNA — centred kernel nearest-neighbour alignment (Huh, Cheung, Wang & Isola 2024,
    "The Platonic Representation Hypothesis", ICML, appendix A) — for all layer pairs, on a
    seeded sample of ``sample`` rows::

        M_ij      = [j ∈ N_k^K(i)] · [j ∈ N_k^L(i)]           (j ≠ i)
        Align(K, L) = HSIC₁(M∘K, M∘L)
        CKNNA     = Align(K, L) / sqrt(Align(K, K) · Align(L, L))

    ``K``, ``L``: the inner-product Grams of the two layers' rows (``normalize=True``, the
    paper's default: of the rows scaled to unit norm, a zero row staying zero);
    ``N_k^K(i)``: the ``k`` columns ``j ≠ i`` with the largest ``K_ij``, from exact f64
    inner products, ties broken by the lowest row index (as :func:`mutual_knn`; with
    ``normalize=True`` the same neighbour sets as its cosine neighbours, up to rounding at
    exact ties); ``HSIC₁``: the unbiased HSIC of Song et al. (2012, eq. 5) in its trace form
    ``tr(K̃L̃)`` (the masked Grams are not symmetric); ``Align(K, K)`` masks ``K`` with its own
    neighbours. Only the masked entries are summed (``m·k`` per layer pair). ``values[i, j]``
    is CKNNA(``K`` = ``rows[i]``, ``L`` = ``cols[j]``): the measure is **not symmetric** (the
    masked Grams are not, and the ``1ᵀK̃L̃1`` term is ``(K̃ᵀ1)·(L̃1)``), so a table within one
    source holds both orders of each pair (they differ slightly; the diagonal is 1).

    **No additive guard**: the authors' code divides by ``sqrt(Align(K,K) Align(L,L)) +
    1e-6``, which moves values by about 5e-5 at ``m = 300`` and by far more when the aligned
    HSICs are small (many rows, few mutual neighbours, activations at a small scale); here
    the ratio is exact and NaN when a self-alignment is not positive (a constant layer, or
    no mutual neighbours with positive alignment). Not applied: the reference pipeline's
    optional outlier clipping before the metric.

    Returns a :class:`~layerscope.results.MatrixResult` (``meta``: ``k``, ``normalize``,
    ``n``, ``seed``, the sample hash). ``max_memory``: the budget of the sampled rows and the
    neighbour lists, checked before any row is read.
    """
    def table(xa: list[np.ndarray], xb: list[np.ndarray] | None, cb: Any) -> np.ndarray:
        return _native.neighbour_matrix(xa, xb, "cknna", k=k, normalize=normalize,
                                        max_memory=max_memory, progress=cb)

    return _sampled_table(
        "cknna", source, other, layers, other_layers, sample, seed, table,
        min_rows=max(4, k + 1), why=f"CKNNA with k = {k} needs more than k rows and at least 4",
        ray_measure=("cknna", {}), run={"progress": progress, "max_memory": max_memory,
                                        "backend": "local"}, k=k, normalize=normalize)
