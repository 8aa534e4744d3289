"""The seeded row sample of the measures that work on a subset of rows (RBF CKA, the
neighbour measures, intrinsic dimension; ``sample=`` on linear and minibatch CKA).

The sample: ``numpy.random.default_rng(seed).choice(n, size=m, replace=False)``, sorted;
with ``sample=None`` all rows, or up to a measure's cap (beyond it a seeded sample of that
size, recorded in ``meta``). ``meta["sample_hash"]`` identifies the rows used.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

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


def load(src: Source, layer: str, idx: np.ndarray) -> np.ndarray:
    """The sampled rows of one layer as C-contiguous float64 (checked finite)."""
    if idx.size == src.num_rows and (idx.size == 0 or (idx[0] == 0 and idx[-1] == idx.size - 1)):
        x = src.read(layer, 0, src.num_rows, dtype=np.float64)
    else:
        x = src.take(layer, idx, dtype=np.float64)
    x = np.ascontiguousarray(x, dtype=np.float64)
    check_finite(layer, x)
    return x
