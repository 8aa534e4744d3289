"""The measures, one module each: CKA (:mod:`.cka`), spectra (:mod:`.spectrum`), subspace
alignment and the one-pass ``analyze`` (:mod:`.alignment`), intrinsic dimension
(:mod:`.idim`), RSA, mutual kNN and CKNNA (:mod:`.neighbors`), generalized shape metrics
(:mod:`.shape`); :class:`MomentTables` (one moment
pass queried for many tables) and the planned passes behind them (:mod:`._passes`)."""

from .alignment import AlignmentResult, alignment, analyze
from .cka import cka
from .idim import IDResult, intrinsic_dimension, intrinsic_dimensions
from .moments import MomentTables
from .neighbors import cknna, mutual_knn, rsa
from .shape import shape_metric
from .spectrum import SpectrumResult, spectrum

__all__ = [
    "AlignmentResult", "IDResult", "MomentTables", "SpectrumResult", "alignment", "analyze",
    "cka", "cknna", "intrinsic_dimension", "intrinsic_dimensions", "mutual_knn", "rsa",
    "shape_metric", "spectrum",
]
