"""The package surface: lazy exports, error classes, and functions named like their modules."""

from __future__ import annotations

import importlib
import subprocess
import sys

import layerscope
import pytest


@pytest.mark.parametrize("name", ["cka", "capture", "alignment", "report"])
def test_function_named_like_its_module_stays_callable(name: str) -> None:
    mod = importlib.import_module(f"layerscope.{name}")
    fn = getattr(layerscope, name)
    assert callable(fn) and not isinstance(fn, type(sys))
    assert fn is getattr(mod, name)


def test_import_layerscope_is_light() -> None:
    code = "import sys, layerscope; print('torch' in sys.modules, 'matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_every_lazy_name_resolves() -> None:
    for name in layerscope.__all__:
        assert getattr(layerscope, name) is not None
    with pytest.raises(AttributeError):
        layerscope.no_such_name  # noqa: B018


def test_errors_are_layerscope_errors() -> None:
    for cls in (layerscope.FormatError, layerscope.MismatchError, layerscope.MissingLayerError,
                layerscope.NonFiniteError, layerscope.InvalidArgumentError,
                layerscope.MemoryBudgetError, layerscope.StoreNotFoundError):
        assert issubclass(cls, layerscope.LayerscopeError)
