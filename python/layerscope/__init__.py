"""layerscope: activation statistics for neural networks.

Capture activations into a streamed store, then compute — exactly and in one pass where the
algebra allows — CKA (linear/RBF; biased, debiased, minibatch), spectra and subspace
alignment (principal angles, SVCCA/PWCCA, CCA, Procrustes), intrinsic dimension (TwoNN, MLE,
GRIDE, PCA) and neighbourhood measures (RSA, mutual kNN) across all layer pairs.

Names are loaded lazily so that ``import layerscope`` stays fast and never imports torch.
"""

from __future__ import annotations

import importlib
import sys
import types
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
    "intrinsic_dimensions": "idim",
    "rsa": "idim",
    "mutual_knn": "idim",
    "IDResult": "idim",
    "report": "report",
    "memory_budget": "_memory",
    "plan": "planner",
    "Plan": "planner",
    "MemoryBudget": "_memory",
}


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'layerscope' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value


# Functions exported under the name of the submodule that defines them (``layerscope.cka`` is
# the function, ``layerscope/cka.py`` its module). Importing such a submodule makes Python bind
# the package attribute to the module; the package class below keeps the function bound
# instead (the module stays importable: ``importlib.import_module("layerscope.cka")``).
_SAME_NAME = frozenset(k for k, v in _LAZY.items() if k == v)


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value: Any) -> None:
        if name in _SAME_NAME and isinstance(value, types.ModuleType):
            value = getattr(value, name, value)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))


__all__ = [
    "__version__", "LayerscopeError", "FormatError", "MismatchError", "MissingLayerError",
    "StoreNotFoundError", "StoreExistsError", "StoreIOError", "NonFiniteError",
    "InvalidArgumentError", "MemoryBudgetError", "CaptureError", "MatrixResult", "Result",
    "load_result", *_LAZY,
]
