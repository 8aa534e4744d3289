"""The activation store: a folder of safetensors shards plus a JSON manifest.

See ``docs/FORMAT.md`` for the normative format. :func:`open_store` (``layerscope.open``)
validates a store and memory-maps it; :func:`write_store` and :class:`StoreWriter` write one
atomically shard by shard, so an interrupted capture leaves a valid store of the shards that
finished. All I/O runs in Rust with the GIL released.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import _native
from ._commands import command
from ._defaults import dtype_name
from ._memory import add_max_memory_arg, check_budget, max_memory_bytes
from ._tensor import to_numpy, to_store_array
from ._text import escape
from .errors import InvalidArgumentError, MemoryBudgetError, MismatchError, NonFiniteError

__all__ = ["ActivationStore", "StoreWriter", "open_store", "open", "write_store", "add_cli"]

def _read_dtype(dtype: Any) -> str:
    name = dtype_name(dtype)
    if name not in ("float32", "float64"):
        raise InvalidArgumentError(f"read dtype must be float32 or float64, got {dtype!r}")
    return name


def _int64_1d(what: str, x: Any, rows: int | None = None) -> np.ndarray:
    a = to_numpy(x, what)
    if a.ndim != 1 or (a.size and a.dtype.kind not in "iu"):
        raise InvalidArgumentError(f"{what}: expected a 1-D integer array, got {a.dtype} {a.shape}")
    if a.dtype.kind == "u" and a.size and int(a.max()) > np.iinfo(np.int64).max:
        raise InvalidArgumentError(
            f"{what}: {int(a.max())} does not fit a row id (signed 64 bits: below 2**63)")
    if rows is not None and a.shape[0] != rows:
        raise MismatchError(f"{what} has {a.shape[0]} entries for {rows} rows")
    return np.ascontiguousarray(a, dtype=np.int64)


class ActivationStore:
    """An opened, validated activation store (memory-mapped; cheap to open).

    Attributes: ``path``, ``layers`` (names in manifest order), ``dims`` and ``dtypes``
    (dicts by layer), ``num_rows``, ``metadata`` (dict), ``shards`` (list of dicts with
    file, rows, bytes, sha256, start_row), ``columns`` (optional row columns),
    ``complete`` (False when the writer was interrupted), ``nbytes`` (all shard files),
    ``verified`` (every read checks the sha256 of the shards it touches: opened with
    ``verify=True``).

    Every read first checks that each shard it touches is still the file that was opened
    (same inode, size and modification time): a shard truncated or modified since gives
    :class:`MismatchError` instead of other numbers or a SIGBUS crash.
    """

    def __init__(self, native: Any) -> None:
        self._native = native
        self.path = Path(native.path)
        self.layers: list[str] = list(native.layers)
        self.dims: dict[str, int] = dict(zip(self.layers, native.dims))
        self.dtypes: dict[str, str] = dict(zip(self.layers, native.dtypes))
        self.num_rows: int = int(native.num_rows)
        self.metadata: dict[str, Any] = json.loads(native.metadata_json)
        self.shards: list[dict[str, Any]] = list(native.shards)
        self.columns: list[str] = list(native.columns)
        self.complete: bool = bool(native.complete)
        self.nbytes: int = int(native.total_bytes)
        self.verified: bool = bool(native.verifies_checksums)

    def fingerprint(self) -> str:
        """SHA-256 of the manifest (``layerscope.json``, which lists every shard's size and
        checksum): equal fingerprints mean the same rows and values."""
        h = hashlib.sha256()
        with (self.path / "layerscope.json").open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()

    def __len__(self) -> int:
        return self.num_rows

    def __contains__(self, layer: object) -> bool:
        return layer in self.dims

    def __repr__(self) -> str:
        shown = ", ".join(f"{n}[{self.dims[n]}]" for n in self.layers[:6])
        more = f", … +{len(self.layers) - 6}" if len(self.layers) > 6 else ""
        dts = sorted(set(self.dtypes.values()))
        state = "" if self.complete else ", incomplete"
        return (
            f"ActivationStore({str(self.path)!r}, rows={self.num_rows}, layers={len(self.layers)} "
            f"({shown}{more}), dtype={'/'.join(dts) or '-'}, shards={len(self.shards)}{state})"
        )

    def _check_layer(self, layer: str) -> None:
        self._native.layer_index(layer)  # MissingLayerError listing the names

    def row_ids(self) -> np.ndarray:
        """The ``__row_id__`` of every row (int64). Two stores are comparable when these
        agree in order."""
        return self._native.row_ids()

    def column(self, name: str) -> np.ndarray | None:
        """An optional int64 row column (``'__sample__'``, ``'__position__'``,
        ``'__label__'``…), or None when the store does not have it."""
        return self._native.column(name)

    def read(
        self, layer: str, start: int = 0, stop: int | None = None, dtype: Any = np.float32
    ) -> np.ndarray:
        """Rows ``[start, stop)`` of ``layer`` as a C-contiguous ``(rows, dim)`` array of
        float32 or float64 (bf16/f16 convert exactly). NaN/Inf are returned as stored."""
        kind = _read_dtype(dtype)
        start, stop = self._range(start, stop)
        return self._native.read(layer, start, stop, kind)

    def _range(self, start: int, stop: int | None) -> tuple[int, int]:
        stop = self.num_rows if stop is None else stop
        start, stop = int(start), int(stop)
        if not 0 <= start <= stop <= self.num_rows:
            raise InvalidArgumentError(
                f"row range [{start}, {stop}) is not within [0, {self.num_rows}]"
            )
        return start, stop

    def take(self, layer: str, indices: Any, dtype: Any = np.float64) -> np.ndarray:
        """The rows at ``indices`` (any order, each in ``[0, num_rows)``) of ``layer``."""
        kind = _read_dtype(dtype)
        idx = _int64_1d("indices", indices)
        return self._native.take(layer, idx, kind)

    def read_block(
        self,
        layers: Sequence[str] | None = None,
        start: int = 0,
        stop: int | None = None,
        dtype: Any = np.float32,
    ) -> dict[str, np.ndarray]:
        """Rows ``[start, stop)`` of several layers (default: all), read in parallel:
        ``{layer: (rows, dim) array}`` in the given order."""
        names = list(self.layers if layers is None else layers)
        start, stop = self._range(start, stop)
        arrays = self._native.read_block(names, start, stop, _read_dtype(dtype), False)
        return dict(zip(names, arrays))

    def blocks(
        self,
        layers: Sequence[str] | None = None,
        block_rows: int | None = None,
        dtype: Any = np.float32,
        *,
        release: bool = True,
        reuse: bool = False,
        max_memory: int | str | None = None,
    ) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """Yield ``(start, {layer: block})`` over all rows, ``block_rows`` at a time, for any
        subset of layers (default: all, manifest order) across all shards.

        Each block is a fresh float32/float64 array (bf16/f16 converted exactly): one that
        nothing else references. Arrays of earlier blocks that the caller has dropped (no
        view or container of them left) are refilled rather than allocated again — up to
        two per layer, the block being filled and the one held meanwhile — so a loop that
        lets go of each block does not page-fault fresh memory per block; a block that is
        kept is never touched again. With ``reuse=True`` the same arrays are refilled for
        every block (views of one buffer per layer; the last block is a shorter view) even
        while the caller holds them: the fastest way to stream — copy a block if you keep
        it.
        ``block_rows=None`` picks the rows that make a block of about 16 MiB of output (all
        selected layers together; at least 1 row). With ``release=True`` (default) the
        memory-mapped pages of a block are dropped from the process's resident set once it
        is read, so streaming a store of any size keeps the peak RSS at a few blocks (the OS
        page cache still holds the data). A block larger than the store is one block of all
        rows; one that does not fit the memory budget (``max_memory``, else
        ``LAYERSCOPE_MAX_MEMORY``, else the machine's) raises ``MemoryBudgetError`` before
        anything is read. The blocks are read by the core's one block reader
        (``layerscope_core::store::stream``), one per step, with the GIL released."""
        budget = max_memory_bytes(max_memory)
        names = list(self.layers if layers is None else layers)
        for n in names:
            self._check_layer(n)
        kind = _read_dtype(dtype)
        row_bytes = sum(self.dims[n] for n in names) * (4 if kind == "float32" else 8)
        if block_rows is None:
            block_rows = max(1, (16 << 20) // max(row_bytes, 1))
        if isinstance(block_rows, bool) or not isinstance(block_rows, (int, np.integer)) \
                or block_rows < 1:
            raise InvalidArgumentError(
                f"block_rows must be a positive integer, got {block_rows!r}")
        block_rows = max(1, min(int(block_rows), self.num_rows))
        # Fresh arrays: the block being filled and the one the caller holds (the native
        # iterator's pool keeps at most these two per layer).
        check_budget(
            (1 if reuse else 2) * block_rows * row_bytes,
            f"blocks of {block_rows} rows of {len(names)} layers ({kind})",
            "use a smaller block_rows", budget)
        return iter(self._native.blocks(names, block_rows, kind, release, reuse))

    def release(self, start: int = 0, stop: int | None = None) -> None:
        """Drop the mapped pages of rows ``[start, stop)`` from the resident set (a hint;
        the data stays readable)."""
        self._native.release(*self._range(start, stop))

    def find_nonfinite(self, layer: str) -> int | None:
        """The first row of ``layer`` holding NaN or ±Inf, or None."""
        return self._native.find_nonfinite(layer)

    def check_finite(self, layers: Sequence[str] | str | None = None) -> None:
        """Raise :class:`NonFiniteError` naming the first layer/row with NaN or ±Inf."""
        names = (
            [layers] if isinstance(layers, str) else list(self.layers if layers is None else layers)
        )
        for n in names:
            row = self.find_nonfinite(n)
            if row is not None:
                raise NonFiniteError(
                    f"{self.path}: layer {n!r}: non-finite value (NaN/Inf) in row {row}"
                )

    def verify(self) -> None:
        """Recompute every shard's sha256 and compare with the manifest
        (:class:`MismatchError` naming the shard if one differs)."""
        self._native.verify()

    def info(self) -> dict[str, Any]:
        """A JSON-ready summary (what ``layerscope info --json`` prints)."""
        return {
            "path": str(self.path),
            "num_rows": self.num_rows,
            "complete": self.complete,
            "layers": [
                {"name": n, "dim": self.dims[n], "dtype": self.dtypes[n]} for n in self.layers
            ],
            "columns": self.columns,
            "shards": self.shards,
            "bytes": self.nbytes,
            "metadata": self.metadata,
        }


def open_store(path: str | os.PathLike, *, verify: bool = False) -> ActivationStore:
    """Open and validate a store: the manifest, every shard's header, sizes and layout.

    ``verify=True``: every read also checks the sha256 of each shard it touches against the
    manifest, once per shard, before the first of its rows is used (no extra pass over the
    data; :meth:`ActivationStore.verify` checks every shard at once). A shard that differs
    gives :class:`MismatchError` naming it."""
    return ActivationStore(_native.NativeStore.open(os.fspath(path), verify))


open = open_store  # noqa: A001 — ``layerscope.open``


def _metadata_json(metadata: Mapping[str, Any] | None) -> str:
    from . import __version__

    if not isinstance(metadata, (Mapping, type(None))):
        raise InvalidArgumentError("metadata must be a dict")
    meta = dict(metadata or {})
    meta.setdefault("layerscope_version", __version__)
    try:
        return json.dumps(meta)
    except (TypeError, ValueError) as e:
        raise InvalidArgumentError(f"metadata is not JSON-serialisable: {e}") from None


class StoreWriter:
    """Write a store batch by batch (usable from a background thread; the GIL is released
    while writing).

    ``with StoreWriter(path, dtype="bfloat16") as w: w.append({"layer": batch})``.
    The first append fixes layer names, dims and optional columns. A shard is committed
    (temp file + rename, then the manifest) whenever ``shard_bytes`` are buffered. On an
    exception inside ``with``, the buffered rows are dropped, finished shards stay a valid
    store (``complete=False``) and the exception propagates.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        dtype: Any = None,
        shard_bytes: int = 256 << 20,
        metadata: Mapping[str, Any] | None = None,
        overwrite: bool = False,
    ) -> None:
        if int(shard_bytes) < 1:
            raise InvalidArgumentError("shard_bytes must be positive")
        self.path = Path(path)
        self._native = _native.NativeWriter.create(
            os.fspath(path),
            int(shard_bytes),
            bool(overwrite),
            _metadata_json(metadata),
            None if dtype is None else dtype_name(dtype),
        )
        self.store: ActivationStore | None = None

    @property
    def rows_written(self) -> int:
        """Rows appended so far."""
        return int(self._native.rows_appended)

    def append(
        self,
        batch: Mapping[str, Any],
        row_ids: Any = None,
        columns: Mapping[str, Any] | None = None,
    ) -> None:
        """Append one row-aligned batch ``{layer: (rows, dim) array}`` (numpy or torch;
        torch bf16 is stored bit-exactly). ``row_ids`` default to the running row count."""
        if not isinstance(batch, Mapping) or not batch:
            raise InvalidArgumentError("append needs a non-empty dict {layer: 2-D array}")
        layers = [(str(n), *to_store_array(f"layer {n!r}", x)) for n, x in batch.items()]
        rows = layers[0][1].shape[0]
        ids = None if row_ids is None else _int64_1d("row_ids", row_ids, rows)
        cols = [(str(n), _int64_1d(f"column {n!r}", v, rows)) for n, v in (columns or {}).items()]
        self._native.append(layers, ids, cols)

    def close(self, *, complete: bool = True) -> ActivationStore:
        """Write the remaining rows, mark the store complete (``complete=False``: keep the
        rows but mark the store incomplete — what a capture stopped by an exception or
        Ctrl-C does) and open it."""
        if self.store is None:
            self._native.finish(bool(complete))
            self.store = open_store(self.path)
        return self.store

    def abort(self) -> None:
        """Stop without writing buffered rows; finished shards stay a valid store."""
        self._native.abort()

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_store(
    path: str | os.PathLike,
    arrays: Mapping[str, Any],
    *,
    row_ids: Any = None,
    dtype: Any = None,
    shard_bytes: int = 256 << 20,
    metadata: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    columns: Mapping[str, Any] | None = None,
) -> ActivationStore:
    """Write ``{layer: (rows, dim) array}`` (numpy or torch) as a store and open it.

    ``dtype`` (float16/bfloat16/float32/float64) converts every layer (round to nearest
    even); None keeps each array's dtype. ``row_ids`` default to ``0..rows-1``.
    """
    if not isinstance(arrays, Mapping) or not arrays:
        raise InvalidArgumentError("write_store needs a non-empty dict {layer: 2-D array}")
    w = StoreWriter(
        path, dtype=dtype, shard_bytes=shard_bytes, metadata=metadata, overwrite=overwrite
    )
    try:
        w.append(arrays, row_ids=row_ids, columns=columns)
    except BaseException:
        w.abort()
        raise
    return w.close()


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _pass_line(s: ActivationStore, max_memory: int | None) -> str:
    """Whether one all-pairs moment pass over every layer of ``s`` fits the budget (the
    core's check and message: how many layers fit per call otherwise)."""
    dims = [int(s.dims[n]) for n in s.layers]
    if not dims:
        return "no layers"
    compute = "float64" if any(str(s.dtypes[n]) in ("float64", "F64") for n in s.layers) \
        else "float32"
    br = min(int(_native.default_block_rows(dims, compute)), max(s.num_rows, 1))
    try:
        _native.check_moment_memory(dims, br, compute, max_memory)
    except MemoryBudgetError as e:
        return f"does not fit: {e}"
    return f"{_human(int(_native.pass_bytes(dims, br, compute)))} for all {len(dims)} layers"


def _info_cmd(args: argparse.Namespace) -> int:
    """describe a store: layers, dims, dtypes, rows, shards, bytes"""
    from ._memory import memory_budget

    budget = memory_budget(args.max_memory)
    if args.path is None:
        if not args.budget:
            raise InvalidArgumentError("give a store folder, or --budget")
        if args.json:
            print(json.dumps({"memory_budget": {"bytes": budget.bytes,
                                                "source": budget.source}}, indent=2))
        else:
            print(f"budget   {_human(budget.bytes)}  ({budget.bytes} bytes; {budget.source})")
        return 0
    s = open_store(args.path, verify=args.verify)
    if args.verify:
        s.verify()
    info = s.info()
    if args.json:
        info["memory_budget"] = {"bytes": budget.bytes, "source": budget.source}
        print(json.dumps(info, indent=2))
        return 0
    state = "complete" if s.complete else "INCOMPLETE (the writer did not finish)"
    print(f"store    {escape(s.path)}  ({state})")
    print(f"rows     {s.num_rows}")
    print(f"shards   {len(s.shards)}  ({_human(s.nbytes)}, {s.nbytes} bytes)")
    if args.verify:
        print("checksum ok (sha256 of every shard)")
    names = {n: escape(n) for n in s.layers}  # a crafted name must not drive the terminal
    width = max((len(n) for n in names.values()), default=5)
    print(f"layers   {len(s.layers)}")
    for n in s.layers:
        print(f"  {names[n]:<{width}}  dim {s.dims[n]:>6}  {s.dtypes[n]}")
    if s.columns:
        print(f"columns  {escape(', '.join(s.columns))}")
    if s.metadata:
        print(f"metadata {json.dumps(s.metadata, sort_keys=True)}")
    print(f"budget   {_human(budget.bytes)}  ({budget.source})")
    print(f"pass     {_pass_line(s, args.max_memory)}")
    return 0


def _verify_cmd(args: argparse.Namespace) -> int:
    """check a store: structure, sizes and every shard's sha256"""
    s = open_store(args.path)  # structure, sizes,
    s.verify()  # then the sha256 of every shard
    print(f"ok: {escape(s.path)}: {len(s.shards)} shards, {s.num_rows} rows, {s.nbytes} bytes (sha256)")
    if args.finite:
        s.check_finite()  # NonFiniteError naming the layer and row -> exit status 2
        print(f"ok: all values of {len(s.layers)} layers are finite")
    return 0


def add_cli(sub: Any) -> None:
    """Register ``layerscope info PATH [--json] [--verify]`` and
    ``layerscope verify PATH [--finite]``."""
    p = command(sub, "info", _info_cmd)
    p.add_argument("path", nargs="?", default=None, help="store folder")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.add_argument("--verify", action="store_true", help="also check every shard's sha256")
    p.add_argument("--budget", action="store_true",
                   help="print the memory budget in force and its source (no store needed)")
    add_max_memory_arg(p)
    v = command(sub, "verify", _verify_cmd)
    v.add_argument("path", help="store folder")
    v.add_argument("--finite", action="store_true", help="also fail on NaN/Inf values")
