"""The seeded row sample of the measures that work on a subset of rows (RBF CKA, the
neighbour measures, intrinsic dimension; ``sample=`` on linear and minibatch CKA).

The sample: ``numpy.random.default_rng(seed).choice(n, size=m, replace=False)``, sorted;
with ``sample=None`` all rows, or up to a measure's cap (beyond it a seeded sample of that
size, recorded in ``meta``). ``meta["sample_hash"]`` identifies the rows used.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from ._memory import check_budget
from ._source import Source, check_finite


def sample_indices(n: int, sample: int | None, seed: int, cap: int | None = None) -> np.ndarray:
    """Sorted row indices: all rows when ``sample`` is None (and ``n <= cap``), else
    ``default_rng(seed).choice(n, size=m, replace=False)`` sorted (``sample`` >= 1 and
    ``seed`` >= 0, as the public functions check)."""
    if sample is None:
        if cap is None or n <= cap:
            return np.arange(n, dtype=np.int64)
        sample = cap
    if sample >= n:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=sample, replace=False)).astype(np.int64)


def indices_hash(idx: np.ndarray) -> str:
    """Short SHA-256 of the sampled row indices (little-endian int64)."""
    return hashlib.sha256(np.asarray(idx, dtype="<i8").tobytes()).hexdigest()[:16]


def check_sample(a: Source, b: Source | None, la: Sequence[str], lb: Sequence[str],
                 m: int, max_memory: int | None) -> None:
    """MemoryBudgetError before loading when the float64 ``m``-row sample of every layer
    (``la`` of ``a``, and ``lb`` of ``b`` when given) does not fit the budget; the measure
    then checks its own matrices."""
    dsum = sum(a.dims[x] for x in la) + (sum(b.dims[x] for x in lb) if b is not None else 0)
    nl = len(la) + (len(lb) if b is not None else 0)
    check_budget(int(m) * dsum * 8, f"the {m}-row sample of {nl} layers (float64)",
                 "use a smaller sample (sample=...) or fewer layers", max_memory)


# As the core's ``SCALE_BAND``: a layer whose largest deviation from its column means is
# 2^e with |e| beyond this is multiplied by 2^-e before any distance is taken.
SCALE_BAND = 40


def scale_exponent(x: np.ndarray) -> int:
    """``e`` with ``max |x − column mean|`` in ``[2^e, 2^(e+1))`` when that is beyond
    ``2^±SCALE_BAND`` (else 0; 0 for a constant or empty sample; clamped to ±1000)."""
    if x.size == 0:
        return 0
    mean = x.mean(axis=0)
    spread = 0.0
    for i in range(0, x.shape[0], 4096):  # in chunks: no second copy of a large sample
        spread = max(spread, float(np.max(np.abs(x[i:i + 4096] - mean))))
    return exponent_of(spread)


def exponent_of(spread: float) -> int:
    """The scale exponent of a largest deviation ``spread`` (the core's ``scale_exponent``):
    ``⌊log2 spread⌋`` when beyond ``±SCALE_BAND``, else 0 (0 for 0, NaN, ±Inf)."""
    if not (np.isfinite(spread) and spread > 0.0):
        return 0
    e = int(np.frexp(spread)[1]) - 1
    return 0 if abs(e) <= SCALE_BAND else max(-1000, min(1000, e))


def load(src: Source, layer: str, idx: np.ndarray, *, with_exp: bool = False) -> Any:
    """The sampled rows of one layer as C-contiguous float64 (checked finite).

    Numbers at any scale: a layer far from unit scale (:func:`scale_exponent` ``e ≠ 0``:
    deviations beyond about 1e±12) is returned multiplied by ``2^-e`` — exact in binary
    floating point — so that squared distances, Gram entries and kernel arguments neither
    overflow nor underflow (f64 data near 1e±200 used to give NaN or a wrong kNN graph).
    Every sampled measure here is unchanged by a per-layer scale (TwoNN, MLE, GRIDE: ratios of
    distances; RSA, mutual kNN: correlations and ranks; RBF CKA: the median-rule bandwidth
    scales along). ``with_exp=True`` returns ``(x, e)``: what a reported scale-dependent
    value (an RBF bandwidth) is multiplied back by ``2^e``. Ordinary layers are not touched."""
    if idx.size == src.num_rows and (idx.size == 0 or (idx[0] == 0 and idx[-1] == idx.size - 1)):
        x = src.read(layer, 0, src.num_rows, dtype=np.float64)
    else:
        x = src.take(layer, idx, dtype=np.float64)
    x = np.ascontiguousarray(x, dtype=np.float64)
    check_finite(layer, x)
    e = scale_exponent(x)
    if e:
        x = np.ldexp(x, -e)
    return (x, e) if with_exp else x
