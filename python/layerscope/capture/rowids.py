"""Row ids of captured rows: ``row_ids="content"`` (a 63-bit hash of the sample id, its
non-padding input and the position: equal for the same inputs whatever the model) or
``"index"`` (``sample_id * 2**20 + position + 1``), and the (sample, position) of each row of a
batch (:func:`row_layout`). See ``docs/capture.md``."""

from __future__ import annotations

import hashlib

import numpy as np

from ..errors import CaptureError
from .pooling import Batch

ROW_ID_MODES = ("content", "index")
#: ``row_ids="index"``: ``row_id = sample_id * 2**POSITION_BITS + (position + 1)``.
POSITION_BITS = 20
_MAX_INDEX_SAMPLE = 2 ** (63 - POSITION_BITS)


def mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 arrays (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def content_row_ids(
    sample_keys: np.ndarray, sample_index: np.ndarray, position: np.ndarray
) -> np.ndarray:
    """``row_id = splitmix64(key[sample] ^ splitmix64(position + 1)) >> 1`` (63 bits, >= 0),
    where ``key`` is the 64-bit BLAKE2b digest of (sample id, the sample's non-padding input)."""
    key = np.asarray(sample_keys, dtype=np.uint64)[sample_index]
    with np.errstate(over="ignore"):
        p = mix64(np.asarray(position, dtype=np.int64).astype(np.uint64) + np.uint64(1))
    return (mix64(key ^ p) >> np.uint64(1)).astype(np.int64)


def index_row_ids(sample_ids: np.ndarray, position: np.ndarray) -> np.ndarray:
    """``row_id = sample_id * 2**20 + (position + 1)``; ``position = -1`` for pooled rows."""
    s = np.asarray(sample_ids, dtype=np.int64)
    p = np.asarray(position, dtype=np.int64) + 1
    if s.size and (s.min() < 0 or s.max() >= _MAX_INDEX_SAMPLE):
        raise CaptureError(f"row_ids='index' needs 0 <= sample id < 2**{63 - POSITION_BITS}")
    if p.size and p.max() >= 2**POSITION_BITS:
        raise CaptureError(f"row_ids='index' needs positions < 2**{POSITION_BITS} - 1")
    return s * (2**POSITION_BITS) + p


def sample_keys(
    sample_ids: np.ndarray, inputs: np.ndarray | None, mask: np.ndarray | None
) -> np.ndarray:
    """64-bit key per sample: BLAKE2b(sample id || the sample's input content).

    Integer inputs (token ids) are hashed over non-padding tokens only (so the padding length
    of a batch does not matter); float inputs (images) over their float32 bytes."""
    keys = np.empty(len(sample_ids), dtype=np.uint64)
    for i, sid in enumerate(sample_ids):
        h = hashlib.blake2b(np.int64(sid).tobytes(), digest_size=8, person=b"layerscope-row")
        if inputs is not None:
            x = inputs[i]
            if x.dtype.kind in "iub":
                x = x.astype(np.int64)
                if mask is not None and x.shape == mask[i].shape:
                    x = x[mask[i]]
            else:
                x = x.astype(np.float32)
            h.update(np.ascontiguousarray(x).tobytes())
        keys[i] = np.frombuffer(h.digest(), dtype=np.uint64)[0]
    return keys


def row_layout(b: Batch, layout: tuple[str, int], n: int) -> tuple[np.ndarray, np.ndarray]:
    """(index of the sample in the batch, position) for each row of a batch."""
    kind, S = layout
    B = int(b.batch_size or 0)
    mask = None if b.mask_host is None else b.mask_host.numpy()
    # With a KV cache the mask covers past + new tokens and the layer sees only the last
    # S: positions continue after the sample's past non-padding tokens.
    past = np.zeros(B, dtype=np.int64)
    if mask is not None and mask.shape[1] > S:
        past = mask[:, :-S].sum(1).astype(np.int64)
        mask = mask[:, -S:]
    if kind == "all":
        si = np.repeat(np.arange(B), S)
        pos = np.tile(np.arange(S, dtype=np.int64), B)
    elif kind == "tokens":
        lens = mask.sum(1)
        si = np.repeat(np.arange(B), lens)
        pos = (
            np.concatenate([np.arange(k, dtype=np.int64) + o for k, o in zip(lens, past)])
            if B
            else np.zeros(0, np.int64)
        )
    else:
        si = np.arange(B)
        if mask is not None and kind in ("mean", "first", "last"):
            empty = np.flatnonzero(mask.sum(1) == 0)
            if empty.size:
                raise CaptureError(
                    f"sample(s) {b.sample_ids[empty].tolist()} have no non-padding token: "
                    f"pool={kind!r} is undefined for them"
                )
        if kind == "last":
            pos = (mask.sum(1) - 1 + past if mask is not None else np.full(B, S - 1)).astype(
                np.int64
            )
        elif kind == "first":
            pos = past.copy()
        else:
            pos = np.full(B, -1, dtype=np.int64)
    if si.shape[0] != n:
        raise CaptureError(f"internal: {n} rows but the row layout {kind} gives {si.shape[0]}")
    return si.astype(np.int64), pos.astype(np.int64)
