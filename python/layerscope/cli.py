"""The ``layerscope`` command line. Each package declares its commands (an
``add_cli(subparsers)`` function beside the API it mirrors); this module only collects them."""

from __future__ import annotations

import argparse
import sys

from .capture.cli import add_cli as _capture
from .demo import add_cli as _demo
from .measures.cli import add_cli as _measures
from .planner import add_cli as _planner
from .report.cli import add_cli as _report
from .store import add_cli as _store

# The packages' commands, in the order they appear in --help.
_COMMANDS = (_store, _capture, _measures, _planner, _report, _demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="layerscope",
        description="Activation statistics: streamed CKA, subspace alignment, spectra, intrinsic dimension.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"layerscope {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in _COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .errors import LayerscopeError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = args.func(args)
    except LayerscopeError as e:
        print(f"layerscope: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("layerscope: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
