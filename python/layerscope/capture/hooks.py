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

import inspect
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from .._defaults import CAPTURE_DTYPES
from .._validate import Bool, Int, OneOf, validated
from ..errors import CaptureError, InvalidArgumentError, LayerscopeError, StoreExistsError
from .pooling import POOLS_SEQ, Batch, pool_rows, to_host
from .rowids import POSITION_BITS, ROW_ID_MODES
from .select import base_module, resolve_layers, select_tensor
from .writer import BatchWriter, versions

DTYPES = CAPTURE_DTYPES


_FULLGRAPH_MSG = (
    "layerscope.capture cannot run inside a graph compiled with torch.compile(fullgraph=True) "
    "(or error_on_graph_break): its hooks copy activations to host memory and hand them to a "
    "writer thread, which needs a graph break at each hooked module. Compile without "
    "fullgraph=True (the rest of the model stays compiled; the hooks run eagerly at the "
    "breaks) or capture the uncompiled model"
)


class NoWriter:
    """The writer of a capture without a store (``out=None, accumulate=True``)."""

    error: BaseException | None = None
    store: Any = None
    rows_written = 0

    def start(self) -> None:
        pass

    def put(self, item: Any) -> None:
        pass

    def raise_error(self) -> None:
        pass

    def finish(self, *, complete: bool = True) -> None:
        pass


def refuse_existing(out: str | os.PathLike[str], overwrite: bool) -> None:
    """:class:`StoreExistsError` unless ``out`` is absent, an empty folder, or ``overwrite``
    (checked before a capture starts, and by the CLI before it loads a model)."""
    if (
        os.path.exists(out)
        and not overwrite
        and (not os.path.isdir(out) or os.listdir(out))
    ):
        raise StoreExistsError(f"{os.fspath(out)} exists and is not empty (pass overwrite=True, "
                               "or --overwrite on the command line, to replace it)")


def _is_dynamo_unsupported(exc: BaseException) -> bool:
    """Whether ``exc`` is torch._dynamo refusing to trace (e.g. a hook under fullgraph=True)."""

    dexc = sys.modules.get("torch._dynamo.exc")
    unsupported = getattr(dexc, "Unsupported", None)
    return unsupported is not None and isinstance(exc, unsupported)


class Capture:
    """A capture session (``layerscope.capture``): the activations of ``layers`` of ``model``
    into the store at ``out``; use it as a context manager.

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
    accumulate : also accumulate the moment statistics of the captured rows (the values as
        stored, in ``dtype``) on the device the model runs on, as the forward passes run
        (:class:`layerscope._device.products.DeviceMoments`: the torch engine's arithmetic, f32
        products summed in f64); ``out=None`` then writes no store at all. After the block,
        :attr:`moments` holds the core's ``Moments`` and the capture itself is a source of
        the moment measures — ``layerscope.cka(cap)`` (linear, biased/debiased),
        ``spectrum(cap)``, ``alignment(cap)``, ``analyze(cap)`` — with no disk traffic.
        At the first batch the accumulator's ``(D + L)² · 8`` bytes are checked against the
        device's memory: above it a :class:`MemoryBudgetError` says to write the store and
        let the planner tile the passes, before anything is accumulated.
    compute : the accumulation's products: ``"float32"`` (default; summed over at most 128
        rows, added in float64: agrees with float64 to 1e-6 for CKA and spectra),
        ``"float64"`` (what the alignment measures of rank-deficient layers — CCA, whitening
        — need: their ridge amplifies float32 rounding), or ``"tf32"`` (CUDA tensor cores, an
        approximation).

    Hooks are removed when the block exits, also on an exception; the exception propagates
    and the store keeps every forward pass completed before it. Works under ``no_grad`` and
    ``inference_mode``; with a model compiled by ``torch.compile`` (dynamo caches are reset,
    the hooks run at graph breaks) but not with ``fullgraph=True``, which raises a
    :class:`CaptureError` saying why. See ``docs/capture.md``.
    """

    @validated(_where="layerscope.capture", pool=OneOf(*POOLS_SEQ, "positions"),
               dtype=OneOf(*DTYPES), where=OneOf("output", "input"), max_rows=(None, Int(1)),
               shard_bytes=(None, Int(1)), overwrite=Bool(), queue_size=Int(1),
               row_ids=OneOf(*ROW_ID_MODES), accumulate=Bool(),
               compute=OneOf("float32", "float64", "tf32"))
    def __init__(
        self,
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
        accumulate: bool = False,
        compute: str = "float32",
    ) -> None:
        if out is None and not accumulate:
            raise InvalidArgumentError(
                "layerscope.capture: out= (the store directory) is required unless "
                "accumulate=True (statistics only)")
        self.model = model
        self.layer_names = resolve_layers(model, layers)
        self.out = None if out is None else os.fspath(out)
        self.accumulate = bool(accumulate)
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
        import torch

        self._torch_dtype = getattr(torch, dtype)
        self._handles: list[Any] = []
        self._out: Any = NoWriter() if self.out is None else BatchWriter(
            self.out, layer_names=self.layer_names, dtype=dtype, overwrite=self.overwrite,
            shard_bytes=shard_bytes, row_id_mode=row_ids, queue_size=self.queue_size,
            metadata=self._metadata)
        self._acc: Any = None
        if self.accumulate:
            from .._device.products import DeviceMoments

            self._acc = DeviceMoments(self.layer_names, compute=compute)
        elif compute != "float32":
            raise InvalidArgumentError("compute= applies to accumulate=True")
        self._moments: Any = None
        self._active = False
        self._batch: Batch | None = None
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
        import torch

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
        return self._out.rows_written

    @property
    def moments(self) -> Any:
        """The core's ``Moments`` of every captured row (``accumulate=True``; after the
        block, or of the batches so far inside it): what :func:`layerscope.cka`,
        :func:`~layerscope.spectrum`, :func:`~layerscope.alignment` and
        :func:`~layerscope.analyze` compute from when given the capture."""
        if self._acc is None:
            raise CaptureError("the capture did not accumulate statistics (accumulate=True)")
        if self._acc.n == 0:
            raise CaptureError("no rows were captured (did the model run inside the block?)")
        if self._moments is None or int(self._moments.n) != self._acc.n:
            self._moments = self._acc.moments()
            from .._moments import F32_SHIFT_WARN

            if float(self._moments.shift_offset) > F32_SHIFT_WARN:
                warnings.warn(
                    "layerscope.capture(accumulate=True): the first batch's means, the shift "
                    f"of the float32 products, were {float(self._moments.shift_offset):.1f} "
                    "standard deviations from the mean of all rows for some feature (the "
                    "batches drift); the moments may deviate from float64 by more than 1e-6",
                    RuntimeWarning, stacklevel=2)
        return self._moments

    # ----------------------------------------------------------------- context manager
    def __enter__(self) -> Capture:
        if self._active or self.store is not None or self._moments is not None:
            raise CaptureError("a Capture can be entered once")
        if self.out is not None:
            refuse_existing(self.out, self.overwrite)
        import torch

        base = base_module(self.model)
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
        self._out.start()
        self._active = True
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        self._active = False
        self._remove_hooks()
        if self._compiled:
            sys.modules["torch"]._dynamo.reset()
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
        # left through an exception (Ctrl-C included): the rows are kept, the store says it
        # is not the whole capture (docs/FORMAT.md: "complete")
        self._out.finish(complete=exc is None)
        self.store = self._out.store
        if exc is not None and _is_dynamo_unsupported(exc):
            raise CaptureError(
                _FULLGRAPH_MSG + f" (torch said: {str(exc).splitlines()[0]})"
            ) from exc
        if exc is not None:
            if hasattr(exc, "add_note"):
                if self._out.error is not None:
                    exc.add_note(f"layerscope: the store writer also failed: {self._out.error!r}")
                elif self.store is not None:
                    exc.add_note(
                        f"layerscope: {self.out} holds the {self.store.num_rows} rows of "
                        "the forward passes completed before this exception"
                    )
            return False
        if self._out.error is not None:
            err = self._out.error
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


    def _find_call_inputs(self, module: Any, args: tuple, kwargs: dict) -> tuple[Any, Any]:
        import torch

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
        self._out.raise_error()
        self._top_mode = True
        b = Batch()
        self._batch = b  # an unfinished batch of an aborted forward is dropped here
        if self._full():
            return None
        primary, mask = self._find_call_inputs(module, args, kwargs)
        if self._explicit_mask is not None:
            mask = self._explicit_mask
        self._begin(b, primary, mask)
        return None

    def _begin(self, b: Batch, primary: Any, mask: Any) -> None:
        if mask is not None:
            b.mask = mask.detach() != 0
            b.batch_size = int(mask.shape[0])
            host, ev = to_host(b.mask)
            b.mask_host = host
            if ev is not None:
                b.events.append(ev)
        if primary is not None and primary.dim() >= 1:
            if b.batch_size is None:
                b.batch_size = int(primary.shape[0])
            if self.row_id_mode == "content" and int(primary.shape[0]) == b.batch_size:
                host, ev = to_host(primary.detach())
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
                self._on_tensor(name, select_tensor(output, self.output, name, "output"))

        return hook

    def _make_in_hook(self, name: str) -> Callable[..., None]:
        def hook(module: Any, args: tuple, kwargs: dict) -> None:
            if self._active:
                self._on_tensor(name, select_tensor((args, kwargs), self.output, name, "input"))
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
        self._out.raise_error()
        self._fired.add(name)
        b = self._batch
        if b is None or (not self._top_mode and name in b.layers):
            # no top-level forward seen: a batch ends when a layer fires a second time
            if b is not None:
                self._batch = None
                self._flush(b)
            if self._full():
                return
            b = self._batch = Batch()
            self._begin(b, None, self._explicit_mask)
        if self._full():
            return
        if name in b.layers:
            raise CaptureError(
                f"layer {name!r} ran twice in one forward pass (a module reused inside the "
                "model); select modules that run once per forward"
            )
        t = t.detach()
        rows, layout = pool_rows(self.pool, name, t, b)
        rows = rows.to(self._torch_dtype)
        # a view of the module's output (2-D pass-through, pool="none"/"positions" in the
        # output dtype) must be copied: the model may modify it in place later
        owned = rows.untyped_storage().data_ptr() != t.untyped_storage().data_ptr()
        if self._acc is not None:
            # the accumulator reads the rows at the end of the forward pass: its own copy
            b.device_rows[name] = rows if owned else rows.clone()
        if self.out is None:
            b.layers[name] = b.device_rows[name]  # no store: nothing goes to the host
        else:
            host, ev = to_host(rows, owned=owned)
            if ev is not None:
                b.events.append(ev)
            b.layers[name] = host
        b.layouts[name] = layout
        b.shapes[name] = tuple(t.shape)

    # ----------------------------------------------------------------- pooling (on device)


    # ----------------------------------------------------------------- batches → writer
    def _flush(self, b: Batch) -> None:
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
        if self._acc is not None:
            self._acc.add([b.device_rows[x][:keep] for x in self.layer_names])
            b.device_rows = {}
        layout = next(
            (b.layouts[k] for k in self.layer_names if b.layouts[k][0] != "pooled"),
            b.layouts[self.layer_names[0]],
        )
        self._out.put((b, keep, n, layout))


    def _metadata(self, b: Batch) -> dict[str, Any]:
        base = base_module(self.model)
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
                "versions": versions(),
            },
            "user": self.user_metadata,
        }


# --------------------------------------------------------------------------- CLI


