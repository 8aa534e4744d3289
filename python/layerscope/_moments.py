"""One streaming pass of moments over a source (and optionally a second, row-aligned one).

Engine 1 of ``ARCHITECTURE.md``: every row is read once; the Rust accumulator
(``layerscope_core::engine::moments``) keeps, in f64 and on data shifted by a reference
mean, the upper triangle of ``Σ w wᵀ`` for ``w = [x_1 − μ0, …, x_L − μ0, ‖x_1 − μ0‖², …]``
over the concatenated layers. Finalised, it gives the centred cross-product matrix
``C = Σ_a (z_a − z̄)(z_a − z̄)ᵀ`` of all layers together (every ``C_ij`` at once) and the
squared-norm products the debiased CKA needs. Linear CKA, spectra, subspace alignment, CCA
and Procrustes are all functions of these moments, so one pass serves them all.

Memory: ``(D + L)² × 8`` bytes for the accumulator (``D`` = sum of the widths) plus a few
row blocks, independent of the number of rows.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from . import _native
from ._defaults import ITEMSIZE, dtype_name
from ._progress import Progress
from ._source import Source, check_comparable, native_part, resolve
from ._validate import RUN, RunOptions
from .errors import InvalidArgumentError

if TYPE_CHECKING:  # Python < 3.11 has no typing.Unpack; the annotations are strings
    from typing_extensions import Unpack

COMPUTE = ("float64", "float32", "auto", "tf32")

#: Above this ``shift_offset`` (``max |mean − shift| / σ``) a float32 pass warns.
F32_SHIFT_WARN = 2.0


class PassOptions(RunOptions, total=False):
    """The options of one exact pass (:func:`compute_moments`, :func:`pair_stats`): the
    measures' :class:`~layerscope.RunOptions` (checked at their door), ``check_finite``,
    ``block_rows`` and ``compute``."""

    check_finite: bool
    block_rows: int | None
    compute: str


#: The defaults of :class:`PassOptions` (those of the run options as the measures have them).
PASS_DEFAULTS: dict[str, Any] = {
    **{name: default for name, (_, default) in RUN.options.items()},
    "check_finite": True, "block_rows": None, "compute": "float64",
}


def _pass_options(options: Any) -> dict[str, Any]:
    """``options`` over :data:`PASS_DEFAULTS` (an unknown key is a ``TypeError``, as an
    unknown keyword argument is)."""
    unknown = sorted(set(options) - set(PASS_DEFAULTS))
    if unknown:
        raise TypeError(f"unknown pass option(s) {unknown}")
    return {**PASS_DEFAULTS, **options}


def resolve_compute(compute: str, parts: Sequence[tuple[Source, Sequence[str]]]) -> str:
    """``"auto"`` → ``"float32"`` when every selected layer is stored (or given) in 32 bits
    or fewer (f32, f16, bf16: the f32 products' rounding is far below the data's own), else
    ``"float64"``; an explicit choice is returned unchanged."""
    if compute != "auto":
        return compute
    wide = any(_is_f64(src, x) for src, ls in parts for x in ls)
    return "float64" if wide else "float32"


def plan(
    dims: Sequence[int], max_memory: int | None, compute: str = "float64",
    block_rows: int | None = None,
) -> dict[str, Any]:
    """The memory plan of a moment pass over layers of widths ``dims``: accumulator bytes
    (``(D+L)² · 8``), default block rows, the peak (the accumulator, two row blocks and the
    packed SYRK panels, ``layerscope_core::engine::moments::pass_bytes``) and the budget in
    force. Raises :class:`MemoryBudgetError` — saying how many of these layers fit in one
    call — when the peak exceeds the budget (``max_memory``, else ``LAYERSCOPE_MAX_MEMORY``,
    else the machine's; see :mod:`layerscope._memory`)."""
    compute = {"auto": "float64", "tf32": "float32"}.get(compute, compute)
    acc = int(_native.accumulator_bytes(list(dims)))
    br = (int(block_rows) if block_rows is not None
          else int(_native.default_block_rows(list(dims), compute)))
    need = int(_native.pass_bytes(list(dims), br, compute))
    budget, source = _native.check_moment_memory(list(dims), br, compute, max_memory)
    return {
        "accumulator_bytes": acc, "block_rows": br, "peak_bytes_estimate": need,
        "budget_bytes": int(budget), "budget_source": str(source),
    }


def compute_moments(
    source: Any,
    layers: Sequence[str] | str | None = None,
    other: Any = None,
    other_layers: Sequence[str] | str | None = None,
    **options: Unpack[PassOptions],
) -> tuple[Any, dict[str, Any]]:
    """Stream every row of the selected layers once; return ``(Moments, meta)``.

    ``source``/``other``: an ActivationStore, a store path or a dict of 2-D arrays; with
    ``other``, its row ids must equal ``source``'s in order (``MismatchError`` otherwise) and
    its layers come after ``source``'s (``Moments.num_a`` / ``num_b``). ``check_finite``: a
    NaN/Inf raises ``NonFiniteError`` naming the layer and first bad row; ``False`` lets them
    through (every cell of an affected layer becomes NaN; ``meta["nonfinite_rows"]``).
    Every source — stores and in-memory arrays alike (borrowed where they lie, see
    :func:`layerscope._source.native_part`) — goes through the one Rust pass
    (``layerscope_core::engine::moments::accumulate``: GIL released, reader thread one block
    ahead).

    ``compute``: ``"float64"`` (default) multiplies in f64; ``"float32"`` computes the
    ``D × D`` block products (the SYRK, nearly all the work) from the mean-shifted values
    rounded to f32, with f32 sums over at most 128 rows added into the f64 accumulator (the
    squared-norm terms of the debiased estimator, the sums and the shift stay f64): about
    twice as fast; measured against f64 on offset/bf16/f16/scaled/drifting data in
    ``tests/test_cka.py`` (agreement to 1e-6); ``"auto"``: :func:`resolve_compute`.

    The reference shift is the mean of 1024 rows spread evenly over the whole source (not
    the first block, which may be unlike the rest; ``engine::moments::sample_shift``);
    ``meta["shift_offset"]`` is ``max_f |mean_f − shift_f| / σ_f``, and a float32 pass warns
    above ``F32_SHIFT_WARN``.

    ``backend="ray"``: the same single pass cut into row-range tasks on a Ray cluster
    (:func:`layerscope._ray.moment_passes`; checked against the budget here first).

    ``device``: None (the Rust engine), ``"auto"`` or a torch device: the block products on
    that device (:mod:`layerscope._device`; same shift, scale and arithmetic rules, the sums
    handed back to the core), ``meta["device"]``."""
    t0 = time.perf_counter()
    parts, names, dims, num_a, o = _setup(source, layers, other, other_layers, options)
    compute, block_rows, dev = o["compute"], o["block_rows"], o["device"]
    backend, max_memory, progress = o["backend"], o["max_memory"], o["progress"]
    check_finite = o["check_finite"]
    if block_rows is None:
        n = parts[0][0].num_rows
        block_rows = min(int(_native.default_block_rows(list(dims), compute)), max(n, 1))
    pl = plan(dims, max_memory, compute, block_rows)
    br = pl["block_rows"]
    if backend == "ray":
        from ._ray import moment_passes

        runs = moment_passes([(parts, num_a)], compute=compute, check_finite=check_finite,
                             max_memory=max_memory, progress=progress,
                             address=o["ray_address"], device=dev)
        out = next(runs)
        runs.close()
        return out
    if dev is not None:
        from ._device.devices import device_meta
        from ._device.passes import moments

        m = moments(parts, names, num_a, device=dev, block_rows=br,
                    check_finite=check_finite, progress=progress, compute=compute)
        meta = single_pass_meta(m, parts, names, compute, t0, br, pl["peak_bytes_estimate"])
        meta.update(device_meta(dev, compute))
        return m, meta
    with Progress(progress, "moments") as prog:
        m = _native.moments_pass(
            [native_part(src, ls) for src, ls in parts], names, block_rows=br,
            check_finite=check_finite, max_memory=max_memory, num_a=num_a,
            progress=prog.cb, compute=compute,
        )
    return m, single_pass_meta(m, parts, names, compute, t0, br, pl["peak_bytes_estimate"])


def single_pass_meta(
    m: Any, parts: list[tuple[Source, list[str]]], names: list[str], compute: str, t0: float,
    block_rows: int, peak_bytes: int,
) -> dict[str, Any]:
    """The meta of one moment pass over every selected layer (``m``: its ``Moments``): what
    :func:`_meta` records, the passes, block rows, accumulator bytes and ``plan``."""
    dims = [int(d) for d in m.dims]
    meta = _meta(m, parts, names, compute, t0)
    meta.update(passes=1, block_rows=int(block_rows),
                accumulator_bytes=int(_native.accumulator_bytes(dims)))
    n, dsum = int(m.n), sum(dims)
    selected = read_bytes(n, dims, [_itemsize(src, nm) for src, ls in parts for nm in ls])
    meta["plan"] = {
        "strategy": "single-pass", "passes": 1, "peak_bytes": int(peak_bytes),
        "bytes_read": selected, "bytes_selected": selected, "flops": n * dsum * (dsum + 1),
        "block_rows": int(block_rows),
    }
    return meta


def pair_stats(
    source: Any,
    layers: Sequence[str] | str | None = None,
    other: Any = None,
    other_layers: Sequence[str] | str | None = None,
    *,
    strategy: str | None = None,
    **options: Unpack[PassOptions],
) -> tuple[Any, dict[str, Any]]:
    """What linear CKA needs of every layer pair (``_native.PairStats``: ``‖C_ij‖²``,
    ``Σ r̄_i r̄_j``, ``tr C_ii``, ``n``), exactly, within the memory budget; return
    ``(PairStats, meta)``.

    Arguments as :func:`compute_moments`. Three exact plans
    (``layerscope_core::engine::moments::{tiled, gram}``):

    * ``"single-pass"``: one accumulator (``(D + L)² · 8`` bytes) over all layers;
    * ``"tiled"``: the layers (and any layer too wide on its own, in blocks of feature
      columns) grouped into tiles whose accumulators fit, one pass per tile, each pair of
      column blocks computed once: the same multiply-adds, more bytes read;
    * ``"gram"``: per-layer centred ``n × n`` Grams (``n² d / 2`` multiply-adds per layer),
      as many held as the budget allows: far cheaper when ``n`` is small against the widths.

    ``strategy``: ``None`` (the plan with the least estimated time among those that fit) or
    one of the three, forced.
    ``meta["plan"]`` records the strategy, passes, peak bytes, bytes read and FLOPs; with
    ``other``, only the pairs across the two sources (and each layer with itself) are
    computed.

    ``backend="ray"``: the same plan's tiles cut into row-range tasks on a Ray cluster
    (:mod:`layerscope._ray`; ``ray_address`` as there); ``meta`` also records the backend
    and the tasks.

    ``device``: as :func:`compute_moments` (every plan; the tiles' sums, or the Gram route's
    pair sums, handed back to the core)."""
    t0 = time.perf_counter()
    if strategy is not None and not isinstance(strategy, str):
        raise InvalidArgumentError(f"strategy must be a string or None, got {strategy!r}")
    parts, names, dims, num_a, o = _setup(source, layers, other, other_layers, options)
    backend, dev = o["backend"], o["device"]
    # what every engine's pair pass takes
    run = {k: o[k] for k in ("block_rows", "check_finite", "max_memory", "compute")}
    extra: dict[str, Any] = {}
    if dev is not None and backend != "ray":
        from ._device.passes import pair_stats as device_pair_stats

        st, extra = device_pair_stats(parts, names, num_a, device=dev, progress=o["progress"],
                                      strategy=strategy, **run)
    elif backend == "ray":
        from . import _ray

        st, extra = _ray.pair_stats(parts, names, num_a, progress=o["progress"],
                                    strategy=strategy, address=o["ray_address"], device=dev,
                                    **run)
    else:
        with Progress(o["progress"], "moments") as prog:
            st = _native.pair_pass([native_part(src, ls) for src, ls in parts], names, num_a,
                                   progress=prog.cb, strategy=strategy, **run)
    meta = _meta(st, parts, names, o["compute"], t0)
    meta.update(extra)
    if backend == "ray":
        meta["engine"] = "ray"
    item = [_itemsize(src, nm) for src, ls in parts for nm in ls]
    n = int(st.n)
    store_bytes = read_bytes(n, dims, item)
    plan = st.plan
    bytes_read = read_bytes(n, dims, item, [int(r) for r in plan["layer_reads"]])
    meta.update(passes=int(plan["passes"]), block_rows=int(plan["block_rows"]))
    meta["plan"] = {
        "strategy": plan["strategy"], "passes": int(plan["passes"]),
        "peak_bytes": int(plan["peak_bytes"]), "bytes_read": int(bytes_read),
        "bytes_selected": int(store_bytes), "flops": 2 * int(plan["madds"]),
        "block_rows": int(plan["block_rows"]),
    }
    return st, meta


def _device_for(device: Any, backend: str, compute: str, ray_ok: bool = False) -> Any:
    """The torch device of a pass (None: the Rust engine), checked with its options. With
    ``backend="ray"`` (``ray_ok``: the moment passes) a :class:`layerscope._ray.RayDevice`:
    the nodes' devices, which Ray assigns to the tasks."""
    from ._device.devices import check_compute, resolve_device

    if device is not None and backend == "ray":
        if not ray_ok:
            raise InvalidArgumentError(
                "device= with backend='ray' runs the moment passes (linear CKA, spectrum, "
                "alignment, analyze) on the nodes' devices; RBF and minibatch CKA, RSA, "
                "mutual kNN and intrinsic dimension on Ray run on the nodes' CPUs: pass "
                "device= or backend='ray', not both")
        from ._ray import ray_device

        dev = ray_device(device)
        check_compute(compute, dev)
        return dev
    dev = resolve_device(device)
    check_compute(compute, dev)
    return dev


def _setup(
    source: Any, layers: Any, other: Any, other_layers: Any, options: Any,
) -> tuple[list[tuple[Source, list[str]]], list[str], list[int], int, dict[str, Any]]:
    """Resolve the sources and options of a pass: ``(parts, names, dims, num_a, options)``,
    the options over :data:`PASS_DEFAULTS` with ``compute`` resolved, ``block_rows`` checked
    (at most the row count; None for the default) and ``device`` resolved
    (:func:`_device_for`)."""
    o = _pass_options(options)
    a = resolve(source)
    la = a.select(layers)
    parts: list[tuple[Source, list[str]]] = [(a, la)]
    if other is not None:
        b = resolve(other)
        lb = b.select(other_layers)
        check_comparable(a, b)
        parts.append((b, lb))
    names = [n for _, ls in parts for n in ls]
    dims = [src.dims[n] for src, ls in parts for n in ls]
    o["compute"] = resolve_compute(o["compute"], parts)
    block_rows = o["block_rows"]
    if block_rows is not None:
        if isinstance(block_rows, bool) or not isinstance(block_rows, (int, np.integer)) \
                or block_rows < 1:
            raise InvalidArgumentError(
                f"block_rows must be a positive integer, got {block_rows!r}")
        o["block_rows"] = min(int(block_rows), max(a.num_rows, 1))  # never more than all rows
    o["device"] = _device_for(o["device"], o["backend"], o["compute"], ray_ok=True)
    return parts, names, dims, len(la), o


def _meta(
    m: Any, parts: list[tuple[Source, list[str]]], names: list[str], compute: str, t0: float,
) -> dict[str, Any]:
    """The meta every pass records (and the float32 shift warning)."""
    how = "rust-stream" if all(src.is_store for src, _ in parts) else "rust-arrays"
    meta: dict[str, Any] = {
        "n": int(m.n), "engine": how, "compute": compute,
        "shift_offset": float(m.shift_offset), "seconds_pass": time.perf_counter() - t0,
    }
    if compute in ("float32", "tf32") and m.shift_offset > F32_SHIFT_WARN:
        warnings.warn(
            f"compute='float32': the reference shift was {m.shift_offset:.1f} standard "
            "deviations from the mean for some feature, so the float32 products may deviate "
            "from float64 by more than 1e-6; use compute='float64' for this data",
            RuntimeWarning, stacklevel=4)
    bad = {nm: int(r) for nm, r in zip(names, m.nonfinite) if r is not None}
    if bad:
        meta["nonfinite_rows"] = bad
    return meta


def read_bytes(
    n: int, dims: Sequence[int], item: Sequence[int], reads: Sequence[int] | None = None,
) -> int:
    """Bytes a plan reads: ``Σ_l reads_l · n · d_l · itemsize_l`` (``reads``: how many passes
    read each layer; default once each, i.e. the bytes selected)."""
    reads = [1] * len(dims) if reads is None else reads
    return sum(int(r) * n * d * s for r, d, s in zip(reads, dims, item))




def _itemsize(src: Source, layer: str) -> int:
    """Bytes per stored value of a layer (what a pass reads)."""
    if src.is_store:
        return ITEMSIZE[dtype_name(src.store.dtypes[layer])]
    assert src.arrays is not None
    a = src.arrays[layer]
    return int(getattr(a, "itemsize", 0) or a.element_size())


def _is_f64(src: Source, layer: str) -> bool:
    if src.is_store:
        return str(src.store.dtypes[layer]) in ("float64", "F64", "f64")
    assert src.arrays is not None
    return src.arrays[layer].dtype == np.float64


# --------------------------------------------------------------------------- measure tiles


def measure_peak(dims: Sequence[int], n: int, compute: str) -> int:
    """Peak bytes of a moment pass over layers of widths ``dims`` followed by the
    eigendecompositions of all of them while the moments are held: ``max(pass_bytes,
    accumulator_bytes + eigs_bytes)`` at the default block rows (at most ``n``)."""
    dims = list(dims)
    compute = "float32" if compute == "tf32" else compute
    br = min(int(_native.default_block_rows(dims, compute)), max(int(n), 1))
    return max(int(_native.pass_bytes(dims, br, compute)),
               int(_native.accumulator_bytes(dims)) + int(_native.eigs_bytes(dims)))


def measure_tiles(
    dims: Sequence[int], num_a: int, n: int, compute: str, max_memory: int | None,
    measure: str,
) -> tuple[str, list[list[int]], int]:
    """The passes of the moment measures (spectra, alignment) within the budget in force
    (``max_memory``, else ``LAYERSCOPE_MAX_MEMORY``, else the machine's):
    ``(strategy, tiles, peak_bytes)``, each tile a sorted list of layer indices
    (``0..num_a`` from the first source, the rest from the second) accumulated in one pass
    and then decomposed (:func:`measure_peak`).

    * spectra: ``"per-layer"`` — each layer's ``C_ii`` in its own pass (``"single-pass"``
      for one layer): every layer is read once either way, and the products are
      ``n Σ d_i²`` instead of the ``n D²`` of the cross blocks no spectrum uses;
    * ``"single-pass"``: every layer in one tile, when it fits (alignment);
    * ``"layer-tiles"``: alignment needs ``C_ii``, ``C_jj`` and ``C_ij`` of every pair at once —
      the layers of each side in groups of at most ``W`` columns (``W`` the widest that
      fits), one pass per pair of groups (one source: each unordered pair of distinct groups,
      so every layer pair lies in some tile; two sources: every first-source group with
      every second-source group). Bytes read grow with the passes; the answers do not
      change (each pair's blocks are the same sums).

    Raises :class:`MemoryBudgetError` when even the smallest tile (the widest layer, or the
    widest pair of layers for alignment) does not fit, with what it needs."""
    from ._memory import memory_budget

    budget = memory_budget(max_memory).bytes
    dims = [int(d) for d in dims]
    every = list(range(len(dims)))
    if measure == "spectrum":
        peaks = [measure_peak([d], n, compute) for d in dims]
        worst = max(range(len(dims)), key=lambda i: peaks[i])
        _native.check_budget(
            peaks[worst], f"the spectrum of a layer of width {dims[worst]} (its d × d "
            "moments and their eigendecomposition at once)",
            "a spectrum cannot be split across passes", max_memory)
        if len(dims) == 1:
            return "single-pass", [every], peaks[0]
        return "per-layer", [[i] for i in every], peaks[worst]
    if measure != "alignment":
        raise InvalidArgumentError(f"unknown moment measure {measure!r}")
    whole = measure_peak(dims, n, compute)
    if whole <= budget:
        return "single-pass", [every], whole
    sides = [every[:num_a], every[num_a:]] if num_a < len(dims) else [every]
    # The smallest tile: the two widest layers that meet in some pair.
    if len(sides) == 2:
        pair = [max(sides[0], key=lambda i: dims[i]), max(sides[1], key=lambda i: dims[i])]
    else:
        pair = sorted(every, key=lambda i: -dims[i])[:2]
    _native.check_budget(
        measure_peak([dims[i] for i in pair], n, compute),
        f"the alignment of the layer pair of widths {[dims[i] for i in pair]} (C_ii, C_jj "
        "and C_ij at once, and both eigendecompositions)",
        "a pair cannot be split across passes", max_memory)

    def tiles_for(w: int) -> list[list[int]]:
        groups: list[list[list[int]]] = []
        for side in sides:
            gs: list[list[int]] = [[]]
            for i in side:
                if gs[-1] and (w == 0 or sum(dims[j] for j in gs[-1]) + dims[i] > w):
                    gs.append([])
                gs[-1].append(i)
            groups.append(gs)
        if len(groups) == 2:
            return [sorted(g + h) for g in groups[0] for h in groups[1]]
        gs = groups[0]
        if len(gs) == 1:
            return [gs[0]]
        return [sorted(gs[a] + gs[b]) for a in range(len(gs)) for b in range(a + 1, len(gs))]

    def peak_of(ts: list[list[int]]) -> int:
        return max(measure_peak([dims[j] for j in t], n, compute) for t in ts)

    lo = max(dims[i] for i in pair)  # every group holds at least its widest layer
    hi = sum(dims)
    # The widest group width whose tiles all fit (the peak grows with the width).
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if peak_of(tiles_for(mid)) <= budget:
            lo = mid
        else:
            hi = mid - 1
    tiles = tiles_for(lo)
    if peak_of(tiles) > budget:  # narrow layers grouped past the widest pair: one per group
        tiles = tiles_for(0)
    return "layer-tiles", tiles, peak_of(tiles)
