"""The measures' commands: ``layerscope cka | align | spectrum | id | rsa``. Each parses its
options, calls the public function of the same name and prints, saves and plots the result
the same way (:func:`_emit`)."""

from __future__ import annotations

import argparse
from typing import Any

from .._defaults import ALIGN_K, BATCH_SIZE, RIDGE
from .._layers import add_layer_args
from .._memory import add_max_memory_arg
from .alignment import METHODS as ALIGN_METHODS
from .alignment import SPACES, alignment
from .cka import ESTIMATORS, KERNELS, cka
from .idim import METHODS as ID_METHODS
from .idim import intrinsic_dimension
from .neighbors import rsa
from .spectrum import spectrum


def _emit(res: Any, args: argparse.Namespace, table: Any, *lines: str) -> int:
    """Print ``table`` (unless ``--quiet`` where the command has it) and ``lines``, then write
    ``--out`` (JSON) and ``--plot`` (and ``--plot-cosines`` where the command has it)."""
    if not getattr(args, "quiet_table", False):
        print(table.to_string())
        for line in lines:
            print(line)
    if args.out:
        res.save(args.out)
    if args.plot:
        res.plot().savefig(args.plot)
    if getattr(args, "plot_cosines", None):
        res.plot_cosines().savefig(args.plot_cosines)
    return 0


def _finish(p: argparse.ArgumentParser, plot: str, func: Any,
            quiet: str = "no progress bar") -> None:
    """The options every measure command ends with, and the function it runs."""
    p.add_argument("--out", default=None, help="write the result as JSON")
    p.add_argument("--plot", default=None, help=f"write {plot} (png/pdf/svg)")
    add_max_memory_arg(p)
    p.add_argument("--quiet", action="store_true", help=quiet)
    p.set_defaults(func=func)


def _sampling(p: argparse.ArgumentParser, sample: int) -> None:
    """``--sample`` (rows, or 'all') and ``--seed`` of the commands on a seeded sample."""
    p.add_argument("--sample", type=_sample_arg, default=sample,
                   help=f"rows to sample, or 'all' (default {sample})")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample")


def _cmd_cka(args: argparse.Namespace) -> int:
    res = cka(args.store, args.other, kernel=args.kernel, estimator=args.estimator,
              layers=args.layers, other_layers=args.other_layers, sample=args.sample,
              seed=args.seed, sigma=args.sigma, batch_size=args.batch_size,
              max_memory=args.max_memory, nonfinite=args.nonfinite, compute=args.compute,
              progress=not args.quiet)
    args.quiet_table = args.quiet
    return _emit(res, args, res.to_pandas().round(4),
                 f"# {res.meta['kernel']} {res.meta['estimator']} CKA, n = {res.meta['n']} "
                 f"rows, {res.meta['seconds']:.2f} s")


def _cmd_align(args: argparse.Namespace) -> int:
    res = alignment(args.store, args.other, method=args.method, k=args.k, space=args.space,
                    layers=args.layers, other_layers=args.other_layers, ridge=args.ridge,
                    progress=not args.quiet, max_memory=args.max_memory)
    return _emit(res, args, res.to_pandas().round(3))


def _cmd_spectrum(args: argparse.Namespace) -> int:
    res = spectrum(args.store, layers=args.layers, top=args.top, progress=not args.quiet,
                   max_memory=args.max_memory)
    return _emit(res, args, res.to_pandas().round(3))


def _cmd_id(args: argparse.Namespace) -> int:
    res = intrinsic_dimension(
        args.store, method=args.method, layers=args.layers, sample=args.sample,
        seed=args.seed, k=args.k, n1=args.n1, n2=args.n2,
        discard_fraction=args.discard_fraction, duplicates=args.duplicates,
        tolerance=args.tolerance, bootstrap=args.bootstrap, scales=args.scales,
        pool=args.pool, pca_threshold=args.pca_threshold, progress=not args.quiet,
        max_memory=args.max_memory)
    return _emit(res, args, res.table)


def _cmd_rsa(args: argparse.Namespace) -> int:
    res = rsa(args.store, args.other, layers=args.layers, dissimilarity=args.dissimilarity,
              compare=args.compare, sample=args.sample, seed=args.seed,
              progress=not args.quiet, max_memory=args.max_memory)
    return _emit(res, args, res.to_pandas().round(4))


def _k_cli(s: str) -> int | str:
    return s if s == "auto" else int(s)


def _sample_arg(s: str) -> int | None:
    return None if s.lower() in ("all", "none") else int(s)


def add_cli(sub: Any) -> None:
    """``layerscope cka``, ``align``, ``spectrum``, ``id`` and ``rsa``."""
    p = sub.add_parser(
        "cka",
        help="CKA between all layer pairs (linear/RBF; biased, debiased, minibatch)",
        description="Centred kernel alignment of every layer pair of STORE (or STORE × OTHER, "
        "whose row ids must match). Linear biased/debiased: exact, one pass over "
        "all rows. RBF: a seeded sample. Minibatch: Nguyen et al. 2021.",
    )
    p.add_argument("store", help="store folder")
    p.add_argument("other", nargs="?", default=None, help="second store over the same rows")
    p.add_argument("--kernel", default="linear", choices=list(KERNELS))
    p.add_argument("--estimator", default="biased", choices=list(ESTIMATORS))
    add_layer_args(p)
    p.add_argument("--sample", type=int, default=None, help="rows to sample (seeded)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sigma", type=float, default=1.0, help="RBF bandwidth multiplier")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"minibatch rows (default {BATCH_SIZE})")
    p.add_argument("--nonfinite", default="error", choices=["error", "nan"])
    p.add_argument("--compute", default="auto", choices=["auto", "float64", "float32"],
                   help="arithmetic of the linear engine's block products (auto: float32 for "
                   "f32/f16/bf16 stores, ~2x faster; float64 otherwise)")
    _finish(p, "the heatmap", _cmd_cka, quiet="no progress bar, no table")

    p = sub.add_parser(
        "align",
        help="subspace alignment (principal angles, SVCCA, PWCCA, CCA, "
        "Procrustes) for all layer pairs, one pass",
    )
    p.add_argument("store")
    p.add_argument("other", nargs="?", default=None)
    p.add_argument("--method", default="subspace", choices=list(ALIGN_METHODS))
    p.add_argument("--k", type=_k_cli, default=ALIGN_K,
                   help="kept directions, or 'auto' (99%% variance)")
    p.add_argument("--space", default="samples", choices=list(SPACES))
    p.add_argument("--ridge", type=float, default=RIDGE, help="CCA ridge eps (·tr(C)/d)")
    add_layer_args(p)
    p.add_argument("--plot-cosines", default=None,
                   help="write per-pair cosine curves (png/pdf/svg)")
    _finish(p, "the overlap heatmap", _cmd_align)

    p = sub.add_parser("spectrum", help="per-layer covariance spectra, effective rank, PCA-ID")
    p.add_argument("store")
    add_layer_args(p, other=False)
    p.add_argument("--top", type=int, default=None)
    _finish(p, "the log-log spectra", _cmd_spectrum)

    p = sub.add_parser("id", help="intrinsic dimension per layer (TwoNN, MLE, GRIDE)")
    p.add_argument("store")
    p.add_argument("--method", default="twonn", choices=list(ID_METHODS))
    add_layer_args(p, other=False)
    _sampling(p, 20000)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--n1", type=int, default=1)
    p.add_argument("--n2", type=int, default=2)
    p.add_argument("--discard-fraction", type=float, default=0.1)
    p.add_argument("--duplicates", default="drop", choices=["drop", "error", "keep"])
    p.add_argument("--tolerance", type=float, default=None, help="duplicate distance")
    p.add_argument("--bootstrap", type=int, default=0)
    p.add_argument("--pool", default="harmonic", choices=["harmonic", "mean", "median"])
    p.add_argument("--scales", type=int, nargs="+", default=None, help="GRIDE n1 values")
    p.add_argument("--pca-threshold", type=float, default=0.95)
    _finish(p, "the ID-by-depth plot", _cmd_id)

    p = sub.add_parser("rsa", help="RSA (RDM correlation) for all layer pairs")
    p.add_argument("store")
    p.add_argument("other", nargs="?", default=None)
    add_layer_args(p, other=False)
    p.add_argument("--dissimilarity", default="euclidean", choices=["euclidean", "correlation"])
    p.add_argument("--compare", default="spearman", choices=["spearman", "pearson"])
    _sampling(p, 2000)
    _finish(p, "the heatmap", _cmd_rsa)
