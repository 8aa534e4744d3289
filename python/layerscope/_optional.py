"""The optional dependencies, each imported where it is first needed: a missing one is a
:class:`~layerscope.errors.MissingDependencyError` naming the extra that installs it, never a
bare ``ModuleNotFoundError``. ``import layerscope`` needs only numpy and tqdm."""

from __future__ import annotations

from importlib import import_module
from typing import Any

from .errors import MissingDependencyError

# Each optional third-party package and the extra that installs it (pyproject.toml).
EXTRAS = {"pandas": "plot", "matplotlib": "plot", "torch": "torch", "transformers": "torch",
          "h5py": "convert", "pyarrow": "convert", "ray": "ray"}


def require(package: str, why: str) -> Any:
    """The module ``package`` (one of :data:`EXTRAS`), or :class:`MissingDependencyError`
    saying that ``why`` needs it and which extra installs it."""
    extra = EXTRAS[package]
    try:
        return import_module(package)
    except ImportError as e:
        # name what is missing when it is one of the package's own dependencies
        cause = f" ({e})" if e.name not in (None, package) else ""
        raise MissingDependencyError(
            f"{why}: {package} is not installed{cause}; pip install 'layerscope[{extra}]'"
        ) from None
