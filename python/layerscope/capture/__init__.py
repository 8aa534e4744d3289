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

from .hooks import DTYPES, Capture
from .pooling import POOLS_MAP, POOLS_SEQ
from .rowids import POSITION_BITS, ROW_ID_MODES, content_row_ids, index_row_ids
from .select import resolve_layers

__all__ = ["capture", "Capture", "resolve_layers", "content_row_ids", "index_row_ids",
           "POSITION_BITS", "DTYPES", "POOLS_SEQ", "POOLS_MAP", "ROW_ID_MODES"]


#: ``layerscope.capture(model, layers, out, ...)`` opens a capture session: the class itself
#: (its constructor checks the arguments; see :class:`~layerscope.capture.hooks.Capture`).
capture = Capture
