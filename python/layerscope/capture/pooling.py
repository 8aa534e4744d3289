"""Pooling on the device: one forward pass's state (:class:`Batch`), the rows each pooling
takes from a ``[batch, seq, dim]`` or ``[batch, C, H, W]`` output (:func:`pool_rows`, masked by
the attention mask) and the copy to (pinned) host memory (:func:`to_host`). Semantics in
``docs/capture.md``."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import CaptureError

POOLS_SEQ = ("tokens", "mean", "last", "first", "none")
POOLS_MAP = ("mean", "positions")


class Batch:
    """The state of one forward pass: mask, inputs, per-layer host copies."""

    __slots__ = (
        "batch_size",
        "mask",
        "mask_host",
        "input_host",
        "events",
        "layers",
        "layouts",
        "shapes",
        "sample_ids",
        "device_rows",
        "_dev_cache",
    )

    def __init__(self) -> None:
        self.batch_size: int | None = None
        self.mask: Any = None  # bool [B, S] on the model device (or None: all tokens valid)
        self.mask_host: Any = None
        self.input_host: Any = None
        self.events: list[Any] = []
        self.layers: dict[str, Any] = {}
        self.layouts: dict[str, tuple[str, int]] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.sample_ids: np.ndarray | None = None
        # the rows of each layer on the model's device, for capture(accumulate=True)
        self.device_rows: dict[str, Any] = {}
        self._dev_cache: dict[Any, Any] = {}


def to_host(t: Any, owned: bool = False) -> tuple[Any, Any]:
    """Copy a tensor to host memory. CUDA: into pinned memory with ``non_blocking=True`` and an
    event recorded on the current stream (the reader must ``event.synchronize()`` first).
    CPU: a contiguous tensor that the model can no longer modify in place (``owned``: ``t``
    is already a fresh tensor of ours, e.g. the result of pooling or of a dtype cast, and is
    not copied again)."""
    import torch

    if t.is_cuda:
        buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        buf.copy_(t, non_blocking=True)
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(t.device))
        return buf, ev
    if not t.is_contiguous():
        return t.contiguous(), None
    return (t if owned else t.clone()), None


def mask_on(b: Batch, device: Any, B: int, S: int, name: str) -> Any:
    """The batch's padding mask on ``device``, cut to the last ``S`` positions (cached)."""
    if b.mask is None:
        return None
    key = (device, S)
    m = b._dev_cache.get(key)
    if m is None:
        m = b.mask
        if int(m.shape[0]) != B:
            raise CaptureError(
                f"layer {name!r}: batch size {B} but the attention mask is {tuple(m.shape)}"
            )
        if int(m.shape[1]) < S:
            raise CaptureError(
                f"layer {name!r}: sequence length {S} but the attention mask is "
                f"{tuple(m.shape)}; give the mask that fits with cap.mask(...) or use "
                "pool='none'"
            )
        m = m[:, -S:].to(device)  # a KV cache makes the mask cover past + new tokens
        b._dev_cache[key] = m
    return m


def pool_rows(pool: str, name: str, x: Any, b: Batch) -> tuple[Any, tuple[str, int]]:
    """The rows of one layer's output ``x`` under ``pool`` (on the device) and its row layout
    ``(kind, positions per sample)``."""
    import torch

    if b.batch_size is None:
        b.batch_size = int(x.shape[0]) if x.dim() else 1
    if x.dim() == 2:
        return x, ("pooled", 1)
    if x.dim() == 3:
        if pool not in POOLS_SEQ:
            raise CaptureError(
                f"layer {name!r}: pool={pool!r} is for conv maps; a "
                f"[batch, seq, dim] output {tuple(x.shape)} takes one of {POOLS_SEQ}"
            )
        B, S, D = (int(v) for v in x.shape)
        if pool == "none":
            return x.reshape(B * S, D), ("all", S)
        m = mask_on(b, x.device, B, S, name)
        if pool == "tokens":
            if m is None:
                return x.reshape(B * S, D), ("all", S)
            key = ("idx", x.device, S)
            idx = b._dev_cache.get(key)
            if idx is None:
                idx = b._dev_cache[key] = m.reshape(-1).nonzero().squeeze(1)
            return x.reshape(B * S, D).index_select(0, idx), ("tokens", S)
        if pool == "mean":
            xf = x.float()
            if m is None:
                return xf.mean(1), ("pooled", 1)
            w = m.to(xf.dtype).unsqueeze(-1)
            return (xf * w).sum(1) / w.sum(1), ("mean", S)
        ar = torch.arange(S, device=x.device)
        if m is None:
            pos = torch.full((B,), 0 if pool == "first" else S - 1, device=x.device)
        elif pool == "first":
            pos = (m * (S - ar)).argmax(1)  # smallest position with mask 1
        else:
            pos = (m * (ar + 1)).argmax(1)  # largest position with mask 1
        return x[torch.arange(B, device=x.device), pos], (pool, S)
    if x.dim() == 4:
        if pool not in POOLS_MAP:
            raise CaptureError(
                f"layer {name!r}: a conv map {tuple(x.shape)} takes pool="
                f"'mean' or 'positions', not {pool!r}"
            )
        B, C, H, W = (int(v) for v in x.shape)
        if pool == "mean":
            return x.float().mean((2, 3)), ("pooled", 1)
        return x.permute(0, 2, 3, 1).reshape(B * H * W, C), ("all", H * W)
    raise CaptureError(
        f"layer {name!r}: cannot pool an output of shape {tuple(x.shape)} "
        "(2-D, 3-D [batch, seq, dim] and 4-D [batch, C, H, W] are supported)"
    )
