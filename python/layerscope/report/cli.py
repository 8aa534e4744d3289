"""``layerscope report STORE [OTHER]``."""

from __future__ import annotations

import argparse
from typing import Any

from .._validate import SEED, Int, cli_type
from . import report


def _cmd_report(args: argparse.Namespace) -> int:
    path = report(args.store, args.other, args.out, sample=args.sample or None,
                  bootstrap=args.bootstrap, rbf=not args.no_rbf, seed=args.seed,
                  progress=not args.quiet)
    print(f"report: {path.resolve()}")
    return 0


def add_cli(sub: Any) -> None:
    p = sub.add_parser("report", help="every measure on a store (or two) → one HTML report",
                       description="Run every measure in as few passes as possible and write "
                                   "DIR/report.html (self-contained), DIR/results.json and "
                                   "the figures as PNG files.")
    p.add_argument("store", help="activation store (folder)")
    p.add_argument("other", nargs="?", default=None,
                   help="a second store with the same row ids (cross-model comparison)")
    p.add_argument("-o", "--out", default="report", help="output folder")
    p.add_argument("--sample", type=cli_type(Int(0)), default=2048,
                   help="rows sampled for RBF CKA and intrinsic dimension (0 = all rows)")
    p.add_argument("--bootstrap", type=cli_type(Int(0)), default=20,
                   help="bootstrap resamples for ID CIs")
    p.add_argument("--no-rbf", action="store_true", help="skip RBF CKA")
    p.add_argument("--seed", type=cli_type(SEED), default=0, help="seed of the row sample")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=_cmd_report)
