"""The measures, one module each: CKA (:mod:`.cka`), spectra (:mod:`.spectrum`), subspace
alignment and the one-pass ``analyze`` (:mod:`.alignment`), intrinsic dimension
(:mod:`.idim`), RSA and mutual kNN (:mod:`.neighbors`); :class:`MomentTables` (one moment
pass queried for many tables) and the planned passes behind them (:mod:`._passes`)."""

from .alignment import AlignmentResult, alignment, analyze
from .cka import cka
from .idim import IDResult, intrinsic_dimension, intrinsic_dimensions
from .moments import MomentTables
from .neighbors import mutual_knn, rsa
from .spectrum import SpectrumResult, spectrum

__all__ = [
    "AlignmentResult", "IDResult", "MomentTables", "SpectrumResult", "alignment", "analyze",
    "cka", "intrinsic_dimension", "intrinsic_dimensions", "mutual_knn", "rsa", "spectrum",
]
