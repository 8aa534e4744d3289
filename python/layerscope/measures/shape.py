"""Generalized shape metrics between layers (Williams, Kunz, Kornblith & Linderman 2021,
NeurIPS, "Generalized shape metrics on neural representations"): ``layerscope.shape_metric``.

For the centred ``n × d_x`` and ``n × d_y`` activations ``X``, ``Y`` of two layers, with
``C_X = XᵀX/(n−1) = V diag(λ) Vᵀ`` (likewise ``C_Y``) and ``C_XY = XᵀY/(n−1)``:

* partial whitening ``Z_X = V diag(α + (1 − α) λ^(−1/2)) Vᵀ`` — ``α = 1``: none (the
  Procrustes shape metric), ``α = 0``: full whitening (CCA-like); eigenvalues floored at the
  rank tolerance ``λ_max · max(n, d) · ε_f64`` (the alignment's rank rule), where the data
  have no variance and so contribute nothing;
* ``"angular"``: ``θ = arccos(‖Z_X C_XY Z_Y‖_* / (‖X Z_X‖_F ‖Y Z_Y‖_F))`` (the norms per
  ``sqrt(n − 1)`` rows: ``‖X Z_X‖² = Σ λ (α + (1 − α) λ^(−1/2))²``) — the angle between the
  two transformed layers after the best rotation, which the nuclear norm gives (widths that
  differ: zero padding, implicit);
* ``"euclidean"``: ``sqrt(‖X Z_X‖² + ‖Y Z_Y‖² − 2 ‖Z_X C_XY Z_Y‖_*)``, the Frobenius distance
  of the rotation-aligned transformed layers per ``sqrt(n − 1)`` rows.

Both are metrics (symmetric, zero exactly on a layer with itself and up to rounding on two
layers equal up to a rotation — about 1e-8 for the angle, as arccos magnifies the round-off
of a cosine near 1; ``extra["similarity"]`` holds that cosine — the triangle inequality),
invariant to rotations (and
translations) of either layer. All from the one-pass moments: exact over all rows on every
plan (one pass, tiles, Ray, a device), like :func:`layerscope.alignment` (it is its
``method="shape"``). For ``0 < α < 1`` the value depends on the layers' units (``α`` is
added to ``λ^(−1/2)``); covariances here are per ``n − 1`` rows (``netrep``'s ``whiten``
uses ``XᵀX``, so its ``α`` maps to ours only at ``α ∈ {0, 1}``, where both agree).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .._defaults import RIDGE
from .._validate import LAYERS, RUN, Float, OneOf, RunOptions, validated
from ..results import MatrixResult
from ._passes import run_measures

if TYPE_CHECKING:  # Python < 3.11 has no typing.Unpack; the annotations are strings
    from typing_extensions import Unpack

__all__ = ["shape_metric", "DISTANCES"]

DISTANCES = ("angular", "euclidean")


@validated(layers=LAYERS, other_layers=LAYERS, alpha=Float(0, 1), distance=OneOf(*DISTANCES),
           options=RUN)
def shape_metric(
    source: Any,
    other: Any = None,
    *,
    alpha: float = 1.0,
    distance: str = "angular",
    layers: Sequence[str] | str | None = None,
    other_layers: Sequence[str] | str | None = None,
    **run: Unpack[RunOptions],
) -> MatrixResult:
    """The generalized shape distance of every layer pair (module docstring: the formulas).

    Args:
        source, other, layers, other_layers: as :func:`layerscope.cka`.
        alpha: partial whitening in ``[0, 1]`` (1: Procrustes, 0: CCA-like).
        distance: ``"angular"`` (radians, in ``[0, π/2]``) or ``"euclidean"``.
        run: ``progress``, ``max_memory``, ``backend``, ``ray_address``, ``device``
            (:class:`layerscope.RunOptions`).

    Returns:
        A :class:`~layerscope.results.MatrixResult` of distances (0 on the diagonal);
        ``extra``: ``angular``, ``euclidean`` and ``similarity`` (the cosine) tables;
        ``meta``: ``alpha``, ``distance``, ``n``, the plan.
    """
    opts = {"method": "shape", "space": "samples", "ridge_eps": RIDGE, "k": 1, "alpha": alpha}
    t, raw, meta = run_measures(source, layers, other, other_layers, spectrum=False,
                                aligns={"shape": opts}, ckas=[], compute="float64", run=run)
    rn, cn = [t.names[i] for i in t.rows], [t.names[i] for i in t.cols]
    a = raw["shape"]
    nr, nc = int(a["nrows"]), int(a["ncols"])
    angular = np.asarray(a["values"], dtype=np.float64).reshape(nr, nc)
    ex = {k: np.asarray(v, dtype=np.float64).reshape(nr, nc) for k, v in dict(a["extras"]).items()}
    extra = {"angular": angular, "euclidean": ex["euclidean"], "similarity": ex["similarity"]}
    values = angular if distance == "angular" else ex["euclidean"]
    m = {**meta, "measure": f"shape metric ({distance}, alpha={alpha:g})", "method": "shape",
         "estimator": f"alpha={alpha:g}", "alpha": alpha, "distance": distance,
         "whitening": "Z = V diag(alpha + (1 - alpha) lambda^-1/2) V^T of C/(n-1), lambda "
                      "floored at the rank tolerance lambda_max * max(n, d) * eps",
         "reference": "Williams, Kunz, Kornblith & Linderman 2021 (NeurIPS)"}
    if distance == "euclidean" and alpha > 0 and np.isnan(values).any() and \
            np.isfinite(angular).all():
        m["nan_reason"] = ("a layer stored beyond 2^±40 is rescaled by the moment pass; the "
                           "Euclidean distance at alpha > 0 is in the data's units: NaN there")
    return MatrixResult(values, rn, cn, meta=m, extra=extra)
