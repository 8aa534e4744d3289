"""Capture activations from a running torch model into an activation store.

::

    with layerscope.capture(model, layers=["encoder.layer.*"], out="runs/minilm",
                            pool="tokens", dtype="float16") as cap:
        for batch in batches:
            model(**batch)
    store = cap.store

Forward hooks (:mod:`.hooks`) pool each selected layer's output *on the device*
(:mod:`.pooling`, masked by the ``attention_mask`` the model was called with), cast it to the
store dtype, copy it to (pinned) host memory — ``non_blocking`` on CUDA, synchronised through
an event — and hand one batch (all layers, row-aligned) to a background writer thread
(:mod:`.writer`) through a *bounded* queue; its :class:`layerscope.StoreWriter` does the I/O
in Rust without the GIL, so the model keeps running while shards are written, and a slow disk
blocks the model (back-pressure) instead of growing memory. Layers are chosen by dotted globs
(:mod:`.select`); row ids are described in :mod:`.rowids`; :mod:`.hf` drives a Hugging Face
text model over a list of texts (the ``capture`` command and the demo). See
``docs/capture.md`` for pooling semantics and the row-id scheme.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from .._validate import Bool, Int, OneOf, validated
from ..errors import InvalidArgumentError
from .hooks import DTYPES, Capture
from .pooling import POOLS_MAP, POOLS_SEQ
from .rowids import POSITION_BITS, ROW_ID_MODES, content_row_ids, index_row_ids
from .select import resolve_layers

__all__ = ["capture", "Capture", "resolve_layers", "content_row_ids", "index_row_ids",
           "POSITION_BITS", "DTYPES", "POOLS_SEQ", "POOLS_MAP", "ROW_ID_MODES"]


@validated(pool=OneOf(*POOLS_SEQ, "positions"), dtype=OneOf(*DTYPES),
           where=OneOf("output", "input"), max_rows=(None, Int(1)), shard_bytes=(None, Int(1)),
           overwrite=Bool(), queue_size=Int(1), row_ids=OneOf(*ROW_ID_MODES))
def capture(
    model: Any,
    layers: Any = "**",
    out: str | os.PathLike | None = None,
    *,
    pool: str = "tokens",
    dtype: str = "float16",
    where: str = "output",
    output: Any = None,
    max_rows: int | None = None,
    shard_bytes: int | None = None,
    metadata: dict[str, Any] | None = None,
    overwrite: bool = False,
    sample_ids: Iterable[int] | None = None,
    queue_size: int = 4,
    row_ids: str = "content",
) -> Capture:
    """Capture the activations of ``layers`` of ``model`` into the store at ``out``.

    Parameters
    ----------
    layers : module names, dotted glob patterns (``*`` within a segment, ``**`` across), or
        a callable ``(name, module) -> bool``. Store order = module order in the model.
    pool : for ``[batch, seq, dim]`` outputs ``"tokens"`` (one row per non-padding token, in
        (sample, position) order), ``"mean"`` (masked mean over tokens, computed in float32),
        ``"last"`` / ``"first"`` (last / first non-padding token, found from the mask, so left
        and right padding both work), ``"none"`` (every position, padding included); for conv
        maps ``[batch, C, H, W]``: ``"mean"`` (spatial mean) or ``"positions"`` (one row per
        location, ``position = h * W + w``). 2-D outputs ``[batch, dim]`` pass through.
    dtype : storage dtype, ``"float16"``, ``"bfloat16"`` or ``"float32"``.
    where : ``"output"`` (forward hooks) or ``"input"`` (forward pre-hooks, keywords included).
    output : which part of a structured output (or input) to capture: an index, a key, or a
        callable (for inputs the callable receives ``(args, kwargs)``). Default: the tensor,
        element 0 of a tuple/list, ``last_hidden_state`` or the first entry of a dict/ModelOutput.
    max_rows : stop after this many rows (the last batch is truncated; later ones are skipped).
    queue_size : batches in flight between the hooks and the writer thread (memory bound).
    sample_ids : ids of the samples in call order (default 0, 1, 2, ...); per batch also
        :meth:`Capture.set_sample_ids`.
    row_ids : ``"content"`` (default): ``__row_id__`` is a 63-bit hash of (sample id, the
        sample's non-padding input ids or input bytes, position): equal for the same inputs
        in the same order whatever the model, different when the inputs differ. ``"index"``:
        ``sample_id * 2**20 + position + 1`` (inputs not checked).
    shard_bytes : shard size of the store (default 256 MiB): the writer buffers up to this
        much, so the capture's memory is bounded by about ``shard_bytes`` + ``queue_size``
        batches whatever the number of batches.
    metadata : JSON-serialisable dict stored as ``metadata["user"]`` in the manifest, next to
        ``metadata["capture"]`` (model class, layer output shapes, pooling, dtype, row-id
        scheme, library versions).

    Hooks are removed when the block exits, also on an exception; the exception propagates
    and the store keeps every forward pass completed before it. Works under ``no_grad`` and
    ``inference_mode``; with a model compiled by ``torch.compile`` (dynamo caches are reset,
    the hooks run at graph breaks) but not with ``fullgraph=True``, which raises a
    :class:`CaptureError` saying why. See ``docs/capture.md``.
    """
    if out is None:
        raise InvalidArgumentError("out= (the store directory) is required")
    return Capture(
        model,
        layers,
        out,
        pool=pool,
        dtype=dtype,
        where=where,
        output=output,
        max_rows=max_rows,
        shard_bytes=shard_bytes,
        metadata=metadata,
        overwrite=overwrite,
        sample_ids=sample_ids,
        queue_size=queue_size,
        row_ids=row_ids,
    )
