"""The moment passes on a device: a plan's tiles, each tile's blocks, and the Gram route."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from .. import _native
from .._progress import Progress
from .._sample import exponent_of
from .._source import Source, native_part
from ..errors import NonFiniteError
from .arith import _SLICE_BYTES, _f32_ok, _runs_f32, _TileSums
from .devices import (
    device_budget,
    device_meta,
    oom_as_budget_error,
    precision,
    primary,
    tile_devices,
    torch_module,
)
from .feed import _Feed, _Layers


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
        from .._memory import memory_budget

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
        self.tiles = _native.pair_plan(dims, num_a, n, block_rows, self.host, self.budget,
                                       strategy)["tiles"]
        if self.tiles is None:  # the Gram route ranks first: does it fit the device?
            try:
                self.gram = self._gram_plan(dims, num_a, n, block_rows, dev_b, host_b.bytes,
                                            cuda)
            except MemoryError:
                self.tiles = _native.pair_plan(dims, num_a, n, block_rows, self.host,
                                               self.budget, "tiled")["tiles"]

    def _gram_plan(self, dims: list[int], num_a: int, n: int, block_rows: int | None,
                   dev_b: int, host_b: int, cuda: bool) -> dict[str, Any]:
        # beyond the core's n·d·(8 + 4) per layer on CUDA: the f64 copy on the device, the
        # f32 transposed copy, the sliced f32 products
        extra = (2 * _SLICE_BYTES + 12 * n * max(dims)) if cuda else 0
        b = max(1, min(host_b, dev_b - extra))
        return dict(_native.pair_plan(dims, num_a, n, block_rows, self.host, b, "gram"))

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
