"""The plan of a call, before it runs: ``layerscope.plan(...)`` and ``layerscope plan``.

Every measure checks its exact peak-byte formula against the memory budget before it reads
a row; this module asks the same questions without reading anything and says which plan a
call would run, what it costs and why the others were not taken:

* linear CKA (biased or debiased): the three exact plans of
  ``layerscope_core::engine::moments`` (``PairPlan::choose``): ``"single-pass"`` (one
  ``(D + L)² · 8``-byte accumulator), ``"tiled"`` (groups of layers or feature-column blocks
  whose accumulators fit, one pass per tile: the same multiply-adds, more bytes read) and
  ``"gram"`` (per-layer centred ``n × n`` Grams: ``n² d / 2`` multiply-adds per layer);
  the cheapest that fits is taken (ranked at nominal rates), ``strategy=`` forces one;
* RBF CKA: ``"sampled-gram"`` (one ``m × m`` Gram per layer on a seeded sample of ``m`` rows);
* the minibatch estimator: ``"minibatch"`` (one streamed pass, per-batch Grams);
* spectra (``measure="spectrum"``): ``"per-layer"`` (each layer's moments in its own pass,
  then its eigendecomposition); alignment (``"alignment"``): ``"single-pass"`` moments and
  the eigendecompositions of the layers used held with them, or ``"layer-tiles"`` (one
  pass per pair of layer groups) when that does not fit
  (:func:`layerscope._moments.measure_tiles`).

``estimated_seconds`` = the plan's multiply-adds at the rate this machine's packed product
kernel reaches (measured once per process, :func:`gemm_rate`) + the values it reads at
:data:`READ_VALUES_PER_S` (a store in the page cache or on local NVMe; a network disk is
slower). It is an estimate for planning, not a promise.
"""

from __future__ import annotations

import argparse
import functools
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, TypedDict

from . import _native
from ._commands import command
from ._defaults import BATCH_SIZE, ITEMSIZE, SAMPLE_CAP, STORE_DTYPES
from ._layers import add_layer_args
from ._memory import add_max_memory_arg, memory_budget
from ._moments import COMPUTE, _itemsize, measure_tiles, read_bytes, resolve_compute
from ._source import Source, check_comparable, resolve
from ._validate import DTYPE, LAYERS, MAX_MEMORY, Group, Int, Ints, OneOf, cli_type, validated
from .errors import InvalidArgumentError, MemoryBudgetError
from .measures.cka import ESTIMATORS, KERNELS

if TYPE_CHECKING:  # Python < 3.11 has no typing.Unpack; the annotations are strings
    from typing_extensions import Unpack

#: Values read (and converted to the compute type) per second in the time estimate.
READ_VALUES_PER_S = 1e9

MEASURES = ("cka", "spectrum", "alignment")


@functools.cache
def gemm_rate(compute: str = "float64") -> float:
    """Multiply-adds per second of the packed product kernel on this machine (all threads)
    in ``compute`` arithmetic, measured once per process (about 0.2 s;
    ``layerscope_core::engine::moments::measured_madds_per_s``)."""
    return float(_native.measured_madds_per_s(compute))


@dataclass(frozen=True)
class Plan:
    """What a call would do. Byte counts are exact (the formulas the measure checks); the
    time is an estimate (see the module docstring)."""

    measure: str
    kernel: str
    estimator: str
    strategy: str
    passes: int
    peak_bytes: int
    budget_bytes: int
    budget_source: str
    bytes_read: int
    bytes_selected: int
    flops: int
    block_rows: int
    n: int
    layers: list[str]
    other_layers: list[str]
    dims: list[int]
    compute: str
    estimated_seconds: float
    gemm_flops_per_s: float
    alternatives: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        return asdict(self)

    def __str__(self) -> str:
        from .store import _human

        what = self.measure if self.measure != "cka" else \
            f"{self.kernel} CKA ({self.estimator})"
        sides = f"{len(self.layers)} layers" + (
            f" × {len(self.other_layers)} layers" if self.other_layers else "")
        lines = [
            f"plan: {what} over {sides} (D = {sum(self.dims)}), n = {self.n} rows, "
            f"compute {self.compute}",
            f"  strategy      {self.strategy}",
            f"  passes        {self.passes}",
            f"  peak memory   {_human(self.peak_bytes)} of a {_human(self.budget_bytes)} "
            f"budget ({self.budget_source})",
            f"  bytes read    {_human(self.bytes_read)} "
            f"({self.bytes_read / max(self.bytes_selected, 1):.2f}× the "
            f"{_human(self.bytes_selected)} selected)",
            f"  FLOPs         {self.flops:.3e}",
            f"  est. time     {_fmt_seconds(self.estimated_seconds)} (products at "
            f"{self.gemm_flops_per_s / 1e9:.0f} GFLOP/s measured here, reads at "
            f"{READ_VALUES_PER_S / 1e9:.0f}e9 values/s)",
        ]
        if self.alternatives:
            lines.append("  alternatives:")
            for name, alt in self.alternatives.items():
                if alt.get("fits"):
                    lines.append(
                        f"    {name:<12} {alt['passes']} pass(es), peak "
                        f"{_human(alt['peak_bytes'])}, est. "
                        f"{_fmt_seconds(alt['estimated_seconds'])}")
                else:
                    lines.append(f"    {name:<12} does not fit: {alt['reason']}")
        lines += [f"  note: {x}" for x in self.notes]
        return "\n".join(lines)


def _fmt_seconds(s: float) -> str:
    if s < 120:
        return f"{s:.3g} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


class PlanOptions(TypedDict, total=False):
    """What :func:`plan` and :func:`plan_shapes` plan for: the call ``measure(...)`` with
    these options, as the measure takes them."""

    measure: str
    kernel: str
    estimator: str
    max_memory: int | str | None
    compute: str
    strategy: str | None
    block_rows: int | None
    sample: int | None
    batch_size: int | None


_OPTIONS = Group(
    PlanOptions, measure=(OneOf(*MEASURES), "cka"), kernel=(OneOf(*KERNELS), "linear"),
    estimator=(OneOf(*ESTIMATORS), "biased"), max_memory=(MAX_MEMORY, None),
    compute=(OneOf(*COMPUTE), "auto"),
    strategy=((None, OneOf(*_native.PAIR_STRATEGIES)), None),
    block_rows=((None, Int(1)), None), sample=((None, Int(1)), None),
    batch_size=((None, Int(4)), None))


@validated(layers=LAYERS, other_layers=LAYERS, options=_OPTIONS)
def plan(
    source: Any,
    other: Any = None,
    *,
    layers: Sequence[str] | str | None = None,
    other_layers: Sequence[str] | str | None = None,
    **options: Unpack[PlanOptions],
) -> Plan:
    """The plan the call ``measure(source, other, ...)`` would run, without reading a row.

    ``measure``: ``"cka"`` (with ``kernel`` and ``estimator`` as in :func:`layerscope.cka`),
    ``"spectrum"`` or ``"alignment"``; ``max_memory``, ``compute``, ``strategy``,
    ``block_rows``, ``sample``, ``batch_size``: as in the measure. Raises
    :class:`MemoryBudgetError` (with the minimum that would work) when no plan fits — the
    error the call itself would raise before reading anything.

    Example::

        >>> p = layerscope.plan("acts/", max_memory="4G")
        >>> p.strategy, p.passes, p.peak_bytes, p.estimated_seconds
    """
    linear = _check_options(options, other is not None)
    a = resolve(source)
    la = a.select(layers)
    parts: list[tuple[Source, list[str]]] = [(a, la)]
    lb: list[str] = []
    if other is not None:
        b = resolve(other)
        lb = b.select(other_layers)
        check_comparable(a, b)
        parts.append((b, lb))
    dims = [src.dims[x] for src, ls in parts for x in ls]
    item = [_itemsize(src, x) for src, ls in parts for x in ls]
    # RBF, minibatch, spectra and alignment compute in float64
    compute = resolve_compute(options["compute"] if linear else "float64", parts)
    return _plan(dims, item, int(a.num_rows), la, lb, **{**options, "compute": compute})


@validated(widths=Ints(Int(1)), rows=Int(0), other_widths=(None, Ints(Int(1))), dtype=DTYPE,
           options=_OPTIONS)
def plan_shapes(
    widths: Sequence[int],
    rows: int,
    *,
    other_widths: Sequence[int] | None = None,
    dtype: str = "bfloat16",
    **options: Unpack[PlanOptions],
) -> Plan:
    """:func:`plan` for a store that does not exist yet: layers of ``widths`` over ``rows``
    rows stored as ``dtype`` (``"bfloat16"``, ``"float16"``, ``"float32"``, ``"float64"``),
    e.g. ``plan_shapes([4096] * 33, 10**6)`` for a 7B model's residual stream (layers are
    named ``"0"``, ``"1"``, …; ``other_widths`` the second store's, ``"other:0"``, …).
    ``compute="auto"``: float32 products for stores of 32 bits or fewer."""
    size = ITEMSIZE[dtype]
    ow = other_widths or []
    linear = _check_options(options, bool(ow))
    compute = options["compute"] if linear else "float64"
    if compute == "auto":
        compute = "float64" if size == 8 else "float32"
    la = [str(i) for i in range(len(widths))]
    lb = [f"other:{i}" for i in range(len(ow))]
    return _plan(widths + ow, [size] * (len(widths) + len(ow)), int(rows), la, lb,
                 **{**options, "compute": compute})


def _check_options(options: PlanOptions, two: bool) -> bool:
    """The options of a plan that depend on each other; True for the exact linear CKA
    plans."""
    measure, kernel = options["measure"], options["kernel"]
    estimator, strategy = options["estimator"], options["strategy"]
    if measure == "spectrum" and two:
        raise InvalidArgumentError("measure='spectrum' takes one source (no other=)")
    linear = measure == "cka" and kernel == "linear" and estimator != "minibatch"
    if strategy is not None and not linear:
        raise InvalidArgumentError(
            "strategy= chooses among the exact linear CKA plans ('single-pass', 'tiled', "
            "'gram'); it does not apply here")
    return linear


def _plan(
    dims: list[int], item: list[int], n: int, la: list[str], lb: list[str], *, measure: str,
    kernel: str, estimator: str, max_memory: int | None, compute: str, strategy: str | None,
    block_rows: int | None, sample: int | None, batch_size: int | None,
) -> Plan:
    budget = max_memory
    if n <= 0:
        raise InvalidArgumentError("the source has no rows: there is nothing to plan")
    linear = measure == "cka" and kernel == "linear" and estimator != "minibatch"
    selected = read_bytes(n, dims, item)
    common = dict(
        measure=measure, kernel=kernel if measure == "cka" else "linear",
        estimator=estimator if measure == "cka" else "-", n=n, layers=la,
        other_layers=lb, dims=dims, compute=compute, bytes_selected=selected,
    )
    if linear:
        return _linear_plan(dims, len(la), n, item, block_rows, compute, budget, strategy,
                            common)
    rate = 2 * gemm_rate(compute)
    bud = memory_budget(budget)
    if measure == "cka" and kernel == "rbf" and estimator != "minibatch":
        m = min(n, int(sample)) if sample is not None else min(n, SAMPLE_CAP)
        peak = m * sum(dims) * 8 + int(_native.rbf_hsic_bytes(len(dims), m, max(dims)))
        flops = m * m * sum(dims) + 2 * m * m * len(dims) ** 2
        read = m * sum(d * s for d, s in zip(dims, item))
        p = Plan(strategy="sampled-gram", passes=1, peak_bytes=peak, bytes_read=read,
                 flops=flops, block_rows=m, estimated_seconds=flops / rate
                 + m * sum(dims) / READ_VALUES_PER_S, gemm_flops_per_s=rate,
                 budget_bytes=bud.bytes, budget_source=bud.source,
                 notes=[f"RBF CKA runs on a seeded sample of {m} of the {n} rows"], **common)
    elif measure == "cka":  # minibatch
        bs = int(batch_size) if batch_size is not None else BATCH_SIZE
        rows = min(n, int(sample)) if sample is not None else n
        peak = int(_native.minibatch_bytes(dims, bs))
        flops = rows * bs * sum(dims) + 2 * rows * bs * len(dims) ** 2
        p = Plan(strategy="minibatch", passes=1, peak_bytes=peak,
                 bytes_read=rows * sum(d * s for d, s in zip(dims, item)), flops=flops,
                 block_rows=bs, estimated_seconds=flops / rate
                 + rows * sum(dims) / READ_VALUES_PER_S, gemm_flops_per_s=rate,
                 budget_bytes=bud.bytes, budget_source=bud.source, **common)
    else:
        p = _moment_measure_plan(dims, len(la), n, item, block_rows, compute, budget, common,
                                 measure, rate, bud)
    _check(p)
    return p


def _check(p: Plan) -> None:
    """The error the call would raise before reading anything."""
    _native.check_budget(p.peak_bytes, f"{p.strategy} ({p.measure})",
                         "give a larger max_memory or select fewer layers",
                         p.budget_bytes)


def _linear_plan(
    dims: list[int], num_a: int, n: int, item: list[int], block_rows: int | None,
    compute: str, budget: int | None, strategy: str | None, common: dict[str, Any],
) -> Plan:
    rate = 2 * gemm_rate(compute)

    def describe(d: dict[str, Any]) -> dict[str, Any]:
        reads = [int(r) for r in d["layer_reads"]]
        values = read_bytes(n, dims, [1] * len(dims), reads)
        flops = 2 * int(d["madds"])
        return {
            "fits": True, "passes": int(d["passes"]), "peak_bytes": int(d["peak_bytes"]),
            "block_rows": int(d["block_rows"]), "flops": flops,
            "bytes_read": read_bytes(n, dims, item, reads),
            "estimated_seconds": flops / rate + values / READ_VALUES_PER_S,
        }

    alternatives: dict[str, dict[str, Any]] = {}
    for s in _native.PAIR_STRATEGIES:
        try:
            alternatives[s] = describe(_native.pair_plan(
                dims, num_a, n, block_rows=block_rows, compute=compute, max_memory=budget,
                strategy=s))
        except MemoryBudgetError as e:
            # what it needs against the budget (the advice after it is for a forced call)
            alternatives[s] = {"fits": False, "reason": str(e).split("; ")[0]}
    d = _native.pair_plan(dims, num_a, n, block_rows=block_rows, compute=compute,
                          max_memory=budget, strategy=strategy)
    chosen = describe(d)
    return Plan(
        strategy=str(d["strategy"]), passes=chosen["passes"], peak_bytes=chosen["peak_bytes"],
        budget_bytes=int(d["budget_bytes"]), budget_source=str(d["budget_source"]),
        bytes_read=chosen["bytes_read"], flops=chosen["flops"],
        block_rows=chosen["block_rows"], estimated_seconds=chosen["estimated_seconds"],
        gemm_flops_per_s=rate, alternatives=alternatives, **common,
    )


def _moment_measure_plan(
    dims: list[int], num_a: int, n: int, item: list[int], block_rows: int | None,
    compute: str, budget: int | None, common: dict[str, Any], measure: str, rate: float,
    bud: Any,
) -> Plan:
    """Spectra and alignment (:func:`layerscope._moments.measure_tiles`): one moment pass
    when every layer fits with its eigendecomposition, else tiles of layers, one pass each."""
    strategy, tiles, peak = measure_tiles(dims, num_a, n, compute, budget, measure)
    reads = [sum(i in t for t in tiles) for i in range(len(dims))]
    read = read_bytes(n, dims, item, reads)
    values = read_bytes(n, dims, [1] * len(dims), reads)
    flops = sum(n * sum(dims[i] for i in t) * (sum(dims[i] for i in t) + 1) for t in tiles)
    eig = sum(10 * dims[i] ** 3 for t in tiles for i in t)
    names = common["layers"] + common["other_layers"]
    notes = ["eigendecompositions (about 10·d³ FLOPs per layer) are counted in the time, "
             "not in flops"]
    if strategy != "single-pass":
        notes.append("tiles: " + "; ".join(",".join(names[i] for i in t) for t in tiles))
    br = min(int(_native.default_block_rows(dims, compute)), n) if block_rows is None \
        else int(block_rows)
    return Plan(
        strategy=strategy, passes=len(tiles), peak_bytes=peak, budget_bytes=bud.bytes,
        budget_source=bud.source, bytes_read=read, flops=flops, block_rows=br,
        estimated_seconds=(flops + eig) / rate + values / READ_VALUES_PER_S,
        gemm_flops_per_s=rate, notes=notes, **common,
    )


# --------------------------------------------------------------------------- CLI


def add_cli(sub: Any) -> None:
    """``layerscope plan STORE [OTHER] [--measure] [--max-memory 4G] [--json]``."""
    p = command(sub, "plan", _cmd_plan)
    p.add_argument("store", nargs="?", default=None,
                   help="store folder (or give --shape and --rows for a store not yet made)")
    p.add_argument("other", nargs="?", default=None, help="second store over the same rows")
    p.add_argument("--shape", default=None, metavar="LxD", type=_shape,
                   help="no store: L layers of width D (e.g. 32x4096; several: 12x768,1x3072)")
    p.add_argument("--other-shape", default=None, metavar="LxD", type=_shape,
                   help="no store: the second model's layers")
    p.add_argument("--rows", type=_rows, default=None, help="no store: rows (e.g. 1e6)")
    p.add_argument("--dtype", default="bfloat16", choices=list(STORE_DTYPES),
                   help="no store: the stored dtype")
    p.add_argument("--measure", default="cka", choices=list(MEASURES),
                   help="the computation to plan")
    p.add_argument("--kernel", default="linear", choices=list(KERNELS), help="CKA kernel")
    p.add_argument("--estimator", default="biased", choices=list(ESTIMATORS),
                   help="CKA estimator")
    p.add_argument("--strategy", default=None, choices=list(_native.PAIR_STRATEGIES),
                   help="force one exact linear CKA plan")
    add_layer_args(p)
    p.add_argument("--compute", default="auto", choices=["auto", "float64", "float32"],
                   help="arithmetic of the block products (auto: float32 for 16/32-bit stores)")
    p.add_argument("--sample", type=cli_type(Int(1)), default=None,
                   help=f"RBF: rows to sample (default: all up to {SAMPLE_CAP})")
    p.add_argument("--batch-size", type=cli_type(Int(4)), default=None,
                   help=f"minibatch rows (default {BATCH_SIZE})")
    add_max_memory_arg(p)
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


def _shape(text: str) -> list[int]:
    """``"32x4096"`` or ``"12x768,1x3072"`` → the widths."""
    out: list[int] = []
    try:
        for part in text.split(","):
            count, width = part.lower().split("x")
            out += [int(width)] * int(count)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not LxD (e.g. 32x4096, or 12x768,1x3072)") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: layers and widths must be positive")
    return out


def _rows(text: str) -> int:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of rows") from None
    if not v.is_integer() or v < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number of rows")
    return int(v)


def _cmd_plan(args: argparse.Namespace) -> int:
    """show the plan of a computation (strategy, passes, memory, bytes read, FLOPs,
    estimated time) without running it

    What `layerscope cka/align/spectrum` would do on STORE (× OTHER) under the memory budget:
    the strategy taken and why (the alternatives that do not fit, with what they would need),
    passes, peak memory, bytes read, FLOPs and an estimated time from this machine's measured
    product rate. Reads only manifests."""
    opts = dict(measure=args.measure, kernel=args.kernel, estimator=args.estimator,
                max_memory=args.max_memory, compute=args.compute, strategy=args.strategy,
                sample=args.sample, batch_size=args.batch_size)
    if args.store is None:
        if args.shape is None or args.rows is None:
            raise InvalidArgumentError("give a STORE, or --shape and --rows")
        p = plan_shapes(args.shape, args.rows, other_widths=args.other_shape,
                        dtype=args.dtype, **opts)  # type: ignore[arg-type]
    else:
        if args.shape is not None or args.other_shape is not None or args.rows is not None:
            raise InvalidArgumentError("--shape, --other-shape and --rows replace STORE; "
                                       "give one or the other")
        p = plan(args.store, args.other, layers=args.layers, other_layers=args.other_layers,
                 **opts)  # type: ignore[arg-type]
    print(json.dumps(p.to_dict(), indent=2) if args.json else str(p))
    return 0
