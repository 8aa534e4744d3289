"""Rows for the device: the Rust reader decoding blocks into host buffers (pinned on CUDA) one block ahead of the device."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from .._source import Source

# ---------------------------------------------------------------------------------- passes


class _Layers:
    """The plan's layers (``parts``: ``[(source, names)]``, concatenated) read as host arrays
    by the Rust reader (stores) or taken from memory (arrays), in their exact dtype."""

    def __init__(self, parts: Sequence[tuple[Source, Sequence[str]]]) -> None:
        self.where = [(src, name) for src, ls in parts for name in ls]
        self.names = [name for _, name in self.where]

    def read(self, layer: int, start: int, stop: int) -> np.ndarray:
        src, name = self.where[layer]
        return src.read(name, start, stop, dtype=src.exact_dtype(name))

    def dtype(self, layer: int) -> type[np.floating]:
        src, name = self.where[layer]
        return src.exact_dtype(name)

    def dim(self, layer: int) -> int:
        src, name = self.where[layer]
        return int(src.dims[name])

    def read_into(self, idx: Sequence[int], start: int, stop: int,
                  outs: Sequence[np.ndarray]) -> None:
        """Rows ``[start, stop)`` of layers ``idx`` written into ``outs`` (C-contiguous,
        ``stop - start`` rows, each layer's exact dtype): the layers of one store and dtype
        in one call of the Rust block reader (in parallel, GIL released, mapped pages
        dropped once read); arrays in memory copied."""
        groups: dict[tuple[int, Any], tuple[Any, list[str], list[np.ndarray]]] = {}
        for x, out in zip(idx, outs):
            src, name = self.where[x]
            if src.store is None:
                assert src.arrays is not None
                np.copyto(out, src.arrays[name][start:stop], casting="unsafe")
                continue
            g = groups.setdefault((id(src), out.dtype), (src, [], []))
            g[1].append(name)
            g[2].append(out)
        for src, names, arrays in groups.values():
            src.store._native.read_block_into(names, start, stop, arrays, True)


class _Slot:
    """One host buffer of a :class:`_Feed` (pinned on CUDA): per layer a ``rows × d`` torch
    tensor and its numpy view; ``event`` the CUDA copy out of it still to finish."""

    def __init__(self, torch: Any, dev: Any, shapes: list[tuple[int, int]],
                 dtypes: list[Any]) -> None:
        pin = dev.type == "cuda"
        self.host = [torch.empty(sh, dtype=torch.from_numpy(np.zeros(0, dt)).dtype,
                                 pin_memory=pin) for sh, dt in zip(shapes, dtypes)]
        self.views = [h.numpy() for h in self.host]
        self.event: Any = None


class _Feed:
    """The blocks ``[start, stop)`` of some layers over a row range, for a device: read and
    decoded by the Rust reader on a background thread into ``depth`` host buffers in turn
    (pinned on CUDA), each copied to the device asynchronously on a copy stream while the
    device computes on the previous block (double-buffered: the reader fills one buffer while
    the other is copied and used). Iterating yields ``(start, stop, tensors)``, the tensors on
    the device, one per layer of ``idx``; the reader's exception (a typed store error) is
    raised where the block would have come; leaving the loop early stops the reader."""

    def __init__(self, torch: Any, dev: Any, layers: _Layers, idx: Sequence[int], start: int,
                 stop: int, block_rows: int, depth: int = 2) -> None:
        import queue
        import threading

        self.torch, self.dev, self.layers, self.idx = torch, dev, layers, list(idx)
        self.start, self.stop, self.block_rows = start, stop, max(1, block_rows)
        rows = max(1, min(self.block_rows, stop - start))
        shapes = [(rows, layers.dim(x)) for x in self.idx]
        dtypes = [layers.dtype(x) for x in self.idx]
        self.cuda = dev.type == "cuda"
        self.copy_stream = torch.cuda.Stream(dev) if self.cuda else None
        self.free: queue.Queue[Any] = queue.Queue()
        self.ready: queue.Queue[Any] = queue.Queue()
        for _ in range(max(1, depth)):
            self.free.put(_Slot(torch, dev, shapes, dtypes))
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._read, name="layerscope-feed", daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for b0 in range(self.start, self.stop, self.block_rows):
                slot = self.free.get()
                if slot is None or self.closed.is_set():
                    return
                if slot.event is not None:  # its last copy to the device is done
                    slot.event.synchronize()
                b1 = min(self.stop, b0 + self.block_rows)
                self.layers.read_into(self.idx, b0, b1, [v[:b1 - b0] for v in slot.views])
                self.ready.put((b0, b1, slot))
            self.ready.put(None)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            self.ready.put(e)

    def __iter__(self) -> Iterator[tuple[int, int, list[Any]]]:
        torch = self.torch
        try:
            while True:
                item = self.ready.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                b0, b1, slot = item
                rows = b1 - b0
                if self.cuda:
                    with torch.cuda.stream(self.copy_stream):
                        ts = [h[:rows].to(self.dev, non_blocking=True) for h in slot.host]
                        ev = torch.cuda.Event()
                        ev.record(self.copy_stream)
                    cur = torch.cuda.current_stream(self.dev)
                    cur.wait_event(ev)
                    for t in ts:
                        t.record_stream(cur)
                    slot.event = ev
                    self.free.put(slot)  # refilled once the copy is done
                    yield b0, b1, ts
                else:  # the device computes on the host buffer itself: hand it back after
                    yield b0, b1, [h[:rows] for h in slot.host]
                    self.free.put(slot)
        finally:
            self.close()

    def close(self) -> None:
        self.closed.set()
        self.free.put(None)
        self.thread.join()
