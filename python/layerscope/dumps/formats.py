"""Readers of the activation dumps people already have. Each reader yields :class:`Part`\\ s:
row-aligned blocks of every layer, small enough to hold (a few tens of MiB), in the order of
the source's rows. Nothing read from a file is ever executed: array formats are parsed
(safetensors headers as JSON, ``.npy`` headers by numpy's header parser, ``allow_pickle=False``
everywhere), and object arrays are refused.

Formats (``format=`` of :func:`layerscope.convert`):

- ``safetensors``: per-layer keys (``{layer: [N, d] or [B, T, d]}``) in one file, or one file
  per batch (the same keys in every file); or the ragged per-prompt form, keys ``"0"`` …
  ``"N-1"`` each ``[1, T_i, d]`` or ``[T_i, d]``, one file per layer (named after the file).
  Read through memory maps of the requested rows only; F16, BF16, F32, F64 (BF16 passed to
  the store as its bit patterns: exact).
- ``npy``: one file per layer (named after the file), ``[N, d]`` or ``[B, T, d]``, read in
  row blocks through memory maps of those rows only (a file larger than memory or than the
  address-space limit is fine).
- ``npz``: one file per batch, a key per layer (each array is loaded whole, one at a time).
- ``hdf5``: one file per batch, a dataset per layer (any group depth: ``group/name``), read
  in row blocks (needs ``h5py``, extra ``convert``).
- ``arrow``: a Hugging Face ``datasets`` folder (``data-XXXXX-of-XXXXX.arrow``, ``state.json``,
  ``dataset_info.json``) such as SAELens's activation cache, or ``.arrow`` files: a column per
  hook holding ``[context_size, d]`` per row, ``token_ids`` kept as the ``__token_id__`` row
  column (needs ``pyarrow``, extra ``convert``).
- ``hf-hidden-states``, ``tl-cache`` (``torch`` for either): ``.pt`` files loaded with
  ``torch.load(weights_only=True)`` only (a file that needs arbitrary unpickling is refused
  and nothing in it runs), one file per batch: Hugging Face ``output_hidden_states`` (a tuple
  or list of per-layer tensors, or one stacked ``[L+1, N, d]`` / ``[N, L+1, d]`` tensor,
  alone or in a dict beside an attention mask), or a TransformerLens cache dict (needs
  ``torch``).
"""

from __future__ import annotations

import functools
import glob
import json
import os
import re
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from .._files import check_regular, open_regular, read_regular
from .._optional import require
from ..errors import FormatError, MismatchError

FORMATS = ("safetensors", "npy", "npz", "hdf5", "arrow", "hf-hidden-states", "tl-cache",
           "torch")
# Source bytes per part: enough for fast copies, small beside any machine's memory.
PART_BYTES = 64 << 20
# Keys taken as the attention mask of 3-D layers when no mask key is named.
MASK_KEYS = ("attention_mask", "mask")
# Columns of a datasets cache kept as per-token row columns.
TOKEN_COLUMNS = {"token_ids": "__token_id__", "input_ids": "__token_id__"}
_SUFFIXES = {".safetensors": "safetensors", ".npy": "npy", ".npz": "npz", ".h5": "hdf5",
             ".hdf5": "hdf5", ".hdf": "hdf5", ".arrow": "arrow", ".pt": "torch",
             ".pth": "torch"}
_MAGIC = ((b"\x93NUMPY", "npy"), (b"PK\x03\x04", "npz"), (b"\x89HDF\r\n\x1a\n", "hdf5"),
          (b"\xff\xff\xff\xff", "arrow"), (b"ARROW1", "arrow"))


class Part(NamedTuple):
    """Row-aligned arrays of one block of a source: ``arrays[layer]`` ``[n, d]`` (one row per
    sample) or ``[B, T, d]`` (tokens); ``mask`` ``[B, T]`` (tokens kept) or None;
    ``columns`` per sample ``[B]``/``[n]`` or per token ``[B, T]``; ``row_ids`` per row or
    per sample from the source, or None; ``where`` names the file for messages."""

    arrays: dict[str, np.ndarray]
    mask: np.ndarray | None
    columns: dict[str, np.ndarray]
    row_ids: np.ndarray | None
    where: str
    dtypes: dict[str, str] | None = None  # "bfloat16" for layers held as uint16 bit patterns


class Keys(NamedTuple):
    """The source keys that are not layers: the mask and the row ids (None: not named)."""

    mask: str | None
    row_ids: str | None


# --------------------------------------------------------------------------- sources


def natural_key(path: str | os.PathLike[str]) -> list[Any]:
    """Sort key putting ``batch-2`` before ``batch-10``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", os.fspath(path))]


def expand(sources: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Files (or ``datasets`` folders) in the order given; globs in natural order."""
    out: list[Path] = []
    for s in sources:
        text = os.fspath(s)
        if any(c in text for c in "*?["):
            hits = sorted((Path(p) for p in glob.glob(text)), key=natural_key)
            if not hits:
                raise FormatError(f"{text}: the pattern matches no file")
            out += hits
            continue
        p = Path(text)
        if not p.exists():
            raise FormatError(f"{text}: no such file or folder")
        if p.is_dir() and not is_datasets_folder(p):
            files = sorted((c for c in p.iterdir() if c.suffix in _SUFFIXES), key=natural_key)
            if not files:
                raise FormatError(f"{text}: a folder with no file layerscope can convert "
                                  f"({', '.join(sorted(_SUFFIXES))})")
            out += files
        else:
            out.append(p)
    return out


def is_datasets_folder(p: Path) -> bool:
    """A Hugging Face ``datasets`` folder saved with ``save_to_disk``."""
    return p.is_dir() and (p / "state.json").is_file() and any(p.glob("*.arrow"))


def detect(path: Path) -> str:
    """The format of ``path`` from its name, else its first bytes. Only a folder or a regular
    file: a named pipe, socket or device is refused before any reader opens it."""
    if is_datasets_folder(path):
        return "arrow"
    if not path.is_dir():
        check_regular(path, "the dump")
    fmt = _SUFFIXES.get(path.suffix.lower())
    if fmt:
        return fmt
    if path.suffix.lower() in (".pkl", ".pickle"):
        raise FormatError(f"{path}: pickle files are not read (unpickling runs code); "
                          f"accepted formats: {', '.join(FORMATS)}")
    with open_regular(path, "the dump") as f:
        head = f.read(16)
    if head.startswith(b"PK\x03\x04") and _is_torch_zip(path):
        return "torch"
    for magic, fmt in _MAGIC:
        if head.startswith(magic):
            return fmt
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    raise FormatError(f"{path}: not a format layerscope converts (accepted: "
                      f"{', '.join(FORMATS)}; by extension or content)")


# --------------------------------------------------------------------------- helpers


def _rows_per_part(sample_bytes: int) -> int:
    return max(1, PART_BYTES // max(1, sample_bytes))


def _check_layer_name(name: str, where: str) -> str:
    if name.startswith("__") or not name:
        raise FormatError(f"{where}: {name!r} cannot be a layer name (empty, or starting "
                          "with '__', which the store reserves)")
    return name


def _plain(a: np.ndarray, what: str) -> None:
    if a.dtype.hasobject or a.dtype.kind not in "fiub":
        raise FormatError(f"{what}: dtype {a.dtype} is not a numeric array")


def roles(shapes: dict[str, tuple[int, ...]], keys: Keys, where: str
          ) -> tuple[list[str], str | None, str | None]:
    """Which keys are layers, which the mask and which the row ids. With no mask key named,
    ``attention_mask`` or ``mask`` is the mask when it has the ``[B, T]`` shape of the 3-D
    layers."""
    for k in (keys.mask, keys.row_ids):
        if k is not None and k not in shapes:
            raise FormatError(f"{where}: no key {k!r} (keys: {', '.join(sorted(shapes))})")
    mask = keys.mask
    if mask is None:
        three = [s[:2] for s in shapes.values() if len(s) == 3]
        mask = next((k for k in MASK_KEYS if k in shapes and three
                     and tuple(shapes[k]) == three[0]), None)
    layers = [_check_layer_name(k, where) for k in shapes if k not in (mask, keys.row_ids)]
    if not layers:
        raise FormatError(f"{where}: no layer arrays (keys: {', '.join(sorted(shapes))})")
    return layers, mask, keys.row_ids


def _leading(shapes: dict[str, tuple[int, ...]], where: str) -> tuple[int, ...]:
    """The common leading shape (``(n,)`` or ``(B, T)``) of a part's layers."""
    lead = {k: s[:-1] for k, s in shapes.items()}
    first = next(iter(lead.values()))
    bad = [k for k, s in shapes.items() if len(s) not in (2, 3)]
    if bad:
        raise FormatError(f"{where}: layer {bad[0]!r} has shape {shapes[bad[0]]}; layers are "
                          "[rows, d] or [batch, tokens, d]")
    if any(v != first for v in lead.values()):
        raise MismatchError(f"{where}: the layers' leading shapes differ ("
                            + ", ".join(f"{k} {s}" for k, s in shapes.items()) + ")")
    return first


def _blocks(n: int, step: int) -> Iterator[tuple[int, int]]:
    for lo in range(0, n, step):
        yield lo, min(n, lo + step)


def _step(shapes: dict[str, tuple[int, ...]]) -> int:
    """Leading-axis entries per part: :data:`PART_BYTES` of f64 values over all layers."""
    return _rows_per_part(sum(int(np.prod(s[1:], dtype=np.int64)) * 8 for s in shapes.values()))


# --------------------------------------------------------------------------- safetensors

_ST_DTYPES = {"F16": np.float16, "BF16": np.uint16, "F32": np.float32, "F64": np.float64,
              "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
              "U8": np.uint8, "BOOL": np.bool_}
_ST_HEADER_MAX = 100 << 20


def _bf16_names(head: dict[str, Any], layers: Sequence[str]) -> dict[str, str]:
    return {k: "bfloat16" for k in layers if head[k].dtype == "BF16"}


class _STTensor(NamedTuple):
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file


def safetensors_header(path: Path) -> dict[str, _STTensor]:
    """The tensors of a safetensors file (name → dtype, shape, absolute offset), checked
    against the file size; the header is JSON, never code."""
    size = path.stat().st_size
    with open_regular(path, "the safetensors file") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise FormatError(f"{path}: too short for a safetensors file")
        (n,) = struct.unpack("<Q", raw)
        if n > min(_ST_HEADER_MAX, size - 8):
            raise FormatError(f"{path}: safetensors header of {n} bytes does not fit the file")
        try:
            head = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise FormatError(f"{path}: safetensors header is not JSON ({e})") from None
    if not isinstance(head, dict):
        raise FormatError(f"{path}: safetensors header is not a JSON object")
    out = {}
    for name, t in head.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = t["dtype"], tuple(int(x) for x in t["shape"]), \
                t["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise FormatError(f"{path}: tensor {name!r}: malformed header entry") from None
        if dtype not in _ST_DTYPES:
            raise FormatError(f"{path}: tensor {name!r} has dtype {dtype} (accepted: "
                              f"{', '.join(_ST_DTYPES)})")
        want = int(np.prod(shape, dtype=np.int64)) * np.dtype(_ST_DTYPES[dtype]).itemsize
        if min(shape, default=0) < 0 or end - begin != want or 8 + n + end > size or begin < 0:
            raise FormatError(f"{path}: tensor {name!r}: offsets [{begin}, {end}) do not "
                              f"match shape {list(shape)} {dtype} within the file")
        out[name] = _STTensor(dtype, shape, 8 + n + int(begin))
    return out


def _st_rows(path: Path, t: _STTensor, lo: int, hi: int) -> np.ndarray:
    """Rows ``lo:hi`` (leading axis) of one tensor, through a memory map of those rows only;
    BF16 as its uint16 bit patterns (the part's ``dtypes`` say so)."""
    dt = np.dtype(_ST_DTYPES[t.dtype])
    inner = t.shape[1:]
    row = int(np.prod(inner, dtype=np.int64)) * dt.itemsize
    if hi <= lo or row == 0:
        a = np.zeros((max(0, hi - lo), *inner), dtype=dt)
    else:
        a = np.array(np.memmap(path, dtype=dt, mode="r", offset=t.offset + lo * row,
                               shape=(hi - lo, *inner)))
    return a


def read_safetensors(paths: list[Path], keys: Keys) -> Iterator[Part]:
    heads = [safetensors_header(p) for p in paths]
    ragged = [bool(h) and all(re.fullmatch(r"\d+", k) for k in h) for h in heads]
    if any(ragged):
        if not all(ragged):
            raise FormatError("safetensors: mixing per-prompt files (keys '0'…'N-1') with "
                              "per-layer files")
        yield from _read_ragged(paths, heads)
        return
    for path, head in zip(paths, heads):
        where = str(path)
        layers, mask, ids = roles({k: t.shape for k, t in head.items()}, keys, where)
        shapes = {k: head[k].shape for k in layers}
        lead = _leading(shapes, where)
        for lo, hi in _blocks(lead[0], _step(shapes)):
            yield Part({k: _st_rows(path, head[k], lo, hi) for k in layers},
                       None if mask is None else _st_rows(path, head[mask], lo, hi), {},
                       None if ids is None else _st_rows(path, head[ids], lo, hi), where,
                       _bf16_names(head, layers))


def _read_ragged(paths: list[Path], heads: list[dict[str, _STTensor]]) -> Iterator[Part]:
    """Per-prompt files: one layer per file, key ``i`` = prompt ``i`` (``[1, T_i, d]`` or
    ``[T_i, d]``); every file has the same prompts and token counts."""
    names = [_check_layer_name(p.stem, str(p)) for p in paths]
    if len(set(names)) != len(names):
        raise FormatError("per-prompt safetensors files must have distinct names (one layer "
                          f"each): {', '.join(names)}")
    count = len(heads[0])
    for p, h in zip(paths, heads):
        if sorted(h, key=int) != [str(i) for i in range(count)]:
            raise FormatError(f"{p}: per-prompt keys must be '0'…'{count - 1}' like "
                              f"{paths[0].name}")
    for i in range(count):
        arrays = {}
        for name, p, h in zip(names, paths, heads):
            t = h[str(i)]
            if len(t.shape) == 3 and t.shape[0] == 1:
                t = t._replace(shape=t.shape[1:])
            if len(t.shape) != 2:
                raise FormatError(f"{p}: prompt {i} has shape {list(h[str(i)].shape)}; "
                                  "expected [1, T, d] or [T, d]")
            arrays[name] = _st_rows(p, t, 0, t.shape[0])[None]  # [1, T, d]
        _leading({k: a.shape for k, a in arrays.items()},
                 f"prompt {i} of {', '.join(p.name for p in paths)}")
        yield Part(arrays, None, {}, None, f"prompt {i}",
                   {n: "bfloat16" for n, h in zip(names, heads) if h[str(i)].dtype == "BF16"})


# --------------------------------------------------------------------------- npy / npz


class _NpyInfo(NamedTuple):
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int


def npy_header(path: Path) -> _NpyInfo:
    """An ``.npy`` header read by numpy's parser (a literal, never evaluated as code);
    object dtypes and Fortran order refused."""
    fmt = np.lib.format
    with open_regular(path, "the .npy file") as f:
        try:
            version = fmt.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = fmt.read_array_header_1_0(f)
            else:
                shape, fortran, dtype = fmt.read_array_header_2_0(f)
        except (ValueError, OSError) as e:
            raise FormatError(f"{path}: not a readable .npy file ({e})") from None
        offset = f.tell()
    if dtype.hasobject:
        raise FormatError(f"{path}: an object array (would need unpickling); refused")
    if fortran and len(shape) > 1:
        raise FormatError(f"{path}: Fortran-ordered array; save it C-ordered "
                          "(np.save(path, np.ascontiguousarray(x)))")
    return _NpyInfo(dtype, tuple(shape), offset)


def _npy_rows(path: Path, info: _NpyInfo, lo: int, hi: int) -> np.ndarray:
    inner = info.shape[1:]
    row = int(np.prod(inner, dtype=np.int64)) * info.dtype.itemsize
    if hi <= lo or row == 0:
        return np.zeros((max(0, hi - lo), *inner), dtype=info.dtype)
    a = np.array(np.memmap(path, dtype=info.dtype, mode="r", offset=info.offset + lo * row,
                           shape=(hi - lo, *inner)))
    return a.astype(a.dtype.newbyteorder("=")) if not a.dtype.isnative else a


def read_npy(paths: list[Path], keys: Keys) -> Iterator[Part]:
    infos: dict[str, tuple[Path, _NpyInfo]] = {}
    for p in paths:
        if p.stem in infos:
            raise FormatError(".npy files are one layer each and need distinct names: "
                              + ", ".join(q.name for q in paths))
        infos[p.stem] = (p, npy_header(p))
    where = "the .npy files"
    layers, mask, ids = roles({k: i.shape for k, (_, i) in infos.items()}, keys, where)
    shapes = {k: infos[k][1].shape for k in layers}
    lead = _leading(shapes, where)
    for lo, hi in _blocks(lead[0], _step(shapes)):
        yield Part({k: _npy_rows(*infos[k], lo, hi) for k in layers},
                   None if mask is None else _npy_rows(*infos[mask], lo, hi), {},
                   None if ids is None else _npy_rows(*infos[ids], lo, hi),
                   f"rows {lo}:{hi} of {where}")


def read_npz(paths: list[Path], keys: Keys) -> Iterator[Part]:
    for path in paths:
        where = str(path)
        try:
            with open_regular(path, "the .npz file") as f, np.load(f, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except ValueError as e:  # object arrays need pickle: refused
            raise FormatError(f"{path}: {e}") from None
        except (OSError, EOFError) as e:
            raise FormatError(f"{path}: not a readable .npz file ({e})") from None
        for k, a in arrays.items():
            _plain(a, f"{path}: {k}")
        layers, mask, ids = roles({k: a.shape for k, a in arrays.items()}, keys, where)
        _leading({k: arrays[k].shape for k in layers}, where)
        yield Part({k: arrays[k] for k in layers}, None if mask is None else arrays[mask], {},
                   None if ids is None else arrays[ids], where)


# --------------------------------------------------------------------------- hdf5


def _datasets(group: Any, kind: type) -> dict[str, Any]:
    """Every dataset under an HDF5 group, by path (``group/name``)."""
    found: dict[str, Any] = {}
    group.visititems(lambda name, obj: found.update({name: obj}) if isinstance(obj, kind)
                     else None)
    return found


def read_hdf5(paths: list[Path], keys: Keys) -> Iterator[Part]:
    h5py = require("h5py", "reading HDF5 files")
    for path in paths:
        where = str(path)
        with h5py.File(path, "r") as f:
            found = _datasets(f, h5py.Dataset)
            if not found:
                raise FormatError(f"{path}: an HDF5 file with no dataset")
            for k, d in found.items():
                if d.dtype.kind not in "fiub":
                    raise FormatError(f"{path}: dataset {k!r} has dtype {d.dtype}, not numbers")
            layers, mask, ids = roles({k: d.shape for k, d in found.items()}, keys, where)
            shapes = {k: found[k].shape for k in layers}
            lead = _leading(shapes, where)
            for lo, hi in _blocks(lead[0], _step(shapes)):
                yield Part({k: np.asarray(found[k][lo:hi]) for k in layers},
                           None if mask is None else np.asarray(found[mask][lo:hi]), {},
                           None if ids is None else np.asarray(found[ids][lo:hi]), where)


# --------------------------------------------------------------------------- arrow


def arrow_files(path: Path) -> list[Path]:
    """The Arrow files of a ``datasets`` folder, in ``state.json``'s order."""
    if not path.is_dir():
        return [path]
    try:
        state = json.loads(read_regular(path / "state.json", "state.json", 1 << 24)
                           .decode("utf-8"))
        names = [d["filename"] for d in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError):
        names = []
    files = [path / n for n in names if "/" not in n and (path / n).is_file()]
    return files or sorted(path.glob("*.arrow"), key=natural_key)


def _nested(col: Any, rows: int, where: str, name: str) -> np.ndarray:
    """A column of (nested) lists as an array ``[rows, ...]`` (every list of a level the same
    length; no nulls)."""
    pa = require("pyarrow", "reading Arrow files")
    v = col.storage if isinstance(col, pa.ExtensionArray) else col
    if v.null_count:
        raise FormatError(f"{where}: column {name!r} has null entries")
    shape = [rows]
    while pa.types.is_list(v.type) or pa.types.is_large_list(v.type) \
            or pa.types.is_fixed_size_list(v.type):
        inner = v.flatten()
        if inner.null_count:
            raise FormatError(f"{where}: column {name!r} has null entries")
        count = len(v)
        if count and len(inner) % count:
            raise FormatError(f"{where}: column {name!r} has lists of different lengths")
        if not pa.types.is_fixed_size_list(v.type) and count:
            lengths = np.asarray(v.value_lengths())
            if (lengths != lengths[0]).any():
                raise FormatError(f"{where}: column {name!r} has lists of different lengths")
        shape.append(len(inner) // count if count else 0)
        v = inner
    a = np.asarray(v.to_numpy(zero_copy_only=False))
    if a.dtype.kind not in "fiub":
        raise FormatError(f"{where}: column {name!r} is not numeric ({v.type})")
    return a.reshape(shape)


def read_arrow(paths: list[Path], keys: Keys) -> Iterator[Part]:
    pa = require("pyarrow", "reading Arrow files")
    files = [f for p in paths for f in arrow_files(p)]
    for path in files:
        where = str(path)
        with pa.memory_map(str(path), "r") as src:
            try:
                reader = pa.ipc.open_stream(src)
                batches: Iterator[Any] = iter(reader)
            except pa.ArrowInvalid:
                src.seek(0)
                try:
                    fr = pa.ipc.open_file(src)
                except pa.ArrowInvalid as e:
                    raise FormatError(f"{path}: not an Arrow IPC file ({e})") from None
                batches = (fr.get_batch(i) for i in range(fr.num_record_batches))
            for batch in batches:
                yield from _arrow_batch(batch, keys, where)


def _arrow_batch(batch: Any, keys: Keys, where: str) -> Iterator[Part]:
    pa = require("pyarrow", "reading Arrow files")
    names = list(batch.schema.names)
    token_cols = {n: TOKEN_COLUMNS[n] for n in names if n in TOKEN_COLUMNS}
    special = {keys.mask, keys.row_ids, *token_cols}
    hooks = []
    for n in names:
        if n in special:
            continue
        t = batch.column(n).type
        t = t.storage_type if isinstance(t, pa.ExtensionType) else t
        depth = 0
        while pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
            t, depth = t.value_type, depth + 1
        if depth in (1, 2) and pa.types.is_floating(t):
            hooks.append(n)  # [d] or [context, d] per row: a layer
    if not hooks:
        raise FormatError(f"{where}: no column of float vectors or matrices (columns: "
                          f"{', '.join(names)})")
    rows = batch.num_rows
    first = _nested(batch.column(hooks[0]).slice(0, 1), 1, where, hooks[0]) if rows else None
    step = _rows_per_part((first.nbytes if first is not None else 1) * len(hooks) * 2)
    for lo, hi in _blocks(rows, step):
        part = batch.slice(lo, hi - lo)
        arrays = {_check_layer_name(n, where): _nested(part.column(n), hi - lo, where, n)
                  for n in hooks}
        lead = _leading({k: a.shape for k, a in arrays.items()}, where)
        mask = ids = None
        if keys.mask is not None:
            if keys.mask not in names:
                raise FormatError(f"{where}: no column {keys.mask!r}")
            mask = _nested(part.column(keys.mask), hi - lo, where, keys.mask)
        if keys.row_ids is not None:
            if keys.row_ids not in names:
                raise FormatError(f"{where}: no column {keys.row_ids!r}")
            ids = _nested(part.column(keys.row_ids), hi - lo, where, keys.row_ids)
        columns = {}
        for n, col in token_cols.items():
            c = _nested(part.column(n), hi - lo, where, n)
            if tuple(c.shape) == tuple(lead):
                columns[col] = c.astype(np.int64)
        yield Part(arrays, mask, columns, ids, where)


# --------------------------------------------------------------------------- torch

# TransformerLens hooks whose [batch, pos, head, d_head] output is one activation per token
# (heads concatenated); other 4-D hooks (attention patterns [batch, head, q, k]) are skipped.
_HEAD_HOOKS = re.compile(r"hook_(z|q|k|v|result|rot_q|rot_k)$")


def _is_torch_zip(path: Path) -> bool:
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("/data.pkl") for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def load_torch(path: Path) -> Any:
    """``torch.load`` with ``weights_only=True`` (tensors, dicts, lists, tuples and numbers
    only: nothing in the file runs), memory-mapped where the file allows it. A file that
    needs more is refused, naming what it asked for."""
    torch = require("torch", "reading .pt files")
    import pickle

    for mmap in (True, False):  # the legacy (non-zip) format cannot be memory-mapped
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as e:
            first = str(e).strip().splitlines()
            why = next((line for line in first if "GLOBAL" in line or "Unsupported" in line),
                       first[0] if first else "")
            raise FormatError(
                f"{path}: refused: loading it would need arbitrary unpickling, which can run "
                f"code ({why.strip()}); nothing in it ran. Save plain tensors instead, e.g. "
                "torch.save(dict(cache.cache_dict), path) or torch.save(outputs.hidden_states, "
                "path)") from None
        except RuntimeError as e:
            if mmap and "mmap" in str(e):
                continue
            raise FormatError(f"{path}: not a readable torch file ({e})") from None
    raise AssertionError("unreachable")


def _to_numpy(name: str, t: Any, where: str) -> tuple[np.ndarray, str | None]:
    """A tensor as numpy (bf16 as its uint16 bit patterns) and, for bf16, "bfloat16"."""
    torch = require("torch", "reading .pt files")
    if not isinstance(t, torch.Tensor):
        raise FormatError(f"{where}: {name!r} is a {type(t).__name__}, not a tensor")
    if t.is_sparse or t.layout != torch.strided:
        raise FormatError(f"{where}: {name!r} is a sparse tensor")
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(np.uint16), "bfloat16"
    if t.is_complex() or not (t.is_floating_point() or t.dtype in (
            torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)):
        raise FormatError(f"{where}: {name!r} has dtype {t.dtype}")
    return t.numpy(), None


def _hidden_states(seq: Sequence[Any], where: str) -> dict[str, Any]:
    """Hugging Face ``output_hidden_states``: embeddings first, then each layer."""
    return {("embeddings" if i == 0 else f"layer.{i - 1}"): t for i, t in enumerate(seq)}


def _stacked(t: Any, where: str) -> dict[str, Any]:
    """A stacked ``[L+1, N, d]`` or ``[N, L+1, d]`` tensor (4-D: ``[L+1, B, T, d]``); the
    layer axis is the shorter of the first two (refused when they are equal)."""
    if t.ndim == 4:
        return _hidden_states(list(t.unbind(0)), where)
    a, b = int(t.shape[0]), int(t.shape[1])
    if a == b:
        raise FormatError(f"{where}: a stacked tensor of shape {list(t.shape)}: which axis "
                          "holds the layers is ambiguous; save a tuple of per-layer tensors")
    return _hidden_states(list(t.unbind(0 if a < b else 1)), where)


def torch_layers(obj: Any, keys: Keys, where: str) -> tuple[dict[str, Any], dict[str, Any], str]:
    """The tensors of a loaded ``.pt`` file by role: ``(layers, extras, layout)``, where
    ``extras`` holds a mask and row ids found under their keys."""
    torch = require("torch", "reading .pt files")
    extras: dict[str, Any] = {}
    if isinstance(obj, dict):
        special = {k for k in (keys.mask, keys.row_ids, *MASK_KEYS) if k is not None}
        extras = {k: v for k, v in obj.items() if k in special}
        rest = {str(k): v for k, v in obj.items() if k not in special}
        seqs = [k for k, v in rest.items() if isinstance(v, (list, tuple))]
        if len(rest) == 1 and seqs:  # {"feats": (h0, h1, ...), "mask": ...}
            return _hidden_states(rest[seqs[0]], where), extras, "hf-hidden-states"
        if len(rest) == 1 and isinstance(next(iter(rest.values())), torch.Tensor) \
                and next(iter(rest.values())).ndim == 4:  # {"feats": [L+1, B, T, d], ...}
            return _stacked(next(iter(rest.values())), where), extras, "hf-hidden-states"
        layers = {}
        for k, v in rest.items():  # anything else (attention patterns, scalars) is skipped
            if isinstance(v, torch.Tensor) and v.ndim == 4 and _HEAD_HOOKS.search(k):
                layers[k] = v.flatten(2)  # [batch, pos, head·d_head]
            elif isinstance(v, torch.Tensor) and v.ndim in (2, 3):
                layers[k] = v
        layout = "tl-cache" if any("hook_" in k for k in layers) else "dict"
        return layers, extras, layout
    if isinstance(obj, (list, tuple)):
        return _hidden_states(obj, where), extras, "hf-hidden-states"
    if isinstance(obj, torch.Tensor) and obj.ndim in (3, 4):
        return _stacked(obj, where), extras, "hf-hidden-states (stacked)"
    raise FormatError(f"{where}: a {type(obj).__name__} is not a layout layerscope knows "
                      "(a tuple/list of per-layer tensors, a stacked tensor, or a dict of "
                      "tensors)")


def read_torch(paths: list[Path], keys: Keys, expect: str | None = None) -> Iterator[Part]:
    """``.pt`` files (weights only), each a row block: Hugging Face hidden states (a tuple or
    list of per-layer tensors, embeddings first, named ``embeddings``, ``layer.0``, …; or one
    stacked tensor), a TransformerLens cache (``{hook_name: tensor}``, 4-D head hooks with
    their heads concatenated, attention patterns skipped), or any dict of tensors. ``expect``:
    the layout the caller named (``hf-hidden-states`` or ``tl-cache``), checked."""
    for path in paths:
        where = str(path)
        layers, extras, layout = torch_layers(load_torch(path), keys, where)
        if expect is not None and not layout.startswith(expect):
            raise FormatError(f"{where}: holds {layout}, not {expect}")
        arrays, dtypes = {}, {}
        for k, v in {**layers, **extras}.items():
            arrays[k], src = _to_numpy(k, v, where)
            if src:
                dtypes[k] = src
        names, mask, ids = roles({k: a.shape for k, a in arrays.items()}, keys, where)
        shapes = {k: arrays[k].shape for k in names}
        lead = _leading(shapes, where)
        for lo, hi in _blocks(lead[0], _step(shapes)):
            yield Part({k: arrays[k][lo:hi] for k in names},
                       None if mask is None else arrays[mask][lo:hi], {},
                       None if ids is None else arrays[ids][lo:hi], where,
                       {k: dtypes[k] for k in names if k in dtypes})


READERS = {"safetensors": read_safetensors, "npy": read_npy, "npz": read_npz,
           "hdf5": read_hdf5, "arrow": read_arrow, "torch": read_torch,
           "hf-hidden-states": functools.partial(read_torch, expect="hf-hidden-states"),
           "tl-cache": functools.partial(read_torch, expect="tl-cache")}
