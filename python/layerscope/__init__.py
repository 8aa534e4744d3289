"""layerscope: activation statistics for neural networks.

Capture activations into a streamed store, then compute — exactly and in one pass where the
algebra allows — CKA (linear/RBF; biased, debiased, minibatch), spectra and subspace
alignment (principal angles, SVCCA/PWCCA, CCA, Procrustes), intrinsic dimension (TwoNN, MLE,
GRIDE, PCA) and neighbourhood measures (RSA, mutual kNN, CKNNA) across all layer pairs.

The packages show the architecture: :mod:`layerscope.store` (the activation store),
:mod:`layerscope.capture` (torch hooks → store), :mod:`layerscope.measures` (one module per
measure), :mod:`layerscope.report` and :mod:`layerscope.demo`. ``import layerscope`` never
imports torch, pandas or matplotlib: the modules import them where they are used.
"""

from __future__ import annotations

from ._memory import MemoryBudget, memory_budget
from ._native import __version__
from ._validate import Placement, RunOptions
from .capture import Capture, capture
from .dumps import convert
from .errors import (
    CaptureError,
    ClusterError,
    FormatError,
    InvalidArgumentError,
    LayerscopeError,
    LockedError,
    MemoryBudgetError,
    MismatchError,
    MissingDependencyError,
    MissingLayerError,
    NonFiniteError,
    StoreExistsError,
    StoreIOError,
    StoreLockedError,
    StoreNotFoundError,
    UnknownArgumentError,
)
from .measures import (
    IDResult,
    SpectrumResult,
    alignment,
    analyze,
    cka,
    cknna,
    intrinsic_dimension,
    intrinsic_dimensions,
    mutual_knn,
    rsa,
    shape_metric,
    spectrum,
)
from .planner import Plan, plan
from .report import report
from .results import MatrixResult, Result, load_result
from .runs import BatchResult, batch
from .store import ActivationStore, StoreWriter, open, write_store

__all__ = [
    "__version__", "RunOptions", "Placement", "LayerscopeError", "FormatError", "MismatchError", "MissingLayerError",
    "StoreNotFoundError", "StoreExistsError", "StoreIOError", "NonFiniteError",
    "InvalidArgumentError", "UnknownArgumentError", "MemoryBudgetError", "CaptureError",
    "ClusterError", "MissingDependencyError", "MatrixResult", "Result",
    "load_result", "ActivationStore", "StoreWriter", "open", "write_store", "capture",
    "Capture", "convert", "cka", "spectrum", "alignment", "analyze", "SpectrumResult",
    "intrinsic_dimension", "intrinsic_dimensions", "rsa", "mutual_knn", "cknna", "shape_metric", "IDResult", "report",
    "memory_budget", "plan", "Plan", "MemoryBudget", "batch", "BatchResult", "LockedError",
    "StoreLockedError",
]
