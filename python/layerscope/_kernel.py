"""RBF-kernel CKA on a seeded sample of rows (called by :func:`layerscope.cka` with
``kernel="rbf"``).

Definitions (the maths runs in Rust, ``layerscope_core::measures::kernel``):

* bandwidth per layer (Kornblith et al. 2019, ICML, "Similarity of neural network
  representations revisited"): ``bw = sigma * sqrt(median of all m² pairwise squared
  distances, diagonal included)``; ``K_ij = exp(-||x_i - x_j||² / (2 bw²))``;
* ``estimator="biased"``: ``HSIC = tr(KHLH)/(m-1)²`` (Gretton et al. 2005), CKA =
  ``HSIC(K,L)/sqrt(HSIC(K,K) HSIC(L,L))``;
* ``estimator="debiased"``: the unbiased HSIC of Song et al. 2012 (JMLR 13) in numerator and
  denominator; it can be negative and is never clamped;

The minibatch estimator (Nguyen et al. 2021) is not here: it is one streaming pass in Rust
(``layerscope_core::measures::cka::minibatch_pass``), reached through
``layerscope.cka(..., estimator="minibatch")``.

The sample: ``numpy.random.default_rng(seed).choice(n, size=m, replace=False)`` sorted; with
``sample=None`` all rows up to :data:`DEFAULT_SAMPLE_CAP` (beyond it a seeded sample of that
size, recorded in ``meta``). Grams are built once per layer and reused for every pair; they
need ``L × m² × 8`` bytes (checked against the memory budget, ``max_memory``).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ._memory import check_budget
from ._source import Source, check_comparable, check_finite, resolve
from .errors import InvalidArgumentError
from .results import MatrixResult

DEFAULT_SAMPLE_CAP = 4096


def sample_indices(n: int, sample: int | None, seed: int, cap: int | None = None) -> np.ndarray:
    """Sorted row indices: all rows when ``sample`` is None (and ``n <= cap``), else
    ``default_rng(seed).choice(n, size=m, replace=False)`` sorted."""
    if sample is None:
        if cap is None or n <= cap:
            return np.arange(n, dtype=np.int64)
        sample = cap
    sample = int(sample)
    if sample <= 0:
        raise InvalidArgumentError(f"sample must be > 0, got {sample}")
    if sample >= n:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=sample, replace=False)).astype(np.int64)


def indices_hash(idx: np.ndarray) -> str:
    """Short SHA-256 of the sampled row indices (little-endian int64)."""
    return hashlib.sha256(np.asarray(idx, dtype="<i8").tobytes()).hexdigest()[:16]


def progress_callback(progress: Any, desc: str) -> tuple[Callable[[int, int], None] | None, Any]:
    """A ``cb(done, total)`` feeding a tqdm bar (or a user callable); returns (cb, bar)."""
    if callable(progress):
        return progress, None
    if not progress:
        return None, None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None, None
    bar = tqdm(total=0, desc=desc, leave=False)

    def cb(done: int, total: int) -> None:
        if bar.total != total:
            bar.total = total
        bar.n = done
        bar.refresh()

    return cb, bar


def check_sample(a: Source, b: Source | None, la: Sequence[str], lb: Sequence[str],
                 m: int, max_memory: int | None) -> None:
    """MemoryBudgetError before loading when the float64 ``m``-row sample of every layer
    (``la`` of ``a``, and ``lb`` of ``b`` when given) does not fit the budget; the measure
    then checks its own matrices."""
    dsum = sum(a.dims[x] for x in la) + (sum(b.dims[x] for x in lb) if b is not None else 0)
    nl = len(la) + (len(lb) if b is not None else 0)
    check_budget(int(m) * dsum * 8, f"the {m}-row sample of {nl} layers (float64)",
                 "use a smaller sample (sample=...) or fewer layers", max_memory)


def load(src: Source, layer: str, idx: np.ndarray) -> np.ndarray:
    """The sampled rows of one layer as C-contiguous float64 (checked finite)."""
    if idx.size == src.num_rows and (idx.size == 0 or (idx[0] == 0 and idx[-1] == idx.size - 1)):
        x = src.read(layer, 0, src.num_rows, dtype=np.float64)
    else:
        x = src.take(layer, idx, dtype=np.float64)
    x = np.ascontiguousarray(x, dtype=np.float64)
    check_finite(layer, x)
    return x


def rbf_cka(
    src_a: Any,
    src_b: Any,
    layers_a: Sequence[str] | None,
    layers_b: Sequence[str] | None,
    *,
    sample: int | None = None,
    seed: int = 0,
    sigma: float = 1.0,
    estimator: str = "biased",
    progress: Any = True,
    max_memory: int | None = None,
) -> MatrixResult:
    """RBF CKA for all pairs of ``layers_a`` (× ``layers_b`` of ``src_b`` when given).

    See the module docstring for the formulas (bandwidth rule, biased / Song et al. unbiased
    HSIC). Returns a :class:`MatrixResult` with ``meta`` holding the
    estimator, rows used, seed, sample hash and the bandwidth of each layer.
    """
    from . import _native

    if estimator not in ("biased", "debiased"):
        raise InvalidArgumentError(
            f"estimator must be 'biased' or 'debiased', got {estimator!r} (the minibatch "
            "estimator is layerscope.cka(..., estimator='minibatch'))"
        )
    if not (np.isfinite(sigma) and sigma > 0):
        raise InvalidArgumentError(f"sigma must be > 0, got {sigma}")
    t0 = time.perf_counter()
    a = resolve(src_a)
    b = resolve(src_b) if src_b is not None else None
    la = a.select(layers_a)
    if b is not None:
        check_comparable(a, b)
        lb = b.select(layers_b)
    else:
        lb = la
    n = a.num_rows
    idx = sample_indices(n, sample, seed, DEFAULT_SAMPLE_CAP)
    m = int(idx.size)
    cb, bar = progress_callback(progress, "rbf cka")
    meta: dict[str, Any] = {
        "measure": "cka",
        "kernel": "rbf",
        "estimator": estimator,
        "sigma": float(sigma),
        "bandwidth_rule": "sigma * sqrt(median pairwise squared distance, diagonal included)",
        "n": m,
        "n_total": n,
        "seed": seed,
        "sample": sample,
        "sample_hash": indices_hash(idx),
    }
    try:
        need = (len(la) + (len(lb) if b is not None else 0)) * m * m * 8
        meta["gram_bytes"] = need
        check_sample(a, b, la, lb, m, max_memory)
        xa = [load(a, name, idx) for name in la]
        xb = [load(b, name, idx) for name in lb] if b is not None else None
        r = _native.rbf_hsic(
            xa,
            xb,
            sigma=sigma,
            unbiased=(estimator == "debiased"),
            max_memory=max_memory,
            progress=cb,
        )
        hxy, hxx, hyy = r["xy"], r["xx"], r["yy"]
        bw_a = r["bw_a"]
        bw_b = r["bw_b"] if b is not None else r["bw_a"]
    finally:
        if bar is not None:
            bar.close()
    with np.errstate(invalid="ignore", divide="ignore"):
        vals = hxy / np.sqrt(np.outer(hxx, hyy))
    meta["bandwidths_a"] = {k: float(v) for k, v in zip(la, bw_a)}
    meta["bandwidths_b"] = {k: float(v) for k, v in zip(lb, bw_b)}
    meta["seconds"] = time.perf_counter() - t0
    return MatrixResult(vals, la, lb, meta=meta)
