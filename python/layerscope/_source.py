"""Normalise the inputs every measure accepts: an ActivationStore, a store path, or a dict
of 2-D arrays (numpy or torch). Measures work through :class:`Source` only."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, Union

import numpy as np

from ._layers import match_layers
from ._tensor import to_numpy
from .errors import InvalidArgumentError, MismatchError, MissingLayerError, NonFiniteError

SourceLike = Union["ActivationStore", str, os.PathLike, Mapping[str, Any]]  # noqa: F821


class Source:
    """One input of a measure: either a store (streamed) or in-memory arrays."""

    def __init__(self, store: Any = None, arrays: dict[str, np.ndarray] | None = None) -> None:
        self.store = store
        self.arrays = arrays
        if store is not None:
            self.all_layers: list[str] = list(store.layers)
            self.dims: dict[str, int] = dict(store.dims)
            self.num_rows: int = int(store.num_rows)
        else:
            assert arrays is not None
            self.all_layers = list(arrays)
            self.dims = {k: int(v.shape[1]) for k, v in arrays.items()}
            self.num_rows = int(next(iter(arrays.values())).shape[0]) if arrays else 0

    @property
    def is_store(self) -> bool:
        return self.store is not None

    def short_name(self, fallback: str) -> str:
        """A short label: the store's metadata ``label``, else its model name unless that is a
        path on disk (a figure titled with a site-packages path helps nobody), else the store
        folder's name; ``fallback`` for in-memory arrays."""
        if self.store is None:
            return fallback
        meta = dict(getattr(self.store, "metadata", {}) or {})
        label = meta_get(meta, "label")
        if label:
            return str(label)
        model = meta_get(meta, "model", "model_name")
        if model and not _is_path(str(model)):
            return str(model)
        return self.store.path.name or fallback

    def exact_dtype(self, layer: str) -> type[np.floating]:
        """The float type that holds every value of ``layer`` exactly, in which it is read:
        float64 for float64 stores and arrays and for integer arrays (beyond 2**24 float32
        rounds them), float32 for float32, float16 and bfloat16."""
        if self.store is not None:
            return np.float64 if str(self.store.dtypes[layer]) == "float64" else np.float32
        assert self.arrays is not None
        a = self.arrays[layer]
        return np.float64 if a.dtype.itemsize > 4 or a.dtype.kind in "iub" else np.float32

    def select(self, layers: Sequence[str] | str | None) -> list[str]:
        """The selected layers (None = all, in store order): names and dotted globs, as
        :mod:`layerscope._layers` matches them; :class:`MissingLayerError` with the closest
        names when one matches nothing."""
        if layers is None:
            return list(self.all_layers)
        pats = [layers] if isinstance(layers, str) else list(layers)
        where = f"the store at {self.store.path}" if self.store is not None else "the arrays"
        out = match_layers(pats, self.all_layers, error=MissingLayerError, where=where)
        if not out:
            raise InvalidArgumentError("empty layer selection")
        return out

    def row_ids(self) -> np.ndarray:
        if self.store is not None:
            return np.asarray(self.store.row_ids(), dtype=np.int64)
        return np.arange(self.num_rows, dtype=np.int64)

    def read(self, layer: str, start: int = 0, stop: int | None = None,
             dtype: Any = np.float64) -> np.ndarray:
        """Rows ``[start, stop)`` of one layer as a C-contiguous array of ``dtype``."""
        if self.store is not None:
            return self.store.read(layer, start, stop, dtype=dtype)
        assert self.arrays is not None
        return np.ascontiguousarray(self.arrays[layer][start:stop], dtype=dtype)

    def take(self, layer: str, indices: np.ndarray, dtype: Any = np.float64) -> np.ndarray:
        """The rows at ``indices`` (sorted ascending) of one layer."""
        if self.store is not None:
            return self.store.take(layer, np.asarray(indices, dtype=np.int64), dtype=dtype)
        assert self.arrays is not None
        return np.ascontiguousarray(self.arrays[layer][np.asarray(indices)], dtype=dtype)


def _native_array(a: np.ndarray) -> tuple[np.ndarray, str]:
    """An in-memory layer as the Rust reader takes it: float32/float64 arrays (and float16 as
    their uint16 bit patterns) are borrowed where they lie when each row's elements are
    contiguous and rows are evenly spaced (row-major arrays and their row/column slices);
    other layouts are copied once to row-major, integer arrays to float64 (exact, as
    :meth:`Source.exact_dtype` reads them)."""
    if a.dtype not in (np.float16, np.float32, np.float64):
        a = np.ascontiguousarray(a, dtype=np.float64)
    isz = a.dtype.itemsize
    rows, dim = a.shape
    s0, s1 = a.strides
    ok = (dim <= 1 or s1 == isz) and (rows <= 1 or (s0 % isz == 0 and s0 >= dim * isz))
    if not ok:
        a = np.ascontiguousarray(a)
    if a.dtype == np.float16:
        return a.view(np.uint16), "F16"
    return a, ("F32" if a.dtype == np.float32 else "F64")


def native_part(src: Source, layers: Sequence[str]) -> Any:
    """One part of a Rust streaming pass (``_native.moments_pass``, ``minibatch_cka_pass``):
    a store selection ``(NativeStore, [layer index])`` or in-memory layers
    ``[(array, dtype)]`` (see :func:`_native_array`)."""
    if src.store is not None:
        nat = src.store._native
        return (nat, [int(nat.layer_index(x)) for x in layers])
    assert src.arrays is not None
    return [_native_array(src.arrays[x]) for x in layers]


def meta_get(meta: dict[str, Any], *keys: str) -> Any:
    """The first of ``keys`` found at the top level of a store's metadata, then under
    ``user`` (what the caller passed to capture) and ``capture`` (what capture recorded)."""
    for scope in (meta, meta.get("user"), meta.get("capture")):
        if isinstance(scope, dict):
            for k in keys:
                if scope.get(k) not in (None, ""):
                    return scope[k]
    return None


def _is_path(name: str) -> bool:
    """A model "name" that is a folder on disk (Hugging Face ``_name_or_path`` of a locally
    loaded model), as opposed to a hub-style name such as ``org/model``."""
    return os.path.isabs(name) or name.startswith(("./", "../", "~")) or os.path.isdir(name)


def resolve(source: Any) -> Source:
    """Turn a store, a path or a dict of arrays into a :class:`Source`."""
    from .store import ActivationStore, open_store

    if isinstance(source, Source):
        return source
    if isinstance(source, ActivationStore):
        return Source(store=source)
    if isinstance(source, (str, os.PathLike)):
        return Source(store=open_store(source))
    if isinstance(source, Mapping):
        arrays: dict[str, np.ndarray] = {}
        n = None
        for name, x in source.items():
            a = to_numpy(x, f"layer {name!r}")
            if a.ndim != 2:
                raise InvalidArgumentError(f"layer {name!r}: expected a 2-D array, got shape {a.shape}")
            if a.dtype.kind not in "fiu":
                raise InvalidArgumentError(f"layer {name!r}: unsupported dtype {a.dtype}")
            if n is None:
                n = a.shape[0]
            elif a.shape[0] != n:
                raise MismatchError(
                    f"layer {name!r} has {a.shape[0]} rows, expected {n} (all layers must be row-aligned)"
                )
            arrays[str(name)] = a
        if not arrays:
            raise InvalidArgumentError("no layers given")
        return Source(arrays=arrays)
    raise InvalidArgumentError(
        f"expected an ActivationStore, a store path or a dict of arrays, got {type(source).__name__}"
    )


def check_comparable(a: Source, b: Source) -> None:
    """Two sources are comparable when their row ids agree, in order. Raise saying where not."""
    ia, ib = a.row_ids(), b.row_ids()
    if ia.shape[0] != ib.shape[0]:
        raise MismatchError(f"the two sources have {ia.shape[0]} and {ib.shape[0]} rows")
    diff = np.flatnonzero(ia != ib)
    if diff.size:
        i = int(diff[0])
        raise MismatchError(
            f"row ids differ at row {i} (first of {diff.size} differing rows): "
            f"{int(ia[i])} vs {int(ib[i])}; the two captures did not see the same inputs in the same order"
        )


def check_finite(name: str, x: np.ndarray, start: int = 0) -> None:
    """Raise NonFiniteError naming the layer and first bad row."""
    bad = ~np.isfinite(x)
    if bad.any():
        row = int(np.flatnonzero(bad.any(axis=1))[0]) + start
        raise NonFiniteError(f"layer {name!r}: non-finite value (NaN/Inf) in row {row}")
