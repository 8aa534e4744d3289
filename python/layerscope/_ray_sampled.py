"""The sampled measures on a Ray cluster: what ``backend="ray"`` runs for RBF CKA, ``rsa``,
``mutual_knn`` and ``intrinsic_dimension(s)`` (tasks per layer, and per block of layer
pairs).

* **Pair measures** (RBF CKA, RSA, mutual kNN) in two steps, the very functions the local
  call runs (``layerscope_core::measures::prepared``):

  1. one task per layer reads that layer's sampled rows where the store lies (the sample's
     indices travel with it) and prepares it — its RBF Gram, RDM or kNN graph: the
     ``m²·d`` part, all but a sliver of the work — returned to Ray's object store;
  2. one task per block of layer pairs fetches the prepared layers of its block and
     tabulates them (``m²`` per pair). Within one source the blocks are the upper triangle
     of groups of layers: a diagonal block is the within-source table (its diagonal
     exactly as locally), an off-diagonal block a cross table, mirrored on the driver.

  Every cell is computed by the same function, on the same arguments in the same order, as
  the local all-pairs table: the results are equal to the last bit. A block holds at most
  ``2 × layers_per_block`` prepared layers: groups are sized so that a block fits half of a
  node's Ray memory (``meta["tasks"]`` records them).
* **Intrinsic dimension**: one task per layer runs the local estimator on that layer (the
  same sample, seed and options), its warnings re-raised on the driver.
* **Minibatch CKA**: the row sequence (all rows, or the seeded sample) cut into contiguous
  ranges of whole minibatches, one task per range (``_native.minibatch_cka_pass`` over
  ``rows=(start, stop)``: the same minibatches as the local pass); the driver averages the
  ranges' mean HSICs and bandwidths weighted by their batch counts and forms the CKA ratios
  (``_native.minibatch_cka_table``): equal to the local result to rounding (1e-12).

Tasks ask Ray for the CPUs of the smallest node and their peak memory, are retried when a
worker or node dies, and are waited for under the no-node watchdog of
:func:`layerscope._ray.wait_all`.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import _native
from ._ray import (
    Cluster,
    Part,
    cluster,
    connect,
    fetch,
    open_source,
    part_of,
    remote,
    task_options,
    wait_all,
)
from ._sample import load
from ._source import Source, native_part
from .errors import MemoryBudgetError, NonFiniteError

#: Layers per group of a block of pairs; None: as many as fit half a node's Ray memory.
BLOCK_LAYERS: int | None = None


def prepare(part: Part, name: str, idx: np.ndarray, measure: str, opts: dict[str, Any],
            max_memory: int | None) -> Any:
    """One layer's task: its sampled rows (float64, checked finite, scaled to unit range when
    far from it: :func:`layerscope._sample.load`) prepared for the pair measure
    (``_native.prepare_layer``), with the scale exponent ``e`` of those rows."""
    x, e = load(open_source(part), name, np.asarray(idx), with_exp=True)
    return _native.prepare_layer(x, measure, max_memory=max_memory, **opts), e


def tabulate(na: int, within: bool, *preps: Any) -> dict[str, np.ndarray]:
    """One block's task: the pair table of its first ``na`` prepared layers against the
    rest (``within``: of the first ``na`` with themselves); RBF bandwidths back in the data's
    units (``× 2^e`` of each layer's sample)."""
    layers = [p for p, _ in preps]
    exps = np.array([e for _, e in preps], dtype=np.int32)
    a = layers[:na]
    r = {k: np.asarray(v) for k, v in
         _native.prepared_table(a, None if within else layers[na:]).items()}
    if "bw_a" in r:
        r["bw_a"] = np.ldexp(r["bw_a"], exps[:na])
    if "bw_b" in r:
        r["bw_b"] = np.ldexp(r["bw_b"], exps[na:])
    return r


def id_layer(part: Part, name: str, options: dict[str, Any]) -> tuple[Any, list[Any]]:
    """One layer's intrinsic dimensions (the local estimator, progress off) and the
    warnings it raised (re-raised on the driver)."""
    from .measures.idim import intrinsic_dimensions

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = intrinsic_dimensions(open_source(part), layers=[name], progress=False, **options)
    return out, [(str(w.message), w.category) for w in caught]


def minibatch_range(parts: list[Part], names: list[str], options: dict[str, Any],
                    sample: np.ndarray | None, start: int, stop: int) -> dict[str, Any]:
    """One range task of minibatch CKA: positions ``[start, stop)`` of the row sequence (all
    rows, or the sampled ones), non-finite values recorded, not raised (the driver raises
    with the row in the whole sequence)."""
    native = [native_part(open_source(p), list(p.layers)) for p in parts]
    if sample is not None:
        r = _native.minibatch_cka_pass(native, names, sample=np.asarray(sample)[start:stop]
                                       .tolist(), check_finite=False, **options)
    else:
        r = _native.minibatch_cka_pass(native, names, rows=(start, stop), check_finite=False,
                                       **options)
    return {k: r[k] for k in ("hsic", "bandwidths", "batches", "rows_used", "rows_seen",
                              "nonfinite", "scale_exp")}


def merge_minibatch(ranges: Sequence[tuple[int, int]], got: Sequence[dict[str, Any]],
                    names: Sequence[str], num_a: int) -> dict[str, Any]:
    """The minibatch result over all ``ranges`` (in row order) from each range's result:
    mean HSICs and bandwidths weighted by batch counts, counts summed, each layer's first
    non-finite row (offset by its range's start), the CKA ratios from the merged means."""
    w = np.array([g["batches"] for g in got], dtype=np.float64)
    total = float(w.sum())
    # each range's HSICs in the first range's units (a layer far from unit scale gets its
    # exponent from each range's first minibatch: exact powers of two apart)
    e0 = np.asarray(got[0]["scale_exp"], dtype=np.int32)

    def common(g: dict[str, Any]) -> np.ndarray:
        k = np.asarray(g["scale_exp"], dtype=np.int32) - e0
        with np.errstate(over="ignore", under="ignore"):
            return np.ldexp(np.asarray(g["hsic"], dtype=np.float64),
                            2 * (k[:, None] + k[None, :]))

    hsic = sum(common(g) * b for g, b in zip(got, w)) / total
    bw = sum(np.asarray(g["bandwidths"], dtype=np.float64) * b for g, b in zip(got, w)) / total
    nonfinite: list[int | None] = [None] * len(names)
    for (a, _), g in zip(ranges, got):
        for i, v in enumerate(g["nonfinite"]):
            if v is not None and nonfinite[i] is None:
                nonfinite[i] = a + int(v)
    return {"values": _native.minibatch_cka_table(np.ascontiguousarray(hsic), num_a),
            "hsic": hsic, "bandwidths": np.asarray(bw).tolist(), "batches": int(total),
            "rows_used": sum(int(g["rows_used"]) for g in got),
            "rows_seen": sum(int(g["rows_seen"]) for g in got), "nonfinite": nonfinite,
            "scale_exp": e0.tolist()}


def _remote(ray: Any, name: str) -> Any:
    return remote(ray, {"prepare": prepare, "tabulate": tabulate, "id": id_layer,
                        "minibatch": minibatch_range}[name])


def batch_ranges(n: int, batch_size: int, k: int) -> list[tuple[int, int]]:
    """``k`` (at most) contiguous ranges of whole minibatches covering ``[0, n)``, near-equal
    in batches; the last one also takes the final shorter batch — so the ranges hold exactly
    the minibatches of one pass over all ``n``."""
    full = n // batch_size
    k = max(1, min(int(k), full))
    cuts = [round(i * full / k) * batch_size for i in range(k)] + [n]
    return [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]


def minibatch(parts: list[tuple[Source, list[str]]], names: list[str], num_a: int, *,
              kernel: str, sigma: float, batch_size: int, sample: np.ndarray | None,
              check_finite: bool, max_memory: int | None, progress: Any,
              address: str | None) -> dict[str, Any]:
    """Minibatch CKA on Ray (see the module docs): the dict of
    ``_native.minibatch_cka_pass``, plus ``tasks``."""
    t0 = time.perf_counter()
    ray = connect(address)
    cl = cluster(ray)
    n = int(sample.size) if sample is not None else int(parts[0][0].num_rows)
    dims = [src.dims[x] for src, ls in parts for x in ls]
    mem = int(_native.minibatch_bytes(dims, batch_size))
    ranges = batch_ranges(n, batch_size, cl.slots)
    specs = [part_of(ray, src, ls) for src, ls in parts]
    sref = ray.put(sample) if sample is not None else None
    options = {"kernel": kernel, "sigma": sigma, "batch_size": batch_size, "num_a": num_a,
               "max_memory": max_memory}
    fn = _remote(ray, "minibatch").options(**task_options(cl, mem))
    refs = [fn.remote(specs, names, options, sref, a, b) for a, b in ranges]
    need = {"cpus": cl.cpus_per_task, "memory": mem}
    wait_all(ray, refs, progress, "minibatch cka (ray)", **need)
    got = [fetch(ray, r, **need) for r in refs]
    out = merge_minibatch(ranges, got, names, num_a)
    if check_finite:
        bad = [(x, v) for x, v in zip(names, out["nonfinite"]) if v is not None]
        if bad:  # the first bad row of the sequence, as the local pass stops at it
            x, row = min(bad, key=lambda t: t[1])
            raise NonFiniteError(f'layer "{x}": non-finite value (NaN/Inf) in row {row}')
    w = [int(g["batches"]) for g in got]
    return {**out,
            "tasks": {"ranges": len(ranges), "batches_per_range": w,
                      "nodes": cl.nodes, "cpus_per_task": cl.cpus_per_task,
                      "seconds": time.perf_counter() - t0,
                      "merge_order": "ranges of whole minibatches in row order; mean HSICs "
                                     "weighted by batch counts on the driver"}}


def _groups(n: int, per: int) -> list[range]:
    return [range(i, min(i + per, n)) for i in range(0, n, per)]


def pair_table(measure: str, a: Source, b: Source | None, la: Sequence[str],
               lb: Sequence[str] | None, idx: np.ndarray, opts: dict[str, Any], *,
               max_memory: int | None, progress: Any, address: str | None) -> dict[str, Any]:
    """The all-pairs table of ``measure`` (``"rbf"``, ``"rsa"``, ``"knn"``) over the
    sampled rows ``idx`` on Ray (see the module docs): a dict with ``values`` (La × Lb),
    ``bw_a`` / ``bw_b`` (RBF bandwidths per layer) and ``tasks`` (what ran)."""
    t0 = time.perf_counter()
    ray = connect(address)
    cl = cluster(ray)
    m = int(idx.size)
    sides: list[tuple[Source, list[str]]] = [(a, list(la))]
    if b is not None and lb is not None:
        sides.append((b, list(lb)))
    need = {}
    size = 0
    for src, names in sides:
        for x in names:
            peak, size = _native.prepare_bytes(measure, m, src.dims[x], **opts)
            need[(id(src), x)] = m * src.dims[x] * 8 + int(peak)
    big = max(need.values())
    if cl.memory and big > cl.memory:
        raise MemoryBudgetError(
            f"preparing one layer ({measure}, {m} sampled rows) needs {big} bytes, more than "
            f"the Ray memory of any node ({cl.memory} bytes); use a smaller sample")
    size = int(size)  # the same for every layer: m rows
    nl = max(len(names) for _, names in sides)
    per = BLOCK_LAYERS or max(1, (cl.memory // 2 if cl.memory else 1 << 62) // (2 * size))
    per = max(1, min(per, nl))
    idx_ref = ray.put(np.asarray(idx, dtype=np.int64))
    prep_fn = _remote(ray, "prepare")
    preps: list[list[Any]] = []
    for src, names in sides:
        part = part_of(ray, src, names)
        preps.append([prep_fn.options(**task_options(cl, need[(id(src), x)])).remote(
            part, x, idx_ref, measure, opts, max_memory) for x in names])
    tab = _remote(ray, "tabulate")
    blocks: list[tuple[range, range, bool, Any]] = []
    ga = _groups(len(sides[0][1]), per)
    gb = _groups(len(sides[1][1]), per) if len(sides) > 1 else ga
    for p, rows in enumerate(ga):
        for q, cols in enumerate(gb):
            within = len(sides) == 1 and p == q
            if len(sides) == 1 and q < p:
                continue
            args = [preps[0][i] for i in rows]
            if not within:
                args += [preps[-1][j] for j in cols]
            mem = len(args) * size + len(rows) * len(cols) * 32
            blocks.append((rows, cols, within,
                           tab.options(**task_options(cl, mem)).remote(len(rows), within,
                                                                        *args)))
    every = [r for ps in preps for r in ps] + [blk[3] for blk in blocks]
    need = {"cpus": cl.cpus_per_task, "memory": max(big, *_block_bytes(blocks, size))}
    wait_all(ray, every, progress, measure.replace("knn", "mutual knn") + " (ray)", **need)
    ncols = len(sides[-1][1])
    values = np.full((len(sides[0][1]), ncols), np.nan)
    bw_a = np.full(len(sides[0][1]), np.nan)
    bw_b = np.full(ncols, np.nan)
    for rows, cols, within, ref in blocks:
        r = fetch(ray, ref, **need)
        v = r["values"]
        values[rows.start:rows.stop, cols.start:cols.stop] = v
        if len(sides) == 1 and not within:
            values[cols.start:cols.stop, rows.start:rows.stop] = v.T
        if "bw_a" in r:
            bw_a[rows.start:rows.stop] = r["bw_a"]
            bw_b[cols.start:cols.stop] = r["bw_a"] if within else r["bw_b"]
    if len(sides) == 1:
        bw_b = bw_a
    return {"values": values, "bw_a": bw_a, "bw_b": bw_b,
            "tasks": _meta(cl, len(every) - len(blocks), len(blocks), per, size, blocks,
                           time.perf_counter() - t0)}


def _block_bytes(blocks: list[tuple[range, range, bool, Any]], size: int) -> list[int]:
    """The prepared bytes each block task fetches."""
    return [(len(r) + (0 if w else len(c))) * size for r, c, w, _ in blocks] or [0]


def _meta(cl: Cluster, prepares: int, nblocks: int, per: int, size: int,
          blocks: list[tuple[range, range, bool, Any]], seconds: float) -> dict[str, Any]:
    moved = sum(_block_bytes(blocks, size))
    return {"prepare": prepares, "blocks": nblocks, "layers_per_block": per,
            "prepared_bytes_per_layer": size, "bytes_to_blocks": moved,
            "nodes": cl.nodes, "cpus_per_task": cl.cpus_per_task, "seconds": seconds,
            "order": "a task per layer prepares; a task per block of pairs tabulates "
                     "(within one source: the upper triangle of layer groups, mirrored)"}


def intrinsic_dimensions(src: Source, names: Sequence[str], options: dict[str, Any], *,
                         progress: Any, address: str | None) -> tuple[dict[str, Any],
                                                                    dict[str, Any]]:
    """``{method: per-layer results}`` of the local estimator run as one task per layer
    (``options``: its keyword arguments, ``max_memory`` the budget on each node), and the
    ``tasks`` meta. The per-layer results are merged by the caller."""
    t0 = time.perf_counter()
    ray = connect(address)
    cl = cluster(ray)
    fn = _remote(ray, "id")
    part = part_of(ray, src, names)
    m = min(src.num_rows, int(options.get("sample") or src.num_rows))
    refs = []
    mems = []
    for x in names:
        # the sample, its kNN graph and the distance blocks, bounded by a node's memory
        need = m * src.dims[x] * 8 * 3
        mems.append(min(need, cl.memory or need))
        refs.append(fn.options(**task_options(cl, mems[-1])).remote(part, x, options))
    need = {"cpus": cl.cpus_per_task, "memory": max(mems, default=0)}
    wait_all(ray, refs, progress, "intrinsic dimension (ray)", **need)
    out: dict[str, list[Any]] = {}
    for ref in refs:
        res, caught = fetch(ray, ref, **need)
        for msg, cat in caught:
            warnings.warn(msg, cat, stacklevel=4)
        for method, r in res.items():
            out.setdefault(method, []).append(r)
    return out, {"layers": len(names), "tasks": len(refs), "nodes": cl.nodes,
                 "cpus_per_task": cl.cpus_per_task,
                 "seconds": time.perf_counter() - t0,
                 "order": "one task per layer (the local estimator on that layer)"}

