"""The measures' commands: ``layerscope cka | align | spectrum | id | rsa``. Each parses its
options, calls the public function of the same name and prints, saves and plots the result
the same way (:func:`_emit`)."""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from .._defaults import ALIGN_K, BATCH_SIZE, RIDGE
from .._layers import add_layer_args
from .._memory import add_max_memory_arg
from .._optional import require
from .._text import Table, escape
from .._validate import SEED, Float, Int, cli_type
from ..errors import InvalidArgumentError
from ..plots import NULL_ALPHA
from .alignment import METHODS as ALIGN_METHODS
from .alignment import SPACES, alignment
from .cka import ESTIMATORS, KERNELS, cka
from .idim import METHODS as ID_METHODS
from .idim import intrinsic_dimension
from .neighbors import cknna, rsa
from .shape import DISTANCES, shape_metric
from .spectrum import spectrum

# What ``--plot`` can write (matplotlib's savefig formats), checked before any work starts.
PLOT_FORMATS = ("png", "pdf", "svg", "svgz", "eps", "ps", "jpg", "jpeg", "tif", "tiff", "webp",
                "pgf")


def check_outputs(args: argparse.Namespace) -> None:
    """Before any work: ``--plot`` files have a format matplotlib writes (and matplotlib is
    installed), and the folders of every output can be written."""
    plots = [getattr(args, k, None) for k in ("plot", "plot_cosines")]
    for path in filter(None, plots):
        ext = os.path.splitext(path)[1].lstrip(".").lower()
        if ext not in PLOT_FORMATS:
            raise InvalidArgumentError(
                f"{path}: cannot write a figure as {ext or 'a file without extension'!r}; "
                f"use one of {', '.join(PLOT_FORMATS)}")
        require("matplotlib", f"--plot {path}")
    for path in filter(None, [getattr(args, "out", None), *plots]):
        folder = os.path.dirname(os.path.abspath(path))
        while not os.path.exists(folder):
            folder = os.path.dirname(folder)
        try:  # a real probe: permissions bits say nothing on /proc, read-only mounts, root
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as e:
            raise InvalidArgumentError(
                f"{path}: cannot write into {folder} ({e.strerror})") from None


def footer(measure: str, method: str, meta: dict[str, Any], seconds: float) -> str:
    """The one line every measure command ends with: measure, estimator or method, rows used,
    the sample and its seed, wall time."""
    n, total = meta.get("n"), meta.get("n_total", meta.get("n"))
    sampled = n is not None and total is not None and n < total
    sample = f"sample {n} of {total} rows" if sampled else "all rows"
    seed = f"seed {meta.get('seed')}" if sampled else "no seed (no sampling)"
    return f"# {measure} | {method} | n = {n} | {sample} | {seed} | {seconds:.2f} s"


def _emit(res: Any, args: argparse.Namespace, table: Table, method: str, seconds: float,
          digits: int = 4, notes: Sequence[str] = ()) -> int:
    """Write ``--out`` first (a later failure loses nothing), print the table and ``notes``
    (unless ``--quiet``) and the footer, then draw ``--plot`` (and ``--plot-cosines``)."""
    if args.out:
        res.save(args.out)
    if not args.quiet:
        print(table.to_text(digits))
        for line in notes:
            print(escape(line))
    print(footer(args.command, method, res.meta, seconds))
    if args.plot:
        res.plot().savefig(args.plot)
    if getattr(args, "plot_cosines", None):
        res.plot_cosines().savefig(args.plot_cosines)
    return 0


def _finish(p: argparse.ArgumentParser, plot: str, func: Any, *, placed: bool = True) -> None:
    """The options every measure command ends with (``placed``: where it runs, ``--ray`` and
    ``--device``, as the measure's ``backend``/``device``), and the function it runs (after
    :func:`check_outputs`)."""
    if placed:
        _add_ray_arg(p)
        _add_device_arg(p)
    p.add_argument("--out", default=None, metavar="FILE.json",
                   help="write the result as JSON (before anything is printed)")
    p.add_argument("--plot", default=None, metavar="FILE",
                   help=f"write {plot} ({', '.join(PLOT_FORMATS[:3])}, ...)")
    add_max_memory_arg(p)
    add_verify_arg(p)
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no progress bar and no table (the one-line footer stays)")

    def run(args: argparse.Namespace) -> int:
        check_outputs(args)
        open_verified(args)
        return func(args)

    p.set_defaults(func=run)


def add_verify_arg(p: argparse.ArgumentParser) -> None:
    """``--verify``: every shard's sha256 is checked before its rows are used."""
    p.add_argument("--verify", action="store_true",
                   help="check each shard's sha256 against the manifest before its rows are "
                   "used (once per shard, during the pass: no extra read)")


def open_verified(args: argparse.Namespace) -> None:
    """With ``--verify``: ``args.store`` and ``args.other`` (folders) opened as stores whose
    every read checks the shards' sha256 (:func:`layerscope.open_store` ``verify=True``)."""
    if not getattr(args, "verify", False):
        return
    from ..store import open_store

    for name in ("store", "other"):
        path = getattr(args, name, None)
        if path is not None:
            setattr(args, name, open_store(path, verify=True))


def _sampling(p: argparse.ArgumentParser, sample: int | None, what: str) -> None:
    """``--sample`` (rows, or 'all') and ``--seed`` of the commands on a seeded sample."""
    p.add_argument("--sample", type=_sample_arg, default="all" if sample is None else sample,
                   help=f"rows of the seeded sample {what}, or 'all'")
    p.add_argument("--seed", type=cli_type(SEED), default=0, help="seed of the row sample")


def _timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    return fn(*args, **kwargs), time.perf_counter() - t0


def _cmd_cka(args: argparse.Namespace) -> int:
    res, sec = _timed(cka, args.store, args.other, kernel=args.kernel, estimator=args.estimator,
                      layers=args.layers, other_layers=args.other_layers, sample=args.sample,
                      seed=args.seed, sigma=args.sigma, batch_size=args.batch_size,
                      max_memory=args.max_memory, nonfinite=args.nonfinite,
                      compute=args.compute, progress=not args.quiet, null=args.null,
                      bootstrap=args.bootstrap, confidence=args.confidence, **_backend(args))
    return _emit(res, args, calibrated_table(res), f"{res.meta['kernel']} {res.meta['estimator']}",
                 sec, notes=calibration_notes(res) + ray_notes(res))


#: The level below which the CLI's table (and the heatmap) call a pair distinguishable
#: from the permutation null.
ALPHA = NULL_ALPHA
#: What marks the other pairs in the table.
NULL_MARK = "°"


def calibrated_table(res: Any, digits: int = 4) -> Table:
    """The CKA table; with ``null=``, each pair whose p-value is ≥ :data:`ALPHA` marked
    :data:`NULL_MARK` (not distinguishable from unrelated layers at this sample); with
    ``bootstrap=``, each cell followed by its interval."""
    p = res.meta.get("p_values")
    ci = res.meta.get("ci")
    if p is None:
        return res.to_table()
    cal = res.meta.get("calibration", {})
    rows = []
    for i in range(len(res.rows)):
        row = []
        for j in range(len(res.cols)):
            v = float(res.values[i, j])
            cell = "nan" if np.isnan(v) else f"{v:.{digits}f}"
            if cal.get("null") and not np.isnan(p[i, j]) and p[i, j] >= ALPHA:
                cell += NULL_MARK
            elif cal.get("null"):
                cell += " "
            if cal.get("bootstrap") and np.isfinite(ci[:, i, j]).all():
                cell += f" [{ci[0, i, j]:.{min(digits, 3)}f}, {ci[1, i, j]:.{min(digits, 3)}f}]"
            row.append(cell)
        rows.append(row)
    return Table(list(res.rows), list(res.cols), rows)


def calibration_notes(res: Any) -> list[str]:
    """What the marks and intervals of :func:`calibrated_table` mean, and the null mean."""
    cal = res.meta.get("calibration")
    if not cal:
        return []
    out = [f"# calibration on {cal['n']} rows ({cal['rows']}; seed {cal['seed']})"]
    if cal.get("null"):
        nm = res.meta["null_mean"]
        off = ~np.eye(*nm.shape, dtype=bool) if res.rows == res.cols else np.ones(nm.shape, bool)
        vals = nm[off & np.isfinite(nm)]
        span = f"{vals.min():.4f} to {vals.max():.4f}" if vals.size else "nan"
        out.append(f"# {NULL_MARK} p >= {ALPHA} against {cal['null']} permutations (not "
                   f"distinguishable from unrelated layers); null mean CKA {span}")
        if 1.0 / (cal["null"] + 1) >= ALPHA:
            out.append(f"# with {cal['null']} permutations the smallest p-value is "
                       f"1/{cal['null'] + 1}: no pair can be below {ALPHA} (use --null "
                       f"{int(np.ceil(1 / ALPHA))} or more)")
    if cal.get("bootstrap"):
        out.append(f"# [lo, hi]: {cal['confidence']:.0%} percentile interval of "
                   f"{cal['bootstrap']} bootstrap resamples")
    return out


def _cmd_align(args: argparse.Namespace) -> int:
    res, sec = _timed(alignment, args.store, args.other, method=args.method, k=args.k,
                      space=args.space, layers=args.layers, other_layers=args.other_layers,
                      ridge=args.ridge, progress=not args.quiet, max_memory=args.max_memory,
                      **_backend(args))
    keeps_k = args.method in ("subspace", "svcca", "pwcca")
    method = res.meta["estimator"] + (f", k = {res.meta['k']}" if keeps_k else "")
    return _emit(res, args, res.to_table(), method, sec, digits=3,
                 notes=cca_notes(res) + ray_notes(res))


def _backend(args: argparse.Namespace) -> dict[str, Any]:
    """``--ray [ADDRESS]`` as the functions' ``backend`` / ``ray_address``, and
    ``--device`` (where the command has it) as ``device``."""
    out: dict[str, Any] = ({"backend": "local"} if args.ray is None
                           else {"backend": "ray", "ray_address": args.ray or None})
    if getattr(args, "device", None) is not None:
        out["device"] = args.device
    return out


def _add_ray_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ray", nargs="?", const="", default=None, metavar="ADDRESS",
        help="run it as tasks on a Ray cluster: ADDRESS ('auto': the cluster started "
        "on this machine with 'ray start'; host:port), else RAY_ADDRESS, else a local instance "
        "on 127.0.0.1; every node must see the stores at the same paths. Put it after the "
        "store(s)")


def _add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device", default=None, metavar="DEVICE",
        help="run the products on a torch device: 'cuda', 'cuda:1', 'cpu' (the torch engine "
        "on the CPU) or 'auto' (CUDA when torch sees one, else the Rust engine); default: the "
        "Rust CPU engine. The same numbers (see layerscope.cka's device=)")


def ray_notes(res: Any) -> list[str]:
    """Where it ran: the torch device, and on Ray the range tasks, merges, nodes."""
    dev = [f"# device: {res.meta['device']} (products on the torch engine)"] \
        if res.meta.get("device") else []
    return dev + _ray_only(res)


def _ray_only(res: Any) -> list[str]:
    t = res.meta.get("tasks")
    if res.meta.get("backend") != "ray" or not t:
        return []
    if "note" in t:
        return [f"# ray: {t['note']}"]
    cpus = f"{t['cpus_per_task']} CPU{'s' if t['cpus_per_task'] > 1 else ''} per task"
    if "prepare" in t:
        return [f"# ray: {t['prepare']} layer tasks, {t['blocks']} pair-block tasks (up to "
                f"{t['layers_per_block']} layers per group) on {t['nodes']} nodes, {cpus}"]
    if "layers" in t:
        return [f"# ray: {t['tasks']} layer tasks on {t['nodes']} nodes, {cpus}"]
    if "batches_per_range" in t:
        return [f"# ray: {t['ranges']} range tasks of whole minibatches "
                f"({'+'.join(map(str, t['batches_per_range']))} batches) on {t['nodes']} "
                f"nodes, {cpus}"]
    return [f"# ray: {t['ranges']} range tasks ({t['ranges_per_tile']} per tile), {t['merges']} "
            f"merge tasks + {t['driver_merges']} on the driver (depth {t['merge_depth']}) on "
            f"{t['nodes']} nodes, "
            f"{t['cpus_per_task']} CPU{'s' if t['cpus_per_task'] > 1 else ''} per task"]


def cca_notes(res: Any) -> list[str]:
    """Why a CCA diagonal is below 1: the layers whose covariance is singular (rank below
    the width, or n ≤ d) get the ridge ``eps·tr(C)/d``, with their ranks."""
    m = res.meta
    if m.get("method") != "cca":
        return []
    sides = m.get("sides") or ["", ""]
    ridged = {}
    for side, names, ridges, ranks in ((sides[0], res.rows, m["row_ridge"], m["row_rank"]),
                                       (sides[1], res.cols, m["col_ridge"], m["col_rank"])):
        for name, ridge, rank in zip(names, ridges, ranks):
            if ridge > 0:
                ridged[f"{side}:{name}" if side else name] = (rank, ridge)
    if not ridged:
        return [f"# CCA without a ridge: every covariance has full rank (n = {m['n']})"]
    which = ", ".join(f"{name} (rank {rank}, ridge {ridge:.3g})"
                      for name, (rank, ridge) in ridged.items())
    return [f"# CCA ridge eps·tr(C)/d (eps = {m['ridge_eps']:g}) added to the singular "
            f"covariances (n = {m['n']}) of {which}: a layer of rank r and width d has CCA about "
            "r/d with itself (R² averages over all d directions); --ridge 0 is allowed only "
            "where every covariance has full rank"]


def _cmd_spectrum(args: argparse.Namespace) -> int:
    res, sec = _timed(spectrum, args.store, layers=args.layers, top=args.top,
                      progress=not args.quiet, max_memory=args.max_memory, **_backend(args))
    return _emit(res, args, res.to_table(), "covariance eigenvalues", sec, digits=3,
                 notes=ray_notes(res))


def _cmd_id(args: argparse.Namespace) -> int:
    res, sec = _timed(
        intrinsic_dimension, args.store, method=args.method, layers=args.layers,
        sample=args.sample, seed=args.seed, k=args.k, n1=args.n1, n2=args.n2,
        discard_fraction=args.discard_fraction, duplicates=args.duplicates,
        tolerance=args.tolerance, bootstrap=args.bootstrap, scales=args.scales,
        pool=args.pool, pca_threshold=args.pca_threshold, progress=not args.quiet,
        max_memory=args.max_memory, **_backend(args))
    return _emit(res, args, res.to_table().without_empty_columns(), args.method, sec,
                 notes=ray_notes(res))


def _cmd_rsa(args: argparse.Namespace) -> int:
    res, sec = _timed(rsa, args.store, args.other, layers=args.layers,
                      dissimilarity=args.dissimilarity, compare=args.compare,
                      sample=args.sample, seed=args.seed, progress=not args.quiet,
                      max_memory=args.max_memory, **_backend(args))
    return _emit(res, args, res.to_table(), f"{args.dissimilarity} RDMs, {args.compare}", sec,
                 notes=ray_notes(res))


def _cmd_cknna(args: argparse.Namespace) -> int:
    res, sec = _timed(cknna, args.store, args.other, layers=args.layers, k=args.k,
                      normalize=not args.raw, sample=args.sample, seed=args.seed,
                      progress=not args.quiet, max_memory=args.max_memory)
    what = f"k = {args.k}, {'raw' if args.raw else 'unit-norm'} rows, unbiased HSIC"
    return _emit(res, args, res.to_table(), what, sec)


def _cmd_shape(args: argparse.Namespace) -> int:
    res, sec = _timed(shape_metric, args.store, args.other, layers=args.layers,
                      alpha=args.alpha, distance=args.distance, progress=not args.quiet,
                      max_memory=args.max_memory, **_backend(args))
    return _emit(res, args, res.to_table(), f"{args.distance}, alpha = {args.alpha:g}", sec,
                 notes=ray_notes(res))


def _k_cli(s: str) -> int | str:
    return s if s == "auto" else cli_type(Int(1))(s)


def _sample_arg(s: str) -> int | None:
    return None if s.lower() in ("all", "none") else cli_type(Int(1))(s)


def _command(sub: Any, name: str, help: str, description: str | None = None, *,
             pair: bool = True, other_layers: bool = False) -> argparse.ArgumentParser:
    """A measure's command: ``STORE`` (and ``[OTHER]`` for a measure of layer pairs) and the
    layer selection (``--layers``, and ``--other-layers`` where the measure takes them)."""
    p = sub.add_parser(name, help=help, description=description)
    p.add_argument("store", help="store folder")
    if pair:
        p.add_argument("other", nargs="?", default=None, help="second store over the same rows")
    add_layer_args(p, other=other_layers)
    return p  # type: ignore[no-any-return]


def add_cli(sub: Any) -> None:
    """``layerscope cka``, ``align``, ``spectrum``, ``id``, ``rsa``, ``cknna`` and ``shape``."""
    p = _command(
        sub, "cka", "CKA between all layer pairs (linear/RBF; biased, debiased, minibatch)",
        "Centred kernel alignment of every layer pair of STORE (or STORE × OTHER, whose row "
        "ids must match). Linear biased/debiased: exact, one pass over all rows. RBF: a "
        "seeded sample. Minibatch: Nguyen et al. 2021.", other_layers=True)
    p.add_argument("--kernel", default="linear", choices=list(KERNELS), help="kernel")
    p.add_argument("--estimator", default="biased", choices=list(ESTIMATORS),
                   help="HSIC estimator (Kornblith 2019; Song 2012; Nguyen 2021)")
    _sampling(p, None, "(RBF: all rows up to 4096, else 4096)")
    p.add_argument("--sigma", type=cli_type(Float(0, lo_open=True), float), default=1.0,
                   help="RBF bandwidth: sigma x sqrt(median squared distance)")
    p.add_argument("--batch-size", type=cli_type(Int(4)), default=None,
                   help=f"minibatch rows (default {BATCH_SIZE})")
    p.add_argument("--nonfinite", default="error", choices=["error", "nan"],
                   help="NaN/Inf in a layer: stop with an error, or give that layer NaN")
    p.add_argument("--null", type=cli_type(Int(0)), default=0, metavar="B",
                   help="permutations for a p-value per pair (0: none); pairs not "
                   f"distinguishable from the null (p >= {ALPHA}) are marked {NULL_MARK}")
    p.add_argument("--bootstrap", type=cli_type(Int(0)), default=0, metavar="B",
                   help="row resamples for a percentile interval per pair (0: none)")
    p.add_argument("--confidence", type=cli_type(Float(0, 1, lo_open=True, hi_open=True), float),
                   default=0.95, help="level of the bootstrap interval")
    p.add_argument("--compute", default="auto", choices=["auto", "float64", "float32", "tf32"],
                   help="arithmetic of the linear engine's block products (auto: float32 for "
                   "f32/f16/bf16 stores, ~2x faster, summed in float64; float64 otherwise; "
                   "tf32: TF32 tensor-core products with --device cuda, an approximation)")
    _finish(p, "the heatmap", _cmd_cka)

    p = _command(sub, "align", "subspace alignment (principal angles, SVCCA, PWCCA, CCA, "
                 "Procrustes) for all layer pairs, one pass", other_layers=True)
    p.add_argument("--method", default="subspace", choices=list(ALIGN_METHODS),
                   help="alignment measure")
    p.add_argument("--k", type=_k_cli, default=ALIGN_K,
                   help="kept directions, or 'auto' (99%% of the variance)")
    p.add_argument("--space", default="samples", choices=list(SPACES),
                   help="subspaces of the samples (centred rows) or of the features")
    p.add_argument("--ridge", type=cli_type(Float(0), float), default=RIDGE,
                   help="CCA ridge eps: C + eps·tr(C)/d·I (0: none, needs full-rank covariances)")
    p.add_argument("--plot-cosines", default=None, metavar="FILE",
                   help="write the per-pair cosine curves (Procrustes, SVCCA, CCA)")
    _finish(p, "the overlap heatmap", _cmd_align)

    p = _command(sub, "spectrum", "per-layer covariance spectra, effective rank, PCA-ID",
                 pair=False)
    p.add_argument("--top", type=cli_type(Int(1)), default=None,
                   help="keep the largest TOP eigenvalues in the result (default: all)")
    _finish(p, "the log-log spectra", _cmd_spectrum)

    p = _command(sub, "id", "intrinsic dimension per layer (TwoNN, MLE, GRIDE, PCA)",
                 pair=False)
    p.add_argument("--method", default="twonn", choices=list(ID_METHODS), help="estimator")
    _sampling(p, 20000, "for the neighbour estimators")
    p.add_argument("--k", type=cli_type(Int(1)), default=20, help="MLE: neighbours")
    p.add_argument("--n1", type=cli_type(Int(1)), default=1, help="GRIDE: first neighbour rank")
    p.add_argument("--n2", type=cli_type(Int(1)), default=2,
                   help="GRIDE: second neighbour rank")
    p.add_argument("--discard-fraction", type=cli_type(Float(0, 1, hi_open=True), float),
                   default=0.1, help="TwoNN: largest ratios left out of the fit")
    p.add_argument("--duplicates", default="drop", choices=["drop", "error", "keep"],
                   help="rows at distance <= tolerance of another row")
    p.add_argument("--tolerance", type=cli_type(Float(0), float), default=None,
                   help="duplicate distance (default 1e-7 x the sample's RMS radius)")
    p.add_argument("--bootstrap", type=cli_type(Int(0)), default=0,
                   help="bootstrap resamples for confidence intervals (0: none)")
    p.add_argument("--pool", default="harmonic", choices=["harmonic", "mean", "median"],
                   help="MLE: how per-row estimates are pooled")
    p.add_argument("--scales", type=cli_type(Int(1)), nargs="+", default=None,
                   help="GRIDE: n1 values of a multiscale curve")
    p.add_argument("--pca-threshold", type=cli_type(Float(0, 1, lo_open=True), float),
                   default=0.95, help="PCA: share of the variance the kept components explain")
    _finish(p, "the ID-by-depth plot", _cmd_id)

    p = _command(sub, "rsa", "RSA (RDM correlation) for all layer pairs")
    p.add_argument("--dissimilarity", default="euclidean", choices=["euclidean", "correlation"],
                   help="RDM entries")
    p.add_argument("--compare", default="spearman", choices=["spearman", "pearson"],
                   help="correlation of two RDMs")
    _sampling(p, 2000, "(RDMs are m x m)")
    _finish(p, "the heatmap", _cmd_rsa)

    p = _command(
        sub, "cknna", "CKNNA (kernel alignment on mutual nearest neighbours) for all layer pairs",
        "CKNNA of Huh et al. 2024 (the Platonic representation paper): unbiased HSIC of the "
        "inner-product Grams restricted to each row's mutual k nearest neighbours, normalised "
        "by each layer with itself; on a seeded sample of rows.")
    p.add_argument("-k", type=cli_type(Int(1)), default=10, help="neighbours per row")
    p.add_argument("--raw", action="store_true",
                   help="inner products of the raw rows (default: rows scaled to unit norm, "
                   "as the paper)")
    _sampling(p, 2000, "(neighbours from exact m x m inner products)")
    _finish(p, "the heatmap", _cmd_cknna, placed=False)

    p = _command(
        sub, "shape", "generalized shape metrics (Williams et al. 2021) for all layer pairs",
        "Shape distance of every layer pair from one pass of moments (exact over all rows): "
        "each layer partially whitened (alpha = 1: Procrustes, 0: CCA-like), the angle (or "
        "Euclidean distance) after the best rotation.")
    p.add_argument("--alpha", type=cli_type(Float(0, 1), float), default=1.0,
                   help="partial whitening: 1 = none (Procrustes), 0 = full (CCA-like)")
    p.add_argument("--distance", default="angular", choices=list(DISTANCES),
                   help="angular (radians) or euclidean")
    _finish(p, "the heatmap", _cmd_shape)
