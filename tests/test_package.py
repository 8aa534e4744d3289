"""The package surface: exports, error classes, and functions named like their modules."""

from __future__ import annotations

import importlib
import subprocess
import sys

import layerscope
import pytest


@pytest.mark.parametrize("name, module", [
    ("cka", "layerscope.measures.cka"), ("capture", "layerscope.capture"),
    ("alignment", "layerscope.measures.alignment"), ("report", "layerscope.report")])
def test_function_named_like_its_module_stays_callable(name: str, module: str) -> None:
    mod = importlib.import_module(module)
    fn = getattr(layerscope, name)
    assert callable(fn) and not isinstance(fn, type(sys))
    assert fn is getattr(mod, name)


def test_import_layerscope_is_light() -> None:
    code = "import sys, layerscope; print('torch' in sys.modules, 'matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_every_exported_name_resolves() -> None:
    for name in layerscope.__all__:
        assert getattr(layerscope, name) is not None
    with pytest.raises(AttributeError):
        layerscope.no_such_name  # noqa: B018


def test_errors_are_layerscope_errors() -> None:
    for cls in (layerscope.FormatError, layerscope.MismatchError, layerscope.MissingLayerError,
                layerscope.NonFiniteError, layerscope.InvalidArgumentError,
                layerscope.MemoryBudgetError, layerscope.StoreNotFoundError):
        assert issubclass(cls, layerscope.LayerscopeError)


def test_every_core_error_arrives_as_its_class(tmp_path: object) -> None:
    """The binding maps each core error variant to one class of ``layerscope.errors`` (one
    ``match`` in rust/python/src/errors.rs): raised from the Rust side here, not Python."""
    from pathlib import Path

    import numpy as np
    from layerscope import _native, errors

    x = np.random.default_rng(0).standard_normal((30, 3))
    bad = x.copy()
    bad[4, 1] = np.nan
    root = Path(str(tmp_path))
    cases = [
        (errors.InvalidArgumentError, lambda: _native.rbf_hsic([], None)),
        (errors.MismatchError, lambda: _native.rbf_hsic([x], [x[:20]])),
        (errors.NonFiniteError, lambda: _native.rbf_hsic([bad], None)),
        (errors.MemoryBudgetError, lambda: _native.rbf_hsic([x], None, max_memory=100)),
        (errors.StoreNotFoundError, lambda: _native.NativeStore.open(root / "nothing")),
    ]
    (root / "broken").mkdir()
    (root / "broken" / "layerscope.json").write_text("{not json")
    cases.append((errors.FormatError, lambda: _native.NativeStore.open(root / "broken")))
    layerscope.write_store(root / "ok", {"a": x.astype(np.float32)})
    store = _native.NativeStore.open(root / "ok")
    cases.append((errors.MissingLayerError, lambda: store.layer_index("nope")))
    cases.append((errors.StoreExistsError,
                  lambda: _native.NativeWriter.create(root / "ok", 1 << 20, False, "{}")))

    def stop(done: int, total: int) -> None:
        raise KeyboardInterrupt

    cases.append((errors.Interrupted, lambda: _native.rbf_hsic([x, x], None, progress=stop)))
    for cls, call in cases:
        with pytest.raises(cls) as info:
            call()
        assert type(info.value) is cls, (cls, type(info.value))
    assert issubclass(errors.Interrupted, KeyboardInterrupt)  # `except KeyboardInterrupt` holds
