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


def resolve_device(device: Any) -> Any:
    """``None`` → None (the Rust engine); ``"auto"`` → ``cuda`` when torch sees a CUDA device,
    else None; a string or ``torch.device`` → that device (``InvalidArgumentError`` when it
    is not a device torch knows or is not available here)."""
    if device is None:
        return None
    if isinstance(device, str) and device == AUTO:
        try:
            import torch
        except ImportError:
            return None
        return torch.device("cuda") if torch.cuda.is_available() else None
    torch = torch_module()
    if not isinstance(device, (str, torch.device)):
        raise InvalidArgumentError(
            f"device must be None, 'auto', a device name ('cpu', 'cuda', 'cuda:1') or a "
            f"torch.device, got {device!r}")
    try:
        dev = torch.device(device)
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
             progress: Any = None) -> bytes:
    """Tile ``t`` of ``plan`` over all ``n`` rows on ``dev``: its serialised partial sums."""
    pieces, na = plan.tile_layout(t)
    pnames = plan.tile_piece_names(layers.names, t)
    widths = [c1 - c0 for _, c0, c1 in pieces]
    shift_host = plan.tile_shift(nparts, t)
    exps = [int(e) for e in plan.tile_scale(nparts, t)]
    fac = torch.tensor(np.repeat([np.ldexp(1.0, -e) for e in exps], widths),
                       dtype=torch.float64, device=dev)
    acc = _TileSums(torch, dev, widths, na, compute)
    nonfinite: list[int | None] = [None] * len(pieces)
    shift = None if shift_host is None else torch.from_numpy(
        np.ascontiguousarray(shift_host, dtype=np.float64)).to(dev)
    tile_layers = sorted({x for x, _, _ in pieces})
    for start in range(0, n, block_rows):
        stop = min(n, start + block_rows)
        got = {x: torch.from_numpy(layers.read(x, start, stop)).to(dev) for x in tile_layers}
        z = torch.cat([got[x][:, c0:c1] for x, c0, c1 in pieces], 1).double()
        screen(torch, z, widths, pnames, start, check_finite, nonfinite)
        if shift is None:  # a sampled value was not finite: the first block's means
            mean = z.mean(0)
            shift = torch.where(torch.isfinite(mean), mean, torch.zeros_like(mean))
            shift_host = shift.cpu().numpy()
        acc.add((z - shift) * fac)
        if progress is not None:
            progress(stop, n)
    if shift_host is None:
        shift_host = np.zeros(acc.d)
    return plan.partial_from_sums(
        layers.names, t, acc.n, np.ascontiguousarray(shift_host, dtype=np.float64), exps,
        acc.products.cpu().numpy(), acc.sums.cpu().numpy(), nonfinite, check_finite)


def _block_rows(plan: Any, n: int, dev: Any) -> int:
    """Rows per device block: the plan's (sized for the host budget) on the CPU; on a CUDA
    device at least 4096 (the products are cheap there; the blocks are read on the host)."""
    br = int(plan.block_rows)
    if dev.type == "cuda":
        br = max(br, 4096)
    return max(1, min(br, max(n, 1)))


def pair_stats(parts: list[tuple[Source, list[str]]], names: list[str], num_a: int, *,
               device: Any, block_rows: int | None, check_finite: bool,
               max_memory: int | None, progress: Any, compute: str,
               strategy: str | None) -> tuple[Any, dict[str, Any]]:
    """``_native.pair_pass`` with the products on ``device``: ``(PairStats, meta)``."""
    torch = torch_module()
    dims = [src.dims[x] for src, ls in parts for x in ls]
    n = int(parts[0][0].num_rows)
    host = "float32" if compute == "tf32" else compute
    plan = _native.pair_tiles(dims, num_a, n, block_rows, host, max_memory, strategy)
    layers = _Layers(parts)
    with precision(torch, compute), torch.no_grad():
        if plan is None:
            pl = _native.pair_plan(dims, num_a, n, block_rows, host, max_memory, "gram")
            with Progress(progress, "moments") as prog:
                st = _gram(torch, device, layers, dims, num_a, n, names, pl, compute=compute,
                           check_finite=check_finite, progress=prog.cb)
        else:
            nparts = [native_part(src, ls) for src, ls in parts]
            br = _block_rows(plan, n, device)
            out = _native.PairStatsBuilder(plan, names, n)
            total = int(plan.tiles) * n
            with Progress(progress, "moments") as prog:
                for t in range(int(plan.tiles)):
                    def cb(done: int, _total: int, t: int = t) -> Any:
                        return prog.cb(t * n + done, total) if prog.cb else None
                    data = run_tile(torch, device, plan, layers, nparts, t, n, compute=compute,
                                    check_finite=check_finite, block_rows=br, progress=cb)
                    out.add(t, data)
            st = out.finish()
    return st, device_meta(device, compute)


def moments(parts: list[tuple[Source, list[str]]], names: list[str], num_a: int, *,
            device: Any, block_rows: int | None, check_finite: bool, progress: Any,
            compute: str) -> Any:
    """One single-pass moment accumulator over every selected layer with the products on
    ``device``: the core's ``Moments``."""
    torch = torch_module()
    dims = [src.dims[x] for src, ls in parts for x in ls]
    n = int(parts[0][0].num_rows)
    host = "float32" if compute == "tf32" else compute
    plan = _native.TilePlan.single(dims, num_a, n, block_rows, host)
    layers = _Layers(parts)
    nparts = [native_part(src, ls) for src, ls in parts]
    with precision(torch, compute), torch.no_grad(), Progress(progress, "moments") as prog:
        data = run_tile(torch, device, plan, layers, nparts, 0, n, compute=compute,
                        check_finite=check_finite, block_rows=_block_rows(plan, n, device),
                        progress=prog.cb)
    return _native.MomentAccumulator.from_bytes(data).finalize(num_a)


def device_meta(dev: Any, compute: str) -> dict[str, Any]:
    """What ``meta`` records of a device run."""
    meta: dict[str, Any] = {"device": describe(dev), "engine_products": "torch"}
    if compute == "tf32":
        meta["approximation"] = (
            "compute='tf32': the block products in TF32 (10-bit mantissas, about 1e-3 "
            "relative per product), accumulated in f64")
    return meta


# ------------------------------------------------------------ statistics while capturing


def device_budget(dev: Any, max_memory: Any = None) -> tuple[int, str]:
    """Bytes the torch engine may hold on ``dev``: ``max_memory`` when given; a CUDA device:
    0.8 × its free memory now; the CPU: the host budget (:func:`layerscope.memory_budget`)."""
    from ._memory import max_memory_bytes, memory_budget

    given = max_memory_bytes(max_memory)
    if given is not None:
        return given, "max_memory argument"
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
    return None if device is None else DeviceProducts(torch_module(), device)


# ------------------------------------------------------------------------------- Gram route


def _gram(torch: Any, dev: Any, layers: _Layers, dims: list[int], num_a: int, n: int,
          names: list[str], plan: dict[str, Any], *, compute: str, check_finite: bool,
          progress: Any) -> Any:
    """The Gram route on ``dev`` (see the module docs): every Gram held (the plan's host
    budget decided that the Gram route fits; device-sized rounds are the device path's)."""
    nl = len(dims)
    sq = np.full((nl, nl), np.nan)
    rr = np.full((nl, nl), np.nan)
    known = np.zeros((nl, nl), dtype=bool)
    trace = [float("nan")] * nl
    nonfinite: list[int | None] = [None] * nl
    grams: dict[int, Any] = {}

    def wanted(x: int, y: int) -> bool:
        return x == y or num_a == nl or (x < num_a) != (y < num_a)

    for x in range(nl):
        k, bad = _one_gram(torch, dev, layers, x, n, compute)
        if bad is not None:
            if check_finite:
                raise NonFiniteError(f"layer {json.dumps(names[x])}: non-finite value "
                                     f"(NaN/Inf) in row {bad}")
            nonfinite[x] = bad
        grams[x] = k
        trace[x] = float(torch.diagonal(k).sum())
        for y in range(x + 1):
            if wanted(x, y):
                g = grams[y]
                sq[x, y] = sq[y, x] = float((k * g).sum())
                rr[x, y] = rr[y, x] = float((torch.diagonal(k) * torch.diagonal(g)).sum())
                known[x, y] = known[y, x] = True
        if progress is not None:
            progress(x + 1, nl)
    return _native.PairStats.from_sums(names, dims, num_a, n, sq, rr, trace, known, nonfinite,
                                       plan)


def _one_gram(torch: Any, dev: Any, layers: _Layers, x: int, n: int,
              compute: str) -> tuple[Any, int | None]:
    """Layer ``x``'s centred Gram (f64, ``n × n``) and its first non-finite row."""
    z = torch.from_numpy(layers.read(x, 0, n)).to(dev).double()
    finite = torch.isfinite(z).all(1)
    bad = None if bool(finite.all()) else int(torch.nonzero(~finite)[0, 0])
    c = z - z.mean(0)
    dev_abs = c.abs()
    dev_abs = torch.where(torch.isfinite(dev_abs), dev_abs, torch.zeros_like(dev_abs))
    e = exponent_of(float(dev_abs.max()) if c.numel() else 0.0)
    c = c * float(np.ldexp(1.0, -e))
    if compute in ("float32", "tf32"):
        c32 = c.float()
        if _f32_ok(torch, c32):
            # K = C Cᵀ: sums over the columns, in f32 slices of F32_SUM_ROWS columns
            return _runs_f32(torch, c32.T.contiguous(), c32.T.contiguous()), bad
    return c @ c.T, bad

