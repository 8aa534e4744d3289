"""``layerscope.convert`` (this package is :mod:`layerscope.dumps`): the activation dumps
people already have (safetensors, npy, npz, HDF5, Hugging Face ``datasets`` Arrow caches such
as SAELens's, ``.pt`` hidden states and TransformerLens caches) into an activation store,
streamed file by file with bounded memory; nothing read from a file is executed. The readers
are in :mod:`layerscope.dumps.formats`; ``docs/dumps.md`` has one example per format."""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._commands import command
from .._defaults import STORE_DTYPES, dtype_name
from .._files import check_regular
from .._layers import match_layers
from .._progress import Progress, stage
from .._tensor import Bits
from .._validate import DTYPE, PROGRESS, Bool, OneOf, Strings, Text, validated
from ..capture.rowids import index_row_ids
from ..errors import (
    FormatError,
    InvalidArgumentError,
    MismatchError,
    MissingLayerError,
    StoreExistsError,
)
from ..store import ActivationStore, StoreWriter, open_store
from . import formats
from .formats import FORMATS, Keys, Part

__all__ = ["convert", "FORMATS", "add_cli"]


@validated(_where="layerscope.convert", format=OneOf("auto", *FORMATS), layers=(None, Strings(
    "a layer name or glob")), mask=(None, Text()), row_ids=(None, Text()), dtype=(None, DTYPE),
    overwrite=Bool(), progress=PROGRESS)
def convert(
    sources: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    format: str = "auto",
    layers: Sequence[str] | str | None = None,
    mask: str | None = None,
    row_ids: str | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
    progress: Any = True,
) -> ActivationStore:
    """Convert activation dumps into an activation store at ``out``; returns the store.

    ``sources``: files, folders or globs (natural order: ``batch-2`` before ``batch-10``).
    Files that hold all layers (npz, HDF5, per-layer safetensors, Arrow) are consecutive row
    blocks in the order given; ``.npy`` files and per-prompt safetensors files are one layer
    each (named after the file). ``format``: one of :data:`FORMATS`, or ``"auto"`` (by
    extension, else by content; the format found is printed and recorded in the metadata).

    Rows: a ``[N, d]`` layer gives ``N`` rows (``__sample__`` = running row index,
    ``__position__`` = -1); a ``[B, T, d]`` token dump gives one row per kept token — every
    token, or those where ``mask`` (a key of the source; by default a key ``attention_mask``
    or ``mask`` of shape ``[B, T]``) is non-zero — with ``__sample__`` (running sample index)
    and ``__position__``. Row ids are the exporter's ``row_ids="index"`` rule, ``sample *
    2**20 + position + 1``, so two dumps of two models over the same inputs line up; or the
    key ``row_ids`` of the source (per row, or per sample for token dumps: then it replaces
    the running sample index). ``layers``: names or globs to keep (default: all).
    ``dtype``: the stored dtype (default: the sources' when all layers share one, else each
    layer's own; bf16 stays bf16 bit-exactly).

    The store appears at ``out`` only when the conversion has finished (it is written beside
    it under a temporary name, then renamed): a failure or an interruption leaves nothing under
    ``out``. An existing ``out`` needs ``overwrite=True`` (checked before anything is read).
    """
    paths = formats.expand([sources] if isinstance(sources, (str, os.PathLike)) else sources)
    out = Path(out)
    _check_out(out, overwrite)
    keys = Keys(mask, row_ids)
    for p in paths:  # a named pipe, socket or device is refused before any reader opens it
        if not p.is_dir():
            check_regular(p, "the dump")
    found = sorted({formats.detect(p) for p in paths}) if format == "auto" else [format]
    if len(found) > 1:
        raise FormatError("the sources mix formats (" + ", ".join(found) + "); convert "
                          "one format at a time")
    fmt = found[0]
    stage(progress, "convert", f"{len(paths)} source(s) read as {fmt}")
    parts = formats.READERS[fmt](paths, keys)
    patterns = [layers] if isinstance(layers, str) else layers
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.convert-", dir=out.parent))
    try:
        _write(parts, tmp / "store", patterns, dtype, progress,
                       {"format": fmt, "sources": [str(p) for p in paths], "mask": mask,
                        "row_ids": row_ids or "index: sample * 2**20 + position + 1"})
        _replace(tmp / "store", out, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    store = open_store(out)
    stage(progress, "convert", f"wrote {store.num_rows:,} rows x {len(store.layers)} layers "
          f"to {out}")
    return store


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise StoreExistsError(f"{out} exists and is not empty (pass overwrite=True, or "
                               "--overwrite on the command line, to replace it)")
    if out.parent.exists() and not out.parent.is_dir():
        raise InvalidArgumentError(f"{out}: {out.parent} is not a folder")


def _replace(new: Path, out: Path, overwrite: bool) -> None:
    """Move the finished store to ``out`` (the old one, with ``overwrite``, is moved aside
    first and deleted after)."""
    old = None
    if out.exists():
        _check_out(out, overwrite)  # still allowed: nobody filled it meanwhile
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(new, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _rows(part: Part, sample0: int) -> tuple[dict[str, np.ndarray], np.ndarray,
                                             dict[str, np.ndarray], int]:
    """A part flattened to store rows: ``(layers [rows, d], row ids, columns, samples)``."""
    a0 = next(iter(part.arrays.values()))
    if a0.ndim == 2:
        n = a0.shape[0]
        sample = np.arange(sample0, sample0 + n, dtype=np.int64)
        position = np.full(n, -1, dtype=np.int64)
        arrays = dict(part.arrays)
        cols = {k: np.asarray(v).reshape(n) for k, v in part.columns.items()}
        if part.row_ids is not None:
            ids = np.asarray(part.row_ids).reshape(-1)
            if ids.shape[0] != n:
                raise MismatchError(f"{part.where}: {ids.shape[0]} row ids for {n} rows")
        else:
            ids = index_row_ids(sample, position)
        return arrays, ids, {"__sample__": sample, "__position__": position, **cols}, n
    B, T = a0.shape[:2]
    keep = np.ones((B, T), dtype=bool)
    if part.mask is not None:
        m = np.asarray(part.mask)
        if m.shape != (B, T):
            raise MismatchError(f"{part.where}: mask of shape {m.shape} for tokens {(B, T)}")
        keep = m != 0
    b, t = np.nonzero(keep)
    sample = (sample0 + b).astype(np.int64)
    ids = None
    if part.row_ids is not None:
        r = np.asarray(part.row_ids)
        if r.shape == (B,):
            sample = r.astype(np.int64)[b]
        elif r.shape == (B, T):
            ids = r.astype(np.int64)[b, t]
        else:
            raise MismatchError(f"{part.where}: row ids of shape {r.shape} for tokens {(B, T)}")
    position = t.astype(np.int64)
    if ids is None:
        ids = index_row_ids(sample, position)
    if keep.all():  # every token: a view, no gather
        arrays = {k: a.reshape(B * T, *a.shape[2:]) for k, a in part.arrays.items()}
    else:
        arrays = {k: a[b, t] for k, a in part.arrays.items()}
    cols = {k: np.asarray(v)[b, t] if np.ndim(v) == 2 else np.asarray(v)[b]
            for k, v in part.columns.items()}
    return arrays, ids, {"__sample__": sample, "__position__": position, **cols}, B


def _write(parts: Any, path: Path, patterns: Sequence[str] | None, dtype: str | None,
           progress: Any, origin: dict[str, Any]) -> None:
    writer: StoreWriter | None = None
    names: list[str] | None = None
    sample0 = 0
    with Progress(progress, "convert", unit="row") as prog:
        try:
            for part in parts:
                have = list(part.arrays)
                if names is None:
                    names = have if patterns is None else match_layers(
                        patterns, have, error=MissingLayerError, where=part.where)
                    store_dtype = dtype or _common_dtype(part, names)
                    writer = StoreWriter(path, dtype=store_dtype,
                                         metadata={"converted_from": origin})
                missing = [n for n in names if n not in part.arrays]
                if missing:
                    raise MismatchError(f"{part.where}: no layer {missing[0]!r} (the first "
                                        f"source has {', '.join(names)})")
                part = part._replace(arrays={n: part.arrays[n] for n in names})
                arrays, ids, cols, samples = _rows(part, sample0)
                sample0 += samples
                bits = part.dtypes or {}
                if ids.size:
                    assert writer is not None
                    writer.append({n: Bits(a, bits[n]) if n in bits else a
                                   for n, a in arrays.items()}, row_ids=ids, columns=cols)
                if prog.cb is not None:
                    prog.cb(writer.rows_written if writer is not None else 0, None)
            if writer is None:
                raise FormatError("the sources hold no rows")
            writer.close()
            writer.store = None  # unmap it: the store is opened once, at its final path
        except BaseException:
            if writer is not None:
                writer.abort()
            raise


def _common_dtype(part: Part, names: list[str]) -> str | None:
    """The stored dtype: the sources' when every layer has the same float dtype (BF16 held as
    bit patterns counts as bfloat16), else None (each layer's own)."""
    kinds = {(part.dtypes or {}).get(n, str(part.arrays[n].dtype)) for n in names}
    if len(kinds) == 1:
        kind = kinds.pop()
        if kind in STORE_DTYPES:
            return dtype_name(kind)
    return None


def _cmd_convert(args: argparse.Namespace) -> int:
    """activation dumps (safetensors, npy, npz, HDF5, Arrow, .pt) -> a store

    Convert the activation dumps of other tools and scripts into an activation store, streamed
    with bounded memory; nothing in a file is executed. Files holding all layers are
    consecutive row blocks in the order given (globs in natural order); .npy files are one
    layer each; .pt files are loaded with weights_only=True only. See docs/dumps.md."""
    store = convert(args.sources, args.out, format=args.format, layers=args.layers,
                    mask=args.mask_key, row_ids=args.row_ids_key, dtype=args.dtype,
                    overwrite=args.overwrite, progress=not args.quiet)
    print(f"wrote {store.num_rows} rows x {len(store.layers)} layers to {store.path}")
    return 0


def add_cli(sub: Any) -> None:
    """``layerscope convert SRC... -o OUT``."""
    p = command(sub, "convert", _cmd_convert)
    p.add_argument("sources", nargs="+", metavar="SRC", help="files, folders or globs")
    p.add_argument("-o", "--out", required=True, help="store folder to write")
    p.add_argument("--format", default="auto", choices=["auto", *FORMATS],
                   help="source format (auto: by extension, else by content)")
    p.add_argument("--layers", nargs="+", default=None, metavar="PATTERN",
                   help="layer names or globs to keep (default: all)")
    p.add_argument("--mask-key", default=None, metavar="KEY",
                   help="the [batch, tokens] mask of token dumps (default: a key "
                   "'attention_mask' or 'mask' of that shape, else every token)")
    p.add_argument("--row-ids-key", default=None, metavar="KEY",
                   help="row ids (per row) or sample ids (per sample of a token dump) in the "
                   "source (default: sample * 2**20 + position + 1)")
    p.add_argument("--dtype", default=None, choices=list(STORE_DTYPES),
                   help="stored dtype (default: the sources')")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
