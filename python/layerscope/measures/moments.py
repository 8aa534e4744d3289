"""One moment pass, queried many times: :class:`MomentTables`.

``MomentTables.compute(a, b)`` streams every layer of ``a`` (and of ``b``, concatenated after
``a``'s) ONCE through the moment engine and keeps the accumulated cross-products; linear CKA
(biased and debiased), spectra and alignment tables of any layer subsets are then read from
those moments without touching the data again — within ``a``, within ``b`` and across the
two. This is what :func:`layerscope.report` runs; :func:`layerscope.analyze` plans passes
for one table (tiles when all layers do not fit) instead.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._defaults import ALIGN_K, RIDGE
from .._moments import compute_moments
from ..results import MatrixResult
from .alignment import AlignmentResult, alignment_result, cka_table
from .spectrum import SpectrumResult, spectrum_result


class MomentTables:
    """The moments of every layer of one or two sources from one pass.

    ``names``: every layer (``a``'s, then ``b``'s); ``rows`` / ``cols``: the indices of
    ``a``'s and ``b``'s layers (``cols = rows`` for one source); ``meta``: the pass's metadata
    (``n``, plan, shift, timings), recorded in every result."""

    def __init__(self, moments: Any, meta: dict[str, Any], two: bool) -> None:
        self.moments = moments
        self.meta = {**meta, "n": int(moments.n)}
        self.names = [str(x) for x in moments.names]
        na = int(moments.num_a) if two else len(self.names)
        self.rows = list(range(na))
        self.cols = list(range(na, len(self.names))) if two else self.rows

    @classmethod
    def compute(cls, source: Any, other: Any = None, *, progress: Any = True,
                max_memory: int | None = None, backend: str = "local",
                ray_address: str | None = None) -> MomentTables:
        """One streamed pass over all layers of ``source`` (and ``other``, whose row ids must
        equal ``source``'s); raises :class:`~layerscope.MemoryBudgetError` before reading
        when that single pass does not fit ``max_memory``. ``backend="ray"``: the pass cut
        into row-range tasks on a Ray cluster (:mod:`layerscope._ray`)."""
        moments, meta = compute_moments(source, None, other, None, progress=progress,
                                        max_memory=max_memory, backend=backend,
                                        ray_address=ray_address)
        return cls(moments, meta, other is not None)

    def _names(self, idx: list[int]) -> list[str]:
        return [self.names[i] for i in idx]

    def cka(self, rows: list[int], cols: list[int], *, debiased: bool) -> MatrixResult:
        """Linear CKA of layers ``rows`` × ``cols`` (indices into ``names``)."""
        vals = np.asarray(self.moments.cka(rows, cols, debiased=debiased), dtype=np.float64)
        vals = vals.reshape(len(rows), len(cols))
        return cka_table(vals, self._names(rows), self._names(cols), debiased=debiased,
                         meta=self.meta)

    def spectra(self, layers: list[int]) -> list[dict[str, Any]]:
        """The per-layer spectrum dicts of the core (eigenvalues, measures, ``rank``)."""
        return list(self.moments.spectrum(layers))

    def spectrum(self, layers: list[int], spectra: list[dict[str, Any]] | None = None,
                 top: int | None = None) -> SpectrumResult:
        """The spectra of ``layers`` as a result (``spectra``: already computed ones)."""
        sp = self.spectra(layers) if spectra is None else spectra
        return spectrum_result(sp, self._names(layers), top, self.meta)

    def alignment(self, rows: list[int], cols: list[int], *, method: str = "subspace",
                  space: str = "samples", k: int = ALIGN_K, ridge: float = RIDGE,
                  symmetric: bool = False) -> AlignmentResult:
        """The alignment of layers ``rows`` × ``cols`` (the options of
        :func:`layerscope.alignment`; ``symmetric``: rows and cols are the same layers)."""
        raw = self.moments.alignment(rows=rows, cols=cols, method=method, space=space,
                                     ridge_eps=ridge, symmetric=symmetric, k=k,
                                     spectrum_layers=[])
        return alignment_result(dict(raw)["alignment"], self._names(rows), self._names(cols),
                                method, space, k, ridge, self.meta)
