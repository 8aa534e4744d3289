"""Capture activations from a running torch model into an activation store.

::

    with layerscope.capture(model, layers=["encoder.layer.*"], out="runs/minilm",
                            pool="tokens", dtype="float16") as cap:
        for batch in batches:
            model(**batch)
    store = cap.store

Forward hooks pool each selected layer's output *on the device* (masked by the
``attention_mask`` the model was called with), cast it to the store dtype, copy it to (pinned)
host memory — ``non_blocking`` on CUDA, synchronised through an event — and hand one batch
(all layers, row-aligned) to a background writer thread through a *bounded* queue. The writer
thread calls :class:`layerscope.StoreWriter.append`, whose Rust core does the I/O without the
GIL, so the model keeps running while shards are written, and a slow disk blocks the model
(back-pressure) instead of growing memory. See ``docs/capture.md`` for pooling semantics and
the row-id scheme.
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import inspect
import os
import queue
import re
import sys
import threading
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from .errors import CaptureError, InvalidArgumentError, LayerscopeError, StoreExistsError

POOLS_SEQ = ("tokens", "mean", "last", "first", "none")
POOLS_MAP = ("mean", "positions")
DTYPES = ("float16", "bfloat16", "float32")
ROW_ID_MODES = ("content", "index")
#: ``row_ids="index"``: ``row_id = sample_id * 2**POSITION_BITS + (position + 1)``.
POSITION_BITS = 20
_MAX_INDEX_SAMPLE = 2 ** (63 - POSITION_BITS)
_M64 = (1 << 64) - 1
_SENTINEL = object()

__all__ = ["capture", "Capture", "resolve_layers", "add_cli", "POSITION_BITS"]


# --------------------------------------------------------------------------- layer selection
def _glob_regex(pattern: str) -> re.Pattern[str]:
    """Dotted-path glob: ``*`` matches within one path segment, ``**`` across segments,
    ``?`` one character of a segment, ``[...]`` a character class."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append(r"[^.]*")
        elif c == "?":
            out.append(r"[^.]")
        elif c == "[":
            j = pattern.find("]", i + 1)
            if j < 0:
                out.append(re.escape(c))
            else:
                body = pattern[i + 1 : j]
                if body.startswith("!"):
                    body = "^" + body[1:]
                out.append("[" + body.replace("\\", "\\\\") + "]")
                i = j
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out) + r"\Z")


def _base_module(model: Any) -> Any:
    """The module whose submodules are hooked (``torch.compile`` wraps it in ``_orig_mod``)."""
    return getattr(model, "_orig_mod", model)


def resolve_layers(model: Any, layers: Any) -> list[str]:
    """Names of the selected modules, in the order of ``model.named_modules()``.

    ``layers`` is a module name, a dotted glob pattern (``*`` stays within a path segment,
    ``**`` crosses segments: ``"encoder.layer.*"`` selects the six blocks of MiniLM, not their
    children), a list of those, or a callable ``(name, module) -> bool``. A name or pattern
    that matches nothing raises :class:`CaptureError` listing the closest module names.
    """
    base = _base_module(model)
    named = [(n, m) for n, m in base.named_modules() if n != ""]
    names = [n for n, _ in named]
    if callable(layers) and not isinstance(layers, str):
        selected = {n for n, m in named if layers(n, m)}
        if not selected:
            raise CaptureError(f"the layer selector selected no module of {type(base).__name__}")
    else:
        if isinstance(layers, str):
            layers = [layers]
        pats = list(layers)
        if not pats:
            raise CaptureError("no layers given")
        selected = set()
        for pat in pats:
            if not isinstance(pat, str):
                raise CaptureError(f"layer patterns must be strings, got {type(pat).__name__}")
            rx = _glob_regex(pat)
            hit = [n for n in names if n == pat or rx.match(n)]
            if not hit:
                plain = pat.replace("**", "").replace("*", "").replace("?", "")
                close = difflib.get_close_matches(pat, names, n=6, cutoff=0.3)
                close += [
                    c
                    for c in difflib.get_close_matches(plain, names, n=6, cutoff=0.3)
                    if c not in close
                ]
                hint = ", ".join(repr(c) for c in close[:6]) or "(none similar)"
                raise CaptureError(
                    f"layer pattern {pat!r} matches no module of {type(base).__name__} "
                    f"({len(names)} modules); closest names: {hint}"
                )
            selected.update(hit)
    return [n for n in names if n in selected]


# --------------------------------------------------------------------------- helpers
def _torch():
    import torch

    return torch


def _torch_dtype(name: str) -> Any:
    torch = _torch()
    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[name]


def _select(obj: Any, output: Any, name: str, where: str) -> Any:
    """Pick the tensor to capture from a module output (or ``(args, kwargs)`` for inputs)."""
    torch = _torch()
    if where == "input":
        args, kwargs = obj
        if output is None:
            for a in args:
                if isinstance(a, torch.Tensor):
                    return a
            for a in kwargs.values():
                if isinstance(a, torch.Tensor):
                    return a
            raise CaptureError(f"layer {name!r}: no tensor among the module's inputs")
        if callable(output):
            t = output(args, kwargs)
        elif isinstance(output, int):
            if output >= len(args):
                raise CaptureError(
                    f"layer {name!r}: input index {output} out of range "
                    f"({len(args)} positional inputs)"
                )
            t = args[output]
        else:
            if output not in kwargs:
                raise CaptureError(
                    f"layer {name!r}: no keyword input {output!r}; keywords: {sorted(kwargs)}"
                )
            t = kwargs[output]
    else:
        if output is None:
            t = obj
            if isinstance(t, (tuple, list)):
                if not t:
                    raise CaptureError(f"layer {name!r}: the module returned an empty sequence")
                t = t[0]
            elif isinstance(t, dict):  # includes transformers ModelOutput
                if "last_hidden_state" in t:
                    t = t["last_hidden_state"]
                elif t:
                    t = next(iter(t.values()))
        elif callable(output):
            t = output(obj)
        elif isinstance(output, int):
            try:
                t = obj[output]
            except (IndexError, KeyError, TypeError) as e:
                raise CaptureError(
                    f"layer {name!r}: cannot take element {output} of a {type(obj).__name__}: {e}"
                ) from None
        else:
            if isinstance(obj, dict) and output in obj:
                t = obj[output]
            elif hasattr(obj, output):
                t = getattr(obj, output)
            else:
                raise CaptureError(
                    f"layer {name!r}: the {type(obj).__name__} output has no key {output!r}"
                )
    if not isinstance(t, torch.Tensor):
        raise CaptureError(
            f"layer {name!r}: the selected {where} is a {type(t).__name__}, not a tensor "
            "(use output= to pick an element: an index, a key or a callable)"
        )
    return t


def _to_host(t: Any, owned: bool = False) -> tuple[Any, Any]:
    """Copy a tensor to host memory. CUDA: into pinned memory with ``non_blocking=True`` and an
    event recorded on the current stream (the reader must ``event.synchronize()`` first).
    CPU: a contiguous tensor that the model can no longer modify in place (``owned``: ``t``
    is already a fresh tensor of ours, e.g. the result of pooling or of a dtype cast, and is
    not copied again)."""
    torch = _torch()
    if t.is_cuda:
        buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        buf.copy_(t, non_blocking=True)
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(t.device))
        return buf, ev
    if not t.is_contiguous():
        return t.contiguous(), None
    return (t if owned else t.clone()), None


def _mix64(z: np.ndarray) -> np.ndarray:
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
        p = _mix64(np.asarray(position, dtype=np.int64).astype(np.uint64) + np.uint64(1))
    return (_mix64(key ^ p) >> np.uint64(1)).astype(np.int64)


def index_row_ids(sample_ids: np.ndarray, position: np.ndarray) -> np.ndarray:
    """``row_id = sample_id * 2**20 + (position + 1)``; ``position = -1`` for pooled rows."""
    s = np.asarray(sample_ids, dtype=np.int64)
    p = np.asarray(position, dtype=np.int64) + 1
    if s.size and (s.min() < 0 or s.max() >= _MAX_INDEX_SAMPLE):
        raise CaptureError(f"row_ids='index' needs 0 <= sample id < 2**{63 - POSITION_BITS}")
    if p.size and p.max() >= 2**POSITION_BITS:
        raise CaptureError(f"row_ids='index' needs positions < 2**{POSITION_BITS} - 1")
    return s * (2**POSITION_BITS) + p


def _sample_keys(
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


def _versions() -> dict[str, str]:

    out = {"python": sys.version.split()[0]}
    try:
        from . import __version__

        out["layerscope"] = str(__version__)
    except Exception:  # noqa: BLE001 - metadata only
        pass
    torch = _torch()
    out["torch"] = str(torch.__version__)
    tf = sys.modules.get("transformers")
    if tf is not None:
        out["transformers"] = str(getattr(tf, "__version__", "?"))
    out["numpy"] = np.__version__
    return out


_FULLGRAPH_MSG = (
    "layerscope.capture cannot run inside a graph compiled with torch.compile(fullgraph=True) "
    "(or error_on_graph_break): its hooks copy activations to host memory and hand them to a "
    "writer thread, which needs a graph break at each hooked module. Compile without "
    "fullgraph=True (the rest of the model stays compiled; the hooks run eagerly at the "
    "breaks) or capture the uncompiled model"
)


def _is_dynamo_unsupported(exc: BaseException) -> bool:
    """Whether ``exc`` is torch._dynamo refusing to trace (e.g. a hook under fullgraph=True)."""

    dexc = sys.modules.get("torch._dynamo.exc")
    unsupported = getattr(dexc, "Unsupported", None)
    return unsupported is not None and isinstance(exc, unsupported)


class _Batch:
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
        self._dev_cache: dict[Any, Any] = {}


class Capture:
    """A capture session; create it with :func:`capture` and use it as a context manager."""

    def __init__(
        self,
        model: Any,
        layers: Any,
        out: str | os.PathLike,
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
    ) -> None:
        if pool not in POOLS_SEQ + POOLS_MAP:
            raise InvalidArgumentError(
                f"pool must be one of {POOLS_SEQ + ('positions',)}, got {pool!r}"
            )
        if dtype not in DTYPES:
            raise InvalidArgumentError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        if where not in ("output", "input"):
            raise InvalidArgumentError(f"where must be 'output' or 'input', got {where!r}")
        if row_ids not in ROW_ID_MODES:
            raise InvalidArgumentError(f"row_ids must be one of {ROW_ID_MODES}, got {row_ids!r}")
        if max_rows is not None and int(max_rows) < 1:
            raise InvalidArgumentError(f"max_rows must be >= 1, got {max_rows}")
        if int(queue_size) < 1:
            raise InvalidArgumentError(f"queue_size must be >= 1, got {queue_size}")
        self.model = model
        self.layer_names = resolve_layers(model, layers)
        self.out = os.fspath(out)
        self.pool, self.dtype, self.where, self.output = pool, dtype, where, output
        self.max_rows = None if max_rows is None else int(max_rows)
        self.shard_bytes = shard_bytes
        self.user_metadata = dict(metadata or {})
        self.overwrite = bool(overwrite)
        self.row_id_mode = row_ids
        self._sample_iter = None if sample_ids is None else iter(sample_ids)
        self.queue_size = int(queue_size)
        self.store: Any = None
        self.rows_queued = 0
        self.batches = 0
        self._torch_dtype = _torch_dtype(dtype)
        self._handles: list[Any] = []
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=self.queue_size)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._writer: Any = None
        self._active = False
        self._batch: _Batch | None = None
        self._top_mode = False  # the top-level forward hooks delimit batches
        self._explicit_mask: Any = None
        self._next_ids: np.ndarray | None = None
        self._next_sample = 0
        self._fired: set[str] = set()
        self._full_warned = False
        self._compiled = False
        self._signature: inspect.Signature | None = None

    # ----------------------------------------------------------------- user controls
    def mask(self, attention_mask: Any) -> None:
        """Set the padding mask (``[batch, seq]``, nonzero = real token) used for the
        following forward passes, overriding the one found in the model call; ``None`` goes
        back to automatic detection."""
        torch = _torch()
        if attention_mask is not None:
            if not isinstance(attention_mask, torch.Tensor):
                attention_mask = torch.as_tensor(np.asarray(attention_mask))
            if attention_mask.dim() != 2:
                raise CaptureError(
                    f"the mask must be [batch, seq], got shape {tuple(attention_mask.shape)}"
                )
        self._explicit_mask = attention_mask

    def set_sample_ids(self, ids: Sequence[int] | np.ndarray) -> None:
        """Sample ids (int64) for the next forward pass only (one per sample of the batch)."""
        self._next_ids = np.asarray(ids, dtype=np.int64).reshape(-1)

    @property
    def rows_written(self) -> int:
        return 0 if self._writer is None else int(self._writer.rows_written)

    # ----------------------------------------------------------------- context manager
    def __enter__(self) -> Capture:
        if self._active or self.store is not None:
            raise CaptureError("a Capture can be entered once")
        if (
            os.path.exists(self.out)
            and not self.overwrite
            and (not os.path.isdir(self.out) or os.listdir(self.out))
        ):
            raise StoreExistsError(f"{self.out} exists (pass overwrite=True to replace it)")
        torch = _torch()
        base = _base_module(self.model)
        self._compiled = (
            base is not self.model or getattr(base, "_compiled_call_impl", None) is not None
        )
        for obj in (self.model, base):
            ctx = getattr(obj, "dynamo_ctx", None) or getattr(obj, "_compiled_call_impl", None)
            if getattr(ctx, "fullgraph", False) or getattr(ctx, "error_on_graph_break", False):
                raise CaptureError(_FULLGRAPH_MSG)
        modules = dict(base.named_modules())
        wrap = (lambda f: torch.compiler.disable(f)) if self._compiled else (lambda f: f)
        try:
            self._handles.append(
                base.register_forward_pre_hook(wrap(self._top_pre), with_kwargs=True)
            )
            self._handles.append(base.register_forward_hook(wrap(self._top_post)))
            for name in self.layer_names:
                mod = modules[name]
                if self.where == "output":
                    h = mod.register_forward_hook(wrap(self._make_out_hook(name)))
                else:
                    h = mod.register_forward_pre_hook(
                        wrap(self._make_in_hook(name)), with_kwargs=True
                    )
                self._handles.append(h)
        except BaseException:
            self._remove_hooks()
            raise
        if self._compiled:
            warnings.warn(
                "layerscope.capture: the model is compiled (torch.compile); torch._dynamo caches "
                "are reset so that the hooks are traced in (the model recompiles on its first "
                "batch and the hooks run eagerly at graph breaks)",
                stacklevel=3,
            )
            torch._dynamo.reset()
        self._thread = threading.Thread(
            target=self._writer_loop, name="layerscope-writer", daemon=True
        )
        self._thread.start()
        self._active = True
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        self._active = False
        self._remove_hooks()
        if self._compiled:
            _torch()._dynamo.reset()
        pending, self._batch = self._batch, None
        if exc is None and pending is not None and not self._top_mode:
            try:
                self._flush(pending)
            except BaseException as e:  # noqa: BLE001 - raised after the store is closed
                exc_pending: BaseException | None = e
            else:
                exc_pending = None
        else:
            exc_pending = None
        self._finish_writer()
        if exc is not None and _is_dynamo_unsupported(exc):
            raise CaptureError(
                _FULLGRAPH_MSG + f" (torch said: {str(exc).splitlines()[0]})"
            ) from exc
        if exc is not None:
            if hasattr(exc, "add_note"):
                if self._error is not None:
                    exc.add_note(f"layerscope: the store writer also failed: {self._error!r}")
                elif self.store is not None:
                    exc.add_note(
                        f"layerscope: {self.out} holds the {self.store.num_rows} rows of "
                        "the forward passes completed before this exception"
                    )
            return False
        if self._error is not None:
            err = self._error
            if isinstance(err, LayerscopeError):
                raise err
            raise CaptureError(f"the store writer failed: {err!r}") from err
        if exc_pending is not None:
            raise exc_pending
        missing = [n for n in self.layer_names if n not in self._fired]
        if not self._fired:
            warnings.warn(
                "layerscope.capture: no selected layer produced any output (did the model run "
                "inside the block? hooks on a model compiled after capture() started do not "
                "fire)",
                stacklevel=2,
            )
        elif missing:
            raise CaptureError(
                f"selected layer(s) never produced output while others did: {missing}; the "
                "store holds the other layers only up to the first batch (check that these "
                "modules run in forward)"
            )
        return False

    def close(self) -> Any:
        """Same as leaving the ``with`` block without an exception; returns the store."""
        self.__exit__(None, None, None)
        return self.store

    # ----------------------------------------------------------------- hooks
    def _remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _raise_writer_error(self) -> None:
        if self._error is not None:
            err = self._error
            if isinstance(err, LayerscopeError):
                raise CaptureError(f"the store writer failed: {err}") from err
            raise CaptureError(f"the store writer failed: {err!r}") from err

    def _find_call_inputs(self, module: Any, args: tuple, kwargs: dict) -> tuple[Any, Any]:
        torch = _torch()
        mask = kwargs.get("attention_mask")
        primary = None
        for key in ("input_ids", "pixel_values", "input_values", "inputs_embeds", "x", "input"):
            v = kwargs.get(key)
            if isinstance(v, torch.Tensor):
                primary = v
                break
        if args and (mask is None or primary is None):
            if self._signature is None:
                try:
                    self._signature = inspect.signature(module.forward)
                except (TypeError, ValueError):
                    self._signature = inspect.Signature()
            try:
                bound = self._signature.bind_partial(*args, **kwargs).arguments
            except TypeError:
                bound = {}
            if mask is None:
                mask = bound.get("attention_mask")
            if primary is None:
                for a in args:
                    if isinstance(a, torch.Tensor):
                        primary = a
                        break
        if primary is None:
            for v in kwargs.values():
                if isinstance(v, torch.Tensor) and v is not mask:
                    primary = v
                    break
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            mask = None
        return primary, mask

    def _top_pre(self, module: Any, args: tuple, kwargs: dict) -> None:
        if not self._active:
            return None
        self._raise_writer_error()
        self._top_mode = True
        b = _Batch()
        self._batch = b  # an unfinished batch of an aborted forward is dropped here
        if self._full():
            return None
        primary, mask = self._find_call_inputs(module, args, kwargs)
        if self._explicit_mask is not None:
            mask = self._explicit_mask
        self._begin(b, primary, mask)
        return None

    def _begin(self, b: _Batch, primary: Any, mask: Any) -> None:
        if mask is not None:
            b.mask = mask.detach() != 0
            b.batch_size = int(mask.shape[0])
            host, ev = _to_host(b.mask)
            b.mask_host = host
            if ev is not None:
                b.events.append(ev)
        if primary is not None and primary.dim() >= 1:
            if b.batch_size is None:
                b.batch_size = int(primary.shape[0])
            if self.row_id_mode == "content" and int(primary.shape[0]) == b.batch_size:
                host, ev = _to_host(primary.detach())
                b.input_host = host
                if ev is not None:
                    b.events.append(ev)

    def _top_post(self, module: Any, args: tuple, output: Any) -> None:
        if not self._active:
            return None
        b, self._batch = self._batch, None
        if b is not None and b.layers:
            self._flush(b)
        return None

    def _make_out_hook(self, name: str) -> Callable[..., None]:
        def hook(module: Any, args: tuple, output: Any) -> None:
            if self._active:
                self._on_tensor(name, _select(output, self.output, name, "output"))

        return hook

    def _make_in_hook(self, name: str) -> Callable[..., None]:
        def hook(module: Any, args: tuple, kwargs: dict) -> None:
            if self._active:
                self._on_tensor(name, _select((args, kwargs), self.output, name, "input"))
            return None

        return hook

    def _full(self) -> bool:
        if self.max_rows is not None and self.rows_queued >= self.max_rows:
            if not self._full_warned:
                self._full_warned = True
                warnings.warn(
                    f"layerscope.capture: max_rows={self.max_rows} reached; further "
                    "batches are not captured",
                    stacklevel=4,
                )
            return True
        return False

    def _on_tensor(self, name: str, t: Any) -> None:
        self._raise_writer_error()
        self._fired.add(name)
        b = self._batch
        if b is None or (not self._top_mode and name in b.layers):
            # no top-level forward seen: a batch ends when a layer fires a second time
            if b is not None:
                self._batch = None
                self._flush(b)
            if self._full():
                return
            b = self._batch = _Batch()
            self._begin(b, None, self._explicit_mask)
        if self._full():
            return
        if name in b.layers:
            raise CaptureError(
                f"layer {name!r} ran twice in one forward pass (a module reused inside the "
                "model); select modules that run once per forward"
            )
        t = t.detach()
        rows, layout = self._pool(name, t, b)
        rows = rows.to(self._torch_dtype)
        # a view of the module's output (2-D pass-through, pool="none"/"positions" in the
        # output dtype) must be copied: the model may modify it in place later
        owned = rows.untyped_storage().data_ptr() != t.untyped_storage().data_ptr()
        host, ev = _to_host(rows, owned=owned)
        if ev is not None:
            b.events.append(ev)
        b.layers[name] = host
        b.layouts[name] = layout
        b.shapes[name] = tuple(t.shape)

    # ----------------------------------------------------------------- pooling (on device)
    def _mask_on(self, b: _Batch, device: Any, B: int, S: int, name: str) -> Any:
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

    def _pool(self, name: str, x: Any, b: _Batch) -> tuple[Any, tuple[str, int]]:
        torch = _torch()
        pool = self.pool
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
            m = self._mask_on(b, x.device, B, S, name)
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

    # ----------------------------------------------------------------- batches → writer
    def _flush(self, b: _Batch) -> None:
        missing = [n for n in self.layer_names if n not in b.layers]
        if missing:
            ran = [n for n in self.layer_names if n in b.layers]
            raise CaptureError(
                f"in forward pass {self.batches}, selected layer(s) {missing} produced no "
                f"output while {ran} did (hooks that never fire: a module not used in forward, "
                "or a model compiled after capture() started)"
            )
        counts = {n: int(b.layers[n].shape[0]) for n in self.layer_names}
        if len(set(counts.values())) != 1:
            detail = "; ".join(f"{n}: output {b.shapes[n]} -> {counts[n]} rows" for n in counts)
            raise CaptureError(
                f"the selected layers give different numbers of rows for one batch "
                f"(pool={self.pool!r}): {detail}. All layers of a store must be row-aligned: "
                "select layers with matching outputs or choose another pooling"
            )
        n = next(iter(counts.values()))
        B = int(b.batch_size or 0)
        if self._next_ids is not None:
            ids, self._next_ids = self._next_ids, None
        elif self._sample_iter is not None:
            ids = np.fromiter(
                (int(next(self._sample_iter, -(2**63))) for _ in range(B)), dtype=np.int64, count=B
            )
            if B and ids.min() == -(2**63):
                raise CaptureError("sample_ids ran out before the inputs did")
        else:
            ids = np.arange(self._next_sample, self._next_sample + B, dtype=np.int64)
        if ids.shape[0] != B:
            raise CaptureError(f"{ids.shape[0]} sample ids given for a batch of {B} samples")
        self._next_sample += B
        b.sample_ids = ids
        keep = n
        if self.max_rows is not None:
            keep = min(n, self.max_rows - self.rows_queued)
        self.rows_queued += keep
        self.batches += 1
        layout = next(
            (b.layouts[k] for k in self.layer_names if b.layouts[k][0] != "pooled"),
            b.layouts[self.layer_names[0]],
        )
        item = (b, keep, n, layout)
        while True:  # bounded queue: block (back-pressure) but notice a dead writer
            self._raise_writer_error()
            try:
                self._queue.put(item, timeout=0.5)
                break
            except queue.Full:
                continue

    def _finish_writer(self) -> None:
        if self._thread is not None:
            self._queue.put(_SENTINEL)
            self._thread.join()
            self._thread = None
        if self._writer is not None:
            try:
                self.store = self._writer.close()
            except BaseException as e:  # noqa: BLE001
                if self._error is None:
                    self._error = e

    def _writer_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is _SENTINEL:
                return
            if self._error is not None:
                continue  # keep draining so that the producer never blocks forever
            try:
                self._write(*item)
            except BaseException as e:  # noqa: BLE001 - handed to the main thread
                self._error = e

    def _row_layout(
        self, b: _Batch, layout: tuple[str, int], n: int
    ) -> tuple[np.ndarray, np.ndarray]:
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

    def _write(self, b: _Batch, keep: int, n: int, layout: tuple[str, int]) -> None:
        for ev in b.events:
            ev.synchronize()
        si, pos = self._row_layout(b, layout, n)
        ids = b.sample_ids
        assert ids is not None
        if self.row_id_mode == "content":
            inputs = None
            if b.input_host is not None:
                t = b.input_host
                inputs = (t.float() if t.dtype == _torch().bfloat16 else t).numpy()
            mask = None if b.mask_host is None else b.mask_host.numpy()
            keys = _sample_keys(ids, inputs, mask)
            row_ids = content_row_ids(keys, si, pos)
        else:
            row_ids = index_row_ids(ids[si], pos)
        arrays = {}
        for name in self.layer_names:
            t = b.layers[name][:keep]
            arrays[name] = t if t.dtype == _torch().bfloat16 else t.numpy()
        if self._writer is None:
            from .store import StoreWriter

            meta = self._metadata(b)
            kw: dict[str, Any] = {
                "dtype": self.dtype,
                "metadata": meta,
                "overwrite": self.overwrite,
            }
            if self.shard_bytes is not None:
                kw["shard_bytes"] = int(self.shard_bytes)
            self._writer = StoreWriter(self.out, **kw)
        self._append(
            self._writer,
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

    def _metadata(self, b: _Batch) -> dict[str, Any]:
        base = _base_module(self.model)
        return {
            "capture": {
                "model_class": f"{type(base).__module__}.{type(base).__qualname__}",
                "model_name": str(
                    getattr(getattr(base, "config", None), "_name_or_path", "") or ""
                ),
                "layers": {
                    n: {"output_shape": list(b.shapes[n][1:]), "dim": int(b.layers[n].shape[1])}
                    for n in self.layer_names
                },
                "pool": self.pool,
                "dtype": self.dtype,
                "where": self.where,
                "output": None
                if self.output is None
                else (self.output if isinstance(self.output, (int, str)) else repr(self.output)),
                "row_ids": self.row_id_mode,
                "row_id_scheme": (
                    "splitmix64(blake2b8(sample_id, non-padding input) ^ splitmix64(position+1)) >> 1"
                    if self.row_id_mode == "content"
                    else f"sample_id * 2**{POSITION_BITS} + (position + 1)"
                ),
                "position": "index among the sample's non-padding tokens (-1: pooled row)",
                "versions": _versions(),
            },
            "user": self.user_metadata,
        }


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




# --------------------------------------------------------------------------- CLI
def _cli_capture(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    from transformers import AutoModel, AutoTokenizer

    if args.texts:
        with open(args.texts, encoding="utf-8") as f:
            texts = [line.rstrip("\n") for line in f if line.strip()]
    elif args.stdlib_corpus:
        from .corpus import stdlib_corpus

        texts = stdlib_corpus(args.stdlib_corpus)
    else:
        raise InvalidArgumentError("give --texts FILE or --stdlib-corpus N")
    if not texts:
        raise InvalidArgumentError("no texts to capture")
    tok = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    model = AutoModel.from_pretrained(args.model, local_files_only=True).eval()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency of transformers
        tqdm = None
    bar = tqdm(total=len(texts), unit="text", desc="capture") if tqdm is not None else None
    bs = int(args.batch_size)
    with (
        torch.inference_mode(),
        capture(
            model,
            layers=args.layers,
            out=args.out,
            pool=args.pool,
            dtype=args.dtype,
            overwrite=args.overwrite,
            max_rows=args.max_rows,
            metadata={
                "texts": args.texts or f"stdlib_corpus({args.stdlib_corpus})",
                "max_length": args.max_length,
                "batch_size": bs,
            },
        ) as cap,
    ):
        for i in range(0, len(texts), bs):
            enc = tok(
                texts[i : i + bs],
                padding=True,
                truncation=True,
                max_length=args.max_length,
                return_tensors="pt",
            )
            model(**enc)
            if bar is not None:
                bar.update(len(texts[i : i + bs]))
    if bar is not None:
        bar.close()
    st = cap.store
    if st is None:
        print("nothing captured")
        return 1
    print(f"wrote {st.num_rows} rows x {len(st.layers)} layers to {args.out}")
    return 0


def add_cli(sub: Any) -> None:
    p = sub.add_parser(
        "capture",
        help="capture activations of a local Hugging Face model",
        description="Run a locally stored Hugging Face model (AutoModel + "
        "AutoTokenizer, offline) over texts and store the chosen layers.",
    )
    p.add_argument("--model", required=True, help="model directory (AutoModel.from_pretrained)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--texts", help="text file, one text per line")
    src.add_argument(
        "--stdlib-corpus",
        type=int,
        metavar="N",
        help="use N texts built from the Python standard library's docstrings",
    )
    p.add_argument(
        "--layers",
        action="append",
        required=True,
        metavar="PATTERN",
        help="module name or dotted glob (repeatable), e.g. 'encoder.layer.*'",
    )
    p.add_argument("--out", required=True, help="store directory")
    p.add_argument("--pool", default="tokens", choices=POOLS_SEQ)
    p.add_argument("--dtype", default="float16", choices=DTYPES)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--max-rows", type=int, default=None)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cli_capture)
