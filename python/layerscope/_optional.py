"""The optional dependencies, each imported where it is first needed: a missing one is a
:class:`~layerscope.errors.MissingDependencyError` naming the extra that installs it, never a
bare ``ModuleNotFoundError``. ``import layerscope`` needs only numpy and tqdm."""

from __future__ import annotations

from typing import Any

from .errors import MissingDependencyError


def _missing(package: str, extra: str, why: str, error: ImportError) -> MissingDependencyError:
    # name what is missing when it is one of the package's own dependencies
    cause = f" ({error})" if error.name not in (None, package) else ""
    return MissingDependencyError(
        f"{why}: {package} is not installed{cause}; pip install 'layerscope[{extra}]'")


def pandas(why: str) -> Any:
    """The ``pandas`` module (extra ``plot``)."""
    try:
        import pandas
    except ImportError as e:
        raise _missing("pandas", "plot", why, e) from None
    return pandas


def matplotlib(why: str) -> Any:
    """The ``matplotlib`` module (extra ``plot``)."""
    try:
        import matplotlib
    except ImportError as e:
        raise _missing("matplotlib", "plot", why, e) from None
    return matplotlib


def torch(why: str) -> Any:
    """The ``torch`` module (extra ``torch``)."""
    try:
        import torch
    except ImportError as e:
        raise _missing("torch", "torch", why, e) from None
    return torch


def transformers(why: str) -> Any:
    """The ``transformers`` module (extra ``torch``)."""
    try:
        import transformers
    except ImportError as e:
        raise _missing("transformers", "torch", why, e) from None
    return transformers
