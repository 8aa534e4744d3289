"""The capture's background writer (:class:`BatchWriter`) and the versions it records."""

from __future__ import annotations

import queue
import sys
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from ..errors import CaptureError, LayerscopeError
from .pooling import Batch
from .rowids import content_row_ids, index_row_ids, row_layout, sample_keys

_SENTINEL = object()


def versions() -> dict[str, str]:

    out = {"python": sys.version.split()[0]}
    try:
        from .. import __version__

        out["layerscope"] = str(__version__)
    except Exception:  # noqa: BLE001 - metadata only
        pass
    import torch

    out["torch"] = str(torch.__version__)
    tf = sys.modules.get("transformers")
    if tf is not None:
        out["transformers"] = str(getattr(tf, "__version__", "?"))
    out["numpy"] = np.__version__
    return out


class BatchWriter:
    """The capture's writer thread: the hooks hand each finished batch (all layers,
    row-aligned, already on the host) to :meth:`put`, which blocks while ``queue_size``
    batches wait (back-pressure: a slow disk slows the model instead of growing memory);
    the thread computes the row ids and appends to a :class:`~layerscope.StoreWriter`, whose
    Rust core writes without the GIL. The first error is kept and raised in the model's
    thread at its next hook (:meth:`raise_error`)."""

    def __init__(self, out: str, *, layer_names: list[str], dtype: str, overwrite: bool,
                 shard_bytes: int | None, row_id_mode: str, queue_size: int,
                 metadata: Callable[[Batch], dict[str, Any]]) -> None:
        self.out, self.layer_names, self.dtype = out, layer_names, dtype
        self.overwrite, self.shard_bytes, self.row_id_mode = overwrite, shard_bytes, row_id_mode
        self.metadata = metadata
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.writer: Any = None
        self.store: Any = None

    @property
    def rows_written(self) -> int:
        return 0 if self.writer is None else int(self.writer.rows_written)

    def start(self) -> None:
        self.thread = threading.Thread(target=self._loop, name="layerscope-writer", daemon=True)
        self.thread.start()

    def put(self, item: tuple[Batch, int, int, tuple[str, int]]) -> None:
        """Queue ``(batch, rows kept, rows, layout)``; blocks while the queue is full but
        notices a writer that died meanwhile."""
        while True:
            self.raise_error()
            try:
                self.queue.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def raise_error(self) -> None:
        if self.error is not None:
            err = self.error
            if isinstance(err, LayerscopeError):
                raise CaptureError(f"the store writer failed: {err}") from err
            raise CaptureError(f"the store writer failed: {err!r}") from err

    def finish(self, *, complete: bool = True) -> None:
        """Write what is queued and close the store: complete, or (the capture left through
        an exception or Ctrl-C) with every finished batch kept but marked incomplete."""
        if self.thread is not None:
            self.queue.put(_SENTINEL)
            self.thread.join()
            self.thread = None
        if self.writer is not None:
            try:
                self.store = self.writer.close(complete=complete)
            except BaseException as e:  # noqa: BLE001
                if self.error is None:
                    self.error = e

    def _loop(self) -> None:
        while True:
            item = self.queue.get()
            if item is _SENTINEL:
                return
            if self.error is not None:
                continue  # keep draining so that the producer never blocks forever
            try:
                self._write(*item)
            except BaseException as e:  # noqa: BLE001 - handed to the main thread
                self.error = e

    def _write(self, b: Batch, keep: int, n: int, layout: tuple[str, int]) -> None:
        import torch

        for ev in b.events:
            ev.synchronize()
        si, pos = row_layout(b, layout, n)
        ids = b.sample_ids
        assert ids is not None
        if self.row_id_mode == "content":
            inputs = None
            if b.input_host is not None:
                t = b.input_host
                inputs = (t.float() if t.dtype == torch.bfloat16 else t).numpy()
            mask = None if b.mask_host is None else b.mask_host.numpy()
            keys = sample_keys(ids, inputs, mask)
            row_ids = content_row_ids(keys, si, pos)
        else:
            row_ids = index_row_ids(ids[si], pos)
        arrays = {}
        for name in self.layer_names:
            t = b.layers[name][:keep]
            arrays[name] = t if t.dtype == torch.bfloat16 else t.numpy()
        if self.writer is None:
            from ..store import StoreWriter

            meta = self.metadata(b)
            kw: dict[str, Any] = {
                "dtype": self.dtype,
                "metadata": meta,
                "overwrite": self.overwrite,
            }
            if self.shard_bytes is not None:
                kw["shard_bytes"] = int(self.shard_bytes)
            self.writer = StoreWriter(self.out, **kw)
        self._append(
            self.writer,
            arrays,
            row_ids[:keep],
            {"__sample__": ids[si][:keep], "__position__": pos[:keep]},
        )

    def _append(
        self,
        writer: Any,
        arrays: dict[str, Any],
        row_ids: np.ndarray,
        columns: dict[str, np.ndarray],
    ) -> None:
        writer.append(arrays, row_ids=row_ids, columns=columns)
