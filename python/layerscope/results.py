"""Result objects shared by every measure.

A :class:`MatrixResult` holds a layer × layer table (``values[i, j]`` for ``rows[i]`` vs
``cols[j]``) plus ``meta`` (estimator, rows used, seed, bandwidths, timings, ...). Other
results (spectra, intrinsic dimension) subclass :class:`Result` and register themselves so
that :func:`load_result` restores the right class from JSON.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ._files import open_regular
from ._text import Table, matrix_table

_REGISTRY: dict[str, type[Result]] = {}


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": _nan_to_none(obj.tolist()), "dtype": str(obj.dtype)}
    if isinstance(obj, (np.floating,)):
        f = float(obj)
        return None if not np.isfinite(f) else f
    if isinstance(obj, float):
        return None if not np.isfinite(obj) else obj
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def _nan_to_none(x: Any) -> Any:
    if isinstance(x, list):
        return [_nan_to_none(v) for v in x]
    if isinstance(x, float) and not np.isfinite(x):
        return None if np.isnan(x) else ("inf" if x > 0 else "-inf")
    return x


def _none_to_nan(x: Any) -> Any:
    if isinstance(x, list):
        return [_none_to_nan(v) for v in x]
    if x is None:
        return float("nan")
    if x == "inf":
        return float("inf")
    if x == "-inf":
        return float("-inf")
    return x


def _unjson(obj: Any) -> Any:
    if isinstance(obj, dict):
        if "__ndarray__" in obj:
            return np.asarray(_none_to_nan(obj["__ndarray__"]), dtype=obj.get("dtype", "float64"))
        return {k: _unjson(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unjson(v) for v in obj]
    return obj


def _umask() -> int:
    """The process umask, read without changing it where Linux shows it (``os.umask`` can
    only be read by setting it, which would race with other threads creating files)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` atomically (temp file in the same folder + rename), with
    the permissions of any new file (``0o666`` less the umask, not ``mkstemp``'s 0600)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """:func:`atomic_write_text` for bytes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class Result:
    """Base class: serialisation (``to_dict``/``to_json``/``save``) and the registry."""

    kind: ClassVar[str] = "result"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _REGISTRY[cls.kind] = cls

    def _fields(self) -> dict[str, Any]:
        raise NotImplementedError  # each subclass lists its fields

    @classmethod
    def _from_fields(cls, fields: dict[str, Any]) -> Result:
        return cls(**fields)

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.kind, **_jsonable(self._fields())}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the result as JSON (atomically). Returns the path."""
        atomic_write_text(path, self.to_json())
        return Path(path)


class MatrixResult(Result):
    """A layer × layer table of one measure.

    Attributes: ``values`` (float64 ``[len(rows), len(cols)]``), ``rows``, ``cols`` (layer
    names), ``meta`` (dict: measure, estimator, n, seed, timings, ...), ``extra`` (named
    arrays, e.g. per-pair cosines or confidence bounds).
    """

    kind = "matrix"

    def __init__(
        self,
        values: np.ndarray,
        rows: list[str],
        cols: list[str],
        meta: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        self.values = np.asarray(values, dtype=np.float64)
        self.rows = list(rows)
        self.cols = list(cols)
        self.meta = dict(meta or {})
        self.extra = dict(extra or {})
        if self.values.shape != (len(self.rows), len(self.cols)):
            raise ValueError(
                f"values shape {self.values.shape} != ({len(self.rows)}, {len(self.cols)})"
            )

    def _fields(self) -> dict[str, Any]:
        return {
            "values": self.values, "rows": self.rows, "cols": self.cols,
            "meta": self.meta, "extra": self.extra,
        }

    @property
    def measure(self) -> str:
        return str(self.meta.get("measure", "similarity"))

    def __getitem__(self, key: tuple[str, str]) -> float:
        r, c = key
        return float(self.values[self.rows.index(r), self.cols.index(c)])

    def to_table(self) -> Table:
        """The values as a :class:`~layerscope._text.Table` (rows × cols; no pandas needed)."""
        return matrix_table(self.values, self.rows, self.cols)

    def to_pandas(self) -> Any:
        """A pandas DataFrame (rows × cols); needs the ``plot`` extra."""
        return self.to_table().to_pandas()

    def diagonal_offset(self, k: int = 1) -> np.ndarray:
        """``values[i, i+k]``: e.g. the adjacent-layer curve for ``k=1``."""
        n = min(len(self.rows), len(self.cols))
        return np.array([self.values[i, i + k] for i in range(n - k)])

    def plot(self, ax: Any = None, title: str | None = None, annotate: bool | None = None) -> Any:
        """Heatmap of ``values``; returns the matplotlib Figure."""
        from .plots import heatmap

        return heatmap(self, ax=ax, title=title, annotate=annotate)

    def __repr__(self) -> str:
        est = self.meta.get("estimator", "")
        return (
            f"<{type(self).__name__} {self.measure}{' ' + est if est else ''} "
            f"{len(self.rows)}×{len(self.cols)} n={self.meta.get('n', '?')}>"
        )


def load_result(path: str | os.PathLike[str]) -> Result:
    """Load a result saved with ``.save(path)`` (JSON), restoring its class."""
    with open_regular(path, "the saved result") as f:
        data = json.loads(f.read().decode("utf-8"))
    return result_from_dict(data)


def result_from_dict(data: dict[str, Any]) -> Result:
    kind = data.get("type", "matrix")
    cls = _REGISTRY.get(kind)
    if cls is None:
        from .errors import FormatError

        raise FormatError(f"unknown result type {kind!r}")
    fields = {k: _unjson(v) for k, v in data.items() if k != "type"}
    return cls._from_fields(fields)
