"""The torch engine: the block products of the moment passes on a torch device.

One more back-end that runs a plan's tiles (``ARCHITECTURE.md``, "Plans and back-ends"):
the plan, the reference shift and the scale of every tile come from the core
(``TilePlan.tile_layout`` / ``tile_shift`` / ``tile_scale``); the rows are read and decoded by
the Rust reader; only the products are formed on the device, under the CPU engine's rules,
and they go back to the core as the tile's serialised partial sums
(``TilePlan.partial_from_sums``, layerscope-core ``engine::moments::external``), which
finalise, merge and serialise exactly as the CPU engine's and Ray's partials of the same tile.

The arithmetic, as the CPU engine's (``engine::moments::accumulator``):

* ``u = (x − μ0) · 2^-e`` in f64 (``μ0`` the tile's sampled shift, ``e`` the piece's scale
  exponent, 0 for every ordinary layer) and ``r_p = ‖u_p‖²`` per piece; ``w = [u, r]``.
* ``compute="float64"``: ``Σ w wᵀ`` in f64 on the device.
* ``compute="float32"``: the ``u uᵀ`` part from ``u`` rounded to f32, as f32 sums over at most
  ``F32_SUM_ROWS`` (128) rows each added into an f64 total (a batched GEMM over 128-row
  slices, summed in f64); the parts with ``r``, the column sums and ``r`` itself in f64 from the
  rounded ``u``; a block whose column maxima leave ``[F32_TINY, F32_SAFE]`` is done in f64.
  TF32 is switched off for the call (``torch.backends.cuda.matmul`` and ``cudnn``'s
  ``fp32_precision = "ieee"``, or ``allow_tf32 = False`` on torch < 2.9; the user's settings
  are restored afterwards).
* ``compute="tf32"`` (CUDA only): the same with TF32 tensor-core products — an approximation
  (10-bit mantissas, about 1e-3 relative per product), stated in ``meta``.

The Gram route (``strategy="gram"``) on the device: per layer the centred ``n × n`` Gram from
the exact column means (f64), scaled as the core does, in f64 or f32 products (f32 sums of at
most 128 columns, added in f64), and the pair sums ``⟨K̄_x, K̄_y⟩``, ``Σ diag K̄_x diag K̄_y``,
``tr K̄_x`` in f64 — assembled by the core (``PairStats.from_sums``).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from . import _native
from ._optional import require
from ._progress import Progress
from ._sample import exponent_of
from ._source import Source, native_part
from .errors import InvalidArgumentError, NonFiniteError

#: The ``device=`` values besides a torch device: ``None`` (the Rust CPU engine) and ``"auto"``.
AUTO = "auto"

#: Bytes of f32 slice products held at once by the batched 128-row GEMM (per call).
_SLICE_BYTES = 256 << 20


def torch_module() -> Any:
    return require("torch", "device= (the torch engine)")


class Devices(tuple):  # type: ignore[type-arg]
    """Several torch devices of one type that share a pass's tiles (``device=["cuda:0",
    "cuda:1"]``, ``"cuda:0,cuda:1"``, or ``"cuda"`` with several GPUs visible). ``type`` is
    theirs; everything that runs on one device (the neighbour products, the Gram route, a
    single-pass accumulator) runs on the first."""

    @property
    def type(self) -> str:
        return str(self[0].type)

    @property
    def index(self) -> None:
        return None

    def __str__(self) -> str:
        return ",".join(str(d) for d in self)


def _one_device(torch: Any, device: Any) -> Any:
    if not isinstance(device, (str, torch.device)):
        raise InvalidArgumentError(
            f"device must be None, 'auto', a device name ('cpu', 'cuda', 'cuda:1'), a "
            f"torch.device or a list of them, got {device!r}")
    try:
        dev = torch.device(device.strip() if isinstance(device, str) else device)
    except (RuntimeError, ValueError) as e:
        raise InvalidArgumentError(f"device {device!r} is not a torch device: {e}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidArgumentError(
                f"device {device!r}: torch sees no CUDA device here; use device=None (the "
                "Rust CPU engine) or 'auto'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InvalidArgumentError(
                f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif dev.type not in ("cpu",):
        raise InvalidArgumentError(
            f"device {device!r}: the torch engine runs on 'cpu' or 'cuda' devices")
    return dev


def resolve_device(device: Any) -> Any:
    """``None`` → None (the Rust engine); ``"auto"`` → ``cuda`` when torch sees a CUDA device,
    else None; a string or ``torch.device`` → that device; several (a list or tuple, or names
    joined by commas) → :class:`Devices`. ``InvalidArgumentError`` when one is not a device
    torch knows, is not available here, or they are of different types."""
    if device is None:
        return None
    if isinstance(device, str) and device == AUTO:
        try:
            import torch
        except ImportError:
            return None
        return torch.device("cuda") if torch.cuda.is_available() else None
    torch = torch_module()
    if isinstance(device, str) and "," in device:
        device = [d for d in device.split(",") if d.strip()]
    if isinstance(device, (list, tuple)):
        if not device:
            raise InvalidArgumentError("device: an empty list of devices")
        devs = [_one_device(torch, d) for d in device]
        if len({d.type for d in devs}) > 1:
            raise InvalidArgumentError(
                f"device {device!r}: the devices sharing a pass must be of one type")
        return devs[0] if len(devs) == 1 else Devices(devs)
    return _one_device(torch, device)


def primary(dev: Any) -> Any:
    """The device that runs what is not shared (the first of :class:`Devices`)."""
    return dev[0] if isinstance(dev, Devices) else dev


def tile_devices(dev: Any) -> list[Any]:
    """The devices that share a tiled pass: every one of :class:`Devices`; every visible GPU
    for ``"cuda"`` without an index; else ``dev`` alone."""
    if isinstance(dev, Devices):
        return list(dev)
    if dev.type == "cuda" and dev.index is None:
        import torch

        count = torch.cuda.device_count()
        if count > 1:
            return [torch.device("cuda", i) for i in range(count)]
    return [dev]


def check_compute(compute: str, dev: Any) -> None:
    """``"tf32"`` only on a CUDA device."""
    if compute == "tf32" and (dev is None or dev.type != "cuda"):
        raise InvalidArgumentError(
            "compute='tf32' (TF32 tensor-core products, an approximation) needs a CUDA "
            "device (device='cuda')")


@contextlib.contextmanager
def precision(torch: Any, compute: str) -> Iterator[None]:
    """TF32 off for the duration (on only for ``compute="tf32"``); the user's settings back
    afterwards. Torch ≥ 2.9 (``fp32_precision``): only that API is used (torch refuses reads
    after the legacy and new APIs are mixed); older torch: ``allow_tf32`` and the float32
    matmul precision."""
    tf32 = compute == "tf32"
    mm, dnn = torch.backends.cuda.matmul, torch.backends.cudnn
    if hasattr(mm, "fp32_precision") and hasattr(dnn, "fp32_precision"):
        saved = (mm.fp32_precision, dnn.fp32_precision)
        mm.fp32_precision = dnn.fp32_precision = "tf32" if tf32 else "ieee"
        try:
            yield
        finally:
            mm.fp32_precision, dnn.fp32_precision = saved
        return
    old = (mm.allow_tf32, dnn.allow_tf32, torch.get_float32_matmul_precision())
    mm.allow_tf32 = dnn.allow_tf32 = tf32
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    try:
        yield
    finally:
        mm.allow_tf32, dnn.allow_tf32 = old[:2]
        torch.set_float32_matmul_precision(old[2])


def describe(dev: Any) -> str:
    """The device in words (its name for CUDA)."""
    if isinstance(dev, Devices):
        return ", ".join(describe(d) for d in dev)
    if dev.type == "cuda":
        import torch

        return f"{dev} ({torch.cuda.get_device_name(dev)})"
    return str(dev)


# ------------------------------------------------------------------------------ arithmetic


def _runs_f32(torch: Any, a: Any, b: Any) -> Any:
    """``aᵀ b`` of f32 ``a`` (rows × p) and ``b`` (rows × q) as f32 sums over slices of at
    most ``F32_SUM_ROWS`` rows, each added into an f64 total (rows zero-padded to whole
    slices: a zero row adds nothing)."""
    rows, p = a.shape
    q = b.shape[1]
    k = int(_native.F32_SUM_ROWS)
    slices = -(-rows // k)
    pad = slices * k - rows
    if pad:
        a = torch.nn.functional.pad(a, (0, 0, 0, pad))
        b = torch.nn.functional.pad(b, (0, 0, 0, pad))
    a3 = a.reshape(slices, k, p)
    b3 = b.reshape(slices, k, q)
    out = torch.zeros((p, q), dtype=torch.float64, device=a.device)
    step = max(1, _SLICE_BYTES // max(1, p * q * 4))
    for s in range(0, slices, step):
        part = torch.bmm(a3[s:s + step].transpose(1, 2), b3[s:s + step])
        if part.shape[0] == 1:  # added as it is converted: no f64 copy of a large block
            out += part[0]
        else:
            out += part.sum(0, dtype=torch.float64)
    return out


def _f32_ok(torch: Any, u32: Any) -> bool:
    """The core's ``f32_products_ok``: every column's largest ``|u|`` 0 or within
    ``[F32_TINY, F32_SAFE]`` (NaN or ±Inf: no)."""
    m = u32.abs().double().amax(0) if u32.shape[0] else u32.new_zeros(u32.shape[1]).double()
    m = torch.where(torch.isnan(m), torch.full_like(m, float("inf")), m)
    ok = (m == 0) | ((m >= _native.F32_TINY) & (m <= _native.F32_SAFE))
    return bool(ok.all())


class _TileSums:
    """The device-side sums of one tile: ``products`` (see the module docs), ``sums``, rows."""

    def __init__(self, torch: Any, dev: Any, widths: list[int], na: int | None,
                 compute: str) -> None:
        self.torch = torch
        self.widths = widths
        self.na = na
        self.compute = compute
        d = sum(widths)
        lp = len(widths)
        self.d, self.lp = d, lp
        # piece of every u column
        self.owner = torch.repeat_interleave(
            torch.arange(lp, device=dev), torch.tensor(widths, device=dev))
        if na is None:
            self.left_u = self.right_u = None  # all columns
            shape = (d + lp, d + lp)
        else:
            da = sum(widths[:na])
            self.da = da
            shape = (da + na, (d - da) + (lp - na))
        self.products = torch.zeros(shape, dtype=torch.float64, device=dev)
        self.sums = torch.zeros(d + lp, dtype=torch.float64, device=dev)
        self.n = 0

    def add(self, u64: Any) -> None:
        """Add the rows of ``u64`` (f64 shifted and scaled values, rows × D)."""
        torch = self.torch
        f32 = self.compute in ("float32", "tf32")
        u32 = u64.float() if f32 else None
        if f32 and not _f32_ok(torch, u32):
            f32 = False
        u = u32.double() if f32 else u64
        rows = u.shape[0]
        r = torch.zeros((rows, self.lp), dtype=torch.float64, device=u.device)
        r.index_add_(1, self.owner, u * u)
        if self.na is None:
            w = torch.cat([u, r], 1)
            if f32:
                d = self.d
                self.products[:d, :d] += _runs_f32(torch, u32, u32)
                ur = u.T @ r
                self.products[:d, d:] += ur
                self.products[d:, :d] += ur.T
                self.products[d:, d:] += r.T @ r
            else:
                self.products += w.T @ w
            self.sums += w.sum(0)
        else:
            da, na = self.da, self.na
            ua, ub = u[:, :da], u[:, da:]
            ra, rb = r[:, :na], r[:, na:]
            db = self.d - da
            p = self.products
            if f32:
                assert u32 is not None
                p[:da, :db] += _runs_f32(torch, u32[:, :da], u32[:, da:])
            else:
                p[:da, :db] += ua.T @ ub
            p[:da, db:] += ua.T @ rb
            p[da:, :db] += ra.T @ ub
            p[da:, db:] += ra.T @ rb
            self.sums[: self.d] += u.sum(0)
            self.sums[self.d:] += r.sum(0)
        self.n += rows


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


def screen(torch: Any, z: Any, widths: Sequence[int], names: Sequence[str], base: int,
           check_finite: bool, nonfinite: list[int | None]) -> None:
    """The core's non-finite rule on a block ``z`` (rows × Σ widths; the pieces or layers
    ``names`` side by side, its first row being row ``base``): ``NonFiniteError`` naming the
    first bad row (``check_finite``), else each one's first bad row recorded in
    ``nonfinite``."""
    bad = ~torch.isfinite(z)
    if not bool(bad.any()):
        return
    off = np.cumsum([0, *widths])
    for i, name in enumerate(names):
        rows = torch.nonzero(bad[:, int(off[i]):int(off[i + 1])].any(1))
        if rows.numel() and nonfinite[i] is None:
            row = base + int(rows[0, 0])
            if check_finite:
                raise NonFiniteError(f"layer {json.dumps(name)}: non-finite value (NaN/Inf) "
                                     f"in row {row}")
            nonfinite[i] = row


def run_tile(torch: Any, dev: Any, plan: Any, layers: _Layers, nparts: list[Any], t: int,
             n: int, *, compute: str, check_finite: bool, block_rows: int,
             progress: Any = None, rows: tuple[int, int] | None = None,
             shift: np.ndarray | None = None, cancel: Any = None) -> bytes:
    """Tile ``t`` of ``plan`` on ``dev`` over rows ``rows`` (default all ``n``): its
    serialised partial sums. ``shift``: the tile's reference shift when the caller has it
    (Ray's row tasks of one tile share it); else the core's sampled one. ``cancel``: a
    ``threading.Event`` checked between blocks (another device's tile failed)."""
    pieces, na = plan.tile_layout(t)
    pnames = plan.tile_piece_names(layers.names, t)
    widths = [c1 - c0 for _, c0, c1 in pieces]
    shift_host = plan.tile_shift(nparts, t) if shift is None else shift
    exps = [int(e) for e in plan.tile_scale(nparts, t)]
    fac = torch.tensor(np.repeat([np.ldexp(1.0, -e) for e in exps], widths),
                       dtype=torch.float64, device=dev)
    acc = _TileSums(torch, dev, widths, na, compute)
    nonfinite: list[int | None] = [None] * len(pieces)
    shift_dev = None if shift_host is None else torch.from_numpy(
        np.ascontiguousarray(shift_host, dtype=np.float64)).to(dev)
    tile_layers = sorted({x for x, _, _ in pieces})
    pos = {x: i for i, x in enumerate(tile_layers)}
    r0, r1 = (0, n) if rows is None else rows
    for start, stop, got in _Feed(torch, dev, layers, tile_layers, r0, r1, block_rows):
        if cancel is not None and cancel.is_set():
            raise _Cancelled
        z = torch.cat([got[pos[x]][:, c0:c1] for x, c0, c1 in pieces], 1).double()
        screen(torch, z, widths, pnames, start, check_finite, nonfinite)
        if shift_dev is None:  # a sampled value was not finite: the first block's means
            mean = z.mean(0)
            shift_dev = torch.where(torch.isfinite(mean), mean, torch.zeros_like(mean))
            shift_host = shift_dev.cpu().numpy()
        acc.add((z - shift_dev) * fac)
        if progress is not None:
            progress(stop - r0, r1 - r0)
    if shift_host is None:
        shift_host = np.zeros(acc.d)
    return plan.partial_from_sums(
        layers.names, t, acc.n, np.ascontiguousarray(shift_host, dtype=np.float64), exps,
        acc.products.cpu().numpy(), acc.sums.cpu().numpy(), nonfinite, check_finite)


class _Cancelled(Exception):
    """Another device's tile failed: this one stops (the first failure is raised)."""


#: Most rows of one device block on CUDA (the products are cheap there; larger blocks only
#: cost device memory).
_CUDA_BLOCK_ROWS = 65536


def _tile_block_rows(plan: Any, t: int, dims: Sequence[int], n: int, dev: Any,
                     budget: int) -> int:
    """Rows per device block of tile ``t``: the plan's (sized by the core for the host) on
    the CPU; on CUDA as many as the device budget holds beside the tile's sums (the
    accumulator, its f64 update and the sliced f32 products), up to ``_CUDA_BLOCK_ROWS``:
    per row the layers as read and copied (f64 at most), and the tile's f64 values, their
    shifted copy, the f32 copy and its padded slices."""
    br = max(1, min(int(plan.block_rows), max(n, 1)))
    if dev.type != "cuda":
        return br
    pieces, _ = plan.tile_layout(t)
    dt = sum(c1 - c0 for _, c0, c1 in pieces)
    lp = len(pieces)
    read = sum(int(dims[x]) for x in {x for x, _, _ in pieces})
    fixed = 3 * (dt + lp) ** 2 * 8 + 2 * _SLICE_BYTES
    per_row = 2 * read * 8 + dt * 32 + lp * 16
    fit = max(1, (budget - fixed) // per_row)
    return max(1, min(_CUDA_BLOCK_ROWS, max(n, 1), fit))


class DevicePlan:
    """What the torch engine runs for an exact all-pairs pass, sized to the device: the
    core's plan under ``min(host budget, device budget)`` (on CUDA the device budget less
    what torch's temporaries take beyond the core's own estimate), the devices sharing its
    tiles, and the budget that sized it. The Gram route when the core ranks it first and it
    fits the device (its rounds: as many Grams held on the device as fit), else tiles."""

    def __init__(self, dims: list[int], num_a: int, n: int, block_rows: int | None,
                 compute: str, max_memory: int | None, strategy: str | None,
                 device: Any) -> None:
        from ._memory import memory_budget

        self.devices = tile_devices(device)
        self.host = "float32" if compute == "tf32" else compute
        host_b = memory_budget(max_memory)
        dev_b, dev_src = device_budget(device, max_memory)
        cuda = device.type == "cuda"
        self.budget = max(1, min(host_b.bytes, dev_b - (2 * _SLICE_BYTES if cuda else 0)))
        self.budget_source = (host_b.source if host_b.bytes <= dev_b
                              else f"the device's: {dev_src}")
        self.tiles: Any = None
        self.gram: dict[str, Any] | None = None
        if strategy == "gram":
            self.gram = self._gram_plan(dims, num_a, n, block_rows, dev_b, host_b.bytes, cuda)
            return
        self.tiles = _native.pair_tiles(dims, num_a, n, block_rows, self.host, self.budget,
                                        strategy)
        if self.tiles is None:  # the Gram route ranks first: does it fit the device?
            try:
                self.gram = self._gram_plan(dims, num_a, n, block_rows, dev_b, host_b.bytes,
                                            cuda)
            except MemoryError:
                self.tiles = _native.pair_tiles(dims, num_a, n, block_rows, self.host,
                                                self.budget, "tiled")

    def _gram_plan(self, dims: list[int], num_a: int, n: int, block_rows: int | None,
                   dev_b: int, host_b: int, cuda: bool) -> dict[str, Any]:
        # beyond the core's n·d·(8 + 4) per layer on CUDA: the f64 copy on the device, the
        # f32 transposed copy, the sliced f32 products
        extra = (2 * _SLICE_BYTES + 12 * n * max(dims)) if cuda else 0
        b = max(1, min(host_b, dev_b - extra))
        return dict(_native.pair_plan(dims, num_a, n, block_rows, self.host, b, "gram"))


@contextlib.contextmanager
def oom_as_budget_error(torch: Any, dev: Any, budget: int, source: str) -> Iterator[None]:
    """A device allocation failure (torch's ``OutOfMemoryError``) inside the block raised as
    the :class:`MemoryBudgetError` it is, saying what to lower."""
    cls = getattr(torch, "OutOfMemoryError", None) or getattr(
        getattr(torch, "cuda", None), "OutOfMemoryError", None)
    try:
        yield
    except Exception as e:
        if cls is None or not isinstance(e, cls):
            raise
        from .errors import MemoryBudgetError
        from .store import _human as human

        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise MemoryBudgetError(
            f"the device {describe(dev)} ran out of memory within the plan's budget of "
            f"{human(budget)} ({source}): other work holds device memory; set "
            f"{DEVICE_MEMORY_ENV} (or max_memory=) lower and the planner cuts smaller tiles "
            f"({first})") from None


def pair_stats(parts: list[tuple[Source, list[str]]], names: list[str], num_a: int, *,
               device: Any, block_rows: int | None, check_finite: bool,
               max_memory: int | None, progress: Any, compute: str,
               strategy: str | None) -> tuple[Any, dict[str, Any]]:
    """``_native.pair_pass`` with the products on ``device`` (the plan sized to it, its tiles
    shared by :func:`tile_devices`): ``(PairStats, meta)``."""
    torch = torch_module()
    dims = [src.dims[x] for src, ls in parts for x in ls]
    n = int(parts[0][0].num_rows)
    dp = DevicePlan(dims, num_a, n, block_rows, compute, max_memory, strategy, device)
    layers = _Layers(parts)
    with oom_as_budget_error(torch, device, dp.budget, dp.budget_source), \
            precision(torch, compute), torch.no_grad():
        if dp.tiles is None:
            assert dp.gram is not None
            with Progress(progress, "moments") as prog:
                st = _gram(torch, primary(device), layers, dims, num_a, n, names, dp.gram,
                           compute=compute, check_finite=check_finite, progress=prog.cb)
        else:
            st = _tiles(torch, dp, layers, parts, dims, n, names, compute=compute,
                        check_finite=check_finite, progress=progress)
    meta = device_meta(device, compute)
    meta["device_budget"] = {"bytes": int(dp.budget), "source": dp.budget_source}
    if len(dp.devices) > 1 and dp.tiles is not None:
        meta["devices"] = [str(d) for d in dp.devices]
    return st, meta


def _tiles(torch: Any, dp: DevicePlan, layers: _Layers, parts: list[tuple[Source, list[str]]],
           dims: list[int], n: int, names: list[str], *, compute: str, check_finite: bool,
           progress: Any) -> Any:
    """The tiles of ``dp.tiles``, shared by ``dp.devices``: one worker thread per device
    takes the next tile (each with its own reader, so the devices read and compute at
    once); the partials are added by the caller's thread in any order (a tile has its own
    slot in the builder: the result does not depend on who ran what). One device: no
    thread, so an interrupt reaches the pass where it is."""
    import queue
    import threading

    plan = dp.tiles
    nparts = [native_part(src, ls) for src, ls in parts]
    out = _native.PairStatsBuilder(plan, names, n)
    ntiles = int(plan.tiles)
    total = ntiles * max(n, 1)
    with Progress(progress, "moments") as prog:
        if len(dp.devices) == 1:
            dev = dp.devices[0]
            for t in range(ntiles):
                def cb1(k: int, _total: int, t: int = t) -> Any:
                    return prog.cb(t * n + k, total) if prog.cb else None
                br = _tile_block_rows(plan, t, dims, n, dev, dp.budget)
                out.add(t, run_tile(torch, dev, plan, layers, nparts, t, n, compute=compute,
                                    check_finite=check_finite, block_rows=br, progress=cb1))
            return out.finish()

        todo: queue.Queue[int] = queue.Queue()
        for t in range(ntiles):
            todo.put(t)
        done: queue.Queue[tuple[str, int, Any]] = queue.Queue()
        cancel = threading.Event()

        def work(dev: Any) -> None:
            try:
                with torch.no_grad():  # thread-local in torch
                    while not cancel.is_set():
                        try:
                            t = todo.get_nowait()
                        except queue.Empty:
                            return

                        def cb(k: int, _total: int, t: int = t) -> None:
                            done.put(("progress", t, k))
                        br = _tile_block_rows(plan, t, dims, n, dev, dp.budget)
                        data = run_tile(torch, dev, plan, layers, nparts, t, n,
                                        compute=compute, check_finite=check_finite,
                                        block_rows=br, progress=cb, cancel=cancel)
                        done.put(("tile", t, data))
            except _Cancelled:
                pass
            except BaseException as e:  # noqa: BLE001 - raised in the caller's thread
                cancel.set()
                done.put(("error", -1, e))
            finally:
                done.put(("exit", -1, None))

        workers = [threading.Thread(target=work, args=(d,), name=f"layerscope-{d}",
                                    daemon=True) for d in dp.devices]
        for w in workers:
            w.start()
        rows = [0] * ntiles
        running, error = len(workers), None
        try:
            while running:
                kind, t, item = done.get()
                if kind == "exit":
                    running -= 1
                elif kind == "error":
                    error = error or item
                elif kind == "tile":
                    out.add(t, item)
                else:
                    rows[t] = item
                    if prog.cb:
                        prog.cb(sum(rows), total)
        finally:
            cancel.set()
            for w in workers:
                w.join()
        if error is not None:
            raise error
    return out.finish()


def moments(parts: list[tuple[Source, list[str]]], names: list[str], num_a: int, *,
            device: Any, block_rows: int | None, check_finite: bool, progress: Any,
            compute: str) -> Any:
    """One single-pass moment accumulator over every selected layer with the products on
    ``device`` (the first of several): the core's ``Moments``."""
    torch = torch_module()
    dev = primary(device)
    dims = [src.dims[x] for src, ls in parts for x in ls]
    n = int(parts[0][0].num_rows)
    host = "float32" if compute == "tf32" else compute
    plan = _native.TilePlan.single(dims, num_a, n, block_rows, host)
    layers = _Layers(parts)
    nparts = [native_part(src, ls) for src, ls in parts]
    budget, source = device_budget(dev)
    with oom_as_budget_error(torch, dev, budget, source), precision(torch, compute), \
            torch.no_grad(), Progress(progress, "moments") as prog:
        data = run_tile(torch, dev, plan, layers, nparts, 0, n, compute=compute,
                        check_finite=check_finite,
                        block_rows=_tile_block_rows(plan, 0, dims, n, dev, budget),
                        progress=prog.cb)
    return _native.MomentAccumulator.from_bytes(data).finalize(num_a)


def device_meta(dev: Any, compute: str) -> dict[str, Any]:
    """What ``meta`` records of a device run."""
    meta: dict[str, Any] = {"device": describe(dev), "engine_products": "torch"}
    if compute == "tf32":
        meta["approximation"] = TF32_APPROXIMATION
    return meta


#: What ``meta["approximation"]`` says of ``compute="tf32"``.
TF32_APPROXIMATION = ("compute='tf32': the block products in TF32 (10-bit mantissas, about "
                      "1e-3 relative per product), accumulated in f64")


# ------------------------------------------------------------ statistics while capturing


#: The environment variable that sets the torch engine's device budget (a size: "20G").
DEVICE_MEMORY_ENV = "LAYERSCOPE_MAX_DEVICE_MEMORY"


def device_budget(dev: Any, max_memory: Any = None) -> tuple[int, str]:
    """Bytes the torch engine may hold on ``dev``: ``max_memory`` when given; else
    ``LAYERSCOPE_MAX_DEVICE_MEMORY`` when set; else on a CUDA device 0.8 × its free memory
    now, on the CPU the host budget (:func:`layerscope.memory_budget`). Several devices: the
    smallest of theirs (every one runs tiles of the same plan)."""
    import os

    from ._memory import max_memory_bytes, memory_budget

    given = max_memory_bytes(max_memory)
    if given is not None:
        return given, "max_memory argument"
    env = os.environ.get(DEVICE_MEMORY_ENV)
    if env:
        try:
            return int(_native.parse_memory_size(env)), DEVICE_MEMORY_ENV
        except InvalidArgumentError as e:
            raise InvalidArgumentError(f"{DEVICE_MEMORY_ENV}={env!r}: {e}") from None
    if isinstance(dev, Devices):
        return min((device_budget(d) for d in dev), key=lambda b: b[0])
    if dev.type == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info(dev)
        return int(0.8 * free), f"0.8 × the free memory of {dev}"
    b = memory_budget(None)
    return int(b.bytes), b.source


class DeviceMoments:
    """The moment accumulator of a capture (``capture(..., accumulate=True)``): every batch of
    the selected layers, on the device the model ran on, added to ``Σ w wᵀ`` and ``Σ w``
    (:class:`_TileSums`) under the CPU engine's rules. The shift and the scale are the first
    batch's (its column means and, per layer, :func:`layerscope._sample.exponent_of` of its
    largest deviation: the rows that come later are not known yet — an accumulator fed by
    hand in the core does the same; ``Moments.shift_offset`` says how far that shift was
    from the mean of all rows, and a float32 pass warns as the CPU pass does). The sums go
    to the core as one tile's serialised partial (:meth:`to_bytes`: it merges with other
    partials of the same layers) and finalise into its ``Moments`` (:meth:`moments`).

    The accumulator's ``(D + L)² · 8`` bytes are checked against the device's budget
    (:func:`device_budget`) at the first batch, before anything is added: above it a
    :class:`MemoryBudgetError` names what would work instead — writing the store and letting
    the planner tile the passes."""

    def __init__(self, names: list[str], *, compute: str = "float32",
                 check_finite: bool = True, max_memory: Any = None) -> None:
        self.names = list(names)
        self.compute = compute
        self.check_finite = check_finite
        self.max_memory = max_memory
        self.dims: list[int] | None = None
        self.acc: _TileSums | None = None
        self.shift: Any = None
        self.fac: Any = None
        self.exps: list[int] = []
        self.nonfinite: list[int | None] = [None] * len(self.names)
        self.device: Any = None

    @property
    def n(self) -> int:
        return 0 if self.acc is None else int(self.acc.n)

    def _start(self, xs: list[Any]) -> None:
        from .errors import MemoryBudgetError

        torch = torch_module()
        dev = xs[0].device
        dims = [int(x.shape[1]) for x in xs]
        need = int(_native.accumulator_bytes(dims))
        # the block's f64 copies (z, u and r) beside the sums
        need += 3 * int(xs[0].shape[0]) * (sum(dims) + len(dims)) * 8
        budget, source = device_budget(dev, self.max_memory)
        if need > budget:
            from .store import _human as human

            try:  # what the planner would do with the same memory, over a store
                pl = _native.pair_plan(dims, len(dims), max(int(xs[0].shape[0]), 1), None,
                                       "float32", budget, "tiled")
                plan = (f"with this memory the planner runs {pl['passes']} tiled passes over "
                        "the store")
            except Exception:  # noqa: BLE001 - advice only
                plan = "the planner then sizes tiled passes to the machine's memory"
            raise MemoryBudgetError(
                f"the capture's moment accumulator for {len(dims)} layers (D = {sum(dims)}) "
                f"needs {human(need)} on {dev}, above its budget of {human(budget)} "
                f"({source}); write the store (out=...) and compute from it ({plan}; see "
                "`layerscope plan STORE`), or accumulate fewer layers")
        self.dims, self.device = dims, dev
        z = torch.cat([x.double() for x in xs], 1)
        finite = torch.isfinite(z)
        mean = torch.where(finite, z, torch.zeros_like(z)).sum(0) / finite.sum(0).clamp(min=1)
        self.shift = mean
        off = np.cumsum([0, *dims])
        dev_abs = torch.where(finite, (z - mean).abs(), torch.zeros_like(z))
        self.exps = [exponent_of(float(dev_abs[:, off[i]:off[i + 1]].max()) if len(z) else 0.0)
                     for i in range(len(dims))]
        self.fac = torch.tensor(np.repeat([np.ldexp(1.0, -e) for e in self.exps], dims),
                                dtype=torch.float64, device=dev)
        self.acc = _TileSums(torch, dev, dims, None, self.compute)

    def add(self, xs: list[Any]) -> None:
        """Add one batch: ``xs[l]`` the ``rows × d_l`` values of layer ``l`` (any float dtype,
        on one device; rows row-aligned across layers)."""
        torch = torch_module()
        if not xs or int(xs[0].shape[0]) == 0:
            return
        with precision(torch, self.compute), torch.no_grad():
            if self.acc is None:
                self._start(xs)
            assert self.acc is not None and self.dims is not None
            if [int(x.shape[1]) for x in xs] != self.dims:
                raise InvalidArgumentError(
                    f"a batch of widths {[int(x.shape[1]) for x in xs]}, the accumulator's "
                    f"are {self.dims}")
            z = torch.cat([x.to(self.device).double() for x in xs], 1)
            screen(torch, z, self.dims, self.names, self.acc.n, self.check_finite,
                   self.nonfinite)
            self.acc.add((z - self.shift) * self.fac)

    def to_bytes(self) -> bytes:
        """The sums as the core's serialised moment accumulator (one diagonal tile)."""
        if self.acc is None or self.dims is None:
            raise InvalidArgumentError("no rows were accumulated")
        plan = _native.TilePlan.single(self.dims, len(self.dims), self.n, None,
                                       "float32" if self.compute == "tf32" else self.compute)
        return plan.partial_from_sums(
            self.names, 0, self.n, self.shift.cpu().numpy(), self.exps,
            self.acc.products.cpu().numpy(), self.acc.sums.cpu().numpy(), self.nonfinite,
            self.check_finite)

    def moments(self) -> Any:
        """The core's ``Moments`` of every row added."""
        return _native.MomentAccumulator.from_bytes(self.to_bytes()).finalize(len(self.names))


# ------------------------------------------------------------------- neighbour products


class DeviceProducts:
    """The products behind the neighbour measures on a torch device — what the core's
    ``engine::neighbors::Products`` asks for (``_native.prepare_layer`` / ``knn_graph``
    ``products=``): ``X Xᵀ`` in f64 (RBF distances), ``X Xᵀ`` in IEEE f32 by blocks of rows
    (the kNN candidates: the core's lower bounds assume no more error than f32 products, so
    TF32 is off whatever ``compute`` says) and exact condensed squared distances from the
    differences (RSA). The bounds, the exact f64 recheck of near neighbours, the bandwidth,
    the kernel and the RDM are the core's."""

    #: Bytes of one block handed back at a time (rows × m f32 / the difference buffer).
    BLOCK_BYTES = 64 << 20

    def __init__(self, torch: Any, dev: Any) -> None:
        self.torch = torch
        self.dev = dev

    def _to(self, x: np.ndarray) -> Any:
        return self.torch.from_numpy(np.ascontiguousarray(x)).to(self.dev)

    def gram_f64(self, x: np.ndarray) -> np.ndarray:
        with precision(self.torch, "float64"), self.torch.no_grad():
            t = self._to(x)
            return (t @ t.T).cpu().numpy()

    def f32_gram_blocks(self, x: np.ndarray, block: int) -> Iterator[tuple[int, np.ndarray]]:
        torch = self.torch
        with precision(torch, "float32"), torch.no_grad():
            t = self._to(np.asarray(x, dtype=np.float32))
            m = int(t.shape[0])
            per = max(1, self.BLOCK_BYTES // max(1, block * m * 4)) * block
            for r0 in range(0, m, per):
                yield r0, (t[r0:r0 + per] @ t.T).cpu().numpy()

    def exact_condensed_sq(self, x: np.ndarray) -> np.ndarray:
        torch = self.torch
        with torch.no_grad():
            t = self._to(np.asarray(x, dtype=np.float64))
            m, d = int(t.shape[0]), int(t.shape[1])
            rows = max(1, self.BLOCK_BYTES // max(1, m * d * 8))
            out = []
            for i0 in range(0, m, rows):
                i1 = min(m, i0 + rows)
                sq = ((t[i0:i1, None, :] - t[None, :, :]) ** 2).sum(-1)
                for i in range(i0, i1):
                    out.append(sq[i - i0, i + 1:])
            if not out:
                return np.zeros(0)
            return torch.cat(out).cpu().numpy()


def products(device: Any) -> Any:
    """The ``products=`` of the core's neighbour functions for a resolved device (None: the
    core's own CPU products)."""
    return None if device is None else DeviceProducts(torch_module(), primary(device))


# ------------------------------------------------------------------------------- Gram route


def _gram(torch: Any, dev: Any, layers: _Layers, dims: list[int], num_a: int, n: int,
          names: list[str], plan: dict[str, Any], *, compute: str, check_finite: bool,
          progress: Any) -> Any:
    """The Gram route on ``dev`` (see the module docs) in the rounds of the core's plan
    (``plan["rounds"]``, sized to the device by :class:`DevicePlan`): each round holds the
    Grams of a group of layers on the device and builds the others one at a time past them
    (a streamed Gram is rebuilt once per round: more products, the same memory)."""
    nl = len(dims)
    sq = np.full((nl, nl), np.nan)
    rr = np.full((nl, nl), np.nan)
    known = np.zeros((nl, nl), dtype=bool)
    trace = [float("nan")] * nl
    nonfinite: list[int | None] = [None] * nl
    rounds = plan.get("rounds") or [(list(range(nl)), [])]
    steps = sum(len(h) + len(s) for h, s in rounds)
    step = 0

    def wanted(x: int, y: int) -> bool:
        return x == y or num_a == nl or (x < num_a) != (y < num_a)

    def build(x: int) -> Any:
        nonlocal step
        k, bad = _one_gram(torch, dev, layers, x, n, compute)
        if bad is not None:
            if check_finite:
                raise NonFiniteError(f"layer {json.dumps(names[x])}: non-finite value "
                                     f"(NaN/Inf) in row {bad}")
            nonfinite[x] = bad
        trace[x] = float(torch.diagonal(k).sum())
        step += 1
        if progress is not None:
            progress(step, steps)
        return k

    def pair(x: int, kx: Any, y: int, ky: Any) -> None:
        if known[x, y] or not wanted(x, y):
            return
        # ⟨K̄x, K̄y⟩ as one dot product: no n × n temporary beside the held Grams
        sq[x, y] = sq[y, x] = float(torch.dot(kx.reshape(-1), ky.reshape(-1)))
        rr[x, y] = rr[y, x] = float((torch.diagonal(kx) * torch.diagonal(ky)).sum())
        known[x, y] = known[y, x] = True

    for held, streamed in rounds:
        grams: dict[int, Any] = {}
        for x in held:
            grams[x] = build(int(x))
            for y in grams:
                pair(int(x), grams[x], y, grams[y])
        for y in streamed:
            k = build(int(y))
            pair(int(y), k, int(y), k)
            for x in held:
                pair(int(x), grams[x], int(y), k)
            del k
        del grams
    return _native.PairStats.from_sums(names, dims, num_a, n, sq, rr, trace, known, nonfinite,
                                       plan)


def _one_gram(torch: Any, dev: Any, layers: _Layers, x: int, n: int,
              compute: str) -> tuple[Any, int | None]:
    """Layer ``x``'s centred Gram (f64, ``n × n``) and its first non-finite row (the layer
    centred and scaled in place: one f64 copy of it on the device, plus the f32 one)."""
    # a copy whatever the device (the read can be the caller's own array: centred in place)
    z = torch.from_numpy(layers.read(x, 0, n)).to(dev, dtype=torch.float64, copy=True)
    finite = torch.isfinite(z).all(1)
    bad = None if bool(finite.all()) else int(torch.nonzero(~finite)[0, 0])
    z -= z.mean(0)
    top = z.abs().nan_to_num_(0.0, posinf=0.0, neginf=0.0).max() if z.numel() else None
    e = exponent_of(float(top) if top is not None else 0.0)
    del top
    z *= float(np.ldexp(1.0, -e))
    if compute in ("float32", "tf32"):
        c32 = z.float()
        if _f32_ok(torch, c32):
            del z
            # K = C Cᵀ: sums over the columns, in f32 slices of F32_SUM_ROWS columns
            ct = c32.T.contiguous()
            del c32
            return _runs_f32(torch, ct, ct), bad
        del c32
    return z @ z.T, bad
