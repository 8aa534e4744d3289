"""``layerscope report STORE [OTHER]``."""

from __future__ import annotations

import argparse
from typing import Any

from .._commands import command
from .._source import resolve
from .._validate import SEED, Int, cli_type
from ..errors import InvalidArgumentError
from ..measures.cli import _add_ray_arg, _backend, add_verify_arg, open_verified
from . import report


def _cmd_report(args: argparse.Namespace) -> int:
    """every measure on a store (or two) → one HTML report

    Run every measure in as few passes as possible and write DIR/report.html
    (self-contained), DIR/results.json and the figures as PNG files."""
    open_verified(args)
    if args.verify:  # before any work: a report notes a failed section and goes on
        for s in (args.store, args.other):
            if s is not None:
                s.verify()
    labels = None
    if args.label:
        count = 2 if args.other else 1
        if len(args.label) > count:
            raise InvalidArgumentError(f"--label: {len(args.label)} names for {count} store(s)")
        names = list(args.label)
        if len(names) < count:  # the second store keeps its own name
            names.append(resolve(args.other).short_name("B"))
        labels = (names + ["B"])[:2]
    path = report(args.store, args.other, args.out, sample=args.sample or None,
                  bootstrap=args.bootstrap, null=args.null, rbf=not args.no_rbf, seed=args.seed,
                  progress=not args.quiet, labels=labels, **_backend(args))
    print(f"report: {path.resolve()}")
    return 0


def add_cli(sub: Any) -> None:
    p = command(sub, "report", _cmd_report)
    p.add_argument("store", help="activation store (folder)")
    p.add_argument("other", nargs="?", default=None,
                   help="a second store with the same row ids (cross-model comparison)")
    p.add_argument("-o", "--out", default="report", help="output folder")
    p.add_argument("--sample", type=cli_type(Int(0)), default=2048,
                   help="rows sampled for RBF CKA and intrinsic dimension (0 = all rows)")
    p.add_argument("--bootstrap", type=cli_type(Int(0)), default=20,
                   help="bootstrap resamples for ID CIs")
    p.add_argument("--null", type=cli_type(Int(0)), default=99,
                   help="permutations of the linear CKA's null on the sample (0: none)")
    p.add_argument("--no-rbf", action="store_true", help="skip RBF CKA")
    p.add_argument("--label", nargs="+", metavar="NAME",
                   help="names of the store(s) in the text and figures (default: the store's "
                   "label or model name from its metadata, else its folder name)")
    p.add_argument("--seed", type=cli_type(SEED), default=0, help="seed of the row sample")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    add_verify_arg(p)
    _add_ray_arg(p)
