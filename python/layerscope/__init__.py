"""layerscope: activation statistics for neural networks.

Capture activations into a streamed store, then compute — exactly and in one pass where the
algebra allows — CKA (linear/RBF; biased, debiased, minibatch), spectra and subspace
alignment (principal angles, SVCCA/PWCCA, CCA, Procrustes), intrinsic dimension (TwoNN, MLE,
GRIDE, PCA) and neighbourhood measures (RSA, mutual kNN) across all layer pairs.

Names are loaded lazily so that ``import layerscope`` stays fast and never imports torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from ._native import __version__
from .errors import (
    CaptureError,
    FormatError,
    InvalidArgumentError,
    LayerscopeError,
    MemoryBudgetError,
    MismatchError,
    MissingLayerError,
    NonFiniteError,
    StoreExistsError,
    StoreIOError,
    StoreNotFoundError,
)
from .results import MatrixResult, Result, load_result

_LAZY = {
    "ActivationStore": "store",
    "StoreWriter": "store",
    "open": "store",
    "write_store": "store",
    "capture": "capture",
    "Capture": "capture",
    "cka": "cka",
    "spectrum": "alignment",
    "alignment": "alignment",
    "analyze": "alignment",
    "SpectrumResult": "alignment",
    "intrinsic_dimension": "idim",
    "rsa": "idim",
    "mutual_knn": "idim",
    "IDResult": "idim",
    "report": "report",
}


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'layerscope' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))


__all__ = [
    "__version__", "LayerscopeError", "FormatError", "MismatchError", "MissingLayerError",
    "StoreNotFoundError", "StoreExistsError", "StoreIOError", "NonFiniteError",
    "InvalidArgumentError", "MemoryBudgetError", "CaptureError", "MatrixResult", "Result",
    "load_result", *_LAZY,
]
