"""``layerscope batch STORE... -o DIR``: the command over :func:`layerscope.batch`."""

from __future__ import annotations

import argparse
import time
from typing import Any

from .._commands import command
from .._defaults import ALIGN_K
from .._layers import add_layer_args
from .._memory import add_max_memory_arg
from .._text import escape
from .._validate import SEED, Int, Strings, cli_type
from ..measures.alignment import METHODS as ALIGN_METHODS
from ..measures.cka import ESTIMATORS, KERNELS
from ..measures.idim import METHODS as ID_METHODS
from . import MEASURES, PAIRS, batch


def _names(options: tuple[str, ...] | None) -> Any:
    """A comma-separated list (of ``options`` when given), as an argparse type."""
    return cli_type(Strings(options=options),
                    lambda text: [x.strip() for x in text.split(",") if x.strip()])


def _sample(text: str) -> int | None:
    return None if text.lower() in ("all", "none") else cli_type(Int(1))(text)


def _k(text: str) -> int | str:
    return "auto" if text == "auto" else cli_type(Int(1))(text)


def _run(args: argparse.Namespace) -> int:
    """the same measures over many stores (checkpoints, seeds, edits): a resumable folder
    with a tidy results.csv

    Compute MEASURES over STORE... (in run order) into DIR: DIR/results.csv (one row per store
    pair, layer pair, measure, estimator), each item's full result under DIR/items/. A rerun
    skips finished items (unless a store changed) and recomputes the rest; one process per DIR
    at a time. Exit status 2 when an item failed (its error is printed; the others are
    kept)."""
    t0 = time.perf_counter()
    opts: dict[str, Any] = {"layers": args.layers}
    per: dict[str, dict[str, Any]] = {
        "cka": {"kernel": args.kernel, "estimator": args.estimator, "sample": args.sample,
                "seed": args.seed},
        "align": {"method": args.method, "k": args.align_k},
        "id": {"methods": args.id_methods, "sample": args.id_sample, "seed": args.seed,
               "k": args.id_k},
        "spectrum": {},
    }
    for m in args.measures:
        opts[m] = per[m]
    res = batch(args.stores, out=args.out, pairs=args.pairs, reference=args.reference,
                measures=args.measures, resume=not args.no_resume, labels=args.labels,
                workers=args.workers, figures=not args.no_figures, progress=not args.quiet,
                max_memory=args.max_memory,
                **opts)
    for item, err in res.failed.items():
        print(escape(f"failed: {item}: {err}"))
    print(f"# batch | {len(res.computed)} computed, {len(res.skipped)} already done, "
          f"{len(res.failed)} failed | {len(res.rows)} rows -> {escape(str(res.csv))} | "
          f"{escape(str(res.index))} | {time.perf_counter() - t0:.2f} s")
    return 2 if res.failed else 0


def add_cli(sub: Any) -> None:
    """``layerscope batch STORE... -o DIR [--pairs P] [--measures M,M] [options]``."""
    p = command(sub, "batch", _run)
    p.add_argument("stores", nargs="+", metavar="STORE", help="store folders, in run order")
    p.add_argument("-o", "--out", required=True, metavar="DIR", help="the batch folder")
    p.add_argument("--reference", default=None, metavar="STORE",
                   help="the reference of --pairs reference (default: the first STORE)")
    p.add_argument("--pairs", default="reference", choices=list(PAIRS),
                   help="store pairs of cka/align: each vs the reference, consecutive, all, "
                   "or each store with itself")
    p.add_argument("--measures", type=_names(MEASURES), default=["cka"],
                   metavar="M,M", help=f"comma-separated, of {', '.join(MEASURES)}")
    p.add_argument("--labels", type=_names(None), default=None, metavar="A,B",
                   help="names of the stores in the table (default: folder names)")
    p.add_argument("--no-resume", action="store_true", help="recompute finished items too")
    p.add_argument("--no-figures", action="store_true",
                   help="index.html without figures (they need matplotlib: the plot extra)")
    p.add_argument("--workers", type=cli_type(Int(1)), default=None,
                   help="items at the same time (default 2, each with half the memory budget)")
    add_layer_args(p, other=False)
    g = p.add_argument_group("cka")
    g.add_argument("--kernel", default="linear", choices=list(KERNELS), help="kernel")
    g.add_argument("--estimator", default="biased", choices=list(ESTIMATORS),
                   help="HSIC estimator")
    g.add_argument("--sample", type=_sample, default=None,
                   help="rows of a seeded sample (default: all rows; RBF: up to 4096)")
    g.add_argument("--seed", type=cli_type(SEED), default=0, help="seed of the row samples")
    g = p.add_argument_group("align")
    g.add_argument("--method", default="subspace", choices=list(ALIGN_METHODS),
                   help="alignment measure")
    g.add_argument("--align-k", type=_k, default=ALIGN_K, help="kept directions, or 'auto'")
    g = p.add_argument_group("id")
    g.add_argument("--id-methods", type=_names(ID_METHODS),
                   default=["twonn", "mle"], metavar="M,M", help="estimators")
    g.add_argument("--id-sample", type=_sample, default=20000,
                   help="rows of the seeded sample, or 'all'")
    g.add_argument("--id-k", type=cli_type(Int(1)), default=20, help="MLE neighbours")
    add_max_memory_arg(p)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
